// Whole-file reads and crash-safe writes. A file written through
// AtomicFileWriter (or write_file_atomic) appears under its final name only
// when complete and on disk: the bytes go to "<path>.tmp.<pid>", are fsynced,
// and the temp file is renamed over `path`. On any failure the previous file
// at `path` is untouched and the temp file is removed.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace fm {

// The whole file as bytes; throws fm::Error "<path>: cannot open (<reason>)" etc.
std::string read_file(const std::string& path);

void write_file_atomic(const std::string& path, std::string_view bytes);

// Creates `path` and any missing parents; an existing directory is fine.
void make_dirs(const std::string& path);

// Streams a file into place without holding it in memory (multi-GB checkpoints).
//   AtomicFileWriter w(path); w.write(a, n); w.write(b, m); w.commit();
// Destroying the writer without commit() (e.g. during unwinding) discards the
// temp file and leaves `path` as it was.
class AtomicFileWriter {
 public:
  explicit AtomicFileWriter(std::string path);  // creates the temp file
  ~AtomicFileWriter();
  AtomicFileWriter(const AtomicFileWriter&) = delete;
  AtomicFileWriter& operator=(const AtomicFileWriter&) = delete;

  void write(const void* data, size_t n);
  void write(std::string_view bytes) { write(bytes.data(), bytes.size()); }
  // fsync, close and rename over the final path (then fsync the directory).
  void commit();

  const std::string& path() const { return path_; }
  const std::string& tmp_path() const { return tmp_path_; }
  size_t bytes_written() const { return written_; }

 private:
  void discard() noexcept;

  std::string path_;
  std::string tmp_path_;
  int fd_ = -1;
  size_t written_ = 0;
  bool committed_ = false;
};

}  // namespace fm
