/*
 * lmetrics.c -- paygate.metrics: gauges, counters and histograms an app
 * publishes on /metrics.
 *
 *   local metrics = require "paygate.metrics"
 *   local g = metrics.gauge("myapp_queue_depth", "Jobs waiting.")
 *   g:set(12, { queue = "mail" })   -- nil, err when the table is full
 *   g:remove({ queue = "mail" })
 *
 * Each worker holds at most GW_METRICS_APP_SERIES series (one per name and
 * label set) in its metrics slot; the master renders every series a live
 * worker holds, with the value of the worker that set it last. A series
 * dies with its worker (gauges are facts a worker recomputes). Nothing
 * yields.
 *
 *   local c = metrics.counter("myapp_jobs_total", "Jobs run.",
 *                             { "queue", "outcome" }, { max_series = 50 })
 *   c:inc({ queue = "mail", outcome = "ok" })   -- or c:inc({ "mail", "ok" })
 *   c:inc({ queue = "mail", outcome = "ok" }, 3)
 *   n = c:get({ queue = "mail", outcome = "ok" })  -- this worker's count
 *
 * Counters are summed over the workers of one `paygate run`; a worker
 * that dies or is replaced by a reload leaves its counts in the total.
 * Each counter shows at most max_series label sets (default 100); the
 * counts of any other label set (and of a label value longer than the
 * label table holds) go to one overflow series whose every label is
 * "_overflow". A worker holds GW_METRICS_FAMILIES counter names and
 * GW_METRICS_COUNTERS series at most; past that, counts go to overflow.
 *
 *   local h = metrics.histogram("myapp_job_seconds", "Job time.",
 *                               { "queue" }, { buckets = { 0.1, 1, 10 } })
 *   h:observe(0.42, { queue = "mail" })
 *   h:observe(0.42, { queue = "mail" }, 3)     -- three of them at once
 *   count, sum = h:get({ queue = "mail" })     -- this worker's
 *
 * Histograms are summed and capped as counters are (default max_series
 * 32), shown as myapp_job_seconds_bucket{queue,le}, _sum and _count. A
 * worker holds GW_METRICS_HFAMILIES names and GW_METRICS_HISTOGRAMS
 * series at most.
 */
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "lstate.h"
#include "metrics.h"
#include "runtime.h"

#define LMETRICS_MT "paygate.metrics_gauge"
#define LMETRICS_MAX_LABELS 8
#define LMETRICS_CTR_MT "paygate.metrics_counter"
#define LMETRICS_CTR_DEFAULT_SERIES 100
#define LMETRICS_HIST_MT "paygate.metrics_histogram"

struct gw_lgauge {
    char name[GW_METRICS_NAME_MAX];     /* checked [a-z_:][a-z0-9_:]* */
    char help[GW_METRICS_HELP_MAX];     /* printable, no backslash */
};

/* Prometheus metric names (lower case here): [a-z_:][a-z0-9_:]*. */
static int
valid_name(const char *s, size_t len, int colon)
{
    if (len == 0) {
        return 0;
    }
    for (size_t i = 0; i < len; i++) {
        char c = s[i];
        int ok = (c >= 'a' && c <= 'z') || c == '_' || (colon && c == ':')
                 || (i > 0 && c >= '0' && c <= '9');

        if (!ok) {
            return 0;
        }
    }
    return 1;
}

/* Appends s to out (capacity cap, used *n) escaped as a label value, a
 * byte that starts no valid UTF-8 sequence as U+FFFD (the text format is
 * UTF-8: a scraper refuses the whole exposition for one such value);
 * returns 0 when it does not fit. */
static int
put_escaped(char *out, size_t cap, size_t *n, const char *s, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        const char *rep = NULL;
        char one[5] = { s[i], '\0' };
        size_t k;

        if (s[i] == '"') {
            rep = "\\\"";
        } else if (s[i] == '\\') {
            rep = "\\\\";
        } else if (s[i] == '\n') {
            rep = "\\n";
        } else if ((k = gw_utf8_seq((const unsigned char *) s + i,
                                    len - i)) == 0) {
            rep = "\xef\xbf\xbd";
        } else {
            memcpy(one, s + i, k);
            one[k] = '\0';
            i += k - 1;
            rep = one;
        }
        if (*n + strlen(rep) + 1 > cap) {
            return 0;
        }
        memcpy(out + *n, rep, strlen(rep));
        *n += strlen(rep);
    }
    out[*n] = '\0';
    return 1;
}

/* A label name: [a-z_][a-z0-9_]*, under 64 bytes, not "__" reserved. */
static int
valid_label(const char *k, size_t kl)
{
    return valid_name(k, kl, 0) && kl < 64
           && !(kl >= 2 && k[0] == '_' && k[1] == '_');
}

/* Appends 'k="v"' (after a ',' unless first) to out (capacity cap, used
 * *n), v escaped; returns 0 when it does not fit. */
static int
put_label(char *out, size_t cap, size_t *n, int first, const char *k,
          const char *v, size_t vl)
{
    int w = snprintf(out + *n, cap - *n, "%s%s=\"", first ? "" : ",", k);

    if (w < 0 || (size_t) w >= cap - *n) {
        return 0;
    }
    *n += (size_t) w;
    if (!put_escaped(out, cap, n, v, vl) || *n + 2 > cap) {
        return 0;
    }
    out[(*n)++] = '"';
    out[*n] = '\0';
    return 1;
}

/* Checks a metric's name and help (raises with fn's name). */
static void
check_name_help(lua_State *L, const char *fn, const char *name, size_t nl,
                const char *help, size_t hl)
{
    if (!valid_name(name, nl, 1) || nl >= GW_METRICS_NAME_MAX) {
        luaL_error(L, "%s: name must match [a-z_:][a-z0-9_:]* (at most %d "
                   "bytes)", fn, GW_METRICS_NAME_MAX - 1);
    }
    if (hl >= GW_METRICS_HELP_MAX) {
        luaL_error(L, "%s: help is longer than %d bytes", fn,
                   GW_METRICS_HELP_MAX - 1);
    }
    for (size_t i = 0; i < hl; i++) {
        if ((unsigned char) help[i] < 32 || help[i] == 127
            || help[i] == '\\') {
            luaL_error(L, "%s: help must be one line of text without "
                       "backslashes", fn);
        }
    }
}

/* The names metrics.c renders itself (a histogram's with its samples'). */
static const char *const runtime_names[] = {
    "paygate_requests_total", "paygate_request_duration_seconds",
    "paygate_request_duration_seconds_bucket",
    "paygate_request_duration_seconds_sum",
    "paygate_request_duration_seconds_count", "paygate_requests_in_flight",
    "paygate_connections", "paygate_lua_memory_bytes", "paygate_workers",
    "paygate_reloads_total", "paygate_reload_failures_total",
    "paygate_worker_restarts_total", "paygate_connections_reclaimed_total",
    "paygate_connections_lingered_total", "paygate_tls_handshakes_total",
    "paygate_tls_handshake_failures_total",
    "paygate_tls_ticket_key_rotations_total",
    "paygate_shared_capacity_bytes", "paygate_shared_used_bytes",
    "paygate_shared_entries", "paygate_shared_evictions_total", NULL
};

/* Claims name for kind ("gauge" or "counter") in this worker: raises if
 * it is one of the runtime's, or was declared as the other kind. One name
 * shown twice, under two HELP and TYPE lines, is an exposition a scraper
 * refuses (or two samples of one series). */
static void
claim_name(lua_State *L, const char *fn, const char *name, const char *kind)
{
    for (int i = 0; runtime_names[i] != NULL; i++) {
        if (strcmp(runtime_names[i], name) == 0) {
            luaL_error(L, "%s: %s is one of the runtime's own metrics", fn,
                       name);
        }
    }
    lua_getfield(L, LUA_REGISTRYINDEX, "paygate.metrics_kinds");
    if (!lua_istable(L, -1)) {
        lua_pop(L, 1);
        lua_newtable(L);
        lua_pushvalue(L, -1);
        lua_setfield(L, LUA_REGISTRYINDEX, "paygate.metrics_kinds");
    }
    lua_getfield(L, -1, name);
    if (lua_isstring(L, -1) && strcmp(lua_tostring(L, -1), kind) != 0) {
        luaL_error(L, "%s: %s is a %s already", fn, name,
                   lua_tostring(L, -1));
    }
    lua_pop(L, 1);
    lua_pushstring(L, kind);
    lua_setfield(L, -2, name);
    lua_pop(L, 1);
}

static int
cmp_str(const void *a, const void *b)
{
    return strcmp(*(const char *const *) a, *(const char *const *) b);
}

/* Renders the label table at index i into out ('k="v",...' sorted by
 * key). Raises on misuse (no C memory held). */
static void
render_labels(lua_State *L, int i, const char *fn, char *out, size_t cap)
{
    const char *keys[LMETRICS_MAX_LABELS];
    int nk = 0;
    size_t n = 0;

    out[0] = '\0';
    if (lua_isnoneornil(L, i)) {
        return;
    }
    if (!lua_istable(L, i)) {
        luaL_error(L, "%s: labels must be a table", fn);
    }
    lua_pushnil(L);
    while (lua_next(L, i) != 0) {
        size_t kl;
        const char *k;

        if (lua_type(L, -2) != LUA_TSTRING) {
            luaL_error(L, "%s: label names must be strings", fn);
        }
        k = lua_tolstring(L, -2, &kl);
        if (!valid_label(k, kl)) {
            luaL_error(L, "%s: bad label name (want [a-z_][a-z0-9_]*)", fn);
        }
        if (lua_type(L, -1) != LUA_TSTRING && lua_type(L, -1) != LUA_TNUMBER) {
            luaL_error(L, "%s: label %s must be a string or number", fn, k);
        }
        if (nk == LMETRICS_MAX_LABELS) {
            luaL_error(L, "%s: at most %d labels", fn, LMETRICS_MAX_LABELS);
        }
        keys[nk++] = k;                 /* anchored by the table */
        lua_pop(L, 1);
    }
    qsort(keys, (size_t) nk, sizeof(keys[0]), cmp_str);
    for (int j = 0; j < nk; j++) {
        size_t vl;
        const char *v;

        lua_getfield(L, i, keys[j]);
        v = lua_tolstring(L, -1, &vl);  /* a number becomes a string copy */
        if (!put_label(out, cap, &n, j == 0, keys[j], v, vl)) {
            luaL_error(L, "%s: labels too long (at most %d bytes rendered)",
                       fn, (int) cap - 1);
        }
        lua_pop(L, 1);
    }
}

/* syntax: g = metrics.gauge(name, help). Raises on a bad name or help. */
static int
lmetrics_gauge(lua_State *L)
{
    size_t nl, hl;
    const char *name = luaL_checklstring(L, 1, &nl);
    const char *help = luaL_optlstring(L, 2, "", &hl);
    struct gw_lgauge *g;

    check_name_help(L, "metrics.gauge", name, nl, help, hl);
    claim_name(L, "metrics.gauge", name, "gauge");
    g = lua_newuserdata(L, sizeof(*g));
    memcpy(g->name, name, nl + 1);
    memcpy(g->help, help, hl + 1);
    luaL_getmetatable(L, LMETRICS_MT);
    lua_setmetatable(L, -2);
    return 1;
}

/* syntax: ok, err = g:set(value[, labels]). err kind "full" when the
 * worker holds GW_METRICS_APP_SERIES series already. */
static int
lmetrics_set(lua_State *L)
{
    struct gw_lgauge *g = gw_checkudata(L, 1, LMETRICS_MT);
    char labels[GW_METRICS_LABELS_MAX];
    double v;

    if (lua_type(L, 2) != LUA_TNUMBER) {
        return luaL_error(L, "gauge:set: value must be a number");
    }
    v = lua_tonumber(L, 2);
    render_labels(L, 3, "gauge:set", labels, sizeof(labels));
    if (gw_metrics_gauge_set(g->name, g->help, labels, v) != GW_OK) {
        static int said;

        /* said once per worker: a caller that ignores the error (a
         * report's gauges) would otherwise lose series in silence */
        if (!said) {
            said = 1;
            gw_log(GW_LOG_WARN, "metrics: gauge %s: a series is not shown:"
                   " this worker holds %d app series already (said once)",
                   g->name, GW_METRICS_APP_SERIES);
        }
        return gw_push_error(L, "full", 0, "gauge %s: this worker holds %d "
                             "app series already", g->name,
                             GW_METRICS_APP_SERIES);
    }
    lua_pushboolean(L, 1);
    return 1;
}

/* syntax: removed = g:remove([labels]) */
static int
lmetrics_remove(lua_State *L)
{
    struct gw_lgauge *g = gw_checkudata(L, 1, LMETRICS_MT);
    char labels[GW_METRICS_LABELS_MAX];

    render_labels(L, 2, "gauge:remove", labels, sizeof(labels));
    lua_pushboolean(L, gw_metrics_gauge_remove(g->name, labels) == GW_OK);
    return 1;
}

struct gw_lcounter {
    char     name[GW_METRICS_NAME_MAX];     /* checked like a gauge's */
    char     help[GW_METRICS_HELP_MAX];     /* one line, no backslash */
    int      nlabels;                       /* declared label names */
    char     label[LMETRICS_MAX_LABELS][64];    /* in declared order */
    int      max_series;                    /* label sets, overflow aside */
    int      family;        /* index in this worker's slot, or -1 */
    unsigned gen;           /* gw_metrics_generation() family is for */
    char     overflow[GW_METRICS_LABELS_MAX];   /* every label _overflow */
};

/* Fills c (a new userdata) from the arguments of metrics.counter or
 * metrics.histogram (fn): name (1), help (2), label_names (3) and
 * opts.max_series (4, default max_default, at most max_limit - 1).
 * Raises on misuse. */
static void
init_counter(lua_State *L, const char *fn, struct gw_lcounter *c,
             int max_default, int max_limit)
{
    size_t nl, hl;
    const char *name = luaL_checklstring(L, 1, &nl);
    const char *help = luaL_optlstring(L, 2, "", &hl);
    int nlab = 0, max = max_default, w;
    size_t on = 0;

    if (!lua_isnoneornil(L, 3) && !lua_istable(L, 3)) {
        luaL_error(L, "%s: label_names must be a table", fn);
    }
    if (!lua_isnoneornil(L, 4)) {
        if (!lua_istable(L, 4)) {
            luaL_error(L, "%s: opts must be a table", fn);
        }
        lua_getfield(L, 4, "max_series");
        if (!lua_isnil(L, -1)) {
            double m = lua_tonumber(L, -1);

            if (lua_type(L, -1) != LUA_TNUMBER || m != (int) m || m < 1
                || m >= max_limit) {
                luaL_error(L, "%s: opts.max_series must be an integer from "
                           "1 to %d", fn, max_limit - 1);
            }
            max = (int) m;
        }
        lua_pop(L, 1);
    }
    memset(c, 0, sizeof(*c));
    memcpy(c->name, name, nl + 1);
    memcpy(c->help, help, hl + 1);
    c->max_series = max;
    c->family = -1;
    if (lua_istable(L, 3)) {
        nlab = (int) lua_objlen(L, 3);
        if (nlab > LMETRICS_MAX_LABELS) {
            luaL_error(L, "%s: at most %d labels", fn, LMETRICS_MAX_LABELS);
        }
        for (int i = 0; i < nlab; i++) {
            size_t kl;
            const char *k;

            lua_rawgeti(L, 3, i + 1);
            k = lua_tolstring(L, -1, &kl);
            if (lua_type(L, -1) != LUA_TSTRING || !valid_label(k, kl)) {
                luaL_error(L, "%s: bad label name (want [a-z_][a-z0-9_]*)",
                           fn);
            }
            for (int j = 0; j < i; j++) {
                if (strcmp(c->label[j], k) == 0) {
                    luaL_error(L, "%s: label %s twice", fn, k);
                }
            }
            memcpy(c->label[i], k, kl + 1);
            w = snprintf(c->overflow + on, sizeof(c->overflow) - on,
                         "%s%s=\"" GW_METRICS_OVERFLOW "\"", i > 0 ? "," : "",
                         k);
            if (w < 0 || (size_t) w >= sizeof(c->overflow) - on) {
                /* the overflow series must fit a series' labels: past
                 * it, on would pass the buffer's end */
                luaL_error(L, "%s: label names too long (their overflow "
                           "series takes over %d bytes)", fn,
                           (int) sizeof(c->overflow) - 1);
            }
            on += (size_t) w;
            lua_pop(L, 1);
        }
    }
    c->nlabels = nlab;
}

/* syntax: c = metrics.counter(name, help, label_names[, opts])
 * opts.max_series: label sets shown (default 100). Raises on misuse. */
static int
lmetrics_counter(lua_State *L)
{
    size_t nl, hl;
    const char *name = luaL_checklstring(L, 1, &nl);
    const char *help = luaL_optlstring(L, 2, "", &hl);
    struct gw_lcounter *c;

    check_name_help(L, "metrics.counter", name, nl, help, hl);
    claim_name(L, "metrics.counter", name, "counter");
    lua_settop(L, 4);               /* the userdata comes after the args */
    c = lua_newuserdata(L, sizeof(*c));
    init_counter(L, "metrics.counter", c, LMETRICS_CTR_DEFAULT_SERIES,
                 GW_METRICS_COUNTERS);
    luaL_getmetatable(L, LMETRICS_CTR_MT);
    lua_setmetatable(L, -2);
    return 1;
}

/* Renders the label table at index i in c's declared order into out.
 * returns: 1, or 0 when a value does not fit (the caller counts it as
 * overflow). Raises on misuse: not a table, a missing or undeclared
 * label, a value neither string nor number. */
static int
counter_labels(lua_State *L, struct gw_lcounter *c, int i, const char *fn,
               char *out, size_t cap)
{
    size_t n = 0;
    int fits = 1;

    out[0] = '\0';
    if (lua_isnoneornil(L, i)) {
        if (c->nlabels > 0) {
            luaL_error(L, "%s: labels must be a table (%s, ...)", fn,
                       c->label[0]);
        }
        return 1;
    }
    if (!lua_istable(L, i)) {
        luaL_error(L, "%s: labels must be a table", fn);
    }
    lua_pushnil(L);
    while (lua_next(L, i) != 0) {
        int ok = 0;

        if (lua_type(L, -2) == LUA_TNUMBER) {
            double k = lua_tonumber(L, -2);

            ok = k == (int) k && k >= 1 && k <= c->nlabels;
        } else if (lua_type(L, -2) == LUA_TSTRING) {
            const char *k = lua_tostring(L, -2);

            for (int j = 0; j < c->nlabels && !ok; j++) {
                ok = strcmp(c->label[j], k) == 0;
            }
        }
        if (!ok) {
            luaL_error(L, "%s: %s %s is not a label of %s", fn,
                       lua_type(L, -2) == LUA_TSTRING ? "key" : "index",
                       lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2)
                       : "past the labels", c->name);
        }
        lua_pop(L, 1);
    }
    for (int j = 0; j < c->nlabels; j++) {
        size_t vl;
        const char *v;

        lua_getfield(L, i, c->label[j]);
        if (lua_isnil(L, -1)) {
            lua_pop(L, 1);
            lua_rawgeti(L, i, j + 1);
        }
        if (lua_isnil(L, -1)) {
            luaL_error(L, "%s: label %s is missing", fn, c->label[j]);
        }
        if (lua_type(L, -1) != LUA_TSTRING && lua_type(L, -1) != LUA_TNUMBER) {
            luaL_error(L, "%s: label %s must be a string or number", fn,
                       c->label[j]);
        }
        v = lua_tolstring(L, -1, &vl);
        fits = fits && put_label(out, cap, &n, j == 0, c->label[j], v, vl);
        lua_pop(L, 1);
    }
    return fits;
}

/* This worker's family index for c (registered on first use). */
static int
counter_family(struct gw_lcounter *c)
{
    if (c->family < 0 || c->gen != gw_metrics_generation()) {
        c->family = gw_metrics_counter_family(c->name, c->help, c->overflow,
                                              c->max_series + 1);
        c->gen = gw_metrics_generation();
    }
    return c->family;
}

/* syntax: ok, err = c:inc([labels][, n]) -- n >= 0, default 1. err kind
 * "full" when this worker holds GW_METRICS_FAMILIES counter names. */
static int
lmetrics_inc(lua_State *L)
{
    struct gw_lcounter *c = gw_checkudata(L, 1, LMETRICS_CTR_MT);
    char labels[GW_METRICS_LABELS_MAX];
    double n = 1;
    int fits, f;

    if (!lua_isnoneornil(L, 3)) {
        if (lua_type(L, 3) != LUA_TNUMBER) {
            return luaL_error(L, "counter:inc: n must be a number");
        }
        n = lua_tonumber(L, 3);
        if (!(n >= 0) || n > 1e300) {
            return luaL_error(L, "counter:inc: n must be >= 0 and finite");
        }
    }
    fits = counter_labels(L, c, 2, "counter:inc", labels, sizeof(labels));
    f = counter_family(c);
    if (f < 0 || gw_metrics_counter_add(f, fits ? labels : NULL, n)
                 != GW_OK) {
        return gw_push_error(L, "full", 0, "counter %s: this worker holds "
                             "%d counter names already", c->name,
                             GW_METRICS_FAMILIES);
    }
    lua_pushboolean(L, 1);
    return 1;
}

/* syntax: n = c:get([labels]) -- this worker's count (0 when none);
 * labels "overflow" reads the overflow series. */
static int
lmetrics_get(lua_State *L)
{
    struct gw_lcounter *c = gw_checkudata(L, 1, LMETRICS_CTR_MT);
    char labels[GW_METRICS_LABELS_MAX];
    int fits = 0, f;

    if (lua_type(L, 2) != LUA_TSTRING
        || strcmp(lua_tostring(L, 2), "overflow") != 0) {
        fits = counter_labels(L, c, 2, "counter:get", labels,
                              sizeof(labels));
    }
    f = counter_family(c);
    lua_pushnumber(L, f < 0 ? 0 : gw_metrics_counter_get(f, fits ? labels
                                                          : NULL));
    return 1;
}

struct gw_lhist {
    struct gw_lcounter c;       /* name, help, labels, cap, family */
    int                nle;     /* bounds in le */
    double             le[GW_METRICS_HBUCKETS];  /* ascending, finite */
};

/* The default bounds (seconds), as Prometheus' client libraries have. */
static const double lmetrics_default_le[] = {
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10
};

/* syntax: h = metrics.histogram(name, help, label_names[, opts])
 * opts.buckets: upper bounds, ascending and finite (at most
 * GW_METRICS_HBUCKETS; +Inf is always there); default 0.005 .. 10.
 * opts.max_series: label sets shown (default 32). Shown as name_bucket,
 * name_sum and name_count, which are claimed with name. Raises on
 * misuse. */
static int
lmetrics_histogram(lua_State *L)
{
    static const char *const suffix[] = { "_bucket", "_sum", "_count" };
    size_t nl, hl;
    const char *name = luaL_checklstring(L, 1, &nl);
    const char *help = luaL_optlstring(L, 2, "", &hl);
    char full[GW_METRICS_NAME_MAX + 8];
    struct gw_lhist *h;

    check_name_help(L, "metrics.histogram", name, nl, help, hl);
    if (nl + strlen("_bucket") >= GW_METRICS_NAME_MAX) {
        return luaL_error(L, "metrics.histogram: name must leave room for "
                          "_bucket (at most %d bytes)",
                          GW_METRICS_NAME_MAX - 1 - (int) strlen("_bucket"));
    }
    claim_name(L, "metrics.histogram", name, "histogram");
    for (int i = 0; i < 3; i++) {
        snprintf(full, sizeof(full), "%s%s", name, suffix[i]);
        claim_name(L, "metrics.histogram", full, "histogram");
    }
    lua_settop(L, 4);               /* the userdata comes after the args */
    h = lua_newuserdata(L, sizeof(*h));
    init_counter(L, "metrics.histogram", &h->c, 32, GW_METRICS_HISTOGRAMS);
    h->nle = (int) (sizeof(lmetrics_default_le)
                    / sizeof(lmetrics_default_le[0]));
    memcpy(h->le, lmetrics_default_le, sizeof(lmetrics_default_le));
    if (lua_istable(L, 4)) {
        lua_getfield(L, 4, "buckets");
        if (!lua_isnil(L, -1)) {
            int n = lua_istable(L, -1) ? (int) lua_objlen(L, -1) : -1;

            if (n < 1 || n > GW_METRICS_HBUCKETS) {
                return luaL_error(L, "metrics.histogram: opts.buckets must "
                                  "be a list of 1 to %d upper bounds",
                                  GW_METRICS_HBUCKETS);
            }
            for (int i = 0; i < n; i++) {
                double v;

                lua_rawgeti(L, -1, i + 1);
                v = lua_tonumber(L, -1);
                if (lua_type(L, -1) != LUA_TNUMBER || v != v
                    || v - v != 0 || (i > 0 && v <= h->le[i - 1])) {
                    return luaL_error(L, "metrics.histogram: opts.buckets "
                                      "must be finite numbers, ascending "
                                      "(+Inf is added)");
                }
                h->le[i] = v;
                lua_pop(L, 1);
            }
            h->nle = n;
        }
        lua_pop(L, 1);
    }
    luaL_getmetatable(L, LMETRICS_HIST_MT);
    lua_setmetatable(L, -2);
    return 1;
}

/* This worker's family index for h (registered on first use). */
static int
hist_family(struct gw_lhist *h)
{
    struct gw_lcounter *c = &h->c;

    if (c->family < 0 || c->gen != gw_metrics_generation()) {
        c->family = gw_metrics_histogram_family(c->name, c->help,
                                                c->overflow,
                                                c->max_series + 1, h->le,
                                                h->nle);
        c->gen = gw_metrics_generation();
    }
    return c->family;
}

/* syntax: ok, err = h:observe(value[, labels[, n]]) -- value a finite
 * number; n: that many observations of value (a whole number >= 0,
 * default 1: counts gathered elsewhere, added at once; 0 makes the
 * series, at 0). err kind "full" when this worker holds
 * GW_METRICS_HFAMILIES histogram names. */
static int
lmetrics_observe(lua_State *L)
{
    struct gw_lhist *h = gw_checkudata(L, 1, LMETRICS_HIST_MT);
    char labels[GW_METRICS_LABELS_MAX];
    double v = lua_tonumber(L, 2);
    double n = 1;
    int fits, f;

    /* an infinity would leave the series' sum infinite for good */
    if (lua_type(L, 2) != LUA_TNUMBER || v != v || v > DBL_MAX
        || v < -DBL_MAX)
    {
        return luaL_error(L, "histogram:observe: value must be a finite "
                          "number");
    }
    if (!lua_isnoneornil(L, 4)) {
        n = lua_tonumber(L, 4);
        /* (v * n must stay finite too: the sum) */
        if (lua_type(L, 4) != LUA_TNUMBER || !(n >= 0) || n > 0x1p53
            || n != floor(n))
        {
            return luaL_error(L, "histogram:observe: n must be a whole "
                              "number >= 0 (at most 2^53)");
        }
        if (n > 0 && fabs(v) > DBL_MAX / n) {
            return luaL_error(L, "histogram:observe: value * n is past "
                              "the largest number (the series' sum would "
                              "be infinite)");
        }
    }
    fits = counter_labels(L, &h->c, 3, "histogram:observe", labels,
                          sizeof(labels));
    f = hist_family(h);
    if (f < 0 || gw_metrics_histogram_observe(f, fits ? labels : NULL, v, n)
                 != GW_OK) {
        return gw_push_error(L, "full", 0, "histogram %s: this worker holds "
                             "%d histogram names already", h->c.name,
                             GW_METRICS_HFAMILIES);
    }
    lua_pushboolean(L, 1);
    return 1;
}

/* syntax: count, sum = h:get([labels]) -- this worker's (0, 0 when
 * none); labels "overflow" reads the overflow series. */
static int
lmetrics_hist_get(lua_State *L)
{
    struct gw_lhist *h = gw_checkudata(L, 1, LMETRICS_HIST_MT);
    char labels[GW_METRICS_LABELS_MAX];
    double count = 0, sum = 0;
    int fits = 0, f;

    if (lua_type(L, 2) != LUA_TSTRING
        || strcmp(lua_tostring(L, 2), "overflow") != 0) {
        fits = counter_labels(L, &h->c, 2, "histogram:get", labels,
                              sizeof(labels));
    }
    f = hist_family(h);
    if (f >= 0) {
        gw_metrics_histogram_get(f, fits ? labels : NULL, &count, &sum);
    }
    lua_pushnumber(L, count);
    lua_pushnumber(L, sum);
    return 2;
}

static const luaL_Reg lmetrics_hist_methods[] = {
    { "observe", lmetrics_observe },
    { "get", lmetrics_hist_get },
    { NULL, NULL }
};

static const luaL_Reg lmetrics_ctr_methods[] = {
    { "inc", lmetrics_inc },
    { "get", lmetrics_get },
    { NULL, NULL }
};

static const luaL_Reg lmetrics_methods[] = {
    { "set", lmetrics_set },
    { "remove", lmetrics_remove },
    { NULL, NULL }
};

static const luaL_Reg lmetrics_funcs[] = {
    { "gauge", lmetrics_gauge },
    { "counter", lmetrics_counter },
    { "histogram", lmetrics_histogram },
    { NULL, NULL }
};

int
luaopen_paygate_metrics(lua_State *L)
{
    luaL_newmetatable(L, LMETRICS_MT);
    lua_newtable(L);
    luaL_register(L, NULL, lmetrics_methods);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
    luaL_newmetatable(L, LMETRICS_CTR_MT);
    lua_newtable(L);
    luaL_register(L, NULL, lmetrics_ctr_methods);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
    luaL_newmetatable(L, LMETRICS_HIST_MT);
    lua_newtable(L);
    luaL_register(L, NULL, lmetrics_hist_methods);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
    lua_newtable(L);
    luaL_register(L, NULL, lmetrics_funcs);
    lua_pushinteger(L, GW_METRICS_APP_SERIES);
    lua_setfield(L, -2, "MAX_SERIES");
    lua_pushinteger(L, GW_METRICS_FAMILIES);
    lua_setfield(L, -2, "MAX_COUNTERS");
    lua_pushinteger(L, GW_METRICS_COUNTERS);
    lua_setfield(L, -2, "MAX_COUNTER_SERIES");
    lua_pushinteger(L, GW_METRICS_HFAMILIES);
    lua_setfield(L, -2, "MAX_HISTOGRAMS");
    lua_pushinteger(L, GW_METRICS_HISTOGRAMS);
    lua_setfield(L, -2, "MAX_HISTOGRAM_SERIES");
    lua_pushinteger(L, GW_METRICS_HBUCKETS);
    lua_setfield(L, -2, "MAX_BUCKETS");
    return 1;
}
