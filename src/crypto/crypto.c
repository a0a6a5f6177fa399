/*
 * crypto.c -- keys, RSA / SM2 signatures, RSA-OAEP and digests: the
 * Lua-free core of paygate.crypto (see crypto.h). OpenSSL 3 EVP APIs only.
 *
 * A struct gw_keyinfo owns an EVP_PKEY and lazily built operation
 * contexts, so a hot-path sign or verify does no parsing and no context
 * setup. Private key material never appears in a message.
 */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#include "runtime.h"
#include "crypto.h"

void
gw_setmsg(char *msg, size_t msglen, const char *fmt, ...)
{
    va_list ap;

    if (msg != NULL && msglen > 0) {
        va_start(ap, fmt);
        vsnprintf(msg, msglen, fmt, ap);
        va_end(ap);
    }
}

/* ---- digests fetched once per process ---------------------------------- */

static EVP_MD *gw_md_sha256;          /* fetched once, never freed */
static EVP_MD *gw_md_sm3;             /* fetched once, never freed */

const EVP_MD *
gw_crypto_sha256(void)
{
    if (gw_md_sha256 == NULL) {
        gw_md_sha256 = EVP_MD_fetch(NULL, "SHA256", NULL);
    }
    return gw_md_sha256;
}

const EVP_MD *
gw_crypto_sm3(void)
{
    if (gw_md_sm3 == NULL) {
        gw_md_sm3 = EVP_MD_fetch(NULL, "SM3", NULL);
    }
    return gw_md_sm3;
}

/* ---- key info ---------------------------------------------------------- */

int
gw_crypto_key_type(EVP_PKEY *pkey)
{
    if (EVP_PKEY_is_a(pkey, "RSA")) {
        return GW_KEY_RSA;
    }
    if (EVP_PKEY_is_a(pkey, "SM2")) {
        return GW_KEY_SM2;
    }
    return 0;
}

int
gw_keyinfo_init(struct gw_keyinfo *ki, EVP_PKEY *pkey, int is_private,
                const char **kind, char *msg, size_t msglen)
{
    int type = gw_crypto_key_type(pkey);

    memset(ki, 0, sizeof(*ki));
    if (type == 0) {
        *kind = "unsupported_key_type";
        gw_setmsg(msg, msglen, "unsupported key type %s: WeChat Pay uses "
                  "RSA (2048 bits) or SM2", EVP_PKEY_get0_type_name(pkey));
        return GW_ERR;
    }
    if (type == GW_KEY_RSA && EVP_PKEY_get_bits(pkey) < 1024) {
        *kind = "unsupported_key_type";
        gw_setmsg(msg, msglen, "RSA key too small: use 2048 bits");
        return GW_ERR;
    }
    if (EVP_PKEY_up_ref(pkey) != 1) {
        *kind = "internal";
        gw_setmsg(msg, msglen, "out of memory");
        return GW_ERR;
    }
    ki->pkey = pkey;
    ki->type = type;
    ki->bits = EVP_PKEY_get_bits(pkey);
    ki->is_private = is_private;
    return GW_OK;
}

void
gw_keyinfo_clear(struct gw_keyinfo *ki)
{
    EVP_MD_CTX_free(ki->sm2_sign);
    ki->sm2_sign = NULL;
    EVP_MD_CTX_free(ki->sm2_verify);
    ki->sm2_verify = NULL;
    EVP_PKEY_CTX_free(ki->sign_ctx);
    ki->sign_ctx = NULL;
    EVP_PKEY_CTX_free(ki->verify_ctx);
    ki->verify_ctx = NULL;
    EVP_PKEY_free(ki->pkey);
    ki->pkey = NULL;
}

int
gw_crypto_alg(const char *name)
{
    static const struct { const char *name; int alg; } names[] = {
        { "sha256-rsa", GW_ALG_SHA256_RSA },
        { "SHA256-RSA2048", GW_ALG_SHA256_RSA },
        { "WECHATPAY2-SHA256-RSA2048", GW_ALG_SHA256_RSA },
        { "sm2-sm3", GW_ALG_SM2_SM3 },
        { "SM2-WITH-SM3", GW_ALG_SM2_SM3 },
        { "WECHATPAY2-SM2-WITH-SM3", GW_ALG_SM2_SM3 },
    };
    size_t i;

    for (i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (strcmp(name, names[i].name) == 0) {
            return names[i].alg;
        }
    }
    return 0;
}

static int
gw_alg_key_check(struct gw_keyinfo *ki, int alg, const char **kind,
                 char *msg, size_t msglen)
{
    int want = alg == GW_ALG_SHA256_RSA ? GW_KEY_RSA : GW_KEY_SM2;

    if (ki->pkey == NULL) {
        *kind = "unsupported_key_type";
        gw_setmsg(msg, msglen, "the certificate's key is neither RSA nor "
                  "SM2");
        return GW_ERR;
    }
    if (ki->type != want) {
        *kind = "key_type_mismatch";
        gw_setmsg(msg, msglen, "%s", alg == GW_ALG_SHA256_RSA
                  ? "sha256-rsa needs an RSA key, got an SM2 key (check "
                    "Wechatpay-Signature-Type and the configured key)"
                  : "sm2-sm3 needs an SM2 key, got an RSA key (check "
                    "Wechatpay-Signature-Type and the configured key)");
        return GW_ERR;
    }
    return GW_OK;
}

/* Builds the cached RSA PKCS#1 v1.5 / SHA-256 context for sign or verify. */
static EVP_PKEY_CTX *
gw_rsa_ctx(EVP_PKEY *pkey, int for_sign)
{
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_pkey(NULL, pkey, NULL);

    if (ctx == NULL) {
        return NULL;
    }
    if ((for_sign ? EVP_PKEY_sign_init(ctx) : EVP_PKEY_verify_init(ctx)) != 1
        || EVP_PKEY_CTX_set_rsa_padding(ctx, RSA_PKCS1_PADDING) != 1
        || EVP_PKEY_CTX_set_signature_md(ctx, gw_crypto_sha256()) != 1)
    {
        EVP_PKEY_CTX_free(ctx);
        return NULL;
    }
    return ctx;
}

/* The key's SM2 digest-sign (or verify) context carrying the WeChat Pay
 * distinguishing ID, made on first use and re-initialised per call (as
 * `openssl speed sm2` does): the ID stays cached in the pkey ctx. Returns
 * the ready EVP_MD_CTX or NULL. */
static EVP_MD_CTX *
gw_sm2_ctx(struct gw_keyinfo *ki, int for_sign)
{
    EVP_MD_CTX **mdp = for_sign ? &ki->sm2_sign : &ki->sm2_verify;
    EVP_PKEY_CTX **pp = for_sign ? &ki->sign_ctx : &ki->verify_ctx;
    int ok;

    if (*mdp == NULL) {
        *mdp = EVP_MD_CTX_new();
        *pp = EVP_PKEY_CTX_new_from_pkey(NULL, ki->pkey, NULL);
        if (*mdp == NULL || *pp == NULL
            || EVP_PKEY_CTX_set1_id(*pp, GW_SM2_ID, GW_SM2_ID_LEN) != 1)
        {
            EVP_MD_CTX_free(*mdp);
            *mdp = NULL;
            EVP_PKEY_CTX_free(*pp);
            *pp = NULL;
            return NULL;
        }
        EVP_MD_CTX_set_pkey_ctx(*mdp, *pp);
    }
    ok = for_sign
         ? EVP_DigestSignInit(*mdp, NULL, gw_crypto_sm3(), NULL, ki->pkey)
         : EVP_DigestVerifyInit(*mdp, NULL, gw_crypto_sm3(), NULL, ki->pkey);
    return ok == 1 ? *mdp : NULL;
}

int
gw_crypto_sign(struct gw_keyinfo *ki, int alg,
               const unsigned char *data, size_t len,
               unsigned char *sig, size_t *siglen,
               const char **kind, char *msg, size_t msglen)
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    EVP_MD_CTX *mdctx = NULL;
    int rc = GW_ERR;

    if (!ki->is_private) {
        GW_FAIL("key_type_mismatch", "sign needs a private key, got a "
                "public key");
    }
    if (gw_alg_key_check(ki, alg, kind, msg, msglen) != GW_OK) {
        goto err;
    }
    if (alg == GW_ALG_SHA256_RSA) {
        if (ki->sign_ctx == NULL) {
            ki->sign_ctx = gw_rsa_ctx(ki->pkey, 1);
        }
        if (ki->sign_ctx == NULL
            || EVP_Digest(data, len, md, &mdlen, gw_crypto_sha256(), NULL) != 1
            || EVP_PKEY_sign(ki->sign_ctx, sig, siglen, md, mdlen) != 1)
        {
            GW_FAIL("internal", "rsa sign failed");
        }
    } else {
        mdctx = gw_sm2_ctx(ki, 1);
        if (mdctx == NULL
            || EVP_DigestSign(mdctx, sig, siglen, data, len) != 1)
        {
            GW_FAIL("internal", "sm2 sign failed");
        }
    }
    rc = GW_OK;
err:
    OPENSSL_cleanse(md, sizeof(md));
    ERR_clear_error();
    return rc;
}

int
gw_crypto_verify(struct gw_keyinfo *ki, int alg,
                 const unsigned char *data, size_t len,
                 const unsigned char *sig, size_t siglen,
                 const char **kind, char *msg, size_t msglen)
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    EVP_MD_CTX *mdctx = NULL;
    int rc = GW_ERR;

    if (gw_alg_key_check(ki, alg, kind, msg, msglen) != GW_OK) {
        goto err;
    }
    if (alg == GW_ALG_SHA256_RSA) {
        if (ki->verify_ctx == NULL) {
            ki->verify_ctx = gw_rsa_ctx(ki->pkey, 0);
        }
        if (ki->verify_ctx == NULL
            || EVP_Digest(data, len, md, &mdlen, gw_crypto_sha256(), NULL) != 1)
        {
            GW_FAIL("internal", "rsa verify setup failed");
        }
        if (EVP_PKEY_verify(ki->verify_ctx, sig, siglen, md, mdlen) != 1) {
            GW_FAIL("signature_mismatch", "signature does not match the "
                    "data and key (sha256-rsa)");
        }
    } else {
        mdctx = gw_sm2_ctx(ki, 0);
        if (mdctx == NULL) {
            GW_FAIL("internal", "sm2 verify setup failed");
        }
        if (EVP_DigestVerify(mdctx, sig, siglen, data, len) != 1) {
            GW_FAIL("signature_mismatch", "signature does not match the "
                    "data and key (sm2-sm3, id 1234567812345678)");
        }
    }
    rc = GW_OK;
err:
    ERR_clear_error();
    return rc;
}

int
gw_crypto_key_fingerprint(EVP_PKEY *pkey, char out[65])
{
    unsigned char *der = NULL, md[32];
    unsigned int mdlen = 0;
    int n;

    n = i2d_PUBKEY(pkey, &der);
    if (n <= 0 || EVP_Digest(der, (size_t)n, md, &mdlen, gw_crypto_sha256(),
                             NULL) != 1)
    {
        OPENSSL_free(der);
        return GW_ERR;
    }
    OPENSSL_free(der);
    gw_crypto_hex32(md, out);
    return GW_OK;
}

/* ---- RSA-OAEP (SHA-1, MGF1-SHA-1, empty label) ------------------------- */

static EVP_PKEY_CTX *
gw_oaep_ctx(EVP_PKEY *pkey, int enc)
{
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_pkey(NULL, pkey, NULL);

    if (ctx == NULL) {
        return NULL;
    }
    if ((enc ? EVP_PKEY_encrypt_init(ctx) : EVP_PKEY_decrypt_init(ctx)) != 1
        || EVP_PKEY_CTX_set_rsa_padding(ctx, RSA_PKCS1_OAEP_PADDING) != 1
        || EVP_PKEY_CTX_set_rsa_oaep_md_name(ctx, "SHA1", NULL) != 1
        || EVP_PKEY_CTX_set_rsa_mgf1_md_name(ctx, "SHA1", NULL) != 1)
    {
        EVP_PKEY_CTX_free(ctx);
        return NULL;
    }
    return ctx;
}

int
gw_crypto_oaep_encrypt(struct gw_keyinfo *ki,
                       const unsigned char *in, size_t len,
                       unsigned char *out, size_t *outlen,
                       const char **kind, char *msg, size_t msglen)
{
    EVP_PKEY_CTX *ctx = NULL;
    int rc = GW_ERR;

    if (ki->type != GW_KEY_RSA) {
        GW_FAIL("key_type_mismatch", "oaep encrypt: needs an RSA key");
    }
    if (len > (size_t)EVP_PKEY_get_size(ki->pkey) - 42) {
        GW_FAIL("too_long", "oaep encrypt: at most %d bytes fit an RSA-%d "
                "key", EVP_PKEY_get_size(ki->pkey) - 42, ki->bits);
    }
    ctx = gw_oaep_ctx(ki->pkey, 1);
    if (ctx == NULL || EVP_PKEY_encrypt(ctx, out, outlen, in, len) != 1) {
        GW_FAIL("internal", "oaep encrypt failed");
    }
    rc = GW_OK;
err:
    EVP_PKEY_CTX_free(ctx);
    ERR_clear_error();
    return rc;
}

int
gw_crypto_oaep_decrypt(struct gw_keyinfo *ki,
                       const unsigned char *in, size_t len,
                       unsigned char *out, size_t *outlen,
                       const char **kind, char *msg, size_t msglen)
{
    size_t cap = *outlen;
    EVP_PKEY_CTX *ctx = NULL;
    int rc = GW_ERR;

    if (ki->type != GW_KEY_RSA || !ki->is_private) {
        GW_FAIL("key_type_mismatch", "oaep decrypt: needs an RSA private "
                "key");
    }
    ctx = gw_oaep_ctx(ki->pkey, 0);
    if (ctx == NULL || EVP_PKEY_decrypt(ctx, out, outlen, in, len) != 1) {
        OPENSSL_cleanse(out, cap);
        GW_FAIL("decrypt_failed", "oaep decrypt: ciphertext does not "
                "decrypt with this key (encrypted for another "
                "certificate?)");
    }
    rc = GW_OK;
err:
    EVP_PKEY_CTX_free(ctx);
    ERR_clear_error();
    return rc;
}

/* ---- SM2 encryption ----------------------------------------------------- */

int
gw_crypto_sm2_encrypt(struct gw_keyinfo *ki, const unsigned char *in,
                      size_t len, unsigned char **out, size_t *outlen,
                      const char **kind, char *msg, size_t msglen)
{
    EVP_PKEY_CTX *ctx = NULL;
    unsigned char *buf = NULL;
    size_t n = 0;
    int rc = GW_ERR;

    *out = NULL;
    if (ki->type != GW_KEY_SM2) {
        GW_FAIL("key_type_mismatch", "sm2 encrypt: needs an SM2 key");
    }
    if (len == 0 || len > GW_SM2_MAX_PLAIN) {
        GW_FAIL("too_long", "sm2 encrypt: the plaintext must be 1 to %d "
                "bytes", GW_SM2_MAX_PLAIN);
    }
    ctx = EVP_PKEY_CTX_new_from_pkey(NULL, ki->pkey, NULL);
    if (ctx == NULL || EVP_PKEY_encrypt_init(ctx) != 1
        || EVP_PKEY_encrypt(ctx, NULL, &n, in, len) != 1) {
        GW_FAIL("internal", "sm2 encrypt: cannot set up");
    }
    buf = malloc(n);
    if (buf == NULL) {
        GW_FAIL("internal", "sm2 encrypt: no memory");
    }
    if (EVP_PKEY_encrypt(ctx, buf, &n, in, len) != 1) {
        GW_FAIL("internal", "sm2 encrypt failed");
    }
    *out = buf;
    *outlen = n;
    buf = NULL;
    rc = GW_OK;
err:
    free(buf);
    EVP_PKEY_CTX_free(ctx);
    ERR_clear_error();
    return rc;
}

int
gw_crypto_sm2_decrypt(struct gw_keyinfo *ki, const unsigned char *in,
                      size_t len, unsigned char **out, size_t *outlen,
                      const char **kind, char *msg, size_t msglen)
{
    EVP_PKEY_CTX *ctx = NULL;
    unsigned char *buf = NULL;
    size_t n = 0, cap = 0;
    int rc = GW_ERR;

    *out = NULL;
    if (ki->type != GW_KEY_SM2 || !ki->is_private) {
        GW_FAIL("key_type_mismatch", "sm2 decrypt: needs an SM2 private "
                "key");
    }
    if (len == 0 || len > GW_SM2_MAX_PLAIN + 256) {
        GW_FAIL("decrypt_failed", "sm2 decrypt: ciphertext empty or too "
                "long");
    }
    ctx = EVP_PKEY_CTX_new_from_pkey(NULL, ki->pkey, NULL);
    if (ctx == NULL || EVP_PKEY_decrypt_init(ctx) != 1
        || EVP_PKEY_decrypt(ctx, NULL, &cap, in, len) != 1) {
        GW_FAIL("decrypt_failed", "sm2 decrypt: not an SM2 ciphertext");
    }
    buf = malloc(cap > 0 ? cap : 1);
    if (buf == NULL) {
        GW_FAIL("internal", "sm2 decrypt: no memory");
    }
    n = cap;
    if (EVP_PKEY_decrypt(ctx, buf, &n, in, len) != 1) {
        OPENSSL_cleanse(buf, cap);
        GW_FAIL("decrypt_failed", "sm2 decrypt: ciphertext does not "
                "decrypt with this key (encrypted for another key, or "
                "altered)");
    }
    *out = buf;
    *outlen = n;
    buf = NULL;
    rc = GW_OK;
err:
    free(buf);
    EVP_PKEY_CTX_free(ctx);
    ERR_clear_error();
    return rc;
}

/* ---- digests, time ----------------------------------------------------- */

const EVP_MD *
gw_crypto_md(const char *name)
{
    if (strcmp(name, "sha256") == 0) {
        return gw_crypto_sha256();
    }
    if (strcmp(name, "sm3") == 0) {
        return gw_crypto_sm3();
    }
    if (strcmp(name, "sha1") == 0) {
        return EVP_sha1();
    }
    if (strcmp(name, "sha512") == 0) {
        return EVP_sha512();
    }
    return NULL;
}

void
gw_crypto_hex32(const unsigned char md[32], char out[65])
{
    static const char digits[] = "0123456789ABCDEF";
    int i;

    for (i = 0; i < 32; i++) {
        out[2 * i] = digits[md[i] >> 4];
        out[2 * i + 1] = digits[md[i] & 0x0f];
    }
    out[64] = '\0';
}

int
gw_crypto_sm4_key(const unsigned char *apiv3, size_t len,
                  unsigned char out[16])
{
    unsigned char md[32];
    unsigned int mdlen = 0;

    if (EVP_Digest(apiv3, len, md, &mdlen, gw_crypto_sm3(), NULL) != 1) {
        ERR_clear_error();
        return GW_ERR;
    }
    memcpy(out, md, 16);
    OPENSSL_cleanse(md, sizeof(md));
    return GW_OK;
}

double
gw_crypto_asn1_epoch(const ASN1_TIME *t)
{
    struct tm tm;

    memset(&tm, 0, sizeof(tm));
    if (t == NULL || ASN1_TIME_to_tm(t, &tm) != 1) {
        return 0;
    }
    return (double)timegm(&tm);
}
