// `foremoe generate`: batched sampling from a checkpoint, with the routing trace
// of every prompt and response token optionally written to a trace file.
#include <fmt/format.h>
#include <omp.h>

#include <chrono>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>

#include "engine/backend.h"
#include "engine/error.h"
#include "engine/files.h"
#include "model/checkpoint.h"
#include "model/generation.h"
#include "model/trace_io.h"
#include "rl/sft_trainer.h"
#include "rl/task_eval.h"
#include "rl/tasks/task_config.h"
#include "tools/foremoe/commands.h"
#include "tools/foremoe/jobs.h"

namespace fm::cli {

struct GenerateArgs {
  std::string checkpoint;
  std::vector<std::string> prompts;
  std::string prompts_file;
  std::string task;
  int64_t n = 0;
  int64_t samples = 1;
  std::string tokenizer;
  std::string prompt_template;
  GenerationConfig gen;
  std::string trace_out;
  std::string json_out;
  int threads = 0;
  bool quiet = false;
  std::string device = "cpu";
};

// One prompt per line; blank lines skipped.
static std::vector<std::string> read_prompts_file(const std::string& path) {
  std::ifstream in(path);
  FM_CHECK(in.good(), "{}: cannot open the prompts file", path);
  std::vector<std::string> out;
  for (std::string line; std::getline(in, line);)
    if (line.find_first_not_of(" \t\r") != std::string::npos) out.push_back(line);
  FM_CHECK(!out.empty(), "{}: no prompts (one per line)", path);
  return out;
}

nlohmann::json checkpoint_run_info(const std::string& dir) {
  const std::string path = dir + "/manifest.json";
  nlohmann::json m;
  try {
    m = nlohmann::json::parse(read_file(path));
  } catch (const nlohmann::json::exception& e) {
    throw Error(fmt::format("{}: not valid JSON ({})", path, e.what()));
  }
  return m.contains("run") && m["run"].is_object() ? m["run"] : nlohmann::json::object();
}

static int run_generate(GenerateArgs a) {
  if (a.threads > 0) omp_set_num_threads(a.threads);
  const nlohmann::json run = checkpoint_run_info(a.checkpoint);
  if (a.tokenizer.empty()) a.tokenizer = run.value("tokenizer", std::string("tasks"));
  if (a.prompt_template.empty()) a.prompt_template = run.value("template", std::string("plain"));
  const Tokenizer tok = load_tokenizer(a.tokenizer);
  const PromptTemplate tmpl = PromptTemplate::named(a.prompt_template);

  std::vector<std::string> texts = a.prompts;
  if (!a.prompts_file.empty()) {
    const auto more = read_prompts_file(a.prompts_file);
    texts.insert(texts.end(), more.begin(), more.end());
  }
  if (!a.task.empty()) {
    const auto task = make_task(TaskConfig::defaults(a.task));
    for (const TaskExample& e : first_held_out(*task, a.n)) texts.push_back(e.prompt);
  }
  FM_CHECK(!texts.empty(), "generate: no prompts (give --prompt, --prompts-file or --task)");

  const ModelConfig config = load_checkpoint_config(a.checkpoint);
  FM_CHECK(tok.vocab_size() <= config.vocab_size,
           "generate: tokenizer {} has {} pieces, more than the model's vocab_size {}", a.tokenizer,
           tok.vocab_size(), config.vocab_size);
  auto backend = make_backend(a.device);
  MoeTransformer model(config, *backend);
  load_weights(a.checkpoint, model);

  std::vector<std::vector<int32_t>> prompts;
  std::vector<size_t> text_of;
  for (size_t i = 0; i < texts.size(); ++i)
    for (int64_t s = 0; s < a.samples; ++s) {
      prompts.push_back(tmpl.encode_prompt(tok, texts[i]));
      text_of.push_back(i);
    }
  a.gen.stop_tokens.clear();
  stop_on_eos(a.gen, tok);
  GenerationStats st;
  const auto t0 = std::chrono::steady_clock::now();
  const std::vector<GeneratedSequence> seqs = generate(model, prompts, a.gen, &st);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  std::unique_ptr<std::ofstream> json;
  if (!a.json_out.empty()) {
    json = std::make_unique<std::ofstream>(a.json_out);
    FM_CHECK(json->good(), "{}: cannot open for writing", a.json_out);
  }
  int64_t generated = 0;
  for (size_t i = 0; i < seqs.size(); ++i) {
    const GeneratedSequence& s = seqs[i];
    const std::string response = decode_response(tok, s);
    double logp = 0.0;
    for (double x : s.logp) logp += x;
    generated += static_cast<int64_t>(s.response.size());
    if (!a.quiet)
      fmt::print("[{}] {}{}  ({} tokens, {}, logp {:.3f})\n", i, tmpl.render(texts[text_of[i]]),
                 response, s.response.size(), s.stopped ? "eos" : "length", logp);
    if (json)
      *json << nlohmann::json{{"prompt", texts[text_of[i]]},
                              {"response", response},
                              {"prompt_ids", s.prompt},
                              {"response_ids", s.response},
                              {"logp", s.logp},
                              {"model_logp", s.model_logp},
                              {"stopped", s.stopped}}
                   .dump()
            << "\n";
  }
  fmt::print(
      "{} sequences, {} tokens generated in {:.2f} s ({:.0f} tok/s), {} steps, KV cache "
      "{:.2f} MiB\n",
      seqs.size(), generated, secs, static_cast<double>(generated) / std::max(secs, 1e-9), st.steps,
      static_cast<double>(st.kv_cache_bytes) / (1 << 20));
  if (!a.trace_out.empty()) {
    const RoutingTrace trace = pack_traces(seqs);
    save_trace(a.trace_out, trace,
               trace_metadata(config, {{"checkpoint", a.checkpoint},
                                       {"task", a.task},
                                       {"samples_per_prompt", a.samples},
                                       {"seed", a.gen.seed},
                                       {"temperature", a.gen.sampling.temperature}}));
    fmt::print("routing trace: {} ({} sequences, {} tokens)\n", a.trace_out,
               trace.seq_offsets.size() - 1, trace.tokens());
  }
  return 0;
}

Runner add_generate(CLI::App& app) {
  auto* cmd = app.add_subcommand("generate", "Sample responses from a checkpoint (KV-cached)");
  auto a = std::make_shared<GenerateArgs>();
  cmd->add_option("--checkpoint", a->checkpoint, "checkpoint directory")
      ->required()
      ->check(CLI::ExistingDirectory);
  cmd->add_option("-p,--prompt", a->prompts, "a prompt (repeatable)");
  cmd->add_option("--prompts-file", a->prompts_file, "one prompt per line")
      ->check(CLI::ExistingFile);
  cmd->add_option("--task", a->task, "use an embedded task's held-out prompts (add, sort, ...)");
  cmd->add_option("-n", a->n, "with --task: how many held-out prompts (default: all)")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--samples", a->samples, "responses per prompt")->check(CLI::PositiveNumber);
  cmd->add_option("--tokenizer", a->tokenizer, "embedded name or .model (default: checkpoint's)");
  cmd->add_option("--template", a->prompt_template, "plain or chat (default: checkpoint's)");
  cmd->add_option("--max-new-tokens", a->gen.max_new_tokens)
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cmd->add_option("--temperature", a->gen.sampling.temperature, "0 = greedy")
      ->check(CLI::Range(0.0, 100.0))
      ->capture_default_str();
  cmd->add_option("--top-p", a->gen.sampling.top_p)
      ->check(CLI::Range(1e-9, 1.0))
      ->capture_default_str();
  cmd->add_option("--top-k", a->gen.sampling.top_k, "0 = off")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  cmd->add_option("--seed", a->gen.seed)->capture_default_str();
  cmd->add_option("--batch-slots", a->gen.batch_slots, "sequences decoded together")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cmd->add_option("--trace-out", a->trace_out, "write the routing trace (safetensors)");
  cmd->add_option("--json-out", a->json_out, "write one JSON object per sequence");
  cmd->add_option("--threads", a->threads, "OpenMP threads (default: all cores)")
      ->check(CLI::PositiveNumber);
  cmd->add_flag("-q,--quiet", a->quiet, "do not print every sequence");
  add_device_option(cmd, a->device);
  return [a] { return run_generate(*a); };
}

}  // namespace fm::cli
