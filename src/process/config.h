/*
 * config.h -- `paygate run` options: defaults, then the config file (a Lua
 * table), then command-line flags, validated once.
 */
#ifndef GW_CONFIG_H
#define GW_CONFIG_H

#include "http_server.h"
#include "runtime.h"
#include "shdict.h"

struct gw_opts {
    const char           *app_dir;        /* argv; not owned */
    const char           *config_file;    /* argv, or NULL */
    char                  listen[256];    /* "HOST:PORT" */
    char                  admin[256];     /* "HOST:PORT", or "" for none */
    char                  pid_file[1024]; /* or "" */
    char                  resolver[64];   /* DNS "IP:PORT", "" resolv.conf */
    char                  tls_cert[1024]; /* PEM paths, or "" */
    char                  tls_key[1024];
    char                  tls_client_ca[1024];
    char                  tls_ecdsa_cert[1024]; /* a second certificate
                                             (ECDSA beside RSA), or "" */
    char                  tls_ecdsa_key[1024];
    char                  tls_protocols[64];  /* "TLSv1.2 TLSv1.3" */
    char                  tls_ciphers[512];   /* TLS 1.2 cipher list */
    char                  tls_ciphersuites[256]; /* TLS 1.3 suites, or ""
                                             (OpenSSL's: all AEAD) */
    int                   tls_session_cache;  /* sessions per worker */
    int                   tls_session_tickets;/* 0: none issued */
    double                tls_ticket_rotation;/* s between ticket-key
                                             rotations (session life) */
    int                   workers;        /* processes; >= 1 */
    double                shutdown_timeout; /* s to drain on TERM */
    double                upgrade_timeout; /* s an upgrade's new master
                                             has to serve, all its workers
                                             loaded, before it is told to
                                             stop (the old one's value) */
    double                loop_stall;     /* s a worker's loop may go
                                             without turning before the
                                             master kills it (0: never;
                                             limits.loop_stall) */
    enum gw_log_level     log_level;
    struct gw_server_conf server;
    struct {
        char              name[64];
        size_t            size;           /* bytes */
    }                     shared[GW_SHD_MAX_DICTS]; /* config `shared` */
    int                   nshared;
    char                  near_miss[256]; /* top-level keys of the file
                                             that look like a misspelt
                                             runtime key ("'worker' (did
                                             you mean 'workers'?)"), or "" */
};

/* The most workers `paygate run` takes (--workers, config workers). */
#define GW_MAX_WORKERS 128

/* limits.loop_stall's default (s): the default request_timeout, so no
 * request of a worker killed for it could still have been answered in
 * time; far above any synchronous work a loop turn should do (a 4096-bit
 * RSA key is made in about a second). */
#define GW_LOOP_STALL_DEFAULT 30

/* Defaults: 127.0.0.1:8080, admin 127.0.0.1:9090, a worker per core. */
void gw_opts_defaults(struct gw_opts *o);

/*
 * Reads the config file's known keys into o. Unknown top-level keys are
 * the app's (paygate.config); unknown keys inside limits/tls are typos and
 * an error. A top-level key one slip from a runtime key (`worker`,
 * `log-level`, `Listen`) is still the app's, and named in o->near_miss
 * for a warning. Returns GW_OK, or GW_ERR with a one-line reason in err.
 */
int gw_opts_load_file(struct gw_opts *o, const char *path, char *err,
                      size_t errlen);

/* Names the runtime keys whose values differ between a and b (both read
 * from a file over the defaults) in out, comma-separated ("listen,
 * limits.request_timeout"); "" when none does. */
void gw_opts_diff(const struct gw_opts *a, const struct gw_opts *b,
                  char *out, size_t outlen);

/* Splits "HOST:PORT" / "[V6]:PORT" / "PORT" and binds a listening socket
 * (non-blocking). Returns the fd, or -1 with a reason in err; then
 * *transient is 1 when the address may bind later as it is (in use by
 * another process, or not yet on this host: an interface still coming
 * up), 0 when the configuration must change. */
int gw_listen(const char *spec, int backlog, char *err, size_t errlen,
              int *transient);

/* Checks that fd, inherited from the master an upgrade replaces, is a
 * listening TCP socket bound to spec's address (any port for a spec on
 * port 0), and makes it close-on-exec and non-blocking. Returns GW_OK, or
 * GW_ERR with a reason in err. */
int gw_listen_inherited(int fd, const char *spec, char *err, size_t errlen);

/* The address fd is bound to, "HOST:PORT" ("[V6]:PORT"), in buf (the port
 * a listen on port 0 got too); spec when it cannot be told. */
const char *gw_bound_addr(int fd, const char *spec, char *buf, size_t len);

#endif
