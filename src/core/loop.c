/*
 * loop.c -- one libevent base per process, plus a thread-safe post queue
 * (mutex + eventfd) through which writer threads hand results back.
 */
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <sys/time.h>
#include <time.h>
#include <string.h>
#include <unistd.h>

#include "log.h"
#include "loop.h"

struct gw_post {
    gw_post_fn      fn;         /* runs on the loop thread */
    void           *arg;        /* owned by fn */
    struct gw_post *next;       /* queue link */
};

static struct event_base *base;         /* owned; one per process */
static struct event      *post_ev;      /* owned; watches post_fd */
static int                post_fd = -1; /* eventfd; written by posters */
static pthread_mutex_t    post_lock = PTHREAD_MUTEX_INITIALIZER;
static struct gw_post    *post_head;    /* FIFO under post_lock */
static struct gw_post    *post_tail;
static double             now_cached;   /* s since the epoch (wall) */
static double             mono_cached;  /* s, CLOCK_MONOTONIC */
static unsigned long      turn;         /* gw_loop_update_time() calls */

struct event_base *
gw_loop_base(void)
{
    return base;
}

double
gw_loop_now(void)
{
    return now_cached;
}

double
gw_loop_mono(void)
{
    return mono_cached;
}

double
gw_loop_mono_fresh(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double) ts.tv_sec + (double) ts.tv_nsec / 1e9;
}

void
gw_loop_refresh_time(void)
{
    struct timeval tv;

    gettimeofday(&tv, NULL);
    now_cached = (double) tv.tv_sec + (double) tv.tv_usec / 1e6;
    mono_cached = gw_loop_mono_fresh();
}

void
gw_loop_update_time(void)
{
    gw_loop_refresh_time();
    turn++;
}

unsigned long
gw_loop_turn(void)
{
    return turn;
}

static void
post_drain(evutil_socket_t fd, short what, void *arg)
{
    uint64_t v;
    struct gw_post *p, *next;

    if (read(fd, &v, sizeof(v)) < 0 && errno != EAGAIN) {
        gw_log(GW_LOG_ERROR, "loop: eventfd read: %s", strerror(errno));
    }
    pthread_mutex_lock(&post_lock);
    p = post_head;
    post_head = post_tail = NULL;
    pthread_mutex_unlock(&post_lock);
    gw_loop_update_time();
    for (; p != NULL; p = next) {
        next = p->next;
        p->fn(p->arg);
        free(p);
    }
}

int
gw_loop_post(gw_post_fn fn, void *arg)
{
    struct gw_post *p = malloc(sizeof(*p));
    uint64_t one = 1;

    if (p == NULL) {
        return GW_ERR;
    }
    p->fn = fn;
    p->arg = arg;
    p->next = NULL;
    pthread_mutex_lock(&post_lock);
    if (post_tail != NULL) {
        post_tail->next = p;
    } else {
        post_head = p;
    }
    post_tail = p;
    pthread_mutex_unlock(&post_lock);
    if (write(post_fd, &one, sizeof(one)) < 0 && errno != EAGAIN) {
        return GW_ERR;  /* queued anyway; the next post wakes the loop */
    }
    return GW_OK;
}

/* libevent's own warnings go through our logger, at debug level: the one
 * it gives after fork (signals moved to the worker's base) is expected. */
static void
libevent_log(int severity, const char *msg)
{
    gw_log(severity >= EVENT_LOG_ERR ? GW_LOG_ERROR : GW_LOG_DEBUG,
           "libevent: %s", msg);
}

int
gw_loop_init(void)
{
    struct event_config *cfg;

    event_set_log_callback(libevent_log);
    cfg = event_config_new();
    if (cfg == NULL) {
        return GW_ERR;
    }
    base = event_base_new_with_config(cfg);
    event_config_free(cfg);
    if (base == NULL) {
        return GW_ERR;
    }
    post_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (post_fd < 0) {
        goto err;
    }
    post_ev = event_new(base, post_fd, EV_READ | EV_PERSIST, post_drain, NULL);
    if (post_ev == NULL || event_add(post_ev, NULL) != 0) {
        goto err;
    }
    gw_loop_update_time();
    return GW_OK;
err:
    gw_loop_free();
    return GW_ERR;
}

void
gw_loop_forget(void)
{
    /* The parent's epoll instance is shared after fork: freeing its events
     * here would unregister them in the parent. Leave it all behind. */
    base = NULL;
    post_ev = NULL;
    if (post_fd >= 0) {
        close(post_fd);
        post_fd = -1;
    }
}

void
gw_loop_free(void)
{
    if (post_ev != NULL) {
        event_free(post_ev);
        post_ev = NULL;
    }
    if (post_fd >= 0) {
        close(post_fd);
        post_fd = -1;
    }
    if (base != NULL) {
        event_base_free(base);
        base = NULL;
    }
}
