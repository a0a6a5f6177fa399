/*
 * tls.h -- the public listener's TLS context, and the session-ticket keys
 * every worker of one `paygate run` shares (kept across reloads).
 */
#ifndef GW_TLS_H
#define GW_TLS_H

#include <stddef.h>
#include <stdint.h>
#include <openssl/ssl.h>

struct gw_tls_conf {
    const char *cert;           /* PEM chain path */
    const char *key;            /* PEM key path */
    const char *cert2;          /* a second chain of another key type
                                   (ECDSA beside RSA), or NULL / "" */
    const char *key2;           /* its key, or NULL / "" */
    const char *client_ca;      /* required client certs' CA, NULL / "" */
    const char *protocols;      /* "TLSv1.2 TLSv1.3" (any of the two) */
    const char *ciphers;        /* TLS 1.2 cipher list; NULL / "": ours */
    const char *ciphersuites;   /* TLS 1.3 suites (OpenSSL's syntax);
                                   NULL / "": OpenSSL's (all AEAD) */
    int         session_cache;  /* sessions cached per worker; 0: none */
    int         no_tickets;     /* 1: no session tickets issued */
    double      ticket_rotation;/* s between ticket-key rotations: a
                                   session lives twice that at most */
};

#define GW_TLS_PROTOCOLS "TLSv1.2 TLSv1.3"
#define GW_TLS_CIPHERS   "ECDHE+AESGCM:ECDHE+CHACHA20"

/* A context from conf: TLS 1.2+ as conf->protocols says; with the shared
 * ticket keys when gw_tls_tickets_init() ran. Returns NULL with a reason
 * in err (never key material). */
SSL_CTX *gw_tls_server_ctx(const struct gw_tls_conf *conf, char *err,
                           size_t errlen);

/* The pass-phrase callback for every PEM the listener reads: none (an
 * encrypted key fails to load instead of prompting on the terminal). */
int gw_tls_no_password(char *buf, int size, int rwflag, void *u);

/* Whether the first certificate of the PEM file at path (the leaf) is
 * out of its validity now: 1 with why in msg (expired, or not valid yet,
 * and when), else 0 (a path NULL or "" too). */
int gw_tls_cert_dates(const char *path, char *msg, size_t msglen);

/* Master, before forking: maps the ticket keys shared with every worker
 * (and every later generation) and makes the first one. GW_OK/GW_ERR. */
int gw_tls_tickets_init(void);

/* Master: a new current key; the current one becomes the previous one,
 * still accepted (its tickets resume and are renewed) until the next
 * rotation drops it. GW_OK, or GW_ERR (no randomness: keys unchanged). */
int gw_tls_tickets_rotate(void);

/* Rotations so far. */
uint64_t gw_tls_tickets_rotations(void);

#endif
