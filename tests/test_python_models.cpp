// Models and weights from Python: safetensors read and written against a numpy reader and writer made from the
// published format (tests/python/safetensors_interop.py), loaded into models with load_state_dict's checks and refused
// by name when damaged; and a TorchScript module that Python scripted, trained as the model (script_module_interop.py).
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <locale>
#include <random>

#include <accelerated/script_module.hpp>

#include "helpers.hpp"

namespace acc = accelerated;
namespace fs = std::filesystem;

namespace {
std::string python_with_numpy() { return test::python_with("numpy"); }

int run_script(const std::string& python, const std::string& mode, const fs::path& file, const std::string& dtypes) {
  return test::run_python(python, "safetensors_interop.py", {mode, file.string(), dtypes});
}

// The format's names and LibTorch's types, written out here rather than taken from the library's table: a table that
// swapped two types of one width (I16 and U16) would otherwise agree with itself.
const std::vector<std::pair<std::string, std::optional<c10::ScalarType>>> format_dtypes{
    {"F64", torch::kDouble}, {"F32", torch::kFloat}, {"F16", torch::kHalf},  {"BF16", torch::kBFloat16},
    {"I64", torch::kLong},   {"I32", torch::kInt},   {"I16", torch::kShort}, {"I8", torch::kChar},
    {"U8", torch::kByte},    {"BOOL", torch::kBool}, {"C64", torch::kComplexFloat},
#if ACCELERATED_TORCH_AT_LEAST(2, 1)
    {"F8_E4M3", c10::ScalarType::Float8_e4m3fn}, {"F8_E5M2", c10::ScalarType::Float8_e5m2},
#else
    {"F8_E4M3", std::nullopt}, {"F8_E5M2", std::nullopt},
#endif
#if ACCELERATED_TORCH_AT_LEAST(2, 3)
    {"U16", c10::ScalarType::UInt16}, {"U32", c10::ScalarType::UInt32}, {"U64", c10::ScalarType::UInt64},
#else
    {"U16", std::nullopt}, {"U32", std::nullopt}, {"U64", std::nullopt},
#endif
};

std::optional<c10::ScalarType> libtorch_type(const std::string& code) {
  for (const auto& [name, type] : format_dtypes) {
    if (name == code) return type;
  }
  return std::nullopt;
}

std::vector<std::string> codes(bool supported_only) {
  std::vector<std::string> out;
  for (const auto& [name, type] : format_dtypes) {
    if (type || !supported_only) out.push_back(name);
  }
  return out;
}
const std::vector<std::string> all_dtypes = codes(false);
std::vector<std::string> supported_dtypes() { return codes(true); }

std::string joined(const std::vector<std::string>& codes) {
  std::string out;
  for (const auto& c : codes) out += (out.empty() ? "" : ",") + c;
  return out;
}

// The [2, 3] tensor of `code` that safetensors_interop.py's expected_bytes describes, made by LibTorch.
torch::Tensor expected_tensor(const std::string& code) {
  const auto type = *libtorch_type(code);
  const auto halves = torch::tensor({-1.5, -1.0, -0.5, 0.0, 0.5, 1.0}, torch::kDouble).reshape({2, 3});
  if (code == "F64") return halves + std::ldexp(1.0, -40);
  if (code == "C64") return torch::complex(halves.to(torch::kFloat), -halves.to(torch::kFloat));  // (h, -h)
  if (code[0] == 'F' || code == "BF16") return halves.to(type);
  if (code == "BOOL") return torch::tensor({0, 1, 0, 1, 0, 1}, torch::kLong).reshape({2, 3}).to(torch::kBool);
  if (code == "U64") {
    std::vector<std::uint64_t> values;
    for (std::uint64_t i = 0; i < 6; ++i) values.push_back(~std::uint64_t{0} - 5 + i);  // 2^64 - 6 + i
    return torch::from_blob(values.data(), {2, 3}, torch::TensorOptions().dtype(type)).clone();
  }
  const std::map<std::string, std::int64_t> start{{"I64", -(std::int64_t{1} << 62)}, {"I32", -(std::int64_t{1} << 31)},
                                                   {"I16", -(1 << 15)}, {"I8", -128}, {"U8", 250}, {"U16", 65530},
                                                   {"U32", (std::int64_t{1} << 32) - 6}};
  return (torch::arange(6, torch::kLong).reshape({2, 3}) + start.at(code)).to(type);
}

bool same_bytes(const torch::Tensor& a, const torch::Tensor& b) {
  if (a.scalar_type() != b.scalar_type() || a.sizes() != b.sizes()) return false;
  const auto x = a.contiguous(), y = b.contiguous();
  return std::memcmp(x.data_ptr(), y.data_ptr(), static_cast<std::size_t>(x.nbytes())) == 0;
}

std::vector<std::pair<std::string, torch::Tensor>> interop_tensors(const std::vector<std::string>& codes) {
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  for (const auto& code : codes) tensors.emplace_back(code, expected_tensor(code));
  tensors.emplace_back("empty", torch::zeros({0, 4}));
  tensors.emplace_back("scalar", torch::tensor(2.5, torch::kDouble));
  return tensors;
}

// A safetensors file with this header text (padded as given) and `data` after it.
std::string safetensors_bytes(const std::string& header, const std::string& data) {
  std::string bytes(8, '\0');
  for (int b = 0; b < 8; ++b) bytes[b] = static_cast<char>((header.size() >> (8 * b)) & 0xff);
  return bytes + header + data;
}

// What read_safetensors threw ("" when it read), checked to name the file.
std::string read_error(const fs::path& file) {
  return test::load_error(file, [&] { (void)acc::read_safetensors(file); });
}

struct TwoLayer : torch::nn::Module {
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
  TwoLayer() {
    fc1 = register_module("fc1", torch::nn::Linear(4, 8));
    fc2 = register_module("fc2", torch::nn::Linear(8, 2));
  }
};
}  // namespace

TEST_CASE("safetensors written by a numpy writer of the published format read with every byte, dtype and metadata",
          "[safetensors][python]") {
  const auto python = python_with_numpy();
  if (python.empty()) ACCELERATED_SKIP("no python3 with numpy (Debian: apt-get install python3-numpy)");
  const auto dir = test::fresh_dir("safetensors_from_numpy");
  const auto supported = supported_dtypes();
  if (supported.size() < all_dtypes.size()) {  // LibTorch 1.13: the unsigned and 8-bit float dtypes have no type
    REQUIRE(run_script(python, "write", dir / "all.safetensors", joined(all_dtypes)) == 0);
    const auto error = read_error(dir / "all.safetensors");
    CHECK_THAT(error, Catch::Contains("has no type for"));
    CHECK_THAT(error, Catch::Contains("'U16'") || Catch::Contains("'U32'") || Catch::Contains("'U64'") ||
                          Catch::Contains("'F8_E4M3'") || Catch::Contains("'F8_E5M2'"));
  }
  REQUIRE(run_script(python, "write", dir / "from_numpy.safetensors", joined(supported)) == 0);
  const auto file = acc::read_safetensors(dir / "from_numpy.safetensors");
  CHECK(file.metadata == std::map<std::string, std::string>{{"format", "pt"}, {"written_by", "numpy"}});
  const auto expected = interop_tensors(supported);
  REQUIRE(file.tensors.size() == expected.size());
  std::map<std::string, torch::Tensor> read(file.tensors.begin(), file.tensors.end());
  for (const auto& [name, tensor] : expected) {
    INFO(name);
    REQUIRE(read.count(name) == 1);
    CHECK(read.at(name).scalar_type() == tensor.scalar_type());
    CHECK(read.at(name).sizes() == tensor.sizes());
    CHECK(same_bytes(read.at(name), tensor));
  }
  // The header's order, which the numpy writer made other than the data's (by name, descending).
  CHECK(file.tensors.front().first == "scalar");
  CHECK(file.tensors.back().first == "BF16");
  // read_state_dict reads the same file (its tensors), told apart from a torch.save file by its first bytes.
  CHECK(acc::read_state_dict(dir / "from_numpy.safetensors").size() == expected.size());
  fs::remove_all(dir);
}

TEST_CASE("save_safetensors's file reads in a numpy reader of the published format byte for byte, aligned",
          "[safetensors][python]") {
  const auto python = python_with_numpy();
  if (python.empty()) ACCELERATED_SKIP("no python3 with numpy (Debian: apt-get install python3-numpy)");
  const auto dir = test::fresh_dir("safetensors_to_numpy");
  const auto supported = supported_dtypes();
  acc::save_safetensors(interop_tensors(supported), dir / "from_cpp.safetensors",
                        {{"format", "pt"}, {"written_by", "accelerated"}});
  CHECK(run_script(python, "check", dir / "from_cpp.safetensors", joined(supported)) == 0);
  // A non-contiguous tensor is written in its logical (row-major) order.
  const auto matrix = torch::arange(6, torch::kFloat).reshape({2, 3});
  acc::save_safetensors({{"t", matrix.t()}}, dir / "transposed.safetensors");
  CHECK(torch::equal(acc::read_safetensors(dir / "transposed.safetensors").tensors.at(0).second, matrix.t()));
  fs::remove_all(dir);
}

TEST_CASE("a model round-trips through safetensors, and load_state_dict converts dtypes and renames", "[safetensors]") {
  const auto dir = test::fresh_dir("safetensors_model");
  torch::manual_seed(1);
  auto a = std::make_shared<TwoLayer>();
  acc::save_safetensors(*a, dir / "a.safetensors", {{"epoch", "3"}});
  const auto file = acc::read_safetensors(dir / "a.safetensors");
  CHECK(file.metadata.at("epoch") == "3");
  CHECK(file.tensors.size() == 4);
  torch::manual_seed(2);
  auto b = std::make_shared<TwoLayer>();
  const auto result = acc::load_state_dict(*b, dir / "a.safetensors");
  CHECK(result.missing_keys.empty());
  CHECK(torch::equal(test::flat_parameters(*a), test::flat_parameters(*b)));
  // save_state_dict to a ".safetensors" path writes safetensors, as the name says, with the hubs' "format": "pt".
  acc::save_state_dict(*a, dir / "named.safetensors");
  CHECK(acc::read_safetensors(dir / "named.safetensors").metadata ==
        std::map<std::string, std::string>{{"format", "pt"}});
  // The format is told by the file's first bytes, not its name: a safetensors file named .pt loads, and a torch.save
  // file named .safetensors too.
  fs::copy_file(dir / "named.safetensors", dir / "really_safetensors.pt");
  acc::save_state_dict(acc::state_dict_of(*a), dir / "torch_save.pt");
  fs::copy_file(dir / "torch_save.pt", dir / "really_torch_save.safetensors");
  for (const auto* name : {"really_safetensors.pt", "really_torch_save.safetensors"}) {
    torch::manual_seed(4);
    auto d = std::make_shared<TwoLayer>();
    acc::load_state_dict(*d, dir / name);
    CHECK(torch::equal(test::flat_parameters(*a), test::flat_parameters(*d)));
  }
  // A bf16 file (a hub's usual) loads into an f32 model, each value converted.
  std::vector<std::pair<std::string, torch::Tensor>> half;
  for (const auto& [name, tensor] : acc::state_dict_of(*a)) half.emplace_back(name, tensor.to(torch::kBFloat16));
  acc::save_safetensors(half, dir / "bf16.safetensors");
  acc::load_state_dict(*b, dir / "bf16.safetensors");
  CHECK(torch::equal(b->fc1->weight, a->fc1->weight.to(torch::kBFloat16).to(torch::kFloat)));
  CHECK(b->fc1->weight.scalar_type() == torch::kFloat);
  {  // A program whose locale groups digits ("4,000") still writes offsets as JSON numbers.
    struct Thousands : std::numpunct<char> {
      char do_thousands_sep() const override { return ','; }
      std::string do_grouping() const override { return "\3"; }
    };
    const auto previous = std::locale::global(std::locale(std::locale::classic(), new Thousands));
    acc::save_safetensors({{"long", torch::zeros({1000})}, {"short", torch::zeros({1})}}, dir / "locale.safetensors");
    std::locale::global(previous);
    CHECK(acc::read_safetensors(dir / "locale.safetensors").tensors.at(0).second.numel() == 1000);
  }
  // Renaming: a checkpoint whose names carry a prefix.
  std::vector<std::pair<std::string, torch::Tensor>> prefixed;
  for (const auto& [name, tensor] : acc::state_dict_of(*a)) prefixed.emplace_back("model." + name, tensor);
  acc::save_safetensors(prefixed, dir / "prefixed.safetensors");
  acc::LoadStateDictOptions strip;
  strip.rename = [](const std::string& name) { return name.substr(6); };
  torch::manual_seed(3);
  auto c = std::make_shared<TwoLayer>();
  acc::load_state_dict(*c, dir / "prefixed.safetensors", strip);
  CHECK(torch::equal(test::flat_parameters(*a), test::flat_parameters(*c)));
  fs::remove_all(dir);
}

TEST_CASE("a safetensors file that does not fit the model names every problem at once and changes nothing",
          "[safetensors][bad_input]") {
  const auto dir = test::fresh_dir("safetensors_mismatch");
  auto model = std::make_shared<TwoLayer>();
  const auto before = test::flat_parameters(*model).clone();
  acc::save_safetensors({{"fc1.weight", torch::zeros({8, 4})},
                         {"fc1.bias", torch::zeros({7})},
                         {"fc3.weight", torch::zeros({1})}},
                        dir / "bad.safetensors");
  try {
    acc::load_state_dict(*model, dir / "bad.safetensors");
    FAIL("loaded");
  } catch (const std::invalid_argument& error) {
    const std::string what = error.what();
    CHECK_THAT(what, Catch::Contains((dir / "bad.safetensors").string()));
    CHECK_THAT(what, Catch::Contains("missing: \"fc2.weight\", \"fc2.bias\""));
    CHECK_THAT(what, Catch::Contains("unexpected: \"fc3.weight\""));
    CHECK_THAT(what, Catch::Contains("size mismatch for fc1.bias: [7] in the file, [8] in the model"));
    CHECK_THAT(what, Catch::Contains("nothing was changed"));
  }
  CHECK(torch::equal(test::flat_parameters(*model), before));
  const auto loose = acc::load_state_dict(*model, dir / "bad.safetensors",
                                          {.strict = false, .rename = [](const std::string& n) {
                                             return n == "fc1.bias" ? std::string() : n;
                                           }});
  CHECK(loose.missing_keys == std::vector<std::string>{"fc1.bias", "fc2.weight", "fc2.bias"});
  CHECK(torch::equal(model->fc1->weight, torch::zeros({8, 4})));
  // What save_safetensors refuses, by name, before it writes.
  CHECK_THROWS_WITH(acc::save_safetensors({{"a", torch::zeros({1})}, {"a", torch::zeros({1})}}, dir / "x.safetensors"),
                    Catch::Contains("two tensors are named 'a'"));
  CHECK_THROWS_WITH(acc::save_safetensors({{"__metadata__", torch::zeros({1})}}, dir / "x.safetensors"),
                    Catch::Contains("cannot be named '__metadata__'"));
  CHECK_THROWS_WITH(acc::save_safetensors({{"q", torch::quantize_per_tensor(torch::zeros({1}), 0.1, 0, torch::kQUInt8)}},
                                          dir / "x.safetensors"),
                    Catch::Contains("tensor 'q' is QUInt8, which safetensors has no dtype for"));
  CHECK_THROWS_WITH(acc::save_safetensors({{"\xff", torch::zeros({1})}}, dir / "x.safetensors"),
                    Catch::Contains("has a name that is not UTF-8"));
  CHECK_THROWS_WITH(acc::save_safetensors({{"a", torch::zeros({1})}}, dir / "x.safetensors", {{"k", "\xc3"}}),
                    Catch::Contains("metadata 'k' is not UTF-8"));
  CHECK_THROWS_WITH(acc::save_safetensors({{"s", torch::zeros({2, 2}).to_sparse()}}, dir / "x.safetensors"),
                    Catch::Contains("tensor 's' is sparse"));
  CHECK_THROWS_WITH(acc::save_safetensors({{"a", torch::zeros({1})}}, dir / "missing" / "x.safetensors"),
                    Catch::Contains("does not exist"));
  CHECK_FALSE(fs::exists(dir / "x.safetensors"));
  // A save that fails half-way leaves the file it would have replaced as it was (written atomically).
  CHECK(fs::exists(dir / "bad.safetensors"));
  const auto before_bytes = fs::file_size(dir / "bad.safetensors");
  try {
    acc::save_safetensors({{"a", torch::zeros({1})}, {"m", torch::empty({2}, torch::Device(torch::kMeta))}},
                          dir / "bad.safetensors");
    FAIL("saved a meta tensor");
  } catch (const std::runtime_error& error) {
    CHECK_THAT(error.what(), Catch::Contains("tensor 'm' cannot be copied to the CPU"));
    CHECK_THAT(error.what(), Catch::Contains((dir / "bad.safetensors").string()));
    CHECK_THAT(error.what(), !Catch::Contains("Exception raised from"));
  }
  CHECK(fs::file_size(dir / "bad.safetensors") == before_bytes);
  CHECK(acc::read_safetensors(dir / "bad.safetensors").tensors.size() == 3);
  for (const auto& entry : fs::directory_iterator(dir)) CHECK(entry.path().filename().string().find(".tmp-") == std::string::npos);
  fs::remove_all(dir);
}

TEST_CASE("a damaged or hostile safetensors file is an exception naming the file and what is wrong, never a crash",
          "[safetensors][bad_input]") {
  const auto dir = test::fresh_dir("safetensors_hostile");
  const auto file = dir / "bad.safetensors";
  const std::string f32 = "{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}";
  const std::string data(8, '\0');
  const std::vector<std::pair<std::string, std::string>> cases{
      {"", "shorter than a safetensors header's length"},
      {std::string("\xff\xff\xff\xff\xff\xff\xff\x7f{}", 10), "beyond the format's limit of 100 MB"},
      {safetensors_bytes("{}", "").substr(0, 9), "beyond the file's"},
      {safetensors_bytes("[]", ""), "does not start with '{'"},
      {safetensors_bytes("{\"a\" " + f32 + "}", data), "has '{' where ':' belongs"},
      {safetensors_bytes("{\"a\":" + f32, data), "ends early"},
      {safetensors_bytes("{\"a\":" + f32 + ",\"a\":" + f32 + "}", data + data), "names 'a' twice"},
      {safetensors_bytes("{\"a\":{\"dtype\":\"XYZ\",\"shape\":[1],\"data_offsets\":[0,8]}}", data),
       "gives tensor 'a' the dtype 'XYZ', which this LibTorch"},
      {safetensors_bytes("{\"a\":{\"dtype\":\"F32\",\"shape\":[02],\"data_offsets\":[0,8]}}", data),
       "with a leading zero"},
      {safetensors_bytes("{\"\xff\":" + f32 + "}", data), "has a header that is not UTF-8"},
      {safetensors_bytes("{\"\xc0\xaf\":" + f32 + "}", data), "has a header that is not UTF-8"},  // overlong '/'
      {safetensors_bytes("{\"\xed\xa0\x80\":" + f32 + "}", data), "has a header that is not UTF-8"},  // a surrogate
      {safetensors_bytes("{\"a\x01\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", data),
       "has a control character inside a string"},
      {safetensors_bytes("{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", data),
       "gives tensor 'a' 8 bytes for a shape that needs 12"},
      {safetensors_bytes("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,16]}}", data),
       "outside the file's 8 bytes of data"},
      {safetensors_bytes("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,0]}}", data), "outside the file"},
      {safetensors_bytes("{\"a\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", data),
       "not a non-negative integer"},
      {safetensors_bytes("{\"a\":{\"dtype\":\"F32\",\"shape\":[2.0],\"data_offsets\":[0,8]}}", data), "not an integer"},
      {safetensors_bytes("{\"a\":{\"dtype\":\"F32\",\"shape\":[99999999999999999999],\"data_offsets\":[0,8]}}", data),
       "beyond 2^63"},
      {safetensors_bytes("{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,4294967296,0],"
                         "\"data_offsets\":[0,0]}}",
                         ""),
       "a shape of more than 2^63 bytes"},
      {safetensors_bytes("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                         "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}",
                         data),
       "(a gap or an overlap)"},
      {safetensors_bytes("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", data),
       "(a gap or an overlap)"},
      {safetensors_bytes("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", data),
       "has 8 bytes of data, but its tensors cover 4"},
      {safetensors_bytes("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8],\"extra\":1}}", data),
       "has a field 'extra' in tensor 'a' that is unknown or given twice"},
      {safetensors_bytes("{\"a\":{\"dtype\":\"F32\",\"shape\":[2]}}", data), "does not give tensor 'a' a dtype"},
      {safetensors_bytes("{\"__metadata__\":{\"k\":1}}", ""), "has a __metadata__ value that is not a string"},
      {safetensors_bytes("{\"\\ud800\":" + f32 + "}", data), "lone surrogate"},
      {safetensors_bytes("{\"a\\q\":" + f32 + "}", data), "unknown escape"},
      {safetensors_bytes("{\"a\":" + f32 + "} x", data), "has bytes after its JSON object"},
      {safetensors_bytes("{\"a\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,"
                         "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1],"
                         "\"data_offsets\":[0,4]}}",
                         data.substr(0, 4)),
       "of more than 64 numbers"},
  };
  {  // more tensors than any checkpoint names, each empty: a header of 13 MB, refused before it costs more
    std::string many = "{";
    for (std::size_t i = 0; i <= acc::detail::safetensors::max_tensors; ++i) {
      many += (i ? ",\"" : "\"") + std::to_string(i) + "\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]}";
    }
    test::write_bytes(file, safetensors_bytes(many + "}", ""));
    CHECK_THAT(read_error(file), Catch::Contains("names more than 262144 tensors"));
  }
  for (const auto& [bytes, message] : cases) {
    test::write_bytes(file, bytes);
    INFO("expected: " << message);
    CHECK_THAT(read_error(file), Catch::Contains(message));
  }
  CHECK_THAT(read_error(dir / "missing.safetensors"), Catch::Contains("is not a file"));
  // Legitimate edge cases read: no tensors, an empty tensor, escapes, whitespace, a name in UTF-8.
  test::write_bytes(file, safetensors_bytes("{}", ""));
  CHECK(read_error(file).empty());
  test::write_bytes(file, safetensors_bytes("{ \"\\u00e9\\ud83d\\ude00\\n\" : { \"shape\" : [ 0 , 3 ] , \"dtype\" : \"I8\" , "
                                      "\"data_offsets\" : [ 0 , 0 ] } }    ",
                                      ""));
  const auto edge = acc::read_safetensors(file);
  REQUIRE(edge.tensors.size() == 1);
  CHECK(edge.tensors[0].first == "\xc3\xa9\xf0\x9f\x98\x80\n");
  CHECK(edge.tensors[0].second.sizes() == torch::IntArrayRef({0, 3}));
  // 500 mutations of a real file: each reads or is an error naming the file.
  acc::save_safetensors({{"w", torch::randn({4, 3})}, {"b", torch::randn({3}).to(torch::kBFloat16)}}, file,
                        {{"k", "v"}});
  const auto good = test::file_bytes(file);
  std::mt19937 random(7);
  for (int i = 0; i < 500; ++i) {
    auto bytes = good;
    const int edits = 1 + static_cast<int>(random() % 4);
    for (int e = 0; e < edits; ++e) {
      const auto at = random() % (i % 5 == 0 ? bytes.size() : 8 + (bytes.size() - 8) / 2);  // mostly the header
      bytes[at] = static_cast<char>(random() % 256);
    }
    if (i % 7 == 0) bytes.resize(random() % bytes.size());
    test::write_bytes(file, bytes);
    (void)read_error(file);
  }
  fs::remove_all(dir);
}

TEST_CASE("loading a safetensors file into a model holds one tensor of it at a time, not the file", "[safetensors]") {
  const auto dir = test::fresh_dir("safetensors_memory");
  torch::nn::Sequential model;
  for (int i = 0; i < 16; ++i) model->push_back(torch::nn::Linear(1024, 4096));  // 16 x 16 MB of weights
  {
    torch::NoGradGuard no_grad;
    for (auto& p : model->parameters()) p.fill_(0.25);  // touched: resident from here
  }
  acc::save_safetensors(*model, dir / "big.safetensors");
  {
    torch::NoGradGuard no_grad;
    for (auto& p : model->parameters()) p.fill_(0.0);
  }
  const double file_mb = static_cast<double>(fs::file_size(dir / "big.safetensors")) / (1024.0 * 1024.0);
  const double before = test::reset_peak_resident_mb();
  if (before - test::resident_mb() > 16.0) ACCELERATED_SKIP("this kernel does not reset the peak resident memory");
  acc::load_state_dict(*model, dir / "big.safetensors");
  const double growth = test::peak_resident_mb() - before;
  INFO("peak resident memory grew by " << growth << " MB while loading a " << file_mb << " MB file");
  CHECK(growth < 48.0);  // the largest tensor is 16 MB; the whole file is 256 MB
  CHECK(model[0]->as<torch::nn::Linear>()->weight[0][0].item<float>() == 0.25f);
  fs::remove_all(dir);
}

TEST_CASE("safetensors fuzz seeds", "[.fuzz_seeds]") {
  // Writes tests/fuzz/corpus/safetensors/ seeds: Targets' model (Linear(8, 1)) in F32 and in BF16 with metadata.
  const fs::path corpus = std::string(ACCELERATED_TEST_SOURCE_DIR) + "/fuzz/corpus/safetensors";
  fs::create_directories(corpus);
  torch::nn::Linear model(8, 1);
  acc::save_safetensors(*model, corpus / "seed_f32");
  std::vector<std::pair<std::string, torch::Tensor>> half;
  for (const auto& [name, tensor] : acc::state_dict_of(*model)) half.emplace_back(name, tensor.to(torch::kBFloat16));
  acc::save_safetensors(half, corpus / "seed_bf16", {{"format", "pt"}, {"note", "\"quoted\" \\ \n"}});
}

// ---- a TorchScript module as the model ([script_module]) --------------------------------------------------------
namespace {
std::string python_with_torch() { return test::python_with("torch"); }
int run_script_module_script(const std::string& python, const std::string& mode, const fs::path& dir) {
  return test::run_python(python, "script_module_interop.py", {mode, dir.string()});
}

// Net of script_module_interop.py, written in C++: the same layers under the same names.
struct TwinNetImpl : torch::nn::Module {
  torch::nn::Sequential features{torch::nn::Linear(8, 16), torch::nn::BatchNorm1d(16), torch::nn::ReLU(),
                                 torch::nn::Linear(16, 16), torch::nn::ReLU()};
  torch::nn::Linear head{16, 3};
  TwinNetImpl() {
    register_module("features", features);
    register_module("head", head);
  }
  torch::Tensor forward(const torch::Tensor& x) { return head(features->forward(x)); }
};
TORCH_MODULE(TwinNet);

std::pair<torch::Tensor, torch::Tensor> three_classes(std::int64_t n) {
  torch::manual_seed(11);
  const auto x = torch::randn({n, 8});
  return {x, (x.narrow(1, 0, 3).argmax(1))};
}

// Trains `model` for `epochs` epochs with Adam and the same seeds; returns the run's last training loss.
template <class M>
double train_classifier(M& model, std::int64_t epochs, const std::filesystem::path& save_after_first = {},
                        const std::filesystem::path& resume_from = {}) {
  torch::optim::Adam optimizer(model->parameters(), torch::optim::AdamOptions(1e-2));
  acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess> trainer(model, torch::nn::CrossEntropyLoss(),
                                                                         optimizer);
  trainer.set_output(test::quiet());
  const acc::TrainOptions options{.num_epochs = epochs, .per_device_batch_size = 16, .seed = 5};
  if (!resume_from.empty()) {
    trainer.load_training_state(resume_from);
    trainer.train(three_classes(96), options);
  } else if (!save_after_first.empty()) {
    auto first = options;
    first.num_epochs = 1;
    trainer.train(three_classes(96), first);
    trainer.save_training_state(save_after_first);
  } else {
    trainer.train(three_classes(96), options);
  }
  return trainer.run_history().get_latest_metric("train_loss_epoch");
}
}  // namespace

TEST_CASE("a TorchScript module trains as its C++ twin does, bit for bit, and Python loads it back trained",
          "[script_module][python]") {
  const auto python = python_with_torch();
  if (python.empty()) ACCELERATED_SKIP("no python3 with torch (Debian: apt-get install python3-torch)");
  const auto dir = test::fresh_dir("script_module");
  REQUIRE(run_script_module_script(python, "write", dir) == 0);
  auto scripted = acc::load_script_module(dir / "scripted.pt");
  TwinNet twin;
  acc::load_state_dict(twin, dir / "initial.pt");
  // The same names, in Python's order, and the same values.
  const auto names = [](const std::vector<std::pair<std::string, torch::Tensor>>& entries) {
    std::vector<std::string> out;
    for (const auto& entry : entries) out.push_back(entry.first);
    return out;
  };
  CHECK(names(acc::state_dict_of(*scripted)) == names(acc::state_dict_of(*twin)));
  CHECK(torch::equal(test::flat_parameters(*scripted), test::flat_parameters(*twin)));
  const double scripted_loss = train_classifier(scripted, 3);
  const double twin_loss = train_classifier(twin, 3);
  CHECK(scripted_loss == twin_loss);
  CHECK(torch::equal(test::flat_parameters(*scripted), test::flat_parameters(*twin)));
  // Every entry, batch norm's running statistics included; and the script itself holds them (the same tensors).
  const auto scripted_state = acc::state_dict_of(*scripted);
  const auto twin_state = acc::state_dict_of(*twin);
  REQUIRE(scripted_state.size() == twin_state.size());
  std::map<std::string, torch::Tensor> by_name;
  for (std::size_t i = 0; i < scripted_state.size(); ++i) {
    INFO(scripted_state[i].first);
    CHECK(torch::equal(scripted_state[i].second, twin_state[i].second));
    by_name[scripted_state[i].first] = scripted_state[i].second;
  }
  for (const auto& p : scripted->script().named_parameters()) CHECK(p.value.is_same(by_name.at(p.name)));
  for (const auto& b : scripted->script().named_buffers()) CHECK(b.value.is_same(by_name.at(b.name)));
  const auto input = three_classes(8).first;
  scripted->eval();
  twin->eval();
  torch::NoGradGuard no_grad;
  const auto output = scripted->forward(input);
  CHECK(torch::equal(output, twin->forward(input)));
  acc::save_script_module(scripted, dir / "trained.pt");
  acc::save_state_dict({{"input", input}, {"output", output}}, dir / "io.pt");
  CHECK(run_script_module_script(python, "check", dir) == 0);
  fs::remove_all(dir);
}

TEST_CASE("a TorchScript module: train and eval reach the script, a state resumes exactly, bf16 trains, bad files "
          "are named",
          "[script_module][python]") {
  const auto python = python_with_torch();
  if (python.empty()) ACCELERATED_SKIP("no python3 with torch (Debian: apt-get install python3-torch)");
  const auto dir = test::fresh_dir("script_module_more");
  REQUIRE(run_script_module_script(python, "write", dir) == 0);
  auto model = acc::load_script_module(dir / "scripted.pt");
  const auto batch_norm = model->script().attr("features").toModule().attr("1").toModule();
  model->eval();
  CHECK_FALSE(batch_norm.attr("training").toBool());
  model->train();
  CHECK(batch_norm.attr("training").toBool());
  // A module pinned to eval mode (ModelFreezer's set_modules_as_eval) stays there in the script too.
  const auto pinned = model->named_modules()["features.1"];
  acc::pin_eval_mode(pinned);
  acc::set_training(*model, true);
  CHECK_FALSE(batch_norm.attr("training").toBool());
  CHECK(model->script().attr("training").toBool());
  acc::unpin_eval_mode(pinned);
  // The mirror carries the script's class names (ModelFreezer tells batch norms by them), and each module's mode as
  // the script holds it: a batch norm Python left in eval mode stays there after the load.
  CHECK(pinned->name() == "BatchNorm1d");
  auto mixed = acc::load_script_module(dir / "mixed_modes.pt");
  CHECK(mixed->is_training());
  CHECK(mixed->named_modules()["features.0"]->is_training());
  CHECK_FALSE(mixed->named_modules()["features.1"]->is_training());
  CHECK_FALSE(mixed->script().attr("features").toModule().attr("1").toModule().attr("training").toBool());

  // A training state saved after one epoch resumes into a freshly loaded script module exactly.
  auto whole = acc::load_script_module(dir / "scripted.pt");
  train_classifier(whole, 2);
  auto first = acc::load_script_module(dir / "scripted.pt");
  train_classifier(first, 2, dir / "state.pt");
  auto resumed = acc::load_script_module(dir / "scripted.pt");
  train_classifier(resumed, 2, {}, dir / "state.pt");
  CHECK(torch::equal(test::flat_parameters(*resumed), test::flat_parameters(*whole)));

  {  // bf16 autocast on the CPU runs the script's operators in bf16 and trains
    auto half = acc::load_script_module(dir / "scripted.pt");
    const auto before = test::flat_parameters(*half).clone();
    torch::optim::SGD sgd(half->parameters(), 0.1);
    acc::Trainer<acc::Cpu, acc::BFloat16, acc::SingleProcess> trainer(half, torch::nn::CrossEntropyLoss(), sgd);
    trainer.set_output(test::quiet());
    trainer.train(three_classes(64), {.num_epochs = 1, .per_device_batch_size = 16});
    CHECK(std::isfinite(trainer.run_history().get_latest_metric("train_loss_epoch")));
    CHECK_FALSE(torch::equal(test::flat_parameters(*half), before));
    torch::NoGradGuard no_grad;
    const acc::precision::AutocastGuard autocast(torch::kCPU, torch::kBFloat16);
    CHECK(half->forward(torch::randn({2, 8})).scalar_type() == torch::kBFloat16);
  }

  // A forward that returns something else, and files that are not a script module, are named.
  auto tuple_out = acc::load_script_module(dir / "tuple_out.pt");
  CHECK_THROWS_WITH(tuple_out->forward(torch::randn({2, 8})), Catch::Contains("returned a Tuple, not a Tensor"));
  CHECK_THROWS_WITH(acc::load_script_module(dir / "missing.pt"), Catch::Contains("is not a file"));
  CHECK_THROWS_WITH(acc::load_script_module(dir / "initial.pt"), Catch::Contains("holds no TorchScript code"));
  const auto bytes = test::file_bytes(dir / "scripted.pt");
  test::write_bytes(dir / "truncated.pt", bytes.substr(0, bytes.size() / 2));
  CHECK_THROWS_WITH(acc::load_script_module(dir / "truncated.pt"), Catch::Contains((dir / "truncated.pt").string()));
  auto flipped = bytes;
  const auto weight = acc::read_state_dict(dir / "initial.pt").at(0).second.contiguous();  // features.0.weight
  const auto at = flipped.find(std::string(static_cast<const char*>(weight.data_ptr()), 16));
  REQUIRE(at != std::string::npos);
  flipped[at + 5] ^= 0x10;  // inside a weight's record: its CRC-32 no longer matches
  test::write_bytes(dir / "flipped.pt", flipped);
  CHECK_THROWS_WITH(acc::load_script_module(dir / "flipped.pt"), Catch::Contains((dir / "flipped.pt").string()));
  fs::remove_all(dir);
}

TEST_CASE("a TorchScript module trains on the GPU: its tensors move with the model", "[script_module][cuda]") {
  if (!torch::cuda::is_available()) ACCELERATED_SKIP("no CUDA device");
  const auto python = python_with_torch();
  if (python.empty()) ACCELERATED_SKIP("no python3 with torch (Debian: apt-get install python3-torch)");
  const auto dir = test::fresh_dir("script_module_cuda");
  REQUIRE(run_script_module_script(python, "write", dir) == 0);
  auto model = acc::load_script_module(dir / "scripted.pt");
  torch::optim::SGD sgd(model->parameters(), 0.1);
  acc::Trainer<acc::Cuda, acc::BFloat16, acc::SingleProcess> trainer(model, torch::nn::CrossEntropyLoss(), sgd);
  trainer.set_output(test::quiet());
  trainer.train(three_classes(64), {.num_epochs = 1, .per_device_batch_size = 16});
  for (const auto& p : model->script().named_parameters()) CHECK(p.value.is_cuda());
  CHECK(std::isfinite(trainer.run_history().get_latest_metric("train_loss_epoch")));
  fs::remove_all(dir);
}
