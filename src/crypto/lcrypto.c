/*
 * lcrypto.c -- paygate.crypto, the Lua binding of crypto.h: loading keys,
 * RSA / SM2 signatures, AEAD (AES-256-GCM, SM4-GCM), RSA-OAEP, digests,
 * HMAC, random nonces, strict base64 and hex. Key and certificate handles
 * are lobjects.c's; the digest object is this module's own.
 *
 * Every expected failure returns nil, err (gw_push_error) with a stable
 * kind; misuse (wrong argument types) raises.
 */
#include <limits.h>
#include <pthread.h>
#include <string.h>
#include <sys/mman.h>
#include <stdlib.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include <lua.h>
#include <lauxlib.h>

#include "lstate.h"
#include "runtime.h"
#include "crypto.h"
#include "lobjects.h"

#define GW_DIGEST_MT "paygate.crypto.digest"

/* ---- Lua: loading ------------------------------------------------------ */

/* syntax: key, err = crypto.private_key(pem_or_der[, password]) */
static int
lcrypto_private_key(lua_State *L)
{
    size_t len, passlen = 0;
    const char *in = luaL_checklstring(L, 1, &len);
    const char *pass = luaL_optlstring(L, 2, NULL, &passlen);
    const char *kind = "internal";
    char msg[GW_ERRMSG_MAX] = "";
    EVP_PKEY *pkey;

    if (gw_crypto_load_private_key((const unsigned char *)in, len, pass,
                                   passlen, &pkey, NULL, &kind, msg,
                                   sizeof(msg)) != GW_OK)
    {
        return gw_push_error(L, kind, 0, "load private key: %s", msg);
    }
    if (gw_key_push(L, pkey, 1) == NULL) {
        EVP_PKEY_free(pkey);
        return gw_push_error(L, "unsupported_key_type", 0, "load private "
                             "key: unsupported key");
    }
    EVP_PKEY_free(pkey);
    return 1;
}

/* syntax: key, cert = crypto.pkcs12(der, password); cert may be nil */
static int
lcrypto_pkcs12(lua_State *L)
{
    size_t len, passlen = 0;
    const char *in = luaL_checklstring(L, 1, &len);
    const char *pass = luaL_optlstring(L, 2, NULL, &passlen);
    const char *kind = "internal";
    char msg[GW_ERRMSG_MAX] = "";
    EVP_PKEY *pkey;
    X509 *cert = NULL;

    if (gw_crypto_load_private_key((const unsigned char *)in, len, pass,
                                   passlen, &pkey, &cert, &kind, msg,
                                   sizeof(msg)) != GW_OK)
    {
        return gw_push_error(L, kind, 0, "load pkcs12: %s", msg);
    }
    if (gw_key_push(L, pkey, 1) == NULL) {
        EVP_PKEY_free(pkey);
        X509_free(cert);
        return gw_push_error(L, "unsupported_key_type", 0, "load pkcs12: "
                             "unsupported key");
    }
    EVP_PKEY_free(pkey);
    if (cert != NULL) {
        gw_cert_push(L, cert);
        X509_free(cert);
    } else {
        lua_pushnil(L);
    }
    return 2;
}

/* syntax: key, err = crypto.public_key(pem_or_der) */
static int
lcrypto_public_key(lua_State *L)
{
    size_t len;
    const char *in = luaL_checklstring(L, 1, &len);
    const char *kind = "internal";
    char msg[GW_ERRMSG_MAX] = "";
    EVP_PKEY *pkey;

    if (gw_crypto_load_public_key((const unsigned char *)in, len, &pkey,
                                  &kind, msg, sizeof(msg)) != GW_OK)
    {
        return gw_push_error(L, kind, 0, "load public key: %s", msg);
    }
    if (gw_key_push(L, pkey, 0) == NULL) {
        EVP_PKEY_free(pkey);
        return gw_push_error(L, "unsupported_key_type", 0, "load public "
                             "key: unsupported key");
    }
    EVP_PKEY_free(pkey);
    return 1;
}

/* syntax: ok, err = crypto.check_pair(private_key, cert_or_public_key) */
static int
lcrypto_check_pair(lua_State *L)
{
    struct gw_key *k = gw_key_check(L, 1);
    struct gw_keyinfo *pub = gw_verifier_check(L, 2);

    if (pub->pkey == NULL || EVP_PKEY_eq(k->ki.pkey, pub->pkey) != 1) {
        ERR_clear_error();
        return gw_push_error(L, "key_cert_mismatch", 0, "the private key "
                             "does not match the certificate / public key "
                             "(check that apiclient_key.pem and "
                             "apiclient_cert.pem belong together)");
    }
    lua_pushboolean(L, 1);
    return 1;
}

/* ---- Lua: signatures --------------------------------------------------- */

static int
gw_opt_alg(lua_State *L, int idx, struct gw_keyinfo *ki)
{
    const char *name;
    int alg;

    if (lua_isnoneornil(L, idx)) {
        return ki->type == GW_KEY_RSA ? GW_ALG_SHA256_RSA : GW_ALG_SM2_SM3;
    }
    name = luaL_checkstring(L, idx);
    alg = gw_crypto_alg(name);
    return alg;
}

static int
gw_sign_common(lua_State *L, int b64)
{
    struct gw_key *k = gw_key_check(L, 1);
    size_t len, siglen;
    const char *data = luaL_checklstring(L, 2, &len);
    int alg = gw_opt_alg(L, 3, &k->ki);
    const char *kind = "internal";
    char msg[GW_ERRMSG_MAX] = "";
    unsigned char sig[1024], b64sig[1400];

    if (alg == 0) {
        return gw_push_error(L, "unsupported_algorithm", 0, "sign: unknown "
                             "algorithm %s (sha256-rsa or sm2-sm3)",
                             lua_tostring(L, 3));
    }
    if ((size_t)EVP_PKEY_get_size(k->ki.pkey) > sizeof(sig)) {
        return gw_push_error(L, "unsupported_key_type", 0, "sign: key too "
                             "large");
    }
    siglen = sizeof(sig);
    if (gw_crypto_sign(&k->ki, alg, (const unsigned char *)data, len, sig,
                       &siglen, &kind, msg, sizeof(msg)) != GW_OK)
    {
        return gw_push_error(L, kind, 0, "sign: %s", msg);
    }
    if (b64) {
        int n = EVP_EncodeBlock(b64sig, sig, (int)siglen);

        lua_pushlstring(L, (const char *)b64sig, (size_t)n);
    } else {
        lua_pushlstring(L, (const char *)sig, siglen);
    }
    return 1;
}

/* syntax: sig, err = crypto.sign(private_key, data[, alg]) -- raw bytes */
static int
lcrypto_sign(lua_State *L)
{
    return gw_sign_common(L, 0);
}

/* syntax: sig_b64, err = crypto.sign_base64(private_key, data[, alg]) */
static int
lcrypto_sign_base64(lua_State *L)
{
    return gw_sign_common(L, 1);
}

static int
gw_verify_common(lua_State *L, int b64)
{
    struct gw_keyinfo *ki = gw_verifier_check(L, 1);
    size_t len, siglen;
    const char *data = luaL_checklstring(L, 2, &len);
    const char *sig = luaL_checklstring(L, 3, &siglen);
    int alg = gw_opt_alg(L, 4, ki);
    const char *kind = "internal";
    char msg[GW_ERRMSG_MAX] = "";
    unsigned char raw[1024];
    long n;

    if (alg == 0) {
        return gw_push_error(L, "unsupported_algorithm", 0, "verify: "
                             "unknown algorithm %s (sha256-rsa or sm2-sm3)",
                             lua_tostring(L, 4));
    }
    if (b64) {
        if (siglen > sizeof(raw) / 3 * 4
            || (n = gw_base64_decode(sig, siglen, raw)) < 0)
        {
            return gw_push_error(L, "signature_mismatch", 0, "verify: "
                                 "signature is not valid base64");
        }
        sig = (const char *)raw;
        siglen = (size_t)n;
    }
    if (gw_crypto_verify(ki, alg, (const unsigned char *)data, len,
                         (const unsigned char *)sig, siglen, &kind, msg,
                         sizeof(msg)) != GW_OK)
    {
        return gw_push_error(L, kind, 0, "verify: %s", msg);
    }
    lua_pushboolean(L, 1);
    return 1;
}

/* syntax: ok, err = crypto.verify(key_or_cert, data, sig[, alg]) */
static int
lcrypto_verify(lua_State *L)
{
    return gw_verify_common(L, 0);
}

/* syntax: ok, err = crypto.verify_base64(key_or_cert, data, b64[, alg]) */
static int
lcrypto_verify_base64(lua_State *L)
{
    return gw_verify_common(L, 1);
}

/* ---- Lua: AEAD --------------------------------------------------------- */

static int
gw_aead_common(lua_State *L, int enc)
{
    size_t keylen, noncelen, aadlen, len, outlen;
    const char *alg = luaL_checkstring(L, 1);
    const char *key = luaL_checklstring(L, 2, &keylen);
    const char *nonce = luaL_checklstring(L, 3, &noncelen);
    const char *aad = luaL_optlstring(L, 4, "", &aadlen);
    const char *in = luaL_checklstring(L, 5, &len);
    const char *kind = "internal";
    char msg[GW_ERRMSG_MAX] = "";
    unsigned char *out;
    int rc;

    outlen = enc ? len + 16 : (len >= 16 ? len - 16 : 0);
    out = malloc(outlen + 16);
    if (out == NULL) {
        return luaL_error(L, "aead: out of memory");
    }
    rc = (enc ? gw_aead_encrypt : gw_aead_decrypt)(alg,
            (const unsigned char *)key, keylen,
            (const unsigned char *)nonce, noncelen,
            (const unsigned char *)aad, aadlen,
            (const unsigned char *)in, len, out, &kind, msg, sizeof(msg));
    if (rc != GW_OK) {
        OPENSSL_cleanse(out, outlen + 16);
        free(out);
        return gw_push_error(L, kind, 0, "%s: %s", enc ? "aead encrypt"
                             : "aead decrypt", msg);
    }
    lua_pushlstring(L, (const char *)out, outlen);
    OPENSSL_cleanse(out, outlen + 16);
    free(out);
    return 1;
}

/* syntax: ct_tag, err = crypto.aead_encrypt(alg, key, nonce, aad, pt) */
static int
lcrypto_aead_encrypt(lua_State *L)
{
    return gw_aead_common(L, 1);
}

/* syntax: pt, err = crypto.aead_decrypt(alg, key, nonce, aad, ct_tag) */
static int
lcrypto_aead_decrypt(lua_State *L)
{
    return gw_aead_common(L, 0);
}

/* syntax: key16 = crypto.sm4_key(apiv3_key) -- SM3(key)[0:16], the
 * AEAD_SM4_GCM key WeChat Pay derives from the APIv3 key */
static int
lcrypto_sm4_key(lua_State *L)
{
    size_t len;
    const char *k = luaL_checklstring(L, 1, &len);
    unsigned char key[16];

    if (gw_crypto_sm4_key((const unsigned char *)k, len, key) != GW_OK) {
        return gw_push_error(L, "internal", 0, "sm4_key: sm3 failed");
    }
    lua_pushlstring(L, (const char *)key, 16);
    OPENSSL_cleanse(key, sizeof(key));
    return 1;
}

/* ---- Lua: RSA-OAEP (SHA-1, MGF1-SHA-1, empty label) -------------------- */

/* syntax: ct, err = crypto.oaep_encrypt(cert_or_public_key, data) -- raw */
static int
lcrypto_oaep_encrypt(lua_State *L)
{
    struct gw_keyinfo *ki = gw_verifier_check(L, 1);
    size_t len, outlen = 1024;
    const char *in = luaL_checklstring(L, 2, &len);
    const char *kind = "internal";
    char msg[GW_ERRMSG_MAX] = "";
    unsigned char out[1024];

    if (gw_crypto_oaep_encrypt(ki, (const unsigned char *)in, len, out,
                               &outlen, &kind, msg, sizeof(msg)) != GW_OK)
    {
        return gw_push_error(L, kind, 0, "%s", msg);
    }
    lua_pushlstring(L, (const char *)out, outlen);
    return 1;
}

/* syntax: ct, err = crypto.sm2_encrypt(cert_or_public_key, data)
 * returns: the raw DER C1C3C2 ciphertext (base64 it for WeChat), or nil,
 * err (key_type_mismatch, too_long, internal). */
static int
lcrypto_sm2_encrypt(lua_State *L)
{
    struct gw_keyinfo *ki = gw_verifier_check(L, 1);
    size_t len, outlen = 0;
    const char *in = luaL_checklstring(L, 2, &len);
    const char *kind = "internal";
    char msg[GW_ERRMSG_MAX] = "";
    unsigned char *out;

    if (gw_crypto_sm2_encrypt(ki, (const unsigned char *)in, len, &out,
                              &outlen, &kind, msg, sizeof(msg)) != GW_OK)
    {
        return gw_push_error(L, kind, 0, "%s", msg);
    }
    lua_pushlstring(L, (const char *)out, outlen);  /* raises only on OOM */
    free(out);
    return 1;
}

/* syntax: pt, err = crypto.sm2_decrypt(private_key, ct)
 * returns: the plaintext, or nil, err (key_type_mismatch, decrypt_failed) */
static int
lcrypto_sm2_decrypt(lua_State *L)
{
    struct gw_key *k = gw_key_check(L, 1);
    size_t len, outlen = 0;
    const char *in = luaL_checklstring(L, 2, &len);
    const char *kind = "internal";
    char msg[GW_ERRMSG_MAX] = "";
    unsigned char *out;

    if (gw_crypto_sm2_decrypt(&k->ki, (const unsigned char *)in, len, &out,
                              &outlen, &kind, msg, sizeof(msg)) != GW_OK)
    {
        return gw_push_error(L, kind, 0, "%s", msg);
    }
    lua_pushlstring(L, (const char *)out, outlen);
    OPENSSL_cleanse(out, outlen);
    free(out);
    return 1;
}

/* syntax: pt, err = crypto.oaep_decrypt(private_key, ct) */
static int
lcrypto_oaep_decrypt(lua_State *L)
{
    struct gw_key *k = gw_key_check(L, 1);
    size_t len, outlen = 1024;
    const char *in = luaL_checklstring(L, 2, &len);
    const char *kind = "internal";
    char msg[GW_ERRMSG_MAX] = "";
    unsigned char out[1024];

    if (gw_crypto_oaep_decrypt(&k->ki, (const unsigned char *)in, len, out,
                               &outlen, &kind, msg, sizeof(msg)) != GW_OK)
    {
        return gw_push_error(L, kind, 0, "%s", msg);
    }
    lua_pushlstring(L, (const char *)out, outlen);
    OPENSSL_cleanse(out, sizeof(out));
    return 1;
}

/* ---- Lua: digests, HMAC, random ---------------------------------------- */

static const EVP_MD *
gw_check_md(lua_State *L, int idx)
{
    const char *name = luaL_checkstring(L, idx);
    const EVP_MD *md = gw_crypto_md(name);

    if (md == NULL) {
        luaL_argerror(L, idx, "unknown digest (sha1, sha256, sm3, sha512)");
    }
    return md;
}

/* syntax: raw = crypto.digest(alg, data) */
static int
lcrypto_digest(lua_State *L)
{
    const EVP_MD *md = gw_check_md(L, 1);
    size_t len;
    const char *data = luaL_checklstring(L, 2, &len);
    unsigned char out[EVP_MAX_MD_SIZE];
    unsigned int n = 0;

    if (EVP_Digest(data, len, out, &n, md, NULL) != 1) {
        ERR_clear_error();
        return gw_push_error(L, "internal", 0, "digest failed");
    }
    lua_pushlstring(L, (const char *)out, n);
    return 1;
}

struct gw_digest {
    EVP_MD_CTX *ctx;              /* owned; NULL after final() or __gc */
};

/* syntax: d = crypto.digest_new(alg); d:update(s); raw = d:final() */
static int
lcrypto_digest_new(lua_State *L)
{
    const EVP_MD *md = gw_check_md(L, 1);
    struct gw_digest *d = lua_newuserdata(L, sizeof(*d));

    d->ctx = NULL;
    luaL_getmetatable(L, GW_DIGEST_MT);
    lua_setmetatable(L, -2);
    d->ctx = EVP_MD_CTX_new();
    if (d->ctx == NULL || EVP_DigestInit_ex(d->ctx, md, NULL) != 1) {
        ERR_clear_error();
        return gw_push_error(L, "internal", 0, "digest init failed");
    }
    return 1;
}

static struct gw_digest *
gw_digest_check(lua_State *L)
{
    struct gw_digest *d = gw_checkudata(L, 1, GW_DIGEST_MT);

    if (d->ctx == NULL) {
        luaL_error(L, "digest already finalized");
    }
    return d;
}

static int
ldigest_update(lua_State *L)
{
    struct gw_digest *d = gw_digest_check(L);
    size_t len;
    const char *s = luaL_checklstring(L, 2, &len);

    if (EVP_DigestUpdate(d->ctx, s, len) != 1) {
        ERR_clear_error();
        return gw_push_error(L, "internal", 0, "digest update failed");
    }
    lua_settop(L, 1);
    return 1;
}

static int
ldigest_final(lua_State *L)
{
    struct gw_digest *d = gw_digest_check(L);
    unsigned char out[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    int ok = EVP_DigestFinal_ex(d->ctx, out, &n) == 1;

    EVP_MD_CTX_free(d->ctx);
    d->ctx = NULL;
    if (!ok) {
        ERR_clear_error();
        return gw_push_error(L, "internal", 0, "digest final failed");
    }
    lua_pushlstring(L, (const char *)out, n);
    return 1;
}

static int
ldigest_gc(lua_State *L)
{
    struct gw_digest *d = gw_testudata(L, 1, GW_DIGEST_MT);

    if (d == NULL) {
        return 0;                       /* not ours: see gw_testudata */
    }

    EVP_MD_CTX_free(d->ctx);
    d->ctx = NULL;
    return 0;
}

/* syntax: raw = crypto.hmac(alg, key, data) */
static int
lcrypto_hmac(lua_State *L)
{
    const EVP_MD *md = gw_check_md(L, 1);
    size_t klen, len;
    const char *key = luaL_checklstring(L, 2, &klen);
    const char *data = luaL_checklstring(L, 3, &len);
    unsigned char out[EVP_MAX_MD_SIZE];
    unsigned int n = 0;

    if (klen > INT_MAX || HMAC(md, key, (int)klen,
                               (const unsigned char *)data, len, out,
                               &n) == NULL)
    {
        ERR_clear_error();
        return gw_push_error(L, "internal", 0, "hmac failed");
    }
    lua_pushlstring(L, (const char *)out, n);
    return 1;
}

/*
 * Nonces, and random_bytes up to 256 bytes, draw their bytes from a small
 * per-process pool filled by RAND_bytes 4 KiB at a time: one CSPRNG call
 * per ~100 nonces instead of one per nonce (a signed request or answer
 * makes one). Every byte still
 * comes straight from the CSPRNG, so a token drawn from here (a session
 * id, an API key) is as unpredictable as one read directly. The price: up
 * to 4 KiB of output not yet handed out (nonces, and the keys and tokens
 * random_bytes will give) waits in the process's memory -- its page is
 * left out of core dumps (MADV_DONTDUMP), OpenSSL's own generator state
 * is not; a byte is zeroed as it is handed out.
 * A fork empties the pool in the child (pthread_atfork), so two workers
 * never hand out the same bytes. No lock: a process runs Lua on its loop
 * thread only.
 */
#define GW_NONCE_POOL 4096

/* one page of its own, left out of core dumps (MADV_DONTDUMP) */
static unsigned char gw_nonce_pool[GW_NONCE_POOL]
    __attribute__((aligned(GW_NONCE_POOL)));
static size_t gw_nonce_left;            /* unread bytes at the pool's end */
static int gw_nonce_atfork;

static void
gw_nonce_pool_forget(void)
{
    OPENSSL_cleanse(gw_nonce_pool, sizeof(gw_nonce_pool));
    gw_nonce_left = 0;
}

/* the next random byte; -1 when the CSPRNG fails, -2 when the fork
 * handler cannot be registered (no pool is filled without it) */
static int
gw_nonce_byte(void)
{
    if (gw_nonce_left == 0) {
        if (!gw_nonce_atfork) {
            if (pthread_atfork(NULL, NULL, gw_nonce_pool_forget) != 0) {
                return -2;
            }
            gw_nonce_atfork = 1;
#ifdef MADV_DONTDUMP
            (void) madvise(gw_nonce_pool, sizeof(gw_nonce_pool),
                           MADV_DONTDUMP);     /* best effort */
#endif
        }
        if (RAND_bytes(gw_nonce_pool, sizeof(gw_nonce_pool)) != 1) {
            return -1;
        }
        gw_nonce_left = sizeof(gw_nonce_pool);
    }
    {
        unsigned char *b = &gw_nonce_pool[sizeof(gw_nonce_pool)
                                          - gw_nonce_left--];
        int c = *b;

        *b = 0;
        return c;
    }
}

/* syntax: s = crypto.random_nonce([n]) -- n alphanumerics, default 32 */
static int
lcrypto_random_nonce(lua_State *L)
{
    static const char alphabet[] =
        "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    lua_Integer want = luaL_optinteger(L, 1, 32);
    char out[1024];
    int n = 0, c;

    luaL_argcheck(L, want >= 1 && want <= (lua_Integer)sizeof(out), 1,
                  "nonce length must be 1..1024");
    while (n < want) {
        if ((c = gw_nonce_byte()) < 0) {
            ERR_clear_error();
            return gw_push_error(L, "internal", 1, c == -2
                                 ? "random: cannot register the fork handler"
                                 : "random: CSPRNG failed");
        }
        if (c < 248) {                  /* 248 = 4 * 62: no modulo bias */
            out[n++] = alphabet[c % 62];
        }
    }
    lua_pushlstring(L, out, (size_t)n);
    OPENSSL_cleanse(out, (size_t)n);    /* it may be a token: no stack copy */
    return 1;
}

/* syntax: raw = crypto.random_bytes(n)
 * Up to GW_POOL_DRAW bytes come from the nonce pool above (a request id,
 * a token, a key: as unpredictable, without a CSPRNG call each: RAND_bytes
 * costs microseconds, a fork check and a lock included); more are read
 * from RAND_bytes directly. */
#define GW_POOL_DRAW 256

static int
lcrypto_random_bytes(lua_State *L)
{
    lua_Integer want = luaL_checkinteger(L, 1);
    unsigned char out[4096];

    luaL_argcheck(L, want >= 0 && want <= (lua_Integer)sizeof(out), 1,
                  "length must be 0..4096");
    if (want <= GW_POOL_DRAW) {
        lua_Integer i;
        int c;

        for (i = 0; i < want; i++) {
            if ((c = gw_nonce_byte()) < 0) {
                ERR_clear_error();
                OPENSSL_cleanse(out, (size_t)i);
                return gw_push_error(L, "internal", 1, c == -2
                    ? "random: cannot register the fork handler"
                    : "random: CSPRNG failed");
            }
            out[i] = (unsigned char)c;
        }
    } else if (RAND_bytes(out, (int)want) != 1) {
        ERR_clear_error();
        return gw_push_error(L, "internal", 1, "random: CSPRNG failed");
    }
    lua_pushlstring(L, (const char *)out, (size_t)want);
    OPENSSL_cleanse(out, (size_t)want);
    return 1;
}

/* ---- Lua: base64, hex, comparison ------------------------------------- */

/* syntax: s = crypto.base64_encode(raw) */
static int
lcrypto_base64_encode(lua_State *L)
{
    size_t len;
    const char *s = luaL_checklstring(L, 1, &len);
    char *out;
    long n;

    if (len > (size_t)INT_MAX / 2) {
        return luaL_error(L, "base64_encode: input too large");
    }
    out = malloc((len + 2) / 3 * 4 + 1);
    if (out == NULL) {
        return luaL_error(L, "base64_encode: out of memory");
    }
    n = gw_base64_encode((const unsigned char *)s, len, out);
    lua_pushlstring(L, out, (size_t)n);
    free(out);
    return 1;
}

/* syntax: raw, err = crypto.base64_decode(s) -- strict (err.kind
 * bad_base64). Decoded secrets (keys, ciphertexts) pass through here:
 * the buffer is cleansed. */
static int
lcrypto_base64_decode(lua_State *L)
{
    size_t len;
    const char *s = luaL_checklstring(L, 1, &len);
    unsigned char *out = malloc(len / 4 * 3 + 1);
    long n;

    if (out == NULL) {
        return luaL_error(L, "base64_decode: out of memory");
    }
    n = gw_base64_decode(s, len, out);
    if (n < 0) {
        OPENSSL_cleanse(out, len / 4 * 3 + 1);
        free(out);
        return gw_push_error(L, "bad_base64", 0, "base64 decode: invalid "
                             "input (standard alphabet, padded, no "
                             "whitespace)");
    }
    lua_pushlstring(L, (const char *)out, (size_t)n);
    OPENSSL_cleanse(out, len / 4 * 3 + 1);
    free(out);
    return 1;
}

/* syntax: s = crypto.hex_encode(raw) -- lowercase (also crypto.hex) */
static int
lcrypto_hex_encode(lua_State *L)
{
    size_t len;
    const char *s = luaL_checklstring(L, 1, &len);
    luaL_Buffer b;
    size_t i, n;

    luaL_buffinit(L, &b);
    for (i = 0; i < len; i += n) {
        /* LUAL_BUFFERSIZE bytes of hex per chunk */
        n = len - i < LUAL_BUFFERSIZE / 2 ? len - i : LUAL_BUFFERSIZE / 2;
        gw_hex_encode((const unsigned char *)s + i, n,
                      luaL_prepbuffer(&b));
        luaL_addsize(&b, 2 * n);
    }
    luaL_pushresult(&b);
    return 1;
}

/* syntax: raw, err = crypto.hex_decode(s) -- either case (err.kind
 * bad_hex) */
static int
lcrypto_hex_decode(lua_State *L)
{
    size_t len, bad = 0;
    const char *s = luaL_checklstring(L, 1, &len);
    unsigned char *out = malloc(len / 2 + 1);
    long n;

    if (out == NULL) {
        return luaL_error(L, "hex_decode: out of memory");
    }
    n = gw_hex_decode(s, len, out, &bad);
    if (n < 0) {
        free(out);
        if (bad == len) {
            return gw_push_error(L, "bad_hex", 0, "hex decode: odd length");
        }
        return gw_push_error(L, "bad_hex", 0, "hex decode: invalid "
                             "character at offset %d", (int)bad);
    }
    lua_pushlstring(L, (const char *)out, (size_t)n);
    free(out);
    return 1;
}

/* syntax: same = crypto.constant_time_equal(a, b) */
static int
lcrypto_constant_time_equal(lua_State *L)
{
    size_t alen, blen;
    const char *a = luaL_checklstring(L, 1, &alen);
    const char *b = luaL_checklstring(L, 2, &blen);

    lua_pushboolean(L, alen == blen && CRYPTO_memcmp(a, b, alen) == 0);
    return 1;
}

/* ---- registration ------------------------------------------------------ */

static const luaL_Reg ldigest_methods[] = {
    { "update", ldigest_update },
    { "final", ldigest_final },
    { "close", ldigest_gc },
    { NULL, NULL }
};

static const luaL_Reg lcrypto_funcs[] = {
    { "private_key", lcrypto_private_key },
    { "public_key", lcrypto_public_key },
    { "certificate", gw_lcert_load },   /* one loader: x509.load */
    { "pkcs12", lcrypto_pkcs12 },
    { "check_pair", lcrypto_check_pair },
    { "sign", lcrypto_sign },
    { "verify", lcrypto_verify },
    { "sign_base64", lcrypto_sign_base64 },
    { "verify_base64", lcrypto_verify_base64 },
    { "aead_encrypt", lcrypto_aead_encrypt },
    { "aead_decrypt", lcrypto_aead_decrypt },
    { "sm4_key", lcrypto_sm4_key },
    { "oaep_encrypt", lcrypto_oaep_encrypt },
    { "oaep_decrypt", lcrypto_oaep_decrypt },
    { "sm2_encrypt", lcrypto_sm2_encrypt },
    { "sm2_decrypt", lcrypto_sm2_decrypt },
    { "digest", lcrypto_digest },
    { "digest_new", lcrypto_digest_new },
    { "hmac", lcrypto_hmac },
    { "random_nonce", lcrypto_random_nonce },
    { "random_bytes", lcrypto_random_bytes },
    { "base64_encode", lcrypto_base64_encode },
    { "base64_decode", lcrypto_base64_decode },
    { "hex_encode", lcrypto_hex_encode },
    { "hex", lcrypto_hex_encode },
    { "hex_decode", lcrypto_hex_decode },
    { "constant_time_equal", lcrypto_constant_time_equal },
    { NULL, NULL }
};

int
luaopen_paygate_crypto(lua_State *L)
{
    gw_objects_register(L);
    if (luaL_newmetatable(L, GW_DIGEST_MT)) {
        lua_pushcfunction(L, ldigest_gc);
        lua_setfield(L, -2, "__gc");
        lua_newtable(L);
        luaL_register(L, NULL, ldigest_methods);
        lua_setfield(L, -2, "__index");
    }
    lua_pop(L, 1);
    lua_newtable(L);
    luaL_register(L, NULL, lcrypto_funcs);
    lua_pushboolean(L, gw_aead_sm4gcm_native());
    lua_setfield(L, -2, "sm4gcm_native");
    return 1;
}
