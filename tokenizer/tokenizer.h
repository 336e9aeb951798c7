// Tokenizer: a SentencePiece model behind foremoe's own interface (ids are
// int32_t, errors are fm::Error naming the model's origin). Models trained by
// train_tokenizer() (tokenizer/trainer.h) round-trip any valid UTF-8 text
// exactly (NUL, newlines and runs of spaces included), except that U+2581
// ("▁", SentencePiece's whitespace mark) decodes as a space. Invalid UTF-8 is
// not an error: SentencePiece encodes each bad byte as U+FFFD.
//
// Special ids are fixed for every foremoe tokenizer:
//   pad = 0, unk = 1, bos = 2, eos = 3.
// The shipped tokenizer ("tasks", tokenizer/data/tasks.model) is compiled into
// the library and covers the embedded verifiable tasks (rl/tasks/).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace fm {

inline constexpr int32_t kPadId = 0;
inline constexpr int32_t kUnkId = 1;
inline constexpr int32_t kBosId = 2;
inline constexpr int32_t kEosId = 3;

class Tokenizer {
 public:
  // A SentencePiece .model file. Errors: "<path>: cannot open (...)", "<path>: not a
  // SentencePiece model (...)".
  static Tokenizer load(const std::string& path);
  // A serialized ModelProto; `origin` stands for the file name in messages.
  static Tokenizer from_serialized(std::string bytes, std::string origin);
  // A tokenizer compiled into the binary ("tasks"); unknown names list the known ones.
  static Tokenizer embedded(const std::string& name);
  static std::vector<std::string> embedded_names();

  std::vector<int32_t> encode(std::string_view text) const;
  // Control ids (pad, bos, eos) decode to nothing; ids outside [0, vocab_size()) are an error.
  std::string decode(const std::vector<int32_t>& ids) const;

  int32_t vocab_size() const;
  int32_t pad_id() const;
  int32_t unk_id() const;
  int32_t bos_id() const;
  int32_t eos_id() const;
  // The piece's text ("▁sort", "<0x0A>", "<s>"); an id out of range is an error.
  std::string id_to_piece(int32_t id) const;
  // unk_id() for a piece not in the vocabulary.
  int32_t piece_to_id(std::string_view piece) const;

  const std::string& origin() const { return origin_; }
  // The serialized model (what load() read), e.g. to store next to a checkpoint.
  const std::string& serialized() const;

 private:
  struct Impl;
  Tokenizer(std::shared_ptr<const Impl> impl, std::string origin);
  void check_id(int32_t id) const;

  std::shared_ptr<const Impl> impl_;
  std::string origin_;
};

}  // namespace fm
