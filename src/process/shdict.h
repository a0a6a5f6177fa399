/*
 * shdict.h -- shared dictionaries: key/value stores in anonymous MAP_SHARED
 * mappings that every worker of one `paygate run` sees (made by the master
 * before it forks, so they outlive workers and reloads). In `paygate exec`
 * they are made on first use, in that one process.
 *
 * Each dictionary is one mapping: a header with a robust process-shared
 * mutex, a hash table of cell indices, and an arena of 64-byte cells; an
 * entry is a chain of cells (header, key, value), on an LRU list. Indices,
 * never pointers, link everything. Limits: keys 1..GW_SHD_MAX_KEY bytes;
 * a value at most GW_SHD_MAX_VALUE bytes and a quarter of the dictionary.
 * When full, expired entries near the LRU tail go first, then the least
 * recently used ones (counted as evictions). TTLs use CLOCK_MONOTONIC.
 *
 * A process that dies holding the lock leaves the mutex EOWNERDEAD: the
 * next locker rebuilds the dictionary from its hash table (entries that
 * are not whole are dropped; free list, LRU and counters are recomputed)
 * before going on.
 */
#ifndef GW_SHDICT_H
#define GW_SHDICT_H

#include <stddef.h>
#include <stdint.h>

#define GW_SHD_MAX_KEY    250               /* bytes */
#define GW_SHD_MAX_VALUE  (1 << 20)         /* bytes */
#define GW_SHD_MAX_DICTS  32
#define GW_SHD_MIN_SIZE   (32 * 1024)       /* bytes */
#define GW_SHD_MAX_SIZE   (1ull << 32)      /* bytes */
#define GW_SHD_DEFAULT    "paygate"         /* always there */
#define GW_SHD_DEFAULT_SIZE (8u << 20)      /* bytes */

struct gw_shdict;

enum gw_shd_type { GW_SHD_NIL, GW_SHD_STRING, GW_SHD_NUMBER, GW_SHD_BOOLEAN };

/* Results of the operations below. */
enum gw_shd_rc {
    GW_SHD_OK,
    GW_SHD_NOT_FOUND,
    GW_SHD_EXISTS,          /* add: the key is there */
    GW_SHD_TOO_LARGE,       /* key or value over the limits */
    GW_SHD_NOT_NUMBER,      /* incr on a non-number */
    GW_SHD_OVERFLOW,        /* incr: the sum is not finite */
    GW_SHD_NO_MEMORY,       /* safe add: no room without evicting */
    GW_SHD_BROKEN           /* the lock cannot be taken (never expected) */
};

struct gw_shd_value {
    enum gw_shd_type type;
    const char      *s;     /* GW_SHD_STRING: bytes; not owned */
    size_t           len;   /* bytes */
    double           n;     /* GW_SHD_NUMBER */
    int              b;     /* GW_SHD_BOOLEAN */
};

struct gw_shd_stats {
    size_t   capacity;      /* bytes of cells */
    size_t   used;          /* bytes of cells holding entries */
    uint32_t entries;
    uint64_t evictions;     /* live entries dropped for room */
    uint64_t recoveries;    /* rebuilds after a holder died */
};

/* Parses "16m", "512k", "1g" or a byte count: digits and an optional
 * unit k, m or g, nothing else. GW_OK or GW_ERR. */
int gw_shdict_parse_size(const char *s, size_t *bytes);

/* A size given as a number (config.shared, shared.get_dict): a whole
 * number of bytes in range, nothing else. GW_OK or GW_ERR. */
int gw_shdict_size_of_number(double v, size_t *bytes);

/* Maps a new dictionary of about `bytes` and registers it under name in
 * this process (and in children forked later). NULL with a reason in err
 * (bad name or size, duplicate, too many, no memory). */
struct gw_shdict *gw_shdict_create(const char *name, size_t bytes,
                                   char *err, size_t errlen);

/* The dictionary registered under name, or NULL. */
struct gw_shdict *gw_shdict_find(const char *name);

/* The i-th registered dictionary (0-based), or NULL past the end. */
struct gw_shdict *gw_shdict_at(int i);
const char *gw_shdict_name(const struct gw_shdict *d);

/* Master: dictionaries are all made; workers must not make new ones.
 * Without this call (paygate exec) gw_shdict_find's callers may create. */
void gw_shdict_seal(void);
int gw_shdict_sealed(void);

/* Unlocked snapshot: for metrics. */
void gw_shdict_stats(struct gw_shdict *d, struct gw_shd_stats *st);

/*
 * get: on GW_SHD_OK fills v; a string value is copied into buf (cap bytes,
 * at least GW_SHD_MAX_VALUE) and v->s points there.
 */
enum gw_shd_rc gw_shdict_get(struct gw_shdict *d, const char *key,
                             size_t klen, char *buf, size_t cap,
                             struct gw_shd_value *v);

/* set (add = 0) or add (add = 1; GW_SHD_EXISTS when a live entry has the
 * key), or safe add (add = 2: as add, but room is made only from expired
 * entries, never by evicting a live one: GW_SHD_NO_MEMORY instead). ttl
 * in seconds, <= 0 for none. A GW_SHD_NIL value deletes. */
enum gw_shd_rc gw_shdict_set(struct gw_shdict *d, const char *key,
                             size_t klen, const struct gw_shd_value *v,
                             double ttl, int add);

/* incr: value += by. A missing key is GW_SHD_NOT_FOUND unless has_init,
 * then it is created as init + by with ttl. The result goes to *out. A
 * sum that is not finite (1e308 + 1e308) is GW_SHD_OVERFLOW: nothing is
 * changed or created. */
enum gw_shd_rc gw_shdict_incr(struct gw_shdict *d, const char *key,
                              size_t klen, double by, int has_init,
                              double init, double ttl, double *out);

enum gw_shd_rc gw_shdict_delete(struct gw_shdict *d, const char *key,
                                size_t klen);

/* Drops every entry. */
void gw_shdict_flush(struct gw_shdict *d);

/* Tests only: when set, gw_shdict_set() ends the process (_exit(99)) at
 * that step, holding the lock: 1 after writing the new entry's cells,
 * 2 after linking it into the hash table, 3 after unlinking a replaced
 * entry from its chain; 4 stops itself (SIGSTOP) right after taking the
 * lock, for the test to kill it there. */
extern int gw_shdict_die_at;

#endif
