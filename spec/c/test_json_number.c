/*
 * test_json_number.c -- paygate.json.core's encode writes a number that is
 * not integral as snprintf's "%.15g" when that reads back as the same
 * double, else as its "%.17g". ljson.c makes most of them from the
 * double's exact value in integers (format_fraction), and leaves the rest
 * to snprintf: every text must be the one the snprintf rule gives. The
 * doubles: random bit patterns across the range it takes and beyond it,
 * times with micro- and millisecond fractions, short decimals, values
 * next to powers of ten and two, exact halves (the ties it leaves to
 * snprintf), each also negative.
 */
#include <assert.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>

int luaopen_paygate_json_core(lua_State *L);

static lua_State *L;
static long       checked;

static uint64_t rng = 0x9e3779b97f4a7c15ULL;

static uint64_t
next(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static void
expected(char *out, double d)
{
    snprintf(out, 40, "%.15g", d);
    if (strtod(out, NULL) != d) {
        snprintf(out, 40, "%.17g", d);
    }
}

static void
check1(double d)
{
    char want[40];
    const char *got;
    size_t n;

    if (!isfinite(d) || d == floor(d)) {
        return;                 /* integral numbers: another path */
    }
    expected(want, d);
    lua_pushvalue(L, 1);        /* encode */
    lua_pushnumber(L, d);
    lua_call(L, 1, 1);
    got = lua_tolstring(L, -1, &n);
    if (got == NULL || strlen(want) != n || memcmp(got, want, n) != 0) {
        fprintf(stderr, "json number %a: got %s, want %s\n", d,
                got != NULL ? got : "(nil)", want);
        abort();
    }
    lua_pop(L, 1);
    checked++;
}

static void
check(double d)
{
    check1(d);
    check1(-d);
}

int
main(void)
{
    int i, x, j;

    L = luaL_newstate();
    luaL_openlibs(L);
    luaopen_paygate_json_core(L);
    lua_getfield(L, -1, "encode");
    lua_replace(L, 1);
    lua_settop(L, 1);

    /* random doubles between 1e-6 and 1e17 (format_fraction takes
     * 1e-4 .. 1e15) */
    for (i = 0; i < 500000; i++) {
        double m = (double) (next() >> 11) / 9007199254740992.0;  /* [0,1) */
        int e = (int) (next() % 80) - 20;

        check(ldexp(0.5 + m / 2, e));
    }
    /* random bit patterns with exponents around the range */
    for (i = 0; i < 250000; i++) {
        uint64_t bits = (next() & 0x800fffffffffffffULL)
                        | ((uint64_t) (1023 - 16 + next() % 70) << 52);
        double d;

        memcpy(&d, &bits, sizeof(d));
        check(d);
    }
    /* times: seconds with micro- and millisecond fractions */
    for (i = 0; i < 150000; i++) {
        double t = 1700000000.0 + (double) (next() % 200000000);

        check(t + (double) (next() % 1000000) / 1e6);
        check(t + (double) (next() % 1000) / 1e3);
    }
    /* short decimals: n / 10^j */
    for (i = 0; i < 150000; i++) {
        double n = (double) (next() % 100000000000ULL);

        check(n / pow(10, (double) (next() % 19)));
    }
    /* next to powers of ten, and of two */
    for (x = -6; x <= 17; x++) {
        double p = pow(10, x), up = p, down = p;

        for (j = 0; j < 64; j++) {
            up = nextafter(up, INFINITY);
            down = nextafter(down, 0);
            check(up);
            check(down);
            check(p * 0.9999999999999995 + j * 1e-18 * p);
        }
    }
    for (x = -20; x <= 55; x++) {
        double p = ldexp(1, x), up = p, down = p;

        for (j = 0; j < 64; j++) {
            up = nextafter(up, INFINITY);
            down = nextafter(down, 0);
            check(up);
            check(down);
        }
    }
    /* exact halves and quarters at the last digits kept */
    for (i = 0; i < 100000; i++) {
        double n = (double) (next() % 1000000000000000ULL);

        check(n + 0.5);
        check(n / 8 + 0.125);
        check(ldexp(n, -(int) (next() % 40)));
    }
    check(100000000000000.5);
    check(12345678901234.25);
    check(12345678901234.75);
    check(0.0001);
    check(0.00010000000000000002);
    check(999999999999999.9);
    check(99999999999999.99);
    check(1.0 / 3);
    check(0.1);
    check(1733496000.123456);

    printf("ok - %ld numbers written as snprintf writes them\n", checked);
    lua_close(L);
    return 0;
}
