// A task read from a JSONL file, one {"prompt": "...", "answer": "..."} object
// per line (other keys are ignored, blank lines skipped). Malformed lines, a
// missing key, a non-string value or a file with no examples are errors naming
// the file and the line.
//
// Held-out split: a permutation of the lines drawn from Rng(seed) puts its
// first `held_out` lines (default: 10% of the lines, at most 200) in the
// held-out list; the rest, minus any line whose prompt is held out, form the
// training list in that permuted order, and example(i) is its (i mod size)-th.
//
// Reward: when both the extracted response and the answer parse as numbers,
// they match within a relative tolerance of 1e-6; otherwise they must be equal
// after trimming. Well formed: non-empty, and a number when the answer is one.
#pragma once

#include <memory>
#include <string>

#include "rl/tasks/task.h"
#include "rl/tasks/task_config.h"

namespace fm {

class JsonlTask : public Task {
 public:
  static std::vector<TaskExample> read_examples(const std::string& path);
  explicit JsonlTask(const TaskConfig& config);

  const std::string& name() const override { return name_; }
  TaskExample example(uint64_t index) const override;
  const std::vector<TaskExample>& held_out() const override { return held_out_; }
  const std::vector<TaskExample>& training() const { return train_; }

  // Numeric comparison (relative tolerance 1e-6) when both parse as numbers, else equality.
  static bool answers_match(std::string_view extracted, std::string_view answer);

 protected:
  bool well_formed(std::string_view extracted, std::string_view answer) const override;
  bool matches(std::string_view extracted, std::string_view answer) const override {
    return answers_match(extracted, answer);
  }

 private:
  std::string name_ = "jsonl";
  std::vector<TaskExample> held_out_;
  std::vector<TaskExample> train_;
};

}  // namespace fm
