/*
 * test_nonce.c -- crypto.random_nonce and crypto.random_bytes (up to 256
 * bytes) draw from a per-process pool of CSPRNG bytes: a forked worker
 * must never hand out the bytes its parent (or a sibling) will. The parent
 * fills its pool, forks twice, and every process then makes nonces (then,
 * in a second round, random byte strings): none may repeat across the
 * three.
 */
#include <assert.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>

int luaopen_paygate_crypto(lua_State *L);

#define PER 64          /* nonces each process makes after the fork */
#define LEN 32

static const char *fn = "random_nonce";   /* the function of this round */

static void
nonces(lua_State *L, char out[PER][LEN + 1])
{
    for (int i = 0; i < PER; i++) {
        size_t n;
        const char *s;

        lua_getfield(L, -1, fn);
        lua_pushinteger(L, LEN);
        lua_call(L, 1, 1);
        s = lua_tolstring(L, -1, &n);
        assert(s != NULL && n == LEN);
        memcpy(out[i], s, LEN);
        out[i][LEN] = 0;
        lua_pop(L, 1);
    }
}

static void round_of(lua_State *L);

int
main(void)
{
    lua_State *L = luaL_newstate();

    luaL_openlibs(L);
    lua_pushcfunction(L, luaopen_paygate_crypto);
    lua_call(L, 0, 1);
    round_of(L);
    fn = "random_bytes";
    round_of(L);
    lua_close(L);
    puts("test_nonce: ok");
    return 0;
}

static void
round_of(lua_State *L)
{
    static char all[3][PER][LEN + 1];
    int fds[2][2];
    pid_t pids[2];

    {
        char warm[PER][LEN + 1];
        nonces(L, warm);          /* the pool is filled, and partly read */
    }
    for (int c = 0; c < 2; c++) {
        assert(pipe(fds[c]) == 0);
        pids[c] = fork();
        assert(pids[c] >= 0);
        if (pids[c] == 0) {
            char mine[PER][LEN + 1];

            nonces(L, mine);
            assert(write(fds[c][1], mine, sizeof(mine)) == sizeof(mine));
            _exit(0);
        }
        close(fds[c][1]);
    }
    nonces(L, all[2]);
    for (int c = 0; c < 2; c++) {
        size_t got = 0;
        int st;

        /* a child's nonces fit the pipe's buffer: it exits without
         * waiting for the read, so its status comes first (a crashed
         * child is reported as such, not as a short read) */
        assert(waitpid(pids[c], &st, 0) == pids[c]);
        assert(WIFEXITED(st) && WEXITSTATUS(st) == 0);
        while (got < sizeof(all[c])) {
            ssize_t r = read(fds[c][0], (char *)all[c] + got,
                             sizeof(all[c]) - got);
            assert(r > 0);
            got += (size_t)r;
        }
    }
    for (int a = 0; a < 3 * PER; a++) {
        for (int b = a + 1; b < 3 * PER; b++) {
            assert(memcmp(all[a / PER][a % PER], all[b / PER][b % PER],
                          LEN) != 0);
        }
    }
}
