#include "engine/metrics.h"

#include <cerrno>
#include <system_error>

#include "engine/error.h"

namespace fm {

namespace {
std::string errno_text(int err) {
  return std::error_code(err, std::generic_category()).message();
}
}  // namespace

MetricsWriter::MetricsWriter(const std::string& path, bool append)
    : path_(path), file_(std::fopen(path.c_str(), append ? "ab" : "wb")) {
  FM_CHECK(file_ != nullptr, "{}: cannot open metrics file for writing ({})", path_,
           errno_text(errno));
}

void MetricsWriter::write(const nlohmann::json& record) {
  FM_CHECK(file_ != nullptr, "{}: metrics writer was moved from", path_);
  FM_CHECK(record.is_object(), "{}: a metrics record must be a JSON object (got {})", path_,
           record.type_name());
  std::string line = record.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  line += '\n';
  const size_t n = std::fwrite(line.data(), 1, line.size(), file_.get());
  FM_CHECK(n == line.size(), "{}: write failed ({})", path_, errno_text(errno));
  flush();
}

void MetricsWriter::flush() {
  FM_CHECK(file_ != nullptr, "{}: metrics writer was moved from", path_);
  FM_CHECK(std::fflush(file_.get()) == 0, "{}: flush failed ({})", path_, errno_text(errno));
}

}  // namespace fm
