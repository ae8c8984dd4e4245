// The three ways a CTA finishes a request: the final output of a request it covered alone, an fp32
// partial of a split request (merged later by combine.cu), and the empty case, which is the final path
// with a zero row sum: O = 0 and LSE = +inf for the output, LSE = -inf for a partial.
#pragma once

#include "../params.h"
#include "fragment.h"
#include "primitives.h"
#include "shared_storage.h"
#include "softmax.cuh"

namespace vllm_flashmla::sm90 {

template <typename Config>
struct Epilogue {
  using Element = typename Config::Element;
  using Smem = SharedStorage<Config>;

  // Row sums of both warpgroups, added in a fixed order so both see the same bits.
  __device__ static void total_row_sum(Smem& smem, const OnlineSoftmax<Config>& softmax, int wg, int wg_tid,
                                       float (&total)[2]) {
    const int lane = wg_tid % 32, r0 = AccumFrag::row0(wg_tid, lane);
    float mine[2];
    softmax.quad_sum(mine);
    if (AccumFrag::quad_leader(lane)) {
      smem.row_sum[wg][r0] = mine[0];
      smem.row_sum[wg][r0 + AccumFrag::ROW_STEP] = mine[1];
    }
    named_barrier_sync(NamedBarrier::RowSum, Config::NUM_MMA_THREADS);
    total[0] = smem.row_sum[0][r0] + smem.row_sum[1][r0];
    total[1] = smem.row_sum[0][r0 + AccumFrag::ROW_STEP] + smem.row_sum[1][r0 + AccumFrag::ROW_STEP];
  }

  // The final output of a request this CTA covered alone, for tiles of more than DIRECT_OUTPUT_MAX_ROWS
  // rows (stages_output). The fragments are scattered 4-byte pieces (a quad holds 16 bytes of a row,
  // half a 32-byte sector), and stored to global memory directly they took 6.7 us for a 64-row tile (perf notes
  // round 10). So they are staged in shared memory over Q, which no wgmma reads any more (the RowSum
  // barrier before this is past both warpgroups' last QK^T), as [BLOCK_M rows][D_V] with 16-byte
  // chunks XOR-swizzled by row so that both the fragment writes and the row reads are free of bank
  // conflicts, then written out as whole 1 KiB rows of 16-byte stores.
  __device__ __forceinline__ static void store_output(Smem& smem, const DecodeParams& params,
                                                      const float (&o)[Config::O_FRAG], const float (&inv_sum)[2],
                                                      int req, int m_block, int wg, int wg_tid) {
    constexpr int ROW_BYTES = D_V * int(sizeof(Element));
    constexpr int CHUNK_ELEMS = 16 / int(sizeof(Element));
    constexpr int CHUNKS_PER_ROW = ROW_BYTES / 16;
    static_assert(Config::BLOCK_M * ROW_BYTES <= int(sizeof(smem.q)), "the output tile fits over Q");
    static_assert(CHUNKS_PER_ROW % 8 == 0, "the swizzle permutes chunks within groups of 8");
    // The lane comes from a volatile read so that none of the addresses below is hoisted out of the
    // request loop, where they would hold registers through the mainloop (ptxas then spills).
    const int lane = lane_id(), r0 = AccumFrag::row0(wg_tid, lane);
    // Rows r0 and r0 + 8 share r % 8 = lane / 4, and the tile is 1024-byte aligned: the XOR touches
    // only bits 4-6 of an address whose other terms leave them clear.
    const uint32_t frag_base = cute::cast_smem_ptr_to_uint(smem.q) + r0 * ROW_BYTES +
                               (wg * Config::O_COLS_PER_WG + AccumFrag::col0(lane)) * int(sizeof(Element));
    const uint32_t swizzle = uint32_t(r0 % 8) << 4;
#pragma unroll
    for (int j = 0; j < Config::O_FRAG / AccumFrag::CHUNK_VALUES; ++j) {
      const uint32_t chunk = (frag_base + AccumFrag::CHUNK_COLS * int(sizeof(Element)) * j) ^ swizzle;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        st_shared_u32(chunk + AccumFrag::ROW_STEP * half * ROW_BYTES,
                      pack_pair<Element>(o[4 * j + 2 * half] * inv_sum[half], o[4 * j + 2 * half + 1] * inv_sum[half]));
      }
    }
    named_barrier_sync(NamedBarrier::Output, Config::NUM_MMA_THREADS);
    const char* tile = reinterpret_cast<const char*>(smem.q);
    const int tid = wg * Config::WARPGROUP_THREADS + wg_tid;
    for (int idx = tid; idx < Config::BLOCK_M * CHUNKS_PER_ROW; idx += Config::NUM_MMA_THREADS) {
      const int r = idx / CHUNKS_PER_ROW, chunk = idx % CHUNKS_PER_ROW;
      const int row = m_block * Config::BLOCK_M + r;
      if (row >= params.num_q_rows) break;  // rows only grow with idx
      Element* dst = output_row<Element>(params, req, row) + chunk * CHUNK_ELEMS;
      *reinterpret_cast<uint4*>(dst) =
          *reinterpret_cast<const uint4*>(tile + r * ROW_BYTES + ((chunk ^ (r % 8)) << 4));
    }
    // The kernel then releases Q (release_q): the next Q tile's TMA waits for these reads.
  }

  // Staging pays from 32 rows on; a tile of at most 16 has them all in one warp per warpgroup, whose
  // direct stores measured faster than staging with its barrier (perf notes round 10). Partials are
  // always stored from the registers.
  __device__ __forceinline__ static bool stages_output(const DecodeParams& params, int m_block, bool is_split) {
    return !is_split && params.num_q_rows - m_block * Config::BLOCK_M > Config::DIRECT_OUTPUT_MAX_ROWS;
  }

  // `staged` is stages_output(params, m_block, is_split), which the kernel computes once per request for
  // its release of Q. Recomputed here instead, it gave the kernels an 8-24 byte stack frame (ptxas, nvcc
  // 13.0), so it is passed in.
  __device__ __forceinline__ static void store(Smem& smem, const DecodeParams& params,
                                               const OnlineSoftmax<Config>& softmax, const float (&o)[Config::O_FRAG],
                                               int req, int m_block, bool is_split, bool staged, int slot, int wg,
                                               int wg_tid) {
    float total[2];
    total_row_sum(smem, softmax, wg, wg_tid, total);
    const int lane = wg_tid % 32, r0 = AccumFrag::row0(wg_tid, lane);
    const int col0 = wg * Config::O_COLS_PER_WG + AccumFrag::col0(lane);
    const float inv_sum[2] = {total[0] > 0.f ? 1.f / total[0] : 0.f, total[1] > 0.f ? 1.f / total[1] : 0.f};

    if (staged) store_output(smem, params, o, inv_sum, req, m_block, wg, wg_tid);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = m_block * Config::BLOCK_M + r0 + AccumFrag::ROW_STEP * half;
      if (row >= params.num_q_rows) continue;
      const float lse_log2 = softmax.lse_log2(half, total[half]);
      if (is_split) {
        float* dst = params.o_accum + (int64_t(slot) * params.num_q_rows + row) * D_V + col0;
#pragma unroll
        for (int j = 0; j < Config::O_FRAG / AccumFrag::CHUNK_VALUES; ++j) {
          *reinterpret_cast<float2*>(dst + AccumFrag::CHUNK_COLS * j) =
              make_float2(o[4 * j + 2 * half] * inv_sum[half], o[4 * j + 2 * half + 1] * inv_sum[half]);
        }
        if (wg == 0 && AccumFrag::quad_leader(lane)) {
          params.lse_accum[int64_t(slot) * params.num_q_rows + row] = lse_log2;
        }
        continue;
      }
      if (!staged) {
        Element* dst = output_row<Element>(params, req, row) + col0;
#pragma unroll
        for (int j = 0; j < Config::O_FRAG / AccumFrag::CHUNK_VALUES; ++j) {
          *reinterpret_cast<uint32_t*>(dst + AccumFrag::CHUNK_COLS * j) =
              pack_pair<Element>(o[4 * j + 2 * half] * inv_sum[half], o[4 * j + 2 * half + 1] * inv_sum[half]);
        }
      }
      if (wg == 0 && AccumFrag::quad_leader(lane)) {
        *output_lse(params, req, row) = total[half] > 0.f ? lse_log2 * LN2 : INFINITY;
      }
    }
  }
};

}  // namespace vllm_flashmla::sm90
