/*
 * master.h -- the `paygate run` master process.
 */
#ifndef GW_MASTER_H
#define GW_MASTER_H

#include "config.h"

/* Serves until stopped; returns the exit code (0, 1 runtime, 2 usage).
 * file: the config file's values over the defaults, before any flag (what
 * a reload compares the file with), or NULL without a config file. exe:
 * the binary an upgrade (USR2) starts, argv its arguments (`paygate run`'s
 * whole command line); neither owned, both kept until the return. */
int gw_master_main(struct gw_opts *o, const struct gw_opts *file,
                   const char *exe, char **argv);

/* Whether this process is the new master of an upgrade: reads and unsets
 * PAYGATE_INHERIT (the old master's listening sockets and the socket to
 * it) and unblocks the signals. Call first. Returns 1 when it is, 0 when
 * not, -1 with a reason in err when the variable is malformed or names no
 * upgrade of this process's parent (it is environment input). */
int gw_upgrade_env(char *err, size_t errlen);

/* An upgrade's new master that stops before taking over tells the old
 * master why ("paygate: " dropped from its front; "" for "see the log"),
 * once. Nothing otherwise. */
void gw_upgrade_failed(const char *why);

#endif
