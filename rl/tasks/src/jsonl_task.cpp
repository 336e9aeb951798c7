#include "rl/tasks/jsonl_task.h"

#include <fmt/format.h>

#include <charconv>
#include <cmath>
#include <nlohmann/json.hpp>
#include <numeric>
#include <unordered_set>

#include "engine/error.h"
#include "engine/files.h"
#include "engine/rng.h"

namespace fm {
namespace {

std::optional<double> parse_number(std::string_view s) {
  if (s.empty()) return std::nullopt;
  if (s.front() == '+') s.remove_prefix(1);  // from_chars rejects a leading '+'
  double value = 0;
  const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), value);
  if (ec != std::errc() || end != s.data() + s.size() || !std::isfinite(value)) return std::nullopt;
  return value;
}

std::string string_field(const nlohmann::json& obj, const char* key, const std::string& where) {
  const auto it = obj.find(key);
  FM_CHECK(it != obj.end(), "{}: missing key \"{}\"", where, key);
  FM_CHECK(it->is_string(), "{}: \"{}\" must be a string (got {})", where, key, it->type_name());
  return it->get<std::string>();
}

}  // namespace

std::vector<TaskExample> JsonlTask::read_examples(const std::string& path) {
  const std::string text = read_file(path);
  std::vector<TaskExample> examples;
  size_t start = 0;
  for (int64_t line_no = 1; start < text.size(); ++line_no) {
    size_t end = text.find('\n', start);
    if (end == std::string::npos) end = text.size();
    const std::string_view line(text.data() + start, end - start);
    start = end + 1;
    if (line.find_first_not_of(" \t\r") == std::string_view::npos) continue;  // blank
    const std::string where = fmt::format("{}:{}", path, line_no);
    nlohmann::json obj;
    try {
      obj = nlohmann::json::parse(line);
    } catch (const nlohmann::json::parse_error& e) {
      throw Error(fmt::format("{}: not valid JSON ({})", where, e.what()));
    }
    FM_CHECK(obj.is_object(),
             "{}: expected an object {{\"prompt\": ..., \"answer\": ...}} (got {})", where,
             obj.type_name());
    examples.push_back({string_field(obj, "prompt", where), string_field(obj, "answer", where)});
  }
  FM_CHECK(!examples.empty(), "{}: no examples (expected one JSON object per line)", path);
  return examples;
}

JsonlTask::JsonlTask(const TaskConfig& config) : Task(config.format_reward) {
  std::vector<TaskExample> all = read_examples(config.path);
  const int64_t n = static_cast<int64_t>(all.size());
  const int64_t held = config.held_out.value_or(std::min<int64_t>(200, n / 10));
  FM_CHECK(held < n, "{}: held_out: {} held-out examples leave none of the {} for training",
           config.path, held, n);
  // Fisher-Yates with the task's seed: the first `held` of the permutation are held out.
  std::vector<size_t> order(all.size());
  std::iota(order.begin(), order.end(), size_t{0});
  Rng rng(config.seed, 0);
  for (size_t i = order.size() - 1; i > 0; --i) std::swap(order[i], order[rng.next_below(i + 1)]);
  std::unordered_set<std::string> held_prompts;
  for (int64_t i = 0; i < held; ++i) {
    held_out_.push_back(all[order[static_cast<size_t>(i)]]);
    held_prompts.insert(held_out_.back().prompt);
  }
  for (size_t i = static_cast<size_t>(held); i < order.size(); ++i)
    if (!held_prompts.contains(all[order[i]].prompt)) train_.push_back(all[order[i]]);
  FM_CHECK(!train_.empty(), "{}: held_out: every training line repeats a held-out prompt",
           config.path);
}

TaskExample JsonlTask::example(uint64_t index) const {
  return train_[index % train_.size()];
}

bool JsonlTask::answers_match(std::string_view extracted, std::string_view answer) {
  const std::string a = extract_answer(answer);  // trimmed
  const auto x = parse_number(extracted), y = parse_number(a);
  if (x && y) {
    // Relative tolerance 1e-6: answers like "0.1" vs "0.10000000001" match, "1" vs "1.01" do not.
    return *x == *y || std::abs(*x - *y) <= 1e-6 * std::max(std::abs(*x), std::abs(*y));
  }
  return extracted == a;
}

bool JsonlTask::well_formed(std::string_view extracted, std::string_view answer) const {
  if (extracted.empty()) return false;
  return !parse_number(extract_answer(answer)) || parse_number(extracted).has_value();
}

}  // namespace fm
