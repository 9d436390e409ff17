// The CPU kernels' one thread pool: a job of n chunks shared by a fixed set of workers and the caller.
// Every kernel that splits its work (the matrix products, attention, the small ops, the decoder step) goes
// through parallel_for, so the process holds one set of threads however many kernels it runs.
#pragma once

#include <cstdint>

namespace smolvlm_cpu {

// Runs fn(ctx, c) for every chunk c < n_chunks: on the shared thread pool when `work` (multiply-adds) is
// enough to pay for waking it and no other caller holds it, else on this thread. Call it from outside the
// pool's tasks: a task that calls it runs its chunks on its own thread (the pool is held).
using ChunkFn = void (*)(void* ctx, int64_t chunk);
void parallel_for(ChunkFn fn, void* ctx, int64_t n_chunks, int64_t work);

void set_num_threads(int n);  // n <= 0: the default (SMOLVLM_FAST_NUM_THREADS, else the cores we may use)
int get_num_threads();
// get_num_threads() without waiting for the pool's lock, which a running job holds: for sizing a job's chunks.
int pool_threads();

}  // namespace smolvlm_cpu
