/*
 * sdnotify.c -- see sdnotify.h.
 */
#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include "log.h"
#include "runtime.h"
#include "sdnotify.h"

/* s a send waits for room in the service manager's queue: systemd reads
 * its notify socket between other work, and at boot or during a
 * daemon-reload the queue may be full for a while (net.unix.max_dgram_qlen
 * datagrams); a READY=1 dropped there is a start it kills at
 * TimeoutStartSec, a MAINPID= an upgrade it does not follow */
#define SD_SEND_WAIT 5
#define STR_(x) #x
#define STR(x) STR_(x)

static int warned;      /* a failure has been logged: not again */
static int stalled;     /* the last send found no room within SD_SEND_WAIT:
                           the next ones do not wait (a manager that
                           stopped reading would stall the master at
                           each), until one goes through */

static int
fail(const char *addr, const char *why)
{
    if (!warned) {
        warned = 1;
        gw_log(GW_LOG_WARN, "systemd notify: cannot send to %s=%.200s: %s "
               "(said once; the server runs on, but systemd does not learn "
               "its state: readiness, reloads, a stop, an upgrade's new "
               "pid)", GW_SD_ENV, addr, why);
    }
    return GW_ERR;
}

int
gw_sd_listening(void)
{
    const char *addr = getenv(GW_SD_ENV);

    return addr != NULL && addr[0] != '\0';
}

int
gw_sd_notify(const char *state)
{
    const char *addr = getenv(GW_SD_ENV);
    struct sockaddr_un sa;
    socklen_t salen;
    struct timeval tv;
    uint64_t deadline;
    size_t n;
    ssize_t sent;
    int fd, e;

    if (!gw_sd_listening()) {
        return GW_OK;       /* no supervisor listens */
    }
    n = strlen(addr);
    /* a path takes its NUL too; an abstract name's leading NUL is the
     * '@', and its length is the address's */
    if ((addr[0] != '/' && addr[0] != '@')
        || n > sizeof(sa.sun_path) - (addr[0] == '/')) {
        return fail(addr, "not a unix socket's path, nor '@' and an "
                          "abstract name");
    }
    memset(&sa, 0, sizeof(sa));
    sa.sun_family = AF_UNIX;
    memcpy(sa.sun_path, addr, n);
    if (addr[0] == '@') {
        sa.sun_path[0] = '\0';
    }
    salen = (socklen_t) (offsetof(struct sockaddr_un, sun_path) + n
                         + (addr[0] == '/'));
    /* one socket a message: they are few (a start, a reload, a stop) */
    fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        return fail(addr, strerror(errno));
    }
    /* a full queue: wait for room, SD_SEND_WAIT s at most in all (a
     * signal's handler ends the wait, EINTR: sent again for what is left) */
    deadline = gw_sd_monotonic_usec() + SD_SEND_WAIT * 1000000u;
    for (;;) {
        uint64_t now = gw_sd_monotonic_usec();
        int flags = MSG_NOSIGNAL;

        tv.tv_sec = (time_t) ((deadline - now) / 1000000u);
        tv.tv_usec = (suseconds_t) ((deadline - now) % 1000000u);
        if (stalled || now >= deadline
            || setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv)) != 0)
        {
            flags |= MSG_DONTWAIT;  /* no bound on the wait: none at all */
        }
        sent = sendto(fd, state, strlen(state), flags,
                      (struct sockaddr *) &sa, salen);
        if (sent >= 0 || errno != EINTR) {
            break;
        }
    }
    e = errno;
    close(fd);
    if (sent < 0 && (e == EAGAIN || e == EWOULDBLOCK)) {
        char why[160];

        snprintf(why, sizeof(why), "its queue is full%s (%s)", stalled
                 ? "" : " and was not read within " STR(SD_SEND_WAIT) " s",
                 strerror(e));
        stalled = 1;
        return fail(addr, why);
    }
    if (sent < 0) {
        return fail(addr, strerror(e));
    }
    stalled = 0;
    return GW_OK;
}

int
gw_sd_notifyf(const char *fmt, ...)
{
    char buf[2048];
    va_list ap;

    if (!gw_sd_listening()) {
        return GW_OK;
    }
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    return gw_sd_notify(buf);
}

char *
gw_sd_line(char *s)
{
    for (char *p = s; *p != '\0'; p++) {
        if ((unsigned char) *p < 0x20 || *p == 0x7f) {
            *p = ' ';
        }
    }
    return s;
}

uint64_t
gw_sd_monotonic_usec(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t) ts.tv_sec * 1000000u + (uint64_t) ts.tv_nsec / 1000u;
}
