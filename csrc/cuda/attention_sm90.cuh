// Building blocks of the Hopper (sm_90a) flash-attention forward (attention_fwd_sm90.cu):
// mbarriers, TMA tile loads (cp.async.bulk.tensor) into 128-byte-swizzled shared memory, and
// warpgroup MMAs (wgmma.mma_async m64nNk16, float16/bfloat16 in, float32 accumulate) reading
// their operands from that shared memory through matrix descriptors. The instructions exist only
// on sm_90a; the kernels built from them are compiled empty for every other architecture and the
// launchers never pick them there.
//
// Shared-memory tiles (PTX ISA, "Asynchronous Warpgroup Level Matrix Shared Memory Layout"): a
// tile of R rows x 64 columns of 16-bit elements is R rows of 128 bytes, in 1024-byte groups of
// 8 rows, with the 128-byte swizzle: the 16-byte chunk c of row r sits at chunk c ^ (r % 8). A
// tile with D = 128 columns is two such 64-column slabs one after the other. TMA writes exactly
// this layout (CU_TENSOR_MAP_SWIZZLE_128B, a box 64 elements wide), and the descriptors below
// describe it to wgmma:
//   K-major operand (Q or K as the A/B of S = Q K^T; rows = M or N, columns = the k dimension):
//     SBO = 1024 (8-row groups), LBO unused; the k-th 16-column step starts 32 k bytes into the
//     slab (the hardware applies the swizzle to the address it computes, so the start address
//     moves by plain bytes as long as the slab is 1024-byte aligned).
//   MN-major operand (V as the B of O = P V, read transposed: k = the key rows, n = the head dim
//     columns): SBO = 1024 (8 key rows), LBO = the byte distance between the 64-column slabs;
//     the k-th 16-key step starts 16 * 128 * k bytes into the tile.
//   MN-major A (dS stored (keys, queries) as the A of dQ = dS K: k = keys, m = queries): as
//     the MN-major B, with the 64 queries of M one slab wide.
// Accumulator fragments of wgmma m64nNk16 (float32): warp w of the warpgroup holds rows
// 16 w .. 16 w + 15; lane 4 g + t holds d[4 j + 0, 1] = (row g, columns 8 j + 2 t, + 1) and
// d[4 j + 2, 3] = (row g + 8, same columns) for j < N / 8: mma.m16n8's C layout, repeated along
// n. An A operand from registers uses mma.m16n8k16's A layout for the warp's 16 rows.
#pragma once

#include <cuda.h>  // CUtensorMap and its enums (header only: the driver is reached at run time)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "cuda/attention_sm80.cuh"
#include "cuda/launchers.h"

// The sm_90a instructions compile only in the device pass for sm_90a; the emulation in
// tests/cuda_emulation supplies them on the CPU.
#if defined(FUSEDLM_WARP_EMULATION) || \
    (defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL))
#define FUSEDLM_SM90A_DEVICE 1
#endif

#ifndef __grid_constant__
#define __grid_constant__
#endif

namespace fusedlm::cuda::attention::sm90 {

// Bytes of one 8-row group of a 128-byte-swizzled tile, and the alignment every tile needs.
constexpr uint32_t kSwizzleGroupBytes = 1024;

// setmaxnreg's rules (PTX ISA): each count a multiple of 8 in [24, 256], and the warpgroups'
// counts together within the SM's 64K registers (these kernels run one CTA per SM). The
// emulation does not model registers, so the kernels check their split here.
constexpr bool register_split_fits(uint32_t producer, uint32_t consumer, int consumers) {
  auto valid = [](uint32_t r) { return r % 8 == 0 && r >= 24 && r <= 256; };
  return valid(producer) && valid(consumer) &&
         producer * 128 + consumer * 128 * static_cast<uint32_t>(consumers) <= 65536;
}

// A shared-memory matrix descriptor of a 128-byte-swizzled operand starting at `smem`:
// bits 0-13 start address >> 4, 16-29 LBO >> 4, 32-45 SBO >> 4, 62-63 layout (1 = 128B swizzle);
// base offset (49-51) 0, as every tile is 1024-byte aligned.
__device__ __forceinline__ uint64_t make_smem_descriptor(const void* smem, uint32_t lbo_bytes,
                                                         uint32_t sbo_bytes) {
  uint64_t desc = (shared_address(smem) >> 4) & 0x3fffu;
  desc |= static_cast<uint64_t>((lbo_bytes >> 4) & 0x3fffu) << 16;
  desc |= static_cast<uint64_t>((sbo_bytes >> 4) & 0x3fffu) << 32;
  desc |= uint64_t{1} << 62;
  return desc;
}

// Pins the accumulators in place around wgmma's issue and wait: they are registers the asm
// statements do not name, so without this the compiler may read them before the wait that
// makes them valid (CUTLASS's warpgroup_fence_operand).
template <int N>
__device__ __forceinline__ void fence_accumulators(float (&d)[N]) {
#ifndef FUSEDLM_WARP_EMULATION
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
#else
  (void)d;
#endif
}

// Pins A-operand registers (P) in place: their values are computed before the wgmma fence
// rather than sunk past it (ptxas would then insert a fence of its own there).
template <int M, int N>
__device__ __forceinline__ void fence_registers(uint32_t (&r)[M][N]) {
#ifndef FUSEDLM_WARP_EMULATION
#pragma unroll
  for (int i = 0; i < M; ++i) {
#pragma unroll
    for (int j = 0; j < N; ++j) asm volatile("" : "+r"(r[i][j])::"memory");
  }
#else
  (void)r;
#endif
}

#if !defined(FUSEDLM_WARP_EMULATION) && defined(FUSEDLM_SM90A_DEVICE)

// ---- mbarriers (shared memory, 8 bytes each) --------------------------------------------------

__device__ __forceinline__ void mbarrier_init(uint64_t* barrier, uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(shared_address(barrier)),
               "r"(arrivals)
               : "memory");
}

// Makes the initialized barriers visible to the async proxy (TMA) and the other threads; a
// __syncthreads follows it.
__device__ __forceinline__ void fence_barrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// One arrival that also expects `bytes` of TMA traffic to complete the phase.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* barrier, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(
                   shared_address(barrier)),
               "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void mbarrier_arrive(uint64_t* barrier) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(shared_address(barrier))
               : "memory");
}

// Waits until the phase with parity `phase` of the barrier has completed.
__device__ __forceinline__ void mbarrier_wait(uint64_t* barrier, uint32_t phase) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "wait_loop:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_loop;\n"
      "}\n" ::"r"(shared_address(barrier)),
      "r"(phase)
      : "memory");
}

// ---- TMA ---------------------------------------------------------------------------------------

// Loads the box of `map` at coordinates (c0 innermost .. c3) into shared memory at `smem`
// (1024-byte aligned); completes its bytes on `barrier`. Out-of-bounds elements are zeros.
__device__ __forceinline__ void tma_load_4d(void* smem, const CUtensorMap* map, int c0, int c1,
                                            int c2, int c3, uint64_t* barrier) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(shared_address(smem)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3),
      "r"(shared_address(barrier))
      : "memory");
}

// ---- register reallocation between warpgroups -----------------------------------------------

template <uint32_t kRegisters>
__device__ __forceinline__ void registers_decrease() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}

template <uint32_t kRegisters>
__device__ __forceinline__ void registers_increase() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}

// Orders this thread's ordinary shared-memory stores before later reads of them by the async
// proxy (wgmma, TMA); a barrier between the threads follows it.
__device__ __forceinline__ void fence_view_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// A plain shared-memory store of a value the async proxy (wgmma) reads later: the storing
// thread's fence_view_async_shared and then a barrier must come before that read (the emulation
// checks both).
__device__ __forceinline__ void store_shared_for_async(void* smem, uint32_t value) {
  *static_cast<uint32_t*>(smem) = value;
}

// ---- named barriers (0 is __syncthreads') ------------------------------------------------------

// Arrives at barrier `id` and waits until `threads` threads (a multiple of 32) have arrived.
__device__ __forceinline__ void named_barrier_sync(uint32_t id, uint32_t threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Arrives at barrier `id` (of `threads` threads) without waiting, when `arrive`: a predicated
// instruction, not a branch (a divergent path between wgmmas makes ptxas serialize them).
__device__ __forceinline__ void named_barrier_arrive(uint32_t id, uint32_t threads, bool arrive) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %2, 0;\n@p bar.arrive %0, %1;\n}\n" ::"r"(id),
      "r"(threads), "r"(static_cast<uint32_t>(arrive))
      : "memory");
}

// ---- wgmma -------------------------------------------------------------------------------------

// Orders this warpgroup's register writes before the next wgmma reads its accumulators.
__device__ __forceinline__ void warpgroup_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}

__device__ __forceinline__ void warpgroup_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}

// Waits until at most kPending committed wgmma groups of this warpgroup are in flight.
template <int kPending>
__device__ __forceinline__ void warpgroup_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}

// The accumulators of one wgmma as "+f" operands %0 .. %(n - 1).
#define FUSEDLM_ACC32_REGS                                                         \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, "   \
  "%17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define FUSEDLM_ACC64_REGS                                                         \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, "   \
  "%17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "    \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, "     \
  "%47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, "     \
  "%62, %63}"
#define FUSEDLM_ACC_8(i)                                                         \
  "+f"(d[i + 0]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), \
      "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
#define FUSEDLM_ACC32_OPERANDS \
  FUSEDLM_ACC_8(0), FUSEDLM_ACC_8(8), FUSEDLM_ACC_8(16), FUSEDLM_ACC_8(24)
#define FUSEDLM_ACC64_OPERANDS                                                 \
  FUSEDLM_ACC32_OPERANDS, FUSEDLM_ACC_8(32), FUSEDLM_ACC_8(40), FUSEDLM_ACC_8(48), \
      FUSEDLM_ACC_8(56)

// d (64 x N, float32) (+)= A (64 x 16) . B (16 x N), both from shared memory through their
// descriptors: K-major (kTransA / kTransB = 0: rows of k, e.g. Q and K in S = Q K^T) or
// MN-major (1: k rows of M / N contiguous elements, e.g. dS stored (keys, queries) as the A of
// dQ = dS K). accumulate == false overwrites d. N = 64 or 128.
template <typename T, int N, int kTransA, int kTransB>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b,
                                         bool accumulate) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>);
  static_assert(N == 64 || N == 128);
  static_assert((kTransA == 0 || kTransA == 1) && (kTransB == 0 || kTransB == 1));
  const int scale_d = accumulate ? 1 : 0;
  if constexpr (N == 64 && std::is_same_v<T, __half>) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 " FUSEDLM_ACC32_REGS
        ", %32, %33, p, 1, 1, %35, %36;\n}\n"
        : FUSEDLM_ACC32_OPERANDS
        : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(kTransA), "n"(kTransB));
  } else if constexpr (N == 64) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " FUSEDLM_ACC32_REGS
        ", %32, %33, p, 1, 1, %35, %36;\n}\n"
        : FUSEDLM_ACC32_OPERANDS
        : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(kTransA), "n"(kTransB));
  } else if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 " FUSEDLM_ACC64_REGS
        ", %64, %65, p, 1, 1, %67, %68;\n}\n"
        : FUSEDLM_ACC64_OPERANDS
        : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(kTransA), "n"(kTransB));
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " FUSEDLM_ACC64_REGS
        ", %64, %65, p, 1, 1, %67, %68;\n}\n"
        : FUSEDLM_ACC64_OPERANDS
        : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(kTransA), "n"(kTransB));
  }
}

// d (64 x N, float32) += A (64 x 16 from registers, this warp's 16 rows in mma's A layout) .
// B (16 x N, MN-major in shared memory: k rows of N contiguous columns, read transposed).
// N = 64 or 128 (the head dim of O = P V).
template <typename T, int N>
__device__ __forceinline__ void wgmma_rs_transposed_b(float (&d)[N / 2], const uint32_t (&a)[4],
                                                      uint64_t desc_b) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>);
  static_assert(N == 64 || N == 128);
  if constexpr (N == 64 && std::is_same_v<T, __half>) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 " FUSEDLM_ACC32_REGS
                 ", {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
                 : FUSEDLM_ACC32_OPERANDS
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
  } else if constexpr (N == 64) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " FUSEDLM_ACC32_REGS
                 ", {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
                 : FUSEDLM_ACC32_OPERANDS
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
  } else if constexpr (std::is_same_v<T, __half>) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 " FUSEDLM_ACC64_REGS
                 ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
                 : FUSEDLM_ACC64_OPERANDS
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
  } else {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " FUSEDLM_ACC64_REGS
                 ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
                 : FUSEDLM_ACC64_OPERANDS
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
  }
}

#undef FUSEDLM_ACC32_REGS
#undef FUSEDLM_ACC64_REGS
#undef FUSEDLM_ACC_8
#undef FUSEDLM_ACC32_OPERANDS
#undef FUSEDLM_ACC64_OPERANDS

#endif  // !FUSEDLM_WARP_EMULATION && FUSEDLM_SM90A_DEVICE

// ---- host: TMA descriptors ---------------------------------------------------------------------

#ifndef FUSEDLM_WARP_EMULATION
// Encodes a 4-D tile map over a (B, H, T, D) input for 128-byte-swizzled boxes of
// (64 columns of D) x (box_rows tokens) x 1 x 1: dims innermost first (D, T, H, B), strides in
// bytes for T, H, B (multiples of 16). Out-of-bounds reads of a box are zeros. Fails (without a
// launch) when the driver or the layout does not allow it; the caller then takes the sm_80 path.
cudaError_t encode_tile_map(CUtensorMap* map, DType dtype, const void* base,
                            const uint64_t (&dims)[4], const uint64_t (&strides_bytes)[3],
                            uint32_t box_rows);
#endif

// A map over one (B, H, T, D) input with boxes of 64 columns x `rows` tokens.
inline cudaError_t encode_input(CUtensorMap* map, const AttentionShape& s,
                                const AttentionInput& in, int64_t heads, int64_t tokens,
                                uint32_t rows) {
  const uint64_t element = 2;
  // A stride of a size-1 dimension is never used; the driver still wants a multiple of 16 > 0.
  auto stride = [&](int64_t elements, int64_t size) -> uint64_t {
    const uint64_t bytes = static_cast<uint64_t>(elements) * element;
    return size == 1 && bytes == 0 ? 16 : bytes;
  };
  const uint64_t dims[4] = {static_cast<uint64_t>(s.D), static_cast<uint64_t>(tokens),
                            static_cast<uint64_t>(heads), static_cast<uint64_t>(s.B)};
  const uint64_t strides[3] = {stride(in.token_stride, tokens), stride(in.head_stride, heads),
                               stride(in.batch_stride, s.B)};
  return encode_tile_map(map, s.dtype, in.data, dims, strides, rows);
}

// Whether this build and device run the sm_90a kernels (FUSEDLM_SM90A_KERNELS from CMake, a
// compute capability 9.0 device, FUSEDLM_ATTENTION_SM90 not "0").
bool sm90_enabled();

// The forward on the sm_90a kernel (attention_fwd_sm90.cu) when this build has it, the device is
// sm_90, D <= 128 and TMA can describe the inputs; cudaErrorNotSupported (nothing launched)
// otherwise, and the caller runs the sm_80 kernel.
cudaError_t attention_fwd_sm90(const AttentionFwdArgs& args, cudaStream_t stream);

// FUSEDLM_ATTENTION_SM90=require: where the sm_90a kernels do not apply, the call fails.
bool sm90_required();

// dK, dV and the float32 dQ accumulator (added to, zeroed by the caller; nullptr: no dQ, for
// the deterministic backward) on the sm_90a kernel, from delta = rowsum(dO * O) (B * Hq * Tq
// floats) and, for per-query key ranges, the query extents of key tiles of
// query_extent_block keys (B, ceil(Tk / query_extent_block), 2); cudaErrorNotSupported (nothing
// launched) where it does not apply: not sm_90, D > 128, per-query ranges without extents of
// 64-key tiles, or inputs TMA cannot describe.
cudaError_t attention_bwd_sm90(const AttentionBwdArgs& args, const float* delta,
                               float* dq_accumulator, const int32_t* query_extent,
                               int query_extent_block, cudaStream_t stream);

}  // namespace fusedlm::cuda::attention::sm90
