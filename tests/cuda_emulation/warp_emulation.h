// A CPU emulation of the CUDA execution model, enough to run csrc/cuda's kernels and launchers
// (attention, norms, AdamW) unchanged on a machine with no GPU: every CUDA thread of a block is a
// coroutine (ucontext) on one OS thread; __syncthreads and the warp-collective instructions
// (shfl, ldmatrix, mma.sync) are barriers over the block or warp at which the coroutines switch;
// blocks run one after another with one shared-memory buffer (static __shared__ arrays become
// function statics, which is the same thing when one block runs at a time).
//
// The collective instructions are implemented from the PTX ISA's definitions (fragment layouts
// of mma.m16n8k16 and ldmatrix), independently of how the kernels use them, so a wrong address
// formula or fragment mapping in a kernel gives wrong numbers here as it would on a GPU. Checks
// a GPU would not make loudly fault the launch with a message (cudaGetLastError then reports
// it): shared-memory accesses outside the launch's dynamic size, misaligned ldmatrix/cp.async
// addresses, a cp.async never waited for, a deadlock at a barrier, and the hazards of the
// racecheck below. cp.async copies land either at issue or as late as the protocol allows (at
// the wait), and warps run in lockstep or one after another between barriers, selected per run.
// The Hopper primitives (mbarriers, TMA, wgmma) are in sm90_emulation.h, included at the end.
//
// Include this before the .cu files; compile as C++20 with the CUDA toolkit's include directory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#undef __align__
#undef __grid_constant__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static  // one block runs at a time: a static is the block's shared copy
#define __align__(n) __attribute__((aligned(n)))
#define __grid_constant__  // kernel parameters are plain by-value arguments here

#define FUSEDLM_WARP_EMULATION 1

namespace emu {

// The first fault of the current launch ("" when none): a check that failed, or a deadlock.
inline std::string& fault() {
  static std::string message;
  return message;
}
inline bool& in_thread() {  // running on a CUDA thread's coroutine (not the scheduler)
  static bool value = false;
  return value;
}
inline void fail(const char* what);

// ---- fragment layouts of the warp-level instructions (PTX ISA), one place each ----------------

struct MatrixPosition {
  int row;
  int column;
};

// mma.m16n8k16: lane 4 g + t holds A (16 x 16, row m, column k) a[0] (g, 2t..2t+1), a[1]
// (g + 8, 2t..), a[2] (g, 2t + 8..), a[3] (g + 8, 2t + 8..); `half` 0 is the low 16 bits.
inline MatrixPosition mma_a_position(int lane, int reg, int half) {
  return {lane / 4 + (reg % 2) * 8, 2 * (lane % 4) + (reg / 2) * 8 + half};
}
// B (16 x 8, row k, column n): b[0] (2t..2t+1, g), b[1] (2t + 8.., g).
inline MatrixPosition mma_b_position(int lane, int reg, int half) {
  return {2 * (lane % 4) + 8 * reg + half, lane / 4};
}
// C/D (16 x 8): c[0..1] (g, 2t, 2t + 1), c[2..3] (g + 8, same columns).
inline MatrixPosition mma_c_position(int lane, int index) {
  return {lane / 4 + (index >= 2 ? 8 : 0), 2 * (lane % 4) + (index & 1)};
}

// ldmatrix.m8n8.x4(.trans).b16: lanes 8 i .. 8 i + 7 give the row addresses of matrix i; half
// `half` of register r[i] of lane 4 g + t is element `element` of the 8-element row whose
// address lane `lane` gave: (row g, element 2t + half), or with .trans (row 2t + half,
// element g).
struct LdmatrixSource {
  int lane;
  int element;
};
inline LdmatrixSource ldmatrix_source(int lane, int reg, int half, bool trans) {
  const int g = lane / 4;
  const int t = lane % 4;
  return trans ? LdmatrixSource{8 * reg + 2 * t + half, g}
               : LdmatrixSource{8 * reg + g, 2 * t + half};
}

struct Copy {
  void* dst;
  const void* src;
  bool valid;
  bool landed;  // copied already (copies landing at issue); the wait still retires it
};

struct Barrier {
  int arrived = 0;
  unsigned generation = 0;
  int live = 0;  // threads of its set that can still arrive (a warpgroup's stays 128: all must)
  bool orders_memory = false;   // __syncthreads and named barriers (see the vector clocks)
  std::vector<uint32_t> joined;    // the clocks of this generation's arrivals, joined
  std::vector<uint32_t> released;  // the join of the last completed generation
};

inline Barrier fresh_barrier(int live, bool orders_memory) {
  Barrier barrier;
  barrier.live = live;
  barrier.orders_memory = orders_memory;
  return barrier;
}

struct Thread {
  ucontext_t context;
  std::unique_ptr<char[]> stack;  // uninitialized: a 1024-thread block needs 64 MiB
  dim3 index;
  int warp = 0;
  int lane = 0;
  bool done = false;
  Barrier* waiting_on = nullptr;  // the barrier this thread waits at, and its generation then
  unsigned waiting_generation = 0;
  bool waiting_mbarrier = false;  // in mbarrier_wait on (shared offset, parity)
  uint32_t mbarrier = 0;
  unsigned mbarrier_parity = 0;
  std::vector<Copy> open_group;                 // cp.async issued since the last commit
  std::vector<std::vector<Copy>> groups;        // committed, not yet waited for
  std::vector<uint32_t> unfenced_chunks;  // chunks of its store_shared_for_async since its fence
  std::vector<uint32_t> unfenced_words;   // and their 4-byte words
  std::vector<uint32_t> clock;  // its vector clock, once the block keeps them (clocks_start)
};

constexpr size_t kSharedBytes = 256 * 1024;
constexpr size_t kStackBytes = 64 * 1024;

// One 32-lane exchange slot per lane: what each lane contributes to a collective.
struct Slot {
  uint32_t words[8];
  const void* address;
};

struct Block {
  std::vector<Thread> threads;
  ucontext_t scheduler;
  int current = 0;
  dim3 block_dim;
  dim3 block_index;
  dim3 grid_dim;
  size_t shared_bytes = 0;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<Barrier> warpgroup_barriers;  // 128 consecutive threads (wgmma's collectives)
  std::vector<Barrier> named_barriers;      // bar.sync / bar.arrive 0..15 (live: its count)
  bool clocks_on = false;                   // vector clocks kept (clocks_start)
  std::vector<Slot> slots;  // (warps * 32)
  std::function<void()> body;
};

// The kernels' dynamic shared memory (csrc/cuda/common.cuh's dynamic_shared_memory()).
// 1024-aligned: the 128-byte swizzle of TMA and wgmma works on absolute address bits.
alignas(1024) inline unsigned char shared_memory[kSharedBytes];

inline Block*& current_block() {
  static Block* block = nullptr;
  return block;
}
// cp.async and TMA copies land, and wgmma computes, at the wait (true) or at issue (false).
inline bool& late_copies() {
  static bool late = true;
  return late;
}
// How the threads of a block take turns. kLockstep: every thread runs to its next collective or
// barrier in turn, so warps stay in step. kWarpsForward / kWarpsBackward: one warp runs until
// all its threads wait (at __syncthreads, a warpgroup collective, an mbarrier phase) or exit
// before the next one starts, first to last or last to first, so warps drift as far apart as
// the barriers allow: a buffer refilled while another warp still reads it shows. Threads that
// wait are skipped; a pass in which none can run is a deadlock.
// kWarpgroupsForward / kWarpgroupsBackward: the same with warpgroups (128 threads) as the unit,
// so one warpgroup runs ahead of another as far as their barriers allow (a buffer one
// warpgroup reads before another has written it shows).
enum class Schedule { kLockstep, kWarpsForward, kWarpsBackward, kWarpgroupsForward,
                      kWarpgroupsBackward };
inline Schedule& schedule() {
  static Schedule value = Schedule::kLockstep;
  return value;
}

// Records the fault and abandons the block: the faulting thread never resumes, the launch stops
// and cudaGetLastError reports it (kernels_emulated.cpp), as a GPU fault would.
inline void fail(const char* what) {
  if (fault().empty()) fault() = what;
  Block* block = current_block();
  if (block != nullptr && in_thread()) {
    swapcontext(&block->threads[block->current].context, &block->scheduler);
  }
  if (block == nullptr) std::abort();  // outside any launch: a bug of the emulation itself
}

inline Thread& self() { return current_block()->threads[current_block()->current]; }

inline void yield() {
  Block* block = current_block();
  swapcontext(&block->threads[block->current].context, &block->scheduler);
}

// Hooks of sm90_emulation.h (mbarriers, TMA, wgmma), defined there.
inline void sm90_block_start(Block& block);
inline void sm90_block_end();
inline void sm90_thread_exit();
inline void sm90_syncthreads();
inline bool mbarrier_ready(uint32_t offset, unsigned parity);
inline std::string describe_mbarrier(uint32_t offset, unsigned parity);
inline void check_tma_visible(size_t chunk, const char* what);

// ---- happens-before between threads (vector clocks) -------------------------------------------
//
// Kept once a kernel stores shared memory for the async proxy (store_shared_for_async in
// sm90_emulation.h, which checks that a barrier orders those stores before the wgmma that
// reads them). Thread t's clock[t] counts its arrivals at __syncthreads and named barriers; a
// barrier joins the clocks of a generation's arrivals and hands the join to the threads it
// releases, so thread r has seen thread t's events up to r's clock[t]. mbarriers and warp or
// warpgroup syncs do not order memory here.
inline void clocks_start() {
  Block& b = *current_block();
  if (b.clocks_on) return;
  b.clocks_on = true;
  for (size_t i = 0; i < b.threads.size(); ++i) {
    b.threads[i].clock.assign(b.threads.size(), 0);
    b.threads[i].clock[i] = 1;
  }
}

inline void clock_join(std::vector<uint32_t>& into, const std::vector<uint32_t>& clock) {
  if (into.size() != clock.size()) into.assign(clock.size(), 0);
  for (size_t i = 0; i < clock.size(); ++i) into[i] = std::max(into[i], clock[i]);
}

inline void clock_arrive(Barrier& barrier) {
  Block& b = *current_block();
  if (!b.clocks_on || !barrier.orders_memory) return;
  Thread& me = b.threads[b.current];
  clock_join(barrier.joined, me.clock);
  ++me.clock[b.current];
}

inline void clock_complete(Barrier& barrier) {
  if (!current_block()->clocks_on || !barrier.orders_memory) return;
  barrier.released.swap(barrier.joined);
  barrier.joined.clear();
}

inline void clock_depart(Barrier& barrier) {
  Block& b = *current_block();
  if (!b.clocks_on || !barrier.orders_memory || barrier.released.empty()) return;
  clock_join(b.threads[b.current].clock, barrier.released);
}

// Waits until every live thread of the barrier's set (block, warp or warpgroup) has arrived.
inline void wait_barrier(Barrier& barrier) {
  Block* block = current_block();
  const unsigned generation = barrier.generation;
  ++barrier.arrived;
  clock_arrive(barrier);
  Thread& me = block->threads[block->current];
  me.waiting_on = &barrier;
  me.waiting_generation = generation;
  while (barrier.generation == generation) {
    if (barrier.arrived >= barrier.live) {
      barrier.arrived = 0;
      clock_complete(barrier);
      ++barrier.generation;
      if (&barrier == &block->block_barrier) sm90_syncthreads();
      break;
    }
    yield();
  }
  me.waiting_on = nullptr;
  clock_depart(barrier);
}

inline void sync_block() { wait_barrier(current_block()->block_barrier); }

inline void sync_warp() { wait_barrier(current_block()->warp_barriers[self().warp]); }

// Every thread of this thread's warpgroup (threads 128 i .. 128 i + 127) must arrive.
inline void sync_warpgroup() {
  Block* block = current_block();
  const int group = self().warp / 4;
  if (128 * (group + 1) > static_cast<int>(block->threads.size())) {
    fail("a warpgroup instruction in a warpgroup the block's threads do not fill");
  }
  wait_barrier(block->warpgroup_barriers[group]);
}

inline Slot* warp_slots() { return &current_block()->slots[self().warp * 32]; }

inline void check_shared(const void* p, size_t bytes, size_t alignment, const char* what) {
  const auto* c = static_cast<const unsigned char*>(p);
  if (c < shared_memory || c + bytes > shared_memory + current_block()->shared_bytes) {
    fail(what);
  }
  if (reinterpret_cast<uintptr_t>(p) % alignment != 0) fail(what);
}

inline void trampoline() {
  current_block()->body();
  self().done = true;
  --current_block()->block_barrier.live;
  --current_block()->warp_barriers[self().warp].live;
  sm90_thread_exit();
  // Empty groups may stay outstanding (a pipeline's last commit); copies may not.
  bool pending = false;
  for (const Copy& c : self().open_group) pending = true, (void)c;
  for (const auto& group : self().groups) {
    for (const Copy& c : group) pending = true, (void)c;
  }
  if (pending) fail("a thread exited with cp.async copies it never waited for");
  self().open_group.clear();
  self().groups.clear();
}

// ---- shared-memory hazard tracking (a racecheck for the cp.async / ldmatrix traffic) -----------
//
// Per 16-byte chunk of dynamic shared memory: the copy in flight to it (from cp.async's issue
// until the issuing thread's wait retires it), the __syncthreads epoch and warp of its last
// landed copy, and the epoch and warps of its reads. Epoch = how many __syncthreads the block
// has passed. Hazards (each a fault): a read of a chunk whose copy is in flight (read before the
// wait); a read in the same epoch as another warp's copy landed (no barrier between); a copy
// issued into a chunk another warp read in the same epoch (overwritten while being read), or
// into a chunk with a copy still in flight. Plain C++ loads and stores are not tracked.
struct ChunkState {
  int in_flight = 0;  // issuing thread + 1, or 0
  int tma = -1;           // the last TMA copy into it (sm90_emulation.h), or -1
  int wgmma_readers = 0;  // issued, not yet retired wgmmas reading it
  int unfenced_stores = 0;  // store_shared_for_async stores not yet followed by their thread's
                            // fence.proxy.async (sm90_emulation.h)
  unsigned write_epoch = ~0u;
  int write_warp = -1;
  unsigned read_epoch = ~0u;
  uint64_t read_warps = 0;
};

inline std::vector<ChunkState>& chunks() {
  static std::vector<ChunkState> states(kSharedBytes / 16);
  return states;
}

inline ChunkState& chunk_of(const void* p) {
  return chunks()[(static_cast<const unsigned char*>(p) - shared_memory) / 16];
}

inline unsigned epoch() { return current_block()->block_barrier.generation; }

inline void track_copy_issue(const void* dst) {
  ChunkState& c = chunk_of(dst);
  const int warp = self().warp;
  if (c.in_flight != 0) fail("racecheck: cp.async into shared memory that a copy is still in flight to");
  if (c.read_epoch == epoch() && (c.read_warps & ~(uint64_t{1} << warp)) != 0) {
    fail("racecheck: cp.async overwrites shared memory another warp read since the last __syncthreads");
  }
  if (c.wgmma_readers != 0) {
    fail("racecheck: cp.async overwrites shared memory an in-flight wgmma reads");
  }
  c.in_flight = self().index.x + 1;
}

inline void track_copy_retired(const void* dst) {
  ChunkState& c = chunk_of(dst);
  c.in_flight = 0;
  c.write_epoch = epoch();
  c.write_warp = self().warp;
}

inline void track_read(const void* p) {
  ChunkState& c = chunk_of(p);
  const int warp = self().warp;
  if (c.in_flight != 0) fail("racecheck: ldmatrix reads shared memory whose cp.async has not been waited for");
  if (c.tma >= 0) check_tma_visible(&c - chunks().data(), "ldmatrix");
  if (c.write_epoch == epoch() && c.write_warp != warp) {
    fail("racecheck: ldmatrix reads another warp's copy without a __syncthreads after its wait");
  }
  if (c.read_epoch != epoch()) {
    c.read_epoch = epoch();
    c.read_warps = 0;
  }
  c.read_warps |= uint64_t{1} << warp;
}

// Resumes thread i until it next yields.
inline void resume(Block& b, int i) {
  b.current = i;
  in_thread() = true;
  swapcontext(&b.scheduler, &b.threads[i].context);
  in_thread() = false;
}

// Whether thread t cannot run: at a barrier not yet complete, or in mbarrier_wait on a phase not
// yet complete with no late TMA copy that its wait would land.
inline bool blocked(const Thread& t) {
  if (t.waiting_on != nullptr) {
    const Barrier& x = *t.waiting_on;
    return x.generation == t.waiting_generation && x.arrived < x.live;
  }
  return t.waiting_mbarrier && !mbarrier_ready(t.mbarrier, t.mbarrier_parity);
}

inline std::string deadlock_message(const Block& b) {
  std::vector<std::pair<std::string, int>> waits;  // what, how many threads
  for (const Thread& t : b.threads) {
    if (t.done) continue;
    std::string what;
    if (t.waiting_on == &b.block_barrier) {
      what = "at __syncthreads";
    } else if (t.waiting_on != nullptr && t.waiting_on >= b.warp_barriers.data() &&
               t.waiting_on < b.warp_barriers.data() + b.warp_barriers.size()) {
      what = "at a collective of warp " + std::to_string(t.warp);
    } else if (t.waiting_on != nullptr && t.waiting_on >= b.named_barriers.data() &&
               t.waiting_on < b.named_barriers.data() + b.named_barriers.size()) {
      const Barrier& x = *t.waiting_on;
      what = "at named barrier " + std::to_string(t.waiting_on - b.named_barriers.data()) +
             " (" + std::to_string(x.arrived) + " of " + std::to_string(x.live) + " arrived)";
    } else if (t.waiting_on != nullptr) {
      int exited = 0;
      for (int i = 0; i < 128; ++i) exited += b.threads[(t.warp / 4) * 128 + i].done ? 1 : 0;
      what = "at a collective of warpgroup " + std::to_string(t.warp / 4) + " (" +
             std::to_string(exited) + " of its threads exited)";
    } else {
      what = describe_mbarrier(t.mbarrier, t.mbarrier_parity);
    }
    auto it = std::find_if(waits.begin(), waits.end(),
                           [&](const auto& w) { return w.first == what; });
    if (it == waits.end()) {
      waits.emplace_back(what, 1);
    } else {
      ++it->second;
    }
  }
  std::string message = "deadlock: no thread can run;";
  for (const auto& [what, count] : waits) {
    message += " " + std::to_string(count) + " thread(s) wait " + what + ";";
  }
  return message;
}

inline void run_block(Block& b) {
  const int threads = static_cast<int>(b.threads.size());
  for (;;) {
    bool live = false;
    bool ran = false;
    auto step = [&](int i) {  // false: a fault ended the block
      Thread& t = b.threads[i];
      if (t.done) return true;
      live = true;
      if (blocked(t)) return true;
      ran = true;
      resume(b, i);
      return fault().empty();
    };
    if (schedule() == Schedule::kLockstep) {
      for (int i = 0; i < threads; ++i) {
        if (!step(i)) return;
      }
    } else {
      const bool groups = schedule() == Schedule::kWarpgroupsForward ||
                          schedule() == Schedule::kWarpgroupsBackward;
      const bool forward = schedule() == Schedule::kWarpsForward ||
                           schedule() == Schedule::kWarpgroupsForward;
      const int unit = groups ? 128 : 32;
      const int units = (threads + unit - 1) / unit;
      for (int n = 0; n < units; ++n) {
        const int w = forward ? n : units - 1 - n;
        for (bool progressed = true; progressed;) {  // this unit, until it waits or exits
          const bool before = ran;
          ran = false;
          for (int i = unit * w; i < std::min(unit * w + unit, threads); ++i) {
            if (!step(i)) return;
          }
          progressed = ran;
          ran = ran || before;
        }
      }
    }
    if (!live) return;
    if (!ran) {
      fail(deadlock_message(b).c_str());
      return;
    }
  }
}

// Runs kernel(args...) for every block of the grid, one block at a time.
template <typename Kernel>
struct Launch {
  Kernel kernel;
  dim3 grid;
  dim3 block;
  size_t shared_bytes;

  template <typename... Args>
  void operator()(Args... args) const {
    if (shared_bytes > kSharedBytes) fail("more dynamic shared memory than the emulation has");
    const int threads = static_cast<int>(block.x * block.y * block.z);
    if (threads % 32 != 0) fail("block size not a multiple of 32 (not emulated)");
    Block b;
    b.block_dim = block;
    b.grid_dim = grid;
    b.shared_bytes = shared_bytes;
    b.threads.resize(threads);
    b.warp_barriers.resize(threads / 32);
    b.warpgroup_barriers.resize((threads + 127) / 128);
    b.slots.resize(threads);
    b.body = [&] { kernel(args...); };
    for (auto& t : b.threads) t.stack.reset(new char[kStackBytes]);
    current_block() = &b;
    for (unsigned z = 0; z < grid.z; ++z) {
      for (unsigned y = 0; y < grid.y; ++y) {
        for (unsigned x = 0; x < grid.x; ++x) {
          b.block_index = dim3(x, y, z);
          // Garbage in shared memory, as on a GPU: reading what was never written shows.
          std::memset(shared_memory, 0x7f, kSharedBytes);
          std::fill(chunks().begin(), chunks().end(), ChunkState{});
          b.block_barrier = fresh_barrier(threads, true);
          for (Barrier& x : b.warp_barriers) x = fresh_barrier(32, false);
          for (Barrier& x : b.warpgroup_barriers) x = fresh_barrier(128, false);
          b.named_barriers.assign(16, fresh_barrier(0, true));
          b.clocks_on = false;
          sm90_block_start(b);
          for (int i = 0; i < threads; ++i) {
            Thread& t = b.threads[i];
            t.index = dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
            t.warp = i / 32;
            t.lane = i % 32;
            t.done = false;
            t.unfenced_chunks.clear();
            t.unfenced_words.clear();
            t.clock.clear();
            getcontext(&t.context);
            t.context.uc_stack.ss_sp = t.stack.get();
            t.context.uc_stack.ss_size = kStackBytes;
            t.context.uc_link = &b.scheduler;
            makecontext(&t.context, trampoline, 0);
          }
          run_block(b);
          if (fault().empty()) sm90_block_end();
          if (!fault().empty()) {
            current_block() = nullptr;
            return;
          }
        }
      }
    }
    current_block() = nullptr;
  }
};

inline uint3 thread_index() {
  const dim3 d = self().index;
  return uint3{d.x, d.y, d.z};
}
inline uint3 block_index() {
  const dim3 d = current_block()->block_index;
  return uint3{d.x, d.y, d.z};
}
inline dim3 block_dim() { return current_block()->block_dim; }
inline dim3 grid_dim() { return current_block()->grid_dim; }

template <typename T>
T shfl_xor(T value, int offset) {
  static_assert(sizeof(T) <= 8);
  Slot* slots = warp_slots();
  const int lane = self().lane;
  std::memcpy(slots[lane].words, &value, sizeof(T));
  sync_warp();
  T result;
  std::memcpy(&result, slots[lane ^ offset].words, sizeof(T));
  sync_warp();
  return result;
}

inline void perform(const Copy& c) {
  if (c.valid) {
    std::memcpy(c.dst, c.src, 16);
  } else {
    std::memset(c.dst, 0, 16);
  }
}


}  // namespace emu

#define threadIdx (::emu::thread_index())
#define blockIdx (::emu::block_index())
#define blockDim (::emu::block_dim())
#define gridDim (::emu::grid_dim())
#define FUSEDLM_LAUNCH(kernel, grid, block, shared_bytes, stream)                        \
  ::emu::Launch<decltype(kernel)>{kernel, dim3(grid), dim3(block),                      \
                                  static_cast<size_t>(shared_bytes)}

namespace fusedlm::cuda {
unsigned char* emulated_dynamic_shared_memory() { return ::emu::shared_memory; }  // one TU
}  // namespace fusedlm::cuda

template <typename T>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, T*, int, size_t) {
  *blocks = 1;
  return cudaSuccess;
}

// cuda_runtime.h has this template only for nvcc; the emulated device takes any size.
template <typename T>
cudaError_t cudaFuncSetAttribute(T*, enum cudaFuncAttribute, int) {
  return cudaSuccess;
}

// CUDA's math functions live in the global namespace.
using std::isfinite;
using std::isinf;
using std::isnan;

inline void __syncthreads() { ::emu::sync_block(); }

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int offset, int width = 32) {
  if (mask != 0xffffffffu || width != 32) ::emu::fail("__shfl_xor_sync: only full warps emulated");
  return ::emu::shfl_xor(value, offset);
}

inline float atomicAdd(float* address, float value) {  // one OS thread: a plain add is atomic
  const float old = *address;
  *address = old + value;
  return old;
}

inline float2 atomicAdd(float2* address, float2 value) {  // sm_90's 8-byte vector atomic
  if (reinterpret_cast<uintptr_t>(address) % 8 != 0) ::emu::fail("float2 atomicAdd misaligned");
  const float2 old = *address;
  address->x = old.x + value.x;
  address->y = old.y + value.y;
  return old;
}

// The PTX wrappers of csrc/cuda/attention_sm80.cuh (compiled out under FUSEDLM_WARP_EMULATION).
namespace fusedlm::cuda::attention {

inline void cp_async_16(void* smem, const void* gmem, bool valid) {
  ::emu::check_shared(smem, 16, 16, "cp.async destination outside shared memory or misaligned");
  if (valid && reinterpret_cast<uintptr_t>(gmem) % 16 != 0) ::emu::fail("cp.async source misaligned");
  ::emu::track_copy_issue(smem);
  ::emu::Copy copy{smem, gmem, valid, false};
  if (!::emu::late_copies()) {
    ::emu::perform(copy);
    copy.landed = true;
  }
  ::emu::self().open_group.push_back(copy);
}

inline void cp_async_commit() {
  ::emu::Thread& me = ::emu::self();
  me.groups.push_back(std::move(me.open_group));
  me.open_group.clear();
}

template <int kPending>
inline void cp_async_wait() {
  ::emu::Thread& me = ::emu::self();
  while (static_cast<int>(me.groups.size()) > kPending) {
    for (const ::emu::Copy& c : me.groups.front()) {
      if (!c.landed) ::emu::perform(c);
      ::emu::track_copy_retired(c.dst);
    }
    me.groups.erase(me.groups.begin());
  }
}

// ldmatrix.m8n8.x4(.trans).b16 (emu::ldmatrix_source: which lane's row, which element).
inline void ldmatrix_emulated(uint32_t (&r)[4], const void* smem, bool trans) {
  ::emu::check_shared(smem, 16, 16, "ldmatrix row address outside shared memory or misaligned");
  ::emu::track_read(smem);
  ::emu::Slot* slots = ::emu::warp_slots();
  const int lane = ::emu::self().lane;
  slots[lane].address = smem;
  ::emu::sync_warp();
  for (int i = 0; i < 4; ++i) {
    r[i] = 0;
    for (int half = 0; half < 2; ++half) {
      const ::emu::LdmatrixSource s = ::emu::ldmatrix_source(lane, i, half, trans);
      const uint16_t bits = static_cast<const uint16_t*>(slots[s.lane].address)[s.element];
      r[i] |= static_cast<uint32_t>(bits) << (16 * half);
    }
  }
  ::emu::sync_warp();
}

inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem) { ldmatrix_emulated(r, smem, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  ldmatrix_emulated(r, smem, true);
}

template <typename T>
inline float half_bits_to_float(uint16_t bits) {
  T v;
  std::memcpy(&v, &bits, 2);
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(v);
  } else {
    return __bfloat162float(v);
  }
}

// mma.sync.m16n8k16.row.col.f32.{f16,bf16} (emu::mma_{a,b,c}_position: the fragments).
template <typename T>
inline void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  ::emu::Slot* slots = ::emu::warp_slots();
  const int lane = ::emu::self().lane;
  for (int i = 0; i < 4; ++i) slots[lane].words[i] = a[i];
  slots[lane].words[4] = b0;
  slots[lane].words[5] = b1;
  ::emu::sync_warp();
  float A[16][16];
  float B[16][8];
  for (int l = 0; l < 32; ++l) {
    const uint32_t* w = slots[l].words;
    for (int half = 0; half < 2; ++half) {
      for (int i = 0; i < 4; ++i) {
        const ::emu::MatrixPosition p = ::emu::mma_a_position(l, i, half);
        A[p.row][p.column] = half_bits_to_float<T>(static_cast<uint16_t>(w[i] >> (16 * half)));
      }
      for (int j = 0; j < 2; ++j) {
        const ::emu::MatrixPosition p = ::emu::mma_b_position(l, j, half);
        B[p.row][p.column] =
            half_bits_to_float<T>(static_cast<uint16_t>(w[4 + j] >> (16 * half)));
      }
    }
  }
  for (int i = 0; i < 4; ++i) {
    const ::emu::MatrixPosition p = ::emu::mma_c_position(lane, i);
    float acc = c[i];
    for (int k = 0; k < 16; ++k) acc += A[p.row][k] * B[k][p.column];
    c[i] = acc;
  }
  ::emu::sync_warp();
}

// ex2.approx.ftz.f32: a denormal input counts as 0 and a result below 2^-126 is flushed to 0
// (the hardware's ~2 ulp approximation itself is not modelled: exp2 is exact here).
inline float fast_exp2(float x) {
  if (std::fpclassify(x) == FP_SUBNORMAL) x = 0.f;
  const float y = std::exp2(x);
  return std::fpclassify(y) == FP_SUBNORMAL ? 0.f : y;
}

}  // namespace fusedlm::cuda::attention

#include "sm90_emulation.h"  // NOLINT: the Hopper primitives, after the above
