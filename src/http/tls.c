/*
 * tls.c -- see tls.h.
 *
 * Ticket keys live in one shared anonymous mapping made by the master
 * before it forks, so every worker, of every generation, encrypts tickets
 * with the same current key and accepts the previous one: a client
 * resumes whichever worker accepts it, and after a reload. The master is
 * the only writer (rotation); workers read under a sequence lock.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>

#include "fdio.h"
#include "tls.h"

struct tkey {
    unsigned char name[16];     /* sent in the ticket: finds the key */
    unsigned char aes[32];      /* AES-256-CBC key */
    unsigned char hmac[32];     /* HMAC-SHA256 key */
};

struct tkeys {
    uint32_t    seq;            /* odd while the master writes */
    uint32_t    n;              /* keys held: 1, then 2 */
    uint64_t    rotations;      /* since start */
    struct tkey keys[2];        /* [0] current, [1] previous */
};

static struct tkeys *tickets;   /* shared mapping, or NULL */

static int
tkey_new(struct tkey *k)
{
    return RAND_bytes((unsigned char *) k, sizeof(*k)) == 1 ? 0 : -1;
}

int
gw_tls_tickets_init(void)
{
    struct tkey k;

    if (tickets != NULL) {
        return 0;
    }
    if (tkey_new(&k) != 0) {
        return -1;
    }
    tickets = mmap(NULL, sizeof(*tickets), PROT_READ | PROT_WRITE,
                   MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (tickets == MAP_FAILED) {
        tickets = NULL;
        OPENSSL_cleanse(&k, sizeof(k));
        return -1;
    }
    tickets->keys[0] = k;
    tickets->n = 1;
    OPENSSL_cleanse(&k, sizeof(k));
    return 0;
}

int
gw_tls_tickets_rotate(void)
{
    struct tkey k;

    if (tickets == NULL || tkey_new(&k) != 0) {
        return -1;
    }
    __atomic_fetch_add(&tickets->seq, 1, __ATOMIC_ACQ_REL);
    tickets->keys[1] = tickets->keys[0];
    tickets->keys[0] = k;
    tickets->n = 2;
    tickets->rotations++;
    __atomic_fetch_add(&tickets->seq, 1, __ATOMIC_RELEASE);
    OPENSSL_cleanse(&k, sizeof(k));
    return 0;
}

uint64_t
gw_tls_tickets_rotations(void)
{
    return tickets != NULL ? tickets->rotations : 0;
}

/* A consistent copy of the keys; the number held, or 0. */
static int
tickets_read(struct tkey out[2])
{
    for (int tries = 0; tries < 10000; tries++) {
        uint32_t s = __atomic_load_n(&tickets->seq, __ATOMIC_ACQUIRE);
        uint32_t n;

        if (s & 1) {
            continue;
        }
        memcpy(out, tickets->keys, 2 * sizeof(*out));
        n = tickets->n;
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (__atomic_load_n(&tickets->seq, __ATOMIC_RELAXED) == s) {
            return (int) n;
        }
    }
    return 0;
}

static int
ticket_mac(EVP_MAC_CTX *hctx, unsigned char *key)
{
    static char digest[] = "SHA256";
    OSSL_PARAM p[3];

    p[0] = OSSL_PARAM_construct_octet_string(OSSL_MAC_PARAM_KEY, key, 32);
    p[1] = OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, digest,
                                            0);
    p[2] = OSSL_PARAM_construct_end();
    return EVP_MAC_CTX_set_params(hctx, p) == 1 ? 0 : -1;
}

/* OpenSSL's ticket-key callback: encrypt with the current key; decrypt
 * with the one the ticket names. A ticket that decrypts is always renewed
 * (2): a client then holds a ticket under the current key, and TLS 1.3
 * gets a new ticket on a resumed handshake (with 1, OpenSSL sends none,
 * so a client that keeps only its last session fails every second
 * resumption). */
static int
ticket_cb(SSL *s, unsigned char key_name[16], unsigned char *iv,
          EVP_CIPHER_CTX *ctx, EVP_MAC_CTX *hctx, int enc)
{
    struct tkey k[2];
    int n = tickets_read(k), rc = 0;

    (void) s;
    if (n == 0) {
        return enc ? -1 : 0;
    }
    if (enc) {
        rc = -1;
        if (RAND_bytes(iv, 16) == 1 && ticket_mac(hctx, k[0].hmac) == 0
            && EVP_EncryptInit_ex(ctx, EVP_aes_256_cbc(), NULL, k[0].aes,
                                  iv) == 1) {
            memcpy(key_name, k[0].name, 16);
            rc = 1;
        }
    } else {
        for (int i = 0; i < n; i++) {
            if (memcmp(key_name, k[i].name, 16) != 0) {
                continue;
            }
            rc = -1;
            if (ticket_mac(hctx, k[i].hmac) == 0
                && EVP_DecryptInit_ex(ctx, EVP_aes_256_cbc(), NULL,
                                      k[i].aes, iv) == 1) {
                rc = 2;         /* and renew: see ticket_cb() */
            }
            break;
        }
    }
    OPENSSL_cleanse(k, sizeof(k));
    return rc;
}

static void
ssl_reason(char *err, size_t errlen, const char *what, const char *path)
{
    char buf[256];
    unsigned long e = ERR_peek_last_error();

    ERR_error_string_n(e, buf, sizeof(buf));
    snprintf(err, errlen, "%s %s: %s", what, path, e ? buf : "failed");
    ERR_clear_error();
}

/* "TLSv1.2 TLSv1.3" -> min and max versions. 0, or -1 when unknown. */
static int
parse_protocols(const char *s, int *min, int *max)
{
    char buf[128];
    char *save = NULL;

    *min = *max = 0;
    if (strlen(s) >= sizeof(buf)) {
        return -1;
    }
    strcpy(buf, s);
    for (char *t = strtok_r(buf, " ,", &save); t != NULL;
         t = strtok_r(NULL, " ,", &save)) {
        int v;

        if (strcmp(t, "TLSv1.2") == 0) {
            v = TLS1_2_VERSION;
        } else if (strcmp(t, "TLSv1.3") == 0) {
            v = TLS1_3_VERSION;
        } else {
            return -1;
        }
        if (*min == 0 || v < *min) {
            *min = v;
        }
        if (v > *max) {
            *max = v;
        }
    }
    return *min == 0 ? -1 : 0;
}

/* Why the PEM file at path (what: "certificate" or "key") did not load,
 * in words where they are known: the file's own error (missing, a
 * folder, unreadable), empty, or holding the other kind of PEM (a key
 * given as the certificate); else OpenSSL's reason. Never the content:
 * the buffer that held it is wiped. */
static void
file_reason(char *err, size_t errlen, const char *what, const char *path0)
{
    char buf[16384];
    size_t n = 0;
    int is_key = strcmp(what, "key") == 0, has_cert, has_key, encrypted;
    int e = 0, fd;
    struct stat st;
    /* a value that is no path (PEM text pasted in its place, several
     * lines, very long) is not repeated: it may be the key itself */
    const char *path = strstr(path0, "-----BEGIN") != NULL
                       || strpbrk(path0, "\r\n") != NULL
                       || strlen(path0) > 200
                       ? "(value not shown: it is not a path)" : path0;

    if (stat(path0, &st) != 0) {
        snprintf(err, errlen, "tls %s %s: %s", what, path, strerror(errno));
        ERR_clear_error();
        return;
    }
    if (!S_ISREG(st.st_mode)) {           /* a folder, a FIFO: never read */
        snprintf(err, errlen, "tls %s %s: %s", what, path,
                 S_ISDIR(st.st_mode) ? strerror(EISDIR)
                                     : "not a regular file");
        ERR_clear_error();
        return;
    }
    /* read(2), no stdio: no buffer of its own keeps a copy of the key */
    fd = open(path0, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        snprintf(err, errlen, "tls %s %s: %s", what, path, strerror(errno));
        ERR_clear_error();
        return;
    }
    n = gw_read_full(fd, buf, sizeof(buf) - 1, &e);
    close(fd);
    buf[n] = 0;
    has_cert = strstr(buf, "-----BEGIN CERTIFICATE-----") != NULL;
    has_key = strstr(buf, "PRIVATE KEY-----") != NULL;
    encrypted = strstr(buf, "-----BEGIN ENCRYPTED PRIVATE KEY-----") != NULL
                || strstr(buf, "Proc-Type: 4,ENCRYPTED") != NULL;
    OPENSSL_cleanse(buf, sizeof(buf));
    if (n == 0 && e != 0) {
        snprintf(err, errlen, "tls %s %s: %s", what, path, strerror(e));
    } else if (n == 0) {
        snprintf(err, errlen, "tls %s %s: the file is empty", what, path);
    } else if (!is_key && !has_cert) {
        snprintf(err, errlen, "tls certificate %s: %s", path, has_key
                 ? "a private key, not a certificate (are the certificate "
                   "and the key swapped?)"
                 : "no PEM certificate in it (a BEGIN CERTIFICATE line)");
    } else if (is_key && !has_key) {
        snprintf(err, errlen, "tls key %s: %s", path, has_cert
                 ? "a certificate, not a private key (are the certificate "
                   "and the key swapped?)"
                 : "no PEM private key in it (a BEGIN ... PRIVATE KEY line)");
    } else if (is_key && encrypted) {
        snprintf(err, errlen, "tls key %s: encrypted with a pass phrase: "
                 "paygate reads private keys unencrypted only (decrypt it: "
                 "umask 077; openssl pkey -in FILE -out key.pem)", path);
    } else {
        unsigned long oe = ERR_peek_last_error();
        const char *r = oe ? ERR_reason_error_string(oe) : NULL;

        snprintf(err, errlen, "tls %s %s: cannot be loaded (%s)", what, path,
                 r ? r : "malformed PEM");
    }
    ERR_clear_error();
}

/* The pass-phrase callback of every key and certificate the listener
 * reads (tls.h): there is none. Without one OpenSSL asks on the
 * terminal (or stdin), and the master (at start, on a reload) or a worker
 * (tls.set_certificate) would stop there for as long as nobody types: an
 * encrypted key is refused (file_reason() says so). */
int
gw_tls_no_password(char *buf, int size, int rwflag, void *u)
{
    (void) buf;
    (void) size;
    (void) rwflag;
    (void) u;
    return -1;
}

static int
regular_file(const char *path)
{
    struct stat st;

    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

/* Why the key at key does not go with the certificate file at cert:
 * the file's chain in the wrong order (a certificate after the first is
 * the key's), or a key of another certificate. Both files have loaded. */
static void
mismatch_reason(char *err, size_t errlen, const char *cert, const char *key)
{
    char buf[16384];
    size_t len = 0;
    int e, fd = open(key, O_RDONLY | O_CLOEXEC | O_NONBLOCK), n = 0, at = 0;
    EVP_PKEY *pkey = NULL;
    BIO *b;
    X509 *x;

    /* read(2) and a memory BIO: no stdio buffer keeps a copy of the key
     * (a read that fails ends it: what it read is all there is to load) */
    if (fd >= 0) {
        len = gw_read_full(fd, buf, sizeof(buf), &e);
        close(fd);
    }
    b = len > 0 ? BIO_new_mem_buf(buf, (int) len) : NULL;
    pkey = b ? PEM_read_bio_PrivateKey(b, NULL, gw_tls_no_password, NULL)
             : NULL;
    BIO_free(b);
    OPENSSL_cleanse(buf, sizeof(buf));
    b = pkey ? BIO_new_file(cert, "r") : NULL;
    while (b != NULL && at == 0
           && (x = PEM_read_bio_X509(b, NULL, gw_tls_no_password,
                                     NULL)) != NULL) {
        if (++n > 1 && X509_check_private_key(x, pkey) == 1) {
            at = n;
        }
        X509_free(x);
    }
    BIO_free(b);
    EVP_PKEY_free(pkey);
    ERR_clear_error();
    if (at > 0) {
        snprintf(err, errlen, "tls certificate %s: the chain is out of "
                 "order: the certificate of key %s is number %d in the "
                 "file, and must be the first (the leaf, then the "
                 "intermediates)", cert, key, at);
    } else {
        snprintf(err, errlen, "tls key %s does not match certificate %s",
                 key, cert);
    }
}

static int
load_pair(SSL_CTX *ctx, const char *cert, const char *key, char *err,
          size_t errlen)
{
    /* a missing file, a folder or a FIFO is said before OpenSSL opens it
     * (a FIFO with no writer would block the start for good) */
    if (!regular_file(cert)) {
        file_reason(err, errlen, "certificate", cert);
        return -1;
    }
    if (!regular_file(key)) {
        file_reason(err, errlen, "key", key);
        return -1;
    }
    if (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1) {
        file_reason(err, errlen, "certificate", cert);
        return -1;
    }
    if (SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1) {
        /* a key of the certificate's type that is not its key: OpenSSL
         * refuses it here ("key values mismatch"), not in the check */
        unsigned long e = ERR_peek_last_error();

        if (ERR_GET_LIB(e) == ERR_LIB_X509
            && ERR_GET_REASON(e) == X509_R_KEY_VALUES_MISMATCH) {
            mismatch_reason(err, errlen, cert, key);
        } else {
            file_reason(err, errlen, "key", key);
        }
        return -1;
    }
    if (SSL_CTX_check_private_key(ctx) != 1) {
        mismatch_reason(err, errlen, cert, key);
        return -1;
    }
    return 0;
}

int
gw_tls_cert_dates(const char *path, char *msg, size_t msglen)
{
    BIO *b;
    X509 *x;
    const ASN1_TIME *t = NULL;
    const char *what = NULL;
    char when[64] = "";
    int rc = 0;

    if (path == NULL || path[0] == '\0') {
        return 0;
    }
    b = BIO_new_file(path, "r");
    x = b ? PEM_read_bio_X509(b, NULL, gw_tls_no_password, NULL) : NULL;
    BIO_free(b);
    if (x != NULL) {
        if (X509_cmp_current_time(X509_get0_notAfter(x)) <= 0) {
            t = X509_get0_notAfter(x);
            what = "expired on";
        } else if (X509_cmp_current_time(X509_get0_notBefore(x)) >= 0) {
            t = X509_get0_notBefore(x);
            what = "is not valid yet: from";
        }
    }
    if (t != NULL) {
        BIO *m = BIO_new(BIO_s_mem());
        char *p;
        long n;

        if (m != NULL && ASN1_TIME_print(m, t) == 1
            && (n = BIO_get_mem_data(m, &p)) > 0) {
            snprintf(when, sizeof(when), "%.*s", (int) n, p);
        }
        BIO_free(m);
        snprintf(msg, msglen, "tls certificate %s %s %s: clients that verify "
                 "it refuse every handshake", path, what, when);
        rc = 1;
    }
    X509_free(x);
    ERR_clear_error();
    return rc;
}

SSL_CTX *
gw_tls_server_ctx(const struct gw_tls_conf *conf, char *err, size_t errlen)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    const char *protocols = conf->protocols != NULL
                            && conf->protocols[0] != '\0'
                            ? conf->protocols : GW_TLS_PROTOCOLS;
    const char *ciphers = conf->ciphers != NULL && conf->ciphers[0] != '\0'
                          ? conf->ciphers : GW_TLS_CIPHERS;
    int min, max;

    if (ctx == NULL) {
        snprintf(err, errlen, "tls: no memory");
        return NULL;
    }
    if (parse_protocols(protocols, &min, &max) != 0) {
        snprintf(err, errlen, "tls protocols '%.64s': give TLSv1.2 and/or "
                 "TLSv1.3", protocols);
        goto err;
    }
    SSL_CTX_set_min_proto_version(ctx, min);
    SSL_CTX_set_max_proto_version(ctx, max);
    if (SSL_CTX_set_cipher_list(ctx, ciphers) != 1) {
        ssl_reason(err, errlen, "tls ciphers", ciphers);
        goto err;
    }
    if (conf->ciphersuites != NULL && conf->ciphersuites[0] != '\0'
        && SSL_CTX_set_ciphersuites(ctx, conf->ciphersuites) != 1) {
        ssl_reason(err, errlen, "tls ciphersuites", conf->ciphersuites);
        goto err;
    }
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE
                          | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER
                          | SSL_MODE_RELEASE_BUFFERS);
    /* A client's FIN without close_notify ends its sending as a
     * close_notify would (as nginx reads it): requests it sent before are
     * answered. HTTP frames its own messages, so a cut one is still seen
     * as incomplete (a body short of its Content-Length). */
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION
                             | SSL_OP_CIPHER_SERVER_PREFERENCE
                             | SSL_OP_IGNORE_UNEXPECTED_EOF);
    /* Read what the socket has, not a record header and then its body:
     * a new connection's handshake and first request take 2 reads
     * instead of 8. The server then reads on while SSL_has_pending(). */
    SSL_CTX_set_read_ahead(ctx, 1);
    SSL_CTX_set_default_passwd_cb(ctx, gw_tls_no_password);
    if (load_pair(ctx, conf->cert, conf->key, err, errlen) != 0) {
        goto err;
    }
    if (conf->cert2 != NULL && conf->cert2[0] != '\0') {
        int type1 = EVP_PKEY_get_base_id(SSL_CTX_get0_privatekey(ctx));

        if (conf->key2 == NULL || conf->key2[0] == '\0') {
            snprintf(err, errlen, "tls: a second certificate needs its key");
            goto err;
        }
        if (load_pair(ctx, conf->cert2, conf->key2, err, errlen) != 0) {
            goto err;
        }
        if (EVP_PKEY_get_base_id(SSL_CTX_get0_privatekey(ctx)) == type1) {
            snprintf(err, errlen, "tls: certificates %s and %s have keys of "
                     "one type (give RSA and ECDSA)", conf->cert,
                     conf->cert2);
            goto err;
        }
    }
    /* sessions: resumed with a ticket by any worker (shared keys), or
     * from this worker's cache by a client that sends a session id */
    SSL_CTX_set_session_id_context(ctx, (const unsigned char *) "paygate",
                                   7);
    /* a session lives two rotation periods at most: its ticket's key is
     * current for one and accepted as the previous one for another */
    SSL_CTX_set_timeout(ctx, (long) (2 * (conf->ticket_rotation > 0
                                          ? conf->ticket_rotation : 3600)));
    if (conf->session_cache > 0) {
        SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_SERVER);
        SSL_CTX_sess_set_cache_size(ctx, conf->session_cache);
    } else {
        SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    }
    if (conf->no_tickets) {
        /* none issued (TLS 1.2: the extension refused; TLS 1.3: no
         * NewSessionTicket), and none accepted */
        SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
        SSL_CTX_set_num_tickets(ctx, 0);
    } else if (tickets != NULL
        && SSL_CTX_set_tlsext_ticket_key_evp_cb(ctx, ticket_cb) != 1) {
        snprintf(err, errlen, "tls: cannot set the ticket keys");
        goto err;
    }
    if (conf->client_ca != NULL && conf->client_ca[0] != '\0') {
        STACK_OF(X509_NAME) *names;

        if (SSL_CTX_load_verify_locations(ctx, conf->client_ca, NULL) != 1) {
            ssl_reason(err, errlen, "tls client CA", conf->client_ca);
            goto err;
        }
        names = SSL_load_client_CA_file(conf->client_ca);
        if (names != NULL) {
            SSL_CTX_set_client_CA_list(ctx, names);
        }
        SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER
                                | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
    }
    return ctx;
err:
    SSL_CTX_free(ctx);
    return NULL;
}
