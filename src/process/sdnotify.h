/*
 * sdnotify.h -- systemd's readiness protocol (sd_notify(3)) without
 * libsystemd: one datagram of newline-separated KEY=VALUE lines
 * ("READY=1\nSTATUS=...") to the unix socket named in $NOTIFY_SOCKET, a
 * path, or '@' and an abstract name. The master alone speaks: its workers
 * get the variable unset (an app's child process would speak for it).
 */
#ifndef GW_SDNOTIFY_H
#define GW_SDNOTIFY_H

#include <stdint.h>

#define GW_SD_ENV "NOTIFY_SOCKET"   /* set by systemd for Type=notify */

/* Whether $NOTIFY_SOCKET names a socket (set, not empty): a service
 * manager listens, and follows the main process to a new pid (MAINPID=). */
int gw_sd_listening(void);

/* Sends state when $NOTIFY_SOCKET is set. A full queue (systemd busy) is
 * waited for, 5 s at most (and not at all after such a wait ran out, until
 * a send goes through). GW_OK when sent or when the variable is unset;
 * GW_ERR when the address is no unix socket's or the send failed: said at
 * warn the first time only, never fatal (the server runs on; systemd
 * misses the state). */
int gw_sd_notify(const char *state);

/* gw_sd_notify of a printf format (cut at 2 KiB). */
int gw_sd_notifyf(const char *fmt, ...)
    __attribute__((format(printf, 1, 2)));

/* s made one line, in place (control characters as spaces): a value that
 * came from elsewhere (a reload's reason) must not end its KEY=VALUE line
 * and start another. Returns s. */
char *gw_sd_line(char *s);

/* us on CLOCK_MONOTONIC: RELOADING=1's MONOTONIC_USEC (what
 * Type=notify-reload compares with the time it sent its signal). */
uint64_t gw_sd_monotonic_usec(void);

#endif
