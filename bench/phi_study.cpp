// The router-balance study (issue 8; rl/router_study.h): trains the configured preset once
// per router-balancing method on the same text, seed and budget, and writes to --out:
//   summary.md    the tables (held-out loss, MaxVio_batch, MaxVio_global, Gini, per-layer
//                 load, and the EP imbalance at W ranks before/after foresight planning)
//   summary.json  the same numbers, machine-readable
//   curves.csv    method, step, lm_loss, max_vio_batch (per training step)
//   evals.csv     method, step, val_loss, max_vio_global, gini (per held-out evaluation)
// bench/plot_phi_study.py draws maxvio.png from the CSVs. `make phi-study` runs both.
//   build/bench/phi_study --config configs/study/phi_tiny.yaml --out bench/results/phi_study
// Not a Google Benchmark program: it has its own main.
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <omp.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include "engine/backend.h"
#include "engine/files.h"
#include "rl/router_study.h"

namespace {

using fm::RouterStudyResult;

std::string method_params(const fm::RouterBalanceConfig& b) {
  switch (b.method) {
    case fm::BalanceMethod::none:
      return "—";
    case fm::BalanceMethod::switch_aux:
    case fm::BalanceMethod::global_aux:
      return fmt::format("α = {}", b.alpha);
    case fm::BalanceMethod::loss_free:
      return fmt::format("u = {}", b.bias_rate);
    case fm::BalanceMethod::phi:
      return fmt::format("α = {}, η = {} ({} value), φ = {}", b.alpha, b.eta,
                         b.eta_weights_new ? "new" : "old",
                         b.potential == fm::PhiPotential::l2 ? "ℓ2" : "neg. entropy");
  }
  return "?";
}

std::string summary_markdown(const fm::RouterStudyConfig& cfg,
                             const std::vector<RouterStudyResult>& results,
                             const std::string& command, int32_t vocab) {
  const fm::LmRunConfig& run = cfg.run;
  const fm::LmTrainConfig& t = run.train;
  const fm::RouterStudyInteraction& in = cfg.interaction;
  const int64_t world = int64_t{in.nodes} * in.gpus_per_node;
  std::ostringstream o;
  o << "# Router-balance study: φ-balancing vs Switch loss vs loss-free bias\n\n";
  o << fmt::format(
      "Model `{}` ({} MoE layers, {} experts, top-{}), vocabulary {} (SentencePiece trained on "
      "the training lines), text {}. Every method: seed {}, {} steps × {} micro-batches × {} "
      "sequences × {} tokens, the same data order. Held-out set: {} tokens. CPU backend.\n\n",
      run.model.name, run.model.n_moe_layers(), run.model.n_experts, run.model.top_k, vocab,
      fmt::join(run.data->files, ", "), t.seed, t.steps, t.micro_batches,
      t.sequences_per_micro_batch, t.seq_len, results.empty() ? 0 : results[0].final_eval.tokens);
  o << "Command:\n\n```sh\n" << command << "\n```\n\n";
  o << "MaxVio = (max_i load_i − mean load) / mean load of the top-k assignments. "
       "MaxVio_batch: each training step's load (all its micro-batches), averaged over MoE "
       "layers and over all steps. MaxVio_global and Gini: the whole held-out set's load after "
       "training, averaged over layers.\n\n";
  o << "| method | parameters | held-out loss | MaxVio_batch | MaxVio_global | Gini | "
       "MaxVio_global per layer | train time |\n|---|---|---|---|---|---|---|---|\n";
  for (const RouterStudyResult& r : results) {
    std::string per_layer;
    for (double v : r.final_eval.max_vio)
      per_layer += fmt::format("{}{:.3f}", per_layer.empty() ? "" : " / ", v);
    o << fmt::format("| {} | {} | {:.4f} | {:.3f} | {:.3f} | {:.3f} | {} | {:.0f} s |\n", r.method,
                     method_params(r.balance), r.final_eval.loss, r.max_vio_batch, r.max_vio_global,
                     r.gini, per_layer, r.train_seconds);
  }
  o << "\n## Per-layer expert load on the held-out set\n\n"
       "Each expert's share of the layer's top-k assignments, × E (1.00 = uniform).\n\n";
  o << "| method | layer | load × E / total |\n|---|---|---|\n";
  for (const RouterStudyResult& r : results)
    for (size_t l = 0; l < r.final_eval.load.size(); ++l) {
      const auto& load = r.final_eval.load[l];
      double total = 0;
      for (int64_t x : load) total += static_cast<double>(x);
      std::string cells;
      for (int64_t x : load)
        cells += fmt::format(
            "{}{:.2f}", cells.empty() ? "" : " ",
            total > 0 ? static_cast<double>(x) * static_cast<double>(load.size()) / total : 0.0);
      o << fmt::format("| {} | {} | {} |\n", r.method, l, cells);
    }
  o << fmt::format(
      "\n## Interaction with the system balancer (W = {}: {} node(s) × {} GPUs, {} replica "
      "slot(s) per rank and layer)\n\n"
      "The held-out routing trace cut into rollout-sized micro-steps of W × {} sequences "
      "({} micro-steps per simulated RL step), every (micro-step, MoE layer) planned by "
      "`none` (static expert parallelism: every token on its expert's home rank) and by "
      "`foresight` (micro-step replication from the replayed routing). EP imbalance = max "
      "rank load / mean rank load; the bound is the best any plan can reach (largest "
      "indivisible piece, total / W).\n\n",
      world, in.nodes, in.gpus_per_node, in.replica_slots, in.micro_batch, in.micro_steps);
  o << "| method | plans | static EP max/mean (mean · p95 · max) | foresight max/mean (mean · "
       "p95 · max) | foresight / bound (mean) | foresight plans ≤ 1.10 | new replicas per "
       "plan |\n|---|---|---|---|---|---|---|\n";
  for (const RouterStudyResult& r : results) {
    const auto& b = r.ep_before.max_over_mean;
    const auto& a = r.ep_after.max_over_mean;
    o << fmt::format(
        "| {} | {} | {:.3f} · {:.3f} · {:.3f} | {:.3f} · {:.3f} · {:.3f} | {:.3f} | {:.0f}% | "
        "{:.2f} |\n",
        r.method, b.count, b.mean, b.p95, b.max, a.mean, a.p95, a.max,
        r.ep_after.ratio_to_bound.mean, 100.0 * r.ep_after.within_110,
        r.ep_after.new_replicas_per_plan);
  }
  return o.str();
}

nlohmann::json summary_json(const std::vector<RouterStudyResult>& results) {
  nlohmann::json out = nlohmann::json::array();
  auto ratio = [](const fm::RatioSummary& s) {
    return nlohmann::json{
        {"mean", s.mean}, {"p50", s.p50}, {"p95", s.p95}, {"max", s.max}, {"count", s.count}};
  };
  for (const RouterStudyResult& r : results)
    out.push_back({{"method", r.method},
                   {"balance", fm::balance_method_name(r.balance.method)},
                   {"val_loss", r.final_eval.loss},
                   {"max_vio_batch", r.max_vio_batch},
                   {"max_vio_global", r.max_vio_global},
                   {"gini", r.gini},
                   {"final_eval", fm::eval_metrics_json(r.final_eval)},
                   {"ep_static_max_over_mean", ratio(r.ep_before.max_over_mean)},
                   {"ep_foresight_max_over_mean", ratio(r.ep_after.max_over_mean)},
                   {"ep_foresight_ratio_to_bound", ratio(r.ep_after.ratio_to_bound)},
                   {"train_seconds", r.train_seconds}});
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"The router-balance study: one pretraining run per router-balancing method"};
  std::string config = "configs/study/phi_tiny.yaml", out = "bench/results/phi_study",
              backend_name = "cpu";
  int64_t steps = 0;
  int threads = 0;
  app.add_option("-c,--config", config, "study YAML")->capture_default_str();
  app.add_option("--out", out, "output directory")->capture_default_str();
  app.add_option("--steps", steps, "override the steps of every run")->check(CLI::PositiveNumber);
  app.add_option("--backend", backend_name, "cpu or cuda")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
  app.add_option("--threads", threads, "OpenMP threads (default: all cores)")
      ->check(CLI::PositiveNumber);
  CLI11_PARSE(app, argc, argv);
  try {
    if (threads > 0) omp_set_num_threads(threads);
    fm::RouterStudyConfig cfg = fm::RouterStudyConfig::load(config);
    if (steps > 0) cfg.run.train.steps = cfg.run.optimizer.total_steps = steps;
    std::string command = fmt::format("build/bench/phi_study --config {} --out {}", config, out);
    if (steps > 0) command += fmt::format(" --steps {}", steps);
    if (backend_name != "cpu") command += " --backend " + backend_name;
    fm::make_dirs(out);
    fm::make_dirs(cfg.run.train.run_dir);
    std::string log;
    const auto corpus = fm::load_text_corpus(cfg.run, &log);
    fmt::print("{}\ntext: {} training tokens, {} held-out tokens\n", log,
               corpus->train_stream().size(), corpus->valid_stream().size());
    auto backend = backend_name == "cuda" ? fm::make_cuda_backend() : fm::make_cpu_backend();
    std::vector<RouterStudyResult> results;
    std::string curves = "method,step,lm_loss,max_vio_batch\n";
    std::string evals = "method,step,val_loss,max_vio_global,gini\n";
    for (const fm::RouterStudyMethod& m : cfg.methods) {
      fmt::print("== {} ({}) ==\n", m.name, method_params(m.balance));
      const int64_t log_every = cfg.run.train.log_every;
      results.push_back(fm::run_router_method(
          cfg.run, m, corpus, cfg.interaction, *backend, [&](const fm::LmStepMetrics& s) {
            if (s.step % log_every == 0)
              fmt::print("  step {:>5}  lm {:.4f}  MaxVio_batch {:.3f}  {:.0f} tok/s\n", s.step,
                         s.lm_loss, fm::mean_of(s.max_vio), s.tokens_per_second);
          }));
      const RouterStudyResult& r = results.back();
      fmt::print(
          "  held-out loss {:.4f}  MaxVio_batch {:.3f}  MaxVio_global {:.3f}  gini {:.3f}  "
          "EP max/mean static {:.3f} -> foresight {:.3f}  ({:.0f} s)\n",
          r.final_eval.loss, r.max_vio_batch, r.max_vio_global, r.gini,
          r.ep_before.max_over_mean.mean, r.ep_after.max_over_mean.mean, r.train_seconds);
      for (size_t i = 0; i < r.step_max_vio.size(); ++i)
        curves += fmt::format("{},{},{:.6f},{:.6f}\n", r.method, i + 1, r.step_lm_loss[i],
                              r.step_max_vio[i]);
      for (const fm::LmEvalMetrics& e : r.evals)
        evals += fmt::format("{},{},{:.6f},{:.6f},{:.6f}\n", r.method, e.step, e.loss,
                             fm::mean_of(e.max_vio), fm::mean_of(e.gini));
      // Written after every method, so an interrupted study keeps what it finished.
      fm::write_file_atomic(out + "/curves.csv", curves);
      fm::write_file_atomic(out + "/evals.csv", evals);
      fm::write_file_atomic(out + "/summary.json", summary_json(results).dump(1) + "\n");
      fm::write_file_atomic(out + "/summary.md",
                            summary_markdown(cfg, results, command, corpus->vocab_size()));
    }
    fmt::print("wrote {}/summary.md, summary.json, curves.csv, evals.csv\n", out);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "phi_study: %s\n", e.what());
    return 1;
  }
  return 0;
}
