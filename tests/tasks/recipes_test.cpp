// Every shipped config (configs/**.yaml, compiled in) loads with the loader of its folder:
// a typo in a recipe fails here, not in a user's first run.
#include <gtest/gtest.h>

#include <string>

#include "model/config.h"
#include "model/presets.h"
#include "rl/lm_trainer.h"
#include "rl/rl_config.h"
#include "rl/sft_trainer.h"

namespace fm {
namespace {

bool starts_with(const std::string& s, const std::string& prefix) {
  return s.rfind(prefix, 0) == 0;
}

TEST(Recipes, EveryShippedConfigLoads) {
  int rl = 0, sft = 0, models = 0;
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
