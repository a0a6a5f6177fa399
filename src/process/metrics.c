/*
 * metrics.c -- see metrics.h. Each worker writes only its own slot (one
 * writer, no locks); the master reads all slots. Counters are 64-bit and
 * aligned, so a reader sees each one whole.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "loop.h"
#include "metrics.h"
#include "runtime.h"
#include "shdict.h"

#define ROUTES  128             /* distinct (method, route, status) */
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

struct gw_slot {
    pid_t                pid;       /* worker owning it; 0 when free */
    int                  nroutes;   /* entries used */
    int64_t              lua_bytes; /* gauge */
    int64_t              in_flight; /* gauge */
    int64_t              conns;     /* gauge */
    struct gw_route_stat routes[ROUTES];
    struct gw_app_series app[GW_METRICS_APP_SERIES];
};

struct gw_shm {
    uint64_t       reloads;         /* master only */
    uint64_t       reload_failures;
    uint64_t       restarts;
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

void
gw_metrics_attach(int slot)
{
    memset(cache, 0, sizeof(cache));
    if (shm == NULL || slot < 0 || slot >= shm->nslots) {
        mine = calloc(1, sizeof(*mine));    /* exec: private counters */
        return;
    }
    mine = &shm->slots[slot];
    memset(mine, 0, sizeof(*mine));
    mine->pid = getpid();
}

int
gw_metrics_free_slot(void)
{
    for (int i = 0; shm != NULL && i < shm->nslots; i++) {
        if (shm->slots[i].pid == 0) {
            shm->slots[i].pid = -1;         /* reserved until attach */
            return i;
        }
    }
    return -1;
}

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
    memset(s, 0, sizeof(*s));
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
        char m[12];

        snprintf(m, sizeof(m), "%.*s", (int) method_len, method);
        r = find_route(mine, m, route, status);
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
    (void) route_len;
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

/* The gauges apps set: every (name, labels) held by a live worker, with
 * the value of the worker that set it last (each worker computes the
 * same fact, e.g. a certificate's days left, at its own moment). A name's
 * HELP is the one of that first series met. Values are printed %.17g. */
static void
app_metrics(struct buf *b)
{
    enum { MAXN = 64 };
    struct gw_app_series *all = calloc(MAXN, sizeof(*all));
    int n = 0;

    if (all == NULL) {
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
            } else if (n < MAXN) {
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
            if (all[x].labels[0] != '\0') {
                bprintf(b, "%s{%s} %.17g\n", all[x].name, all[x].labels,
                        all[x].value);
            } else {
                bprintf(b, "%s %.17g\n", all[x].name, all[x].value);
            }
        }
    }
    free(all);
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
        bprintf(&b, "\",status=\"%d\"} %llu\n", r->status,
                (unsigned long long) r->count);
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
                "paygate_worker_restarts_total %llu\n",
            (unsigned long long) shm->reloads,
            (unsigned long long) shm->reload_failures,
            (unsigned long long) shm->restarts);
    shared_metrics(&b);
    app_metrics(&b);
    free(sum);
    if (b.p != NULL) {
        *len = b.len;
    }
    return b.p;
}
