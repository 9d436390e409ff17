// The CUDA emulator's execution model (csrc/cuda/emu/cuda_emu.h has the CUDA names on top of it).
//
// A launch runs its grid's blocks one after another; every CUDA thread of a block is an OS thread, created once per
// launch and reused for each block. __syncthreads is a barrier of the block's threads, each warp collective
// (__shfl_*_sync, mma.sync) a barrier of the warp's 32 threads around an exchange buffer. Threads that return from
// the kernel leave the barriers (as exited threads do on the GPU). A barrier that waits longer than kStallSeconds
// aborts with a message: some thread of the block or warp never arrives (a __syncthreads or a shuffle inside
// divergent code, which CUDA leaves undefined).
//
// Shared memory: each SMOLVLM_SHARED declaration of a kernel (the n-th one a thread passes in its block) is its own
// heap allocation of the launch, made by the first thread that gets there (so AddressSanitizer sees its bounds), and
// the dynamic shared memory one more. Before each block all of it is filled with 0xff bytes (NaN as fp32, fp16 and
// bf16): a read of shared memory the block did not write shows up as NaN. More than 48 KB of static shared memory in
// one kernel fails, as it does at nvcc's compile time.
#pragma once

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// the threads' own built-in variables
inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;

namespace smolvlm_emu {

constexpr int kStallSeconds = 120;
constexpr size_t kMaxStaticShared = 48 * 1024;

// Planted bugs, for tests/test_cuda_emu.py to show its checks catch them: SMOLVLM_EMU_PLANT=swapped_fragment (mma.h)
// or no_sync (__syncthreads does nothing). Read once; unset in any real use.
inline bool planted(const char* bug) {
  static const char* const plant = std::getenv("SMOLVLM_EMU_PLANT");
  return plant != nullptr && std::strcmp(plant, bug) == 0;
}

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "smolvlm CUDA emulator: %s (block %u,%u,%u thread %u,%u,%u)\n", what, blockIdx.x, blockIdx.y,
               blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z);
  std::abort();
}

// A reusable barrier of `expected` threads that threads may leave (drop) for the rest of a block.
class Barrier {
 public:
  void reset(int expected) {
    std::lock_guard<std::mutex> lock(mutex_);
    expected_ = expected;
    arrived_ = 0;
  }
  void arrive_and_wait(const char* what) {
    std::unique_lock<std::mutex> lock(mutex_);
    const uint64_t generation = generation_;
    if (++arrived_ == expected_) return release();
    if (!cv_.wait_for(lock, std::chrono::seconds(kStallSeconds), [&] { return generation_ != generation; })) fail(what);
  }
  void drop() {
    std::lock_guard<std::mutex> lock(mutex_);
    --expected_;
    if (arrived_ > 0 && arrived_ == expected_) release();
  }

 private:
  void release() {  // with mutex_ held
    arrived_ = 0;
    ++generation_;
    cv_.notify_all();
  }
  std::mutex mutex_;
  std::condition_variable cv_;
  int expected_ = 0, arrived_ = 0;
  uint64_t generation_ = 0;
};

// What the lanes of a warp hand each other in one collective: a shuffled value, or an MMA's A and B registers.
struct LaneSlot {
  uint64_t value;
  uint32_t a[4], b[2];
};

// One warp's barrier and exchange buffers. Two buffers used in turn make one barrier per collective enough: a lane
// writes buffer n % 2 in collective n only after every lane arrived at collective n - 1's barrier, i.e. finished
// reading buffer n % 2 in collective n - 2.
struct Warp {
  Barrier barrier;
  LaneSlot slots[2][32];
  int size = 32;
};

struct Block {
  Barrier fence, sync;
  std::vector<Warp> warps;
  std::mutex shared_mutex;
  std::vector<std::vector<unsigned char>> shared;  // per SMOLVLM_SHARED declaration, in the order the kernel has them
  size_t shared_bytes = 0;
  std::vector<unsigned char> dynamic_shared;
};

// the calling thread's place in its block
struct ThreadState {
  Block* block = nullptr;
  Warp* warp = nullptr;
  int lane = 0;
  unsigned collectives = 0;  // warp collectives done in this block (which exchange buffer is next)
  size_t declarations = 0;   // SMOLVLM_SHARED declarations passed in this block
};
inline thread_local ThreadState self;

inline void syncthreads() {
  if (!planted("no_sync")) self.block->sync.arrive_and_wait("__syncthreads never completed");
}

// Collective of the warp: the lane's slot is filled by `put`, then every lane reads the slots of the others.
template <typename Put, typename Get>
auto warp_exchange(unsigned mask, const char* what, Put put, Get get) {
  if (mask != 0xffffffffu || self.warp->size != 32) fail("a warp collective needs all 32 lanes (mask 0xffffffff)");
  LaneSlot (&slots)[32] = self.warp->slots[self.collectives++ % 2];
  put(slots[self.lane]);
  self.warp->barrier.arrive_and_wait(what);
  return get(slots);
}

template <typename T>
T shuffle(unsigned mask, T var, int src_lane) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a value of up to 8 bytes");
  return warp_exchange(
      mask, "a warp shuffle never completed", [&](LaneSlot& s) { std::memcpy(&s.value, &var, sizeof(T)); },
      [&](LaneSlot(&slots)[32]) {
        T out;
        std::memcpy(&out, &slots[src_lane & 31].value, sizeof(T));
        return out;
      });
}

// The calling thread's next SMOLVLM_SHARED array of the block (align: at most 16, what operator new gives).
inline void* shared_allocation(size_t bytes, size_t align) {
  if (align > 16) fail("shared memory aligned to more than 16 bytes is not emulated");
  Block& block = *self.block;
  const size_t k = self.declarations++;
  std::lock_guard<std::mutex> lock(block.shared_mutex);
  if (k == block.shared.size()) {
    block.shared_bytes += bytes;
    if (block.shared_bytes > kMaxStaticShared) fail("more than 48 KB of static shared memory");
    block.shared.emplace_back(bytes, 0xff);
  }
  if (k >= block.shared.size() || block.shared[k].size() != bytes) fail("threads declared different shared arrays");
  return block.shared[k].data();
}

template <typename Array>
Array& shared_array(size_t align = alignof(std::remove_all_extents_t<Array>)) {
  return *static_cast<Array*>(shared_allocation(sizeof(Array), align));
}

inline void fill_shared(Block& block) {
  for (std::vector<unsigned char>& array : block.shared) std::fill(array.begin(), array.end(), 0xff);
  std::fill(block.dynamic_shared.begin(), block.dynamic_shared.end(), 0xff);
}

// Before each block (one thread, the others waiting at the fence): fresh barriers and poisoned shared memory.
inline void prepare_block(Block& block, int threads) {
  block.sync.reset(threads);
  for (size_t w = 0; w < block.warps.size(); ++w) block.warps[w].barrier.reset(block.warps[w].size);
  fill_shared(block);
}

template <typename Body>
void run_thread(Block& block, dim3 grid, dim3 dims, int tid, const Body& body) {
  const int threads = static_cast<int>(dims.x * dims.y * dims.z);
  blockDim = dims;
  gridDim = grid;
  threadIdx = uint3{tid % dims.x, tid / dims.x % dims.y, tid / (dims.x * dims.y)};
  self.block = &block;
  self.warp = &block.warps[tid / 32];
  self.lane = tid % 32;
  const unsigned long long blocks = 1ull * grid.x * grid.y * grid.z;
  for (unsigned long long b = 0; b < blocks; ++b) {
    block.fence.arrive_and_wait("a block never finished");
    if (tid == 0) prepare_block(block, threads);
    block.fence.arrive_and_wait("a block never started");
    blockIdx = uint3{static_cast<unsigned>(b % grid.x), static_cast<unsigned>(b / grid.x % grid.y),
                     static_cast<unsigned>(b / (1ull * grid.x * grid.y))};
    self.collectives = 0;
    self.declarations = 0;
    body();
    block.sync.drop();  // returned from the kernel: no longer awaited by __syncthreads or the warp
    self.warp->barrier.drop();
  }
}

// kernel<<<grid, dims, shared_bytes>>>(args...): every thread gets its own copy of the arguments, as on the GPU.
template <typename... Params, typename... Args>
void launch(dim3 grid, dim3 dims, size_t shared_bytes, void (*kernel)(Params...), Args&&... args) {
  const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  const int threads = static_cast<int>(dims.x * dims.y * dims.z);
  if (threads < 1 || threads > 1024 || grid.x * grid.y * grid.z == 0) fail("bad launch configuration");
  Block block;
  block.warps = std::vector<Warp>((threads + 31) / 32);
  block.warps.back().size = threads - 32 * (static_cast<int>(block.warps.size()) - 1);
  block.dynamic_shared.resize(shared_bytes);
  block.fence.reset(threads);
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (int tid = 0; tid < threads; ++tid)
    pool.emplace_back([&, tid] { run_thread(block, grid, dims, tid, [&] { std::apply(kernel, params); }); });
  for (std::thread& t : pool) t.join();
}

template <typename T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(self.block->dynamic_shared.data());
}

}  // namespace smolvlm_emu
