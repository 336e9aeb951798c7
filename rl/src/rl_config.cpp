#include "rl/rl_config.h"

#include <filesystem>

#include "engine/config.h"
#include "engine/error.h"
#include "model/presets.h"
#include "rl/sft_trainer.h"
#include "tokenizer/prompt_template.h"

namespace fm {

static KlEstimator kl_estimator(const ConfigNode& n, const std::string& key, KlEstimator fallback) {
  if (!n.has(key)) return fallback;
  const std::string s = n.get_choice(key, {"kl", "k1", "mse", "k2", "low_var_kl", "k3"}, "kl");
  if (s == "kl" || s == "k1") return KlEstimator::k1;
  if (s == "mse" || s == "k2") return KlEstimator::k2;
  return KlEstimator::k3;
}

static int64_t positive_or(const ConfigNode& n, const std::string& key, int64_t fallback,
                           int64_t min = 1) {
  const int64_t v = n.get<int64_t>(key, fallback);
  if (v < min) n.fail(key, fmt::format("must be >= {} (got {})", min, v));
  return v;
}

RlRunConfig RlRunConfig::parse(const std::string& text, const std::string& origin) {
  const ConfigNode root = ConfigNode::parse(text, origin);
  RlRunConfig c;
  c.origin = origin;
  c.text = text;
  c.model = ModelConfig::from_entry(root);
  const ConfigNode init = root.child_or_empty("init");
  c.init_checkpoint = init.get<std::string>("checkpoint", "");
  c.init_sft = init.get<std::string>("sft", "");
  c.init_sft_steps = positive_or(init, "sft_steps", 0, 0);
  c.tokenizer = root.get<std::string>("tokenizer", c.tokenizer);
  c.prompt_template = root.get<std::string>("template", c.prompt_template);
  c.task = TaskConfig::from_yaml(root.child("task"));

  c.train_batch_size = positive_or(root.child_or_empty("data"), "train_batch_size", 16);

  const ConfigNode ro = root.child_or_empty("rollout");
  c.rollout.n = positive_or(ro, "n", c.rollout.n);
  c.rollout.temperature = ro.get_in_range("temperature", 0.0, 100.0, c.rollout.temperature);
  c.rollout.top_p = ro.get_in_range("top_p", 1e-9, 1.0, c.rollout.top_p);
  c.rollout.top_k = positive_or(ro, "top_k", c.rollout.top_k, 0);
  c.rollout.response_length = positive_or(ro, "response_length", c.rollout.response_length);
  c.rollout.batch_slots = positive_or(ro, "batch_slots", c.rollout.batch_slots);

  const ConfigNode alg = root.child_or_empty("algorithm");
  c.algorithm = AdvantageConfig::from_yaml(alg);
  c.use_kl_in_reward = alg.get<bool>("use_kl_in_reward", false);
  c.kl_penalty = kl_estimator(alg, "kl_penalty", KlEstimator::k1);
  c.kl_coef = alg.get_in_range("kl_coef", 0.0, 1e3, c.kl_coef);

  const ConfigNode actor = root.child_or_empty("actor");
  c.actor.optim = OptimizerConfig::from_yaml(actor.child_or_empty("optim"));
  c.actor.loss = PolicyLossConfig::from_yaml(actor);
  c.actor.ppo_epochs = positive_or(actor, "ppo_epochs", c.actor.ppo_epochs);
  c.actor.ppo_mini_batch_size = positive_or(actor, "ppo_mini_batch_size", c.train_batch_size);
  c.actor.ppo_micro_batch_size =
      positive_or(actor, "ppo_micro_batch_size", c.actor.ppo_micro_batch_size);
  c.actor.ppo_max_token_len = positive_or(actor, "ppo_max_token_len", 0, 0);
  if (c.train_batch_size % c.actor.ppo_mini_batch_size != 0)
    actor.fail("ppo_mini_batch_size", fmt::format("must divide data.train_batch_size {} (got {})",
                                                  c.train_batch_size, c.actor.ppo_mini_batch_size));

  c.has_critic = c.algorithm.estimator == AdvantageEstimator::gae;
  if (c.has_critic) {
    if (!root.has("critic"))
      root.fail("critic",
                "algorithm.adv_estimator gae (PPO) needs a critic section with a value model "
                "(critic.model, head: value)");
    const ConfigNode critic = root.child("critic");
    if (!critic.has("model"))
      critic.fail("model",
                  "required: the critic's value model (a preset such as tiny_critic, "
                  "a file or a mapping, with head: value)");
    c.critic.model = ModelConfig::from_entry(critic);
    if (!c.critic.model.value_head())
      critic.fail("model", fmt::format("the critic needs a value model (head: value); '{}' has "
                                       "head: {}",
                                       c.critic.model.name, c.critic.model.head));
    if (c.critic.model.vocab_size != c.model.vocab_size)
      critic.fail("model", fmt::format("vocab_size {} differs from the actor's {} (the critic "
                                       "reads the same tokens)",
                                       c.critic.model.vocab_size, c.model.vocab_size));
    c.critic.init = critic.get<std::string>("init", c.critic.init);
    if (c.critic.init != "random" && c.critic.init != "actor" &&
        !std::filesystem::is_directory(c.critic.init))
      critic.fail("init", fmt::format("must be random, actor or a value-model checkpoint "
                                      "directory (got '{}', which is not a directory)",
                                      c.critic.init));
    c.critic.optim = OptimizerConfig::from_yaml(critic.child_or_empty("optim"));
    c.critic.ppo_epochs = positive_or(critic, "ppo_epochs", c.critic.ppo_epochs);
    c.critic.ppo_mini_batch_size =
        positive_or(critic, "ppo_mini_batch_size", c.actor.ppo_mini_batch_size);
    if (c.train_batch_size % c.critic.ppo_mini_batch_size != 0)
      critic.fail("ppo_mini_batch_size",
                  fmt::format("must divide data.train_batch_size {} (got {})", c.train_batch_size,
                              c.critic.ppo_mini_batch_size));
    c.critic.ppo_micro_batch_size =
        positive_or(critic, "ppo_micro_batch_size", c.actor.ppo_micro_batch_size);
    c.critic.ppo_max_token_len =
        positive_or(critic, "ppo_max_token_len", c.actor.ppo_max_token_len, 0);
    c.critic.cliprange_value = critic.get_in_range("cliprange_value", 0.0, 1e6, 0.5);
  } else if (root.has("critic")) {
    root.fail("critic", "only the gae estimator (PPO) uses a critic");
  }

  const ConfigNode bal = root.child_or_empty("balancer");
  c.balancer.planner = bal.get<std::string>("planner", c.balancer.planner);
  try {
    (void)planner_kind(c.balancer.planner);
  } catch (const std::exception&) {
    bal.fail("planner", fmt::format("must be none, step_ema, step_oracle or foresight (got '{}')",
                                    c.balancer.planner));
  }
  c.balancer.replica_slots = positive_or(bal, "replica_slots", c.balancer.replica_slots, 0);
  c.balancer.nodes = positive_or(bal, "nodes", c.balancer.nodes);
  c.balancer.ema_decay = bal.get_in_range("ema_decay", 0.0, 0.999, c.balancer.ema_decay);
  const std::string transfer = bal.get<std::string>("transfer", "split");
  if (transfer == "split")
    c.balancer.transfer = PathPolicy::split;
  else if (transfer == "direct_only")
    c.balancer.transfer = PathPolicy::direct_only;
  else if (transfer == "cpu_only")
    c.balancer.transfer = PathPolicy::cpu_only;
  else
    bal.fail("transfer",
             fmt::format("must be split, direct_only or cpu_only (got '{}')", transfer));

  const ConfigNode tr = root.child_or_empty("trainer");
  c.trainer.seed = tr.get<uint64_t>("seed", c.trainer.seed);
  c.trainer.total_steps = positive_or(tr, "total_steps", c.trainer.total_steps, 0);
  c.trainer.eval_every = positive_or(tr, "eval_every", c.trainer.eval_every, 0);
  c.trainer.eval_examples = positive_or(tr, "eval_examples", c.trainer.eval_examples);
  c.trainer.checkpoint_every = positive_or(tr, "checkpoint_every", 0, 0);
  c.trainer.run_dir = tr.get<std::string>("run_dir", c.trainer.run_dir);
  if (c.trainer.run_dir.empty()) tr.fail("run_dir", "must not be empty");
  c.trainer.save_traces = tr.get<bool>("save_traces", c.trainer.save_traces);
  c.trainer.ranks = positive_or(tr, "ranks", c.trainer.ranks);
  c.trainer.comm_timeout_s =
      tr.get_in_range("comm_timeout_s", 1.0, 86400.0, c.trainer.comm_timeout_s);
  if (const std::string why = c.rank_count_problem(c.trainer.ranks); !why.empty())
    tr.fail("ranks", why);
  c.trainer.precision = tr.get<std::string>("precision", c.trainer.precision);
  if (c.trainer.precision != "f32" && c.trainer.precision != "bf16")
    tr.fail("precision", fmt::format("must be f32 or bf16 (got '{}')", c.trainer.precision));
  root.finish();

  if (c.init_checkpoint.empty() && !c.init_sft.empty()) {
    std::string sft_origin;
    resolve_config(c.init_sft, &sft_origin);  // fails naming it when unknown
  }
  check_tokenizer_and_template(root, c.tokenizer, c.prompt_template, c.model.vocab_size);
  return c;
}

std::string RlRunConfig::rank_count_problem(int64_t ranks) const {
  auto fails = [&](int64_t n, const char* key) {
    return n % ranks != 0 ? fmt::format("{} ranks must divide {} = {}", ranks, key, n)
                          : std::string();
  };
  for (const std::string& why :
       {fails(train_batch_size, "data.train_batch_size"),
        fails(actor.ppo_mini_batch_size, "actor.ppo_mini_batch_size"),
        fails(model.n_experts, "the model's n_experts"),
        has_critic ? fails(critic.ppo_mini_batch_size, "critic.ppo_mini_batch_size") : "",
        has_critic ? fails(critic.model.n_experts, "the critic's n_experts") : ""})
    if (!why.empty()) return why + " (each rank takes an equal share)";
  if (ranks % balancer.nodes != 0)
    return fmt::format("balancer.nodes {} must divide the {} ranks (nodes of equal size)",
                       balancer.nodes, ranks);
  return {};
}

bool RlRunConfig::critic_replays_routing() const {
  return has_critic && critic.model.n_moe_layers() == model.n_moe_layers() &&
         critic.model.n_experts == model.n_experts && critic.model.top_k == model.top_k;
}

RlRunConfig RlRunConfig::load(const std::string& name_or_path) {
  std::string origin;
  const std::string text = resolve_config(name_or_path, &origin);
  return parse(text, origin);
}

}  // namespace fm
