// Every task's prompts and answers through the embedded tokenizer: exact round
// trips, no unk, and one token per digit.
#include <gtest/gtest.h>

#include "rl/tasks/task.h"
#include "rl/tasks/task_config.h"
#include "tokenizer/prompt_template.h"
#include "tokenizer/tokenizer.h"

namespace fm {
namespace {

TEST(TaskTokenization, PromptsAndAnswersRoundTripThroughTheEmbeddedTokenizer) {
  const Tokenizer t = Tokenizer::embedded("tasks");
  for (const std::string name : {"add", "sort", "reverse", "count"}) {
    TaskConfig c = TaskConfig::defaults(name);
    if (name != "add") c.alphabet = 26;  // every letter, not only the default a-d
    const auto task = make_task(c);
    for (uint64_t i = 0; i < 500; ++i) {
      const TaskExample e = task->example(i);
      for (const std::string& text : {e.prompt, e.answer, e.prompt + " " + e.answer}) {
        const std::vector<int32_t> ids = t.encode(text);
        for (int32_t id : ids) ASSERT_NE(id, t.unk_id()) << text;
        ASSERT_EQ(t.decode(ids), text);
      }
      for (const std::string tmpl : {"plain", "chat"}) {
        const PromptTemplate pt = PromptTemplate::named(tmpl);
        ASSERT_EQ(t.decode(pt.encode_prompt(t, e.prompt)), pt.render(e.prompt));
        ASSERT_EQ(t.decode(pt.encode_answer(t, e.answer)), e.answer);
      }
    }
  }
}

TEST(TaskTokenization, DigitsAndLettersAreOneTokenEach) {
  const Tokenizer t = Tokenizer::embedded("tasks");
  for (const std::string name : {"add", "sort", "count"}) {
    const auto task = make_task(TaskConfig::defaults(name));
    for (uint64_t i = 0; i < 200; ++i) {
      const std::string answer = task->example(i).answer;  // digits only
      const std::vector<int32_t> ids = t.encode(answer);
      ASSERT_EQ(ids.size(), answer.size()) << name << ": " << answer;
      for (size_t k = 0; k < ids.size(); ++k) ASSERT_EQ(t.id_to_piece(ids[k]), answer.substr(k, 1));
    }
  }
  TaskConfig rev = TaskConfig::defaults("reverse");
  rev.alphabet = 26;
  const auto task = make_task(rev);
  for (uint64_t i = 0; i < 200; ++i) {
    const std::string answer = task->example(i).answer;
    ASSERT_EQ(t.encode(answer).size(), answer.size()) << answer;
  }
  // Addition prompts: one token per character ("12+345=" is 7 tokens).
  EXPECT_EQ(t.encode("12+345=").size(), 7u);
}

TEST(TaskTokenization, PromptsFitInShortSequences) {
  // Default knobs: the chat-rendered prompt plus answer stays well inside a
  // 64-token context (the tiny preset's sequences are short).
  const Tokenizer t = Tokenizer::embedded("tasks");
  const PromptTemplate chat = PromptTemplate::named("chat");
  for (const std::string name : {"add", "sort", "reverse", "count"}) {
    const auto task = make_task(TaskConfig::defaults(name));
    size_t longest = 0;
    for (uint64_t i = 0; i < 500; ++i) {
      const TaskExample e = task->example(i);
      longest = std::max(
          longest, chat.encode_prompt(t, e.prompt).size() + chat.encode_answer(t, e.answer).size());
    }
    EXPECT_LE(longest, 48u) << name;
  }
}

}  // namespace
}  // namespace fm
