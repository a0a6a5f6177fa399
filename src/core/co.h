/*
 * co.h -- managed coroutines: one per request, spawned task or exec script.
 * The public half of this API (gw_co_current/wait/wake) is in runtime.h.
 */
#ifndef GW_CO_H
#define GW_CO_H

#include "runtime.h"

/* What the owner of a coroutine is told when it ends. Exactly one of done
 * or fail is called; the owner then calls gw_co_free(). */
struct gw_co_owner {
    /* Returned normally; nres results are on gw_co_state(co)'s stack. */
    void (*done)(struct gw_co *co, int nres);
    /* Raised; msg is "error\ntraceback" (valid only during the call);
     * the error value itself is on top of gw_co_state(co)'s stack. */
    void (*fail)(struct gw_co *co, const char *msg);
    /* Optional (may be NULL): the coroutine now waits on an operation. */
    void (*suspended)(struct gw_co *co);
    /* Optional (may be NULL): the monotonic time (s) by which the owner
     * ends the coroutine (a request's deadline), or 0 for none. */
    double (*deadline)(struct gw_co *co);
};

struct gw_co {
    lua_State                *L;        /* the thread; anchored by ref */
    int                       ref;      /* registry ref to the thread */
    gw_cancel_fn              cancel;   /* pending op; NULL when none */
    void                     *cancel_arg;
    int                       waiting;  /* 1 while suspended in wait */
    int                       running;  /* 1 while inside lua_resume */
    int                       ended;    /* 1 after done/fail/abandon */
    int                       reusable; /* returned normally: poolable */
    const struct gw_co_owner *owner;    /* not owned */
    void                     *data;     /* owner's; not touched here */
    const char               *request_id; /* owner's; for logs, or NULL */
    struct event             *tick;     /* owned; resumes a bare yield,
                                           or a resume deferred out of a
                                           __gc finalizer or a hook */
    int                       tick_nargs; /* values tick resumes with */
    struct gw_co_cleanup     *cleanups; /* attached; storage is the
                                           callers'; run when co ends */
};

/* Sets up the coroutine registry in L (the main state). */
void gw_co_init(lua_State *L);

/* Starts a coroutine running the function at L's stack index -(nargs+1)
 * with nargs arguments above it (both popped). Runs it now, until it
 * first waits or ends -- or, inside a __gc finalizer or a debug hook (or
 * while the collector is stopped or a hook is installed), on the next loop
 * turn. Returns NULL when out of memory (values popped).*/
struct gw_co *gw_co_start(lua_State *L, int nargs,
                          const struct gw_co_owner *owner, void *data,
                          const char *request_id);

/* Stops a suspended coroutine for good: cancels its pending op, then
 * runs its attached cleanups. The owner is not called back. The co must
 * then be freed by the owner. */
void gw_co_abandon(struct gw_co *co);

/* Runs the cleanups still attached, then releases the thread and the
 * struct (or pools them). Not while running. */
void gw_co_free(struct gw_co *co);

/* The main state (never a coroutine). */
lua_State *gw_co_main(void);

/* Number of coroutines alive (started, not freed): a metric. */
extern long gw_co_alive;

#endif
