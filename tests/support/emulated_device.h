// EmulatedDevice: a Backend that stands in for a GPU on machines without one, so that code
// written against Backend can be checked, on the CPU, for host access to device memory.
//
// Its device() is cuda:0 and its tensors are device tensors (Device::cuda(0)) allocated
// through an Allocator registered for DeviceKind::cuda, but that memory is host memory and
// every op runs the CPU reference backend on CPU views of it: results are bit-identical to
// the CPU backend's. What it checks is where tensors live, as the CUDA backend does:
// - every op rejects a tensor that is not on cuda:0 (a host tensor given to a device op);
// - copy() is the only way between host and device (host <-> device and device <-> device,
//   like CudaBackend::copy);
// - Tensor::data<T>() throws for its tensors, and the CPU backend rejects them, so host code
//   that reads or writes device memory directly fails loudly.
// Fresh allocations are filled with 0xff bytes (NaN floats, -1 ints), as device memory from a
// caching allocator holds stale data: reading memory that no op wrote shows up as a
// difference from the CPU run.
//
// Only usable in a process without a real CUDA backend: both register the allocator for
// DeviceKind::cuda, and a real one stays registered once created (the constructor throws
// then). gtest_discover_tests runs every test in its own process, so tests that use it can
// share a suite binary with real-GPU tests.
#pragma once

#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "engine/backend.h"
#include "engine/error.h"

namespace fm::testing {

class EmulatedDevice final : public Backend {
 public:
  EmulatedDevice() : cpu_(make_cpu_backend()) {
    Allocator* current = nullptr;
    try {
      current = &allocator_for(DeviceKind::cuda);
    } catch (const Error&) {
      // none registered yet
    }
    FM_CHECK(current == nullptr || current == &host_allocator(),
             "EmulatedDevice: a real CUDA backend's allocator is registered in this process; "
             "the emulated device needs a process without one");
    set_allocator(DeviceKind::cuda, &host_allocator());
  }

  Device device() const override { return Device::cuda(0); }
  const char* name() const override { return "emulated-cuda"; }

  // --- memory ---------------------------------------------------------------
  void fill(Tensor& x, double value) override {
    Tensor h = dev(x, "fill", "x");
    cpu_->fill(h, value);
  }
  // Host <-> device and device <-> device (the CUDA backend's reach).
  void copy(Tensor& dst, const Tensor& src) override {
    Tensor d = reachable(dst, "dst"), s = reachable(src, "src");
    if (dst.is_cpu() && !src.is_cpu()) ++downloads_;
    cpu_->copy(d, s);
  }
  // Device -> host copies so far: on a real GPU each one waits for the stream.
  int64_t downloads() const { return downloads_; }

  // --- dense linear algebra ---------------------------------------------------
  void matmul(Tensor& c, const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, double alpha,
              double beta) override {
    const char* op = "matmul";
    Tensor hc = dev(c, op, "c");
    cpu_->matmul(hc, dev(a, op, "a"), trans_a, dev(b, op, "b"), trans_b, alpha, beta);
  }
  void grouped_matmul(Tensor& y, const Tensor& x, const Tensor& w, bool trans_w,
                      const std::vector<int64_t>& off) override {
    const char* op = "grouped_matmul";
    Tensor hy = dev(y, op, "y");
    cpu_->grouped_matmul(hy, dev(x, op, "x"), dev(w, op, "w"), trans_w, off);
  }
  void grouped_weight_grad(Tensor& dw, const Tensor& dy, const Tensor& x,
                           const std::vector<int64_t>& off) override {
    const char* op = "grouped_weight_grad";
    Tensor hdw = dev(dw, op, "dw");
    cpu_->grouped_weight_grad(hdw, dev(dy, op, "dy"), dev(x, op, "x"), off);
  }
  // Device-side offsets stay on the device: the CPU backend reads them through its views.
  void grouped_matmul_device(Tensor& y, const Tensor& x, const Tensor& w, bool trans_w,
                             const Tensor& off) override {
    const char* op = "grouped_matmul_device";
    Tensor hy = dev(y, op, "y");
    cpu_->grouped_matmul_device(hy, dev(x, op, "x"), dev(w, op, "w"), trans_w, dev(off, op, "off"));
  }

  // --- elementwise and reductions ----------------------------------------------
  void axpy(Tensor& y, double alpha, const Tensor& x) override {
    Tensor hy = dev(y, "axpy", "y");
    cpu_->axpy(hy, alpha, dev(x, "axpy", "x"));
  }
  void scale(Tensor& x, double alpha) override {
    Tensor hx = dev(x, "scale", "x");
    cpu_->scale(hx, alpha);
  }
  double sum_squares(const Tensor& x) override {
    return cpu_->sum_squares(dev(x, "sum_squares", "x"));
  }
  void rowwise_dot(Tensor& out, const Tensor& a, const Tensor& b) override {
    const char* op = "rowwise_dot";
    Tensor ho = dev(out, op, "out");
    cpu_->rowwise_dot(ho, dev(a, op, "a"), dev(b, op, "b"));
  }
  void column_sum(Tensor& out, const Tensor& x) override {
    Tensor ho = dev(out, "column_sum", "out");
    cpu_->column_sum(ho, dev(x, "column_sum", "x"));
  }
  void add_row_vector(Tensor& x, const Tensor& v, double alpha) override {
    Tensor hx = dev(x, "add_row_vector", "x");
    cpu_->add_row_vector(hx, dev(v, "add_row_vector", "v"), alpha);
  }
  void scale_rows(Tensor& out, const Tensor& x, const Tensor& w) override {
    const char* op = "scale_rows";
    Tensor ho = dev(out, op, "out");
    cpu_->scale_rows(ho, dev(x, op, "x"), dev(w, op, "w"));
  }

  // --- embedding, RMSNorm, RoPE, attention ---------------------------------------
  void embedding_forward(Tensor& out, const Tensor& table, const Tensor& ids) override {
    const char* op = "embedding_forward";
    Tensor ho = dev(out, op, "out");
    cpu_->embedding_forward(ho, dev(table, op, "table"), dev(ids, op, "ids"));
  }
  void embedding_backward(Tensor& dtable, const Tensor& dout, const Tensor& ids) override {
    const char* op = "embedding_backward";
    Tensor hd = dev(dtable, op, "dtable");
    cpu_->embedding_backward(hd, dev(dout, op, "dout"), dev(ids, op, "ids"));
  }
  void rmsnorm_forward(Tensor& y, Tensor& rstd, const Tensor& x, const Tensor& w,
                       double eps) override {
    const char* op = "rmsnorm_forward";
    Tensor hy = dev(y, op, "y"), hr = dev(rstd, op, "rstd");
    cpu_->rmsnorm_forward(hy, hr, dev(x, op, "x"), dev(w, op, "w"), eps);
  }
  void rmsnorm_backward(Tensor& dx, Tensor& dw, const Tensor& dy, const Tensor& x, const Tensor& w,
                        const Tensor& rstd) override {
    const char* op = "rmsnorm_backward";
    Tensor hdx = dev(dx, op, "dx"), hdw = dev(dw, op, "dw");
    cpu_->rmsnorm_backward(hdx, hdw, dev(dy, op, "dy"), dev(x, op, "x"), dev(w, op, "w"),
                           dev(rstd, op, "rstd"));
  }
  void rope(Tensor& x, const Tensor& pos, double theta, bool inverse) override {
    Tensor hx = dev(x, "rope", "x");
    cpu_->rope(hx, dev(pos, "rope", "pos"), theta, inverse);
  }
  void attention_forward(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k,
                         const Tensor& v, const Tensor& seq_off, double scale) override {
    const char* op = "attention_forward";
    Tensor ho = dev(out, op, "out"), hl = dev(lse, op, "lse");
    cpu_->attention_forward(ho, hl, dev(q, op, "q"), dev(k, op, "k"), dev(v, op, "v"),
                            dev(seq_off, op, "seq_off"), scale);
  }
  void attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout, const Tensor& q,
                          const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                          const Tensor& seq_off, double scale) override {
    const char* op = "attention_backward";
    Tensor hdq = dev(dq, op, "dq"), hdk = dev(dk, op, "dk"), hdv = dev(dv, op, "dv");
    cpu_->attention_backward(hdq, hdk, hdv, dev(dout, op, "dout"), dev(q, op, "q"), dev(k, op, "k"),
                             dev(v, op, "v"), dev(out, op, "out"), dev(lse, op, "lse"),
                             dev(seq_off, op, "seq_off"), scale);
  }
  void attention_cached(Tensor& out, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                        const Tensor& slot, const Tensor& pos, double scale) override {
    const char* op = "attention_cached";
    Tensor ho = dev(out, op, "out");
    cpu_->attention_cached(ho, dev(q, op, "q"), dev(k_cache, op, "k_cache"),
                           dev(v_cache, op, "v_cache"), dev(slot, op, "slot"), dev(pos, op, "pos"),
                           scale);
  }

  // --- SwiGLU, router pieces -----------------------------------------------------
  void swiglu_forward(Tensor& h, const Tensor& gate, const Tensor& up) override {
    const char* op = "swiglu_forward";
    Tensor hh = dev(h, op, "h");
    cpu_->swiglu_forward(hh, dev(gate, op, "gate"), dev(up, op, "up"));
  }
  void swiglu_backward(Tensor& dgate, Tensor& dup, const Tensor& dh, const Tensor& gate,
                       const Tensor& up) override {
    const char* op = "swiglu_backward";
    Tensor hg = dev(dgate, op, "dgate"), hu = dev(dup, op, "dup");
    cpu_->swiglu_backward(hg, hu, dev(dh, op, "dh"), dev(gate, op, "gate"), dev(up, op, "up"));
  }
  void softmax_forward(Tensor& probs, const Tensor& logits) override {
    Tensor hp = dev(probs, "softmax_forward", "probs");
    cpu_->softmax_forward(hp, dev(logits, "softmax_forward", "logits"));
  }
  void softmax_backward(Tensor& dlogits, const Tensor& dprobs, const Tensor& probs) override {
    const char* op = "softmax_backward";
    Tensor hd = dev(dlogits, op, "dlogits");
    cpu_->softmax_backward(hd, dev(dprobs, op, "dprobs"), dev(probs, op, "probs"));
  }
  void topk(Tensor& ids, const Tensor& scores, const Tensor& bias) override {
    Tensor hi = dev(ids, "topk", "ids");
    cpu_->topk(hi, dev(scores, "topk", "scores"), optional(bias, "topk", "bias"));
  }
  void gather_cols(Tensor& out, const Tensor& x, const Tensor& ids) override {
    const char* op = "gather_cols";
    Tensor ho = dev(out, op, "out");
    cpu_->gather_cols(ho, dev(x, op, "x"), dev(ids, op, "ids"));
  }
  void scatter_add_cols(Tensor& dx, const Tensor& dout, const Tensor& ids) override {
    const char* op = "scatter_add_cols";
    Tensor hd = dev(dx, op, "dx");
    cpu_->scatter_add_cols(hd, dev(dout, op, "dout"), dev(ids, op, "ids"));
  }
  void normalize_rows_forward(Tensor& g, const Tensor& p) override {
    Tensor hg = dev(g, "normalize_rows_forward", "g");
    cpu_->normalize_rows_forward(hg, dev(p, "normalize_rows_forward", "p"));
  }
  void normalize_rows_backward(Tensor& dp, const Tensor& dg, const Tensor& p) override {
    const char* op = "normalize_rows_backward";
    Tensor hd = dev(dp, op, "dp");
    cpu_->normalize_rows_backward(hd, dev(dg, op, "dg"), dev(p, op, "p"));
  }

  // --- token permutation, LM head loss, optimizer ------------------------------------
  void gather_rows(Tensor& out, const Tensor& src, const Tensor& idx) override {
    const char* op = "gather_rows";
    Tensor ho = dev(out, op, "out");
    cpu_->gather_rows(ho, dev(src, op, "src"), dev(idx, op, "idx"));
  }
  void scatter_rows(Tensor& dst, const Tensor& src, const Tensor& idx) override {
    const char* op = "scatter_rows";
    Tensor hd = dev(dst, op, "dst");
    cpu_->scatter_rows(hd, dev(src, op, "src"), dev(idx, op, "idx"));
  }
  void scatter_add_rows(Tensor& dst, const Tensor& src, const Tensor& idx,
                        const Tensor& w) override {
    const char* op = "scatter_add_rows";
    Tensor hd = dev(dst, op, "dst");
    cpu_->scatter_add_rows(hd, dev(src, op, "src"), dev(idx, op, "idx"), optional(w, op, "w"));
  }
  void sort_assignments(Tensor& offsets, Tensor& perm_assign, Tensor& perm_token,
                        const Tensor& key) override {
    const char* op = "sort_assignments";
    Tensor ho = dev(offsets, op, "offsets"), ha = dev(perm_assign, op, "perm_assign");
    Tensor ht = dev(perm_token, op, "perm_token");
    cpu_->sort_assignments(ho, ha, ht, dev(key, op, "key"));
  }
  void logprob_forward(Tensor& logp, Tensor& entropy, Tensor& lse, const Tensor& logits,
                       const Tensor& targets) override {
    const char* op = "logprob_forward";
    Tensor hp = dev(logp, op, "logp"), he = dev(entropy, op, "entropy"), hl = dev(lse, op, "lse");
    cpu_->logprob_forward(hp, he, hl, dev(logits, op, "logits"), dev(targets, op, "targets"));
  }
  void logprob_backward(Tensor& dlogits, const Tensor& dlogp, const Tensor& dentropy,
                        const Tensor& logits, const Tensor& lse, const Tensor& targets) override {
    const char* op = "logprob_backward";
    Tensor hd = dev(dlogits, op, "dlogits");
    cpu_->logprob_backward(hd, dev(dlogp, op, "dlogp"), optional(dentropy, op, "dentropy"),
                           dev(logits, op, "logits"), dev(lse, op, "lse"),
                           dev(targets, op, "targets"));
  }
  void adamw_step(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, double lr, double beta1,
                  double beta2, double eps, double weight_decay, int64_t step) override {
    const char* op = "adamw_step";
    Tensor hp = dev(param, op, "param"), hm = dev(m, op, "m"), hv = dev(v, op, "v");
    cpu_->adamw_step(hp, dev(grad, op, "grad"), hm, hv, lr, beta1, beta2, eps, weight_decay, step);
  }

 private:
  // Host memory posing as device memory; one object for the process, so tensors may outlive
  // the backend that made them.
  struct HostAsDevice final : Allocator {
    void* allocate(size_t bytes) override {
      const size_t rounded = (bytes + 63) / 64 * 64;
      void* p = std::aligned_alloc(64, rounded == 0 ? 64 : rounded);
      FM_CHECK(p != nullptr, "EmulatedDevice: out of host memory allocating {} bytes", bytes);
      std::memset(p, 0xff, rounded == 0 ? 64 : rounded);  // stale device memory: NaN / -1
      return p;
    }
    void deallocate(void* p) override { std::free(p); }
  };
  static HostAsDevice& host_allocator() {
    static HostAsDevice a;
    return a;
  }

  static Tensor host_view(const Tensor& t) {
    return Tensor::view(const_cast<void*>(t.raw()), t.shape(), t.dtype(), Device::cpu());
  }
  // A device operand: must be a defined tensor on this device; returns its CPU view.
  Tensor dev(const Tensor& t, const char* op, const char* name) const {
    FM_CHECK(t.defined(), "emulated device: {}: {} is undefined", op, name);
    FM_CHECK(t.device() == device(), "emulated device: {}: {} is {}, expected a tensor on {}", op,
             name, t.describe(), device_name(device()));
    return host_view(t);
  }
  // An operand the op allows to be undefined.
  Tensor optional(const Tensor& t, const char* op, const char* name) const {
    return t.defined() ? dev(t, op, name) : Tensor();
  }
  // copy() reaches host memory and this device.
  Tensor reachable(const Tensor& t, const char* name) const {
    FM_CHECK(t.defined(), "emulated device: copy: {} is undefined", name);
    if (t.is_cpu()) return t;
    return dev(t, "copy", name);
  }

  std::unique_ptr<Backend> cpu_;
  int64_t downloads_ = 0;
};

}  // namespace fm::testing
