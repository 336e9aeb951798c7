// train_tokenizer: a small corpus in a temp dir → a model with exact round trips,
// fixed special ids, one token per digit, the same bytes every time.
#include "tokenizer/trainer.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <fstream>

#include "engine/error.h"
#include "engine/files.h"
#include "engine/rng.h"
#include "support/temp_dir.h"
#include "tokenizer/tokenizer.h"

namespace fm {
namespace {

using ::testing::HasSubstr;

class TokenizerTrainer : public fm::testing::TempDirTest {
 protected:
  // A few hundred lines of words and numbers: enough for SentencePiece to find pieces.
  std::string write_corpus(const std::string& name) {
    const std::string path = file(name);
    std::ofstream out(path);
    Rng rng(11);
    const char* words[] = {"the", "expert", "router", "mixture", "token", "sort", "reverse"};
    for (int line = 0; line < 400; ++line) {
      for (int w = 0; w < 6; ++w) out << words[rng.next_below(std::size(words))] << ' ';
      out << rng.next_below(100000) << "+" << rng.next_below(1000) << "=\n";
    }
    return path;
  }
};

TEST_F(TokenizerTrainer, TrainedModelReloadsWithExactRoundTrips) {
  for (const std::string type : {"unigram", "bpe"}) {
    TokenizerTrainOptions o;
    o.inputs = {write_corpus("corpus.txt")};
    o.vocab_size = 320;
    o.model_type = type;
    o.out_prefix = file("out/" + type);
    const TokenizerTrainResult r = train_tokenizer(o);
    EXPECT_EQ(r.model_path, o.out_prefix + ".model");
    EXPECT_EQ(r.sentences, 400);
    EXPECT_LE(r.vocab_size, 320);
    const Tokenizer t = Tokenizer::load(r.model_path);
    EXPECT_EQ(t.vocab_size(), r.vocab_size);
    EXPECT_EQ(t.pad_id(), 0);
    EXPECT_EQ(t.unk_id(), 1);
    EXPECT_EQ(t.bos_id(), 2);
    EXPECT_EQ(t.eos_id(), 3);
    for (const std::string text : {"the router sorts 12345 tokens", "  leading and  double ",
                                   "unseen: Ünïcödé 中文 🙂\n\ttab", "98765+4321="}) {
      EXPECT_EQ(t.decode(t.encode(text)), text) << type;
    }
    // split_digits: every digit is its own token.
    const std::vector<int32_t> digits = t.encode("9081726354");
    EXPECT_EQ(digits.size(), 10u) << type;
    // The human-readable vocabulary has one line per piece.
    const std::string vocab = read_file(r.vocab_path);
    EXPECT_EQ(std::count(vocab.begin(), vocab.end(), '\n'), r.vocab_size);
  }
}

TEST_F(TokenizerTrainer, SameCorpusGivesIdenticalModel) {
  TokenizerTrainOptions o;
  o.inputs = {write_corpus("corpus.txt")};
  o.vocab_size = 300;
  o.out_prefix = file("a");
  const std::string a = read_file(train_tokenizer(o).model_path);
  o.out_prefix = file("b");
  const std::string b = read_file(train_tokenizer(o).model_path);
  EXPECT_EQ(a, b);
}

TEST_F(TokenizerTrainer, MaxPieceLengthOneAndUserSymbols) {
  TokenizerTrainOptions o;
  o.inputs = {write_corpus("corpus.txt")};
  o.vocab_size = 400;
  o.max_piece_length = 1;
  o.user_symbols = {"router", "User:"};
  o.out_prefix = file("chars");
  const Tokenizer t = Tokenizer::load(train_tokenizer(o).model_path);
  EXPECT_EQ(t.id_to_piece(4), "router");  // user symbols follow the specials
  EXPECT_EQ(t.id_to_piece(5), "User:");
  EXPECT_EQ(t.encode("router").size(), 1u);
  EXPECT_EQ(t.encode("expert").size(), 6u);  // one token per character
}

TEST_F(TokenizerTrainer, MissingInputErrorNamesTheFile) {
  TokenizerTrainOptions o;
  o.inputs = {write_corpus("corpus.txt"), file("missing.txt")};
  o.out_prefix = file("x");
  try {
    train_tokenizer(o);
    FAIL();
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr(file("missing.txt")));
  }
}

TEST_F(TokenizerTrainer, EmptyInputIsAnError) {
  std::ofstream(file("empty.txt")) << "\n\n";
  TokenizerTrainOptions o;
  o.inputs = {file("empty.txt")};
  o.out_prefix = file("x");
  try {
    train_tokenizer(o);
    FAIL();
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("empty.txt"));
    EXPECT_THAT(e.what(), HasSubstr("no text"));
  }
}

TEST_F(TokenizerTrainer, BadOptionsAreErrors) {
  TokenizerTrainOptions o;
  o.inputs = {write_corpus("corpus.txt")};
  o.out_prefix = file("x");
  o.vocab_size = 100;  // below 256 bytes + 4 specials
  EXPECT_THROW(train_tokenizer(o), Error);
  o.vocab_size = 300;
  o.model_type = "wordpiece";
  EXPECT_THROW(train_tokenizer(o), Error);
  o.model_type = "unigram";
  o.max_piece_length = 0;
  EXPECT_THROW(train_tokenizer(o), Error);
}

}  // namespace
}  // namespace fm
