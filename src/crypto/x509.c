/*
 * x509.c -- certificate helpers without Lua (see crypto.h): serial,
 * fingerprint, key type, names for messages, and chain verification that
 * maps OpenSSL's verify result to a stable kind and a message naming the
 * certificate and the likely fix.
 */
#include <stdio.h>
#include <string.h>
#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <openssl/x509_vfy.h>

#include "runtime.h"
#include "crypto.h"

int
gw_x509_serial_hex(X509 *x, char *out, size_t outlen)
{
    BIGNUM *bn = ASN1_INTEGER_to_BN(X509_get0_serialNumber(x), NULL);
    char *hex;
    int n;

    if (bn == NULL) {
        ERR_clear_error();
        return -1;
    }
    hex = BN_bn2hex(bn);
    BN_free(bn);
    if (hex == NULL) {
        ERR_clear_error();
        return -1;
    }
    n = snprintf(out, outlen, "%s", hex);
    OPENSSL_free(hex);
    return n;
}

int
gw_x509_fingerprint(X509 *x, char out[65])
{
    unsigned char md[32];
    unsigned int n = 0;

    if (X509_digest(x, gw_crypto_sha256(), md, &n) != 1 || n != 32) {
        ERR_clear_error();
        return GW_ERR;
    }
    gw_crypto_hex32(md, out);
    return GW_OK;
}

const char *
gw_x509_key_type(X509 *x)
{
    EVP_PKEY *pub = X509_get0_pubkey(x);

    if (pub == NULL) {
        ERR_clear_error();
        return "unknown";
    }
    switch (gw_crypto_key_type(pub)) {
    case GW_KEY_RSA:
        return "RSA";
    case GW_KEY_SM2:
        return "SM2";
    default:
        return EVP_PKEY_get0_type_name(pub);
    }
}

int
gw_x509_key_bits(X509 *x)
{
    EVP_PKEY *pub = X509_get0_pubkey(x);

    if (pub == NULL) {
        ERR_clear_error();
        return 0;
    }
    return EVP_PKEY_get_bits(pub);
}

const char *
gw_x509_name(const X509_NAME *name, char *buf, size_t len)
{
    return X509_NAME_oneline(name, buf, (int)len) != NULL ? buf : "?";
}

/* Gives an SM2-signed certificate the GM/T 0009 distinguishing ID
 * WeChat Pay signs with: OpenSSL 3.0 verifies a certificate's signature with
 * x->distinguishing_id, empty by default, so without it every SM2 chain
 * fails as a bad signature. Only SM2-SM3 signatures: an ID on an RSA
 * verify makes it fail. The ID is a constant, so setting it on a shared
 * X509 is harmless. */
static void
gw_sm2_cert_id(X509 *x)
{
    ASN1_OCTET_STRING *id;

    if (X509_get_signature_nid(x) != NID_SM2_with_SM3
        || X509_get0_distinguishing_id(x) != NULL)
    {
        return;
    }
    id = ASN1_OCTET_STRING_new();
    if (id == NULL
        || ASN1_OCTET_STRING_set(id, (const unsigned char *)GW_SM2_ID,
                                 GW_SM2_ID_LEN) != 1)
    {
        ASN1_OCTET_STRING_free(id);
        return;
    }
    X509_set0_distinguishing_id(x, id);
}

static void
gw_time_str(const ASN1_TIME *t, char *buf, size_t len)
{
    BIO *bio = BIO_new(BIO_s_mem());
    char *p;
    long n;

    snprintf(buf, len, "?");
    if (bio != NULL && ASN1_TIME_print(bio, t) == 1) {
        n = BIO_get_mem_data(bio, &p);
        snprintf(buf, len, "%.*s", (int)n, p);
    }
    BIO_free(bio);
}

/* Whether a certificate given (an intermediate, or a root unless the
 * system store is used) bears cur's issuer name but did not sign cur: OpenSSL
 * then reports the issuer as not found (its key identifier or signature
 * does not match), though the fault is the signature. */
static int
gw_issuer_name_other_key(const struct gw_x509_verify *v, X509 *cur)
{
    const X509_NAME *want = X509_get_issuer_name(cur);
    STACK_OF(X509) *lists[2];
    X509 *c;
    EVP_PKEY *pub;
    int l, i, found = 0;

    lists[0] = v->inter;
    lists[1] = v->system_roots ? NULL : v->roots;
    for (l = 0; l < 2 && !found; l++) {
        for (i = 0; lists[l] != NULL && i < sk_X509_num(lists[l]); i++) {
            c = sk_X509_value(lists[l], i);
            pub = X509_get0_pubkey(c);
            if (c != cur && pub != NULL
                && X509_NAME_cmp(X509_get_subject_name(c), want) == 0
                && X509_verify(cur, pub) != 1)
            {
                found = 1;
                break;
            }
        }
    }
    ERR_clear_error();
    return found;
}

/* Maps a verify failure to kind + message. */
static const char *
gw_classify(X509_STORE_CTX *ctx, X509 *leaf,
            const struct gw_x509_verify *v, char *msg, size_t msglen)
{
    int err = X509_STORE_CTX_get_error(ctx);
    int depth = X509_STORE_CTX_get_error_depth(ctx);
    X509 *cur = X509_STORE_CTX_get_current_cert(ctx);
    char subj[256], iss[256], when[64];
    const char *what = X509_verify_cert_error_string(err);

    if (cur == NULL) {
        cur = leaf;
    }
    gw_x509_name(X509_get_subject_name(cur), subj, sizeof(subj));
    gw_x509_name(X509_get_issuer_name(cur), iss, sizeof(iss));

    switch (err) {
    case X509_V_ERR_CERT_HAS_EXPIRED:
        gw_time_str(X509_get0_notAfter(cur), when, sizeof(when));
        snprintf(msg, msglen, "certificate %s (depth %d) expired on %s: "
                 "download the current certificate (or check the clock)",
                 subj, depth, when);
        return "expired";
    case X509_V_ERR_CERT_NOT_YET_VALID:
        gw_time_str(X509_get0_notBefore(cur), when, sizeof(when));
        snprintf(msg, msglen, "certificate %s (depth %d) is not valid "
                 "before %s: check the system clock, or wait for the "
                 "rotation date", subj, depth, when);
        return "not_yet_valid";
    case X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT:
        snprintf(msg, msglen, "certificate %s is self-signed and not among "
                 "the trusted roots: add it to roots to pin it, or use the "
                 "CA-issued certificate", subj);
        return "self_signed_untrusted";
    case X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN:
        snprintf(msg, msglen, "the chain ends at self-signed %s, which is "
                 "not a trusted root: add that root CA to roots if you "
                 "trust it", subj);
        return "unknown_authority";
    case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT:
    case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY:
    case X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE:
        if (gw_issuer_name_other_key(v, cur)) {
            snprintf(msg, msglen, "%s (depth %d) names %s as its issuer, "
                     "but the certificate given with that name did not sign "
                     "it: the certificate was altered or re-signed, or a "
                     "different CA with the same name is configured", subj,
                     depth, iss);
            return "bad_signature";
        }
        if (depth == 0) {
            snprintf(msg, msglen, "the issuer %s of %s was not found: add "
                     "the intermediate certificate that issued it to "
                     "intermediates (or its root CA to roots)", iss, subj);
            return "missing_intermediate";
        }
        snprintf(msg, msglen, "the chain ends at %s (depth %d), issued by "
                 "%s, which is not a trusted root: add that root CA to "
                 "roots", subj, depth, iss);
        return "unknown_authority";
    case X509_V_ERR_CERT_SIGNATURE_FAILURE:
    case X509_V_ERR_UNABLE_TO_DECRYPT_CERT_SIGNATURE:
    case X509_V_ERR_UNABLE_TO_DECODE_ISSUER_PUBLIC_KEY:
    case X509_V_ERR_CRL_SIGNATURE_FAILURE:
    case X509_V_ERR_UNABLE_TO_DECRYPT_CRL_SIGNATURE:
        snprintf(msg, msglen, "signature on %s (depth %d) does not verify "
                 "with its issuer's key: the certificate was altered or a "
                 "different CA with the same name is configured", subj,
                 depth);
        return "bad_signature";
    case X509_V_ERR_CA_MD_TOO_WEAK:
    case X509_V_ERR_EE_KEY_TOO_SMALL:
    case X509_V_ERR_CA_KEY_TOO_SMALL:
        snprintf(msg, msglen, "%s (depth %d) is too weak: %s (a SHA-1 or "
                 "MD5 signature, or a key under 112-bit security such as "
                 "RSA-1024, is refused)", subj, depth, what);
        return "weak_signature";
    case X509_V_ERR_HOSTNAME_MISMATCH:
    case X509_V_ERR_EMAIL_MISMATCH:
    case X509_V_ERR_IP_ADDRESS_MISMATCH:
        snprintf(msg, msglen, "certificate %s does not cover the expected "
                 "host name: use the certificate issued for that host",
                 subj);
        return "hostname_mismatch";
    case X509_V_ERR_INVALID_PURPOSE:
    case X509_V_ERR_KEYUSAGE_NO_CERTSIGN:
    case X509_V_ERR_KEYUSAGE_NO_DIGITAL_SIGNATURE:
    case X509_V_ERR_KEYUSAGE_NO_CRL_SIGN:
    case X509_V_ERR_INVALID_CA:
        snprintf(msg, msglen, "certificate %s (depth %d) is not allowed "
                 "for this use (%s): use a certificate whose key usage / "
                 "extended key usage / CA flag fit", subj, depth, what);
        return "wrong_usage";
    case X509_V_ERR_PATH_LENGTH_EXCEEDED:
    case X509_V_ERR_CERT_CHAIN_TOO_LONG:
        snprintf(msg, msglen, "chain too long at %s (depth %d): a CA's "
                 "pathLenConstraint or max_depth is exceeded; remove the "
                 "extra intermediate", subj, depth);
        return "path_too_long";
    case X509_V_ERR_CERT_REVOKED:
        snprintf(msg, msglen, "certificate %s (depth %d) is revoked by its "
                 "CA's CRL: download a current certificate", subj, depth);
        return "revoked";
    case X509_V_ERR_UNABLE_TO_GET_CRL:
    case X509_V_ERR_CRL_HAS_EXPIRED:
    case X509_V_ERR_CRL_NOT_YET_VALID:
    case X509_V_ERR_UNABLE_TO_GET_CRL_ISSUER:
        snprintf(msg, msglen, "revocation status of %s (depth %d) is "
                 "unknown (%s): give a current CRL from its issuer", subj,
                 depth, what);
        return "revocation_unknown";
    case X509_V_ERR_ERROR_IN_CERT_NOT_BEFORE_FIELD:
    case X509_V_ERR_ERROR_IN_CERT_NOT_AFTER_FIELD:
    case X509_V_ERR_INVALID_EXTENSION:
    case X509_V_ERR_UNHANDLED_CRITICAL_EXTENSION:
    case X509_V_ERR_INVALID_POLICY_EXTENSION:
        snprintf(msg, msglen, "certificate %s (depth %d) is malformed "
                 "(%s): obtain a well-formed certificate", subj, depth,
                 what);
        return "malformed";
    default:
        snprintf(msg, msglen, "certificate %s (depth %d) is not trusted: "
                 "%s", subj, depth, what);
        return "untrusted";
    }
}

int
gw_x509_purpose(const char *name)
{
    if (strcmp(name, "server") == 0) {
        return X509_PURPOSE_SSL_SERVER;
    }
    if (strcmp(name, "client") == 0) {
        return X509_PURPOSE_SSL_CLIENT;
    }
    if (strcmp(name, "any") == 0) {
        return X509_PURPOSE_ANY;
    }
    if (strcmp(name, "smime_sign") == 0) {
        return X509_PURPOSE_SMIME_SIGN;
    }
    return 0;
}

int
gw_x509_verify_chain(X509 *leaf, const struct gw_x509_verify *v,
                     const char **kind, char *msg, size_t msglen)
{
    X509_STORE *store = X509_STORE_new();
    X509_STORE_CTX *ctx = X509_STORE_CTX_new();
    X509_VERIFY_PARAM *param;
    int i, rc = GW_ERR;

    if (store == NULL || ctx == NULL) {
        GW_FAIL("internal", "out of memory");
    }
    if (v->system_roots) {
        X509_STORE_set_default_paths(store);
    }
    for (i = 0; v->crls != NULL && i < sk_X509_CRL_num(v->crls); i++) {
        X509_STORE_add_crl(store, sk_X509_CRL_value(v->crls, i));
    }
    gw_sm2_cert_id(leaf);
    for (i = 0; v->inter != NULL && i < sk_X509_num(v->inter); i++) {
        gw_sm2_cert_id(sk_X509_value(v->inter, i));
    }
    for (i = 0; !v->system_roots && v->roots != NULL
                && i < sk_X509_num(v->roots); i++)
    {
        gw_sm2_cert_id(sk_X509_value(v->roots, i));
        X509_STORE_add_cert(store, sk_X509_value(v->roots, i));
    }
    if (X509_STORE_CTX_init(ctx, store, leaf, v->inter) != 1) {
        GW_FAIL("internal", "verify setup failed");
    }
    param = X509_STORE_CTX_get0_param(ctx);
    if (v->has_at) {
        X509_VERIFY_PARAM_set_time(param, v->at);
    }
    if (v->host != NULL
        && (v->host[0] == '\0'
            || X509_VERIFY_PARAM_set1_host(param, v->host, 0) != 1))
    {
        /* unchecked, no host would be checked at all */
        GW_FAIL("internal", "cannot set the expected host name");
    }
    if (v->purpose != 0) {
        X509_STORE_CTX_set_purpose(ctx, v->purpose);
    }
    if (v->depth >= 0) {
        X509_VERIFY_PARAM_set_depth(param, v->depth);
    }
    /* 112-bit security: no SHA-1/MD5 signature, no RSA under 2048 bits,
     * whatever the system's default level */
    X509_VERIFY_PARAM_set_auth_level(param, 2);
    if (v->crls != NULL && sk_X509_CRL_num(v->crls) > 0) {
        X509_VERIFY_PARAM_set_flags(param, X509_V_FLAG_CRL_CHECK);
    }
    if (X509_verify_cert(ctx) != 1) {
        *kind = gw_classify(ctx, leaf, v, msg, msglen);
        goto err;
    }
    rc = GW_OK;
err:
    X509_STORE_CTX_free(ctx);
    X509_STORE_free(store);
    ERR_clear_error();
    return rc;
}
