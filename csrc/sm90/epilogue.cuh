// The three ways a CTA finishes a request: the final output of a request it covered alone, an fp32
// partial of a split request (merged later by combine.cu), and the empty case, which is the final path
// with a zero row sum: O = 0 and LSE = +inf for the output, LSE = -inf for a partial.
#pragma once

#include "../params.h"
#include "primitives.h"
#include "shared_storage.h"
#include "softmax.cuh"

namespace vllm_flashmla::sm90 {

template <typename Config>
struct Epilogue {
  using Element = typename Config::Element;
  using Smem = SharedStorage<Config>;
  static constexpr float LN2 = 0.69314718055994530942f;

  // Row sums of both warpgroups, added in a fixed order so both see the same bits.
  __device__ static void total_row_sum(Smem& smem, const OnlineSoftmax<Config>& softmax, int wg, int wg_tid,
                                       float (&total)[2]) {
    const int lane = wg_tid % 32, r0 = 16 * (wg_tid / 32) + lane / 4;
    float mine[2];
    softmax.quad_sum(mine);
    if (lane % 4 == 0) {
      smem.row_sum[wg][r0] = mine[0];
      smem.row_sum[wg][r0 + 8] = mine[1];
    }
    named_barrier_sync(NamedBarrier::RowSum, Config::NUM_MMA_THREADS);
    total[0] = smem.row_sum[0][r0] + smem.row_sum[1][r0];
    total[1] = smem.row_sum[0][r0 + 8] + smem.row_sum[1][r0 + 8];
  }

  __device__ static void store(Smem& smem, const DecodeParams& params, const OnlineSoftmax<Config>& softmax,
                               const float (&o)[Config::O_FRAG], int req, int m_block, bool is_split, int slot,
                               int wg, int wg_tid) {
    float total[2];
    total_row_sum(smem, softmax, wg, wg_tid, total);
    const int lane = wg_tid % 32, r0 = 16 * (wg_tid / 32) + lane / 4;
    const int col0 = wg * Config::O_COLS_PER_WG + 2 * (lane % 4);

#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = m_block * Config::BLOCK_M + r0 + 8 * half;
      if (row >= params.num_q_rows) continue;
      const float inv_sum = total[half] > 0.f ? 1.f / total[half] : 0.f;
      const float lse_log2 = softmax.lse_log2(half, total[half]);
      if (is_split) {
        float* dst = params.o_accum + (int64_t(slot) * params.num_q_rows + row) * D_V + col0;
#pragma unroll
        for (int j = 0; j < Config::O_FRAG / 4; ++j) {
          *reinterpret_cast<float2*>(dst + 8 * j) =
              make_float2(o[4 * j + 2 * half] * inv_sum, o[4 * j + 2 * half + 1] * inv_sum);
        }
        if (wg == 0 && lane % 4 == 0) params.lse_accum[int64_t(slot) * params.num_q_rows + row] = lse_log2;
      } else {
        const int i = row / params.h_q, h = row % params.h_q;
        Element* dst = static_cast<Element*>(params.out) + req * params.stride_o_b + i * params.stride_o_s +
                       h * params.stride_o_h + col0;
#pragma unroll
        for (int j = 0; j < Config::O_FRAG / 4; ++j) {
          *reinterpret_cast<uint32_t*>(dst + 8 * j) =
              pack_pair<Element>(o[4 * j + 2 * half] * inv_sum, o[4 * j + 2 * half + 1] * inv_sum);
        }
        if (wg == 0 && lane % 4 == 0) {
          params.lse[req * params.stride_lse_b + h * params.stride_lse_h + i] =
              total[half] > 0.f ? lse_log2 * LN2 : INFINITY;
        }
      }
    }
  }
};

}  // namespace vllm_flashmla::sm90
