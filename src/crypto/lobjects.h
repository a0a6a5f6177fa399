/*
 * lobjects.h -- the Lua handle types of the crypto modules (lobjects.c):
 * key handles and certificate handles, shared by paygate.crypto
 * (lcrypto.c), paygate.x509 (lx509.c) and paygate.keyring (lkeyring.c).
 */
#ifndef GW_LOBJECTS_H
#define GW_LOBJECTS_H

#include <lua.h>

#include "crypto.h"

#define GW_KEY_MT   "paygate.crypto.key"
#define GW_CERT_MT  "paygate.x509.cert"

/* Lua userdata behind key handles. */
struct gw_key {
    struct gw_keyinfo ki;     /* ki.pkey NULL after __gc / close */
};

/* Lua userdata behind certificate handles. */
struct gw_cert {
    X509             *x509;   /* owned; NULL after __gc / close */
    struct gw_keyinfo ki;     /* the certificate's public key; empty
                               * (pkey NULL) when neither RSA nor SM2 */
};

/* Creates both metatables (once per Lua state); every module's luaopen
 * calls it, so handles work whichever module is required first. */
void gw_objects_register(lua_State *L);

/* Pushes a new key handle holding its own reference to pkey (the caller
 * keeps and frees its own). Returns NULL, pushing nothing, when the key
 * is neither RSA nor SM2 or on allocation failure. */
struct gw_key *gw_key_push(lua_State *L, EVP_PKEY *pkey, int is_private);

/* Pushes a new certificate handle holding its own reference to x509.
 * Returns NULL, pushing nothing, if the reference cannot be taken. */
struct gw_cert *gw_cert_push(lua_State *L, X509 *x509);

/* The open key / certificate handle at idx; raise otherwise. */
struct gw_key *gw_key_check(lua_State *L, int idx);
struct gw_cert *gw_cert_check(lua_State *L, int idx);

/* The verifier behind a key or certificate handle at idx; raises if idx
 * is neither or was closed. */
struct gw_keyinfo *gw_verifier_check(lua_State *L, int idx);

/* Lua functions shared by two modules (each also a certificate method):
 * crypto.certificate = x509.load, x509.info, x509.verify_chain. */
int gw_lcert_load(lua_State *L);
int gw_lcert_info(lua_State *L);
int gw_lcert_verify_chain(lua_State *L);

#endif
