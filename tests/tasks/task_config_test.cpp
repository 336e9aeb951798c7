// TaskConfig from YAML: knobs per task, range checks, messages naming the key.
#include "rl/tasks/task_config.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "engine/config.h"
#include "engine/error.h"
#include "rl/tasks/generated_tasks.h"
#include "rl/tasks/task.h"

namespace fm {
namespace {

using ::testing::HasSubstr;

TaskConfig parse(const std::string& yaml) {
  const ConfigNode node = ConfigNode::parse(yaml, "task.yaml");
  TaskConfig c = TaskConfig::from_yaml(node);
  node.finish();
  return c;
}

std::string error_of(const std::string& yaml) {
  try {
    parse(yaml);
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "accepted: " << yaml;
  return "";
}

TEST(TaskConfig, ReadsEveryKnob) {
  TaskConfig c =
      parse("{name: add, seed: 9, held_out: 30, format_reward: 0.1, min_digits: 2, max_digits: 5}");
  EXPECT_EQ(c.name, "add");
  EXPECT_EQ(c.seed, 9u);
  EXPECT_EQ(c.held_out, 30);
  EXPECT_DOUBLE_EQ(c.format_reward, 0.1);
  EXPECT_EQ(c.min_digits, 2);
  EXPECT_EQ(c.max_digits, 5);
  c = parse("{name: count, min_len: 2, max_len: 9, alphabet: 26}");
  EXPECT_EQ(c.min_len, 2);
  EXPECT_EQ(c.max_len, 9);
  EXPECT_EQ(c.alphabet, 26);
  EXPECT_FALSE(c.held_out.has_value());
  c = parse("{name: jsonl, path: data.jsonl}");
  EXPECT_EQ(c.path, "data.jsonl");
}

TEST(TaskConfig, KnobOfAnotherTaskIsAnErrorNamingTheKey) {
  const std::string e = error_of("{name: sort, min_digits: 2}");
  EXPECT_THAT(e, HasSubstr("task.yaml"));
  EXPECT_THAT(e, HasSubstr("min_digits"));
  EXPECT_THAT(e, HasSubstr("not a knob of task 'sort'"));
  EXPECT_THAT(error_of("{name: add, alphabet: 3}"), HasSubstr("alphabet"));
  EXPECT_THAT(error_of("{name: add, path: x.jsonl}"), HasSubstr("path"));
  EXPECT_THAT(error_of("{name: add, max_digit: 3}"), HasSubstr("max_digit"));
}

TEST(TaskConfig, OutOfRangeValuesNameTheKey) {
  EXPECT_THAT(error_of("{name: add, min_digits: 0}"), HasSubstr("min_digits: must be in [1, 18]"));
  EXPECT_THAT(error_of("{name: add, min_digits: 4, max_digits: 3}"),
              HasSubstr("max_digits: must be in [4, 18]"));
  EXPECT_THAT(error_of("{name: add, max_digits: 19}"), HasSubstr("max_digits"));
  EXPECT_THAT(error_of("{name: sort, min_len: 9, max_len: 3}"), HasSubstr("max_len"));
  EXPECT_THAT(error_of("{name: reverse, alphabet: 27}"), HasSubstr("alphabet"));
  EXPECT_THAT(error_of("{name: count, alphabet: 1}"), HasSubstr("alphabet"));
  EXPECT_THAT(error_of("{name: add, format_reward: 1.0}"), HasSubstr("format_reward"));
  EXPECT_THAT(error_of("{name: add, held_out: -1}"), HasSubstr("held_out"));
  EXPECT_THAT(error_of("{name: jsonl}"), HasSubstr("path: is required"));
  EXPECT_THAT(error_of("{name: multiply}"), HasSubstr("name"));
  EXPECT_THAT(error_of("{name: add, seed: abc}"), HasSubstr("seed"));
}

TEST(TaskConfig, HeldOutMustLeaveHalfThePromptSpace) {
  // One-digit addition: 100 prompts, so at most 50 held out.
  const std::string e = error_of("{name: add, max_digits: 1}");  // default held_out 200
  EXPECT_THAT(e, HasSubstr("held_out"));
  EXPECT_THAT(e, HasSubstr("100 distinct prompts"));
  EXPECT_NO_THROW(parse("{name: add, max_digits: 1, held_out: 50}"));
}

TEST(TaskConfig, PromptSpaceCountsDistinctPrompts) {
  TaskConfig c = TaskConfig::defaults("add");
  c.min_digits = 1;
  c.max_digits = 2;
  EXPECT_DOUBLE_EQ(prompt_space(c), 100.0 * 100.0);  // 0..99 per operand
  c = TaskConfig::defaults("reverse");
  c.min_len = 2;
  c.max_len = 3;
  c.alphabet = 4;
  EXPECT_DOUBLE_EQ(prompt_space(c), 16.0 + 64.0);
  c.name = "count";
  EXPECT_DOUBLE_EQ(prompt_space(c), 4.0 * 80.0);
}

TEST(TaskConfig, CodeBuiltConfigsAreValidatedToo) {
  TaskConfig c = TaskConfig::defaults("sort");
  c.max_len = 0;
  try {
    (void)make_task(c);
    FAIL();
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("max_len"));
  }
  EXPECT_THROW(TaskConfig::defaults("multiply"), Error);
}

}  // namespace
}  // namespace fm
