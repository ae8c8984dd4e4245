// Where a thread's values of a wgmma accumulator are (PTX ISA, "wgmma .m64nNk16" register fragments of
// D; the A fragments of an RS wgmma follow the same rows and column pairs). For a 64xN fp32 tile,
// thread t of a warpgroup holds two rows, row0 = 16 * (t / 32) + (t % 32) / 4 and row0 + 8, and for
// every 8-column chunk j the columns 8 j + col0 + {0, 1}, col0 = 2 * (t % 4): fragment values 4 j + {0, 1}
// of the first row and 4 j + {2, 3} of the second. A row is thus spread over the 4 threads of a quad.
#pragma once

namespace vllm_flashmla::sm90 {

struct AccumFrag {
  static constexpr int WARP_THREADS = 32;
  static constexpr int WARPGROUP_WARPS = 4;
  static constexpr int QUAD = 4;                                      // threads that share a row
  static constexpr int ROWS_PER_THREAD = 2;                           // row0 and row0 + ROW_STEP
  static constexpr int COLS_PER_THREAD = 2;                           // per chunk: col0 and col0 + 1
  static constexpr int ROW_STEP = WARP_THREADS / QUAD;                // 8
  static constexpr int WARP_ROWS = ROWS_PER_THREAD * ROW_STEP;        // 16
  static constexpr int TILE_ROWS = WARPGROUP_WARPS * WARP_ROWS;       // 64: the wgmma M
  static constexpr int CHUNK_COLS = QUAD * COLS_PER_THREAD;           // 8
  static constexpr int CHUNK_VALUES = ROWS_PER_THREAD * COLS_PER_THREAD;  // 4 fragment values per chunk

  // `lane` is passed in so that a caller can take it from a volatile read (see the epilogue). By
  // reference: so the decode kernel's SASS stays what the open-coded expression gave (taken by value,
  // the same arithmetic came out with another register allocation, which was never measured).
  __device__ __forceinline__ static int row0(const int& wg_tid, const int& lane) {
    return WARP_ROWS * (wg_tid / WARP_THREADS) + lane / QUAD;
  }
  __device__ __forceinline__ static int col0(int lane) { return COLS_PER_THREAD * (lane % QUAD); }
  // One thread per row writes what the quad holds in common (row maxima and sums, LSE).
  __device__ __forceinline__ static bool quad_leader(int lane) { return lane % QUAD == 0; }
};

}  // namespace vllm_flashmla::sm90
