/*
 * conn_pool.h -- fixed-size slots for the server's connections (struct
 * gw_conn and its events), lowest free slot first, whose free pages can be
 * given back to the kernel after a storm (conn_pool.c). One pool per
 * process; loop thread only.
 */
#ifndef GW_CONN_POOL_H
#define GW_CONN_POOL_H

#include <stddef.h>

/* Reserves nslots slots of slot_size bytes (address space only). 0, or
 * -1 when the mapping cannot be made (then every get returns NULL). */
int      gw_conn_pool_init(size_t slot_size, unsigned nslots);

/* A zeroed slot, or NULL when all are taken (the caller then uses
 * malloc; gw_conn_pool_owns tells them apart). */
void    *gw_conn_pool_get(void);
int      gw_conn_pool_owns(const void *p);
void     gw_conn_pool_put(void *p);
unsigned gw_conn_pool_inuse(void);

/* Gives back the pages whose slots are all free; returns bytes released. */
size_t   gw_conn_pool_trim(void);

#endif
