// Host entry points of the kernels. Raw pointers and params only: torch_binding.cpp is the one file
// that sees torch tensors and fills these structs.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "params.h"

namespace vllm_flashmla {

enum class DType { BFloat16, Float16 };

// Writes params.records and params.num_splits. One warp; no host synchronization.
// The plans are built in dynamic shared memory of scheduler_smem_bytes(b, num_sm_parts) bytes, which
// must not exceed the device's opt-in limit per block (227 KiB on Hopper: about 57k requests).
size_t scheduler_smem_bytes(int64_t b, int64_t num_sm_parts);
cudaError_t run_scheduler(const SchedParams& params, cudaStream_t stream);

// Decode over the schedule, then (if any request is split) the LSE combine, both on `stream`.
// `k_cache` is [num_pages, PAGE_SIZE, D_QK] with the given element strides (last dim contiguous).
cudaError_t run_decode(const DecodeParams& params, DType dtype, const void* k_cache, int64_t num_pages,
                       int64_t stride_kv_page, int64_t stride_kv_token, cudaStream_t stream);

// Merge the fp32 partials of split requests into `out`/`lse` (requests with one split are skipped).
cudaError_t run_combine(const CombineParams& params, DType dtype, cudaStream_t stream);

}  // namespace vllm_flashmla
