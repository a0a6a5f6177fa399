/*
 * lkeyring.c -- paygate.keyring: rings mapping Wechatpay-Serial (platform
 * certificate serial, or PUB_KEY_ID_...) to a parsed verifier.
 *
 * keyring.new() makes a ring (one per signing merchant, so two merchants
 * in one worker never see each other's verifiers); the module functions
 * act on the worker's default ring. Each ring is kept in C: an
 * open-addressing hash table of entries, each holding its own EVP_PKEY
 * reference (and the certificate, when it came from one) and a validity
 * window. Verification
 * on the hot path is one lookup plus one verify: no parsing, no Lua
 * allocation. Replacing an entry or the whole set builds the new state
 * first and swaps pointers last, so a failed put leaves the ring intact.
 *
 * Serials are stored uppercase and looked up uppercased (WeChat Pay sends
 * uppercase hex; put() upper-cases hex serials); PUB_KEY_ID_ ids are
 * opaque, compared exactly. A serial is a number written in hex, and not every
 * writer keeps its leading zero (Go prints two digits per byte, "0A1E...",
 * as OpenSSL does; Java's BigInteger drops it, "A1E..."): an id made only
 * of hex digits is looked up without its leading zeros, so either
 * spelling finds the entry; the entry keeps the id as it was put.
 */
#include <ctype.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <openssl/crypto.h>
#include <openssl/x509.h>

#include <lua.h>
#include <lauxlib.h>

#include "hash.h"
#include "lstate.h"
#include "runtime.h"
#include "crypto.h"
#include "lobjects.h"

#define GW_KEYRING_MT  "paygate.keyring.ring"
#define GW_KEYRING_KEY "paygate.keyring.instance"
#define GW_KEYRING_MAX_ID 128

struct gw_kr_entry {
    char             *id;          /* owned, NUL-terminated */
    size_t            idlen;       /* bytes */
    size_t            skip;        /* leading zeros the lookup ignores */
    uint32_t          hash;        /* FNV-1a of id + skip */
    struct gw_keyinfo ki;          /* owned key reference + contexts */
    X509             *cert;        /* owned reference, or NULL (pub key) */
    double            not_before;  /* epoch s; 0 or less = unbounded */
    double            not_after;   /* epoch s (negative: before 1970);
                                      an end only when has_end */
    int               has_end;     /* 1: not_after ends the window (a
                                      certificate's own end, or one
                                      given above 0) */
};

struct gw_keyring {
    struct gw_kr_entry **slots;    /* owned; cap entries, NULL = empty */
    size_t               cap;      /* power of two */
    size_t               count;    /* live entries */
    size_t               tombs;    /* deleted markers */
    int                  closed;   /* set by close() / __gc; methods raise */
};

/* Marks a deleted slot (never dereferenced). */
static struct gw_kr_entry gw_kr_tomb;
#define GW_KR_TOMB (&gw_kr_tomb)

static void
gw_kr_entry_free(struct gw_kr_entry *e)
{
    if (e == NULL || e == GW_KR_TOMB) {
        return;
    }
    gw_keyinfo_clear(&e->ki);
    X509_free(e->cert);
    free(e->id);
    free(e);
}

static int
gw_kr_is_pub_id(const char *id, size_t len)
{
    return len >= 11 && memcmp(id, "PUB_KEY_ID_", 11) == 0;
}

/* How many leading zeros of id (already upper-cased) a lookup ignores:
 * those of a hex serial (all hex digits), keeping one digit; none for any
 * other id. */
static size_t
gw_kr_skip(const char *id, size_t len)
{
    size_t i, zeros = 0;

    for (i = 0; i < len; i++) {
        if (!isxdigit((unsigned char)id[i])) {
            return 0;
        }
    }
    while (zeros + 1 < len && id[zeros] == '0') {
        zeros++;
    }
    return zeros;
}

/* Slot index of the lookup key (an id from which gw_kr_skip's zeros are
 * dropped), or of the first free slot for it (*found = 0). */
static size_t
gw_kr_find(struct gw_keyring *kr, const char *id, size_t len, uint32_t h,
           int *found)
{
    size_t mask = kr->cap - 1, i = h & mask, free_slot = (size_t)-1;

    for (;;) {
        struct gw_kr_entry *e = kr->slots[i];

        if (e == NULL) {
            *found = 0;
            return free_slot != (size_t)-1 ? free_slot : i;
        }
        if (e == GW_KR_TOMB) {
            if (free_slot == (size_t)-1) {
                free_slot = i;
            }
        } else if (e->hash == h && e->idlen - e->skip == len
                   && memcmp(e->id + e->skip, id, len) == 0)
        {
            *found = 1;
            return i;
        }
        i = (i + 1) & mask;
    }
}

/* The slot of the entry id names (hex serials in any case, with or
 * without leading zeros; PUB_KEY_ID_ ids exactly), or (size_t)-1. */
static size_t
gw_kr_slot(struct gw_keyring *kr, const char *id, size_t len)
{
    char up[GW_KEYRING_MAX_ID];
    int found;
    size_t i, skip;

    if (kr->count == 0 || len == 0 || len > GW_KEYRING_MAX_ID) {
        return (size_t)-1;
    }
    if (!gw_kr_is_pub_id(id, len)) {
        for (i = 0; i < len; i++) {
            up[i] = (char)toupper((unsigned char)id[i]);
        }
        id = up;
    }
    skip = gw_kr_skip(id, len);
    i = gw_kr_find(kr, id + skip, len - skip,
                   gw_hash_fnv1a(id + skip, len - skip), &found);
    return found ? i : (size_t)-1;
}

static struct gw_kr_entry *
gw_kr_get(struct gw_keyring *kr, const char *id, size_t len)
{
    size_t i = gw_kr_slot(kr, id, len);

    return i != (size_t)-1 ? kr->slots[i] : NULL;
}

/* Grows (or rehashes) so that one more entry keeps load below 1/2. */
static int
gw_kr_reserve(struct gw_keyring *kr)
{
    struct gw_kr_entry **old = kr->slots, **slots;
    size_t oldcap = kr->cap, cap = kr->cap ? kr->cap : 16, i;
    int found;

    if ((kr->count + kr->tombs + 1) * 2 <= kr->cap) {
        return GW_OK;
    }
    while ((kr->count + 1) * 2 > cap) {
        cap *= 2;
    }
    slots = calloc(cap, sizeof(*slots));
    if (slots == NULL) {
        return GW_ERR;
    }
    kr->slots = slots;
    kr->cap = cap;
    kr->tombs = 0;
    for (i = 0; i < oldcap; i++) {
        struct gw_kr_entry *e = old[i];

        if (e != NULL && e != GW_KR_TOMB) {
            slots[gw_kr_find(kr, e->id + e->skip, e->idlen - e->skip,
                             e->hash, &found)] = e;
        }
    }
    free(old);
    return GW_OK;
}

/* Inserts e, replacing (and freeing) an entry with the same id. */
static int
gw_kr_insert(struct gw_keyring *kr, struct gw_kr_entry *e)
{
    int found;
    size_t i;

    if (gw_kr_reserve(kr) != GW_OK) {
        return GW_ERR;
    }
    i = gw_kr_find(kr, e->id + e->skip, e->idlen - e->skip, e->hash,
                   &found);
    if (found) {
        gw_kr_entry_free(kr->slots[i]);
    } else {
        if (kr->slots[i] == GW_KR_TOMB) {
            kr->tombs--;
        }
        kr->count++;
    }
    kr->slots[i] = e;
    return GW_OK;
}

static void
gw_kr_clear(struct gw_keyring *kr)
{
    size_t i;

    for (i = 0; i < kr->cap; i++) {
        gw_kr_entry_free(kr->slots[i]);
    }
    free(kr->slots);
    kr->slots = NULL;
    kr->cap = kr->count = kr->tombs = 0;
}

/* Builds an entry for id from the key or certificate handle at idx, with
 * the validity window not_before / not_after (epoch s; negative: the
 * certificate's own, or unbounded for a key). Returns NULL with msg set.
 * Never raises: callers hold C memory (replace()'s new set) around it. */
static struct gw_kr_entry *
gw_kr_entry_new(lua_State *L, const char *id, size_t idlen, int idx,
                double not_before, double not_after, char *msg,
                size_t msglen)
{
    struct gw_key *k = gw_testudata(L, idx, GW_KEY_MT);
    struct gw_cert *c = gw_testudata(L, idx, GW_CERT_MT);
    struct gw_keyinfo *src;
    struct gw_kr_entry *e;
    const char *kind;
    size_t i;
    int pubkey_id;

    src = k != NULL ? &k->ki : (c != NULL ? &c->ki : NULL);
    if (src == NULL || src->pkey == NULL) {
        snprintf(msg, msglen, "expected an open key or certificate "
                 "handle with an RSA or SM2 key");
        return NULL;
    }
    e = calloc(1, sizeof(*e));
    if (e == NULL || (e->id = malloc(idlen + 1)) == NULL) {
        free(e);
        snprintf(msg, msglen, "out of memory");
        return NULL;
    }
    pubkey_id = gw_kr_is_pub_id(id, idlen);
    for (i = 0; i < idlen; i++) {
        /* Hex serials compare case-insensitively: store uppercase. */
        e->id[i] = pubkey_id ? id[i] : (char)toupper((unsigned char)id[i]);
    }
    e->id[idlen] = '\0';
    e->idlen = idlen;
    e->skip = pubkey_id ? 0 : gw_kr_skip(e->id, idlen);
    e->hash = gw_hash_fnv1a(e->id + e->skip, idlen - e->skip);
    if (gw_keyinfo_init(&e->ki, src->pkey, 0, &kind, msg, msglen)
        != GW_OK)
    {
        gw_kr_entry_free(e);
        return NULL;
    }
    e->ki.is_private = 0;          /* verify only, even if given a pair */
    if (c != NULL) {
        X509_up_ref(c->x509);
        e->cert = c->x509;
        e->not_before = gw_crypto_asn1_epoch(X509_get0_notBefore(c->x509));
        /* as cert:not_after() gives it: an end before 1970 is negative
         * (one that does not read, 0); either way an end, so expired,
         * not "unbounded" as a key without one is */
        e->not_after = gw_crypto_asn1_epoch(X509_get0_notAfter(c->x509));
        e->has_end = 1;
    }
    if (not_before >= 0) {
        e->not_before = not_before;
    }
    if (not_after >= 0) {
        e->not_after = not_after;
        e->has_end = not_after > 0;     /* 0: unbounded */
    }
    return e;
}

static const char *const gw_kr_put_opts[] = {
    "not_before", "not_after", NULL
};

/* The window of put(): opts at idx (nil or a table of epoch seconds).
 * fn names the public function in the raised message. */
static void
gw_kr_opts(lua_State *L, int idx, const char *fn, double *nb, double *na)
{
    *nb = -1;
    *na = -1;
    if (lua_isnoneornil(L, idx)) {
        return;
    }
    gw_opts_known(L, idx, fn, "opts", gw_kr_put_opts);
    *nb = gw_opt_number(L, idx, fn, "not_before", -1);
    *na = gw_opt_number(L, idx, fn, "not_after", -1);
}

/* Pushes t[k] for the table at idx without metamethods: replace() reads
 * each field twice (check, then build with C memory held), and an __index
 * could return something else the second time or raise. */
static void
gw_kr_rawfield(lua_State *L, int idx, const char *k)
{
    lua_pushstring(L, k);
    lua_rawget(L, idx < 0 ? idx - 1 : idx);
}

static const char *
gw_kr_check_id(lua_State *L, int idx, size_t *len)
{
    const char *id = luaL_checklstring(L, idx, len);

    luaL_argcheck(L, *len > 0 && *len <= GW_KEYRING_MAX_ID, idx,
                  "id must be 1..128 bytes");
    return id;
}

/* ---- the ring a call acts on ------------------------------------------- */

/*
 * Every operation below is written once, as gw_kr_op_*(L, kr, b): b is
 * the stack offset of its first argument (0 for the module functions,
 * which act on the worker's default ring, their upvalue; 1 for the ring
 * methods, whose argument 1 is the ring). Raising for misuse is fine in
 * both: no C memory is held at those points.
 */

static int
lkeyring_gc(lua_State *L)
{
    struct gw_keyring *kr = gw_testudata(L, 1, GW_KEYRING_MT);

    if (kr == NULL) {
        return 0;
    }

    gw_kr_clear(kr);
    kr->closed = 1;
    return 0;
}

/* The default ring of this Lua state: the module functions' upvalue. */
static struct gw_keyring *
gw_kr_default(lua_State *L)
{
    return lua_touserdata(L, lua_upvalueindex(1));
}

/* The ring a method is called on; raises when idx 1 is not an open ring. */
static struct gw_keyring *
gw_kr_self(lua_State *L)
{
    struct gw_keyring *kr = gw_checkudata(L, 1, GW_KEYRING_MT);

    if (kr->closed) {
        luaL_argerror(L, 1, "key ring is closed");
    }
    return kr;
}

/* Pushes a new, empty ring userdata (with its metatable). */
static struct gw_keyring *
gw_kr_new(lua_State *L)
{
    struct gw_keyring *kr = lua_newuserdata(L, sizeof(*kr));

    memset(kr, 0, sizeof(*kr));
    luaL_getmetatable(L, GW_KEYRING_MT);
    lua_setmetatable(L, -2);
    return kr;
}

/* Pushes the default ring, creating it on first use (anchored in the
 * registry so every require in this state sees the same ring). */
static void
gw_kr_push_default(lua_State *L)
{
    lua_getfield(L, LUA_REGISTRYINDEX, GW_KEYRING_KEY);
    if (lua_touserdata(L, -1) != NULL) {
        return;
    }
    lua_pop(L, 1);
    gw_kr_new(L);
    lua_pushvalue(L, -1);
    lua_setfield(L, LUA_REGISTRYINDEX, GW_KEYRING_KEY);
}

/* ---- operations -------------------------------------------------------- */

/*
 * syntax: id = ring:put(id, key_or_cert[, { not_before = s,
 *                                           not_after = s }])
 * id nil with a certificate: its serial. Replaces an entry atomically.
 * returns: the id as stored, or nil, err (malformed, internal).
 */
static int
gw_kr_op_put(lua_State *L, struct gw_keyring *kr, int b)
{
    struct gw_kr_entry *e;
    char msg[GW_ERRMSG_MAX], serial[GW_KEYRING_MAX_ID + 1];
    const char *id;
    size_t len;
    double nb, na;

    gw_kr_opts(L, b + 3, b == 0 ? "keyring.put" : "ring:put", &nb, &na);
    if (lua_isnil(L, b + 1)) {
        struct gw_cert *c = gw_cert_check(L, b + 2);
        int n = gw_x509_serial_hex(c->x509, serial, sizeof(serial));

        if (n < 0 || n > GW_KEYRING_MAX_ID) {
            return gw_push_error(L, "malformed", 0, "keyring put: "
                                 "certificate serial unusable");
        }
        id = serial;
        len = (size_t)n;
    } else {
        id = gw_kr_check_id(L, b + 1, &len);
    }
    e = gw_kr_entry_new(L, id, len, b + 2, nb, na, msg, sizeof(msg));
    if (e == NULL) {
        return luaL_argerror(L, b + 2, msg);
    }
    if (gw_kr_insert(kr, e) != GW_OK) {
        gw_kr_entry_free(e);
        return gw_push_error(L, "internal", 1, "keyring put: out of memory");
    }
    lua_pushstring(L, e->id);
    return 1;
}

static const char *const gw_kr_item_fields[] = {
    "id", "key", "not_before", "not_after", NULL
};

/*
 * syntax: ok, err = ring:replace({ { id = ..., key = handle,
 *                                    not_before =, not_after = }, ... })
 * Swaps the whole set at once (rotation); on any error nothing changes.
 */
static int
gw_kr_op_replace(lua_State *L, struct gw_keyring *kr, int b)
{
    struct gw_keyring fresh;
    char msg[GW_ERRMSG_MAX];
    int i, n, t = b + 1;
    const char *fn = b == 0 ? "keyring.replace" : "ring:replace";

    if (!lua_istable(L, t)) {
        return gw_raise(L, "%s: items must be a table", fn);
    }
    n = (int)lua_objlen(L, t);
    /* Check every item before holding C memory, so errors can raise. */
    for (i = 1; i <= n; i++) {
        size_t len;

        lua_rawgeti(L, t, i);
        if (!lua_istable(L, -1)) {
            return gw_raise(L, "%s: items[%d] must be a table", fn, i);
        }
        lua_pushfstring(L, "items[%d]", i);
        gw_opts_known(L, -2, fn, lua_tostring(L, -1), gw_kr_item_fields);
        lua_pop(L, 1);
        gw_kr_rawfield(L, -1, "id");
        gw_kr_check_id(L, lua_gettop(L), &len);
        gw_kr_rawfield(L, -2, "key");
        if (gw_testudata(L, -1, GW_KEY_MT) == NULL) {
            gw_cert_check(L, lua_gettop(L));
        }
        gw_kr_rawfield(L, -3, "not_before");
        gw_kr_rawfield(L, -4, "not_after");
        if ((!lua_isnil(L, -2) && lua_type(L, -2) != LUA_TNUMBER)
            || (!lua_isnil(L, -1) && lua_type(L, -1) != LUA_TNUMBER)) {
            return gw_raise(L, "%s: items[%d].%s must be a number", fn, i,
                            lua_isnil(L, -2) || lua_type(L, -2)
                            == LUA_TNUMBER ? "not_after" : "not_before");
        }
        lua_pop(L, 5);
    }
    memset(&fresh, 0, sizeof(fresh));
    for (i = 1; i <= n; i++) {
        struct gw_kr_entry *e;
        const char *id;
        size_t len;
        double nb = -1, na = -1;

        lua_rawgeti(L, t, i);
        gw_kr_rawfield(L, -1, "not_before");
        if (lua_isnumber(L, -1)) {
            nb = lua_tonumber(L, -1);
        }
        gw_kr_rawfield(L, -2, "not_after");
        if (lua_isnumber(L, -1)) {
            na = lua_tonumber(L, -1);
        }
        gw_kr_rawfield(L, -3, "id");
        id = lua_tolstring(L, -1, &len);
        gw_kr_rawfield(L, -4, "key");
        e = gw_kr_entry_new(L, id, len, lua_gettop(L), nb, na, msg,
                            sizeof(msg));
        lua_pop(L, 5);
        if (e == NULL || gw_kr_insert(&fresh, e) != GW_OK) {
            gw_kr_entry_free(e);
            gw_kr_clear(&fresh);
            return gw_push_error(L, "malformed", 0, "keyring replace: item "
                                 "%d: %s", i, e == NULL ? msg
                                 : "out of memory");
        }
    }
    gw_kr_clear(kr);
    kr->slots = fresh.slots;
    kr->cap = fresh.cap;
    kr->count = fresh.count;
    kr->tombs = fresh.tombs;
    lua_pushboolean(L, 1);
    return 1;
}

/* t (epoch seconds) as 2026-12-07T06:39:55Z into buf, for a message; the
 * number itself when gmtime cannot place it */
static void
kr_utc(double t, char *buf, size_t len)
{
    time_t s;
    struct tm tm;

    if (t >= -6e10 && t <= 2.5e11) {      /* (NaN is neither) */
        s = (time_t) t;
        if (gmtime_r(&s, &tm) != NULL
            && strftime(buf, len, "%Y-%m-%dT%H:%M:%SZ", &tm) != 0)
        {
            return;
        }
    }
    snprintf(buf, len, "%.0f", t);
}

/* Looks up and checks the validity window; pushes an error and returns
 * NULL on failure (*nret = 2). */
static struct gw_kr_entry *
gw_kr_lookup(lua_State *L, struct gw_keyring *kr, int idx, int at_idx,
             int *nret)
{
    size_t len;
    const char *id = luaL_checklstring(L, idx, &len);
    struct gw_kr_entry *e = gw_kr_get(kr, id, len);
    double now;

    if (e == NULL) {
        *nret = gw_push_error(L, "unknown_serial", 0, "no verifier for "
                              "Wechatpay-Serial %.128s (%d known): "
                              "refresh platform certificates, or configure "
                              "the WeChat Pay public key and its id", id,
                              (int)kr->count);
        return NULL;
    }
    now = lua_isnoneornil(L, at_idx) ? (double)time(NULL)
                                     : luaL_checknumber(L, at_idx);
    if (e->has_end && now > e->not_after) {
        char at[32];

        kr_utc(e->not_after, at, sizeof(at));
        *nret = gw_push_error(L, "cert_expired", 0, "verifier %s expired "
                              "at %s (%.0f s before this host's clock): "
                              "download the current platform certificate",
                              e->id, at, now - e->not_after);
        return NULL;
    }
    if (e->not_before > 0 && now < e->not_before) {
        char at[32];

        kr_utc(e->not_before, at, sizeof(at));
        *nret = gw_push_error(L, "cert_not_yet_valid", 0, "verifier %s is "
                              "valid from %s, %.0f s after this host's "
                              "clock: check the clock (NTP); a certificate "
                              "is used from its start", e->id, at,
                              e->not_before - now);
        return NULL;
    }
    return e;
}

/* syntax: handle, err = ring:get(id[, at]) -- cert or public key */
static int
gw_kr_op_get(lua_State *L, struct gw_keyring *kr, int b)
{
    struct gw_kr_entry *e;
    int n = 0;

    e = gw_kr_lookup(L, kr, b + 1, b + 2, &n);
    if (e == NULL) {
        return n;
    }
    if (e->cert != NULL) {
        if (gw_cert_push(L, e->cert) == NULL) {
            return gw_push_error(L, "internal", 1, "out of memory");
        }
    } else if (gw_key_push(L, e->ki.pkey, 0) == NULL) {
        return gw_push_error(L, "internal", 1, "out of memory");
    }
    return 1;
}

/*
 * syntax: ok, err = ring:verify(id, data, sig[, alg[, at]]) -- raw sig
 *         ok, err = ring:verify_base64(id, data, sig_b64[, alg[, at]])
 * returns: true, or nil, err with err.kind unknown_serial, cert_expired,
 * cert_not_yet_valid, signature_mismatch (also for a signature that is
 * not strict base64, as crypto.verify_base64), key_type_mismatch,
 * unsupported_algorithm.
 */
static int
gw_kr_op_verify(lua_State *L, struct gw_keyring *kr, int b, int b64)
{
    struct gw_kr_entry *e;
    size_t len, siglen;
    const char *data = luaL_checklstring(L, b + 2, &len);
    const char *sig = luaL_checklstring(L, b + 3, &siglen);
    const char *alg_name = luaL_optstring(L, b + 4, NULL);
    const char *kind = "internal";
    char msg[GW_ERRMSG_MAX] = "";
    unsigned char raw[1024];
    long dn;
    int alg, n = 0;

    e = gw_kr_lookup(L, kr, b + 1, b + 5, &n);
    if (e == NULL) {
        return n;
    }
    if (alg_name == NULL) {
        alg = e->ki.type == GW_KEY_RSA ? GW_ALG_SHA256_RSA : GW_ALG_SM2_SM3;
    } else if ((alg = gw_crypto_alg(alg_name)) == 0) {
        return gw_push_error(L, "unsupported_algorithm", 0, "verify: "
                             "unknown algorithm %s", alg_name);
    }
    if (b64) {
        if (siglen > sizeof(raw) / 3 * 4
            || (dn = gw_base64_decode(sig, siglen, raw)) < 0)
        {
            return gw_push_error(L, "signature_mismatch", 0, "verify %s: "
                                 "signature is not valid base64", e->id);
        }
        sig = (const char *)raw;
        siglen = (size_t)dn;
    }
    if (gw_crypto_verify(&e->ki, alg, (const unsigned char *)data, len,
                         (const unsigned char *)sig, siglen, &kind, msg,
                         sizeof(msg)) != GW_OK)
    {
        return gw_push_error(L, kind, 0, "verify %s: %s", e->id, msg);
    }
    lua_pushboolean(L, 1);
    return 1;
}

/*
 * syntax: ok, err = ring:verify_lines_base64(id, sig_b64, alg, at, ...)
 * Verifies sig_b64 over the lines given, each followed by "\n" -- the
 * signing string WeChat Pay uses (TIMESTAMP, NONCE, BODY for answers and
 * notifications) -- without making that string in Lua (no copy of the
 * body to intern and collect). alg, at: as verify_base64 (nil: the
 * key's own algorithm, now). returns: as verify_base64.
 */
static int
lring_verify_lines_base64(lua_State *L)
{
    struct gw_keyring *kr = gw_kr_self(L);
    struct gw_kr_entry *e;
    size_t siglen, total = 0, off = 0;
    const char *sig = luaL_checklstring(L, 3, &siglen);
    const char *alg_name = luaL_optstring(L, 4, NULL);
    const char *kind = "internal";
    char msg[GW_ERRMSG_MAX] = "";
    unsigned char raw[1024];
    char stack[4096];
    char *buf;
    long dn;
    int alg, n = 0, top = lua_gettop(L), rc;

    for (int i = 6; i <= top; i++) {
        size_t l;

        luaL_checklstring(L, i, &l);
        total += l + 1;
    }
    e = gw_kr_lookup(L, kr, 2, 5, &n);
    if (e == NULL) {
        return n;
    }
    if (alg_name == NULL) {
        alg = e->ki.type == GW_KEY_RSA ? GW_ALG_SHA256_RSA : GW_ALG_SM2_SM3;
    } else if ((alg = gw_crypto_alg(alg_name)) == 0) {
        return gw_push_error(L, "unsupported_algorithm", 0, "verify: "
                             "unknown algorithm %s", alg_name);
    }
    if (siglen > sizeof(raw) / 3 * 4
        || (dn = gw_base64_decode(sig, siglen, raw)) < 0)
    {
        return gw_push_error(L, "signature_mismatch", 0, "verify %s: "
                             "signature is not valid base64", e->id);
    }
    buf = total <= sizeof(stack) ? stack : malloc(total);
    if (buf == NULL) {
        return gw_push_error(L, "internal", 1, "out of memory");
    }
    for (int i = 6; i <= top; i++) {
        size_t l;
        const char *p = lua_tolstring(L, i, &l);

        memcpy(buf + off, p, l);
        off += l;
        buf[off++] = '\n';
    }
    rc = gw_crypto_verify(&e->ki, alg, (const unsigned char *)buf, total,
                          raw, (size_t)dn, &kind, msg, sizeof(msg));
    if (buf != stack) {
        free(buf);
    }
    if (rc != GW_OK) {
        return gw_push_error(L, kind, 0, "verify %s: %s", e->id, msg);
    }
    lua_pushboolean(L, 1);
    return 1;
}

/* syntax: removed = ring:remove(id) */
static int
gw_kr_op_remove(lua_State *L, struct gw_keyring *kr, int b)
{
    size_t len;
    const char *id = luaL_checklstring(L, b + 1, &len);
    /* matched as lookups match: put() stores hex serials uppercase */
    size_t i = gw_kr_slot(kr, id, len);

    if (i != (size_t)-1) {
        gw_kr_entry_free(kr->slots[i]);
        kr->slots[i] = GW_KR_TOMB;
        kr->count--;
        kr->tombs++;
    }
    lua_pushboolean(L, i != (size_t)-1);
    return 1;
}

static int
gw_kr_cmp(const void *a, const void *b)
{
    const struct gw_kr_entry *x = *(const struct gw_kr_entry * const *)a;
    const struct gw_kr_entry *y = *(const struct gw_kr_entry * const *)b;

    return strcmp(x->id, y->id);
}

/* syntax: list = ring:list() -- sorted by id: { id, source, key_type,
 *         key_bits, not_before, not_after, fingerprint }; not_after 0
 *         for no end (a key put without one), else the end as given or
 *         the certificate's own, as cert:not_after() (negative before
 *         1970) */
static int
gw_kr_op_list(lua_State *L, struct gw_keyring *kr, int b)
{
    struct gw_kr_entry **v;
    size_t i, n = 0;
    char fpr[65];

    (void)b;
    v = malloc((kr->count + 1) * sizeof(*v));
    if (v == NULL) {
        return gw_push_error(L, "internal", 1, "out of memory");
    }
    for (i = 0; i < kr->cap; i++) {
        if (kr->slots[i] != NULL && kr->slots[i] != GW_KR_TOMB) {
            v[n++] = kr->slots[i];
        }
    }
    qsort(v, n, sizeof(*v), gw_kr_cmp);
    lua_createtable(L, (int)n, 0);
    for (i = 0; i < n; i++) {
        lua_createtable(L, 0, 7);
        lua_pushstring(L, v[i]->id);
        lua_setfield(L, -2, "id");
        lua_pushstring(L, v[i]->cert != NULL ? "certificate"
                                             : "public_key");
        lua_setfield(L, -2, "source");
        lua_pushstring(L, v[i]->ki.type == GW_KEY_RSA ? "RSA" : "SM2");
        lua_setfield(L, -2, "key_type");
        lua_pushinteger(L, v[i]->ki.bits);
        lua_setfield(L, -2, "key_bits");
        lua_pushnumber(L, v[i]->not_before);
        lua_setfield(L, -2, "not_before");
        lua_pushnumber(L, v[i]->not_after);
        lua_setfield(L, -2, "not_after");
        if (gw_crypto_key_fingerprint(v[i]->ki.pkey, fpr) == GW_OK) {
            lua_pushstring(L, fpr);
            lua_setfield(L, -2, "fingerprint");
        }
        lua_rawseti(L, -2, (int)i + 1);
    }
    free(v);
    return 1;
}

/* syntax: id = ring:newest([at]) -- the valid certificate entry with the
 * latest not_before (for encryption and the request Wechatpay-Serial), or
 * a public-key entry when no certificate is valid; nil if empty. */
static int
gw_kr_op_newest(lua_State *L, struct gw_keyring *kr, int b)
{
    double now = luaL_optnumber(L, b + 1, (double)time(NULL));
    struct gw_kr_entry *best = NULL;
    size_t i;

    for (i = 0; i < kr->cap; i++) {
        struct gw_kr_entry *e = kr->slots[i];

        if (e == NULL || e == GW_KR_TOMB
            || (e->has_end && now > e->not_after)
            || (e->not_before > 0 && now < e->not_before))
        {
            continue;
        }
        if (best == NULL || (e->cert != NULL && best->cert == NULL)
            || ((e->cert != NULL) == (best->cert != NULL)
                && e->not_before > best->not_before))
        {
            best = e;
        }
    }
    if (best == NULL) {
        lua_pushnil(L);
    } else {
        lua_pushstring(L, best->id);
    }
    return 1;
}

/* syntax: n = ring:count() */
static int
gw_kr_op_count(lua_State *L, struct gw_keyring *kr, int b)
{
    (void)b;
    lua_pushinteger(L, (lua_Integer)kr->count);
    return 1;
}

/* syntax: ring:clear() -- drops every entry; the ring stays usable */
static int
gw_kr_op_clear(lua_State *L, struct gw_keyring *kr, int b)
{
    (void)L;
    (void)b;
    gw_kr_clear(kr);
    return 0;
}

/* ---- Lua entry points: module functions and ring methods ---------------- */

#define GW_KR_ENTRY(op)                                                 \
    static int lkeyring_##op(lua_State *L)                              \
    {                                                                   \
        return gw_kr_op_##op(L, gw_kr_default(L), 0);                   \
    }                                                                   \
    static int lring_##op(lua_State *L)                                 \
    {                                                                   \
        return gw_kr_op_##op(L, gw_kr_self(L), 1);                      \
    }

GW_KR_ENTRY(put)
GW_KR_ENTRY(replace)
GW_KR_ENTRY(get)
GW_KR_ENTRY(remove)
GW_KR_ENTRY(list)
GW_KR_ENTRY(newest)
GW_KR_ENTRY(count)
GW_KR_ENTRY(clear)

static int
lkeyring_verify(lua_State *L)
{
    return gw_kr_op_verify(L, gw_kr_default(L), 0, 0);
}

static int
lring_verify(lua_State *L)
{
    return gw_kr_op_verify(L, gw_kr_self(L), 1, 0);
}

static int
lkeyring_verify_base64(lua_State *L)
{
    return gw_kr_op_verify(L, gw_kr_default(L), 0, 1);
}

static int
lring_verify_base64(lua_State *L)
{
    return gw_kr_op_verify(L, gw_kr_self(L), 1, 1);
}

/*
 * syntax: ring = keyring.new()
 * returns: an empty ring with the module's operations as methods (one per
 * signing merchant, so merchants never see each other's verifiers). Its
 * entries are freed by ring:close() or when the ring is collected; close()
 * is safe twice, any other method on a closed ring raises.
 */
static int
lkeyring_new(lua_State *L)
{
    gw_kr_new(L);
    return 1;
}

/* ring:close(): frees every entry now; safe to call twice. */
static int
lring_close(lua_State *L)
{
    return lkeyring_gc(L);
}

static int
lring_tostring(lua_State *L)
{
    struct gw_keyring *kr = gw_checkudata(L, 1, GW_KEYRING_MT);

    if (kr->closed) {
        lua_pushliteral(L, "paygate.keyring.ring (closed)");
    } else {
        lua_pushfstring(L, "paygate.keyring.ring: %d entries",
                        (int)kr->count);
    }
    return 1;
}

static const luaL_Reg lring_methods[] = {
    { "put", lring_put },
    { "replace", lring_replace },
    { "get", lring_get },
    { "verify", lring_verify },
    { "verify_base64", lring_verify_base64 },
    { "verify_lines_base64", lring_verify_lines_base64 },
    { "remove", lring_remove },
    { "list", lring_list },
    { "newest", lring_newest },
    { "count", lring_count },
    { "clear", lring_clear },
    { "close", lring_close },
    { NULL, NULL }
};

static const luaL_Reg lkeyring_funcs[] = {
    { "put", lkeyring_put },
    { "replace", lkeyring_replace },
    { "get", lkeyring_get },
    { "verify", lkeyring_verify },
    { "verify_base64", lkeyring_verify_base64 },
    { "remove", lkeyring_remove },
    { "list", lkeyring_list },
    { "newest", lkeyring_newest },
    { "count", lkeyring_count },
    { "clear", lkeyring_clear },
    { NULL, NULL }
};

int
luaopen_paygate_keyring(lua_State *L)
{
    gw_objects_register(L);
    if (luaL_newmetatable(L, GW_KEYRING_MT)) {
        lua_pushcfunction(L, lkeyring_gc);
        lua_setfield(L, -2, "__gc");
        lua_pushcfunction(L, lring_tostring);
        lua_setfield(L, -2, "__tostring");
        lua_newtable(L);
        luaL_register(L, NULL, lring_methods);
        lua_setfield(L, -2, "__index");
    }
    lua_pop(L, 1);
    lua_newtable(L);
    gw_kr_push_default(L);
    luaL_setfuncs(L, lkeyring_funcs, 1);
    lua_pushcfunction(L, lkeyring_new);
    lua_setfield(L, -2, "new");
    return 1;
}
