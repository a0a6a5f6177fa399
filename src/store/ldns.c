/*
 * ldns.c -- paygate.dns: the runtime's resolver (src/core/dns.c) seen
 * from Lua. The stores resolve through it themselves; this module is for
 * code that opens its own connections, and for settings.
 *
 *   local dns = require "paygate.dns"
 *   local addrs, ttl = dns.resolve("db.internal")  -- { "10.0.0.5", ... }
 *   dns.configure({ resolver = "127.0.0.1:5353", ttl_min = 1,
 *                   ttl_max = 300, timeout = 5 })
 */
#include <stdlib.h>
#include <string.h>
#include <lauxlib.h>

#include "dns.h"
#include "runtime.h"
#include "store.h"

struct ldns_op {
    struct gw_co      *co;              /* waiting coroutine */
    struct gw_dns_req *req;             /* owned by dns.c until cb */
};

static void
push_addrs(lua_State *L, const struct gw_dns_addrs *a)
{
    int i;

    lua_createtable(L, a->n, 0);
    for (i = 0; i < a->n; i++) {
        lua_pushstring(L, a->addr[i]);
        lua_rawseti(L, -2, i + 1);
    }
    lua_pushnumber(L, a->ttl);
}

static void
ldns_done(void *arg, const struct gw_dns_addrs *a, const char *err)
{
    struct ldns_op *op = arg;
    lua_State      *L = gw_co_state(op->co);
    struct gw_co   *co = op->co;
    int             n = 2;

    free(op);
    if (a != NULL) {
        push_addrs(L, a);
    } else {
        n = gw_push_error(L, "dns", 1, "%s", err);
    }
    gw_co_wake(co, n);
}

static void
ldns_cancel(void *arg)
{
    struct ldns_op *op = arg;

    gw_dns_cancel(op->req);
    free(op);
}

/* dns.resolve(name) -> { addr, ... }, ttl | nil, err (kind "dns") */
static int
ldns_resolve(lua_State *L)
{
    const char         *name = luaL_checkstring(L, 1);
    struct gw_co       *co = gw_co_current(L);
    struct gw_dns_addrs a;
    struct ldns_op     *op;
    char                err[160];
    int                 rc;

    rc = gw_dns_cached(name, &a, err, sizeof(err));
    if (rc == GW_OK) {
        push_addrs(L, &a);
        return 2;
    }
    if (rc == GW_ERR) {
        return gw_push_error(L, "dns", 1, "%s", err);
    }
    op = calloc(1, sizeof(*op));
    if (op == NULL) {
        return gw_push_error(L, "dns", 1, "out of memory");
    }
    op->co = co;
    op->req = gw_dns_resolve(name, ldns_done, op);
    if (op->req == NULL) {
        free(op);
        return gw_push_error(L, "dns", 1, "out of memory");
    }
    return gw_co_wait(L, ldns_cancel, op);
}

/* dns.configure({ resolver =, ttl_min =, ttl_max =, timeout = }) */
static int
ldns_configure(lua_State *L)
{
    static const char *const known[] = {
        "resolver", "ttl_min", "ttl_max", "timeout", NULL
    };
    const char *resolver;
    double      ttl_min, ttl_max, timeout;
    char        err[160];

    luaL_checktype(L, 1, LUA_TTABLE);
    gw_store_opt_known(L, 1, "dns.configure", known);
    resolver = gw_store_opt_str(L, 1, "dns.configure", "resolver");
    ttl_min = gw_store_opt_num(L, 1, "dns.configure", "ttl_min", -1, 1);
    ttl_max = gw_store_opt_num(L, 1, "dns.configure", "ttl_max", -1, 1);
    timeout = gw_store_opt_num(L, 1, "dns.configure", "timeout", -1, 0);
    if (gw_dns_configure(resolver, ttl_min, ttl_max, timeout, err,
                         sizeof(err)) != GW_OK)
    {
        return gw_store_raise(L, "dns.configure: %s", err);
    }
    return 0;
}

/* dns.flush(): forget every cached answer */
static int
ldns_flush(lua_State *L)
{
    (void)L;
    gw_dns_flush();
    return 0;
}

/* dns.is_numeric(s) -> boolean */
static int
ldns_is_numeric(lua_State *L)
{
    lua_pushboolean(L, gw_dns_is_numeric(luaL_checkstring(L, 1)));
    return 1;
}

static const luaL_Reg ldns_funcs[] = {
    { "resolve", ldns_resolve },
    { "configure", ldns_configure },
    { "flush", ldns_flush },
    { "is_numeric", ldns_is_numeric },
    { NULL, NULL }
};

int
luaopen_paygate_dns(lua_State *L)
{
    lua_newtable(L);
    luaL_register(L, NULL, ldns_funcs);
    return 1;
}
