// The PPO critic's clipped value loss (veRL's compute_value_loss, token-mean):
//   vc[n]  = clip(v[n], old[n] - c, old[n] + c)
//   loss   = 0.5 * mean_{mask} max((v - R)^2, (vc - R)^2)
// on the values of a value model (head: value), with its exact gradient.
#pragma once

#include <cstdint>
#include <vector>

#include "model/moe_transformer.h"

namespace fm {

struct ValueLossTerms {
  double loss = 0.0;            // 0.5 * masked token-mean of the clipped squared error
  std::vector<double> dvalues;  // [N] d loss / d v (0 where masked or where the clipped term wins)
  double clipfrac = 0.0;        // masked fraction of tokens where the clipped term is larger
};

// The loss on host values. Where the clipped term wins v is outside the clip range (vc is a
// constant there), so its gradient is 0; on a tie the unclipped term's gradient is taken.
// Throws on mismatched sizes, an empty mask or a negative cliprange_value.
ValueLossTerms clipped_value_loss(const std::vector<double>& values,
                                  const std::vector<double>& returns,
                                  const std::vector<uint8_t>& mask,
                                  const std::vector<double>& old_values, double cliprange_value);

// Forward of the value model on `batch`, the clipped value loss against `returns`, and its
// backward times `scale` (with balance_scale = scale, as lm_loss_and_backward); gradients
// accumulate. Returns the unscaled value loss plus the forward's balance loss (the objective
// whose gradient was taken; forward_result().balance_loss gives the latter alone).
double value_loss_and_backward(MoeTransformer& model, const Batch& batch,
                               const ForwardOptions& options, const std::vector<double>& returns,
                               const std::vector<uint8_t>& mask,
                               const std::vector<double>& old_values, double cliprange_value,
                               double scale);

}  // namespace fm
