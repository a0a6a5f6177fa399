/*
 * http_server.c -- connections, limits, TLS and the path into Lua.
 *
 * A connection reads into one buffer. Requests are parsed in place (no copy)
 * and handled one at a time, in order; the responses of pipelined requests
 * are appended to one output buffer and sent together. While a request's
 * coroutine waits, the connection reads nothing more, so the parsed head
 * keeps pointing into a buffer that does not move.
 */
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <event2/event.h>
#include <openssl/err.h>
#include <openssl/rand.h>

#include "co.h"
#include "http_parser.h"
#include "http_server.h"
#include "log.h"
#include "loop.h"

#define LREQ_MT "paygate.request"
#define IN_MIN  4096            /* bytes: first input buffer */
#define DRAIN_LINGER 1.0        /* s an idle connection may still send one
                                   request once the worker drains */
#define OUT_HIGH (64 * 1024)    /* bytes of unsent output before we stop
                                   answering pipelined requests */

enum conn_state {
    ST_HEAD,                    /* waiting for a complete head */
    ST_BODY,                    /* head parsed, reading the body */
    ST_HANDLE,                  /* coroutine running or waiting */
    ST_CLOSING                  /* flush the output, then close */
};

struct gw_lreq {
    struct gw_conn *c;          /* NULL once the request has ended */
};

struct gw_conn {
    int                 fd;         /* owned */
    SSL                *ssl;        /* owned, or NULL for plain HTTP */
    int                 handshaken; /* TLS handshake done */
    struct event       *rev;        /* owned: readable */
    struct event       *wev;        /* owned: writable */
    struct event       *timer;      /* owned: the phase's deadline */
    enum conn_state     state;
    int                 reading;    /* rev is added */
    int                 want_write; /* output pending, wev added */
    int                 ssl_read_wants_write; /* TLS renegotiation dance */

    char               *in;         /* owned input buffer */
    size_t              in_cap;     /* bytes allocated */
    size_t              in_len;     /* bytes received */
    size_t              req_start;  /* offset of the current request */
    size_t              scanned;    /* bytes searched for the head's end */
    size_t              head_len;   /* bytes of the current head */
    struct gw_http_head head;       /* points into in */
    size_t              body_off;   /* offset of the body in in */
    size_t              body_len;   /* bytes of decoded body */
    struct gw_chunked   chunk;      /* chunked decoder state */

    char               *out;        /* owned output buffer */
    size_t              out_cap;
    size_t              out_len;
    size_t              out_sent;

    struct gw_co       *co;         /* request coroutine, or NULL */
    struct gw_lreq     *lreq;       /* the Lua request's pointer to us */
    int                 lreq_ref;   /* registry ref to the request ud */
    double              started;    /* s: the request's first byte */
    double              deadline;   /* s: absolute handler deadline */
    int                 requests;   /* served on this connection */
    int                 close_after;/* close once the output is sent */
    int                 in_start;   /* inside req_start(): no re-entry */
    int                 out_blocked;/* output over OUT_HIGH: parse no more
                                       until it drains */
    char                request_id[40];
    char                peer[64];   /* "ip:port" */
    struct gw_conn     *prev, *next;/* all connections */
};

static struct {
    lua_State            *L;            /* main state; not owned */
    int                   fd;           /* listening socket; not owned */
    struct event         *lev;          /* owned: accept */
    int                   accepting;    /* lev added */
    int                   dispatch_ref; /* registry ref */
    struct gw_server_conf conf;
    SSL_CTX              *ssl_ctx;      /* not owned; NULL for plain */
    struct gw_conn       *conns;        /* list of open connections */
    int                   nconns;
    int                   in_flight;    /* requests being handled */
    int                   draining;
    void                (*drained)(void);
    uint64_t              rid_state;    /* xorshift state for ids */
    char                  date[64];     /* "Date: ...\r\n" */
    time_t                date_at;      /* s the date line was made */
    struct event         *resume_ev;    /* owned: accepts again after a
                                           pause (EMFILE and the like) */
    int                   empty_env_ref;/* shared empty env for requests */
    int                   methods_ref;  /* request methods table */
} srv;

static void conn_process(struct gw_conn *c);
static void conn_flush(struct gw_conn *c);
static void conn_close(struct gw_conn *c);

void
gw_server_conf_defaults(struct gw_server_conf *c)
{
    c->max_header_bytes = 16 * 1024;
    c->max_body_bytes = 5 * 1024 * 1024;
    c->max_connections = 10000;
    c->header_timeout = 10;
    c->body_timeout = 10;
    c->write_timeout = 10;
    c->keepalive_timeout = 75;
    c->keepalive_requests = 10000;
    c->request_timeout = 30;
    c->access_log = 1;
}

int
gw_server_connections(void)
{
    return srv.nconns;
}

int
gw_server_in_flight(void)
{
    return srv.in_flight;
}

/* ---- small helpers --------------------------------------------------- */

static void
conn_timer(struct gw_conn *c, double secs)
{
    struct timeval tv;

    if (secs <= 0) {
        secs = 0.001;
    }
    tv.tv_sec = (time_t) secs;
    tv.tv_usec = (suseconds_t) ((secs - (double) tv.tv_sec) * 1e6);
    evtimer_add(c->timer, &tv);
}

static void
conn_read_on(struct gw_conn *c, int on)
{
    if (on && !c->reading) {
        event_add(c->rev, NULL);
        c->reading = 1;
    } else if (!on && c->reading) {
        event_del(c->rev);
        c->reading = 0;
    }
}

static int
out_reserve(struct gw_conn *c, size_t more)
{
    size_t need = c->out_len + more;
    size_t cap = c->out_cap ? c->out_cap : 4096;
    char *p;

    if (need <= c->out_cap) {
        return GW_OK;
    }
    while (cap < need) {
        cap *= 2;
    }
    p = realloc(c->out, cap);
    if (p == NULL) {
        return GW_ERR;
    }
    c->out = p;
    c->out_cap = cap;
    return GW_OK;
}

static void
out_add(struct gw_conn *c, const char *s, size_t n)
{
    memcpy(c->out + c->out_len, s, n);
    c->out_len += n;
}

static const char *
status_text(int status)
{
    switch (status) {
    case 100: return "Continue";
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 204: return "No Content";
    case 206: return "Partial Content";
    case 301: return "Moved Permanently";
    case 302: return "Found";
    case 303: return "See Other";
    case 304: return "Not Modified";
    case 307: return "Temporary Redirect";
    case 308: return "Permanent Redirect";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 410: return "Gone";
    case 411: return "Length Required";
    case 413: return "Content Too Large";
    case 415: return "Unsupported Media Type";
    case 417: return "Expectation Failed";
    case 422: return "Unprocessable Content";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    case 505: return "HTTP Version Not Supported";
    default:  return status < 400 ? "OK" : "Error";
    }
}

static const char *
date_line(void)
{
    time_t now = (time_t) gw_loop_now();

    if (now != srv.date_at) {
        struct tm tm;

        gmtime_r(&now, &tm);
        strftime(srv.date, sizeof(srv.date),
                 "Date: %a, %d %b %Y %H:%M:%S GMT\r\n", &tm);
        srv.date_at = now;
    }
    return srv.date;
}

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
    x = srv.rid_state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    srv.rid_state = x;
    snprintf(c->request_id, sizeof(c->request_id), "%016llx",
             (unsigned long long) (x * 0x2545F4914F6CDD1DULL));
}

/*
 * Appends a whole response. body may be NULL. extra is preformatted header
 * lines ("Name: value\r\n"...) or NULL. Returns GW_OK or GW_ERR (no
 * memory; the connection should close).
 */
static void
out_str(struct gw_conn *c, const char *s)
{
    out_add(c, s, strlen(s));
}

static void
out_uint(struct gw_conn *c, size_t v)
{
    char tmp[24];
    size_t n = sizeof(tmp);

    do {
        tmp[--n] = (char) ('0' + v % 10);
        v /= 10;
    } while (v != 0);
    out_add(c, tmp + n, sizeof(tmp) - n);
}

/*
 * Appends a whole response. body may be NULL. extra is preformatted header
 * lines ("Name: value\r\n"...) or NULL. Returns GW_OK or GW_ERR (no
 * memory; the connection should close). No printf: this is the hot path.
 */
static int
respond_raw(struct gw_conn *c, int status, const char *ctype,
            const char *extra, size_t extra_len, const char *body,
            size_t body_len)
{
    const char *text = status_text(status);
    size_t ctype_len = ctype != NULL ? strlen(ctype) : 0;
    int no_body = 0;
    int head_only = c->head.method_len == 4
                    && memcmp(c->head.method, "HEAD", 4) == 0;

    if (status == 204 || status == 304 || (status >= 100 && status < 200)) {
        no_body = 1;
        body_len = 0;
    }
    if (!c->head.keep_alive || srv.draining
        || c->requests + 1 >= srv.conf.keepalive_requests) {
        c->close_after = 1;
    }
    if (out_reserve(c, 200 + strlen(text) + ctype_len + extra_len + body_len)
        != GW_OK) {
        return GW_ERR;
    }
    out_add(c, "HTTP/1.1 ", 9);
    out_uint(c, (size_t) status);
    out_add(c, " ", 1);
    out_str(c, text);
    out_add(c, "\r\n", 2);
    out_str(c, date_line());
    if (ctype != NULL && !no_body) {
        out_add(c, "Content-Type: ", 14);
        out_add(c, ctype, ctype_len);
        out_add(c, "\r\n", 2);
    }
    if (!no_body) {
        out_add(c, "Content-Length: ", 16);
        out_uint(c, body_len);
        out_add(c, "\r\n", 2);
    }
    if (c->close_after) {
        out_add(c, "Connection: close\r\n", 19);
    } else if (c->head.minor == 0) {
        out_add(c, "Connection: keep-alive\r\n", 24);
    }
    if (extra != NULL) {
        out_add(c, extra, extra_len);
    }
    out_add(c, "\r\n", 2);
    if (body_len > 0 && !head_only) {
        out_add(c, body, body_len);
    }
    return GW_OK;
}

/* A JSON error answer made by the server itself (never a traceback). */
static void
respond_error(struct gw_conn *c, int status, const char *kind,
              const char *message)
{
    char body[512];
    int n;

    n = snprintf(body, sizeof(body),
                 "{\"error\":\"%s\",\"message\":\"%s\"%s%s%s}",
                 kind, message, c->request_id[0] ? ",\"request_id\":\"" : "",
                 c->request_id, c->request_id[0] ? "\"" : "");
    if (respond_raw(c, status, "application/json", NULL, 0, body,
                    (size_t) n) != GW_OK) {
        c->close_after = 1;
    }
}

/* ---- the request userdata ------------------------------------------- */

static struct gw_conn *
lreq_conn(lua_State *L, int idx)
{
    struct gw_lreq *r = luaL_checkudata(L, idx, LREQ_MT);

    if (r->c == NULL) {
        luaL_error(L, "request already finished: copy what you need "
                      "before the handler returns");
    }
    return r->c;
}

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

/* headers as a table with lower-case names; repeats joined by ", ". */
static void
push_headers(lua_State *L, struct gw_conn *c)
{
    lua_createtable(L, 0, (int) c->head.nheaders);
    for (size_t i = 0; i < c->head.nheaders; i++) {
        const struct gw_http_header *h = &c->head.headers[i];

        push_lower(L, h->name, h->name_len);
        lua_pushvalue(L, -1);
        lua_rawget(L, -3);
        if (lua_isnil(L, -1)) {
            lua_pop(L, 1);
            lua_pushlstring(L, h->value, h->value_len);
        } else {
            lua_pushliteral(L, ", ");
            lua_pushlstring(L, h->value, h->value_len);
            lua_concat(L, 3);
        }
        lua_rawset(L, -3);
    }
}

/* Stores the value on top in the request's own table, keeps it on top. */
static void
lreq_cache(lua_State *L, int ud, const char *key)
{
    lua_getfenv(L, ud);
    lua_rawgeti(L, LUA_REGISTRYINDEX, srv.empty_env_ref);
    if (lua_rawequal(L, -1, -2)) {
        lua_pop(L, 2);
        lua_createtable(L, 0, 4);
        lua_pushvalue(L, -1);
        lua_setfenv(L, ud);
    } else {
        lua_pop(L, 1);
    }
    lua_pushvalue(L, -2);
    lua_setfield(L, -2, key);
    lua_pop(L, 1);
}

/*
 * req.method, req.path, req.query_string, req.body, req.headers, req.id,
 * req.remote_addr, req.scheme, then fields set by handlers, then methods.
 */
static int
lreq_index(lua_State *L)
{
    size_t klen;
    const char *k = luaL_checklstring(L, 2, &klen);
    struct gw_lreq *r = luaL_checkudata(L, 1, LREQ_MT);
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
    lua_rawgeti(L, LUA_REGISTRYINDEX, srv.methods_ref);
    lua_pushvalue(L, 2);
    lua_rawget(L, -2);
    return 1;
}

static int
lreq_newindex(lua_State *L)
{
    luaL_checkudata(L, 1, LREQ_MT);
    luaL_checkany(L, 2);
    lua_getfenv(L, 1);
    lua_rawgeti(L, LUA_REGISTRYINDEX, srv.empty_env_ref);
    if (lua_rawequal(L, -1, -2)) {
        lua_pop(L, 2);
        lua_createtable(L, 0, 4);
        lua_pushvalue(L, -1);
        lua_setfenv(L, 1);
    } else {
        lua_pop(L, 1);
    }
    lua_pushvalue(L, 2);
    lua_pushvalue(L, 3);
    lua_rawset(L, -3);
    return 0;
}

/*
 * syntax: value = req:header(name)
 * Case-insensitive; repeated headers give the first. No table is built.
 */
static int
lreq_header(lua_State *L)
{
    struct gw_conn *c = lreq_conn(L, 1);
    size_t len;
    const char *name = luaL_checklstring(L, 2, &len);
    const struct gw_http_header *h = gw_http_find(&c->head, name, len);

    if (h == NULL) {
        return 0;
    }
    lua_pushlstring(L, h->value, h->value_len);
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
    gw_loop_update_time();
    c->deadline = gw_loop_mono() + s;
    return 0;
}

static int
lreq_tostring(lua_State *L)
{
    struct gw_lreq *r = luaL_checkudata(L, 1, LREQ_MT);

    if (r->c == NULL) {
        lua_pushliteral(L, "request (finished)");
    } else {
        lua_pushfstring(L, "request %s", r->c->request_id);
    }
    return 1;
}

/* paygate.core.request_methods(t): t's functions become req methods. */
static int
lreq_set_methods(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_pushcfunction(L, lreq_header);
    lua_setfield(L, 1, "header");
    lua_pushcfunction(L, lreq_set_deadline);
    lua_setfield(L, 1, "set_deadline");
    lua_pushvalue(L, 1);
    lua_rawseti(L, LUA_REGISTRYINDEX, srv.methods_ref);
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
    lua_pop(L, 1);
    lua_newtable(L);
    srv.empty_env_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_newtable(L);
    srv.methods_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_newtable(L);
    lua_pushcfunction(L, lreq_set_methods);
    lua_setfield(L, -2, "request_methods");
    return 1;
}

/* ---- running a request ---------------------------------------------- */

static void
request_end(struct gw_conn *c, int status, const char *route,
            size_t route_len)
{
    double secs;

    if (c->lreq != NULL) {
        c->lreq->c = NULL;
        c->lreq = NULL;
        luaL_unref(srv.L, LUA_REGISTRYINDEX, c->lreq_ref);
        c->lreq_ref = LUA_NOREF;
    }
    c->co = NULL;
    srv.in_flight--;
    c->requests++;
    gw_loop_update_time();
    secs = gw_loop_mono() - c->started;
    c->started = gw_loop_mono();     /* a pipelined next request starts */
    if (srv.conf.on_request != NULL) {
        srv.conf.on_request(c->head.method, c->head.method_len, route,
                            route_len, status, secs);
    }
    if (srv.conf.access_log && gw_log_min <= GW_LOG_INFO) {
        char fields[1024];
        size_t n = 0, q;

        n += (size_t) snprintf(fields, sizeof(fields), "{\"method\":");
        q = gw_json_quote(fields + n, 40, c->head.method, c->head.method_len);
        n += q;
        memcpy(fields + n, ",\"path\":", 8);
        n += 8;
        q = gw_json_quote(fields + n, 600, c->head.path,
                          c->head.path_len > 256 ? 256 : c->head.path_len);
        n += q;
        n += (size_t) snprintf(fields + n, sizeof(fields) - n,
                               ",\"status\":%d,\"ms\":%.3f,\"remote\":\"%s\"}",
                               status, secs * 1000, c->peer);
        gw_log_line(GW_LOG_INFO, c->request_id, "access", 6, fields, n);
    }
    if (c->state == ST_HANDLE) {
        c->req_start = c->body_off + (c->head.chunked ? c->chunk.in
                                                      : c->body_len);
        c->state = c->close_after ? ST_CLOSING : ST_HEAD;
        c->scanned = 0;
    }
    /* its pointers go stale as the buffer moves: an error answer before
     * the next head is parsed must not read them (method, keep_alive) */
    memset(&c->head, 0, offsetof(struct gw_http_head, headers));
}

/* A log line about the current request (with its id). */
static void
req_log(struct gw_conn *c, enum gw_log_level level, const char *msg)
{
    gw_log_line(level, c->request_id, msg, strlen(msg), NULL, 0);
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
    int status, bad = 0, own_ctype = 0;

    lua_settop(L, 5);
    {
        lua_Number st = lua_tonumber(L, 1);   /* 0 when not a number */

        status = (st >= 100 && st <= 599 && st == (int) st) ? (int) st : 0;
    }
    if (status < 100 || status > 599) {
        req_log(c, GW_LOG_ERROR,
                "handler returned no valid status (100-599)");
        bad = 1;
    }
    if (lua_type(L, 2) == LUA_TSTRING) {
        body = lua_tolstring(L, 2, &body_len);
    } else if (!lua_isnil(L, 2)) {
        req_log(c, GW_LOG_ERROR,
                "handler body must be a string or a table");
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
            for (size_t i = 0; i < kl && !bad; i++) {
                bad = !((unsigned char) k[i] < 128 && (k[i] == '-'
                        || (k[i] >= '0' && k[i] <= '9')
                        || ((k[i] | 0x20) >= 'a' && (k[i] | 0x20) <= 'z')
                        || k[i] == '_'));
            }
            for (size_t i = 0; i < vl && !bad; i++) {
                bad = v[i] == '\r' || v[i] == '\n' || v[i] == '\0';
            }
            if (kl == 0 || extra_len + kl + vl + 4 > sizeof(extra)) {
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
            if (kl == 12 && strncasecmp(k, "content-type", 12) == 0) {
                own_ctype = 1;      /* the handler's wins */
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
        respond_error(c, 500, "internal", "invalid handler response");
    } else {
        if (own_ctype) {
            ctype = NULL;           /* it is in extra */
        } else if (ctype == NULL && body != NULL) {
            ctype = "text/plain; charset=utf-8";
        }
        if (respond_raw(c, status, ctype, extra, extra_len, body, body_len)
            != GW_OK) {
            c->close_after = 1;
        }
    }
    request_end(c, status, route, route_len);
    gw_co_free(co);
    if (!c->in_start) {
        conn_process(c);
    }
}

static void
req_fail(struct gw_co *co, const char *msg)
{
    struct gw_conn *c = co->data;
    lua_State *L = gw_co_state(co);
    int status = 500;

    /* paygate.abort(status, kind, message) raises a table with status */
    if (lua_istable(L, -1)) {
        lua_getfield(L, -1, "status");
        status = (int) lua_tointeger(L, -1);
        lua_pop(L, 1);
        if (status >= 400 && status <= 599) {
            char kind[64], message[256];

            lua_getfield(L, -1, "kind");
            snprintf(kind, sizeof(kind), "%s",
                     lua_isstring(L, -1) ? lua_tostring(L, -1) : "error");
            lua_getfield(L, -2, "message");
            snprintf(message, sizeof(message), "%s",
                     lua_isstring(L, -1) ? lua_tostring(L, -1) : "");
            lua_pop(L, 2);
            /* keep the JSON valid whatever the message holds */
            for (char *p = message; *p; p++) {
                if (*p == '"' || *p == '\\' || (unsigned char) *p < 0x20) {
                    *p = ' ';
                }
            }
            for (char *p = kind; *p; p++) {
                if (*p == '"' || *p == '\\' || (unsigned char) *p < 0x20) {
                    *p = '_';
                }
            }
            respond_error(c, status, kind, message);
            request_end(c, status, NULL, 0);
            gw_co_free(co);
            if (!c->in_start) {
                conn_process(c);
            }
            return;
        }
        status = 500;
    }
    req_log(c, GW_LOG_ERROR, msg);
    respond_error(c, 500, "internal",
                  "the handler failed; see the log for this request_id");
    request_end(c, 500, NULL, 0);
    gw_co_free(co);
    if (!c->in_start) {
        conn_process(c);
    }
}

static void
req_suspended(struct gw_co *co)
{
    struct gw_conn *c = co->data;

    conn_timer(c, c->deadline - gw_loop_mono());
}

static const struct gw_co_owner req_owner = {
    req_done, req_fail, req_suspended
};

static void
req_deadline(struct gw_conn *c)
{
    struct gw_co *co = c->co;

    req_log(c, GW_LOG_WARN,
            "request deadline passed: answered 504, handler cancelled");
    gw_co_abandon(co);
    respond_error(c, 504, "deadline_exceeded",
                  "the handler did not finish in time");
    c->close_after = 1;
    request_end(c, 504, NULL, 0);
    gw_co_free(co);
    conn_process(c);
}

static void
req_start(struct gw_conn *c)
{
    lua_State *L = srv.L;
    struct gw_lreq *r;

    c->state = ST_HANDLE;
    srv.in_flight++;
    /* Reading stays on: turning it off and on costs two epoll_ctl calls
     * per request. If bytes arrive while we handle, conn_on_read turns
     * it off then (level-triggered, so nothing is missed). */
    evtimer_del(c->timer);
    make_request_id(c);
    c->deadline = c->started + srv.conf.request_timeout;

    lua_rawgeti(L, LUA_REGISTRYINDEX, srv.dispatch_ref);
    r = lua_newuserdata(L, sizeof(*r));
    r->c = c;
    luaL_getmetatable(L, LREQ_MT);
    lua_setmetatable(L, -2);
    lua_rawgeti(L, LUA_REGISTRYINDEX, srv.empty_env_ref);
    lua_setfenv(L, -2);
    lua_pushvalue(L, -1);
    c->lreq_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    c->lreq = r;
    lua_pushlstring(L, c->head.method, c->head.method_len);
    lua_pushlstring(L, c->head.path, c->head.path_len);
    c->in_start = 1;
    c->co = gw_co_start(L, 3, &req_owner, c, c->request_id);
    c->in_start = 0;
    if (c->state != ST_HANDLE) {
        c->co = NULL;               /* it ended already: freed */
    } else if (c->co == NULL) {
        respond_error(c, 503, "overloaded", "out of memory");
        c->close_after = 1;
        request_end(c, 503, NULL, 0);
    }
}

/* ---- the connection state machine ----------------------------------- */

/* The parsed head points into c->in: when its bytes move from `from` to
 * `to`, its pointers must move too. */
static void
head_rebase(struct gw_http_head *h, const char *from, const char *to)
{
    h->method = to + (h->method - from);
    h->path = to + (h->path - from);
    if (h->query != NULL) {
        h->query = to + (h->query - from);
    }
    for (size_t i = 0; i < h->nheaders; i++) {
        h->headers[i].name = to + (h->headers[i].name - from);
        h->headers[i].value = to + (h->headers[i].value - from);
    }
}

static void
conn_bad(struct gw_conn *c, int status, const char *kind, const char *msg)
{
    c->request_id[0] = '\0';
    c->head.keep_alive = 0;
    c->close_after = 1;
    respond_error(c, status, kind, msg);
    if (srv.conf.on_request != NULL) {
        srv.conf.on_request("-", 1, NULL, 0, status, 0);
    }
    c->state = ST_CLOSING;
}

/* Called whenever input arrived or a response was completed. */
static void
conn_process(struct gw_conn *c)
{
    for (;;) {
        if (c->state == ST_HEAD && c->out_len - c->out_sent > OUT_HIGH) {
            /* a client that pipelines and does not read its answers:
             * stop until they drain (conn_flush calls us again) */
            c->out_blocked = 1;
            break;
        }
        if (c->state == ST_HEAD) {
            size_t avail = c->in_len - c->req_start;
            size_t end;
            int rc;

            if (avail == 0) {
                c->req_start = c->in_len = c->scanned = 0;
                break;
            }
            end = gw_http_head_end(c->in + c->req_start, avail, &c->scanned);
            if (end == 0) {
                if (avail > srv.conf.max_header_bytes) {
                    conn_bad(c, 431, "header_too_large",
                             "request head exceeds the limit");
                    continue;
                }
                break;
            }
            if (end > srv.conf.max_header_bytes) {
                conn_bad(c, 431, "header_too_large",
                         "request head exceeds the limit");
                continue;
            }
            rc = gw_http_parse_head(c->in + c->req_start, end, &c->head);
            if (rc != 0) {
                conn_bad(c, rc, rc == 400 ? "bad_request" : "unsupported",
                         rc == 431 ? "too many header fields"
                         : "malformed or unsupported request");
                continue;
            }
            c->head_len = end;
            c->body_off = c->req_start + end;
            c->body_len = 0;
            memset(&c->chunk, 0, sizeof(c->chunk));
            if (c->head.content_length > (int64_t) srv.conf.max_body_bytes) {
                conn_bad(c, 413, "body_too_large",
                         "request body exceeds the limit");
                continue;
            }
            c->state = ST_BODY;
            if (c->head.expect_continue && c->head.minor == 1
                && c->in_len - c->body_off == 0
                && (c->head.content_length > 0 || c->head.chunked)) {
                if (out_reserve(c, 25) == GW_OK) {
                    out_add(c, "HTTP/1.1 100 Continue\r\n\r\n", 25);
                }
            }
        }
        if (c->state == ST_BODY) {
            size_t have = c->in_len - c->body_off;

            if (c->head.chunked) {
                int rc = gw_chunked_decode(&c->chunk, c->in + c->body_off,
                                           have);
                if (rc < 0) {
                    conn_bad(c, 400, "bad_request", "malformed chunked body");
                    continue;
                }
                /* framing (extensions, trailers, tiny chunks) counts
                 * too: the raw body must fit the input buffer's limit */
                if (c->chunk.out > srv.conf.max_body_bytes
                    || c->chunk.in >= srv.conf.max_body_bytes + 64 * 1024) {
                    conn_bad(c, 413, "body_too_large",
                             "request body exceeds the limit");
                    continue;
                }
                if (rc == 0) {
                    conn_timer(c, srv.conf.body_timeout);
                    break;
                }
                c->body_len = c->chunk.out;
            } else {
                size_t need = c->head.content_length > 0
                              ? (size_t) c->head.content_length : 0;
                if (have < need) {
                    conn_timer(c, srv.conf.body_timeout);
                    break;
                }
                c->body_len = need;
            }
            req_start(c);
            if (c->state == ST_HANDLE) {
                return;         /* the coroutine waits; it calls us back */
            }
            continue;
        }
        if (c->state == ST_HANDLE) {
            return;
        }
        break;                  /* ST_CLOSING */
    }

    if (c->out_blocked) {
        conn_read_on(c, 0);
        conn_flush(c);
        return;
    }
    if (c->state == ST_HEAD) {
        if (c->in_len > c->req_start && c->req_start > 0) {
            /* keep a partial pipelined request at the buffer's start */
            memmove(c->in, c->in + c->req_start, c->in_len - c->req_start);
            c->in_len -= c->req_start;
            c->scanned = 0;
            c->req_start = 0;
        }
        if (c->in_len == 0 && c->requests > 0) {
            conn_timer(c, srv.draining && DRAIN_LINGER
                          < srv.conf.keepalive_timeout
                          ? DRAIN_LINGER : srv.conf.keepalive_timeout);
        } else if (c->in_len == 0) {
            /* a new connection (or a TLS handshake under way) has the
             * head's time from its accept, not the idle keep-alive's */
            conn_timer(c, srv.conf.header_timeout
                          - (gw_loop_mono() - c->started));
        } else if (c->started == 0) {
            c->started = gw_loop_mono();
        }
        if (c->in_len > 0) {
            conn_timer(c, srv.conf.header_timeout
                          - (gw_loop_mono() - c->started));
        }
        conn_read_on(c, 1);
    } else if (c->state == ST_BODY) {
        if (c->req_start > 0) {
            /* behind pipelined requests: make room for the whole body */
            head_rebase(&c->head, c->in + c->req_start, c->in);
            memmove(c->in, c->in + c->req_start, c->in_len - c->req_start);
            c->in_len -= c->req_start;
            c->body_off -= c->req_start;
            c->req_start = 0;
        }
        conn_read_on(c, 1);
    } else if (c->state == ST_CLOSING) {
        conn_read_on(c, 0);
    }
    conn_flush(c);
}

/* Reads what is there. Returns 0 on EOF/error (connection closed), 1. */
static int
conn_read(struct gw_conn *c)
{
    for (;;) {
        size_t limit = srv.conf.max_header_bytes + srv.conf.max_body_bytes
                       + 64 * 1024;
        ssize_t n;

        if (c->in_len == c->in_cap) {
            size_t cap = c->in_cap ? c->in_cap * 2 : IN_MIN;
            char *p;

            if (c->in_cap >= limit) {
                return 1;       /* limits in conn_process say what's next */
            }
            if (cap > limit) {
                cap = limit;
            }
            /* not realloc: the parsed head must move with its bytes */
            p = malloc(cap);
            if (p == NULL) {
                conn_close(c);
                return 0;
            }
            if (c->in_len > 0) {
                memcpy(p, c->in, c->in_len);
            }
            if (c->state == ST_BODY) {
                head_rebase(&c->head, c->in, p);
            }
            free(c->in);
            c->in = p;
            c->in_cap = cap;
        }
        if (c->ssl != NULL) {
            int r = SSL_read(c->ssl, c->in + c->in_len,
                             (int) (c->in_cap - c->in_len));

            if (r <= 0) {
                int e = SSL_get_error(c->ssl, r);

                if (e == SSL_ERROR_WANT_READ) {
                    return 1;
                }
                if (e == SSL_ERROR_WANT_WRITE) {
                    c->ssl_read_wants_write = 1;
                    event_add(c->wev, NULL);
                    return 1;
                }
                if (e != SSL_ERROR_ZERO_RETURN && !c->handshaken) {
                    unsigned long err = ERR_peek_last_error();
                    char buf[256];

                    ERR_error_string_n(err, buf, sizeof(buf));
                    gw_log(GW_LOG_INFO, "tls handshake from %s failed: %s",
                           c->peer, buf);
                }
                ERR_clear_error();
                conn_close(c);
                return 0;
            }
            c->handshaken = 1;
            n = r;
        } else {
            n = recv(c->fd, c->in + c->in_len, c->in_cap - c->in_len, 0);
            if (n < 0) {
                if (errno == EAGAIN || errno == EINTR) {
                    return 1;
                }
                conn_close(c);
                return 0;
            }
            if (n == 0) {
                conn_close(c);
                return 0;
            }
        }
        if (c->in_len == c->req_start && c->state == ST_HEAD) {
            c->started = gw_loop_mono();     /* a new request's first byte */
        }
        c->in_len += (size_t) n;
        if (c->in_len < c->in_cap) {
            return 1;
        }
    }
}

static void
conn_on_read(evutil_socket_t fd, short what, void *arg)
{
    struct gw_conn *c = arg;

    if (c->state == ST_HANDLE || c->state == ST_CLOSING) {
        conn_read_on(c, 0);     /* the buffer must not move now */
        return;
    }
    gw_loop_update_time();
    if (!conn_read(c)) {
        return;
    }
    if (c->state == ST_HEAD || c->state == ST_BODY) {
        conn_process(c);
    }
}

static void
conn_flush(struct gw_conn *c)
{
    while (c->out_sent < c->out_len) {
        size_t left = c->out_len - c->out_sent;
        ssize_t n;

        if (c->ssl != NULL) {
            int r = SSL_write(c->ssl, c->out + c->out_sent, (int) left);

            if (r <= 0) {
                int e = SSL_get_error(c->ssl, r);

                if (e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_READ) {
                    break;
                }
                ERR_clear_error();
                conn_close(c);
                return;
            }
            n = r;
        } else {
            n = send(c->fd, c->out + c->out_sent, left, MSG_NOSIGNAL);
            if (n < 0) {
                if (errno == EAGAIN || errno == EINTR) {
                    break;
                }
                conn_close(c);
                return;
            }
        }
        c->out_sent += (size_t) n;
    }
    if (c->out_sent < c->out_len) {
        if (!c->want_write) {
            event_add(c->wev, NULL);
            c->want_write = 1;
            conn_timer(c, srv.conf.write_timeout);
        }
        return;
    }
    c->out_len = c->out_sent = 0;
    if (c->want_write) {
        event_del(c->wev);
        c->want_write = 0;
    }
    if (c->state == ST_CLOSING) {
        conn_close(c);
        return;
    }
    if (c->out_blocked) {
        c->out_blocked = 0;
        conn_process(c);        /* answer the pipelined rest */
        return;
    }
    if (srv.draining && c->state == ST_HEAD && c->in_len == 0) {
        conn_timer(c, DRAIN_LINGER);    /* see gw_server_drain() */
        return;
    }
    /* TLS may hold decrypted bytes the socket will not signal again */
    if (c->ssl != NULL && c->state == ST_HEAD && SSL_pending(c->ssl) > 0) {
        conn_on_read(c->fd, EV_READ, c);
    }
}

static void
conn_on_write(evutil_socket_t fd, short what, void *arg)
{
    struct gw_conn *c = arg;

    gw_loop_update_time();
    if (c->ssl_read_wants_write) {
        c->ssl_read_wants_write = 0;
        if (!c->want_write) {
            event_del(c->wev);
        }
        conn_on_read(fd, EV_READ, c);
        return;
    }
    conn_flush(c);
}

static void
conn_on_timer(evutil_socket_t fd, short what, void *arg)
{
    struct gw_conn *c = arg;

    gw_loop_update_time();
    if (c->state == ST_HANDLE && c->co != NULL) {
        if (gw_loop_mono() + 0.0005 >= c->deadline) {
            req_deadline(c);
        } else {
            conn_timer(c, c->deadline - gw_loop_mono());
        }
        return;
    }
    if (c->want_write) {
        gw_log(GW_LOG_INFO, "closing %s: write stalled", c->peer);
        conn_close(c);
        return;
    }
    if (c->state == ST_BODY) {
        conn_bad(c, 408, "timeout", "request body not received in time");
        conn_read_on(c, 0);
        conn_flush(c);
        return;
    }
    if (c->state == ST_HEAD && c->in_len > 0) {
        conn_bad(c, 408, "timeout", "request head not received in time");
        conn_read_on(c, 0);
        conn_flush(c);
        return;
    }
    conn_close(c);          /* idle keep-alive connection */
}

static void
conn_close(struct gw_conn *c)
{
    if (c->co != NULL) {
        /* only on shutdown: the handler's coroutine goes with us */
        struct gw_co *co = c->co;

        gw_co_abandon(co);
        request_end(c, 499, NULL, 0);
        gw_co_free(co);
    }
    if (c->lreq != NULL) {
        c->lreq->c = NULL;
        luaL_unref(srv.L, LUA_REGISTRYINDEX, c->lreq_ref);
    }
    event_free(c->rev);
    event_free(c->wev);
    event_free(c->timer);
    if (c->ssl != NULL) {
        SSL_free(c->ssl);
    }
    close(c->fd);
    free(c->in);
    free(c->out);
    if (c->prev != NULL) {
        c->prev->next = c->next;
    } else {
        srv.conns = c->next;
    }
    if (c->next != NULL) {
        c->next->prev = c->prev;
    }
    free(c);
    srv.nconns--;
    if (!srv.draining && !srv.accepting
        && srv.nconns < srv.conf.max_connections) {
        event_add(srv.lev, NULL);
        srv.accepting = 1;
    }
    if (srv.draining && srv.nconns == 0 && srv.drained != NULL) {
        void (*done)(void) = srv.drained;

        srv.drained = NULL;
        done();
    }
}

static void
on_resume(evutil_socket_t fd, short what, void *arg)
{
    if (!srv.draining && !srv.accepting
        && srv.nconns < srv.conf.max_connections) {
        event_add(srv.lev, NULL);
        srv.accepting = 1;
    }
}

static void
on_accept(evutil_socket_t lfd, short what, void *arg)
{
    gw_loop_update_time();
    for (int i = 0; i < 64; i++) {
        struct sockaddr_storage ss;
        socklen_t sl = sizeof(ss);
        struct gw_conn *c;
        int fd, one = 1;

        if (srv.nconns >= srv.conf.max_connections) {
            event_del(srv.lev);     /* the kernel backlog holds the rest */
            srv.accepting = 0;
            return;
        }
        fd = accept4(lfd, (struct sockaddr *) &ss, &sl,
                     SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED) {
                /* out of fds or memory: the socket stays readable, so a
                 * level-triggered accept would spin; pause instead */
                struct timeval pause = { 0, 500000 };

                gw_log(GW_LOG_WARN, "accept: %s; pausing accepts for "
                       "0.5 s", strerror(errno));
                if (srv.accepting) {
                    event_del(srv.lev);
                    srv.accepting = 0;
                }
                evtimer_add(srv.resume_ev, &pause);
            }
            return;
        }
        c = calloc(1, sizeof(*c));
        if (c == NULL) {
            close(fd);
            return;
        }
        c->fd = fd;
        c->lreq_ref = LUA_NOREF;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        if (ss.ss_family == AF_INET) {
            struct sockaddr_in *a = (struct sockaddr_in *) &ss;
            char ip[INET_ADDRSTRLEN];

            inet_ntop(AF_INET, &a->sin_addr, ip, sizeof(ip));
            snprintf(c->peer, sizeof(c->peer), "%s:%d", ip,
                     ntohs(a->sin_port));
        } else if (ss.ss_family == AF_INET6) {
            struct sockaddr_in6 *a = (struct sockaddr_in6 *) &ss;
            char ip[INET6_ADDRSTRLEN];

            inet_ntop(AF_INET6, &a->sin6_addr, ip, sizeof(ip));
            snprintf(c->peer, sizeof(c->peer), "[%s]:%d", ip,
                     ntohs(a->sin6_port));
        }
        c->rev = event_new(gw_loop_base(), fd, EV_READ | EV_PERSIST,
                           conn_on_read, c);
        c->wev = event_new(gw_loop_base(), fd, EV_WRITE | EV_PERSIST,
                           conn_on_write, c);
        c->timer = evtimer_new(gw_loop_base(), conn_on_timer, c);
        if (srv.ssl_ctx != NULL) {
            c->ssl = SSL_new(srv.ssl_ctx);
            if (c->ssl != NULL) {
                SSL_set_fd(c->ssl, fd);
                SSL_set_accept_state(c->ssl);
            }
        }
        c->next = srv.conns;
        if (srv.conns != NULL) {
            srv.conns->prev = c;
        }
        srv.conns = c;
        srv.nconns++;
        if (c->rev == NULL || c->wev == NULL || c->timer == NULL
            || (srv.ssl_ctx != NULL && c->ssl == NULL)) {
            conn_close(c);
            continue;
        }
        c->state = ST_HEAD;
        c->started = gw_loop_mono();
        conn_read_on(c, 1);
        conn_timer(c, srv.conf.header_timeout);
    }
}

int
gw_server_start(lua_State *L, int fd, int dispatch_ref,
                const struct gw_server_conf *conf, SSL_CTX *ssl_ctx)
{
    srv.L = L;
    srv.fd = fd;
    srv.dispatch_ref = dispatch_ref;
    srv.conf = *conf;
    srv.ssl_ctx = ssl_ctx;
    if (RAND_bytes((unsigned char *) &srv.rid_state,
                   sizeof(srv.rid_state)) != 1 || srv.rid_state == 0) {
        srv.rid_state = (uint64_t) time(NULL) ^ ((uint64_t) getpid() << 32);
    }
    srv.lev = event_new(gw_loop_base(), fd, EV_READ | EV_PERSIST, on_accept,
                        NULL);
    srv.resume_ev = evtimer_new(gw_loop_base(), on_resume, NULL);
    if (srv.lev == NULL || srv.resume_ev == NULL
        || event_add(srv.lev, NULL) != 0) {
        return GW_ERR;
    }
    srv.accepting = 1;
    return GW_OK;
}

void
gw_server_drain(void (*done)(void))
{
    struct gw_conn *c, *next;

    srv.draining = 1;
    srv.drained = done;
    if (srv.lev != NULL && srv.accepting) {
        event_del(srv.lev);
        srv.accepting = 0;
    }
    for (c = srv.conns; c != NULL; c = next) {
        next = c->next;
        if (c->state != ST_HEAD || c->in_len != 0 || c->out_len != 0) {
            continue;           /* busy: closes after its answer */
        }
        /* A request may be on its way on this idle keep-alive connection:
         * closing now would reset it. Answer what has arrived, and give
         * the rest DRAIN_LINGER to send one last request (answered with
         * Connection: close) before the connection is closed. */
        if (!conn_read(c)) {
            continue;           /* the peer had closed: gone now */
        }
        if (c->in_len > 0) {
            conn_process(c);
        } else {
            conn_timer(c, DRAIN_LINGER);
        }
    }
    if (srv.nconns == 0 && srv.drained != NULL) {
        srv.drained = NULL;
        done();
    }
}

void
gw_server_close_all(void)
{
    srv.drained = NULL;
    while (srv.conns != NULL) {
        conn_close(srv.conns);
    }
}
