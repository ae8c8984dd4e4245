// Programmatic dependent launch (PDL) for the kernels of a decode step and across steps.
//
// Every kernel here is launched with programmatic stream serialization allowed, so its CTAs may start
// while the kernel before it in the stream is still running: once that kernel's CTAs have all called
// allow_dependents() or exited. Before wait_for_upstream() a kernel may therefore only do setup that
// touches no global memory (mbarrier init, the TMA descriptor prefetch). wait_for_upstream() returns
// when every upstream grid has completed and its writes are visible; waiting before the first global
// read *or write* also covers write-after-read hazards (the next step's decode writes the o_accum the
// previous step's combine reads). Each kernel allows its dependents as soon as it starts, so the next
// kernel's launch and setup overlap this kernel's tail on the SMs that free up. After a kernel that
// does not use PDL (vLLM's own kernels), the trigger is that kernel's exit and the wait returns at once.
#pragma once

#include <cuda_runtime.h>

#include <utility>

namespace vllm_flashmla {

// Every thread that touches global memory calls this first (the wait is per thread).
__device__ __forceinline__ void wait_for_upstream() { asm volatile("griddepcontrol.wait;" ::: "memory"); }

// The next kernel in the stream may launch once every CTA of this grid has called this (or exited).
__device__ __forceinline__ void allow_dependents() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }

template <typename... KernelArgs, typename... Args>
cudaError_t launch_with_pdl(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem_bytes,
                            cudaStream_t stream, Args&&... args) {
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem_bytes;
  config.stream = stream;
  config.attrs = &attr;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

}  // namespace vllm_flashmla
