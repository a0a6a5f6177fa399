/*
 * test_fdio.c -- gw_read_full, the read(2) loop of paygate.read_file and
 * of the TLS edge's look into its key and certificate files: it fills the
 * buffer and stops there (the next call reads on), stops at the end of a
 * file, reads on after a short read and after a signal interrupts it
 * (EINTR), and gives a read's errno with nothing read for a folder.
 */
#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "fdio.h"

static void
on_usr1(int sig)
{
    (void) sig;
}

/* the child's half of the pipe case: waits (a deadline of 10 s) until
 * the parent has read the first piece, so the parent's read of it was a
 * short one and the parent now waits in read(2) for more; interrupts it
 * (SIGUSR1, installed without SA_RESTART), then writes the rest */
static void
writer(int wfd, int rfd)
{
    time_t deadline = time(NULL) + 10;
    int    pending = 1;

    if (write(wfd, "abc", 3) != 3) {
        _exit(2);
    }
    while (pending > 0 && time(NULL) < deadline) {
        if (ioctl(rfd, FIONREAD, &pending) != 0) {
            _exit(3);
        }
    }
    if (pending > 0) {
        _exit(4);
    }
    kill(getppid(), SIGUSR1);
    if (write(wfd, "def", 3) != 3) {
        _exit(5);
    }
    _exit(0);
}

int
main(void)
{
    char  dir[] = "/tmp/test_fdio.XXXXXX", path[64], want[10000];
    char  got[16384];
    int   fd, e = -1, p[2], status;
    pid_t pid;
    struct sigaction sa;

    assert(mkdtemp(dir) != NULL);
    snprintf(path, sizeof(path), "%s/f", dir);
    for (size_t i = 0; i < sizeof(want); i++) {
        want[i] = (char) (i * 7 + 1);
    }
    fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    assert(fd >= 0);
    assert(write(fd, want, sizeof(want)) == (ssize_t) sizeof(want));
    close(fd);

    /* a file shorter than the buffer: all of it, then the end */
    fd = open(path, O_RDONLY);
    assert(gw_read_full(fd, got, sizeof(got), &e) == sizeof(want));
    assert(e == 0 && memcmp(got, want, sizeof(want)) == 0);
    close(fd);

    /* a longer one: the buffer filled, no more; the next call reads on,
     * and one at the very end reads nothing, no error */
    fd = open(path, O_RDONLY);
    assert(gw_read_full(fd, got, 4096, &e) == 4096 && e == 0);
    assert(gw_read_full(fd, got + 4096, sizeof(want) - 4096, &e)
           == sizeof(want) - 4096 && e == 0);
    assert(memcmp(got, want, sizeof(want)) == 0);
    e = -1;
    assert(gw_read_full(fd, got, sizeof(got), &e) == 0 && e == 0);
    close(fd);

    /* a folder opens, and its read fails: its errno, nothing read */
    fd = open(dir, O_RDONLY);
    assert(fd >= 0);
    assert(gw_read_full(fd, got, sizeof(got), &e) == 0 && e == EISDIR);
    close(fd);

    /* a pipe written in two pieces: a short read, a signal, read on to
     * the end */
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_usr1;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;                  /* no SA_RESTART: read(2) says EINTR */
    assert(sigaction(SIGUSR1, &sa, NULL) == 0);
    assert(pipe(p) == 0);
    pid = fork();
    assert(pid >= 0);
    if (pid == 0) {
        writer(p[1], p[0]);
    }
    close(p[1]);
    memset(got, 0, sizeof(got));
    assert(gw_read_full(p[0], got, sizeof(got), &e) == 6);
    assert(e == 0 && memcmp(got, "abcdef", 6) == 0);
    close(p[0]);
    assert(waitpid(pid, &status, 0) == pid);
    assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);

    unlink(path);
    rmdir(dir);
    printf("ok\n");
    return 0;
}
