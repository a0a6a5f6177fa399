/*
 * master.c -- `paygate run`: binds the port, forks the workers, restarts
 * the ones that die, reloads code on HUP by starting a new generation and
 * draining the old one only once every new worker has loaded the app (the
 * new workers accept nothing until then), and serves the admin listener
 * (/metrics, /healthz). On USR2 (`paygate upgrade`) it starts the binary
 * found where it was started from as a new master, which takes over its
 * listening sockets (nothing binds again, nothing is refused) and tells it
 * to stop gracefully once all its own workers serve. Under systemd
 * ($NOTIFY_SOCKET) it says its state: READY=1 once every worker serves,
 * RELOADING=1 and READY=1 around a reload, STOPPING=1, and an upgrade's
 * new master MAINPID=<its pid> as it takes over.
 */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <openssl/ssl.h>

#include "config.h"
#include "http_parser.h"
#include "log.h"
#include "loop.h"
#include "master.h"
#include "metrics.h"
#include "sdnotify.h"
#include "shdict.h"
#include "tls.h"
#include "watchdog.h"
#include "worker.h"

#define MAX_WORKERS (2 * GW_MAX_WORKERS)  /* two generations during a reload */
#define READY_TIMEOUT 60.0      /* s for a new worker to load the app */
#define ADMIN_MAX_CONNS 64      /* admin clients at once; more wait */
#define ADMIN_DEADLINE 5.0      /* s from accept to a whole request head */
#define WATCHDOG_EVERY 0.5      /* s between the watchdog's looks */
#define INHERIT_ENV "PAYGATE_INHERIT"   /* what an upgrade hands over */
#define WATCHDOG_LATE 1.0       /* s a look may come late before the master
                                   takes it that it did not run itself */
#define UPGRADE_GRACE 5.0       /* s at most a refused upgrade's new master
                                   has from TERM to SIGKILL (never more
                                   than upgrade_timeout) */

enum wstate { W_FREE, W_STARTING, W_READY, W_DRAINING };

struct gw_worker {
    pid_t         pid;          /* 0 when the entry is free */
    enum wstate   state;
    int           gen;          /* code generation it runs */
    int           slot;         /* metrics slot */
    int           ready_fd;     /* our end of its ready socket (it says
                                   'R' or 'F', we answer 'G'), or -1 */
    struct event *ready_ev;     /* owned: watches ready_fd until 'R'/'F' */
    double        started;      /* s */
    double        stalled;      /* s its loop had not turned when the
                                   watchdog killed it, or 0 */
    int           stalled_loading; /* it was loading the app then */
    int           discarded;    /* of a refused reload's generation: 1,
                                   2 when the master killed it loading */
};

static struct {
    struct gw_opts   *o;            /* not owned */
    int               listen_fd;
    int               admin_fd;
    SSL_CTX          *ssl_ctx;      /* owned: current generation's */
    SSL_CTX          *ssl_next;     /* owned: a reload's, until it wins */
    int               gen;          /* current generation */
    int               next_gen;     /* generation being started, or 0 */
    int               last_gen;     /* highest ever started: an aborted
                                       generation's number is never reused */
    int               reload_again; /* HUP arrived during a reload */
    char              not_applied[512]; /* runtime keys the reload being
                                       made found changed in the config
                                       file, or "" */
    int               reloads_done; /* outcomes so far (status file) */
    int               stopping;
    int               failed_start; /* a first-generation worker failed */
    int               start_code;   /* exit code of that failure: 2 when a
                                       worker exited 2 (the app found its
                                       configuration bad), else 1 */
    int               served;       /* some worker has been ready once:
                                       failures are restarts from now on */
    int               crashes;      /* recent, for the restart backoff */
    double            last_crash;   /* s */
    struct gw_worker  w[MAX_WORKERS];
    struct event     *restart_ev;   /* owned */
    struct event     *reload_timer; /* owned */
    struct event     *stop_timer;   /* owned */
    struct event     *admin_ev;     /* owned */
    struct event     *admin_pause;  /* owned: re-arms admin_ev */
    struct event     *ticket_ev;    /* owned: rotates the TLS ticket key */
    struct event     *watchdog_ev;  /* owned: on_watchdog, or NULL when
                                       limits.loop_stall is off */
    double            watchdog_look; /* s (mono): its last look */
    double            watchdog_from; /* s (mono): no worker is judged
                                       stalled for longer than since then
                                       (the master itself did not run) */
    int               admin_conns;  /* open admin connections */
    struct bufferevent *admin_bev[ADMIN_MAX_CONNS]; /* them, or NULL: a
                                       worker closes their fds after fork */
    double            admin_by[ADMIN_MAX_CONNS]; /* each one's deadline for
                                       its request head (monotonic s) */
    char              start_why[400]; /* why the first generation did not
                                       start, when a worker said, or "" */
    int               exit_code;    /* 1: stopped for a failed upgrade */
    /* an upgrade this master makes (USR2): */
    pid_t             upgrade_pid;  /* the new master, until it serves or
                                       fails; 0 when none */
    int               upgrade_fd;   /* our end of its socket, or -1 */
    struct event     *upgrade_ev;   /* owned: watches upgrade_fd */
    struct event     *upgrade_timer; /* owned: o->upgrade_timeout */
    int               upgrades;     /* upgrades asked for (PID_FILE.upgrade) */
    pid_t             upgrade_ending; /* a refused upgrade's new master, until
                                       reaped (it holds the listening
                                       sockets: no upgrade meanwhile); 0 */
    int               upgrade_killed; /* its process group got SIGKILL */
    struct event     *upgrade_kill; /* owned: its grace, upgrade_grace() */
    /* this master as an upgrade's new one: */
    struct event     *handover_ev;  /* owned: watches up.fd for the go */
    int               handover_sent; /* 'R' sent: all our workers serve */
    /* systemd's notify socket ($NOTIFY_SOCKET, sdnotify.h): */
    int               sd_on;        /* this master speaks for the service:
                                       from its start, an upgrade's new one
                                       from its takeover; 0 once it has
                                       handed over to a new one */
    int               sd_ready;     /* READY=1 said for the start */
    int               sd_degraded;  /* STATUS says a worker died; not yet
                                       back to serving */
} m;

/* What an upgrade's old master handed this one (PAYGATE_INHERIT, read by
 * gw_upgrade_env() before anything else): fds inherited across exec. */
static struct {
    int               listen_fd;    /* the public listener, or -1 */
    int               admin_fd;     /* the admin listener, or -1 */
    int               fd;           /* socket to the old master, or -1 when
                                       this master is not an upgrade's or
                                       has taken over (or failed) */
    pid_t             from;         /* the old master */
} up = { -1, -1, -1, 0 };

/* The binary to start for an upgrade, and the arguments (main's argv:
 * not owned), as `paygate run` was started. */
static const char    *self_exe;
static char         **self_argv;

/* The runtime keys of the config file as the master started with them
 * (over the defaults, before any flag), and as a reload finds them: what
 * a reload cannot apply is named rather than silently kept. */
static struct gw_opts file_start, file_now;
static int            have_file_start;

/* s a worker told to stop may take before the master kills it: its drain
 * (shutdown_timeout), its on_stop functions, and a margin */
static double
stop_deadline(void)
{
    return m.o->shutdown_timeout + GW_STOP_HOOKS_TIMEOUT + 2;
}

static int spawn_worker(int gen);
static void reload_abort(const char *why);
static void announce(void);
static void upgrade_refused(const char *why);
static void upgrade_reaped(int status);
static void upgrade_gone(int status);
static void upgrade_end(const char *why, int term);
static void handover_ready(void);
static void on_term(evutil_socket_t sig, short what, void *arg);
static void sd_started(void);
static const char *serving_what(char *buf, size_t len);

/* Whether a worker of the first generation that fails to load ends this
 * master's start: before any worker served, and, for an upgrade's new
 * master, until it has taken over (the old one serves meanwhile, and a
 * worker restarted again and again would only hold the upgrade until its
 * timeout). */
static int
start_failing(void)
{
    return !m.served || up.fd >= 0;
}

static int
count(int gen, enum wstate st)
{
    int n = 0;

    for (int i = 0; i < MAX_WORKERS; i++) {
        if (m.w[i].pid != 0 && m.w[i].gen == gen && m.w[i].state == st) {
            n++;
        }
    }
    return n;
}

/* workers of gen that serve or will: not draining, not killed */
static int
live(int gen)
{
    return count(gen, W_STARTING) + count(gen, W_READY);
}

static int
alive(void)
{
    int n = 0;

    for (int i = 0; i < MAX_WORKERS; i++) {
        n += m.w[i].pid != 0;
    }
    return n;
}

/* A stopping master may exit: its workers are gone, and a refused
 * upgrade's new master too, or it has been killed (a process the kernel
 * holds after SIGKILL is not waited for). */
static int
stop_done(void)
{
    return m.stopping && alive() == 0
           && (m.upgrade_ending == 0 || m.upgrade_killed);
}

static void
signal_gen(int gen, int sig, enum wstate new_state)
{
    for (int i = 0; i < MAX_WORKERS; i++) {
        if (m.w[i].pid != 0 && m.w[i].gen == gen) {
            kill(m.w[i].pid, sig);
            if (new_state != W_FREE) {
                m.w[i].state = new_state;
            }
        }
    }
}

/* Closes our end of wk's ready socket (a worker still waiting for its go
 * reads EOF and stops). */
static void
drop_ready(struct gw_worker *wk)
{
    if (wk->ready_ev != NULL) {
        event_free(wk->ready_ev);
        wk->ready_ev = NULL;
    }
    if (wk->ready_fd >= 0) {
        close(wk->ready_fd);
        wk->ready_fd = -1;
    }
}

/* A worker still starting may have said 'R' already, unread yet (its
 * message waits in the socket behind another's, or behind its death):
 * reads it without waiting, so what is decided next (a kill or a graceful
 * stop, a refused generation) knows it has loaded. */
static ssize_t
take_pending_ready(struct gw_worker *wk, char *buf, size_t len)
{
    ssize_t n;

    if (wk->state != W_STARTING || wk->ready_fd < 0) {
        return 0;
    }
    n = recv(wk->ready_fd, buf, len - 1, MSG_DONTWAIT);
    if (n == 1 && buf[0] == 'R') {
        wk->state = W_READY;
        announce();
    }
    return n > 0 ? n : 0;
}

/* Why a reload is refused for a new worker the watchdog killed. */
static void
stall_reason(const struct gw_worker *wk, char *why, size_t len)
{
    snprintf(why, len, "a new worker stalled %s (its event loop did not "
             "turn for %.0f s, limits.loop_stall): %s that never yields, or "
             "a call that blocks", wk->stalled_loading
             ? "while loading the app" : "after loading the app",
             wk->stalled, wk->stalled_loading
             ? "its app.lua (or a module it requires)"
             : "a task or timer it started");
}

/* Why a reload is refused for a new worker that said 'F' (n bytes in buf,
 * with room for a NUL after them: 'F' and maybe its reason's first line)
 * or closed its socket. */
static void
load_failure(char *buf, ssize_t n, char *why, size_t len)
{
    if (n > 1 && buf[0] == 'F') {
        buf[n] = '\0';
        for (char *p = buf + 1; *p != '\0'; p++) {
            if ((unsigned char) *p < 0x20) {
                *p = ' ';       /* one line in the status file */
            }
        }
        snprintf(why, len, "a new worker failed to load the app: %s",
                 buf + 1);
    } else {
        snprintf(why, len, "a new worker failed to load the app (see its "
                           "log line)");
    }
}

/* Tells a worker that has loaded the app to start accepting. */
static void
go(struct gw_worker *wk)
{
    if (wk->ready_fd >= 0
        && send(wk->ready_fd, "G", 1, MSG_NOSIGNAL | MSG_DONTWAIT) != 1) {
        /* it died meanwhile: on_chld deals with it */
    }
    drop_ready(wk);
}

/* Writes line (and a newline) to PID_FILE + suffix: a temporary file
 * renamed over it, so a reader never sees half a line. Best effort: the
 * log says it too. */
static int
status_file(const char *suffix, const char *line)
{
    char path[1100], tmp[1120];
    FILE *f;

    snprintf(path, sizeof(path), "%s%s", m.o->pid_file, suffix);
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    f = fopen(tmp, "w");
    if (f == NULL) {
        return GW_ERR;
    }
    fprintf(f, "%s\n", line);
    if (fclose(f) != 0) {
        unlink(tmp);
        return GW_ERR;
    }
    return rename(tmp, path) == 0 ? GW_OK : GW_ERR;
}

/*
 * Records how the last reload ended in PID_FILE.reload, for `paygate
 * reload` to report: "<n> ok generation <g>" or "<n> refused: <why>",
 * where n counts reload outcomes ("<n> loading" while one is made).
 */
static int
reload_line(int n, const char *what)
{
    char line[1100];

    snprintf(line, sizeof(line), "%d %s", n, what);
    return status_file(".reload", line);
}

/* A reload's outcome: counted, in PID_FILE.reload, and to systemd (its
 * READY=1 after the RELOADING=1 of on_hup: `systemctl reload` of a
 * Type=notify-reload service returns then; STATUS says how it ended). */
static void
reload_status(int ok, const char *what)
{
    char line[1024];

    m.reloads_done++;
    if (m.sd_on && m.sd_ready) {
        char serving[160];

        if (ok) {
            gw_sd_notifyf("READY=1\nSTATUS=serving %s (generation %d; "
                          "reloaded)", serving_what(serving,
                                                    sizeof(serving)), m.gen);
        } else {
            char why[1024];

            snprintf(why, sizeof(why), "%s", what);
            gw_sd_notifyf("READY=1\nSTATUS=reload refused: %s; generation "
                          "%d serves on", gw_sd_line(why), m.gen);
        }
    }
    if (m.o->pid_file[0] == '\0') {
        return;
    }
    snprintf(line, sizeof(line), "%s%s", ok ? "ok " : "refused: ", what);
    reload_line(m.reloads_done, line);
}

/* A generation told to stop (the old one of a reload, a refused one's
 * loaded workers) gets the deadline TERM gives every worker: a worker
 * still running past it (a handler or on_stop looping without yielding
 * never reads its signal) is killed, as on TERM, instead of staying for
 * good beside the serving generation. */
struct drain_deadline {
    struct event *ev;
    int           gen;
};

static void
on_drain_deadline(evutil_socket_t fd, short what, void *arg)
{
    struct drain_deadline *d = arg;

    for (int i = 0; i < MAX_WORKERS; i++) {
        if (m.w[i].pid != 0 && m.w[i].gen == d->gen
            && m.w[i].state == W_DRAINING)
        {
            gw_log(GW_LOG_WARN, "worker %d (generation %d) still running "
                                "%.0f s after it was told to stop; killing "
                                "it", (int) m.w[i].pid, d->gen,
                   stop_deadline());
            kill(m.w[i].pid, SIGKILL);
        }
    }
    event_free(d->ev);
    free(d);
}

static void
drain_deadline(int gen)
{
    double secs = stop_deadline();
    struct drain_deadline *d = malloc(sizeof(*d));
    struct timeval tv;

    if (d == NULL) {
        return;
    }
    d->gen = gen;
    d->ev = evtimer_new(gw_loop_base(), on_drain_deadline, d);
    if (d->ev == NULL) {
        free(d);
        return;
    }
    tv.tv_sec = (time_t) secs;
    tv.tv_usec = (suseconds_t) ((secs - (double) tv.tv_sec) * 1e6);
    evtimer_add(d->ev, &tv);
}

static void
reload_commit(void)
{
    int old = m.gen;

    m.gen = m.next_gen;
    m.next_gen = 0;
    evtimer_del(m.reload_timer);
    if (m.ssl_next != NULL) {
        SSL_CTX_free(m.ssl_ctx);
        m.ssl_ctx = m.ssl_next;
        m.ssl_next = NULL;
    }
    /* the new generation starts accepting as the old one stops: what
     * arrives meanwhile waits in the shared listening socket's queue */
    for (int i = 0; i < MAX_WORKERS; i++) {
        if (m.w[i].pid != 0 && m.w[i].gen == m.gen) {
            go(&m.w[i]);
        }
    }
    signal_gen(old, SIGTERM, W_DRAINING);
    drain_deadline(old);
    gw_metrics_reload(1);
    gw_log(GW_LOG_INFO, "reload: generation %d serving; generation %d "
                        "draining", m.gen, old);
    {
        char what[700];

        if (m.not_applied[0] != '\0') {
            snprintf(what, sizeof(what), "generation %d (not applied until "
                     "a restart: %s)", m.gen, m.not_applied);
        } else {
            snprintf(what, sizeof(what), "generation %d", m.gen);
        }
        reload_status(1, what);
    }
    sd_started();   /* a reload made before the start was whole */
    if (m.reload_again) {
        m.reload_again = 0;
        raise(SIGHUP);
    }
}

/* "http://127.0.0.1:8080 with 4 workers", the addresses as bound (a
 * listen on port 0 gets its port here): what the serving line and
 * systemd's STATUS name. Returns buf. */
static const char *
serving_what(char *buf, size_t len)
{
    const struct gw_opts *o = m.o;
    char lbuf[80];

    snprintf(buf, len, "%s%s with %d worker%s",
             m.ssl_ctx ? "https://" : "http://",
             gw_bound_addr(m.listen_fd, o->listen, lbuf, sizeof(lbuf)),
             o->workers, o->workers == 1 ? "" : "s");
    return buf;
}

/* The first worker is ready: only now does the master say it is serving,
 * so an app that refuses its configuration leaves just its own line. */
static void
announce(void)
{
    const struct gw_opts *o = m.o;
    char what[160], abuf[80];

    if (m.served) {
        return;
    }
    m.served = 1;
    gw_log(GW_LOG_INFO, "paygate: serving %s on %s%s%s", o->app_dir,
           serving_what(what, sizeof(what)),
           m.admin_fd >= 0 ? "; admin on " : "",
           m.admin_fd >= 0 ? gw_bound_addr(m.admin_fd, o->admin, abuf,
                                        sizeof(abuf)) : "");
}

/* systemd: the service is up. READY=1 (a Type=notify start ends here),
 * MAINPID (this master: an upgrade's new one moves the service to it)
 * and STATUS naming what serves. */
static void
sd_ready_now(void)
{
    char what[160];

    m.sd_ready = 1;
    m.sd_degraded = 0;
    gw_sd_notifyf("READY=1\nMAINPID=%d\nSTATUS=serving %s (generation %d)",
                  (int) getpid(), serving_what(what, sizeof(what)), m.gen);
}

/* systemd: READY=1 once every worker of the serving generation serves
 * (the first one's serving line is earlier); once, at the start. */
static void
sd_started(void)
{
    if (m.sd_on && !m.sd_ready && count(m.gen, W_READY) >= m.o->workers) {
        sd_ready_now();
    }
}

/* systemd: a worker of the serving generation died and is restarted.
 * STATUS says so (`systemctl status` shows it): a start whose READY=1
 * waits for a worker that keeps failing, or a crash while serving, until
 * sd_restored says the generation is whole again. */
static void
sd_worker_died(pid_t pid, const char *why, double delay)
{
    char w[256];

    if (!m.sd_on) {
        return;
    }
    snprintf(w, sizeof(w), "%s", why);
    m.sd_degraded = 1;
    gw_sd_notifyf("STATUS=worker %d %s; restarting in %.1f s (%d of %d "
                  "workers serve)", (int) pid, gw_sd_line(w), delay,
                  count(m.gen, W_READY), m.o->workers);
}

/* systemd: every worker of the serving generation serves again after a
 * restart: STATUS back to what serves (READY=1 itself is said once, at
 * the start: sd_started). */
static void
sd_restored(void)
{
    char what[160];

    if (!m.sd_on || !m.sd_ready || !m.sd_degraded
        || count(m.gen, W_READY) < m.o->workers) {
        return;
    }
    m.sd_degraded = 0;
    gw_sd_notifyf("STATUS=serving %s (generation %d)",
                  serving_what(what, sizeof(what)), m.gen);
}

static void
on_ready(evutil_socket_t fd, short what, void *arg)
{
    struct gw_worker *wk = arg;
    char buf[300], c;
    ssize_t n = read(fd, buf, sizeof(buf) - 1);

    c = n > 0 ? buf[0] : 0;
    event_free(wk->ready_ev);
    wk->ready_ev = NULL;
    if (wk->state == W_DRAINING) {
        drop_ready(wk);
        return;     /* stopping, or its generation was replaced: moot */
    }
    if (n == 1 && c == 'R') {
        wk->state = W_READY;
        announce();
        if (wk->gen != m.next_gen && up.fd >= 0 && !m.handover_sent) {
            handover_ready();   /* goes them all once all have loaded */
        } else if (wk->gen != m.next_gen) {
            go(wk);         /* the serving generation: a start, a restart */
            sd_restored();  /* (before sd_started: its READY=1 says it) */
            sd_started();
        } else if (count(m.next_gen, W_READY) == m.o->workers) {
            reload_commit();    /* tells the whole generation to go */
        }
        return;
    }
    drop_ready(wk);
    /* 'F' or EOF: it could not load the app; 'F' may say why */
    if (wk->gen == m.next_gen) {
        char why[400];

        if (wk->stalled > 0 && n <= 0) {
            stall_reason(wk, why, sizeof(why));     /* killed for it */
        } else {
            load_failure(buf, n, why, sizeof(why));
        }
        reload_abort(why);
    } else if (start_failing() && !m.stopping) {
        m.failed_start = 1;
        if (m.start_why[0] == '\0') {
            load_failure(buf, n, m.start_why, sizeof(m.start_why));
        }
    }
}

static int
spawn_worker(int gen)
{
    struct gw_worker *wk = NULL;
    int p[2], slot;
    pid_t pid, master;

    for (int i = 0; i < MAX_WORKERS; i++) {
        if (m.w[i].pid == 0) {
            wk = &m.w[i];
            break;
        }
    }
    slot = gw_metrics_free_slot();
    if (wk == NULL || slot < 0
        || socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, p) != 0) {
        gw_log(GW_LOG_ERROR, "master: cannot start a worker: %s",
               wk == NULL || slot < 0 ? "no slot" : strerror(errno));
        gw_metrics_retire(slot);        /* the reservation, if any */
        return GW_ERR;
    }
    gw_watchdog_arm(slot);      /* judged from now: its load included */
    master = getpid();
    pid = fork();
    if (pid < 0) {
        gw_log(GW_LOG_ERROR, "master: fork: %s", strerror(errno));
        close(p[0]);
        close(p[1]);
        gw_metrics_retire(slot);
        return GW_ERR;
    }
    if (pid == 0) {
        int rc;

        /* die with the master; if it died before we could ask, go now */
        prctl(PR_SET_PDEATHSIG, SIGTERM);
        if (getppid() != master) {
            _exit(0);
        }
        close(p[0]);
        if (m.admin_fd >= 0) {
            close(m.admin_fd);
        }
        /* an upgrade's sockets: a worker holding one would keep its EOF
         * from the master at the other end */
        if (m.upgrade_fd >= 0) {
            close(m.upgrade_fd);
        }
        if (up.fd >= 0) {
            close(up.fd);
        }
        /* the admin clients' sockets too: held here, a connection the
         * master closes would stay open (no EOF for its client) for as
         * long as this worker lives */
        for (int i = 0; i < ADMIN_MAX_CONNS; i++) {
            if (m.admin_bev[i] != NULL) {
                close(bufferevent_getfd(m.admin_bev[i]));
            }
        }
        for (int i = 0; i < MAX_WORKERS; i++) {
            if (m.w[i].ready_fd >= 0 && m.w[i].pid != 0) {
                close(m.w[i].ready_fd);
            }
        }
        signal(SIGTERM, SIG_DFL);
        signal(SIGINT, SIG_DFL);
        /* only the master speaks to systemd: a process the app starts
         * would otherwise be taken for it */
        unsetenv(GW_SD_ENV);
        rc = gw_worker_main(m.o, m.listen_fd,
                            gen == m.gen ? m.ssl_ctx
                            : (m.ssl_next ? m.ssl_next : m.ssl_ctx),
                            p[1], slot, gen);
        _exit(rc);
    }
    close(p[1]);
    fcntl(p[0], F_SETFL, O_NONBLOCK);   /* on_chld reads it, maybe empty */
    memset(wk, 0, sizeof(*wk));
    wk->pid = pid;
    wk->gen = gen;
    wk->slot = slot;
    wk->state = W_STARTING;
    wk->ready_fd = p[0];
    wk->started = gw_loop_now();
    wk->ready_ev = event_new(gw_loop_base(), p[0], EV_READ, on_ready, wk);
    event_add(wk->ready_ev, NULL);
    return GW_OK;
}

static void
reload_abort(const char *why)
{
    int gen = m.next_gen;

    if (gen == 0) {
        return;
    }
    m.next_gen = 0;
    evtimer_del(m.reload_timer);
    /* None of them has accepted a connection (they wait for a go that
     * only a whole generation gets), so stopping them drops no request.
     * One that has loaded the app reads EOF instead of its go and stops
     * gracefully: its paygate.on_stop functions give back what its tasks
     * took (leases), which a kill would hold until their ttl ran out. One
     * still loading may be stuck there: SIGKILL. */
    for (int i = 0; i < MAX_WORKERS; i++) {
        if (m.w[i].pid != 0 && m.w[i].gen == gen) {
            char msg[300];

            take_pending_ready(&m.w[i], msg, sizeof(msg));
            drop_ready(&m.w[i]);
            m.w[i].discarded = 1;
            if (m.w[i].state != W_READY) {
                kill(m.w[i].pid, SIGKILL);
                m.w[i].discarded = 2;
            }
            m.w[i].state = W_DRAINING;
        }
    }
    drain_deadline(gen);
    if (m.ssl_next != NULL) {
        SSL_CTX_free(m.ssl_next);
        m.ssl_next = NULL;
    }
    gw_metrics_reload(0);
    gw_log(GW_LOG_ERROR, "reload refused: %s; generation %d keeps serving",
           why, m.gen);
    reload_status(0, why);
    if (m.reload_again) {
        m.reload_again = 0;
        raise(SIGHUP);
    }
}

static void
on_reload_timeout(evutil_socket_t fd, short what, void *arg)
{
    reload_abort("new workers did not load the app in time");
}

/* The listener's TLS context from the options; NULL with err. */
static SSL_CTX *
tls_ctx(const struct gw_opts *o, char *err, size_t errlen)
{
    struct gw_tls_conf t = {
        .cert = o->tls_cert, .key = o->tls_key,
        .cert2 = o->tls_ecdsa_cert, .key2 = o->tls_ecdsa_key,
        .client_ca = o->tls_client_ca, .protocols = o->tls_protocols,
        .ciphers = o->tls_ciphers, .ciphersuites = o->tls_ciphersuites,
        .session_cache = o->tls_session_cache,
        .no_tickets = !o->tls_session_tickets,
        .ticket_rotation = o->tls_ticket_rotation
    };

    return gw_tls_server_ctx(&t, err, errlen);
}

static void
on_ticket_rotate(evutil_socket_t fd, short what, void *arg)
{
    if (gw_tls_tickets_rotate() != GW_OK) {
        gw_log(GW_LOG_ERROR, "tls: cannot make a new session-ticket key; "
                             "the current one stays");
    }
}

static void
on_hup(evutil_socket_t sig, short what, void *arg)
{
    struct timeval tv = { (time_t) READY_TIMEOUT, 0 };
    char err[512];

    if (m.stopping) {
        return;
    }
    if (up.fd >= 0) {
        /* an upgrade's new master before it took over: the pid file and
         * its status files are the old master's, and this one read the
         * code at its start */
        gw_log(GW_LOG_WARN, "reload ignored: this master is taking over "
               "from pid %d and does not serve yet (it read the code at "
               "its start)", (int) up.from);
        return;
    }
    if (m.next_gen != 0) {
        /* said to systemd with the reload after this one: the one
         * loading read the code before this HUP */
        m.reload_again = 1;
        return;
    }
    if (m.sd_on && m.sd_ready) {
        /* each outcome below says READY=1 (reload_status) */
        gw_sd_notifyf("RELOADING=1\nMONOTONIC_USEC=%llu\nSTATUS=reloading",
                      (unsigned long long) gw_sd_monotonic_usec());
    }
    if (m.upgrade_pid != 0) {
        /* the new master read the code at its start, before this HUP:
         * a reload of ours would be dropped at the handover, and what
         * this reload loads would not serve */
        snprintf(err, sizeof(err), "an upgrade is in progress (the new "
                 "master, pid %d, read the code at its start); reload "
                 "once it has ended", (int) m.upgrade_pid);
        gw_metrics_reload(0);
        gw_log(GW_LOG_ERROR, "reload refused: %s; generation %d keeps "
                             "serving", err, m.gen);
        reload_status(0, err);
        return;
    }
    gw_log(GW_LOG_INFO, "reload: loading the new code");
    m.not_applied[0] = '\0';
    if (m.o->config_file != NULL) {
        /* a config file the next start would refuse is refused now, not
         * found at that start; runtime keys changed in it are named (they
         * take effect on a restart: the new workers get the old ones) */
        gw_opts_defaults(&file_now);
        if (gw_opts_load_file(&file_now, m.o->config_file, err,
                              sizeof(err)) != GW_OK) {
            gw_metrics_reload(0);
            gw_log(GW_LOG_ERROR, "reload refused: %s; generation %d keeps "
                                 "serving", err, m.gen);
            reload_status(0, err);
            return;
        }
        if (file_now.near_miss[0] != '\0') {
            gw_log(GW_LOG_WARN, "reload: config %s: %s: not runtime keys, "
                                "so the runtime does not read them (the app "
                                "sees them in paygate.config)",
                   m.o->config_file, file_now.near_miss);
        }
        if (have_file_start) {
            gw_opts_diff(&file_start, &file_now, m.not_applied,
                         sizeof(m.not_applied));
        }
        if (m.not_applied[0] != '\0') {
            gw_log(GW_LOG_WARN, "reload: %s changes %s: runtime keys take "
                                "effect on a restart; the new workers run "
                                "with the values the server started with",
                   m.o->config_file, m.not_applied);
        }
    }
    if (m.o->tls_cert[0] != '\0') {
        m.ssl_next = tls_ctx(m.o, err, sizeof(err));
        /* a certificate out of its dates is refused here, where the one
         * serving stays (at start it is only a warning: there is none) */
        if (m.ssl_next != NULL
            && (gw_tls_cert_dates(m.o->tls_cert, err, sizeof(err))
                || gw_tls_cert_dates(m.o->tls_ecdsa_cert, err,
                                     sizeof(err)))) {
            SSL_CTX_free(m.ssl_next);
            m.ssl_next = NULL;
        }
        if (m.ssl_next == NULL) {
            gw_metrics_reload(0);
            gw_log(GW_LOG_ERROR, "reload refused: %s; generation %d keeps "
                                 "serving", err, m.gen);
            reload_status(0, err);
            return;
        }
    }
    m.next_gen = ++m.last_gen;
    /* "<n> loading" until the outcome: `paygate reload` run meanwhile
     * knows that the outcome coming next is of code read before it ran,
     * and waits for the reload after it (its HUP makes one) */
    if (m.o->pid_file[0] != '\0') {
        reload_line(m.reloads_done, "loading");
    }
    for (int i = 0; i < m.o->workers; i++) {
        if (spawn_worker(m.next_gen) != GW_OK) {
            reload_abort("cannot start the new workers");
            return;
        }
    }
    evtimer_add(m.reload_timer, &tv);
}

/* Brings the serving generation back to its size. A restart pending
 * across a reload finds the new generation whole and starts nothing; a
 * spawn that fails (no fds, no processes) is tried again. */
static void
on_restart(evutil_socket_t fd, short what, void *arg)
{
    gw_loop_update_time();
    while (!m.stopping && live(m.gen) < m.o->workers) {
        if (spawn_worker(m.gen) != GW_OK) {
            struct timeval tv = { 1, 0 };

            evtimer_add(m.restart_ev, &tv);
            return;
        }
        gw_metrics_worker_restart();
    }
}

/* What a worker is doing, for the watchdog's line. */
static const char *
doing(const struct gw_worker *wk)
{
    switch (wk->state) {
    case W_STARTING:
        return "loading the app";
    case W_READY:
        return wk->gen == m.next_gen ? "loaded, waiting for its generation"
                                     : "serving";
    case W_DRAINING:
        return "draining";
    default:
        return "stopped";
    }
}

/*
 * The loop-stall watchdog (limits.loop_stall): a worker whose loop has
 * not marked a turn for longer than the limit (a handler, hook, task or
 * the app's top level running without yielding, or a call that blocks)
 * serves nothing, answers no deadline and reads no signal. It is said in
 * one line, counted, and killed with SIGKILL (it could not run its own
 * stop); on_chld then replaces it as any worker that died (backoff), or
 * refuses the reload it was loading, or ends a start it was part of. A
 * worker is judged in every state: one loading the app from its fork on
 * (a long load is a stall only past the same limit), one draining too
 * (its drain deadline is later, and it finishes nothing meanwhile).
 */
static void
on_watchdog(evutil_socket_t fd, short what, void *arg)
{
    double now = gw_loop_mono_fresh();

    if (now - m.watchdog_look > WATCHDOG_EVERY + WATCHDOG_LATE) {
        /* The master itself did not run meanwhile: the whole group was
         * stopped (^Z, SIGSTOP), its cgroup frozen (docker pause, systemd
         * freeze), or the machine starved. The monotonic clock ran on,
         * and every worker's mark looks as old as that pause, though no
         * worker's loop was stuck: each is judged from now instead (one
         * truly stuck is killed loop_stall s later). */
        gw_log(GW_LOG_WARN, "watchdog: the master did not run for %.1f s "
               "(the processes stopped or frozen, or the machine starved); "
               "the workers' loops are judged from now",
               now - m.watchdog_look);
        m.watchdog_from = now;
    }
    m.watchdog_look = now;
    for (int i = 0; i < MAX_WORKERS; i++) {
        struct gw_worker *wk = &m.w[i];
        char last[256];
        double age;
        int loading;

        if (wk->pid == 0 || wk->stalled > 0) {
            continue;       /* free, or killed already: not said twice */
        }
        age = gw_watchdog_age(wk->slot);
        if (age <= m.o->loop_stall
            || now - m.watchdog_from <= m.o->loop_stall) {
            continue;
        }
        loading = wk->state == W_STARTING;
        gw_watchdog_last(wk->slot, last, sizeof(last));
        gw_log(GW_LOG_ERROR, "worker %d (index %d, generation %d, %s) "
               "stalled: its event loop has not turned for %.1f s "
               "(limits.loop_stall %g s): %s that never yields (a loop, a "
               "runaway pattern match, a huge synchronous sort), or a call "
               "that blocks; %s%s; killing it (SIGKILL)", (int) wk->pid, i,
               wk->gen, doing(wk), age, m.o->loop_stall,
               loading ? "its app.lua (or a module it requires), a task or "
                         "a timer"
                       : "a handler, hook or task",
               last[0] != '\0' ? "the last request it started: "
                               : "it has started no request",
               last);
        wk->stalled = age;
        wk->stalled_loading = loading;
        gw_metrics_worker_stall();
        kill(wk->pid, SIGKILL);
    }
}

static void
describe_exit(const struct gw_worker *wk, int status, char *buf, size_t len)
{
    if (wk->stalled > 0 && WIFSIGNALED(status)
        && WTERMSIG(status) == SIGKILL) {
        snprintf(buf, len, "killed by the watchdog (its loop stalled)");
    } else if (WIFEXITED(status)) {
        snprintf(buf, len, "exited with status %d", WEXITSTATUS(status));
    } else if (WIFSIGNALED(status)) {
        snprintf(buf, len, "killed by signal %d (%s)%s", WTERMSIG(status),
                 strsignal(WTERMSIG(status)),
                 WCOREDUMP(status) ? ", core dumped" : "");
    } else {
        snprintf(buf, len, "ended (status %d)", status);
    }
}

static void
on_chld(evutil_socket_t sig, short what, void *arg)
{
    int status;
    pid_t pid;

    gw_loop_update_time();
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        struct gw_worker *wk = NULL;
        char why[128], msg[300];
        ssize_t said;

        for (int i = 0; i < MAX_WORKERS; i++) {
            if (m.w[i].pid == pid) {
                wk = &m.w[i];
                break;
            }
        }
        if (wk == NULL) {
            if (pid == m.upgrade_pid) {
                upgrade_reaped(status);
            } else if (pid == m.upgrade_ending) {
                upgrade_gone(status);
            }
            continue;
        }
        describe_exit(wk, status, why, sizeof(why));
        /* it may have said 'R' and died, or said 'F' (and why) and exited,
         * and be reaped here before that was read: waitpid takes every
         * child that has ended, whichever one's exit brought us here */
        said = take_pending_ready(wk, msg, sizeof(msg));
        drop_ready(wk);
        gw_metrics_retire(wk->slot);
        if (wk->discarded == 2 && wk->stalled == 0 && WIFSIGNALED(status)
            && WTERMSIG(status) == SIGKILL) {
            /* the SIGKILL was ours (reload_abort): "killed by signal 9"
             * read like a crash */
            gw_log(GW_LOG_INFO, "worker %d (generation %d) discarded "
                   "(reload refused): stopped while loading the app",
                   (int) pid, wk->gen);
        } else if (wk->discarded) {
            gw_log(GW_LOG_INFO, "worker %d (generation %d) %s (discarded: "
                   "reload refused)", (int) pid, wk->gen, why);
        } else if (wk->state == W_DRAINING || m.stopping) {
            gw_log(GW_LOG_INFO, "worker %d (generation %d) %s", (int) pid,
                   wk->gen, why);
        } else if (wk->gen == m.next_gen) {
            char reason[400];

            wk->pid = 0;
            if (said > 0 && msg[0] == 'F') {
                load_failure(msg, said, reason, sizeof(reason));
            } else if (wk->stalled > 0) {
                stall_reason(wk, reason, sizeof(reason));
            } else {
                snprintf(reason, sizeof(reason), "a new worker died while "
                                                 "loading the app");
            }
            reload_abort(reason);
            continue;
        } else if (wk->state == W_STARTING && start_failing()) {
            m.failed_start = 1;
            if (WIFEXITED(status) && WEXITSTATUS(status) == 2) {
                m.start_code = 2;
            }
            if (m.start_why[0] != '\0') {
                /* said already ('F', read by on_ready) */
            } else if (said > 0 && msg[0] == 'F') {
                load_failure(msg, said, m.start_why, sizeof(m.start_why));
            } else if (wk->stalled > 0) {
                stall_reason(wk, m.start_why, sizeof(m.start_why));
            } else {
                snprintf(m.start_why, sizeof(m.start_why), "a worker %s "
                         "while loading the app", why);
            }
            /* exit 2: the app refused its configuration and has written
             * its one-line reason; the master adds nothing at info */
            gw_log(m.start_code == 2 ? GW_LOG_DEBUG : GW_LOG_ERROR,
                   "worker %d %s before serving", (int) pid, why);
        } else {
            /* a serving worker died: restart it, backing off on repeats */
            double delay;
            struct timeval tv;

            if (gw_loop_mono() - m.last_crash > 60) {
                m.crashes = 0;
            }
            m.last_crash = gw_loop_mono();
            /* 0.1 s doubling, at most 25.6 s (2^8 x 0.1 s) */
            delay = 0.1 * (double) (1 << (m.crashes < 8 ? m.crashes : 8));
            m.crashes++;
            gw_log(GW_LOG_ERROR, "worker %d %s; restarting in %.1f s",
                   (int) pid, why, delay);
            tv.tv_sec = (time_t) delay;
            tv.tv_usec = (suseconds_t) ((delay - (double) tv.tv_sec) * 1e6);
            evtimer_add(m.restart_ev, &tv);
            wk->pid = 0;
            sd_worker_died(pid, why, delay);
        }
        wk->pid = 0;
    }
    if (m.failed_start) {
        if (m.sd_on) {
            gw_sd_notifyf("STATUS=the app failed to start: %s",
                          m.start_why[0] != '\0' ? gw_sd_line(m.start_why)
                          : "see the log");
        }
        if (m.start_code == 2) {
            gw_log(GW_LOG_DEBUG, "paygate: the app refused its "
                                 "configuration; stopping");
        } else {
            gw_log(GW_LOG_ERROR, "paygate: the app failed to start (see "
                                 "the log line above); stopping");
        }
        for (int i = 0; i < MAX_WORKERS; i++) {
            if (m.w[i].pid != 0) {
                kill(m.w[i].pid, SIGKILL);      /* any generation */
            }
        }
        event_base_loopbreak(gw_loop_base());
        return;
    }
    if (stop_done()) {
        event_base_loopbreak(gw_loop_base());
    }
}

static void
on_stop_deadline(evutil_socket_t fd, short what, void *arg)
{
    gw_log(GW_LOG_WARN, "master: workers still running after the "
                        "shutdown deadline; killing them");
    for (int i = 0; i < MAX_WORKERS; i++) {
        if (m.w[i].pid != 0) {
            kill(m.w[i].pid, SIGKILL);
        }
    }
}

static void
on_term(evutil_socket_t sig, short what, void *arg)
{
    /* workers get their own deadline; ours is a little later */
    double secs = stop_deadline();
    struct timeval tv;

    if (m.stopping) {
        return;
    }
    m.stopping = 1;
    gw_log(GW_LOG_INFO, "master: stopping (draining in-flight requests)");
    if (m.sd_on) {
        gw_sd_notify("STOPPING=1\nSTATUS=stopping: draining in-flight "
                     "requests");
    }
    if (m.upgrade_pid != 0) {
        /* its workers wait for its go: it stops as we do, and this
         * master waits until it has ended or been killed */
        upgrade_end("the server was told to stop", 1);
    }
    if (m.ticket_ev != NULL) {
        event_del(m.ticket_ev);
    }
    if (m.admin_ev != NULL) {
        event_del(m.admin_ev);
    }
    for (int i = 0; i < MAX_WORKERS; i++) {
        if (m.w[i].pid != 0) {
            kill(m.w[i].pid, SIGTERM);
            m.w[i].state = W_DRAINING;
        }
    }
    tv.tv_sec = (time_t) secs;
    tv.tv_usec = 0;
    evtimer_add(m.stop_timer, &tv);
    if (stop_done()) {
        event_base_loopbreak(gw_loop_base());
    }
}

/* ---- admin listener -------------------------------------------------- */

static void
admin_reply(struct bufferevent *bev, int head, int status,
            const char *ctype, const char *body, size_t len)
{
    struct evbuffer *out = bufferevent_get_output(bev);

    evbuffer_add_printf(out, "HTTP/1.1 %d %s\r\nContent-Type: %s\r\n"
                             "Content-Length: %zu\r\n%sConnection: close"
                             "\r\n\r\n", status,
                        status == 200 ? "OK" : status == 404 ? "Not Found"
                        : status == 503 ? "Service Unavailable"
                        : status == 405 ? "Method Not Allowed"
                        : "Bad Request", ctype, len,
                        status == 405 ? "Allow: GET, HEAD\r\n" : "");
    if (!head) {                        /* a HEAD's answer has no body */
        evbuffer_add(out, body, len);
    }
}

/* Ends an admin connection (the only place that frees one). */
static void
admin_done(struct bufferevent *bev)
{
    for (int i = 0; i < ADMIN_MAX_CONNS; i++) {
        if (m.admin_bev[i] == bev) {
            m.admin_bev[i] = NULL;
            break;
        }
    }
    bufferevent_free(bev);
    m.admin_conns--;
}

static void
admin_written(struct bufferevent *bev, void *arg)
{
    admin_done(bev);
}

static void
admin_event(struct bufferevent *bev, short what, void *arg)
{
    admin_done(bev);
}

#define ADMIN_MAX_FIELDS 64    /* header fields of an admin request */

static void
admin_read(struct bufferevent *bev, void *arg)
{
    struct evbuffer *in = bufferevent_get_input(bev);
    size_t len = evbuffer_get_length(in), scanned = 0, end;
    struct gw_http_head *h;
    char *buf;
    int head = 0;                       /* a HEAD request */

    if (len > 8192) {
        admin_done(bev);
        return;
    }
    buf = (char *) evbuffer_pullup(in, -1);
    end = gw_http_head_end(buf, len, &scanned);
    if (end == 0) {
        /* the head's deadline counts from accept: the read timeout alone
         * starts again at each byte, and 64 clients sending one byte
         * every few seconds held every admin slot (no /healthz) */
        for (int i = 0; i < ADMIN_MAX_CONNS; i++) {
            if (m.admin_bev[i] == bev) {
                double left = m.admin_by[i] - gw_loop_mono_fresh();
                struct timeval tv, wtv = { 5, 0 };

                if (left <= 0) {
                    admin_done(bev);
                    return;
                }
                tv.tv_sec = (time_t) left;
                tv.tv_usec = (suseconds_t) ((left - (double) tv.tv_sec)
                                            * 1e6);
                if (tv.tv_sec == 0 && tv.tv_usec == 0) {
                    tv.tv_usec = 1;     /* a zero one would be no timeout */
                }
                bufferevent_set_timeouts(bev, &tv, &wtv);
                break;
            }
        }
        return;
    }
    h = malloc(sizeof(*h) + ADMIN_MAX_FIELDS * sizeof(*h->headers));
    if (h != NULL) {
        h->headers = (struct gw_http_header *) (h + 1);
        h->max_headers = ADMIN_MAX_FIELDS;
    }
    if (h == NULL || gw_http_parse_head(buf, end, h) != 0) {
        admin_reply(bev, head, 400, "text/plain", "bad request\n", 12);
    } else if (!(h->method_len == 3 && memcmp(h->method, "GET", 3) == 0)
               && !(head = h->method_len == 4
                                   && memcmp(h->method, "HEAD", 4) == 0)) {
        /* read-only: a POST or DELETE here is a mistake, not a read */
        admin_reply(bev, head, 405, "text/plain", "method not allowed\n",
                    19);
    } else if (h->path_len == 8 && memcmp(h->path, "/metrics", 8) == 0) {
        size_t n = 0;
        char *text = gw_metrics_render(&n);

        if (text == NULL) {
            admin_reply(bev, head, 503, "text/plain", "no memory\n", 10);
        } else {
            admin_reply(bev, head, 200, "text/plain; version=0.0.4", text,
                        n);
            free(text);
        }
    } else if (h->path_len == 8 && memcmp(h->path, "/healthz", 8) == 0) {
        char body[128];
        int ready = count(m.gen, W_READY);
        int n = snprintf(body, sizeof(body),
                         "{\"status\":\"%s\",\"workers\":%d,"
                         "\"generation\":%d,\"pid\":%d}\n",
                         ready > 0 && !m.stopping ? "ok" : "unavailable",
                         ready, m.gen, (int) getpid());

        admin_reply(bev, head, ready > 0 && !m.stopping ? 200 : 503,
                    "application/json", body, (size_t) n);
    } else {
        admin_reply(bev, head, 404, "text/plain", "not found\n", 10);
    }
    free(h);
    bufferevent_disable(bev, EV_READ);
    bufferevent_setcb(bev, NULL, admin_written, admin_event, NULL);
}

static void
admin_resume(evutil_socket_t fd, short what, void *arg)
{
    if (!m.stopping && m.admin_ev != NULL) {
        event_add(m.admin_ev, NULL);
    }
}

static void
on_admin_accept(evutil_socket_t lfd, short what, void *arg)
{
    int fd;
    struct bufferevent *bev;
    struct timeval tv = { 5, 0 };

    if (m.admin_conns >= ADMIN_MAX_CONNS) {
        fd = -1;
        errno = EMFILE;
    } else {
        fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    }
    if (fd < 0) {
        if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED) {
            /* too many admin clients, or no fds: a level-triggered accept
             * would spin the master; look again in a second */
            struct timeval pause = { 1, 0 };

            event_del(m.admin_ev);
            evtimer_add(m.admin_pause, &pause);
        }
        return;
    }
    bev = bufferevent_socket_new(gw_loop_base(), fd, BEV_OPT_CLOSE_ON_FREE);
    if (bev == NULL) {
        close(fd);
        return;
    }
    m.admin_conns++;
    for (int i = 0; i < ADMIN_MAX_CONNS; i++) {
        if (m.admin_bev[i] == NULL) {
            m.admin_bev[i] = bev;
            m.admin_by[i] = gw_loop_mono_fresh() + ADMIN_DEADLINE;
            break;
        }
    }
    bufferevent_setcb(bev, admin_read, NULL, admin_event, NULL);
    bufferevent_set_timeouts(bev, &tv, &tv);
    bufferevent_enable(bev, EV_READ);
}

/* ---- binary upgrade (USR2, `paygate upgrade`) ------------------------ */

/* The pid PATH holds, or 0. */
static int
pid_file_pid(const char *path)
{
    FILE *f = fopen(path, "r");
    int pid = 0;

    if (f == NULL) {
        return 0;
    }
    if (fscanf(f, "%d", &pid) != 1) {
        pid = 0;
    }
    fclose(f);
    return pid;
}

/*
 * PID_FILE.upgrade, for `paygate upgrade`: "<owner> <n> <what>", owner the
 * master that handles the pid file's USR2, n the upgrades it was asked for:
 * "P 0 ready" (it upgrades: a master that does not would die of USR2),
 * "P n upgrading, outcome within S s" (S: upgrade_timeout + UPGRADE_GRACE,
 * the wait `paygate upgrade` takes by default), "P n refused: <why>", and
 * on success the new master's
 * "N 0 ready, upgraded from P". Only with a pid file.
 */
static void
upgrade_line(int owner, int n, const char *what)
{
    char line[800];

    if (m.o->pid_file[0] == '\0') {
        return;
    }
    snprintf(line, sizeof(line), "%d %d %s", owner, n, what);
    status_file(".upgrade", line);
}

/* Forgets the upgrade in progress (its new master is left as it is). */
static void
upgrade_forget(void)
{
    if (m.upgrade_ev != NULL) {
        event_free(m.upgrade_ev);
        m.upgrade_ev = NULL;
    }
    if (m.upgrade_fd >= 0) {
        close(m.upgrade_fd);
        m.upgrade_fd = -1;
    }
    if (m.upgrade_timer != NULL) {
        evtimer_del(m.upgrade_timer);
    }
    m.upgrade_pid = 0;
}

static void
upgrade_refused(const char *why)
{
    char what[700];

    upgrade_forget();
    gw_log(GW_LOG_ERROR, "upgrade refused: %s; pid %d keeps serving", why,
           (int) getpid());
    snprintf(what, sizeof(what), "refused: %s", why);
    upgrade_line((int) getpid(), m.upgrades, what);
}

/* s a refused upgrade's new master has from TERM to SIGKILL */
static double
upgrade_grace(void)
{
    return m.o->upgrade_timeout < UPGRADE_GRACE ? m.o->upgrade_timeout
                                                : UPGRADE_GRACE;
}

/* sig to the new master's process group (the fork made it one of its
 * own: its workers, whatever a script at the path started, hold the
 * listening sockets too); to the new master alone if there is none */
static int
upgrade_signal(pid_t pid, int sig)
{
    if (pid <= 0) {
        errno = ESRCH;  /* kill(0 or -1, ...): this master's group, or all */
        return -1;
    }
    if (kill(-pid, sig) == 0) {
        return 0;
    }
    return kill(pid, sig);
}

/*
 * Refuses the upgrade in progress (why) and sees its new master end: told
 * to stop when term (TERM: a paygate stops its workers), and killed with
 * its process group (SIGKILL) if it has not ended within upgrade_grace()
 * (it ignores TERM, it is stopped, stuck). Until it is reaped no other
 * upgrade starts: it holds the listening sockets.
 */
static void
upgrade_end(const char *why, int term)
{
    pid_t pid = m.upgrade_pid;
    double g = upgrade_grace();
    struct timeval tv;

    upgrade_refused(why);
    m.upgrade_ending = pid;
    m.upgrade_killed = 0;
    tv.tv_sec = (time_t) g;
    tv.tv_usec = (suseconds_t) ((g - (double) tv.tv_sec) * 1e6);
    if (m.upgrade_kill == NULL || evtimer_add(m.upgrade_kill, &tv) != 0) {
        upgrade_signal(pid, SIGKILL);   /* no memory for the grace */
        m.upgrade_killed = 1;
        gw_log(GW_LOG_WARN, "upgrade: the new master (pid %d) killed with "
               "its process group (SIGKILL; no memory for a grace)",
               (int) pid);
        return;
    }
    if (term) {
        upgrade_signal(pid, SIGTERM);
        gw_log(GW_LOG_INFO, "upgrade: the new master (pid %d) told to stop "
               "(TERM); it and its process group are killed in %g s if it "
               "has not ended", (int) pid, g);
    }
}

/* The grace of upgrade_end is over: its new master still runs. */
static void
on_upgrade_kill(evutil_socket_t fd, short what, void *arg)
{
    upgrade_signal(m.upgrade_ending, SIGKILL);
    m.upgrade_killed = 1;
    gw_log(GW_LOG_WARN, "upgrade: the new master (pid %d) has not ended "
           "within %g s of the upgrade's refusal; killed it and its process "
           "group (SIGKILL)", (int) m.upgrade_ending, upgrade_grace());
    if (stop_done()) {
        event_base_loopbreak(gw_loop_base());
    }
}

/* An upgrade's new master (pid) has been reaped: what is left of its
 * process group (a script's children, a worker that outlived it) would
 * hold the listening sockets, and is killed. 1 when there was some. */
static int
upgrade_leftovers(pid_t pid)
{
    return kill(-pid, SIGKILL) == 0;
}

/* The refused upgrade's new master has been reaped: another may start. */
static void
upgrade_gone(int status)
{
    static const struct gw_worker none;    /* not killed for a stall */
    pid_t pid = m.upgrade_ending;
    char how[128];
    int rest;

    describe_exit(&none, status, how, sizeof(how));
    if (m.upgrade_kill != NULL) {
        evtimer_del(m.upgrade_kill);
    }
    m.upgrade_ending = 0;
    m.upgrade_killed = 0;
    rest = upgrade_leftovers(pid);
    gw_log(GW_LOG_INFO, "upgrade: the refused new master (pid %d) %s%s; an "
           "upgrade may start again", (int) pid, how,
           rest ? " (what was left of its process group: killed)" : "");
}

/* Why the new master (pid) failed, from what it said (n bytes in buf, room
 * for a NUL after them) or else how it ended (status, when reaped; -1
 * when it has not ended yet). */
static void
upgrade_reason(pid_t pid, char *buf, ssize_t n, int status, char *why,
               size_t len)
{
    if (n > 1 && buf[0] == 'F') {
        buf[n] = '\0';
        for (char *p = buf + 1; *p != '\0'; p++) {
            if ((unsigned char) *p < 0x20) {
                *p = ' ';
            }
        }
        snprintf(why, len, "the new master (pid %d) did not start: %s",
                 (int) pid, buf + 1);
    } else if (status != -1) {
        static const struct gw_worker none;    /* not killed for a stall */
        char how[128];

        describe_exit(&none, status, how, sizeof(how));
        snprintf(why, len, "the new master (pid %d) %s before serving (its "
                 "log lines say why)", (int) pid, how);
    } else {
        snprintf(why, len, "the new master (pid %d) closed its socket "
                 "before serving (its log lines say why)", (int) pid);
    }
}

/* Its new master has ended before serving: what it said, or its exit. */
static void
upgrade_reaped(int status)
{
    char buf[400], why[600];
    ssize_t n = 0;
    pid_t pid = m.upgrade_pid;

    if (m.upgrade_fd >= 0) {
        n = recv(m.upgrade_fd, buf, sizeof(buf) - 1, MSG_DONTWAIT);
    }
    upgrade_reason(pid, buf, n, status, why, sizeof(why));
    upgrade_refused(why);
    if (upgrade_leftovers(pid)) {
        gw_log(GW_LOG_INFO, "upgrade: what was left of the new master's "
               "(pid %d) process group: killed", (int) pid);
    }
}

/* The new master's workers all serve ('R'): it is told to go on ('G' and
 * the reload outcomes counted so far, so PID_FILE.reload numbers on), the
 * pid file names it, and this master stops as on TERM (its workers drain;
 * the listening sockets stay open in the new master: nothing is refused). */
static void
upgrade_done(void)
{
    pid_t pid = m.upgrade_pid;
    char go_msg[32], what[128];
    int len = snprintf(go_msg, sizeof(go_msg), "G%d", m.reloads_done);

    if (send(m.upgrade_fd, go_msg, (size_t) len, MSG_NOSIGNAL) != len) {
        char why[200];

        snprintf(why, sizeof(why), "the new master (pid %d) went away as "
                 "it was taking over: %s", (int) pid, strerror(errno));
        upgrade_end(why, 1);
        return;
    }
    upgrade_forget();
    if (m.sd_on) {
        /* the service is the new master's from now (it says so too, with
         * READY=1, but it may not be systemd's main process yet when it
         * does): named before this master exits, so that systemd never
         * takes that exit for the service's end; nothing more from this
         * one (no STOPPING=1: the service goes on) */
        gw_sd_notifyf("MAINPID=%d", (int) pid);
        m.sd_on = 0;
    }
    if (m.o->pid_file[0] != '\0') {
        char line[32];

        snprintf(line, sizeof(line), "%d", (int) pid);
        if (status_file("", line) != GW_OK) {
            gw_log(GW_LOG_ERROR, "upgrade: cannot write the new master's "
                   "pid to %s: %s", m.o->pid_file, strerror(errno));
        }
        snprintf(what, sizeof(what), "ready, upgraded from %d",
                 (int) getpid());
        upgrade_line((int) pid, 0, what);
    }
    gw_log(GW_LOG_INFO, "upgrade: the new master (pid %d) serves with all "
           "its workers; this one (pid %d) stops gracefully", (int) pid,
           (int) getpid());
    on_term(SIGTERM, 0, NULL);
}

static void
on_upgrade_msg(evutil_socket_t fd, short what, void *arg)
{
    char buf[400], why[600];
    ssize_t n = recv(fd, buf, sizeof(buf) - 1, MSG_DONTWAIT);

    if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
        return;
    }
    if (n >= 1 && buf[0] == 'R') {
        upgrade_done();
        return;
    }
    if (n > 1 && buf[0] == 'F') {
        /* it exits by itself (killed if it has not within the grace) */
        upgrade_reason(m.upgrade_pid, buf, n, -1, why, sizeof(why));
        upgrade_end(why, 0);
        return;
    }
    /* EOF without a word (a crash, an exit before it could say): its
     * reaping gives the reason */
    event_free(m.upgrade_ev);
    m.upgrade_ev = NULL;
}

static void
on_upgrade_timeout(evutil_socket_t fd, short what, void *arg)
{
    char why[200];

    snprintf(why, sizeof(why), "the new master (pid %d) did not serve "
             "within %g s (upgrade_timeout; a worker loading the app, or "
             "waiting for something it needs: its log lines say what)",
             (int) m.upgrade_pid, m.o->upgrade_timeout);
    upgrade_end(why, 1);            /* it stops its workers gracefully */
}

/*
 * Whether this master's exit would end the server whatever the new master
 * does, so an upgrade cannot survive: it is PID 1 (a container's init:
 * the kernel kills every process of the container when it exits), or the
 * process a systemd service started or its child (SYSTEMD_EXEC_PID, systemd 248 on;
 * before it, INVOCATION_ID with systemd as the parent): its main process,
 * whose exit systemd takes for the service's end, stopping the rest of
 * its cgroup, the new master with it -- unless systemd listens on
 * $NOTIFY_SOCKET (Type=notify): then it follows the main process to the
 * new master, which names itself (MAINPID=) as it takes over, as this one
 * names it before it exits. Says why in why; 0 when not.
 */
static int
upgrade_cannot_survive(char *why, size_t len)
{
    const char *exec_pid = getenv("SYSTEMD_EXEC_PID");
    const char *fix = "load new code with `paygate reload`, and a new "
                      "binary with a restart";

    if (getpid() == 1) {
        snprintf(why, len, "this master is PID 1 (a container's init): "
                 "its exit would end every process of the container, the "
                 "new master with it; %s of the container", fix);
        return 1;
    }
    /* (or its child: ExecStart a shell that runs paygate without exec,
     * sh -c "cd /srv; paygate run ...": the shell is the main process, and
     * exits when this master does) */
    if (!gw_sd_listening()
        && ((exec_pid != NULL && (atoi(exec_pid) == (int) getpid()
                                  || atoi(exec_pid) == (int) getppid()))
            || (exec_pid == NULL && getenv("INVOCATION_ID") != NULL
                && getppid() == 1))) {
        int child = exec_pid != NULL
                    && atoi(exec_pid) == (int) getppid();
        snprintf(why, len, "this master is the main process of a systemd "
                 "service%s: systemd takes its exit for the service's end "
                 "and stops the new master with it (no " GW_SD_ENV ": a "
                 "Type=simple service cannot follow it to a new master); "
                 "run it as Type=notify with NotifyAccess=all to upgrade "
                 "under systemd, or %s (systemctl restart)",
                 child ? " (through the shell that started it, which ends "
                 "with it)" : "", fix);
        return 1;
    }
    return 0;
}

/*
 * USR2: starts self_exe with self_argv as a new master, in a child of
 * this one, handing it the listening sockets (their fds kept open across
 * exec, the numbers in PAYGATE_INHERIT with the socket it reports on and
 * this master's pid: no secret). It binds nothing, starts its workers, and
 * says 'R' once they all have loaded (they accept only then); or 'F' and
 * why, or it exits. Either way this master serves on until then.
 */
static void
on_usr2(evutil_socket_t sig, short what, void *arg)
{
    double secs = m.o->upgrade_timeout;
    struct timeval tv;
    char env[200], why[600];
    int p[2];
    pid_t pid;

    if (m.upgrade_pid != 0) {
        gw_log(GW_LOG_WARN, "upgrade: one is in progress already (the new "
               "master is pid %d); this USR2 is ignored",
               (int) m.upgrade_pid);
        return;
    }
    if (up.fd >= 0) {
        /* an upgrade's new master before it took over: PID_FILE.upgrade
         * is the old master's */
        gw_log(GW_LOG_WARN, "upgrade ignored: this master is taking over "
               "from pid %d and does not serve yet", (int) up.from);
        return;
    }
    m.upgrades++;
    if (m.stopping || !m.served) {
        upgrade_refused(m.stopping ? "the server is stopping"
                                   : "the server is not serving yet");
        return;
    }
    if (m.upgrade_ending != 0) {
        /* two new masters would hold the listening sockets: the one that
         * lingers must not outlive this master unseen */
        if (m.upgrade_killed) {
            snprintf(why, sizeof(why), "the new master of the upgrade "
                     "refused before (pid %d) has not ended yet (killed: "
                     "the kernel has not let it go); upgrade once it has",
                     (int) m.upgrade_ending);
        } else {
            snprintf(why, sizeof(why), "the new master of the upgrade "
                     "refused before (pid %d) has not ended yet (it is "
                     "killed %g s after that refusal at the latest); "
                     "upgrade once it has", (int) m.upgrade_ending,
                     upgrade_grace());
        }
        upgrade_refused(why);
        return;
    }
    if (upgrade_cannot_survive(why, sizeof(why))) {
        upgrade_refused(why);
        return;
    }
    if (m.next_gen != 0) {
        /* its generation would be dropped at the handover (this master
         * stops), PID_FILE.reload left saying "loading" */
        upgrade_refused("a reload is loading new code; upgrade once it has "
                        "ended (the new master reads the code at its "
                        "start)");
        return;
    }
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, p) != 0) {
        snprintf(why, sizeof(why), "socketpair: %s", strerror(errno));
        upgrade_refused(why);
        return;
    }
    snprintf(env, sizeof(env), INHERIT_ENV "=listen=%d,admin=%d,socket=%d,"
             "from=%d", m.listen_fd, m.admin_fd, p[1], (int) getpid());
    gw_log(GW_LOG_INFO, "upgrade: starting %s as a new master", self_exe);
    pid = fork();
    if (pid < 0) {
        snprintf(why, sizeof(why), "fork: %s", strerror(errno));
        close(p[0]);
        close(p[1]);
        upgrade_refused(why);
        return;
    }
    if (pid == 0) {
        sigset_t all;
        char msg[600];
        int e, len;

        /* no signal may run this master's handlers here (they would
         * write to its loop's signal socket): blocked while every one is
         * put back to its default (execv keeps what is ignored, SIGPIPE,
         * and the mask), then let through, so that what runs gets a
         * fresh process's signals: a binary that is no new paygate (an
         * older one, a script) must still die of the TERM the timeout
         * sends, or it would hold the listening sockets for good */
        sigfillset(&all);
        sigprocmask(SIG_SETMASK, &all, NULL);
        for (int n = 1; n < NSIG; n++) {
            signal(n, SIG_DFL);     /* fails for KILL, STOP: no matter */
        }
        sigemptyset(&all);
        sigprocmask(SIG_SETMASK, &all, NULL);
        /* a process group of its own: if it does not take over, this
         * master ends it whole (its workers, what a script started), not
         * only the process it forked; it joins ours once it has taken
         * over (on_handover) */
        setpgid(0, 0);
        close(p[0]);
        fcntl(m.listen_fd, F_SETFD, 0);
        if (m.admin_fd >= 0) {
            fcntl(m.admin_fd, F_SETFD, 0);
        }
        fcntl(p[1], F_SETFD, 0);
        putenv(env);
        execv(self_exe, self_argv);
        e = errno;
        len = snprintf(msg, sizeof(msg), "Fcannot run %s: %s", self_exe,
                       strerror(e));
        if (write(p[1], msg, (size_t) len) < 0) {
            /* the exit status says it */
        }
        _exit(127);
    }
    close(p[1]);
    setpgid(pid, pid);      /* as the child does: whichever runs first */
    m.upgrade_pid = pid;
    m.upgrade_fd = p[0];
    tv.tv_sec = (time_t) secs;
    tv.tv_usec = (suseconds_t) ((secs - (double) tv.tv_sec) * 1e6);
    m.upgrade_ev = event_new(gw_loop_base(), p[0], EV_READ | EV_PERSIST,
                             on_upgrade_msg, NULL);
    if (m.upgrade_ev == NULL || event_add(m.upgrade_ev, NULL) != 0
        || evtimer_add(m.upgrade_timer, &tv) != 0) {
        upgrade_end("cannot watch the new master (no memory)", 1);
        return;
    }
    /* when its outcome is due, for `paygate upgrade` to wait as long:
     * the refusal at upgrade_timeout, UPGRADE_GRACE later at worst (a
     * loop turn that came late) */
    snprintf(why, sizeof(why), "upgrading, outcome within %.0f s",
             ceil(secs + UPGRADE_GRACE));
    upgrade_line((int) getpid(), m.upgrades, why);
}

/* The new master: once its whole first generation has loaded the app,
 * tells it to accept and the old master that it serves ('R'). */
static void
handover_ready(void)
{
    if (count(m.gen, W_READY) < m.o->workers) {
        return;
    }
    for (int i = 0; i < MAX_WORKERS; i++) {
        if (m.w[i].pid != 0 && m.w[i].gen == m.gen) {
            go(&m.w[i]);
        }
    }
    m.handover_sent = 1;
    if (send(up.fd, "R", 1, MSG_NOSIGNAL) != 1) {
        /* gone: its EOF stops this master (on_handover) */
    }
    gw_log(GW_LOG_INFO, "upgrade: all %d worker%s serving beside the old "
           "master's (pid %d); asking it to stop", m.o->workers,
           m.o->workers == 1 ? "" : "s", (int) up.from);
}

/* The new master, having taken over: back in the old master's process
 * group with its workers (the upgrade's fork gave it one of its own, for
 * the old master to end it whole had it failed), so what signals that
 * group (a terminal's Ctrl-C, a supervisor) reaches it as before. */
static void
handover_rejoin(void)
{
    pid_t pg;

    if (getppid() != up.from) {
        return;     /* the old master is gone: its pid may be another's */
    }
    pg = getpgid(up.from);
    if (pg <= 0 || pg == getpgrp()) {
        return;     /* gone already, or an old master that made no group */
    }
    for (int i = 0; i < MAX_WORKERS; i++) {
        if (m.w[i].pid != 0) {
            setpgid(m.w[i].pid, pg);
        }
    }
    if (setpgid(0, pg) != 0) {
        gw_log(GW_LOG_WARN, "upgrade: cannot join the old master's process "
               "group %d: %s; this one's is %d", (int) pg, strerror(errno),
               (int) getpgrp());
    }
}

/* The new master: the old one's answer. 'G' (and its reload count): this
 * master owns the pid file now. EOF: it refused (a timeout, a stop) or is
 * gone, and the pid file is not ours: this master stops. */
static void
on_handover(evutil_socket_t fd, short what, void *arg)
{
    char buf[32];
    ssize_t n = recv(fd, buf, sizeof(buf) - 1, MSG_DONTWAIT);
    int done = 0;

    if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
        return;
    }
    if (n > 1 && buf[0] == 'G' && m.handover_sent) {
        buf[n] = '\0';
        m.reloads_done = atoi(buf + 1);
        done = 1;
    }
    if (done) {
        handover_rejoin();      /* the old master still runs: it drains */
    }
    event_free(m.handover_ev);
    m.handover_ev = NULL;
    close(up.fd);
    up.fd = -1;
    if (done) {
        gw_log(GW_LOG_INFO, "upgrade: took over from pid %d (it drains "
               "and exits)", (int) up.from);
        m.sd_on = 1;
        sd_ready_now();     /* MAINPID: systemd follows this master */
        return;
    }
    gw_log(GW_LOG_ERROR, "upgrade: the old master (pid %d) did not hand "
           "over (it gave up on this upgrade, or it exited); stopping",
           (int) up.from);
    m.exit_code = 1;
    on_term(SIGTERM, 0, NULL);
}

int
gw_upgrade_env(char *err, size_t errlen)
{
    const char *v = getenv(INHERIT_ENV);
    int listen_fd = -1, admin_fd = -1, fd = -1, from = 0, used = 0;
    int type = 0;
    struct sockaddr_storage ss;
    socklen_t tl = sizeof(type), sl = sizeof(ss);
    sigset_t none;

    if (v == NULL) {
        return 0;
    }
    /* a master of an earlier build ran us with every signal blocked */
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    if (sscanf(v, "listen=%d,admin=%d,socket=%d,from=%d%n", &listen_fd,
               &admin_fd, &fd, &from, &used) != 4 || v[used] != '\0'
        || listen_fd < 3 || fd < 3 || from <= 1
        || (admin_fd < 3 && admin_fd != -1)) {
        snprintf(err, errlen, INHERIT_ENV " is set but malformed (it is "
                 "for the new master of a `paygate upgrade` only)");
        unsetenv(INHERIT_ENV);
        return -1;
    }
    unsetenv(INHERIT_ENV);      /* not for the workers, nor what they run */
    /* environment input: the old master is our parent (it forked us), and
     * the socket to it is a stream socket of its own, apart from the
     * listeners (which gw_listen_inherited checks) */
    if (getppid() != (pid_t) from) {
        snprintf(err, errlen, INHERIT_ENV " names pid %d as the master "
                 "this one replaces, but the parent is pid %d (it is for "
                 "the new master of a `paygate upgrade` only)", from,
                 (int) getppid());
        return -1;
    }
    if (fd == listen_fd || fd == admin_fd || listen_fd == admin_fd
        || getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &tl) != 0
        || type != SOCK_STREAM
        || getsockname(fd, (struct sockaddr *) &ss, &sl) != 0
        || ss.ss_family != AF_UNIX) {
        snprintf(err, errlen, INHERIT_ENV "'s socket=%d is not a socket to "
                 "the old master of its own", fd);
        return -1;
    }
    fcntl(fd, F_SETFD, FD_CLOEXEC);
    up.listen_fd = listen_fd;
    up.admin_fd = admin_fd;
    up.fd = fd;
    up.from = (pid_t) from;
    return 1;
}

void
gw_upgrade_failed(const char *why)
{
    char msg[400];
    int len;

    if (up.fd < 0) {
        return;
    }
    if (strncmp(why, "paygate: ", 9) == 0) {
        why += 9;
    }
    len = snprintf(msg, sizeof(msg), "F%s", why[0] != '\0' ? why
                   : "it stopped before serving (its log lines say why)");
    if (len >= (int) sizeof(msg)) {
        len = (int) sizeof(msg) - 1;
    }
    if (send(up.fd, msg, (size_t) len, MSG_NOSIGNAL) < 0) {
        /* gone: nobody left to tell */
    }
    close(up.fd);
    up.fd = -1;
}

/* ---- entry ---------------------------------------------------------- */

int
gw_master_main(struct gw_opts *o, const struct gw_opts *file,
               const char *exe, char **argv)
{
    char err[512];
    struct event *hup, *term, *intr, *chld, *usr2;
    int code = 0, transient = 0;

    memset(&m, 0, sizeof(m));
    m.o = o;
    m.admin_fd = -1;
    m.upgrade_fd = -1;
    m.sd_on = up.fd < 0;    /* an upgrade's new master: once it took over */
    self_exe = exe;
    self_argv = argv;
    gw_log_min = o->log_level;
    if (o->near_miss[0] != '\0') {
        gw_log(GW_LOG_WARN, "config %s: %s: not runtime keys, so the "
                            "runtime does not read them (the app sees them "
                            "in paygate.config)", o->config_file,
               o->near_miss);
    }
    if (file != NULL) {
        file_start = *file;     /* the baseline of a reload's check */
        have_file_start = 1;
    }
    if (o->workers < 1 || o->workers > MAX_WORKERS / 2) {
        fprintf(stderr, "paygate: --workers must be 1..%d\n",
                MAX_WORKERS / 2);
        return 2;
    }
    if (o->tls_cert[0] != '\0' || o->tls_key[0] != '\0') {
        if (o->tls_cert[0] == '\0' || o->tls_key[0] == '\0') {
            fprintf(stderr, "paygate: tls.cert and tls.key (--tls-cert, "
                            "--tls-key) go together: give both for HTTPS, "
                            "or neither\n");
            return 2;
        }
        /* ticket keys first: every context (this one, a reload's) and
         * every worker forked later share them */
        if (gw_tls_tickets_init() != GW_OK) {
            fprintf(stderr, "paygate: tls: cannot set up ticket keys\n");
            return 1;
        }
        m.ssl_ctx = tls_ctx(o, err, sizeof(err));
        if (m.ssl_ctx == NULL) {
            fprintf(stderr, "paygate: %s\n", err);
            return 2;
        }
        if (gw_tls_cert_dates(o->tls_cert, err, sizeof(err))) {
            gw_log(GW_LOG_WARN, "%s", err);
        }
        if (gw_tls_cert_dates(o->tls_ecdsa_cert, err, sizeof(err))) {
            gw_log(GW_LOG_WARN, "%s", err);
        }
    } else if (o->tls_client_ca[0] != '\0' || o->tls_ecdsa_cert[0] != '\0') {
        fprintf(stderr, "paygate: tls.client_ca (--tls-client-ca) and "
                        "tls.ecdsa_cert need tls.cert and tls.key "
                        "(--tls-cert, --tls-key)\n");
        return 2;
    }
    if (up.fd >= 0) {
        /* an upgrade's new master: the old one's sockets, bound to the
         * addresses this configuration gives, or nothing */
        if (gw_listen_inherited(up.listen_fd, o->listen, err,
                                sizeof(err)) != GW_OK) {
            fprintf(stderr, "paygate: %s\n", err);
            return 2;
        }
        m.listen_fd = up.listen_fd;
    } else {
        m.listen_fd = gw_listen(o->listen, 4096, err, sizeof(err),
                                &transient);
    }
    if (m.listen_fd < 0) {
        /* exit 1 for an address that may bind later as it is (a service
         * manager's restart can succeed), 2 for one the config must
         * change (systemd's unit does not restart on 2) */
        fprintf(stderr, "paygate: %s\n", err);
        return transient ? 1 : 2;
    }
    if (o->admin[0] == '\0') {
        /* an empty value is no address, nor a clear "off" (it turned
         * the admin listener off without a word) */
        fprintf(stderr, "paygate: admin is empty: give HOST:PORT, or "
                        "\"off\" for no admin listener\n");
        return 2;
    }
    if (up.fd >= 0 && (up.admin_fd >= 0) != (strcmp(o->admin, "off") != 0)) {
        fprintf(stderr, "paygate: admin is %s, but the running server has "
                "%s: an upgrade keeps the listening addresses (change "
                "them with a stop and a start)\n", o->admin,
                up.admin_fd >= 0 ? "an admin listener" : "none");
        return 2;
    }
    if (up.fd >= 0 && up.admin_fd >= 0) {
        if (gw_listen_inherited(up.admin_fd, o->admin, err,
                                sizeof(err)) != GW_OK) {
            fprintf(stderr, "paygate: admin: %s\n", err);
            return 2;
        }
        m.admin_fd = up.admin_fd;
    } else if (strcmp(o->admin, "off") != 0) {
        m.admin_fd = gw_listen(o->admin, 64, err, sizeof(err), &transient);
        if (m.admin_fd < 0) {
            fprintf(stderr, "paygate: admin: %s\n", err);
            return transient ? 1 : 2;
        }
    }
    if (gw_metrics_init(MAX_WORKERS) != GW_OK
        || gw_watchdog_init(MAX_WORKERS) != GW_OK
        || gw_loop_init() != GW_OK) {
        fprintf(stderr, "paygate: cannot set up the master\n");
        return 1;
    }
    /* shared dictionaries: mapped before any fork, so every generation of
     * workers inherits them (they outlive workers and reloads) */
    for (int i = 0; i < o->nshared; i++) {
        if (gw_shdict_create(o->shared[i].name, o->shared[i].size, err,
                             sizeof(err)) == NULL) {
            fprintf(stderr, "paygate: %s\n", err);
            return 2;
        }
    }
    if (gw_shdict_find(GW_SHD_DEFAULT) == NULL
        && gw_shdict_create(GW_SHD_DEFAULT, GW_SHD_DEFAULT_SIZE, err,
                            sizeof(err)) == NULL) {
        fprintf(stderr, "paygate: %s\n", err);
        return 1;
    }
    gw_shdict_seal();
    signal(SIGPIPE, SIG_IGN);
    signal(SIGXFSZ, SIG_IGN);       /* a log past ulimit -f: EFBIG, not death */
    hup = evsignal_new(gw_loop_base(), SIGHUP, on_hup, NULL);
    term = evsignal_new(gw_loop_base(), SIGTERM, on_term, NULL);
    intr = evsignal_new(gw_loop_base(), SIGINT, on_term, NULL);
    chld = evsignal_new(gw_loop_base(), SIGCHLD, on_chld, NULL);
    usr2 = evsignal_new(gw_loop_base(), SIGUSR2, on_usr2, NULL);
    evsignal_add(usr2, NULL);
    evsignal_add(hup, NULL);
    evsignal_add(term, NULL);
    evsignal_add(intr, NULL);
    evsignal_add(chld, NULL);
    /* only now: `paygate reload` as soon as the file exists must find
     * HUP handled, not at its default action (which ends the master) */
    /* PID_FILE.reload first ("0 started"): `paygate reload` tells a pid
     * file this master wrote (it waits for the outcome here) from one
     * written by hand (no outcome will come) by this file */
    /* PID_FILE.upgrade likewise ("P 0 ready"): `paygate upgrade` signals
     * only a master that handles USR2. An upgrade's new master writes
     * none of them: they are the old master's until it hands over (and
     * then it writes the pid file and PID_FILE.upgrade for this one). */
    if (o->pid_file[0] != '\0' && up.fd < 0) {
        char line[32];

        snprintf(line, sizeof(line), "%d 0 ready", (int) getpid());
        if (reload_line(0, "started") != GW_OK
            || status_file(".upgrade", line) != GW_OK) {
            fprintf(stderr, "paygate: cannot write %s.reload or .upgrade: "
                    "%s\n", o->pid_file, strerror(errno));
            return 2;
        }
        snprintf(line, sizeof(line), "%d", (int) getpid());
        if (status_file("", line) != GW_OK) {
            fprintf(stderr, "paygate: cannot write pid file %s: %s\n",
                    o->pid_file, strerror(errno));
            return 2;
        }
    }
    m.restart_ev = evtimer_new(gw_loop_base(), on_restart, NULL);
    m.reload_timer = evtimer_new(gw_loop_base(), on_reload_timeout, NULL);
    m.stop_timer = evtimer_new(gw_loop_base(), on_stop_deadline, NULL);
    m.upgrade_timer = evtimer_new(gw_loop_base(), on_upgrade_timeout, NULL);
    m.upgrade_kill = evtimer_new(gw_loop_base(), on_upgrade_kill, NULL);
    if (up.fd >= 0) {
        /* the old master's go, or its EOF (it gave up, or is gone) */
        m.handover_ev = event_new(gw_loop_base(), up.fd, EV_READ,
                                  on_handover, NULL);
        if (m.handover_ev == NULL || event_add(m.handover_ev, NULL) != 0) {
            fprintf(stderr, "paygate: cannot set up the master\n");
            return 1;
        }
    }
    if (m.ssl_ctx != NULL) {
        struct timeval tv;

        tv.tv_sec = (time_t) o->tls_ticket_rotation;
        tv.tv_usec = (suseconds_t) ((o->tls_ticket_rotation
                                     - (double) tv.tv_sec) * 1e6);
        m.ticket_ev = event_new(gw_loop_base(), -1, EV_PERSIST,
                                on_ticket_rotate, NULL);
        if (m.ticket_ev != NULL) {
            event_add(m.ticket_ev, &tv);
        }
    }
    if (o->loop_stall > 0) {
        struct timeval tv = { 0, (suseconds_t) (WATCHDOG_EVERY * 1e6) };

        /* workers note each request they start (what the stall line
         * names) only when someone reads it */
        o->server.on_start = gw_watchdog_request;
        m.watchdog_look = m.watchdog_from = gw_loop_mono_fresh();
        m.watchdog_ev = event_new(gw_loop_base(), -1, EV_PERSIST,
                                  on_watchdog, NULL);
        if (m.watchdog_ev == NULL || event_add(m.watchdog_ev, &tv) != 0) {
            fprintf(stderr, "paygate: cannot set up the master\n");
            return 1;
        }
    }
    if (m.admin_fd >= 0) {
        m.admin_ev = event_new(gw_loop_base(), m.admin_fd,
                               EV_READ | EV_PERSIST, on_admin_accept, NULL);
        m.admin_pause = evtimer_new(gw_loop_base(), admin_resume, NULL);
        event_add(m.admin_ev, NULL);
    }
    for (int i = 0; i < MAX_WORKERS; i++) {
        m.w[i].ready_fd = -1;
    }
    m.gen = 1;
    m.last_gen = 1;
    for (int i = 0; i < o->workers; i++) {
        if (spawn_worker(1) != GW_OK) {
            struct timeval tv = { 1, 0 };

            evtimer_add(m.restart_ev, &tv);     /* on_restart fills up */
            break;
        }
    }
    event_base_dispatch(gw_loop_base());
    if (m.failed_start) {
        code = m.start_code == 2 ? 2 : 1;
    } else if (m.exit_code != 0) {
        code = m.exit_code;
    }
    /* an upgrade's new master that stopped before it took over says why */
    if (m.start_why[0] != '\0') {
        gw_upgrade_failed(m.start_why);
    }
    /* the pid file and its status files, while they are this master's:
     * not once an upgrade's new master took them over */
    if (o->pid_file[0] != '\0' && pid_file_pid(o->pid_file) == getpid()) {
        char status[1100];

        unlink(o->pid_file);
        snprintf(status, sizeof(status), "%s.reload", o->pid_file);
        unlink(status);
        snprintf(status, sizeof(status), "%s.upgrade", o->pid_file);
        unlink(status);
    }
    gw_log(m.failed_start && m.start_code == 2 ? GW_LOG_DEBUG : GW_LOG_INFO,
           "master: exited");
    return code;
}
