// Tile shapes, thread roles and the shared-memory plan of the sm90a decode kernel.
//
// One CTA owns a 64-row tile of packed query rows (row = s_q index * h_q + head) of one request at a
// time and streams that request's KV pages through a ring of two page stages. Pages alternate between
// the stages, and each MMA warpgroup owns one stage ("seesaw"):
//
//   warps 0-3  (warpgroup 0)  pages in stage 0: S = Q K^T over all 64 keys, online softmax, P
//                             every page:       O[:,   0:256] += P V[:,   0:256]
//   warps 4-7  (warpgroup 1)  pages in stage 1: S = Q K^T over all 64 keys, online softmax, P
//                             every page:       O[:, 256:512] += P V[:, 256:512]
//   warps 8-11 (producer)     one thread issues TMA loads of the next pages into the ring, another
//                             those of each request's Q tile once both MMA warpgroups are done with
//                             the previous one (their last QK^T, or the output tile staged over Q)
//
// The owner of a page publishes P (written over the page's RoPE box, which QK^T no longer needs) and
// the new row maxima; the other warpgroup rescales its half of O and adds P V. While one warpgroup runs
// its softmax, the tensor cores work on the other's QK^T or PV, and Q is read from shared memory once
// per page (a 64x64 QK^T tile) instead of once per warpgroup; for requests of more than one tile its
// RoPE box comes from registers instead (Q_REG_BOX below).
#pragma once

#include <cstdint>

#include "../config.h"
#include "fragment.h"

namespace vllm_flashmla::sm90 {

template <typename Element_>
struct DecodeConfig {
  using Element = Element_;
  static_assert(sizeof(Element) == 2, "bf16/fp16 only");

  static constexpr int BLOCK_M = vllm_flashmla::BLOCK_M;  // query rows per tile: the wgmma M
  static constexpr int BLOCK_N = PAGE_SIZE;     // keys per mainloop step: one KV page (one TMA box row range)
  static constexpr int SWIZZLE_BYTES = 128;     // TMA SWIZZLE_128B: a box row is 128 bytes
  static constexpr int BOX_COLS = SWIZZLE_BYTES / int(sizeof(Element));  // 64 columns per box
  static constexpr int SWIZZLE_ATOM_BYTES = 8 * SWIZZLE_BYTES;           // 8 rows share one XOR pattern
  static constexpr int NUM_QK_BOXES = D_QK / BOX_COLS;                    // 9 boxes span a 576-wide row
  static constexpr int NUM_V_BOXES = D_V / BOX_COLS;                      // the first 8 of them are V
  static constexpr int ROPE_BOX = NUM_V_BOXES;                            // the last one: RoPE columns
  static constexpr int TILE_BOX_BYTES = BLOCK_M * SWIZZLE_BYTES;          // one 64-row box
  static constexpr int PAGE_BYTES = NUM_QK_BOXES * BLOCK_N * SWIZZLE_BYTES;
  static constexpr int Q_BYTES = NUM_QK_BOXES * TILE_BOX_BYTES;
  static constexpr int NUM_STAGES = 2;

  static constexpr int NUM_MMA_WARPGROUPS = 2;
  static constexpr int WARPGROUP_THREADS = 128;
  static constexpr int NUM_MMA_THREADS = NUM_MMA_WARPGROUPS * WARPGROUP_THREADS;
  static constexpr int NUM_MMA_WARPS = NUM_MMA_THREADS / 32;
  // The producer is a whole warpgroup so that registers can move between roles with setmaxnreg: the
  // MMA warpgroups hold a 64x256 fp32 O accumulator each (128 registers per thread) and need the room.
  static constexpr int NUM_PRODUCER_THREADS = WARPGROUP_THREADS;
  static constexpr int NUM_THREADS = NUM_MMA_THREADS + NUM_PRODUCER_THREADS;
  static constexpr int PRODUCER_REGS = 24;
  // A second producer thread loads each request's Q tile by TMA as soon as both MMA warpgroups are done
  // with the previous one, so it lands under their last PV and epilogue. When the MMA threads loaded Q
  // themselves, a request piece cost 5-7 pages of time, ~5 us of it from the end of one epilogue to the
  // next Q in shared memory (perf notes round 13).
  static constexpr int KV_PRODUCER_WARP = 0;  // of the producer warpgroup; lane 0 issues the KV pages
  static constexpr int Q_PRODUCER_WARP = 1;   // lane 0 issues the Q tiles
  static constexpr int MMA_REGS = 240;
  static constexpr int REGISTER_FILE = 64 * 1024;
  // Every warp starts at the kernel's register count: the file split evenly over the CTA's threads, in
  // allocation units of 8 per thread (168 here, what ptxas reports). setmaxnreg only moves registers
  // between warpgroups through the CTA's pool, so a budget above that would leave the MMA warpgroups'
  // setmaxnreg.inc waiting forever.
  static constexpr int LAUNCH_REGS = REGISTER_FILE / NUM_THREADS / 8 * 8;

  static constexpr int O_COLS_PER_WG = D_V / NUM_MMA_WARPGROUPS;         // 256 value columns per warpgroup
  static constexpr int V_BOXES_PER_WG = O_COLS_PER_WG / BOX_COLS;        // 4
  static constexpr int MMA_K = 16;                                        // wgmma K for 16-bit inputs
  static constexpr int QK_STEPS = D_QK / MMA_K;                           // 36
  static constexpr int QK_STEPS_PER_BOX = BOX_COLS / MMA_K;               // 4
  // QK^T is issued as a head of this many K steps, then the rest, with the release of the other stage
  // in between (see the mainloop). One box covers the release; two measured the same on the H100.
  static constexpr int QK_HEAD_STEPS = QK_STEPS_PER_BOX;
  static constexpr int PV_STEPS = BLOCK_N / MMA_K;                        // 4
  // Requests of more than one 64-row tile are compute-bound, and there QK^T, whose K steps read both
  // operands from shared memory at its 128 bytes per cycle, sets much of the page period. So the MMA
  // threads of those requests keep Q's last (RoPE) box in registers, loaded once per request, and issue
  // its K steps with A from registers: 0.995-1.016x on the 18 such b = 128 grid shapes, 1.008-1.011x at
  // b = 1 and 32 with 128 heads (perf notes round 15). One-tile requests keep Q in shared memory:
  // memory-bound, they lost 0.9-1.3% with it.
  static constexpr int Q_REG_BOX = ROPE_BOX;                              // of Q
  static constexpr int Q_REG_FIRST_STEP = Q_REG_BOX * QK_STEPS_PER_BOX;   // its first K step, 32
  // A 64x16 wgmma A fragment of 16-bit elements, spread over a warpgroup: 4 registers per thread.
  static constexpr int A_REGS_PER_STEP =
      BLOCK_M * MMA_K * int(sizeof(Element)) / (WARPGROUP_THREADS * int(sizeof(uint32_t)));
  static constexpr int Q_REGS = QK_STEPS_PER_BOX * A_REGS_PER_STEP;       // 16
  static constexpr int P_BOX = ROPE_BOX;                                  // of a page, reused for P
  // Final outputs of tiles with at most this many real rows are stored from the accumulator registers;
  // larger ones go through shared memory as whole rows (see the epilogue).
  static constexpr int DIRECT_OUTPUT_MAX_ROWS = 16;
  // Accumulator fragments: each thread of a warpgroup holds N/2 fp32 values of a 64xN wgmma tile.
  static constexpr int S_FRAG = BLOCK_N / 2;                              // 32
  static constexpr int O_FRAG = O_COLS_PER_WG / 2;                        // 128

  static_assert(BLOCK_N == BOX_COLS && BLOCK_M == BLOCK_N, "P [BLOCK_M, BLOCK_N] is exactly one box");
  static_assert(BLOCK_M == AccumFrag::TILE_ROWS &&
                    WARPGROUP_THREADS == AccumFrag::WARPGROUP_WARPS * AccumFrag::WARP_THREADS,
                "a tile is one warpgroup's wgmma accumulator (fragment.h)");
  static_assert(S_FRAG % AccumFrag::CHUNK_VALUES == 0 && O_FRAG % AccumFrag::CHUNK_VALUES == 0,
                "accumulators are whole 8-column chunks");
  static_assert(NUM_QK_BOXES == NUM_V_BOXES + 1, "one RoPE box past the V boxes holds P");
  static_assert(NUM_STAGES == NUM_MMA_WARPGROUPS, "each MMA warpgroup owns one stage");
  static_assert(D_QK % BOX_COLS == 0 && D_V % BOX_COLS == 0, "rows must split into whole boxes");
  static_assert(O_COLS_PER_WG % BOX_COLS == 0, "each warpgroup owns whole V boxes");
  static_assert(O_COLS_PER_WG <= 256, "wgmma N is at most 256");
  static_assert(0 < QK_HEAD_STEPS && QK_HEAD_STEPS < QK_STEPS, "the QK^T head is a proper part of the K steps");
  static_assert(A_REGS_PER_STEP == 4, "an RS wgmma takes its A fragment as four 32-bit registers (primitives.h)");
  static_assert(QK_HEAD_STEPS <= Q_REG_FIRST_STEP && Q_REG_FIRST_STEP + QK_STEPS_PER_BOX == QK_STEPS,
                "the register box is the last box of QK^T, after its head");
  static_assert(NUM_MMA_THREADS % 128 == 0, "wgmma needs whole warpgroups");
  static_assert(KV_PRODUCER_WARP != Q_PRODUCER_WARP && Q_PRODUCER_WARP < NUM_PRODUCER_THREADS / 32,
                "the KV and Q producers are lanes of different warps of the producer warpgroup");
  static_assert(PRODUCER_REGS * NUM_PRODUCER_THREADS + MMA_REGS * NUM_MMA_THREADS <= LAUNCH_REGS * NUM_THREADS,
                "setmaxnreg budgets must fit the registers the CTA is launched with");
};

// Named barriers (id 0 is __syncthreads). All are among the NUM_MMA_THREADS consumer threads.
// Q passes from its producer thread to the MMA warps and back on the q_full / q_empty mbarriers.
enum class NamedBarrier : uint32_t {
  RowSum = 1,   // both warpgroups published their row sums (or, before a piece without pages, both
                // are done reading the previous request's)
  Output = 2,   // the output tile is staged in shared memory
  PReady = 3,   // PReady + stage: the owner of the stage's page published P, the row maxima and the
                // zeroed V tail rows
};

}  // namespace vllm_flashmla::sm90
