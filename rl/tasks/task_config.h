// TaskConfig: which verifiable task, and its knobs, read from one YAML mapping:
//   {name: add, seed: 1, held_out: 200, format_reward: 0.0, min_digits: 1, max_digits: 3}
// Knobs per task (defaults in the struct):
//   all:      name, seed, held_out, format_reward
//   add:      min_digits, max_digits         (operand lengths, 1..18)
//   sort:     min_len, max_len               (digit-string length)
//   reverse:  min_len, max_len, alphabet     (letter-string length; the first `alphabet` of a-z)
//   count:    min_len, max_len, alphabet
//   jsonl:    path                           (one {"prompt": ..., "answer": ...} per line)
// A knob that does not belong to the named task is an error naming the key.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace fm {

class ConfigNode;

struct TaskConfig {
  std::string name = "add";
  uint64_t seed = 1;
  // Held-out examples. Unset: 200 for generated tasks; for jsonl 10% of the lines, at most 200.
  std::optional<int64_t> held_out;
  double format_reward = 0.0;  // in [0, 1)
  int64_t min_digits = 1, max_digits = 3;
  int64_t min_len = 3, max_len = 8;
  int64_t alphabet = 4;
  std::string path;  // jsonl only

  static const std::vector<std::string>& task_names();  // add, sort, reverse, count, jsonl
  // Reads and validates the mapping (does not call finish(); the owner of the root does).
  static TaskConfig from_yaml(const ConfigNode& node);
  // Defaults for a named task (unknown names are an error listing the known ones).
  static TaskConfig defaults(const std::string& name);
  // Range checks shared by from_yaml and code-built configs; `where` prefixes messages.
  void validate(const std::string& where) const;
};

}  // namespace fm
