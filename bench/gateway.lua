-- bench/gateway.lua -- the gateway's notification path end to end (run by
-- bench/gateway; on demand, never part of the tests).
--
--   paygate exec bench/gateway.lua run
--     For each store (SQLite; PostgreSQL when installed) and each fill (a
--     fresh store; one holding BENCH_FILL paid payments with their
--     history): creates the payments to notify in the store (bulk SQL),
--     signs one TRANSACTION.SUCCESS notification for each (two processes,
--     one per core, just before the run: they verify for 5 minutes), then
--     drives them over loopback with wrk for BENCH_SECS (fixed
--     concurrency, each notification POSTed at most once) at
--       (a) bench/wechatpay_app: parse_notification -> 204, not durable
--           (the replay check on), and
--       (b) examples/gateway on one worker: POST /wechatpay/notify/{mchid}
--           (verify, decrypt, dedupe, transition, audit, outbox, commit,
--           204), and before it the gateway at BENCH_COMPARE if given,
--     and prints unique notifications/s, p50, p99, the ratios, and what
--     each notification cost the store: bytes the worker wrote (SQLite:
--     the WAL and the checkpoints) or the WAL PostgreSQL generated. After
--     each gateway run it checks in the store that every payment notified
--     is paid, once. With SQLite it first measures, beside the store, what
--     one commit (one fsync) per notification allows -- single-row inserts
--     from BENCH_CONC coroutines without group commit, 3 s -- and prints
--     the gateway's rate against it, and after the runs the store's
--     floor (below) on payments of its own.
--   paygate exec bench/gateway.lua gen FILE FROM COUNT
--     signs COUNT notifications for bench payments FROM .. FROM+COUNT-1
--   paygate exec bench/gateway.lua floor URL FROM COUNT
--     the store's floor: the gateway's write jobs for payments FROM ..
--     FROM+COUNT-1 (waiting for their notification), made beforehand by
--     gw.notify_atomic.statements, run as db:atomic jobs from BENCH_CONC
--     coroutines; prints jobs/s and the CPU microseconds per job
--   paygate exec bench/gateway.lua fill URL KIND FROM TO
--     bulk-inserts payments FROM..TO: KIND "h" paid ones with their
--     history (attempt, notification, dedupe key, 3 audit entries, a
--     delivered outbox event), KIND "b" payments waiting for payment
--     (attempt open, 2 audit entries)
--
-- env: BENCH_ROUNDS (default 3: alternating runs of each receiver; the
-- medians are printed), BENCH_SECS (wrk's duration per run, default 5),
-- BENCH_N (distinct
-- notifications signed per run, default 100000: more than a run can send),
-- BENCH_CONC (wrk connections, default 50; the floor's coroutines),
-- BENCH_FLOOR_N (payments of the floor, default 20000), BENCH_FILL (default 1000000),
-- BENCH_ENGINES ("sqlite postgres"), BENCH_FILLS ("0 FILL"),
-- BENCH_COMPARE (a git revision, or an app folder: its gateway runs too,
-- before the working tree's, on payments of its own), BENCH_GATEWAY (the app,
-- default examples/gateway), BENCH_SQLITE_OPTS (the gateway's SQLite
-- options as a query string, e.g. inline_reads=0), BENCH_PG_POOL (the gateway's PostgreSQL
-- pool, default 16), BENCH_PERF (a file: perf record of each gateway run
-- into it, the last one kept), PAYGATE_BIN.
--
-- The fill's audit rows carry random hashes (not verifiable chains): they
-- are there for their size and indexes, not for audit.verify.
--
-- Bench payment i's id is time-ordered as the gateway's are (gw.model:
-- the time it was made, then random symbols): "pay_" + its time part
-- (i, after every history payment's for a payment waiting for its
-- notification: the history was made a day before) + spread(i) (a
-- bijection of i standing for the random part) + the kind letter
-- (pay_id). So are its out_trade_no, audit subject, outbox subject and
-- notification business key, all made from the id. Its transaction id
-- is spread over the key space (WeChat's carry a date, then digits in no
-- order the merchant sees), and so is the notification's id. (Until
-- gw.model made ids time-ordered, the gateway's were random and the bench
-- spread them too: consecutive notifications then dirtied leaves of their
-- own in every index keyed by the payment.) Created_at follows i:
-- payments are paid in about the order they are made.
package.path = "bench/?.lua;" .. package.path
local paygate = require "paygate"
local sql = require "paygate.sql"
local migrate = require "paygate.migrate"
local audit = require "paygate.audit"
local outbox = require "paygate.outbox"
local crypto = require "paygate.crypto"
local json = require "cjson"

local FIX = "spec/fixtures/wechatpay/"
local PUB_ID = "PUB_KEY_ID_0114232020260101000000000001"
local APIV3 = "a7cde1ZJB1kG2e7VfTs3jQzaWizur8Gb"
local MCHID = "1900000001"
local APPID = "wx2421b1c4370ec43b"
local GATEWAY = os.getenv("BENCH_GATEWAY") or "examples/gateway"
local BIN = os.getenv("PAYGATE_BIN") or "build/paygate"

local function env_num(name, def)
  return tonumber(os.getenv(name) or "") or def
end

-- Bench payment i's transaction key: 16 digits, spread(i) then i, each
-- %08d (pay_id uses spread(i) too).
-- spread is a bijection of 0 .. 10^8-1 (i * P + C mod 10^8, P odd and not
-- a multiple of 5, about 0.618 * 10^8: consecutive i land far apart);
-- i * P + C < 6.2e15 stays exact in a double (2^53), SQLite's integers
-- and PostgreSQL's bigint. series_sql computes the same in SQL.
local SPREAD_P, SPREAD_C, SPREAD_M = 61803399, 27182818, 100000000

local function key(i)
  assert(i >= 0 and i < SPREAD_M and i % 1 == 0, "bench payment out of range")
  return ("%08d%08d"):format((i * SPREAD_P + SPREAD_C) % SPREAD_M, i)
end

-- The payment id of bench payment i of kind "b" (waiting) or "h" (paid,
-- the fill's history): its time part (8 digits: i, or B_AFTER + i for
-- kind "b", made after all of kind "h"), spread(i), the kind.
local B_AFTER = 50000000
local function pay_id(kind, i)
  assert(i >= 0 and i < B_AFTER and i % 1 == 0, "bench payment out of range")
  return ("pay_%08d%08d%s"):format((kind == "h" and 0 or B_AFTER) + i,
                                   (i * SPREAD_P + SPREAD_C) % SPREAD_M, kind)
end

-- Its transaction id (28 digits, as WeChat's), the kind (1: h, 2: b) last.
local function transaction_id(kind, i)
  return "42000000000" .. key(i) .. (kind == "h" and "1" or "2")
end

local function sh(cmd)
  local ok = os.execute(cmd)
  return ok == true or ok == 0
end

local function read_cmd(cmd)
  local p = assert(io.popen(cmd))
  local out = p:read("*a")
  p:close()
  return out
end

------------------------------------------------------------ notifications

local platform_key

-- The resource of bench payment i's TRANSACTION.SUCCESS, decrypted.
local function resource_of(i)
  return {
    mchid = MCHID, appid = APPID, out_trade_no = pay_id("b", i) .. "_1",
    transaction_id = transaction_id("b", i),
    trade_type = "NATIVE", trade_state = "SUCCESS",
    trade_state_desc = "支付成功", bank_type = "CMC", attach = "",
    success_time = "2026-11-29T10:34:56+08:00",
    payer = { openid = "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o" },
    amount = { total = 100, payer_total = 100, currency = "CNY",
               payer_currency = "CNY" },
  }
end

-- TRANSACTION.SUCCESS for bench payment i, as WeChat sends it.
local function notification(i)
  platform_key = platform_key or assert(crypto.private_key(
    assert(io.open(FIX .. "a5_platform_key.pem")):read("*a")))
  local txn = json.encode(resource_of(i))
  local nonce = crypto.random_nonce(12)
  local ct = assert(crypto.aead_encrypt("AEAD_AES_256_GCM", APIV3, nonce,
                                        "transaction", txn))
  local body = json.encode({
    id = "EV-" .. crypto.random_nonce(24),
    create_time = "2026-11-29T10:34:57+08:00",
    resource_type = "encrypt-resource", event_type = "TRANSACTION.SUCCESS",
    summary = "支付成功",
    resource = { original_type = "transaction",
                 algorithm = "AEAD_AES_256_GCM",
                 ciphertext = crypto.base64_encode(ct),
                 associated_data = "transaction", nonce = nonce },
  })
  local ts = tostring(os.time())
  local hn = crypto.random_nonce(32)
  local sig = assert(crypto.sign_base64(platform_key, ts .. "\n" .. hn
                                        .. "\n" .. body .. "\n",
                                        "sha256-rsa"))
  return table.concat({ ts, hn, sig, PUB_ID, body }, "\t")
end

local function gen(file, from, count)
  local f = assert(io.open(file, "wb"))
  for i = from, from + count - 1 do
    f:write(notification(i), "\n")
  end
  f:close()
end

-- Signs notifications for from .. from+count-1 in two processes (one per
-- core) into file.
local function gen_parallel(file, from, count)
  local half = math.floor(count / 2)
  local cmd = ("%s exec bench/gateway.lua gen %s.1 %d %d & "
               .. "%s exec bench/gateway.lua gen %s.2 %d %d; wait"):format(
    BIN, file, from, half, BIN, file, from + half, count - half)
  assert(sh(cmd), "gen failed")
  assert(sh(("cat %s.1 %s.2 > %s && rm -f %s.1 %s.2"):format(
    file, file, file, file, file)))
end

---------------------------------------------------------------- fill

-- Bench payments from..to of kind in SQL, for engine: with (the
-- statement's prefix), from_s (its FROM clause, a row s(i) per payment),
-- and the expressions of their id and transaction id (pay_id and
-- transaction_id of i).
local function series_sql(engine, kind, from, to)
  local pg = engine == "postgres"
  local t0 = kind == "h" and 0 or B_AFTER
  local with, from_s, k, kt
  if pg then
    with = ""
    -- bigint: i * SPREAD_P overflows an integer
    from_s = ("FROM generate_series(%d::bigint, %d::bigint) AS s(i)")
             :format(from, to)
    local spread = ("lpad(((i * %d + %d) %% %d)::text, 8, '0')"):format(
      SPREAD_P, SPREAD_C, SPREAD_M)
    k = ("(%s || lpad(i::text, 8, '0'))"):format(spread)
    kt = ("(lpad((i + %d)::text, 8, '0') || %s)"):format(t0, spread)
  else
    with = ("WITH RECURSIVE s(i) AS (SELECT %d UNION ALL SELECT i + 1 FROM s"
            .. " WHERE i < %d) "):format(from, to)
    from_s = "FROM s"
    k = ("printf('%%08d%%08d', (i * %d + %d) %% %d, i)"):format(SPREAD_P,
         SPREAD_C, SPREAD_M)
    kt = ("printf('%%08d%%08d', i + %d, (i * %d + %d) %% %d)"):format(t0,
          SPREAD_P, SPREAD_C, SPREAD_M)
  end
  return with, from_s, ("('pay_' || %s || '%s')"):format(kt, kind),
    ("('42000000000' || %s || '%s')"):format(k, kind == "h" and "1" or "2")
end

-- The bulk SQL of payments from..to of kind "h" (paid, with history) or
-- "b" (waiting for their notification), for engine. Created 1 ms apart
-- in the order of i (the history a day before now): the order they are
-- notified in, as payments are paid in about the order they are made.
local function fill_sql(engine, kind, from, to, now)
  local pg = engine == "postgres"
  local with, from_s, id, txn = series_sql(engine, kind, from, to)
  local hash = pg and "(md5(random()::text) || md5(random()::text))"
               or "lower(hex(randomblob(32)))"
  local paid = kind == "h"
  local T = tostring(now)
  local CREATED = ("(%d + i * 0.001)"):format(paid and now - 86400 or now)
  local stmts = {}
  local function add(s)
    stmts[#stmts + 1] = with .. s
  end
  add(([[INSERT INTO gw_payments (id, app_id, order_id, mchid, appid,
  channel, amount, currency, description, state, version, out_trade_no,
  attempt, transaction_id, paid_out_trade_no, refunded, payer_total, late,
  expires_at, created_at, updated_at, notified_at, checks)
SELECT ID, 'bench', 'ord-' || ID, '%s', '%s', 'native', 100, 'CNY',
  'bench order', '%s', %d, ID || '_1', 1, %s, %s, 0, %s, 0, %s, %s, %s,
  %s, 0 %s]]):format(MCHID, APPID, paid and "paid" or "paying",
    paid and 3 or 2, paid and "TXN" or "NULL",
    paid and "ID || '_1'" or "NULL", paid and "100" or "NULL",
    T .. " + 7200", CREATED, T, paid and T or "NULL", from_s))
  add(([[INSERT INTO gw_attempts (out_trade_no, payment_id, n, channel,
  state, prepay, transaction_id, created_at, closed_at)
SELECT ID || '_1', ID, 1, 'native', '%s',
  '{"code_url":"weixin://wxpay/bizpayurl?pr=bench"}', %s, %s, %s %s]]):format(
    paid and "paid" or "open", paid and "TXN" or "NULL", CREATED,
    paid and T or "NULL", from_s))
  local entries = paid and 3 or 2
  add(([[INSERT INTO paygate_audit (subject, seq, what, ref, from_state,
  to_state, cause, actor, at, evidence, prev_hash, hash)
SELECT 'payment:' || ID, k.seq, k.what, ID, k.f, k.t, k.cause, k.actor,
  %s000, k.ev, %s, %s
%s, (SELECT 1 AS seq, 'payment.created' AS what, CAST(NULL AS TEXT) AS f,
  'created' AS t, 'create' AS cause, 'bench' AS actor,
  CAST(NULL AS TEXT) AS ev
  UNION ALL SELECT 2, 'payment.opened', 'created', 'paying', 'prepay',
  'gateway', '{"channel":"native"}'
  UNION ALL SELECT 3, 'payment.succeeded', 'paying', 'paid', 'paid',
  'wechatpay', '{"notification_id":"EV-bench","source":"notification"}') k
WHERE k.seq <= %d]]):format(T, hash, hash, from_s, entries))
  add(([[INSERT INTO paygate_audit_heads (subject, seq, hash)
SELECT 'payment:' || ID, %d, %s %s]]):format(entries, hash, from_s))
  if paid then
    add(([[INSERT INTO gw_notifications (id, event_type, business_key,
  received_at, outcome)
SELECT 'EV-' || ID, 'TRANSACTION.SUCCESS',
  'pay|%s|' || ID || '_1|SUCCESS', %s, 'applied' %s]]):format(MCHID, T,
      from_s))
    add(([[INSERT INTO gw_notification_effects (key, notification_id,
  applied_at)
SELECT 'pay|%s|' || ID || '_1|SUCCESS', 'EV-' || ID, %s %s]]):format(
      MCHID, T, from_s))
    add(([[INSERT INTO paygate_outbox (subject, type, payload, shard,
  state, attempts, next_at, created_at, delivered_at, sinks_done)
SELECT ID, 'payment.paid', '{"type":"payment.paid","payment":{"id":"'
  || ID || '","state":"paid","amount":100,"currency":"CNY"}}', 0,
  'delivered', 1, %s, %s, %s, 'hooks' %s]]):format(T, T, T, from_s))
  end
  local id_rep, txn_rep = id:gsub("%%", "%%%%"), txn:gsub("%%", "%%%%")
  for i, s in ipairs(stmts) do
    stmts[i] = s:gsub("TXN", txn_rep):gsub("ID", id_rep)
  end
  return stmts
end

-- Makes the gateway's tables (its migrations, the audit's and the
-- outbox's), then inserts kind's payments from..to in chunks. On SQLite
-- with the savepoint journals of this connection in memory: their
-- transaction ids are spread, so a chunk changes leaf pages all over that
-- index, and a
-- write whose journal (the first image of each page it changes) spills
-- to a temporary file past 8 MiB fails "database or disk is full"
-- (LSQLITE_STMT_SPILL).
local function fill(url, kind, from, to)
  local db = assert(sql.open(url))
  assert(migrate.run(db, GATEWAY .. "/migrations"))
  assert(audit.ensure_schema(db))
  assert(outbox.setup(db))
  local now = math.floor(paygate.now())
  if db.engine == "sqlite" then
    assert(db:exec("PRAGMA temp_store = MEMORY"))
  end
  local CHUNK = 100000
  for a = from, to, CHUNK do
    local b = math.min(to, a + CHUNK - 1)
    for _, s in ipairs(fill_sql(db.engine, kind, a, b, now)) do
      local ok, err = db:exec(s)
      if not ok then
        error("fill: " .. tostring(err) .. "\n" .. s, 0)
      end
    end
  end
  if db.engine == "postgres" then
    -- what a store that grew to this size over time has had done to it:
    -- vacuumed (else the insert-driven autovacuum of the new rows, and
    -- the first readers setting their hint bits, land in the measured
    -- run), analyzed, and its dirty pages checkpointed (else the
    -- checkpoint of the bulk load does)
    assert(db:exec("VACUUM (ANALYZE)"))
    assert(db:exec("CHECKPOINT"))
  end
  db:close()
end

----------------------------------------------------------------- run

local function free_port()
  return tonumber(read_cmd("python3 -c 'import socket;s=socket.socket();"
    .. "s.bind((\"127.0.0.1\",0));print(s.getsockname()[1])'"))
end

local function wait_port(port)
  for _ = 1, 300 do
    if sh(("python3 -c \"import socket;socket.create_connection("
           .. "('127.0.0.1',%d),0.2)\" 2>/dev/null"):format(port)) then
      return
    end
    paygate.sleep(0.1)
  end
  error("nothing listens on port " .. port, 0)
end

local pin0, pin1 = "", ""
if sh("command -v taskset >/dev/null") and tonumber(read_cmd("nproc")) >= 2
then
  pin0, pin1 = "taskset -c 0 ", "taskset -c 1 "
end

local function ms(v)
  local n, unit = v:match("^([%d.]+)(%a+)$")
  n = tonumber(n)
  if unit == "us" then return n / 1000 end
  if unit == "ms" then return n end
  if unit == "s" then return n * 1000 end
  if unit == "m" then return n * 60000 end
  return n
end

-- wrk for BENCH_SECS over the notifications in file at port/path:
-- { rate (acknowledged notifications/s), ok, pads, bad, p50, p99 (ms),
-- secs, errors }
local function drive(port, path, file, tmp, secs)
  local conc = env_num("BENCH_CONC", 50)
  local out = tmp .. "/wrk.txt"
  sh(("%swrk -t1 -c%d -d%ds --timeout 10s --latency -s "
      .. "bench/gateway_wrk.lua http://127.0.0.1:%d -- %s %s > %s 2>&1")
     :format(pin1, conc, secs or env_num("BENCH_SECS", 5), port, file, path,
             out))
  local text = assert(io.open(out)):read("*a")
  local r = {}
  r.secs = tonumber(text:match("requests in ([%d.]+)s")) or 0
  r.p50 = ms(text:match("\n%s+50%%%s+(%S+)") or "0")
  r.p99 = ms(text:match("\n%s+99%%%s+(%S+)") or "0")
  r.ok = tonumber(text:match("bench: ok=(%d+)")) or 0
  r.pads = tonumber(text:match("pads=(%d+)")) or 0
  r.bad = tonumber(text:match("bad=(%d+)")) or 0
  r.errors = text:match("Socket errors: ([^\n]*)")
  r.rate = r.secs > 0 and r.ok / r.secs or 0
  r.text = text
  return r
end

local TICK = tonumber(read_cmd("getconf CLK_TCK")) or 100

-- The receiver's worker: the master's child (--workers 1), or the
-- process itself.
local function worker_of(pid)
  return tonumber((read_cmd("pgrep -P " .. pid):match("%d+"))) or pid
end

-- CPU seconds (user + system, every thread) of worker w.
local function cpu_of(w)
  local f = io.open("/proc/" .. w .. "/stat")
  if not f then return 0 end
  local st = f:read("*a"):gsub("^.*%) ", "")
  f:close()
  local fields = {}
  for v in st:gmatch("%S+") do fields[#fields + 1] = v end
  -- after the ") ": state is field 3 of stat, utime 14, stime 15
  return (tonumber(fields[12]) + tonumber(fields[13])) / TICK
end

-- Bytes worker w had written to storage (/proc/PID/io write_bytes: the
-- store's WAL and database pages; 0 where unreadable).
local function written_of(w)
  local f = io.open("/proc/" .. w .. "/io")
  if not f then return 0 end
  local n = tonumber(f:read("*a"):match("\nwrite_bytes: (%d+)")) or 0
  f:close()
  return n
end

-- drive() with the worker's CPU time (us) and storage writes (KiB) per
-- acknowledged notification.
local function drive_cpu(pid, port, path, file, tmp, secs)
  local w = worker_of(pid)
  local c0, w0 = cpu_of(w), written_of(w)
  local r = drive(port, path, file, tmp, secs)
  r.cpu_us = r.ok > 0 and (cpu_of(w) - c0) * 1e6 / r.ok or 0
  r.write_kib = r.ok > 0 and (written_of(w) - w0) / 1024 / r.ok or 0
  return r
end

local function start(cmd, log)
  return tonumber(read_cmd(("sh -c '%s > %s 2>&1 & echo $!'"):format(cmd,
                                                                      log)))
end

local function stop(pid)
  sh("kill " .. pid .. " 2>/dev/null")
  for _ = 1, 100 do
    if not sh("kill -0 " .. pid .. " 2>/dev/null") then
      return
    end
    paygate.sleep(0.05)
  end
  sh("kill -9 " .. pid .. " 2>/dev/null")
end

------------------------------------------------------------- floor

-- The store's floor: the write jobs of the notifications of payments
-- from .. from+count-1, made by the gateway's own code
-- (gw.notify_atomic.statements: the reads and the plan) before the clock
-- starts, then run as db:atomic jobs from BENCH_CONC coroutines. What the
-- writes alone cost per notification (the read that decides them is made
-- before the clock starts), with no HTTP, signature, decryption or
-- decision. Prints "jobs/s cpu_us" (the CPU time of this
-- process, all its threads: the loop's side of the jobs and SQLite's
-- writer), after checking every job committed.
local function store_floor(url, from, count)
  if not (from and count and count >= 1) then
    error("usage: bench/gateway.lua floor URL FROM COUNT (COUNT >= 1)", 0)
  end
  package.path = GATEWAY .. "/?.lua;" .. package.path
  local notify_atomic = require "gw.notify_atomic"
  local db = assert(sql.open(url))
  assert(outbox.setup(db))
  assert(audit.ensure_schema(db))
  local jobs = {}
  for i = from, from + count - 1 do
    local ev = { id = "EV-floor-" .. i, event_type = "TRANSACTION.SUCCESS",
                 resource = resource_of(i) }
    local stmts, err = notify_atomic.statements(db, MCHID, ev)
    if not stmts then
      error(("floor: no write job for payment %s (%s)"):format(pay_id("b", i),
        err and tostring(err) or "not waiting for its notification"), 0)
    end
    jobs[#jobs + 1] = stmts
  end
  local next_job, failed, tasks = 0, nil, {}
  local c0, t0 = os.clock(), paygate.update_time()
  for w = 1, math.max(1, env_num("BENCH_CONC", 50)) do
    tasks[w] = paygate.spawn(function()
      while next_job < #jobs and not failed do
        next_job = next_job + 1
        local ok, res, err = pcall(db.atomic, db, jobs[next_job])
        if not (ok and res) then failed = ok and err or res end
      end
    end)
  end
  for _, t in ipairs(tasks) do t:wait() end
  local cpu, wall = os.clock() - c0, paygate.update_time() - t0
  if failed then error("floor: a job failed: " .. tostring(failed), 0) end
  db:close()
  print(("%.0f %.1f"):format(count / wall, cpu / count * 1e6))
end

local function baseline(file, n, tmp)
  local port = free_port()
  local conf = tmp .. "/base.lua"
  local f = assert(io.open(conf, "w"))
  f:write('return { bench = { replay = true },'
          .. ' shared = { wechatpay_replay = "128m" } }\n')
  f:close()
  local pid = start(("%s%s run bench/wechatpay_app --listen 127.0.0.1:%d"
    .. " --workers 1 --admin off --no-access-log --log-level warn"
    .. " --config %s"):format(pin0, BIN, port, conf), tmp .. "/base.log")
  wait_port(port)
  -- half the time, and no longer than the notifications last at 40k/s:
  -- it is several times faster, and the notifications signed for the
  -- gateway's run must last it
  local r = drive_cpu(pid, port, "/notify", file, tmp,
                      math.max(1, math.min(
                        math.floor(env_num("BENCH_SECS", 5) / 2),
                        math.floor(n / 40000))))
  stop(pid)
  return r
end

local function gateway(url, app, file, n, tmp)
  local port = free_port()
  local conf = tmp .. "/gw.lua"
  local f = assert(io.open(conf, "w"))
  local key = tmp .. "/apiv3.key"
  local kf = assert(io.open(key, "w"))
  kf:write(APIV3, "\n")
  kf:close()
  local cwd = read_cmd("pwd"):gsub("%s+$", "")
  f:write(([[return {
  gateway = { db = %q, public_url = "http://127.0.0.1:%d" },
  merchants = { {
    mchid = %q, appid = %q,
    merchant_private_key = %q, merchant_serial = %q,
    apiv3_key_file = %q,
    public_key = %q, public_key_id = %q,
    base_url = "http://127.0.0.1:9", backup_url = false,
  } },
  shared = { wechatpay_replay = "128m" },
}
]]):format(url, port, MCHID, APPID, cwd .. "/" .. FIX .. "a1_merchant_key.pem",
    "1DDE55AD98ED71D6EDD4A4A16996DE7B47773A8C", key,
    cwd .. "/" .. FIX .. "a7_platform_pubkey.pem", PUB_ID))
  f:close()
  local log = tmp .. "/gw." .. port .. ".log"
  local pid = start(("%s%s run %s --listen 127.0.0.1:%d --workers 1"
    .. " --admin off --no-access-log --log-level warn --config %s")
    :format(pin0, BIN, app, port, conf), log)
  local ok, err = pcall(wait_port, port)
  if not ok then
    io.stderr:write(assert(io.open(log)):read("*a"))
    error(err, 0)
  end
  -- BENCH_PERF=FILE: perf record of core 0 (the receiver's, all its
  -- threads) while wrk drives it, into FILE (perf report -i FILE; -p
  -- records nothing on some VMs, -a -C does)
  local perf = os.getenv("BENCH_PERF")
  local perf_pid = perf and start(("perf record -q -e cpu-clock -F 1999 -g"
    .. " -a -C 0 -o %s"):format(perf), tmp .. "/perf.log")
  -- PostgreSQL writes in its own processes (the worker's write_bytes stay
  -- near 0): there the figure is the WAL the server generated
  local pgdb, lsn0 = nil, nil
  if url:match("^postgres") then
    pgdb = assert(sql.open(url))
    lsn0 = assert(pgdb:query("SELECT pg_current_wal_lsn()::text AS l"))[1].l
  end
  local r = drive_cpu(pid, port, "/wechatpay/notify/" .. MCHID, file, tmp)
  if pgdb then
    local d = assert(pgdb:query("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(),"
      .. " $1::pg_lsn)::float8 AS d", { lsn0 }))[1].d
    r.write_kib = r.ok > 0 and d / 1024 / r.ok or 0
    pgdb:close()
  end
  if perf_pid then
    sh("kill -INT " .. perf_pid .. " 2>/dev/null")
    for _ = 1, 200 do
      if not sh("kill -0 " .. perf_pid .. " 2>/dev/null") then break end
      paygate.sleep(0.05)
    end
  end
  stop(pid)
  r.log = log
  return r
end

-- How many of payments from..to are paid, and how many audit entries and
-- outbox events they have (each paid one exactly once: 3 entries, 1
-- event; the others untouched: 2 entries). Each count joins the series
-- of their ids (pay_id).
local function check(url, from, to)
  local db = assert(sql.open(url))
  local with, from_s, id = series_sql(db.engine, "b", from, to)
  local id_rep = id:gsub("%%", "%%%%")
  local function count(join)
    local q = ("%sSELECT count(*) AS n %s JOIN %s"):format(with, from_s,
      (join:gsub("ID", id_rep)))
    return tonumber(assert(db:query(q))[1].n)
  end
  local paid = count("gw_payments p ON p.id = ID AND p.state = 'paid'")
  local entries = count("paygate_audit a ON a.subject = 'payment:' || ID")
  local events = count("paygate_outbox o ON o.subject = ID"
                       .. " AND o.type = 'payment.paid'")
  db:close()
  return paid, entries, events
end

-- The run of median rate, with the median of each figure (of an even
-- number of rounds: the lower middle one).
local function median_run(list)
  local function med(key)
    local v = {}
    for i, r in ipairs(list) do v[i] = r[key] end
    table.sort(v)
    return v[math.floor((#v + 1) / 2)]
  end
  return { rate = med("rate"), p50 = med("p50"), p99 = med("p99"),
           cpu_us = med("cpu_us"), write_kib = med("write_kib") }
end

local function rates_of(list)
  local t = {}
  for i, r in ipairs(list) do
    t[i] = ("%.0f (p99 %.1f ms)"):format(r.rate, r.p99)
  end
  return table.concat(t, ", ")
end

-- The issue's first SQLite bound, on this machine: what one commit (one
-- fsync) per notification allows. Single-row inserts into a SQLite file
-- beside the gateway's, from BENCH_CONC coroutines, each its own commit
-- (batch_max = 1: no group commit), for 3 s. returns: commits/s.
local function one_commit_rate(tmp)
  local db = assert(sql.open("sqlite:" .. tmp .. "/one_commit.db",
                             { batch_max = 1 }))
  assert(db:exec_script("CREATE TABLE t (w INTEGER, i INTEGER, v TEXT)"))
  local stop = paygate.update_time() + 3
  local t0 = paygate.update_time()
  local count, tasks = 0, {}
  for w = 1, env_num("BENCH_CONC", 50) do
    tasks[w] = paygate.spawn(function()
      local i = 0
      while paygate.update_time() < stop do
        i = i + 1
        assert(db:exec("INSERT INTO t (w, i, v) VALUES ($1, $2, $3)",
                       { w, i, "one notification" }))
        count = count + 1
      end
    end)
  end
  for _, t in ipairs(tasks) do t:wait() end
  local rate = count / (paygate.update_time() - t0)
  db:close()
  os.remove(tmp .. "/one_commit.db")
  return rate
end

local function run()
  local servers = require "spec.support.servers"
  local N = env_num("BENCH_N", 100000)
  local FILL = env_num("BENCH_FILL", 1000000)
  local engines = {}
  for e in (os.getenv("BENCH_ENGINES") or "sqlite postgres"):gmatch("%S+")
  do
    if e ~= "postgres" or servers.have_postgres() then
      engines[#engines + 1] = e
    end
  end
  local fills = {}
  for v in (os.getenv("BENCH_FILLS") or ("0 " .. FILL)):gmatch("%S+") do
    fills[#fills + 1] = tonumber(v)
  end
  local tmp = servers.mktemp()
  -- the gateway as it is, and as it was at BENCH_COMPARE (a git revision)
  local modes = {}
  local rev = os.getenv("BENCH_COMPARE")
  if rev and rev ~= "" and sh("test -f " .. rev .. "/app.lua") then
    modes[1] = { label = "gateway " .. rev:match("[^/]*/?[^/]+$"),
                 app = rev }
  elseif rev and rev ~= "" then
    local dir = tmp .. "/before"
    assert(sh(("mkdir -p %s && git archive %s %s | tar -x -C %s"):format(
      dir, rev, GATEWAY, dir)), "cannot extract " .. GATEWAY .. " at " .. rev)
    modes[1] = { label = "gateway @" .. rev, app = dir .. "/" .. GATEWAY }
  end
  modes[#modes + 1] = { label = "gateway", app = GATEWAY }
  local cpu = read_cmd("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2")
              :gsub("^%s+", ""):gsub("%s+$", "")
  print(("paygate bench/gateway — %s, %s cores: %s; load now: %s"):format(
    os.date("!%Y-%m-%dT%H:%M:%SZ"), read_cmd("nproc"):gsub("%s", ""), cpu,
    read_cmd("cut -d' ' -f1-3 /proc/loadavg"):gsub("%s+$", "")))
  print(("each run: %d s of wrk -t1 -c%d (core 1) over %d distinct"
    .. " notifications (each sent once), receiver on 1 worker (core 0)%s")
    :format(env_num("BENCH_SECS", 5), env_num("BENCH_CONC", 50), N,
    engines[2] and "; PostgreSQL unpinned" or ""))
  print("note: the machine may be shared with other jobs; compare the"
    .. " ratios (measured in the same run), not absolute figures. cpu_us:"
    .. " the receiver worker's CPU time (all its threads) per acknowledged"
    .. " notification; its x base is base cpu / gateway cpu, the throughput"
    .. " ratio one core of its own would give")
  print()
  print(("%-8s %-7s %-24s %8s %8s %8s %7s %8s %7s %6s"):format("store",
    "fill", "receiver", "notif/s", "p50_ms", "p99_ms", "x base", "cpu_us",
    "x base", "check"))
  local results = {}
  local one_commit
  for _, e in ipairs(engines) do
    if e == "sqlite" then
      one_commit = one_commit_rate(tmp)
      break
    end
  end
  if one_commit then
    print(("%-8s %-7s %-24s %8.0f   (single-row inserts, one commit each:"
      .. " what one fsync per notification allows here)"):format("sqlite",
      "", "one commit per write", one_commit))
  end
  for _, engine in ipairs(engines) do
    local pg_srv
    if engine == "postgres" then
      pg_srv = servers.postgres()
    end
    for fi, nfill in ipairs(fills) do
      local url, gw_url
      if engine == "sqlite" then
        url = "sqlite:" .. tmp .. "/gw" .. fi .. ".db"
        gw_url = url
        local o = os.getenv("BENCH_SQLITE_OPTS")
        if o and o ~= "" then gw_url = url .. "?" .. o end
      else
        local dbname = "bench" .. fi
        local admin = assert(sql.open(pg_srv.url))
        assert(admin:exec("CREATE DATABASE " .. dbname))
        admin:close()
        url = pg_srv.url:gsub("/postgres$", "/" .. dbname)
        -- the gateway's own: each notification's transaction holds a
        -- connection, 4 (the default) would cap it at 4 at once
        gw_url = url .. "?pool=" .. env_num("BENCH_PG_POOL", 16)
      end
      local t0 = paygate.update_time()
      if nfill > 0 then
        fill(url, "h", 1, nfill)
      end
      local rounds = env_num("BENCH_ROUNDS", 3)
      fill(url, "b", 1, N * #modes * rounds)
      local filled = paygate.update_time() - t0
      local fill_label = nfill == 0 and "fresh"
        or (nfill >= 1e6 and (nfill / 1e6) .. "M" or tostring(nfill))
      -- rounds: the baseline, then each gateway, each on notifications
      -- of its own signed just before; medians reported
      local runs = { base = {} }
      local all_ok, notes = true, {}
      for r = 1, rounds do
        for mi, mode in ipairs(modes) do
          local from = ((r - 1) * #modes + (mi - 1)) * N + 1
          local file = tmp .. "/n.tsv"
          gen_parallel(file, from, N)
          if mi == 1 then
            local base = baseline(file, N, tmp)
            table.insert(runs.base, base)
            if base.pads > 0 then
              all_ok = false
              notes[#notes + 1] = "baseline used up its notifications: raise"
                .. " BENCH_N"
            end
          end
          local gw = gateway(gw_url, mode.app, file, N, tmp)
          runs[mi] = runs[mi] or {}
          table.insert(runs[mi], gw)
          local paid, entries, events = check(url, from, from + N - 1)
          -- acknowledged ones are paid; a few more may have committed as
          -- wrk stopped with their answers on the way
          local ok = paid >= gw.ok
            and paid <= gw.ok + env_num("BENCH_CONC", 50)
            and entries == 2 * N + paid and events == paid and gw.pads == 0
            and gw.bad == 0
          if not ok then
            all_ok = false
            notes[#notes + 1] = ("%s round %d: %d acknowledged, %d paid,"
              .. " %d audit entries (want %d), %d events, %d failed answers,"
              .. " notifications used up: %s; the gateway's log ends:\n%s\n%s"):format(
              mode.label, r, gw.ok, paid, entries, 2 * N + paid, events,
              gw.bad, tostring(gw.pads > 0),
              read_cmd("tail -c 1500 " .. gw.log), gw.text)
          end
          if gw.errors then
            notes[#notes + 1] = mode.label .. " round " .. r
              .. ": socket errors: " .. gw.errors
          end
        end
      end
      local base = median_run(runs.base)
      print(("%-8s %-7s %-24s %8.0f %8.2f %8.2f %7s %8.0f %7s %6s")
        :format(engine, fill_label, "parse_notification->204", base.rate,
        base.p50, base.p99, "", base.cpu_us, "", ""))
      for mi, mode in ipairs(modes) do
        local gw = median_run(runs[mi])
        print(("%-8s %-7s %-24s %8.0f %8.2f %8.2f %7.2f %8.0f %7.2f %6s")
          :format(engine, fill_label, mode.label, gw.rate, gw.p50, gw.p99,
          base.rate > 0 and gw.rate / base.rate or 0, gw.cpu_us,
          gw.cpu_us > 0 and base.cpu_us / gw.cpu_us or 0,
          all_ok and "ok" or "BAD"))
        print(("%-8s %-7s %-24s %s"):format("", "", "  rounds, notif/s:",
          rates_of(runs[mi])))
        print(("%-8s %-7s %-24s %.1f KiB per notification"):format("", "",
          engine == "postgres" and "  WAL generated:"
          or "  written to storage:", gw.write_kib or 0))
        results[#results + 1] = { engine = engine, fill = nfill,
          mode = mode.label, base = base, gw = gw }
      end
      print(("%-8s %-7s %-24s %s"):format("", "", "  base rounds:",
        rates_of(runs.base)))
      if engine == "sqlite" then
        -- the store's floor on payments of its own, after the runs (on
        -- PostgreSQL the server's CPU would not be counted: SQLite only)
        local from = N * #modes * rounds + 1
        local count = env_num("BENCH_FLOOR_N", 20000)
        fill(url, "b", from, from + count - 1)
        local out = read_cmd(("%s%s exec bench/gateway.lua floor %s %d %d"
                              .. " 2>&1"):format(pin0, BIN, gw_url, from,
                                                 count))
        local rate, floor_cpu = out:match("([%d.]+) ([%d.]+)%s*$")
        rate, floor_cpu = tonumber(rate), tonumber(floor_cpu)
        if not floor_cpu then
          print("  store floor: failed: " .. out)
        else
          print(("%-8s %-7s %-24s %8.0f %8s %8s %7s %8.0f"):format(engine,
            fill_label, "store floor (jobs only)", rate, "", "", "",
            floor_cpu))
          print(("  (the gateway's write jobs alone, built beforehand, from"
            .. " %d coroutines: no HTTP, signature, decryption or decision;"
            .. " a receiver that did these writes and nothing more than"
            .. " parse_notification could reach at most %.2f x base:"
            .. " base cpu / (base cpu + floor cpu))"):format(
            env_num("BENCH_CONC", 50),
            base.cpu_us / (base.cpu_us + floor_cpu)))
        end
      end
      for _, n in ipairs(notes) do
        print("  " .. n)
      end
      if nfill > 0 then
        print(("  (filled %d payments with their history in %.0f s)")
              :format(nfill, filled))
      end
    end
    if pg_srv then
      pg_srv.cleanup()
    end
  end
  -- fresh vs filled, per store and mode
  print()
  for _, a in ipairs(results) do
    for _, b in ipairs(results) do
      if a.engine == b.engine and a.mode == b.mode and a.fill == 0
         and b.fill > 0 then
        print(("%s, %s: filled / fresh: throughput %.2f, p99 %.2f"):format(
          a.engine, a.mode, b.gw.rate / a.gw.rate, b.gw.p99 / a.gw.p99))
      end
    end
  end
  if one_commit then
    for _, a in ipairs(results) do
      if a.engine == "sqlite" then
        print(("sqlite, %s, %s: %.2f x one commit per write (%.0f/s)")
          :format(a.mode, a.fill == 0 and "fresh" or "filled",
          a.gw.rate / one_commit, one_commit))
      end
    end
  end
  sh("rm -rf " .. tmp)
end

local mode = arg and arg[1] or "run"
if mode == "gen" then
  gen(assert(arg[2], "gen FILE FROM COUNT"), tonumber(arg[3]),
      tonumber(arg[4]))
elseif mode == "floor" then
  store_floor(assert(arg[2], "floor URL FROM COUNT"), tonumber(arg[3]),
        tonumber(arg[4]))
elseif mode == "fill" then
  fill(assert(arg[2], "fill URL KIND FROM TO"), arg[3], tonumber(arg[4]),
       tonumber(arg[5]))
elseif mode == "run" then
  run()
else
  error("usage: bench/gateway.lua run | gen FILE FROM COUNT"
        .. " | floor URL FROM COUNT | fill URL KIND FROM TO")
end
