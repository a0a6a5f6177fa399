/*
 * lstate.c -- the Lua state every process runs: package paths, preloaded C
 * modules, and the paygate error metatable used by gw_push_error().
 */
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <lualib.h>

#include "co.h"
#include "lstate.h"

static const char error_mt_key = 'e';   /* registry: the error metatable */

static int
is_dir(const char *p)
{
    struct stat st;

    return stat(p, &st) == 0 && S_ISDIR(st.st_mode);
}

const char *
gw_lua_dir(void)
{
    static char dir[PATH_MAX + 64];
    char exe[PATH_MAX];
    const char *env;
    ssize_t n;
    char *slash;

    if (dir[0] != '\0') {
        return dir;
    }
    env = getenv("PAYGATE_LUA_DIR");
    if (env != NULL && is_dir(env)) {
        snprintf(dir, sizeof(dir), "%s", env);
        return dir;
    }
    /* build/paygate → ../lua, then the source tree it was built from. */
    n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    if (n > 0) {
        exe[n] = '\0';
        slash = strrchr(exe, '/');
        if (slash != NULL) {
            *slash = '\0';
            snprintf(dir, sizeof(dir), "%s/../lua/paygate", exe);
            if (is_dir(dir)) {
                char up[PATH_MAX + 8], real[PATH_MAX];

                /* resolved, so tracebacks name lua/paygate/x.lua plainly */
                snprintf(up, sizeof(up), "%s/../lua", exe);
                snprintf(dir, sizeof(dir), "%s",
                         realpath(up, real) != NULL ? real : up);
                return dir;
            }
        }
    }
    snprintf(dir, sizeof(dir), "%s/lua", PAYGATE_SOURCE_DIR);
    return dir;
}

/* __tostring of every paygate error: "kind: message". Reads the fields
 * raw and never raises, whatever a caller stored in them. */
static int
error_tostring(lua_State *L)
{
    const char *kind, *msg;

    if (lua_type(L, 1) != LUA_TTABLE) {
        lua_pushliteral(L, "error");
        return 1;
    }
    lua_pushliteral(L, "kind");
    lua_rawget(L, 1);
    lua_pushliteral(L, "message");
    lua_rawget(L, 1);
    kind = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : "error";
    msg = (lua_type(L, -1) == LUA_TSTRING || lua_type(L, -1) == LUA_TNUMBER)
          ? lua_tostring(L, -1) : "";
    lua_pushfstring(L, "%s: %s", kind, msg);
    return 1;
}

static int
error_string_protected(lua_State *L)
{
    luaL_callmeta(L, 1, "__tostring");
    return 1;
}

const char *
gw_error_string(lua_State *L, int idx)
{
    int t;

    idx = idx < 0 ? lua_gettop(L) + idx + 1 : idx;
    t = lua_type(L, idx);
    if (t == LUA_TSTRING || t == LUA_TNUMBER) {
        lua_pushvalue(L, idx);
        lua_tostring(L, -1);            /* a number becomes its text */
        return lua_tostring(L, -1);
    }
    if (luaL_getmetafield(L, idx, "__tostring")) {
        lua_pop(L, 1);
        lua_pushcfunction(L, error_string_protected);
        lua_pushvalue(L, idx);
        if (lua_pcall(L, 1, 1, 0) == 0 && lua_type(L, -1) == LUA_TSTRING) {
            return lua_tostring(L, -1);
        }
        lua_pop(L, 1);
    }
    if (t == LUA_TTABLE) {
        const char *kind, *msg;

        lua_pushliteral(L, "kind");
        lua_rawget(L, idx);
        lua_pushliteral(L, "message");
        lua_rawget(L, idx);
        kind = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : NULL;
        msg = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
        if (kind != NULL || msg != NULL) {
            lua_pushfstring(L, "%s: %s", kind != NULL ? kind : "error",
                            msg != NULL ? msg : "");
            lua_replace(L, -3);
            lua_pop(L, 1);
            return lua_tostring(L, -1);
        }
        lua_pop(L, 2);
    }
    if (t == LUA_TNIL || t == LUA_TNONE) {
        lua_pushliteral(L, "nil error");
    } else {
        lua_pushfstring(L, "(error object is a %s value)",
                        luaL_typename(L, idx));
    }
    return lua_tostring(L, -1);
}

/* core.error_string(v) -> the text the runtime logs for an error value */
int
gw_lerror_string(lua_State *L)
{
    luaL_checkany(L, 1);
    gw_error_string(L, 1);
    return 1;
}

/* math.random is seeded from the kernel's CSPRNG in every state, so two
 * workers (or two `paygate exec` runs) never draw the same sequence:
 * retry jitter must not stampede in step. */
static void
seed_math_random(lua_State *L)
{
    unsigned int seed = 0;

    if (getentropy(&seed, sizeof(seed)) != 0) {
        seed = (unsigned int) getpid() ^ (unsigned int) time(NULL);
    }
    lua_getglobal(L, "math");
    lua_getfield(L, -1, "randomseed");
    lua_pushnumber(L, (lua_Number) seed);
    lua_call(L, 1, 0);
    lua_pop(L, 1);
}

int
gw_push_error(lua_State *L, const char *kind, int retryable,
              const char *fmt, ...)
{
    char msg[1024];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    lua_pushnil(L);
    lua_createtable(L, 0, 3);
    lua_pushstring(L, kind);
    lua_setfield(L, -2, "kind");
    lua_pushstring(L, msg);
    lua_setfield(L, -2, "message");
    lua_pushboolean(L, retryable);
    lua_setfield(L, -2, "retryable");
    lua_pushlightuserdata(L, (void *) &error_mt_key);
    lua_rawget(L, LUA_REGISTRYINDEX);
    lua_setmetatable(L, -2);
    return 2;
}

/* paygate.core.error_mt(): the shared metatable, for Lua-made errors. */
int
gw_push_error_mt(lua_State *L)
{
    lua_pushlightuserdata(L, (void *) &error_mt_key);
    lua_rawget(L, LUA_REGISTRYINDEX);
    return 1;
}

/* Is the source of a stack frame C or one of paygate's own Lua modules
 * (lua/paygate/NAME.lua)? */
static int
internal_frame(const lua_Debug *ar)
{
    const char *s = ar->source, *slash;

    if (strcmp(ar->what, "C") == 0) {
        return 1;
    }
    if (s[0] != '@') {
        return 0;                        /* a chunk loaded from a string */
    }
    slash = strrchr(s, '/');
    return slash != NULL && slash - s >= 8
           && strncmp(slash - 8, "/paygate", 8) == 0;
}

int
gw_vraise(lua_State *L, const char *fmt, va_list ap)
{
    lua_Debug ar;
    int level;

    for (level = 1; lua_getstack(L, level, &ar); level++) {
        lua_getinfo(L, "Sl", &ar);
        if (!internal_frame(&ar)) {
            break;
        }
    }
    if (lua_getstack(L, level, &ar) && lua_getinfo(L, "Sl", &ar)
        && ar.currentline > 0) {
        lua_pushfstring(L, "%s:%d: ", ar.short_src, ar.currentline);
    } else {
        lua_pushliteral(L, "");
    }
    lua_pushvfstring(L, fmt, ap);
    lua_concat(L, 2);
    return lua_error(L);
}

int
gw_raise(lua_State *L, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    gw_vraise(L, fmt, ap);
    va_end(ap);
    return 0;
}

void
gw_opts_known(lua_State *L, int idx, const char *fn, const char *what,
              const char *const *names)
{
    const char *const *n;

    if (idx < 0) {
        idx = lua_gettop(L) + idx + 1;
    }
    if (!lua_istable(L, idx)) {
        gw_raise(L, "%s: %s must be a table", fn, what);
    }
    lua_pushnil(L);
    while (lua_next(L, idx) != 0) {
        lua_pop(L, 1);
        if (lua_type(L, -1) != LUA_TSTRING) {
            gw_raise(L, "%s: %s has a key that is not a name (%s)", fn,
                     what, luaL_typename(L, -1));
        }
        for (n = names; *n != NULL; n++) {
            if (strcmp(*n, lua_tostring(L, -1)) == 0) {
                break;
            }
        }
        if (*n == NULL) {
            gw_raise(L, "%s: unknown option %s.%s", fn, what,
                     lua_tostring(L, -1));
        }
    }
}

double
gw_opt_number(lua_State *L, int idx, const char *fn, const char *name,
              double def)
{
    double v;

    lua_getfield(L, idx, name);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return def;
    }
    if (lua_type(L, -1) != LUA_TNUMBER || !isfinite(lua_tonumber(L, -1))) {
        gw_raise(L, "%s: opts.%s must be a number", fn, name);
    }
    v = lua_tonumber(L, -1);
    lua_pop(L, 1);
    return v;
}

const char *
gw_arg_string(lua_State *L, int idx, const char *fn, const char *what,
              size_t *len)
{
    if (lua_type(L, idx) != LUA_TSTRING) {
        luaL_error(L, "%s: %s must be a string (got %s)", fn, what,
                   luaL_typename(L, idx));
    }
    return lua_tolstring(L, idx, len);
}

double
gw_arg_number(lua_State *L, int idx, const char *fn, const char *what)
{
    if (!lua_isnumber(L, idx)) {
        luaL_error(L, "%s: %s must be a number (got %s)", fn, what,
                   luaL_typename(L, idx));
    }
    return lua_tonumber(L, idx);
}

const char *
gw_opt_string(lua_State *L, int idx, const char *fn, const char *name)
{
    const char *s;

    lua_getfield(L, idx, name);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return NULL;
    }
    if (lua_type(L, -1) != LUA_TSTRING) {
        gw_raise(L, "%s: opts.%s must be a string", fn, name);
    }
    s = lua_tostring(L, -1);
    lua_pop(L, 1);                      /* still referenced by the table */
    return s;
}

/* What gw_testudata, gw_pushkey and gw_pushshort remember: the
 * metatable of each type name, and registry refs to strings, for THE
 * state: used only while exactly one state made by gw_lstate_new exists
 * and the caller is that state (its registry; coroutines share it). Any
 * other state -- a second one, one from plain luaL_newstate -- takes
 * Lua's own paths. A state of gw_lstate_new is never closed (the process
 * ends with it); one closed and another made would count two, and turn
 * the memory off rather than let the new state meet the old addresses.
 * Each gw_lstate_new also makes every entry stale. Only the loop thread
 * runs Lua, so no lock. */
#define GW_SEEN_SLOTS 64
static unsigned    lstate_gen = 1;      /* bumped by each gw_lstate_new */
static int         lstate_open;         /* states gw_lstate_new made */
static const void *lstate_registry;     /* the registry of the last one */

static struct {
    const char *tname;              /* the caller's literal (by address) */
    unsigned    gen;
    const void *mt;                 /* registry[tname] */
} udata_seen[GW_SEEN_SLOTS];

static struct {
    const char *k;
    unsigned    gen;
    int         ref;                /* registry[ref] is the string k */
} keys_seen[GW_SEEN_SLOTS];

static int
seen_usable(lua_State *L)
{
    return lstate_open == 1
           && lua_topointer(L, LUA_REGISTRYINDEX) == lstate_registry;
}

void *
gw_testudata(lua_State *L, int idx, const char *tname)
{
    size_t      slot = ((uintptr_t)tname >> 3) % GW_SEEN_SLOTS;
    const void *mt;
    void       *p;
    int         same, usable;

    if (lua_type(L, idx) != LUA_TUSERDATA) {
        return NULL;
    }
    p = lua_touserdata(L, idx);     /* before a push moves a relative idx */
    if (!lua_getmetatable(L, idx)) {
        return NULL;
    }
    mt = lua_topointer(L, -1);
    usable = seen_usable(L);
    if (usable && udata_seen[slot].tname == tname
        && udata_seen[slot].gen == lstate_gen)
    {
        lua_pop(L, 1);
        return mt == udata_seen[slot].mt ? p : NULL;
    }
    lua_getfield(L, LUA_REGISTRYINDEX, tname);
    same = lua_rawequal(L, -1, -2);
    if (usable && lua_istable(L, -1)) {    /* registered: remember it */
        udata_seen[slot].tname = tname;
        udata_seen[slot].gen = lstate_gen;
        udata_seen[slot].mt = lua_topointer(L, -1);
    }
    lua_pop(L, 2);
    return same ? p : NULL;
}

void *
gw_checkudata(lua_State *L, int idx, const char *tname)
{
    void *p = gw_testudata(L, idx, tname);

    return p != NULL ? p : luaL_checkudata(L, idx, tname);
}

void
gw_pushkey(lua_State *L, const char *k)
{
    size_t slot = ((uintptr_t)k >> 2) % GW_SEEN_SLOTS;
    int    ref;

    if (!seen_usable(L)) {
        lua_pushstring(L, k);
        return;
    }
    if (keys_seen[slot].k == k && keys_seen[slot].gen == lstate_gen) {
        lua_rawgeti(L, LUA_REGISTRYINDEX, keys_seen[slot].ref);
        return;
    }
    if (keys_seen[slot].k != NULL && keys_seen[slot].gen == lstate_gen) {
        /* another key of this state had the slot: forget it, then free
         * its ref (never a slot naming a freed ref, even if this raises) */
        keys_seen[slot].k = NULL;
        luaL_unref(L, LUA_REGISTRYINDEX, keys_seen[slot].ref);
    }
    lua_pushstring(L, k);
    lua_pushvalue(L, -1);
    ref = luaL_ref(L, LUA_REGISTRYINDEX);
    /* remembered only once the ref exists: either push above can raise
     * (out of memory, or a finalizer's error from the GC step) */
    keys_seen[slot].ref = ref;
    keys_seen[slot].gen = lstate_gen;
    keys_seen[slot].k = k;
}

/* gw_pushshort's memory: direct-mapped by a hash of the bytes. */
#define GW_SHORT_SLOTS 256
static struct {
    unsigned char len;              /* 0: empty */
    char          bytes[GW_SHORT_MAX];
    unsigned      gen;
    int           ref;              /* registry[ref] is the string */
} shorts_seen[GW_SHORT_SLOTS];

/* A random key per process (gw_lstate_new draws it): which strings share
 * a slot cannot be worked out from outside, so hostile JSON keys cannot be
 * made to push the hot ones out. Every byte counts (len <= 32: up to four
 * 8-byte words, the last one overlapping). */
static uint64_t short_key;

static inline unsigned
short_slot(const char *s, size_t len)
{
    uint64_t h = short_key ^ (len * 0x9E3779B97F4A7C15ULL), w;
    size_t   i;

    if (len < 8) {
        w = 0;
        memcpy(&w, s, len);
        h = (h ^ w) * 0xFF51AFD7ED558CCDULL;
    } else {
        for (i = 0; i + 8 < len; i += 8) {
            memcpy(&w, s + i, 8);
            h = (h ^ w) * 0xFF51AFD7ED558CCDULL;
            h ^= h >> 29;
        }
        memcpy(&w, s + len - 8, 8);
        h = (h ^ w) * 0xFF51AFD7ED558CCDULL;
    }
    h ^= h >> 32;
    return (unsigned) ((h * 0xC4CEB9FE1A85EC53ULL) >> 56);   /* 8 bits */
}

void
gw_pushshort(lua_State *L, const char *s, size_t len)
{
    unsigned slot;
    int      ref;

    if (len == 0 || len > GW_SHORT_MAX || !seen_usable(L)) {
        lua_pushlstring(L, s, len);
        return;
    }
    slot = short_slot(s, len);
    if (shorts_seen[slot].len == len && shorts_seen[slot].gen == lstate_gen
        && memcmp(shorts_seen[slot].bytes, s, len) == 0)
    {
        lua_rawgeti(L, LUA_REGISTRYINDEX, shorts_seen[slot].ref);
        return;
    }
    if (shorts_seen[slot].len != 0 && shorts_seen[slot].gen == lstate_gen) {
        /* forget it, then free its ref (as gw_pushkey) */
        shorts_seen[slot].len = 0;
        luaL_unref(L, LUA_REGISTRYINDEX, shorts_seen[slot].ref);
    }
    lua_pushlstring(L, s, len);
    lua_pushvalue(L, -1);
    ref = luaL_ref(L, LUA_REGISTRYINDEX);
    shorts_seen[slot].ref = ref;        /* remembered once the ref exists */
    shorts_seen[slot].gen = lstate_gen;
    memcpy(shorts_seen[slot].bytes, s, len);
    shorts_seen[slot].len = (unsigned char) len;
}

void
gw_getfield(lua_State *L, int idx, const char *k)
{
    if (idx < 0 && idx > LUA_REGISTRYINDEX) {
        idx--;                          /* below the key pushed next */
    }
    gw_pushkey(L, k);
    lua_gettable(L, idx);
}

void
gw_setfield(lua_State *L, int idx, const char *k)
{
    if (idx < 0 && idx > LUA_REGISTRYINDEX) {
        idx--;
    }
    gw_pushkey(L, k);
    lua_insert(L, -2);                  /* key below the value */
    lua_settable(L, idx);
}

lua_State *
gw_lstate_new(const char *app_dir, const luaL_Reg *preload)
{
    lua_State *L = luaL_newstate();
    const char *dir = gw_lua_dir();

    if (L == NULL) {
        return NULL;
    }
    if (short_key == 0) {
        if (getentropy(&short_key, sizeof(short_key)) != 0) {
            short_key = (uint64_t) getpid() * 0x9E3779B97F4A7C15ULL
                        ^ (uint64_t) time(NULL) ^ (uintptr_t) L;
        }
        short_key |= 1;                 /* drawn: never 0 again */
    }
    lstate_gen++;
    lstate_open++;
    lstate_registry = lua_topointer(L, LUA_REGISTRYINDEX);
    luaL_openlibs(L);
    seed_math_random(L);

    lua_getglobal(L, "package");
    if (app_dir != NULL) {
        lua_pushfstring(L, "%s/?.lua;%s/?/init.lua;%s/?.lua;%s/?/init.lua;",
                        app_dir, app_dir, dir, dir);
    } else {
        lua_pushfstring(L, "./?.lua;%s/?.lua;%s/?/init.lua;", dir, dir);
    }
    lua_getfield(L, -2, "path");
    lua_concat(L, 2);
    lua_setfield(L, -2, "path");

    lua_getfield(L, -1, "preload");
    lua_pushcfunction(L, luaopen_paygate_core);
    lua_setfield(L, -2, "paygate.core");
    lua_pushcfunction(L, luaopen_paygate_json_core);
    lua_setfield(L, -2, "paygate.json.core");
    for (; preload != NULL && preload->name != NULL; preload++) {
        lua_pushcfunction(L, preload->func);
        lua_setfield(L, -2, preload->name);
    }
    lua_pop(L, 2);

    lua_pushlightuserdata(L, (void *) &error_mt_key);
    lua_createtable(L, 0, 2);
    lua_pushcfunction(L, error_tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pushliteral(L, "paygate.error");
    lua_setfield(L, -2, "__name");
    lua_rawset(L, LUA_REGISTRYINDEX);

    gw_co_init(L);
    return L;
}

int
gw_lstate_dofile(lua_State *L, const char *path, int nres)
{
    if (luaL_loadfile(L, path) != 0) {
        return GW_ERR;
    }
    if (lua_pcall(L, 0, nres, 0) != 0) {
        return GW_ERR;
    }
    return GW_OK;
}
