/* The L-Unit kernel's thread pool (see _lunit_pool.h for what it does and why). */
#define _POSIX_C_SOURCE 200809L /* clock_gettime under -std=c11 */
#include "_lunit_pool.h"

#include <stdlib.h>

/* Runs every chunk on the calling thread (no helpers: threads <= 1, a busy pool, or no POSIX threads). */
static int run_inline(lunit_chunk_fn fn, const void *job, int64_t n_chunks, size_t scratch_bytes) {
    void *scratch = malloc(scratch_bytes ? scratch_bytes : 1);
    if (!scratch) return -1;
    for (int64_t c = 0; c < n_chunks; c++) fn(job, c, scratch);
    free(scratch);
    return 0;
}

#if defined(_WIN32) || defined(__STDC_NO_ATOMICS__)

int lunit_run(lunit_chunk_fn fn, const void *job, int64_t n_chunks, size_t scratch_bytes, int threads) {
    (void)threads;
    return run_inline(fn, job, n_chunks, scratch_bytes);
}

int64_t lunit_spin_us(int64_t us) {
    (void)us;
    return 0;
}

#else

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <time.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ __volatile__("yield")
#else
#define CPU_RELAX() ((void)0)
#endif

/* How long a helper spins for the next product: longer than the Python between two products of a decode step
 * (up to ~100 us around attention, more on a slow moment). SmolLM2's decode on two threads, helpers spinning
 * 100 / 300 / 1000 us: 15.9 / 15.0 / 13.9 ms a step (docs/performance.md); a sleeping helper costs a wake-up. */
#define SPIN_NS 1000000
#define MAX_HELPERS 63 /* with the caller, the 64 threads LUNIT_MAX_CHUNKS leaves room for */
/* The claim counter: [generation: 20 bits][chunks of the product: 22][next chunk: 22]. One atomic word, so a
 * helper that claims a chunk learns in the same step which product it belongs to and whether it exists. */
#define IDX_BITS 22
#define FIELD_MASK ((UINT64_C(1) << IDX_BITS) - 1)
#define GEN_SHIFT (2 * IDX_BITS)

static struct {
    pthread_mutex_t submit;     /* one product at a time */
    pthread_mutex_t lock;       /* with wake: a helper's sleep */
    pthread_cond_t wake;
    _Atomic uint64_t ticket;    /* see above */
    _Atomic int64_t done;       /* chunks of the current product computed */
    _Atomic int sleepers;       /* helpers asleep (or about to be) on wake */
    _Atomic int wanted;         /* helpers the current product may use */
    _Atomic int failed;         /* a helper could not allocate its scratch */
    _Atomic int64_t spin_ns;
    /* the current product: written before the ticket that announces it, stable until all its chunks are done */
    lunit_chunk_fn fn;
    const void *job;
    size_t scratch_bytes;
    int started;                /* helpers running (only the submitter changes it, holding submit) */
    /* when another process holds a helper's core (only the submitter changes these, holding submit) */
    int64_t alone;              /* products still to run on the calling thread alone */
    int64_t backoff;            /* how many the next stall sends there */
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, 0, 0,
          SPIN_NS, NULL, NULL, 0, 0, 0, 1};

/* A product whose caller waited this long for a helper's chunk after finishing its own share lost its helper to
 * another process (a wake-up from sleep takes tens of microseconds; a preempted thread is back after a scheduler
 * slice, milliseconds). */
#define STALL_NS 500000
#define MAX_BACKOFF 4096

static inline uint64_t ticket_gen(uint64_t t) { return t >> GEN_SHIFT; }
static inline int64_t ticket_n(uint64_t t) { return (int64_t)((t >> IDX_BITS) & FIELD_MASK); }
static inline int64_t ticket_idx(uint64_t t) { return (int64_t)(t & FIELD_MASK); }

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Claims and computes chunks of the product the ticket announces until none is left; *scratch (of *have bytes) is
 * grown to the product's need. Returns the generation it worked on. */
static uint64_t work(void **scratch, size_t *have) {
    for (;;) {
        uint64_t t = atomic_fetch_add_explicit(&pool.ticket, 1, memory_order_acq_rel);
        if (ticket_idx(t) >= ticket_n(t)) return ticket_gen(t);
        /* a chunk of this product is ours: the submitter waits for it, so the product's fields stay put */
        if (*have < pool.scratch_bytes || !*scratch) {
            void *grown = realloc(*scratch, pool.scratch_bytes ? pool.scratch_bytes : 1);
            if (grown) {
                *scratch = grown;
                *have = pool.scratch_bytes;
            } else {
                atomic_store(&pool.failed, 1);
            }
        }
        if (*have >= pool.scratch_bytes && *scratch) pool.fn(pool.job, ticket_idx(t), *scratch);
        atomic_fetch_add_explicit(&pool.done, 1, memory_order_release);
    }
}

static void *helper(void *arg) {
    int id = (int)(intptr_t)arg;
    void *scratch = NULL;
    size_t have = 0;
    uint64_t seen = ticket_gen(atomic_load(&pool.ticket));
    for (;;) {
        /* wait for a new product: spin a while, then sleep */
        int64_t until = now_ns() + atomic_load_explicit(&pool.spin_ns, memory_order_relaxed);
        for (int k = 0; ticket_gen(atomic_load_explicit(&pool.ticket, memory_order_acquire)) == seen; k++) {
            if ((k & 63) == 63 && now_ns() >= until) {
                pthread_mutex_lock(&pool.lock);
                atomic_fetch_add(&pool.sleepers, 1);  /* seq_cst, then the ticket re-read: no lost wake-up */
                while (ticket_gen(atomic_load(&pool.ticket)) == seen) pthread_cond_wait(&pool.wake, &pool.lock);
                atomic_fetch_sub(&pool.sleepers, 1);
                pthread_mutex_unlock(&pool.lock);
                break;
            }
            CPU_RELAX();
        }
        uint64_t t = atomic_load_explicit(&pool.ticket, memory_order_acquire);
        if (id < atomic_load_explicit(&pool.wanted, memory_order_relaxed))
            seen = work(&scratch, &have);
        else
            seen = ticket_gen(t);
    }
    return NULL;
}

/* In a child of fork() the helpers do not exist: start afresh. */
static void after_fork_child(void) {
    pthread_mutex_init(&pool.submit, NULL);
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
    atomic_store(&pool.sleepers, 0);
    pool.started = 0;
    pool.alone = 0;
    pool.backoff = 1;
}

static pthread_once_t fork_handler = PTHREAD_ONCE_INIT;
static void install_fork_handler(void) { pthread_atfork(NULL, NULL, after_fork_child); }

int lunit_run(lunit_chunk_fn fn, const void *job, int64_t n_chunks, size_t scratch_bytes, int threads) {
    int helpers = threads - 1;
    if (helpers > MAX_HELPERS) helpers = MAX_HELPERS;
    if (helpers > n_chunks - 1) helpers = (int)(n_chunks - 1);
    if (helpers < 1 || n_chunks >= LUNIT_MAX_CHUNKS || pthread_mutex_trylock(&pool.submit) != 0)
        return run_inline(fn, job, n_chunks, scratch_bytes);
    if (pool.alone > 0) { /* a helper stalled a product lately: the next ones without them, then try again */
        pool.alone--;
        pthread_mutex_unlock(&pool.submit);
        return run_inline(fn, job, n_chunks, scratch_bytes);
    }
    pthread_once(&fork_handler, install_fork_handler);
    while (pool.started < helpers) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int err = pthread_create(&th, &attr, helper, (void *)(intptr_t)pool.started);
        pthread_attr_destroy(&attr);
        if (err) break;
        pool.started++;
    }
    void *scratch = malloc(scratch_bytes ? scratch_bytes : 1);
    if (!scratch) {
        pthread_mutex_unlock(&pool.submit);
        return -1;
    }
    pool.fn = fn;
    pool.job = job;
    pool.scratch_bytes = scratch_bytes;
    atomic_store(&pool.done, 0);
    atomic_store(&pool.failed, 0);
    atomic_store_explicit(&pool.wanted, helpers, memory_order_relaxed);
    uint64_t gen = (ticket_gen(atomic_load(&pool.ticket)) + 1) & ((UINT64_C(1) << (64 - GEN_SHIFT)) - 1);
    atomic_store(&pool.ticket, (gen << GEN_SHIFT) | ((uint64_t)n_chunks << IDX_BITS));  /* seq_cst: see helper */
    if (atomic_load(&pool.sleepers) > 0) {
        pthread_mutex_lock(&pool.lock);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.lock);
    }
    size_t have = scratch_bytes;
    work(&scratch, &have);
    /* only chunks a helper has claimed are waited for; each is being computed */
    int64_t waited_from = 0;
    for (int k = 1; atomic_load_explicit(&pool.done, memory_order_acquire) < n_chunks; k++) {
        if (k == 1) waited_from = now_ns();
        if (k % 4096 == 0) sched_yield();  /* a helper was preempted in its chunk */
        CPU_RELAX();
    }
    if (waited_from && now_ns() - waited_from > STALL_NS) {
        pool.alone = pool.backoff;
        pool.backoff = pool.backoff * 2 < MAX_BACKOFF ? pool.backoff * 2 : MAX_BACKOFF;
    } else if (pool.backoff > 1) {
        pool.backoff /= 2;
    }
    int failed = atomic_load(&pool.failed);
    free(scratch);
    pthread_mutex_unlock(&pool.submit);
    return failed ? -1 : 0;
}

int64_t lunit_spin_us(int64_t us) {
    int64_t before = atomic_load(&pool.spin_ns) / 1000;
    if (us >= 0) atomic_store(&pool.spin_ns, us * 1000);
    return before;
}

#endif
