/*
 * store.c -- helpers shared by the storage drivers; see store.h.
 */
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <lauxlib.h>

#include "lstate.h"
#include "runtime.h"
#include "store.h"

/* params.n when set, else #params; -1 for an n that is no whole number
 * in 0..GW_STORE_MAX_PARAMS (cast to int, 2^31 wrapped negative and
 * every parameter was dropped; 1e9 walked a billion slots) */
static int
param_count(lua_State *L, int idx)
{
    int    n;
    double d;

    gw_getfield(L, idx, "n");
    if (lua_isnumber(L, -1)) {
        d = lua_tonumber(L, -1);
        n = d >= 0 && d <= GW_STORE_MAX_PARAMS && d == floor(d) ? (int)d
            : -1;
    } else {
        n = (int)lua_objlen(L, idx);
    }
    lua_pop(L, 1);
    return n;
}

/* Values read on the C stack before their block is made: a statement's
 * parameters are seldom more (more: a calloc'd scratch array) */
#define GW_STORE_FEW 32

int
gw_store_vals_copy(lua_State *L, int idx, struct gw_store_val **out, int *n)
{
    struct gw_store_val  few[GW_STORE_FEW], *tmp, *v;
    int                  i, cnt, rc = 0;
    size_t               bytes = 0;     /* the strings', NULs included */
    char                *p;

    *out = NULL;
    *n = 0;
    if (idx < 0 && idx > LUA_REGISTRYINDEX) {
        idx = lua_gettop(L) + idx + 1;  /* (values are pushed below) */
    }
    cnt = param_count(L, idx);          /* (the one read that may run Lua) */
    if (cnt <= 0) {
        return cnt < 0 ? GW_STORE_BAD_N : 0;
    }
    if (cnt <= GW_STORE_FEW) {
        tmp = few;
        memset(tmp, 0, (size_t)cnt * sizeof(*tmp));
    } else if ((tmp = calloc((size_t)cnt, sizeof(*tmp))) == NULL) {
        return GW_STORE_NOMEM;
    }
    /* One pass: check and convert each value into tmp, summing the bytes
     * of the strings; then one block of the size it found. Till then a
     * string's s points at the Lua string's own bytes: the table holds
     * it, and nothing from here to the copy runs Lua or allocates in it
     * (raw reads only), so no metamethod or finalizer can drop it. */
    for (i = 0; i < cnt && rc == 0; i++) {
        double d;

        lua_rawgeti(L, idx, i + 1);
        switch (lua_type(L, -1)) {
        case LUA_TBOOLEAN:
            tmp[i].type = GW_STORE_INT;
            tmp[i].i = lua_toboolean(L, -1);
            break;
        case LUA_TNUMBER:
            d = lua_tonumber(L, -1);
            if (d == floor(d) && fabs(d) < 9.2e18) {
                tmp[i].type = GW_STORE_INT;
                tmp[i].i = (int64_t)d;
            } else {
                tmp[i].type = GW_STORE_REAL;
                tmp[i].d = d;
            }
            break;
        case LUA_TSTRING:
            tmp[i].type = GW_STORE_TEXT;
            tmp[i].s = (char *)lua_tolstring(L, -1, &tmp[i].len);
            if (bytes > SIZE_MAX - tmp[i].len - 1) {
                rc = GW_STORE_NOMEM;
            }
            bytes += tmp[i].len + 1;
            break;
        case LUA_TNIL:
        case LUA_TLIGHTUSERDATA:        /* sql.null */
            break;                      /* GW_STORE_NULL (zeroed) */
        default:
            rc = i + 1;                 /* cannot be bound */
            break;
        }
        lua_pop(L, 1);
    }
    v = NULL;
    if (rc == 0) {
        if (bytes > SIZE_MAX - (size_t)cnt * sizeof(*v)
            || (v = malloc((size_t)cnt * sizeof(*v) + bytes)) == NULL)
        {
            rc = GW_STORE_NOMEM;
        }
    }
    if (rc == 0) {
        memcpy(v, tmp, (size_t)cnt * sizeof(*v));
        p = (char *)(v + cnt);          /* the strings, after the values */
        for (i = 0; i < cnt; i++) {
            if (v[i].type == GW_STORE_TEXT) {
                memcpy(p, v[i].s, v[i].len);
                p[v[i].len] = '\0';
                v[i].s = p;
                p += v[i].len + 1;
            }
        }
        *out = v;
        *n = cnt;
    }
    if (tmp != few) {
        free(tmp);
    }
    return rc;
}

int
gw_store_vals_from_lua(lua_State *L, int idx, struct gw_store_val **out, int *n)
{
    int rc;

    *out = NULL;
    *n = 0;
    if (lua_isnoneornil(L, idx)) {
        return GW_OK;
    }
    luaL_checktype(L, idx, LUA_TTABLE);
    rc = gw_store_vals_copy(L, idx, out, n);
    if (rc == GW_STORE_BAD_N) {
        luaL_error(L, "sql params.n must be a whole number from 0 to %d",
                   GW_STORE_MAX_PARAMS);
    }
    if (rc > 0) {
        lua_rawgeti(L, idx, rc);
        luaL_error(L, "sql parameter %d: cannot bind a %s", rc,
                   luaL_typename(L, -1));
    }
    return rc == 0 ? GW_OK : GW_ERR;
}

void
gw_store_vals_free(struct gw_store_val *v, int n)
{
    int i;

    if (v == NULL) {
        return;
    }
    for (i = 0; i < n; i++) {
        free(v[i].s);
    }
    free(v);
}

void
gw_store_val_push(lua_State *L, const struct gw_store_val *v)
{
    switch (v->type) {
    case GW_STORE_INT:
        gw_store_push_int(L, v->i);
        break;
    case GW_STORE_REAL:
        lua_pushnumber(L, v->d);
        break;
    case GW_STORE_TEXT:
        lua_pushlstring(L, v->s, v->len);
        break;
    default:
        lua_pushnil(L);
        break;
    }
}

#define GW_STORE_EXACT ((int64_t)1 << 53)   /* doubles are exact to here */

void
gw_store_push_int(lua_State *L, int64_t i)
{
    char buf[24];

    if (i >= -GW_STORE_EXACT && i <= GW_STORE_EXACT) {
        lua_pushnumber(L, (lua_Number)i);
        return;
    }
    snprintf(buf, sizeof(buf), "%lld", (long long)i);
    lua_pushstring(L, buf);
}

void
gw_store_push_int_text(lua_State *L, const char *s, size_t len)
{
    char      *end;
    long long  v;

    errno = 0;
    v = strtoll(s, &end, 10);
    if (len == 0 || errno != 0 || end != s + len) {
        lua_pushlstring(L, s, len);
        return;
    }
    gw_store_push_int(L, (int64_t)v);
}

char *
gw_store_strdup(const char *s)
{
    return s == NULL ? NULL : strdup(s);
}

const char *const gw_store_sql_opts[] = {
    "retries",                                          /* paygate.sql */
    "readers", "batch_max", "busy_timeout", "tx_timeout", "synchronous",
    "inline_reads", "checkpoint_pages", "cache_mib",
    "pool", "connect_timeout", "query_timeout", "down_for",
    "require_sync", "sync_recheck",
    NULL
};

/* The type and range of each of gw_store_sql_opts, whichever engine
 * reads it. The drivers read their own options again with the same
 * bounds (and their defaults). */
static const struct sql_opt {
    const char *name;           /* the option */
    char        kind;           /* 'i' integer, 'n' number >= 0, 'p' > 0,
                                   'b' boolean */
    int         min, max;       /* bounds of an integer */
} sql_opt_spec[] = {
    { "retries", 'i', 1, INT_MAX },
    { "readers", 'i', 1, GW_STORE_SQLITE_MAX_READERS },
    { "batch_max", 'i', 1, INT_MAX },
    { "busy_timeout", 'i', 0, INT_MAX },
    { "tx_timeout", 'i', 0, INT_MAX },  /* 0: PostgreSQL only */
    { "synchronous", 'i', 0, 3 },
    { "inline_reads", 'i', 0, 1000000 },
    { "checkpoint_pages", 'i', 1, 1000000 },
    { "cache_mib", 'i', 1, 65536 },
    { "pool", 'i', 1, GW_STORE_PG_MAX_POOL },
    { "connect_timeout", 'p', 0, 0 },
    { "query_timeout", 'p', 0, 0 },
    { "down_for", 'n', 0, 0 },
    { "require_sync", 'b', 0, 0 },
    { "sync_recheck", 'p', 0, 0 },
    { NULL, 0, 0, 0 }
};

void
gw_store_sql_opts_check(lua_State *L, int idx)
{
    const struct sql_opt *o;

    gw_store_opt_known(L, idx, "sql.open", gw_store_sql_opts);
    for (o = sql_opt_spec; o->name != NULL; o++) {
        if (o->kind == 'i') {
            gw_store_opt_int(L, idx, "sql.open", o->name, 0, o->min, o->max);
        } else if (o->kind == 'b') {
            gw_store_opt_bool(L, idx, "sql.open", o->name, 0);
        } else {
            gw_store_opt_num(L, idx, "sql.open", o->name, 0, o->kind == 'n');
        }
    }
}

int
gw_store_raise(lua_State *L, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    gw_vraise(L, fmt, ap);               /* never returns */
    va_end(ap);
    return 0;
}

/* Pushes opts[name] (nil when there is no table); raises when idx holds
 * something other than a table or nil. */
static void
opt_get(lua_State *L, int idx, const char *fn, const char *name)
{
    if (lua_isnoneornil(L, idx)) {
        lua_pushnil(L);
        return;
    }
    if (!lua_istable(L, idx)) {
        gw_store_raise(L, "%s: opts must be a table", fn);
    }
    lua_getfield(L, idx, name);
}

int
gw_store_opt_int(lua_State *L, int idx, const char *fn, const char *name,
                 int def, int min, int max)
{
    double v;

    opt_get(L, idx, fn, name);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return def;
    }
    v = lua_type(L, -1) == LUA_TNUMBER ? lua_tonumber(L, -1) : NAN;
    lua_pop(L, 1);
    if (v == floor(v) && v >= min && v <= max) {
        return (int)v;
    }
    if (max == INT_MAX && min == 1) {
        return gw_store_raise(L, "%s: opts.%s must be a positive integer",
                              fn, name);
    }
    if (max == INT_MAX && min == 0) {
        return gw_store_raise(L, "%s: opts.%s must be a non-negative"
                              " integer", fn, name);
    }
    return gw_store_raise(L, "%s: opts.%s must be an integer from %d to %d",
                          fn, name, min, max);
}

double
gw_store_opt_num(lua_State *L, int idx, const char *fn, const char *name,
                 double def, int zero_ok)
{
    double v;

    opt_get(L, idx, fn, name);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return def;
    }
    v = lua_type(L, -1) == LUA_TNUMBER ? lua_tonumber(L, -1) : NAN;
    lua_pop(L, 1);
    if (isfinite(v) && (v > 0 || (zero_ok && v == 0))) {
        return v;
    }
    return gw_store_raise(L, "%s: opts.%s must be a %s number", fn, name,
                          zero_ok ? "non-negative" : "positive");
}

int
gw_store_opt_bool(lua_State *L, int idx, const char *fn, const char *name,
                  int def)
{
    int v;

    opt_get(L, idx, fn, name);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return def;
    }
    if (lua_type(L, -1) != LUA_TBOOLEAN) {
        gw_store_raise(L, "%s: opts.%s must be a boolean", fn, name);
    }
    v = lua_toboolean(L, -1);
    lua_pop(L, 1);
    return v;
}

const char *
gw_store_opt_str(lua_State *L, int idx, const char *fn, const char *name)
{
    const char *s;

    opt_get(L, idx, fn, name);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return NULL;
    }
    if (lua_type(L, -1) != LUA_TSTRING) {
        gw_store_raise(L, "%s: opts.%s must be a string", fn, name);
    }
    s = lua_tostring(L, -1);
    lua_pop(L, 1);                       /* still referenced by opts */
    return s;
}

void
gw_store_opt_known(lua_State *L, int idx, const char *fn,
                   const char *const *names)
{
    const char *const *n;

    if (lua_isnoneornil(L, idx)) {
        return;
    }
    if (!lua_istable(L, idx)) {
        gw_store_raise(L, "%s: opts must be a table", fn);
    }
    if (idx < 0) {
        idx = lua_gettop(L) + idx + 1;
    }
    lua_pushnil(L);
    while (lua_next(L, idx) != 0) {
        lua_pop(L, 1);
        if (lua_type(L, -1) != LUA_TSTRING) {
            gw_store_raise(L, "%s: opts has a key that is not a name (%s)",
                           fn, luaL_typename(L, -1));
        }
        for (n = names; *n != NULL; n++) {
            if (strcmp(*n, lua_tostring(L, -1)) == 0) {
                break;
            }
        }
        if (*n == NULL) {
            gw_store_raise(L, "%s: unknown option opts.%s", fn,
                           lua_tostring(L, -1));
        }
    }
}

/* Open transactions of every handle: a handful at a time. */
static struct gw_store_tx *store_tx_list;
static long                store_tx_next_id = 1;

static void
store_tx_abandoned(void *arg)
{
    struct gw_store_tx *tx = arg;

    tx->rollback(tx);
}

struct gw_store_tx *
gw_store_tx_new(struct gw_co *co, void *owner,
                void (*rollback)(struct gw_store_tx *))
{
    struct gw_store_tx *tx = calloc(1, sizeof(*tx));

    if (tx == NULL) {
        return NULL;
    }
    tx->owner = owner;
    tx->id = store_tx_next_id++;
    tx->rollback = rollback;
    tx->cl.fn = store_tx_abandoned;
    tx->cl.arg = tx;
    tx->next = store_tx_list;
    store_tx_list = tx;
    gw_co_cleanup_add(co, &tx->cl);
    return tx;
}

struct gw_store_tx *
gw_store_tx_find(void *owner, long id)
{
    struct gw_store_tx *tx;

    for (tx = store_tx_list; tx != NULL; tx = tx->next) {
        if ((owner == NULL || tx->owner == owner) && tx->id == id) {
            return tx;
        }
    }
    return NULL;
}

void
gw_store_tx_free(struct gw_store_tx *tx)
{
    struct gw_store_tx **pp = &store_tx_list;

    if (tx == NULL) {
        return;
    }
    while (*pp != NULL && *pp != tx) {
        pp = &(*pp)->next;
    }
    if (*pp == tx) {
        *pp = tx->next;
    }
    gw_co_cleanup_del(&tx->cl);
    free(tx);
}

void
gw_store_tx_free_owner(void *owner)
{
    struct gw_store_tx *tx, *next;

    for (tx = store_tx_list; tx != NULL; tx = next) {
        next = tx->next;
        if (tx->owner == owner) {
            gw_store_tx_free(tx);
        }
    }
}

int
gw_store_sql_has_nul(lua_State *L, int idx)
{
    size_t      len;
    const char *sql = lua_type(L, idx) == LUA_TSTRING
                      ? lua_tolstring(L, idx, &len) : NULL;

    return sql != NULL && memchr(sql, '\0', len) != NULL;
}
