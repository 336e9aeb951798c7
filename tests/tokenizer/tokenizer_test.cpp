// The embedded "tasks" tokenizer: exact round trips, special ids, bad ids and files.
#include "tokenizer/tokenizer.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <fstream>

#include "engine/error.h"
#include "engine/rng.h"
#include "support/temp_dir.h"

namespace fm {
namespace {

using ::testing::HasSubstr;

// Appends the UTF-8 encoding of code point `cp`.
void append_utf8(std::string& s, uint32_t cp) {
  if (cp < 0x80) {
    s += static_cast<char>(cp);
  } else if (cp < 0x800) {
    s += static_cast<char>(0xC0 | (cp >> 6));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    s += static_cast<char>(0xE0 | (cp >> 12));
    s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    s += static_cast<char>(0xF0 | (cp >> 18));
    s += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// Valid UTF-8 of `n` code points: ASCII (incl. newlines, tabs, runs of spaces), Latin,
// CJK, emoji, NUL and the rest of the planes. Leaves out surrogates and U+2581 (which
// SentencePiece uses for spaces; tokenizer.h documents that it decodes as a space).
std::string random_utf8(Rng& rng, int n) {
  static const uint32_t kPicked[] = {0,       '\n',   '\t',   ' ',    ' ',
                                     '\r',    0xE9,   0x4E2D, 0x6587, 0x1F600,
                                     0x1F680, 0x2603, 0xFEFF, 0x200B, 0x10FFFF};
  std::string s;
  for (int i = 0; i < n; ++i) {
    uint32_t cp = 0;
    switch (rng.next_below(5)) {
      case 0:
        cp = 1 + static_cast<uint32_t>(rng.next_below(0x7F));
        break;
      case 1:
        cp = kPicked[rng.next_below(std::size(kPicked))];
        break;
      case 2:
        cp = 0x80 + static_cast<uint32_t>(rng.next_below(0x800 - 0x80));
        break;
      case 3:
        cp = 0x800 + static_cast<uint32_t>(rng.next_below(0x10000 - 0x800));
        break;
      default:
        cp = 0x10000 + static_cast<uint32_t>(rng.next_below(0x110000 - 0x10000));
        break;
    }
    if ((cp >= 0xD800 && cp <= 0xDFFF) || cp == 0x2581) cp = 'x';
    append_utf8(s, cp);
  }
  return s;
}

TEST(Tokenizer, EmbeddedSpecialIdsAreFixed) {
  const Tokenizer t = Tokenizer::embedded("tasks");
  EXPECT_EQ(t.pad_id(), kPadId);
  EXPECT_EQ(t.unk_id(), kUnkId);
  EXPECT_EQ(t.bos_id(), kBosId);
  EXPECT_EQ(t.eos_id(), kEosId);
  EXPECT_EQ(kPadId, 0);
  EXPECT_EQ(kUnkId, 1);
  EXPECT_EQ(kBosId, 2);
  EXPECT_EQ(kEosId, 3);
  EXPECT_EQ(t.id_to_piece(t.bos_id()), "<s>");
  EXPECT_EQ(t.id_to_piece(t.eos_id()), "</s>");
  EXPECT_EQ(t.piece_to_id("</s>"), kEosId);
  // The tiny model preset has a 512-token vocabulary.
  EXPECT_LE(t.vocab_size(), 512);
  EXPECT_GE(t.vocab_size(), 260);  // 4 specials + 256 byte pieces at least
}

TEST(Tokenizer, EmbeddedRoundTripsTaskText) {
  const Tokenizer t = Tokenizer::embedded("tasks");
  for (const std::string text :
       {"12+345= 357", "sort 3142 1234", "reverse abcd dcba", "count a in abca 2",
        "User: 7+8=\nAssistant: 15", "  two  spaces ", ""}) {
    const std::vector<int32_t> ids = t.encode(text);
    EXPECT_EQ(t.decode(ids), text) << "ids: " << ::testing::PrintToString(ids);
  }
}

TEST(Tokenizer, EmbeddedDigitsAndLettersAreOneTokenEach) {
  const Tokenizer t = Tokenizer::embedded("tasks");
  const std::vector<int32_t> ids = t.encode("9876543210");
  ASSERT_EQ(ids.size(), 10u);
  for (size_t i = 0; i < ids.size(); ++i)
    EXPECT_EQ(t.id_to_piece(ids[i]), std::string(1, "9876543210"[i]));
  EXPECT_EQ(t.encode("abcxyz").size(), 6u);
  EXPECT_EQ(t.encode("sort").size(), 1u);  // a user symbol
}

TEST(Tokenizer, RandomUtf8RoundTripsWithoutUnk) {
  const Tokenizer t = Tokenizer::embedded("tasks");
  Rng rng(7);
  for (int trial = 0; trial < 300; ++trial) {
    const std::string text = random_utf8(rng, 1 + static_cast<int>(rng.next_below(60)));
    const std::vector<int32_t> ids = t.encode(text);
    for (int32_t id : ids) ASSERT_NE(id, t.unk_id()) << "byte fallback should cover: " << text;
    ASSERT_EQ(t.decode(ids), text) << "trial " << trial;
  }
}

TEST(Tokenizer, InvalidUtf8BecomesReplacementCharacters) {
  const Tokenizer t = Tokenizer::embedded("tasks");
  EXPECT_EQ(t.decode(t.encode("a\xff b")), "a\xEF\xBF\xBD b");  // U+FFFD, as tokenizer.h says
}

TEST(Tokenizer, EncodeIsDeterministic) {
  const Tokenizer a = Tokenizer::embedded("tasks");
  const Tokenizer b = Tokenizer::from_serialized(a.serialized(), "copy");
  Rng rng(3);
  const std::string text = random_utf8(rng, 200);
  EXPECT_EQ(a.encode(text), b.encode(text));
}

TEST(Tokenizer, UnknownPieceMapsToUnk) {
  const Tokenizer t = Tokenizer::embedded("tasks");
  EXPECT_EQ(t.piece_to_id("no-such-piece"), t.unk_id());
  EXPECT_EQ(t.piece_to_id("a"), t.encode("a").at(0));
}

TEST(Tokenizer, DecodeDropsControlIds) {
  const Tokenizer t = Tokenizer::embedded("tasks");
  std::vector<int32_t> ids = {t.bos_id()};
  for (int32_t id : t.encode("1+1=")) ids.push_back(id);
  ids.push_back(t.eos_id());
  ids.push_back(t.pad_id());
  EXPECT_EQ(t.decode(ids), "1+1=");
}

TEST(Tokenizer, DecodeOfOutOfRangeIdIsAnError) {
  const Tokenizer t = Tokenizer::embedded("tasks");
  for (int32_t bad : {-1, t.vocab_size(), 1 << 20}) {
    try {
      (void)t.decode({t.bos_id(), bad});
      FAIL() << "id " << bad << " accepted";
    } catch (const Error& e) {
      EXPECT_THAT(e.what(), HasSubstr(std::to_string(bad)));
      EXPECT_THAT(e.what(), HasSubstr("out of range"));
      EXPECT_THAT(e.what(), HasSubstr("tasks"));
    }
  }
  EXPECT_THROW((void)t.id_to_piece(t.vocab_size()), Error);
}

TEST(Tokenizer, UnknownEmbeddedNameListsKnownOnes) {
  try {
    (void)Tokenizer::embedded("nope");
    FAIL();
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("nope"));
    EXPECT_THAT(e.what(), HasSubstr("tasks"));
  }
  EXPECT_THAT(Tokenizer::embedded_names(), ::testing::Contains("tasks"));
}

class TokenizerFiles : public fm::testing::TempDirTest {};

TEST_F(TokenizerFiles, MissingFileErrorNamesIt) {
  const std::string path = file("missing.model");
  try {
    (void)Tokenizer::load(path);
    FAIL();
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr(path));
  }
}

TEST_F(TokenizerFiles, CorruptFileErrorNamesIt) {
  const Tokenizer good = Tokenizer::embedded("tasks");
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"empty.model", ""},
      {"text.model", "this is not a protobuf\n"},
      {"truncated.model", good.serialized().substr(0, good.serialized().size() / 2)},
  };
  for (const auto& [name, bytes] : cases) {
    const std::string path = file(name);
    std::ofstream(path, std::ios::binary) << bytes;
    try {
      (void)Tokenizer::load(path);
      FAIL() << name << " accepted";
    } catch (const Error& e) {
      EXPECT_THAT(e.what(), HasSubstr(path));
      EXPECT_THAT(e.what(), HasSubstr("not a SentencePiece model"));
    }
  }
}

TEST_F(TokenizerFiles, LoadsAModelFile) {
  const Tokenizer good = Tokenizer::embedded("tasks");
  const std::string path = file("tasks.model");
  std::ofstream(path, std::ios::binary) << good.serialized();
  const Tokenizer t = Tokenizer::load(path);
  EXPECT_EQ(t.origin(), path);
  EXPECT_EQ(t.vocab_size(), good.vocab_size());
  EXPECT_EQ(t.encode("count b in abba"), good.encode("count b in abba"));
}

}  // namespace
}  // namespace fm
