// Training a SentencePiece tokenizer whose round trips are exact:
//   identity normalization, no whitespace collapsing, no dummy prefix;
//   byte_fallback (any UTF-8 byte has a piece, so nothing becomes unk);
//   split_digits (every digit is its own token: the arithmetic tasks need it);
//   special ids pad=0 unk=1 bos=2 eos=3 (tokenizer/tokenizer.h);
//   character_coverage 1.0 and one thread, so the same corpus gives the same model.
// Each non-empty line of each input file is one training sentence.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace fm {

struct TokenizerTrainOptions {
  std::vector<std::string> inputs;     // text files, one sentence per line
  int64_t vocab_size = 512;            // an upper bound (SentencePiece's hard_vocab_limit=false)
  std::string model_type = "unigram";  // unigram | bpe
  std::string out_prefix;              // writes <out_prefix>.model and <out_prefix>.vocab
  // Longest piece, in characters. 1 makes every character its own token (the shipped
  // tasks tokenizer: reversing or sorting a string then works token by token).
  int64_t max_piece_length = 16;
  // Pieces kept whole wherever they occur in the text ("sort", "User:").
  std::vector<std::string> user_symbols;
  bool quiet = true;  // silence SentencePiece's progress log
};

struct TokenizerTrainResult {
  std::string model_path;
  std::string vocab_path;
  int32_t vocab_size = 0;  // what SentencePiece produced (<= the requested size)
  int64_t sentences = 0;
};

// Errors name the missing/unreadable input, a bad option, or SentencePiece's own complaint.
TokenizerTrainResult train_tokenizer(const TokenizerTrainOptions& options);

}  // namespace fm
