/*
 * lshared.c -- paygate.shared: the Lua face of the shared dictionaries
 * (shdict.h).
 *
 *   local shared = require "paygate.shared"
 *   local d = shared.get_dict("paygate")    -- or shared.paygate
 *   d:set("k", "v", 60)      d:get("k")      d:add("k", 1)
 *   d:incr("n", 1, 0)        d:delete("k")   d:flush_all()   d:stats()
 *
 * No call yields; each takes the dictionary's lock for a few microseconds
 * and never runs Lua (nor raises) while holding it.
 */
#include <stdlib.h>
#include <math.h>
#include <string.h>

#include "lstate.h"
#include "runtime.h"
#include "shdict.h"

#define LSHARED_MT "paygate.shared_dict"

struct gw_lshared {
    struct gw_shdict *d;            /* shared mapping; never unmapped */
};

static char *value_buf;             /* owned: GW_SHD_MAX_VALUE bytes */

/* The dictionary d:fn(...) was called on. Anything else is d.fn(...)
 * written for d:fn(...) (its first argument taken for d): said so, naming
 * the method, where luaL_checkudata's "bad argument #1 to '?'" named none
 * through a tail call or pcall. */
static struct gw_shdict *
check_dict(lua_State *L, const char *fn)
{
    struct gw_lshared *ud = gw_testudata(L, 1, LSHARED_MT);

    if (ud == NULL) {
        luaL_error(L, "shared.%s: use d:%s(...), not d.%s(...) (got %s for "
                      "the dictionary)", fn, fn, fn,
                   lua_isnone(L, 1) ? "no value" : luaL_typename(L, 1));
    }
    return ud->d;
}

static const char *
check_key(lua_State *L, const char *fn, size_t *len)
{
    if (lua_type(L, 2) != LUA_TSTRING) {
        luaL_error(L, "shared.%s: key must be a string", fn);
    }
    return lua_tolstring(L, 2, len);
}

static double
check_ttl(lua_State *L, int i, const char *fn)
{
    double t = 0;

    if (lua_isnoneornil(L, i)) {
        return 0;
    }
    if (lua_type(L, i) != LUA_TNUMBER || !((t = lua_tonumber(L, i)) >= 0)) {
        luaL_error(L, "shared.%s: ttl must be a number >= 0", fn);
    }
    return t;
}

/* Pushes nil, err for rc (not OK); returns 2. */
static int
push_rc(lua_State *L, struct gw_shdict *d, enum gw_shd_rc rc,
        const char *fn)
{
    const char *name = gw_shdict_name(d);

    switch (rc) {
    case GW_SHD_NOT_FOUND:
        return gw_push_error(L, "not_found", 0, "shared %s %s: no such key",
                             name, fn);
    case GW_SHD_EXISTS:
        return gw_push_error(L, "exists", 0, "shared %s %s: the key exists",
                             name, fn);
    case GW_SHD_TOO_LARGE:
        return gw_push_error(L, "too_large", 0, "shared %s %s: key empty or "
                             "over %d bytes, or value over %d bytes or a "
                             "quarter of the dictionary", name, fn,
                             GW_SHD_MAX_KEY,
                             GW_SHD_MAX_VALUE);
    case GW_SHD_NO_MEMORY:
        return gw_push_error(L, "no_memory", 1, "shared %s %s: full of live "
                             "entries (nothing evicted)", name, fn);
    case GW_SHD_NOT_NUMBER:
        return gw_push_error(L, "not_a_number", 0, "shared %s %s: the value "
                             "is not a number", name, fn);
    case GW_SHD_OVERFLOW:
        return gw_push_error(L, "overflow", 0, "shared %s %s: the sum is "
                             "past the largest number (the value is kept)",
                             name, fn);
    default:
        return gw_push_error(L, "unavailable", 1, "shared %s %s: the lock is "
                             "broken", name, fn);
    }
}

/*
 * syntax: value = d:get(key)
 * returns: the string, number or boolean; nil when absent or expired.
 */
static int
lshared_get(lua_State *L)
{
    struct gw_shdict *d = check_dict(L, "get");
    size_t klen;
    const char *key = check_key(L, "get", &klen);
    struct gw_shd_value v;
    enum gw_shd_rc rc;

    if (value_buf == NULL) {
        value_buf = malloc(GW_SHD_MAX_VALUE);
        if (value_buf == NULL) {
            return luaL_error(L, "shared.get: no memory");
        }
    }
    rc = gw_shdict_get(d, key, klen, value_buf, GW_SHD_MAX_VALUE, &v);
    if (rc == GW_SHD_NOT_FOUND) {
        lua_pushnil(L);
        return 1;
    }
    if (rc != GW_SHD_OK) {
        return push_rc(L, d, rc, "get");
    }
    if (v.type == GW_SHD_STRING) {
        lua_pushlstring(L, v.s, v.len);
    } else if (v.type == GW_SHD_NUMBER) {
        lua_pushnumber(L, v.n);
    } else {
        lua_pushboolean(L, v.b);
    }
    return 1;
}

static int
set_or_add(lua_State *L, int add)
{
    const char *fn = add == 2 ? "safe_add" : add ? "add" : "set";
    struct gw_shdict *d = check_dict(L, fn);
    size_t klen;
    const char *key = check_key(L, fn, &klen);
    double ttl = check_ttl(L, 4, fn);
    struct gw_shd_value v;
    enum gw_shd_rc rc;

    memset(&v, 0, sizeof(v));
    switch (lua_type(L, 3)) {
    case LUA_TSTRING:
        v.type = GW_SHD_STRING;
        v.s = lua_tolstring(L, 3, &v.len);
        break;
    case LUA_TNUMBER:
        v.type = GW_SHD_NUMBER;
        v.n = lua_tonumber(L, 3);
        break;
    case LUA_TBOOLEAN:
        v.type = GW_SHD_BOOLEAN;
        v.b = lua_toboolean(L, 3);
        break;
    case LUA_TNIL:
    case LUA_TNONE:
        if (add) {
            return luaL_error(L, "shared.%s: value must not be nil", fn);
        }
        v.type = GW_SHD_NIL;
        break;
    default:
        return luaL_error(L, "shared.%s: value must be a string, number or "
                             "boolean", fn);
    }
    rc = gw_shdict_set(d, key, klen, &v, ttl, add);
    if (rc == GW_SHD_OK) {
        lua_pushboolean(L, 1);
        return 1;
    }
    push_rc(L, d, rc, fn);
    if (rc == GW_SHD_EXISTS) {
        lua_pushboolean(L, 0);      /* false, err rather than nil, err */
        lua_replace(L, -3);
    }
    return 2;
}

/*
 * syntax: ok, err = d:set(key, value[, ttl])
 * returns: true; nil, err (kind too_large). A nil value deletes.
 */
static int
lshared_set(lua_State *L)
{
    return set_or_add(L, 0);
}

/*
 * syntax: ok, err = d:add(key, value[, ttl])
 * returns: true when the key was absent (atomic across workers); false,
 *          err (kind exists) when a live entry has it; nil, err.
 */
static int
lshared_add(lua_State *L)
{
    return set_or_add(L, 1);
}

/*
 * syntax: ok, err = d:safe_add(key, value[, ttl])
 * As add, but never evicts a live entry to make room: nil, err (kind
 * no_memory) when only expired entries could be dropped and they were not
 * enough. For records whose loss would be a wrong answer (replay caches).
 */
static int
lshared_safe_add(lua_State *L)
{
    return set_or_add(L, 2);
}

/*
 * syntax: n, err = d:incr(key, by[, init[, init_ttl]])
 * returns: the new number; nil, err (kind not_found without init,
 *          not_a_number, overflow: the sum would be an infinity, nothing
 *          changed). A missing key becomes init + by, with init_ttl.
 */
static int
lshared_incr(lua_State *L)
{
    struct gw_shdict *d = check_dict(L, "incr");
    size_t klen;
    const char *key = check_key(L, "incr", &klen);
    double by, init = 0, ttl, out = 0;
    int has_init = !lua_isnoneornil(L, 4);
    enum gw_shd_rc rc;

    by = gw_arg_number(L, 3, "shared.incr", "by");
    if (has_init) {
        init = gw_arg_number(L, 4, "shared.incr", "init");
    }
    /* a NaN or an infinity would be the counter for good: every later
     * incr answers it again */
    if (!isfinite(by) || !isfinite(init)) {
        return luaL_error(L, "shared.incr: %s must be a finite number",
                          !isfinite(by) ? "by" : "init");
    }
    ttl = check_ttl(L, 5, "incr");
    rc = gw_shdict_incr(d, key, klen, by, has_init, init, ttl, &out);
    if (rc != GW_SHD_OK) {
        return push_rc(L, d, rc, "incr");
    }
    lua_pushnumber(L, out);
    return 1;
}

/* syntax: d:delete(key) -> true */
static int
lshared_delete(lua_State *L)
{
    struct gw_shdict *d = check_dict(L, "delete");
    size_t klen;
    const char *key = check_key(L, "delete", &klen);

    gw_shdict_delete(d, key, klen);
    lua_pushboolean(L, 1);
    return 1;
}

/* syntax: d:flush_all() -- drops every entry */
static int
lshared_flush_all(lua_State *L)
{
    gw_shdict_flush(check_dict(L, "flush_all"));
    return 0;
}

/* syntax: st = d:stats() -> { capacity, used, entries, evictions,
 *                            recoveries } (bytes, counts) */
static int
lshared_stats(lua_State *L)
{
    struct gw_shd_stats st;

    gw_shdict_stats(check_dict(L, "stats"), &st);
    lua_createtable(L, 0, 5);
    lua_pushnumber(L, (double) st.capacity);
    lua_setfield(L, -2, "capacity");
    lua_pushnumber(L, (double) st.used);
    lua_setfield(L, -2, "used");
    lua_pushnumber(L, st.entries);
    lua_setfield(L, -2, "entries");
    lua_pushnumber(L, (double) st.evictions);
    lua_setfield(L, -2, "evictions");
    lua_pushnumber(L, (double) st.recoveries);
    lua_setfield(L, -2, "recoveries");
    return 1;
}

/*
 * syntax: d = shared.get_dict(name[, size])
 * returns: the dictionary. Under `paygate run` it must be configured
 * (shared = { name = "16m" }; "paygate" always is) or this raises; under
 * `paygate exec` it is made on first use with size ("1m" or bytes;
 * default 8m for "paygate", 1m for others).
 */
static int
lshared_get_dict(lua_State *L)
{
    size_t nlen;
    const char *name;
    struct gw_shdict *d;
    struct gw_lshared *ud;

    /* named here: luaL_checklstring's "bad argument #1 to '?'" did not
     * say which function, called as a tail call, through pcall or as
     * shared[name] */
    if (!lua_isstring(L, 1)) {
        return luaL_error(L, "shared.get_dict: name must be a string (got "
                             "%s%s)", lua_isnone(L, 1) ? "" : "a ",
                          lua_isnone(L, 1) ? "no value"
                          : luaL_typename(L, 1));
    }
    name = lua_tolstring(L, 1, &nlen);
    if (memchr(name, '\0', nlen) != NULL) {
        /* cut at the NUL, it would be another dictionary */
        return luaL_error(L, "shared.get_dict: the name '%s' has a NUL "
                             "byte in it", name);
    }
    lua_settop(L, 2);               /* the cache goes at 3 */
    lua_getfield(L, LUA_REGISTRYINDEX, "paygate.shared.cache");
    lua_getfield(L, -1, name);
    if (!lua_isnil(L, -1)) {
        return 1;
    }
    lua_pop(L, 1);
    d = gw_shdict_find(name);
    if (d == NULL) {
        size_t size = strcmp(name, GW_SHD_DEFAULT) == 0
                      ? GW_SHD_DEFAULT_SIZE : (1u << 20);
        char err[256];

        if (gw_shdict_sealed()) {
            /* the dictionaries are mapped once, before the first fork:
             * one written into the config file for a reload is not there
             * yet, and the hint alone sent the operator to their own line */
            return luaL_error(L, "shared.get_dict: no dictionary '%s' "
                                 "(configure shared = { %s = \"1m\" }; one "
                                 "added to the config file since the start "
                                 "takes a restart, not a reload)",
                              name, name);
        }
        if (lua_type(L, 2) == LUA_TNUMBER) {
            if (gw_shdict_size_of_number(lua_tonumber(L, 2), &size)
                != GW_OK) {
                return luaL_error(L, "shared.get_dict: size must be a whole"
                                     " number of bytes (32k..4g)");
            }
        } else if (lua_type(L, 2) == LUA_TSTRING) {
            if (gw_shdict_parse_size(lua_tostring(L, 2), &size) != GW_OK) {
                return luaL_error(L, "shared.get_dict: bad size '%s' "
                                     "(digits and an optional unit k, m "
                                     "or g, like \"512k\", \"16m\"; "
                                     "32k..4g)", lua_tostring(L, 2));
            }
        } else if (!lua_isnoneornil(L, 2)) {
            return luaL_error(L, "shared.get_dict: size must be a string "
                                 "or a number");
        }
        d = gw_shdict_create(name, size, err, sizeof(err));
        if (d == NULL) {
            return luaL_error(L, "shared.get_dict: %s", err);
        }
    }
    ud = lua_newuserdata(L, sizeof(*ud));
    ud->d = d;
    luaL_getmetatable(L, LSHARED_MT);
    lua_setmetatable(L, -2);
    lua_pushvalue(L, -1);
    lua_setfield(L, -3, name);
    return 1;
}

/* shared[name]: get_dict(name) */
static int
lshared_index(lua_State *L)
{
    lua_settop(L, 2);
    lua_remove(L, 1);
    lua_pushnil(L);                 /* no size */
    return lshared_get_dict(L);
}

static const luaL_Reg lshared_methods[] = {
    { "get", lshared_get },
    { "set", lshared_set },
    { "add", lshared_add },
    { "safe_add", lshared_safe_add },
    { "incr", lshared_incr },
    { "delete", lshared_delete },
    { "flush_all", lshared_flush_all },
    { "stats", lshared_stats },
    { NULL, NULL }
};

int
luaopen_paygate_shared(lua_State *L)
{
    luaL_newmetatable(L, LSHARED_MT);
    lua_newtable(L);
    luaL_register(L, NULL, lshared_methods);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
    lua_newtable(L);
    lua_setfield(L, LUA_REGISTRYINDEX, "paygate.shared.cache");
    lua_newtable(L);
    lua_pushcfunction(L, lshared_get_dict);
    lua_setfield(L, -2, "get_dict");
    lua_newtable(L);
    lua_pushcfunction(L, lshared_index);
    lua_setfield(L, -2, "__index");
    lua_setmetatable(L, -2);
    return 1;
}
