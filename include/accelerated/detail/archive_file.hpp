#pragma once
// Checkpoints and training states on disk. They are built in LibTorch's serialize archives (an optimizer saves into a
// torch::serialize::OutputArchive, a callback's save_state too) but written as torch.save writes a dict: a zip with a
// pickle and one raw record per tensor. Python opens them with torch.load(path, weights_only=True); and they are read
// back by our own hardened reader (zip_reader.hpp, torch_pickle.hpp), never by LibTorch's TorchScript loader, which
// compiles the code entries of whatever file it is given and crashes on damaged ones.
//
// The mapping: an archive is a dict; a tensor is a tensor (on the CPU in the file, on the load's device once read); an
// integer, string, bool, None or tuple is itself; a typed list or dict (an optimizer's List[Tensor]) is a dict
// {"__accelerated_type__": "List[Tensor]", "items": [...]}, its type kept so that LibTorch's readers accept it; and a
// float (an optimizer's learning rate) is {"__accelerated_type__": "float", "items": [a 0-dim float64 tensor]}, as
// PyTorch 1.13's torch.load(weights_only=True) refuses the pickle opcode for a float.
// Parameters and buffers are not told apart: no LibTorch reader of an archive asks which one a tensor was.
#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/jit/api/module.h>
#include <torch/cuda.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>
#include <torch/types.h>
#include <torch/version.h>

#include <c10/util/Exception.h>

#include <cstddef>
#include <exception>
#include <filesystem>
#include <map>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "atomic_file.hpp"
#include "private_member.hpp"
#include "torch_pickle.hpp"
#include "zip_reader.hpp"

namespace accelerated::detail {

// ---- an OutputArchive's contents as an InputArchive ------------------------------------------------------------
// LibTorch 1.13 to 2.6 keep both archives' contents in a private jit::Module, which is handed over here without a
// copy (private_member.hpp). Other versions lay the archives out otherwise, so there the contents go through
// LibTorch's own serialisation in memory: bytes LibTorch has just written, never a user's file, at the cost of a copy.
#if TORCH_VERSION_MAJOR == 1 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR <= 6)
#define ACCELERATED_ARCHIVE_MODULE_ACCESS 1
struct InputArchiveModule {
  using type = torch::jit::Module torch::serialize::InputArchive::*;
  friend type member_of(InputArchiveModule);
};
struct OutputArchiveModule {
  using type = torch::jit::Module torch::serialize::OutputArchive::*;
  friend type member_of(OutputArchiveModule);
};
template struct PrivateMember<InputArchiveModule, &torch::serialize::InputArchive::module_>;
template struct PrivateMember<OutputArchiveModule, &torch::serialize::OutputArchive::module_>;
#else
#define ACCELERATED_ARCHIVE_MODULE_ACCESS 0
#endif

// Through LibTorch's serialisation in memory: any version.
inline torch::serialize::InputArchive input_archive_by_bytes(torch::serialize::OutputArchive& archive) {
  std::stringstream bytes;
  archive.save_to(bytes);
  torch::serialize::InputArchive input;
  input.load_from(bytes);
  return input;
}

// The same contents, shared (no copy) where the layout is known.
inline torch::serialize::InputArchive as_input_archive(torch::serialize::OutputArchive& archive) {
#if ACCELERATED_ARCHIVE_MODULE_ACCESS
  torch::serialize::InputArchive input;
  input.*member_of(InputArchiveModule{}) = archive.*member_of(OutputArchiveModule{});
  return input;
#else
  return input_archive_by_bytes(archive);
#endif
}

// Runs `read`, turning LibTorch's errors into std::runtime_error(where + its message) without LibTorch's C++
// backtrace: a damaged file's entry of an unexpected type or size is reported, not dumped.
template <class Read>
decltype(auto) without_backtrace(const std::string& where, Read&& read) {
  try {
    return read();
  } catch (const c10::Error& error) {
    throw std::runtime_error(where + " could not be read: " + error.what_without_backtrace());
  }
}

// An exception's message, LibTorch's without its backtrace.
inline std::string message_of(const std::exception& error) {
  if (const auto* c10_error = dynamic_cast<const c10::Error*>(&error)) return c10_error->what_without_backtrace();
  return error.what();
}

// Runs `load` (a section's reader: a callback's, the scheduler's, a precision policy's load_state); whatever it
// throws becomes std::runtime_error naming `where` (the file) and the section.
template <class Load>
void load_section(const std::string& where, const std::string& section, Load&& load) {
  try {
    load();
  } catch (const std::exception& error) {
    throw std::runtime_error(where + ": entry '" + section + "' could not be loaded: " + message_of(error));
  }
}

// ---- the file's zip layer --------------------------------------------------------------------------------------
// Writes torch.save's zip: data.pkl, then tensor i (copied to the CPU and made contiguous one at a time, so a GPU's
// state never sits in host memory whole) as record data/<i>. Atomic, and streamed into the file.
inline void write_torch_save_file(const std::filesystem::path& path, const std::string& pickled,
                                  const std::vector<torch::Tensor>& tensors) {
  write_atomically_to_fd(path, [&](int fd) {
    // The writer must not see an exception (its destructor would write again and terminate): the first write error
    // is kept, the rest of the bytes are dropped, and the error is thrown once the writer is done.
    std::exception_ptr failed;
    {
      caffe2::serialize::PyTorchStreamWriter writer([&](const void* data, std::size_t size) {
        if (!failed) {
          try {
            write_all(fd, data, size, path);
          } catch (...) {
            failed = std::current_exception();
          }
        }
        return size;
      });
      writer.writeRecord("data.pkl", pickled.data(), pickled.size());
      for (std::size_t i = 0; i < tensors.size() && !failed; ++i) {
        const auto tensor = tensors[i].detach().to(torch::kCPU).contiguous();
        writer.writeRecord("data/" + std::to_string(i), tensor.data_ptr(), tensor.numel() * tensor.element_size());
      }
      writer.writeEndOfFile();
    }
    if (failed) std::rethrow_exception(failed);
  });
}

inline constexpr std::string_view typed_value_tag = "__accelerated_type__";
inline constexpr int max_value_depth = 32;

// The types an archive's containers hold: Tensor, int, float, bool, str, NoneType, and Optional, List, Dict and Tuple
// of them, parsed from a type annotation (LibTorch's annotation_str()); anything else is std::invalid_argument (the
// text comes from the file when reading, and is checked when saving, so that no file is written that cannot be read).
inline c10::TypePtr parse_archive_type(std::string_view& text, int depth = 0) {
  auto fail = [](const std::string& what) -> c10::TypePtr { throw std::invalid_argument(what); };
  if (depth > 8) return fail("a container type nested too deep");
  const auto name = std::string(text.substr(0, text.find_first_of("[],")));
  text.remove_prefix(name.size());
  auto parameters = [&]() {
    std::vector<c10::TypePtr> out;
    if (text.empty() || text.front() != '[') fail("a damaged type");
    text.remove_prefix(1);
    if (text.substr(0, 3) == "()]") {  // Tuple[()]
      text.remove_prefix(3);
      return out;
    }
    while (true) {
      out.push_back(parse_archive_type(text, depth + 1));
      if (text.substr(0, 2) == ", ") {
        text.remove_prefix(2);
      } else if (!text.empty() && text.front() == ']') {
        text.remove_prefix(1);
        return out;
      } else {
        fail("a damaged type");
      }
    }
  };
  auto exactly = [&](std::size_t n) {
    auto p = parameters();
    if (p.size() != n) fail("a type " + name + " with " + std::to_string(p.size()) + " parameters");
    return p;
  };
  if (name == "Tensor") return c10::TensorType::get();
  if (name == "int") return c10::IntType::get();
  if (name == "float") return c10::FloatType::get();
  if (name == "bool") return c10::BoolType::get();
  if (name == "str") return c10::StringType::get();
  if (name == "NoneType") return c10::NoneType::get();
  if (name == "Tuple") return c10::TupleType::create(parameters());
  if (name == "Optional") return c10::OptionalType::create(exactly(1)[0]);
  if (name == "List") return c10::ListType::create(exactly(1)[0]);
  if (name == "Dict") {
    const auto p = exactly(2);
    return c10::DictType::create(p[0], p[1]);
  }
  return fail("a type '" + name + "', which an archive does not hold");
}

// The whole annotation parsed, or std::invalid_argument.
inline c10::TypePtr parse_archive_type(const std::string& annotation) {
  std::string_view text = annotation;
  auto type = parse_archive_type(text);
  if (!text.empty()) throw std::invalid_argument("a type that does not parse");
  return type;
}

// ---- writing an archive ----------------------------------------------------------------------------------------
class ArchivePickler {
 public:
  explicit ArchivePickler(const std::filesystem::path& path) : file_(path.string()) {}

  void archive(torch::serialize::InputArchive& in, const std::string& where) {
    pickle_.begin_dict();
    for (const auto& key : in.keys()) {
      pickle_.text(key);
      torch::serialize::InputArchive nested;
      if (in.try_read(key, nested)) {
        archive(nested, where + key + "/");
        continue;
      }
      c10::IValue value;
      in.read(key, value);
      this->value(value, where + key, 0);
    }
    pickle_.end_dict();
  }
  std::string finish() && { return std::move(pickle_).finish(); }
  std::vector<torch::Tensor>& tensors() { return tensors_; }

 private:
  [[noreturn]] void fail(const std::string& where, const std::string& what) const {
    throw std::invalid_argument("accelerated: cannot save '" + file_ + "': entry '" + where + "' " + what);
  }
  // A tensor, stored as the next record.
  void tensor(const torch::Tensor& t) {
    pickle_.tensor(t, tensors_.size());
    tensors_.push_back(t);
  }
  // {"__accelerated_type__": annotation, "items": [what `items` writes]}.
  template <class Items>
  void typed(const std::string& annotation, Items&& items) {
    pickle_.begin_dict();
    pickle_.text(std::string(typed_value_tag));
    pickle_.text(annotation);
    pickle_.text("items");
    pickle_.begin_list();
    items();
    pickle_.end_list();
    pickle_.end_dict();
  }
  void value(const c10::IValue& v, const std::string& where, int depth) {
    if (depth > max_value_depth) fail(where, "is nested more than " + std::to_string(max_value_depth) + " deep");
    if (v.isNone()) {
      pickle_.none();
    } else if (v.isBool()) {
      pickle_.boolean(v.toBool());
    } else if (v.isInt()) {
      pickle_.integer(v.toInt());
    } else if (v.isDouble()) {  // PyTorch 1.13's weights_only reader knows no float opcode: a 0-dim tensor, typed
      typed("float", [&] { tensor(torch::tensor(v.toDouble(), torch::kDouble)); });
    } else if (v.isString()) {
      pickle_.text(v.toStringRef());
    } else if (v.isTensor()) {
      const auto& t = v.toTensor();
      if (!t.defined()) {
        pickle_.none();
        return;
      }
      try {
        pickle::storage_class(t.scalar_type());
      } catch (const std::exception&) {
        fail(where, std::string("is a tensor of dtype ") + c10::toString(t.scalar_type()) +
                        ", which torch.save's format has no storage type for");
      }
      tensor(t);
    } else if (v.isTuple()) {
      pickle_.begin_tuple();
      for (const auto& item : v.toTupleRef().elements()) value(item, where, depth + 1);
      pickle_.end_tuple();
    } else if (v.isList() || v.isGenericDict()) {
      try {
        parse_archive_type(v.type()->annotation_str());
      } catch (const std::invalid_argument& error) {
        fail(where, "is a " + v.type()->annotation_str() + ", which an archive cannot hold (" + error.what() +
                        "): only Tensor, int, float, bool, str and containers of them");
      }
      typed(v.type()->annotation_str(), [&] {
        if (v.isList()) {
          for (const auto& item : v.toListRef()) value(item, where, depth + 1);
          return;
        }
        for (const auto& item : v.toGenericDict()) {
          pickle_.begin_tuple();
          value(item.key(), where, depth + 1);
          value(item.value(), where, depth + 1);
          pickle_.end_tuple();
        }
      });
    } else {
      fail(where, "holds a value of type " + v.type()->annotation_str() +
                      " (an archive holds tensors, numbers, strings, None, and tuples, lists and dicts of them)");
    }
  }

  std::string file_;
  pickle::Writer pickle_;
  std::vector<torch::Tensor> tensors_;
};

// What the torch.save file of an archive holds: the pickle, and the tensors its records are made of (the archive's
// own tensors, a model's live parameters among them, until host_copy).
struct ArchiveContents {
  std::string pickle;
  std::vector<torch::Tensor> tensors;
};

// `archive` pickled for `path` (named in errors); its tensors are referred to, not copied.
inline ArchiveContents archive_contents(const std::filesystem::path& path, torch::serialize::OutputArchive& archive) {
  auto input = as_input_archive(archive);
  ArchivePickler pickler(path);
  pickler.archive(input, "");
  auto tensors = std::move(pickler.tensors());
  return {std::move(pickler).finish(), std::move(tensors)};
}

// The same contents with every tensor copied into host memory, contiguous: the values of this moment, whatever
// training does to the originals afterwards (an asynchronous save writes the copy while training goes on). Unlike
// the synchronous write, this holds the whole state in host memory; a GPU's tensors go to pinned memory, the copies
// queued without blocking and waited for once at the end.
inline ArchiveContents host_copy(ArchiveContents contents) {
  std::set<c10::DeviceIndex> devices;
  for (auto& tensor : contents.tensors) {
    const bool cuda = tensor.is_cuda();
    if (cuda) devices.insert(tensor.device().index());
    auto copy = torch::empty(tensor.sizes(), torch::TensorOptions().dtype(tensor.scalar_type()).pinned_memory(cuda));
    copy.copy_(tensor.detach(), /*non_blocking=*/cuda);
    tensor = std::move(copy);
  }
  for (const auto device : devices) torch::cuda::synchronize(device);
  return contents;
}

inline void write_archive_contents(const std::filesystem::path& path, const ArchiveContents& contents) {
  write_torch_save_file(path, contents.pickle, contents.tensors);
}

// Writes `archive` to `path` atomically, in torch.save's format.
inline void write_archive_file(const std::filesystem::path& path, torch::serialize::OutputArchive& archive) {
  write_archive_contents(path, archive_contents(path, archive));
}

// ---- reading an archive ----------------------------------------------------------------------------------------
// Every value converted counts against a budget of the pickle's size: a container the pickle memoized once and refers
// to many times (a tuple of two references to a tuple of two references to ...) cannot expand into billions of values.
class ArchiveBuilder {
 public:
  ArchiveBuilder(std::string where, torch::Device device, std::size_t pickle_size)
      : where_(std::move(where)),
        device_(device),
        values_left_(pickle_size + 1024),
        bytes_left_((std::size_t{64} << 20) + 16 * pickle_size) {}

  // `value` (a dict) as the contents of `out`.
  void archive(const pickle::Value& value, torch::serialize::OutputArchive& out, const std::string& path, int depth) {
    const auto* items = value.get<std::shared_ptr<pickle::Items>>();
    if (items == nullptr || typed(value)) fail(path, "is not a dict of entries (a damaged or foreign file)");
    if (depth > max_value_depth) fail(path, "is nested more than " + std::to_string(max_value_depth) + " deep");
    std::set<std::string> seen;
    for (const auto& [key_value, item] : **items) {
      count(path);
      const auto* key = key_value.get<std::string>();
      if (key == nullptr) fail(path, "has an entry whose name is not a string");
      if (!seen.insert(*key).second) fail(path + *key, "appears twice");
      const auto where = path + *key;
      if (item.get<std::shared_ptr<pickle::Items>>() != nullptr && !typed(item)) {
        torch::serialize::OutputArchive nested(out.compilation_unit());
        archive(item, nested, where + "/", depth + 1);
        out.write(*key, nested);
      } else if (const auto* tensor = item.get<torch::Tensor>()) {
        out.write(*key, on_device(*tensor), /*is_buffer=*/true);
      } else {
        out.write(*key, ivalue(item, where, 0));
      }
    }
  }

 private:
  [[noreturn]] void fail(const std::string& path, const std::string& what) const {
    throw std::runtime_error(where_ + ": entry '" + (path.empty() ? std::string("(the file's root)") : path) + "' " +
                             what);
  }
  static bool typed(const pickle::Value& value) {
    const auto* items = value.get<std::shared_ptr<pickle::Items>>();
    if (items == nullptr || (*items)->empty()) return false;
    const auto* key = (*items)->front().first.get<std::string>();
    return key != nullptr && *key == typed_value_tag;
  }

  // One copy on the load's device per tensor of the file, however often it is referred to.
  torch::Tensor on_device(const torch::Tensor& t) {
    if (t.device() == device_) return t;
    auto& copy = copies_[t.unsafeGetTensorImpl()];
    if (!copy.defined()) copy = t.to(device_);
    return copy;
  }

  void count(const std::string& where) {
    if (values_left_ == 0) fail(where, "expands into more values than the file holds (a hostile file?)");
    --values_left_;
  }

  c10::IValue ivalue(const pickle::Value& v, const std::string& where, int depth) {
    if (depth > max_value_depth) fail(where, "is nested more than " + std::to_string(max_value_depth) + " deep");
    count(where);
    if (v.get<std::monostate>()) return {};
    if (const auto* b = v.get<bool>()) return *b;
    if (const auto* i = v.get<std::int64_t>()) return *i;
    if (const auto* d = v.get<double>()) return *d;
    if (const auto* s = v.get<std::string>()) {  // copied at each reference: counted against a budget of bytes
      if (s->size() > bytes_left_) fail(where, "holds more text than 16 times the pickle's size (a hostile file?)");
      bytes_left_ -= s->size();
      return *s;
    }
    if (const auto* t = v.get<torch::Tensor>()) return on_device(*t);
    if (const auto* sequence = v.get<std::shared_ptr<pickle::Sequence>>()) {
      std::vector<c10::IValue> elements;
      for (const auto& item : **sequence) elements.push_back(ivalue(item, where, depth + 1));
      return c10::ivalue::Tuple::create(std::move(elements));
    }
    if (typed(v)) return typed_ivalue(**v.get<std::shared_ptr<pickle::Items>>(), where, depth);
    fail(where, "holds something that is not a tensor, number, string, None, tuple or typed container");
  }

  c10::IValue typed_ivalue(const pickle::Items& items, const std::string& where, int depth) {
    const auto* annotation = items[0].second.get<std::string>();
    const pickle::Sequence* elements = nullptr;
    if (items.size() == 2) {
      const auto* key = items[1].first.get<std::string>();
      const auto* list = items[1].second.get<std::shared_ptr<pickle::Sequence>>();
      if (key != nullptr && *key == "items" && list != nullptr) elements = list->get();
    }
    if (annotation == nullptr || elements == nullptr) fail(where, "is a damaged typed container");
    c10::TypePtr type;
    try {
      type = parse_archive_type(*annotation);
    } catch (const std::invalid_argument& error) {
      fail(where, "has a type '" + *annotation + "': " + error.what());
    }
    auto check = [&](const c10::IValue& item, const c10::TypePtr& expected) {
      if (!item.type()->isSubtypeOf(*expected)) {
        fail(where, "holds a " + item.type()->annotation_str() + " in a " + *annotation);
      }
      return item;
    };
    if (type->kind() == c10::TypeKind::FloatType) {
      const auto* number = elements->size() == 1 ? (*elements)[0].get<torch::Tensor>() : nullptr;
      if (number == nullptr || number->numel() != 1 || number->scalar_type() != torch::kDouble) {
        fail(where, "is a damaged float (not one double)");
      }
      count(where);
      return number->item<double>();
    }
    if (const auto list_type = type->cast<c10::ListType>()) {
      c10::impl::GenericList list(list_type->getElementType());
      for (const auto& item : *elements) {
        list.push_back(check(ivalue(item, where, depth + 1), list_type->getElementType()));
      }
      return list;
    }
    if (const auto dict_type = type->cast<c10::DictType>()) {
      c10::impl::GenericDict dict(dict_type->getKeyType(), dict_type->getValueType());
      for (const auto& item : *elements) {
        const auto pair = ivalue(item, where, depth + 1);
        if (!pair.isTuple() || pair.toTupleRef().elements().size() != 2) fail(where, "has a damaged dict item");
        const auto& kv = pair.toTupleRef().elements();
        if (!dict.insert(check(kv[0], dict_type->getKeyType()), check(kv[1], dict_type->getValueType())).second) {
          fail(where, "holds a key twice");
        }
      }
      return dict;
    }
    fail(where, "has a type '" + *annotation + "' that is not a list or a dict");
  }

  std::string where_;
  torch::Device device_;
  std::size_t values_left_;
  std::size_t bytes_left_;
  std::map<const void*, torch::Tensor> copies_;
};

// Reads what write_archive_file wrote (or any torch.save of a dict of such values), with every tensor on `device`.
// Errors name `caller`, the file and the entry; a file in the TorchScript format that torch::save and earlier versions
// of this library wrote is refused by name, unread.
inline torch::serialize::InputArchive read_archive_file(const std::filesystem::path& path, const std::string& caller,
                                                        torch::Device device) {
  ZipReader zip(path, caller);
  const std::string where = "accelerated::" + caller + ": '" + zip.file() + "'";
  for (const auto& [name, record] : zip.records()) {
    if (name == "constants.pkl" || name.rfind("code/", 0) == 0) {
      throw std::runtime_error(where + " is a TorchScript archive (written by torch::save, or by accelerated 0.1, "
                               "whose checkpoints were TorchScript archives); this library reads only the "
                               "torch.save format it writes now, and does not run a TorchScript loader on a file");
    }
  }
  if (!zip.has("data.pkl")) throw std::runtime_error(where + " has no data.pkl (not a torch.save file)");
  const auto pickled = zip.read_string("data.pkl");
  pickle::Reader reader(zip, caller);  // owns what it read
  const auto& root = reader.run(pickled);
  return without_backtrace(where, [&] {
    torch::serialize::OutputArchive contents;
    ArchiveBuilder(where, device, pickled.size()).archive(root, contents, "", 0);
    return as_input_archive(contents);
  });
}

}  // namespace accelerated::detail
