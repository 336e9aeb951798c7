#include "model/trace_io.h"

#include <fmt/format.h>

#include <cstring>
#include <stdexcept>

#include "engine/error.h"
#include "engine/safetensors.h"

namespace fm {

static constexpr const char* kMetadataKey = "foremoe_trace";

TraceMetadata trace_metadata(const ModelConfig& c, nlohmann::json source) {
  TraceMetadata m;
  m.model = c.name;
  m.n_layers = c.n_layers;
  m.first_k_dense = c.first_k_dense;
  m.vocab_size = c.vocab_size;
  m.hidden = c.hidden;
  m.source = std::move(source);
  return m;
}

static DType routes_dtype(int64_t n_experts) {
  return n_experts <= 256 ? DType::u8 : DType::u16;
}

// micro_step_offsets: begins at 0, strictly increasing, every entry < n_sequences.
static void check_micro_steps(const std::string& path, const std::vector<int64_t>& m,
                              int64_t n_sequences) {
  if (m.empty()) return;
  FM_CHECK(m[0] == 0, "{}: micro_step_offsets must start with 0 (got {})", path, m[0]);
  for (size_t i = 1; i < m.size(); ++i)
    FM_CHECK(m[i] > m[i - 1], "{}: micro_step_offsets must increase (index {}: {} after {})", path,
             i, m[i], m[i - 1]);
  FM_CHECK(m.back() < n_sequences,
           "{}: micro_step_offsets entry {} is not a sequence index (the trace has {} sequences)",
           path, m.back(), n_sequences);
}

void save_trace(const std::string& path, const RoutingTrace& t, const TraceMetadata& meta) {
  try {
    validate_trace(t);
  } catch (const std::runtime_error& e) {
    throw Error(fmt::format("{}: cannot save: {}", path, e.what()));
  }
  FM_CHECK(meta.n_layers >= 1 && meta.first_k_dense >= 0 &&
               meta.n_layers - meta.first_k_dense == t.n_moe_layers,
           "{}: cannot save: metadata n_layers {} - first_k_dense {} must equal the trace's "
           "n_moe_layers {}",
           path, meta.n_layers, meta.first_k_dense, t.n_moe_layers);
  FM_CHECK(meta.vocab_size >= 0 && meta.hidden >= 0,
           "{}: cannot save: vocab_size {} / hidden {} must be >= 0 (0 = unknown)", path,
           meta.vocab_size, meta.hidden);
  const int64_t S = static_cast<int64_t>(t.seq_offsets.size()) - 1;
  check_micro_steps(path, meta.micro_step_offsets, S);

  const Shape shape{t.tokens(), t.n_moe_layers, t.top_k};
  Tensor routes = Tensor::empty(shape, routes_dtype(t.n_experts));
  if (routes.dtype() == DType::u8) {
    uint8_t* out = routes.data<uint8_t>();
    for (size_t i = 0; i < t.ids.size(); ++i) out[i] = static_cast<uint8_t>(t.ids[i]);
  } else {
    std::memcpy(routes.data<uint16_t>(), t.ids.data(), t.ids.size() * sizeof(uint16_t));
  }
  auto i64 = [](const std::vector<int64_t>& v) {
    Tensor x = Tensor::empty({static_cast<int64_t>(v.size())}, DType::i64);
    if (!v.empty()) std::memcpy(x.data<int64_t>(), v.data(), v.size() * sizeof(int64_t));
    return x;
  };
  std::vector<NamedTensor> tensors{{"routes", routes}, {"seq_offsets", i64(t.seq_offsets)}};
  if (!meta.micro_step_offsets.empty())
    tensors.push_back({"micro_step_offsets", i64(meta.micro_step_offsets)});

  auto unknown_or = [](int64_t v) { return v > 0 ? nlohmann::json(v) : nlohmann::json(nullptr); };
  const nlohmann::json j = {{"format", "foremoe-trace"},
                            {"format_version", kTraceFormatVersion},
                            {"model", meta.model},
                            {"n_layers", meta.n_layers},
                            {"first_k_dense", meta.first_k_dense},
                            {"n_moe_layers", t.n_moe_layers},
                            {"n_experts", t.n_experts},
                            {"top_k", t.top_k},
                            {"vocab_size", unknown_or(meta.vocab_size)},
                            {"hidden", unknown_or(meta.hidden)},
                            {"source", meta.source}};
  write_safetensors(path, tensors, {{kMetadataKey, j.dump()}});
}

// An integer metadata key; `optional` ones may be absent or null (returned as 0).
static int64_t meta_int(const nlohmann::json& j, const char* key, const std::string& path,
                        bool optional = false) {
  const bool absent = !j.contains(key) || j[key].is_null();
  if (absent && optional) return 0;
  FM_CHECK(!absent, "{}: trace metadata is missing '{}'", path, key);
  FM_CHECK(j[key].is_number_integer(), "{}: trace metadata '{}' must be an integer (got {})", path,
           key, j[key].dump());
  return j[key].get<int64_t>();
}

// The tensor `name`, which must exist with one of `dtypes` and the given rank.
static const SafetensorsEntry& entry(const SafetensorsFile& f, const std::string& name,
                                     std::initializer_list<DType> dtypes, size_t rank) {
  FM_CHECK(f.contains(name), "{}: not a routing trace: no tensor '{}'", f.path(), name);
  const SafetensorsEntry& e = f.entry(name);
  bool ok = false;
  std::string want;
  for (DType d : dtypes) {
    ok = ok || e.dtype == d;
    want += (want.empty() ? "" : " or ") + std::string(dtype_safetensors_name(d));
  }
  FM_CHECK(ok, "{}: tensor '{}' has dtype {}, expected {}", f.path(), name,
           dtype_safetensors_name(e.dtype), want);
  FM_CHECK(e.shape.size() == rank, "{}: tensor '{}' has shape {}, expected rank {}", f.path(), name,
           shape_str(e.shape), rank);
  return e;
}

static std::vector<int64_t> load_i64(const SafetensorsFile& f, const std::string& name) {
  const Tensor x = f.load(name);
  return std::vector<int64_t>(x.data<int64_t>(), x.data<int64_t>() + x.numel());
}

RoutingTrace load_trace(const std::string& path, TraceMetadata* meta_out) {
  const SafetensorsFile f = SafetensorsFile::open(path);

  // Metadata first: it says what the tensors must look like.
  const auto m = f.metadata().find(kMetadataKey);
  FM_CHECK(m != f.metadata().end(), "{}: not a routing trace: __metadata__ has no '{}' entry", path,
           kMetadataKey);
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(m->second);
  } catch (const nlohmann::json::exception& e) {
    throw Error(
        fmt::format("{}: __metadata__ '{}' is not valid JSON ({})", path, kMetadataKey, e.what()));
  }
  FM_CHECK(j.is_object(), "{}: __metadata__ '{}' must be a JSON object", path, kMetadataKey);
  FM_CHECK(j.value("format", nlohmann::json()) == "foremoe-trace",
           "{}: trace metadata 'format' must be \"foremoe-trace\" (got {})", path,
           j.value("format", nlohmann::json()).dump());
  const int64_t version = meta_int(j, "format_version", path);
  FM_CHECK(version == kTraceFormatVersion,
           "{}: trace format_version {} is not supported (expected {})", path, version,
           kTraceFormatVersion);
  FM_CHECK(!j.contains("model") || j["model"].is_string(),
           "{}: trace metadata 'model' must be a string (got {})", path,
           j.value("model", nlohmann::json()).dump());

  TraceMetadata meta;
  meta.model = j.value("model", std::string());
  meta.n_layers = meta_int(j, "n_layers", path);
  meta.first_k_dense = meta_int(j, "first_k_dense", path);
  meta.vocab_size = meta_int(j, "vocab_size", path, /*optional=*/true);
  meta.hidden = meta_int(j, "hidden", path, /*optional=*/true);
  meta.source = j.value("source", nlohmann::json::object());
  RoutingTrace t;
  t.n_moe_layers = meta_int(j, "n_moe_layers", path);
  t.n_experts = meta_int(j, "n_experts", path);
  t.top_k = meta_int(j, "top_k", path);
  FM_CHECK(t.n_experts >= 1 && t.n_experts <= 65536,
           "{}: trace metadata n_experts {} is outside [1, 65536]", path, t.n_experts);
  FM_CHECK(t.top_k >= 1 && t.top_k <= t.n_experts,
           "{}: trace metadata top_k {} is outside [1, n_experts {}]", path, t.top_k, t.n_experts);
  FM_CHECK(t.n_moe_layers >= 1, "{}: trace metadata n_moe_layers {} must be >= 1", path,
           t.n_moe_layers);
  FM_CHECK(meta.first_k_dense >= 0 && meta.n_layers - meta.first_k_dense == t.n_moe_layers,
           "{}: trace metadata is inconsistent: n_layers {} - first_k_dense {} != n_moe_layers {}",
           path, meta.n_layers, meta.first_k_dense, t.n_moe_layers);
  FM_CHECK(meta.vocab_size >= 0 && meta.hidden >= 0,
           "{}: trace metadata vocab_size {} / hidden {} must be positive or null", path,
           meta.vocab_size, meta.hidden);

  // seq_offsets: [S + 1], 0 first, non-decreasing (empty sequences allowed), ends at tokens.
  entry(f, "seq_offsets", {DType::i64}, 1);
  t.seq_offsets = load_i64(f, "seq_offsets");
  FM_CHECK(!t.seq_offsets.empty() && t.seq_offsets[0] == 0,
           "{}: tensor 'seq_offsets' must start with 0", path);
  for (size_t s = 1; s < t.seq_offsets.size(); ++s)
    FM_CHECK(t.seq_offsets[s] >= t.seq_offsets[s - 1],
             "{}: tensor 'seq_offsets' decreases at index {} ({} after {})", path, s,
             t.seq_offsets[s], t.seq_offsets[s - 1]);

  // routes: [tokens, n_moe_layers, top_k], narrow enough ids for n_experts.
  const SafetensorsEntry& r = t.n_experts <= 256 ? entry(f, "routes", {DType::u8, DType::u16}, 3)
                                                 : entry(f, "routes", {DType::u16}, 3);
  FM_CHECK(r.shape[1] == t.n_moe_layers && r.shape[2] == t.top_k,
           "{}: tensor 'routes' has shape {}, expected [tokens, n_moe_layers {}, top_k {}]", path,
           shape_str(r.shape), t.n_moe_layers, t.top_k);
  FM_CHECK(r.shape[0] == t.tokens(), "{}: tensor 'routes' has {} tokens but seq_offsets ends at {}",
           path, r.shape[0], t.tokens());
  const Tensor routes = f.load("routes");
  t.ids.resize(static_cast<size_t>(routes.numel()));
  if (routes.dtype() == DType::u8) {
    const uint8_t* in = routes.data<uint8_t>();
    for (size_t i = 0; i < t.ids.size(); ++i) t.ids[i] = in[i];
  } else {
    std::memcpy(t.ids.data(), routes.data<uint16_t>(), t.ids.size() * sizeof(uint16_t));
  }
  for (size_t i = 0; i < t.ids.size(); ++i) {
    if (t.ids[i] < t.n_experts) continue;
    const size_t k = static_cast<size_t>(t.top_k),
                 per_token = static_cast<size_t>(t.n_moe_layers) * k;
    throw Error(fmt::format(
        "{}: tensor 'routes' holds expert id {} >= n_experts {} at [token {}, layer {}, k {}]",
        path, t.ids[i], t.n_experts, i / per_token, (i % per_token) / k, i % k));
  }

  if (f.contains("micro_step_offsets")) {
    entry(f, "micro_step_offsets", {DType::i64}, 1);
    meta.micro_step_offsets = load_i64(f, "micro_step_offsets");
    check_micro_steps(path, meta.micro_step_offsets,
                      static_cast<int64_t>(t.seq_offsets.size()) - 1);
  }
  if (meta_out) *meta_out = std::move(meta);
  return t;
}

}  // namespace fm
