#pragma once
// What Python's torch.save writes for a dict of tensors (a state dict), read and written: a zip archive (PyTorch 1.6
// and later) holding data.pkl, a pickle of protocol 2 (PyTorch 1.x and 2.x both write it), and one record per
// storage. LibTorch's own torch::pickle_load turns the collections.OrderedDict a state_dict() is into None (its
// unpickler only expects one as a tensor's empty backward hooks), so it cannot read
// `torch.save(model.state_dict(), path)`; and torch::pickle_save tags the dict with torch.jit._pickle.restore_type_tag,
// which PyTorch 2.6's torch.load refuses by default (weights_only=True). So both directions are written here, from the
// pickle format (Python's pickletools): the reader knows containers, numbers, strings, the memo, the globals a tensor
// needs and LibTorch's type tag (anything else is an error naming it); the writer emits exactly what torch.save does
// for a state dict, whose globals torch.load's weights_only mode allows.
#include <torch/types.h>

#include <bit>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <variant>
#include <vector>

#include "zip_reader.hpp"

namespace accelerated::detail::pickle {

struct Value;
using Sequence = std::vector<Value>;                     // a tuple or a list
using Items = std::vector<std::pair<Value, Value>>;      // a dict, in insertion order
struct Global {                                          // a class or function named by the pickle
  std::string module, name;
};
struct Storage {                                         // a persistent id: ('storage', type, key, location, numel)
  torch::ScalarType dtype;
  std::string key;
};
struct Mark {};

struct Value {
  std::variant<std::monostate, bool, std::int64_t, double, std::string, std::shared_ptr<Sequence>,
               std::shared_ptr<Items>, torch::Tensor, Global, Storage, Mark>
      v;
  template <class T>
  const T* get() const {
    return std::get_if<T>(&v);
  }
};

// The dtype of a legacy storage class name (torch.FloatStorage, ...), which torch.save writes in 1.x and 2.x.
inline torch::ScalarType storage_dtype(const std::string& name, const std::string& where) {
  static const std::map<std::string, torch::ScalarType> types{
      {"FloatStorage", torch::kFloat},   {"DoubleStorage", torch::kDouble}, {"HalfStorage", torch::kHalf},
      {"BFloat16Storage", torch::kBFloat16}, {"LongStorage", torch::kLong}, {"IntStorage", torch::kInt},
      {"ShortStorage", torch::kShort},   {"CharStorage", torch::kChar},     {"ByteStorage", torch::kByte},
      {"BoolStorage", torch::kBool}};
  const auto found = types.find(name);
  if (found == types.end()) {
    throw std::runtime_error(where + " holds a storage of type torch." + name + ", which is not supported");
  }
  return found->second;
}

// Reads data.pkl. A damaged or hostile pickle is an exception naming the file and what was wrong, never a crash: the
// stack is checked before every take, tensors' sizes and strides against their storage (with overflow checks), copies
// of memoized strings against a budget in proportion to the pickle's size, and everything read is destroyed without
// recursion (a value nested a million deep, or a list appended to itself, is let go one container at a time).
// The value run() returns lives as long as the reader.
class Reader {
 public:
  // `archive` is the file's zip layer; errors name `caller` (the public function) and the file.
  Reader(const ZipReader& archive, std::string caller) : archive_(archive), caller_(std::move(caller)) {}
  ~Reader() { release(); }
  Reader(const Reader&) = delete;
  Reader& operator=(const Reader&) = delete;

  const Value& run(const std::string& bytes) {
    data_ = &bytes;
    pos_ = 0;
    budget_ = (std::size_t{64} << 20) + 16 * bytes.size();
    while (true) {
      const auto op = static_cast<std::uint8_t>(byte());
      switch (op) {
        case 0x80: byte(); break;                                   // PROTO
        case 0x95: take(8); break;                                  // FRAME (protocol 4)
        case '.':                                                   // STOP
          result_ = pop();
          return result_;
        case '(': stack_.push_back({Mark{}}); break;                // MARK
        case 'N': stack_.push_back({}); break;                      // NONE
        case 0x88: stack_.push_back({true}); break;                 // NEWTRUE
        case 0x89: stack_.push_back({false}); break;                // NEWFALSE
        case 'K': stack_.push_back({std::int64_t{static_cast<std::uint8_t>(byte())}}); break;  // BININT1
        case 'M': stack_.push_back({static_cast<std::int64_t>(little<std::uint16_t>())}); break;  // BININT2
        case 'J': stack_.push_back({static_cast<std::int64_t>(little<std::int32_t>())}); break;   // BININT
        case 0x8a: stack_.push_back({long1()}); break;              // LONG1
        case 'G': stack_.push_back({big_double()}); break;          // BINFLOAT
        case 'X': stack_.push_back({take(little<std::uint32_t>())}); break;                     // BINUNICODE
        case 0x8c: stack_.push_back({take(static_cast<std::uint8_t>(byte()))}); break;          // SHORT_BINUNICODE
        case 0x8d: stack_.push_back({take(little<std::uint64_t>())}); break;                    // BINUNICODE8
        case 'c': {                                                 // GLOBAL
          auto module = line();
          stack_.push_back({Global{std::move(module), line()}});
          break;
        }
        case 0x93: {                                                // STACK_GLOBAL
          auto name = string_of(pop());
          stack_.push_back({Global{string_of(pop()), std::move(name)}});
          break;
        }
        case ')': stack_.push_back({std::make_shared<Sequence>()}); break;   // EMPTY_TUPLE
        case ']': stack_.push_back({std::make_shared<Sequence>()}); break;   // EMPTY_LIST
        case '}': stack_.push_back({std::make_shared<Items>()}); break;      // EMPTY_DICT
        case 't': case 'l': stack_.push_back({std::make_shared<Sequence>(since_mark())}); break;  // TUPLE, LIST
        case 0x85: case 0x86: case 0x87: {                          // TUPLE1..3
          const auto n = static_cast<std::size_t>(op - 0x84);
          if (stack_.size() < n) fail("TUPLE" + std::to_string(n) + " at byte " + std::to_string(pos_ - 1) + " with " +
                                      std::to_string(stack_.size()) + " items on the stack (a damaged file)");
          Sequence items(stack_.end() - static_cast<std::ptrdiff_t>(n), stack_.end());
          for (const auto& item : items) {
            if (item.get<Mark>()) fail("TUPLE" + std::to_string(n) + " over a MARK (a damaged file)");
          }
          stack_.resize(stack_.size() - n);
          stack_.push_back({std::make_shared<Sequence>(std::move(items))});
          break;
        }
        case 'a': {                                                 // APPEND
          auto item = pop();
          sequence_of(top()).push_back(std::move(item));
          break;
        }
        case 'e': {                                                 // APPENDS
          auto items = since_mark();
          auto& list = sequence_of(top());
          list.insert(list.end(), items.begin(), items.end());
          break;
        }
        case 'd': {                                                 // DICT
          auto items = since_mark();
          auto dict = std::make_shared<Items>();
          for (std::size_t i = 0; i + 1 < items.size(); i += 2) dict->emplace_back(items[i], items[i + 1]);
          stack_.push_back({dict});
          break;
        }
        case 's': {                                                 // SETITEM
          auto value = pop();
          auto key = pop();
          items_of(top()).emplace_back(std::move(key), std::move(value));
          break;
        }
        case 'u': {                                                 // SETITEMS
          auto items = since_mark();
          auto& dict = items_of(top());
          for (std::size_t i = 0; i + 1 < items.size(); i += 2) dict.emplace_back(items[i], items[i + 1]);
          break;
        }
        case 'q': memo_[static_cast<std::uint8_t>(byte())] = charged_copy(top()); break;   // BINPUT
        case 'r': memo_[little<std::uint32_t>()] = charged_copy(top()); break;             // LONG_BINPUT
        case 0x94: memo_[memo_.size()] = charged_copy(top()); break;                       // MEMOIZE
        case 'h': stack_.push_back(memo(static_cast<std::uint8_t>(byte()))); break;  // BINGET
        case 'j': stack_.push_back(memo(little<std::uint32_t>())); break;             // LONG_BINGET
        case 'Q': stack_.push_back(persistent(pop())); break;       // BINPERSID
        case 'R': {                                                 // REDUCE
          auto args = pop();
          auto callable = pop();
          stack_.push_back(reduce(callable, args));
          break;
        }
        case 'b': {                                                 // BUILD: an OrderedDict's _metadata; dropped
          pop();
          if (!top().get<std::shared_ptr<Items>>()) fail("BUILD on an object that is not a dict");
          break;
        }
        default:
          fail("pickle opcode 0x" + hex(op) + " at byte " + std::to_string(pos_ - 1) +
               ", which torch.save of tensors, containers, numbers and strings does not use");
      }
    }
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    throw std::runtime_error(where() + ": " + what);
  }
  std::string where() const { return "accelerated::" + caller_ + ": '" + archive_.file() + "'"; }
  static std::string hex(std::uint8_t op) {
    const char* digits = "0123456789abcdef";
    return {digits[op >> 4], digits[op & 15]};
  }
  char byte() {
    if (pos_ >= data_->size()) fail("data.pkl ends early (a truncated or damaged file)");
    return (*data_)[pos_++];
  }
  std::string take(std::uint64_t n) {
    if (n > data_->size() - pos_) fail("data.pkl ends early (a truncated or damaged file)");
    auto out = data_->substr(pos_, n);
    pos_ += n;
    return out;
  }
  // Pickle's integers are little-endian and its floats big-endian, whatever the machine.
  template <class T>
  T little() {
    const auto bytes = take(sizeof(T));
    std::uint64_t value = 0;
    for (std::size_t i = 0; i < sizeof(T); ++i) value |= std::uint64_t{static_cast<std::uint8_t>(bytes[i])} << (8 * i);
    return static_cast<T>(value);
  }
  double big_double() {
    const auto bytes = take(8);
    std::uint64_t value = 0;
    for (std::size_t i = 0; i < 8; ++i) value = (value << 8) | static_cast<std::uint8_t>(bytes[i]);
    return std::bit_cast<double>(value);
  }
  std::int64_t long1() {
    const auto n = static_cast<std::uint8_t>(byte());
    if (n > 8) fail("an integer of " + std::to_string(n) + " bytes");
    const auto bytes = take(n);
    std::uint64_t value = 0;
    for (std::size_t i = 0; i < n; ++i) value |= std::uint64_t{static_cast<std::uint8_t>(bytes[i])} << (8 * i);
    if (n > 0 && n < 8 && (static_cast<std::uint8_t>(bytes[n - 1]) & 0x80)) value |= ~std::uint64_t{0} << (8 * n);
    return static_cast<std::int64_t>(value);
  }
  std::string line() {
    const auto end = data_->find('\n', pos_);
    if (end == std::string::npos) fail("data.pkl ends early (a truncated or damaged file)");
    auto out = data_->substr(pos_, end - pos_);
    pos_ = end + 1;
    return out;
  }
  Value pop() {
    if (stack_.empty()) fail("the pickle's stack is empty (a damaged file)");
    auto value = std::move(stack_.back());
    stack_.pop_back();
    return value;
  }
  Value& top() {
    if (stack_.empty()) fail("the pickle's stack is empty (a damaged file)");
    return stack_.back();
  }
  Sequence since_mark() {
    auto it = stack_.end();
    while (it != stack_.begin() && !(it - 1)->get<Mark>()) --it;
    if (it == stack_.begin()) fail("no MARK on the pickle's stack (a damaged file)");
    Sequence items(it, stack_.end());
    stack_.erase(it - 1, stack_.end());
    return items;
  }
  Value memo(std::size_t key) {
    const auto found = memo_.find(key);
    if (found == memo_.end()) fail("memo entry " + std::to_string(key) + " is read before it is written");
    return charged_copy(found->second);
  }
  // A container is shared by its copies; a string is copied, and copies (to and from the memo) count against the
  // budget, so a few bytes of pickle cannot ask for gigabytes.
  Value charged_copy(const Value& v) {
    if (const auto* s = v.get<std::string>()) {
      if (s->size() > budget_) {
        fail("copies of memoized strings would take more than 16 times the pickle's size plus 64 MB (a hostile "
             "file?)");
      }
      budget_ -= s->size();
    }
    return v;
  }

  // Every container reachable from the stack, the memo and the result, emptied one at a time (each is kept alive
  // here while the others are emptied), then let go: no recursion however deep the nesting, and cycles are broken.
  void release() noexcept {
    std::vector<std::shared_ptr<Sequence>> sequences;
    std::vector<std::shared_ptr<Items>> dicts;
    std::unordered_set<const void*> seen;
    std::vector<const Value*> pending;
    for (const auto& v : stack_) pending.push_back(&v);
    for (const auto& [key, v] : memo_) pending.push_back(&v);
    pending.push_back(&result_);
    while (!pending.empty()) {
      const Value* v = pending.back();
      pending.pop_back();
      if (const auto* s = v->get<std::shared_ptr<Sequence>>(); s && *s && seen.insert(s->get()).second) {
        sequences.push_back(*s);
        for (const auto& item : **s) pending.push_back(&item);
      } else if (const auto* d = v->get<std::shared_ptr<Items>>(); d && *d && seen.insert(d->get()).second) {
        dicts.push_back(*d);
        for (const auto& [key, item] : **d) {
          pending.push_back(&key);
          pending.push_back(&item);
        }
      }
    }
    for (auto& s : sequences) s->clear();  // their items' containers are held in these vectors: no recursion
    for (auto& d : dicts) d->clear();
    stack_.clear();
    memo_.clear();
    result_ = {};
  }
  Sequence& sequence_of(Value& v) {
    const auto* s = v.get<std::shared_ptr<Sequence>>();
    if (!s) fail("an append to something that is not a list");
    return **s;
  }
  Items& items_of(Value& v) {
    const auto* d = v.get<std::shared_ptr<Items>>();
    if (!d) fail("a dict item set on something that is not a dict");
    return **d;
  }
  std::string string_of(const Value& v) const {
    const auto* s = v.get<std::string>();
    if (!s) fail("a string was expected");
    return *s;
  }
  std::int64_t int_of(const Value& v) const {
    if (const auto* i = v.get<std::int64_t>()) return *i;
    if (const auto* b = v.get<bool>()) return *b;
    fail("an integer was expected");
  }
  const Sequence& tuple_of(const Value& v) const {
    const auto* s = v.get<std::shared_ptr<Sequence>>();
    if (!s) fail("a tuple was expected");
    return **s;
  }
  std::vector<std::int64_t> ints_of(const Value& v) const {
    std::vector<std::int64_t> out;
    for (const auto& item : tuple_of(v)) out.push_back(int_of(item));
    return out;
  }

  Value persistent(const Value& id) {
    const auto& t = tuple_of(id);
    if (t.size() < 5 || !t[0].get<std::string>() || *t[0].get<std::string>() != "storage" || !t[1].get<Global>()) {
      fail("a persistent id that is not a storage");
    }
    return {Storage{storage_dtype(t[1].get<Global>()->name, where()), string_of(t[2])}};
  }

  // A storage's bytes, read once per key (tensors may share one) straight into the tensor: the zip layer has checked
  // that the record lies inside the file, so the allocation is never more than the file's size.
  torch::Tensor storage(const Storage& s) {
    auto& cached = storages_[s.key];
    if (!cached.defined()) {
      const auto record = "data/" + s.key;
      if (!archive_.has(record)) fail("no record '" + record + "' for a tensor's storage (a damaged file)");
      const auto size = archive_.size_of(record);
      const auto element = static_cast<std::uint64_t>(c10::elementSize(s.dtype));
      if (size % element != 0) {
        fail("record '" + record + "' holds " + std::to_string(size) + " bytes, not a whole number of " +
             c10::toString(s.dtype) + " elements (a damaged file)");
      }
      cached = torch::empty({static_cast<std::int64_t>(size / element)}, torch::TensorOptions().dtype(s.dtype));
      archive_.read(record, cached.data_ptr());
    }
    return cached;
  }

  Value reduce(const Value& callable, const Value& args) {
    const auto* global = callable.get<Global>();
    if (!global) fail("a call of something that is not a named class or function");
    const auto& a = tuple_of(args);
    const auto name = global->module + "." + global->name;
    if (name == "collections.OrderedDict" || name == "builtins.dict") return {std::make_shared<Items>()};
    if (name == "torch._utils._rebuild_tensor_v2" || name == "torch._utils._rebuild_tensor") {
      if (a.size() < 4 || !a[0].get<Storage>()) fail(name + " with unexpected arguments");
      const auto data = storage(*a[0].get<Storage>());
      const auto offset = int_of(a[1]);
      const auto size = ints_of(a[2]);
      const auto stride = ints_of(a[3]);
      return {data.as_strided(size, stride, offset_within(data.numel(), offset, size, stride))};
    }
    if (name == "torch.jit._pickle.restore_type_tag") {  // LibTorch's pickle_save tags typed containers
      if (a.empty()) fail(name + " with unexpected arguments");
      return a[0];
    }
    if (name == "torch._utils._rebuild_parameter") {
      if (a.empty() || !a[0].get<torch::Tensor>()) fail(name + " with unexpected arguments");
      return a[0];
    }
    fail("an object of type " + name + ", which this reader does not build (only tensors, containers, numbers and strings)");
  }

  // A view's offset, sizes and strides checked against its storage: as many strides as sizes, none negative, and
  // the last element it reaches (computed without overflow) inside the storage.
  std::int64_t offset_within(std::int64_t numel, std::int64_t offset, const std::vector<std::int64_t>& size,
                             const std::vector<std::int64_t>& stride) const {
    if (size.size() != stride.size()) {
      fail("a tensor with " + std::to_string(size.size()) + " sizes and " + std::to_string(stride.size()) +
           " strides (a damaged file)");
    }
    if (offset < 0) fail("a tensor with storage offset " + std::to_string(offset) + " (a damaged file)");
    std::int64_t last = offset;
    bool empty = false;
    for (std::size_t d = 0; d < size.size(); ++d) {
      if (size[d] < 0 || stride[d] < 0) {
        fail("a tensor with size " + std::to_string(size[d]) + " and stride " + std::to_string(stride[d]) +
             " in dimension " + std::to_string(d) + " (a damaged file)");
      }
      if (size[d] == 0) empty = true;
      std::int64_t reach = 0;
      if (size[d] > 0 && (__builtin_mul_overflow(size[d] - 1, stride[d], &reach) ||
                          __builtin_add_overflow(last, reach, &last))) {
        fail("a tensor whose sizes and strides overflow (a damaged file)");
      }
    }
    if (!empty && last >= numel) fail("a tensor reaches past its storage (a damaged file)");
    // Nor more elements than its storage holds: a view with a stride of 0 (a few bytes of storage shown as billions
    // of elements) would be expanded by the first copy made of it. torch.save of a state dict never writes one.
    std::int64_t elements = 1;
    for (const auto s : size) {
      if (__builtin_mul_overflow(elements, s, &elements) || elements > numel) {
        fail("a tensor of more elements than its storage of " + std::to_string(numel) +
             " holds (a view with repeated elements, or a damaged file)");
      }
    }
    return offset;
  }

  const ZipReader& archive_;
  std::string caller_;
  const std::string* data_ = nullptr;
  std::size_t pos_ = 0;
  std::size_t budget_ = 0;  // bytes memoized strings may still be copied into
  std::vector<Value> stack_;
  std::unordered_map<std::size_t, Value> memo_;
  Value result_;
  std::map<std::string, torch::Tensor> storages_;
};

// The legacy storage class of a dtype, as torch.save names it.
inline const char* storage_class(torch::ScalarType dtype) {
  switch (dtype) {
    case torch::kFloat: return "FloatStorage";
    case torch::kDouble: return "DoubleStorage";
    case torch::kHalf: return "HalfStorage";
    case torch::kBFloat16: return "BFloat16Storage";
    case torch::kLong: return "LongStorage";
    case torch::kInt: return "IntStorage";
    case torch::kShort: return "ShortStorage";
    case torch::kChar: return "CharStorage";
    case torch::kByte: return "ByteStorage";
    case torch::kBool: return "BoolStorage";
    default:
      throw std::invalid_argument(std::string("accelerated::save_state_dict: a tensor of dtype ") +
                                  c10::toString(dtype) + " has no torch.save storage type");
  }
}

// Writes data.pkl as torch.save does (protocol 2): containers, numbers, strings and tensors, each tensor rebuilt by
// torch._utils._rebuild_tensor_v2 from a storage record data/<i> (the i-th tensor handed to tensor(), contiguous, on
// the CPU). Only globals that torch.load's weights_only mode allows are named.
class Writer {
 public:
  Writer() : out_("\x80\x02") {}
  void none() { out_ += 'N'; }
  void boolean(bool value) { out_ += value ? '\x88' : '\x89'; }  // NEWTRUE, NEWFALSE
  void integer(std::int64_t value) {
    if (value >= INT32_MIN && value <= INT32_MAX) {
      out_ += 'J';  // BININT
      little(static_cast<std::uint64_t>(value), 4);
    } else {
      out_ += "\x8a\x08";  // LONG1, 8 bytes
      little(static_cast<std::uint64_t>(value), 8);
    }
  }
  void text(const std::string& value) {
    out_ += 'X';  // BINUNICODE
    little(value.size(), 4);
    out_ += value;
  }
  // The tensor's storage is record data/<index>, index = the number of tensors written before it.
  void tensor(const torch::Tensor& t, std::size_t index) {
    global("torch._utils", "_rebuild_tensor_v2");
    out_ += "((";  // the arguments' tuple, then the persistent id's
    text("storage");
    global("torch", storage_class(t.scalar_type()));
    text(std::to_string(index));
    text("cpu");
    integer(t.numel());
    out_ += "tQ";  // TUPLE BINPERSID
    integer(0);    // storage offset
    out_ += '(';
    for (const auto size : t.sizes()) integer(size);
    out_ += "t(";
    std::int64_t stride = 1;
    std::vector<std::int64_t> strides(static_cast<std::size_t>(t.dim()));
    for (auto d = t.dim() - 1; d >= 0; --d) {
      strides[static_cast<std::size_t>(d)] = stride;
      stride *= t.size(d);
    }
    for (const auto s : strides) integer(s);
    out_ += "t\x89";  // TUPLE, requires_grad = False
    ordered_dict();    // backward hooks
    out_ += "tR";      // TUPLE REDUCE
  }
  // Containers: begin_*, the items (a dict's as key, value, key, value...), end_*.
  void begin_dict() { out_ += "}("; }          // EMPTY_DICT MARK
  void end_dict() { out_ += 'u'; }             // SETITEMS
  void begin_ordered_dict() {
    ordered_dict();
    out_ += '(';
  }
  void begin_list() { out_ += "]("; }          // EMPTY_LIST MARK
  void end_list() { out_ += 'e'; }             // APPENDS
  void begin_tuple() { out_ += '('; }          // MARK
  void end_tuple() { out_ += 't'; }            // TUPLE
  std::string finish() && {
    out_ += '.';  // STOP
    return std::move(out_);
  }

 private:
  void little(std::uint64_t value, int bytes) {
    for (int i = 0; i < bytes; ++i) out_ += static_cast<char>((value >> (8 * i)) & 0xff);
  }
  void global(const std::string& module, const std::string& name) { out_ += "c" + module + "\n" + name + "\n"; }
  void ordered_dict() {
    global("collections", "OrderedDict");
    out_ += ")R";  // EMPTY_TUPLE REDUCE
  }
  std::string out_;
};

// data.pkl of torch.save(state_dict): an OrderedDict of tensors, tensor i stored as record data/<i>.
inline std::string write_state_dict_pickle(const std::vector<std::pair<std::string, torch::Tensor>>& entries) {
  Writer writer;
  writer.begin_ordered_dict();
  for (std::size_t i = 0; i < entries.size(); ++i) {
    writer.text(entries[i].first);
    writer.tensor(entries[i].second, i);
  }
  writer.end_dict();
  return std::move(writer).finish();
}

}  // namespace accelerated::detail::pickle
