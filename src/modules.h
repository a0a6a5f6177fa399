/*
 * modules.h -- the C Lua modules compiled into the binary. Each entry is
 * registered in package.preload under its name. Add one line per module.
 */
#ifndef GW_MODULES_H
#define GW_MODULES_H

#include <lua.h>

#define GW_MODULE_LIST(X)                               \
    X("paygate.core", luaopen_paygate_core)             \
    X("paygate.http.core", luaopen_paygate_http_core)   \
    /* crypto (#3) */                                   \
    X("paygate.crypto", luaopen_paygate_crypto)         \
    X("paygate.x509", luaopen_paygate_x509)             \
    X("paygate.keyring", luaopen_paygate_keyring)       \
    /* storage (#4) */                                  \
    X("paygate.sqlite.core", luaopen_paygate_sqlite_core) \
    X("paygate.redis.core", luaopen_paygate_redis_core) \
    X("paygate.pg.core", luaopen_paygate_pg_core)

#define GW_MODULE_DECL(name, fn) int fn(lua_State *L);
GW_MODULE_LIST(GW_MODULE_DECL)
#undef GW_MODULE_DECL

#endif
