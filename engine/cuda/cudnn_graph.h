// A thin C++ layer over cuDNN's backend ("graph") API for the CUDA backend's cuDNN graphs
// (private to engine/cuda/; included only where the build has cuDNN: cudnn_sdpa.cpp):
// descriptors that destroy themselves, and OpGraph, which builds one operation graph --
// tensors, pointwise / matmul / reduction / reshape operations -- and its execution plan from
// cuDNN's heuristics, keeping every descriptor the plan refers to. cuDNN's refusals while
// building throw Refused with cuDNN's own text, so a caller can report them or fall back.
#pragma once

#include <cudnn.h>
#include <fmt/format.h>

#include <array>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace fm::cuda::cudnn {

// A graph, descriptor or plan that cuDNN refuses while it is being built (its callers report
// the text or fall back; errors while running a built plan are theirs to raise).
struct Refused : std::runtime_error {
  using std::runtime_error::runtime_error;
};

inline std::string last_cudnn_error() {
  std::array<char, 1024> text{};
  cudnnGetLastErrorString(text.data(), text.size());
  return text.data();
}

inline std::string describe(cudnnStatus_t status, const char* what) {
  std::string message = fmt::format("{}: {}", what, cudnnGetErrorString(status));
  if (const std::string detail = last_cudnn_error(); !detail.empty())
    message.append(" (").append(detail).append(")");
  return message;
}

inline void refuse_unless(cudnnStatus_t status, const char* what) {
  if (status != CUDNN_STATUS_SUCCESS) throw Refused(describe(status, what));
}

// One backend descriptor, destroyed with its owner.
class Descriptor {
 public:
  explicit Descriptor(cudnnBackendDescriptorType_t type) {
    refuse_unless(cudnnBackendCreateDescriptor(type, &d_), "cudnnBackendCreateDescriptor");
  }
  ~Descriptor() {
    if (d_ != nullptr) (void)cudnnBackendDestroyDescriptor(d_);
  }
  Descriptor(const Descriptor&) = delete;
  Descriptor& operator=(const Descriptor&) = delete;

  cudnnBackendDescriptor_t get() const { return d_; }

  template <class T>
  void set(cudnnBackendAttributeName_t name, cudnnBackendAttributeType_t type, int64_t count,
           const T* values) {
    refuse_unless(cudnnBackendSetAttribute(d_, name, type, count, values),
                  "cudnnBackendSetAttribute");
  }
  void set(cudnnBackendAttributeName_t name, const Descriptor& other) {
    cudnnBackendDescriptor_t handle = other.get();
    set(name, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &handle);
  }
  void finalize(const char* what) { refuse_unless(cudnnBackendFinalize(d_), what); }

 private:
  cudnnBackendDescriptor_t d_ = nullptr;
};

using Dims = std::array<int64_t, 4>;

// One operation graph under construction. Tensors the caller binds get the caller's unique
// ids; virtual ones count up from `first_virtual_uid`.
class OpGraph {
 public:
  explicit OpGraph(int64_t first_virtual_uid) : next_virtual_(first_virtual_uid) {}

  const Descriptor& tensor(int64_t uid, cudnnDataType_t type, const Dims& dims, const Dims& strides,
                           bool is_virtual = false, bool by_value = false,
                           const Descriptor* ragged = nullptr) {
    Descriptor& t = make(CUDNN_BACKEND_TENSOR_DESCRIPTOR);
    const int64_t alignment = 16;
    t.set(CUDNN_ATTR_TENSOR_DATA_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &type);
    t.set(CUDNN_ATTR_TENSOR_DIMENSIONS, CUDNN_TYPE_INT64, 4, dims.data());
    t.set(CUDNN_ATTR_TENSOR_STRIDES, CUDNN_TYPE_INT64, 4, strides.data());
    t.set(CUDNN_ATTR_TENSOR_UNIQUE_ID, CUDNN_TYPE_INT64, 1, &uid);
    t.set(CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, CUDNN_TYPE_INT64, 1, &alignment);
    if (is_virtual) {
      const bool yes = true;
      t.set(CUDNN_ATTR_TENSOR_IS_VIRTUAL, CUDNN_TYPE_BOOLEAN, 1, &yes);
    }
    if (by_value) {
      const bool yes = true;
      t.set(CUDNN_ATTR_TENSOR_IS_BY_VALUE, CUDNN_TYPE_BOOLEAN, 1, &yes);
    }
    if (ragged != nullptr) t.set(CUDNN_ATTR_TENSOR_RAGGED_OFFSET_DESC, *ragged);
    t.finalize("a tensor descriptor");
    return t;
  }
  const Descriptor& virt(cudnnDataType_t type, const Dims& dims, const Dims& strides,
                         const Descriptor* ragged = nullptr) {
    return tensor(next_virtual_++, type, dims, strides, true, false, ragged);
  }
  const Descriptor& scalar(int64_t uid) {
    return tensor(uid, CUDNN_DATA_FLOAT, {1, 1, 1, 1}, {1, 1, 1, 1}, false, true);
  }

  // y = op(x, b, t): pointwise with math precision `prec` (and an axis for GEN_INDEX).
  void pointwise(cudnnPointwiseMode_t mode, cudnnDataType_t prec, const Descriptor& x,
                 const Descriptor* b, const Descriptor* t, const Descriptor& y, int64_t axis = -1) {
    Descriptor& pw = make(CUDNN_BACKEND_POINTWISE_DESCRIPTOR);
    pw.set(CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, 1, &mode);
    pw.set(CUDNN_ATTR_POINTWISE_MATH_PREC, CUDNN_TYPE_DATA_TYPE, 1, &prec);
    if (axis >= 0) pw.set(CUDNN_ATTR_POINTWISE_AXIS, CUDNN_TYPE_INT64, 1, &axis);
    pw.finalize("a pointwise descriptor");
    Descriptor& op = make(CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR);
    op.set(CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, pw);
    op.set(CUDNN_ATTR_OPERATION_POINTWISE_XDESC, x);
    if (b != nullptr) op.set(CUDNN_ATTR_OPERATION_POINTWISE_BDESC, *b);
    if (t != nullptr) op.set(CUDNN_ATTR_OPERATION_POINTWISE_TDESC, *t);
    op.set(CUDNN_ATTR_OPERATION_POINTWISE_YDESC, y);
    const float one = 1.0f;
    op.set(CUDNN_ATTR_OPERATION_POINTWISE_ALPHA1, CUDNN_TYPE_FLOAT, 1, &one);
    if (b != nullptr) op.set(CUDNN_ATTR_OPERATION_POINTWISE_ALPHA2, CUDNN_TYPE_FLOAT, 1, &one);
    op.finalize("a pointwise operation");
    ops_.push_back(op.get());
  }
  // The two-operand float pointwise ops (f32 math).
  void binary(cudnnPointwiseMode_t mode, const Descriptor& x, const Descriptor& b,
              const Descriptor& y) {
    pointwise(mode, CUDNN_DATA_FLOAT, x, &b, nullptr, y);
  }
  void unary(cudnnPointwiseMode_t mode, const Descriptor& x, const Descriptor& y) {
    pointwise(mode, CUDNN_DATA_FLOAT, x, nullptr, nullptr, y);
  }

  // c = a b over the last two axes, batched over the first two (b broadcast over head groups);
  // m, n, k: the sequence-length tensors overriding those GEMM sizes, or null.
  void matmul(const Descriptor& a, const Descriptor& b, const Descriptor& c, const Descriptor* m,
              const Descriptor* n, const Descriptor* k) {
    Descriptor& mm = make(CUDNN_BACKEND_MATMUL_DESCRIPTOR);
    const cudnnDataType_t comp = CUDNN_DATA_FLOAT;
    const double padding = 0.0;
    mm.set(CUDNN_ATTR_MATMUL_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &comp);
    mm.set(CUDNN_ATTR_MATMUL_PADDING_VALUE, CUDNN_TYPE_DOUBLE, 1, &padding);
    mm.finalize("a matmul descriptor");
    Descriptor& op = make(CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR);
    op.set(CUDNN_ATTR_OPERATION_MATMUL_ADESC, a);
    op.set(CUDNN_ATTR_OPERATION_MATMUL_BDESC, b);
    op.set(CUDNN_ATTR_OPERATION_MATMUL_CDESC, c);
    op.set(CUDNN_ATTR_OPERATION_MATMUL_DESC, mm);
    if (m != nullptr) op.set(CUDNN_ATTR_OPERATION_MATMUL_GEMM_M_OVERRIDE_DESC, *m);
    if (n != nullptr) op.set(CUDNN_ATTR_OPERATION_MATMUL_GEMM_N_OVERRIDE_DESC, *n);
    if (k != nullptr) op.set(CUDNN_ATTR_OPERATION_MATMUL_GEMM_K_OVERRIDE_DESC, *k);
    op.finalize("a matmul operation");
    ops_.push_back(op.get());
  }

  void reduction(cudnnReduceTensorOp_t mode, const Descriptor& x, const Descriptor& y) {
    Descriptor& red = make(CUDNN_BACKEND_REDUCTION_DESCRIPTOR);
    const cudnnDataType_t comp = CUDNN_DATA_FLOAT;
    const bool deterministic = false;
    red.set(CUDNN_ATTR_REDUCTION_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &comp);
    red.set(CUDNN_ATTR_REDUCTION_OPERATOR, CUDNN_TYPE_REDUCTION_OPERATOR_TYPE, 1, &mode);
    if (cudnnGetVersion() >= 91100)
      red.set(CUDNN_ATTR_REDUCTION_IS_DETERMINISTIC, CUDNN_TYPE_BOOLEAN, 1, &deterministic);
    red.finalize("a reduction descriptor");
    Descriptor& op = make(CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR);
    op.set(CUDNN_ATTR_OPERATION_REDUCTION_XDESC, x);
    op.set(CUDNN_ATTR_OPERATION_REDUCTION_YDESC, y);
    op.set(CUDNN_ATTR_OPERATION_REDUCTION_DESC, red);
    op.finalize("a reduction operation");
    ops_.push_back(op.get());
  }

  void reshape(const Descriptor& x, const Descriptor& y) {
    Descriptor& op = make(CUDNN_BACKEND_OPERATION_RESHAPE_DESCRIPTOR);
    op.set(CUDNN_ATTR_OPERATION_RESHAPE_XDESC, x);
    op.set(CUDNN_ATTR_OPERATION_RESHAPE_YDESC, y);
    op.finalize("a reshape operation");
    ops_.push_back(op.get());
  }

  // The operation graph over every operation built so far (no handle: finalised without a
  // device, which cuDNN allows for checking).
  Descriptor& graph(cudnnHandle_t handle) {
    Descriptor& graph = make(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR);
    if (handle != nullptr)
      graph.set(CUDNN_ATTR_OPERATIONGRAPH_HANDLE, CUDNN_TYPE_HANDLE, 1, &handle);
    graph.set(CUDNN_ATTR_OPERATIONGRAPH_OPS, CUDNN_TYPE_BACKEND_DESCRIPTOR,
              static_cast<int64_t>(ops_.size()), ops_.data());
    graph.finalize("the operation graph");
    return graph;
  }
  size_t operations() const { return ops_.size(); }

  // The plan of the first engine configuration (heuristics mode A, then the fallback list)
  // whose execution plan finalises: on the handle's device, or (handle null) on the device
  // `device` describes, a device-properties descriptor with which cuDNN chooses and compiles
  // without the device. The chosen engine's global index goes to `engine`. With
  // `compiled_is_enough`, a plan whose kernel compiled but could not be loaded (the CUDA
  // driver is the toolkit's stub) counts: it is returned unfinalised and `*loaded` is false.
  std::unique_ptr<Descriptor> plan(cudnnHandle_t handle, const Descriptor* device = nullptr,
                                   int64_t* engine = nullptr, bool compiled_is_enough = false,
                                   bool* loaded = nullptr) {
    Descriptor& graph = this->graph(handle);
    std::string tried;
    for (cudnnBackendHeurMode_t mode : {CUDNN_HEUR_MODE_A, CUDNN_HEUR_MODE_FALLBACK}) {
      Descriptor& heur = make(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR);
      heur.set(CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, graph);
      heur.set(CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, 1, &mode);
      if (device != nullptr) heur.set(CUDNN_ATTR_ENGINEHEUR_DEVICEPROP, *device);
      if (const cudnnStatus_t st = cudnnBackendFinalize(heur.get()); st != CUDNN_STATUS_SUCCESS) {
        if (tried.empty()) tried = describe(st, "the engine heuristics");
        continue;
      }
      int64_t count = 0;
      refuse_unless(cudnnBackendGetAttribute(heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS,
                                             CUDNN_TYPE_BACKEND_DESCRIPTOR, 0, &count, nullptr),
                    "reading the heuristic's engine count");
      std::vector<std::unique_ptr<Descriptor>> configs;
      std::vector<cudnnBackendDescriptor_t> handles;
      for (int64_t i = 0; i < count; ++i) {
        configs.push_back(std::make_unique<Descriptor>(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR));
        handles.push_back(configs.back()->get());
      }
      int64_t got = 0;
      if (count > 0)
        refuse_unless(
            cudnnBackendGetAttribute(heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS,
                                     CUDNN_TYPE_BACKEND_DESCRIPTOR, count, &got, handles.data()),
            "reading the heuristic's engine configurations");
      for (int64_t i = 0; i < got; ++i) {
        auto plan = std::make_unique<Descriptor>(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR);
        if (device != nullptr)
          plan->set(CUDNN_ATTR_EXECUTION_PLAN_DEVICEPROP, *device);
        else
          plan->set(CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_TYPE_HANDLE, 1, &handle);
        plan->set(CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, *configs[static_cast<size_t>(i)]);
        const cudnnStatus_t st = cudnnBackendFinalize(plan->get());
        const bool unloadable =
            compiled_is_enough && st == CUDNN_STATUS_EXECUTION_FAILED_CUDA_DRIVER;
        if (st == CUDNN_STATUS_SUCCESS || unloadable) {
          if (engine != nullptr) *engine = engine_index(*configs[static_cast<size_t>(i)]);
          if (loaded != nullptr) *loaded = !unloadable;
          for (auto& c : configs) keep_.push_back(std::move(c));
          return plan;
        }
        if (tried.empty()) tried = describe(st, "finalising the execution plan");
      }
    }
    throw Refused(tried.empty() ? std::string("the heuristics offered no engine for the graph")
                                : fmt::format("no engine's plan finalised; the first: {}", tried));
  }

  std::vector<std::unique_ptr<Descriptor>> take_descriptors() { return std::move(keep_); }

  // The global index of an engine configuration's engine (-1 when cuDNN does not say).
  static int64_t engine_index(const Descriptor& config) {
    Descriptor engine(CUDNN_BACKEND_ENGINE_DESCRIPTOR);
    cudnnBackendDescriptor_t handle = engine.get();
    int64_t count = 0, index = -1;
    if (cudnnBackendGetAttribute(config.get(), CUDNN_ATTR_ENGINECFG_ENGINE,
                                 CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &count,
                                 &handle) != CUDNN_STATUS_SUCCESS ||
        cudnnBackendGetAttribute(handle, CUDNN_ATTR_ENGINE_GLOBAL_INDEX, CUDNN_TYPE_INT64, 1,
                                 &count, &index) != CUDNN_STATUS_SUCCESS)
      return -1;
    return index;
  }

 private:
  Descriptor& make(cudnnBackendDescriptorType_t type) {
    keep_.push_back(std::make_unique<Descriptor>(type));
    return *keep_.back();
  }

  int64_t next_virtual_;
  std::vector<std::unique_ptr<Descriptor>> keep_;
  std::vector<cudnnBackendDescriptor_t> ops_;
};

}  // namespace fm::cuda::cudnn
