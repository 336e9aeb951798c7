// safetensors reader/writer: bit-exact round trips, compatibility with bytes
// laid out the way Python's safetensors writes them, and one rejection test
// per validation rule (each message must name the file and the problem).
#include "engine/safetensors.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>

#include "engine/error.h"
#include "engine/files.h"
#include "support/temp_dir.h"

namespace fm {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

class Safetensors : public testing::TempDirTest {
 protected:
  // A file made of an explicit length field, header text and data bytes.
  std::string write_raw(const std::string& name, uint64_t header_len, const std::string& header,
                        const std::string& data) const {
    std::string bytes(8, '\0');
    for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>((header_len >> (8 * i)) & 0xff);
    bytes += header + data;
    const std::string path = file(name);
    std::ofstream(path, std::ios::binary) << bytes;
    return path;
  }
  std::string write_header(const std::string& name, const std::string& header,
                           size_t data_bytes = 64) const {
    return write_raw(name, header.size(), header, std::string(data_bytes, '\x01'));
  }

  // The message SafetensorsFile::open throws for `path` (fails the test if it does not throw).
  static std::string open_error(const std::string& path) {
    try {
      SafetensorsFile::open(path);
    } catch (const Error& e) {
      return e.what();
    }
    ADD_FAILURE() << "opening " << path << " did not throw";
    return "";
  }
};

Tensor random_tensor(const Shape& shape, DType dtype, std::mt19937& gen) {
  Tensor t = Tensor::empty(shape, dtype);
  auto* p = static_cast<unsigned char*>(t.raw());
  // Arbitrary bit patterns (NaN payloads, denormals, -0) must survive unchanged.
  for (size_t i = 0; i < t.nbytes(); ++i) p[i] = static_cast<unsigned char>(gen());
  return t;
}

TEST_F(Safetensors, RoundTripEveryDtypeIsBitExact) {
  std::mt19937 gen(1234);
  const std::vector<std::pair<DType, Shape>> specs = {
      {DType::u8, {7}},     {DType::f32, {3, 5}}, {DType::bf16, {2, 3, 3}},
      {DType::f64, {4}},    {DType::f16, {9}},    {DType::i32, {2, 2}},
      {DType::i64, {3}},    {DType::u16, {5, 1}}, {DType::f32, {}},  // a scalar
      {DType::f32, {0, 4}},                                          // empty
  };
  std::vector<NamedTensor> tensors;
  for (size_t i = 0; i < specs.size(); ++i)
    tensors.push_back({fmt::format("t{}.{}", i, dtype_name(specs[i].first)),
                       random_tensor(specs[i].second, specs[i].first, gen)});
  const std::map<std::string, std::string> meta = {{"format", "pt"}, {"step", "42"}, {"", "x"}};
  const std::string path = file("all.safetensors");
  write_safetensors(path, tensors, meta);

  const SafetensorsFile f = SafetensorsFile::open(path);
  EXPECT_EQ(f.path(), path);
  EXPECT_EQ(f.metadata(), meta);
  EXPECT_EQ(f.names().size(), tensors.size());
  EXPECT_EQ(f.data_start() % 8, 0u);
  for (const NamedTensor& nt : tensors) {
    ASSERT_TRUE(f.contains(nt.name)) << nt.name;
    const SafetensorsEntry& e = f.entry(nt.name);
    EXPECT_EQ(e.dtype, nt.tensor.dtype()) << nt.name;
    EXPECT_EQ(e.shape, nt.tensor.shape()) << nt.name;
    EXPECT_EQ(e.begin % dtype_size(e.dtype), 0u) << nt.name << " is not aligned to its element";
    const Tensor back = f.load(nt.name);
    EXPECT_EQ(back.dtype(), nt.tensor.dtype());
    EXPECT_EQ(back.shape(), nt.tensor.shape());
    ASSERT_EQ(back.nbytes(), nt.tensor.nbytes());
    EXPECT_EQ(std::memcmp(back.raw(), nt.tensor.raw(), back.nbytes()), 0) << nt.name;
  }
  // File order is by offset; data is contiguous from 0 to the end of the file.
  uint64_t expect_begin = 0;
  for (const std::string& name : f.names()) {
    EXPECT_EQ(f.entry(name).begin, expect_begin) << name;
    expect_begin = f.entry(name).end;
  }
  EXPECT_EQ(f.data_start() + expect_begin, fs::file_size(path));
  EXPECT_FALSE(f.contains("missing"));
}

TEST_F(Safetensors, WriterOrdersByElementSizeKeepingInputOrderWithinASize) {
  std::mt19937 gen(7);
  const std::string path = file("order.safetensors");
  write_safetensors(path, {{"b_u8", random_tensor({3}, DType::u8, gen)},
                           {"a_f32", random_tensor({2}, DType::f32, gen)},
                           {"c_i64", random_tensor({1}, DType::i64, gen)},
                           {"d_f32", random_tensor({1}, DType::f32, gen)}});
  EXPECT_EQ(SafetensorsFile::open(path).names(),
            (std::vector<std::string>{"c_i64", "a_f32", "d_f32", "b_u8"}));
}

TEST_F(Safetensors, ReadsBytesLaidOutLikePythonSafetensors) {
  // What `safetensors.torch.save_file({...}, metadata={"format": "pt"})` produces: compact JSON,
  // tensors sorted by alignment then name, header padded with spaces to a multiple of 8.
  std::string header =
      R"({"__metadata__":{"format":"pt"},"ids":{"dtype":"I64","shape":[2],"data_offsets":[0,16]},)"
      R"("w":{"dtype":"F32","shape":[2,1],"data_offsets":[16,24]},)"
      R"("h":{"dtype":"BF16","shape":[3],"data_offsets":[24,30]}})";
  while ((8 + header.size()) % 8 != 0) header += ' ';
  std::string data;
  auto put = [&](const auto& v) { data.append(reinterpret_cast<const char*>(&v), sizeof v); };
  put(int64_t{7});
  put(int64_t{-1});
  put(1.5f);
  put(-2.0f);
  put(uint16_t{0x3f80});  // bf16 1.0
  put(uint16_t{0xbf00});  // bf16 -0.5
  put(uint16_t{0x4040});  // bf16 3.0
  const std::string path = write_raw("py.safetensors", header.size(), header, data);

  const SafetensorsFile f = SafetensorsFile::open(path);
  EXPECT_EQ(f.names(), (std::vector<std::string>{"ids", "w", "h"}));
  EXPECT_EQ(f.metadata().at("format"), "pt");
  const Tensor ids = f.load("ids");
  EXPECT_EQ(ids.data<int64_t>()[0], 7);
  EXPECT_EQ(ids.data<int64_t>()[1], -1);
  const Tensor w = f.load("w");
  EXPECT_EQ(w.shape(), (Shape{2, 1}));
  EXPECT_EQ(w.data<float>()[0], 1.5f);
  EXPECT_EQ(w.data<float>()[1], -2.0f);
  const Tensor h = f.load("h");
  ASSERT_EQ(h.dtype(), DType::bf16);
  const auto* hb = static_cast<const uint16_t*>(h.raw());
  EXPECT_EQ(bf16_to_f32(hb[0]), 1.0f);
  EXPECT_EQ(bf16_to_f32(hb[1]), -0.5f);
  EXPECT_EQ(bf16_to_f32(hb[2]), 3.0f);
}

TEST_F(Safetensors, LoadIntoFillsAMatchingTensorAndRejectsAMismatch) {
  std::mt19937 gen(3);
  const Tensor src = random_tensor({2, 3}, DType::f32, gen);
  const std::string path = file("w.safetensors");
  write_safetensors(path, {{"w", src}});
  const SafetensorsFile f = SafetensorsFile::open(path);

  Tensor dst = Tensor::zeros({2, 3}, DType::f32);
  f.load_into("w", dst);
  EXPECT_EQ(std::memcmp(dst.raw(), src.raw(), src.nbytes()), 0);

  Tensor wrong_shape = Tensor::zeros({3, 2}, DType::f32);
  try {
    f.load_into("w", wrong_shape);
    FAIL() << "shape mismatch accepted";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr(path));
    EXPECT_THAT(e.what(), HasSubstr("tensor 'w'"));
    EXPECT_THAT(e.what(), HasSubstr("expected f32[3, 2]"));
    EXPECT_THAT(e.what(), HasSubstr("found f32[2, 3]"));
  }
  Tensor wrong_dtype = Tensor::zeros({2, 3}, DType::f64);
  try {
    f.load_into("w", wrong_dtype);
    FAIL() << "dtype mismatch accepted";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("expected f64[2, 3]"));
  }
  Tensor on_gpu = Tensor::view(dst.raw(), {2, 3}, DType::f32, Device::cuda(0));
  EXPECT_THROW(f.load_into("w", on_gpu), Error);
}

TEST_F(Safetensors, MissingTensorIsNamed) {
  const std::string path = file("one.safetensors");
  write_safetensors(path, {{"a", Tensor::zeros({1}, DType::f32)}});
  const SafetensorsFile f = SafetensorsFile::open(path);
  try {
    f.load("b");
    FAIL() << "load of a missing tensor succeeded";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr(path + ": no tensor named 'b'"));
  }
  EXPECT_THROW(f.entry("b"), Error);
}

TEST_F(Safetensors, WriterRejectsBadTensorsAndKeepsTheOldFile) {
  const std::string path = file("keep.safetensors");
  write_safetensors(path, {{"old", Tensor::zeros({2}, DType::f32)}});
  const std::string before = read_file(path);
  float gpu_fake[2] = {};
  auto expect_rejected = [&](const std::vector<NamedTensor>& ts, const std::string& problem) {
    try {
      write_safetensors(path, ts);
      ADD_FAILURE() << "accepted: " << problem;
    } catch (const Error& e) {
      EXPECT_THAT(e.what(), HasSubstr(path));
      EXPECT_THAT(e.what(), HasSubstr(problem));
    }
    EXPECT_EQ(read_file(path), before);
  };
  expect_rejected({{"", Tensor::zeros({1}, DType::f32)}}, "empty name");
  expect_rejected({{"x", Tensor::zeros({1}, DType::f32)}, {"x", Tensor::zeros({1}, DType::u8)}},
                  "duplicate tensor name 'x'");
  expect_rejected({{"g", Tensor::view(gpu_fake, {2}, DType::f32, Device::cuda(0))}},
                  "only CPU tensors");
  expect_rejected({{"u", Tensor()}}, "undefined");
  expect_rejected({{"__metadata__", Tensor::zeros({1}, DType::f32)}}, "reserved");
  for (const auto& entry : fs::directory_iterator(dir_))
    EXPECT_EQ(entry.path().filename().string().find(".tmp."), std::string::npos) << entry.path();
}

TEST_F(Safetensors, RejectsFileShorterThanTheLengthField) {
  const std::string path = file("short.safetensors");
  std::ofstream(path, std::ios::binary) << "abc";
  const std::string msg = open_error(path);
  EXPECT_THAT(msg, HasSubstr(path));
  EXPECT_THAT(msg, HasSubstr("truncated header"));
}

TEST_F(Safetensors, RejectsHeaderLengthBeyondTheFile) {
  const std::string msg = open_error(write_raw("trunc.safetensors", 500, "{}", ""));
  EXPECT_THAT(msg, HasSubstr("header length 500 exceeds the file size (2 bytes"));
}

TEST_F(Safetensors, RejectsAbsurdHeaderLength) {
  const std::string msg = open_error(write_raw("huge.safetensors", uint64_t{1} << 40, "{}", ""));
  EXPECT_THAT(msg, HasSubstr("header length 1099511627776 is larger than"));
}

TEST_F(Safetensors, RejectsNonJsonHeader) {
  const std::string path = write_header("nonjson.safetensors", "{\"a\": nope}");
  const std::string msg = open_error(path);
  EXPECT_THAT(msg, HasSubstr(path + ": header is not valid JSON"));
  EXPECT_THAT(open_error(write_header("arr.safetensors", "[1, 2]")),
              HasSubstr("header is not a JSON object"));
  EXPECT_THAT(open_error(write_header("deep.safetensors",
                                      std::string(5000, '[') + "1" + std::string(5000, ']'))),
              HasSubstr("nests deeper"));
  EXPECT_THAT(open_error(write_header("dup.safetensors",
                                      R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},)"
                                      R"("a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}})")),
              HasSubstr("duplicate key 'a'"));
}

TEST_F(Safetensors, RejectsEntriesWithMissingOrMistypedFields) {
  struct Case {
    const char* header;
    const char* problem;
  };
  const Case cases[] = {
      {R"({"a":{"dtype":"F32","shape":[1]}})", "tensor 'a': missing 'data_offsets'"},
      {R"({"a":{"shape":[1],"data_offsets":[0,4]}})", "tensor 'a': missing 'dtype'"},
      {R"({"a":{"dtype":"F32","data_offsets":[0,4]}})", "tensor 'a': missing 'shape'"},
      {R"({"a":[1,2]})", "tensor 'a': entry must be a JSON object"},
      {R"({"a":{"dtype":32,"shape":[1],"data_offsets":[0,4]}})", "'dtype' must be a string"},
      {R"({"a":{"dtype":"F32","shape":"1","data_offsets":[0,4]}})", "'shape' must be a list"},
      {R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":1}})", "unexpected field 'x'"},
      {R"({"__metadata__":{"k":1}})", "__metadata__ value for 'k' must be a string"},
      {R"({"__metadata__":[1]})", "__metadata__ must be an object"},
  };
  for (const Case& c : cases) {
    const std::string path = write_header("fields.safetensors", c.header);
    const std::string msg = open_error(path);
    EXPECT_THAT(msg, HasSubstr(path)) << c.header;
    EXPECT_THAT(msg, HasSubstr(c.problem)) << c.header;
  }
}

TEST_F(Safetensors, RejectsUnknownDtype) {
  const std::string msg = open_error(write_header(
      "dtype.safetensors", R"({"a":{"dtype":"F8_E4M3","shape":[4],"data_offsets":[0,4]}})"));
  EXPECT_THAT(msg, HasSubstr("tensor 'a': unknown dtype 'F8_E4M3'"));
}

TEST_F(Safetensors, RejectsNegativeOrFractionalShape) {
  for (const char* shape : {"[-1]", "[1.5]", "[2, \"3\"]", "[9223372036854775808]"}) {
    const std::string header =
        fmt::format(R"({{"a":{{"dtype":"U8","shape":{},"data_offsets":[0,1]}}}})", shape);
    EXPECT_THAT(open_error(write_header("shape.safetensors", header)),
                HasSubstr("'shape' must be a list of non-negative integers"))
        << shape;
  }
}

TEST_F(Safetensors, RejectsMalformedDataOffsets) {
  for (const char* offs : {"[4, 0]", "[0]", "[0, 4, 8]", "[\"0\", \"4\"]", "[-4, 0]", "[0, 4.0]"}) {
    const std::string header =
        fmt::format(R"({{"a":{{"dtype":"U8","shape":[4],"data_offsets":{}}}}})", offs);
    EXPECT_THAT(open_error(write_header("offs.safetensors", header)),
                HasSubstr("tensor 'a': 'data_offsets' must be two non-negative integers"))
        << offs;
  }
}

TEST_F(Safetensors, RejectsOffsetsBeyondTheData) {
  const std::string path = write_header(
      "oob.safetensors", R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[60,76]}})", 64);
  const std::string msg = open_error(path);
  EXPECT_THAT(msg, HasSubstr(path + ": tensor 'a': data_offsets [60, 76] end beyond the data size "
                                    "(64 bytes"));
}

TEST_F(Safetensors, RejectsDtypeShapeMismatch) {
  const std::string msg = open_error(write_header(
      "mismatch.safetensors", R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})"));
  EXPECT_THAT(msg, HasSubstr("tensor 'a': dtype/shape mismatch: F32[3] needs 12 bytes"));
  // A shape whose byte count overflows 64 bits is a mismatch too, not an allocation.
  const std::string big = open_error(write_header(
      "overflow.safetensors",
      R"({"a":{"dtype":"F64","shape":[4611686018427387904,4],"data_offsets":[0,8]}})"));
  EXPECT_THAT(big, HasSubstr("dtype/shape mismatch"));
}

TEST_F(Safetensors, RejectsOverlappingTensors) {
  const std::string msg = open_error(write_header(
      "overlap.safetensors", R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                             R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})"));
  EXPECT_THAT(msg, HasSubstr("overlapping tensors: 'a' [0, 8) and 'b' [4, 12)"));
  // Empty tensors occupy no bytes, so one inside another tensor's range is fine.
  const SafetensorsFile ok = SafetensorsFile::open(write_header(
      "empty_inside.safetensors", R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                  R"("e":{"dtype":"F32","shape":[0],"data_offsets":[4,4]}})"));
  EXPECT_EQ(ok.load("e").numel(), 0);
}

TEST_F(Safetensors, LoadAfterTheFileWasTruncatedFailsCleanly) {
  const std::string path = file("shrink.safetensors");
  write_safetensors(path, {{"a", Tensor::zeros({64}, DType::f32)}});
  const SafetensorsFile f = SafetensorsFile::open(path);
  fs::resize_file(path, f.data_start() + 10);
  try {
    f.load("a");
    FAIL() << "read past the end succeeded";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("tensor 'a': unexpected end of file"));
  }
}

// Every truncation and many single-byte corruptions of a valid file either open (and then
// load) or throw fm::Error: never a crash, never another exception type.
TEST_F(Safetensors, CorruptedFilesNeverCrash) {
  std::mt19937 gen(99);
  const std::string good_path = file("good.safetensors");
  write_safetensors(good_path,
                    {{"a", random_tensor({3, 2}, DType::f32, gen)},
                     {"b", random_tensor({5}, DType::bf16, gen)},
                     {"c", random_tensor({2}, DType::i64, gen)}},
                    {{"k", "v"}});
  const std::string good = read_file(good_path);
  auto try_open = [&](const std::string& bytes) {
    const std::string path = file("bad.safetensors");
    std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
    try {
      const SafetensorsFile f = SafetensorsFile::open(path);
      for (const std::string& n : f.names()) (void)f.load(n);
      return true;
    } catch (const Error&) {
      return false;
    }
  };
  int rejected = 0;
  for (size_t len = 0; len < good.size(); ++len) rejected += try_open(good.substr(0, len)) ? 0 : 1;
  EXPECT_EQ(rejected, static_cast<int>(good.size()));  // every proper prefix is invalid
  for (int trial = 0; trial < 400; ++trial) {
    std::string bytes = good;
    bytes[gen() % bytes.size()] = static_cast<char>(gen());
    try_open(bytes);
  }
}

}  // namespace
}  // namespace fm
