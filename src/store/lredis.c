/*
 * lredis.c -- paygate.redis.core: Redis through hiredis's async API on
 * the process's event base (hiredis/adapters/libevent.h).
 *
 * A client is a small pool of connections to one server. Commands take
 * the connections in turn, and many coroutines share each one: hiredis
 * queues them and writes them together, so concurrent callers are
 * pipelined for free. A connection is opened when its turn first comes;
 * one that breaks is forgotten and the next command on its turn opens a
 * new one (reconnection).
 *
 * A blocking command (BLPOP, XREAD BLOCK, ...: paygate.redis says which,
 * with call_blocking) gets a connection of its own, opened for it and
 * closed after its reply: on a shared one, every command queued behind
 * it would wait for it, and its wait would read as a timeout. At most
 * max_blocking of them at once (each is a client on the server, which
 * has maxclients): one more fails "busy" at once.
 *
 * While the server is down a command fails at once with "unavailable"
 * (loopback connects are refused immediately; a connect that hangs is
 * bounded by connect_timeout), and after a failed attempt the next ones
 * wait for a growing window (backoff, below): meanwhile commands fail
 * "unavailable" without a connect.
 *
 * Setup: a new connection sends AUTH (with a password) and SELECT (db
 * other than 0) first, and the callers' commands for it are held until
 * both answered OK (one round trip per connection, never per command):
 * sent behind a SELECT the server refuses, they would run on db 0. A
 * refused AUTH or SELECT fails them unsent -- "redis: SELECT 5 refused:
 * <the server's answer>", kind "config", not retryable -- and so are the
 * commands during the wait that follows (on_setup_reply()). An AUTH's
 * answer is shown without the password (auth_answer()).
 *
 * Timeouts: a once-per-100-ms tick checks each connection; when it has
 * replies outstanding and none arrived for `timeout` seconds (plus the
 * block time on a blocking command's own connection), the connection is
 * dropped and every command on it fails with "timeout". A command given
 * to a connected context that went away unanswered (timeout, connection
 * lost, set_addr) carries err.sent: the server may have run it, and
 * paygate.redis makes a write's error "unknown_outcome". One not connected
 * within connect_timeout is dropped too; its commands, never sent, fail
 * "unavailable" ("connect to ... timed out"), not "no reply".
 *
 * Addresses: the host must be numeric (hiredis would resolve a name with
 * the blocking system resolver): paygate.redis resolves names with
 * paygate.dns and, when the address changes (new DNS answer, Sentinel's
 * new master), calls h:set_addr(), which retires the connections to the
 * old address (their commands fail "unavailable") on the next loop turn.
 *
 * Subscriptions (core.subscribe): see the section below; used for
 * Sentinel's +switch-master.
 *
 * Lifetime: struct lredis_client is freed when the Lua handle was closed and
 * every hiredis context has called its disconnect callback (refs); a
 * blocking command's connection record lives as long as its context. An op
 * lives until all its replies (or NULLs, when a context is freed) came;
 * an abandoned coroutine only clears op->co.
 */
#include <ctype.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <event2/event.h>
#include <hiredis/hiredis.h>
#include <hiredis/async.h>
#include <hiredis/adapters/libevent.h>
#include <openssl/rand.h>
#include <openssl/sha.h>
#include <lauxlib.h>

#include "dns.h"
#include "loop.h"
#include "lstate.h"
#include "runtime.h"
#include "store.h"

#define LREDIS_MT       "paygate.redis.client"
#define LREDIS_MAXARGS  1024
#define LREDIS_MAXPOOL  16
#define LREDIS_MAXBLOCKING 64            /* default max_blocking */
/* Default max_reply: bytes one reply may take (guard_count()). A server
 * that declares a huge length, or streams a reply that never ends, was
 * read until the command's timeout, every byte of it held. paygate's own
 * values (leases, counters, cached answers) are bytes to kilobytes, and
 * Redis's own bound on a string (proto-max-bulk-len) is 512 MB. */
#define LREDIS_MAXREPLY (64 * 1024 * 1024)
#define LREDIS_MINREPLY 1024             /* the smallest max_reply taken */

/* Reconnect backoff. With no connection up, every command would open
 * one: while the server is down that is a connect per command, a burst
 * of commands hammers a server that is coming back, and each caller
 * waits for its own connect to fail. So once an attempt failed (refused,
 * timed out, AUTH or SELECT refused, closed before its first reply),
 * commands fail at once without connecting until a window has passed.
 * The window doubles with each failed attempt, from LREDIS_BACKOFF_MIN
 * to LREDIS_BACKOFF_MAX (a server that is back is used again within
 * that), and is drawn between half and all of it so that workers and
 * instances do not reconnect in step. The first reply on a connection
 * ends the backoff; so does a new address (set_addr): a new master owes
 * nothing to the old one's failures. */
#define LREDIS_BACKOFF_MIN  0.1
#define LREDIS_BACKOFF_MAX  2.0

struct lredis_client;
struct lredis_op;

/* A context's reply bound (guard_count()) */
struct lredis_guard {
    size_t           max;        /* max_reply */
    size_t           used;       /* counted of the reply being read */
};

static void guard_install(redisAsyncContext *ac);
static void guard_errstr(const redisAsyncContext *ac);

/* A caller's command held until its connection's setup answered
 * (conn_send()): formatted, not yet given to hiredis. */
struct lredis_held {
    struct lredis_held *next;
    struct lredis_op   *op;
    char               *cmd;     /* redisFormatCommandArgv's */
    long long           len;
};

/* Why conn_check dropped a connection (lredis_conn.timedout). */
#define LREDIS_TIMEDOUT_REPLY    1       /* no reply within the timeout */
#define LREDIS_TIMEDOUT_CONNECT  2       /* no connection within
                                            connect_timeout */

struct lredis_conn {
    struct lredis_client    *cl;      /* owner */
    redisAsyncContext  *ac;      /* NULL when not connected */
    int                 ready;   /* connect callback reported success */
    int                 pending; /* replies outstanding on ac */
    double              since;   /* monotonic s: last reply or first send */
    double              opened;  /* monotonic s: connect started */
    int                 timedout;/* we dropped ac: LREDIS_TIMEDOUT_* */
    int                 settled; /* the attempt's outcome was counted
                                    (backoff); set for retired records */
    /* A blocking command's own connection (heap, on cl->alone) */
    int                 alone;
    double              block;   /* s its command may block (HUGE_VAL:
                                    forever): added to the timeout */
    unsigned            gen;     /* cl->gen when opened */
    struct lredis_conn *prev, *next; /* cl->alone */
    int                 retired; /* of an address set_addr left */
    int                 setup;   /* AUTH/SELECT replies outstanding: the
                                    callers' commands wait on held */
    struct lredis_held *held;    /* newest first */
    char                refused[24];  /* "AUTH" or "SELECT <n>" the
                                         server refused, or "" */
    char                answer[128];  /* its answer */
    char                proto[112];   /* a reply the guard refused
                                         (guard_refuse()), or "" */
    struct lredis_guard guard;
};

struct lredis_client {
    char            *host;       /* owned */
    int              port;
    char            *password;   /* owned, NULL for none */
    int              dbnum;      /* SELECT after connect, 0 = default */
    double           timeout;    /* s without a reply before failing */
    double           connect_timeout; /* s */
    int              npool;
    unsigned         rr;         /* round-robin cursor */
    struct lredis_conn  conns[LREDIS_MAXPOOL];
    struct lredis_conn *alone;   /* blocking commands' connections */
    int              nalone;     /* records on alone */
    int              max_blocking; /* cap on nalone */
    size_t           max_reply;  /* bytes of one reply (guard_count()) */
    unsigned         gen;        /* bumped by set_addr */
    double           backoff;    /* s: the last window's length before
                                    jitter; 0 after a success */
    double           retry_at;   /* monotonic s: no connect before this */
    char             lasterr[128]; /* why the last attempt failed */
    const char      *lastkind;   /* its kind: "unavailable", or "config"
                                    when the server refused the AUTH or
                                    SELECT */
    struct event    *tick;       /* owned; deadline checks */
    int              refs;       /* Lua handle + live contexts */
    int              closed;     /* Lua closed it */
    lua_State       *T;          /* anchored thread for registry work */
    int              tref;       /* registry ref anchoring T */
};

struct lredis_op {
    struct gw_co    *co;         /* waiting coroutine; NULL if abandoned */
    struct lredis_client *cl;         /* borrowed; cl outlives its ops (refs) */
    int              ncmds;      /* replies expected */
    int              got;        /* replies received */
    int              results;    /* registry ref of the results table
                                    (pipeline), LUA_NOREF for one command */
    char             kind[16];   /* first transport error kind, or "" */
    char             msg[160];   /* its message */
    int              sent;       /* a command of op was given to a
                                    connected context that went away
                                    before answering it: the server may
                                    have read and run it (err.sent) */
};

struct lredis_ud {
    struct lredis_client *cl;         /* NULL once closed */
};


/* A context of an address the client no longer uses, freed on the next
 * loop turn (freeing wakes the coroutines waiting on its commands). It
 * moves to a connection record of its own (its ac->data), so that its
 * callbacks until then -- a connect that fails (hiredis then frees the
 * context itself), one that succeeds, the server closing it -- update
 * this record, not the slot that already serves the new address. */
struct lredis_retired {
    struct lredis_conn     conn;         /* conn.cl: holds a reference */
    struct lredis_retired *next;
};

static void
client_unref(struct lredis_client *cl)
{
    if (--cl->refs > 0) {
        return;
    }
    if (cl->tick != NULL) {
        event_free(cl->tick);
    }
    if (cl->T != NULL) {
        luaL_unref(cl->T, LUA_REGISTRYINDEX, cl->tref);
    }
    free(cl->host);
    free(cl->password);
    free(cl);
}

/* ------------------------------------------------------------ backoff */

/* A draw in [0, 1) for the jitter. OpenSSL's generator, not random():
 * workers forked from one parent would draw the same sequence. */
static double
jitter(void)
{
    unsigned short u;

    if (RAND_bytes((unsigned char *)&u, sizeof(u)) != 1) {
        return 0.5;
    }
    return u / 65536.0;
}

/* A connection attempt to the current address failed: no new one until
 * a longer window has passed. */
static void
backoff_fail(struct lredis_client *cl, const char *why)
{
    double b = cl->backoff * 2;

    if (b < LREDIS_BACKOFF_MIN) {
        b = LREDIS_BACKOFF_MIN;
    }
    if (b > LREDIS_BACKOFF_MAX) {
        b = LREDIS_BACKOFF_MAX;
    }
    cl->backoff = b;
    cl->retry_at = gw_loop_mono_fresh() + b * (0.5 + 0.5 * jitter());
    cl->lastkind = "unavailable";
    snprintf(cl->lasterr, sizeof(cl->lasterr), "%s:%d: %s", cl->host,
             cl->port, why);
}

static void
backoff_reset(struct lredis_client *cl)
{
    cl->backoff = 0;
    cl->retry_at = 0;
}

/* The outcome of c's attempt, counted once: its first reply is a
 * success; its end before one (or a refused AUTH or SELECT) a failure.
 * A connection that breaks after answering was a success: the next
 * command reconnects at once, and only if that attempt fails does the
 * client back off. */
static void
attempt_failed(struct lredis_conn *c, const char *why)
{
    if (!c->settled) {
        c->settled = 1;
        backoff_fail(c->cl, why[0] != '\0' ? why : "connection lost");
    }
}

static void
attempt_ok(struct lredis_conn *c)
{
    if (!c->settled) {
        c->settled = 1;
        backoff_reset(c->cl);
    }
}

/* ------------------------------------------------------------- replies */

/* 1 when the reply's first word (its error code) is w: prefixes alone
 * would read BUSYGROUP or BUSYKEY as BUSY. */
static int
code_is(const char *s, const char *w)
{
    size_t n = strlen(w);

    return strncmp(s, w, n) == 0 && (s[n] == ' ' || s[n] == '\0');
}

static const char *
error_kind(const char *s, int *retryable)
{
    *retryable = 0;
    if (code_is(s, "NOSCRIPT")) {
        return "noscript";
    }
    if (code_is(s, "BUSY") || code_is(s, "TRYAGAIN")) {
        *retryable = 1;
        return "busy";
    }
    if (code_is(s, "LOADING") || code_is(s, "READONLY")
        || code_is(s, "MASTERDOWN") || code_is(s, "CLUSTERDOWN"))
    {
        *retryable = 1;
        return "unavailable";
    }
    if (code_is(s, "OOM")) {
        return "unavailable";
    }
    /* no password, or a wrong one: only a new configuration helps */
    if (code_is(s, "NOAUTH") || code_is(s, "WRONGPASS")) {
        return "config";
    }
    /* the group or key exists already: trying again cannot succeed */
    if (code_is(s, "WRONGTYPE") || code_is(s, "BUSYGROUP")
        || code_is(s, "BUSYKEY"))
    {
        return "constraint";
    }
    if (strncmp(s, "ERR unknown command", 19) == 0
        || strncmp(s, "ERR wrong number", 16) == 0
        || strncmp(s, "ERR syntax", 10) == 0
        || strncmp(s, "ERR Error compiling", 19) == 0)
    {
        return "syntax";
    }
    return "error";
}

static void
push_reply_error(lua_State *L, const char *s, size_t len)
{
    int         retry;
    const char *kind = error_kind(s, &retry);
    size_t      w = strcspn(s, " ");

    gw_push_error(L, kind, retry, "redis: %.*s", (int)len, s);
    lua_pushlstring(L, s, w);
    lua_setfield(L, -2, "code");
    lua_remove(L, -2);                   /* keep the table, drop nil */
}

/* The server refused the AUTH or SELECT (what) of a connection
 * (answer: WRONGPASS ..., ERR DB index is out of range, ...): the error
 * table for the commands held behind it, never sent. The answer has been
 * through auth_answer() (no password in it). */
static void
push_setup_error(lua_State *L, const char *what, const char *answer)
{
    gw_push_error(L, "config", 0, "redis: %s refused: %s", what, answer);
    lua_pushlstring(L, answer, strcspn(answer, " "));
    lua_setfield(L, -2, "code");
    lua_remove(L, -2);                   /* keep the table, drop nil */
}

/* Pushes one Lua value for r (an error reply becomes an error table).
 * depth: of r's array in the reply. An array takes a stack slot per
 * level: past PUSH_MAX_DEPTH levels (hiredis 0.14 stops at 7; later
 * versions need not) it is an error value instead, so the stack is
 * checked without raising (this runs in hiredis's callback). */
#define PUSH_MAX_DEPTH 32

static void
push_reply_at(lua_State *L, redisReply *r, int depth)
{
    size_t i;

    switch (r->type) {
    case REDIS_REPLY_STRING:
    case REDIS_REPLY_STATUS:
        lua_pushlstring(L, r->str, r->len);
        break;
    case REDIS_REPLY_INTEGER:
        gw_store_push_int(L, (int64_t)r->integer);
        break;
    case REDIS_REPLY_ARRAY:
        if (depth >= PUSH_MAX_DEPTH || !lua_checkstack(L, 4)) {
            push_reply_error(L, "ERR reply nested too deeply", 27);
            break;
        }
        lua_createtable(L, (int)r->elements, 0);
        for (i = 0; i < r->elements; i++) {
            push_reply_at(L, r->element[i], depth + 1);
            lua_rawseti(L, -2, (int)i + 1);
        }
        break;
    case REDIS_REPLY_ERROR:
        push_reply_error(L, r->str, r->len);
        break;
    default:
        lua_pushlightuserdata(L, NULL);  /* nil reply: redis.null */
        break;
    }
}

static void
push_reply(lua_State *L, redisReply *r)
{
    push_reply_at(L, r, 0);
}

static void
op_transport_error(struct lredis_op *op, struct lredis_conn *c,
                   const redisAsyncContext *ac)
{
    if (op->kind[0] != '\0') {
        return;
    }
    if (c != NULL && c->timedout == LREDIS_TIMEDOUT_CONNECT) {
        /* never sent: as safe to retry as a refused connect */
        snprintf(op->kind, sizeof(op->kind), "unavailable");
        snprintf(op->msg, sizeof(op->msg), "redis: connect to %s:%d timed"
                 " out after %.3g s", op->cl->host, op->cl->port,
                 op->cl->connect_timeout);
    } else if (c != NULL && c->timedout) {
        snprintf(op->kind, sizeof(op->kind), "timeout");
        snprintf(op->msg, sizeof(op->msg), "redis: no reply within %.3g s",
                 c->block + op->cl->timeout);
    } else if (op->cl->closed) {
        snprintf(op->kind, sizeof(op->kind), "closed");
        snprintf(op->msg, sizeof(op->msg), "redis: client closed");
    } else {
        snprintf(op->kind, sizeof(op->kind), "unavailable");
        snprintf(op->msg, sizeof(op->msg), "redis: %s",
                 ac != NULL && ac->errstr[0] != '\0' ? ac->errstr
                                                     : "connection lost");
    }
}

static void
op_finish(struct lredis_op *op)
{
    struct gw_co    *co = op->co;
    struct lredis_client *cl = op->cl;
    lua_State       *L;
    int              n, retry;

    if (co == NULL) {
        if (op->results != LUA_NOREF) {
            luaL_unref(cl->T, LUA_REGISTRYINDEX, op->results);
        }
        free(op);
        client_unref(cl);
        return;
    }
    L = gw_co_state(co);
    /* timeout and unavailable may pass; a closed client stays closed */
    retry = strcmp(op->kind, "closed") != 0;
    if (op->results != LUA_NOREF) {
        if (op->kind[0] != '\0') {
            n = gw_push_error(L, op->kind, retry, "%s", op->msg);
        } else {
            lua_rawgeti(L, LUA_REGISTRYINDEX, op->results);
            n = 1;
        }
        luaL_unref(L, LUA_REGISTRYINDEX, op->results);
    } else {
        n = gw_push_error(L, op->kind, retry, "%s", op->msg);
    }
    if (op->kind[0] != '\0' && op->sent) {
        /* paygate.redis makes a write's error unknown_outcome */
        lua_pushboolean(L, 1);
        lua_setfield(L, -2, "sent");
    }
    free(op);
    client_unref(cl);
    gw_co_wake(co, n);
}

static struct lredis_conn *
conn_of(redisAsyncContext *ac)
{
    return ac->data;
}

/* One answer for op: the reply r, a transport failure of c (r NULL,
 * what NULL), or the refusal of c's setup (what: "AUTH" or "SELECT n",
 * answer: the server's) for a command held behind it. */
static void
op_answer(struct lredis_op *op, struct lredis_conn *c,
          const redisAsyncContext *ac, redisReply *r, const char *what,
          const char *answer)
{
    op->got++;
    if (what == NULL && r == NULL) {
        op_transport_error(op, c, ac);
    } else if (op->co != NULL && op->results != LUA_NOREF) {
        lua_State *T = op->cl->T;

        lua_rawgeti(T, LUA_REGISTRYINDEX, op->results);
        if (what != NULL) {
            push_setup_error(T, what, answer);
        } else {
            push_reply(T, r);
        }
        lua_rawseti(T, -2, op->got);
        lua_pop(T, 1);
    } else if (op->co != NULL) {
        /* One command: answer now, straight from the reply. */
        struct gw_co    *co = op->co;
        struct lredis_client *cl = op->cl;
        lua_State       *L = gw_co_state(co);
        int              n = 1;

        if (what != NULL) {
            lua_pushnil(L);
            push_setup_error(L, what, answer);
            n = 2;
        } else if (r->type == REDIS_REPLY_ERROR) {
            lua_pushnil(L);
            push_reply_error(L, r->str, r->len);
            n = 2;
        } else {
            push_reply(L, r);
        }
        free(op);
        client_unref(cl);
        gw_co_wake(co, n);
        return;
    }
    if (op->got == op->ncmds) {
        op_finish(op);
    }
}

/* hiredis callback for every command we send. */
static void
on_reply(redisAsyncContext *ac, void *reply, void *privdata)
{
    struct lredis_op   *op = privdata;
    struct lredis_conn *c = conn_of(ac);
    redisReply      *r = reply;

    if (r == NULL) {
        guard_errstr(ac);
    }
    if (r == NULL && (ac->c.flags & REDIS_CONNECTED) != 0) {
        /* Given to hiredis on a connection that was up: it may have been
         * written, and the server may have run it (a command never
         * connected, or held behind the setup, is never sent). */
        op->sent = 1;
    }
    if (c != NULL && c->ac == ac) {
        c->pending--;
        c->since = gw_loop_mono_fresh();
        if (r == NULL) {
            /* The context is going away: a coroutine woken below must
             * open a new one, not queue on this one, and see the backoff
             * when this one never answered. */
            attempt_failed(c, ac->errstr);
            c->ac = NULL;
            c->ready = 0;
        } else {
            attempt_ok(c);
            if (c->alone) {
                /* its one command answered: closed once hiredis is done
                 * with the reply (on_disconnect frees c) */
                c->ac = NULL;
                redisAsyncDisconnect(ac);
            }
        }
    }
    op_answer(op, c, ac, r, NULL, NULL);
}

/* Fails the commands held on c (their context ac is going away, or
 * refused its setup: what and answer, see op_answer()); they were never
 * sent. Takes the list off c first: a coroutine woken here may send on
 * c again (a new connection). ac may be NULL. */
static void
held_fail(struct lredis_conn *c, const redisAsyncContext *ac,
          const char *what, const char *answer)
{
    struct lredis_held *h = c->held, *prev = NULL, *next;
    char                w[sizeof(c->refused)], a[sizeof(c->answer)];

    if (h == NULL) {
        return;
    }
    c->held = NULL;
    if (what != NULL) {
        /* copies: c's own fields may change under a woken coroutine */
        snprintf(w, sizeof(w), "%s", what);
        snprintf(a, sizeof(a), "%s", answer);
        what = w;
        answer = a;
    }
    for (; h != NULL; h = next) {        /* oldest first */
        next = h->next;
        h->next = prev;
        prev = h;
    }
    for (h = prev; h != NULL; h = next) {
        next = h->next;
        if (c->ac == ac && ac != NULL && c->pending > 0) {
            c->pending--;
        }
        op_answer(h->op, c, ac, NULL, what, answer);
        redisFreeCommand(h->cmd);
        free(h);
    }
}

/* c's setup answered OK: its held commands go out, oldest first. */
static void
held_flush(struct lredis_conn *c)
{
    struct lredis_held *h = c->held, *prev = NULL, *next;

    c->held = NULL;
    for (; h != NULL; h = next) {
        next = h->next;
        h->next = prev;
        prev = h;
    }
    for (h = prev; h != NULL; h = next) {
        next = h->next;
        if (c->ac == NULL
            || redisAsyncFormattedCommand(c->ac, on_reply, h->op, h->cmd,
                                          (size_t)h->len) != REDIS_OK)
        {
            if (c->ac != NULL && c->pending > 0) {
                c->pending--;
            }
            op_answer(h->op, c, c->ac, NULL, NULL, NULL);
        }
        redisFreeCommand(h->cmd);
        free(h);
    }
}

/* Sends one command of op on c, or holds it while c's setup has not
 * answered yet. REDIS_OK, or REDIS_ERR when it cannot be (nothing kept). */
static int
conn_send(struct lredis_conn *c, struct lredis_op *op, int n,
          const char **args, const size_t *lens)
{
    struct lredis_held *h;
    char               *cmd;
    long long           len;

    if (c->ac == NULL) {
        return REDIS_ERR;
    }
    if (c->setup == 0) {
        return redisAsyncCommandArgv(c->ac, on_reply, op, n, args, lens);
    }
    if ((c->ac->c.flags & (REDIS_DISCONNECTING | REDIS_FREEING)) != 0) {
        return REDIS_ERR;
    }
    len = redisFormatCommandArgv(&cmd, n, args, lens);
    if (len < 0) {
        return REDIS_ERR;
    }
    h = malloc(sizeof(*h));
    if (h == NULL) {
        redisFreeCommand(cmd);
        return REDIS_ERR;
    }
    h->op = op;
    h->cmd = cmd;
    h->len = len;
    h->next = c->held;
    c->held = h;
    return REDIS_OK;
}

/* 1 when c serves the client's current address (set_addr retires the
 * others): only there do held commands go out. */
static int
conn_current(const struct lredis_conn *c)
{
    return !c->retired && (!c->alone || c->gen == c->cl->gen);
}

/* The answer to a refused AUTH as it may be shown (in an error message,
 * a log line), into out. Redis's refusals of a wrong password do not
 * repeat it (WRONGPASS ...), but a server that does not know AUTH -- a
 * Sentinel older than 5.0.1, AUTH renamed away, a proxy -- answers "ERR
 * unknown command 'AUTH', with args beginning with: '<the password>'":
 * that part is cut, and an answer that still holds the password (it is
 * checked whole, before any truncation, which could leave a prefix of it
 * uncaught) is shown by its first word alone. */
static void
auth_answer(const char *answer, const char *password, char *out,
            size_t outlen)
{
    const char *args = strstr(answer, ", with args beginning with");
    size_t      len = args != NULL ? (size_t)(args - answer)
                                   : strlen(answer);

    if (password != NULL && password[0] != '\0'
        && memmem(answer, len, password, strlen(password)) != NULL)
    {
        len = strcspn(answer, " ");
        snprintf(out, outlen, "%.*s (the rest not shown: it holds the"
                 " password)", (int)len, answer);
        return;
    }
    snprintf(out, outlen, "%.*s%s", (int)len, answer,
             args != NULL ? " (its arguments not shown)" : "");
}

/* Internal commands (AUTH, SELECT: privdata names it), sent first on a
 * new connection; the callers' commands wait on c->held until both
 * answered OK. A refusal drops the connection and fails the held
 * commands, unsent, with the server's answer ("redis: SELECT 5 refused:
 * ERR DB index is out of range"), kind "config", not retryable; so do
 * the commands that fail while the client then waits before its next
 * attempt (lastkind). */
static void
on_setup_reply(redisAsyncContext *ac, void *reply, void *privdata)
{
    struct lredis_conn *c = conn_of(ac);
    redisReply      *r = reply;
    int              auth = strcmp((const char *)privdata, "AUTH") == 0;
    int              counted;
    char             what[24], why[192];

    if (auth) {
        snprintf(what, sizeof(what), "AUTH");
    } else {
        snprintf(what, sizeof(what), "SELECT %d",
                 c != NULL ? c->cl->dbnum : 0);
    }
    if (r == NULL) {
        guard_errstr(ac);
    }
    if (c == NULL || c->ac != ac) {
        if (r != NULL && r->type == REDIS_REPLY_ERROR) {
            redisAsyncDisconnect(ac);
        }
        return;
    }
    c->pending--;
    c->since = gw_loop_mono_fresh();
    if (c->setup > 0) {
        c->setup--;
    }
    if (r == NULL) {
        /* the context is going away before the setup answered */
        attempt_failed(c, ac->errstr);
        c->ac = NULL;
        c->ready = 0;
        held_fail(c, ac, NULL, NULL);
        return;
    }
    if (r->type == REDIS_REPLY_ERROR) {
        if (c->refused[0] != '\0') {
            return;              /* the SELECT behind a refused AUTH */
        }
        snprintf(c->refused, sizeof(c->refused), "%s", what);
        if (auth) {
            auth_answer(r->str, c->cl->password, c->answer,
                        sizeof(c->answer));
        } else {
            snprintf(c->answer, sizeof(c->answer), "%s", r->str);
        }
        snprintf(why, sizeof(why), "%s refused: %s", what, c->answer);
        counted = !c->settled;
        attempt_failed(c, why);
        if (counted) {
            c->cl->lastkind = "config";
        }
        gw_log(GW_LOG_ERROR, "redis: connection setup failed: %s refused:"
               " %s", what, c->answer);
        redisAsyncDisconnect(ac);
        held_fail(c, ac, c->refused, c->answer);
        return;
    }
    if (c->setup == 0 && c->refused[0] == '\0') {
        attempt_ok(c);
        if (conn_current(c)) {
            held_flush(c);
        }
    }
}

/* c's context is gone (or never was): a blocking command's connection
 * record goes with it. Call before client_unref: c may hold the last
 * reference's client. */
static void
conn_gone(struct lredis_conn *c)
{
    struct lredis_client *cl = c->cl;

    if (!c->alone) {
        return;
    }
    cl->nalone--;
    if (c->prev != NULL) {
        c->prev->next = c->next;
    } else {
        cl->alone = c->next;
    }
    if (c->next != NULL) {
        c->next->prev = c->prev;
    }
    free(c);
}

static void
on_connect(const redisAsyncContext *ac, int status)
{
    struct lredis_conn   *c = ac->data;
    struct lredis_client *cl;

    if (c == NULL) {
        return;
    }
    if (status == REDIS_OK) {
        c->ready = 1;
        return;
    }
    /* hiredis frees a context whose connect failed without calling the
     * disconnect callback: forget it here. Its pending commands get NULL
     * replies next ("unavailable"). */
    if (c->ac == ac) {
        attempt_failed(c, ac->errstr);
        c->ac = NULL;
        held_fail(c, ac, NULL, NULL);    /* never sent: unavailable */
    }
    ((redisAsyncContext *)ac)->data = NULL;
    cl = c->cl;
    conn_gone(c);
    client_unref(cl);
}

/* Drops a connection now: pending commands get NULL replies. */
static void
conn_drop(struct lredis_conn *c)
{
    redisAsyncContext    *ac = c->ac;
    struct lredis_client *cl = c->cl;
    int                   ready = c->ready;

    if (ac == NULL) {
        return;
    }
    c->ac = NULL;
    c->ready = 0;
    /* the held commands first, while c and ac are sure to live (a woken
     * coroutine may open a new connection on a pool slot c: not ours to
     * touch below) */
    held_fail(c, ac, NULL, NULL);
    if (ready) {
        redisAsyncFree(ac);          /* on_disconnect drops its ref */
        return;
    }
    /* Never connected: no callback will tell us, so clean up here. */
    redisAsyncFree(ac);
    conn_gone(c);
    client_unref(cl);
}

static void
on_disconnect(const redisAsyncContext *ac, int status)
{
    struct lredis_conn *c = ac->data;
    struct lredis_client *cl;

    if (c == NULL) {
        return;
    }
    cl = c->cl;
    guard_errstr(ac);
    if (c->ac == ac) {
        attempt_failed(c, ac->errstr);
        c->ac = NULL;
        c->ready = 0;
        c->pending = 0;
        held_fail(c, ac, NULL, NULL);
    }
    conn_gone(c);
    client_unref(cl);
}

/* Opens a connection (non-blocking). Returns GW_OK, or GW_ERR with a
 * message in err. */
static int
conn_open(struct lredis_conn *c, char *err, size_t errlen)
{
    struct lredis_client   *cl = c->cl;
    redisAsyncContext *ac = redisAsyncConnect(cl->host, cl->port);

    if (ac == NULL) {
        snprintf(err, errlen, "redis: out of memory");
        return GW_ERR;
    }
    if (ac->err) {
        snprintf(err, errlen, "redis: connect %s:%d: %s", cl->host,
                 cl->port, ac->errstr);
        backoff_fail(cl, ac->errstr);
        redisAsyncFree(ac);
        return GW_ERR;
    }
    if (redisLibeventAttach(ac, gw_loop_base()) != REDIS_OK) {
        snprintf(err, errlen, "redis: cannot attach to the loop");
        redisAsyncFree(ac);
        return GW_ERR;
    }
    ac->data = c;
    guard_install(ac);
    redisAsyncSetConnectCallback(ac, on_connect);
    redisAsyncSetDisconnectCallback(ac, on_disconnect);
    c->ac = ac;
    c->ready = 0;
    c->pending = 0;
    c->timedout = 0;
    c->settled = 0;
    c->setup = 0;
    c->held = NULL;                      /* (failed with the last one) */
    c->refused[0] = '\0';
    c->answer[0] = '\0';
    c->proto[0] = '\0';
    c->guard.max = cl->max_reply;
    c->guard.used = 0;
    c->opened = gw_loop_mono_fresh();
    c->since = c->opened;
    cl->refs++;                          /* released in on_disconnect */
    if (cl->password != NULL) {
        redisAsyncCommand(ac, on_setup_reply, (void *)"AUTH", "AUTH %s",
                          cl->password);
        c->pending++;
        c->setup++;
    }
    if (cl->dbnum != 0) {
        redisAsyncCommand(ac, on_setup_reply, (void *)"SELECT",
                          "SELECT %d", cl->dbnum);
        c->pending++;
        c->setup++;
    }
    return GW_OK;
}

/* The error of a command refused while the client waits before its next
 * attempt: "unavailable", or "config" when the server refused the last
 * attempt's AUTH. */
static void
backoff_msg(struct lredis_client *cl, double now, const char **kind,
            char *err, size_t errlen)
{
    *kind = cl->lastkind != NULL ? cl->lastkind : "unavailable";
    snprintf(err, errlen, "redis: not connected: next attempt in %.2f s"
             " (last attempt: %s)", cl->retry_at > now ? cl->retry_at - now
                                                        : 0.0, cl->lasterr);
}

/* 1 while c's context closes after a refused AUTH or SELECT
 * (on_setup_reply()): the replies queued on it still come, but hiredis
 * takes no new command there ("cannot send"), and its slot is not free
 * to open another until it is gone. */
static int
conn_closing(const struct lredis_conn *c)
{
    return c->ac != NULL && (c->ac->c.flags & REDIS_DISCONNECTING) != 0;
}

/* Picks the connection for a command: the slots take turns, and a slot
 * whose turn comes without a connection opens one. Not while the client
 * backs off, nor while another slot's attempt has not answered yet:
 * until the server has shown that it answers, one attempt at a time, so
 * that a burst against a dead server costs one connect, not one per slot.
 * Then any live connection takes the command. NULL + err when none is
 * live and none may be opened (and its kind). */
static struct lredis_conn *
pick_conn(struct lredis_client *cl, const char **kind, char *err,
          size_t errlen)
{
    struct lredis_conn *c = &cl->conns[cl->rr++ % (unsigned)cl->npool];
    struct lredis_conn *live = NULL;
    double              now;
    int                 i, probing = 0;

    if (c->ac != NULL && !conn_closing(c)) {
        return c;
    }
    for (i = 0; i < cl->npool; i++) {
        struct lredis_conn *o = &cl->conns[(cl->rr + i) % (unsigned)cl->npool];

        if (o->ac != NULL && !conn_closing(o)) {
            live = live != NULL ? live : o;
            probing |= !o->settled;
        }
    }
    now = gw_loop_mono_fresh();
    *kind = "unavailable";
    if (now < cl->retry_at || c->ac != NULL) {
        /* (a closing c: its refusal started the wait) */
        backoff_msg(cl, now, kind, err, errlen);
    } else if (!probing && conn_open(c, err, errlen) == GW_OK) {
        return c;
    }
    return live;
}

/* Opens a connection for one blocking command (cmd) that may block for
 * block s (HUGE_VAL: forever), unless the client backs off or has
 * max_blocking of them already. NULL + err and its kind on failure. */
static struct lredis_conn *
alone_open(struct lredis_client *cl, double block, const char *cmd,
           const char **kind, char *err, size_t errlen)
{
    struct lredis_conn *c;
    double              now = gw_loop_mono_fresh();

    *kind = "unavailable";
    if (now < cl->retry_at) {
        backoff_msg(cl, now, kind, err, errlen);
        return NULL;
    }
    if (cl->nalone >= cl->max_blocking) {
        /* refused, not queued: a wait for a slot would come on top of
         * the block time the caller asked for */
        *kind = "busy";
        snprintf(err, errlen, "redis: %.32s refused: %d blocking commands"
                 " already hold connections of their own (max_blocking ="
                 " %d, a redis.connect option)", cmd, cl->nalone,
                 cl->max_blocking);
        return NULL;
    }
    c = calloc(1, sizeof(*c));
    if (c == NULL) {
        snprintf(err, errlen, "redis: out of memory");
        return NULL;
    }
    c->cl = cl;
    if (conn_open(c, err, errlen) != GW_OK) {
        free(c);
        return NULL;
    }
    c->alone = 1;
    c->block = block;
    c->gen = cl->gen;
    c->next = cl->alone;
    if (c->next != NULL) {
        c->next->prev = c;
    }
    cl->alone = c;
    cl->nalone++;
    return c;
}

/* Drops c if it stopped answering, or never connected. */
static void
conn_check(struct lredis_conn *c)
{
    struct lredis_client *cl = c->cl;
    double                now = gw_loop_mono_fresh();
    char                  why[48];
    int                   timedout;

    if (c->ac == NULL) {
        return;
    }
    if (!c->ready && now - c->opened > cl->connect_timeout) {
        snprintf(why, sizeof(why), "connect timed out after %.3g s",
                 cl->connect_timeout);
        timedout = LREDIS_TIMEDOUT_CONNECT;
    } else if (c->pending > 0 && now - c->since > c->block + cl->timeout) {
        snprintf(why, sizeof(why), "no reply within %.3g s",
                 c->block + cl->timeout);
        timedout = LREDIS_TIMEDOUT_REPLY;
    } else {
        return;
    }
    attempt_failed(c, why);              /* conn_drop hides ac from us */
    c->timedout = timedout;
    conn_drop(c);                        /* NULL replies, then disconnect */
}

/* Timer: fail connections that stopped answering, or never connected. */
static void
on_tick(evutil_socket_t fd, short what, void *arg)
{
    struct lredis_client *cl = arg;
    struct lredis_conn   *c, *next;
    int                   i;

    (void)fd;
    (void)what;
    for (i = 0; i < cl->npool; i++) {
        conn_check(&cl->conns[i]);
    }
    /* next first: a dropped record is freed */
    for (c = cl->alone; c != NULL; c = next) {
        next = c->next;
        conn_check(c);
    }
}

/* ------------------------------------------------------------ Lua side */

static struct lredis_client *
check_client(lua_State *L)
{
    struct lredis_ud *ud = gw_checkudata(L, 1, LREDIS_MT);

    if (ud->cl == NULL) {
        luaL_error(L, "redis: client is closed");
    }
    return ud->cl;
}

static void
retired_free(void *arg)
{
    struct lredis_retired *r = arg, *next;

    for (; r != NULL; r = next) {
        struct lredis_client *cl = r->conn.cl;

        next = r->next;
        /* NULL replies for its commands; nothing if hiredis freed it
         * already (a failed connect, the server closing it) */
        conn_drop(&r->conn);
        client_unref(cl);                /* the retirement's own */
        free(r);
    }
}

/* Loop turn after set_addr: drops the blocking commands' connections to
 * an old address (their commands fail "unavailable"). */
static void
alone_retire(void *arg)
{
    struct lredis_client *cl = arg;
    struct lredis_conn   *c, *next;

    for (c = cl->alone; c != NULL; c = next) {
        next = c->next;                  /* c may be freed */
        if (c->gen != cl->gen) {
            conn_drop(c);
        }
    }
    client_unref(cl);                    /* the post's own */
}

/* client:set_addr(ip, port[, keep_backoff]): later commands go there;
 * the connections to the old address are dropped on the next loop turn.
 * The backoff ends (a new master owes nothing to the old one's failures)
 * unless keep_backoff: the next address of one name, tried in turn after
 * a failure, is no news -- were the wait reset at each turn, a name whose
 * addresses are all down would be tried every 0.1 s, never backing off. */
static int
lredis_set_addr(lua_State *L)
{
    struct lredis_client  *cl = check_client(L);
    const char            *host = luaL_checkstring(L, 2);
    int                    port = (int)luaL_checkinteger(L, 3);
    struct lredis_retired *list = NULL, *r;
    char                  *dup;
    int                    i;

    if (!gw_dns_is_numeric(host) || port < 1 || port > 65535) {
        return luaL_error(L, "redis: set_addr wants a numeric address and"
                          " a port");
    }
    dup = strdup(host);
    if (dup == NULL) {
        return luaL_error(L, "redis: out of memory");
    }
    free(cl->host);
    cl->host = dup;
    cl->port = port;
    if (!lua_toboolean(L, 4)) {
        backoff_reset(cl);
    }
    for (i = 0; i < cl->npool; i++) {
        struct lredis_conn *c = &cl->conns[i];

        if (c->ac == NULL) {
            continue;
        }
        r = calloc(1, sizeof(*r));
        if (r == NULL) {
            conn_drop(c);                /* no memory: drop it now */
            continue;
        }
        r->conn = *c;
        r->conn.settled = 1;             /* the old address: not counted */
        r->conn.retired = 1;             /* its held commands stay held */
        r->conn.ac->data = &r->conn;
        r->next = list;
        list = r;
        cl->refs++;
        c->ac = NULL;
        c->ready = 0;
        c->pending = 0;
        c->setup = 0;
        c->held = NULL;                  /* moved to r */
    }
    if (list != NULL && gw_loop_post(retired_free, list) != GW_OK) {
        retired_free(list);
    }
    cl->gen++;
    if (cl->alone != NULL) {
        cl->refs++;
        if (gw_loop_post(alone_retire, cl) != GW_OK) {
            alone_retire(cl);
        }
    }
    return 0;
}

/*
 * core.new(host, port, opts) -> client (no I/O yet)
 * opts: password, db, pool, timeout (s), connect_timeout (s),
 *       max_blocking (blocking commands at once), max_reply (bytes of
 *       one reply; 0: the default)
 */
static int
lredis_new(lua_State *L)
{
    const char      *host = luaL_checkstring(L, 1);
    int              port = (int)luaL_checkinteger(L, 2);
    struct lredis_client *cl;
    struct lredis_ud   *ud;
    struct timeval   tv = { 0, 100000 };
    int              i, npool, dbnum, max_blocking, max_reply;
    double           timeout, connect_timeout;
    const char      *password;
    static const char *const known[] = {
        "password", "db", "pool", "timeout", "connect_timeout",
        "max_blocking", "max_reply", NULL
    };

    /* Checked first: raising must not leak what is allocated below. */
    if (!gw_dns_is_numeric(host)) {
        /* hiredis would resolve it with the blocking system resolver */
        return luaL_error(L, "redis.core.new: host must be a numeric"
                          " address (paygate.redis resolves names)");
    }
    gw_store_opt_known(L, 3, "redis.connect", known);
    timeout = gw_store_opt_num(L, 3, "redis.connect", "timeout", 5, 0);
    connect_timeout = gw_store_opt_num(L, 3, "redis.connect",
                                       "connect_timeout", 2, 0);
    npool = gw_store_opt_int(L, 3, "redis.connect", "pool", 2, 1,
                             LREDIS_MAXPOOL);
    dbnum = gw_store_opt_int(L, 3, "redis.connect", "db", 0, 0, INT_MAX);
    max_blocking = gw_store_opt_int(L, 3, "redis.connect", "max_blocking",
                                    LREDIS_MAXBLOCKING, 1, INT_MAX);
    max_reply = gw_store_opt_int(L, 3, "redis.connect", "max_reply", 0, 0,
                                 INT_MAX);
    if (max_reply > 0 && max_reply < LREDIS_MINREPLY) {
        /* (each value counts 56 bytes: a bound this small would refuse
         * every reply, AUTH's and SELECT's included) */
        return luaL_error(L, "redis.connect: opts.max_reply must be 0 (the"
                          " default, %d) or at least %d bytes",
                          LREDIS_MAXREPLY, LREDIS_MINREPLY);
    }
    password = gw_store_opt_str(L, 3, "redis.connect", "password");
    ud = lua_newuserdata(L, sizeof(*ud));
    ud->cl = NULL;
    luaL_getmetatable(L, LREDIS_MT);
    lua_setmetatable(L, -2);
    cl = calloc(1, sizeof(*cl));
    if (cl == NULL) {
        return luaL_error(L, "redis: out of memory");
    }
    ud->cl = cl;
    cl->refs = 1;
    cl->host = strdup(host);
    cl->port = port;
    cl->timeout = timeout;
    cl->connect_timeout = connect_timeout;
    cl->npool = npool;
    cl->dbnum = dbnum;
    cl->max_blocking = max_blocking;
    cl->max_reply = max_reply > 0 ? (size_t)max_reply : LREDIS_MAXREPLY;
    if (password != NULL) {
        cl->password = strdup(password);
        if (cl->password == NULL) {
            return luaL_error(L, "redis: out of memory");
        }
    }
    for (i = 0; i < cl->npool; i++) {
        cl->conns[i].cl = cl;
    }
    cl->T = lua_newthread(L);
    cl->tref = luaL_ref(L, LUA_REGISTRYINDEX);
    cl->tick = event_new(gw_loop_base(), -1, EV_PERSIST, on_tick, cl);
    if (cl->host == NULL || cl->tick == NULL) {
        return luaL_error(L, "redis: out of memory");
    }
    event_add(cl->tick, &tv);
    return 1;
}

/* Loop turn after close(): drops the connections, then the client. */
static void
close_conns(void *arg)
{
    struct lredis_client *cl = arg;
    struct lredis_conn   *c, *next;

    cl->refs++;                          /* conn_drop may drop the last */
    for (int i = 0; i < cl->npool; i++) {
        /* Pending commands get NULL replies ("closed"); inside a hiredis
         * callback the free is deferred by hiredis. */
        conn_drop(&cl->conns[i]);
    }
    for (c = cl->alone; c != NULL; c = next) {
        next = c->next;                  /* c may be freed */
        conn_drop(c);
    }
    client_unref(cl);
    client_unref(cl);
}

static int
lredis_close(lua_State *L)
{
    struct lredis_ud   *ud = gw_checkudata(L, 1, LREDIS_MT);
    struct lredis_client *cl = ud->cl;

    if (cl == NULL) {
        return 0;
    }
    ud->cl = NULL;
    cl->closed = 1;
    event_del(cl->tick);
    /* Dropping the connections fails their pending commands, which wakes
     * the coroutines waiting on them: not from inside the running one
     * (runtime.h), so on the next loop turn. New calls already fail. */
    if (gw_loop_post(close_conns, cl) != GW_OK) {
        close_conns(cl);
    }
    return 0;
}

/* Collects argv from Lua values at [first, last] of L into args/lens. */
static int
collect_args(lua_State *L, int tbl, int first, int last, const char **args,
             size_t *lens)
{
    int i, n = 0;

    for (i = first; i <= last; i++) {
        if (n == LREDIS_MAXARGS) {
            return luaL_error(L, "redis: more than %d arguments",
                              LREDIS_MAXARGS);
        }
        if (tbl) {
            lua_rawgeti(L, tbl, i);
        } else {
            lua_pushvalue(L, i);
        }
        if (lua_type(L, -1) == LUA_TBOOLEAN) {
            lua_pushstring(L, lua_toboolean(L, -1) ? "1" : "0");
            lua_replace(L, -2);
        } else if (lua_type(L, -1) == LUA_TNUMBER) {
            /* Not tostring()'s "%.14g": 123456789012345 would go as
             * "1.2345678901234e+14". */
            char   buf[40];
            double d = lua_tonumber(L, -1);

            if (d == floor(d) && fabs(d) < 9.2e18) {
                snprintf(buf, sizeof(buf), "%lld", (long long)d);
            } else {
                snprintf(buf, sizeof(buf), "%.14g", d);
                if (strtod(buf, NULL) != d) {
                    snprintf(buf, sizeof(buf), "%.17g", d);
                }
            }
            lua_pushstring(L, buf);
            lua_replace(L, -2);
        }
        if (!lua_isstring(L, -1)) {
            return luaL_error(L, "redis: argument %d must be a string or"
                              " number, got %s", n + 1, luaL_typename(L, -1));
        }
        /* Keep it on the stack (anchored) until the command is sent. */
        args[n] = lua_tolstring(L, -1, &lens[n]);
        n++;
    }
    return n;
}

/* Raises (misuse) unless every command of the pipeline at tbl can be
 * collected: before anything is allocated or sent, so that a bad value
 * in command 2 neither sends command 1 nor leaks the op, its results
 * ref and a client reference (the op would wait forever for a reply
 * to a command never sent). */
static void
check_pipeline(lua_State *L, int tbl, int ncmds)
{
    int i, k, n, t;

    for (i = 1; i <= ncmds; i++) {
        lua_rawgeti(L, tbl, i);
        if (!lua_istable(L, -1) || lua_objlen(L, -1) < 1) {
            luaL_error(L, "redis: pipeline command %d must be a non-empty"
                       " array", i);
        }
        n = (int)lua_objlen(L, -1);
        if (n > LREDIS_MAXARGS) {
            luaL_error(L, "redis: more than %d arguments", LREDIS_MAXARGS);
        }
        for (k = 1; k <= n; k++) {
            lua_rawgeti(L, -1, k);
            t = lua_type(L, -1);
            if (t != LUA_TSTRING && t != LUA_TNUMBER && t != LUA_TBOOLEAN) {
                luaL_error(L, "redis: pipeline command %d: argument %d must"
                           " be a string or number, got %s", i, k,
                           lua_typename(L, t));
            }
            lua_pop(L, 1);
        }
        lua_pop(L, 1);
    }
}

/* Loop thread: the coroutine waiting on op is abandoned. */
static void
op_cancel(void *arg)
{
    struct lredis_op *op = arg;

    op->co = NULL;
}

/* Sends the command at [first, top] of L on the connection pick() gives
 * and waits for its reply. */
static int
call_on(lua_State *L, struct lredis_client *cl, int first, double block)
{
    const char      *args[LREDIS_MAXARGS];
    size_t           lens[LREDIS_MAXARGS];
    struct lredis_conn *c;
    struct lredis_op   *op;
    const char      *kind = "unavailable";
    char             err[200];
    int              top = lua_gettop(L), n;

    gw_co_current(L);
    if (!lua_isyieldable(L)) {
        /* gw_co_wait would raise after the command was sent: it would run
         * for a caller told that the call raised */
        return gw_co_unyieldable(L);
    }
    luaL_checkstring(L, first);
    luaL_checkstack(L, top + 8, "redis: too many arguments");
    if (top - first + 1 > LREDIS_MAXARGS) {
        return luaL_error(L, "redis: more than %d arguments",
                          LREDIS_MAXARGS);
    }
    n = collect_args(L, 0, first, top, args, lens);
    c = block < 0 ? pick_conn(cl, &kind, err, sizeof(err))
                  : alone_open(cl, block, args[0], &kind, err, sizeof(err));
    if (c == NULL) {
        return gw_push_error(L, kind, strcmp(kind, "config") != 0, "%s",
                             err);
    }
    op = calloc(1, sizeof(*op));
    if (op == NULL) {
        if (c->alone) {
            conn_drop(c);                /* nothing pending on it */
        }
        return gw_push_error(L, "unavailable", 1, "redis: out of memory");
    }
    op->cl = cl;
    op->ncmds = 1;
    op->results = LUA_NOREF;
    if (conn_send(c, op, n, args, lens) != REDIS_OK) {
        free(op);
        n = gw_push_error(L, "unavailable", 1, "redis: cannot send: %s",
                          c->ac->errstr[0] != '\0' ? c->ac->errstr
                                                    : "out of memory");
        if (c->alone) {
            conn_drop(c);
        }
        return n;
    }
    cl->refs++;
    if (c->pending++ == 0) {
        c->since = gw_loop_mono_fresh();
    }
    op->co = gw_co_current(L);
    return gw_co_wait(L, op_cancel, op);
}

/* client:call(cmd, ...) -> reply | nil, err */
static int
lredis_call(lua_State *L)
{
    return call_on(L, check_client(L), 2, -1);
}

/* client:call_blocking(block, cmd, ...) -> reply | nil, err: a command
 * that may block for block s (math.huge: forever), on a connection of
 * its own; its reply may take block s more than the timeout. */
static int
lredis_call_blocking(lua_State *L)
{
    struct lredis_client *cl = check_client(L);
    double                block = luaL_checknumber(L, 2);

    if (!(block >= 0)) {
        return luaL_error(L, "redis: call_blocking: block must be a number"
                          " of seconds >= 0");
    }
    return call_on(L, cl, 3, block);
}

/* client:pipeline({ {cmd, ...}, ... }) -> { reply or err, ... } | nil, err */
static int
lredis_pipeline(lua_State *L)
{
    struct lredis_client *cl = check_client(L);
    const char      *args[LREDIS_MAXARGS];
    size_t           lens[LREDIS_MAXARGS];
    struct lredis_conn *c;
    struct lredis_op   *op;
    const char      *kind;
    char             err[200];
    int              i, ncmds, n, base;

    gw_co_current(L);
    if (!lua_isyieldable(L)) {
        return gw_co_unyieldable(L);    /* as call_on: before any send */
    }
    luaL_checktype(L, 2, LUA_TTABLE);
    ncmds = (int)lua_objlen(L, 2);
    check_pipeline(L, 2, ncmds);         /* collect_args cannot raise now */
    lua_createtable(L, ncmds, 0);
    if (ncmds == 0) {
        return 1;
    }
    c = pick_conn(cl, &kind, err, sizeof(err));
    if (c == NULL) {
        return gw_push_error(L, kind, strcmp(kind, "config") != 0, "%s",
                             err);
    }
    op = calloc(1, sizeof(*op));
    if (op == NULL) {
        return gw_push_error(L, "unavailable", 1, "redis: out of memory");
    }
    op->cl = cl;
    op->ncmds = ncmds;
    op->results = luaL_ref(L, LUA_REGISTRYINDEX);
    cl->refs++;
    for (i = 1; i <= ncmds; i++) {
        lua_rawgeti(L, 2, i);
        base = lua_gettop(L);
        luaL_checkstack(L, (int)lua_objlen(L, base) + 8, "redis: too many"
                        " arguments");
        n = collect_args(L, base, 1, (int)lua_objlen(L, base), args, lens);
        if (conn_send(c, op, n, args, lens) != REDIS_OK) {
            /* Count the unsent ones as failed replies. */
            snprintf(op->kind, sizeof(op->kind), "unavailable");
            snprintf(op->msg, sizeof(op->msg), "redis: cannot send");
            op->ncmds = i - 1;
            lua_settop(L, base - 1);
            break;
        }
        if (c->pending++ == 0) {
            c->since = gw_loop_mono_fresh();
        }
        lua_settop(L, base - 1);
    }
    if (op->ncmds == 0) {
        luaL_unref(L, LUA_REGISTRYINDEX, op->results);
        free(op);
        client_unref(cl);
        return gw_push_error(L, "unavailable", 1, "redis: cannot send");
    }
    op->co = gw_co_current(L);
    return gw_co_wait(L, op_cancel, op);
}

/* core.sha1hex(s) -> 40 hex digits (script ids for EVALSHA) */
static int
lredis_sha1hex(lua_State *L)
{
    size_t        len;
    const char   *s = luaL_checklstring(L, 1, &len);
    unsigned char md[SHA_DIGEST_LENGTH];
    char          hex[2 * SHA_DIGEST_LENGTH + 1];
    int           i;

    SHA1((const unsigned char *)s, len, md);
    for (i = 0; i < SHA_DIGEST_LENGTH; i++) {
        snprintf(hex + 2 * i, 3, "%02x", md[i]);
    }
    lua_pushlstring(L, hex, 2 * SHA_DIGEST_LENGTH);
    return 1;
}

/* ------------------------------------------------------ subscriptions */

/*
 * core.subscribe(host, port, channel, opts) -> sub: one connection in
 * subscribe mode (what Sentinel's +switch-master needs); sub:next(secs)
 * yields until a message's payload (or nil, err: "timeout" when none
 * came in secs, "unavailable" once the connection is gone). It gives true
 * once, first, when the server confirmed the SUBSCRIBE: what was
 * published before then was never sent here, and the caller may want to
 * look for what it missed. Messages that arrive while nobody waits are
 * queued (the newest LREDIS_SUB_MAXQ).
 *
 * Lifetime: struct lredis_sub lives until the Lua handle was closed (or
 * collected) and the context is gone. close() frees the context on the
 * next loop turn: freeing it runs hiredis callbacks, which must not wake
 * a coroutine from inside the running one.
 */
#define LREDIS_SUB_MT    "paygate.redis.sub"
#define LREDIS_SUB_MAXQ  64

struct lredis_sub {
    redisAsyncContext *ac;       /* owned; NULL once gone */
    int                lua_open; /* the Lua handle refers to it */
    int                killing;  /* a context free is posted */
    int                waking;   /* inside sub_wake(): not freed */
    struct gw_co      *co;       /* waiting in next(), or NULL */
    struct event      *timer;    /* owned; next()'s deadline */
    char              *q[LREDIS_SUB_MAXQ];    /* owned payloads; NULL:
                                                 the confirmation */
    size_t             qlen[LREDIS_SUB_MAXQ]; /* bytes */
    int                qhead, qn;             /* ring buffer */
    char               err[160]; /* why the connection ended, or "" */
    struct lredis_guard guard;   /* (the default max_reply) */
};

struct lredis_sub_ud {
    struct lredis_sub *s;        /* NULL once closed */
};

/* Takes the oldest queued message off (s->qn > 0): pushed onto L
 * unless L is NULL (true for the confirmation), then freed. */
static void
sub_shift(struct lredis_sub *s, lua_State *L)
{
    if (L != NULL && s->q[s->qhead] == NULL) {
        lua_pushboolean(L, 1);
    } else if (L != NULL) {
        lua_pushlstring(L, s->q[s->qhead], s->qlen[s->qhead]);
    }
    free(s->q[s->qhead]);
    s->qhead = (s->qhead + 1) % LREDIS_SUB_MAXQ;
    s->qn--;
}

static void
sub_maybe_free(struct lredis_sub *s)
{
    if (s->lua_open || s->ac != NULL || s->co != NULL || s->killing
        || s->waking)
    {
        return;
    }
    while (s->qn > 0) {
        sub_shift(s, NULL);
    }
    if (s->timer != NULL) {
        event_free(s->timer);
    }
    free(s);
}

/* Loop callbacks only: hands the waiting coroutine the oldest message or
 * the connection's end. */
static void
sub_wake(struct lredis_sub *s)
{
    struct gw_co *co = s->co;
    lua_State    *L;
    int           n;

    if (co == NULL || (s->qn == 0 && s->ac != NULL)) {
        return;
    }
    s->co = NULL;
    event_del(s->timer);
    L = gw_co_state(co);
    if (s->qn > 0) {
        sub_shift(s, L);
        n = 1;
    } else {
        n = gw_push_error(L, "unavailable", 1, "redis: subscription"
                          " lost: %s", s->err[0] ? s->err : "closed");
    }
    s->waking = 1;                       /* the coroutine may close s */
    gw_co_wake(co, n);
    s->waking = 0;
}

static void
on_sub_msg(redisAsyncContext *ac, void *reply, void *privdata)
{
    struct lredis_sub *s = privdata;
    redisReply        *r = reply;
    char              *copy = NULL;
    size_t             len = 0;
    int                slot;

    if (r == NULL || ac->data == NULL || r->type != REDIS_REPLY_ARRAY
        || r->elements != 3 || r->element[0]->type != REDIS_REPLY_STRING)
    {
        return;
    }
    if (strcmp(r->element[0]->str, "message") == 0
        && r->element[2]->type == REDIS_REPLY_STRING)
    {
        len = r->element[2]->len;
        copy = malloc(len + 1);
        if (copy == NULL) {
            return;
        }
        memcpy(copy, r->element[2]->str, len + 1);
    } else if (strcmp(r->element[0]->str, "subscribe") != 0) {
        return;
    }                                    /* (the confirmation: NULL) */
    if (s->qn == LREDIS_SUB_MAXQ) {
        sub_shift(s, NULL);              /* drop the oldest */
    }
    slot = (s->qhead + s->qn) % LREDIS_SUB_MAXQ;
    s->q[slot] = copy;
    s->qlen[slot] = len;
    s->qn++;
    sub_wake(s);
    sub_maybe_free(s);
}

static void
sub_gone(struct lredis_sub *s, const redisAsyncContext *ac)
{
    if (s->err[0] == '\0') {
        snprintf(s->err, sizeof(s->err), "%s",
                 ac->errstr[0] != '\0' ? ac->errstr : "connection closed");
    }
    s->ac = NULL;
    sub_wake(s);
    sub_maybe_free(s);
}

static void
on_sub_connect(const redisAsyncContext *ac, int status)
{
    struct lredis_sub *s = ac->data;

    if (s != NULL && status != REDIS_OK) {
        sub_gone(s, ac);                 /* hiredis frees ac itself */
    }
}

static void
on_sub_disconnect(const redisAsyncContext *ac, int status)
{
    struct lredis_sub *s = ac->data;

    (void)status;
    if (s != NULL) {
        sub_gone(s, ac);
    }
}

static void
sub_on_timer(evutil_socket_t fd, short what, void *arg)
{
    struct lredis_sub *s = arg;
    struct gw_co      *co = s->co;

    (void)fd;
    (void)what;
    if (co == NULL) {
        return;
    }
    s->co = NULL;
    s->waking = 1;
    gw_co_wake(co, gw_push_error(gw_co_state(co), "timeout", 1,
                                 "redis: no message"));
    s->waking = 0;
    sub_maybe_free(s);
}

/* Next loop turn after close(): frees the context. */
static void
sub_kill(void *arg)
{
    struct lredis_sub *s = arg;
    redisAsyncContext *ac = s->ac;

    s->killing = 0;
    if (ac != NULL) {
        s->ac = NULL;
        ac->data = NULL;                 /* its callbacks ignore it now */
        redisAsyncFree(ac);
    }
    sub_maybe_free(s);
}

static void
sub_cancel(void *arg)
{
    struct lredis_sub *s = arg;

    s->co = NULL;
    event_del(s->timer);
    sub_maybe_free(s);
}

static int
lredis_sub_close(lua_State *L)
{
    struct lredis_sub_ud *ud = gw_checkudata(L, 1, LREDIS_SUB_MT);
    struct lredis_sub    *s = ud->s;

    if (s == NULL) {
        return 0;
    }
    ud->s = NULL;
    s->lua_open = 0;
    if (s->ac != NULL && !s->killing) {
        s->killing = 1;
        if (gw_loop_post(sub_kill, s) != GW_OK) {
            s->killing = 0;              /* no memory: leak the context */
        }
    }
    sub_maybe_free(s);
    return 0;
}

/* sub:next(secs) -> payload | true (subscribed) | nil, err */
static int
lredis_sub_next(lua_State *L)
{
    struct lredis_sub_ud *ud = gw_checkudata(L, 1, LREDIS_SUB_MT);
    struct lredis_sub    *s = ud->s;
    double                secs = luaL_checknumber(L, 2);
    struct timeval        tv;
    struct gw_co         *co = gw_co_current(L);

    if (s == NULL) {
        return luaL_error(L, "redis: subscription is closed");
    }
    if (s->co != NULL) {
        return luaL_error(L, "redis: sub:next is already waiting");
    }
    if (s->qn > 0) {
        sub_shift(s, L);
        return 1;
    }
    if (s->ac == NULL) {
        return gw_push_error(L, "unavailable", 1, "redis: subscription"
                             " lost: %s", s->err);
    }
    if (secs < 0) {
        secs = 0;
    }
    tv.tv_sec = (time_t)secs;
    tv.tv_usec = (suseconds_t)((secs - (double)tv.tv_sec) * 1e6);
    s->co = co;
    event_add(s->timer, &tv);
    return gw_co_wait(L, sub_cancel, s);
}

/* -------------------------------------------------------- reply guard */

/*
 * hiredis 0.14 aborts the process (an assert) on a reply it cannot hand
 * to anyone: on a connection not subscribed, one that no command asked
 * for (a broken or hostile server, a proxy answering twice); on a
 * subscribed one, a message that is not an array of at least three
 * elements whose first two are strings, or an unsubscribe whose count is
 * not an integer. Its reader builds every reply through the functions
 * below, which check it first. A reply refused fails the reader as any
 * protocol error does: the connection is dropped and never used again,
 * every command on it fails "unavailable" (err.sent: the server may have
 * run it), a subscription is lost. hiredis calls the failure "Out of
 * memory": the reason is kept on the record and shown instead
 * (guard_errstr()). A bulk string must end with CRLF where its length
 * says. An error reply nobody asked for is let through:
 * hiredis closes the connection with it as the reason ("ERR max number
 * of clients reached").
 *
 * A reply may take max_reply bytes (guard_count()): hiredis 0.14 has no
 * bound of its own, and holds a bulk string until all of it came, so a
 * server that declares $1000000000 and streams was read until the
 * command's timeout (200 MB held in 2 s). A reply past it is refused as
 * above, as soon as that shows: an array on its header (*N), before its
 * elements are allocated; a bulk string still coming on its header, a
 * line still coming once what came of it is past the bound
 * (guard_pending(), after each read: at most one read, 16 KB, past it).
 */
static redisReplyObjectFunctions *guard_base;  /* hiredis's own */
static redisReplyObjectFunctions  guard_fns;   /* ours, over them */

/* What one value of a reply costs besides its string: hiredis's
 * redisReply and its parent array's pointer to it. An array's elements
 * are counted on its header (elements * GUARD_VALUE): before any of them
 * came, and before hiredis allocates their pointers. */
#define GUARD_VALUE (sizeof(redisReply) + sizeof(redisReply *))

/* The context guard_on_read() is reading on; NULL once freed in there. */
static redisAsyncContext *guard_reading;

/* Keeps why ac's reply was refused where its errors are told. */
static void
guard_refuse(redisAsyncContext *ac, const char *why)
{
    if (ac->data == NULL) {
        return;
    }
    if (ac->onConnect == on_sub_connect) {
        struct lredis_sub *s = ac->data;

        if (s->err[0] == '\0') {
            snprintf(s->err, sizeof(s->err), "Protocol error: %s", why);
        }
    } else {
        struct lredis_conn *c = ac->data;

        snprintf(c->proto, sizeof(c->proto), "Protocol error: %s", why);
    }
}

/* ac's reply bound, or NULL (a context going away) */
static struct lredis_guard *
guard_of(const redisAsyncContext *ac)
{
    if (ac->data == NULL) {
        return NULL;
    }
    if (ac->onConnect == on_sub_connect) {
        return &((struct lredis_sub *)ac->data)->guard;
    }
    return &((struct lredis_conn *)ac->data)->guard;
}

/* Refuses ac's reply as past max bytes: for a part past it alone (type
 * REDIS_REPLY_STRING: a bulk string of n bytes; REDIS_REPLY_ARRAY: an
 * array of n elements), or the reply as a whole (type 0). why gets the
 * reason. */
static void
guard_too_big(redisAsyncContext *ac, int type, unsigned long long n,
              size_t max, char *why, size_t len)
{
    if (type == REDIS_REPLY_STRING) {
        snprintf(why, len, "a bulk string of %llu bytes, past max_reply"
                 " (%zu bytes)", n, max);
    } else if (type == REDIS_REPLY_ARRAY) {
        snprintf(why, len, "an array of %llu elements, past max_reply"
                 " (%zu bytes)", n, max);
    } else {
        snprintf(why, len, "a reply past max_reply (%zu bytes)", max);
    }
    guard_refuse(ac, why);
    /* The server answered: only our bound refused what it said, so the
     * attempt succeeded. Counted failed (as the context goes, on a
     * connection's first reply), it made the client back off: every
     * command failed "not connected" for up to LREDIS_BACKOFF_MAX. */
    if (ac->data != NULL && ac->onConnect != on_sub_connect
        && conn_of(ac)->ac == ac)
    {
        attempt_ok(conn_of(ac));
    }
}

/* Counts bytes (a string's length, an array's elements * GUARD_VALUE) of
 * the reply part task (type, n: see guard_too_big()) against max_reply:
 * 1 while within it, 0 after a refusal. A reply's first part (no parent:
 * its array's header, or the reply itself) starts the count. */
static int
guard_count(const redisReadTask *task, unsigned long long bytes, int type,
            unsigned long long n)
{
    redisAsyncContext   *ac = task->privdata;
    struct lredis_guard *g = guard_of(ac);
    char                 why[96];

    if (g == NULL) {
        return 1;
    }
    if (task->parent == NULL) {
        g->used = 0;
        bytes += GUARD_VALUE;
    }
    if (bytes <= g->max - g->used) {     /* (used <= max) */
        g->used += (size_t)bytes;
        return 1;
    }
    guard_too_big(ac, bytes > g->max ? type : 0, n, g->max, why,
                  sizeof(why));
    return 0;
}

/* 1 when the reply part task (of type: REDIS_REPLY_*, elements for an
 * array) may be built, 0 after guard_refuse(). */
static int
guard_ok(const redisReadTask *task, int type, long long elements)
{
    redisAsyncContext   *ac = task->privdata;
    const redisReadTask *top = task->parent;
    const char          *why = NULL;

    if (ac->replies.head != NULL
        || (ac->c.flags & REDIS_MONITORING) != 0)
    {
        return 1;                        /* a command awaits it */
    }
    if ((ac->c.flags & REDIS_SUBSCRIBED) == 0) {
        if (top == NULL && type != REDIS_REPLY_ERROR) {
            why = "a reply no command asked for";
        }
    } else if (top == NULL) {
        if (type == REDIS_REPLY_ARRAY && elements < 3) {
            why = "a pub/sub message of fewer than 3 elements";
        }
    } else if (top->parent == NULL) {
        redisReply *m = top->obj;
        const char *kind;

        if (task->idx < 2 && type != REDIS_REPLY_STRING) {
            why = "a pub/sub message whose kind or channel is not a"
                  " bulk string";
        } else if (task->idx == 2 && type != REDIS_REPLY_INTEGER) {
            kind = m->element[0]->str;
            kind += tolower((unsigned char)kind[0]) == 'p';
            if (strcasecmp(kind, "unsubscribe") == 0) {
                why = "an unsubscribe whose count is not an integer";
            }
        }
    }
    if (why == NULL) {
        return 1;
    }
    guard_refuse(ac, why);
    return 0;
}

static void *
guard_string(const redisReadTask *task, char *str, size_t len)
{
    /* hiredis 0.14 skips the two bytes after a bulk string unread: a
     * length that lies (a value cut short, or run into the next reply)
     * was handed to the caller. They are in the buffer (read before the
     * string is built). */
    if (task->type == REDIS_REPLY_STRING
        && (str[len] != '\r' || str[len + 1] != '\n'))
    {
        guard_refuse(task->privdata, "a bulk string not ended where its"
                     " length says");
        return NULL;
    }
    return guard_ok(task, task->type, 0)
           && guard_count(task, len, task->type, len)
           ? guard_base->createString(task, str, len) : NULL;
}

static void *
guard_array(const redisReadTask *task, int elements)
{
    /* (elements is at least 0: hiredis builds no array of -1) */
    return guard_ok(task, REDIS_REPLY_ARRAY, elements)
           && guard_count(task, (unsigned long long)elements * GUARD_VALUE,
                          REDIS_REPLY_ARRAY, (unsigned long long)elements)
           ? guard_base->createArray(task, elements) : NULL;
}

static void *
guard_integer(const redisReadTask *task, long long value)
{
    return guard_ok(task, REDIS_REPLY_INTEGER, 0)
           && guard_count(task, 0, 0, 0)
           ? guard_base->createInteger(task, value) : NULL;
}

static void *
guard_nil(const redisReadTask *task)
{
    return guard_ok(task, REDIS_REPLY_NIL, 0) && guard_count(task, 0, 0, 0)
           ? guard_base->createNil(task) : NULL;
}

/* The length a bulk string's header declares (r's part being read is a
 * bulk string, its '$' read: hiredis 0.14 parses the header again at each
 * read until the whole string came), or 0 while the header's line has
 * not all come. hiredis took it (a length out of range fails the reply),
 * so it is digits alone. */
static unsigned long long
guard_bulk_len(const redisReader *r)
{
    const char         *p = r->buf + r->pos, *end = r->buf + r->len;
    unsigned long long  n = 0;

    if (memchr(p, '\r', (size_t)(end - p)) == NULL) {
        return 0;
    }
    for (; p < end && isdigit((unsigned char)*p); p++) {
        if (n > (ULLONG_MAX - 9) / 10) {
            return ULLONG_MAX;
        }
        n = n * 10 + (unsigned long long)(*p - '0');
    }
    return n;
}

/* After a read on ac: refuses the reply being read when its part still
 * coming (a bulk string: its declared length; a line: what came of it)
 * takes it past max_reply. It fails ac's context as a refusal by the
 * builders above does: 1, and the next redisAsyncHandleRead() drops it
 * (hiredis reads nothing more on a context with an error). */
static int
guard_pending(redisAsyncContext *ac)
{
    redisReader         *r = ac->c.reader;
    struct lredis_guard *g = guard_of(ac);
    unsigned long long   more, declared;
    size_t               used;
    int                  type = 0;
    char                 why[96];

    if (g == NULL || r == NULL || r->ridx < 0 || ac->c.err != 0) {
        return 0;
    }
    /* counted since its array's header; a reply of one part: its own */
    used = r->ridx > 0 ? g->used : GUARD_VALUE;
    more = r->len - r->pos;
    if (r->rstack[r->ridx].type == REDIS_REPLY_STRING) {
        declared = guard_bulk_len(r);
        if (declared > more) {
            more = declared;
            type = REDIS_REPLY_STRING;
        }
    }
    if (used <= g->max && more <= g->max - used) {
        return 0;
    }
    guard_too_big(ac, more > g->max ? type : 0, more, g->max, why,
                  sizeof(why));
    ac->c.err = REDIS_ERR_PROTOCOL;
    snprintf(ac->c.errstr, sizeof(ac->c.errstr), "Protocol error: %s",
             why);
    return 1;
}

/* The read event of a guarded context: hiredis's, then guard_pending(). */
static void
guard_on_read(evutil_socket_t fd, short what, void *arg)
{
    redisLibeventEvents *e = arg;
    redisAsyncContext   *ac = e->context;

    guard_reading = ac;
    redisLibeventReadEvent(fd, what, arg);
    /* (the read may have ended the context: guard_cleanup() says so) */
    if (guard_reading == ac && guard_pending(ac)) {
        redisAsyncHandleRead(ac);
    }
    guard_reading = NULL;
}

/* hiredis frees a context's events: it is gone */
static void
guard_cleanup(void *privdata)
{
    redisLibeventEvents *e = privdata;

    if (e->context == guard_reading) {
        guard_reading = NULL;
    }
    redisLibeventCleanup(privdata);
}

/* Puts the guard on a new context's reader, and guard_on_read() on its
 * read event (redisLibeventAttach() added it). */
static void
guard_install(redisAsyncContext *ac)
{
    redisLibeventEvents *e = ac->ev.data;

    if (guard_base == NULL) {
        guard_base = ac->c.reader->fn;
        guard_fns = *guard_base;
        guard_fns.createString = guard_string;
        guard_fns.createArray = guard_array;
        guard_fns.createInteger = guard_integer;
        guard_fns.createNil = guard_nil;
    }
    ac->c.reader->fn = &guard_fns;
    /* (what redisReaderSetPrivdata does; its macro casts the pointer to
     * int, which clang warns about) */
    ac->c.reader->privdata = ac;
    event_del(e->rev);
    event_assign(e->rev, event_get_base(e->rev), ac->c.fd, EV_READ,
                 guard_on_read, e);
    event_add(e->rev, NULL);
    ac->ev.cleanup = guard_cleanup;
}

/* A pool or blocking connection's context fails: when the guard refused
 * a reply, its reason replaces hiredis's "Out of memory" in ac->errstr,
 * which its commands' errors show. */
static void
guard_errstr(const redisAsyncContext *ac)
{
    struct lredis_conn *c = ac->data;

    if (c != NULL && c->ac == ac && c->proto[0] != '\0') {
        snprintf(((redisAsyncContext *)ac)->c.errstr,
                 sizeof(ac->c.errstr), "%s", c->proto);
    }
}

static int
lredis_subscribe(lua_State *L)
{
    const char           *host = luaL_checkstring(L, 1);
    int                   port = (int)luaL_checkinteger(L, 2);
    const char           *channel = luaL_checkstring(L, 3);
    const char           *password;
    struct lredis_sub_ud *ud;
    struct lredis_sub    *s;
    redisAsyncContext    *ac;
    static const char *const known[] = { "password", NULL };

    if (!gw_dns_is_numeric(host)) {
        return luaL_error(L, "redis.core.subscribe: host must be a numeric"
                          " address");
    }
    gw_store_opt_known(L, 4, "redis.subscribe", known);
    password = gw_store_opt_str(L, 4, "redis.subscribe", "password");
    ud = lua_newuserdata(L, sizeof(*ud));
    ud->s = NULL;
    luaL_getmetatable(L, LREDIS_SUB_MT);
    lua_setmetatable(L, -2);
    s = calloc(1, sizeof(*s));
    if (s == NULL) {
        return luaL_error(L, "redis: out of memory");
    }
    s->timer = evtimer_new(gw_loop_base(), sub_on_timer, s);
    if (s->timer == NULL) {
        free(s);
        return luaL_error(L, "redis: out of memory");
    }
    s->lua_open = 1;
    s->guard.max = LREDIS_MAXREPLY;
    ud->s = s;
    ac = redisAsyncConnect(host, port);
    if (ac == NULL || ac->err
        || redisLibeventAttach(ac, gw_loop_base()) != REDIS_OK)
    {
        snprintf(s->err, sizeof(s->err), "connect %s:%d: %s", host, port,
                 ac != NULL ? ac->errstr : "out of memory");
        if (ac != NULL) {
            redisAsyncFree(ac);
        }
        return 1;                        /* next() reports it */
    }
    ac->data = s;
    guard_install(ac);
    redisAsyncSetConnectCallback(ac, on_sub_connect);
    redisAsyncSetDisconnectCallback(ac, on_sub_disconnect);
    s->ac = ac;
    if (password != NULL) {
        redisAsyncCommand(ac, NULL, NULL, "AUTH %s", password);
    }
    redisAsyncCommand(ac, on_sub_msg, s, "SUBSCRIBE %s", channel);
    return 1;
}

/* __gc: close(), for our own userdata only (a finalizer must not raise:
 * a metatable copied onto another userdata would call it) */
static int
lredis_gc(lua_State *L)
{
    if (gw_testudata(L, 1, LREDIS_MT) == NULL) {
        return 0;
    }
    return lredis_close(L);
}

static int
lredis_sub_gc(lua_State *L)
{
    if (gw_testudata(L, 1, LREDIS_SUB_MT) == NULL) {
        return 0;
    }
    return lredis_sub_close(L);
}

static const luaL_Reg lredis_sub_methods[] = {
    { "next", lredis_sub_next },
    { "close", lredis_sub_close },
    { NULL, NULL }
};

static const luaL_Reg lredis_methods[] = {
    { "call", lredis_call },
    { "call_blocking", lredis_call_blocking },
    { "pipeline", lredis_pipeline },
    { "set_addr", lredis_set_addr },
    { "close", lredis_close },
    { NULL, NULL }
};

static const luaL_Reg lredis_funcs[] = {
    { "new", lredis_new },
    { "subscribe", lredis_subscribe },
    { "sha1hex", lredis_sha1hex },
    { NULL, NULL }
};

int
luaopen_paygate_redis_core(lua_State *L)
{
    luaL_newmetatable(L, LREDIS_MT);
    lua_pushcfunction(L, lredis_gc);
    lua_setfield(L, -2, "__gc");
    lua_newtable(L);
    luaL_register(L, NULL, lredis_methods);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
    luaL_newmetatable(L, LREDIS_SUB_MT);
    lua_pushcfunction(L, lredis_sub_gc);
    lua_setfield(L, -2, "__gc");
    lua_newtable(L);
    luaL_register(L, NULL, lredis_sub_methods);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
    lua_newtable(L);
    luaL_register(L, NULL, lredis_funcs);
    lua_pushlightuserdata(L, NULL);
    lua_setfield(L, -2, "null");
    return 1;
}
