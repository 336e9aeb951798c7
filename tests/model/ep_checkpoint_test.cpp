// Checkpoints under expert parallelism: W ranks save the single-rank checkpoint (byte for
// byte), any W dividing n_experts loads it, resuming continues exactly, and a failure on one
// rank fails every rank without a hang.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <memory>

#include "engine/comm.h"
#include "engine/error.h"
#include "engine/files.h"
#include "model/checkpoint.h"
#include "model/expert_parallel.h"
#include "model/optimizer.h"
#include "support/model_fixtures.h"
#include "support/temp_dir.h"

namespace fm {
namespace {

using std::chrono::milliseconds;
using ::testing::HasSubstr;
// Generous for 2 shared cores; the fault tests assert they end well before it.
constexpr milliseconds kTimeout{30000};
constexpr auto kNoHang = std::chrono::seconds(15);

// micro_config with 8 experts (2 per rank at W = 4) and phi balancing, whose EMA is state
// the checkpoint must carry for a resume to continue exactly.
ModelConfig ep_config() {
  ModelConfig c = testing::micro_config("method: phi\n    alpha: 0.1");
  c.n_experts = 8;
  return c;
}

// Six sequences per step; rank r of W runs sequences kParts[W][r] (rank 0 a single token).
const std::vector<int64_t> kLengths = {1, 5, 4, 7, 3, 6};
std::pair<size_t, size_t> part_of(int W, int rank) {
  if (W == 4) return std::vector<std::pair<size_t, size_t>>{{0, 1}, {1, 3}, {3, 4}, {4, 6}}[rank];
  if (W == 2) return std::vector<std::pair<size_t, size_t>>{{0, 1}, {1, 6}}[rank];
  return {0, 6};
}

// This rank's sequences of the batch drawn with `seed`.
Batch rank_batch(const ModelConfig& c, uint64_t seed, int W, int rank) {
  const Batch full = testing::random_batch(c, kLengths, seed);
  const auto [first, last] = part_of(W, rank);
  const int64_t begin = full.seq_offsets[first], end = full.seq_offsets[last];
  Batch b;
  b.tokens.assign(full.tokens.begin() + begin, full.tokens.begin() + end);
  b.targets.assign(full.targets.begin() + begin, full.targets.begin() + end);
  for (size_t s = first; s <= last; ++s) b.seq_offsets.push_back(full.seq_offsets[s] - begin);
  return b;
}

CheckpointInfo info_at(int64_t step) {
  CheckpointInfo info;
  info.step = step;
  info.rngs = {{"data", 7, 3, 12345}};
  info.run = {{"note", "x"}};
  return info;
}

bool same_bits(const Tensor& a, const Tensor& b) {
  return a.nbytes() == b.nbytes() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

// Rank `rank` of W's part of a flat single-rank arena-layout tensor (parameters or moments).
Tensor shard_of(const ModelConfig& c, Backend& b, const Tensor& full_flat, int W, int rank) {
  ParamArena full(c, b, DType::f32), shard(c, b, DType::f32, W);
  b.copy(full.flat(), full_flat);
  copy_param_shard(b, full, shard, rank);
  return b.to_host(shard.flat());
}

// What a rank holds, copied: parameters, AdamW moments and counters, balancing state.
struct RankState {
  Tensor params, exp_avg, exp_avg_sq;
  int64_t steps_taken = 0;
  std::vector<LayerBalanceState> balance;
};

void expect_same(const RankState& a, const RankState& b, int rank) {
  EXPECT_TRUE(same_bits(a.params, b.params)) << "rank " << rank;
  EXPECT_TRUE(same_bits(a.exp_avg, b.exp_avg)) << "rank " << rank;
  EXPECT_TRUE(same_bits(a.exp_avg_sq, b.exp_avg_sq)) << "rank " << rank;
  EXPECT_EQ(a.steps_taken, b.steps_taken) << "rank " << rank;
  ASSERT_EQ(a.balance.size(), b.balance.size());
  for (size_t l = 0; l < a.balance.size(); ++l) {
    EXPECT_EQ(a.balance[l].ema, b.balance[l].ema) << "rank " << rank << " layer " << l;
    EXPECT_EQ(a.balance[l].bias, b.balance[l].bias) << "rank " << rank << " layer " << l;
    EXPECT_EQ(a.balance[l].step_load, b.balance[l].step_load) << "rank " << rank;
  }
}

// One rank's model and optimizer (comm == nullptr: the plain single-rank model).
struct RankModel {
  ModelConfig config;
  std::unique_ptr<Backend> backend = make_cpu_backend();
  std::unique_ptr<MoeTransformer> model;
  std::unique_ptr<AdamW> opt;

  RankModel(const ModelConfig& c, Communicator* comm) : config(c) {
    model = std::make_unique<MoeTransformer>(c, *backend, DType::f32, ExpertParallel{comm});
    opt = std::make_unique<AdamW>(OptimizerConfig{.lr = 1e-2}, model->params(), *backend);
  }
  int W() const { return model->ep_world(); }
  int rank() const { return model->ep_rank(); }

  // AdamW steps [first, first + n), each on its own batch.
  void train(int first, int n) {
    for (int s = first; s < first + n; ++s) {
      model->zero_grad();
      model->lm_loss_and_backward(rank_batch(config, 100 + s, W(), rank()), {}, 1.0);
      model->all_reduce_grads();
      opt->step(model->grads(), model->grad_norm());
      model->end_balance_step();
    }
  }
  // This rank's log-probs of its part of one evaluation batch (no state changes).
  std::vector<double> logp() {
    return model->forward(rank_batch(config, 42, W(), rank()), {.training = false}).logp;
  }
  RankState state() {
    return {backend->to_host(model->params().flat()), backend->to_host(opt->exp_avg()),
            backend->to_host(opt->exp_avg_sq()), opt->steps_taken(), model->balance_state()};
  }
};

// Runs fn on every rank of W (threads of an in-process group; W = 1: the plain model).
void on_ranks(int W, const std::function<void(RankModel&)>& fn) {
  if (W == 1) {
    RankModel m(ep_config(), nullptr);
    return fn(m);
  }
  run_inprocess(W, kTimeout, [&](int, Communicator& comm) {
    RankModel m(ep_config(), &comm);
    fn(m);
  });
}

// Each rank's error message ("" where it returned), and whether all ended within kNoHang.
std::vector<std::string> errors_on_ranks(int W, const std::function<void(RankModel&)>& fn,
                                         bool* in_time) {
  std::vector<std::string> errors(static_cast<size_t>(W));
  const auto start = std::chrono::steady_clock::now();
  on_ranks(W, [&](RankModel& m) {
    try {
      fn(m);
    } catch (const std::exception& e) {
      errors[m.rank()] = e.what();
    }
  });
  *in_time = std::chrono::steady_clock::now() - start < kNoHang;
  return errors;
}

class EpCheckpointTest : public testing::TempDirTest {
 protected:
  // W = 4 trained three steps and saved to "ck": each rank's state and log-probs.
  void train_and_save_at_four() {
    on_ranks(4, [&](RankModel& m) {
      m.model->init_weights(7);
      m.train(0, 3);
      save_checkpoint(file("ck"), *m.model, *m.opt, info_at(3));
      saved_[m.rank()] = m.state();
      logp_[m.rank()] = m.logp();
    });
  }
  std::vector<double> saved_logp() const {
    std::vector<double> all;
    for (const auto& l : logp_) all.insert(all.end(), l.begin(), l.end());
    return all;
  }
  std::string bytes(const std::string& path) const { return read_file(file(path)); }

  RankState saved_[4];
  std::vector<double> logp_[4];
};

TEST_F(EpCheckpointTest, SavedAtFourRanksLoadsAtAnyWorldSize) {
  train_and_save_at_four();
  const ModelConfig c = ep_config();
  // W = 1 with the existing code path: rank r's shard of its state is what rank r saved.
  RankModel one(c, nullptr);
  one.model->init_weights(99);
  EXPECT_EQ(load_checkpoint(file("ck"), *one.model, *one.opt).step, 3);
  const RankState whole = one.state();
  for (int r = 0; r < 4; ++r) {
    EXPECT_TRUE(same_bits(shard_of(c, *one.backend, whole.params, 4, r), saved_[r].params));
    EXPECT_TRUE(same_bits(shard_of(c, *one.backend, whole.exp_avg, 4, r), saved_[r].exp_avg));
    EXPECT_TRUE(same_bits(shard_of(c, *one.backend, whole.exp_avg_sq, 4, r), saved_[r].exp_avg_sq));
  }
  // The same parameters compute the same outputs; W = 1 sums the experts' rows in another
  // order than W = 4 (as in ExpertParallel.FourRanksMatchSingleRankFloat32): fp32, 2e-5.
  const std::vector<double> want = saved_logp();
  const std::vector<double> got1 = one.logp();
  ASSERT_EQ(got1.size(), want.size());
  for (size_t n = 0; n < want.size(); ++n)
    EXPECT_NEAR(got1[n], want[n], 2e-5 * (1 + std::abs(want[n])));

  for (int W : {2, 4}) {
    std::vector<std::vector<double>> logp(W);
    on_ranks(W, [&](RankModel& m) {
      m.model->init_weights(99);  // different weights, moments, state
      const CheckpointInfo info = load_checkpoint(file("ck"), *m.model, *m.opt);
      EXPECT_EQ(info.step, 3);
      EXPECT_EQ(info.rngs.at(0).offset, 12345u);
      RankState want_state = whole;  // the W = 1 load, sliced for this rank
      want_state.params = shard_of(c, *m.backend, whole.params, W, m.rank());
      want_state.exp_avg = shard_of(c, *m.backend, whole.exp_avg, W, m.rank());
      want_state.exp_avg_sq = shard_of(c, *m.backend, whole.exp_avg_sq, W, m.rank());
      expect_same(m.state(), want_state, m.rank());
      if (W == 4) expect_same(m.state(), saved_[m.rank()], m.rank());
      logp[m.rank()] = m.logp();
    });
    std::vector<double> got;
    for (const auto& l : logp) got.insert(got.end(), l.begin(), l.end());
    if (W == 4) {
      EXPECT_EQ(got, want);  // the saving world size: bit-identical
    }
    ASSERT_EQ(got.size(), want.size());
    for (size_t n = 0; n < want.size(); ++n)
      EXPECT_NEAR(got[n], want[n], 2e-5 * (1 + std::abs(want[n])));
  }
}

TEST_F(EpCheckpointTest, ResumeAtFourRanksContinuesExactly) {
  RankState uninterrupted[4];
  on_ranks(4, [&](RankModel& m) {
    m.model->init_weights(7);
    m.train(0, 3);
    save_checkpoint(file("ck"), *m.model, *m.opt, info_at(3));
    m.train(3, 2);
    uninterrupted[m.rank()] = m.state();
  });
  on_ranks(4, [&](RankModel& m) {
    m.model->init_weights(99);
    m.train(0, 1);  // other moments, counters and balancing state too
    EXPECT_EQ(load_checkpoint(file("ck"), *m.model, *m.opt).step, 3);
    m.train(3, 2);
    expect_same(m.state(), uninterrupted[m.rank()], m.rank());
  });
}

TEST_F(EpCheckpointTest, FilesAreThoseOfOneRankWithTheSameState) {
  const ModelConfig c = ep_config();
  RankModel one(c, nullptr);
  one.model->init_weights(7);
  one.train(0, 2);
  const CheckpointInfo info = info_at(2);
  save_checkpoint(file("one"), *one.model, *one.opt, info);
  save_weights(file("one_w"), *one.model, {{"source", "test"}});
  on_ranks(4, [&](RankModel& m) {
    m.model->init_weights(99);
    Backend& b = *m.backend;
    b.copy(m.model->params().flat(), shard_of(c, b, one.model->params().flat(), 4, m.rank()));
    b.copy(m.opt->exp_avg(), shard_of(c, b, one.opt->exp_avg(), 4, m.rank()));
    b.copy(m.opt->exp_avg_sq(), shard_of(c, b, one.opt->exp_avg_sq(), 4, m.rank()));
    m.opt->set_counters(one.opt->steps_taken(), one.opt->steps_skipped());
    m.model->balance_state() = one.model->balance_state();
    save_checkpoint(file("four"), *m.model, *m.opt, info);
    save_weights(file("four_w"), *m.model, {{"source", "test"}});
  });
  // The manifest holds no time, so it is identical too (git revision: the same build).
  for (const char* f :
       {"model.safetensors", "optimizer.safetensors", "state.safetensors", "manifest.json"})
    EXPECT_TRUE(bytes(std::string("one/") + f) == bytes(std::string("four/") + f)) << f;
  for (const char* f : {"model.safetensors", "manifest.json"})
    EXPECT_TRUE(bytes(std::string("one_w/") + f) == bytes(std::string("four_w/") + f)) << f;
  // Rank 0 alone wrote, and left no staging directory behind.
  EXPECT_EQ(std::distance(std::filesystem::directory_iterator(dir_), {}), 4);
}

TEST_F(EpCheckpointTest, SaveWeightsAndLoadWeightsUnderExpertParallelism) {
  const ModelConfig c = ep_config();
  RankState saved[4];
  on_ranks(4, [&](RankModel& m) {
    m.model->init_weights(7);
    m.train(0, 2);
    save_weights(file("w"), *m.model, {{"source", "test"}});
    saved[m.rank()] = m.state();
  });
  EXPECT_EQ(load_checkpoint_config(file("w")).n_experts, 8);
  RankModel one(c, nullptr);
  load_weights(file("w"), *one.model);
  for (int r = 0; r < 4; ++r)
    EXPECT_TRUE(
        same_bits(shard_of(c, *one.backend, one.model->params().flat(), 4, r), saved[r].params))
        << "rank " << r;
  on_ranks(2, [&](RankModel& m) {
    m.model->init_weights(99);
    load_weights(file("w"), *m.model);
    EXPECT_TRUE(same_bits(m.backend->to_host(m.model->params().flat()),
                          shard_of(c, *m.backend, one.model->params().flat(), 2, m.rank())));
    // A weights-only checkpoint cannot resume a run, on any rank.
    EXPECT_THROW(load_checkpoint(file("w"), *m.model, *m.opt), Error);
  });
}

TEST_F(EpCheckpointTest, CorruptModelFileFailsOnEveryRankWithoutHanging) {
  train_and_save_at_four();
  std::filesystem::copy(file("ck"), file("good"));
  {
    std::fstream f(file("ck/model.safetensors"), std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(-5, std::ios::end);
    f.put('\x7f');
  }
  bool in_time = false;
  auto errors = errors_on_ranks(
      4, [&](RankModel& m) { load_checkpoint(file("ck"), *m.model, *m.opt); }, &in_time);
  EXPECT_TRUE(in_time);
  for (const std::string& e : errors) {
    EXPECT_THAT(e, HasSubstr("model.safetensors"));
    EXPECT_THAT(e, HasSubstr("checksum mismatch"));
  }
  // One rank failing alone (it is given a missing directory) fails the others too.
  errors = errors_on_ranks(
      4, [&](RankModel& m) { load_weights(file(m.rank() == 2 ? "missing" : "good"), *m.model); },
      &in_time);
  EXPECT_TRUE(in_time);
  EXPECT_THAT(errors[2], HasSubstr(file("missing")));
  for (int r : {0, 1, 3})
    EXPECT_THAT(errors[r], HasSubstr("load_weights " + file("good") + ": rank 2 could not load"));
}

TEST_F(EpCheckpointTest, SaveThatRankZeroCannotWriteFailsOnEveryRank) {
  write_file_atomic(file("plain"), "a regular file\n");
  const std::string under_file = file("plain") + "/ck";
  bool in_time = false;
  auto errors = errors_on_ranks(
      4, [&](RankModel& m) { save_checkpoint(under_file, *m.model, *m.opt, {}); }, &in_time);
  EXPECT_TRUE(in_time);
  for (const std::string& e : errors)
    EXPECT_THAT(e, HasSubstr("save_checkpoint " + under_file + ": rank 0 could not write"));
  errors = errors_on_ranks(
      4, [&](RankModel& m) { save_weights(under_file, *m.model); }, &in_time);
  EXPECT_TRUE(in_time);
  for (const std::string& e : errors) EXPECT_THAT(e, HasSubstr("save_weights " + under_file));
  // A failure after the experts were sent (rank 0's manifest entries are not an object)
  // fails every rank too, and publishes nothing.
  errors = errors_on_ranks(
      4,
      [&](RankModel& m) {
        save_weights(file("w"), *m.model,
                     m.rank() == 0 ? nlohmann::json(3) : nlohmann::json::object());
      },
      &in_time);
  EXPECT_TRUE(in_time);
  for (const std::string& e : errors) EXPECT_THAT(e, HasSubstr("must be a JSON object"));
  EXPECT_FALSE(std::filesystem::exists(file("w")));
  EXPECT_EQ(std::distance(std::filesystem::directory_iterator(dir_), {}), 1);  // "plain" only
}

}  // namespace
}  // namespace fm
