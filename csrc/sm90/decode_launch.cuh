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

// A 3-D tensor [outer][rows][cols] of Config::Element (row_stride and outer_stride in elements), loaded
// as boxes of [1][box_rows][BOX_COLS] with 128-byte swizzling, the layout the wgmma descriptors expect.
// Rows past `rows` are outside the tensor: TMA fills them with zeros.
template <typename Config>
cudaError_t make_row_tensor_map(CUtensorMap* map, const void* base, int64_t cols, int64_t rows, int64_t outer,
                                int64_t row_stride, int64_t outer_stride, int box_rows) {
  auto encode = tensor_map_encoder();
  if (encode == nullptr) return cudaErrorSymbolNotFound;
  constexpr int ELEM = int(sizeof(typename Config::Element));
  const cuuint64_t dims[3] = {cuuint64_t(cols), cuuint64_t(rows), cuuint64_t(outer)};
  const cuuint64_t strides[2] = {cuuint64_t(row_stride * ELEM), cuuint64_t(outer_stride * ELEM)};
  const cuuint32_t box[3] = {cuuint32_t(Config::BOX_COLS), cuuint32_t(box_rows), 1};
  const cuuint32_t elem_strides[3] = {1, 1, 1};
  const CUresult res = encode(map, tensor_map_dtype<Config>(), 3, const_cast<void*>(base), dims, strides, box,
                              elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                              CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return res == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

// The cache as [num_pages][PAGE_SIZE][D_QK], loaded a page of 64 keys at a time.
template <typename Config>
cudaError_t make_kv_tensor_map(CUtensorMap* map, const void* k_cache, int64_t num_pages, int64_t stride_kv_page,
                               int64_t stride_kv_token) {
  return make_row_tensor_map<Config>(map, k_cache, D_QK, PAGE_SIZE, num_pages, stride_kv_token, stride_kv_page,
                                     Config::BLOCK_N);
}

// A part of Q as [b][num_q_rows][cols] with q_row_stride between its rows (the binding copies a part
// whose rows have none), loaded a 64-row tile at a time; a tile's padding rows past num_q_rows arrive as
// zeros.
template <typename Config>
cudaError_t make_q_tensor_map(CUtensorMap* map, const QPart& part, int64_t cols, const DecodeParams& params) {
  const int64_t row_stride = q_row_stride(params.s_q, params.h_q, part.stride_s, part.stride_h);
  return make_row_tensor_map<Config>(map, part.ptr, cols, params.num_q_rows, params.b, row_stride, part.stride_b,
                                     Config::BLOCK_M);
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
