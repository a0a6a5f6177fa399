/*
 * lpg.c -- paygate.pg.core: PostgreSQL through libpq's non-blocking API
 * on the process's event base.
 *
 * A pool holds up to `pool` connections. Each connection is in pipeline
 * mode: statements from many coroutines are sent back to back, each one
 * as [Parse (first use on this connection)] + Bind/Execute + Sync, so an
 * error in one does not abort its neighbours (a db:atomic job's
 * statements share one Sync: one failing fails them all anyway), and the
 * prepared statement is cached per connection (name "gwN"). A transaction reserves one idle
 * connection from BEGIN until COMMIT/ROLLBACK and sends its statements one
 * at a time; each statement runs in a savepoint (see conn_send()), so a
 * failed one is undone alone and the transaction goes on (the statements
 * of a db:atomic batch go back to back, in no savepoint: one failing fails
 * the whole job, rolled back; transaction control in them is refused
 * before they are sent, controls_tx()). A script
 * (several statements, no parameters) leaves pipeline mode on an idle
 * connection for the simple query protocol; nothing else is sent on that
 * connection until it is done.
 *
 * Transaction control belongs to db:transaction(). After each statement
 * the server's transaction status is checked (conn_check_tx()): a pooled
 * connection left inside a transaction is closed (the server rolls back)
 * and the statement fails with "misuse"; a transaction that its own SQL
 * committed or rolled back fails with "misuse" as well. Warnings and
 * errors 25001/25P01 (BEGIN inside a transaction, COMMIT outside one)
 * are "misuse" too.
 *
 * Failure handling: a broken connection fails its statements with
 * "unavailable" (retryable) and is replaced on demand (reconnection after
 * a server restart); a write outside a transaction (h:exec, h:script,
 * an h:query whose SQL may write: sql_may_write()) that was sent and not
 * answered, or answered by the end of the session (FATAL), fails
 * "unknown_outcome" instead: it may have committed. A connect
 * attempt that fails marks the pool down for `down_for` seconds, during
 * which statements fail at once instead of hanging. A connect the server
 * refused for good (a wrong password, an unknown role or database:
 * connect_refused_for_good()) fails "config", not retryable, instead of
 * "unavailable", and so do the statements during that window. A
 * connection that has statements outstanding and received nothing for
 * `query_timeout` seconds is closed and its statements fail with
 * "timeout".
 *
 * Failover: with a multi-host URL and target_session_attrs=read-write,
 * each new connection goes to whichever host accepts writes now (libpq
 * tries them in order). A statement answered with 25006 (read-only: a
 * standby, or a demoted primary) fails "unavailable" and marks every
 * connection of the pool to that server, each closed once idle, so the
 * pool reconnects to the current primary. A COMMIT in flight on a connection that breaks (or
 * times out, or whose pool closes) fails "unknown_outcome": it may have
 * committed, so neither success nor failure may be reported. With
 * require_sync, a new connection serves only once the server said it
 * commits with a synchronous standby.
 *
 * Names: host names of the URL are resolved on the loop (src/core/dns.c)
 * before each connect, one lookup per host at a time (the connection
 * waits in LPG_CONN_RESOLVING); libpq then gets every address as
 * `hostaddr` beside the name as `host` (TLS checks the name), so it never
 * calls the blocking system resolver. A URL of numeric hosts or sockets
 * goes to libpq unchanged.
 *
 * Lifetime: ops are owned by the pool's wait queue, then by their
 * connection's in-flight queue, then freed on delivery. An abandoned
 * coroutine only clears op->co. The pool is freed by close/__gc; its
 * ops are failed first ("closed").
 *
 * Abandoned transactions: h:begin() registers a struct gw_store_tx
 * (store.h), attached to the calling coroutine, until COMMIT/ROLLBACK is
 * submitted.
 * If the coroutine ends first (task:cancel(), a request deadline, or it
 * returned without ending the transaction) no Lua code will ever send
 * ROLLBACK, so tx_abandon() does it in C: a BEGIN still waiting for a
 * connection is dropped; an idle reserved connection gets a ROLLBACK
 * (no coroutine waits on it) and then serves others; a connection with a
 * statement of the transaction in flight is closed (the server rolls
 * back) and its slot reconnects on demand.
 *
 * Idle transactions: a process that cannot run (frozen) cannot roll back
 * at all, so each BEGIN carries SET LOCAL idle_in_transaction_session_
 * timeout = tx_timeout (conn_send()) and the server ends such a session
 * itself (FATAL 25P03), releasing its locks. The transaction's next
 * command then fails "timeout": on_notice() marks it when the FATAL is
 * read on its idle connection, conn_idle_ok() finds it before a command
 * is sent there, and a command answered by the FATAL is classified so
 * (pg_idle_tx()), a COMMIT too: it was never read, so it is no
 * "unknown_outcome".
 */
#include <ctype.h>
#include <limits.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>
#include <sys/stat.h>
#include <event2/event.h>
#include <libpq-fe.h>
#include <lauxlib.h>

#include "dns.h"
#include "loop.h"
#include "lstate.h"
#include "runtime.h"
#include "store.h"

/* a message of ours or libpq's (a connect to several hosts says one
 * line per host) */
#define LPG_MSG_MAX 512
#define LPG_MT        "paygate.pg.pool"
#define LPG_BUILD_MT  "paygate.pg.atomic_build"   /* struct lpg_build */
#define LPG_MAXPOOL   GW_STORE_PG_MAX_POOL
#define LPG_WAYS      4        /* prepared statements: a set's entries */
#define LPG_SETS      16
#define LPG_CACHE     (LPG_WAYS * LPG_SETS)
#define LPG_DEPTH     64       /* statements in flight per connection */
#define LPG_DEALLOC_OP 8       /* DEALLOCATEs sent with one statement */
#define LPG_MAXHOSTS  8        /* hosts of a multi-host URL */
#define LPG_MAXADDRS  32       /* host/hostaddr pairs given to libpq */

enum lpg_op_kind { LPG_OP_STMT, LPG_OP_SCRIPT };

enum lpg_conn_state {
    LPG_CONN_FREE,
    LPG_CONN_RESOLVING,          /* waiting for the pool's DNS lookups */
    LPG_CONN_CONNECTING,
    LPG_CONN_READY
};

struct lpg_op {
    enum lpg_op_kind kind;
    struct gw_co     *co;        /* waiting coroutine; NULL if abandoned */
    int               want_rows; /* query (rows) vs exec (changes) */
    int               writes;    /* h:query whose SQL may write (see
                                    sql_may_write()) */
    long              txid;      /* transaction this op belongs to, 0 none */
    int               tx_begin;  /* 1: BEGIN, reserves a connection */
    double            tx_wait;   /* BEGIN: the transaction's own
                                    query_timeout (s), 0: the pool's */
    int               tx_end;    /* 1: COMMIT/ROLLBACK, releases it */
    char             *sql;       /* owned */
    struct gw_store_val   *params;    /* owned: one block with their
                                       strings (free()) */
    int               nparams;
    /* progress on the connection */
    int               step;      /* command whose results come next */
    int               exec_step; /* the command that is op's statement */
    int               has_prepare;/* 1: command exec_step-1 is its Parse */
    int               in_sp;     /* 1: runs in savepoint gw_s */
    int               limit;     /* 1: a BEGIN with the pool's SET LOCAL
                                    idle_in_transaction_session_timeout
                                    behind it (tx_timeout) */
    int               no_sync;   /* 1: no Sync behind it (a batch's
                                    statement but the last of a segment):
                                    done after its ncmds commands */
    int               ncmds;     /* commands it queued (with no_sync) */
    int               cache_slot;/* slot to forget if the prepare fails */
    unsigned          cache_name;/* the name it prepared there */
    unsigned          dealloc[LPG_DEALLOC_OP]; /* names deallocated
                                    behind its statement (send_dealloc) */
    int               dealloc_n; /* from command dealloc_step(op) on */
    PGresult         *res;       /* owned; the statement's result */
    PGresult         *err;       /* owned; first error result */
    int               sync_check;/* 1: the pool's own require_sync
                                    re-check (no coroutine waits) */
    char              errkind[16];/* transport error kind or "" */
    char              errmsg[LPG_MSG_MAX];
    struct lpg_batch *batch;     /* begin_atomic's, or NULL */
    int               batch_i;   /* its index there (0-based) */
    int               replan;    /* 1: its cached statement no longer
                                    fits the schema: sent again once,
                                    prepared anew (op_stale_plan()); 2:
                                    it was */
    struct lpg_op   *next;
};

/* h:begin_atomic(): BEGIN and the statements of one transaction sent back
 * to back on one connection (one round trip, not one each); the coroutine
 * waits for all of them. Freed when the last op is delivered. */
struct lpg_batch {
    struct gw_co     *co;        /* waiting coroutine; NULL if abandoned */
    int               n;         /* ops */
    int               left;      /* not delivered yet */
    int               sent;      /* handed to a connection (or failed) in
                                    order: op i goes only after op i-1 */
    int               failed;    /* 1: an op failed: those not sent yet
                                    fail unsent (batch_note()) */
    struct lpg_op   **ops;       /* delivered ones, by index */
};

/* One address (and port) a connect tries: what libpq says it tries now
 * (PQhostaddr(), else PQhost(), and PQport()), or one it was given. */
struct lpg_addr {
    char                 addr[64];
    char                 port[8];
};

struct lpg_conn {
    struct lpg_pool        *pg;     /* owner */
    enum lpg_conn_state state;
    PGconn              *pc;     /* owned */
    int                  fd;     /* socket the events watch */
    struct event        *rev;    /* owned; persistent read */
    struct event        *wev;    /* owned; one-shot write (flush) */
    struct lpg_op      *head, *tail; /* in flight, in send order */
    int                  inflight;
    long                 txid;   /* reserved by this transaction, 0 none */
    double               tx_wait; /* txid's own query_timeout (s), 0: the
                                     pool's (h:begin's argument) */
    int                  sp_failed; /* 1: a statement of txid failed: roll
                                       back to its savepoint before
                                       txid's next command */
    int                  sp_prepared; /* 1: lpg_sp_sql prepared on pc */
    int                  checking; /* 1: connected; the require_sync
                                      query runs (state CONNECTING) */
    int                  sync_ok;  /* its answer: 1 synchronous */
    double               sync_at;  /* monotonic s: last check asked */
    int                  nosync;   /* 1: a re-check said no: closed once
                                      idle, serves nothing new */
    int                  silent;   /* 1: another connection to its server
                                      got no reply for query_timeout: the
                                      server may hang; closed once idle */
    int                  readonly; /* 1: the server refused a write as
                                      read-only (25006): it is no longer
                                      the primary; closed once idle */
    int                  ended;    /* 1: a FATAL came while idle (the
                                      session ends): conn_idle_ok();
                                      LPG_TX_IDLE: it was 25P03, its
                                      transaction idle past tx_timeout */
    double               since;  /* monotonic s: last progress */
    double               opened; /* monotonic s: connect started */
    struct lpg_addr      trying; /* the address libpq tries now */
    double               try_since; /* monotonic s: since when */
    struct lpg_addr     *skip;   /* owned: addresses that gave no answer
                                    within connect_timeout in this
                                    connect (left out when it restarts) */
    int                  nskip;
    unsigned             next_name;
    /* Prepared statements, 4-way set-associative by the SQL's hash, least
     * recently used out. One pushed out is deallocated on the server
     * (DEALLOCATE, sent with the next statement) once its Parse is known
     * to have succeeded: else every statement that came back after being
     * pushed out stayed prepared there under its old name, and the
     * backend's memory grew without bound. */
    struct lpg_stmt {
        char            *sql;    /* owned; NULL: a free entry */
        unsigned         name;   /* prepared as gw<name> */
        unsigned         used;   /* use tick (LRU) */
        int              ok;     /* 1: its Parse succeeded */
    }                    cache[LPG_CACHE];
    unsigned             use_tick;
    unsigned            *dealloc;               /* owned: names to
                                                   DEALLOCATE */
    int                  ndealloc, dealloc_cap;
};

/* One host of the URL and what the resolver said about it. */
struct lpg_host {
    struct lpg_pool     *pg;       /* owner (the DNS callback's arg) */
    const char          *name;     /* in pg->ci; "" = libpq's default */
    const char          *port;     /* in pg->ci, or NULL */
    int                  dns;      /* 1: a name to resolve on the loop */
    int                  state;    /* 0 pending, 1 resolved, -1 failed */
    struct gw_dns_req   *req;      /* lookup in flight, or NULL */
    double               asked;    /* mono s: req started */
    struct gw_dns_addrs  addrs;    /* state 1 */
    char                 err[120]; /* state -1 */
};

struct lpg_pool {
    char             *conninfo;  /* owned */
    PQconninfoOption *ci;        /* owned; conninfo parsed (DNS path) */
    char             *ci_hosts;  /* owned; ci's host list, split */
    char             *ci_ports;  /* owned; ci's port list, split */
    struct lpg_host   hosts[LPG_MAXHOSTS];
    int               nlisted;   /* hosts in hosts[], numeric ones too
                                    (0: hostaddr given, or no host) */
    struct lpg_addr   slow[LPG_MAXADDRS]; /* addresses whose connect gave
                                    no answer within connect_timeout:
                                    tried last, until one connects */
    int               nslow;
    int               nhosts;    /* 0: libpq resolves nothing (numeric
                                    hosts, sockets, hostaddr given) */
    char              down_kind[16]; /* kind of down_msg */
    int               npool;     /* max connections */
    double            connect_timeout; /* s */
    double            query_timeout;   /* s */
    double            down_for;  /* s to fail fast after a failed connect */
    int               require_sync; /* 1: only servers that commit with a
                                       synchronous standby */
    double            sync_recheck; /* s between re-checks of a connection */
    char              tx_limit[80]; /* SET LOCAL of tx_timeout (ms a
                                     transaction may sit idle before the
                                     server ends its session), or "": 0,
                                     no limit of ours */
    double            down_until;/* monotonic s */
    char              down_msg[LPG_MSG_MAX];
    /* The outage as the log tells it (pool_log_down(), pool_log_up()):
     * statements failed fast say only their own error, and a process
     * whose pool stays down must say so in its log by itself. */
    double            down_since;/* monotonic s: first failed connect
                                    since the last good one; 0: none */
    double            down_logged; /* monotonic s: last "down" line */
    unsigned          down_fails;/* failed connects since down_since */
    struct lpg_conn  conns[LPG_MAXPOOL];
    struct lpg_op   *wq, *wq_tail;  /* waiting for a connection */
    struct event     *tick;      /* owned */
    int               closed;
    int               dispatching;
    double            round_trips; /* Syncs and scripts sent: answers the
                                      server flushed as one (h:stats()) */
};

struct lpg_ud {
    struct lpg_pool *pg;            /* NULL once closed */
};

/* struct gw_store_tx.state of an open transaction (owner: its pool,
 * which frees its transactions first when it closes). Its id is unique in
 * the process, so delivery finds it without touching the pool. */
#define LPG_TX_OPEN   0
#define LPG_TX_ENDED  1          /* SQL in it ran COMMIT/ROLLBACK */
#define LPG_TX_IDLE   2          /* idle past tx_timeout: the server ended
                                    its session (25P03), rolling it back */

/* A transaction that sat idle past tx_timeout: the server ended its
 * session (FATAL 25P03), so it was rolled back and its locks released.
 * Whatever comes next in it -- COMMIT included: the server sends 25P03
 * only while it waits for the client's next command -- fails with this
 * ("timeout", retryable: doing it all again is safe). */
#define LPG_IDLE_TX "postgres: the transaction sat idle longer than" \
                    " tx_timeout (idle_in_transaction_session_timeout):" \
                    " the server ended its session and rolled it back"

static void conn_event(evutil_socket_t fd, short what, void *arg);
static void dispatch(struct lpg_pool *pg);
static void tx_forget(long txid);
static void pool_log_up(struct lpg_pool *pg);

/* conn_read(): the server left c in a transaction state nobody asked
 * for; the connection must go. */
#define LPG_DISCARD 1


/* --------------------------------------------------------------- ops */

static void
op_free(struct lpg_op *op)
{
    free(op->sql);
    free(op->params);                    /* one block: gw_store_vals_copy */
    if (op->res != NULL) {
        PQclear(op->res);
    }
    if (op->err != NULL) {
        PQclear(op->err);
    }
    free(op);
}

static void
op_set_error(struct lpg_op *op, const char *kind, const char *msg)
{
    if (op->errkind[0] != '\0' || op->err != NULL) {
        return;
    }
    snprintf(op->errkind, sizeof(op->errkind), "%s", kind);
    snprintf(op->errmsg, sizeof(op->errmsg), "%s", msg);
}

/* Replaces whatever op carried with this error: the server's verdict on
 * the transaction state outranks the statement's own outcome. */
static void
op_force_error(struct lpg_op *op, const char *kind, const char *msg)
{
    if (op->err != NULL) {
        PQclear(op->err);
        op->err = NULL;
    }
    op->errkind[0] = '\0';
    op_set_error(op, kind, msg);
}

/* 1 when r is the server's ERROR (not FATAL) 08P01 protocol violation:
 * the Bind of a statement given another number of parameters than its
 * SQL takes ($2 with one value: a nil in the array ended it). The
 * statement never ran and the session goes on. */
static int
pg_bind_refused(const PGresult *r)
{
    const char *sev = PQresultErrorField(r, PG_DIAG_SEVERITY_NONLOCALIZED);
    const char *state = PQresultErrorField(r, PG_DIAG_SQLSTATE);

    return sev != NULL && strcmp(sev, "ERROR") == 0 && state != NULL
           && strcmp(state, "08P01") == 0;
}

/* 1 when r is "cached plan must not change result type" (0A000 from
 * RevalidateCachedQuery): a column was added, dropped or changed its type
 * (or the table was made again) since the statement was prepared. It did
 * not run. */
static int
pg_stale_plan(const PGresult *r)
{
    const char *state = PQresultErrorField(r, PG_DIAG_SQLSTATE);
    const char *fn = PQresultErrorField(r, PG_DIAG_SOURCE_FUNCTION);

    return state != NULL && strcmp(state, "0A000") == 0 && fn != NULL
           && strcmp(fn, "RevalidateCachedQuery") == 0;
}

/* 1 when r is the server ending the session of a transaction left idle
 * past idle_in_transaction_session_timeout (FATAL 25P03): the
 * transaction was rolled back before any later command of it was read. */
static int
pg_idle_tx(const PGresult *r)
{
    const char *state = PQresultErrorField(r, PG_DIAG_SQLSTATE);

    return state != NULL && strcmp(state, "25P03") == 0;
}

static int
push_pg_error(lua_State *L, PGresult *r)
{
    const char *state = PQresultErrorField(r, PG_DIAG_SQLSTATE);
    const char *cname = PQresultErrorField(r, PG_DIAG_CONSTRAINT_NAME);
    const char *msg = PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY);
    const char *kind = "error";
    int         retry = 0;

    if (state == NULL) {
        state = "";
    }
    if (pg_idle_tx(r)) {
        gw_push_error(L, "timeout", 1, LPG_IDLE_TX);
        lua_pushstring(L, state);
        lua_setfield(L, -2, "code");
        return 2;
    }
    if (strncmp(state, "23", 2) == 0) {
        kind = "constraint";
    } else if (strcmp(state, "40001") == 0 || strcmp(state, "40P01") == 0) {
        kind = "serialization";
        retry = 1;
    } else if (strncmp(state, "42", 2) == 0) {
        kind = "syntax";
    } else if (strcmp(state, "25001") == 0 || strcmp(state, "25P01") == 0) {
        kind = "misuse";                 /* transaction control in SQL */
    } else if (strcmp(state, "25006") == 0) {
        /* read_only_sql_transaction: the server is (now) a standby, or
         * the primary was demoted; the connection is replaced by one to
         * the current primary (target_session_attrs=read-write). */
        kind = "unavailable";
        retry = 1;
    } else if (pg_bind_refused(r)) {
        kind = "misuse";                 /* params do not fit the SQL */
    } else if (strncmp(state, "54", 2) == 0) {
        kind = "too_large";              /* program limit exceeded */
    } else if (pg_stale_plan(r)) {
        retry = 1;                       /* prepared anew next time */
    } else if (strcmp(state, "57014") == 0) {
        kind = "timeout";
        retry = 1;
    } else if (strcmp(state, "55P03") == 0) {
        kind = "busy";
        retry = 1;
    } else if (strncmp(state, "08", 2) == 0 || strncmp(state, "57P", 3) == 0
               || strncmp(state, "53", 2) == 0)
    {
        kind = "unavailable";
        retry = 1;
    }
    gw_push_error(L, kind, retry, "postgres: %s",
                  msg != NULL ? msg : PQresultErrorMessage(r));
    lua_pushstring(L, state);
    lua_setfield(L, -2, "code");
    if (cname != NULL) {
        lua_pushstring(L, cname);
        lua_setfield(L, -2, "constraint");
    }
    return 2;
}

static void
push_cell(lua_State *L, PGresult *r, int row, int col)
{
    const char *v = PQgetvalue(r, row, col);

    switch (PQftype(r, col)) {
    case 16:                             /* bool */
        lua_pushboolean(L, v[0] == 't');
        break;
    case 20:                             /* int8: exact past 2^53 */
        gw_store_push_int_text(L, v, (size_t)PQgetlength(r, row, col));
        break;
    case 21:                             /* int2 */
    case 23:                             /* int4 */
    case 26:                             /* oid */
    case 700:                            /* float4 */
    case 701:                            /* float8 */
        lua_pushnumber(L, strtod(v, NULL));
        break;
    default:
        lua_pushlstring(L, v, (size_t)PQgetlength(r, row, col));
        break;
    }
}

static void
push_rows(lua_State *L, PGresult *r)
{
    int nrows = PQntuples(r), ncols = PQnfields(r), i, c, names = 0;

    /* Column names through gw_pushshort, and for several rows made
     * once, not once per row (a row is a fresh table: rawset is setfield
     * here). */
    if (nrows > 1 && ncols > 0 && lua_checkstack(L, ncols + 4)) {
        names = lua_gettop(L) + 1;
        for (c = 0; c < ncols; c++) {
            gw_pushshort(L, PQfname(r, c), strlen(PQfname(r, c)));
        }
    }
    lua_createtable(L, nrows, 0);
    for (i = 0; i < nrows; i++) {
        lua_createtable(L, 0, ncols);
        for (c = 0; c < ncols; c++) {
            if (PQgetisnull(r, i, c)) {
                continue;
            }
            if (names > 0) {
                lua_pushvalue(L, names + c);
            } else {
                gw_pushshort(L, PQfname(r, c), strlen(PQfname(r, c)));
            }
            push_cell(L, r, i, c);
            lua_rawset(L, -3);
        }
        lua_rawseti(L, -2, i + 1);
    }
    if (names > 0) {
        lua_replace(L, names);          /* the rows where the names began */
        lua_settop(L, names);
    }
}

/* 1 when r ends the session (FATAL or PANIC, SQLSTATE class 08, 57P01..
 * 57P03): sent while a COMMIT ran, it does not say whether the commit
 * record was written before the backend stopped. */
static int
err_ends_session(const PGresult *r)
{
    const char *sev = PQresultErrorField(r, PG_DIAG_SEVERITY_NONLOCALIZED);
    const char *state = PQresultErrorField(r, PG_DIAG_SQLSTATE);

    if (sev != NULL && (strcmp(sev, "FATAL") == 0
                        || strcmp(sev, "PANIC") == 0))
    {
        return 1;
    }
    if (pg_bind_refused(r)) {
        return 0;
    }
    return state != NULL && (strncmp(state, "08", 2) == 0
                             || strcmp(state, "57P01") == 0
                             || strcmp(state, "57P02") == 0
                             || strcmp(state, "57P03") == 0);
}

/* 1 when op is a write that commits on its own (h:exec, h:script, or an
 * h:query whose SQL may write, outside a transaction): once sent, it may
 * have committed whatever the connection did next, as a COMMIT may. */
static int
op_commits_alone(const struct lpg_op *op)
{
    return op->txid == 0 && !op->tx_end && op->batch == NULL
           && !op->sync_check
           && (op->kind == LPG_OP_SCRIPT || !op->want_rows || op->writes);
}

/* 1 when the word w (n bytes, letters) occurs in sql as a whole word. */
static int
sql_has_word(const char *sql, const char *w, size_t n)
{
    const char *p;

    for (p = sql; *p != '\0'; p++) {
        if (strncasecmp(p, w, n) == 0
            && (p == sql || !(isalnum((unsigned char)p[-1]) || p[-1] == '_'))
            && !(isalnum((unsigned char)p[n]) || p[n] == '_'))
        {
            return 1;
        }
    }
    return 0;
}

/* 1 unless sql (one statement given to h:query) is a plain read: its first
 * word is SELECT, VALUES, TABLE or SHOW, or WITH with no INSERT, UPDATE,
 * DELETE or MERGE in it. An INSERT ... RETURNING through h:query is a
 * write: lost once sent, it may have committed. */
static int
sql_may_write(const char *sql)
{
    const char *p = sql, *w;
    size_t      n;

    for (;;) {
        while (isspace((unsigned char)*p) || *p == '(') {
            p++;
        }
        if (p[0] == '-' && p[1] == '-') {
            p += strcspn(p, "\n");
        } else if (p[0] == '/' && p[1] == '*') {
            const char *e = strstr(p + 2, "*/");

            if (e == NULL) {
                return 1;
            }
            p = e + 2;
        } else {
            break;
        }
    }
    for (w = p; isalpha((unsigned char)*p); p++) {
    }
    n = (size_t)(p - w);
    if ((n == 6 && strncasecmp(w, "SELECT", 6) == 0)
        || (n == 6 && strncasecmp(w, "VALUES", 6) == 0)
        || (n == 5 && strncasecmp(w, "TABLE", 5) == 0)
        || (n == 4 && strncasecmp(w, "SHOW", 4) == 0))
    {
        return 0;
    }
    if (n == 4 && strncasecmp(w, "WITH", 4) == 0) {
        return sql_has_word(p, "INSERT", 6) || sql_has_word(p, "UPDATE", 6)
               || sql_has_word(p, "DELETE", 6) || sql_has_word(p, "MERGE", 5);
    }
    return 1;
}

static int
push_op_result(lua_State *L, struct lpg_op *op)
{
    PGresult *r = op->res;
    int       commit = op->tx_end && strcmp(op->sql, "COMMIT") == 0;

    /* (a COMMIT answered by 25P03 was never read: rolled back) */
    if (op->err != NULL && (commit || op_commits_alone(op))
        && err_ends_session(op->err) && !pg_idle_tx(op->err))
    {
        const char *msg = PQresultErrorField(op->err,
                                             PG_DIAG_MESSAGE_PRIMARY);
        const char *state = PQresultErrorField(op->err, PG_DIAG_SQLSTATE);

        gw_push_error(L, "unknown_outcome", 0, "postgres: %s was answered"
                      " by the end of the session (%.100s): %s may or may"
                      " not be committed", commit ? "COMMIT" : "a write",
                      msg != NULL ? msg : "no message",
                      commit ? "the transaction" : "it");
        lua_pushstring(L, state != NULL ? state : "");
        lua_setfield(L, -2, "code");
        return 2;
    }
    if (op->err != NULL) {
        return push_pg_error(L, op->err);
    }
    if (op->errkind[0] != '\0') {
        return gw_push_error(L, op->errkind,
                             strcmp(op->errkind, "closed") != 0
                             && strcmp(op->errkind, "config") != 0
                             && strcmp(op->errkind, "misuse") != 0
                             && strcmp(op->errkind, "unknown_outcome") != 0,
                             "%s", op->errmsg);
    }
    if (op->tx_begin) {
        lua_pushnumber(L, (lua_Number)op->txid);
        return 1;
    }
    if (op->tx_end && r != NULL && strcmp(op->sql, "COMMIT") == 0
        && strcmp(PQcmdStatus(r), "ROLLBACK") == 0)
    {
        /* The server answers COMMIT of a transaction that an earlier
         * statement aborted with "ROLLBACK": nothing was committed. */
        return gw_push_error(L, "error", 0, "postgres: transaction was"
                             " aborted by an earlier error; COMMIT rolled"
                             " it back");
    }
    if (op->kind == LPG_OP_SCRIPT || op->tx_end) {
        lua_pushboolean(L, 1);
        return 1;
    }
    if (op->want_rows) {
        if (r == NULL) {
            lua_newtable(L);
        } else {
            push_rows(L, r);
        }
        return 1;
    }
    lua_createtable(L, 0, 3);
    if (r != NULL) {
        const char *ct = PQcmdTuples(r);

        if (ct[0] != '\0') {
            gw_store_push_int_text(L, ct, strlen(ct));
        } else {
            lua_pushnumber(L, 0);
        }
        gw_setfield(L, -2, "changes");
        if (PQntuples(r) > 0) {
            if (PQnfields(r) > 0 && !PQgetisnull(r, 0, 0)) {
                push_cell(L, r, 0, 0);
                gw_setfield(L, -2, "last_id");
            }
            push_rows(L, r);
            gw_setfield(L, -2, "rows");
        }
    }
    return 1;
}

/* Loop thread: wakes the op's coroutine (if any) and frees the op. */
static void batch_deliver(struct lpg_op *op);

static void
op_deliver(struct lpg_op *op)
{
    struct gw_co *co = op->co;

    if (op->batch != NULL) {
        batch_deliver(op);
        return;
    }

    if (op->tx_begin && (op->err != NULL || op->errkind[0] != '\0')) {
        tx_forget(op->txid);             /* nothing to undo */
    }

    if (co != NULL) {
        lua_State *L = gw_co_state(co);
        int        n = push_op_result(L, op);

        op_free(op);
        gw_co_wake(co, n);
    } else {
        op_free(op);
    }
}

/* Keeps op until its batch is complete, then wakes the coroutine with
 * txid, results, index, err (h:begin_atomic()): results[i] for each
 * statement that ran (as h:tx_exec answers), and the first failed
 * statement's index and error (nil, nil when none failed); or nil, err
 * when the BEGIN failed (nothing is open: the statements behind it were
 * skipped). */
static void
batch_deliver(struct lpg_op *op)
{
    struct lpg_batch *b = op->batch;
    struct lpg_op    *bop;           /* op 0: the BEGIN */
    struct gw_co     *co;
    int               i, nres = 2;
    int               begun;

    b->ops[op->batch_i] = op;
    if (--b->left > 0) {
        return;
    }
    bop = b->ops[0];
    begun = bop->err == NULL && bop->errkind[0] == '\0';
    if (!begun) {
        tx_forget(bop->txid);             /* nothing to undo */
    }
    if (b->co != NULL) {
        lua_State *L = gw_co_state(b->co);
        int        failed = -1;

        if (!begun) {
            nres = push_op_result(L, bop);  /* nil, err */
        } else {
            lua_pushnumber(L, (lua_Number)bop->txid);
            lua_createtable(L, b->n - 1, 0);
            for (i = 1; i < b->n; i++) {
                int n = push_op_result(L, b->ops[i]);

                if (n == 1) {
                    lua_rawseti(L, -2, i);
                    continue;
                }
                lua_pop(L, n);            /* nil, err */
                if (failed < 0) {
                    failed = i;           /* later ones: aborted by it */
                }
            }
            if (failed >= 0) {
                lua_pushinteger(L, failed);
                nres = 4;
                if (push_op_result(L, b->ops[failed]) == 2) {
                    lua_remove(L, -2);    /* the nil before the err */
                }
            }
        }
    }
    for (i = 0; i < b->n; i++) {
        op_free(b->ops[i]);
    }
    co = b->co;
    free(b->ops);
    free(b);
    if (co != NULL) {
        gw_co_wake(co, nres);
    }
}

static void
deliver_list(struct lpg_op *list)
{
    struct lpg_op *next;

    for (; list != NULL; list = next) {
        next = list->next;
        list->next = NULL;
        op_deliver(list);
    }
}

static void
deliver_cb(void *arg)
{
    deliver_list(arg);
}

/* Delivers on a later loop turn: for code that may run inside a
 * coroutine (submit, close), where waking another one is not allowed. */
static void
post_list(struct lpg_op *list)
{
    if (list != NULL && gw_loop_post(deliver_cb, list) != GW_OK) {
        gw_log(GW_LOG_ERROR, "postgres: cannot post results: no memory");
    }
}

static void
op_cancel(void *arg)
{
    struct lpg_op *op = arg;

    op->co = NULL;
}

/* ------------------------------------------------------- connections */

static void
conn_reset(struct lpg_conn *c)
{
    int i;

    if (c->rev != NULL) {
        event_free(c->rev);
        c->rev = NULL;
    }
    if (c->wev != NULL) {
        event_free(c->wev);
        c->wev = NULL;
    }
    if (c->pc != NULL) {
        PQfinish(c->pc);
        c->pc = NULL;
    }
    for (i = 0; i < LPG_CACHE; i++) {
        free(c->cache[i].sql);
        c->cache[i].sql = NULL;
        c->cache[i].ok = 0;
    }
    free(c->dealloc);           /* the session's statements went with it */
    c->dealloc = NULL;
    c->ndealloc = c->dealloc_cap = 0;
    c->state = LPG_CONN_FREE;
    c->fd = -1;
    c->txid = 0;
    c->sp_failed = 0;
    c->sp_prepared = 0;
    c->readonly = 0;
    c->silent = 0;
    c->ended = 0;
    c->checking = 0;
    c->inflight = 0;
}

/* libpq's reason for c's failure, one line: the last line of
 * PQerrorMessage that is libpq's own. In pipeline mode the text may still
 * hold an earlier statement's server error ("ERROR:  " then "DETAIL:  ",
 * which can quote values) before the reason; and libpq indents its hints
 * on the lines after it. Returns "head: reason" in buf, or head alone
 * when libpq says nothing. */
static const char *
lost_msg(struct lpg_conn *c, const char *head, char *buf, size_t len)
{
    const char *p = c->pc != NULL ? PQerrorMessage(c->pc) : "";
    const char *line = NULL;
    int         n = 0;

    while (*p != '\0') {
        int         k = (int) strcspn(p, "\n");
        const char *colon = memchr(p, ':', (size_t) k);

        /* not a hint, nor a server's "LABEL:  text" */
        if (k > 0 && *p != ' ' && *p != '\t'
            && !(colon != NULL && colon + 2 < p + k && colon[1] == ' '
                 && colon[2] == ' '))
        {
            line = p;
            n = k;
        }
        p += k + (p[k] != '\0');
    }
    if (n > 120) {
        n = 120;
    }
    snprintf(buf, len, "%s%s%.*s", head, line != NULL ? ": " : "", n,
             line != NULL ? line : "");
    return buf;
}

#define LPG_LOST "postgres: connection lost"

/* Closes c and moves its in-flight ops to *out with the given error. */
static void
conn_fail(struct lpg_conn *c, const char *kind, const char *msg,
          struct lpg_op **out)
{
    struct lpg_op *op, *next;

    for (op = c->head; op != NULL; op = next) {
        next = op->next;
        if (op->tx_end && op->err == NULL && op->errkind[0] == '\0'
            && strcmp(op->sql, "COMMIT") == 0)
        {
            char buf[sizeof(op->errmsg)];

            /* Sent, and the server's answer never came: it may have
             * committed or not. Never report either. */
            snprintf(buf, sizeof(buf), "postgres: COMMIT was sent but its"
                     " answer was lost (%.100s): the transaction may or may"
                     " not be committed", msg);
            op_set_error(op, "unknown_outcome", buf);
        }
        op_set_error(op, kind, msg);
        op->next = *out;
        *out = op;
    }
    c->head = c->tail = NULL;
    conn_reset(c);
}

/* c broke (kind "unavailable") or went silent past query_timeout (kind
 * "timeout") with statements in flight: conn_fail() with that kind, but
 * a write that commits on its own and was not answered (or answered only
 * in part: an autocommit statement commits at its Sync) may have
 * committed, and fails "unknown_outcome". Those sent behind a statement
 * answered by the end of the session never ran: the server stops there. */
static void
conn_lost(struct lpg_conn *c, const char *kind, const char *msg,
          struct lpg_op **out)
{
    struct lpg_op *op;

    for (op = c->head; op != NULL; op = op->next) {
        if (op->err != NULL && err_ends_session(op->err)) {
            break;
        }
        if (op_commits_alone(op) && op->err == NULL
            && op->errkind[0] == '\0')
        {
            char buf[sizeof(op->errmsg)];

            snprintf(buf, sizeof(buf), "postgres: a write was sent but its"
                     " answer was lost (%.112s): it may or may not be"
                     " committed", msg);
            op_set_error(op, "unknown_outcome", buf);
        }
    }
    conn_fail(c, kind, msg, out);
}

static int
conn_watch(struct lpg_conn *c)
{
    int fd = PQsocket(c->pc);

    if (fd == c->fd && c->rev != NULL) {
        return GW_OK;
    }
    if (c->rev != NULL) {
        event_free(c->rev);
        event_free(c->wev);
        c->rev = c->wev = NULL;
    }
    if (fd < 0) {
        return GW_ERR;
    }
    c->fd = fd;
    c->rev = event_new(gw_loop_base(), fd, EV_READ | EV_PERSIST, conn_event,
                       c);
    c->wev = event_new(gw_loop_base(), fd, EV_WRITE, conn_event, c);
    if (c->rev == NULL || c->wev == NULL) {
        return GW_ERR;
    }
    return GW_OK;
}

static int conn_flush(struct lpg_conn *c);

/* require_sync: is a COMMIT on this server acknowledged only once a
 * synchronous standby has it? */
static const char lpg_sync_check[] =
    "SELECT current_setting('synchronous_standby_names') <> ''"
    " AND current_setting('synchronous_commit')"
    " IN ('on', 'remote_apply', 'remote_write')";

#define LPG_NOSYNC 3             /* conn_poll_check(): the answer is no */

/* The connection is up (and checked): pipeline mode, then it serves. */
static int
conn_ready(struct lpg_conn *c)
{
    if (PQenterPipelineMode(c->pc) != 1) {
        return GW_ERR;
    }
    event_del(c->wev);
    event_add(c->rev, NULL);
    c->state = LPG_CONN_READY;
    c->checking = 0;
    c->nosync = 0;
    c->since = gw_loop_mono_fresh();
    c->sync_at = c->since;
    pool_log_up(c->pg);
    return GW_OK;
}

/* The require_sync query's answer. Returns GW_OK (ready), GW_AGAIN,
 * GW_ERR (broken) or LPG_NOSYNC. */
static int
conn_poll_check(struct lpg_conn *c, short what)
{
    PGresult *r;

    if ((what & EV_WRITE) && conn_flush(c) != GW_OK) {
        return GW_ERR;
    }
    if (PQconsumeInput(c->pc) != 1) {
        return GW_ERR;
    }
    while (!PQisBusy(c->pc)) {
        r = PQgetResult(c->pc);
        if (r == NULL) {
            return c->sync_ok ? conn_ready(c) : LPG_NOSYNC;
        }
        c->sync_ok = PQresultStatus(r) == PGRES_TUPLES_OK
                     && PQntuples(r) == 1
                     && strcmp(PQgetvalue(r, 0, 0), "t") == 0;
        PQclear(r);
    }
    return GW_AGAIN;
}

/* 1 when a and b are the same address: the same text, and the same
 * port when both name one (an empty port is libpq's default). */
static int
addr_same(const struct lpg_addr *a, const struct lpg_addr *b)
{
    return strcmp(a->addr, b->addr) == 0
           && (a->port[0] == '\0' || b->port[0] == '\0'
               || strcmp(a->port, b->port) == 0);
}

static void
addr_set(struct lpg_addr *a, const char *addr, const char *port)
{
    snprintf(a->addr, sizeof(a->addr), "%s", addr != NULL ? addr : "");
    snprintf(a->port, sizeof(a->port), "%s", port != NULL ? port : "");
}

/* 1 when a is in list[0..n). */
static int
addr_in(const struct lpg_addr *list, int n, const struct lpg_addr *a)
{
    int i;

    for (i = 0; i < n; i++) {
        if (addr_same(&list[i], a)) {
            return 1;
        }
    }
    return 0;
}

/* The address c's connect tries now (libpq moves on by itself to the
 * next host after a refused connect, or a server that target_session_attrs
 * rejects). */
static void
conn_trying(struct lpg_conn *c, struct lpg_addr *a)
{
    const char *addr = PQhostaddr(c->pc);

    if (addr == NULL || addr[0] == '\0') {
        addr = PQhost(c->pc);
    }
    addr_set(a, addr, PQport(c->pc));
}

/* Forgets that a is slow: it answered a connect. */
static void
pool_slow_clear(struct lpg_pool *pg, const struct lpg_addr *a)
{
    int i;

    for (i = 0; i < pg->nslow; i++) {
        if (addr_same(&pg->slow[i], a)) {
            pg->slow[i] = pg->slow[--pg->nslow];
            return;
        }
    }
}

/* Connect state machine step. Returns GW_OK, GW_AGAIN or GW_ERR. */
static int
conn_poll_connect(struct lpg_conn *c)
{
    PostgresPollingStatusType st = PQconnectPoll(c->pc);

    if (st == PGRES_POLLING_FAILED) {
        return GW_ERR;
    }
    if (conn_watch(c) != GW_OK) {
        return GW_ERR;
    }
    if (st == PGRES_POLLING_OK) {
        struct lpg_addr a;

        conn_trying(c, &a);
        pool_slow_clear(c->pg, &a);      /* it answers again */
        PQsetErrorVerbosity(c->pc, PQERRORS_DEFAULT);
        if (PQsetnonblocking(c->pc, 1) != 0) {
            return GW_ERR;
        }
        if (c->pg->require_sync) {
            /* Ask before the connection serves: a COMMIT here must wait
             * for a synchronous standby. */
            if (PQsendQuery(c->pc, lpg_sync_check) != 1) {
                return GW_ERR;
            }
            c->checking = 1;
            c->sync_ok = 0;
            event_del(c->wev);
            event_add(c->rev, NULL);
            return conn_flush(c) == GW_OK ? GW_AGAIN : GW_ERR;
        }
        return conn_ready(c);
    }
    if (st == PGRES_POLLING_WRITING) {
        event_del(c->rev);
        event_add(c->wev, NULL);
    } else {
        event_del(c->wev);
        event_add(c->rev, NULL);
    }
    return GW_AGAIN;
}

#define LPG_DOWN_LOG_EVERY 5.0      /* s between "still down" lines */

/* A connect failed (msg) and no connection is open: the first failure
 * of an outage is logged, then one line every LPG_DOWN_LOG_EVERY s while
 * connects keep failing, and pool_log_up() says when one serves again.
 * So a log shows when each process's pool went down and whether it
 * stayed down, not only the errors of the statements failed meanwhile
 * (which a best-effort write may not log at all). */
static void
pool_log_down(struct lpg_pool *pg, const char *kind, const char *msg)
{
    double now = gw_loop_mono_fresh();

    pg->down_fails++;
    if (pg->down_since == 0) {
        pg->down_since = now;
        pg->down_logged = now;
        gw_log(GW_LOG_WARN, "postgres: pool down (%s): %s; statements fail"
               " at once for %.3g s after each failed connect while no"
               " connection is open", kind, msg, pg->down_for);
    } else if (now - pg->down_logged >= LPG_DOWN_LOG_EVERY) {
        pg->down_logged = now;
        gw_log(GW_LOG_WARN, "postgres: pool still down after %.1f s (%u"
               " failed connects; last (%s): %s)", now - pg->down_since,
               pg->down_fails, kind, msg);
    }
}

/* A connection serves: ends the outage pool_log_down() logged. */
static void
pool_log_up(struct lpg_pool *pg)
{
    if (pg->down_since == 0) {
        return;
    }
    gw_log(GW_LOG_INFO, "postgres: pool up again after %.1f s down (%u"
           " failed connects)", gw_loop_mono_fresh() - pg->down_since,
           pg->down_fails);
    pg->down_since = 0;
    pg->down_fails = 0;
}

static void
pool_mark_down(struct lpg_pool *pg, const char *kind, const char *msg)
{
    pg->down_until = gw_loop_mono_fresh() + pg->down_for;
    snprintf(pg->down_kind, sizeof(pg->down_kind), "%s", kind);
    snprintf(pg->down_msg, sizeof(pg->down_msg), "%s", msg);
}

/* Fails every waiting op when no connection can serve them soon. */
static void
pool_fail_waiting(struct lpg_pool *pg, const char *kind, const char *msg,
                  struct lpg_op **out)
{
    struct lpg_op *op;

    while (pg->wq != NULL) {
        op = pg->wq;
        pg->wq = op->next;
        op_set_error(op, kind, msg);
        op->next = *out;
        *out = op;
    }
    pg->wq_tail = NULL;
}

static int
pool_has_live(struct lpg_pool *pg)
{
    int i;

    for (i = 0; i < pg->npool; i++) {
        if (pg->conns[i].state != LPG_CONN_FREE) {
            return 1;
        }
    }
    return 0;
}

/* c cannot serve (a failed connect or lookup, a server refused by
 * require_sync): fails its ops with kind and msg and marks the pool down;
 * when nothing else can serve them and fail_waiting is set, fails the
 * waiting ops too (never from inside dispatch(), which walks that queue
 * itself). */
static void
conn_down(struct lpg_conn *c, const char *kind, const char *msg,
          struct lpg_op **out, int fail_waiting)
{
    struct lpg_pool *pg = c->pg;

    conn_fail(c, kind, msg, out);
    pool_mark_down(pg, kind, msg);
    if (!pool_has_live(pg)) {
        pool_log_down(pg, kind, msg);    /* nothing open: fails fast */
        if (fail_waiting) {
            pool_fail_waiting(pg, kind, msg, out);
        }
    }
}

/* Whether a failed connect is one that trying again cannot fix: the
 * server refused the login or the database (a wrong password, an unknown
 * role or database, no pg_hba.conf entry), or it asked for a password and
 * none was given. libpq (15) keeps the server's error response to itself
 * after a failed connect (PQgetResult gives none, or one without a
 * SQLSTATE), so the connect runs with PQERRORS_VERBOSE
 * (conn_start_libpq()), which writes the SQLSTATE into the message
 * ("FATAL:  28P01: password authentication failed ..."): class 28
 * (authentication), 3D000 (no such database) and 42501 (no CONNECT
 * privilege) decide, whatever the server's lc_messages. libpq's own
 * "no password supplied" has no SQLSTATE: its text decides. With several
 * hosts (or addresses), libpq reports each attempt ("connection to server
 * ... failed: ..."): only when every one of them was refused so is the
 * failure permanent; a host that could not be reached may come back. */
static int
connect_refused_for_good(const char *why)
{
    const char *line = why, *eol, *p;
    int         attempts = 0, refused = 0, this_refused = 0;

    for (; *line != '\0'; line = *eol != '\0' ? eol + 1 : eol) {
        eol = strchr(line, '\n');
        if (eol == NULL) {
            eol = line + strlen(line);
        }
        if (strncmp(line, "connection to server ", 21) == 0
            || attempts == 0)
        {
            refused += this_refused;     /* the attempt before this one */
            this_refused = 0;
            attempts++;
        }
        for (p = line; p + 10 <= eol; p++) {
            /* "SEVERITY:  XXXXX: " (the severity may be translated) */
            if (p[0] == ':' && p[1] == ' ' && p[2] == ' '
                && strspn(p + 3, "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ")
                   == 5
                && p[8] == ':' && p[9] == ' ')
            {
                if (strncmp(p + 3, "28", 2) == 0
                    || strncmp(p + 3, "3D000", 5) == 0
                    || strncmp(p + 3, "42501", 5) == 0)
                {
                    this_refused = 1;
                }
                break;
            }
        }
        if (memmem(line, (size_t)(eol - line), "no password supplied", 20)
            != NULL)
        {
            this_refused = 1;
        }
    }
    refused += this_refused;
    return attempts > 0 && refused == attempts;
}

/* A connect attempt failed: conn_down() with libpq's reason, without the
 * LOCATION lines of its verbose form. Kind "config" (not retryable) when
 * the server refused the login or the database for good, else
 * "unavailable". libpq's messages never hold the password. */
static void
conn_connect_failed(struct lpg_conn *c, struct lpg_op **out,
                    int fail_waiting)
{
    char          msg[LPG_MSG_MAX];
    const char   *why = c->pc != NULL ? PQerrorMessage(c->pc) : "no memory";
    const char   *line, *eol;
    size_t        n;

    n = (size_t)snprintf(msg, sizeof(msg), "postgres: connect: ");
    for (line = why; *line != '\0' && n < sizeof(msg) - 1;
         line = *eol != '\0' ? eol + 1 : eol)
    {
        eol = strchr(line, '\n');
        if (eol == NULL) {
            eol = line + strlen(line);
        }
        if (strncmp(line, "LOCATION:", 9) == 0
            || *line == '\t' || *line == ' ')
        {
            continue;            /* (a hint: "Is the server running...") */
        }
        n += (size_t)snprintf(msg + n, sizeof(msg) - n, "%.*s%s",
                              (int)(eol - line), line,
                              *eol != '\0' ? "\n" : "");
    }
    n = strlen(msg);
    while (n > 0 && (msg[n - 1] == '\n' || msg[n - 1] == ' ')) {
        msg[--n] = '\0';
    }
    conn_down(c, c->pc != NULL && connect_refused_for_good(why)
                 ? "config" : "unavailable", msg, out, fail_waiting);
}

/* Server notices (e.g. "table does not exist, skipping") go to the
 * debug log instead of libpq's default stderr print. A warning of class
 * 25 (25P01: COMMIT or ROLLBACK with no transaction; 25001: BEGIN inside
 * one) means
 * the statement being read tried to control the transaction itself:
 * that statement fails with misuse. */
static void
on_notice(void *arg, const PGresult *r)
{
    struct lpg_conn *c = arg;
    const char       *state = PQresultErrorField(r, PG_DIAG_SQLSTATE);
    const char       *msg = PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY);
    char              buf[200];

    gw_log(GW_LOG_DEBUG, "postgres: %s", PQresultErrorMessage(r));
    if (c->head == NULL && err_ends_session(r)) {
        c->ended = 1;                /* libpq passes an idle one here */
    }
    if (c->head == NULL && c->txid != 0 && pg_idle_tx(r)) {
        /* its transaction sat idle past tx_timeout: its next command
         * says so (tx_op(), conn_idle_ok()) */
        struct gw_store_tx *tx = gw_store_tx_find(NULL, c->txid);

        c->ended = LPG_TX_IDLE;
        if (tx != NULL && tx->state == LPG_TX_OPEN) {
            tx->state = LPG_TX_IDLE;
        }
    }
    if (state != NULL && c->head != NULL
        && (strcmp(state, "25001") == 0 || strcmp(state, "25P01") == 0))
    {
        snprintf(buf, sizeof(buf), "postgres: %s: transaction control"
                 " belongs to db:transaction()", msg != NULL ? msg : state);
        op_set_error(c->head, "misuse", buf);
    }
}

/* Starts libpq's connect on c: with the URL as given when nothing needs
 * resolving and no address is slow, else with every resolved address as
 * `hostaddr` next to its name as `host` (libpq checks a TLS certificate
 * against host and connects to hostaddr without a lookup of its own; it
 * tries the pairs in order, and target_session_attrs picks among them).
 * Addresses that gave no answer within connect_timeout go last
 * (pg->slow), and those that did so in this connect (c->skip) not at
 * all. Returns GW_OK, GW_ERR (see PQerrorMessage), or LPG_NODNS (no
 * address to try; *why). */
#define LPG_NODNS 2
static int
conn_start_libpq(struct lpg_conn *c, const char **why)
{
    struct lpg_pool  *pg = c->pg;
    const char       *kw[64], *val[64];
    char              hosts[LPG_MAXADDRS * 64], addrs[LPG_MAXADDRS * 48];
    char              ports[LPG_MAXADDRS * 8];
    size_t            hl = 0, al = 0, pl = 0;
    PQconninfoOption *o;
    int               i, k, n = 0, npairs = 0, pass, skipped = 0;
    int               listed = pg->nhosts;

    c->state = LPG_CONN_CONNECTING;
    c->fd = -1;
    c->trying.addr[0] = c->trying.port[0] = '\0';
    c->try_since = gw_loop_mono_fresh();
    if (pg->nhosts == 0 && pg->nlisted > 0
        && (pg->nslow > 0 || c->nskip > 0))
    {
        listed = pg->nlisted;            /* numeric hosts, reordered */
    }
    if (listed == 0) {
        c->pc = PQconnectStart(pg->conninfo);
        goto started;
    }
    hosts[0] = addrs[0] = ports[0] = '\0';
    *why = "no host";
    for (pass = 0; pass < 2; pass++) {   /* the slow addresses last */
        for (i = 0; i < listed; i++) {
            struct lpg_host *h = &pg->hosts[i];
            int              na = h->dns ? h->addrs.n : 1;

            if (h->dns && h->state != 1) {
                if (pass == 0 && h->state == 0) {   /* host_awaited */
                    snprintf(h->err, sizeof(h->err), "%.60s: no answer yet",
                             h->name);
                }
                if (pass == 0) {
                    *why = h->err;
                }
                continue;
            }
            for (k = 0; k < na && npairs < LPG_MAXADDRS; k++) {
                const char     *a = h->dns ? h->addrs.addr[k]
                                 : gw_dns_is_numeric(h->name) ? h->name : "";
                struct lpg_addr pa;

                addr_set(&pa, a[0] != '\0' ? a : h->name, h->port);
                if (addr_in(c->skip, c->nskip, &pa)) {
                    skipped += pass == 0;
                    continue;
                }
                if (addr_in(pg->slow, pg->nslow, &pa) != pass) {
                    continue;
                }
                hl += (size_t)snprintf(hosts + hl, sizeof(hosts) - hl,
                                       "%s%s", npairs ? "," : "", h->name);
                al += (size_t)snprintf(addrs + al, sizeof(addrs) - al,
                                       "%s%s", npairs ? "," : "", a);
                pl += (size_t)snprintf(ports + pl, sizeof(ports) - pl,
                                       "%s%s", npairs ? "," : "",
                                       h->port != NULL ? h->port : "");
                npairs++;
                if (hl >= sizeof(hosts) || al >= sizeof(addrs)
                    || pl >= sizeof(ports))
                {
                    *why = "too many addresses";
                    return LPG_NODNS;
                }
            }
        }
    }
    if (npairs == 0) {
        if (skipped > 0) {
            *why = "every address gave no answer within connect_timeout";
        }
        return LPG_NODNS;
    }
    for (o = pg->ci; o->keyword != NULL && n < 60; o++) {
        if (o->val == NULL || strcmp(o->keyword, "host") == 0
            || strcmp(o->keyword, "hostaddr") == 0
            || strcmp(o->keyword, "port") == 0)
        {
            continue;
        }
        kw[n] = o->keyword;
        val[n++] = o->val;
    }
    kw[n] = "host";
    val[n++] = hosts;
    kw[n] = "hostaddr";
    val[n++] = addrs;
    kw[n] = "port";
    val[n++] = ports;
    kw[n] = NULL;
    val[n] = NULL;
    c->pc = PQconnectStartParams(kw, val, 0);
started:
    if (c->pc == NULL || PQstatus(c->pc) == CONNECTION_BAD) {
        return GW_ERR;
    }
    PQsetNoticeReceiver(c->pc, on_notice, c);
    /* the SQLSTATE of a refused connect in its message (until it is up:
     * conn_poll_connect()), for connect_refused_for_good() */
    PQsetErrorVerbosity(c->pc, PQERRORS_VERBOSE);
    return conn_poll_connect(c) == GW_ERR ? GW_ERR : GW_OK;
}

/* Whether a connect still waits for h's lookup: for half of
 * connect_timeout at most when another host has an address, so that one
 * name whose server does not answer (a standby's, say) does not keep the
 * pool from the hosts that resolved; the lookup goes on and a later
 * connect uses its answer. With no other host, up to connect_timeout. */
static int
host_awaited(struct lpg_host *h, double now)
{
    struct lpg_pool *pg = h->pg;
    int              i;

    if (h->req == NULL) {
        return 0;
    }
    if (now - h->asked < pg->connect_timeout / 2) {
        return 1;
    }
    for (i = 0; i < pg->nhosts; i++) {
        if (!pg->hosts[i].dns || pg->hosts[i].state == 1) {
            return 0;                    /* another host can be tried */
        }
    }
    return 1;                            /* nothing else: wait on */
}

/* Looks each host name up in the cache; starts a lookup for those not
 * there (one per host at a time). Returns 1 when no host is awaited. */
static void pool_on_dns(void *arg, const struct gw_dns_addrs *a,
                        const char *err);
static int
pool_resolve(struct lpg_pool *pg)
{
    double now = gw_loop_mono_fresh();
    int    i, rc, known = 1;

    for (i = 0; i < pg->nhosts; i++) {
        struct lpg_host *h = &pg->hosts[i];

        if (!h->dns || h->req != NULL) {
            known &= !host_awaited(h, now);
            continue;
        }
        rc = gw_dns_cached(h->name, &h->addrs, h->err, sizeof(h->err));
        if (rc != GW_AGAIN) {
            h->state = rc == GW_OK ? 1 : -1;
            continue;
        }
        h->state = 0;
        h->asked = now;
        h->req = gw_dns_resolve(h->name, pool_on_dns, h);
        if (h->req == NULL) {
            h->state = -1;
            snprintf(h->err, sizeof(h->err), "%.60s: out of memory",
                     h->name);
            continue;
        }
        known = 0;
    }
    return known;
}

/* Starts c once every host is resolved; a failure goes to *out. */
static void
conn_start_resolved(struct lpg_conn *c, struct lpg_op **out,
                    int fail_waiting)
{
    const char *why = NULL;
    char        msg[LPG_MSG_MAX];
    int         rc;

    c->opened = gw_loop_mono_fresh();    /* libpq's connect_timeout */
    c->since = c->opened;
    rc = conn_start_libpq(c, &why);

    if (rc == LPG_NODNS) {
        snprintf(msg, sizeof(msg), "postgres: cannot resolve: %s", why);
        conn_down(c, "dns", msg, out, fail_waiting);
    } else if (rc != GW_OK) {
        conn_connect_failed(c, out, fail_waiting);
    }
}

/* A lookup of the pool's hosts ended: the connections waiting for the
 * answers start (or fail, kind "dns"). */
static void
pool_on_dns(void *arg, const struct gw_dns_addrs *a, const char *err)
{
    struct lpg_host *h = arg;
    struct lpg_pool *pg = h->pg;
    struct lpg_op   *done = NULL;
    int              i;

    h->req = NULL;
    if (a != NULL) {
        h->addrs = *a;
        h->state = 1;
    } else {
        h->state = -1;
        snprintf(h->err, sizeof(h->err), "%s", err);
    }
    for (i = 0; i < pg->nhosts; i++) {
        if (host_awaited(&pg->hosts[i], gw_loop_mono_fresh())) {
            return;                      /* the others answer later */
        }
    }
    for (i = 0; i < pg->npool; i++) {
        if (pg->conns[i].state == LPG_CONN_RESOLVING) {
            conn_start_resolved(&pg->conns[i], &done, 1);
        }
    }
    dispatch(pg);
    deliver_list(done);
}

/* Opens c: resolves the URL's host names first when needed (never on
 * the loop's thread with the system resolver; pool_on_dns() goes on).
 * A connect that fails at once goes to *out, the waiting ops left. */
static void
conn_start(struct lpg_conn *c, struct lpg_op **out)
{
    struct lpg_pool *pg = c->pg;

    c->nskip = 0;                        /* a new connect tries them all */
    if (pg->nhosts > 0 && !pool_resolve(pg)) {
        c->fd = -1;
        c->opened = gw_loop_mono_fresh();
        c->since = c->opened;
        c->state = LPG_CONN_RESOLVING;
        return;
    }
    conn_start_resolved(c, out, 0);
}

/* ------------------------------------------------------------ sending */

static int
conn_flush(struct lpg_conn *c)
{
    int rc = PQflush(c->pc);

    if (rc < 0) {
        return GW_ERR;
    }
    if (rc > 0) {
        event_add(c->wev, NULL);
    }
    return GW_OK;
}

/* The savepoint commands of a transaction's statements, and the pool's
 * SET LOCAL of tx_timeout (pg->tx_limit: NULL here), prepared once per
 * connection (named gw_fN) so that each use is Bind/Execute only.
 * They are prepared in the pipeline of the first BEGIN on the connection,
 * before anything in a transaction can fail: the server refuses a Parse
 * in a failed transaction ("current transaction is aborted"), so
 * preparing them lazily, at the first undo, would fail the undo. */
enum { LPG_SP_SET, LPG_SP_RELEASE, LPG_SP_UNDO, LPG_SP_LIMIT, LPG_SP_N };
static const char *const lpg_sp_sql[LPG_SP_N] = {
    "SAVEPOINT gw_s", "RELEASE SAVEPOINT gw_s", "ROLLBACK TO SAVEPOINT gw_s",
    NULL
};
/* The undo, as text for a script (simple query protocol). */
static const char lpg_sp_undo_text[] =
    "ROLLBACK TO SAVEPOINT gw_s; RELEASE SAVEPOINT gw_s; ";

/* Queues the Parse of the savepoint commands in c's pipeline unless done
 * before; *ncmd counts the commands queued (their results are skipped). */
static int
prepare_sp(struct lpg_conn *c, int *ncmd)
{
    char name[16];
    int  i;

    if (c->sp_prepared) {
        return GW_OK;
    }
    for (i = 0; i < LPG_SP_N; i++) {
        const char *sql = lpg_sp_sql[i] != NULL ? lpg_sp_sql[i]
                                                : c->pg->tx_limit;

        if (sql[0] == '\0') {
            continue;                    /* tx_timeout 0: none */
        }
        snprintf(name, sizeof(name), "gw_f%d", i);
        if (PQsendPrepare(c->pc, name, sql, 0, NULL) != 1) {
            return GW_ERR;
        }
        (*ncmd)++;
    }
    c->sp_prepared = 1;
    return GW_OK;
}

/* Queues savepoint command `which` (prepared by prepare_sp()) in c's
 * pipeline; *ncmd counts the commands queued. */
static int
send_sp(struct lpg_conn *c, int which, int *ncmd)
{
    char name[16];

    snprintf(name, sizeof(name), "gw_f%d", which);
    if (PQsendQueryPrepared(c->pc, name, 0, NULL, NULL, NULL, 0) != 1) {
        return GW_ERR;
    }
    (*ncmd)++;
    return GW_OK;
}

/* Name `name`, prepared on c's server, is no longer cached: deallocate
 * it with the next statement sent. */
static void
dealloc_push(struct lpg_conn *c, unsigned name)
{
    if (c->ndealloc == c->dealloc_cap) {
        /* more than statements take away (send_dealloc()): a
         * transaction's COMMIT or ROLLBACK carries none */
        int       cap = c->dealloc_cap ? c->dealloc_cap * 2 : 16;
        unsigned *p = realloc(c->dealloc, (size_t) cap * sizeof(*p));

        if (p == NULL) {
            gw_log(GW_LOG_WARN, "postgres: prepared statement gw%u left on"
                   " the server (no memory)", name);
            return;
        }
        c->dealloc = p;
        c->dealloc_cap = cap;
    }
    c->dealloc[c->ndealloc++] = name;
}

/* The command of op's first DEALLOCATE: behind its statement and, in a
 * savepoint, the RELEASE (a BEGIN: its SET LOCAL). */
static int
dealloc_step(const struct lpg_op *op)
{
    return op->exec_step + 1 + (op->in_sp ? 1 : 0) + op->limit;
}

/* Queues up to LPG_DEALLOC_OP of the DEALLOCATEs pending on c behind
 * op's statement, whose results are skipped (conn_read()); their names
 * go with op. Behind it, not ahead: ahead, they made the server refuse
 * a statement that cannot run in a pipeline (VACUUM: "cannot be executed
 * within a pipeline"), and in an aborted transaction (a failed
 * db:atomic job's statements and ROLLBACK) the server refuses every
 * command but ROLLBACK: a DEALLOCATE ahead of the ROLLBACK failed it,
 * the session stayed aborted. Behind, a DEALLOCATE runs only if all
 * before it in the pipeline succeeded; skipped (PIPELINE_ABORTED), its
 * name is queued again. Never behind a COMMIT or ROLLBACK, whose
 * outcome must be theirs alone. Prepared statements are not
 * transactional: one dropped inside a transaction stays dropped if it
 * rolls back. */
static int
send_dealloc(struct lpg_conn *c, struct lpg_op *op)
{
    char sql[32];
    int  n = c->ndealloc < LPG_DEALLOC_OP ? c->ndealloc : LPG_DEALLOC_OP;

    if (op->tx_end) {
        return GW_OK;               /* kept for a later statement */
    }
    for (int i = 0; i < n; i++) {
        snprintf(sql, sizeof(sql), "DEALLOCATE gw%u", c->dealloc[i]);
        if (PQsendQueryParams(c->pc, sql, 0, NULL, NULL, NULL, NULL, 0)
            != 1) {
            return GW_ERR;
        }
        op->dealloc[op->dealloc_n++] = c->dealloc[i];
    }
    c->ndealloc -= n;
    memmove(c->dealloc, c->dealloc + n, (size_t) c->ndealloc
            * sizeof(*c->dealloc));
    return GW_OK;
}

/* The cache entry of sql on c: a hit, or a free or least recently used
 * entry of its set (*hit 0; one pushed out is queued for DEALLOCATE, or,
 * its Parse still on the way, left to the Parse's result to queue). */
static unsigned
cache_entry(struct lpg_conn *c, const char *sql, int *hit)
{
    unsigned         base = (gw_store_hash(sql) % LPG_SETS) * LPG_WAYS;
    struct lpg_stmt *v = &c->cache[base];

    for (unsigned s = base; s < base + LPG_WAYS; s++) {
        struct lpg_stmt *e = &c->cache[s];

        if (e->sql == NULL) {
            if (v->sql != NULL) {
                v = e;
            }
        } else if (strcmp(e->sql, sql) == 0) {
            e->used = ++c->use_tick;
            *hit = 1;
            return s;
        } else if (v->sql != NULL && e->used < v->used) {
            v = e;
        }
    }
    if (v->sql != NULL) {
        if (v->ok) {
            dealloc_push(c, v->name);
        }
        free(v->sql);
        v->sql = NULL;
    }
    v->ok = 0;
    v->used = ++c->use_tick;
    *hit = 0;
    return (unsigned) (v - c->cache);
}

/* Can op's parameters not be sent? Then msg says why (misuse). */
static int
op_unsendable(const struct lpg_op *op, char *msg, size_t size)
{
    if (op->nparams > 256) {
        snprintf(msg, size, "postgres: more than 256 parameters");
        return 1;
    }
    for (int i = 0; i < op->nparams; i++) {
        /* Text parameters go as C strings: a NUL would cut the value. */
        if (op->params[i].type == GW_STORE_TEXT
            && memchr(op->params[i].s, '\0', op->params[i].len) != NULL)
        {
            snprintf(msg, size, "postgres: parameter %d contains a NUL"
                     " byte", i + 1);
            return 1;
        }
    }
    return 0;
}

/* Sends op on c. Returns GW_OK, or GW_ERR (the connection is broken). */
static int
conn_send(struct lpg_conn *c, struct lpg_op *op)
{
    const char *values[256];
    int         lengths[256];
    char        numbuf[256][32];
    char        name[24];
    unsigned    slot;
    int         i, undo = 0, ncmd = 0, hit;

    /* Inside db:transaction() a failed statement is undone alone and the
     * transaction goes on (as on SQLite), instead of every later
     * statement failing "current transaction is aborted": each statement
     * runs in a savepoint (SAVEPOINT, statement, RELEASE, all in the same
     * pipeline: no extra round trip), and the next command of the
     * transaction (COMMIT included) first rolls back to it. The first
     * statement too: undoing it by restarting the transaction (ROLLBACK,
     * BEGIN) would need its own care, for a subtransaction's worth of
     * server work saved. */
    if (op->txid != 0 && !op->tx_begin) {
        undo = c->sp_failed;
        c->sp_failed = 0;
    }
    /* A batch's statements (db:atomic) run in no savepoint: one failing
     * fails the whole job, rolled back, so there is nothing to undo
     * alone, and a SAVEPOINT + RELEASE per statement was two more
     * commands and a subtransaction each on the server. What the
     * savepoints also guarded against -- a COMMIT or ROLLBACK in the
     * job's SQL ending the transaction, the statements sent behind it
     * then committing one by one -- is refused before the batch is sent
     * (controls_tx()). */
    op->in_sp = op->txid != 0 && !op->tx_begin && !op->tx_end
                && op->batch == NULL;
    /* Every transaction (db:transaction's, db:atomic's) limits how long
     * it may sit idle, in the BEGIN's own pipeline (no round trip of its
     * own): an instance that freezes inside one (a VM paused, SIGSTOP)
     * would otherwise hold its row locks, and every other instance
     * waiting on them, until it resumes. The server then ends the
     * session (25P03), which rolls back and releases them. SET LOCAL:
     * it ends with the transaction. */
    op->limit = op->tx_begin && c->pg->tx_limit[0] != '\0';
    /* A batch's statements share one Sync per segment -- the last
     * statement, and every LPG_DEPTH-th, since no answer comes before a
     * Sync and the next segment waits for room -- instead of one each:
     * the server then answers the segment in one write, and the client
     * sends it in one. A failure skips the rest of its segment
     * (PGRES_PIPELINE_ABORTED), which fails the job anyway; a BEGIN
     * that fails so skips the statements behind it, which therefore
     * never run outside the transaction. Every
     * statement of a batch is sent (lpg_begin_atomic() checks them
     * first), so a segment's Sync always follows its statements. */
    op->no_sync = op->kind == LPG_OP_STMT && op->batch != NULL
                  && op->batch_i != op->batch->n - 1
                  && (op->batch_i + 1) % LPG_DEPTH != 0;
    op->step = 0;
    op->dealloc_n = 0;
    op->has_prepare = 0;
    if (op->kind == LPG_OP_SCRIPT) {
        char  *text;
        size_t len = strlen(op->sql);
        int    rc;

        if (!undo && !op->in_sp) {
            text = op->sql;
        } else {
            /* One simple query: the newline ends a trailing -- comment. */
            text = malloc(len + 128);
            if (text == NULL) {
                return GW_ERR;
            }
            snprintf(text, len + 128, "%s%s%s%s",
                     undo ? lpg_sp_undo_text : "",
                     op->in_sp ? "SAVEPOINT gw_s;\n" : "", op->sql,
                     op->in_sp ? "\n;RELEASE SAVEPOINT gw_s" : "");
        }
        rc = PQexitPipelineMode(c->pc) == 1 && PQsendQuery(c->pc, text) == 1;
        c->pg->round_trips += rc;
        if (text != op->sql) {
            free(text);
        }
        if (!rc) {
            return GW_ERR;
        }
        goto sent;
    }
    {
        char msg[80];

        if (op_unsendable(op, msg, sizeof(msg))) {
            /* nothing is sent: an undo still owed goes with the next
             * command (dropped, every later statement of the transaction
             * failed "current transaction is aborted") */
            c->sp_failed = c->sp_failed || undo;
            op_set_error(op, "misuse", msg);
            return GW_AGAIN;
        }
    }
    if ((op->tx_begin && prepare_sp(c, &ncmd) != GW_OK)
        || (undo && (send_sp(c, LPG_SP_UNDO, &ncmd) != GW_OK
                  || send_sp(c, LPG_SP_RELEASE, &ncmd) != GW_OK))
        || (op->in_sp && send_sp(c, LPG_SP_SET, &ncmd) != GW_OK))
    {
        return GW_ERR;
    }
    slot = cache_entry(c, op->sql, &hit);
    op->exec_step = ncmd;
    if (!hit) {
        c->cache[slot].sql = strdup(op->sql);
        c->cache[slot].name = c->next_name++;
        snprintf(name, sizeof(name), "gw%u", c->cache[slot].name);
        if (c->cache[slot].sql == NULL
            || PQsendPrepare(c->pc, name, op->sql, 0, NULL) != 1)
        {
            return GW_ERR;
        }
        op->has_prepare = 1;
        op->exec_step++;
    }
    op->cache_name = c->cache[slot].name;
    op->cache_slot = (int)slot;
    snprintf(name, sizeof(name), "gw%u", c->cache[slot].name);
    for (i = 0; i < op->nparams; i++) {
        struct gw_store_val *v = &op->params[i];

        lengths[i] = 0;
        switch (v->type) {
        case GW_STORE_INT:
            snprintf(numbuf[i], sizeof(numbuf[i]), "%lld", (long long)v->i);
            values[i] = numbuf[i];
            break;
        case GW_STORE_REAL:
            snprintf(numbuf[i], sizeof(numbuf[i]), "%.17g", v->d);
            values[i] = numbuf[i];
            break;
        case GW_STORE_TEXT:
            values[i] = v->s;
            break;
        default:
            values[i] = NULL;
            break;
        }
    }
    if (PQsendQueryPrepared(c->pc, name, op->nparams, values, lengths, NULL,
                            0) != 1
        || (op->in_sp && send_sp(c, LPG_SP_RELEASE, &ncmd) != GW_OK)
        || (op->limit && send_sp(c, LPG_SP_LIMIT, &ncmd) != GW_OK)
        || (c->ndealloc > 0 && send_dealloc(c, op) != GW_OK)
        || (!op->no_sync && PQpipelineSync(c->pc) != 1))
    {
        return GW_ERR;
    }
    op->ncmds = dealloc_step(op) + op->dealloc_n;
    if (!op->no_sync) {
        c->pg->round_trips++;
    }
sent:
    op->next = NULL;
    if (c->tail != NULL) {
        c->tail->next = op;
    } else {
        c->head = op;
    }
    c->tail = op;
    if (c->inflight++ == 0) {
        c->since = gw_loop_mono_fresh();
    }
    if (op->tx_begin) {
        c->txid = op->txid;
        c->tx_wait = op->tx_wait;
    }
    /* A statement without a Sync waits in libpq's buffer for its
     * segment's last one. A failed flush leaves op queued, to fail with
     * the connection, but no event may come to say it broke: libpq has
     * usually closed the socket (it read EOF or a reset while the send
     * was partial), and a closed socket leaves the event loop's set, so
     * op would wait for query_timeout and fail as a silent server.
     * Run conn_event() now: it finds the broken connection and fails
     * everything on it. conn_reset() frees the event, and the pending
     * run with it, should the connection go first. */
    if (!op->no_sync && conn_flush(c) != GW_OK && c->rev != NULL) {
        event_active(c->rev, EV_READ | EV_WRITE, 0);
    }
    return GW_OK;
}

/* ------------------------------------------------------------ results */

/* The server's own answer to "did op leave the connection where it
 * should be?", asked once op's results are all in: a connection outside
 * db:transaction() must be idle (no transaction left open for the next
 * user of the pool), one inside must still be in its transaction (no
 * COMMIT or ROLLBACK slipped into the SQL). PQtransactionStatus() is
 * exact only when nothing else is in flight on c; while other
 * statements are pipelined behind op, the command tag tells instead (a
 * single extended-protocol statement opens a transaction block only as
 * BEGIN or START TRANSACTION). Returns GW_OK, or LPG_DISCARD when c must
 * be closed (the server then rolls back). */
static int
conn_check_tx(struct lpg_conn *c, struct lpg_op *op)
{
    PGTransactionStatusType st = PQTRANS_ACTIVE;
    int                     in_tx, failed;
    const char             *tag;
    struct gw_store_tx     *tx;

    failed = op->err != NULL || op->errkind[0] != '\0';
    if (op->tx_begin && failed) {
        /* c->txid is cleared below. A BEGIN that ran but whose SET LOCAL
         * failed (a server without idle_in_transaction_session_timeout)
         * left c in a transaction: it must go. (Inside a batch, its
         * statements in flight behind it: the last of them finds it.) */
        if (c->inflight == 0) {
            st = PQtransactionStatus(c->pc);
        }
        return st == PQTRANS_INTRANS || st == PQTRANS_INERROR
               ? LPG_DISCARD : GW_OK;
    }
    in_tx = op->txid != 0 && c->txid == op->txid && !op->tx_end;
    if (c->inflight == 0) {
        st = PQtransactionStatus(c->pc);
    }
    if (!in_tx) {
        if (st == PQTRANS_ACTIVE && op->res != NULL) {
            tag = PQcmdStatus(op->res);
            if (strcmp(tag, "BEGIN") == 0
                || strcmp(tag, "START TRANSACTION") == 0)
            {
                st = PQTRANS_INTRANS;
            }
        }
        if (st == PQTRANS_INTRANS || st == PQTRANS_INERROR) {
            op_force_error(op, "misuse", "postgres: the statement left a"
                           " transaction open (rolled back): transaction"
                           " control belongs to db:transaction()");
            return LPG_DISCARD;
        }
        return GW_OK;
    }
    if (st == PQTRANS_IDLE) {
        op_force_error(op, "misuse", "postgres: COMMIT or ROLLBACK in SQL"
                       " ended the transaction early: transaction control"
                       " belongs to db:transaction()");
        tx = gw_store_tx_find(NULL, op->txid);
        if (tx != NULL) {
            tx->state = LPG_TX_ENDED;
        }
        c->txid = 0;                     /* idle: it serves others again */
    }
    return GW_OK;
}

/* op is done (answered, or failed before it was sent): a failure stops
 * the rest of its batch. Nothing more may go after it: the transaction is
 * aborted, and the first statement sent after its answer would carry the
 * undo (c->sp_failed) and run again, in the middle of the batch, with the
 * later undo of the ops still in flight finding no savepoint (the
 * ROLLBACK then failed, the connection was discarded). */
static void
batch_note(struct lpg_op *op)
{
    if (op->batch != NULL && (op->err != NULL || op->errkind[0] != '\0')) {
        op->batch->failed = 1;
    }
}

/* Moves c's first in-flight op to *out. Returns GW_OK or LPG_DISCARD
 * (see conn_check_tx()). */
static int
conn_pop_head(struct lpg_conn *c, struct lpg_op **out)
{
    struct lpg_op *op = c->head;
    int             rc;

    c->head = op->next;
    if (c->head == NULL) {
        c->tail = NULL;
    }
    c->inflight--;
    rc = conn_check_tx(c, op);
    batch_note(op);
    if (op->err != NULL && op->txid != 0 && c->txid == op->txid
        && op->in_sp && op->batch == NULL)
    {
        c->sp_failed = 1;                /* undone before the next */
    }
    if (op->tx_end || (op->tx_begin && (op->err != NULL
                                        || op->errkind[0] != '\0')))
    {
        c->txid = 0;
    }
    if (c->txid == 0) {
        c->sp_failed = 0;
    }
    op->next = *out;
    *out = op;
    return rc;
}

/* The cache entry op's Parse made, if it still holds that statement
 * (the entry may have gone to another one since), or NULL. */
static struct lpg_stmt *
op_stmt(struct lpg_conn *c, const struct lpg_op *op)
{
    struct lpg_stmt *e = &c->cache[op->cache_slot];

    return e->sql != NULL && e->name == op->cache_name ? e : NULL;
}

/* op's Parse failed or was skipped: forget its statement, so the next
 * use prepares again. */
static void
conn_forget_prepared(struct lpg_conn *c, struct lpg_op *op)
{
    struct lpg_stmt *e = op_stmt(c, op);

    if (e != NULL) {
        free(e->sql);
        e->sql = NULL;
    }
}

/* op's Parse succeeded: its entry may be deallocated once pushed out;
 * if it was pushed out meanwhile, that is now. */
static void
conn_prepared_ok(struct lpg_conn *c, struct lpg_op *op)
{
    struct lpg_stmt *e = op_stmt(c, op);

    if (e != NULL) {
        e->ok = 1;
    } else {
        dealloc_push(c, op->cache_name);
    }
}

/* r answers op's statement: a stale plan (pg_stale_plan()) would fail so
 * for good on c, as would every other statement c prepared before the
 * schema changed. c forgets them all (each deallocated behind a later
 * statement, or once its Parse is answered), so that they are prepared
 * anew; and op, outside a db:atomic job (which fails as a whole, marked
 * retryable: sql.lua runs it again), is sent again once (conn_event()). */
static void
op_stale_plan(struct lpg_conn *c, struct lpg_op *op, const PGresult *r)
{
    if (op->kind != LPG_OP_STMT || op->step != op->exec_step
        || !pg_stale_plan(r))
    {
        return;
    }
    for (int i = 0; i < LPG_CACHE; i++) {
        struct lpg_stmt *e = &c->cache[i];

        if (e->sql != NULL) {
            if (e->ok) {
                dealloc_push(c, e->name);
            }
            free(e->sql);
            e->sql = NULL;
        }
    }
    if (op->batch == NULL && op->replan == 0) {
        op->replan = 1;
    }
}

/* 1 when a and b are NULL or equal strings. */
static int
same_str(const char *a, const char *b)
{
    return a == b || (a != NULL && b != NULL && strcmp(a, b) == 0);
}

/* 1 when c and d are connected to the same server (address and port). */
static int
conn_same_server(struct lpg_conn *c, struct lpg_conn *d)
{
    return d->state == LPG_CONN_READY && d->pc != NULL && c->pc != NULL
           && same_str(PQhost(d->pc), PQhost(c->pc))
           && same_str(PQhostaddr(d->pc), PQhostaddr(c->pc))
           && same_str(PQport(d->pc), PQport(c->pc));
}

/* c's server refused a write (25006): it is a standby now, or a primary
 * made read-only. Every connection of the pool to that server is marked,
 * not c alone: each is closed once idle and none gets new statements, so
 * that reads are not served on by the old server (stale after the
 * promotion) and each of the others does not fail a write of its own
 * first. */
static void
pool_mark_readonly(struct lpg_conn *c)
{
    struct lpg_pool *pg = c->pg;
    int              i;

    c->readonly = 1;
    for (i = 0; i < pg->npool; i++) {
        struct lpg_conn *d = &pg->conns[i];

        if (d != c && conn_same_server(c, d)) {
            d->readonly = 1;
        }
    }
}

/* c got no reply for query_timeout: its server may hang (stopped, cut
 * off by a partition that drops packets), and then so do the pool's other
 * connections to it, which a dead server's would not (their sockets
 * break). Each of them gets no new statement and is closed once idle, so
 * that the next statements do not each wait query_timeout on one of them
 * in turn, but go to a new connection (to the promoted standby, after a
 * failover; conn_try_next() passes a server that does not answer). Those
 * with statements in flight keep their own query_timeout. */
static void
pool_mark_silent(struct lpg_conn *c)
{
    struct lpg_pool *pg = c->pg;
    int              i;

    for (i = 0; i < pg->npool; i++) {
        struct lpg_conn *d = &pg->conns[i];

        if (d != c && conn_same_server(c, d)) {
            d->silent = 1;
        }
    }
}

/* Closes the idle connections marked read-only or silent. */
static void
pool_retire_marked(struct lpg_pool *pg, struct lpg_op **out)
{
    int i;

    for (i = 0; i < pg->npool; i++) {
        struct lpg_conn *d = &pg->conns[i];

        if (d->state != LPG_CONN_READY || d->inflight != 0) {
            continue;
        }
        if (d->readonly) {
            /* A standby now (25006): a new connection finds the primary.
             * (Its siblings to that server too: pool_mark_readonly().) */
            gw_log(GW_LOG_INFO, "postgres: server is read-only;"
                   " reconnecting to find the primary");
            conn_fail(d, "unavailable", "postgres: server is read-only",
                      out);
        } else if (d->silent) {
            gw_log(GW_LOG_INFO, "postgres: another connection to this"
                   " server got no reply within query_timeout; closing"
                   " this idle one too");
            conn_fail(d, "unavailable", "postgres: server not answering",
                      out);
        }
    }
}

/* Reads every available result. Returns GW_ERR when the connection is
 * broken, LPG_DISCARD when it must be closed (conn_check_tx()), else
 * GW_OK. Finished ops are moved to *out. */
static int
conn_read(struct lpg_conn *c, struct lpg_op **out)
{
    PGresult       *r;
    struct lpg_op *op;

    if (PQconsumeInput(c->pc) != 1) {
        return GW_ERR;
    }
    c->since = gw_loop_mono_fresh();
    if (c->head == NULL) {
        /* Nothing asked: parses what came (the FATAL that ends an idle
         * session, to on_notice(), before the EOF behind it closes c:
         * a reserved connection's transaction learns why it ended). */
        (void)PQisBusy(c->pc);
    }
    while ((op = c->head) != NULL && !PQisBusy(c->pc)) {
        ExecStatusType st;

        r = PQgetResult(c->pc);
        if (r == NULL) {
            /* End of one command's results. */
            if (op->kind == LPG_OP_SCRIPT) {
                if (conn_pop_head(c, out) != GW_OK) {
                    return LPG_DISCARD;
                }
                if (PQenterPipelineMode(c->pc) != 1) {
                    return GW_ERR;
                }
                continue;
            }
            op->step++;                  /* next command's results */
            if (op->no_sync && op->step == op->ncmds) {
                /* all its commands answered: no Sync of its own */
                if (conn_pop_head(c, out) != GW_OK) {
                    return LPG_DISCARD;
                }
            }
            continue;
        }
        st = PQresultStatus(r);
        if (st == PGRES_PIPELINE_SYNC) {
            PQclear(r);
            if (conn_pop_head(c, out) != GW_OK) {
                return LPG_DISCARD;
            }
            continue;
        }
        if (st == PGRES_FATAL_ERROR || st == PGRES_NONFATAL_ERROR) {
            const char *code = PQresultErrorField(r, PG_DIAG_SQLSTATE);

            if (code != NULL && strcmp(code, "25006") == 0) {
                pool_mark_readonly(c);   /* replaced once idle */
            }
            if (op->has_prepare && op->step == op->exec_step - 1) {
                conn_forget_prepared(c, op);
            }
            if (op->err == NULL && st == PGRES_FATAL_ERROR) {
                op_stale_plan(c, op, r);
                op->err = r;
            } else {
                PQclear(r);
            }
            continue;
        }
        if (st == PGRES_PIPELINE_ABORTED && op->dealloc_n > 0
            && op->step >= dealloc_step(op)
            && op->step < dealloc_step(op) + op->dealloc_n) {
            /* skipped behind op's failure: deallocate it later */
            dealloc_push(c, op->dealloc[op->step - dealloc_step(op)]);
            PQclear(r);
            continue;
        }
        if (st == PGRES_PIPELINE_ABORTED) {
            if (op->has_prepare && op->step == op->exec_step - 1) {
                /* skipped after an earlier error (a SAVEPOINT in an
                 * aborted transaction): never prepared either */
                conn_forget_prepared(c, op);
            }
            PQclear(r);
            op_set_error(op, "error", "postgres: pipeline aborted");
            continue;
        }
        if (op->kind != LPG_OP_SCRIPT && op->step != op->exec_step) {
            if (op->has_prepare && op->step == op->exec_step - 1) {
                conn_prepared_ok(c, op);
            }
            PQclear(r);                  /* Parse, SAVEPOINT, RELEASE ... */
            continue;
        }
        if (op->res != NULL) {
            PQclear(op->res);
        }
        op->res = r;
    }
    return GW_OK;
}

static void
conn_event(evutil_socket_t fd, short what, void *arg)
{
    struct lpg_conn *c = arg;
    struct lpg_pool     *pg = c->pg;
    struct lpg_op   *done = NULL, *rev = NULL, *next;
    int               rc;

    if (c->state == LPG_CONN_CONNECTING) {
        rc = c->checking ? conn_poll_check(c, what) : conn_poll_connect(c);
        if (rc == LPG_NOSYNC) {
            const char *msg = "postgres: the server does not commit with a"
                              " synchronous standby (require_sync)";

            conn_down(c, "unavailable", msg, &done, 1);
        } else if (rc == GW_ERR) {
            conn_connect_failed(c, &done, 1);
        }
    } else if (c->state == LPG_CONN_READY) {
        if ((what & EV_WRITE) && conn_flush(c) != GW_OK) {
            char msg[LPG_MSG_MAX];

            conn_lost(c, "unavailable",
                      lost_msg(c, LPG_LOST, msg, sizeof(msg)), &done);
        } else if (what & EV_READ) {
            rc = conn_read(c, &done);
            if (rc == LPG_DISCARD) {
                conn_fail(c, "unavailable", "postgres: connection"
                          " discarded: an earlier statement on it left a"
                          " transaction open, so this one was rolled back",
                          &done);
            } else if (rc != GW_OK) {
                char msg[LPG_MSG_MAX];

                conn_lost(c, "unavailable",
                          lost_msg(c, LPG_LOST, msg, sizeof(msg)), &done);
            }
        }
    }
    for (struct lpg_op **pp = &done; *pp != NULL;) {
        struct lpg_op *op = *pp;

        if (!op->sync_check) {
            pp = &op->next;
            continue;
        }
        *pp = op->next;                  /* the pool's own: not delivered */
        if (op->errkind[0] == '\0' && op->err == NULL && op->res != NULL
            && PQntuples(op->res) == 1
            && strcmp(PQgetvalue(op->res, 0, 0), "t") != 0
            && c->state == LPG_CONN_READY)
        {
            const char *msg = "postgres: the server no longer commits with"
                              " a synchronous standby (require_sync)";

            gw_log(GW_LOG_WARN, "%s; closing its connection", msg);
            c->nosync = 1;
            pool_mark_down(pg, "unavailable", msg);
        }
        op_free(op);
    }
    for (struct lpg_op **pp = &done; *pp != NULL;) {
        struct lpg_op *op = *pp;

        if (op->replan != 1 || op->co == NULL || op->errkind[0] != '\0') {
            pp = &op->next;
            continue;
        }
        /* its statement did not run (op_stale_plan()): sent again, first
         * in line (in a transaction: on its connection, after the undo
         * of its savepoint) */
        *pp = op->next;
        op->replan = 2;
        PQclear(op->err);
        op->err = NULL;
        if (op->res != NULL) {
            PQclear(op->res);
            op->res = NULL;
        }
        op->next = pg->wq;
        pg->wq = op;
        if (pg->wq_tail == NULL) {
            pg->wq_tail = op;
        }
    }
    if (c->state == LPG_CONN_READY && c->nosync && c->inflight == 0) {
        conn_fail(c, "unavailable", "postgres: the server no longer commits"
                  " with a synchronous standby (require_sync)", &done);
    }
    pool_retire_marked(pg, &done);
    /* done is newest-first: deliver in completion order. */
    for (; done != NULL; done = next) {
        next = done->next;
        done->next = rev;
        rev = done;
    }
    dispatch(pg);
    deliver_list(rev);
}

/* --------------------------------------------------------- dispatching */

/* c is idle, so the server has nothing to say on it; reads what came
 * anyway before op is sent there. A session that ended while
 * idle (a shutdown, pg_terminate_backend, idle_session_timeout: FATAL,
 * then EOF) is closed here and 0 returned, so the statement goes to a new
 * connection: sent on this one, it would be answered by that FATAL, and
 * a write would read as of unknown outcome though it never ran. The same
 * on the connection op's transaction reserved: the loop of an instance
 * that froze past tx_timeout may run the transaction's next command (its
 * COMMIT) before it reads the server's goodbye; op then fails as the
 * transaction is lost, not of unknown outcome. */
static int
conn_idle_ok(struct lpg_conn *c, struct lpg_op *op)
{
    struct lpg_op *none = NULL;          /* c has no ops */

    if (PQconsumeInput(c->pc) == 1) {
        (void)PQisBusy(c->pc);           /* parses it: FATAL to on_notice */
        if (!c->ended) {
            return 1;
        }
    }
    if (c->txid != 0) {
        op_set_error(op, "timeout", c->ended == LPG_TX_IDLE ? LPG_IDLE_TX
                     : "postgres: transaction is no longer active (its"
                       " session ended)");
    }
    gw_log(GW_LOG_INFO, "postgres: the session of an idle connection"
           " ended; reconnecting");
    conn_fail(c, "unavailable", "postgres: session ended", &none);
    return 0;
}

static struct lpg_conn *
choose_conn(struct lpg_pool *pg, struct lpg_op *op, int *fail)
{
    struct lpg_conn *best = NULL, *c;
    int               i, free_slot = -1, connecting = 0;

    *fail = 0;
    if (op->batch != NULL && op->batch->sent != op->batch_i) {
        /* behind its batch's previous op, in order: the statements wait
         * for their BEGIN to get a connection */
        return NULL;
    }
    for (i = 0; i < pg->npool; i++) {
        c = &pg->conns[i];
        if (c->state == LPG_CONN_FREE) {
            if (free_slot < 0) {
                free_slot = i;
            }
            continue;
        }
        if (c->state == LPG_CONN_CONNECTING
            || c->state == LPG_CONN_RESOLVING)
        {
            connecting++;
            continue;
        }
        if (op->txid != 0 && !op->tx_begin) {
            if (c->txid != op->txid) {
                continue;
            }
            if (op->batch != NULL) {
                /* right behind the previous one (checked above); a
                 * segment starts on an idle connection only, so it goes
                 * out whole in one dispatch pass: a failure read while
                 * it went out would stop it before its Sync */
                return c->inflight < (op->batch_i % LPG_DEPTH == 0
                                      ? 1 : LPG_DEPTH) ? c : NULL;
            }
            return c->inflight == 0 ? c : NULL;
        }
        if (c->txid != 0 || c->readonly || c->nosync || c->silent) {
            continue;
        }
        if (c->head != NULL && c->head->kind == LPG_OP_SCRIPT) {
            continue;                    /* out of pipeline mode till done */
        }
        if (op->tx_begin || op->kind == LPG_OP_SCRIPT) {
            if (c->inflight == 0) {
                return c;
            }
            continue;
        }
        if (c->inflight < LPG_DEPTH
            && (best == NULL || c->inflight < best->inflight))
        {
            best = c;
        }
    }
    if (op->txid != 0 && !op->tx_begin) {
        *fail = 1;                       /* its connection is gone */
        return NULL;
    }
    if ((best == NULL || best->inflight > 0) && free_slot >= 0
        && connecting == 0 && gw_loop_mono_fresh() >= pg->down_until)
    {
        struct lpg_conn *n = &pg->conns[free_slot];
        struct lpg_op   *lost = NULL;

        n->pg = pg;
        conn_start(n, &lost);
        post_list(lost);                 /* empty: n had no ops yet */
    }
    if (best == NULL && !pool_has_live(pg)) {
        *fail = 2;                       /* down, nothing to wait for */
    }
    return best;
}

/* Takes op (whose predecessor is prev, or NULL at the head) out of the
 * wait queue; op->next is cleared. */
static void
wq_unlink(struct lpg_pool *pg, struct lpg_op *prev, struct lpg_op *op)
{
    if (prev != NULL) {
        prev->next = op->next;
    } else {
        pg->wq = op->next;
    }
    if (pg->wq_tail == op) {
        pg->wq_tail = prev;
    }
    op->next = NULL;
}

static void
dispatch(struct lpg_pool *pg)
{
    struct lpg_op *op, *prev = NULL, *next, *done = NULL;
    int             fail;

    if (pg->dispatching) {
        return;
    }
    pg->dispatching = 1;
    for (op = pg->wq; op != NULL; op = next) {
        struct lpg_conn *c;

        next = op->next;
        if (op->batch != NULL && op->batch->failed) {
            /* an earlier statement of its batch failed: not sent */
            wq_unlink(pg, prev, op);
            op->batch->sent++;
            op_set_error(op, "error", "postgres: not sent: an earlier"
                         " statement of the batch failed");
            op->next = done;
            done = op;
            continue;
        }
        c = choose_conn(pg, op, &fail);
        /* (its transaction's connection, or a free one) */
        while (c != NULL && c->head == NULL && !conn_idle_ok(c, op)) {
            c = choose_conn(pg, op, &fail);  /* c was closed: another */
        }
        if (c == NULL && fail == 0) {
            prev = op;
            continue;
        }
        wq_unlink(pg, prev, op);
        if (op->batch != NULL) {
            op->batch->sent++;           /* the next one may follow */
        }
        if (c == NULL) {
            if (fail == 1) {
                op_set_error(op, "timeout", "postgres: transaction is"
                             " no longer active (its connection was lost)");
            } else {
                op_set_error(op, pg->down_kind[0] ? pg->down_kind
                                                  : "unavailable",
                             pg->down_msg[0] ? pg->down_msg
                                             : "postgres: unavailable");
            }
            batch_note(op);
            op->next = done;
            done = op;
            continue;
        }
        {
            int rc = conn_send(c, op);

            if (rc == GW_AGAIN) {
                batch_note(op);          /* refused before sending */
                op->next = done;
                done = op;
            } else if (rc != GW_OK) {
                struct lpg_op *lost = NULL;
                char           msg[LPG_MSG_MAX];

                /* op was not queued on c: fail it with c's ops. */
                op_set_error(op, "unavailable", lost_msg(c, "postgres:"
                             " connection lost", msg, sizeof(msg)));
                op->next = lost;
                lost = op;
                conn_lost(c, "unavailable",
                          lost_msg(c, LPG_LOST, msg, sizeof(msg)), &lost);
                while (lost != NULL) {
                    struct lpg_op *l = lost;

                    lost = l->next;
                    l->next = done;
                    done = l;
                }
            }
        }
    }
    pg->dispatching = 0;
    post_list(done);
}

/* Whether the address c's connect tries has had connect_timeout to
 * answer. libpq gives each host of a multi-host URL connect_timeout of
 * its own only in its blocking connect; with PQconnectPoll the caller
 * keeps time, so this does, per address: a server that accepts the TCP
 * connection and then says nothing (stopped with SIGSTOP, a host cut off
 * behind a firewall that drops packets) must not keep every connect
 * from the standby promoted behind it. (Asked on the pool's tick, and a
 * move to the next address is seen there too: an address may get up to
 * one tick more than connect_timeout.) */
static int
conn_try_expired(struct lpg_conn *c, double now)
{
    struct lpg_addr a;

    if (c->pc == NULL) {
        return now - c->try_since > c->pg->connect_timeout;
    }
    conn_trying(c, &a);
    if (strcmp(a.addr, c->trying.addr) != 0
        || strcmp(a.port, c->trying.port) != 0)
    {
        c->trying = a;                   /* libpq moved on: a new clock */
        c->try_since = now;
    }
    return now - c->try_since > c->pg->connect_timeout;
}

/* c's connect got no answer from its address within connect_timeout:
 * that address goes last for the pool's next connects (pg->slow) until it
 * answers one, and this connect starts again without it, at the next
 * address; when none is left (or the URL's hosts cannot be reordered:
 * hostaddr given), it fails "unavailable". */
static void
conn_try_next(struct lpg_conn *c, struct lpg_op **out)
{
    struct lpg_pool *pg = c->pg;
    const char      *why = NULL;
    char             msg[LPG_MSG_MAX];
    int              rc;

    snprintf(msg, sizeof(msg), "postgres: connect timed out (%s%s%s gave"
             " no answer within %.3g s)",
             c->trying.addr[0] != '\0' ? c->trying.addr : "the server",
             c->trying.port[0] != '\0' ? ":" : "", c->trying.port,
             pg->connect_timeout);
    if (pg->nlisted == 0 || c->pc == NULL || c->trying.addr[0] == '\0') {
        conn_down(c, "unavailable", msg, out, 1);
        return;
    }
    if (!addr_in(pg->slow, pg->nslow, &c->trying)) {
        if (pg->nslow == LPG_MAXADDRS) {
            memmove(&pg->slow[0], &pg->slow[1],
                    sizeof(pg->slow[0]) * (LPG_MAXADDRS - 1));
            pg->nslow--;
        }
        pg->slow[pg->nslow++] = c->trying;
    }
    if (c->skip == NULL) {
        c->skip = calloc(LPG_MAXADDRS, sizeof(*c->skip));
    }
    if (c->skip == NULL || c->nskip == LPG_MAXADDRS) {
        conn_down(c, "unavailable", msg, out, 1);
        return;
    }
    c->skip[c->nskip++] = c->trying;
    conn_reset(c);                       /* connecting: no ops on it */
    rc = conn_start_libpq(c, &why);
    /* said after the restart: a URL of one address has no next one, and
     * the log said "trying the next host" for it */
    gw_log(GW_LOG_WARN, "%s; %s", msg, rc == LPG_NODNS
           ? "no other address to try" : "trying the next host");
    if (rc == LPG_NODNS) {
        conn_down(c, "unavailable", msg, out, 1);
    } else if (rc != GW_OK) {
        conn_connect_failed(c, out, 1);
    }
}

/* s c's statements in flight may go without a reply: its transaction's
 * own query_timeout, else the pool's */
static double
conn_wait(const struct lpg_conn *c)
{
    return c->txid != 0 && c->tx_wait > 0 ? c->tx_wait
                                          : c->pg->query_timeout;
}

static void
on_tick(evutil_socket_t fd, short what, void *arg)
{
    struct lpg_pool   *pg = arg;
    struct lpg_op *done = NULL;
    double          now = gw_loop_mono_fresh();
    int             i;

    for (i = 0; i < pg->npool; i++) {
        struct lpg_conn *c = &pg->conns[i];

        if (c->state == LPG_CONN_RESOLVING && pool_resolve(pg)) {
            /* The lookups still awaited took too long: go on with the
             * hosts that resolved (none: fails "dns"). */
            conn_start_resolved(c, &done, 1);
        } else if (c->state == LPG_CONN_RESOLVING
            && now - c->opened > pg->connect_timeout)
        {
            char        msg[120];
            const char *name = "";
            int         k;

            for (k = 0; k < pg->nhosts && name[0] == '\0'; k++) {
                if (pg->hosts[k].req != NULL) {
                    name = pg->hosts[k].name;
                }
            }
            snprintf(msg, sizeof(msg), "postgres: host name lookup timed"
                     " out: %.60s", name);
            /* The lookup goes on; the next connect may use its answer. */
            conn_down(c, "dns", msg, &done, 1);
        } else if (c->state == LPG_CONN_CONNECTING
                   && conn_try_expired(c, now))
        {
            conn_try_next(c, &done);
        } else if (c->state == LPG_CONN_READY && pg->require_sync
                   && c->inflight == 0 && c->txid == 0 && !c->readonly
                   && !c->silent
                   && !c->nosync && now - c->sync_at > pg->sync_recheck)
        {
            /* require_sync holds on an open connection too: the setting
             * can change under it (ALTER SYSTEM, a failover manager). Ask
             * again while the connection is idle. */
            struct lpg_op *op = calloc(1, sizeof(*op));

            c->sync_at = now;
            if (op != NULL && (op->sql = strdup(lpg_sync_check)) != NULL) {
                op->kind = LPG_OP_STMT;
                op->want_rows = 1;
                op->sync_check = 1;
                int rc = conn_send(c, op);

                if (rc != GW_OK) {
                    op_free(op);             /* not queued on c */
                }
                if (rc == GW_ERR) {
                    conn_fail(c, "unavailable", "postgres: connection lost",
                              &done);
                }
            } else if (op != NULL) {
                op_free(op);
            }
        } else if (c->state == LPG_CONN_READY && c->inflight > 0
                   && now - c->since > conn_wait(c))
        {
            char msg[100];

            snprintf(msg, sizeof(msg), "postgres: no reply within %.3g s",
                     conn_wait(c));
            /* an autocommit write among them may commit yet */
            pool_mark_silent(c);
            conn_lost(c, "timeout", msg, &done);
        }
    }
    pool_retire_marked(pg, &done);
    dispatch(pg);
    deliver_list(done);
}

/* ------------------------------------------------- open transactions */

/* The transaction txid ended (or never began): stop tracking it. */
static void
tx_forget(long txid)
{
    gw_store_tx_free(gw_store_tx_find(NULL, txid));
}

/* struct gw_store_tx rollback: the coroutine that began tx ended without
 * COMMIT or ROLLBACK. Gives the reserved connection back (ROLLBACK) or
 * discards it. May run inside another coroutine: results are posted,
 * never delivered from here. */
static void
tx_abandon(struct gw_store_tx *tx)
{
    struct lpg_pool     *pg = tx->owner;
    long              txid = tx->id;
    struct lpg_op   *op, *next, *prev = NULL, *done = NULL;
    struct lpg_conn *c = NULL;
    int               i;

    gw_store_tx_free(tx);
    /* Its ops still waiting for the connection (the BEGIN itself when
     * every connection was busy): never sent, nothing to undo. */
    for (op = pg->wq; op != NULL; op = next) {
        next = op->next;
        if (op->txid != txid) {
            prev = op;
            continue;
        }
        wq_unlink(pg, prev, op);
        op_set_error(op, "closed", "postgres: transaction abandoned");
        op->next = done;
        done = op;
    }
    for (i = 0; i < pg->npool; i++) {
        if (pg->conns[i].state == LPG_CONN_READY
            && pg->conns[i].txid == txid)
        {
            c = &pg->conns[i];
        }
    }
    if (c != NULL && c->inflight > 0
        && !(c->inflight == 1 && c->head->tx_begin))
    {
        /* A statement of it runs (maybe a long one): closing the
         * connection is what stops it; the server rolls back. */
        gw_log(GW_LOG_DEBUG, "postgres: transaction %ld abandoned with a"
               " statement in flight: connection closed", txid);
        conn_fail(c, "closed", "postgres: transaction abandoned", &done);
    } else if (c != NULL) {
        /* Idle (or only its BEGIN in flight): ROLLBACK, then the
         * connection serves others. No coroutine waits on the op. */
        op = calloc(1, sizeof(*op));
        if (op != NULL) {
            op->sql = strdup("ROLLBACK");
        }
        if (op == NULL || op->sql == NULL) {
            if (op != NULL) {
                op_free(op);
            }
            conn_fail(c, "closed", "postgres: transaction abandoned",
                      &done);
        } else {
            op->kind = LPG_OP_STMT;
            op->txid = txid;
            op->tx_end = 1;
            op->next = pg->wq;           /* first in line */
            pg->wq = op;
            if (pg->wq_tail == NULL) {
                pg->wq_tail = op;
            }
        }
    }
    dispatch(pg);
    post_list(done);
}

/* ------------------------------------------------------------ Lua side */

static struct lpg_pool *
check_pool(lua_State *L)
{
    struct lpg_ud *ud = gw_checkudata(L, 1, LPG_MT);

    if (ud->pg == NULL) {
        luaL_error(L, "postgres: pool is closed");
    }
    return ud->pg;
}

/* libpq's compiled-in directory of the system-wide pg_service.conf
 * (`pg_config --sysconfdir`), used when PGSYSCONFDIR is not set. */
#ifndef LPG_SYSCONFDIR
#define LPG_SYSCONFDIR "/etc/postgresql-common"
#endif

/* What a connection service gives for the fields that decide the lookup. */
struct lpg_service {
    char host[1024];
    char hostaddr[1024];
    char port[256];
    int  has_host, has_hostaddr, has_port;
};

/* Reads the section [name] of a pg_service.conf the way libpq does: the
 * first "key=value" of each key counts, no blanks around '='. Returns 1
 * if the section was found, 0 if not, -1 (reason in err) on a file that
 * names a service inside a service. */
static int
service_file_read(const char *path, const char *name, struct lpg_service *sv,
                  char *err, size_t errlen)
{
    FILE   *f = fopen(path, "r");
    char    line[1024];
    size_t  nlen = strlen(name);
    int     found = 0;

    if (f == NULL) {
        return 0;
    }
    while (fgets(line, sizeof(line), f) != NULL) {
        char  *l = line, *eq;
        size_t len = strlen(l);

        while (len > 0 && (l[len - 1] == '\n' || l[len - 1] == '\r'
                           || l[len - 1] == ' ' || l[len - 1] == '\t'))
        {
            l[--len] = '\0';
        }
        while (*l == ' ' || *l == '\t') {
            l++;
        }
        if (*l == '\0' || *l == '#') {
            continue;
        }
        if (*l == '[') {
            if (found) {
                break;                   /* the next section: done */
            }
            found = strncmp(l + 1, name, nlen) == 0 && l[nlen + 1] == ']';
            continue;
        }
        if (!found || (eq = strchr(l, '=')) == NULL) {
            continue;
        }
        *eq++ = '\0';
        if (strcmp(l, "service") == 0) {
            snprintf(err, errlen, "postgres: service \"%.60s\" in %.100s"
                     " names another service", name, path);
            fclose(f);
            return -1;
        } else if (strcmp(l, "host") == 0 && !sv->has_host) {
            snprintf(sv->host, sizeof(sv->host), "%s", eq);
            sv->has_host = 1;
        } else if (strcmp(l, "hostaddr") == 0 && !sv->has_hostaddr) {
            snprintf(sv->hostaddr, sizeof(sv->hostaddr), "%s", eq);
            sv->has_hostaddr = 1;
        } else if (strcmp(l, "port") == 0 && !sv->has_port) {
            snprintf(sv->port, sizeof(sv->port), "%s", eq);
            sv->has_port = 1;
        }
    }
    fclose(f);
    return found;
}

/* Finds the service name (the URL's service=, else PGSERVICE) where libpq
 * does: PGSERVICEFILE or ~/.pg_service.conf first, then
 * PGSYSCONFDIR/pg_service.conf (or libpq's built-in directory). Returns
 * GW_OK (sv filled) or GW_ERR with a reason in err (not found, or
 * PGSERVICEFILE names no file). */
static int
service_read(const char *name, struct lpg_service *sv, char *err,
             size_t errlen)
{
    char        user[1024], sys[1024];
    const char *file = getenv("PGSERVICEFILE"), *dir;
    struct stat st;
    int         r, have;

    memset(sv, 0, sizeof(*sv));
    if (file == NULL) {
        const char    *home = getenv("HOME");
        struct passwd *pw;

        if (home == NULL || home[0] == '\0') {
            pw = getpwuid(geteuid());
            home = pw != NULL ? pw->pw_dir : "";
        }
        snprintf(user, sizeof(user), "%s/.pg_service.conf", home);
        file = user;
    }
    have = stat(file, &st) == 0;
    if (!have && file != user) {
        snprintf(err, errlen, "postgres: service file %.200s (PGSERVICEFILE)"
                 " not found", file);
        return GW_ERR;                   /* as libpq */
    }
    if (have) {
        r = service_file_read(file, name, sv, err, errlen);
        if (r != 0) {
            return r < 0 ? GW_ERR : GW_OK;
        }
    }
    dir = getenv("PGSYSCONFDIR");
    snprintf(sys, sizeof(sys), "%s/pg_service.conf",
             dir != NULL ? dir : LPG_SYSCONFDIR);
    if (stat(sys, &st) == 0) {
        r = service_file_read(sys, name, sv, err, errlen);
        if (r != 0) {
            return r < 0 ? GW_ERR : GW_OK;
        }
    }
    snprintf(err, errlen, "postgres: service \"%.60s\" not found (looked"
             " in %.100s and %.100s)", name, file, sys);
    return GW_ERR;
}

/* Copies libpq's message src to dst with what it quotes left out: a
 * parse error quotes the offending piece of the connection string, which
 * may be (part of) the password. */
static void
unquote(char *dst, size_t len, const char *src)
{
    size_t n = 0;
    int    in = 0;

    for (; *src != '\0' && n + 4 < len; src++) {
        if (*src == '"') {
            in = !in;
            if (in) {
                memcpy(dst + n, "\"...", 4);
                n += 4;
            } else {
                dst[n++] = '"';
            }
        } else if (!in && *src != '\n') {
            dst[n++] = *src;
        }
    }
    dst[n] = '\0';
}

/* Finds the host names of pg->conninfo that need a lookup (not a
 * numeric address, not a socket directory, no hostaddr given): then
 * pg->nhosts > 0 and each connect resolves them on the loop first.
 * The hosts come from the URL, else the connection service's file, else
 * PGHOST/PGHOSTADDR/PGPORT, as libpq takes them. Returns GW_OK, or GW_ERR
 * with a reason in err and its error kind in *kind (a conninfo libpq
 * cannot parse, too many hosts: left as set; a service not found: config). */
static int
pool_parse_hosts(struct lpg_pool *pg, const char **kind, char *err,
                 size_t errlen)
{
    PQconninfoOption *o;
    struct lpg_service sv;
    const char       *host = NULL, *port = NULL, *hostaddr = NULL;
    const char       *service = NULL;
    char             *perr = NULL, *p, *tok;
    const char       *ports[LPG_MAXHOSTS];
    int               n = 0, nports = 0, need = 0;

    pg->ci = PQconninfoParse(pg->conninfo, &perr);
    if (pg->ci == NULL) {
        char why[200];

        unquote(why, sizeof(why), perr != NULL ? perr : "out of memory");
        snprintf(err, errlen, "postgres: bad connection string: %s", why);
        if (perr != NULL) {
            PQfreemem(perr);
        }
        return GW_ERR;
    }
    for (o = pg->ci; o->keyword != NULL; o++) {
        if (strcmp(o->keyword, "host") == 0) {
            host = o->val;
        } else if (strcmp(o->keyword, "port") == 0) {
            port = o->val;
        } else if (strcmp(o->keyword, "hostaddr") == 0) {
            hostaddr = o->val;
        } else if (strcmp(o->keyword, "service") == 0) {
            service = o->val;
        }
    }
    /* libpq fills what the URL leaves out from the connection service
     * (service=, else PGSERVICE), then from PGHOST, PGHOSTADDR and
     * PGPORT: a name there must be resolved here as well, or libpq would
     * look it up itself, blocking the loop. */
    if (service == NULL || service[0] == '\0') {
        service = getenv("PGSERVICE");
    }
    if (service != NULL && service[0] != '\0') {
        if (service_read(service, &sv, err, errlen) != GW_OK) {
            *kind = "config";
            return GW_ERR;
        }
        if ((host == NULL || host[0] == '\0') && sv.has_host) {
            host = sv.host;
        }
        if (port == NULL && sv.has_port) {
            port = sv.port;
        }
        if ((hostaddr == NULL || hostaddr[0] == '\0') && sv.has_hostaddr) {
            hostaddr = sv.hostaddr;
        }
    }
    if (host == NULL || host[0] == '\0') {
        host = getenv("PGHOST");
    }
    if (port == NULL) {
        port = getenv("PGPORT");
    }
    if (hostaddr == NULL || hostaddr[0] == '\0') {
        hostaddr = getenv("PGHOSTADDR");
    }
    if (host == NULL || host[0] == '\0'
        || (hostaddr != NULL && hostaddr[0] != '\0'))
    {
        return GW_OK;                    /* socket default, or explicit */
    }
    pg->ci_hosts = strdup(host);
    pg->ci_ports = strdup(port != NULL ? port : "");
    if (pg->ci_hosts == NULL || pg->ci_ports == NULL) {
        snprintf(err, errlen, "postgres: out of memory");
        return GW_ERR;
    }
    /* Empty list entries are kept (strsep, not strtok): "h1,h2" with
     * port "5432," gives h2 the default port. */
    for (p = pg->ci_ports; (tok = strsep(&p, ",")) != NULL;) {
        if (nports == LPG_MAXHOSTS) {
            break;
        }
        ports[nports++] = tok;
    }
    for (p = pg->ci_hosts; (tok = strsep(&p, ",")) != NULL;) {
        struct lpg_host *h;

        if (n == LPG_MAXHOSTS) {
            snprintf(err, errlen, "postgres: more than %d hosts",
                     LPG_MAXHOSTS);
            return GW_ERR;
        }
        h = &pg->hosts[n];
        h->pg = pg;
        h->name = tok;
        h->port = nports == 1 ? ports[0] : n < nports ? ports[n] : NULL;
        if (h->port != NULL && h->port[0] == '\0') {
            h->port = NULL;
        }
        h->dns = tok[0] != '\0' && tok[0] != '/' && tok[0] != '@'
                 && !gw_dns_is_numeric(tok);
        need |= h->dns;
        n++;
    }
    if (nports > 1 && nports != n) {
        snprintf(err, errlen, "postgres: %d ports for %d hosts", nports, n);
        return GW_ERR;
    }
    pg->nlisted = n;
    pg->nhosts = need ? n : 0;           /* all numeric: libpq as before,
                                            unless an address is slow */
    return GW_OK;
}

/* Frees pg and what it owns; its connections are already closed. */
static void
pool_free(struct lpg_pool *pg)
{
    int i;

    for (i = 0; i < pg->nhosts; i++) {
        gw_dns_cancel(pg->hosts[i].req);
    }
    for (i = 0; i < LPG_MAXPOOL; i++) {
        free(pg->conns[i].skip);
    }
    event_free(pg->tick);
    if (pg->ci != NULL) {
        PQconninfoFree(pg->ci);
    }
    free(pg->ci_hosts);
    free(pg->ci_ports);
    free(pg->conninfo);
    free(pg);
}

/* core.open(conninfo, opts) -> pool (no I/O yet)
 * opts: pool (connections, default 4), connect_timeout (s, 2),
 * query_timeout (s, 10), down_for (s, 0.5), tx_timeout (ms, 30000; 0:
 * none) */
static int
lpg_open(lua_State *L)
{
    const char     *ci = luaL_checkstring(L, 1);
    struct lpg_ud *ud;
    struct lpg_pool   *pg;
    struct timeval  tv = { 0, 50000 };
    int             i, npool;
    double          connect_timeout, query_timeout, down_for, sync_recheck;
    int             require_sync, tx_timeout;
    const char     *kind = "misuse";
    char            err[400];

    /* Checked first: raising must not leak what is allocated below. */
    gw_store_sql_opts_check(L, 2);   /* both engines' options */
    gw_store_opt_int(L, 2, "sql.open", "retries", 5, 1, INT_MAX);
    npool = gw_store_opt_int(L, 2, "sql.open", "pool", 4, 1, LPG_MAXPOOL);
    connect_timeout = gw_store_opt_num(L, 2, "sql.open", "connect_timeout",
                                       2, 0);
    query_timeout = gw_store_opt_num(L, 2, "sql.open", "query_timeout", 10,
                                     0);
    down_for = gw_store_opt_num(L, 2, "sql.open", "down_for", 0.5, 1);
    require_sync = gw_store_opt_bool(L, 2, "sql.open", "require_sync", 0);
    sync_recheck = gw_store_opt_num(L, 2, "sql.open", "sync_recheck", 10, 0);
    /* as SQLite's (which takes no 0) */
    tx_timeout = gw_store_opt_int(L, 2, "sql.open", "tx_timeout", 30000, 0,
                                  INT_MAX);
    ud = lua_newuserdata(L, sizeof(*ud));
    ud->pg = NULL;
    luaL_getmetatable(L, LPG_MT);
    lua_setmetatable(L, -2);
    pg = calloc(1, sizeof(*pg));
    if (pg == NULL) {
        return luaL_error(L, "postgres: out of memory");
    }
    ud->pg = pg;
    pg->conninfo = strdup(ci);
    pg->npool = npool;
    pg->connect_timeout = connect_timeout;
    pg->query_timeout = query_timeout;
    pg->down_for = down_for;
    pg->require_sync = require_sync;
    pg->sync_recheck = sync_recheck;
    if (tx_timeout > 0) {
        snprintf(pg->tx_limit, sizeof(pg->tx_limit), "SET LOCAL"
                 " idle_in_transaction_session_timeout = %d", tx_timeout);
    }
    for (i = 0; i < LPG_MAXPOOL; i++) {
        pg->conns[i].pg = pg;
        pg->conns[i].fd = -1;
    }
    pg->tick = event_new(gw_loop_base(), -1, EV_PERSIST, on_tick, pg);
    if (pg->conninfo == NULL || pg->tick == NULL) {
        return luaL_error(L, "postgres: out of memory");
    }
    if (pool_parse_hosts(pg, &kind, err, sizeof(err)) != GW_OK) {
        ud->pg = NULL;                   /* nothing was started yet */
        pool_free(pg);
        return gw_push_error(L, kind, 0, "%s", err);
    }
    event_add(pg->tick, &tv);
    return 1;
}

static int
lpg_close(lua_State *L)
{
    struct lpg_ud *ud = gw_checkudata(L, 1, LPG_MT);
    struct lpg_pool   *pg = ud->pg;
    struct lpg_op *done = NULL;
    int             i;

    if (pg == NULL) {
        return 0;
    }
    ud->pg = NULL;
    pg->closed = 1;
    gw_store_tx_free_owner(pg);
    for (i = 0; i < LPG_MAXPOOL; i++) {
        /* a write sent and unanswered may commit yet: unknown_outcome */
        conn_lost(&pg->conns[i], "closed", "postgres: pool closed", &done);
    }
    pool_fail_waiting(pg, "closed", "postgres: pool closed", &done);
    pool_free(pg);
    post_list(done);
    return 0;
}

/* During an outage (no live connection, within down_for of the failed
 * connect), new work fails fast: pushes that error and returns 2, else
 * returns 0. */
static int
pool_fail_fast(lua_State *L, struct lpg_pool *pg)
{
    if (pool_has_live(pg) || gw_loop_mono_fresh() >= pg->down_until) {
        return 0;
    }
    if (strcmp(pg->down_kind, "config") == 0) {
        /* the server refused the login: trying again cannot help */
        return gw_push_error(L, "config", 0, "%s (pool down)",
                             pg->down_msg);
    }
    return gw_push_error(L, "unavailable", 1, "%s (pool down, retry later)",
                         pg->down_msg);
}

/* Appends the ops first..last (linked by next) to the wait queue. */
static void
wq_append(struct lpg_pool *pg, struct lpg_op *first, struct lpg_op *last)
{
    if (pg->wq_tail != NULL) {
        pg->wq_tail->next = first;
    } else {
        pg->wq = first;
    }
    pg->wq_tail = last;
}

/* Building an op reads its SQL and parameters, which can run Lua (a
 * metamethod of the params table, a finalizer run by an allocation); Lua
 * that closes the pool there frees pg (lpg_close). Asked before pg is used
 * after that: is the handle at index 1 still this pool's? */
static int
pool_gone(lua_State *L, struct lpg_pool *pg)
{
    struct lpg_ud *ud = lua_touserdata(L, 1);

    return ud == NULL || ud->pg != pg;
}

static int
submit(lua_State *L, struct lpg_pool *pg, struct lpg_op *op)
{
    int n;

    if (pool_gone(L, pg)) {
        if (op->tx_begin) {
            tx_forget(op->txid);
        }
        op_free(op);
        return luaL_error(L, "postgres: pool is closed");
    }
    op->co = gw_co_current(L);
    if (!lua_isyieldable(L)) {
        /* gw_co_wait would raise after the statement was sent: it would
         * run for a caller told that the call raised */
        if (op->tx_begin) {
            tx_forget(op->txid);
        }
        op_free(op);
        return gw_co_unyieldable(L);
    }
    if ((n = pool_fail_fast(L, pg)) != 0) {
        if (op->tx_begin) {
            tx_forget(op->txid);
        }
        op_free(op);
        return n;
    }
    wq_append(pg, op, op);
    dispatch(pg);                        /* answers come on later turns */
    return gw_co_wait(L, op_cancel, op);
}

static struct lpg_op *
new_op(lua_State *L, int sql_idx, int params_idx, enum lpg_op_kind kind)
{
    struct lpg_op *op;
    struct gw_store_val *params = NULL;
    int             n = 0;

    gw_co_current(L);
    if (sql_idx > 0) {
        luaL_checkstring(L, sql_idx);
    }
    if (params_idx > 0 && gw_store_vals_from_lua(L, params_idx, &params, &n)
        != GW_OK)
    {
        return NULL;
    }
    op = calloc(1, sizeof(*op));
    if (op == NULL) {
        free(params);
        return NULL;
    }
    op->kind = kind;
    op->params = params;
    op->nparams = n;
    op->sql = strdup(sql_idx > 0 ? lua_tostring(L, sql_idx) : "");
    if (op->sql == NULL) {
        op_free(op);
        return NULL;
    }
    return op;
}


#define LPG_SQL_NUL "postgres: the SQL has a NUL byte in it (the " \
                    "statement would end there)"

static int
run_op(lua_State *L, struct lpg_pool *pg, int sql_idx, int params_idx,
       enum lpg_op_kind kind, int want_rows, long txid)
{
    struct lpg_op *op;

    if (gw_store_sql_has_nul(L, sql_idx)) {
        gw_co_current(L);
        return gw_push_error(L, "misuse", 0, LPG_SQL_NUL);
    }
    op = new_op(L, sql_idx, params_idx, kind);
    if (op == NULL) {
        return gw_push_error(L, "unavailable", 0, "postgres: out of memory");
    }
    op->want_rows = want_rows;
    op->txid = txid;
    op->writes = want_rows && txid == 0 && sql_may_write(op->sql);
    return submit(L, pg, op);
}

/* h:exec(sql, params) */
static int
lpg_exec(lua_State *L)
{
    return run_op(L, check_pool(L), 2, 3, LPG_OP_STMT, 0, 0);
}

/* h:query(sql, params) */
static int
lpg_query(lua_State *L)
{
    return run_op(L, check_pool(L), 2, 3, LPG_OP_STMT, 1, 0);
}

/* h:script(sql) */
static int
lpg_script(lua_State *L)
{
    return run_op(L, check_pool(L), 2, 0, LPG_OP_SCRIPT, 0, 0);
}

/* h:connect() -> true | nil, err  (one round trip on a new connection) */
static int
lpg_connect(lua_State *L)
{
    struct lpg_pool   *pg = check_pool(L);
    struct lpg_op *op;

    lua_settop(L, 1);
    lua_pushliteral(L, "SELECT 1");
    op = new_op(L, 2, 0, LPG_OP_STMT);
    if (op == NULL) {
        return gw_push_error(L, "unavailable", 0, "postgres: out of memory");
    }
    op->tx_end = 1;                      /* answer "true" */
    return submit(L, pg, op);
}

/* h:begin([query_timeout]) -> txid | nil, err  (reserves an idle
 * connection; query_timeout: s the transaction's statements may go
 * without a reply, instead of the pool's) */
static int
lpg_begin(lua_State *L)
{
    struct lpg_pool   *pg = check_pool(L);
    struct lpg_op     *op;
    struct gw_store_tx *tx;
    double             wait = luaL_optnumber(L, 2, 0);

    if (!lua_isyieldable(L)) {
        /* gw_co_wait would raise after the BEGIN was queued, leaving a
         * transaction open until this coroutine ends: refuse first. */
        return gw_co_unyieldable(L);
    }
    lua_settop(L, 1);
    lua_pushliteral(L, "BEGIN");
    op = new_op(L, 2, 0, LPG_OP_STMT);
    if (op == NULL) {
        return gw_push_error(L, "unavailable", 0, "postgres: out of memory");
    }
    if (pool_gone(L, pg)) {              /* (a finalizer run above) */
        op_free(op);
        return luaL_error(L, "postgres: pool is closed");
    }
    tx = gw_store_tx_new(gw_co_current(L), pg, tx_abandon);
    if (tx == NULL) {
        op_free(op);
        return gw_push_error(L, "unavailable", 0, "postgres: out of memory");
    }
    op->txid = tx->id;
    op->tx_begin = 1;
    op->tx_wait = wait > 0 ? wait : 0;
    return submit(L, pg, op);
}

static int
push_tx_ended(lua_State *L)
{
    return gw_push_error(L, "misuse", 0, "postgres: the transaction was"
                         " ended early by COMMIT or ROLLBACK in SQL");
}

static int
tx_op(lua_State *L, int kind, int want_rows, const char *fixed, int end)
{
    struct lpg_pool   *pg = check_pool(L);
    long            txid = (long)luaL_checknumber(L, 2);
    struct gw_store_tx *tx = gw_store_tx_find(pg, txid);
    struct lpg_op     *op;

    if (!lua_isyieldable(L)) {
        /* before a COMMIT or ROLLBACK lets go of the transaction's record
         * (submit() would refuse it): its coroutine's end rolls it back */
        gw_co_current(L);
        return gw_co_unyieldable(L);
    }
    if (tx != NULL && tx->state == LPG_TX_ENDED) {
        /* COMMIT/ROLLBACK in its SQL ended it: nothing more runs in it. */
        gw_co_current(L);
        if (end) {
            tx_forget(txid);
        }
        return push_tx_ended(L);
    }
    if (tx != NULL && tx->state == LPG_TX_IDLE) {
        /* idle past tx_timeout: the server rolled it back (on_notice());
         * its connection is gone, or goes at the EOF behind the FATAL */
        gw_co_current(L);
        if (end) {
            tx_forget(txid);
        }
        return gw_push_error(L, "timeout", 1, LPG_IDLE_TX);
    }
    if (fixed != NULL) {
        lua_settop(L, 2);
        lua_pushstring(L, fixed);
        op = new_op(L, 3, 0, LPG_OP_STMT);
    } else if (gw_store_sql_has_nul(L, 3)) {
        gw_co_current(L);
        return gw_push_error(L, "misuse", 0, LPG_SQL_NUL);
    } else {
        op = new_op(L, 3, kind == LPG_OP_STMT ? 4 : 0, kind);
    }
    if (op == NULL) {
        return gw_push_error(L, "unavailable", 0, "postgres: out of memory");
    }
    op->txid = txid;
    op->want_rows = want_rows;
    op->tx_end = end;
    if (end) {
        /* From here the COMMIT/ROLLBACK ends it, waited for or not. */
        tx_forget(txid);
    }
    return submit(L, pg, op);
}

static int
lpg_tx_exec(lua_State *L)
{
    return tx_op(L, LPG_OP_STMT, 0, NULL, 0);
}

static void
batch_cancel(void *arg)
{
    struct lpg_batch *b = arg;

    b->co = NULL;
}

/* p past blanks and comments (-- to the end of the line, which \r ends
 * too for the server's lexer; nested block comments) and, with semis,
 * empty statements (the server takes ";COMMIT" as one command), or NULL
 * at an unterminated block comment. */
static const char *
skip_blank(const char *p, int semis)
{
    for (;;) {
        while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'
               || *p == '\f' || *p == '\v' || (semis && *p == ';')) {
            p++;
        }
        if (p[0] == '-' && p[1] == '-') {
            while (*p != '\0' && *p != '\n' && *p != '\r') {
                p++;
            }
        } else if (p[0] == '/' && p[1] == '*') {
            int depth = 1;

            for (p += 2; depth > 0; p++) {
                if (*p == '\0') {
                    return NULL;
                }
                if (p[0] == '/' && p[1] == '*') {
                    depth++;
                    p++;
                } else if (p[0] == '*' && p[1] == '/') {
                    depth--;
                    p++;
                }
            }
        } else {
            return p;
        }
    }
}

/* The length of the word (letters, digits, _) at p. */
static size_t
word_len(const char *p)
{
    size_t n = 0;

    while ((p[n] >= 'a' && p[n] <= 'z') || (p[n] >= 'A' && p[n] <= 'Z')
           || (p[n] >= '0' && p[n] <= '9') || p[n] == '_') {
        n++;
    }
    return n;
}

/* Does sql (one statement: the extended protocol takes no more) control
 * the transaction it runs in -- BEGIN, START TRANSACTION, COMMIT, END,
 * ROLLBACK, ABORT, SAVEPOINT, RELEASE, PREPARE TRANSACTION? Its first
 * word, past blanks, comments and empty statements, tells: no other
 * statement can end a transaction block (a procedure or a DO block that
 * tries is refused by the server inside one). An unterminated comment
 * answers no: the server refuses it as a syntax error. */
static int
controls_tx(const char *sql)
{
    static const char *const words[] = {
        "BEGIN", "START", "COMMIT", "END", "ROLLBACK", "ABORT",
        "SAVEPOINT", "RELEASE"
    };
    const char *p = skip_blank(sql, 1);
    size_t      n, i;

    if (p == NULL) {
        return 0;
    }
    n = word_len(p);
    for (i = 0; i < sizeof(words) / sizeof(words[0]); i++) {
        if (strlen(words[i]) == n && strncasecmp(p, words[i], n) == 0) {
            return 1;
        }
    }
    if (n == 7 && strncasecmp(p, "PREPARE", 7) == 0) {
        p = skip_blank(p + 7, 0);
        return p != NULL && word_len(p) == 11
               && strncasecmp(p, "TRANSACTION", 11) == 0;
    }
    return 0;
}

/* begin_atomic's answer for a job refused before anything was sent:
 * false, index, a misuse error naming the statement. */
static int
push_refused(lua_State *L, int index, const char *why)
{
    lua_pushboolean(L, 0);
    lua_pushinteger(L, index);
    gw_push_error(L, "misuse", 0, "%s (statement %d of the job)", why,
                  index);
    lua_remove(L, -2);                   /* the nil before the err */
    return 3;
}

/* begin_atomic's statements while they are copied, held by a userdata
 * on the Lua stack (LPG_BUILD_MT): copying a statement's parameters can
 * run Lua (a metamethod of the params table for its n, a finalizer run by
 * an allocation), and Lua that raises there leaves the statements copied
 * so far to this userdata's finalizer instead of leaking them. */
struct lpg_build {
    struct lpg_op *first;
};

static void
ops_free(struct lpg_op *first)
{
    struct lpg_op *next;

    for (; first != NULL; first = next) {
        next = first->next;
        op_free(first);
    }
}

/* Frees the statements bd holds and drops what begin_atomic pushed: a
 * refused job leaves nothing allocated */
static void
build_drop(lua_State *L, struct lpg_build *bd, struct gw_store_val *params)
{
    free(params);                        /* one not yet in an op */
    ops_free(bd->first);
    bd->first = NULL;
    lua_settop(L, 2);
}

static int
build_gc(lua_State *L)
{
    struct lpg_build *bd = gw_testudata(L, 1, LPG_BUILD_MT);

    if (bd != NULL) {
        ops_free(bd->first);
        bd->first = NULL;
    }
    return 0;
}

/* h:begin_atomic({ { sql, params }, ... })
 *   -> txid, results, index, err  |  false, index, err  |  nil, err
 * db:atomic's transaction: BEGIN and the job's statements sent back to
 * back on one idle connection, the transaction then left open for the
 * caller's COMMIT or ROLLBACK (h:commit/h:rollback with txid) once it has
 * checked the results: one round trip for BEGIN and up to 63 statements.
 * results[i] for each statement that ran (as h:tx_exec answers), and the
 * first failed statement's index and error (nil, nil when none failed);
 * once one fails, the transaction is aborted and the ones after it fail
 * too (the caller rolls back: all or none). The statements run in no
 * savepoint of their own (no failure is undone alone), so a statement
 * that would end or reshape the transaction (controls_tx()), or that
 * PostgreSQL cannot take (op_unsendable()), is refused before anything is
 * sent: false, its index, misuse. nil, err: nothing began (the BEGIN
 * failed, the pool is down). */
static int
lpg_begin_atomic(lua_State *L)
{
    struct lpg_pool    *pg = check_pool(L);
    struct gw_store_tx *tx;
    struct lpg_batch   *b;
    struct lpg_build   *bd;
    struct lpg_op      *begin, *last = NULL, *op;
    char                msg[80];
    int                 i, n, unsendable = 0;

    if (!lua_isyieldable(L)) {
        /* as h:begin(): refuse before a transaction is queued */
        return gw_co_unyieldable(L);
    }
    luaL_checktype(L, 2, LUA_TTABLE);
    n = (int)lua_objlen(L, 2);
    luaL_argcheck(L, n >= 1, 2, "no statements");
    gw_co_current(L);
    if ((i = pool_fail_fast(L, pg)) != 0) {
        return i;
    }
    lua_settop(L, 2);
    bd = lua_newuserdata(L, sizeof(*bd));          /* 3 */
    bd->first = NULL;
    luaL_getmetatable(L, LPG_BUILD_MT);
    lua_setmetatable(L, 3);
    msg[0] = '\0';
    /* One pass: each statement is checked and copied at once, its
     * parameters by gw_store_vals_copy (params.n read once: what was
     * checked is what is bound). A refusal frees what was copied, then
     * answers as the checks always did, in their order: per statement
     * its shape, transaction control, a NUL in its SQL; past them all,
     * the first statement PostgreSQL cannot take (op_unsendable()). */
    for (i = 0; i < n; i++) {
        struct gw_store_val *params = NULL;
        int                  np = 0, rc = 0, bad;

        lua_rawgeti(L, 2, i + 1);                  /* 4 */
        if (lua_istable(L, 4)) {
            lua_rawgeti(L, 4, 1);                  /* 5: sql */
            lua_rawgeti(L, 4, 2);                  /* 6: params */
            bad = !lua_isstring(L, 5)
                  || !(lua_isnil(L, 6) || lua_istable(L, 6));
            if (!bad && lua_istable(L, 6)) {
                rc = gw_store_vals_copy(L, 6, &params, &np);
                bad = rc > 0 || rc == GW_STORE_BAD_N;
            }
        } else {
            bad = 1;
        }
        if (bad) {
            build_drop(L, bd, params);
            return gw_push_error(L, "misuse", 0, "postgres: statement %d"
                                 " of the batch is not { sql, params }"
                                 " with bindable params", i + 1);
        }
        if (controls_tx(lua_tostring(L, 5))) {
            build_drop(L, bd, params);
            return push_refused(L, i + 1, "postgres: transaction control"
                                " in SQL: it belongs to db:transaction()");
        }
        if (gw_store_sql_has_nul(L, 5)) {
            build_drop(L, bd, params);
            return push_refused(L, i + 1, LPG_SQL_NUL);
        }
        op = rc == GW_STORE_NOMEM ? NULL : new_op(L, 5, 0, LPG_OP_STMT);
        lua_settop(L, 3);
        if (op == NULL) {
            build_drop(L, bd, params);
            return gw_push_error(L, "unavailable", 0, "postgres: out of"
                                 " memory");
        }
        op->params = params;
        op->nparams = np;
        op->batch_i = i + 1;
        if (last == NULL) {
            bd->first = op;
        } else {
            last->next = op;
        }
        last = op;
        if (unsendable == 0 && op_unsendable(op, msg, sizeof(msg))) {
            unsendable = i + 1;
        }
    }
    /* nothing raises past here but "pool is closed" (its ops freed) */
    op = bd->first;
    bd->first = NULL;
    lua_settop(L, 2);
    if (pool_gone(L, pg)) {
        ops_free(op);
        return luaL_error(L, "postgres: pool is closed");
    }
    if (unsendable != 0) {
        ops_free(op);
        return push_refused(L, unsendable, msg);
    }
    lua_pushliteral(L, "BEGIN");         /* 3 */
    begin = new_op(L, 3, 0, LPG_OP_STMT);
    lua_settop(L, 2);
    b = calloc(1, sizeof(*b));
    tx = NULL;
    if (begin == NULL || b == NULL
        || (b->ops = calloc((size_t)n + 1, sizeof(*b->ops))) == NULL
        || (tx = gw_store_tx_new(gw_co_current(L), pg, tx_abandon)) == NULL)
    {
        /* nothing queued: a segment's statements are all sent */
        if (begin != NULL) {
            op_free(begin);
        }
        ops_free(op);
        if (b != NULL) {
            free(b->ops);
            free(b);
        }
        return gw_push_error(L, "unavailable", 0, "postgres: out of memory");
    }
    begin->next = op;
    begin->tx_begin = 1;
    for (op = begin; op != NULL; op = op->next) {
        op->txid = tx->id;
        op->batch = b;
    }
    b->n = b->left = n + 1;
    b->co = gw_co_current(L);
    wq_append(pg, begin, last);
    dispatch(pg);                        /* answers come on later turns */
    return gw_co_wait(L, batch_cancel, b);
}

static int
lpg_tx_query(lua_State *L)
{
    return tx_op(L, LPG_OP_STMT, 1, NULL, 0);
}

static int
lpg_tx_script(lua_State *L)
{
    return tx_op(L, LPG_OP_SCRIPT, 0, NULL, 0);
}

static int
lpg_commit(lua_State *L)
{
    return tx_op(L, LPG_OP_STMT, 0, "COMMIT", 1);
}

static int
lpg_rollback(lua_State *L)
{
    return tx_op(L, LPG_OP_STMT, 0, "ROLLBACK", 1);
}

/* h:stats() -> { round_trips = Syncs and scripts sent so far } */
static int
lpg_stats(lua_State *L)
{
    struct lpg_pool *pg = check_pool(L);

    lua_createtable(L, 0, 1);
    lua_pushnumber(L, pg->round_trips);
    lua_setfield(L, -2, "round_trips");
    return 1;
}

/* __gc: close(), for our own userdata only (a finalizer must not raise:
 * a metatable copied onto another userdata would call it) */
static int
lpg_gc(lua_State *L)
{
    if (gw_testudata(L, 1, LPG_MT) == NULL) {
        return 0;
    }
    return lpg_close(L);
}

static const luaL_Reg lpg_methods[] = {
    { "connect", lpg_connect },
    { "stats", lpg_stats },
    { "exec", lpg_exec },
    { "query", lpg_query },
    { "script", lpg_script },
    { "begin", lpg_begin },
    { "tx_exec", lpg_tx_exec },
    { "begin_atomic", lpg_begin_atomic },
    { "tx_query", lpg_tx_query },
    { "tx_script", lpg_tx_script },
    { "commit", lpg_commit },
    { "rollback", lpg_rollback },
    { "close", lpg_close },
    { NULL, NULL }
};

/*
 * syntax: set = pg.keywords()
 * The connection options this libpq knows ({ sslmode = true, ... }), so
 * that a misspelt one in a URL is named before libpq refuses it (its own
 * message is quoted text, which is blanked: it may hold a value).
 */
static int
lpg_keywords(lua_State *L)
{
    PQconninfoOption *d = PQconndefaults(), *o;

    if (d == NULL) {
        return luaL_error(L, "postgres: out of memory");
    }
    lua_newtable(L);
    for (o = d; o->keyword != NULL; o++) {
        lua_pushboolean(L, 1);
        lua_setfield(L, -2, o->keyword);
    }
    PQconninfoFree(d);
    return 1;
}

static const luaL_Reg lpg_funcs[] = {
    { "open", lpg_open },
    { "keywords", lpg_keywords },
    { NULL, NULL }
};

int
luaopen_paygate_pg_core(lua_State *L)
{
    luaL_newmetatable(L, LPG_BUILD_MT);
    lua_pushcfunction(L, build_gc);
    lua_setfield(L, -2, "__gc");
    lua_pop(L, 1);
    luaL_newmetatable(L, LPG_MT);
    lua_pushcfunction(L, lpg_gc);
    lua_setfield(L, -2, "__gc");
    lua_newtable(L);
    luaL_register(L, NULL, lpg_methods);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
    lua_newtable(L);
    luaL_register(L, NULL, lpg_funcs);
    lua_pushinteger(L, PQlibVersion());
    lua_setfield(L, -2, "libpq_version");
    return 1;
}
