/*
 * ljson.c -- paygate.json.core: the JSON encoder of every response body
 * and log line, and the strict decoder of every JSON text from outside
 * (decode, at the end of this file).
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
 * Lua code of the value's runs while encoding; a finalizer may (one that
 * an allocation's GC step runs, e.g. in the final lua_pushlstring), and
 * an encode it calls gets a buffer of its own (busy): the one output
 * buffer per Lua state (owned by a userdata upvalue with __gc) is never
 * used twice at once. The encode runs under lua_pcall, so busy is
 * cleared however it ends: a result, its own error, or one raised
 * through it (no memory, a finalizer that raises).
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include <lua.h>
#include <lauxlib.h>

#include "log.h"
#include "lstate.h"

#define JSON_MAX_DEPTH 1000
#define JSON_KEEP_BYTES (256 * 1024) /* a bigger buffer is freed after use */
#define JSON_ENC_MT "paygate.json.encoder"

static const char empty_array_key = 'a'; /* address: the [] sentinel */
/* address: the registry key of the metatable decode gives an empty JSON
 * array, so that it encodes back as [] (a plain empty table is {}) */
static const char array_mt_key = 'm';

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
    int              busy;      /* an encode is using buf and path */
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
    return lua_error(L);        /* ljson_encode clears busy */
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

/* Whether s is plain printable ASCII (most keys and values), which JSON
 * writes as is between quotes. */
static inline int
plain_ascii(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char) s[i];

        if (c < 0x20 || c >= 0x7f || c == '"' || c == '\\') {
            return 0;
        }
    }
    return 1;
}

static inline void
enc_string(lua_State *L, struct json_enc *e, const char *s, size_t n)
{
    size_t q;

    if (plain_ascii(s, n)) {
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

/* 10^0 .. 10^20, exact */
static const unsigned __int128 pow10_u128[21] = {
    1ULL, 10ULL, 100ULL, 1000ULL, 10000ULL, 100000ULL, 1000000ULL,
    10000000ULL, 100000000ULL, 1000000000ULL, 10000000000ULL,
    100000000000ULL, 1000000000000ULL, 10000000000000ULL,
    100000000000000ULL, 1000000000000000ULL, 10000000000000000ULL,
    100000000000000000ULL, 1000000000000000000ULL,
    (unsigned __int128) 1000000000000000000ULL * 10,
    (unsigned __int128) 1000000000000000000ULL * 100,
};

/* a = m / 2^f (m < 2^53, 0 < f <= 67) against 10^x (-5 <= x <= 15):
 * -1, 0 or 1. */
static int
cmp_pow10(uint64_t m, int f, int x)
{
    unsigned __int128 l = m, r = (unsigned __int128) 1 << f;

    if (x >= 0) {
        r *= pow10_u128[x];
    } else {
        l *= pow10_u128[-x];
    }
    return l < r ? -1 : l > r;
}

/* What snprintf's "%.15g" writes for d when that reads back as d, else
 * its "%.17g" (format_number's contract), for a d that is not integral,
 * 1e-4 <= |d| < 1e15 (both then write plain decimals), made from d's
 * exact value with 128-bit integers instead of snprintf and strtod
 * (about a tenth of their work: a request log entry's time is such a
 * number). Correctly rounded, as glibc's are; returns 0 (snprintf
 * decides) for what correct rounding alone does not settle: a value
 * exactly halfway, in the digits or in reading them back, and a rounding
 * that carries into one more digit. */
static size_t
format_fraction(char *out, double d)
{
    double a = fabs(d), m53;
    int e, f, x, p, k, i, n = 0;
    uint64_t m, digits;
    unsigned __int128 v, q, r, half;
    char tmp[20];

    if (!(a >= 1e-4 && a < 1e15)) {
        return 0;
    }
    m53 = frexp(a, &e);                 /* a = m53 * 2^e, 0.5 <= m53 < 1 */
    m = (uint64_t) ldexp(m53, 53);      /* a = m / 2^f, 2^52 <= m < 2^53 */
    f = 53 - e;
    if (f <= 0 || f > 67) {
        return 0;
    }
    /* x: 10^x <= a < 10^(x+1) */
    x = (int) floor(log10(a));
    if (x < -4) {
        x = -4;
    }
    if (x > 14) {
        x = 14;
    }
    while (x > -4 && cmp_pow10(m, f, x) < 0) {
        x--;
    }
    while (x < 14 && cmp_pow10(m, f, x + 1) >= 0) {
        x++;
    }
    if (cmp_pow10(m, f, x) < 0 || cmp_pow10(m, f, x + 1) >= 0) {
        return 0;
    }
    for (p = 15; ; p = 17) {
        k = p - 1 - x;                  /* digits after the point, 0..20 */
        v = (unsigned __int128) m * pow10_u128[k];
        q = v >> f;
        r = v - (q << f);
        half = (unsigned __int128) 1 << (f - 1);
        if (r == half) {
            return 0;                   /* halfway: snprintf's own rule */
        }
        if (r > half) {
            q++;
            r = ((unsigned __int128) 1 << f) - r;   /* |q/10^k - a| 2^f */
        }
        if (q >= pow10_u128[p]) {
            return 0;                   /* 9.99.. -> 10: one more digit */
        }
        if (p == 17) {
            break;
        }
        /* Does q / 10^k read back as a? |q/10^k - a| = r / (10^k 2^f)
         * against half the gap to a's neighbours, 2^-f each side (the
         * gap below a power of two is half that, but the powers of two
         * that come here, 2^-13 .. 2^-1, have at most 10 significant
         * digits: they read back exactly); a tie: the reader's rule. */
        if (2 * r == pow10_u128[k]) {
            return 0;
        }
        if (2 * r < pow10_u128[k]) {
            break;
        }
    }
    digits = (uint64_t) q;
    for (i = 0; i < p; i++) {
        tmp[p - 1 - i] = (char) ('0' + digits % 10);
        digits /= 10;
    }
    while (k > 0 && tmp[p - 1] == '0') {   /* %g drops trailing zeros */
        p--;
        k--;
    }
    if (d < 0) {
        out[n++] = '-';
    }
    if (x >= 0) {
        memcpy(out + n, tmp, (size_t) x + 1);
        n += x + 1;
        if (k > 0) {
            out[n++] = '.';
            memcpy(out + n, tmp + x + 1, (size_t) k);
            n += k;
        }
    } else {
        out[n++] = '0';
        out[n++] = '.';
        for (i = 0; i < -x - 1; i++) {
            out[n++] = '0';
        }
        memcpy(out + n, tmp, (size_t) p);
        n += p;
    }
    return (size_t) n;
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
    n = format_fraction(out, d);
    if (n > 0) {
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
    /* an empty array decoded ([] read back): [] again, while it is
     * empty (keys set on it since make it an object) */
    if (lua_getmetatable(L, idx)) {
        int marked;

        lua_pushlightuserdata(L, (void *) &array_mt_key);
        lua_rawget(L, LUA_REGISTRYINDEX);
        marked = lua_rawequal(L, -1, -2);
        lua_pop(L, 2);
        if (marked) {
            lua_pushnil(L);
            if (lua_next(L, idx) == 0) {
                enc_add(L, e, "[]", 2);
                e->depth--;
                return;
            }
            lua_pop(L, 2);
        }
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

/* The encode itself, under ljson_encode's lua_pcall: (value, state as a
 * light userdata) -> text. Raises on what JSON cannot hold. */
static int
ljson_encode_run(lua_State *L)
{
    struct json_enc *e = lua_touserdata(L, 2);

    enc_value(L, e, 1);
    lua_pushlstring(L, e->buf, e->len);
    return 1;
}

/* A value that is no table (at 1), encoded on the C stack: no lua_pcall
 * and no state buffer, as nothing here raises before the result is made
 * but for a value JSON cannot hold (raised as enc_value raises it, the
 * path being just "value"); the final lua_pushlstring's allocation may
 * raise or run a finalizer that encodes, and neither finds state to undo.
 * Such an encode -- one key or value at a time, as paygate.audit's
 * canonical JSON makes them -- costs about a third of the general way,
 * most of which was its lua_pcall. Returns 0 for a string too long for
 * the buffer (the general way takes it). */
static int
enc_scalar(lua_State *L)
{
    char buf[512];
    size_t n;
    const char *s;

    switch (lua_type(L, 1)) {
    case LUA_TSTRING:
        s = lua_tolstring(L, 1, &n);
        if (n <= sizeof(buf) - 2 && plain_ascii(s, n)) {
            buf[0] = '"';
            memcpy(buf + 1, s, n);
            buf[n + 1] = '"';
            n += 2;
        } else {
            /* 0: too long once escaped (gw_json_quote checks its room) */
            n = gw_json_quote(buf, sizeof(buf), s, n);
            if (n == 0) {
                return 0;
            }
        }
        break;
    case LUA_TNUMBER:
        n = format_number(buf, lua_tonumber(L, 1));
        if (n == 0) {
            lua_pushliteral(L, "paygate.json.encode: NaN or infinite number"
                            " at value");
            return lua_error(L);
        }
        break;
    case LUA_TBOOLEAN:
        if (lua_toboolean(L, 1)) {
            lua_pushliteral(L, "true");
        } else {
            lua_pushliteral(L, "false");
        }
        return 1;
    case LUA_TNIL:
        lua_pushliteral(L, "null");
        return 1;
    case LUA_TLIGHTUSERDATA:
        if (lua_touserdata(L, 1) == NULL) {
            lua_pushliteral(L, "null");
            return 1;
        }
        if (lua_touserdata(L, 1) == (void *) &empty_array_key) {
            lua_pushliteral(L, "[]");
            return 1;
        }
        /* fall through */
    default:
        lua_pushfstring(L, "paygate.json.encode: cannot encode a %s at"
                        " value", luaL_typename(L, 1));
        return lua_error(L);
    }
    lua_pushlstring(L, buf, n);
    return 1;
}

/* paygate.json.core.encode(value) -> text; raises on what JSON cannot
 * hold (see the top of this file). */
static int
ljson_encode(lua_State *L)
{
    struct json_enc *e = lua_touserdata(L, lua_upvalueindex(1));
    int nested = 0, rc;

    luaL_checkany(L, 1);
    lua_settop(L, 1);
    if (lua_type(L, 1) != LUA_TTABLE && enc_scalar(L)) {
        return 1;
    }
    if (e->busy) {
        /* Called while an encode is using the state's buffer: by a
         * finalizer that an allocation of that encode ran (the GC step of
         * its lua_pushlstring, which happens before the copy), e.g. one
         * that logs. It gets a buffer of its own (freed below), so the
         * outer one's is neither overwritten nor freed under it. */
        e = lua_newuserdata(L, sizeof(*e));
        memset(e, 0, sizeof(*e));
        lua_getmetatable(L, lua_upvalueindex(1));
        lua_setmetatable(L, -2);
        nested = 1;
    }
    e->busy = 1;
    e->len = 0;
    e->depth = 0;
    lua_pushvalue(L, lua_upvalueindex(2));     /* ljson_encode_run */
    lua_pushvalue(L, 1);
    lua_pushlightuserdata(L, e);
    rc = lua_pcall(L, 2, 1, 0);
    /* every way out comes here: the text, or any error raised in or
     * through the encode; left set, busy would send every later encode
     * of this state the nested way */
    if (nested || e->cap > JSON_KEEP_BYTES) {
        free(e->buf);
        e->buf = NULL;
        e->cap = 0;
    }
    e->len = 0;
    e->busy = 0;
    if (rc != 0) {
        return lua_error(L);        /* the error, raised on */
    }
    return 1;
}

/* __gc: reachable with any userdata (debug.getupvalue(encode, 1), then
 * getmetatable), so it ignores what is not an encoder instead of freeing
 * a pointer read from another's bytes */
static int
ljson_enc_gc(lua_State *L)
{
    struct json_enc *e = gw_testudata(L, 1, JSON_ENC_MT);

    if (e == NULL) {
        return 0;
    }
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

/* ---- decoding ------------------------------------------------------- */

/*
 * paygate.json.core.decode(text[, unique]) -> value | nil, message
 *
 * RFC 8259, strictly: numbers only in JSON's grammar (no "+1", "01",
 * "1.", ".5", hex, Infinity, NaN) and within a double's range (1e999 is
 * refused, not made inf), no raw control characters in strings, no
 * trailing commas, nothing after the value, nesting at most
 * JSON_MAX_DEPTH. \u escapes become UTF-8 (a surrogate pair one code
 * point; a lone surrogate is refused); other bytes are kept as they are.
 * null is the NULL light userdata (cjson.null). Objects and arrays are
 * plain tables; a duplicate key keeps its last value, unless unique is
 * true: then it is refused, naming the key (readers of one text disagree
 * on which value a key given twice has, so a body checked by one and
 * acted on by another could say two things). Strings without escapes go
 * to Lua straight from the text, in one piece.
 */
struct json_dec {
    const unsigned char *p;     /* next byte */
    const unsigned char *end;   /* one past the last */
    const unsigned char *start; /* the text (for positions) */
    int                  depth; /* containers open */
    size_t               hinted; /* table slots hints may still add */
    int                  unique; /* 1: refuse a key given twice */
    const char          *err;   /* what went wrong, or NULL */
    const unsigned char *at;    /* where */
    char                 msg[96]; /* err when it names a key */
};

/* bytes a string's fast scan stops at: '"', '\\' and controls */
static const unsigned char json_str_stop[256] = {
    [0 ... 0x1F] = 1, ['"'] = 1, ['\\'] = 1
};

static int
dec_fail(struct json_dec *d, const char *what)
{
    if (d->err == NULL) {
        d->err = what;
        d->at = d->p;
    }
    return -1;
}

static inline void
dec_ws(struct json_dec *d)
{
    while (d->p < d->end && (*d->p == ' ' || *d->p == '\n' || *d->p == '\r'
                             || *d->p == '\t')) {
        d->p++;
    }
}

static int
dec_hex4(struct json_dec *d, unsigned *out)
{
    unsigned v = 0;

    if (d->end - d->p < 4) {
        return dec_fail(d, "short \\u escape");
    }
    for (int i = 0; i < 4; i++) {
        unsigned c = d->p[i];

        v <<= 4;
        if (c >= '0' && c <= '9') {
            v |= c - '0';
        } else if ((c | 0x20) >= 'a' && (c | 0x20) <= 'f') {
            v |= (c | 0x20) - 'a' + 10;
        } else {
            return dec_fail(d, "bad hex digit in a \\u escape");
        }
    }
    d->p += 4;
    *out = v;
    return 0;
}

/*
 * The first byte at or after p (before end) that a string's fast scan
 * stops at ('"', '\\' or a control byte), or end. Sixteen bytes at a
 * time where the machine has SSE2 (every x86-64 does): three compares and
 * a mask give the first such byte's place at once. Then eight at a time:
 * the exact tests for "some byte is zero" and "some byte is below 0x20"
 * on a word, whose lowest flag is the first such byte (a borrow only
 * flags bytes above it); what is left, byte by byte. Strings are most of
 * a WeChat Pay notification's bytes (the ciphertext alone is ~600).
 */
#define JSON_ONES  0x0101010101010101ULL
#define JSON_HIGHS 0x8080808080808080ULL

/* The high bit of each byte of w that is c, and maybe of bytes above the
 * first such one (a borrow): the lowest set bit is always exact. */
static inline uint64_t
json_word_has(uint64_t w, unsigned char c)
{
    uint64_t x = w ^ (JSON_ONES * c);

    return (x - JSON_ONES) & ~x & JSON_HIGHS;
}

static inline const unsigned char *
dec_str_scan(const unsigned char *p, const unsigned char *end)
{
#if defined(__SSE2__)
    const __m128i quote = _mm_set1_epi8('"');
    const __m128i bslash = _mm_set1_epi8('\\');
    const __m128i ctl = _mm_set1_epi8(0x1F);

    while (end - p >= 16) {
        __m128i v = _mm_loadu_si128((const __m128i *) (const void *) p);
        __m128i m = _mm_or_si128(
            _mm_or_si128(_mm_cmpeq_epi8(v, quote), _mm_cmpeq_epi8(v, bslash)),
            _mm_cmpeq_epi8(_mm_min_epu8(v, ctl), v));   /* v <= 0x1F */
        unsigned bits = (unsigned) _mm_movemask_epi8(m);

        if (bits != 0) {
            return p + __builtin_ctz(bits);
        }
        p += 16;
    }
#endif
    while (end - p >= 8) {
        uint64_t w, hit;

        memcpy(&w, p, 8);
        hit = json_word_has(w, '"') | json_word_has(w, '\\')
              | ((w - JSON_ONES * 0x20) & ~w & JSON_HIGHS);
        if (hit != 0) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
            return p + __builtin_ctzll(hit) / 8;
#else
            break;
#endif
        }
        p += 8;
    }
    while (p < end && !json_str_stop[*p]) {
        p++;
    }
    return p;
}

/* d->p just past the opening quote; pushes the string. */
static int
dec_string(lua_State *L, struct json_dec *d)
{
    const unsigned char *s = d->p, *p = d->p, *end = d->end;
    luaL_Buffer b;

    p = dec_str_scan(p, end);
    if (p < end && *p == '"') {
        lua_pushlstring(L, (const char *) s, (size_t) (p - s));
        d->p = p + 1;
        return 0;
    }
    luaL_buffinit(L, &b);
    luaL_addlstring(&b, (const char *) s, (size_t) (p - s));
    for (;;) {
        unsigned c, cp, lo;
        char u[4];
        int n;

        if (p >= end) {
            d->p = p;
            return dec_fail(d, "unterminated string");
        }
        c = *p;
        if (c == '"') {
            break;
        }
        if (c < 0x20) {
            d->p = p;
            return dec_fail(d, "control character in a string (escape it)");
        }
        if (c != '\\') {
            s = p;
            p = dec_str_scan(p, end);
            luaL_addlstring(&b, (const char *) s, (size_t) (p - s));
            continue;
        }
        if (p + 1 >= end) {
            d->p = p;
            return dec_fail(d, "unterminated string");
        }
        c = p[1];
        p += 2;
        switch (c) {
        case '"': luaL_addchar(&b, '"'); continue;
        case '\\': luaL_addchar(&b, '\\'); continue;
        case '/': luaL_addchar(&b, '/'); continue;
        case 'b': luaL_addchar(&b, '\b'); continue;
        case 'f': luaL_addchar(&b, '\f'); continue;
        case 'n': luaL_addchar(&b, '\n'); continue;
        case 'r': luaL_addchar(&b, '\r'); continue;
        case 't': luaL_addchar(&b, '\t'); continue;
        case 'u': break;
        default:
            d->p = p - 2;
            return dec_fail(d, "unknown escape in a string");
        }
        d->p = p;
        if (dec_hex4(d, &cp) != 0) {
            return -1;
        }
        p = d->p;
        if (cp >= 0xDC00 && cp <= 0xDFFF) {
            d->p = p - 6;
            return dec_fail(d, "lone low surrogate in a \\u escape");
        }
        if (cp >= 0xD800 && cp <= 0xDBFF) {
            if (end - p < 6 || p[0] != '\\' || p[1] != 'u') {
                d->p = p - 6;
                return dec_fail(d, "high surrogate without its low half");
            }
            d->p = p + 2;
            if (dec_hex4(d, &lo) != 0) {
                return -1;
            }
            if (lo < 0xDC00 || lo > 0xDFFF) {
                d->p = p;
                return dec_fail(d, "high surrogate without its low half");
            }
            p = d->p;
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
        }
        if (cp < 0x80) {
            u[0] = (char) cp;
            n = 1;
        } else if (cp < 0x800) {
            u[0] = (char) (0xC0 | (cp >> 6));
            u[1] = (char) (0x80 | (cp & 0x3F));
            n = 2;
        } else if (cp < 0x10000) {
            u[0] = (char) (0xE0 | (cp >> 12));
            u[1] = (char) (0x80 | ((cp >> 6) & 0x3F));
            u[2] = (char) (0x80 | (cp & 0x3F));
            n = 3;
        } else {
            u[0] = (char) (0xF0 | (cp >> 18));
            u[1] = (char) (0x80 | ((cp >> 12) & 0x3F));
            u[2] = (char) (0x80 | ((cp >> 6) & 0x3F));
            u[3] = (char) (0x80 | (cp & 0x3F));
            n = 4;
        }
        luaL_addlstring(&b, u, (size_t) n);
    }
    luaL_pushresult(&b);
    d->p = p + 1;
    return 0;
}

static int
dec_number(lua_State *L, struct json_dec *d)
{
    const unsigned char *s = d->p, *p = d->p, *end = d->end;
    int integral = 1;
    double v;

    if (p < end && *p == '-') {
        p++;
    }
    if (p < end && *p == '0') {
        p++;
    } else if (p < end && *p >= '1' && *p <= '9') {
        while (p < end && *p >= '0' && *p <= '9') {
            p++;
        }
    } else {
        return dec_fail(d, "invalid number");
    }
    if (p < end && *p == '.') {
        p++;
        if (!(p < end && *p >= '0' && *p <= '9')) {
            d->p = p;
            return dec_fail(d, "invalid number (a digit must follow '.')");
        }
        while (p < end && *p >= '0' && *p <= '9') {
            p++;
        }
        integral = 0;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < end && (*p == '+' || *p == '-')) {
            p++;
        }
        if (!(p < end && *p >= '0' && *p <= '9')) {
            d->p = p;
            return dec_fail(d, "invalid number (a digit must follow 'e')");
        }
        while (p < end && *p >= '0' && *p <= '9') {
            p++;
        }
        integral = 0;
    }
    if (integral && p - s - (*s == '-') <= 18) {
        /* fits an int64: its conversion rounds like strtod, and is faster */
        const unsigned char *q = s + (*s == '-');
        int64_t n = 0;

        while (q < p) {
            n = n * 10 + (*q++ - '0');
        }
        v = (double) (*s == '-' ? -n : n);
        if (n == 0 && *s == '-') {
            v = -0.0;
        }
    } else {
        char buf[64], *tmp = buf, *ep;
        size_t len = (size_t) (p - s);

        if (len >= sizeof(buf)) {
            tmp = malloc(len + 1);
            if (tmp == NULL) {
                return dec_fail(d, "no memory for a number");
            }
        }
        memcpy(tmp, s, len);
        tmp[len] = '\0';
        v = strtod(tmp, &ep);
        if (tmp != buf) {
            free(tmp);
        }
        if (!isfinite(v)) {
            return dec_fail(d, "number out of range");
        }
    }
    lua_pushnumber(L, (lua_Number) v);
    d->p = p;
    return 0;
}

static int dec_value(lua_State *L, struct json_dec *d);

/* d->p just past a key's opening quote; pushes the key. Keys come again
 * and again: a short one without escapes goes through gw_pushshort. */
static int
dec_key(lua_State *L, struct json_dec *d)
{
    const unsigned char *s = d->p, *p = dec_str_scan(d->p, d->end);

    if (p < d->end && *p == '"' && (size_t) (p - s) <= GW_SHORT_MAX) {
        gw_pushshort(L, (const char *) s, (size_t) (p - s));
        d->p = p + 1;
        return 0;
    }
    return dec_string(L, d);
}

/* The key on top is already in the object below it: refuses it, naming it
 * (at most 48 bytes, control characters as '?'), at its opening quote. */
static int
dec_dup_key(lua_State *L, struct json_dec *d, const unsigned char *at)
{
    size_t len, n;
    const char *k = lua_tolstring(L, -1, &len);
    char name[48];

    n = len > sizeof(name) ? sizeof(name) : len;
    for (size_t i = 0; i < n; i++) {
        name[i] = (unsigned char) k[i] < 0x20 ? '?' : k[i];
    }
    snprintf(d->msg, sizeof(d->msg), "duplicate key \"%.*s%s\"", (int) n,
             name, len > n ? "..." : "");
    d->p = at;
    return dec_fail(d, d->msg);
}

/*
 * Size hints for objects. A table that grows one key at a time is rehashed
 * at 5, 9, 17... keys (each rehash reinserts every key so far); one made
 * the right size never is. Objects of one shape come again and again (a
 * notification's body, its resource, a record's rows), and an object's
 * first key tells its shape well: its first (up to) 8 bytes, read in one
 * word before the key is decoded, pick a slot here, which remembers how
 * many members the last object so begun had. A wrong hint (another shape
 * with the same first key) only sizes a table wrong, as the fixed guess
 * of 4 did before: never more than JSON_HINT_MAX slots. Hints are set by
 * what was decoded before, which may be hostile: hints above 4 spend a
 * budget of one slot per 4 bytes of the text (an honest object has at
 * most that many members), so a text primed for large hints and then
 * nesting many small objects costs no more memory than its size allows.
 * A decoded object's pairs() order may differ with its table's size, so
 * with the hints: JSON objects have no order, and neither do Lua tables.
 * Per process, the loop thread's: no lock.
 */
#define JSON_HINTS    128
#define JSON_HINT_MAX 64

static struct {
    uint64_t tag;               /* the first key's word; 0: empty */
    int      n;                 /* members of the last such object */
} json_hints[JSON_HINTS];

/* The word naming an object's shape: the bytes of its first key from p
 * (just past the key's opening quote) up to its closing quote, at most 8,
 * the rest zero; 0 when the text ends within 8 bytes or the key is empty
 * (no hint kept). */
static inline uint64_t
json_hint_tag(const unsigned char *p, const unsigned char *end)
{
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    (void) p;
    (void) end;
    return 0;                   /* the tag's byte order: no hints there */
#else
    uint64_t w, m;

    if (end - p < 8) {
        return 0;
    }
    memcpy(&w, p, 8);
    m = json_word_has(w, '"');
    if (m != 0) {
        /* keep the bytes before the first quote */
        unsigned keep = (unsigned) __builtin_ctzll(m) / 8;

        w = keep == 0 ? 0 : w & (~0ULL >> (64 - keep * 8));
    }
    return w;
#endif
}

static inline unsigned
json_hint_slot(uint64_t tag)
{
    return (unsigned) ((tag * 0x9E3779B97F4A7C15ULL) >> 57);   /* 7 bits */
}

static int
dec_object(lua_State *L, struct json_dec *d)
{
    uint64_t tag;
    unsigned slot;
    int n = 0, size = 4;

    d->p++;                                 /* '{' */
    dec_ws(d);
    if (d->p < d->end && *d->p == '}') {
        d->p++;
        lua_createtable(L, 0, 0);
        return 0;
    }
    tag = d->p < d->end && *d->p == '"' ? json_hint_tag(d->p + 1, d->end) : 0;
    slot = json_hint_slot(tag);
    if (tag != 0 && json_hints[slot].tag == tag) {
        size = json_hints[slot].n;
        if (size > 4) {
            if ((size_t) size <= d->hinted) {
                d->hinted -= (size_t) size;
            } else {
                size = 4;           /* the budget is spent */
            }
        }
    }
    lua_createtable(L, 0, size);
    for (;;) {
        const unsigned char *key = d->p;

        if (d->p >= d->end || *d->p != '"') {
            return dec_fail(d, "expected a string key");
        }
        d->p++;
        if (dec_key(L, d) != 0) {
            return -1;
        }
        if (d->unique) {
            lua_pushvalue(L, -1);
            lua_rawget(L, -3);
            if (!lua_isnil(L, -1)) {
                lua_pop(L, 1);
                return dec_dup_key(L, d, key);
            }
            lua_pop(L, 1);
        }
        dec_ws(d);
        if (d->p >= d->end || *d->p != ':') {
            return dec_fail(d, "expected ':' after a key");
        }
        d->p++;
        dec_ws(d);
        if (dec_value(L, d) != 0) {
            return -1;
        }
        lua_rawset(L, -3);
        n++;
        dec_ws(d);
        if (d->p < d->end && *d->p == ',') {
            d->p++;
            dec_ws(d);
            continue;
        }
        if (d->p < d->end && *d->p == '}') {
            d->p++;
            if (tag != 0) {
                json_hints[slot].tag = tag;
                json_hints[slot].n = n < JSON_HINT_MAX ? n : JSON_HINT_MAX;
            }
            return 0;
        }
        return dec_fail(d, "expected ',' or '}' in an object");
    }
}

static int
dec_array(lua_State *L, struct json_dec *d)
{
    int i = 0;

    d->p++;                                 /* '[' */
    lua_createtable(L, 4, 0);
    dec_ws(d);
    if (d->p < d->end && *d->p == ']') {
        d->p++;
        /* marked, so that encode writes it back as [] */
        lua_pushlightuserdata(L, (void *) &array_mt_key);
        lua_rawget(L, LUA_REGISTRYINDEX);
        lua_setmetatable(L, -2);
        return 0;
    }
    for (;;) {
        if (dec_value(L, d) != 0) {
            return -1;
        }
        lua_rawseti(L, -2, ++i);
        dec_ws(d);
        if (d->p < d->end && *d->p == ',') {
            d->p++;
            dec_ws(d);
            continue;
        }
        if (d->p < d->end && *d->p == ']') {
            d->p++;
            return 0;
        }
        return dec_fail(d, "expected ',' or ']' in an array");
    }
}

static int
dec_literal(struct json_dec *d, const char *word, size_t n)
{
    if ((size_t) (d->end - d->p) < n || memcmp(d->p, word, n) != 0) {
        return dec_fail(d, "expected a value");
    }
    d->p += n;
    return 0;
}

/* d->p at the value's first byte (whitespace skipped) */
static int
dec_value(lua_State *L, struct json_dec *d)
{
    int rc;

    if (d->p >= d->end) {
        return dec_fail(d, "expected a value");
    }
    switch (*d->p) {
    case '{':
    case '[':
        if (++d->depth > JSON_MAX_DEPTH) {
            return dec_fail(d, "nesting deeper than 1000");
        }
        luaL_checkstack(L, 4, "paygate.json.decode: document too deep");
        rc = *d->p == '{' ? dec_object(L, d) : dec_array(L, d);
        d->depth--;
        return rc;
    case '"':
        d->p++;
        return dec_string(L, d);
    case 't':
        if (dec_literal(d, "true", 4) != 0) {
            return -1;
        }
        lua_pushboolean(L, 1);
        return 0;
    case 'f':
        if (dec_literal(d, "false", 5) != 0) {
            return -1;
        }
        lua_pushboolean(L, 0);
        return 0;
    case 'n':
        if (dec_literal(d, "null", 4) != 0) {
            return -1;
        }
        lua_pushlightuserdata(L, NULL);
        return 0;
    default:
        if (*d->p == '-' || (*d->p >= '0' && *d->p <= '9')) {
            return dec_number(L, d);
        }
        return dec_fail(d, "expected a value");
    }
}

static int
ljson_decode(lua_State *L)
{
    size_t len;
    const char *text = luaL_checklstring(L, 1, &len);
    struct json_dec d;

    d.start = d.p = (const unsigned char *) text;
    d.end = d.p + len;
    d.depth = 0;
    d.hinted = len / 4;
    d.unique = lua_toboolean(L, 2);
    d.err = NULL;
    d.at = NULL;
    lua_settop(L, 1);
    dec_ws(&d);
    if (dec_value(L, &d) == 0) {
        dec_ws(&d);
        if (d.p == d.end) {
            return 1;
        }
        dec_fail(&d, "more after the value");
    }
    lua_settop(L, 1);
    lua_pushnil(L);
    if (d.at != NULL && d.at < d.end) {
        lua_pushfstring(L, "%s at byte %d", d.err,
                        (int) (d.at - d.start) + 1);
    } else {
        lua_pushfstring(L, "%s at the end of the text", d.err);
    }
    return 2;
}

int
luaopen_paygate_json_core(lua_State *L)
{
    struct json_enc *e;

    lua_createtable(L, 0, 3);
    e = lua_newuserdata(L, sizeof(*e));
    memset(e, 0, sizeof(*e));
    luaL_newmetatable(L, JSON_ENC_MT);
    lua_pushcfunction(L, ljson_enc_gc);
    lua_setfield(L, -2, "__gc");
    lua_setmetatable(L, -2);
    lua_pushcfunction(L, ljson_encode_run);
    lua_pushcclosure(L, ljson_encode, 2);
    lua_setfield(L, -2, "encode");
    lua_pushcfunction(L, ljson_finite);
    lua_setfield(L, -2, "finite");
    lua_pushcfunction(L, ljson_decode);
    lua_setfield(L, -2, "decode");
    lua_pushlightuserdata(L, (void *) &empty_array_key);
    lua_setfield(L, -2, "empty_array");
    lua_pushlightuserdata(L, (void *) &array_mt_key);
    lua_createtable(L, 0, 1);
    lua_pushliteral(L, "paygate.json.array");
    lua_setfield(L, -2, "__name");
    lua_rawset(L, LUA_REGISTRYINDEX);
    return 1;
}
