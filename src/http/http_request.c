/*
 * http_request.c -- a request's run in Lua. gw_req_start() calls the
 * dispatch function in a managed coroutine with (req, method, path); the
 * coroutine's owner callbacks turn what the handler returned (or raised)
 * into a response; req_end() is the one way a request ends, whatever
 * ended it.
 */
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include <event2/event.h>

#include "http_conn.h"
#include "log.h"
#include "loop.h"

/* Takes the client's X-Request-Id when it is 8..39 safe characters, or
 * makes one. */
static void
make_request_id(struct gw_conn *c)
{
    const struct gw_http_header *h;
    uint64_t x;

    h = gw_http_find(&c->head, "x-request-id", 12);
    if (h != NULL && h->value_len >= 8
        && h->value_len < sizeof(c->request_id)) {
        size_t i;

        for (i = 0; i < h->value_len; i++) {
            char ch = h->value[i];

            if (!((ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'z')
                  || (ch >= 'A' && ch <= 'Z') || ch == '-' || ch == '_'
                  || ch == '.')) {
                break;
            }
        }
        if (i == h->value_len) {
            memcpy(c->request_id, h->value, h->value_len);
            c->request_id[h->value_len] = '\0';
            return;
        }
    }
    /* xorshift64*: unique enough for correlation, not a secret. */
    x = gw_srv.rid_state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    gw_srv.rid_state = x;
    snprintf(c->request_id, sizeof(c->request_id), "%016llx",
             (unsigned long long) (x * 0x2545F4914F6CDD1DULL));
}

/* A log line about the current request (with its id). */
static void
req_log(struct gw_conn *c, enum gw_log_level level, const char *msg)
{
    gw_log_line(level, c->request_id, msg, strlen(msg), NULL, 0);
}

#define LOG_PATH_MAX 256        /* bytes of the path an access line shows */

/* The access line: method, path, status, ms, remote. */
static void
access_log(struct gw_conn *c, int status, double secs)
{
    /* the quoted method (<= 20 bytes) and path take 6 bytes per byte at
     * worst (\u00XX, U+FFFD); the rest is short */
    char fields[6 * (20 + LOG_PATH_MAX) + 256];
    size_t n = 0, q;

    memcpy(fields, "{\"method\":", 10);
    n += 10;
    q = gw_json_quote(fields + n, sizeof(fields) - n, c->head.method,
                      c->head.method_len);
    n += q;
    memcpy(fields + n, ",\"path\":", 8);
    n += 8;
    q = gw_json_quote(fields + n, sizeof(fields) - n, c->head.path,
                      c->head.path_len > LOG_PATH_MAX ? LOG_PATH_MAX
                                                      : c->head.path_len);
    n += q;
    n += (size_t) snprintf(fields + n, sizeof(fields) - n,
                           ",\"status\":%d,\"ms\":%.3f,\"remote\":\"%s\"}",
                           status, secs * 1000, c->peer);
    gw_log_line(GW_LOG_INFO, c->request_id, "access", 6, fields, n);
}

/*
 * The one way a request ends, whatever ended it (the handler returned or
 * raised, its deadline passed, no memory, the connection closes): unbinds
 * req, counts, tells the process layer's hook, writes the access line,
 * moves the connection past the request, frees co (may be NULL; route
 * points into its stack, so it goes last), then goes on with the next
 * pipelined request -- unless called from inside gw_req_start() or
 * conn_close(), whose callers go on themselves. route NULL: the pattern
 * dispatch matched (c->route_ref), if it got that far, so a request that
 * raised, was aborted, timed out or was abandoned counts under its route.
 */
static void
req_end(struct gw_conn *c, struct gw_co *co, int status, const char *route,
        size_t route_len)
{
    lua_State *L = gw_srv.L;
    double secs;

    if (route == NULL && c->route_ref != LUA_NOREF) {
        lua_rawgeti(L, LUA_REGISTRYINDEX, c->route_ref);
        route = lua_tolstring(L, -1, &route_len);
        lua_pop(L, 1);              /* the ref keeps it until below */
    }
    gw_lreq_detach(L, c);
    c->co = NULL;
    gw_srv.in_flight--;
    c->requests++;
    gw_loop_update_time();
    secs = gw_loop_mono() - c->started;
    c->started = gw_loop_mono();     /* a pipelined next request starts */
    if (gw_srv.conf.on_request != NULL) {
        gw_srv.conf.on_request(c->head.method, c->head.method_len, route,
                               route_len, status, secs);
    }
    if (gw_srv.conf.access_log && gw_log_min <= GW_LOG_INFO) {
        access_log(c, status, secs);
    }
    if (c->route_ref != LUA_NOREF) {
        luaL_unref(L, LUA_REGISTRYINDEX, c->route_ref);
        c->route_ref = LUA_NOREF;
    }
    gw_conn_advance(c);
    if (co != NULL) {
        gw_co_free(co);
    }
    if (!c->in_start && !c->closing) {
        gw_conn_process(c);
    }
}

/* The handler called req:drop(): whatever it returned (or raised) is
 * not answered; the connection closes with SO_LINGER 0 (a reset) once
 * the request has ended. Returns 1 when it ended the request here. */
static int
req_dropped(struct gw_conn *c, struct gw_co *co)
{
    if (!c->dropped) {
        return 0;
    }
    c->out_len = c->out_sent;       /* nothing more goes out */
    c->close_after = 1;
    req_end(c, co, 444, NULL, 0);
    return 1;
}

/* Is k a header name we let a handler send (a token of letters, digits,
 * '-' and '_')? */
static int
header_name_ok(const char *k, size_t kl)
{
    if (kl == 0) {
        return 0;
    }
    for (size_t i = 0; i < kl; i++) {
        if (!((unsigned char) k[i] < 128 && (k[i] == '-'
              || (k[i] >= '0' && k[i] <= '9')
              || ((k[i] | 0x20) >= 'a' && (k[i] | 0x20) <= 'z')
              || k[i] == '_'))) {
            return 0;
        }
    }
    return 1;
}

/* A handler's result that is not what the server takes, logged with
 * the request's method and route pattern (index 4, nil when none
 * matched) and what came back: its type, a number's value, a string's
 * only when it is a short word (a string may be a body, or a secret). */
static void
bad_result(struct gw_conn *c, lua_State *L, int idx, const char *what,
           int paren)
{
    char line[512], got[96];
    size_t rl = 0;
    const char *route = lua_type(L, 4) == LUA_TSTRING
                        ? lua_tolstring(L, 4, &rl) : NULL;
    int t = lua_type(L, idx);

    if (t == LUA_TNUMBER) {
        snprintf(got, sizeof(got), "the number %.14g", lua_tonumber(L, idx));
    } else if (t == LUA_TSTRING) {
        size_t n, i;
        const char *v = lua_tolstring(L, idx, &n);

        for (i = 0; i < n && n <= 16; i++) {
            unsigned char ch = (unsigned char) v[i];

            if (!((ch >= '0' && ch <= '9') || ((ch | 0x20) >= 'a'
                  && (ch | 0x20) <= 'z') || ch == ' ' || ch == '.'
                  || ch == '-' || ch == '+')) {
                break;
            }
        }
        if (n <= 16 && i == n) {
            snprintf(got, sizeof(got), "the string '%.*s'", (int) n, v);
        } else {
            snprintf(got, sizeof(got), "a string of %zu bytes", n);
        }
    } else if (t == LUA_TNIL || t == LUA_TNONE) {
        snprintf(got, sizeof(got), "nothing");
    } else {
        snprintf(got, sizeof(got), "a %s", lua_typename(L, t));
    }
    snprintf(line, sizeof(line), "%s %sfor %.*s %.*s: %s%s", what,
             paren ? "(" : "",
             (int) (c->head.method_len > 20 ? 20 : c->head.method_len),
             c->head.method,
             route ? (int) (rl > 200 ? 200 : rl) : 10,
             route ? route : "(no route)", got, paren ? ")" : "");
    req_log(c, GW_LOG_ERROR, line);
}

/* Turns the handler's results (status, body, headers, route, ctype) on
 * the coroutine's stack into a response. */
static void
req_done(struct gw_co *co, int nres)
{
    struct gw_conn *c = co->data;
    lua_State *L = gw_co_state(co);
    char extra[4096];
    size_t extra_len = 0, body_len = 0, route_len = 0;
    const char *body = NULL, *route = NULL, *ctype = NULL;
    int status, bad = 0, own_ctype = 0, own_date = 0;

    if (req_dropped(c, co)) {
        return;
    }
    lua_settop(L, 5);
    {
        lua_Number st = lua_tonumber(L, 1);   /* 0 when not a number */

        /* 1xx is not a final answer: sent as one, the client would wait
         * for the real response forever */
        status = (st >= 200 && st <= 599 && st == (int) st) ? (int) st : 0;
    }
    if (status < 200 || status > 599) {
        bad_result(c, L, 1, "handler returned no valid status (200-599)", 0);
        bad = 1;
    }
    if (lua_type(L, 2) == LUA_TSTRING) {
        body = lua_tolstring(L, 2, &body_len);
    } else if (!lua_isnil(L, 2)) {
        bad_result(c, L, 2, "handler body must be a string or a table", 1);
        bad = 1;
    }
    if (lua_type(L, 4) == LUA_TSTRING) {
        route = lua_tolstring(L, 4, &route_len);
    }
    if (lua_type(L, 5) == LUA_TSTRING) {
        ctype = lua_tostring(L, 5);
    }
    if (!bad && lua_istable(L, 3)) {
        lua_pushnil(L);
        while (lua_next(L, 3) != 0) {
            size_t kl, vl;
            const char *k, *v;

            if (lua_type(L, -2) != LUA_TSTRING
                || (lua_type(L, -1) != LUA_TSTRING
                    && lua_type(L, -1) != LUA_TNUMBER)) {
                bad = 1;
                lua_pop(L, 2);
                break;
            }
            k = lua_tolstring(L, -2, &kl);
            v = lua_tolstring(L, -1, &vl);
            bad = !header_name_ok(k, kl);
            for (size_t i = 0; i < vl && !bad; i++) {
                bad = v[i] == '\r' || v[i] == '\n' || v[i] == '\0';
            }
            if (extra_len + kl + vl + 4 > sizeof(extra)) {
                bad = 1;
            }
            if (bad) {
                lua_pop(L, 2);
                break;
            }
            if (kl == 14 && strncasecmp(k, "content-length", 14) == 0) {
                lua_pop(L, 1);
                continue;           /* ours is the true length */
            }
            if (kl == 10 && strncasecmp(k, "connection", 10) == 0) {
                lua_pop(L, 1);
                continue;
            }
            if (kl == 17 && strncasecmp(k, "transfer-encoding", 17) == 0) {
                /* the body goes out whole, framed by our Content-Length:
                 * beside it a Transfer-Encoding would frame it otherwise
                 * for the client (RFC 9112 6.1 forbids sending both) */
                lua_pop(L, 1);
                continue;
            }
            if (kl == 12 && strncasecmp(k, "x-request-id", 12) == 0) {
                lua_pop(L, 1);
                continue;           /* ours: the id of the log lines */
            }
            if (kl == 12 && strncasecmp(k, "content-type", 12) == 0) {
                own_ctype = 1;      /* the handler's wins */
            }
            if (kl == 4 && strncasecmp(k, "date", 4) == 0) {
                own_date = 1;       /* the handler's wins: one Date (a
                                     * server simulating another's clock) */
            }
            memcpy(extra + extra_len, k, kl);
            extra_len += kl;
            extra[extra_len++] = ':';
            extra[extra_len++] = ' ';
            memcpy(extra + extra_len, v, vl);
            extra_len += vl;
            extra[extra_len++] = '\r';
            extra[extra_len++] = '\n';
            lua_pop(L, 1);
        }
        if (bad) {
            req_log(c, GW_LOG_ERROR,
                    "handler returned an invalid response header "
                    "(name must be a token, value without CR/LF)");
        }
    } else if (!bad && !lua_isnil(L, 3)) {
        bad = 1;
    }
    if (bad) {
        status = 500;
        gw_resp_error(c, 500, "internal", "invalid handler response");
    } else {
        if (own_ctype) {
            ctype = NULL;           /* it is in extra */
        } else if (ctype == NULL && body != NULL) {
            ctype = "text/plain; charset=utf-8";
        }
        if (gw_resp_write(c, status, ctype, own_date, extra, extra_len,
                          body, body_len) != GW_OK) {
            c->close_after = 1;
        }
    }
    req_end(c, co, status, route, route_len);
}

/* The handler raised: paygate.abort(status, kind, message) (an error
 * whose raw field abort is true, with a 4xx/5xx status) answers that;
 * anything else -- an error some call returned with a status of its own
 * (a WeChat answer's) included -- is logged with its traceback and
 * answered 500 without it. Fields are read raw: no Lua runs here. */
static void
req_fail(struct gw_co *co, const char *msg)
{
    struct gw_conn *c = co->data;
    lua_State *L = gw_co_state(co);

    if (req_dropped(c, co)) {
        return;
    }
    if (lua_istable(L, -1)) {
        int status, is_abort;

        lua_pushliteral(L, "abort");
        lua_rawget(L, -2);
        is_abort = lua_toboolean(L, -1);
        lua_pushliteral(L, "status");
        lua_rawget(L, -3);
        status = (int) lua_tointeger(L, -1);
        lua_pop(L, 2);
        if (is_abort && status >= 400 && status <= 599) {
            lua_pushliteral(L, "kind");
            lua_rawget(L, -2);
            lua_pushliteral(L, "message");
            lua_rawget(L, -3);
            /* gw_resp_error() bounds and JSON-quotes both */
            gw_resp_error(c, status,
                          lua_isstring(L, -2) ? lua_tostring(L, -2)
                                              : "error",
                          lua_isstring(L, -1) ? lua_tostring(L, -1) : "");
            lua_pop(L, 2);
            req_end(c, co, status, NULL, 0);
            return;
        }
    }
    req_log(c, GW_LOG_ERROR, msg);
    gw_resp_error(c, 500, "internal",
                  "the handler failed; see the log for this request_id");
    req_end(c, co, 500, NULL, 0);
}

/* The handler waits: the connection's timer becomes its deadline. */
static void
req_suspended(struct gw_co *co)
{
    struct gw_conn *c = co->data;

    gw_conn_timer(c, c->deadline - gw_loop_mono());
}

/* The handler's deadline (req:set_deadline moves it): core.time_left() */
static double
req_co_deadline(struct gw_co *co)
{
    struct gw_conn *c = co->data;

    return c != NULL ? c->deadline : 0;
}

static const struct gw_co_owner req_owner = {
    req_done, req_fail, req_suspended, req_co_deadline
};

void
gw_req_deadline(struct gw_conn *c)
{
    struct gw_co *co = c->co;

    gw_co_abandon(co);
    if (req_dropped(c, co)) {
        return;
    }
    req_log(c, GW_LOG_WARN,
            "request deadline passed: answered 504, handler cancelled");
    c->close_after = 1;             /* before writing: the head says so */
    gw_resp_error(c, 504, "deadline_exceeded",
                  "the handler did not finish in time");
    req_end(c, co, 504, NULL, 0);
}

void
gw_req_abandon(struct gw_conn *c)
{
    struct gw_co *co = c->co;

    gw_co_abandon(co);
    req_end(c, co, 499, NULL, 0);
}

void
gw_req_start(struct gw_conn *c)
{
    lua_State *L = gw_srv.L;
    struct gw_co *co;

    c->state = ST_HANDLE;
    gw_srv.in_flight++;
    /* Reading stays on: turning it off and on costs two epoll_ctl calls
     * per request. If bytes arrive while we handle, conn_on_read turns
     * it off then, unread (level-triggered, so nothing is missed). */
    evtimer_del(c->timer);
    make_request_id(c);
    /* request_timeout is the handler's time: it starts now, not at the
     * request's first byte (a slow but steady upload is body_timeout's
     * business, and would otherwise reach its handler already late) */
    c->deadline = gw_loop_mono() + gw_srv.conf.request_timeout;
    if (gw_srv.conf.on_start != NULL) {
        gw_srv.conf.on_start(c->head.method, c->head.method_len,
                             c->head.path, c->head.path_len, c->request_id);
    }

    lua_rawgeti(L, LUA_REGISTRYINDEX, gw_srv.dispatch_ref);
    gw_lreq_push(L, c);
    lua_pushlstring(L, c->head.method, c->head.method_len);
    lua_pushlstring(L, c->head.path, c->head.path_len);
    c->in_start = 1;
    co = gw_co_start(L, 3, &req_owner, c, c->request_id);
    if (co == NULL && c->state == ST_HANDLE) {
        c->close_after = 1;
        gw_resp_error(c, 503, "overloaded", "out of memory");
        req_end(c, NULL, 503, NULL, 0);
    }
    c->in_start = 0;
    if (c->state == ST_HANDLE) {
        c->co = co;                 /* it waits; otherwise it ended (and
                                       was freed) already */
    }
}
