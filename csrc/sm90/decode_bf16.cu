#include "decode_launch.cuh"

namespace vllm_flashmla::sm90 {
template cudaError_t launch_decode<cutlass::bfloat16_t>(const DecodeParams&, const void*, int64_t, int64_t, int64_t,
                                                        cudaStream_t);
}
