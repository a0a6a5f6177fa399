/*
 * worker.h -- a worker process (serves an app) and the exec process (runs
 * one script); both are one loop + one Lua state.
 */
#ifndef GW_WORKER_H
#define GW_WORKER_H

#include <openssl/ssl.h>

#include "config.h"

/* Runs a worker until it is stopped; returns the process exit code. It
 * writes 'R' to ready_fd (a socket to the master) once the app loaded, or
 * 'F' if it failed; after 'R' it accepts only once the master answers 'G'
 * (and stops if the master closes the socket instead). gen: the code
 * generation it belongs to (paygate.runtime.generation). */
int gw_worker_main(const struct gw_opts *o, int listen_fd, SSL_CTX *ctx,
                   int ready_fd, int slot, int gen);

/* Seconds a stopping worker gives the app's paygate.on_stop functions,
 * once its requests drained (or the drain deadline passed). The master's
 * stop deadline allows for it. */
#define GW_STOP_HOOKS_TIMEOUT 5

/* `paygate exec SCRIPT [ARGS]`: returns the exit code. */
int gw_exec_main(const char *script, int argc, char **argv);

#endif
