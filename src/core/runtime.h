/*
 * runtime.h -- the contract between the paygate host and every C module
 * bound to Lua (crypto, storage, http client, ...).
 *
 * One process has one event loop and one Lua state (a worker, or the
 * `paygate exec` process). Every inbound request, every spawned task and
 * the exec script run in their own *managed coroutine* (struct gw_co).
 *
 * An asynchronous primitive has this shape:
 *
 *     static int
 *     lfoo_wait(lua_State *L)
 *     {
 *         struct gw_co *co = gw_co_current(L);  // raises outside a co
 *         struct foo_op *op = start_io(...);     // owns itself
 *         op->co = co;
 *         return gw_co_wait(L, foo_cancel, op);  // yields
 *     }
 *
 *     // later, on the loop thread, when the I/O is done:
 *     lua_State *co_L = gw_co_state(op->co);
 *     lua_pushstring(co_L, result);
 *     gw_co_wake(op->co, 1);                    // resumes with 1 value
 *
 * If the coroutine is abandoned while waiting (request deadline passed,
 * worker stopping), the runtime calls cancel(arg) exactly once instead;
 * after cancel returns, the op must never touch that co again (free the
 * op now, or mark it so its completion frees it without waking).
 * Exactly one of wake or cancel happens for each wait.
 *
 * State held *across* waits (a reserved database connection, an open
 * transaction) is not covered by cancel: the coroutine may be abandoned
 * while it waits on something else (paygate.sleep), and no Lua code runs
 * after that. Attach a struct gw_co_cleanup for it; see below.
 *
 * Worker threads never touch Lua: they post a function to the loop with
 * gw_loop_post(), which runs it on the loop thread.
 */
#ifndef GW_RUNTIME_H
#define GW_RUNTIME_H

#include <lua.h>
#include <lauxlib.h>

#define GW_OK     0
#define GW_ERR   -1
#define GW_AGAIN -2

struct event_base;
struct gw_co;

typedef void (*gw_cancel_fn)(void *arg);
typedef void (*gw_post_fn)(void *arg);

/* The process's event base (one per process). */
struct event_base *gw_loop_base(void);

/* Runs fn(arg) on the loop thread soon. Thread-safe. Returns GW_OK, or
 * GW_ERR when out of memory (fn is then never called). */
int gw_loop_post(gw_post_fn fn, void *arg);

/* The managed coroutine running L. Raises a Lua error (misuse) when L is
 * not a managed coroutine, e.g. at a module's top level or inside a
 * coroutine the user created with coroutine.create. */
struct gw_co *gw_co_current(lua_State *L);

/* Same, but returns NULL instead of raising. */
struct gw_co *gw_co_find(lua_State *L);

/* Suspends the current coroutine until gw_co_wake() or cancel. Must be the
 * tail call of a lua_CFunction: `return gw_co_wait(L, fn, arg);`. The
 * values passed to gw_co_wake become the C function's return values. */
int gw_co_wait(lua_State *L, gw_cancel_fn cancel, void *arg);

/* Raises the error gw_co_wait raises in a coroutine that cannot yield (a
 * C function such as string.gsub, require or table.sort is between the
 * call and its coroutine). An operation that queues or sends work before
 * it waits checks lua_isyieldable(L) first and, when false, frees what it
 * made and returns this, before anything leaves: else the work would be
 * done for a caller told that the call raised. */
int gw_co_unyieldable(lua_State *L);

/* The coroutine's Lua thread: push wake values here. */
lua_State *gw_co_state(struct gw_co *co);

/* Resumes a waiting coroutine with the top nargs values of its stack.
 * Call only from loop callbacks (never from inside a running coroutine).
 * Inside a __gc finalizer or a debug hook (or while the collector is
 * stopped or a hook is installed) the resume happens on the next loop
 * turn instead. */
void gw_co_wake(struct gw_co *co, int nargs);

/* A cleanup for state a coroutine holds across waits. The caller owns
 * the storage (embed it in its own struct) and sets fn and arg. */
struct gw_co_cleanup {
    gw_cancel_fn           fn;     /* called as fn(arg), at most once */
    void                  *arg;    /* caller's */
    struct gw_co_cleanup  *next;   /* list link, managed by the co */
    struct gw_co_cleanup **pprev;  /* NULL while not attached */
};

/* Attaches cl to co. If co ends while cl is attached -- abandoned
 * (task:cancel(), request deadline, shutdown), or returned or raised
 * without releasing the state -- cl is detached and cl->fn(cl->arg) runs
 * once on the loop thread, after the pending op's cancel. fn may run
 * inside another coroutine (task:cancel()), so it must not wake any
 * coroutine itself (post that to a later loop turn) nor touch co. */
void gw_co_cleanup_add(struct gw_co *co, struct gw_co_cleanup *cl);

/* Detaches cl without calling it. Safe when cl is not attached (set
 * cl->pprev = NULL once before first use, or zero the struct). */
void gw_co_cleanup_del(struct gw_co_cleanup *cl);

/* Pushes nil and an error table { kind=, message=, retryable= } with the
 * paygate error metatable (tostring gives "kind: message"); returns 2.
 * Use it for every expected failure returned to Lua. */
int gw_push_error(lua_State *L, const char *kind, int retryable,
                  const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* Logging: JSON lines on stderr. Never pass secrets. */
enum gw_log_level { GW_LOG_DEBUG, GW_LOG_INFO, GW_LOG_WARN, GW_LOG_ERROR };
void gw_log(enum gw_log_level level, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

#endif
