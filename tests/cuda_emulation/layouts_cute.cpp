// The layouts the CUDA attention kernels rely on, checked against CUTLASS's CuTe (the
// nvidia-cutlass package's headers, host code only): CuTe's MMA and copy atoms run on A100s and
// H100s every day, so where they and we agree, our reading of the PTX ISA is the hardware's.
//
// Why: the emulation (warp_emulation.h, sm90_emulation.h) and the kernels (attention_sm80.cuh,
// attention_sm90.cuh and the .cu files) were both written from one reading of the ISA's
// descriptor and fragment layouts. The emulated attention tests prove the kernels right under
// that reading only; a misreading common to both would pass them and fail on a GPU. Here an
// independent reading is the judge:
//   (a) where TMA's 128-byte swizzle puts each element of a box (the emulation's placement)
//       against CuTe's 128B-swizzled GMMA atoms, K-major and MN-major, at the kernels' tiles;
//   (b) the descriptors the kernels build (make_smem_descriptor with the kernels' arguments)
//       against the ones CuTe's make_gmma_desc builds for the same shared-memory tensors, and
//       the addresses the emulation's wgmma reads through those descriptors against CuTe's;
//   (c) the wgmma accumulator and register-A fragments (the emulation's, which the kernels'
//       softmax, masks and stores follow) against CuTe's CLayout_64xN and ALayout_64x16;
//   (d) the sm_80 instructions: mma.m16n8k16's A, B and C fragments and ldmatrix.x4 (plain and
//       transposed) against CuTe's MMA_Traits and Copy_Traits.
// Build: g++ -std=c++20 -shared -fPIC -I<cutlass>/include -I<cuda>/include -I<cuda>/include/cccl
// -I<repo>/csrc (test_layouts_cute.py).
#include <cstddef>

// CuTe builds a descriptor's start address with cvta.to.shared, which exists only in device
// code; here it is the offset into the emulated shared window (defined below), as the kernels'
// shared_address returns it under the emulation.
#define CUTE_CVTA_GENERIC_TO_SHARED_ACTIVATED 1
size_t __cvta_generic_to_shared(const void* pointer);

#include <cute/atom/copy_traits_sm75.hpp>
#include <cute/atom/mma_traits_sm80.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>

#include <cstdio>
#include <string>

#include "warp_emulation.h"

#include "cuda/attention_sm90.cuh"

size_t __cvta_generic_to_shared(const void* pointer) {
  return emu::shared_offset(pointer, "a CuTe tensor outside the emulated shared memory");
}

namespace {

using namespace cute;  // NOLINT
namespace gmma = cute::SM90::GMMA;
using fusedlm::cuda::attention::sm90::kSwizzleGroupBytes;
using fusedlm::cuda::attention::sm90::make_smem_descriptor;

constexpr uint32_t kRowBytes = 128;  // one row of a 64-column 16-bit slab
constexpr uint32_t kBase = 4096;     // where the tiles sit in the emulated shared window

std::string& message() {
  static std::string m;
  return m;
}

// Counts a mismatch, keeping the first one's description.
void mismatch(int& count, const std::string& what) {
  if (message().empty()) message() = what;
  ++count;
}

// The shared-window offset (as the kernels' shared_address and the emulation see it) of a
// CuTe smem pointer into emu::shared_memory, swizzle applied.
template <typename Pointer>
uint32_t offset_of(Pointer p) {
  const auto* raw = reinterpret_cast<const unsigned char*>(raw_pointer_cast(p));
  return static_cast<uint32_t>(raw - emu::shared_memory);
}

// CuTe's descriptor of a (rows, 16) k-block.
template <gmma::Major kMajor, typename Tensor>
uint64_t cute_descriptor(const Tensor& block) {
  return gmma::make_gmma_desc<kMajor>(block).desc_;
}

std::string hex(uint64_t v) {
  char b[32];
  std::snprintf(b, sizeof b, "%016llx", static_cast<unsigned long long>(v));
  return b;
}

// K-major operands: R token rows x 64 * kSlabs head-dim columns, TMA-loaded as kSlabs slabs of
// R rows (Q, K, dO tiles); read as A (64-row blocks: a consumer's queries or keys) or B (all R
// rows) of S = Q K^T, S^T = K Q^T, dP^T = V dO^T, the k-th 16-column step 32 bytes into a slab.
template <typename T, int R, int kSlabs, int kOperandRows>
int check_k_major() {
  int bad = 0;
  const std::string name = "K-major " + std::to_string(R) + "x" + std::to_string(64 * kSlabs) +
                           " read " + std::to_string(kOperandRows) + " rows at a time";
  auto layout = tile_to_shape(gmma::Layout_K_SW128_Atom<T>{}, Shape<Int<R>, Int<64 * kSlabs>>{});
  auto tile = make_tensor(make_smem_ptr(reinterpret_cast<T*>(emu::shared_memory + kBase)), layout);
  // (a) The tile is kSlabs TMA boxes of R rows, one after the other.
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < 64 * kSlabs; ++c) {
      const uint32_t tma = emu::tma_box_address(kBase + (c / 64) * R * kRowBytes, r, c % 64);
      if (offset_of(&tile(r, c)) != tma) {
        mismatch(bad, name + ": element (" + std::to_string(r) + ", " + std::to_string(c) +
                          ") CuTe " + std::to_string(offset_of(&tile(r, c))) + ", TMA " +
                          std::to_string(tma));
      }
    }
  }
  // (b) Each (kOperandRows, 16) block: the kernels' descriptor, CuTe's, and what wgmma reads.
  for (int m = 0; m < R / kOperandRows; ++m) {
    for (int kk = 0; kk < 4 * kSlabs; ++kk) {
      auto block = local_tile(tile, Shape<Int<kOperandRows>, _16>{}, make_coord(m, kk));
      const uint64_t cute = cute_descriptor<gmma::Major::K>(block);
      const uint64_t ours = make_smem_descriptor(
          emu::shared_memory + kBase + (kk / 4) * R * kRowBytes + m * kOperandRows * kRowBytes +
              (kk % 4) * 32,
          16, kSwizzleGroupBytes);
      if (cute != ours) {
        mismatch(bad, name + ": block (" + std::to_string(m) + ", " + std::to_string(kk) +
                          ") descriptor CuTe " + hex(cute) + ", kernels " + hex(ours));
      }
      const emu::Descriptor d = emu::decode_descriptor(cute);
      for (int i = 0; i < kOperandRows; ++i) {
        for (int k = 0; k < 16; ++k) {
          if (emu::k_major_address(d, i, k) != offset_of(&block(i, k))) {
            mismatch(bad, name + ": wgmma reads (" + std::to_string(i) + ", " +
                              std::to_string(k) + ") of block (" + std::to_string(m) + ", " +
                              std::to_string(kk) + ") at " +
                              std::to_string(emu::k_major_address(d, i, k)) + ", CuTe at " +
                              std::to_string(offset_of(&block(i, k))));
          }
        }
      }
    }
  }
  return bad;
}

// MN-major operands: kK token rows (the k dimension) x kMN columns, TMA-loaded as kMN / 64 slabs
// of kK rows, the slabs LBO = kK * 128 bytes apart (V of O = P V; dO and Q of dV += P^T dO and
// dK += dS^T Q; K as the B of dQ = dS K; dS^T, 64 queries wide, as the A of dQ), the k-th
// 16-row step 16 rows into the tile.
template <typename T, int kMN, int kK>
int check_mn_major() {
  int bad = 0;
  const std::string name = "MN-major " + std::to_string(kMN) + " (MN) x " + std::to_string(kK) +
                           " (k)";
  // Step<_2, _1>: atoms (64 MN x 8 k) tiled along k first, so each 64-column slab is whole.
  auto layout = tile_to_shape(gmma::Layout_MN_SW128_Atom<T>{}, Shape<Int<kMN>, Int<kK>>{},
                              Step<_2, _1>{});
  auto tile = make_tensor(make_smem_ptr(reinterpret_cast<T*>(emu::shared_memory + kBase)), layout);
  const uint32_t slab_bytes = kK * kRowBytes;
  for (int n = 0; n < kMN; ++n) {
    for (int k = 0; k < kK; ++k) {
      const uint32_t tma = emu::tma_box_address(kBase + (n / 64) * slab_bytes, k, n % 64);
      if (offset_of(&tile(n, k)) != tma) {
        mismatch(bad, name + ": element (n " + std::to_string(n) + ", k " + std::to_string(k) +
                          ") CuTe " + std::to_string(offset_of(&tile(n, k))) + ", TMA " +
                          std::to_string(tma));
      }
    }
  }
  for (int kc = 0; kc < kK / 16; ++kc) {
    auto block = local_tile(tile, Shape<Int<kMN>, _16>{}, make_coord(0, kc));
    const uint64_t cute = cute_descriptor<gmma::Major::MN>(block);
    uint64_t ours = make_smem_descriptor(emu::shared_memory + kBase + kc * 16 * kRowBytes,
                                         slab_bytes, kSwizzleGroupBytes);
    // One slab wide: the leading byte offset (the slab stride) is never used, and the kernels
    // pass their tiles' slab size (or 16) where CuTe writes its own placeholder.
    const uint64_t lbo_field = uint64_t{0x3fff} << 16;
    const uint64_t compared = kMN == 64 ? ~lbo_field : ~uint64_t{0};
    if ((cute & compared) != (ours & compared)) {
      mismatch(bad, name + ": k-block " + std::to_string(kc) + " descriptor CuTe " + hex(cute) +
                        ", kernels " + hex(ours));
    }
    const emu::Descriptor d = emu::decode_descriptor(cute);
    for (int n = 0; n < kMN; ++n) {
      for (int k = 0; k < 16; ++k) {
        if (emu::mn_major_address(d, k, n) != offset_of(&block(n, k))) {
          mismatch(bad, name + ": wgmma reads (k " + std::to_string(k) + ", n " +
                            std::to_string(n) + ") of k-block " + std::to_string(kc) + " at " +
                            std::to_string(emu::mn_major_address(d, k, n)) + ", CuTe at " +
                            std::to_string(offset_of(&block(n, k))));
        }
      }
    }
  }
  return bad;
}

// (c) Fragments: CuTe's layouts map (thread, value) to m + 64 * (n or k).
template <int N, typename CLayout>
int check_accumulators(CLayout layout) {
  int bad = 0;
  for (int thread = 0; thread < 128; ++thread) {
    for (int v = 0; v < N / 2; ++v) {
      const int index = layout(thread, v);
      const emu::MatrixPosition p = emu::accumulator_position(thread, v);
      if (p.row != index % 64 || p.column != index / 64) {
        mismatch(bad, "m64n" + std::to_string(N) + " accumulator: thread " +
                          std::to_string(thread) + " d[" + std::to_string(v) + "] is (" +
                          std::to_string(p.row) + ", " + std::to_string(p.column) +
                          "), CuTe (" + std::to_string(index % 64) + ", " +
                          std::to_string(index / 64) + ")");
      }
    }
  }
  return bad;
}

int check_a_fragment() {
  int bad = 0;
  const auto layout = gmma::ALayout_64x16{};
  for (int thread = 0; thread < 128; ++thread) {
    for (int v = 0; v < 8; ++v) {
      const int index = layout(thread, v);
      const emu::MatrixPosition p = emu::a_fragment_position(thread, v / 2, v % 2);
      if (p.row != index % 64 || p.column != index / 64) {
        mismatch(bad, "register A: thread " + std::to_string(thread) + " a[" +
                          std::to_string(v / 2) + "] half " + std::to_string(v % 2) + " is (" +
                          std::to_string(p.row) + ", " + std::to_string(p.column) +
                          "), CuTe (" + std::to_string(index % 64) + ", " +
                          std::to_string(index / 64) + ")");
      }
    }
  }
  return bad;
}

// The sm_80 kernels' instructions (the emulation's warp_emulation.h), which the Hopper ones
// build on too: mma.m16n8k16's fragments against CuTe's MMA_Traits (A: m + 16 k, B: n + 8 k,
// C: m + 16 n), and ldmatrix.x4 (plain and .trans) against CuTe's Copy_Traits, whose source and
// destination layouts index the same bits: source lane i gives the 128 bits of row i % 8 of
// matrix i / 8.
template <typename Mma>
int check_mma_fragments(const std::string& name) {
  int bad = 0;
  using Traits = MMA_Traits<Mma>;
  const auto a = typename Traits::ALayout{};
  const auto b = typename Traits::BLayout{};
  const auto c = typename Traits::CLayout{};
  auto compare = [&](const char* what, int lane, int v, emu::MatrixPosition ours, int row,
                     int column) {
    if (ours.row != row || ours.column != column) {
      mismatch(bad, name + " " + what + ": lane " + std::to_string(lane) + " value " +
                        std::to_string(v) + " is (" + std::to_string(ours.row) + ", " +
                        std::to_string(ours.column) + "), CuTe (" + std::to_string(row) + ", " +
                        std::to_string(column) + ")");
    }
  };
  for (int lane = 0; lane < 32; ++lane) {
    for (int v = 0; v < 8; ++v) {
      const int i = a(lane, v);
      compare("A", lane, v, emu::mma_a_position(lane, v / 2, v % 2), i % 16, i / 16);
    }
    for (int v = 0; v < 4; ++v) {
      const int i = b(lane, v);  // n + 8 k; ours is (k, n)
      compare("B", lane, v, emu::mma_b_position(lane, v / 2, v % 2), i / 8, i % 8);
      const int j = c(lane, v);
      compare("C", lane, v, emu::mma_c_position(lane, v), j % 16, j / 16);
    }
  }
  return bad;
}

template <typename Copy>
int check_ldmatrix(bool trans, const std::string& name) {
  int bad = 0;
  const auto source = typename Copy_Traits<Copy>::SrcLayout{};       // (lane, bit) -> bit
  const auto destination = typename Copy_Traits<Copy>::DstLayout{};  // (lane, bit) -> bit
  if (source(1, 0) != 128 || source(0, 1) != 1) {
    mismatch(bad, name + ": CuTe's source layout is not one 128-bit row per lane");
    return bad;
  }
  for (int lane = 0; lane < 32; ++lane) {
    for (int reg = 0; reg < 4; ++reg) {
      for (int half = 0; half < 2; ++half) {
        const emu::LdmatrixSource ours = emu::ldmatrix_source(lane, reg, half, trans);
        for (int bit = 0; bit < 16; ++bit) {
          const int index = destination(lane, 32 * reg + 16 * half + bit);
          if (index / 128 != ours.lane || index % 128 != 16 * ours.element + bit) {
            mismatch(bad, name + ": lane " + std::to_string(lane) + " r[" +
                              std::to_string(reg) + "] half " + std::to_string(half) +
                              " from lane " + std::to_string(ours.lane) + " element " +
                              std::to_string(ours.element) + ", CuTe lane " +
                              std::to_string(index / 128) + " bit " +
                              std::to_string(index % 128));
          }
        }
      }
    }
  }
  return bad;
}

template <typename T>
int check_operands() {
  return check_k_major<T, 64, 1, 64>() + check_k_major<T, 64, 2, 64>() +
         check_k_major<T, 128, 1, 64>() + check_k_major<T, 128, 2, 64>() +
         check_k_major<T, 128, 1, 128>() + check_k_major<T, 128, 2, 128>() +
         check_mn_major<T, 64, 64>() +
         check_mn_major<T, 64, 128>() + check_mn_major<T, 128, 64>() +
         check_mn_major<T, 128, 128>();
}

}  // namespace

extern "C" {

const char* cute_first_mismatch() { return message().c_str(); }

// Each returns the number of mismatches (0: CuTe and we agree); the first is described by
// cute_first_mismatch().
int cute_check_operands(int bf16) {
  message().clear();
  return bf16 ? check_operands<bfloat16_t>() : check_operands<half_t>();
}

int cute_check_accumulators(int n) {
  message().clear();
  if (n == 64) return check_accumulators<64>(gmma::CLayout_64x64{});
  if (n == 128) return check_accumulators<128>(gmma::CLayout_64x128{});
  message() = "n must be 64 or 128";
  return 1;
}

int cute_check_a_fragment() {
  message().clear();
  return check_a_fragment();
}

int cute_check_sm80_instructions() {
  message().clear();
  return check_mma_fragments<SM80_16x8x16_F32F16F16F32_TN>("mma.m16n8k16 f16") +
         check_mma_fragments<SM80_16x8x16_F32BF16BF16F32_TN>("mma.m16n8k16 bf16") +
         check_ldmatrix<SM75_U32x4_LDSM_N>(false, "ldmatrix.x4") +
         check_ldmatrix<SM75_U16x8_LDSM_T>(true, "ldmatrix.x4.trans");
}

// The instruction forms: CuTe's Major::MN is the wgmma imm-trans value 1 the kernels pass for
// an MN-major operand (the emulation reads trans 1 as MN-major), and its 128B-swizzle
// descriptor layout type is the 1 make_smem_descriptor writes.
int cute_check_instruction_forms() {
  message().clear();
  int bad = 0;
  if (static_cast<int>(gmma::Major::MN) != 1 || static_cast<int>(gmma::Major::K) != 0) {
    mismatch(bad, "CuTe's GMMA::Major values are not the imm-trans values 0 (K) and 1 (MN)");
  }
  if (static_cast<int>(gmma::LayoutType::B128) != 1) {
    mismatch(bad, "CuTe's 128B-swizzle descriptor layout type is not 1");
  }
  return bad;
}

}  // extern "C"
