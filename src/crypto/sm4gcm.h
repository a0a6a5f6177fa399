/*
 * sm4gcm.h -- AEAD_SM4_GCM for OpenSSL builds without an SM4-GCM cipher
 * (OpenSSL 3.0 on Debian 12). GCM per NIST SP 800-38D over OpenSSL's SM4
 * block cipher (SM4-ECB for H and E(J0), SM4-CTR for the payload); only
 * GHASH is ours. IVs of any non-zero length (a 12-byte IV is used as is,
 * any other is hashed into J0 with GHASH, as GCM specifies); 16-byte tags.
 */
#ifndef GW_SM4GCM_H
#define GW_SM4GCM_H

#include <stddef.h>

#define GW_SM4GCM_KEY   16
#define GW_SM4GCM_IV    12      /* bytes; the IV length used without GHASH */
#define GW_SM4GCM_TAG   16

/* Encrypts len bytes of in into out (len bytes) and writes the tag.
 * in and out may be the same buffer. GW_OK or GW_ERR (OpenSSL failure,
 * ivlen 0, or len above the GCM limit). */
int gw_sm4gcm_seal(const unsigned char key[GW_SM4GCM_KEY],
                   const unsigned char *iv, size_t ivlen,
                   const unsigned char *aad, size_t aadlen,
                   const unsigned char *in, size_t len, unsigned char *out,
                   unsigned char tag[GW_SM4GCM_TAG]);

/* Checks the tag first (constant time), then decrypts. On a mismatch
 * returns GW_ERR and writes nothing to out. */
int gw_sm4gcm_open(const unsigned char key[GW_SM4GCM_KEY],
                   const unsigned char *iv, size_t ivlen,
                   const unsigned char *aad, size_t aadlen,
                   const unsigned char *in, size_t len,
                   const unsigned char tag[GW_SM4GCM_TAG],
                   unsigned char *out);

/* One SM4 block encryption (for the GB/T 32907 known-answer test). */
int gw_sm4_block(const unsigned char key[16], const unsigned char in[16],
                 unsigned char out[16]);

/* GHASH_H over a whole buffer (exposed for tests). y is in/out. */
void gw_ghash(const unsigned char h[16], unsigned char y[16],
              const unsigned char *data, size_t len);

#endif
