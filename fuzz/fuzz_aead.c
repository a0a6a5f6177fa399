/*
 * fuzz_aead.c -- AEAD decrypt entry point (AES-256-GCM and our SM4-GCM).
 * Input: byte 0 picks the algorithm (bit 0) and, when bit 1 is set, a
 * nonce length of byte0 >> 4 (0..15, empty included) instead of 12, and
 * bits 2-3 pick one of four keys (the C side keeps keyed contexts: keys
 * and nonce lengths change between calls); then the nonce, 1 byte aad
 * length, aad, ciphertext||tag. Properties: random input never
 * authenticates (with overwhelming probability; we only check no crash /
 * leak), an encryption of the same fields always decrypts back, and never
 * under the next key.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "runtime.h"
#include "crypto.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const unsigned char key32[32] = "a7cde1ZJB1kG2e7VfTs3jQzaWizur8Gb";

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *alg, *kind;
    char msg[GW_ERRMSG_MAX];
    const unsigned char *nonce, *aad, *ct;
    size_t noncelen = 12, aadlen, ctlen, keylen;
    unsigned char *out, *enc, key[32], other[32];

    if (size < 2) {
        return 0;
    }
    alg = (data[0] & 1) ? "AEAD_SM4_GCM" : "AEAD_AES_256_GCM";
    keylen = (data[0] & 1) ? 16 : 32;
    if (data[0] & 2) {
        noncelen = data[0] >> 4;        /* 0 is refused; others hash */
    }
    memcpy(key, key32, 32);
    key[0] ^= (unsigned char)((data[0] >> 2) & 3);
    memcpy(other, key, 32);
    other[0] ^= 4;
    data++;
    size--;
    if (size < noncelen + 1) {
        return 0;
    }
    nonce = data;
    aadlen = data[noncelen];
    aad = data + noncelen + 1;
    if (size < noncelen + 1 + aadlen) {
        return 0;
    }
    ct = aad + aadlen;
    ctlen = size - noncelen - 1 - aadlen;
    out = malloc(ctlen + 16);
    enc = malloc(ctlen + 16);
    if (out == NULL || enc == NULL) {
        free(out);
        free(enc);
        return 0;
    }
    gw_aead_decrypt(alg, key, keylen, nonce, noncelen, aad, aadlen, ct,
                    ctlen, out, &kind, msg, sizeof(msg));
    if (gw_aead_encrypt(alg, key, keylen, nonce, noncelen, aad, aadlen,
                        ct, ctlen, enc, &kind, msg, sizeof(msg)) == GW_OK)
    {
        if (gw_aead_decrypt(alg, key, keylen, nonce, noncelen, aad,
                            aadlen, enc, ctlen + 16, out, &kind, msg,
                            sizeof(msg)) != GW_OK
            || memcmp(out, ct, ctlen) != 0
            || gw_aead_decrypt(alg, other, keylen, nonce, noncelen, aad,
                               aadlen, enc, ctlen + 16, out, &kind, msg,
                               sizeof(msg)) == GW_OK)
        {
            __builtin_trap();
        }
    }
    free(out);
    free(enc);
    return 0;
}
