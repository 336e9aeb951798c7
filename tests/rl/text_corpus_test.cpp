// Text data for pretraining: the deterministic train/held-out split, the token streams and
// the windows cut from them, the Brown corpus conversion, the synthetic corpus, and the
// config errors.
#include "rl/text_corpus.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <set>

#include "engine/files.h"
#include "rl/lm_trainer.h"
#include "support/temp_dir.h"

namespace fm {
namespace {

using ::testing::HasSubstr;

class TextCorpusTest : public testing::TempDirTest {};

std::string numbered_lines(int n) {
  std::string s;
  for (int i = 0; i < n; ++i) s += fmt::format("line {}\n", i);
  return s;
}

TEST_F(TextCorpusTest, SplitHoldsOutEveryKthBlockAndLosesNothing) {
  write_file_atomic(file("a.txt"), numbered_lines(23) + "\n   \n");  // blank lines dropped
  write_file_atomic(file("b.txt"), numbered_lines(7));
  TextDataConfig c;
  c.files = {file("a.txt"), file("b.txt")};
  c.valid_fraction = 0.25;  // every 4th block of 3 lines
  c.block_lines = 3;
  const TextSplit s = split_text_files(c);
  // 30 lines = 10 blocks; blocks 3 and 7 (lines 9-11 and 21-23) are held out.
  ASSERT_EQ(s.valid.size(), 6u);
  EXPECT_EQ(s.valid[0], "line 9");
  EXPECT_EQ(s.valid[2], "line 11");
  EXPECT_EQ(s.valid[3], "line 21");
  EXPECT_EQ(s.valid[5], "line 0");  // line 23 overall: the first line of b.txt
  EXPECT_EQ(s.train.size(), 24u);
  EXPECT_EQ(s.train.front(), "line 0");
  EXPECT_EQ(s.train.back(), "line 6");
  EXPECT_EQ(split_text_files(c).train, s.train);  // deterministic
}

TEST_F(TextCorpusTest, SplitErrorsNameTheFile) {
  TextDataConfig c;
  c.files = {file("none.txt")};
  EXPECT_THAT([&] { split_text_files(c); },
              ::testing::ThrowsMessage<std::exception>(HasSubstr("none.txt")));
  write_file_atomic(file("short.txt"), numbered_lines(30));
  c.files = {file("short.txt")};
  c.valid_fraction = 0.05;  // 1 block in 20, but 30 lines are only 1 block of 50
  EXPECT_THAT([&] { split_text_files(c); },
              ::testing::ThrowsMessage<std::exception>(HasSubstr("short.txt")));
}

TEST_F(TextCorpusTest, StreamsWindowsAndHeldOutBatches) {
  write_file_atomic(file("text.txt"), synthetic_corpus(1500, 3));
  TextDataConfig c;
  c.files = {file("text.txt")};
  c.valid_fraction = 0.1;
  c.block_lines = 10;
  c.vocab_size = 320;
  const TextSplit split = split_text_files(c);
  std::string log;
  const Tokenizer tok = prepare_tokenizer(c, split, dir_.string(), &log);
  EXPECT_THAT(log, HasSubstr("trained on 1350 training lines"));
  EXPECT_TRUE(std::filesystem::exists(file("tokenizer.model")));
  EXPECT_FALSE(std::filesystem::exists(file("tokenizer_train.txt")));
  // A second call reuses the file (a resumed run keeps its tokenizer).
  prepare_tokenizer(c, split, dir_.string(), &log);
  EXPECT_THAT(log, HasSubstr("already in the run directory"));

  const TextCorpus corpus(split, tok);
  EXPECT_EQ(corpus.vocab_size(), tok.vocab_size());
  // The training stream: every line's ids then eos, in order.
  std::vector<int32_t> expect;
  for (const std::string& l : split.train) {
    for (int32_t id : tok.encode(l)) expect.push_back(id);
    expect.push_back(kEosId);
  }
  EXPECT_EQ(corpus.train_stream(), expect);

  Rng rng(5, 1);
  const Batch b = corpus.sample(rng, 3, 16);
  ASSERT_EQ(b.size(), 48);
  EXPECT_EQ(b.seq_offsets, (std::vector<int64_t>{0, 16, 32, 48}));
  const auto& st = corpus.train_stream();
  for (int s = 0; s < 3; ++s) {
    // Each sequence is a window of the stream, its targets the window shifted by one.
    const auto start = std::search(st.begin(), st.end(), b.tokens.begin() + s * 16,
                                   b.tokens.begin() + (s + 1) * 16);
    ASSERT_NE(start, st.end());
    for (int t = 0; t < 16; ++t)
      EXPECT_EQ(b.targets[static_cast<size_t>(s * 16 + t)], *(start + t + 1));
  }

  // Held-out batches tile the held-out stream in order, each target once.
  const std::vector<Batch> v = corpus.validation_batches(4, 16, 200);
  ASSERT_EQ(v.size(), 3u);  // 200 tokens: 3 whole batches of 64
  for (size_t i = 0; i < v.size(); ++i)
    for (size_t n = 0; n < 64; ++n) {
      EXPECT_EQ(v[i].tokens[n], corpus.valid_stream()[i * 64 + n]);
      EXPECT_EQ(v[i].targets[n], corpus.valid_stream()[i * 64 + n + 1]);
    }
  EXPECT_THAT([&] { corpus.validation_batches(4, 16'000); },
              ::testing::ThrowsMessage<std::exception>(HasSubstr("held-out stream")));
}

TEST(TextCorpus, StripsBrownTags) {
  EXPECT_EQ(strip_brown_tags("\tThe/at Fulton/np-tl jury/nn said/vbd ./.\n"),
            "The Fulton jury said .");
  EXPECT_EQ(strip_brown_tags("``/`` no/at evidence/nn ''/''"), "\" no evidence \"");
  EXPECT_EQ(strip_brown_tags("1/2/cd Atlanta's/np$"), "1/2 Atlanta's");  // the last '/' splits
  EXPECT_EQ(strip_brown_tags("   \t "), "");
}

TEST_F(TextCorpusTest, ConvertsABrownPackage) {
  write_file_atomic(file("cb02"), "\n\n\tSecond/od doc/nn ./.\n");
  write_file_atomic(file("ca01"), "\n\n\tThe/at jury/nn ./.\n\n\n\tIt/pps said/vbd ./.\n");
  write_file_atomic(file("README"), "not a document/nn\n");
  write_file_atomic(file("cats.txt"), "ca01 news\n");
  const BrownConversion r = convert_brown_corpus(dir_.string(), file("out/brown.txt"));
  EXPECT_EQ(r.documents, 2);
  EXPECT_EQ(r.sentences, 3);
  EXPECT_EQ(r.words, 9);
  EXPECT_EQ(read_file(file("out/brown.txt")), "The jury .\nIt said .\nSecond doc .\n");
  std::filesystem::create_directories(file("empty"));
  EXPECT_THAT([&] { convert_brown_corpus(file("empty"), file("x.txt")); },
              ::testing::ThrowsMessage<std::exception>(HasSubstr("no Brown corpus documents")));
  EXPECT_FALSE(std::filesystem::exists(file("x.txt")));
}

TEST(TextCorpus, SyntheticCorpusIsDeterministicSentences) {
  const std::string a = synthetic_corpus(200, 9);
  EXPECT_EQ(a, synthetic_corpus(200, 9));
  EXPECT_NE(a, synthetic_corpus(200, 10));
  EXPECT_EQ(std::count(a.begin(), a.end(), '\n'), 200);
  std::set<std::string> words;
  size_t i = 0;
  while (i < a.size()) {
    const size_t j = a.find_first_of(" \n", i);
    words.insert(a.substr(i, j - i));
    i = j + 1;
  }
  EXPECT_GT(words.size(), 100u);  // a real vocabulary, Zipf-distributed
}

TEST_F(TextCorpusTest, ConfigErrorsNameTheKey) {
  write_file_atomic(file("t.txt"), synthetic_corpus(300, 1));
  auto parse_with = [&](const std::string& data) {
    return LmRunConfig::parse("model: tiny\ntrain: {seq_len: 16, eval_tokens: 1024}\n" + data,
                              "cfg.yaml");
  };
  EXPECT_THAT([&] { parse_with("data: {files: [" + file("t.txt") + "]}\ntask: {symbols: 8}"); },
              ::testing::ThrowsMessage<std::exception>(HasSubstr("cfg.yaml: task: ")));
  EXPECT_THAT([&] { parse_with("data: {files: [" + file("gone.txt") + "]}"); },
              ::testing::ThrowsMessage<std::exception>(HasSubstr("data.files: '")));
  EXPECT_THAT([&] { parse_with("data: {files: [" + file("t.txt") + "], valid_fraction: 0.9}"); },
              ::testing::ThrowsMessage<std::exception>(HasSubstr("data.valid_fraction")));
  EXPECT_THAT([&] { parse_with("data: {files: [" + file("t.txt") + "], tokenizer_type: x}"); },
              ::testing::ThrowsMessage<std::exception>(HasSubstr("data.tokenizer_type")));
  EXPECT_THAT([&] { parse_with("data: {files: []}"); },
              ::testing::ThrowsMessage<std::exception>(HasSubstr("data.files")));
  EXPECT_NO_THROW(parse_with("data: {files: [" + file("t.txt") + "]}"));
}

}  // namespace
}  // namespace fm
