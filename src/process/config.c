/*
 * config.c -- see config.h.
 */
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <luajit.h>
#include <lualib.h>

#include "config.h"
#include "sockaddr.h"
#include "dns.h"
#include "log.h"
#include "loop.h"
#include "lstate.h"
#include "metrics.h"
#include "tls.h"
#include "watchdog.h"

void
gw_opts_defaults(struct gw_opts *o)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);

    memset(o, 0, sizeof(*o));
    snprintf(o->listen, sizeof(o->listen), "127.0.0.1:8080");
    snprintf(o->admin, sizeof(o->admin), "127.0.0.1:9090");
    o->workers = n > 0 ? (int) n : 1;
    o->shutdown_timeout = 30;
    o->upgrade_timeout = 60;
    o->loop_stall = GW_LOOP_STALL_DEFAULT;
    o->log_level = GW_LOG_INFO;
    gw_server_conf_defaults(&o->server);
    o->server.on_request = gw_metrics_request;   /* counted per worker */
    o->server.on_event = gw_metrics_edge;
    snprintf(o->tls_protocols, sizeof(o->tls_protocols), "%s",
             GW_TLS_PROTOCOLS);
    snprintf(o->tls_ciphers, sizeof(o->tls_ciphers), "%s", GW_TLS_CIPHERS);
    o->tls_session_cache = 4096;
    o->tls_session_tickets = 1;
    o->tls_ticket_rotation = 3600;
}

struct key {
    const char *name;
    int         type;           /* 's' string, 'n' number, 'i' integer,
                                   '0' integer that may be 0 (off),
                                   'b' boolean, 'z' size in bytes,
                                   'w' seconds of at least
                                   GW_WATCHDOG_MIN, or false or 0 (off) */
    size_t      off;
    size_t      size;           /* for strings: buffer size */
};

#define S(f) offsetof(struct gw_opts, f), sizeof(((struct gw_opts *) 0)->f)
#define N(f) offsetof(struct gw_opts, f), 0

static const struct key top_keys[] = {
    { "listen", 's', S(listen) },
    { "admin", 's', S(admin) },
    { "pid_file", 's', S(pid_file) },
    { "resolver", 's', S(resolver) },
    { "workers", 'i', N(workers) },
    { "shutdown_timeout", 'n', N(shutdown_timeout) },
    { "upgrade_timeout", 'n', N(upgrade_timeout) },
    { NULL, 0, 0, 0 }
};

static const struct key tls_keys[] = {
    { "cert", 's', S(tls_cert) },
    { "key", 's', S(tls_key) },
    { "client_ca", 's', S(tls_client_ca) },
    { "ecdsa_cert", 's', S(tls_ecdsa_cert) },
    { "ecdsa_key", 's', S(tls_ecdsa_key) },
    { "protocols", 's', S(tls_protocols) },
    { "ciphers", 's', S(tls_ciphers) },
    { "ciphersuites", 's', S(tls_ciphersuites) },
    { "session_cache", '0', N(tls_session_cache) },   /* 0: no cache */
    { "session_tickets", 'b', N(tls_session_tickets) },
    { "ticket_key_rotation", 'n', N(tls_ticket_rotation) },
    { NULL, 0, 0, 0 }
};

#define L_(f) offsetof(struct gw_opts, server.f), 0
static const struct key limit_keys[] = {
    { "header_bytes", 'z', L_(max_header_bytes) },
    { "body_bytes", 'z', L_(max_body_bytes) },
    { "body_memory", 'z', L_(max_body_memory) },
    { "connections", 'i', L_(max_connections) },
    { "header_timeout", 'n', L_(header_timeout) },
    { "body_timeout", 'n', L_(body_timeout) },
    { "body_min_rate", '0', L_(body_min_rate) },
    { "write_timeout", 'n', L_(write_timeout) },
    { "keepalive_timeout", 'n', L_(keepalive_timeout) },
    { "keepalive_requests", 'i', L_(keepalive_requests) },
    { "request_timeout", 'n', L_(request_timeout) },
    { "loop_stall", 'w', N(loop_stall) },
    { NULL, 0, 0, 0 }
};

/* The top-level keys the runtime reads: top_keys and these. */
static const char *const other_top_keys[] = {
    "log_level", "access_log", "tls", "shared", "limits", NULL
};

/* Whether name is one slip from key (but not key): the same but for case
 * or '-' for '_', or, for a key of 4 characters or more, one character
 * left out, added, changed or two swapped (two such for 8 or more). */
static int
near_key(const char *name, const char *key)
{
    size_t n = strlen(name), k = strlen(key);
    unsigned char d[66][66];
    size_t most = k >= 8 ? 2 : k >= 4 ? 1 : 0;
    int same = n == k;

    if (strcmp(name, key) == 0) {
        return 0;
    }
    for (size_t i = 0; same && i < n; i++) {
        int a = name[i] == '-' ? '_' : tolower((unsigned char) name[i]);

        same = a == key[i];
    }
    if (same) {
        return 1;
    }
    if (most == 0 || n > 64 || (n > k ? n - k : k - n) > most) {
        return 0;
    }
    /* optimal string alignment distance */
    for (size_t i = 0; i <= n; i++) {
        d[i][0] = (unsigned char) i;
    }
    for (size_t j = 0; j <= k; j++) {
        d[0][j] = (unsigned char) j;
    }
    for (size_t i = 1; i <= n; i++) {
        for (size_t j = 1; j <= k; j++) {
            int cost = name[i - 1] != key[j - 1];
            int v = d[i - 1][j] + 1;

            if (d[i][j - 1] + 1 < v) {
                v = d[i][j - 1] + 1;
            }
            if (d[i - 1][j - 1] + cost < v) {
                v = d[i - 1][j - 1] + cost;
            }
            if (i > 1 && j > 1 && name[i - 1] == key[j - 2]
                && name[i - 2] == key[j - 1] && d[i - 2][j - 2] + 1 < v) {
                v = d[i - 2][j - 2] + 1;
            }
            d[i][j] = (unsigned char) v;
        }
    }
    return d[n][k] <= most;
}

/* Names in o->near_miss each top-level key of table t that is not a
 * runtime key but one slip from one: a typo that would otherwise leave
 * the runtime's default in place without a word. */
static void
find_near_misses(lua_State *L, int t, struct gw_opts *o)
{
    o->near_miss[0] = '\0';
    lua_pushnil(L);
    while (lua_next(L, t) != 0) {
        const char *name, *hit = NULL;
        int known = 0;

        lua_pop(L, 1);
        if (lua_type(L, -1) != LUA_TSTRING) {
            continue;
        }
        name = lua_tostring(L, -1);
        for (const struct key *x = top_keys; x->name != NULL; x++) {
            known = known || strcmp(x->name, name) == 0;
            if (hit == NULL && near_key(name, x->name)) {
                hit = x->name;
            }
        }
        for (const char *const *x = other_top_keys; *x != NULL; x++) {
            known = known || strcmp(*x, name) == 0;
            if (hit == NULL && near_key(name, *x)) {
                hit = *x;
            }
        }
        if (!known && hit != NULL) {
            size_t len = strlen(o->near_miss);

            snprintf(o->near_miss + len, sizeof(o->near_miss) - len,
                     "%s'%.40s' (did you mean '%s'?)", len ? ", " : "",
                     name, hit);
        }
    }
}

/* Reads t[k] per keys; strict == 1 rejects unknown keys. */
static int
read_keys(lua_State *L, int t, const char *where, const struct key *keys,
          int strict, struct gw_opts *o, char *err, size_t errlen)
{
    lua_pushnil(L);
    while (lua_next(L, t) != 0) {
        const struct key *k = NULL;
        const char *name;

        if (lua_type(L, -2) != LUA_TSTRING) {
            lua_pop(L, 1);
            if (strict) {
                snprintf(err, errlen, "%s: keys must be strings", where);
                return GW_ERR;
            }
            continue;
        }
        name = lua_tostring(L, -2);
        for (const struct key *x = keys; x->name != NULL; x++) {
            if (strcmp(x->name, name) == 0) {
                k = x;
                break;
            }
        }
        if (k == NULL) {
            lua_pop(L, 1);
            if (strict) {
                const char *hit = NULL;

                for (const struct key *x = keys; x->name != NULL; x++) {
                    if (near_key(name, x->name)) {
                        hit = x->name;
                        break;
                    }
                }
                snprintf(err, errlen, "%s: unknown key '%.64s'%s%s%s", where,
                         name, hit ? " (did you mean '" : "", hit ? hit : "",
                         hit ? "'?)" : "");
                return GW_ERR;
            }
            continue;
        }
        if (k->type == 's') {
            size_t len;
            const char *v;

            if (lua_type(L, -1) != LUA_TSTRING) {
                snprintf(err, errlen, "%s.%s must be a string", where, name);
                return GW_ERR;
            }
            v = lua_tolstring(L, -1, &len);
            if (len >= k->size) {
                snprintf(err, errlen, "%s.%s is too long", where, name);
                return GW_ERR;
            }
            if (memchr(v, '\0', len) != NULL) {
                /* a path cut at the NUL would name another file */
                snprintf(err, errlen, "%s.%s has a NUL byte", where, name);
                return GW_ERR;
            }
            memcpy((char *) o + k->off, v, len + 1);
        } else if (k->type == 'b') {
            if (lua_type(L, -1) != LUA_TBOOLEAN) {
                snprintf(err, errlen, "%s.%s must be true or false", where,
                         name);
                return GW_ERR;
            }
            *(int *) ((char *) o + k->off) = lua_toboolean(L, -1);
        } else if (k->type == 'w') {
            /* a watchdog's limit: false (or 0) turns it off; true says
             * nothing of how long, so it is refused with the rest */
            double v = lua_type(L, -1) == LUA_TNUMBER ? lua_tonumber(L, -1)
                                                      : -1;

            if (lua_type(L, -1) == LUA_TBOOLEAN && !lua_toboolean(L, -1)) {
                v = 0;
            }
            if (!(v == 0 || (v >= GW_WATCHDOG_MIN && v <= 1e9))) {
                snprintf(err, errlen, "%s.%s must be a number of seconds "
                         "(at least %d), or false or 0 (off)", where, name,
                         GW_WATCHDOG_MIN);
                return GW_ERR;
            }
            *(double *) ((char *) o + k->off) = v;
        } else {
            double v;

            if (lua_type(L, -1) != LUA_TNUMBER) {
                snprintf(err, errlen, "%s.%s must be a number", where, name);
                return GW_ERR;
            }
            v = lua_tonumber(L, -1);
            if (!(v > 0 || (k->type == '0' && v == 0)) || v > 1e12
                || (k->type != 'n' && v != (double) (long long) v)) {
                snprintf(err, errlen, "%s.%s must be a %s", where, name,
                         k->type == 'n' ? "positive number"
                         : k->type == '0' ? "non-negative integer (0: off)"
                         : "positive integer");
                return GW_ERR;
            }
            if (k->type == 'n') {
                *(double *) ((char *) o + k->off) = v;
            } else if (k->type == 'z') {
                *(size_t *) ((char *) o + k->off) = (size_t) v;
            } else {
                if (v > 1e9) {
                    snprintf(err, errlen, "%s.%s is too large", where, name);
                    return GW_ERR;
                }
                *(int *) ((char *) o + k->off) = (int) v;
            }
        }
        lua_pop(L, 1);
    }
    return GW_OK;
}

/* shared = { name = "16m" | bytes, ... }: the shared dictionaries. */
static int
read_shared(lua_State *L, int t, struct gw_opts *o, char *err, size_t errlen)
{
    lua_pushnil(L);
    while (lua_next(L, t) != 0) {
        const char *name;
        size_t size = 0, nlen;
        int ok = 0;

        if (lua_type(L, -2) != LUA_TSTRING) {
            snprintf(err, errlen, "config.shared: keys must be names");
            return GW_ERR;
        }
        name = lua_tolstring(L, -2, &nlen);
        if (memchr(name, '\0', nlen) != NULL) {
            /* cut at the NUL: "a\0x" and "a" would be two "a" */
            snprintf(err, errlen, "config.shared: the name \"%.64s\" has a "
                                  "NUL byte in it", name);
            return GW_ERR;
        }
        if (lua_type(L, -1) == LUA_TSTRING) {
            ok = gw_shdict_parse_size(lua_tostring(L, -1), &size) == GW_OK;
        } else if (lua_type(L, -1) == LUA_TNUMBER) {
            ok = gw_shdict_size_of_number(lua_tonumber(L, -1), &size)
                 == GW_OK;
        }
        if (!ok) {
            snprintf(err, errlen, "config.shared.%.64s must be a size: "
                                  "digits and an optional unit k, m or g, "
                                  "like \"512k\" or \"16m\" (32k..4g)",
                     name);
            return GW_ERR;
        }
        if (strlen(name) >= sizeof(o->shared[0].name)
            || o->nshared == GW_SHD_MAX_DICTS) {
            snprintf(err, errlen, "config.shared: too many dictionaries or "
                                  "a name over 63 bytes");
            return GW_ERR;
        }
        snprintf(o->shared[o->nshared].name, sizeof(o->shared[0].name),
                 "%s", name);
        o->shared[o->nshared++].size = size;
        lua_pop(L, 1);
    }
    return GW_OK;
}

static int parse_addr(const char *spec, struct addrinfo **res, char *err,
                      size_t errlen);

/* The form of an address key the file gives (listen, admin): what binding
 * it at a start would refuse first (a port past 65535, a host name), said
 * now, so that neither a flag overriding it nor a reload takes a file the
 * next start without that flag refuses. Whether it binds is the start's. */
static int
check_addr_key(lua_State *L, const char *name, const char *value,
               int off_ok, char *err, size_t errlen)
{
    struct addrinfo *res = NULL;
    char why[400];

    lua_pushstring(L, name);
    lua_rawget(L, 1);    /* raw: a metatable must not run here, unprotected */
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return GW_OK;
    }
    lua_pop(L, 1);
    if (value[0] == '\0') {
        snprintf(err, errlen, "config.%s is empty: give HOST:PORT%s", name,
                 off_ok ? ", or \"off\" for no admin listener" : "");
        return GW_ERR;
    }
    if (off_ok && strcmp(value, "off") == 0) {
        return GW_OK;
    }
    if (parse_addr(value, &res, why, sizeof(why)) != GW_OK) {
        snprintf(err, errlen, "config.%s: %s", name, why);
        return GW_ERR;
    }
    freeaddrinfo(res);
    return GW_OK;
}

#define CONFIG_SECONDS 5         /* a config that runs longer loops */

static double config_deadline;

static void
config_hook(lua_State *L, lua_Debug *ar)
{
    (void) ar;
    if (gw_loop_mono_fresh() > config_deadline) {
        luaL_error(L, "still running after %d s (a loop?)", CONFIG_SECONDS);
    }
}

/* os.exit in the config file's state: an error naming the call and the
 * line, not the end of the process. The master reads the file again on
 * HUP: a config that ends the process when something is missing (an
 * environment variable) would otherwise end the master, and every worker
 * with it, where a broken config must be a refused reload. */
static int
config_exit(lua_State *L)
{
    const char *arg = lua_isnoneornil(L, 1) ? ""
                      : lua_type(L, 1) == LUA_TBOOLEAN
                      ? (lua_toboolean(L, 1) ? "true" : "false")
                      : NULL;

    if (arg == NULL) {
        lua_pushfstring(L, "%d", (int) luaL_optinteger(L, 1, 0));
        arg = lua_tostring(L, -1);       /* anchored on the stack */
    }
    luaL_where(L, 1);
    lua_pushfstring(L, "it called os.exit(%s) (a config file returns a "
                    "table, or raises an error saying what is wrong)", arg);
    lua_concat(L, 2);                    /* where .. message */
    return lua_error(L);
}

int
gw_opts_load_file(struct gw_opts *o, const char *path, char *err,
                  size_t errlen)
{
    lua_State *L = luaL_newstate();
    int rc = GW_ERR;

    if (L == NULL) {
        snprintf(err, errlen, "no memory");
        return GW_ERR;
    }
    luaL_openlibs(L);
    lua_getglobal(L, "os");
    lua_pushcfunction(L, config_exit);
    lua_setfield(L, -2, "exit");
    lua_pop(L, 1);
    /* A config that never returns must not hang the start: count hooks
     * only run in the interpreter, so no JIT for this short-lived state. */
    luaJIT_setmode(L, 0, LUAJIT_MODE_ENGINE | LUAJIT_MODE_OFF);
    config_deadline = gw_loop_mono_fresh() + CONFIG_SECONDS;
    lua_sethook(L, config_hook, LUA_MASKCOUNT, 100000);
    if (gw_lstate_dofile(L, path, 1) != GW_OK) {
        /* A syntax error ends "near '<token>'": the token may be a secret
         * written in the file (an unfinished "...: the rest of its line),
         * never printed; the line number stays (paygate.redact's
         * load_error, for the Lua side). */
        const char *msg = lua_tostring(L, -1);
        const char *near;

        if (msg == NULL) {
            msg = "(an error that is not a string)";
        }
        near = strstr(msg, " near '");
        snprintf(err, errlen, "config %s: %.*s", path,
                 near != NULL ? (int)(near - msg) : (int)strlen(msg), msg);
        goto done;
    }
    if (!lua_istable(L, -1)) {
        snprintf(err, errlen, "config %s: must return a table", path);
        goto done;
    }
    if (read_keys(L, 1, "config", top_keys, 0, o, err, errlen) != GW_OK) {
        goto done;
    }
    find_near_misses(L, 1, o);
    lua_pushliteral(L, "workers");
    lua_rawget(L, 1);    /* raw: a metatable must not run here, unprotected */
    if (!lua_isnil(L, -1) && o->workers > GW_MAX_WORKERS) {
        /* refused here, not only by the master's start: a reload reads
         * the file too, and must not take what the next start refuses */
        snprintf(err, errlen, "config.workers must be 1..%d",
                 GW_MAX_WORKERS);
        goto done;
    }
    lua_pop(L, 1);
    if (check_addr_key(L, "listen", o->listen, 0, err, errlen) != GW_OK
        || check_addr_key(L, "admin", o->admin, 1, err, errlen) != GW_OK) {
        goto done;
    }
    if (gw_dns_check_resolver(o->resolver, err, errlen) != GW_OK) {
        goto done;                       /* "resolver must be ..." */
    }
    lua_pushliteral(L, "log_level");
    lua_rawget(L, 1);    /* raw: a metatable must not run here, unprotected */
    if (!lua_isnil(L, -1)) {
        if (!lua_isstring(L, -1)
            || gw_log_parse_level(lua_tostring(L, -1), &o->log_level)
               != GW_OK) {
            snprintf(err, errlen, "config.log_level must be one of debug, "
                                  "info, warn, error");
            goto done;
        }
    }
    lua_pop(L, 1);
    lua_pushliteral(L, "access_log");
    lua_rawget(L, 1);    /* raw: a metatable must not run here, unprotected */
    if (!lua_isnil(L, -1)) {
        if (lua_type(L, -1) != LUA_TBOOLEAN) {
            snprintf(err, errlen, "config.access_log must be true or false");
            goto done;
        }
        o->server.access_log = lua_toboolean(L, -1);
    }
    lua_pop(L, 1);
    lua_pushliteral(L, "tls");
    lua_rawget(L, 1);    /* raw: a metatable must not run here, unprotected */
    if (lua_istable(L, -1)) {
        if (read_keys(L, lua_gettop(L), "config.tls", tls_keys, 1, o, err,
                      errlen) != GW_OK) {
            goto done;
        }
    } else if (!lua_isnil(L, -1)) {
        snprintf(err, errlen, "config.tls must be a table");
        goto done;
    }
    lua_pop(L, 1);
    lua_pushliteral(L, "shared");
    lua_rawget(L, 1);    /* raw: a metatable must not run here, unprotected */
    if (lua_istable(L, -1)) {
        if (read_shared(L, lua_gettop(L), o, err, errlen) != GW_OK) {
            goto done;
        }
    } else if (!lua_isnil(L, -1)) {
        snprintf(err, errlen, "config.shared must be a table");
        goto done;
    }
    lua_pop(L, 1);
    lua_pushliteral(L, "limits");
    lua_rawget(L, 1);    /* raw: a metatable must not run here, unprotected */
    if (lua_istable(L, -1)) {
        if (read_keys(L, lua_gettop(L), "config.limits", limit_keys, 1, o,
                      err, errlen) != GW_OK) {
            goto done;
        }
    } else if (!lua_isnil(L, -1)) {
        snprintf(err, errlen, "config.limits must be a table");
        goto done;
    }
    rc = GW_OK;
done:
    lua_close(L);
    return rc;
}

/* Appends prefix name to out, comma-separated; "..." once it is full. */
static void
add_name(char *out, size_t outlen, const char *prefix, const char *name)
{
    size_t len = strlen(out);

    if (len + strlen(prefix) + strlen(name) + 6 >= outlen) {
        if (len + 6 < outlen && (len < 3 || strcmp(out + len - 3, "...")
                                 != 0)) {
            snprintf(out + len, outlen - len, "%s...", len ? ", " : "");
        }
        return;
    }
    snprintf(out + len, outlen - len, "%s%s%s", len ? ", " : "", prefix,
             name);
}

static void
diff_keys(const struct key *keys, const char *prefix,
          const struct gw_opts *a, const struct gw_opts *b, char *out,
          size_t outlen)
{
    for (const struct key *k = keys; k->name != NULL; k++) {
        const char *pa = (const char *) a + k->off;
        const char *pb = (const char *) b + k->off;
        int same;

        if (k->type == 's') {
            same = strcmp(pa, pb) == 0;
        } else if (k->type == 'n' || k->type == 'w') {
            same = *(const double *) pa == *(const double *) pb;
        } else if (k->type == 'z') {
            same = *(const size_t *) pa == *(const size_t *) pb;
        } else {
            same = *(const int *) pa == *(const int *) pb;
        }
        if (!same) {
            add_name(out, outlen, prefix, k->name);
        }
    }
}

static size_t
shared_size(const struct gw_opts *o, const char *name)
{
    for (int i = 0; i < o->nshared; i++) {
        if (strcmp(o->shared[i].name, name) == 0) {
            return o->shared[i].size;
        }
    }
    return 0;
}

void
gw_opts_diff(const struct gw_opts *a, const struct gw_opts *b, char *out,
             size_t outlen)
{
    int shared_same = a->nshared == b->nshared;

    out[0] = '\0';
    diff_keys(top_keys, "", a, b, out, outlen);
    if (a->log_level != b->log_level) {
        add_name(out, outlen, "", "log_level");
    }
    if (a->server.access_log != b->server.access_log) {
        add_name(out, outlen, "", "access_log");
    }
    diff_keys(tls_keys, "tls.", a, b, out, outlen);
    diff_keys(limit_keys, "limits.", a, b, out, outlen);
    for (int i = 0; shared_same && i < a->nshared; i++) {
        shared_same = shared_size(b, a->shared[i].name) == a->shared[i].size;
    }
    if (!shared_same) {
        add_name(out, outlen, "", "shared");
    }
}

/* "HOST:PORT" / "[V6]:PORT" / "PORT" as a numeric address, for a bind or
 * a comparison: *res is the caller's to freeaddrinfo(). Returns GW_OK, or
 * GW_ERR with a reason in err. */
static int
parse_addr(const char *spec, struct addrinfo **res, char *err, size_t errlen)
{
    char host[256] = "127.0.0.1", port[16];
    const char *colon;
    struct addrinfo hints;
    int rc;

    if (spec[0] == '[') {
        const char *close_br = strchr(spec, ']');

        if (close_br == NULL || close_br[1] != ':'
            || (size_t) (close_br - spec - 1) >= sizeof(host)) {
            snprintf(err, errlen, "bad address '%s' (want [IPv6]:PORT)", spec);
            return GW_ERR;
        }
        memcpy(host, spec + 1, (size_t) (close_br - spec - 1));
        host[close_br - spec - 1] = '\0';
        colon = close_br + 1;
    } else {
        colon = strrchr(spec, ':');
        if (colon != NULL) {
            if ((size_t) (colon - spec) >= sizeof(host)) {
                snprintf(err, errlen, "bad address '%s'", spec);
                return GW_ERR;
            }
            memcpy(host, spec, (size_t) (colon - spec));
            host[colon - spec] = '\0';
        }
    }
    /* a port longer than the buffer was cut short, and atoi wraps: both
     * bound a port nobody asked for (2^32+80 was port 80) */
    if (strlen(colon != NULL ? colon + 1 : spec) >= sizeof(port)) {
        snprintf(err, errlen, "bad port in '%s' (want HOST:PORT)", spec);
        return GW_ERR;
    }
    snprintf(port, sizeof(port), "%s", colon != NULL ? colon + 1 : spec);
    if (port[0] == '\0' || strspn(port, "0123456789") != strlen(port)
        || strtol(port, NULL, 10) > 65535) {
        snprintf(err, errlen, "bad port in '%s' (want HOST:PORT)", spec);
        return GW_ERR;
    }
    memset(&hints, 0, sizeof(hints));
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV | AI_NUMERICHOST;
    rc = getaddrinfo(host[0] ? host : NULL, port, &hints, res);
    if (rc != 0) {
        snprintf(err, errlen, "bad address '%s': %s (use a numeric IP)",
                 spec, gai_strerror(rc));
        return GW_ERR;
    }
    return GW_OK;
}

int
gw_listen(const char *spec, int backlog, char *err, size_t errlen,
          int *transient)
{
    struct addrinfo *res = NULL;
    int fd = -1, one = 1;

    *transient = 0;
    if (parse_addr(spec, &res, err, errlen) != GW_OK) {
        return -1;
    }
    fd = socket(res->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC,
                0);
    if (fd < 0) {
        snprintf(err, errlen, "socket: %s", strerror(errno));
        goto fail;
    }
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(fd, res->ai_addr, res->ai_addrlen) != 0) {
        *transient = errno == EADDRINUSE || errno == EADDRNOTAVAIL;
        snprintf(err, errlen, "cannot listen on %s: %s", spec,
                 strerror(errno));
        goto fail;
    }
    if (listen(fd, backlog) != 0) {
        snprintf(err, errlen, "listen %s: %s", spec, strerror(errno));
        goto fail;
    }
    freeaddrinfo(res);
    return fd;
fail:
    if (fd >= 0) {
        close(fd);
    }
    freeaddrinfo(res);
    return -1;
}

/* The address fd is bound to, as HOST:PORT ([HOST]:PORT for IPv6), in buf:
 * the port the kernel picked for a listen on port 0 too. spec when it
 * cannot be told. */
const char *
gw_bound_addr(int fd, const char *spec, char *buf, size_t len)
{
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);
    const char *text;

    if (getsockname(fd, (struct sockaddr *) &ss, &sl) != 0) {
        return spec;
    }
    text = gw_sockaddr_text(&ss, buf, len);
    return text != NULL ? text : spec;
}

int
gw_listen_inherited(int fd, const char *spec, char *err, size_t errlen)
{
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);
    struct addrinfo *res = NULL;
    int on = 0, type = 0, same = 0, fl;
    socklen_t ol = sizeof(on), tl = sizeof(type);
    char now[80];

    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &tl) != 0
        || getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &on, &ol) != 0
        || getsockname(fd, (struct sockaddr *) &ss, &sl) != 0) {
        snprintf(err, errlen, "inherited fd %d is not a socket: %s", fd,
                 strerror(errno));
        return GW_ERR;
    }
    if (type != SOCK_STREAM || !on
        || (ss.ss_family != AF_INET && ss.ss_family != AF_INET6)) {
        snprintf(err, errlen, "inherited fd %d is not a listening TCP "
                 "socket", fd);
        return GW_ERR;
    }
    if (parse_addr(spec, &res, err, errlen) != GW_OK) {
        return GW_ERR;
    }
    if (res->ai_family == AF_INET && ss.ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *) &ss;
        const struct sockaddr_in *b = (const struct sockaddr_in *)
                                      res->ai_addr;

        same = a->sin_addr.s_addr == b->sin_addr.s_addr
               && (b->sin_port == 0 || a->sin_port == b->sin_port);
    } else if (res->ai_family == AF_INET6 && ss.ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *) &ss;
        const struct sockaddr_in6 *b = (const struct sockaddr_in6 *)
                                       res->ai_addr;

        same = memcmp(&a->sin6_addr, &b->sin6_addr, sizeof(a->sin6_addr))
               == 0 && (b->sin6_port == 0 || a->sin6_port == b->sin6_port);
    }
    freeaddrinfo(res);
    if (!same) {
        snprintf(err, errlen, "the running server listens on %s, not %s: "
                 "an upgrade keeps the listening addresses (change them "
                 "with a stop and a start)",
                 gw_bound_addr(fd, "?", now, sizeof(now)), spec);
        return GW_ERR;
    }
    /* ours now: kept from the next exec, non-blocking as gw_listen's */
    fl = fcntl(fd, F_GETFL);
    if (fcntl(fd, F_SETFD, FD_CLOEXEC) != 0 || fl < 0
        || fcntl(fd, F_SETFL, fl | O_NONBLOCK) != 0) {
        snprintf(err, errlen, "inherited fd %d: fcntl: %s", fd,
                 strerror(errno));
        return GW_ERR;
    }
    return GW_OK;
}
