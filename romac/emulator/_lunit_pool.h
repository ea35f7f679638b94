/* The L-Unit kernel's threads: a small persistent pool that runs the chunks of one product (ranges of output
 * rows) on the calling thread and up to threads - 1 helpers.
 *
 * Why not OpenMP: a parallel region ends at a barrier that waits for every thread of the team, so when another
 * process holds the other core, a product waits until the scheduler gives the late helper a slice (milliseconds,
 * for a product of tens of microseconds); and libgomp's helpers either spin for a long time between products or
 * sleep and take a futex wake-up at every product (docs/performance.md measures both). Here the chunks are
 * claimed one at a time from a shared counter, and the caller waits only for chunks a helper has claimed, never
 * for a helper to turn up: if none does, the caller computes every chunk. A helper spins for a millisecond after a
 * product (the Python between two products of a decode step takes tens of microseconds), then sleeps. When the caller had to wait
 * long for a chunk a helper claimed (another process took the helper's core), the next products run on the
 * calling thread alone, more of them after each such stall, fewer after each product that went well. Which
 * thread computes a chunk never changes its bits: chunks are whole output rows. */
#ifndef LUNIT_POOL_H
#define LUNIT_POOL_H

#include <stddef.h>
#include <stdint.h>

/* Computes chunk `chunk` of `job`; `scratch` is this thread's buffer of at least the job's scratch bytes. */
typedef void (*lunit_chunk_fn)(const void *job, int64_t chunk, void *scratch);

/* The most chunks one product may have (the claim counter's field width, less a claim past the end for each of at
 * most 64 threads). */
#define LUNIT_MAX_CHUNKS (((int64_t)1 << 22) - 65)

/* Runs chunks 0 .. n_chunks - 1 of job on the calling thread and at most threads - 1 helpers (started on first
 * need); returns when all are done: 0, or -1 if a thread could not allocate its scratch (some chunks were then not
 * computed). With threads <= 1, or while another thread of the process is running a product, the calling thread
 * computes them all. */
int lunit_run(lunit_chunk_fn fn, const void *job, int64_t n_chunks, size_t scratch_bytes, int threads);

/* How long a helper spins for the next product before it sleeps, in microseconds (returns the previous value). */
int64_t lunit_spin_us(int64_t us);

#endif
