/*
 * conn_pool.c -- the memory of the server's connections: fixed-size slots
 * in one mapping reserved at start (touched only when used), the lowest
 * free slot handed out first, and pages whose slots are all free given
 * back to the kernel by gw_conn_pool_trim().
 *
 * Why not malloc: a connection's struct and events, allocated among the
 * small blocks that live on after it (libevent keeps one entry per file
 * descriptor number ever used), left the heap fragmented after a storm of
 * connections: a few live bytes on every page, so nothing could be given
 * back and the worker's RSS stayed at its peak. Here they live apart, and
 * taking the lowest free slot keeps the live ones packed at the start.
 */
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "conn_pool.h"

/* Under AddressSanitizer the pool stays empty (every get is NULL, so the
 * server mallocs): a use of a closed connection is then caught. */
#if defined(__SANITIZE_ADDRESS__)
#define GW_POOL_OFF 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define GW_POOL_OFF 1
#endif
#endif

static struct {
    char     *base;         /* the mapping; NULL when not set up */
    size_t    map_len;
    size_t    slot;         /* bytes per slot (a multiple of 64) */
    unsigned  nslots;
    uint64_t *used;         /* bit per slot: 1 = handed out */
    unsigned  nwords;
    unsigned  hint;         /* no free slot in the words before it */
    unsigned  inuse;
    size_t    page;
    uint8_t  *touched;      /* per page: 1 = may hold data (resident) */
    unsigned  npages;
} pool;

int
gw_conn_pool_init(size_t slot_size, unsigned nslots)
{
    size_t words_len, pages_len;
    char  *m;

#ifdef GW_POOL_OFF
    (void) slot_size;
    (void) nslots;
    return 0;
#endif
    if (pool.base != NULL || nslots == 0) {
        return pool.base != NULL ? 0 : -1;
    }
    pool.page = (size_t) sysconf(_SC_PAGESIZE);
    pool.slot = (slot_size + 63) & ~(size_t) 63;
    pool.nslots = nslots;
    pool.nwords = (nslots + 63) / 64;
    pool.map_len = (pool.slot * nslots + pool.page - 1) & ~(pool.page - 1);
    pool.npages = (unsigned) (pool.map_len / pool.page);
    words_len = pool.nwords * sizeof(uint64_t);
    pages_len = pool.npages;
    /* bitmap and page marks in the same mapping, after the slots */
    m = mmap(NULL, pool.map_len + words_len + pages_len,
             PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS
             | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) {
        return -1;
    }
    pool.base = m;
    pool.used = (uint64_t *) (m + pool.map_len);
    pool.touched = (uint8_t *) (m + pool.map_len + words_len);
    return 0;
}

void *
gw_conn_pool_get(void)
{
    unsigned w, bit, i, p, last;
    char    *s;

    if (pool.base == NULL) {
        return NULL;
    }
    for (w = pool.hint; w < pool.nwords; w++) {
        if (pool.used[w] != UINT64_MAX) {
            break;
        }
    }
    pool.hint = w;
    if (w == pool.nwords) {
        return NULL;
    }
    bit = (unsigned) __builtin_ctzll(~pool.used[w]);
    i = w * 64 + bit;
    if (i >= pool.nslots) {
        return NULL;
    }
    pool.used[w] |= (uint64_t) 1 << bit;
    pool.inuse++;
    s = pool.base + (size_t) i * pool.slot;
    last = (unsigned) (((size_t) i * pool.slot + pool.slot - 1) / pool.page);
    for (p = (unsigned) (((size_t) i * pool.slot) / pool.page); p <= last;
         p++) {
        pool.touched[p] = 1;
    }
    memset(s, 0, pool.slot);
    return s;
}

int
gw_conn_pool_owns(const void *p)
{
    const char *c = p;

    return pool.base != NULL && c >= pool.base
           && c < pool.base + (size_t) pool.nslots * pool.slot;
}

void
gw_conn_pool_put(void *p)
{
    unsigned i = (unsigned) (((char *) p - pool.base) / pool.slot);

    pool.used[i / 64] &= ~((uint64_t) 1 << (i % 64));
    if (i / 64 < pool.hint) {
        pool.hint = i / 64;
    }
    pool.inuse--;
}

unsigned
gw_conn_pool_inuse(void)
{
    return pool.inuse;
}

/* Is every slot overlapping page p free? */
static int
page_free(unsigned p)
{
    size_t   from = (size_t) p * pool.page, to = from + pool.page - 1;
    unsigned i = (unsigned) (from / pool.slot);
    unsigned last = (unsigned) (to / pool.slot);

    if (last >= pool.nslots) {
        last = pool.nslots - 1;
    }
    for (; i <= last; i++) {
        if (pool.used[i / 64] & ((uint64_t) 1 << (i % 64))) {
            return 0;
        }
    }
    return 1;
}

size_t
gw_conn_pool_trim(void)
{
    size_t   released = 0;
    unsigned p, run = 0, start = 0;

    if (pool.base == NULL) {
        return 0;
    }
    for (p = 0; p <= pool.npages; p++) {
        if (p < pool.npages && pool.touched[p] && page_free(p)) {
            if (run++ == 0) {
                start = p;
            }
            pool.touched[p] = 0;
            continue;
        }
        if (run > 0) {
            madvise(pool.base + (size_t) start * pool.page,
                    (size_t) run * pool.page, MADV_DONTNEED);
            released += (size_t) run * pool.page;
            run = 0;
        }
    }
    return released;
}
