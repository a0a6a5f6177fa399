/*
 * fuzz_json.c -- the JSON decoder (ljson.c), which reads request bodies
 * and WeChat's notifications. Properties: decoding never reads outside
 * the text (ASan); what decodes is the value lua-cjson makes of the same
 * text, where cjson takes it too (every key and string its own bytes:
 * the decoder's size hints and the remembered short strings of
 * gw_pushshort may change nothing); and encoded and decoded again it is
 * the same value, unless the encoder had to write invalid UTF-8 as
 * U+FFFD. Decoded with unique keys it is the same value, or refused for
 * a duplicate key where the plain decode took it.
 * The state comes from gw_lstate_new, so that memory is in use, and a
 * full GC runs every 64 inputs (the remembered strings live through it).
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <lua.h>
#include <lauxlib.h>

#include "lstate.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* check(text): decodes; when it did, compares with cjson's value, then
 * encodes, decodes again and compares. Raises on a difference. */
static const char HARNESS[] =
    "local json = require 'paygate.json.core'\n"
    "local function same(a, b, depth)\n"
    "  if a == b then return true end\n"
    "  if type(a) ~= 'table' or type(b) ~= 'table' or depth > 2000 then\n"
    "    return false\n"
    "  end\n"
    "  for k, v in pairs(a) do\n"
    "    if not same(v, b[k], depth + 1) then return false end\n"
    "  end\n"
    "  for k in pairs(b) do\n"
    "    if a[k] == nil then return false end\n"
    "  end\n"
    "  return true\n"
    "end\n"
    "local has_cjson, cjson = pcall(require, 'cjson')\n"
    "return function(text)\n"
    "  local v = json.decode(text)\n"
    "  local u, why = json.decode(text, true)\n"
    "  if v == nil then\n"
    "    if u ~= nil then error('unique keys took what plain refused', 0) end\n"
    "    return\n"
    "  end\n"
    "  if u == nil and not why:find('^duplicate key') then\n"
    "    error('unique keys refused: ' .. why, 0)\n"
    "  end\n"
    "  if u ~= nil and not same(v, u, 0) then\n"
    "    error('unique keys differ', 0)\n"
    "  end\n"
    "  -- the same value as another decoder's, where both take the text\n"
    "  if has_cjson then\n"
    "    local ok, c = pcall(cjson.decode, text)\n"
    "    if ok and not same(v, c, 0) then\n"
    "      error('differs from cjson', 0)\n"
    "    end\n"
    "  end\n"
    "  local ok, again = pcall(json.encode, v)\n"
    "  if not ok then return end   -- deeper or odder than encode takes\n"
    "  -- the encoder writes invalid UTF-8 as U+FFFD: no round trip there\n"
    "  if again:find('\\\\ufffd', 1, true) then return end\n"
    "  local w = json.decode(again)\n"
    "  if w == nil or not same(v, w, 0) then\n"
    "    error('round trip differs: ' .. again, 0)\n"
    "  end\n"
    "end\n";

static lua_State *L;
static int        check_ref = LUA_NOREF;
static unsigned   runs;

/* At exit, before LeakSanitizer looks: what the state holds in C (the
 * encoder's buffer) is reachable only through LuaJIT's own mmap'd heap,
 * which the leak check does not scan. */
static void
close_state(void)
{
    lua_close(L);
    L = NULL;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (L == NULL) {
        L = gw_lstate_new(NULL, NULL);
        if (L == NULL || luaL_dostring(L, HARNESS) != 0) {
            abort();
        }
        check_ref = luaL_ref(L, LUA_REGISTRYINDEX);
        atexit(close_state);
    }
    lua_rawgeti(L, LUA_REGISTRYINDEX, check_ref);
    lua_pushlstring(L, (const char *) data, size);
    if (lua_pcall(L, 1, 0, 0) != 0) {
        const char *why = lua_tostring(L, -1);

        /* decode never raises, and the round trip holds: anything but
         * running out of memory is a finding */
        if (why == NULL || strstr(why, "not enough memory") == NULL) {
            __builtin_trap();
        }
        lua_pop(L, 1);
    }
    if (++runs % 64 == 0) {
        lua_gc(L, LUA_GCCOLLECT, 0);
    }
    return 0;
}
