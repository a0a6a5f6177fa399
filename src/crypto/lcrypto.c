/*
 * lcrypto.c -- paygate.crypto: keys, RSA / SM2 signatures, AEAD
 * (AES-256-GCM, SM4-GCM), RSA-OAEP, digests, HMAC, random nonces, strict
 * base64 and hex. OpenSSL 3 EVP APIs only.
 *
 * Keys are parsed once into userdata (struct gw_key) that own an EVP_PKEY
 * and lazily built operation contexts, so a hot-path sign or verify does
 * no parsing and no context setup. Private key material never goes back to
 * Lua and never appears in an error message or tostring().
 *
 * Every expected failure returns nil, err (gw_push_error) with a stable
 * kind; misuse (wrong argument types) raises.
 */
#include <ctype.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <stdlib.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/decoder.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/pem.h>
#include <openssl/pkcs12.h>
#include <openssl/provider.h>
#include <openssl/rand.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#include <lua.h>
#include <lauxlib.h>

#include "runtime.h"
#include "gw_crypto.h"
#include "sm4gcm.h"

#define GW_DIGEST_MT "paygate.crypto.digest"

static void gw_setmsg(char *msg, size_t msglen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void
gw_setmsg(char *msg, size_t msglen, const char *fmt, ...)
{
    va_list ap;

    if (msg != NULL && msglen > 0) {
        va_start(ap, fmt);
        vsnprintf(msg, msglen, fmt, ap);
        va_end(ap);
    }
}

#define GW_FAIL(k, ...) do {                                          \
    *kind = (k);                                                      \
    if (msg != NULL && msglen > 0) {                                  \
        snprintf(msg, msglen, __VA_ARGS__);                           \
    }                                                                 \
    goto err;                                                         \
} while (0)

/* ---- digests fetched once per process ---------------------------------- */

static EVP_MD *gw_md_sha256;
static EVP_MD *gw_md_sm3;

static const EVP_MD *
gw_sha256(void)
{
    if (gw_md_sha256 == NULL) {
        gw_md_sha256 = EVP_MD_fetch(NULL, "SHA256", NULL);
    }
    return gw_md_sha256;
}

static const EVP_MD *
gw_sm3(void)
{
    if (gw_md_sm3 == NULL) {
        gw_md_sm3 = EVP_MD_fetch(NULL, "SM3", NULL);
    }
    return gw_md_sm3;
}

/* ---- key info ---------------------------------------------------------- */

static int
gw_key_type_of(EVP_PKEY *pkey)
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
    int type = gw_key_type_of(pkey);

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
        || EVP_PKEY_CTX_set_signature_md(ctx, gw_sha256()) != 1)
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
         ? EVP_DigestSignInit(*mdp, NULL, gw_sm3(), NULL, ki->pkey)
         : EVP_DigestVerifyInit(*mdp, NULL, gw_sm3(), NULL, ki->pkey);
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
            || EVP_Digest(data, len, md, &mdlen, gw_sha256(), NULL) != 1
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
            || EVP_Digest(data, len, md, &mdlen, gw_sha256(), NULL) != 1)
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
    int n, i;

    n = i2d_PUBKEY(pkey, &der);
    if (n <= 0 || EVP_Digest(der, (size_t)n, md, &mdlen, gw_sha256(),
                             NULL) != 1)
    {
        OPENSSL_free(der);
        return GW_ERR;
    }
    OPENSSL_free(der);
    for (i = 0; i < 32; i++) {
        snprintf(out + 2 * i, 3, "%02X", md[i]);
    }
    return GW_OK;
}

/* ---- loaders ----------------------------------------------------------- */

static const unsigned char *
gw_memmem(const unsigned char *in, size_t len, const char *needle)
{
    return memmem(in, len, needle, strlen(needle));
}

/* 1 when the input is base64 text only: a PEM body pasted without its
 * -----BEGIN/-----END lines. */
static int
gw_looks_like_base64_text(const unsigned char *in, size_t len)
{
    size_t i, alnum = 0;

    if (len < 16) {
        return 0;
    }
    for (i = 0; i < len; i++) {
        unsigned char c = in[i];

        if (isalnum(c)) {
            alnum++;
        } else if (c != '+' && c != '/' && c != '=' && c != '\r'
                   && c != '\n' && c != ' ' && c != '\t')
        {
            return 0;
        }
    }
    return alnum >= 16;
}

/* Classifies inputs that are not usable PEM before any parsing. Returns
 * 1 (PEM with BEGIN and END), 0 (not text: try DER), or -1 with kind
 * set. */
static int
gw_pem_precheck(const unsigned char *in, size_t len, const char **kind,
                char *msg, size_t msglen)
{
    const unsigned char *begin = gw_memmem(in, len, "-----BEGIN ");

    if (begin != NULL) {
        if (gw_memmem(begin, len - (size_t)(begin - in), "-----END ")
            == NULL)
        {
            *kind = "truncated_pem";
            gw_setmsg(msg, msglen, "PEM has a -----BEGIN line but no "
                      "-----END line: the file was cut; copy it whole");
            return -1;
        }
        return 1;
    }
    if (gw_memmem(in, len, "-----END ") != NULL
        || gw_looks_like_base64_text(in, len))
    {
        *kind = "truncated_pem";
        gw_setmsg(msg, msglen, "input looks like a PEM body without its "
                  "-----BEGIN/-----END lines: paste the whole file");
        return -1;
    }
    return 0;
}

/* Copies the label of the first PEM block matching want (a substring such
 * as "PRIVATE KEY"), or of the first block when want is NULL. */
static int
gw_pem_has_label(const unsigned char *in, size_t len, const char *want,
                 char *label, size_t labellen)
{
    const unsigned char *p = in, *end = in + len;

    while ((p = gw_memmem(p, (size_t)(end - p), "-----BEGIN ")) != NULL) {
        const unsigned char *q;
        size_t n;

        p += 11;
        q = gw_memmem(p, (size_t)(end - p), "-----");
        if (q == NULL) {
            return 0;
        }
        n = (size_t)(q - p);
        if (want == NULL || memmem(p, n, want, strlen(want)) != NULL) {
            if (n >= labellen) {
                n = labellen - 1;
            }
            memcpy(label, p, n);
            label[n] = '\0';
            return 1;
        }
        p = q;
    }
    return 0;
}

struct gw_pw {
    const char *pass;            /* borrowed; may be NULL */
    size_t      len;
    int         asked;           /* set when OpenSSL wanted a password */
};

static int
gw_pw_cb(char *buf, int size, int rwflag, void *u)
{
    struct gw_pw *pw = u;

    pw->asked = 1;
    if (pw->pass == NULL || pw->len > (size_t)size) {
        return -1;
    }
    memcpy(buf, pw->pass, pw->len);
    return (int)pw->len;
}

static int gw_legacy_loaded;

/* PKCS#12 (apiclient_cert.p12, password = mchid). */
static int
gw_load_p12(PKCS12 *p12, const char *pass, size_t passlen, EVP_PKEY **out,
            X509 **cert_out, const char **kind, char *msg, size_t msglen)
{
    char pw[256];
    EVP_PKEY *pkey = NULL;
    X509 *cert = NULL;
    int rc = GW_ERR;

    if (pass == NULL) {
        pass = "";
        passlen = 0;
    }
    if (passlen >= sizeof(pw)) {
        GW_FAIL("bad_password", "PKCS#12 password too long");
    }
    memcpy(pw, pass, passlen);
    pw[passlen] = '\0';
    if (PKCS12_mac_present(p12)
        && PKCS12_verify_mac(p12, pw, (int)passlen) != 1
        && !(passlen == 0 && PKCS12_verify_mac(p12, NULL, 0) == 1))
    {
        GW_FAIL("bad_password", "wrong password for the PKCS#12 file (for "
                "apiclient_cert.p12 it is the merchant id, mchid)");
    }
    if (PKCS12_parse(p12, pw, &pkey, &cert, NULL) != 1) {
        /* Older files use RC2/3DES, which live in the legacy provider. */
        if (!gw_legacy_loaded) {
            gw_legacy_loaded = 1;
            ERR_clear_error();
            if (OSSL_PROVIDER_load(NULL, "legacy") != NULL) {
                OSSL_PROVIDER_load(NULL, "default");
            }
        }
        if (PKCS12_parse(p12, pw, &pkey, &cert, NULL) != 1) {
            GW_FAIL("malformed", "PKCS#12 file could not be decrypted or "
                    "parsed (unsupported cipher or damaged file)");
        }
    }
    if (pkey == NULL) {
        GW_FAIL("malformed", "PKCS#12 file holds no private key");
    }
    if (cert != NULL && X509_check_private_key(cert, pkey) != 1) {
        GW_FAIL("key_cert_mismatch", "the PKCS#12 private key does not "
                "match its certificate");
    }
    *out = pkey;
    pkey = NULL;
    if (cert_out != NULL) {
        *cert_out = cert;
        cert = NULL;
    }
    rc = GW_OK;
err:
    OPENSSL_cleanse(pw, sizeof(pw));
    EVP_PKEY_free(pkey);
    X509_free(cert);
    return rc;
}

int
gw_crypto_load_private_key(const unsigned char *in, size_t len,
                           const char *pass, size_t passlen,
                           EVP_PKEY **out, X509 **cert_out,
                           const char **kind, char *msg, size_t msglen)
{
    struct gw_pw pw = { pass, passlen, 0 };
    char label[64];
    BIO *bio = NULL;
    EVP_PKEY *pkey = NULL;
    PKCS12 *p12 = NULL;
    const unsigned char *p;
    int pem, rc = GW_ERR;

    *out = NULL;
    if (cert_out != NULL) {
        *cert_out = NULL;
    }
    if (len > INT_MAX) {
        GW_FAIL("malformed", "input too large");
    }
    pem = gw_pem_precheck(in, len, kind, msg, msglen);
    if (pem < 0) {
        goto err;
    }
    if (pem == 1) {
        if (!gw_pem_has_label(in, len, "PRIVATE KEY", label,
                              sizeof(label)))
        {
            if (!gw_pem_has_label(in, len, NULL, label, sizeof(label))) {
                strcpy(label, "?");
            }
            *kind = "malformed";
            snprintf(msg, msglen, "expected a PRIVATE KEY PEM block, found "
                     "%.40s", label);
            goto err;
        }
        bio = BIO_new_mem_buf(in, (int)len);
        if (bio == NULL) {
            GW_FAIL("internal", "out of memory");
        }
        pkey = PEM_read_bio_PrivateKey_ex(bio, NULL, gw_pw_cb, &pw, NULL,
                                          NULL);
        if (pkey == NULL) {
            if (pw.asked || strstr(label, "ENCRYPTED") != NULL
                || gw_memmem(in, len, "Proc-Type: 4,ENCRYPTED") != NULL)
            {
                GW_FAIL("bad_password", pass == NULL
                        ? "the private key is encrypted: give its password"
                        : "wrong password for the encrypted private key");
            }
            GW_FAIL("malformed", "the %.40s PEM block does not decode "
                    "(damaged base64 or wrong structure)", label);
        }
    } else {
        p = in;
        p12 = d2i_PKCS12(NULL, &p, (long)len);
        if (p12 != NULL) {
            if (gw_load_p12(p12, pass, passlen, &pkey, cert_out, kind, msg,
                            msglen) != GW_OK)
            {
                goto err;
            }
        } else {
            p = in;
            pkey = d2i_AutoPrivateKey(NULL, &p, (long)len);
            if (pkey == NULL) {
                GW_FAIL("not_pem", "not a PEM, DER or PKCS#12 private key "
                        "(expected a PEM PRIVATE KEY block)");
            }
        }
    }
    if (gw_key_type_of(pkey) == 0) {
        GW_FAIL("unsupported_key_type", "unsupported key type %.20s: "
                "WeChat Pay uses RSA (2048 bits) or SM2",
                EVP_PKEY_get0_type_name(pkey));
    }
    *out = pkey;
    pkey = NULL;
    rc = GW_OK;
err:
    if (rc != GW_OK && cert_out != NULL && *cert_out != NULL) {
        X509_free(*cert_out);
        *cert_out = NULL;
    }
    EVP_PKEY_free(pkey);
    PKCS12_free(p12);
    BIO_free(bio);
    ERR_clear_error();
    return rc;
}

int
gw_crypto_load_public_key(const unsigned char *in, size_t len,
                          EVP_PKEY **out,
                          const char **kind, char *msg, size_t msglen)
{
    OSSL_DECODER_CTX *dctx = NULL;
    EVP_PKEY *pkey = NULL;
    const unsigned char *p = in;
    size_t left = len;
    char label[64];
    int pem, rc = GW_ERR;

    *out = NULL;
    if (len > INT_MAX) {
        GW_FAIL("malformed", "public key input is too large");
    }
    pem = gw_pem_precheck(in, len, kind, msg, msglen);
    if (pem < 0) {
        goto err;
    }
    if (pem == 1 && !gw_pem_has_label(in, len, "PUBLIC KEY", label,
                                      sizeof(label)))
    {
        if (gw_pem_has_label(in, len, "CERTIFICATE", label, sizeof(label))) {
            GW_FAIL("malformed", "expected a PUBLIC KEY PEM block, found a "
                    "certificate: load it with crypto.certificate()");
        }
        if (gw_pem_has_label(in, len, "PRIVATE", label, sizeof(label))) {
            GW_FAIL("malformed", "expected a PUBLIC KEY PEM block, found a "
                    "private key: load it with crypto.private_key()");
        }
        GW_FAIL("malformed", "expected a PUBLIC KEY PEM block");
    }
    dctx = OSSL_DECODER_CTX_new_for_pkey(&pkey, pem == 1 ? "PEM" : "DER",
                                         NULL, NULL, EVP_PKEY_PUBLIC_KEY,
                                         NULL, NULL);
    if (dctx == NULL) {
        GW_FAIL("internal", "no decoder");
    }
    if (OSSL_DECODER_from_data(dctx, &p, &left) != 1 || pkey == NULL) {
        if (pem == 1) {
            GW_FAIL("malformed", "the PUBLIC KEY PEM block does not decode");
        }
        GW_FAIL("not_pem", "not a PEM or DER public key (expected "
                "-----BEGIN PUBLIC KEY-----)");
    }
    if (gw_key_type_of(pkey) == 0) {
        GW_FAIL("unsupported_key_type", "unsupported key type %.20s: "
                "WeChat Pay uses RSA (2048 bits) or SM2",
                EVP_PKEY_get0_type_name(pkey));
    }
    *out = pkey;
    pkey = NULL;
    rc = GW_OK;
err:
    OSSL_DECODER_CTX_free(dctx);
    EVP_PKEY_free(pkey);
    ERR_clear_error();
    return rc;
}

static size_t
gw_count(const unsigned char *in, size_t len, const char *needle)
{
    const unsigned char *p = in, *end = in + len;
    size_t n = 0;

    while ((p = gw_memmem(p, (size_t)(end - p), needle)) != NULL) {
        n++;
        p += strlen(needle);
    }
    return n;
}

int
gw_crypto_load_certs(const unsigned char *in, size_t len,
                     STACK_OF(X509) **out,
                     const char **kind, char *msg, size_t msglen)
{
    STACK_OF(X509) *sk = sk_X509_new_null();
    BIO *bio = NULL;
    X509 *x = NULL;
    const unsigned char *p;
    size_t want;
    int pem, rc = GW_ERR;

    *out = NULL;
    if (sk == NULL) {
        GW_FAIL("internal", "out of memory");
    }
    if (len > INT_MAX) {
        GW_FAIL("malformed", "input too large");
    }
    pem = gw_pem_precheck(in, len, kind, msg, msglen);
    if (pem < 0) {
        goto err;
    }
    if (pem == 1) {
        want = gw_count(in, len, "-----BEGIN CERTIFICATE-----")
               + gw_count(in, len, "-----BEGIN TRUSTED CERTIFICATE-----");
        if (want == 0) {
            GW_FAIL("malformed", "expected a CERTIFICATE PEM block");
        }
        bio = BIO_new_mem_buf(in, (int)len);
        if (bio == NULL) {
            GW_FAIL("internal", "out of memory");
        }
        while ((size_t)sk_X509_num(sk) < want) {
            x = PEM_read_bio_X509(bio, NULL, NULL, NULL);
            if (x == NULL) {
                GW_FAIL("malformed", "certificate %d of the PEM bundle does "
                        "not decode", sk_X509_num(sk) + 1);
            }
            if (!sk_X509_push(sk, x)) {
                GW_FAIL("internal", "out of memory");
            }
            x = NULL;
        }
    } else {
        p = in;
        x = d2i_X509(NULL, &p, (long)len);
        if (x == NULL) {
            GW_FAIL("not_pem", "not a PEM or DER certificate (expected "
                    "-----BEGIN CERTIFICATE-----)");
        }
        if (!sk_X509_push(sk, x)) {
            GW_FAIL("internal", "out of memory");
        }
        x = NULL;
    }
    *out = sk;
    sk = NULL;
    rc = GW_OK;
err:
    X509_free(x);
    sk_X509_pop_free(sk, X509_free);
    BIO_free(bio);
    ERR_clear_error();
    return rc;
}

/* ---- base64 / hex ------------------------------------------------------ */

static const signed char gw_b64_rev[256] = {
#define X -1
    X,X,X,X,X,X,X,X,X,X,X,X,X,X,X,X, X,X,X,X,X,X,X,X,X,X,X,X,X,X,X,X,
    X,X,X,X,X,X,X,X,X,X,X,62,X,X,X,63, 52,53,54,55,56,57,58,59,60,61,X,X,X,X,X,X,
    X,0,1,2,3,4,5,6,7,8,9,10,11,12,13,14, 15,16,17,18,19,20,21,22,23,24,25,X,X,X,X,X,
    X,26,27,28,29,30,31,32,33,34,35,36,37,38,39,40,
    41,42,43,44,45,46,47,48,49,50,51,X,X,X,X,X,
    X,X,X,X,X,X,X,X,X,X,X,X,X,X,X,X, X,X,X,X,X,X,X,X,X,X,X,X,X,X,X,X,
    X,X,X,X,X,X,X,X,X,X,X,X,X,X,X,X, X,X,X,X,X,X,X,X,X,X,X,X,X,X,X,X,
    X,X,X,X,X,X,X,X,X,X,X,X,X,X,X,X, X,X,X,X,X,X,X,X,X,X,X,X,X,X,X,X,
    X,X,X,X,X,X,X,X,X,X,X,X,X,X,X,X, X,X,X,X,X,X,X,X,X,X,X,X,X,X,X,X,
#undef X
};

long
gw_base64_decode(const char *in, size_t len, unsigned char *out)
{
    const unsigned char *s = (const unsigned char *)in;
    size_t i, o = 0;
    int pad = 0;

    if (len % 4 != 0) {
        return -1;
    }
    if (len > 0 && s[len - 1] == '=') {
        pad = (len > 1 && s[len - 2] == '=') ? 2 : 1;
    }
    for (i = 0; i < len; i += 4) {
        int last = i + 4 == len;
        int a = gw_b64_rev[s[i]], b = gw_b64_rev[s[i + 1]];
        int c = (last && pad == 2) ? 0 : gw_b64_rev[s[i + 2]];
        int d = (last && pad >= 1) ? 0 : gw_b64_rev[s[i + 3]];

        if ((a | b | c | d) < 0) {
            return -1;
        }
        out[o++] = (unsigned char)((a << 2) | (b >> 4));
        if (last && pad == 2) {
            if (b & 0x0f) {
                return -1;          /* non-canonical trailing bits */
            }
            break;
        }
        out[o++] = (unsigned char)(((b & 0x0f) << 4) | (c >> 2));
        if (last && pad == 1) {
            if (c & 0x03) {
                return -1;
            }
            break;
        }
        out[o++] = (unsigned char)(((c & 0x03) << 6) | d);
    }
    return (long)o;
}

static int
lcrypto_base64_encode(lua_State *L)
{
    size_t len, cap;
    const char *s = luaL_checklstring(L, 1, &len);
    unsigned char *out;
    int n;

    if (len > (size_t)INT_MAX / 2) {
        return luaL_error(L, "base64_encode: input too large");
    }
    cap = (len + 2) / 3 * 4 + 1;
    out = malloc(cap);
    if (out == NULL) {
        return luaL_error(L, "base64_encode: out of memory");
    }
    n = EVP_EncodeBlock(out, (const unsigned char *)s, (int)len);
    lua_pushlstring(L, (const char *)out, (size_t)n);
    free(out);
    return 1;
}

/* Decoded secrets (keys, ciphertexts) pass through here: cleanse. */
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

static int
lcrypto_hex_encode(lua_State *L)
{
    static const char digits[] = "0123456789abcdef";
    size_t len, i;
    const unsigned char *s =
        (const unsigned char *)luaL_checklstring(L, 1, &len);
    luaL_Buffer b;

    luaL_buffinit(L, &b);
    for (i = 0; i < len; i++) {
        luaL_addchar(&b, digits[s[i] >> 4]);
        luaL_addchar(&b, digits[s[i] & 0x0f]);
    }
    luaL_pushresult(&b);
    return 1;
}

static int
gw_hexval(int c)
{
    if (c >= '0' && c <= '9') {
        return c - '0';
    }
    if (c >= 'a' && c <= 'f') {
        return c - 'a' + 10;
    }
    if (c >= 'A' && c <= 'F') {
        return c - 'A' + 10;
    }
    return -1;
}

static int
lcrypto_hex_decode(lua_State *L)
{
    size_t len, i;
    const char *s = luaL_checklstring(L, 1, &len);
    luaL_Buffer b;

    if (len % 2 != 0) {
        return gw_push_error(L, "bad_hex", 0, "hex decode: odd length");
    }
    for (i = 0; i < len; i++) {
        if (gw_hexval((unsigned char)s[i]) < 0) {
            return gw_push_error(L, "bad_hex", 0, "hex decode: invalid "
                                 "character at offset %d", (int)i);
        }
    }
    luaL_buffinit(L, &b);
    for (i = 0; i < len; i += 2) {
        luaL_addchar(&b, (char)(gw_hexval((unsigned char)s[i]) << 4
                                | gw_hexval((unsigned char)s[i + 1])));
    }
    luaL_pushresult(&b);
    return 1;
}

static int
lcrypto_constant_time_equal(lua_State *L)
{
    size_t alen, blen;
    const char *a = luaL_checklstring(L, 1, &alen);
    const char *b = luaL_checklstring(L, 2, &blen);

    lua_pushboolean(L, alen == blen && CRYPTO_memcmp(a, b, alen) == 0);
    return 1;
}

/* ---- AEAD -------------------------------------------------------------- */

static EVP_CIPHER *gw_aes256gcm;
static EVP_CIPHER *gw_sm4gcm_evp;   /* OpenSSL's own SM4-GCM, if present */
static int gw_sm4gcm_probed;

static EVP_CIPHER *
gw_sm4gcm_native(void)
{
    if (!gw_sm4gcm_probed) {
        gw_sm4gcm_probed = 1;
        gw_sm4gcm_evp = EVP_CIPHER_fetch(NULL, "SM4-GCM", NULL);
        ERR_clear_error();
    }
    return gw_sm4gcm_evp;
}

/* Validates alg, key and nonce; returns the EVP cipher to use, or NULL
 * with *ours = 1 for our SM4-GCM, or NULL with *kind set. */
static int
gw_aead_setup(const char *alg, size_t keylen, size_t noncelen,
              EVP_CIPHER **cipher, const char **kind, char *msg,
              size_t msglen)
{
    *cipher = NULL;
    if (strcmp(alg, "AEAD_AES_256_GCM") == 0) {
        if (keylen != 32) {
            *kind = "bad_key";
            snprintf(msg, msglen, "AEAD_AES_256_GCM needs a 32-byte key "
                     "(the APIv3 key is 32 ASCII characters), got %zu "
                     "bytes", keylen);
            return GW_ERR;
        }
        if (gw_aes256gcm == NULL) {
            gw_aes256gcm = EVP_CIPHER_fetch(NULL, "AES-256-GCM", NULL);
        }
        *cipher = gw_aes256gcm;
    } else if (strcmp(alg, "AEAD_SM4_GCM") == 0) {
        if (keylen != 16) {
            *kind = "bad_key";
            snprintf(msg, msglen, "AEAD_SM4_GCM needs a 16-byte key (derive "
                     "it with crypto.sm4_key(apiv3_key)), got %zu bytes",
                     keylen);
            return GW_ERR;
        }
        *cipher = gw_sm4gcm_native();
    } else {
        *kind = "unsupported_algorithm";
        snprintf(msg, msglen, "unsupported AEAD algorithm %.40s (expected "
                 "AEAD_AES_256_GCM or AEAD_SM4_GCM)", alg);
        return GW_ERR;
    }
    if (noncelen == 0 || noncelen > GW_AEAD_NONCE_MAX) {
        *kind = "bad_nonce";
        snprintf(msg, msglen, "%.20s needs a nonce of 1..%d bytes (WeChat "
                 "Pay sends 12), got %zu bytes", alg, GW_AEAD_NONCE_MAX,
                 noncelen);
        return GW_ERR;
    }
    return GW_OK;
}

static EVP_CIPHER_CTX *gw_aead_ctx;  /* reused; this is a per-process
                                      * single-threaded cache */

/* One GCM operation through an OpenSSL cipher. A nonce other than 12
 * bytes needs its length set between choosing the cipher and giving the
 * key and nonce; the 12-byte case stays one init call. */
static int
gw_evp_aead(EVP_CIPHER *cipher, int enc, const unsigned char *key,
            const unsigned char *nonce, size_t noncelen,
            const unsigned char *aad,
            size_t aadlen, const unsigned char *in, size_t len,
            unsigned char *tag, unsigned char *out)
{
    EVP_CIPHER_CTX *ctx;
    int n, rc = GW_ERR;

    if (gw_aead_ctx == NULL) {
        gw_aead_ctx = EVP_CIPHER_CTX_new();
    }
    ctx = gw_aead_ctx;
    if (ctx == NULL || len > INT_MAX || aadlen > INT_MAX) {
        goto err;
    }
    if (noncelen == 12) {
        if (EVP_CipherInit_ex2(ctx, cipher, key, nonce, enc, NULL) != 1) {
            goto err;
        }
    } else if (EVP_CipherInit_ex2(ctx, cipher, NULL, NULL, enc, NULL) != 1
               || EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_IVLEN,
                                      (int)noncelen, NULL) != 1
               || EVP_CipherInit_ex2(ctx, NULL, key, nonce, enc, NULL) != 1)
    {
        goto err;
    }
    if (aadlen > 0
        && EVP_CipherUpdate(ctx, NULL, &n, aad, (int)aadlen) != 1)
    {
        goto err;
    }
    if (len > 0 && EVP_CipherUpdate(ctx, out, &n, in, (int)len) != 1) {
        goto err;
    }
    if (!enc && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, 16,
                                    tag) != 1)
    {
        goto err;
    }
    if (EVP_CipherFinal_ex(ctx, out + len, &n) != 1) {
        goto err;
    }
    if (enc && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, 16,
                                   tag) != 1)
    {
        goto err;
    }
    rc = GW_OK;
err:
    if (ctx != NULL) {
        EVP_CIPHER_CTX_reset(ctx);   /* drops the key schedule */
    }
    return rc;
}

int
gw_aead_encrypt(const char *alg, const unsigned char *key, size_t keylen,
                const unsigned char *nonce, size_t noncelen,
                const unsigned char *aad, size_t aadlen,
                const unsigned char *in, size_t len, unsigned char *out,
                const char **kind, char *msg, size_t msglen)
{
    EVP_CIPHER *cipher;
    int rc;

    if (gw_aead_setup(alg, keylen, noncelen, &cipher, kind, msg, msglen)
        != GW_OK)
    {
        return GW_ERR;
    }
    if (cipher != NULL) {
        rc = gw_evp_aead(cipher, 1, key, nonce, noncelen, aad, aadlen, in,
                         len, out + len, out);
    } else {
        rc = gw_sm4gcm_seal(key, nonce, noncelen, aad, aadlen, in, len,
                            out, out + len);
    }
    ERR_clear_error();
    if (rc != GW_OK) {
        OPENSSL_cleanse(out, len + 16);
        *kind = "internal";
        snprintf(msg, msglen, "%.20s encrypt failed", alg);
    }
    return rc;
}

int
gw_aead_decrypt(const char *alg, const unsigned char *key, size_t keylen,
                const unsigned char *nonce, size_t noncelen,
                const unsigned char *aad, size_t aadlen,
                const unsigned char *in, size_t len, unsigned char *out,
                const char **kind, char *msg, size_t msglen)
{
    EVP_CIPHER *cipher;
    unsigned char tag[16];
    int rc;

    if (gw_aead_setup(alg, keylen, noncelen, &cipher, kind, msg, msglen)
        != GW_OK)
    {
        return GW_ERR;
    }
    if (len < 16) {
        *kind = "decrypt_failed";
        snprintf(msg, msglen, "%.20s ciphertext shorter than its 16-byte "
                 "tag", alg);
        return GW_ERR;
    }
    len -= 16;
    memcpy(tag, in + len, 16);
    if (cipher != NULL) {
        rc = gw_evp_aead(cipher, 0, key, nonce, noncelen, aad, aadlen, in,
                         len, tag, out);
    } else {
        rc = gw_sm4gcm_open(key, nonce, noncelen, aad, aadlen, in, len, tag,
                            out);
    }
    ERR_clear_error();
    if (rc != GW_OK) {
        OPENSSL_cleanse(out, len);
        *kind = "decrypt_failed";
        snprintf(msg, msglen, "%.20s tag mismatch: wrong key (APIv3 key?), "
                 "or ciphertext, nonce or associated_data altered", alg);
    }
    return rc;
}

/* ---- Lua glue: errors, handles ----------------------------------------- */

int
gw_crypto_fail(lua_State *L, const char *kind, const char *msg)
{
    return gw_push_error(L, kind, 0, "%s", msg);
}

static struct gw_key *
gw_key_check(lua_State *L, int idx)
{
    struct gw_key *k = luaL_checkudata(L, idx, GW_KEY_MT);

    if (k->ki.pkey == NULL) {
        luaL_argerror(L, idx, "key handle is closed");
    }
    return k;
}

struct gw_key *
gw_key_push(lua_State *L, EVP_PKEY *pkey, int is_private)
{
    const char *kind;
    char msg[GW_ERRMSG_MAX];
    struct gw_key *k = lua_newuserdata(L, sizeof(*k));

    memset(k, 0, sizeof(*k));
    luaL_getmetatable(L, GW_KEY_MT);
    lua_setmetatable(L, -2);
    if (gw_keyinfo_init(&k->ki, pkey, is_private, &kind, msg, sizeof(msg))
        != GW_OK)
    {
        lua_pop(L, 1);
        return NULL;
    }
    return k;
}

struct gw_keyinfo *
gw_crypto_check_verifier(lua_State *L, int idx)
{
    struct gw_key *k = luaL_testudata(L, idx, GW_KEY_MT);
    struct gw_cert *c;

    if (k != NULL) {
        if (k->ki.pkey == NULL) {
            luaL_argerror(L, idx, "key handle is closed");
        }
        return &k->ki;
    }
    c = luaL_testudata(L, idx, GW_CERT_MT);
    if (c == NULL) {
        luaL_typerror(L, idx, "key or certificate handle");
    }
    if (c->x509 == NULL) {
        luaL_argerror(L, idx, "certificate handle is closed");
    }
    return &c->ki;
}

static int
lkey_gc(lua_State *L)
{
    struct gw_key *k = luaL_checkudata(L, 1, GW_KEY_MT);

    gw_keyinfo_clear(&k->ki);
    return 0;
}

static const char *
gw_type_name(int type)
{
    return type == GW_KEY_RSA ? "RSA" : "SM2";
}

static int
lkey_tostring(lua_State *L)
{
    struct gw_key *k = luaL_checkudata(L, 1, GW_KEY_MT);
    char fpr[65];

    if (k->ki.pkey == NULL) {
        lua_pushstring(L, "paygate.crypto.key (closed)");
        return 1;
    }
    if (gw_crypto_key_fingerprint(k->ki.pkey, fpr) != GW_OK) {
        strcpy(fpr, "?");
    }
    lua_pushfstring(L, "paygate.crypto.key: %s-%d %s, SHA256:%s",
                    gw_type_name(k->ki.type), k->ki.bits,
                    k->ki.is_private ? "private" : "public", fpr);
    return 1;
}

static int
lkey_type(lua_State *L)
{
    lua_pushstring(L, gw_type_name(gw_key_check(L, 1)->ki.type));
    return 1;
}

static int
lkey_bits(lua_State *L)
{
    lua_pushinteger(L, gw_key_check(L, 1)->ki.bits);
    return 1;
}

static int
lkey_is_private(lua_State *L)
{
    lua_pushboolean(L, gw_key_check(L, 1)->ki.is_private);
    return 1;
}

static int
lkey_fingerprint(lua_State *L)
{
    char fpr[65];

    if (gw_crypto_key_fingerprint(gw_key_check(L, 1)->ki.pkey, fpr)
        != GW_OK)
    {
        return gw_push_error(L, "internal", 0, "fingerprint failed");
    }
    lua_pushstring(L, fpr);
    return 1;
}

/* Public half as SubjectPublicKeyInfo PEM (never the private part). */
static int
lkey_public_pem(lua_State *L)
{
    struct gw_key *k = gw_key_check(L, 1);
    BIO *bio = BIO_new(BIO_s_mem());
    char *p;
    long n;

    if (bio == NULL || PEM_write_bio_PUBKEY(bio, k->ki.pkey) != 1) {
        BIO_free(bio);
        ERR_clear_error();
        return gw_push_error(L, "internal", 0, "public key export failed");
    }
    n = BIO_get_mem_data(bio, &p);
    lua_pushlstring(L, p, (size_t)n);
    BIO_free(bio);
    return 1;
}

/* A new public-key handle for the public half of key (or cert). */
static int
lkey_public_key(lua_State *L)
{
    struct gw_keyinfo *ki = gw_crypto_check_verifier(L, 1);
    unsigned char *der = NULL;
    const unsigned char *p;
    EVP_PKEY *pub;
    int n = i2d_PUBKEY(ki->pkey, &der);

    if (n <= 0) {
        ERR_clear_error();
        return gw_push_error(L, "internal", 0, "public key export failed");
    }
    p = der;
    pub = d2i_PUBKEY(NULL, &p, n);
    OPENSSL_free(der);
    if (pub == NULL) {
        ERR_clear_error();
        return gw_push_error(L, "internal", 0, "public key export failed");
    }
    if (gw_key_push(L, pub, 0) == NULL) {
        EVP_PKEY_free(pub);
        return gw_push_error(L, "internal", 0, "public key handle failed");
    }
    EVP_PKEY_free(pub);              /* the handle holds its own ref */
    return 1;
}

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
    struct gw_keyinfo *pub = gw_crypto_check_verifier(L, 2);

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
    struct gw_keyinfo *ki = gw_crypto_check_verifier(L, 1);
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

/* syntax: key16 = crypto.sm4_key(apiv3_key) -- SM3(key)[0:16], PROTOCOL 6 */
static int
lcrypto_sm4_key(lua_State *L)
{
    size_t len;
    const char *k = luaL_checklstring(L, 1, &len);
    unsigned char md[32];
    unsigned int mdlen = 0;

    if (EVP_Digest(k, len, md, &mdlen, gw_sm3(), NULL) != 1) {
        ERR_clear_error();
        return gw_push_error(L, "internal", 0, "sm4_key: sm3 failed");
    }
    lua_pushlstring(L, (const char *)md, 16);
    OPENSSL_cleanse(md, sizeof(md));
    return 1;
}

/* ---- Lua: RSA-OAEP (SHA-1, MGF1-SHA-1, empty label; PROTOCOL 7) -------- */

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

/* syntax: ct, err = crypto.oaep_encrypt(cert_or_public_key, data) -- raw */
static int
lcrypto_oaep_encrypt(lua_State *L)
{
    struct gw_keyinfo *ki = gw_crypto_check_verifier(L, 1);
    size_t len, outlen;
    const char *in = luaL_checklstring(L, 2, &len);
    unsigned char out[1024];
    EVP_PKEY_CTX *ctx;

    if (ki->type != GW_KEY_RSA) {
        return gw_push_error(L, "key_type_mismatch", 0, "oaep encrypt: "
                             "needs an RSA key");
    }
    if (len > (size_t)EVP_PKEY_get_size(ki->pkey) - 42) {
        return gw_push_error(L, "too_long", 0, "oaep encrypt: at most %d "
                             "bytes fit an RSA-%d key",
                             EVP_PKEY_get_size(ki->pkey) - 42, ki->bits);
    }
    ctx = gw_oaep_ctx(ki->pkey, 1);
    outlen = sizeof(out);
    if (ctx == NULL || EVP_PKEY_encrypt(ctx, out, &outlen,
                                        (const unsigned char *)in, len) != 1)
    {
        EVP_PKEY_CTX_free(ctx);
        ERR_clear_error();
        return gw_push_error(L, "internal", 0, "oaep encrypt failed");
    }
    EVP_PKEY_CTX_free(ctx);
    lua_pushlstring(L, (const char *)out, outlen);
    return 1;
}

/* syntax: pt, err = crypto.oaep_decrypt(private_key, ct) */
static int
lcrypto_oaep_decrypt(lua_State *L)
{
    struct gw_key *k = gw_key_check(L, 1);
    size_t len, outlen;
    const char *in = luaL_checklstring(L, 2, &len);
    unsigned char out[1024];
    EVP_PKEY_CTX *ctx;
    int ok;

    if (k->ki.type != GW_KEY_RSA || !k->ki.is_private) {
        return gw_push_error(L, "key_type_mismatch", 0, "oaep decrypt: "
                             "needs an RSA private key");
    }
    ctx = gw_oaep_ctx(k->ki.pkey, 0);
    outlen = sizeof(out);
    ok = ctx != NULL && EVP_PKEY_decrypt(ctx, out, &outlen,
                                         (const unsigned char *)in,
                                         len) == 1;
    EVP_PKEY_CTX_free(ctx);
    ERR_clear_error();
    if (!ok) {
        OPENSSL_cleanse(out, sizeof(out));
        return gw_push_error(L, "decrypt_failed", 0, "oaep decrypt: "
                             "ciphertext does not decrypt with this key "
                             "(encrypted for another certificate?)");
    }
    lua_pushlstring(L, (const char *)out, outlen);
    OPENSSL_cleanse(out, sizeof(out));
    return 1;
}

/* ---- Lua: digests, HMAC, random ---------------------------------------- */

static const EVP_MD *
gw_md_by_name(const char *name)
{
    if (strcmp(name, "sha256") == 0) {
        return gw_sha256();
    }
    if (strcmp(name, "sm3") == 0) {
        return gw_sm3();
    }
    if (strcmp(name, "sha1") == 0) {
        return EVP_sha1();
    }
    if (strcmp(name, "sha512") == 0) {
        return EVP_sha512();
    }
    return NULL;
}

static const EVP_MD *
gw_check_md(lua_State *L, int idx)
{
    const char *name = luaL_checkstring(L, idx);
    const EVP_MD *md = gw_md_by_name(name);

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
    struct gw_digest *d = luaL_checkudata(L, 1, GW_DIGEST_MT);

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
    struct gw_digest *d = luaL_checkudata(L, 1, GW_DIGEST_MT);

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

/* syntax: s = crypto.random_nonce([n]) -- n alphanumerics, default 32 */
static int
lcrypto_random_nonce(lua_State *L)
{
    static const char alphabet[] =
        "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    lua_Integer want = luaL_optinteger(L, 1, 32);
    unsigned char rnd[64];
    char out[1024];
    int n = 0, i;

    luaL_argcheck(L, want >= 1 && want <= (lua_Integer)sizeof(out), 1,
                  "nonce length must be 1..1024");
    while (n < want) {
        if (RAND_bytes(rnd, sizeof(rnd)) != 1) {
            ERR_clear_error();
            return gw_push_error(L, "internal", 1, "random: CSPRNG failed");
        }
        for (i = 0; i < (int)sizeof(rnd) && n < want; i++) {
            if (rnd[i] < 248) {          /* 248 = 4 * 62: no modulo bias */
                out[n++] = alphabet[rnd[i] % 62];
            }
        }
    }
    lua_pushlstring(L, out, (size_t)n);
    return 1;
}

/* syntax: raw = crypto.random_bytes(n) */
static int
lcrypto_random_bytes(lua_State *L)
{
    lua_Integer want = luaL_checkinteger(L, 1);
    unsigned char out[4096];

    luaL_argcheck(L, want >= 0 && want <= (lua_Integer)sizeof(out), 1,
                  "length must be 0..4096");
    if (RAND_bytes(out, (int)want) != 1) {
        ERR_clear_error();
        return gw_push_error(L, "internal", 1, "random: CSPRNG failed");
    }
    lua_pushlstring(L, (const char *)out, (size_t)want);
    OPENSSL_cleanse(out, (size_t)want);
    return 1;
}

/* ---- registration ------------------------------------------------------ */

static const luaL_Reg lkey_methods[] = {
    { "type", lkey_type },
    { "bits", lkey_bits },
    { "is_private", lkey_is_private },
    { "fingerprint", lkey_fingerprint },
    { "public_pem", lkey_public_pem },
    { "public_key", lkey_public_key },
    { "close", lkey_gc },
    { NULL, NULL }
};

static const luaL_Reg ldigest_methods[] = {
    { "update", ldigest_update },
    { "final", ldigest_final },
    { "close", ldigest_gc },
    { NULL, NULL }
};

static const luaL_Reg lcrypto_funcs[] = {
    { "private_key", lcrypto_private_key },
    { "public_key", lcrypto_public_key },
    { "certificate", gw_lx509_load },   /* one loader: x509.load */
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

void
gw_crypto_register_types(lua_State *L)
{
    if (luaL_newmetatable(L, GW_KEY_MT)) {
        lua_pushcfunction(L, lkey_gc);
        lua_setfield(L, -2, "__gc");
        lua_pushcfunction(L, lkey_tostring);
        lua_setfield(L, -2, "__tostring");
        lua_newtable(L);
        luaL_register(L, NULL, lkey_methods);
        lua_setfield(L, -2, "__index");
    }
    lua_pop(L, 1);
    if (luaL_newmetatable(L, GW_DIGEST_MT)) {
        lua_pushcfunction(L, ldigest_gc);
        lua_setfield(L, -2, "__gc");
        lua_newtable(L);
        luaL_register(L, NULL, ldigest_methods);
        lua_setfield(L, -2, "__index");
    }
    lua_pop(L, 1);
    gw_x509_register_cert_mt(L);
}

int
luaopen_paygate_crypto(lua_State *L)
{
    gw_crypto_register_types(L);
    lua_newtable(L);
    luaL_register(L, NULL, lcrypto_funcs);
    lua_pushboolean(L, gw_sm4gcm_native() != NULL);
    lua_setfield(L, -2, "sm4gcm_native");
    return 1;
}
