// LSE combine: out[row] = sum_k exp2(lse_k - lse) * O_k with lse = log2(sum_k exp2(lse_k)), over the
// splits of every split request.
// Empty partials carry lse = -inf and weigh 0; a row whose partials are all empty gets O = 0 and
// LSE = +inf, the same convention the decode kernel uses for requests it finishes itself.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "api.h"
#include "config.h"

namespace vllm_flashmla {
namespace {

// Work decomposition. The merge is a latency-bound gather of fp32 partials that the decode kernel has
// just left in L2, so what matters is how many loads are in flight, not arithmetic:
//  * a warp merges one row over D_V / COL_SLICES value columns, each lane VECS float4 of them, with
//    the grid's z axis over the COL_SLICES slices. Two tilings (below): quarter rows keep 4x more
//    warps in flight, whole rows compute the row's LSE once instead of four times and launch 4x fewer
//    CTAs, which pays once the whole-row grid alone has a CTA for every SM (perf notes round 9: 1.04-1.10x
//    at b = 16 and 32, h_q = 128; down to 0.91x at b = 1 to 16 where that grid is 2-64 CTAs);
//  * WARPS_PER_ROW warps share a row and take every WARPS_PER_ROW-th split, then add up in shared
//    memory. A step with few rows in all (b * s_q * h_q <= FEW_ROWS) whose requests have many splits
//    each (b = 1: 33-132) uses 8 warps per row, so a row's splits load in one or two rounds; otherwise
//    there are enough rows to keep loads in flight with 1 (8 warps per row measured slower at
//    b = 4, h_q = 128 and at b = 16, h_q = 16 on H100);
//  * each warp issues SPLITS_PER_BATCH splits' loads (VECS float4 each) before it uses any of them,
//    and where the grid is small it issues its first batch before it computes the row's LSE.
// The grid covers min(b, num_sm_parts) request slots: at most num_sm_parts requests can be split, so
// a large batch does not launch a CTA per (request, row) just to find most requests unsplit.
constexpr int COLS_PER_VEC = 32 * 4;  // one float4 per lane of a warp
constexpr int WARPS_PER_CTA = 8;
constexpr int COMBINE_THREADS = WARPS_PER_CTA * 32;
constexpr int MANY_SPLITS = 8;  // parts per request from which a row may get all 8 warps
constexpr int FEW_ROWS = 128;   // query rows of the whole step up to which it does

template <int COL_SLICES_, int SPLITS_PER_BATCH_> struct Tiling {
  static constexpr int COL_SLICES = COL_SLICES_;
  static constexpr int VECS = D_V / (COL_SLICES * COLS_PER_VEC);  // float4 per lane per split
  static constexpr int SPLITS_PER_BATCH = SPLITS_PER_BATCH_;
  static_assert(D_V % (COL_SLICES * COLS_PER_VEC) == 0, "a slice is whole float4 per lane");
};
using QuarterRows = Tiling<4, 8>;  // 8 loads in flight per lane
using WholeRows = Tiling<1, 4>;    // 16 loads in flight per lane

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }

__device__ __forceinline__ void fma4(float4& acc, float w, const float4& x) {
  acc.x += w * x.x;
  acc.y += w * x.y;
  acc.z += w * x.z;
  acc.w += w * x.w;
}

// log2 of the row's total softmax mass over its n partials (-inf when every partial is empty). Every
// warp of the row computes it itself: n <= num_sm_parts, a few loads per lane.
__device__ __forceinline__ float row_lse_log2(const float* lse_row, int64_t stride, int n, int lane) {
  float max_lse = -INFINITY;
  for (int k = lane; k < n; k += 32) max_lse = fmaxf(max_lse, lse_row[k * stride]);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) max_lse = fmaxf(max_lse, __shfl_xor_sync(0xffffffffu, max_lse, off));
  if (max_lse == -INFINITY) return -INFINITY;
  float sum = 0.f;
  for (int k = lane; k < n; k += 32) sum += exp2f(lse_row[k * stride] - max_lse);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  return max_lse + log2f(sum);
}

// A warp's batch of splits k0, k0 + WARPS_PER_ROW, ...: their LSEs and VECS float4 of their partials.
// Clamped instead of predicated, so that all loads issue.
template <int WARPS_PER_ROW, typename Tiles>
__device__ __forceinline__ void load_batch(const float* lse_row, int64_t lse_stride, const float* o_row,
                                           int64_t o_stride, int k0, int n, float (&w)[Tiles::SPLITS_PER_BATCH],
                                           float4 (&x)[Tiles::SPLITS_PER_BATCH][Tiles::VECS]) {
#pragma unroll
  for (int j = 0; j < Tiles::SPLITS_PER_BATCH; ++j) {
    const int k = min(k0 + j * WARPS_PER_ROW, n - 1);
    w[j] = lse_row[k * lse_stride];
#pragma unroll
    for (int v = 0; v < Tiles::VECS; ++v) {
      x[j][v] = *reinterpret_cast<const float4*>(o_row + k * o_stride + v * COLS_PER_VEC);
    }
  }
}

template <typename Element, int WARPS_PER_ROW, typename Tiles, bool HOIST_FIRST_BATCH>
__global__ void __launch_bounds__(COMBINE_THREADS) combine_kernel(const __grid_constant__ CombineParams params) {
  constexpr int ROWS_PER_CTA = WARPS_PER_CTA / WARPS_PER_ROW;
  constexpr int VECS = Tiles::VECS;
  static_assert(WARPS_PER_CTA % WARPS_PER_ROW == 0, "whole rows per CTA");
  __shared__ float4 partial_sum[WARPS_PER_ROW > 1 ? WARPS_PER_CTA : 1][VECS][32];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row = blockIdx.y * ROWS_PER_CTA + warp / WARPS_PER_ROW;
  const int split_lane = warp % WARPS_PER_ROW;  // this warp takes splits split_lane, +WARPS_PER_ROW, ...
  const int col = blockIdx.z * (VECS * COLS_PER_VEC) + lane * 4;  // the lane's first column; +COLS_PER_VEC
  const int64_t lse_stride = params.num_q_rows;  // between consecutive splits of one row
  const int64_t o_stride = lse_stride * D_V;

  for (int req = blockIdx.x; req < params.b; req += gridDim.x) {
    const int first = params.num_splits[req];
    const int n = params.num_splits[req + 1] - first;
    if (n <= 1) continue;  // finished in place by the decode kernel
    // Rows past the end still take part in the block-wide barrier below, with nothing to load.
    const bool active = row < params.num_q_rows;
    const float* lse_row = params.lse_accum + int64_t(first) * lse_stride + row;
    const float* o_row = params.o_accum + (int64_t(first) * params.num_q_rows + row) * D_V + col;
    float4 x[Tiles::SPLITS_PER_BATCH][VECS];
    float w[Tiles::SPLITS_PER_BATCH];
    // Hoisted, the first batch's loads are in flight while the row's LSE is computed.
    if (HOIST_FIRST_BATCH && active) {
      load_batch<WARPS_PER_ROW, Tiles>(lse_row, lse_stride, o_row, o_stride, split_lane, n, w, x);
    }
    const float lse_log2 = active ? row_lse_log2(lse_row, lse_stride, n, lane) : -INFINITY;

    float4 acc[VECS];
#pragma unroll
    for (int v = 0; v < VECS; ++v) acc[v] = make_float4(0.f, 0.f, 0.f, 0.f);
    if (lse_log2 != -INFINITY) {
      for (int k0 = split_lane; k0 < n; k0 += Tiles::SPLITS_PER_BATCH * WARPS_PER_ROW) {
        if (!HOIST_FIRST_BATCH || k0 != split_lane) {
          load_batch<WARPS_PER_ROW, Tiles>(lse_row, lse_stride, o_row, o_stride, k0, n, w, x);
        }
#pragma unroll
        for (int j = 0; j < Tiles::SPLITS_PER_BATCH; ++j) {
          if (k0 + j * WARPS_PER_ROW >= n) continue;
          const float weight = exp2f(w[j] - lse_log2);
#pragma unroll
          for (int v = 0; v < VECS; ++v) fma4(acc[v], weight, x[j][v]);
        }
      }
    }

    if constexpr (WARPS_PER_ROW > 1) {
#pragma unroll
      for (int v = 0; v < VECS; ++v) partial_sum[warp][v][lane] = acc[v];
      __syncthreads();
      if (split_lane == 0) {
#pragma unroll
        for (int w = 1; w < WARPS_PER_ROW; ++w) {
#pragma unroll
          for (int v = 0; v < VECS; ++v) fma4(acc[v], 1.f, partial_sum[warp + w][v][lane]);
        }
      }
      __syncthreads();  // partial_sum is reused by the next request of this CTA
    }
    if (!active || split_lane != 0) continue;

    Element* dst = output_row<Element>(params, req, row) + col;
#pragma unroll
    for (int v = 0; v < VECS; ++v) {
      const Element packed[4] = {from_float<Element>(acc[v].x), from_float<Element>(acc[v].y),
                                 from_float<Element>(acc[v].z), from_float<Element>(acc[v].w)};
      *reinterpret_cast<uint2*>(dst + v * COLS_PER_VEC) = *reinterpret_cast<const uint2*>(packed);
    }
    if (lane == 0 && blockIdx.z == 0) {
      *output_lse(params, req, row) = lse_log2 != -INFINITY ? lse_log2 * LN2 : INFINITY;
    }
  }
}

// The grid: request slots x row groups x column slices.
template <int WARPS_PER_ROW, typename Tiles> dim3 combine_grid(const CombineParams& params) {
  constexpr int ROWS_PER_CTA = WARPS_PER_CTA / WARPS_PER_ROW;
  return dim3(std::min(params.b, params.num_sm_parts), (params.num_q_rows + ROWS_PER_CTA - 1) / ROWS_PER_CTA,
              Tiles::COL_SLICES);
}

// The hoisted first batch doubles a thread's registers (40 -> 80, perf notes round 10), which halves the
// CTAs an SM holds; it is used only where the grid has at most one CTA per SM and the occupancy is
// not needed. Whole rows are taken only when their grid has a CTA for every SM, so they never hoist.
template <typename Element, int WARPS_PER_ROW, typename Tiles>
void launch(const CombineParams& params, cudaStream_t stream) {
  const dim3 grid = combine_grid<WARPS_PER_ROW, Tiles>(params);
  if constexpr (!std::is_same_v<Tiles, WholeRows>) {
    if (int64_t(grid.x) * grid.y * grid.z <= params.num_sms) {
      combine_kernel<Element, WARPS_PER_ROW, Tiles, true><<<grid, COMBINE_THREADS, 0, stream>>>(params);
      return;
    }
  }
  combine_kernel<Element, WARPS_PER_ROW, Tiles, false><<<grid, COMBINE_THREADS, 0, stream>>>(params);
}

template <typename Element>
void launch(const CombineParams& params, cudaStream_t stream) {
  if (params.b * params.num_q_rows <= FEW_ROWS && params.num_sm_parts >= MANY_SPLITS * params.b) {
    launch<Element, WARPS_PER_CTA, QuarterRows>(params, stream);
  } else if (const dim3 whole = combine_grid<1, WholeRows>(params); int64_t(whole.x) * whole.y >= params.num_sms) {
    launch<Element, 1, WholeRows>(params, stream);
  } else {
    launch<Element, 1, QuarterRows>(params, stream);
  }
}

}  // namespace

cudaError_t run_combine(const CombineParams& params, DType dtype, cudaStream_t stream) {
  if (dtype == DType::BFloat16) {
    launch<__nv_bfloat16>(params, stream);
  } else {
    launch<__half>(params, stream);
  }
  return cudaGetLastError();
}

}  // namespace vllm_flashmla
