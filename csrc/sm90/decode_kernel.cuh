// The split-KV MLA decode kernel: one persistent CTA per (64-row query tile, scheduler part).
// Reads like the algorithm: for each request of the part, load Q, then for each page
// S = Q K^T -> online softmax -> O += P V, then store the output or a partial for combine.cu.
#pragma once

#include "../params.h"
#include "../sched_meta.h"
#include "epilogue.cuh"
#include "mainloop.cuh"
#include "softmax.cuh"

namespace vllm_flashmla::sm90 {

// Number of keys query row `row` (packed s_q index * h_q + head) may attend to. With causal masking
// the queries of a request are its last s_q tokens, so query i sees seqlen - (s_q - 1 - i) keys.
__device__ __forceinline__ int visible_keys(const DecodeParams& params, int seqlen, int row) {
  if (row >= params.num_q_rows) return 0;
  return params.causal ? seqlen - (params.s_q - 1 - row / params.h_q) : seqlen;
}

// Scores of one page -> probabilities in shared memory (the A operand of PV), with O rescaled to the
// new running max. Ends at the barrier after which both warpgroups may issue PV.
template <typename Config>
__device__ __forceinline__ void scores_to_p(SharedStorage<Config>& smem,
                                            OnlineSoftmax<Config>& softmax, float (&s)[Config::S_FRAG],
                                            float (&o)[Config::O_FRAG], int page, int seqlen,
                                            const int (&visible)[2], int stage, int wg, int wg_tid) {
  using Loop = Mainloop<Config>;
  const int lane = wg_tid % 32, r0 = 16 * (wg_tid / 32) + lane / 4;
  softmax.mask(s, page * PAGE_SIZE + wg * Config::S_COLS_PER_WG, visible, lane);

  // Row max over the whole page: each warpgroup saw half of its keys.
  float page_max[2];
  softmax.local_max(s, page_max);
  if (lane % 4 == 0) {
    smem.row_max[wg][r0] = page_max[0];
    smem.row_max[wg][r0 + 8] = page_max[1];
  }
  named_barrier_sync(NamedBarrier::RowMax, Config::NUM_MMA_THREADS);
  page_max[0] = fmaxf(smem.row_max[0][r0], smem.row_max[1][r0]);
  page_max[1] = fmaxf(smem.row_max[0][r0 + 8], smem.row_max[1][r0 + 8]);

  float o_scale[2];
  softmax.update(s, page_max, o_scale);
#pragma unroll
  for (int j = 0; j < Config::O_FRAG / 4; ++j) {
    o[4 * j] *= o_scale[0];
    o[4 * j + 1] *= o_scale[0];
    o[4 * j + 2] *= o_scale[1];
    o[4 * j + 3] *= o_scale[1];
  }
  Loop::store_p(smem, s, wg, wg_tid);
  // Both warpgroups finished QK on this stage (they passed RowMax), so V rows may be edited now.
  if ((page + 1) * PAGE_SIZE > seqlen) Loop::zero_v_tail(smem, stage, wg, seqlen - page * PAGE_SIZE, wg_tid);
  fence_view_async_shared();
  named_barrier_sync(NamedBarrier::PReady, Config::NUM_MMA_THREADS);
}

template <typename Config>
__global__ void __launch_bounds__(Config::NUM_THREADS, 1)
    decode_kernel(const __grid_constant__ DecodeParams params, const __grid_constant__ CUtensorMap tmap_kv) {
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
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  // ---- producer warpgroup: one thread streams every page of the part through the ring ----
  if (tid >= Config::NUM_MMA_THREADS) {
    cutlass::arch::warpgroup_reg_dealloc<Config::PRODUCER_REGS>();
    if (tid == Config::NUM_MMA_THREADS) {
      cute::prefetch_tma_descriptor(&tmap_kv);
      typename Loop::Pipeline pipe;
      for (int req = rec.begin_req; req <= rec.end_req; ++req) {
        const int num_pages = num_pages_of(params.cache_seqlens[req]);
        Loop::load_pages(smem, &tmap_kv, params.block_table + req * params.stride_bt_b, first_page(rec, req),
                         end_page(rec, req, num_pages), pipe);
      }
    }
    return;
  }

  // ---- two MMA warpgroups ----
  cutlass::arch::warpgroup_reg_alloc<Config::MMA_REGS>();
  const int wg = tid / Config::WARPGROUP_THREADS, wg_tid = tid % Config::WARPGROUP_THREADS;
  const int lane = tid % 32, r0 = 16 * (wg_tid / 32) + lane / 4;
  typename Loop::Pipeline pipe;

  for (int req = rec.begin_req; req <= rec.end_req; ++req) {
    const int seqlen = params.cache_seqlens[req];
    const int page_end = end_page(rec, req, num_pages_of(seqlen));
    const int visible[2] = {visible_keys(params, seqlen, m_block * Config::BLOCK_M + r0),
                            visible_keys(params, seqlen, m_block * Config::BLOCK_M + r0 + 8)};

    Loop::load_q(smem, params, req, m_block, tid);
    OnlineSoftmax<Config> softmax(params.scale_log2);
    float o[Config::O_FRAG];
#pragma unroll
    for (int i = 0; i < Config::O_FRAG; ++i) o[i] = 0.f;

    // Per page: S = Q K^T, softmax into P, O += P V, then the stage goes back to the producer.
    // (Issuing QK of page n + 1 before waiting for PV of page n was measured slower on H100: both
    // stream operands from shared memory, which is the limit in the compute-bound regime.)
    for (int page = first_page(rec, req); page < page_end; ++page) {
      Mbarrier::wait(&smem.kv_full[pipe.stage], pipe.phase);
      float s[Config::S_FRAG];
      Loop::issue_qk(smem, pipe.stage, wg, s);
      Loop::template wait_mma<0>(s);
      scores_to_p(smem, softmax, s, o, page, seqlen, visible, pipe.stage, wg, wg_tid);
      Loop::issue_pv(smem, pipe.stage, wg, o);
      Loop::template wait_mma<0>(o);
      Loop::release_stage(smem, pipe.stage, lane);
      pipe.advance();
    }

    const bool is_split = params.num_splits[req + 1] - params.num_splits[req] > 1;
    Epilogue<Config>::store(smem, params, softmax, o, req, m_block, is_split,
                            partial_slot(rec, req, params.num_splits), wg, wg_tid);
  }
#endif
}

}  // namespace vllm_flashmla::sm90
