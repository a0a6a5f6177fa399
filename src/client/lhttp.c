/*
 * lhttp.c -- paygate.http.core: an HTTP client on libcurl's multi
 * interface driven by our libevent loop (socket and timer callbacks).
 * One call yields its coroutine until the response or a classified error.
 * Connections (and TLS sessions) are reused through the multi handle;
 * those made with a client certificate through a pool of their client
 * identity's own (struct gw_http_pool).
 */
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <curl/curl.h>
#include <event2/event.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>

#include "co.h"
#include "log.h"
#include "lstate.h"
#include "loop.h"

#define DEFAULT_TIMEOUT     30.0            /* s, whole request */
#define DEFAULT_CONNECT     10.0            /* s */
#define DEFAULT_MAX_BODY    (16 << 20)      /* bytes */
#define HEAD_MAX            (256 * 1024)    /* bytes of response head */
#define POOL_MAX            16              /* client identities whose
                                               pools are kept when idle */
#define ID_FILE_MAX         (1 << 20)       /* bytes of a client TLS file
                                               read into its identity */

/*
 * The connections made with one client identity. libcurl (7.88) matches
 * a pooled TLS connection on the client certificate's path but not on
 * the key, nor on what the files hold: a request whose key changed (a
 * new client_key, or new files at the same paths) would go out on a
 * connection the old key authenticated. So each identity -- a SHA-256
 * of the certificate's and the key's paths and contents -- has its own
 * connection cache (a share handle with CURL_LOCK_DATA_CONNECT), and a
 * request only ever reuses a connection made with the same files.
 */
struct gw_http_pool {
    unsigned char        id[32];    /* SHA-256 of the identity */
    CURLSH              *share;     /* owned: the identity's connections */
    int                  users;     /* ops whose easy uses share now */
    unsigned long        used;      /* pool_clock at its last use */
    struct gw_http_pool *next;      /* owned by the pools list */
};

struct gw_http_op {
    CURL              *easy;        /* owned */
    struct gw_co      *co;          /* waiting coroutine; not owned */
    struct gw_http_pool *pool;      /* its client identity's connections
                                       (a user counted), or NULL */
    struct curl_slist *headers;     /* owned: request headers */
    struct curl_slist *resolve;     /* owned: CURLOPT_RESOLVE entries */
    int                body_ref;    /* registry ref anchoring the body */
    const char        *body;        /* request body (anchored), or NULL */
    size_t             body_len;    /* bytes */
    size_t             body_pos;    /* bytes handed to curl so far */
    int                resend;      /* 1: curl may send the request again
                                       on a new connection when a reused
                                       one died before any answer */
    int                prereqs;     /* times the request was about to be
                                       written (more than 1: a re-send) */
    int                refused;     /* 1: a re-send was refused */
    int                stale;       /* 1: stopped before the request went
                                       out on a reused connection with
                                       bytes waiting: to start again */
    int                restarts;    /* times started again for that */
    long               no_reuse;    /* CURLOPT_FORBID_REUSE as set up */
    int                tls;         /* 1: an https:// URL */
    char              *buf;         /* owned: response body */
    size_t             len, cap;    /* bytes */
    size_t             max_body;    /* bytes; more fails body_too_large */
    int                too_large;
    curl_off_t         declared;    /* the Content-Length that was past
                                       max_body (too_large), or 0 */
    int                nobody;      /* 1: a HEAD request */
    int                head_too_large;  /* 1: the response head went past
                                       HEAD_MAX, or a line past curl's
                                       own limit (CURL_MAX_HTTP_HEADER) */
    int                head_done;   /* 1 once the final (>= 200) head was
                                       read, or body bytes came */
    int                head_cut;    /* 1: the transfer ended before the
                                       final head did (no blank line) */
    int                two_lengths; /* 1: Content-Length values differ */
    int                big_length;  /* 1: a Content-Length past 2^63 - 1 */
    int                switched;    /* 1: a 101 no request asks for */
    int                at_status;   /* 1: the last head line handed over
                                       was a status line */
    int                has_clen;    /* 1: the head had a Content-Length */
    size_t             clen_at;     /* its first one's value, trimmed:
                                       where it begins in hdr, */
    size_t             clen_len;    /* and its length (a copy cut to a
                                       fixed size made two identical
                                       long values look different) */
    int                sent;        /* 1 once curl was about to send the
                                       request (CURLOPT_PREREQFUNCTION) */
    char              *hdr;         /* owned: raw response header lines */
    size_t             hlen, hcap;
    char               err[CURL_ERROR_SIZE];
    CURLcode           result;      /* set when curl reports it done */

    /* streaming (paygate.http.request{ sink = }) only: */
    int                stream;      /* 1: the body goes out by :read() */
    int                in_multi;    /* 1 while the easy is in the multi */
    int                done;        /* 1 once curl finished (or aborted) */
    int                paused;      /* 1: write_cb returned PAUSE */
    int                want;        /* what co waits for: WANT_* */
    size_t             total;       /* bytes of body received so far */
    double             time;        /* s, total time, set when done */
    struct event      *wake_ev;     /* owned: wakes co on a later turn */
    struct gw_co_cleanup cleanup;   /* aborts the transfer if the owning
                                       coroutine ends without close() */
};

#define WANT_HEADERS 1
#define WANT_DATA    2
#define STREAM_BUF   (64 * 1024)    /* bytes buffered before pausing curl */
#define LSTREAM_MT   "paygate.http_stream"

struct gw_sock {
    struct event *ev;               /* owned */
};

static CURLM        *multi;         /* one per process, made on first use */
static CURLSH       *tls_sessions;  /* owned: the TLS sessions of requests
                                       made without a client certificate
                                       (see sessions_share()) */
static struct event *multi_timer;   /* owned */
static int           live_ops;      /* ops made and not yet freed (their
                                       easy handles may be in multi) */

/* The sockets curl opened (open_cb) and has not closed, with their local
 * and peer ports and the peer's address once connected (ports 0: not
 * known yet), to find the socket of the connection a request is about to
 * go out on (prereq_cb). */
struct gw_http_sock {
    curl_socket_t  fd;
    unsigned short lport, pport;
    char           peer[INET6_ADDRSTRLEN];
};
static struct gw_http_sock *socks;  /* owned */
static size_t        nsocks, socks_cap;
static struct gw_http_pool *pools;  /* owned: the client identities' pools */
static int           npools;        /* entries in pools */
static unsigned long pool_clock;    /* counts pool uses (least recently
                                       used goes first) */

static void check_done(void);
static void stream_kick(struct gw_http_op *op);
static void stream_done(struct gw_http_op *op, CURLcode rc);

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
        if (!op->stream || op->in_multi) {
            curl_multi_remove_handle(multi, op->easy);
        }
        curl_easy_cleanup(op->easy);   /* lets go of op->pool's share */
    }
    if (op->pool != NULL) {
        op->pool->users--;
    }
    live_ops--;
    if (op->wake_ev != NULL) {
        event_free(op->wake_ev);
    }
    gw_co_cleanup_del(&op->cleanup);
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

    if (op->stream) {
        if (op->total + len > op->max_body) {
            op->too_large = 1;
            return 0;
        }
        /* bounded: past STREAM_BUF unread bytes curl holds the rest */
        if (op->len > 0 && op->len + len > STREAM_BUF) {
            op->paused = 1;
            return CURL_WRITEFUNC_PAUSE;
        }
        op->total += len;
        op->head_done = 1;
    } else if (op->len + len > op->max_body) {
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
    if (op->stream) {
        stream_kick(op);
    }
    return len;
}

/* CURLOPT_OPENSOCKETFUNCTION: the socket, made as curl would (and not
 * inherited by a child process), remembered in socks. */
static curl_socket_t
open_cb(void *arg, curlsocktype purpose, struct curl_sockaddr *a)
{
    curl_socket_t fd;

    if (nsocks == socks_cap) {
        size_t cap = socks_cap ? socks_cap * 2 : 64;
        struct gw_http_sock *b = realloc(socks, cap * sizeof(*b));

        if (b == NULL) {
            return CURL_SOCKET_BAD;
        }
        socks = b;
        socks_cap = cap;
    }
    fd = socket(a->family, a->socktype | SOCK_CLOEXEC, a->protocol);
    if (fd != CURL_SOCKET_BAD) {
        socks[nsocks].fd = fd;
        socks[nsocks].lport = socks[nsocks].pport = 0;
        socks[nsocks].peer[0] = '\0';
        nsocks++;
    }
    return fd;
}

/* CURLOPT_CLOSESOCKETFUNCTION: closes a socket of open_cb's. */
static int
close_cb(void *arg, curl_socket_t fd)
{
    for (size_t i = 0; i < nsocks; i++) {
        if (socks[i].fd == fd) {
            socks[i] = socks[--nsocks];
            break;
        }
    }
    return close(fd);
}

/* The port of a socket address, and its address as text in ip (size
 * INET6_ADDRSTRLEN), or 0 when it is neither IPv4 nor IPv6. */
static unsigned short
addr_port(const struct sockaddr_storage *sa, char *ip)
{
    if (sa->ss_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *) sa;

        if (ip != NULL) {
            inet_ntop(AF_INET, &in->sin_addr, ip, INET6_ADDRSTRLEN);
        }
        return ntohs(in->sin_port);
    }
    if (sa->ss_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *) sa;

        if (ip != NULL) {
            inet_ntop(AF_INET6, &in6->sin6_addr, ip, INET6_ADDRSTRLEN);
        }
        return ntohs(in6->sin6_port);
    }
    return 0;
}

/* The socket of curl's connected to ip:port from local port lport, or
 * CURL_SOCKET_BAD. */
static curl_socket_t
sock_find(const char *ip, int port, int lport)
{
    for (size_t i = 0; i < nsocks; i++) {
        struct gw_http_sock *s = &socks[i];
        struct sockaddr_storage sa;
        socklen_t len;

        /* learnt once per socket (a connection's ends do not change):
         * no system call for a socket already known */
        if (s->lport == 0 || s->pport == 0) {
            len = sizeof(sa);
            if (getsockname(s->fd, (struct sockaddr *) &sa, &len) != 0) {
                continue;
            }
            s->lport = addr_port(&sa, NULL);
            len = sizeof(sa);
            s->peer[0] = '\0';
            if (getpeername(s->fd, (struct sockaddr *) &sa, &len) != 0) {
                s->lport = 0;           /* not connected (yet) */
                continue;
            }
            s->pport = addr_port(&sa, s->peer);
        }
        if (s->lport == lport && s->pport == port
            && strcmp(s->peer, ip) == 0) {
            return s->fd;
        }
    }
    return CURL_SOCKET_BAD;
}

/*
 * 1 when the reused HTTP/1 connection ip:port (local port lport) that
 * op's request is about to go out on has bytes waiting, or has ended:
 * bytes no request asked for (a server's 408 before it closed an idle
 * connection, a second answer to one request). libcurl (7.88) reuses such
 * a connection, and the request then reads them as its answer, each later
 * one the answer to the one before it. An HTTP/2 connection is left to
 * curl (frames come on it between requests).
 */
static int
stale_input(struct gw_http_op *op, const char *ip, int port, int lport)
{
    curl_socket_t fd = sock_find(ip, port, lport);
    ssize_t n;
    char b;

    if (fd == CURL_SOCKET_BAD) {
        return 0;
    }
    if (op->tls) {
        struct curl_tlssessioninfo *ti = NULL;
        const unsigned char *alpn = NULL;
        unsigned int alen = 0;

        if (curl_easy_getinfo(op->easy, CURLINFO_TLS_SSL_PTR, &ti)
                != CURLE_OK
            || ti == NULL || ti->backend != CURLSSLBACKEND_OPENSSL
            || ti->internals == NULL) {
            return 0;
        }
        SSL_get0_alpn_selected(ti->internals, &alpn, &alen);
        if (alen == 2 && memcmp(alpn, "h2", 2) == 0) {
            return 0;
        }
        if (SSL_has_pending(ti->internals)) {
            return 1;
        }
    }
    n = recv(fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
    return n >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK
                      && errno != EINTR);
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
    long connects = 1;

    if (op->prereqs == 0
        && curl_easy_getinfo(op->easy, CURLINFO_NUM_CONNECTS, &connects)
           == CURLE_OK
        && connects == 0
        && stale_input(op, conn_primary_ip, conn_primary_port,
                       conn_local_port)) {
        /* nothing written: the connection is closed (not put back), and
         * check_done() starts the request again */
        op->stale = 1;
        curl_easy_setopt(op->easy, CURLOPT_FORBID_REUSE, 1L);
        return CURL_PREREQFUNC_ABORT;
    }
    op->sent = 1;
    op->prereqs++;
    if (op->prereqs > 1) {
        /*
         * curl is about to send the request again: a reused connection
         * died before any byte of the answer (its own retry). The server
         * may have read the first copy and acted on it. Unless re-sending
         * is allowed, stop here, unless no byte of a non-empty body left
         * (then the server cannot have had the whole request).
         */
        if (!op->resend && (op->body_len == 0 || op->body_pos > 0)) {
            op->refused = 1;
            return CURL_PREREQFUNC_ABORT;
        }
        op->body_pos = 0;           /* a new request: the body anew */
    }
    return CURL_PREREQFUNC_OK;
}

/* Hands curl the next piece of the request body. */
static size_t
read_cb(char *p, size_t size, size_t n, void *arg)
{
    struct gw_http_op *op = arg;
    size_t len = op->body_len - op->body_pos;

    if (len > size * n) {
        len = size * n;
    }
    memcpy(p, op->body + op->body_pos, len);
    op->body_pos += len;
    return len;
}

/*
 * curl rewinds the body before it sends the request again (its retry on
 * a new connection after a reused one died). Refused once some of the
 * body went out, unless re-sending is allowed: the transfer then fails
 * (CURLE_SEND_FAIL_REWIND, or the receive error that caused the retry)
 * and the caller sees err.sent = true.
 */
static int
seek_cb(void *arg, curl_off_t offset, int origin)
{
    struct gw_http_op *op = arg;

    if (origin != SEEK_SET || offset < 0
        || (curl_off_t) op->body_len < offset) {
        return CURL_SEEKFUNC_CANTSEEK;
    }
    if (!op->resend && op->body_pos > 0) {
        op->refused = 1;
        return CURL_SEEKFUNC_FAIL;
    }
    op->body_pos = (size_t) offset;
    return CURL_SEEKFUNC_OK;
}

/* 1 when the Content-Length value at v (ve its end, blanks trimmed), read
 * as libcurl (7.88) reads it -- an optional '+', then the digits up to
 * the first byte that is none -- is past 2^63 - 1, the most libcurl holds;
 * 0 otherwise (a value that is no number at all libcurl refuses itself) */
static int
length_overflows(const char *v, const char *ve)
{
    static const char max[] = "9223372036854775807";
    const char *d;

    if (v < ve && *v == '+') {
        v++;
    }
    while (v < ve && *v == '0') {
        v++;
    }
    for (d = v; d < ve && *d >= '0' && *d <= '9'; d++) {
    }
    return (size_t) (d - v) > sizeof(max) - 1
           || ((size_t) (d - v) == sizeof(max) - 1
               && memcmp(v, max, sizeof(max) - 1) > 0);
}

static size_t
header_cb(char *p, size_t size, size_t n, void *arg)
{
    struct gw_http_op *op = arg;
    size_t len = size * n;
    int status_line = len >= 5 && memcmp(p, "HTTP/", 5) == 0;

    /* a new status line (after 100 Continue): keep only the last head */
    if (status_line) {
        op->hlen = 0;
        op->has_clen = 0;
    }
    /* (push_failure: a transfer that failed right after this line) */
    op->at_status = status_line;
    /* Content-Length fields whose values differ: the body's end cannot
     * be known, the answer is refused (RFC 9112 6.3); libcurl (7.88)
     * framed it by the last one */
    if (len > 15 && strncasecmp(p, "content-length:", 15) == 0) {
        const char *v = p + 15, *ve = p + len;

        while (v < ve && (*v == ' ' || *v == '\t')) {
            v++;
        }
        while (ve > v && (ve[-1] == '\r' || ve[-1] == '\n'
                          || ve[-1] == ' ' || ve[-1] == '\t')) {
            ve--;
        }
        if (length_overflows(v, ve)) {
            long code = 0;

            /* libcurl (7.88) fails a word or a negative value itself
             * (push_failure) but reads this one as no length at all and
             * the body as lasting until the server closes: a keep-alive
             * server's answer ended in kind timeout, retryable, and one
             * that closed had whatever came taken as the whole body.
             * Refused where libcurl reads the field: not in a 1xx, 204 or
             * 304 head, which has no body */
            curl_easy_getinfo(op->easy, CURLINFO_RESPONSE_CODE, &code);
            if (code >= 200 && code != 204 && code != 304) {
                op->big_length = 1;
                return 0;
            }
        }
        /* the first value is compared where it is kept, in hdr (this
         * line is appended to it below, or the transfer fails): whole,
         * however long (leading zeros), so identical repeats are one
         * field (RFC 9110 8.6 lets a recipient take them so) */
        if (!op->has_clen) {
            op->has_clen = 1;
            op->clen_at = op->hlen + (size_t) (v - p);
            op->clen_len = (size_t) (ve - v);
        } else if (op->clen_len != (size_t) (ve - v)
                   || memcmp(op->hdr + op->clen_at, v, op->clen_len) != 0) {
            op->two_lengths = 1;
            return 0;
        }
    }
    if (op->hlen + len > HEAD_MAX) {
        op->head_too_large = 1;
        return 0;
    }
    if ((len == 2 || len == 1) && (p[0] == '\r' || p[0] == '\n')) {
        long code = 0;

        /* the blank line ending a head; 1xx heads are followed by more */
        curl_easy_getinfo(op->easy, CURLINFO_RESPONSE_CODE, &code);
        if (code == 101) {
            /* Switching Protocols: no request here asks for an upgrade,
             * and what follows is no HTTP answer (curl would read it as
             * the body until the server closed) */
            op->switched = 1;
            return 0;
        }
        if (code >= 200) {
            curl_off_t cl = -1;

            /* a body declared past max_body is refused now, as its bytes
             * would be (write_cb): not read up to max_body first, nor
             * waited for when fewer come (a keep-alive server that sent
             * 2 bytes under a Content-Length of a terabyte held the
             * request to its timeout, retryable). libcurl's reading of
             * the head says -1 when the body is chunked or has no length,
             * 0 for a 204 or 304; a HEAD answer's is the resource's, with
             * no body */
            if (!op->nobody
                && curl_easy_getinfo(op->easy,
                                     CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &cl)
                   == CURLE_OK
                && cl > 0 && (unsigned long long) cl > op->max_body) {
                op->too_large = 1;
                op->declared = cl;
                return 0;
            }
            op->head_done = 1;
            if (op->stream) {
                stream_kick(op);
            }
        }
        if (op->stream) {
            return len;
        }
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

/* Pushes a header value (len bytes at v), each bare CR in it a space. */
static void
push_value(lua_State *L, const char *v, size_t len)
{
    luaL_Buffer b;

    if (memchr(v, '\r', len) == NULL) {
        lua_pushlstring(L, v, len);
        return;
    }
    luaL_buffinit(L, &b);
    for (size_t i = 0; i < len; i++) {
        luaL_addchar(&b, v[i] == '\r' ? ' ' : v[i]);
    }
    luaL_pushresult(&b);
}

/* Pushes the response headers as a table with lower-case names. */
static void
push_headers(lua_State *L, struct gw_http_op *op)
{
    size_t i = 0;
    char   last[256];               /* the field a folded line goes on */
    size_t last_len = 0;            /* 0: none yet */

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
        /* obs-fold: a line that begins with a space or a tab goes on the
         * field before it, joined with one space (RFC 9112 5.2); libcurl
         * (7.88) hands it over as a line of its own, which was dropped,
         * or read as a field when it held a colon */
        if (ll > 0 && (line[0] == ' ' || line[0] == '\t')) {
            const char *v = line, *ve = line + ll;

            while (v < ve && (*v == ' ' || *v == '\t')) {
                v++;
            }
            while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t')) {
                ve--;
            }
            if (last_len > 0 && ve > v) {
                lua_pushlstring(L, last, last_len);
                lua_pushvalue(L, -1);
                lua_rawget(L, -3);
                lua_pushliteral(L, " ");
                push_value(L, v, (size_t) (ve - v));
                lua_concat(L, 3);
                lua_rawset(L, -3);
            }
            continue;
        }
        last_len = 0;
        /* (a status line; a header line may be shorter than "HTTP/": a
         * last line "a:" at the buffer's end) */
        if (colon == NULL || colon == line
            || (ll >= 5 && memcmp(line, "HTTP/", 5) == 0)) {
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
            /* a bare CR (libcurl 7.88 ends lines at LF alone) becomes a
             * space, as RFC 9112 2.2 allows: it is no line break */
            for (size_t k = 0; k < nl_; k++) {
                char ch = line[k];
                name[k] = (ch >= 'A' && ch <= 'Z') ? (char) (ch + 32)
                          : ch == '\r' ? ' ' : ch;
            }
            while (v < ve && (*v == ' ' || *v == '\t')) {
                v++;
            }
            while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t')) {
                ve--;
            }
            memcpy(last, name, nl_);
            last_len = nl_;
            lua_pushlstring(L, name, nl_);
            lua_pushvalue(L, -1);
            lua_rawget(L, -3);
            if (lua_isnil(L, -1)) {
                lua_pop(L, 1);
                push_value(L, v, (size_t) (ve - v));
            } else {
                lua_pushliteral(L, ", ");
                push_value(L, v, (size_t) (ve - v));
                lua_concat(L, 3);
            }
            lua_rawset(L, -3);
        }
    }
}

static const char *
classify(CURLcode rc, struct gw_http_op *op, int *retryable)
{
    *retryable = 1;
    if (op->two_lengths || op->switched) {
        *retryable = 0;
        return "closed";
    }
    if (op->too_large) {
        *retryable = 0;
        return "body_too_large";
    }
    if (op->head_too_large) {
        *retryable = 0;
        return "header_too_large";
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

/* libcurl (7.88) fails these malformed heads before the line is handed
 * over, so nothing here sees the line: only the code and the error
 * buffer's words tell them apart (CURLE_WEIRD_SERVER_REPLY's only causes
 * in an HTTP/1 head; CURLE_UNSUPPORTED_PROTOCOL's only ones once the
 * request went out: a URL scheme libcurl lacks cannot get past op_setup's
 * check, nor past CURLOPT_PROTOCOLS_STR, and an unknown proxy scheme is
 * CURLE_COULDNT_CONNECT). Each was kind closed, retryable, as a dropped
 * connection, with libcurl's words: the server read the request and
 * answered it wrongly, which a resend does not cure (a resent POST may
 * apply twice). Our words never show the line: it may be anything, a
 * credential. (A libcurl that words one otherwise fails it as before,
 * retryable: http_client_broken_spec would fail) */
static const struct {
    CURLcode    rc;             /* what libcurl fails it with */
    const char *curl;           /* libcurl's error buffer begins so */
    const char *ours;           /* what is malformed */
} weird_heads[] = {
    /* neither a field nor a folded line */
    { CURLE_WEIRD_SERVER_REPLY, "Header without colon",
      "a header line holds no colon (it is neither a field nor a folded"
      " line)" },
    /* in any line of any head, the status line and a 1xx head too */
    { CURLE_WEIRD_SERVER_REPLY, "Nul byte in header",
      "a line of it holds a NUL byte" },
    /* not digits: a word, a negative or an empty value, in any of the
     * Content-Length fields (values that differ are two_lengths) */
    { CURLE_WEIRD_SERVER_REPLY, "Invalid Content-Length: value",
      "its Content-Length is not a number of bytes" },
    /* a status line that begins "HTTP/", so from a server that speaks
     * HTTP, but whose version libcurl does not take ("HTTP/1.2",
     * "HTTP/3", no space after it), or whose status code is not three
     * digits ("20", "2000"), in any head, a 1xx one too */
    { CURLE_UNSUPPORTED_PROTOCOL, "Unsupported HTTP version",
      "its status line cannot be read (an HTTP version this client does"
      " not speak)" },
    { CURLE_UNSUPPORTED_PROTOCOL, "Unsupported response code",
      "its status line cannot be read (no status code of three digits)" },
    /* an answer that does not begin "HTTP/": HTTP/0.9 to libcurl, but
     * in practice a server of another protocol at that port (an SSH or
     * mail banner, a TLS alert to a request in plain text). Such a peer
     * most likely did not act on the request, but nothing here can know
     * it (a broken server or proxy may have): err.sent stays true. Not
     * retryable either: a resend reaches the same peer and gets the
     * same answer; the URL is what to fix */
    { CURLE_UNSUPPORTED_PROTOCOL, "Received HTTP/0.9",
      "it is not HTTP: no status line begins it (a server of another"
      " protocol at that port? an https:// one asked with http://?)" },
};

/* Pushes nil, err for a failed transfer; returns 2. */
static int
push_failure(lua_State *L, struct gw_http_op *op, CURLcode rc)
{
    int n, retryable, bad_fold;
    const char *kind, *malformed = NULL;

    /* libcurl (7.88) fails a header line past CURL_MAX_HTTP_HEADER (100
     * KiB) as CURLE_OUT_OF_MEMORY, with no message: "Out of memory" was
     * the server's huge header, not this process */
    if (rc == CURLE_OUT_OF_MEMORY && !op->head_done) {
        op->head_too_large = 1;
    }
    /* libcurl (7.88) fails a folded line (obs-fold) right after the
     * status line, with no field before it to go on, as
     * CURLE_BAD_FUNCTION_ARGUMENT ("A libcurl function was given a bad
     * argument") without handing it over: the head ends at the status
     * line. It was kind closed, retryable, as a dropped connection: it
     * is a malformed answer, which a resend does not cure */
    bad_fold = rc == CURLE_BAD_FUNCTION_ARGUMENT && !op->head_done
               && op->at_status;
    if (op->big_length) {
        malformed = "its Content-Length is too large (past 2^63 - 1 bytes)";
    } else if (!op->head_done && op->sent) {
        for (size_t i = 0; i < sizeof(weird_heads) / sizeof(weird_heads[0]);
             i++) {
            if (rc == weird_heads[i].rc
                && strncmp(op->err, weird_heads[i].curl,
                           strlen(weird_heads[i].curl)) == 0) {
                malformed = weird_heads[i].ours;
                break;
            }
        }
    }
    kind = classify(rc, op, &retryable);
    if (bad_fold || malformed != NULL) {
        retryable = 0;
    }
    if (op->too_large && op->declared > 0) {
        n = gw_push_error(L, kind, retryable, "http request: response body "
                          "exceeds max_body (%zu bytes): its Content-Length"
                          " is %lld", op->max_body, (long long) op->declared);
    } else if (op->too_large) {
        n = gw_push_error(L, kind, retryable, "http request: response body "
                          "exceeds max_body (%zu bytes)", op->max_body);
    } else if (op->head_too_large) {
        n = gw_push_error(L, kind, retryable, "http request: the response "
                          "head is too large (a header line past %d KiB, or "
                          "more than %d KiB of header lines)",
                          CURL_MAX_HTTP_HEADER / 1024, HEAD_MAX / 1024);
    } else if (op->two_lengths) {
        n = gw_push_error(L, kind, retryable, "http request: the response"
                          " has Content-Length values that differ: where"
                          " its body ends cannot be known");
    } else if (op->switched) {
        n = gw_push_error(L, kind, retryable, "http request: the server"
                          " answered 101 Switching Protocols, which no"
                          " request here asks for");
    } else if (bad_fold) {
        n = gw_push_error(L, kind, retryable, "http request: the response"
                          " head is malformed: its first header line is"
                          " folded (begins with a space or a tab), with no"
                          " field before it to continue");
    } else if (malformed != NULL) {
        n = gw_push_error(L, kind, retryable, "http request: the response"
                          " head is malformed: %s", malformed);
    } else if (op->head_cut) {
        n = gw_push_error(L, kind, retryable, "http request: the connection"
                          " closed before the end of the response head");
    } else if (op->refused) {
        kind = "closed";
        n = gw_push_error(L, kind, 1, "http request: the connection was "
                          "lost after the request was sent, before any "
                          "answer; not sent again (resend is off)");
    } else if (rc == CURLE_SSL_CERTPROBLEM) {
        /* curl's message quotes client_cert / client_key as given: the
         * key's PEM text, when it was passed where its path belongs */
        n = gw_push_error(L, kind, retryable, "http request: the client"
                          " certificate cannot be used (client_cert,"
                          " client_key: a file that cannot be read or is not"
                          " PEM, a key that does not match the certificate,"
                          " or a wrong client_key_password; curl's message"
                          " is not shown: it quotes the values)");
        lua_pushliteral(L, "client");         /* paygate.http says which */
        lua_setfield(L, -2, "tls_files");
    } else if (rc == CURLE_SSL_CACERT_BADFILE) {
        /* and ca_file, likewise */
        n = gw_push_error(L, kind, retryable, "http request: ca_file cannot"
                          " be used (a file that cannot be read or holds no"
                          " PEM certificate; curl's message is not shown:"
                          " it quotes the value)");
        lua_pushliteral(L, "ca");
        lua_setfield(L, -2, "tls_files");
    } else {
        n = gw_push_error(L, kind, retryable, "http request: %s",
                          op->err[0] ? op->err : curl_easy_strerror(rc));
    }
    lua_pushboolean(L, op->sent);
    lua_setfield(L, -2, "sent");
    return n;
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
        n = push_failure(L, op, rc);
    }
    op_free(op);
    gw_co_wake(co, n);
}

/*
 * Starts op's request again after prereq_cb stopped it before a byte went
 * out (op->stale); the third time on a new connection whatever the pool
 * holds. Returns GW_OK, or GW_ERR when it could not be started.
 */
static int
restart(struct gw_http_op *op)
{
    curl_multi_remove_handle(multi, op->easy);
    op->stale = 0;
    op->restarts++;
    op->sent = op->prereqs = op->refused = 0;
    op->body_pos = op->len = op->hlen = 0;
    op->at_status = op->has_clen = 0;
    op->err[0] = '\0';
    curl_easy_setopt(op->easy, CURLOPT_FORBID_REUSE, op->no_reuse);
    if (op->restarts >= 3) {
        curl_easy_setopt(op->easy, CURLOPT_FRESH_CONNECT, 1L);
    }
    return curl_multi_add_handle(multi, op->easy) == CURLM_OK
           ? GW_OK : GW_ERR;
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
        if (op->stale && op->result == CURLE_ABORTED_BY_CALLBACK
            && restart(op) == GW_OK) {
            continue;
        }
        if (op->result == CURLE_OK && !op->head_done) {
            /* libcurl (7.88) takes a connection closed in the head, after
             * its status line, for a whole answer: a 200 with the headers
             * so far and no body. It is no answer. */
            op->head_cut = 1;
            op->result = CURLE_RECV_ERROR;
        }
        if (op->stream) {
            stream_done(op, op->result);    /* wakes on a later turn */
        } else {
            finish(op, op->result);
        }
    }
}

static void
op_cancel(void *arg)
{
    op_free(arg);
}

/* Every option of http.request (sink and on_headers are paygate.http's,
 * which hands the same table to core.stream). */
static const char *const request_opts[] = {
    "url", "method", "headers", "body", "timeout", "connect_timeout",
    "ca_file", "client_cert", "client_key", "client_key_password",
    "max_body", "resolve", "resend", "sink", "on_headers", "idle_timeout",
    NULL
};

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
        gw_raise(L, "http.request: opts.%s must be a number", k);
    }
    v = lua_tonumber(L, -1);
    if (!(v > 0) || v > max) {
        gw_raise(L, "http.request: opts.%s must be in (0, %g]", k, max);
    }
    return lua_gettop(L);
}

/* seconds (> 0) as curl's milliseconds: rounded up, never 0 (which
 * curl reads as no limit at all) */
static long
ms_up(double seconds)
{
    double ms = seconds * 1000;
    long v = (long) ms;

    if ((double) v < ms) {
        v++;
    }
    return v < 1 ? 1 : v;
}

static const char *
opt_string(lua_State *L, int t, const char *k)
{
    const char *v;
    size_t      len;

    lua_getfield(L, t, k);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return NULL;
    }
    if (lua_type(L, -1) != LUA_TSTRING) {
        gw_raise(L, "http.request: opts.%s must be a string", k);
    }
    v = lua_tolstring(L, -1, &len);
    /* curl reads it as a C string: a NUL would cut it short (another
     * URL, another file) */
    if (memchr(v, '\0', len) != NULL) {
        gw_raise(L, "http.request: opts.%s has a NUL byte in it", k);
    }
    lua_pop(L, 1);      /* the table anchors it */
    return v;
}

/* Raises unless url (opts.url, a string) parses as a URL the way curl
 * will read it (a NUL in it opt_string refused already). curl refused one with a
 * space or a CR/LF only at the transfer, as kind closed, retryable. The
 * URL itself is not shown: it may hold a password or a token. */
static void
url_check(lua_State *L, const char *url)
{
    CURLU *u;
    CURLUcode rc;

    u = curl_url();
    if (u == NULL) {
        luaL_error(L, "http request: no memory");
    }
    rc = curl_url_set(u, CURLUPART_URL, url, 0);
    curl_url_cleanup(u);
    if (rc != CURLUE_OK) {
        gw_raise(L, "http.request: opts.url is not a valid URL (%s)",
                 curl_url_strerror(rc));
    }
}

/* 1 when name (len bytes) is an HTTP field name: a token (RFC 9110). */
static int
is_token(const char *name, size_t len)
{
    static const char *const tchar = "!#$%&'*+-.^_`|~";

    if (len == 0) {
        return 0;
    }
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = (unsigned char) name[i];

        if (!isalnum(ch) && (ch == '\0' || strchr(tchar, ch) == NULL)) {
            return 0;
        }
    }
    return 1;
}

/* Methods a server may receive twice with the effect of once (RFC 9110):
 * curl may send these again by itself unless opts.resend is false. */
static int
is_idempotent(const char *method)
{
    static const char *const idempotent[] = {
        "GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE", NULL
    };

    for (int i = 0; idempotent[i] != NULL; i++) {
        if (strcmp(method, idempotent[i]) == 0) {
            return 1;
        }
    }
    return 0;
}

/*
 * Adds one client TLS file to an identity's digest: its path, then what
 * it holds (up to ID_FILE_MAX bytes) or why it could not be read (curl
 * fails on it then). A blocking read of a small file on the loop thread,
 * as curl's own of the same files for each new connection. Returns GW_OK,
 * or GW_ERR when the digest failed.
 */
static int
id_add_file(EVP_MD_CTX *md, const char *path)
{
    unsigned char buf[16384];
    struct stat st;
    size_t total = 0;
    ssize_t n;
    int fd, rc = GW_OK;

    if (EVP_DigestUpdate(md, path, strlen(path) + 1) != 1) {
        return GW_ERR;
    }
    fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    if (fd < 0 || fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        if (fd >= 0) {
            close(fd);
        }
        return EVP_DigestUpdate(md, "\0unreadable", 12) == 1
               ? GW_OK : GW_ERR;
    }
    while (total < ID_FILE_MAX
           && (n = read(fd, buf, sizeof(buf))) > 0) {
        if (EVP_DigestUpdate(md, buf, (size_t) n) != 1) {
            rc = GW_ERR;
            break;
        }
        total += (size_t) n;
    }
    close(fd);
    OPENSSL_cleanse(buf, sizeof(buf));  /* it held the key */
    if (rc == GW_OK
        && EVP_DigestUpdate(md, &total, sizeof(total)) != 1) {
        rc = GW_ERR;
    }
    return rc;
}

/*
 * A curl share handle holding TLS sessions and, with connections = 1,
 * connections too (a client identity's pool); NULL when it cannot be made.
 */
static CURLSH *
share_new(int connections)
{
    CURLSH *sh = curl_share_init();

    if (sh != NULL
        && ((connections
             && curl_share_setopt(sh, CURLSHOPT_SHARE,
                                  CURL_LOCK_DATA_CONNECT) != CURLSHE_OK)
            || curl_share_setopt(sh, CURLSHOPT_SHARE,
                                 CURL_LOCK_DATA_SSL_SESSION) != CURLSHE_OK)) {
        curl_share_cleanup(sh);
        sh = NULL;
    }
    return sh;
}

/*
 * The pool of the client identity made of cert's and key's files (key
 * NULL: the key is in cert's file, as curl reads it then), made (and
 * the least recently used idle pools beyond POOL_MAX closed) when new.
 * Returns the pool, its user count not yet raised, or NULL when it could
 * not be made (no memory).
 */
static struct gw_http_pool *
pool_get(const char *cert, const char *key)
{
    unsigned char id[32];
    unsigned int idlen = 0;
    struct gw_http_pool *p, **pp, **lru = NULL;
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    int ok;

    ok = md != NULL && EVP_DigestInit_ex(md, EVP_sha256(), NULL) == 1
         && id_add_file(md, cert) == GW_OK
         && id_add_file(md, key != NULL ? key : cert) == GW_OK
         && EVP_DigestFinal_ex(md, id, &idlen) == 1 && idlen == sizeof(id);
    EVP_MD_CTX_free(md);
    if (!ok) {
        return NULL;
    }
    for (p = pools; p != NULL; p = p->next) {
        if (memcmp(p->id, id, sizeof(id)) == 0) {
            p->used = ++pool_clock;
            return p;
        }
    }
    /* a new identity: first close the oldest idle pools past the limit
     * (all of them: identities in use at once can have taken the count
     * past POOL_MAX, none of them idle to close then) */
    while (npools >= POOL_MAX) {
        lru = NULL;
        for (pp = &pools; *pp != NULL; pp = &(*pp)->next) {
            if ((*pp)->users == 0
                && (lru == NULL || (*pp)->used < (*lru)->used)) {
                lru = pp;
            }
        }
        if (lru == NULL
            || curl_share_cleanup((*lru)->share) != CURLSHE_OK) {
            break;                  /* every one in use: kept for now */
        }
        p = *lru;
        *lru = p->next;
        free(p);
        npools--;
    }
    p = calloc(1, sizeof(*p));
    if (p == NULL || (p->share = share_new(1)) == NULL) {
        free(p);
        return NULL;
    }
    memcpy(p->id, id, sizeof(id));
    p->used = ++pool_clock;
    p->next = pools;
    pools = p;
    npools++;
    return p;
}

/*
 * The TLS session cache of the requests made without a client
 * certificate, made on first use (NULL when it cannot be: then each easy
 * handle keeps its own, as before). libcurl (7.88) keeps TLS sessions per
 * easy handle, and ours live for one request, so without it every new
 * connection to the same host (after the pooled one was closed: idle,
 * reset, a burst) made a full handshake; with it, the next one resumes
 * the session (a ticket). A client identity's pool shares its sessions
 * within the pool only (pool_get). libcurl resumes a session only for a
 * connection of the same host, port and TLS options (CA file included).
 */
static CURLSH *
sessions_share(void)
{
    if (tls_sessions == NULL) {
        tls_sessions = share_new(0);
    }
    return tls_sessions;
}

/*
 * Parses the options of a request (table at index 1) into a new op with
 * its easy handle set up, not yet started. Raises on misuse (after
 * freeing what it made). The caller owns the op.
 *
 * syntax: res, err = paygate.http.request{ url=, method=, headers=, body=,
 *             timeout=, connect_timeout=, ca_file=, client_cert=,
 *             client_key=, client_key_password=, max_body=, resolve=,
 *             resend=, idle_timeout= }
 * timeout: s for the whole request (default 30).
 * connect_timeout: s for the connection phase, CURLOPT_CONNECTTIMEOUT's:
 *          the name's lookup, the TCP connect (every address tried within
 *          it) and the TLS handshake (default 10, within timeout); past it
 *          kind timeout, err.sent false.
 * idle_timeout: s the transfer may move less than a byte a second
 *          (curl's low-speed check, its speed averaged over the last few
 *          seconds: a trickle counts as stalled, and after a burst the
 *          silence is seen a few seconds late) before the request fails
 *          with kind timeout, whatever is left of timeout (a long download
 *          that keeps flowing gets a long timeout, a stalled one still
 *          ends soon). Default: none.
 * resend: whether curl may send the request a second time by itself when
 *          a reused keep-alive connection dies after the request went out
 *          but before any byte of the answer (the server may have acted on
 *          the first copy). Default true for GET, HEAD, PUT, DELETE,
 *          OPTIONS, TRACE; false for POST, PATCH and any other method:
 *          such a request fails with kind closed and err.sent = true.
 * returns: { status, headers (lower-case names), body, time } or nil, err
 *          with err.kind one of timeout, connect, dns, tls, closed,
 *          body_too_large, header_too_large, and err.sent: false when
 *          the failure came before any byte of the request was written
 *          (dns, connect, TLS handshake, a connect timeout), so a retry
 *          cannot repeat it;
 *          true when the server may have received it.
 * yields: until the response has been read, or the request failed.
 */
static struct gw_http_op *
op_setup(lua_State *L, int stream)
{
    struct gw_http_op *op;
    const char *url, *method, *s;
    size_t body_len = 0;
    double timeout, connect_timeout, max_body, idle = 0;
    CURL *e;

    gw_opts_known(L, 1, "http.request", "opts", request_opts);
    url = opt_string(L, 1, "url");
    if (url == NULL || (strncmp(url, "http://", 7) != 0
                        && strncmp(url, "https://", 8) != 0)) {
        gw_raise(L, "http.request: opts.url must be an http:// or https:// "
                 "URL");
        return NULL;
    }
    url_check(L, url);
    method = opt_string(L, 1, "method");
    timeout = lua_tonumber(L, opt_number(L, 1, "timeout", DEFAULT_TIMEOUT,
                                         86400));
    connect_timeout = lua_tonumber(L, opt_number(L, 1, "connect_timeout",
                                                 DEFAULT_CONNECT, 3600));
    lua_getfield(L, 1, "idle_timeout");
    if (!lua_isnil(L, -1)) {
        idle = lua_tonumber(L, opt_number(L, 1, "idle_timeout", 1, 86400));
    }
    lua_pop(L, 1);
    lua_getfield(L, 1, "max_body");
    if (stream && lua_isnil(L, -1)) {
        max_body = -1;              /* streamed: no limit unless given */
    } else {
        max_body = lua_tonumber(L, opt_number(L, 1, "max_body",
                                              DEFAULT_MAX_BODY,
                                              stream ? 1e15 : 1 << 30));
    }
    lua_pop(L, 1);
    /* type errors raise here, before anything is allocated */
    (void) opt_string(L, 1, "ca_file");
    (void) opt_string(L, 1, "client_cert");
    (void) opt_string(L, 1, "client_key");
    (void) opt_string(L, 1, "client_key_password");
    lua_getfield(L, 1, "resolve");
    if (!lua_isnil(L, -1) && !lua_istable(L, -1)) {
        gw_raise(L, "http.request: opts.resolve must be an array of "
                 "strings");
    }
    if (lua_istable(L, -1)) {
        int n = (int) lua_objlen(L, -1);

        for (int i = 1; i <= n; i++) {
            size_t      len;
            const char *v;

            lua_rawgeti(L, -1, i);
            if (lua_type(L, -1) != LUA_TSTRING) {
                gw_raise(L, "http.request: opts.resolve[%d] must be a string"
                         " (host:port:address)", i);
            }
            v = lua_tolstring(L, -1, &len);
            if (memchr(v, '\0', len) != NULL) {
                gw_raise(L, "http.request: opts.resolve[%d] has a NUL byte "
                         "in it", i);
            }
            lua_pop(L, 1);
        }
    }
    lua_pop(L, 1);
    if (multi_init() != GW_OK) {
        luaL_error(L, "http request: cannot initialise libcurl");
        return NULL;
    }
    op = calloc(1, sizeof(*op));
    if (op == NULL || (op->easy = curl_easy_init()) == NULL) {
        free(op);
        luaL_error(L, "http request: no memory");
        return NULL;
    }
    live_ops++;
    op->body_ref = LUA_NOREF;
    op->stream = stream;
    op->max_body = max_body < 0 ? SIZE_MAX : (size_t) max_body;
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
    curl_easy_setopt(e, CURLOPT_OPENSOCKETFUNCTION, open_cb);
    curl_easy_setopt(e, CURLOPT_CLOSESOCKETFUNCTION, close_cb);
    op->tls = strncmp(url, "https://", 8) == 0;
    /* rounded up to whole ms, at least 1: 0 means "no timeout" to curl
     * (a call with 0.4 ms of its deadline left waited for ever) */
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, ms_up(timeout));
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, ms_up(connect_timeout));
    if (idle > 0) {
        /* below 1 byte/s for that many whole seconds: a stall */
        curl_easy_setopt(e, CURLOPT_LOW_SPEED_LIMIT, 1L);
        curl_easy_setopt(e, CURLOPT_LOW_SPEED_TIME,
                         (long) (idle < 1 ? 1 : idle + 0.999));
    }
    curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(e, CURLOPT_SSL_VERIFYPEER, 1L);
    curl_easy_setopt(e, CURLOPT_SSL_VERIFYHOST, 2L);
    curl_easy_setopt(e, CURLOPT_ACCEPT_ENCODING, NULL);
    curl_easy_setopt(e, CURLOPT_TCP_NODELAY, 1L);

    lua_getfield(L, 1, "body");
    if (lua_type(L, -1) == LUA_TSTRING) {
        s = lua_tolstring(L, -1, &body_len);
        op->body_ref = luaL_ref(L, LUA_REGISTRYINDEX);
        op->body = s;
        op->body_len = body_len;
        /* through callbacks, not POSTFIELDS: curl must ask before it
         * sends the body a second time (seek_cb) */
        curl_easy_setopt(e, CURLOPT_POST, 1L);
        curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE,
                         (curl_off_t) body_len);
        curl_easy_setopt(e, CURLOPT_READFUNCTION, read_cb);
        curl_easy_setopt(e, CURLOPT_READDATA, op);
        curl_easy_setopt(e, CURLOPT_SEEKFUNCTION, seek_cb);
        curl_easy_setopt(e, CURLOPT_SEEKDATA, op);
        if (method == NULL) {
            method = "POST";
        }
    } else if (!lua_isnil(L, -1)) {
        op_free(op);
        gw_raise(L, "http.request: opts.body must be a string");
        return NULL;
    } else {
        lua_pop(L, 1);
    }
    if (method != NULL) {
        if (strcmp(method, "GET") == 0 && op->body_ref == LUA_NOREF) {
            curl_easy_setopt(e, CURLOPT_HTTPGET, 1L);
        } else if (strcmp(method, "HEAD") == 0) {
            curl_easy_setopt(e, CURLOPT_NOBODY, 1L);
            op->nobody = 1;
        } else {
            if (strspn(method, "ABCDEFGHIJKLMNOPQRSTUVWXYZ") != strlen(method)
                || method[0] == '\0' || strlen(method) > 16) {
                op_free(op);
                gw_raise(L, "http.request: opts.method must be an HTTP "
                         "method");
                return NULL;
            }
            curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, method);
        }
    }
    op->resend = method == NULL || is_idempotent(method);
    lua_getfield(L, 1, "resend");
    if (lua_isboolean(L, -1)) {
        op->resend = lua_toboolean(L, -1);
    } else if (!lua_isnil(L, -1)) {
        op_free(op);
        gw_raise(L, "http.request: opts.resend must be a boolean");
        return NULL;
    }
    lua_pop(L, 1);

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
                gw_raise(L, "http.request: opts.headers must map names to "
                         "strings");
                return NULL;
            }
            k = lua_tolstring(L, -2, &kl);
            v = lua_tolstring(L, -1, &vl);
            /* a name that is no token, or a value with CR, LF or NUL,
             * would not go out as given: split, cut short at the NUL, or
             * refused by the server (the value is not shown) */
            if (!is_token(k, kl)) {
                op_free(op);
                gw_raise(L, "http.request: opts.headers: a name that is not"
                         " an HTTP field name (a token: no space, colon,"
                         " CR, LF or NUL)");
                return NULL;
            }
            if (memchr(v, '\n', vl) || memchr(v, '\r', vl)
                || memchr(v, '\0', vl)) {
                op_free(op);
                gw_raise(L, "http.request: opts.headers: header %s has CR,"
                         " LF or NUL in its value", k);
                return NULL;
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
        gw_raise(L, "http.request: opts.headers must be a table");
        return NULL;
    }
    lua_pop(L, 1);

    if ((s = opt_string(L, 1, "ca_file")) != NULL) {
        curl_easy_setopt(e, CURLOPT_CAINFO, s);
        curl_easy_setopt(e, CURLOPT_CAPATH, NULL);
    }
    if ((s = opt_string(L, 1, "client_key")) != NULL) {
        curl_easy_setopt(e, CURLOPT_SSLKEY, s);
    }
    if ((s = opt_string(L, 1, "client_cert")) != NULL) {
        const char *key = opt_string(L, 1, "client_key");

        curl_easy_setopt(e, CURLOPT_SSLCERT, s);
        /* connections of this client identity only (gw_http_pool) */
        op->pool = pool_get(s, key);
        if (op->pool != NULL
            && curl_easy_setopt(e, CURLOPT_SHARE, op->pool->share)
               == CURLE_OK) {
            op->pool->users++;
        } else {
            op->pool = NULL;
            /* no pool to keep it apart: a connection of its own */
            curl_easy_setopt(e, CURLOPT_FRESH_CONNECT, 1L);
            curl_easy_setopt(e, CURLOPT_FORBID_REUSE, 1L);
            op->no_reuse = 1;
        }
    } else if (sessions_share() != NULL) {
        curl_easy_setopt(e, CURLOPT_SHARE, tls_sessions);  /* resumed */
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

    return op;
}

/*
 * syntax: res, err = paygate.http.request{ url=, method=, headers=, body=,
 *             timeout=, connect_timeout=, ca_file=, client_cert=,
 *             client_key=, client_key_password=, max_body=, resolve=,
 *             resend=, idle_timeout= }
 * idle_timeout: s the transfer may move less than a byte a second
 *          (curl's low-speed check, its speed averaged over the last few
 *          seconds: a trickle counts as stalled, and after a burst the
 *          silence is seen a few seconds late) before the request fails
 *          with kind timeout, whatever is left of timeout (a long download
 *          that keeps flowing gets a long timeout, a stalled one still
 *          ends soon). Default: none.
 * returns: see above.
 * yields: until the response has been read, or the request failed.
 */
static int
lhttp_request(lua_State *L)
{
    struct gw_co *co = gw_co_current(L);
    struct gw_http_op *op = op_setup(L, 0);

    op->co = co;
    if (curl_multi_add_handle(multi, op->easy) != CURLM_OK) {
        op_free(op);
        return gw_push_error(L, "closed", 1, "http request: cannot start");
    }
    return gw_co_wait(L, op_cancel, op);
}

/* ---- streamed bodies ------------------------------------------------
 *
 * A streamed request is owned by a userdata (LSTREAM_MT) so that the
 * Lua wrapper can run the caller's sink in the calling coroutine between
 * reads. curl's callbacks only buffer (at most STREAM_BUF bytes, then
 * the transfer is paused) and schedule wake_ev; the waiting coroutine is
 * resumed from that event, never from inside curl.
 */

struct gw_http_stream {
    struct gw_http_op *op;          /* owned; NULL once closed */
};

/* Schedules a wake of the waiting coroutine on a later loop turn. */
static void
stream_kick(struct gw_http_op *op)
{
    if (op->co != NULL && op->wake_ev != NULL) {
        event_active(op->wake_ev, EV_TIMEOUT, 1);
    }
}

/* curl finished the transfer (rc) or we aborted it: keep the easy for
 * getinfo, give the connection back to the pool. */
static void
stream_done(struct gw_http_op *op, CURLcode rc)
{
    if (op->done) {
        return;
    }
    op->done = 1;
    op->result = rc;
    curl_easy_getinfo(op->easy, CURLINFO_TOTAL_TIME, &op->time);
    if (op->in_multi) {
        curl_multi_remove_handle(multi, op->easy);
        op->in_multi = 0;
    }
    stream_kick(op);
}

/* Stops the transfer now (the coroutine is gone or closed it). */
static void
stream_abort(struct gw_http_op *op)
{
    op->co = NULL;
    if (!op->done) {
        stream_done(op, CURLE_ABORTED_BY_CALLBACK);
    }
}

static void
stream_cancel(void *arg)
{
    stream_abort(arg);
}

/* The opening coroutine ended without close(): stop the transfer. Its own
 * wait, if any, was cancelled first (op->co is NULL then); a coroutine
 * still waiting is another one, which the stop wakes with the error on a
 * later turn (stream_kick) instead of leaving it waiting for ever. */
static void
stream_cleanup(void *arg)
{
    struct gw_http_op *op = arg;

    if (!op->done) {
        stream_done(op, CURLE_ABORTED_BY_CALLBACK);
    }
}

/*
 * Pushes what the reader waits for, if there is something: for
 * WANT_HEADERS status and headers (or nil, err); for WANT_DATA the next
 * chunk, nil at the end, or nil, err. Returns the number of values, or
 * -1 when the reader must wait.
 */
static int
stream_try(lua_State *L, struct gw_http_op *op, int want)
{
    if (want == WANT_HEADERS) {
        long status = 0;

        /* a head read whole is the answer, though the body then failed
         * (cut off, timed out) before the reader came: s:read() says so;
         * failing here hid a 2xx (or a 4xx) behind a transport error */
        if (op->done && op->result != CURLE_OK && !op->head_done) {
            return push_failure(L, op, op->result);
        }
        if (!op->head_done && !op->done) {
            return -1;
        }
        curl_easy_getinfo(op->easy, CURLINFO_RESPONSE_CODE, &status);
        lua_pushinteger(L, status);
        push_headers(L, op);
        return 2;
    }
    /* what came before a failure is handed over first, then the
     * failure (a refusal's reason cut short is still its reason) */
    if (op->len > 0) {
        lua_pushlstring(L, op->buf, op->len);
        op->len = 0;
        if (op->paused && !op->done) {
            /* may deliver what curl held at once, into the empty buffer */
            op->paused = 0;
            curl_easy_pause(op->easy, CURLPAUSE_CONT);
        }
        return 1;
    }
    if (op->done && op->result != CURLE_OK) {
        return push_failure(L, op, op->result);
    }
    if (op->done) {
        lua_pushnil(L);
        return 1;
    }
    if (op->paused) {
        op->paused = 0;
        curl_easy_pause(op->easy, CURLPAUSE_CONT);
        if (op->len > 0 || op->done) {
            return stream_try(L, op, want);
        }
    }
    return -1;
}

static void
on_stream_wake(evutil_socket_t fd, short what, void *arg)
{
    struct gw_http_op *op = arg;
    struct gw_co *co = op->co;
    int n;

    if (co == NULL) {
        return;
    }
    op->co = NULL;                  /* no kick from inside stream_try */
    n = stream_try(gw_co_state(co), op, op->want);
    if (n < 0) {
        op->co = co;                /* spurious: keep waiting */
        return;
    }
    gw_co_wake(co, n);
}

static struct gw_http_op *
stream_check(lua_State *L, const char *what)
{
    struct gw_http_stream *ud = gw_checkudata(L, 1, LSTREAM_MT);

    if (ud->op == NULL) {
        luaL_error(L, "http stream:%s: the stream is closed", what);
    }
    if (ud->op->co != NULL) {
        luaL_error(L, "http stream:%s: another coroutine waits on it", what);
    }
    return ud->op;
}

static int
stream_wait(lua_State *L, struct gw_http_op *op, int want)
{
    struct gw_co *co = gw_co_current(L);
    int n = stream_try(L, op, want);

    if (n >= 0) {
        return n;
    }
    op->co = co;
    op->want = want;
    return gw_co_wait(L, stream_cancel, op);
}

/*
 * syntax: s = core.stream(opts) -- the options of request; starts it.
 * returns: a stream handle; s:headers(), s:read(), s:time(), s:close().
 * The transfer is aborted if the calling coroutine ends without close().
 */
static int
lstream_open(lua_State *L)
{
    struct gw_co *co = gw_co_current(L);
    struct gw_http_stream *ud;
    struct gw_http_op *op;
    int self;

    ud = lua_newuserdata(L, sizeof(*ud));
    ud->op = NULL;
    luaL_getmetatable(L, LSTREAM_MT);
    lua_setmetatable(L, -2);
    self = lua_gettop(L);
    op = op_setup(L, 1);            /* leaves values on the stack */
    lua_pushvalue(L, self);
    ud->op = op;
    op->wake_ev = event_new(gw_loop_base(), -1, 0, on_stream_wake, op);
    if (op->wake_ev == NULL) {
        return luaL_error(L, "http request: no memory");
    }
    if (curl_multi_add_handle(multi, op->easy) != CURLM_OK) {
        op->done = 1;
        op->result = CURLE_FAILED_INIT;
        return 1;
    }
    op->in_multi = 1;
    op->cleanup.fn = stream_cleanup;
    op->cleanup.arg = op;
    gw_co_cleanup_add(co, &op->cleanup);
    return 1;
}

/* syntax: status, headers = s:headers()  (or nil, err)
 * yields: until the response head has been read. */
static int
lstream_headers(lua_State *L)
{
    return stream_wait(L, stream_check(L, "headers"), WANT_HEADERS);
}

/* syntax: chunk = s:read() -- a string, nil at the end, or nil, err
 * yields: until body bytes arrive or the transfer ends. */
static int
lstream_read(lua_State *L)
{
    return stream_wait(L, stream_check(L, "read"), WANT_DATA);
}

/* syntax: seconds = s:time() -- total time once the stream ended */
static int
lstream_time(lua_State *L)
{
    lua_pushnumber(L, stream_check(L, "time")->time);
    return 1;
}

/* Aborts the transfer if running and frees it; safe to call twice. */
static int
lstream_close(lua_State *L)
{
    struct gw_http_stream *ud = gw_checkudata(L, 1, LSTREAM_MT);

    if (ud->op != NULL) {
        if (ud->op->co != NULL) {
            return luaL_error(L, "http stream:close: another coroutine "
                                 "waits on it");
        }
        op_free(ud->op);
        ud->op = NULL;
    }
    return 0;
}

static int
lstream_gc(lua_State *L)
{
    struct gw_http_stream *ud = gw_testudata(L, 1, LSTREAM_MT);

    if (ud == NULL) {
        return 0;
    }

    if (ud->op != NULL) {
        ud->op->co = NULL;
        op_free(ud->op);
        ud->op = NULL;
    }
    return 0;
}

static const luaL_Reg lstream_methods[] = {
    { "headers", lstream_headers },
    { "read", lstream_read },
    { "time", lstream_time },
    { "close", lstream_close },
    { NULL, NULL }
};

/*
 * http.core.close_idle(): when no request is under way (none made and not
 * yet finished, streams included), closes the connections kept alive for
 * reuse by requests without a client certificate (the multi handle's
 * cache: curl_multi_cleanup, a new multi made by the next request; TLS
 * sessions are kept apart, in tls_sessions, and stay). Their servers see
 * them closed now, and one that drains on a stop need not wait for them.
 * Returns true when it closed them, false when a request was under way
 * (nothing done).
 */
static int
lhttp_close_idle(lua_State *L)
{
    if (live_ops > 0) {
        lua_pushboolean(L, 0);
        return 1;
    }
    if (multi != NULL) {
        curl_multi_cleanup(multi);  /* no easy handle left in it */
        multi = NULL;
    }
    if (multi_timer != NULL) {
        event_free(multi_timer);
        multi_timer = NULL;
    }
    lua_pushboolean(L, 1);
    return 1;
}

static const luaL_Reg lhttp_funcs[] = {
    { "request", lhttp_request },
    { "stream", lstream_open },
    { "close_idle", lhttp_close_idle },
    { NULL, NULL }
};

int
luaopen_paygate_http_core(lua_State *L)
{
    luaL_newmetatable(L, LSTREAM_MT);
    lua_pushcfunction(L, lstream_gc);
    lua_setfield(L, -2, "__gc");
    lua_newtable(L);
    luaL_register(L, NULL, lstream_methods);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
    lua_newtable(L);
    luaL_register(L, NULL, lhttp_funcs);
    return 1;
}
