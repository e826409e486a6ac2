#pragma once
// Transforms compose with `|`, as range-v3 views do: random_crop(28, 2) | random_horizontal_flip() | normalize(m, s)
// is a Pipeline, a plain aggregate of the steps whose type says what runs; nothing is type-erased. Per example, the
// geometric steps compose their coordinates (no pixel is read), one pass reads each output pixel from the dataset
// into the batch (uint8 as value / 255, like torchvision's ToTensor), and the pixel steps then work in place.
#include <algorithm>
#include <array>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>

#include "../example_rng.hpp"
#include "example.hpp"

namespace accelerated::data::transforms {

template <class T>
concept geometric_transform = requires(const T& t, ExampleShape shape, Placement& placement, ExampleRng& rng) {
  { t.output_shape(shape) } -> std::same_as<ExampleShape>;
  t.place(placement, rng);
};

template <class T>
concept pixel_transform = requires(const T& t, ExampleShape shape, ExampleView view, ExampleRng& rng) {
  { t.output_shape(shape) } -> std::same_as<ExampleShape>;
  t.apply(view, rng);
};

template <class T>
concept transform = geometric_transform<T> || pixel_transform<T>;

template <transform... Steps>
struct Pipeline {
  std::tuple<Steps...> steps;

  // Geometry is fused into the one read of the source, so it has to come first.
  static constexpr bool geometry_first = [] {
    constexpr std::array<bool, sizeof...(Steps) + 1> geometric{geometric_transform<Steps>..., false};
    bool pixel_seen = false;
    for (std::size_t i = 0; i < sizeof...(Steps); ++i) {
      if (!geometric[i]) pixel_seen = true;
      if (geometric[i] && pixel_seen) return false;
    }
    return true;
  }();
  static_assert(geometry_first,
                "accelerated::data::transforms: a geometric transform (random_crop, random_horizontal_flip) follows "
                "a pixel transform (normalize, lambda) in this pipeline; put the geometric ones first (they are "
                "fused into the read of each example, and commute with per-channel pixel steps)");

  // The shape of an output example; throws std::invalid_argument naming the step that does not fit.
  ExampleShape output_shape(ExampleShape in) const {
    std::apply([&](const auto&... step) { ((in = step.output_shape(in)), ...); }, steps);
    return in;
  }

  // Writes example `index` (its pixels at `source`, of shape `in`) into `out` (output_shape(in) floats).
  template <class Pixel>
  void run(const Pixel* source, ExampleShape in, float* out, std::int64_t index, ExampleRng& rng) const {
    Placement placement{in};
    std::apply(
        [&](const auto&... step) {
          auto place = [&](const auto& s) {
            if constexpr (geometric_transform<std::remove_cvref_t<decltype(s)>>) s.place(placement, rng);
          };
          (place(step), ...);
        },
        steps);
    read(source, in, placement, out);
    const ExampleView view{out, placement.shape, index};
    std::apply(
        [&](const auto&... step) {
          auto apply = [&](const auto& s) {
            if constexpr (!geometric_transform<std::remove_cvref_t<decltype(s)>>) s.apply(view, rng);
          };
          (apply(step), ...);
        },
        steps);
  }

 private:
  static float value(float v) { return v; }
  static float value(std::uint8_t v) {
    static constexpr auto table = [] {
      std::array<float, 256> t{};
      for (int i = 0; i < 256; ++i) t[static_cast<std::size_t>(i)] = static_cast<float>(i) / 255.0f;
      return t;
    }();
    return table[v];
  }

  template <class Pixel>
  static void read(const Pixel* source, ExampleShape in, const Placement& p, float* out) {
    const auto h = p.shape.height, w = p.shape.width;
    // The output columns whose source column is inside the example; the others are padding.
    const auto x0 = p.col_step == 1 ? std::max<std::int64_t>(0, -p.col_offset)
                                    : std::max<std::int64_t>(0, p.col_offset - in.width + 1);
    const auto x1 = p.col_step == 1 ? std::min<std::int64_t>(w, in.width - p.col_offset)
                                    : std::min<std::int64_t>(w, p.col_offset + 1);
    for (std::int64_t c = 0; c < p.shape.channels; ++c) {
      for (std::int64_t y = 0; y < h; ++y) {
        float* row = out + (c * h + y) * w;
        const auto sy = y + p.row_offset;
        if (sy < 0 || sy >= in.height || x0 >= x1) {
          std::fill(row, row + w, 0.0f);
          continue;
        }
        const Pixel* src = source + (c * in.height + sy) * in.width;
        const auto offset = p.col_offset;
        std::fill(row, row + x0, 0.0f);
        if (p.col_step == 1) {
          for (auto x = x0; x < x1; ++x) row[x] = value(src[offset + x]);
        } else {
          for (auto x = x0; x < x1; ++x) row[x] = value(src[offset - x]);
        }
        std::fill(row + x1, row + w, 0.0f);
      }
    }
  }
};

template <transform T>
Pipeline<T> as_pipeline(T step) {
  return {{std::move(step)}};
}
template <class... Steps>
Pipeline<Steps...> as_pipeline(Pipeline<Steps...> pipeline) {
  return pipeline;
}

template <class A, class B>
  requires(transform<A> || requires { std::remove_cvref_t<A>::geometry_first; }) &&
          (transform<B> || requires { std::remove_cvref_t<B>::geometry_first; })
auto operator|(A a, B b) {
  return std::apply(
      [](auto&&... steps) { return Pipeline<std::remove_cvref_t<decltype(steps)>...>{{std::move(steps)...}}; },
      std::tuple_cat(std::move(as_pipeline(std::move(a)).steps), std::move(as_pipeline(std::move(b)).steps)));
}

}  // namespace accelerated::data::transforms
