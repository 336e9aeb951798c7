// Built when the CUDA toolkit is absent: the CUDA backend entry points say so.
#include "engine/backend.h"
#include "engine/error.h"

namespace fm {

std::unique_ptr<Backend> make_cuda_backend(int /*device_index*/) {
  throw Error("this foremoe build has no CUDA backend (configured without a CUDA toolkit)");
}

bool cuda_available() {
  return false;
}

}  // namespace fm
