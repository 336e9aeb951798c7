#include "rl/tasks/generated_tasks.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <string>
#include <unordered_set>

#include "engine/error.h"
#include "engine/rng.h"

namespace fm {
namespace {

constexpr uint64_t kHeldOutStream = uint64_t{1} << 63;
constexpr double kSpaceCap = 1e18;

int64_t draw_in(Rng& rng, int64_t lo, int64_t hi) {  // uniform in [lo, hi]
  return lo + static_cast<int64_t>(rng.next_below(static_cast<uint64_t>(hi - lo + 1)));
}

std::string draw_letters(Rng& rng, int64_t len, int64_t alphabet) {
  std::string s(static_cast<size_t>(len), 'a');
  for (char& ch : s) ch = static_cast<char>('a' + rng.next_below(static_cast<uint64_t>(alphabet)));
  return s;
}

// Non-empty and every character passes `pred`.
bool all_chars(std::string_view s, bool (*pred)(int)) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [pred](char ch) {
    return pred(static_cast<unsigned char>(ch));
  });
}
bool is_lower_letter(int ch) {
  return ch >= 'a' && ch <= 'z';
}
bool is_digit(int ch) {
  return ch >= '0' && ch <= '9';
}

// n-digit numbers: 0..9 for one digit, else 10^(n-1) .. 10^n - 1.
uint64_t draw_number(Rng& rng, int64_t digits) {
  if (digits == 1) return rng.next_below(10);
  uint64_t lo = 1;
  for (int64_t i = 1; i < digits; ++i) lo *= 10;
  return lo + rng.next_below(9 * lo);
}

TaskExample draw_add(const TaskConfig& c, Rng& rng) {
  const uint64_t a = draw_number(rng, draw_in(rng, c.min_digits, c.max_digits));
  const uint64_t b = draw_number(rng, draw_in(rng, c.min_digits, c.max_digits));
  return {std::to_string(a) + "+" + std::to_string(b) + "=", std::to_string(a + b)};
}

TaskExample draw_sort(const TaskConfig& c, Rng& rng) {
  std::string digits(static_cast<size_t>(draw_in(rng, c.min_len, c.max_len)), '0');
  for (char& ch : digits) ch = static_cast<char>('0' + rng.next_below(10));
  std::string sorted = digits;
  std::sort(sorted.begin(), sorted.end());
  return {"sort " + digits, sorted};
}

TaskExample draw_reverse(const TaskConfig& c, Rng& rng) {
  const std::string s = draw_letters(rng, draw_in(rng, c.min_len, c.max_len), c.alphabet);
  return {"reverse " + s, std::string(s.rbegin(), s.rend())};
}

TaskExample draw_count(const TaskConfig& c, Rng& rng) {
  const char letter = static_cast<char>('a' + rng.next_below(static_cast<uint64_t>(c.alphabet)));
  const std::string s = draw_letters(rng, draw_in(rng, c.min_len, c.max_len), c.alphabet);
  return {std::string("count ") + letter + " in " + s,
          std::to_string(std::count(s.begin(), s.end(), letter))};
}

// sum over len in [lo, hi] of base^len, saturating.
double strings_space(double base, int64_t lo, int64_t hi) {
  double total = 0;
  for (int64_t len = lo; len <= hi; ++len) total += std::pow(base, static_cast<double>(len));
  return std::min(total, kSpaceCap);
}

class GeneratedTask : public Task {
 public:
  using Draw = std::function<TaskExample(const TaskConfig&, Rng&)>;
  using Shape = bool (*)(int);  // a character of a well-formed answer

  GeneratedTask(const TaskConfig& config, Draw draw, Shape shape)
      : Task(config.format_reward), config_(config), draw_(std::move(draw)), shape_(shape) {
    const int64_t n = config.held_out.value_or(200);
    // Held-out prompts fill at most half the prompt space (TaskConfig checks), so
    // repeats are rare; the bound only guards against a skewed draw distribution.
    const uint64_t max_attempts = 1000 + 100 * static_cast<uint64_t>(n);
    for (uint64_t j = 0; static_cast<int64_t>(held_out_.size()) < n; ++j) {
      FM_CHECK(j < max_attempts,
               "task {}: held_out: could not draw {} distinct prompts in {} attempts", config.name,
               n, max_attempts);
      Rng rng(config.seed, kHeldOutStream + j);
      TaskExample e = draw_(config_, rng);
      if (held_out_prompts_.insert(e.prompt).second) held_out_.push_back(std::move(e));
    }
  }

  const std::string& name() const override { return config_.name; }

  TaskExample example(uint64_t index) const override {
    Rng rng(config_.seed, index);
    for (int attempt = 0; attempt < 10000; ++attempt) {
      TaskExample e = draw_(config_, rng);
      if (!held_out_prompts_.contains(e.prompt)) return e;
    }
    throw Error(
        fmt::format("task {}: example {}: every draw was a held-out prompt", config_.name, index));
  }

  const std::vector<TaskExample>& held_out() const override { return held_out_; }

 protected:
  bool well_formed(std::string_view extracted, std::string_view) const override {
    return all_chars(extracted, shape_);
  }

 private:
  TaskConfig config_;
  Draw draw_;
  Shape shape_;
  std::vector<TaskExample> held_out_;
  std::unordered_set<std::string> held_out_prompts_;
};

}  // namespace

double prompt_space(const TaskConfig& c) {
  if (c.name == "add") {
    double per_operand = 0;
    for (int64_t d = c.min_digits; d <= c.max_digits; ++d)
      per_operand += d == 1 ? 10.0 : 9.0 * std::pow(10.0, static_cast<double>(d - 1));
    return std::min(per_operand * per_operand, kSpaceCap);
  }
  if (c.name == "sort") return strings_space(10.0, c.min_len, c.max_len);
  const double strings = strings_space(static_cast<double>(c.alphabet), c.min_len, c.max_len);
  if (c.name == "reverse") return strings;
  if (c.name == "count") return std::min(strings * static_cast<double>(c.alphabet), kSpaceCap);
  throw Error(fmt::format("'{}' is not a generated task", c.name));
}

std::unique_ptr<Task> make_generated_task(const TaskConfig& c) {
  c.validate("task config");
  if (c.name == "add") return std::make_unique<GeneratedTask>(c, draw_add, is_digit);
  if (c.name == "sort") return std::make_unique<GeneratedTask>(c, draw_sort, is_digit);
  if (c.name == "reverse") return std::make_unique<GeneratedTask>(c, draw_reverse, is_lower_letter);
  if (c.name == "count") return std::make_unique<GeneratedTask>(c, draw_count, is_digit);
  throw Error(fmt::format("'{}' is not a generated task (add, sort, reverse, count)", c.name));
}

}  // namespace fm
