/* LD_PRELOAD shim for pg_flush_fault_spec: makes the PQflush() that
 * follows a PQpipelineSync() fail the way libpq's own fails when the
 * server hangs up in the middle of a send -- pqSendSome() finds the
 * socket full (EAGAIN), reads, sees EOF, and pqDropConnection() closes
 * the socket: PQflush() returns -1 and PQsocket() is -1 from then on.
 *
 * Armed once, when the file named by $PQ_FLUSH_FAULT exists at the end of
 * a PQpipelineSync() (the file is removed then). The failure is libpq's
 * own: the connection's socket is swapped (dup2) for one end of a
 * socketpair whose send buffer is full and whose peer has shut down its
 * writing side, a Flush message is queued so that there is something to
 * send, and the real PQflush() runs.
 *
 * Built by the spec: cc -shared -fPIC -I$(pg_config --includedir) ... -ldl */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>
#include <libpq-fe.h>

static int     in_sync;
static PGconn *armed;
static int     peer = -1;           /* the silent peer, kept open */

int
PQpipelineSync(PGconn *conn)
{
    static int (*real)(PGconn *);
    const char *trigger = getenv("PQ_FLUSH_FAULT");
    int         rc;

    if (real == NULL) {
        real = (int (*)(PGconn *))dlsym(RTLD_NEXT, "PQpipelineSync");
    }
    in_sync++;                      /* its own PQflush() runs as it is */
    rc = real(conn);
    in_sync--;
    if (rc == 1 && trigger != NULL && unlink(trigger) == 0) {
        armed = conn;
    }
    return rc;
}

static int
hang_up(PGconn *conn)
{
    int  fd = PQsocket(conn), sv[2];
    char junk[4096] = { 0 };

    if (fd < 0 || socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0) {
        return -1;
    }
    fcntl(sv[0], F_SETFL, fcntl(sv[0], F_GETFL) | O_NONBLOCK);
    while (send(sv[0], junk, sizeof(junk), MSG_NOSIGNAL) > 0) {
    }
    shutdown(sv[1], SHUT_WR);       /* EOF for the reader, nothing read */
    if (dup2(sv[0], fd) < 0) {
        return -1;
    }
    close(sv[0]);
    peer = sv[1];
    return 0;
}

int
PQflush(PGconn *conn)
{
    static int (*real)(PGconn *);

    if (real == NULL) {
        real = (int (*)(PGconn *))dlsym(RTLD_NEXT, "PQflush");
    }
    if (in_sync || conn == NULL || conn != armed) {
        return real(conn);
    }
    armed = NULL;
    if (hang_up(conn) != 0) {
        return real(conn);
    }
    if (PQsendFlushRequest(conn) != 1) {
        return -1;                  /* libpq dropped it already */
    }
    return real(conn);
}
