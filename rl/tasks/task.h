// Verifiable tasks for RL: a prompt, the one right answer, and a reward that
// checks a model's response against it. Generated tasks (add, sort, reverse,
// count; rl/tasks/generated_tasks.h) draw examples from a seed; the JSONL task
// (rl/tasks/jsonl_task.h) reads them from a file.
//
// Every task has a fixed held-out list (for evaluation) and a training stream
// example(0), example(1), ... that never yields a held-out prompt. Both depend
// only on the task's config (seed included).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_set>
#include <vector>

namespace fm {

struct TaskConfig;

struct TaskExample {
  std::string prompt;  // "12+345="
  std::string answer;  // "357"
  bool operator==(const TaskExample&) const = default;
};

struct Reward {
  double reward = 0.0;       // 1 if correct; format_reward if well formed but wrong; else 0
  bool correct = false;      // the extracted answer matches
  bool well_formed = false;  // the extracted answer has the answer's shape (e.g. digits only)
  std::string extracted;     // what extract_answer() took from the response
};

class Task {
 public:
  virtual ~Task() = default;

  virtual const std::string& name() const = 0;
  // The index-th training example; never one of held_out()'s prompts.
  virtual TaskExample example(uint64_t index) const = 0;
  virtual const std::vector<TaskExample>& held_out() const = 0;

  // The answer part of a model's response: the text before the first newline, with
  // surrounding whitespace trimmed.
  static std::string extract_answer(std::string_view response);
  // Exact match of the extracted answer scores 1; a well-formed but wrong answer
  // scores the config's format_reward; anything else 0.
  Reward score(std::string_view response, std::string_view answer) const;

 protected:
  explicit Task(double format_reward) : format_reward_(format_reward) {}
  // Whether `extracted` has the shape of an answer to this task.
  virtual bool well_formed(std::string_view extracted, std::string_view answer) const = 0;
  virtual bool matches(std::string_view extracted, std::string_view answer) const {
    return extracted == answer;
  }

 private:
  double format_reward_;
};

// The task a config names (reads the JSONL file for `jsonl`).
std::unique_ptr<Task> make_task(const TaskConfig& config);

}  // namespace fm
