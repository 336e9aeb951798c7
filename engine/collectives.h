// Small collectives over an optional communicator, for code that runs on one rank or on
// every rank of a group alike (the RL trainer's statistics, agreed decisions). comm ==
// nullptr means a single rank: each function then returns its input unchanged. Every rank
// of the group must make the same calls in the same order (engine/comm.h).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "engine/comm.h"

namespace fm {

// Sums (or takes the max of) the values element-wise over the ranks, in place.
void sum_over_ranks(Communicator* comm, std::span<double> values);
void max_over_ranks(Communicator* comm, std::span<double> values);
double sum_over_ranks(Communicator* comm, double value);
double max_over_ranks(Communicator* comm, double value);
int64_t sum_over_ranks(Communicator* comm, int64_t value);
int64_t max_over_ranks(Communicator* comm, int64_t value);
// True on every rank when `local` is true on any rank: how ranks agree to skip a step or
// to fail together.
bool any_rank(Communicator* comm, bool local);
// The lowest rank whose `local` is true, or -1 when none: for messages naming the rank.
int first_rank_with(Communicator* comm, bool local);

// Rank `root` receives every rank's `values` concatenated in rank order (any lengths);
// the other ranks receive an empty vector.
std::vector<int32_t> gather_to_root(Communicator* comm, const std::vector<int32_t>& values,
                                    int root = 0);
std::vector<int64_t> gather_to_root(Communicator* comm, const std::vector<int64_t>& values,
                                    int root = 0);

}  // namespace fm
