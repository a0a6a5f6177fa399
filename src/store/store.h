/*
 * store.h -- helpers shared by the storage drivers (paygate.sqlite.core,
 * paygate.pg.core, paygate.redis.core): SQL parameter values copied off
 * the Lua stack so a worker thread or a later loop turn can use them,
 * integers pushed without rounding, the checks of the options tables,
 * the registry of open transactions, the statement caches' hash. (The
 * null sentinel each module exports is a NULL light userdata, equal to
 * cjson.null.)
 */
#ifndef GW_STORE_H
#define GW_STORE_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <lua.h>

#include "hash.h"
#include "runtime.h"

enum gw_store_val_type {
    GW_STORE_NULL, GW_STORE_INT, GW_STORE_REAL, GW_STORE_TEXT
};

/* One bound parameter or one result cell. A plain struct: only the
 * fields that type names are meaningful, the others stay zero. */
struct gw_store_val {
    enum gw_store_val_type type; /* which of the fields below is set */
    int64_t                i;    /* GW_STORE_INT (booleans become 0/1) */
    double                 d;    /* GW_STORE_REAL */
    char                  *s;    /* GW_STORE_TEXT: NUL-terminated; a result
                                    cell's is its own malloc, a parameter's
                                    lies in its array's block (see
                                    gw_store_vals_copy) */
    size_t                 len;  /* GW_STORE_TEXT: bytes, without the NUL */
};

/* params.n at most: PostgreSQL's protocol counts parameters in 16 bits */
#define GW_STORE_MAX_PARAMS 65535

/* gw_store_vals_copy's answers other than 0 and an index */
#define GW_STORE_BAD_N  (-1)   /* params.n: no whole number in
                                  0..GW_STORE_MAX_PARAMS */
#define GW_STORE_NOMEM  (-2)   /* out of memory */

/* Copies the parameter table at idx (a table) into ONE malloc'd block:
 * the values, then the bytes of their strings, each value's s pointing
 * there (a statement's parameters are one allocation, not one per
 * string). Free it with free(), never gw_store_vals_free(). *n gets the
 * count (params.n when set, else #params); with none, *out is NULL.
 * params.n is read once, first (its metamethod may run Lua); then one
 * pass reads each value raw, checks and converts it, with no Lua
 * running until the strings are copied.
 * Raises only from that read (Lua it runs: the metamethod, a finalizer),
 * before anything is allocated: a caller holding earlier copies holds
 * them where a raise frees them. Returns 0, else (nothing allocated) the
 * 1-based index of the first value that cannot be bound (not nil, null,
 * boolean, number or string), GW_STORE_BAD_N or GW_STORE_NOMEM. */
int gw_store_vals_copy(lua_State *L, int idx, struct gw_store_val **out,
                       int *n);

/* gw_store_vals_copy() for a table, or nil/none for no parameters, that
 * raises on misuse (a value that cannot be bound, a params.n out of
 * range; nothing allocated then) and on any other type. Returns GW_OK,
 * or GW_ERR when out of memory. Free *out with free(). */
int gw_store_vals_from_lua(lua_State *L, int idx, struct gw_store_val **out,
                           int *n);

/* Whether the SQL text at idx (a string; anything else: 0) holds a NUL
 * byte. Both engines read SQL as a C string, which would end there
 * ("SELECT 1\0; ..." would run "SELECT 1"): such SQL is refused. */
int gw_store_sql_has_nul(lua_State *L, int idx);

/* Frees n result cells (each string its own malloc) and the array.
 * NULL-safe. Not for parameters: see gw_store_vals_copy(). */
void gw_store_vals_free(struct gw_store_val *v, int n);

/* Pushes the value; NULL becomes nil, an integer as gw_store_push_int()
 * does. */
void gw_store_val_push(lua_State *L, const struct gw_store_val *v);

/* Pushes an integer from a store: a Lua number when |i| <= 2^53 (every
 * such integer is exact in a double), else its decimal string, so that
 * nothing is ever rounded. */
void gw_store_push_int(lua_State *L, int64_t i);

/* Pushes the decimal integer text s (a PostgreSQL int8 cell) the way
 * gw_store_push_int() does; text that is not a plain integer is pushed as
 * a string unchanged. */
void gw_store_push_int_text(lua_State *L, const char *s, size_t len);

/* Option checks for core.open/core.new. fn is the public function named
 * in the message ("sql.open"); the error is raised at the first caller
 * outside paygate's own Lua modules (see gw_store_raise()). The table at
 * idx may be absent (nil/none: every option takes its default); any other
 * non-table raises. */

/* opts[name]: def when absent; raises unless a whole number in
 * [min, max] ("sql.open: opts.pool must be a positive integer"). */
int gw_store_opt_int(lua_State *L, int idx, const char *fn,
                     const char *name, int def, int min, int max);

/* opts[name]: def when absent; raises unless a finite number > 0, or
 * >= 0 when zero_ok. */
double gw_store_opt_num(lua_State *L, int idx, const char *fn,
                        const char *name, double def, int zero_ok);

/* opts[name]: def when absent; raises unless a boolean. */
int gw_store_opt_bool(lua_State *L, int idx, const char *fn,
                      const char *name, int def);

/* opts[name]: NULL when absent; raises unless a string. The pointer is
 * valid while the table holds the value. */
const char *gw_store_opt_str(lua_State *L, int idx, const char *fn,
                             const char *name);

/* Raises on a key of the table at idx that is not in names (NULL
 * terminated): a misspelt option must not be silently ignored. */
void gw_store_opt_known(lua_State *L, int idx, const char *fn,
                        const char *const *names);

/* Every option sql.open() takes, for either engine (paygate.sql reads
 * retries; an options table may serve both engines). */
extern const char *const gw_store_sql_opts[];

#define GW_STORE_SQLITE_MAX_READERS 64  /* sql.open readers at most */
#define GW_STORE_PG_MAX_POOL        32  /* sql.open pool at most */

/* Checks the sql.open options table at idx for either engine: raises on
 * an unknown name and on a value of the wrong type or range, also for an
 * option the opening engine does not use (one table serves both, so a
 * mistyped pool must not pass on SQLite). Call before allocating. */
void gw_store_sql_opts_check(lua_State *L, int idx);

/* Raises the formatted message at the first caller outside paygate's own
 * Lua modules (lua/paygate/NAME.lua), so that the position names the
 * application's line. Never returns. */
int gw_store_raise(lua_State *L, const char *fmt, ...);

/*
 * Open transactions of db:transaction(), for both SQL drivers (loop
 * thread only). h:begin() registers one and attaches it to the calling
 * coroutine; the driver frees it once the transaction's COMMIT or
 * ROLLBACK is submitted (or its BEGIN failed). If the coroutine ends
 * first -- task:cancel(), a request deadline, or it returned without
 * ending the transaction -- no Lua code will ever send the ROLLBACK, so
 * the driver's rollback callback does it from C. That callback may run
 * inside another coroutine: it must only queue work, wake nobody, and
 * free the record (gw_store_tx_free()) unless it keeps it on purpose.
 */
struct gw_store_tx {
    struct gw_co_cleanup cl;      /* attached to the co that began it */
    void                *owner;   /* the driver's handle (pool, db) */
    long                 id;      /* unique in the process, never 0 */
    int                  state;   /* the driver's own (e.g. pending) */
    void               (*rollback)(struct gw_store_tx *tx); /* see above */
    struct gw_store_tx  *next;    /* registry link */
};

/* Registers a transaction of owner with a new id, attached to co.
 * Returns NULL when out of memory (nothing registered). */
struct gw_store_tx *gw_store_tx_new(struct gw_co *co, void *owner,
                                    void (*rollback)(struct gw_store_tx *));

/* The registered transaction id (of owner; NULL: of any owner, ids being
 * unique in the process), or NULL. */
struct gw_store_tx *gw_store_tx_find(void *owner, long id);

/* Frees every registered transaction of owner (the handle closes). */
void gw_store_tx_free_owner(void *owner);

/* Unregisters, detaches from its coroutine and frees tx. NULL-safe. */
void gw_store_tx_free(struct gw_store_tx *tx);

/* The statement caches' key hash (core's FNV-1a over the SQL text). */
#define gw_store_hash(s) gw_hash_fnv1a((s), strlen(s))

/* strdup that returns NULL for NULL. */
char *gw_store_strdup(const char *s);

#endif
