// Model configs: presets load, costs are right, bad input names file and key.
#include "engine/config.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "engine/error.h"
#include "engine/rng.h"
#include "model/config.h"
#include "model/presets.h"

namespace fm {
namespace {

using ::testing::HasSubstr;
using ::testing::ThrowsMessage;

TEST(ModelConfig, EveryPresetLoadsAndValidates) {
  for (const char* name : {"tiny", "small", "mid", "qwen3-30b-a3b"}) {
    const ModelConfig c = ModelConfig::load(name);
    EXPECT_EQ(c.name, name);
  }
}

TEST(ModelConfig, PresetSizesAreWhatTheyClaim) {
  // qwen3-30b-a3b is published as 30.5B total / 3.3B active.
  const ModelCosts q = model_costs(ModelConfig::load("qwen3-30b-a3b"), 4096);
  EXPECT_NEAR(q.total_params / 1e9, 30.5, 0.2);
  EXPECT_NEAR(q.active_params / 1e9, 3.3, 0.1);
  const ModelCosts s = model_costs(ModelConfig::load("small"), 4096);
  EXPECT_GE(s.total_params, 100'000'000);
  EXPECT_LE(s.total_params, 300'000'000);
  const ModelCosts m = model_costs(ModelConfig::load("mid"), 4096);
  EXPECT_GE(m.total_params, 1'000'000'000);
  EXPECT_LE(m.total_params, 2'000'000'000);
  // Training FLOPs are three forwards.
  EXPECT_DOUBLE_EQ(s.training_flops_per_token, 3 * s.forward_flops_per_token);
}

// The decode roofline's bytes against model_costs' independent parameter count: with every
// (layer, expert) pair chosen, one sequence's step reads every parameter but the input
// embedding's other rows; with only its own top-k experts, every active one likewise.
TEST(ModelConfig, DecodeStepBytesCountEachWeightOnce) {
  for (const char* name : {"tiny", "small", "mid", "qwen3-30b-a3b"}) {
    const ModelConfig c = ModelConfig::load(name);
    const ModelCosts k = model_costs(c, 1);
    const int64_t embed_not_read = (c.tie_embeddings ? 0 : c.vocab_size * c.hidden) - c.hidden;
    const DecodeStepBytes all = decode_step_bytes(c, 2, 2, {1}, c.n_moe_layers() * c.n_experts);
    EXPECT_EQ(all.weights + all.experts, 2 * (k.total_params - embed_not_read)) << name;
    const DecodeStepBytes active = decode_step_bytes(c, 2, 2, {1}, c.n_moe_layers() * c.top_k);
    EXPECT_EQ(active.weights + active.experts, 2 * (k.active_params - embed_not_read)) << name;
    // The cache: per sequence, context x layers x (K and V) x kv_dim elements.
    const DecodeStepBytes kv = decode_step_bytes(c, 2, 4, {10, 30}, 0);
    EXPECT_EQ(kv.kv_cache, 4 * 40 * c.n_layers * 2 * c.kv_dim()) << name;
    EXPECT_EQ(kv.experts, 0) << name;
    EXPECT_EQ(kv.weights, all.weights + 2 * c.hidden) << name << ": one more embedding row";
    EXPECT_EQ(kv.total(), kv.weights + kv.experts + kv.kv_cache);
  }
  const ModelConfig c = ModelConfig::load("tiny");
  for (auto [bad, key] : {std::pair{c.n_moe_layers() * c.n_experts + 1, "distinct_experts"},
                          {-1, "distinct_experts"}})
    EXPECT_THAT([&] { decode_step_bytes(c, 2, 2, {1}, bad); },
                ThrowsMessage<Error>(HasSubstr(key)));
  EXPECT_THAT([&] { decode_step_bytes(c, 2, 2, {c.max_seq_len + 1}, 0); },
              ThrowsMessage<Error>(HasSubstr("max_seq_len")));
  EXPECT_THAT([&] { decode_step_bytes(c, 2, 2, {}, 0); },
              ThrowsMessage<Error>(HasSubstr("no sequences")));
}

// E (1 - (1 - k/E)^B) against its limits and a Monte Carlo count of random top-k choices.
TEST(ModelConfig, ExpectedDistinctExpertsMatchesRandomRouting) {
  EXPECT_DOUBLE_EQ(expected_distinct_experts(64, 8, 0), 0.0);
  EXPECT_NEAR(expected_distinct_experts(64, 8, 1), 8.0, 1e-12);
  EXPECT_NEAR(expected_distinct_experts(64, 8, 4096), 64.0, 1e-9);
  EXPECT_NEAR(expected_distinct_experts(8, 8, 3), 8.0, 1e-12);
  Rng rng(17, 0);
  const int64_t E = 32, K = 4, B = 16, trials = 4000;
  double sum = 0.0;
  for (int64_t t = 0; t < trials; ++t) {
    std::vector<bool> hit(E, false);
    for (int64_t b = 0; b < B; ++b) {
      std::vector<int64_t> experts(E);
      for (int64_t e = 0; e < E; ++e) experts[e] = e;
      for (int64_t i = 0; i < K; ++i) {  // the first K of a random permutation
        std::swap(experts[i], experts[i + rng.next_below(static_cast<uint64_t>(E - i))]);
        hit[experts[i]] = true;
      }
    }
    sum += static_cast<double>(std::count(hit.begin(), hit.end(), true));
  }
  // Standard error of the mean ~0.03 here; 0.15 is five of them.
  EXPECT_NEAR(sum / trials, expected_distinct_experts(E, K, B), 0.15);
  EXPECT_THROW(expected_distinct_experts(8, 9, 1), Error);
}

ModelConfig parse_model(const std::string& body) {
  const ConfigNode root = ConfigNode::parse("model:\n" + body, "bad.yaml");
  ModelConfig c = ModelConfig::from_yaml(root.child("model"));
  root.finish();
  return c;
}

const std::string kValid =
    "  vocab_size: 32\n  hidden: 16\n  n_layers: 2\n  n_heads: 2\n  n_kv_heads: 1\n"
    "  head_dim: 8\n  n_experts: 4\n  top_k: 2\n  moe_ffn: 8\n  max_seq_len: 16\n";

TEST(ModelConfig, BadInputNamesFileAndKey) {
  EXPECT_NO_THROW(parse_model(kValid));
  EXPECT_THAT([&] { parse_model(kValid + "  hiden: 3\n"); },
              ThrowsMessage<Error>(AllOf(HasSubstr("bad.yaml"), HasSubstr("model.hiden"))));
  EXPECT_THAT([&] { parse_model(kValid + "  qk_norm: maybe\n"); },
              ThrowsMessage<Error>(HasSubstr("model.qk_norm")));
  EXPECT_THAT([&] { parse_model(kValid + "  rope_theta: abc\n"); },
              ThrowsMessage<Error>(HasSubstr("model.rope_theta")));
  EXPECT_THAT([&] { parse_model(kValid + "  router_balance:\n    method: magic\n"); },
              ThrowsMessage<Error>(
                  AllOf(HasSubstr("model.router_balance.method"), HasSubstr("switch_aux"))));
  EXPECT_THAT([&] { parse_model(kValid + "  router_balance:\n    eta: 2\n"); },
              ThrowsMessage<Error>(HasSubstr("model.router_balance.eta")));
  EXPECT_THAT(
      [&] {
        parse_model(
            "  vocab_size: 32\n  hidden: 16\n  n_layers: 2\n  n_heads: 3\n  n_kv_heads: 2\n"
            "  head_dim: 8\n  n_experts: 4\n  top_k: 2\n  moe_ffn: 8\n  max_seq_len: 16\n");
      },
      ThrowsMessage<Error>(HasSubstr("model.n_kv_heads: must divide n_heads")));
  EXPECT_THAT([&] { parse_model(kValid + "  first_k_dense: 1\n"); },
              ThrowsMessage<Error>(HasSubstr("model.dense_ffn")));
  EXPECT_THAT([&] { ModelConfig::load("no-such-preset"); },
              ThrowsMessage<Error>(AllOf(HasSubstr("no-such-preset"), HasSubstr("models/tiny"))));
}

}  // namespace
}  // namespace fm
