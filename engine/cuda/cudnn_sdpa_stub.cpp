// CudnnSdpa in a CUDA build without cuDNN (engine/CMakeLists.txt picks this file or
// cudnn_sdpa.cpp): available() is false, so the backend never makes one and attention runs on
// foremoe's kernels; the members throw should that change.
#include "engine/cuda/cudnn_sdpa.h"
#include "engine/error.h"

namespace fm::cuda {

struct CudnnSdpa::Impl {};

bool CudnnSdpa::available() {
  return false;
}

SdpaCheck CudnnSdpa::check_graph(const SdpaProblem&, bool, const std::string&) {
  SdpaCheck check;
  check.refusal = "this foremoe build has no cuDNN";
  return check;
}

CudnnSdpa::CudnnSdpa(CUstream_st*) {
  throw Error("cuDNN attention: this foremoe build has no cuDNN (configured without it)");
}
CudnnSdpa::~CudnnSdpa() = default;

bool CudnnSdpa::prepare(const SdpaProblem&, size_t*, std::string* why) {
  *why = "this foremoe build has no cuDNN";
  return false;
}
void CudnnSdpa::run(const SdpaProblem&, const SdpaArgs&, void*) {
  throw Error("cuDNN attention: this foremoe build has no cuDNN (configured without it)");
}
size_t CudnnSdpa::plans() const {
  return 0;
}

}  // namespace fm::cuda
