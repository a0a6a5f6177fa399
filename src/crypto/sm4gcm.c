/*
 * sm4gcm.c -- GCM (NIST SP 800-38D) composed from OpenSSL's SM4 block
 * cipher. The only cryptographic arithmetic paygate writes itself is GHASH
 * below: a bitwise multiply in GF(2^128) without tables or secret-dependent
 * branches, so its timing does not depend on H or the data.
 *
 * Counter mode: with a 96-bit IV, J0 = IV || 0^31 || 1; with any other
 * IV length, J0 = GHASH_H(IV || 0^(s+64) || [len(IV)]_64), s padding the
 * IV to whole blocks (SP 800-38D section 7.1 step 2). The payload uses
 * inc32(J0), inc32(inc32(J0)), ... OpenSSL's SM4-CTR increments the whole
 * 128-bit block, which equals inc32 until the low 32 bits wrap: a 96-bit
 * IV starts at 2 and never wraps below the 2^32 - 2 block cap, a GHASH-
 * derived J0 may start anywhere, so gw_sm4gcm_ctr() restarts the counter
 * at low 32 bits 0 (upper 96 unchanged) where it would carry.
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

/* H = E_K(0^128) and the pre-counter block J0 for an IV of any length. */
static int
gw_sm4gcm_init(const unsigned char key[16], const unsigned char *iv,
               size_t ivlen, unsigned char h[16], unsigned char j0[16])
{
    static const unsigned char zero[16];
    unsigned char lens[16];

    if (gw_sm4_run(gw_sm4_ecb, key, NULL, zero, 16, h) != GW_OK) {
        return GW_ERR;
    }
    if (ivlen == GW_SM4GCM_IV) {
        memcpy(j0, iv, 12);
        j0[12] = 0;
        j0[13] = 0;
        j0[14] = 0;
        j0[15] = 1;
        return GW_OK;
    }
    memset(j0, 0, 16);
    gw_ghash(h, j0, iv, ivlen);      /* zero-pads the last partial block */
    memset(lens, 0, 8);
    gw_store64(lens + 8, (uint64_t)ivlen * 8);
    gw_ghash(h, j0, lens, 16);
    return GW_OK;
}

/* Computes the tag over aad and the ciphertext ct. */
static int
gw_sm4gcm_tag(const unsigned char key[16], const unsigned char h[16],
              const unsigned char j0[16], const unsigned char *aad,
              size_t aadlen, const unsigned char *ct, size_t len,
              unsigned char tag[16])
{
    unsigned char ej0[16], s[16], lens[16];
    int i, rc = GW_ERR;

    if (gw_sm4_run(gw_sm4_ecb, key, NULL, j0, 16, ej0) != GW_OK) {
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
    OPENSSL_cleanse(ej0, sizeof(ej0));
    OPENSSL_cleanse(s, sizeof(s));
    return rc;
}

/* The payload keystream from inc32(J0) on, XORed into out. The GCM
 * counter is inc32: when the low 32 bits would wrap, the second run
 * restarts them at 0 instead of carrying into the IV part. */
static int
gw_sm4gcm_ctr(const unsigned char key[16], const unsigned char j0[16],
              const unsigned char *in, size_t len, unsigned char *out)
{
    unsigned char ctr[16];
    uint32_t low;
    uint64_t room;
    size_t first;

    if (len == 0) {
        return GW_OK;
    }
    memcpy(ctr, j0, 16);
    low = ((uint32_t)ctr[12] << 24 | (uint32_t)ctr[13] << 16
           | (uint32_t)ctr[14] << 8 | ctr[15]) + 1;          /* inc32 */
    ctr[12] = (unsigned char)(low >> 24);
    ctr[13] = (unsigned char)(low >> 16);
    ctr[14] = (unsigned char)(low >> 8);
    ctr[15] = (unsigned char)low;
    room = ((uint64_t)1 << 32) - low;     /* blocks before the wrap */
    if ((uint64_t)len <= room * 16) {
        return gw_sm4_run(gw_sm4_ctr, key, ctr, in, len, out);
    }
    first = (size_t)(room * 16);
    if (gw_sm4_run(gw_sm4_ctr, key, ctr, in, first, out) != GW_OK) {
        return GW_ERR;
    }
    memset(ctr + 12, 0, 4);
    return gw_sm4_run(gw_sm4_ctr, key, ctr, in + first, len - first,
                      out + first);
}

int
gw_sm4gcm_seal(const unsigned char key[GW_SM4GCM_KEY],
               const unsigned char *iv, size_t ivlen,
               const unsigned char *aad, size_t aadlen,
               const unsigned char *in, size_t len, unsigned char *out,
               unsigned char tag[GW_SM4GCM_TAG])
{
    unsigned char h[16], j0[16];
    int rc = GW_ERR;

    if (ivlen == 0 || gw_sm4_fetch() != GW_OK
        || (uint64_t)len / 16 >= GW_SM4GCM_MAX_BLOCKS)
    {
        return GW_ERR;
    }
    if (gw_sm4gcm_init(key, iv, ivlen, h, j0) != GW_OK
        || gw_sm4gcm_ctr(key, j0, in, len, out) != GW_OK
        || gw_sm4gcm_tag(key, h, j0, aad, aadlen, out, len, tag) != GW_OK)
    {
        goto err;
    }
    rc = GW_OK;
err:
    OPENSSL_cleanse(h, sizeof(h));
    return rc;
}

int
gw_sm4gcm_open(const unsigned char key[GW_SM4GCM_KEY],
               const unsigned char *iv, size_t ivlen,
               const unsigned char *aad, size_t aadlen,
               const unsigned char *in, size_t len,
               const unsigned char tag[GW_SM4GCM_TAG],
               unsigned char *out)
{
    unsigned char want[16], h[16], j0[16];
    int rc = GW_ERR;

    if (ivlen == 0 || gw_sm4_fetch() != GW_OK
        || (uint64_t)len / 16 >= GW_SM4GCM_MAX_BLOCKS)
    {
        return GW_ERR;
    }
    if (gw_sm4gcm_init(key, iv, ivlen, h, j0) != GW_OK
        || gw_sm4gcm_tag(key, h, j0, aad, aadlen, in, len, want) != GW_OK)
    {
        goto err;
    }
    if (CRYPTO_memcmp(want, tag, 16) != 0) {
        goto err;
    }
    if (gw_sm4gcm_ctr(key, j0, in, len, out) != GW_OK) {
        OPENSSL_cleanse(out, len);
        goto err;
    }
    rc = GW_OK;
err:
    OPENSSL_cleanse(want, sizeof(want));
    OPENSSL_cleanse(h, sizeof(h));
    return rc;
}
