/*
 * fdio.c -- see fdio.h.
 */
#include <errno.h>
#include <unistd.h>

#include "fdio.h"

size_t
gw_read_full(int fd, void *buf, size_t len, int *err)
{
    char  *p = buf;
    size_t n = 0;

    *err = 0;
    while (n < len) {
        ssize_t r = read(fd, p + n, len - n);

        if (r < 0 && errno == EINTR) {
            continue;
        }
        if (r < 0) {
            *err = errno;
            break;
        }
        if (r == 0) {
            break;
        }
        n += (size_t) r;
    }
    return n;
}
