// LSE combine: out[row] = sum_k exp2(lse_k - lse) * O_k with lse = log2(sum_k exp2(lse_k)), over the
// splits of every split request. One warp per query row; each lane owns 16 of the 512 columns.
// Empty partials carry lse = -inf and weigh 0; a row whose partials are all empty gets O = 0 and
// LSE = +inf, the same convention the decode kernel uses for requests it finishes itself.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "api.h"
#include "config.h"

namespace vllm_flashmla {
namespace {

constexpr int COMBINE_WARPS = 8;
constexpr int COMBINE_THREADS = COMBINE_WARPS * 32;
constexpr int COLS_PER_LANE = D_V / 32;         // 16 columns = 4 float4 per lane
constexpr int VECS_PER_LANE = COLS_PER_LANE / 4;
static_assert(D_V % (32 * 4) == 0, "a warp covers a row with float4 accesses");
constexpr float LN2 = 0.69314718055994530942f;

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }

template <typename Element>
__global__ void __launch_bounds__(COMBINE_THREADS) combine_kernel(const __grid_constant__ CombineParams params) {
  const int req = blockIdx.x;
  const int row = blockIdx.y * COMBINE_WARPS + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= params.num_q_rows) return;
  const int first = params.num_splits[req];
  const int n = params.num_splits[req + 1] - first;
  if (n <= 1) return;  // finished in place by the decode kernel

  const float* lse_row = params.lse_accum + int64_t(first) * params.num_q_rows + row;
  float max_lse = -INFINITY;
  for (int k = lane; k < n; k += 32) max_lse = fmaxf(max_lse, lse_row[int64_t(k) * params.num_q_rows]);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) max_lse = fmaxf(max_lse, __shfl_xor_sync(0xffffffffu, max_lse, off));

  float sum = 0.f;
  if (max_lse != -INFINITY) {
    for (int k = lane; k < n; k += 32) sum += exp2f(lse_row[int64_t(k) * params.num_q_rows] - max_lse);
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  const float lse_log2 = max_lse + log2f(sum);

  float4 acc[VECS_PER_LANE];
#pragma unroll
  for (int v = 0; v < VECS_PER_LANE; ++v) acc[v] = make_float4(0.f, 0.f, 0.f, 0.f);
  if (sum > 0.f) {
    for (int k = 0; k < n; ++k) {
      const float w = exp2f(lse_row[int64_t(k) * params.num_q_rows] - lse_log2);
      const float4* src = reinterpret_cast<const float4*>(
          params.o_accum + (int64_t(first + k) * params.num_q_rows + row) * D_V);
#pragma unroll
      for (int v = 0; v < VECS_PER_LANE; ++v) {
        const float4 x = src[v * 32 + lane];
        acc[v].x += w * x.x;
        acc[v].y += w * x.y;
        acc[v].z += w * x.z;
        acc[v].w += w * x.w;
      }
    }
  }

  const int i = row / params.h_q, h = row % params.h_q;
  Element* dst = static_cast<Element*>(params.out) + req * params.stride_o_b + i * params.stride_o_s +
                 h * params.stride_o_h;
#pragma unroll
  for (int v = 0; v < VECS_PER_LANE; ++v) {
    const int col = (v * 32 + lane) * 4;
    Element packed[4] = {from_float<Element>(acc[v].x), from_float<Element>(acc[v].y),
                         from_float<Element>(acc[v].z), from_float<Element>(acc[v].w)};
    *reinterpret_cast<uint2*>(dst + col) = *reinterpret_cast<const uint2*>(packed);
  }
  if (lane == 0) {
    params.lse[req * params.stride_lse_b + h * params.stride_lse_h + i] = sum > 0.f ? lse_log2 * LN2 : INFINITY;
  }
}

}  // namespace

cudaError_t run_combine(const CombineParams& params, DType dtype, cudaStream_t stream) {
  const dim3 grid(params.b, (params.num_q_rows + COMBINE_WARPS - 1) / COMBINE_WARPS);
  if (dtype == DType::BFloat16) {
    combine_kernel<__nv_bfloat16><<<grid, COMBINE_THREADS, 0, stream>>>(params);
  } else {
    combine_kernel<__half><<<grid, COMBINE_THREADS, 0, stream>>>(params);
  }
  return cudaGetLastError();
}

}  // namespace vllm_flashmla
