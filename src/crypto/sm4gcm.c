/*
 * sm4gcm.c -- GCM (NIST SP 800-38D) composed from OpenSSL's SM4 block
 * cipher. The only cryptographic arithmetic paygate writes itself is GHASH
 * below: a bitwise multiply in GF(2^128) without tables or secret-dependent
 * branches, so its timing does not depend on H or the data.
 *
 * Counter mode: with a 96-bit IV, J0 = IV || 0^31 || 1 and the payload
 * uses inc32(J0), inc32(inc32(J0)), ... OpenSSL's SM4-CTR increments the
 * whole 128-bit block, which equals inc32 until the low 32 bits wrap; the
 * payload starts at counter 2, so we cap it at 2^32 - 2 blocks.
 */
#include <stdint.h>
#include <string.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "runtime.h"
#include "sm4gcm.h"

#define GW_SM4GCM_MAX_BLOCKS 0xfffffffeULL

static uint64_t
gw_load64(const unsigned char *p)
{
    uint64_t v = 0;
    int i;

    for (i = 0; i < 8; i++) {
        v = (v << 8) | p[i];
    }
    return v;
}

static void
gw_store64(unsigned char *p, uint64_t v)
{
    int i;

    for (i = 7; i >= 0; i--) {
        p[i] = (unsigned char)(v & 0xff);
        v >>= 8;
    }
}

/* x = x * h in GF(2^128) with the GCM bit order (SP 800-38D algorithm 1).
 * Every iteration does the same work; masks replace branches. */
static void
gw_gfmul(uint64_t x[2], const uint64_t h[2])
{
    uint64_t zh = 0, zl = 0;
    uint64_t vh = h[0], vl = h[1];
    uint64_t mask, lsb;
    int i;

    for (i = 0; i < 128; i++) {
        uint64_t word = i < 64 ? x[0] : x[1];

        mask = (uint64_t)0 - ((word >> (63 - (i & 63))) & 1);
        zh ^= vh & mask;
        zl ^= vl & mask;
        lsb = (uint64_t)0 - (vl & 1);
        vl = (vl >> 1) | (vh << 63);
        vh = (vh >> 1) ^ (0xe100000000000000ULL & lsb);
    }
    x[0] = zh;
    x[1] = zl;
}

void
gw_ghash(const unsigned char h[16], unsigned char y[16],
         const unsigned char *data, size_t len)
{
    uint64_t hh[2], yy[2];
    unsigned char block[16];

    hh[0] = gw_load64(h);
    hh[1] = gw_load64(h + 8);
    yy[0] = gw_load64(y);
    yy[1] = gw_load64(y + 8);
    while (len > 0) {
        size_t n = len < 16 ? len : 16;

        memset(block, 0, sizeof(block));
        memcpy(block, data, n);
        yy[0] ^= gw_load64(block);
        yy[1] ^= gw_load64(block + 8);
        gw_gfmul(yy, hh);
        data += n;
        len -= n;
    }
    gw_store64(y, yy[0]);
    gw_store64(y + 8, yy[1]);
    OPENSSL_cleanse(hh, sizeof(hh));
    OPENSSL_cleanse(yy, sizeof(yy));
    OPENSSL_cleanse(block, sizeof(block));
}

/* Process-wide cipher handles, fetched once. */
static EVP_CIPHER *gw_sm4_ecb;
static EVP_CIPHER *gw_sm4_ctr;

static int
gw_sm4_fetch(void)
{
    if (gw_sm4_ecb == NULL) {
        gw_sm4_ecb = EVP_CIPHER_fetch(NULL, "SM4-ECB", NULL);
    }
    if (gw_sm4_ctr == NULL) {
        gw_sm4_ctr = EVP_CIPHER_fetch(NULL, "SM4-CTR", NULL);
    }
    return gw_sm4_ecb != NULL && gw_sm4_ctr != NULL ? GW_OK : GW_ERR;
}

/* Runs cipher (ECB or CTR) over len bytes. GW_OK or GW_ERR. */
static int
gw_sm4_run(EVP_CIPHER *cipher, const unsigned char key[16],
           const unsigned char *iv, const unsigned char *in, size_t len,
           unsigned char *out)
{
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    int rc = GW_ERR, n;

    if (ctx == NULL) {
        return GW_ERR;
    }
    if (EVP_EncryptInit_ex2(ctx, cipher, key, iv, NULL) != 1) {
        goto err;
    }
    EVP_CIPHER_CTX_set_padding(ctx, 0);
    while (len > 0) {
        int chunk = len > (1u << 30) ? (1 << 30) : (int)len;

        if (EVP_EncryptUpdate(ctx, out, &n, in, chunk) != 1) {
            goto err;
        }
        in += chunk;
        out += n;
        len -= (size_t)chunk;
    }
    rc = GW_OK;
err:
    EVP_CIPHER_CTX_free(ctx);
    return rc;
}

int
gw_sm4_block(const unsigned char key[16], const unsigned char in[16],
             unsigned char out[16])
{
    if (gw_sm4_fetch() != GW_OK) {
        return GW_ERR;
    }
    return gw_sm4_run(gw_sm4_ecb, key, NULL, in, 16, out);
}

/* Computes the tag over aad and the ciphertext ct. */
static int
gw_sm4gcm_tag(const unsigned char key[16], const unsigned char iv[12],
              const unsigned char *aad, size_t aadlen,
              const unsigned char *ct, size_t len, unsigned char tag[16])
{
    unsigned char h[16], j0[16], ej0[16], s[16], lens[16];
    static const unsigned char zero[16];
    int i, rc = GW_ERR;

    memcpy(j0, iv, 12);
    j0[12] = 0;
    j0[13] = 0;
    j0[14] = 0;
    j0[15] = 1;
    if (gw_sm4_run(gw_sm4_ecb, key, NULL, zero, 16, h) != GW_OK
        || gw_sm4_run(gw_sm4_ecb, key, NULL, j0, 16, ej0) != GW_OK)
    {
        goto err;
    }
    memset(s, 0, sizeof(s));
    gw_ghash(h, s, aad, aadlen);     /* zero padding of partial blocks */
    gw_ghash(h, s, ct, len);
    gw_store64(lens, (uint64_t)aadlen * 8);
    gw_store64(lens + 8, (uint64_t)len * 8);
    gw_ghash(h, s, lens, 16);
    for (i = 0; i < 16; i++) {
        tag[i] = s[i] ^ ej0[i];
    }
    rc = GW_OK;
err:
    OPENSSL_cleanse(h, sizeof(h));
    OPENSSL_cleanse(ej0, sizeof(ej0));
    OPENSSL_cleanse(s, sizeof(s));
    return rc;
}

static void
gw_sm4gcm_ctr0(const unsigned char iv[12], unsigned char ctr[16])
{
    memcpy(ctr, iv, 12);
    ctr[12] = 0;
    ctr[13] = 0;
    ctr[14] = 0;
    ctr[15] = 2;                     /* inc32(J0) */
}

int
gw_sm4gcm_seal(const unsigned char key[GW_SM4GCM_KEY],
               const unsigned char iv[GW_SM4GCM_IV],
               const unsigned char *aad, size_t aadlen,
               const unsigned char *in, size_t len, unsigned char *out,
               unsigned char tag[GW_SM4GCM_TAG])
{
    unsigned char ctr[16];

    if (gw_sm4_fetch() != GW_OK
        || (uint64_t)len / 16 >= GW_SM4GCM_MAX_BLOCKS)
    {
        return GW_ERR;
    }
    gw_sm4gcm_ctr0(iv, ctr);
    if (len > 0 && gw_sm4_run(gw_sm4_ctr, key, ctr, in, len, out) != GW_OK) {
        return GW_ERR;
    }
    return gw_sm4gcm_tag(key, iv, aad, aadlen, out, len, tag);
}

int
gw_sm4gcm_open(const unsigned char key[GW_SM4GCM_KEY],
               const unsigned char iv[GW_SM4GCM_IV],
               const unsigned char *aad, size_t aadlen,
               const unsigned char *in, size_t len,
               const unsigned char tag[GW_SM4GCM_TAG],
               unsigned char *out)
{
    unsigned char want[16], ctr[16];
    int rc;

    if (gw_sm4_fetch() != GW_OK
        || (uint64_t)len / 16 >= GW_SM4GCM_MAX_BLOCKS)
    {
        return GW_ERR;
    }
    if (gw_sm4gcm_tag(key, iv, aad, aadlen, in, len, want) != GW_OK) {
        return GW_ERR;
    }
    rc = CRYPTO_memcmp(want, tag, 16);
    OPENSSL_cleanse(want, sizeof(want));
    if (rc != 0) {
        return GW_ERR;
    }
    gw_sm4gcm_ctr0(iv, ctr);
    if (len > 0 && gw_sm4_run(gw_sm4_ctr, key, ctr, in, len, out) != GW_OK) {
        OPENSSL_cleanse(out, len);
        return GW_ERR;
    }
    return GW_OK;
}
