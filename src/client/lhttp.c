/*
 * lhttp.c -- paygate.http.core: an HTTP client on libcurl's multi
 * interface driven by our libevent loop (socket and timer callbacks).
 * One call yields its coroutine until the response or a classified error.
 * Connections (and TLS sessions) are reused through the multi handle.
 */
#include <stdlib.h>
#include <string.h>

#include <curl/curl.h>
#include <event2/event.h>

#include "co.h"
#include "log.h"
#include "loop.h"

#define DEFAULT_TIMEOUT     30.0            /* s, whole request */
#define DEFAULT_CONNECT     10.0            /* s */
#define DEFAULT_MAX_BODY    (16 << 20)      /* bytes */

struct gw_http_op {
    CURL              *easy;        /* owned */
    struct gw_co      *co;          /* waiting coroutine; not owned */
    struct curl_slist *headers;     /* owned: request headers */
    struct curl_slist *resolve;     /* owned: CURLOPT_RESOLVE entries */
    int                body_ref;    /* registry ref anchoring the body */
    char              *buf;         /* owned: response body */
    size_t             len, cap;    /* bytes */
    size_t             max_body;    /* bytes; more fails body_too_large */
    int                too_large;
    int                sent;        /* 1 once curl was about to send the
                                       request (CURLOPT_PREREQFUNCTION) */
    char              *hdr;         /* owned: raw response header lines */
    size_t             hlen, hcap;
    char               err[CURL_ERROR_SIZE];
    CURLcode           result;      /* set when curl reports it done */
};

struct gw_sock {
    struct event *ev;               /* owned */
};

static CURLM        *multi;         /* one per process, made on first use */
static struct event *multi_timer;   /* owned */

static void check_done(void);

static void
on_sock(evutil_socket_t fd, short what, void *arg)
{
    int running, flags = 0;

    if (what & EV_READ) {
        flags |= CURL_CSELECT_IN;
    }
    if (what & EV_WRITE) {
        flags |= CURL_CSELECT_OUT;
    }
    gw_loop_update_time();
    curl_multi_socket_action(multi, fd, flags, &running);
    check_done();
}

static void
on_timer(evutil_socket_t fd, short what, void *arg)
{
    int running;

    gw_loop_update_time();
    curl_multi_socket_action(multi, CURL_SOCKET_TIMEOUT, 0, &running);
    check_done();
}

static int
sock_cb(CURL *e, curl_socket_t s, int what, void *userp, void *socketp)
{
    struct gw_sock *gs = socketp;
    short kind = EV_PERSIST;

    if (what == CURL_POLL_REMOVE) {
        if (gs != NULL) {
            event_free(gs->ev);
            free(gs);
            curl_multi_assign(multi, s, NULL);
        }
        return 0;
    }
    if (what & CURL_POLL_IN) {
        kind |= EV_READ;
    }
    if (what & CURL_POLL_OUT) {
        kind |= EV_WRITE;
    }
    if (gs == NULL) {
        gs = calloc(1, sizeof(*gs));
        if (gs == NULL) {
            return -1;
        }
        curl_multi_assign(multi, s, gs);
    } else {
        event_free(gs->ev);
    }
    gs->ev = event_new(gw_loop_base(), s, kind, on_sock, NULL);
    if (gs->ev == NULL) {
        return -1;
    }
    event_add(gs->ev, NULL);
    return 0;
}

static int
timer_cb(CURLM *m, long timeout_ms, void *userp)
{
    struct timeval tv;

    if (timeout_ms < 0) {
        evtimer_del(multi_timer);
        return 0;
    }
    tv.tv_sec = timeout_ms / 1000;
    tv.tv_usec = (timeout_ms % 1000) * 1000;
    evtimer_add(multi_timer, &tv);
    return 0;
}

static int
multi_init(void)
{
    if (multi != NULL) {
        return GW_OK;
    }
    multi = curl_multi_init();
    multi_timer = evtimer_new(gw_loop_base(), on_timer, NULL);
    if (multi == NULL || multi_timer == NULL) {
        return GW_ERR;
    }
    curl_multi_setopt(multi, CURLMOPT_SOCKETFUNCTION, sock_cb);
    curl_multi_setopt(multi, CURLMOPT_TIMERFUNCTION, timer_cb);
    curl_multi_setopt(multi, CURLMOPT_MAXCONNECTS, 256L);
    return GW_OK;
}

static void
op_free(struct gw_http_op *op)
{
    if (op->easy != NULL) {
        curl_multi_remove_handle(multi, op->easy);
        curl_easy_cleanup(op->easy);
    }
    curl_slist_free_all(op->headers);
    curl_slist_free_all(op->resolve);
    if (op->body_ref != LUA_NOREF) {
        luaL_unref(gw_co_main(), LUA_REGISTRYINDEX, op->body_ref);
    }
    free(op->buf);
    free(op->hdr);
    free(op);
}

static size_t
write_cb(char *p, size_t size, size_t n, void *arg)
{
    struct gw_http_op *op = arg;
    size_t len = size * n;

    if (op->len + len > op->max_body) {
        op->too_large = 1;
        return 0;
    }
    if (op->len + len > op->cap) {
        size_t cap = op->cap ? op->cap : 4096;
        char *b;

        while (cap < op->len + len) {
            cap *= 2;
        }
        b = realloc(op->buf, cap);
        if (b == NULL) {
            return 0;
        }
        op->buf = b;
        op->cap = cap;
    }
    memcpy(op->buf + op->len, p, len);
    op->len += len;
    return len;
}

/*
 * Called by curl when the connection is up (new or reused, TLS done) and
 * the request is about to be written. Before this point no byte of the
 * request can have reached the server; after it, one may have.
 */
static int
prereq_cb(void *arg, char *conn_primary_ip, char *conn_local_ip,
          int conn_primary_port, int conn_local_port)
{
    struct gw_http_op *op = arg;

    op->sent = 1;
    return CURL_PREREQFUNC_OK;
}

static size_t
header_cb(char *p, size_t size, size_t n, void *arg)
{
    struct gw_http_op *op = arg;
    size_t len = size * n;

    /* a new status line (after 100 Continue): keep only the last head */
    if (len >= 5 && memcmp(p, "HTTP/", 5) == 0) {
        op->hlen = 0;
    }
    if (op->hlen + len > 256 * 1024) {
        return 0;
    }
    if (op->hlen + len > op->hcap) {
        size_t cap = op->hcap ? op->hcap * 2 : 2048;
        char *b;

        while (cap < op->hlen + len) {
            cap *= 2;
        }
        b = realloc(op->hdr, cap);
        if (b == NULL) {
            return 0;
        }
        op->hdr = b;
        op->hcap = cap;
    }
    memcpy(op->hdr + op->hlen, p, len);
    op->hlen += len;
    return len;
}

/* Pushes the response headers as a table with lower-case names. */
static void
push_headers(lua_State *L, struct gw_http_op *op)
{
    size_t i = 0;

    lua_newtable(L);
    while (i < op->hlen) {
        const char *line = op->hdr + i;
        const char *nl = memchr(line, '\n', op->hlen - i);
        size_t ll = nl ? (size_t) (nl - line) : op->hlen - i;
        const char *colon = memchr(line, ':', ll);

        i += ll + 1;
        if (ll > 0 && line[ll - 1] == '\r') {
            ll--;
        }
        if (colon == NULL || colon == line || memcmp(line, "HTTP/", 5) == 0) {
            continue;
        }
        {
            size_t nl_ = (size_t) (colon - line);
            const char *v = colon + 1;
            const char *ve = line + ll;
            char name[256];

            if (nl_ >= sizeof(name)) {
                continue;
            }
            for (size_t k = 0; k < nl_; k++) {
                char ch = line[k];
                name[k] = (ch >= 'A' && ch <= 'Z') ? (char) (ch + 32) : ch;
            }
            while (v < ve && (*v == ' ' || *v == '\t')) {
                v++;
            }
            while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t')) {
                ve--;
            }
            lua_pushlstring(L, name, nl_);
            lua_pushvalue(L, -1);
            lua_rawget(L, -3);
            if (lua_isnil(L, -1)) {
                lua_pop(L, 1);
                lua_pushlstring(L, v, (size_t) (ve - v));
            } else {
                lua_pushliteral(L, ", ");
                lua_pushlstring(L, v, (size_t) (ve - v));
                lua_concat(L, 3);
            }
            lua_rawset(L, -3);
        }
    }
}

static const char *
classify(CURLcode rc, int too_large, int *retryable)
{
    *retryable = 1;
    if (too_large) {
        *retryable = 0;
        return "body_too_large";
    }
    switch (rc) {
    case CURLE_OPERATION_TIMEDOUT:
        return "timeout";
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_RESOLVE_PROXY:
        return "dns";
    case CURLE_COULDNT_CONNECT:
        return "connect";
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_PEER_FAILED_VERIFICATION:
    case CURLE_SSL_CERTPROBLEM:
    case CURLE_SSL_CIPHER:
    case CURLE_SSL_CACERT_BADFILE:
    case CURLE_SSL_ENGINE_NOTFOUND:
    case CURLE_SSL_ENGINE_SETFAILED:
    case CURLE_SSL_ISSUER_ERROR:
    case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
    case CURLE_SSL_INVALIDCERTSTATUS:
    case CURLE_SSL_CRL_BADFILE:
    case CURLE_SSL_SHUTDOWN_FAILED:
    case CURLE_USE_SSL_FAILED:
        *retryable = 0;
        return "tls";
    default:
        return "closed";
    }
}

static void
finish(struct gw_http_op *op, CURLcode rc)
{
    struct gw_co *co = op->co;
    lua_State *L = gw_co_state(co);
    int n;

    if (rc == CURLE_OK) {
        long status = 0;
        double total = 0;

        curl_easy_getinfo(op->easy, CURLINFO_RESPONSE_CODE, &status);
        curl_easy_getinfo(op->easy, CURLINFO_TOTAL_TIME, &total);
        lua_createtable(L, 0, 4);
        lua_pushinteger(L, status);
        lua_setfield(L, -2, "status");
        lua_pushlstring(L, op->buf ? op->buf : "", op->len);
        lua_setfield(L, -2, "body");
        push_headers(L, op);
        lua_setfield(L, -2, "headers");
        lua_pushnumber(L, total);
        lua_setfield(L, -2, "time");
        n = 1;
    } else {
        int retryable;
        const char *kind = classify(rc, op->too_large, &retryable);
        char *url = NULL;

        curl_easy_getinfo(op->easy, CURLINFO_EFFECTIVE_URL, &url);
        if (op->too_large) {
            n = gw_push_error(L, kind, retryable,
                              "http request: response body exceeds "
                              "max_body (%zu bytes)", op->max_body);
        } else {
            n = gw_push_error(L, kind, retryable, "http request: %s",
                              op->err[0] ? op->err : curl_easy_strerror(rc));
        }
        lua_pushboolean(L, op->sent);
        lua_setfield(L, -2, "sent");
    }
    op_free(op);
    gw_co_wake(co, n);
}

static void
check_done(void)
{
    struct gw_http_op *op;
    CURLMsg *msg;
    int left;

    /*
     * One message at a time: the coroutine finish() wakes may cancel
     * another op (task:cancel()) whose message is queued too. Cancelling
     * frees that op and curl_multi_remove_handle() drops its message, so
     * reading the queue afresh never meets a freed op (a list collected
     * beforehand would).
     */
    while ((msg = curl_multi_info_read(multi, &left)) != NULL) {
        if (msg->msg != CURLMSG_DONE) {
            continue;
        }
        op = NULL;
        curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **) &op);
        if (op == NULL) {
            continue;
        }
        op->result = msg->data.result;
        finish(op, op->result);
    }
}

static void
op_cancel(void *arg)
{
    op_free(arg);
}

static int
opt_number(lua_State *L, int t, const char *k, double def, double max)
{
    double v;

    lua_getfield(L, t, k);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        lua_pushnumber(L, def);
        return lua_gettop(L);
    }
    if (lua_type(L, -1) != LUA_TNUMBER) {
        luaL_error(L, "http request: %s must be a number", k);
    }
    v = lua_tonumber(L, -1);
    if (!(v > 0) || v > max) {
        luaL_error(L, "http request: %s must be in (0, %g]", k, max);
    }
    return lua_gettop(L);
}

static const char *
opt_string(lua_State *L, int t, const char *k)
{
    const char *v;

    lua_getfield(L, t, k);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return NULL;
    }
    if (lua_type(L, -1) != LUA_TSTRING) {
        luaL_error(L, "http request: %s must be a string", k);
    }
    v = lua_tostring(L, -1);
    lua_pop(L, 1);      /* the table anchors it */
    return v;
}

/*
 * syntax: res, err = paygate.http.request{ url=, method=, headers=, body=,
 *             timeout=, connect_timeout=, ca_file=, client_cert=,
 *             client_key=, client_key_password=, max_body=, resolve= }
 * returns: { status, headers (lower-case names), body, time } or nil, err
 *          with err.kind one of timeout, connect, dns, tls, closed,
 *          body_too_large, and err.sent: false when the failure came
 *          before any byte of the request was written (dns, connect, TLS
 *          handshake, a connect timeout), so a retry cannot repeat it;
 *          true when the server may have received it.
 * yields: until the response has been read, or the request failed.
 */
static int
lhttp_request(lua_State *L)
{
    struct gw_co *co;
    struct gw_http_op *op;
    const char *url, *method, *s;
    size_t body_len = 0;
    double timeout, connect_timeout, max_body;
    CURL *e;

    luaL_checktype(L, 1, LUA_TTABLE);
    co = gw_co_current(L);
    url = opt_string(L, 1, "url");
    if (url == NULL || (strncmp(url, "http://", 7) != 0
                        && strncmp(url, "https://", 8) != 0)) {
        return luaL_error(L, "http request: url must be an http:// or "
                             "https:// URL");
    }
    method = opt_string(L, 1, "method");
    timeout = lua_tonumber(L, opt_number(L, 1, "timeout", DEFAULT_TIMEOUT,
                                         86400));
    connect_timeout = lua_tonumber(L, opt_number(L, 1, "connect_timeout",
                                                 DEFAULT_CONNECT, 3600));
    max_body = lua_tonumber(L, opt_number(L, 1, "max_body",
                                          DEFAULT_MAX_BODY, 1 << 30));
    /* type errors raise here, before anything is allocated */
    (void) opt_string(L, 1, "ca_file");
    (void) opt_string(L, 1, "client_cert");
    (void) opt_string(L, 1, "client_key");
    (void) opt_string(L, 1, "client_key_password");
    if (multi_init() != GW_OK) {
        return luaL_error(L, "http request: cannot initialise libcurl");
    }
    op = calloc(1, sizeof(*op));
    if (op == NULL || (op->easy = curl_easy_init()) == NULL) {
        free(op);
        return luaL_error(L, "http request: no memory");
    }
    op->body_ref = LUA_NOREF;
    op->max_body = (size_t) max_body;
    e = op->easy;
    curl_easy_setopt(e, CURLOPT_URL, url);
    curl_easy_setopt(e, CURLOPT_PRIVATE, op);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, op->err);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, write_cb);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, op);
    curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, header_cb);
    curl_easy_setopt(e, CURLOPT_HEADERDATA, op);
    curl_easy_setopt(e, CURLOPT_PREREQFUNCTION, prereq_cb);
    curl_easy_setopt(e, CURLOPT_PREREQDATA, op);
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, (long) (timeout * 1000));
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS,
                     (long) (connect_timeout * 1000));
    curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(e, CURLOPT_SSL_VERIFYPEER, 1L);
    curl_easy_setopt(e, CURLOPT_SSL_VERIFYHOST, 2L);
    curl_easy_setopt(e, CURLOPT_ACCEPT_ENCODING, NULL);
    curl_easy_setopt(e, CURLOPT_TCP_NODELAY, 1L);

    lua_getfield(L, 1, "body");
    if (lua_type(L, -1) == LUA_TSTRING) {
        s = lua_tolstring(L, -1, &body_len);
        op->body_ref = luaL_ref(L, LUA_REGISTRYINDEX);
        curl_easy_setopt(e, CURLOPT_POSTFIELDS, s);
        curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE,
                         (curl_off_t) body_len);
        if (method == NULL) {
            method = "POST";
        }
    } else if (!lua_isnil(L, -1)) {
        op_free(op);
        return luaL_error(L, "http request: body must be a string");
    } else {
        lua_pop(L, 1);
    }
    if (method != NULL) {
        if (strcmp(method, "GET") == 0 && op->body_ref == LUA_NOREF) {
            curl_easy_setopt(e, CURLOPT_HTTPGET, 1L);
        } else if (strcmp(method, "HEAD") == 0) {
            curl_easy_setopt(e, CURLOPT_NOBODY, 1L);
        } else {
            if (strspn(method, "ABCDEFGHIJKLMNOPQRSTUVWXYZ") != strlen(method)
                || method[0] == '\0' || strlen(method) > 16) {
                op_free(op);
                return luaL_error(L, "http request: bad method");
            }
            curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, method);
        }
    }

    lua_getfield(L, 1, "headers");
    if (lua_istable(L, -1)) {
        int t = lua_gettop(L);

        /* curl adds "Expect: 100-continue" to large bodies: not ours */
        op->headers = curl_slist_append(op->headers, "Expect:");
        lua_pushnil(L);
        while (lua_next(L, t) != 0) {
            size_t kl, vl;
            const char *k, *v;
            luaL_Buffer b;

            if (lua_type(L, -2) != LUA_TSTRING
                || (lua_type(L, -1) != LUA_TSTRING
                    && lua_type(L, -1) != LUA_TNUMBER)) {
                op_free(op);
                return luaL_error(L, "http request: headers must map "
                                     "names to strings");
            }
            k = lua_tolstring(L, -2, &kl);
            v = lua_tolstring(L, -1, &vl);
            if (memchr(k, '\n', kl) || memchr(k, '\r', kl)
                || memchr(v, '\n', vl) || memchr(v, '\r', vl)
                || memchr(k, ':', kl) || kl == 0) {
                op_free(op);
                return luaL_error(L, "http request: header %s has CR, LF "
                                     "or a colon in it", k);
            }
            luaL_buffinit(L, &b);
            luaL_addlstring(&b, k, kl);
            luaL_addlstring(&b, vl ? ": " : ";", vl ? 2 : 1);
            luaL_addlstring(&b, v, vl);
            luaL_pushresult(&b);
            op->headers = curl_slist_append(op->headers, lua_tostring(L, -1));
            lua_pop(L, 2);
        }
        curl_easy_setopt(e, CURLOPT_HTTPHEADER, op->headers);
    } else if (!lua_isnil(L, -1)) {
        op_free(op);
        return luaL_error(L, "http request: headers must be a table");
    }
    lua_pop(L, 1);

    if ((s = opt_string(L, 1, "ca_file")) != NULL) {
        curl_easy_setopt(e, CURLOPT_CAINFO, s);
        curl_easy_setopt(e, CURLOPT_CAPATH, NULL);
    }
    if ((s = opt_string(L, 1, "client_cert")) != NULL) {
        curl_easy_setopt(e, CURLOPT_SSLCERT, s);
    }
    if ((s = opt_string(L, 1, "client_key")) != NULL) {
        curl_easy_setopt(e, CURLOPT_SSLKEY, s);
    }
    if ((s = opt_string(L, 1, "client_key_password")) != NULL) {
        curl_easy_setopt(e, CURLOPT_KEYPASSWD, s);
    }
    lua_getfield(L, 1, "resolve");
    if (lua_istable(L, -1)) {
        int n = (int) lua_objlen(L, -1);

        for (int i = 1; i <= n; i++) {
            lua_rawgeti(L, -1, i);
            if (lua_type(L, -1) == LUA_TSTRING) {
                op->resolve = curl_slist_append(op->resolve,
                                                lua_tostring(L, -1));
            }
            lua_pop(L, 1);
        }
        curl_easy_setopt(e, CURLOPT_RESOLVE, op->resolve);
    }
    lua_pop(L, 1);

    op->co = co;
    if (curl_multi_add_handle(multi, e) != CURLM_OK) {
        op_free(op);
        return gw_push_error(L, "closed", 1, "http request: cannot start");
    }
    return gw_co_wait(L, op_cancel, op);
}

static const luaL_Reg lhttp_funcs[] = {
    { "request", lhttp_request },
    { NULL, NULL }
};

int
luaopen_paygate_http_core(lua_State *L)
{
    lua_newtable(L);
    luaL_register(L, NULL, lhttp_funcs);
    return 1;
}
