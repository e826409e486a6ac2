// Must not compile: a geometric transform (random_crop) after a pixel transform (normalize). Geometry is fused into
// the one read of each example, so it has to come first; the pipeline says so.
#include <accelerated/accelerated.hpp>

int main() {
  namespace tf = accelerated::data::transforms;
  auto pipeline = tf::normalize(0.5f, 0.25f) | tf::random_crop(28, 2);
  (void)pipeline;
}
