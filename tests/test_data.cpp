#include <zlib.h>

#include <filesystem>
#include <fstream>
#include <numeric>
#include <range/v3/view/iota.hpp>
#include <range/v3/view/transform.hpp>
#include <set>

#include "helpers.hpp"

namespace acc = accelerated;
namespace data = accelerated::data;

TEST_CASE("the sampler's order is a seeded permutation that changes per epoch", "[data][sampler]") {
  data::EpochSampler sampler(100, {.batch_size = 10, .shuffle = true, .seed = 3});
  const auto e0 = sampler.indices(0);
  const auto e1 = sampler.indices(1);
  CHECK(e0 == sampler.indices(0));                                             // reproducible
  CHECK(e0 == data::EpochSampler(100, {.batch_size = 10, .shuffle = true, .seed = 3}).indices(0));
  CHECK(e0 != e1);                                                             // new order each epoch
  CHECK(e0 != data::EpochSampler(100, {.batch_size = 10, .shuffle = true, .seed = 4}).indices(0));
  auto sorted = e1;
  std::sort(sorted.begin(), sorted.end());
  std::vector<std::int64_t> expected(100);
  std::iota(expected.begin(), expected.end(), 0);
  CHECK(sorted == expected);  // a permutation
  CHECK(data::EpochSampler(100, {.batch_size = 10}).indices(5) == expected);  // no shuffle: in order
}

TEST_CASE("the sampler shards evenly for training and exactly for evaluation", "[data][sampler]") {
  // 10 examples on 3 processes. Training pads by wrapping around: 4 each.
  std::multiset<std::int64_t> seen;
  for (std::int64_t rank = 0; rank < 3; ++rank) {
    data::EpochSampler s(10, {.batch_size = 2, .shuffle = true, .num_replicas = 3, .rank = rank});
    CHECK(s.num_samples() == 4);
    CHECK(s.num_batches() == 2);
    for (auto i : s.indices(0)) seen.insert(i);
  }
  CHECK(seen.size() == 12);
  for (std::int64_t i = 0; i < 10; ++i) CHECK(seen.count(i) >= 1);
  // Evaluation: no padding, every example exactly once.
  std::multiset<std::int64_t> eval_seen;
  for (std::int64_t rank = 0; rank < 3; ++rank) {
    data::EpochSampler s(10, {.batch_size = 2, .num_replicas = 3, .rank = rank, .pad_to_even = false});
    for (auto i : s.indices(0)) eval_seen.insert(i);
  }
  CHECK(eval_seen.size() == 10);
  CHECK(std::set<std::int64_t>(eval_seen.begin(), eval_seen.end()).size() == 10);
  CHECK_THROWS_WITH(data::EpochSampler(10, {.batch_size = 0}), Catch::Contains("batch_size = 0"));
  CHECK_THROWS_WITH(data::EpochSampler(10, {.batch_size = 1, .num_replicas = 2, .rank = 2}), Catch::Contains("rank = 2"));
}

TEST_CASE("drop_last drops only the short batch", "[data][sampler]") {
  CHECK(data::EpochSampler(10, {.batch_size = 4}).num_batches() == 3);
  CHECK(data::EpochSampler(10, {.batch_size = 4, .drop_last = true}).num_batches() == 2);
}

namespace {

template <class Source, class Collate = data::DefaultCollate>
std::vector<torch::data::Example<>> all_batches(Source source, data::SamplerOptions options, Collate collate = {}) {
  data::EpochSampler sampler(source.size(), options);
  data::Loader<Source, Collate> loader(std::move(source), sampler, collate);
  loader.set_epoch(2);
  std::vector<torch::data::Example<>> batches;
  for (auto&& batch : loader) batches.push_back(batch);
  CHECK(static_cast<std::int64_t>(batches.size()) == loader.size());
  return batches;
}

void check_same_batches(const std::vector<torch::data::Example<>>& a, const std::vector<torch::data::Example<>>& b) {
  REQUIRE(a.size() == b.size());
  for (std::size_t i = 0; i < a.size(); ++i) {
    CHECK(torch::equal(a[i].data, b[i].data));
    CHECK(torch::equal(a[i].target, b[i].target));
  }
}
}  // namespace

TEST_CASE("the three kinds of data give the same batches", "[data][loader]") {
  const auto [x, y] = test::regression_data(10);
  const data::SamplerOptions options{.batch_size = 4, .shuffle = true, .seed = 9};

  const auto fast = all_batches(data::as_source(std::pair{x, y}, "d"), options);
  REQUIRE(fast.size() == 3);
  CHECK(fast[0].data.sizes() == torch::IntArrayRef{4, 8});
  CHECK(fast[2].data.size(0) == 2);  // the short last batch

  test::PairDataset dataset(x, y);
  check_same_batches(fast, all_batches(data::as_source(dataset, "d"), options));

  std::vector<torch::data::Example<>> examples;
  for (std::int64_t i = 0; i < 10; ++i) examples.push_back({x[i], y[i]});
  check_same_batches(fast, all_batches(data::as_source(examples, "d"), options));

  // A lazy range-v3 view is a random-access range too.
  auto view = ranges::views::iota(0, 10) |
              ranges::views::transform([&](int i) { return torch::data::Example<>{x[i], y[i]}; });
  check_same_batches(fast, all_batches(data::as_source(view, "d"), options));

  // A dataset mapped with Stack<> collates itself; the loader passes its batches through.
  auto stacked = test::PairDataset(x, y).map(torch::data::transforms::Stack<>());
  check_same_batches(fast, all_batches(data::as_source(std::move(stacked), "d"), options));
}

TEST_CASE("a user's collate function replaces stacking", "[data][loader]") {
  const auto [x, y] = test::regression_data(6);
  int calls = 0;
  auto collate = [&calls](std::vector<torch::data::Example<>>&& examples) {
    ++calls;
    std::vector<torch::Tensor> xs, ys;
    for (auto& e : examples) {
      xs.push_back(e.data * 2);
      ys.push_back(e.target);
    }
    return torch::data::Example<>{torch::stack(xs), torch::stack(ys)};
  };
  const auto batches = all_batches(data::as_source(std::pair{x, y}, "d"), {.batch_size = 4}, collate);
  CHECK(calls == 2);
  CHECK(torch::equal(batches[0].data, x.narrow(0, 0, 4) * 2));
}

TEST_CASE("default collate keeps the example's shape", "[data][collate]") {
  data::DefaultCollate collate;
  std::vector<std::pair<torch::Tensor, std::int64_t>> pairs{{torch::ones({2}), 3}, {torch::zeros({2}), 5}};
  auto [inputs, labels] = collate(std::move(pairs));
  CHECK(inputs.sizes() == torch::IntArrayRef{2, 2});
  CHECK(labels.dtype() == torch::kLong);
  CHECK(labels[1].item<std::int64_t>() == 5);
  std::vector<std::tuple<torch::Tensor, torch::Tensor, double>> triples{{torch::ones({1}), torch::ones({3}), 0.5}};
  auto [a, b, c] = collate(std::move(triples));
  CHECK(b.sizes() == torch::IntArrayRef{1, 3});
  CHECK(c.dtype() == torch::kDouble);
}

// ---- IDX files ---------------------------------------------------------------------------------------------------
namespace {
void write_gz(const std::filesystem::path& path, const std::vector<unsigned char>& bytes) {
  gzFile f = gzopen(path.string().c_str(), "wb");
  REQUIRE(f != nullptr);
  REQUIRE(gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size())) == static_cast<int>(bytes.size()));
  gzclose(f);
}

std::vector<unsigned char> idx_bytes(std::vector<std::uint32_t> dims, std::size_t data_bytes) {
  std::vector<unsigned char> bytes{0, 0, 0x08, static_cast<unsigned char>(dims.size())};
  for (auto d : dims) {
    for (int shift = 24; shift >= 0; shift -= 8) bytes.push_back(static_cast<unsigned char>(d >> shift));
  }
  for (std::size_t i = 0; i < data_bytes; ++i) bytes.push_back(static_cast<unsigned char>(i % 251));
  return bytes;
}
}  // namespace

TEST_CASE("IDX files are read gzipped or plain", "[data][idx]") {
  const auto dir = test::fresh_dir("idx");
  write_gz(dir / "ok.gz", idx_bytes({3, 2, 2}, 12));
  const auto t = data::read_idx(dir / "ok.gz");
  CHECK(t.sizes() == torch::IntArrayRef{3, 2, 2});
  CHECK(t.dtype() == torch::kUInt8);
  CHECK(t.flatten()[11].item<int>() == 11);
  const auto plain = idx_bytes({5}, 5);
  std::ofstream(dir / "plain", std::ios::binary).write(reinterpret_cast<const char*>(plain.data()), plain.size());
  CHECK(data::read_idx(dir / "plain").sizes() == torch::IntArrayRef{5});
}

TEST_CASE("bad IDX files are clear errors naming the file", "[data][idx][bad_input]") {
  const auto dir = test::fresh_dir("idx");
  CHECK_THROWS_WITH(data::read_idx(dir / "missing.gz"), Catch::Contains("missing.gz") && Catch::Contains("does not exist"));

  write_gz(dir / "truncated.gz", idx_bytes({10, 28, 28}, 100));
  CHECK_THROWS_WITH(data::read_idx(dir / "truncated.gz"),
                    Catch::Contains("truncated.gz") && Catch::Contains("truncated") && Catch::Contains("7840"));

  write_gz(dir / "header.gz", {0, 0, 8, 3, 0, 0});
  CHECK_THROWS_WITH(data::read_idx(dir / "header.gz"), Catch::Contains("truncated inside its header"));

  write_gz(dir / "text.gz", {'h', 'e', 'l', 'l', 'o', ' ', 'w', 'o', 'r', 'l', 'd'});
  CHECK_THROWS_WITH(data::read_idx(dir / "text.gz"), Catch::Contains("text.gz") && Catch::Contains("not an unsigned-byte IDX"));

  // A gzip stream cut in the middle.
  write_gz(dir / "whole.gz", idx_bytes({4096}, 4096));
  std::ifstream in(dir / "whole.gz", std::ios::binary);
  std::string gz((std::istreambuf_iterator<char>(in)), {});
  std::ofstream(dir / "cut.gz", std::ios::binary).write(gz.data(), static_cast<std::streamsize>(gz.size() / 2));
  CHECK_THROWS_AS(data::read_idx(dir / "cut.gz"), std::runtime_error);

  CHECK_THROWS_WITH(data::load_fashion_mnist(dir / "nowhere"), Catch::Contains("nowhere") && Catch::Contains("dataset-fashion-mnist"));
  std::filesystem::remove_all(dir);
}

TEST_CASE("Fashion-MNIST loads from the Debian package", "[data][fashion_mnist]") {
  const auto test_set = data::load_fashion_mnist(data::fashion_mnist_default_folder, data::Split::test);
  CHECK(test_set.size() == 10000);
  CHECK(test_set.inputs().sizes() == torch::IntArrayRef{10000, 1, 28, 28});
  CHECK(test_set.targets().dtype() == torch::kLong);
  CHECK(test_set.targets().min().item<std::int64_t>() == 0);
  CHECK(test_set.targets().max().item<std::int64_t>() == 9);
  CHECK(std::abs(test_set.inputs().mean().item<double>()) < 0.05);  // normalised
}
