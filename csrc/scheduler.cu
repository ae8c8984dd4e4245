// get_mla_metadata: split every request's pages over `num_sm_parts` parts so that each part carries
// about the same cost, cost(request piece) = pages + overhead (sched_meta.h). vllm_flashmla/scheduler.py
// is the same algorithm in Python, and the tests compare the two bit for bit: change both together.
//
// Two plans, chosen by budget = ceil(total_cost / num_sm_parts) + FIXED_OVERHEAD_PAGES (budget_of):
//
// * Pieces (only with no more requests than parts): cut every request into pieces of at most P
//   pages, P the smallest length for which all pieces fit in the parts, and give each piece a part of
//   its own. Taken when P <= budget, unless budget_plan_balances_better (sched_meta.h). P then grows
//   when longer pieces cost less (cheapest_piece): every piece of a split request writes an fp32
//   partial of all num_q_rows rows that the combine reads back, and with 128 rows one-page pieces
//   cost more in partials than they save in pages. No part starts a second piece (each start costs
//   a Q load and an epilogue), a request that fits in one piece is not split (no fp32 partial,
//   nothing to combine), and the parts are filled as evenly as whole pages allow. When P is the
//   longest request this is one part per request: on H100,
//   b = 128 uniform requests of 256 pages on 132 parts (P = 256, budget 259) step 1-5% faster than
//   split by budget (docs/perf-notes.md, round 4). On H200, b = 32 requests of 16 pages on 66
//   parts (h_q = 128) take pieces of 8 pages on 64 parts instead of 16 on 32 (round 6).
// * Budget: parts take contiguous (request, page) runs in request order; a request that does not fit
//   the rest of a part's budget is cut, and continues in the next part. Budget and cuts use
//   cut_overhead_pages(num_q_rows), which is smaller for tiles of few rows. The extra overhead in the
//   budget pays for the one request piece a part may have to start mid-request, so the parts always
//   cover all work; the last part takes whatever is left regardless, as a guarantee.
#include <climits>

#include "api.h"
#include "sched_meta.h"

namespace vllm_flashmla {
namespace {

constexpr int SCHED_THREADS = 32;

__device__ __forceinline__ int warp_sum(int v) {
#pragma unroll
  for (int off = SCHED_THREADS / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__device__ __forceinline__ int warp_max(int v) {
#pragma unroll
  for (int off = SCHED_THREADS / 2; off > 0; off /= 2) v = max(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// Parts a request of `pages` takes with pieces of at most `piece` pages (an empty request still needs
// one part, which writes its zero output).
__device__ __forceinline__ int pieces_of(int pages, int piece) { return max(1, (pages + piece - 1) / piece); }

// All lanes: the smallest piece length that cuts the b requests into at most num_sm_parts pieces.
// Requires b <= num_sm_parts, so one piece per request (the longest request) always fits.
__device__ int smallest_piece(const int32_t* pages, int b, int num_sm_parts, int longest, int lane) {
  int lo = 1, hi = max(longest, 1);
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    int count = 0;
    for (int req = lane; req < b; req += SCHED_THREADS) count += pieces_of(pages[req], mid);
    if (warp_sum(count) <= num_sm_parts) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return hi;
}

// All lanes: the pieces of split requests (those cut into more than one piece) with pieces of at most
// `piece` pages.
__device__ int split_pieces(const int32_t* pages, int b, int piece, int lane) {
  int count = 0;
  for (int req = lane; req < b; req += SCHED_THREADS) {
    const int k = pieces_of(pages[req], piece);
    count += k > 1 ? k : 0;
  }
  return warp_sum(count);
}

// Modeled cost of a piece plan in partial rows (sched_meta.h): its longest piece, plus the partial
// rows its split pieces write. int64: a long context makes piece * PARTIAL_ROWS_PER_PAGE large.
__device__ int64_t piece_cost(const int32_t* pages, int b, int piece, int num_q_rows, int lane) {
  return int64_t(piece) * PARTIAL_ROWS_PER_PAGE + int64_t(num_q_rows) * split_pieces(pages, b, piece, lane);
}

// floor(sqrt(x)) exactly: a float estimate, corrected in integers.
__device__ int64_t isqrt(int64_t x) {
  int64_t r = int64_t(sqrt(double(x)));
  while (r * r > x) --r;
  while ((r + 1) * (r + 1) <= x) ++r;
  return r;
}

// All lanes: the piece length of the piece plan. `fit` (the smallest that fits the parts) or, when
// cheaper by piece_cost, one of the two integers around the continuous optimum of
// piece * PARTIAL_ROWS_PER_PAGE + num_q_rows * total_pages / piece; ties go to the shorter piece.
__device__ int cheapest_piece(const int32_t* pages, int b, int fit, int longest, int64_t total_pages,
                              int num_q_rows, int lane) {
  const int64_t root = isqrt(int64_t(num_q_rows) * total_pages / PARTIAL_ROWS_PER_PAGE);
  int best = fit;
  int64_t best_cost = piece_cost(pages, b, fit, num_q_rows, lane);
  for (int64_t cand = root; cand <= root + 1; ++cand) {
    if (cand <= fit || cand > max(longest, 1)) continue;
    const int64_t cost = piece_cost(pages, b, int(cand), num_q_rows, lane);
    if (cost < best_cost) {
      best = int(cand);
      best_cost = cost;
    }
  }
  return best;
}

__device__ __forceinline__ SchedRecord idle_record(int b) { return SchedRecord{b, 0, b - 1, 0, 0, {0, 0, 0}}; }

// One thread: every part holds one piece of at most `piece` pages of one request.
__device__ void plan_pieces(const SchedParams& params, const int32_t* pages, int piece) {
  int part = 0;  // parts used so far, = num_splits[req]: every piece takes one part and one slot
  params.num_splits[0] = 0;
  for (int req = 0; req < params.b; ++req) {
    const int k = pieces_of(pages[req], piece);
    for (int i = 0; i < k; ++i, ++part) {
      params.records[part] = SchedRecord{req, i * piece, req, min(pages[req], (i + 1) * piece), part, {0, 0, 0}};
    }
    params.num_splits[req + 1] = part;
  }
  for (; part < params.num_sm_parts; ++part) params.records[part] = idle_record(params.b);
}

// One thread: contiguous (request, page) runs of up to `budget` per part, in request order, each
// request piece costing its pages plus `overhead`.
__device__ void plan_budget(const SchedParams& params, const int32_t* pages, int budget, int overhead) {
  int req = 0, page = 0;     // next unassigned (request, page)
  int splits_before = 0;     // num_splits[req]: splits of all requests before req
  int pieces_of_req = 0;     // parts that already covered a piece of req
  params.num_splits[0] = 0;
  for (int part = 0; part < params.num_sm_parts; ++part) {
    SchedRecord rec = idle_record(params.b);
    if (req < params.b) {
      rec.begin_req = req;
      rec.begin_page = page;
      rec.begin_slot = splits_before + pieces_of_req;
      int remaining = part + 1 == params.num_sm_parts ? INT_MAX : budget;
      while (req < params.b) {
        const int left = pages[req] - page;
        if (left + overhead <= remaining) {  // the rest of req fits: finish it here
          remaining -= left + overhead;
          rec.end_req = req;
          rec.end_page = pages[req];
          splits_before += pieces_of_req + 1;
          params.num_splits[req + 1] = splits_before;
          ++req;
          page = 0;
          pieces_of_req = 0;
        } else {  // cut req: take what the budget allows, if anything, and close the part
          const int take = remaining - overhead;
          if (take > 0) {
            rec.end_req = req;
            rec.end_page = page + take;
            page += take;
            ++pieces_of_req;
          }
          break;
        }
      }
    }
    params.records[part] = rec;
  }
}

__global__ void __launch_bounds__(SCHED_THREADS) scheduler_kernel(const __grid_constant__ SchedParams params) {
  extern __shared__ int32_t pages[];  // [b]: pages per request
  const int lane = threadIdx.x;
  int total_pages = 0, longest = 0;
  for (int req = lane; req < params.b; req += SCHED_THREADS) {
    pages[req] = num_pages_of(params.cache_seqlens[req]);
    total_pages += pages[req];
    longest = max(longest, pages[req]);
  }
  total_pages = warp_sum(total_pages);
  longest = warp_max(longest);
  __syncwarp();  // pages[] is complete for every lane

  const int budget = budget_of(total_pages, params.b, params.num_sm_parts, FIXED_OVERHEAD_PAGES);
  // Warp-uniform: every lane computes the same pieces.
  const int fit = params.b <= params.num_sm_parts ? smallest_piece(pages, params.b, params.num_sm_parts, longest, lane)
                                                  : INT_MAX;
  if (fit <= budget) {
    const int piece = cheapest_piece(pages, params.b, fit, longest, total_pages, params.num_q_rows, lane);
    if (!budget_plan_balances_better(piece, longest, budget, params.num_q_rows, FIXED_OVERHEAD_PAGES)) {
      if (lane == 0) plan_pieces(params, pages, piece);
      return;
    }
  }
  if (lane == 0) {
    const int overhead = cut_overhead_pages(params.num_q_rows);
    plan_budget(params, pages, budget_of(total_pages, params.b, params.num_sm_parts, overhead), overhead);
  }
}

}  // namespace

cudaError_t run_scheduler(const SchedParams& params, cudaStream_t stream) {
  const size_t smem = size_t(params.b) * sizeof(int32_t);
  if (smem > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(scheduler_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) return err;
  }
  scheduler_kernel<<<1, SCHED_THREADS, smem, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace vllm_flashmla
