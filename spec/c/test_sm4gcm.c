/*
 * test_sm4gcm.c -- known answers for our SM4-GCM composition and GHASH:
 * GB/T 32907 SM4 block vector, RFC 8998 appendix A.1 (SM4-GCM), the NIST
 * GCM spec's GHASH example (test case 2: H, C -> tag input), the WeChat
 * Pay shangmi-testing vector (PROTOCOL.md 11.7), and tamper checks.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime.h"
#include "sm4gcm.h"

static int failures;

#define CHECK(cond) do {                                              \
    if (!(cond)) {                                                    \
        fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__,       \
                __LINE__, #cond);                                     \
        failures++;                                                   \
    }                                                                 \
} while (0)

static size_t
unhex(const char *hex, unsigned char *out)
{
    size_t n = 0;

    while (hex[0] && hex[1]) {
        unsigned int b;

        sscanf(hex, "%2x", &b);
        out[n++] = (unsigned char)b;
        hex += 2;
    }
    return n;
}

static void
test_sm4_block(void)
{
    unsigned char key[16], want[16], out[16];

    unhex("0123456789abcdeffedcba9876543210", key);
    unhex("681edf34d206965e86b3e94f536e4246", want);
    CHECK(gw_sm4_block(key, key, out) == GW_OK);
    CHECK(memcmp(out, want, 16) == 0);
}

static void
test_ghash_nist(void)
{
    /* NIST GCM test case 2 (AES-128, zero key): H = E(0), C one block. */
    unsigned char h[16], c[16], y[16], want[16], lens[16];

    unhex("66e94bd4ef8a2c3b884cfa59ca342b2e", h);
    unhex("0388dace60b6a392f328c2b971b2fe78", c);
    unhex("f38cbb1ad69223dcc3457ae5b6b0f885", want);
    memset(y, 0, 16);
    memset(lens, 0, 16);
    lens[15] = 0x80;                  /* len(C) = 128 bits */
    gw_ghash(h, y, c, 16);
    gw_ghash(h, y, lens, 16);
    CHECK(memcmp(y, want, 16) == 0);
}

static void
test_rfc8998(void)
{
    unsigned char key[16], iv[12], aad[20], pt[64], ct[64], tag[16];
    unsigned char out[64], got_tag[16], back[64];

    unhex("0123456789ABCDEFFEDCBA9876543210", key);
    unhex("00001234567800000000ABCD", iv);
    CHECK(unhex("FEEDFACEDEADBEEFFEEDFACEDEADBEEFABADDAD2", aad) == 20);
    CHECK(unhex("AAAAAAAAAAAAAAAABBBBBBBBBBBBBBBBCCCCCCCCCCCCCCCC"
                "DDDDDDDDDDDDDDDDEEEEEEEEEEEEEEEEFFFFFFFFFFFFFFFF"
                "EEEEEEEEEEEEEEEEAAAAAAAAAAAAAAAA", pt) == 64);
    unhex("17F399F08C67D5EE19D0DC9969C4BB7D5FD46FD3756489069157B282BB200735"
          "D82710CA5C22F0CCFA7CBF93D496AC15A56834CBCF98C397B4024A2691233B8D",
          ct);
    unhex("83DE3541E4C2B58177E065A9BF7B62EC", tag);

    CHECK(gw_sm4gcm_seal(key, iv, aad, 20, pt, 64, out, got_tag) == GW_OK);
    CHECK(memcmp(out, ct, 64) == 0);
    CHECK(memcmp(got_tag, tag, 16) == 0);

    CHECK(gw_sm4gcm_open(key, iv, aad, 20, ct, 64, tag, back) == GW_OK);
    CHECK(memcmp(back, pt, 64) == 0);

    /* Tampered tag, ciphertext, AAD, IV: rejected, out untouched. */
    memset(back, 0x5a, sizeof(back));
    tag[15] ^= 1;
    CHECK(gw_sm4gcm_open(key, iv, aad, 20, ct, 64, tag, back) == GW_ERR);
    tag[15] ^= 1;
    ct[0] ^= 0x80;
    CHECK(gw_sm4gcm_open(key, iv, aad, 20, ct, 64, tag, back) == GW_ERR);
    ct[0] ^= 0x80;
    aad[19] ^= 1;
    CHECK(gw_sm4gcm_open(key, iv, aad, 20, ct, 64, tag, back) == GW_ERR);
    aad[19] ^= 1;
    iv[0] ^= 1;
    CHECK(gw_sm4gcm_open(key, iv, aad, 20, ct, 64, tag, back) == GW_ERR);
    iv[0] ^= 1;
    CHECK(back[0] == 0x5a && back[63] == 0x5a);
    /* Truncated ciphertext with the original tag. */
    CHECK(gw_sm4gcm_open(key, iv, aad, 20, ct, 63, tag, back) == GW_ERR);
}

static void
test_wechat_shangmi(void)
{
    /* PROTOCOL.md 11.7: key = SM3(apiv3 key)[0:16], base64 ciphertext
     * +lcLNfkZQQx+iQm20Apa3x9Mb/5L7PgZ7w== decrypts to "plaintext". */
    unsigned char key[16], in[25], out[9];
    const unsigned char *iv = (const unsigned char *)"uluk4a9R25RW";
    const unsigned char *aad = (const unsigned char *)"associatedData";

    unhex("fa2028801e86d45f5638cadafb5db2e9", key);
    unhex("fa570b35f919410c7e8909b6d00a5adf1f4c6ffe4becf819ef", in);
    CHECK(gw_sm4gcm_open(key, iv, aad, 14, in, 9, in + 9, out) == GW_OK);
    CHECK(memcmp(out, "plaintext", 9) == 0);
}

static void
test_empty_and_sizes(void)
{
    unsigned char key[16], iv[12], tag[16], buf[300], ct[300], back[300];
    size_t n;

    memset(key, 7, sizeof(key));
    memset(iv, 9, sizeof(iv));
    for (n = 0; n < sizeof(buf); n++) {
        buf[n] = (unsigned char)n;
    }
    for (n = 0; n <= 257; n += 1) {
        CHECK(gw_sm4gcm_seal(key, iv, NULL, 0, buf, n, ct, tag) == GW_OK);
        CHECK(gw_sm4gcm_open(key, iv, NULL, 0, ct, n, tag, back) == GW_OK);
        CHECK(memcmp(back, buf, n) == 0);
    }
}

int
main(void)
{
    test_sm4_block();
    test_ghash_nist();
    test_rfc8998();
    test_wechat_shangmi();
    test_empty_and_sizes();
    if (failures) {
        fprintf(stderr, "test_sm4gcm: %d failure(s)\n", failures);
        return 1;
    }
    printf("test_sm4gcm: ok\n");
    return 0;
}
