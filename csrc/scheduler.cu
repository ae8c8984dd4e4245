// get_mla_metadata: split every request's pages over `num_sm_parts` parts so that each part carries
// about the same cost, cost(request) = pages + FIXED_OVERHEAD_PAGES. Parts take contiguous
// (request, page) runs in request order; a request that does not fit the rest of a part's budget is
// cut, and continues in the next part. vllm_flashmla/scheduler.py is the same algorithm in Python,
// and the tests compare the two bit for bit: change both together.
//
// Budget per part: ceil(total_cost / num_sm_parts) + FIXED_OVERHEAD_PAGES. The extra overhead pays
// for the one request piece a part may have to start mid-request, so the parts always cover all work;
// the last part takes whatever is left regardless, as a guarantee.
//
// With no more requests than parts, none of them longer than the budget in pages, each request gets a
// part of its own instead: the longest part then exceeds the budget by less than one fixed overhead,
// and no request is split, so the step writes no fp32 partial and the combine has nothing to merge.
// Cutting such requests to the budget would leave pieces of a few pages that each carry a whole
// overhead. On H100, b = 128 uniform requests of 256 pages at 16-64 query rows (budget 259, 4 parts
// idle) step 1-5% faster this way than with all 128 of them split (docs/perf-notes.md, round 4).
#include <climits>

#include "api.h"
#include "sched_meta.h"

namespace vllm_flashmla {
namespace {

constexpr int SCHED_THREADS = 32;

__global__ void __launch_bounds__(SCHED_THREADS) scheduler_kernel(const __grid_constant__ SchedParams params) {
  extern __shared__ int32_t pages[];  // [b]: pages per request
  const int lane = threadIdx.x;
  int total = 0, longest = 0;
  for (int req = lane; req < params.b; req += SCHED_THREADS) {
    pages[req] = num_pages_of(params.cache_seqlens[req]);
    total += pages[req] + FIXED_OVERHEAD_PAGES;
    longest = max(longest, pages[req]);
  }
#pragma unroll
  for (int off = SCHED_THREADS / 2; off > 0; off /= 2) {
    total += __shfl_xor_sync(0xffffffffu, total, off);
    longest = max(longest, __shfl_xor_sync(0xffffffffu, longest, off));
  }
  __syncwarp();
  if (lane != 0) return;

  const int budget = (total + params.num_sm_parts - 1) / params.num_sm_parts + FIXED_OVERHEAD_PAGES;
  const bool part_per_request = params.b <= params.num_sm_parts && longest <= budget;
  int req = 0, page = 0;     // next unassigned (request, page)
  int splits_before = 0;     // num_splits[req]: splits of all requests before req
  int pieces_of_req = 0;     // parts that already covered a piece of req
  params.num_splits[0] = 0;
  for (int part = 0; part < params.num_sm_parts; ++part) {
    SchedRecord rec{params.b, 0, params.b - 1, 0, 0, {0, 0, 0}};
    if (req < params.b) {
      rec.begin_req = req;
      rec.begin_page = page;
      rec.begin_slot = splits_before + pieces_of_req;
      // Exactly the first request's cost when each request gets a part of its own.
      int remaining = part + 1 == params.num_sm_parts ? INT_MAX
                      : part_per_request                ? pages[req] + FIXED_OVERHEAD_PAGES
                                                        : budget;
      while (req < params.b) {
        const int left = pages[req] - page;
        if (left + FIXED_OVERHEAD_PAGES <= remaining) {  // the rest of req fits: finish it here
          remaining -= left + FIXED_OVERHEAD_PAGES;
          rec.end_req = req;
          rec.end_page = pages[req];
          splits_before += pieces_of_req + 1;
          params.num_splits[req + 1] = splits_before;
          ++req;
          page = 0;
          pieces_of_req = 0;
        } else {  // cut req: take what the budget allows, if anything, and close the part
          const int take = remaining - FIXED_OVERHEAD_PAGES;
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
