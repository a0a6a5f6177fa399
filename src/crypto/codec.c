/*
 * codec.c -- strict base64 and hex (see crypto.h). The decoder accepts
 * only canonical, padded, standard-alphabet base64 without whitespace:
 * signatures and ciphertexts arrive in headers and JSON, where anything
 * else is an error, not something to repair.
 */
#include <limits.h>
#include <stddef.h>
#include <stdint.h>
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

/*
 * The decoder's tables: for each byte, its 6 bits already shifted into
 * place for each position of a quad (0: bits 18-23 ... 3: bits 0-5), or
 * GW_B64_BAD (bit 31) for a byte outside the alphabet. One lookup per
 * character and one OR per quad tell a bad quad, with no branch per
 * character. Built from gw_b64_rev when the program is loaded, before any
 * thread starts.
 */
#define GW_B64_BAD 0x80000000u
static uint32_t gw_b64_pos[4][256];

__attribute__((constructor)) static void
gw_b64_tables(void)
{
    for (int c = 0; c < 256; c++) {
        int v = gw_b64_rev[c];

        for (int p = 0; p < 4; p++) {
            gw_b64_pos[p][c] = v < 0 ? GW_B64_BAD
                               : (uint32_t)v << (6 * (3 - p));
        }
    }
}

long
gw_base64_decode(const char *in, size_t len, unsigned char *out)
{
    const unsigned char *s = (const unsigned char *)in;
    size_t i, o = 0, body;
    int pad = 0, a, b, c, d;

    if (len % 4 != 0) {
        return -1;
    }
    if (len == 0) {
        return 0;
    }
    /* every quad but the last: no padding possible */
    body = len - 4;
    for (i = 0; i < body; i += 4) {
        uint32_t v = gw_b64_pos[0][s[i]] | gw_b64_pos[1][s[i + 1]]
                     | gw_b64_pos[2][s[i + 2]] | gw_b64_pos[3][s[i + 3]];

        if (v & GW_B64_BAD) {
            return -1;
        }
        out[o] = (unsigned char)(v >> 16);
        out[o + 1] = (unsigned char)(v >> 8);
        out[o + 2] = (unsigned char)v;
        o += 3;
    }
    /* the last quad: "xx==", "xxx=" or "xxxx", trailing bits zero */
    if (s[len - 1] == '=') {
        pad = s[len - 2] == '=' ? 2 : 1;
    }
    a = gw_b64_rev[s[body]];
    b = gw_b64_rev[s[body + 1]];
    c = pad == 2 ? 0 : gw_b64_rev[s[body + 2]];
    d = pad >= 1 ? 0 : gw_b64_rev[s[body + 3]];
    if ((a | b | c | d) < 0) {
        return -1;
    }
    out[o++] = (unsigned char)((a << 2) | (b >> 4));
    if (pad == 2) {
        return (b & 0x0f) ? -1 : (long)o;   /* non-canonical trailing bits */
    }
    out[o++] = (unsigned char)(((b & 0x0f) << 4) | (c >> 2));
    if (pad == 1) {
        return (c & 0x03) ? -1 : (long)o;
    }
    out[o++] = (unsigned char)(((c & 0x03) << 6) | d);
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
