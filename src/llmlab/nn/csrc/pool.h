/* The kernels' parallel loops: a small thread pool in place of OpenMP's parallel regions.
 *
 * Why not OpenMP. A `#pragma omp parallel` region ends in a barrier that waits for every thread of its team,
 * including one the OS has descheduled because another process wants its core. A decode step of SmolLM2-135M is
 * about 150 such regions of a few microseconds each, so on a 2-core machine beside a training process every region
 * waited for a scheduler time slice: 2 threads took 1.5 s per token where 1 thread took 6.5 ms (README, "Threads on
 * a shared machine"; benchmarks/contention.py).
 *
 * Here the calling thread works too, claiming chunks of the loop one at a time, and it waits only for chunks that
 * another thread has claimed and not yet finished. A worker that has not woken up claims nothing and so holds
 * nothing up: under contention the caller does the loop alone, at about the speed of one thread. Which thread
 * runs a chunk never changes what the chunk computes (every loop here writes disjoint outputs), so the results
 * are the same bits at any thread count.
 *
 *   ticket = generation << 32 | next chunk   one atomic word: a claim is a compare-and-swap on it, so a worker
 *                                            still holding an old generation cannot claim a chunk of the next
 *
 * A claim reads the loop's values (fn, ctx, n, chunk, nchunks) before its compare-and-swap, so the ticket must
 * change before the next loop overwrites them: a caller first closes the last loop (its chunk part set to
 * POOL_CLOSED, more than any loop's chunks), then writes its values, then publishes the new generation. Without
 * the close, a worker holding the finished loop's ticket (chunk part = its nchunks) could read the new loop's
 * larger nchunks, win the compare-and-swap on the old ticket and run a chunk with a mix of both loops' values, or
 * count a chunk into the new loop's `finished` so that its caller returns while a chunk still runs: the one
 * crash this pool had (tests/pool_stress.c catches it in a second).
 *
 * Workers spin for POOL_SPIN_NS after a loop (a decode step's next loop starts microseconds later), then sleep on
 * a condition variable of their own until a loop has room for them (a loop of fewer threads wakes no more). A
 * spinning worker is one more runnable thread, so on a shared machine it time-shares the caller's core with the
 * other process: a worker that finds itself preempted while spinning (a spin check POOL_PREEMPTED_NS late) sleeps
 * right after each loop for POOL_SHARED_NS. A loop started by a second calling thread while one runs runs serially
 * on its caller. A child after fork() has none of the parent's workers: its locks are re-initialised and its first
 * loop starts a pool of its own. Each kernel library has its own pool (the header is included, not linked). */
#ifndef LLMLAB_POOL_H
#define LLMLAB_POOL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define POOL_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define POOL_RELAX() __asm__ __volatile__("yield")
#else
#define POOL_RELAX() ((void)0)
#endif

/* fn(ctx, begin, end, tid): items [begin, end) of the loop, on thread tid in [0, nthreads) (0: the caller) */
typedef void (*pool_fn)(void *ctx, int64_t begin, int64_t end, int tid);

#define POOL_MAX_THREADS 256
#define POOL_CLOSED 0xFFFFFFFFu    /* a closed loop's chunk part: no loop has this many chunks */
#define POOL_MAX_CHUNKS 0x7FFFFFFF
#define POOL_CHUNKS_PER_THREAD 4 /* claims per thread and loop: more balance better, each is a contended CAS */
#define POOL_SPIN_NS 2000000      /* 2 ms of spinning after a loop, about libgomp's default */
#define POOL_PREEMPTED_NS 200000  /* a spin check this late: the OS took the core away from the worker */
#define POOL_SHARED_NS 100000000  /* then no spinning for 100 ms: the core is wanted by another process */

static struct {
    pthread_mutex_t lock; /* guards sleeping and starting workers */
    pthread_mutex_t busy; /* one loop at a time */
    int started;          /* workers started: thread ids 1..started */
    int atfork;           /* the fork handler is registered */
    _Alignas(64) _Atomic uint64_t ticket; /* claimed by every thread: a cache line of its own */
    _Alignas(64) _Atomic int64_t finished; /* chunks of the current loop done */
    _Alignas(64) char pad;
    /* the current loop, written by its caller before it publishes the generation */
    _Atomic(pool_fn) fn;
    _Atomic(void *) ctx;
    _Atomic int64_t n, chunk, nchunks;
    _Atomic int nthreads;
    /* each worker sleeps on its own condition, so a loop wakes only the workers it has room for */
    pthread_cond_t wake[POOL_MAX_THREADS];
    _Atomic int asleep[POOL_MAX_THREADS];
} pool = {.lock = PTHREAD_MUTEX_INITIALIZER, .busy = PTHREAD_MUTEX_INITIALIZER};

static int64_t pool_now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* Claim one chunk of the loop in ticket t and run it; 0 when nothing of the loop is left for thread tid, else 1
 * (it ran the chunk, or another thread claimed it first: look again). */
static int pool_run_one(uint64_t t, int tid) {
    const int64_t c = (int64_t)(uint32_t)t;
    if (c >= atomic_load(&pool.nchunks) || tid >= atomic_load(&pool.nthreads)) return 0;
    /* read before the claim: a successful compare-and-swap proves no new loop was published since t was read,
     * and a new loop is published only after every chunk of this one is done, so these are t's loop's values */
    const pool_fn fn = atomic_load(&pool.fn);
    void *ctx = atomic_load(&pool.ctx);
    const int64_t n = atomic_load(&pool.n), chunk = atomic_load(&pool.chunk);
    if (!atomic_compare_exchange_strong(&pool.ticket, &t, t + 1)) return 1;
    const int64_t begin = c * chunk, end = begin + chunk < n ? begin + chunk : n;
    fn(ctx, begin, end, tid);
    atomic_fetch_add(&pool.finished, 1);
    return 1;
}

/* A worker: chunks of each new loop while there are any, then it spins POOL_SPIN_NS for the next loop, then sleeps. */
static void *pool_worker(void *arg) {
    const int tid = (int)(intptr_t)arg;
    uint32_t seen = (uint32_t)(atomic_load(&pool.ticket) >> 32); /* the last generation with nothing left */
    int64_t idle_since = pool_now_ns(), checked = idle_since, shared_until = 0, spin_ns = 0;
    for (unsigned spins = 0;; spins++) {
        uint64_t t = atomic_load(&pool.ticket);
        uint32_t gen = (uint32_t)(t >> 32);
        if (gen != seen) {
            const int invited = tid < atomic_load(&pool.nthreads);
            while (pool_run_one(t, tid)) {
                t = atomic_load(&pool.ticket);
                if ((uint32_t)(t >> 32) != gen) break;
            }
            if ((uint32_t)(t >> 32) != gen) continue; /* a new loop already: take part in it */
            seen = gen;
            idle_since = checked = pool_now_ns();
            spin_ns = invited ? POOL_SPIN_NS : 0; /* a loop with no room for this worker: back to sleep */
        }
        POOL_RELAX();
        if (spins & 255) continue;
        const int64_t now = pool_now_ns();
        if (now - checked > POOL_PREEMPTED_NS) shared_until = now + POOL_SHARED_NS;
        checked = now;
        if (now - idle_since < (now < shared_until ? 0 : spin_ns)) continue;
        pthread_mutex_lock(&pool.lock);
        atomic_store(&pool.asleep[tid], 1);
        for (;;) { /* until a loop with room for this worker */
            const uint64_t t2 = atomic_load(&pool.ticket);
            if ((uint32_t)(t2 >> 32) != seen) {
                if (tid < atomic_load(&pool.nthreads)) break;
                seen = (uint32_t)(t2 >> 32);
            }
            pthread_cond_wait(&pool.wake[tid], &pool.lock);
        }
        atomic_store(&pool.asleep[tid], 0);
        pthread_mutex_unlock(&pool.lock);
        checked = pool_now_ns();
    }
    return NULL;
}

/* In a child after fork() the workers are gone and the locks may be held by threads that no longer exist. */
static void pool_after_fork_in_child(void) {
    pthread_mutex_init(&pool.lock, NULL);
    pthread_mutex_init(&pool.busy, NULL);
    for (int i = 1; i <= pool.started; i++) {
        pthread_cond_init(&pool.wake[i], NULL);
        atomic_store(&pool.asleep[i], 0);
    }
    pool.started = 0;
}

/* Start workers up to ids 1..want; the number started (fewer when the OS refuses a thread). */
static int pool_start(int want) {
    if (want > POOL_MAX_THREADS - 1) want = POOL_MAX_THREADS - 1;
    pthread_mutex_lock(&pool.lock);
    if (!pool.atfork) pool.atfork = !pthread_atfork(NULL, NULL, pool_after_fork_in_child);
    while (pool.started < want) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_cond_init(&pool.wake[pool.started + 1], NULL);
        atomic_store(&pool.asleep[pool.started + 1], 0);
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int rc = pthread_create(&th, &attr, pool_worker, (void *)(intptr_t)(pool.started + 1));
        pthread_attr_destroy(&attr);
        if (rc) break;
        pool.started++;
    }
    const int started = pool.started;
    pthread_mutex_unlock(&pool.lock);
    return started;
}

/* fn over items [0, n) in nchunks chunks (about: equal sizes) on up to nthreads threads, the caller one of them;
 * returns when every item is done. */
static void pool_for_chunks(int64_t n, int64_t nchunks, int nthreads, pool_fn fn, void *ctx) {
    if (n <= 0) return;
    if (nthreads > POOL_MAX_THREADS) nthreads = POOL_MAX_THREADS;
    if (nthreads <= 1 || n == 1 || pthread_mutex_trylock(&pool.busy)) {
        fn(ctx, 0, n, 0);
        return;
    }
    const int workers = pool_start(nthreads - 1);
    if (workers + 1 < nthreads) nthreads = workers + 1;
    if (nchunks > n) nchunks = n;
    if (nchunks < 1) nchunks = 1;
    if (nchunks > POOL_MAX_CHUNKS) nchunks = POOL_MAX_CHUNKS;
    const int64_t chunk = (n + nchunks - 1) / nchunks;
    nchunks = (n + chunk - 1) / chunk;
    atomic_fetch_or(&pool.ticket, POOL_CLOSED); /* close the last loop before its values are overwritten */
    atomic_store(&pool.fn, fn);
    atomic_store(&pool.ctx, ctx);
    atomic_store(&pool.n, n);
    atomic_store(&pool.chunk, chunk);
    atomic_store(&pool.nchunks, nchunks);
    atomic_store(&pool.nthreads, nthreads);
    atomic_store(&pool.finished, 0);
    const uint64_t gen = (atomic_load(&pool.ticket) >> 32) + 1;
    atomic_store(&pool.ticket, (gen & 0xFFFFFFFFu) << 32);
    int locked = 0;
    for (int w = 1; w < nthreads; w++) /* wake the sleepers this loop has room for */
        if (atomic_load(&pool.asleep[w])) {
            if (!locked) pthread_mutex_lock(&pool.lock);
            locked = 1;
            pthread_cond_signal(&pool.wake[w]);
        }
    if (locked) pthread_mutex_unlock(&pool.lock);
    while (pool_run_one(atomic_load(&pool.ticket), 0)) {
    }
    while (atomic_load(&pool.finished) < nchunks) POOL_RELAX();
    pthread_mutex_unlock(&pool.busy);
}

/* The same in POOL_CHUNKS_PER_THREAD chunks per thread: for items of about equal cost. */
static inline void pool_for(int64_t n, int nthreads, pool_fn fn, void *ctx) {
    pool_for_chunks(n, (int64_t)nthreads * POOL_CHUNKS_PER_THREAD, nthreads, fn, ctx);
}

#endif
