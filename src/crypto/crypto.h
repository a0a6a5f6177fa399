/*
 * crypto.h -- paygate's cryptography as a plain C API, without Lua: keys
 * and their cached operation contexts, PEM / DER / PKCS#12 loading,
 * RSA / SM2 signatures, RSA-OAEP, AEAD (AES-256-GCM, SM4-GCM), digests,
 * strict base64 and hex, and the certificate helpers behind chain
 * verification. The Lua modules (lcrypto.c, lx509.c, lkeyring.c, with the
 * handle types in lobjects.c) and the fuzzers are built on it.
 *
 * Implemented in crypto.c (keys, signatures, OAEP, digests), load.c
 * (loaders), aead.c, codec.c and x509.c; sm4gcm.h is the GCM composition
 * behind AEAD_SM4_GCM.
 *
 * Functions that can fail return 0 (GW_OK) or -1 (GW_ERR), set *kind to a
 * stable static string (such as "malformed") and write a human message
 * into msg (msglen bytes, may be 0). Neither ever contains key material.
 */
#ifndef GW_CRYPTO_API_H
#define GW_CRYPTO_API_H

#include <stddef.h>
#include <stdint.h>
#include <time.h>
#include <openssl/evp.h>
#include <openssl/x509.h>

#define GW_KEY_RSA  1
#define GW_KEY_SM2  2

#define GW_ALG_SHA256_RSA 1     /* WECHATPAY2-SHA256-RSA2048, PKCS#1 v1.5 */
#define GW_ALG_SM2_SM3    2     /* WECHATPAY2-SM2-WITH-SM3, DER (r, s) */

/* The SM2 distinguishing ID WeChat Pay signs with (GM/T 0009's default;
 * OpenSSL's own default is empty). */
#define GW_SM2_ID     "1234567812345678"
#define GW_SM2_ID_LEN 16

#define GW_ERRMSG_MAX 256       /* bytes; enough for every message here */

/* Longest AEAD nonce, bytes: OpenSSL's GCM limit (GCM itself takes any
 * length; 128 bytes is far above any nonce WeChat Pay sends). */
#define GW_AEAD_NONCE_MAX 128

/* ---- keys and signatures (crypto.c) ------------------------------------ */

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

/* GW_KEY_RSA, GW_KEY_SM2, or 0 for any other key type. */
int gw_crypto_key_type(EVP_PKEY *pkey);

/* Takes a new reference to pkey. GW_OK, or GW_ERR with *kind
 * "unsupported_key_type" (neither RSA nor SM2, or RSA under 1024 bits) or
 * "internal". */
int gw_keyinfo_init(struct gw_keyinfo *ki, EVP_PKEY *pkey, int is_private,
                    const char **kind, char *msg, size_t msglen);

/* Drops the reference and cached contexts. Safe to call twice. */
void gw_keyinfo_clear(struct gw_keyinfo *ki);

/* "sha256-rsa", "sm2-sm3" and the WECHATPAY2-* header spellings; 0 when
 * unknown. */
int gw_crypto_alg(const char *name);

/* Verifies sig over data. GW_OK, or GW_ERR with kind "signature_mismatch",
 * "key_type_mismatch", "unsupported_key_type" or "internal". */
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

/* RSA-OAEP with SHA-1, MGF1-SHA-1 and an empty label (WeChat Pay's
 * sensitive-field encryption). *outlen: in, the size of out (at least
 * EVP_PKEY_get_size() bytes); out, the length written. Encrypt: kinds
 * key_type_mismatch (not RSA), too_long (more than size - 42 bytes),
 * internal. Decrypt (needs an RSA
 * private key): key_type_mismatch, decrypt_failed; out is cleansed on
 * failure. */
int gw_crypto_oaep_encrypt(struct gw_keyinfo *ki,
                           const unsigned char *in, size_t len,
                           unsigned char *out, size_t *outlen,
                           const char **kind, char *msg, size_t msglen);
int gw_crypto_oaep_decrypt(struct gw_keyinfo *ki,
                           const unsigned char *in, size_t len,
                           unsigned char *out, size_t *outlen,
                           const char **kind, char *msg, size_t msglen);

/* SM2 public-key encryption (GM/T 0003.4 with SM3), the ShangMi variant's
 * sensitive-field encryption. The ciphertext is what OpenSSL emits: DER
 * SEQUENCE { x INTEGER, y INTEGER, C3 OCTET STRING (the 32-byte SM3
 * hash), C2 OCTET STRING } -- C1, C3, C2 in that order. *out is malloc'd
 * (caller frees; decrypt: caller cleanses too); *outlen its length.
 * Plaintext at most GW_SM2_MAX_PLAIN bytes. Encrypt: kinds
 * key_type_mismatch (not SM2), too_long, internal. Decrypt (needs an SM2
 * private key): key_type_mismatch, decrypt_failed. */
#define GW_SM2_MAX_PLAIN 65536
int gw_crypto_sm2_encrypt(struct gw_keyinfo *ki,
                          const unsigned char *in, size_t len,
                          unsigned char **out, size_t *outlen,
                          const char **kind, char *msg, size_t msglen);
int gw_crypto_sm2_decrypt(struct gw_keyinfo *ki,
                          const unsigned char *in, size_t len,
                          unsigned char **out, size_t *outlen,
                          const char **kind, char *msg, size_t msglen);

/* Hex SHA-256 fingerprint (uppercase, 64 chars + NUL) of the key's
 * SubjectPublicKeyInfo. GW_OK or GW_ERR. */
int gw_crypto_key_fingerprint(EVP_PKEY *pkey, char out[65]);

/* ---- digests (crypto.c) ------------------------------------------------ */

/* SHA-256 and SM3, fetched once per process (NULL if unavailable). */
const EVP_MD *gw_crypto_sha256(void);
const EVP_MD *gw_crypto_sm3(void);

/* "sha1", "sha256", "sm3", "sha512"; NULL for any other name. */
const EVP_MD *gw_crypto_md(const char *name);

/* Uppercase hex of a 32-byte digest into out (64 chars + NUL). */
void gw_crypto_hex32(const unsigned char md[32], char out[65]);

/* The AEAD_SM4_GCM key for an APIv3 key: SM3(apiv3)[0:16]. GW_OK or
 * GW_ERR (SM3 unavailable). */
int gw_crypto_sm4_key(const unsigned char *apiv3, size_t len,
                      unsigned char out[16]);

/* Seconds since the epoch of an ASN.1 time (UTCTime or GeneralizedTime);
 * 0 when t is NULL or does not parse. */
double gw_crypto_asn1_epoch(const ASN1_TIME *t);

/* ---- loaders (load.c) -------------------------------------------------- */

/* On success *out holds a new reference the caller frees. On failure they
 * return GW_ERR with kind one of not_pem, truncated_pem, bad_password,
 * unsupported_key_type, key_cert_mismatch, malformed, internal.
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
 * new, non-empty stack the caller frees with
 * sk_X509_pop_free(s, X509_free). */
int gw_crypto_load_certs(const unsigned char *in, size_t len,
                         STACK_OF(X509) **out,
                         const char **kind, char *msg, size_t msglen);
/* One CRL, PEM (when the input has a -----BEGIN line) or DER; a new
 * reference, or NULL when it does not decode. */
X509_CRL *gw_crypto_load_crl(const unsigned char *in, size_t len);

/* ---- AEAD (aead.c) ----------------------------------------------------- */

/* alg "AEAD_AES_256_GCM" (32-byte key) or "AEAD_SM4_GCM" (16-byte key);
 * nonce 1..GW_AEAD_NONCE_MAX bytes (12 is GCM's fast path, any other
 * length is hashed into the counter block as GCM specifies). Encrypt
 * writes len + 16 bytes; decrypt reads len >= 16 bytes (ciphertext ||
 * tag), writes len - 16 bytes, and leaves out zeroed on any failure.
 * Kinds: unsupported_algorithm, bad_key, bad_nonce, decrypt_failed,
 * internal. Not thread-safe: one cached cipher context per process. */
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

/* 1 when OpenSSL has its own SM4-GCM (then AEAD_SM4_GCM uses it), else 0
 * (sm4gcm.c's composition is used). */
int gw_aead_sm4gcm_native(void);

/* ---- codecs (codec.c) -------------------------------------------------- */

/* Strict base64 (standard alphabet, padded, no whitespace). out needs
 * len / 4 * 3 bytes. Returns the decoded length, or -1 on bad input. */
long gw_base64_decode(const char *in, size_t len, unsigned char *out);

/* Padded standard base64 of in; out needs (len + 2) / 3 * 4 + 1 bytes
 * (NUL-terminated). Returns the encoded length; len must be below
 * INT_MAX / 2 (else -1). */
long gw_base64_encode(const unsigned char *in, size_t len, char *out);

/* Lowercase hex; out needs 2 * len bytes (not NUL-terminated). */
void gw_hex_encode(const unsigned char *in, size_t len, char *out);

/* Hex (either case) into out (len / 2 bytes). Returns the decoded length,
 * or -1 with *bad the offset of the first invalid character (len when the
 * length is odd). */
long gw_hex_decode(const char *in, size_t len, unsigned char *out,
                   size_t *bad);

/* ---- certificates (x509.c) --------------------------------------------- */

/* Uppercase hex of the serial number (OpenSSL's BN_bn2hex: no leading
 * zero pairs, "-" for a negative serial) into out, truncated to outlen.
 * Returns the full length, or -1 when the serial cannot be read. */
int gw_x509_serial_hex(X509 *x, char *out, size_t outlen);

/* SHA-256 of the DER certificate, uppercase hex (64 chars + NUL). */
int gw_x509_fingerprint(X509 *x, char out[65]);

/* The certificate's public key type: "RSA", "SM2", OpenSSL's name for
 * other types, or "unknown"; and its size in bits (0 if unknown). */
const char *gw_x509_key_type(X509 *x);
int gw_x509_key_bits(X509 *x);

/* One-line subject / issuer for messages into buf; returns buf or "?". */
const char *gw_x509_name(const X509_NAME *name, char *buf, size_t len);

/* X509_PURPOSE_* for "server", "client", "any", "smime_sign"; else 0. */
int gw_x509_purpose(const char *name);

/* What gw_x509_verify_chain checks against; every pointer is borrowed. */
struct gw_x509_verify {
    STACK_OF(X509)     *roots;        /* trusted; ignored if system_roots */
    STACK_OF(X509)     *inter;        /* untrusted intermediates, or NULL */
    STACK_OF(X509_CRL) *crls;         /* CRLs to check, or NULL (no check) */
    int                 system_roots; /* 1: the system trust store */
    int                 has_at;       /* 1: verify at `at`, not now */
    time_t              at;           /* epoch s */
    const char         *host;         /* expected host name, or NULL */
    int                 purpose;      /* X509_PURPOSE_*, or 0 */
    int                 depth;        /* max depth, or -1 for OpenSSL's */
};

/* Verifies leaf's chain. GW_OK, or GW_ERR with kind one of
 * unknown_authority, missing_intermediate, self_signed_untrusted, expired,
 * not_yet_valid, bad_signature, hostname_mismatch, wrong_usage,
 * path_too_long, revoked, revocation_unknown, malformed, untrusted,
 * internal, and a message naming the certificate and the likely fix.
 * SM2-signed certificates in the chain get the WeChat Pay distinguishing
 * ID set (harmless on a shared X509: it is a constant). */
int gw_x509_verify_chain(X509 *leaf, const struct gw_x509_verify *v,
                         const char **kind, char *msg, size_t msglen);

/* ---- internal to the crypto .c files ----------------------------------- */

/* snprintf into msg when msg is not NULL and msglen > 0. */
void gw_setmsg(char *msg, size_t msglen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Sets *kind, formats msg and jumps to the function's err: label. */
#define GW_FAIL(k, ...) do {                                          \
    *kind = (k);                                                      \
    gw_setmsg(msg, msglen, __VA_ARGS__);                              \
    goto err;                                                         \
} while (0)

#endif
