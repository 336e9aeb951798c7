// Logging setup. Code logs with spdlog directly (spdlog::info(...)); this only
// sets the level from a config or CLI string.
#pragma once

#include <string>

namespace fm {

// level: one of trace, debug, info, warn, error, off; anything else throws fm::Error.
void init_logging(const std::string& level);

}  // namespace fm
