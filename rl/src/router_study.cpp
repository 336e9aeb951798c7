#include "rl/router_study.h"

#include <chrono>

#include "engine/config.h"
#include "engine/error.h"
#include "engine/files.h"
#include "model/presets.h"

namespace fm {

RouterStudyConfig RouterStudyConfig::parse(const std::string& text, const std::string& origin) {
  const ConfigNode root = ConfigNode::parse(text, origin);
  RouterStudyConfig c;
  c.origin = origin;
  const std::string run = root.get<std::string>("run");
  try {
    c.run = LmRunConfig::load(run);
  } catch (const std::exception& e) {
    root.fail("run", e.what());
  }
  if (!c.run.data) root.fail("run", fmt::format("'{}' has no `data:` section (text files)", run));
  if (root.has("steps")) {
    c.run.train.steps = root.get_positive("steps");
    c.run.optimizer.total_steps = c.run.train.steps;
  }
  c.run.train.run_dir = root.get<std::string>("run_dir", c.run.train.run_dir);
  const ConfigNode methods = root.child("methods");
  for (const std::string& name : methods.keys())
    c.methods.push_back({name, RouterBalanceConfig::from_yaml(methods.child(name))});
  if (c.methods.empty()) root.fail("methods", "must name at least one method");
  const ConfigNode in = root.child_or_empty("interaction");
  RouterStudyInteraction& i = c.interaction;
  i.nodes = static_cast<int32_t>(in.get<int64_t>("nodes", i.nodes));
  i.gpus_per_node = static_cast<int32_t>(in.get<int64_t>("gpus_per_node", i.gpus_per_node));
  i.replica_slots = static_cast<int32_t>(in.get<int64_t>("replica_slots", i.replica_slots));
  i.micro_batch = in.get<int64_t>("micro_batch", i.micro_batch);
  i.micro_steps = in.get<int64_t>("micro_steps", i.micro_steps);
  if (i.nodes < 1) in.fail("nodes", "must be >= 1");
  if (i.gpus_per_node < 1) in.fail("gpus_per_node", "must be >= 1");
  if (i.replica_slots < 0) in.fail("replica_slots", "must be >= 0");
  if (i.micro_batch < 1) in.fail("micro_batch", "must be >= 1");
  if (i.micro_steps < 1) in.fail("micro_steps", "must be >= 1");
  const int64_t world = int64_t{i.nodes} * i.gpus_per_node;
  if (c.run.model.n_experts % world != 0)
    in.fail("gpus_per_node",
            fmt::format("W = {} must divide the model's {} experts", world, c.run.model.n_experts));
  const int64_t step_seqs = world * i.micro_batch * i.micro_steps;
  const int64_t held_out_seqs = c.run.train.eval_tokens / c.run.train.seq_len;
  if (held_out_seqs < step_seqs)
    in.fail("micro_steps",
            fmt::format("one simulated RL step needs W x micro_batch x micro_steps = {} "
                        "held-out sequences, but train.eval_tokens / seq_len allows {}",
                        step_seqs, held_out_seqs));
  root.finish();
  return c;
}

RouterStudyConfig RouterStudyConfig::load(const std::string& name_or_path) {
  std::string origin;
  const std::string text = resolve_config(name_or_path, &origin);
  return parse(text, origin);
}

RouterStudyResult run_router_method(const LmRunConfig& base, const RouterStudyMethod& method,
                                    std::shared_ptr<const TextCorpus> corpus,
                                    const RouterStudyInteraction& in, Backend& backend,
                                    const std::function<void(const LmStepMetrics&)>& progress) {
  LmRunConfig run = base;
  run.model.balance = method.balance;
  run.train.run_dir = base.train.run_dir + "/" + method.name;
  RouterStudyResult r;
  r.method = method.name;
  r.balance = method.balance;
  const auto t0 = std::chrono::steady_clock::now();
  LmTrainer trainer(run, backend, std::move(corpus));
  const LmTrainConfig& t = run.train;
  while (trainer.steps_done() < t.steps) {
    const LmStepMetrics m = trainer.step();
    if (progress) progress(m);
    r.step_max_vio.push_back(mean_of(m.max_vio));
    r.step_lm_loss.push_back(m.lm_loss);
    if (trainer.steps_done() < t.steps && t.eval_every > 0 && m.step % t.eval_every == 0) {
      LmEvalMetrics e = trainer.evaluate();
      e.routes = {};
      r.evals.push_back(std::move(e));
    }
  }
  r.train_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  r.final_eval = trainer.evaluate();
  LmEvalMetrics last = r.final_eval;
  last.routes = {};
  r.evals.push_back(std::move(last));
  r.max_vio_batch = mean_of(r.step_max_vio);
  r.max_vio_global = mean_of(r.final_eval.max_vio);
  r.gini = mean_of(r.final_eval.gini);

  PlannerStudyOptions o;
  o.topology = {in.nodes, in.gpus_per_node};
  o.replica_slots = in.replica_slots;
  o.micro_batch = in.micro_batch;
  o.micro_steps = in.micro_steps;
  o.planners = {"none", "foresight"};
  const std::vector<PlannerStudySummary> s =
      summarize_planner_study(run_planner_study(r.final_eval.routes, o));
  FM_CHECK(s.size() == 2, "router study: expected the none and foresight summaries");
  r.ep_before = s[0];
  r.ep_after = s[1];
  return r;
}

}  // namespace fm
