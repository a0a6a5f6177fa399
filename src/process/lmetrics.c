/*
 * lmetrics.c -- paygate.metrics: gauges an app publishes on /metrics.
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
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "metrics.h"
#include "runtime.h"

#define LMETRICS_MT "paygate.metrics_gauge"
#define LMETRICS_MAX_LABELS 8

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

/* Appends s to out (capacity cap, used *n) escaped as a label value;
 * returns 0 when it does not fit. */
static int
put_escaped(char *out, size_t cap, size_t *n, const char *s, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        const char *rep = NULL;
        char one[2] = { s[i], '\0' };

        if (s[i] == '"') {
            rep = "\\\"";
        } else if (s[i] == '\\') {
            rep = "\\\\";
        } else if (s[i] == '\n') {
            rep = "\\n";
        } else {
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
        if (!valid_name(k, kl, 0) || kl >= 64 || (kl >= 2 && k[0] == '_'
                                                  && k[1] == '_')) {
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
        int w;

        lua_getfield(L, i, keys[j]);
        v = lua_tolstring(L, -1, &vl);  /* a number becomes a string copy */
        w = snprintf(out + n, cap - n, "%s%s=\"", j > 0 ? "," : "", keys[j]);
        if (w < 0 || (size_t) w >= cap - n) {
            luaL_error(L, "%s: labels too long (at most %d bytes rendered)",
                       fn, (int) cap - 1);
        }
        n += (size_t) w;
        if (!put_escaped(out, cap, &n, v, vl) || n + 2 > cap) {
            luaL_error(L, "%s: labels too long (at most %d bytes rendered)",
                       fn, (int) cap - 1);
        }
        out[n++] = '"';
        out[n] = '\0';
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

    if (!valid_name(name, nl, 1) || nl >= GW_METRICS_NAME_MAX) {
        return luaL_error(L, "metrics.gauge: name must match "
                          "[a-z_:][a-z0-9_:]* (at most %d bytes)",
                          GW_METRICS_NAME_MAX - 1);
    }
    if (hl >= GW_METRICS_HELP_MAX) {
        return luaL_error(L, "metrics.gauge: help is longer than %d bytes",
                          GW_METRICS_HELP_MAX - 1);
    }
    for (size_t i = 0; i < hl; i++) {
        if ((unsigned char) help[i] < 32 || help[i] == 127
            || help[i] == '\\') {
            return luaL_error(L, "metrics.gauge: help must be one line of "
                              "text without backslashes");
        }
    }
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
    struct gw_lgauge *g = luaL_checkudata(L, 1, LMETRICS_MT);
    char labels[GW_METRICS_LABELS_MAX];
    double v;

    if (lua_type(L, 2) != LUA_TNUMBER) {
        return luaL_error(L, "gauge:set: value must be a number");
    }
    v = lua_tonumber(L, 2);
    render_labels(L, 3, "gauge:set", labels, sizeof(labels));
    if (gw_metrics_gauge_set(g->name, g->help, labels, v) != GW_OK) {
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
    struct gw_lgauge *g = luaL_checkudata(L, 1, LMETRICS_MT);
    char labels[GW_METRICS_LABELS_MAX];

    render_labels(L, 2, "gauge:remove", labels, sizeof(labels));
    lua_pushboolean(L, gw_metrics_gauge_remove(g->name, labels) == GW_OK);
    return 1;
}

static const luaL_Reg lmetrics_methods[] = {
    { "set", lmetrics_set },
    { "remove", lmetrics_remove },
    { NULL, NULL }
};

static const luaL_Reg lmetrics_funcs[] = {
    { "gauge", lmetrics_gauge },
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
    lua_newtable(L);
    luaL_register(L, NULL, lmetrics_funcs);
    lua_pushinteger(L, GW_METRICS_APP_SERIES);
    lua_setfield(L, -2, "MAX_SERIES");
    return 1;
}
