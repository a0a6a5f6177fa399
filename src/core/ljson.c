/*
 * ljson.c -- paygate.json.core: the JSON encoder of every response body
 * and log line, and the cheap overflow test of the decoder.
 *
 * Why not cjson.encode: lua-cjson 2.1.0 writes at most 14 significant
 * digits, so 123456789012345 left as 1.2345678901234e+14 while storage
 * hands out integers exact to 2^53. Here an integral number within
 * +-2^63 is written as an integer, any other finite number with the
 * shortest of %.15g / %.17g that reads back the same. Strings go through
 * gw_json_quote() ("/" is not escaped, bad UTF-8 becomes U+FFFD).
 *
 * Tables: keys exactly 1..n make an array, anything else an object (number
 * keys written as strings, like cjson); an empty table is {}, and the
 * empty_array sentinel is []. Functions, userdata, threads, NaN, +-inf,
 * sparse arrays, cycles and nesting deeper than JSON_MAX_DEPTH raise,
 * naming the path of the bad value. Reading uses raw access only, so no
 * Lua code runs while encoding: the one output buffer per Lua state
 * (owned by a userdata upvalue with __gc) is never used twice at once.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lua.h>
#include <lauxlib.h>

#include "log.h"
#include "lstate.h"

#define JSON_MAX_DEPTH 1000
#define JSON_KEEP_BYTES (256 * 1024) /* a bigger buffer is freed after use */

static const char empty_array_key = 'a'; /* address: the [] sentinel */

/* One step of the path from the encoded value to the current one. */
struct json_step {
    const void *table;          /* the table entered (cycle test) */
    const char *key;            /* string key (anchored on the Lua stack) */
    size_t      key_len;        /* bytes of key */
    lua_Number  index;          /* number key when key is NULL */
};

struct json_enc {
    char            *buf;       /* owned; malloc'd, freed by __gc */
    size_t           len;       /* bytes written */
    size_t           cap;       /* bytes allocated */
    int              depth;     /* tables entered */
    struct json_step path[JSON_MAX_DEPTH + 1]; /* steps 0..depth-1 */
};

/* Raises "paygate.json.encode: WHAT at value.a[2].b". Memory stays with
 * the userdata, so raising leaks nothing. */
static int
enc_fail(lua_State *L, struct json_enc *e, const char *what)
{
    luaL_Buffer b;
    char num[64];

    luaL_buffinit(L, &b);
    luaL_addstring(&b, "paygate.json.encode: ");
    luaL_addstring(&b, what);
    luaL_addstring(&b, " at value");
    for (int i = 0; i < e->depth && i < 32; i++) {
        const struct json_step *s = &e->path[i];

        if (s->key == NULL && s->index == 0) {
            continue;           /* the step into a table not yet keyed */
        }
        if (s->key != NULL) {
            luaL_addchar(&b, '.');
            luaL_addlstring(&b, s->key, s->key_len > 64 ? 64 : s->key_len);
        } else {
            snprintf(num, sizeof(num), "[%.17g]", (double) s->index);
            luaL_addstring(&b, num);
        }
    }
    if (e->depth > 32) {
        luaL_addstring(&b, "...");
    }
    luaL_pushresult(&b);
    return lua_error(L);
}

static void
enc_grow(lua_State *L, struct json_enc *e, size_t n)
{
    size_t cap;
    char *p;

    cap = e->cap < 256 ? 256 : e->cap;
    while (cap - e->len < n) {
        if (cap > SIZE_MAX / 2) {
            luaL_error(L, "paygate.json.encode: output too large");
        }
        cap *= 2;
    }
    p = realloc(e->buf, cap);
    if (p == NULL) {
        luaL_error(L, "paygate.json.encode: no memory");
    }
    e->buf = p;
    e->cap = cap;
}

static inline void
enc_reserve(lua_State *L, struct json_enc *e, size_t n)
{
    if (e->cap - e->len < n) {
        enc_grow(L, e, n);
    }
}

static inline void
enc_char(lua_State *L, struct json_enc *e, char c)
{
    if (e->cap == e->len) {
        enc_grow(L, e, 1);
    }
    e->buf[e->len++] = c;
}

static inline void
enc_add(lua_State *L, struct json_enc *e, const char *s, size_t n)
{
    enc_reserve(L, e, n);
    memcpy(e->buf + e->len, s, n);
    e->len += n;
}

static inline void
enc_string(lua_State *L, struct json_enc *e, const char *s, size_t n)
{
    size_t q, i;

    /* plain printable ASCII (most keys and values): copied as is */
    for (i = 0; i < n; i++) {
        unsigned char c = (unsigned char) s[i];

        if (c < 0x20 || c >= 0x7f || c == '"' || c == '\\') {
            break;
        }
    }
    if (i == n) {
        enc_reserve(L, e, n + 2);
        e->buf[e->len] = '"';
        memcpy(e->buf + e->len + 1, s, n);
        e->buf[e->len + n + 1] = '"';
        e->len += n + 2;
        return;
    }
    if (n > (SIZE_MAX - 16) / 6) {
        luaL_error(L, "paygate.json.encode: string too large");
    }
    enc_reserve(L, e, n * 6 + 16);  /* worst case: every byte \u00XX */
    q = gw_json_quote(e->buf + e->len, e->cap - e->len, s, n);
    e->len += q;
}

/* Writes d into out (>= 32 bytes); returns the length, or 0 for NaN and
 * +-inf. Integral values within +-2^63 are exact integers. */
static size_t
format_number(char *out, double d)
{
    char tmp[24];
    unsigned long long u;
    size_t n = 0, k = 0;
    int len;

    if (!isfinite(d)) {
        return 0;
    }
    if (d == floor(d) && d >= -9223372036854775808.0
        && d < 9223372036854775808.0) {
        if (d == 0 && signbit(d)) {
            memcpy(out, "-0", 2);
            return 2;
        }
        if (d < 0) {
            out[n++] = '-';
            u = 0ULL - (unsigned long long) (long long) d; /* -2^63 too */
        } else {
            u = (unsigned long long) (long long) d;
        }
        do {
            tmp[k++] = (char) ('0' + u % 10);
            u /= 10;
        } while (u != 0);
        while (k > 0) {
            out[n++] = tmp[--k];
        }
        return n;
    }
    len = snprintf(out, 32, "%.15g", d);
    if (strtod(out, NULL) != d) {
        len = snprintf(out, 32, "%.17g", d);
    }
    return (size_t) len;
}

static void enc_value(lua_State *L, struct json_enc *e, int idx);

/* Classifies the table at idx: returns n > 0 when its keys are exactly
 * 1..n, 0 for an object (or an empty table), raises for a sparse array. */
static size_t
table_array_len(lua_State *L, struct json_enc *e, int idx)
{
    size_t count = 0;
    double max = 0;

    lua_pushnil(L);
    while (lua_next(L, idx) != 0) {
        double k;

        lua_pop(L, 1);
        if (lua_type(L, -1) != LUA_TNUMBER) {
            lua_pop(L, 1);
            return 0;
        }
        k = lua_tonumber(L, -1);
        if (k < 1 || k != floor(k) || k > 1e15) {
            lua_pop(L, 1);
            return 0;
        }
        if (k > max) {
            max = k;
        }
        count++;
    }
    if ((double) count != max) {
        enc_fail(L, e, "sparse array (holes are not encoded)");
    }
    return count;
}

static void
enc_table(lua_State *L, struct json_enc *e, int idx)
{
    struct json_step *step;
    const void *self = lua_topointer(L, idx);
    size_t n;
    int first = 1;

    for (int i = 0; i < e->depth; i++) {
        if (e->path[i].table == self) {
            enc_fail(L, e, "cycle (a table contains itself)");
        }
    }
    if (e->depth >= JSON_MAX_DEPTH) {
        enc_fail(L, e, "nesting deeper than 1000");
    }
    if (!lua_checkstack(L, 4)) {
        enc_fail(L, e, "Lua stack exhausted");
    }
    step = &e->path[e->depth++];
    step->table = self;
    step->key = NULL;
    step->index = 0;

    n = table_array_len(L, e, idx);
    if (n > 0) {
        enc_char(L, e, '[');
        for (size_t i = 1; i <= n; i++) {
            if (i > 1) {
                enc_char(L, e, ',');
            }
            step->index = (lua_Number) i;
            lua_rawgeti(L, idx, (int) i);
            enc_value(L, e, lua_gettop(L));
            lua_pop(L, 1);
        }
        enc_char(L, e, ']');
        e->depth--;
        return;
    }
    enc_char(L, e, '{');
    lua_pushnil(L);
    while (lua_next(L, idx) != 0) {
        int kt = lua_type(L, -2);
        size_t klen;
        const char *k;

        if (!first) {
            enc_char(L, e, ',');
        }
        first = 0;
        if (kt == LUA_TSTRING) {
            k = lua_tolstring(L, -2, &klen);
            step->key = k;
            step->key_len = klen;
            enc_string(L, e, k, klen);
        } else if (kt == LUA_TNUMBER) {
            char num[40];

            step->key = NULL;
            step->index = lua_tonumber(L, -2);
            num[0] = '"';
            klen = format_number(num + 1, lua_tonumber(L, -2));
            if (klen == 0) {
                enc_fail(L, e, "NaN or infinite key");
            }
            num[klen + 1] = '"';
            enc_add(L, e, num, klen + 2);
        } else {
            step->key = NULL;
            step->index = 0;        /* the path stops at this table */
            lua_pushfstring(L, "%s key", lua_typename(L, kt));
            enc_fail(L, e, lua_tostring(L, -1));
        }
        enc_char(L, e, ':');
        enc_value(L, e, lua_gettop(L));
        lua_pop(L, 1);
    }
    enc_char(L, e, '}');
    e->depth--;
}

static void
enc_value(lua_State *L, struct json_enc *e, int idx)
{
    char num[40];
    size_t n;
    const char *s;

    switch (lua_type(L, idx)) {
    case LUA_TSTRING:
        s = lua_tolstring(L, idx, &n);
        enc_string(L, e, s, n);
        return;
    case LUA_TNUMBER:
        n = format_number(num, lua_tonumber(L, idx));
        if (n == 0) {
            enc_fail(L, e, "NaN or infinite number");
        }
        enc_add(L, e, num, n);
        return;
    case LUA_TTABLE:
        enc_table(L, e, idx);
        return;
    case LUA_TBOOLEAN:
        if (lua_toboolean(L, idx)) {
            enc_add(L, e, "true", 4);
        } else {
            enc_add(L, e, "false", 5);
        }
        return;
    case LUA_TNIL:
        enc_add(L, e, "null", 4);
        return;
    case LUA_TLIGHTUSERDATA:
        if (lua_touserdata(L, idx) == NULL) {
            enc_add(L, e, "null", 4);
            return;
        }
        if (lua_touserdata(L, idx) == (void *) &empty_array_key) {
            enc_add(L, e, "[]", 2);
            return;
        }
        break;
    default:
        break;
    }
    lua_pushfstring(L, "cannot encode a %s", luaL_typename(L, idx));
    enc_fail(L, e, lua_tostring(L, -1));
}

/* paygate.json.core.encode(value) -> text; raises on what JSON cannot
 * hold (see the top of this file). */
static int
ljson_encode(lua_State *L)
{
    struct json_enc *e = lua_touserdata(L, lua_upvalueindex(1));

    luaL_checkany(L, 1);
    lua_settop(L, 1);
    e->len = 0;
    e->depth = 0;
    enc_value(L, e, 1);
    lua_pushlstring(L, e->buf, e->len);
    if (e->cap > JSON_KEEP_BYTES) {
        free(e->buf);
        e->buf = NULL;
        e->cap = 0;
    }
    e->len = 0;
    return 1;
}

static int
ljson_enc_gc(lua_State *L)
{
    struct json_enc *e = lua_touserdata(L, 1);

    free(e->buf);
    e->buf = NULL;
    e->cap = 0;
    return 0;
}

/* Whether every number in the table at idx (absolute), at any depth, is
 * finite. A decoded value's numbers are finite unless one overflowed a
 * double (1e999, a 400-digit integer): one walk over the values, which
 * for a JSON document is far fewer than its bytes. depth bounds the
 * recursion (the decoder refuses deeper documents anyway). */
static int
json_all_finite(lua_State *L, int idx, int depth)
{
    int ok = 1;

    if (depth > 1100) {
        return 0;
    }
    luaL_checkstack(L, 3, "paygate.json: document too deep");
    lua_pushnil(L);
    while (ok && lua_next(L, idx) != 0) {
        int t = lua_type(L, -1);

        if (t == LUA_TNUMBER) {
            ok = isfinite((double) lua_tonumber(L, -1));
        } else if (t == LUA_TTABLE) {
            ok = json_all_finite(L, lua_gettop(L), depth + 1);
        }
        lua_pop(L, 1);
    }
    if (!ok) {
        lua_pop(L, 1);                  /* the key lua_next left */
    }
    return ok;
}

/* paygate.json.core.finite(v) -> boolean: false when v is, or holds, a
 * number that is not finite (what a decoder makes of an overflow). */
static int
ljson_finite(lua_State *L)
{
    int t = lua_type(L, 1);

    if (t == LUA_TNUMBER) {
        lua_pushboolean(L, isfinite((double) lua_tonumber(L, 1)));
    } else if (t == LUA_TTABLE) {
        lua_settop(L, 1);
        lua_pushboolean(L, json_all_finite(L, 1, 0));
    } else {
        lua_pushboolean(L, 1);
    }
    return 1;
}

int
luaopen_paygate_json_core(lua_State *L)
{
    struct json_enc *e;

    lua_createtable(L, 0, 3);
    e = lua_newuserdata(L, sizeof(*e));
    memset(e, 0, sizeof(*e));
    lua_createtable(L, 0, 1);
    lua_pushcfunction(L, ljson_enc_gc);
    lua_setfield(L, -2, "__gc");
    lua_setmetatable(L, -2);
    lua_pushcclosure(L, ljson_encode, 1);
    lua_setfield(L, -2, "encode");
    lua_pushcfunction(L, ljson_finite);
    lua_setfield(L, -2, "finite");
    lua_pushlightuserdata(L, (void *) &empty_array_key);
    lua_setfield(L, -2, "empty_array");
    return 1;
}
