/*
 * aead.c -- AEAD_AES_256_GCM and AEAD_SM4_GCM (see crypto.h): WeChat Pay's
 * resource and callback encryption. AES-256-GCM runs through OpenSSL;
 * SM4-GCM through OpenSSL's own cipher when it has one, else through
 * sm4gcm.c's composition. Nonces of any length GCM allows up to
 * GW_AEAD_NONCE_MAX; tags are always 16 bytes.
 */
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>

#include "runtime.h"
#include "crypto.h"
#include "sm4gcm.h"

static EVP_CIPHER *gw_aes256gcm;    /* fetched once, never freed */
static EVP_CIPHER *gw_sm4gcm_evp;   /* OpenSSL's own SM4-GCM, if present */
static int gw_sm4gcm_probed;

static EVP_CIPHER *
gw_sm4gcm_native(void)
{
    if (!gw_sm4gcm_probed) {
        gw_sm4gcm_probed = 1;
        gw_sm4gcm_evp = EVP_CIPHER_fetch(NULL, "SM4-GCM", NULL);
        ERR_clear_error();
    }
    return gw_sm4gcm_evp;
}

/* Validates alg, key and nonce. GW_OK with *cipher the OpenSSL cipher to
 * use, or NULL for sm4gcm.c's SM4-GCM; GW_ERR with *kind and msg set. */
static int
gw_aead_setup(const char *alg, size_t keylen, size_t noncelen,
              EVP_CIPHER **cipher, const char **kind, char *msg,
              size_t msglen)
{
    *cipher = NULL;
    if (strcmp(alg, "AEAD_AES_256_GCM") == 0) {
        if (keylen != 32) {
            *kind = "bad_key";
            snprintf(msg, msglen, "AEAD_AES_256_GCM needs a 32-byte key "
                     "(the APIv3 key is 32 ASCII characters), got %zu "
                     "bytes", keylen);
            return GW_ERR;
        }
        if (gw_aes256gcm == NULL) {
            gw_aes256gcm = EVP_CIPHER_fetch(NULL, "AES-256-GCM", NULL);
        }
        *cipher = gw_aes256gcm;
    } else if (strcmp(alg, "AEAD_SM4_GCM") == 0) {
        if (keylen != 16) {
            *kind = "bad_key";
            snprintf(msg, msglen, "AEAD_SM4_GCM needs a 16-byte key (derive "
                     "it with crypto.sm4_key(apiv3_key)), got %zu bytes",
                     keylen);
            return GW_ERR;
        }
        *cipher = gw_sm4gcm_native();
    } else {
        *kind = "unsupported_algorithm";
        snprintf(msg, msglen, "unsupported AEAD algorithm %.40s (expected "
                 "AEAD_AES_256_GCM or AEAD_SM4_GCM)", alg);
        return GW_ERR;
    }
    if (noncelen == 0 || noncelen > GW_AEAD_NONCE_MAX) {
        *kind = "bad_nonce";
        snprintf(msg, msglen, "%.20s needs a nonce of 1..%d bytes (WeChat "
                 "Pay sends 12), got %zu bytes", alg, GW_AEAD_NONCE_MAX,
                 noncelen);
        return GW_ERR;
    }
    return GW_OK;
}

/*
 * Keyed contexts: a GCM context keeps its key schedule (the AES round keys
 * and the GHASH table) between operations, so an operation under a key
 * seen before only sets the nonce. Setting a key means a fresh provider
 * context (an allocation), the key expansion and the GHASH table: about
 * as long as decrypting a whole notification's resource, and code and
 * data that push a signature's out of the caches. A process uses one or
 * two keys (the APIv3 key, a previous one): GW_AEAD_KEYED slots, the
 * least recently used one reused. A slot holds no more than the key it is
 * made from, which the caller keeps anyway (it passed it in); a slot
 * given up is cleansed. Per process, single-threaded (the loop thread).
 */
#define GW_AEAD_KEYED 4

struct gw_aead_keyed {
    EVP_CIPHER_CTX *ctx;
    EVP_CIPHER     *cipher;
    unsigned char   key[32];
    size_t          keylen;
    size_t          ivlen;           /* the ctx's nonce length now */
    unsigned long   used;            /* tick of the last use; 0: empty */
};

static struct gw_aead_keyed gw_aead_keyed[GW_AEAD_KEYED];
static unsigned long        gw_aead_tick;

/* The context for (cipher, key), its nonce length set to noncelen, ready
 * for a new nonce; NULL when out of memory. */
static EVP_CIPHER_CTX *
gw_aead_keyed_ctx(EVP_CIPHER *cipher, int enc, const unsigned char *key,
                  size_t keylen, size_t noncelen)
{
    struct gw_aead_keyed *k = NULL, *old = &gw_aead_keyed[0];
    int i;

    for (i = 0; i < GW_AEAD_KEYED; i++) {
        struct gw_aead_keyed *s = &gw_aead_keyed[i];

        if (s->used != 0 && s->cipher == cipher && s->keylen == keylen
            && CRYPTO_memcmp(s->key, key, keylen) == 0)
        {
            k = s;
            break;
        }
        if (s->used < old->used) {
            old = s;
        }
    }
    if (k == NULL) {
        k = old;
        if (k->ctx == NULL && (k->ctx = EVP_CIPHER_CTX_new()) == NULL) {
            return NULL;
        }
        EVP_CIPHER_CTX_reset(k->ctx);            /* drops the old schedule */
        OPENSSL_cleanse(k->key, sizeof(k->key));
        k->used = 0;
        if (EVP_CipherInit_ex2(k->ctx, cipher, key, NULL, enc, NULL) != 1) {
            EVP_CIPHER_CTX_reset(k->ctx);
            return NULL;
        }
        k->cipher = cipher;
        memcpy(k->key, key, keylen);
        k->keylen = keylen;
        k->ivlen = 12;                           /* GCM's default */
    }
    if (k->ivlen != noncelen) {
        if (EVP_CIPHER_CTX_ctrl(k->ctx, EVP_CTRL_AEAD_SET_IVLEN,
                                (int)noncelen, NULL) != 1)
        {
            EVP_CIPHER_CTX_reset(k->ctx);        /* the slot is given up */
            OPENSSL_cleanse(k->key, sizeof(k->key));
            k->used = 0;
            return NULL;
        }
        k->ivlen = noncelen;
    }
    k->used = ++gw_aead_tick;
    return k->ctx;
}

/* One GCM operation through an OpenSSL cipher, on the key's context: the
 * nonce is set with the key schedule kept. */
static int
gw_evp_aead(EVP_CIPHER *cipher, int enc, const unsigned char *key,
            size_t keylen, const unsigned char *nonce, size_t noncelen,
            const unsigned char *aad,
            size_t aadlen, const unsigned char *in, size_t len,
            unsigned char *tag, unsigned char *out)
{
    EVP_CIPHER_CTX *ctx;
    int n;

    if (len > INT_MAX || aadlen > INT_MAX) {
        return GW_ERR;
    }
    ctx = gw_aead_keyed_ctx(cipher, enc, key, keylen, noncelen);
    if (ctx == NULL
        || EVP_CipherInit_ex2(ctx, NULL, NULL, nonce, enc, NULL) != 1)
    {
        return GW_ERR;
    }
    if (aadlen > 0
        && EVP_CipherUpdate(ctx, NULL, &n, aad, (int)aadlen) != 1)
    {
        return GW_ERR;
    }
    if (len > 0 && EVP_CipherUpdate(ctx, out, &n, in, (int)len) != 1) {
        return GW_ERR;
    }
    if (!enc && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, 16,
                                    tag) != 1)
    {
        return GW_ERR;
    }
    if (EVP_CipherFinal_ex(ctx, out + len, &n) != 1) {
        return GW_ERR;
    }
    if (enc && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, 16,
                                   tag) != 1)
    {
        return GW_ERR;
    }
    return GW_OK;
}

int
gw_aead_encrypt(const char *alg, const unsigned char *key, size_t keylen,
                const unsigned char *nonce, size_t noncelen,
                const unsigned char *aad, size_t aadlen,
                const unsigned char *in, size_t len, unsigned char *out,
                const char **kind, char *msg, size_t msglen)
{
    EVP_CIPHER *cipher;
    int rc;

    if (gw_aead_setup(alg, keylen, noncelen, &cipher, kind, msg, msglen)
        != GW_OK)
    {
        return GW_ERR;
    }
    if (cipher != NULL) {
        rc = gw_evp_aead(cipher, 1, key, keylen, nonce, noncelen, aad,
                         aadlen, in, len, out + len, out);
    } else {
        rc = gw_sm4gcm_seal(key, nonce, noncelen, aad, aadlen, in, len,
                            out, out + len);
    }
    ERR_clear_error();
    if (rc != GW_OK) {
        OPENSSL_cleanse(out, len + 16);
        *kind = "internal";
        snprintf(msg, msglen, "%.20s encrypt failed", alg);
    }
    return rc;
}

int
gw_aead_decrypt(const char *alg, const unsigned char *key, size_t keylen,
                const unsigned char *nonce, size_t noncelen,
                const unsigned char *aad, size_t aadlen,
                const unsigned char *in, size_t len, unsigned char *out,
                const char **kind, char *msg, size_t msglen)
{
    EVP_CIPHER *cipher;
    unsigned char tag[16];
    int rc;

    if (gw_aead_setup(alg, keylen, noncelen, &cipher, kind, msg, msglen)
        != GW_OK)
    {
        return GW_ERR;
    }
    if (len < 16) {
        *kind = "decrypt_failed";
        snprintf(msg, msglen, "%.20s ciphertext shorter than its 16-byte "
                 "tag", alg);
        return GW_ERR;
    }
    len -= 16;
    memcpy(tag, in + len, 16);
    if (cipher != NULL) {
        rc = gw_evp_aead(cipher, 0, key, keylen, nonce, noncelen, aad,
                         aadlen, in, len, tag, out);
    } else {
        rc = gw_sm4gcm_open(key, nonce, noncelen, aad, aadlen, in, len, tag,
                            out);
    }
    ERR_clear_error();
    if (rc != GW_OK) {
        OPENSSL_cleanse(out, len);
        *kind = "decrypt_failed";
        snprintf(msg, msglen, "%.20s tag mismatch: wrong key (APIv3 key?), "
                 "or ciphertext, nonce or associated_data altered", alg);
    }
    return rc;
}

int
gw_aead_sm4gcm_native(void)
{
    return gw_sm4gcm_native() != NULL;
}
