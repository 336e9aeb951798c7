// cuBLASLt dense GEMMs (gemm_lt.h). Row-major problems run as their column-major transposes,
// as in gemm.cpp: c^T = op(b)^T op(a)^T, so cuBLASLt's A is our b, its B our a, m and n swap,
// and each stored row-major [r, s] matrix with row stride ld is the column-major [s, r] one
// with leading dimension ld.
#include "engine/cuda/gemm_lt.h"

#include <climits>

#include "engine/cuda/check.h"
#include "engine/error.h"

namespace fm::cuda {

namespace {

// The largest power of two (at most 256, cuBLASLt's default assumption) dividing the address.
int64_t alignment(const void* p) {
  const auto address = reinterpret_cast<uintptr_t>(p);
  int64_t align = 256;
  while (align > 1 && address % static_cast<uintptr_t>(align) != 0) align /= 2;
  return align;
}

void check_type(cudaDataType_t ab, cudaDataType_t c) {
  FM_CHECK((ab == CUDA_R_32F && c == CUDA_R_32F) ||
               (ab == CUDA_R_16BF && (c == CUDA_R_16BF || c == CUDA_R_32F)),
           "CUDA backend: cuBLASLt matmul: unsupported type combination (inputs {}, output {})",
           static_cast<int>(ab), static_cast<int>(c));
}

// The column-major layout of a stored row-major matrix whose op is [rows, cols] (rows x cols
// after the transpose flag): stored [rows, ld] untransposed, [cols, ld] transposed.
cublasLtMatrixLayout_t layout(cudaDataType_t type, int64_t rows, int64_t cols, bool trans,
                              int64_t ld) {
  cublasLtMatrixLayout_t l = nullptr;
  // Column-major view of the stored matrix: ld is its leading dimension; it has as many
  // columns as the stored matrix has rows.
  const uint64_t stored_rows = static_cast<uint64_t>(trans ? cols : rows);
  const uint64_t stored_cols = static_cast<uint64_t>(trans ? rows : cols);
  FM_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&l, type, stored_cols, stored_rows, ld));
  return l;
}

}  // namespace

LtGemm::LtGemm() {
  FM_CUBLAS_CHECK(cublasLtCreate(&handle_));
  const cudaError_t err = cudaMalloc(&workspace_, kWorkspaceBytes);
  if (err != cudaSuccess) {
    (void)cublasLtDestroy(handle_);
    throw_cuda_error(err, "cudaMalloc(cuBLASLt workspace)", __FILE__, __LINE__);
  }
}

LtGemm::~LtGemm() {
  for (auto& [key, plan] : plans_) destroy(plan);
  (void)cudaFree(workspace_);
  (void)cublasLtDestroy(handle_);
}

void LtGemm::destroy(Plan& plan) noexcept {
  if (plan.a != nullptr) (void)cublasLtMatrixLayoutDestroy(plan.a);
  if (plan.b != nullptr) (void)cublasLtMatrixLayoutDestroy(plan.b);
  if (plan.c != nullptr) (void)cublasLtMatrixLayoutDestroy(plan.c);
  if (plan.op != nullptr) (void)cublasLtMatmulDescDestroy(plan.op);
  plan = Plan{};
}

LtGemm::Plan& LtGemm::plan_for(const TypedGemm& p) {
  const Key key{p.ab_type, p.c_type, p.trans_a,      p.trans_b,      p.m,           p.n, p.k, p.lda,
                p.ldb,     p.ldc,    alignment(p.a), alignment(p.b), alignment(p.c)};
  if (auto it = plans_.find(key); it != plans_.end()) return it->second;
  if (plans_.size() >= kMaxPlans) {  // token counts vary run-long: keep the cache bounded
    for (auto& [k, old] : plans_) destroy(old);
    plans_.clear();
  }

  Plan plan;
  cublasLtMatmulPreference_t pref = nullptr;
  try {
    FM_CUBLAS_CHECK(cublasLtMatmulDescCreate(&plan.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    // cuBLASLt's A is our b and its B our a (see the file comment).
    const cublasOperation_t ta = p.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    const cublasOperation_t tb = p.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    FM_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(plan.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
    FM_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(plan.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
    // Our op(b) is [k, n]: as cuBLASLt's A it is op(A) [n, k] column-major; our op(a) [m, k]
    // is its op(B) [k, m]; c [m, n] is its [n, m].
    plan.a = layout(p.ab_type, p.k, p.n, p.trans_b, p.ldb);
    plan.b = layout(p.ab_type, p.m, p.k, p.trans_a, p.lda);
    plan.c = layout(p.c_type, p.m, p.n, false, p.ldc);

    FM_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    const uint64_t workspace = kWorkspaceBytes;
    FM_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace, sizeof(workspace)));
    const uint32_t align_a = static_cast<uint32_t>(key[11]);  // cuBLASLt's A: our b
    const uint32_t align_b = static_cast<uint32_t>(key[10]);
    const uint32_t align_c = static_cast<uint32_t>(key[12]);
    FM_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_a, sizeof(align_a)));
    FM_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_b, sizeof(align_b)));
    FM_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_c, sizeof(align_c)));
    FM_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_c, sizeof(align_c)));

    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(
        handle_, plan.op, plan.a, plan.b, plan.c, plan.c, pref, 1, &result, &found);
    if (st != CUBLAS_STATUS_NOT_SUPPORTED) FM_CUBLAS_CHECK(st);
    plan.found = st == CUBLAS_STATUS_SUCCESS && found >= 1 &&
                 result.state == CUBLAS_STATUS_SUCCESS && result.workspaceSize <= kWorkspaceBytes;
    if (plan.found) plan.algo = result.algo;
    (void)cublasLtMatmulPreferenceDestroy(pref);
  } catch (...) {
    if (pref != nullptr) (void)cublasLtMatmulPreferenceDestroy(pref);
    destroy(plan);
    throw;
  }
  return plans_.emplace(key, plan).first->second;
}

bool LtGemm::run(cudaStream_t stream, const TypedGemm& p, float alpha, float beta) {
  check_type(p.ab_type, p.c_type);
  FM_CHECK(p.m >= 1 && p.n >= 1 && p.k >= 1 && p.m <= INT_MAX && p.n <= INT_MAX && p.k <= INT_MAX,
           "CUDA backend: cuBLASLt matmul: bad shape {} x {} x {}", p.m, p.n, p.k);
  const Plan& plan = plan_for(p);
  if (!plan.found) return false;
  // c is both cuBLASLt's C (read when beta != 0) and its D (written): one layout for both.
  FM_CUBLAS_CHECK(cublasLtMatmul(handle_, plan.op, &alpha, p.b, plan.a, p.a, plan.b, &beta, p.c,
                                 plan.c, p.c, plan.c, &plan.algo, workspace_, kWorkspaceBytes,
                                 stream));
  return true;
}

}  // namespace fm::cuda
