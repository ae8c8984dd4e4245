// Data movement and tensor-core work of one KV page: the only code that issues TMA and wgmma.
#pragma once

#include "../params.h"
#include "fragment.h"
#include "primitives.h"
#include "shared_storage.h"

namespace vllm_flashmla::sm90 {

// Position in the ring of KV stages; producer and consumers walk it in the same order.
template <int NUM_STAGES>
struct PipelineState {
  int stage = 0;
  uint32_t phase = 0;
  __device__ __forceinline__ void advance() {
    if (++stage == NUM_STAGES) {
      stage = 0;
      phase ^= 1;
    }
  }
};

template <typename Config>
struct Mainloop {
  using Element = typename Config::Element;
  using Smem = SharedStorage<Config>;
  using Atoms = GmmaAtoms<Element>;
  using Pipeline = PipelineState<Config::NUM_STAGES>;

  // Producer (one thread): stream pages [page_begin, page_end) of one request into the ring. Each page
  // is 9 TMA boxes of [64 keys, 64 columns] completing on the stage's transaction barrier.
  __device__ static void load_pages(Smem& smem, const CUtensorMap* tmap_kv, const int32_t* block_table_row,
                                    int page_begin, int page_end, Pipeline& pipe) {
    for (int page = page_begin; page < page_end; ++page) {
      const int page_id = block_table_row[page];
      Mbarrier::wait(&smem.kv_empty[pipe.stage], pipe.phase ^ 1);
      Mbarrier::arrive_and_expect_tx(&smem.kv_full[pipe.stage], Config::PAGE_BYTES);
#pragma unroll
      for (int box = 0; box < Config::NUM_QK_BOXES; ++box) {
        cute::SM90_TMA_LOAD_3D::copy(tmap_kv, &smem.kv_full[pipe.stage], CACHE_HINT_EVICT_FIRST,
                                     smem.kv[pipe.stage][box], box * Config::BOX_COLS, 0, page_id);
      }
      pipe.advance();
    }
  }

  // Q producer (one thread): the tile's Q rows of one request as 9 TMA boxes of [64 rows, 64 columns]
  // completing on q_full, eight from the latent part and the last from the RoPE part. The maps are
  // [b][tokens][heads][cols] with q_map_heads heads (params.h); a box is whole heads of consecutive
  // tokens, so its rows land in smem in packed-row order. Rows past s_q * h_q lie outside the maps, and
  // TMA fills them with zeros.
  __device__ static void load_q(Smem& smem, const CUtensorMap* tmap_q, const CUtensorMap* tmap_q_rope, int req,
                                int m_block, int q_map_heads) {
    static_assert(Config::Q_BYTES == int(sizeof(smem.q)), "the boxes fill the Q tile, as q_full expects");
    static_assert(D_ROPE == Config::BOX_COLS, "Q's RoPE part is exactly its last box");
    Mbarrier::arrive_and_expect_tx(&smem.q_full, Config::Q_BYTES);
    const int row0 = m_block * Config::BLOCK_M;
    const int head0 = row0 % q_map_heads, token0 = row0 / q_map_heads;
#pragma unroll
    for (int box = 0; box < Config::NUM_V_BOXES; ++box) {
      cute::SM90_TMA_LOAD_4D::copy(tmap_q, &smem.q_full, CACHE_HINT_EVICT_NORMAL, smem.q[box], box * Config::BOX_COLS,
                                   head0, token0, req);
    }
    cute::SM90_TMA_LOAD_4D::copy(tmap_q_rope, &smem.q_full, CACHE_HINT_EVICT_NORMAL, smem.q[Config::ROPE_BOX], 0, head0,
                                 token0, req);
  }

  // Every MMA warp is done with the Q tile: its warpgroup's last QK^T of the request retired, or the
  // output tile staged over Q was read back (and fenced, since TMA writes next). One arrival per warp.
  __device__ static void release_q(Smem& smem, int lane) {
    __syncwarp();
    if (lane == 0) Mbarrier::arrive(&smem.q_empty);
  }

  // The owner warpgroup: issue K steps [FIRST_STEP, END_STEP) of s = Q K^T over all 64 keys of the page
  // in `stage` (the whole product is K = 576 columns, QK_STEPS steps) as one wgmma group; the first
  // step overwrites s, later ones (also in a later group) accumulate. Completes at the matching wait_mma.
  // With Q_IN_REGS the steps of Config::Q_REG_BOX take Q from q_regs (load_q_regs) instead.
  template <int FIRST_STEP, int END_STEP, bool Q_IN_REGS>
  __device__ static void issue_qk(Smem& smem, int stage, float (&s)[Config::S_FRAG],
                                  uint32_t (&q_regs)[Config::Q_REGS]) {
    static_assert(0 <= FIRST_STEP && FIRST_STEP < END_STEP && END_STEP <= Config::QK_STEPS, "K steps of QK^T");
    constexpr bool REG_STEPS = Q_IN_REGS && END_STEP > Config::Q_REG_FIRST_STEP;  // some steps read q_regs
    fence_accumulator(s);
    if constexpr (REG_STEPS) fence_operands(q_regs);
    cute::warpgroup_arrive();
#pragma unroll
    for (int t = FIRST_STEP; t < END_STEP; ++t) {
      const int box = t / Config::QK_STEPS_PER_BOX;
      const int k_bytes = (t % Config::QK_STEPS_PER_BOX) * Config::MMA_K * int(sizeof(Element));
      const uint64_t desc_k = desc_advance(smem_desc_k_major(smem.kv[stage][box]), k_bytes);
      if (REG_STEPS && t >= Config::Q_REG_FIRST_STEP) {
        constexpr int A = Config::A_REGS_PER_STEP;
        gmma_rs<typename Atoms::QK_RS>(&q_regs[A * (t - Config::Q_REG_FIRST_STEP)], desc_k, s, ScaleOut::One);
      } else {
        const uint64_t desc_q = desc_advance(smem_desc_k_major(smem.q[box]), k_bytes);
        gmma<typename Atoms::QK>(desc_q, desc_k, s, t == 0 ? ScaleOut::Zero : ScaleOut::One);
      }
    }
    cute::warpgroup_commit_batch();
    if constexpr (REG_STEPS) fence_operands(q_regs);
  }

  // This thread's wgmma A fragments of the Q tile's box Q_REG_BOX, once q_full has passed: for K step k
  // of the box, rows r0 and r0 + 8 (fragment.h) at columns 16 k + 2 (lane % 4) + {0, 1}, then
  // the same rows 8 columns on, each register two 16-bit elements of one row.
  __device__ static void load_q_regs(const Smem& smem, uint32_t (&q_regs)[Config::Q_REGS], int wg_tid) {
    const int lane = wg_tid % 32, r0 = AccumFrag::row0(wg_tid, lane);
    const uint8_t* box = reinterpret_cast<const uint8_t*>(smem.q[Config::Q_REG_BOX]);
    // Columns col0 + {0, 1} of each 16-byte chunk.
    const int byte_in_chunk = AccumFrag::col0(lane) * int(sizeof(Element));
#pragma unroll
    for (int k = 0; k < Config::QK_STEPS_PER_BOX; ++k) {
      // A K step's 16 columns are 32 bytes: chunks 2 k and 2 k + 1 of the 128-byte row.
      const auto at = [&](int row, int chunk) {
        return *reinterpret_cast<const uint32_t*>(box + swizzle_128b(row, chunk) + byte_in_chunk);
      };
      constexpr int A = Config::A_REGS_PER_STEP;
      q_regs[A * k + 0] = at(r0, 2 * k);
      q_regs[A * k + 1] = at(r0 + AccumFrag::ROW_STEP, 2 * k);
      q_regs[A * k + 2] = at(r0, 2 * k + 1);
      q_regs[A * k + 3] = at(r0 + AccumFrag::ROW_STEP, 2 * k + 1);
    }
  }

  // One warpgroup: issue o += P V over the page's 64 keys, for this warpgroup's 256 value columns.
  __device__ static void issue_pv(Smem& smem, int stage, int wg, float (&o)[Config::O_FRAG]) {
    const Element* v_cols = smem.kv[stage][wg * Config::V_BOXES_PER_WG];
    fence_accumulator(o);
    cute::warpgroup_arrive();
#pragma unroll
    for (int t = 0; t < Config::PV_STEPS; ++t) {
      const uint64_t desc_p =
          desc_advance(smem_desc_k_major(smem.kv[stage][Config::P_BOX]), t * Config::MMA_K * int(sizeof(Element)));
      const uint64_t desc_v =
          smem_desc_mn_major(v_cols + t * Config::MMA_K * Config::BOX_COLS, Config::TILE_BOX_BYTES);
      gmma<typename Atoms::PV>(desc_p, desc_v, o, ScaleOut::One);
    }
    cute::warpgroup_commit_batch();
  }

  // Wait until at most PENDING of this warpgroup's issued wgmma groups are in flight (groups retire
  // in issue order), then pin the accumulator so no access moves across the wait.
  template <int PENDING, int N>
  __device__ static void wait_mma(float (&acc)[N]) {
    cute::warpgroup_wait<PENDING>();
    fence_accumulator(acc);
  }

  // Every MMA warp is done with a stage (its wgmma reads completed): one arrival per warp, since 32
  // threads arriving on one mbarrier word serialize. No-op for stage < 0 (nothing to release).
  __device__ static void release_stage(Smem& smem, int stage, int lane) {
    __syncwarp();
    if (lane == 0 && stage >= 0) Mbarrier::arrive(&smem.kv_empty[stage]);
  }

  // The owner warpgroup: its probabilities (fp32 accumulator layout, fragment.h) as the P tile
  // in the stage's P_BOX, rounded to the input type for the PV wgmma of both warpgroups.
  __device__ static void store_p(Smem& smem, int stage, const float (&p)[Config::S_FRAG], int wg_tid) {
    const int lane = wg_tid % 32, r0 = AccumFrag::row0(wg_tid, lane);
    char* tile = reinterpret_cast<char*>(smem.kv[stage][Config::P_BOX]);
#pragma unroll
    for (int j = 0; j < Config::S_FRAG / AccumFrag::CHUNK_VALUES; ++j) {
      const int col = AccumFrag::CHUNK_COLS * j + AccumFrag::col0(lane);
      const int byte_in_chunk = (col % 8) * int(sizeof(Element));
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = r0 + AccumFrag::ROW_STEP * half;
        const auto pair = pack_pair<Element>(p[4 * j + 2 * half], p[4 * j + 2 * half + 1]);
        *reinterpret_cast<uint32_t*>(tile + swizzle_128b(row, col / 8) + byte_in_chunk) = pair;
      }
    }
  }

  // Keys at or past the request's end hold whatever the cache page holds (NaN in our tests). Their
  // probabilities are exactly 0, but 0 * NaN is NaN, so the owner zeroes every V column of those rows
  // before publishing P. Only the request's last page can be partial.
  __device__ static void zero_v_tail(Smem& smem, int stage, int first_dead_key, int wg_tid) {
    constexpr int CHUNKS_PER_BOX_ROW = Config::SWIZZLE_BYTES / 16;
    const int dead_rows = Config::BLOCK_N - first_dead_key;
    const int total = dead_rows * Config::NUM_V_BOXES * CHUNKS_PER_BOX_ROW;
    for (int idx = wg_tid; idx < total; idx += Config::WARPGROUP_THREADS) {
      const int chunk = idx % CHUNKS_PER_BOX_ROW;
      const int box = (idx / CHUNKS_PER_BOX_ROW) % Config::NUM_V_BOXES;
      const int row = first_dead_key + idx / (CHUNKS_PER_BOX_ROW * Config::NUM_V_BOXES);
      char* base = reinterpret_cast<char*>(smem.kv[stage][box]);
      *reinterpret_cast<uint4*>(base + swizzle_128b(row, chunk)) = make_uint4(0, 0, 0, 0);
    }
  }
};

}  // namespace vllm_flashmla::sm90
