/*
 * test_store_atomic.c -- db:atomic's jobs as the SQLite file records them:
 * a script run by the runtime (gw_exec_main) queues, during an
 * interactive transaction (committed in a batch of its own), a good
 * three-statement job and one whose third statement misses its expect
 * (committed together in the next batch); the raw binding (paygate.sqlite.core
 * h:atomic) is handed hostile shapes, which must raise before anything is
 * queued and leave nothing allocated once collected (run under ASan with
 * detect_leaks=1 to see that). Then the file is opened here with SQLite's
 * own API: the good job and the transaction are there, nothing of the
 * failed job or of the refused calls is, and the database passes
 * integrity_check.
 */
#include <assert.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sqlite3.h>

#include "worker.h"

static const char script[] =
"local sql = require 'paygate.sql'\n"
"local paygate = require 'paygate'\n"
"local dir = arg[1]\n"
"local db = assert(sql.open('sqlite:' .. dir .. '/t.db'))\n"
"assert(db:exec_script('CREATE TABLE t (k TEXT PRIMARY KEY,"
" v INTEGER NOT NULL)'))\n"
"local function job(tag, v3)\n"
"  return { { 'INSERT INTO t (k, v) VALUES ($1, 1)', { tag .. '1' } },\n"
"           { 'INSERT INTO t (k, v) VALUES ($1, 2)', { tag .. '2' } },\n"
"           { 'UPDATE t SET v = v + 10 WHERE k = $1', { v3 },"
" expect = 1 } }\n"
"end\n"
"local before = db:stats()\n"
"local tasks, started = {}, 0\n"
"assert(db:transaction(function(tx)\n"
"  assert(tx:exec(\"INSERT INTO t (k, v) VALUES ('tx', 0)\"))\n"
"  tasks[1] = paygate.spawn(function() started = started + 1\n"
"    return db:atomic(job('a', 'a1')) end)\n"
"  tasks[2] = paygate.spawn(function() started = started + 1\n"
"    return db:atomic(job('b', 'none')) end)\n"
"  local deadline = paygate.update_time() + 10\n"
"  while started < 2 do\n"
"    assert(paygate.update_time() < deadline, 'jobs not queued')\n"
"    paygate.sleep(0.001)\n"
"  end\n"
"end))\n"
"for _, t in ipairs(tasks) do\n"
"  local deadline = paygate.update_time() + 10\n"
"  while not t:finished() do\n"
"    assert(paygate.update_time() < deadline, 'job did not finish')\n"
"    paygate.sleep(0.001)\n"
"  end\n"
"end\n"
"local res = assert(tasks[1]:wait())\n"
"assert(#res == 3 and res[3].changes == 1)\n"
"local r2, err = tasks[2]:wait()\n"
"assert(r2 == nil and err.kind == 'conflict' and err.index == 3, tostring(err))\n"
"assert(db:stats().commits - before.commits == 2,\n"
"       'two commits: the transaction, then both jobs in one batch')\n"
"local h = db.h\n"
"local bad = { {}, { 5 }, { { 5 } }, { { 'SELECT 1', 5 } },\n"
"  { { 'SELECT 1', { {} } } }, { { 'SELECT 1', { io.stdout } } },\n"
"  { { \"INSERT INTO t (k, v) VALUES ('x', 1)\" }, { 'SELECT $1', { print } } },\n"
"  { { 'SELECT 1', nil, expect = -1 } }, { { 'SELECT 1', nil, expect = 'x' } } }\n"
"local many = {}\n"
"for i = 1, 1001 do many[i] = { \"INSERT INTO t (k, v) VALUES ('m', 1)\" } end\n"
"bad[#bad + 1] = many\n"
"-- Lua that raises while the job is built (a params.n, an expect):\n"
"-- the job and its copies are left to a finalizer, which the full\n"
"-- cycle below runs\n"
"local function raises(k) return { __index = function(_, key)\n"
"  if key == k then error(k .. ' refused') end end } end\n"
"bad[#bad + 1] = { { 'SELECT $1, $2', { 'a', 'b' } },\n"
"  { 'SELECT $1', setmetatable({ 'c' }, raises('n')) } }\n"
"bad[#bad + 1] = { { 'SELECT $1, $2', { 'a', 'b' } },\n"
"  setmetatable({ 'SELECT $1', { 'c' } }, raises('expect')) }\n"
"for i, b in ipairs(bad) do\n"
"  assert(not pcall(h.atomic, h, b), 'bad shape ' .. i .. ' accepted')\n"
"end\n"
"collectgarbage()\n"
"db:close()\n";

int
main(void)
{
    char          dir[] = "/tmp/paygate-atomic.XXXXXX";
    char          path[256], db_path[256];
    char         *argv[1];
    FILE         *f;
    sqlite3      *h;
    sqlite3_stmt *st;
    const char   *want[] = { "a1|11", "a2|2", "tx|0" };
    int           n = 0;

    assert(mkdtemp(dir) != NULL);
    snprintf(path, sizeof(path), "%s/job.lua", dir);
    snprintf(db_path, sizeof(db_path), "%s/t.db", dir);
    f = fopen(path, "w");
    assert(f != NULL);
    fputs(script, f);
    fclose(f);
    argv[0] = dir;
    assert(gw_exec_main(path, 1, argv) == 0);

    assert(sqlite3_open_v2(db_path, &h, SQLITE_OPEN_READONLY, NULL)
           == SQLITE_OK);
    /* db:close() returns before the store's threads have let the file go
     * (the writer's last close checkpoints the WAL): wait for them. */
    sqlite3_busy_timeout(h, 10000);
    if (sqlite3_prepare_v2(h, "SELECT k || '|' || v FROM t ORDER BY k",
                           -1, &st, NULL) != SQLITE_OK) {
        fprintf(stderr, "prepare: %s\n", sqlite3_errmsg(h));
        return 1;
    }
    while (sqlite3_step(st) == SQLITE_ROW) {
        const char *row = (const char *)sqlite3_column_text(st, 0);

        assert(n < 3);
        if (strcmp(row, want[n]) != 0) {
            fprintf(stderr, "row %d: %s, want %s\n", n, row, want[n]);
            return 1;
        }
        n++;
    }
    assert(n == 3);
    sqlite3_finalize(st);
    assert(sqlite3_prepare_v2(h, "PRAGMA integrity_check", -1, &st, NULL)
           == SQLITE_OK);
    assert(sqlite3_step(st) == SQLITE_ROW);
    assert(strcmp((const char *)sqlite3_column_text(st, 0), "ok") == 0);
    sqlite3_finalize(st);
    sqlite3_close(h);

    snprintf(path, sizeof(path), "rm -rf %s", dir);
    assert(system(path) == 0);
    puts("test_store_atomic: ok");
    return 0;
}
