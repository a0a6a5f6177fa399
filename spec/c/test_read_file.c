/*
 * test_read_file.c -- paygate.read_file's heap buffer (the file's bytes,
 * often a private key) is freed when making the Lua string of them runs
 * out of memory: lua_pushlstring raises then, and a buffer only a C local
 * pointed at was lost with its bytes in it (a leak per failed read, the
 * secret left in freed-never memory). A Lua allocator that refuses any
 * one allocation past 256 KiB makes that push fail for a file of 600 KiB
 * while every other allocation succeeds (a spec cannot: LuaJIT's own
 * allocator has no limit to set). The process's heap in use must come
 * back to what it was once the state is collected: malloc's count, or
 * ASan's when built with it (its malloc keeps no glibc counts).
 */
#include <assert.h>
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>

#ifdef __SANITIZE_ADDRESS__
/* ASan's runtime has it (its header, sanitizer/allocator_interface.h, is
 * not installed everywhere) */
size_t __sanitizer_get_current_allocated_bytes(void);
#endif

int luaopen_paygate_core(lua_State *L);

#define FILE_SIZE   (600 * 1024)
#define ALLOC_LIMIT (256 * 1024)

static int armed;                       /* 1: refuse big allocations */

static void *
limited_alloc(void *ud, void *p, size_t osize, size_t nsize)
{
    (void) ud;
    (void) osize;
    if (nsize == 0) {
        free(p);
        return NULL;
    }
    if (armed && nsize > ALLOC_LIMIT) {
        return NULL;
    }
    return realloc(p, nsize);
}

/* bytes the process's heap holds now */
static size_t
heap_in_use(void)
{
#ifdef __SANITIZE_ADDRESS__
    return __sanitizer_get_current_allocated_bytes();
#else
    struct mallinfo2 mi = mallinfo2();

    return mi.uordblks + mi.hblkhd;
#endif
}

/* read_file(path, "key") in a protected call; returns lua_pcall's code,
 * the result or the error message left on the stack */
static int
read_file(lua_State *L, const char *path)
{
    lua_getfield(L, 1, "read_file");
    lua_pushstring(L, path);
    lua_pushliteral(L, "key");
    return lua_pcall(L, 2, 1, 0);
}

int
main(void)
{
    char       dir[] = "/tmp/test_read_file.XXXXXX", path[64];
    char      *want = malloc(FILE_SIZE);
    lua_State *L;
    FILE      *f;
    size_t     before, n;
    const char *got;

    assert(want != NULL);
    assert(mkdtemp(dir) != NULL);
    snprintf(path, sizeof(path), "%s/key.pem", dir);
    for (size_t i = 0; i < FILE_SIZE; i++) {
        want[i] = (char) ('a' + i % 26);
    }
    f = fopen(path, "wb");
    assert(f != NULL);
    assert(fwrite(want, 1, FILE_SIZE, f) == FILE_SIZE);
    assert(fclose(f) == 0);

    L = lua_newstate(limited_alloc, NULL);
    assert(L != NULL);
    luaL_openlibs(L);
    lua_pushcfunction(L, luaopen_paygate_core);
    lua_call(L, 0, 1);
    assert(lua_istable(L, 1));

    /* unarmed: the file whole, and nothing kept once it is collected */
    lua_gc(L, LUA_GCCOLLECT, 0);
    before = heap_in_use();
    assert(read_file(L, path) == 0);
    got = lua_tolstring(L, -1, &n);
    assert(got != NULL && n == FILE_SIZE && memcmp(got, want, n) == 0);
    lua_pop(L, 1);
    lua_gc(L, LUA_GCCOLLECT, 0);
    assert(heap_in_use() < before + ALLOC_LIMIT);

    /* armed: the string cannot be made, the call raises "not enough
     * memory"; the buffer of the file's 600 KiB must not outlive it */
    for (int i = 0; i < 3; i++) {
        before = heap_in_use();
        armed = 1;
        assert(read_file(L, path) == LUA_ERRMEM);
        armed = 0;
        lua_pop(L, 1);
        lua_gc(L, LUA_GCCOLLECT, 0);
        if (heap_in_use() >= before + ALLOC_LIMIT) {
            fprintf(stderr, "test_read_file: %zu bytes still held after a"
                    " read_file that ran out of memory\n",
                    heap_in_use() - before);
            return 1;
        }
    }

    lua_close(L);
    free(want);
    assert(unlink(path) == 0);
    assert(rmdir(dir) == 0);
    puts("test_read_file: ok");
    return 0;
}
