#include "model/value_loss.h"

#include <algorithm>
#include <cmath>

#include "engine/error.h"

namespace fm {

ValueLossTerms clipped_value_loss(const std::vector<double>& values,
                                  const std::vector<double>& returns,
                                  const std::vector<uint8_t>& mask,
                                  const std::vector<double>& old_values, double cliprange_value) {
  const size_t N = values.size();
  FM_CHECK(returns.size() == N && mask.size() == N && old_values.size() == N,
           "value loss: {} values but {} returns, {} mask entries and {} old values", N,
           returns.size(), mask.size(), old_values.size());
  FM_CHECK(std::isfinite(cliprange_value) && cliprange_value >= 0.0,
           "value loss: cliprange_value must be finite and >= 0 (got {})", cliprange_value);
  int64_t n_mask = 0;
  for (uint8_t m : mask) n_mask += m != 0;
  FM_CHECK(n_mask > 0, "value loss: the mask selects no tokens");

  const double inv = 1.0 / static_cast<double>(n_mask);
  ValueLossTerms t;
  t.dvalues.assign(N, 0.0);
  double sum = 0.0, clipped = 0.0;
  for (size_t n = 0; n < N; ++n) {
    if (mask[n] == 0) continue;
    const double v = values[n], r = returns[n];
    const double vc =
        std::clamp(v, old_values[n] - cliprange_value, old_values[n] + cliprange_value);
    const double l1 = (v - r) * (v - r), l2 = (vc - r) * (vc - r);
    sum += std::max(l1, l2);
    clipped += l2 > l1;
    // d/dv 0.5 * (v - R)^2 / n_mask; the clipped branch wins only with vc constant.
    if (l1 >= l2) t.dvalues[n] = (v - r) * inv;
  }
  t.loss = 0.5 * sum * inv;
  t.clipfrac = clipped * inv;
  return t;
}

double value_loss_and_backward(MoeTransformer& model, const Batch& batch,
                               const ForwardOptions& options, const std::vector<double>& returns,
                               const std::vector<uint8_t>& mask,
                               const std::vector<double>& old_values, double cliprange_value,
                               double scale) {
  FM_CHECK(model.config().value_head(),
           "value loss: the model '{}' has head: {}, a critic needs head: value",
           model.config().name, model.config().head);
  const ForwardResult& r = model.forward(batch, options);
  ValueLossTerms t = clipped_value_loss(r.values, returns, mask, old_values, cliprange_value);
  const double loss = t.loss + r.balance_loss;
  for (double& d : t.dvalues) d *= scale;
  model.backward_values(t.dvalues, scale);
  return loss;
}

}  // namespace fm
