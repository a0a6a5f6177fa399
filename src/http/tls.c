/*
 * tls.c -- see tls.h.
 */
#include <stdio.h>

#include <openssl/err.h>

#include "tls.h"

static void
ssl_reason(char *err, size_t errlen, const char *what, const char *path)
{
    char buf[256];
    unsigned long e = ERR_peek_last_error();

    ERR_error_string_n(e, buf, sizeof(buf));
    snprintf(err, errlen, "%s %s: %s", what, path, e ? buf : "failed");
    ERR_clear_error();
}

SSL_CTX *
gw_tls_server_ctx(const char *cert, const char *key, const char *client_ca,
                  char *err, size_t errlen)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());

    if (ctx == NULL) {
        snprintf(err, errlen, "tls: no memory");
        return NULL;
    }
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE
                          | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER
                          | SSL_MODE_RELEASE_BUFFERS);
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION
                             | SSL_OP_CIPHER_SERVER_PREFERENCE);
    if (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1) {
        ssl_reason(err, errlen, "tls certificate", cert);
        goto err;
    }
    if (SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1) {
        ssl_reason(err, errlen, "tls key", key);
        goto err;
    }
    if (SSL_CTX_check_private_key(ctx) != 1) {
        snprintf(err, errlen, "tls key %s does not match certificate %s",
                 key, cert);
        ERR_clear_error();
        goto err;
    }
    if (client_ca != NULL && client_ca[0] != '\0') {
        STACK_OF(X509_NAME) *names;

        if (SSL_CTX_load_verify_locations(ctx, client_ca, NULL) != 1) {
            ssl_reason(err, errlen, "tls client CA", client_ca);
            goto err;
        }
        names = SSL_load_client_CA_file(client_ca);
        if (names != NULL) {
            SSL_CTX_set_client_CA_list(ctx, names);
        }
        SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER
                                | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
    }
    return ctx;
err:
    SSL_CTX_free(ctx);
    return NULL;
}
