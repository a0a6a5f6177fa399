/*
 * lsqlite.c -- paygate.sqlite.core: SQLite that never blocks the loop.
 *
 * One database handle owns one writer thread (one read-write connection)
 * and a few reader threads (read-only connections; WAL lets them read
 * while the writer writes). The loop thread queues jobs and turns
 * finished jobs into Lua values; it runs no SQL itself except inline
 * reads (below), each within a budget of time.
 *
 * Group commit: the writer takes every job that is queued, runs each one
 * inside its own SAVEPOINT within one BEGIN IMMEDIATE ... COMMIT, and
 * resumes the waiting coroutines only after COMMIT returned (with
 * synchronous=FULL in WAL mode, COMMIT fsyncs the log). A job that fails
 * is rolled back to its savepoint and answered at once with its own
 * error; its neighbours in the batch are not affected.
 *
 * Interactive transactions (db:transaction(fn) in Lua): a BEGIN ends the
 * current batch (its jobs are committed and answered first) and opens one
 * of its own, in which it takes a savepoint; the writer then serves only
 * that transaction's statements until COMMIT/ROLLBACK (or tx_timeout),
 * and commits its batch as soon as it ends, so other writers queue up
 * and join the next batch. COMMIT of such a transaction resumes the
 * coroutine once that batch is durable: it waits for no other job, and
 * no job waits for its round trips through Lua. A failed statement is
 * undone alone (a script, in a savepoint of its own) and the transaction
 * goes on.
 *
 * Atomic jobs (db:atomic in Lua): a list of statements queued as ONE
 * writer job. It runs like any job of the batch, inside its own
 * SAVEPOINT, its statements in order; the first that fails, or that
 * changes (a read: returns) another number of rows than its expect, rolls
 * back that savepoint, and the job is answered at once with the failing
 * statement's index. Otherwise it waits for the batch's COMMIT like an
 * exec. Unlike an interactive transaction it never holds the writer
 * between statements, so it joins the group commit.
 *
 * Inline reads: a query (h:query) runs first on the loop thread itself,
 * on a read-only connection of its own, within a budget of inline_reads
 * microseconds (a progress handler checks the clock every few hundred VM
 * steps). Most reads of a gateway are lookups by key, a few microseconds
 * of SQLite, and a round trip through a reader thread costs several
 * times that in wake-ups and context switches, which on a core shared by
 * the loop and the threads (a pinned worker) is all overhead. A query
 * that runs over its budget, or meets a lock (busy_timeout is 0 here:
 * the loop never waits), is abandoned (a read: nothing to undo) and
 * queued for a reader thread as before; its SQL then goes to the readers
 * directly for its next INLINE_SKIPS runs, and so does the SQL of a query
 * that finished but took longer than the budget (one VM step can be long:
 * count(*) walks a whole table in one; so can a page read from a slow
 * disk). An interrupted statement is also finalized: if what was cut
 * short was a schema reload (after DDL, SQLite reloads the schema inside
 * the step), its next prepare loads the schema without a budget. A
 * PRAGMA, ATTACH or DETACH never runs inline (it would configure the
 * loop's own connection: a busy_timeout there would make the loop wait),
 * and neither does a query where the caller cannot yield (inside a
 * metamethod or a sort comparator: a query there raises, inline or not,
 * instead of working only while it is fast). inline_reads = 0: every query
 * goes to the readers. A loop turn spends at most INLINE_TURN budgets on
 * inline reads: a coroutine that reads in a loop (a cursor over a big
 * table) then goes through a reader, yields, and lets the loop serve
 * others, as before.
 *
 * An inline read makes its Lua rows while SQLite steps (lua_add_row): no
 * copy of every value into the job and out again. That runs Lua
 * allocations, hence GC steps and finalizers, with the statement between
 * two steps, so it runs under lua_pcall: a raise (no memory, a
 * finalizer's error) still resets the statement (left open, its read
 * would pin the connection to an old snapshot), and a finalizer that
 * closes the handle leaves the inline connection for that read to close;
 * a read made meanwhile (by a task such a finalizer started) goes to a
 * reader: inline, it would reset or finalize the stepping statement.
 * Each cached statement's column names are made once, not per read:
 * the handle's environment table keeps them per cache slot.
 *
 * Opening: the writer creates the file and switches it to WAL. Other
 * processes may do the same at the same moment (workers on a first
 * start): that waits within busy_timeout like any write (conn_open()).
 *
 * Lifetime: struct lsqlite_db is reference counted by the Lua handle, by
 * each thread and by each open transaction; whoever drops the last
 * reference frees it. A job is owned
 * by the queue, then by the thread running it, then by the loop callback
 * that delivers it (which frees it). A coroutine abandoned while waiting
 * only clears job->co; delivery then frees the job without waking.
 *
 * Abandoned transactions: h:begin() registers a struct gw_store_tx
 * (store.h), attached to the calling coroutine, until COMMIT/ROLLBACK is
 * submitted. If the coroutine ends first (task:cancel(), a request
 * deadline, or it returned without ending the transaction), no Lua code
 * will send the ROLLBACK, so tx_abandon() queues one from C (no coroutine
 * waits on it) and the writer serves others at once instead of after
 * tx_timeout.
 * When the coroutine goes while its BEGIN is still queued, the ROLLBACK
 * is queued when that BEGIN is delivered.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <sqlite3.h>
#include <event2/event.h>
#include <lauxlib.h>

#include "fdio.h"
#include "loop.h"
#include "lstate.h"
#include "runtime.h"
#include "store.h"

#define LSQLITE_MT        "paygate.sqlite.db"
#define LSQLITE_BUILD_MT  "paygate.sqlite.atomic_build" /* lsqlite_build */
#define LSQLITE_CACHE     64      /* prepared statements per connection */
#define LSQLITE_READERS   2
#define LSQLITE_MAX_READERS GW_STORE_SQLITE_MAX_READERS /* threads */
#define LSQLITE_BATCH_MAX 1024    /* jobs per group commit */
#define LSQLITE_INLINE_US 200     /* inline read budget, microseconds */
#define LSQLITE_CKPT_PAGES 8000   /* wal_autocheckpoint (32 MiB of 4 KiB
                                     pages): SQLite's 1000 copied the
                                     random pages of a gateway's indexes
                                     into the file 8 times as often */
#define LSQLITE_CACHE_MIB 32      /* the writer's page cache */
#define INLINE_SKIPS      64      /* runs of an over-budget query that go
                                     to the readers directly */
#define INLINE_STEPS      200     /* VM steps between clock checks */
#define INLINE_TURN       10      /* budgets of inline reads per loop turn */

enum lsqlite_op {
    LSQLITE_OP_OPEN,      /* writer: open + pragmas */
    LSQLITE_OP_STMT,      /* one statement with parameters */
    LSQLITE_OP_SCRIPT,    /* several statements, no parameters */
    LSQLITE_OP_BEGIN,     /* start an interactive transaction */
    LSQLITE_OP_COMMIT,    /* end it, durable on return */
    LSQLITE_OP_ROLLBACK,  /* end it, discarding its effects */
    LSQLITE_OP_ATOMIC,    /* several statements, all or none, one job of
                             the group commit (db:atomic) */
    LSQLITE_OP_BACKUP     /* a reader: copy the database to a file
                             (h:backup; sql is the file's path) */
};

struct lsqlite_job {
    enum lsqlite_op      op;
    struct lsqlite_db   *db;       /* borrowed; the db outlives its jobs */
    struct gw_co      *co;       /* waiting coroutine; NULL if abandoned */
    int                want_rows;/* 1: query (rows), 0: exec (changes) */
    long               txid;     /* interactive transaction, 0 if none */
    char              *sql;      /* owned */
    unsigned           slot1;    /* sql's statement cache slot + 1; 0 until
                                    hashed (once per job, not per look) */
    struct gw_store_val    *params;   /* owned, nparams values: one block
                                         with their strings (free()) */
    int                nparams;
    /* results, written by the thread that runs the job */
    int                rc;       /* SQLITE_OK or a primary result code */
    int                xrc;      /* extended result code */
    int                at_prepare;/* 1 when the failure was in prepare */
    char              *errmsg;   /* owned; NULL on success */
    int64_t            changes;  /* rows changed (exec) */
    int64_t            last_id;  /* last insert rowid (exec) */
    int                ncols;
    char             **cols;     /* owned column names, ncols */
    struct gw_store_val    *cells;    /* owned, nrows * ncols, row-major */
    int                nrows;
    int                cap;      /* rows allocated in cells */
    /* LSQLITE_OP_ATOMIC: its statements, and which one failed */
    struct lsqlite_job  *subs;     /* owned array of nsubs STMT jobs */
    int                nsubs;
    double             made;     /* monotonic s (the loop's) when it was
                                    made: a wait for the write lock ends
                                    busy_timeout after it */
    int                failed;   /* 1-based index of the failed one, 0 */
    int                unmet;    /* 1: it ran but missed its expect */
    int64_t            expect;   /* a statement of an ATOMIC job: rows it
                                    must change (a write) or return (a
                                    read); -1: any */
    /* LSQLITE_OP_BACKUP: replace an existing file; what was written */
    int                replace;
    int64_t            pages;
    int64_t            page_size;
    int64_t            bytes;
    struct lsqlite_job  *next;     /* queue / delivery list link */
};

struct lsqlite_cache {
    char         *sql[LSQLITE_CACHE];  /* owned keys */
    sqlite3_stmt *st[LSQLITE_CACHE];   /* owned statements */
    char          tx[LSQLITE_CACHE];   /* prepared with allow_tx: ours */
    unsigned char skip[LSQLITE_CACHE]; /* inline connection: runs left
                                          that go to the readers */
    char          cfg[LSQLITE_CACHE];  /* a PRAGMA, ATTACH or DETACH */
    char          strike[LSQLITE_CACHE];/* interrupted once: once more and
                                          it is slow (the first may have
                                          been a schema reload) */
    unsigned      gen[LSQLITE_CACHE];  /* bumped by each prepare into the
                                          slot (never 0 once prepared) */
    /* inline connection: the statement (gen) and the count of its
     * automatic re-prepares (a schema change can change its columns)
     * whose column names the handle's names table holds (lua_add_row) */
    unsigned      names_gen[LSQLITE_CACHE];   /* 0: none */
    int           names_reprep[LSQLITE_CACHE];
    int          *pos[LSQLITE_CACHE];  /* owned: the Lua position of each
                                          parameter of st (param_pos),
                                          read from its name once */
};

struct lsqlite_conn {
    sqlite3            *h;       /* owned by the thread using it */
    struct lsqlite_cache  cache;
    int                 allow_tx;/* 1 while run_fixed() runs our own
                                    BEGIN/SAVEPOINT/RELEASE/COMMIT */
    int                 saw_cfg; /* the authorizer saw a PRAGMA, ATTACH or
                                    DETACH in the statement being prepared */
    int                 turn_fd; /* the writer's: PATH-turn (turn_open),
                                    valid when has_turn */
    int                 has_turn;
};

/*
 * The time of each COMMIT (its fsync) by bucket: upper bounds in ns,
 * 100 us (a fast SSD) to 2.5 s; one more bucket past the last. Shown as
 * seconds (h:stats(), paygate_store_commit_duration_seconds).
 */
static const uint64_t lsqlite_commit_le_ns[] = {
    100000, 250000, 500000, 1000000, 2500000, 5000000, 10000000,
    25000000, 50000000, 100000000, 250000000, 500000000, 1000000000,
    2500000000ULL
};
#define LSQLITE_COMMIT_NB (sizeof(lsqlite_commit_le_ns) \
                           / sizeof(lsqlite_commit_le_ns[0]) + 1)

/* The writer's counters (struct lsqlite_db's cs), or one consistent read
 * of them (snap). */
struct lsqlite_commit_stats {
    long     commits;                        /* successful COMMITs that
                                                acknowledged a write */
    long     writes;                         /* jobs they acknowledged */
    uint64_t max_ns;                         /* ns: the longest COMMIT */
    uint64_t n[LSQLITE_COMMIT_NB];           /* COMMITs per bucket */
    uint64_t ns[LSQLITE_COMMIT_NB];          /* ns they took, per bucket */
    long     cache_bytes;                    /* the writer's page cache,
                                                after the last COMMIT */
};

struct lsqlite_db {
    pthread_mutex_t    mu;       /* guards everything below */
    pthread_cond_t     wcond;    /* writer: wq or txq got a job */
    pthread_cond_t     rcond;    /* readers: rq got a job */
    int                refs;     /* Lua handle + running threads */
    int                closing;  /* threads exit when their queue drains */
    int                readers;  /* reader threads running: the writer
                                    outlives them (they hand it writes) */
    struct lsqlite_job  *wq, *wq_tail;   /* writer jobs */
    struct lsqlite_job  *txq, *txq_tail; /* active transaction's jobs */
    struct lsqlite_job  *rq, *rq_tail;   /* reader jobs */
    long               active_tx;/* txid the writer serves, 0 if none */
    int                open_ok;  /* writer opened the file */
    int                wake_deferred; /* on wake_list: the writer is woken
                                    at the end of the loop turn */
    /* configuration, read-only after open */
    char              *path;
    int                nreaders;
    int                batch_max;    /* 1 disables group commit */
    int                busy_ms;      /* busy_timeout for other processes */
    int                tx_timeout_ms;/* idle interactive tx is rolled back */
    int                synchronous;  /* PRAGMA synchronous value */
    int                ckpt_pages;   /* PRAGMA wal_autocheckpoint value */
    int                cache_mib;    /* the writer's PRAGMA cache_size */
    int                inline_us;    /* inline read budget, 0: none */
    /* the loop thread's own read-only connection (inline reads) */
    struct lsqlite_conn inl;
    pid_t              inl_pid;      /* the process that opened it */
    int                inl_off;      /* it could not be opened */
    double             inl_deadline; /* monotonic s: the running read's */
    int                inl_running;  /* an inline read is making its
                                        rows (Lua runs: a finalizer may
                                        close the handle) */
    int                inl_closed;   /* closed then: that read closes the
                                        connection and drops the
                                        handle's reference */
    long               reads_inline; /* loop thread only */
    long               reads_moved;  /* over budget: to the readers */
    long               reads_reader; /* loop thread: queries handed to the
                                        readers (reads_moved included) */
    /* The writer's counters: written by the writer alone, inside cseq's
     * odd window (a sequence count: h:stats() on the loop thread reads
     * them again when cseq moved meanwhile; the writer never waits) */
    unsigned long      cseq;         /* odd while the writer updates */
    struct lsqlite_commit_stats cs;  /* the writer's */
    struct lsqlite_commit_stats snap;/* loop thread: the last consistent
                                        read of cs (h:stats()) */
};

struct lsqlite_ud {
    struct lsqlite_db *db;         /* reference; NULL once closed */
};

/* struct gw_store_tx.state of an open transaction; see "Abandoned
 * transactions" above. Its owner is the db, of which the record holds a
 * reference (dropped by tx_free()), so matching on the pointer is safe. */
enum lsqlite_tx_state {
    LSQLITE_TX_PENDING,            /* BEGIN queued, not delivered yet */
    LSQLITE_TX_ACTIVE,             /* BEGIN delivered: the writer serves it */
    LSQLITE_TX_ABANDONED           /* co gone while PENDING: roll back on
                                    delivery of the BEGIN */
};

static void tx_begin_delivered(struct lsqlite_job *j);

/* ---------------------------------------------------------------- jobs */

/* Frees j's column names: one block, owned by cols[0] (add_row). */
static void
cols_free(struct lsqlite_job *j)
{
    if (j->cols != NULL) {
        free(j->cols[0]);
    }
    free(j->cols);
}

static void
job_clear(struct lsqlite_job *j)
{
    int i;

    for (i = 0; i < j->nsubs; i++) {
        job_clear(&j->subs[i]);
    }
    free(j->subs);
    free(j->sql);
    free(j->params);                     /* one block: gw_store_vals_copy */
    free(j->errmsg);
    cols_free(j);
    gw_store_vals_free(j->cells, j->nrows * j->ncols);
}

static void
job_free(struct lsqlite_job *j)
{
    if (j == NULL) {
        return;
    }
    job_clear(j);
    free(j);
}

static void
job_fail(struct lsqlite_job *j, int rc, const char *msg)
{
    j->rc = rc;
    j->xrc = rc;
    free(j->errmsg);
    j->errmsg = strdup(msg != NULL ? msg : sqlite3_errstr(rc));
}

static void
job_fail_db(struct lsqlite_job *j, sqlite3 *h, int rc)
{
    j->rc = rc & 0xff;
    j->xrc = h != NULL ? sqlite3_extended_errcode(h) : rc;
    free(j->errmsg);
    j->errmsg = strdup(h != NULL ? sqlite3_errmsg(h) : sqlite3_errstr(rc));
}

static void
queue_push(struct lsqlite_job **head, struct lsqlite_job **tail,
           struct lsqlite_job *j)
{
    j->next = NULL;
    if (*tail != NULL) {
        (*tail)->next = j;
    } else {
        *head = j;
    }
    *tail = j;
}

static struct lsqlite_job *
queue_pop(struct lsqlite_job **head, struct lsqlite_job **tail)
{
    struct lsqlite_job *j = *head;

    if (j != NULL) {
        *head = j->next;
        if (*head == NULL) {
            *tail = NULL;
        }
        j->next = NULL;
    }
    return j;
}

static void
db_ref(struct lsqlite_db *db)
{
    pthread_mutex_lock(&db->mu);
    db->refs++;
    pthread_mutex_unlock(&db->mu);
}

static void
db_unref(struct lsqlite_db *db)
{
    int last;

    pthread_mutex_lock(&db->mu);
    last = --db->refs == 0;
    pthread_mutex_unlock(&db->mu);
    if (last) {
        pthread_mutex_destroy(&db->mu);
        pthread_cond_destroy(&db->wcond);
        pthread_cond_destroy(&db->rcond);
        free(db->path);
        free(db);
    }
}

/* ------------------------------------------------------ delivery (loop) */

static const char *
constraint_name(const char *msg)
{
    const char *p = msg != NULL ? strstr(msg, "constraint failed: ") : NULL;

    return p != NULL ? p + strlen("constraint failed: ") : NULL;
}

/* Pushes nil + a classified error table for a failed job. Returns 2. */
/* conn_open()'s own failure code (no SQLite code): the database cannot
 * be in WAL mode, a configuration that no retry mends (kind "config") */
#define LSQLITE_NO_WAL (-2)

static int
push_job_error(lua_State *L, struct lsqlite_job *j)
{
    const char *kind = "error";
    const char *msg = j->errmsg != NULL ? j->errmsg : "unknown error";
    int         retry = 0;

    switch (j->rc) {
    case LSQLITE_NO_WAL:
        kind = "config";
        break;
    case SQLITE_CONSTRAINT:
        kind = "constraint";
        break;
    case SQLITE_BUSY:
    case SQLITE_LOCKED:
        kind = "busy";
        retry = 1;
        break;
    case SQLITE_IOERR:
    case SQLITE_FULL:
    case SQLITE_CANTOPEN:
    case SQLITE_CORRUPT:
    case SQLITE_NOTADB:
    case SQLITE_READONLY:
    case SQLITE_PERM:
        kind = "unavailable";
        retry = j->rc == SQLITE_IOERR || j->rc == SQLITE_FULL;
        break;
    case SQLITE_NOMEM:
        kind = "unavailable";            /* as PostgreSQL's class 53 */
        retry = 1;
        break;
    case SQLITE_TOOBIG:
        kind = "too_large";
        break;
    case SQLITE_ABORT:
        kind = "timeout";
        retry = 1;
        break;
    case SQLITE_AUTH:
        kind = "misuse";
        msg = "BEGIN, COMMIT, ROLLBACK, SAVEPOINT and RELEASE are not "
              "allowed in SQL: use db:transaction()";
        break;
    case SQLITE_MISUSE:
    case SQLITE_RANGE:
    case SQLITE_MISMATCH:
        kind = "misuse";
        break;
    case SQLITE_ERROR:
        kind = j->at_prepare ? "syntax" : "error";
        break;
    default:
        break;
    }
    gw_push_error(L, kind, retry, "sqlite: %s", msg);
    lua_pushinteger(L, j->xrc);
    lua_setfield(L, -2, "code");
    if (j->rc == SQLITE_CONSTRAINT && constraint_name(msg) != NULL) {
        lua_pushstring(L, constraint_name(msg));
        lua_setfield(L, -2, "constraint");
    }
    return 2;
}

static void
push_rows(lua_State *L, struct lsqlite_job *j)
{
    int r, c, names = 0;

    /* Column names through gw_pushshort, and for several rows made
     * once, not once per row (a row is a fresh table: rawset is setfield
     * here). */
    if (j->nrows > 1 && j->ncols > 0 && lua_checkstack(L, j->ncols + 4)) {
        names = lua_gettop(L) + 1;
        for (c = 0; c < j->ncols; c++) {
            gw_pushshort(L, j->cols[c], strlen(j->cols[c]));
        }
    }
    lua_createtable(L, j->nrows, 0);
    for (r = 0; r < j->nrows; r++) {
        lua_createtable(L, 0, j->ncols);
        for (c = 0; c < j->ncols; c++) {
            struct gw_store_val *v = &j->cells[r * j->ncols + c];

            if (v->type == GW_STORE_NULL) {
                continue;
            }
            if (names > 0) {
                lua_pushvalue(L, names + c);
            } else {
                gw_pushshort(L, j->cols[c], strlen(j->cols[c]));
            }
            gw_store_val_push(L, v);
            lua_rawset(L, -3);
        }
        lua_rawseti(L, -2, r + 1);
    }
    if (names > 0) {
        lua_replace(L, names);          /* the rows where the names began */
        lua_settop(L, names);
    }
}

static void push_stmt_result(lua_State *L, struct lsqlite_job *j);

/* An ATOMIC job's results: { res1, res2, ... } (one exec result per
 * statement), or nil, index, err (the statement's own error), or nil,
 * index, nil, got (it ran but missed its expect). paygate.sql makes the
 * one error of db:atomic() from these, for both engines alike. */
static int
push_atomic_result(lua_State *L, struct lsqlite_job *j)
{
    int i;

    if (j->failed == 0 && j->rc != SQLITE_OK) {
        lua_pushnil(L);
        lua_pushinteger(L, 0);           /* the job as a whole failed */
        push_job_error(L, j);
        lua_remove(L, -2);               /* push_job_error's nil */
        return 3;
    }
    if (j->failed > 0) {
        struct lsqlite_job *s = &j->subs[j->failed - 1];

        lua_pushnil(L);
        lua_pushinteger(L, j->failed);
        if (j->unmet) {
            lua_pushnil(L);
            gw_store_push_int(L, s->changes);
            return 4;
        }
        push_job_error(L, s);
        lua_remove(L, -2);
        return 3;
    }
    lua_createtable(L, j->nsubs, 0);
    for (i = 0; i < j->nsubs; i++) {
        push_stmt_result(L, &j->subs[i]);
        lua_rawseti(L, -2, i + 1);
    }
    return 1;
}

/* { changes, last_id [, rows] } of an exec. */
static void
push_stmt_result(lua_State *L, struct lsqlite_job *j)
{
    lua_createtable(L, 0, 3);
    gw_store_push_int(L, (int64_t)j->changes);
    gw_setfield(L, -2, "changes");
    gw_store_push_int(L, (int64_t)j->last_id);
    gw_setfield(L, -2, "last_id");
    if (j->nrows > 0) {
        push_rows(L, j);
        gw_setfield(L, -2, "rows");
    }
}

/* Pushes the job's Lua results onto L; returns how many. */
static int
push_job_result(lua_State *L, struct lsqlite_job *j)
{
    if (j->op == LSQLITE_OP_ATOMIC) {
        return push_atomic_result(L, j);
    }
    if (j->rc != SQLITE_OK) {
        return push_job_error(L, j);
    }
    switch (j->op) {
    case LSQLITE_OP_BEGIN:
        lua_pushnumber(L, (lua_Number)j->txid);
        return 1;
    case LSQLITE_OP_STMT:
        if (j->want_rows) {
            push_rows(L, j);
            return 1;
        }
        push_stmt_result(L, j);
        return 1;
    case LSQLITE_OP_BACKUP:
        lua_createtable(L, 0, 3);
        gw_store_push_int(L, j->pages);
        gw_setfield(L, -2, "pages");
        gw_store_push_int(L, j->page_size);
        gw_setfield(L, -2, "page_size");
        gw_store_push_int(L, j->bytes);
        gw_setfield(L, -2, "bytes");
        return 1;
    default:
        lua_pushboolean(L, 1);
        return 1;
    }
}

/* Loop thread: delivers a list of finished jobs (linked by next). */
static void
deliver(void *arg)
{
    struct lsqlite_job *j = arg, *next;

    for (; j != NULL; j = next) {
        next = j->next;
        if (j->op == LSQLITE_OP_BEGIN) {
            tx_begin_delivered(j);       /* before fn(tx) can run */
        }
        if (j->co != NULL) {
            struct gw_co *co = j->co;
            lua_State    *L = gw_co_state(co);
            int           n = push_job_result(L, j);

            job_free(j);
            gw_co_wake(co, n);
        } else {
            job_free(j);
        }
    }
}

/* Worker thread: hands a list of finished jobs to the loop. */
static void
post_jobs(struct lsqlite_job *list)
{
    if (list == NULL) {
        return;
    }
    if (gw_loop_post(deliver, list) != GW_OK) {
        gw_log(GW_LOG_ERROR, "sqlite: cannot post results: out of memory");
    }
}

static void
post_one(struct lsqlite_job *j)
{
    j->next = NULL;
    post_jobs(j);
}

/* Loop thread: the coroutine waiting on job is abandoned. */
static void
job_cancel(void *arg)
{
    struct lsqlite_job *j = arg;

    j->co = NULL;
}

/* ------------------------------------------------ statements (threads) */

static void
cache_clear(struct lsqlite_cache *c)
{
    int i;

    for (i = 0; i < LSQLITE_CACHE; i++) {
        sqlite3_finalize(c->st[i]);
        free(c->sql[i]);
        free(c->pos[i]);
        c->st[i] = NULL;
        c->sql[i] = NULL;
        c->pos[i] = NULL;
    }
}

static int
only_space(const char *s)
{
    for (; *s != '\0'; s++) {
        if (*s != ' ' && *s != '\t' && *s != '\n' && *s != '\r'
            && *s != ';')
        {
            return 0;
        }
    }
    return 1;
}

/* j->sql's slot in a statement cache (the same on every connection). */
static unsigned
job_slot(struct lsqlite_job *j)
{
    if (j->slot1 == 0) {
        j->slot1 = gw_store_hash(j->sql) % LSQLITE_CACHE + 1;
    }
    return j->slot1 - 1;
}

static int param_pos(sqlite3_stmt *st, int i);

/* Returns a cached or newly prepared statement for j->sql, or NULL with
 * the error recorded in j. The cache owns the statement. */
static sqlite3_stmt *
stmt_get(struct lsqlite_conn *c, struct lsqlite_job *j)
{
    unsigned      slot = job_slot(j);
    sqlite3_stmt *st = NULL;
    const char   *tail = NULL;
    int           rc, i, n;
    int          *pos = NULL;

    /* our own BEGIN/COMMIT never serves user SQL of the same text */
    int           same = c->cache.sql[slot] != NULL
                         && strcmp(c->cache.sql[slot], j->sql) == 0
                         && c->cache.tx[slot] == c->allow_tx;

    if (same && c->cache.st[slot] != NULL) {
        return c->cache.st[slot];
    }
    /* (same: finalized after an inline interrupt; its counts stay) */
    c->saw_cfg = 0;
    rc = sqlite3_prepare_v2(c->h, j->sql, -1, &st, &tail);
    if (rc != SQLITE_OK) {
        j->at_prepare = 1;
        job_fail_db(j, c->h, rc);
        return NULL;
    }
    if (st == NULL) {
        j->at_prepare = 1;
        job_fail(j, SQLITE_MISUSE, "empty statement");
        return NULL;
    }
    if (tail != NULL && !only_space(tail)) {
        sqlite3_finalize(st);
        j->at_prepare = 1;
        job_fail(j, SQLITE_MISUSE, "several statements in one call: "
                 "use a script (no parameters) or one call each");
        return NULL;
    }
    /* the parameters' positions, for every run of it (a name parsed
     * per parameter per run was a strtol each) */
    n = sqlite3_bind_parameter_count(st);
    if (n > 0) {
        pos = malloc((size_t)n * sizeof(*pos));
        if (pos == NULL) {
            sqlite3_finalize(st);
            job_fail(j, SQLITE_NOMEM, NULL);
            return NULL;
        }
        for (i = 1; i <= n; i++) {
            pos[i - 1] = param_pos(st, i);
        }
    }
    sqlite3_finalize(c->cache.st[slot]);
    free(c->cache.sql[slot]);
    free(c->cache.pos[slot]);
    c->cache.pos[slot] = pos;
    if (!same) {
        c->cache.skip[slot] = 0;
        c->cache.strike[slot] = 0;
    }
    c->cache.cfg[slot] = (char) c->saw_cfg;
    c->cache.sql[slot] = strdup(j->sql);
    c->cache.st[slot] = c->cache.sql[slot] != NULL ? st : NULL;
    c->cache.tx[slot] = (char) c->allow_tx;
    if (++c->cache.gen[slot] == 0) {
        c->cache.gen[slot] = 1;     /* 0 names no statement */
    }
    if (c->cache.st[slot] == NULL) {
        sqlite3_finalize(st);
        free(c->cache.pos[slot]);
        c->cache.pos[slot] = NULL;
        job_fail(j, SQLITE_NOMEM, NULL);
        return NULL;
    }
    return st;
}

/* The Lua position of parameter i of st: $1, $2 ... (the PostgreSQL
 * spelling) name one; ?, ?NNN, :name and @name their own index. */
static int
param_pos(sqlite3_stmt *st, int i)
{
    const char *name = sqlite3_bind_parameter_name(st, i);

    if (name != NULL && name[0] == '$' && name[1] >= '0' && name[1] <= '9') {
        return atoi(name + 1);
    }
    return i;
}

/* Fails j with misuse when st takes a parameter that j's params do not
 * hold ($2 with one value: a nil in the array ended it): SQLite would
 * bind NULL for it, and PostgreSQL refuses the statement. Returns 1 then. */
static int
params_missing(sqlite3_stmt *st, const int *pos, struct lsqlite_job *j)
{
    int i, n = sqlite3_bind_parameter_count(st), k;
    char msg[200];

    for (i = 1; i <= n; i++) {
        k = pos[i - 1];
        if (k < 1 || k > j->nparams) {
            snprintf(msg, sizeof(msg), "the statement takes parameter %s,"
                     " and params holds %d value%s (a nil ends the array:"
                     " write sql.null, or set params.n)",
                     sqlite3_bind_parameter_name(st, i) != NULL
                     ? sqlite3_bind_parameter_name(st, i) : "?",
                     j->nparams, j->nparams == 1 ? "" : "s");
            job_fail(j, SQLITE_MISUSE, msg);
            return 1;
        }
    }
    return 0;
}

static int
bind_params(sqlite3_stmt *st, const int *pos, struct lsqlite_job *j)
{
    int i, n = sqlite3_bind_parameter_count(st);

    for (i = 1; i <= n; i++) {
        int             k = pos[i - 1];
        struct gw_store_val *v;
        int             rc;

        if (k < 1 || k > j->nparams) {
            rc = sqlite3_bind_null(st, i);
        } else {
            v = &j->params[k - 1];
            switch (v->type) {
            case GW_STORE_INT:
                rc = sqlite3_bind_int64(st, i, v->i);
                break;
            case GW_STORE_REAL:
                rc = sqlite3_bind_double(st, i, v->d);
                break;
            case GW_STORE_TEXT:
                rc = sqlite3_bind_text(st, i, v->s, (int)v->len,
                                       SQLITE_STATIC);
                break;
            default:
                rc = sqlite3_bind_null(st, i);
                break;
            }
        }
        if (rc != SQLITE_OK) {
            return rc;
        }
    }
    return SQLITE_OK;
}

static int
add_row(struct lsqlite_job *j, sqlite3_stmt *st)
{
    struct gw_store_val *row;
    int                  c;

    if (j->nrows == 0 && j->cols == NULL) {
        size_t bytes = 0;
        char  *p;

        j->ncols = sqlite3_column_count(st);
        j->cols = calloc((size_t)j->ncols + 1, sizeof(char *));
        if (j->cols == NULL) {
            j->ncols = 0;
            return SQLITE_NOMEM;
        }
        /* The names are copied into one block, which cols[0] owns (see
         * cols_free): one allocation and one free for a row of any
         * width, not one each per column. Until then cols holds
         * SQLite's own pointers, and is emptied again on a failure. */
        for (c = 0; c < j->ncols; c++) {
            const char *name = sqlite3_column_name(st, c);

            if (name == NULL) {
                memset(j->cols, 0, (size_t)j->ncols * sizeof(char *));
                return SQLITE_NOMEM;
            }
            j->cols[c] = (char *)name;
            bytes += strlen(name) + 1;
        }
        p = j->ncols > 0 ? malloc(bytes) : NULL;
        if (j->ncols > 0 && p == NULL) {
            memset(j->cols, 0, (size_t)j->ncols * sizeof(char *));
            return SQLITE_NOMEM;
        }
        for (c = 0; c < j->ncols; c++) {
            size_t n = strlen(j->cols[c]) + 1;

            memcpy(p, j->cols[c], n);
            j->cols[c] = p;
            p += n;
        }
    }
    if (j->nrows == j->cap) {
        int             cap = j->cap == 0 ? 8 : j->cap * 2;
        struct gw_store_val *cells = realloc(j->cells, (size_t)cap * j->ncols
                                        * sizeof(*cells) + 1);

        if (cells == NULL) {
            return SQLITE_NOMEM;
        }
        j->cells = cells;
        j->cap = cap;
    }
    row = &j->cells[j->nrows * j->ncols];
    for (c = 0; c < j->ncols; c++) {
        struct gw_store_val *v = &row[c];

        memset(v, 0, sizeof(*v));
        switch (sqlite3_column_type(st, c)) {
        case SQLITE_INTEGER:
            v->type = GW_STORE_INT;
            v->i = sqlite3_column_int64(st, c);
            break;
        case SQLITE_FLOAT:
            v->type = GW_STORE_REAL;
            v->d = sqlite3_column_double(st, c);
            break;
        case SQLITE_TEXT:
        case SQLITE_BLOB:
            v->len = (size_t)sqlite3_column_bytes(st, c);
            v->s = malloc(v->len + 1);
            if (v->s == NULL) {
                /* the row is not counted (nrows): job_clear() would
                 * not free the strings copied for it so far */
                while (c-- > 0) {
                    free(row[c].s);
                }
                return SQLITE_NOMEM;
            }
            if (v->len > 0) {
                memcpy(v->s, sqlite3_column_blob(st, c), v->len);
            }
            v->s[v->len] = '\0';
            v->type = GW_STORE_TEXT;
            break;
        default:
            v->type = GW_STORE_NULL;
            break;
        }
    }
    j->nrows++;
    return SQLITE_OK;
}

/* An inline read's rows, made as Lua tables while SQLite steps (the loop
 * thread runs it and the Lua state is at hand): no copy of the values
 * into the job and out again. The rows table is at index rows; the
 * column names, when the stack has room for them, from index names on
 * (0: each cell pushes its name). They are made once per statement, not
 * per read: the handle keeps them in a table per cache slot (at index
 * cache: the handle's environment table, 0 if none), valid while the
 * slot holds the same statement, re-prepared as often (a re-prepare
 * after a schema change can change the columns). Lua-visible results are
 * push_rows()'s: a NULL is no key, a later column of the same name
 * overwrites an earlier one. */
struct lua_rows {
    lua_State            *L;
    int                   rows;
    int                   names;
    int                   ncols;
    int                   cache;
    struct lsqlite_cache *c;
    unsigned              slot;
};

/* Pushes the column name c of st (gw_pushshort: most are short and
 * recur). Returns SQLITE_NOMEM when SQLite could not make it. */
static int
push_col_name(lua_State *L, sqlite3_stmt *st, int c)
{
    const char *name = sqlite3_column_name(st, c);

    if (name == NULL) {
        return SQLITE_NOMEM;
    }
    gw_pushshort(L, name, strlen(name));
    return SQLITE_OK;
}

/* add_row() for an inline read: appends st's row to lr's rows table. May
 * raise (no memory, a finalizer's error): inline_read() runs it under
 * lua_pcall. */
static int
lua_add_row(struct lua_rows *lr, struct lsqlite_job *j, sqlite3_stmt *st)
{
    lua_State *L = lr->L;
    int        c, rc;

    if (j->nrows == 0) {
        lr->ncols = sqlite3_column_count(st);
        if (lua_checkstack(L, lr->ncols + 4)) {
            struct lsqlite_cache *k = lr->c;
            unsigned              s = lr->slot;
            int                   reprep = sqlite3_stmt_status(st,
                                     SQLITE_STMTSTATUS_REPREPARE, 0);
            int                   kept = lr->cache > 0
                                     && k->names_gen[s] == k->gen[s]
                                     && k->names_reprep[s] == reprep;

            lr->names = lua_gettop(L) + 1;
            if (kept) {
                lua_rawgeti(L, lr->cache, (int)s + 1);
                kept = lua_istable(L, -1);  /* (unless Lua replaced the
                                               handle's environment) */
            }
            if (kept) {
                for (c = 0; c < lr->ncols; c++) {
                    lua_rawgeti(L, lr->names, c + 1);
                }
                lua_remove(L, lr->names);
            } else {
                lua_settop(L, lr->names - 1);
                for (c = 0; c < lr->ncols; c++) {
                    if ((rc = push_col_name(L, st, c)) != SQLITE_OK) {
                        return rc;
                    }
                }
                if (lr->cache > 0) {
                    k->names_gen[s] = 0;    /* (if the below raises) */
                    lua_createtable(L, lr->ncols, 0);
                    for (c = 0; c < lr->ncols; c++) {
                        lua_pushvalue(L, lr->names + c);
                        lua_rawseti(L, -2, c + 1);
                    }
                    lua_rawseti(L, lr->cache, (int)s + 1);
                    k->names_gen[s] = k->gen[s];
                    k->names_reprep[s] = reprep;
                }
            }
        }
    }
    lua_createtable(L, 0, lr->ncols);
    for (c = 0; c < lr->ncols; c++) {
        int type = sqlite3_column_type(st, c);

        if (type == SQLITE_NULL) {
            continue;
        }
        if (lr->names > 0) {
            lua_pushvalue(L, lr->names + c);
        } else if ((rc = push_col_name(L, st, c)) != SQLITE_OK) {
            return rc;
        }
        switch (type) {
        case SQLITE_INTEGER:
            gw_store_push_int(L, sqlite3_column_int64(st, c));
            break;
        case SQLITE_FLOAT:
            lua_pushnumber(L, sqlite3_column_double(st, c));
            break;
        default: {                      /* TEXT, BLOB */
            /* the bytes first, then their length (SQLite's advice); text
             * as text: in a UTF-16 file, the blob would be its UTF-16 */
            const char *p = type == SQLITE_TEXT
                            ? (const char *) sqlite3_column_text(st, c)
                            : sqlite3_column_blob(st, c);
            int         n = sqlite3_column_bytes(st, c);

            if (p == NULL && n > 0) {
                return SQLITE_NOMEM;
            }
            lua_pushlstring(L, p != NULL ? p : "", (size_t)n);
            break;
        }
        }
        lua_rawset(L, -3);
    }
    lua_rawseti(L, lr->rows, ++j->nrows);
    return SQLITE_OK;
}

/* After a cached statement failed in its step with SQLITE_ERROR: SQLite
 * prepares a statement again inside the step when the schema changed
 * (another connection dropped a column or a table it uses), and a
 * failure there is reported by the step, where it would otherwise be
 * taken for a runtime error ("error"). Prepared afresh, the same SQL
 * fails to prepare: j's failure is then the prepare's ("syntax"), as
 * for a statement that was never cached. */
static void
stale_check(struct lsqlite_conn *c, struct lsqlite_job *j)
{
    sqlite3_stmt *st = NULL;
    int           rc = sqlite3_prepare_v2(c->h, j->sql, -1, &st, NULL);

    if ((rc & 0xff) == SQLITE_ERROR) {
        j->at_prepare = 1;
        job_fail_db(j, c->h, rc);
    }
    sqlite3_finalize(st);
}

/* Runs one statement job on connection c; its rows go into j, or with
 * lr (an inline read) into Lua tables. Returns j->rc. */
static int
run_stmt_rows(struct lsqlite_conn *c, struct lsqlite_job *j,
              struct lua_rows *lr)
{
    sqlite3_stmt *st = stmt_get(c, j);
    const int    *pos;
    int           rc;
    sqlite3_int64 total;

    if (st == NULL) {
        return j->rc;
    }
    pos = c->cache.pos[job_slot(j)];     /* st's (stmt_get's slot) */
    total = sqlite3_total_changes64(c->h);
    if (params_missing(st, pos, j)) {
        rc = j->rc;
        goto done;
    }
    rc = bind_params(st, pos, j);
    if (rc != SQLITE_OK) {
        job_fail_db(j, c->h, rc);
        goto done;
    }
    for (;;) {
        rc = sqlite3_step(st);
        if (rc == SQLITE_ROW) {
            rc = lr != NULL ? lua_add_row(lr, j, st) : add_row(j, st);
            if (rc != SQLITE_OK) {
                job_fail(j, rc, NULL);
                goto done;
            }
            continue;
        }
        if (rc == SQLITE_DONE) {
            j->rc = SQLITE_OK;
            j->changes = sqlite3_changes(c->h);
            j->last_id = sqlite3_last_insert_rowid(c->h);
            /* a read counts the rows it returned, as PostgreSQL's
             * command tag does (sqlite3_changes() would be the last
             * write's) */
            if (sqlite3_stmt_readonly(st)) {
                j->changes = j->nrows;
            } else if (sqlite3_total_changes64(c->h) == total) {
                /* it changed no row: DDL leaves sqlite3_changes() at
                 * the last write's count, maybe another job's of the
                 * batch (PostgreSQL's tag says none) */
                j->changes = 0;
            }
        } else {
            job_fail_db(j, c->h, rc);
            if (j->rc == SQLITE_ERROR) {
                stale_check(c, j);
            }
        }
        break;
    }
done:
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    return j->rc;
}

static int
run_stmt(struct lsqlite_conn *c, struct lsqlite_job *j)
{
    return run_stmt_rows(c, j, NULL);
}

static int
run_script(struct lsqlite_conn *c, struct lsqlite_job *j)
{
    char *msg = NULL;
    int   rc = sqlite3_exec(c->h, j->sql, NULL, NULL, &msg);

    if (rc != SQLITE_OK) {
        j->rc = rc & 0xff;
        j->xrc = sqlite3_extended_errcode(c->h);
        j->at_prepare = 1;       /* SQLITE_ERROR here is bad SQL text */
        j->errmsg = strdup(msg != NULL ? msg : sqlite3_errstr(rc));
    }
    sqlite3_free(msg);
    return j->rc;
}

/* Runs an ATOMIC job's statements in order, inside the savepoint its
 * caller opened, stopping at the first that fails or misses its expect
 * (j->failed names it; the caller rolls the savepoint back). */
static int
run_atomic(struct lsqlite_conn *c, struct lsqlite_job *j)
{
    int i;

    for (i = 0; i < j->nsubs; i++) {
        struct lsqlite_job *s = &j->subs[i];

        if (run_stmt(c, s) != SQLITE_OK) {
            j->failed = i + 1;
            j->rc = s->rc;
            return j->rc;
        }
        if (s->expect >= 0 && s->changes != s->expect) {
            j->failed = i + 1;
            j->unmet = 1;
            j->rc = SQLITE_CONSTRAINT;
            return j->rc;
        }
    }
    return SQLITE_OK;
}

static int
run_job(struct lsqlite_conn *c, struct lsqlite_job *j)
{
    if (j->op == LSQLITE_OP_ATOMIC) {
        return run_atomic(c, j);
    }
    return j->op == LSQLITE_OP_SCRIPT ? run_script(c, j) : run_stmt(c, j);
}

/* Runs a fixed statement (BEGIN, SAVEPOINT ...) through the cache. */
static int
run_fixed(struct lsqlite_conn *c, const char *sql, char **errmsg)
{
    struct lsqlite_job j;
    int              rc;

    memset(&j, 0, sizeof(j));
    j.sql = (char *)sql;
    c->allow_tx = 1;
    rc = run_stmt(c, &j);
    c->allow_tx = 0;
    if (errmsg != NULL) {
        *errmsg = j.errmsg;
    } else {
        free(j.errmsg);
    }
    return rc;
}

/*
 * Transactions are the writer's: group commit wraps every write in its own
 * savepoint inside a shared transaction, so a BEGIN, COMMIT, ROLLBACK,
 * SAVEPOINT or RELEASE in user SQL (a statement, a script, a migration)
 * would commit or undo its neighbours' work. Such statements fail to
 * prepare (SQLITE_AUTH); db:transaction() is the way. On a reader, a BEGIN
 * would leave the connection in a transaction serving stale reads.
 */
static int
authorize(void *arg, int action, const char *a, const char *b,
          const char *dbname, const char *trigger)
{
    struct lsqlite_conn *c = arg;

    if ((action == SQLITE_TRANSACTION || action == SQLITE_SAVEPOINT)
        && !c->allow_tx) {
        return SQLITE_DENY;
    }
    if (action == SQLITE_PRAGMA || action == SQLITE_ATTACH
        || action == SQLITE_DETACH) {
        c->saw_cfg = 1;
    }
    return SQLITE_OK;
}

/* The writer's journal mode must be WAL: readers are connections of
 * their own, which see its commits only through the file. ":memory:"
 * (each connection a database of its own: writes that reads never see)
 * or a file system without the shared memory WAL needs keeps another
 * mode, and PRAGMA journal_mode=WAL says so by its answer, not by an
 * error. */
static int
wal_check(struct lsqlite_conn *c, char **errmsg)
{
    sqlite3_stmt *st = NULL;
    const char   *mode = NULL;
    char          buf[320];
    int           rc;

    rc = sqlite3_prepare_v2(c->h, "PRAGMA journal_mode", -1, &st, NULL);
    if (rc == SQLITE_OK && sqlite3_step(st) == SQLITE_ROW) {
        mode = (const char *)sqlite3_column_text(st, 0);
    }
    if (mode != NULL && strcmp(mode, "wal") == 0) {
        sqlite3_finalize(st);
        return SQLITE_OK;
    }
    snprintf(buf, sizeof(buf), "the database cannot use WAL journal mode"
             " (it stays in %s mode): paygate's readers are connections of"
             " their own, so it needs a file on a local file system, not"
             " :memory: or a mount without shared memory",
             mode != NULL ? mode : "an unknown");
    sqlite3_finalize(st);
    *errmsg = strdup(buf);
    return LSQLITE_NO_WAL;
}

/* A reader that keeps one snapshot for long (a report, another process's
 * transaction) holds back every checkpoint, and the log grows past
 * checkpoint_pages meanwhile; SQLite then starts it over from its
 * beginning but keeps the file at its biggest, for the life of the
 * connection. journal_size_limit cuts it back when it starts over: to
 * twice checkpoint_pages, so that a log a little past the threshold (a
 * batch's pages on top) is not cut and grown again on every cycle. */
static void
wal_limit(struct lsqlite_conn *c, struct lsqlite_db *db)
{
    sqlite3_stmt *st = NULL;
    long long     page = 4096;
    char          sql[64];

    if (sqlite3_prepare_v2(c->h, "PRAGMA page_size", -1, &st, NULL)
            == SQLITE_OK && sqlite3_step(st) == SQLITE_ROW) {
        page = sqlite3_column_int64(st, 0);
    }
    sqlite3_finalize(st);
    snprintf(sql, sizeof(sql), "PRAGMA journal_size_limit=%lld",
             2LL * db->ckpt_pages * (page + 24) + 32);
    sqlite3_exec(c->h, sql, NULL, NULL, NULL);
}

/* ------------------------------------------- turns between processes */

/*
 * The workers of an app are processes, each with a writer connection on
 * the same file, and SQLite's write lock is not fair between them: its
 * busy handler sleeps in growing steps (up to 100 ms) between tries,
 * while a process that writes back to back takes the lock again
 * microseconds after each COMMIT. Under a load that keeps both writing,
 * one could miss every gap until busy_timeout and fail its writes "busy"
 * (measured, two processes writing flat out, 32 writers each, on a quiet
 * machine: a batch waited up to 2.2 s; on a loaded one past the 5 s
 * busy_timeout).
 *
 * So a writer that has waited TURN_STARVE_MS for the lock asks for a
 * turn: it holds a shared OFD lock on byte 0 of a side file with no
 * data, PATH-turn (made 0600), while it goes on trying, now every
 * TURN_POLL_US or so at first, then further apart up to TURN_POLL_MAX_US
 * (a lock held long is not tried 20,000 times a second); a writer about
 * to begin a batch that sees such a lock held by another pauses until it
 * is gone (the other got the lock), at most TURN_YIELD_MS (a waiter that
 * is not scheduled does not stop it longer). Two processes writing flat
 * out then alternate turns of about TURN_STARVE_MS; where no write waits
 * that long, nothing changes (one fcntl per batch). In an app whose
 * workers all write, this shares the store's time between them instead
 * of leaving it to whichever wrote last (docs/storage.md has the gateway's
 * figures: notifications no longer wait seconds; payment creations, which
 * had the lock most, slow down). An OFD lock belongs to its open
 * file: a process that dies while waiting holds nothing, and two handles
 * of one process take turns like two processes. Without the side file
 * (a read-only folder), a writer waits as SQLite waits, as before.
 */
#define TURN_STARVE_MS 50           /* a wait that asks for a turn */
#define TURN_POLL_US   50           /* then: mean pause between tries, */
#define TURN_POLL_MAX_US 1000       /* doubling up to this */
#define TURN_YIELD_MS  20           /* longest pause for a waiter */

/*
 * Root running a tool on a store (paygate backup, doctor, migrate apply)
 * makes PATH-turn root's, 0600: the workers of the store's owner could
 * not open it, and would never take turns. So, as SQLite gives its -wal
 * and -shm the database's owner when root makes them, root gives fd (the
 * file it just made, or one root made before: a plain empty file with no
 * other link) the database file's owner. A file of anyone else, or one
 * with another link (a hard link planted to a file elsewhere), is left
 * as it is.
 */
static void
turn_owner(int fd, const char *path, int made)
{
    struct stat st, db;

    if (geteuid() != 0 || fstat(fd, &st) != 0 || stat(path, &db) != 0
        || (st.st_uid == db.st_uid && st.st_gid == db.st_gid))
    {
        return;
    }
    if (made || (S_ISREG(st.st_mode) && st.st_nlink == 1 && st.st_uid == 0
                 && st.st_size == 0))
    {
        (void) fchown(fd, db.st_uid, db.st_gid);
    }
}

static void
turn_open(struct lsqlite_conn *c, struct lsqlite_db *db)
{
    char name[PATH_MAX + 8];
    int  fd, made;

    c->has_turn = 0;
    if (db->path[0] == '\0' || strcmp(db->path, ":memory:") == 0
        || (size_t) snprintf(name, sizeof(name), "%s-turn", db->path)
           >= sizeof(name))
    {
        return;
    }
    /* (read-only is enough for a shared lock: a file another user made
     * serves as well, if this one may read it) */
    fd = open(name, O_RDONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW,
              0600);
    made = fd >= 0;
    if (!made && errno == EEXIST) {
        fd = open(name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    }
    if (fd < 0) {
        return;
    }
    turn_owner(fd, db->path, made);
    c->turn_fd = fd;
    c->has_turn = 1;
}

/* Asks for a turn (F_RDLCK) or drops the request (F_UNLCK). */
static void
turn_ask(struct lsqlite_conn *c, short type)
{
    struct flock fl;

    memset(&fl, 0, sizeof(fl));
    fl.l_type = type;
    fl.l_whence = SEEK_SET;
    fl.l_start = 0;
    fl.l_len = 1;
    (void) fcntl(c->turn_fd, F_OFD_SETLK, &fl);
}

/* 1 when a writer of another open file asks for a turn. */
static int
turn_asked(struct lsqlite_conn *c)
{
    struct flock fl;

    memset(&fl, 0, sizeof(fl));
    fl.l_type = F_WRLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = 0;
    fl.l_len = 1;
    if (fcntl(c->turn_fd, F_OFD_GETLK, &fl) != 0) {
        return 0;
    }
    return fl.l_type != F_UNLCK;
}

/* Sleeps us microseconds on average (us/2 to 3us/2). */
static void
turn_pause(long us)
{
    struct timespec t = { 0, 0 };

    t.tv_nsec = (us / 2 + random() % us) * 1000L;
    nanosleep(&t, NULL);
}

/*
 * BEGIN IMMEDIATE in turn, trying until `deadline` (monotonic s; a past
 * one: one try). Returns SQLite's code; *msg as run_fixed's. Leaves the
 * connection's busy_timeout to the caller.
 */
static int
turn_begin(struct lsqlite_conn *c, double deadline, char **msg)
{
    double  now, until, left;
    int     rc, asked = 0;
    long    pause = TURN_POLL_US;   /* us: the next pause between tries */

    now = gw_loop_mono_fresh();
    if (turn_asked(c)) {
        until = now + TURN_YIELD_MS / 1000.0;
        if (until > deadline) {
            until = deadline;
        }
        do {
            turn_pause(TURN_POLL_US);
        } while (turn_asked(c) && gw_loop_mono_fresh() < until);
        now = gw_loop_mono_fresh();
    }
    /* first as SQLite waits (0 ms: one try) */
    left = deadline - now;
    if (left > TURN_STARVE_MS / 1000.0) {
        left = TURN_STARVE_MS / 1000.0;
    }
    sqlite3_busy_timeout(c->h, left > 0 ? (int) ceil(left * 1000.0) : 0);
    rc = run_fixed(c, "BEGIN IMMEDIATE", msg);
    if ((rc & 0xff) != SQLITE_BUSY || gw_loop_mono_fresh() >= deadline) {
        return rc;
    }
    /* then in turn: the tries come closer than SQLite's (a writer that
     * sees the ask lets us in at its next batch, and waits for us), but
     * further apart the longer the lock stays held (a long transaction,
     * another tool's: tries every 50 us for seconds spent a fifth of a
     * core for nothing) */
    sqlite3_busy_timeout(c->h, 0);
    do {
        free(*msg);
        *msg = NULL;
        if (!asked) {
            turn_ask(c, F_RDLCK);
            asked = 1;
        }
        turn_pause(pause);
        if (pause < TURN_POLL_MAX_US) {
            pause = pause * 2 < TURN_POLL_MAX_US ? pause * 2
                                                  : TURN_POLL_MAX_US;
        }
        rc = run_fixed(c, "BEGIN IMMEDIATE", msg);
    } while ((rc & 0xff) == SQLITE_BUSY && gw_loop_mono_fresh() < deadline);
    turn_ask(c, F_UNLCK);
    return rc;
}

/* Makes a missing database file empty and 0600, whatever the umask, before
 * SQLite opens it: SQLite would make it 0644 less the umask (0644 under a
 * service's 022: every local user reads the payments, what payers bought and
 * the API keys' signing keys), and it gives the -wal and -shm it makes later
 * the file's own mode. An empty file is an empty database. A file already
 * there keeps the mode its owner gave it; a path that cannot be made here is
 * left to sqlite3_open_v2, which says why. */
static void
create_private(const char *path)
{
    int fd;

    if (path[0] == '\0' || strcmp(path, ":memory:") == 0) {
        return;
    }
    fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) {
        return;
    }
    (void) fchmod(fd, 0600);        /* a umask of 0277 would leave 0400 */
    close(fd);
}

static int
conn_open(struct lsqlite_conn *c, struct lsqlite_db *db, int readonly,
          char **errmsg)
{
    int  flags = readonly ? SQLITE_OPEN_READONLY
                          : SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE;
    int              rc;
    char             pragmas[256];
    double           deadline;      /* monotonic s */
    struct timespec  pause = { 0, 0 };

    flags |= SQLITE_OPEN_NOMUTEX;
    if (!readonly) {
        create_private(db->path);
    }
    rc = sqlite3_open_v2(db->path, &c->h, flags, NULL);
    if (rc != SQLITE_OK) {
        goto err;
    }
    /* Before anything that reads or writes the file. */
    sqlite3_busy_timeout(c->h, db->busy_ms);
    sqlite3_extended_result_codes(c->h, 1);
    sqlite3_set_authorizer(c->h, authorize, c);
    if (readonly) {
        return SQLITE_OK;
    }
    snprintf(pragmas, sizeof(pragmas),
             "PRAGMA journal_mode=WAL; PRAGMA synchronous=%d;"
             " PRAGMA foreign_keys=ON; PRAGMA wal_autocheckpoint=%d;"
             " PRAGMA cache_size=-%d;",
             db->synchronous, db->ckpt_pages, db->cache_mib * 1024);
    /* Switching to WAL takes an exclusive lock, and SQLite answers BUSY
     * at once, without its busy handler, when waiting could deadlock (a
     * second process holding a shared lock on the new file while it
     * changes mode too). On a first start every worker does this at the
     * same moment: retry, with a short random pause, within busy_timeout
     * like any other write. The pragmas are idempotent. */
    deadline = gw_loop_mono_fresh() + db->busy_ms / 1000.0;
    for (;;) {
        rc = sqlite3_exec(c->h, pragmas, NULL, NULL, NULL);
        if (((rc & 0xff) != SQLITE_BUSY && (rc & 0xff) != SQLITE_LOCKED)
            || gw_loop_mono_fresh() >= deadline)
        {
            break;
        }
        pause.tv_nsec = 1000000L + (long)(random() % 9000000L);
        nanosleep(&pause, NULL);
    }
    if (rc != SQLITE_OK) {
        goto err;
    }
    turn_open(c, db);
    rc = wal_check(c, errmsg);
    if (rc == SQLITE_OK) {
        wal_limit(c, db);
    }
    return rc;
err:
    *errmsg = strdup(c->h != NULL ? sqlite3_errmsg(c->h) : sqlite3_errstr(rc));
    sqlite3_close(c->h);
    c->h = NULL;
    return rc & 0xff;
}

static void
conn_close(struct lsqlite_conn *c)
{
    if (c->has_turn) {
        close(c->turn_fd);           /* (drops its OFD locks) */
        c->has_turn = 0;
    }
    cache_clear(&c->cache);
    if (c->h != NULL) {
        sqlite3_close(c->h);
        c->h = NULL;
    }
}

/* ------------------------------------------------------- writer thread */

struct lsqlite_batch {
    struct lsqlite_job *done;      /* jobs that wait for COMMIT */
    struct lsqlite_job *done_tail;
    int               began;     /* BEGIN IMMEDIATE is open */
};

/* The outer transaction ended underneath us (I/O error, full disk):
 * every job waiting for COMMIT has lost its effect. */
static void
batch_abort(struct lsqlite_batch *b, int rc, const char *msg)
{
    struct lsqlite_job *j;

    for (j = b->done; j != NULL; j = j->next) {
        job_fail(j, rc, msg);
    }
    post_jobs(b->done);
    b->done = b->done_tail = NULL;
    b->began = 0;
}

static void
batch_defer(struct lsqlite_batch *b, struct lsqlite_job *j)
{
    queue_push(&b->done, &b->done_tail, j);
}

/* After a job: when SQLite rolled back the whole transaction itself,
 * the deferred jobs must not be acknowledged. */
static void
batch_check(struct lsqlite_batch *b, struct lsqlite_conn *c)
{
    if (b->began && sqlite3_get_autocommit(c->h)) {
        batch_abort(b, SQLITE_IOERR, "transaction rolled back by sqlite");
    }
}

/*
 * Opens the batch's transaction for j unless it is open. Another
 * process holding the write lock makes BEGIN IMMEDIATE wait, and fail
 * with busy after the wait: each job of the batch then tries in turn.
 * Each waits only until busy_timeout after it was made (j->made), so k
 * jobs queued behind the lock all fail within busy_timeout of their
 * request, not the k-th after k times it, and a job that came late
 * still gets its whole wait; a job past its own deadline tries once
 * without waiting. Fails j (not posted) and returns SQLite's code, or
 * SQLITE_OK.
 */
static int
batch_begin(struct lsqlite_db *db, struct lsqlite_batch *b,
            struct lsqlite_conn *c, struct lsqlite_job *j)
{
    char   *msg = NULL;
    int     rc;
    double  left;

    if (b->began) {
        return SQLITE_OK;
    }
    if (c->has_turn) {
        rc = turn_begin(c, j->made + db->busy_ms / 1000.0, &msg);
    } else {
        left = j->made + db->busy_ms / 1000.0 - gw_loop_mono_fresh();
        /* (0 ms: no busy handler, one try) */
        sqlite3_busy_timeout(c->h, left > 0 ? (int) ceil(left * 1000.0) : 0);
        rc = run_fixed(c, "BEGIN IMMEDIATE", &msg);
    }
    sqlite3_busy_timeout(c->h, db->busy_ms);
    if (rc != SQLITE_OK) {
        job_fail(j, rc, msg);
        free(msg);
        return rc;
    }
    b->began = 1;
    return SQLITE_OK;
}

/*
 * A deferred foreign key (DEFERRABLE INITIALLY DEFERRED, or PRAGMA
 * defer_foreign_keys) is checked only at the outer COMMIT, which is the
 * batch's: a write left violating one made that COMMIT fail, and with it
 * every neighbour in the batch (a non-retryable "constraint" for writes
 * that broke nothing). So a job is checked as it ends (an exec, a script,
 * an atomic job; an interactive transaction at its COMMIT): with a
 * violation left, it fails as SQLite's COMMIT would have failed it, and
 * its savepoint is rolled back, which restores the count (0 at every
 * job's start). Returns 1 and fails j when one is left.
 */
static int
deferred_fk_left(struct lsqlite_conn *c, struct lsqlite_job *j)
{
    int cur = 0, hi = 0;

    if (sqlite3_db_status(c->h, SQLITE_DBSTATUS_DEFERRED_FKS, &cur, &hi, 0)
        != SQLITE_OK || cur == 0)
    {
        return 0;
    }
    job_fail(j, SQLITE_CONSTRAINT, "FOREIGN KEY constraint failed");
    j->xrc = SQLITE_CONSTRAINT_FOREIGNKEY;
    return 1;
}

static void
savepoint_undo(struct lsqlite_conn *c)
{
    run_fixed(c, "ROLLBACK TO gw", NULL);
    run_fixed(c, "RELEASE gw", NULL);
}

/* With db->mu held: the transaction ended. Statements queued for it
 * before it ended (a coroutine sharing tx, or one queued behind the
 * statement that ended it) must not run in the next transaction: they
 * are returned (failed) for the caller to post after unlocking. */
static struct lsqlite_job *
tx_close_locked(struct lsqlite_db *db)
{
    struct lsqlite_job *j, *list = NULL;

    db->active_tx = 0;
    for (j = queue_pop(&db->txq, &db->txq_tail); j != NULL;
         j = queue_pop(&db->txq, &db->txq_tail))
    {
        job_fail(j, SQLITE_ABORT, "transaction is no longer active");
        j->next = list;
        list = j;
    }
    return list;
}

/* A script inside an interactive transaction: in a savepoint of its own,
 * so that a failure half way undoes the whole script and the transaction
 * goes on (as on PostgreSQL; one statement is atomic by itself). */
static void
run_tx_script(struct lsqlite_conn *c, struct lsqlite_job *j)
{
    if (run_fixed(c, "SAVEPOINT gw_stmt", NULL) != SQLITE_OK) {
        run_job(c, j);
        return;
    }
    if (run_job(c, j) != SQLITE_OK) {
        run_fixed(c, "ROLLBACK TO gw_stmt", NULL);
    }
    run_fixed(c, "RELEASE gw_stmt", NULL);
}

/* Serves the interactive transaction txid until it ends. */
static void
serve_tx(struct lsqlite_db *db, struct lsqlite_conn *c, struct lsqlite_batch *b,
         long txid)
{
    struct lsqlite_job *j, *stale;
    struct timespec   deadline;
    int               rc;

    pthread_mutex_lock(&db->mu);
    for (;;) {
        clock_gettime(CLOCK_MONOTONIC, &deadline);  /* wcond's clock */
        deadline.tv_sec += db->tx_timeout_ms / 1000;
        deadline.tv_nsec += (long)(db->tx_timeout_ms % 1000) * 1000000L;
        if (deadline.tv_nsec >= 1000000000L) {
            deadline.tv_sec++;
            deadline.tv_nsec -= 1000000000L;
        }
        rc = 0;
        /* (db:close() wakes it too: the transaction can no longer end
         * by its COMMIT, and the file's write lock must go now, not at
         * tx_timeout) */
        while (db->txq == NULL && rc != ETIMEDOUT && !db->closing) {
            rc = pthread_cond_timedwait(&db->wcond, &db->mu, &deadline);
        }
        j = queue_pop(&db->txq, &db->txq_tail);
        if (j == NULL) {
            /* Idle too long (a handler that waits on something slow
             * inside a transaction; abandoned ones are rolled back
             * by tx_abandon() at once), or the handle closed. */
            int closing = db->closing;

            stale = tx_close_locked(db);
            pthread_mutex_unlock(&db->mu);
            post_jobs(stale);
            if (closing) {
                gw_log(GW_LOG_WARN, "sqlite: transaction %ld still open"
                       " when its store was closed, rolled back", txid);
            } else {
                gw_log(GW_LOG_WARN, "sqlite: transaction %ld idle for %d"
                       " ms, rolled back", txid, db->tx_timeout_ms);
            }
            savepoint_undo(c);
            batch_check(b, c);
            return;
        }
        if (j->txid != txid) {
            pthread_mutex_unlock(&db->mu);
            job_fail(j, SQLITE_ABORT, "transaction is no longer active");
            post_one(j);
            pthread_mutex_lock(&db->mu);
            continue;
        }
        stale = NULL;
        if (j->op == LSQLITE_OP_COMMIT || j->op == LSQLITE_OP_ROLLBACK) {
            stale = tx_close_locked(db);
        }
        pthread_mutex_unlock(&db->mu);
        post_jobs(stale);

        switch (j->op) {
        case LSQLITE_OP_COMMIT:
            if (deferred_fk_left(c, j)) {
                savepoint_undo(c);
                post_one(j);
                batch_check(b, c);
                return;
            }
            rc = run_fixed(c, "RELEASE gw", &j->errmsg);
            if (rc != SQLITE_OK) {
                j->rc = rc;
                j->xrc = rc;
                savepoint_undo(c);
                post_one(j);
            } else {
                batch_defer(b, j);
            }
            batch_check(b, c);
            return;
        case LSQLITE_OP_ROLLBACK:
            savepoint_undo(c);
            post_one(j);
            batch_check(b, c);
            return;
        default:
            if (j->op == LSQLITE_OP_SCRIPT) {
                run_tx_script(c, j);
            } else {
                run_job(c, j);           /* one statement: atomic */
            }
            post_one(j);
            if (b->began && sqlite3_get_autocommit(c->h)) {
                /* The statement's failure ended the whole transaction. */
                pthread_mutex_lock(&db->mu);
                stale = tx_close_locked(db);
                pthread_mutex_unlock(&db->mu);
                post_jobs(stale);
                batch_check(b, c);
                return;
            }
            break;
        }
        pthread_mutex_lock(&db->mu);
    }
}

/* Runs one writer job inside the current batch. */
static void
batch_run_job(struct lsqlite_db *db, struct lsqlite_conn *c,
              struct lsqlite_batch *b, struct lsqlite_job *j)
{
    int rc;

    if (batch_begin(db, b, c, j) != SQLITE_OK) {
        post_one(j);
        return;
    }
    rc = run_fixed(c, "SAVEPOINT gw", &j->errmsg);
    if (rc != SQLITE_OK) {
        j->rc = rc;
        j->xrc = rc;
        post_one(j);
        batch_check(b, c);
        return;
    }
    if (j->op == LSQLITE_OP_BEGIN) {
        long txid = j->txid;

        pthread_mutex_lock(&db->mu);
        db->active_tx = txid;
        pthread_mutex_unlock(&db->mu);
        post_one(j);            /* j is the loop thread's from here on */
        serve_tx(db, c, b, txid);
        return;
    }
    if (j->op == LSQLITE_OP_COMMIT || j->op == LSQLITE_OP_ROLLBACK) {
        job_fail(j, SQLITE_MISUSE, "transaction is not active");
        run_fixed(c, "RELEASE gw", NULL);
        post_one(j);
        return;
    }
    if (run_job(c, j) != SQLITE_OK || deferred_fk_left(c, j)) {
        savepoint_undo(c);
        post_one(j);
        batch_check(b, c);
        return;
    }
    rc = run_fixed(c, "RELEASE gw", NULL);
    if (rc != SQLITE_OK) {
        job_fail_db(j, c->h, rc);
        post_one(j);
        batch_check(b, c);
        return;
    }
    batch_defer(b, j);
    batch_check(b, c);
}

/* Writer: counts a COMMIT of jobs writes that took ns (monotonic wall
 * time). A handful of relaxed stores between two of cseq: no lock, no
 * allocation (h:stats() reads them with commit_stats_read). */
static void
commit_stats_add(struct lsqlite_db *db, sqlite3 *h, long jobs, long long ns)
{
    struct lsqlite_commit_stats *cs = &db->cs;
    unsigned long seq = __atomic_load_n(&db->cseq, __ATOMIC_RELAXED);
    uint64_t      t = ns > 0 ? (uint64_t) ns : 0;
    size_t        i = 0;
    int           cache = 0, hi = 0;

    sqlite3_db_status(h, SQLITE_DBSTATUS_CACHE_USED, &cache, &hi, 0);

    while (i < LSQLITE_COMMIT_NB - 1 && t > lsqlite_commit_le_ns[i]) {
        i++;
    }
    __atomic_store_n(&db->cseq, seq + 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    __atomic_store_n(&cs->commits, cs->commits + 1, __ATOMIC_RELAXED);
    __atomic_store_n(&cs->writes, cs->writes + jobs, __ATOMIC_RELAXED);
    __atomic_store_n(&cs->n[i], cs->n[i] + 1, __ATOMIC_RELAXED);
    __atomic_store_n(&cs->ns[i], cs->ns[i] + t, __ATOMIC_RELAXED);
    if (t > cs->max_ns) {
        __atomic_store_n(&cs->max_ns, t, __ATOMIC_RELAXED);
    }
    __atomic_store_n(&cs->cache_bytes, (long) cache, __ATOMIC_RELAXED);
    __atomic_store_n(&db->cseq, seq + 2, __ATOMIC_RELEASE);
}

static void
batch_commit(struct lsqlite_db *db, struct lsqlite_conn *c,
             struct lsqlite_batch *b)
{
    struct lsqlite_job *j;
    struct timespec     t0, t1;
    char *msg = NULL;
    int   rc, moved = 0;
    long  jobs = 0;

    if (!b->began) {
        post_jobs(b->done);
        b->done = b->done_tail = NULL;
        return;
    }
    /* A file deleted (or renamed over) while open takes writes in WAL
     * mode as before, durable in an inode no name leads to: a restart
     * finds none of them (or a database missing the pages checkpointed
     * into the old file). Refused instead, before anything is
     * acknowledged (one stat per commit). */
    if (sqlite3_file_control(c->h, "main", SQLITE_FCNTL_HAS_MOVED, &moved)
            == SQLITE_OK && moved) {
        char why[PATH_MAX + 160];

        snprintf(why, sizeof(why), "the database file %s was deleted or"
                 " replaced while open: writes are refused (a restart"
                 " would not find them)", db->path);
        run_fixed(c, "ROLLBACK", NULL);
        batch_abort(b, SQLITE_READONLY, why);
        return;
    }
    clock_gettime(CLOCK_MONOTONIC, &t0);
    rc = run_fixed(c, "COMMIT", &msg);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    if (rc != SQLITE_OK) {
        run_fixed(c, "ROLLBACK", NULL);
        batch_abort(b, rc, msg);
        free(msg);
        return;
    }
    b->began = 0;
    for (j = b->done; j != NULL; j = j->next) {
        jobs++;
    }
    /* A batch whose writes all failed (each undone to its savepoint)
     * commits nothing: no fsync, a few microseconds. Counted, it made
     * commits without writes and filled the fastest bucket, pulling the
     * commit time's quantiles towards 0 under failing writes. */
    if (jobs > 0) {
        commit_stats_add(db, c->h, jobs, (t1.tv_sec - t0.tv_sec) * 1000000000LL
                                    + (t1.tv_nsec - t0.tv_nsec));
    }
    post_jobs(b->done);
    b->done = b->done_tail = NULL;
}

static void *
writer_main(void *arg)
{
    struct lsqlite_db   *db = arg;
    struct lsqlite_conn  c;
    struct lsqlite_batch    b;
    struct lsqlite_job  *j;
    int                n;

    memset(&c, 0, sizeof(c));
    memset(&b, 0, sizeof(b));
    pthread_mutex_lock(&db->mu);
    for (;;) {
        while (db->wq == NULL && !(db->closing && db->readers == 0)) {
            pthread_cond_wait(&db->wcond, &db->mu);
        }
        if (db->wq == NULL) {
            break;
        }
        n = 0;
        while (n < db->batch_max) {
            j = queue_pop(&db->wq, &db->wq_tail);
            if (j == NULL) {
                break;
            }
            pthread_mutex_unlock(&db->mu);
            if (j->op == LSQLITE_OP_OPEN) {
                char *msg = NULL;
                int   rc = conn_open(&c, db, 0, &msg);

                if (rc != SQLITE_OK) {
                    job_fail(j, rc, msg);
                    free(msg);
                }
                pthread_mutex_lock(&db->mu);
                db->open_ok = rc == SQLITE_OK;
                pthread_mutex_unlock(&db->mu);
                post_one(j);
            } else if (c.h == NULL) {
                job_fail(j, SQLITE_CANTOPEN, "database is not open");
                post_one(j);
            } else if (j->op == LSQLITE_OP_BEGIN) {
                /* An interactive transaction gets a batch of its own:
                 * the jobs before it are committed first, and its batch
                 * ends (commits) as soon as it does. In a shared batch,
                 * their acknowledgement would wait for its round trips
                 * through Lua (up to tx_timeout when it idles), and its
                 * COMMIT for those of a transaction begun behind it. The
                 * jobs queued meanwhile group-commit in the next batch. */
                batch_commit(db, &c, &b);
                batch_run_job(db, &c, &b, j);
                pthread_mutex_lock(&db->mu);
                break;
            } else {
                batch_run_job(db, &c, &b, j);
                n++;
            }
            pthread_mutex_lock(&db->mu);
        }
        pthread_mutex_unlock(&db->mu);
        if (c.h != NULL) {
            batch_commit(db, &c, &b);
        }
        pthread_mutex_lock(&db->mu);
    }
    pthread_mutex_unlock(&db->mu);
    conn_close(&c);
    db_unref(db);
    return NULL;
}

/* ------------------------------------------------- backup (a reader) */

/*
 * h:backup(path): a consistent copy of the database, taken while the
 * writer goes on writing. It runs on a reader thread, never the loop:
 * copying a big store takes seconds of I/O, which would stop the worker
 * (an app may call it from a task); that reader serves no other read
 * meanwhile, the other readers and inline reads do.
 *
 * The copy is SQLite's online backup (sqlite3_backup_*) from the
 * reader's read-only connection, in one step: a single read transaction,
 * so the copy is the database as one snapshot, the committed pages still
 * in the -wal included (the connection reads through the WAL). WAL lets
 * the writer commit meanwhile; in steps, each commit by another
 * connection would restart the copy, forever under a steady write load.
 *
 * It is written to PATH.tmp (made here, mode 0600: a store holds
 * payments; an existing one is refused, another backup may be writing
 * it, unless replace), switched to journal_mode DELETE (one file,
 * no -wal beside it; sql.open switches it back to WAL), checked on a new
 * read-only connection (PRAGMA quick_check), flushed (fsync), and only
 * then renamed to PATH and the folder flushed: PATH is the whole checked
 * copy or is left as it was. Any failure removes PATH.tmp.
 */
static int
backup_fail(struct lsqlite_job *j, int rc, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int
backup_fail(struct lsqlite_job *j, int rc, const char *fmt, ...)
{
    char    msg[1200];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    job_fail(j, rc, msg);
    return -1;
}

/* The tmp file's own journal (a crash of ours mid-copy) goes with it. */
static void
backup_unlink(const char *tmp)
{
    char journal[4216];     /* tmp (at most 4200) and "-journal" */

    unlink(tmp);
    snprintf(journal, sizeof(journal), "%s-journal", tmp);
    unlink(journal);
}

/* Copies c's database into tmp (made empty by the caller). */
static int
backup_copy(struct lsqlite_conn *c, struct lsqlite_db *db,
            struct lsqlite_job *j, const char *tmp)
{
    sqlite3         *dh = NULL;
    sqlite3_backup  *b;
    int              rc, frc;
    double           deadline = gw_loop_mono_fresh() + db->busy_ms / 1000.0;
    struct timespec  pause = { 0, 0 };

    rc = sqlite3_open_v2(tmp, &dh, SQLITE_OPEN_READWRITE
                         | SQLITE_OPEN_NOMUTEX, NULL);
    if (rc != SQLITE_OK) {
        goto fail_dest;
    }
    /* its commit needs no fsync of its own: the file is flushed whole
     * before the rename, and a failure discards it */
    sqlite3_exec(dh, "PRAGMA synchronous=OFF", NULL, NULL, NULL);
    b = sqlite3_backup_init(dh, "main", c->h, "main");
    if (b == NULL) {
        rc = sqlite3_errcode(dh);
        goto fail_dest;
    }
    for (;;) {
        rc = sqlite3_backup_step(b, -1);
        /* (BUSY: another process recovering the WAL index, say; as any
         * wait for a lock, within busy_timeout) */
        if (((rc & 0xff) != SQLITE_BUSY && (rc & 0xff) != SQLITE_LOCKED)
            || gw_loop_mono_fresh() >= deadline)
        {
            break;
        }
        pause.tv_nsec = 1000000L + (long)(random() % 9000000L);
        nanosleep(&pause, NULL);
    }
    j->pages = sqlite3_backup_pagecount(b);
    frc = sqlite3_backup_finish(b);
    if (rc != SQLITE_DONE) {
        /* finish leaves the step's error on dh (a read error of the
         * source's included) */
        rc = frc != SQLITE_OK ? frc : rc;
        goto fail_dest;
    }
    /* the source's header says WAL: the copy is one file instead */
    rc = sqlite3_exec(dh, "PRAGMA journal_mode=DELETE", NULL, NULL, NULL);
    if (rc != SQLITE_OK) {
        goto fail_dest;
    }
    rc = sqlite3_close(dh);
    dh = NULL;
    if (rc != SQLITE_OK) {
        return backup_fail(j, rc, "backup: closing %s: %s", tmp,
                           sqlite3_errstr(rc));
    }
    return 0;
fail_dest:
    backup_fail(j, rc & 0xff, "backup: copying into %s: %s", tmp,
                dh != NULL ? sqlite3_errmsg(dh) : sqlite3_errstr(rc));
    j->xrc = dh != NULL ? sqlite3_extended_errcode(dh) : rc;
    sqlite3_close(dh);
    return -1;
}

/* Opens the copy read-only: quick_check, then its page count and size. */
static int
backup_check(struct lsqlite_job *j, const char *tmp)
{
    sqlite3      *h = NULL;
    sqlite3_stmt *st = NULL;
    int           rc;
    char          first[512] = "";

    rc = sqlite3_open_v2(tmp, &h, SQLITE_OPEN_READONLY | SQLITE_OPEN_NOMUTEX,
                         NULL);
    if (rc == SQLITE_OK) {
        rc = sqlite3_prepare_v2(h, "PRAGMA quick_check(1)", -1, &st, NULL);
    }
    if (rc == SQLITE_OK) {
        rc = sqlite3_step(st);
        if (rc == SQLITE_ROW) {
            const unsigned char *t = sqlite3_column_text(st, 0);

            snprintf(first, sizeof(first), "%s", t != NULL ? (char *) t : "");
            rc = SQLITE_OK;
        }
        sqlite3_finalize(st);
        st = NULL;
    }
    if (rc != SQLITE_OK) {
        backup_fail(j, rc & 0xff, "backup: checking %s: %s", tmp,
                    h != NULL ? sqlite3_errmsg(h) : sqlite3_errstr(rc));
        sqlite3_close(h);
        return -1;
    }
    if (strcmp(first, "ok") != 0) {
        sqlite3_close(h);
        return backup_fail(j, SQLITE_CORRUPT, "backup: the copy fails "
                           "quick_check (the source store may be damaged:"
                           " PRAGMA integrity_check on it): %s", first);
    }
    if (sqlite3_prepare_v2(h, "PRAGMA page_size", -1, &st, NULL) == SQLITE_OK
        && sqlite3_step(st) == SQLITE_ROW)
    {
        j->page_size = sqlite3_column_int64(st, 0);
    }
    sqlite3_finalize(st);
    if (sqlite3_prepare_v2(h, "PRAGMA page_count", -1, &st, NULL)
        == SQLITE_OK && sqlite3_step(st) == SQLITE_ROW)
    {
        j->pages = sqlite3_column_int64(st, 0);
    }
    sqlite3_finalize(st);
    sqlite3_close(h);
    return 0;
}

/* 1 when path is the store's file or one of its -wal, -shm, -journal:
 * replacing it (or removing it as a stale PATH.tmp) would destroy the
 * live store. */
/* 1 when paths a and b name the same entry of the same folder (the
 * folders compared by inode, the last parts by name): for files that need
 * not exist yet. */
static int
backup_same_name(const char *a, const char *b)
{
    const char  *sa = strrchr(a, '/'), *sb = strrchr(b, '/');
    const char  *na = sa != NULL ? sa + 1 : a, *nb = sb != NULL ? sb + 1 : b;
    char         da[4200], dbuf[4200];
    struct stat  x, y;

    if (strcmp(na, nb) != 0) {
        return 0;
    }
    snprintf(da, sizeof(da), "%.*s", sa == NULL ? 1 : sa == a ? 1
             : (int) (sa - a), sa == NULL ? "." : a);
    snprintf(dbuf, sizeof(dbuf), "%.*s", sb == NULL ? 1 : sb == b ? 1
             : (int) (sb - b), sb == NULL ? "." : b);
    return stat(da, &x) == 0 && stat(dbuf, &y) == 0 && x.st_dev == y.st_dev
           && x.st_ino == y.st_ino;
}

static int
backup_is_store(struct lsqlite_db *db, const char *path)
{
    static const char *const sfx[] = { "", "-wal", "-shm", "-journal",
                                       "-turn" };
    char        p[4200];
    struct stat a, b;
    size_t      i;
    int         exists = stat(path, &a) == 0;

    for (i = 0; i < sizeof(sfx) / sizeof(sfx[0]); i++) {
        snprintf(p, sizeof(p), "%s%s", db->path, sfx[i]);
        /* an existing file by inode (another name, a link); by name too:
         * a store in WAL mode has no -journal, and a copy written there
         * would be taken for a hot journal at the store's next open and
         * removed (the backup lost) */
        if ((exists && stat(p, &b) == 0 && a.st_dev == b.st_dev
             && a.st_ino == b.st_ino)
            || backup_same_name(path, p))
        {
            return 1;
        }
    }
    return 0;
}

static void
run_backup(struct lsqlite_conn *c, struct lsqlite_db *db,
           struct lsqlite_job *j)
{
    const char  *path = j->sql;
    char         tmp[4200];
    int          fd, err;
    struct stat  sb, other;

    if (snprintf(tmp, sizeof(tmp), "%s.tmp", path) >= (int) sizeof(tmp)) {
        backup_fail(j, SQLITE_CANTOPEN, "backup: path too long");
        return;
    }
    if (backup_is_store(db, path) || backup_is_store(db, tmp)) {
        backup_fail(j, SQLITE_CANTOPEN, "backup: %s is the store being "
                    "copied (or its -wal, -shm, -journal): give another "
                    "path", backup_is_store(db, path) ? path : tmp);
        return;
    }
    if (!j->replace && lstat(path, &other) == 0) {
        backup_fail(j, SQLITE_CANTOPEN, "backup: %s exists (not replaced)",
                    path);
        return;
    }
    fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0 && errno == EEXIST && j->replace) {
        backup_unlink(tmp);
        fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    }
    if (fd < 0) {
        err = errno;
        backup_fail(j, SQLITE_CANTOPEN, "backup: cannot make %s: %s%s", tmp,
                    strerror(err), err == EEXIST ? " (another backup "
                    "writing it, or one interrupted: remove it, or "
                    "replace it)" : "");
        return;
    }
    close(fd);
    if (backup_copy(c, db, j, tmp) != 0 || backup_check(j, tmp) != 0) {
        backup_unlink(tmp);
        return;
    }
    fd = open(tmp, O_RDONLY | O_CLOEXEC);
    err = fd < 0 ? errno : 0;
    if (err == 0 && (fsync(fd) != 0 || fstat(fd, &sb) != 0)) {
        err = errno;
    }
    if (fd >= 0) {
        close(fd);
    }
    /* (checked again: made meanwhile, by another backup say) */
    if (err == 0 && !j->replace && lstat(path, &other) == 0) {
        backup_unlink(tmp);
        backup_fail(j, SQLITE_CANTOPEN, "backup: %s exists (not replaced)",
                    path);
        return;
    }
    if (err == 0) {
        j->bytes = (int64_t) sb.st_size;
    }
    if (err == 0 && rename(tmp, path) != 0) {
        err = errno;
    }
    if (err != 0) {
        backup_unlink(tmp);
        backup_fail(j, SQLITE_IOERR, "backup: writing %s: %s", path,
                    strerror(err));
        return;
    }
    gw_fsync_parent(path);          /* the rename itself, durable */
}

/* ------------------------------------------------------- reader threads */

static void *
reader_main(void *arg)
{
    struct lsqlite_db   *db = arg;
    struct lsqlite_conn  c;
    struct lsqlite_job  *j;
    sqlite3_stmt      *st;

    memset(&c, 0, sizeof(c));
    pthread_mutex_lock(&db->mu);
    for (;;) {
        while (db->rq == NULL && !db->closing) {
            pthread_cond_wait(&db->rcond, &db->mu);
        }
        j = queue_pop(&db->rq, &db->rq_tail);
        if (j == NULL) {
            break;
        }
        pthread_mutex_unlock(&db->mu);
        if (c.h == NULL) {
            char *msg = NULL;
            int   rc = conn_open(&c, db, 1, &msg);

            if (rc != SQLITE_OK) {
                job_fail(j, rc, msg);
                free(msg);
                post_one(j);
                pthread_mutex_lock(&db->mu);
                continue;
            }
        }
        if (j->op == LSQLITE_OP_BACKUP) {
            run_backup(&c, db, j);
            post_one(j);
            pthread_mutex_lock(&db->mu);
            continue;
        }
        st = stmt_get(&c, j);
        if (st != NULL && !sqlite3_stmt_readonly(st)) {
            /* A query that writes (INSERT ... RETURNING): the writer
             * runs it, durably, like an exec. */
            pthread_mutex_lock(&db->mu);
            queue_push(&db->wq, &db->wq_tail, j);
            pthread_cond_signal(&db->wcond);
            continue;
        }
        if (st != NULL) {
            run_stmt(&c, j);
        }
        post_one(j);
        pthread_mutex_lock(&db->mu);
    }
    db->readers--;
    pthread_cond_signal(&db->wcond);     /* the writer may leave now */
    pthread_mutex_unlock(&db->mu);
    conn_close(&c);
    db_unref(db);
    return NULL;
}

/* ---------------------------------------------- open transactions (loop) */

/* Frees tx (NULL-safe) and drops its db reference. */
static void
tx_free(struct gw_store_tx *tx)
{
    struct lsqlite_db *db;

    if (tx == NULL) {
        return;
    }
    db = tx->owner;
    gw_store_tx_free(tx);
    db_unref(db);
}

/* Queues a ROLLBACK of txid that no coroutine waits for (its delivery
 * just frees it). Nothing to do when the transaction already ended. */
static void
tx_rollback_orphan(struct lsqlite_db *db, long txid)
{
    struct lsqlite_job *j = calloc(1, sizeof(*j));

    if (j == NULL) {
        gw_log(GW_LOG_ERROR, "sqlite: no memory to roll back abandoned"
               " transaction %ld (tx_timeout will)", txid);
        return;
    }
    j->op = LSQLITE_OP_ROLLBACK;
    j->db = db;
    j->made = gw_loop_mono();
    j->txid = txid;
    pthread_mutex_lock(&db->mu);
    if (db->active_tx == txid) {
        queue_push(&db->txq, &db->txq_tail, j);
        pthread_cond_signal(&db->wcond);
        j = NULL;
    }
    pthread_mutex_unlock(&db->mu);
    job_free(j);
}

/* struct gw_store_tx rollback: the coroutine that began tx ended without
 * COMMIT or ROLLBACK. Runs on the loop thread, maybe inside another
 * coroutine: only queues work, wakes nobody. */
static void
tx_abandon(struct gw_store_tx *tx)
{
    if (tx->state == LSQLITE_TX_PENDING) {
        tx->state = LSQLITE_TX_ABANDONED;  /* tx_begin_delivered() ends it */
        return;
    }
    tx_rollback_orphan(tx->owner, tx->id);
    tx_free(tx);
}

/* Delivery of a BEGIN job (loop thread), before its coroutine runs. */
static void
tx_begin_delivered(struct lsqlite_job *j)
{
    struct gw_store_tx *tx = gw_store_tx_find(j->db, j->txid);

    if (tx == NULL) {
        return;
    }
    if (j->rc != SQLITE_OK) {
        tx_free(tx);                     /* never began */
    } else if (tx->state == LSQLITE_TX_ABANDONED) {
        tx_rollback_orphan(tx->owner, tx->id);
        tx_free(tx);
    } else {
        tx->state = LSQLITE_TX_ACTIVE;
    }
}

/* ----------------------------------------------------------- Lua side */

static struct lsqlite_db *
check_db(lua_State *L)
{
    struct lsqlite_ud *ud = gw_checkudata(L, 1, LSQLITE_MT);

    if (ud->db == NULL) {
        luaL_error(L, "sqlite: database is closed");
    }
    return ud->db;
}

/* Reading a statement's parameters can run Lua (a metamethod of the
 * params table, a finalizer run by an allocation), and that Lua can close
 * the handle, after which db may be freed. Called after the job is built
 * and before db is used: a handle closed meanwhile frees the job and
 * raises as check_db does. */
static void
recheck_db(lua_State *L, struct lsqlite_db *db, struct lsqlite_job *j)
{
    struct lsqlite_ud *ud = lua_touserdata(L, 1);

    if (ud == NULL || ud->db != db) {
        job_free(j);
        luaL_error(L, "sqlite: database is closed");
    }
}

static struct lsqlite_job *
job_new(lua_State *L, struct lsqlite_db *db, enum lsqlite_op op)
{
    struct lsqlite_job *j = calloc(1, sizeof(*j));

    if (j == NULL) {
        return NULL;
    }
    j->op = op;
    j->db = db;
    j->made = gw_loop_mono();       /* (the loop's time: job_new runs there) */
    return j;
}

enum lsqlite_queue { LSQLITE_Q_WRITER, LSQLITE_Q_TX, LSQLITE_Q_READER };

/*
 * The writer is woken once per loop turn, not once per job. A turn of the
 * loop often runs many requests, each queueing a write; woken by the
 * first, the writer (which on a machine with few cores shares one with
 * the loop) would start a batch of one, commit it, and the others would
 * wait for the next fsync. Instead the first job of a turn puts its
 * database on wake_list and makes wake_ev active: libevent runs it after
 * the turn's other active events, and it wakes each listed writer then,
 * with all of the turn's jobs queued: one batch, one commit. Transactions'
 * statements and reads are not deferred (a transaction holds the writer
 * between its round trips; a read's result is awaited).
 */
static struct lsqlite_db **wake_list;   /* loop thread only */
static int                 wake_n, wake_cap;
static struct event       *wake_ev;
static struct event_base  *wake_base;  /* wake_ev's: a process that made
                                          a new loop (a forked worker)
                                          makes a new wake_ev */

static void
wake_writers(evutil_socket_t fd, short what, void *arg)
{
    int i, n = wake_n;

    wake_n = 0;
    for (i = 0; i < n; i++) {
        struct lsqlite_db *db = wake_list[i];

        pthread_mutex_lock(&db->mu);
        db->wake_deferred = 0;
        pthread_cond_signal(&db->wcond);
        pthread_mutex_unlock(&db->mu);
        db_unref(db);                 /* taken by wake_writer() */
    }
}

/* With db->mu held: wakes the writer at the end of this loop turn, or
 * now when that cannot be arranged. */
static void
wake_writer(struct lsqlite_db *db)
{
    if (db->wake_deferred) {
        return;
    }
    if (wake_ev == NULL || wake_base != gw_loop_base()) {
        /* (one left on a forgotten loop is left alone, like the loop;
         * the dbs listed stay listed: the new event wakes them all) */
        wake_base = gw_loop_base();
        wake_ev = event_new(wake_base, -1, 0, wake_writers, NULL);
    }
    if (wake_n == wake_cap) {
        int cap = wake_cap ? wake_cap * 2 : 8;
        struct lsqlite_db **l = realloc(wake_list, cap * sizeof(*l));

        if (l != NULL) {
            wake_list = l;
            wake_cap = cap;
        }
    }
    if (wake_ev == NULL || wake_n == wake_cap) {
        pthread_cond_signal(&db->wcond);
        return;
    }
    db->refs++;                       /* dropped by wake_writers() */
    db->wake_deferred = 1;
    wake_list[wake_n++] = db;
    event_active(wake_ev, EV_READ, 0);
}

/* Queues j and yields until it is delivered. Frees j on failure. */
static int
submit(lua_State *L, struct lsqlite_job *j, enum lsqlite_queue q)
{
    struct lsqlite_db *db = j->db;

    j->co = gw_co_current(L);
    if (!lua_isyieldable(L)) {
        /* gw_co_wait() would raise after j was queued: a write would be
         * committed under a caller told that it raised. Nothing queued,
         * the same error (gw_co_wait's). */
        job_free(j);
        return gw_co_unyieldable(L);
    }
    pthread_mutex_lock(&db->mu);
    if (q == LSQLITE_Q_TX) {
        if (db->active_tx != j->txid) {
            pthread_mutex_unlock(&db->mu);
            job_free(j);
            return gw_push_error(L, "timeout", 1, "sqlite: transaction is no"
                                 " longer active (rolled back after %d ms"
                                 " idle, or already ended)",
                                 db->tx_timeout_ms);
        }
        queue_push(&db->txq, &db->txq_tail, j);
        pthread_cond_signal(&db->wcond);
    } else if (q == LSQLITE_Q_READER) {
        queue_push(&db->rq, &db->rq_tail, j);
        pthread_cond_signal(&db->rcond);
    } else {
        queue_push(&db->wq, &db->wq_tail, j);
        wake_writer(db);
    }
    pthread_mutex_unlock(&db->mu);
    return gw_co_wait(L, job_cancel, j);
}

/* The process's pid, read once per process: the loop thread compares it
 * on every inline read (is db->inl this process's, or the parent's from
 * before a fork?), and getpid() is a system call each time. A fork
 * clears it in the child (pthread_atfork, registered at the first open). */
static pid_t          self_pid_v;
static pthread_once_t self_pid_once = PTHREAD_ONCE_INIT;

static void
self_pid_forget(void)
{
    self_pid_v = 0;
}

static void
self_pid_register(void)
{
    if (pthread_atfork(NULL, NULL, self_pid_forget) != 0) {
        self_pid_v = -1;            /* never cached: getpid() each time */
    }
}

static pid_t
self_pid(void)
{
    if (self_pid_v > 0) {
        return self_pid_v;
    }
    if (self_pid_v < 0) {
        return getpid();
    }
    return self_pid_v = getpid();
}

/*
 * core.open(path, opts) -> handle (threads started; then h:connect())
 * opts: readers, batch_max, busy_timeout (ms), tx_timeout (ms),
 * synchronous (0..3, default 2 = FULL), checkpoint_pages (the WAL's
 * pages after which a commit copies them into the database: SQLite's
 * wal_autocheckpoint, default LSQLITE_CKPT_PAGES), cache_mib (the
 * writer's page cache, PRAGMA cache_size, default LSQLITE_CACHE_MIB).
 */
static int
lsqlite_open(lua_State *L)
{
    const char       *path = luaL_checkstring(L, 1);
    struct lsqlite_ud  *ud;
    struct lsqlite_db  *db;
    pthread_t         tid;
    int               i, nreaders, batch_max, busy_ms, tx_ms, sync;
    int               inline_us, ckpt_pages, cache_mib;

    /* Checked first: raising must not leak what is allocated below. */
    gw_store_sql_opts_check(L, 2);   /* both engines' options */
    gw_store_opt_int(L, 2, "sql.open", "retries", 5, 1, INT_MAX);
    nreaders = gw_store_opt_int(L, 2, "sql.open", "readers",
                                LSQLITE_READERS, 1, LSQLITE_MAX_READERS);
    batch_max = gw_store_opt_int(L, 2, "sql.open", "batch_max",
                                 LSQLITE_BATCH_MAX, 1, INT_MAX);
    busy_ms = gw_store_opt_int(L, 2, "sql.open", "busy_timeout", 5000, 0,
                               INT_MAX);
    tx_ms = gw_store_opt_int(L, 2, "sql.open", "tx_timeout", 30000, 1,
                             INT_MAX);
    sync = gw_store_opt_int(L, 2, "sql.open", "synchronous", 2, 0, 3);
    inline_us = gw_store_opt_int(L, 2, "sql.open", "inline_reads",
                                 LSQLITE_INLINE_US, 0, 1000000);
    ckpt_pages = gw_store_opt_int(L, 2, "sql.open", "checkpoint_pages",
                                  LSQLITE_CKPT_PAGES, 1, 1000000);
    cache_mib = gw_store_opt_int(L, 2, "sql.open", "cache_mib",
                                 LSQLITE_CACHE_MIB, 1, 65536);
    pthread_once(&self_pid_once, self_pid_register);
    db = calloc(1, sizeof(*db));
    if (db == NULL) {
        return gw_push_error(L, "unavailable", 0, "sqlite: out of memory");
    }
    pthread_mutex_init(&db->mu, NULL);
    {
        /* the writer's idle deadline must not move with the wall clock */
        pthread_condattr_t ca;

        pthread_condattr_init(&ca);
        pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
        pthread_cond_init(&db->wcond, &ca);
        pthread_condattr_destroy(&ca);
    }
    pthread_cond_init(&db->rcond, NULL);
    db->refs = 1;
    db->path = strdup(path);
    db->nreaders = nreaders;
    db->batch_max = batch_max;
    db->busy_ms = busy_ms;
    db->tx_timeout_ms = tx_ms;
    db->synchronous = sync;
    db->inline_us = inline_us;
    db->ckpt_pages = ckpt_pages;
    db->cache_mib = cache_mib;
    ud = lua_newuserdata(L, sizeof(*ud));
    ud->db = db;                         /* __gc now owns our reference */
    luaL_getmetatable(L, LSQLITE_MT);
    lua_setmetatable(L, -2);
    lua_createtable(L, 0, 0);           /* inline reads' column names */
    lua_setfenv(L, -2);
    if (db->path == NULL) {
        return gw_push_error(L, "unavailable", 0, "sqlite: out of memory");
    }
    for (i = 0; i < 1 + db->nreaders; i++) {
        pthread_attr_t attr;
        int            rc;

        pthread_mutex_lock(&db->mu);
        db->refs++;
        db->readers += i > 0;
        pthread_mutex_unlock(&db->mu);
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        rc = pthread_create(&tid, &attr, i == 0 ? writer_main : reader_main,
                            db);
        pthread_attr_destroy(&attr);
        if (rc != 0) {
            pthread_mutex_lock(&db->mu);
            db->readers -= i > 0;
            pthread_mutex_unlock(&db->mu);
            db_unref(db);
            return gw_push_error(L, "unavailable", 0, "sqlite: cannot start"
                                 " a thread: %s", strerror(rc));
        }
    }
    return 1;
}

/* h:connect() -> true | nil, err   (yields until the writer opened the
 * file and set WAL mode; call once, right after core.open) */
static int
lsqlite_connect(lua_State *L)
{
    struct lsqlite_db  *db = check_db(L);
    struct lsqlite_job *j;

    gw_co_current(L);
    j = job_new(L, db, LSQLITE_OP_OPEN);
    if (j == NULL) {
        return gw_push_error(L, "unavailable", 0, "sqlite: out of memory");
    }
    return submit(L, j, LSQLITE_Q_WRITER);
}

static int
lsqlite_gc(lua_State *L)
{
    struct lsqlite_ud *ud = gw_testudata(L, 1, LSQLITE_MT);
    struct lsqlite_db *db = ud != NULL ? ud->db : NULL;

    if (db == NULL) {
        return 0;                   /* closed, or not ours (gw_testudata) */
    }
    ud->db = NULL;
    if (db->inl_running) {
        db->inl_closed = 1;         /* by Lua an inline read ran: that
                                       read, stepping on it, closes it */
    } else if (db->inl.h != NULL && db->inl_pid == self_pid()) {
        conn_close(&db->inl);       /* the loop thread's: closed here */
    }
    pthread_mutex_lock(&db->mu);
    db->closing = 1;
    pthread_cond_broadcast(&db->wcond);
    pthread_cond_broadcast(&db->rcond);
    pthread_mutex_unlock(&db->mu);
    if (!db->inl_closed) {
        db_unref(db);               /* else the inline read's to drop */
    }
    return 0;
}


/* nil, err (misuse) for SQL with a NUL byte (nothing ran). Returns 2. */
static int
push_sql_nul(lua_State *L)
{
    gw_push_error(L, "misuse", 0, "sqlite: the SQL has a NUL byte in it "
                  "(the statement would end there)");
    lua_pushinteger(L, SQLITE_MISUSE);
    lua_setfield(L, -2, "code");
    return 2;
}

static struct lsqlite_job *
stmt_job(lua_State *L, struct lsqlite_db *db, int sql_idx, int params_idx,
         enum lsqlite_op op)
{
    const char       *sql = luaL_checkstring(L, sql_idx);
    struct lsqlite_job *j;
    struct gw_store_val   *params = NULL;
    int               nparams = 0;

    gw_co_current(L);
    /* May raise on a value that cannot be bound: before any allocation. */
    if (params_idx > 0
        && gw_store_vals_from_lua(L, params_idx, &params, &nparams) != GW_OK)
    {
        return NULL;
    }
    j = job_new(L, db, op);
    if (j == NULL) {
        free(params);
        return NULL;
    }
    j->params = params;
    j->nparams = nparams;
    j->sql = strdup(sql);
    if (j->sql == NULL) {
        job_free(j);
        return NULL;
    }
    return j;
}

/* h:exec(sql, params) -> { changes, last_id [, rows] } | nil, err */
static int
lsqlite_exec(lua_State *L)
{
    struct lsqlite_db  *db = check_db(L);
    struct lsqlite_job *j;

    if (gw_store_sql_has_nul(L, 2)) {
        gw_co_current(L);
        return push_sql_nul(L);
    }
    j = stmt_job(L, db, 2, 3, LSQLITE_OP_STMT);
    if (j == NULL) {
        return gw_push_error(L, "unavailable", 0, "sqlite: out of memory");
    }
    recheck_db(L, db, j);
    return submit(L, j, LSQLITE_Q_WRITER);
}

/* ------------------------------------------- inline reads (loop thread) */

/* The progress handler of the inline connection: non-zero interrupts the
 * statement (SQLITE_INTERRUPT) once the read is past its deadline. */
static int
inline_progress(void *arg)
{
    struct lsqlite_db *db = arg;

    return gw_loop_mono_fresh() > db->inl_deadline;
}

/* The loop thread's read-only connection, opened on first use; NULL when
 * inline reads are off or it cannot be opened (then the readers serve). */
static struct lsqlite_conn *
inline_conn(struct lsqlite_db *db)
{
    char *msg = NULL;

    if (db->inline_us == 0 || db->inl_off) {
        return NULL;
    }
    if (db->inl.h != NULL && db->inl_pid == self_pid()) {
        return &db->inl;
    }
    /* none yet, or the parent's before a fork: never used here */
    memset(&db->inl, 0, sizeof(db->inl));
    if (conn_open(&db->inl, db, 1, &msg) != SQLITE_OK) {
        free(msg);
        db->inl_off = 1;
        return NULL;
    }
    sqlite3_busy_timeout(db->inl.h, 0);      /* the loop never waits */
    sqlite3_progress_handler(db->inl.h, INLINE_STEPS, inline_progress, db);
    db->inl_pid = self_pid();
    return &db->inl;
}

/* Inline reads in this loop turn (gw_loop_turn(): each wakeup by the
 * loop renews it; paygate.update_time() does not, so a coroutine that
 * refreshes the time as it reads in a loop still runs out of budget and
 * yields). Loop thread only. */
static unsigned long inl_turn;
static int           inl_turn_set;     /* inl_turn holds a turn */
static double        inl_spent;        /* s */

/* j's results as before it ran (its SQL and parameters kept). */
static void
job_unrun(struct lsqlite_job *j)
{
    free(j->errmsg);
    cols_free(j);
    gw_store_vals_free(j->cells, j->nrows * j->ncols);
    j->errmsg = NULL;
    j->cols = NULL;
    j->cells = NULL;
    j->rc = j->xrc = j->at_prepare = 0;
    j->changes = j->last_id = 0;
    j->ncols = j->nrows = j->cap = 0;
}

/* What inline_read() hands inline_read_run() through lua_pcall. */
struct inline_run {
    struct lsqlite_conn *c;
    struct lsqlite_job  *j;
    unsigned             slot;
};

/* Under inline_read()'s lua_pcall: (inline_run as a light userdata, the
 * handle) -> the rows table (with the outcome in j). */
static int
inline_read_run(lua_State *L)
{
    struct inline_run *ir = lua_touserdata(L, 1);
    struct lua_rows    lr = { L, 0, 0, 0, 0, &ir->c->cache, ir->slot };

    lua_getfenv(L, 2);                  /* the names of each statement */
    lr.cache = lua_istable(L, -1) ? lua_gettop(L) : 0;
    lua_createtable(L, 1, 0);           /* most reads: one row or none */
    lr.rows = lua_gettop(L);
    run_stmt_rows(ir->c, ir->j, &lr);
    lua_settop(L, lr.rows);             /* the names go */
    return 1;
}

/* Runs the query j on the loop thread within the budget, its rows made
 * straight into Lua (inline_read_run, at stack index run). Returns how
 * many results it pushed on L (the rows, or nil and j's own error), 0
 * when a reader must run it (over budget, a lock, a statement that
 * writes; nothing pushed), -1 when making the rows raised (no memory, a
 * finalizer's error: the error is on top, the statement reset). */
static int
inline_read(lua_State *L, int run, struct lsqlite_db *db,
            struct lsqlite_job *j)
{
    struct lsqlite_conn *c = inline_conn(db);
    sqlite3_stmt        *st;
    unsigned             slot;
    int                  rc, ran = 0;
    double               t0;

    if (c == NULL || db->inl_running) {
        /* inl_running: a read called while an inline read makes its rows
         * (a task a finalizer started, when paygate.spawn ran it at once
         * there; it now waits for the next loop turn): its statement is
         * between two steps, and this read would reset it (the same SQL)
         * or finalize it (another of its cache slot) under it. A reader
         * serves. */
        return 0;
    }
    if (!inl_turn_set || gw_loop_turn() != inl_turn) {
        inl_turn = gw_loop_turn();
        inl_turn_set = 1;
        inl_spent = 0;
    }
    if (inl_spent >= INLINE_TURN * db->inline_us / 1e6) {
        return 0;                   /* enough for this turn: yield */
    }
    slot = job_slot(j);
    if (c->cache.skip[slot] > 0 && c->cache.sql[slot] != NULL
        && strcmp(c->cache.sql[slot], j->sql) == 0)
    {
        c->cache.skip[slot]--;      /* over budget lately: readers */
        return 0;
    }
    /* Preparing is not budgeted: interrupted, a first prepare (which
     * loads the schema) would fail the same way every time. */
    db->inl_deadline = HUGE_VAL;
    st = stmt_get(c, j);
    if (st != NULL && (!sqlite3_stmt_readonly(st) || c->cache.cfg[slot])) {
        return 0;                   /* a write (a reader hands it to the
                                       writer), or connection settings */
    }
    if (st == NULL) {
        rc = j->rc;                 /* prepare failed */
    } else {
        double            took;
        struct inline_run ir = { c, j, slot };

        t0 = gw_loop_mono_fresh();
        db->inl_deadline = t0 + db->inline_us / 1e6;
        lua_pushvalue(L, run);
        lua_pushlightuserdata(L, &ir);
        lua_pushvalue(L, 1);
        db->inl_running = 1;
        rc = lua_pcall(L, 2, 1, 0);
        db->inl_running = 0;
        if (rc != 0) {
            /* raised between two steps: run_stmt_rows() did not end the
             * statement, and left running it would hold its snapshot
             * (the next read on this connection would see old data) */
            sqlite3_reset(st);
            sqlite3_clear_bindings(st);
        }
        if (db->inl_closed) {
            /* a finalizer the making of the rows ran closed the handle:
             * what lsqlite_gc() left to us, and db is gone after */
            conn_close(&db->inl);
            db_unref(db);
            if (rc == 0) {
                lua_pop(L, 1);
                lua_pushliteral(L, "sqlite: database is closed");
            }
            return -1;
        }
        if (rc != 0) {
            return -1;
        }
        ran = 1;
        rc = j->rc;
        took = gw_loop_mono_fresh() - t0;
        inl_spent += took;
        if (rc == SQLITE_INTERRUPT) {
            /* What was cut short may be a reload of the schema (after
             * DDL): finalized, the statement is prepared again next time,
             * which loads the schema without a budget. Cut short twice
             * in a row, the query itself is slow. */
            sqlite3_finalize(c->cache.st[slot]);
            c->cache.st[slot] = NULL;
            if (c->cache.strike[slot]) {
                c->cache.strike[slot] = 0;
                c->cache.skip[slot] = INLINE_SKIPS;
            } else {
                c->cache.strike[slot] = 1;
            }
        } else if (took > db->inline_us / 1e6) {
            c->cache.skip[slot] = INLINE_SKIPS;  /* slow in one step */
        } else {
            c->cache.strike[slot] = 0;
        }
    }
    if (rc == SQLITE_INTERRUPT || rc == SQLITE_BUSY || rc == SQLITE_LOCKED) {
        if (ran) {
            lua_pop(L, 1);              /* the rows made before the cut */
        }
        job_unrun(j);
        db->reads_moved++;
        return 0;
    }
    db->reads_inline++;
    if (rc != SQLITE_OK) {
        if (ran) {
            lua_pop(L, 1);
        }
        return push_job_error(L, j);
    }
    return 1;
}

/* h:query(sql, params) -> rows | nil, err   (inline, or a reader) */
static int
lsqlite_query(lua_State *L)
{
    struct lsqlite_db  *db = check_db(L);
    struct lsqlite_job *j;

    if (gw_store_sql_has_nul(L, 2)) {
        gw_co_current(L);
        return push_sql_nul(L);
    }
    j = stmt_job(L, db, 2, 3, LSQLITE_OP_STMT);
    if (j == NULL) {
        return gw_push_error(L, "unavailable", 0, "sqlite: out of memory");
    }
    recheck_db(L, db, j);
    j->want_rows = 1;
    if (lua_isyieldable(L)) {
        int n = inline_read(L, lua_upvalueindex(1), db, j);

        if (n != 0) {
            job_free(j);
            return n > 0 ? n : lua_error(L);
        }
    }
    db->reads_reader++;
    return submit(L, j, LSQLITE_Q_READER);
}

/* h:script(sql) -> true | nil, err   (several statements, one savepoint) */
static int
lsqlite_script(lua_State *L)
{
    struct lsqlite_db  *db = check_db(L);
    struct lsqlite_job *j;

    if (gw_store_sql_has_nul(L, 2)) {
        gw_co_current(L);
        return push_sql_nul(L);
    }
    j = stmt_job(L, db, 2, 0, LSQLITE_OP_SCRIPT);
    if (j == NULL) {
        return gw_push_error(L, "unavailable", 0, "sqlite: out of memory");
    }
    recheck_db(L, db, j);
    return submit(L, j, LSQLITE_Q_WRITER);
}

/* h:atomic's job while its statements are copied, held by a userdata on
 * the Lua stack (LSQLITE_BUILD_MT): reading a statement's params.n or its
 * expect can run Lua (a metamethod, a finalizer run by an allocation),
 * and Lua that raises there leaves the job, and all it copied so far, to
 * this userdata's finalizer instead of leaking it. */
struct lsqlite_build {
    struct lsqlite_job *j;
};

static int
build_gc(lua_State *L)
{
    struct lsqlite_build *bd = gw_testudata(L, 1, LSQLITE_BUILD_MT);

    if (bd != NULL) {
        job_free(bd->j);
        bd->j = NULL;
    }
    return 0;
}

/* Frees the job bd holds now (a refused call leaves nothing allocated) */
static void
build_drop(struct lsqlite_build *bd)
{
    job_free(bd->j);
    bd->j = NULL;
}

/* Frees the ATOMIC job bd holds and raises the misuse fmt names (as
 * luaL_error would: nothing of a refused call may stay allocated). */
static int
atomic_misuse(lua_State *L, struct lsqlite_build *bd, const char *fmt, ...)
{
    va_list ap;

    build_drop(bd);
    luaL_where(L, 1);
    va_start(ap, fmt);
    lua_pushvfstring(L, fmt, ap);
    va_end(ap);
    lua_concat(L, 2);
    return lua_error(L);
}

#define LSQLITE_ATOMIC_MAX 1000   /* statements in one db:atomic() */

/*
 * h:atomic({ { sql, params, expect = n|nil }, ... })
 *   -> { { changes, last_id [, rows] }, ... }
 *    | nil, index, err           (statement index failed: its error)
 *    | nil, index, nil, got      (statement index missed its expect)
 *    | nil, 0, err               (the job as a whole: BEGIN, COMMIT ...)
 * One writer job: its statements run in order in one savepoint of the
 * group commit; it returns once that commit is durable.
 */
static int
lsqlite_atomic(lua_State *L)
{
    struct lsqlite_db   *db = check_db(L);
    struct lsqlite_build *bd;
    struct lsqlite_job  *j;
    int                  i, n, nul_at = 0;

    luaL_checktype(L, 2, LUA_TTABLE);
    gw_co_current(L);
    n = (int)lua_objlen(L, 2);
    if (n < 1 || n > LSQLITE_ATOMIC_MAX) {
        return luaL_error(L, "db:atomic: want 1 to %d statements (got %d)",
                          LSQLITE_ATOMIC_MAX, n);
    }
    /* made before the job: what may raise runs while the job is held */
    bd = lua_newuserdata(L, sizeof(*bd));
    bd->j = NULL;
    luaL_getmetatable(L, LSQLITE_BUILD_MT);
    lua_setmetatable(L, -2);
    j = bd->j = job_new(L, db, LSQLITE_OP_ATOMIC);
    if (j == NULL
        || (j->subs = calloc((size_t)n, sizeof(*j->subs))) == NULL)
    {
        build_drop(bd);
        return gw_push_error(L, "unavailable", 0, "sqlite: out of memory");
    }
    j->nsubs = n;
    /* One pass over the statements: each is checked and copied at once
     * (its parameters by gw_store_vals_copy, which reads and converts
     * each value once); a misuse frees what was copied, then raises. */
    for (i = 1; i <= n; i++) {
        struct lsqlite_job *s = &j->subs[i - 1];
        int                 rc = 0;

        s->op = LSQLITE_OP_STMT;
        s->db = db;
        lua_rawgeti(L, 2, i);
        if (!lua_istable(L, -1)) {
            return atomic_misuse(L, bd, "db:atomic: statement %d must be a"
                                 " table", i);
        }
        lua_rawgeti(L, -1, 1);
        if (lua_type(L, -1) != LUA_TSTRING) {
            return atomic_misuse(L, bd, "db:atomic: statement %d: sql must"
                                 " be a string", i);
        }
        if (nul_at == 0 && gw_store_sql_has_nul(L, -1)) {
            nul_at = i;                  /* refused once all are checked */
        }
        s->sql = strdup(lua_tostring(L, -1));
        lua_rawgeti(L, -2, 2);
        if (!lua_isnil(L, -1)) {
            if (!lua_istable(L, -1)) {
                return atomic_misuse(L, bd, "db:atomic: statement %d: params"
                                     " must be a table", i);
            }
            rc = gw_store_vals_copy(L, -1, &s->params, &s->nparams);
            if (rc == GW_STORE_BAD_N) {
                return atomic_misuse(L, bd, "db:atomic: statement %d:"
                                     " params.n must be a whole number"
                                     " from 0 to %d", i,
                                     GW_STORE_MAX_PARAMS);
            }
            if (rc > 0) {
                lua_rawgeti(L, -1, rc);
                return atomic_misuse(L, bd, "db:atomic: statement %d:"
                                     " params[%d] cannot be bound (a %s)",
                                     i, rc, luaL_typename(L, -1));
            }
        }
        gw_getfield(L, -3, "expect");
        if (!lua_isnil(L, -1) && (!lua_isnumber(L, -1)
                                  || lua_tonumber(L, -1) < 0))
        {
            return atomic_misuse(L, bd, "db:atomic: statement %d: expect"
                                 " must be a count >= 0", i);
        }
        s->expect = lua_isnil(L, -1) ? -1 : (int64_t)lua_tonumber(L, -1);
        lua_pop(L, 4);
        if (s->sql == NULL || rc == GW_STORE_NOMEM) {
            build_drop(bd);
            return gw_push_error(L, "unavailable", 0,
                                 "sqlite: out of memory");
        }
    }
    /* copied: nothing raises past here but recheck_db and submit, which
     * free the job themselves */
    bd->j = NULL;
    lua_pop(L, 1);
    if (nul_at != 0) {
        job_free(j);
        lua_pushnil(L);
        lua_pushinteger(L, nul_at);
        push_sql_nul(L);
        lua_remove(L, -2);               /* push_sql_nul's nil */
        return 3;
    }
    recheck_db(L, db, j);
    return submit(L, j, LSQLITE_Q_WRITER);
}

/* h:begin() -> txid | nil, err */
static int
lsqlite_begin(lua_State *L)
{
    struct lsqlite_db  *db = check_db(L);
    struct gw_co     *co = gw_co_current(L);
    struct lsqlite_job   *j;
    struct gw_store_tx *tx;

    if (!lua_isyieldable(L)) {
        /* gw_co_wait would raise after the BEGIN was queued, leaving a
         * transaction open until this coroutine ends: refuse first. */
        return gw_co_unyieldable(L);
    }
    j = job_new(L, db, LSQLITE_OP_BEGIN);
    if (j == NULL) {
        return gw_push_error(L, "unavailable", 0, "sqlite: out of memory");
    }
    tx = gw_store_tx_new(co, db, tx_abandon);
    if (tx == NULL) {
        job_free(j);
        return gw_push_error(L, "unavailable", 0, "sqlite: out of memory");
    }
    db_ref(db);                          /* dropped by tx_free() */
    tx->state = LSQLITE_TX_PENDING;
    j->txid = tx->id;
    return submit(L, j, LSQLITE_Q_WRITER);
}

static int
tx_stmt(lua_State *L, enum lsqlite_op op, int want_rows)
{
    struct lsqlite_db  *db = check_db(L);
    long              txid = (long)luaL_checknumber(L, 2);
    struct lsqlite_job *j;

    if (!lua_isyieldable(L)) {
        /* before a COMMIT or ROLLBACK lets go of the transaction's record
         * (submit() would refuse it): its coroutine's end rolls it back */
        gw_co_current(L);
        return gw_co_unyieldable(L);
    }
    if ((op == LSQLITE_OP_STMT || op == LSQLITE_OP_SCRIPT)
        && gw_store_sql_has_nul(L, 3))
    {
        gw_co_current(L);
        return push_sql_nul(L);
    }
    if (op == LSQLITE_OP_STMT || op == LSQLITE_OP_SCRIPT) {
        j = stmt_job(L, db, 3, op == LSQLITE_OP_STMT ? 4 : 0, op);
    } else {
        gw_co_current(L);
        j = job_new(L, db, op);
    }
    if (j == NULL) {
        return gw_push_error(L, "unavailable", 0, "sqlite: out of memory");
    }
    recheck_db(L, db, j);
    j->txid = txid;
    j->want_rows = want_rows;
    if (op == LSQLITE_OP_COMMIT || op == LSQLITE_OP_ROLLBACK) {
        /* From here this job ends it, waited for or not. */
        tx_free(gw_store_tx_find(db, txid));
    }
    return submit(L, j, LSQLITE_Q_TX);
}

/* h:tx_exec(txid, sql, params), h:tx_query(txid, sql, params),
 * h:tx_script(txid, sql), h:commit(txid), h:rollback(txid) */
static int
lsqlite_tx_exec(lua_State *L)
{
    return tx_stmt(L, LSQLITE_OP_STMT, 0);
}

static int
lsqlite_tx_query(lua_State *L)
{
    return tx_stmt(L, LSQLITE_OP_STMT, 1);
}

static int
lsqlite_tx_script(lua_State *L)
{
    return tx_stmt(L, LSQLITE_OP_SCRIPT, 0);
}

static int
lsqlite_commit(lua_State *L)
{
    return tx_stmt(L, LSQLITE_OP_COMMIT, 0);
}

static int
lsqlite_rollback(lua_State *L)
{
    return tx_stmt(L, LSQLITE_OP_ROLLBACK, 0);
}

/* h:backup(path [, replace]) -> { pages, page_size, bytes } | nil, err
 * (see run_backup: a reader thread copies; the caller yields) */
static int
lsqlite_backup(lua_State *L)
{
    struct lsqlite_db  *db = check_db(L);
    size_t              len;
    const char         *path = luaL_checklstring(L, 2, &len);
    int                 replace = lua_toboolean(L, 3);
    struct lsqlite_job *j;

    gw_co_current(L);
    if (len == 0 || memchr(path, '\0', len) != NULL) {
        /* cut at the NUL, it would name another file */
        return gw_push_error(L, "misuse", 0, "sqlite: backup: not a path");
    }
    j = job_new(L, db, LSQLITE_OP_BACKUP);
    if (j == NULL || (j->sql = strdup(path)) == NULL) {
        job_free(j);
        return gw_push_error(L, "unavailable", 0, "sqlite: out of memory");
    }
    j->replace = replace;
    return submit(L, j, LSQLITE_Q_READER);
}

/* Loop thread: db->snap made a consistent copy of the writer's counters
 * (a commit counted whole or not at all). A writer caught in the middle
 * of its update (a few stores; descheduled there at worst) is read again,
 * up to 64 times, then the previous copy stands: never a wait on it. */
static void
commit_stats_read(struct lsqlite_db *db)
{
    struct lsqlite_commit_stats *cs = &db->cs, got;
    unsigned long s1, s2;

    for (int tries = 0; tries < 64; tries++) {
        s1 = __atomic_load_n(&db->cseq, __ATOMIC_ACQUIRE);
        if (s1 & 1) {
            continue;
        }
        got.commits = __atomic_load_n(&cs->commits, __ATOMIC_RELAXED);
        got.writes = __atomic_load_n(&cs->writes, __ATOMIC_RELAXED);
        got.max_ns = __atomic_load_n(&cs->max_ns, __ATOMIC_RELAXED);
        got.cache_bytes = __atomic_load_n(&cs->cache_bytes,
                                          __ATOMIC_RELAXED);
        for (size_t i = 0; i < LSQLITE_COMMIT_NB; i++) {
            got.n[i] = __atomic_load_n(&cs->n[i], __ATOMIC_RELAXED);
            got.ns[i] = __atomic_load_n(&cs->ns[i], __ATOMIC_RELAXED);
        }
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        s2 = __atomic_load_n(&db->cseq, __ATOMIC_RELAXED);
        if (s1 == s2) {
            db->snap = got;
            return;
        }
    }
}

/* h:stats() -> { commits = n, writes = n, reads_inline = n,
 *   reads_moved = n, reads_reader = n, commit_seconds = s,
 *   commit_seconds_max = s, commit_buckets = { { le = s, count = n,
 *   seconds = s }, ... the last le = math.huge }, cache_bytes = n }:
 *   counts so far; the commit figures of one moment (a commit whole or
 *   not at all); cache_bytes: the writer's page cache after the last
 *   COMMIT that acknowledged a write (0 before one) */
static int
lsqlite_stats(lua_State *L)
{
    struct lsqlite_db *db = check_db(L);
    struct lsqlite_commit_stats *st = &db->snap;
    double sum = 0;

    commit_stats_read(db);
    lua_createtable(L, 0, 8);
    lua_pushnumber(L, (lua_Number)db->reads_inline);
    lua_setfield(L, -2, "reads_inline");
    lua_pushnumber(L, (lua_Number)db->reads_moved);
    lua_setfield(L, -2, "reads_moved");
    lua_pushnumber(L, (lua_Number)db->reads_reader);
    lua_setfield(L, -2, "reads_reader");
    lua_pushnumber(L, (lua_Number)st->commits);
    lua_setfield(L, -2, "commits");
    lua_pushnumber(L, (lua_Number)st->writes);
    lua_setfield(L, -2, "writes");
    lua_createtable(L, (int) LSQLITE_COMMIT_NB, 0);
    for (size_t i = 0; i < LSQLITE_COMMIT_NB; i++) {
        lua_createtable(L, 0, 3);
        lua_pushnumber(L, i < LSQLITE_COMMIT_NB - 1
                          ? (double) lsqlite_commit_le_ns[i] / 1e9
                          : HUGE_VAL);
        lua_setfield(L, -2, "le");
        lua_pushnumber(L, (lua_Number) st->n[i]);
        lua_setfield(L, -2, "count");
        lua_pushnumber(L, (double) st->ns[i] / 1e9);
        lua_setfield(L, -2, "seconds");
        lua_rawseti(L, -2, (int) i + 1);
        sum += (double) st->ns[i];
    }
    lua_setfield(L, -2, "commit_buckets");
    lua_pushnumber(L, sum / 1e9);
    lua_setfield(L, -2, "commit_seconds");
    lua_pushnumber(L, (double) st->max_ns / 1e9);
    lua_setfield(L, -2, "commit_seconds_max");
    lua_pushnumber(L, (lua_Number) st->cache_bytes);
    lua_setfield(L, -2, "cache_bytes");
    return 1;
}

static const luaL_Reg lsqlite_methods[] = {
    { "connect", lsqlite_connect },
    { "exec", lsqlite_exec },
    { "script", lsqlite_script },
    { "atomic", lsqlite_atomic },
    { "begin", lsqlite_begin },
    { "tx_exec", lsqlite_tx_exec },
    { "tx_query", lsqlite_tx_query },
    { "tx_script", lsqlite_tx_script },
    { "commit", lsqlite_commit },
    { "rollback", lsqlite_rollback },
    { "stats", lsqlite_stats },
    { "backup", lsqlite_backup },
    { "close", lsqlite_gc },
    { NULL, NULL }
};

static const luaL_Reg lsqlite_funcs[] = {
    { "open", lsqlite_open },
    { NULL, NULL }
};

/*
 * Every write job runs in its own SAVEPOINT, and SQLite keeps the first
 * image of each page a savepoint changes in a sub-journal. By default
 * that journal spills to a temporary file past 64 KiB: a notification's
 * job (some twenty pages) then cost ~45 pwrite() calls of its own, most of
 * the writer's system time. Keeping sub-journals in memory up to 8 MiB (a
 * job's images are dropped when it ends; a bigger one, a bulk UPDATE,
 * spills to a temporary file) removes them. Process-wide: only possible
 * before SQLite initialises, which opening a database does; so it runs
 * once, here, with the split VFS below, without which a spill fails.
 */
#define LSQLITE_STMT_SPILL  (8 * 1024 * 1024)

/*
 * The split VFS: SQLite's default VFS ("unix"), except that a write to a
 * temporary journal goes to the file in pieces of at most 64 KiB.
 *
 * SQLite keeps an in-memory journal in chunks of the spill size, and when
 * it spills it writes each chunk to the new file in ONE call: 8 MiB here.
 * The unix VFS writes at most 128 KiB - 1 bytes a call (seekAndWriteFd
 * masks the length, it expects pages) and reports what it could not write
 * as SQLITE_FULL: every write whose savepoint journal passed 8 MiB failed
 * "database or disk is full". Only the files an in-memory journal spills
 * to (sub-journals, and the journals of temporary databases, which use the
 * same spill size) get such writes; SQLite's other writes are a page, at
 * most 64 KiB, or a WAL frame.
 *
 * It is the default VFS's own struct, copied, under another name, with
 * its own xOpen: every other method is the default VFS's, which reads only
 * fields the copy carries over. xOpen opens the real file in the caller's
 * memory (the same size: szOsFile is copied too), so the file IS the
 * default VFS's file. For a temporary journal it then swaps the file's
 * methods for a copy of them whose xWrite calls the real one in pieces;
 * every other method, xClose, xFileControl, ..., is the real one, given
 * the same file. One copy per distinct real methods table (the unix VFS
 * has a few, by locking style); SPLIT_MAX of them at most, and a file
 * whose table finds no room keeps its own (its big writes fail as before,
 * never worse). Registered as the process's default VFS, so that every
 * connection (a backup's copy, an ATTACHed file) spills as well as it
 * keeps in memory: the spill size is process-wide too.
 */
#define SPLIT_PIECE  (64 * 1024)    /* bytes: at most one unix write */
#define SPLIT_MAX    8              /* distinct real methods tables */

struct split_io {
    sqlite3_io_methods         m;      /* first: a file's pMethods */
    const sqlite3_io_methods  *real;   /* the default VFS's, m's source */
};

static sqlite3_vfs      split_vfs;      /* set once by split_register() */
static sqlite3_vfs     *split_real;     /* the default VFS; process's */
static struct split_io  split_io[SPLIT_MAX];   /* guarded by split_mu */
static int              split_nio;      /* used entries; under split_mu */
static pthread_mutex_t  split_mu = PTHREAD_MUTEX_INITIALIZER;

static int
split_write(sqlite3_file *f, const void *buf, int n, sqlite3_int64 off)
{
    const struct split_io *s = (const struct split_io *) f->pMethods;
    const char            *p = buf;
    int                    rc = SQLITE_OK;
    int                    k;

    while (n > 0 && rc == SQLITE_OK) {
        k = n < SPLIT_PIECE ? n : SPLIT_PIECE;
        rc = s->real->xWrite(f, p, k, off);
        p += k;
        off += k;
        n -= k;
    }
    return rc;
}

/* The methods for a temporary journal whose real methods are real: a
 * copy with split_write; NULL when SPLIT_MAX copies are taken. */
static const sqlite3_io_methods *
split_methods(const sqlite3_io_methods *real)
{
    const sqlite3_io_methods *m = NULL;
    int                       i;

    pthread_mutex_lock(&split_mu);
    for (i = 0; i < split_nio && split_io[i].real != real; i++) {
        /* find its copy */
    }
    if (i == split_nio && i < SPLIT_MAX) {
        split_io[i].m = *real;
        split_io[i].m.xWrite = split_write;
        split_io[i].real = real;
        split_nio++;
    }
    if (i < split_nio) {
        m = &split_io[i].m;
    }
    pthread_mutex_unlock(&split_mu);
    return m;
}

static int
split_open(sqlite3_vfs *vfs, const char *name, sqlite3_file *f, int flags,
           int *out_flags)
{
    const sqlite3_io_methods *m;
    int                       rc;

    (void) vfs;
    rc = split_real->xOpen(split_real, name, f, flags, out_flags);
    if (rc != SQLITE_OK || f->pMethods == NULL
        || !(flags & (SQLITE_OPEN_SUBJOURNAL | SQLITE_OPEN_TEMP_JOURNAL))) {
        return rc;
    }
    m = split_methods(f->pMethods);
    if (m != NULL) {
        f->pMethods = m;
    }
    return rc;
}

static int
split_register(void)
{
    split_real = sqlite3_vfs_find(NULL);
    if (split_real == NULL) {
        return SQLITE_ERROR;
    }
    split_vfs = *split_real;
    split_vfs.pNext = NULL;
    split_vfs.zName = "paygate-split";
    split_vfs.xOpen = split_open;
    return sqlite3_vfs_register(&split_vfs, 1);
}

static int lsqlite_spill_rc = -1;

static void
lsqlite_configure(void)
{
    lsqlite_spill_rc = sqlite3_config(SQLITE_CONFIG_STMTJRNL_SPILL,
                                      LSQLITE_STMT_SPILL);
    if (split_register() != SQLITE_OK && lsqlite_spill_rc == SQLITE_OK) {
        /* no spill of 8 MiB chunks without it: back to SQLite's own size
         * (nothing else opened a database yet: the config took) */
        sqlite3_shutdown();
        sqlite3_config(SQLITE_CONFIG_STMTJRNL_SPILL, 64 * 1024);
        lsqlite_spill_rc = SQLITE_ERROR;
    }
}

int
luaopen_paygate_sqlite_core(lua_State *L)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;

    pthread_once(&once, lsqlite_configure);
    luaL_newmetatable(L, LSQLITE_BUILD_MT);
    lua_pushcfunction(L, build_gc);
    lua_setfield(L, -2, "__gc");
    lua_pop(L, 1);
    luaL_newmetatable(L, LSQLITE_MT);
    lua_pushcfunction(L, lsqlite_gc);
    lua_setfield(L, -2, "__gc");
    lua_newtable(L);
    luaL_register(L, NULL, lsqlite_methods);
    lua_pushcfunction(L, inline_read_run);   /* query's, for lua_pcall */
    lua_pushcclosure(L, lsqlite_query, 1);
    lua_setfield(L, -2, "query");
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
    lua_newtable(L);
    luaL_register(L, NULL, lsqlite_funcs);
    lua_pushstring(L, sqlite3_libversion());
    lua_setfield(L, -2, "version");
    lua_pushboolean(L, lsqlite_spill_rc == SQLITE_OK);
    lua_setfield(L, -2, "subjournal_in_memory");
    /* the commit-time buckets' bounds (s), as h:stats() gives them */
    lua_createtable(L, (int) LSQLITE_COMMIT_NB - 1, 0);
    for (size_t i = 0; i < LSQLITE_COMMIT_NB - 1; i++) {
        lua_pushnumber(L, (double) lsqlite_commit_le_ns[i] / 1e9);
        lua_rawseti(L, -2, (int) i + 1);
    }
    lua_setfield(L, -2, "commit_le");
    return 1;
}
