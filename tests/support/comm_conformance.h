// Conformance checks every Communicator passes: inprocess (threads), gloo (one process per
// rank) and nccl. Call a check on every rank of a group, with that rank's communicator, in the
// same order on every rank. A wrong result throws fm::Error naming the check, the backend, the
// rank and the first wrong element (no GoogleTest macros: a check may run in a child process).
//
// Inputs are fresh pseudo-random values from a fixed seed (Philox, stream = rank), so every
// rank recomputes what each peer sent and hence the exact expected result. Float inputs are
// multiples of 1/64 in [-16, 16) (f64: of 2^-20), so sums over up to thousands of ranks are
// exact in any order: results are compared bit-exactly whatever order a backend reduces in.
//
// Point-to-point checks order their calls so that they also pass where a send blocks until
// its recv is posted (NCCL, Gloo): even ranks send first, odd ranks receive first, and
// messages are received in the order they were sent.
#pragma once

#include <fmt/format.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "engine/comm.h"
#include "engine/error.h"
#include "engine/rng.h"

namespace fm::testing {

template <class T>
constexpr DType dtype_of() {
  if constexpr (std::is_same_v<T, float>) return DType::f32;
  if constexpr (std::is_same_v<T, double>) return DType::f64;
  if constexpr (std::is_same_v<T, int32_t>) return DType::i32;
  if constexpr (std::is_same_v<T, int64_t>) return DType::i64;
}

inline constexpr DType kCommDtypes[] = {DType::f32, DType::f64, DType::i32, DType::i64};
inline constexpr ReduceOp kReduceOps[] = {ReduceOp::sum, ReduceOp::max};

// fn(T{}) with T the C++ type of `dtype` (one of kCommDtypes).
template <class Fn>
void with_comm_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::f32:
      return fn(float{});
    case DType::f64:
      return fn(double{});
    case DType::i32:
      return fn(int32_t{});
    case DType::i64:
      return fn(int64_t{});
    default:
      throw Error(fmt::format("comm conformance: no checks for dtype {}", dtype_name(dtype)));
  }
}

// n values that `rank` contributes to the check seeded `seed` (see the header comment).
template <class T>
std::vector<T> rank_values(uint64_t seed, int rank, int64_t n) {
  Rng rng(seed, static_cast<uint64_t>(rank));
  const int64_t draws = std::is_same_v<T, int64_t> ? 2 * n : n;
  std::vector<double> u(static_cast<size_t>(draws));
  rng.uniform(u.data(), draws);  // multiples of 2^-32 in [0, 1)
  std::vector<T> out(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    if constexpr (std::is_same_v<T, float>) {
      out[i] = static_cast<float>(std::floor(u[i] * 2048) - 1024) / 64.f;  // k/64, |k| <= 1024
    } else if constexpr (std::is_same_v<T, double>) {
      out[i] = std::ldexp(std::floor(u[i] * 0x1.0p25) - 0x1.0p24, -20);  // k/2^20, |k| <= 2^24
    } else if constexpr (std::is_same_v<T, int32_t>) {
      out[i] = static_cast<int32_t>(std::floor(u[i] * 0x1.0p21) - 0x1.0p20);  // |v| <= 2^20
    } else {  // |v| < 2^51, all 64-bit lanes busy, low bits random too
      const auto hi = static_cast<int64_t>(std::floor(u[2 * i] * 0x1.0p32)) - (int64_t{1} << 31);
      const auto lo = static_cast<int64_t>(std::floor(u[2 * i + 1] * 0x1.0p20));
      out[i] = hi * (int64_t{1} << 20) + lo;
    }
  }
  return out;
}

// A value no rank_values() draw takes: marks output elements a collective must overwrite.
template <class T>
constexpr T kUnwritten = std::numeric_limits<T>::max();

template <class T>
T reduce_reference(T a, T b, ReduceOp op) {
  return op == ReduceOp::max ? (b > a ? b : a) : a + b;
}

// Element-wise op over ranks 0..size-1 of rank_values(seed, rank, n).
template <class T>
std::vector<T> reduced_values(uint64_t seed, int size, int64_t n, ReduceOp op) {
  std::vector<T> out = rank_values<T>(seed, 0, n);
  for (int p = 1; p < size; ++p) {
    const std::vector<T> v = rank_values<T>(seed, p, n);
    for (int64_t i = 0; i < n; ++i) out[i] = reduce_reference(out[i], v[i], op);
  }
  return out;
}

// Throws when got != want, naming the first wrong element and how many are wrong.
template <class T>
void expect_values(const std::string& what, const Communicator& comm, const std::vector<T>& got,
                   const std::vector<T>& want) {
  const auto where = [&] {
    return fmt::format("comm conformance {} [{}, rank {} of {}]", what, comm.backend_name(),
                       comm.rank(), comm.size());
  };
  if (got.size() != want.size())
    throw Error(fmt::format("{}: {} elements, expected {}", where(), got.size(), want.size()));
  size_t wrong = 0, first = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!(got[i] == want[i]) && wrong++ == 0) first = i;
  }
  if (wrong > 0)
    throw Error(fmt::format("{}: element {} is {}, expected {} ({} of {} elements wrong)", where(),
                            first, got[first], want[first], wrong, got.size()));
}

// ---- One case of each collective ----

template <class T>
void all_reduce_case(Communicator& comm, ReduceOp op, int64_t count, uint64_t seed) {
  std::vector<T> data = rank_values<T>(seed, comm.rank(), count);
  comm.all_reduce(data.data(), count, dtype_of<T>(), op);
  expect_values(fmt::format("all_reduce({}, {}, count {})", dtype_name(dtype_of<T>()),
                            reduce_op_name(op), count),
                comm, data, reduced_values<T>(seed, comm.size(), count, op));
}

// Large counts: independent inputs per rank would make every rank draw size * count values, so
// rank r contributes base[i] + (r + i) mod size instead (base: rank_values(seed, 0, count)).
// Over ranks the offsets are a permutation of 0..size-1, so the sum is
// size * base[i] + size (size - 1) / 2 and the max base[i] + size - 1, reached on a different
// rank for each i: a reduction that drops, repeats or picks ranks, or shifts elements, fails.
template <class T>
void all_reduce_large_case(Communicator& comm, ReduceOp op, int64_t count, uint64_t seed) {
  const int size = comm.size(), rank = comm.rank();
  const std::vector<T> base = rank_values<T>(seed, 0, count);
  std::vector<T> data(base.size()), want(base.size());
  for (int64_t i = 0; i < count; ++i) {
    data[i] = base[i] + static_cast<T>((rank + i) % size);
    want[i] = op == ReduceOp::max
                  ? base[i] + static_cast<T>(size - 1)
                  : static_cast<T>(size) * base[i] + static_cast<T>(int64_t{size} * (size - 1) / 2);
  }
  comm.all_reduce(data.data(), count, dtype_of<T>(), op);
  expect_values(fmt::format("all_reduce({}, {}, large count {})", dtype_name(dtype_of<T>()),
                            reduce_op_name(op), count),
                comm, data, want);
}

template <class T>
void all_gather_case(Communicator& comm, int64_t count, uint64_t seed) {
  const int size = comm.size();
  const std::vector<T> send = rank_values<T>(seed, comm.rank(), count);
  std::vector<T> recv(static_cast<size_t>(count * size), kUnwritten<T>), want;
  comm.all_gather(send.data(), recv.data(), count, dtype_of<T>());
  for (int p = 0; p < size; ++p) {
    const std::vector<T> v = rank_values<T>(seed, p, count);
    want.insert(want.end(), v.begin(), v.end());
  }
  expect_values(fmt::format("all_gather({}, count {})", dtype_name(dtype_of<T>()), count), comm,
                recv, want);
}

template <class T>
void reduce_scatter_case(Communicator& comm, ReduceOp op, int64_t count, uint64_t seed) {
  const int size = comm.size(), rank = comm.rank();
  const std::vector<T> send = rank_values<T>(seed, rank, count * size);
  std::vector<T> recv(static_cast<size_t>(count), kUnwritten<T>);
  comm.reduce_scatter(send.data(), recv.data(), count, dtype_of<T>(), op);
  const std::vector<T> all = reduced_values<T>(seed, size, count * size, op);
  const std::vector<T> want(all.begin() + rank * count, all.begin() + (rank + 1) * count);
  expect_values(fmt::format("reduce_scatter({}, {}, count {})", dtype_name(dtype_of<T>()),
                            reduce_op_name(op), count),
                comm, recv, want);
}

template <class T>
void broadcast_case(Communicator& comm, int root, int64_t count, uint64_t seed) {
  const std::vector<T> want = rank_values<T>(seed, root, count);
  std::vector<T> data = comm.rank() == root ? want : std::vector<T>(want.size(), kUnwritten<T>);
  comm.broadcast(data.data(), count, dtype_of<T>(), root);
  expect_values(
      fmt::format("broadcast({}, count {}, root {})", dtype_name(dtype_of<T>()), count, root), comm,
      data, want);
}

// How many elements rank src sends rank dst in an all_to_all pattern.
enum class AllToAllPattern {
  uneven,        // 0..6 elements, a third of the pairs none
  silent_ranks,  // rank 0 sends nothing, rank size-1 receives nothing, others 0..299
  empty,         // nothing at all
  large,         // 0..19999 elements
};

inline int64_t all_to_all_count(AllToAllPattern pattern, uint64_t seed, int src, int dst,
                                int size) {
  Rng rng(seed, static_cast<uint64_t>(src) * static_cast<uint64_t>(size) + dst);
  switch (pattern) {
    case AllToAllPattern::uneven: {
      const auto x = static_cast<int64_t>(rng.next_below(9));
      return x < 3 ? 0 : x - 2;
    }
    case AllToAllPattern::silent_ranks:
      return src == 0 || dst == size - 1 ? 0 : static_cast<int64_t>(rng.next_below(300));
    case AllToAllPattern::empty:
      return 0;
    case AllToAllPattern::large:
      return static_cast<int64_t>(rng.next_below(20000));
  }
  return 0;
}

// Rank src sends rank_values(seed, src, total) laid out by destination.
template <class T>
void all_to_all_case(Communicator& comm, AllToAllPattern pattern, uint64_t seed) {
  const int size = comm.size(), rank = comm.rank();
  const auto counts_from = [&](int src) {
    std::vector<int64_t> counts(size);
    for (int dst = 0; dst < size; ++dst)
      counts[dst] = all_to_all_count(pattern, seed, src, dst, size);
    return counts;
  };
  const auto total = [](const std::vector<int64_t>& c) {
    int64_t t = 0;
    for (int64_t x : c) t += x;
    return t;
  };
  const std::vector<int64_t> send_counts = counts_from(rank);
  std::vector<int64_t> recv_counts(size);
  for (int src = 0; src < size; ++src)
    recv_counts[src] = all_to_all_count(pattern, seed, src, rank, size);
  const std::vector<T> send = rank_values<T>(seed, rank, total(send_counts));
  std::vector<T> recv(static_cast<size_t>(total(recv_counts)), kUnwritten<T>), want;
  comm.all_to_all(send.data(), send_counts, recv.data(), recv_counts, dtype_of<T>());
  for (int src = 0; src < size; ++src) {
    const std::vector<int64_t> c = counts_from(src);
    const std::vector<T> sent = rank_values<T>(seed, src, total(c));
    int64_t offset = 0;
    for (int dst = 0; dst < rank; ++dst) offset += c[dst];
    want.insert(want.end(), sent.begin() + offset, sent.begin() + offset + c[rank]);
  }
  expect_values(fmt::format("all_to_all({}, pattern {})", dtype_name(dtype_of<T>()),
                            static_cast<int>(pattern)),
                comm, recv, want);
}

// Every rank sends `messages` (count, tag) to rank + shift and receives them from
// rank - shift, in order; the payload of message m is rank_values(seed + m, sender, count).
// shift is +1 or -1: with even ranks sending first and odd ranks receiving first, that never
// deadlocks even where a send waits for its recv (any world size).
struct P2pMessage {
  int64_t count;
  int tag;
};

template <class T>
void shift_case(Communicator& comm, int shift, const std::vector<P2pMessage>& messages,
                uint64_t seed) {
  FM_CHECK(shift == 1 || shift == -1, "comm conformance: shift {} is not +1 or -1", shift);
  const int size = comm.size(), rank = comm.rank();
  if (size == 1) return;
  const int to = ((rank + shift) % size + size) % size;
  const int from = ((rank - shift) % size + size) % size;
  const auto send_all = [&] {
    for (size_t m = 0; m < messages.size(); ++m) {
      const std::vector<T> v = rank_values<T>(seed + m, rank, messages[m].count);
      comm.send(v.data(), messages[m].count, dtype_of<T>(), to, messages[m].tag);
    }
  };
  const auto recv_all = [&] {
    for (size_t m = 0; m < messages.size(); ++m) {
      std::vector<T> v(static_cast<size_t>(messages[m].count), kUnwritten<T>);
      comm.recv(v.data(), messages[m].count, dtype_of<T>(), from, messages[m].tag);
      expect_values(
          fmt::format("recv(shift {}, message {}, tag {}, {} {} from rank {})", shift, m,
                      messages[m].tag, messages[m].count, dtype_name(dtype_of<T>()), from),
          comm, v, rank_values<T>(seed + m, from, messages[m].count));
    }
  };
  if (rank % 2 == 0) {
    send_all();
    recv_all();
  } else {
    recv_all();
    send_all();
  }
}

// ---- The checks ----

// sum and max of every dtype at counts 0, 1, 3 and 1000 with independent inputs per rank, then
// at a large count (odd, so ranks' shares split unevenly) with all_reduce_large_case's inputs.
inline void check_all_reduce(Communicator& comm, int64_t large_count = 1'000'003) {
  uint64_t seed = 1000;
  for (DType dtype : kCommDtypes) {
    for (ReduceOp op : kReduceOps) {
      for (int64_t count : {0, 1, 3, 1000}) {
        with_comm_dtype(
            dtype, [&](auto zero) { all_reduce_case<decltype(zero)>(comm, op, count, ++seed); });
      }
    }
  }
  for (DType dtype : kCommDtypes) {
    for (ReduceOp op : kReduceOps) {
      with_comm_dtype(dtype, [&](auto zero) {
        all_reduce_large_case<decltype(zero)>(comm, op, large_count, ++seed);
      });
    }
  }
}

inline void check_all_gather(Communicator& comm) {
  uint64_t seed = 2000;
  for (DType dtype : kCommDtypes) {
    for (int64_t count : {0, 1, 7, 1000}) {
      with_comm_dtype(dtype,
                      [&](auto zero) { all_gather_case<decltype(zero)>(comm, count, ++seed); });
    }
  }
}

inline void check_reduce_scatter(Communicator& comm) {
  uint64_t seed = 3000;
  for (DType dtype : kCommDtypes) {
    for (ReduceOp op : kReduceOps) {
      for (int64_t count : {0, 1, 7, 1000}) {
        with_comm_dtype(dtype, [&](auto zero) {
          reduce_scatter_case<decltype(zero)>(comm, op, count, ++seed);
        });
      }
    }
  }
}

// From every root; non-roots start with kUnwritten, so a missed write shows.
inline void check_broadcast(Communicator& comm) {
  uint64_t seed = 4000;
  for (int root = 0; root < comm.size(); ++root) {
    for (DType dtype : kCommDtypes) {
      for (int64_t count : {0, 1, 1000}) {
        with_comm_dtype(
            dtype, [&](auto zero) { broadcast_case<decltype(zero)>(comm, root, count, ++seed); });
      }
    }
  }
}

// Uneven counts with zeros, ranks that send or receive nothing, all empty, and large blocks.
inline void check_all_to_all(Communicator& comm) {
  uint64_t seed = 5000;
  for (AllToAllPattern pattern : {AllToAllPattern::uneven, AllToAllPattern::silent_ranks,
                                  AllToAllPattern::empty, AllToAllPattern::large}) {
    for (DType dtype : kCommDtypes) {
      with_comm_dtype(dtype,
                      [&](auto zero) { all_to_all_case<decltype(zero)>(comm, pattern, ++seed); });
    }
  }
}

// A token around the ring 0 -> 1 -> ... -> 0 (each rank adds rank + 1), then shifts by +1 and
// -1 with several messages, two tags, and a tag used twice (its messages arrive in order).
inline void check_send_recv(Communicator& comm) {
  const int size = comm.size(), rank = comm.rank();
  if (size == 1) return;
  const auto token_after = [](int ranks) {  // 1000 + sum over p in [1, ranks) of (p + 1)
    int64_t t = 1000;
    for (int p = 1; p < ranks; ++p) t += p + 1;
    return t;
  };
  const std::string what = "ring token";
  int64_t token = 1000;
  if (rank == 0) {
    comm.send(&token, 1, DType::i64, 1, 5);
    comm.recv(&token, 1, DType::i64, size - 1, 5);
    expect_values(what, comm, std::vector<int64_t>{token}, {token_after(size)});
  } else {
    comm.recv(&token, 1, DType::i64, rank - 1, 5);
    expect_values(what, comm, std::vector<int64_t>{token}, {token_after(rank)});
    token += rank + 1;
    comm.send(&token, 1, DType::i64, (rank + 1) % size, 5);
  }
  const std::vector<P2pMessage> messages = {{3, 1}, {1000, 2}, {17, 1}, {1, 9}};
  shift_case<float>(comm, 1, messages, 6000);
  shift_case<int64_t>(comm, 1, messages, 6100);
  shift_case<double>(comm, -1, messages, 6200);
  shift_case<int32_t>(comm, -1, {{100'000, 3}}, 6300);
}

// Barriers between collectives leave the sequence of collectives intact.
inline void check_barrier(Communicator& comm) {
  for (int round = 0; round < 5; ++round) {
    comm.barrier();
    comm.barrier();
    int64_t x = comm.rank() + round;
    comm.all_reduce(&x, 1, DType::i64, ReduceOp::sum);
    const int64_t size = comm.size();
    expect_values(fmt::format("sum after barriers (round {})", round), comm,
                  std::vector<int64_t>{x}, {size * (size - 1) / 2 + size * round});
  }
}

// `steps` collectives and point-to-point shifts in a pseudo-random order, with random dtypes,
// ops, counts (0..64) and roots -- the same draws on every rank.
inline void check_mixed_sequence(Communicator& comm, int steps = 200, uint64_t seed = 97) {
  Rng plan(seed, 1u << 20);
  const AllToAllPattern patterns[] = {AllToAllPattern::uneven, AllToAllPattern::silent_ranks};
  for (int step = 0; step < steps; ++step) {
    const uint64_t kind = plan.next_below(7);
    const DType dtype = kCommDtypes[plan.next_below(4)];
    const ReduceOp op = kReduceOps[plan.next_below(2)];
    const auto count = static_cast<int64_t>(plan.next_below(65));
    const auto root = static_cast<int>(plan.next_below(static_cast<uint64_t>(comm.size())));
    const uint64_t case_seed = seed * 100'003 + static_cast<uint64_t>(step);
    with_comm_dtype(dtype, [&](auto zero) {
      using T = decltype(zero);
      switch (kind) {
        case 0:
          return all_reduce_case<T>(comm, op, count, case_seed);
        case 1:
          return all_gather_case<T>(comm, count, case_seed);
        case 2:
          return reduce_scatter_case<T>(comm, op, count, case_seed);
        case 3:
          return broadcast_case<T>(comm, root, count, case_seed);
        case 4:
          return all_to_all_case<T>(comm, patterns[step % 2], case_seed);
        case 5:
          return comm.barrier();
        default:
          return shift_case<T>(comm, count % 2 == 0 ? 1 : -1, {{count + 1, step}}, case_seed);
      }
    });
  }
}

// Every check above, in order.
inline void check_all(Communicator& comm) {
  check_all_reduce(comm);
  check_all_gather(comm);
  check_reduce_scatter(comm);
  check_broadcast(comm);
  check_all_to_all(comm);
  check_send_recv(comm);
  check_barrier(comm);
  check_mixed_sequence(comm);
}

}  // namespace fm::testing
