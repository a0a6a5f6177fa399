/*
 * metrics.h -- request counters and latency histograms, kept per worker in
 * memory shared with the master, which sums them for /metrics.
 */
#ifndef GW_METRICS_H
#define GW_METRICS_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* Maps the shared segment (master, before forking). GW_OK or GW_ERR. */
int gw_metrics_init(int max_slots);

/* In a worker: use slot for this process's counters. */
void gw_metrics_attach(int slot);

/* A slot nobody uses now, or -1. */
int gw_metrics_free_slot(void);

/* Master, after a worker died: fold its counters into the retired totals
 * (so sums never go backwards) and free the slot. */
void gw_metrics_retire(int slot);

/* Worker: one request finished. route NULL means "unmatched". */
void gw_metrics_request(const char *method, size_t method_len,
                        const char *route, size_t route_len, int status,
                        double seconds);

/* Worker: gauges refreshed once a second. */
void gw_metrics_gauges(int64_t lua_bytes, int64_t in_flight,
                       int64_t connections);

/* Gauges an app sets from Lua (paygate.metrics, lmetrics.c): each worker
 * holds at most GW_METRICS_APP_SERIES series (name + label set) in its
 * slot. name and labels are checked and escaped by the caller; labels is
 * the rendered label text ('k="v",...', sorted by key) or "". */
#define GW_METRICS_APP_SERIES 16
#define GW_METRICS_NAME_MAX   64
#define GW_METRICS_HELP_MAX   128
#define GW_METRICS_LABELS_MAX 256

/* Worker: sets (adds) a series. GW_OK, or GW_ERR when the slot's table
 * is full (or there is no slot). */
int gw_metrics_gauge_set(const char *name, const char *help,
                         const char *labels, double value);

/* Worker: drops a series. GW_OK, or GW_ERR when it is not held. */
int gw_metrics_gauge_remove(const char *name, const char *labels);

/* Master: events. */
void gw_metrics_reload(int ok);
void gw_metrics_worker_restart(void);

/* Master: renders Prometheus text into a malloc'd buffer (caller frees).*/
char *gw_metrics_render(size_t *len);

#endif
