// Host side of the decode kernel: the TMA descriptor of the paged KV cache, the smem attribute and
// the launch. Included once per element type by decode_<type>.cu.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "../api.h"
#include "decode_kernel.cuh"

namespace vllm_flashmla::sm90 {

// cuTensorMapEncodeTiled through the runtime's driver entry point, so the extension needs no -lcuda.
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

// The cache as a 3-D tensor [num_pages][PAGE_SIZE][D_QK] (innermost first below), loaded as boxes of
// [1 page][64 keys][64 columns] with 128-byte swizzling, the layout the wgmma descriptors expect.
template <typename Config>
cudaError_t make_kv_tensor_map(CUtensorMap* map, const void* k_cache, int64_t num_pages, int64_t stride_kv_page,
                               int64_t stride_kv_token) {
  auto encode = tensor_map_encoder();
  if (encode == nullptr) return cudaErrorSymbolNotFound;
  constexpr int ELEM = int(sizeof(typename Config::Element));
  const cuuint64_t dims[3] = {cuuint64_t(D_QK), cuuint64_t(PAGE_SIZE), cuuint64_t(num_pages)};
  const cuuint64_t strides[2] = {cuuint64_t(stride_kv_token * ELEM), cuuint64_t(stride_kv_page * ELEM)};
  const cuuint32_t box[3] = {cuuint32_t(Config::BOX_COLS), cuuint32_t(Config::BLOCK_N), 1};
  const cuuint32_t elem_strides[3] = {1, 1, 1};
  constexpr CUtensorMapDataType DTYPE = std::is_same_v<typename Config::Element, cutlass::bfloat16_t>
                                            ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                            : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  const CUresult res = encode(map, DTYPE, 3,
                              const_cast<void*>(k_cache), dims, strides, box, elem_strides,
                              CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                              CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return res == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

// How many clusters of `config`'s shape fit on the current GPU at once (0 if the query fails),
// computed once per device and kernel.
template <typename Kernel>
int max_resident_clusters(Kernel kernel, const cudaLaunchConfig_t& config) {
  constexpr int MAX_DEVICES = 64;
  static int cached[MAX_DEVICES] = {};  // 0: not yet queried; otherwise the count + 1
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= MAX_DEVICES) return 0;
  if (cached[device] == 0) {
    int clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) != cudaSuccess) {
      (void)cudaGetLastError();  // a failed query is not the launch's error
      clusters = 0;
    }
    cached[device] = clusters + 1;
  }
  return cached[device] - 1;
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

  auto kernel = &decode_kernel<Config>;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM_BYTES);
  if (err != cudaSuccess) return err;
  const int num_m_blocks = (params.num_q_rows + Config::BLOCK_M - 1) / Config::BLOCK_M;
  cudaLaunchAttribute cluster;
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = 1;
  cluster.val.clusterDim.y = 1;
  cluster.val.clusterDim.z = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(num_m_blocks, params.num_sm_parts);
  config.blockDim = dim3(Config::NUM_THREADS);
  config.dynamicSmemBytes = SMEM_BYTES;
  config.stream = stream;
  config.attrs = &cluster;
  config.numAttrs = 1;
  // The m-blocks of a part share its pages through a cluster (config.h) when they pair up evenly and
  // every cluster of the grid fits on the GPU at once (otherwise the grid would run in waves).
  if (num_m_blocks % Config::KV_SHARE == 0) {
    cluster.val.clusterDim.x = Config::KV_SHARE;
    if (max_resident_clusters(kernel, config) * Config::KV_SHARE < num_m_blocks * params.num_sm_parts) {
      cluster.val.clusterDim.x = 1;
    }
  }
  err = cudaLaunchKernelEx(&config, kernel, params, tmap_kv);
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

}  // namespace vllm_flashmla::sm90
