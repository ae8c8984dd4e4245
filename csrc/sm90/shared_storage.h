// Shared-memory plan of one decode CTA (~218 KiB of the 227 KiB a CTA may use on sm90).
#pragma once

#include "config.h"

namespace vllm_flashmla::sm90 {

template <typename Config>
struct SharedStorage {
  using Element = typename Config::Element;
  static constexpr int BOX_ELEMS = Config::BLOCK_N * Config::BOX_COLS;

  // Q tile of the current request: 9 SWIZZLE_128B boxes of [BLOCK_M rows, 64 cols].
  alignas(1024) Element q[Config::NUM_QK_BOXES][BOX_ELEMS];
  // Ring of KV pages, each as 9 boxes of [64 keys, 64 cols]; boxes 0..7 double as V. Once the owner's
  // QK^T is done, box P_BOX (RoPE keys) is overwritten with P = softmax numerators [BLOCK_M, 64 keys].
  alignas(1024) Element kv[Config::NUM_STAGES][Config::NUM_QK_BOXES][BOX_ELEMS];
  float row_max[Config::NUM_STAGES][Config::BLOCK_M];          // running max after the stage's page
  float row_sum[Config::NUM_MMA_WARPGROUPS][Config::BLOCK_M];  // per-request sums over each warpgroup's pages
  uint64_t kv_full[Config::NUM_STAGES];    // TMA landed a page (transaction barrier)
  uint64_t kv_empty[Config::NUM_STAGES];   // every MMA warp is done reading the stage
  uint64_t q_full;    // TMA landed the Q tile of the next request (transaction barrier)
  uint64_t q_empty;   // every MMA warp is done with the Q tile (and any output staged over it)
};

// Dynamic shared memory is only guaranteed 16-byte aligned; the kernel aligns the base up to the
// 1024 bytes SWIZZLE_128B needs, so the launch asks for that much slack.
template <typename Config>
constexpr int decode_smem_bytes() {
  return int(sizeof(SharedStorage<Config>)) + 1024;
}

constexpr int SM90_MAX_SMEM_PER_CTA = 227 * 1024;

}  // namespace vllm_flashmla::sm90
