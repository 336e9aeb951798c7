// The generated tasks: answers recomputed independently, determinism by seed,
// held-out disjoint from training, knob bounds, rewards.
#include "rl/tasks/generated_tasks.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <regex>
#include <set>
#include <unordered_set>

#include "engine/error.h"

namespace fm {
namespace {

const std::vector<std::string> kGenerated = {"add", "sort", "reverse", "count"};

std::unique_ptr<Task> task_named(const std::string& name, uint64_t seed = 1) {
  TaskConfig c = TaskConfig::defaults(name);
  c.seed = seed;
  return make_task(c);
}

// The answer recomputed from the prompt alone, by a route other than the generator's.
std::string solve(const std::string& name, const std::string& prompt) {
  std::smatch m;
  if (name == "add") {
    EXPECT_TRUE(std::regex_match(prompt, m, std::regex(R"((\d+)\+(\d+)=)"))) << prompt;
    return std::to_string(std::stoull(m[1]) + std::stoull(m[2]));
  }
  if (name == "sort") {
    EXPECT_TRUE(std::regex_match(prompt, m, std::regex(R"(sort (\d+))"))) << prompt;
    std::multiset<char> digits(m[1].first, m[1].second);
    return std::string(digits.begin(), digits.end());
  }
  if (name == "reverse") {
    EXPECT_TRUE(std::regex_match(prompt, m, std::regex(R"(reverse ([a-z]+))"))) << prompt;
    std::string out;
    for (auto it = m[1].second; it != m[1].first;) out += *--it;
    return out;
  }
  EXPECT_TRUE(std::regex_match(prompt, m, std::regex(R"(count ([a-z]) in ([a-z]+))"))) << prompt;
  int n = 0;
  for (char ch : m[2].str()) n += ch == m[1].str()[0];
  return std::to_string(n);
}

TEST(GeneratedTasks, AnswersAreCorrect) {
  for (const std::string& name : kGenerated) {
    const auto task = task_named(name);
    EXPECT_EQ(task->name(), name);
    for (uint64_t i = 0; i < 2000; ++i) {
      const TaskExample e = task->example(i);
      ASSERT_EQ(e.answer, solve(name, e.prompt)) << name << " example " << i;
    }
    for (const TaskExample& e : task->held_out()) ASSERT_EQ(e.answer, solve(name, e.prompt));
  }
}

TEST(GeneratedTasks, PromptFormatsMatchTheDocumentedExamples) {
  EXPECT_THAT(task_named("add")->example(0).prompt, ::testing::MatchesRegex("[0-9]+\\+[0-9]+="));
  EXPECT_THAT(task_named("sort")->example(0).prompt, ::testing::StartsWith("sort "));
  EXPECT_THAT(task_named("reverse")->example(0).prompt, ::testing::StartsWith("reverse "));
  EXPECT_THAT(task_named("count")->example(0).prompt, ::testing::StartsWith("count "));
}

TEST(GeneratedTasks, SameSeedSameExamples) {
  for (const std::string& name : kGenerated) {
    const auto a = task_named(name, 5), b = task_named(name, 5), c = task_named(name, 6);
    EXPECT_EQ(a->held_out(), b->held_out()) << name;
    EXPECT_NE(a->held_out(), c->held_out()) << name;
    int differ = 0;
    for (uint64_t i = 0; i < 200; ++i) {
      EXPECT_EQ(a->example(i), b->example(i)) << name << " " << i;
      differ += a->example(i) != c->example(i);
    }
    EXPECT_GT(differ, 100) << name << ": another seed should give other examples";
    // Random access: example(i) does not depend on which examples were asked before.
    EXPECT_EQ(task_named(name, 5)->example(150), a->example(150));
  }
}

TEST(GeneratedTasks, HeldOutIsDistinctAndDisjointFromTraining) {
  for (const std::string& name : kGenerated) {
    const auto task = task_named(name);
    ASSERT_EQ(task->held_out().size(), 200u) << name;
    std::unordered_set<std::string> held;
    for (const TaskExample& e : task->held_out()) held.insert(e.prompt);
    EXPECT_EQ(held.size(), 200u) << name << ": held-out prompts repeat";
    for (uint64_t i = 0; i < 10000; ++i)
      ASSERT_FALSE(held.contains(task->example(i).prompt)) << name << " example " << i;
  }
}

TEST(GeneratedTasks, SmallSpaceStillKeepsHeldOutOut) {
  // One-digit addition has 100 prompts; 50 held out means training redraws often.
  TaskConfig c = TaskConfig::defaults("add");
  c.max_digits = 1;
  c.held_out = 50;
  const auto task = make_task(c);
  std::unordered_set<std::string> held, seen;
  for (const TaskExample& e : task->held_out()) held.insert(e.prompt);
  for (uint64_t i = 0; i < 2000; ++i) {
    const std::string p = task->example(i).prompt;
    ASSERT_FALSE(held.contains(p));
    seen.insert(p);
  }
  EXPECT_EQ(seen.size(), 50u);  // the other half of the space, all of it reached
}

TEST(GeneratedTasks, KnobBoundsAreRespected) {
  TaskConfig add = TaskConfig::defaults("add");
  add.min_digits = 2;
  add.max_digits = 4;
  std::set<size_t> lengths;
  const auto t_add = make_task(add);
  for (uint64_t i = 0; i < 2000; ++i) {
    std::smatch m;
    const std::string p = t_add->example(i).prompt;
    ASSERT_TRUE(std::regex_match(p, m, std::regex(R"((\d+)\+(\d+)=)")));
    for (int k : {1, 2}) {
      lengths.insert(m[k].length());
      EXPECT_NE(m[k].str()[0], '0') << p;  // no leading zeros in multi-digit operands
    }
  }
  EXPECT_EQ(lengths, (std::set<size_t>{2, 3, 4}));

  for (const std::string name : {"sort", "reverse", "count"}) {
    TaskConfig c = TaskConfig::defaults(name);
    c.min_len = 5;
    c.max_len = 7;
    c.alphabet = 3;
    const auto task = make_task(c);
    std::set<size_t> seen_len;
    std::set<char> letters;
    for (uint64_t i = 0; i < 2000; ++i) {
      const std::string p = task->example(i).prompt;
      const std::string s = p.substr(p.rfind(' ') + 1);
      seen_len.insert(s.size());
      if (name != "sort") letters.insert(s.begin(), s.end());
      if (name == "count") letters.insert(p[6]);  // "count X in ..."
    }
    EXPECT_EQ(seen_len, (std::set<size_t>{5, 6, 7})) << name;
    if (name != "sort") {
      EXPECT_EQ(letters, (std::set<char>{'a', 'b', 'c'})) << name;
    }
  }
}

TEST(GeneratedTasks, EighteenDigitSumsDoNotOverflow) {
  TaskConfig c = TaskConfig::defaults("add");
  c.min_digits = 18;
  c.max_digits = 18;
  const auto task = make_task(c);
  for (uint64_t i = 0; i < 100; ++i) {
    const TaskExample e = task->example(i);
    ASSERT_EQ(e.answer, solve("add", e.prompt));
  }
}

TEST(TaskReward, ExactWrongWellFormedAndGarbage) {
  TaskConfig c = TaskConfig::defaults("add");
  c.format_reward = 0.1;
  const auto task = make_task(c);
  Reward r = task->score("357", "357");
  EXPECT_TRUE(r.correct);
  EXPECT_TRUE(r.well_formed);
  EXPECT_EQ(r.reward, 1.0);
  EXPECT_EQ(r.extracted, "357");

  r = task->score("  357 \nbecause 12+345 is 357", "357");  // first line, trimmed
  EXPECT_TRUE(r.correct);
  EXPECT_EQ(r.extracted, "357");

  r = task->score("358", "357");
  EXPECT_FALSE(r.correct);
  EXPECT_TRUE(r.well_formed);
  EXPECT_DOUBLE_EQ(r.reward, 0.1);

  for (const std::string garbage : {"", "\n357", "three hundred", "35 7", "357!"}) {
    r = task->score(garbage, "357");
    EXPECT_FALSE(r.correct) << garbage;
    EXPECT_FALSE(r.well_formed) << garbage;
    EXPECT_EQ(r.reward, 0.0) << garbage;
  }
}

TEST(TaskReward, FormatRewardDefaultsToZero) {
  const auto task = task_named("reverse");
  EXPECT_EQ(task->score("dcba", "abcd").reward, 0.0);
  EXPECT_TRUE(task->score("dcba", "abcd").well_formed);
  EXPECT_FALSE(task->score("12", "abcd").well_formed);
  EXPECT_EQ(task->score("abcd", "abcd").reward, 1.0);
}

TEST(TaskReward, ExtractAnswerTakesTheFirstLineTrimmed) {
  EXPECT_EQ(Task::extract_answer(" 42 \n43"), "42");
  EXPECT_EQ(Task::extract_answer("\t7\r\n"), "7");
  EXPECT_EQ(Task::extract_answer(""), "");
  EXPECT_EQ(Task::extract_answer("   "), "");
  EXPECT_EQ(Task::extract_answer("a b"), "a b");
}

}  // namespace
}  // namespace fm
