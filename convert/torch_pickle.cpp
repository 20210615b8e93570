#include "convert/torch_pickle.h"

#include <cstring>
#include <map>
#include <memory>
#include <unordered_map>

#include "runtime/core/error.h"

namespace kiln {

namespace {

enum class Kind : uint8_t { None, Bool, Int, Float, Str, Tuple, List, Dict, Global, Storage, Tensor };
enum class Callable : uint8_t { OrderedDict, RebuildTensorV2, RebuildParameter, StorageClass };

struct Obj;
using ObjPtr = std::shared_ptr<Obj>;

struct Obj {
  Kind kind = Kind::None;
  // Set once the object is inside another container. A frozen container is never mutated again, and a container is
  // never added to itself, so the object graph stays acyclic and its depth known (torch.save's pickles fill every
  // container before they use it).
  bool frozen = false;
  int depth = 1;
  int64_t i = 0;                              // Bool, Int
  std::string s;                              // Str
  std::vector<ObjPtr> items;                  // Tuple, List; Dict as key, value, key, value...
  Callable callable = Callable::OrderedDict;  // Global
  DType dtype = DType::F32;                   // Global StorageClass
  size_t storage = 0;                         // Storage
  size_t tensor = 0;                          // Tensor: index into TorchStateDict::tensors (name unset)
};

struct KnownGlobal {
  const char* module;
  const char* name;
  Callable callable;
  DType dtype;
};

// What torch.save emits for a state dict (checked by disassembling its output with pickletools).
constexpr KnownGlobal kKnownGlobals[] = {
    {"collections", "OrderedDict", Callable::OrderedDict, DType::F32},
    {"torch._utils", "_rebuild_tensor_v2", Callable::RebuildTensorV2, DType::F32},
    {"torch._utils", "_rebuild_parameter", Callable::RebuildParameter, DType::F32},
    {"torch", "FloatStorage", Callable::StorageClass, DType::F32},
    {"torch", "HalfStorage", Callable::StorageClass, DType::F16},
    {"torch", "BFloat16Storage", Callable::StorageClass, DType::BF16},
    {"torch", "DoubleStorage", Callable::StorageClass, DType::F64},
    {"torch", "LongStorage", Callable::StorageClass, DType::I64},
    {"torch", "IntStorage", Callable::StorageClass, DType::I32},
    {"torch", "ShortStorage", Callable::StorageClass, DType::I16},
    {"torch", "CharStorage", Callable::StorageClass, DType::I8},
    {"torch", "ByteStorage", Callable::StorageClass, DType::U8},
    {"torch", "BoolStorage", Callable::StorageClass, DType::BOOL},
};

class Unpickler {
 public:
  Unpickler(const uint8_t* data, uint64_t size, const std::string& label) : p_(data), size_(size), label_(label) {}

  TorchStateDict run() {
    if (size_ > kMaxPickleBytes) fail("is " + std::to_string(size_) + " bytes, more than a state dict's pickle needs");
    while (true) {
      if (pos_ >= size_) fail("ends without a STOP opcode; truncated");
      const uint64_t at = pos_;
      const uint8_t op = p_[pos_++];
      if (op == '.') break;
      step(op, at);
    }
    if (stack_.size() != 1 || !marks_.empty())
      fail("leaves " + std::to_string(stack_.size()) + " values on the stack at STOP");
    collect(stack_.back());
    return std::move(out_);
  }

 private:
  [[noreturn]] void fail(const std::string& what) const { throw Error(label_ + ": " + what); }

  const uint8_t* take(uint64_t n) {
    if (n > size_ - pos_) fail("ends inside an opcode argument; truncated");
    const uint8_t* q = p_ + pos_;
    pos_ += n;
    return q;
  }
  uint64_t le(uint64_t n) {
    const uint8_t* q = take(n);
    uint64_t v = 0;
    for (uint64_t k = n; k-- > 0;) v = (v << 8) | q[k];
    return v;
  }
  std::string line() {  // GLOBAL's newline-terminated module and name
    const void* nl = std::memchr(p_ + pos_, '\n', size_t(size_ - pos_));
    if (!nl) fail("has a GLOBAL opcode without its newline-terminated name");
    const uint64_t n = uint64_t(static_cast<const uint8_t*>(nl) - (p_ + pos_));
    std::string s(reinterpret_cast<const char*>(take(n)), n);
    take(1);
    return s;
  }

  ObjPtr make(Kind k) {
    if (++objects_ > kMaxPickleObjects)
      fail("creates more than " + std::to_string(kMaxPickleObjects) + " objects; not a state dict");
    auto o = std::make_shared<Obj>();
    o->kind = k;
    return o;
  }
  ObjPtr make_int(int64_t v) {
    ObjPtr o = make(Kind::Int);
    o->i = v;
    return o;
  }
  ObjPtr pop() {
    if (stack_.size() <= (marks_.empty() ? 0 : marks_.back())) fail("pops an empty stack");
    ObjPtr o = std::move(stack_.back());
    stack_.pop_back();
    return o;
  }
  std::vector<ObjPtr> pop_mark() {
    if (marks_.empty()) fail("uses a MARK that was never set");
    std::vector<ObjPtr> items(stack_.begin() + long(marks_.back()), stack_.end());
    stack_.resize(marks_.back());
    marks_.pop_back();
    return items;
  }
  void push(ObjPtr o) {
    if (stack_.size() >= kMaxPickleObjects) fail("pushes more than " + std::to_string(kMaxPickleObjects) + " values");
    stack_.push_back(std::move(o));
  }
  ObjPtr& top() {
    if (stack_.size() <= (marks_.empty() ? 0 : marks_.back())) fail("reads an empty stack");
    return stack_.back();
  }

  // Makes `child` part of `parent`, keeping the graph acyclic and its depth bounded.
  void adopt(Obj& parent, const ObjPtr& child) {
    if (parent.frozen) fail("modifies a container after using it; not something torch.save writes");
    if (child.get() == &parent) fail("puts a container inside itself");
    child->frozen = true;
    parent.depth = std::max(parent.depth, child->depth + 1);
    if (parent.depth > kMaxPickleDepth) fail("nests containers more than " + std::to_string(kMaxPickleDepth) + " deep");
    parent.items.push_back(child);
  }
  ObjPtr container(Kind k, const std::vector<ObjPtr>& items) {
    ObjPtr o = make(k);
    for (const auto& c : items) adopt(*o, c);
    return o;
  }
  void set_items(const std::vector<ObjPtr>& kv) {
    ObjPtr& d = top();
    if (d->kind != Kind::Dict) fail("sets items on something that is not a dict");
    if (kv.size() % 2) fail("has SETITEMS with an odd number of values");
    for (const auto& c : kv) adopt(*d, c);
  }
  void append_items(const std::vector<ObjPtr>& items) {
    ObjPtr& l = top();
    if (l->kind != Kind::List) fail("appends to something that is not a list");
    for (const auto& c : items) adopt(*l, c);
  }
  void memo_put(uint64_t key) {
    if (memo_.size() >= kMaxPickleObjects && !memo_.count(key)) fail("memoizes too many objects");
    memo_[key] = top();
  }
  void memo_get(uint64_t key) {
    auto it = memo_.find(key);
    if (it == memo_.end()) fail("reads memo entry " + std::to_string(key) + ", which was never stored");
    push(it->second);
  }

  void global(const std::string& module, const std::string& name) {
    for (const auto& g : kKnownGlobals)
      if (module == g.module && name == g.name) {
        ObjPtr o = make(Kind::Global);
        o->callable = g.callable;
        o->dtype = g.dtype;
        push(o);
        return;
      }
    fail("names the global '" + module + "." + name +
         "', which a torch.save state dict never contains; refusing it (nothing was executed)");
  }

  int64_t int_arg(const ObjPtr& o, const char* what) {
    if (o->kind != Kind::Int) fail(std::string(what) + " is not an integer");
    return o->i;
  }
  std::vector<int64_t> int_tuple(const ObjPtr& o, const char* what) {
    if (o->kind != Kind::Tuple) fail(std::string(what) + " is not a tuple");
    std::vector<int64_t> v;
    for (const auto& e : o->items) {
      const int64_t x = int_arg(e, what);
      if (x < 0 || x > (int64_t(1) << 48)) fail(std::string(what) + " holds " + std::to_string(x) + ", out of range");
      v.push_back(x);
    }
    return v;
  }
  bool empty_hooks(const ObjPtr& o) { return o->kind == Kind::Dict && o->items.empty(); }

  ObjPtr reduce(const ObjPtr& fn, const ObjPtr& args) {
    if (fn->kind != Kind::Global) fail("calls something that is not a known global");
    if (args->kind != Kind::Tuple) fail("calls a global with arguments that are not a tuple");
    const auto& a = args->items;
    switch (fn->callable) {
      case Callable::OrderedDict:
        if (!a.empty()) fail("builds an OrderedDict from arguments; torch.save passes none");
        return make(Kind::Dict);
      case Callable::RebuildTensorV2: {
        // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
        if (a.size() != 6 && a.size() != 7)
          fail("calls _rebuild_tensor_v2 with " + std::to_string(a.size()) + " arguments");
        if (a[0]->kind != Kind::Storage) fail("calls _rebuild_tensor_v2 on something that is not a storage");
        if (a[4]->kind != Kind::Bool) fail("calls _rebuild_tensor_v2 with a requires_grad that is not a bool");
        if (!empty_hooks(a[5])) fail("calls _rebuild_tensor_v2 with backward hooks; a state dict has none");
        TorchTensorRef t;
        t.storage = a[0]->storage;
        const int64_t off = int_arg(a[1], "a tensor's storage_offset");
        if (off < 0) fail("has a tensor with a negative storage_offset");
        t.offset = uint64_t(off);
        t.shape = int_tuple(a[2], "a tensor's size");
        t.stride = int_tuple(a[3], "a tensor's stride");
        if (t.shape.size() != t.stride.size()) fail("has a tensor whose size and stride differ in length");
        ObjPtr o = make(Kind::Tensor);
        o->tensor = out_.tensors.size();
        out_.tensors.push_back(std::move(t));
        return o;
      }
      case Callable::RebuildParameter:
        // (data, requires_grad, backward_hooks): an nn.Parameter is its tensor.
        if (a.size() != 3 || a[0]->kind != Kind::Tensor || a[1]->kind != Kind::Bool || !empty_hooks(a[2]))
          fail("calls _rebuild_parameter with arguments other than (tensor, bool, no hooks)");
        return a[0];
      case Callable::StorageClass:
        fail("calls a storage class; torch.save names storages only in persistent ids");
    }
    fail("calls an unknown global");
  }

  // ('storage', StorageClass, key, location, numel)
  ObjPtr persistent_load(const ObjPtr& pid) {
    const auto& a = pid->items;
    if (pid->kind != Kind::Tuple || a.size() != 5 || a[0]->kind != Kind::Str || a[0]->s != "storage")
      fail("has a persistent id that is not a ('storage', ...) tuple");
    if (a[1]->kind != Kind::Global || a[1]->callable != Callable::StorageClass)
      fail("has a persistent id whose storage type is not a storage class");
    if (a[2]->kind != Kind::Str || a[3]->kind != Kind::Str)
      fail("has a persistent id whose key or location is not a string");
    const int64_t numel = int_arg(a[4], "a storage's element count");
    if (numel < 0) fail("has storage '" + a[2]->s + "' with a negative element count");
    auto [it, inserted] = storage_index_.emplace(a[2]->s, out_.storages.size());
    if (inserted) {
      out_.storages.push_back({a[2]->s, a[1]->dtype, uint64_t(numel)});
    } else {
      const TorchStorageRef& s = out_.storages[it->second];
      if (s.dtype != a[1]->dtype || s.numel != uint64_t(numel))
        fail("describes storage '" + s.key + "' twice, differently");
    }
    ObjPtr o = make(Kind::Storage);
    o->storage = it->second;
    return o;
  }

  void step(uint8_t op, uint64_t at) {
    switch (op) {
      case 0x80:
        take(1);
        return;  // PROTO
      case 0x95:
        take(8);
        return;  // FRAME: a hint for buffered readers
      case '(':  // MARK
        if (marks_.size() >= size_t(kMaxPickleDepth))
          fail("nests MARKs more than " + std::to_string(kMaxPickleDepth) + " deep");
        marks_.push_back(stack_.size());
        return;
      case ')':
        push(make(Kind::Tuple));
        return;
      case 't':
        push(container(Kind::Tuple, pop_mark()));
        return;
      case 0x85:
      case 0x86:
      case 0x87: {  // TUPLE1..3
        std::vector<ObjPtr> items(size_t(op - 0x84));
        for (size_t k = items.size(); k-- > 0;) items[k] = pop();
        push(container(Kind::Tuple, items));
        return;
      }
      case ']':
        push(make(Kind::List));
        return;
      case 'l':
        push(container(Kind::List, pop_mark()));
        return;
      case 'a': {
        ObjPtr v = pop();
        append_items({v});
        return;
      }
      case 'e':
        append_items(pop_mark());
        return;
      case '}':
        push(make(Kind::Dict));
        return;
      case 'd': {
        std::vector<ObjPtr> kv = pop_mark();
        push(make(Kind::Dict));
        set_items(kv);
        return;
      }
      case 's': {
        ObjPtr v = pop(), k = pop();
        set_items({k, v});
        return;
      }
      case 'u':
        set_items(pop_mark());
        return;
      case 'N':
        push(make(Kind::None));
        return;
      case 0x88:
      case 0x89: {
        ObjPtr o = make(Kind::Bool);
        o->i = op == 0x88;
        push(o);
        return;
      }
      case 'J':
        push(make_int(int32_t(uint32_t(le(4)))));
        return;
      case 'K':
        push(make_int(int64_t(le(1))));
        return;
      case 'M':
        push(make_int(int64_t(le(2))));
        return;
      case 0x8a: {  // LONG1: little-endian two's complement of n bytes
        const uint64_t n = le(1);
        if (n > 8) fail("has an integer wider than 64 bits");
        uint64_t v = n ? le(n) : 0;
        if (n && n < 8 && (v >> (8 * n - 1)) & 1) v |= ~uint64_t(0) << (8 * n);
        push(make_int(int64_t(v)));
        return;
      }
      case 'G': {  // BINFLOAT, big-endian
        const uint8_t* q = take(8);
        uint64_t bits = 0;
        for (int k = 0; k < 8; ++k) bits = (bits << 8) | q[k];
        ObjPtr o = make(Kind::Float);
        std::memcpy(&o->i, &bits, 8);
        push(o);
        return;
      }
      case 'X':
      case 0x8c: {  // BINUNICODE, SHORT_BINUNICODE
        const uint64_t n = le(op == 'X' ? 4 : 1);
        ObjPtr o = make(Kind::Str);
        o->s.assign(reinterpret_cast<const char*>(take(n)), n);
        push(o);
        return;
      }
      case 'c': {  // GLOBAL
        const std::string module = line(), name = line();
        global(module, name);
        return;
      }
      case 0x93: {  // STACK_GLOBAL
        ObjPtr name = pop(), module = pop();
        if (name->kind != Kind::Str || module->kind != Kind::Str)
          fail("has a STACK_GLOBAL whose names are not strings");
        global(module->s, name->s);
        return;
      }
      case 'q':
        memo_put(le(1));
        return;
      case 'r':
        memo_put(le(4));
        return;
      case 0x94:
        memo_put(memo_.size());
        return;  // MEMOIZE
      case 'h':
        memo_get(le(1));
        return;
      case 'j':
        memo_get(le(4));
        return;
      case 'Q': {
        ObjPtr pid = pop();
        push(persistent_load(pid));
        return;
      }
      case 'R': {
        ObjPtr args = pop(), fn = pop();
        args->frozen = true;
        push(reduce(fn, args));
        return;
      }
      case 'b': {  // BUILD: only the OrderedDict of a state dict, whose state holds its _metadata
        ObjPtr state = pop();
        if (top()->kind != Kind::Dict || (state->kind != Kind::Dict && state->kind != Kind::None))
          fail("sets object state other than a state dict's _metadata");
        return;
      }
      default: {
        char hex[8];
        std::snprintf(hex, sizeof hex, "0x%02x", op);
        fail(std::string("has pickle opcode ") + hex + " at offset " + std::to_string(at) +
             ", which a torch.save state dict does not use");
      }
    }
  }

  void collect(const ObjPtr& root) {
    if (root->kind != Kind::Dict) fail("does not hold a dict of tensors at its top level");
    std::vector<TorchTensorRef> ordered;
    std::map<std::string, bool> seen;
    for (size_t k = 0; k < root->items.size(); k += 2) {
      const Obj& key = *root->items[k];
      const Obj& value = *root->items[k + 1];
      if (key.kind != Kind::Str) fail("has a top-level key that is not a string");
      if (value.kind != Kind::Tensor) fail("entry '" + key.s + "' is not a tensor; kiln reads state dicts of tensors");
      if (!seen.emplace(key.s, true).second) fail("names tensor '" + key.s + "' twice");
      TorchTensorRef t = out_.tensors[value.tensor];
      t.name = key.s;
      ordered.push_back(std::move(t));
    }
    out_.tensors = std::move(ordered);
  }

  const uint8_t* p_;
  uint64_t size_;
  uint64_t pos_ = 0;
  const std::string& label_;
  std::vector<ObjPtr> stack_;
  std::vector<size_t> marks_;
  std::unordered_map<uint64_t, ObjPtr> memo_;
  std::map<std::string, size_t> storage_index_;
  uint64_t objects_ = 0;
  TorchStateDict out_;
};

}  // namespace

TorchStateDict parse_torch_pickle(const uint8_t* data, uint64_t size, const std::string& label) {
  return Unpickler(data, size, label).run();
}

}  // namespace kiln
