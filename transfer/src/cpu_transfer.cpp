#include "transfer/cpu_transfer.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "engine/collectives.h"
#include "engine/dtype.h"
#include "engine/error.h"

namespace fm {

namespace {

using Clock = std::chrono::steady_clock;

char* row_ptr(Tensor& t, int64_t row, size_t row_bytes) {
  return static_cast<char*>(t.raw()) + static_cast<size_t>(row) * row_bytes;
}

// n elements from src (dtype `from`) into dst (dtype `to`): a copy, or f32 rounded to bf16.
void copy_elements(void* dst, DType to, const void* src, DType from, int64_t n) {
  if (to == from) {
    std::memcpy(dst, src, static_cast<size_t>(n) * dtype_size(to));
    return;
  }
  FM_CHECK(from == DType::f32 && to == DType::bf16, "cpu transfer: no conversion from {} to {}",
           dtype_name(from), dtype_name(to));
  f32_to_bf16_n(static_cast<uint16_t*>(dst), static_cast<const float*>(src), n);
}

// dst[i] += src[i], i in [0, n), in index order.
void add_into(void* dst, const void* src, int64_t n, DType dtype) {
  if (dtype == DType::f32) {
    auto* d = static_cast<float*>(dst);
    const auto* s = static_cast<const float*>(src);
    for (int64_t i = 0; i < n; ++i) d[i] += s[i];
  } else {
    auto* d = static_cast<double*>(dst);
    const auto* s = static_cast<const double*>(src);
    for (int64_t i = 0; i < n; ++i) d[i] += s[i];
  }
}

const char* state_name(int state) {
  static const char* names[] = {"empty", "loading", "ready"};
  return names[state];
}

}  // namespace

int64_t ExpertLayout::bytes() const {
  int64_t n = 0;
  for (const Shape& p : parts) n += shape_numel(p);
  return n * static_cast<int64_t>(dtype_size(slot_dtype()));
}

CpuTransferGroup::CpuTransferGroup(CpuTransferConfig config) : config_(std::move(config)) {
  const CpuTransferConfig& c = config_;
  auto bad = [](const std::string& m) { throw std::invalid_argument("cpu transfer: " + m); };
  if (c.world_size < 1) bad(fmt::format("world_size must be >= 1 (got {})", c.world_size));
  if (c.n_experts < 1 || c.n_experts % c.world_size != 0)
    bad(fmt::format("n_experts ({}) must be a positive multiple of world_size ({})", c.n_experts,
                    c.world_size));
  if (c.n_layers < 1) bad(fmt::format("n_layers must be >= 1 (got {})", c.n_layers));
  if (c.slots_per_rank < 0)
    bad(fmt::format("slots_per_rank must be >= 0 (got {})", c.slots_per_rank));
  if (c.expert.parts.empty()) bad("the expert layout has no parts");
  for (size_t p = 0; p < c.expert.parts.size(); ++p)
    for (int64_t d : c.expert.parts[p])
      if (d < 1)
        bad(fmt::format("expert part {} has shape {} (every dimension must be >= 1)", p,
                        shape_str(c.expert.parts[p])));
  if (c.expert.dtype != DType::f32 && c.expert.dtype != DType::f64)
    bad(fmt::format("expert dtype {} is not supported (f32 or f64)", dtype_name(c.expert.dtype)));
  if (c.expert.bf16_slots && c.expert.dtype != DType::f32)
    bad(fmt::format("bf16 slots need f32 experts (the expert dtype is {})",
                    dtype_name(c.expert.dtype)));
  if (c.timeout.count() <= 0)
    bad(fmt::format("timeout must be > 0 ms (got {})", c.timeout.count()));
  c.links.validate(c.world_size);

  ranks_.resize(c.world_size);
  const int32_t nodes = c.world_size / c.links.ranks_per_node;
  mirrors_.assign(nodes, ExpertTensors(c.n_layers));
  for (auto& node : mirrors_)
    for (auto& layer : node)
      for (const Shape& part : c.expert.parts) {
        Shape shape{c.n_experts};
        shape.insert(shape.end(), part.begin(), part.end());
        layer.push_back(Tensor::zeros(shape, c.expert.slot_dtype()));
      }
}

CpuTransferEngine::CpuTransferEngine(CpuTransferGroup& group, Communicator& comm,
                                     ExpertTensors home_weights, ExpertTensors home_grads,
                                     MoveHook hook)
    : group_(group),
      comm_(comm),
      config_(group.config()),
      rank_(comm.rank()),
      hook_(std::move(hook)) {
  const CpuTransferConfig& c = config_;
  FM_CHECK(comm.size() == c.world_size,
           "cpu transfer: the communicator has {} ranks, the transfer group {}", comm.size(),
           c.world_size);
  const int64_t El = c.n_experts / c.world_size, S = c.slots_per_rank;
  auto check = [&](const ExpertTensors& t, const char* what) {
    FM_CHECK(static_cast<int32_t>(t.size()) == c.n_layers,
             "cpu transfer: rank {} registered {} for {} layers, expected {}", rank_, what,
             t.size(), c.n_layers);
    for (int32_t l = 0; l < c.n_layers; ++l) {
      FM_CHECK(t[l].size() == c.expert.parts.size(),
               "cpu transfer: rank {} registered {} of layer {} with {} parts, expected {}", rank_,
               what, l, t[l].size(), c.expert.parts.size());
      for (size_t p = 0; p < t[l].size(); ++p) {
        Shape want{El};
        want.insert(want.end(), c.expert.parts[p].begin(), c.expert.parts[p].end());
        const Tensor& x = t[l][p];
        FM_CHECK(x.defined() && x.is_cpu() && x.dtype() == c.expert.dtype && x.shape() == want,
                 "cpu transfer: rank {} registered {} of layer {} part {} as {}, expected {}{} on "
                 "cpu",
                 rank_, what, l, p, x.defined() ? x.describe() : std::string("an undefined tensor"),
                 dtype_name(c.expert.dtype), shape_str(want));
      }
    }
  };
  // Every rank fails together (naming the first bad rank) rather than leaving its peers
  // waiting in the registration barrier.
  std::string error;
  try {
    check(home_weights, "home weights");
    check(home_grads, "home gradients");
  } catch (const Error& e) {
    error = e.what();
  }
  const int bad_rank = first_rank_with(&comm, !error.empty());
  if (!error.empty()) throw Error(error);
  FM_CHECK(bad_rank < 0, "cpu transfer: rank {} could not register its experts (see its error)",
           bad_rank);

  CpuTransferGroup::RankBuffers mine;
  mine.registered = true;
  mine.home_weights = std::move(home_weights);
  mine.home_grads = std::move(home_grads);
  for (auto [set, dtype] :
       {std::pair{&mine.slot_weights, c.expert.slot_dtype()}, {&mine.slot_grads, c.expert.dtype}}) {
    set->resize(c.n_layers);
    for (auto& layer : *set)
      for (const Shape& part : c.expert.parts) {
        Shape shape{S};
        shape.insert(shape.end(), part.begin(), part.end());
        layer.push_back(Tensor::zeros(shape, dtype));
      }
  }
  {
    std::lock_guard<std::mutex> lock(group_.mutex_);
    FM_CHECK(!group_.ranks_[rank_].registered,
             "cpu transfer: rank {} is already registered in this transfer group", rank_);
    group_.ranks_[rank_] = std::move(mine);
  }
  layers_.resize(c.n_layers);
  for (Layer& l : layers_) {
    l.plan.assign(c.world_size, std::vector<int32_t>(S, -1));
    l.resident = l.plan;
  }
  comm_.barrier();  // every rank registered
  write_mirrors();
  comm_.barrier();  // every mirror complete
  if (c.worker_thread) worker_ = std::thread([this] { worker_loop(); });
}

CpuTransferEngine::~CpuTransferEngine() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  cv_.notify_all();
  if (worker_.joinable()) worker_.join();
}

void CpuTransferEngine::check_layer(int32_t layer, const char* call) const {
  FM_CHECK(layer >= 0 && layer < config_.n_layers,
           "cpu transfer: {}(layer {}) on rank {}: layer out of range [0, {})", call, layer, rank_,
           config_.n_layers);
}

void CpuTransferEngine::prefetch(int64_t micro_step, int32_t layer, const LayerPlacement& plan) {
  check_layer(layer, "prefetch");
  const CpuTransferConfig& c = config_;
  const std::string where = fmt::format(
      "cpu transfer: prefetch(micro-step {}, layer {}) on rank {}", micro_step, layer, rank_);
  FM_CHECK(!updating_,
           "{}: called between drain() and refresh_mirror(), while home weights may change", where);
  Layer& L = layers_[layer];
  FM_CHECK(L.state == SlotState::empty,
           "{}: the layer's slots still hold micro-step {} ({}); release the layer first", where,
           L.micro_step, state_name(static_cast<int>(L.state)));
  FM_CHECK(plan.world_size == c.world_size && plan.n_experts == c.n_experts &&
               plan.replica_slots == c.slots_per_rank,
           "{}: the plan is for {} ranks, {} experts and {} slots per rank; the engine has {}, {} "
           "and {}",
           where, plan.world_size, plan.n_experts, plan.replica_slots, c.world_size, c.n_experts,
           c.slots_per_rank);
  FM_CHECK(static_cast<int32_t>(plan.slots.size()) == c.world_size,
           "{}: the plan has slot tables for {} ranks, expected {}", where, plan.slots.size(),
           c.world_size);
  for (int32_t r = 0; r < c.world_size; ++r) {
    FM_CHECK(static_cast<int32_t>(plan.slots[r].size()) == c.slots_per_rank,
             "{}: the plan gives rank {} {} slots, the engine has {}", where, r,
             plan.slots[r].size(), c.slots_per_rank);
    for (int32_t s = 0; s < c.slots_per_rank; ++s)
      FM_CHECK(plan.slots[r][s] >= -1 && plan.slots[r][s] < c.n_experts,
               "{}: the plan puts expert {} in rank {} slot {}, not in [-1, {})", where,
               plan.slots[r][s], r, s, c.n_experts);
  }

  // Every rank computes the same moves and paths for all ranks; it runs its own.
  const int64_t bytes = c.expert.bytes();
  int64_t reused_all = 0;
  const std::vector<Move> moves =
      slot_moves(plan.slots, c.n_experts, bytes, &L.resident, &reused_all);
  PathLoad load(c.links, c.world_size);
  Job job{layer, micro_step, {}};
  double makespan = 0;
  for (const Move& m : moves) {
    const PathChoice choice = load.assign(m, 0.0, c.policy);
    makespan = std::max(makespan, choice.finish);
    if (m.dst != rank_) continue;
    job.moves.emplace_back(m, choice.path);
    (choice.path == TransferPath::direct ? stats_.bytes_direct : stats_.bytes_cpu) += m.bytes;
    ++(choice.path == TransferPath::direct ? stats_.moves_direct : stats_.moves_cpu);
  }
  for (int32_t s = 0; s < c.slots_per_rank; ++s)
    if (plan.slots[rank_][s] >= 0 && plan.slots[rank_][s] == L.resident[rank_][s])
      ++stats_.slots_reused;
  stats_.modeled_transfer_s += makespan;
  L.plan = plan.slots;
  L.resident = plan.slots;
  L.micro_step = micro_step;
  L.state = SlotState::loading;

  uint64_t ticket = 0;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    ticket = ++submitted_;
    if (c.worker_thread) queue_.emplace_back(ticket, std::move(job));
  }
  L.ticket = ticket;
  if (c.worker_thread) {
    cv_.notify_all();
    return;
  }
  std::string error;
  try {
    run_job(job);
  } catch (const std::exception& e) {
    error = e.what();
  }
  std::lock_guard<std::mutex> lock(mutex_);
  if (!error.empty()) errors_.emplace_back(ticket, error);
  completed_ = ticket;
}

void CpuTransferEngine::run_job(const Job& job) {
  const CpuTransferConfig& c = config_;
  const int64_t El = c.n_experts / c.world_size;
  const int32_t node = c.links.node_of(rank_);
  CpuTransferGroup::RankBuffers& mine = group_.ranks_[rank_];
  // Fresh gradients for the micro-step (the backward accumulates into them).
  for (Tensor& g : mine.slot_grads[job.layer]) std::memset(g.raw(), 0, g.nbytes());
  const DType home = c.expert.dtype, slot = c.expert.slot_dtype();
  for (const auto& [m, path] : job.moves) {
    if (hook_) hook_(m, path);
    for (size_t p = 0; p < c.expert.parts.size(); ++p) {
      const int64_t n = c.expert.part_numel(p);
      const size_t home_row = static_cast<size_t>(n) * dtype_size(home),
                   slot_row = static_cast<size_t>(n) * dtype_size(slot);
      char* dst = row_ptr(mine.slot_weights[job.layer][p], m.slot, slot_row);
      if (path == TransferPath::direct)
        copy_elements(dst, slot,
                      row_ptr(group_.ranks_[m.src].home_weights[job.layer][p],
                              m.expert - m.src * El, home_row),
                      home, n);
      else  // the mirror holds the slot dtype already
        std::memcpy(dst, row_ptr(group_.mirrors_[node][job.layer][p], m.expert, slot_row),
                    slot_row);
    }
  }
}

void CpuTransferEngine::worker_loop() {
  for (;;) {
    std::pair<uint64_t, Job> item;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (stop_) return;
      item = std::move(queue_.front());
      queue_.pop_front();
    }
    std::string error;
    try {
      run_job(item.second);
    } catch (const std::exception& e) {
      error = e.what();
    } catch (...) {
      error = "unknown exception";
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!error.empty()) errors_.emplace_back(item.first, error);
      completed_ = item.first;
    }
    cv_.notify_all();
  }
}

bool CpuTransferEngine::wait_done(uint64_t ticket) {
  std::unique_lock<std::mutex> lock(mutex_);
  const uint64_t target = ticket == 0 ? submitted_ : ticket;
  return cv_.wait_for(lock, config_.timeout, [&] { return completed_ >= target; });
}

void CpuTransferEngine::wait(int32_t layer) {
  check_layer(layer, "wait");
  Layer& L = layers_[layer];
  FM_CHECK(L.state != SlotState::empty,
           "cpu transfer: wait(layer {}) on rank {} without a prefetch of that layer (or after "
           "its release)",
           layer, rank_);
  if (L.state == SlotState::ready) return;
  const auto t0 = Clock::now();
  const bool done = wait_done(L.ticket);
  stats_.wait_s += std::chrono::duration<double>(Clock::now() - t0).count();
  FM_CHECK(done,
           "cpu transfer: wait(layer {}) on rank {} timed out after {} ms: the moves of "
           "micro-step {} have not finished",
           layer, rank_, config_.timeout.count(), L.micro_step);
  std::string error;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = std::find_if(errors_.begin(), errors_.end(),
                           [&](const auto& e) { return e.first == L.ticket; });
    if (it != errors_.end()) {
      error = it->second;
      errors_.erase(it);
    }
  }
  if (!error.empty()) {
    // The slots' contents are unknown now: nothing is resident, the layer is free again.
    L.state = SlotState::empty;
    std::fill(L.resident[rank_].begin(), L.resident[rank_].end(), -1);
    throw Error(fmt::format(
        "cpu transfer: the moves of layer {} (micro-step {}) failed on rank {}'s worker: {}", layer,
        L.micro_step, rank_, error));
  }
  L.state = SlotState::ready;
}

void CpuTransferEngine::release(int32_t layer) {
  check_layer(layer, "release");
  Layer& L = layers_[layer];
  FM_CHECK(L.state != SlotState::empty,
           "cpu transfer: release(layer {}) on rank {} without a prefetch of that layer", layer,
           rank_);
  if (L.state == SlotState::loading) wait(layer);  // the worker must not write into freed slots
  L.state = SlotState::empty;
}

void CpuTransferEngine::return_gradients(int32_t layer) {
  check_layer(layer, "return_gradients");
  Layer& L = layers_[layer];
  FM_CHECK(L.state != SlotState::empty,
           "cpu transfer: return_gradients(layer {}) on rank {}: the layer holds no prefetched "
           "slots (prefetch and wait first, and return gradients before release)",
           layer, rank_);
  if (L.state == SlotState::loading) wait(layer);
  const CpuTransferConfig& c = config_;
  const int64_t El = c.n_experts / c.world_size;
  comm_.barrier();  // every rank's backward of this layer is done
  CpuTransferGroup::RankBuffers& mine = group_.ranks_[rank_];
  for (int32_t q = 0; q < c.world_size; ++q)
    for (int32_t s = 0; s < c.slots_per_rank; ++s) {
      const int32_t e = L.plan[q][s];
      if (e < 0 || e / El != rank_) continue;
      for (size_t p = 0; p < c.expert.parts.size(); ++p) {
        const int64_t n = c.expert.part_numel(p);
        const size_t row = static_cast<size_t>(n) * dtype_size(c.expert.dtype);
        add_into(row_ptr(mine.home_grads[layer][p], e - rank_ * El, row),
                 row_ptr(group_.ranks_[q].slot_grads[layer][p], s, row), n, c.expert.dtype);
        stats_.grad_bytes_returned += static_cast<int64_t>(row);
      }
    }
  comm_.barrier();  // every home rank has read the slots
  for (Tensor& g : mine.slot_grads[layer]) std::memset(g.raw(), 0, g.nbytes());
}

void CpuTransferEngine::drain() {
  for (int32_t l = 0; l < config_.n_layers; ++l)
    FM_CHECK(layers_[l].state == SlotState::empty,
             "cpu transfer: drain() on rank {}: layer {} still holds the slots of micro-step {}; "
             "release every layer before the optimizer step",
             rank_, l, layers_[l].micro_step);
  FM_CHECK(wait_done(0), "cpu transfer: drain() on rank {} timed out after {} ms waiting for moves",
           rank_, config_.timeout.count());
  comm_.barrier();  // no rank reads home weights or mirrors any more
  updating_ = true;
}

void CpuTransferEngine::refresh_mirror() {
  if (!updating_) drain();
  write_mirrors();
  comm_.barrier();  // every mirror holds the new weights
  updating_ = false;
  // The slots hold the old weights: nothing is resident any more.
  for (Layer& L : layers_)
    for (auto& r : L.resident) std::fill(r.begin(), r.end(), -1);
}

void CpuTransferEngine::write_mirrors() {
  const CpuTransferConfig& c = config_;
  const int64_t El = c.n_experts / c.world_size;
  const CpuTransferGroup::RankBuffers& mine = group_.ranks_[rank_];
  const DType slot = c.expert.slot_dtype();
  for (ExpertTensors& mirror : group_.mirrors_)
    for (int32_t l = 0; l < c.n_layers; ++l)
      for (size_t p = 0; p < c.expert.parts.size(); ++p) {
        const int64_t n = c.expert.part_numel(p);
        copy_elements(row_ptr(mirror[l][p], rank_ * El, static_cast<size_t>(n) * dtype_size(slot)),
                      slot, mine.home_weights[l][p].raw(), c.expert.dtype, n * El);
      }
}

const std::vector<Tensor>& CpuTransferEngine::slot_weights(int32_t layer) {
  check_layer(layer, "slot_weights");
  return group_.ranks_[rank_].slot_weights[layer];
}

std::vector<Tensor>& CpuTransferEngine::slot_grads(int32_t layer) {
  check_layer(layer, "slot_grads");
  return group_.ranks_[rank_].slot_grads[layer];
}

const std::vector<int32_t>& CpuTransferEngine::slot_experts(int32_t layer) const {
  check_layer(layer, "slot_experts");
  return layers_[layer].plan[rank_];
}

}  // namespace fm
