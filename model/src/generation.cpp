#include "model/generation.h"

#include <algorithm>
#include <exception>
#include <string>

#include "engine/collectives.h"
#include "engine/comm.h"
#include "engine/config.h"
#include "engine/error.h"
#include "engine/rng.h"

namespace fm {

// Random streams of generation: sequence i uses stream kGenerationStream + first_stream + i.
static constexpr uint64_t kGenerationStream = uint64_t{0x67656e} << 32;

GenerationConfig GenerationConfig::from_yaml(const ConfigNode& n) {
  GenerationConfig c;
  c.sampling = SamplingConfig::from_yaml(n);
  c.max_new_tokens = n.get<int64_t>("max_new_tokens", c.max_new_tokens);
  if (c.max_new_tokens < 1) n.fail("max_new_tokens", "must be >= 1");
  c.batch_slots = n.get<int64_t>("batch_slots", c.batch_slots);
  if (c.batch_slots < 1) n.fail("batch_slots", "must be >= 1");
  c.seed = n.get<uint64_t>("seed", c.seed);
  return c;
}

namespace {

struct LiveSequence {
  int64_t index;           // into prompts / results
  int32_t slot;            // KV-cache slot
  int64_t fed = 0;         // tokens already in the cache
  int64_t cap = 0;         // most response tokens allowed
  bool finishing = false;  // sampled its last token; that token still needs feeding
  std::vector<int32_t> tokens;
  std::vector<uint16_t> routes;  // [tokens fed, n_moe, K]
  Rng rng;
};

}  // namespace

// Checks the config and prompts; returns the KV-cache length they need (at least 1).
static int64_t validate_generation(const ModelConfig& c,
                                   const std::vector<std::vector<int32_t>>& prompts,
                                   const GenerationConfig& cfg) {
  const int64_t P = static_cast<int64_t>(prompts.size()), V = c.vocab_size;
  FM_CHECK(cfg.max_new_tokens >= 1, "generate: max_new_tokens must be >= 1");
  FM_CHECK(cfg.batch_slots >= 1, "generate: batch_slots must be >= 1");
  for (int32_t t : cfg.stop_tokens)
    FM_CHECK(t >= 0 && t < V, "generate: stop token {} is outside the vocabulary [0, {})", t, V);
  int64_t max_len = 1;
  for (int64_t i = 0; i < P; ++i) {
    const std::vector<int32_t>& p = prompts[i];
    FM_CHECK(!p.empty(), "generate: prompt {} is empty", i);
    FM_CHECK(static_cast<int64_t>(p.size()) < c.max_seq_len,
             "generate: prompt {} has {} tokens, leaving no room below max_seq_len {}", i, p.size(),
             c.max_seq_len);
    for (size_t n = 0; n < p.size(); ++n)
      FM_CHECK(p[n] >= 0 && p[n] < V, "generate: prompt {} token {} = {} is outside [0, {})", i, n,
               p[n], V);
    max_len = std::max(max_len, std::min<int64_t>(c.max_seq_len, static_cast<int64_t>(p.size()) +
                                                                     cfg.max_new_tokens));
  }
  return max_len;
}

// Under expert parallelism every rank learns whether every rank's prompts and config are
// valid before any decode step, so that a bad rank throws its own error and the others one
// naming it, instead of waiting for it in the first all-to-all.
static int64_t validate_on_every_rank(Communicator& comm, const ModelConfig& c,
                                      const std::vector<std::vector<int32_t>>& prompts,
                                      const GenerationConfig& cfg) {
  std::string error;
  int64_t max_len = 1;
  try {
    max_len = validate_generation(c, prompts, cfg);
  } catch (const std::exception& e) {
    error = e.what();
  }
  const int failed = first_rank_with(&comm, !error.empty());
  if (!error.empty()) throw Error(error);
  FM_CHECK(failed < 0,
           "generate: rank {} rejected its prompts or generation config (its error names the "
           "problem), so rank {} stops too",
           failed, comm.rank());
  return max_len;
}

std::vector<GeneratedSequence> generate(MoeTransformer& model,
                                        const std::vector<std::vector<int32_t>>& prompts,
                                        const GenerationConfig& cfg, GenerationStats* stats) {
  const ModelConfig& c = model.config();
  Backend& b = model.backend();
  const int64_t P = static_cast<int64_t>(prompts.size());
  const int64_t per_token = c.n_moe_layers() * c.top_k;
  Communicator* comm = model.ep_world() > 1 ? model.ep_comm() : nullptr;
  const int64_t max_len = comm != nullptr ? validate_on_every_rank(*comm, c, prompts, cfg)
                                          : validate_generation(c, prompts, cfg);
  std::vector<GeneratedSequence> out(static_cast<size_t>(P));
  if (P == 0 && comm == nullptr) return out;

  // Under EP a rank without prompts still serves its peers' steps: one slot for the
  // throw-away token.
  const int64_t S = std::max<int64_t>(1, std::min(cfg.batch_slots, P));
  KvCache cache(c, b, model.compute_dtype(), S, max_len);
  GenerationStats st;
  st.kv_cache_bytes = cache.bytes();
  std::vector<int32_t> free_slots;
  for (int64_t s = S - 1; s >= 0; --s) free_slots.push_back(static_cast<int32_t>(s));
  std::vector<LiveSequence> live;
  int64_t next = 0;
  CachedInput in;
  CachedOutput fwd;

  // Under EP the ranks step in lockstep until no rank has work left.
  auto work_left = [&] {
    int64_t left = next < P || !live.empty() ? 1 : 0;
    if (comm != nullptr) comm->all_reduce(&left, 1, DType::i64, ReduceOp::max);
    return left != 0;
  };
  while (work_left()) {
    while (next < P && !free_slots.empty()) {
      LiveSequence q{
          next,  free_slots.back(),
          0,     0,
          false, prompts[next],
          {},    Rng(cfg.seed, kGenerationStream + cfg.first_stream + static_cast<uint64_t>(next))};
      q.cap = std::min<int64_t>(cfg.max_new_tokens,
                                c.max_seq_len - static_cast<int64_t>(q.tokens.size()));
      free_slots.pop_back();
      live.push_back(std::move(q));
      ++next;
    }
    if (live.empty()) {
      // EP only (the loop ends otherwise): no live sequence here, but the peers' MoE layers
      // need this rank's all-to-alls. Every slot is free and no prompt is left, so a
      // throw-away token at slot 0 position 0 is never attended to; its expert rows enter no
      // other row's math, so it changes no result.
      in = CachedInput{{0}, {0}, {0}, {}};
      model.forward_cached(in, cache, fwd);
      ++st.steps;
      ++st.idle_steps;
      continue;
    }
    // One step: every live sequence's unfed tokens; logits after the last one unless finishing.
    in = CachedInput{};
    std::vector<int64_t> first_row(live.size());
    for (size_t i = 0; i < live.size(); ++i) {
      LiveSequence& q = live[i];
      first_row[i] = static_cast<int64_t>(in.tokens.size());
      const int64_t total = static_cast<int64_t>(q.tokens.size());
      for (int64_t n = q.fed; n < total; ++n) {
        in.tokens.push_back(q.tokens[n]);
        in.slot.push_back(q.slot);
        in.pos.push_back(static_cast<int32_t>(n));
      }
      const int64_t prompt_len = static_cast<int64_t>(prompts[q.index].size());
      const int64_t fed_now = total - q.fed;
      const int64_t prompt_now = std::max<int64_t>(0, std::min(total, prompt_len) - q.fed);
      st.prefill_tokens += prompt_now;
      st.decode_tokens += fed_now - prompt_now;
      if (!q.finishing) in.logit_rows.push_back(static_cast<int32_t>(in.tokens.size() - 1));
    }
    model.forward_cached(in, cache, fwd, /*defer_routes=*/true);
    ++st.steps;
    // Each sampling row's uniform from its own sequence's stream, then every row sampled at
    // once (on the device where the backend can: only the tokens come back).
    std::vector<double> u;
    for (LiveSequence& q : live)
      if (!q.finishing) u.push_back(q.rng.next_double());
    const std::vector<SampledToken> sampled = sample_rows(b, fwd.logits, u, cfg.sampling);
    model.finish_cached(fwd);  // the routes (the device is idle by now: no wait)

    size_t logit_row = 0;
    std::vector<LiveSequence> still_live;
    for (size_t i = 0; i < live.size(); ++i) {
      LiveSequence& q = live[i];
      const int64_t total = static_cast<int64_t>(q.tokens.size());
      q.routes.insert(q.routes.end(), fwd.routes.begin() + first_row[i] * per_token,
                      fwd.routes.begin() + (first_row[i] + total - q.fed) * per_token);
      q.fed = total;
      GeneratedSequence& g = out[static_cast<size_t>(q.index)];
      if (q.finishing) {  // its last token is now in the trace: done
        g.prompt = prompts[q.index];
        g.response.assign(q.tokens.begin() + static_cast<int64_t>(g.prompt.size()), q.tokens.end());
        g.routes.n_moe_layers = c.n_moe_layers();
        g.routes.top_k = c.top_k;
        g.routes.n_experts = c.n_experts;
        g.routes.seq_offsets = {0, total};
        g.routes.ids = std::move(q.routes);
        free_slots.push_back(q.slot);
        continue;
      }
      const SampledToken& t = sampled[logit_row++];
      q.tokens.push_back(t.id);
      g.logp.push_back(t.logp);
      g.model_logp.push_back(t.model_logp);
      g.stopped =
          std::find(cfg.stop_tokens.begin(), cfg.stop_tokens.end(), t.id) != cfg.stop_tokens.end();
      q.finishing = g.stopped || static_cast<int64_t>(g.logp.size()) >= q.cap;
      still_live.push_back(std::move(q));
    }
    live = std::move(still_live);
  }
  if (stats != nullptr) *stats = st;
  return out;
}

RoutingTrace pack_traces(const std::vector<GeneratedSequence>& sequences) {
  RoutingTrace t;
  t.seq_offsets = {0};
  for (const GeneratedSequence& g : sequences) {
    if (t.seq_offsets.size() == 1) {
      t.n_moe_layers = g.routes.n_moe_layers;
      t.top_k = g.routes.top_k;
      t.n_experts = g.routes.n_experts;
    }
    FM_CHECK(g.routes.n_moe_layers == t.n_moe_layers && g.routes.top_k == t.top_k &&
                 g.routes.n_experts == t.n_experts,
             "pack_traces: sequences come from different model shapes");
    t.ids.insert(t.ids.end(), g.routes.ids.begin(), g.routes.ids.end());
    t.seq_offsets.push_back(t.seq_offsets.back() + g.routes.tokens());
  }
  return t;
}

}  // namespace fm
