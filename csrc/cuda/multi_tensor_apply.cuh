// One reusable multi-tensor launcher (the design of Apex's multi_tensor_apply, written anew):
// a list of tensors is cut into chunks of chunk_size elements, and each launch of one kernel
// gets, in its kernel arguments, a table of up to kMaxTensors tensors (a base pointer per list,
// numel, per-tensor scalars) and, for each of its up to kMaxBlocks blocks, which tensor and which
// chunk that block updates. A whole model's parameters therefore update in a handful of launches
// (no device-side pointer arrays, no host-to-device copies, nothing to synchronize), and the
// launches are CUDA-graph capturable as long as the functor reads its changing scalars through
// device pointers.
//
// A functor is a struct with the kernel's scalars as members and
//   __device__ void operator()(int64_t chunk_size, const TensorListMeta<kDepth, Extra>& meta) const
// which updates chunk meta.block_chunk[blockIdx.x] of tensor meta.block_tensor[blockIdx.x].
#pragma once

#include "cuda/common.cuh"

#include <cstddef>
#include <cstdint>

namespace fusedlm::cuda {

// Kernel arguments stay under the classic 4 KiB limit (CUDA 12.1+ allows 32 KiB on Volta and
// later, but every launch copies its arguments, so a smaller table launches faster); the table
// gets kMtaMetaBytes of it and the functor the rest.
constexpr size_t kMtaMetaBytes = 3584;
constexpr size_t kMtaArgBytes = 4096;
constexpr int kMtaMaxBlocks = 320;
constexpr int kMtaThreads = 512;
constexpr int64_t kMtaChunkElems = 65536;

template <int kDepth, typename Extra>
constexpr int mta_max_tensors() {
  constexpr size_t per_tensor = kDepth * sizeof(void*) + sizeof(int64_t) + sizeof(Extra);
  constexpr size_t blocks = kMtaMaxBlocks * (sizeof(int32_t) + sizeof(uint8_t));
  constexpr size_t room = kMtaMetaBytes - blocks - 16;  // 16: padding of the arrays
  constexpr size_t fit = room / per_tensor;
  return fit < 255 ? static_cast<int>(fit) : 255;  // block_tensor is a uint8_t
}

// The per-launch table, passed by value as a __grid_constant__ kernel argument.
template <int kDepth, typename Extra>
struct TensorListMeta {
  static constexpr int kMaxTensors = mta_max_tensors<kDepth, Extra>();
  static constexpr int kMaxBlocks = kMtaMaxBlocks;
  void* ptrs[kDepth][kMaxTensors];   // [list][tensor slot] base pointer
  int64_t numel[kMaxTensors];        // [tensor slot]
  Extra extra[kMaxTensors];          // [tensor slot] per-tensor scalars for the functor
  int32_t block_chunk[kMaxBlocks];   // [block] chunk index within its tensor
  uint8_t block_tensor[kMaxBlocks];  // [block] tensor slot
};

// One tensor of the list as the host describes it: kDepth pointers (one per list: params,
// grads, states...), each to `numel` contiguous elements.
template <int kDepth, typename Extra>
struct TensorListEntry {
  void* ptrs[kDepth];
  int64_t numel;
  Extra extra;
};

template <typename Meta, typename Functor>
__global__ void __launch_bounds__(kMtaThreads) multi_tensor_kernel(
    int64_t chunk_size,                        // elements per chunk
    const __grid_constant__ Meta meta,         // this launch's tensors and block -> chunk map
    const __grid_constant__ Functor functor) {
  functor(chunk_size, meta);
}

// Cuts tensors[0, count) into chunk_size chunks (empty tensors skipped) and fills one table per
// launch, calling launch(meta, blocks) for each in order; returns the first error launch returns.
// Host-only: the planning half of multi_tensor_apply, separate so it can be checked without a GPU.
template <int kDepth, typename Extra, typename Launch>
cudaError_t plan_multi_tensor_launches(const TensorListEntry<kDepth, Extra>* tensors,
                                       int64_t count, int64_t chunk_size, const Launch& launch) {
  using Meta = TensorListMeta<kDepth, Extra>;
  if (chunk_size <= 0 || count < 0) return cudaErrorInvalidValue;
  Meta meta{};
  int slot = -1;   // table slot of the tensor being placed
  int blocks = 0;  // blocks of the pending launch
  auto place = [&](int at, const TensorListEntry<kDepth, Extra>& entry) {
    for (int d = 0; d < kDepth; ++d) meta.ptrs[d][at] = entry.ptrs[d];
    meta.numel[at] = entry.numel;
    meta.extra[at] = entry.extra;
  };
  for (int64_t i = 0; i < count; ++i) {
    const TensorListEntry<kDepth, Extra>& entry = tensors[i];
    if (entry.numel <= 0) continue;
    const int64_t chunks = ceil_div(entry.numel, chunk_size);
    if (chunks > INT32_MAX) return cudaErrorInvalidValue;
    place(++slot, entry);
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_tensor[blocks] = static_cast<uint8_t>(slot);
      meta.block_chunk[blocks] = static_cast<int32_t>(c);
      ++blocks;
      const bool last_chunk = c == chunks - 1;
      const bool table_full = last_chunk && slot == Meta::kMaxTensors - 1;
      if (blocks == Meta::kMaxBlocks || table_full) {
        FUSEDLM_RETURN_IF_ERROR(launch(meta, blocks));
        blocks = 0;
        if (last_chunk) {
          slot = -1;
        } else {  // the rest of this tensor's chunks go on in slot 0 of the next launch
          slot = 0;
          place(0, entry);
        }
      }
    }
  }
  return blocks > 0 ? launch(meta, blocks) : cudaSuccess;
}

// Runs functor over every chunk of tensors[0, count), skipping empty tensors, in as few launches
// as the table allows, on `stream`. Returns the first launch error.
template <int kDepth, typename Extra, typename Functor>
cudaError_t multi_tensor_apply(const TensorListEntry<kDepth, Extra>* tensors, int64_t count,
                               const Functor& functor, cudaStream_t stream,
                               int64_t chunk_size = kMtaChunkElems) {
  using Meta = TensorListMeta<kDepth, Extra>;
  static_assert(sizeof(int64_t) + sizeof(Meta) + sizeof(Functor) <= kMtaArgBytes,
                "multi_tensor_apply: kernel arguments over 4 KiB");
  static_assert(Meta::kMaxTensors >= 8, "multi_tensor_apply: table too small");
  return plan_multi_tensor_launches(
      tensors, count, chunk_size, [&](const Meta& meta, int blocks) -> cudaError_t {
        auto kernel = multi_tensor_kernel<Meta, Functor>;
        FUSEDLM_LAUNCH(kernel, blocks, kMtaThreads, 0, stream)(chunk_size, meta, functor);
        return cudaGetLastError();
      });
}

}  // namespace fusedlm::cuda
