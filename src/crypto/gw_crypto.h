/*
 * gw_crypto.h -- keys, certificates and the C entry points shared by
 * paygate.crypto (lcrypto.c), paygate.x509 (lx509.c) and paygate.keyring
 * (lkeyring.c). The fuzzers call the flat gw_crypto_* functions directly.
 *
 * Every function that can fail reports a stable kind (a static string such
 * as "malformed") and writes a human message into a caller buffer. Neither
 * ever contains key material.
 */
#ifndef GW_CRYPTO_H
#define GW_CRYPTO_H

#include <stddef.h>
#include <stdint.h>
#include <openssl/evp.h>
#include <openssl/x509.h>
#include <lua.h>

#define GW_KEY_MT   "paygate.crypto.key"
#define GW_CERT_MT  "paygate.x509.cert"

#define GW_KEY_RSA  1
#define GW_KEY_SM2  2

#define GW_ALG_SHA256_RSA 1     /* WECHATPAY2-SHA256-RSA2048, PKCS#1 v1.5 */
#define GW_ALG_SM2_SM3    2     /* WECHATPAY2-SM2-WITH-SM3, DER (r, s) */

#define GW_SM2_ID     "1234567812345678"
#define GW_SM2_ID_LEN 16

#define GW_ERRMSG_MAX 256

/* A parsed key (private or public) with its cached operation contexts. */
struct gw_keyinfo {
    EVP_PKEY     *pkey;       /* owned reference; NULL once cleared */
    int           type;       /* GW_KEY_RSA or GW_KEY_SM2 */
    int           bits;       /* modulus / curve size in bits */
    int           is_private; /* 1 when pkey holds private material */
    EVP_PKEY_CTX *sign_ctx;   /* owned; made on first sign (SM2: the
                               * ID-carrying ctx under sm2_sign) */
    EVP_PKEY_CTX *verify_ctx; /* owned; made on first verify */
    EVP_MD_CTX   *sm2_sign;   /* owned; SM2 only, re-initialised per call */
    EVP_MD_CTX   *sm2_verify; /* owned; SM2 only, re-initialised per call */
};

/* Lua userdata behind paygate.crypto key handles. */
struct gw_key {
    struct gw_keyinfo ki;     /* ki.pkey NULL after __gc / close */
};

/* Lua userdata behind certificate handles. */
struct gw_cert {
    X509             *x509;   /* owned; NULL after __gc / close */
    struct gw_keyinfo ki;     /* the certificate's public key */
};

/* Takes a new reference to pkey. GW_OK, or GW_ERR with *kind set when the
 * key type is neither RSA nor SM2 ("unsupported_key_type"). */
int gw_keyinfo_init(struct gw_keyinfo *ki, EVP_PKEY *pkey, int is_private,
                    const char **kind, char *msg, size_t msglen);

/* Drops the reference and cached contexts. Safe to call twice. */
void gw_keyinfo_clear(struct gw_keyinfo *ki);

/* "sha256-rsa", "sm2-sm3" and the WECHATPAY2-* header spellings; 0 when
 * unknown. */
int gw_crypto_alg(const char *name);

/* Verifies sig over data. GW_OK, or GW_ERR with kind "signature_mismatch",
 * "key_type_mismatch" or "internal". */
int gw_crypto_verify(struct gw_keyinfo *ki, int alg,
                     const unsigned char *data, size_t len,
                     const unsigned char *sig, size_t siglen,
                     const char **kind, char *msg, size_t msglen);

/* Signs data into sig (at least EVP_PKEY_get_size() bytes); *siglen is set.
 * GW_OK or GW_ERR with a kind as above. */
int gw_crypto_sign(struct gw_keyinfo *ki, int alg,
                   const unsigned char *data, size_t len,
                   unsigned char *sig, size_t *siglen,
                   const char **kind, char *msg, size_t msglen);

/* Loaders. On success *out holds a new reference the caller frees. On
 * failure they return GW_ERR with kind one of not_pem, truncated_pem,
 * bad_password, unsupported_key_type, key_cert_mismatch, malformed.
 * pass may be NULL. gw_crypto_load_private_key also accepts PKCS#12; then
 * *cert_out (when not NULL) receives its certificate or NULL. */
int gw_crypto_load_private_key(const unsigned char *in, size_t len,
                               const char *pass, size_t passlen,
                               EVP_PKEY **out, X509 **cert_out,
                               const char **kind, char *msg, size_t msglen);
int gw_crypto_load_public_key(const unsigned char *in, size_t len,
                              EVP_PKEY **out,
                              const char **kind, char *msg, size_t msglen);
/* Loads every certificate in a PEM bundle (or one DER certificate) into a
 * new stack the caller frees with sk_X509_pop_free(s, X509_free). */
int gw_crypto_load_certs(const unsigned char *in, size_t len,
                         STACK_OF(X509) **out,
                         const char **kind, char *msg, size_t msglen);

/* Strict base64 (standard alphabet, padded, no whitespace). out needs
 * len / 4 * 3 bytes. Returns the decoded length, or -1 on bad input. */
long gw_base64_decode(const char *in, size_t len, unsigned char *out);

/* Longest AEAD nonce, bytes: OpenSSL's GCM limit (GCM itself takes any
 * length; 128 bytes is far above any nonce WeChat Pay sends). */
#define GW_AEAD_NONCE_MAX 128

/* AEAD. alg "AEAD_AES_256_GCM" (32-byte key) or "AEAD_SM4_GCM" (16-byte
 * key); nonce 1..GW_AEAD_NONCE_MAX bytes (12 is GCM's fast path, any other
 * length is hashed into the counter block as GCM specifies). Encrypt writes len + 16 bytes; decrypt
 * reads len >= 16 bytes (ciphertext || tag), writes len - 16 bytes, and
 * leaves out zeroed on any failure. Kinds: unsupported_algorithm, bad_key,
 * bad_nonce, decrypt_failed, internal. */
int gw_aead_encrypt(const char *alg, const unsigned char *key, size_t keylen,
                    const unsigned char *nonce, size_t noncelen,
                    const unsigned char *aad, size_t aadlen,
                    const unsigned char *in, size_t len, unsigned char *out,
                    const char **kind, char *msg, size_t msglen);
int gw_aead_decrypt(const char *alg, const unsigned char *key, size_t keylen,
                    const unsigned char *nonce, size_t noncelen,
                    const unsigned char *aad, size_t aadlen,
                    const unsigned char *in, size_t len, unsigned char *out,
                    const char **kind, char *msg, size_t msglen);

/* Hex SHA-256 fingerprint (uppercase, 64 chars + NUL) of the key's
 * SubjectPublicKeyInfo. GW_OK or GW_ERR. */
int gw_crypto_key_fingerprint(EVP_PKEY *pkey, char out[65]);

/* Lua glue shared by the three modules. */
void gw_crypto_register_types(lua_State *L);   /* both metatables */
struct gw_key *gw_key_push(lua_State *L, EVP_PKEY *pkey, int is_private);
struct gw_cert *gw_cert_push(lua_State *L, X509 *x509);  /* up-refs x509 */
struct gw_cert *gw_cert_check(lua_State *L, int idx);    /* raises */
/* crypto.certificate / x509.load: pushes the first certificate of PEM or
 * DER input, or nil, err. */
int gw_lx509_load(lua_State *L);
/* The verifier behind a key or certificate handle at idx; raises if idx is
 * neither or was closed. */
struct gw_keyinfo *gw_crypto_check_verifier(lua_State *L, int idx);
/* Pushes the Lua error for a failed call: nil, err. Returns 2. */
int gw_crypto_fail(lua_State *L, const char *kind, const char *msg);

/* Defined in lx509.c, used by lcrypto.c to build the cert metatable. */
void gw_x509_register_cert_mt(lua_State *L);

#endif
