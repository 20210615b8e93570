#include "runtime/io/interrupt.h"

#include <csignal>

#include "runtime/core/error.h"

namespace kiln {

static volatile std::sig_atomic_t g_interrupted = 0;

static void on_signal(int sig) {
  if (g_interrupted) {
    std::signal(sig, SIG_DFL);
    std::raise(sig);
    return;
  }
  g_interrupted = 1;
}

void install_interrupt_handlers() {
  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);
}

bool interrupt_requested() { return g_interrupted != 0; }

void check_interrupt() {
  if (g_interrupted) throw Interrupted();
}

void clear_interrupt() { g_interrupted = 0; }

}  // namespace kiln
