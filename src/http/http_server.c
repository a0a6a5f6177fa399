/*
 * http_server.c -- the connection and TLS state machine: accept, read,
 * parse, keep-alive, pipelining, timeouts, drain, close. A request's run
 * in Lua is http_request.c's, response writing http_response.c's.
 *
 * A connection reads into one buffer. Requests are parsed in place (no
 * copy) and handled one at a time, in order; the responses of pipelined
 * requests are appended to one output buffer and written together. While
 * a request's coroutine runs or waits, the read event stays added
 * (removing and re-adding it would cost two epoll_ctl calls per request),
 * but nothing is read: if bytes arrive then, conn_on_read() removes the
 * event without reading them, so the parsed head keeps pointing into a
 * buffer that does not move. The request's end goes on with what the
 * buffer holds (pipelined requests) and turns reading back on.
 */
#include <errno.h>
#include <malloc.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <linux/sockios.h>

#include <event2/event.h>
#include <openssl/err.h>
#include <openssl/rand.h>

#include "conn_pool.h"
#include "http_conn.h"
#include "sockaddr.h"
#include "log.h"
#include "loop.h"

#define IN_MIN  4096            /* bytes: first input buffer */
#define IN_FREE (16 * 1024)     /* bytes: an input buffer up to this (a
                                   head of the default header_bytes, a
                                   small body) is outside body_memory */
#define DRAIN_LINGER 1.0        /* s an idle keep-alive connection may
                                   still send one request once the worker
                                   drains (a new one keeps header_timeout) */
#define ACCEPT_BATCH 64         /* plain connections accepted per wakeup */
#define FRESH_GRACE 1.0         /* s a connection that has sent nothing yet
                                   (or handshaken, no request yet) is kept
                                   at the cap: its client's first bytes
                                   may be a round trip away */
#define HEAD_GRACE 1.0          /* s a connection reading its head is kept
                                   at the cap: a client sends a head in
                                   one or two packets, a round trip or
                                   two after its accept (TLS 1.2: two
                                   round trips of handshake first), so
                                   one still at it after a second is
                                   trickling it (see head_victim) */
#define HEAD_RECHECK 0.05       /* s: a head skipped at the cap (its
                                   bytes unread, its answer going out)
                                   is looked at again this much later */
#define ACCEPT_BATCH_TLS 1      /* TLS ones (see on_accept) */
#define LINGER_IDLE 2.0         /* s: a lingering close waits this long
                                   for more of the client's bytes */
#define LINGER_MAX 5.0          /* s: and no longer than this in all */
#define OUT_HIGH (64 * 1024)    /* bytes of unsent output before we stop
                                   answering pipelined requests */

struct gw_http_srv gw_srv;

static void conn_flush(struct gw_conn *c);
static void conn_close(struct gw_conn *c);
static void conn_linger_read(struct gw_conn *c);

void
gw_server_conf_defaults(struct gw_server_conf *c)
{
    c->max_header_bytes = 16 * 1024;
    c->max_body_bytes = 5 * 1024 * 1024;
    c->max_body_memory = 64 * 1024 * 1024;
    c->max_connections = 10000;
    c->header_timeout = 10;
    c->body_timeout = 10;
    c->body_min_rate = 500;
    c->write_timeout = 10;
    c->keepalive_timeout = 75;
    c->keepalive_requests = 10000;
    c->request_timeout = 30;
    c->access_log = 1;
}

int
gw_server_connections(void)
{
    return gw_srv.nconns;
}

int
gw_server_in_flight(void)
{
    return gw_srv.in_flight;
}

/* ---- small helpers --------------------------------------------------- */

static const char *const edge_names[GW_EDGE_NEVENTS] = {
    "reclaimed", "slow_head", "lingered", "full", "resumed", "protocol",
    "cipher",
    "client_cert", "aborted", "timeout", "not_tls", "other"
};

const char *
gw_edge_event_name(int event)
{
    return event >= 0 && event < GW_EDGE_NEVENTS ? edge_names[event] : "?";
}

void
gw_edge_count(int event)
{
    if (gw_srv.conf.on_event != NULL) {
        gw_srv.conf.on_event(event);
    }
}

/* c idles on keep-alive: it joins the idle list's end (newest). A
 * lingering close (ST_LINGER) joins the end of the lingering ones, which
 * come first: its answer is out, so at the cap the oldest of them is
 * the first to go for a new client. */
static void
idle_enter(struct gw_conn *c)
{
    if (c->idle) {
        return;
    }
    c->idle = 1;
    c->idle_at = gw_loop_mono();
    if (c->state == ST_LINGER) {
        struct gw_conn *after = gw_srv.linger_last;

        c->iprev = after;
        c->inext = after != NULL ? after->inext : gw_srv.idle_head;
        if (c->inext != NULL) {
            c->inext->iprev = c;
        } else {
            gw_srv.idle_tail = c;
        }
        if (after != NULL) {
            after->inext = c;
        } else {
            gw_srv.idle_head = c;
        }
        gw_srv.linger_last = c;
    } else {
        c->inext = NULL;
        c->iprev = gw_srv.idle_tail;
        if (gw_srv.idle_tail != NULL) {
            gw_srv.idle_tail->inext = c;
        } else {
            gw_srv.idle_head = c;
        }
        gw_srv.idle_tail = c;
    }
    /* accepting paused at the cap: a client may wait in the backlog, and
     * on_accept() can now admit it by closing an idle connection */
    if (!gw_srv.accepting && !gw_srv.draining && gw_srv.lev != NULL
        && gw_srv.nconns >= gw_srv.conf.max_connections) {
        event_add(gw_srv.lev, NULL);
        gw_srv.accepting = 1;
    }
}

static void
idle_leave(struct gw_conn *c)
{
    if (!c->idle) {
        return;
    }
    if (c == gw_srv.linger_last) {
        gw_srv.linger_last = c->iprev;  /* lingering too, or NULL */
    }
    if (c->iprev != NULL) {
        c->iprev->inext = c->inext;
    } else {
        gw_srv.idle_head = c->inext;
    }
    if (c->inext != NULL) {
        c->inext->iprev = c->iprev;
    } else {
        gw_srv.idle_tail = c->iprev;
    }
    c->iprev = c->inext = NULL;
    c->idle = 0;
}

/* secs as a timer's delay: at least 1 ms */
static struct timeval
delay_tv(double secs)
{
    struct timeval tv;

    if (secs <= 0) {
        secs = 0.001;
    }
    tv.tv_sec = (time_t) secs;
    tv.tv_usec = (suseconds_t) ((secs - (double) tv.tv_sec) * 1e6);
    return tv;
}

/* c begins reading a head (a new connection at its accept, a later
 * request at its first byte): it joins the heads list's end (newest).
 * Nothing if it is on it already: the head's time runs on. */
static void
head_enter(struct gw_conn *c)
{
    if (c->head_at > 0) {
        return;
    }
    c->head_at = gw_loop_mono();
    c->rnext = NULL;
    c->rprev = gw_srv.heads_tail;
    if (gw_srv.heads_tail != NULL) {
        gw_srv.heads_tail->rnext = c;
    } else {
        gw_srv.heads_head = c;
    }
    gw_srv.heads_tail = c;
    /* accepting paused at the cap with no victim to come: this head may
     * be one in HEAD_GRACE s (on_resume tells); a resume already set is
     * due sooner (every grace is HEAD_GRACE or FRESH_GRACE) */
    if (!gw_srv.accepting && !gw_srv.draining && gw_srv.lev != NULL
        && gw_srv.resume_ev != NULL
        && gw_srv.nconns >= gw_srv.conf.max_connections
        && !evtimer_pending(gw_srv.resume_ev, NULL)) {
        struct timeval tv = delay_tv(HEAD_GRACE + 0.001);

        evtimer_add(gw_srv.resume_ev, &tv);
    }
}

/* c's head is parsed (or refused, or c closes): it leaves the list. */
static void
head_leave(struct gw_conn *c)
{
    if (c->head_at == 0) {
        return;
    }
    if (c->rprev != NULL) {
        c->rprev->rnext = c->rnext;
    } else {
        gw_srv.heads_head = c->rnext;
    }
    if (c->rnext != NULL) {
        c->rnext->rprev = c->rprev;
    } else {
        gw_srv.heads_tail = c->rprev;
    }
    c->rprev = c->rnext = NULL;
    c->head_at = 0;
}

/* A TLS connection that has received a byte of its handshake (OpenSSL's
 * state stays "before" until a whole ClientHello is in, which may take
 * several records). */
static int
tls_started(struct gw_conn *c)
{
    return c->ssl != NULL && !c->handshaken
           && (SSL_get_state(c->ssl) != TLS_ST_BEFORE
               || BIO_number_read(SSL_get_rbio(c->ssl)) > 0);
}

/* At the connection cap: the oldest lingering close whose answer the
 * client has acknowledged (nothing left in the send queue but our FIN:
 * what the client still sends is dropped anyway), else the oldest idle
 * connection that is truly idle (nothing to send, no byte of a request
 * waiting in the socket or in TLS), which on_accept() closes once it has
 * a new client to admit in its place, so the new client is served at
 * once instead of waiting out keepalive_timeout or header_timeout
 * ("reusing connections"). Idle: a keep-alive connection between
 * requests, and a new one that has sent nothing yet (on TLS: no byte of
 * its handshake, or handshaken and no byte of its first request), as
 * nginx counts them; otherwise clients that connect and stay silent
 * would lock everyone out for header_timeout. A new one only once it has
 * been silent FRESH_GRACE s: the client of a connection just accepted (or
 * just handshaken) may be sending its first bytes, and closing it would
 * throw away the handshake it paid for and fail a request it will not
 * retry. A connection in a request, or in the middle of its handshake,
 * is never on the list. NULL when there is none; *next (if not NULL) is
 * then the time (mono) a new one becomes eligible, or 0. */
static struct gw_conn *
idle_victim(double *next)
{
    double now = gw_loop_mono();

    if (next != NULL) {
        *next = 0;
    }
    for (struct gw_conn *c = gw_srv.idle_head; c != NULL; c = c->inext) {
        char b;

        if (c->state == ST_LINGER) {
            int queued = 1;

            /* 1: the FIN alone (its ACK may be delayed) */
            if (ioctl(c->fd, SIOCOUTQ, &queued) == 0 && queued <= 1) {
                return c;
            }
            continue;           /* its answer may still be in flight */
        }
        if (c->state != ST_HEAD || c->in_len != 0 || c->out_len != 0
            || (c->ssl != NULL && SSL_has_pending(c->ssl)) || tls_started(c)
            || recv(c->fd, &b, 1, MSG_PEEK | MSG_DONTWAIT) > 0) {
            continue;           /* a request is on its way */
        }
        if (c->requests == 0 && now - c->idle_at < FRESH_GRACE) {
            if (next != NULL && (*next == 0
                                 || c->idle_at + FRESH_GRACE < *next)) {
                *next = c->idle_at + FRESH_GRACE;
            }
            continue;           /* just accepted or handshaken */
        }
        return c;
    }
    return NULL;
}

/* At the connection cap with no idle connection to close: the one that
 * has been reading its head longest, once HEAD_GRACE s at it (a new one
 * counted from its accept, its TLS handshake included, as
 * header_timeout is; a later head from its first byte), which
 * on_accept() closes to admit a new client in its place. A genuine
 * client sends its head in one or two packets, milliseconds apart; one
 * still reading its head after a second is trickling it, and clients
 * that each trickle a head (a few bytes every second or two) at the cap
 * held every place until header_timeout, then reconnected: everyone
 * else was refused. A connection whose head is parsed (its body
 * arriving, which body_min_rate bounds; its handler running) is never
 * on the list, and one with an answer still going out is skipped, as is
 * one whose next bytes wait unread in the socket (or in TLS): the
 * worker fell behind (its loop held by a long step, a starved CPU), not
 * the client, whose whole head may be there (it would be closed with
 * nothing read, no answer and no line). NULL when there is none; *next
 * (if not NULL) is then the time (mono) the oldest becomes one (a
 * skipped one is looked at again HEAD_RECHECK s later), or 0. */
static struct gw_conn *
head_victim(double *next)
{
    double now = gw_loop_mono(), soon = 0;

    if (next != NULL) {
        *next = 0;
    }
    for (struct gw_conn *c = gw_srv.heads_head; c != NULL; c = c->rnext) {
        char b;

        if (now - c->head_at < HEAD_GRACE) {
            if (soon == 0 || c->head_at + HEAD_GRACE < soon) {
                soon = c->head_at + HEAD_GRACE;
            }
            break;              /* the rest are younger still */
        }
        if (c->state != ST_HEAD || c->out_len != c->out_sent
            || (c->ssl != NULL && SSL_has_pending(c->ssl))
            || recv(c->fd, &b, 1, MSG_PEEK | MSG_DONTWAIT) > 0) {
            soon = now + HEAD_RECHECK;
            continue;
        }
        return c;
    }
    if (next != NULL) {
        *next = soon;
    }
    return NULL;
}

/* The one to close at the cap for a new client, idle connections first
 * (idle_victim), a head (head_victim) only when no connection is idle: a
 * silent new one still in its FRESH_GRACE is idle too, and its grace is
 * waited for (at most that second) rather than a head taken (a head
 * begun a few milliseconds before it, a TLS handshake under way, reached
 * its own HEAD_GRACE first and went in its place). *kind is its count
 * (gw_edge_event). NULL when there is none; *next (if not NULL) is then
 * when one may be, or 0. */
static struct gw_conn *
cap_victim(double *next, int *kind)
{
    double fresh = 0;
    struct gw_conn *c = idle_victim(&fresh);

    *kind = GW_EDGE_RECLAIMED;
    if (c == NULL && fresh == 0) {
        c = head_victim(next);
        *kind = GW_EDGE_RECLAIMED_HEAD;
    } else if (next != NULL) {
        *next = fresh;
    }
    return c;
}

/* (Re)arms c's one timer: secs from now (at least 1 ms). */
void
gw_conn_timer(struct gw_conn *c, double secs)
{
    struct timeval tv = delay_tv(secs);

    evtimer_add(c->timer, &tv);
}

/* Arms c's timer for the phase's deadline (head, body, keep-alive) secs
 * from now; while an answer drains, for write_by instead: the phase's
 * deadline waits until the answer is out (conn_flush arms it then). */
static void
conn_timer_io(struct gw_conn *c, double secs)
{
    if (c->want_write) {
        secs = c->write_by - gw_loop_mono();
    }
    gw_conn_timer(c, secs);
}

/* When the current head's header_timeout began: its first byte, but for
 * a connection's first request its accept (a client that waits before
 * sending must not get the time twice). */
static double
head_since(const struct gw_conn *c)
{
    return c->requests == 0 && c->accepted > 0 ? c->accepted : c->started;
}

/* How long c's body may wait for its next bytes, got bytes of it in:
 * body_timeout of silence, and no later than body_timeout + got /
 * body_min_rate from its start. Without the second, a client sending a
 * byte now and then kept its connection (and the body's buffer) for as
 * long as it liked, out of reach of every timeout and of the cap's idle
 * reclaim. */
static double
body_wait(const struct gw_conn *c, size_t got)
{
    double secs = gw_srv.conf.body_timeout;

    if (gw_srv.conf.body_min_rate > 0) {
        double left = c->body_at + gw_srv.conf.body_timeout
                      + (double) got / gw_srv.conf.body_min_rate
                      - gw_loop_mono();

        if (left < secs) {
            secs = left;
        }
    }
    return secs;
}

/* The body bytes c has received so far (chunked: with their framing). */
static size_t
body_got(const struct gw_conn *c)
{
    return c->head.chunked ? c->chunk.in : c->in_len - c->body_off;
}

/* The phase's deadline again, once an answer has drained. */
static void
conn_timer_phase(struct gw_conn *c)
{
    if (c->state == ST_BODY) {
        gw_conn_timer(c, body_wait(c, body_got(c)));
    } else if (c->state == ST_HEAD && c->in_len > 0 && c->started > 0) {
        gw_conn_timer(c, gw_srv.conf.header_timeout
                      - (gw_loop_mono() - head_since(c)));
    } else if (c->state == ST_HEAD && c->part_at > 0) {
        gw_conn_timer(c, gw_srv.conf.header_timeout
                      - (gw_loop_mono() - c->part_at));
    } else if (c->state == ST_HEAD && c->requests > 0) {
        gw_conn_timer(c, gw_srv.conf.keepalive_timeout);
    }
}

/* Adds (on) or removes c's read event, once. */
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

/* ---- a connection's memory ------------------------------------------ */

/* What an input buffer of cap bytes counts against limits.body_memory. */
static size_t
in_big(size_t cap)
{
    return cap > IN_FREE ? cap : 0;
}

/* A connection and its read and timer events are one block: from the
 * pool (conn_pool.c) while it has room, else from malloc. The write event
 * is malloc'ed when first needed: most connections never fill a socket
 * buffer. */
#define CONN_ALIGN(n)   (((n) + 15) & ~(size_t) 15)
#define CONN_HEAD       CONN_ALIGN(sizeof(struct gw_conn))
#define CONN_EV(c, k)   ((struct event *) ((char *) (c) + CONN_HEAD \
                                           + (size_t) (k) * conn_ev_size))
enum { CONN_EV_READ, CONN_EV_TIMER, CONN_NEV };

static size_t conn_ev_size;     /* event_get_struct_event_size(), aligned */

static size_t
conn_block_size(void)
{
    if (conn_ev_size == 0) {
        conn_ev_size = CONN_ALIGN(event_get_struct_event_size());
    }
    return CONN_HEAD + CONN_NEV * conn_ev_size;
}

static struct gw_conn *
conn_alloc(void)
{
    struct gw_conn *c = gw_conn_pool_get();

    if (c == NULL) {
        c = calloc(1, conn_block_size());
    }
    if (c != NULL && gw_conn_pool_inuse() > (unsigned) gw_srv.trim_peak) {
        gw_srv.trim_peak = (int) gw_conn_pool_inuse();
    }
    return c;
}

#define TRIM_AFTER      5       /* s after the fall before memory is given
                                   back (a storm may come back at once) */
#define TRIM_MIN_PEAK   64      /* connections: below, nothing to gain */

/* Gives back the pool's free pages and the heap's free memory (buffers)
 * once connections fell to half their peak since the last time. */
static void
on_trim(evutil_socket_t fd, short what, void *arg)
{
    size_t released;

    (void) fd;
    (void) what;
    (void) arg;
    released = gw_conn_pool_trim();
    malloc_trim(0);
    gw_log(GW_LOG_DEBUG, "connections: %d open (peak %d); %zu kB of "
           "connection slots given back", gw_srv.nconns, gw_srv.trim_peak,
           released / 1024);
    gw_srv.trim_peak = (int) gw_conn_pool_inuse();
}

static void
conn_free(struct gw_conn *c)
{
    if (gw_conn_pool_owns(c)) {
        gw_conn_pool_put(c);
    } else {
        free(c);
    }
    if (gw_srv.trim_ev != NULL && gw_srv.trim_peak >= TRIM_MIN_PEAK
        && gw_conn_pool_inuse() <= (unsigned) gw_srv.trim_peak / 2
        && !evtimer_pending(gw_srv.trim_ev, NULL)) {
        struct timeval tv = { TRIM_AFTER, 0 };

        evtimer_add(gw_srv.trim_ev, &tv);
    }
}

/* ---- the connection state machine ----------------------------------- */

/* c is between requests, its output sent: gives back its buffers (they
 * are allocated again when bytes arrive), so an idle keep-alive
 * connection costs its struct and events only (TLS: OpenSSL frees its
 * own buffers too, SSL_MODE_RELEASE_BUFFERS). */
static void
conn_release(struct gw_conn *c)
{
    gw_srv.in_big -= in_big(c->in_cap);
    free(c->in);
    c->in = NULL;
    c->in_cap = c->in_len = c->req_start = c->scanned = 0;
    free(c->out);
    c->out = NULL;
    c->out_cap = 0;
    free(c->hdrs);
    c->hdrs = NULL;
    c->hdrs_cap = 0;
    c->head.headers = NULL;
    c->head.max_headers = 0;
}

/* The parsed head points into c->in: when its bytes move from `from` to
 * `to`, its pointers must move too. */
static void
head_rebase(struct gw_http_head *h, const char *from, const char *to)
{
    h->method = to + (h->method - from);
    h->target = to + (h->target - from);
    if (!h->path_outside) {
        h->path = to + (h->path - from);
    }
    if (h->query != NULL) {
        h->query = to + (h->query - from);
    }
    for (size_t i = 0; i < h->nheaders; i++) {
        h->headers[i].name = to + (h->headers[i].name - from);
        h->headers[i].value = to + (h->headers[i].value - from);
    }
}

/* A request that cannot be served (malformed, over a limit, too slow):
 * answers it with msg and closes after. It reaches no handler, so it has
 * no id nor route; the hook counts it with its method when its head was
 * read that far (c->head.method_len), else with method "-". */
static void
conn_bad(struct gw_conn *c, int status, const char *kind, const char *msg)
{
    const char *method = c->head.method_len > 0 ? c->head.method : "-";
    size_t method_len = c->head.method_len > 0 ? c->head.method_len : 1;

    c->request_id[0] = '\0';
    c->head.keep_alive = 0;
    c->close_after = 1;
    gw_resp_error(c, status, kind, msg);
    if (gw_srv.conf.on_request != NULL) {
        gw_srv.conf.on_request(method, method_len, NULL, 0, status, 0);
    }
    /* its access line, as a request that reached a handler has: else a
     * client refused here (a smuggling head, a body over the limit, a
     * slow head) left nothing in the log to find it by. The message its
     * answer carries says why. Its method when known (a head refused
     * unread has none; gw_conn_advance cleared the previous request's),
     * no path: a head refused in its request line may have half of one */
    if (gw_srv.conf.access_log && gw_log_min <= GW_LOG_INFO) {
        /* the method (<= 20 bytes) quoted takes 6 bytes per byte at worst
         * (\u00XX); msg is one of this file's short phrases */
        char fields[512];
        size_t n = 1, q = 1;

        fields[0] = '{';
        if (c->head.method_len > 0) {
            memcpy(fields + n, "\"method\":", 9);
            n += 9;
            q = gw_json_quote(fields + n, sizeof(fields) - n,
                              c->head.method, c->head.method_len);
            n += q;
            fields[n++] = ',';
        }
        n += (size_t) snprintf(fields + n, sizeof(fields) - n,
                               "\"status\":%d,\"error\":\"%s\",\"message\":",
                               status, kind);
        if (q > 0 && n < sizeof(fields)) {
            q = gw_json_quote(fields + n, sizeof(fields) - n, msg,
                              strlen(msg));
            n += q;
        }
        if (q > 0 && n < sizeof(fields)) {
            n += (size_t) snprintf(fields + n, sizeof(fields) - n,
                                   ",\"remote\":\"%s\"}", c->peer);
        }
        if (q > 0 && n < sizeof(fields)) {
            gw_log_line(GW_LOG_INFO, NULL, "access", 6, fields, n);
        }
    }
    head_leave(c);
    c->state = ST_CLOSING;
}

/* The head's field array holds at least n entries. GW_OK or GW_ERR. */
static int
conn_hdrs(struct gw_conn *c, size_t n)
{
    struct gw_http_header *p;
    size_t cap = c->hdrs_cap ? c->hdrs_cap : 16;

    if (n <= c->hdrs_cap) {
        return GW_OK;
    }
    while (cap < n) {
        cap *= 2;
    }
    p = realloc(c->hdrs, cap * sizeof(*p));
    if (p == NULL) {
        return GW_ERR;
    }
    c->hdrs = p;
    c->hdrs_cap = cap;
    return GW_OK;
}

/* Before a refusal of a head not parsed (over the limit, not received in
 * time): its method, when its request line names one whole, so that the
 * refusal is counted and logged under it as a parsed head's is (it was
 * counted "-"/OTHER). The pointers are into c->in and are read by
 * conn_bad at once. */
static void
conn_name_method(struct gw_conn *c, size_t avail)
{
    size_t at = 0, m = gw_http_method_of(c->in + c->req_start, avail, &at);

    if (m > 0) {
        c->head.method = c->in + c->req_start + at;
        c->head.method_len = m;
    }
}

/* A refusal for a limit of the config, saying the limit and its key (a
 * client sending 6 MiB could not tell what it may send instead): "request
 * body exceeds the limit of 5242880 bytes (limits.body_bytes)". */
static void
conn_bad_limit(struct gw_conn *c, int status, const char *kind,
               const char *what, size_t limit, const char *key)
{
    char msg[128];

    snprintf(msg, sizeof(msg), "%s exceeds the limit of %zu bytes"
             " (limits.%s)", what, limit, key);
    conn_bad(c, status, kind, msg);
}

/* Whether c's request cannot go on: its input buffer is full and may not
 * grow, other connections holding limits.body_memory (conn_read). */
static int
conn_starved(const struct gw_conn *c)
{
    return c->in_starved && c->in_len == c->in_cap;
}

/* 503 for a request conn_starved() stops; the connection closes
 * lingering, so the answer reaches a client still sending. */
static void
conn_busy(struct gw_conn *c)
{
    conn_bad_limit(c, 503, "unavailable",
                   "memory for request bodies being received",
                   gw_srv.conf.max_body_memory, "body_memory");
}

/* A head too large: 414 when its request line alone does not fit. */
static void
conn_too_large(struct gw_conn *c, size_t avail)
{
    size_t n = avail < gw_srv.conf.max_header_bytes
               ? avail : gw_srv.conf.max_header_bytes;
    const char *p = c->in + c->req_start;

    while (n >= 2 && p[0] == '\r' && p[1] == '\n') {
        p += 2;             /* empty lines before the request line */
        n -= 2;
    }
    conn_name_method(c, avail);
    if (memchr(p, '\n', n) == NULL) {
        conn_bad_limit(c, 414, "uri_too_long", "request line",
                       gw_srv.conf.max_header_bytes, "header_bytes");
    } else {
        conn_bad_limit(c, 431, "header_too_large", "request head",
                       gw_srv.conf.max_header_bytes, "header_bytes");
    }
}

/* A head refused with status rc, by the parse of a whole head or early
 * (c->head holds what either found: its refusal, its method), answered
 * with its reason, the same however its bytes were split. */
static void
conn_refuse_head(struct gw_conn *c, int rc)
{
    const char *msg = c->head.refusal;

    if (msg == NULL) {
        msg = rc == 431 ? "too many header fields" : rc == 503
              ? "no memory" : "malformed request head";
    }
    conn_bad(c, rc, rc == 400 ? "bad_request" : rc == 503 ? "unavailable"
             : rc == 431 ? "header_too_large" : "unsupported", msg);
}

/* Parses the head of `end` bytes at req_start; resolves the path's
 * dot-segments. 0 or the status to refuse it with. */
static int
conn_parse(struct gw_conn *c, size_t end)
{
    const char *buf = c->in + c->req_start;
    struct gw_http_head *h = &c->head;
    size_t n;
    int rc;

    if (conn_hdrs(c, gw_http_count_fields(buf, end)) != GW_OK) {
        return 503;
    }
    h->headers = c->hdrs;
    h->max_headers = c->hdrs_cap;
    rc = gw_http_parse_head(buf, end, h);
    if (rc != 0 || h->path_len == 0 || h->path[0] != '/'
        || !gw_http_path_has_dots(h->path, h->path_len)) {
        return rc;
    }
    free(c->rpath);
    c->rpath = malloc(h->path_len + 1);
    if (c->rpath == NULL) {
        return 503;
    }
    if (gw_http_path_resolve(h->path, h->path_len, c->rpath, &n) != 0) {
        h->refusal = "path climbs above the root";
        return 400;
    }
    h->path = c->rpath;
    h->path_len = n;
    h->path_outside = 1;
    return 0;
}

void
gw_conn_advance(struct gw_conn *c)
{
    if (c->state == ST_HANDLE) {
        c->req_start = c->body_off + (c->head.chunked ? c->chunk.in
                                                      : c->body_len);
        c->state = c->close_after ? ST_CLOSING : ST_HEAD;
        c->scanned = 0;
    }
    /* its pointers go stale as the buffer moves: clear them (and the
     * counts that bound them), so an answer made before the next head is
     * parsed (conn_bad) reads no stale method */
    memset(&c->head, 0, offsetof(struct gw_http_head, headers));
    free(c->rpath);
    c->rpath = NULL;
}

void
gw_conn_process(struct gw_conn *c)
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
            size_t end, from = c->scanned;
            int rc;

            if (avail == 0) {
                c->req_start = c->in_len = c->scanned = 0;
                break;
            }
            end = gw_http_head_end(c->in + c->req_start, avail, &c->scanned);
            if (end == 0) {
                /* refuse at once what cannot become a request (a bare
                 * LF, a TLS ClientHello), not after header_timeout */
                rc = gw_http_head_early(c->in + c->req_start, avail,
                                        from > 0 ? from - 1 : 0, &c->head);
                if (rc != 0) {
                    conn_refuse_head(c, rc);
                    continue;
                }
                if (avail > gw_srv.conf.max_header_bytes) {
                    conn_too_large(c, avail);
                    continue;
                }
                if (conn_starved(c)) {
                    conn_name_method(c, avail);
                    conn_busy(c);
                    continue;
                }
                break;
            }
            if (end > gw_srv.conf.max_header_bytes) {
                conn_too_large(c, end);
                continue;
            }
            rc = conn_parse(c, end);
            if (rc != 0) {
                conn_refuse_head(c, rc);
                continue;
            }
            c->head_len = end;
            c->body_off = c->req_start + end;
            c->body_len = 0;
            memset(&c->chunk, 0, sizeof(c->chunk));
            if (c->head.content_length > (int64_t) gw_srv.conf.max_body_bytes) {
                conn_bad_limit(c, 413, "body_too_large", "request body",
                               gw_srv.conf.max_body_bytes, "body_bytes");
                continue;
            }
            head_leave(c);
            c->state = ST_BODY;
            c->body_at = gw_loop_mono();
            if (c->head.expect_continue && c->head.minor == 1
                && c->in_len - c->body_off == 0
                && (c->head.content_length > 0 || c->head.chunked)) {
                gw_resp_continue(c);
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
                if (c->chunk.out > gw_srv.conf.max_body_bytes
                    || c->chunk.in >= gw_srv.conf.max_body_bytes + 64 * 1024) {
                    conn_bad_limit(c, 413, "body_too_large", "request body",
                                   gw_srv.conf.max_body_bytes,
                                   "body_bytes");
                    continue;
                }
                if (rc == 0) {
                    if (conn_starved(c)) {
                        conn_busy(c);
                        continue;
                    }
                    conn_timer_io(c, body_wait(c, c->chunk.in));
                    break;
                }
                c->body_len = c->chunk.out;
            } else {
                size_t need = c->head.content_length > 0
                              ? (size_t) c->head.content_length : 0;
                if (have < need) {
                    if (conn_starved(c)) {
                        conn_busy(c);
                        continue;
                    }
                    conn_timer_io(c, body_wait(c, have));
                    break;
                }
                c->body_len = need;
            }
            gw_req_start(c);
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
        if (c->in_len == 0 && c->requests > 0 && c->ssl != NULL
            && SSL_has_pending(c->ssl)) {
            /* part of a TLS record after a keep-alive request: a head
             * is on its way, with header_timeout from its first bytes,
             * not the idle keep-alive's (nor reclaimable as idle: a
             * client sending three bytes would hold its slot for
             * keepalive_timeout) */
            if (c->part_at == 0) {
                c->part_at = gw_loop_mono();
            }
            idle_leave(c);
            head_enter(c);
            conn_timer_io(c, gw_srv.conf.header_timeout
                          - (gw_loop_mono() - c->part_at));
        } else if (c->in_len == 0 && c->requests > 0) {
            c->part_at = 0;
            head_leave(c);      /* between requests: idle, not reading */
            conn_timer_io(c, gw_srv.draining && DRAIN_LINGER
                          < gw_srv.conf.keepalive_timeout
                          ? DRAIN_LINGER : gw_srv.conf.keepalive_timeout);
            idle_enter(c);
        } else if (c->in_len == 0) {
            /* a new connection (or a TLS handshake under way) has the
             * head's time from its accept, not the idle keep-alive's;
             * handshaken, with no byte of its first request, it can be
             * reclaimed at the cap (idle_victim) */
            conn_timer_io(c, gw_srv.conf.header_timeout
                          - (gw_loop_mono() - c->started));
            if (c->ssl == NULL || c->handshaken) {
                idle_enter(c);
            }
        } else if (c->started == 0) {
            c->started = gw_loop_mono();
        }
        if (c->in_len > 0) {
            conn_timer_io(c, gw_srv.conf.header_timeout
                          - (gw_loop_mono() - head_since(c)));
            head_enter(c);      /* a head begun (a new connection's has
                                   been on the list since its accept) */
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
    }
    /* ST_CLOSING: reading stays as it was: bytes that arrive while the
     * answer is sent make conn_on_read() turn it off and set c->unread,
     * so that the close drains them */
    conn_flush(c);
}

static void conn_on_write(evutil_socket_t fd, short what, void *arg);

/* Adds c's write event, made on first need (most connections never fill
 * a socket buffer: ~150 bytes saved on each). GW_OK or GW_ERR. */
static int
conn_wev_add(struct gw_conn *c)
{
    if (c->wev == NULL) {
        c->wev = event_new(gw_loop_base(), c->fd, EV_WRITE | EV_PERSIST,
                           conn_on_write, c);
        if (c->wev == NULL) {
            return GW_ERR;
        }
    }
    return event_add(c->wev, NULL) == 0 ? GW_OK : GW_ERR;
}

/* Why a handshake failed (gw_edge_event), from OpenSSL's error. */
static int
tls_fail_reason(int e, unsigned long err)
{
    if (err == 0) {
        return e == SSL_ERROR_SYSCALL || e == SSL_ERROR_ZERO_RETURN
               ? GW_EDGE_TLS_FAIL_ABORTED : GW_EDGE_TLS_FAIL_OTHER;
    }
    switch (ERR_GET_REASON(err)) {
    case SSL_R_UNSUPPORTED_PROTOCOL:
    case SSL_R_VERSION_TOO_LOW:
    case SSL_R_VERSION_TOO_HIGH:
    case SSL_R_NO_PROTOCOLS_AVAILABLE:
    case SSL_R_TLSV1_ALERT_PROTOCOL_VERSION:
        return GW_EDGE_TLS_FAIL_PROTOCOL;
    case SSL_R_NO_SHARED_CIPHER:
    case SSL_R_NO_SHARED_GROUPS:
    case SSL_R_NO_SUITABLE_SIGNATURE_ALGORITHM:
    case SSL_R_NO_SHARED_SIGNATURE_ALGORITHMS:
    case SSL_R_NO_CIPHERS_AVAILABLE:
        return GW_EDGE_TLS_FAIL_CIPHER;
    case SSL_R_PEER_DID_NOT_RETURN_A_CERTIFICATE:
    case SSL_R_CERTIFICATE_VERIFY_FAILED:
    case SSL_R_NO_CERTIFICATES_RETURNED:
        return GW_EDGE_TLS_FAIL_CERT;
    case SSL_R_HTTP_REQUEST:
    case SSL_R_HTTPS_PROXY_REQUEST:
    case SSL_R_WRONG_VERSION_NUMBER:
    case SSL_R_PACKET_LENGTH_TOO_LONG:
    case SSL_R_RECORD_LENGTH_MISMATCH:
        return GW_EDGE_TLS_FAIL_NOT_TLS;
    case SSL_R_UNEXPECTED_EOF_WHILE_READING:
        return GW_EDGE_TLS_FAIL_ABORTED;
    default:
        return GW_EDGE_TLS_FAIL_OTHER;
    }
}

/* A handshake that did not complete: counted by reason, one debug line
 * (a client that hangs up mid-handshake is no news worth a line each). */
static void
tls_failed(struct gw_conn *c, int reason, unsigned long err)
{
    char buf[256] = "";

    gw_edge_count(reason);
    if (gw_log_min > GW_LOG_DEBUG) {
        return;                 /* a flood of them formats nothing */
    }
    if (err != 0) {
        ERR_error_string_n(err, buf, sizeof(buf));
    }
    gw_log(GW_LOG_DEBUG, "tls handshake from %s failed (%s)%s%s", c->peer,
           gw_edge_event_name(reason), buf[0] ? ": " : "", buf);
}

static void conn_linger(struct gw_conn *c);

#define PLAIN_HTTP_BODY "The plain HTTP request was sent to an HTTPS port: " \
                        "use https://\n"

/* Plain HTTP on the TLS port (a client or a health check configured
 * without TLS, curl http:// to it): OpenSSL has refused its first bytes.
 * Answered in plain text, as nginx does, rather than by a close the
 * client reports as "Empty reply from server"; then closed as a refused
 * upload is (conn_linger): what the client still sends is read and
 * dropped, so that no reset destroys the answer. The answer is a few
 * bytes into an empty socket buffer: one send() takes it. */
static void
plain_http_refuse(struct gw_conn *c)
{
    static const char answer[] =
        "HTTP/1.1 400 Bad Request\r\n"
        "Content-Type: text/plain\r\n"
        "Content-Length: %zu\r\n"
        "Connection: close\r\n"
        "\r\n"
        "%s";
    char buf[256];
    int  n = snprintf(buf, sizeof(buf), answer, sizeof(PLAIN_HTTP_BODY) - 1,
                      PLAIN_HTTP_BODY);

    if (n < 0 || (size_t) n >= sizeof(buf)
        || send(c->fd, buf, (size_t) n, MSG_NOSIGNAL) != n) {
        conn_close(c);
        return;
    }
    idle_leave(c);              /* (a new connection is on the idle list) */
    conn_linger(c);
}

/* Drives c's handshake: 1 done (counted full or resumed), 0 under way,
 * -1 failed (c closed, or lingering after a plain HTTP answer). */
static int
conn_handshake(struct gw_conn *c)
{
    int first = SSL_get_state(c->ssl) == TLS_ST_BEFORE;
    int r = SSL_do_handshake(c->ssl), e, reason;
    unsigned long err;

    if (c->idle && tls_started(c)) {
        idle_leave(c);          /* under way: not reclaimed at the cap */
    }
    if (r == 1) {
        c->handshaken = 1;
        gw_edge_count(SSL_session_reused(c->ssl) ? GW_EDGE_TLS_RESUMED
                                                 : GW_EDGE_TLS_FULL);
        return 1;
    }
    e = SSL_get_error(c->ssl, r);
    if (e == SSL_ERROR_WANT_READ) {
        return 0;
    }
    if (e == SSL_ERROR_WANT_WRITE) {
        c->ssl_read_wants_write = 1;
        if (conn_wev_add(c) == GW_OK) {
            return 0;
        }
    } else {
        err = ERR_peek_last_error();
        ERR_clear_error();
        if (BIO_number_read(SSL_get_rbio(c->ssl)) == 0) {
            /* closed (or reset) before its first byte: a TCP health
             * check, no handshake tried; counted, it would make the
             * failures useless to alert on */
            conn_close(c);
            return -1;
        }
        reason = tls_fail_reason(e, err);
        tls_failed(c, reason, err);
        /* not TLS from its first record (GET, POST, HEAD and PUT have
         * their own reason, other methods are a "wrong version") */
        if (reason == GW_EDGE_TLS_FAIL_NOT_TLS && first
            && (ERR_GET_REASON(err) == SSL_R_HTTP_REQUEST
                || ERR_GET_REASON(err) == SSL_R_HTTPS_PROXY_REQUEST
                || ERR_GET_REASON(err) == SSL_R_WRONG_VERSION_NUMBER)) {
            plain_http_refuse(c);
            return -1;
        }
    }
    conn_close(c);
    return -1;
}

/* The client has finished sending while an answer is still going out
 * (part of it waits in our buffer): read no more, send the rest, then
 * close (ST_CLOSING closes once it is out; write_timeout still bounds a
 * reader that stalls). 1 when that is so, 0 when nothing is pending. */
static int
peer_done(struct gw_conn *c)
{
    if (c->out_sent >= c->out_len
        || (c->state != ST_HEAD && c->state != ST_BODY)) {
        return 0;
    }
    head_leave(c);
    c->state = ST_CLOSING;
    conn_read_on(c, 0);
    return 1;
}

/* Reads what is there. Returns 0 on EOF/error (connection closed, or
 * closing once its answer is out: peer_done), 1. */
static int
conn_read(struct gw_conn *c)
{
    size_t got = 0;             /* bytes this call read */

    c->tls_held = 0;
    c->in_starved = 0;
    c->unread = 0;              /* reading again: the event says the rest */
    if (c->ssl != NULL && !c->handshaken) {
        /* before any buffer: a handshake needs none of ours */
        int r = conn_handshake(c);

        if (r <= 0) {
            return r == 0 ? 1 : 0;
        }
    }
    for (;;) {
        size_t limit = gw_srv.conf.max_header_bytes + gw_srv.conf.max_body_bytes
                       + 64 * 1024;
        ssize_t n;

        if (c->in_len == c->in_cap) {
            size_t cap = c->in_cap ? c->in_cap * 2 : IN_MIN;
            char *p;

            if (c->in_cap >= limit) {
                /* limits in conn_process say what's next; conn_flush()
                 * reads on once room is made */
                c->tls_held = c->ssl != NULL && SSL_has_pending(c->ssl);
                return 1;
            }
            if (cap > limit) {
                cap = limit;
            }
            /* Bodies being received share limits.body_memory: without
             * it each connection could hold body_bytes (5 MiB) for as
             * long as it sends a byte per body_timeout, and a few
             * hundred such connections took the worker's memory. One
             * big buffer is always allowed (others hold none), so a
             * limit below one body serialises bodies, never refuses
             * them all. conn_process answers 503. */
            if (in_big(cap) > 0) {
                size_t others = gw_srv.in_big - in_big(c->in_cap);

                if (others > 0 && others + cap > gw_srv.conf.max_body_memory) {
                    c->in_starved = 1;
                    c->tls_held = c->ssl != NULL && SSL_has_pending(c->ssl);
                    return 1;
                }
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
            gw_srv.in_big += in_big(cap) - in_big(c->in_cap);
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
                    if (conn_wev_add(c) != GW_OK) {
                        conn_close(c);
                        return 0;
                    }
                    return 1;
                }
                ERR_clear_error();
                if (got > 0 && e == SSL_ERROR_ZERO_RETURN) {
                    /* close_notify behind complete requests: answer
                     * them first; the next read meets it again (no
                     * socket event may come: read on after the flush) */
                    c->tls_held = 1;
                    return 1;
                }
                if (e == SSL_ERROR_ZERO_RETURN && peer_done(c)) {
                    return 0;
                }
                conn_close(c);
                return 0;
            }
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
                if (got > 0) {
                    /* a half-close behind complete requests: answer
                     * them first; the socket stays readable, and the
                     * next read meets the end again */
                    return 1;
                }
                if (peer_done(c)) {
                    return 0;
                }
                conn_close(c);
                return 0;
            }
        }
        if (c->in_len == c->req_start && c->state == ST_HEAD) {
            /* a new request's first byte (or, on TLS, the first bytes
             * of the record that carried it) */
            c->started = c->part_at > 0 ? c->part_at : gw_loop_mono();
            c->part_at = 0;
        }
        idle_leave(c);
        c->in_len += (size_t) n;
        got += (size_t) n;
        /* TLS reads ahead (tls.c): records it holds are signalled by no
         * socket event, so read on while it has any (until SSL_read()
         * wants more: what it holds then is part of a record, whose rest
         * the socket will announce) */
        if (c->in_len < c->in_cap
            && (c->ssl == NULL || !SSL_has_pending(c->ssl))) {
            return 1;
        }
    }
}

static void conn_read_process(struct gw_conn *c);
static void hello_queue(struct gw_conn *c);

static void
conn_on_read(evutil_socket_t fd, short what, void *arg)
{
    struct gw_conn *c = arg;

    if (c->state == ST_LINGER) {
        gw_loop_update_time();
        conn_linger_read(c);
        return;
    }
    if (c->state == ST_HANDLE || c->state == ST_CLOSING) {
        conn_read_on(c, 0);     /* the buffer must not move now */
        c->unread = 1;          /* a close must drain them (conn_flush) */
        return;
    }
    if (c->ssl != NULL && !c->handshaken
        && SSL_get_state(c->ssl) == TLS_ST_BEFORE) {
        hello_queue(c);
        return;
    }
    conn_read_process(c);
}

/* Reads what c has and goes on with its request. */
static void
conn_read_process(struct gw_conn *c)
{
    gw_loop_update_time();
    if (!conn_read(c)) {
        return;
    }
    if (c->state == ST_HEAD || c->state == ST_BODY) {
        gw_conn_process(c);
    }
}

/*
 * A new TLS connection's first handshake step waits its turn. That step
 * is the costly one: reading the ClientHello, the server signs with its
 * private key (~1 ms for RSA-2048) and makes its key share; the steps
 * after it and the requests of handshaken connections cost a few
 * microseconds each. Run as their sockets become readable, the
 * ClientHellos that arrive together run ahead of the requests that
 * arrive with them, and every one of those requests waits for all of
 * them. So the step is queued here, and hello_ev, a timer due at once,
 * runs the oldest: libevent runs timers after the socket events of its
 * loop turn, so every request that is in waits for one handshake at most,
 * and the handshakes, one per turn, are never starved by a busy server.
 */
static const struct timeval hello_now = { 0, 0 };

static void
hello_queue(struct gw_conn *c)
{
    if (c->hello_queued) {
        return;
    }
    if (gw_srv.hello_ev == NULL) {
        conn_read_process(c);           /* no timer: as it comes */
        return;
    }
    conn_read_on(c, 0);                 /* the bytes wait in the kernel */
    c->hello_queued = 1;
    c->hnext = NULL;
    c->hprev = gw_srv.hello_tail;
    if (gw_srv.hello_tail != NULL) {
        gw_srv.hello_tail->hnext = c;
    } else {
        gw_srv.hello_head = c;
    }
    gw_srv.hello_tail = c;
    if (!evtimer_pending(gw_srv.hello_ev, NULL)) {
        evtimer_add(gw_srv.hello_ev, &hello_now);
    }
}

static void
hello_leave(struct gw_conn *c)
{
    if (!c->hello_queued) {
        return;
    }
    if (c->hprev != NULL) {
        c->hprev->hnext = c->hnext;
    } else {
        gw_srv.hello_head = c->hnext;
    }
    if (c->hnext != NULL) {
        c->hnext->hprev = c->hprev;
    } else {
        gw_srv.hello_tail = c->hprev;
    }
    c->hprev = c->hnext = NULL;
    c->hello_queued = 0;
}

static void
on_hello(evutil_socket_t fd, short what, void *arg)
{
    struct gw_conn *c = gw_srv.hello_head;

    if (c == NULL) {
        return;
    }
    hello_leave(c);
    if (gw_srv.hello_head != NULL) {
        evtimer_add(gw_srv.hello_ev, &hello_now);   /* next turn */
    }
    conn_read_on(c, 1);
    conn_read_process(c);
}

/* The end of a graceful close's stream: on TLS, close_notify, so that
 * the client can tell the end from a cut (OpenSSL 3 clients report an
 * EOF without it as "unexpected eof"). Best effort: neither it nor the
 * client's is waited for. */
static void
conn_end_stream(struct gw_conn *c)
{
    if (c->ssl != NULL && c->handshaken) {
        (void) SSL_shutdown(c->ssl);
        ERR_clear_error();
    }
}

/* Closes c gracefully: the answer sent, an idle one timed out or
 * reclaimed for a new client at the cap. */
static void
conn_close_graceful(struct gw_conn *c)
{
    conn_end_stream(c);
    conn_close(c);
}

/* Closes c after its answer while the client may still be sending: a
 * body refused before it was read (413, 400 mid-body), requests
 * pipelined behind one answered with Connection: close. close() with
 * unread input makes the kernel answer with a reset, and a reset can
 * destroy the answer in the client's receive buffer before the client
 * reads it (the client of a refused upload sees "connection reset", not
 * the 413). So: close_notify (TLS), then FIN (the client reads the answer
 * and the end), then read and discard what still comes until the
 * client's FIN, LINGER_IDLE s without a byte, or LINGER_MAX s in all
 * (nginx's lingering close). */
static void
conn_linger(struct gw_conn *c)
{
    conn_end_stream(c);
    if (shutdown(c->fd, SHUT_WR) != 0) {
        conn_close(c);
        return;
    }
    conn_release(c);
    head_leave(c);
    c->state = ST_LINGER;
    c->linger_end = gw_loop_mono() + LINGER_MAX;
    gw_edge_count(GW_EDGE_LINGERED);
    idle_enter(c);              /* the first to go at the cap */
    conn_read_on(c, 1);
    gw_conn_timer(c, LINGER_IDLE);
}

/* ST_LINGER: the client's bytes are read straight from the socket (TLS
 * too: after close_notify nothing of them is used) and dropped. */
static void
conn_linger_read(struct gw_conn *c)
{
    char   buf[16384];
    double left;

    for (int i = 0; i < 64; i++) {      /* 1 MiB per wakeup at most */
        ssize_t n = recv(c->fd, buf, sizeof(buf), 0);

        if (n > 0) {
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
            break;
        }
        conn_close(c);                  /* the client's FIN, or an error */
        return;
    }
    left = c->linger_end - gw_loop_mono();
    if (left <= 0) {
        conn_close(c);
        return;
    }
    gw_conn_timer(c, left < LINGER_IDLE ? left : LINGER_IDLE);
}

static void
conn_flush(struct gw_conn *c)
{
    size_t was_sent = c->out_sent;

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
            if (conn_wev_add(c) != GW_OK) {
                conn_close(c);
                return;
            }
            c->want_write = 1;
            c->write_by = gw_loop_mono() + gw_srv.conf.write_timeout;
            gw_conn_timer(c, gw_srv.conf.write_timeout);
        } else if (c->state != ST_HANDLE
                   && (c->out_sent > was_sent
                       || !evtimer_pending(c->timer, NULL))) {
            /* progress restarts write_timeout (a slow reader is not a
             * stalled one); and a timer taken for a request handled
             * meanwhile (gw_req_start) is given back, else a client
             * that pipelines and never reads would hold the connection
             * with no timer at all. (In ST_HANDLE the timer is the
             * request's deadline; the answer's flush comes back here.) */
            if (c->out_sent > was_sent) {
                c->write_by = gw_loop_mono() + gw_srv.conf.write_timeout;
            }
            gw_conn_timer(c, c->write_by - gw_loop_mono());
        }
        return;
    }
    c->out_len = c->out_sent = 0;
    if (c->want_write) {
        event_del(c->wev);
        c->want_write = 0;
        conn_timer_phase(c);    /* the write timer's turn is over */
    }
    if (c->state == ST_HEAD && c->in_len == 0) {
        conn_release(c);    /* between requests: hold no buffers */
    }
    if (c->state == ST_CLOSING) {
        /* unread input (the rest of a refused request, pipelined ones;
         * in the buffer, in OpenSSL's, or in the socket: bytes that came
         * while the request was handled): the client may be sending
         * still. Not after req:drop(), whose reset (SO_LINGER 0) is the
         * point. */
        if (!c->dropped && (c->in_len > c->req_start || c->unread
                            || (c->ssl != NULL && SSL_has_pending(c->ssl)))) {
            conn_linger(c);
        } else {
            conn_close_graceful(c);
        }
        return;
    }
    if (c->out_blocked) {
        c->out_blocked = 0;
        gw_conn_process(c);        /* answer the pipelined rest */
        return;
    }
    /* Records conn_read() left in OpenSSL at the input limit: the socket
     * will not signal them. Not on SSL_has_pending() alone: that is also
     * true for part of a record, which SSL_read() cannot give until its
     * rest arrives, and reading on for it would spin. */
    if (c->tls_held && (c->state == ST_HEAD || c->state == ST_BODY)) {
        conn_on_read(c->fd, EV_READ, c);
        return;
    }
    if (gw_srv.draining && c->state == ST_HEAD && c->in_len == 0
        && c->requests > 0) {
        gw_conn_timer(c, DRAIN_LINGER);    /* see gw_server_drain() */
        return;
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
    if (c->state == ST_LINGER) {
        conn_close(c);          /* the client sent nothing for a while, or
                                   lingered its LINGER_MAX s */
        return;
    }
    if (c->state == ST_HANDLE && c->co != NULL) {
        if (gw_loop_mono() + 0.0005 >= c->deadline) {
            gw_req_deadline(c);
        } else {
            gw_conn_timer(c, c->deadline - gw_loop_mono());
        }
        return;
    }
    if (c->want_write) {
        /* while an answer drains the timer is write_by's alone */
        if (gw_loop_mono() + 0.0005 >= c->write_by) {
            gw_log(GW_LOG_INFO, "closing %s: write stalled", c->peer);
            conn_close(c);
        } else {
            gw_conn_timer(c, c->write_by - gw_loop_mono());
        }
        return;
    }
    if (c->state == ST_BODY) {
        conn_bad(c, 408, "timeout", "request body not received in time");
        conn_read_on(c, 0);
        conn_flush(c);
        return;
    }
    if (c->state == ST_HEAD && c->in_len > 0) {
        conn_name_method(c, c->in_len - c->req_start);
        conn_bad(c, 408, "timeout", "request head not received in time");
        conn_read_on(c, 0);
        conn_flush(c);
        return;
    }
    if (c->ssl != NULL && !c->handshaken) {
        tls_failed(c, GW_EDGE_TLS_FAIL_TIMEOUT, 0);
    }
    conn_close_graceful(c); /* idle keep-alive connection (close_notify
                               only once handshaken) */
}

static void
conn_close(struct gw_conn *c)
{
    c->closing = 1;
    idle_leave(c);
    head_leave(c);
    hello_leave(c);
    if (c->co != NULL) {
        /* only on shutdown: the handler's coroutine goes with us */
        gw_req_abandon(c);
    }
    gw_lreq_detach(gw_srv.L, c);
    if (c->rev != NULL) {
        event_del(c->rev);
    }
    if (c->wev != NULL) {
        event_free(c->wev);
    }
    if (c->timer != NULL) {
        event_del(c->timer);
    }
    if (c->ssl != NULL) {
        SSL_free(c->ssl);
    }
    close(c->fd);
    gw_srv.in_big -= in_big(c->in_cap);
    free(c->in);
    free(c->out);
    free(c->hdrs);
    free(c->rpath);
    if (c->prev != NULL) {
        c->prev->next = c->next;
    } else {
        gw_srv.conns = c->next;
    }
    if (c->next != NULL) {
        c->next->prev = c->prev;
    }
    conn_free(c);
    gw_srv.nconns--;
    if (!gw_srv.draining && !gw_srv.accepting
        && gw_srv.nconns < gw_srv.conf.max_connections) {
        event_add(gw_srv.lev, NULL);
        gw_srv.accepting = 1;
    }
    if (gw_srv.draining && gw_srv.nconns == 0 && gw_srv.drained != NULL) {
        void (*done)(void) = gw_srv.drained;

        gw_srv.drained = NULL;
        done();
    }
}

/* What the client has sent that is still unread is read and dropped
 * (1 MiB at most), so that a close just after sends a FIN, not a reset,
 * and what was sent before it is not destroyed. */
static void
conn_drop_input(struct gw_conn *c)
{
    char drop[16384];

    for (int k = 0; k < 64 && recv(c->fd, drop, sizeof(drop), 0) > 0; k++) {
    }
}

#define HEAD_EVICTED "request head too slow at the connection cap " \
                     "(limits.connections)"

/* c, reading its head longest (head_victim), makes room for a new client
 * now: a head begun is answered 408 (counted and logged as a head that
 * timed out is, with a message that says why), in one write, as the
 * socket's buffer is empty (c has no answer going out); then c closes.
 * A TLS connection in its handshake, or with no byte of its head yet,
 * just closes. */
static void
conn_evict_head(struct gw_conn *c)
{
    if (c->in_len > c->req_start) {
        conn_name_method(c, c->in_len - c->req_start);
        conn_bad(c, 408, "timeout", HEAD_EVICTED);
        if (c->out_len == c->out_sent) {
            /* no memory for the answer: none */
        } else if (c->ssl != NULL) {
            (void) SSL_write(c->ssl, c->out + c->out_sent,
                             (int) (c->out_len - c->out_sent));
            ERR_clear_error();
        } else {
            (void) send(c->fd, c->out + c->out_sent,
                        c->out_len - c->out_sent, MSG_NOSIGNAL);
        }
    }
    conn_drop_input(c);
    conn_close_graceful(c);
}

/* Accepting, paused at the cap, is tried again at `at` (mono). */
static void
resume_at(double at)
{
    struct timeval tv = delay_tv(at - gw_loop_mono() + 0.001);

    evtimer_add(gw_srv.resume_ev, &tv);
}

static void
on_resume(evutil_socket_t fd, short what, void *arg)
{
    double next = 0;
    int kind;

    (void) fd;
    (void) what;
    (void) arg;
    gw_loop_update_time();      /* the grace is judged by the time now */
    if (gw_srv.draining || gw_srv.accepting) {
        return;
    }
    if (gw_srv.nconns < gw_srv.conf.max_connections
        || cap_victim(&next, &kind) != NULL) {
        event_add(gw_srv.lev, NULL);
        gw_srv.accepting = 1;
    } else if (next > 0) {
        resume_at(next);        /* a silent new connection's grace ends */
    }
}

static void
on_accept(evutil_socket_t lfd, short what, void *arg)
{
    /* TLS: one connection per wakeup (nginx's multi_accept off). Each new
     * connection brings a handshake (a private-key operation, ~1 ms for
     * RSA-2048); accepting a whole backlog at once queues its handshakes
     * in the next loop turn ahead of requests on connections already
     * handshaken, so every request waits behind them. One at a time, the
     * rest wait in the kernel's backlog and the turns stay short; the
     * accept rate is still a connection per turn. Plain HTTP costs little
     * per connection: up to 64. */
    int batch = gw_srv.ssl_ctx != NULL ? ACCEPT_BATCH_TLS : ACCEPT_BATCH;

    gw_loop_update_time();
    for (int i = 0; i < batch; i++) {
        struct sockaddr_storage ss;
        socklen_t sl = sizeof(ss);
        struct gw_conn *c, *victim = NULL;
        int fd, one = 1, kind = GW_EDGE_RECLAIMED;

        if (gw_srv.nconns >= gw_srv.conf.max_connections) {
            double next;

            victim = cap_victim(&next, &kind);
            if (victim == NULL) {
                event_del(gw_srv.lev); /* the kernel backlog holds the rest */
                gw_srv.accepting = 0;
                if (next > 0) {
                    resume_at(next);    /* a silent new one's grace ends */
                }
                return;
            }
        }
        fd = accept4(lfd, (struct sockaddr *) &ss, &sl,
                     SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd >= 0 && victim != NULL) {
            /* its place goes to the new client */
            if (kind == GW_EDGE_RECLAIMED_HEAD) {
                conn_evict_head(victim);
            } else if (victim->state == ST_LINGER) {
                /* its stream has ended already */
                conn_drop_input(victim);
                conn_close(victim);
            } else {
                conn_close_graceful(victim);
            }
            gw_edge_count(kind);
        }
        if (fd < 0) {
            if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED) {
                /* out of fds or memory: the socket stays readable, so a
                 * level-triggered accept would spin; pause instead */
                struct timeval pause = { 0, 500000 };

                gw_log(GW_LOG_WARN, "accept: %s; pausing accepts for "
                       "0.5 s", strerror(errno));
                if (gw_srv.accepting) {
                    event_del(gw_srv.lev);
                    gw_srv.accepting = 0;
                }
                evtimer_add(gw_srv.resume_ev, &pause);
            }
            return;
        }
        c = conn_alloc();
        if (c == NULL) {
            close(fd);
            return;
        }
        c->fd = fd;
        c->lreq_ref = LUA_NOREF;
        c->route_ref = LUA_NOREF;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        gw_sockaddr_text(&ss, c->peer, sizeof(c->peer));
        if (event_assign(CONN_EV(c, CONN_EV_READ), gw_loop_base(), fd,
                         EV_READ | EV_PERSIST, conn_on_read, c) == 0) {
            c->rev = CONN_EV(c, CONN_EV_READ);
        }
        if (evtimer_assign(CONN_EV(c, CONN_EV_TIMER), gw_loop_base(),
                           conn_on_timer, c) == 0) {
            c->timer = CONN_EV(c, CONN_EV_TIMER);
        }
        if (gw_srv.ssl_ctx != NULL) {
            c->ssl = SSL_new(gw_srv.ssl_ctx);
            if (c->ssl != NULL) {
                SSL_set_fd(c->ssl, fd);
                SSL_set_accept_state(c->ssl);
            }
        }
        c->next = gw_srv.conns;
        if (gw_srv.conns != NULL) {
            gw_srv.conns->prev = c;
        }
        gw_srv.conns = c;
        gw_srv.nconns++;
        if (c->rev == NULL || c->timer == NULL
            || (gw_srv.ssl_ctx != NULL && c->ssl == NULL)) {
            conn_close(c);
            continue;
        }
        c->state = ST_HEAD;
        c->started = gw_loop_mono();
        c->accepted = c->started;
        head_enter(c);          /* its head's time runs from now */
        conn_read_on(c, 1);
        gw_conn_timer(c, gw_srv.conf.header_timeout);
        idle_enter(c);          /* nothing sent yet: reclaimable at the cap */
        if (c->ssl != NULL) {
            /* The ClientHello is usually in by now (a client sends it as
             * soon as connect returns): its turn is queued at once
             * (hello_queue), not after a wait for the read event. If it
             * is not there yet, its turn costs one read that finds
             * nothing, and the read event takes over. */
            conn_on_read(fd, EV_READ, c);
        }
    }
}

int
gw_server_start(lua_State *L, int fd, int dispatch_ref,
                const struct gw_server_conf *conf, SSL_CTX *ssl_ctx)
{
    gw_srv.L = L;
    gw_srv.fd = fd;
    gw_srv.dispatch_ref = dispatch_ref;
    gw_srv.conf = *conf;
    gw_srv.ssl_ctx = ssl_ctx;
    if (RAND_bytes((unsigned char *) &gw_srv.rid_state,
                   sizeof(gw_srv.rid_state)) != 1 || gw_srv.rid_state == 0) {
        gw_srv.rid_state = (uint64_t) time(NULL) ^ ((uint64_t) getpid() << 32);
    }
    gw_srv.lev = event_new(gw_loop_base(), fd, EV_READ | EV_PERSIST, on_accept,
                        NULL);
    gw_srv.resume_ev = evtimer_new(gw_loop_base(), on_resume, NULL);
    gw_srv.trim_ev = evtimer_new(gw_loop_base(), on_trim, NULL);
    gw_srv.hello_ev = ssl_ctx != NULL
                      ? evtimer_new(gw_loop_base(), on_hello, NULL) : NULL;
    if (gw_srv.lev == NULL || gw_srv.resume_ev == NULL
        || gw_srv.trim_ev == NULL) {
        return GW_ERR;
    }
    /* room for the cap and the ones accepted to be refused or to reclaim
     * idle ones with; past it, connections come from malloc */
    if (gw_conn_pool_init(conn_block_size(),
                          (unsigned) conf->max_connections + 64) != 0) {
        gw_log(GW_LOG_WARN, "connections: no pool (%s); using malloc",
               strerror(errno));
    }
    return GW_OK;
}

int
gw_server_accept(void)
{
    if (gw_srv.lev == NULL || gw_srv.draining || gw_srv.accepting) {
        return GW_OK;       /* not started, stopping, or already on */
    }
    if (event_add(gw_srv.lev, NULL) != 0) {
        return GW_ERR;
    }
    gw_srv.accepting = 1;
    return GW_OK;
}

void
gw_server_drain(void (*done)(void))
{
    struct gw_conn *c, *next;

    gw_srv.draining = 1;
    gw_srv.drained = done;
    if (gw_srv.lev != NULL && gw_srv.accepting) {
        event_del(gw_srv.lev);
        gw_srv.accepting = 0;
    }
    for (c = gw_srv.conns; c != NULL; c = next) {
        next = c->next;
        if (c->state != ST_HEAD || c->in_len != 0 || c->out_len != 0) {
            continue;           /* busy: closes after its answer */
        }
        if (c->requests == 0) {
            /* A new connection is no idle keep-alive one: its client
             * connected to send a request and will not retry it if we
             * close (curl: "Empty reply from server"). It keeps the
             * head's time from its accept, as it would without a drain;
             * its answer says Connection: close. */
            continue;
        }
        /* A request may be on its way on this idle keep-alive connection:
         * closing now would reset it. Answer what has arrived, and give
         * the rest DRAIN_LINGER to send one last request (answered with
         * Connection: close) before the connection is closed. */
        if (!conn_read(c)) {
            continue;           /* the peer had closed: gone now */
        }
        if (c->in_len > 0) {
            gw_conn_process(c);
        } else {
            gw_conn_timer(c, DRAIN_LINGER);
        }
    }
    if (gw_srv.nconns == 0 && gw_srv.drained != NULL) {
        gw_srv.drained = NULL;
        done();
    }
}

void
gw_server_close_all(void)
{
    gw_srv.drained = NULL;
    while (gw_srv.conns != NULL) {
        conn_close(gw_srv.conns);
    }
}