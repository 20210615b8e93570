#include "calib/layer_stream.h"

#include <fcntl.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>

#include "runtime/core/error.h"
#include "runtime/io/interrupt.h"
#include "runtime/io/sha256.h"
#include "runtime/model/layers/decoder_block.h"
#include "runtime/model/layers/embedding.h"
#include "runtime/workspace/workspace.h"

namespace kiln::calib {

namespace fs = std::filesystem;

uint64_t default_max_memory() {
  const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGESIZE);
  if (pages <= 0 || page <= 0) return uint64_t(1) << 30;
  return uint64_t(pages) * uint64_t(page) / 4;
}

double process_cpu_seconds() {
  struct rusage ru {};
  ::getrusage(RUSAGE_SELF, &ru);
  auto secs = [](const timeval& t) { return double(t.tv_sec) + double(t.tv_usec) * 1e-6; };
  return secs(ru.ru_utime) + secs(ru.ru_stime);
}

uint64_t parse_memory_size(const std::string& text) {
  const std::string bad = "--max-memory '" + text + "': expected a size such as 512M or 8G";
  size_t used = 0;
  double v = 0;
  try {
    v = std::stod(text, &used);
  } catch (const std::exception&) {
    throw Error(bad);
  }
  std::string unit = text.substr(used);
  if (!unit.empty() && (unit.back() == 'B' || unit.back() == 'b')) unit.pop_back();
  double mult = 1;
  if (unit == "K" || unit == "k")
    mult = 1024.0;
  else if (unit == "M" || unit == "m")
    mult = 1024.0 * 1024;
  else if (unit == "G" || unit == "g")
    mult = 1024.0 * 1024 * 1024;
  else if (unit == "T" || unit == "t")
    mult = 1024.0 * 1024 * 1024 * 1024;
  else if (!unit.empty())
    throw Error(bad);
  if (!(v >= 0) || v * mult > 1e18) throw Error(bad);
  return uint64_t(v * mult);
}

void require_free_space(const fs::path& dir, uint64_t bytes, const std::string& what) {
  std::error_code ec;
  const fs::space_info s = fs::space(dir.empty() ? fs::path(".") : dir, ec);
  if (ec) throw Error(dir.string() + ": cannot query free disk space: " + ec.message());
  if (s.available >= bytes) return;
  auto mib = [](uint64_t b) { return std::to_string((b + (1 << 20) - 1) >> 20) + " MiB"; };
  throw Error(dir.string() + ": not enough free disk space for " + what + ": " + mib(bytes) + " needed, " +
              mib(s.available) + " available");
}

ActivationStore::ActivationStore(int64_t rows, int64_t cols, uint64_t max_memory, const fs::path& spill_path)
    : rows_(rows), cols_(cols) {
  const uint64_t bytes = uint64_t(rows) * uint64_t(cols) * sizeof(float);
  if (bytes <= max_memory) {
    memory_.resize(size_t(rows * cols));
    return;
  }
  if (spill_path.empty()) throw Error("calibration activations exceed --max-memory and there is no place to spill");
  path_ = spill_path;
  fd_ = ::open(path_.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd_ < 0) throw Error(path_.string() + ": cannot create the activation spill file: " + std::strerror(errno));
  if (::ftruncate(fd_, off_t(bytes)) != 0) {
    const int e = errno;
    ::close(fd_);
    fd_ = -1;
    fs::remove(path_);
    throw Error(path_.string() + ": cannot size the activation spill file: " + std::strerror(e));
  }
}

ActivationStore::~ActivationStore() {
  if (fd_ < 0) return;
  ::close(fd_);
  std::error_code ec;
  fs::remove(path_, ec);
}

void ActivationStore::read(int64_t row0, int64_t n, float* dst) const {
  const size_t bytes = size_t(n * cols_) * sizeof(float);
  if (fd_ < 0) {
    std::memcpy(dst, memory_.data() + row0 * cols_, bytes);
    return;
  }
  auto* p = reinterpret_cast<char*>(dst);
  off_t off = off_t(row0 * cols_) * off_t(sizeof(float));
  for (size_t done = 0; done < bytes;) {
    const ssize_t r = ::pread(fd_, p + done, bytes - done, off + off_t(done));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) throw Error(path_.string() + ": cannot read the activation spill file: " + std::strerror(errno));
    done += size_t(r);
  }
}

void ActivationStore::write(int64_t row0, int64_t n, const float* src) {
  const size_t bytes = size_t(n * cols_) * sizeof(float);
  if (fd_ < 0) {
    std::memcpy(memory_.data() + row0 * cols_, src, bytes);
    return;
  }
  const auto* p = reinterpret_cast<const char*>(src);
  off_t off = off_t(row0 * cols_) * off_t(sizeof(float));
  for (size_t done = 0; done < bytes;) {
    const ssize_t r = ::pwrite(fd_, p + done, bytes - done, off + off_t(done));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) throw Error(path_.string() + ": cannot write the activation spill file: " + std::strerror(errno));
    done += size_t(r);
  }
  // The spill file exists to keep memory bounded: written pages go to disk rather than stay cached in this process.
  ::posix_fadvise(fd_, off, off_t(bytes), POSIX_FADV_DONTNEED);
}

namespace {
std::vector<int64_t> uniform(int64_t count, int64_t length) { return std::vector<int64_t>(size_t(count), length); }
int64_t total(const std::vector<int64_t>& lengths) {
  int64_t n = 0;
  for (int64_t l : lengths) n += l;
  return n;
}
// Every block laid out by calibration_sequence(), one after another.
std::vector<int32_t> calibration_tokens(const ModelSpec& spec, const Blocks& blocks) {
  std::vector<int32_t> out;
  for (int64_t b = 0; b < blocks.count(); ++b) {
    const std::vector<int32_t> seq = calibration_sequence(
        spec, std::span<const int32_t>(blocks.tokens).subspan(size_t(b * blocks.seqlen), size_t(blocks.seqlen)));
    out.insert(out.end(), seq.begin(), seq.end());
  }
  return out;
}
}  // namespace

LayerStream::LayerStream(const Workspace& ws, Backend& backend, const Blocks& blocks, const LayerStreamOptions& o)
    // The laid-out tokens are a temporary that lives until the delegated constructor returns.
    : LayerStream(ws, backend, calibration_tokens(ws.spec(), blocks),
                  uniform(blocks.count(), calibration_length(ws.spec(), blocks.seqlen)), o) {}

LayerStream::LayerStream(const Workspace& ws, Backend& backend, std::span<const int32_t> tokens,
                         std::vector<int64_t> lengths, const LayerStreamOptions& o)
    : ws_(ws),
      be_(backend),
      spec_(ws.spec()),
      graph_(build_model_graph(spec_)),
      lengths_(std::move(lengths)),
      batch_tokens_(o.batch_tokens),
      options_(o),
      store_(total(lengths_), spec_.hidden_size, o.max_memory ? o.max_memory : default_max_memory(), o.spill_path),
      scratch_(backend) {
  if (int64_t(tokens.size()) != total(lengths_)) throw Error("layer stream: token count does not match the lengths");
  for (int64_t l : lengths_) {
    offsets_.push_back(offsets_.empty() ? 0 : offsets_.back() + lengths_[offsets_.size() - 1]);
    if (l < 1) throw Error("layer stream: empty sequence");
    if (spec_.prefix_lm())
      prompts_.push_back(prefix_lm_prompt(spec_, tokens.subspan(size_t(offsets_.back()), size_t(l))));
  }
  new_cache(0);
  const int64_t H = spec_.hidden_size;
  Embedding embedding;
  embedding.load(WorkspaceSource(ws_), be_, graph_.embedding);
  release_pages(-1);
  std::vector<int32_t> positions, block_positions;
  for (const Batch& b : batches()) {
    check_interrupt();
    const int64_t N = b.rows;
    ForwardContext ctx(be_, spec_, scratch_);
    ctx.rows = N;
    positions.clear();
    block_positions.clear();
    for (int64_t i = b.first; i < b.first + b.count; ++i) append_positions(i, positions, block_positions);
    ctx.ids = tokens.subspan(size_t(b.row0), size_t(N));
    ctx.positions = positions;
    ctx.block_positions = block_positions;
    Buffer& x = scratch_.get(Scratch::Residual, N * H);
    embedding.forward(ctx, x.f32());
    host_.resize(size_t(N * H));
    be_.download(x, 0, host_.data(), host_.size() * sizeof(float));
    store_.write(b.row0, N, host_.data());
  }
  scratch_.release();
}

LayerStream::~LayerStream() = default;

void LayerStream::append_positions(int64_t i, std::vector<int32_t>& positions,
                                   std::vector<int32_t>& block_positions) const {
  // Every sequence is a fresh one at positions 0..length-1 (a prefix LM's: Model::forward's 2D positions).
  for (int64_t p = 0; p < lengths_[size_t(i)]; ++p) {
    if (prompts_.empty()) {
      positions.push_back(int32_t(p));
      continue;
    }
    const PrefixLmPosition q = prefix_lm_position(prompts_[size_t(i)], p);
    positions.push_back(q.position);
    block_positions.push_back(q.block);
  }
}

std::vector<LayerStream::Batch> LayerStream::batches() const {
  // Whole sequences, as many as fit in batch_tokens (at least one).
  std::vector<Batch> out;
  for (int64_t i = 0; i < int64_t(lengths_.size()); ++i) {
    const int64_t len = lengths_[size_t(i)];
    if (out.empty() || out.back().rows + len > batch_tokens_) out.push_back({i, 0, offsets_[size_t(i)], 0});
    out.back().count++;
    out.back().rows += len;
  }
  return out;
}

void LayerStream::new_cache(int64_t layer) {
  const int64_t bs = 16;
  int64_t blocks = 1;
  for (const Batch& b : batches()) {
    int64_t n = 0;
    for (int64_t i = b.first; i < b.first + b.count; ++i) n += (lengths_[size_t(i)] + bs - 1) / bs;
    blocks = std::max(blocks, n);
  }
  KvCacheConfig kc;
  kc.num_layers = 1;  // one layer at a time: every sequence's attention writes cache layer 0
  kc.num_kv_heads = spec_.num_kv_heads;
  kc.head_dim = spec_.head_dim;
  kc.block_size = bs;
  kc.num_blocks = int32_t(blocks);
  kc.dtype = options_.kv_dtype;
  if (kc.dtype == KvDType::I8Static) {  // this layer's scales
    const auto first = size_t(layer * spec_.num_kv_heads), n = size_t(spec_.num_kv_heads);
    if (options_.k_scale.size() < first + n || options_.v_scale.size() < first + n)
      throw Error("layer stream: no static INT8 KV scales for layer " + std::to_string(layer));
    kc.k_scale.assign(options_.k_scale.begin() + long(first), options_.k_scale.begin() + long(first + n));
    kc.v_scale.assign(options_.v_scale.begin() + long(first), options_.v_scale.begin() + long(first + n));
  }
  cache_.reset();
  cache_ = std::make_unique<KvCache>(be_, kc);
}

void LayerStream::run_layer(int64_t l, const TensorSource& src, ForwardObserver* observer, bool advance) {
  if (l < 0 || l >= num_layers()) throw Error("layer stream: no layer " + std::to_string(l));
  if (options_.kv_dtype == KvDType::I8Static) new_cache(l);
  BlockGraph g = graph_.blocks[size_t(l)];
  g.attn.cache_layer = 0;
  DecoderBlock block;
  block.load(src, be_, g);
  release_pages(l);  // the backend holds its own copy now
  const int64_t H = spec_.hidden_size;
  std::vector<int32_t> positions, block_positions, seq_of_row;
  std::vector<int64_t> slots;
  std::vector<AttentionSequence> spans;
  for (const Batch& b : batches()) {
    check_interrupt();
    const int64_t N = b.rows;
    std::vector<KvSequence> seqs(static_cast<size_t>(b.count));
    positions.clear();
    block_positions.clear();
    seq_of_row.clear();
    slots.clear();
    spans.clear();
    ForwardContext ctx(be_, spec_, scratch_);
    for (int64_t i = 0; i < b.count; ++i) {
      const int64_t L = lengths_[size_t(b.first + i)];
      cache_->reserve(seqs[size_t(i)], L);
      append_positions(b.first + i, positions, block_positions);
      for (int64_t p = 0; p < L; ++p) {
        seq_of_row.push_back(int32_t(i));
        slots.push_back(cache_->slot(seqs[size_t(i)], p));
      }
      ctx.seq_lengths.push_back(L);
    }
    for (int64_t i = 0; i < b.count; ++i) {
      const int64_t L = lengths_[size_t(b.first + i)];
      const int64_t bidirectional = prompts_.empty() ? 0 : prompts_[size_t(b.first + i)].sop;
      spans.push_back({offsets_[size_t(b.first + i)] - b.row0, L, L, std::span<const int32_t>(seqs[size_t(i)].blocks),
                       bidirectional});
    }
    ctx.cache = cache_.get();
    ctx.rows = N;
    ctx.positions = positions;
    ctx.block_positions = block_positions;
    ctx.seq_of_row = seq_of_row;
    ctx.slots = slots;
    ctx.seqs = spans;
    ctx.observer = observer;
    Buffer& x = scratch_.get(Scratch::Residual, N * H);
    Buffer& h = scratch_.get(Scratch::Normed, N * H);
    Buffer& y = scratch_.get(Scratch::LayerOut, N * H);
    host_.resize(size_t(N * H));
    store_.read(b.row0, N, host_.data());
    be_.upload(x, 0, host_.data(), host_.size() * sizeof(float));
    block.attn_norm().forward(be_, x.f32(), h.f32(), N);
    block.forward(ctx, x.f32(), h, y.f32(), nullptr);
    for (KvSequence& s : seqs) cache_->release(s);
    if (!advance) continue;
    be_.download(x, 0, host_.data(), host_.size() * sizeof(float));
    store_.write(b.row0, N, host_.data());
  }
  // The batches' activations (up to batch_tokens rows of the MLP's widest) are not kept for the search that follows.
  scratch_.release();
}

std::vector<int32_t> calibration_sequence(const ModelSpec& spec, std::span<const int32_t> block) {
  if (!spec.prefix_lm()) return {block.begin(), block.end()};
  const size_t context = block.size() / 2;
  std::vector<int32_t> seq(block.begin(), block.begin() + long(context));
  seq.push_back(int32_t(spec.prefix_lm_gmask_id));
  seq.push_back(int32_t(spec.prefix_lm_sop_id));
  seq.insert(seq.end(), block.begin() + long(context), block.end());
  return seq;
}

int64_t calibration_length(const ModelSpec& spec, int64_t seqlen) { return seqlen + (spec.prefix_lm() ? 2 : 0); }

OutputHead::OutputHead(const TensorSource& src, Backend& backend, const ModelGraph& graph)
    : softcap_(graph.final_softcap) {
  norm_.load(src, backend, graph.final_norm);
  // The same head as Model::load: an int8 head (quantization.head) when the workspace has one.
  if (graph.tied_head && !src.int8_head()) table_.load(src, backend, graph.embedding);
  head_ = pack_output_head(backend, src, graph.tied_head && !src.int8_head() ? &table_.tokens() : nullptr);
}

void LayerStream::logits(int64_t i, int64_t row0, int64_t N, const OutputHead& head, std::vector<float>& out) {
  const int64_t H = spec_.hidden_size, V = spec_.vocab_size;
  if (row0 < 0 || N < 1 || row0 + N > lengths_[size_t(i)]) throw Error("layer stream: rows outside the sequence");
  Buffer& x = scratch_.get(Scratch::Residual, N * H);
  Buffer& h = scratch_.get(Scratch::Normed, N * H);
  host_.resize(size_t(N * H));
  store_.read(offsets_[size_t(i)] + row0, N, host_.data());
  be_.upload(x, 0, host_.data(), host_.size() * sizeof(float));
  head.norm().forward(be_, x.f32(), h.f32(), N);
  std::vector<int32_t> rows(static_cast<size_t>(N));
  for (int64_t r = 0; r < N; ++r) rows[size_t(r)] = int32_t(r);
  Buffer& logits = scratch_.get(Scratch::Logits, N * V);
  be_.logits(h.f32(), H, rows, head.weight(), logits.f32());
  if (head.softcap() > 0) be_.softcap(logits.f32(), N * V, head.softcap());
  out.resize(size_t(N * V));
  be_.download(logits, 0, out.data(), out.size() * sizeof(float));
}

std::string LayerStream::save(const fs::path& file) const {
  std::FILE* f = std::fopen(file.c_str(), "wb");
  if (!f) throw Error(file.string() + ": cannot create: " + std::strerror(errno));
  Sha256 hash;
  std::vector<float> rows;
  const int64_t chunk = std::max<int64_t>(1, (int64_t(1) << 22) / std::max<int64_t>(store_.cols(), 1));
  bool ok = true;
  for (int64_t r = 0; r < store_.rows() && ok; r += chunk) {
    const int64_t n = std::min(chunk, store_.rows() - r);
    rows.resize(size_t(n * store_.cols()));
    store_.read(r, n, rows.data());
    hash.update(rows.data(), rows.size() * sizeof(float));
    ok = std::fwrite(rows.data(), sizeof(float), rows.size(), f) == rows.size();
  }
  ok = std::fflush(f) == 0 && ok && ::fsync(::fileno(f)) == 0;
  ok = std::fclose(f) == 0 && ok;
  if (!ok) throw Error(file.string() + ": cannot write the saved activations");
  return hash.hex_digest();
}

void LayerStream::load(const fs::path& file) {
  const uint64_t bytes = uint64_t(store_.rows() * store_.cols()) * sizeof(float);
  std::error_code ec;
  if (fs::file_size(file, ec) != bytes || ec) throw Error(file.string() + ": saved activations have the wrong size");
  std::FILE* f = std::fopen(file.c_str(), "rb");
  if (!f) throw Error(file.string() + ": cannot open: " + std::strerror(errno));
  std::vector<float> rows;
  const int64_t chunk = std::max<int64_t>(1, (int64_t(1) << 22) / std::max<int64_t>(store_.cols(), 1));
  for (int64_t r = 0; r < store_.rows(); r += chunk) {
    const int64_t n = std::min(chunk, store_.rows() - r);
    rows.resize(size_t(n * store_.cols()));
    if (std::fread(rows.data(), sizeof(float), rows.size(), f) != rows.size()) {
      std::fclose(f);
      throw Error(file.string() + ": cannot read the saved activations");
    }
    store_.write(r, n, rows.data());
  }
  std::fclose(f);
}

void LayerStream::release_pages(int64_t l) const {
  const std::string prefix = "layers." + std::to_string(l) + ".";
  for (const auto& [name, t] : ws_.tensors()) {
    const bool in_layer = name.rfind(prefix, 0) == 0;
    const bool outside = name.rfind("layers.", 0) != 0;
    if (!t.file || !(l < 0 ? outside : in_layer)) continue;
    t.file->file().dont_need(t.file->data_start() + t.info->begin, t.info->nbytes());
  }
}

}  // namespace kiln::calib
