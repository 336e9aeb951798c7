#include "rl/tasks/task.h"

#include "engine/error.h"
#include "rl/tasks/generated_tasks.h"
#include "rl/tasks/jsonl_task.h"
#include "rl/tasks/task_config.h"

namespace fm {

std::string Task::extract_answer(std::string_view response) {
  std::string_view line = response.substr(0, response.find('\n'));
  const char* space = " \t\r\f\v";
  const size_t first = line.find_first_not_of(space);
  if (first == std::string_view::npos) return "";
  const size_t last = line.find_last_not_of(space);
  return std::string(line.substr(first, last - first + 1));
}

Reward Task::score(std::string_view response, std::string_view answer) const {
  Reward r;
  r.extracted = extract_answer(response);
  r.well_formed = well_formed(r.extracted, answer);
  r.correct = matches(r.extracted, answer);
  r.reward = r.correct ? 1.0 : (r.well_formed ? format_reward_ : 0.0);
  return r;
}

std::unique_ptr<Task> make_task(const TaskConfig& config) {
  config.validate("task config");
  if (config.name == "jsonl") return std::make_unique<JsonlTask>(config);
  return make_generated_task(config);
}

}  // namespace fm
