#include "calib/layer_stream.h"

#include <fcntl.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "runtime/core/error.h"
#include "runtime/io/interrupt.h"
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
// Calibration blocks are windows of plain text run as causal sequences at positions 0..L-1. A prefix LM
// (ChatGLM-6B) defines its positions and attention only from a [gMASK] ... <sop> prompt, so its statistics would
// describe inputs the model never sees: refused before anything is allocated.
ModelGraph calibration_graph(const ModelSpec& s) {
  if (s.prefix_lm())
    throw Error(s.architecture +
                " is a prefix LM (2D positions and bidirectional attention from its [gMASK] <sop> prompt): "
                "calibration, AWQ and static INT8 KV scales are not supported for it; use --method rtn and "
                "--kv-cache int8 (online scales)");
  return build_model_graph(s);
}
}  // namespace

LayerStream::LayerStream(const Workspace& ws, Backend& backend, const Blocks& blocks, const LayerStreamOptions& o)
    : ws_(ws),
      be_(backend),
      spec_(ws.spec()),
      graph_(calibration_graph(spec_)),
      seqlen_(blocks.seqlen),
      per_batch_(std::clamp<int64_t>(o.batch_tokens / std::max<int64_t>(blocks.seqlen, 1), 1,
                                     std::max<int64_t>(blocks.count(), 1))),
      count_(blocks.count()),
      store_(blocks.count() * blocks.seqlen, spec_.hidden_size, o.max_memory ? o.max_memory : default_max_memory(),
             o.spill_path),
      scratch_(backend) {
  const int64_t bs = 16;
  KvCacheConfig kc;
  kc.num_layers = 1;  // one layer at a time: every block's attention writes cache layer 0
  kc.num_kv_heads = spec_.num_kv_heads;
  kc.head_dim = spec_.head_dim;
  kc.block_size = bs;
  kc.num_blocks = int32_t(per_batch_ * ((seqlen_ + bs - 1) / bs));
  kc.dtype = KvDType::F32;
  cache_ = std::make_unique<KvCache>(be_, kc);

  const int64_t H = spec_.hidden_size;
  Embedding embedding;
  embedding.load(WorkspaceSource(ws_), be_, graph_.embedding);
  release_pages(-1);
  std::vector<int32_t> positions;
  for (const Batch& b : batches()) {
    check_interrupt();
    const int64_t N = b.count * seqlen_;
    ForwardContext ctx(be_, spec_, scratch_);
    ctx.rows = N;
    positions.resize(size_t(N));
    for (int64_t r = 0; r < N; ++r) positions[size_t(r)] = int32_t(r % seqlen_);
    ctx.ids = std::span<const int32_t>(blocks.tokens.data() + b.first * seqlen_, size_t(N));
    ctx.positions = positions;
    Buffer& x = scratch_.get(Scratch::Residual, N * H);
    embedding.forward(ctx, x.f32());
    host_.resize(size_t(N * H));
    be_.download(x, 0, host_.data(), host_.size() * sizeof(float));
    store_.write(b.first * seqlen_, N, host_.data());
  }
}

LayerStream::~LayerStream() = default;

std::vector<LayerStream::Batch> LayerStream::batches() const {
  std::vector<Batch> out;
  for (int64_t first = 0; first < count_; first += per_batch_)
    out.push_back({first, std::min(per_batch_, count_ - first)});
  return out;
}

void LayerStream::run_layer(int64_t l, const TensorSource& src, ForwardObserver* observer, bool advance) {
  if (l < 0 || l >= num_layers()) throw Error("layer stream: no layer " + std::to_string(l));
  BlockGraph g = graph_.blocks[size_t(l)];
  g.attn.cache_layer = 0;
  DecoderBlock block;
  block.load(src, be_, g);
  const int64_t H = spec_.hidden_size, L = seqlen_;
  std::vector<int32_t> positions, seq_of_row;
  std::vector<int64_t> slots;
  std::vector<AttentionSequence> spans;
  for (const Batch& b : batches()) {
    check_interrupt();
    const int64_t N = b.count * L;
    // Every calibration block is a fresh sequence at positions 0..L-1, as in calib::run_calibration's batches.
    std::vector<KvSequence> seqs(static_cast<size_t>(b.count));
    positions.clear();
    seq_of_row.clear();
    slots.clear();
    spans.clear();
    ForwardContext ctx(be_, spec_, scratch_);
    for (int64_t i = 0; i < b.count; ++i) {
      cache_->reserve(seqs[size_t(i)], L);
      for (int64_t p = 0; p < L; ++p) {
        positions.push_back(int32_t(p));
        seq_of_row.push_back(int32_t(i));
        slots.push_back(cache_->slot(seqs[size_t(i)], p));
      }
      ctx.seq_lengths.push_back(L);
    }
    for (int64_t i = 0; i < b.count; ++i)
      spans.push_back({i * L, L, L, std::span<const int32_t>(seqs[size_t(i)].blocks)});
    ctx.cache = cache_.get();
    ctx.rows = N;
    ctx.positions = positions;
    ctx.seq_of_row = seq_of_row;
    ctx.slots = slots;
    ctx.seqs = spans;
    ctx.observer = observer;
    Buffer& x = scratch_.get(Scratch::Residual, N * H);
    Buffer& h = scratch_.get(Scratch::Normed, N * H);
    Buffer& y = scratch_.get(Scratch::LayerOut, N * H);
    host_.resize(size_t(N * H));
    store_.read(b.first * L, N, host_.data());
    be_.upload(x, 0, host_.data(), host_.size() * sizeof(float));
    block.attn_norm().forward(be_, x.f32(), h.f32(), N);
    block.forward(ctx, x.f32(), h, y.f32(), nullptr);
    for (KvSequence& s : seqs) cache_->release(s);
    if (!advance) continue;
    be_.download(x, 0, host_.data(), host_.size() * sizeof(float));
    store_.write(b.first * L, N, host_.data());
  }
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
