/*
 * fdio.c -- see fdio.h.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
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

void
gw_fsync_parent(const char *path)
{
    char        dir[4200];
    char       *slash;
    int         fd;

    snprintf(dir, sizeof(dir), "%s", path);
    slash = strrchr(dir, '/');
    if (slash == NULL) {
        snprintf(dir, sizeof(dir), ".");
    } else {
        slash[slash == dir ? 1 : 0] = '\0';
    }
    fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) {
        (void) fsync(fd);
        close(fd);
    }
}
