#include "runtime/text/tokenizer/tokenizer.h"

#include <algorithm>

#include "runtime/text/tokenizer/impl.h"
#include "runtime/text/tokenizer/unicode.h"

namespace kiln {

namespace text {

int32_t TokenizerImpl::model_token_to_id(std::string_view token) const {
  if (bpe) return bpe->token_to_id(token);
  const int32_t id = sp_piece_to_id(*sp, token);
  return id >= 0 && glm_v1 ? id + glm_v1->id_offset : id;
}

std::optional<std::string> TokenizerImpl::model_id_to_token(int32_t id) const {
  if (bpe) {
    const std::string* s = bpe->id_to_token(id);
    return s ? std::optional<std::string>(*s) : std::nullopt;
  }
  if (glm_v1) {
    // SPTokenizer.__getitem__: the ids below num_image_tokens are image tokens.
    if (id >= 0 && id < glm_v1->id_offset) return "<image_" + std::to_string(id) + ">";
    id -= glm_v1->id_offset;
  }
  return sp_id_to_piece(*sp, id);
}

size_t TokenizerImpl::model_id_limit() const {
  return bpe ? bpe->id_limit() : sp_size(*sp) + size_t(glm_v1 ? glm_v1->id_offset : 0);
}

size_t TokenizerImpl::model_vocab_count() const { return bpe ? bpe->vocab().size() : model_id_limit(); }

void TokenizerImpl::model_tokenize(std::string_view word, std::vector<int32_t>& out) const {
  if (bpe) {
    bpe->tokenize(word, out);
  } else if (glm_v1) {
    const size_t first = out.size();
    sp_encode(*sp, glm_v1_preprocess(word), out);
    for (size_t i = first; i < out.size(); ++i) out[i] += glm_v1->id_offset;
  } else {
    sp_encode(*sp, word, out);
  }
}

std::string TokenizerImpl::model_decode(const std::vector<int32_t>& ids) const {
  if (!glm_v1) return sp_decode(*sp, ids);
  std::vector<int32_t> text_ids;  // image tokens decode to nothing
  for (int32_t id : ids)
    if (id >= glm_v1->id_offset) text_ids.push_back(id - glm_v1->id_offset);
  return glm_v1_postprocess(sp_decode(*sp, text_ids));
}

}  // namespace text

std::vector<int32_t> Tokenizer::encode(std::string_view input, bool add_special_tokens) const {
  const text::TokenizerImpl& t = *impl_;
  std::string sanitized;
  if (!text::is_valid_utf8(input)) {
    sanitized = text::sanitize_utf8(input);
    input = sanitized;
  }
  std::vector<text::Piece> pieces = t.added.extract_and_normalize(input, t.normalizer.get());
  if (t.pre_tokenizer) t.pre_tokenizer->pre_tokenize(pieces);
  std::vector<int32_t> ids;
  ids.reserve(input.size() / 3 + 4);
  if (add_special_tokens) ids.insert(ids.end(), t.post.prefix.begin(), t.post.prefix.end());
  for (const auto& p : pieces) {
    if (p.id >= 0)
      ids.push_back(p.id);
    else
      t.model_tokenize(p.text, ids);
  }
  if (add_special_tokens) ids.insert(ids.end(), t.post.suffix.begin(), t.post.suffix.end());
  if (add_special_tokens && t.post.glm_mask >= 0) {
    const text::PostProcessor& p = t.post;
    auto is_mask = [&](int32_t id) { return id == p.glm_mask || id == p.glm_gmask; };
    if (std::none_of(ids.begin(), ids.end(), is_mask)) ids.push_back(p.glm_gmask);
    if (!is_mask(ids.back()) && p.glm_end >= 0) ids.push_back(p.glm_end);
    ids.push_back(p.glm_sop);
  }
  return ids;
}

std::string Tokenizer::decode(std::span<const int32_t> ids, bool skip_special_tokens) const {
  const text::TokenizerImpl& t = *impl_;
  if (t.sp) {
    // SentencePiece decodes runs of ordinary ids; added tokens are spelled out between them.
    std::string out;
    std::vector<int32_t> run;
    auto flush = [&] {
      if (!run.empty()) out += t.model_decode(run);
      run.clear();
    };
    for (int32_t id : ids) {
      if (const auto* a = t.added.find_by_id(id); a && t.glm_v1) {
        // ChatGLM-6B's command tokens are SentencePiece pieces, and its decode runs SentencePiece over every id.
        if (!(skip_special_tokens && a->special)) run.push_back(id);
      } else if (a) {
        flush();
        if (!(skip_special_tokens && a->special)) out += a->display;
      } else if (id >= 0 && static_cast<size_t>(id) < t.model_id_limit()) {
        run.push_back(id);
      }
    }
    flush();
    return out;
  }
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (int32_t id : ids) {
    if (const auto* a = t.added.find_by_id(id)) {
      if (!(skip_special_tokens && a->special)) tokens.push_back(a->display);
    } else if (const std::string* s = t.bpe->id_to_token(id)) {
      tokens.push_back(*s);
    }
  }
  if (!t.decoder) {
    std::string out;
    for (size_t i = 0; i < tokens.size(); ++i) out += (i ? " " : "") + tokens[i];
    return out;
  }
  t.decoder->decode_chain(tokens);
  std::string out;
  for (const auto& s : tokens) out += s;
  return out;
}

std::optional<std::string> Tokenizer::id_to_token(int32_t id) const {
  if (const auto* a = impl_->added.find_by_id(id)) return a->display;
  return impl_->model_id_to_token(id);
}

std::optional<int32_t> Tokenizer::token_to_id(std::string_view token) const {
  if (const auto* a = impl_->added.find_by_content(token)) return a->id;
  int32_t id = impl_->model_token_to_id(token);
  return id >= 0 ? std::optional<int32_t>(id) : std::nullopt;
}

size_t Tokenizer::vocab_size() const {
  size_t n = impl_->model_id_limit();
  for (const auto& a : impl_->added.tokens()) n = std::max(n, static_cast<size_t>(a.id) + 1);
  return n;
}

std::optional<int32_t> Tokenizer::bos_id() const { return impl_->bos; }
std::optional<int32_t> Tokenizer::eos_id() const { return impl_->eos; }

bool Tokenizer::is_special(int32_t id) const {
  const auto* a = impl_->added.find_by_id(id);
  return a && a->special;
}

}  // namespace kiln
