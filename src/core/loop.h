/*
 * loop.h -- the process's single event loop, and the queue that lets worker
 * threads hand results back to it.
 */
#ifndef GW_LOOP_H
#define GW_LOOP_H

#include <event2/event.h>
#include "runtime.h"

/* Creates the event base and the post queue. GW_OK or GW_ERR. */
int gw_loop_init(void);

/* Frees the base (after the loop ended). Safe to call twice. */
void gw_loop_free(void);

/* In a forked child: drops the parent's loop without touching it. */
void gw_loop_forget(void);

/* Seconds since the epoch, cached per loop pass (like ngx.now()). */
double gw_loop_now(void);

/* Seconds on the monotonic clock, cached likewise: for durations and
 * deadlines, which a wall-clock jump must not move. */
double gw_loop_mono(void);

/* Seconds on the monotonic clock, read now rather than cached: for any
 * thread (the loop's cache belongs to the loop thread) and for code that
 * measures time within one loop pass. */
double gw_loop_mono_fresh(void);

/* Refreshes the cached times and starts a new turn (below): for the
 * loop's own entries into callbacks (a coroutine woken, posted results
 * delivered). */
void gw_loop_update_time(void);

/* Refreshes the cached times within the current turn
 * (paygate.update_time()). */
void gw_loop_refresh_time(void);

/* The loop's turn: a number that changes with each gw_loop_update_time(),
 * never with gw_loop_refresh_time(). What a turn may spend (the SQLite
 * inline reads' budget) is keyed on it, so code that refreshes the time
 * for itself does not start a new turn. Loop thread only. */
unsigned long gw_loop_turn(void);

#endif
