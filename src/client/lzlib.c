/*
 * lzlib.c -- paygate.zlib: streaming inflate (gzip or zlib, detected from
 * the header) for HTTP bodies, and one-shot gzip / zlib compression.
 *
 *   local z = zlib.inflate{ max_piece = 1 << 20, max_total = nil }
 *   local out, more = z:write(chunk)   -- or nil, err (kind malformed)
 *   while more do out, more = z:write("") end
 *   local rest, more2 = z:finish()     -- nil, err on a truncated stream
 *
 * Memory is bounded: one call returns at most max_piece bytes (default
 * 1 MiB); input it could not expand yet stays inside z and `more` is true
 * until the caller drains it with write(""). max_total (default none)
 * caps the whole output: past it the stream fails with kind too_large,
 * the answer to a zip bomb. Concatenated gzip members are read as one
 * stream (as gzip -d does).
 */
#include <stdlib.h>
#include <string.h>

#include <zlib.h>

#include "lstate.h"
#include "runtime.h"

#define LZ_MT          "paygate.zlib_inflate"
#define LZ_MAX_PIECE   (1 << 20)        /* bytes, default per call */

enum lz_state { LZ_OPEN, LZ_ENDED, LZ_FAILED };

struct gw_lz {
    z_stream        zs;             /* zlib's; inflateEnd() in lz_free */
    int             live;           /* 1 while zs needs inflateEnd */
    enum lz_state   state;
    unsigned char  *in;             /* owned: input not yet consumed */
    size_t          in_off, in_len; /* bytes: consumed offset, length */
    size_t          in_cap;         /* bytes allocated at in */
    size_t          max_piece;      /* bytes returned per call at most */
    double          max_total;      /* bytes of output in all; <0: none */
    double          total;          /* bytes of output so far */
    int             out_pending;    /* 1: zlib may hold output that did
                                       not fit the last call's room */
};

static void
lz_free(struct gw_lz *z)
{
    if (z->live) {
        inflateEnd(&z->zs);
        z->live = 0;
    }
    free(z->in);
    z->in = NULL;
    z->in_len = z->in_off = z->in_cap = 0;
}

/* Appends s to the pending input. Returns GW_OK or GW_ERR (no memory). */
static int
lz_feed(struct gw_lz *z, const char *s, size_t n)
{
    size_t have = z->in_len - z->in_off;

    if (n == 0) {
        return GW_OK;
    }
    if (z->in_off > 0) {
        memmove(z->in, z->in + z->in_off, have);
        z->in_off = 0;
        z->in_len = have;
    }
    if (have + n > z->in_cap) {
        size_t cap = have + n;
        unsigned char *b = realloc(z->in, cap);

        if (b == NULL) {
            return GW_ERR;
        }
        z->in = b;
        z->in_cap = cap;
    }
    memcpy(z->in + z->in_len, s, n);
    z->in_len += n;
    return GW_OK;
}

/*
 * Inflates pending input into a Lua string of at most max_piece bytes.
 * Pushes out, more (true while input is left) and returns 2, or pushes
 * nil, err and returns 2 (z is then failed).
 */
static int
lz_run(lua_State *L, struct gw_lz *z, int finishing)
{
    luaL_Buffer b;
    size_t produced = 0;
    const char *why = NULL;
    const char *kind = "malformed";

    luaL_buffinit(L, &b);
    while (produced < z->max_piece) {
        unsigned char *out;
        size_t room = LUAL_BUFFERSIZE;
        size_t got;
        int rc;

        if (z->in_off >= z->in_len && !z->out_pending) {
            break;
        }
        if (z->in_off >= z->in_len && z->state == LZ_ENDED) {
            z->out_pending = 0;
            break;
        }
        out = (unsigned char *) luaL_prepbuffer(&b);
        if (room > z->max_piece - produced) {
            room = z->max_piece - produced;
        }
        if (z->state == LZ_ENDED) {
            /* more input after a member's end: another gzip member */
            if (z->in[z->in_off] != 0x1f) {
                why = "data after the end of the stream";
                break;
            }
            inflateReset(&z->zs);
            z->state = LZ_OPEN;
        }
        z->zs.next_in = z->in + z->in_off;
        z->zs.avail_in = (uInt) (z->in_len - z->in_off);
        z->zs.next_out = out;
        z->zs.avail_out = (uInt) room;
        rc = inflate(&z->zs, Z_NO_FLUSH);
        z->in_off = z->in_len - z->zs.avail_in;
        got = room - z->zs.avail_out;
        z->out_pending = z->zs.avail_out == 0;
        luaL_addsize(&b, got);
        produced += got;
        z->total += (double) got;
        if (z->max_total >= 0 && z->total > z->max_total) {
            why = "output exceeds max_total";
            kind = "too_large";
            break;
        }
        if (rc == Z_STREAM_END) {
            z->state = LZ_ENDED;
            z->out_pending = 0;
            continue;
        }
        if (rc == Z_BUF_ERROR && got == 0) {
            z->out_pending = 0;
            break;                  /* needs more input */
        }
        if (rc == Z_NEED_DICT || rc == Z_DATA_ERROR) {
            why = z->zs.msg ? z->zs.msg : "corrupt data";
            break;
        }
        if (rc == Z_MEM_ERROR) {
            why = "no memory";
            kind = "unavailable";
            break;
        }
        if (rc != Z_OK) {
            why = "inflate failed";
            break;
        }
    }
    if (why == NULL && finishing && z->in_off >= z->in_len
        && !z->out_pending && z->state != LZ_ENDED) {
        why = "truncated stream";
    }
    if (why != NULL) {
        luaL_pushresult(&b);
        lua_pop(L, 1);
        z->state = LZ_FAILED;
        lz_free(z);
        return gw_push_error(L, kind, 0, "zlib inflate: %s", why);
    }
    luaL_pushresult(&b);
    lua_pushboolean(L, z->in_off < z->in_len || z->out_pending);
    return 2;
}

static struct gw_lz *
lz_check(lua_State *L, const char *what)
{
    struct gw_lz *z = gw_checkudata(L, 1, LZ_MT);

    if (z->state == LZ_FAILED) {
        luaL_error(L, "zlib inflate:%s: the stream failed or was closed",
                   what);
    }
    return z;
}

/*
 * syntax: out, more = z:write(chunk)   (chunk may be "" to drain)
 * returns: up to max_piece decompressed bytes ("" when it needs more
 *          input) and whether input is left to drain; or nil, err with
 *          kind malformed (corrupt data) or too_large (max_total).
 */
static int
lz_write(lua_State *L)
{
    struct gw_lz *z = lz_check(L, "write");
    size_t n;
    const char *s = luaL_optlstring(L, 2, "", &n);

    if (lz_feed(z, s, n) != GW_OK) {
        z->state = LZ_FAILED;
        lz_free(z);
        return gw_push_error(L, "unavailable", 0, "zlib inflate: no memory");
    }
    return lz_run(L, z, 0);
}

/*
 * syntax: rest, more = z:finish()
 * returns: the remaining output (call again while more is true); nil, err
 *          (kind malformed) when the stream ended early (truncated).
 */
static int
lz_finish(lua_State *L)
{
    return lz_run(L, lz_check(L, "finish"), 1);
}

/* z:close(), __gc: frees zlib's state; safe to call twice. */
static int
lz_gc(lua_State *L)
{
    struct gw_lz *z = gw_testudata(L, 1, LZ_MT);

    if (z == NULL) {
        return 0;
    }

    z->state = LZ_FAILED;
    lz_free(z);
    return 0;
}

static double
opt_size(lua_State *L, int t, const char *k, double def)
{
    double v;

    lua_getfield(L, t, k);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return def;
    }
    if (lua_type(L, -1) != LUA_TNUMBER || !(lua_tonumber(L, -1) >= 1)) {
        gw_raise(L, "zlib.inflate: opts.%s must be a positive number", k);
    }
    v = lua_tonumber(L, -1);
    lua_pop(L, 1);
    return v;
}

static const char *const inflate_opts[] = { "max_piece", "max_total", NULL };

/*
 * syntax: z = zlib.inflate([{ max_piece = bytes, max_total = bytes }])
 * returns: a streaming decompressor for gzip or zlib data.
 */
static int
lzlib_inflate(lua_State *L)
{
    struct gw_lz *z;
    double piece = LZ_MAX_PIECE, total = -1;

    if (!lua_isnoneornil(L, 1)) {
        gw_opts_known(L, 1, "zlib.inflate", "opts", inflate_opts);
        piece = opt_size(L, 1, "max_piece", LZ_MAX_PIECE);
        total = opt_size(L, 1, "max_total", -1);
    }
    if (piece > (double) (1u << 30)) {
        piece = (double) (1u << 30);
    }
    z = lua_newuserdata(L, sizeof(*z));
    memset(z, 0, sizeof(*z));
    z->state = LZ_FAILED;
    luaL_getmetatable(L, LZ_MT);
    lua_setmetatable(L, -2);
    if (inflateInit2(&z->zs, 15 + 32) != Z_OK) {
        return luaL_error(L, "zlib.inflate: no memory");
    }
    z->live = 1;
    z->state = LZ_OPEN;
    z->max_piece = (size_t) piece;
    z->max_total = total;
    return 1;
}

/* Compresses s at index 1 with windowBits wbits; pushes the result. */
static int
compress_with(lua_State *L, int wbits, const char *name)
{
    size_t n;
    const char *s = luaL_checklstring(L, 1, &n);
    int level = (int) luaL_optinteger(L, 2, Z_DEFAULT_COMPRESSION);
    z_stream zs;
    uLong bound;
    unsigned char *out;

    if (level < -1 || level > 9) {
        return luaL_error(L, "zlib.%s: level must be in [-1, 9]", name);
    }
    memset(&zs, 0, sizeof(zs));
    if (deflateInit2(&zs, level, Z_DEFLATED, wbits, 8,
                     Z_DEFAULT_STRATEGY) != Z_OK) {
        return luaL_error(L, "zlib.%s: no memory", name);
    }
    bound = deflateBound(&zs, (uLong) n) + 32;
    out = malloc(bound);
    if (out == NULL) {
        deflateEnd(&zs);
        return luaL_error(L, "zlib.%s: no memory", name);
    }
    zs.next_in = (unsigned char *) s;
    zs.avail_in = (uInt) n;
    zs.next_out = out;
    zs.avail_out = (uInt) bound;
    if (n > 0xffffffffu || deflate(&zs, Z_FINISH) != Z_STREAM_END) {
        deflateEnd(&zs);
        free(out);
        return luaL_error(L, "zlib.%s: input too large", name);
    }
    deflateEnd(&zs);
    lua_pushlstring(L, (const char *) out, bound - zs.avail_out);
    free(out);
    return 1;
}

/* syntax: gz = zlib.gzip(s[, level]) -- a gzip member (RFC 1952) */
static int
lzlib_gzip(lua_State *L)
{
    return compress_with(L, 15 + 16, "gzip");
}

/* syntax: z = zlib.compress(s[, level]) -- zlib format (RFC 1950) */
static int
lzlib_compress(lua_State *L)
{
    return compress_with(L, 15, "compress");
}

static const luaL_Reg lz_methods[] = {
    { "write", lz_write },
    { "finish", lz_finish },
    { "close", lz_gc },
    { NULL, NULL }
};

static const luaL_Reg lzlib_funcs[] = {
    { "inflate", lzlib_inflate },
    { "gzip", lzlib_gzip },
    { "compress", lzlib_compress },
    { NULL, NULL }
};

int
luaopen_paygate_zlib(lua_State *L)
{
    luaL_newmetatable(L, LZ_MT);
    lua_pushcfunction(L, lz_gc);
    lua_setfield(L, -2, "__gc");
    lua_newtable(L);
    luaL_register(L, NULL, lz_methods);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
    lua_newtable(L);
    luaL_register(L, NULL, lzlib_funcs);
    return 1;
}
