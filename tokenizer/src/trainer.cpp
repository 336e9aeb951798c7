#include "tokenizer/trainer.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <filesystem>
#include <unordered_map>

#include "engine/error.h"
#include "engine/files.h"
#include "tokenizer/tokenizer.h"

namespace fm {
namespace {

// Feeds the non-empty lines of the (already read) inputs to SentencePiece.
class LineIterator : public sentencepiece::SentenceIterator {
 public:
  explicit LineIterator(const std::vector<std::string>& lines) : lines_(lines) {}
  bool done() const override { return i_ >= lines_.size(); }
  void Next() override { ++i_; }
  const std::string& value() const override { return lines_[i_]; }
  sentencepiece::util::Status status() const override { return {}; }

 private:
  const std::vector<std::string>& lines_;
  size_t i_ = 0;
};

std::vector<std::string> read_lines(const std::vector<std::string>& paths) {
  std::vector<std::string> lines;
  for (const std::string& path : paths) {
    FM_CHECK(std::filesystem::is_regular_file(path), "{}: tokenizer training input not found",
             path);
    const std::string text = read_file(path);
    size_t start = 0;
    while (start < text.size()) {
      size_t end = text.find('\n', start);
      if (end == std::string::npos) end = text.size();
      if (end > start) lines.emplace_back(text.substr(start, end - start));
      start = end + 1;
    }
  }
  return lines;
}

}  // namespace

TokenizerTrainResult train_tokenizer(const TokenizerTrainOptions& o) {
  FM_CHECK(!o.inputs.empty(), "tokenizer training: no input files given");
  FM_CHECK(!o.out_prefix.empty(), "tokenizer training: no output prefix given");
  FM_CHECK(o.model_type == "unigram" || o.model_type == "bpe",
           "tokenizer training: model type must be unigram or bpe (got '{}')", o.model_type);
  // 256 byte pieces + 4 specials is the floor; SentencePiece needs a few more for characters.
  FM_CHECK(o.vocab_size >= 260 && o.vocab_size <= 1'000'000,
           "tokenizer training: vocab size must be in [260, 1000000] with byte fallback (got {})",
           o.vocab_size);
  FM_CHECK(o.max_piece_length >= 1 && o.max_piece_length <= 16,
           "tokenizer training: max piece length must be in [1, 16] (got {})", o.max_piece_length);
  for (const std::string& symbol : o.user_symbols)
    FM_CHECK(!symbol.empty() && symbol.find(',') == std::string::npos,
             "tokenizer training: user symbol '{}' must be non-empty and hold no comma", symbol);
  const std::vector<std::string> lines = read_lines(o.inputs);
  FM_CHECK(!lines.empty(), "{}: tokenizer training input holds no text", fmt::join(o.inputs, ", "));

  const std::unordered_map<std::string, std::string> args = {
      {"model_type", o.model_type},
      {"vocab_size", std::to_string(o.vocab_size)},
      {"hard_vocab_limit", "false"},
      {"character_coverage", "1.0"},
      {"normalization_rule_name", "identity"},
      {"remove_extra_whitespaces", "false"},
      {"add_dummy_prefix", "false"},
      {"allow_whitespace_only_pieces", "true"},
      {"byte_fallback", "true"},
      {"split_digits", "true"},
      {"pad_id", std::to_string(kPadId)},
      {"unk_id", std::to_string(kUnkId)},
      {"bos_id", std::to_string(kBosId)},
      {"eos_id", std::to_string(kEosId)},
      {"max_sentencepiece_length", std::to_string(o.max_piece_length)},
      {"user_defined_symbols", fmt::format("{}", fmt::join(o.user_symbols, ","))},
      {"num_threads", "1"},
      {"minloglevel", o.quiet ? "2" : "0"},
  };
  LineIterator it(lines);
  std::string serialized;
  const auto status = sentencepiece::SentencePieceTrainer::Train(args, &it, &serialized);
  FM_CHECK(status.ok(), "{}: tokenizer training failed ({})", fmt::join(o.inputs, ", "),
           status.ToString());

  // Reload to check the model and write the human-readable vocabulary next to it.
  sentencepiece::SentencePieceProcessor sp;
  const auto loaded = sp.LoadFromSerializedProto(serialized);
  FM_CHECK(loaded.ok(), "tokenizer training produced an unreadable model ({})", loaded.ToString());
  std::string vocab;
  for (int id = 0; id < sp.GetPieceSize(); ++id)
    vocab += fmt::format("{}\t{}\n", sp.IdToPiece(id), sp.GetScore(id));

  TokenizerTrainResult r;
  r.model_path = o.out_prefix + ".model";
  r.vocab_path = o.out_prefix + ".vocab";
  r.vocab_size = sp.GetPieceSize();
  r.sentences = static_cast<int64_t>(lines.size());
  const auto parent = std::filesystem::path(r.model_path).parent_path();
  if (!parent.empty()) make_dirs(parent.string());
  write_file_atomic(r.model_path, serialized);
  write_file_atomic(r.vocab_path, vocab);
  return r;
}

}  // namespace fm
