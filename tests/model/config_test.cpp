// Model configs: presets load, costs are right, bad input names file and key.
#include "engine/config.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "engine/error.h"
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
