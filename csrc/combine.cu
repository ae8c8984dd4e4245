// LSE combine: out[row] = sum_k exp2(lse_k - lse) * O_k with lse = log2(sum_k exp2(lse_k)), over the
// splits of every split request.
// Empty partials carry lse = -inf and weigh 0; a row whose partials are all empty gets O = 0 and
// LSE = +inf, the same convention the decode kernel uses for requests it finishes itself.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "api.h"
#include "config.h"

namespace vllm_flashmla {
namespace {

// One warp per (query row, quarter of the 512 columns): each lane owns one float4 of the row. The
// merge over splits is a chain of loads of partial outputs, so SPLITS_PER_BATCH splits' loads are
// issued before their weights are applied: one split at a time made a single request split 64 ways
// wait on 64 serial load latencies (b = 1 decode steps ran at 0.6x of FA3-MLA).
constexpr int COLS_PER_WARP = 32 * 4;
constexpr int WARPS_PER_ROW = D_V / COLS_PER_WARP;  // 4
constexpr int ROWS_PER_BLOCK = 2;
constexpr int COMBINE_THREADS = ROWS_PER_BLOCK * WARPS_PER_ROW * 32;
constexpr int SPLITS_PER_BATCH = 8;
static_assert(D_V % COLS_PER_WARP == 0, "a warp covers a row slice with one float4 per lane");
constexpr float LN2 = 0.69314718055994530942f;

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }

__device__ __forceinline__ void fma4(float4& acc, float w, const float4& x) {
  acc.x += w * x.x;
  acc.y += w * x.y;
  acc.z += w * x.z;
  acc.w += w * x.w;
}

template <typename Element>
__global__ void __launch_bounds__(COMBINE_THREADS) combine_kernel(const __grid_constant__ CombineParams params) {
  const int req = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row = blockIdx.y * ROWS_PER_BLOCK + warp / WARPS_PER_ROW;
  const int col = (warp % WARPS_PER_ROW) * COLS_PER_WARP + lane * 4;
  if (row >= params.num_q_rows) return;
  const int first = params.num_splits[req];
  const int n = params.num_splits[req + 1] - first;
  if (n <= 1) return;  // finished in place by the decode kernel

  const int64_t lse_stride = params.num_q_rows;  // between consecutive splits of this row
  const float* lse_row = params.lse_accum + int64_t(first) * lse_stride + row;
  float max_lse = -INFINITY;
  for (int k = lane; k < n; k += 32) max_lse = fmaxf(max_lse, lse_row[k * lse_stride]);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) max_lse = fmaxf(max_lse, __shfl_xor_sync(0xffffffffu, max_lse, off));

  float sum = 0.f;
  if (max_lse != -INFINITY) {
    for (int k = lane; k < n; k += 32) sum += exp2f(lse_row[k * lse_stride] - max_lse);
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  const float lse_log2 = max_lse + log2f(sum);

  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  if (sum > 0.f) {
    const int64_t o_stride = int64_t(params.num_q_rows) * D_V;
    const float* o_row = params.o_accum + (int64_t(first) * params.num_q_rows + row) * D_V + col;
    for (int k0 = 0; k0 < n; k0 += SPLITS_PER_BATCH) {
      float4 x[SPLITS_PER_BATCH];
      float w[SPLITS_PER_BATCH];
#pragma unroll
      for (int j = 0; j < SPLITS_PER_BATCH; ++j) {
        const bool valid = k0 + j < n;
        x[j] = valid ? *reinterpret_cast<const float4*>(o_row + (k0 + j) * o_stride) : make_float4(0.f, 0.f, 0.f, 0.f);
        w[j] = valid ? lse_row[(k0 + j) * lse_stride] : -INFINITY;
      }
#pragma unroll
      for (int j = 0; j < SPLITS_PER_BATCH; ++j) fma4(acc, exp2f(w[j] - lse_log2), x[j]);
    }
  }

  const int i = row / params.h_q, h = row % params.h_q;
  Element* dst = static_cast<Element*>(params.out) + req * params.stride_o_b + i * params.stride_o_s +
                 h * params.stride_o_h + col;
  const Element packed[4] = {from_float<Element>(acc.x), from_float<Element>(acc.y), from_float<Element>(acc.z),
                             from_float<Element>(acc.w)};
  *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<const uint2*>(packed);
  if (lane == 0 && col == 0) {
    params.lse[req * params.stride_lse_b + h * params.stride_lse_h + i] = sum > 0.f ? lse_log2 * LN2 : INFINITY;
  }
}

}  // namespace

cudaError_t run_combine(const CombineParams& params, DType dtype, cudaStream_t stream) {
  const dim3 grid(params.b, (params.num_q_rows + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK);
  if (dtype == DType::BFloat16) {
    combine_kernel<__nv_bfloat16><<<grid, COMBINE_THREADS, 0, stream>>>(params);
  } else {
    combine_kernel<__half><<<grid, COMBINE_THREADS, 0, stream>>>(params);
  }
  return cudaGetLastError();
}

}  // namespace vllm_flashmla
