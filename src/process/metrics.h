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

/* In a worker: use slot (reserved and cleared by gw_metrics_free_slot in
 * the master) for this process's counters; only stores the pid, so the
 * slot never looks free while the worker takes it. */
void gw_metrics_attach(int slot);

/* Master: a slot nobody uses now, cleared and reserved (pid -1) until its
 * worker attaches, or -1. */
int gw_metrics_free_slot(void);

/* Master, after a worker died: fold its counters into the retired totals
 * (so sums never go backwards) and free the slot. */
void gw_metrics_retire(int slot);

/* Worker: one request finished. route NULL means "unmatched". */
void gw_metrics_request(const char *method, size_t method_len,
                        const char *route, size_t route_len, int status,
                        double seconds);

/* Worker: one event of the HTTP edge (enum gw_edge_event). */
void gw_metrics_edge(int event);

/* Worker: gauges refreshed once a second. */
void gw_metrics_gauges(int64_t lua_bytes, int64_t in_flight,
                       int64_t connections);

/* Gauges an app sets from Lua (paygate.metrics, lmetrics.c): each worker
 * holds at most GW_METRICS_APP_SERIES series (name + label set) in its
 * slot. name and labels are checked and escaped by the caller; labels is
 * the rendered label text ('k="v",...', sorted by key) or "". */
#define GW_METRICS_APP_SERIES 128
#define GW_METRICS_NAME_MAX   64
#define GW_METRICS_HELP_MAX   128
#define GW_METRICS_LABELS_MAX 256

/* Worker: sets (adds) a series. GW_OK, or GW_ERR when the slot's table
 * is full (or there is no slot). */
int gw_metrics_gauge_set(const char *name, const char *help,
                         const char *labels, double value);

/* Worker: drops a series. GW_OK, or GW_ERR when it is not held. */
int gw_metrics_gauge_remove(const char *name, const char *labels);

/* Counters an app increments from Lua (paygate.metrics.counter): each
 * worker holds at most GW_METRICS_FAMILIES names and GW_METRICS_COUNTERS
 * series (one per name and label set) in its slot; the master renders the
 * sum over live workers and the retired totals of dead ones (a worker that
 * dies or is replaced by a reload folds its counts into the retired
 * totals, so a sum never goes backwards). Each name has a series cap:
 * label sets past it are added to the name's overflow series (every label
 * "_overflow"), so hostile label values cannot grow the table. */
#define GW_METRICS_FAMILIES   48
#define GW_METRICS_COUNTERS   512
#define GW_METRICS_OVERFLOW   "_overflow"

/* Worker: the index of counter name in this worker's slot (registered on
 * first use with help, max_series and the rendered labels of its overflow
 * series), or -1 when the slot holds GW_METRICS_FAMILIES names already
 * (or there is no slot). */
int gw_metrics_counter_family(const char *name, const char *help,
                              const char *overflow_labels, int max_series);

/* Worker: adds n to the series (family, labels); labels NULL (or a new
 * label set past the cap) counts into the overflow series. GW_OK, or
 * GW_ERR for a bad family. */
int gw_metrics_counter_add(int family, const char *labels, double n);

/* Worker: this worker's count of (family, labels); 0 when not held. */
double gw_metrics_counter_get(int family, const char *labels);

/* Histograms an app observes into from Lua (paygate.metrics.histogram):
 * each worker holds at most GW_METRICS_HFAMILIES names and
 * GW_METRICS_HISTOGRAMS series (one per name and label set) in its slot.
 * A series keeps a count per bucket (at most GW_METRICS_HBUCKETS upper
 * bounds, ascending, and +Inf) and the sum of the values. The master
 * renders them as the counters: summed over live workers and the retired
 * totals, with a per-name cap of label sets and an overflow series. */
#define GW_METRICS_HFAMILIES  16
#define GW_METRICS_HISTOGRAMS 64
#define GW_METRICS_HBUCKETS   16

/* Worker: the index of histogram name in this worker's slot (registered
 * on first use with help, max_series, the labels of its overflow series
 * and its nle bounds le, ascending), or -1 when the slot holds
 * GW_METRICS_HFAMILIES names already (or there is no slot). */
int gw_metrics_histogram_family(const char *name, const char *help,
                                const char *overflow_labels, int max_series,
                                const double *le, int nle);

/* Worker: counts v, n times (n >= 0, a whole number), into the series
 * (family, labels); labels NULL (or a new label set past the cap) counts
 * into the overflow series. GW_OK, or GW_ERR for a bad family. */
int gw_metrics_histogram_observe(int family, const char *labels, double v,
                                 double n);

/* Worker: this worker's count and sum of (family, labels); 0 and 0 when
 * not held. */
void gw_metrics_histogram_get(int family, const char *labels, double *count,
                              double *sum);

/* A number that changes whenever this process attaches to a slot (cached
 * family indices are valid while it is the same). */
unsigned gw_metrics_generation(void);

/* Master: events. */
void gw_metrics_reload(int ok);
void gw_metrics_worker_restart(void);
void gw_metrics_worker_stall(void);     /* the watchdog killed one */

/* Master: renders Prometheus text into a malloc'd buffer (caller frees).*/
char *gw_metrics_render(size_t *len);

#endif
