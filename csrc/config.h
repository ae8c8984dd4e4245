// Problem constants of DeepSeek MLA decode in its weight-absorbed ("MQA") form, shared by every kernel.
// Names follow FlashMLA: d_qk = latent + rope, d_v = latent, one KV head, 64-token KV pages.
#pragma once

namespace vllm_flashmla {

constexpr int D_V = 512;               // latent ("NoPE") width, also the value width
constexpr int D_ROPE = 64;             // decoupled RoPE key width
constexpr int D_QK = D_V + D_ROPE;     // 576: query/key width
constexpr int PAGE_SIZE = 64;          // tokens per KV page
constexpr int H_KV = 1;                // MLA shares one latent KV head across all query heads
constexpr int BLOCK_M = 64;            // packed query rows (s_q * h_q) per decode tile: the wgmma M
// ln 2: the kernels keep LSEs in the log2 domain; the API reports natural logs (lse_log2 * LN2).
constexpr float LN2 = 0.69314718055994530942f;

static_assert(D_QK == 576 && D_V == 512, "the kernels are specialised for DeepSeek's 512+64 latent layout");

}  // namespace vllm_flashmla
