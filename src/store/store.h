/*
 * store.h -- helpers shared by the storage drivers (paygate.sqlite.core,
 * paygate.pg.core, paygate.redis.core): SQL parameter values copied off
 * the Lua stack so a worker thread or a later loop turn can use them, and
 * the null sentinel (a NULL light userdata, equal to cjson.null).
 */
#ifndef GW_STORE_H
#define GW_STORE_H

#include <stddef.h>
#include <stdint.h>
#include <lua.h>

enum gw_sqlv_type { GW_SQLV_NULL, GW_SQLV_INT, GW_SQLV_REAL, GW_SQLV_TEXT };

/* One bound parameter or one result cell. */
struct gw_sqlv {
    enum gw_sqlv_type type;     /* which union member is valid */
    int64_t           i;        /* GW_SQLV_INT (booleans become 0/1) */
    double            d;        /* GW_SQLV_REAL */
    char             *s;        /* GW_SQLV_TEXT: owned, NUL-terminated */
    size_t            len;      /* GW_SQLV_TEXT: bytes, without the NUL */
};

/* Copies the parameter array at idx (a table, or nil/none for no
 * parameters) into a malloc'd array; *n gets its length (params.n when
 * set, else #params). Raises on a value that cannot be bound (misuse)
 * before allocating anything. Returns GW_OK, or GW_ERR when out of
 * memory. Free with gw_sqlv_free(). */
int gw_sqlv_from_lua(lua_State *L, int idx, struct gw_sqlv **out, int *n);

/* Frees n values and the array. NULL-safe. */
void gw_sqlv_free(struct gw_sqlv *v, int n);

/* Pushes the value; NULL becomes nil, an integer as gw_store_push_int()
 * does. */
void gw_sqlv_push(lua_State *L, const struct gw_sqlv *v);

/* Pushes an integer from a store: a Lua number when |i| <= 2^53 (every
 * such integer is exact in a double), else its decimal string, so that
 * nothing is ever rounded. */
void gw_store_push_int(lua_State *L, int64_t i);

/* Pushes the decimal integer text s (a PostgreSQL int8 cell) the way
 * gw_store_push_int() does; text that is not a plain integer is pushed as
 * a string unchanged. */
void gw_store_push_int_text(lua_State *L, const char *s, size_t len);

/* Wall clock, seconds since the epoch (sub-second precision). */
double gw_store_now(void);

/* opts[name] when the table at idx has a number there, else def (an
 * absent table or a non-number value gives def). */
double gw_store_opt_num(lua_State *L, int idx, const char *name, double def);

/* FNV-1a of a NUL-terminated string: the statement caches' key hash. */
unsigned gw_store_hash(const char *s);

/* strdup that returns NULL for NULL. */
char *gw_store_strdup(const char *s);

#endif
