/*
 * master.h -- the `paygate run` master process.
 */
#ifndef GW_MASTER_H
#define GW_MASTER_H

#include "config.h"

/* Serves until stopped; returns the exit code (0, 1 runtime, 2 usage).
 * file: the config file's values over the defaults, before any flag (what
 * a reload compares the file with), or NULL without a config file. */
int gw_master_main(struct gw_opts *o, const struct gw_opts *file);

#endif
