// The RL job behind `foremoe train --config <rl config>` (and `make demo`):
// SFT warm start when no checkpoint is given, then rollout -> reward ->
// recompute -> advantages -> update, one line per step, evaluations, metrics,
// checkpoints, the last step's routing traces; SIGINT checkpoints and exits.
#include <fmt/format.h>
#include <omp.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <optional>

#include "engine/collectives.h"
#include "engine/comm.h"
#include "engine/config.h"
#include "engine/dist_env.h"
#include "engine/files.h"
#include "engine/metrics.h"
#include "engine/process_group.h"
#include "model/generation.h"
#include "model/presets.h"
#include "model/trace_io.h"
#include "rl/rl_trainer.h"
#include "tools/foremoe/jobs.h"
#include "tools/foremoe/progress.h"
#include "transfer/cpu_transfer.h"

namespace fm::cli {

bool is_rl_config(const std::string& name_or_path) {
  std::string origin;
  const std::string text = resolve_config(name_or_path, &origin);
  const ConfigNode root = ConfigNode::parse(text, origin);
  return root.has("rollout") || root.has("actor") || root.has("algorithm");
}

// The step's line: reward, accuracy, KL, entropy, clip fraction, grad norm, (the critic's
// loss), the balancer's imbalance before -> after, sampler gap, throughput and the stage
// times of the stages this run has.
static std::string step_line(const RlStepMetrics& m, const RlRunConfig& cfg) {
  const StageTimes& s = m.timing;
  std::string line = fmt::format(
      "step {:>4}  reward {:.3f}  acc {:.3f}  kl {:.4f}  entropy {:.3f}  clipfrac {:.3f}  "
      "grad_norm {:.3f}",
      m.step, m.reward_mean, m.accuracy, m.kl, m.entropy, m.pg_clipfrac, m.grad_norm);
  if (cfg.has_critic)
    line += fmt::format("  vf_loss {:.4f}  vf_clipfrac {:.3f}", m.vf_loss, m.vf_clipfrac);
  if (cfg.balancer.planner != "none" && m.balance.count("update_actor")) {
    const StageBalance& b = m.balance.at("update_actor");
    const double n = b.plans > 0 ? static_cast<double>(b.plans) : 1.0;
    line += fmt::format("  imbalance {:.2f} -> {:.2f} ({}, {:.1f} ms planning, {:.1f} MB moved)",
                        b.before / n, b.after / n, cfg.balancer.planner, b.planner_s * 1e3,
                        static_cast<double>(b.bytes_direct + b.bytes_cpu) / 1e6);
  }
  line += fmt::format("  gap {:.1e}  {:.0f} tok/s  [gen {:.2f}", m.logprob_gap, m.tokens_per_second,
                      s.gen);
  line += fmt::format(" old {:.2f}", s.old_log_prob);
  if (cfg.needs_ref()) line += fmt::format(" ref {:.2f}", s.ref);
  if (cfg.has_critic)
    line += fmt::format(" values {:.2f} critic {:.2f}", s.values, s.update_critic);
  line += fmt::format(" actor {:.2f} | step {:.2f} s]", s.update_actor, s.step);
  if (m.skipped) line += fmt::format("  ({} update(s) skipped: non-finite)", m.skipped);
  return line;
}

static void print_eval(const TaskEvalResult& r, int64_t step) {
  fmt::print("eval  step {:>4}  held-out accuracy {:.3f}  mean_reward {:.3f}  ({} prompts)\n", step,
             r.accuracy, r.mean_reward, r.examples);
}

// The SFT warm start's checkpoint (run first when the config gives no checkpoint).
static std::string warm_start(const RlRunConfig& cfg, const std::string& device) {
  if (!cfg.init_checkpoint.empty()) return cfg.init_checkpoint;
  FM_CHECK(!cfg.init_sft.empty(),
           "{}: init: give a checkpoint to start from or an sft config for the warm start",
           cfg.origin);
  SftRunConfig sft = SftRunConfig::load(cfg.init_sft);
  sft.train.run_dir = cfg.trainer.run_dir + "/sft";
  if (cfg.init_sft_steps > 0) {
    FM_CHECK(cfg.init_sft_steps <= sft.train.steps,
             "{}: init.sft_steps: {} is more than the {} steps of {}", cfg.origin,
             cfg.init_sft_steps, sft.train.steps, sft.origin);
    sft.train.steps = cfg.init_sft_steps;
  }
  fmt::print("== SFT warm start ({}) ==\n", cfg.init_sft);
  return run_sft_job(sft, "", device);
}

// One rank of the RL loop (comm null: the only one). Every rank runs every step, evaluation
// and checkpoint (collectives); rank 0 alone prints and writes the run directory.
// `transfer`: the policy's CPU transfer group shared by in-process ranks (null otherwise).
// The rank's models live on a.device; `local_rank` picks its GPU under "cuda".
static void run_rl_rank(const RlRunConfig& cfg, const RlArgs& a, const std::string& init,
                        Communicator* comm, int local_rank, CpuTransferGroup* transfer = nullptr) {
  const RlTrainerConfig& t = cfg.trainer;
  auto backend = make_backend(a.device, local_rank);
  RlTrainer trainer(cfg, *backend, comm, transfer);
  const bool lead = trainer.rank() == 0;
  if (!a.resume.empty()) {
    trainer.resume(a.resume);
    if (lead) fmt::print("resumed from {} at step {}\n", a.resume, trainer.steps_done());
  } else {
    trainer.load_initial_weights(init);
    if (lead) fmt::print("== RL from {} ==\n", init);
  }
  std::optional<MetricsWriter> metrics;
  if (lead) {
    metrics.emplace(t.run_dir + "/metrics.jsonl", /*append=*/!a.resume.empty());
    fmt::print(
        "{} on {} ({}): {} steps x {} prompts x {} samples, {} {} epoch(s), mini-batch {} "
        "prompts, micro-batch {}{}\n",
        advantage_estimator_name(cfg.algorithm.estimator), cfg.task.name,
        device_name(backend->device()), t.total_steps, cfg.train_batch_size, cfg.rollout.n,
        cfg.model.name, cfg.actor.ppo_epochs, cfg.actor.ppo_mini_batch_size,
        cfg.actor.ppo_max_token_len > 0
            ? fmt::format("<= {} tokens", cfg.actor.ppo_max_token_len)
            : fmt::format("{} sequences", cfg.actor.ppo_micro_batch_size),
        trainer.world_size() > 1
            ? fmt::format(" per rank; {} ranks (experts {} per rank, {} threads each)",
                          trainer.world_size(), cfg.model.n_experts / trainer.world_size(),
                          omp_get_max_threads())
            : "");
  }
  auto eval = [&](int64_t step) {
    const TaskEvalResult r = trainer.evaluate();
    if (lead) {
      nlohmann::json j = task_eval_json(r, step);
      j["kind"] = "eval";
      metrics->write(j);
      print_eval(r, step);
    }
    return r;
  };
  const TaskEvalResult first = trainer.steps_done() == 0 ? eval(0) : TaskEvalResult{};
  // On a terminal, a live line names the running stage and the finished ones; the step's
  // line replaces it. Elsewhere (a pipe, a log file) only the step lines appear.
  ProgressLine progress(lead && isatty(fileno(stdout)));
  trainer.set_stage_observer([&](const char* stage) { progress.stage(stage); });
  TaskEvalResult last = first;
  auto checkpoint = [&](int64_t step) {
    const std::string dir = fmt::format("{}/checkpoints/step_{:06d}", t.run_dir, step);
    trainer.save(dir);
    if (lead) spdlog::info("checkpoint {}", dir);
  };
  while (trainer.steps_done() < t.total_steps) {
    progress.begin(fmt::format("step {}/{}", trainer.steps_done() + 1, t.total_steps));
    const RlStepMetrics m = trainer.step();
    progress.end();
    if (lead) {
      metrics->write(rl_metrics_json(m));
      fmt::print("{}\n", step_line(m, cfg));
    }
    const bool end = m.step == t.total_steps;
    if ((t.eval_every > 0 && m.step % t.eval_every == 0) || end) last = eval(m.step);
    if ((t.checkpoint_every > 0 && m.step % t.checkpoint_every == 0) || end) checkpoint(m.step);
    if (end && t.save_traces) {
      const RoutingTrace trace = trainer.gather_rollout_traces();
      if (lead) {
        const std::string path =
            fmt::format("{}/traces/step_{:06d}.safetensors", t.run_dir, m.step);
        make_dirs(t.run_dir + "/traces");
        save_trace(path, trace,
                   trace_metadata(cfg.model, {{"run", t.run_dir},
                                              {"step", m.step},
                                              {"task", cfg.task.name},
                                              {"samples_per_prompt", cfg.rollout.n}}));
        fmt::print("routing trace of the last rollout: {}\n", path);
      }
    }
    // A signal may reach the ranks at different steps: they stop together.
    if (any_rank(comm, stop_requested()) && !end) {
      checkpoint(m.step);
      if (lead)
        fmt::print("interrupted: checkpoint written at step {}; resume with --resume\n", m.step);
      return;
    }
  }
  if (lead && first.examples > 0)
    fmt::print("held-out accuracy {:.3f} -> {:.3f} over {} RL steps (metrics: {}/metrics.jsonl)\n",
               first.accuracy, last.accuracy, t.total_steps, t.run_dir);
}

int run_rl_job(const RlArgs& a) {
  RlRunConfig cfg = RlRunConfig::load(a.config);
  if (a.steps >= 0) cfg.trainer.total_steps = a.steps;
  if (!a.run_dir.empty()) cfg.trainer.run_dir = a.run_dir;
  if (!a.init_checkpoint.empty()) cfg.init_checkpoint = a.init_checkpoint;
  if (a.ranks > 0) cfg.trainer.ranks = a.ranks;  // in-process ranks
  const RlTrainerConfig& t = cfg.trainer;
  const auto timeout = std::chrono::milliseconds(static_cast<int64_t>(t.comm_timeout_s * 1000));
  install_stop_on_sigint();

  const bool on_cpu = parse_device(a.device).kind == DeviceKind::cpu;
  const DistEnv env = dist_env_from_environment();
  const int64_t world = env.world_size > 1 ? env.world_size : t.ranks;
  const std::string why = cfg.rank_count_problem(world);
  FM_CHECK(why.empty(), "{}: cannot run on {} ranks: {}", cfg.origin, world, why);
  if (env.world_size > 1) {  // one process per rank (foremoe launch, mpirun, srun)
    FM_CHECK(a.ranks <= 0 || a.ranks == env.world_size,
             "--ranks {}: the launcher started {} ranks (WORLD_SIZE), which decide", a.ranks,
             env.world_size);
    if (t.ranks != env.world_size && env.rank == 0)
      spdlog::warn(
          "{}: trainer.ranks {} (in-process ranks) does not apply: the launcher "
          "started {} processes, one rank each",
          cfg.origin, t.ranks, env.world_size);
    FM_CHECK(!cfg.init_checkpoint.empty() || !a.resume.empty(),
             "{}: under a launcher of {} processes give --init-checkpoint (or init.checkpoint, "
             "or --resume): run the SFT warm start first (foremoe sft --config {})",
             cfg.origin, env.world_size, cfg.init_sft.empty() ? "<sft config>" : cfg.init_sft);
    if (env.rank == 0) {
      make_dirs(t.run_dir);
      write_file_atomic(t.run_dir + "/config.yaml", cfg.text);
    }
    // CPU ranks meet over Gloo (host buffers), GPU ranks over NCCL (device buffers; host ones
    // staged), one GPU per rank: the one of its local rank, as the NCCL group picks it.
    const char* group = on_cpu ? "gloo" : "nccl";
    FM_CHECK(on_cpu || parse_device(a.device).index < 0,
             "--device {}: under a launcher every rank takes the GPU of its local rank; give "
             "--device cuda",
             a.device);
    FM_CHECK(process_group_backend_built(group),
             "--device {}: the ranks need the {} process group, which this build lacks", a.device,
             group);
    const std::unique_ptr<Communicator> comm = make_process_group(env, group, timeout);
    run_rl_rank(cfg, a, cfg.init_checkpoint, comm.get(), env.local_rank);
    return 0;
  }
  make_dirs(t.run_dir);
  write_file_atomic(t.run_dir + "/config.yaml", cfg.text);
  const std::string init = a.resume.empty() ? warm_start(cfg, a.device) : std::string();
  if (t.ranks == 1) {
    run_rl_rank(cfg, a, init, nullptr, 0);
    return 0;
  }
  // In-process ranks: threads of this process sharing its cores.
  const int threads = std::max(1, omp_get_max_threads() / static_cast<int>(t.ranks));
  // The CPU transfer engine moves host memory; on a GPU the replica slots travel through the
  // communicator (CommReplicaSlots). Both move bf16 slots under bf16 compute.
  const std::unique_ptr<CpuTransferGroup> transfer =
      on_cpu ? make_cpu_transfer_group(cfg.balancer, cfg.model, DType::f32, t.compute_dtype(),
                                       static_cast<int>(t.ranks))
             : nullptr;
  run_inprocess(static_cast<int>(t.ranks), timeout, [&](int rank, Communicator& comm) {
    omp_set_num_threads(threads);
    run_rl_rank(cfg, a, init, &comm, rank, transfer.get());
  });
  return 0;
}

}  // namespace fm::cli
