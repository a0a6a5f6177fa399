/*
 * fuzz_verify.c -- signature verification with fixed RSA-2048 and SM2
 * public keys (those in spec/fixtures/wechatpay). Input: byte 0 picks key
 * and algorithm (including mismatched pairs), byte 1 the signature length,
 * then signature, then data. Mismatched key/algorithm pairs must fail
 * cleanly; a verified signature must not verify other data.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "runtime.h"
#include "crypto.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const char rsa_pub[] =
    "-----BEGIN PUBLIC KEY-----\n"
    "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAptpm+qvIDCh/9wjU26SQ\n"
    "CK26ogYkBhDrYxnAaw2JbbBsp1oDbHKk+1r381NeBUG2HEFAuU+Fr72u5ot3yKdz\n"
    "oF/FajAzQNKnm569/D3upKoi8mYBaST15Uig8j8qoUW1U217LL0jEHlSnHV3lcaD\n"
    "TXqDpTRR4Bfz9IqOgJgFZ8/oTfEomSrjrLYef81Eyxr7ZIMQXEKKEK7V4UXKS0+/\n"
    "fDsiG/cXidhzt8UbTL9vqXqxM2+IDImyO+FAc/tkBG55LmzxPto1Nq0WbnZzRM/w\n"
    "Tzrd0I/8NlevxtFbphg4evlHjFNI7+GrqR87ViEwuAJJ9Je5QQjct5YJfFRWiZ5C\n"
    "MQIDAQAB\n"
    "-----END PUBLIC KEY-----\n";

static const char sm2_pub[] =
    "-----BEGIN PUBLIC KEY-----\n"
    "MFkwEwYHKoZIzj0CAQYIKoEcz1UBgi0DQgAEe81H916hnQTApytNpw9X3Rs/kzfM\n"
    "XdEkGIG5E0MZOb9ppV72tGcQx+FyRSPQ9kbdaU0kg5dvboUNRmN4+osvfg==\n"
    "-----END PUBLIC KEY-----\n";

static struct gw_keyinfo keys[2];
static int loaded;

static void
load(void)
{
    const char *src[2] = { rsa_pub, sm2_pub };
    const char *kind;
    char msg[GW_ERRMSG_MAX];
    EVP_PKEY *pkey;
    int i;

    for (i = 0; i < 2; i++) {
        if (gw_crypto_load_public_key((const unsigned char *)src[i],
                                      strlen(src[i]), &pkey, &kind, msg,
                                      sizeof(msg)) != GW_OK
            || gw_keyinfo_init(&keys[i], pkey, 0, &kind, msg, sizeof(msg))
               != GW_OK)
        {
            __builtin_trap();
        }
        EVP_PKEY_free(pkey);             /* keys[i] holds a reference */
    }
    loaded = 1;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *kind;
    char msg[GW_ERRMSG_MAX];
    size_t siglen;
    int which, alg;

    if (!loaded) {
        load();
    }
    if (size < 2) {
        return 0;
    }
    which = data[0] & 1;
    alg = (data[0] & 2) ? GW_ALG_SM2_SM3 : GW_ALG_SHA256_RSA;
    siglen = data[1];
    if (which == 0 && (data[0] & 4)) {
        siglen = 256;                    /* full RSA-2048 size */
    }
    data += 2;
    size -= 2;
    if (siglen > size) {
        siglen = size;
    }
    if (gw_crypto_verify(&keys[which], alg, data + siglen, size - siglen,
                         data, siglen, &kind, msg, sizeof(msg)) == GW_OK)
    {
        /* A genuine signature (seeds): the same signature over other
         * data must fail. */
        unsigned char other[64];
        size_t n = size - siglen < sizeof(other) ? size - siglen
                                                 : sizeof(other);

        memcpy(other, data + siglen, n);
        other[0] ^= 1;
        if (n > 0 && gw_crypto_verify(&keys[which], alg, other, n, data,
                                      siglen, &kind, msg, sizeof(msg))
                     == GW_OK)
        {
            __builtin_trap();
        }
    }
    return 0;
}
