// `foremoe tasks dump`: print examples of the embedded verifiable tasks (the
// tokenizer corpus is made from it; see tokenizer/data/README.md).
#include <fmt/format.h>

#include <memory>
#include <nlohmann/json.hpp>

#include "engine/error.h"
#include "rl/tasks/task.h"
#include "rl/tasks/task_config.h"
#include "tools/foremoe/commands.h"

namespace fm::cli {

struct TasksDumpArgs {
  std::string task = "all";
  int64_t n = 10;
  std::string split = "train";
  std::string format = "text";
  uint64_t seed = 1;
};

static int run_tasks_dump(const TasksDumpArgs& a) {
  std::vector<std::string> names;
  if (a.task == "all")
    names = {"add", "sort", "reverse", "count"};
  else
    names = {a.task};
  for (const std::string& name : names) {
    TaskConfig config = TaskConfig::defaults(name);
    config.seed = a.seed;
    const std::unique_ptr<Task> task = make_task(config);
    const int64_t n = a.split == "held_out"
                          ? std::min<int64_t>(a.n, static_cast<int64_t>(task->held_out().size()))
                          : a.n;
    for (int64_t i = 0; i < n; ++i) {
      const TaskExample e = a.split == "held_out" ? task->held_out()[static_cast<size_t>(i)]
                                                  : task->example(static_cast<uint64_t>(i));
      if (a.format == "jsonl")
        fmt::print("{}\n", nlohmann::json{{"prompt", e.prompt}, {"answer", e.answer}}.dump());
      else
        fmt::print("{} {}\n", e.prompt, e.answer);
    }
  }
  return 0;
}

Runner add_tasks(CLI::App& app) {
  auto* cmd =
      app.add_subcommand("tasks", "The embedded verifiable tasks (add, sort, reverse, count)");
  cmd->require_subcommand(1);
  auto* dump = cmd->add_subcommand("dump", "Print task examples (default settings of each task)");
  auto a = std::make_shared<TasksDumpArgs>();
  dump->add_option("--task", a->task, "add, sort, reverse, count or all")
      ->check(CLI::IsMember({"add", "sort", "reverse", "count", "all"}))
      ->capture_default_str();
  dump->add_option("--n", a->n, "examples per task (held_out: at most the held-out size)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  dump->add_option("--split", a->split, "train or held_out")
      ->check(CLI::IsMember({"train", "held_out"}))
      ->capture_default_str();
  dump->add_option("--format", a->format, "text ('<prompt> <answer>' lines) or jsonl")
      ->check(CLI::IsMember({"text", "jsonl"}))
      ->capture_default_str();
  dump->add_option("--seed", a->seed, "task seed")->capture_default_str();
  return [a] { return run_tasks_dump(*a); };
}

}  // namespace fm::cli
