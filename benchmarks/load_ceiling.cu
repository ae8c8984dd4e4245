// The paged-KV load ceiling: how fast G CTAs can stream P KV pages each through shared memory by TMA,
// with no attention math, the way the decode kernel loads them (a page of 64 keys x 576 bf16 = 72 KiB
// as 9 SWIZZLE_128B boxes of [64 keys, 64 columns], EVICT_FIRST, pages in random order from a block
// table). It bounds what any MLA decode kernel built on this load path can reach on a memory-bound
// step; docs/perf-notes.md (round 17) compares ours and FlashMLA against it.
//
// Each CTA streams its pages through a ring of `slots` box slots: one thread issues the boxes as slots
// free up, another waits for each page's boxes, spins `hold` SM cycles (standing in for the QK^T,
// softmax and PV of a page) and frees the page's slots. slots = 18 is the decode kernel's two page
// stages; 27 is three. Prints one JSON object: per configuration the median time of a launch (10
// launches back to back per repetition, 15 repetitions), GB/s, and the CTAs' end times after the
// first CTA's start (min / median / max of the last launch).
//
//   nvcc -O3 -std=c++17 -arch=sm_90a -o /tmp/load_ceiling benchmarks/load_ceiling.cu
//   /tmp/load_ceiling > benchmarks/results/load_ceiling_<gpu>_<utc time>.json
#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "../csrc/config.h"                    // PAGE_SIZE, D_QK: the problem constants the decode kernel uses
#include "../csrc/sm90/tensor_map_encoder.h"  // the decode launch's cuTensorMapEncodeTiled

#define CHECK_CUDA(x)                                                                   \
  do {                                                                                  \
    const cudaError_t e = (x);                                                          \
    if (e != cudaSuccess) {                                                             \
      std::fprintf(stderr, "%s failed: %s (line %d)\n", #x, cudaGetErrorString(e), __LINE__); \
      std::exit(1);                                                                     \
    }                                                                                   \
  } while (0)

using vllm_flashmla::D_QK;       // bf16 columns per key
using vllm_flashmla::PAGE_SIZE;  // keys per page
constexpr int BOX_COLS = 64;                               // 128 bytes: one SWIZZLE_128B row
constexpr int BOXES_PER_PAGE = D_QK / BOX_COLS;            // 9
constexpr int BOX_BYTES = PAGE_SIZE * BOX_COLS * 2;        // 8 KiB
constexpr int PAGE_BYTES = BOXES_PER_PAGE * BOX_BYTES;     // 72 KiB
constexpr int MAX_SLOTS = 27;                              // 216 KiB of the 227 a CTA may use
constexpr int MAX_CTAS = 132;
constexpr int MAX_PAGES_PER_CTA = 256;
static_assert(D_QK % BOX_COLS == 0, "a key row splits into whole boxes");
static_assert(MAX_SLOTS * BOX_BYTES + 1024 <= 227 * 1024, "the ring fits a CTA's shared memory");

__device__ __forceinline__ uint32_t smem_addr(const void* p) { return uint32_t(__cvta_generic_to_shared(p)); }

__device__ __forceinline__ void mbarrier_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count));
}
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, int bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes));
}
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)));
}
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n .reg .pred done;\n WAIT: mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n @!done bra WAIT;\n}\n" ::"r"(
          smem_addr(bar)),
      "r"(parity));
}
// One [1, 64 keys, 64 columns] box of the cache tensor [pages][PAGE_SIZE][D_QK], completing on `bar`.
__device__ __forceinline__ void tma_load_box(void* dst, const CUtensorMap* map, uint64_t* bar, int col, int page,
                                             uint64_t policy) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint"
      " [%0], [%1, {%3, %4, %5}], [%2], %6;" ::"r"(smem_addr(dst)),
      "l"(map), "r"(smem_addr(bar)), "r"(col), "r"(0), "r"(page), "l"(policy)
      : "memory");
}
__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// stamps[2 cta] / [2 cta + 1]: the CTA's start and end (ns, %globaltimer).
__global__ void __launch_bounds__(64, 1)
    stream_pages(const __grid_constant__ CUtensorMap kv_map, const int* block_table, int pages_per_cta, int slots,
                 int hold_cycles, unsigned long long* stamps) {
  extern __shared__ uint8_t smem_raw[];
  __shared__ uint64_t full[MAX_SLOTS], empty[MAX_SLOTS];
  uint8_t* ring = smem_raw + (1024 - smem_addr(smem_raw) % 1024) % 1024;  // SWIZZLE_128B wants 1024-B alignment
  if (threadIdx.x == 0) {
    for (int s = 0; s < slots; ++s) {
      mbarrier_init(&full[s], 1);
      mbarrier_init(&empty[s], 1);
    }
    asm volatile("fence.mbarrier_init.release.cluster;");
  }
  __syncthreads();
  const int* pages = block_table + size_t(blockIdx.x) * pages_per_cta;
  const int num_boxes = pages_per_cta * BOXES_PER_PAGE;
  if (threadIdx.x == 0) {  // producer: box g of the CTA's stream goes to slot g % slots
    stamps[2 * blockIdx.x] = global_ns();
    uint64_t policy;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
    for (int g = 0; g < num_boxes; ++g) {
      const int slot = g % slots, round = g / slots;
      if (round > 0) mbarrier_wait(&empty[slot], (round - 1) & 1);
      mbarrier_arrive_expect_tx(&full[slot], BOX_BYTES);
      tma_load_box(ring + slot * BOX_BYTES, &kv_map, &full[slot], (g % BOXES_PER_PAGE) * BOX_COLS,
                   pages[g / BOXES_PER_PAGE], policy);
    }
  } else if (threadIdx.x == 32) {  // consumer: pages in order, each held for hold_cycles once landed
    for (int p = 0; p < pages_per_cta; ++p) {
      for (int j = 0; j < BOXES_PER_PAGE; ++j) {
        const int g = p * BOXES_PER_PAGE + j;
        mbarrier_wait(&full[g % slots], (g / slots) & 1);
      }
      for (const long long t0 = clock64(); clock64() - t0 < hold_cycles;) {
      }
      for (int j = 0; j < BOXES_PER_PAGE; ++j) mbarrier_arrive(&empty[(p * BOXES_PER_PAGE + j) % slots]);
    }
    stamps[2 * blockIdx.x + 1] = global_ns();
  }
}

int main() {
  const int total_pages = MAX_CTAS * MAX_PAGES_PER_CTA;
  void* kv;
  CHECK_CUDA(cudaMalloc(&kv, size_t(total_pages) * PAGE_BYTES));
  CHECK_CUDA(cudaMemset(kv, 0, size_t(total_pages) * PAGE_BYTES));

  const auto encode = vllm_flashmla::sm90::tensor_map_encoder();
  if (encode == nullptr) {
    std::fprintf(stderr, "cuTensorMapEncodeTiled is not available\n");
    return 1;
  }
  CUtensorMap kv_map;
  const cuuint64_t dims[3] = {D_QK, PAGE_SIZE, cuuint64_t(total_pages)};
  const cuuint64_t strides[2] = {D_QK * 2, cuuint64_t(PAGE_BYTES)};
  const cuuint32_t box[3] = {BOX_COLS, PAGE_SIZE, 1}, elem_strides[3] = {1, 1, 1};
  if (encode(&kv_map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, kv, dims, strides, box, elem_strides,
             CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
             CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS) {
    std::fprintf(stderr, "cuTensorMapEncodeTiled failed\n");
    return 1;
  }

  // A random permutation of all pages: every CTA reads distinct pages, scattered as vLLM's are.
  std::vector<int> order(total_pages);
  for (int i = 0; i < total_pages; ++i) order[i] = i;
  std::mt19937 rng(0);
  std::shuffle(order.begin(), order.end(), rng);
  int* block_table;
  CHECK_CUDA(cudaMalloc(&block_table, total_pages * sizeof(int)));
  CHECK_CUDA(cudaMemcpy(block_table, order.data(), total_pages * sizeof(int), cudaMemcpyHostToDevice));
  unsigned long long* stamps;
  CHECK_CUDA(cudaMalloc(&stamps, 2 * MAX_CTAS * sizeof(unsigned long long)));
  CHECK_CUDA(cudaFuncSetAttribute(stream_pages, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  MAX_SLOTS * BOX_BYTES + 1024));
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));

  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  std::printf("{\"gpu\": \"%s\", \"num_sms\": %d, \"launches_per_rep\": 10, \"reps\": 15, \"rows\": [\n", prop.name,
              prop.multiProcessorCount);
  constexpr int LAUNCHES = 10, REPS = 15;
  bool first = true;
  for (const int pages_per_cta : {64, 128, 256})  // s_k = 4096, 8192, 16384
    for (const int ctas : {128, MAX_CTAS})         // one request per CTA as in a uniform b = 128 plan; every SM
      for (const int hold : {0, 1500})
        for (const int slots : {18, MAX_SLOTS}) {
          const int smem = slots * BOX_BYTES + 1024;
          std::vector<float> us;
          for (int rep = 0; rep < REPS; ++rep) {
            CHECK_CUDA(cudaEventRecord(start));
            for (int i = 0; i < LAUNCHES; ++i)
              stream_pages<<<ctas, 64, smem>>>(kv_map, block_table, pages_per_cta, slots, hold, stamps);
            CHECK_CUDA(cudaEventRecord(stop));
            CHECK_CUDA(cudaEventSynchronize(stop));
            float ms;
            CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
            us.push_back(ms * 1000.f / LAUNCHES);
          }
          CHECK_CUDA(cudaGetLastError());
          std::sort(us.begin(), us.end());
          std::vector<unsigned long long> st(2 * ctas);
          CHECK_CUDA(cudaMemcpy(st.data(), stamps, st.size() * sizeof(st[0]), cudaMemcpyDeviceToHost));
          unsigned long long t0 = ~0ull;
          for (int c = 0; c < ctas; ++c) t0 = std::min(t0, st[2 * c]);
          std::vector<double> ends;
          for (int c = 0; c < ctas; ++c) ends.push_back((st[2 * c + 1] - t0) / 1000.0);
          std::sort(ends.begin(), ends.end());
          const double median_us = us[REPS / 2];
          std::printf("%s{\"ctas\": %d, \"pages_per_cta\": %d, \"slots\": %d, \"hold_cycles\": %d, \"us\": %.2f, "
                      "\"us_min\": %.2f, \"gbps\": %.0f, \"cta_end_us\": [%.1f, %.1f, %.1f]}\n",
                      first ? "" : ",", ctas, pages_per_cta, slots, hold, median_us, us[0],
                      double(ctas) * pages_per_cta * PAGE_BYTES / (median_us * 1e3), ends[0], ends[ctas / 2],
                      ends[ctas - 1]);
          first = false;
        }
  std::printf("]}\n");
  return 0;
}
