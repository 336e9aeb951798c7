// Every shipped config (configs/**.yaml, compiled in) loads with the loader of its folder:
// a typo in a recipe fails here, not in a user's first run.
#include <gtest/gtest.h>

#include <filesystem>
#include <string>

#include "engine/files.h"
#include "model/config.h"
#include "model/presets.h"
#include "rl/lm_trainer.h"
#include "rl/rl_config.h"
#include "rl/router_study.h"
#include "rl/sft_trainer.h"
#include "rl/text_corpus.h"

namespace fm {
namespace {

bool starts_with(const std::string& s, const std::string& prefix) {
  return s.rfind(prefix, 0) == 0;
}

// Text configs name data/brown/brown.txt (`make data`) relative to the working directory: the
// test runs them from a directory holding a synthetic stand-in.
class InDataDir {
 public:
  InDataDir() : old_(std::filesystem::current_path()) {
    dir_ = std::filesystem::path(::testing::TempDir()) / "fm_recipes_data";
    std::filesystem::create_directories(dir_ / "data/brown");
    write_file_atomic((dir_ / "data/brown/brown.txt").string(), synthetic_corpus(3000, 1));
    std::filesystem::current_path(dir_);
  }
  ~InDataDir() {
    std::filesystem::current_path(old_);
    std::filesystem::remove_all(dir_);
  }

 private:
  std::filesystem::path old_, dir_;
};

TEST(Recipes, EveryShippedConfigLoads) {
  const InDataDir data_dir;
  int rl = 0, sft = 0, models = 0, text_configs = 0;
  for (const auto& [key, text] : embedded_configs()) {
    SCOPED_TRACE(key);
    if (starts_with(key, "models/")) {
      EXPECT_NO_THROW(ModelConfig::load(key));
      ++models;
    } else if (starts_with(key, "sft/")) {
      EXPECT_NO_THROW(SftRunConfig::load(key));
      ++sft;
    } else if (starts_with(key, "train/")) {
      EXPECT_NO_THROW(LmRunConfig::load(key));
    } else if (starts_with(key, "pretrain/")) {
      LmRunConfig c;
      ASSERT_NO_THROW(c = LmRunConfig::load(key));
      EXPECT_TRUE(c.data.has_value());
      ++text_configs;
    } else if (starts_with(key, "study/")) {
      RouterStudyConfig c;
      ASSERT_NO_THROW(c = RouterStudyConfig::load(key));
      EXPECT_EQ(c.methods.size(), 6u);  // none, switch_aux, global_aux, loss_free, phi x 2
      ++text_configs;
    } else if (starts_with(key, "rl/")) {
      RlRunConfig c;
      ASSERT_NO_THROW(c = RlRunConfig::load(key));
      // The warm start a recipe names loads too, and is long enough for sft_steps.
      if (c.init_checkpoint.empty()) {
        ASSERT_FALSE(c.init_sft.empty());
        SftRunConfig s;
        ASSERT_NO_THROW(s = SftRunConfig::load(c.init_sft));
        EXPECT_LE(c.init_sft_steps, s.train.steps);
        EXPECT_EQ(s.task.name, c.task.name);
        EXPECT_EQ(s.tokenizer, c.tokenizer);
      }
      ++rl;
    } else {
      ADD_FAILURE() << "configs/" << key << ".yaml: no loader for this folder in the test";
    }
  }
  EXPECT_GE(rl, 4);  // demo, grpo_tiny, ppo_tiny and a GPU-sized one
  EXPECT_GE(sft, 1);
  EXPECT_GE(models, 3);
  EXPECT_GE(text_configs, 4);  // pretrain/brown_{tiny,small}, study/phi_{tiny,small_gpu}
}

TEST(Recipes, SftStepsMustBeANonNegativeCount) {
  const std::string base = R"(model: tiny
init:
  sft: sft/add_tiny
  sft_steps: -5
task:
  name: add
actor:
  ppo_mini_batch_size: 16
)";
  try {
    RlRunConfig::parse(base, "bad.yaml");
    FAIL() << "negative init.sft_steps accepted";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("bad.yaml: init.sft_steps: must be >= 0"),
              std::string::npos)
        << e.what();
  }
}

}  // namespace
}  // namespace fm
