// The LM head in row chunks (ForwardOptions::lm_head_rows): the forward keeps no [N, V]
// logits and the backward recomputes them chunk by chunk; log-probs, entropies, the loss and
// every gradient equal the whole-batch head's (f64), whatever the chunk size.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>

#include "engine/error.h"
#include "support/model_fixtures.h"

namespace fm {
namespace {

using ::testing::HasSubstr;
using ::testing::ThrowsMessage;

struct HeadRun {
  std::vector<double> logp, entropy, grads;
  double loss = 0.0;
  int64_t chunk_rows = 0;
};

// Forward, then backward of sum_n a_n logp_n + b_n entropy_n + 0.5 balance, on a fresh f64
// model of seed 5, with LM-head chunks of `rows`.
HeadRun run_head(int64_t rows) {
  auto backend = make_cpu_backend();
  MoeTransformer model(testing::micro_config(), *backend, DType::f64);
  model.init_weights(5);
  const Batch batch = testing::random_batch(model.config(), {9, 4, 12}, 11);
  const ForwardResult& r = model.forward(batch, {.lm_head_rows = rows});
  HeadRun out;
  out.logp = r.logp;
  out.entropy = r.entropy;
  out.chunk_rows = model.lm_head_chunk_rows();
  std::vector<double> dlogp(r.logp.size()), dent(r.logp.size());
  for (size_t n = 0; n < dlogp.size(); ++n) {
    dlogp[n] = 0.1 + 0.05 * static_cast<double>(n % 7);
    dent[n] = -0.02 * static_cast<double>(n % 3);
  }
  model.zero_grad();
  model.backward(dlogp, dent, 0.5);
  const Tensor& g = model.grads().flat();
  out.grads.assign(g.data<double>(), g.data<double>() + g.numel());
  out.loss = model.lm_loss_and_backward(batch, {.lm_head_rows = rows});
  return out;
}

void expect_close(const std::vector<double>& a, const std::vector<double>& b, const char* what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  double scale = 0.0;
  for (double v : a) scale = std::max(scale, std::fabs(v));
  for (size_t i = 0; i < a.size(); ++i)
    ASSERT_NEAR(a[i], b[i], 1e-13 * (1.0 + scale)) << what << " entry " << i;
}

TEST(LmHeadChunks, EveryChunkSizeGivesTheWholeHeadsLogProbsLossAndGradients) {
  const HeadRun whole = run_head(kLmHeadWhole);
  EXPECT_EQ(whole.chunk_rows, 25);
  for (int64_t rows : {1, 4, 7, 24, 25, 100}) {
    SCOPED_TRACE(::testing::Message() << "rows " << rows);
    const HeadRun chunked = run_head(rows);
    EXPECT_EQ(chunked.chunk_rows, std::min<int64_t>(rows, 25));
    // Each row's logits come from the same GEMM row; only the head's weight gradient sums
    // the chunks in another order.
    expect_close(chunked.logp, whole.logp, "logp");
    expect_close(chunked.entropy, whole.entropy, "entropy");
    expect_close(chunked.grads, whole.grads, "gradients");
    EXPECT_NEAR(chunked.loss, whole.loss, 1e-13);
  }
}

TEST(LmHeadChunks, LogitsAreKeptOnlyForAOneChunkForward) {
  auto backend = make_cpu_backend();
  MoeTransformer model(testing::micro_config(), *backend);
  model.init_weights(2);
  const Batch batch = testing::random_batch(model.config(), {10, 6}, 3);
  model.forward(batch, {.training = false, .lm_head_rows = 4});
  EXPECT_EQ(model.lm_head_chunk_rows(), 4);
  EXPECT_THAT([&] { model.logits(); }, ThrowsMessage<Error>(HasSubstr("lm_head_rows")));
  const std::vector<double> chunked = model.forward_result().logp;
  model.forward(batch, {.training = false});  // automatic: 16 rows x 32 fit in one chunk
  EXPECT_EQ(model.lm_head_chunk_rows(), 16);
  EXPECT_EQ(model.logits().shape(), (Shape{16, 32}));
  const std::vector<double> whole = model.forward_result().logp;
  for (size_t n = 0; n < whole.size(); ++n) EXPECT_NEAR(chunked[n], whole[n], 1e-6) << n;
  EXPECT_THAT([&] { model.forward(batch, {.lm_head_rows = -2}); },
              ThrowsMessage<Error>(HasSubstr("lm_head_rows -2 is invalid")));
}

TEST(LmHeadChunks, AutomaticChunksHoldAtMostTheBudgetOfLogits) {
  // 152k vocabulary in f32: 608 KiB a row, so 441 rows fit in 256 MiB.
  EXPECT_EQ(lm_head_rows_for(kLmHeadAuto, 16384, 151936, DType::f32), 441);
  EXPECT_EQ(lm_head_rows_for(kLmHeadAuto, 16384, 151936, DType::f64), 220);
  EXPECT_EQ(lm_head_rows_for(kLmHeadAuto, 100, 151936, DType::f32), 100);  // the whole batch
  EXPECT_EQ(lm_head_rows_for(kLmHeadAuto, 8, int64_t{1} << 40, DType::f32), 1);
  EXPECT_EQ(lm_head_rows_for(kLmHeadWhole, 16384, 151936, DType::f32), 16384);
  EXPECT_EQ(lm_head_rows_for(64, 16384, 151936, DType::f32), 64);
  EXPECT_EQ(lm_head_rows_for(64, 10, 151936, DType::f32), 10);
}

}  // namespace
}  // namespace fm
