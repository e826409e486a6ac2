#pragma once
// Collation: turning a vector of examples into one batch. The default stacks tensors field by field and keeps the
// example's shape (Example -> Example, pair -> pair, tuple -> tuple); numbers become a 1-d tensor. A user's collate
// function is any callable taking std::vector<Example>&& and returning the batch.
#include <torch/data/example.h>
#include <torch/types.h>

#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace accelerated::data {

struct DefaultCollate {
  template <class Example>
  auto operator()(std::vector<Example>&& examples) const {
    return collate(examples, [](const Example& e) -> const Example& { return e; });
  }

 private:
  // Collates the field `get(example)` of every example.
  template <class Example, class Get>
  static auto collate(const std::vector<Example>& examples, Get get) {
    using Field = std::remove_cvref_t<decltype(get(examples.front()))>;
    if constexpr (std::is_same_v<Field, torch::Tensor>) {
      std::vector<torch::Tensor> parts;
      parts.reserve(examples.size());
      for (const auto& e : examples) parts.push_back(get(e));
      return torch::stack(parts);
    } else if constexpr (std::is_arithmetic_v<Field>) {
      using Stored = std::conditional_t<std::is_floating_point_v<Field>, Field, std::int64_t>;
      std::vector<Stored> values;
      values.reserve(examples.size());
      for (const auto& e : examples) values.push_back(static_cast<Stored>(get(e)));
      return torch::tensor(values, torch::TensorOptions().dtype(torch::CppTypeToScalarType<Stored>::value));
    } else if constexpr (std::is_same_v<Field, torch::data::example::NoTarget>) {
      return torch::data::example::NoTarget{};
    } else if constexpr (requires(const Field& f) { f.data; f.target; }) {
      auto data = collate(examples, [&](const Example& e) -> const auto& { return get(e).data; });
      auto target = collate(examples, [&](const Example& e) -> const auto& { return get(e).target; });
      return torch::data::Example<decltype(data), decltype(target)>{std::move(data), std::move(target)};
    } else if constexpr (requires { std::tuple_size<Field>::value; }) {
      auto parts = [&]<std::size_t... I>(std::index_sequence<I...>) {
        return std::tuple{collate(examples, [&](const Example& e) -> const auto& { return std::get<I>(get(e)); })...};
      }(std::make_index_sequence<std::tuple_size_v<Field>>{});
      if constexpr (std::tuple_size_v<Field> == 2 && requires(const Field& f) { f.first; f.second; }) {
        return std::pair{std::move(std::get<0>(parts)), std::move(std::get<1>(parts))};  // a pair stays a pair
      } else {
        return parts;
      }
    } else {
      static_assert(!sizeof(Field*),
                    "accelerated::data::DefaultCollate cannot stack this example type: pass a collate function "
                    "(std::vector<Example>&& -> Batch) to train()/evaluate()");
    }
  }
};

}  // namespace accelerated::data
