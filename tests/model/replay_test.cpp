// Routing record/replay and determinism of the model on the CPU.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <omp.h>

#include <cstring>

#include "engine/error.h"
#include "support/model_fixtures.h"

namespace fm {
namespace {

TEST(Replay, RecordThenReplayGivesIdenticalOutputs) {
  const ModelConfig c = testing::micro_config();
  auto backend = make_cpu_backend();
  MoeTransformer model(c, *backend);
  model.init_weights(1);
  const Batch batch = testing::random_batch(c, {9, 4, 12}, 2);
  const ForwardResult recorded = model.forward(batch, {.replay = nullptr, .training = false});
  ASSERT_EQ(recorded.routes.tokens(), batch.size());
  ASSERT_EQ(recorded.routes.n_moe_layers, c.n_moe_layers());
  const ForwardResult replayed =
      model.forward(batch, {.replay = &recorded.routes, .training = false});
  EXPECT_EQ(replayed.routes, recorded.routes);
  EXPECT_EQ(replayed.logp, recorded.logp);  // bit-identical
  EXPECT_EQ(replayed.entropy, recorded.entropy);
}

TEST(Replay, ReplayOverridesTheRoutersChoice) {
  const ModelConfig c = testing::micro_config();
  auto backend = make_cpu_backend();
  MoeTransformer model(c, *backend);
  model.init_weights(1);
  const Batch batch = testing::random_batch(c, {8}, 2);
  const ForwardResult free = model.forward(batch, {.replay = nullptr, .training = false});
  RoutingTrace forced = free.routes;
  for (int64_t n = 0; n < forced.tokens(); ++n)
    for (int64_t l = 0; l < forced.n_moe_layers; ++l)
      for (int64_t k = 0; k < forced.top_k; ++k) forced.at(n, l, k) = static_cast<uint16_t>(k);
  const ForwardResult r = model.forward(batch, {.replay = &forced, .training = false});
  EXPECT_EQ(r.routes, forced);
  EXPECT_NE(r.logp, free.logp);
  for (const LayerRouterStats& s : r.router) {
    EXPECT_EQ(s.load[0], batch.size());
    EXPECT_EQ(s.load[1], batch.size());
  }
}

TEST(Replay, MalformedTraceIsRejectedWithAClearMessage) {
  const ModelConfig c = testing::micro_config();
  auto backend = make_cpu_backend();
  MoeTransformer model(c, *backend);
  model.init_weights(1);
  const Batch batch = testing::random_batch(c, {6}, 2);
  RoutingTrace t = model.forward(batch, {.replay = nullptr, .training = false}).routes;
  RoutingTrace bad_id = t;
  bad_id.at(2, 0, 1) = static_cast<uint16_t>(c.n_experts);
  EXPECT_THAT([&] { model.forward(batch, {.replay = &bad_id, .training = false}); },
              ::testing::ThrowsMessage<Error>(::testing::HasSubstr("expert id")));
  RoutingTrace dup = t;
  dup.at(1, 1, 1) = dup.at(1, 1, 0);
  EXPECT_THAT([&] { model.forward(batch, {.replay = &dup, .training = false}); },
              ::testing::ThrowsMessage<Error>(::testing::HasSubstr("twice")));
  RoutingTrace short_trace = t;
  short_trace.seq_offsets.back() -= 1;
  short_trace.ids.resize(short_trace.ids.size() - static_cast<size_t>(c.n_moe_layers() * c.top_k));
  EXPECT_THAT([&] { model.forward(batch, {.replay = &short_trace, .training = false}); },
              ::testing::ThrowsMessage<Error>(::testing::HasSubstr("the batch needs")));
}

TEST(Model, BadBatchIsRejectedWithAClearMessage) {
  const ModelConfig c = testing::micro_config();
  auto backend = make_cpu_backend();
  MoeTransformer model(c, *backend);
  Batch b = testing::random_batch(c, {4}, 1);
  b.tokens[2] = static_cast<int32_t>(c.vocab_size);
  EXPECT_THAT([&] { model.forward(b); },
              ::testing::ThrowsMessage<Error>(::testing::HasSubstr("outside the vocabulary")));
  Batch long_seq = testing::random_batch(c, {c.max_seq_len + 1}, 1);
  EXPECT_THAT([&] { model.forward(long_seq); },
              ::testing::ThrowsMessage<Error>(::testing::HasSubstr("max_seq_len")));
}

// Loss bits of a few training steps (forward + backward + plain SGD-free AdamW-free
// gradient norm) under a given thread count.
std::vector<uint64_t> training_fingerprint(int threads) {
  omp_set_num_threads(threads);
  const ModelConfig c = testing::micro_config();
  auto backend = make_cpu_backend();
  MoeTransformer model(c, *backend);
  model.init_weights(21);
  std::vector<uint64_t> bits;
  for (int step = 0; step < 3; ++step) {
    const Batch batch = testing::random_batch(c, {17, 9, 30}, 100 + static_cast<uint64_t>(step));
    model.zero_grad();
    const double loss = model.lm_loss_and_backward(batch, {}, 1.0);
    const double gn = backend->sum_squares(model.grads().flat());
    uint64_t u;
    std::memcpy(&u, &loss, 8);
    bits.push_back(u);
    std::memcpy(&u, &gn, 8);
    bits.push_back(u);
    backend->axpy(model.params().flat(), -0.01, model.grads().flat());
  }
  omp_set_num_threads(omp_get_num_procs());
  return bits;
}

TEST(Determinism, SameSeedGivesIdenticalLossBits) {
  EXPECT_EQ(training_fingerprint(2), training_fingerprint(2));
}

TEST(Determinism, ThreadCountDoesNotChangeLossBits) {
  EXPECT_EQ(training_fingerprint(1), training_fingerprint(2));
  EXPECT_EQ(training_fingerprint(1), training_fingerprint(3));
}

}  // namespace
}  // namespace fm
