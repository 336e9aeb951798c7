#include "model/hf_import.h"

#include <algorithm>
#include <filesystem>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <vector>

#include "engine/error.h"
#include "engine/files.h"
#include "engine/safetensors.h"
#include "model/checkpoint.h"
#include "model/weights.h"

namespace fm {

namespace fs = std::filesystem;
using json = nlohmann::json;

static const char* const kQwen3 = "Qwen3MoeForCausalLM";
static const char* const kMixtral = "MixtralForCausalLM";

// ---------------------------------------------------------------------------------------------
// config.json

namespace {

// Typed access to config.json keys; every message names the file and the key.
struct HfConfig {
  std::string path;
  json j;

  bool has(const std::string& key) const { return j.contains(key) && !j[key].is_null(); }
  template <class T>
  T get(const std::string& key) const {
    FM_CHECK(has(key), "{}: missing key '{}'", path, key);
    return as<T>(key, j[key]);
  }
  template <class T>
  T get(const std::string& key, const T& fallback) const {
    return has(key) ? as<T>(key, j[key]) : fallback;
  }
  template <class T>
  T as(const std::string& key, const json& v) const {
    if constexpr (std::is_same_v<T, bool>) {
      FM_CHECK(v.is_boolean(), "{}: key '{}' must be true or false (got {})", path, key, v.dump());
    } else if constexpr (std::is_integral_v<T>) {
      FM_CHECK(v.is_number_integer(), "{}: key '{}' must be an integer (got {})", path, key,
               v.dump());
    } else if constexpr (std::is_floating_point_v<T>) {
      FM_CHECK(v.is_number(), "{}: key '{}' must be a number (got {})", path, key, v.dump());
    } else if constexpr (std::is_same_v<T, std::string>) {
      FM_CHECK(v.is_string(), "{}: key '{}' must be a string (got {})", path, key, v.dump());
    } else {
      FM_CHECK(v.is_array(), "{}: key '{}' must be a list (got {})", path, key, v.dump());
      for (const json& e : v)
        FM_CHECK(e.is_number_integer(), "{}: key '{}' must be a list of integers (got {})", path,
                 key, v.dump());
    }
    return v.get<T>();
  }
  [[noreturn]] void refuse(const std::string& key, const std::string& why) const {
    throw Error(fmt::format("{}: {} = {}: {}", path, key, j[key].dump(), why));
  }
};

struct HfModel {
  std::string architecture;
  ModelConfig config;
  json raw;  // config.json as read
};

}  // namespace

static HfConfig read_hf_config(const std::string& dir) {
  HfConfig h;
  h.path = (fs::path(dir) / "config.json").string();
  FM_CHECK(fs::is_directory(dir), "Hugging Face model {}: not a directory", dir);
  FM_CHECK(fs::exists(h.path), "Hugging Face model {}: no config.json", dir);
  try {
    h.j = json::parse(read_file(h.path));
  } catch (const json::exception& e) {
    throw Error(fmt::format("{}: not valid JSON ({})", h.path, e.what()));
  }
  FM_CHECK(h.j.is_object(), "{}: expected a JSON object", h.path);
  return h;
}

// Plain RoPE only: rope_scaling / rope_parameters may be absent, null or of rope_type
// "default" (whose other keys transformers ignores, except partial_rotary_factor).
// Returns the rope_theta they carry (transformers v5 keeps it there), or -1.
static double check_rope(const HfConfig& h) {
  double theta = -1.0;
  for (const char* key : {"rope_scaling", "rope_parameters"}) {
    if (!h.has(key)) continue;
    const json& r = h.j[key];
    if (!r.is_object()) h.refuse(key, "expected an object or null");
    const json type = r.contains("rope_type") ? r["rope_type"] : r.value("type", json("default"));
    if (type != "default")
      h.refuse(key, "RoPE scaling is not supported (only plain RoPE, rope_type 'default')");
    if (r.contains("partial_rotary_factor") && r["partial_rotary_factor"] != 1.0)
      h.refuse(key, "partial RoPE is not supported");
    if (r.contains("rope_theta"))
      theta = h.as<double>(std::string(key) + ".rope_theta", r["rope_theta"]);
  }
  if (h.has("partial_rotary_factor") && h.get<double>("partial_rotary_factor") != 1.0)
    h.refuse("partial_rotary_factor", "partial RoPE is not supported");
  return theta;
}

static std::string model_name(const std::string& dir) {
  fs::path p = fs::path(dir).lexically_normal();
  if (p.filename().empty()) p = p.parent_path();
  const std::string name = p.filename().string();
  return name.empty() || name == "." ? "hf-model" : name;
}

static HfModel read_hf_model(const std::string& dir) {
  const HfConfig h = read_hf_config(dir);
  HfModel m;
  m.raw = h.j;
  FM_CHECK(h.has("architectures") && h.j["architectures"].is_array() &&
               h.j["architectures"].size() == 1 && h.j["architectures"][0].is_string(),
           "{}: key 'architectures' must list exactly one architecture ({} or {}), got {}", h.path,
           kQwen3, kMixtral, h.has("architectures") ? h.j["architectures"].dump() : "nothing");
  m.architecture = h.j["architectures"][0].get<std::string>();
  const bool qwen3 = m.architecture == kQwen3;
  FM_CHECK(qwen3 || m.architecture == kMixtral,
           "{}: architectures = {}: not supported (foremoe imports {} and {})", h.path,
           h.j["architectures"].dump(), kQwen3, kMixtral);

  ModelConfig& c = m.config;
  c.name = model_name(dir);
  c.vocab_size = h.get<int64_t>("vocab_size");
  c.hidden = h.get<int64_t>("hidden_size");
  c.n_layers = h.get<int64_t>("num_hidden_layers");
  c.n_heads = h.get<int64_t>("num_attention_heads");
  c.n_kv_heads = h.get<int64_t>("num_key_value_heads", c.n_heads);
  FM_CHECK(c.n_heads > 0 && c.hidden > 0, "{}: hidden_size and num_attention_heads must be > 0",
           h.path);
  c.head_dim = h.get<int64_t>("head_dim", c.hidden / c.n_heads);
  const double rope_theta = check_rope(h);
  // Defaults are transformers' own (Qwen3MoeConfig / MixtralConfig) for keys a config may omit.
  c.rope_theta = h.get<double>("rope_theta", rope_theta > 0 ? rope_theta : (qwen3 ? 10000.0 : 1e6));
  c.rms_eps = h.get<double>("rms_norm_eps", qwen3 ? 1e-6 : 1e-5);
  c.top_k = h.get<int64_t>("num_experts_per_tok");
  c.tie_embeddings = h.get<bool>("tie_word_embeddings", false);
  c.max_seq_len = h.get<int64_t>("max_position_embeddings", qwen3 ? 32768 : 131072);
  c.init_std = h.get<double>("initializer_range", 0.02);
  c.router_score = "softmax";
  c.n_shared_experts = 0;
  c.shared_ffn = 0;

  const std::string act = h.get<std::string>("hidden_act", "silu");
  if (act != "silu") h.refuse("hidden_act", "only silu (SwiGLU experts) is supported");
  if (h.get<bool>("attention_bias", false))
    h.refuse("attention_bias", "attention projections with biases are not supported");
  if (h.get<bool>("mlp_bias", false)) h.refuse("mlp_bias", "MLP biases are not supported");

  if (qwen3) {
    c.qk_norm = true;
    // transformers >= 5.8 names it num_local_experts.
    c.n_experts =
        h.has("num_experts") ? h.get<int64_t>("num_experts") : h.get<int64_t>("num_local_experts");
    c.moe_ffn = h.get<int64_t>("moe_intermediate_size");
    c.norm_topk_prob = h.get<bool>("norm_topk_prob", false);
    if (h.get<bool>("use_sliding_window", false))
      h.refuse("use_sliding_window", "sliding-window attention is not supported");
    // Layer l is MoE iff l is not in mlp_only_layers and (l + 1) % decoder_sparse_step == 0.
    const int64_t step = h.get<int64_t>("decoder_sparse_step", 1);
    if (step < 1) h.refuse("decoder_sparse_step", "must be >= 1");
    const auto dense_list = h.get<std::vector<int64_t>>("mlp_only_layers", {});
    for (int64_t l : dense_list)
      if (l < 0 || l >= c.n_layers)
        h.refuse("mlp_only_layers", fmt::format("layer {} is outside [0, {})", l, c.n_layers));
    const std::set<int64_t> dense(dense_list.begin(), dense_list.end());
    auto is_moe = [&](int64_t l) { return dense.count(l) == 0 && (l + 1) % step == 0; };
    int64_t k = 0;
    while (k < c.n_layers && !is_moe(k)) ++k;
    for (int64_t l = k; l < c.n_layers; ++l)
      if (!is_moe(l))
        throw Error(fmt::format(
            "{}: mlp_only_layers = {} with decoder_sparse_step = {} makes layer {} dense after "
            "MoE layer {}: foremoe supports dense layers only as a prefix (mlp_only_layers = "
            "[0, k), decoder_sparse_step = 1)",
            h.path, json(dense_list).dump(), step, l, k));
    if (k == c.n_layers)
      throw Error(
          fmt::format("{}: mlp_only_layers = {} with decoder_sparse_step = {} leaves no "
                      "MoE layer; foremoe needs at least one",
                      h.path, json(dense_list).dump(), step));
    c.first_k_dense = k;
    c.dense_ffn = k > 0 ? h.get<int64_t>("intermediate_size") : 0;
  } else {
    c.qk_norm = false;
    c.n_experts = h.get<int64_t>("num_local_experts");
    c.moe_ffn = h.get<int64_t>("intermediate_size");
    c.norm_topk_prob = true;  // Mixtral renormalises the top-k softmax probabilities
    c.first_k_dense = 0;
    c.dense_ffn = 0;
    if (h.has("sliding_window") && h.get<int64_t>("sliding_window") < c.max_seq_len)
      h.refuse("sliding_window",
               fmt::format("sliding-window attention is not supported (the window is below "
                           "max_position_embeddings {})",
                           c.max_seq_len));
  }
  // The one validating loader checks the result (head_dim even, top_k <= experts, ...).
  return {m.architecture, model_config_from_json(model_config_json(c), h.path), m.raw};
}

ModelConfig hf_model_config(const std::string& dir) {
  return read_hf_model(dir).config;
}

// ---------------------------------------------------------------------------------------------
// Source tensors: model.safetensors, or the shards named by model.safetensors.index.json.

namespace {

class HfTensors {
 public:
  explicit HfTensors(const std::string& dir) {
    const fs::path d(dir);
    const std::string single = (d / "model.safetensors").string();
    const std::string index = (d / "model.safetensors.index.json").string();
    if (fs::exists(single)) {
      files_.push_back(SafetensorsFile::open(single));
      for (const std::string& n : files_[0].names()) where_[n] = 0;
      return;
    }
    FM_CHECK(fs::exists(index),
             "Hugging Face model {}: neither model.safetensors nor model.safetensors.index.json",
             dir);
    json j;
    try {
      j = json::parse(read_file(index));
    } catch (const json::exception& e) {
      throw Error(fmt::format("{}: not valid JSON ({})", index, e.what()));
    }
    FM_CHECK(j.is_object() && j.contains("weight_map") && j["weight_map"].is_object(),
             "{}: missing the 'weight_map' object", index);
    std::map<std::string, size_t> shard_index;
    for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
      FM_CHECK(it.value().is_string(), "{}: weight_map['{}'] must be a file name", index, it.key());
      const std::string shard = it.value().get<std::string>();
      FM_CHECK(fs::path(shard).filename() == shard,
               "{}: weight_map['{}'] = '{}' is not a plain "
               "file name",
               index, it.key(), shard);
      auto s = shard_index.find(shard);
      if (s == shard_index.end()) {
        const std::string path = (d / shard).string();
        FM_CHECK(fs::exists(path), "{}: shard '{}' (holding '{}') does not exist", index, shard,
                 it.key());
        s = shard_index.emplace(shard, files_.size()).first;
        files_.push_back(SafetensorsFile::open(path));
      }
      FM_CHECK(files_[s->second].contains(it.key()),
               "{}: weight_map puts tensor '{}' in shard '{}', which does not hold it", index,
               it.key(), shard);
      where_[it.key()] = s->second;
    }
  }

  bool contains(const std::string& name) const { return where_.count(name) != 0; }
  const SafetensorsFile& file(const std::string& name) const { return files_[where_.at(name)]; }
  const SafetensorsEntry& entry(const std::string& name) const { return file(name).entry(name); }
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const auto& [n, i] : where_) out.push_back(n);
    return out;
  }

 private:
  std::vector<SafetensorsFile> files_;
  std::map<std::string, size_t> where_;  // tensor -> file
};

// One source tensor's contribution to an output parameter: `blocks` runs of `len`
// elements, out[dst + i * dst_stride + j] = in[src + i * src_stride + j].
struct Piece {
  std::string name;
  Shape shape;  // expected source shape
  int64_t blocks = 1, len = 0, src = 0, src_stride = 0, dst = 0, dst_stride = 0;
};

struct Recipe {
  std::string param;  // foremoe name
  Shape shape;
  std::vector<Piece> pieces;
};

}  // namespace

static Piece whole(const std::string& name, const Shape& shape, int64_t dst = 0) {
  return {name, shape, 1, shape_numel(shape), 0, 0, dst, 0};
}

// The pieces of one stacked expert tensor ("gate_proj", "up_proj" or "down_proj", shape
// [E, R, C]) from whichever layout the source uses.
static std::vector<Piece> expert_pieces(const HfTensors& src, const std::string& arch,
                                        const std::string& layer, const std::string& which,
                                        const Shape& shape) {
  const int64_t E = shape[0], R = shape[1], C = shape[2];
  const std::string mlp = layer + "mlp.experts.";
  if (src.contains(mlp + "gate_up_proj") && which != "down_proj") {  // transformers v5, fused
    const int64_t off = which == "gate_proj" ? 0 : R * C;
    return {{mlp + "gate_up_proj", {E, 2 * R, C}, E, R * C, off, 2 * R * C, 0, R * C}};
  }
  if (src.contains(mlp + which)) return {whole(mlp + which, shape)};  // stacked already
  std::string prefix = mlp, suffix = "." + which + ".weight";
  if (arch == kMixtral && !src.contains(layer + "mlp.experts.0.w1.weight")) {
    prefix = layer + "block_sparse_moe.experts.";
    suffix = which == "gate_proj" ? ".w1.weight" : which == "up_proj" ? ".w3.weight" : ".w2.weight";
  } else if (arch == kMixtral) {
    suffix = which == "gate_proj" ? ".w1.weight" : which == "up_proj" ? ".w3.weight" : ".w2.weight";
  }
  std::vector<Piece> out;
  for (int64_t e = 0; e < E; ++e)
    out.push_back(whole(prefix + std::to_string(e) + suffix, {R, C}, e * R * C));
  return out;
}

static std::vector<Recipe> plan_import(const HfTensors& src, const HfModel& m,
                                       const std::string& dir) {
  ModelWeights shapes_only;
  std::vector<Recipe> plan;
  for (const ParamSlot& p : param_slots(m.config, shapes_only)) {
    Recipe r{p.name, p.shape, {}};
    const size_t experts = p.name.find("mlp.experts.");
    if (experts != std::string::npos) {
      const std::string layer = p.name.substr(0, experts);
      const std::string which = p.name.substr(experts + std::string("mlp.experts.").size());
      r.pieces = expert_pieces(src, m.architecture, layer, which, p.shape);
    } else if (m.architecture == kMixtral && p.name.ends_with("mlp.gate.weight") &&
               !src.contains(p.name)) {
      r.pieces = {whole(p.name.substr(0, p.name.size() - std::string("mlp.gate.weight").size()) +
                            "block_sparse_moe.gate.weight",
                        p.shape)};
    } else {
      r.pieces = {whole(p.name, p.shape)};
    }
    int64_t covered = 0;
    for (const Piece& q : r.pieces) {
      FM_CHECK(src.contains(q.name), "Hugging Face model {}: missing tensor '{}' (for {})", dir,
               q.name, p.name);
      const SafetensorsEntry& e = src.entry(q.name);
      FM_CHECK(e.shape == q.shape, "{}: tensor '{}' has shape {}, the config ({}) needs {}",
               src.file(q.name).path(), q.name, json(e.shape).dump(), m.architecture,
               json(q.shape).dump());
      FM_CHECK(e.dtype == DType::f32 || e.dtype == DType::bf16 || e.dtype == DType::f16,
               "{}: tensor '{}' is {}; the importer reads BF16, F16 and F32",
               src.file(q.name).path(), q.name, dtype_safetensors_name(e.dtype));
      covered += q.blocks * q.len;
    }
    FM_CHECK(covered == shape_numel(p.shape), "import plan for {} covers {} of {} elements", p.name,
             covered, shape_numel(p.shape));
    plan.push_back(std::move(r));
  }

  std::set<std::string> used;
  for (const Recipe& r : plan)
    for (const Piece& q : r.pieces) used.insert(q.name);
  for (const std::string& n : src.names()) {
    if (used.count(n) || n.ends_with("rotary_emb.inv_freq")) continue;
    if (n == "lm_head.weight" && m.config.tie_embeddings) continue;  // the head is the embedding
    throw Error(
        fmt::format("{}: unexpected tensor '{}': nothing in a {} model with this config maps to it",
                    src.file(n).path(), n, m.architecture));
  }
  return plan;
}

// Converts one source tensor to f32 and scatters its pieces into `out`.
static void apply(const SafetensorsFile& file, const std::vector<const Piece*>& pieces,
                  float* out) {
  const Tensor t = file.load(pieces[0]->name);
  const int64_t n = t.numel();
  std::vector<float> f32;
  const float* in = nullptr;
  if (t.dtype() == DType::f32) {
    in = t.data<float>();
  } else {
    f32.resize(static_cast<size_t>(n));
    const uint16_t* h = static_cast<const uint16_t*>(t.raw());
    for (int64_t i = 0; i < n; ++i)
      f32[i] = t.dtype() == DType::bf16 ? bf16_to_f32(h[i]) : f16_to_f32(h[i]);
    in = f32.data();
  }
  for (const Piece* q : pieces)
    for (int64_t b = 0; b < q->blocks; ++b)
      std::copy_n(in + q->src + b * q->src_stride, q->len, out + q->dst + b * q->dst_stride);
}

// Writes model.safetensors parameter by parameter (f32, in arena order).
static void write_streamed(const std::string& path, const HfTensors& src,
                           const std::vector<Recipe>& plan) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  header["__metadata__"] = {{"format", "pt"}, {"source", "hf"}};
  uint64_t offset = 0;
  for (const Recipe& r : plan) {
    const uint64_t n = static_cast<uint64_t>(shape_numel(r.shape)) * 4;
    header[r.param] = {
        {"dtype", "F32"}, {"shape", r.shape}, {"data_offsets", {offset, offset + n}}};
    offset += n;
  }
  AtomicFileWriter w(path);
  w.write(safetensors_prefix(header.dump()));
  for (const Recipe& r : plan) {
    Tensor out = Tensor::empty(r.shape, DType::f32);
    // Pieces of the same source tensor (the two halves of a fused gate_up_proj) share one read.
    std::map<std::string, std::vector<const Piece*>> by_source;
    for (const Piece& q : r.pieces) by_source[q.name].push_back(&q);
    for (const auto& [name, pieces] : by_source) apply(src.file(name), pieces, out.data<float>());
    w.write(out.raw(), out.nbytes());
  }
  w.commit();
}

void import_hf(const std::string& hf_dir, const std::string& out_dir) {
  const HfModel m = read_hf_model(hf_dir);
  const HfTensors src(hf_dir);
  const std::vector<Recipe> plan = plan_import(src, m, hf_dir);
  json extra = {{"source", "hf"},
                {"hf",
                 {{"architecture", m.architecture},
                  {"dir", fs::absolute(hf_dir).lexically_normal().string()},
                  {"config", m.raw}}}};
  save_weights_with(
      out_dir, m.config, [&](const std::string& path) { write_streamed(path, src, plan); }, extra);
}

}  // namespace fm
