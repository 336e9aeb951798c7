#include "engine/log.h"

#include <spdlog/spdlog.h>

#include <utility>

#include "engine/error.h"

namespace fm {

void init_logging(const std::string& level) {
  static constexpr std::pair<const char*, spdlog::level::level_enum> kLevels[] = {
      {"trace", spdlog::level::trace}, {"debug", spdlog::level::debug},
      {"info", spdlog::level::info},   {"warn", spdlog::level::warn},
      {"error", spdlog::level::err},   {"off", spdlog::level::off}};
  for (const auto& [name, value] : kLevels) {
    if (level == name) {
      spdlog::set_level(value);
      return;
    }
  }
  throw Error(fmt::format(
      "log level: must be one of trace, debug, info, warn, error, off (got '{}')", level));
}

}  // namespace fm
