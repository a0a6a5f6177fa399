/*
 * metrics.c -- see metrics.h. Each worker writes only its own slot (one
 * writer, no locks); the master reads all slots. Counters are 64-bit and
 * aligned, so a reader sees each one whole.
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "http_server.h"
#include "tls.h"
#include "loop.h"
#include "metrics.h"
#include "runtime.h"
#include "shdict.h"

#define ROUTES  128             /* distinct (method, route, status) */
/* The last OVERFLOW_ROWS rows of a table are kept for the requests past
 * the others: one row per status class (1xx .. 5xx), method OTHER, route
 * OVERFLOW_ROUTE (no route pattern starts with '('), rendered "5xx". */
#define OVERFLOW_ROWS 5
static const char OVERFLOW_ROUTE[] = "(overflow)";
#define BUCKETS 12

static const double bucket_le[BUCKETS] = {
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10
};

struct gw_route_stat {
    char     method[12];        /* NUL-terminated */
    char     route[96];         /* pattern, or "(unmatched)" */
    int      status;
    uint64_t count;             /* requests */
    double   sum;               /* seconds */
    uint64_t le[BUCKETS];       /* cumulative not: per bucket counts */
};

/* One gauge series an app set from Lua (paygate.metrics). The worker
 * writes it under a sequence count (odd while it writes); the master
 * copies it and keeps the copy only when the count was even and the same
 * before and after (no lock: a writer never waits for /metrics). */
struct gw_app_series {
    uint32_t seq;                               /* odd while written */
    uint32_t used;                              /* 1 when it holds one */
    double   value;
    double   at;            /* monotonic seconds of the last set */
    char     name[GW_METRICS_NAME_MAX];         /* NUL-terminated */
    char     help[GW_METRICS_HELP_MAX];         /* NUL-terminated */
    char     labels[GW_METRICS_LABELS_MAX];     /* k="v",... escaped */
};

/* One counter name in a slot. Written once by its worker, then read;
 * used is stored last (release), so a reader that sees it set sees the
 * rest. nseries and overflow are the worker's own bookkeeping. */
struct gw_counter_family {
    uint32_t used;                              /* 1 once filled */
    int32_t  max_series;                        /* cap incl. overflow */
    int32_t  nseries;                           /* label sets held */
    int32_t  overflow;                          /* series index */
    char     name[GW_METRICS_NAME_MAX];         /* NUL-terminated */
    char     help[GW_METRICS_HELP_MAX];         /* NUL-terminated */
};

/* One counter series: (family, label set) and its count. The labels are
 * written before used (release) and never change; value is written only
 * by the slot's worker (one writer: an aligned 8-byte store). */
struct gw_counter_series {
    uint32_t used;                              /* 1 once filled */
    int32_t  family;                            /* index in the slot */
    double   value;                             /* the count */
    char     labels[GW_METRICS_LABELS_MAX];     /* k="v",... escaped */
};

/* One histogram name in a slot, published as a counter family is (used
 * stored last). */
struct gw_hist_family {
    uint32_t used;                              /* 1 once filled */
    int32_t  max_series;                        /* cap incl. overflow */
    int32_t  nseries;                           /* label sets held */
    int32_t  overflow;                          /* series index */
    int32_t  nle;                               /* bounds in le */
    double   le[GW_METRICS_HBUCKETS];           /* upper bounds, ascending */
    char     name[GW_METRICS_NAME_MAX];         /* NUL-terminated */
    char     help[GW_METRICS_HELP_MAX];         /* NUL-terminated */
};

/* One histogram series: (family, label set), its counts and sum. Labels
 * are written before used and never change; the numbers are written only
 * by the slot's worker (aligned 8-byte stores: a reader may see one
 * observation in a bucket and not yet in the sum, never a torn number). */
struct gw_hist_series {
    uint32_t used;                              /* 1 once filled */
    int32_t  family;                            /* index in the slot */
    double   sum;                               /* of the values observed */
    double   n[GW_METRICS_HBUCKETS + 1];        /* per bucket, not
                                                   cumulative; the last
                                                   past every bound */
    char     labels[GW_METRICS_LABELS_MAX];     /* k="v",... escaped */
};

struct gw_slot {
    pid_t                pid;       /* worker owning it; 0 when free */
    int                  nroutes;   /* entries used */
    int64_t              lua_bytes; /* gauge */
    int64_t              in_flight; /* gauge */
    int64_t              conns;     /* gauge */
    uint64_t             edge[GW_EDGE_NEVENTS]; /* counts of the HTTP
                                       edge's events (gw_edge_event) */
    struct gw_route_stat routes[ROUTES];
    struct gw_app_series app[GW_METRICS_APP_SERIES];
    int32_t              nfam;      /* counter families used */
    int32_t              nctr;      /* counter series used */
    struct gw_counter_family fam[GW_METRICS_FAMILIES];
    struct gw_counter_series ctr[GW_METRICS_COUNTERS];
    int32_t              nhfam;     /* histogram families used */
    int32_t              nhist;     /* histogram series used */
    struct gw_hist_family hfam[GW_METRICS_HFAMILIES];
    struct gw_hist_series hist[GW_METRICS_HISTOGRAMS];
};

struct gw_shm {
    uint64_t       reloads;         /* master only */
    uint64_t       reload_failures;
    uint64_t       restarts;
    uint64_t       stalls;          /* workers the watchdog killed */
    int            nslots;
    struct gw_slot retired;         /* sums of dead workers */
    struct gw_slot slots[];
};

static struct gw_shm  *shm;         /* shared, or private in exec */
static struct gw_slot *mine;        /* this worker's slot */
static struct {
    const char *route;              /* interned Lua string pointer */
    int         status;
    char        m0;                 /* method's first byte */
    int         idx;
} cache[256];

int
gw_metrics_init(int max_slots)
{
    size_t size = sizeof(struct gw_shm)
                  + (size_t) max_slots * sizeof(struct gw_slot);

    shm = mmap(NULL, size, PROT_READ | PROT_WRITE,
               MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (shm == MAP_FAILED) {
        shm = NULL;
        return GW_ERR;
    }
    shm->nslots = max_slots;
    return GW_OK;
}

/* This worker's index over its counter series: open addressing on
 * (family, labels), private memory (the master never reads it). Entries
 * are series index + 1; 0 is empty. */
#define CTR_INDEX (GW_METRICS_COUNTERS * 2)
static int32_t  ctr_index[CTR_INDEX];
/* The same over this worker's histogram series. */
#define HIST_INDEX (GW_METRICS_HISTOGRAMS * 2)
static int32_t  hist_index[HIST_INDEX];
static unsigned generation;

void
gw_metrics_attach(int slot)
{
    memset(cache, 0, sizeof(cache));
    memset(ctr_index, 0, sizeof(ctr_index));
    memset(hist_index, 0, sizeof(hist_index));
    generation++;
    if (shm == NULL || slot < 0 || slot >= shm->nslots) {
        mine = calloc(1, sizeof(*mine));    /* exec: private counters */
        return;
    }
    /* The master cleared the slot when it reserved it (pid -1): clearing
     * it here would show pid 0 -- free -- to a master choosing a slot for
     * the next worker, for as long as the memset of the whole slot takes,
     * and two workers would share one slot (and one worker's counts would
     * vanish from /metrics). */
    mine = &shm->slots[slot];
    __atomic_store_n(&mine->pid, getpid(), __ATOMIC_RELEASE);
}

int
gw_metrics_free_slot(void)
{
    for (int i = 0; shm != NULL && i < shm->nslots; i++) {
        if (shm->slots[i].pid == 0) {
            /* cleared here, before the fork: the worker only stores its
             * pid over the reservation */
            memset(&shm->slots[i], 0, sizeof(shm->slots[i]));
            shm->slots[i].pid = -1;         /* reserved until attach */
            return i;
        }
    }
    return -1;
}

static void ctr_fold(struct gw_slot *to, const struct gw_slot *from);
static void hist_fold(struct gw_slot *to, const struct gw_slot *from);

static struct gw_route_stat *
find_route(struct gw_slot *s, const char *method, const char *route,
           int status)
{
    for (int i = 0; i < s->nroutes; i++) {
        struct gw_route_stat *r = &s->routes[i];

        if (r->status == status && strcmp(r->method, method) == 0
            && strcmp(r->route, route) == 0) {
            return r;
        }
    }
    if (s->nroutes >= ROUTES - OVERFLOW_ROWS
        && strcmp(route, OVERFLOW_ROUTE) != 0) {
        /* full: counted under its status class, never lost (and a
         * retired worker's counts folded in, so no total goes back) */
        int cls = status / 100;

        cls = cls < 1 ? 1 : cls > 5 ? 5 : cls;
        return find_route(s, "OTHER", OVERFLOW_ROUTE, cls * 100);
    }
    if (s->nroutes == ROUTES) {
        return NULL;
    }
    {
        struct gw_route_stat *r = &s->routes[s->nroutes];

        snprintf(r->method, sizeof(r->method), "%s", method);
        snprintf(r->route, sizeof(r->route), "%s", route);
        r->status = status;
        s->nroutes++;
        return r;
    }
}

void
gw_metrics_retire(int slot)
{
    struct gw_slot *s;

    if (shm == NULL || slot < 0 || slot >= shm->nslots) {
        return;
    }
    s = &shm->slots[slot];
    for (int i = 0; i < s->nroutes; i++) {
        struct gw_route_stat *from = &s->routes[i];
        struct gw_route_stat *to = find_route(&shm->retired, from->method,
                                              from->route, from->status);
        if (to == NULL) {
            continue;
        }
        to->count += from->count;
        to->sum += from->sum;
        for (int b = 0; b < BUCKETS; b++) {
            to->le[b] += from->le[b];
        }
    }
    ctr_fold(&shm->retired, s);
    hist_fold(&shm->retired, s);
    for (int e = 0; e < GW_EDGE_NEVENTS; e++) {
        shm->retired.edge[e] += s->edge[e];
    }
    memset(s, 0, sizeof(*s));
}

/* route (len bytes) as a row's label: cut to fit dst (cap bytes with its
 * NUL) at a character boundary. A cut inside a UTF-8 character left half of
 * it in the label, and a scraper refuses an exposition that is not UTF-8
 * whole. The row is found by this label, so a pattern longer than it
 * finds its own row again (comparing the whole pattern never matched). */
static void
route_label(char *dst, size_t cap, const char *route, size_t len)
{
    const char *nul = memchr(route, '\0', len);

    if (nul != NULL) {
        len = (size_t) (nul - route);
    }
    if (len > cap - 1) {
        len = cap - 1;
        /* route[len], the first byte left out, continues a character:
         * leave out the bytes of that character before it too */
        while (len > 0 && ((unsigned char) route[len] & 0xC0) == 0x80) {
            len--;
        }
    }
    memcpy(dst, route, len);
    dst[len] = '\0';
}

void
gw_metrics_request(const char *method, size_t method_len, const char *route,
                   size_t route_len, int status, double seconds)
{
    unsigned h;
    struct gw_route_stat *r;

    if (mine == NULL) {
        return;
    }
    if (route == NULL) {
        /* the method of an unmatched request is the client's own word: a
         * label per made-up method would fill the table (ROUTES) and leave
         * every later request uncounted */
        static const char *const known[] = { "GET", "HEAD", "POST", "PUT",
            "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT", NULL };
        int k = 0;

        while (known[k] != NULL && (strlen(known[k]) != method_len
               || memcmp(known[k], method, method_len) != 0)) {
            k++;
        }
        if (known[k] == NULL) {
            method = "OTHER";
            method_len = 5;
        }
        route = "(unmatched)";
        route_len = strlen(route);
    }
    h = (unsigned) (((uintptr_t) route >> 3) ^ ((unsigned) status * 31u)
                    ^ ((unsigned char) method[0] * 7u)) & 255u;
    if (cache[h].route == route && cache[h].status == status
        && cache[h].m0 == method[0]
        && method_len < 12
        && strncmp(mine->routes[cache[h].idx].method, method, method_len)
           == 0
        && mine->routes[cache[h].idx].method[method_len] == '\0') {
        r = &mine->routes[cache[h].idx];
    } else {
        char m[12], label[sizeof(mine->routes[0].route)];

        snprintf(m, sizeof(m), "%.*s", (int) method_len, method);
        route_label(label, sizeof(label), route, route_len);
        r = find_route(mine, m, label, status);
        if (r == NULL) {
            return;
        }
        cache[h].route = route;
        cache[h].status = status;
        cache[h].m0 = method[0];
        cache[h].idx = (int) (r - mine->routes);
    }
    r->count++;
    r->sum += seconds;
    for (int b = 0; b < BUCKETS; b++) {
        if (seconds <= bucket_le[b]) {
            r->le[b]++;
            break;
        }
    }
}

void
gw_metrics_edge(int event)
{
    if (mine != NULL && event >= 0 && event < GW_EDGE_NEVENTS) {
        mine->edge[event]++;
    }
}

void
gw_metrics_gauges(int64_t lua_bytes, int64_t in_flight, int64_t connections)
{
    if (mine != NULL) {
        mine->lua_bytes = lua_bytes;
        mine->in_flight = in_flight;
        mine->conns = connections;
    }
}

void
gw_metrics_reload(int ok)
{
    if (shm != NULL) {
        if (ok) {
            shm->reloads++;
        } else {
            shm->reload_failures++;
        }
    }
}

void
gw_metrics_worker_restart(void)
{
    if (shm != NULL) {
        shm->restarts++;
    }
}

void
gw_metrics_worker_stall(void)
{
    if (shm != NULL) {
        shm->stalls++;
    }
}

static void
app_write(struct gw_app_series *a, const char *name, const char *help,
          const char *labels, double value, int used)
{
    __atomic_store_n(&a->seq, a->seq + 1, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (name != NULL) {
        snprintf(a->name, sizeof(a->name), "%s", name);
        snprintf(a->help, sizeof(a->help), "%s", help);
        snprintf(a->labels, sizeof(a->labels), "%s", labels);
    }
    a->value = value;
    a->at = gw_loop_mono_fresh();
    a->used = (uint32_t) used;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    __atomic_store_n(&a->seq, a->seq + 1, __ATOMIC_RELEASE);
}

static struct gw_app_series *
app_find(const char *name, const char *labels)
{
    for (int i = 0; i < GW_METRICS_APP_SERIES; i++) {
        struct gw_app_series *a = &mine->app[i];

        if (a->used && strcmp(a->name, name) == 0
            && strcmp(a->labels, labels) == 0) {
            return a;
        }
    }
    return NULL;
}

int
gw_metrics_gauge_set(const char *name, const char *help, const char *labels,
                     double value)
{
    struct gw_app_series *a;

    if (mine == NULL) {
        return GW_ERR;
    }
    a = app_find(name, labels);
    if (a != NULL) {
        app_write(a, NULL, NULL, NULL, value, 1);
        return GW_OK;
    }
    for (int i = 0; i < GW_METRICS_APP_SERIES; i++) {
        if (!mine->app[i].used) {
            app_write(&mine->app[i], name, help, labels, value, 1);
            return GW_OK;
        }
    }
    return GW_ERR;
}

int
gw_metrics_gauge_remove(const char *name, const char *labels)
{
    struct gw_app_series *a;

    if (mine == NULL) {
        return GW_ERR;
    }
    a = app_find(name, labels);
    if (a == NULL) {
        return GW_ERR;
    }
    app_write(a, NULL, NULL, NULL, 0, 0);
    return GW_OK;
}

/* A consistent copy of a (the writer may be mid-update). returns: 1 with
 * *out filled when a holds a series, else 0. */
static int
app_read(const struct gw_app_series *a, struct gw_app_series *out)
{
    for (int tries = 0; tries < 4; tries++) {
        uint32_t s1 = __atomic_load_n(&a->seq, __ATOMIC_ACQUIRE);

        if (s1 & 1u) {
            continue;
        }
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        memcpy(out, a, sizeof(*out));
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (__atomic_load_n(&a->seq, __ATOMIC_ACQUIRE) == s1) {
            out->name[sizeof(out->name) - 1] = '\0';
            out->help[sizeof(out->help) - 1] = '\0';
            out->labels[sizeof(out->labels) - 1] = '\0';
            return out->used != 0;
        }
    }
    return 0;
}

unsigned
gw_metrics_generation(void)
{
    return generation;
}

static uint32_t
ctr_hash(int family, const char *labels)
{
    uint32_t h = 2166136261u ^ (uint32_t) family;

    for (; *labels; labels++) {
        h = (h ^ (unsigned char) *labels) * 16777619u;
    }
    return h;
}

/* The family named name in slot s, or -1. */
static int
fam_find(const struct gw_slot *s, const char *name)
{
    for (int i = 0; i < s->nfam; i++) {
        if (s->fam[i].used && strcmp(s->fam[i].name, name) == 0) {
            return i;
        }
    }
    return -1;
}

/* Appends a series (family f, labels) to slot s; its index, or -1 when
 * the table is full. Publishes it (used, then nctr) for the master. */
static int
ctr_new(struct gw_slot *s, int f, const char *labels)
{
    struct gw_counter_series *c;
    int i = s->nctr;

    if (i >= GW_METRICS_COUNTERS) {
        return -1;
    }
    c = &s->ctr[i];
    c->family = f;
    c->value = 0;
    snprintf(c->labels, sizeof(c->labels), "%s", labels);
    __atomic_store_n(&c->used, 1, __ATOMIC_RELEASE);
    __atomic_store_n(&s->nctr, i + 1, __ATOMIC_RELEASE);
    return i;
}

/* Registers family name in slot s (with its overflow series); its index
 * or -1 when the slot has no room. */
static int
fam_new(struct gw_slot *s, const char *name, const char *help,
        const char *overflow_labels, int max_series)
{
    struct gw_counter_family *f;
    int i = s->nfam;

    if (i >= GW_METRICS_FAMILIES || s->nctr >= GW_METRICS_COUNTERS) {
        return -1;
    }
    f = &s->fam[i];
    snprintf(f->name, sizeof(f->name), "%s", name);
    snprintf(f->help, sizeof(f->help), "%s", help);
    f->max_series = max_series < 1 ? 1 : max_series;
    f->nseries = 1;
    /* the overflow series first: the master skips a series whose family
     * is not published yet, and reads the family whole once it is */
    f->overflow = ctr_new(s, i, overflow_labels);
    __atomic_store_n(&f->used, 1, __ATOMIC_RELEASE);
    __atomic_store_n(&s->nfam, i + 1, __ATOMIC_RELEASE);
    return i;
}

int
gw_metrics_counter_family(const char *name, const char *help,
                          const char *overflow_labels, int max_series)
{
    int f;

    if (mine == NULL) {
        return -1;
    }
    f = fam_find(mine, name);
    if (f >= 0) {
        return f;
    }
    return fam_new(mine, name, help, overflow_labels, max_series);
}

/* The series of (f, labels) in this worker's slot, made when new and
 * under the caps; else the family's overflow series. */
static int
ctr_series(int f, const char *labels, int create)
{
    struct gw_counter_family *fm = &mine->fam[f];
    uint32_t h;
    int i;

    if (labels == NULL) {
        return fm->overflow;
    }
    h = ctr_hash(f, labels) % CTR_INDEX;
    for (int probes = 0; probes < CTR_INDEX; probes++) {
        int32_t e = ctr_index[h];

        if (e == 0) {
            break;
        }
        if (mine->ctr[e - 1].family == f
            && strcmp(mine->ctr[e - 1].labels, labels) == 0) {
            return e - 1;
        }
        h = (h + 1) % CTR_INDEX;
    }
    if (!create) {
        return -1;
    }
    if (fm->nseries >= fm->max_series) {
        return fm->overflow;
    }
    i = ctr_new(mine, f, labels);
    if (i < 0) {
        return fm->overflow;
    }
    fm->nseries++;
    ctr_index[h] = i + 1;       /* the empty entry the probe stopped at */
    return i;
}

int
gw_metrics_counter_add(int family, const char *labels, double n)
{
    struct gw_counter_series *c;
    int i;
    double v;

    if (mine == NULL || family < 0 || family >= mine->nfam) {
        return GW_ERR;
    }
    i = ctr_series(family, labels, 1);
    if (i < 0) {
        return GW_ERR;
    }
    c = &mine->ctr[i];
    v = c->value + n;
    __atomic_store(&c->value, &v, __ATOMIC_RELAXED);
    return GW_OK;
}

double
gw_metrics_counter_get(int family, const char *labels)
{
    int i;

    if (mine == NULL || family < 0 || family >= mine->nfam) {
        return 0;
    }
    i = ctr_series(family, labels, 0);
    return i < 0 ? 0 : mine->ctr[i].value;
}

/* Master: adds the counters of slot from into slot to (the retired
 * totals): by family name and labels, into to's overflow series when to
 * has no room. */
static void
ctr_fold(struct gw_slot *to, const struct gw_slot *from)
{
    int nctr = from->nctr < GW_METRICS_COUNTERS ? from->nctr
               : GW_METRICS_COUNTERS;

    for (int i = 0; i < nctr; i++) {
        const struct gw_counter_series *c = &from->ctr[i];
        const struct gw_counter_family *ff;
        struct gw_counter_family *tf;
        int f, j;

        if (!c->used || c->family < 0 || c->family >= from->nfam) {
            continue;
        }
        ff = &from->fam[c->family];
        f = fam_find(to, ff->name);
        if (f < 0) {
            f = fam_new(to, ff->name, ff->help, from->ctr[ff->overflow].labels,
                        ff->max_series);
            if (f < 0) {
                continue;           /* no room: dropped (48 names) */
            }
        }
        tf = &to->fam[f];
        if (i == ff->overflow) {
            to->ctr[tf->overflow].value += c->value;
            continue;
        }
        for (j = 0; j < to->nctr; j++) {
            if (to->ctr[j].family == f
                && strcmp(to->ctr[j].labels, c->labels) == 0) {
                break;
            }
        }
        if (j == to->nctr) {
            j = tf->nseries < tf->max_series ? ctr_new(to, f, c->labels) : -1;
            if (j < 0) {
                j = tf->overflow;
            } else {
                tf->nseries++;
            }
        }
        to->ctr[j].value += c->value;
    }
}

/* The histogram family named name in slot s, or -1. */
static int
hfam_find(const struct gw_slot *s, const char *name)
{
    for (int i = 0; i < s->nhfam; i++) {
        if (s->hfam[i].used && strcmp(s->hfam[i].name, name) == 0) {
            return i;
        }
    }
    return -1;
}

/* Appends a histogram series (family f, labels) to slot s; its index, or
 * -1 when the table is full. Published as ctr_new publishes. */
static int
hist_new(struct gw_slot *s, int f, const char *labels)
{
    struct gw_hist_series *h;
    int i = s->nhist;

    if (i >= GW_METRICS_HISTOGRAMS) {
        return -1;
    }
    h = &s->hist[i];
    h->family = f;
    h->sum = 0;
    memset(h->n, 0, sizeof(h->n));
    snprintf(h->labels, sizeof(h->labels), "%s", labels);
    __atomic_store_n(&h->used, 1, __ATOMIC_RELEASE);
    __atomic_store_n(&s->nhist, i + 1, __ATOMIC_RELEASE);
    return i;
}

/* Registers histogram name in slot s (with its overflow series); its
 * index, or -1 when the slot has no room. nle is clamped to
 * GW_METRICS_HBUCKETS (the binding checks it). */
static int
hfam_new(struct gw_slot *s, const char *name, const char *help,
         const char *overflow_labels, int max_series, const double *le,
         int nle)
{
    struct gw_hist_family *f;
    int i = s->nhfam;

    if (i >= GW_METRICS_HFAMILIES || s->nhist >= GW_METRICS_HISTOGRAMS) {
        return -1;
    }
    f = &s->hfam[i];
    snprintf(f->name, sizeof(f->name), "%s", name);
    snprintf(f->help, sizeof(f->help), "%s", help);
    f->max_series = max_series < 1 ? 1 : max_series;
    f->nseries = 1;
    f->nle = nle < 0 ? 0 : nle > GW_METRICS_HBUCKETS ? GW_METRICS_HBUCKETS
             : nle;
    memcpy(f->le, le, (size_t) f->nle * sizeof(f->le[0]));
    f->overflow = hist_new(s, i, overflow_labels);
    __atomic_store_n(&f->used, 1, __ATOMIC_RELEASE);
    __atomic_store_n(&s->nhfam, i + 1, __ATOMIC_RELEASE);
    return i;
}

int
gw_metrics_histogram_family(const char *name, const char *help,
                            const char *overflow_labels, int max_series,
                            const double *le, int nle)
{
    int f;

    if (mine == NULL) {
        return -1;
    }
    f = hfam_find(mine, name);
    if (f >= 0) {
        return f;
    }
    return hfam_new(mine, name, help, overflow_labels, max_series, le, nle);
}

/* The series of (f, labels) in this worker's slot, made when new and
 * under the caps; else the family's overflow series (-1 with create 0
 * when not held). */
static int
hist_series(int f, const char *labels, int create)
{
    struct gw_hist_family *fm = &mine->hfam[f];
    uint32_t h;
    int i;

    if (labels == NULL) {
        return fm->overflow;
    }
    h = ctr_hash(f, labels) % HIST_INDEX;
    for (int probes = 0; probes < HIST_INDEX; probes++) {
        int32_t e = hist_index[h];

        if (e == 0) {
            break;
        }
        if (mine->hist[e - 1].family == f
            && strcmp(mine->hist[e - 1].labels, labels) == 0) {
            return e - 1;
        }
        h = (h + 1) % HIST_INDEX;
    }
    if (!create) {
        return -1;
    }
    if (fm->nseries >= fm->max_series) {
        return fm->overflow;
    }
    i = hist_new(mine, f, labels);
    if (i < 0) {
        return fm->overflow;
    }
    fm->nseries++;
    hist_index[h] = i + 1;
    return i;
}

/* The bucket of v among nle ascending bounds le: the first bound v is
 * not above, or nle (+Inf). NaN counts in +Inf. */
static int
hist_bucket(const double *le, int nle, double v)
{
    int lo = 0, hi = nle;

    while (lo < hi) {
        int mid = (lo + hi) / 2;

        if (v <= le[mid]) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    return lo;
}

int
gw_metrics_histogram_observe(int family, const char *labels, double v,
                             double n)
{
    struct gw_hist_family *fm;
    struct gw_hist_series *h;
    double x;
    int i, b;

    if (mine == NULL || family < 0 || family >= mine->nhfam) {
        return GW_ERR;
    }
    i = hist_series(family, labels, 1);
    if (i < 0) {
        return GW_ERR;
    }
    fm = &mine->hfam[family];
    h = &mine->hist[i];
    b = isnan(v) ? fm->nle : hist_bucket(fm->le, fm->nle, v);
    x = h->n[b] + n;
    __atomic_store(&h->n[b], &x, __ATOMIC_RELAXED);
    x = h->sum + v * n;
    __atomic_store(&h->sum, &x, __ATOMIC_RELAXED);
    return GW_OK;
}

void
gw_metrics_histogram_get(int family, const char *labels, double *count,
                         double *sum)
{
    int i;

    *count = 0;
    *sum = 0;
    if (mine == NULL || family < 0 || family >= mine->nhfam) {
        return;
    }
    i = hist_series(family, labels, 0);
    if (i < 0) {
        return;
    }
    for (int b = 0; b <= mine->hfam[family].nle; b++) {
        *count += mine->hist[i].n[b];
    }
    *sum = mine->hist[i].sum;
}

/* Adds the bucket counts n (bounds from_le, from_nle of them) into to
 * (bounds to_le, to_nle): each bucket into the first of to whose bound
 * is not below its own (+Inf past them), so counts under a bound stay
 * under it. The same bounds (the usual case) add bucket by bucket; other
 * bounds are a histogram of one name changed by a reload. */
static void
hist_add(const double *from_le, int from_nle, const double *n,
         const double *to_le, int to_nle, double *to)
{
    for (int b = 0; b <= from_nle; b++) {
        int j = b == from_nle ? to_nle
                : hist_bucket(to_le, to_nle, from_le[b]);

        to[j] += n[b];
    }
}

/* Master: adds the histograms of slot from into slot to (the retired
 * totals), as ctr_fold does the counters. */
static void
hist_fold(struct gw_slot *to, const struct gw_slot *from)
{
    int nhist = from->nhist < GW_METRICS_HISTOGRAMS ? from->nhist
                : GW_METRICS_HISTOGRAMS;

    for (int i = 0; i < nhist; i++) {
        const struct gw_hist_series *h = &from->hist[i];
        const struct gw_hist_family *ff;
        struct gw_hist_family *tf;
        int f, j;

        if (!h->used || h->family < 0 || h->family >= from->nhfam) {
            continue;
        }
        ff = &from->hfam[h->family];
        f = hfam_find(to, ff->name);
        if (f < 0) {
            f = hfam_new(to, ff->name, ff->help,
                         from->hist[ff->overflow].labels, ff->max_series,
                         ff->le, ff->nle);
            if (f < 0) {
                continue;           /* no room: dropped */
            }
        }
        tf = &to->hfam[f];
        j = -1;
        if (i != ff->overflow) {
            for (j = 0; j < to->nhist; j++) {
                if (to->hist[j].family == f
                    && strcmp(to->hist[j].labels, h->labels) == 0) {
                    break;
                }
            }
            if (j == to->nhist) {
                j = tf->nseries < tf->max_series
                    ? hist_new(to, f, h->labels) : -1;
                if (j >= 0) {
                    tf->nseries++;
                }
            }
        }
        if (j < 0) {
            j = tf->overflow;
        }
        hist_add(ff->le, ff->nle, h->n, tf->le, tf->nle, to->hist[j].n);
        to->hist[j].sum += h->sum;
    }
}

struct buf {
    char  *p;
    size_t len, cap;
};

static void
bprintf(struct buf *b, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void
bprintf(struct buf *b, const char *fmt, ...)
{
    va_list ap;
    int n;

    if (b->p == NULL) {
        return;
    }
    for (;;) {
        va_start(ap, fmt);
        n = vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
        va_end(ap);
        if (n < 0) {
            return;
        }
        if ((size_t) n < b->cap - b->len) {
            b->len += (size_t) n;
            return;
        }
        {
            char *q = realloc(b->p, b->cap * 2 + (size_t) n);
            if (q == NULL) {
                free(b->p);
                b->p = NULL;
                return;
            }
            b->p = q;
            b->cap = b->cap * 2 + (size_t) n;
        }
    }
}

/* Label values come from route patterns the app registered: escape. */
static void
blabel(struct buf *b, const char *s)
{
    for (; *s; s++) {
        if (*s == '"' || *s == '\\') {
            bprintf(b, "\\%c", *s);
        } else if (*s == '\n') {
            bprintf(b, "\\n");
        } else {
            bprintf(b, "%c", *s);
        }
    }
}

/* The sum of an edge count over live workers and retired ones. */
static unsigned long long
edge_sum(int event)
{
    uint64_t n = shm->retired.edge[event];

    for (int i = 0; i < shm->nslots; i++) {
        if (shm->slots[i].pid > 0) {
            n += shm->slots[i].edge[event];
        }
    }
    return (unsigned long long) n;
}

static void
edge_metrics(struct buf *b)
{
    bprintf(b, "# HELP paygate_connections_reclaimed_total Connections "
               "closed at the connection cap to admit new ones, by reason: "
               "idle (a lingering close, an idle keep-alive connection, a "
               "new one silent for 1 s), slow_head (the one reading its "
               "head longest, 1 s at least).\n"
               "# TYPE paygate_connections_reclaimed_total counter\n"
               "paygate_connections_reclaimed_total{reason=\"idle\"} %llu\n"
               "paygate_connections_reclaimed_total{reason=\"slow_head\"} "
               "%llu\n",
            edge_sum(GW_EDGE_RECLAIMED), edge_sum(GW_EDGE_RECLAIMED_HEAD));
    bprintf(b, "# HELP paygate_connections_lingered_total Connections "
               "closed after their answer with the client's further bytes "
               "read and dropped first (a refused body, pipelined "
               "requests, plain HTTP on the TLS port), so that no reset "
               "destroys the answer.\n"
               "# TYPE paygate_connections_lingered_total counter\n"
               "paygate_connections_lingered_total %llu\n",
            edge_sum(GW_EDGE_LINGERED));
    bprintf(b, "# HELP paygate_tls_handshakes_total Completed TLS "
               "handshakes, full or resumed.\n"
               "# TYPE paygate_tls_handshakes_total counter\n"
               "paygate_tls_handshakes_total{type=\"full\"} %llu\n"
               "paygate_tls_handshakes_total{type=\"resumed\"} %llu\n",
            edge_sum(GW_EDGE_TLS_FULL), edge_sum(GW_EDGE_TLS_RESUMED));
    bprintf(b, "# HELP paygate_tls_handshake_failures_total Failed TLS "
               "handshakes by reason.\n"
               "# TYPE paygate_tls_handshake_failures_total counter\n");
    for (int e = GW_EDGE_TLS_FAIL_PROTOCOL; e < GW_EDGE_NEVENTS; e++) {
        bprintf(b, "paygate_tls_handshake_failures_total{reason=\"%s\"} "
                   "%llu\n", gw_edge_event_name(e), edge_sum(e));
    }
    bprintf(b, "# HELP paygate_tls_ticket_key_rotations_total Session-"
               "ticket key rotations since start.\n"
               "# TYPE paygate_tls_ticket_key_rotations_total counter\n"
               "paygate_tls_ticket_key_rotations_total %llu\n",
            (unsigned long long) gw_tls_tickets_rotations());
}

/* One gauge set per shared dictionary (read without its lock). */
static void
shared_metrics(struct buf *b)
{
    static const char *help[4][2] = {
        { "paygate_shared_capacity_bytes", "Bytes a shared dictionary "
          "holds for entries." },
        { "paygate_shared_used_bytes", "Bytes of a shared dictionary in "
          "use." },
        { "paygate_shared_entries", "Entries in a shared dictionary." },
        { "paygate_shared_evictions_total", "Live entries a shared "
          "dictionary dropped for room (least recently used)." },
    };
    struct gw_shd_stats st;
    struct gw_shdict *d;

    for (int k = 0; k < 4; k++) {
        bprintf(b, "# HELP %s %s\n# TYPE %s %s\n", help[k][0], help[k][1],
                help[k][0], k == 3 ? "counter" : "gauge");
        for (int i = 0; (d = gw_shdict_at(i)) != NULL; i++) {
            double v;

            gw_shdict_stats(d, &st);
            v = k == 0 ? (double) st.capacity : k == 1 ? (double) st.used
                : k == 2 ? (double) st.entries : (double) st.evictions;
            bprintf(b, "%s{dict=\"%s\"} %.0f\n", help[k][0],
                    gw_shdict_name(d), v);
        }
    }
}

/* A sample value as the text exposition format spells it: NaN, +Inf and
 * -Inf (printf's nan, inf would not parse), else %.17g. Writes into out
 * (at least 32 bytes) and returns it. */
static const char *
sample_value(char *out, size_t n, double v)
{
    if (isnan(v)) {
        return "NaN";
    }
    if (isinf(v)) {
        return v > 0 ? "+Inf" : "-Inf";
    }
    snprintf(out, n, "%.17g", v);
    return out;
}

/* The gauges apps set: every (name, labels) held by a live worker, with
 * the value of the worker that set it last (each worker computes the
 * same fact, e.g. a certificate's days left, at its own moment). A name's
 * HELP is the one of that first series met. Values are printed %.17g
 * (sample_value). */
static void
app_metrics(struct buf *b)
{
    struct gw_app_series *all;
    int n = 0, maxn = 0;

    /* room for every series the live workers hold now (one a worker adds
     * meanwhile shows at the next scrape) */
    for (int i = 0; i < shm->nslots; i++) {
        for (int j = 0; shm->slots[i].pid > 0 && j < GW_METRICS_APP_SERIES;
             j++) {
            maxn += __atomic_load_n(&shm->slots[i].app[j].used,
                                    __ATOMIC_ACQUIRE) != 0;
        }
    }
    if (maxn == 0 || (all = calloc((size_t) maxn, sizeof(*all))) == NULL) {
        return;
    }
    for (int i = 0; i < shm->nslots; i++) {
        if (shm->slots[i].pid <= 0) {
            continue;
        }
        for (int j = 0; j < GW_METRICS_APP_SERIES; j++) {
            struct gw_app_series c;
            int k;

            if (!app_read(&shm->slots[i].app[j], &c)) {
                continue;
            }
            for (k = 0; k < n; k++) {
                if (strcmp(all[k].name, c.name) == 0
                    && strcmp(all[k].labels, c.labels) == 0) {
                    break;
                }
            }
            if (k < n) {
                if (c.at > all[k].at) {
                    all[k].value = c.value;
                    all[k].at = c.at;
                }
            } else if (n < maxn) {
                all[n++] = c;
            }
        }
    }
    for (int k = 0; k < n; k++) {
        int first = 1;

        for (int x = 0; x < k; x++) {
            if (strcmp(all[x].name, all[k].name) == 0) {
                first = 0;
                break;
            }
        }
        if (!first) {
            continue;
        }
        bprintf(b, "# HELP %s %s\n# TYPE %s gauge\n", all[k].name,
                all[k].help, all[k].name);
        for (int x = k; x < n; x++) {
            if (strcmp(all[x].name, all[k].name) != 0) {
                continue;
            }
            char num[32];
            const char *v = sample_value(num, sizeof(num), all[x].value);

            if (all[x].labels[0] != '\0') {
                bprintf(b, "%s{%s} %s\n", all[x].name, all[x].labels, v);
            } else {
                bprintf(b, "%s %s\n", all[x].name, v);
            }
        }
    }
    free(all);
}

/* A copy of one counter series for rendering. */
struct ctr_row {
    const char *name;               /* the family's, in a copy */
    const char *help;
    int         max_series;
    int         overflow;           /* 1: the family's overflow series */
    double      value;
    char        labels[GW_METRICS_LABELS_MAX];
};

struct ctr_fam_copy {
    char name[GW_METRICS_NAME_MAX];
    char help[GW_METRICS_HELP_MAX];
};

static int
ctr_row_cmp(const void *a, const void *b)
{
    const struct ctr_row *x = a, *y = b;
    int c = strcmp(x->name, y->name);

    if (c != 0) {
        return c;
    }
    if (x->overflow != y->overflow) {
        return x->overflow - y->overflow;
    }
    return strcmp(x->labels, y->labels);
}

/* The counters apps increment: per (name, labels) the sum over the
 * retired totals and every live worker. A name shows at most its cap of
 * label sets (workers may each hold different ones): the rest are added
 * to its overflow series. */
static void
counter_metrics(struct buf *b)
{
    int cap = 0, capf = 0, n = 0, nf = 0;
    struct ctr_row *rows;
    struct ctr_fam_copy *fams;

    for (int i = -1; i < shm->nslots; i++) {
        struct gw_slot *s = i < 0 ? &shm->retired : &shm->slots[i];

        if (i < 0 || s->pid > 0) {
            cap += GW_METRICS_COUNTERS;
            capf += GW_METRICS_FAMILIES;
        }
    }
    rows = calloc((size_t) cap, sizeof(*rows));
    fams = calloc((size_t) capf, sizeof(*fams));
    if (rows == NULL || fams == NULL) {
        free(rows);
        free(fams);
        return;
    }
    for (int i = -1; i < shm->nslots; i++) {
        struct gw_slot *s = i < 0 ? &shm->retired : &shm->slots[i];
        int nfam, nctr, base = nf;

        if (i >= 0 && s->pid <= 0) {
            continue;
        }
        if (nf + GW_METRICS_FAMILIES > capf || n + GW_METRICS_COUNTERS > cap) {
            break;                  /* a worker started since the count */
        }
        nfam = __atomic_load_n(&s->nfam, __ATOMIC_ACQUIRE);
        nctr = __atomic_load_n(&s->nctr, __ATOMIC_ACQUIRE);
        nfam = nfam > GW_METRICS_FAMILIES ? GW_METRICS_FAMILIES : nfam;
        nctr = nctr > GW_METRICS_COUNTERS ? GW_METRICS_COUNTERS : nctr;
        for (int f = 0; f < nfam; f++) {
            struct gw_counter_family *fm = &s->fam[f];

            if (!__atomic_load_n(&fm->used, __ATOMIC_ACQUIRE)) {
                fams[nf].name[0] = '\0';
            } else {
                memcpy(fams[nf].name, fm->name, sizeof(fams[nf].name));
                memcpy(fams[nf].help, fm->help, sizeof(fams[nf].help));
                fams[nf].name[sizeof(fams[nf].name) - 1] = '\0';
                fams[nf].help[sizeof(fams[nf].help) - 1] = '\0';
            }
            nf++;
        }
        for (int j = 0; j < nctr; j++) {
            struct gw_counter_series *c = &s->ctr[j];
            struct ctr_row *r = &rows[n];
            int f;

            if (!__atomic_load_n(&c->used, __ATOMIC_ACQUIRE)) {
                continue;
            }
            f = c->family;
            if (f < 0 || f >= nfam || fams[base + f].name[0] == '\0') {
                continue;
            }
            r->name = fams[base + f].name;
            r->help = fams[base + f].help;
            r->max_series = s->fam[f].max_series;
            /* a counter without labels has one series: the retired
             * totals keep a dead worker's count in their overflow
             * series, shown with the live ones, not apart as name{} */
            r->overflow = s->fam[f].overflow == j && c->labels[0] != '\0';
            __atomic_load(&c->value, &r->value, __ATOMIC_RELAXED);
            memcpy(r->labels, c->labels, sizeof(r->labels));
            r->labels[sizeof(r->labels) - 1] = '\0';
            n++;
        }
    }
    qsort(rows, (size_t) n, sizeof(*rows), ctr_row_cmp);
    for (int k = 0; k < n;) {
        const char *name = rows[k].name;
        int held = 1, end = k;      /* the overflow series counts as one */
        double extra = 0;

        while (end < n && strcmp(rows[end].name, name) == 0) {
            end++;
        }
        bprintf(b, "# HELP %s %s\n# TYPE %s counter\n", name, rows[k].help,
                name);
        for (int x = k; x < end;) {
            int y = x + 1;
            double v = rows[x].value;
            char num[32];

            while (y < end && rows[y].overflow == rows[x].overflow
                   && strcmp(rows[y].labels, rows[x].labels) == 0) {
                v += rows[y++].value;
            }
            if (rows[x].overflow) {
                v += extra;
                if (v > 0) {
                    bprintf(b, "%s{%s} %s\n", name, rows[x].labels,
                            sample_value(num, sizeof(num), v));
                }
            } else if (held < rows[x].max_series) {
                held++;
                if (rows[x].labels[0] != '\0') {
                    bprintf(b, "%s{%s} %s\n", name, rows[x].labels,
                            sample_value(num, sizeof(num), v));
                } else {
                    bprintf(b, "%s %s\n", name,
                            sample_value(num, sizeof(num), v));
                }
            } else {
                extra += v;         /* past the cap: into the overflow */
            }
            x = y;
        }
        k = end;
    }
    free(rows);
    free(fams);
}

/* A copy of one histogram series for rendering. */
struct hist_row {
    const char   *name;             /* the family's, in a copy */
    const char   *help;
    const double *le;               /* the family's bounds, in a copy */
    int           nle;
    int           max_series;
    int           overflow;         /* 1: the family's overflow series */
    int           live;             /* 1: a live worker's, 0: retired */
    double        sum;
    double        n[GW_METRICS_HBUCKETS + 1];
    char          labels[GW_METRICS_LABELS_MAX];
};

struct hist_fam_copy {
    char   name[GW_METRICS_NAME_MAX];
    char   help[GW_METRICS_HELP_MAX];
    int    nle;
    double le[GW_METRICS_HBUCKETS];
};

static int
hist_row_cmp(const void *a, const void *b)
{
    const struct hist_row *x = a, *y = b;
    int c = strcmp(x->name, y->name);

    if (c != 0) {
        return c;
    }
    if (x->overflow != y->overflow) {
        return x->overflow - y->overflow;
    }
    return strcmp(x->labels, y->labels);
}

/* A bucket bound as le's value: the shortest %g that reads back as v,
 * without an exponent where one is not needed ("0.01", "2.5", "30", not
 * "3e+01"). Writes into out (at least 32 bytes). */
static const char *
le_text(char *out, size_t n, double v)
{
    int plain = fabs(v) >= 1e-4 && fabs(v) < 1e15;

    for (int p = 1; p <= 17; p++) {
        snprintf(out, n, "%.*g", p, v);
        if (strtod(out, NULL) == v && !(plain && strchr(out, 'e') != NULL)) {
            break;
        }
    }
    return out;
}

/* One histogram series: its cumulative buckets, sum and count. */
static void
hist_print(struct buf *b, const char *name, const char *labels,
           const double *le, int nle, const double *n, double sum)
{
    char num[32], bound[32];
    const char *sep = labels[0] != '\0' ? "," : "";
    double acc = 0;

    for (int x = 0; x <= nle; x++) {
        acc += n[x];
        bprintf(b, "%s_bucket{%s%sle=\"%s\"} %s\n", name, labels, sep,
                x == nle ? "+Inf" : le_text(bound, sizeof(bound), le[x]),
                sample_value(num, sizeof(num), acc));
    }
    if (labels[0] != '\0') {
        bprintf(b, "%s_sum{%s} %s\n", name, labels,
                sample_value(num, sizeof(num), sum));
        bprintf(b, "%s_count{%s} %s\n", name, labels,
                sample_value(bound, sizeof(bound), acc));
    } else {
        bprintf(b, "%s_sum %s\n", name, sample_value(num, sizeof(num), sum));
        bprintf(b, "%s_count %s\n", name,
                sample_value(bound, sizeof(bound), acc));
    }
}

/* The histograms apps observe into: per (name, labels) the sum over the
 * retired totals and every live worker, in the bounds of the name's first
 * series held by a live worker (the retired totals' only when no live
 * worker holds it: buckets changed by a reload are shown once its
 * workers run, the older counts merged into them by hist_add, not the
 * first generation's for as long as the server runs); past a name's cap
 * of label sets, into its overflow series (shown once it holds a
 * count). */
static void
hist_metrics(struct buf *b)
{
    int cap = 0, capf = 0, n = 0, nf = 0;
    struct hist_row *rows;
    struct hist_fam_copy *fams;

    for (int i = -1; i < shm->nslots; i++) {
        struct gw_slot *s = i < 0 ? &shm->retired : &shm->slots[i];

        if (i < 0 || s->pid > 0) {
            cap += GW_METRICS_HISTOGRAMS;
            capf += GW_METRICS_HFAMILIES;
        }
    }
    rows = calloc((size_t) cap, sizeof(*rows));
    fams = calloc((size_t) capf, sizeof(*fams));
    if (rows == NULL || fams == NULL) {
        free(rows);
        free(fams);
        return;
    }
    for (int i = -1; i < shm->nslots; i++) {
        struct gw_slot *s = i < 0 ? &shm->retired : &shm->slots[i];
        int nfam, nhist, base = nf;

        if (i >= 0 && s->pid <= 0) {
            continue;
        }
        if (nf + GW_METRICS_HFAMILIES > capf
            || n + GW_METRICS_HISTOGRAMS > cap) {
            break;                  /* a worker started since the count */
        }
        nfam = __atomic_load_n(&s->nhfam, __ATOMIC_ACQUIRE);
        nhist = __atomic_load_n(&s->nhist, __ATOMIC_ACQUIRE);
        nfam = nfam > GW_METRICS_HFAMILIES ? GW_METRICS_HFAMILIES : nfam;
        nhist = nhist > GW_METRICS_HISTOGRAMS ? GW_METRICS_HISTOGRAMS
                : nhist;
        for (int f = 0; f < nfam; f++) {
            struct gw_hist_family *fm = &s->hfam[f];
            struct hist_fam_copy *c = &fams[nf++];

            if (!__atomic_load_n(&fm->used, __ATOMIC_ACQUIRE)) {
                c->name[0] = '\0';
                continue;
            }
            memcpy(c->name, fm->name, sizeof(c->name));
            memcpy(c->help, fm->help, sizeof(c->help));
            c->name[sizeof(c->name) - 1] = '\0';
            c->help[sizeof(c->help) - 1] = '\0';
            c->nle = fm->nle < 0 ? 0 : fm->nle > GW_METRICS_HBUCKETS
                     ? GW_METRICS_HBUCKETS : fm->nle;
            memcpy(c->le, fm->le, sizeof(c->le));
        }
        for (int j = 0; j < nhist; j++) {
            struct gw_hist_series *h = &s->hist[j];
            struct hist_row *r = &rows[n];
            struct hist_fam_copy *c;
            int f;

            if (!__atomic_load_n(&h->used, __ATOMIC_ACQUIRE)) {
                continue;
            }
            f = h->family;
            if (f < 0 || f >= nfam || fams[base + f].name[0] == '\0') {
                continue;
            }
            c = &fams[base + f];
            r->name = c->name;
            r->help = c->help;
            r->le = c->le;
            r->nle = c->nle;
            r->max_series = s->hfam[f].max_series;
            r->overflow = s->hfam[f].overflow == j && h->labels[0] != '\0';
            r->live = i >= 0;
            for (int x = 0; x <= c->nle; x++) {
                __atomic_load(&h->n[x], &r->n[x], __ATOMIC_RELAXED);
            }
            __atomic_load(&h->sum, &r->sum, __ATOMIC_RELAXED);
            memcpy(r->labels, h->labels, sizeof(r->labels));
            r->labels[sizeof(r->labels) - 1] = '\0';
            n++;
        }
    }
    qsort(rows, (size_t) n, sizeof(*rows), hist_row_cmp);
    for (int k = 0; k < n;) {
        const struct hist_row *first = &rows[k];
        int held = 1, end = k;      /* the overflow series counts as one */
        double extra[GW_METRICS_HBUCKETS + 1] = { 0 }, extra_sum = 0;

        while (end < n && strcmp(rows[end].name, first->name) == 0) {
            end++;
        }
        /* the bounds shown: a live worker's (the code running now) */
        for (int x = k; x < end; x++) {
            if (rows[x].live) {
                first = &rows[x];
                break;
            }
        }
        bprintf(b, "# HELP %s %s\n# TYPE %s histogram\n", first->name,
                first->help, first->name);
        for (int x = k; x < end;) {
            double acc[GW_METRICS_HBUCKETS + 1] = { 0 }, sum = 0, total = 0;
            int y = x;

            while (y < end && rows[y].overflow == rows[x].overflow
                   && strcmp(rows[y].labels, rows[x].labels) == 0) {
                hist_add(rows[y].le, rows[y].nle, rows[y].n, first->le,
                         first->nle, acc);
                sum += rows[y++].sum;
            }
            if (rows[x].overflow) {
                for (int z = 0; z <= first->nle; z++) {
                    acc[z] += extra[z];
                    total += acc[z];
                }
                if (total > 0) {
                    hist_print(b, first->name, rows[x].labels, first->le,
                               first->nle, acc, sum + extra_sum);
                }
            } else if (held < rows[x].max_series) {
                held++;
                hist_print(b, first->name, rows[x].labels, first->le,
                           first->nle, acc, sum);
            } else {
                for (int z = 0; z <= first->nle; z++) {
                    extra[z] += acc[z];     /* past the cap: overflow */
                }
                extra_sum += sum;
            }
            x = y;
        }
        k = end;
    }
    free(rows);
    free(fams);
}

char *
gw_metrics_render(size_t *len)
{
    struct buf b = { malloc(16384), 0, 16384 };
    struct gw_slot *sum = calloc(1, sizeof(*sum));
    int workers = 0;

    if (sum == NULL || shm == NULL) {
        free(sum);
        free(b.p);
        return NULL;
    }
    /* sum the retired totals and every live slot */
    for (int i = -1; i < shm->nslots; i++) {
        struct gw_slot *s = i < 0 ? &shm->retired : &shm->slots[i];

        if (i >= 0 && s->pid <= 0) {
            continue;
        }
        if (i >= 0) {
            workers++;
        }
        for (int j = 0; j < s->nroutes && j < ROUTES; j++) {
            struct gw_route_stat *from = &s->routes[j];
            struct gw_route_stat *to = find_route(sum, from->method,
                                                  from->route, from->status);
            if (to == NULL) {
                continue;
            }
            to->count += from->count;
            to->sum += from->sum;
            for (int k = 0; k < BUCKETS; k++) {
                to->le[k] += from->le[k];
            }
        }
    }

    bprintf(&b, "# HELP paygate_requests_total Requests answered, by route "
                "and status.\n# TYPE paygate_requests_total counter\n");
    for (int j = 0; j < sum->nroutes; j++) {
        struct gw_route_stat *r = &sum->routes[j];

        bprintf(&b, "paygate_requests_total{method=\"");
        blabel(&b, r->method);
        bprintf(&b, "\",route=\"");
        blabel(&b, r->route);
        if (strcmp(r->route, OVERFLOW_ROUTE) == 0) {
            bprintf(&b, "\",status=\"%dxx\"} %llu\n", r->status / 100,
                    (unsigned long long) r->count);
        } else {
            bprintf(&b, "\",status=\"%d\"} %llu\n", r->status,
                    (unsigned long long) r->count);
        }
    }
    bprintf(&b, "# HELP paygate_request_duration_seconds Time from a "
                "request's first byte to its response.\n"
                "# TYPE paygate_request_duration_seconds histogram\n");
    /* one histogram per (method, route), statuses summed */
    for (int j = 0; j < sum->nroutes; j++) {
        struct gw_route_stat *r = &sum->routes[j];
        uint64_t le[BUCKETS] = { 0 }, count = 0, acc = 0;
        double total = 0;
        int first = 1;

        for (int k = 0; k < j; k++) {
            if (strcmp(sum->routes[k].method, r->method) == 0
                && strcmp(sum->routes[k].route, r->route) == 0) {
                first = 0;
                break;
            }
        }
        if (!first) {
            continue;
        }
        for (int k = j; k < sum->nroutes; k++) {
            struct gw_route_stat *o = &sum->routes[k];

            if (strcmp(o->method, r->method) != 0
                || strcmp(o->route, r->route) != 0) {
                continue;
            }
            count += o->count;
            total += o->sum;
            for (int x = 0; x < BUCKETS; x++) {
                le[x] += o->le[x];
            }
        }
        for (int x = 0; x < BUCKETS; x++) {
            acc += le[x];
            bprintf(&b, "paygate_request_duration_seconds_bucket{method=\"");
            blabel(&b, r->method);
            bprintf(&b, "\",route=\"");
            blabel(&b, r->route);
            bprintf(&b, "\",le=\"%g\"} %llu\n", bucket_le[x],
                    (unsigned long long) acc);
        }
        bprintf(&b, "paygate_request_duration_seconds_bucket{method=\"");
        blabel(&b, r->method);
        bprintf(&b, "\",route=\"");
        blabel(&b, r->route);
        bprintf(&b, "\",le=\"+Inf\"} %llu\n", (unsigned long long) count);
        bprintf(&b, "paygate_request_duration_seconds_sum{method=\"");
        blabel(&b, r->method);
        bprintf(&b, "\",route=\"");
        blabel(&b, r->route);
        bprintf(&b, "\"} %.6f\n", total);
        bprintf(&b, "paygate_request_duration_seconds_count{method=\"");
        blabel(&b, r->method);
        bprintf(&b, "\",route=\"");
        blabel(&b, r->route);
        bprintf(&b, "\"} %llu\n", (unsigned long long) count);
    }

    bprintf(&b, "# HELP paygate_requests_in_flight Requests being handled."
                "\n# TYPE paygate_requests_in_flight gauge\n");
    for (int i = 0; i < shm->nslots; i++) {
        if (shm->slots[i].pid > 0) {
            bprintf(&b, "paygate_requests_in_flight{pid=\"%d\"} %lld\n",
                    (int) shm->slots[i].pid,
                    (long long) shm->slots[i].in_flight);
        }
    }
    bprintf(&b, "# HELP paygate_connections Open client connections.\n"
                "# TYPE paygate_connections gauge\n");
    for (int i = 0; i < shm->nslots; i++) {
        if (shm->slots[i].pid > 0) {
            bprintf(&b, "paygate_connections{pid=\"%d\"} %lld\n",
                    (int) shm->slots[i].pid, (long long) shm->slots[i].conns);
        }
    }
    bprintf(&b, "# HELP paygate_lua_memory_bytes Lua heap per worker.\n"
                "# TYPE paygate_lua_memory_bytes gauge\n");
    for (int i = 0; i < shm->nslots; i++) {
        if (shm->slots[i].pid > 0) {
            bprintf(&b, "paygate_lua_memory_bytes{pid=\"%d\"} %lld\n",
                    (int) shm->slots[i].pid,
                    (long long) shm->slots[i].lua_bytes);
        }
    }
    bprintf(&b, "# HELP paygate_workers Worker processes alive.\n"
                "# TYPE paygate_workers gauge\npaygate_workers %d\n",
            workers);
    bprintf(&b, "# HELP paygate_reloads_total Successful code reloads.\n"
                "# TYPE paygate_reloads_total counter\n"
                "paygate_reloads_total %llu\n"
                "# HELP paygate_reload_failures_total Reloads refused "
                "because the new code failed to load.\n"
                "# TYPE paygate_reload_failures_total counter\n"
                "paygate_reload_failures_total %llu\n"
                "# HELP paygate_worker_restarts_total Workers restarted "
                "after dying.\n"
                "# TYPE paygate_worker_restarts_total counter\n"
                "paygate_worker_restarts_total %llu\n"
                "# HELP paygate_worker_stalls_total Workers killed because "
                "their event loop stalled (limits.loop_stall).\n"
                "# TYPE paygate_worker_stalls_total counter\n"
                "paygate_worker_stalls_total %llu\n",
            (unsigned long long) shm->reloads,
            (unsigned long long) shm->reload_failures,
            (unsigned long long) shm->restarts,
            (unsigned long long) shm->stalls);
    edge_metrics(&b);
    shared_metrics(&b);
    app_metrics(&b);
    counter_metrics(&b);
    hist_metrics(&b);
    free(sum);
    if (b.p != NULL) {
        *len = b.len;
    }
    return b.p;
}
