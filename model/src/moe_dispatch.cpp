// The expert-parallel MoE layer (model/expert_parallel.h): this rank's assignments are
// permuted by destination (the home expert, or a replica slot, per the layer's placement),
// the per-(destination, group) counts are exchanged, the rows go out in one all-to-all,
// every rank runs the grouped expert GEMMs over the rows it received, and the outputs come
// back in a second all-to-all for the gate-weighted combine. Backward mirrors the two
// all-to-alls. Groups on a rank: its E/W home experts in expert order, then its S replica
// slots in slot order; within a group, rows by source rank.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <exception>
#include <stdexcept>
#include <utility>

#include "engine/error.h"
#include "model/src/blocks.h"

namespace fm::blocks {

namespace {

// Elements of `rows` rows of `width` values each.
std::vector<int64_t> elements(const std::vector<int64_t>& rows, int64_t width) {
  std::vector<int64_t> out(rows.size());
  for (size_t i = 0; i < rows.size(); ++i) out[i] = rows[i] * width;
  return out;
}

// Rows of source rank `source` that the plan sends to group `group` of rank `rank`.
int64_t planned_rows(const LayerPlacement& plan, int source, int rank, int64_t group) {
  const int64_t El = plan.experts_per_rank();
  const bool home = group < El;
  const int32_t expert =
      home ? static_cast<int32_t>(rank * El + group) : plan.slots[rank][group - El];
  if (expert < 0) return 0;
  const ExpertInstance to{rank,
                          home ? ExpertInstance::kHomeSlot : static_cast<int32_t>(group - El)};
  int64_t rows = 0;
  for (const TokenShare& s : plan.split[expert][source])
    if (s.instance == to) rows += s.tokens;
  return rows;
}

// What is wrong with this rank's part of `plan` for the local load, or "". Other ranks'
// columns of the load matrix are theirs to check: they are taken from the plan here.
std::string check_plan(const ModelConfig& c, const LayerPlacement& plan, int W, int rank,
                       const std::vector<int64_t>& load, ReplicaWeights* replicas,
                       const std::string& what) {
  const int64_t E = c.n_experts;
  if (plan.world_size != W || plan.n_experts != E)
    return fmt::format("{}: the plan is for {} ranks x {} experts, the model runs {} x {}", what,
                       plan.world_size, plan.n_experts, W, E);
  bool shaped = static_cast<int64_t>(plan.split.size()) == E;
  for (int64_t e = 0; shaped && e < E; ++e) shaped = static_cast<int>(plan.split[e].size()) == W;
  LoadMatrix check(static_cast<size_t>(E), std::vector<int64_t>(static_cast<size_t>(W), 0));
  for (int64_t e = 0; e < E; ++e)
    for (int r = 0; r < W; ++r)
      check[e][r] = r == rank ? load[e] : shaped ? plan.tokens(static_cast<int32_t>(e), r) : 0;
  try {
    validate_placement(plan, check, what);
  } catch (const std::invalid_argument& err) {
    return err.what();
  }
  int64_t slot_rows = 0;
  for (int64_t e = 0; e < E; ++e)
    for (int r = 0; r < W; ++r)
      for (const TokenShare& s : plan.split[e][r])
        if (s.instance.rank == rank && !s.instance.is_home()) slot_rows += s.tokens;
  if (slot_rows == 0) return "";
  if (replicas == nullptr)
    return fmt::format(
        "{}: the plan sends {} rows to this rank's replica slots, but the model has no replica "
        "weights (MoeTransformer::set_replica_weights)",
        what, slot_rows);
  if (replicas->slots_per_rank() != plan.replica_slots)
    return fmt::format("{}: the plan has {} replica slots per rank, the replica weights {}", what,
                       plan.replica_slots, replicas->slots_per_rank());
  return "";
}

}  // namespace

void moe_parallel_forward(Backend& b, const ModelConfig& c, const LayerWeights& w,
                          const LayerBalanceState& state, const std::vector<int32_t>* replay_ids,
                          const MoeParallelLayer& p, MoeActs& a, Tensor& y, const Tensor& x,
                          bool router_stats) {
  Communicator& comm = *p.comm;
  const int W = comm.size(), rank = comm.rank();
  const int64_t N = x.dim(0), H = c.hidden, E = c.n_experts, K = c.top_k, El = E / W;
  const int64_t NK = N * K;
  const DType dt = x.dtype();
  const std::string what = fmt::format("MoE layer {} on rank {}", p.moe_layer, rank);
  const LayerPlacement* plan = p.plan;
  const int64_t S = plan != nullptr ? std::max<int32_t>(plan->replica_slots, 0) : 0;
  const int64_t G = El + S;  // groups per rank: home experts, then replica slots

  // 1. Route, then key every assignment by (destination rank, group there): the first shares
  //    of (expert, this rank) in assignment order go to the first share's instance, etc.
  std::string error = p.caller_error;
  std::vector<int64_t> to(static_cast<size_t>(W * G), 0);  // rows to (rank q, group g)
  if (error.empty()) {
    try {
      moe_route(b, c, w, state, replay_ids, a, x);
      std::vector<int64_t> load(static_cast<size_t>(E), 0);
      for (int32_t e : a.host_ids) ++load[e];
      if (plan != nullptr) error = check_plan(c, *plan, W, rank, load, p.replicas, what);
      if (error.empty()) {
        // shares[e]: (end of the share in e's assignment order, key), nonempty shares only.
        std::vector<std::vector<std::pair<int64_t, int32_t>>> shares(static_cast<size_t>(E));
        for (int64_t e = 0; e < E; ++e) {
          if (plan == nullptr) {
            const int64_t home = e / El;
            shares[e].push_back({load[e], static_cast<int32_t>(home * G + e - home * El)});
            continue;
          }
          int64_t end = 0;
          for (const TokenShare& s : plan->split[e][rank]) {
            if (s.tokens == 0) continue;
            const ExpertInstance& in = s.instance;
            end += s.tokens;
            shares[e].push_back(
                {end, static_cast<int32_t>(in.rank * G +
                                           (in.is_home() ? e - in.rank * El : El + in.slot))});
          }
        }
        std::vector<int32_t> key(static_cast<size_t>(NK));
        std::vector<int64_t> seen(static_cast<size_t>(E), 0);
        std::vector<size_t> share(static_cast<size_t>(E), 0);
        for (int64_t j = 0; j < NK; ++j) {
          const int32_t e = a.host_ids[j];
          const int64_t i = seen[e]++;
          while (shares[e][share[e]].first <= i) ++share[e];
          key[j] = shares[e][share[e]].second;
        }
        const std::vector<int64_t> off = permute_assignments(b, key, W * G, K, a);
        for (int64_t i = 0; i < W * G; ++i) to[i] = off[i + 1] - off[i];
      }
    } catch (const std::exception& err) {
      error = fmt::format("{}: {}", what, err.what());
    }
  }

  // 2. Counts exchange: to each rank q, [ok, rows for each of q's G groups]. A rank that
  //    cannot go on says so here, so that every rank stops with an error, none waits.
  std::vector<int64_t> msg(static_cast<size_t>(W * (G + 1))), got(msg.size());
  for (int q = 0; q < W; ++q) {
    msg[q * (G + 1)] = error.empty() ? 1 : 0;
    std::copy_n(to.begin() + q * G, G, msg.begin() + q * (G + 1) + 1);
  }
  const std::vector<int64_t> per_rank(static_cast<size_t>(W), G + 1);
  comm.all_to_all(msg.data(), per_rank, got.data(), per_rank, DType::i64);
  if (!error.empty()) throw Error(error);
  for (int q = 0; q < W; ++q)
    FM_CHECK(got[q * (G + 1)] == 1,
             "{}: rank {} could not run this layer (its error names the problem), so this rank "
             "stops too",
             what, q);
  auto from = [&](int q, int64_t g) { return got[q * (G + 1) + 1 + g]; };
  if (plan != nullptr)
    for (int q = 0; q < W; ++q)
      for (int64_t g = 0; g < G; ++g)
        FM_CHECK(from(q, g) == planned_rows(*plan, q, rank, g),
                 "{}: rank {} sends {} rows to group {} here, this rank's copy of the plan says "
                 "{} (every rank must run the same plan)",
                 what, q, from(q, g), g, planned_rows(*plan, q, rank, g));

  // 3. Dispatch: rows by destination out, rows by source in.
  MoeDispatch& d = a.ep;
  d = MoeDispatch{};
  d.comm = &comm;
  d.send_rows.assign(static_cast<size_t>(W), 0);
  d.recv_rows.assign(static_cast<size_t>(W), 0);
  for (int q = 0; q < W; ++q)
    for (int64_t g = 0; g < G; ++g) {
      d.send_rows[q] += to[q * G + g];
      d.recv_rows[q] += from(q, g);
    }
  int64_t R = 0;
  for (int64_t r : d.recv_rows) R += r;
  Tensor xs = b.empty({NK, H}, dt);
  b.gather_rows(xs, x, a.perm_token);
  Tensor xr = b.empty({R, H}, dt);
  b.synchronize();  // device buffers must be written before the communicator reads them
  comm.all_to_all(xs.raw(), elements(d.send_rows, H), xr.raw(), elements(d.recv_rows, H), dt);

  // 4. Regroup the received rows by group (then source) for the grouped GEMMs.
  std::vector<int64_t> start(static_cast<size_t>(W * G)), goff(static_cast<size_t>(G + 1), 0);
  int64_t row = 0;
  for (int q = 0; q < W; ++q)
    for (int64_t g = 0; g < G; ++g) {
      start[q * G + g] = row;
      row += from(q, g);
    }
  std::vector<int32_t> regroup, ungroup(static_cast<size_t>(R));
  regroup.reserve(static_cast<size_t>(R));
  for (int64_t g = 0; g < G; ++g) {
    for (int q = 0; q < W; ++q)
      for (int64_t i = 0; i < from(q, g); ++i)
        regroup.push_back(static_cast<int32_t>(start[q * G + g] + i));
    goff[g + 1] = static_cast<int64_t>(regroup.size());
  }
  for (int64_t i = 0; i < R; ++i) ungroup[regroup[i]] = static_cast<int32_t>(i);
  d.regroup = b.upload(regroup, {R});
  d.ungroup = b.upload(ungroup, {R});
  Tensor xg = b.empty({R, H}, dt), yg = b.empty({R, H}, dt);
  b.gather_rows(xg, xr, d.regroup);

  // 5. Experts: home groups on the home weights, replica slots on the slot weights.
  d.home_rows = goff[El];
  a.experts.offsets.assign(goff.begin(), goff.begin() + El + 1);
  a.experts.x = xg.slice(0, d.home_rows);
  Tensor y_home = yg.slice(0, d.home_rows);
  experts_forward(b, w.experts, a.experts, y_home);
  if (R > d.home_rows) {
    d.slot_weights = &p.replicas->slot_weights(p.moe_layer);
    if (const DType cdt = w.experts.w_gate.dtype(); d.slot_weights->w_gate.dtype() != cdt) {
      for (auto [to, from] : {std::pair{&d.slot_compute.w_gate, &d.slot_weights->w_gate},
                              {&d.slot_compute.w_up, &d.slot_weights->w_up},
                              {&d.slot_compute.w_down, &d.slot_weights->w_down}}) {
        *to = b.empty(from->shape(), cdt);
        b.convert(*to, *from);
      }
    }
    d.slot_grads = &p.replicas->slot_grads(p.moe_layer);
    for (int64_t g = El; g <= G; ++g) d.slots.offsets.push_back(goff[g] - d.home_rows);
    d.slots.x = xg.slice(d.home_rows, R);
    Tensor y_slots = yg.slice(d.home_rows, R);
    experts_forward(b, compute_slot_weights(d), d.slots, y_slots);
  }

  // 6. Combine: outputs back to their sources, then the gate-weighted sum.
  Tensor yr = b.empty({R, H}, dt);
  b.gather_rows(yr, yg, d.ungroup);
  a.yp = b.empty({NK, H}, dt);
  b.synchronize();
  comm.all_to_all(yr.raw(), elements(d.recv_rows, H), a.yp.raw(), elements(d.send_rows, H), dt);
  a.perm_gate = b.empty({NK, 1}, dt);
  b.gather_rows(a.perm_gate, a.gates.reshape({NK, 1}), a.perm_assign);
  moe_combine(b, c, w, a, y, x);
  if (!router_stats) return;

  // 7. Router statistics of the global micro-batch: [load (E), prob sums (E), tokens].
  Tensor col = b.empty({E}, a.probs.dtype());  // f32 under mixed precision, as in moe_forward
  b.column_sum(col, a.probs);
  const std::vector<double> prob_sum = b.download_f64(col);
  std::vector<double> stats(static_cast<size_t>(2 * E + 1), 0.0);
  for (int32_t e : a.host_ids) stats[e] += 1.0;
  std::copy(prob_sum.begin(), prob_sum.end(), stats.begin() + E);
  stats[2 * E] = static_cast<double>(N);
  comm.all_reduce(stats.data(), 2 * E + 1, DType::f64, ReduceOp::sum);
  a.load.resize(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; ++e) a.load[e] = std::llround(stats[e]);
  a.prob_sum.assign(stats.begin() + E, stats.begin() + 2 * E);
  a.tokens = std::llround(stats[2 * E]);
  a.balance = balance_term(c.balance, state, a.prob_sum, a.load, a.tokens, K);
}

void moe_parallel_backward(Backend& b, const ModelConfig& c, const LayerWeights& w, LayerWeights& g,
                           const MoeActs& a, Tensor& dx, const Tensor& dy, const Tensor& x,
                           double balance_scale) {
  const MoeDispatch& d = a.ep;
  Communicator& comm = *d.comm;
  const int64_t N = x.dim(0), H = c.hidden, K = c.top_k, NK = N * K;
  const int64_t R = d.regroup.numel();
  const DType dt = x.dtype();

  // d gates and d(expert output rows) at the source; the row gradients go to the experts.
  Tensor dperm_gate = b.empty({NK}, stat_dtype(dt)), dys = b.empty({NK, H}, dt);
  moe_combine_backward(b, a, dy, dperm_gate, dys);
  Tensor dyr = b.empty({R, H}, dt), dyg = b.empty({R, H}, dt);
  b.synchronize();
  comm.all_to_all(dys.raw(), elements(d.send_rows, H), dyr.raw(), elements(d.recv_rows, H), dt);
  b.gather_rows(dyg, dyr, d.regroup);

  // Expert backward: home experts' gradients collect every source's rows here.
  Tensor dxg = b.empty({R, H}, dt);
  Tensor dy_home = dyg.slice(0, d.home_rows), dx_home = dxg.slice(0, d.home_rows);
  experts_backward(b, w.experts, g.experts, a.experts, dy_home, dx_home);
  if (R > d.home_rows) {
    Tensor dy_slots = dyg.slice(d.home_rows, R), dx_slots = dxg.slice(d.home_rows, R);
    experts_backward(b, compute_slot_weights(d), *d.slot_grads, d.slots, dy_slots, dx_slots);
  }

  // d(input rows) back to the sources, then the local input and router backward.
  Tensor dxr = b.empty({R, H}, dt), dxs = b.empty({NK, H}, dt);
  b.gather_rows(dxr, dxg, d.ungroup);
  b.synchronize();
  comm.all_to_all(dxr.raw(), elements(d.recv_rows, H), dxs.raw(), elements(d.send_rows, H), dt);
  moe_input_backward(b, c, w, g, a, dperm_gate, dxs, dx, dy, x, balance_scale);
}

}  // namespace fm::blocks
