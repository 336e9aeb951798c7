// The YAML files of configs/, compiled into the binary so that `foremoe` runs
// with its shipped presets from any directory. Keys are paths under configs/
// without ".yaml": "models/tiny", "train/synthetic_tiny".
#pragma once

#include <map>
#include <string>

namespace fm {

const std::map<std::string, std::string>& embedded_configs();

// Resolves a config argument: an existing file path is read from disk; otherwise
// a preset name ("tiny" → models/tiny, "synthetic_tiny" → train/synthetic_tiny,
// or a full key). Returns the YAML text and sets *origin to the file name or
// "<embedded configs/KEY.yaml>" for messages. Throws listing the presets when
// nothing matches.
std::string resolve_config(const std::string& name_or_path, std::string* origin);

}  // namespace fm
