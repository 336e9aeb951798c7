// The generated verifiable tasks, drawn from a seed (no files, no downloads):
//   add:     "12+345="          -> "357"   operands of min_digits..max_digits digits
//   sort:    "sort 3142"        -> "1234"  a digit string of min_len..max_len digits
//   reverse: "reverse abcd"     -> "dcba"  letters from the first `alphabet` of a-z
//   count:   "count a in abca"  -> "2"     occurrences of a letter of the alphabet
// Training example i is drawn from Rng(seed, i) (redrawn while its prompt is held
// out); held-out example j from Rng(seed, 2^63 + j), skipping repeats.
#pragma once

#include <memory>

#include "rl/tasks/task.h"
#include "rl/tasks/task_config.h"

namespace fm {

// config.name must be add, sort, reverse or count.
std::unique_ptr<Task> make_generated_task(const TaskConfig& config);

// How many distinct prompts the config's knobs allow (for the held-out size check;
// large spaces saturate at 1e18).
double prompt_space(const TaskConfig& config);

}  // namespace fm
