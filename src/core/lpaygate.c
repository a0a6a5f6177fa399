/*
 * lpaygate.c -- paygate.core: what every module needs and nothing above
 * core provides: the scheduling primitives (sleep, spawn/task), the
 * clocks (now, time, mono), the one error shape (error, is_error), null,
 * listdir, write_file, mkdir_p, lock_file, and the logger's C half.
 */
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netinet/in.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <event2/event.h>

#include "co.h"
#include "fdio.h"
#include "log.h"
#include "loop.h"
#include "lstate.h"

#define LTASK_MT "paygate.task"
#define LEVENT_MT "paygate.event"
#define LGUARD_MT "paygate.abandon_guard"
#define LLOCK_MT "paygate.file_lock"
#define LREADBUF_MT "paygate.read_buffer"

/* ---- sleep ---------------------------------------------------------- */

struct gw_sleep {
    struct event *ev;           /* owned */
    struct gw_co *co;           /* waiting coroutine; not owned */
};

static void
sleep_fire(evutil_socket_t fd, short what, void *arg)
{
    struct gw_sleep *s = arg;
    struct gw_co *co = s->co;

    event_free(s->ev);
    free(s);
    gw_co_wake(co, 0);
}

static void
sleep_cancel(void *arg)
{
    struct gw_sleep *s = arg;

    event_free(s->ev);
    free(s);
}

/* The longest sleep or wait the loop takes, in seconds (about 3 years). */
#define GW_MAX_WAIT 1e8

/*
 * syntax: ok = core.is_seconds(v[, zero_ok])
 * Whether v is a duration core.sleep takes: a number more than 0 (or 0
 * with zero_ok), at most 1e8; NaN, inf and anything else are not. What a
 * library checks an interval, timeout or pause with when it is given, so
 * that its task does not end on its first sleep.
 */
static int
lcore_is_seconds(lua_State *L)
{
    double v;

    if (lua_type(L, 1) != LUA_TNUMBER) {
        lua_pushboolean(L, 0);
        return 1;
    }
    v = lua_tonumber(L, 1);
    lua_pushboolean(L, (lua_toboolean(L, 2) ? v >= 0 : v > 0)
                       && v <= GW_MAX_WAIT);
    return 1;
}

/*
 * syntax: paygate.sleep(seconds)
 * yields: until the time has passed (0 gives other coroutines a turn).
 */
static int
lcore_sleep(lua_State *L)
{
    /* named here: luaL_argerror's "bad argument #1 to '?'" did not say
     * which function, called as a tail call or through pcall */
    double secs = lua_isnumber(L, 1) ? lua_tonumber(L, 1) : -1;
    struct gw_co *co;
    struct gw_sleep *s;
    struct timeval tv;

    if (!(secs >= 0) || secs > GW_MAX_WAIT) {
        return luaL_error(L, "paygate.sleep: seconds must be a number from"
                             " 0 to 1e8 (got %s)", lua_isnumber(L, 1)
                             ? lua_tostring(L, 1) : luaL_typename(L, 1));
    }
    co = gw_co_current(L);
    s = malloc(sizeof(*s));
    if (s == NULL) {
        return luaL_error(L, "no memory");
    }
    s->co = co;
    s->ev = evtimer_new(gw_loop_base(), sleep_fire, s);
    if (s->ev == NULL) {
        free(s);
        return luaL_error(L, "no memory");
    }
    tv.tv_sec = (time_t) secs;
    tv.tv_usec = (suseconds_t) ((secs - (double) tv.tv_sec) * 1e6);
    evtimer_add(s->ev, &tv);
    return gw_co_wait(L, sleep_cancel, s);
}

static int
lcore_now(lua_State *L)
{
    lua_pushnumber(L, gw_loop_now());
    return 1;
}

/* core.time() -> wall clock seconds now (not the cached loop time) */
static int
lcore_time(lua_State *L)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    lua_pushnumber(L, (lua_Number) ts.tv_sec + ts.tv_nsec / 1e9);
    return 1;
}

/* core.mono() -> monotonic seconds now: for durations and deadlines */
static int
lcore_mono(lua_State *L)
{
    lua_pushnumber(L, gw_loop_mono_fresh());
    return 1;
}

/* core.time_left() -> seconds until the calling coroutine's owner ends
 * it (a request handler's deadline: 504 then, the handler cancelled), or
 * nil when nothing will (a task, an exec script, outside a coroutine).
 * Work that must finish before it (a call whose outcome is to be
 * recorded) sizes its own timeout from this. */
static int
lcore_time_left(lua_State *L)
{
    struct gw_co *co = gw_co_find(L);
    double at;

    if (co == NULL || co->owner == NULL || co->owner->deadline == NULL
        || (at = co->owner->deadline(co)) <= 0) {
        lua_pushnil(L);
        return 1;
    }
    lua_pushnumber(L, at - gw_loop_mono_fresh());
    return 1;
}

/* core.listdir(path) -> { names } (sorted, no dot files) | nil, err.
 * Blocking: for start-up work (migrations), not for handlers. */
static int
lcore_listdir(lua_State *L)
{
    size_t         len;
    const char    *path = luaL_checklstring(L, 1, &len);
    DIR           *d;
    struct dirent *e;
    int            n = 0;

    if (memchr(path, '\0', len) != NULL) {
        /* cut at the NUL, it would name another folder */
        return gw_push_error(L, "unavailable", 0, "listdir %s: not a path",
                             path);
    }
    d = opendir(path);
    if (d == NULL) {
        return gw_push_error(L, "unavailable", 0, "listdir %s: %s", path,
                             strerror(errno));
    }
    lua_newtable(L);
    for (e = readdir(d); e != NULL; e = readdir(d)) {
        if (e->d_name[0] == '.') {
            continue;
        }
        lua_pushstring(L, e->d_name);
        lua_rawseti(L, -2, ++n);
    }
    closedir(d);
    lua_getglobal(L, "table");
    lua_getfield(L, -1, "sort");
    lua_pushvalue(L, -3);
    lua_call(L, 1, 0);
    lua_pop(L, 1);
    return 1;
}

/* core.file_type(path) -> "file" | "directory" | "other" (a FIFO, a
 * socket, a device), its modification time (seconds since 1970: how
 * old a state file is, for paygate doctor) and its permission bits (a
 * number: 420 is 0644) | nil, err (kind unavailable:
 * it cannot be stat'd). A symbolic link is followed. Needs no read
 * permission on path itself, so a folder that cannot be opened is still a
 * "directory". Blocking: for command-line and start-up work. */
static int
lcore_file_type(lua_State *L)
{
    size_t      len;
    const char *path = luaL_checklstring(L, 1, &len);
    struct stat st;

    if (memchr(path, '\0', len) != NULL) {
        /* cut at the NUL, it would name another file */
        return gw_push_error(L, "unavailable", 0, "stat %s: not a path",
                             path);
    }
    if (stat(path, &st) != 0) {
        return gw_push_error(L, "unavailable", 0, "stat %s: %s", path,
                             strerror(errno));
    }
    lua_pushstring(L, S_ISREG(st.st_mode) ? "file"
                      : S_ISDIR(st.st_mode) ? "directory" : "other");
    lua_pushnumber(L, (lua_Number) st.st_mtime);
    lua_pushinteger(L, (lua_Integer) (st.st_mode & 07777));
    return 3;
}

/* The most core.read_file reads unless told otherwise, and the most it
 * may be told: a key, a certificate chain or a secret is a few KiB, and a
 * file past this is the wrong one (a log, a database, a disk image). */
#define READ_FILE_MAX      (1024 * 1024)
#define READ_FILE_MAX_MAX  (64 * 1024 * 1024)

/* core.read_file's heap buffer, owned by a userdata made before it: the
 * push of the file's bytes may raise (no memory), and the buffer (a
 * private key, often) is then wiped and freed by __gc, not lost. p and
 * cap follow each new buffer. */
struct gw_read_buf {
    char   *p;                  /* owned, or NULL */
    size_t  cap;
};

/* Wipes and frees rb's buffer (NULL-safe; safe twice). */
static void
read_buf_release(struct gw_read_buf *rb)
{
    if (rb != NULL && rb->p != NULL) {
        explicit_bzero(rb->p, rb->cap);
        free(rb->p);
        rb->p = NULL;
    }
}

/* __gc: reachable with any userdata through getmetatable, so it ignores
 * what is not a read buffer instead of raising */
static int
lreadbuf_gc(lua_State *L)
{
    read_buf_release(gw_testudata(L, 1, LREADBUF_MT));
    return 0;
}

/* nil, err for core.read_file: kind, "NAME: REASON", err.key = name and
 * err.reason = reason (for a caller that words its own message) */
static int
read_file_refused(lua_State *L, const char *kind, const char *name,
                  const char *reason)
{
    gw_push_error(L, kind, 0, "%s: %s", name, reason);
    lua_pushstring(L, name);
    lua_setfield(L, -2, "key");
    lua_pushstring(L, reason);
    lua_setfield(L, -2, "reason");
    return 2;
}

/* the kind of an errno from stat(2), open(2) or read(2) */
static const char *
read_file_kind(int e)
{
    return e == ENOENT || e == ENOTDIR ? "not_found"
           : e == EACCES || e == EPERM ? "denied" : "io";
}

/*
 * core.read_file(path, name[, max]) -> bytes | nil, err
 * A small file read whole: a secret, a key, a certificate a config names.
 * name is what the messages call it (the config key that named it); they
 * never hold the path (a secret may have been pasted where its path
 * belongs) nor a byte of the file. err.kind:
 *   not_found   ENOENT, ENOTDIR ("No such file or directory")
 *   denied      EACCES, EPERM ("Permission denied")
 *   not_a_file  a folder ("Is a directory": it opens, and its read fails),
 *               a FIFO, a socket, a device: never read (a FIFO's open
 *               waits for a writer, /dev/zero's read never ends)
 *   empty       "the file is empty"
 *   too_large   over max bytes (default 1 MiB, at most 64 MiB)
 *   io          another error, in strerror's words
 * err.message is "NAME: REASON"; err.key is name, err.reason REASON.
 * read(2), no stdio: no buffer but the result keeps a copy of a secret.
 * Blocking: for start-up and command-line work.
 */
static int
lcore_read_file(lua_State *L)
{
    size_t      plen, cap, n = 0;
    const char *path = gw_arg_string(L, 1, "paygate.read_file", "path",
                                     &plen);
    const char *name = gw_arg_string(L, 2, "paygate.read_file", "name",
                                     NULL);
    lua_Number  m = READ_FILE_MAX;
    size_t      max;
    struct stat st;
    char       *buf, *more;
    int         fd, e = 0;
    char        why[64];
    struct gw_read_buf *rb;

    if (!lua_isnoneornil(L, 3)) {
        /* a number only: "64" is not a size */
        m = lua_type(L, 3) == LUA_TNUMBER ? lua_tonumber(L, 3) : 0;
    }
    if (!(m >= 1 && m <= READ_FILE_MAX_MAX) || m != floor(m)) {
        return luaL_error(L, "paygate.read_file: max must be a whole number"
                          " of bytes from 1 to %d", READ_FILE_MAX_MAX);
    }
    max = (size_t) m;
    if (memchr(path, '\0', plen) != NULL) {
        /* cut at the NUL, it would name another file */
        return read_file_refused(L, "not_found", name,
                                 "not a path (it holds a NUL byte)");
    }
    /* the buffer's owner first (it may raise: no memory), before the fd
     * and the buffer are, so neither leaks whatever raises after */
    rb = lua_newuserdata(L, sizeof(*rb));
    rb->p = NULL;
    rb->cap = 0;
    luaL_getmetatable(L, LREADBUF_MT);
    lua_setmetatable(L, -2);
    /* stat first: a FIFO or a device is never opened (an open can have
     * effects of its own: a FIFO's waits for a writer) */
    if (stat(path, &st) != 0) {
        e = errno;
        return read_file_refused(L, read_file_kind(e), name, strerror(e));
    }
    if (S_ISDIR(st.st_mode)) {
        return read_file_refused(L, "not_a_file", name, strerror(EISDIR));
    }
    if (!S_ISREG(st.st_mode)) {
        return read_file_refused(L, "not_a_file", name, "not a regular file"
                                 " (a FIFO, a socket or a device)");
    }
    /* O_NONBLOCK: should the path become a FIFO after the stat, the open
     * does not wait; the fstat below then refuses it */
    fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    if (fd < 0) {
        e = errno;
        return read_file_refused(L, read_file_kind(e), name, strerror(e));
    }
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return read_file_refused(L, "not_a_file", name, "not a regular file"
                                 " (a FIFO, a socket or a device)");
    }
    if (st.st_size > (off_t) max) {
        close(fd);
        snprintf(why, sizeof(why), "the file is over %zu bytes", max);
        return read_file_refused(L, "too_large", name, why);
    }
    /* room for the size fstat gave and one byte more, to see the end (a
     * file that grows meanwhile, one of /proc that says 0, reads on) */
    cap = (size_t) st.st_size + 1;
    if (cap < 4096) {
        cap = max + 1 < 4096 ? max + 1 : 4096;
    }
    buf = rb->p = malloc(cap);
    rb->cap = cap;
    while (buf != NULL) {
        n += gw_read_full(fd, buf + n, cap - n, &e);
        if (e != 0 || n < cap || n > max) {
            break;      /* a read failed, the file ended, or it is too long */
        }
        /* a new buffer, the old one wiped: realloc would leave a copy */
        cap = cap > (max + 1) / 2 ? max + 1 : cap * 2;
        more = malloc(cap);
        if (more != NULL) {
            memcpy(more, buf, n);
        }
        explicit_bzero(buf, n);
        free(buf);
        buf = rb->p = more;
        rb->cap = cap;
    }
    close(fd);
    if (buf == NULL) {
        return read_file_refused(L, "io", name, strerror(ENOMEM));
    }
    if (e == 0 && n > 0 && n <= max) {
        lua_pushlstring(L, buf, n);     /* may raise: rb frees buf then */
    }
    read_buf_release(rb);
    if (e != 0) {
        return read_file_refused(L, read_file_kind(e), name, strerror(e));
    }
    if (n == 0) {
        return read_file_refused(L, "empty", name, "the file is empty");
    }
    if (n > max) {
        snprintf(why, sizeof(why), "the file is over %zu bytes", max);
        return read_file_refused(L, "too_large", name, why);
    }
    return 1;
}

/*
 * The mode argument at idx of fn (dflt when absent): an integer from 0 to
 * 0777 for a file, to 07777 without the sticky bit (01000) for a folder.
 * Lua has no octal numbers: 0600 there is the decimal 600, 01130 in
 * octal, which made a file its owner cannot read (and 0755 a folder it
 * cannot list); such a mode is refused, saying what to write. Raises.
 */
static mode_t
check_mode(lua_State *L, int idx, const char *fn, lua_Integer dflt,
           int folder)
{
    lua_Number  n;
    lua_Integer m, as_octal = 0;
    char        digits[32], why[256];
    int         octal_digits = 1, k;

    if (lua_isnoneornil(L, idx)) {
        return (mode_t) dflt;
    }
    n = lua_tonumber(L, idx);
    if (lua_type(L, idx) != LUA_TNUMBER || !(n >= 0 && n <= 07777)
        || n != floor(n))
    {
        luaL_error(L, "%s: mode must be an integer from 0 to %s (got %s)",
                   fn, folder ? "07777" : "0777",
                   lua_type(L, idx) == LUA_TNUMBER ? lua_tostring(L, idx)
                   : luaL_typename(L, idx));
    }
    m = (lua_Integer) n;
    if (folder ? (m & 01000) == 0 : m <= 0777) {
        return (mode_t) m;
    }
    snprintf(digits, sizeof(digits), "%ld", (long) m);
    for (const char *d = digits; *d != '\0'; d++) {
        octal_digits = octal_digits && *d <= '7';
        as_octal = as_octal * 8 + (*d - '0');
    }
    /* (lua_pushfstring has no %o: the text is made here) */
    k = snprintf(why, sizeof(why), "%s: mode %s is 0%lo in octal, %s", fn,
                 digits, (unsigned long) m, folder
                 ? "with the sticky bit 01000" : "past 0777");
    if (octal_digits && (folder ? (as_octal & 01000) == 0 && as_octal <= 07777
                                : as_octal <= 0777)) {
        snprintf(why + k, sizeof(why) - k, " (Lua reads 0%s as the decimal"
                 " %s): write %ld for 0%s, or tonumber(\"%s\", 8)", digits,
                 digits, (long) as_octal, digits, digits);
    }
    luaL_error(L, "%s", why);
    return 0;
}

/*
 * core.write_file(path, data[, mode[, opts]]) -> true | nil, err (kind io)
 * Replaces path with data whole or not at all: written to a temporary
 * file beside it (made afresh with mode, default 0600: never readable by
 * others meanwhile, whatever a crash left there), flushed to the disk (fsync), renamed over path, and the
 * folder flushed so the rename lasts. On any failure (a full disk, say)
 * the temporary file is removed and path is left as it was. opts.sync =
 * false: neither fsync (whole and private all the same, but a crash may
 * lose it: for a diagnosis written while a request waits, not a record).
 * Blocking: for small files written now and then (a cache, a state file).
 */
static int
lcore_write_file(lua_State *L)
{
    size_t      len, plen, off = 0;
    const char *path = gw_arg_string(L, 1, "paygate.write_file", "path",
                                     &plen);
    const char *data = gw_arg_string(L, 2, "paygate.write_file", "data",
                                     &len);
    mode_t      mode = check_mode(L, 3, "paygate.write_file", 0600, 0);
    char        tmp[4096];
    int         fd, err = 0, sync = 1;
    const char *step = "open";

    if (!lua_isnoneornil(L, 4)) {
        if (lua_type(L, 4) != LUA_TTABLE) {
            return luaL_error(L, "paygate.write_file: opts must be a table"
                              " (got %s)", luaL_typename(L, 4));
        }
        lua_getfield(L, 4, "sync");
        if (!lua_isnil(L, -1) && lua_type(L, -1) != LUA_TBOOLEAN) {
            return luaL_error(L, "paygate.write_file: opts.sync must be a"
                              " boolean (got %s)", luaL_typename(L, -1));
        }
        sync = lua_isnil(L, -1) || lua_toboolean(L, -1);
        lua_pop(L, 1);
    }

    if (memchr(path, '\0', plen) != NULL) {
        /* cut at the NUL, it would name another file */
        return gw_push_error(L, "io", 0, "write_file %s: not a path", path);
    }
    if (snprintf(tmp, sizeof(tmp), "%s.%ld.tmp", path, (long) getpid())
        >= (int) sizeof(tmp))
    {
        return gw_push_error(L, "io", 0, "write_file %s: path too long",
                             path);
    }
    /* made afresh: a temporary file a crash left (same pid) would keep its
     * old mode through O_TRUNC, and a link planted there is not followed */
    if (unlink(tmp) != 0 && errno != ENOENT) {
        return gw_push_error(L, "io", 0, "write_file %s: unlink: %s", tmp,
                             strerror(errno));
    }
    fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, (mode_t) mode);
    if (fd < 0) {
        return gw_push_error(L, "io", 0, "write_file %s: open: %s", tmp,
                             strerror(errno));
    }
    while (off < len) {
        ssize_t n = write(fd, data + off, len - off);

        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            err = n < 0 ? errno : ENOSPC;
            step = "write";
            break;
        }
        off += (size_t) n;
    }
    if (err == 0 && sync && fsync(fd) != 0) {
        err = errno;
        step = "fsync";
    }
    if (close(fd) != 0 && err == 0) {
        err = errno;
        step = "close";
    }
    if (err == 0 && rename(tmp, path) != 0) {
        err = errno;
        step = "rename";
    }
    if (err != 0) {
        unlink(tmp);
        return gw_push_error(L, "io", 0, "write_file %s: %s: %s", path, step,
                             strerror(err));
    }
    if (sync) {
        gw_fsync_parent(path);      /* the rename itself, durable */
    }
    lua_pushboolean(L, 1);
    return 1;
}

/*
 * core.mkdir_p(dir[, mode]) -> true | nil, err (kind io)
 * Makes dir and its missing parents (mode default 0755; an existing one
 * is fine), by mkdir(2) itself: never through a shell, whatever the path
 * holds (it often comes from a config). err.message says which folder
 * and why, as strerror words the first refusal, and, when that was a
 * parent, which: "cannot create the folder a/b/c: Not a directory
 * (making a/b)". Blocking: folders made at start or now and then.
 */
static int
lcore_mkdir_p(lua_State *L)
{
    size_t      len;
    const char *dir = gw_arg_string(L, 1, "paygate.mkdir_p", "dir", &len);
    mode_t      mode = check_mode(L, 2, "paygate.mkdir_p", 0755, 1);
    char        path[4096], at[4096];
    struct stat st;
    size_t      i;
    int         err = 0;

    if (len == 0 || len >= sizeof(path) || memchr(dir, '\0', len) != NULL) {
        return gw_push_error(L, "io", 0, "cannot create the folder %s: %s",
                             dir, len == 0 ? "empty path"
                             : "not a path");
    }
    memcpy(path, dir, len + 1);
    at[0] = '\0';
    /* each prefix ending before a '/', then the whole path */
    for (i = 1; i <= len; i++) {
        if (i < len && path[i] != '/') {
            continue;
        }
        path[i] = '\0';
        if (mkdir(path, (mode_t) mode) != 0 && errno != EEXIST && err == 0) {
            err = errno;
            memcpy(at, path, i + 1);
        }
        if (i < len) {
            path[i] = '/';
        }
    }
    if (stat(dir, &st) == 0 && S_ISDIR(st.st_mode)) {
        lua_pushboolean(L, 1);
        return 1;
    }
    if (err == 0) {
        err = ENOTDIR;                   /* there, but a file */
    }
    if (at[0] != '\0' && strcmp(at, dir) != 0) {
        return gw_push_error(L, "io", 0, "cannot create the folder %s: %s"
                             " (making %s)", dir, strerror(err), at);
    }
    return gw_push_error(L, "io", 0, "cannot create the folder %s: %s", dir,
                         strerror(err));
}

/*
 * core.chmod(path, mode) -> true | nil, err (kind io)
 * Sets path's mode (0 .. 0777, checked as core.write_file's): to make a
 * file written before under a looser mode its owner's alone. A symbolic
 * link is not followed (refused: it would change what it points to,
 * wherever that is). Blocking: for start-up work.
 */
static int
lcore_chmod(lua_State *L)
{
    size_t      len;
    const char *path = gw_arg_string(L, 1, "paygate.chmod", "path", &len);
    mode_t      mode;
    struct stat st;

    if (lua_isnoneornil(L, 2)) {
        return luaL_error(L, "paygate.chmod: mode must be an integer from 0"
                          " to 0777 (got nil)");
    }
    mode = check_mode(L, 2, "paygate.chmod", 0, 0);
    if (memchr(path, '\0', len) != NULL) {
        /* cut at the NUL, it would name another file */
        return gw_push_error(L, "io", 0, "chmod %s: not a path", path);
    }
    if (lstat(path, &st) != 0) {
        return gw_push_error(L, "io", 0, "chmod %s: %s", path,
                             strerror(errno));
    }
    if (S_ISLNK(st.st_mode)) {
        return gw_push_error(L, "io", 0, "chmod %s: a symbolic link (not"
                             " followed)", path);
    }
    if (chmod(path, mode) != 0) {
        return gw_push_error(L, "io", 0, "chmod %s: %s", path,
                             strerror(errno));
    }
    lua_pushboolean(L, 1);
    return 1;
}

/*
 * core.error(kind, message[, fields]) -> err: the one error shape. fields
 * (a table, may be nil) becomes the error itself, so extra fields (code,
 * status, detail, ...) stay; kind and message are set, retryable defaults
 * to false. tostring(err) is "kind: message".
 */
static int
lcore_error(lua_State *L)
{
    if (lua_type(L, 1) != LUA_TSTRING) {
        return luaL_error(L, "paygate.error: kind must be a string");
    }
    if (!lua_isnoneornil(L, 2) && lua_type(L, 2) != LUA_TSTRING
        && lua_type(L, 2) != LUA_TNUMBER) {
        return luaL_error(L, "paygate.error: message must be a string");
    }
    if (lua_isnoneornil(L, 3)) {
        lua_settop(L, 2);
        lua_createtable(L, 0, 3);
    } else if (lua_type(L, 3) == LUA_TTABLE) {
        lua_settop(L, 3);
    } else {
        return luaL_error(L, "paygate.error: fields must be a table");
    }
    lua_pushvalue(L, 1);
    lua_setfield(L, 3, "kind");
    if (lua_isnil(L, 2)) {
        lua_pushliteral(L, "");
    } else {
        lua_pushvalue(L, 2);
    }
    lua_setfield(L, 3, "message");
    lua_getfield(L, 3, "retryable");
    if (lua_isnil(L, -1)) {
        lua_pushboolean(L, 0);
        lua_setfield(L, 3, "retryable");
    }
    lua_pop(L, 1);
    gw_push_error_mt(L);
    lua_setmetatable(L, 3);
    return 1;
}

/* core.is_error(v) -> true when v was made by core.error / gw_push_error */
static int
lcore_is_error(lua_State *L)
{
    int is = 0;

    if (lua_type(L, 1) == LUA_TTABLE && lua_getmetatable(L, 1)) {
        gw_push_error_mt(L);
        is = lua_rawequal(L, -1, -2);
    }
    lua_pushboolean(L, is);
    return 1;
}

static int
lcore_update_time(lua_State *L)
{
    gw_loop_refresh_time();     /* the time, not a new turn of the loop */
    lua_pushnumber(L, gw_loop_now());
    return 1;
}

/* ---- tasks ---------------------------------------------------------- */

struct gw_waiter {
    struct gw_co     *co;       /* waiting coroutine; not owned */
    struct gw_task   *task;     /* the task waited on; not owned */
    struct gw_waiter *next;     /* list link, owned by the task */
};

struct gw_task {
    struct gw_co     *co;       /* running coroutine, NULL once ended */
    int               self_ref; /* registry ref keeping the ud alive
                                   while running; LUA_NOREF after */
    int               results;  /* registry ref to a results table */
    int               ok;       /* 1 returned, 0 raised (after end) */
    int               ended;    /* 1 after done, fail or cancel */
    struct gw_waiter *waiters;  /* owned list */
    char              rid[48];  /* request id inherited from the spawner */
};


/* How many results the table at idx holds: its n (task_done sets it),
 * not its length, which a nil among them may cut short (1, nil, 3, nil
 * has a border at 1). */
static int
results_n(lua_State *L, int idx)
{
    int n;

    lua_getfield(L, idx, "n");
    n = lua_isnumber(L, -1) ? (int) lua_tointeger(L, -1)
                            : (int) lua_objlen(L, idx < 0 ? idx - 1 : idx);
    lua_pop(L, 1);
    return n;
}

static void
task_wake_all(struct gw_task *t)
{
    while (t->waiters != NULL) {
        struct gw_waiter *w = t->waiters;
        lua_State *L = gw_co_state(w->co);
        int n;

        t->waiters = w->next;
        lua_rawgeti(L, LUA_REGISTRYINDEX, t->results);
        n = results_n(L, -1);
        if (!t->ok) {
            lua_pushnil(L);
            lua_rawgeti(L, -2, 1);
            lua_remove(L, -3);
            n = 2;
        } else {
            int base = lua_gettop(L);
            luaL_checkstack(L, n, "too many results");
            for (int i = 1; i <= n; i++) {
                lua_rawgeti(L, base, i);
            }
            lua_remove(L, base);
        }
        {
            struct gw_co *co = w->co;
            free(w);
            gw_co_wake(co, n);
        }
    }
}

static void
task_finish(struct gw_task *t)
{
    t->ended = 1;
    t->co = NULL;
    task_wake_all(t);
    luaL_unref(gw_co_main(), LUA_REGISTRYINDEX, t->self_ref);
    t->self_ref = LUA_NOREF;
}

static void
task_done(struct gw_co *co, int nres)
{
    struct gw_task *t = co->data;
    lua_State *L = gw_co_state(co);

    lua_createtable(L, nres, 1);
    lua_insert(L, 1);
    for (int i = nres; i >= 1; i--) {
        lua_rawseti(L, 1, i);
    }
    lua_pushinteger(L, nres);
    lua_setfield(L, 1, "n");
    t->results = luaL_ref(L, LUA_REGISTRYINDEX);
    t->ok = 1;
    gw_co_free(co);
    task_finish(t);
}

/* Is the value at idx a paygate error (the shared metatable)? */
static int
is_paygate_error(lua_State *L, int idx)
{
    int is = 0;

    if (lua_type(L, idx) == LUA_TTABLE && lua_getmetatable(L, idx)) {
        gw_push_error_mt(L);
        is = lua_rawequal(L, -1, -2);
        lua_pop(L, 2);
    }
    return is;
}

/* The task raised; the value it raised is on top of its coroutine's
 * stack, msg is its text with the traceback. Its waiters get nil and a
 * paygate error: the one raised (its kind, fields and retryable kept),
 * or kind task_failed saying what was raised (the traceback is in the
 * log line, with the request id) -- never a bare string. */
static void
task_fail(struct gw_co *co, const char *msg)
{
    struct gw_task *t = co->data;
    lua_State *L = gw_co_state(co), *M = gw_co_main();
    const char *tb = strstr(msg, "\nstack traceback:");

    gw_log_line(GW_LOG_ERROR, co->request_id, msg, strlen(msg), NULL, 0);
    lua_createtable(M, 1, 0);
    if (is_paygate_error(L, -1)) {
        lua_pushvalue(L, -1);
        lua_xmove(L, M, 1);
    } else {
        gw_push_error(M, "task_failed", 0, "%.*s",
                      (int) (tb != NULL ? (size_t) (tb - msg) : strlen(msg)),
                      msg);
        lua_remove(M, -2);                      /* gw_push_error's nil */
    }
    lua_rawseti(M, -2, 1);
    t->results = luaL_ref(gw_co_main(), LUA_REGISTRYINDEX);
    t->ok = 0;
    gw_co_free(co);
    task_finish(t);
}

static const struct gw_co_owner task_owner = { task_done, task_fail, NULL,
                                                NULL };

/*
 * syntax: task = paygate.spawn(fn, ...)
 * Runs fn(...) in a new coroutine, now, until it first waits (called in
 * a __gc finalizer or a debug hook: on the next loop turn, see co.c's
 * co_resume).
 * returns: a task handle (task:wait(), task:cancel(), task:finished()).
 */
static int
lcore_spawn(lua_State *L)
{
    int nargs = lua_gettop(L) - 1;
    struct gw_co *parent = gw_co_find(L);
    struct gw_task *t;
    struct gw_co *co;

    if (lua_type(L, 1) != LUA_TFUNCTION) {
        /* named here: luaL_checktype's "bad argument #1 to '?'" did not
         * say which function, called as a tail call or through pcall */
        return luaL_error(L, "paygate.spawn: fn must be a function (got %s)",
                          luaL_typename(L, 1));
    }
    t = lua_newuserdata(L, sizeof(*t));
    memset(t, 0, sizeof(*t));
    t->results = LUA_NOREF;
    luaL_getmetatable(L, LTASK_MT);
    lua_setmetatable(L, -2);
    lua_pushvalue(L, -1);
    t->self_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_insert(L, 1);                       /* task, fn, args... */
    if (parent != NULL && parent->request_id != NULL) {
        snprintf(t->rid, sizeof(t->rid), "%s", parent->request_id);
    }
    co = gw_co_start(L, nargs, &task_owner, t, t->rid[0] ? t->rid : NULL);
    if (co == NULL) {
        luaL_unref(L, LUA_REGISTRYINDEX, t->self_ref);
        t->self_ref = LUA_NOREF;
        t->ended = 1;
        return luaL_error(L, "no memory for a coroutine");
    }
    if (!t->ended) {
        t->co = co;
    }
    lua_settop(L, 1);
    return 1;
}

static void
waiter_cancel(void *arg)
{
    struct gw_waiter *w = arg;
    struct gw_waiter **pp = &w->task->waiters;

    while (*pp != NULL && *pp != w) {
        pp = &(*pp)->next;
    }
    if (*pp == w) {
        *pp = w->next;
    }
    free(w);
}

/*
 * syntax: ... = task:wait()
 * returns: the task function's results, or nil, err when it raised (the
 * paygate error it raised, else kind task_failed) or was cancelled (kind
 * cancelled).
 * yields: until the task ends (not when it already has).
 */
static int
ltask_wait(lua_State *L)
{
    struct gw_task *t = gw_checkudata(L, 1, LTASK_MT);
    struct gw_waiter *w;
    struct gw_co *co;

    if (t->ended) {
        int n, base;

        if (t->results == LUA_NOREF) {
            return gw_push_error(L, "cancelled", 0, "task was cancelled");
        }
        lua_rawgeti(L, LUA_REGISTRYINDEX, t->results);
        if (!t->ok) {
            lua_pushnil(L);
            lua_rawgeti(L, -2, 1);
            return 2;
        }
        /* absolute: t:wait(extra) puts the table above index 2 */
        base = lua_gettop(L);
        n = results_n(L, base);
        luaL_checkstack(L, n, "too many results");
        for (int i = 1; i <= n; i++) {
            lua_rawgeti(L, base, i);
        }
        return n;
    }
    co = gw_co_current(L);          /* raises: before any allocation */
    if (co == t->co) {
        /* it would wait for its own end, which comes only after the wait */
        return luaL_error(L, "task:wait: a task cannot wait for itself");
    }
    w = malloc(sizeof(*w));
    if (w == NULL) {
        return luaL_error(L, "no memory");
    }
    w->co = co;
    w->task = t;
    w->next = t->waiters;
    t->waiters = w;
    return gw_co_wait(L, waiter_cancel, w);
}

/*
 * syntax: task:cancel()
 * Stops the task where it waits (its pending operation is cancelled);
 * waiters get nil, err (kind cancelled). No effect on an ended task.
 */
static int
ltask_cancel(lua_State *L)
{
    struct gw_task *t = gw_checkudata(L, 1, LTASK_MT);
    struct gw_co *co = t->co;

    /* co->ended: it returned or raised, and task_done / task_fail are at
     * work (they allocate: a __gc finalizer may run there); it has ended */
    if (t->ended || co == NULL || co->ended) {
        return 0;
    }
    if (co->running) {
        return luaL_error(L, "a task cannot cancel itself");
    }
    /* before anything below allocates: a finalizer that cancels t again
     * then finds nothing to cancel, not the coroutine freed here */
    t->co = NULL;
    gw_co_abandon(co);
    gw_co_free(co);
    lua_createtable(L, 1, 0);
    gw_push_error(L, "cancelled", 0, "task was cancelled");
    lua_remove(L, -2);                          /* gw_push_error's nil */
    lua_rawseti(L, -2, 1);
    t->results = luaL_ref(L, LUA_REGISTRYINDEX);
    t->ok = 0;
    task_finish(t);
    return 0;
}

static int
ltask_finished(lua_State *L)
{
    struct gw_task *t = gw_checkudata(L, 1, LTASK_MT);

    lua_pushboolean(L, t->ended);
    return 1;
}

static int
ltask_gc(lua_State *L)
{
    struct gw_task *t = gw_testudata(L, 1, LTASK_MT);

    if (t == NULL) {
        return 0;
    }

    if (t->results != LUA_NOREF) {
        luaL_unref(L, LUA_REGISTRYINDEX, t->results);
        t->results = LUA_NOREF;
    }
    return 0;
}

/* ---- event: wait without polling ------------------------------------ */

/*
 * A broadcast signal inside one worker (condition-variable style): ev:set()
 * wakes every coroutine waiting at that moment, on the next loop turn
 * (never inside the setter's coroutine); a later ev:wait() waits for the
 * next set(). Waiters check their condition before waiting: there is no
 * yield between the check and the wait, so no set() is lost.
 */
struct gw_evwaiter {
    struct gw_co       *co;     /* waiting coroutine; not owned */
    struct gw_event    *ev;     /* NULL once the event was collected */
    struct event       *timer;  /* owned; NULL without a timeout */
    int                 ref;    /* registry ref to the event userdata:
                                   keeps it alive while we wait */
    int                 fired;  /* 1: set() reached it, wake pending */
    struct gw_evwaiter *next;   /* list link (waiting or fired list) */
    struct gw_evwaiter **pprev; /* NULL while unlinked */
};

struct gw_event {
    struct gw_evwaiter *waiting;  /* owned list: not yet signalled */
    struct gw_evwaiter *fired;    /* owned list: woken next turn */
    struct event       *wake;     /* owned; runs event_wake_fired() */
    int                 hold_ref; /* registry ref to the userdata while
                                     wake is pending; LUA_NOREF */
    unsigned            sets;     /* set() calls, for ev:count() */
};

static void
evwaiter_unlink(struct gw_evwaiter *w)
{
    if (w->pprev != NULL) {
        *w->pprev = w->next;
        if (w->next != NULL) {
            w->next->pprev = w->pprev;
        }
        w->pprev = NULL;
        w->next = NULL;
    }
}

static void
evwaiter_link(struct gw_evwaiter **head, struct gw_evwaiter *w)
{
    w->next = *head;
    if (*head != NULL) {
        (*head)->pprev = &w->next;
    }
    *head = w;
    w->pprev = head;
}

/* Frees w (unlinked first); drops its hold on the event. */
static void
evwaiter_free(struct gw_evwaiter *w)
{
    evwaiter_unlink(w);
    if (w->timer != NULL) {
        event_free(w->timer);
        w->timer = NULL;
    }
    luaL_unref(gw_co_main(), LUA_REGISTRYINDEX, w->ref);
    free(w);
}

/* The loop turn after set(): wakes every waiter signalled before this
 * turn with true. The batch is taken off the event first, so a woken
 * coroutine that sets again schedules another turn instead of being
 * served in this one; e stays alive (hold) until the batch is done. */
static void
event_wake_fired(evutil_socket_t fd, short what, void *arg)
{
    struct gw_event *e = arg;
    struct gw_evwaiter *batch = NULL;
    int hold = e->hold_ref;

    (void) fd;
    (void) what;
    e->hold_ref = LUA_NOREF;
    while (e->fired != NULL) {      /* move: a cancel unlinks from batch */
        struct gw_evwaiter *w = e->fired;

        evwaiter_unlink(w);
        evwaiter_link(&batch, w);
    }
    while (batch != NULL) {
        struct gw_evwaiter *w = batch;
        struct gw_co *co = w->co;

        evwaiter_free(w);
        lua_pushboolean(gw_co_state(co), 1);
        gw_co_wake(co, 1);
    }
    luaL_unref(gw_co_main(), LUA_REGISTRYINDEX, hold);
}

/* A waiter's deadline passed before any set(). */
static void
evwaiter_timeout(evutil_socket_t fd, short what, void *arg)
{
    struct gw_evwaiter *w = arg;
    struct gw_co *co = w->co;
    lua_State *L = gw_co_state(co);

    (void) fd;
    (void) what;
    evwaiter_free(w);
    gw_push_error(L, "timeout", 1, "event: no set() within the wait");
    gw_co_wake(co, 2);
}

/* The waiting coroutine was abandoned (request deadline, task:cancel(),
 * shutdown): the waiter leaves the lists and is freed. */
static void
evwaiter_cancel(void *arg)
{
    evwaiter_free(arg);
}

/*
 * syntax: ev = paygate.core.event()
 * returns: a new event (see above). Methods: wait, set, waiters, count.
 */
static int
lcore_event(lua_State *L)
{
    struct gw_event *e = lua_newuserdata(L, sizeof(*e));

    memset(e, 0, sizeof(*e));
    e->hold_ref = LUA_NOREF;
    luaL_getmetatable(L, LEVENT_MT);
    lua_setmetatable(L, -2);
    return 1;
}

/*
 * syntax: ok, err = ev:wait([timeout])
 * returns: true after a set(); nil, err (kind timeout) when timeout
 * seconds passed first. yields.
 */
static int
levent_wait(lua_State *L)
{
    struct gw_event *e = gw_checkudata(L, 1, LEVENT_MT);
    double secs = -1;
    struct gw_co *co;
    struct gw_evwaiter *w;

    if (!lua_isnoneornil(L, 2)) {
        /* named here: luaL_argerror's "bad argument #2 to '?'" did not
         * say which function, called as a tail call or through pcall */
        secs = lua_isnumber(L, 2) ? lua_tonumber(L, 2) : -1;
        if (!(secs >= 0) || secs > GW_MAX_WAIT) {
            return luaL_error(L, "ev:wait: timeout must be a number of "
                                 "seconds from 0 to 1e8 (got %s)",
                              lua_isnumber(L, 2) ? lua_tostring(L, 2)
                              : luaL_typename(L, 2));
        }
    }
    co = gw_co_current(L);          /* raises: before any allocation */
    w = calloc(1, sizeof(*w));
    if (w == NULL) {
        return luaL_error(L, "no memory");
    }
    if (secs >= 0) {
        struct timeval tv;

        w->timer = evtimer_new(gw_loop_base(), evwaiter_timeout, w);
        if (w->timer == NULL) {
            free(w);
            return luaL_error(L, "no memory");
        }
        tv.tv_sec = (time_t) secs;
        tv.tv_usec = (suseconds_t) ((secs - (double) tv.tv_sec) * 1e6);
        evtimer_add(w->timer, &tv);
    }
    w->co = co;
    w->ev = e;
    lua_pushvalue(L, 1);
    w->ref = luaL_ref(L, LUA_REGISTRYINDEX);
    evwaiter_link(&e->waiting, w);
    return gw_co_wait(L, evwaiter_cancel, w);
}

/* ev:set() for the event e, whose userdata is at L's index idx: moves
 * the waiters to the fired list and arms the zero-delay wake (never wakes
 * anyone itself). Returns how many were waiting, or -1 out of memory. */
static int
event_set(lua_State *L, struct gw_event *e, int idx)
{
    int n = 0;

    e->sets++;
    if (e->waiting != NULL && e->wake == NULL) {
        e->wake = evtimer_new(gw_loop_base(), event_wake_fired, e);
        if (e->wake == NULL) {
            return -1;
        }
    }
    while (e->waiting != NULL) {
        struct gw_evwaiter *w = e->waiting;

        evwaiter_unlink(w);
        if (w->timer != NULL) {
            event_del(w->timer);    /* signalled: no timeout any more */
        }
        w->fired = 1;
        evwaiter_link(&e->fired, w);
        n++;
    }
    if (n > 0) {
        struct timeval zero = { 0, 0 };

        if (e->hold_ref == LUA_NOREF) {
            lua_pushvalue(L, idx);
            e->hold_ref = luaL_ref(L, LUA_REGISTRYINDEX);
        }
        evtimer_add(e->wake, &zero);
    }
    return n;
}

/*
 * syntax: n = ev:set()
 * Signals every coroutine waiting now; they resume on the next loop turn.
 * returns: how many were waiting. Never yields.
 */
static int
levent_set(lua_State *L)
{
    struct gw_event *e = gw_checkudata(L, 1, LEVENT_MT);
    int n = event_set(L, e, 1);

    if (n < 0) {
        return luaL_error(L, "no memory");
    }
    lua_pushinteger(L, n);
    return 1;
}

/* A guard of ev:set_on_abandon(): a cleanup attached to a coroutine. */
struct gw_abandon_guard {
    struct gw_co_cleanup cl;
    int                  ev_ref;   /* registry: the event; LUA_NOREF */
    int                  self_ref; /* registry: this guard while armed */
};

static void
guard_disarm(lua_State *L, struct gw_abandon_guard *g)
{
    gw_co_cleanup_del(&g->cl);
    luaL_unref(L, LUA_REGISTRYINDEX, g->ev_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, g->self_ref);
    g->ev_ref = g->self_ref = LUA_NOREF;
}

static void
guard_fire(void *arg)
{
    struct gw_abandon_guard *g = arg;
    lua_State               *L = gw_co_main();
    int                      top = lua_gettop(L);

    if (g->ev_ref == LUA_NOREF) {
        return;
    }
    lua_rawgeti(L, LUA_REGISTRYINDEX, g->ev_ref);
    {
        struct gw_event *e = gw_testudata(L, -1, LEVENT_MT);

        if (e != NULL && event_set(L, e, lua_gettop(L)) < 0) {
            gw_log(GW_LOG_ERROR, "event: no memory to set an event on a"
                   " coroutine's abandonment");
        }
    }
    lua_settop(L, top);
    guard_disarm(L, g);          /* cl is already detached by the co */
}

/*
 * syntax: guard = ev:set_on_abandon()
 * Sets ev if the calling coroutine is abandoned -- its request's deadline,
 * task:cancel(), shutdown -- or ends, before guard:cancel(): a helper task
 * waiting on ev learns that the coroutine it serves will never run again
 * (Lua cannot see that: an abandoned coroutine stays "suspended"). The
 * set happens with no Lua running; its waiters resume on a later turn.
 * Raises outside a coroutine.
 */
static int
levent_set_on_abandon(lua_State *L)
{
    struct gw_co            *co;
    struct gw_abandon_guard *g;

    gw_checkudata(L, 1, LEVENT_MT);
    co = gw_co_current(L);               /* raises outside a coroutine */
    g = lua_newuserdata(L, sizeof(*g));
    memset(g, 0, sizeof(*g));
    g->ev_ref = g->self_ref = LUA_NOREF;
    luaL_getmetatable(L, LGUARD_MT);
    lua_setmetatable(L, -2);
    lua_pushvalue(L, 1);
    g->ev_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_pushvalue(L, -1);
    g->self_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    g->cl.fn = guard_fire;
    g->cl.arg = g;
    gw_co_cleanup_add(co, &g->cl);
    return 1;
}

/* syntax: guard:cancel() -- disarms it (idempotent); returns nothing */
static int
lguard_cancel(lua_State *L)
{
    struct gw_abandon_guard *g = gw_checkudata(L, 1, LGUARD_MT);

    if (g->self_ref != LUA_NOREF) {
        guard_disarm(L, g);
    }
    return 0;
}

/* Armed, a guard is anchored in the registry: this runs once it is
 * disarmed, or at lua_close() (then detach it from its co, if any). */
static int
lguard_gc(lua_State *L)
{
    struct gw_abandon_guard *g = gw_testudata(L, 1, LGUARD_MT);

    if (g != NULL) {
        gw_co_cleanup_del(&g->cl);
    }
    return 0;
}

static const luaL_Reg lguard_methods[] = {
    { "cancel", lguard_cancel },
    { NULL, NULL }
};

/* syntax: n = ev:waiters() -- coroutines waiting (not yet signalled) */
static int
levent_waiters(lua_State *L)
{
    struct gw_event *e = gw_checkudata(L, 1, LEVENT_MT);
    int n = 0;

    for (struct gw_evwaiter *w = e->waiting; w != NULL; w = w->next) {
        n++;
    }
    lua_pushinteger(L, n);
    return 1;
}

/* syntax: n = ev:count() -- set() calls so far */
static int
levent_count(lua_State *L)
{
    struct gw_event *e = gw_checkudata(L, 1, LEVENT_MT);

    lua_pushinteger(L, (lua_Integer) e->sets);
    return 1;
}

/* Every waiter holds a reference, so this runs with none linked, except
 * at lua_close(): then detach what is left (their cancel frees them). */
static int
levent_gc(lua_State *L)
{
    struct gw_event *e = gw_testudata(L, 1, LEVENT_MT);
    struct gw_evwaiter **lists[2];

    if (e == NULL) {
        return 0;
    }
    lists[0] = &e->waiting;
    lists[1] = &e->fired;
    for (int i = 0; i < 2; i++) {
        while (*lists[i] != NULL) {
            struct gw_evwaiter *w = *lists[i];

            evwaiter_unlink(w);
            w->ev = NULL;
        }
    }
    if (e->wake != NULL) {
        event_free(e->wake);
        e->wake = NULL;
    }
    return 0;
}

static const luaL_Reg levent_methods[] = {
    { "wait", levent_wait },
    { "set", levent_set },
    { "waiters", levent_waiters },
    { "count", levent_count },
    { "set_on_abandon", levent_set_on_abandon },
    { NULL, NULL }
};

/* ---- logging -------------------------------------------------------- */

/*
 * syntax: paygate.core.log(level, msg[, fields_json])
 * level is 0 debug .. 3 error. The request id of the current coroutine,
 * if any, is added.
 */
static int
lcore_log(lua_State *L)
{
    int level = (int) luaL_checkinteger(L, 1);
    size_t mlen, flen = 0;
    const char *msg = luaL_checklstring(L, 2, &mlen);
    const char *fields = luaL_optlstring(L, 3, NULL, &flen);
    struct gw_co *co;

    if (level < GW_LOG_DEBUG || level > GW_LOG_ERROR) {
        return luaL_argerror(L, 1, "level must be 0..3");
    }
    if ((enum gw_log_level) level < gw_log_min) {
        return 0;
    }
    co = gw_co_find(L);
    gw_log_line((enum gw_log_level) level, co ? co->request_id : NULL,
                msg, mlen, fields, flen);
    return 0;
}

static int
lcore_log_enabled(lua_State *L)
{
    int level = (int) luaL_checkinteger(L, 1);

    lua_pushboolean(L, (enum gw_log_level) level >= gw_log_min);
    return 1;
}

/* core.log_level([level]) -> the level in force (0 debug .. 3 error);
 * given a level, sets it and returns the one before (a command that
 * reports a failure itself silences the runtime's own line about it). */
static int
lcore_log_level(lua_State *L)
{
    int prev = (int) gw_log_min;

    if (!lua_isnoneornil(L, 1)) {
        int level = (int) luaL_checkinteger(L, 1);

        if (level < GW_LOG_DEBUG || level > GW_LOG_ERROR) {
            return luaL_argerror(L, 1, "level must be 0..3");
        }
        gw_log_min = (enum gw_log_level) level;
    }
    lua_pushinteger(L, prev);
    return 1;
}

static int
lcore_request_id(lua_State *L)
{
    struct gw_co *co = gw_co_find(L);

    if (co == NULL || co->request_id == NULL) {
        return 0;
    }
    lua_pushstring(L, co->request_id);
    return 1;
}

static int
lcore_in_coroutine(lua_State *L)
{
    lua_pushboolean(L, gw_co_find(L) != NULL);
    return 1;
}

static int
lcore_coroutines(lua_State *L)
{
    lua_pushinteger(L, gw_co_alive);
    return 1;
}

/*
 * syntax: port = paygate.core.free_port([host])
 * A TCP port free on host (default 127.0.0.1) right now: for tests.
 */
/* Whether port on addr can be bound now (nothing listens on it). */
static int
port_bindable(struct sockaddr_in *a, int port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int ok;

    if (fd < 0) {
        return 0;
    }
    a->sin_port = htons((uint16_t) port);
    ok = bind(fd, (struct sockaddr *) a, sizeof(*a)) == 0;
    close(fd);
    return ok;
}

/*
 * The ports free_port handed out lately: nothing listens on them until the
 * caller's server binds, so without this a second call (a cluster's next
 * member) could be handed the same port.
 */
#define GW_GIVEN_PORTS 256
static _Thread_local int gw_given_ports[GW_GIVEN_PORTS];
static _Thread_local unsigned int gw_given_next;

static int
port_given(int port)
{
    for (int i = 0; i < GW_GIVEN_PORTS; i++) {
        if (gw_given_ports[i] == port) {
            return 1;
        }
    }
    return 0;
}

static int
port_give(lua_State *L, int port)
{
    gw_given_ports[gw_given_next++ % GW_GIVEN_PORTS] = port;
    lua_pushinteger(L, port);
    return 1;
}

/*
 * core.free_port([host]) -> a TCP port nothing listens on now, for a test
 * server to bind a moment later; never one it returned among its last 256
 * answers. Picked at random BELOW the kernel's
 * ephemeral range (ip_local_port_range): a port the kernel hands out
 * (bind to 0) is also what it gives outgoing connections, so one of them
 * could take it before the server binds ("Address already in use").
 */
static int
lcore_free_port(lua_State *L)
{
    const char *host = luaL_optstring(L, 1, "127.0.0.1");
    struct sockaddr_in a;
    socklen_t len = sizeof(a);
    int low = 32768, fd, hi, lo;
    FILE *f;

    memset(&a, 0, sizeof(a));
    a.sin_family = AF_INET;
    if (inet_pton(AF_INET, host, &a.sin_addr) != 1) {
        return gw_push_error(L, "connect", 0, "free_port: bad address %s",
                             host);
    }
    f = fopen("/proc/sys/net/ipv4/ip_local_port_range", "r");
    if (f != NULL) {
        if (fscanf(f, "%d", &low) != 1) {
            low = 32768;
        }
        fclose(f);
    }
    hi = low - 1;
    lo = hi - 12000 > 10000 ? hi - 12000 : 10000;
    for (int i = 0; hi > lo && i < 64; i++) {
        unsigned int r;
        int port;

        if (getentropy(&r, sizeof(r)) != 0) {
            r = (unsigned int) rand();
        }
        port = lo + (int) (r % (unsigned int) (hi - lo + 1));
        if (!port_given(port) && port_bindable(&a, port)) {
            return port_give(L, port);
        }
    }
    /* no luck below the range: let the kernel pick */
    a.sin_port = 0;
    fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || bind(fd, (struct sockaddr *) &a, sizeof(a)) != 0
        || getsockname(fd, (struct sockaddr *) &a, &len) != 0) {
        if (fd >= 0) {
            close(fd);
        }
        return gw_push_error(L, "connect", 0, "free_port: %s",
                             strerror(errno));
    }
    close(fd);
    return port_give(L, ntohs(a.sin_port));
}

/* ---- lock_file ------------------------------------------------------ */

struct gw_file_lock {
    int fd;                     /* owned (holds the flock); -1 once unlocked */
};

/*
 * core.lock_file(path[, mode]) -> lock | nil, err
 * Takes an exclusive flock(2) on path (made with mode, default 0600, when
 * missing) without waiting: err.kind is "busy" when another open of the
 * file holds it (another process, or another lock here), "io" for any
 * other failure. The lock lasts until lock:unlock(), the lock's __gc or
 * the process's end (the kernel drops it then: a crashed holder never
 * leaves it taken). For a read-compare-write of a small file that several
 * processes share (the credentials cache); the caller retries on busy.
 */
static int
lcore_lock_file(lua_State *L)
{
    size_t               plen;
    const char          *path = luaL_checklstring(L, 1, &plen);
    lua_Integer          mode = luaL_optinteger(L, 2, 0600);
    struct gw_file_lock *lk;
    int                  fd;

    if (mode < 0 || mode > 07777) {
        return luaL_argerror(L, 2, "mode must be a file mode (0 .. 07777)");
    }
    if (memchr(path, '\0', plen) != NULL) {
        /* cut at the NUL, it would name another file */
        return gw_push_error(L, "io", 0, "lock_file %s: not a path", path);
    }
    /* the lock first (it may raise: no memory), its fd owned once open,
     * so nothing leaks whatever raises after */
    lk = lua_newuserdata(L, sizeof(*lk));
    lk->fd = -1;
    luaL_getmetatable(L, LLOCK_MT);
    lua_setmetatable(L, -2);
    fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, (mode_t) mode);
    if (fd < 0) {
        return gw_push_error(L, "io", 0, "lock_file %s: open: %s", path,
                             strerror(errno));
    }
    while (flock(fd, LOCK_EX | LOCK_NB) != 0) {
        int err = errno;

        if (err == EINTR) {
            continue;
        }
        close(fd);
        if (err == EWOULDBLOCK) {
            return gw_push_error(L, "busy", 1, "lock_file %s: held by "
                                 "another", path);
        }
        return gw_push_error(L, "io", 0, "lock_file %s: flock: %s", path,
                             strerror(err));
    }
    lk->fd = fd;
    return 1;
}

/* Releases lk's lock (NULL-safe; safe twice): the last close of the
 * open drops the flock. */
static void
lock_release(struct gw_file_lock *lk)
{
    if (lk != NULL && lk->fd >= 0) {
        close(lk->fd);
        lk->fd = -1;
    }
}

/* __gc: reachable with any userdata through getmetatable, so it ignores
 * what is not a lock instead of raising */
static int
llock_gc(lua_State *L)
{
    lock_release(gw_testudata(L, 1, LLOCK_MT));
    return 0;
}

/* lock:unlock() */
static int
llock_unlock(lua_State *L)
{
    lock_release(luaL_checkudata(L, 1, LLOCK_MT));
    return 0;
}

static const luaL_Reg llock_methods[] = {
    { "unlock", llock_unlock },
    { NULL, NULL }
};

static int
lcore_pid(lua_State *L)
{
    lua_pushinteger(L, getpid());
    return 1;
}

static const luaL_Reg ltask_methods[] = {
    { "wait", ltask_wait },
    { "cancel", ltask_cancel },
    { "finished", ltask_finished },
    { NULL, NULL }
};

static const luaL_Reg lcore_funcs[] = {
    { "sleep", lcore_sleep },
    { "is_seconds", lcore_is_seconds },
    { "now", lcore_now },
    { "time", lcore_time },
    { "mono", lcore_mono },
    { "time_left", lcore_time_left },
    { "listdir", lcore_listdir },
    { "file_type", lcore_file_type },
    { "read_file", lcore_read_file },
    { "write_file", lcore_write_file },
    { "mkdir_p", lcore_mkdir_p },
    { "chmod", lcore_chmod },
    { "lock_file", lcore_lock_file },
    { "error", lcore_error },
    { "is_error", lcore_is_error },
    { "error_string", gw_lerror_string },
    { "update_time", lcore_update_time },
    { "spawn", lcore_spawn },
    { "event", lcore_event },
    { "log", lcore_log },
    { "log_enabled", lcore_log_enabled },
    { "log_level", lcore_log_level },
    { "request_id", lcore_request_id },
    { "in_coroutine", lcore_in_coroutine },
    { "coroutines", lcore_coroutines },
    { "pid", lcore_pid },
    { "free_port", lcore_free_port },
    { "error_mt", gw_push_error_mt },
    { NULL, NULL }
};

/* The level of the primitives this binary gives Lua (core.api). Raise it
 * whenever a primitive the Lua modules call is added or changed, and
 * lua/paygate/init.lua's API with it: Lua modules newer than the binary
 * (a checkout updated under a running paygate: a reload, or a worker
 * restarted, loads them into the old binary) then stop at once with what
 * to do, not at the first missing call ("attempt to call field
 * 'histogram' (a nil value)"). Level 1: metrics.histogram, write_file's
 * opts.sync, tls.set_certificate's reasons, core.chmod. Level 2:
 * http.core.close_idle, histogram:observe's n, SQLite h:stats()'s
 * commit figures (commit_seconds, commit_buckets, reads_reader).
 * spec/fixtures/lua_api.txt
 * lists the primitives' names under the level (spec lua_api compares):
 * a name added or gone fails there until the level is raised. */
#define GW_LUA_API 2

int
luaopen_paygate_core(lua_State *L)
{
    luaL_newmetatable(L, LTASK_MT);
    lua_pushcfunction(L, ltask_gc);
    lua_setfield(L, -2, "__gc");
    lua_newtable(L);
    luaL_register(L, NULL, ltask_methods);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
    luaL_newmetatable(L, LEVENT_MT);
    lua_pushcfunction(L, levent_gc);
    lua_setfield(L, -2, "__gc");
    lua_newtable(L);
    luaL_register(L, NULL, levent_methods);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
    luaL_newmetatable(L, LLOCK_MT);
    lua_pushcfunction(L, llock_gc);
    lua_setfield(L, -2, "__gc");
    lua_newtable(L);
    luaL_register(L, NULL, llock_methods);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
    luaL_newmetatable(L, LREADBUF_MT);
    lua_pushcfunction(L, lreadbuf_gc);
    lua_setfield(L, -2, "__gc");
    lua_pop(L, 1);
    luaL_newmetatable(L, LGUARD_MT);
    lua_pushcfunction(L, lguard_gc);
    lua_setfield(L, -2, "__gc");
    lua_newtable(L);
    luaL_register(L, NULL, lguard_methods);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
    lua_newtable(L);
    luaL_register(L, NULL, lcore_funcs);
    lua_pushlightuserdata(L, NULL);   /* == cjson.null, SQL NULL, nil reply */
    lua_setfield(L, -2, "null");
    lua_pushinteger(L, GW_LUA_API);
    lua_setfield(L, -2, "api");
    return 1;
}
