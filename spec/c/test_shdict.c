/*
 * test_shdict.c -- a shared dictionary survives a process that dies while
 * holding its lock: killed (SIGKILL) right after locking, and ended
 * (_exit) at each step of a set that a half-done change could leave
 * behind. The other processes carry on, every whole entry is still there,
 * and the structure (free cells, LRU, counters) is sound: filling the
 * dictionary to eviction afterwards loses nothing it should keep.
 */
#include <assert.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "shdict.h"

static char buf[GW_SHD_MAX_VALUE];

static void
put(struct gw_shdict *d, const char *k, const char *v)
{
    struct gw_shd_value val = { .type = GW_SHD_STRING, .s = v,
                                .len = strlen(v) };

    assert(gw_shdict_set(d, k, strlen(k), &val, 0, 0) == GW_SHD_OK);
}

/* 1 when k holds v, 0 when absent; aborts on anything else */
static int
has(struct gw_shdict *d, const char *k, const char *v)
{
    struct gw_shd_value out;
    enum gw_shd_rc rc = gw_shdict_get(d, k, strlen(k), buf, sizeof(buf),
                                      &out);

    if (rc == GW_SHD_NOT_FOUND) {
        return 0;
    }
    assert(rc == GW_SHD_OK);
    assert(out.type == GW_SHD_STRING);
    assert(out.len == strlen(v) && memcmp(out.s, v, out.len) == 0);
    return 1;
}

/* The string k holds (in buf), or NULL when absent. */
static const char *
value_of(struct gw_shdict *d, const char *k)
{
    struct gw_shd_value out;
    enum gw_shd_rc rc = gw_shdict_get(d, k, strlen(k), buf, sizeof(buf) - 1,
                                      &out);

    if (rc == GW_SHD_NOT_FOUND) {
        return NULL;
    }
    assert(rc == GW_SHD_OK && out.type == GW_SHD_STRING);
    buf[out.len] = '\0';
    return buf;
}

/* Runs a set of key k in a child that dies at step `step` (holding the
 * lock); returns the child's wait status. */
static int
die_in_set(struct gw_shdict *d, int step, const char *k, const char *v)
{
    pid_t pid = fork();
    int status;

    assert(pid >= 0);
    if (pid == 0) {
        gw_shdict_die_at = step;
        put(d, k, v);
        _exit(0);       /* not reached for steps 1-3 */
    }
    if (step == 4) {
        assert(waitpid(pid, &status, WUNTRACED) == pid);
        assert(WIFSTOPPED(status));         /* stopped, holding the lock */
        kill(pid, SIGKILL);
    }
    assert(waitpid(pid, &status, 0) == pid);
    return status;
}

/* Every kept key still reads back; then fill far past capacity and check
 * the counters add up (a broken free list or LRU would lose or corrupt). */
static void
check_sound(struct gw_shdict *d, int nkeep)
{
    struct gw_shd_stats st;
    char k[32], v[200];

    for (int i = 0; i < nkeep; i++) {
        snprintf(k, sizeof(k), "keep%d", i);
        snprintf(v, sizeof(v), "value-%d", i);
        assert(has(d, k, v));
    }
    for (int i = 0; i < 5000; i++) {
        snprintf(k, sizeof(k), "fill%d", i);
        snprintf(v, sizeof(v), "%0150d", i);
        put(d, k, v);
        assert(has(d, k, v));
    }
    gw_shdict_stats(d, &st);
    assert(st.used <= st.capacity);
    assert(st.entries > 0 && st.evictions > 0);
    /* the newest fills are all there */
    for (int i = 4990; i < 5000; i++) {
        snprintf(k, sizeof(k), "fill%d", i);
        snprintf(v, sizeof(v), "%0150d", i);
        assert(has(d, k, v));
    }
}

int
main(void)
{
    char err[256];
    struct gw_shdict *d;
    struct gw_shd_stats st;
    size_t size;
    int status;

    assert(gw_shdict_parse_size("16m", &size) == 0 && size == 16u << 20);
    assert(gw_shdict_parse_size("512k", &size) == 0 && size == 512u << 10);
    assert(gw_shdict_parse_size("1G", &size) == 0 && size == 1u << 30);
    assert(gw_shdict_parse_size("40000", &size) == 0 && size == 40000);
    assert(gw_shdict_parse_size("1k", &size) != 0);        /* too small */
    assert(gw_shdict_parse_size("5g", &size) != 0);        /* too large */
    assert(gw_shdict_parse_size("16mb", &size) != 0);
    assert(gw_shdict_parse_size("", &size) != 0);
    assert(gw_shdict_parse_size("-1m", &size) != 0);
    /* digits and an optional unit, nothing else (strtod took these) */
    assert(gw_shdict_parse_size("+16m", &size) != 0);
    assert(gw_shdict_parse_size(" 16m", &size) != 0);
    assert(gw_shdict_parse_size("\t16m", &size) != 0);
    assert(gw_shdict_parse_size("16m ", &size) != 0);
    assert(gw_shdict_parse_size("16 m", &size) != 0);
    assert(gw_shdict_parse_size("1.5m", &size) != 0);
    assert(gw_shdict_parse_size("1e6", &size) != 0);
    assert(gw_shdict_parse_size("0x100000", &size) != 0);
    assert(gw_shdict_parse_size("m", &size) != 0);
    assert(gw_shdict_parse_size("4g", &size) == 0 && size == 1ull << 32);
    assert(gw_shdict_parse_size("4194305k", &size) != 0);  /* 4g + 1k */
    assert(gw_shdict_parse_size("99999999999999999999999m", &size) != 0);
    assert(gw_shdict_parse_size("0032k", &size) == 0 && size == 32768);
    assert(gw_shdict_create("bad name", 1 << 20, err, sizeof(err)) == NULL);

    d = gw_shdict_create("t", 256 * 1024, err, sizeof(err));
    assert(d != NULL);
    assert(gw_shdict_create("t", 256 * 1024, err, sizeof(err)) == NULL);
    assert(gw_shdict_find("t") == d);

    for (int step = 1; step <= 4; step++) {
        char k[32], v[32];

        gw_shdict_flush(d);
        for (int i = 0; i < 50; i++) {
            snprintf(k, sizeof(k), "keep%d", i);
            snprintf(v, sizeof(v), "value-%d", i);
            put(d, k, v);
        }
        put(d, "victim", "old");
        gw_shdict_stats(d, &st);
        {
            uint64_t before = st.recoveries;

            status = die_in_set(d, step, "victim", "new");
            if (step == 4) {
                assert(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
            } else {
                assert(WIFEXITED(status) && WEXITSTATUS(status) == 99);
            }
            /* this process carries on: the next lock rebuilds */
            assert(has(d, "keep0", "value-0"));
            gw_shdict_stats(d, &st);
            assert(st.recoveries == before + 1);
        }
        /* the replaced key is whole: old, new or gone, never garbage */
        {
            const char *got = value_of(d, "victim");

            if (got == NULL) {
                assert(step == 1 || step == 3); /* old gone, new not in */
            } else {
                assert(strcmp(got, "old") == 0 || strcmp(got, "new") == 0);
            }
        }
        assert(st.entries == 50 || st.entries == 51 || st.entries == 52);
        check_sound(d, 50);
        printf("step %d: recovered, %u entries\n", step,
               (unsigned) st.entries);
    }
    printf("ok\n");
    return 0;
}
