// Checkpoints: bit-exact round trip, atomic replacement, and clear errors for
// corrupt or mismatched checkpoints.
#include "model/checkpoint.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>

#include "engine/error.h"
#include "engine/files.h"
#include "support/model_fixtures.h"
#include "support/temp_dir.h"

namespace fm {
namespace {

namespace fs = std::filesystem;
using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::ThrowsMessage;

class CheckpointTest : public testing::TempDirTest {
 protected:
  // A model and optimizer after two real steps, so moments and balance state are non-trivial.
  struct Trained {
    std::unique_ptr<Backend> backend = make_cpu_backend();
    std::unique_ptr<MoeTransformer> model;
    std::unique_ptr<AdamW> opt;
  };
  static Trained trained(const ModelConfig& c, uint64_t seed) {
    Trained t;
    t.model = std::make_unique<MoeTransformer>(c, *t.backend);
    t.model->init_weights(seed);
    t.opt = std::make_unique<AdamW>(OptimizerConfig{}, t.model->params(), *t.backend);
    for (int s = 0; s < 2; ++s) {
      t.model->zero_grad();
      t.model->lm_loss_and_backward(testing::random_batch(c, {7, 5}, seed + s), {}, 1.0);
      t.opt->step(t.model->grads());
      t.model->end_balance_step();
    }
    return t;
  }
  static bool same_bits(const Tensor& a, const Tensor& b) {
    return a.nbytes() == b.nbytes() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
  }
};

TEST_F(CheckpointTest, RoundTripIsBitExact) {
  const ModelConfig c = testing::micro_config("method: phi\n    alpha: 0.1");
  Trained a = trained(c, 1);
  CheckpointInfo info;
  info.step = 2;
  info.rngs.push_back({"data", 7, 3, 12345});
  info.run = {{"note", "hello"}};
  save_checkpoint(file("ck"), *a.model, *a.opt, info);

  Trained b = trained(c, 99);  // different weights, moments and state
  const CheckpointInfo got = load_checkpoint(file("ck"), *b.model, *b.opt);
  EXPECT_TRUE(same_bits(a.model->params().flat(), b.model->params().flat()));
  EXPECT_TRUE(same_bits(a.opt->exp_avg(), b.opt->exp_avg()));
  EXPECT_TRUE(same_bits(a.opt->exp_avg_sq(), b.opt->exp_avg_sq()));
  EXPECT_EQ(a.opt->steps_taken(), b.opt->steps_taken());
  for (size_t l = 0; l < a.model->balance_state().size(); ++l)
    EXPECT_EQ(a.model->balance_state()[l].ema, b.model->balance_state()[l].ema);
  EXPECT_EQ(got.step, 2);
  ASSERT_EQ(got.rngs.size(), 1u);
  EXPECT_EQ(got.rngs[0].offset, 12345u);
  EXPECT_EQ(got.run["note"], "hello");
}

TEST_F(CheckpointTest, SavingOverAnExistingCheckpointReplacesItWhole) {
  const ModelConfig c = testing::micro_config();
  Trained a = trained(c, 1), b = trained(c, 2);
  save_checkpoint(file("ck"), *a.model, *a.opt, {});
  save_checkpoint(file("ck"), *b.model, *b.opt, {});
  Trained d = trained(c, 3);
  load_checkpoint(file("ck"), *d.model, *d.opt);
  EXPECT_TRUE(same_bits(d.model->params().flat(), b.model->params().flat()));
  for (const auto& e : fs::directory_iterator(dir_))  // no temporary or old directory left behind
    EXPECT_EQ(e.path().filename(), "ck");
}

TEST_F(CheckpointTest, CorruptFileFailsTheChecksum) {
  const ModelConfig c = testing::micro_config();
  Trained a = trained(c, 1);
  save_checkpoint(file("ck"), *a.model, *a.opt, {});
  {
    std::fstream f(file("ck/model.safetensors"), std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(-3, std::ios::end);
    f.put('\x7f');
  }
  EXPECT_THAT([&] { load_checkpoint(file("ck"), *a.model, *a.opt); },
              ThrowsMessage<Error>(AllOf(HasSubstr("model.safetensors"), HasSubstr("checksum"))));
}

TEST_F(CheckpointTest, MissingFileAndBadManifestAreNamed) {
  const ModelConfig c = testing::micro_config();
  Trained a = trained(c, 1);
  save_checkpoint(file("ck"), *a.model, *a.opt, {});
  fs::remove(file("ck/state.safetensors"));
  EXPECT_THAT([&] { load_checkpoint(file("ck"), *a.model, *a.opt); },
              ThrowsMessage<Error>(HasSubstr("missing file state.safetensors")));
  write_file_atomic(file("ck/manifest.json"), "{ not json");
  EXPECT_THAT([&] { load_checkpoint(file("ck"), *a.model, *a.opt); },
              ThrowsMessage<Error>(AllOf(HasSubstr("manifest.json"), HasSubstr("not valid JSON"))));
  EXPECT_THAT([&] { load_checkpoint(file("nowhere"), *a.model, *a.opt); },
              ThrowsMessage<Error>(HasSubstr("not a directory")));
}

TEST_F(CheckpointTest, ConfigMismatchIsNamed) {
  Trained a = trained(testing::micro_config(), 1);
  save_checkpoint(file("ck"), *a.model, *a.opt, {});
  ModelConfig other = testing::micro_config();
  other.moe_ffn = 12;
  Trained b = trained(other, 1);
  EXPECT_THAT([&] { load_checkpoint(file("ck"), *b.model, *b.opt); },
              ThrowsMessage<Error>(HasSubstr("model.moe_ffn is 8 in the checkpoint but 12")));
}

TEST_F(CheckpointTest, WeightsOnlyRoundTripAndStoredConfig) {
  const ModelConfig c = testing::micro_config("method: loss_free\n    bias_rate: 0.01");
  Trained a = trained(c, 1);
  save_weights(file("w"), *a.model, {{"source", "test"}});
  EXPECT_TRUE(fs::exists(file("w/model.safetensors")));
  EXPECT_FALSE(fs::exists(file("w/optimizer.safetensors")));

  const ModelConfig stored = load_checkpoint_config(file("w"));
  EXPECT_EQ(model_config_json(stored), model_config_json(c));  // every key, doubles exactly
  Trained b = trained(stored, 99);
  load_weights(file("w"), *b.model);
  EXPECT_TRUE(same_bits(a.model->params().flat(), b.model->params().flat()));

  EXPECT_THAT([&] { load_checkpoint(file("w"), *b.model, *b.opt); },
              ThrowsMessage<Error>(AllOf(HasSubstr("weights-only"), HasSubstr("load_weights"))));
}

TEST_F(CheckpointTest, LoadWeightsReadsAFullCheckpoint) {
  const ModelConfig c = testing::micro_config("method: loss_free\n    bias_rate: 0.01");
  Trained a = trained(c, 1);
  save_checkpoint(file("ck"), *a.model, *a.opt, {});
  EXPECT_EQ(model_config_json(load_checkpoint_config(file("ck"))), model_config_json(c));
  Trained b = trained(c, 99);
  load_weights(file("ck"), *b.model);
  EXPECT_TRUE(same_bits(a.model->params().flat(), b.model->params().flat()));
  // Same balancing config: the loss_free bias comes along (it decides routing).
  EXPECT_EQ(a.model->balance_state()[0].bias, b.model->balance_state()[0].bias);
  EXPECT_NE(a.model->balance_state()[0].bias, std::vector<double>(4, 0.0));
}

TEST_F(CheckpointTest, LoadWeightsAllowsOtherBalancingButNotOtherShapes) {
  Trained a = trained(testing::micro_config(), 1);
  save_weights(file("w"), *a.model);
  ModelConfig other = testing::micro_config("method: phi\n    alpha: 0.5");
  other.name = "renamed";
  other.max_seq_len = 128;
  Trained b = trained(other, 2);
  load_weights(file("w"), *b.model);
  EXPECT_TRUE(same_bits(a.model->params().flat(), b.model->params().flat()));

  ModelConfig wider = testing::micro_config();
  wider.moe_ffn = 12;
  Trained d = trained(wider, 1);
  EXPECT_THAT([&] { load_weights(file("w"), *d.model); },
              ThrowsMessage<Error>(HasSubstr("model.moe_ffn is 8 in the checkpoint but 12")));
}

TEST_F(CheckpointTest, LoadWeightsChecksTheChecksumAndTheStoredConfig) {
  Trained a = trained(testing::micro_config(), 1);
  save_weights(file("w"), *a.model);
  {
    std::fstream f(file("w/model.safetensors"), std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(-3, std::ios::end);
    f.put('\x7f');
  }
  EXPECT_THAT([&] { load_weights(file("w"), *a.model); },
              ThrowsMessage<Error>(AllOf(HasSubstr("model.safetensors"), HasSubstr("checksum"))));
  auto manifest = nlohmann::json::parse(read_file(file("w/manifest.json")));
  manifest["model"]["top_k"] = 9;
  write_file_atomic(file("w/manifest.json"), manifest.dump());
  EXPECT_THAT([&] { load_checkpoint_config(file("w")); },
              ThrowsMessage<Error>(AllOf(HasSubstr("manifest.json"), HasSubstr("top_k"))));
}

}  // namespace
}  // namespace fm
