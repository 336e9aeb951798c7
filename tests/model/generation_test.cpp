// KV-cached forward and batched generation: the cache reproduces the full
// forward, the recorded trace equals a record-mode forward of the whole
// sequence, and generation is reproducible and independent of batching.
#include "model/generation.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>

#include "engine/error.h"
#include "support/model_fixtures.h"

namespace fm {
namespace {

// Max |a - b| / max(1, |b|) over two equal-length vectors; infinity on any NaN.
double max_rel_diff(const std::vector<double>& a, const std::vector<double>& b) {
  EXPECT_EQ(a.size(), b.size());
  double m = 0.0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    const double d = std::abs(a[i] - b[i]) / std::max(1.0, std::abs(b[i]));
    m = std::isnan(d) ? INFINITY : std::max(m, d);
  }
  return m;
}

std::vector<int32_t> random_tokens(const ModelConfig& c, int64_t n, uint64_t seed) {
  Rng rng(seed, 5);
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (int32_t& x : t)
    x = static_cast<int32_t>(rng.next_below(static_cast<uint64_t>(c.vocab_size)));
  return t;
}

// Logits of every position of `batch` from a full forward, as host rows.
std::vector<double> full_logits(MoeTransformer& model, const Batch& batch) {
  model.forward(batch, {.replay = nullptr, .training = false});
  return model.backend().download_f64(model.logits());
}

class CachedForward : public ::testing::TestWithParam<DType> {};

// Two sequences: one prefilled in chunks (5 tokens, then 3, then one at a time), the
// other one token at a time, both interleaved in the same steps. Every position's
// logits and routes must match the full forward. f64: the same arithmetic up to GEMM
// blocking (1e-12); f32: ~1e-5 relative.
TEST_P(CachedForward, LogitsAndRoutesMatchTheFullForwardAtEveryPosition) {
  const ModelConfig c = testing::micro_config();
  auto backend = make_cpu_backend();
  MoeTransformer model(c, *backend, GetParam());
  model.init_weights(3);
  const Batch batch = testing::random_batch(c, {14, 9}, 4);
  const std::vector<double> ref = full_logits(model, batch);
  const RoutingTrace ref_routes = model.forward_result().routes;
  const int64_t V = c.vocab_size, per_token = c.n_moe_layers() * c.top_k;

  KvCache cache(c, *backend, GetParam(), /*slots=*/3, /*max_len=*/20);
  std::vector<double> got(ref.size(), NAN);
  std::vector<uint16_t> routes(ref_routes.ids.size(), 0xffff);
  // Sequence 0 in slot 2, sequence 1 in slot 0 (slots need not match sequence order).
  const int32_t slot_of[2] = {2, 0};
  const std::vector<std::vector<int64_t>> chunks0 = {{0, 5}, {5, 8}}, chunks1 = {};
  int64_t fed[2] = {0, 0};
  const int64_t len[2] = {14, 9};
  for (int step = 0; fed[0] < len[0] || fed[1] < len[1]; ++step) {
    CachedInput in;
    std::vector<int64_t> global_row;  // row of `batch` for each input row
    for (int s = 0; s < 2; ++s) {
      if (fed[s] >= len[s]) continue;
      int64_t take = 1;
      if (s == 0 && step == 0) take = 5;
      if (s == 0 && step == 1) take = 3;
      for (int64_t n = fed[s]; n < fed[s] + take; ++n) {
        in.tokens.push_back(batch.tokens[batch.seq_offsets[s] + n]);
        in.slot.push_back(slot_of[s]);
        in.pos.push_back(static_cast<int32_t>(n));
        in.logit_rows.push_back(static_cast<int32_t>(in.tokens.size() - 1));
        global_row.push_back(batch.seq_offsets[s] + n);
      }
      fed[s] += take;
    }
    CachedOutput out;
    model.forward_cached(in, cache, out);
    const std::vector<double> logits = backend->download_f64(out.logits);
    for (size_t r = 0; r < global_row.size(); ++r) {
      std::copy_n(logits.begin() + static_cast<int64_t>(r) * V, V, got.begin() + global_row[r] * V);
      std::copy_n(out.routes.begin() + static_cast<int64_t>(r) * per_token, per_token,
                  routes.begin() + global_row[r] * per_token);
    }
  }
  EXPECT_LT(max_rel_diff(got, ref), GetParam() == DType::f64 ? 1e-12 : 2e-5);
  EXPECT_EQ(routes, ref_routes.ids);
}

INSTANTIATE_TEST_SUITE_P(Dtypes, CachedForward, ::testing::Values(DType::f64, DType::f32),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

TEST(CachedForward, RejectsBadInput) {
  const ModelConfig c = testing::micro_config();
  auto backend = make_cpu_backend();
  MoeTransformer model(c, *backend);
  model.init_weights(1);
  KvCache cache(c, *backend, DType::f32, 2, 8);
  CachedOutput out;
  auto run = [&](CachedInput in) { model.forward_cached(in, cache, out); };
  using ::testing::HasSubstr;
  EXPECT_THAT(
      [&] {
        run({{1}, {2}, {0}, {}});
      },
      ::testing::ThrowsMessage<Error>(HasSubstr("outside the cache's 2 slots")));
  EXPECT_THAT(
      [&] {
        run({{1}, {0}, {8}, {}});
      },
      ::testing::ThrowsMessage<Error>(HasSubstr("outside the cache length 8")));
  EXPECT_THAT(
      [&] {
        run({{99}, {0}, {0}, {}});
      },
      ::testing::ThrowsMessage<Error>(HasSubstr("outside the vocabulary")));
  EXPECT_THAT(
      [&] {
        run({{1, 2}, {0, 0}, {3, 3}, {}});
      },
      ::testing::ThrowsMessage<Error>(HasSubstr("appears twice")));
  EXPECT_THAT(
      [&] {
        run({{1}, {0}, {0}, {1}});
      },
      ::testing::ThrowsMessage<Error>(HasSubstr("logit row 1")));
  EXPECT_THROW(KvCache(c, *backend, DType::f32, 1, c.max_seq_len + 1), Error);
}

std::vector<std::vector<int32_t>> ragged_prompts(const ModelConfig& c) {
  return {random_tokens(c, 3, 1), random_tokens(c, 7, 2), random_tokens(c, 1, 3),
          random_tokens(c, 5, 4), random_tokens(c, 11, 5)};
}

// Every generated sequence's trace equals a record-mode forward of prompt + response,
// and its model log-probs equal the full forward's log-probs of the response tokens.
TEST(Generation, TraceAndLogprobsEqualAFullForwardOfTheSequence) {
  const ModelConfig c = testing::micro_config();
  auto backend = make_cpu_backend();
  MoeTransformer model(c, *backend, DType::f64);
  model.init_weights(7);
  GenerationConfig g;
  g.max_new_tokens = 12;
  g.batch_slots = 3;  // fewer slots than prompts: slots are reused
  g.seed = 11;
  g.stop_tokens = {0};
  const auto prompts = ragged_prompts(c);
  const std::vector<GeneratedSequence> seqs = generate(model, prompts, g);
  ASSERT_EQ(seqs.size(), prompts.size());
  for (size_t i = 0; i < seqs.size(); ++i) {
    const GeneratedSequence& s = seqs[i];
    EXPECT_EQ(s.prompt, prompts[i]);
    ASSERT_FALSE(s.response.empty());
    ASSERT_EQ(s.logp.size(), s.response.size());
    Batch b;
    b.tokens = s.prompt;
    b.tokens.insert(b.tokens.end(), s.response.begin(), s.response.end());
    const int64_t n = static_cast<int64_t>(b.tokens.size());
    b.targets.assign(static_cast<size_t>(n), -1);
    for (int64_t t = 0; t + 1 < n; ++t) b.targets[t] = b.tokens[t + 1];
    b.seq_offsets = {0, n};
    const ForwardResult& r = model.forward(b, {.replay = nullptr, .training = false});
    EXPECT_EQ(s.routes, r.routes) << "sequence " << i;
    const int64_t p = static_cast<int64_t>(s.prompt.size());
    const std::vector<double> want(r.logp.begin() + p - 1, r.logp.end() - 1);
    EXPECT_LT(max_rel_diff(s.model_logp, want), 1e-12) << "sequence " << i;
    // Temperature 1, no truncation: the sampling distribution is the model's.
    EXPECT_LT(max_rel_diff(s.logp, s.model_logp), 1e-12);
  }
}

TEST(Generation, StopsOnStopTokenOrAtMaxNewTokens) {
  const ModelConfig c = testing::micro_config();
  auto backend = make_cpu_backend();
  MoeTransformer model(c, *backend);
  model.init_weights(7);
  GenerationConfig g;
  g.max_new_tokens = 6;
  g.seed = 3;
  // Stop on a few common tokens so some sequences stop early and some run to the limit.
  g.stop_tokens = {1, 2, 3, 4, 5, 6};
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < 24; ++i) prompts.push_back(random_tokens(c, 1 + i % 6, 100 + i));
  const auto seqs = generate(model, prompts, g);
  int stopped = 0, at_limit = 0;
  for (const GeneratedSequence& s : seqs) {
    const bool ends_on_stop = s.response.back() >= 1 && s.response.back() <= 6;
    EXPECT_EQ(s.stopped, ends_on_stop);
    for (size_t t = 0; t + 1 < s.response.size(); ++t)
      EXPECT_FALSE(s.response[t] >= 1 && s.response[t] <= 6) << "generation ran past a stop token";
    if (s.stopped)
      ++stopped;
    else {
      EXPECT_EQ(s.response.size(), 6u);
      ++at_limit;
    }
    EXPECT_EQ(s.routes.tokens(), static_cast<int64_t>(s.prompt.size() + s.response.size()));
  }
  EXPECT_GT(stopped, 0);
  EXPECT_GT(at_limit, 0);
}

TEST(Generation, ResponsesEndAtMaxSeqLen) {
  ModelConfig c = testing::micro_config();
  auto backend = make_cpu_backend();
  MoeTransformer model(c, *backend);
  model.init_weights(7);
  GenerationConfig g;
  g.max_new_tokens = 100;
  const auto seqs = generate(model, {random_tokens(c, c.max_seq_len - 3, 1)}, g);
  EXPECT_EQ(seqs[0].response.size(), 3u);
  EXPECT_EQ(seqs[0].routes.tokens(), c.max_seq_len);
}

// Same seed: same sequences, whatever the number of slots (each sequence has its own
// random stream). A different seed changes them.
TEST(Generation, ReproducibleAndIndependentOfBatching) {
  const ModelConfig c = testing::micro_config();
  auto backend = make_cpu_backend();
  MoeTransformer model(c, *backend, DType::f64);
  model.init_weights(9);
  GenerationConfig g;
  g.max_new_tokens = 10;
  g.seed = 5;
  g.sampling.temperature = 0.8;
  g.sampling.top_p = 0.9;
  const auto prompts = ragged_prompts(c);
  g.batch_slots = 64;
  const auto a = generate(model, prompts, g);
  const auto a2 = generate(model, prompts, g);
  g.batch_slots = 2;
  const auto b = generate(model, prompts, g);
  g.seed = 6;
  const auto d = generate(model, prompts, g);
  bool any_different = false;
  for (size_t i = 0; i < prompts.size(); ++i) {
    EXPECT_EQ(a[i].response, a2[i].response);
    EXPECT_EQ(a[i].logp, a2[i].logp);
    EXPECT_EQ(a[i].response, b[i].response);
    EXPECT_EQ(a[i].routes, b[i].routes);
    any_different |= a[i].response != d[i].response;
  }
  EXPECT_TRUE(any_different);
}

TEST(Generation, GreedyPicksTheArgmax) {
  const ModelConfig c = testing::micro_config();
  auto backend = make_cpu_backend();
  MoeTransformer model(c, *backend, DType::f64);
  model.init_weights(9);
  GenerationConfig g;
  g.max_new_tokens = 5;
  g.sampling.temperature = 0.0;
  const auto s = generate(model, {random_tokens(c, 4, 8)}, g)[0];
  std::vector<int32_t> seq = s.prompt;
  for (size_t t = 0; t < s.response.size(); ++t) {
    Batch b;
    b.tokens = seq;
    b.targets.assign(seq.size(), -1);
    b.seq_offsets = {0, static_cast<int64_t>(seq.size())};
    const std::vector<double> logits = full_logits(model, b);
    const auto last = logits.end() - c.vocab_size;
    EXPECT_EQ(s.response[t], std::max_element(last, logits.end()) - last);
    EXPECT_EQ(s.logp[t], 0.0);  // a point mass
    seq.push_back(s.response[t]);
  }
}

TEST(Generation, RejectsBadPrompts) {
  const ModelConfig c = testing::micro_config();
  auto backend = make_cpu_backend();
  MoeTransformer model(c, *backend);
  model.init_weights(1);
  GenerationConfig g;
  using ::testing::HasSubstr;
  EXPECT_THAT(
      [&] {
        generate(model, {{1, 2}, {}}, g);
      },
      ::testing::ThrowsMessage<Error>(HasSubstr("prompt 1 is empty")));
  EXPECT_THAT(
      [&] {
        generate(model, {{1, 40}}, g);
      },
      ::testing::ThrowsMessage<Error>(HasSubstr("prompt 0 token 1 = 40")));
  EXPECT_THAT([&] { generate(model, {random_tokens(c, c.max_seq_len, 1)}, g); },
              ::testing::ThrowsMessage<Error>(HasSubstr("no room below max_seq_len")));
  g.stop_tokens = {32};
  EXPECT_THAT([&] { generate(model, {{1}}, g); },
              ::testing::ThrowsMessage<Error>(HasSubstr("stop token 32")));
}

TEST(Generation, PackTracesConcatenatesSequences) {
  const ModelConfig c = testing::micro_config();
  auto backend = make_cpu_backend();
  MoeTransformer model(c, *backend);
  model.init_weights(1);
  GenerationConfig g;
  g.max_new_tokens = 4;
  const auto seqs = generate(model, ragged_prompts(c), g);
  const RoutingTrace t = pack_traces(seqs);
  validate_trace(t);
  ASSERT_EQ(t.seq_offsets.size(), seqs.size() + 1);
  for (size_t i = 0; i < seqs.size(); ++i) {
    const int64_t begin = t.seq_offsets[i];
    for (int64_t n = 0; n < seqs[i].routes.tokens(); ++n)
      for (int64_t l = 0; l < t.n_moe_layers; ++l)
        for (int64_t k = 0; k < t.top_k; ++k)
          ASSERT_EQ(t.at(begin + n, l, k), seqs[i].routes.at(n, l, k));
  }
}

}  // namespace
}  // namespace fm
