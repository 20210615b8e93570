#pragma once
// One exception type for every user-facing failure. The message is one sentence that names the file, tensor or field;
// the CLI prints it on one line and exits non-zero.
#include <stdexcept>
#include <string>

namespace kiln {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

// Thrown when the user interrupts (SIGINT/SIGTERM) a long-running stage; callers clean up exactly as for an Error.
class Interrupted : public Error {
 public:
  Interrupted() : Error("interrupted") {}
};

}  // namespace kiln
