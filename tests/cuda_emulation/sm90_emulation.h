// The Hopper (sm_90a) primitives of csrc/cuda/attention_sm90.cuh for the CPU emulation of
// warp_emulation.h (which includes this at its end): mbarriers, TMA tile loads with the 128-byte
// swizzle, and wgmma (SS with K- or MN-major operands, RS) over warpgroups of 128 threads,
// fence.proxy.async and named barriers. Implemented from the PTX
// ISA (mbarrier phases and tx-counts, cp.async.bulk.tensor, the wgmma matrix descriptors and
// canonical 128B-swizzle layouts), not from how the kernels use them.
//
// Timing follows emu::late_copies(): early, a TMA copy lands at issue and a wgmma computes at
// issue; late, a TMA copy lands when a thread waits on its mbarrier (the latest point the
// protocol allows) and a wgmma computes at the warpgroup_wait that retires it. Racecheck
// (faults): a wgmma (or ldmatrix) reading bytes of a TMA copy whose mbarrier phase no thread of
// its warpgroup has waited for (a __syncthreads shares what each warpgroup saw), and a TMA copy
// issued or landing onto bytes an issued, not yet retired wgmma reads.
//
// Registers: a thread that writes a wgmma's accumulators, or an RS wgmma's A registers, before
// the warpgroup_wait that retires it faults (the hardware reads and writes them while it runs).
//
// Proxy fences: a value threads store into shared memory for the async proxy to read (dS^T for
// the wgmma of dQ = dS K) goes through store_shared_for_async, which marks its 16-byte chunk
// until the storing thread's next fence_view_async_shared (fence.proxy.async.shared::cta); a
// wgmma reading a marked chunk faults (on a GPU it could read stale bytes). So does a wgmma
// unless every thread of its warpgroup passed a __syncthreads or named barrier that each
// storing thread arrived at after its fence (vector clocks, warp_emulation.h), and a store into
// bytes an in-flight wgmma reads (a store into bytes a wgmma has yet to read shows as the
// missing barrier). NOT checked: plain C++ stores that bypass store_shared_for_async
// (invisible here), and orderings through mbarriers.
#pragma once

#include <cuda.h>  // CUtensorMap

#include <deque>
#include <map>

#include "cuda/launchers.h"  // DType

namespace emu {

struct MBarrier {
  uint32_t expected = 0;           // arrivals per phase (mbarrier.init's count)
  uint32_t pending = 0;            // arrivals the current phase still needs
  int64_t tx = 0;                  // transaction bytes the current phase still needs
  uint64_t completed = 0;          // phases completed; the current phase's parity = completed & 1
  int late_copies = 0;             // TMA copies to it not landed yet
  std::vector<uint64_t> observed;  // per warpgroup: phases its waits have seen complete
};

// What encode_tile_map stores in a CUtensorMap's 128 opaque bytes.
struct TileMap {
  uint64_t magic;
  uint64_t base;
  uint64_t dims[4];     // innermost first
  uint64_t strides[3];  // bytes, of dims 1..3
  uint64_t box_rows;    // the box is 64 elements x box_rows x 1 x 1
};
static_assert(sizeof(TileMap) <= sizeof(CUtensorMap));
constexpr uint64_t kTileMapMagic = 0x5a4d54'90'b0c5ULL;

struct TmaCopy {
  uint32_t dst;  // shared offset, 1024-aligned
  uint32_t bytes;
  uint32_t barrier;
  TileMap map;
  int coords[4];
  bool landed = false;
  uint64_t visible_after = 0;  // completed phases of `barrier` that make it visible (once landed)
};

struct WgmmaOp {
  int n;                    // N of m64nNk16
  bool rs;                  // A from registers (then `a` holds it), else from `desc_a`
  bool trans_a;             // imm-trans-a: A MN-major (else K-major); SS only
  bool trans_b;             // imm-trans-b: B MN-major (else K-major)
  bool accumulate;          // false: d = A.B
  bool bf16;
  uint64_t desc_a;
  uint64_t desc_b;
  float a[64][16];          // RS: A captured at issue
  const uint32_t* a_registers[128];  // RS: each thread's A registers, which must not change
  uint32_t a_words[128][4];          // until the wait that retires it, and their values at issue
  float* d[128];            // each thread's accumulators
  std::vector<uint32_t> chunks;  // 16-byte chunks of shared memory it reads
};

// The accumulators of a warpgroup's in-flight wgmmas as the wgmmas left them: the threads must
// not write them before the wait that retires the last wgmma on them (PTX ISA). One per
// accumulator array (in-flight wgmmas may share one only with the same shape).
struct AccumulatorWatch {
  const float* d0;            // thread 0's array: names it
  int n;                      // floats per thread
  int in_flight;              // wgmmas on it not yet retired
  std::vector<float> values;  // 128 x n, as the last wgmma issue or compute left them
};

struct Warpgroup {
  std::vector<WgmmaOp> open;                    // issued since the last commit
  std::deque<std::vector<WgmmaOp>> committed;  // committed, not yet retired
  bool fenced = false;                          // a warpgroup_fence since the last wait
  uint64_t async_fences = 0;  // fence_view_async_shared calls by its threads
  std::vector<AccumulatorWatch> watches;
};

// What each thread brings to a warpgroup collective.
struct WgSlot {
  const char* what;
  uint64_t desc_a;
  uint64_t desc_b;
  bool accumulate;
  uint32_t a[4];
  const uint32_t* a_registers;
  float* d;
};

// The last store_shared_for_async into a 4-byte word of shared memory: its thread, and that
// thread's clock at its fence.proxy.async after the store (0 until then).
struct StoreRecord {
  int thread = -1;
  uint32_t fenced_at = 0;
};

struct Sm90 {
  std::map<uint32_t, MBarrier> barriers;  // by shared offset; reset per block
  std::vector<TmaCopy> copies;            // this block's TMA copies
  std::vector<Warpgroup> warpgroups;
  std::vector<WgSlot> slots;
  std::vector<StoreRecord> stores;        // per 4-byte word of shared memory
  bool stores_used = false;               // this block made a StoreRecord
};

inline Sm90& sm90() {
  static Sm90 state;
  return state;
}

inline uint64_t max_observed(const MBarrier& m) {
  return m.observed.empty() ? 0 : *std::max_element(m.observed.begin(), m.observed.end());
}

inline void sm90_block_start(Block& block) {
  Sm90& s = sm90();
  s.barriers.clear();
  s.copies.clear();
  s.warpgroups.assign(block.warpgroup_barriers.size(), Warpgroup{});
  s.slots.assign(block.threads.size(), WgSlot{});
  if (s.stores.empty() || s.stores_used) s.stores.assign(kSharedBytes / 4, StoreRecord{});
  s.stores_used = false;
}

// A __syncthreads orders every warpgroup after what any warpgroup's waits observed.
inline void sm90_syncthreads() {
  for (auto& [offset, m] : sm90().barriers) {
    std::fill(m.observed.begin(), m.observed.end(), max_observed(m));
  }
}

inline void sm90_thread_exit() {
  const Warpgroup& g = sm90().warpgroups[self().warp / 4];
  if (!g.open.empty() || !g.committed.empty()) {
    fail("a thread exited with wgmma operations its warpgroup never waited for");
  }
}

// bar.sync / bar.arrive on named barrier `id` (1..15; 0 is __syncthreads') completing at
// `threads` arrivals. A barrier's count may not change while arrivals are pending.
inline Barrier& named_barrier(int id, int threads) {
  Block* block = current_block();
  if (id < 1 || id > 15) fail("named barrier id outside 1..15");
  if (threads <= 0 || threads % 32 != 0 || threads > static_cast<int>(block->threads.size())) {
    fail("named barrier thread count not a positive multiple of 32 within the block");
  }
  Barrier& x = block->named_barriers[id];
  if (x.arrived != 0 && x.live != threads) fail("named barrier used with two thread counts");
  x.live = threads;
  return x;
}

inline void sm90_block_end() {
  for (size_t id = 0; id < current_block()->named_barriers.size(); ++id) {
    if (current_block()->named_barriers[id].arrived != 0) {
      fail(("a block exited with arrivals at named barrier " + std::to_string(id) +
            " that never completed").c_str());
      return;
    }
  }
  for (const TmaCopy& c : sm90().copies) {
    if (!c.landed || max_observed(sm90().barriers[c.barrier]) < c.visible_after) {
      fail("a block exited with a TMA copy whose mbarrier phase no thread waited for");
      return;
    }
  }
}

inline uint32_t shared_offset(const void* p, const char* what) {
  const auto* c = static_cast<const unsigned char*>(p);
  if (c < shared_memory || c >= shared_memory + kSharedBytes) fail(what);
  return static_cast<uint32_t>(c - shared_memory);
}

// The 128-byte swizzle on shared-window addresses: 16-byte chunk c of a 128-byte row r sits at
// chunk c ^ (r % 8), r counted from address 0 (so tiles need 1024-byte alignment).
inline uint32_t swizzle128(uint32_t address) { return address ^ (((address >> 7) & 7) << 4); }

// Where a TMA box load with CU_TENSOR_MAP_SWIZZLE_128B puts element (row, col) of its 64-wide
// 16-bit box, for a box landing at shared offset `dst` (1024-aligned).
inline uint32_t tma_box_address(uint32_t dst, uint64_t row, int col) {
  return swizzle128(dst + static_cast<uint32_t>(row * 128 + col * 2));
}

inline uint32_t mbarrier_offset(const uint64_t* barrier) {
  check_shared(barrier, 8, 8, "mbarrier outside the dynamic shared memory or misaligned");
  return shared_offset(barrier, "mbarrier outside shared memory");
}

inline MBarrier& mbarrier_at(uint32_t offset) {
  auto it = sm90().barriers.find(offset);
  if (it == sm90().barriers.end()) fail("mbarrier used before mbarrier_init");
  return it->second;
}

inline void mbarrier_complete_if_done(MBarrier& m) {
  if (m.pending == 0 && m.tx == 0) {
    ++m.completed;
    m.pending = m.expected;
  }
}

inline void mbarrier_arrive_on(MBarrier& m) {
  if (m.pending == 0) fail("mbarrier: more arrivals than expected in a phase");
  --m.pending;
  mbarrier_complete_if_done(m);
}

inline void mbarrier_complete_tx(MBarrier& m, uint32_t bytes) {
  m.tx -= bytes;
  if (m.tx < 0) fail("mbarrier: tx count went negative (more TMA bytes than expect_tx announced)");
  mbarrier_complete_if_done(m);
}

inline bool mbarrier_ready(uint32_t offset, unsigned parity) {
  auto it = sm90().barriers.find(offset);
  if (it == sm90().barriers.end()) return true;  // it runs, and faults
  return (it->second.completed & 1) != parity || it->second.late_copies > 0;
}

inline std::string describe_mbarrier(uint32_t offset, unsigned parity) {
  char text[200];
  const MBarrier& m = sm90().barriers[offset];
  std::snprintf(text, sizeof text,
                "on the mbarrier at shared offset %u for parity %u (phase %llu: %u arrival(s), "
                "%lld tx bytes missing)",
                offset, parity, static_cast<unsigned long long>(m.completed), m.pending,
                static_cast<long long>(m.tx));
  return text;
}

inline void tma_perform(const TmaCopy& c) {
  const TileMap& t = c.map;
  const auto* base = reinterpret_cast<const unsigned char*>(t.base);
  for (uint64_t r = 0; r < t.box_rows; ++r) {
    for (int col = 0; col < 64; ++col) {
      const int64_t x[4] = {int64_t{c.coords[0]} + col, c.coords[1] + static_cast<int64_t>(r),
                            c.coords[2], c.coords[3]};
      bool inside = true;
      for (int i = 0; i < 4; ++i) inside = inside && x[i] >= 0 && x[i] < int64_t(t.dims[i]);
      uint16_t value = 0;  // out of bounds: zeros
      if (inside) {
        std::memcpy(&value, base + 2 * x[0] + x[1] * t.strides[0] + x[2] * t.strides[1] +
                                x[3] * t.strides[2], 2);
      }
      const uint32_t address = tma_box_address(c.dst, r, col);
      std::memcpy(shared_memory + address, &value, 2);
    }
  }
}

inline void tma_check_overwrite(const TmaCopy& c) {
  for (uint32_t i = c.dst / 16; i < (c.dst + c.bytes) / 16; ++i) {
    if (chunks()[i].wgmma_readers != 0) {
      fail("racecheck: TMA overwrites shared memory an in-flight wgmma reads");
    }
  }
}

inline void tma_land(int index) {
  TmaCopy& c = sm90().copies[index];
  tma_check_overwrite(c);
  tma_perform(c);
  if (sm90().stores_used) {  // its bytes are no thread's stores any more
    std::fill(sm90().stores.begin() + c.dst / 4, sm90().stores.begin() + (c.dst + c.bytes) / 4,
              StoreRecord{});
  }
  MBarrier& m = mbarrier_at(c.barrier);
  c.landed = true;
  c.visible_after = m.completed + 1;  // its bytes count toward the phase in progress
  mbarrier_complete_tx(m, c.bytes);
}

// Whether the warpgroup reading chunk `chunk` has waited for the phase of its last TMA copy.
inline void check_tma_visible(size_t chunk, const char* what) {
  const TmaCopy& c = sm90().copies[chunks()[chunk].tma];
  const MBarrier& m = sm90().barriers[c.barrier];
  if (!c.landed || m.observed[self().warp / 4] < c.visible_after) {
    std::string message = std::string("racecheck: ") + what +
                          " reads shared memory whose TMA copy has not completed (no wait on its "
                          "mbarrier phase)";
    fail(message.c_str());
  }
}

// ---- wgmma --------------------------------------------------------------------------------------

struct Descriptor {
  uint32_t start;
  uint32_t lbo;
  uint32_t sbo;
};

inline Descriptor decode_descriptor(uint64_t desc) {
  if (((desc >> 49) & 7) != 0) fail("wgmma descriptor: nonzero base offset (not emulated)");
  if ((desc >> 62) != 1) fail("wgmma descriptor: layout type is not 128B swizzle (not emulated)");
  return Descriptor{static_cast<uint32_t>(desc & 0x3fff) << 4,
                    static_cast<uint32_t>((desc >> 16) & 0x3fff) << 4,
                    static_cast<uint32_t>((desc >> 32) & 0x3fff) << 4};
}

// Shared-window address of element (row i, k) of a K-major 128B-swizzled operand
// ((8,m),(T,2k)):((8T,SBO),(1,T)) and of element (k, n) of an MN-major one
// ((T,8,m),(8,k)):((1,T,LBO),(8T,SBO)), T = 8 16-bit elements.
inline uint32_t k_major_address(const Descriptor& d, int i, int k) {
  return swizzle128(d.start + (i % 8) * 128 + (i / 8) * d.sbo + k * 2);
}
inline uint32_t mn_major_address(const Descriptor& d, int k, int n) {
  return swizzle128(d.start + (n % 64) * 2 + (n / 64) * d.lbo + (k % 8) * 128 + (k / 8) * d.sbo);
}

// The (row, column) of the 64 x N float32 accumulator d[index] of warpgroup thread `thread`
// (0..127) of wgmma m64nNk16: warp w owns rows 16 w .. 16 w + 15, and d[4 j + q] is
// mma.m16n8's C element q of the warp's j-th 8-column block.
inline MatrixPosition accumulator_position(int thread, int index) {
  const MatrixPosition p = mma_c_position(thread % 32, index % 4);
  return {16 * (thread / 32) + p.row, 8 * (index / 4) + p.column};
}

// The (row m, column k) of the 64 x 16 A operand held in half `half` (0: low 16 bits) of
// register a[reg] of warpgroup thread `thread` for an RS wgmma: mma.m16n8k16's A layout for
// warp w's rows 16 w .. 16 w + 15.
inline MatrixPosition a_fragment_position(int thread, int reg, int half) {
  const MatrixPosition p = mma_a_position(thread % 32, reg, half);
  return {16 * (thread / 32) + p.row, p.column};
}

inline float bits_to_float(uint16_t bits, bool bf16) {
  uint32_t word;
  if (bf16) {
    word = uint32_t{bits} << 16;
    float f;
    std::memcpy(&f, &word, 4);
    return f;
  }
  __half_raw raw;
  raw.x = bits;
  return __half2float(__half(raw));
}

inline float shared_element(uint32_t address, bool bf16) {
  if (address % 2 != 0 || address + 2 > current_block()->shared_bytes) {
    fail("wgmma operand outside the dynamic shared memory");
  }
  uint16_t bits;
  std::memcpy(&bits, shared_memory + address, 2);
  return bits_to_float(bits, bf16);
}

// The shared addresses of A (row m < 64, k) and B (k, column n) of `op`, by its transposes.
// An MN-major A is one 64-element slab wide (M = 64), so its LBO is never used.
inline uint32_t a_address(const WgmmaOp& op, const Descriptor& a, int m, int k) {
  return op.trans_a ? mn_major_address(a, k, m) : k_major_address(a, m, k);
}
inline uint32_t b_address(const WgmmaOp& op, const Descriptor& b, int k, int n) {
  return op.trans_b ? mn_major_address(b, k, n) : k_major_address(b, n, k);
}

// Calls f(address) for every shared address the operands of `op` read.
template <typename F>
inline void for_each_operand_address(const WgmmaOp& op, F&& f) {
  if (!op.rs) {
    const Descriptor a = decode_descriptor(op.desc_a);
    for (int i = 0; i < 64; ++i) {
      for (int k = 0; k < 16; ++k) f(a_address(op, a, i, k));
    }
  }
  const Descriptor b = decode_descriptor(op.desc_b);
  for (int n = 0; n < op.n; ++n) {
    for (int k = 0; k < 16; ++k) f(b_address(op, b, k, n));
  }
}

// d (64 x N) (+)= A (64 x 16) . B (16 x N), reading shared memory now.
inline void wgmma_compute(const WgmmaOp& op) {
  float A[64][16];
  std::vector<float> B(16 * op.n);
  if (op.rs) {
    std::memcpy(A, op.a, sizeof A);
  } else {
    const Descriptor a = decode_descriptor(op.desc_a);
    for (int i = 0; i < 64; ++i) {
      for (int k = 0; k < 16; ++k) A[i][k] = shared_element(a_address(op, a, i, k), op.bf16);
    }
  }
  const Descriptor b = decode_descriptor(op.desc_b);
  for (int n = 0; n < op.n; ++n) {
    for (int k = 0; k < 16; ++k) {
      B[k * op.n + n] = shared_element(b_address(op, b, k, n), op.bf16);
    }
  }
  for (int thread = 0; thread < 128; ++thread) {
    float* d = op.d[thread];
    for (int index = 0; index < op.n / 2; ++index) {
      const MatrixPosition p = accumulator_position(thread, index);
      float acc = op.accumulate ? d[index] : 0.0f;
      for (int k = 0; k < 16; ++k) acc += A[p.row][k] * B[k * op.n + p.column];
      d[index] = acc;
    }
  }
}

// A warpgroup collective: every thread brings its slot, then the warpgroup's first thread runs
// `work` (after checking all 128 execute the same instruction) while the others wait.
template <typename Work>
inline void warpgroup_collective(const char* what, Work&& work) {
  Sm90& s = sm90();
  const int me = current_block()->current;
  const int first = me / 128 * 128;
  s.slots[me].what = what;
  sync_warpgroup();
  if (me == first) {
    for (int i = first; i < first + 128; ++i) {
      if (std::strcmp(s.slots[i].what, what) != 0) {
        fail("a warpgroup's threads execute different warpgroup instructions together");
      }
    }
    work(s.warpgroups[first / 128], &s.slots[first]);
  }
  sync_warpgroup();
}

inline AccumulatorWatch& accumulator_watch(Warpgroup& group, const WgmmaOp& op) {
  for (AccumulatorWatch& w : group.watches) {
    if (w.d0 == op.d[0]) return w;
  }
  const int n = op.n / 2;
  group.watches.push_back(AccumulatorWatch{op.d[0], n, 0, std::vector<float>(128 * n)});
  return group.watches.back();
}

inline void watch_record(AccumulatorWatch& w, const WgmmaOp& op) {
  for (int i = 0; i < 128; ++i) std::memcpy(&w.values[i * w.n], op.d[i], sizeof(float) * w.n);
}

// Faults if a thread wrote the accumulators of an in-flight wgmma since the last issue or
// compute on them (bitwise: NaNs compare too).
inline void watch_check(const AccumulatorWatch& w, const WgmmaOp& op) {
  if (w.in_flight == 0) return;
  for (int i = 0; i < 128; ++i) {
    if (std::memcmp(&w.values[i * w.n], op.d[i], sizeof(float) * w.n) != 0) {
      fail("a thread wrote the accumulators of a wgmma in flight (before the warpgroup_wait "
           "that retires it)");
    }
  }
}

// Faults unless every thread of the issuing warpgroup (the caller is its first) has passed a
// barrier that each thread whose store_shared_for_async words the wgmma reads arrived at after
// its fence.proxy.async: without that barrier the wgmma may read before the store (or its
// fence) happened. A word not yet fenced faults through unfenced_stores instead.
inline void check_stores_ordered(const std::vector<uint32_t>& read_chunks) {
  Block& b = *current_block();
  const int first = b.current / 128 * 128;
  std::vector<int64_t> least(b.threads.size(), -1);  // per storing thread: min of readers' view
  for (uint32_t chunk : read_chunks) {
    for (uint32_t word = chunk * 4; word < chunk * 4 + 4; ++word) {
      const StoreRecord& r = sm90().stores[word];
      if (r.thread < 0 || r.fenced_at == 0) continue;
      if (least[r.thread] < 0) {
        uint32_t seen = UINT32_MAX;
        for (int i = first; i < first + 128; ++i) {
          seen = std::min(seen, b.threads[i].clock[r.thread]);
        }
        least[r.thread] = seen;
      }
      if (least[r.thread] < r.fenced_at) {
        fail("racecheck: wgmma reads shared memory that threads stored to (store_shared_for_async) "
             "with no barrier between their fence.proxy.async and every thread of the issuing "
             "warpgroup");
      }
    }
  }
}

inline void wgmma_issue(WgmmaOp&& op, Warpgroup& group, const WgSlot* slots) {
  if (!group.fenced) {
    fail("wgmma without a warpgroup_fence since the warpgroup's start or its last warpgroup_wait");
  }
  for (int i = 0; i < 128; ++i) {
    if (slots[i].desc_a != slots[0].desc_a || slots[i].desc_b != slots[0].desc_b ||
        slots[i].accumulate != slots[0].accumulate) {
      fail("wgmma: descriptors or scale-d differ across the warpgroup");
    }
    op.d[i] = slots[i].d;
  }
  // Accumulators may be shared by in-flight wgmmas only of the same shape (PTX ISA).
  auto check = [&](const WgmmaOp& other) {
    for (int i = 0; i < 128; ++i) {
      const bool overlap = op.d[i] < other.d[i] + other.n / 2 && other.d[i] < op.d[i] + op.n / 2;
      if (overlap && other.n != op.n) {
        fail("wgmma accumulators in use by an in-flight wgmma of another shape");
      }
    }
  };
  for (const WgmmaOp& other : group.open) check(other);
  for (const auto& g : group.committed) {
    for (const WgmmaOp& other : g) check(other);
  }
  for_each_operand_address(op, [&](uint32_t address) {
    if (address % 2 != 0 || address + 2 > current_block()->shared_bytes) {
      fail("wgmma operand outside the dynamic shared memory");
    }
    op.chunks.push_back(address / 16);
  });
  std::sort(op.chunks.begin(), op.chunks.end());
  op.chunks.erase(std::unique(op.chunks.begin(), op.chunks.end()), op.chunks.end());
  for (uint32_t chunk : op.chunks) {
    const ChunkState& c = chunks()[chunk];
    if (c.in_flight != 0) fail("racecheck: wgmma reads shared memory whose cp.async is in flight");
    if (c.unfenced_stores != 0) {
      fail("wgmma reads shared memory that threads stored to (store_shared_for_async) without a "
           "fence.proxy.async (fence_view_async_shared) since");
    }
    if (c.tma >= 0) check_tma_visible(chunk, "wgmma");
  }
  if (sm90().stores_used) check_stores_ordered(op.chunks);
  for (uint32_t chunk : op.chunks) ++chunks()[chunk].wgmma_readers;
  AccumulatorWatch& watch = accumulator_watch(group, op);
  watch_check(watch, op);
  if (!late_copies()) wgmma_compute(op);
  ++watch.in_flight;
  watch_record(watch, op);
  group.open.push_back(std::move(op));
}

inline void wgmma_retire(const WgmmaOp& op, Warpgroup& group) {
  // PTX ISA: a wgmma's register operands must not be modified before the wait that retires it
  // (the hardware reads A while it runs; here A was captured at issue, so check it instead).
  for (int i = 0; op.rs && i < 128; ++i) {
    if (std::memcmp(op.a_registers[i], op.a_words[i], sizeof op.a_words[i]) != 0) {
      fail("an RS wgmma's A registers changed before the warpgroup_wait that retires it");
    }
  }
  AccumulatorWatch& watch = accumulator_watch(group, op);
  watch_check(watch, op);
  if (late_copies()) wgmma_compute(op);
  watch_record(watch, op);
  if (--watch.in_flight == 0) {
    group.watches.erase(group.watches.begin() + (&watch - group.watches.data()));
  }
  for (uint32_t chunk : op.chunks) --chunks()[chunk].wgmma_readers;
}

}  // namespace emu

// The PTX wrappers of csrc/cuda/attention_sm90.cuh (compiled out under FUSEDLM_WARP_EMULATION).
namespace fusedlm::cuda::attention {

// The shared-window address: the byte offset into the emulated shared memory.
inline uint32_t shared_address(const void* p) {
  return ::emu::shared_offset(p, "shared_address of a pointer outside shared memory");
}

}  // namespace fusedlm::cuda::attention

namespace fusedlm::cuda::attention::sm90 {

inline void mbarrier_init(uint64_t* barrier, uint32_t arrivals) {
  const uint32_t offset = ::emu::mbarrier_offset(barrier);
  if (arrivals == 0 || arrivals >= (1u << 20)) ::emu::fail("mbarrier_init: count out of range");
  ::emu::MBarrier& m = ::emu::sm90().barriers[offset];
  if (m.late_copies != 0) ::emu::fail("mbarrier_init on an mbarrier with TMA copies in flight");
  m = ::emu::MBarrier{};
  m.expected = m.pending = arrivals;
  m.observed.assign(::emu::sm90().warpgroups.size(), 0);
}

inline void fence_barrier_init() {}

inline void mbarrier_arrive(uint64_t* barrier) {
  ::emu::mbarrier_arrive_on(::emu::mbarrier_at(::emu::mbarrier_offset(barrier)));
}

inline void mbarrier_arrive_expect_tx(uint64_t* barrier, uint32_t bytes) {
  ::emu::MBarrier& m = ::emu::mbarrier_at(::emu::mbarrier_offset(barrier));
  m.tx += bytes;  // expect-tx, then the arrive-on
  ::emu::mbarrier_arrive_on(m);
}

// mbarrier.try_wait.parity in a loop: returns once the current phase's parity differs from
// `phase`, i.e. the phase with parity `phase` has completed. Late TMA copies to this barrier
// land here, before the thread blocks.
inline void mbarrier_wait(uint64_t* barrier, uint32_t phase) {
  const uint32_t offset = ::emu::mbarrier_offset(barrier);
  ::emu::Thread& me = ::emu::self();
  const unsigned parity = phase & 1;
  me.waiting_mbarrier = true;
  me.mbarrier = offset;
  me.mbarrier_parity = parity;
  for (;;) {
    if ((::emu::mbarrier_at(offset).completed & 1) != parity) break;
    for (int i = 0; i < static_cast<int>(::emu::sm90().copies.size()); ++i) {
      const ::emu::TmaCopy& c = ::emu::sm90().copies[i];
      if (c.barrier == offset && !c.landed) {
        --::emu::mbarrier_at(offset).late_copies;
        ::emu::tma_land(i);
      }
    }
    if ((::emu::mbarrier_at(offset).completed & 1) != parity) break;
    ::emu::yield();
  }
  me.waiting_mbarrier = false;
  ::emu::MBarrier& m = ::emu::mbarrier_at(offset);
  uint64_t& seen = m.observed[me.warp / 4];
  seen = std::max(seen, m.completed);
}

inline void tma_load_4d(void* smem, const CUtensorMap* map, int c0, int c1, int c2, int c3,
                        uint64_t* barrier) {
  ::emu::TmaCopy copy{};
  std::memcpy(&copy.map, map, sizeof copy.map);
  if (copy.map.magic != ::emu::kTileMapMagic) {
    ::emu::fail("tma_load_4d: a tensor map not made by encode_tile_map");
  }
  copy.bytes = static_cast<uint32_t>(copy.map.box_rows * 128);  // the full box, even when clipped
  ::emu::check_shared(smem, copy.bytes, 1024,
                      "TMA destination outside the dynamic shared memory or not 1024-byte aligned");
  copy.dst = ::emu::shared_offset(smem, "TMA destination outside shared memory");
  copy.barrier = ::emu::mbarrier_offset(barrier);
  ::emu::MBarrier& m = ::emu::mbarrier_at(copy.barrier);
  copy.coords[0] = c0;
  copy.coords[1] = c1;
  copy.coords[2] = c2;
  copy.coords[3] = c3;
  ::emu::tma_check_overwrite(copy);  // it may land at once on a GPU
  const int index = static_cast<int>(::emu::sm90().copies.size());
  for (uint32_t i = copy.dst / 16; i < (copy.dst + copy.bytes) / 16; ++i) {
    ::emu::ChunkState& c = ::emu::chunks()[i];
    if (c.in_flight != 0) {
      ::emu::fail("racecheck: TMA into shared memory a cp.async is in flight to");
    }
    if (c.tma >= 0 && !::emu::sm90().copies[c.tma].landed) {
      ::emu::fail("racecheck: TMA into shared memory another TMA copy is still in flight to");
    }
    c.tma = index;
  }
  for (const auto& [offset, other] : ::emu::sm90().barriers) {
    if (offset + 8 > copy.dst && offset < copy.dst + copy.bytes) {
      ::emu::fail("TMA destination overlaps an mbarrier");
    }
  }
  ::emu::sm90().copies.push_back(copy);
  if (::emu::late_copies()) {
    ++m.late_copies;
  } else {
    ::emu::tma_land(index);
  }
}

template <uint32_t kRegisters>
inline void registers_decrease() {
  ::emu::warpgroup_collective("setmaxnreg.dec", [](::emu::Warpgroup&, const ::emu::WgSlot*) {});
}

template <uint32_t kRegisters>
inline void registers_increase() {
  ::emu::warpgroup_collective("setmaxnreg.inc", [](::emu::Warpgroup&, const ::emu::WgSlot*) {});
}

// fence.proxy.async.shared::cta: orders this thread's generic-proxy shared-memory stores before
// async-proxy (wgmma, TMA) accesses. Here it clears this thread's store_shared_for_async marks
// and stamps those words with its clock (the wgmma that reads them checks for a barrier after
// this stamp); plain C++ stores are invisible here.
inline void fence_view_async_shared() {
  ::emu::Thread& me = ::emu::self();
  ++::emu::sm90().warpgroups[me.warp / 4].async_fences;
  for (uint32_t chunk : me.unfenced_chunks) --::emu::chunks()[chunk].unfenced_stores;
  me.unfenced_chunks.clear();
  const int index = ::emu::current_block()->current;
  for (uint32_t word : me.unfenced_words) {
    ::emu::StoreRecord& r = ::emu::sm90().stores[word];
    if (r.thread == index) r.fenced_at = me.clock[index];
  }
  me.unfenced_words.clear();
}

// A plain shared-memory store of a value the async proxy reads later: marked until this thread's
// next fence_view_async_shared.
inline void store_shared_for_async(void* smem, uint32_t value) {
  ::emu::check_shared(smem, 4, 4, "store_shared_for_async outside shared memory or misaligned");
  const uint32_t chunk = ::emu::shared_offset(smem, "store_shared_for_async") / 16;
  if (::emu::chunks()[chunk].wgmma_readers != 0) {
    // (dS^T's next tile into the buffer the other consumer's dQ wgmma still reads, say)
    ::emu::fail("racecheck: store_shared_for_async overwrites shared memory an in-flight wgmma "
                "reads");
  }
  std::memcpy(smem, &value, 4);
  ++::emu::chunks()[chunk].unfenced_stores;
  ::emu::self().unfenced_chunks.push_back(chunk);
  ::emu::clocks_start();
  const uint32_t word = ::emu::shared_offset(smem, "store_shared_for_async") / 4;
  ::emu::sm90().stores[word] = ::emu::StoreRecord{::emu::current_block()->current, 0};
  ::emu::sm90().stores_used = true;
  ::emu::self().unfenced_words.push_back(word);
}

// bar.sync id, threads: arrive and wait until `threads` threads arrived (bar.arrive counts).
inline void named_barrier_sync(uint32_t id, uint32_t threads) {
  ::emu::wait_barrier(::emu::named_barrier(static_cast<int>(id), static_cast<int>(threads)));
}

// bar.arrive id, threads: arrive without waiting (when `arrive`: the instruction's predicate).
inline void named_barrier_arrive(uint32_t id, uint32_t threads, bool arrive) {
  if (!arrive) return;
  ::emu::Barrier& x = ::emu::named_barrier(static_cast<int>(id), static_cast<int>(threads));
  ::emu::clock_arrive(x);
  if (++x.arrived >= x.live) {
    x.arrived = 0;
    ::emu::clock_complete(x);
    ++x.generation;
  }
}

inline void warpgroup_fence() {
  ::emu::warpgroup_collective("wgmma.fence",
                              [](::emu::Warpgroup& g, const ::emu::WgSlot*) { g.fenced = true; });
}

inline void warpgroup_commit() {
  ::emu::warpgroup_collective("wgmma.commit_group", [](::emu::Warpgroup& g, const ::emu::WgSlot*) {
    g.committed.push_back(std::move(g.open));
    g.open.clear();
  });
}

template <int kPending>
inline void warpgroup_wait() {
  ::emu::warpgroup_collective("wgmma.wait_group", [](::emu::Warpgroup& g, const ::emu::WgSlot*) {
    while (static_cast<int>(g.committed.size()) > kPending) {
      for (const ::emu::WgmmaOp& op : g.committed.front()) ::emu::wgmma_retire(op, g);
      g.committed.pop_front();
    }
    g.fenced = false;  // the threads may touch their registers now: a fence must come first
  });
}

// wgmma.mma_async m64nNk16 with A and B from shared memory: imm-trans-a / imm-trans-b 0 reads
// the operand K-major, 1 MN-major (see for_each_operand_address). accumulate == false: d = A.B.
template <typename T, int N, int kTransA, int kTransB>
inline void wgmma_ss(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>);
  static_assert(N == 64 || N == 128);
  static_assert((kTransA == 0 || kTransA == 1) && (kTransB == 0 || kTransB == 1));
  // One name per instruction form: a warpgroup's threads must all issue the same one.
  static const std::string what = "wgmma.ss.m64n" + std::to_string(N) + "k16.trans" +
                                  std::to_string(kTransA) + std::to_string(kTransB);
  ::emu::WgSlot& slot = ::emu::sm90().slots[::emu::current_block()->current];
  slot.desc_a = desc_a;
  slot.desc_b = desc_b;
  slot.accumulate = accumulate;
  slot.d = d;
  ::emu::warpgroup_collective(what.c_str(), [&](::emu::Warpgroup& g,
                                                const ::emu::WgSlot* slots) {
    auto op = std::make_unique<::emu::WgmmaOp>();
    op->n = N;
    op->rs = false;
    op->trans_a = kTransA == 1;
    op->trans_b = kTransB == 1;
    op->accumulate = slots[0].accumulate;
    op->bf16 = std::is_same_v<T, __nv_bfloat16>;
    op->desc_a = slots[0].desc_a;
    op->desc_b = slots[0].desc_b;
    ::emu::wgmma_issue(std::move(*op), g, slots);
  });
}

template <typename T, int N>
inline void wgmma_rs_transposed_b(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>);
  static_assert(N == 64 || N == 128);
  ::emu::WgSlot& slot = ::emu::sm90().slots[::emu::current_block()->current];
  slot.desc_a = 0;
  slot.desc_b = desc_b;
  slot.accumulate = true;
  std::memcpy(slot.a, a, sizeof slot.a);
  slot.a_registers = a;
  slot.d = d;
  ::emu::warpgroup_collective(N == 64 ? "wgmma.rs.m64n64k16" : "wgmma.rs.m64n128k16",
                              [&](::emu::Warpgroup& g, const ::emu::WgSlot* slots) {
    constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
    auto op = std::make_unique<::emu::WgmmaOp>();
    op->n = N;
    op->rs = true;
    op->trans_a = false;
    op->trans_b = true;  // imm-trans-b 1: V read MN-major
    op->accumulate = true;
    op->bf16 = kBf16;
    op->desc_a = 0;
    op->desc_b = slots[0].desc_b;
    for (int i = 0; i < 128; ++i) {
      op->a_registers[i] = slots[i].a_registers;
      std::memcpy(op->a_words[i], slots[i].a, sizeof op->a_words[i]);
      for (int r = 0; r < 4; ++r) {
        for (int half = 0; half < 2; ++half) {
          const ::emu::MatrixPosition p = ::emu::a_fragment_position(i, r, half);
          op->a[p.row][p.column] =
              ::emu::bits_to_float(static_cast<uint16_t>(slots[i].a[r] >> (16 * half)), kBf16);
        }
      }
    }
    ::emu::wgmma_issue(std::move(*op), g, slots);
  });
}

// Host: the emulated cuTensorMapEncodeTiled for a 4-D (D, T, H, B) 16-bit tensor, boxes of
// (64, box_rows, 1, 1), 128-byte swizzle, out-of-bounds zeros; validated as the driver does.
inline cudaError_t encode_tile_map(CUtensorMap* map, DType dtype, const void* base,
                                   const uint64_t (&dims)[4], const uint64_t (&strides_bytes)[3],
                                   uint32_t box_rows) {
  const bool sixteen_bit = dtype == DType::kFloat16 || dtype == DType::kBFloat16;
  bool valid = sixteen_bit && reinterpret_cast<uintptr_t>(map) % 64 == 0 &&
               reinterpret_cast<uintptr_t>(base) % 16 == 0 && box_rows >= 1 && box_rows <= 256;
  for (uint64_t d : dims) valid = valid && d >= 1 && d <= (uint64_t{1} << 32);
  for (uint64_t s : strides_bytes) valid = valid && s % 16 == 0 && s < (uint64_t{1} << 40);
  // The inner box, 64 elements x 2 bytes, fits the 128-byte swizzle span.
  if (!valid) return cudaErrorInvalidValue;
  ::emu::TileMap t{};
  t.magic = ::emu::kTileMapMagic;
  t.base = reinterpret_cast<uint64_t>(base);
  for (int i = 0; i < 4; ++i) t.dims[i] = dims[i];
  for (int i = 0; i < 3; ++i) t.strides[i] = strides_bytes[i];
  t.box_rows = box_rows;
  std::memset(map, 0, sizeof(CUtensorMap));
  std::memcpy(map, &t, sizeof t);
  return cudaSuccess;
}

}  // namespace fusedlm::cuda::attention::sm90
