// ConfigNode: strict typed reads from YAML, unknown-key detection, and error
// messages that name the file, the dotted key path and what was expected.
#include "engine/config.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>

#include "engine/error.h"
#include "support/temp_dir.h"

namespace fm {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using ::testing::Not;

constexpr const char* kOrigin = "<embedded test.yaml>";

// The message `f` throws as fm::Error (fails the test if it does not throw).
std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "did not throw";
  return "";
}

class Config : public testing::TempDirTest {
 protected:
  std::string write(const std::string& name, const std::string& text) const {
    const std::string path = (dir_ / name).string();
    std::ofstream(path) << text;
    return path;
  }
};

TEST_F(Config, ReadsEveryValueType) {
  const ConfigNode root = ConfigNode::parse(R"(
flag: true
off_flag: False
small: -7
big: 9000000000
hex: 0x10
count: 18446744073709551615
ratio: 1e-3
half: .5
whole: 2
neg_inf: -.inf
name: tiny moe
quoted: "64"
dims: [4, 8, -2]
weights: [0.5, 1, 2e2]
names:
  - a
  - b c
)",
                                            kOrigin);
  EXPECT_TRUE(root.get<bool>("flag"));
  EXPECT_FALSE(root.get<bool>("off_flag"));
  EXPECT_EQ(root.get<int>("small"), -7);
  EXPECT_EQ(root.get<int64_t>("big"), 9000000000);
  EXPECT_EQ(root.get<int64_t>("hex"), 16);
  EXPECT_EQ(root.get<uint64_t>("count"), UINT64_MAX);
  EXPECT_DOUBLE_EQ(root.get<double>("ratio"), 1e-3);
  EXPECT_FLOAT_EQ(root.get<float>("half"), 0.5f);
  EXPECT_DOUBLE_EQ(root.get<double>("whole"), 2.0);  // an integer is a fine number
  EXPECT_TRUE(std::isinf(root.get<double>("neg_inf")) && root.get<double>("neg_inf") < 0);
  EXPECT_EQ(root.get<std::string>("name"), "tiny moe");
  EXPECT_EQ(root.get<std::string>("quoted"), "64");
  EXPECT_EQ(root.get<std::vector<int64_t>>("dims"), (std::vector<int64_t>{4, 8, -2}));
  EXPECT_EQ(root.get<std::vector<double>>("weights"), (std::vector<double>{0.5, 1.0, 200.0}));
  EXPECT_EQ(root.get<std::vector<std::string>>("names"), (std::vector<std::string>{"a", "b c"}));
  EXPECT_EQ(root.keys().size(), 15u);
  EXPECT_EQ(root.keys().front(), "flag");
  EXPECT_EQ(root.origin(), kOrigin);
  root.finish();
}

TEST_F(Config, OptionalKeysFallBackWhenAbsentOrNull) {
  const ConfigNode root = ConfigNode::parse("a: 3\nb:\nc: ~\n", kOrigin);
  EXPECT_EQ(root.get<int64_t>("a", 9), 3);
  EXPECT_EQ(root.get<int64_t>("b", 9), 9);
  EXPECT_EQ(root.get<std::string>("c", "dflt"), "dflt");
  EXPECT_EQ(root.get<double>("absent", 0.25), 0.25);
  EXPECT_TRUE(root.has("a"));
  EXPECT_FALSE(root.has("b"));  // null counts as absent
  EXPECT_FALSE(root.has("absent"));
  root.finish();
}

TEST_F(Config, IsMappingTellsASectionFromAScalar) {
  const ConfigNode root = ConfigNode::parse("model: tiny\ntrain:\n  steps: 3\n", kOrigin);
  EXPECT_FALSE(root.is_mapping("model"));
  EXPECT_TRUE(root.is_mapping("train"));
  EXPECT_FALSE(root.is_mapping("absent"));
  EXPECT_EQ(root.get<std::string>("model"), "tiny");
  // is_mapping() does not count as reading the key.
  EXPECT_THAT(error_of([&] { root.finish(); }), HasSubstr(": train: unknown key"));
}

TEST_F(Config, FinishPassesWhenEveryKeyWasRead) {
  const ConfigNode root =
      ConfigNode::parse("model:\n  hidden: 64\n  router:\n    alpha: 0.1\nseed: 1\n", kOrigin);
  const ConfigNode model = root.child("model");
  EXPECT_EQ(model.get_positive("hidden"), 64);
  EXPECT_DOUBLE_EQ(model.child("router").get_in_range("alpha", 0.0, 1.0, 0.5), 0.1);
  EXPECT_EQ(root.get<int>("seed"), 1);
  EXPECT_NO_THROW(root.finish());
  EXPECT_NO_THROW(model.finish());
}

TEST_F(Config, UnknownNestedKeyNamesTheDottedPath) {
  const ConfigNode root =
      ConfigNode::parse("model:\n  hidden: 64\n  router:\n    alfa: 0.1\n  hiden: 3\n", kOrigin);
  const ConfigNode model = root.child("model");
  (void)model.get<int64_t>("hidden");
  (void)model.child("router").get<double>("alpha", 0.5);
  const std::string msg = error_of([&] { root.finish(); });
  EXPECT_THAT(msg, HasSubstr(std::string(kOrigin) +
                             ": model.router.alfa: unknown key (line 4; did you mean 'alpha'?)"));
  EXPECT_THAT(msg, HasSubstr(": model.hiden: unknown key (line 5"));
  // finish() on a child checks only that subtree.
  EXPECT_THAT(error_of([&] { model.child("router").finish(); }), Not(HasSubstr("model.hiden")));
}

TEST_F(Config, UnreadSectionIsReportedOnceNotPerChild) {
  const ConfigNode root = ConfigNode::parse("a: 1\ntrain:\n  lr: 1\n  steps: 2\n", kOrigin);
  (void)root.get<int>("a");
  const std::string msg = error_of([&] { root.finish(); });
  EXPECT_THAT(msg, HasSubstr(": train: unknown key"));
  EXPECT_THAT(msg, Not(HasSubstr("train.lr")));
}

TEST_F(Config, CopiesOfChildrenShareTheReadKeys) {
  const ConfigNode root = ConfigNode::parse("m:\n  x: 1\n  y: 2\n", kOrigin);
  ConfigNode a = root.child("m");
  const ConfigNode b = a;  // copy
  (void)a.get<int>("x");
  (void)b.get<int>("y");
  EXPECT_NO_THROW(root.finish());
}

TEST_F(Config, AssignmentRebindsWithoutChangingTheTree) {
  const ConfigNode root = ConfigNode::parse("x:\n  v: 1\ny:\n  v: 2\n", kOrigin);
  ConfigNode n = root.child("x");
  n = root.child("y");
  EXPECT_EQ(n.get<int>("v"), 2);
  EXPECT_EQ(n.key_path("v"), "y.v");
  EXPECT_EQ(root.child("x").get<int>("v"), 1);  // YAML::Node's operator= would have made this 2
}

TEST_F(Config, WrongTypeNamesKeyExpectedAndFound) {
  const ConfigNode root = ConfigNode::parse(R"(model:
  hidden: abc
  layers: 1.5
  heads: "8"
  flag: yes
  dims: [1, x, 3]
  ratio: fast
  name: [a, b]
  sub: 3
  lst: 4
  nan: .nan
)",
                                            kOrigin);
  const ConfigNode m = root.child("model");
  const std::string o = kOrigin;
  EXPECT_THAT(error_of([&] { m.get<int64_t>("hidden"); }),
              HasSubstr(o + ": model.hidden: expected an integer, got 'abc' (line 2)"));
  EXPECT_THAT(error_of([&] { m.get<int>("layers"); }),
              HasSubstr("model.layers: expected an integer, got '1.5'"));
  EXPECT_THAT(error_of([&] { m.get<int64_t>("heads"); }),
              HasSubstr("model.heads: expected an integer, got the quoted string '8'"));
  EXPECT_THAT(error_of([&] { m.get<bool>("flag"); }),
              HasSubstr("model.flag: expected a boolean (true or false), got 'yes'"));
  EXPECT_THAT(error_of([&] { m.get<std::vector<int64_t>>("dims"); }),
              HasSubstr("model.dims[1]: expected an integer, got 'x'"));
  EXPECT_THAT(error_of([&] { m.get<double>("ratio"); }),
              HasSubstr("model.ratio: expected a number, got 'fast'"));
  EXPECT_THAT(error_of([&] { m.get<std::string>("name"); }),
              HasSubstr("model.name: expected a string, got a list"));
  EXPECT_THAT(error_of([&] { m.child("sub"); }),
              HasSubstr("model.sub: expected a mapping, got '3'"));
  EXPECT_THAT(error_of([&] { m.get<std::vector<double>>("lst"); }),
              HasSubstr("model.lst: expected a list of numbers, got '4'"));
  EXPECT_THAT(error_of([&] { m.get<double>("nan"); }), HasSubstr("model.nan: expected a number"));
  // A present key of the wrong type is an error even with a fallback.
  EXPECT_THAT(error_of([&] { m.get<int64_t>("hidden", 5); }), HasSubstr("model.hidden"));
}

TEST_F(Config, IntegersOutOfRangeAreErrors) {
  const ConfigNode root =
      ConfigNode::parse("a: 3000000000\nb: 99999999999999999999\nc: -1\n", kOrigin);
  EXPECT_THAT(error_of([&] { root.get<int>("a"); }), HasSubstr("a: 3000000000 out of range"));
  EXPECT_THAT(error_of([&] { root.get<int64_t>("b"); }),
              HasSubstr("b: 99999999999999999999 out of range"));
  EXPECT_THAT(error_of([&] { root.get<uint64_t>("c"); }),
              HasSubstr("c: expected a non-negative integer, got '-1'"));
}

TEST_F(Config, MissingRequiredKeyOrSectionIsAnError) {
  const ConfigNode root = ConfigNode::parse("model:\n  hidden: 4\n  depth:\n", kOrigin);
  const ConfigNode m = root.child("model");
  EXPECT_THAT(error_of([&] { m.get<int64_t>("vocab"); }),
              HasSubstr(std::string(kOrigin) +
                        ": model.vocab: required key is missing (expected an integer)"));
  EXPECT_THAT(error_of([&] { m.get<int64_t>("depth"); }),
              HasSubstr("model.depth: expected an integer, got null"));
  EXPECT_THAT(error_of([&] { root.child("train"); }),
              HasSubstr("train: required section is missing"));
  const ConfigNode empty = root.child_or_empty("train");
  EXPECT_EQ(empty.get<int>("steps", 10), 10);
  EXPECT_EQ(empty.key_path("steps"), "train.steps");
}

TEST_F(Config, RangeHelpersNameTheBoundsAndTheValue) {
  const ConfigNode m =
      ConfigNode::parse("model:\n  hidden: -3\n  alpha: 1.5\n  method: foo\n", kOrigin)
          .child("model");
  EXPECT_THAT(error_of([&] { m.get_positive("hidden"); }),
              HasSubstr(std::string(kOrigin) + ": model.hidden: must be > 0 (got -3)"));
  EXPECT_THAT(error_of([&] { m.get_in_range("alpha", 0.0, 1.0, 0.5); }),
              HasSubstr("model.alpha: must be in [0, 1] (got 1.5)"));
  EXPECT_DOUBLE_EQ(m.get_in_range("beta", 0.0, 1.0, 0.5), 0.5);
  EXPECT_THAT(error_of([&] {
                m.get_choice("method", {"none", "switch_aux"}, "none");
              }),
              HasSubstr("model.method: must be one of none, switch_aux (got 'foo')"));
  EXPECT_EQ(m.get_choice("absent", {"none", "switch_aux"}, "switch_aux"), "switch_aux");
}

TEST_F(Config, FailNamesTheDottedPathAndLine) {
  const ConfigNode m =
      ConfigNode::parse("model:\n  router_balance:\n    eta: 0\n", kOrigin).child("model");
  EXPECT_THAT(error_of([&] { m.fail("router_balance.eta", "must be > 0"); }),
              HasSubstr(std::string(kOrigin) + ": model.router_balance.eta: must be > 0 (line 3)"));
  EXPECT_THAT(error_of([&] { m.fail("nowhere", "bad"); }),
              HasSubstr(std::string(kOrigin) + ": model.nowhere: bad"));
}

TEST_F(Config, YamlSyntaxErrorNamesFileAndLine) {
  const std::string path = write("bad.yaml", "model:\n  hidden: 4\n  dims: [1, 2\n  x: 1\n");
  const std::string msg = error_of([&] { ConfigNode::load_file(path); });
  EXPECT_THAT(msg, HasSubstr(path + ":"));
  EXPECT_THAT(msg, HasSubstr("YAML syntax error"));
  const std::string tab = error_of([&] { ConfigNode::parse("a: 1\nb: [\n", "t.yaml"); });
  EXPECT_THAT(tab, HasSubstr("t.yaml:"));
  EXPECT_THAT(tab, HasSubstr("YAML syntax error"));
  const std::string bad_indent =
      error_of([&] { ConfigNode::parse("a: 1\nb:\n  c: 1\n d: 2\n", "indent.yaml"); });
  EXPECT_THAT(bad_indent, HasSubstr("indent.yaml:4:"));
}

TEST_F(Config, LoadFileReadsAndMissingFileIsNamed) {
  const std::string path = write("ok.yaml", "a: 1\n");
  const ConfigNode root = ConfigNode::load_file(path);
  EXPECT_EQ(root.get<int>("a"), 1);
  EXPECT_EQ(root.origin(), path);
  const std::string missing = (dir_ / "nope.yaml").string();
  EXPECT_THAT(error_of([&] { ConfigNode::load_file(missing); }),
              HasSubstr(missing + ": cannot open"));
}

TEST_F(Config, RejectsDuplicateKeysAndBadDocumentShapes) {
  EXPECT_THAT(error_of([&] { ConfigNode::parse("m:\n  a: 1\n  a: 2\n", kOrigin); }),
              HasSubstr("m.a: duplicate key (lines 2 and 3)"));
  EXPECT_THAT(error_of([&] { ConfigNode::parse("- 1\n- 2\n", kOrigin); }),
              HasSubstr("the top level must be a mapping"));
  EXPECT_THAT(error_of([&] { ConfigNode::parse("a: 1\n---\nb: 2\n", kOrigin); }),
              HasSubstr("expected one YAML document, found 2"));
  const ConfigNode empty = ConfigNode::parse("", kOrigin);
  EXPECT_TRUE(empty.keys().empty());
  EXPECT_NO_THROW(empty.finish());
}

}  // namespace
}  // namespace fm
