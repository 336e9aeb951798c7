// The RL loop on W in-process ranks (expert-parallel policy, reference and critic): the
// same seed gives the single-rank run's samples and, up to the float rounding of the
// expert-parallel layer, its metrics and weights, for GRPO and PPO; token-budget
// micro-batches agree in count over the ranks; the same W repeats exactly; configs that
// cannot split evenly are refused naming the key.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <memory>
#include <string>
#include <utility>

#include "engine/comm.h"
#include "engine/error.h"
#include "model/checkpoint.h"
#include "model/expert_parallel.h"
#include "rl/rl_trainer.h"
#include "support/run_configs.h"
#include "transfer/cpu_transfer.h"

namespace fm {
namespace {

constexpr auto kTimeout = std::chrono::seconds(60);

std::string grpo_yaml(int64_t steps, const std::string& actor_extra = "") {
  return testing::count_rl_yaml(steps, "  adv_estimator: grpo\n",
                                "  use_kl_loss: true\n  kl_loss_coef: 0.01\n" + actor_extra);
}

// One mini-batch and one micro-batch per rank: every optimizer step and every micro-step
// sees the whole batch at any W, so W ranks compute the single-rank step (the router's
// balance loss is per micro-step). With several mini-batches each rank shuffles its own
// prompts (veRL's per-rank split), so the mini-batches differ with W.
std::string whole_batch(std::string yaml) {
  for (auto [from, to] : {std::pair{"ppo_mini_batch_size: 4", "ppo_mini_batch_size: 8"},
                          {"ppo_micro_batch_size: 16", "ppo_micro_batch_size: 64"}}) {
    const size_t at = yaml.find(from);
    EXPECT_NE(at, std::string::npos) << from;
    yaml.replace(at, std::string(from).size(), to);
  }
  return yaml;
}

// What a run leaves: rank 0's step metrics, every rank's samples' responses in global
// order, and each rank's policy (and critic) parameters.
struct RunResult {
  std::vector<RlStepMetrics> steps;
  std::vector<std::vector<int32_t>> responses;
  std::vector<std::vector<double>> policy, critic;  // [rank] flat arena
  TaskEvalResult eval;
};

// How the ranks fill replica slots: through the communicator (CommReplicaSlots), or through
// one CpuTransferGroup (as `foremoe train` does) whose slots have the compute dtype (bf16 under
// mixed precision) or stay f32 whatever the compute dtype.
enum class Slots { comm, transfer, transfer_f32 };

RunResult run(const RlRunConfig& cfg, int W, int64_t steps, Slots slots = Slots::comm) {
  RunResult out;
  const std::unique_ptr<CpuTransferGroup> transfer =
      slots == Slots::comm
          ? nullptr
          : make_cpu_transfer_group(
                cfg.balancer, cfg.model, DType::f32,
                slots == Slots::transfer ? cfg.trainer.compute_dtype() : DType::f32, W);
  out.policy.resize(static_cast<size_t>(W));
  out.critic.resize(static_cast<size_t>(W));
  std::vector<std::vector<std::vector<int32_t>>> responses(static_cast<size_t>(W));
  run_inprocess(W, kTimeout, [&](int rank, Communicator& comm) {
    auto backend = make_cpu_backend();
    RlTrainer t(cfg, *backend, &comm, transfer.get());
    for (int64_t s = 0; s < steps; ++s) {
      const RlStepMetrics m = t.step();
      if (rank == 0) out.steps.push_back(m);
    }
    for (const RolloutSample& r : t.last_rollout())
      responses[static_cast<size_t>(rank)].push_back(r.sequence.response);
    out.policy[static_cast<size_t>(rank)] = backend->download_f64(t.policy().params().flat());
    if (t.critic() != nullptr)
      out.critic[static_cast<size_t>(rank)] = backend->download_f64(t.critic()->params().flat());
    const TaskEvalResult e = t.evaluate();
    if (rank == 0) out.eval = e;
  });
  for (auto& r : responses) out.responses.insert(out.responses.end(), r.begin(), r.end());
  return out;
}

// Rank `rank`'s shard of a single-rank arena (flat, as downloaded).
std::vector<double> shard_of(const ModelConfig& c, const std::vector<double>& full, int W,
                             int rank) {
  auto backend = make_cpu_backend();
  ParamArena whole(c, *backend, DType::f32), part(c, *backend, DType::f32, W);
  backend->copy(whole.flat(),
                backend->upload(full, {static_cast<int64_t>(full.size())}, DType::f32));
  copy_param_shard(*backend, whole, part, rank);
  return backend->download_f64(part.flat());
}

double max_abs_diff(const std::vector<double>& a, const std::vector<double>& b) {
  EXPECT_EQ(a.size(), b.size());
  double d = 0;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) d = std::max(d, std::abs(a[i] - b[i]));
  return d;
}

void expect_close(double a, double b, double rel, const char* what, int64_t step) {
  EXPECT_LE(std::abs(a - b), rel * std::max(1.0, std::abs(b))) << what << " at step " << step;
}

// W ranks against one: identical samples (so identical rewards), close losses, norms and
// weights.
void expect_matches_single_rank(const RlRunConfig& cfg, int W, int64_t steps) {
  const RunResult one = run(cfg, 1, steps), many = run(cfg, W, steps);
  ASSERT_EQ(many.steps.size(), one.steps.size());
  EXPECT_EQ(many.responses, one.responses) << "W = " << W;
  for (size_t s = 0; s < one.steps.size(); ++s) {
    const RlStepMetrics &a = many.steps[s], &b = one.steps[s];
    EXPECT_EQ(a.reward_mean, b.reward_mean);
    EXPECT_EQ(a.response_length, b.response_length);
    EXPECT_EQ(a.expert_load, b.expert_load);
    for (auto [x, y, what] : {std::tuple{a.kl, b.kl, "kl"},
                              {a.entropy, b.entropy, "entropy"},
                              {a.pg_loss, b.pg_loss, "pg_loss"},
                              {a.ppo_kl, b.ppo_kl, "ppo_kl"},
                              {a.grad_norm, b.grad_norm, "grad_norm"},
                              {a.vf_loss, b.vf_loss, "vf_loss"},
                              {a.values_mean, b.values_mean, "values_mean"},
                              {a.critic_grad_norm, b.critic_grad_norm, "critic_grad_norm"}})
      expect_close(x, y, 1e-4, what, a.step);
    EXPECT_EQ(a.first_ratio_max_dev, 0.0);
    EXPECT_EQ(a.skipped, 0);
  }
  for (int r = 0; r < W; ++r) {
    EXPECT_LT(max_abs_diff(many.policy[r], shard_of(cfg.model, one.policy[0], W, r)), 2e-5)
        << "policy, rank " << r << " of " << W;
    if (cfg.has_critic) {
      EXPECT_LT(max_abs_diff(many.critic[r], shard_of(cfg.critic.model, one.critic[0], W, r)), 2e-5)
          << "critic, rank " << r << " of " << W;
    }
  }
  EXPECT_EQ(many.eval.examples, one.eval.examples);
  EXPECT_EQ(many.eval.accuracy, one.eval.accuracy);
}

TEST(DistributedRl, GrpoOnTwoAndFourRanksMatchesOneRank) {
  const RlRunConfig cfg = RlRunConfig::parse(whole_batch(grpo_yaml(3)), "<grpo>");
  expect_matches_single_rank(cfg, 2, 3);
  expect_matches_single_rank(cfg, 4, 3);
}

// Mixed precision (trainer.precision: bf16) on two expert-parallel ranks, with static
// placement and with the balancer's replica slots (filled by the transfer engine with the
// master weights rounded to bf16, as the home experts compute): recompute and update replay the
// same bf16 weights (first ratio exactly 1), and the replicated parameters stay identical on
// both ranks (their gradients are all-reduced in f32 and AdamW steps the f32 master
// weights). Replicas change no result: the first step's metrics agree within 1e-6 (they
// come out equal) and the weights after two steps within 1e-6 (7e-9 measured: the f32
// gradient sums in another order; slots computing in f32 instead of bf16 would be off by
// bf16 rounding steps). bf16 sampling at W = 2 may pick other tokens than at W = 1 (other
// GEMM row counts, other bf16 roundings), so W = 1 is not the reference here.
TEST(DistributedRl, Bf16MixedPrecisionRunsOnTwoRanksWithAndWithoutReplicas) {
  std::string yaml = whole_batch(grpo_yaml(2));
  yaml.replace(yaml.find("trainer:\n"), 9, "trainer:\n  precision: bf16\n");
  const RlRunConfig fixed_cfg = RlRunConfig::parse(yaml, "<grpo bf16>");
  RlRunConfig balanced_cfg = fixed_cfg;
  balanced_cfg.balancer.planner = "foresight";
  balanced_cfg.balancer.replica_slots = 2;
  const RunResult fixed = run(fixed_cfg, 2, 2), balanced = run(balanced_cfg, 2, 2, Slots::transfer);
  auto backend = make_cpu_backend();
  const auto replicated =
      static_cast<size_t>(ParamArena(fixed_cfg.model, *backend, DType::f32, 2).replicated_numel());
  ASSERT_GT(replicated, 0u);
  for (const RunResult* r : {&fixed, &balanced}) {
    const char* what = r == &fixed ? "static" : "replicas";
    ASSERT_EQ(r->steps.size(), 2u) << what;
    for (const RlStepMetrics& m : r->steps) {
      EXPECT_EQ(m.first_ratio_max_dev, 0.0) << what << " step " << m.step;
      EXPECT_EQ(m.skipped, 0) << what;
      EXPECT_TRUE(std::isfinite(m.pg_loss) && m.grad_norm > 0.0) << what;
    }
    ASSERT_EQ(r->policy[0].size(), r->policy[1].size());
    EXPECT_TRUE(
        std::equal(r->policy[0].begin(), r->policy[0].begin() + replicated, r->policy[1].begin()))
        << what << ": the ranks' replicated parameters differ";
  }
  int64_t moved = 0;  // bytes of expert weights moved into slots, every step and stage
  double before = 0, after = 0;
  for (const RlStepMetrics& m : balanced.steps)
    for (const auto& [stage, sb] : m.balance) {
      moved += sb.bytes_direct + sb.bytes_cpu;
      before += sb.before;
      after += sb.after;
    }
  EXPECT_GT(moved, 0) << "no expert weights reached a slot";
  EXPECT_LT(after, before) << "the replicas did not balance";
  const RlStepMetrics &a = balanced.steps[0], &b = fixed.steps[0];
  EXPECT_EQ(a.reward_mean, b.reward_mean);
  for (auto [x, y, name] : {std::tuple{a.pg_loss, b.pg_loss, "pg_loss"},
                            {a.kl, b.kl, "kl"},
                            {a.entropy, b.entropy, "entropy"},
                            {a.grad_norm, b.grad_norm, "grad_norm"}})
    expect_close(x, y, 1e-6, name, a.step);
  for (int r = 0; r < 2; ++r)
    EXPECT_LT(max_abs_diff(balanced.policy[r], fixed.policy[r]), 1e-6) << "rank " << r;
}

// Under bf16 compute the slots move bf16 (the master weights rounded once, on the home rank):
// half the bytes of f32 slots for exactly the same run, since f32 slots are rounded to the
// same bits before they compute. The communicator's slots (CommReplicaSlots, the GPU path)
// move bf16 too and give the same run as the transfer engine.
TEST(DistributedRl, Bf16SlotsMoveHalfTheBytesOfF32SlotsForTheSameRun) {
  std::string yaml = whole_batch(grpo_yaml(2));
  yaml.replace(yaml.find("trainer:\n"), 9, "trainer:\n  precision: bf16\n");
  RlRunConfig cfg = RlRunConfig::parse(yaml, "<grpo bf16>");
  cfg.balancer.planner = "foresight";
  cfg.balancer.replica_slots = 2;
  const RunResult bf16 = run(cfg, 2, 2, Slots::transfer), f32 = run(cfg, 2, 2, Slots::transfer_f32),
                  comm = run(cfg, 2, 2, Slots::comm);
  ASSERT_EQ(bf16.steps.size(), 2u);
  ASSERT_EQ(f32.steps.size(), 2u);
  ASSERT_EQ(comm.steps.size(), 2u);
  // Bytes into the transfer engine's slots (the policy's stages; the frozen reference always
  // fills its slots through the communicator, bf16 in both runs).
  int64_t moved_bf16 = 0, moved_f32 = 0;
  for (size_t s = 0; s < 2; ++s) {
    const RlStepMetrics &a = bf16.steps[s], &b = f32.steps[s];
    EXPECT_EQ(a.pg_loss, b.pg_loss) << "step " << s;
    EXPECT_EQ(a.grad_norm, b.grad_norm) << "step " << s;
    ASSERT_EQ(a.balance.size(), b.balance.size());
    for (const auto& [stage, sb] : a.balance) {
      const StageBalance& f = b.balance.at(stage);
      const int64_t x = sb.bytes_direct + sb.bytes_cpu, y = f.bytes_direct + f.bytes_cpu;
      if (stage == "ref") {
        EXPECT_EQ(x, y) << "step " << s;
      } else {
        moved_bf16 += x;
        moved_f32 += y;
      }
    }
    for (auto [x, y, name] : {std::tuple{comm.steps[s].pg_loss, a.pg_loss, "pg_loss"},
                              {comm.steps[s].grad_norm, a.grad_norm, "grad_norm"}})
      expect_close(x, y, 1e-6, name, a.step);
  }
  EXPECT_GT(moved_bf16, 0) << "no expert weights reached a slot";
  EXPECT_EQ(2 * moved_bf16, moved_f32);
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(bf16.policy[r], f32.policy[r]) << "rank " << r << ": bf16 slots changed a weight";
    EXPECT_LT(max_abs_diff(comm.policy[r], bf16.policy[r]), 1e-6) << "rank " << r;
  }
}

TEST(DistributedRl, PpoWithCriticOnTwoRanksMatchesOneRank) {
  const RlRunConfig cfg = RlRunConfig::parse(
      whole_batch(testing::ppo_count_yaml(3, "  use_kl_in_reward: true\n")), "<ppo>");
  expect_matches_single_rank(cfg, 2, 3);
}

TEST(DistributedRl, TokenBudgetMicroBatchesAgreeInCount) {
  // Budgets that cut the ranks' mini-batches into different numbers of micro-batches: the
  // ranks must still run the same number of (collective) forwards, or they would fail on a
  // mismatched collective. The micro-steps differ from one rank's, so only the rollout of
  // the first step (before any update) is the single-rank one.
  for (const char* budget : {"  ppo_max_token_len: 9\n", "  ppo_max_token_len: 23\n"}) {
    SCOPED_TRACE(budget);
    const RlRunConfig cfg = RlRunConfig::parse(grpo_yaml(1, budget), "<grpo budget>");
    const RunResult one = run(cfg, 1, 1), two = run(cfg, 2, 1);
    EXPECT_EQ(two.responses, one.responses);
    EXPECT_EQ(two.steps[0].reward_mean, one.steps[0].reward_mean);
    EXPECT_EQ(two.steps[0].skipped, 0);
    EXPECT_TRUE(std::isfinite(two.steps[0].grad_norm) && two.steps[0].grad_norm > 0);
    expect_close(two.steps[0].pg_loss, one.steps[0].pg_loss, 1e-3, "pg_loss", 1);
  }
}

TEST(DistributedRl, TheSameRankCountRepeatsExactly) {
  const RlRunConfig cfg = RlRunConfig::parse(grpo_yaml(2), "<grpo>");
  const RunResult a = run(cfg, 2, 2), b = run(cfg, 2, 2);
  EXPECT_EQ(a.policy, b.policy);
  for (size_t s = 0; s < a.steps.size(); ++s) {
    EXPECT_EQ(a.steps[s].grad_norm, b.steps[s].grad_norm);
    EXPECT_EQ(a.steps[s].pg_loss, b.steps[s].pg_loss);
  }
}

TEST(DistributedRl, CheckpointResumesAtTheSameRanksExactlyAndLoadsAtOthers) {
  // A KL loss, so the reference (restored from the initial weights) matters too.
  const RlRunConfig cfg = RlRunConfig::parse(grpo_yaml(2), "<grpo>");
  const std::string dir = ::testing::TempDir() + "/rl_distributed_ckpt";
  std::filesystem::remove_all(dir);
  {  // initial weights of their own, saved by one rank
    auto backend = make_cpu_backend();
    RlTrainer t(cfg, *backend);
    t.policy().init_weights(11);
    save_weights(dir + "/init", t.policy());
  }
  std::vector<RlStepMetrics> straight(2), resumed(2);
  std::vector<std::vector<double>> straight_w(2), resumed_w(2);
  run_inprocess(2, kTimeout, [&](int rank, Communicator& comm) {
    auto backend = make_cpu_backend();
    RlTrainer a(cfg, *backend, &comm);
    a.load_initial_weights(dir + "/init");
    a.step();
    a.save(dir + "/step1");
    straight[rank] = a.step();
    straight_w[rank] = backend->download_f64(a.policy().params().flat());
    RlTrainer b(cfg, *backend, &comm);
    b.resume(dir + "/step1");
    EXPECT_EQ(b.steps_done(), 1);
    resumed[rank] = b.step();
    resumed_w[rank] = backend->download_f64(b.policy().params().flat());
  });
  EXPECT_EQ(resumed_w, straight_w);
  EXPECT_EQ(resumed[0].grad_norm, straight[0].grad_norm);
  EXPECT_EQ(resumed[0].kl, straight[0].kl);
  // The same checkpoint at one and at four ranks: the same weights, whole or sliced.
  auto backend = make_cpu_backend();
  RlTrainer one(cfg, *backend);
  one.resume(dir + "/step1");
  const std::vector<double> full = backend->download_f64(one.policy().params().flat());
  std::vector<std::vector<double>> four(4);
  run_inprocess(4, kTimeout, [&](int rank, Communicator& comm) {
    auto be = make_cpu_backend();
    RlTrainer t(cfg, *be, &comm);
    t.resume(dir + "/step1");
    four[rank] = be->download_f64(t.policy().params().flat());
  });
  for (int r = 0; r < 4; ++r) EXPECT_EQ(four[r], shard_of(cfg.model, full, 4, r)) << r;
}

TEST(DistributedRl, RefusesRankCountsThatDoNotSplitEvenly) {
  auto expect_refused = [](const std::string& yaml, int W, const std::string& key) {
    const RlRunConfig cfg = RlRunConfig::parse(yaml, "<rl>");
    try {
      run_inprocess(W, kTimeout, [&](int, Communicator& comm) {
        auto backend = make_cpu_backend();
        RlTrainer t(cfg, *backend, &comm);
      });
      ADD_FAILURE() << W << " ranks accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(key), std::string::npos) << e.what();
    }
  };
  expect_refused(grpo_yaml(1), 3, "data.train_batch_size");  // 8 prompts on 3 ranks
  // 8 prompts split in two, but mini-batches of 4 prompts on 8 ranks... and 8 experts on 8
  // ranks are fine: the mini-batch is what fails.
  expect_refused(grpo_yaml(1), 8, "actor.ppo_mini_batch_size");
  // The config key itself.
  try {
    RlRunConfig::parse(grpo_yaml(1) + "  ranks: 3\n", "<rl>");
    ADD_FAILURE() << "trainer.ranks: 3 accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("ranks"), std::string::npos) << e.what();
  }
}

// The balancer moves tokens to replicas, never changes results: at W = 4 every planner (with
// its replica slots filled by the transfer engine or through the communicator) gives the
// samples, losses and weights of static placement; foresight actually balances.
TEST(DistributedRl, BalancedPlacementsMatchStaticPlacement) {
  RlRunConfig base = RlRunConfig::parse(grpo_yaml(2), "balancer-test");
  const RunResult fixed = run(base, 4, 2);
  for (const auto& [planner, shared] : {std::pair{"foresight", true},
                                        {"foresight", false},
                                        {"step_oracle", true},
                                        {"step_ema", true}}) {
    RlRunConfig cfg = base;
    cfg.balancer.planner = planner;
    cfg.balancer.replica_slots = 2;
    cfg.balancer.nodes = 2;
    const Slots slots = shared ? Slots::transfer : Slots::comm;
    const RunResult got = run(cfg, 4, 2, slots);
    const std::string what = fmt::format("{} ({})", planner, shared ? "transfer engine" : "comm");
    ASSERT_EQ(got.steps.size(), fixed.steps.size()) << what;
    EXPECT_EQ(got.responses, fixed.responses) << what;
    for (size_t s = 0; s < fixed.steps.size(); ++s) {
      const RlStepMetrics &a = got.steps[s], &b = fixed.steps[s];
      EXPECT_EQ(a.reward_mean, b.reward_mean) << what;
      for (auto [x, y, name] : {std::tuple{a.kl, b.kl, "kl"},
                                {a.pg_loss, b.pg_loss, "pg_loss"},
                                {a.grad_norm, b.grad_norm, "grad_norm"}})
        expect_close(x, y, 1e-4, name, a.step);
      for (const char* stage : {"old_log_prob", "ref", "update_actor"}) {
        ASSERT_TRUE(a.balance.count(stage)) << what << " " << stage;
        const StageBalance& bal = a.balance.at(stage);
        const StageBalance& none = b.balance.at(stage);
        EXPECT_GT(bal.plans, 0) << what;
        EXPECT_NEAR(bal.before, none.before, 1e-9) << what << ": the same loads";
        EXPECT_EQ(none.after, none.before) << "no planner: nothing moves";
        EXPECT_LE(bal.after, bal.before + 1e-9) << what << " " << stage;
        EXPECT_EQ(bal.micro_before.size(), bal.micro_after.size());
      }
    }
    // Replica gradients are summed into their home expert in another order than the home's
    // own rows, so gradients differ by fp32 rounding (grad_norm above agrees to 1e-4); AdamW
    // turns that into weight differences of a fraction of lr (3e-3) per step where a
    // gradient is near zero. A lost or misplaced replica gradient changes grad_norm itself.
    for (int r = 0; r < 4; ++r)
      EXPECT_LT(max_abs_diff(got.policy[r], fixed.policy[r]), 0.1 * 3e-3 * 2)
          << what << ", rank " << r;
    if (std::string(planner) == "foresight" && shared) {  // the same run again: bit-identical
      const RunResult again = run(cfg, 4, 2, slots);
      for (int r = 0; r < 4; ++r)
        EXPECT_EQ(again.policy[r], got.policy[r]) << what << ", rank " << r;
    }
    // step_ema's first step has no history (no replicas); the others balance from step 1.
    const StageBalance& last = got.steps.back().balance.at("update_actor");
    if (std::string(planner) == "foresight") {
      EXPECT_LT(last.after / last.plans, 1.10) << what;
      EXPECT_LT(last.after, last.before) << what;
      EXPECT_GT(last.bytes_direct + last.bytes_cpu, 0) << what << ": replicas were filled";
    }
  }
}

}  // namespace
}  // namespace fm
