// Building a TokenizerImpl from tokenizer.json / tokenizer.model plus tokenizer_config.json, including the adjustments
// transformers makes at load time (TokenizerCompat::Transformers).
#include <algorithm>
#include <fstream>
#include <sstream>

#include "runtime/core/json_limits.h"
#include "runtime/io/path_safety.h"
#include "runtime/text/tokenizer/impl.h"
#include "runtime/text/tokenizer/unicode.h"

namespace kiln {

using text::AddedToken;
using text::JsonWhere;
using text::TokenizerImpl;
using json = nlohmann::json;

namespace text {

PostProcessor make_post_processor(const json& j, const JsonWhere& w, const TokenizerImpl& impl) {
  PostProcessor pp;
  if (j.is_null()) return pp;
  std::string type = require_string(j, "type", w);
  auto special_id = [&](const json& pair, const JsonWhere& pw) {  // ["<s>", 1]
    if (!pair.is_array() || pair.size() != 2 || !pair[1].is_number_integer()) pw.fail("must be [token, id]");
    return pair[1].get<int32_t>();
  };
  if (type == "ByteLevel") return pp;  // only adjusts offsets
  if (type == "RobertaProcessing" || type == "BertProcessing") {
    pp.prefix.push_back(special_id(require(j, "cls", w), w / "cls"));
    pp.suffix.push_back(special_id(require(j, "sep", w), w / "sep"));
    return pp;
  }
  if (type == "TemplateProcessing") {
    const json& single = require(j, "single", w);
    if (!single.is_array()) (w / "single").fail("must be a list");
    const json& specials = j.contains("special_tokens") ? j["special_tokens"] : json::object();
    bool seen_a = false;
    for (size_t i = 0; i < single.size(); ++i) {
      JsonWhere iw = (w / "single")[i];
      const json& item = single[i];
      if (item.is_object() && item.contains("Sequence")) {
        if (seen_a) iw.fail("repeats the sequence, which kiln does not support");
        seen_a = true;
        continue;
      }
      if (!item.is_object() || !item.contains("SpecialToken")) iw.fail("must be a SpecialToken or a Sequence");
      std::string name = require_string(item["SpecialToken"], "id", iw / "SpecialToken");
      auto sp = specials.find(name);
      if (sp == specials.end()) (w / "special_tokens").fail("has no entry for '" + name + "' used by the template");
      const json& ids = require(*sp, "ids", w / "special_tokens" / name);
      auto& dst = seen_a ? pp.suffix : pp.prefix;
      for (const auto& id : ids) {
        if (!id.is_number_integer()) (w / "special_tokens" / name / "ids").fail("must hold integer ids");
        dst.push_back(id.get<int32_t>());
      }
    }
    if (!seen_a) (w / "single").fail("has no Sequence item");
    return pp;
  }
  if (type == "Sequence") {
    const json& list = require(j, "processors", w);
    if (!list.is_array()) (w / "processors").fail("must be a list");
    for (size_t i = 0; i < list.size(); ++i) {
      PostProcessor inner = make_post_processor(list[i], (w / "processors")[i], impl);
      // Each processor wraps what the previous one produced.
      pp.prefix.insert(pp.prefix.begin(), inner.prefix.begin(), inner.prefix.end());
      pp.suffix.insert(pp.suffix.end(), inner.suffix.begin(), inner.suffix.end());
    }
    return pp;
  }
  (w / "type")
      .fail("is the unsupported post-processor '" + type +
            "' (kiln supports TemplateProcessing, ByteLevel, RobertaProcessing, BertProcessing, Sequence)");
}

}  // namespace text

namespace {

std::string read_file(const std::filesystem::path& p) {
  require_regular_file(p);
  std::ifstream in(p, std::ios::binary);
  if (!in) throw Error(p.string() + ": cannot be read");
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

AddedToken parse_added(const json& t, const JsonWhere& w, int32_t id) {
  AddedToken a;
  a.content = text::require_string(t, "content", w);
  a.id = id;
  a.special = text::opt_bool(t, "special", false, w);
  a.lstrip = text::opt_bool(t, "lstrip", false, w);
  a.rstrip = text::opt_bool(t, "rstrip", false, w);
  a.single_word = text::opt_bool(t, "single_word", false, w);
  a.normalized = text::opt_bool(t, "normalized", !a.special, w);
  return a;
}

// transformers adds tokens that tokenizer_config.json declares (added_tokens_decoder, named special tokens) when the
// backend does not know them yet.
void add_config_tokens(std::vector<AddedToken>& tokens, const TokenizerImpl& impl, const json& cfg,
                       const std::string& cfg_name) {
  auto known = [&](const std::string& content) {
    return std::any_of(tokens.begin(), tokens.end(), [&](const AddedToken& t) { return t.content == content; });
  };
  JsonWhere w{cfg_name, ""};
  if (auto it = cfg.find("added_tokens_decoder"); it != cfg.end() && it->is_object()) {
    std::vector<std::pair<int64_t, AddedToken>> sorted;
    for (auto e = it->begin(); e != it->end(); ++e) {
      int64_t id = -1;
      try {
        id = std::stoll(e.key());
      } catch (...) {
        (w / "added_tokens_decoder").fail("has the key '" + e.key() + "', which is not an integer id");
      }
      sorted.emplace_back(id, parse_added(e.value(), w / "added_tokens_decoder" / e.key(), static_cast<int32_t>(id)));
    }
    std::sort(sorted.begin(), sorted.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
    for (auto& [id, t] : sorted)
      if (!known(t.content)) tokens.push_back(t);
  }
  std::vector<std::string> named;
  for (const char* key : {"bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"})
    if (auto s = special_token_text(cfg, key)) named.push_back(*s);
  for (const char* key : {"additional_special_tokens", "extra_special_tokens"})
    if (auto it = cfg.find(key); it != cfg.end() && it->is_array())
      for (const auto& t : *it) {
        if (t.is_string())
          named.push_back(t.get<std::string>());
        else if (t.is_object() && t.contains("content") && t["content"].is_string())
          named.push_back(t["content"]);
      }
  for (const auto& content : named) {
    if (known(content)) continue;
    int32_t id = impl.model_token_to_id(content);
    if (id < 0) continue;  // transformers would append a brand-new id; a model cannot use it, so we skip it
    AddedToken t;
    t.content = content;
    t.id = id;
    t.special = true;
    tokens.push_back(t);
  }
}

std::optional<int32_t> config_token_id(const TokenizerImpl& impl, const json& cfg, const char* key,
                                       const std::vector<AddedToken>& added) {
  auto s = special_token_text(cfg, key);
  if (!s) return std::nullopt;
  for (const auto& t : added)
    if (t.content == *s) return t.id;
  int32_t id = impl.model_token_to_id(*s);
  return id >= 0 ? std::optional<int32_t>(id) : std::nullopt;
}

bool is_llama_class(const json& cfg) {
  auto it = cfg.find("tokenizer_class");
  if (it == cfg.end() || !it->is_string()) return false;
  const std::string& c = it->get_ref<const std::string&>();
  return c == "LlamaTokenizer" || c == "LlamaTokenizerFast";
}

// Model types whose Hub tokenizer_class transformers 5 knows to be wrong: it runs their tokenizer.json as written
// (MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS in models/auto/tokenization_auto.py, transformers 5.23).
bool hub_tokenizer_class_is_ignored(const std::string& model_type) {
  static const std::string kTypes =
      " arctic camembertv2-base chatlm cohere_asr ernie4_5 ernie4_5_moe fuyu h2ovl_chat hyperclovax"
      " hyperclovax_vision_v2 hyperclovax_vlm internlm2 internlm3 iquestcoder jamba llava llava_next minicpm3 minicpmv"
      " minimax_m2 modernbert modernbert-decoder molmo molmo2 nemotron nvfp4 opencua openvla paddleocr_vl phi3 phi3_v"
      " phimoe qwen2 qwen3_5 qwen3_5_moe qwen3_5_moe_text qwen4_exp siglip2 smolvlm step3_vl vipllava ";
  return !model_type.empty() && model_type.find(' ') == std::string::npos &&
         kTypes.find(" " + model_type + " ") != std::string::npos;
}

// transformers 5 replaces the pipeline of tokenizer.json by LlamaTokenizer's hard-coded one when tokenizer_config.json
// names LlamaTokenizer(Fast), except when the model type is known to declare the wrong class, and except when the
// file is byte-level (its test is literally whether the text of tokenizer.json contains "ByteLevel"): DeepSeek-V3
// declares LlamaTokenizerFast but is byte-level BPE, and the Metaspace pipeline would drop all of its CJK text.
bool takes_llama_pipeline(const json& cfg, const std::string& model_type, bool json_mentions_byte_level) {
  return is_llama_class(cfg) && !hub_tokenizer_class_is_ignored(model_type) && !json_mentions_byte_level;
}

// The model type of the directory: config.json's model_type, or the family in a kiln workspace's kiln.json.
std::string directory_model_type(const std::filesystem::path& dir) {
  std::error_code ec;
  auto read = [&](const char* file) {
    auto p = dir / file;
    if (!std::filesystem::is_regular_file(p, ec)) return json();
    json j = json::parse(read_file(p), nullptr, false);
    return j.is_object() ? j : json();
  };
  json c = read("config.json");
  if (c.is_object() && c.contains("model_type") && c["model_type"].is_string()) return c["model_type"];
  json k = read("kiln.json");
  if (k.is_object() && k.contains("model") && k["model"].is_object() && k["model"].contains("family") &&
      k["model"]["family"].is_string())
    return k["model"]["family"];
  return "";
}

struct LoadContext {
  std::string model_type;
  bool json_mentions_byte_level = false;
  bool chatglm_v1 = false;  // a ChatGLMTokenizer over ice_text.model (ChatGLM-6B)
};

std::shared_ptr<TokenizerImpl> build(const json* tok_json, const std::string& name,
                                     std::shared_ptr<text::SentencePieceModel> sp, const json& cfg_in,
                                     const std::string& cfg_name, TokenizerCompat compat, const LoadContext& ctx) {
  auto impl = std::make_shared<TokenizerImpl>();
  impl->name = name;
  const json cfg = compat == TokenizerCompat::Transformers && cfg_in.is_object() ? cfg_in : json::object();
  JsonWhere w{name, ""};
  std::vector<AddedToken> added;
  const json* post_json = nullptr;
  if (tok_json) {
    const json& j = *tok_json;
    if (!j.is_object()) w.fail("must be a JSON object");
    const json& model = text::require(j, "model", w);
    std::string type = model.is_object() ? text::opt_string(model, "type", "BPE", w / "model") : "";
    if (type != "BPE")
      (w / "model" / "type").fail("is '" + type + "', but kiln supports only BPE models in tokenizer.json");
    impl->bpe = std::make_unique<text::BpeModel>(model, w / "model");
    impl->normalizer = text::make_normalizer(j.value("normalizer", json()), w / "normalizer");
    impl->pre_tokenizer = text::make_pre_tokenizer(j.value("pre_tokenizer", json()), w / "pre_tokenizer");
    impl->decoder = text::make_decoder(j.value("decoder", json()), w / "decoder");
    if (auto it = j.find("added_tokens"); it != j.end() && !it->is_null()) {
      if (!it->is_array()) (w / "added_tokens").fail("must be a list");
      for (size_t i = 0; i < it->size(); ++i) {
        JsonWhere aw = (w / "added_tokens")[i];
        const json& t = (*it)[i];
        int64_t id = text::opt_int(t, "id", -1, aw);
        if (id < 0 || id > INT32_MAX) (aw / "id").fail("must be a non-negative integer");
        added.push_back(parse_added(t, aw, static_cast<int32_t>(id)));
      }
    }
    if (auto it = j.find("post_processor"); it != j.end() && !it->is_null()) post_json = &*it;
  } else {
    impl->sp = std::move(sp);
    // ChatGLM's code matches only its command tokens in text; <s>, </s> and <unk> stay text, as SentencePiece
    // reads them.
    if (ctx.chatglm_v1) {
      int64_t offset = 20000;  // ChatGLMTokenizer's default num_image_tokens
      if (auto it = cfg_in.find("num_image_tokens"); it != cfg_in.end()) {
        if (!it->is_number_integer() || it->get<int64_t>() < 0 || it->get<int64_t>() > (int64_t(1) << 24))
          throw Error(cfg_name + ": 'num_image_tokens' must be a non-negative integer");
        offset = it->get<int64_t>();
      }
      impl->glm_v1 = text::GlmV1Text{int32_t(offset)};
      added = text::chatglm_v1_command_tokens(*impl->sp, int32_t(offset));
    } else {
      added = text::is_chatglm_tokenizer(cfg_in) ? text::chatglm_command_tokens(text::sp_size(*impl->sp))
                                                 : text::sp_control_tokens(*impl->sp);
    }
  }

  const bool llama_pipeline = compat == TokenizerCompat::Transformers && tok_json &&
                              takes_llama_pipeline(cfg, ctx.model_type, ctx.json_mentions_byte_level);
  if (compat == TokenizerCompat::Transformers) {
    add_config_tokens(added, *impl, cfg, cfg_name);
    if (llama_pipeline) {
      // transformers 5's LlamaTokenizer keeps only vocab, merges and post-processor from tokenizer.json and
      // hard-codes the rest (models/llama/tokenization_llama.py).
      bool add_prefix_space = cfg.contains("add_prefix_space") && cfg["add_prefix_space"].is_boolean()
                                  ? cfg["add_prefix_space"].get<bool>()
                                  : true;
      bool legacy = cfg.contains("legacy") && cfg["legacy"].is_boolean() ? cfg["legacy"].get<bool>() : false;
      std::string scheme = !add_prefix_space ? "never" : legacy ? "always" : "first";
      impl->normalizer.reset();
      impl->pre_tokenizer = text::make_pre_tokenizer(
          json{{"type", "Metaspace"}, {"replacement", "\xE2\x96\x81"}, {"prepend_scheme", scheme}, {"split", false}},
          w / "pre_tokenizer");
      impl->decoder = text::make_llama_decoder(add_prefix_space);
    }
  }
  if (tok_json)
    text::assign_added_ids(added, impl->model_vocab_count(),
                           [&](const std::string& c) { return impl->model_token_to_id(c); });
  impl->added.build(added, impl->normalizer.get());
  // BOS/EOS ids are facts about the model, so they come from tokenizer_config.json in both compat modes.
  const json names = cfg_in.is_object() ? cfg_in : json::object();
  impl->bos = config_token_id(*impl, names, "bos_token", added);
  impl->eos = config_token_id(*impl, names, "eos_token", added);

  if (ctx.chatglm_v1) {
    // ChatGLM-6B closes every encoded text with [gMASK] <sop> (build_inputs_with_special_tokens) and stops on <eop>.
    impl->bos.reset();
    auto id = [&](const char* piece) { return impl->model_token_to_id(piece); };
    impl->eos = id("<eop>") >= 0 ? std::optional<int32_t>(id("<eop>")) : std::nullopt;
    if (compat == TokenizerCompat::Transformers) {
      if (id("[MASK]") < 0 || id("[gMASK]") < 0 || id("<sop>") < 0)
        throw Error(name + ": a ChatGLM-6B ice_text.model must have the pieces [MASK], [gMASK] and <sop>");
      impl->post.glm_mask = id("[MASK]");
      impl->post.glm_gmask = id("[gMASK]");
      impl->post.glm_end = id("</s>");
      impl->post.glm_sop = id("<sop>");
    }
  } else if (!tok_json && text::is_chatglm_tokenizer(cfg_in)) {
    // ChatGLM2/3 start every encoded text with [gMASK] sop and add no BOS or EOS; EOS is the model's </s>.
    impl->bos.reset();
    const int32_t eos = text::sp_piece_to_id(*impl->sp, "</s>");
    impl->eos = eos >= 0 ? std::optional<int32_t>(eos) : std::nullopt;
    if (compat == TokenizerCompat::Transformers)
      for (const AddedToken& t : added)
        if (t.content == "[gMASK]" || t.content == "sop") impl->post.prefix.push_back(t.id);
  } else if (compat == TokenizerCompat::Transformers && !tok_json) {
    // A SentencePiece model alone: transformers' slow tokenizer follows add_bos_token / add_eos_token, with the
    // Llama convention (BOS unless told otherwise).
    bool add_bos = cfg.value("add_bos_token", true);
    bool add_eos = cfg.value("add_eos_token", false);
    if (!cfg.contains("bos_token") && impl->sp) {
      int b = text::sp_piece_to_id(*impl->sp, "<s>");
      if (b >= 0) impl->bos = b;
    }
    if (add_bos && impl->bos) impl->post.prefix.push_back(*impl->bos);
    if (add_eos && impl->eos) impl->post.suffix.push_back(*impl->eos);
  } else if (llama_pipeline) {
    // With tokenizer.json, transformers 5 drops add_bos_token / add_eos_token from tokenizer_config.json;
    // LlamaTokenizer then adds BOS with its own defaults, unless tokenizer.json has no post-processor at all.
    if (post_json && impl->bos) impl->post.prefix.push_back(*impl->bos);
  } else if (post_json) {
    // Every other class runs the post-processor of tokenizer.json as written, whatever the flags say.
    impl->post = text::make_post_processor(*post_json, w / "post_processor", *impl);
  }
  return impl;
}

}  // namespace

Tokenizer Tokenizer::from_json(std::string_view tokenizer_json, const json& cfg, TokenizerCompat compat,
                               const std::string& name) {
  check_json_depth(tokenizer_json, name);
  json j = json::parse(tokenizer_json.begin(), tokenizer_json.end(), nullptr, false);
  if (j.is_discarded()) throw Error(name + ": not valid JSON");
  LoadContext ctx{"", tokenizer_json.find("\"ByteLevel\"") != std::string_view::npos};
  return Tokenizer(build(&j, name, nullptr, cfg, "tokenizer_config.json", compat, ctx));
}

Tokenizer Tokenizer::load(const TokenizerFiles& files, TokenizerCompat compat) {
  json cfg = read_tokenizer_config(files);
  std::string cfg_name = files.tokenizer_config ? files.tokenizer_config->string() : "tokenizer_config.json";
  LoadContext ctx{directory_model_type(files.dir), false};
  if (!files.tokenizer_json && !files.tokenizer_model && files.tiktoken)
    return Tokenizer(text::load_tiktoken(*files.tiktoken, text::TiktokenFlavor::kQwen));
  if (!files.tokenizer_json && files.tokenizer_model && text::is_glm4_tokenizer(cfg))
    return Tokenizer(text::load_tiktoken(*files.tokenizer_model, text::TiktokenFlavor::kGlm4));
  if (files.tokenizer_json) {
    std::string name = files.tokenizer_json->string();
    const std::string text = read_file(*files.tokenizer_json);
    check_json_depth(text, name);
    json j = json::parse(text, nullptr, false);
    if (j.is_discarded()) throw Error(name + ": not valid JSON");
    ctx.json_mentions_byte_level = text.find("\"ByteLevel\"") != std::string::npos;
    return Tokenizer(build(&j, name, nullptr, cfg, cfg_name, compat, ctx));
  }
  ctx.chatglm_v1 = text::is_chatglm_tokenizer(cfg) && text::is_chatglm_v1_model(*files.tokenizer_model);
  auto sp = text::load_sentencepiece(files.tokenizer_model->string());
  return Tokenizer(build(nullptr, files.tokenizer_model->string(), std::move(sp), cfg, cfg_name, compat, ctx));
}

}  // namespace kiln
