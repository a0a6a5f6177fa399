/*
 * codec.c -- strict base64 and hex (see crypto.h). The decoder accepts
 * only canonical, padded, standard-alphabet base64 without whitespace:
 * signatures and ciphertexts arrive in headers and JSON, where anything
 * else is an error, not something to repair.
 */
#include <limits.h>
#include <stddef.h>
#include <openssl/evp.h>

#include "runtime.h"
#include "crypto.h"

static const signed char gw_b64_rev[256] = {
#define X -1
    X,X,X,X,X,X,X,X,X,X,X,X,X,X,X,X, X,X,X,X,X,X,X,X,X,X,X,X,X,X,X,X,
    X,X,X,X,X,X,X,X,X,X,X,62,X,X,X,63, 52,53,54,55,56,57,58,59,60,61,X,X,X,X,X,X,
    X,0,1,2,3,4,5,6,7,8,9,10,11,12,13,14, 15,16,17,18,19,20,21,22,23,24,25,X,X,X,X,X,
    X,26,27,28,29,30,31,32,33,34,35,36,37,38,39,40,
    41,42,43,44,45,46,47,48,49,50,51,X,X,X,X,X,
    X,X,X,X,X,X,X,X,X,X,X,X,X,X,X,X, X,X,X,X,X,X,X,X,X,X,X,X,X,X,X,X,
    X,X,X,X,X,X,X,X,X,X,X,X,X,X,X,X, X,X,X,X,X,X,X,X,X,X,X,X,X,X,X,X,
    X,X,X,X,X,X,X,X,X,X,X,X,X,X,X,X, X,X,X,X,X,X,X,X,X,X,X,X,X,X,X,X,
    X,X,X,X,X,X,X,X,X,X,X,X,X,X,X,X, X,X,X,X,X,X,X,X,X,X,X,X,X,X,X,X,
#undef X
};

long
gw_base64_decode(const char *in, size_t len, unsigned char *out)
{
    const unsigned char *s = (const unsigned char *)in;
    size_t i, o = 0;
    int pad = 0;

    if (len % 4 != 0) {
        return -1;
    }
    if (len > 0 && s[len - 1] == '=') {
        pad = (len > 1 && s[len - 2] == '=') ? 2 : 1;
    }
    for (i = 0; i < len; i += 4) {
        int last = i + 4 == len;
        int a = gw_b64_rev[s[i]], b = gw_b64_rev[s[i + 1]];
        int c = (last && pad == 2) ? 0 : gw_b64_rev[s[i + 2]];
        int d = (last && pad >= 1) ? 0 : gw_b64_rev[s[i + 3]];

        if ((a | b | c | d) < 0) {
            return -1;
        }
        out[o++] = (unsigned char)((a << 2) | (b >> 4));
        if (last && pad == 2) {
            if (b & 0x0f) {
                return -1;          /* non-canonical trailing bits */
            }
            break;
        }
        out[o++] = (unsigned char)(((b & 0x0f) << 4) | (c >> 2));
        if (last && pad == 1) {
            if (c & 0x03) {
                return -1;
            }
            break;
        }
        out[o++] = (unsigned char)(((c & 0x03) << 6) | d);
    }
    return (long)o;
}

long
gw_base64_encode(const unsigned char *in, size_t len, char *out)
{
    if (len > (size_t)INT_MAX / 2) {
        return -1;
    }
    return (long)EVP_EncodeBlock((unsigned char *)out, in, (int)len);
}

void
gw_hex_encode(const unsigned char *in, size_t len, char *out)
{
    static const char digits[] = "0123456789abcdef";
    size_t i;

    for (i = 0; i < len; i++) {
        out[2 * i] = digits[in[i] >> 4];
        out[2 * i + 1] = digits[in[i] & 0x0f];
    }
}

static int
gw_hexval(int c)
{
    if (c >= '0' && c <= '9') {
        return c - '0';
    }
    if (c >= 'a' && c <= 'f') {
        return c - 'a' + 10;
    }
    if (c >= 'A' && c <= 'F') {
        return c - 'A' + 10;
    }
    return -1;
}

long
gw_hex_decode(const char *in, size_t len, unsigned char *out, size_t *bad)
{
    const unsigned char *s = (const unsigned char *)in;
    size_t i;

    if (len % 2 != 0) {
        *bad = len;
        return -1;
    }
    for (i = 0; i < len; i++) {
        if (gw_hexval(s[i]) < 0) {
            *bad = i;
            return -1;
        }
    }
    for (i = 0; i < len; i += 2) {
        out[i / 2] = (unsigned char)(gw_hexval(s[i]) << 4
                                     | gw_hexval(s[i + 1]));
    }
    return (long)(len / 2);
}
