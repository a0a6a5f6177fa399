/*
 * modules.h -- the C Lua modules compiled into the binary, above core.
 * Each entry is registered in package.preload under its name by
 * gw_lstate_new() (paygate.core itself is core's own). Add one line per
 * module; include this header in one .c file only (it defines a table).
 */
#ifndef GW_MODULES_H
#define GW_MODULES_H

#include <lua.h>
#include <lauxlib.h>

int luaopen_paygate_request_core(lua_State *L);   /* http/ */
int luaopen_paygate_tls(lua_State *L);
int luaopen_paygate_http_core(lua_State *L);      /* client/ */
int luaopen_paygate_zlib(lua_State *L);
int luaopen_paygate_crypto(lua_State *L);         /* crypto/ */
int luaopen_paygate_x509(lua_State *L);
int luaopen_paygate_keyring(lua_State *L);
int luaopen_paygate_sqlite_core(lua_State *L);    /* store/ */
int luaopen_paygate_redis_core(lua_State *L);
int luaopen_paygate_pg_core(lua_State *L);
int luaopen_paygate_dns(lua_State *L);
int luaopen_paygate_shared(lua_State *L);         /* process/ */
int luaopen_paygate_metrics(lua_State *L);

static const luaL_Reg gw_modules[] = {
    { "paygate.request.core", luaopen_paygate_request_core },
    { "paygate.tls", luaopen_paygate_tls },
    { "paygate.http.core", luaopen_paygate_http_core },
    { "paygate.zlib", luaopen_paygate_zlib },
    { "paygate.crypto", luaopen_paygate_crypto },
    { "paygate.x509", luaopen_paygate_x509 },
    { "paygate.keyring", luaopen_paygate_keyring },
    { "paygate.sqlite.core", luaopen_paygate_sqlite_core },
    { "paygate.redis.core", luaopen_paygate_redis_core },
    { "paygate.pg.core", luaopen_paygate_pg_core },
    { "paygate.dns", luaopen_paygate_dns },
    { "paygate.shared", luaopen_paygate_shared },
    { "paygate.metrics", luaopen_paygate_metrics },
    { NULL, NULL }
};

#endif
