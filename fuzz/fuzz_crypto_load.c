/*
 * fuzz_crypto_load.c -- PEM / DER / PKCS#12 loading: private keys (with a
 * password), public keys and certificate bundles. Every result must be
 * either a usable handle or a classified error; nothing may leak.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <openssl/x509.h>

#include "runtime.h"
#include "crypto.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *kind = NULL;
    char msg[GW_ERRMSG_MAX], fpr[65];
    EVP_PKEY *pkey = NULL;
    X509 *cert = NULL;
    STACK_OF(X509) *sk = NULL;
    struct gw_keyinfo ki;

    if (gw_crypto_load_private_key(data, size, "1234567891", 10, &pkey,
                                   &cert, &kind, msg, sizeof(msg)) == GW_OK)
    {
        if (gw_keyinfo_init(&ki, pkey, 1, &kind, msg, sizeof(msg))
            == GW_OK)
        {
            unsigned char sig[1024];
            size_t siglen = sizeof(sig);
            int alg = ki.type == GW_KEY_RSA ? GW_ALG_SHA256_RSA
                                            : GW_ALG_SM2_SM3;

            if ((size_t)EVP_PKEY_get_size(pkey) <= sizeof(sig)) {
                gw_crypto_sign(&ki, alg, data, size, sig, &siglen, &kind,
                               msg, sizeof(msg));
            }
            gw_keyinfo_clear(&ki);
        }
        gw_crypto_key_fingerprint(pkey, fpr);
        EVP_PKEY_free(pkey);
        X509_free(cert);
    } else if (kind == NULL || kind[0] == '\0') {
        __builtin_trap();                /* failures must be classified */
    }
    kind = NULL;
    if (gw_crypto_load_public_key(data, size, &pkey, &kind, msg,
                                  sizeof(msg)) == GW_OK)
    {
        EVP_PKEY_free(pkey);
    } else if (kind == NULL) {
        __builtin_trap();
    }
    kind = NULL;
    if (gw_crypto_load_certs(data, size, &sk, &kind, msg, sizeof(msg))
        == GW_OK)
    {
        if (sk_X509_num(sk) < 1) {
            __builtin_trap();
        }
        sk_X509_pop_free(sk, X509_free);
    } else if (kind == NULL) {
        __builtin_trap();
    }
    return 0;
}
