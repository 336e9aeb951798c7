#include "model/checkpoint.h"

#include <unistd.h>

#include <algorithm>
#include <exception>
#include <filesystem>
#include <map>
#include <memory>

#include "engine/checksum.h"
#include "engine/collectives.h"
#include "engine/comm.h"
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
static const std::vector<std::string> kAllFiles(std::begin(kFiles), std::end(kFiles));

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

// The shape in the whole model of parameter `p` of a rank of `world`: the rank holds E/W of
// an expert tensor's E experts.
static Shape whole_shape(const ParamSlot& p, int world) {
  Shape s = p.shape;
  if (p.expert) s[0] *= world;
  return s;
}

// Rank `rank`'s part of `whole`, a tensor of the whole model laid out like parameter `p`.
static Tensor rank_part(const Tensor& whole, const ParamSlot& p, int rank) {
  if (!p.expert) return whole;
  const int64_t e = p.shape[0];
  return whole.slice(rank * e, (rank + 1) * e);
}

// A tensor of model.safetensors or optimizer.safetensors as this rank holds it (on the
// backend): parameter `param`'s values or one of its AdamW moments.
struct ArenaTensor {
  std::string name;
  const ParamSlot* param;
  Tensor part;
};

// Sorts `tensors` (stable) into file order: the single-rank arena order of their parameters
// (an expert-parallel arena puts the expert tensors last).
static void sort_single_rank_order(const ModelConfig& c, std::vector<ArenaTensor>& tensors) {
  ModelWeights unbound;
  std::map<std::string, size_t> position;
  for (const ParamSlot& p : param_slots(c, unbound)) position.emplace(p.name, position.size());
  std::stable_sort(tensors.begin(), tensors.end(), [&](const ArenaTensor& a, const ArenaTensor& b) {
    return position.at(a.param->name) < position.at(b.param->name);
  });
}

static std::vector<ArenaTensor> param_tensors(MoeTransformer& model) {
  std::vector<ArenaTensor> out;
  for (const ParamSlot& p : model.params().slots()) out.push_back({p.name, &p, *p.slot});
  sort_single_rank_order(model.config(), out);
  return out;
}

// The moments are flat like the parameter arena.
static std::vector<ArenaTensor> moment_tensors(MoeTransformer& model, AdamW& opt) {
  std::vector<ArenaTensor> out;
  int64_t offset = 0;
  for (const ParamSlot& p : model.params().slots()) {
    const int64_t n = shape_numel(p.shape);
    out.push_back(
        {"exp_avg." + p.name, &p, opt.exp_avg().slice(offset, offset + n).reshape(p.shape)});
    out.push_back(
        {"exp_avg_sq." + p.name, &p, opt.exp_avg_sq().slice(offset, offset + n).reshape(p.shape)});
    offset += n;
  }
  sort_single_rank_order(model.config(), out);
  return out;
}

static std::vector<NamedTensor> on_host(Backend& b, const std::vector<ArenaTensor>& tensors) {
  std::vector<NamedTensor> out;
  for (const ArenaTensor& t : tensors) out.push_back({t.name, b.to_host(t.part)});
  return out;
}

// The router-balancing state (identical on every rank under expert parallelism).
static std::vector<NamedTensor> balance_tensors(MoeTransformer& model) {
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
  return state;
}

static nlohmann::json checkpoint_manifest(MoeTransformer& model, AdamW& opt,
                                          const CheckpointInfo& info) {
  nlohmann::json manifest = manifest_header(model.config(), model.dtype(), false);
  manifest["step"] = info.step;
  manifest["optimizer"] = {{"steps_taken", opt.steps_taken()},
                           {"steps_skipped", opt.steps_skipped()}};
  manifest["rng"] = nlohmann::json::array();
  for (const RngState& r : info.rngs)
    manifest["rng"].push_back(
        {{"name", r.name}, {"seed", r.seed}, {"stream", r.stream}, {"offset", r.offset}});
  manifest["run"] = info.run;
  return manifest;
}

static nlohmann::json weights_manifest(const std::string& dir, const ModelConfig& config,
                                       const nlohmann::json& extra) {
  FM_CHECK(extra.is_object(), "save_weights {}: extra manifest entries must be a JSON object", dir);
  nlohmann::json manifest = manifest_header(config, DType::f32, true);
  for (auto it = extra.begin(); it != extra.end(); ++it) manifest[it.key()] = it.value();
  return manifest;
}

// Adds the checksums of `files` to the manifest, writes it and swaps the staging directory
// into place.
static void publish_with_manifest(nlohmann::json manifest, const std::vector<std::string>& files,
                                  const fs::path& tmp_dir, const fs::path& final_dir) {
  for (const std::string& f : files) manifest["sha256"][f] = sha256_file((tmp_dir / f).string());
  write_file_atomic((tmp_dir / "manifest.json").string(), manifest.dump(2) + "\n");
  publish_dir(tmp_dir, final_dir);
}

// The whole tensor of `t` on rank 0's host, undefined on the other ranks. For an expert
// tensor a collective: rank 0 receives every other rank's experts (rank order is expert
// order), so no rank holds more than one whole tensor.
static Tensor whole_on_root(Backend& b, Communicator& comm, const ArenaTensor& t) {
  constexpr int kTag = 0x636b;  // "ck"
  const bool root = comm.rank() == 0;
  if (!t.param->expert) return root ? b.to_host(t.part) : Tensor();
  if (!root) {
    b.synchronize();  // the communicator reads device memory once queued work is done
    comm.send(t.part.raw(), t.part.numel(), t.part.dtype(), 0, kTag);
    return Tensor();
  }
  const int64_t e = t.param->shape[0];
  Tensor whole = b.empty(whole_shape(*t.param, comm.size()), t.part.dtype());
  Tensor mine = whole.slice(0, e);
  b.copy(mine, t.part);
  b.synchronize();  // ... and writes it once queued work on it is done
  for (int r = 1; r < comm.size(); ++r) {
    Tensor theirs = whole.slice(r * e, (r + 1) * e);
    comm.recv(theirs.raw(), theirs.numel(), theirs.dtype(), r, kTag);
  }
  return b.to_host(whole);
}

// A save under expert parallelism: a collective over the model's communicator. Rank 0
// writes the files of the single-rank checkpoint into a staging directory and publishes it;
// the other ranks only send it their experts, one tensor at a time. Every rank makes the
// same collectives whatever happens on rank 0: rank 0 keeps its first error instead of
// throwing, and agree() broadcasts it, so that every rank returns or every rank throws.
class EpSave {
 public:
  EpSave(const char* what, const std::string& dir, Communicator& comm)
      : what_(what), dir_(dir), comm_(comm) {
    on_root([&] { staging_.path = staging_dir(dir_); });
    agree();  // rank 0 cannot write there: no point sending it the model
  }

  // Runs `f` on rank 0 unless it has already failed.
  void on_root(const std::function<void()>& f) {
    if (comm_.rank() != 0 || !error_.empty()) return;
    try {
      f();
    } catch (const std::exception& e) {
      error_ = e.what();
    }
  }

  std::string path(const std::string& file) const { return (staging_.path / file).string(); }

  // Streams `file`: the whole tensors, laid out exactly as write_safetensors lays them out.
  void write_tensors(const std::string& file, Backend& b, const std::vector<ArenaTensor>& tensors) {
    std::vector<size_t> order(tensors.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](size_t x, size_t y) {
      return dtype_size(tensors[x].part.dtype()) > dtype_size(tensors[y].part.dtype());
    });
    std::unique_ptr<AtomicFileWriter> w;
    on_root([&] {
      nlohmann::ordered_json header = nlohmann::ordered_json::object();
      uint64_t offset = 0;
      for (size_t i : order) {
        const Shape shape = whole_shape(*tensors[i].param, comm_.size());
        const DType dtype = tensors[i].part.dtype();
        const uint64_t n = static_cast<uint64_t>(shape_numel(shape)) * dtype_size(dtype);
        header[tensors[i].name] = {{"dtype", dtype_safetensors_name(dtype)},
                                   {"shape", shape},
                                   {"data_offsets", {offset, offset + n}}};
        offset += n;
      }
      w = std::make_unique<AtomicFileWriter>(path(file));
      w->write(safetensors_prefix(header.dump()));
    });
    for (size_t i : order) {
      const Tensor whole = whole_on_root(b, comm_, tensors[i]);
      on_root([&] { w->write(whole.raw(), whole.nbytes()); });
    }
    on_root([&] { w->commit(); });
  }

  // Rank 0 adds the checksums of `files`, writes the manifest and publishes the directory;
  // then every rank learns the outcome.
  void finish(const nlohmann::json& manifest, const std::vector<std::string>& files) {
    on_root([&] {
      publish_with_manifest(manifest, files, staging_.path, dir_);
      staging_.path.clear();
    });
    agree();
  }

 private:
  void agree() {
    int64_t n = static_cast<int64_t>(error_.size());
    comm_.broadcast(&n, 1, DType::i64, 0);
    if (n == 0) return;
    std::string problem = error_;
    problem.resize(static_cast<size_t>(n));
    comm_.broadcast(problem.data(), n, DType::u8, 0);
    throw Error(fmt::format("{} {}: rank 0 could not write the checkpoint, so no rank saved it: {}",
                            what_, dir_, problem));
  }

  // Removes an unpublished staging directory, also when the constructor throws.
  struct Staging {
    fs::path path;
    ~Staging() {
      std::error_code ec;
      if (!path.empty()) fs::remove_all(path, ec);
    }
  };

  const char* what_;
  std::string dir_;
  Communicator& comm_;
  Staging staging_;
  std::string error_;  // rank 0's first error
};

void save_checkpoint(const std::string& dir, MoeTransformer& model, AdamW& opt,
                     const CheckpointInfo& info) {
  Backend& b = model.backend();
  if (model.ep_world() > 1) {
    EpSave save("save_checkpoint", dir, *model.ep_comm());
    save.write_tensors(kFiles[0], b, param_tensors(model));
    save.write_tensors(kFiles[1], b, moment_tensors(model, opt));
    save.on_root([&] { write_safetensors(save.path(kFiles[2]), balance_tensors(model)); });
    save.finish(checkpoint_manifest(model, opt, info), kAllFiles);
    return;
  }
  const fs::path final_dir(dir);
  const fs::path tmp_dir = staging_dir(final_dir);
  write_safetensors((tmp_dir / kFiles[0]).string(), on_host(b, param_tensors(model)));
  write_safetensors((tmp_dir / kFiles[1]).string(), on_host(b, moment_tensors(model, opt)));
  write_safetensors((tmp_dir / kFiles[2]).string(), balance_tensors(model));
  publish_with_manifest(checkpoint_manifest(model, opt, info), kAllFiles, tmp_dir, final_dir);
}

void save_weights_with(const std::string& dir, const ModelConfig& config,
                       const std::function<void(const std::string& path)>& write_params,
                       const nlohmann::json& extra) {
  const nlohmann::json manifest = weights_manifest(dir, config, extra);
  const fs::path final_dir(dir);
  const fs::path tmp_dir = staging_dir(final_dir);
  try {
    write_params((tmp_dir / kFiles[0]).string());
  } catch (...) {
    std::error_code ec;
    fs::remove_all(tmp_dir, ec);  // a failed import leaves nothing behind
    throw;
  }
  publish_with_manifest(manifest, {kFiles[0]}, tmp_dir, final_dir);
}

void save_weights(const std::string& dir, MoeTransformer& model, const nlohmann::json& extra) {
  FM_CHECK(model.dtype() == DType::f32, "save_weights {}: the model is {}, checkpoints hold f32",
           dir, dtype_name(model.dtype()));
  if (model.ep_world() > 1) {
    EpSave save("save_weights", dir, *model.ep_comm());
    nlohmann::json manifest;
    save.on_root([&] { manifest = weights_manifest(dir, model.config(), extra); });
    save.write_tensors(kFiles[0], model.backend(), param_tensors(model));
    save.finish(manifest, {kFiles[0]});
    return;
  }
  save_weights_with(
      dir, model.config(),
      [&model](const std::string& path) {
        write_safetensors(path, on_host(model.backend(), param_tensors(model)));
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

// Reads each of `tensors` whole from `file` and copies this rank's part into it.
static void load_parts(const SafetensorsFile& file, MoeTransformer& model,
                       const std::vector<ArenaTensor>& tensors) {
  for (const ArenaTensor& t : tensors) {
    Tensor whole = Tensor::empty(whole_shape(*t.param, model.ep_world()), model.dtype());
    file.load_into(t.name, whole);
    Tensor part = t.part;
    model.backend().copy(part, rank_part(whole, *t.param, model.ep_rank()));
  }
  model.params().touch();
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

// Runs `load` (which makes no collectives) on this rank. Under expert parallelism every rank
// then learns whether all ranks succeeded: a rank that failed rethrows its own error, the
// others throw naming the first rank that failed, so that no rank goes on alone.
static void load_on_every_rank(const char* what, const std::string& dir, MoeTransformer& model,
                               const std::function<void()>& load) {
  if (model.ep_world() == 1) return load();
  Communicator& comm = *model.ep_comm();
  std::exception_ptr error;
  try {
    load();
  } catch (...) {
    error = std::current_exception();
  }
  const int failed = first_rank_with(&comm, error != nullptr);
  if (error) std::rethrow_exception(error);
  FM_CHECK(failed < 0,
           "{} {}: rank {} could not load the checkpoint (its error names the problem); this "
           "rank's model may be partially loaded",
           what, dir, failed);
}

static CheckpointInfo load_checkpoint_on_rank(const std::string& dir, MoeTransformer& model,
                                              AdamW& opt) {
  const fs::path d(dir);
  const std::string manifest_path = (d / "manifest.json").string();
  const nlohmann::json manifest = read_manifest(d, manifest_path);
  FM_CHECK(!is_weights_only(manifest),
           "checkpoint {} is weights-only (no optimizer state, e.g. a Hugging Face import): it "
           "cannot resume a run; start from it instead (load_weights)",
           dir);
  verify_files(d, manifest, manifest_path, model.dtype(), kAllFiles);
  check_config(manifest, manifest_path, model.config(), {});

  const SafetensorsFile params = SafetensorsFile::open((d / kFiles[0]).string());
  const SafetensorsFile moments = SafetensorsFile::open((d / kFiles[1]).string());
  const SafetensorsFile state = SafetensorsFile::open((d / kFiles[2]).string());
  load_parts(params, model, param_tensors(model));
  load_parts(moments, model, moment_tensors(model, opt));
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

CheckpointInfo load_checkpoint(const std::string& dir, MoeTransformer& model, AdamW& opt) {
  CheckpointInfo info;
  load_on_every_rank("load_checkpoint", dir, model,
                     [&] { info = load_checkpoint_on_rank(dir, model, opt); });
  return info;
}

ModelConfig load_checkpoint_config(const std::string& dir) {
  const fs::path d(dir);
  const std::string manifest_path = (d / "manifest.json").string();
  const nlohmann::json manifest = read_manifest(d, manifest_path);
  return model_config_from_json(manifest["model"], manifest_path);
}

static void load_weights_on_rank(const std::string& dir, MoeTransformer& model) {
  const fs::path d(dir);
  const std::string manifest_path = (d / "manifest.json").string();
  const nlohmann::json manifest = read_manifest(d, manifest_path);
  const bool weights_only = is_weights_only(manifest);
  std::vector<std::string> files = {kFiles[0]};
  if (!weights_only) files.push_back(kFiles[2]);
  verify_files(d, manifest, manifest_path, model.dtype(), files);
  check_config(manifest, manifest_path, model.config(),
               {"name", "max_seq_len", "init_std", "router_balance"});
  load_parts(SafetensorsFile::open((d / kFiles[0]).string()), model, param_tensors(model));
  const nlohmann::json& stored = manifest["model"];
  if (!weights_only && stored.contains("router_balance") &&
      stored["router_balance"] == model_config_json(model.config())["router_balance"])
    load_balance_state(SafetensorsFile::open((d / kFiles[2]).string()), model);
}

void load_weights(const std::string& dir, MoeTransformer& model) {
  load_on_every_rank("load_weights", dir, model, [&] { load_weights_on_rank(dir, model); });
}

}  // namespace fm
