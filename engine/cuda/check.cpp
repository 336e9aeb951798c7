#include "engine/cuda/check.h"

#include <fmt/format.h>

#include "engine/error.h"

namespace fm::cuda {

void throw_cuda_error(cudaError_t err, const char* call, const char* file, int line) {
  throw Error(fmt::format("{}:{}: {} failed: {} ({})", file, line, call, cudaGetErrorName(err),
                          cudaGetErrorString(err)));
}

void throw_cublas_error(cublasStatus_t status, const char* call, const char* file, int line) {
  throw Error(fmt::format("{}:{}: {} failed: cuBLAS status {} ({})", file, line, call,
                          static_cast<int>(status), cublasGetStatusString(status)));
}

}  // namespace fm::cuda
