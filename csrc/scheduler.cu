// get_mla_metadata: split every request's pages over `num_sm_parts` parts so that each part carries
// about the same cost, cost(request piece) = pages + overhead (sched_meta.h). vllm_flashmla/scheduler.py
// is the same algorithm in Python, and the tests compare the two bit for bit: change both together.
// The budget plan's one-thread loop is in sched_plan.h, which the CPU tests also compile for the host.
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
#include "sched_plan.h"

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

// All lanes: inclusive prefix sum of v over the warp.
__device__ __forceinline__ int warp_inclusive_sum(int v, int lane) {
#pragma unroll
  for (int off = 1; off < SCHED_THREADS; off *= 2) {
    const int up = __shfl_up_sync(0xffffffffu, v, off);
    if (lane >= off) v += up;
  }
  return v;
}

// The plans are built in shared memory and copied out by the whole warp (copy_out): one thread storing
// every record field by field to global memory took 10.5-41 us per launch on the H100 for b = 1 to 512
// (ncu, docs/perf-notes.md round 22), while FA3-MLA's scheduler adds 1.7-3.9 us to a step at b <= 32
// (bench_decode.py's meta_us). per_req[req] holds the pages of req until the plan has placed it, then
// num_splits[req + 1].

// All lanes: every part holds one piece of at most `piece` pages of one request. Lane l places the
// requests l, l + 32, ...; a warp prefix sum of their piece counts gives each its first part.
__device__ void plan_pieces(int32_t* per_req, SchedRecord* records, int b, int num_sm_parts, int piece, int lane) {
  int parts_before = 0;  // parts taken by the requests of earlier rounds of the warp
  for (int base = 0; base < b; base += SCHED_THREADS) {
    const int req = base + lane;
    const int pages = req < b ? per_req[req] : 0;
    const int k = req < b ? pieces_of(pages, piece) : 0;  // every piece takes one part and one slot
    const int end = parts_before + warp_inclusive_sum(k, lane);
    for (int i = 0, part = end - k; i < k; ++i, ++part) {
      records[part] = SchedRecord{req, i * piece, req, min(pages, (i + 1) * piece), part};
    }
    if (req < b) per_req[req] = end;
    parts_before = __shfl_sync(0xffffffffu, end, SCHED_THREADS - 1);
  }
  for (int part = parts_before + lane; part < num_sm_parts; part += SCHED_THREADS) records[part] = idle_record(b);
}

// All lanes: the plan from shared to global memory, the records as 16-byte words.
__device__ void copy_out(const SchedParams& params, const SchedRecord* records, const int32_t* per_req, int lane) {
  static_assert(sizeof(SchedRecord) % sizeof(int4) == 0, "records are copied as whole 16-byte words");
  constexpr int WORDS_PER_RECORD = sizeof(SchedRecord) / sizeof(int4);
  const int4* src = reinterpret_cast<const int4*>(records);
  int4* dst = reinterpret_cast<int4*>(params.records);
  for (int i = lane; i < params.num_sm_parts * WORDS_PER_RECORD; i += SCHED_THREADS) dst[i] = src[i];
  if (lane == 0) params.num_splits[0] = 0;
  for (int req = lane; req < params.b; req += SCHED_THREADS) params.num_splits[req + 1] = per_req[req];
}

__global__ void __launch_bounds__(SCHED_THREADS) scheduler_kernel(const __grid_constant__ SchedParams params) {
  extern __shared__ int4 smem[];
  SchedRecord* records = reinterpret_cast<SchedRecord*>(smem);                 // [num_sm_parts]
  int32_t* per_req = reinterpret_cast<int32_t*>(records + params.num_sm_parts);  // [b]: pages, then splits
  const int lane = threadIdx.x;
  int total_pages = 0, longest = 0;
  for (int req = lane; req < params.b; req += SCHED_THREADS) {
    per_req[req] = num_pages_of(params.cache_seqlens[req]);
    total_pages += per_req[req];
    longest = max(longest, per_req[req]);
  }
  total_pages = warp_sum(total_pages);
  longest = warp_max(longest);
  __syncwarp();  // per_req[] is complete for every lane

  const int budget = budget_of(total_pages, params.b, params.num_sm_parts, FIXED_OVERHEAD_PAGES);
  // Warp-uniform: every lane computes the same pieces.
  const int fit = params.b <= params.num_sm_parts
                      ? smallest_piece(per_req, params.b, params.num_sm_parts, longest, lane)
                      : INT_MAX;
  int piece = 0;  // > 0: the piece plan with pieces of this many pages
  if (fit <= budget) {
    piece = cheapest_piece(per_req, params.b, fit, longest, total_pages, params.num_q_rows, lane);
    if (budget_plan_balances_better(piece, longest, budget, params.num_q_rows, FIXED_OVERHEAD_PAGES)) piece = 0;
  }
  __syncwarp();  // every lane is done reading per_req[] as pages before the plans overwrite it
  if (piece > 0) {
    plan_pieces(per_req, records, params.b, params.num_sm_parts, piece, lane);
  } else if (lane == 0) {
    const int overhead = cut_overhead_pages(params.num_q_rows);
    plan_budget(per_req, records, params.b, params.num_sm_parts,
                budget_of(total_pages, params.b, params.num_sm_parts, overhead), overhead);
  }
  __syncwarp();
  copy_out(params, records, per_req, lane);
}

}  // namespace

// Dynamic shared memory: records [num_sm_parts], then per_req [b].
size_t scheduler_smem_bytes(int64_t b, int64_t num_sm_parts) {
  return size_t(num_sm_parts) * sizeof(SchedRecord) + size_t(b) * sizeof(int32_t);
}

cudaError_t run_scheduler(const SchedParams& params, cudaStream_t stream) {
  // A launch may ask for this much dynamic shared memory without opting in; above it (b beyond about
  // 11k requests with 132 parts) the kernel must be allowed more, up to the device's
  // cudaDevAttrMaxSharedMemoryPerBlockOptin, which the binding checks before it gets here.
  constexpr size_t DEFAULT_DYNAMIC_SMEM_BYTES = 48 * 1024;
  const size_t smem = scheduler_smem_bytes(params.b, params.num_sm_parts);
  if (smem > DEFAULT_DYNAMIC_SMEM_BYTES) {
    cudaError_t err = cudaFuncSetAttribute(scheduler_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) return err;
  }
  scheduler_kernel<<<1, SCHED_THREADS, smem, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace vllm_flashmla
