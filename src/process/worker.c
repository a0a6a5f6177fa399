/*
 * worker.c -- see worker.h.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <curl/curl.h>
#include <event2/event.h>

#include "co.h"
#include "log.h"
#include "loop.h"
#include "lstate.h"
#include "metrics.h"
#include "modules.h"
#include "watchdog.h"
#include "worker.h"
#include "dns.h"

static struct {
    const struct gw_opts *o;        /* not owned */
    lua_State            *L;        /* owned */
    int                   listen_fd;
    SSL_CTX              *ssl_ctx;  /* not owned */
    int                   ready_fd; /* socket to the master, or -1 */
    struct event         *go_ev;    /* owned: waits for the master's go */
    int                   exit_code;
    struct event         *gauges;   /* owned: 1 s gauge refresh and the
                                       watchdog's mark */
    struct event         *sigterm, *sigint, *deadline;
    struct event         *hooks_deadline; /* owned: bounds on_stop fns */
    int                   stopping;
    int                   hooks_started, hooks_done;
    char                  told_fail[256]; /* why, once paygate.runtime.fail
                                             told the master, or "" */
} w;

static int lruntime_fail(lua_State *L);

/* Sets package.loaded["paygate.runtime"] = { mode, app_dir, config_file,
 * listen ("HOST:PORT" of the public listener; workers only), generation
 * (the code generation the worker runs: 1 at start, one more per reload
 * tried), request_timeout (s: the one the server enforces, read at the
 * start; a reload re-reads paygate.config but not it; workers only: > 0)
 * and fail (lruntime_fail) (workers only) } */
static void
push_runtime_info(lua_State *L, const char *mode, const char *app_dir,
                  const char *config_file, const char *listen, int gen,
                  double request_timeout)
{
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "loaded");
    lua_createtable(L, 0, 4);
    lua_pushstring(L, mode);
    lua_setfield(L, -2, "mode");
    if (app_dir != NULL) {
        lua_pushstring(L, app_dir);
        lua_setfield(L, -2, "app_dir");
    }
    if (config_file != NULL) {
        lua_pushstring(L, config_file);
        lua_setfield(L, -2, "config_file");
    }
    if (listen != NULL) {
        lua_pushstring(L, listen);
        lua_setfield(L, -2, "listen");
    }
    if (request_timeout > 0) {
        lua_pushnumber(L, request_timeout);
        lua_setfield(L, -2, "request_timeout");
    }
    if (gen > 0) {
        lua_pushinteger(L, gen);
        lua_setfield(L, -2, "generation");
        lua_pushcfunction(L, lruntime_fail);
        lua_setfield(L, -2, "fail");
    }
    lua_pushstring(L, gw_lua_dir());
    lua_setfield(L, -2, "lua_dir");
    lua_setfield(L, -2, "paygate.runtime");
    lua_pop(L, 2);
}

static void on_stop(evutil_socket_t sig, short what, void *arg);

/* The master's go ('G'): its generation serves now, so start accepting.
 * Anything else (EOF) means the master let go of this worker without one
 * (a refused reload, or the master is gone): stop; nothing was accepted. */
static void
on_go(evutil_socket_t fd, short what, void *arg)
{
    char c = 0;
    ssize_t n = read(fd, &c, 1);

    if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
        return;
    }
    event_free(w.go_ev);
    w.go_ev = NULL;
    close(w.ready_fd);
    w.ready_fd = -1;
    if (n == 1 && c == 'G') {
        if (gw_server_accept() != GW_OK) {
            gw_log(GW_LOG_ERROR, "worker: cannot watch the listening "
                                 "socket");
            w.exit_code = 1;
            event_base_loopbreak(gw_loop_base());
        }
        return;
    }
    on_stop(-1, 0, NULL);
}

/* Tells the master 'R' (loaded, ready to serve) or 'F' (failed), with
 * why's first line after an 'F' so that `paygate reload` can say it. One
 * write: a socket write of a few bytes arrives whole. After an 'R' the
 * socket stays open for the master's go (on_go): a worker accepts nothing
 * until its whole generation has loaded, so a refused reload can stop
 * its workers (EOF instead of the go; SIGKILL for one still loading)
 * without dropping a connection. */
static void
ready_why(char c, const char *why)
{
    char buf[256];
    size_t n = 1;

    if (w.ready_fd < 0) {
        return;
    }
    buf[0] = c;
    if (why != NULL) {
        size_t len = strcspn(why, "\n");

        if (len > sizeof(buf) - 1) {
            len = sizeof(buf) - 1;
        }
        memcpy(buf + 1, why, len);
        n += len;
        /* a first line ending in ':' says its reason on the next one:
         * require's "error loading module 'm' from file 'm.lua':" then
         * "\tm.lua:3: unexpected symbol ...", which alone named no cause */
        if (len > 0 && why[len - 1] == ':' && why[len] == '\n') {
            const char *next = why + len + 1 + strspn(why + len + 1, " \t");
            size_t more = strcspn(next, "\n");

            if (more > 0 && n < sizeof(buf) - 1) {
                buf[n++] = ' ';
                if (more > sizeof(buf) - n) {
                    more = sizeof(buf) - n;
                }
                memcpy(buf + n, next, more);
                n += more;
            }
        }
    }
    if (write(w.ready_fd, buf, n) < 0) {
        /* the master is gone; PDEATHSIG ends us */
    }
    if (c == 'R') {
        w.go_ev = event_new(gw_loop_base(), w.ready_fd, EV_READ | EV_PERSIST,
                            on_go, NULL);
        if (w.go_ev != NULL && event_add(w.go_ev, NULL) == 0) {
            return;
        }
        if (w.go_ev != NULL) {
            event_free(w.go_ev);
            w.go_ev = NULL;
        }
        gw_log(GW_LOG_ERROR, "worker: cannot wait for the master's go");
        w.exit_code = 1;
        event_base_loopbreak(gw_loop_base());
    }
    close(w.ready_fd);
    w.ready_fd = -1;
}

/* paygate.runtime.fail(why): an app that ends its worker itself while it
 * loads (os.exit after its own message: the reference gateway's config
 * errors) tells the master why first, as a load error would, so that
 * `paygate reload` can say it. Returns true when it told; false once the
 * worker has loaded ('R' sent: the master reads nothing more, and closing
 * the socket while the worker waits for its go would leave it never
 * accepting, counted as serving) or has told already. */
static int
lruntime_fail(lua_State *L)
{
    const char *why = luaL_checkstring(L, 1);

    if (w.ready_fd < 0 || w.go_ev != NULL) {
        lua_pushboolean(L, 0);
        return 1;
    }
    ready_why('F', why);
    snprintf(w.told_fail, sizeof(w.told_fail), "%.*s",
             (int) strcspn(why, "\n"), why);
    if (w.told_fail[0] == '\0') {
        snprintf(w.told_fail, sizeof(w.told_fail), "(no reason given)");
    }
    lua_pushboolean(L, 1);
    return 1;
}

static void
ready(char c)
{
    ready_why(c, NULL);
}

/* ---- paygate.on_stop: the app's stop functions ---------------------- */

static void
hooks_end(void)
{
    w.hooks_done = 1;
    event_base_loopbreak(gw_loop_base());
}

static void
hooks_ok(struct gw_co *co, int nres)
{
    gw_co_free(co);
    hooks_end();
}

static void
hooks_fail(struct gw_co *co, const char *msg)
{
    gw_log(GW_LOG_ERROR, "worker: stop functions failed: %s", msg);
    gw_co_free(co);
    hooks_end();
}

static const struct gw_co_owner hooks_owner = { hooks_ok, hooks_fail, NULL,
                                                 NULL };

static void
on_hooks_deadline(evutil_socket_t fd, short what, void *arg)
{
    if (!w.hooks_done) {
        gw_log(GW_LOG_WARN, "worker: stop functions still running after "
                            "%d s; exiting", GW_STOP_HOOKS_TIMEOUT);
    }
    event_base_loopbreak(gw_loop_base());
}

/* Once no request is left: runs require("paygate")._stop() (the functions
 * given to paygate.on_stop) in a coroutine, for at most
 * GW_STOP_HOOKS_TIMEOUT s, then ends the loop. */
static void
run_stop_hooks(void)
{
    lua_State *L = w.L;
    struct timeval tv = { GW_STOP_HOOKS_TIMEOUT, 0 };

    if (w.hooks_started) {
        return;
    }
    w.hooks_started = 1;
    lua_getglobal(L, "require");
    lua_pushliteral(L, "paygate");
    if (lua_pcall(L, 1, 1, 0) != 0 || !lua_istable(L, -1)) {
        lua_pop(L, 1);
        event_base_loopbreak(gw_loop_base());
        return;
    }
    lua_getfield(L, -1, "_stop");
    lua_remove(L, -2);
    if (!lua_isfunction(L, -1)) {
        lua_pop(L, 1);
        event_base_loopbreak(gw_loop_base());
        return;
    }
    w.hooks_deadline = evtimer_new(gw_loop_base(), on_hooks_deadline, NULL);
    if (w.hooks_deadline != NULL) {
        evtimer_add(w.hooks_deadline, &tv);
    }
    if (gw_co_start(L, 0, &hooks_owner, NULL, NULL) == NULL) {
        event_base_loopbreak(gw_loop_base());
    }
}

static void
on_drained(void)
{
    /* the drain is over: its deadline would only say, while the stop
     * functions run, that 0 connections were left to close (they are
     * bounded by their own) */
    if (w.deadline != NULL) {
        evtimer_del(w.deadline);
    }
    run_stop_hooks();
}

static void
on_deadline(evutil_socket_t fd, short what, void *arg)
{
    gw_log(GW_LOG_WARN, "worker: shutdown deadline passed with %d "
                        "connections left; closing them",
           gw_server_connections());
    gw_server_close_all();
    run_stop_hooks();
}

static void
on_stop(evutil_socket_t sig, short what, void *arg)
{
    struct timeval tv;

    if (w.stopping) {
        return;
    }
    w.stopping = 1;
    tv.tv_sec = (time_t) w.o->shutdown_timeout;
    tv.tv_usec = (suseconds_t) ((w.o->shutdown_timeout
                                 - (double) tv.tv_sec) * 1e6);
    w.deadline = evtimer_new(gw_loop_base(), on_deadline, NULL);
    if (w.deadline != NULL) {
        evtimer_add(w.deadline, &tv);
    }
    gw_server_drain(on_drained);
}

static void
on_gauges(evutil_socket_t fd, short what, void *arg)
{
    int64_t kb = lua_gc(w.L, LUA_GCCOUNT, 0);
    int64_t b = lua_gc(w.L, LUA_GCCOUNTB, 0);

    gw_metrics_gauges(kb * 1024 + b, gw_server_in_flight(),
                      gw_server_connections());
    gw_watchdog_mark();             /* the loop turned (limits.loop_stall) */
}

static void
app_done(struct gw_co *co, int nres)
{
    lua_State *L = w.L;
    int ref;

    gw_co_free(co);
    if (w.told_fail[0] != '\0') {
        /* the master was told this worker failed: it would never get its
         * go, serving nothing while counted (and `paygate run` would wait
         * for good for its first worker) */
        gw_log(GW_LOG_ERROR, "app failed to load: %s (it called "
                             "paygate.runtime.fail, then went on loading "
                             "instead of exiting)", w.told_fail);
        w.exit_code = 1;
        event_base_loopbreak(gw_loop_base());
        return;
    }
    lua_getglobal(L, "require");
    lua_pushliteral(L, "paygate");
    if (lua_pcall(L, 1, 1, 0) != 0 || !lua_istable(L, -1)) {
        gw_log(GW_LOG_ERROR, "worker: paygate framework failed to load");
        w.exit_code = 1;
        ready('F');
        event_base_loopbreak(gw_loop_base());
        return;
    }
    lua_getfield(L, -1, "_dispatch");
    ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_pop(L, 1);
    if (gw_server_start(L, w.listen_fd, ref, &w.o->server, w.ssl_ctx)
        != GW_OK) {
        gw_log(GW_LOG_ERROR, "worker: cannot watch the listening socket");
        w.exit_code = 1;
        ready('F');
        event_base_loopbreak(gw_loop_base());
        return;
    }
    ready('R');
}

static void
app_fail(struct gw_co *co, const char *msg)
{
    gw_log(GW_LOG_ERROR, "app failed to load: %s", msg);
    gw_co_free(co);
    w.exit_code = 1;
    ready_why('F', msg);
    event_base_loopbreak(gw_loop_base());
}

static const struct gw_co_owner app_owner = { app_done, app_fail, NULL, NULL };

static int
runtime_init(const char *app_dir)
{
    signal(SIGPIPE, SIG_IGN);
    /* a file size limit (ulimit -f) reached: the write fails EFBIG (the
     * store answers "disk full", reads go on) instead of the signal
     * killing the worker, and its replacement, for ever */
    signal(SIGXFSZ, SIG_IGN);
    gw_loop_forget();               /* a base inherited across fork */
    if (gw_loop_init() != GW_OK) {
        fprintf(stderr, "paygate: cannot create the event loop\n");
        return GW_ERR;
    }
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
        fprintf(stderr, "paygate: cannot initialise libcurl\n");
        return GW_ERR;
    }
    w.L = gw_lstate_new(app_dir, gw_modules);
    if (w.L == NULL) {
        fprintf(stderr, "paygate: no memory for the Lua state\n");
        return GW_ERR;
    }
    return GW_OK;
}

int
gw_worker_main(const struct gw_opts *o, int listen_fd, SSL_CTX *ctx,
               int ready_fd, int slot, int gen)
{
    char path[4096];
    struct timeval one = { 1, 0 };

    w.o = o;
    w.listen_fd = listen_fd;
    w.ssl_ctx = ctx;
    w.ready_fd = ready_fd;
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    signal(SIGHUP, SIG_IGN);
    signal(SIGCHLD, SIG_DFL);
    gw_metrics_attach(slot);
    gw_watchdog_attach(slot);
    if (runtime_init(o->app_dir) != GW_OK) {
        ready('F');
        return 1;
    }
    push_runtime_info(w.L, "worker", o->app_dir, o->config_file,
                      o->listen, gen, o->server.request_timeout);
    if (o->resolver[0] != '\0') {   /* checked when the config was read */
        gw_dns_configure(o->resolver, -1, -1, -1, path, sizeof(path));
    }

    w.sigterm = evsignal_new(gw_loop_base(), SIGTERM, on_stop, NULL);
    w.sigint = evsignal_new(gw_loop_base(), SIGINT, on_stop, NULL);
    evsignal_add(w.sigterm, NULL);
    evsignal_add(w.sigint, NULL);
    w.gauges = event_new(gw_loop_base(), -1, EV_PERSIST, on_gauges, NULL);
    evtimer_add(w.gauges, &one);

    snprintf(path, sizeof(path), "%s/app.lua", o->app_dir);
    if (luaL_loadfile(w.L, path) != 0) {
        gw_log(GW_LOG_ERROR, "app failed to load: %s",
               lua_tostring(w.L, -1));
        ready_why('F', lua_tostring(w.L, -1));
        return 1;
    }
    /* The app's top level runs in a coroutine: it may wait (migrations). */
    w.exit_code = 0;
    if (gw_co_start(w.L, 0, &app_owner, NULL, NULL) == NULL) {
        ready('F');
        return 1;
    }
    if (w.exit_code == 0) {
        event_base_dispatch(gw_loop_base());
    }
    if (w.exit_code == 0 && w.stopping) {
        gw_log(GW_LOG_INFO, "worker: stopped");
    }
    return w.exit_code;
}

/* ---- exec ----------------------------------------------------------- */

static void
exec_done(struct gw_co *co, int nres)
{
    lua_State *L = gw_co_state(co);

    w.exit_code = 0;
    if (nres >= 1 && lua_type(L, 1) == LUA_TNUMBER) {
        lua_Number v = lua_tonumber(L, 1);

        /* a shell sees only 8 bits: 256 would read as success */
        w.exit_code = (v >= 0 && v <= 255 && v == (int) v) ? (int) v : 1;
    } else if (nres >= 1 && lua_type(L, 1) == LUA_TBOOLEAN) {
        w.exit_code = lua_toboolean(L, 1) ? 0 : 1;
    }
    gw_co_free(co);
    event_base_loopbreak(gw_loop_base());
}

static void
exec_fail(struct gw_co *co, const char *msg)
{
    /* error() with no value is how Lua 5.1 scripts (busted) ask for a
     * plain exit status 1: say nothing then. */
    if (!lua_isnil(gw_co_state(co), -1)) {
        fprintf(stderr, "paygate exec: %s\n", msg);
    }
    gw_co_free(co);
    w.exit_code = 1;
    event_base_loopbreak(gw_loop_base());
}

static const struct gw_co_owner exec_owner = { exec_done, exec_fail, NULL,
                                                NULL };

int
gw_exec_main(const char *script, int argc, char **argv)
{
    lua_State *L;

    if (runtime_init(NULL) != GW_OK) {
        return 1;
    }
    L = w.L;
    gw_metrics_attach(-1);
    {
        /* paygate.app_dir in exec: the script's folder (absolute) */
        char *abs = realpath(script, NULL);
        char *slash = abs != NULL ? strrchr(abs, '/') : NULL;

        if (slash != NULL) {
            *slash = '\0';
        }
        push_runtime_info(L, "exec", slash != NULL ? (abs[0] ? abs : "/")
                                                   : NULL, NULL, NULL, 0,
                          0);
        free(abs);
    }

    /* arg, as the standalone interpreter sets it (busted reads it) */
    lua_createtable(L, argc, 1);
    lua_pushstring(L, script);
    lua_rawseti(L, -2, 0);
    for (int i = 0; i < argc; i++) {
        lua_pushstring(L, argv[i]);
        lua_rawseti(L, -2, i + 1);
    }
    lua_setglobal(L, "arg");

    if (luaL_loadfile(L, script) != 0) {
        fprintf(stderr, "paygate exec: %s\n", lua_tostring(L, -1));
        return 2;
    }
    for (int i = 0; i < argc; i++) {
        lua_pushstring(L, argv[i]);
    }
    w.exit_code = -1;
    if (gw_co_start(L, argc, &exec_owner, NULL, NULL) == NULL) {
        fprintf(stderr, "paygate exec: no memory\n");
        return 1;
    }
    if (w.exit_code == -1) {
        event_base_dispatch(gw_loop_base());
    }
    /* stdout is flushed, and a failure to write it reported, by main */
    return w.exit_code < 0 ? 1 : w.exit_code;
}
