/*
 * fuzz_base64.c -- strict base64 decoding. Property: whatever decodes
 * re-encodes to exactly the input (no garbage accepted, canonical only).
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
    return 0;
}
