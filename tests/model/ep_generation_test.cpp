// Generation under expert parallelism: W ranks (threads with the in-process communicator),
// each generating its own share of the prompts on its E/W home experts, in lockstep,
// against the single-rank run of all prompts.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <string>
#include <tuple>

#include "engine/comm.h"
#include "engine/error.h"
#include "model/generation.h"
#include "support/model_fixtures.h"

namespace fm {
namespace {

using std::chrono::milliseconds;
// Generous for 2 shared cores, short enough that a hang fails the test quickly.
constexpr milliseconds kTimeout{20000};

// fp32: the expert-parallel layer sums the same terms as one rank, its GEMMs see other row
// counts (~1e-7 relative per layer, see expert_parallel_test.cpp); log-probs over a
// 32-token vocabulary through 3 layers and up to 20 positions stay well within 1e-4.
constexpr double kLogpTol = 1e-4;

// micro_config with 8 experts, so that W = 4 leaves 2 home experts per rank.
ModelConfig ep_config() {
  ModelConfig c = testing::micro_config();
  c.n_experts = 8;
  return c;
}

using Prompts = std::vector<std::vector<int32_t>>;

// 13 prompts of lengths 1..7 (every length appears).
Prompts make_prompts(const ModelConfig& c, uint64_t seed) {
  Rng rng(seed, 9);
  Prompts p;
  for (int i = 0; i < 13; ++i) {
    std::vector<int32_t> t(static_cast<size_t>(1 + (i * 5) % 7));
    for (int32_t& x : t)
      x = static_cast<int32_t>(rng.next_below(static_cast<uint64_t>(c.vocab_size)));
    p.push_back(t);
  }
  return p;
}

// Rank r generates the global prompts [shares[r].first, shares[r].second).
using Shares = std::vector<std::pair<size_t, size_t>>;

struct RankRun {
  std::vector<GeneratedSequence> seqs;
  GenerationStats stats;
  bool ran = false;
};

std::vector<GeneratedSequence> single_rank(const ModelConfig& c, const Prompts& prompts,
                                           const GenerationConfig& g,
                                           GenerationStats* stats = nullptr) {
  auto backend = make_cpu_backend();
  MoeTransformer model(c, *backend);
  model.init_weights(7);
  return generate(model, prompts, g, stats);
}

// Every rank its share; first_stream = the share's first global index unless told otherwise.
std::vector<RankRun> ep_run(const ModelConfig& c, const Prompts& prompts, const Shares& shares,
                            const GenerationConfig& g, bool set_first_stream = true) {
  const int W = static_cast<int>(shares.size());
  std::vector<RankRun> out(static_cast<size_t>(W));
  run_inprocess(W, kTimeout, [&](int rank, Communicator& comm) {
    auto backend = make_cpu_backend();
    MoeTransformer model(c, *backend, DType::f32, ExpertParallel{&comm});
    model.init_weights(7);
    const auto [first, last] = shares[rank];
    GenerationConfig mine = g;
    mine.first_stream = set_first_stream ? first : 0;
    const Prompts part(prompts.begin() + static_cast<int64_t>(first),
                       prompts.begin() + static_cast<int64_t>(last));
    RankRun& r = out[rank];
    r.seqs = generate(model, part, mine, &r.stats);
    r.ran = true;
  });
  return out;
}

// The ranks' sequences in rank order.
std::vector<GeneratedSequence> concat(const std::vector<RankRun>& runs) {
  std::vector<GeneratedSequence> all;
  for (const RankRun& r : runs) {
    EXPECT_TRUE(r.ran);
    all.insert(all.end(), r.seqs.begin(), r.seqs.end());
  }
  return all;
}

// Same tokens, stops and routing traces; log-probs within kLogpTol.
void expect_same_sequences(const std::vector<GeneratedSequence>& got,
                           const std::vector<GeneratedSequence>& want) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(got[i].prompt, want[i].prompt) << "sequence " << i;
    EXPECT_EQ(got[i].response, want[i].response) << "sequence " << i;
    EXPECT_EQ(got[i].stopped, want[i].stopped) << "sequence " << i;
    EXPECT_EQ(got[i].routes, want[i].routes) << "sequence " << i;
    ASSERT_EQ(got[i].logp.size(), want[i].logp.size());
    for (size_t t = 0; t < want[i].logp.size(); ++t) {
      EXPECT_NEAR(got[i].logp[t], want[i].logp[t], kLogpTol) << "sequence " << i << " @" << t;
      EXPECT_NEAR(got[i].model_logp[t], want[i].model_logp[t], kLogpTol)
          << "sequence " << i << " @" << t;
    }
  }
}

// Greedy, 13 prompts, 2 KV slots per rank (fewer than any rank's share): continuous
// batching on every rank, each step's MoE layers exchanging tokens with every rank.
TEST(EpGeneration, GreedyMatchesSingleRankWithContinuousBatching) {
  const ModelConfig c = ep_config();
  const Prompts prompts = make_prompts(c, 1);
  GenerationConfig g;
  g.sampling.temperature = 0.0;
  g.max_new_tokens = 8;
  g.batch_slots = 2;
  GenerationStats want_stats;
  const auto want = single_rank(c, prompts, g, &want_stats);
  for (const Shares& shares :
       {Shares{{0, 7}, {7, 13}}, Shares{{0, 4}, {4, 7}, {7, 10}, {10, 13}}}) {
    SCOPED_TRACE("W = " + std::to_string(shares.size()));
    const std::vector<RankRun> runs = ep_run(c, prompts, shares, g);
    expect_same_sequences(concat(runs), want);
    // Each rank counts its own tokens; the ranks' counts add up to the single rank's.
    int64_t prefill = 0, decode = 0;
    for (const RankRun& r : runs) {
      prefill += r.stats.prefill_tokens;
      decode += r.stats.decode_tokens;
      EXPECT_EQ(r.stats.steps, runs[0].stats.steps);  // lockstep
      EXPECT_GT(r.stats.kv_cache_bytes, 0);
    }
    EXPECT_EQ(prefill, want_stats.prefill_tokens);
    EXPECT_EQ(decode, want_stats.decode_tokens);
  }
}

// Temperature 1: with first_stream = the share's offset, each sequence draws from the stream
// the single-rank run gives it, so 4 ranks sample exactly the same tokens (checked: no float
// near-tie flips a draw for this seed). Without first_stream they do not.
TEST(EpGeneration, SamplingWithFirstStreamMatchesSingleRank) {
  const ModelConfig c = ep_config();
  const Prompts prompts = make_prompts(c, 2);
  GenerationConfig g;
  g.sampling.temperature = 1.0;
  g.max_new_tokens = 10;
  g.batch_slots = 3;
  g.seed = 17;
  const auto want = single_rank(c, prompts, g);
  const Shares shares = {{0, 3}, {3, 6}, {6, 10}, {10, 13}};
  expect_same_sequences(concat(ep_run(c, prompts, shares, g)), want);

  const auto unshifted = concat(ep_run(c, prompts, shares, g, /*set_first_stream=*/false));
  bool any_different = false;
  for (size_t i = 3; i < want.size(); ++i)
    any_different |= unshifted[i].response != want[i].response;
  EXPECT_TRUE(any_different) << "first_stream must select the sequences' random streams";
}

// One rank without prompts, one with most of them, one with a single prompt; a stop token
// ends some responses early. Ranks that run out of work keep serving the others' steps with
// a throw-away token, which changes no result.
TEST(EpGeneration, UnevenSharesAndStopTokensFinishOnEveryRank) {
  const ModelConfig c = ep_config();
  const Prompts prompts = make_prompts(c, 3);
  GenerationConfig g;
  g.sampling.temperature = 1.0;
  g.max_new_tokens = 12;
  g.batch_slots = 4;
  g.seed = 5;
  g.stop_tokens = {1, 2, 3, 4};
  const auto want = single_rank(c, prompts, g);
  int stopped = 0;
  for (const GeneratedSequence& s : want) stopped += s.stopped;
  ASSERT_GT(stopped, 0) << "the stop tokens must end some responses early";
  ASSERT_LT(stopped, static_cast<int>(want.size())) << "and leave some at the length limit";

  const Shares shares = {{0, 0}, {0, 10}, {10, 11}, {11, 13}};
  const std::vector<RankRun> runs = ep_run(c, prompts, shares, g);
  expect_same_sequences(concat(runs), want);
  EXPECT_TRUE(runs[0].seqs.empty());
  for (const RankRun& r : runs) EXPECT_EQ(r.stats.steps, runs[0].stats.steps);
  // Rank 0 only served: every step idle, nothing of its own fed.
  EXPECT_GT(runs[0].stats.steps, 0);
  EXPECT_EQ(runs[0].stats.idle_steps, runs[0].stats.steps);
  EXPECT_EQ(runs[0].stats.prefill_tokens + runs[0].stats.decode_tokens, 0);
  // Rank 2's single sequence ends long before rank 1's ten.
  EXPECT_GT(runs[2].stats.idle_steps, 0);
  EXPECT_EQ(runs[1].stats.idle_steps, 0);

  // No prompts anywhere: every rank returns at once.
  const std::vector<RankRun> none = ep_run(c, prompts, {{0, 0}, {0, 0}}, g);
  for (const RankRun& r : none) {
    EXPECT_TRUE(r.ran);
    EXPECT_EQ(r.stats.steps, 0);
  }
}

// A bad prompt on one rank: every rank throws well before the communicator's timeout (a
// rank waiting for the bad one in a collective would only fail after kTimeout), the bad
// rank with its own error, the others with one naming it.
TEST(EpGeneration, BadPromptOnOneRankStopsEveryRank) {
  const ModelConfig c = ep_config();
  const Prompts good = make_prompts(c, 4);
  for (const auto& [bad_rank, bad_prompt, what] :
       {std::tuple{2, std::vector<int32_t>{3, 40}, std::string("prompt 0 token 1 = 40")},
        std::tuple{0, std::vector<int32_t>{}, std::string("prompt 0 is empty")}}) {
    std::vector<std::string> errors(4);
    const auto start = std::chrono::steady_clock::now();
    run_inprocess(4, kTimeout, [&](int rank, Communicator& comm) {
      auto backend = make_cpu_backend();
      MoeTransformer model(c, *backend, DType::f32, ExpertParallel{&comm});
      model.init_weights(7);
      Prompts mine(good.begin() + 3 * rank, good.begin() + 3 * rank + 3);
      if (rank == bad_rank) mine[0] = bad_prompt;
      try {
        generate(model, mine, GenerationConfig{});
      } catch (const Error& e) {
        errors[rank] = e.what();
      }
    });
    EXPECT_LT(std::chrono::steady_clock::now() - start, kTimeout / 4);
    for (int r = 0; r < 4; ++r)
      EXPECT_THAT(errors[r],
                  ::testing::HasSubstr(r == bad_rank ? what : "rank " + std::to_string(bad_rank)))
          << "rank " << r;
  }
}

// forward_cached itself: a bad input on one rank makes every rank throw at the first MoE
// layer instead of leaving the others waiting there.
TEST(EpGeneration, BadCachedInputOnOneRankStopsEveryRank) {
  const ModelConfig c = ep_config();
  std::vector<std::string> errors(2);
  const auto start = std::chrono::steady_clock::now();
  run_inprocess(2, kTimeout, [&](int rank, Communicator& comm) {
    auto backend = make_cpu_backend();
    MoeTransformer model(c, *backend, DType::f32, ExpertParallel{&comm});
    model.init_weights(7);
    KvCache cache(c, *backend, DType::f32, 1, 4);
    CachedOutput out;
    try {
      model.forward_cached({{rank == 1 ? 99 : 5}, {0}, {0}, {0}}, cache, out);
    } catch (const Error& e) {
      errors[rank] = e.what();
    }
  });
  EXPECT_LT(std::chrono::steady_clock::now() - start, kTimeout / 4);
  EXPECT_THAT(errors[1], ::testing::HasSubstr("outside the vocabulary"));
  EXPECT_THAT(errors[0], ::testing::HasSubstr("rank 1 could not run this layer"));
}

}  // namespace
}  // namespace fm
