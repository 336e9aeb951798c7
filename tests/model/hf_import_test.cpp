// Hugging Face import: tiny Qwen3-MoE and Mixtral checkpoints written here in the
// HF layouts (per-expert, sharded, bf16, transformers-v5 fused experts) import into
// exactly the native parameters, give identical logits, and bad models are refused
// with messages naming the key or tensor.
#include "model/hf_import.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "engine/error.h"
#include "engine/files.h"
#include "engine/safetensors.h"
#include "model/checkpoint.h"
#include "support/model_fixtures.h"
#include "support/temp_dir.h"

namespace fm {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::ThrowsMessage;

enum class Arch { qwen3, mixtral };
enum class Layout { per_expert, fused };  // fused: transformers v5 gate_up_proj

json qwen3_config() {
  return {{"architectures", {"Qwen3MoeForCausalLM"}},
          {"model_type", "qwen3_moe"},
          {"vocab_size", 40},
          {"hidden_size", 16},
          {"num_hidden_layers", 3},
          {"num_attention_heads", 2},
          {"num_key_value_heads", 1},
          {"head_dim", 8},
          {"rope_theta", 10000.0},
          {"rms_norm_eps", 1e-6},
          {"num_experts", 4},
          {"num_experts_per_tok", 2},
          {"moe_intermediate_size", 8},
          {"intermediate_size", 24},
          {"decoder_sparse_step", 1},
          {"mlp_only_layers", {0}},
          {"norm_topk_prob", true},
          {"tie_word_embeddings", false},
          {"max_position_embeddings", 64},
          {"hidden_act", "silu"},
          {"attention_bias", false},
          {"use_sliding_window", false},
          {"sliding_window", 4096},
          {"rope_scaling", nullptr},
          {"initializer_range", 0.3},
          {"output_router_logits", false}};
}

json mixtral_config() {
  return {{"architectures", {"MixtralForCausalLM"}},
          {"model_type", "mixtral"},
          {"vocab_size", 40},
          {"hidden_size", 16},
          {"num_hidden_layers", 2},
          {"num_attention_heads", 4},
          {"num_key_value_heads", 2},
          {"head_dim", nullptr},
          {"rope_theta", 1e6},
          {"rms_norm_eps", 1e-5},
          {"num_local_experts", 4},
          {"num_experts_per_tok", 2},
          {"intermediate_size", 8},
          {"tie_word_embeddings", false},
          {"max_position_embeddings", 64},
          {"hidden_act", "silu"},
          {"sliding_window", nullptr},
          {"initializer_range", 0.3},
          {"router_aux_loss_coef", 0.02}};
}

// The HF name of expert e's matrix `which` (gate_proj / up_proj / down_proj) in layer prefix p.
std::string hf_expert_name(Arch arch, const std::string& p, int64_t e, const std::string& which) {
  if (arch == Arch::qwen3) return p + "mlp.experts." + std::to_string(e) + "." + which + ".weight";
  const char* w = which == "gate_proj" ? "w1" : which == "up_proj" ? "w3" : "w2";
  return p + "block_sparse_moe.experts." + std::to_string(e) + "." + w + ".weight";
}

Tensor convert(const float* src, const Shape& shape, DType dt) {
  Tensor t = Tensor::empty(shape, dt);
  const int64_t n = shape_numel(shape);
  for (int64_t i = 0; i < n; ++i) {
    if (dt == DType::f32)
      t.data<float>()[i] = src[i];
    else
      static_cast<uint16_t*>(t.raw())[i] = f32_to_bf16(src[i]);
  }
  return t;
}

// A native model's parameters under their Hugging Face names and layout.
std::vector<NamedTensor> export_hf(MoeTransformer& m, Arch arch, Layout layout, DType dt) {
  std::vector<NamedTensor> out;
  for (const ParamSlot& p : m.params().slots()) {
    const Tensor host = m.backend().to_host(*p.slot);
    const float* v = host.data<float>();
    const size_t at = p.name.find("mlp.experts.");
    if (at != std::string::npos) {
      const std::string layer = p.name.substr(0, at), which = p.name.substr(at + 12);
      const int64_t E = p.shape[0], R = p.shape[1], C = p.shape[2];
      if (layout == Layout::fused && which == "down_proj") {
        out.push_back({layer + "mlp.experts.down_proj", convert(v, p.shape, dt)});
      } else if (layout == Layout::fused) {  // written once, when gate_proj comes by
        if (which != "gate_proj") continue;
        const Tensor up_host =
            m.backend().to_host(*m.params().slot(layer + "mlp.experts.up_proj").slot);
        const float* up = up_host.data<float>();
        std::vector<float> fused;
        for (int64_t e = 0; e < E; ++e) {
          fused.insert(fused.end(), v + e * R * C, v + (e + 1) * R * C);
          fused.insert(fused.end(), up + e * R * C, up + (e + 1) * R * C);
        }
        out.push_back(
            {layer + "mlp.experts.gate_up_proj", convert(fused.data(), {E, 2 * R, C}, dt)});
      } else {
        for (int64_t e = 0; e < E; ++e)
          out.push_back(
              {hf_expert_name(arch, layer, e, which), convert(v + e * R * C, {R, C}, dt)});
      }
    } else if (arch == Arch::mixtral && layout == Layout::per_expert &&
               p.name.ends_with("mlp.gate.weight")) {
      out.push_back({p.name.substr(0, p.name.size() - 15) + "block_sparse_moe.gate.weight",
                     convert(v, p.shape, dt)});
    } else {
      out.push_back({p.name, convert(v, p.shape, dt)});
    }
  }
  return out;
}

class HfImportTest : public testing::TempDirTest {
 protected:
  struct Native {
    std::unique_ptr<Backend> backend = make_cpu_backend();
    std::unique_ptr<MoeTransformer> model;
  };

  // A HF model directory `name` with config.json; returns its path.
  std::string hf_dir(const std::string& name, const json& config) {
    const std::string d = file(name);
    make_dirs(d);
    write_file_atomic(d + "/config.json", config.dump(2));
    return d;
  }
  static void write_sharded(const std::string& d, const std::vector<NamedTensor>& tensors) {
    std::vector<NamedTensor> shard[2];
    json index = {{"metadata", {{"total_size", 0}}}, {"weight_map", json::object()}};
    for (size_t i = 0; i < tensors.size(); ++i) {
      const int s = i < tensors.size() / 2 ? 0 : 1;
      shard[s].push_back(tensors[i]);
      index["weight_map"][tensors[i].name] =
          fmt::format("model-0000{}-of-00002.safetensors", s + 1);
    }
    for (int s = 0; s < 2; ++s)
      write_safetensors(fmt::format("{}/model-0000{}-of-00002.safetensors", d, s + 1), shard[s]);
    write_file_atomic(d + "/model.safetensors.index.json", index.dump(2));
  }
  // A natively initialised model with the config the HF directory describes.
  static Native native(const std::string& d, uint64_t seed) {
    Native n;
    n.model = std::make_unique<MoeTransformer>(hf_model_config(d), *n.backend);
    n.model->init_weights(seed);
    return n;
  }
  // Imports `d` to `<d>-ck` and loads it into a fresh model built from the stored config.
  Native import_and_load(const std::string& d) {
    import_hf(d, d + "-ck");
    Native n;
    n.model = std::make_unique<MoeTransformer>(load_checkpoint_config(d + "-ck"), *n.backend);
    load_weights(d + "-ck", *n.model);
    return n;
  }
  static std::vector<float> flat(MoeTransformer& m) {
    const Tensor h = m.backend().to_host(m.params().flat());
    return std::vector<float>(h.data<float>(), h.data<float>() + h.numel());
  }
  static Tensor param(MoeTransformer& m, const std::string& name) {
    return m.backend().to_host(*m.params().slot(name).slot);
  }
};

TEST_F(HfImportTest, Qwen3ConfigMapsEveryKey) {
  const ModelConfig c = hf_model_config(hf_dir("qwen3-tiny", qwen3_config()));
  EXPECT_EQ(c.name, "qwen3-tiny");
  EXPECT_EQ(c.vocab_size, 40);
  EXPECT_EQ(c.hidden, 16);
  EXPECT_EQ(c.n_layers, 3);
  EXPECT_EQ(c.n_heads, 2);
  EXPECT_EQ(c.n_kv_heads, 1);
  EXPECT_EQ(c.head_dim, 8);
  EXPECT_EQ(c.rope_theta, 10000.0);
  EXPECT_EQ(c.rms_eps, 1e-6);
  EXPECT_TRUE(c.qk_norm);
  EXPECT_EQ(c.n_experts, 4);
  EXPECT_EQ(c.top_k, 2);
  EXPECT_EQ(c.moe_ffn, 8);
  EXPECT_EQ(c.n_shared_experts, 0);
  EXPECT_EQ(c.first_k_dense, 1);
  EXPECT_EQ(c.dense_ffn, 24);
  EXPECT_TRUE(c.norm_topk_prob);
  EXPECT_FALSE(c.tie_embeddings);
  EXPECT_EQ(c.max_seq_len, 64);
}

TEST_F(HfImportTest, MixtralConfigMapsEveryKey) {
  const ModelConfig c = hf_model_config(hf_dir("mixtral-tiny/", mixtral_config()));
  EXPECT_EQ(c.name, "mixtral-tiny");
  EXPECT_EQ(c.head_dim, 4);  // null head_dim: hidden / heads
  EXPECT_EQ(c.n_kv_heads, 2);
  EXPECT_EQ(c.rope_theta, 1e6);
  EXPECT_EQ(c.rms_eps, 1e-5);
  EXPECT_FALSE(c.qk_norm);
  EXPECT_EQ(c.n_experts, 4);
  EXPECT_EQ(c.moe_ffn, 8);
  EXPECT_EQ(c.first_k_dense, 0);
  EXPECT_TRUE(c.norm_topk_prob);  // Mixtral renormalises the top-k softmax
}

TEST_F(HfImportTest, TransformersV5ConfigKeysAreRead) {
  json j = qwen3_config();
  j.erase("rope_theta");
  j.erase("num_experts");
  j["num_local_experts"] = 4;
  j["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 5e5}};
  const ModelConfig c = hf_model_config(hf_dir("v5", j));
  EXPECT_EQ(c.rope_theta, 5e5);
  EXPECT_EQ(c.n_experts, 4);
}

// bf16 -> f32 is exact, so the imported parameters are the bf16-rounded native ones, bit for bit.
TEST_F(HfImportTest, Qwen3SingleFileBf16ImportsExactly) {
  const std::string d = hf_dir("qwen3", qwen3_config());
  Native a = native(d, 11);
  const std::vector<NamedTensor> hf =
      export_hf(*a.model, Arch::qwen3, Layout::per_expert, DType::bf16);
  write_safetensors(d + "/model.safetensors", hf);
  Native b = import_and_load(d);

  const std::vector<float> want = flat(*a.model), got = flat(*b.model);
  ASSERT_EQ(want.size(), got.size());
  for (size_t i = 0; i < want.size(); ++i)
    ASSERT_EQ(got[i], bf16_to_f32(f32_to_bf16(want[i]))) << "element " << i;

  // Expert 2's gate_proj row 3 in layer 1 is the stacked slice [2, 3, :].
  const SafetensorsFile f = SafetensorsFile::open(d + "/model.safetensors");
  const Tensor src = f.load("model.layers.1.mlp.experts.2.gate_proj.weight");
  const Tensor stacked = param(*b.model, "model.layers.1.mlp.experts.gate_proj");
  for (int64_t j = 0; j < 16; ++j)
    EXPECT_EQ(stacked.data<float>()[(2 * 8 + 3) * 16 + j],
              bf16_to_f32(static_cast<const uint16_t*>(src.raw())[3 * 16 + j]));
  // The dense first layer keeps its HF names.
  EXPECT_EQ(param(*b.model, "model.layers.0.mlp.gate_proj.weight").shape(), (Shape{24, 16}));

  const json manifest = json::parse(read_file(d + "-ck/manifest.json"));
  EXPECT_EQ(manifest["source"], "hf");
  EXPECT_EQ(manifest["hf"]["architecture"], "Qwen3MoeForCausalLM");
  EXPECT_TRUE(manifest["weights_only"].get<bool>());
  EXPECT_FALSE(fs::exists(d + "-ck/optimizer.safetensors"));
}

TEST_F(HfImportTest, MixtralShardedMapsW1W3W2AndTheRouter) {
  const std::string d = hf_dir("mixtral", mixtral_config());
  Native a = native(d, 12);
  const std::vector<NamedTensor> hf =
      export_hf(*a.model, Arch::mixtral, Layout::per_expert, DType::f32);
  write_sharded(d, hf);
  Native b = import_and_load(d);
  EXPECT_EQ(flat(*a.model), flat(*b.model));

  // Spot checks against the HF tensors themselves: w1 = gate, w3 = up, w2 = down, gate = router.
  const json index = json::parse(read_file(d + "/model.safetensors.index.json"));
  auto hf_tensor = [&](const std::string& name) {
    return SafetensorsFile::open(d + "/" + index["weight_map"][name].get<std::string>()).load(name);
  };
  auto same = [](const float* a, const float* b, int64_t n) {
    return std::memcmp(a, b, static_cast<size_t>(n) * 4) == 0;
  };
  const std::string p = "model.layers.1.";
  EXPECT_TRUE(same(param(*b.model, p + "mlp.experts.gate_proj").data<float>() + 1 * 8 * 16,
                   hf_tensor(p + "block_sparse_moe.experts.1.w1.weight").data<float>(), 8 * 16));
  EXPECT_TRUE(same(param(*b.model, p + "mlp.experts.up_proj").data<float>() + 1 * 8 * 16,
                   hf_tensor(p + "block_sparse_moe.experts.1.w3.weight").data<float>(), 8 * 16));
  EXPECT_TRUE(same(param(*b.model, p + "mlp.experts.down_proj").data<float>() + 1 * 16 * 8,
                   hf_tensor(p + "block_sparse_moe.experts.1.w2.weight").data<float>(), 16 * 8));
  EXPECT_TRUE(same(param(*b.model, p + "mlp.gate.weight").data<float>(),
                   hf_tensor(p + "block_sparse_moe.gate.weight").data<float>(), 4 * 16));
}

TEST_F(HfImportTest, TransformersV5FusedExpertsImportExactly) {
  for (Arch arch : {Arch::qwen3, Arch::mixtral}) {
    const std::string d = hf_dir(arch == Arch::qwen3 ? "q" : "m",
                                 arch == Arch::qwen3 ? qwen3_config() : mixtral_config());
    Native a = native(d, 13);
    write_safetensors(d + "/model.safetensors",
                      export_hf(*a.model, arch, Layout::fused, DType::f32));
    Native b = import_and_load(d);
    EXPECT_EQ(flat(*a.model), flat(*b.model)) << d;
  }
}

// The imported model is the native one: the same forward, bit for bit.
TEST_F(HfImportTest, ImportedModelGivesIdenticalLogits) {
  for (Arch arch : {Arch::qwen3, Arch::mixtral}) {
    const std::string d = hf_dir(arch == Arch::qwen3 ? "q" : "m",
                                 arch == Arch::qwen3 ? qwen3_config() : mixtral_config());
    Native a = native(d, 14);
    write_safetensors(d + "/model.safetensors",
                      export_hf(*a.model, arch, Layout::per_expert, DType::f32));
    Native b = import_and_load(d);
    const Batch batch = testing::random_batch(a.model->config(), {9, 4, 6}, 5);
    ForwardOptions eval;
    eval.training = false;
    a.model->forward(batch, eval);
    b.model->forward(batch, eval);
    const Tensor la = a.backend->to_host(a.model->logits());
    const Tensor lb = b.backend->to_host(b.model->logits());
    ASSERT_EQ(la.shape(), (Shape{19, 40}));
    EXPECT_EQ(std::memcmp(la.raw(), lb.raw(), la.nbytes()), 0) << d;
    EXPECT_EQ(a.model->forward_result().routes.ids, b.model->forward_result().routes.ids);
  }
}

// ---- refusals: each names the key, value or tensor, and leaves no checkpoint behind ----

TEST_F(HfImportTest, UnknownArchitectureIsRefused) {
  json j = qwen3_config();
  j["architectures"] = {"LlamaForCausalLM"};
  const std::string d = hf_dir("llama", j);
  EXPECT_THAT([&] { hf_model_config(d); },
              ThrowsMessage<Error>(AllOf(HasSubstr("config.json"), HasSubstr("architectures"),
                                         HasSubstr("LlamaForCausalLM"))));
}

TEST_F(HfImportTest, UnsupportedConfigKeysAreRefused) {
  const std::vector<std::pair<std::string, json>> bad = {
      {"rope_scaling", {{"rope_type", "yarn"}, {"factor", 4.0}}},
      {"attention_bias", true},
      {"hidden_act", "gelu"},
      {"use_sliding_window", true},
  };
  for (const auto& [key, value] : bad) {
    json j = qwen3_config();
    j[key] = value;
    const std::string d = hf_dir("bad_" + key, j);
    EXPECT_THAT([&] { hf_model_config(d); },
                ThrowsMessage<Error>(AllOf(HasSubstr("config.json"), HasSubstr(key))))
        << key;
  }
  json m = mixtral_config();
  m["sliding_window"] = 16;
  const std::string d = hf_dir("mixtral_window", m);
  EXPECT_THAT([&] { hf_model_config(d); }, ThrowsMessage<Error>(HasSubstr("sliding_window")));
}

TEST_F(HfImportTest, DenseLayersOnlyAsAPrefix) {
  json j = qwen3_config();
  j["mlp_only_layers"] = {1};
  EXPECT_THAT([&] { hf_model_config(hf_dir("middle", j)); },
              ThrowsMessage<Error>(AllOf(HasSubstr("mlp_only_layers"), HasSubstr("prefix"))));
  j["mlp_only_layers"] = json::array();
  j["decoder_sparse_step"] = 2;  // layers 0 and 2 dense, 1 MoE
  EXPECT_THAT([&] { hf_model_config(hf_dir("step2", j)); },
              ThrowsMessage<Error>(HasSubstr("decoder_sparse_step")));
  j["decoder_sparse_step"] = 1;
  j["mlp_only_layers"] = {0, 1};
  EXPECT_EQ(hf_model_config(hf_dir("two_dense", j)).first_k_dense, 2);
}

TEST_F(HfImportTest, MissingTensorIsNamed) {
  const std::string d = hf_dir("qwen3", qwen3_config());
  Native a = native(d, 1);
  std::vector<NamedTensor> hf = export_hf(*a.model, Arch::qwen3, Layout::per_expert, DType::f32);
  std::erase_if(hf, [](const NamedTensor& t) {
    return t.name == "model.layers.2.mlp.experts.3.up_proj.weight";
  });
  write_safetensors(d + "/model.safetensors", hf);
  EXPECT_THAT(
      [&] { import_hf(d, file("ck")); },
      ThrowsMessage<Error>(AllOf(HasSubstr("missing tensor"),
                                 HasSubstr("model.layers.2.mlp.experts.3.up_proj.weight"))));
  EXPECT_FALSE(fs::exists(file("ck")));
  for (const auto& e : fs::directory_iterator(dir_))  // no staging directory left behind
    EXPECT_EQ(e.path().filename().string().find("ck."), std::string::npos);
}

TEST_F(HfImportTest, ExtraTensorIsNamed) {
  const std::string d = hf_dir("qwen3", qwen3_config());
  Native a = native(d, 1);
  std::vector<NamedTensor> hf = export_hf(*a.model, Arch::qwen3, Layout::per_expert, DType::f32);
  hf.push_back({"model.layers.0.self_attn.q_proj.bias", Tensor::zeros({16}, DType::f32)});
  write_safetensors(d + "/model.safetensors", hf);
  EXPECT_THAT([&] { import_hf(d, file("ck")); },
              ThrowsMessage<Error>(AllOf(HasSubstr("unexpected tensor"),
                                         HasSubstr("model.layers.0.self_attn.q_proj.bias"))));
}

TEST_F(HfImportTest, WrongShapeIsNamed) {
  const std::string d = hf_dir("qwen3", qwen3_config());
  Native a = native(d, 1);
  std::vector<NamedTensor> hf = export_hf(*a.model, Arch::qwen3, Layout::per_expert, DType::f32);
  for (NamedTensor& t : hf)
    if (t.name == "model.layers.1.mlp.gate.weight") t.tensor = Tensor::zeros({5, 16}, DType::f32);
  write_safetensors(d + "/model.safetensors", hf);
  EXPECT_THAT([&] { import_hf(d, file("ck")); },
              ThrowsMessage<Error>(AllOf(HasSubstr("model.layers.1.mlp.gate.weight"),
                                         HasSubstr("[5,16]"), HasSubstr("[4,16]"))));
}

TEST_F(HfImportTest, MissingShardIsNamed) {
  const std::string d = hf_dir("mixtral", mixtral_config());
  Native a = native(d, 1);
  write_sharded(d, export_hf(*a.model, Arch::mixtral, Layout::per_expert, DType::f32));
  fs::remove(d + "/model-00002-of-00002.safetensors");
  EXPECT_THAT([&] { import_hf(d, file("ck")); },
              ThrowsMessage<Error>(AllOf(HasSubstr("model.safetensors.index.json"),
                                         HasSubstr("model-00002-of-00002.safetensors"),
                                         HasSubstr("does not exist"))));
}

TEST_F(HfImportTest, NoWeightsIsNamed) {
  const std::string d = hf_dir("empty", mixtral_config());
  EXPECT_THAT([&] { import_hf(d, file("ck")); },
              ThrowsMessage<Error>(HasSubstr("neither model.safetensors nor")));
}

}  // namespace
}  // namespace fm
