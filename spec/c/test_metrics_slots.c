/*
 * test_metrics_slots.c -- a worker taking its metrics slot never makes it
 * look free to the master. The master reserves a slot and forks; the
 * worker attaches while the master may already be choosing a slot for the
 * next worker (a worker killed and restarted right after another). A slot
 * that showed pid 0 during the attach was handed out twice: two workers
 * counted into one slot and one worker's counts vanished from /metrics.
 *
 * Here a child attaches to its reserved slot over and over while the
 * parent keeps asking for a free slot: the reserved one must never come
 * back. And a slot handed out again after its worker died starts clean.
 */
#include <assert.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "metrics.h"

#define ATTACHES 20000

int
main(void)
{
    int taken, status, seen = 0, asks = 0;
    pid_t child;

    assert(gw_metrics_init(4) == 0);
    taken = gw_metrics_free_slot();
    assert(taken == 0);

    child = fork();
    assert(child >= 0);
    if (child == 0) {
        for (int i = 0; i < ATTACHES; i++) {
            gw_metrics_attach(taken);
        }
        _exit(0);
    }
    for (;;) {
        pid_t done = waitpid(child, &status, WNOHANG);
        int s = gw_metrics_free_slot();

        asks++;
        if (s == taken) {
            kill(child, SIGKILL);
            waitpid(child, &status, 0);
            fprintf(stderr, "slot %d handed out while its worker was "
                    "attaching (ask %d)\n", s, asks);
            return 1;
        }
        if (s >= 0) {
            gw_metrics_retire(s);   /* give the reservation back */
            seen++;
        }
        if (done == child) {
            break;
        }
    }
    assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    assert(seen > 0);
    printf("%d asks while a worker attached %d times: its slot never "
           "looked free\n", asks, ATTACHES);

    /* the worker dies: its slot is folded, freed, and the next worker
     * gets it clean (its counters start at 0) */
    gw_metrics_retire(taken);
    child = fork();
    assert(child >= 0);
    if (child == 0) {
        int f;

        gw_metrics_attach(taken);
        f = gw_metrics_counter_family("t_total", "t", "", 2);
        assert(f >= 0);
        assert(gw_metrics_counter_get(f, "") == 0);
        assert(gw_metrics_counter_add(f, "", 5) == 0);
        _exit(0);
    }
    assert(waitpid(child, &status, 0) == child);
    assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    gw_metrics_retire(taken);
    assert(gw_metrics_free_slot() == taken);
    child = fork();
    assert(child >= 0);
    if (child == 0) {
        int f;

        gw_metrics_attach(taken);
        f = gw_metrics_counter_family("t_total", "t", "", 2);
        assert(f == 0);
        assert(gw_metrics_counter_get(f, "") == 0);
        _exit(0);
    }
    assert(waitpid(child, &status, 0) == child);
    assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    printf("a reused slot starts clean\n");
    return 0;
}
