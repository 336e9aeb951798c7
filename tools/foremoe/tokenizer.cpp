// `foremoe tokenizer train|encode|decode`: SentencePiece tokenizers with exact
// round trips (tokenizer/trainer.h), and a look at how text tokenizes.
#include "tokenizer/tokenizer.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <charconv>
#include <memory>

#include "engine/error.h"
#include "tokenizer/trainer.h"
#include "tools/foremoe/commands.h"

namespace fm::cli {

struct TokenizerArgs {
  TokenizerTrainOptions train;
  std::string text;
  std::string ids;
  std::string model;  // empty: the embedded "tasks" tokenizer
  bool pieces = false;
};

static Tokenizer pick_tokenizer(const std::string& model) {
  return model.empty() ? Tokenizer::embedded("tasks") : Tokenizer::load(model);
}

static std::vector<int32_t> parse_ids(const std::string& text) {
  std::vector<int32_t> ids;
  size_t start = 0;
  while (start <= text.size()) {
    size_t end = text.find(',', start);
    if (end == std::string::npos) end = text.size();
    std::string_view item(text.data() + start, end - start);
    while (!item.empty() && item.front() == ' ') item.remove_prefix(1);
    while (!item.empty() && item.back() == ' ') item.remove_suffix(1);
    int32_t id = 0;
    const auto [ptr, ec] = std::from_chars(item.data(), item.data() + item.size(), id);
    FM_CHECK(!item.empty() && ec == std::errc() && ptr == item.data() + item.size(),
             "--ids: expected comma-separated integers, got '{}' in '{}'", item, text);
    ids.push_back(id);
    start = end + 1;
  }
  return ids;
}

Runner add_tokenizer(CLI::App& app) {
  auto* cmd = app.add_subcommand("tokenizer", "Train a tokenizer, or encode/decode with one");
  cmd->require_subcommand(1);
  auto a = std::make_shared<TokenizerArgs>();
  auto mode = std::make_shared<std::string>();

  auto* train = cmd->add_subcommand("train", "Train a SentencePiece tokenizer (exact round trips)");
  train->add_option("--input", a->train.inputs, "text files, one sentence per line")
      ->required()
      ->check(CLI::ExistingFile);
  train->add_option("--vocab", a->train.vocab_size, "vocabulary size (an upper bound)")
      ->capture_default_str();
  train->add_option("--out", a->train.out_prefix, "writes <out>.model and <out>.vocab")->required();
  train->add_option("--model-type", a->train.model_type, "unigram or bpe")
      ->check(CLI::IsMember({"unigram", "bpe"}))
      ->capture_default_str();
  train
      ->add_option("--max-piece-length", a->train.max_piece_length,
                   "longest piece in characters (1: one token per character)")
      ->capture_default_str();
  train->add_option("--user-symbols", a->train.user_symbols, "pieces kept whole (\"sort,User:\")")
      ->delimiter(',');
  train->callback([mode] { *mode = "train"; });

  auto* encode = cmd->add_subcommand("encode", "Print the token ids of a text");
  encode->add_option("--text", a->text, "text to encode")->required();
  encode->add_option("--model", a->model, "a .model file (default: the embedded 'tasks')");
  encode->add_flag("--pieces", a->pieces, "print the pieces too");
  encode->callback([mode] { *mode = "encode"; });

  auto* decode = cmd->add_subcommand("decode", "Print the text of comma-separated token ids");
  decode->add_option("--ids", a->ids, "e.g. \"2,45,17\"")->required();
  decode->add_option("--model", a->model, "a .model file (default: the embedded 'tasks')");
  decode->callback([mode] { *mode = "decode"; });

  return [a, mode] {
    if (*mode == "train") {
      const TokenizerTrainResult r = train_tokenizer(a->train);
      fmt::print("trained on {} sentences: {} ({} pieces), {}\n", r.sentences, r.model_path,
                 r.vocab_size, r.vocab_path);
    } else if (*mode == "encode") {
      const Tokenizer t = pick_tokenizer(a->model);
      const std::vector<int32_t> ids = t.encode(a->text);
      fmt::print("{}\n", fmt::join(ids, ","));
      if (a->pieces) {
        std::vector<std::string> pieces;
        for (int32_t id : ids) pieces.push_back(t.id_to_piece(id));
        fmt::print("{}\n", fmt::join(pieces, " "));
      }
    } else {
      const Tokenizer t = pick_tokenizer(a->model);
      fmt::print("{}\n", t.decode(parse_ids(a->ids)));
    }
    return 0;
  };
}

}  // namespace fm::cli
