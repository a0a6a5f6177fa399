/*
 * fdio.h -- reading a small file whole through read(2): the one loop of
 * paygate.read_file and of the TLS edge's look into a key or certificate
 * file it could not load. No stdio: its buffer would keep a copy of a key
 * that the caller wipes from its own.
 */
#ifndef GW_FDIO_H
#define GW_FDIO_H

#include <stddef.h>

/* Reads fd into buf until len bytes are in it, the file ends or a read
 * fails; a read a signal interrupted (EINTR) is made again. Returns the
 * bytes read: fewer than len only at the end of the file or on an error.
 * *err is 0, or the errno of the read that failed (the bytes read before
 * it are in buf, and counted). */
size_t gw_read_full(int fd, void *buf, size_t len, int *err);

/* Flushes the folder that holds path (its entries: a rename into it made
 * durable). Best effort: a folder that cannot be opened or flushed is
 * passed over, as the file itself was flushed already. */
void gw_fsync_parent(const char *path);

#endif
