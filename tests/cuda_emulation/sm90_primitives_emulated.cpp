// Small kernels over the emulated Hopper primitives of csrc/cuda/attention_sm90.cuh (TMA,
// mbarriers, wgmma), behind a C ABI for test_sm90_primitives_emulated.py: they check the
// emulation (sm90_emulation.h) against torch, independently of any attention kernel.
// Build: g++ -std=c++20 -O1 -shared -fPIC -I<repo>/csrc -I<cuda>/include (conftest.py).
#include "warp_emulation.h"

#include "cuda/attention_sm90.cuh"

namespace {

using fusedlm::cuda::DType;
using namespace fusedlm::cuda::attention::sm90;  // NOLINT

constexpr uint32_t kSlab = 64;  // columns of one 128-byte-swizzled slab

template <typename Kernel, typename... Args>
int launch(Kernel kernel, int threads, size_t shared_bytes, Args... args) {
  emu::fault().clear();
  FUSEDLM_LAUNCH(kernel, 1, threads, shared_bytes, nullptr)(args...);
  return emu::fault().empty() ? 0 : 1;
}

// 0 float16, 1 bfloat16, else float32 (which encode_tile_map must refuse).
DType dtype_of(int code) {
  return code == 0 ? DType::kFloat16 : code == 1 ? DType::kBFloat16 : DType::kFloat32;
}

// Writes a warpgroup's 64 x N float accumulators to out (row-major, N columns) by the documented
// fragment layout: warp w rows 16w.., lane 4g+t (row g / g+8, columns 8j+2t, +1).
template <int N>
void store_accumulators(const float (&d)[N / 2], float* out) {
  const int tid = threadIdx.x % 128;
  const int w = tid / 32;
  const int g = tid % 32 / 4;
  const int t = tid % 4;
  for (int j = 0; j < N / 8; ++j) {
    for (int q = 0; q < 4; ++q) {
      out[(16 * w + g + (q >= 2 ? 8 : 0)) * N + 8 * j + 2 * t + (q & 1)] = d[4 * j + q];
    }
  }
}

// (a) One TMA box into shared memory at tile_offset; its raw (swizzled) bytes copied out.
void tma_box_kernel(const __grid_constant__ CUtensorMap map, int c0, int c1, int c2, int c3,
                    uint32_t box_bytes, uint32_t tile_offset, unsigned char* out) {
  unsigned char* smem = fusedlm::cuda::dynamic_shared_memory();
  auto* bar = reinterpret_cast<uint64_t*>(smem);
  const unsigned tid = threadIdx.x;
  if (tid == 0) {
    mbarrier_init(bar, 1);
    fence_barrier_init();
  }
  __syncthreads();
  if (tid == 0) {
    mbarrier_arrive_expect_tx(bar, box_bytes);
    tma_load_4d(smem + tile_offset, &map, c0, c1, c2, c3, bar);
  }
  mbarrier_wait(bar, 0);
  for (unsigned i = tid; i < box_bytes; i += blockDim.x) out[i] = smem[tile_offset + i];
}

// (b) D (64 x N) = A (64 x K) B (K x N), K = k_cols (64 or 128), both TMA-loaded into
// 128-byte-swizzled 64-column slabs, each operand K-major or MN-major:
//   A K-major (kTransA 0): 64 rows of K (S = Q K^T's Q), K / 64 slabs of 64 rows;
//   A MN-major (1): K rows of the 64 M elements (dS stored (keys, queries)), one slab of K rows;
//   B K-major (kTransB 0): N rows of K (K of Q K^T), K / 64 slabs of N rows;
//   B MN-major (1): K rows of N elements (K of dQ = dS K), N / 64 slabs of K rows, LBO apart.
template <typename T, int N, int kTransA, int kTransB>
void ss_kernel(const __grid_constant__ CUtensorMap a_map, const __grid_constant__ CUtensorMap b_map,
               int k_cols, const int* a_coords, const int* b_coords, float* out) {
  unsigned char* smem = fusedlm::cuda::dynamic_shared_memory();
  auto* bar = reinterpret_cast<uint64_t*>(smem);
  const uint32_t a_bytes = 64 * k_cols * 2;
  unsigned char* sa = smem + 1024;
  unsigned char* sb = sa + a_bytes;
  // Boxes: rows of each, and how many 64-column boxes side by side.
  const int a_rows = kTransA ? k_cols : 64;
  const int a_boxes = kTransA ? 1 : k_cols / kSlab;
  const int b_rows = kTransB ? k_cols : N;
  const int b_boxes = kTransB ? N / kSlab : k_cols / kSlab;
  const unsigned tid = threadIdx.x;
  if (tid == 0) {
    mbarrier_init(bar, 1);
    fence_barrier_init();
  }
  __syncthreads();
  if (tid == 0) {
    mbarrier_arrive_expect_tx(bar, (64 + N) * k_cols * 2);
    for (int s = 0; s < a_boxes; ++s) {
      tma_load_4d(sa + s * a_rows * 128, &a_map, s * kSlab, a_coords[0], a_coords[1],
                  a_coords[2], bar);
    }
    for (int s = 0; s < b_boxes; ++s) {
      tma_load_4d(sb + s * b_rows * 128, &b_map, s * kSlab, b_coords[0], b_coords[1],
                  b_coords[2], bar);
    }
  }
  mbarrier_wait(bar, 0);
  float d[N / 2];
  for (float& x : d) x = std::nanf("");  // accumulate == false must ignore it
  warpgroup_fence();
  for (int step = 0; step < k_cols / 16; ++step) {
    // K-major: slab step / 4, 32 bytes per 16 columns into it; MN-major: 16 rows of 128 bytes.
    const int s = step / 4;
    const int k = step % 4;
    const uint64_t da = kTransA ? make_smem_descriptor(sa + step * 16 * 128, 0, 1024)
                                : make_smem_descriptor(sa + s * 64 * 128 + 32 * k, 0, 1024);
    const uint64_t db = kTransB
                            ? make_smem_descriptor(sb + step * 16 * 128, k_cols * 128, 1024)
                            : make_smem_descriptor(sb + s * N * 128 + 32 * k, 0, 1024);
    wgmma_ss<T, N, kTransA, kTransB>(d, da, db, step > 0);
  }
  warpgroup_commit();
  warpgroup_wait<0>();
  store_accumulators<N>(d, out);
}

template <typename T, int N, int kTransA>
auto ss_kernel_for(int trans_b) {
  return trans_b ? &ss_kernel<T, N, kTransA, 1> : &ss_kernel<T, N, kTransA, 0>;
}

template <typename T, int N>
auto ss_kernel_for(int trans_a, int trans_b) {
  return trans_a ? ss_kernel_for<T, N, 1>(trans_b) : ss_kernel_for<T, N, 0>(trans_b);
}

// (c) O (64 x N) = P (64 x 64, registers) V (64 keys x N, TMA-loaded MN-major slabs), in two
// commit groups; `partial` is O after warpgroup_wait<1>.
template <typename T, int N>
void rs_kernel(const __grid_constant__ CUtensorMap v_map, const uint16_t* p, const int* v_coords,
               float* partial, float* out) {
  unsigned char* smem = fusedlm::cuda::dynamic_shared_memory();
  auto* bar = reinterpret_cast<uint64_t*>(smem);
  constexpr int kSlabs = N / kSlab;
  constexpr uint32_t kSlabBytes = 64 * 128;
  unsigned char* sv = smem + 1024;
  const unsigned tid = threadIdx.x;
  if (tid == 0) {
    mbarrier_init(bar, 1);
    fence_barrier_init();
  }
  __syncthreads();
  if (tid == 0) {
    mbarrier_arrive_expect_tx(bar, kSlabs * kSlabBytes);
    for (int s = 0; s < kSlabs; ++s) {
      tma_load_4d(sv + s * kSlabBytes, &v_map, s * kSlab, v_coords[0], v_coords[1], v_coords[2],
                  bar);
    }
  }
  mbarrier_wait(bar, 0);
  float d[N / 2] = {};
  const int w = tid / 32;
  const int g = tid % 32 / 4;
  const int t = tid % 4;
  auto element = [&](int row, int k) { return static_cast<uint32_t>(p[row * 64 + k]); };
  // Each step's A registers live until the wait that retires its wgmma (PTX ISA).
  uint32_t a[4][4];
  warpgroup_fence();
  for (int step = 0; step < 4; ++step) {
    const int r = 16 * w + g;
    const int k = 16 * step + 2 * t;
    a[step][0] = element(r, k) | element(r, k + 1) << 16;
    a[step][1] = element(r + 8, k) | element(r + 8, k + 1) << 16;
    a[step][2] = element(r, k + 8) | element(r, k + 9) << 16;
    a[step][3] = element(r + 8, k + 8) | element(r + 8, k + 9) << 16;
    wgmma_rs_transposed_b<T, N>(d, a[step], make_smem_descriptor(sv + step * 16 * 128,
                                                                 kSlabBytes, 1024));
    if (step == 1) warpgroup_commit();
  }
  warpgroup_commit();
  warpgroup_wait<1>();
  store_accumulators<N>(d, partial);
  warpgroup_wait<0>();
  store_accumulators<N>(d, out);
}

// (d) A 2-stage producer/consumer ring: warpgroup 0's thread 0 streams K tiles (128 x 64) by
// TMA; warpgroup 1 accumulates S = sum_j Q K_j^T with SS wgmma and releases each stage.
// release_early: the consumers release a stage before their wgmma retires (a bug).
template <typename T>
void pipeline_kernel(const __grid_constant__ CUtensorMap q_map,
                     const __grid_constant__ CUtensorMap k_map, const int* coords, int tiles,
                     int release_early, float* out) {
  unsigned char* smem = fusedlm::cuda::dynamic_shared_memory();
  auto* q_full = reinterpret_cast<uint64_t*>(smem);
  uint64_t* full = q_full + 1;
  uint64_t* empty = q_full + 3;
  unsigned char* sq = smem + 1024;
  unsigned char* sk = sq + 64 * 128;
  constexpr uint32_t kStageBytes = 128 * 128;
  const unsigned tid = threadIdx.x;
  if (tid == 0) {
    mbarrier_init(q_full, 1);
    for (int s = 0; s < 2; ++s) {
      mbarrier_init(full + s, 1);
      mbarrier_init(empty + s, 128);
    }
    fence_barrier_init();
  }
  __syncthreads();
  if (tid < 128) {
    registers_decrease<40>();
    if (tid != 0) return;
    mbarrier_arrive_expect_tx(q_full, 64 * 128);
    tma_load_4d(sq, &q_map, 0, coords[0], coords[1], coords[2], q_full);
    for (int j = 0; j < tiles; ++j) {
      const int s = j % 2;
      if (j >= 2) mbarrier_wait(empty + s, (j / 2 - 1) & 1);
      mbarrier_arrive_expect_tx(full + s, kStageBytes);
      tma_load_4d(sk + s * kStageBytes, &k_map, 0, j * 128, coords[1], coords[2], full + s);
    }
    return;
  }
  registers_increase<232>();
  mbarrier_wait(q_full, 0);
  float d[64] = {};
  for (int j = 0; j < tiles; ++j) {
    const int s = j % 2;
    mbarrier_wait(full + s, (j / 2) & 1);
    warpgroup_fence();
    for (int k = 0; k < 4; ++k) {
      wgmma_ss<T, 128, 0, 0>(d, make_smem_descriptor(sq + 32 * k, 0, 1024),
                             make_smem_descriptor(sk + s * kStageBytes + 32 * k, 0, 1024), true);
    }
    warpgroup_commit();
    if (release_early) mbarrier_arrive(empty + s);
    warpgroup_wait<0>();
    if (!release_early) mbarrier_arrive(empty + s);
  }
  store_accumulators<128>(d, out);
}

// (f) Two warpgroups taking turns through named barriers 1 and 2 (the forward's consumers):
// warpgroup w waits at barrier 1 + w (its 128 threads' bar.sync and the other warpgroup's 128
// bar.arrive), takes its turn, then arrives at the other's. state: [0, 1] the threads of
// warpgroup 0 / 1 past their turns, [2] ordering errors seen, [3] log length, [4..] the log of
// turns (warpgroup ids). mode 1: warpgroup 1 never lets warpgroup 0 start (deadlock); 2:
// warpgroup 1 arrives once more after its last turn (a dangling arrival at exit); 3: warpgroup
// 0 waits at barrier 1 with 128 threads while it counts to 256 (two thread counts).
void named_barrier_kernel(int rounds, int mode, int* state) {
  const unsigned tid = threadIdx.x;
  const int wg = static_cast<int>(tid / 128);
  if (wg == 1 && mode != 1) named_barrier_arrive(1, 256, true);  // warpgroup 0 starts
  for (int r = 0; r < rounds; ++r) {
    named_barrier_sync(1 + wg, wg == 0 && mode == 3 ? 128 : 256);
    // Warpgroup 0's turn r follows r whole turns of warpgroup 1; warpgroup 1's, r + 1 of 0's.
    if (state[1 - wg] != 128 * (wg == 0 ? r : r + 1)) ++state[2];
    if (tid % 128 == 0) state[4 + state[3]++] = wg;
    fence_view_async_shared();
    ++state[wg];
    const bool more = wg == 0 || r + 1 < rounds || mode == 2;
    named_barrier_arrive(1 + (1 - wg), 256, more);
  }
}

// (e) Misuses, each expected to fault (or, for 9, 12 and 15, correct uses: no fault).
void scenario_kernel(const __grid_constant__ CUtensorMap map, int which, int* flag) {
  unsigned char* smem = fusedlm::cuda::dynamic_shared_memory();
  auto* bar = reinterpret_cast<uint64_t*>(smem);
  auto* other = bar + 1;
  unsigned char* tile = smem + 1024;
  const unsigned tid = threadIdx.x;
  if (tid == 0) {
    mbarrier_init(bar, 1);
    if (which == 10) mbarrier_init(other, 2);
    fence_barrier_init();
  }
  __syncthreads();
  auto load = [&](unsigned char* dst, bool expect, uint64_t* barrier = nullptr) {
    if (barrier == nullptr) barrier = bar;
    if (tid != 0) return;
    if (expect) mbarrier_arrive_expect_tx(barrier, 128 * 128);
    tma_load_4d(dst, &map, 0, 0, 0, 0, barrier);
  };
  // One committed wgmma group reading the tile into d, not waited for.
  auto issue_on_tile = [&](float (&d)[64]) {
    warpgroup_fence();
    const uint64_t desc = make_smem_descriptor(tile, 0, 1024);
    wgmma_ss<__half, 128, 0, 0>(d, desc, desc, true);
    warpgroup_commit();
  };
  auto read_by_wgmma = [&] {
    float d[64] = {};
    issue_on_tile(d);
    warpgroup_wait<0>();
  };
  switch (which) {
    case 0:  // a TMA tile read before its barrier wait
      load(tile, true);
      read_by_wgmma();
      mbarrier_wait(bar, 0);
      break;
    case 1:  // waiting on a phase nobody completes
      mbarrier_wait(bar, 0);
      break;
    case 2:  // a TMA destination 512 bytes off the 1024-byte alignment
      load(tile + 512, true);
      mbarrier_wait(bar, 0);
      break;
    case 3:  // an mbarrier never initialized
      if (tid == 0) mbarrier_arrive(other);
      break;
    case 4:  // an arrival beyond the count (the phase still waits for its tx bytes)
      if (tid == 0) {
        mbarrier_arrive_expect_tx(bar, 128);
        mbarrier_arrive(bar);
      }
      break;
    case 5:  // TMA bytes nobody announced with expect_tx
      load(tile, false);
      mbarrier_wait(bar, 0);
      break;
    case 6: {  // exiting with a wgmma group never waited for
      load(tile, true);
      mbarrier_wait(bar, 0);
      float d[64] = {};
      issue_on_tile(d);
      break;
    }
    case 7: {  // a wgmma with no warpgroup_fence before it
      load(tile, true);
      mbarrier_wait(bar, 0);
      float d[64] = {};
      const uint64_t desc = make_smem_descriptor(tile, 0, 1024);
      wgmma_ss<__half, 128, 0, 0>(d, desc, desc, true);
      warpgroup_commit();
      warpgroup_wait<0>();
      break;
    }
    case 8:  // a TMA copy whose phase nobody waits for
      load(tile, true);
      break;
    case 9:  // a fresh barrier is in phase 0: waiting for parity 1 returns at once
      mbarrier_wait(bar, 1);
      if (tid == 0) *flag = 1;
      break;
    case 10:  // the wrong parity (phase 0 still needs an arrival) returns at once: no visibility
      load(tile, true, other);
      mbarrier_wait(other, 1);
      read_by_wgmma();
      break;
    case 11:  // half a warpgroup at a wgmma collective, the other half exited
      if (tid < 64) warpgroup_fence();
      break;
    case 12:  // the TMA tile read after its barrier wait: no fault
      load(tile, true);
      mbarrier_wait(bar, 0);
      read_by_wgmma();
      if (tid == 0) *flag = 1;
      break;
    case 13: {  // an RS wgmma's A registers changed before the wait that retires it
      load(tile, true);
      mbarrier_wait(bar, 0);
      float d[32] = {};
      uint32_t a[4] = {0x3c003c00u, 0x3c003c00u, 0x3c003c00u, 0x3c003c00u};
      warpgroup_fence();
      wgmma_rs_transposed_b<__half, 64>(d, a, make_smem_descriptor(tile, 0, 1024));
      warpgroup_commit();
      a[0] = 0;
      warpgroup_wait<0>();
      break;
    }
    case 16: {  // a thread writes the accumulators of a wgmma in flight
      load(tile, true);
      mbarrier_wait(bar, 0);
      float d[64] = {};
      issue_on_tile(d);
      d[0] += 1.f;
      warpgroup_wait<0>();
      break;
    }
    case 17: {  // threads store into a tile a wgmma in flight reads
      load(tile, true);
      mbarrier_wait(bar, 0);
      float d[64] = {};
      issue_on_tile(d);
      store_shared_for_async(tile + 4 * tid, 0x3c003c00u);
      warpgroup_wait<0>();
      break;
    }
    case 14:    // threads' stores read by a wgmma with no fence.proxy.async after them
    case 15:    // the same with the fence: no fault
    case 18:    // the fence, but no barrier between it and the other threads' wgmma
    case 19:    // a barrier, but before the fence
      store_shared_for_async(tile + 4 * tid, 0x3c003c00u);
      if (which == 15 || which == 18) fence_view_async_shared();
      if (which != 18) __syncthreads();
      if (which == 19) fence_view_async_shared();
      read_by_wgmma();
      if (tid == 0) *flag = 1;
      break;
    default:
      break;
  }
}

}  // namespace

extern "C" {

// late: TMA lands and wgmma computes at the wait (1) or at issue (0); schedule as emu::Schedule.
void sm90_configure(int late, int schedule) {
  emu::fault().clear();
  emu::late_copies() = late != 0;
  emu::schedule() = static_cast<emu::Schedule>(schedule);
}

const char* sm90_fault() { return emu::fault().c_str(); }

// The cudaError_t of the emulated encode_tile_map; map_misalign bytes off the map's alignment.
int sm90_encode(int dtype, const void* base, const uint64_t* dims, const uint64_t* strides,
                uint32_t box_rows, int map_misalign) {
  alignas(128) unsigned char storage[2 * sizeof(CUtensorMap)];
  auto* map = reinterpret_cast<CUtensorMap*>(storage + map_misalign);
  const uint64_t d[4] = {dims[0], dims[1], dims[2], dims[3]};
  const uint64_t s[3] = {strides[0], strides[1], strides[2]};
  return static_cast<int>(encode_tile_map(map, dtype_of(dtype), base, d, s, box_rows));
}

// Returns -1 when encode_tile_map fails, else 1 on a fault, 0 on success.
int sm90_tma_box(int dtype, const void* base, const uint64_t* dims, const uint64_t* strides,
                 uint32_t box_rows, const int* coords, uint32_t tile_offset, void* out) {
  CUtensorMap map;
  const uint64_t d[4] = {dims[0], dims[1], dims[2], dims[3]};
  const uint64_t s[3] = {strides[0], strides[1], strides[2]};
  if (encode_tile_map(&map, dtype_of(dtype), base, d, s, box_rows) != cudaSuccess) return -1;
  const uint32_t bytes = box_rows * 128;
  return launch(&tma_box_kernel, 64, tile_offset + bytes, map, coords[0], coords[1], coords[2],
                coords[3], bytes, tile_offset, static_cast<unsigned char*>(out));
}

// a, b: (B, H, T, D) tensors described by dims/strides (D, T, H, B order); coords (t, h, b) of
// the operand's tile (ss_kernel's layouts); n = 64 or 128, k_cols = 64 or 128.
int sm90_ss(int dtype, int n, int trans_a, int trans_b, int k_cols, const void* a,
            const uint64_t* a_dims, const uint64_t* a_strides, const void* b,
            const uint64_t* b_dims, const uint64_t* b_strides, const int* a_coords,
            const int* b_coords, float* out) {
  CUtensorMap a_map;
  CUtensorMap b_map;
  const uint64_t ad[4] = {a_dims[0], a_dims[1], a_dims[2], a_dims[3]};
  const uint64_t as[3] = {a_strides[0], a_strides[1], a_strides[2]};
  const uint64_t bd[4] = {b_dims[0], b_dims[1], b_dims[2], b_dims[3]};
  const uint64_t bs[3] = {b_strides[0], b_strides[1], b_strides[2]};
  const uint32_t a_rows = trans_a ? k_cols : 64;
  const uint32_t b_rows = trans_b ? k_cols : n;
  if (encode_tile_map(&a_map, dtype_of(dtype), a, ad, as, a_rows) != cudaSuccess) return -1;
  if (encode_tile_map(&b_map, dtype_of(dtype), b, bd, bs, b_rows) != cudaSuccess) return -1;
  const size_t shared = 1024 + (64 + n) * k_cols * 2;
  auto kernel = dtype == 0 ? (n == 64 ? ss_kernel_for<__half, 64>(trans_a, trans_b)
                                      : ss_kernel_for<__half, 128>(trans_a, trans_b))
                           : (n == 64 ? ss_kernel_for<__nv_bfloat16, 64>(trans_a, trans_b)
                                      : ss_kernel_for<__nv_bfloat16, 128>(trans_a, trans_b));
  return launch(kernel, 128, shared, a_map, b_map, k_cols, a_coords, b_coords, out);
}

// p: (64, 64) 16-bit row-major; v as q above; n = 64 or 128 columns of O.
int sm90_rs(int dtype, int n, const uint16_t* p, const void* v, const uint64_t* v_dims,
            const uint64_t* v_strides, const int* v_coords, float* partial, float* out) {
  CUtensorMap v_map;
  const uint64_t vd[4] = {v_dims[0], v_dims[1], v_dims[2], v_dims[3]};
  const uint64_t vs[3] = {v_strides[0], v_strides[1], v_strides[2]};
  if (encode_tile_map(&v_map, dtype_of(dtype), v, vd, vs, 64) != cudaSuccess) return -1;
  const size_t shared = 1024 + n / kSlab * 64 * 128;
  auto kernel = dtype == 0 ? (n == 64 ? &rs_kernel<__half, 64> : &rs_kernel<__half, 128>)
                           : (n == 64 ? &rs_kernel<__nv_bfloat16, 64>
                                      : &rs_kernel<__nv_bfloat16, 128>);
  return launch(kernel, 128, shared, v_map, p, v_coords, partial, out);
}

// q: (B, H, Tq, 64), k: (B, H, Tk, 64); coords (q_t, h, b); K tiles 0 .. tiles-1 of 128 rows.
int sm90_pipeline(int dtype, const void* q, const uint64_t* q_dims, const uint64_t* q_strides,
                  const void* k, const uint64_t* k_dims, const uint64_t* k_strides,
                  const int* coords, int tiles, int release_early, float* out) {
  CUtensorMap q_map;
  CUtensorMap k_map;
  const uint64_t qd[4] = {q_dims[0], q_dims[1], q_dims[2], q_dims[3]};
  const uint64_t qs[3] = {q_strides[0], q_strides[1], q_strides[2]};
  const uint64_t kd[4] = {k_dims[0], k_dims[1], k_dims[2], k_dims[3]};
  const uint64_t ks[3] = {k_strides[0], k_strides[1], k_strides[2]};
  if (encode_tile_map(&q_map, dtype_of(dtype), q, qd, qs, 64) != cudaSuccess) return -1;
  if (encode_tile_map(&k_map, dtype_of(dtype), k, kd, ks, 128) != cudaSuccess) return -1;
  auto kernel = dtype == 0 ? &pipeline_kernel<__half> : &pipeline_kernel<__nv_bfloat16>;
  return launch(kernel, 256, 1024 + 64 * 128 + 2 * 128 * 128, q_map, k_map, coords, tiles,
                release_early, out);
}

// Runs scenario `which` of scenario_kernel over a 128 x 64 float16 tensor; *flag as it sets.
int sm90_scenario(int which, const void* tensor, int* flag) {
  CUtensorMap map;
  const uint64_t dims[4] = {64, 128, 1, 1};
  const uint64_t strides[3] = {128, 128 * 128, 128 * 128};
  if (encode_tile_map(&map, DType::kFloat16, tensor, dims, strides, 128) != cudaSuccess) {
    return -1;
  }
  return launch(&scenario_kernel, 128, 1024 + 128 * 128 + 1024, map, which, flag);
}

// Runs named_barrier_kernel (256 threads); state as it describes, zeroed by the caller.
int sm90_named_barriers(int rounds, int mode, int* state) {
  return launch(&named_barrier_kernel, 256, 1024, rounds, mode, state);
}

// fence_view_async_shared calls by warpgroup `wg`'s threads in the last launch's block.
long long sm90_async_fences(int wg) {
  return static_cast<long long>(emu::sm90().warpgroups[wg].async_fences);
}

}  // extern "C"
