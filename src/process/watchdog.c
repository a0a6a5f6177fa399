/*
 * watchdog.c -- see watchdog.h.
 */
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>

#include "loop.h"
#include "runtime.h"
#include "watchdog.h"

/* One worker's entry. turned is written by the worker alone, with an
 * atomic store, and read by the master. The last request's fields are
 * written under seq (odd while they change), so the master keeps a copy
 * only when seq was even and the same before and after: a worker never
 * waits for the master. Aligned to a cache line: two workers writing
 * their own entries on every request must not share one. */
struct gw_beat {
    int64_t  turned;            /* us on the monotonic clock: the last
                                   mark (the master's at the start) */
    uint32_t seq;               /* odd while the fields below change */
    double   req_at;            /* s, monotonic: the last request's start
                                   (the loop's cached time) */
    char     method[24];        /* NUL-terminated, cut to fit */
    char     path[128];         /* NUL-terminated, cut to fit */
    char     id[40];            /* the request id, NUL-terminated */
} __attribute__((aligned(64)));

static struct gw_beat *beats;   /* shared: nbeats entries, or NULL */
static int             nbeats;
static struct gw_beat *mine;    /* this worker's entry, or NULL */

static int64_t
now_us(void)
{
    return (int64_t) (gw_loop_mono_fresh() * 1e6);
}

int
gw_watchdog_init(int nslots)
{
    void *p = mmap(NULL, (size_t) nslots * sizeof(struct gw_beat),
                   PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);

    if (p == MAP_FAILED) {
        return GW_ERR;
    }
    beats = p;
    nbeats = nslots;
    return GW_OK;
}

static struct gw_beat *
beat(int slot)
{
    return beats != NULL && slot >= 0 && slot < nbeats ? &beats[slot] : NULL;
}

void
gw_watchdog_arm(int slot)
{
    struct gw_beat *b = beat(slot);

    if (b != NULL) {
        memset(b, 0, sizeof(*b));
        __atomic_store_n(&b->turned, now_us(), __ATOMIC_RELEASE);
    }
}

void
gw_watchdog_attach(int slot)
{
    mine = beat(slot);
}

void
gw_watchdog_mark(void)
{
    if (mine != NULL) {
        __atomic_store_n(&mine->turned, now_us(), __ATOMIC_RELEASE);
    }
}

/* Copies len bytes of s into dst (cap bytes with its NUL), cut to fit. */
static void
copy_cut(char *dst, size_t cap, const char *s, size_t len)
{
    if (len > cap - 1) {
        len = cap - 1;
    }
    memcpy(dst, s, len);
    dst[len] = '\0';
}

void
gw_watchdog_request(const char *method, size_t method_len, const char *path,
                    size_t path_len, const char *id)
{
    if (mine == NULL) {
        return;
    }
    __atomic_store_n(&mine->seq, mine->seq + 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    mine->req_at = gw_loop_mono();
    copy_cut(mine->method, sizeof(mine->method), method, method_len);
    copy_cut(mine->path, sizeof(mine->path), path, path_len);
    copy_cut(mine->id, sizeof(mine->id), id, strlen(id));
    __atomic_store_n(&mine->seq, mine->seq + 1, __ATOMIC_RELEASE);
}

double
gw_watchdog_age(int slot)
{
    struct gw_beat *b = beat(slot);

    if (b == NULL) {
        return 0;
    }
    return (double) (now_us() - __atomic_load_n(&b->turned,
                                                __ATOMIC_ACQUIRE)) / 1e6;
}

void
gw_watchdog_last(int slot, char *buf, size_t len)
{
    struct gw_beat *b = beat(slot), copy;
    uint32_t before, after;

    buf[0] = '\0';
    if (b == NULL) {
        return;
    }
    before = __atomic_load_n(&b->seq, __ATOMIC_ACQUIRE);
    memcpy(&copy, b, sizeof(copy));
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    after = __atomic_load_n(&b->seq, __ATOMIC_RELAXED);
    if (before != after || (before & 1) != 0 || before == 0) {
        return;             /* none yet, or being written: say nothing */
    }
    copy.method[sizeof(copy.method) - 1] = '\0';
    copy.path[sizeof(copy.path) - 1] = '\0';
    copy.id[sizeof(copy.id) - 1] = '\0';
    snprintf(buf, len, "%s %s (request %s, started %.1f s ago)",
             copy.method, copy.path, copy.id,
             gw_loop_mono_fresh() - copy.req_at);
}
