// Checksums, whole-file I/O with atomic replacement, metrics lines and log levels.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <sstream>

#include "engine/checksum.h"
#include "engine/error.h"
#include "engine/files.h"
#include "engine/log.h"
#include "engine/metrics.h"
#include "support/temp_dir.h"

namespace fm {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

class IoTest : public testing::TempDirTest {
 protected:
  bool has_tmp_files() const {
    for (const auto& e : fs::directory_iterator(dir_))
      if (e.path().filename().string().find(".tmp.") != std::string::npos) return true;
    return false;
  }
};

class Checksum : public IoTest {};
class Files : public IoTest {};
class Metrics : public IoTest {};

TEST_F(Checksum, Sha256MatchesKnownVectors) {
  // FIPS 180-2 test vectors.
  EXPECT_EQ(sha256_hex("", 0), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(sha256_hex("abc", 3),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  const std::string two_blocks = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
  EXPECT_EQ(sha256_hex(two_blocks.data(), two_blocks.size()),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
}

TEST_F(Checksum, FileHashEqualsBufferHashAcrossChunks) {
  std::mt19937 gen(5);
  std::string bytes((3u << 20) + 17, '\0');  // spans several 1 MiB read chunks
  for (char& c : bytes) c = static_cast<char>(gen());
  const std::string path = file("blob.bin");
  write_file_atomic(path, bytes);
  EXPECT_EQ(sha256_file(path), sha256_hex(bytes.data(), bytes.size()));
  std::string million_a(1000000, 'a');  // FIPS 180-2: one million 'a'
  write_file_atomic(path, million_a);
  EXPECT_EQ(sha256_file(path), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
  const std::string missing = file("missing.bin");
  try {
    sha256_file(missing);
    FAIL() << "hashing a missing file succeeded";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr(missing + ": cannot open"));
  }
}

TEST_F(Files, ReadFileReturnsBytesAndNamesMissingFile) {
  const std::string path = file("a.bin");
  const std::string bytes("x\0y\nz", 5);
  std::ofstream(path, std::ios::binary) << bytes;
  EXPECT_EQ(read_file(path), bytes);
  const std::string missing = file("none.txt");
  try {
    read_file(missing);
    FAIL() << "reading a missing file succeeded";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr(missing + ": cannot open (No such file or directory)"));
  }
  EXPECT_THROW(read_file(dir_.string()), Error);  // a directory
}

TEST_F(Files, AtomicWriteReplacesTheFileAndLeavesNoTemp) {
  const std::string path = file("m.json");
  write_file_atomic(path, "old");
  write_file_atomic(path, "new contents");
  EXPECT_EQ(read_file(path), "new contents");
  write_file_atomic(path, "");
  EXPECT_EQ(read_file(path), "");
  EXPECT_FALSE(has_tmp_files());
}

TEST_F(Files, AbandonedWriterKeepsTheOldFile) {
  const std::string path = file("ckpt.bin");
  write_file_atomic(path, "good checkpoint");
  try {
    AtomicFileWriter w(path);
    w.write("half-written ");
    EXPECT_TRUE(fs::exists(w.tmp_path()));
    EXPECT_EQ(w.bytes_written(), 13u);
    throw std::runtime_error("writer killed");  // unwinding destroys w without commit()
  } catch (const std::runtime_error&) {
  }
  EXPECT_EQ(read_file(path), "good checkpoint");
  EXPECT_FALSE(has_tmp_files());
}

TEST_F(Files, FailedRenameKeepsTheTargetAndRemovesTheTemp) {
  // A directory at the target path makes the final rename fail.
  const std::string path = file("target");
  fs::create_directories(path + "/inner");
  try {
    write_file_atomic(path, "bytes");
    FAIL() << "renaming over a directory succeeded";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr(path + ": rename of the temp file failed"));
  }
  EXPECT_TRUE(fs::is_directory(path + "/inner"));
  EXPECT_FALSE(has_tmp_files());
}

TEST_F(Files, WriteIntoMissingDirectoryNamesThePath) {
  const std::string path = file("no/such/dir/x.bin");
  try {
    write_file_atomic(path, "x");
    FAIL() << "write into a missing directory succeeded";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr(path + ": cannot create temp file"));
  }
}

TEST_F(Files, MakeDirsCreatesParentsAndRejectsAFile) {
  const std::string nested = file("a/b/c");
  make_dirs(nested);
  EXPECT_TRUE(fs::is_directory(nested));
  make_dirs(nested);  // existing: fine
  const std::string plain = file("plain");
  write_file_atomic(plain, "x");
  EXPECT_THAT(
      [&] {
        try {
          make_dirs(plain + "/sub");
        } catch (const Error& e) {
          return std::string(e.what());
        }
        return std::string();
      }(),
      HasSubstr(plain + "/sub: cannot create directory"));
}

TEST_F(Metrics, EachRecordIsOneParseableLine) {
  const std::string path = file("metrics.jsonl");
  {
    MetricsWriter w(path);
    w.write({{"step", 1}, {"loss", 2.5}});
    w.write({{"step", 2}, {"loss", std::numeric_limits<double>::quiet_NaN()}, {"tag", "a\nb"}});
    // Flushed per record: readable before the writer is closed.
    const std::string so_far = read_file(path);
    EXPECT_EQ(std::count(so_far.begin(), so_far.end(), '\n'), 2);
    try {
      w.write(nlohmann::json::array({1, 2}));
      FAIL() << "a non-object record was accepted";
    } catch (const Error& e) {
      EXPECT_THAT(e.what(), HasSubstr(path + ": a metrics record must be a JSON object"));
    }
  }
  {
    MetricsWriter w(path, /*append=*/true);
    w.write({{"step", 3}});
  }
  std::istringstream lines(read_file(path));
  std::vector<nlohmann::json> records;
  for (std::string line; std::getline(lines, line);) records.push_back(nlohmann::json::parse(line));
  ASSERT_EQ(records.size(), 3u);
  EXPECT_EQ(records[0]["step"], 1);
  EXPECT_EQ(records[0]["loss"], 2.5);
  EXPECT_TRUE(records[1]["loss"].is_null());  // JSON has no NaN
  EXPECT_EQ(records[1]["tag"], "a\nb");
  EXPECT_EQ(records[2]["step"], 3);
  {
    MetricsWriter w(path);  // truncates
    w.write({{"step", 4}});
  }
  EXPECT_EQ(read_file(path), "{\"step\":4}\n");
}

TEST_F(Metrics, UnopenableFileIsNamed) {
  const std::string path = file("missing_dir/metrics.jsonl");
  try {
    MetricsWriter w(path);
    FAIL() << "opening a metrics file in a missing directory succeeded";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr(path + ": cannot open metrics file"));
  }
}

TEST(Logging, InitLoggingSetsKnownLevelsAndRejectsOthers) {
  const auto saved = spdlog::get_level();
  init_logging("debug");
  EXPECT_EQ(spdlog::get_level(), spdlog::level::debug);
  init_logging("off");
  EXPECT_EQ(spdlog::get_level(), spdlog::level::off);
  try {
    init_logging("loud");
    ADD_FAILURE() << "unknown level accepted";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(),
                HasSubstr("must be one of trace, debug, info, warn, error, off (got 'loud')"));
  }
  spdlog::set_level(saved);
}

}  // namespace
}  // namespace fm
