// Host side of the decode kernel: the TMA descriptors of the paged KV cache and of Q, the smem
// attribute and the launch. Included once per element type by decode_<type>.cu.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "../api.h"
#include "decode_kernel.cuh"
#include "tensor_map_encoder.h"

namespace vllm_flashmla::sm90 {

template <typename Config>
constexpr CUtensorMapDataType tensor_map_dtype() {
  return std::is_same_v<typename Config::Element, cutlass::bfloat16_t> ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                                                        : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
}

// A RANK-D tensor of Config::Element, dims[0] its contiguous columns (dims and strides innermost first,
// strides in elements for dims 1..RANK-1), loaded as boxes whose first dim is BOX_COLS with 128-byte
// swizzling, the layout the wgmma descriptors expect. Box parts outside the tensor arrive as zeros.
template <typename Config, int RANK>
cudaError_t make_tensor_map(CUtensorMap* map, const void* base, const int64_t (&dims)[RANK],
                            const int64_t (&strides)[RANK - 1], const int (&box)[RANK]) {
  static_assert(2 <= RANK && RANK <= 5, "a map of columns and 1 to 4 outer dims (TMA takes at most 5)");
  auto encode = tensor_map_encoder();
  if (encode == nullptr) return cudaErrorSymbolNotFound;
  constexpr int ELEM = int(sizeof(typename Config::Element));
  cuuint64_t dims_[RANK], strides_[RANK - 1];
  cuuint32_t box_[RANK], elem_strides[RANK];
  for (int i = 0; i < RANK; ++i) {
    dims_[i] = cuuint64_t(dims[i]);
    box_[i] = cuuint32_t(box[i]);
    elem_strides[i] = 1;
    if (i > 0) strides_[i - 1] = cuuint64_t(strides[i - 1] * ELEM);
  }
  const CUresult res = encode(map, tensor_map_dtype<Config>(), RANK, const_cast<void*>(base), dims_, strides_, box_,
                              elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                              CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return res == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

// The cache as [num_pages][PAGE_SIZE][D_QK], loaded a page of 64 keys at a time.
template <typename Config>
cudaError_t make_kv_tensor_map(CUtensorMap* map, const void* k_cache, int64_t num_pages, int64_t stride_kv_page,
                               int64_t stride_kv_token) {
  return make_tensor_map<Config, 3>(map, k_cache, {D_QK, PAGE_SIZE, num_pages}, {stride_kv_token, stride_kv_page},
                                    {Config::BOX_COLS, Config::BLOCK_N, 1});
}

// A part of Q as [b][tokens][heads][cols] (params.h, q_map_heads), loaded a BLOCK_M-row tile at a time as a
// box of [1][BLOCK_M / box heads][box heads][BOX_COLS]: whole heads of consecutive tokens, or BLOCK_M rows of
// the packed dimension. Box rows past the part (s_q * h_q not a multiple of BLOCK_M, or past s_q) arrive as
// zeros, so the tile's padding rows score 0.
template <typename Config>
cudaError_t make_q_tensor_map(CUtensorMap* map, const QPart& part, int64_t cols, const DecodeParams& params) {
  const bool tiled = q_heads_tile(params.h_q);
  const int64_t heads = params.q_map_heads, tokens = tiled ? params.s_q : 1;
  const int64_t head_stride = q_map_head_stride(params.s_q, params.h_q, part.stride_s, part.stride_h);
  if (head_stride < 0) return cudaErrorInvalidValue;  // the binding copies such a part; not reached
  // One token: its stride is never applied, so any valid one (the request stride) stands in for it.
  const int64_t token_stride = tokens > 1 ? part.stride_s : part.stride_b;
  const int box_heads = tiled && params.h_q < Config::BLOCK_M ? params.h_q : Config::BLOCK_M;  // divides BLOCK_M
  return make_tensor_map<Config, 4>(map, part.ptr, {cols, heads, tokens, params.b},
                                    {head_stride, token_stride, part.stride_b},
                                    {Config::BOX_COLS, box_heads, Config::BLOCK_M / box_heads, 1});
}

template <typename Element>
cudaError_t launch_decode(const DecodeParams& params, const void* k_cache, int64_t num_pages, int64_t stride_kv_page,
                          int64_t stride_kv_token, cudaStream_t stream) {
  using Config = DecodeConfig<Element>;
  constexpr int SMEM_BYTES = decode_smem_bytes<Config>();
  static_assert(SMEM_BYTES <= SM90_MAX_SMEM_PER_CTA, "decode CTA exceeds sm90 shared memory");

  CUtensorMap tmap_kv;
  cudaError_t err = make_kv_tensor_map<Config>(&tmap_kv, k_cache, num_pages, stride_kv_page, stride_kv_token);
  if (err != cudaSuccess) return err;
  CUtensorMap tmap_q, tmap_q_rope;
  err = make_q_tensor_map<Config>(&tmap_q, params.q, D_V, params);
  if (err != cudaSuccess) return err;
  err = make_q_tensor_map<Config>(&tmap_q_rope, params.q_rope, D_ROPE, params);
  if (err != cudaSuccess) return err;

  const int num_m_blocks = (params.num_q_rows + Config::BLOCK_M - 1) / Config::BLOCK_M;
  auto kernel = num_m_blocks > 1 ? &decode_kernel<Config, true> : &decode_kernel<Config, false>;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM_BYTES);
  if (err != cudaSuccess) return err;
  const dim3 grid(num_m_blocks, params.num_sm_parts);
  kernel<<<grid, Config::NUM_THREADS, SMEM_BYTES, stream>>>(params, tmap_kv, tmap_q, tmap_q_rope);
  return cudaGetLastError();
}

}  // namespace vllm_flashmla::sm90
