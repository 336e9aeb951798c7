#include "model/presets.h"

#include <filesystem>

#include "engine/error.h"
#include "engine/files.h"

namespace fm {

std::string resolve_config(const std::string& arg, std::string* origin) {
  if (std::filesystem::is_regular_file(arg)) {
    *origin = arg;
    return read_file(arg);
  }
  const auto& all = embedded_configs();
  for (const std::string& key : {arg, "models/" + arg, "train/" + arg}) {
    const auto it = all.find(key);
    if (it != all.end()) {
      *origin = "<embedded configs/" + key + ".yaml>";
      return it->second;
    }
  }
  std::string names;
  for (const auto& [key, text] : all) names += (names.empty() ? "" : ", ") + key;
  throw Error(
      fmt::format("config '{}': no such file, and no embedded preset of that name "
                  "(presets: {})",
                  arg, names));
}

}  // namespace fm
