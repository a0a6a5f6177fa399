/*
 * http_conn.h -- what the files of the HTTP server share; nothing outside
 * src/http includes it (http_server.h is the public API).
 *
 *   http_server.c    the connection and TLS state machine: accept, read,
 *                    parse, keep-alive, pipelining, timeouts, drain, close
 *   http_request.c   a request's run in Lua: start its coroutine, turn the
 *                    handler's results into a response, end it (one
 *                    sequence: hook, access log, counts, next request)
 *   http_response.c  writing responses: status line, headers, body, the
 *                    server's own JSON error answers
 *   lrequest.c       the request userdata (paygate.request.core)
 */
#ifndef GW_HTTP_CONN_H
#define GW_HTTP_CONN_H

#include <stddef.h>
#include <stdint.h>
#include <openssl/ssl.h>

#include "co.h"
#include "http_parser.h"
#include "http_server.h"

enum gw_conn_state {
    ST_HEAD,                    /* waiting for a complete head */
    ST_BODY,                    /* head parsed, reading the body */
    ST_HANDLE,                  /* coroutine running or waiting */
    ST_CLOSING,                 /* flush the output, then close */
    ST_LINGER                   /* answer sent and FIN too: reading and
                                   discarding what the client still sends
                                   until its FIN (conn_linger) */
};

struct gw_lreq;                 /* lrequest.c: the Lua request's handle */

struct gw_conn {
    int                 fd;         /* owned; closed in conn_close() */
    SSL                *ssl;        /* owned, or NULL for plain HTTP */
    int                 handshaken; /* TLS: 1 once a read succeeded */
    struct event       *rev;        /* readable; in c's own memory */
    struct event       *wev;        /* owned: writable; made on first
                                       need (conn_wev_add), or NULL */
    struct event       *timer;      /* the phase's deadline */
    double              linger_end; /* ST_LINGER: close by then (mono) */
    enum gw_conn_state  state;      /* where the current request is */
    int                 reading;    /* 1 while rev is added */
    int                 want_write; /* 1: output pending, wev added */
    double              write_by;   /* want_write: closed as stalled if
                                       no byte of it is sent by then
                                       (mono; write_timeout after the
                                       stall began or the last progress) */
    int                 ssl_read_wants_write; /* TLS: SSL_read asked to
                                       wait for writability */
    int                 unread;     /* the socket became readable while
                                       a request was handled or the
                                       answer sent (conn_on_read() left
                                       it unread): the client's bytes or
                                       FIN wait in the kernel */
    int                 tls_held;   /* TLS: conn_read() stopped at the
                                       input limit with records left in
                                       OpenSSL, which no socket event
                                       will announce */
    int                 in_starved; /* conn_read() could not grow the
                                       input buffer: limits.body_memory
                                       is held by other connections */

    char               *in;         /* owned input buffer; grown by
                                       copying (conn_read() rebases the
                                       head that points into it) */
    size_t              in_cap;     /* bytes allocated */
    size_t              in_len;     /* bytes received */
    size_t              req_start;  /* offset of the current request */
    size_t              scanned;    /* bytes searched for the head's end */
    size_t              head_len;   /* bytes of the current head */
    struct gw_http_head head;       /* points into in; head.headers is
                                       hdrs */
    struct gw_http_header *hdrs;    /* owned: the head's fields, sized by
                                       the head's line count */
    size_t              hdrs_cap;   /* entries allocated */
    char               *rpath;      /* owned, or NULL: the path with its
                                       dot-segments resolved (head.path
                                       then points here) */
    size_t              body_off;   /* offset of the body in in */
    size_t              body_len;   /* bytes of decoded body */
    struct gw_chunked   chunk;      /* chunked decoder state */

    char               *out;        /* owned output buffer */
    size_t              out_cap;    /* bytes allocated */
    size_t              out_len;    /* bytes of responses in out */
    size_t              out_sent;   /* bytes of out already written */

    struct gw_co       *co;         /* request coroutine while it waits,
                                       or NULL; freed by its request's
                                       end (http_request.c) */
    struct gw_lreq     *lreq;       /* the Lua request's handle on us, or
                                       NULL; anchored by lreq_ref */
    int                 lreq_ref;   /* registry ref to the request ud, or
                                       LUA_NOREF */
    int                 route_ref;  /* registry ref to the pattern of the
                                       route the request matched, or
                                       LUA_NOREF (set_route in lrequest.c;
                                       released by its end) */
    double              body_at;    /* s (mono): the body's start (its
                                       head parsed): body_min_rate counts
                                       from it */
    double              started;    /* s (mono): the request's first byte,
                                       or the connection's accept */
    double              accepted;   /* s (mono): accept; the first head's
                                       header_timeout counts from it */
    double              part_at;    /* s (mono): a keep-alive TLS
                                       connection got part of a record
                                       (no byte of a request yet): its
                                       head's header_timeout began; 0 */
    double              deadline;   /* s (mono): absolute handler deadline */
    int                 requests;   /* served on this connection */
    int                 close_after;/* close once the output is sent */
    int                 dropped;    /* req:drop(): the request ends with
                                       no answer and a reset (RST) */
    int                 in_start;   /* inside gw_req_start(): a request's
                                       end must not process the next */
    int                 closing;    /* inside conn_close(): likewise */
    int                 out_blocked;/* output over OUT_HIGH: parse no more
                                       until it drains */
    char                request_id[40]; /* NUL-terminated; "" once a
                                       head failed to parse */
    char                peer[64];   /* "ip:port" */
    struct gw_conn     *prev, *next;/* all connections; gw_srv.conns */
    struct gw_conn     *iprev, *inext; /* lingering closes, then idle
                                       keep-alive connections, each
                                       oldest first; gw_srv.idle_* */
    int                 idle;       /* 1 while on that list */
    double              idle_at;    /* s (mono): when it joined it */
    struct gw_conn     *rprev, *rnext; /* connections reading a head
                                       (a new one from its accept, its
                                       TLS handshake included; a later
                                       head from its first byte), oldest
                                       first; gw_srv.heads_* */
    double              head_at;    /* s (mono): when it joined that
                                       list; 0 while not on it */
    struct gw_conn     *hprev, *hnext; /* TLS: new connections whose
                                       ClientHello waits its turn, oldest
                                       first; gw_srv.hello_* */
    int                 hello_queued; /* 1 while on that list */
};

/* The worker's one server. */
struct gw_http_srv {
    lua_State            *L;            /* main state; not owned */
    int                   fd;           /* listening socket; not owned */
    struct event         *lev;          /* owned: accept */
    int                   accepting;    /* 1 while lev is added */
    int                   dispatch_ref; /* registry ref; not owned */
    struct gw_server_conf conf;         /* a copy of the caller's */
    SSL_CTX              *ssl_ctx;      /* not owned; NULL for plain */
    struct gw_conn       *conns;        /* owned: open connections */
    int                   nconns;       /* length of conns */
    int                   in_flight;    /* requests being handled */
    int                   draining;     /* 1 after gw_server_drain() */
    void                (*drained)(void); /* called once, when the last
                                           connection closes draining */
    uint64_t              rid_state;    /* xorshift state for ids */
    struct event         *resume_ev;    /* owned: accepts again after a
                                           pause (EMFILE and the like) */
    struct gw_conn       *idle_head;    /* the idle list: lingering
                                           closes (oldest first), then
                                           idle keep-alive conns (oldest
                                           first) */
    struct gw_conn       *idle_tail;    /* its newest keep-alive one */
    struct gw_conn       *linger_last;  /* its newest lingering close,
                                           NULL if none */
    struct event         *trim_ev;      /* owned: gives memory back a
                                           while after a storm ends */
    int                   trim_peak;    /* most connections since the
                                           last trim */
    struct gw_conn       *heads_head;   /* connections reading a head,
                                           oldest first (head_victim) */
    struct gw_conn       *heads_tail;   /* its newest */
    struct gw_conn       *hello_head;   /* TLS: first handshake steps
                                           waiting (hello_queue) */
    struct gw_conn       *hello_tail;
    struct event         *hello_ev;     /* owned: runs the oldest */
    size_t                in_big;       /* bytes of the input buffers
                                           over IN_FREE, all connections
                                           (limits.body_memory) */
};

extern struct gw_http_srv gw_srv;

/* http_server.c: called whenever input arrived or a response was
 * completed; parses and starts what it can, then flushes. May close c. */
void gw_conn_process(struct gw_conn *c);

/* http_server.c: counts an edge event (conf.on_event). */
void gw_edge_count(int event);

/* http_server.c: (re)arms c's one timer, secs from now. */
void gw_conn_timer(struct gw_conn *c, double secs);

/* http_server.c: the current request's bytes are done with: moves past
 * them (the next pipelined request starts there) and forgets its head. */
void gw_conn_advance(struct gw_conn *c);

/* http_request.c: runs the request whose head and body c holds, in a
 * new coroutine, until it first waits or ends. */
void gw_req_start(struct gw_conn *c);

/* http_request.c: c's handler deadline passed: answers 504, cancels the
 * handler, goes on with the connection. */
void gw_req_deadline(struct gw_conn *c);

/* http_request.c: c closes with a handler still waiting (shutdown):
 * cancels it and ends the request (499), without answering. */
void gw_req_abandon(struct gw_conn *c);

/*
 * http_response.c: appends a whole response to c's output. body may be
 * NULL; ctype NULL sends no Content-Type; own_date: extra carries the
 * Date line (a handler's), the server's is left out; extra is
 * preformatted header lines ("Name: value\r\n"...) or NULL. Sets
 * c->close_after when the connection must not be kept. GW_OK, or GW_ERR
 * (no memory: the caller closes after what is already queued).
 */
int gw_resp_write(struct gw_conn *c, int status, const char *ctype,
                  int own_date, const char *extra, size_t extra_len,
                  const char *body, size_t body_len);

/* http_response.c: a JSON error answer made by the server itself (never
 * a traceback): {"error":kind,"message":message,"request_id":..}. kind
 * and message are NUL-terminated and JSON-quoted here. Out of memory, it
 * sets c->close_after instead. */
void gw_resp_error(struct gw_conn *c, int status, const char *kind,
                   const char *message);

/* http_response.c: queues "100 Continue" (nothing when out of memory:
 * the client sends its body after its own wait). */
void gw_resp_continue(struct gw_conn *c);

/* lrequest.c: pushes a new request userdata bound to c; c->lreq and
 * c->lreq_ref hold it until gw_lreq_detach(). Raises when out of memory
 * (before anything is bound). */
void gw_lreq_push(lua_State *L, struct gw_conn *c);

/* lrequest.c: unbinds c's request userdata (its fields then raise) and
 * drops the ref. Safe to call twice. */
void gw_lreq_detach(lua_State *L, struct gw_conn *c);

#endif
