/*
 * http_server.h -- our HTTP/1.1 server on libevent: accepts on a shared
 * listening socket, parses with http_parser, runs each request in a managed
 * coroutine calling the Lua dispatch function, and queues the responses of
 * a connection's pipelined requests in one buffer, written together.
 * (Inside: http_conn.h.)
 */
#ifndef GW_HTTP_SERVER_H
#define GW_HTTP_SERVER_H

#include <stddef.h>
#include <openssl/ssl.h>

#include "runtime.h"

struct gw_server_conf {
    size_t max_header_bytes;    /* bytes of request line + headers */
    size_t max_body_bytes;      /* bytes of (decoded) body */
    size_t max_body_memory;     /* bytes of input buffers over IN_FREE
                                   (bodies being received) a worker holds
                                   at once; past it 503 */
    int    max_connections;     /* open per worker; more wait in backlog */
    double header_timeout;      /* s from a request's first byte (or the
                                   connection's accept) to its whole head */
    double body_timeout;        /* s of silence allowed while reading body*/
    int    body_min_rate;       /* bytes/s: a body is due by its start +
                                   body_timeout + its bytes so far / this
                                   (0: no such bound) */
    double write_timeout;       /* s from a write blocking (socket buffer
                                   full) to all output sent; then closed */
    double keepalive_timeout;   /* s an idle connection is kept */
    int    keepalive_requests;  /* requests per connection */
    double request_timeout;     /* s from a request's first byte to its
                                   handler's answer: then 504 (a handler
                                   may change it: req:set_deadline) */
    int    access_log;          /* 1: one info line per handled request */
    /* Called once per finished request (route NULL: unmatched; method
     * "-" and seconds 0 for one refused before a handler: malformed, over
     * a limit, too slow), so the process layer can count it; may be NULL.
     * The server knows nothing of metrics. */
    void (*on_request)(const char *method, size_t method_len,
                       const char *route, size_t route_len, int status,
                       double seconds);
    /* Called as a request's handler starts (its method, its path without
     * the query, its id), before any Lua runs; may be NULL. For the
     * process layer's loop-stall watchdog: it must stay cheap (no system
     * call, no lock), as it runs on every request. */
    void (*on_start)(const char *method, size_t method_len,
                     const char *path, size_t path_len, const char *id);
    /* Called once per edge event (enum gw_edge_event), to be counted;
     * may be NULL. */
    void (*on_event)(int event);
};

/* What the edge counts beside requests (conf.on_event). */
enum gw_edge_event {
    GW_EDGE_RECLAIMED,          /* a lingering close or an idle
                                   keep-alive connection closed at the
                                   connection cap to admit a new one */
    GW_EDGE_RECLAIMED_HEAD,     /* a connection that had been reading
                                   its head longest (HEAD_GRACE s at
                                   least) closed at the cap to admit a
                                   new one */
    GW_EDGE_LINGERED,           /* closed after its answer with the
                                   client's bytes drained first (a
                                   refused body, pipelined requests) */
    GW_EDGE_TLS_FULL,           /* a full TLS handshake completed */
    GW_EDGE_TLS_RESUMED,        /* a resumed one (ticket or cache) */
    GW_EDGE_TLS_FAIL_PROTOCOL,  /* no protocol version in common */
    GW_EDGE_TLS_FAIL_CIPHER,    /* no cipher / group / signature in
                                   common */
    GW_EDGE_TLS_FAIL_CERT,      /* a client certificate missing or
                                   refused */
    GW_EDGE_TLS_FAIL_ABORTED,   /* the peer closed or reset mid-handshake*/
    GW_EDGE_TLS_FAIL_TIMEOUT,   /* not done within header_timeout */
    GW_EDGE_TLS_FAIL_NOT_TLS,   /* the bytes were not TLS (plain HTTP on
                                   the TLS port and the like) */
    GW_EDGE_TLS_FAIL_OTHER,     /* any other alert or error */
    GW_EDGE_NEVENTS
};

/* The event's name as /metrics shows it ("reclaimed", "slow_head",
 * "full", "resumed", or a failure reason: "protocol", "cipher", ...). */
const char *gw_edge_event_name(int event);

/* Fills the defaults (they suit payment callbacks; see README). */
void gw_server_conf_defaults(struct gw_server_conf *c);

/*
 * Sets up serving fd (listening, non-blocking) on the loop; accepting
 * begins with gw_server_accept(). dispatch_ref is a registry ref to the
 * Lua function dispatch(req, method, path) returning status, body,
 * headers, route, content_type. ssl_ctx may be NULL (plain HTTP); it is
 * not owned. GW_OK or GW_ERR.
 */
int gw_server_start(lua_State *L, int fd, int dispatch_ref,
                    const struct gw_server_conf *conf, SSL_CTX *ssl_ctx);

/* Starts accepting on the listening socket (nothing once draining: a
 * worker told to stop before it was told to serve accepts nothing).
 * GW_OK or GW_ERR. */
int gw_server_accept(void);

/* Stops accepting. Busy connections close after their response; idle
 * keep-alive ones answer what has arrived and may send one more request
 * for a second (answered with Connection: close), then close. done() is
 * called once no connection is left. */
void gw_server_drain(void (*done)(void));

/* Closes everything now (after the drain deadline). */
void gw_server_close_all(void);

/* Open connections and requests in progress (metrics). */
int gw_server_connections(void);
int gw_server_in_flight(void);

/* The paygate.request.core module (lrequest.c): registers the request
 * userdata and returns { request_methods = fn } (fn(t) sets the Lua
 * methods of req). */
int luaopen_paygate_request_core(lua_State *L);

#endif
