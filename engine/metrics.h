// MetricsWriter: one JSON object per line (JSON Lines), flushed after every
// record so a crashed or killed run keeps every step it logged.
#pragma once

#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

namespace fm {

class MetricsWriter {
 public:
  // Truncates the file unless `append`; throws fm::Error naming the file if it cannot be opened.
  explicit MetricsWriter(const std::string& path, bool append = false);

  // `record` must be a JSON object. Non-finite floats are written as null (JSON has no NaN);
  // invalid UTF-8 in strings is replaced by U+FFFD. Throws naming the file on a write error.
  void write(const nlohmann::json& record);
  void flush();

  const std::string& path() const { return path_; }

 private:
  struct FileCloser {
    void operator()(std::FILE* f) const { std::fclose(f); }
  };
  std::string path_;
  std::unique_ptr<std::FILE, FileCloser> file_;
};

}  // namespace fm
