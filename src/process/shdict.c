/*
 * shdict.c -- see shdict.h.
 *
 * Layout of one mapping:
 *
 *   struct gw_shdict                 header, mutex, counters
 *   uint32_t buckets[nbuckets]       hash chains: first entry's cell
 *   uint8_t  mark[ncells]            scratch for the rebuild
 *   struct cell cells[ncells]        the arena; cell 0 means "none"
 *
 * An entry is a chain of cells linked by cell.next; its first cell starts
 * with struct entry, followed by the key then the value bytes, which go
 * on in the next cells. Cells [1, bump) have been handed out at least
 * once; the rest were never touched (so a big dictionary costs memory
 * only as it fills). Freed cells go on a free list.
 *
 * Every change links an entry into its hash chain last and unlinks it
 * first, so the hash table is the truth: the rebuild after a holder died
 * keeps the entries reachable from it that are whole and recomputes the
 * rest.
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <openssl/rand.h>

#include "log.h"
#include "loop.h"
#include "runtime.h"
#include "shdict.h"

#define CELL          64
#define CELL_DATA     (CELL - 4)
#define ENTRY_MAGIC   0x53484445u     /* "SHDE" */
#define DICT_MAGIC    0x53484449u     /* "SHDI" */
#define SCAN_EXPIRED  32              /* entries looked at from the tail */

struct cell {                         /* 64-byte aligned: d is too */
    unsigned char d[CELL_DATA];
    uint32_t      next;               /* next cell of the entry / free */
};

struct entry {
    uint32_t magic;                   /* ENTRY_MAGIC once written whole */
    uint32_t hnext;                   /* next entry in the hash chain */
    uint32_t prev, next;              /* LRU: toward head / toward tail */
    uint32_t ncells;                  /* cells in the chain */
    uint32_t hash;                    /* of the key */
    uint32_t vlen;                    /* bytes of value */
    uint16_t klen;                    /* bytes of key */
    uint8_t  type;                    /* enum gw_shd_type */
    uint8_t  pad;
    double   expires;                 /* CLOCK_MONOTONIC s; 0: never */
};

struct gw_shdict {
    uint32_t        magic;
    char            name[64];
    pthread_mutex_t lock;             /* robust, process-shared */
    uint64_t        seed;             /* hash seed, random per dict */
    size_t          map_size;         /* bytes mapped */
    size_t          bucket_off;       /* bytes from the header */
    size_t          mark_off;
    size_t          cell_off;
    uint32_t        ncells;           /* cells, including cell 0 */
    uint32_t        nbuckets;         /* power of two */
    uint32_t        max_cells;        /* cells one entry may take */
    uint32_t        bump;             /* first never-used cell */
    uint32_t        free_head;        /* free list */
    uint32_t        nfree;            /* cells on it */
    uint32_t        lru_head;         /* most recently used */
    uint32_t        lru_tail;         /* least recently used */
    uint32_t        entries;
    uint32_t        used;             /* cells in entries */
    uint64_t        evictions;
    uint64_t        recoveries;
};

int gw_shdict_die_at;

static struct gw_shdict *dicts[GW_SHD_MAX_DICTS];
static int               ndicts;
static int               sealed;

#define BUCKETS(d) ((uint32_t *) ((char *) (d) + (d)->bucket_off))
#define MARK(d)    ((uint8_t *) ((char *) (d) + (d)->mark_off))
#define CELLS(d)   ((struct cell *) ((char *) (d) + (d)->cell_off))
#define ENTRY(d, i) ((struct entry *) CELLS(d)[i].d)

static uint32_t
hash_key(const struct gw_shdict *d, const char *k, size_t n)
{
    uint64_t h = d->seed ^ (0xcbf29ce484222325ull + n);

    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char) k[i];
        h *= 0x100000001b3ull;
    }
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdull;
    h ^= h >> 33;
    return (uint32_t) h;
}

static uint32_t
cells_for(size_t klen, size_t vlen)
{
    size_t n = sizeof(struct entry) + klen + vlen;

    if (n <= CELL_DATA) {
        return 1;
    }
    return (uint32_t) (1 + (n - CELL_DATA + CELL_DATA - 1) / CELL_DATA);
}

/* Copies n bytes at byte offset off of entry e's stream into out (or
 * from in, when writing). The stream starts at the entry header. */
static void
stream_io(struct gw_shdict *d, uint32_t e, size_t off, void *out,
          const void *in, size_t n)
{
    struct cell *c = CELLS(d);
    uint32_t i = e;

    while (off >= CELL_DATA) {
        off -= CELL_DATA;
        i = c[i].next;
    }
    while (n > 0) {
        size_t k = CELL_DATA - off;

        if (k > n) {
            k = n;
        }
        if (out != NULL) {
            memcpy(out, c[i].d + off, k);
            out = (char *) out + k;
        } else {
            memcpy(c[i].d + off, in, k);
            in = (const char *) in + k;
        }
        n -= k;
        off = 0;
        i = c[i].next;
    }
}

static int
key_equal(struct gw_shdict *d, uint32_t e, const char *k, size_t n)
{
    char tmp[GW_SHD_MAX_KEY];

    stream_io(d, e, sizeof(struct entry), tmp, NULL, n);
    return memcmp(tmp, k, n) == 0;
}

static uint32_t
lookup(struct gw_shdict *d, const char *k, size_t n, uint32_t h)
{
    uint32_t e = BUCKETS(d)[h & (d->nbuckets - 1)];

    while (e != 0) {
        struct entry *x = ENTRY(d, e);

        if (x->hash == h && x->klen == n && key_equal(d, e, k, n)) {
            return e;
        }
        e = x->hnext;
    }
    return 0;
}

static void
lru_unlink(struct gw_shdict *d, uint32_t e)
{
    struct entry *x = ENTRY(d, e);

    if (x->prev != 0) {
        ENTRY(d, x->prev)->next = x->next;
    } else {
        d->lru_head = x->next;
    }
    if (x->next != 0) {
        ENTRY(d, x->next)->prev = x->prev;
    } else {
        d->lru_tail = x->prev;
    }
    x->prev = x->next = 0;
}

static void
lru_push_head(struct gw_shdict *d, uint32_t e)
{
    struct entry *x = ENTRY(d, e);

    x->prev = 0;
    x->next = d->lru_head;
    if (d->lru_head != 0) {
        ENTRY(d, d->lru_head)->prev = e;
    }
    d->lru_head = e;
    if (d->lru_tail == 0) {
        d->lru_tail = e;
    }
}

static void
lru_push_tail(struct gw_shdict *d, uint32_t e)
{
    struct entry *x = ENTRY(d, e);

    x->next = 0;
    x->prev = d->lru_tail;
    if (d->lru_tail != 0) {
        ENTRY(d, d->lru_tail)->next = e;
    }
    d->lru_tail = e;
    if (d->lru_head == 0) {
        d->lru_head = e;
    }
}

static void
free_chain(struct gw_shdict *d, uint32_t e, uint32_t n)
{
    struct cell *c = CELLS(d);

    while (n-- > 0 && e != 0) {
        uint32_t next = c[e].next;

        c[e].next = d->free_head;
        d->free_head = e;
        d->nfree++;
        e = next;
    }
}

static uint32_t
avail(const struct gw_shdict *d)
{
    return d->ncells - d->bump + d->nfree;
}

/* Takes n cells (n <= avail) as a chain; returns the first. */
static uint32_t
alloc_chain(struct gw_shdict *d, uint32_t n)
{
    struct cell *c = CELLS(d);
    uint32_t first = 0, last = 0;

    for (uint32_t k = 0; k < n; k++) {
        uint32_t i;

        if (d->free_head != 0) {
            i = d->free_head;
            d->free_head = c[i].next;
            d->nfree--;
        } else {
            i = d->bump++;
        }
        c[i].next = 0;
        if (last != 0) {
            c[last].next = i;
        } else {
            first = i;
        }
        last = i;
    }
    return first;
}

/* Unlinks entry e from the hash table first, then the LRU, then frees. */
static void
remove_entry(struct gw_shdict *d, uint32_t e)
{
    struct entry *x = ENTRY(d, e);
    uint32_t *p = &BUCKETS(d)[x->hash & (d->nbuckets - 1)];

    while (*p != 0 && *p != e) {
        p = &ENTRY(d, *p)->hnext;
    }
    if (*p == e) {
        *p = x->hnext;
    }
    if (gw_shdict_die_at == 3) {
        _exit(99);
    }
    lru_unlink(d, e);
    x->magic = 0;
    d->entries--;
    d->used -= x->ncells;
    free_chain(d, e, x->ncells);
}

static int
expired(const struct entry *x, double now)
{
    return x->expires != 0 && x->expires <= now;
}

/* Frees room for n cells: expired entries near the tail first, then the
 * least recently used. */
static void
make_room(struct gw_shdict *d, uint32_t n, double now, int evict)
{
    while (avail(d) < n && d->lru_tail != 0) {
        uint32_t e = d->lru_tail, victim = 0;

        for (int k = 0; k < SCAN_EXPIRED && e != 0; k++) {
            if (expired(ENTRY(d, e), now)) {
                victim = e;
                break;
            }
            e = ENTRY(d, e)->prev;
        }
        if (victim == 0) {
            if (!evict) {
                return;             /* the caller sees avail(d) < n */
            }
            victim = d->lru_tail;
            d->evictions++;
        }
        remove_entry(d, victim);
    }
}

/* ---- the rebuild after a holder died ------------------------------- */

/* Marks entry e's cells with 2 if all are in range and unmarked; on any
 * fault unmarks them again and returns 0. */
static int
claim_cells(struct gw_shdict *d, uint32_t e, uint32_t n)
{
    struct cell *c = CELLS(d);
    uint8_t *mark = MARK(d);
    uint32_t i = e, k;

    for (k = 0; k < n; k++) {
        if (i == 0 || i >= d->bump || mark[i] != 0) {
            break;
        }
        mark[i] = 2;
        i = c[i].next;
    }
    if (k == n) {
        for (i = e, k = 0; k < n; k++, i = c[i].next) {
            mark[i] = 1;
        }
        return 1;
    }
    for (i = e; k-- > 0; i = c[i].next) {
        mark[i] = 0;
    }
    return 0;
}

static void
rebuild(struct gw_shdict *d)
{
    uint32_t *b = BUCKETS(d);
    uint8_t *mark = MARK(d);
    struct cell *c = CELLS(d);

    if (d->bump < 1 || d->bump > d->ncells) {
        d->bump = d->ncells;    /* cannot trust it: scan everything */
    }
    memset(mark, 0, d->ncells);
    d->entries = 0;
    d->used = 0;
    d->lru_head = d->lru_tail = 0;
    for (uint32_t i = 0; i < d->nbuckets; i++) {
        uint32_t *p = &b[i];

        while (*p != 0) {
            uint32_t e = *p;
            struct entry *x;
            char key[GW_SHD_MAX_KEY];
            int ok = e < d->bump && mark[e] == 0;

            x = ok ? ENTRY(d, e) : NULL;
            ok = ok && x->magic == ENTRY_MAGIC
                 && (x->hash & (d->nbuckets - 1)) == i
                 && x->klen >= 1 && x->klen <= GW_SHD_MAX_KEY
                 && x->type >= GW_SHD_STRING && x->type <= GW_SHD_BOOLEAN
                 && x->ncells == cells_for(x->klen, x->vlen)
                 && x->ncells <= d->max_cells
                 && claim_cells(d, e, x->ncells);
            if (ok) {
                stream_io(d, e, sizeof(struct entry), key, NULL, x->klen);
                if (hash_key(d, key, x->klen) != x->hash) {
                    uint32_t j = e;

                    for (uint32_t k = 0; k < x->ncells; k++, j = c[j].next) {
                        mark[j] = 0;
                    }
                    ok = 0;
                }
            }
            if (!ok) {
                *p = 0;         /* drop the rest of this chain */
                break;
            }
            d->entries++;
            d->used += x->ncells;
            lru_push_tail(d, e);
            p = &x->hnext;
        }
    }
    d->free_head = 0;
    d->nfree = 0;
    for (uint32_t i = d->bump; i-- > 1;) {
        if (mark[i] == 0) {
            c[i].next = d->free_head;
            d->free_head = i;
            d->nfree++;
        }
    }
    d->recoveries++;
}

static int
dict_lock(struct gw_shdict *d)
{
    int rc = pthread_mutex_lock(&d->lock);

    if (rc == EOWNERDEAD) {
        rebuild(d);
        pthread_mutex_consistent(&d->lock);
        gw_log(GW_LOG_WARN, "shared dict %s: a process died holding its "
                            "lock; rebuilt (%u entries kept)", d->name,
               (unsigned) d->entries);
        rc = 0;
    }
    if (rc != 0) {
        gw_log(GW_LOG_ERROR, "shared dict %s: cannot lock: %s", d->name,
               strerror(rc));
        return GW_ERR;
    }
    if (gw_shdict_die_at == 4) {
        raise(SIGSTOP);             /* a test kills us here, holding it */
    }
    return GW_OK;
}

static void
dict_unlock(struct gw_shdict *d)
{
    pthread_mutex_unlock(&d->lock);
}

/* ---- public --------------------------------------------------------- */

/*
 * A size is decimal digits and an optional unit k, m or g (either case),
 * nothing else: no sign, space, fraction, exponent or hex (strtod's and
 * strtoul's leniencies). Within GW_SHD_MIN_SIZE..GW_SHD_MAX_SIZE.
 */
int
gw_shdict_parse_size(const char *s, size_t *bytes)
{
    unsigned long long v = 0, mul = 1;
    const char *p = s;

    if (*p < '0' || *p > '9') {
        return GW_ERR;
    }
    for (; *p >= '0' && *p <= '9'; p++) {
        v = v * 10 + (unsigned long long) (*p - '0');
        if (v > GW_SHD_MAX_SIZE) {
            return GW_ERR;          /* too large already (no overflow) */
        }
    }
    if (*p == 'k' || *p == 'K') {
        mul = 1024;
        p++;
    } else if (*p == 'm' || *p == 'M') {
        mul = 1024ull * 1024;
        p++;
    } else if (*p == 'g' || *p == 'G') {
        mul = 1024ull * 1024 * 1024;
        p++;
    }
    if (*p != '\0' || v > GW_SHD_MAX_SIZE / mul
        || v * mul < GW_SHD_MIN_SIZE) {
        return GW_ERR;
    }
    *bytes = (size_t) (v * mul);
    return GW_OK;
}

/* A size given as a number: a whole number of bytes in range, checked
 * before the cast (a negative, fractional, NaN or huge one is no byte
 * count, and its cast undefined). */
int
gw_shdict_size_of_number(double v, size_t *bytes)
{
    if (!(v >= GW_SHD_MIN_SIZE && v <= (double) GW_SHD_MAX_SIZE
          && v == floor(v))) {
        return GW_ERR;
    }
    *bytes = (size_t) v;
    return GW_OK;
}

static int
name_ok(const char *name)
{
    size_t n = strlen(name);

    return n >= 1 && n < 64
           && strspn(name, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVW"
                           "XYZ0123456789_") == n;
}

struct gw_shdict *
gw_shdict_create(const char *name, size_t bytes, char *err, size_t errlen)
{
    struct gw_shdict *d;
    pthread_mutexattr_t a;
    size_t ncells, nbuckets = 16, off;

    if (!name_ok(name)) {
        snprintf(err, errlen, "shared dictionary name '%.64s' must be 1-63 "
                              "letters, digits or _", name);
        return NULL;
    }
    if (bytes < GW_SHD_MIN_SIZE || bytes > GW_SHD_MAX_SIZE) {
        snprintf(err, errlen, "shared dictionary %s: size must be 32k..4g",
                 name);
        return NULL;
    }
    if (gw_shdict_find(name) != NULL) {
        snprintf(err, errlen, "shared dictionary %s exists", name);
        return NULL;
    }
    if (ndicts == GW_SHD_MAX_DICTS) {
        snprintf(err, errlen, "too many shared dictionaries (at most %d)",
                 GW_SHD_MAX_DICTS);
        return NULL;
    }
    /* per cell: the cell, a mark byte, about half a bucket */
    ncells = (bytes - sizeof(*d)) / (CELL + 1 + 2);
    while (nbuckets * 2 <= ncells / 2) {
        nbuckets *= 2;
    }
    d = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
             -1, 0);
    if (d == MAP_FAILED) {
        snprintf(err, errlen, "shared dictionary %s: mmap: %s", name,
                 strerror(errno));
        return NULL;
    }
    off = (sizeof(*d) + 63) & ~(size_t) 63;
    d->bucket_off = off;
    off += nbuckets * sizeof(uint32_t);
    d->mark_off = off;
    off = (off + ncells + 63) & ~(size_t) 63;
    d->cell_off = off;
    while (off + ncells * CELL > bytes) {
        ncells--;
    }
    d->ncells = (uint32_t) ncells;
    d->nbuckets = (uint32_t) nbuckets;
    d->max_cells = (uint32_t) (ncells / 4);
    d->bump = 1;
    d->map_size = bytes;
    snprintf(d->name, sizeof(d->name), "%s", name);
    if (RAND_bytes((unsigned char *) &d->seed, sizeof(d->seed)) != 1) {
        d->seed = (uint64_t) gw_loop_mono_fresh() * 0x9e3779b97f4a7c15ull ^ getpid();
    }
    pthread_mutexattr_init(&a);
    pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
    pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
    if (pthread_mutex_init(&d->lock, &a) != 0) {
        pthread_mutexattr_destroy(&a);
        munmap(d, bytes);
        snprintf(err, errlen, "shared dictionary %s: no mutex", name);
        return NULL;
    }
    pthread_mutexattr_destroy(&a);
    d->magic = DICT_MAGIC;
    dicts[ndicts++] = d;
    return d;
}

struct gw_shdict *
gw_shdict_find(const char *name)
{
    for (int i = 0; i < ndicts; i++) {
        if (strcmp(dicts[i]->name, name) == 0) {
            return dicts[i];
        }
    }
    return NULL;
}

struct gw_shdict *
gw_shdict_at(int i)
{
    return i >= 0 && i < ndicts ? dicts[i] : NULL;
}

const char *
gw_shdict_name(const struct gw_shdict *d)
{
    return d->name;
}

void
gw_shdict_seal(void)
{
    sealed = 1;
}

int
gw_shdict_sealed(void)
{
    return sealed;
}

void
gw_shdict_stats(struct gw_shdict *d, struct gw_shd_stats *st)
{
    st->capacity = (size_t) (d->ncells - 1) * CELL;
    st->used = (size_t) d->used * CELL;
    st->entries = d->entries;
    st->evictions = d->evictions;
    st->recoveries = d->recoveries;
}

enum gw_shd_rc
gw_shdict_get(struct gw_shdict *d, const char *key, size_t klen, char *buf,
              size_t cap, struct gw_shd_value *v)
{
    uint32_t e;
    struct entry *x;
    enum gw_shd_rc rc = GW_SHD_NOT_FOUND;

    if (klen == 0 || klen > GW_SHD_MAX_KEY) {
        return GW_SHD_NOT_FOUND;
    }
    if (dict_lock(d) != GW_OK) {
        return GW_SHD_BROKEN;
    }
    e = lookup(d, key, klen, hash_key(d, key, klen));
    if (e != 0) {
        x = ENTRY(d, e);
        if (expired(x, gw_loop_mono_fresh())) {
            remove_entry(d, e);
        } else if (x->type == GW_SHD_STRING && x->vlen > cap) {
            rc = GW_SHD_TOO_LARGE;
        } else {
            size_t off = sizeof(struct entry) + x->klen;

            v->type = (enum gw_shd_type) x->type;
            if (x->type == GW_SHD_STRING) {
                stream_io(d, e, off, buf, NULL, x->vlen);
                v->s = buf;
                v->len = x->vlen;
            } else if (x->type == GW_SHD_NUMBER) {
                stream_io(d, e, off, &v->n, NULL, sizeof(double));
            } else {
                unsigned char b;

                stream_io(d, e, off, &b, NULL, 1);
                v->b = b;
            }
            lru_unlink(d, e);
            lru_push_head(d, e);
            rc = GW_SHD_OK;
        }
    }
    dict_unlock(d);
    return rc;
}

/* Writes a new entry and links it (hash last). Lock held; the key is
 * absent. evict: live entries may be dropped for room (else
 * GW_SHD_NO_MEMORY when the expired ones do not free enough). */
static enum gw_shd_rc
insert(struct gw_shdict *d, const char *key, size_t klen, uint32_t h,
       const struct gw_shd_value *v, double ttl, double now, int evict)
{
    size_t vlen;
    const void *vp;
    unsigned char b;
    uint32_t n, e, *bucket;
    struct entry *x;

    if (v->type == GW_SHD_STRING) {
        vlen = v->len;
        vp = v->s;
    } else if (v->type == GW_SHD_NUMBER) {
        vlen = sizeof(double);
        vp = &v->n;
    } else {
        b = (unsigned char) (v->b != 0);
        vlen = 1;
        vp = &b;
    }
    n = cells_for(klen, vlen);
    if (vlen > GW_SHD_MAX_VALUE || n > d->max_cells) {
        return GW_SHD_TOO_LARGE;
    }
    make_room(d, n, now, evict);
    if (avail(d) < n) {
        return GW_SHD_NO_MEMORY;
    }
    e = alloc_chain(d, n);
    x = ENTRY(d, e);
    memset(x, 0, sizeof(*x));
    x->ncells = n;
    x->hash = h;
    x->klen = (uint16_t) klen;
    x->vlen = (uint32_t) vlen;
    x->type = (uint8_t) v->type;
    x->expires = ttl > 0 ? now + ttl : 0;
    stream_io(d, e, sizeof(*x), NULL, key, klen);
    stream_io(d, e, sizeof(*x) + klen, NULL, vp, vlen);
    bucket = &BUCKETS(d)[h & (d->nbuckets - 1)];
    x->hnext = *bucket;
    x->magic = ENTRY_MAGIC;
    d->entries++;
    d->used += n;
    if (gw_shdict_die_at == 1) {
        _exit(99);
    }
    *bucket = e;
    if (gw_shdict_die_at == 2) {
        _exit(99);
    }
    lru_push_head(d, e);
    return GW_SHD_OK;
}

enum gw_shd_rc
gw_shdict_set(struct gw_shdict *d, const char *key, size_t klen,
              const struct gw_shd_value *v, double ttl, int add)
{
    uint32_t h, e;
    double now;
    enum gw_shd_rc rc = GW_SHD_OK;

    /* every size check before the old entry goes: a refused value
     * leaves the key's value as it was */
    if (klen == 0 || klen > GW_SHD_MAX_KEY
        || (v->type == GW_SHD_STRING && (v->len > GW_SHD_MAX_VALUE
                                         || cells_for(klen, v->len)
                                            > d->max_cells))) {
        return GW_SHD_TOO_LARGE;
    }
    h = hash_key(d, key, klen);
    if (dict_lock(d) != GW_OK) {
        return GW_SHD_BROKEN;
    }
    now = gw_loop_mono_fresh();
    e = lookup(d, key, klen, h);
    if (e != 0 && add && !expired(ENTRY(d, e), now)) {
        rc = GW_SHD_EXISTS;
    } else {
        if (e != 0) {
            remove_entry(d, e);
        }
        if (v->type != GW_SHD_NIL) {
            rc = insert(d, key, klen, h, v, ttl, now, add != 2);
        }
    }
    dict_unlock(d);
    return rc;
}

enum gw_shd_rc
gw_shdict_incr(struct gw_shdict *d, const char *key, size_t klen, double by,
               int has_init, double init, double ttl, double *out)
{
    uint32_t h, e;
    double now;
    enum gw_shd_rc rc = GW_SHD_OK;

    if (klen == 0 || klen > GW_SHD_MAX_KEY) {
        return GW_SHD_TOO_LARGE;
    }
    h = hash_key(d, key, klen);
    if (dict_lock(d) != GW_OK) {
        return GW_SHD_BROKEN;
    }
    now = gw_loop_mono_fresh();
    e = lookup(d, key, klen, h);
    if (e != 0 && expired(ENTRY(d, e), now)) {
        remove_entry(d, e);
        e = 0;
    }
    if (e != 0) {
        struct entry *x = ENTRY(d, e);
        size_t off = sizeof(*x) + x->klen;
        double n;

        if (x->type != GW_SHD_NUMBER) {
            rc = GW_SHD_NOT_NUMBER;
        } else {
            stream_io(d, e, off, &n, NULL, sizeof(n));
            n += by;
            if (!isfinite(n)) {
                rc = GW_SHD_OVERFLOW;
            } else {
                stream_io(d, e, off, NULL, &n, sizeof(n));
                lru_unlink(d, e);
                lru_push_head(d, e);
                *out = n;
            }
        }
    } else if (!has_init) {
        rc = GW_SHD_NOT_FOUND;
    } else if (!isfinite(init + by)) {
        rc = GW_SHD_OVERFLOW;
    } else {
        struct gw_shd_value v = { .type = GW_SHD_NUMBER, .n = init + by };

        rc = insert(d, key, klen, h, &v, ttl, now, 1);
        *out = v.n;
    }
    dict_unlock(d);
    return rc;
}

enum gw_shd_rc
gw_shdict_delete(struct gw_shdict *d, const char *key, size_t klen)
{
    struct gw_shd_value v = { .type = GW_SHD_NIL };

    if (klen == 0 || klen > GW_SHD_MAX_KEY) {
        return GW_SHD_OK;
    }
    return gw_shdict_set(d, key, klen, &v, 0, 0);
}

void
gw_shdict_flush(struct gw_shdict *d)
{
    if (dict_lock(d) != GW_OK) {
        return;
    }
    memset(BUCKETS(d), 0, d->nbuckets * sizeof(uint32_t));
    d->bump = 1;
    d->free_head = 0;
    d->nfree = 0;
    d->lru_head = d->lru_tail = 0;
    d->entries = 0;
    d->used = 0;
    dict_unlock(d);
}
