#include "engine/collectives.h"

#include "engine/error.h"

namespace fm {

namespace {

template <typename T>
void reduce_in_place(Communicator* comm, std::span<T> values, DType dtype, ReduceOp op) {
  if (comm == nullptr || comm->size() == 1 || values.empty()) return;
  comm->all_reduce(values.data(), static_cast<int64_t>(values.size()), dtype, op);
}

template <typename T>
T reduce_one(Communicator* comm, T value, DType dtype, ReduceOp op) {
  reduce_in_place(comm, std::span<T>(&value, 1), dtype, op);
  return value;
}

// A gather of variable lengths as an all-to-all whose only non-empty blocks go to `root`.
template <typename T>
std::vector<T> gather_variable(Communicator* comm, const std::vector<T>& values, int root,
                               DType dtype) {
  if (comm == nullptr || comm->size() == 1) return values;
  const int W = comm->size();
  FM_CHECK(root >= 0 && root < W, "gather_to_root: root {} of {} ranks", root, W);
  std::vector<int64_t> counts(static_cast<size_t>(W));
  const int64_t n = static_cast<int64_t>(values.size());
  comm->all_gather(&n, counts.data(), 1, DType::i64);
  std::vector<int64_t> send_counts(static_cast<size_t>(W), 0), recv_counts(send_counts);
  send_counts[static_cast<size_t>(root)] = n;
  int64_t total = 0;
  if (comm->rank() == root) {
    recv_counts = counts;
    for (int64_t c : counts) total += c;
  }
  std::vector<T> out(static_cast<size_t>(total));
  comm->all_to_all(values.data(), send_counts, out.data(), recv_counts, dtype);
  return out;
}

}  // namespace

void sum_over_ranks(Communicator* comm, std::span<double> values) {
  reduce_in_place(comm, values, DType::f64, ReduceOp::sum);
}
void max_over_ranks(Communicator* comm, std::span<double> values) {
  reduce_in_place(comm, values, DType::f64, ReduceOp::max);
}
double sum_over_ranks(Communicator* comm, double value) {
  return reduce_one(comm, value, DType::f64, ReduceOp::sum);
}
double max_over_ranks(Communicator* comm, double value) {
  return reduce_one(comm, value, DType::f64, ReduceOp::max);
}
int64_t sum_over_ranks(Communicator* comm, int64_t value) {
  return reduce_one(comm, value, DType::i64, ReduceOp::sum);
}
int64_t max_over_ranks(Communicator* comm, int64_t value) {
  return reduce_one(comm, value, DType::i64, ReduceOp::max);
}

bool any_rank(Communicator* comm, bool local) {
  return max_over_ranks(comm, int64_t{local ? 1 : 0}) != 0;
}

int first_rank_with(Communicator* comm, bool local) {
  const int64_t W = comm == nullptr ? 1 : comm->size();
  const int64_t rank = comm == nullptr ? 0 : comm->rank();
  // max of (W - rank) over the ranks with `local`: the lowest such rank.
  const int64_t m = max_over_ranks(comm, local ? W - rank : int64_t{0});
  return m == 0 ? -1 : static_cast<int>(W - m);
}

std::vector<int32_t> gather_to_root(Communicator* comm, const std::vector<int32_t>& values,
                                    int root) {
  return gather_variable(comm, values, root, DType::i32);
}
std::vector<int64_t> gather_to_root(Communicator* comm, const std::vector<int64_t>& values,
                                    int root) {
  return gather_variable(comm, values, root, DType::i64);
}

}  // namespace fm
