// The driver's cuTensorMapEncodeTiled, reached through the runtime's entry-point query so that nothing
// links -lcuda: the decode kernel's launch and benchmarks/load_ceiling.cu both encode their TMA maps
// with it. Needs only the CUDA headers (no CUTLASS), so a standalone probe can include it.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

namespace vllm_flashmla::sm90 {

// nullptr when the driver does not provide it.
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult status;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &status) !=
            cudaSuccess ||
        status != cudaDriverEntryPointSuccess) {
      fn = nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encode;
}

}  // namespace vllm_flashmla::sm90
