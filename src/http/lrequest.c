/*
 * lrequest.c -- paygate.request.core: the request userdata a handler gets
 * as req. Its fields (method, path, body, headers, ...) are read from the
 * connection on access, without copying the request up front; the
 * userdata's environment table holds what handlers set on it and the
 * values worth caching (body, headers). When the request ends the
 * userdata is unbound from its connection: from then on only what was set
 * or cached on it is left, the other fields read nil, and req:header()
 * and req:set_deadline() raise (a handler copies what it keeps).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <arpa/inet.h>

#include "http_conn.h"
#include "sockaddr.h"
#include "loop.h"
#include "lstate.h"

#define LREQ_MT "paygate.request"

struct gw_lreq {
    struct gw_conn *c;          /* not owned; NULL once the request ended */
};

static int empty_env_ref = LUA_NOREF; /* registry: shared empty env of
                                         requests nothing was set on */
static int methods_ref = LUA_NOREF;   /* registry: the request methods
                                         table (request_methods()) */
static int mt_ref = LUA_NOREF;        /* registry: LREQ_MT's metatable
                                         (no lookup by name per request) */

void
gw_lreq_push(lua_State *L, struct gw_conn *c)
{
    struct gw_lreq *r = lua_newuserdata(L, sizeof(*r));

    r->c = c;
    lua_rawgeti(L, LUA_REGISTRYINDEX, mt_ref);
    lua_setmetatable(L, -2);
    lua_rawgeti(L, LUA_REGISTRYINDEX, empty_env_ref);
    lua_setfenv(L, -2);
    lua_pushvalue(L, -1);
    c->lreq_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    c->lreq = r;
}

void
gw_lreq_detach(lua_State *L, struct gw_conn *c)
{
    if (c->lreq != NULL) {
        c->lreq->c = NULL;
        c->lreq = NULL;
        luaL_unref(L, LUA_REGISTRYINDEX, c->lreq_ref);
        c->lreq_ref = LUA_NOREF;
    }
}

/* The connection of the request at idx; raises once the request ended. */
static struct gw_conn *
lreq_conn(lua_State *L, int idx)
{
    struct gw_lreq *r = gw_checkudata(L, idx, LREQ_MT);

    if (r->c == NULL) {
        luaL_error(L, "request already finished: copy what you need "
                      "before the handler returns");
    }
    return r->c;
}

/* Pushes s lower-cased. Raises when out of memory (nothing held). */
static void
push_lower(lua_State *L, const char *s, size_t len)
{
    char buf[256];
    char *p = len <= sizeof(buf) ? buf : malloc(len);

    if (p == NULL) {
        luaL_error(L, "no memory");
    }
    for (size_t i = 0; i < len; i++) {
        char ch = s[i];
        p[i] = (ch >= 'A' && ch <= 'Z') ? (char) (ch + 32) : ch;
    }
    lua_pushlstring(L, p, len);
    if (p != buf) {
        free(p);
    }
}

/* headers as a table with lower-case names; repeats joined by ", " in
 * order. One pass (a name said again is collected in a scratch table of
 * lists), then each repeated name joined once: linear in the head, however
 * many names or repeats it holds. */
static void
push_headers(lua_State *L, struct gw_conn *c)
{
    size_t n = c->head.nheaders;
    int t, r;

    lua_createtable(L, 0, (int) n);
    t = lua_gettop(L);
    lua_newtable(L);                        /* name -> { values } */
    r = t + 1;
    for (size_t i = 0; i < n; i++) {
        const struct gw_http_header *h = &c->head.headers[i];

        push_lower(L, h->name, h->name_len);            /* key */
        lua_pushvalue(L, -1);
        lua_rawget(L, t);                               /* key, first */
        if (lua_isnil(L, -1)) {
            lua_pop(L, 1);
            lua_pushlstring(L, h->value, h->value_len);
            lua_rawset(L, t);
            continue;
        }
        lua_pushvalue(L, -2);
        lua_rawget(L, r);                               /* key, first, list */
        if (lua_isnil(L, -1)) {
            lua_pop(L, 1);
            lua_createtable(L, 4, 0);
            lua_pushvalue(L, -2);
            lua_rawseti(L, -2, 1);                      /* list[1] = first */
            lua_pushvalue(L, -3);
            lua_pushvalue(L, -2);
            lua_rawset(L, r);                           /* r[key] = list */
        }
        lua_pushlstring(L, h->value, h->value_len);
        lua_rawseti(L, -2, (int) lua_objlen(L, -2) + 1);
        lua_pop(L, 3);
    }
    lua_pushnil(L);
    while (lua_next(L, r) != 0) {                       /* key, list */
        int list = lua_gettop(L);
        size_t k = lua_objlen(L, list);
        luaL_Buffer b;

        lua_pushvalue(L, list - 1);
        luaL_buffinit(L, &b);
        for (size_t j = 1; j <= k; j++) {
            if (j > 1) {
                luaL_addlstring(&b, ", ", 2);
            }
            lua_rawgeti(L, list, (int) j);
            luaL_addvalue(&b);
        }
        luaL_pushresult(&b);
        lua_rawset(L, t);                               /* t[key] = joined */
        lua_pop(L, 1);                                  /* key */
    }
    lua_remove(L, r);
}

/* The request's own environment table (made on first use), pushed. */
static void
lreq_env(lua_State *L, int ud)
{
    lua_getfenv(L, ud);
    lua_rawgeti(L, LUA_REGISTRYINDEX, empty_env_ref);
    if (lua_rawequal(L, -1, -2)) {
        lua_pop(L, 2);
        lua_createtable(L, 0, 4);
        lua_pushvalue(L, -1);
        lua_setfenv(L, ud);
    } else {
        lua_pop(L, 1);
    }
}

/* Stores the value on top in the request's own table, keeps it on top. */
static void
lreq_cache(lua_State *L, int ud, const char *key)
{
    lreq_env(L, ud);
    lua_pushvalue(L, -2);
    lua_setfield(L, -2, key);
    lua_pop(L, 1);
}

/* The connection's local address as "ip:port" ("[ip]:port" for IPv6):
 * which of the host's addresses the client connected to. nil when the
 * socket cannot say. */
static void
push_local_addr(lua_State *L, struct gw_conn *c)
{
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);
    char out[64];
    const char *text = NULL;

    if (getsockname(c->fd, (struct sockaddr *) &ss, &sl) == 0) {
        text = gw_sockaddr_text(&ss, out, sizeof(out));
    }
    if (text != NULL) {
        lua_pushstring(L, text);
    } else {
        lua_pushnil(L);
    }
}

/*
 * req.method, req.path (dot-segments resolved), req.target (the
 * request-target as sent), req.query_string, req.body, req.headers, req.id,
 * req.remote_addr, req.local_addr, req.scheme, then fields set by
 * handlers, then methods.
 */
static int
lreq_index(lua_State *L)
{
    size_t klen;
    const char *k = luaL_checklstring(L, 2, &klen);
    struct gw_lreq *r = gw_checkudata(L, 1, LREQ_MT);
    struct gw_conn *c;

    lua_getfenv(L, 1);
    lua_pushvalue(L, 2);
    lua_rawget(L, -2);
    if (!lua_isnil(L, -1)) {
        return 1;
    }
    lua_pop(L, 2);
    c = r->c;
    switch (klen) {
    case 2:
        if (c != NULL && memcmp(k, "id", 2) == 0) {
            lua_pushstring(L, c->request_id);
            return 1;
        }
        break;
    case 4:
        if (c != NULL && memcmp(k, "path", 4) == 0) {
            lua_pushlstring(L, c->head.path, c->head.path_len);
            return 1;
        }
        if (c != NULL && memcmp(k, "body", 4) == 0) {
            lua_pushlstring(L, c->in + c->body_off, c->body_len);
            lreq_cache(L, 1, "body");
            return 1;
        }
        break;
    case 6:
        if (c != NULL && memcmp(k, "method", 6) == 0) {
            lua_pushlstring(L, c->head.method, c->head.method_len);
            return 1;
        }
        if (c != NULL && memcmp(k, "target", 6) == 0) {
            lua_pushlstring(L, c->head.target, c->head.target_len);
            return 1;
        }
        if (c != NULL && memcmp(k, "scheme", 6) == 0) {
            lua_pushstring(L, c->ssl != NULL ? "https" : "http");
            return 1;
        }
        break;
    case 7:
        if (c != NULL && memcmp(k, "headers", 7) == 0) {
            push_headers(L, c);
            lreq_cache(L, 1, "headers");
            return 1;
        }
        break;
    case 10:
        if (c != NULL && memcmp(k, "local_addr", 10) == 0) {
            push_local_addr(L, c);
            return 1;
        }
        break;
    case 11:
        if (c != NULL && memcmp(k, "remote_addr", 11) == 0) {
            lua_pushstring(L, c->peer);
            return 1;
        }
        break;
    case 12:
        if (c != NULL && memcmp(k, "query_string", 12) == 0) {
            if (c->head.query == NULL) {
                lua_pushliteral(L, "");
            } else {
                lua_pushlstring(L, c->head.query, c->head.query_len);
            }
            return 1;
        }
        break;
    }
    /* methods (json, header, query, ...) live in a Lua table */
    lua_rawgeti(L, LUA_REGISTRYINDEX, methods_ref);
    lua_pushvalue(L, 2);
    lua_rawget(L, -2);
    return 1;
}

/* req.x = v: kept in the request's own table (also after it ended). */
static int
lreq_newindex(lua_State *L)
{
    gw_checkudata(L, 1, LREQ_MT);
    luaL_checkany(L, 2);
    lreq_env(L, 1);
    lua_pushvalue(L, 2);
    lua_pushvalue(L, 3);
    lua_rawset(L, -3);
    return 0;
}

/* The name argument i of req:fn (i - 1 of several): a string, else this
 * raises naming the method (gw_arg_string). */
static const char *
check_name(lua_State *L, int i, const char *fn, size_t *len)
{
    char what[24] = "name", where[32];

    if (lua_type(L, i) == LUA_TSTRING) {
        return lua_tolstring(L, i, len);        /* (a hot path) */
    }
    if (i > 2) {
        snprintf(what, sizeof(what), "name %d", i - 1);
    }
    snprintf(where, sizeof(where), "req:%s", fn);
    return gw_arg_string(L, i, where, what, len);     /* raises */
}

/*
 * syntax: value, n = req:header(name)
 *         v1, n1, v2, n2, ... = req:header(name1, name2, ...)
 * Case-insensitive; repeated headers give the first, and n says how many
 * fields of that name came (a value that must be one -- Authorization, a
 * Wechatpay-* header -- can be refused when repeated, in the same call).
 * No table is built. Of one name that is absent: nothing; of several,
 * each absent one is nil, nil in its place. Several names in one call:
 * a C function called from Lua ends the JIT's trace, so a reader of a
 * notification's five Wechatpay-* fields pays that once, not five times.
 */
static int
lreq_header(lua_State *L)
{
    struct gw_conn *c = lreq_conn(L, 1);
    int             top = lua_gettop(L), i;

    (void) check_name(L, 2, "header", NULL);    /* one name at least */
    if (top > 2) {
        luaL_checkstack(L, 2 * (top - 1), "req:header: too many names");
    }
    for (i = 2; i <= top; i++) {
        size_t len;
        const char *name = check_name(L, i, "header", &len);
        size_t n;
        const struct gw_http_header *h = gw_http_find_count(&c->head, name,
                                                            len, &n);

        if (h == NULL) {
            if (top == 2) {
                return 0;
            }
            lua_pushnil(L);
            lua_pushnil(L);
            continue;
        }
        lua_pushlstring(L, h->value, h->value_len);
        lua_pushinteger(L, (lua_Integer) n);
    }
    return 2 * (top - 1);
}

/*
 * syntax: n = req:header_count(name)
 * How many fields of that name the request has (case-insensitive): a
 * value that must be one (Authorization, Idempotency-Key) can be refused
 * when repeated, rather than read as its first.
 */
static int
lreq_header_count(lua_State *L)
{
    struct gw_conn *c = lreq_conn(L, 1);
    size_t len;
    const char *name = check_name(L, 2, "header_count", &len);

    lua_pushinteger(L, (lua_Integer) gw_http_count(&c->head, name, len));
    return 1;
}

/*
 * syntax: req:set_deadline(seconds)
 * From now: when it passes the client gets 504 and the handler's pending
 * operation is cancelled.
 */
static int
lreq_set_deadline(lua_State *L)
{
    struct gw_conn *c = lreq_conn(L, 1);
    double s = luaL_checknumber(L, 2);

    if (!(s > 0) || s > 86400) {
        return luaL_argerror(L, 2, "seconds must be in (0, 86400]");
    }
    gw_loop_refresh_time();     /* (called from Lua: not a new turn) */
    c->deadline = gw_loop_mono() + s;
    return 0;
}

/*
 * syntax: req:drop()
 * The request gets no answer: once the handler returns (what it returns
 * is ignored) the connection is closed with SO_LINGER 0, so the client
 * sees a reset (RST), as from a peer that crashed. For fault injection.
 */
static int
lreq_drop(lua_State *L)
{
    struct gw_conn *c = lreq_conn(L, 1);
    struct linger lg = { 1, 0 };

    c->dropped = 1;
    setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
    return 0;
}

/*
 * syntax: set_route(req, pattern)
 * The pattern of the route the request matched (dispatch calls it): a
 * request that ends other than by its handler's return -- an error,
 * paygate.abort, its deadline, abandoned at shutdown -- is counted under
 * it rather than as unmatched.
 */
static int
lreq_set_route(lua_State *L)
{
    struct gw_conn *c = lreq_conn(L, 1);

    luaL_checktype(L, 2, LUA_TSTRING);
    lua_settop(L, 2);
    if (c->route_ref == LUA_NOREF) {
        c->route_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    } else {
        lua_rawseti(L, LUA_REGISTRYINDEX, c->route_ref);
    }
    return 0;
}

static int
lreq_tostring(lua_State *L)
{
    struct gw_lreq *r = gw_checkudata(L, 1, LREQ_MT);

    if (r->c == NULL) {
        lua_pushliteral(L, "request (finished)");
    } else {
        lua_pushfstring(L, "request %s", r->c->request_id);
    }
    return 1;
}

/*
 * syntax: request_methods(t)
 * t's functions become req's methods (t is kept, not copied), with
 * header, header_count, set_deadline and drop (C) added to it.
 */
static int
lreq_set_methods(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_pushcfunction(L, lreq_header);
    lua_setfield(L, 1, "header");
    lua_pushcfunction(L, lreq_header_count);
    lua_setfield(L, 1, "header_count");
    lua_pushcfunction(L, lreq_set_deadline);
    lua_setfield(L, 1, "set_deadline");
    lua_pushcfunction(L, lreq_drop);
    lua_setfield(L, 1, "drop");
    lua_pushvalue(L, 1);
    lua_rawseti(L, LUA_REGISTRYINDEX, methods_ref);
    return 0;
}

int
luaopen_paygate_request_core(lua_State *L)
{
    luaL_newmetatable(L, LREQ_MT);
    lua_pushcfunction(L, lreq_index);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, lreq_newindex);
    lua_setfield(L, -2, "__newindex");
    lua_pushcfunction(L, lreq_tostring);
    lua_setfield(L, -2, "__tostring");
    mt_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_newtable(L);
    empty_env_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_newtable(L);
    methods_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_newtable(L);
    lua_pushcfunction(L, lreq_set_methods);
    lua_setfield(L, -2, "request_methods");
    lua_pushcfunction(L, lreq_set_route);
    lua_setfield(L, -2, "set_route");
    return 1;
}
