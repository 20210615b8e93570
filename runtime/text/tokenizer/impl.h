#pragma once
// Internals of kiln::Tokenizer shared by its source files (loading, encoding, SentencePiece); not a public interface.
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "runtime/text/tokenizer/added.h"
#include "runtime/text/tokenizer/bpe.h"
#include "runtime/text/tokenizer/decoder.h"
#include "runtime/text/tokenizer/normalizer.h"
#include "runtime/text/tokenizer/pre_tokenizer.h"
#include "runtime/text/tokenizer/tokenizer.h"

namespace kiln::text {

class SentencePieceModel;  // tokenizer_sp.cpp

// Ids that a post-processor puts around a single sequence when add_special_tokens is true.
struct PostProcessor {
  std::vector<int32_t> prefix, suffix;
  // ChatGLM-6B's build_inputs_with_special_tokens (ids of [MASK], [gMASK], end_token and <sop>; set: glm_mask >= 0):
  // [gMASK] unless a [MASK] or [gMASK] is already there, end_token unless the text then ends in one of them, <sop>.
  int32_t glm_mask = -1, glm_gmask = -1, glm_end = -1, glm_sop = -1;
};

// ChatGLM-6B's SPTokenizer (ice_text.model, chatglm.cpp): text is rewritten before SentencePiece (\n -> <n>,
// \t -> <|tab|>, runs of 2..80 spaces -> <|blank_n|>) and back after it, and SentencePiece ids are shifted by
// num_image_tokens (the image tokens come first in its vocabulary).
struct GlmV1Text {
  int32_t id_offset = 0;
};
std::string glm_v1_preprocess(std::string_view text);
std::string glm_v1_postprocess(std::string text);

struct TokenizerImpl {
  std::string name;  // file name for messages
  std::unique_ptr<Normalizer> normalizer;
  std::unique_ptr<PreTokenizer> pre_tokenizer;
  std::unique_ptr<BpeModel> bpe;
  std::shared_ptr<SentencePieceModel> sp;  // set instead of bpe for tokenizer.model-only directories
  std::unique_ptr<Decoder> decoder;
  AddedVocabulary added;
  PostProcessor post;
  std::optional<int32_t> bos, eos;
  std::optional<GlmV1Text> glm_v1;  // set for ChatGLM-6B's ice_text.model

  int32_t model_token_to_id(std::string_view token) const;
  std::optional<std::string> model_id_to_token(int32_t id) const;
  size_t model_id_limit() const;
  size_t model_vocab_count() const;
  void model_tokenize(std::string_view word, std::vector<int32_t>& out) const;
  std::string model_decode(const std::vector<int32_t>& ids) const;  // only for SentencePiece models
};

// tokenizer.json "post_processor" -> prefix/suffix ids.
PostProcessor make_post_processor(const json& j, const JsonWhere& where, const TokenizerImpl& impl);

// A tiktoken rank file with its family's special tokens, regex and prefix (tiktoken.cpp): Qwen v1's qwen.tiktoken,
// or GLM-4's tokenizer.model (tokenizer_class ChatGLM4Tokenizer).
enum class TiktokenFlavor { kQwen, kGlm4 };
std::shared_ptr<TokenizerImpl> load_tiktoken(const std::filesystem::path& file, TiktokenFlavor flavor);

// SentencePiece support (tokenizer_sp.cpp).
std::shared_ptr<SentencePieceModel> load_sentencepiece(const std::string& path);
int32_t sp_piece_to_id(const SentencePieceModel& m, std::string_view piece);  // -1 when absent
std::optional<std::string> sp_id_to_piece(const SentencePieceModel& m, int32_t id);
size_t sp_size(const SentencePieceModel& m);
void sp_encode(const SentencePieceModel& m, std::string_view text, std::vector<int32_t>& out);
std::string sp_decode(const SentencePieceModel& m, const std::vector<int32_t>& ids);
std::vector<AddedToken> sp_control_tokens(const SentencePieceModel& m);

// ChatGLM2/3's tokenizer (tokenizer_chatglm.cpp): recognised by tokenizer_config.json's tokenizer_class; its command
// and role tokens, numbered from the SentencePiece vocabulary size on.
bool is_chatglm_tokenizer(const json& tokenizer_config);
// GLM-4's (tokenizer_class "ChatGLM4Tokenizer"): its tokenizer.model is a tiktoken rank file, not SentencePiece.
bool is_glm4_tokenizer(const json& tokenizer_config);
std::vector<AddedToken> chatglm_command_tokens(size_t sp_vocab_size);
// ChatGLM-6B's: the command tokens are pieces of ice_text.model, shifted by num_image_tokens like every piece.
bool is_chatglm_v1_model(const std::filesystem::path& model_file);
std::vector<AddedToken> chatglm_v1_command_tokens(const SentencePieceModel& sp, int32_t id_offset);

}  // namespace kiln::text
