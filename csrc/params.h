// Kernel parameters: plain data filled by name in torch_binding.cpp. Strides are in elements.
#pragma once

#include <cstdint>

#include "config.h"
#include "sched_meta.h"

namespace vllm_flashmla {

struct SchedParams {
  const int32_t* cache_seqlens;  // [b]
  SchedRecord* records;          // [num_sm_parts]
  int32_t* num_splits;           // [b + 1], exclusive prefix sum of splits per request
  int b;
  int num_sm_parts;
  int num_q_rows;  // s_q * h_q: the rows of every piece's fp32 partial (the piece cost model)
};

// One part of Q: [b, s_q, h_q, cols] with a contiguous last dim; strides in elements. Only the host
// reads it, to encode the part's TMA map (q_map_heads below).
struct QPart {
  const void* ptr;
  int64_t stride_b, stride_s, stride_h;
};

struct DecodeParams {
  // Q in two parts, its D_V latent columns and its D_ROPE RoPE columns: separate tensors when the
  // caller has them apart (vLLM's absorbed q_nope and q_pe), or one 576-wide q with q_rope D_V on.
  QPart q;                        // [b, s_q, h_q, D_V]
  QPart q_rope;                   // [b, s_q, h_q, D_ROPE]
  const int32_t* block_table;     // [b, max_pages]
  const int32_t* cache_seqlens;   // [b]
  const SchedRecord* records;     // [num_sm_parts]
  const int32_t* num_splits;      // [b + 1]
  void* out;                      // [b, s_q, h_q, D_V], last dim contiguous
  float* lse;                     // [b, h_q, s_q], natural log; +inf for rows that saw no key
  float* o_accum;                 // [b + num_sm_parts, s_q * h_q, D_V] fp32 partials of split requests
  float* lse_accum;               // [b + num_sm_parts, s_q * h_q] log2-domain partial LSE (-inf: empty)

  int64_t stride_bt_b;
  int64_t stride_o_b, stride_o_s, stride_o_h;
  int64_t stride_lse_b, stride_lse_h;

  int b, s_q, h_q;
  int num_q_rows;        // s_q * h_q: query rows per request, packed (s_q major, h_q minor)
  int q_map_heads;       // the "head" extent of Q's tensor maps (q_map_heads below): h_q or num_q_rows
  int num_sm_parts;
  int num_sms;           // SMs of the device (the combine's choice of tiling)
  float scale_log2;      // softmax_scale * log2(e)
  bool causal;
};

struct CombineParams {
  const int32_t* num_splits;  // [b + 1]
  const float* o_accum;       // [b + num_sm_parts, s_q * h_q, D_V]
  const float* lse_accum;     // [b + num_sm_parts, s_q * h_q]
  void* out;                  // [b, s_q, h_q, D_V]
  float* lse;                 // [b, h_q, s_q]
  int64_t stride_o_b, stride_o_s, stride_o_h;
  int64_t stride_lse_b, stride_lse_h;
  int b, s_q, h_q, num_q_rows;
  int num_sm_parts;  // bounds the number of split requests
  int num_sms;       // SMs of the device
};

// Row `row` (packed s_q index * h_q + head) of request req in out [b, s_q, h_q, D_V], for the decode
// kernel's epilogue and the combine alike (DecodeParams and CombineParams name these fields the same).
template <typename Element, typename Params>
VLLM_FLASHMLA_HOST_DEVICE Element* output_row(const Params& params, int req, int row) {
  const int i = row / params.h_q, h = row % params.h_q;
  return static_cast<Element*>(params.out) + req * params.stride_o_b + i * params.stride_o_s + h * params.stride_o_h;
}

// The LSE of that row in lse [b, h_q, s_q], for the same two writers.
template <typename Params>
VLLM_FLASHMLA_HOST_DEVICE float* output_lse(const Params& params, int req, int row) {
  const int i = row / params.h_q, h = row % params.h_q;
  return params.lse + req * params.stride_lse_b + h * params.stride_lse_h + i;
}

// How the decode kernel's TMA maps see a part of Q. A tile is BLOCK_M packed rows (row = s_q index *
// h_q + head). When h_q divides BLOCK_M, or BLOCK_M divides h_q, a tile is a box of whole heads of
// consecutive tokens, so each map is [b][s_q][h_q][cols] with the part's own token and head strides:
// any layout is read in place, vLLM's absorbed latent too (tokens 512 elements apart, heads T x 512).
// Other head counts (20, 48, 96, ...) cut tiles across tokens; there the map is [b][1][s_q * h_q][cols]
// and needs one stride between the packed rows (q_row_stride), which the binding makes by copying a
// part that has none. Either way a map's "heads" extent is q_map_heads, and a tile starting at packed
// row r loads from head r % q_map_heads of token r / q_map_heads.
inline bool q_heads_tile(int64_t h_q) { return h_q <= BLOCK_M ? BLOCK_M % h_q == 0 : h_q % BLOCK_M == 0; }

inline int64_t q_map_heads(int64_t s_q, int64_t h_q) { return q_heads_tile(h_q) ? h_q : s_q * h_q; }

// The stride (elements) between q's packed (s_q, h_q) rows when they form one dimension: the head
// stride, or the s_q stride when there is one head. -1 when the rows are not uniformly strided (s_q > 1,
// h_q > 1 and an s_q stride other than h_q head strides).
inline int64_t q_row_stride(int64_t s_q, int64_t h_q, int64_t stride_q_s, int64_t stride_q_h) {
  if (h_q == 1) return stride_q_s;
  return s_q == 1 || stride_q_s == h_q * stride_q_h ? stride_q_h : -1;
}

// The stride (elements) along the "heads" dim of Q's maps: the part's head stride when the heads tile
// BLOCK_M, q_row_stride otherwise. -1: the part cannot be mapped as it is, and the binding copies it.
inline int64_t q_map_head_stride(int64_t s_q, int64_t h_q, int64_t stride_q_s, int64_t stride_q_h) {
  return q_heads_tile(h_q) ? stride_q_h : q_row_stride(s_q, h_q, stride_q_s, stride_q_h);
}

}  // namespace vllm_flashmla
