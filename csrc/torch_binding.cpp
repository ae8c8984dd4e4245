// The only translation unit that sees torch: argument checks, params filled by name, op schemas.
// Friendly validation lives in vllm_flashmla/interface.py; the checks here keep direct callers of
// torch.ops.flashmla_kernels from reaching a kernel with a layout it cannot read.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "api.h"
#include "config.h"
#include "sched_meta.h"

namespace vllm_flashmla {
namespace {

// Messages with values in them are assembled here and reach TORCH_CHECK as one std::string. Given
// several pieces, TORCH_CHECK formats them itself through c10::str's std::ostringstream, and with
// this file built by GCC 13 (the H200 device host's compiler) that formatting crashed the process with a
// segfault instead of raising the error (a check with only a literal, or with one prebuilt string,
// raised as it should).
inline std::string text(const char* s) { return s; }
inline std::string text(const std::string& s) { return s; }
inline std::string text(const c10::Device& d) { return d.str(); }
inline std::string text(at::ScalarType t) { return c10::toString(t); }
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
std::string text(T v) {
  return std::to_string(v);
}
template <typename... Parts>
std::string message(const Parts&... parts) {
  std::string out;
  (out += ... += text(parts));
  return out;
}
#define FLASHMLA_CHECK(cond, ...) TORCH_CHECK(cond, ::vllm_flashmla::message(__VA_ARGS__))

void check_cuda(cudaError_t err, const char* what) {
  FLASHMLA_CHECK(err == cudaSuccess, "flashmla_kernels: ", what, " failed: ", cudaGetErrorString(err));
}

void check_int32_cuda(const at::Tensor& t, const char* name, const at::Tensor& like) {
  FLASHMLA_CHECK(t.is_cuda() && t.device() == like.device(), name, " must be on ", like.device(), ", got ",
                 t.device());
  FLASHMLA_CHECK(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// One part of Q as the kernel loads it by TMA: [b, s_q, h_q, cols] with a contiguous last dim and
// 16-byte aligned rows. Read in place, except where the maps need one stride between the packed
// (s_q, h_q) rows (q_map_heads in params.h: head counts that do not tile BLOCK_M) and the part has
// none; that part is copied into that layout first, on the current stream.
at::Tensor q_part_rows(const at::Tensor& part, const char* name) {
  FLASHMLA_CHECK(part.stride(3) == 1 && part.stride(0) % 8 == 0 && part.stride(1) % 8 == 0 &&
                     part.stride(2) % 8 == 0 && aligned16(part),
                 name, " must have a contiguous last dim and 16-byte aligned rows");
  const bool in_place = q_map_head_stride(part.size(1), part.size(2), part.stride(1), part.stride(2)) >= 0;
  return in_place ? part : part.contiguous();
}

QPart q_part(const at::Tensor& rows) { return {rows.data_ptr(), rows.stride(0), rows.stride(1), rows.stride(2)}; }

void get_mla_metadata(const at::Tensor& cache_seqlens, int64_t num_sm_parts, int64_t num_q_rows,
                      const at::Tensor& records, const at::Tensor& num_splits) {
  TORCH_CHECK(cache_seqlens.is_cuda(), "cache_seqlens must be a CUDA tensor");
  check_int32_cuda(cache_seqlens, "cache_seqlens", cache_seqlens);
  check_int32_cuda(records, "records", cache_seqlens);
  check_int32_cuda(num_splits, "num_splits", cache_seqlens);
  TORCH_CHECK(cache_seqlens.dim() == 1 && cache_seqlens.is_contiguous(), "cache_seqlens must be a contiguous [b]");
  const int64_t b = cache_seqlens.size(0);
  TORCH_CHECK(num_sm_parts >= 1, "num_sm_parts must be >= 1");
  FLASHMLA_CHECK(num_q_rows >= 1 && num_q_rows <= INT32_MAX, "num_q_rows (s_q * h_q) must be a positive int32, got ",
                 num_q_rows);
  FLASHMLA_CHECK(records.is_contiguous() && records.dim() == 2 && records.size(0) == num_sm_parts &&
                     records.size(1) == SCHED_RECORD_INTS,
                 "records must be a contiguous [num_sm_parts, ", SCHED_RECORD_INTS, "] int32 tensor");
  FLASHMLA_CHECK(aligned16(records), "records must be 16-byte aligned (the scheduler writes 16-byte words; a "
                 "tensor of its own, as get_mla_metadata allocates, is)");
  TORCH_CHECK(num_splits.is_contiguous() && num_splits.numel() == b + 1, "num_splits must be a contiguous [b + 1]");
  if (b == 0) return;
  const c10::cuda::CUDAGuard guard(cache_seqlens.device());
  // The scheduler builds its plans in shared memory: one block's opt-in limit bounds the batch.
  int smem_limit = 0;
  check_cuda(cudaDeviceGetAttribute(&smem_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, cache_seqlens.get_device()),
             "querying the shared memory per block");
  const size_t limit = size_t(smem_limit), fixed = scheduler_smem_bytes(0, num_sm_parts);
  const size_t most_requests = limit > fixed ? (limit - fixed) / scheduler_smem_bytes(1, 0) : 0;
  FLASHMLA_CHECK(size_t(b) <= most_requests, "get_mla_metadata plans a batch in shared memory and fits at most ",
                 most_requests, " requests with num_sm_parts = ", num_sm_parts, " on this GPU (", smem_limit,
                 " bytes per block), got b = ", b, ": split the batch (in vLLM, lower --max-num-seqs)");
  SchedParams params{};
  params.cache_seqlens = cache_seqlens.data_ptr<int32_t>();
  params.records = reinterpret_cast<SchedRecord*>(records.data_ptr<int32_t>());
  params.num_splits = num_splits.data_ptr<int32_t>();
  params.b = int(b);
  params.num_sm_parts = int(num_sm_parts);
  params.num_q_rows = int(num_q_rows);
  check_cuda(run_scheduler(params, c10::cuda::getCurrentCUDAStream()), "scheduler launch");
}

// q is [b, s_q, h_q, 576], or with q_rope [b, s_q, h_q, 64] given, q is the [b, s_q, h_q, 512] latent part.
void decode(const at::Tensor& q, const std::optional<at::Tensor>& q_rope, const at::Tensor& k_cache,
            const at::Tensor& block_table, const at::Tensor& cache_seqlens, const at::Tensor& records,
            const at::Tensor& num_splits, double softmax_scale, bool causal, const at::Tensor& out,
            const at::Tensor& lse, const at::Tensor& o_accum, const at::Tensor& lse_accum) {
  TORCH_CHECK(q.is_cuda(), "q must be a CUDA tensor");
  const int64_t q_cols = q_rope.has_value() ? D_V : D_QK;
  FLASHMLA_CHECK(q.dim() == 4 && q.size(3) == q_cols && q.stride(3) == 1, "q must be [b, s_q, h_q, ", q_cols,
                 "] with a contiguous last dim", q_rope.has_value() ? " when q_rope is given" : "");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf, "q must be bf16 or fp16");
  if (q_rope.has_value()) {
    const at::Tensor& r = *q_rope;
    FLASHMLA_CHECK(r.is_cuda() && r.device() == q.device() && r.scalar_type() == q.scalar_type(),
                   "q_rope must have q's dtype and device");
    FLASHMLA_CHECK(r.dim() == 4 && r.size(0) == q.size(0) && r.size(1) == q.size(1) && r.size(2) == q.size(2) &&
                       r.size(3) == D_ROPE,
                   "q_rope must be [b, s_q, h_q, ", D_ROPE, "] with q's b, s_q and h_q");
  }
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "k_cache and out must have q's dtype");
  TORCH_CHECK(k_cache.is_cuda() && k_cache.device() == q.device(), "k_cache must be on q's device");
  FLASHMLA_CHECK(k_cache.dim() == 4 && k_cache.size(1) == PAGE_SIZE && k_cache.size(2) == H_KV &&
                     k_cache.size(3) == D_QK && k_cache.stride(3) == 1,
                 "k_cache must be [num_pages, ", PAGE_SIZE, ", ", H_KV, ", ", D_QK, "] with a contiguous last dim");
  for (const at::Tensor* t : {&block_table, &cache_seqlens, &records, &num_splits}) check_int32_cuda(*t, "index tensor", q);
  TORCH_CHECK(out.is_cuda() && out.device() == q.device() && out.is_contiguous() && aligned16(out),
              "out must be contiguous and 16-byte aligned on q's device");
  TORCH_CHECK(lse.is_cuda() && lse.device() == q.device() && lse.is_contiguous() && lse.scalar_type() == at::kFloat,
              "lse must be a contiguous float32 tensor on q's device");
  for (const at::Tensor* t : {&o_accum, &lse_accum}) {
    FLASHMLA_CHECK(t->is_cuda() && t->device() == q.device(), "o_accum/lse_accum must be on ", q.device(), ", got ",
                   t->device());
  }
  TORCH_CHECK(o_accum.is_contiguous() && o_accum.scalar_type() == at::kFloat && lse_accum.is_contiguous() &&
                  lse_accum.scalar_type() == at::kFloat,
              "o_accum/lse_accum must be contiguous float32");
  const int64_t b = q.size(0), s_q = q.size(1), h_q = q.size(2);
  const int64_t num_sm_parts = records.size(0);
  TORCH_CHECK(o_accum.numel() >= (b + num_sm_parts) * s_q * h_q * D_V && lse_accum.numel() >= (b + num_sm_parts) * s_q * h_q,
              "o_accum/lse_accum are too small for b + num_sm_parts partial slots");
  TORCH_CHECK(k_cache.stride(0) % 8 == 0 && k_cache.stride(1) % 8 == 0 && aligned16(k_cache),
              "k_cache pages and tokens must be 16-byte aligned (TMA)");
  if (b == 0) return;
  FLASHMLA_CHECK(s_q >= 1 && h_q >= 1, "q must have s_q >= 1 and h_q >= 1, got s_q = ", s_q, ", h_q = ", h_q);

  const c10::cuda::CUDAGuard guard(q.device());
  // The kernel loads each part of Q as tiles of 64 packed (s_q, h_q) rows by TMA. A 576-wide q gives
  // both: its latent columns, and its RoPE columns as a view D_V elements on.
  const at::Tensor q_latent = q_part_rows(q, "q");
  const at::Tensor q_rope_rows = q_rope.has_value() ? q_part_rows(*q_rope, "q_rope") : q_latent.narrow(3, D_V, D_ROPE);
  DecodeParams params{};
  params.q = q_part(q_latent);
  params.q_rope = q_part(q_rope_rows);
  params.block_table = block_table.data_ptr<int32_t>();
  params.cache_seqlens = cache_seqlens.data_ptr<int32_t>();
  params.records = reinterpret_cast<const SchedRecord*>(records.data_ptr<int32_t>());
  params.num_splits = num_splits.data_ptr<int32_t>();
  params.out = out.data_ptr();
  params.lse = lse.data_ptr<float>();
  params.o_accum = o_accum.data_ptr<float>();
  params.lse_accum = lse_accum.data_ptr<float>();
  params.stride_bt_b = block_table.stride(0);
  params.stride_o_b = out.stride(0);
  params.stride_o_s = out.stride(1);
  params.stride_o_h = out.stride(2);
  params.stride_lse_b = lse.stride(0);
  params.stride_lse_h = lse.stride(1);
  params.b = int(b);
  params.s_q = int(s_q);
  params.h_q = int(h_q);
  params.num_q_rows = int(s_q * h_q);
  params.q_map_heads = int(q_map_heads(s_q, h_q));
  params.num_sm_parts = int(num_sm_parts);
  // A cached device attribute, not a stream operation: safe while a CUDA graph is captured.
  check_cuda(cudaDeviceGetAttribute(&params.num_sms, cudaDevAttrMultiProcessorCount, q.get_device()),
             "SM count query");
  params.scale_log2 = float(softmax_scale * M_LOG2E);
  params.causal = causal && s_q > 1;
  const DType dtype = q.scalar_type() == at::kBFloat16 ? DType::BFloat16 : DType::Float16;
  check_cuda(run_decode(params, dtype, k_cache.data_ptr(), k_cache.size(0), k_cache.stride(0), k_cache.stride(1),
                        c10::cuda::getCurrentCUDAStream()),
             "decode launch");
}

// The binary layout and constants the Python side mirrors (vllm_flashmla/_layout.py checks them).
std::vector<int64_t> layout_info() {
  return {int64_t(sizeof(SchedRecord)),
          int64_t(offsetof(SchedRecord, begin_req)),
          int64_t(offsetof(SchedRecord, begin_page)),
          int64_t(offsetof(SchedRecord, end_req)),
          int64_t(offsetof(SchedRecord, end_page)),
          int64_t(offsetof(SchedRecord, begin_slot)),
          FIXED_OVERHEAD_PAGES,
          FEW_ROWS,
          FEW_ROWS_OVERHEAD_PAGES,
          PARTIAL_ROWS_PER_PAGE,
          D_QK,
          D_V,
          PAGE_SIZE,
          BLOCK_M};
}

}  // namespace

TORCH_LIBRARY(flashmla_kernels, m) {
  m.def(
      "get_mla_metadata(Tensor cache_seqlens, int num_sm_parts, int num_q_rows, Tensor(a!) records, "
      "Tensor(b!) num_splits) -> ()");
  m.def(
      "decode(Tensor q, Tensor? q_rope, Tensor k_cache, Tensor block_table, Tensor cache_seqlens, Tensor records, "
      "Tensor num_splits, float softmax_scale, bool causal, Tensor(a!) out, Tensor(b!) lse, Tensor(c!) o_accum, "
      "Tensor(d!) lse_accum) -> ()");
  m.def("layout_info() -> int[]", &layout_info);
}

TORCH_LIBRARY_IMPL(flashmla_kernels, CUDA, m) {
  m.impl("get_mla_metadata", &get_mla_metadata);
  m.impl("decode", &decode);
}

}  // namespace vllm_flashmla

// `import flashmla_kernels` loads the library and thereby registers the ops above.
PyMODINIT_FUNC PyInit_flashmla_kernels(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "flashmla_kernels", "vllm-flashmla CUDA kernels", -1, nullptr};
  return PyModule_Create(&module);
}
