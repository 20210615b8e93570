// kiln prompt PATH --messages M.json: prints the chat template rendered for a conversation, byte for byte what
// transformers' apply_chat_template(messages, tokenize=False, add_generation_prompt=True) returns.
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <iterator>
#include <memory>

#include "runtime/core/error.h"
#include "runtime/core/json_limits.h"
#include "runtime/io/staging_dir.h"
#include "runtime/text/jinja/builtin_chat_templates.h"
#include "runtime/text/jinja/chat_template.h"
#include "tools/command.h"

namespace kiln::tools {
namespace {

namespace fs = std::filesystem;
using ordered_json = nlohmann::ordered_json;

struct PromptOptions {
  std::string path;
  std::string messages;
  bool no_generation_prompt = false;
  bool batch = false;
  std::string chat_template;
};

// Like locate_tokenizer_files, but a directory or tokenizer_config.json without a tokenizer is fine: only the
// config and the template are needed here.
TokenizerFiles template_files(const fs::path& path) {
  std::error_code ec;
  fs::path dir = fs::is_directory(path, ec) ? path : path.parent_path();
  if (dir.empty()) dir = ".";
  if (fs::exists(path, ec) &&
      (fs::exists(dir / "tokenizer_config.json", ec) || fs::exists(dir / "chat_template.jinja", ec))) {
    TokenizerFiles f;
    f.dir = dir;
    if (fs::is_regular_file(dir / "tokenizer_config.json", ec)) f.tokenizer_config = dir / "tokenizer_config.json";
    return f;
  }
  return locate_tokenizer_files(path);
}

ordered_json read_input(const std::string& path) {
  std::string text;
  if (path == "-") {
    text.assign(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
  } else {
    text = read_text_file(path);
  }
  check_json_depth(text, path);  // the conversations are copied and converted recursively
  ordered_json j = ordered_json::parse(text, nullptr, false);
  if (j.is_discarded()) throw Error(path + ": not valid JSON");
  return j;
}

struct Conversation {
  ordered_json messages;
  ordered_json tools;
  ordered_json kwargs = ordered_json::object();
  bool add_generation_prompt = true;
};

// A list of messages, or {"messages": [...], "tools": [...], "add_generation_prompt": bool, ...extra kwargs}.
Conversation parse_conversation(const ordered_json& j, const std::string& where) {
  Conversation c;
  if (j.is_array()) {
    c.messages = j;
    return c;
  }
  if (!j.is_object() || !j.contains("messages"))
    throw Error(where + ": expected a list of messages or an object with \"messages\"");
  for (const auto& [k, v] : j.items()) {
    if (k == "messages") {
      c.messages = v;
    } else if (k == "tools") {
      c.tools = v;
    } else if (k == "add_generation_prompt") {
      if (!v.is_boolean()) throw Error(where + ": \"add_generation_prompt\" must be true or false");
      c.add_generation_prompt = v.get<bool>();
    } else if (k == "continue_final_message") {
      throw Error(where + ": \"continue_final_message\" is not supported");
    } else {
      c.kwargs[k] = v;
    }
  }
  return c;
}

std::string render(const TokenizerFiles& files, const std::string& chat_template_flag, const Conversation& c,
                   bool no_generation_prompt) {
  // --chat-template, or with no template next to the tokenizer, the built-in of the directory's family.
  ChatTemplate tmpl = !chat_template_flag.empty() || !resolve_chat_template(files)
                          ? load_chat_template(files, chat_template_flag)
                          : ChatTemplate::from_files(files, !c.tools.is_null());
  return tmpl.render(c.messages, c.add_generation_prompt && !no_generation_prompt, c.tools, c.kwargs);
}

Action setup(CLI::App& sub) {
  auto o = std::make_shared<PromptOptions>();
  sub.add_option("PATH", o->path, "Workspace, HF model directory, tokenizer directory, or tokenizer_config.json")
      ->required();
  sub.add_option("--messages", o->messages,
                 "JSON file ('-' for stdin): a list of messages, or an object with \"messages\", optional \"tools\" "
                 "and extra template arguments")
      ->required();
  sub.add_flag("--no-generation-prompt", o->no_generation_prompt, "Do not append the assistant generation prompt");
  sub.add_option(
      "--chat-template", o->chat_template,
      "Chat template instead of the model's: a Jinja file, or a built-in (" + builtin_chat_template_names() + ")");
  sub.add_flag("--batch", o->batch,
               "The file holds a list of conversations; print a JSON list of {\"prompt\": ...} or {\"error\": ...}");
  return [o]() {
    TokenizerFiles files = template_files(o->path);
    ordered_json input = read_input(o->messages);
    if (!o->batch) {
      std::string out =
          render(files, o->chat_template, parse_conversation(input, o->messages), o->no_generation_prompt);
      std::fwrite(out.data(), 1, out.size(), stdout);
      std::fflush(stdout);
      return 0;
    }
    if (!input.is_array()) throw Error(o->messages + ": --batch expects a list of conversations");
    ordered_json results = ordered_json::array();
    for (size_t i = 0; i < input.size(); ++i) {
      try {
        std::string where = o->messages + "[" + std::to_string(i) + "]";
        results.push_back({{"prompt", render(files, o->chat_template, parse_conversation(input[i], where),
                                             o->no_generation_prompt)}});
      } catch (const Error& e) {
        results.push_back({{"error", e.what()}});
      }
    }
    print_json(results.dump(-1, ' ', false, ordered_json::error_handler_t::replace));
    return 0;
  };
}

}  // namespace

KILN_COMMAND(45, "prompt", "Render the chat template for a conversation exactly as transformers does", setup);

}  // namespace kiln::tools
