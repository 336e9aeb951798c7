// Error checks for CUDA runtime and cuBLAS calls. Every call is wrapped so a
// failure throws fm::Error naming the file, the line, the call text and the
// error string; every kernel launch is followed by FM_CUDA_LAUNCH_CHECK().
//
// This header is included by the kernel (.cu) files as well as the host
// (.cpp) files, so it deliberately pulls in no project header: nvcc builds
// the .cu files as C++17 and the engine headers need C++20. The throwing
// functions are defined in check.cpp.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

namespace fm::cuda {

// Throw fm::Error("<file>:<line>: <call> failed: <name> (<description>)").
[[noreturn]] void throw_cuda_error(cudaError_t err, const char* call, const char* file, int line);
[[noreturn]] void throw_cublas_error(cublasStatus_t status, const char* call, const char* file,
                                     int line);

}  // namespace fm::cuda

#define FM_CUDA_CHECK(call)                                                  \
  do {                                                                       \
    const cudaError_t fm_cuda_err_ = (call);                                 \
    if (fm_cuda_err_ != cudaSuccess)                                         \
      ::fm::cuda::throw_cuda_error(fm_cuda_err_, #call, __FILE__, __LINE__); \
  } while (0)

#define FM_CUBLAS_CHECK(call)                                                   \
  do {                                                                          \
    const cublasStatus_t fm_cublas_st_ = (call);                                \
    if (fm_cublas_st_ != CUBLAS_STATUS_SUCCESS)                                 \
      ::fm::cuda::throw_cublas_error(fm_cublas_st_, #call, __FILE__, __LINE__); \
  } while (0)

// After a kernel launch: reports a bad launch configuration (or an earlier
// asynchronous fault) at the launch site. It does not synchronize.
#define FM_CUDA_LAUNCH_CHECK()                                                         \
  do {                                                                                 \
    const cudaError_t fm_cuda_err_ = cudaGetLastError();                               \
    if (fm_cuda_err_ != cudaSuccess)                                                   \
      ::fm::cuda::throw_cuda_error(fm_cuda_err_, "kernel launch", __FILE__, __LINE__); \
  } while (0)
