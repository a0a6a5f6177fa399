/*
 * fuzz_base64.c -- strict base64 decoding. Properties: whatever decodes
 * re-encodes to exactly the input (no garbage accepted, canonical only);
 * and the input's bytes, encoded, decode back to exactly them (everything
 * canonical is accepted, whatever its length).
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <openssl/evp.h>

#include "runtime.h"
#include "crypto.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    unsigned char *out = malloc(size / 4 * 3 + 1);
    unsigned char *back;
    long n;

    if (out == NULL) {
        return 0;
    }
    n = gw_base64_decode((const char *)data, size, out);
    if (n >= 0) {
        back = malloc((size_t)n / 3 * 4 + 8);
        if (back != NULL) {
            int m = EVP_EncodeBlock(back, out, (int)n);

            if ((size_t)m != size || memcmp(back, data, size) != 0) {
                __builtin_trap();
            }
            free(back);
        }
    }
    free(out);
    /* the other way: any bytes, encoded, come back */
    {
        unsigned char *enc = malloc(size / 3 * 4 + 8);
        unsigned char *dec = malloc(size + 8);
        int m;

        if (enc != NULL && dec != NULL) {
            m = EVP_EncodeBlock(enc, data, (int)size);
            n = gw_base64_decode((const char *)enc, (size_t)m, dec);
            if (n != (long)size || (size > 0 && memcmp(dec, data, size) != 0))
            {
                __builtin_trap();
            }
        }
        free(enc);
        free(dec);
    }
    return 0;
}
