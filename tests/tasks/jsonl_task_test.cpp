// The JSONL dataset task: loading, the seeded held-out split, numeric rewards,
// and every malformed-file case naming the file and line.
#include "rl/tasks/jsonl_task.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <fstream>
#include <unordered_set>

#include "engine/error.h"
#include "support/temp_dir.h"

namespace fm {
namespace {

using ::testing::HasSubstr;

class JsonlTaskTest : public fm::testing::TempDirTest {
 protected:
  std::string write(const std::string& name, const std::string& text) {
    const std::string path = file(name);
    std::ofstream(path, std::ios::binary) << text;
    return path;
  }
  TaskConfig config(const std::string& path) {
    TaskConfig c = TaskConfig::defaults("jsonl");
    c.path = path;
    return c;
  }
  std::string lines(int n) {
    std::string text;
    for (int i = 0; i < n; ++i)
      text += fmt::format(R"({{"prompt": "{}+1=", "answer": "{}", "id": {}}})", i, i + 1, i) + "\n";
    return text;
  }
};

TEST_F(JsonlTaskTest, ReadsExamplesInFileOrder) {
  const std::string path =
      write("a.jsonl",
            "{\"prompt\": \"2+2=\", \"answer\": \"4\"}\n\n  \n{\"prompt\": \"x\", "
            "\"answer\": \"y\"}");
  const std::vector<TaskExample> e = JsonlTask::read_examples(path);
  ASSERT_EQ(e.size(), 2u);
  EXPECT_EQ(e[0], (TaskExample{"2+2=", "4"}));
  EXPECT_EQ(e[1], (TaskExample{"x", "y"}));
}

TEST_F(JsonlTaskTest, SplitIsSeededDisjointAndCoversTheFile) {
  const std::string path = write("d.jsonl", lines(100));
  const auto task = make_task(config(path));
  auto& jt = dynamic_cast<const JsonlTask&>(*task);
  EXPECT_EQ(task->name(), "jsonl");
  EXPECT_EQ(jt.held_out().size(), 10u);  // default: 10% of the lines
  EXPECT_EQ(jt.training().size(), 90u);
  std::unordered_set<std::string> held, all;
  for (const auto& e : jt.held_out()) held.insert(e.prompt), all.insert(e.prompt);
  for (const auto& e : jt.training()) {
    EXPECT_FALSE(held.contains(e.prompt));
    all.insert(e.prompt);
  }
  EXPECT_EQ(all.size(), 100u);
  // example(i) walks the training list and wraps.
  EXPECT_EQ(task->example(0), jt.training()[0]);
  EXPECT_EQ(task->example(90), jt.training()[0]);
  EXPECT_EQ(task->example(95), jt.training()[5]);
  // Same seed, same split; another seed, another one.
  const auto again = make_task(config(path));
  EXPECT_EQ(again->held_out(), task->held_out());
  TaskConfig other = config(path);
  other.seed = 2;
  EXPECT_NE(make_task(other)->held_out(), task->held_out());
}

TEST_F(JsonlTaskTest, HeldOutCountIsConfigurableAndChecked) {
  const std::string path = write("d.jsonl", lines(5));
  TaskConfig c = config(path);
  c.held_out = 2;
  EXPECT_EQ(make_task(c)->held_out().size(), 2u);
  c.held_out = 5;
  try {
    (void)make_task(c);
    FAIL();
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr(path));
    EXPECT_THAT(e.what(), HasSubstr("held_out"));
  }
}

TEST_F(JsonlTaskTest, DuplicatePromptsOfHeldOutLeaveTraining) {
  std::string text;
  for (int i = 0; i < 20; ++i)
    text += R"({"prompt": "same", "answer": "1"})"
            "\n";
  text += R"({"prompt": "other", "answer": "2"})"
          "\n";
  TaskConfig c = config(write("dup.jsonl", text));
  c.held_out = 1;
  const auto task = make_task(c);
  for (uint64_t i = 0; i < 30; ++i) EXPECT_NE(task->example(i).prompt, task->held_out()[0].prompt);
}

TEST_F(JsonlTaskTest, MalformedLinesNameFileAndLine) {
  const std::string good = R"({"prompt": "a", "answer": "b"})";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {good + "\n{\"prompt\": \"a\", \"answer\": \n", "not valid JSON"},
      {good + "\n[1, 2]\n", "expected an object"},
      {good + "\n{\"answer\": \"b\"}\n", "missing key \"prompt\""},
      {good + "\n{\"prompt\": \"a\"}\n", "missing key \"answer\""},
      {good + "\n{\"prompt\": \"a\", \"answer\": 4}\n", "\"answer\" must be a string"},
      {good + "\n{\"prompt\": null, \"answer\": \"4\"}\n", "\"prompt\" must be a string"},
  };
  for (const auto& [text, problem] : cases) {
    const std::string path = write("bad.jsonl", text);
    try {
      (void)JsonlTask::read_examples(path);
      FAIL() << "accepted: " << text;
    } catch (const Error& e) {
      EXPECT_THAT(e.what(), HasSubstr(path + ":2:")) << e.what();
      EXPECT_THAT(e.what(), HasSubstr(problem)) << e.what();
    }
  }
}

TEST_F(JsonlTaskTest, EmptyOrMissingFileIsAnError) {
  for (const std::string text : {"", "\n  \n"}) {
    const std::string path = write("empty.jsonl", text);
    try {
      (void)make_task(config(path));
      FAIL();
    } catch (const Error& e) {
      EXPECT_THAT(e.what(), HasSubstr(path));
      EXPECT_THAT(e.what(), HasSubstr("no examples"));
    }
  }
  EXPECT_THAT([&] { (void)make_task(config(file("none.jsonl"))); },
              ::testing::ThrowsMessage<Error>(HasSubstr(file("none.jsonl"))));
}

TEST_F(JsonlTaskTest, NumericAnswersCompareWithRelativeTolerance) {
  EXPECT_TRUE(JsonlTask::answers_match("42", "42"));
  EXPECT_TRUE(JsonlTask::answers_match("42.0", "42"));
  EXPECT_TRUE(JsonlTask::answers_match("+42", " 42 "));
  EXPECT_TRUE(JsonlTask::answers_match("1e3", "1000"));
  EXPECT_TRUE(JsonlTask::answers_match("1000000.5", "1000000"));  // 5e-7 relative
  EXPECT_FALSE(JsonlTask::answers_match("1000002", "1000000"));   // 2e-6 relative
  EXPECT_FALSE(JsonlTask::answers_match("43", "42"));
  EXPECT_FALSE(JsonlTask::answers_match("0.000001", "0"));
  EXPECT_TRUE(JsonlTask::answers_match("Paris", " Paris"));
  EXPECT_FALSE(JsonlTask::answers_match("paris", "Paris"));
  EXPECT_FALSE(JsonlTask::answers_match("42 apples", "42"));
}

TEST_F(JsonlTaskTest, RewardsUseTheNumericComparison) {
  TaskConfig c = config(write("d.jsonl", lines(20)));
  c.format_reward = 0.2;
  const auto task = make_task(c);
  EXPECT_EQ(task->score("4.0\nexplanation", "4").reward, 1.0);
  const Reward wrong = task->score("5", "4");
  EXPECT_TRUE(wrong.well_formed);
  EXPECT_DOUBLE_EQ(wrong.reward, 0.2);
  const Reward words = task->score("four", "4");  // the answer is a number: words are malformed
  EXPECT_FALSE(words.well_formed);
  EXPECT_EQ(words.reward, 0.0);
  EXPECT_DOUBLE_EQ(task->score("Lyon", "Paris").reward, 0.2);
  EXPECT_EQ(task->score("", "Paris").reward, 0.0);
}

}  // namespace
}  // namespace fm
