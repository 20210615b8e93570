// kiln verify WS: manifest checksums and structural checks; exit 1 on any problem.
#include <cstdio>
#include <nlohmann/json.hpp>

#include "runtime/workspace/verify.h"
#include "tools/command.h"

namespace kiln::tools {

static Action setup_verify(CLI::App& sub) {
  auto dir = std::make_shared<std::string>();
  auto json_out = std::make_shared<bool>(false);
  sub.add_option("WS", *dir, "workspace directory")->required();
  sub.add_flag("--json", *json_out, "print {\"ok\", \"problems\", \"files_checked\", \"bytes_checked\"} on stdout");
  return [=]() {
    VerifyReport r = verify_workspace(*dir, !*json_out);
    if (*json_out) {
      print_json(nlohmann::ordered_json{{"ok", r.ok()},
                                        {"problems", r.problems},
                                        {"files_checked", r.files_checked},
                                        {"bytes_checked", r.bytes_checked}}
                     .dump(2));
    } else if (r.ok()) {
      std::printf("%s: OK (%zu files, %.1f MB checked)\n", dir->c_str(), r.files_checked,
                  double(r.bytes_checked) / 1e6);
    }
    for (const auto& p : r.problems) std::fprintf(stderr, "kiln verify: %s: %s\n", dir->c_str(), p.c_str());
    return r.ok() ? 0 : 1;
  };
}

KILN_COMMAND(30, "verify", "Check a workspace against its manifest and model spec", setup_verify);

}  // namespace kiln::tools
