// Routing-trace files: round trips (U8 and U16 routes), metadata, and a clear
// error naming the file for every kind of malformed trace.
#include "model/trace_io.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>

#include "balancer/synthetic_trace.h"
#include "engine/error.h"
#include "engine/safetensors.h"
#include "support/temp_dir.h"

namespace fm {
namespace {

namespace fs = std::filesystem;
using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::ThrowsMessage;

RoutingTrace random_trace(int64_t experts, uint64_t seed) {
  SyntheticTraceOptions o;
  o.n_experts = experts;
  o.top_k = 3;
  o.n_moe_layers = 2;
  o.sequences = 5;
  o.seq_len = 7;
  o.seed = seed;
  RoutingTrace t = synthetic_trace(o);
  t.seq_offsets = {0, 4, 4, 13, 30, 35};  // uneven lengths, one empty sequence
  return t;
}

TraceMetadata some_metadata() {
  TraceMetadata m;
  m.model = "tiny-moe";
  m.n_layers = 3;
  m.first_k_dense = 1;
  m.vocab_size = 512;
  m.hidden = 64;
  m.source = {{"task", "arith"}, {"checkpoint", "runs/a/step_000010"}, {"step", 10}};
  m.micro_step_offsets = {0, 2, 4};
  return m;
}

class TraceIoTest : public testing::TempDirTest {
 protected:
  // The parts of a valid trace file, to be broken one at a time by the tests.
  struct Parts {
    Tensor routes, seq_offsets;
    nlohmann::json meta;
    bool with_meta = true;
  };
  Parts good_parts() {
    const std::string p = file("good.safetensors");
    save_trace(p, random_trace(8, 1), some_metadata());
    const SafetensorsFile f = SafetensorsFile::open(p);
    return {f.load("routes"), f.load("seq_offsets"),
            nlohmann::json::parse(f.metadata().at("foremoe_trace"))};
  }
  // Writes `parts` (a tensor left undefined is left out) and returns load_trace's error.
  std::string write_and_load(const Parts& parts, const std::string& name = "bad.safetensors") {
    const std::string p = file(name);
    std::vector<NamedTensor> tensors;
    if (parts.routes.defined()) tensors.push_back({"routes", parts.routes});
    if (parts.seq_offsets.defined()) tensors.push_back({"seq_offsets", parts.seq_offsets});
    std::map<std::string, std::string> meta;
    if (parts.with_meta) meta["foremoe_trace"] = parts.meta.dump();
    write_safetensors(p, tensors, meta);
    try {
      load_trace(p);
    } catch (const Error& e) {
      return e.what();
    }
    return "loaded without error";
  }
  static Tensor i64(std::vector<int64_t> v) {
    Tensor t = Tensor::empty({static_cast<int64_t>(v.size())}, DType::i64);
    std::copy(v.begin(), v.end(), t.data<int64_t>());
    return t;
  }
};

TEST_F(TraceIoTest, RoundTripsWithU8RoutesForUpTo256Experts) {
  const RoutingTrace t = random_trace(8, 1);
  const TraceMetadata m = some_metadata();
  const std::string p = file("t.safetensors");
  save_trace(p, t, m);
  EXPECT_EQ(SafetensorsFile::open(p).entry("routes").dtype, DType::u8);
  EXPECT_EQ(SafetensorsFile::open(p).entry("routes").shape, (Shape{35, 2, 3}));
  TraceMetadata back;
  EXPECT_EQ(load_trace(p, &back), t);
  EXPECT_EQ(back, m);
}

TEST_F(TraceIoTest, RoundTripsWithU16RoutesAbove256Experts) {
  const RoutingTrace t = random_trace(300, 2);
  bool wide = false;  // the test must exercise ids that do not fit a byte
  for (uint16_t id : t.ids) wide = wide || id >= 256;
  ASSERT_TRUE(wide);
  const std::string p = file("t.safetensors");
  TraceMetadata m;
  m.n_layers = 2;
  save_trace(p, t, m);
  EXPECT_EQ(SafetensorsFile::open(p).entry("routes").dtype, DType::u16);
  EXPECT_FALSE(SafetensorsFile::open(p).contains("micro_step_offsets"));
  TraceMetadata back;
  EXPECT_EQ(load_trace(p, &back), t);
  EXPECT_EQ(back, m);  // unknown vocab/hidden (null in the file) come back as 0
  EXPECT_TRUE(back.micro_step_offsets.empty());
}

TEST_F(TraceIoTest, MetadataIsJsonForOtherReaders) {
  const std::string p = file("t.safetensors");
  save_trace(p, random_trace(8, 1), some_metadata());
  const nlohmann::json j =
      nlohmann::json::parse(SafetensorsFile::open(p).metadata().at("foremoe_trace"));
  EXPECT_EQ(j["format"], "foremoe-trace");
  EXPECT_EQ(j["format_version"], kTraceFormatVersion);
  EXPECT_EQ(j["n_moe_layers"], 2);
  EXPECT_EQ(j["n_experts"], 8);
  EXPECT_EQ(j["top_k"], 3);
  EXPECT_EQ(j["source"]["task"], "arith");
}

TEST_F(TraceIoTest, MetadataFromAModelConfigFitsItsTraces) {
  const ModelConfig c = ModelConfig::load("tiny");
  const TraceMetadata m = trace_metadata(c, {{"task", "arith"}});
  EXPECT_EQ(m.model, c.name);
  EXPECT_EQ(m.n_layers, c.n_layers);
  EXPECT_EQ(m.first_k_dense, c.first_k_dense);
  EXPECT_EQ(m.vocab_size, c.vocab_size);
  EXPECT_EQ(m.hidden, c.hidden);
  SyntheticTraceOptions o;
  o.n_experts = c.n_experts;
  o.top_k = c.top_k;
  o.n_moe_layers = c.n_moe_layers();
  o.sequences = 2;
  o.seq_len = 3;
  const RoutingTrace t = synthetic_trace(o);
  const std::string p = file("t.safetensors");
  save_trace(p, t, m);
  TraceMetadata back;
  EXPECT_EQ(load_trace(p, &back), t);
  EXPECT_EQ(back, m);
}

TEST_F(TraceIoTest, SaveRejectsMetadataThatDisagreesWithTheTrace) {
  TraceMetadata m = some_metadata();
  m.first_k_dense = 0;  // 3 layers, none dense, but the trace has 2 MoE layers
  const std::string p = file("t.safetensors");
  EXPECT_THAT([&] { save_trace(p, random_trace(8, 1), m); },
              ThrowsMessage<Error>(AllOf(HasSubstr(p), HasSubstr("n_moe_layers 2"))));
  m = some_metadata();
  m.micro_step_offsets = {0, 5};  // 5 sequences: index 5 begins nothing
  EXPECT_THAT([&] { save_trace(p, random_trace(8, 1), m); },
              ThrowsMessage<Error>(HasSubstr("micro_step_offsets entry 5")));
  EXPECT_FALSE(fs::exists(p));
}

TEST_F(TraceIoTest, RejectsMissingTensors) {
  Parts parts = good_parts();
  parts.routes = Tensor();
  EXPECT_THAT(write_and_load(parts),
              AllOf(HasSubstr(file("bad.safetensors")), HasSubstr("no tensor 'routes'")));
  parts = good_parts();
  parts.seq_offsets = Tensor();
  EXPECT_THAT(write_and_load(parts), HasSubstr("no tensor 'seq_offsets'"));
}

TEST_F(TraceIoTest, RejectsWrongDtypes) {
  Parts parts = good_parts();
  Tensor wide = Tensor::empty(parts.routes.shape(), DType::i32);
  for (int64_t i = 0; i < wide.numel(); ++i)
    wide.data<int32_t>()[i] = parts.routes.data<uint8_t>()[i];
  parts.routes = wide;
  EXPECT_THAT(write_and_load(parts),
              AllOf(HasSubstr(file("bad.safetensors")),
                    HasSubstr("tensor 'routes' has dtype I32, expected U8 or U16")));
  // 300 experts need U16: U8 routes cannot name them all.
  parts = good_parts();
  parts.meta["n_experts"] = 300;
  EXPECT_THAT(write_and_load(parts), HasSubstr("has dtype U8, expected U16"));
  parts = good_parts();
  Tensor offs = Tensor::zeros(parts.seq_offsets.shape(), DType::i32);
  parts.seq_offsets = offs;
  EXPECT_THAT(write_and_load(parts), HasSubstr("tensor 'seq_offsets' has dtype I32, expected I64"));
}

TEST_F(TraceIoTest, RejectsShapesThatDisagreeWithTheMetadata) {
  Parts parts = good_parts();
  parts.routes = parts.routes.reshape({35, 6});
  EXPECT_THAT(write_and_load(parts), HasSubstr("'routes' has shape [35, 6], expected rank 3"));
  parts = good_parts();
  parts.meta["top_k"] = 2;  // the file's routes are [35, 2, 3]
  parts.meta["n_experts"] = 8;
  EXPECT_THAT(
      write_and_load(parts),
      HasSubstr("'routes' has shape [35, 2, 3], expected [tokens, n_moe_layers 2, top_k 2]"));
  parts = good_parts();
  parts.routes = parts.routes.slice(0, 34);
  EXPECT_THAT(write_and_load(parts),
              HasSubstr("'routes' has 34 tokens but seq_offsets ends at 35"));
}

TEST_F(TraceIoTest, RejectsBadSequenceOffsets) {
  Parts parts = good_parts();
  parts.seq_offsets = i64({1, 4, 4, 13, 30, 35});
  EXPECT_THAT(write_and_load(parts), AllOf(HasSubstr(file("bad.safetensors")),
                                           HasSubstr("'seq_offsets' must start with 0")));
  parts.seq_offsets = i64({0, 13, 4, 30, 35});
  EXPECT_THAT(write_and_load(parts), HasSubstr("'seq_offsets' decreases at index 2"));
  parts.seq_offsets = i64({0, 4, 30});  // ends short of the 35 routed tokens
  EXPECT_THAT(write_and_load(parts), HasSubstr("35 tokens but seq_offsets ends at 30"));
  parts.seq_offsets = i64({});
  EXPECT_THAT(write_and_load(parts), HasSubstr("'seq_offsets' must start with 0"));
}

TEST_F(TraceIoTest, RejectsExpertIdsOutOfRange) {
  Parts parts = good_parts();
  parts.routes.data<uint8_t>()[2 * 6 + 3 + 1] = 8;  // token 2, layer 1, k 1
  EXPECT_THAT(write_and_load(parts),
              AllOf(HasSubstr(file("bad.safetensors")),
                    HasSubstr("expert id 8 >= n_experts 8 at [token 2, layer 1, k 1]")));
}

TEST_F(TraceIoTest, RejectsMissingOrInconsistentMetadata) {
  Parts parts = good_parts();
  parts.with_meta = false;
  EXPECT_THAT(write_and_load(parts),
              AllOf(HasSubstr(file("bad.safetensors")), HasSubstr("no 'foremoe_trace' entry")));
  struct Case {
    std::function<void(nlohmann::json&)> edit;
    std::string message;
  };
  const std::vector<Case> cases = {
      {[](nlohmann::json& j) { j.erase("top_k"); }, "trace metadata is missing 'top_k'"},
      {[](nlohmann::json& j) { j["top_k"] = "3"; }, "'top_k' must be an integer"},
      {[](nlohmann::json& j) { j["format"] = "other"; }, "'format' must be \"foremoe-trace\""},
      {[](nlohmann::json& j) { j["format_version"] = 99; }, "format_version 99 is not supported"},
      {[](nlohmann::json& j) { j["n_layers"] = 4; },
       "inconsistent: n_layers 4 - first_k_dense 1 != n_moe_layers 2"},
      {[](nlohmann::json& j) { j["n_moe_layers"] = 3; }, "inconsistent"},
      {[](nlohmann::json& j) { j["top_k"] = 9; }, "top_k 9 is outside [1, n_experts 8]"},
      {[](nlohmann::json& j) { j["n_experts"] = 0; }, "n_experts 0 is outside"},
      {[](nlohmann::json& j) { j["hidden"] = -1; }, "must be positive or null"},
      {[](nlohmann::json& j) { j["model"] = 5; }, "'model' must be a string"},
  };
  for (const Case& c : cases) {
    parts = good_parts();
    c.edit(parts.meta);
    EXPECT_THAT(write_and_load(parts), HasSubstr(c.message)) << parts.meta.dump();
  }
  // Not JSON at all.
  const std::string p = file("nojson.safetensors");
  parts = good_parts();
  write_safetensors(p, {{"routes", parts.routes}, {"seq_offsets", parts.seq_offsets}},
                    {{"foremoe_trace", "{not json"}});
  EXPECT_THAT([&] { load_trace(p); },
              ThrowsMessage<Error>(AllOf(HasSubstr(p), HasSubstr("is not valid JSON"))));
}

TEST_F(TraceIoTest, RejectsBadMicroStepOffsets) {
  const Parts parts = good_parts();
  const std::string p = file("ms.safetensors");
  auto with = [&](std::vector<int64_t> ms) {
    write_safetensors(p,
                      {{"routes", parts.routes},
                       {"seq_offsets", parts.seq_offsets},
                       {"micro_step_offsets", i64(ms)}},
                      {{"foremoe_trace", parts.meta.dump()}});
  };
  with({1, 3});
  EXPECT_THAT(
      [&] { load_trace(p); },
      ThrowsMessage<Error>(AllOf(HasSubstr(p), HasSubstr("micro_step_offsets must start"))));
  with({0, 3, 3});
  EXPECT_THAT([&] { load_trace(p); }, ThrowsMessage<Error>(HasSubstr("must increase")));
  with({0, 7});
  EXPECT_THAT([&] { load_trace(p); }, ThrowsMessage<Error>(HasSubstr("has 5 sequences")));
  with({0, 4});
  TraceMetadata m;
  load_trace(p, &m);
  EXPECT_EQ(m.micro_step_offsets, (std::vector<int64_t>{0, 4}));
}

TEST_F(TraceIoTest, TruncatedFileErrorNamesTheFile) {
  const std::string p = file("t.safetensors");
  save_trace(p, random_trace(8, 1), some_metadata());
  fs::resize_file(p, fs::file_size(p) - 5);
  EXPECT_THAT([&] { load_trace(p); }, ThrowsMessage<Error>(HasSubstr(p)));
  fs::resize_file(p, 20);  // inside the header
  EXPECT_THAT([&] { load_trace(p); }, ThrowsMessage<Error>(HasSubstr(p)));
}

TEST_F(TraceIoTest, PythonReaderPrintsShapesAndLoads) {
  if (std::system("python3 -c pass > /dev/null 2>&1") != 0)
    GTEST_SKIP() << "python3 is not on PATH: tools/read_trace.py is not exercised";
  // 2 sequences, 2 layers, top-2 over 4 experts, loads worked out by hand.
  RoutingTrace t;
  t.n_moe_layers = 2;
  t.top_k = 2;
  t.n_experts = 4;
  t.seq_offsets = {0, 1, 3};
  t.ids = {0, 1, 2, 3,   // token 0: layer 0 {0, 1}, layer 1 {2, 3}
           0, 2, 2, 3,   // token 1
           0, 3, 2, 1};  // token 2
  TraceMetadata m;
  m.model = "hand";
  m.n_layers = 2;
  const std::string p = file("t.safetensors"), out = file("out.txt");
  save_trace(p, t, m);
  const std::string cmd =
      fmt::format("python3 {}/tools/read_trace.py {} > {} 2>&1", FOREMOE_SOURCE_DIR, p, out);
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  const std::string text = [&] {
    std::FILE* f = std::fopen(out.c_str(), "r");
    std::string s(4096, '\0');
    s.resize(std::fread(s.data(), 1, s.size(), f));
    std::fclose(f);
    return s;
  }();
  EXPECT_THAT(text, HasSubstr("routes: U8 [3, 2, 2]"));
  EXPECT_THAT(text, HasSubstr("seq_offsets: I64 [3]"));
  EXPECT_THAT(text, HasSubstr("sequences: 2  tokens: 3"));
  EXPECT_THAT(text, HasSubstr("\"model\": \"hand\""));
  // Layer 0: {3, 1, 1, 1}, mean 1.5 -> MaxVio 1; layer 1: {0, 1, 3, 2} -> 1.
  EXPECT_THAT(text, HasSubstr("layer 0 maxvio 1.0000 load 3 1 1 1"));
  EXPECT_THAT(text, HasSubstr("layer 1 maxvio 1.0000 load 0 1 3 2"));
}

}  // namespace
}  // namespace fm
