// Dispatch of one decode step: the sm90 decode kernel for the element type, then the combine.
#include <cutlass/numeric_types.h>

#include "api.h"
#include "sm90/config.h"

namespace vllm_flashmla {

namespace sm90 {
template <typename Element>
cudaError_t launch_decode(const DecodeParams& params, const void* k_cache, int64_t num_pages, int64_t stride_kv_page,
                          int64_t stride_kv_token, cudaStream_t stream);
}

cudaError_t run_decode(const DecodeParams& params, DType dtype, const void* k_cache, int64_t num_pages,
                       int64_t stride_kv_page, int64_t stride_kv_token, cudaStream_t stream) {
  cudaError_t err = dtype == DType::BFloat16
                        ? sm90::launch_decode<cutlass::bfloat16_t>(params, k_cache, num_pages, stride_kv_page,
                                                                   stride_kv_token, stream)
                        : sm90::launch_decode<cutlass::half_t>(params, k_cache, num_pages, stride_kv_page,
                                                               stride_kv_token, stream);
  if (err != cudaSuccess) return err;

  // Which requests were split is known only on the device; the combine skips the others itself.
  CombineParams combine{};
  combine.num_splits = params.num_splits;
  combine.o_accum = params.o_accum;
  combine.lse_accum = params.lse_accum;
  combine.out = params.out;
  combine.lse = params.lse;
  combine.stride_o_b = params.stride_o_b;
  combine.stride_o_s = params.stride_o_s;
  combine.stride_o_h = params.stride_o_h;
  combine.stride_lse_b = params.stride_lse_b;
  combine.stride_lse_h = params.stride_lse_h;
  combine.b = params.b;
  combine.s_q = params.s_q;
  combine.h_q = params.h_q;
  combine.num_q_rows = params.num_q_rows;
  combine.num_sm_parts = params.num_sm_parts;
  combine.num_sms = params.num_sms;
  return run_combine(combine, dtype, stream);
}

}  // namespace vllm_flashmla
