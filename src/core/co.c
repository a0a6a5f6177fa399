/*
 * co.c -- managed coroutines. A coroutine is created per request or task,
 * resumed by loop callbacks through gw_co_wake(), and reported to its owner
 * when it ends. Threads are mapped to their struct through a registry table
 * keyed by the thread, so gw_co_current() is one table lookup.
 */
#include <stdlib.h>
#include <string.h>

#include <event2/event.h>

#include "co.h"
#include "log.h"
#include "loop.h"
#include "lstate.h"

static const char co_map_key = 'c';     /* registry: thread -> lightud */
static lua_State *main_L;               /* not owned */
long gw_co_alive;

/* Coroutines that returned normally are kept for reuse: creating a thread
 * per request costs an allocation, a registry ref and GC work. */
#define POOL_MAX 256
static struct gw_co *pool[POOL_MAX];    /* owned, threads anchored */
static int           npool;

void
gw_co_init(lua_State *L)
{
    main_L = L;
    lua_pushlightuserdata(L, (void *) &co_map_key);
    lua_newtable(L);
    lua_rawset(L, LUA_REGISTRYINDEX);
}

lua_State *
gw_co_main(void)
{
    return main_L;
}

struct gw_co *
gw_co_find(lua_State *L)
{
    struct gw_co *co;

    lua_pushlightuserdata(L, (void *) &co_map_key);
    lua_rawget(L, LUA_REGISTRYINDEX);
    lua_pushthread(L);
    lua_rawget(L, -2);
    co = lua_touserdata(L, -1);
    lua_pop(L, 2);
    return co;
}

struct gw_co *
gw_co_current(lua_State *L)
{
    struct gw_co *co = gw_co_find(L);

    if (co == NULL) {
        luaL_error(L, "this call yields: use it inside a request handler, "
                      "a paygate.spawn()ed task or a paygate exec script, "
                      "not at a module's top level or in a coroutine you "
                      "created");
    }
    return co;
}

lua_State *
gw_co_state(struct gw_co *co)
{
    return co->L;
}

static void co_run(struct gw_co *co, int nargs);
static void co_fail(struct gw_co *co);

/* A loop callback: no finalizer is running (see co_resume). */
static void
co_tick(evutil_socket_t fd, short what, void *arg)
{
    struct gw_co *co = arg;

    co_run(co, co->tick_nargs);
}

/* co_resume's rare way: resumes co on the next loop turn. co->L's stack
 * keeps the function and arguments, or the wake values, until then;
 * gw_co_abandon() drops the timer with the coroutine. */
static void
co_defer(struct gw_co *co, int nargs)
{
    struct timeval zero = { 0, 0 };

    if (co->tick == NULL) {
        co->tick = evtimer_new(gw_loop_base(), co_tick, co);
    }
    if (co->tick == NULL) {
        lua_pushliteral(co->L, "no memory to defer a coroutine resumed in"
                               " a __gc finalizer");
        co->ended = 1;
        co_fail(co);
        return;
    }
    co->tick_nargs = nargs;
    evtimer_add(co->tick, &zero);
}

/*
 * Runs co now, or on the next loop turn when called inside a __gc
 * finalizer or a debug hook (paygate.spawn, or task:cancel() waking
 * waiters, there). LuaJIT runs a finalizer inside whatever allocation
 * stepped the collector, with its hooks marked active, and a debug.sethook
 * function with them active too: a coroutine resumed there that waits is
 * suspended as if from a hook (lua_yield adds a pseudo-frame), and
 * resuming it later crashed the process in lua_resume. Whether hooks are
 * active is not in LuaJIT's API: the collector reads as not running
 * inside a finalizer (its threshold is held at the maximum), and also
 * while stopped by collectgarbage("stop"); a debug hook is seen only as
 * installed (lua_gethook), inside it or not. Those resumes wait one turn
 * too.
 */
static inline void
co_resume(struct gw_co *co, int nargs)
{
    if (lua_gc(co->L, LUA_GCISRUNNING, 0) && lua_gethook(co->L) == NULL) {
        co_run(co, nargs);
    } else {
        co_defer(co, nargs);
    }
}

/* Runs co until it waits, yields bare or ends. */
static void
co_run(struct gw_co *co, int nargs)
{
    lua_State *L = co->L;
    int rc;

    co->running = 1;
    rc = lua_resume(L, nargs);
    co->running = 0;
    if (rc == LUA_YIELD) {
        if (co->waiting) {
            if (co->owner->suspended != NULL) {
                co->owner->suspended(co);
            }
            return;
        }
        /* A bare coroutine.yield(): give others a turn, resume next pass. */
        lua_settop(L, 0);
        if (co->tick == NULL) {
            co->tick = evtimer_new(gw_loop_base(), co_tick, co);
        }
        if (co->tick != NULL) {
            struct timeval zero = { 0, 0 };
            co->tick_nargs = 0;
            evtimer_add(co->tick, &zero);
            return;
        }
        rc = LUA_ERRMEM;
        lua_pushliteral(L, "no memory to reschedule a yielding coroutine");
    }
    co->ended = 1;
    if (rc == 0) {
        co->reusable = 1;
        co->owner->done(co, lua_gettop(L));
        return;
    }
    co_fail(co);
}

/* co ended raising: its error value is on top of its stack. The value
 * stays on L (paygate.abort's table is read by the owner); its text is
 * made on the main state: an error raised as a table logs as "kind:
 * message", not "table". A message that carries a traceback already (a
 * wrapper that caught the error raised it on with the traceback of where
 * it was raised: paygate.idempotency's wrap) is given as it is: the
 * stack here would begin at the wrapper's error(), not the handler's. */
static void
co_fail(struct gw_co *co)
{
    lua_State *L = co->L, *top = main_L;
    int base = lua_gettop(top);
    const char *msg, *tb;

    lua_pushvalue(L, -1);
    lua_xmove(L, top, 1);
    msg = gw_error_string(top, -1);
    if (msg != NULL && strstr(msg, "\nstack traceback:\n") != NULL) {
        co->owner->fail(co, msg);
        lua_settop(top, base);
        return;
    }
    luaL_traceback(top, L, msg, 0);
    tb = lua_tostring(top, -1);
    co->owner->fail(co, tb != NULL ? tb : msg);
    lua_settop(top, base);
}

struct gw_co *
gw_co_start(lua_State *L, int nargs, const struct gw_co_owner *owner,
            void *data, const char *request_id)
{
    struct gw_co *co;

    if (npool > 0) {
        co = pool[--npool];
        co->owner = owner;
        co->data = data;
        co->request_id = request_id;
        co->ended = 0;
        lua_xmove(L, co->L, nargs + 1);
        gw_co_alive++;
        co_resume(co, nargs);
        return co;
    }
    co = calloc(1, sizeof(*co));
    if (co == NULL) {
        lua_pop(L, nargs + 1);
        return NULL;
    }
    co->owner = owner;
    co->data = data;
    co->request_id = request_id;
    co->L = lua_newthread(L);
    lua_pushlightuserdata(L, (void *) &co_map_key);
    lua_rawget(L, LUA_REGISTRYINDEX);
    lua_pushvalue(L, -2);
    lua_pushlightuserdata(L, co);
    lua_rawset(L, -3);
    lua_pop(L, 1);
    co->ref = luaL_ref(L, LUA_REGISTRYINDEX);    /* pops the thread */
    lua_xmove(L, co->L, nargs + 1);
    gw_co_alive++;
    co_resume(co, nargs);
    return co;
}

int
gw_co_unyieldable(lua_State *L)
{
    return luaL_error(L, "attempt to yield across a C-call boundary (a C "
                         "function such as string.gsub, require or "
                         "table.sort is between the call and its "
                         "coroutine)");
}

int
gw_co_wait(lua_State *L, gw_cancel_fn cancel, void *arg)
{
    struct gw_co *co = gw_co_current(L);

    if (!lua_isyieldable(L)) {
        /* Called through a C function (string.gsub's callback, require,
         * table.sort's comparator): lua_yield would raise with the op
         * registered, and the op would later wake a coroutine that went
         * on, or was freed. Cancel it now and raise. */
        cancel(arg);
        return gw_co_unyieldable(L);
    }
    co->cancel = cancel;
    co->cancel_arg = arg;
    co->waiting = 1;
    return lua_yield(L, 0);
}

void
gw_co_wake(struct gw_co *co, int nargs)
{
    if (!co->waiting || co->running) {
        gw_log(GW_LOG_ERROR, "co: wake of a coroutine that is not waiting");
        lua_pop(co->L, nargs);
        return;
    }
    co->waiting = 0;
    co->cancel = NULL;
    co->cancel_arg = NULL;
    gw_loop_update_time();
    co_resume(co, nargs);
}

void
gw_co_cleanup_add(struct gw_co *co, struct gw_co_cleanup *cl)
{
    gw_co_cleanup_del(cl);
    cl->next = co->cleanups;
    if (cl->next != NULL) {
        cl->next->pprev = &cl->next;
    }
    cl->pprev = &co->cleanups;
    co->cleanups = cl;
}

void
gw_co_cleanup_del(struct gw_co_cleanup *cl)
{
    if (cl->pprev == NULL) {
        return;
    }
    *cl->pprev = cl->next;
    if (cl->next != NULL) {
        cl->next->pprev = cl->pprev;
    }
    cl->next = NULL;
    cl->pprev = NULL;
}

/* Newest first; a cleanup may detach others (or attach none: co ended). */
static void
co_run_cleanups(struct gw_co *co)
{
    struct gw_co_cleanup *cl;

    while (co->cleanups != NULL) {
        cl = co->cleanups;
        gw_co_cleanup_del(cl);
        cl->fn(cl->arg);
    }
}

void
gw_co_abandon(struct gw_co *co)
{
    gw_cancel_fn cancel = co->cancel;

    co->ended = 1;
    if (co->tick != NULL) {
        evtimer_del(co->tick);
    }
    if (co->waiting && cancel != NULL) {
        co->cancel = NULL;
        co->waiting = 0;
        cancel(co->cancel_arg);
    }
    co->waiting = 0;
    co_run_cleanups(co);
}

void
gw_co_free(struct gw_co *co)
{
    if (co == NULL) {
        return;
    }
    co_run_cleanups(co);
    if (co->reusable && npool < POOL_MAX && lua_status(co->L) == 0) {
        lua_settop(co->L, 0);
        co->reusable = 0;
        co->waiting = 0;
        co->cancel = NULL;
        co->cancel_arg = NULL;
        co->data = NULL;
        co->request_id = NULL;
        pool[npool++] = co;
        gw_co_alive--;
        return;
    }
    if (co->tick != NULL) {
        event_free(co->tick);
        co->tick = NULL;
    }
    lua_pushlightuserdata(main_L, (void *) &co_map_key);
    lua_rawget(main_L, LUA_REGISTRYINDEX);
    lua_rawgeti(main_L, LUA_REGISTRYINDEX, co->ref);
    lua_pushnil(main_L);
    lua_rawset(main_L, -3);
    lua_pop(main_L, 1);
    luaL_unref(main_L, LUA_REGISTRYINDEX, co->ref);
    gw_co_alive--;
    free(co);
}
