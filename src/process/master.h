/*
 * master.h -- the `paygate run` master process.
 */
#ifndef GW_MASTER_H
#define GW_MASTER_H

#include "config.h"

/* Serves until stopped; returns the exit code (0, 1 runtime, 2 usage). */
int gw_master_main(struct gw_opts *o);

#endif
