/* bench/simulator_floor.c -- the machine's floor for bench/simulator: the
 * least any server here does for one signed query answer, in plain C with
 * no runtime around it. libevent's evhttp takes the request; the
 * Authorization's timestamp, nonce and signature are read, the signature
 * verified (RSA PKCS#1 v1.5, SHA-256, over "GET\nURI\nTS\nNONCE\n\n") with
 * the merchant's public key, then a fixed answer body signed ("TS\nNONCE\n
 * BODY\n") and sent with the Wechatpay-* headers. No state, no checks of
 * the window or the nonce, no log: what verify + sign + HTTP over loopback
 * cost on this machine, beside which the simulator and the runtime's bare
 * server (bench/simulator_bare) are read. Built by bench/simulator:
 *   cc -O2 bench/simulator_floor.c -o FLOOR -levent -lcrypto
 *   FLOOR PORT PUB.pem KEY.pem BODY_FILE SERIAL
 * Not part of paygate: a measuring stick only. */
#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/rsa.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static EVP_PKEY_CTX *verify_ctx, *sign_ctx;
static char body[8192];
static size_t body_len;
static const char *serial;

/* The value of name="..." in an Authorization header, into out. */
static int
auth_field(const char *auth, const char *name, char *out, size_t cap)
{
    char pat[32];
    const char *p, *e;

    snprintf(pat, sizeof(pat), "%s=\"", name);
    if ((p = strstr(auth, pat)) == NULL) {
        return -1;
    }
    p += strlen(pat);
    if ((e = strchr(p, '"')) == NULL || (size_t)(e - p) >= cap) {
        return -1;
    }
    memcpy(out, p, (size_t)(e - p));
    out[e - p] = '\0';
    return 0;
}

static void
answer(struct evhttp_request *req, void *arg)
{
    const char *auth = evhttp_find_header(
        evhttp_request_get_input_headers(req), "Authorization");
    char ts[32], nonce[64], b64[700], msg[2048], rts[32], rnonce[33];
    char smsg[sizeof(body) + 128];
    unsigned char sig[512], md[32], rnd[16];
    size_t siglen, n;
    int len, i;
    struct evkeyvalq *h;
    struct evbuffer *out;

    (void)arg;
    if (auth == NULL || auth_field(auth, "timestamp", ts, sizeof(ts)) != 0
        || auth_field(auth, "nonce_str", nonce, sizeof(nonce)) != 0
        || auth_field(auth, "signature", b64, sizeof(b64)) != 0
        || (n = strlen(b64)) % 4 != 0 || n / 4 * 3 > sizeof(sig))
    {
        evhttp_send_error(req, 401, NULL);
        return;
    }
    len = EVP_DecodeBlock(sig, (unsigned char *)b64, (int)n);
    siglen = len < 0 ? 0 : (size_t)len - (n > 0 && b64[n - 1] == '=')
             - (n > 1 && b64[n - 2] == '=');
    len = snprintf(msg, sizeof(msg), "GET\n%s\n%s\n%s\n\n",
                   evhttp_request_get_uri(req), ts, nonce);
    if (len < 0 || (size_t)len >= sizeof(msg)
        || EVP_Digest(msg, (size_t)len, md, NULL, EVP_sha256(), NULL) != 1
        || EVP_PKEY_verify(verify_ctx, sig, siglen, md, sizeof(md)) != 1)
    {
        evhttp_send_error(req, 401, NULL);
        return;
    }
    snprintf(rts, sizeof(rts), "%lld", (long long)time(NULL));
    if (RAND_bytes(rnd, sizeof(rnd)) != 1) {
        evhttp_send_error(req, 500, NULL);
        return;
    }
    for (i = 0; i < 16; i++) {
        snprintf(rnonce + 2 * i, 3, "%02x", rnd[i]);
    }
    len = snprintf(smsg, sizeof(smsg), "%s\n%s\n%.*s\n", rts, rnonce,
                   (int)body_len, body);
    siglen = sizeof(sig);
    if (len < 0 || (size_t)len >= sizeof(smsg)
        || EVP_Digest(smsg, (size_t)len, md, NULL, EVP_sha256(), NULL) != 1
        || EVP_PKEY_sign(sign_ctx, sig, &siglen, md, sizeof(md)) != 1)
    {
        evhttp_send_error(req, 500, NULL);
        return;
    }
    EVP_EncodeBlock((unsigned char *)b64, sig, (int)siglen);
    h = evhttp_request_get_output_headers(req);
    evhttp_add_header(h, "Content-Type", "application/json");
    evhttp_add_header(h, "Wechatpay-Timestamp", rts);
    evhttp_add_header(h, "Wechatpay-Nonce", rnonce);
    evhttp_add_header(h, "Wechatpay-Signature", b64);
    evhttp_add_header(h, "Wechatpay-Serial", serial);
    out = evbuffer_new();
    evbuffer_add(out, body, body_len);
    evhttp_send_reply(req, 200, "OK", out);
    evbuffer_free(out);
}

/* A cached RSA PKCS#1 v1.5 / SHA-256 context, as paygate keeps one. */
static EVP_PKEY_CTX *
rsa_ctx(EVP_PKEY *key, int for_sign)
{
    EVP_PKEY_CTX *c = EVP_PKEY_CTX_new_from_pkey(NULL, key, NULL);

    if (c == NULL
        || (for_sign ? EVP_PKEY_sign_init(c) : EVP_PKEY_verify_init(c)) != 1
        || EVP_PKEY_CTX_set_rsa_padding(c, RSA_PKCS1_PADDING) != 1
        || EVP_PKEY_CTX_set_signature_md(c, EVP_sha256()) != 1)
    {
        fprintf(stderr, "floor: cannot make an RSA context\n");
        exit(1);
    }
    return c;
}

static FILE *
open_or_die(const char *path)
{
    FILE *f = fopen(path, "rb");

    if (f == NULL) {
        perror(path);
        exit(1);
    }
    return f;
}

int
main(int argc, char **argv)
{
    EVP_PKEY *pub, *key;
    FILE *f;
    struct event_base *base;
    struct evhttp *http;

    if (argc != 6) {
        fprintf(stderr, "usage: floor PORT PUB.pem KEY.pem BODY_FILE "
                "SERIAL\n");
        return 2;
    }
    f = open_or_die(argv[2]);
    pub = PEM_read_PUBKEY(f, NULL, NULL, NULL);
    fclose(f);
    f = open_or_die(argv[3]);
    key = PEM_read_PrivateKey(f, NULL, NULL, NULL);
    fclose(f);
    f = open_or_die(argv[4]);
    body_len = fread(body, 1, sizeof(body), f);
    fclose(f);
    if (pub == NULL || key == NULL) {
        fprintf(stderr, "floor: cannot read the keys\n");
        return 1;
    }
    serial = argv[5];
    verify_ctx = rsa_ctx(pub, 0);
    sign_ctx = rsa_ctx(key, 1);
    base = event_base_new();
    http = evhttp_new(base);
    evhttp_set_gencb(http, answer, NULL);
    if (evhttp_bind_socket(http, "127.0.0.1", (unsigned short)atoi(argv[1]))
        != 0)
    {
        fprintf(stderr, "floor: cannot listen on port %s\n", argv[1]);
        return 1;
    }
    return event_base_dispatch(base);
}
