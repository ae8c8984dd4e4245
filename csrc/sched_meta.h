// The split-KV schedule: the one binary layout shared by the scheduler kernel, the decode kernel and
// the Python model in vllm_flashmla/scheduler.py (tests compare the two bit for bit).
//
// The decode grid has `num_sm_parts` CTAs per 64-row query tile. Part p owns one contiguous run of
// (request, page) pairs in request order: from page `begin_page` of request `begin_req` up to, but
// not including, page `end_page` of request `end_req` (inclusive). A part with no work has
// begin_req > end_req. A request covered by more than one part is "split": each part writes an fp32
// partial for it into slot `num_splits[req] + k` (k-th part covering it) and the combine kernel merges
// them; a request covered by one part is finished in place.
#pragma once

#include <cstdint>

#include "config.h"

#if defined(__CUDACC__)
#define VLLM_FLASHMLA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define VLLM_FLASHMLA_HOST_DEVICE inline
#endif

namespace vllm_flashmla {

struct SchedRecord {
  int32_t begin_req;    // first request of this part
  int32_t begin_page;   // first page of begin_req handled here (> 0 when begin_req continues a split)
  int32_t end_req;      // last request of this part (inclusive); < begin_req when the part is idle
  int32_t end_page;     // one past the last page of end_req handled here
  int32_t begin_slot;   // partial-output slot of (this part, begin_req) = num_splits[begin_req] + k
  int32_t reserved[3];  // zero; pads the record to 32 bytes so a CTA reads it with two 16-byte loads
                        // (SchedRecord{begin_req, ..., begin_slot} value-initializes it)
};

constexpr int SCHED_RECORD_INTS = 8;
static_assert(sizeof(SchedRecord) == SCHED_RECORD_INTS * sizeof(int32_t), "SchedRecord must stay 32 bytes");
static_assert(alignof(SchedRecord) == alignof(int32_t), "SchedRecord is read as a plain int32 array");

// Cost model: a request piece costs its pages plus this many page-equivalents of fixed work (the
// softmax epilogue, writing O and, when split, the fp32 partial and its combine; the Q load overlaps
// the previous piece). FlashMLA uses the same value on H800; it keeps short requests from being split
// into pieces cheaper than their overhead, and it prices the choice between the scheduler's two plans.
constexpr int FIXED_OVERHEAD_PAGES = 5;

// A tile of at most FEW_ROWS real query rows ends a piece sooner (its fp32 partial is a quarter of a
// 64-row tile's, its epilogue under half as long), so the budget plan cuts such requests with a
// smaller overhead: varlen b = 128, h_q = 16 steps 1.3% faster on the H200 at s_k = 4096 and 8192
// (docs/perf-notes.md, rounds 13 and 14). The choice of plan keeps FIXED_OVERHEAD_PAGES: with the
// smaller one the budget plan would split every request of a uniform batch of budget-long requests,
// and its partials and combine cost more than one part per request saves (b = 128, s_k = 16384,
// 16 rows: 1-2% slower split).
constexpr int FEW_ROWS = 16;
constexpr int FEW_ROWS_OVERHEAD_PAGES = 3;
static_assert(0 < FEW_ROWS_OVERHEAD_PAGES && FEW_ROWS_OVERHEAD_PAGES <= FIXED_OVERHEAD_PAGES,
              "small tiles cost no more per piece than full ones");

// The overhead by which the budget plan cuts requests of num_q_rows (s_q * h_q) query rows.
VLLM_FLASHMLA_HOST_DEVICE int cut_overhead_pages(int num_q_rows) {
  return num_q_rows <= FEW_ROWS ? FEW_ROWS_OVERHEAD_PAGES : FIXED_OVERHEAD_PAGES;
}

// Cost a part may carry: the average cost per part, every request costing its pages plus `overhead`,
// plus one overhead more for the request piece a part may have to start mid-request.
VLLM_FLASHMLA_HOST_DEVICE int budget_of(int total_pages, int b, int num_sm_parts, int overhead) {
  return (total_pages + b * overhead + num_sm_parts - 1) / num_sm_parts + overhead;
}

// The piece plan carries `piece` pages plus the overhead in every part it uses, the budget plan at most
// `budget`. Where the piece plan splits requests anyway (piece < longest) it can cost more than the
// budget plan's balance, whose parts all carry work: requests of more than one tile with pieces dearer
// than the budget take the budget plan. On the H200 all 11 such shapes measured (13 timings) ran faster,
// 1.004-1.020x (b = 2 to 32 uniform requests of 256-1024 pages with 128 or 256 rows, where the piece
// plan used 64 of 66 or 32 of 33 parts); with tiles of 16 rows (b = 16 and 32, 512 pages, 132 parts)
// the budget plan was 0.4-0.6% slower, so they keep the pieces (docs/perf-notes.md, round 20).
VLLM_FLASHMLA_HOST_DEVICE bool budget_plan_balances_better(int piece, int longest, int budget, int num_q_rows,
                                                           int overhead) {
  return num_q_rows > BLOCK_M && piece < longest && piece + overhead > budget;
}

// Cost model of piece length: a piece of a split request leaves an fp32 partial of every query row
// (D_V * 4 bytes written by the decode kernel, read back by the combine), and this many such rows cost
// about as much as one more page in every piece. From the H200 (docs/perf-notes.md, round 7): with 128
// rows, pieces of 1 page cost 1.9 us more per step than pieces of 2 at b = 4, s_k = 1024 (64 -> 32
// pieces), and pieces of 3 cost 1.5 us more than pieces of 2 (32 -> 24): ~2.6 us per page of a piece
// and ~0.14 us per 128-row piece, so ~2400 rows per page, taken as 2048.
constexpr int PARTIAL_ROWS_PER_PAGE = 2048;

VLLM_FLASHMLA_HOST_DEVICE int num_pages_of(int seqlen) { return (seqlen + PAGE_SIZE - 1) / PAGE_SIZE; }

// The pages of `req` that the part described by `rec` covers: [first_page, end_page).
VLLM_FLASHMLA_HOST_DEVICE int first_page(const SchedRecord& rec, int req) {
  return req == rec.begin_req ? rec.begin_page : 0;
}
VLLM_FLASHMLA_HOST_DEVICE int end_page(const SchedRecord& rec, int req, int num_pages) {
  return req == rec.end_req ? rec.end_page : num_pages;
}

// Partial-output slot of `req` in this part (meaningful only when the request is split).
VLLM_FLASHMLA_HOST_DEVICE int partial_slot(const SchedRecord& rec, int req, const int32_t* num_splits) {
  return req == rec.begin_req ? rec.begin_slot : num_splits[req];
}

}  // namespace vllm_flashmla
