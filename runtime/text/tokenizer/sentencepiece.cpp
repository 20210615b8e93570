// Directories that ship only a SentencePiece tokenizer.model are encoded with libsentencepiece itself, segment by
// segment between added tokens, as transformers' slow (legacy) Llama tokenizer does.
#include <sentencepiece_processor.h>

#include "runtime/core/error.h"
#include "runtime/text/tokenizer/impl.h"

namespace kiln::text {

class SentencePieceModel {
 public:
  sentencepiece::SentencePieceProcessor proc;
};

std::shared_ptr<SentencePieceModel> load_sentencepiece(const std::string& path) {
  auto m = std::make_shared<SentencePieceModel>();
  auto status = m->proc.Load(path);
  if (!status.ok()) throw Error(path + ": not a valid SentencePiece model (" + status.ToString() + ")");
  return m;
}

int32_t sp_piece_to_id(const SentencePieceModel& m, std::string_view piece) {
  int id = m.proc.PieceToId(piece);
  // PieceToId answers unk_id for unknown pieces; only the unknown piece itself really maps there.
  if (id == m.proc.unk_id() && m.proc.IdToPiece(id) != piece) return -1;
  return id;
}

std::optional<std::string> sp_id_to_piece(const SentencePieceModel& m, int32_t id) {
  if (id < 0 || id >= m.proc.GetPieceSize()) return std::nullopt;
  return m.proc.IdToPiece(id);
}

size_t sp_size(const SentencePieceModel& m) { return static_cast<size_t>(m.proc.GetPieceSize()); }

void sp_encode(const SentencePieceModel& m, std::string_view text, std::vector<int32_t>& out) {
  std::vector<int> ids;
  auto status = m.proc.Encode(text, &ids);
  if (!status.ok()) throw Error("SentencePiece encoding failed: " + status.ToString());
  out.insert(out.end(), ids.begin(), ids.end());
}

std::string sp_decode(const SentencePieceModel& m, const std::vector<int32_t>& ids) {
  std::string text;
  std::vector<int> v(ids.begin(), ids.end());
  auto status = m.proc.Decode(v, &text);
  if (!status.ok()) throw Error("SentencePiece decoding failed: " + status.ToString());
  return text;
}

std::vector<AddedToken> sp_control_tokens(const SentencePieceModel& m) {
  std::vector<AddedToken> out;
  for (int id = 0; id < m.proc.GetPieceSize(); ++id) {
    if (!m.proc.IsControl(id) && !m.proc.IsUnknown(id)) continue;
    AddedToken t;
    t.content = m.proc.IdToPiece(id);
    t.id = id;
    t.special = true;
    out.push_back(t);
  }
  return out;
}

}  // namespace kiln::text
