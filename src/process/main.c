/*
 * main.c -- the `paygate` command: run, exec, reload, upgrade, help.
 */
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "config.h"
#include "log.h"
#include "lstate.h"
#include "master.h"
#include "worker.h"
#include "paygate_build.h"  /* PAYGATE_BUILD: generated at every build */

#define PAYGATE_VERSION "0.1.0"

static const char usage_main[] =
"usage: paygate COMMAND [ARGS]\n"
"\n"
"A payment gateway runtime for WeChat Pay API v3, scripted in Lua.\n"
"\n"
"commands:\n"
"  run APP_DIR     serve an app (its entry is APP_DIR/app.lua)\n"
"  exec SCRIPT     run a Lua script inside the runtime (tests, tools)\n"
"  reload          load new code into a running server (like kill -HUP)\n"
"  upgrade         replace a running server's binary, no connection\n"
"                  refused (like kill -USR2)\n"
"  version         print the version\n"
"  apikey          create, list and revoke merchant-API keys\n"
"  audit           verify the audit trail's hash chains in a database\n"
"  migrate         show a database's migrations; apply pending ones\n"
"  backup          copy a live SQLite store to a file, consistently\n"
"  restore         put a backup back in place of a SQLite store\n"
"  etcd            publish credentials to etcd (sealed), show a set\n"
"\n"
"diagnostics (WeChat Pay; each names the cause of a failure):\n"
"  sign            build a request's signing string and Authorization\n"
"  verify          verify a captured response or notification\n"
"  decrypt         decrypt a notification's resource\n"
"  certs           list certificates and keys; download platform ones\n"
"  doctor          check a gateway configuration end to end\n"
"\n"
"`paygate COMMAND --help` (or `paygate help COMMAND`) describes each command.\n"
"exit codes: 0 ok, 1 runtime failure, 2 usage or configuration error\n";

static const char usage_run[] =
"usage: paygate run APP_DIR [options]\n"
"\n"
"Serve APP_DIR/app.lua with a master process and N worker processes.\n"
"A relative APP_DIR is taken from the current directory.\n"
"\n"
"options:\n"
"  --listen HOST:PORT    public listener (default 127.0.0.1:8080)\n"
"  --workers N           worker processes (default: one per core)\n"
"  --config FILE         a Lua file returning a table (see README)\n"
"  --admin HOST:PORT     /metrics and /healthz (default 127.0.0.1:9090;\n"
"                        'off' disables it)\n"
"  --pid-file FILE       write the master's pid here\n"
"  --tls-cert FILE       serve HTTPS with this PEM certificate chain\n"
"  --tls-key FILE        ... and this PEM private key\n"
"  --tls-client-ca FILE  require client certificates issued by this CA\n"
"                        (more in the config's tls table: an ECDSA\n"
"                        certificate beside the RSA one, protocols,\n"
"                        ciphers, session cache and tickets; limits:\n"
"                        timeouts, connections: docs/http.md; and\n"
"                        loop_stall, default 30 s: a worker whose event\n"
"                        loop does not turn that long is killed and\n"
"                        replaced, README \"Stalled workers\")\n"
"  --log-level LEVEL     debug, info (default), warn, error\n"
"  --no-access-log       no line per request\n"
"  -h, --help            this text\n"
"\n"
"signals: HUP reloads the code (and TLS files), USR2 upgrades the binary\n"
"(paygate upgrade --help), TERM/INT stop gracefully.\n"
"\n"
"Under systemd (Type=notify: NOTIFY_SOCKET set) the master says READY=1\n"
"once every worker serves, RELOADING=1 and READY=1 around a reload,\n"
"STOPPING=1 at a stop, and MAINPID for an upgrade's new master (a unit\n"
"file: examples/systemd/paygate.service).\n";

static const char usage_exec[] =
"usage: paygate exec SCRIPT.lua [ARGS...]\n"
"\n"
"Run SCRIPT inside the runtime: the event loop runs and every paygate.*\n"
"module is available, so the script may call yielding functions\n"
"(paygate.sleep, paygate.http.request, database calls). ARGS are in `arg`\n"
"and passed as the chunk's varargs. The exit status is the script's\n"
"os.exit() code, or the number it returns, or 0; 1 when it raises.\n"
"exec itself takes no options but --help: every argument after SCRIPT is\n"
"the script's.\n"
"\n"
"example: paygate exec \"$(command -v busted)\" spec/\n";

static const char usage_reload[] =
"usage: paygate reload --pid-file FILE [--no-wait] [--timeout SECONDS]\n"
"\n"
"Ask the server whose master pid is in FILE to load its code again (the\n"
"same as kill -HUP). New workers load the code; only when all of them\n"
"loaded it do the old ones finish their requests and exit. Code that\n"
"fails to load is refused and the old code keeps serving; so is a reload\n"
"while a `paygate upgrade` is in progress (reload once it has ended).\n"
"\n"
"It waits for the outcome (default up to 90 s) and prints it: exit 0 when\n"
"the new code serves, 1 when it was refused (with the reason) or no\n"
"outcome came in time. Run while another reload is loading, it waits for\n"
"the one after (the one loading read the code before it ran; the default\n"
"wait is then 150 s). --no-wait only sends the signal. A pid file the\n"
"server did not write (it writes FILE.reload beside its own) holds no\n"
"outcome: the signal is sent, and the server's log says how it ended.\n"
"A master that has exited, even one its parent has not reaped yet (a\n"
"zombie), ends the wait at once with exit 1.\n";

static const char usage_upgrade[] =
"usage: paygate upgrade --pid-file FILE [--timeout SECONDS]\n"
"\n"
"Replace the running server whose master pid is in FILE with the binary\n"
"now at the path it was started from (the same as kill -USR2): a new\n"
"master of that binary, with the same arguments (the config file and the\n"
"app read again), takes over the listening sockets (it binds nothing:\n"
"no connection is refused meanwhile), starts its workers, and once all\n"
"of them have loaded the app, the old master stops as on TERM (its\n"
"workers finish their requests). The pid file then names the new master.\n"
"\n"
"It waits for the outcome and prints it: exit 0 when the new master\n"
"serves, 1 when the upgrade failed (the new binary does not run, its\n"
"configuration or the app does not load, it did not serve within the\n"
"config's upgrade_timeout, 60 s by default, ...: the old master keeps\n"
"serving) with the reason, or no outcome came in time (the upgrade goes\n"
"on after this command gave up, its log says how it ended). By default\n"
"it waits as long as the master says the outcome may take, once it has\n"
"started the upgrade: its upgrade_timeout and 5 s (\"waiting up to 65 s\";\n"
"90 s for a master that does not say); --timeout sets the wait instead.\n"
"A new master that did not take over is told to stop (TERM) and, if it\n"
"has not ended within 5 s (upgrade_timeout if shorter), killed with its\n"
"process group (its workers too); no other upgrade starts until then.\n"
"Refused while a reload is loading (and a reload is refused during an\n"
"upgrade), and where the old master's exit would end the server anyway:\n"
"it is PID 1 (a container's init), or a systemd service's main process\n"
"with no NOTIFY_SOCKET (Type=simple: systemd cannot follow it to the new\n"
"master); there, paygate reload loads new code and a restart a new\n"
"binary. Under Type=notify with NotifyAccess=all it upgrades: the new\n"
"master tells systemd MAINPID=<its pid> as it takes over.\n"
"Shared dictionaries, metrics counters and TLS session tickets start\n"
"afresh in the new master (README, Running).\n";

/* Reads FILE.reload's outcome counter and line; 0 when there is none. */
static int
reload_outcome(const char *pid_file, char *line, size_t len)
{
    char path[4200];
    FILE *f;
    int n = 0;

    snprintf(path, sizeof(path), "%s.reload", pid_file);
    f = fopen(path, "r");
    if (f == NULL) {
        return 0;
    }
    if (fgets(line, (int) len, f) == NULL || sscanf(line, "%d", &n) != 1) {
        n = 0;
    }
    fclose(f);
    return n;
}

/* Whether pid has exited but its parent has not reaped it yet (state Z,
 * or X on its way out, in /proc/PID/stat). Such a pid still answers
 * kill(pid, 0) and takes a signal without error, so that check alone took
 * a dead master for a live one and waited out the whole timeout for an
 * outcome that could never come. 0 when /proc cannot say. */
static int
is_zombie(int pid)
{
    char path[64], buf[256], *p;
    FILE *f;
    size_t n;

    snprintf(path, sizeof(path), "/proc/%d/stat", pid);
    f = fopen(path, "r");
    if (f == NULL) {
        return 0;
    }
    n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    /* "PID (COMM) STATE ...": COMM (at most 15 bytes) may hold ')' and
     * spaces itself, so the state is after the last ')' */
    p = strrchr(buf, ')');
    return p != NULL && p[1] == ' ' && (p[2] == 'Z' || p[2] == 'X');
}

static int
is_help(const char *a)
{
    return strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0;
}

static int
copy_opt(char *dst, size_t cap, const char *v, const char *name)
{
    if (strlen(v) >= cap) {
        fprintf(stderr, "paygate: %s is too long\n", name);
        return -1;
    }
    memcpy(dst, v, strlen(v) + 1);
    return 0;
}

/* What was wrong with a `paygate run` option getopt refused ('?'), in one
 * line naming it, never the value given with "=" (it may be a secret):
 * a long option that takes no value, an ambiguous prefix, an unknown long
 * option, or an unknown short one (optopt; last may be another argument
 * then: getopt does not step past a group it is inside). */
static void
run_option_error(const char *last, const struct option *longopts)
{
    size_t n = strcspn(last, "=");
    int matches = 0;

    if (strncmp(last, "--", 2) == 0) {
        const char *name = last + 2;
        size_t len = n - 2;

        for (const struct option *o = longopts; o->name != NULL; o++) {
            if (strncmp(o->name, name, len) != 0) {
                continue;
            }
            if (strlen(o->name) == len) {
                if (optopt != 0 && o->val == optopt && last[n] == '=') {
                    fprintf(stderr, "paygate run: --%s takes no value (see "
                                    "paygate run --help)\n", o->name);
                    return;
                }
                matches = 1;            /* exact: not ambiguous */
                break;
            }
            matches++;
        }
        if (optopt == 0) {
            fprintf(stderr, "paygate run: %s option %.*s (see paygate run "
                            "--help)\n", matches > 1 ? "ambiguous" : "unknown",
                    (int) (n > 64 ? 64 : n), last);
            return;
        }
    }
    if (optopt > 32 && optopt < 127) {
        fprintf(stderr, "paygate run: unknown option -%c (see paygate run "
                        "--help)\n", optopt);
    } else {
        fprintf(stderr, "paygate run: unknown option (see paygate run "
                        "--help)\n");
    }
}

/* DIR's app.lua into buf, one '/' between them whatever DIR ends with
 * ("myapp/" gave "myapp//app.lua"; "/" gives "/app.lua"). */
static void
app_lua_path(char *buf, size_t size, const char *dir)
{
    size_t n = strlen(dir);

    while (n > 1 && dir[n - 1] == '/') {
        n--;
    }
    snprintf(buf, size, "%.*s%sapp.lua", (int) n, dir,
             n > 0 && dir[n - 1] == '/' ? "" : "/");
}

/* `paygate run DIR` with no DIR/app.lua: says so, and for a relative DIR
 * which folder it was taken from (the current directory, named), as the
 * test kit's start_app does: "myapp/app.lua not found" alone left a user
 * who ran it from another folder guessing. found: DIR exists. */
static void
app_not_found(const char *dir, int found)
{
    char cwd[4096], app_lua[4096];
    const char *hint = found ? "" : "run from the folder that holds it, "
                                    "or give an absolute path; ";

    app_lua_path(app_lua, sizeof(app_lua), dir);
    if (dir[0] == '/') {
        fprintf(stderr, "paygate run: %s not found (an app is a "
                        "folder with an app.lua)\n", app_lua);
    } else if (getcwd(cwd, sizeof(cwd)) == NULL) {
        fprintf(stderr, "paygate run: %s not found: %s is taken "
                        "from the current directory (%san app is a folder "
                        "with an app.lua)\n", app_lua, dir, hint);
    } else {
        fprintf(stderr, "paygate run: %s not found: %s is taken "
                        "from the current directory, %s (%san app is a "
                        "folder with an app.lua)\n", app_lua, dir, cwd, hint);
    }
}

static char **main_argv;        /* main's argv: what an upgrade runs again */
static char   self_exe[4096];   /* the binary it runs (self_path) */

static int on_path(const char *name, char *buf, size_t size);

/* The binary `paygate upgrade` starts: argv0 as it was found at the start
 * (a path, made absolute, or a name looked up in $PATH), so that the file
 * at that path when the upgrade comes is run -- a new build put there, or
 * a symlink switched to one. /proc/self/exe's target when argv0 does not
 * name this binary (started under another name). Returns buf. */
static const char *
self_path(const char *argv0, char *buf, size_t size)
{
    struct stat a, b;
    char cwd[4096];
    ssize_t n;
    int found = 0;

    if (strchr(argv0, '/') != NULL) {
        if (argv0[0] == '/') {
            found = snprintf(buf, size, "%s", argv0) < (int) size;
        } else if (getcwd(cwd, sizeof(cwd)) != NULL) {
            found = snprintf(buf, size, "%s/%s", cwd, argv0) < (int) size;
        }
    } else {
        found = on_path(argv0, buf, size);
    }
    if (found && stat(buf, &a) == 0 && stat("/proc/self/exe", &b) == 0
        && a.st_dev == b.st_dev && a.st_ino == b.st_ino) {
        return buf;
    }
    n = readlink("/proc/self/exe", buf, size - 1);
    buf[n > 0 ? n : 0] = '\0';
    return buf;
}

static int
cmd_run(int argc, char **argv)
{
    static const struct option longopts[] = {
        { "listen", required_argument, NULL, 'l' },
        { "workers", required_argument, NULL, 'w' },
        { "config", required_argument, NULL, 'c' },
        { "admin", required_argument, NULL, 'a' },
        { "pid-file", required_argument, NULL, 'p' },
        { "tls-cert", required_argument, NULL, 'C' },
        { "tls-key", required_argument, NULL, 'K' },
        { "tls-client-ca", required_argument, NULL, 'A' },
        { "log-level", required_argument, NULL, 'L' },
        { "no-access-log", no_argument, NULL, 'N' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 }
    };
    struct gw_opts o, file_opts;
    char err[512];
    const char *config = NULL;
    struct stat st;
    char app_lua[4096];
    int c;

    gw_opts_defaults(&o);
    /* the config file first, so that flags override it: found by getopt
     * as the pass below finds it (an abbreviation, --conf FILE, was run
     * without its file when only "--config" was looked for); what is
     * wrong with an option is said by that pass */
    for (int i = 1; i < argc; i++) {
        if (is_help(argv[i])) {
            fputs(usage_run, stdout);
            return 0;
        }
    }
    {
        /* on a copy: getopt moves the arguments it passes over, which
         * would change what the pass below reads (an APP_DIR moved
         * behind a last option with no value became its value) */
        char *scan[argc + 1];

        memcpy(scan, argv, sizeof(char *) * (size_t) (argc + 1));
        optind = 0;         /* a fresh scan (GNU getopt's own state too) */
        opterr = 0;
        while ((c = getopt_long(argc, scan, ":h", longopts, NULL)) != -1) {
            if (c == 'c') {
                config = optarg;
            }
        }
    }
    if (config != NULL) {
        if (gw_opts_load_file(&o, config, err, sizeof(err)) != GW_OK) {
            fprintf(stderr, "paygate: %s\n", err);
            return 2;
        }
        o.config_file = config;
        file_opts = o;      /* the file over the defaults, before flags */
    }
    optind = 0;
    opterr = 0;             /* our own one line, below: not getopt's */
    while ((c = getopt_long(argc, argv, ":h", longopts, NULL)) != -1) {
        switch (c) {
        case 'l':
            if (copy_opt(o.listen, sizeof(o.listen), optarg, "--listen")) {
                return 2;
            }
            break;
        case 'w': {
            char *end;
            long n = strtol(optarg, &end, 10);

            if (*end != '\0' || n < 1 || n > GW_MAX_WORKERS) {
                fprintf(stderr, "paygate run: --workers must be a whole "
                        "number, 1..%d (see paygate run --help)\n",
                        GW_MAX_WORKERS);
                return 2;
            }
            o.workers = (int) n;
            break;
        }
        case 'c':
            break;
        case 'a':
            if (copy_opt(o.admin, sizeof(o.admin), optarg, "--admin")) {
                return 2;
            }
            break;
        case 'p':
            if (copy_opt(o.pid_file, sizeof(o.pid_file), optarg,
                         "--pid-file")) {
                return 2;
            }
            break;
        case 'C':
            if (copy_opt(o.tls_cert, sizeof(o.tls_cert), optarg,
                         "--tls-cert")) {
                return 2;
            }
            break;
        case 'K':
            if (copy_opt(o.tls_key, sizeof(o.tls_key), optarg, "--tls-key")) {
                return 2;
            }
            break;
        case 'A':
            if (copy_opt(o.tls_client_ca, sizeof(o.tls_client_ca), optarg,
                         "--tls-client-ca")) {
                return 2;
            }
            break;
        case 'L':
            if (gw_log_parse_level(optarg, &o.log_level) != GW_OK) {
                fprintf(stderr, "paygate: --log-level must be debug, info, "
                                "warn or error\n");
                return 2;
            }
            break;
        case 'N':
            o.server.access_log = 0;
            break;
        case 'h':
            fputs(usage_run, stdout);
            return 0;
        case ':':
            fprintf(stderr, "paygate run: %s needs a value (see paygate run "
                            "--help)\n", argv[optind - 1]);
            return 2;
        default:
            run_option_error(argv[optind - 1], longopts);
            return 2;
        }
    }
    if (optind != argc - 1) {
        fprintf(stderr, "paygate run: give exactly one APP_DIR "
                        "(see paygate run --help)\n");
        return 2;
    }
    /* Absolute, so paygate.app_dir names the app's folder wherever the
     * app looks from (realpath's buffer lives until exit). */
    o.app_dir = realpath(argv[optind], NULL);
    app_lua_path(app_lua, sizeof(app_lua),
                 o.app_dir != NULL ? o.app_dir : argv[optind]);
    if (o.app_dir == NULL || stat(app_lua, &st) != 0
        || !S_ISREG(st.st_mode)) {
        app_not_found(argv[optind], o.app_dir != NULL);
        return 2;
    }
    return gw_master_main(&o, config != NULL ? &file_opts : NULL,
                          self_path(main_argv[0], self_exe,
                                    sizeof(self_exe)), main_argv);
}

/* Finds NAME (no '/') as a regular executable file in a $PATH folder, as a
 * shell would: 1 with its path in buf, else 0. */
static int
on_path(const char *name, char *buf, size_t size)
{
    const char *p = getenv("PATH");
    struct stat st;

    if (p == NULL || *name == '\0' || strchr(name, '/') != NULL) {
        return 0;
    }
    while (*p != '\0') {
        size_t len = strcspn(p, ":");
        /* an empty entry is the current folder */
        int n = len > 0 ? snprintf(buf, size, "%.*s/%s", (int)len, p, name)
                        : snprintf(buf, size, "./%s", name);

        if (n > 0 && (size_t)n < size && stat(buf, &st) == 0
            && S_ISREG(st.st_mode) && access(buf, X_OK) == 0) {
            return 1;
        }
        p += len;
        if (*p == ':') {
            p++;
        }
    }
    return 0;
}

static int
cmd_exec(int argc, char **argv)
{
    if (argc < 2) {
        fputs("paygate exec: give the script to run, SCRIPT.lua [ARGS...] "
              "(see paygate exec --help)\n", stderr);
        return 2;
    }
    if (is_help(argv[1])) {
        fputs(usage_exec, stdout);
        return 0;
    }
    if (argv[1][0] == '\0') {
        /* `paygate exec "$(command -v busted)"` without busted installed */
        fputs("paygate exec: the script path is empty (a `$(command -v "
              "NAME)` that found nothing? busted is the Debian package "
              "lua-busted: scripts/deps installs it)\n", stderr);
        return 2;
    }
    if (access(argv[1], R_OK) != 0) {
        int e = errno;
        char found[4096];

        if (e == ENOENT && argv[1][0] == '-') {
            /* `paygate exec --verbose x.lua`: an option, not a script;
             * named up to its "=" (the value may be a secret), a short
             * one by its letter alone (-pSECRET: -p), as run names them */
            size_t n = strcspn(argv[1], "=");

            if (argv[1][1] != '-' && n > 2) {
                n = 2;
            }

            fprintf(stderr, "paygate exec: unknown option %.*s: exec takes "
                            "no options but --help; the script comes "
                            "first, SCRIPT.lua [ARGS...] (see paygate exec "
                            "--help)\n", (int) (n > 64 ? 64 : n), argv[1]);
            return 2;
        }
        fprintf(stderr, "paygate exec: cannot read %s: %s", argv[1],
                strerror(e));
        /* `paygate exec busted`: a command's name, where a file is read */
        if (e == ENOENT && on_path(argv[1], found, sizeof(found))) {
            fprintf(stderr, " (%s is a command: paygate exec runs a script "
                            "file, give its path: %s)", argv[1], found);
        }
        fputc('\n', stderr);
        return 2;
    }
    return gw_exec_main(argv[1], argc - 2, argv + 2);
}

/* The diagnostic commands are Lua scripts run as `paygate exec` runs one:
 * lua/paygate/cli/NAME.lua with the command's arguments. */
static const char *const lua_cmds[] = {
    "sign", "verify", "decrypt", "certs", "doctor", "apikey", "audit",
    "etcd", "migrate", "backup", "restore", NULL
};

static int
cmd_lua(const char *name, int argc, char **argv)
{
    char script[4200];

    snprintf(script, sizeof(script), "%s/paygate/cli/%s.lua", gw_lua_dir(),
             name);
    if (access(script, R_OK) != 0) {
        fprintf(stderr, "paygate %s: cannot read %s: %s\n", name, script,
                strerror(errno));
        return 2;
    }
    return gw_exec_main(script, argc - 1, argv + 1);
}

/* The master pid in pid_file, checked for `paygate NAME`: a live process
 * (not a zombie) whose command is paygate; else 0, said on stderr. */
static int
master_pid(const char *name, const char *pid_file)
{
    char cmd[4096];
    size_t n = 0;
    FILE *f;
    int pid = 0;

    f = fopen(pid_file, "r");
    if (f == NULL) {
        fprintf(stderr, "paygate %s: cannot read %s: %s (is the server "
                        "running with --pid-file?)\n", name, pid_file,
                strerror(errno));
        return 0;
    }
    if (fscanf(f, "%d", &pid) != 1 || pid <= 1) {
        fclose(f);
        fprintf(stderr, "paygate %s: %s holds no pid\n", name, pid_file);
        return 0;
    }
    fclose(f);
    if (is_zombie(pid)) {
        /* (its cmdline reads empty: it would be called "not a paygate
         * master" below, and the reason hidden) */
        fprintf(stderr, "paygate %s: pid %d from %s has exited (a "
                        "zombie: its parent has not reaped it); nothing "
                        "signalled\n", name, pid, pid_file);
        return 0;
    }
    {
        /* a stale pid file may name another process now: HUP (USR2)
         * ends most */
        char path[64];
        FILE *c;

        snprintf(path, sizeof(path), "/proc/%d/cmdline", pid);
        c = fopen(path, "r");
        if (c != NULL) {
            n = fread(cmd, 1, sizeof(cmd) - 1, c);
            fclose(c);
        }
        cmd[n] = '\0';         /* argv[0] up to its NUL */
        if (c == NULL || strstr(cmd, "paygate") == NULL) {
            fprintf(stderr, "paygate %s: pid %d from %s is %s (a stale "
                            "pid file?); nothing signalled\n", name, pid,
                    pid_file, c == NULL ? "not running"
                                        : "not a paygate master");
            return 0;
        }
    }
    return pid;
}

/* The options of `paygate reload` and `paygate upgrade`. */
struct signal_opts {
    const char *pid_file;
    double      timeout;        /* s to wait for the outcome */
    int         timeout_given;
    int         wait;           /* 0 after --no-wait */
};

/* Reads them (--no-wait only where no_wait_ok); -1 to go on, or the exit
 * code to return: 0 after --help, 2 after a usage error said in one line
 * naming the option, never a value given with "=". */
static int
signal_opts(const char *name, const char *usage, int argc, char **argv,
            struct signal_opts *o, int no_wait_ok)
{
    o->pid_file = NULL;
    o->timeout = 90;
    o->timeout_given = 0;
    o->wait = 1;
    for (int i = 1; i < argc; i++) {
        if (is_help(argv[i])) {
            fputs(usage, stdout);
            return 0;
        }
        if (strcmp(argv[i], "--pid-file") == 0 && i + 1 < argc) {
            o->pid_file = argv[++i];
        } else if (strncmp(argv[i], "--pid-file=", 11) == 0) {
            o->pid_file = argv[i] + 11;
        } else if (no_wait_ok && strcmp(argv[i], "--no-wait") == 0) {
            o->wait = 0;
        } else if ((strcmp(argv[i], "--timeout") == 0 && i + 1 < argc)
                   || strncmp(argv[i], "--timeout=", 10) == 0) {
            const char *v = argv[i][9] == '=' ? argv[i] + 10 : argv[++i];
            char *end;

            o->timeout_given = 1;
            o->timeout = strtod(v, &end);
            if (end == v || *end != '\0' || !(o->timeout > 0)
                || o->timeout > 3600) {
                fprintf(stderr, "paygate %s: --timeout must be in "
                                "(0, 3600] seconds\n", name);
                return 2;
            }
        } else if (strcmp(argv[i], "--pid-file") == 0
                   || strcmp(argv[i], "--timeout") == 0) {
            /* one line naming it, as paygate run says it */
            fprintf(stderr, "paygate %s: %s needs a value (see paygate "
                    "%s --help)\n", name, argv[i], name);
            return 2;
        } else {
            /* the option at fault, never a value given with = */
            int len = (int) strcspn(argv[i], "=");

            fprintf(stderr, "paygate %s: unknown %s %.*s (see paygate "
                    "%s --help)\n", name, argv[i][0] == '-' ? "option"
                    : "argument", len > 100 ? 100 : len, argv[i], name);
            return 2;
        }
    }
    if (o->pid_file == NULL) {
        /* one line saying what is missing, as the other usage errors */
        fprintf(stderr, "paygate %s: --pid-file FILE is required: the pid "
                "file the server was started with (paygate run --pid-file "
                "FILE, or the config's pid_file) (see paygate %s --help)\n",
                name, name);
        return 2;
    }
    return -1;
}

static int
cmd_reload(int argc, char **argv)
{
    struct signal_opts o;
    const char *pid_file;
    int pid = 0, wait, before, code;
    double timeout;
    char line[1200], cmd[4096];

    code = signal_opts("reload", usage_reload, argc, argv, &o, 1);
    if (code >= 0) {
        return code;
    }
    pid_file = o.pid_file;
    wait = o.wait;
    timeout = o.timeout;
    pid = master_pid("reload", pid_file);
    if (pid <= 0) {
        return 1;
    }
    snprintf(cmd, sizeof(cmd), "%s.reload", pid_file);
    if (wait && access(cmd, F_OK) != 0) {
        /* a pid file the master did not write (it writes FILE.reload
         * before FILE): no outcome will come, and waiting for one would
         * only time out */
        if (kill(pid, SIGHUP) != 0) {
            fprintf(stderr, "paygate reload: cannot signal pid %d: %s\n",
                    pid, strerror(errno));
            return 1;
        }
        printf("paygate reload: asked pid %d to reload; it did not write "
               "%s itself (not started with it as its pid_file), so it "
               "records no outcome there: its log says how the reload "
               "ended\n", pid, pid_file);
        return 0;
    }
    line[0] = '\0';
    before = reload_outcome(pid_file, line, sizeof(line));
    {
        /* a reload loading now read the code before this command ran: its
         * outcome is not this one's; the master starts another after it
         * for our HUP, whose outcome is the next */
        const char *what = strchr(line, ' ');

        if (what != NULL && strncmp(what, " loading", 8) == 0) {
            before++;
            if (!o.timeout_given) {
                timeout += 60;     /* that reload may take its 60 s first */
            }
        }
    }
    if (kill(pid, SIGHUP) != 0) {
        fprintf(stderr, "paygate reload: cannot signal pid %d: %s\n", pid,
                strerror(errno));
        return 1;
    }
    if (!wait) {
        printf("paygate reload: asked pid %d to reload\n", pid);
        return 0;
    }
    for (double waited = 0; waited < timeout; waited += 0.05) {
        struct timespec ts = { 0, 50 * 1000 * 1000 };
        /* whether it is gone, asked before the outcome is read: anything
         * it wrote before it went is in the file by then */
        int exited = kill(pid, 0) != 0;
        int zombie = !exited && is_zombie(pid);

        if (reload_outcome(pid_file, line, sizeof(line)) > before) {
            const char *what = strchr(line, ' ');

            what = what != NULL ? what + 1 : line;
            if (strncmp(what, "ok ", 3) == 0) {
                printf("paygate reload: done, %s", what + 3);
                return 0;
            }
            fprintf(stderr, "paygate reload: %s", what);
            return 1;
        }
        if (exited || zombie) {
            fprintf(stderr, "paygate reload: pid %d exited before the "
                            "reload ended%s\n", pid, zombie ? " (a zombie: "
                            "its parent has not reaped it)" : "");
            return 1;
        }
        nanosleep(&ts, NULL);
    }
    fprintf(stderr, "paygate reload: no outcome from pid %d within %g s "
                    "(see its log)\n", pid, timeout);
    return 1;
}

/* PID_FILE.upgrade's line "<owner> <n> <what>": the owner's pid (0 when
 * there is no line), n in *n, what (its newline dropped) in what. */
static int
upgrade_outcome(const char *pid_file, int *n, char *what, size_t len)
{
    char path[4200], line[1200];
    int owner = 0, at = 0;
    FILE *f;

    snprintf(path, sizeof(path), "%s.upgrade", pid_file);
    what[0] = '\0';
    f = fopen(path, "r");
    if (f == NULL) {
        return 0;
    }
    if (fgets(line, sizeof(line), f) == NULL
        || sscanf(line, "%d %d %n", &owner, n, &at) != 2) {
        owner = 0;
    } else {
        line[strcspn(line, "\n")] = '\0';
        snprintf(what, len, "%s", line + at);
    }
    fclose(f);
    return owner;
}

static int
cmd_upgrade(int argc, char **argv)
{
    struct signal_opts o;
    const char *pid_file;
    int pid, owner, before = 0, n = 0, code, said = 0;
    double timeout;
    char what[1200], done[64];

    code = signal_opts("upgrade", usage_upgrade, argc, argv, &o, 0);
    if (code >= 0) {
        return code;
    }
    pid_file = o.pid_file;
    timeout = o.timeout;
    pid = master_pid("upgrade", pid_file);
    if (pid <= 0) {
        return 1;
    }
    /* USR2 ends a process that does not handle it: only a master that
     * wrote FILE.upgrade (it handles USR2) is signalled */
    owner = upgrade_outcome(pid_file, &before, what, sizeof(what));
    if (owner != pid) {
        fprintf(stderr, "paygate upgrade: pid %d did not write %s.upgrade: "
                "it is no master that upgrades (a paygate older than "
                "`paygate upgrade`, or a pid file written by hand: USR2 "
                "would stop it); nothing signalled\n", pid, pid_file);
        return 1;
    }
    if (strncmp(what, "upgrading", 9) == 0) {
        fprintf(stderr, "paygate upgrade: pid %d is upgrading already; "
                "nothing signalled\n", pid);
        return 1;
    }
    if (kill(pid, SIGUSR2) != 0) {
        fprintf(stderr, "paygate upgrade: cannot signal pid %d: %s\n", pid,
                strerror(errno));
        return 1;
    }
    snprintf(done, sizeof(done), "ready, upgraded from %d", pid);
    for (double waited = 0; waited < timeout; waited += 0.05) {
        struct timespec ts = { 0, 50 * 1000 * 1000 };
        /* asked before the outcome is read, as paygate reload does */
        int exited = kill(pid, 0) != 0;
        int zombie = !exited && is_zombie(pid);
        double due;

        owner = upgrade_outcome(pid_file, &n, what, sizeof(what));
        if (!said && owner == pid && n > before
            && sscanf(what, "upgrading, outcome within %lf s", &due) == 1) {
            /* the master says when its outcome is due (its
             * upgrade_timeout, and a margin): the default wait follows
             * it from here, an explicit --timeout stands */
            /* (upgrade_timeout is at most 1e12 s: a larger number, or
             * "nan", "inf", one not past 0, is no master's: the file
             * was edited; the default wait stands) */
            int follow = !o.timeout_given && due > 0 && due <= 1e13;
            char num[64];

            said = 1;
            if (follow) {
                timeout = waited + due;
            }
            /* the wait it takes, whole seconds but for --timeout's */
            snprintf(num, sizeof(num), o.timeout_given ? "%g" : "%.0f",
                     o.timeout_given ? o.timeout : ceil(timeout - waited));
            printf("paygate upgrade: pid %d upgrading; waiting up to %s s "
                   "for the outcome%s\n", pid, num,
                   o.timeout_given ? " (--timeout)"
                   : follow ? " (its upgrade_timeout and a margin)"
                   : " (the default: the master said no usable time)");
            fflush(stdout);
        }
        if (owner > 0 && owner != pid && strcmp(what, done) == 0) {
            printf("paygate upgrade: done, pid %d serves (all its workers "
                   "loaded the app); pid %d finishes its requests and "
                   "exits\n", owner, pid);
            return 0;
        }
        if (owner == pid && n > before
            && strncmp(what, "refused: ", 9) == 0) {
            fprintf(stderr, "paygate upgrade: %s; pid %d keeps serving\n",
                    what, pid);
            return 1;
        }
        if (exited || zombie) {
            fprintf(stderr, "paygate upgrade: pid %d exited before the "
                            "upgrade ended%s\n", pid, zombie ? " (a zombie: "
                            "its parent has not reaped it)" : "");
            return 1;
        }
        nanosleep(&ts, NULL);
    }
    fprintf(stderr, "paygate upgrade: no outcome from pid %d within %g s "
                    "(see its log)\n", pid, timeout);
    return 1;
}

/* No core dumps, soft or hard limit: a crashed process's memory holds
 * the secrets it read (private keys, APIv3 keys, webhook secrets, store
 * passwords), and a core file (or a dump piped to systemd-coredump, which
 * honours the limit) would keep them on disk. Workers and the processes
 * they spawn inherit it. A crash is still reported ("killed by signal"). */
static void
no_core_dumps(void)
{
    struct rlimit rl = { 0, 0 };

    (void) setrlimit(RLIMIT_CORE, &rl);
}

static int
dispatch(int argc, char **argv)
{
    const char *cmd;

    if (argc < 2) {
        fputs(usage_main, stderr);
        return 2;
    }
    cmd = argv[1];
    if (strcmp(cmd, "help") == 0 && argc > 2) {
        /* paygate help COMMAND: the same as paygate COMMAND --help */
        static char help_flag[] = "--help";
        char *hargv[] = { argv[0], argv[2], help_flag, NULL };

        return dispatch(3, hargv);
    }
    if (is_help(cmd) || strcmp(cmd, "help") == 0) {
        fputs(usage_main, stdout);
        return 0;
    }
    if (strcmp(cmd, "version") == 0 || strcmp(cmd, "--version") == 0) {
        if (argc > 2 && is_help(argv[2])) {
            puts("usage: paygate version\n\nPrints the version of this "
                 "binary and the commit it was built from:\n"
                 "paygate X.Y.Z (build COMMIT), COMMIT ending in -dirty "
                 "when the\nsource tree had changes, \"unknown\" when it "
                 "was built outside a git\ncheckout.");
            return 0;
        }
        if (argc > 2) {
            fprintf(stderr, "paygate version: takes no arguments\n");
            return 2;
        }
        printf("paygate %s (build %s)\n", PAYGATE_VERSION, PAYGATE_BUILD);
        return 0;
    }
    if (strcmp(cmd, "run") == 0) {
        return cmd_run(argc - 1, argv + 1);
    }
    if (strcmp(cmd, "exec") == 0) {
        return cmd_exec(argc - 1, argv + 1);
    }
    if (strcmp(cmd, "reload") == 0) {
        return cmd_reload(argc - 1, argv + 1);
    }
    if (strcmp(cmd, "upgrade") == 0) {
        return cmd_upgrade(argc - 1, argv + 1);
    }
    for (int i = 0; lua_cmds[i] != NULL; i++) {
        if (strcmp(cmd, lua_cmds[i]) == 0) {
            return cmd_lua(cmd, argc - 1, argv + 1);
        }
    }
    fprintf(stderr, "paygate: unknown command '%s' (see paygate --help)\n",
            cmd);
    return 2;
}

/* What a command printed on stdout (help, the version, `paygate reload`'s
 * outcome, a diagnostic's report, a script's print) is written out here;
 * a failure to write it (a full disk, stdout closed) is a failure of the
 * command: its output is lost, and exit 0 would say it was written. A
 * script's os.exit() ends the process before this point: its status
 * stands. */
static int
output_written(int code)
{
    int bad = ferror(stdout), e = 0;

    errno = 0;
    if (fflush(stdout) != 0) {
        bad = 1;
        e = errno;
    }
    if (bad) {
        if (e != 0) {
            fprintf(stderr, "paygate: cannot write the output: %s\n",
                    strerror(e));
        } else {
            fputs("paygate: cannot write the output (a write to stdout "
                  "failed)\n", stderr);
        }
        return code == 0 ? 1 : code;
    }
    return code;
}

/* An upgrade's new master: what it writes on stderr goes on to fd 2 as
 * ever, and its last line is kept, so that a failure before it serves (a
 * configuration error, "paygate: config.lua: ...") reaches the old master
 * and `paygate upgrade` too, not the log alone. */
static char tee_line[400];      /* the last whole line, or "" */
static char tee_cur[400];       /* the line being written */
static size_t tee_len;          /* bytes in tee_cur */

static ssize_t
tee_write(void *cookie, const char *buf, size_t size)
{
    size_t off = 0;

    while (off < size) {
        ssize_t w = write(STDERR_FILENO, buf + off, size - off);

        if (w < 0 && errno == EINTR) {
            continue;
        }
        if (w <= 0) {
            break;
        }
        off += (size_t) w;
    }
    for (size_t i = 0; i < size; i++) {
        if (buf[i] == '\n') {
            if (tee_len > 0) {
                memcpy(tee_line, tee_cur, tee_len);
                tee_line[tee_len] = '\0';
            }
            tee_len = 0;
        } else if (tee_len < sizeof(tee_cur) - 1) {
            tee_cur[tee_len++] = buf[i];
        }
    }
    return (ssize_t) size;
}

static void
tee_stderr(void)
{
    cookie_io_functions_t io = { NULL, tee_write, NULL, NULL };
    FILE *f = fopencookie(NULL, "w", io);

    if (f != NULL) {
        setvbuf(f, NULL, _IONBF, 0);
        stderr = f;         /* glibc's stderr is a variable: ours now */
    }
}

int
main(int argc, char **argv)
{
    char err[256];
    int code, upgrading;

    no_core_dumps();
    main_argv = argv;
    upgrading = gw_upgrade_env(err, sizeof(err));
    if (upgrading < 0) {
        fprintf(stderr, "paygate: %s\n", err);
        return 2;
    }
    if (upgrading) {
        tee_stderr();
    }
    code = output_written(dispatch(argc, argv));
    /* an upgrade's new master that stopped before it took over: why */
    gw_upgrade_failed(tee_line);
    return code;
}
