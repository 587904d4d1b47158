/* A stress test of nn/csrc/pool.h, run by tests/test_kernel_pool.py: back-to-back loops of different sizes, each
 * with its context on the caller's stack (as the kernels' are), every item counted. Any chunk run twice, never
 * run, still running after its loop returned, or run with another loop's context is counted as a failure.
 *
 *   pool_stress ITERATIONS THREADS   ->  prints "loops L twice T missed M stale S", exits 1 if T + M + S > 0 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pool.h"

typedef struct {
    long id; /* the loop's number; -1 once its caller has returned */
    int64_t n;
    int *count;
} Loop;

static _Atomic long current;  /* the loop now running */
static _Atomic long stale;    /* chunks run with a context that is not the current loop's, or out of its range */

static void count_items(void *arg, int64_t begin, int64_t end, int tid) {
    const Loop *loop = (const Loop *)arg;
    (void)tid;
    if (loop->id != atomic_load(&current) || begin < 0 || begin >= end || end > loop->n) {
        atomic_fetch_add(&stale, 1);
        return;
    }
    for (int64_t i = begin; i < end; i++) loop->count[i]++;
}

static long twice, missed;

static void one_loop(long id, int64_t n, int64_t nchunks, int threads, int *count) {
    Loop loop = {id, n, count};
    memset(count, 0, sizeof(int) * (size_t)n);
    atomic_store(&current, id);
    pool_for_chunks(n, nchunks, threads, count_items, &loop);
    for (int64_t i = 0; i < n; i++) {
        twice += count[i] > 1;
        missed += count[i] == 0;
    }
    loop.id = -1;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: pool_stress ITERATIONS THREADS\n");
        return 2;
    }
    const long iterations = atol(argv[1]);
    const int threads = atoi(argv[2]);
    static int count[64];
    for (long it = 1; it <= iterations; it++) { /* a small loop, then a larger one with more chunks */
        one_loop(2 * it, 3 + it % 5, 2 + it % 3, threads, count);
        one_loop(2 * it + 1, 40 + it % 17, 8 + it % 9, threads, count);
    }
    printf("loops %ld twice %ld missed %ld stale %ld\n", 2 * iterations, twice, missed, atomic_load(&stale));
    return twice + missed + atomic_load(&stale) ? 1 : 0;
}
