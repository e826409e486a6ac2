#pragma once
// The three kinds of data train() and evaluate() accept, each adapted to one interface (size, examples, and
// optionally gather): (a) a torch::data dataset, (b) a pair of tensors or a TensorDataset, (c) any sized
// random-access range of examples (range-v3 concepts). An lvalue is referenced, an rvalue is kept by value.
#include <torch/data/datasets/base.h>
#include <torch/types.h>

#include <range/v3/range/access.hpp>
#include <range/v3/range/concepts.hpp>
#include <range/v3/range/primitives.hpp>
#include <range/v3/range/traits.hpp>

#include <cstdint>
#include <iterator>
#include <span>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../detail/compat.hpp"
#include "augmented_dataset.hpp"
#include "tensor_dataset.hpp"

namespace accelerated::data {

// A torch::data dataset: get_batch(indices) returns either std::vector<Example> (collated by the loader) or an
// already collated batch (e.g. a dataset mapped with torch::data::transforms::Stack<>).
template <class Dataset>
class TorchDatasetSource {
 public:
  explicit TorchDatasetSource(Dataset dataset) : dataset_(std::forward<Dataset>(dataset)) {}

  std::int64_t size() const {
    const auto size = compat::to_std_optional(dataset_.size());
    if (!size) {
      throw std::invalid_argument("accelerated::data: the torch::data dataset has no size(); the trainer needs "
                                  "a sized (map-style) dataset");
    }
    return *size;
  }

  auto examples(std::span<const std::int64_t> indices) {
    std::vector<std::size_t> request(indices.begin(), indices.end());
    return dataset_.get_batch(request);
  }

 private:
  Dataset dataset_;
};

template <class Range>
class RangeSource {
 public:
  explicit RangeSource(Range range) : range_(std::forward<Range>(range)) {}

  std::int64_t size() const { return static_cast<std::int64_t>(ranges::size(range_)); }

  auto examples(std::span<const std::int64_t> indices) const {
    using Example = ranges::range_value_t<std::remove_reference_t<Range>>;
    std::vector<Example> out;
    out.reserve(indices.size());
    const auto first = ranges::begin(range_);
    for (const auto i : indices) out.push_back(first[i]);
    return out;
  }

 private:
  Range range_;
};

template <class T>
concept torch_dataset = requires(T& ds, c10::ArrayRef<std::size_t> request) {
  ds.size();
  ds.get_batch(request);
};

template <class T>
concept example_range = ranges::random_access_range<T> && ranges::sized_range<T>;

// Adapts what the user passed; `argument` names it in error messages ("train_dataset", "eval_dataset").
template <class Data>
auto as_source(Data&& data, const char* argument) {
  using D = std::remove_cvref_t<Data>;
  auto check_not_empty = [argument](auto source) {
    if (source.size() == 0) {
      throw std::invalid_argument(std::string("accelerated: ") + argument + " is empty (0 examples)");
    }
    return source;
  };
  if constexpr (std::is_same_v<D, TensorDataset> || is_augmented_dataset_v<D>) {
    return check_not_empty(D(data));
  } else if constexpr (std::is_same_v<D, std::pair<torch::Tensor, torch::Tensor>>) {
    return check_not_empty(TensorDataset(data.first, data.second));
  } else if constexpr (torch_dataset<D>) {
    return check_not_empty(TorchDatasetSource<Data>(std::forward<Data>(data)));
  } else if constexpr (example_range<D>) {
    return check_not_empty(RangeSource<Data>(std::forward<Data>(data)));
  } else {
    static_assert(!sizeof(D*),
                  "accelerated: a dataset must be a torch::data dataset, a std::pair<torch::Tensor, torch::Tensor>, "
                  "an accelerated::data::TensorDataset (augmented or not), or a sized random-access range of examples");
  }
}

}  // namespace accelerated::data

namespace accelerated {

// Passed as the eval dataset of train() when there is none (the default).
struct NoEvalSet {};
inline constexpr NoEvalSet no_eval_set{};

namespace detail {
// The batch type a loader yields; `Otherwise` when there is no loader.
template <class Loader, class Otherwise>
struct loader_batch {
  using type = std::remove_cvref_t<decltype(*std::begin(std::declval<Loader&>()))>;
};
template <class Otherwise>
struct loader_batch<NoEvalSet, Otherwise> {
  using type = Otherwise;
};
}  // namespace detail

}  // namespace accelerated
