/*
 * test_sm4gcm.c -- known answers for our SM4-GCM composition and GHASH:
 * GB/T 32907 SM4 block vector, RFC 8998 appendix A.1 (SM4-GCM), the NIST
 * GCM spec's GHASH example (test case 2: H, C -> tag input), the WeChat
 * Pay shangmi-testing vector, nonces other than 12 bytes (GHASH-derived
 * J0) against answers from an independent SM4-GCM (gen_sm4gcm_vectors.py,
 * next to this file), including a counter that wraps its low 32 bits, and
 * tamper checks.
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

    CHECK(gw_sm4gcm_seal(key, iv, 12, aad, 20, pt, 64, out, got_tag) == GW_OK);
    CHECK(memcmp(out, ct, 64) == 0);
    CHECK(memcmp(got_tag, tag, 16) == 0);

    CHECK(gw_sm4gcm_open(key, iv, 12, aad, 20, ct, 64, tag, back) == GW_OK);
    CHECK(memcmp(back, pt, 64) == 0);

    /* Tampered tag, ciphertext, AAD, IV: rejected, out untouched. */
    memset(back, 0x5a, sizeof(back));
    tag[15] ^= 1;
    CHECK(gw_sm4gcm_open(key, iv, 12, aad, 20, ct, 64, tag, back) == GW_ERR);
    tag[15] ^= 1;
    ct[0] ^= 0x80;
    CHECK(gw_sm4gcm_open(key, iv, 12, aad, 20, ct, 64, tag, back) == GW_ERR);
    ct[0] ^= 0x80;
    aad[19] ^= 1;
    CHECK(gw_sm4gcm_open(key, iv, 12, aad, 20, ct, 64, tag, back) == GW_ERR);
    aad[19] ^= 1;
    iv[0] ^= 1;
    CHECK(gw_sm4gcm_open(key, iv, 12, aad, 20, ct, 64, tag, back) == GW_ERR);
    iv[0] ^= 1;
    CHECK(back[0] == 0x5a && back[63] == 0x5a);
    /* Truncated ciphertext with the original tag. */
    CHECK(gw_sm4gcm_open(key, iv, 12, aad, 20, ct, 63, tag, back) == GW_ERR);
}

static void
test_wechat_shangmi(void)
{
    /* WeChat Pay's SM4-GCM test vector: key = SM3(apiv3 key)[0:16],
     * base64 ciphertext
     * +lcLNfkZQQx+iQm20Apa3x9Mb/5L7PgZ7w== decrypts to "plaintext". */
    unsigned char key[16], in[25], out[9];
    const unsigned char *iv = (const unsigned char *)"uluk4a9R25RW";
    const unsigned char *aad = (const unsigned char *)"associatedData";

    unhex("fa2028801e86d45f5638cadafb5db2e9", key);
    unhex("fa570b35f919410c7e8909b6d00a5adf1f4c6ffe4becf819ef", in);
    CHECK(gw_sm4gcm_open(key, iv, 12, aad, 14, in, 9, in + 9, out) == GW_OK);
    CHECK(memcmp(out, "plaintext", 9) == 0);
}

/* Nonces other than 12 bytes: J0 = GHASH(IV || pad || len). Key
 * 0123456789abcdeffedcba9876543210, aad "transaction", plaintext bytes
 * 0..63 then "paygate any-length nonce" (88 bytes); answers are ct || tag
 * from gen_sm4gcm_vectors.py. The last nonce is crafted so that J0 ends
 * in 0xfffffffe: the payload counter wraps its low 32 bits after one
 * block, where GCM's inc32 must not carry into the upper 96 bits. */
static const struct { const char *iv, *ct_tag; } long_nonces[] = {
    { "3031323334353637",
      "3c99ea03e5e0cb33b21479265ee602f88d76159c04b818747b527ef5dd0d758b87d901a235faf756c9213ce5d67e7be971cd09f1d191a2f1fc55ef2584818ac5f6e99ae69dc5e0310b3e17465f1d115b8cbc27726768ebef5bc09069d7dda9d985807702e3bbd43a" },
    { "30313233343536373839616263",
      "f2f9ebe934049b04e48d367d8b41b34b50ee3b54877dcb2e6e54c65747f00482c744160e1b306858bbf5bfd114f113f02e61d65f10564f3cb75d264c59c6d531f4ea4747618d726caab73a053af4b21171b729eb96cc4cd82ffe27436fff0095f8458866a90e0e9e" },
    { "30313233343536373839616263646566",
      "7bb074394b1885b9e16725d578b2dd77ea1e565b9dca6d661c46ce8fbca8df51afb000f20b609fc87286a8be7df4a7f0f8889411026b45427b2f0a831ac7f07f2deaef8bec9629c1bf27ea6f30d3d8a12c88919a3595956031c651913891108d30097e4afab97492" },
    { "3031323334353637383961626364656630313233343536373839616263646566",
      "5e112ae9261f424556ac7d6896f3cbb1902e83d223f19cbff6485f75fcf7c35003ff69f91d2a4c34fedf8ecb565244003dbda14fbb679b15df6ccc757f2c146784e1d4b4b3d99cdeeaab64ed7084fbfedb4c61b21ea14d817eab6ac741ec3548d23705c979e6fb97" },
    { "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f303132333435363738393a3b",
      "68621f59c22c05947ec960314499f35734d794b4777bfa0c7e53f0d3806d7e217b3423f7c412e06c1f403d2d8e6c59e95c036e7c40d86aa02f48502ebeec872a02f6046b72ed85413417ffbf11272bf1fbd88944716c1fbcbd79f571e5f829d0400c4fd8392784a0" },
    { "f4955be111a4355a6356fbc4d9e8d69b",
      "f426ff97752c0ca15b71383356ade2deeaa2554d4f3f95719c63e2737df750733eb29b1d36803cb9e583cd59caada313f6e905282c087baca6e862b01066f95a9525bd8a226e74f2551984b31f89fd97a9d60affeac1fe611c2ba339448e856956fb22929f174dfe" },
};

static void
test_long_nonces(void)
{
    unsigned char key[16], iv[128], want[128], pt[88], out[88], tag[16];
    unsigned char back[88];
    size_t i, ivlen, n;

    unhex("0123456789abcdeffedcba9876543210", key);
    for (n = 0; n < 64; n++) {
        pt[n] = (unsigned char)n;
    }
    memcpy(pt + 64, "paygate any-length nonce", 24);
    for (i = 0; i < sizeof(long_nonces) / sizeof(long_nonces[0]); i++) {
        ivlen = unhex(long_nonces[i].iv, iv);
        CHECK(unhex(long_nonces[i].ct_tag, want) == 88 + 16);
        CHECK(gw_sm4gcm_seal(key, iv, ivlen,
                             (const unsigned char *)"transaction", 11, pt,
                             88, out, tag) == GW_OK);
        CHECK(memcmp(out, want, 88) == 0);
        CHECK(memcmp(tag, want + 88, 16) == 0);
        CHECK(gw_sm4gcm_open(key, iv, ivlen,
                             (const unsigned char *)"transaction", 11,
                             want, 88, want + 88, back) == GW_OK);
        CHECK(memcmp(back, pt, 88) == 0);
        /* The nonce is authenticated: one bit, or one byte fewer, fails. */
        iv[ivlen - 1] ^= 1;
        CHECK(gw_sm4gcm_open(key, iv, ivlen,
                             (const unsigned char *)"transaction", 11,
                             want, 88, want + 88, back) == GW_ERR);
        iv[ivlen - 1] ^= 1;
        CHECK(gw_sm4gcm_open(key, iv, ivlen - 1,
                             (const unsigned char *)"transaction", 11,
                             want, 88, want + 88, back) == GW_ERR);
    }
    /* A 12-byte nonce padded with zeros is a different nonce. */
    memset(iv, 0, sizeof(iv));
    memcpy(iv, "0123456789ab", 12);
    CHECK(gw_sm4gcm_seal(key, iv, 12, NULL, 0, pt, 16, out, tag) == GW_OK);
    CHECK(gw_sm4gcm_open(key, iv, 16, NULL, 0, out, 16, tag, back)
          == GW_ERR);
    /* Shorter than 8 bytes (outside the reference's range): round trip. */
    for (ivlen = 1; ivlen < 8; ivlen++) {
        CHECK(gw_sm4gcm_seal(key, iv, ivlen, NULL, 0, pt, 88, out, tag)
              == GW_OK);
        CHECK(gw_sm4gcm_open(key, iv, ivlen, NULL, 0, out, 88, tag, back)
              == GW_OK);
        CHECK(memcmp(back, pt, 88) == 0);
    }
    CHECK(gw_sm4gcm_seal(key, iv, 0, NULL, 0, pt, 16, out, tag) == GW_ERR);
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
        CHECK(gw_sm4gcm_seal(key, iv, 12, NULL, 0, buf, n, ct, tag) == GW_OK);
        CHECK(gw_sm4gcm_open(key, iv, 12, NULL, 0, ct, n, tag, back) == GW_OK);
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
    test_long_nonces();
    test_empty_and_sizes();
    if (failures) {
        fprintf(stderr, "test_sm4gcm: %d failure(s)\n", failures);
        return 1;
    }
    printf("test_sm4gcm: ok\n");
    return 0;
}
