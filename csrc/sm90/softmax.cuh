// Online softmax over the pages of one request, in the log2 domain.
//
// S is a wgmma accumulator (fragment.h): each thread holds two rows, r0 and r1 = r0 + 8, at fragment
// values 4j + {0, 1} and 4j + {2, 3} of chunk j, and a row of S is spread over the 4 threads of a quad
// of the page's owner warpgroup. Both warpgroups keep the same running maxima (the owner computes them,
// the other follows) and each sums the probabilities of the pages it owned; the epilogue adds the two
// sums.
#pragma once

#include <cmath>

#include "config.h"
#include "fragment.h"

namespace vllm_flashmla::sm90 {

template <typename Config>
struct OnlineSoftmax {
  static constexpr int ROWS = AccumFrag::ROWS_PER_THREAD;  // r0 and r1 above
  static constexpr int S_FRAG = Config::S_FRAG;

  float scale_log2;       // softmax_scale * log2(e): scores become log2-domain logits
  float row_max[ROWS];    // running max of raw scores over the keys seen so far (same in both warpgroups)
  float row_sum[ROWS];    // this thread's share of sum(exp2(score * scale_log2 - row_max * scale_log2)),
                          // over the keys of the pages this warpgroup owned

  __device__ explicit OnlineSoftmax(float scale_log2_) : scale_log2(scale_log2_) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      row_max[r] = -INFINITY;
      row_sum[r] = 0.f;
    }
  }

  // Keys at or beyond a row's visible length get -inf (causal tail, page past the sequence end).
  __device__ static void mask(float (&s)[S_FRAG], int first_key, const int (&visible)[ROWS], int lane) {
#pragma unroll
    for (int j = 0; j < S_FRAG / AccumFrag::CHUNK_VALUES; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int key = first_key + AccumFrag::CHUNK_COLS * j + AccumFrag::col0(lane) + e;
        if (key >= visible[0]) s[4 * j + e] = -INFINITY;
        if (key >= visible[1]) s[4 * j + 2 + e] = -INFINITY;
      }
    }
  }

  // Max of each row over the page's keys (reduced over the quad).
  __device__ static void local_max(const float (&s)[S_FRAG], float (&mx)[ROWS]) {
    mx[0] = mx[1] = -INFINITY;
#pragma unroll
    for (int j = 0; j < S_FRAG / AccumFrag::CHUNK_VALUES; ++j) {
      mx[0] = fmaxf(mx[0], fmaxf(s[4 * j], s[4 * j + 1]));
      mx[1] = fmaxf(mx[1], fmaxf(s[4 * j + 2], s[4 * j + 3]));
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
    }
  }

  // Owner of a page: fold in its scores, `page_max` being the row max over them. Turns s into
  // probabilities relative to the new running max and returns the factor O must be rescaled by
  // (exactly 1 for a row whose max did not move; true if some row's did).
  // A row that has seen only masked keys keeps max = -inf; its probabilities are 0.
  __device__ bool update(float (&s)[S_FRAG], const float (&page_max)[ROWS], float (&o_scale)[ROWS]) {
    float max_scaled[ROWS];
    const bool moved = advance_max(page_max, o_scale, max_scaled);
#pragma unroll
    for (int j = 0; j < S_FRAG / AccumFrag::CHUNK_VALUES; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        s[4 * j + e] = exp2f(fmaf(s[4 * j + e], scale_log2, -max_scaled[0]));
        s[4 * j + 2 + e] = exp2f(fmaf(s[4 * j + 2 + e], scale_log2, -max_scaled[1]));
        row_sum[0] += s[4 * j + e];
        row_sum[1] += s[4 * j + 2 + e];
      }
    }
    return moved;
  }

  // The other warpgroup: take the running max the owner published (its row_max after the page) and
  // return the same O rescale factor the owner computed: same inputs, same instructions, same bits.
  __device__ bool follow(const float (&owner_max)[ROWS], float (&o_scale)[ROWS]) {
    float max_scaled[ROWS];
    return advance_max(owner_max, o_scale, max_scaled);
  }

  // This thread's share of each row's sum (reduced over the quad).
  __device__ void quad_sum(float (&sum)[ROWS]) const {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      sum[r] = row_sum[r];
      sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], 1);
      sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], 2);
    }
  }

  // log2-domain LSE of a row with total sum `sum`, or -inf when the row attended to nothing.
  __device__ float lse_log2(int r, float sum) const {
    return sum > 0.f ? row_max[r] * scale_log2 + log2f(sum) : -INFINITY;
  }

 private:
  // The factor is tested by comparing maxima, not by computing it: exp2(a * c - b) with b = a * c
  // rounded is not exactly 1 once the multiply-add is fused. A row whose max stays put (also one
  // still at -inf: its O and sum are 0) gets exactly 1, so the caller can skip the rescale of O.
  __device__ bool advance_max(const float (&page_max)[ROWS], float (&o_scale)[ROWS], float (&max_scaled)[ROWS]) {
    bool moved = false;
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const float new_max = fmaxf(row_max[r], page_max[r]);
      max_scaled[r] = new_max == -INFINITY ? 0.f : new_max * scale_log2;
      const bool row_moved = new_max != row_max[r];
      o_scale[r] = row_moved ? exp2f(row_max[r] * scale_log2 - max_scaled[r]) : 1.f;
      moved |= row_moved;
      row_max[r] = new_max;
      row_sum[r] *= o_scale[r];
    }
    return moved;
  }
};

}  // namespace vllm_flashmla::sm90
