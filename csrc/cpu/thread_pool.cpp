// The thread pool behind parallel_for (thread_pool.h). A fixed set of workers, started on the first job big
// enough to need them and restarted only when the thread count changes; between jobs they spin briefly, then
// sleep. One caller at a time holds the pool; any other runs its chunks on its own thread rather than wait.
#include "thread_pool.h"

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include "simd.h"  // the intrinsics header, for _mm_pause

#if defined(__x86_64__) || defined(__i386__)
#define SMOLVLM_PAUSE() _mm_pause()
#else
#define SMOLVLM_PAUSE() std::this_thread::yield()
#endif

namespace smolvlm_cpu {
namespace {

// The CPUs this process may run on (its affinity: taskset, cgroup cpusets, os.sched_setaffinity), not the
// machine's: threads beyond them only take turns on the same cores. The set grows until the kernel's CPU mask
// fits (a fixed cpu_set_t holds 1024 CPUs, and sched_getaffinity fails with EINVAL where the kernel has more).
int affinity_cpus() {
#if defined(__linux__)
    for (int n = 1024; n <= (1 << 20); n *= 2) {
        cpu_set_t* set = CPU_ALLOC(n);
        if (set == nullptr) break;
        const size_t size = CPU_ALLOC_SIZE(n);
        const bool ok = sched_getaffinity(0, size, set) == 0;
        const int err = errno;
        const int count = ok ? CPU_COUNT_S(size, set) : 0;
        CPU_FREE(set);
        if (ok) return std::max(1, count);
        if (err != EINVAL) break;
    }
#endif
    return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

// SMOLVLM_FAST_NUM_THREADS when it is a positive number, else the CPUs this process may run on; read when the
// pool is first sized (the first parallel job or get_num_threads), and again by set_num_threads(0).
int default_threads() {
    if (const char* env = std::getenv("SMOLVLM_FAST_NUM_THREADS")) {
        const int n = std::atoi(env);
        if (n > 0) return n;
    }
    return affinity_cpus();
}

int64_t spin_microseconds() {
    if (const char* env = std::getenv("SMOLVLM_FAST_SPIN_US")) return std::max(0, std::atoi(env));
    return 500;
}

// A fixed set of workers that share a job of n chunks: every thread (the caller too) claims chunks until none
// are left, so a worker that is slow to wake (a busy machine) costs nothing but its absence. A chunk is claimed
// by a compare-and-swap on `ticket_` = (job << 32 | next chunk), so a worker that wakes after its job is over
// claims nothing and never touches the job's (by then dead) context. After a job, workers spin for a while
// (the next product usually follows within microseconds), then sleep on a condition variable.
class Pool {
public:
    explicit Pool(int threads) : threads_(threads), spin_(spin_microseconds()) {
        try {
            for (int i = 1; i < threads_; ++i) workers_.emplace_back([this] { loop(); });
        } catch (...) {  // could not start a thread: stop the ones that did, then report it
            stop();
            throw;
        }
    }

    ~Pool() { stop(); }

    void run(ChunkFn fn, void* ctx, int64_t n_chunks) {
        const uint64_t last = ticket_.load(std::memory_order_relaxed) >> 32;
        // Close the last job before changing n_chunks_: a worker still holding a stale ticket of it (index = its
        // chunk count) would otherwise compare that index with the new, larger n_chunks_, win its compare-and-swap
        // on the unchanged ticket and run a chunk of no job (a stale fn_, and done_ one past n_chunks: the wait
        // below never ends). Closed, its swap fails and its next load reads "no chunk left".
        ticket_.store((last << 32) | kNoChunk);
        fn_ = fn;
        ctx_ = ctx;
        n_chunks_.store(n_chunks, std::memory_order_release);  // after the close, for a worker that reads it
        done_.store(0, std::memory_order_relaxed);
        const uint64_t job = last + 1;
        ticket_.store(job << 32);  // seq_cst: publishes the job, ordered before reading sleepers_
        if (sleepers_.load() > 0) {
            { std::lock_guard<std::mutex> lock(mu_); }
            cv_.notify_all();
        }
        work(job);
        // the last chunks are in other threads' hands; yield now and then in case one of them waits for a core
        for (int i = 1; done_.load(std::memory_order_acquire) != n_chunks; ++i) {
            if (i % 1024 == 0) std::this_thread::yield();
            else SMOLVLM_PAUSE();
        }
    }

private:
    void stop() {
        stop_.store(true);
        ticket_.fetch_add(uint64_t(1) << 32);
        { std::lock_guard<std::mutex> lock(mu_); }
        cv_.notify_all();
        for (auto& t : workers_) t.join();
    }

    void work(uint64_t job) {
        uint64_t t = ticket_.load(std::memory_order_acquire);
        for (;;) {
            if ((t >> 32) != job || int64_t(t & kNoChunk) >= n_chunks_.load(std::memory_order_acquire)) return;
            if (!ticket_.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel, std::memory_order_acquire))
                continue;
            fn_(ctx_, int64_t(t & kNoChunk));
            done_.fetch_add(1, std::memory_order_release);
            t = ticket_.load(std::memory_order_acquire);
        }
    }

    void loop() {
        uint64_t seen = 0;  // the job number when the pool was made: a job run before this thread starts is not missed
        for (;;) {
            seen = wait_for_job(seen);
            if (stop_.load()) return;
            work(seen);
        }
    }

    uint64_t wait_for_job(uint64_t seen) {
        using clock = std::chrono::steady_clock;
        const auto job = [&] { return ticket_.load(std::memory_order_acquire) >> 32; };
        const auto until = clock::now() + std::chrono::microseconds(spin_);
        for (int i = 0;; ++i) {
            if (const uint64_t j = job(); j != seen) return j;
            if ((i & 63) == 63 && clock::now() > until) break;
            SMOLVLM_PAUSE();
        }
        std::unique_lock<std::mutex> lock(mu_);
        sleepers_.fetch_add(1);
        cv_.wait(lock, [&] { return job() != seen; });
        sleepers_.fetch_sub(1);
        return job();
    }

    static constexpr uint64_t kNoChunk = 0xffffffffu;  // a ticket's chunk index past every job's chunks

    const int threads_;
    const int64_t spin_;
    std::vector<std::thread> workers_;
    std::atomic<uint64_t> ticket_{0};
    std::atomic<int64_t> n_chunks_{0};
    std::atomic<int64_t> done_{0};
    std::atomic<int> sleepers_{0};
    std::atomic<bool> stop_{false};
    ChunkFn fn_ = nullptr;
    void* ctx_ = nullptr;
    std::mutex mu_;
    std::condition_variable cv_;
};

// Leaked on purpose: no destructor runs at interpreter exit while workers sleep. A forked child gets a new one.
std::mutex* g_run_mu = new std::mutex;
Pool* g_pool = nullptr;
std::atomic<int> g_threads{0};  // 0: not decided yet (read without the lock only to size chunks)

void after_fork_in_child() {
    g_run_mu = new std::mutex;  // the parent's may have been held by a thread that does not exist here
    g_pool = nullptr;           // its workers do not exist here either
}

const bool g_atfork = [] { return pthread_atfork(nullptr, nullptr, after_fork_in_child) == 0; }();

}  // namespace

// On the pool when there is enough work (multiply-adds) and no other caller holds it, else on this thread: a
// second caller (another Python thread, or a task of this job) never waits for the first.
void parallel_for(ChunkFn fn, void* ctx, int64_t n_chunks, int64_t work) {
    constexpr int64_t kMinParallelWork = 1 << 16;  // below this, waking a thread costs more than it saves
    if (n_chunks > 1 && n_chunks < int64_t(0xffffffffu) && work >= kMinParallelWork) {  // a ticket counts 32 bits
        std::unique_lock<std::mutex> lock(*g_run_mu, std::try_to_lock);
        if (lock.owns_lock()) {
            if (g_threads.load() == 0) g_threads = default_threads();
            if (g_threads.load() > 1) {
                try {
                    if (!g_pool) g_pool = new Pool(g_threads.load());
                } catch (const std::exception&) {  // no threads to be had: this one does the work
                }
                if (g_pool) {
                    g_pool->run(fn, ctx, n_chunks);
                    return;
                }
            }
        }
    }
    for (int64_t c = 0; c < n_chunks; ++c) fn(ctx, c);
}

void set_num_threads(int n) {
    std::lock_guard<std::mutex> lock(*g_run_mu);
    const int want = n > 0 ? n : default_threads();
    if (want == g_threads) return;
    delete g_pool;
    g_pool = nullptr;
    g_threads = want;
}

int get_num_threads() {
    std::lock_guard<std::mutex> lock(*g_run_mu);
    if (g_threads == 0) g_threads = default_threads();
    return g_threads;
}

int pool_threads() {
    const int n = g_threads.load();
    return n > 0 ? n : get_num_threads();  // decided once, under the lock; after that it is never 0 again
}

}  // namespace smolvlm_cpu
