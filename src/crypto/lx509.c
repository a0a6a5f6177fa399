/*
 * lx509.c -- paygate.x509: certificate handles (struct gw_cert), their
 * fields, and chain verification with classified errors.
 *
 * A certificate handle owns one X509 reference and the key info of its
 * public key (so crypto.verify(cert, ...) is one verify, no parsing). Its
 * __gc and close() are safe to call twice.
 *
 * verify_chain() maps OpenSSL's verify result to a stable kind and a
 * message naming the certificate and the likely fix:
 *   unknown_authority, missing_intermediate, self_signed_untrusted,
 *   expired, not_yet_valid, bad_signature, hostname_mismatch, wrong_usage,
 *   path_too_long, revoked, revocation_unknown, malformed, untrusted.
 */
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <openssl/x509_vfy.h>

#include <lua.h>
#include <lauxlib.h>

#include "runtime.h"
#include "gw_crypto.h"

struct gw_cert *
gw_cert_push(lua_State *L, X509 *x509)
{
    const char *kind;
    char msg[GW_ERRMSG_MAX];
    EVP_PKEY *pub;
    struct gw_cert *c = lua_newuserdata(L, sizeof(*c));

    memset(c, 0, sizeof(*c));
    luaL_getmetatable(L, GW_CERT_MT);
    lua_setmetatable(L, -2);
    if (X509_up_ref(x509) != 1) {
        lua_pop(L, 1);
        return NULL;
    }
    c->x509 = x509;
    pub = X509_get0_pubkey(x509);
    /* A CA certificate may carry a key type we cannot verify with (e.g.
     * ECDSA); it is still usable as a root. ki stays empty then and
     * crypto.verify reports unsupported_key_type. */
    if (pub == NULL || gw_keyinfo_init(&c->ki, pub, 0, &kind, msg,
                                       sizeof(msg)) != GW_OK)
    {
        memset(&c->ki, 0, sizeof(c->ki));
    }
    ERR_clear_error();
    return c;
}

struct gw_cert *
gw_cert_check(lua_State *L, int idx)
{
    struct gw_cert *c = luaL_checkudata(L, idx, GW_CERT_MT);

    if (c->x509 == NULL) {
        luaL_argerror(L, idx, "certificate handle is closed");
    }
    return c;
}

static int
lcert_gc(lua_State *L)
{
    struct gw_cert *c = luaL_checkudata(L, 1, GW_CERT_MT);

    gw_keyinfo_clear(&c->ki);
    X509_free(c->x509);
    c->x509 = NULL;
    return 0;
}

/* Uppercase hex, two digits per byte (Go's %X of the serial's bytes). */
static int
gw_serial_hex(X509 *x, char *out, size_t outlen)
{
    BIGNUM *bn = ASN1_INTEGER_to_BN(X509_get0_serialNumber(x), NULL);
    char *hex;

    if (bn == NULL) {
        return GW_ERR;
    }
    hex = BN_bn2hex(bn);
    BN_free(bn);
    if (hex == NULL) {
        return GW_ERR;
    }
    snprintf(out, outlen, "%s", hex);
    OPENSSL_free(hex);
    return GW_OK;
}

static void
gw_push_name(lua_State *L, const X509_NAME *name)
{
    BIO *bio = BIO_new(BIO_s_mem());
    unsigned long flags = (XN_FLAG_RFC2253 & ~ASN1_STRFLGS_ESC_MSB
                           & ~XN_FLAG_SEP_MASK) | XN_FLAG_SEP_CPLUS_SPC;
    char *p;
    long n;

    if (bio == NULL || X509_NAME_print_ex(bio, name, 0, flags) < 0) {
        BIO_free(bio);
        lua_pushliteral(L, "?");
        return;
    }
    n = BIO_get_mem_data(bio, &p);
    lua_pushlstring(L, p, (size_t)n);
    BIO_free(bio);
}

/* Subject as a C string for messages; buf owned by the caller. */
static const char *
gw_name_str(const X509_NAME *name, char *buf, size_t len)
{
    return X509_NAME_oneline(name, buf, (int)len) != NULL ? buf : "?";
}

static lua_Number
gw_asn1_time_epoch(const ASN1_TIME *t)
{
    struct tm tm;

    memset(&tm, 0, sizeof(tm));
    if (t == NULL || ASN1_TIME_to_tm(t, &tm) != 1) {
        return 0;
    }
    return (lua_Number)timegm(&tm);
}

static int
lcert_serial(lua_State *L)
{
    char hex[256];

    if (gw_serial_hex(gw_cert_check(L, 1)->x509, hex, sizeof(hex))
        != GW_OK)
    {
        return gw_push_error(L, "malformed", 0, "certificate serial "
                             "unreadable");
    }
    lua_pushstring(L, hex);
    return 1;
}

static int
lcert_subject(lua_State *L)
{
    gw_push_name(L, X509_get_subject_name(gw_cert_check(L, 1)->x509));
    return 1;
}

static int
lcert_issuer(lua_State *L)
{
    gw_push_name(L, X509_get_issuer_name(gw_cert_check(L, 1)->x509));
    return 1;
}

static int
lcert_not_before(lua_State *L)
{
    lua_pushnumber(L, gw_asn1_time_epoch(
                       X509_get0_notBefore(gw_cert_check(L, 1)->x509)));
    return 1;
}

static int
lcert_not_after(lua_State *L)
{
    lua_pushnumber(L, gw_asn1_time_epoch(
                       X509_get0_notAfter(gw_cert_check(L, 1)->x509)));
    return 1;
}

static void
gw_push_key_type(lua_State *L, X509 *x)
{
    EVP_PKEY *pub = X509_get0_pubkey(x);

    if (pub == NULL) {
        lua_pushliteral(L, "unknown");
    } else if (EVP_PKEY_is_a(pub, "RSA")) {
        lua_pushliteral(L, "RSA");
    } else if (EVP_PKEY_is_a(pub, "SM2")) {
        lua_pushliteral(L, "SM2");
    } else {
        lua_pushstring(L, EVP_PKEY_get0_type_name(pub));
    }
}

static int
lcert_key_type(lua_State *L)
{
    gw_push_key_type(L, gw_cert_check(L, 1)->x509);
    return 1;
}

static int
lcert_key_bits(lua_State *L)
{
    EVP_PKEY *pub = X509_get0_pubkey(gw_cert_check(L, 1)->x509);

    lua_pushinteger(L, pub != NULL ? EVP_PKEY_get_bits(pub) : 0);
    return 1;
}

/* SHA-256 over the DER certificate, uppercase hex without colons. */
static int
gw_cert_fingerprint(X509 *x, char out[65])
{
    unsigned char md[32];
    unsigned int n = 0;
    int i;

    if (X509_digest(x, EVP_sha256(), md, &n) != 1 || n != 32) {
        return GW_ERR;
    }
    for (i = 0; i < 32; i++) {
        snprintf(out + 2 * i, 3, "%02X", md[i]);
    }
    return GW_OK;
}

static int
lcert_fingerprint(lua_State *L)
{
    char fpr[65];

    if (gw_cert_fingerprint(gw_cert_check(L, 1)->x509, fpr) != GW_OK) {
        return gw_push_error(L, "internal", 0, "fingerprint failed");
    }
    lua_pushstring(L, fpr);
    return 1;
}

static int
lcert_is_ca(lua_State *L)
{
    lua_pushboolean(L, X509_check_ca(gw_cert_check(L, 1)->x509) > 0);
    return 1;
}

static int
lcert_pem(lua_State *L)
{
    BIO *bio = BIO_new(BIO_s_mem());
    char *p;
    long n;

    if (bio == NULL || PEM_write_bio_X509(bio, gw_cert_check(L, 1)->x509)
                       != 1)
    {
        BIO_free(bio);
        return gw_push_error(L, "internal", 0, "pem export failed");
    }
    n = BIO_get_mem_data(bio, &p);
    lua_pushlstring(L, p, (size_t)n);
    BIO_free(bio);
    return 1;
}

static int
lcert_der(lua_State *L)
{
    unsigned char *der = NULL;
    int n = i2d_X509(gw_cert_check(L, 1)->x509, &der);

    if (n <= 0) {
        return gw_push_error(L, "internal", 0, "der export failed");
    }
    lua_pushlstring(L, (const char *)der, (size_t)n);
    OPENSSL_free(der);
    return 1;
}

/* A public-key handle for the certificate's key. */
static int
lcert_public_key(lua_State *L)
{
    struct gw_cert *c = gw_cert_check(L, 1);

    if (c->ki.pkey == NULL || gw_key_push(L, c->ki.pkey, 0) == NULL) {
        return gw_push_error(L, "unsupported_key_type", 0, "certificate "
                             "key is neither RSA nor SM2");
    }
    return 1;
}

/* syntax: t = x509.info(cert) -- every field in one table */
static int
lcert_info(lua_State *L)
{
    struct gw_cert *c = gw_cert_check(L, 1);
    char buf[256];

    lua_createtable(L, 0, 10);
    if (gw_serial_hex(c->x509, buf, sizeof(buf)) == GW_OK) {
        lua_pushstring(L, buf);
        lua_setfield(L, -2, "serial");
    }
    gw_push_name(L, X509_get_subject_name(c->x509));
    lua_setfield(L, -2, "subject");
    gw_push_name(L, X509_get_issuer_name(c->x509));
    lua_setfield(L, -2, "issuer");
    lua_pushnumber(L, gw_asn1_time_epoch(X509_get0_notBefore(c->x509)));
    lua_setfield(L, -2, "not_before");
    lua_pushnumber(L, gw_asn1_time_epoch(X509_get0_notAfter(c->x509)));
    lua_setfield(L, -2, "not_after");
    gw_push_key_type(L, c->x509);
    lua_setfield(L, -2, "key_type");
    lua_pushinteger(L, X509_get0_pubkey(c->x509) != NULL
                    ? EVP_PKEY_get_bits(X509_get0_pubkey(c->x509)) : 0);
    lua_setfield(L, -2, "key_bits");
    if (gw_cert_fingerprint(c->x509, buf) == GW_OK) {
        lua_pushstring(L, buf);
        lua_setfield(L, -2, "fingerprint");
    }
    lua_pushboolean(L, X509_check_ca(c->x509) > 0);
    lua_setfield(L, -2, "is_ca");
    return 1;
}

static int
lcert_tostring(lua_State *L)
{
    struct gw_cert *c = luaL_checkudata(L, 1, GW_CERT_MT);
    char serial[256];

    if (c->x509 == NULL) {
        lua_pushliteral(L, "paygate.x509.cert (closed)");
        return 1;
    }
    if (gw_serial_hex(c->x509, serial, sizeof(serial)) != GW_OK) {
        strcpy(serial, "?");
    }
    lua_pushfstring(L, "paygate.x509.cert: serial %s, ", serial);
    gw_push_name(L, X509_get_subject_name(c->x509));
    lua_concat(L, 2);
    return 1;
}

/* ---- chain verification ------------------------------------------------ */

/* Gives an SM2-signed certificate the GM/T 0009 distinguishing ID
 * (PROTOCOL.md 6): OpenSSL 3.0 verifies a certificate's signature with
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

/* Appends the certificates in the Lua value at idx (nil, a handle, a
 * PEM/DER string, or an array of those) to sk. GW_OK, or GW_ERR with kind
 * and msg (for strings that fail to parse). Raises on wrong types, so the
 * caller must hold no C memory that is not owned by a userdata... callers
 * therefore collect certificates before allocating anything. */
static int
gw_collect(lua_State *L, int idx, STACK_OF(X509) *sk, const char **kind,
           char *msg, size_t msglen)
{
    int i, n;

    if (lua_isnoneornil(L, idx)) {
        return GW_OK;
    }
    if (lua_isuserdata(L, idx)) {
        struct gw_cert *c = luaL_testudata(L, idx, GW_CERT_MT);

        if (c == NULL || c->x509 == NULL) {
            *kind = "malformed";
            snprintf(msg, msglen, "expected a certificate handle");
            return GW_ERR;
        }
        X509_up_ref(c->x509);
        if (!sk_X509_push(sk, c->x509)) {
            X509_free(c->x509);
            *kind = "internal";
            snprintf(msg, msglen, "out of memory");
            return GW_ERR;
        }
        return GW_OK;
    }
    if (lua_type(L, idx) == LUA_TSTRING) {
        size_t len;
        const char *s = lua_tolstring(L, idx, &len);
        STACK_OF(X509) *more;

        if (gw_crypto_load_certs((const unsigned char *)s, len, &more, kind,
                                 msg, msglen) != GW_OK)
        {
            return GW_ERR;
        }
        while (sk_X509_num(more) > 0) {
            X509 *x = sk_X509_shift(more);

            if (!sk_X509_push(sk, x)) {
                X509_free(x);
            }
        }
        sk_X509_free(more);
        return GW_OK;
    }
    if (lua_type(L, idx) != LUA_TTABLE) {
        *kind = "malformed";
        snprintf(msg, msglen, "expected certificates (handle, PEM string "
                 "or array of them)");
        return GW_ERR;
    }
    n = (int)lua_objlen(L, idx);
    for (i = 1; i <= n; i++) {
        int rc;

        lua_rawgeti(L, idx, i);
        rc = lua_type(L, -1) == LUA_TTABLE
             ? (*kind = "malformed",
                snprintf(msg, msglen, "nested certificate arrays"), GW_ERR)
             : gw_collect(L, lua_gettop(L), sk, kind, msg, msglen);
        lua_pop(L, 1);
        if (rc != GW_OK) {
            return GW_ERR;
        }
    }
    return GW_OK;
}

static int
gw_collect_crls(lua_State *L, int idx, X509_STORE *store, const char **kind,
                char *msg, size_t msglen, int *count)
{
    int i, n;

    *count = 0;
    if (lua_isnoneornil(L, idx)) {
        return GW_OK;
    }
    if (lua_type(L, idx) == LUA_TSTRING) {
        lua_createtable(L, 1, 0);
        lua_pushvalue(L, idx);
        lua_rawseti(L, -2, 1);
        lua_replace(L, idx);
    }
    if (lua_type(L, idx) != LUA_TTABLE) {
        *kind = "malformed";
        snprintf(msg, msglen, "crls must be a PEM/DER string or an array");
        return GW_ERR;
    }
    n = (int)lua_objlen(L, idx);
    for (i = 1; i <= n; i++) {
        size_t len;
        const char *s;
        X509_CRL *crl = NULL;
        BIO *bio;

        lua_rawgeti(L, idx, i);
        s = lua_tolstring(L, -1, &len);
        if (s != NULL && len < INT_MAX) {
            bio = BIO_new_mem_buf(s, (int)len);
            if (bio != NULL) {
                crl = memmem(s, len, "-----BEGIN", 10) != NULL
                      ? PEM_read_bio_X509_CRL(bio, NULL, NULL, NULL)
                      : d2i_X509_CRL_bio(bio, NULL);
                BIO_free(bio);
            }
        }
        lua_pop(L, 1);
        if (crl == NULL) {
            ERR_clear_error();
            *kind = "malformed";
            snprintf(msg, msglen, "crl %d does not decode", i);
            return GW_ERR;
        }
        X509_STORE_add_crl(store, crl);
        X509_CRL_free(crl);
        (*count)++;
    }
    return GW_OK;
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

/* Maps a verify failure to kind + message. */
static const char *
gw_classify(X509_STORE_CTX *ctx, X509 *leaf, char *msg, size_t msglen)
{
    int err = X509_STORE_CTX_get_error(ctx);
    int depth = X509_STORE_CTX_get_error_depth(ctx);
    X509 *cur = X509_STORE_CTX_get_current_cert(ctx);
    char subj[256], iss[256], when[64];
    const char *what = X509_verify_cert_error_string(err);

    if (cur == NULL) {
        cur = leaf;
    }
    gw_name_str(X509_get_subject_name(cur), subj, sizeof(subj));
    gw_name_str(X509_get_issuer_name(cur), iss, sizeof(iss));

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

static int
gw_purpose(const char *name)
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

/*
 * syntax: ok, err = x509.verify_chain(cert, { roots = ..., intermediates =
 *   ..., at = epoch, hostname = "...", purpose = "server" | "client" |
 *   "any", crls = {...}, max_depth = n })
 * roots / intermediates: a certificate handle, a PEM bundle, or an array
 * of either; roots = "system" uses the system trust store.
 */
static int
lx509_verify_chain(lua_State *L)
{
    struct gw_cert *c = gw_cert_check(L, 1);
    const char *kind = "internal", *host = NULL, *purpose = NULL;
    char msg[1024] = "";
    STACK_OF(X509) *roots = NULL, *inter = NULL;
    X509_STORE *store = NULL;
    X509_STORE_CTX *ctx = NULL;
    X509_VERIFY_PARAM *param;
    int system_roots = 0, has_at = 0, ncrl = 0, depth = -1, pid = 0, i;
    lua_Number at = 0;

    luaL_checktype(L, 2, LUA_TTABLE);
    lua_settop(L, 2);
    lua_getfield(L, 2, "roots");               /* 3 */
    lua_getfield(L, 2, "intermediates");       /* 4 */
    lua_getfield(L, 2, "crls");                /* 5 */
    lua_getfield(L, 2, "at");                  /* 6 */
    lua_getfield(L, 2, "hostname");            /* 7 */
    lua_getfield(L, 2, "purpose");             /* 8 */
    lua_getfield(L, 2, "max_depth");           /* 9 */
    if (!lua_isnil(L, 6)) {
        at = luaL_checknumber(L, 6);
        has_at = 1;
    }
    host = luaL_optstring(L, 7, NULL);
    purpose = luaL_optstring(L, 8, NULL);
    if (purpose != NULL) {
        pid = gw_purpose(purpose);
        if (pid == 0) {
            return luaL_argerror(L, 2, "purpose must be server, client, "
                                 "any or smime_sign");
        }
    }
    if (!lua_isnil(L, 9)) {
        depth = (int)luaL_checkinteger(L, 9);
    }
    if (lua_type(L, 3) == LUA_TSTRING
        && strcmp(lua_tostring(L, 3), "system") == 0)
    {
        system_roots = 1;
    }

    /* From here on C memory is held: no raising until it is freed. */
    roots = sk_X509_new_null();
    inter = sk_X509_new_null();
    store = X509_STORE_new();
    ctx = X509_STORE_CTX_new();
    if (roots == NULL || inter == NULL || store == NULL || ctx == NULL) {
        snprintf(msg, sizeof(msg), "out of memory");
        goto err;
    }
    if ((!system_roots
         && gw_collect(L, 3, roots, &kind, msg, sizeof(msg)) != GW_OK)
        || gw_collect(L, 4, inter, &kind, msg, sizeof(msg)) != GW_OK
        || gw_collect_crls(L, 5, store, &kind, msg, sizeof(msg), &ncrl)
           != GW_OK)
    {
        goto err;
    }
    if (system_roots) {
        X509_STORE_set_default_paths(store);
    }
    gw_sm2_cert_id(c->x509);
    for (i = 0; i < sk_X509_num(inter); i++) {
        gw_sm2_cert_id(sk_X509_value(inter, i));
    }
    for (i = 0; i < sk_X509_num(roots); i++) {
        gw_sm2_cert_id(sk_X509_value(roots, i));
        X509_STORE_add_cert(store, sk_X509_value(roots, i));
    }
    if (X509_STORE_CTX_init(ctx, store, c->x509, inter) != 1) {
        kind = "internal";
        snprintf(msg, sizeof(msg), "verify setup failed");
        goto err;
    }
    param = X509_STORE_CTX_get0_param(ctx);
    if (has_at) {
        X509_VERIFY_PARAM_set_time(param, (time_t)at);
    }
    if (host != NULL) {
        X509_VERIFY_PARAM_set1_host(param, host, 0);
    }
    if (pid != 0) {
        X509_STORE_CTX_set_purpose(ctx, pid);
    }
    if (depth >= 0) {
        X509_VERIFY_PARAM_set_depth(param, depth);
    }
    if (ncrl > 0) {
        X509_VERIFY_PARAM_set_flags(param, X509_V_FLAG_CRL_CHECK);
    }
    if (X509_verify_cert(ctx) != 1) {
        kind = gw_classify(ctx, c->x509, msg, sizeof(msg));
        goto err;
    }
    X509_STORE_CTX_free(ctx);
    X509_STORE_free(store);
    sk_X509_pop_free(roots, X509_free);
    sk_X509_pop_free(inter, X509_free);
    ERR_clear_error();
    lua_pushboolean(L, 1);
    return 1;
err:
    X509_STORE_CTX_free(ctx);
    X509_STORE_free(store);
    sk_X509_pop_free(roots, X509_free);
    sk_X509_pop_free(inter, X509_free);
    ERR_clear_error();
    return gw_push_error(L, kind, 0, "verify chain: %s", msg);
}

/* syntax: cert, err = x509.load(pem_or_der) -- the first certificate;
 * also crypto.certificate */
int
gw_lx509_load(lua_State *L)
{
    size_t len;
    const char *in = luaL_checklstring(L, 1, &len);
    const char *kind = "internal";
    char msg[GW_ERRMSG_MAX] = "";
    STACK_OF(X509) *sk;
    struct gw_cert *c;

    if (gw_crypto_load_certs((const unsigned char *)in, len, &sk, &kind,
                             msg, sizeof(msg)) != GW_OK)
    {
        return gw_push_error(L, kind, 0, "load certificate: %s", msg);
    }
    c = gw_cert_push(L, sk_X509_value(sk, 0));
    sk_X509_pop_free(sk, X509_free);
    if (c == NULL) {
        return gw_push_error(L, "internal", 0, "out of memory");
    }
    return 1;
}

/* syntax: certs, err = x509.chain(pem_bundle) -- array, leaf first */
static int
lx509_chain(lua_State *L)
{
    size_t len;
    const char *in = luaL_checklstring(L, 1, &len);
    const char *kind = "internal";
    char msg[GW_ERRMSG_MAX] = "";
    STACK_OF(X509) *sk;
    int i;

    if (gw_crypto_load_certs((const unsigned char *)in, len, &sk, &kind,
                             msg, sizeof(msg)) != GW_OK)
    {
        return gw_push_error(L, kind, 0, "load certificates: %s", msg);
    }
    lua_createtable(L, sk_X509_num(sk), 0);
    for (i = 0; i < sk_X509_num(sk); i++) {
        if (gw_cert_push(L, sk_X509_value(sk, i)) != NULL) {
            lua_rawseti(L, -2, i + 1);
        }
    }
    sk_X509_pop_free(sk, X509_free);
    return 1;
}

static const luaL_Reg lcert_methods[] = {
    { "serial", lcert_serial },
    { "subject", lcert_subject },
    { "issuer", lcert_issuer },
    { "not_before", lcert_not_before },
    { "not_after", lcert_not_after },
    { "key_type", lcert_key_type },
    { "key_bits", lcert_key_bits },
    { "fingerprint", lcert_fingerprint },
    { "is_ca", lcert_is_ca },
    { "pem", lcert_pem },
    { "der", lcert_der },
    { "public_key", lcert_public_key },
    { "info", lcert_info },
    { "verify_chain", lx509_verify_chain },
    { "close", lcert_gc },
    { NULL, NULL }
};

static const luaL_Reg lx509_funcs[] = {
    { "load", gw_lx509_load },
    { "chain", lx509_chain },
    { "info", lcert_info },
    { "verify_chain", lx509_verify_chain },
    { NULL, NULL }
};

void
gw_x509_register_cert_mt(lua_State *L)
{
    if (luaL_newmetatable(L, GW_CERT_MT)) {
        lua_pushcfunction(L, lcert_gc);
        lua_setfield(L, -2, "__gc");
        lua_pushcfunction(L, lcert_tostring);
        lua_setfield(L, -2, "__tostring");
        lua_newtable(L);
        luaL_register(L, NULL, lcert_methods);
        lua_setfield(L, -2, "__index");
    }
    lua_pop(L, 1);
}

int
luaopen_paygate_x509(lua_State *L)
{
    gw_crypto_register_types(L);
    lua_newtable(L);
    luaL_register(L, NULL, lx509_funcs);
    return 1;
}
