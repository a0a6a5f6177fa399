/*
 * lstate.h -- creating the process's Lua state with the framework on its
 * path, the C modules preloaded and the error convention installed.
 */
#ifndef GW_LSTATE_H
#define GW_LSTATE_H

#include <stdarg.h>

#include "runtime.h"

/* Directory of the framework's Lua files (…/lua), found once. */
const char *gw_lua_dir(void);

/* New state with libs open; app_dir (may be NULL) goes first on
 * package.path. paygate.core is preloaded, and so is every entry of
 * preload (a { name, luaopen } list ending in { NULL, NULL }; may be
 * NULL): core knows no module above it, the process layer names them.
 * Returns NULL when out of memory. */
lua_State *gw_lstate_new(const char *app_dir, const luaL_Reg *preload);

/* luaL_testudata / luaL_checkudata without the registry lookup by name
 * on every call (Lua's own interns tname each time: a string-table walk
 * per method call on a hot path). The metatable found for tname is
 * remembered while exactly one state made by gw_lstate_new is open and
 * the caller is that state; any other state takes Lua's own path (a
 * state of gw_lstate_new is never closed: the process ends with it).
 * The error is Lua's own: gw_checkudata raises luaL_checkudata's. */
void *gw_testudata(lua_State *L, int idx, const char *tname);
void *gw_checkudata(lua_State *L, int idx, const char *tname);

/* lua_getfield / lua_setfield for a key that is a string literal, on a
 * hot path: the key's Lua string is kept (in the registry, under the
 * same rule as gw_testudata's memory) instead of interned again on every
 * call. Same semantics (metamethods included); k must be a literal or
 * live as long. */
void gw_pushkey(lua_State *L, const char *k);
void gw_getfield(lua_State *L, int idx, const char *k);
void gw_setfield(lua_State *L, int idx, const char *k);

/* lua_pushlstring for a short string that comes again and again (a JSON
 * object's keys, a query's column names): a small table remembers the
 * strings of up to GW_SHORT_MAX bytes last pushed, each kept alive by a
 * registry ref, under the same rule as gw_testudata's memory, and pushes
 * the remembered one instead of interning the bytes again (the string
 * table of a large heap is a cache miss or two per lookup). Any string
 * and any state works; only what is remembered changes. */
#define GW_SHORT_MAX 32
void gw_pushshort(lua_State *L, const char *s, size_t len);

/* The paygate.core module (lpaygate.c). */
int luaopen_paygate_core(lua_State *L);

/* paygate.json.core (ljson.c): the encoder behind paygate.json. */
int luaopen_paygate_json_core(lua_State *L);

/* Runs a Lua file on the main state (config files, not apps). On failure
 * returns GW_ERR with the message on the stack; else nres results. */
int gw_lstate_dofile(lua_State *L, const char *path, int nres);

/* Pushes the text that describes the error value at idx and returns it:
 * a string or number as it is; a value with __tostring through it (a
 * paygate error gives "kind: message"; a __tostring that raises is
 * ignored); a table with kind / message fields as "kind: message";
 * anything else as "(error object is a T value)". Never raises except
 * out of memory. The string stays valid while it is on the stack. */
const char *gw_error_string(lua_State *L, int idx);

/* core.error_string(v): gw_error_string for Lua. */
int gw_lerror_string(lua_State *L);

/* Pushes the paygate error metatable (for errors made in Lua). */
int gw_push_error_mt(lua_State *L);

/*
 * Misuse of a binding: raising at the caller's line. gw_raise() formats
 * the message (lua_pushfstring's %s %d %f only) and raises it prefixed
 * with "file:line: " of the first caller outside C and outside paygate's
 * own Lua modules (lua/paygate/NAME.lua), so a spec or an app sees its
 * own line. Never returns; call it only while no C memory is held.
 */
int gw_raise(lua_State *L, const char *fmt, ...);
int gw_vraise(lua_State *L, const char *fmt, va_list ap);

/* Raises unless idx is a table whose keys are all strings in names
 * (NULL terminated): "fn: unknown option what.key" (what is "opts" for
 * an options table). A misspelt option must not be silently ignored. */
void gw_opts_known(lua_State *L, int idx, const char *fn, const char *what,
                   const char *const *names);

/* The argument at idx of fn, named what: a string (gw_arg_string; len
 * may be NULL) or a number, a numeric string too (gw_arg_number); else
 * raises "fn: what must be a string (got TYPE)" ("no value" when absent),
 * naming fn however it was called: luaL_check*'s "bad argument #n to '?'"
 * names no function through a tail call or pcall, and luaL_checklstring
 * takes a number as its digits. */
const char *gw_arg_string(lua_State *L, int idx, const char *fn,
                          const char *what, size_t *len);
double gw_arg_number(lua_State *L, int idx, const char *fn,
                     const char *what);

/* Typed options: idx is an options table (absolute index). Each returns
 * def (NULL) when the field is nil and raises "fn: opts.name must be a
 * number" (a finite number / an integer / a string) otherwise. */
double gw_opt_number(lua_State *L, int idx, const char *fn,
                     const char *name, double def);
const char *gw_opt_string(lua_State *L, int idx, const char *fn,
                          const char *name);

#endif
