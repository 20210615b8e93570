// libFuzzer target: any template text must parse and render or fail with kiln::Error, never crash or hang.
#include <cstddef>
#include <cstdint>
#include <string>

#include "runtime/core/error.h"
#include "runtime/text/jinja/jinja.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size > 4096) return 0;  // bound work per input: nested loops over range() grow fast
  std::string src(reinterpret_cast<const char*>(data), size);
  try {
    kiln::jinja::Template t(src);
    kiln::jinja::List msgs;
    kiln::jinja::Value m = kiln::jinja::Value::dict();
    m.dict_ref().set("role", kiln::jinja::Value::string("user"));
    m.dict_ref().set("content", kiln::jinja::Value::string("hi {{ x }}"));
    msgs.push_back(m);
    t.render(
        {{"messages", kiln::jinja::Value::list(msgs)}, {"add_generation_prompt", kiln::jinja::Value::boolean(true)}});
  } catch (const kiln::Error&) {
  }
  return 0;
}
