// The tokenizer models compiled into fm_tokenizer (generated from
// tokenizer/data/*.model by cmake/EmbedBinary.cmake), keyed by file stem.
#pragma once

#include <map>
#include <string>
#include <string_view>

namespace fm {

const std::map<std::string, std::string_view>& embedded_tokenizer_models();

}  // namespace fm
