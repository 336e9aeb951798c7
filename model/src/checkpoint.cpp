#include "model/checkpoint.h"

#include <unistd.h>

#include <algorithm>
#include <filesystem>

#include "engine/checksum.h"
#include "engine/config.h"
#include "engine/error.h"
#include "engine/files.h"
#include "engine/safetensors.h"

#ifndef FOREMOE_GIT_REVISION
#define FOREMOE_GIT_REVISION "unknown"
#endif

namespace fm {

namespace fs = std::filesystem;
static constexpr int kFormatVersion = 1;
static const char* const kFiles[] = {"model.safetensors", "optimizer.safetensors",
                                     "state.safetensors"};

nlohmann::json model_config_json(const ModelConfig& c) {
  const RouterBalanceConfig& b = c.balance;
  return {
      {"name", c.name},
      {"vocab_size", c.vocab_size},
      {"hidden", c.hidden},
      {"n_layers", c.n_layers},
      {"n_heads", c.n_heads},
      {"n_kv_heads", c.n_kv_heads},
      {"head_dim", c.head_dim},
      {"rope_theta", c.rope_theta},
      {"rms_eps", c.rms_eps},
      {"qk_norm", c.qk_norm},
      {"n_experts", c.n_experts},
      {"top_k", c.top_k},
      {"moe_ffn", c.moe_ffn},
      {"n_shared_experts", c.n_shared_experts},
      {"shared_ffn", c.shared_ffn},
      {"first_k_dense", c.first_k_dense},
      {"dense_ffn", c.dense_ffn},
      {"norm_topk_prob", c.norm_topk_prob},
      {"router_score", c.router_score},
      {"tie_embeddings", c.tie_embeddings},
      {"head", c.head},
      {"max_seq_len", c.max_seq_len},
      {"init_std", c.init_std},
      {"router_balance",
       {{"method", balance_method_name(b.method)},
        {"alpha", b.alpha},
        {"bias_rate", b.bias_rate},
        {"potential", b.potential == PhiPotential::l2 ? "l2" : "neg_entropy"},
        {"eta", b.eta},
        {"eta_weights", b.eta_weights_new ? "new" : "old"}}},
  };
}

ModelConfig model_config_from_json(const nlohmann::json& j, const std::string& origin) {
  FM_CHECK(j.is_object(), "{}: the model config must be a JSON object", origin);
  // JSON is YAML: the config goes through the one validating loader.
  const ConfigNode root = ConfigNode::parse(nlohmann::json{{"model", j}}.dump(), origin);
  const ConfigNode node = root.child("model");
  ModelConfig c = ModelConfig::from_yaml(node);
  root.finish();
  return c;
}

static Tensor host_f64(const std::vector<double>& v) {
  Tensor t = Tensor::empty({static_cast<int64_t>(v.size())}, DType::f64);
  std::copy(v.begin(), v.end(), t.data<double>());
  return t;
}

static Tensor host_i64(const std::vector<int64_t>& v) {
  Tensor t = Tensor::empty({static_cast<int64_t>(v.size())}, DType::i64);
  std::copy(v.begin(), v.end(), t.data<int64_t>());
  return t;
}

// A fresh temporary directory beside `final_dir`.
static fs::path staging_dir(const fs::path& final_dir) {
  const fs::path tmp_dir = final_dir.string() + ".tmp-" + std::to_string(::getpid());
  std::error_code ec;
  fs::remove_all(tmp_dir, ec);
  make_dirs(tmp_dir.string());
  return tmp_dir;
}

// Swaps a finished staging directory into place: an existing checkpoint of the
// same name survives until the new one is whole.
static void publish_dir(const fs::path& tmp_dir, const fs::path& final_dir) {
  std::error_code ec;
  const fs::path old_dir = final_dir.string() + ".old-" + std::to_string(::getpid());
  const bool had_old = fs::exists(final_dir);
  if (had_old) fs::rename(final_dir, old_dir);
  fs::rename(tmp_dir, final_dir);
  if (had_old) fs::remove_all(old_dir, ec);
}

static nlohmann::json manifest_header(const ModelConfig& c, DType dtype, bool weights_only) {
  nlohmann::json manifest;
  manifest["format"] = "foremoe-checkpoint";
  manifest["format_version"] = kFormatVersion;
  manifest["foremoe_version"] = FOREMOE_VERSION_STRING;
  manifest["git_revision"] = FOREMOE_GIT_REVISION;
  manifest["dtype"] = dtype_name(dtype);
  manifest["weights_only"] = weights_only;
  manifest["model"] = model_config_json(c);
  return manifest;
}

// Checkpoints hold whole models; a rank of an expert-parallel model holds a shard.
static void check_single_rank(const char* what, const std::string& dir,
                              const MoeTransformer& model) {
  FM_CHECK(model.ep_world() == 1,
           "{} {}: checkpoints of an expert-parallel model ({} ranks) are not supported yet", what,
           dir, model.ep_world());
}

void save_checkpoint(const std::string& dir, MoeTransformer& model, AdamW& opt,
                     const CheckpointInfo& info) {
  check_single_rank("save_checkpoint", dir, model);
  Backend& b = model.backend();
  const fs::path final_dir(dir);
  const fs::path tmp_dir = staging_dir(final_dir);

  std::vector<NamedTensor> params, moments;
  int64_t offset = 0;
  for (const ParamSlot& p : model.params().slots()) {
    const int64_t n = shape_numel(p.shape);
    params.push_back({p.name, b.to_host(*p.slot)});
    moments.push_back(
        {"exp_avg." + p.name, b.to_host(opt.exp_avg().slice(offset, offset + n).reshape(p.shape))});
    moments.push_back({"exp_avg_sq." + p.name,
                       b.to_host(opt.exp_avg_sq().slice(offset, offset + n).reshape(p.shape))});
    offset += n;
  }
  std::vector<NamedTensor> state;
  const auto& balance = model.balance_state();
  for (size_t l = 0; l < balance.size(); ++l) {
    const std::string p = "router_balance." + std::to_string(l) + ".";
    state.push_back({p + "bias", host_f64(balance[l].bias)});
    state.push_back({p + "ema", host_f64(balance[l].ema)});
    state.push_back({p + "step_load", host_i64(balance[l].step_load)});
    state.push_back({p + "step_prob_sum", host_f64(balance[l].step_prob_sum)});
    state.push_back({p + "step_tokens", host_i64({balance[l].step_tokens})});
  }
  write_safetensors((tmp_dir / kFiles[0]).string(), params);
  write_safetensors((tmp_dir / kFiles[1]).string(), moments);
  write_safetensors((tmp_dir / kFiles[2]).string(), state);

  nlohmann::json manifest = manifest_header(model.config(), model.dtype(), false);
  manifest["step"] = info.step;
  manifest["optimizer"] = {{"steps_taken", opt.steps_taken()},
                           {"steps_skipped", opt.steps_skipped()}};
  manifest["rng"] = nlohmann::json::array();
  for (const RngState& r : info.rngs)
    manifest["rng"].push_back(
        {{"name", r.name}, {"seed", r.seed}, {"stream", r.stream}, {"offset", r.offset}});
  manifest["run"] = info.run;
  for (const char* f : kFiles) manifest["sha256"][f] = sha256_file((tmp_dir / f).string());
  write_file_atomic((tmp_dir / "manifest.json").string(), manifest.dump(2) + "\n");
  publish_dir(tmp_dir, final_dir);
}

void save_weights_with(const std::string& dir, const ModelConfig& config,
                       const std::function<void(const std::string& path)>& write_params,
                       const nlohmann::json& extra) {
  FM_CHECK(extra.is_object(), "save_weights {}: extra manifest entries must be a JSON object", dir);
  const fs::path final_dir(dir);
  const fs::path tmp_dir = staging_dir(final_dir);
  try {
    write_params((tmp_dir / kFiles[0]).string());
  } catch (...) {
    std::error_code ec;
    fs::remove_all(tmp_dir, ec);  // a failed import leaves nothing behind
    throw;
  }
  nlohmann::json manifest = manifest_header(config, DType::f32, true);
  for (auto it = extra.begin(); it != extra.end(); ++it) manifest[it.key()] = it.value();
  manifest["sha256"][kFiles[0]] = sha256_file((tmp_dir / kFiles[0]).string());
  write_file_atomic((tmp_dir / "manifest.json").string(), manifest.dump(2) + "\n");
  publish_dir(tmp_dir, final_dir);
}

void save_weights(const std::string& dir, MoeTransformer& model, const nlohmann::json& extra) {
  check_single_rank("save_weights", dir, model);
  FM_CHECK(model.dtype() == DType::f32, "save_weights {}: the model is {}, checkpoints hold f32",
           dir, dtype_name(model.dtype()));
  save_weights_with(
      dir, model.config(),
      [&model](const std::string& path) {
        std::vector<NamedTensor> params;
        for (const ParamSlot& p : model.params().slots())
          params.push_back({p.name, model.backend().to_host(*p.slot)});
        write_safetensors(path, params);
      },
      extra);
}

template <class T>
static T manifest_get(const nlohmann::json& j, const std::string& key, const std::string& file) {
  FM_CHECK(j.contains(key), "{}: missing key '{}'", file, key);
  try {
    return j.at(key).get<T>();
  } catch (const nlohmann::json::exception& e) {
    throw Error(fmt::format("{}: key '{}' has the wrong type ({})", file, key, e.what()));
  }
}

static std::vector<double> read_f64(const SafetensorsFile& f, const std::string& name, size_t n) {
  Tensor t = Tensor::empty({static_cast<int64_t>(n)}, DType::f64);
  f.load_into(name, t);
  return std::vector<double>(t.data<double>(), t.data<double>() + n);
}

static std::vector<int64_t> read_i64(const SafetensorsFile& f, const std::string& name, size_t n) {
  Tensor t = Tensor::empty({static_cast<int64_t>(n)}, DType::i64);
  f.load_into(name, t);
  return std::vector<int64_t>(t.data<int64_t>(), t.data<int64_t>() + n);
}

// manifest.json of a checkpoint directory, checked for format and version.
static nlohmann::json read_manifest(const fs::path& d, const std::string& manifest_path) {
  FM_CHECK(fs::is_directory(d), "checkpoint {}: not a directory", d.string());
  nlohmann::json manifest;
  try {
    manifest = nlohmann::json::parse(read_file(manifest_path));
  } catch (const nlohmann::json::exception& e) {
    throw Error(fmt::format("{}: not valid JSON ({})", manifest_path, e.what()));
  }
  FM_CHECK(manifest.is_object(), "{}: expected a JSON object", manifest_path);
  FM_CHECK(manifest_get<std::string>(manifest, "format", manifest_path) == "foremoe-checkpoint",
           "{}: not a foremoe checkpoint manifest", manifest_path);
  const int version = manifest_get<int>(manifest, "format_version", manifest_path);
  FM_CHECK(version == kFormatVersion, "{}: format_version {} is not supported (expected {})",
           manifest_path, version, kFormatVersion);
  FM_CHECK(manifest.contains("model") && manifest["model"].is_object(),
           "{}: missing the 'model' config object", manifest_path);
  FM_CHECK(!manifest.contains("weights_only") || manifest["weights_only"].is_boolean(),
           "{}: key 'weights_only' must be true or false", manifest_path);
  return manifest;
}

static bool is_weights_only(const nlohmann::json& manifest) {
  return manifest.value("weights_only", false);
}

// Checks dtype, then the SHA-256 of each listed file against the manifest.
static void verify_files(const fs::path& d, const nlohmann::json& manifest,
                         const std::string& manifest_path, DType dtype,
                         const std::vector<std::string>& files) {
  FM_CHECK(manifest_get<std::string>(manifest, "dtype", manifest_path) == dtype_name(dtype),
           "{}: checkpoint dtype {} differs from the model's {}", manifest_path,
           manifest["dtype"].dump(), dtype_name(dtype));
  FM_CHECK(manifest.contains("sha256") && manifest["sha256"].is_object(),
           "{}: missing the 'sha256' table", manifest_path);
  for (const std::string& f : files) {
    const std::string path = (d / f).string();
    const std::string want = manifest_get<std::string>(manifest["sha256"], f, manifest_path);
    FM_CHECK(fs::exists(path), "checkpoint {}: missing file {}", d.string(), f);
    const std::string got = sha256_file(path);
    FM_CHECK(got == want, "{}: checksum mismatch (manifest {}, file {}): the file is corrupt", path,
             want, got);
  }
}

// The stored config must equal the model's in every key except those in `free`.
static void check_config(const nlohmann::json& manifest, const std::string& manifest_path,
                         const ModelConfig& c, const std::vector<std::string>& free) {
  const nlohmann::json want_config = model_config_json(c);
  const nlohmann::json& have_config = manifest["model"];
  for (auto it = want_config.begin(); it != want_config.end(); ++it) {
    if (std::find(free.begin(), free.end(), it.key()) != free.end()) continue;
    // Checkpoints written before the value head existed are LM models.
    if (it.key() == "head" && !have_config.contains("head") && it.value() == "lm") continue;
    FM_CHECK(have_config.contains(it.key()) && have_config[it.key()] == it.value(),
             "{}: model.{} is {} in the checkpoint but {} in the current config", manifest_path,
             it.key(), have_config.contains(it.key()) ? have_config[it.key()].dump() : "absent",
             it.value().dump());
  }
}

static void load_params(const SafetensorsFile& params, MoeTransformer& model) {
  for (const ParamSlot& p : model.params().slots()) {
    Tensor host = Tensor::empty(p.shape, model.dtype());
    params.load_into(p.name, host);
    model.backend().copy(*p.slot, host);
  }
}

static void load_balance_state(const SafetensorsFile& state, MoeTransformer& model) {
  auto& balance = model.balance_state();
  const size_t E = static_cast<size_t>(model.config().n_experts);
  for (size_t l = 0; l < balance.size(); ++l) {
    const std::string p = "router_balance." + std::to_string(l) + ".";
    balance[l].bias = read_f64(state, p + "bias", E);
    balance[l].ema = read_f64(state, p + "ema", E);
    balance[l].step_load = read_i64(state, p + "step_load", E);
    balance[l].step_prob_sum = read_f64(state, p + "step_prob_sum", E);
    balance[l].step_tokens = read_i64(state, p + "step_tokens", 1)[0];
  }
}

CheckpointInfo load_checkpoint(const std::string& dir, MoeTransformer& model, AdamW& opt) {
  check_single_rank("load_checkpoint", dir, model);
  Backend& b = model.backend();
  const fs::path d(dir);
  const std::string manifest_path = (d / "manifest.json").string();
  const nlohmann::json manifest = read_manifest(d, manifest_path);
  FM_CHECK(!is_weights_only(manifest),
           "checkpoint {} is weights-only (no optimizer state, e.g. a Hugging Face import): it "
           "cannot resume a run; start from it instead (load_weights)",
           dir);
  verify_files(d, manifest, manifest_path, model.dtype(),
               std::vector<std::string>(std::begin(kFiles), std::end(kFiles)));
  check_config(manifest, manifest_path, model.config(), {});

  const SafetensorsFile params = SafetensorsFile::open((d / kFiles[0]).string());
  const SafetensorsFile moments = SafetensorsFile::open((d / kFiles[1]).string());
  const SafetensorsFile state = SafetensorsFile::open((d / kFiles[2]).string());
  load_params(params, model);
  int64_t offset = 0;
  for (const ParamSlot& p : model.params().slots()) {
    const int64_t n = shape_numel(p.shape);
    Tensor host = Tensor::empty(p.shape, model.dtype());
    moments.load_into("exp_avg." + p.name, host);
    Tensor m = opt.exp_avg().slice(offset, offset + n).reshape(p.shape);
    b.copy(m, host);
    moments.load_into("exp_avg_sq." + p.name, host);
    Tensor v = opt.exp_avg_sq().slice(offset, offset + n).reshape(p.shape);
    b.copy(v, host);
    offset += n;
  }
  load_balance_state(state, model);

  CheckpointInfo info;
  info.step = manifest_get<int64_t>(manifest, "step", manifest_path);
  FM_CHECK(manifest.contains("optimizer") && manifest["optimizer"].is_object(),
           "{}: missing the 'optimizer' object", manifest_path);
  const nlohmann::json& o = manifest["optimizer"];
  opt.set_counters(manifest_get<int64_t>(o, "steps_taken", manifest_path),
                   manifest_get<int64_t>(o, "steps_skipped", manifest_path));
  FM_CHECK(manifest.contains("rng") && manifest["rng"].is_array(), "{}: missing the 'rng' list",
           manifest_path);
  for (const nlohmann::json& r : manifest["rng"])
    info.rngs.push_back({manifest_get<std::string>(r, "name", manifest_path),
                         manifest_get<uint64_t>(r, "seed", manifest_path),
                         manifest_get<uint64_t>(r, "stream", manifest_path),
                         manifest_get<uint64_t>(r, "offset", manifest_path)});
  info.run = manifest.value("run", nlohmann::json::object());
  return info;
}

ModelConfig load_checkpoint_config(const std::string& dir) {
  const fs::path d(dir);
  const std::string manifest_path = (d / "manifest.json").string();
  const nlohmann::json manifest = read_manifest(d, manifest_path);
  return model_config_from_json(manifest["model"], manifest_path);
}

void load_weights(const std::string& dir, MoeTransformer& model) {
  check_single_rank("load_weights", dir, model);
  const fs::path d(dir);
  const std::string manifest_path = (d / "manifest.json").string();
  const nlohmann::json manifest = read_manifest(d, manifest_path);
  const bool weights_only = is_weights_only(manifest);
  std::vector<std::string> files = {kFiles[0]};
  if (!weights_only) files.push_back(kFiles[2]);
  verify_files(d, manifest, manifest_path, model.dtype(), files);
  check_config(manifest, manifest_path, model.config(),
               {"name", "max_seq_len", "init_std", "router_balance"});
  load_params(SafetensorsFile::open((d / kFiles[0]).string()), model);
  const nlohmann::json& stored = manifest["model"];
  if (!weights_only && stored.contains("router_balance") &&
      stored["router_balance"] == model_config_json(model.config())["router_balance"])
    load_balance_state(SafetensorsFile::open((d / kFiles[2]).string()), model);
}

}  // namespace fm
