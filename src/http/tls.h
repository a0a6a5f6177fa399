/*
 * tls.h -- the public listener's TLS context.
 */
#ifndef GW_TLS_H
#define GW_TLS_H

#include <stddef.h>
#include <openssl/ssl.h>

/* TLS 1.2+ server context from PEM files; client_ca (may be NULL or "")
 * makes client certificates required and verified against it. Returns
 * NULL with a reason in err (never key material). */
SSL_CTX *gw_tls_server_ctx(const char *cert, const char *key,
                           const char *client_ca, char *err, size_t errlen);

#endif
