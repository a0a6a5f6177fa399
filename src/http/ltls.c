/*
 * ltls.c -- paygate.tls: the public listener's certificate, replaced in
 * this worker while it serves (paygate.credentials' "tls" set).
 *
 * Each worker holds its own copy of the listener's SSL_CTX (forked from
 * the master), so a swap here changes this worker only: every worker runs
 * its own watch and swaps itself. SSL_new() copies the context's
 * certificate and key into each connection, so a swap changes what new
 * handshakes present and leaves established connections untouched. A
 * worker the master starts later begins with the master's certificate
 * (the one of the last reload) until its own watch applies the set.
 */
#include <string.h>

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include "http_conn.h"
#include "tls.h"

/* Frees what load_pem() made; safe on a half-made set. */
static void
pem_free(X509 *leaf, STACK_OF(X509) *chain, EVP_PKEY *key)
{
    X509_free(leaf);
    sk_X509_pop_free(chain, X509_free);
    EVP_PKEY_free(key);
}

/*
 * Parses the certificate chain (leaf first) and the private key from PEM
 * text. Returns GW_OK with *leaf, *chain (owned by the caller) and *key,
 * or GW_ERR with a reason in msg (never key material).
 */
static int
load_pem(const char *cert, size_t cert_len, const char *key, size_t key_len,
         X509 **leaf, STACK_OF(X509) **chain, EVP_PKEY **pkey,
         char *msg, size_t msglen)
{
    BIO *b = NULL;
    X509 *x;

    *leaf = NULL;
    *chain = NULL;
    *pkey = NULL;
    b = BIO_new_mem_buf(cert, (int) cert_len);
    if (b == NULL) {
        snprintf(msg, msglen, "no memory");
        goto err;
    }
    *leaf = PEM_read_bio_X509(b, NULL, gw_tls_no_password, NULL);
    if (*leaf == NULL) {
        snprintf(msg, msglen, "the certificate is not PEM");
        goto err;
    }
    *chain = sk_X509_new_null();
    if (*chain == NULL) {
        snprintf(msg, msglen, "no memory");
        goto err;
    }
    for (;;) {
        x = PEM_read_bio_X509(b, NULL, gw_tls_no_password, NULL);
        if (x == NULL) {
            break;
        }
        if (!sk_X509_push(*chain, x)) {
            X509_free(x);
            snprintf(msg, msglen, "no memory");
            goto err;
        }
    }
    ERR_clear_error();          /* the end of the PEM text */
    BIO_free(b);
    b = BIO_new_mem_buf(key, (int) key_len);
    if (b == NULL) {
        snprintf(msg, msglen, "no memory");
        goto err;
    }
    *pkey = PEM_read_bio_PrivateKey(b, NULL, gw_tls_no_password, NULL);
    if (*pkey == NULL) {
        snprintf(msg, msglen, "the private key is not PEM (or is "
                 "encrypted)");
        goto err;
    }
    if (X509_check_private_key(*leaf, *pkey) != 1) {
        snprintf(msg, msglen, "the private key does not match the "
                 "certificate");
        goto err;
    }
    BIO_free(b);
    return GW_OK;
err:
    ERR_clear_error();
    BIO_free(b);
    pem_free(*leaf, *chain, *pkey);
    *leaf = NULL;
    *chain = NULL;
    *pkey = NULL;
    return GW_ERR;
}

/*
 * Puts leaf, chain and pkey in ctx, or (s not NULL) in the connection s
 * only. 1 when OpenSSL took all of it. The leaf first: OpenSSL drops the
 * old key when it does not match the new certificate, then the new key
 * goes in; no handshake can run in between (one thread).
 */
static int
use_set(SSL_CTX *ctx, SSL *s, X509 *leaf, STACK_OF(X509) *chain,
        EVP_PKEY *pkey)
{
    int i, ok;

    ok = (s != NULL ? SSL_use_certificate(s, leaf)
                      && SSL_clear_chain_certs(s)
                    : SSL_CTX_use_certificate(ctx, leaf)
                      && SSL_CTX_clear_chain_certs(ctx)) == 1;
    for (i = 0; ok && i < sk_X509_num(chain); i++) {
        ok = (s != NULL ? SSL_add1_chain_cert(s, sk_X509_value(chain, i))
                        : SSL_CTX_add1_chain_cert(ctx,
                                                  sk_X509_value(chain, i)))
             == 1;
    }
    return ok && (s != NULL ? SSL_use_PrivateKey(s, pkey) == 1
                              && SSL_check_private_key(s) == 1
                            : SSL_CTX_use_PrivateKey(ctx, pkey) == 1
                              && SSL_CTX_check_private_key(ctx) == 1);
}

/*
 * Why OpenSSL did not take a set use_set() tried, into msg: its last
 * error's reason ("ee key too small", "ca md too weak": names a check,
 * never holds key material); "no memory" when made_ctx is 0 (no context
 * or connection to try it in). tls.check and tls.set_certificate say it
 * alike.
 */
static void
refused_reason(char *msg, size_t msglen, int made_ctx)
{
    const char *why = ERR_reason_error_string(ERR_peek_last_error());

    snprintf(msg, msglen, "the certificate chain is refused by OpenSSL "
             "(%s: most often a key or a signature below its security "
             "level, such as RSA under 2048 bits or SHA-1)",
             why != NULL ? why : !made_ctx ? "no memory" : "no reason");
}

/*
 * After a swap, the set swapped in is the only one a handshake may
 * present. The context keeps one certificate per key type, and a swap
 * replaces the one of its own type only: on a listener started with an
 * RSA and an ECDSA certificate, a new RSA one would leave the old ECDSA
 * one to every client that offers ECDSA. OpenSSL has no call that drops
 * a context's certificate, so each new connection, before the server
 * picks its certificate, drops the copies it took and takes the
 * context's current one (the set swapped in last).
 */
static int
swapped_only(SSL *s, void *arg)
{
    SSL_CTX *ctx = SSL_get_SSL_CTX(s);
    X509 *leaf = SSL_CTX_get0_certificate(ctx);
    EVP_PKEY *pkey = SSL_CTX_get0_privatekey(ctx);
    STACK_OF(X509) *chain = NULL;

    (void) arg;
    if (leaf == NULL || pkey == NULL
        || SSL_CTX_get0_chain_certs(ctx, &chain) != 1) {
        return 0;
    }
    SSL_certs_clear(s);
    return SSL_use_certificate(s, leaf) == 1
           && SSL_set1_chain(s, chain) == 1
           && SSL_use_PrivateKey(s, pkey) == 1;
}

/* 1 once tls.set_certificate swapped a set into this worker's context:
 * from then on only the context's current certificate is presented
 * (swapped_only), though OpenSSL keeps the other key type's slot. The
 * context is the worker's own and no other call swaps it. */
static int swapped;

/*
 * syntax: ok, err = tls.set_certificate(cert_pem, key_pem)
 * The certificate chain (leaf first) and its private key become what this
 * worker's listener presents to new handshakes. Checked first (PEM, the
 * key matches); on failure nothing changes: nil, err (kind "tls"; when
 * OpenSSL refuses the chain, its reason, as tls.check gives it).
 * Raises when the listener serves plain HTTP (nothing to swap).
 */
static int
ltls_set_certificate(lua_State *L)
{
    size_t cert_len, key_len;
    const char *cert = luaL_checklstring(L, 1, &cert_len);
    const char *key = luaL_checklstring(L, 2, &key_len);
    SSL_CTX *ctx = gw_srv.ssl_ctx;
    STACK_OF(X509) *chain;
    X509 *leaf;
    EVP_PKEY *pkey;
    SSL *dry;
    char msg[256];
    int made, ok;

    if (ctx == NULL) {
        return luaL_error(L, "tls.set_certificate: the listener serves "
                             "plain HTTP (start with --tls-cert)");
    }
    if (load_pem(cert, cert_len, key, key_len, &leaf, &chain, &pkey, msg,
                 sizeof(msg)) != GW_OK) {
        return gw_push_error(L, "tls", 0, "tls.set_certificate: %s", msg);
    }
    /* OpenSSL may refuse a certificate part-way (one under the security
     * level: a weak chain certificate), after the leaf went in and the
     * old key, which does not match it, went out: tried first on a
     * connection of its own (a copy of the context's certificates), the
     * context is changed only when all of it is taken there */
    ERR_clear_error();
    dry = SSL_new(ctx);
    made = dry != NULL;
    ok = made && use_set(ctx, dry, leaf, chain, pkey);
    SSL_free(dry);
    ok = ok && use_set(ctx, NULL, leaf, chain, pkey);
    if (ok) {
        SSL_CTX_set_cert_cb(ctx, swapped_only, NULL);
        swapped = 1;
    } else {
        refused_reason(msg, sizeof(msg), made);
    }
    pem_free(leaf, chain, pkey);
    ERR_clear_error();
    if (!ok) {
        return gw_push_error(L, "tls", 0, "tls.set_certificate: %s", msg);
    }
    lua_pushboolean(L, 1);
    return 1;
}

/*
 * syntax: ok, err = tls.check(cert_pem, key_pem)
 * Whether the listener would take this pair, as tls.set_certificate
 * checks it (load_pem: the chain is PEM, the key loads, it matches the
 * leaf; RSA or ECDSA; then OpenSSL takes all of it into a context of the
 * listener's kind, at the default security level: a 1024-bit RSA key or a
 * SHA-1-signed chain certificate is refused, as a start or a swap refuses
 * it), changing nothing: paygate doctor's check of the listener's
 * certificate, the tls section's files or the set in etcd, and the
 * validation of a set for etcd (paygate.credentials). Needs no listener.
 * true, or nil, err (kind "tls"; never key material).
 */
static int
ltls_check(lua_State *L)
{
    size_t cert_len, key_len;
    const char *cert = luaL_checklstring(L, 1, &cert_len);
    const char *key = luaL_checklstring(L, 2, &key_len);
    STACK_OF(X509) *chain;
    X509 *leaf;
    EVP_PKEY *pkey;
    SSL_CTX *ctx;
    char msg[256];
    int ok;

    if (load_pem(cert, cert_len, key, key_len, &leaf, &chain, &pkey, msg,
                 sizeof(msg)) != GW_OK) {
        return gw_push_error(L, "tls", 0, "%s", msg);
    }
    ERR_clear_error();
    ctx = SSL_CTX_new(TLS_server_method());
    ok = ctx != NULL && use_set(ctx, NULL, leaf, chain, pkey);
    if (!ok) {
        refused_reason(msg, sizeof(msg), ctx != NULL);
    }
    SSL_CTX_free(ctx);
    pem_free(leaf, chain, pkey);
    ERR_clear_error();
    if (!ok) {
        return gw_push_error(L, "tls", 0, "%s", msg);
    }
    lua_pushboolean(L, 1);
    return 1;
}

/* Pushes x's serial as uppercase hex; 0 when out of memory. */
static int
push_serial(lua_State *L, X509 *x)
{
    BIGNUM *bn = ASN1_INTEGER_to_BN(X509_get0_serialNumber(x), NULL);
    char *hex = bn ? BN_bn2hex(bn) : NULL;

    BN_free(bn);
    if (hex == NULL) {
        return 0;
    }
    lua_pushstring(L, hex);
    OPENSSL_free(hex);
    return 1;
}

/*
 * syntax: serial[, serial2] = tls.serial() -- the serial (uppercase hex)
 * of each certificate the listener presents, or nil when it serves plain
 * HTTP. Started with tls.cert and tls.ecdsa_cert, it presents both (the
 * one each client can use): two values, the RSA one first (OpenSSL's
 * "current" certificate alone would be the last loaded). After
 * tls.set_certificate, the one swapped in alone.
 */
static int
ltls_serial(lua_State *L)
{
    SSL_CTX *ctx = gw_srv.ssl_ctx;
    X509 *cur = ctx ? SSL_CTX_get0_certificate(ctx) : NULL;
    int n = 0, more, ok = 1;

    if (cur == NULL) {
        lua_pushnil(L);
        return 1;
    }
    if (swapped) {
        ok = push_serial(L, cur);
        n = 1;
    } else {
        /* each slot that holds a certificate and its key, in OpenSSL's
         * order (RSA before ECDSA); then the current one as it was: a
         * handshake or a later swap reads it */
        luaL_checkstack(L, 16, "tls.serial");
        more = SSL_CTX_set_current_cert(ctx, SSL_CERT_SET_FIRST);
        while (more == 1 && ok) {
            ok = push_serial(L, SSL_CTX_get0_certificate(ctx));
            n++;
            more = SSL_CTX_set_current_cert(ctx, SSL_CERT_SET_NEXT);
        }
        SSL_CTX_select_current_cert(ctx, cur);
        if (n == 0) {
            ok = push_serial(L, cur);
            n = 1;
        }
    }
    ERR_clear_error();
    if (!ok) {
        return luaL_error(L, "tls.serial: no memory");
    }
    return n;
}

/* syntax: on = tls.enabled() -- whether the listener serves HTTPS */
static int
ltls_enabled(lua_State *L)
{
    lua_pushboolean(L, gw_srv.ssl_ctx != NULL);
    return 1;
}

static const luaL_Reg ltls_funcs[] = {
    { "set_certificate", ltls_set_certificate },
    { "check", ltls_check },
    { "serial", ltls_serial },
    { "enabled", ltls_enabled },
    { NULL, NULL }
};

int
luaopen_paygate_tls(lua_State *L)
{
    lua_newtable(L);
    luaL_register(L, NULL, ltls_funcs);
    return 1;
}
