// The split-KV MLA decode kernel: one persistent CTA per (64-row query tile, scheduler part).
// Reads like the algorithm: for each request of the part, wait for its Q, then for each page
// S = Q K^T -> online softmax -> O += P V (the two MMA warpgroups take turns at QK^T and softmax,
// see config.h), then store the output or a partial for combine.cu.
#pragma once

#include "../params.h"
#include "../sched_meta.h"
#include "epilogue.cuh"
#include "fragment.h"
#include "mainloop.cuh"
#include "softmax.cuh"

namespace vllm_flashmla::sm90 {

// Number of keys query row `row` (packed s_q index * h_q + head) may attend to. With causal masking
// the queries of a request are its last s_q tokens, so query i sees seqlen - (s_q - 1 - i) keys.
__device__ __forceinline__ int visible_keys(const DecodeParams& params, int seqlen, int row) {
  if (row >= params.num_q_rows) return 0;
  return params.causal ? seqlen - (params.s_q - 1 - row / params.h_q) : seqlen;
}

// Pages before this one hold only keys that every valid query row of the tile may see, so their
// scores need no mask. Rows past s_q * h_q (padding, never stored) then score 0 against real keys,
// which is harmless; from this page on, the mask also gives them -inf. Visibility grows with the row.
__device__ __forceinline__ int first_masked_page(const DecodeParams& params, int seqlen, int first_row) {
  const int fewest_visible = visible_keys(params, seqlen, first_row);
  return fewest_visible <= 0 ? 0 : fewest_visible / PAGE_SIZE;
}

// The owner of the page in `stage`, once its S = Q K^T is complete: online softmax, then publish P
// (over the stage's RoPE box), the new row maxima and the zeroed V tail rows to the other warpgroup.
// Returns whether one of this thread's row maxima moved (O needs a rescale).
template <typename Config>
__device__ __forceinline__ bool own_page(SharedStorage<Config>& smem, OnlineSoftmax<Config>& softmax,
                                         float (&s)[Config::S_FRAG], float (&o_scale)[2], int page, int seqlen,
                                         const int (&visible)[2], int masked_from, int stage, int wg_tid) {
  using Loop = Mainloop<Config>;
  const int lane = wg_tid % 32, r0 = AccumFrag::row0(wg_tid, lane);
  if (page >= masked_from) softmax.mask(s, page * PAGE_SIZE, visible, lane);
  float page_max[2];
  softmax.local_max(s, page_max);
  const bool moved = softmax.update(s, page_max, o_scale);
  Loop::store_p(smem, stage, s, wg_tid);
  if (AccumFrag::quad_leader(lane)) {
    smem.row_max[stage][r0] = softmax.row_max[0];
    smem.row_max[stage][r0 + AccumFrag::ROW_STEP] = softmax.row_max[1];
  }
  if ((page + 1) * PAGE_SIZE > seqlen) Loop::zero_v_tail(smem, stage, seqlen - page * PAGE_SIZE, wg_tid);
  fence_view_async_shared();
  // A full sync, not an arrive: the other warpgroup reaches it first anyway (it finished its own page
  // while this QK^T ran), and a sync also orders its reads of row_max[stage] before this warpgroup's
  // next write there, two pages later, for compute-sanitizer's racecheck as for the hardware.
  named_barrier_sync(p_ready(stage), Config::NUM_MMA_THREADS);
  return moved;
}

// The other warpgroup: wait for the owner's P of the page in `stage` and take its row maxima.
// Returns whether one of this thread's row maxima moved.
template <typename Config>
__device__ __forceinline__ bool follow_page(SharedStorage<Config>& smem, OnlineSoftmax<Config>& softmax,
                                            float (&o_scale)[2], int stage, int wg_tid) {
  const int lane = wg_tid % 32, r0 = AccumFrag::row0(wg_tid, lane);
  named_barrier_sync(p_ready(stage), Config::NUM_MMA_THREADS);
  const float owner_max[2] = {smem.row_max[stage][r0], smem.row_max[stage][r0 + AccumFrag::ROW_STEP]};
  return softmax.follow(owner_max, o_scale);
}

// O *= o_scale row by row. Once a request's first pages have set the row maxima they rarely move, and
// a warp none of whose rows moved skips the 128 multiplies that would otherwise sit between the P
// barrier and the next wgmma. No wgmma is in flight here, so the branch is free to diverge by warp.
template <typename Config>
__device__ __forceinline__ void rescale(float (&o)[Config::O_FRAG], const float (&o_scale)[2], bool moved) {
  if (!__any_sync(0xffffffffu, moved)) return;
#pragma unroll
  for (int j = 0; j < Config::O_FRAG / AccumFrag::CHUNK_VALUES; ++j) {
    o[4 * j] *= o_scale[0];
    o[4 * j + 1] *= o_scale[0];
    o[4 * j + 2] *= o_scale[1];
    o[4 * j + 3] *= o_scale[1];
  }
}

// Q_IN_REGS: Q's box Config::Q_REG_BOX comes from registers in QK^T (see config.h; the launch sets it
// for requests of more than one tile).
template <typename Config, bool Q_IN_REGS>
__global__ void __launch_bounds__(Config::NUM_THREADS, 1)
    decode_kernel(const __grid_constant__ DecodeParams params, const __grid_constant__ CUtensorMap tmap_kv,
                  const __grid_constant__ CUtensorMap tmap_q, const __grid_constant__ CUtensorMap tmap_q_rope) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Smem = SharedStorage<Config>;
  using Loop = Mainloop<Config>;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t misalign = cute::cast_smem_ptr_to_uint(smem_raw) % 1024;
  Smem& smem = *reinterpret_cast<Smem*>(smem_raw + (misalign ? 1024 - misalign : 0));

  const int m_block = blockIdx.x;
  const SchedRecord rec = params.records[blockIdx.y];
  const int tid = threadIdx.x;

  if (tid == 0) {
    for (int st = 0; st < Config::NUM_STAGES; ++st) {
      Mbarrier::init(&smem.kv_full[st], 1);
      Mbarrier::init(&smem.kv_empty[st], Config::NUM_MMA_WARPS);
    }
    Mbarrier::init(&smem.q_full, 1);
    Mbarrier::init(&smem.q_empty, Config::NUM_MMA_WARPS);
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  // ---- producer warpgroup: one thread streams every page of the part through the ring, another
  // each request's Q tile once the MMA warps have released the previous one ----
  if (tid >= Config::NUM_MMA_THREADS) {
    cutlass::arch::warpgroup_reg_dealloc<Config::PRODUCER_REGS>();
    const int producer_tid = tid - Config::NUM_MMA_THREADS;
    if (producer_tid == 32 * Config::KV_PRODUCER_WARP) {
      cute::prefetch_tma_descriptor(&tmap_kv);
      typename Loop::Pipeline pipe;
      for (int req = rec.begin_req; req <= rec.end_req; ++req) {
        const int num_pages = num_pages_of(params.cache_seqlens[req]);
        Loop::load_pages(smem, &tmap_kv, params.block_table + req * params.stride_bt_b, first_page(rec, req),
                         end_page(rec, req, num_pages), pipe);
      }
    } else if (producer_tid == 32 * Config::Q_PRODUCER_WARP) {
      uint32_t q_phase = 0;
      cute::prefetch_tma_descriptor(&tmap_q);
      cute::prefetch_tma_descriptor(&tmap_q_rope);
#pragma unroll 1  // unrolled, the copies' addresses of several requests outgrow the 24 registers
      for (int req = rec.begin_req; req <= rec.end_req; ++req, q_phase ^= 1) {
        Mbarrier::wait(&smem.q_empty, q_phase ^ 1);  // passes at once for the first request
        Loop::load_q(smem, &tmap_q, &tmap_q_rope, req, m_block, params.q_map_heads);
      }
    }
    return;
  }

  // ---- two MMA warpgroups ----
  cutlass::arch::warpgroup_reg_alloc<Config::MMA_REGS>();
  // Warp-uniform in the compiler's eyes too (a shuffle of lane 0), so branching on the stage owner
  // is not divergent control flow around in-flight wgmma accumulators.
  const int wg = __shfl_sync(0xffffffffu, tid / Config::WARPGROUP_THREADS, 0);
  const int wg_tid = tid % Config::WARPGROUP_THREADS;
  const int lane = tid % 32, r0 = AccumFrag::row0(wg_tid, lane);
  typename Loop::Pipeline pipe;
  uint32_t q_phase = 0;

  for (int req = rec.begin_req; req <= rec.end_req; ++req, q_phase ^= 1) {
    const int seqlen = params.cache_seqlens[req];
    const int page_end = end_page(rec, req, num_pages_of(seqlen));
    const int visible[2] = {visible_keys(params, seqlen, m_block * Config::BLOCK_M + r0),
                            visible_keys(params, seqlen, m_block * Config::BLOCK_M + r0 + AccumFrag::ROW_STEP)};
    const int masked_from = first_masked_page(params, seqlen, m_block * Config::BLOCK_M);
    const bool is_split = params.num_splits[req + 1] - params.num_splits[req] > 1;
    // A staged output tile is written over Q, so Q is released after it; otherwise each warpgroup
    // releases Q right after its last QK^T, and the next request's Q loads under the rest.
    const bool staged = Epilogue<Config>::stages_output(params, m_block, is_split);
    bool holds_q = true;

    Mbarrier::wait(&smem.q_full, q_phase);
    uint32_t q_regs[Config::Q_REGS];
    if constexpr (Q_IN_REGS) Loop::load_q_regs(smem, q_regs, wg_tid);
    OnlineSoftmax<Config> softmax(params.scale_log2);
    float o[Config::O_FRAG];
#pragma unroll
    for (int i = 0; i < Config::O_FRAG; ++i) o[i] = 0.f;

    // Pages alternate between the stages and each warpgroup owns one stage. Per page, the owner does
    // S = Q K^T and the softmax and publishes P; both add P V to their half of O. A warpgroup issues
    // QK^T of its own page right behind its PV of the other's page, so the two warpgroups' MMAs fill
    // each other's softmax. Every wgmma group is waited for in the loop iteration that issued it
    // (ptxas serializes wgmma whose accumulators stay in flight across divergent control flow).
    float s[Config::S_FRAG];
    float o_scale[2];
    int page = first_page(rec, req);
    // A piece without pages meets no P barrier before its epilogue writes row_sum, which the other
    // warpgroup may still be reading for the previous request.
    if (page == page_end) named_barrier_sync(NamedBarrier::RowSum, Config::NUM_MMA_THREADS);
    while (page < page_end) {
      int pv_pending = -1;  // stage of a PV on the other's page not yet known complete
      if (pipe.stage != wg) {
        const bool moved = follow_page(smem, softmax, o_scale, pipe.stage, wg_tid);
        rescale<Config>(o, o_scale, moved);
        Loop::issue_pv(smem, pipe.stage, wg, o);
        pv_pending = pipe.stage;
        pipe.advance();
        if (++page == page_end) {
          Loop::template wait_mma<0>(o);
          Loop::release_stage(smem, pv_pending, lane);
          break;
        }
      }
      // This warpgroup's page. The other's page is dead once this warpgroup's PV on it (issued before)
      // is done; its stage takes the page after next, whose load latency (~1.4 us under load) is what
      // bounds the page rate when MMA-bound. So the stage is freed between a short head of the QK^T,
      // which keeps the tensor cores busy meanwhile, and the rest: issuing all 36 K steps first would
      // hold the release back until most of the QK^T had run (wgmma issue stalls while the pipe is full).
      Mbarrier::wait(&smem.kv_full[pipe.stage], pipe.phase);
      Loop::template issue_qk<0, Config::QK_HEAD_STEPS, Q_IN_REGS>(smem, pipe.stage, s, q_regs);
      Loop::template wait_mma<1>(o);
      Loop::release_stage(smem, pv_pending, lane);
      Loop::template issue_qk<Config::QK_HEAD_STEPS, Config::QK_STEPS, Q_IN_REGS>(smem, pipe.stage, s, q_regs);
      Loop::template wait_mma<0>(s);
      if (!staged && page + Config::NUM_STAGES >= page_end) {  // this warpgroup's last page of the request
        Loop::release_q(smem, lane);
        holds_q = false;
      }
      const bool moved = own_page(smem, softmax, s, o_scale, page, seqlen, visible, masked_from, pipe.stage, wg_tid);
      rescale<Config>(o, o_scale, moved);
      Loop::issue_pv(smem, pipe.stage, wg, o);
      Loop::template wait_mma<0>(o);
      Loop::release_stage(smem, pipe.stage, lane);
      pipe.advance();
      ++page;
    }

    if (holds_q && !staged) Loop::release_q(smem, lane);  // it owned no page of this piece
    Epilogue<Config>::store(smem, params, softmax, o, req, m_block, is_split, staged,
                            partial_slot(rec, req, params.num_splits), wg, wg_tid);
    if (staged) {
      fence_view_async_shared();  // the tile's generic-proxy writes and reads before TMA's writes of Q
      Loop::release_q(smem, lane);
    }
  }
#endif
}

}  // namespace vllm_flashmla::sm90
