// Prompt templates: rendering and the bos/eos framing of prompt and answer ids.
#include "tokenizer/prompt_template.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "engine/error.h"
#include "tokenizer/tokenizer.h"

namespace fm {
namespace {

TEST(PromptTemplate, PlainRendersThePromptAlone) {
  EXPECT_EQ(PromptTemplate::named("plain").render("12+3="), "12+3=");
}

TEST(PromptTemplate, ChatRendersUserAndAssistantTurns) {
  EXPECT_EQ(PromptTemplate::named("chat").render("sort 321"), "User: sort 321\nAssistant: ");
}

TEST(PromptTemplate, EncodePromptStartsWithBos) {
  const Tokenizer t = Tokenizer::embedded("tasks");
  const PromptTemplate chat = PromptTemplate::named("chat");
  const std::vector<int32_t> ids = chat.encode_prompt(t, "7+8=");
  ASSERT_FALSE(ids.empty());
  EXPECT_EQ(ids.front(), t.bos_id());
  EXPECT_EQ(std::vector<int32_t>(ids.begin() + 1, ids.end()), t.encode(chat.render("7+8=")));
  EXPECT_EQ(t.decode(ids), "User: 7+8=\nAssistant: ");
}

TEST(PromptTemplate, EncodeAnswerEndsWithEos) {
  const Tokenizer t = Tokenizer::embedded("tasks");
  const std::vector<int32_t> ids = PromptTemplate::named("plain").encode_answer(t, "15");
  ASSERT_EQ(ids.size(), 3u);  // "1", "5", eos
  EXPECT_EQ(ids.back(), t.eos_id());
  EXPECT_EQ(t.decode(ids), "15");
}

TEST(PromptTemplate, UnknownNameListsKnownOnes) {
  try {
    (void)PromptTemplate::named("llama");
    FAIL();
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), ::testing::HasSubstr("llama"));
    EXPECT_THAT(e.what(), ::testing::HasSubstr("plain, chat"));
  }
}

}  // namespace
}  // namespace fm
