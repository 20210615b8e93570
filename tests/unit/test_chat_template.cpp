// ChatTemplate: transformers' input handling around the interpreter, on the real Qwen3 template.
#include <gtest/gtest.h>

#include "runtime/core/error.h"
#include "runtime/text/jinja/chat_template.h"

namespace kiln {
namespace {

using ordered_json = nlohmann::ordered_json;

ChatTemplate qwen3() { return ChatTemplate::from_files(locate_tokenizer_files(KILN_TESTDATA_DIR "/tokenizers/qwen3")); }

TEST(ChatTemplate, RendersQwen3) {
  auto msgs = ordered_json::parse(R"([{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}])");
  EXPECT_EQ(qwen3().render(msgs, true),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
  EXPECT_EQ(qwen3().render(msgs, false), "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n");
}

TEST(ChatTemplate, ExtraKwargsReachTheTemplate) {
  auto msgs = ordered_json::parse(R"([{"role": "user", "content": "hi"}])");
  std::string out = qwen3().render(msgs, true, nullptr, {{"enable_thinking", false}});
  EXPECT_EQ(out, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n");
}

TEST(ChatTemplate, ToolsAreSerialisedInOrder) {
  auto msgs = ordered_json::parse(R"([{"role": "user", "content": "hi"}])");
  auto tools = ordered_json::parse(R"([{"type": "function", "function": {"name": "f", "b": 1, "a": "é"}}])");
  std::string out = qwen3().render(msgs, false, tools);
  EXPECT_NE(out.find(R"({"type": "function", "function": {"name": "f", "b": 1, "a": "é"}})"), std::string::npos);
}

TEST(ChatTemplate, NoneValuedKeysAreDropped) {
  ChatTemplate t("{% for m in messages %}{{ m.tool_calls is defined }}{% endfor %}", nlohmann::json::object());
  EXPECT_EQ(t.render(ordered_json::parse(R"([{"role": "user", "content": "x", "tool_calls": null}])"), false), "False");
}

TEST(ChatTemplate, SpecialTokensComeFromTheConfig) {
  auto cfg = nlohmann::json::parse(R"({"bos_token": {"content": "<s>"}, "eos_token": "</s>", "unk_token": null})");
  ChatTemplate t("{{ bos_token }}|{{ eos_token }}|{{ unk_token is defined }}|{{ tools }}", cfg);
  EXPECT_EQ(t.render(ordered_json::parse(R"([{"role": "user", "content": "x"}])"), false), "<s>|</s>|False|None");
}

TEST(ChatTemplate, RaiseExceptionBecomesAnError) {
  ChatTemplate t("\n{{ raise_exception('Roles must alternate') }}", nlohmann::json::object());
  try {
    t.render(ordered_json::parse(R"([{"role": "user", "content": "x"}])"), false);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "chat template line 2: Roles must alternate");
  }
}

TEST(ChatTemplate, EmptyConversationIsAnError) { EXPECT_THROW(qwen3().render(ordered_json::array(), true), Error); }

TEST(ChatTemplate, MissingTemplateIsAClearError) {
  try {
    ChatTemplate::from_files(locate_tokenizer_files(KILN_TESTDATA_DIR "/tokenizers/llama2"));
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("no chat template"), std::string::npos);
  }
}

}  // namespace
}  // namespace kiln
