/*
 * watchdog.h -- the loop-stall watchdog (limits.loop_stall). Each worker
 * marks, once a second from a timer on its loop, that its loop turned; the
 * master reads the marks and kills (SIGKILL) a worker whose mark is older
 * than the limit: a handler, hook or task that never yields holds the loop,
 * and with it every connection, deadline and timer of that worker.
 *
 * The marks live in memory shared by the master and its workers (mapped
 * before the first fork), one entry per metrics slot: a worker writes only
 * its own, the master reads them all. No lock, no system call on a
 * request's path: a request's start costs a copy of its method, path and
 * id into the worker's entry (what the master says of a stalled worker).
 */
#ifndef GW_WATCHDOG_H
#define GW_WATCHDOG_H

#include <stddef.h>

/* The shortest limit taken (s): a worker marks once a second, so a
 * healthy loop's mark may be a second old, and a little more under load. */
#define GW_WATCHDOG_MIN 2

/* Master, before the first fork: maps nslots entries. GW_OK or GW_ERR. */
int gw_watchdog_init(int nslots);

/* Master, as it starts a worker on slot: clears its entry and marks it
 * now, so a worker is judged from its start (loading its app included). */
void gw_watchdog_arm(int slot);

/* Worker: its entry is slot's (none in exec, or for a bad slot). */
void gw_watchdog_attach(int slot);

/* Worker: its loop turned (a timer's callback, once a second). */
void gw_watchdog_mark(void);

/* Worker: a request's handler starts (gw_server_conf.on_start). id is
 * NUL-terminated; method and path are cut to fit. */
void gw_watchdog_request(const char *method, size_t method_len,
                         const char *path, size_t path_len, const char *id);

/* Master: seconds since slot's worker last marked (0 for a bad slot). */
double gw_watchdog_age(int slot);

/* Master: what slot's worker said of the last request it started, into
 * buf ("GET /spin (request 0f3a..., started 2.5 s ago)"), or "" when it
 * has started none (or its entry is being written just then). */
void gw_watchdog_last(int slot, char *buf, size_t len);

#endif
