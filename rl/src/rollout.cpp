#include "rl/rollout.h"

#include <cmath>

#include "engine/error.h"
#include "rl/task_eval.h"

namespace fm {

std::vector<RolloutSample> rollout(MoeTransformer& model, const Tokenizer& tokenizer,
                                   const PromptTemplate& prompt_template, const Task& task,
                                   const RolloutRequest& req, GenerationConfig config) {
  FM_CHECK(req.prompts > 0 && req.samples > 0, "rollout: {} prompts x {} samples", req.prompts,
           req.samples);
  stop_on_eos(config, tokenizer);
  std::vector<RolloutSample> out;
  std::vector<std::vector<int32_t>> prompts;
  for (int64_t p = 0; p < req.prompts; ++p) {
    const TaskExample e = task.example(req.first_example + static_cast<uint64_t>(p));
    const std::vector<int32_t> ids = prompt_template.encode_prompt(tokenizer, e.prompt);
    for (int64_t s = 0; s < req.samples; ++s) {
      RolloutSample r;
      r.group = p;
      r.example = e;
      out.push_back(std::move(r));
      prompts.push_back(ids);
    }
  }
  std::vector<GeneratedSequence> seqs = generate(model, prompts, config);
  for (size_t i = 0; i < out.size(); ++i) {
    out[i].sequence = std::move(seqs[i]);
    out[i].response = decode_response(tokenizer, out[i].sequence);
  }
  return out;
}

void score_samples(const Task& task, std::vector<RolloutSample>& samples) {
  for (RolloutSample& s : samples) s.reward = task.score(s.response, s.example.answer);
}

PackedSamples pack_samples(const std::vector<RolloutSample>& samples, size_t begin, size_t end) {
  FM_CHECK(begin < end && end <= samples.size(), "pack_samples: range [{}, {}) of {} samples",
           begin, end, samples.size());
  std::vector<size_t> indices;
  for (size_t i = begin; i < end; ++i) indices.push_back(i);
  return pack_samples(samples, indices);
}

PackedSamples pack_samples(const std::vector<RolloutSample>& samples,
                           const std::vector<size_t>& indices) {
  FM_CHECK(!indices.empty(), "pack_samples: no samples");
  PackedSamples p;
  p.batch.seq_offsets.push_back(0);
  p.routes.seq_offsets.push_back(0);
  for (size_t i : indices) {
    FM_CHECK(i < samples.size(), "pack_samples: sample {} of {}", i, samples.size());
    const GeneratedSequence& s = samples[i].sequence;
    const int64_t P = static_cast<int64_t>(s.prompt.size());
    const int64_t R = static_cast<int64_t>(s.response.size());
    FM_CHECK(R > 0 && s.routes.tokens() == P + R,
             "pack_samples: sample {} has {} prompt + {} response tokens but a trace of {}", i, P,
             R, s.routes.tokens());
    Batch& b = p.batch;
    b.tokens.insert(b.tokens.end(), s.prompt.begin(), s.prompt.end());
    b.tokens.insert(b.tokens.end(), s.response.begin(), s.response.end());
    for (int64_t t = 0; t < P + R; ++t) {
      const bool response_target = t >= P - 1 && t < P + R - 1;
      b.targets.push_back(response_target ? s.response[t - (P - 1)] : -1);
      p.response_mask.push_back(response_target ? 1 : 0);
      p.rollout_logp.push_back(response_target ? s.model_logp[t - (P - 1)] : 0.0);
    }
    b.seq_offsets.push_back(b.size());
    if (p.routes.seq_offsets.size() == 1) {
      p.routes.n_moe_layers = s.routes.n_moe_layers;
      p.routes.top_k = s.routes.top_k;
      p.routes.n_experts = s.routes.n_experts;
    }
    p.routes.ids.insert(p.routes.ids.end(), s.routes.ids.begin(), s.routes.ids.end());
    p.routes.seq_offsets.push_back(b.size());
  }
  return p;
}

const ForwardResult& recompute(MoeTransformer& model, const PackedSamples& packed,
                               const std::vector<LayerPlacement>* placements) {
  return model.forward(packed.batch,
                       {.replay = &packed.routes, .training = false, .placements = placements});
}

double max_logprob_gap(const PackedSamples& packed, const std::vector<double>& logp) {
  FM_CHECK(logp.size() == packed.response_mask.size(),
           "max_logprob_gap: {} log-probs for {} positions", logp.size(),
           packed.response_mask.size());
  double gap = 0.0;
  for (size_t t = 0; t < logp.size(); ++t)
    if (packed.response_mask[t]) gap = std::max(gap, std::abs(logp[t] - packed.rollout_logp[t]));
  return gap;
}

}  // namespace fm
