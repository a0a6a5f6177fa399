/* LD_PRELOAD shim for the specs of a host whose clock is off: moves the
 * wall clock (CLOCK_REALTIME and its coarse twin, gettimeofday(), time())
 * by $CLOCK_SHIFT seconds (may be negative); the monotonic clocks are left
 * alone, as a clock off by minutes leaves them. A paygate run under it
 * reads the shifted time everywhere it reads the wall clock: its
 * paygate.now(), os.time(), its log's stamps, OpenSSL's validity checks.
 *
 * Built by the spec: cc -shared -fPIC -o clock_shift.so clock_shift.c -ldl */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <sys/time.h>
#include <time.h>

static long
shift(void)
{
    const char *s = getenv("CLOCK_SHIFT");

    return s == NULL ? 0 : strtol(s, NULL, 10);
}

int
clock_gettime(clockid_t id, struct timespec *ts)
{
    static int (*real)(clockid_t, struct timespec *);
    int rc;

    if (real == NULL) {
        real = (int (*)(clockid_t, struct timespec *))
               dlsym(RTLD_NEXT, "clock_gettime");
    }
    rc = real(id, ts);
    if (rc == 0 && (id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE)) {
        ts->tv_sec += shift();
    }
    return rc;
}

int
gettimeofday(struct timeval *tv, void *tz)
{
    struct timespec ts;

    (void)tz;
    if (clock_gettime(CLOCK_REALTIME, &ts) != 0) {
        return -1;
    }
    tv->tv_sec = ts.tv_sec;        /* glibc declares tv nonnull */
    tv->tv_usec = ts.tv_nsec / 1000;
    return 0;
}

time_t
time(time_t *t)
{
    struct timespec ts;

    if (clock_gettime(CLOCK_REALTIME, &ts) != 0) {
        return (time_t)-1;
    }
    if (t != NULL) {
        *t = ts.tv_sec;
    }
    return ts.tv_sec;
}
