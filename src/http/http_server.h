/*
 * http_server.h -- our HTTP/1.1 server on libevent: accepts on a shared
 * listening socket, parses with http_parser, runs each request in a managed
 * coroutine calling the Lua dispatch function, writes each response (and
 * every pipelined one) in one send.
 */
#ifndef GW_HTTP_SERVER_H
#define GW_HTTP_SERVER_H

#include <stddef.h>
#include <openssl/ssl.h>

#include "runtime.h"

struct gw_server_conf {
    size_t max_header_bytes;    /* bytes of request line + headers */
    size_t max_body_bytes;      /* bytes of (decoded) body */
    int    max_connections;     /* open per worker; more wait in backlog */
    double header_timeout;      /* s from a request's first byte to head */
    double body_timeout;        /* s of silence allowed while reading body*/
    double write_timeout;       /* s of a stalled write before closing */
    double keepalive_timeout;   /* s an idle connection is kept */
    int    keepalive_requests;  /* requests per connection */
    double request_timeout;     /* s a handler may take: then 504 */
    int    access_log;          /* 1: one log line per request */
    /* Called once per finished request (route NULL: unmatched), so the
     * process layer can count it; may be NULL. The server knows nothing
     * of metrics. */
    void (*on_request)(const char *method, size_t method_len,
                       const char *route, size_t route_len, int status,
                       double seconds);
};

/* Fills the defaults (they suit payment callbacks; see README). */
void gw_server_conf_defaults(struct gw_server_conf *c);

/*
 * Starts serving fd (listening, non-blocking) on the loop. dispatch_ref is
 * a registry ref to the Lua function dispatch(req, method, path) returning
 * status, body, headers, route, content_type. ssl_ctx may be NULL (plain
 * HTTP); it is not owned. GW_OK or GW_ERR.
 */
int gw_server_start(lua_State *L, int fd, int dispatch_ref,
                    const struct gw_server_conf *conf, SSL_CTX *ssl_ctx);

/* Stops accepting; idle connections close, busy ones close after their
 * response. done() is called once no connection is left. */
void gw_server_drain(void (*done)(void));

/* Closes everything now (after the drain deadline). */
void gw_server_close_all(void);

/* Open connections and requests in progress (metrics). */
int gw_server_connections(void);
int gw_server_in_flight(void);

/* The paygate.request.core module: registers the request userdata and
 * returns { request_methods = fn } (fn(t) sets the Lua methods of req). */
int luaopen_paygate_request_core(lua_State *L);

#endif
