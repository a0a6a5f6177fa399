/*
 * lx509.c -- paygate.x509: loading certificates and bundles, their fields,
 * and chain verification with classified errors. The certificate handle
 * type and its methods live in lobjects.c (shared with paygate.crypto and
 * paygate.keyring); the verification itself in x509.c. This file is the
 * module table.
 *
 * verify_chain() maps OpenSSL's verify result to a stable kind and a
 * message naming the certificate and the likely fix:
 *   unknown_authority, missing_intermediate, self_signed_untrusted,
 *   expired, not_yet_valid, bad_signature, hostname_mismatch, wrong_usage,
 *   path_too_long, revoked, revocation_unknown, malformed, untrusted.
 */
#include <openssl/x509.h>

#include <lua.h>
#include <lauxlib.h>

#include "runtime.h"
#include "crypto.h"
#include "lobjects.h"

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

static const luaL_Reg lx509_funcs[] = {
    { "load", gw_lcert_load },
    { "chain", lx509_chain },
    { "info", gw_lcert_info },
    { "verify_chain", gw_lcert_verify_chain },
    { NULL, NULL }
};

int
luaopen_paygate_x509(lua_State *L)
{
    gw_objects_register(L);
    lua_newtable(L);
    luaL_register(L, NULL, lx509_funcs);
    return 1;
}
