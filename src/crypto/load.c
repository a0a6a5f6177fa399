/*
 * load.c -- private keys (PEM, DER, PKCS#12), public keys, certificates
 * and CRLs from bytes, with a classified error for every way a key file
 * arrives damaged: a PEM body without its BEGIN/END lines, a cut file, a
 * wrong password, the wrong kind of PEM block. See crypto.h.
 */
#include <ctype.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <openssl/crypto.h>
#include <openssl/decoder.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/pkcs12.h>
#include <openssl/provider.h>
#include <openssl/x509.h>

#include "runtime.h"
#include "crypto.h"

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
    if (gw_crypto_key_type(pkey) == 0) {
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
    if (gw_crypto_key_type(pkey) == 0) {
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

X509_CRL *
gw_crypto_load_crl(const unsigned char *in, size_t len)
{
    X509_CRL *crl = NULL;
    BIO *bio;

    if (len >= INT_MAX) {
        return NULL;
    }
    bio = BIO_new_mem_buf(in, (int)len);
    if (bio != NULL) {
        crl = memmem(in, len, "-----BEGIN", 10) != NULL
              ? PEM_read_bio_X509_CRL(bio, NULL, NULL, NULL)
              : d2i_X509_CRL_bio(bio, NULL);
        BIO_free(bio);
    }
    ERR_clear_error();
    return crl;
}
