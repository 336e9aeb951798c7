#include "rl/tasks/task_config.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <map>
#include <optional>
#include <utility>

#include "engine/config.h"
#include "engine/error.h"
#include "rl/tasks/generated_tasks.h"

namespace fm {
namespace {

// The knobs each task reads besides name, seed, held_out and format_reward.
const std::map<std::string, std::vector<std::string>>& task_knobs() {
  static const std::map<std::string, std::vector<std::string>> knobs = {
      {"add", {"min_digits", "max_digits"}},
      {"sort", {"min_len", "max_len"}},
      {"reverse", {"min_len", "max_len", "alphabet"}},
      {"count", {"min_len", "max_len", "alphabet"}},
      {"jsonl", {"path"}},
  };
  return knobs;
}

using Problem = std::optional<std::pair<std::string, std::string>>;  // key, what is wrong

Problem check_range(const std::string& key, int64_t value, int64_t lo, int64_t hi) {
  if (value >= lo && value <= hi) return std::nullopt;
  return std::make_pair(key, fmt::format("must be in [{}, {}] (got {})", lo, hi, value));
}

// The first problem with a config, as (key, message): one function for YAML and code.
Problem first_problem(const TaskConfig& c) {
  if (!task_knobs().contains(c.name))
    return std::make_pair(std::string("name"),
                          fmt::format("must be one of {} (got '{}')",
                                      fmt::join(TaskConfig::task_names(), ", "), c.name));
  if (c.format_reward < 0.0 || c.format_reward >= 1.0)
    return std::make_pair(std::string("format_reward"),
                          fmt::format("must be in [0, 1) (got {})", c.format_reward));
  if (c.held_out && (*c.held_out < 0 || *c.held_out > 1'000'000))
    return check_range("held_out", *c.held_out, 0, 1'000'000);
  if (c.name == "jsonl") {
    if (c.path.empty()) return std::make_pair(std::string("path"), std::string("is required"));
    return std::nullopt;
  }
  Problem p;
  if (c.name == "add") {
    if ((p = check_range("min_digits", c.min_digits, 1, 18))) return p;
    if ((p = check_range("max_digits", c.max_digits, c.min_digits, 18))) return p;
  } else {
    if ((p = check_range("min_len", c.min_len, 1, 64))) return p;
    if ((p = check_range("max_len", c.max_len, c.min_len, 64))) return p;
    if (c.name != "sort" && (p = check_range("alphabet", c.alphabet, 2, 26))) return p;
  }
  // The training stream redraws held-out prompts, so they may fill at most half the space.
  const double space = prompt_space(c);
  const int64_t held_out = c.held_out.value_or(200);
  if (static_cast<double>(held_out) > space / 2)
    return std::make_pair(
        std::string("held_out"),
        fmt::format("{} held-out examples is more than half of the {} distinct prompts "
                    "these knobs allow",
                    held_out, static_cast<int64_t>(space)));
  return std::nullopt;
}

}  // namespace

const std::vector<std::string>& TaskConfig::task_names() {
  static const std::vector<std::string> names = {"add", "sort", "reverse", "count", "jsonl"};
  return names;
}

TaskConfig TaskConfig::defaults(const std::string& name) {
  TaskConfig c;
  c.name = name;
  FM_CHECK(task_knobs().contains(name), "unknown task '{}' (known: {})", name,
           fmt::join(task_names(), ", "));
  return c;
}

TaskConfig TaskConfig::from_yaml(const ConfigNode& node) {
  TaskConfig c;
  c.name = node.get_choice("name", task_names(), c.name);
  const std::vector<std::string>& own = task_knobs().at(c.name);
  for (const std::string& key : node.keys()) {
    static const std::vector<std::string> common = {"name", "seed", "held_out", "format_reward"};
    const bool known =
        std::ranges::find(common, key) != common.end() || std::ranges::find(own, key) != own.end();
    if (!known)
      node.fail(key, fmt::format("not a knob of task '{}' (its knobs: {}, {})", c.name,
                                 fmt::join(common, ", "), fmt::join(own, ", ")));
  }
  c.seed = node.get<uint64_t>("seed", c.seed);
  if (node.has("held_out")) c.held_out = node.get<int64_t>("held_out");
  c.format_reward = node.get<double>("format_reward", c.format_reward);
  c.min_digits = node.get<int64_t>("min_digits", c.min_digits);
  c.max_digits = node.get<int64_t>("max_digits", c.max_digits);
  c.min_len = node.get<int64_t>("min_len", c.min_len);
  c.max_len = node.get<int64_t>("max_len", c.max_len);
  c.alphabet = node.get<int64_t>("alphabet", c.alphabet);
  c.path = node.get<std::string>("path", c.path);
  if (const Problem p = first_problem(c)) node.fail(p->first, p->second);
  return c;
}

void TaskConfig::validate(const std::string& where) const {
  if (const Problem p = first_problem(*this))
    throw Error(fmt::format("{}: {}: {}", where, p->first, p->second));
}

}  // namespace fm
