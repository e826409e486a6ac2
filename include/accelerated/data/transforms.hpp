#pragma once
// Per-example transforms: random_crop, random_horizontal_flip, normalize, lambda, composed with `|` into a Pipeline
// and applied by data::augment (augmented_dataset.hpp).
#include "transforms/example.hpp"
#include "transforms/horizontal_flip.hpp"
#include "transforms/lambda.hpp"
#include "transforms/normalize.hpp"
#include "transforms/pipeline.hpp"
#include "transforms/random_crop.hpp"
