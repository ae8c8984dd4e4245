// Thin device wrappers over the Hopper instructions the decode kernel uses. The instruction-level
// pieces (wgmma atoms, TMA copies, mbarriers, the smem descriptor bitfield) come from CUTLASS/CuTe;
// what is ours is how the tiles are laid out, which lives here once.
#pragma once

#include <cstdint>
#include <utility>

#include <cute/arch/copy_sm90_desc.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/arch/mma_sm90_desc.hpp>
#include <cute/arch/mma_sm90_gmma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

#include "config.h"

namespace vllm_flashmla::sm90 {

using cute::SM90::GMMA::Major;
using cute::SM90::GMMA::ScaleOut;

// Byte offset of (row, 16-byte chunk) inside a SWIZZLE_128B box: TMA writes, and wgmma reads, row r
// at r * 128 bytes with its eight 16-byte chunks permuted by XOR with (r mod 8). Every manual write
// into a TMA/wgmma tile (Q rows, P, zeroed V rows) goes through this function.
__device__ __forceinline__ int swizzle_128b(int row, int chunk16) {
  return row * 128 + ((chunk16 ^ (row & 7)) << 4);
}

// wgmma descriptor of a K-major SWIZZLE_128B tile (rows of 64 16-bit elements, 8-row atoms 1024 B
// apart): Q and K in S = Q K^T, P in O += P V.
__device__ __forceinline__ uint64_t smem_desc_k_major(const void* smem) {
  cute::GmmaDescriptor desc;
  desc.bitfield.start_address_ = cute::cast_smem_ptr_to_uint(smem) >> 4;
  desc.bitfield.leading_byte_offset_ = 1;          // unused by swizzled K-major layouts
  desc.bitfield.stride_byte_offset_ = 1024 >> 4;   // next 8-row atom
  desc.bitfield.base_offset_ = 0;                  // tiles start on 1024-byte boundaries
  desc.bitfield.layout_type_ = uint8_t(cute::SM90::GMMA::LayoutType::B128);
  return desc.desc_;
}

// wgmma descriptor of an MN-major SWIZZLE_128B operand: V as the B of O += P V, where a page row
// (one key) holds 64 value columns per box. Along N the next 64 columns are the next box
// (`box_stride_bytes` away, the LBO); along K the next 8 keys are the next 1024-byte atom (the SBO).
__device__ __forceinline__ uint64_t smem_desc_mn_major(const void* smem, int box_stride_bytes) {
  cute::GmmaDescriptor desc;
  desc.bitfield.start_address_ = cute::cast_smem_ptr_to_uint(smem) >> 4;
  desc.bitfield.leading_byte_offset_ = box_stride_bytes >> 4;
  desc.bitfield.stride_byte_offset_ = 1024 >> 4;
  desc.bitfield.base_offset_ = 0;
  desc.bitfield.layout_type_ = uint8_t(cute::SM90::GMMA::LayoutType::B128);
  return desc.desc_;
}

// Advance a descriptor's start address by a byte offset (a K step inside a 128-byte swizzle row).
__device__ __forceinline__ uint64_t desc_advance(uint64_t desc, int bytes) { return desc + uint64_t(bytes >> 4); }

// Two floats rounded to the 16-bit input type, packed low-then-high as wgmma and memory expect.
template <typename Element>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi) {
  const Element pair[2] = {Element(lo), Element(hi)};
  return *reinterpret_cast<const uint32_t*>(pair);
}

// QK: Q and K from shared memory; QK_RS: Q's fragment from registers (Config::Q_REG_BOX); PV: P and V
// from shared memory.
template <typename Element> struct GmmaAtoms;
template <> struct GmmaAtoms<cutlass::bfloat16_t> {
  using QK = cute::SM90::GMMA::MMA_64x64x16_F32BF16BF16_SS<Major::K, Major::K>;
  using QK_RS = cute::SM90::GMMA::MMA_64x64x16_F32BF16BF16_RS<Major::K, Major::K>;
  using PV = cute::SM90::GMMA::MMA_64x256x16_F32BF16BF16_SS<Major::K, Major::MN>;
};
template <> struct GmmaAtoms<cutlass::half_t> {
  using QK = cute::SM90::GMMA::MMA_64x64x16_F32F16F16_SS<Major::K, Major::K>;
  using QK_RS = cute::SM90::GMMA::MMA_64x64x16_F32F16F16_RS<Major::K, Major::K>;
  using PV = cute::SM90::GMMA::MMA_64x256x16_F32F16F16_SS<Major::K, Major::MN>;
};

// Issue one wgmma whose accumulator is a register array (the atoms take one reference per register).
template <typename Atom, int N, size_t... I>
__device__ __forceinline__ void gmma_impl(uint64_t desc_a, uint64_t desc_b, float (&acc)[N], ScaleOut scale,
                                          std::index_sequence<I...>) {
  Atom::fma(desc_a, desc_b, acc[I]..., scale);
}
template <typename Atom, int N>
__device__ __forceinline__ void gmma(uint64_t desc_a, uint64_t desc_b, float (&acc)[N], ScaleOut scale) {
  gmma_impl<Atom>(desc_a, desc_b, acc, scale, std::make_index_sequence<N>{});
}

// The same with A from registers: a[0..3] is one K step's 64x16 fragment of this thread.
template <typename Atom, int N, size_t... I>
__device__ __forceinline__ void gmma_rs_impl(const uint32_t* a, uint64_t desc_b, float (&acc)[N], ScaleOut scale,
                                             std::index_sequence<I...>) {
  Atom::fma(a[0], a[1], a[2], a[3], desc_b, acc[I]..., scale);
}
template <typename Atom, int N>
__device__ __forceinline__ void gmma_rs(const uint32_t* a, uint64_t desc_b, float (&acc)[N], ScaleOut scale) {
  gmma_rs_impl<Atom>(a, desc_b, acc, scale, std::make_index_sequence<N>{});
}

// Pin wgmma register operands (accumulators, A fragments): no access moves across this point.
template <typename T, int N>
__device__ __forceinline__ void fence_operands(T (&regs)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) cute::warpgroup_fence_operand(regs[i]);
}
template <int N>
__device__ __forceinline__ void fence_accumulator(float (&acc)[N]) {
  fence_operands(acc);
}

// The non-.aligned form (`bar.sync` is `barrier.sync.aligned`): the two MMA warpgroups meet at the
// per-stage P barrier from different instructions (the stage owner in own_page, the other in
// follow_page), which .aligned does not allow. Callers also reach it after divergent code
// (lane-predicated stores, the V-tail loop), so the warp is reconverged first.
__device__ __forceinline__ void named_barrier_sync(NamedBarrier id, int num_threads) {
  __syncwarp();
  asm volatile("barrier.sync %0, %1;" ::"r"(uint32_t(id)), "r"(num_threads) : "memory");
}

// The per-stage barrier of NamedBarrier::PReady.
__device__ __forceinline__ NamedBarrier p_ready(int stage) {
  return NamedBarrier(uint32_t(NamedBarrier::PReady) + uint32_t(stage));
}

// The lane index as a volatile read, which the compiler cannot hoist out of a loop (see the epilogue).
__device__ __forceinline__ int lane_id() {
  int lane;
  asm volatile("mov.u32 %0, %%laneid;" : "=r"(lane));
  return lane;
}

// A 4-byte shared-memory store by 32-bit shared address.
__device__ __forceinline__ void st_shared_u32(uint32_t addr, uint32_t value) {
  asm volatile("st.shared.b32 [%0], %1;" ::"r"(addr), "r"(value) : "memory");
}

// Make generic-proxy shared-memory writes visible to the async proxy (wgmma operand reads, TMA).
__device__ __forceinline__ void fence_view_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

using Mbarrier = cutlass::arch::ClusterTransactionBarrier;

// L2 policy for KV pages: each page is read by the few CTAs of one request at nearly the same time
// and never again in this step, so let it leave L2 first.
constexpr uint64_t CACHE_HINT_EVICT_FIRST = uint64_t(cute::TMA::CacheHintSm90::EVICT_FIRST);
// Q tiles: every piece of a split request reads the same tile, at different times.
constexpr uint64_t CACHE_HINT_EVICT_NORMAL = uint64_t(cute::TMA::CacheHintSm90::EVICT_NORMAL);

}  // namespace vllm_flashmla::sm90
