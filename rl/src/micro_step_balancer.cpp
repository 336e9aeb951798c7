#include "rl/micro_step_balancer.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>

#include "balancer/plan_metrics.h"
#include "engine/collectives.h"
#include "engine/comm.h"
#include "engine/error.h"
#include "model/replica_slots.h"
#include "transfer/cpu_transfer.h"

namespace fm {

// ReplicaWeights over a TransferEngine: the MoE layer's first read of a layer's slots waits for
// that layer's moves only, so the moves of later layers overlap the compute of earlier ones.
class TransferReplicaWeights final : public ReplicaWeights {
 public:
  explicit TransferReplicaWeights(TransferEngine& engine) : engine_(engine) {
    for (int32_t l = 0; l < engine.n_layers(); ++l) {
      const std::vector<Tensor>& w = engine.slot_weights(l);
      std::vector<Tensor>& g = engine.slot_grads(l);
      weights_.push_back({w[0], w[1], w[2]});
      grads_.push_back({g[0], g[1], g[2]});
    }
  }
  int64_t slots_per_rank() const override { return engine_.slots_per_rank(); }
  const FfnWeights& slot_weights(int64_t moe_layer) override {
    engine_.wait(static_cast<int32_t>(moe_layer));
    return weights_.at(static_cast<size_t>(moe_layer));
  }
  FfnWeights& slot_grads(int64_t moe_layer) override {
    return grads_.at(static_cast<size_t>(moe_layer));
  }

 private:
  TransferEngine& engine_;
  std::vector<FfnWeights> weights_, grads_;
};

namespace {

using Clock = std::chrono::steady_clock;

bool moves_tokens(const BalancerConfig& c, int world) {
  return world > 1 && c.planner != "none";
}

// This rank's expert counts of one micro-batch: [layer * E + expert].
std::vector<int64_t> expert_counts(const RoutingTrace& routes, int64_t layers, int64_t experts) {
  std::vector<int64_t> counts(static_cast<size_t>(layers * experts), 0);
  FM_CHECK(routes.tokens() == 0 || (routes.n_moe_layers == layers && routes.n_experts == experts),
           "balancer: a micro-batch's routing has {} MoE layers x {} experts, the model {} x {}",
           routes.n_moe_layers, routes.n_experts, layers, experts);
  for (int64_t t = 0; t < routes.tokens(); ++t)
    for (int64_t l = 0; l < layers; ++l)
      for (int64_t k = 0; k < routes.top_k; ++k) ++counts[l * experts + routes.at(t, l, k)];
  return counts;
}

// max / mean of the rank loads with every token at its expert's home.
double home_imbalance(const LoadMatrix& load, int world) {
  const int64_t per_rank = static_cast<int64_t>(load.size()) / world;
  std::vector<int64_t> rank_load(world, 0);
  int64_t total = 0;
  for (size_t e = 0; e < load.size(); ++e)
    for (int64_t c : load[e]) {
      rank_load[static_cast<int64_t>(e) / per_rank] += c;
      total += c;
    }
  if (total == 0) return 1.0;
  const int64_t max = *std::max_element(rank_load.begin(), rank_load.end());
  return static_cast<double>(max) * world / static_cast<double>(total);
}

}  // namespace

std::unique_ptr<CpuTransferGroup> make_cpu_transfer_group(const BalancerConfig& config,
                                                          const ModelConfig& model, DType dtype,
                                                          DType compute_dtype, int world) {
  if (!moves_tokens(config, world) || config.replica_slots == 0) return nullptr;
  CpuTransferConfig c;
  c.world_size = world;
  c.n_experts = static_cast<int32_t>(model.n_experts);
  c.n_layers = static_cast<int32_t>(model.n_moe_layers());
  c.slots_per_rank = static_cast<int32_t>(config.replica_slots);
  c.expert.parts = {
      {model.moe_ffn, model.hidden}, {model.moe_ffn, model.hidden}, {model.hidden, model.moe_ffn}};
  c.expert.dtype = dtype;
  c.expert.bf16_slots = compute_dtype == DType::bf16;
  c.links.ranks_per_node = static_cast<int32_t>(world / config.nodes);
  c.policy = config.transfer;
  return std::make_unique<CpuTransferGroup>(c);
}

MicroStepBalancer::MicroStepBalancer(const BalancerConfig& config, MoeTransformer& model,
                                     Communicator* comm, CpuTransferGroup* group)
    : config_(config), model_(model), comm_(comm) {
  world_ = comm ? comm->size() : 1;
  rank_ = comm ? comm->rank() : 0;
  const ModelConfig& mc = model.config();
  layers_ = mc.n_moe_layers();
  experts_ = mc.n_experts;
  FM_CHECK(config.nodes >= 1 && world_ % config.nodes == 0,
           "balancer.nodes {} must divide the {} ranks", config.nodes, world_);
  topology_ =
      Topology{static_cast<int32_t>(config.nodes), static_cast<int32_t>(world_ / config.nodes)};
  if (!moves_tokens(config, world_) || layers_ == 0) return;
  PlannerConfig pc;
  pc.name = config.planner;
  pc.topology = topology_;
  pc.n_experts = static_cast<int32_t>(experts_);
  pc.n_moe_layers = static_cast<int32_t>(layers_);
  pc.replica_slots = static_cast<int32_t>(config.replica_slots);
  pc.ema_decay = config.ema_decay;
  planner_ = make_planner(pc);
  if (config.replica_slots == 0) return;
  if (group != nullptr) {
    const int64_t first = mc.first_k_dense;
    ExpertTensors weights, grads;
    for (int64_t l = 0; l < layers_; ++l) {
      FfnWeights& w = model.params().weights().layers[first + l].experts;
      FfnWeights& g = model.grads().weights().layers[first + l].experts;
      weights.push_back({w.w_gate, w.w_up, w.w_down});
      grads.push_back({g.w_gate, g.w_up, g.w_down});
    }
    engine_ = std::make_unique<CpuTransferEngine>(*group, *comm, weights, grads);
    engine_slots_ = std::make_unique<TransferReplicaWeights>(*engine_);
    model.set_replica_weights(engine_slots_.get());
  } else {
    comm_slots_ = std::make_unique<CommReplicaSlots>(model, config.replica_slots);
    model.set_replica_weights(comm_slots_.get());
  }
}

MicroStepBalancer::~MicroStepBalancer() {
  if (next_.valid()) next_.wait();
  if (engine_slots_ || comm_slots_) model_.set_replica_weights(nullptr);
}

void MicroStepBalancer::begin_step(const std::vector<const RoutingTrace*>& routes) {
  if (!planner_) return;
  std::vector<int64_t> total(static_cast<size_t>(layers_ * experts_), 0);
  for (const RoutingTrace* r : routes) {
    const std::vector<int64_t> c = expert_counts(*r, layers_, experts_);
    for (size_t i = 0; i < c.size(); ++i) total[i] += c[i];
  }
  std::vector<double> global(total.begin(), total.end());  // exact below 2^53
  sum_over_ranks(comm_, global);
  std::vector<std::vector<int64_t>> step_load(static_cast<size_t>(layers_));
  for (int64_t l = 0; l < layers_; ++l)
    for (int64_t e = 0; e < experts_; ++e)
      step_load[l].push_back(static_cast<int64_t>(global[l * experts_ + e]));
  planner_->forget_previous();  // plans depend on this step only: resume-exact
  planner_->begin_step(step_load);
  if (engine_) {  // the weights may have changed since the mirrors were written
    engine_->drain();
    engine_->refresh_mirror();
  }
}

void MicroStepBalancer::begin_stage(const std::vector<const RoutingTrace*>& routes,
                                    StageBalance* out) {
  FM_CHECK(!next_.valid(), "balancer: begin_stage while the previous stage is being planned");
  out_ = out;
  if (out_ != nullptr) out_->planner = config_.planner;
  stage_direct_ = stage_cpu_ = 0;
  const int64_t K = static_cast<int64_t>(routes.size());
  const int64_t agreed = max_over_ranks(comm_, K);
  FM_CHECK(agreed == K, "balancer: rank {} has {} micro-batches in this stage, another rank {}",
           rank_, K, agreed);
  // counts_[k][r]: rank r's expert counts of micro-batch k, gathered with one all-gather.
  const int64_t per = layers_ * experts_;
  std::vector<int64_t> mine;
  mine.reserve(static_cast<size_t>(K * per));
  for (const RoutingTrace* r : routes) {
    const std::vector<int64_t> c = expert_counts(*r, layers_, experts_);
    mine.insert(mine.end(), c.begin(), c.end());
  }
  std::vector<int64_t> all(static_cast<size_t>(K * per * world_));
  if (comm_ != nullptr && world_ > 1)
    comm_->all_gather(mine.data(), all.data(), K * per, DType::i64);
  else
    all = mine;
  counts_.assign(static_cast<size_t>(K), std::vector<std::vector<int64_t>>(world_));
  for (int64_t k = 0; k < K; ++k)
    for (int r = 0; r < world_; ++r)
      counts_[k][r].assign(all.begin() + (r * K + k) * per, all.begin() + (r * K + k + 1) * per);
  next_k_ = 0;
  if (K > 0) next_ = std::async(std::launch::async, [this] { return plan_micro_step(0); });
}

LoadMatrix MicroStepBalancer::load_of(size_t k, int64_t layer) const {
  LoadMatrix load(static_cast<size_t>(experts_), std::vector<int64_t>(world_, 0));
  for (int64_t e = 0; e < experts_; ++e)
    for (int r = 0; r < world_; ++r) load[e][r] = counts_[k][r][layer * experts_ + e];
  return load;
}

MicroStepBalancer::MicroPlan MicroStepBalancer::plan_micro_step(size_t k) {
  MicroPlan p;
  for (int64_t l = 0; l < layers_; ++l) {
    const LoadMatrix load = load_of(k, l);
    const double before = home_imbalance(load, world_);
    p.before += before;
    if (!planner_) {
      p.after += before;
      p.ratio += 1.0;
      continue;
    }
    const auto t0 = Clock::now();
    p.plans.push_back(planner_->plan(static_cast<int32_t>(l), load));
    p.seconds += std::chrono::duration<double>(Clock::now() - t0).count();
    const PlanMetrics m = plan_metrics(p.plans.back(), load, topology_, nullptr, 0);
    p.after += m.max_over_mean;
    p.ratio += m.ratio_to_bound;
  }
  return p;
}

const std::vector<LayerPlacement>* MicroStepBalancer::before_forward(size_t micro) {
  FM_CHECK(next_.valid() && next_k_ == micro,
           "balancer: before_forward({}) out of order (micro-step {} is planned next)", micro,
           next_k_);
  current_ = next_.get();
  if (micro + 1 < counts_.size()) {
    next_k_ = micro + 1;
    next_ = std::async(std::launch::async, [this, micro] { return plan_micro_step(micro + 1); });
  }
  if (out_ != nullptr && layers_ > 0) {
    out_->plans += layers_;
    out_->before += current_.before;
    out_->after += current_.after;
    out_->ratio_to_bound += current_.ratio;
    out_->planner_s += current_.seconds;
    out_->micro_before.push_back(current_.before / static_cast<double>(layers_));
    out_->micro_after.push_back(current_.after / static_cast<double>(layers_));
  }
  if (!planner_) return nullptr;
  const int64_t id = micro_steps_done_++;
  if (engine_) {
    for (int64_t l = 0; l < layers_; ++l)
      engine_->prefetch(id, static_cast<int32_t>(l), current_.plans[l]);
    const TransferStats& s = engine_->stats();
    stage_direct_ += s.bytes_direct - direct_seen_;
    stage_cpu_ += s.bytes_cpu - cpu_seen_;
    direct_seen_ = s.bytes_direct;
    cpu_seen_ = s.bytes_cpu;
  } else if (comm_slots_) {
    comm_slots_->load(current_.plans);
    const int64_t expert_bytes =  // the slots' weights have the compute dtype
        3 * model_.config().moe_ffn * model_.config().hidden *
        static_cast<int64_t>(dtype_size(model_.compute_dtype()));
    for (const LayerPlacement& p : current_.plans)
      for (int64_t s = 0; s < config_.replica_slots; ++s)
        if (p.slots[rank_][s] >= 0 && p.home_rank(p.slots[rank_][s]) != rank_)
          stage_direct_ += expert_bytes;
  }
  return &current_.plans;
}

void MicroStepBalancer::after_forward(size_t /*micro*/) {
  if (engine_)
    for (int64_t l = 0; l < layers_; ++l) engine_->release(static_cast<int32_t>(l));
}

void MicroStepBalancer::after_backward(size_t /*micro*/) {
  if (engine_) {
    for (int64_t l = 0; l < layers_; ++l) {
      engine_->return_gradients(static_cast<int32_t>(l));
      engine_->release(static_cast<int32_t>(l));
    }
  } else if (comm_slots_) {
    comm_slots_->reduce_grads();
  }
}

void MicroStepBalancer::before_optimizer_step() {
  if (engine_) engine_->drain();
}

void MicroStepBalancer::after_optimizer_step() {
  if (engine_) engine_->refresh_mirror();
}

void MicroStepBalancer::end_stage() {
  if (next_.valid()) next_.wait();  // a stage cut short: let the planning thread finish
  next_ = {};
  const int64_t direct = sum_over_ranks(comm_, stage_direct_);
  const int64_t cpu = sum_over_ranks(comm_, stage_cpu_);
  if (out_ != nullptr) {
    out_->bytes_direct += direct;
    out_->bytes_cpu += cpu;
  }
  out_ = nullptr;
}

}  // namespace fm
