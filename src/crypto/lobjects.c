/*
 * lobjects.c -- the Lua handle types shared by paygate.crypto,
 * paygate.x509 and paygate.keyring: key handles (struct gw_key,
 * "paygate.crypto.key") and certificate handles (struct gw_cert,
 * "paygate.x509.cert"). This file alone owns their metatables and
 * methods, so the modules call into it and never into each other.
 *
 * A key handle owns a struct gw_keyinfo (an EVP_PKEY reference and its
 * cached contexts); a certificate handle owns one X509 reference and the
 * key info of its public key, so crypto.verify(cert, ...) is one verify,
 * no parsing. __gc and close() are safe to call twice. Private key
 * material never goes back to Lua and never appears in tostring().
 */
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <lua.h>
#include <lauxlib.h>

#include "lstate.h"
#include "runtime.h"
#include "crypto.h"
#include "lobjects.h"

/* ---- key handles ------------------------------------------------------- */

struct gw_key *
gw_key_check(lua_State *L, int idx)
{
    struct gw_key *k = gw_checkudata(L, idx, GW_KEY_MT);

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
gw_verifier_check(lua_State *L, int idx)
{
    struct gw_key *k = gw_testudata(L, idx, GW_KEY_MT);
    struct gw_cert *c;

    if (k != NULL) {
        if (k->ki.pkey == NULL) {
            luaL_argerror(L, idx, "key handle is closed");
        }
        return &k->ki;
    }
    c = gw_testudata(L, idx, GW_CERT_MT);
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
    struct gw_key *k = gw_testudata(L, 1, GW_KEY_MT);

    if (k == NULL) {
        return 0;
    }

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
    struct gw_key *k = gw_checkudata(L, 1, GW_KEY_MT);
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
    struct gw_keyinfo *ki = gw_verifier_check(L, 1);
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

/* ---- certificate handles ----------------------------------------------- */

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
    struct gw_cert *c = gw_checkudata(L, idx, GW_CERT_MT);

    if (c->x509 == NULL) {
        luaL_argerror(L, idx, "certificate handle is closed");
    }
    return c;
}

static int
lcert_gc(lua_State *L)
{
    struct gw_cert *c = gw_testudata(L, 1, GW_CERT_MT);

    if (c == NULL) {
        return 0;
    }

    gw_keyinfo_clear(&c->ki);
    X509_free(c->x509);
    c->x509 = NULL;
    return 0;
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

static int
lcert_serial(lua_State *L)
{
    char hex[256];

    if (gw_x509_serial_hex(gw_cert_check(L, 1)->x509, hex, sizeof(hex))
        < 0)
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
    lua_pushnumber(L, gw_crypto_asn1_epoch(
                       X509_get0_notBefore(gw_cert_check(L, 1)->x509)));
    return 1;
}

static int
lcert_not_after(lua_State *L)
{
    lua_pushnumber(L, gw_crypto_asn1_epoch(
                       X509_get0_notAfter(gw_cert_check(L, 1)->x509)));
    return 1;
}

static int
lcert_key_type(lua_State *L)
{
    lua_pushstring(L, gw_x509_key_type(gw_cert_check(L, 1)->x509));
    return 1;
}

static int
lcert_key_bits(lua_State *L)
{
    lua_pushinteger(L, gw_x509_key_bits(gw_cert_check(L, 1)->x509));
    return 1;
}

static int
lcert_fingerprint(lua_State *L)
{
    char fpr[65];

    if (gw_x509_fingerprint(gw_cert_check(L, 1)->x509, fpr) != GW_OK) {
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
int
gw_lcert_info(lua_State *L)
{
    struct gw_cert *c = gw_cert_check(L, 1);
    char buf[256];

    lua_createtable(L, 0, 10);
    if (gw_x509_serial_hex(c->x509, buf, sizeof(buf)) >= 0) {
        lua_pushstring(L, buf);
        lua_setfield(L, -2, "serial");
    }
    gw_push_name(L, X509_get_subject_name(c->x509));
    lua_setfield(L, -2, "subject");
    gw_push_name(L, X509_get_issuer_name(c->x509));
    lua_setfield(L, -2, "issuer");
    lua_pushnumber(L, gw_crypto_asn1_epoch(X509_get0_notBefore(c->x509)));
    lua_setfield(L, -2, "not_before");
    lua_pushnumber(L, gw_crypto_asn1_epoch(X509_get0_notAfter(c->x509)));
    lua_setfield(L, -2, "not_after");
    lua_pushstring(L, gw_x509_key_type(c->x509));
    lua_setfield(L, -2, "key_type");
    lua_pushinteger(L, gw_x509_key_bits(c->x509));
    lua_setfield(L, -2, "key_bits");
    if (gw_x509_fingerprint(c->x509, buf) == GW_OK) {
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
    struct gw_cert *c = gw_checkudata(L, 1, GW_CERT_MT);
    char serial[256];

    if (c->x509 == NULL) {
        lua_pushliteral(L, "paygate.x509.cert (closed)");
        return 1;
    }
    if (gw_x509_serial_hex(c->x509, serial, sizeof(serial)) < 0) {
        strcpy(serial, "?");
    }
    lua_pushfstring(L, "paygate.x509.cert: serial %s, ", serial);
    gw_push_name(L, X509_get_subject_name(c->x509));
    lua_concat(L, 2);
    return 1;
}

/* ---- loading and chain verification ------------------------------------ */

/* syntax: cert, err = x509.load(pem_or_der) -- the first certificate;
 * also crypto.certificate (one loader for both modules) */
int
gw_lcert_load(lua_State *L)
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

/* Appends the certificates in the Lua value at idx (nil, a handle, a
 * PEM/DER string, or an array of those) to sk. GW_OK, or GW_ERR with kind
 * and msg: a string that fails to parse, a value of the wrong type, a
 * closed handle or a nested array. Never raises, so callers may hold C
 * memory (sk) while collecting. */
static int
gw_collect(lua_State *L, int idx, STACK_OF(X509) *sk, const char **kind,
           char *msg, size_t msglen)
{
    int i, n;

    if (lua_isnoneornil(L, idx)) {
        return GW_OK;
    }
    if (lua_isuserdata(L, idx)) {
        struct gw_cert *c = gw_testudata(L, idx, GW_CERT_MT);

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

/* Parses the CRLs at idx (nil, one PEM/DER string, or an array of them)
 * into sk. GW_OK, or GW_ERR with kind and msg. Never raises. */
static int
gw_collect_crls(lua_State *L, int idx, STACK_OF(X509_CRL) *sk,
                const char **kind, char *msg, size_t msglen)
{
    int i, n, one;

    if (lua_isnoneornil(L, idx)) {
        return GW_OK;
    }
    one = lua_type(L, idx) == LUA_TSTRING;
    if (!one && lua_type(L, idx) != LUA_TTABLE) {
        *kind = "malformed";
        snprintf(msg, msglen, "crls must be a PEM/DER string or an array");
        return GW_ERR;
    }
    n = one ? 1 : (int)lua_objlen(L, idx);
    for (i = 1; i <= n; i++) {
        size_t len = 0;
        const char *s;
        X509_CRL *crl = NULL;

        if (one) {
            lua_pushvalue(L, idx);
        } else {
            lua_rawgeti(L, idx, i);
        }
        s = lua_type(L, -1) == LUA_TSTRING ? lua_tolstring(L, -1, &len)
                                           : NULL;
        if (s != NULL) {
            crl = gw_crypto_load_crl((const unsigned char *)s, len);
        }
        lua_pop(L, 1);
        if (crl == NULL) {
            *kind = "malformed";
            snprintf(msg, msglen, "crl %d does not decode", i);
            return GW_ERR;
        }
        if (!sk_X509_CRL_push(sk, crl)) {
            X509_CRL_free(crl);
            *kind = "internal";
            snprintf(msg, msglen, "out of memory");
            return GW_ERR;
        }
    }
    return GW_OK;
}

#define VC "x509.verify_chain"

static const char *const verify_chain_opts[] = {
    "roots", "intermediates", "crls", "at", "hostname", "purpose",
    "max_depth", NULL
};

/* Raises unless opts.NAME (at idx) is nil, a certificate handle, a
 * string (PEM; "system" for roots) or a table (an array of them, whose
 * items gw_collect() checks as input): a wrong type is the caller's
 * mistake, not malformed input. */
static void
check_certs_opt(lua_State *L, int idx, const char *name)
{
    int t = lua_type(L, idx);

    if (t != LUA_TNIL && t != LUA_TSTRING && t != LUA_TTABLE
        && gw_testudata(L, idx, GW_CERT_MT) == NULL) {
        gw_raise(L, VC ": opts.%s must be a certificate handle, a PEM "
                 "string or an array of them", name);
    }
}

/* Raises unless opts.crls (at idx) is nil, a string or a table. */
static void
check_crls_opt(lua_State *L, int idx)
{
    int t = lua_type(L, idx);

    if (t != LUA_TNIL && t != LUA_TSTRING && t != LUA_TTABLE) {
        gw_raise(L, VC ": opts.crls must be a PEM/DER string or an array "
                 "of them");
    }
}

/*
 * syntax: ok, err = cert:verify_chain({ roots = ..., intermediates = ...,
 *   at = epoch, hostname = "...", purpose = "server" | "client" | "any" |
 *   "smime_sign", crls = {...}, max_depth = n })
 * (also x509.verify_chain(cert, opts)). roots / intermediates: a
 * certificate handle, a PEM bundle, or an array of either; roots =
 * "system" uses the system trust store.
 * returns: true, or nil, err (kinds in crypto.h, gw_x509_verify_chain).
 */
int
gw_lcert_verify_chain(lua_State *L)
{
    struct gw_cert *c = gw_cert_check(L, 1);
    const char *kind = "internal", *purpose;
    char msg[1024] = "";
    struct gw_x509_verify v;

    memset(&v, 0, sizeof(v));
    v.depth = -1;
    gw_opts_known(L, 2, VC, "opts", verify_chain_opts);
    lua_settop(L, 2);
    v.host = gw_opt_string(L, 2, VC, "hostname");
    if (v.host != NULL) {
        size_t hl;

        /* OpenSSL checks no host at all for "" and reads a name up to a
         * NUL: either would pass any certificate's names */
        lua_getfield(L, 2, "hostname");
        lua_tolstring(L, -1, &hl);
        lua_pop(L, 1);
        if (hl == 0 || strlen(v.host) != hl) {
            return gw_raise(L, VC ": opts.hostname must be a host name (not "
                            "empty, no NUL byte)");
        }
    }
    lua_getfield(L, 2, "at");
    v.has_at = !lua_isnil(L, -1);
    lua_pop(L, 1);
    v.at = (time_t)gw_opt_number(L, 2, VC, "at", 0);
    purpose = gw_opt_string(L, 2, VC, "purpose");
    if (purpose != NULL) {
        v.purpose = gw_x509_purpose(purpose);
        if (v.purpose == 0) {
            return gw_raise(L, VC ": opts.purpose must be server, client, "
                            "any or smime_sign");
        }
    }
    lua_getfield(L, 2, "max_depth");
    if (!lua_isnil(L, -1)) {
        double d = lua_type(L, -1) == LUA_TNUMBER ? lua_tonumber(L, -1)
                                                  : -1;

        if (!(d >= 0 && d <= 1000000 && d == (int)d)) {
            return gw_raise(L, VC ": opts.max_depth must be a non-negative"
                            " integer");
        }
        v.depth = (int)d;
    }
    lua_pop(L, 1);
    lua_getfield(L, 2, "roots");               /* 3 */
    lua_getfield(L, 2, "intermediates");       /* 4 */
    lua_getfield(L, 2, "crls");                /* 5 */
    check_certs_opt(L, 3, "roots");
    check_certs_opt(L, 4, "intermediates");
    check_crls_opt(L, 5);
    if (lua_type(L, 3) == LUA_TSTRING
        && strcmp(lua_tostring(L, 3), "system") == 0)
    {
        v.system_roots = 1;
    }

    /* From here on C memory is held: no raising until it is freed. */
    v.roots = sk_X509_new_null();
    v.inter = sk_X509_new_null();
    v.crls = sk_X509_CRL_new_null();
    if (v.roots == NULL || v.inter == NULL || v.crls == NULL) {
        snprintf(msg, sizeof(msg), "out of memory");
        goto done;
    }
    if ((v.system_roots
         || gw_collect(L, 3, v.roots, &kind, msg, sizeof(msg)) == GW_OK)
        && gw_collect(L, 4, v.inter, &kind, msg, sizeof(msg)) == GW_OK
        && gw_collect_crls(L, 5, v.crls, &kind, msg, sizeof(msg)) == GW_OK
        && gw_x509_verify_chain(c->x509, &v, &kind, msg, sizeof(msg))
           == GW_OK)
    {
        kind = NULL;
    }
done:
    sk_X509_pop_free(v.roots, X509_free);
    sk_X509_pop_free(v.inter, X509_free);
    sk_X509_CRL_pop_free(v.crls, X509_CRL_free);
    ERR_clear_error();
    if (kind != NULL) {
        return gw_push_error(L, kind, 0, "verify chain: %s", msg);
    }
    lua_pushboolean(L, 1);
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
    { "info", gw_lcert_info },
    { "verify_chain", gw_lcert_verify_chain },
    { "close", lcert_gc },
    { NULL, NULL }
};

void
gw_objects_register(lua_State *L)
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
