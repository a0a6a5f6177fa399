-- gw.boot: reaching the store and Redis at start. An unreachable one is
-- tried again for up to WAIT seconds (backoff 0.2 s doubling to 2 s, a
-- warning per try), while the worker does not serve yet; then one line on
-- stderr naming what could not be reached (its URL without a password)
-- and exit status 1. Before the server first served, that stops it (the
-- service manager restarts it); a worker the master restarted later is
-- restarted again with the master's backoff.
local paygate = require "paygate"
local core = require "paygate.core"
local shared = require "paygate.shared"

local _M = {}

_M.WAIT = 10

--- syntax: s = boot.redact(url) -- the URL without a password
_M.redact = require("paygate.redact").url

-- an error's message, first line only (libpq's run over several)
local function first_line(err)
  local s = type(err) == "table" and err.message or tostring(err)
  return (tostring(s):match("^[^\n]*"))
end

--- syntax: first = boot.once(name)
-- true for the first worker of this code generation to ask (name: what
-- is said once per start or reload), false for the others: the shared
-- dictionary outlives a reload, so the claim is per generation.
function _M.once(name)
  return shared.get_dict("paygate"):add("gw:" .. name .. ":"
    .. tostring(paygate.runtime.generation or 0), 1, 60) and true or false
end

--- syntax: boot.exit(key, msg, status)
-- One line "gateway: msg" on stderr, then exit with status. Every worker
-- fails alike: the first to claim the shared key writes the line (one
-- write: one line), the others wait until it is written. The claim is
-- per code generation: the shared dictionary outlives a reload, and a
-- reload refused again within the claim's 10 s must still say why.
function _M.exit(key, msg, status)
  local d = shared.get_dict("paygate")
  key = key .. ":" .. tostring(paygate.runtime.generation or 0)
  if d:add(key, 1, 10) then
    io.stderr:write("gateway: " .. msg:gsub("[\r\n]", " ") .. "\n")
    io.stderr:flush()
    d:set(key, 2, 10)
  else
    local deadline = core.mono() + 2
    while d:get(key) ~= 2 and core.mono() < deadline do
      core.sleep(0.01)
    end
  end
  -- the master is told why too, as of an app that raises while it loads:
  -- a reload's refusal says it (`paygate reload` prints it). Last: the
  -- master then stops this generation's workers
  local fail = paygate.runtime.fail
  if fail then fail("gateway: " .. (msg:gsub("[\r\n]", " "))) end
  os.exit(status)
end

--- syntax: boot.fail(msg) -- one line "gateway: msg" on stderr, exit 1
function _M.fail(msg)
  _M.exit("gw:start_error", msg, 1)
end

--- syntax: boot.migrate(db, dir) -- the store's migrations (migrate.run)
-- A store holding a migration newer than this version's is refused (a
-- rollback of the binary: this code does not know that schema), but only
-- at a generation's first load: a start or a reload. A worker of a
-- generation that loaded already, restarted by the master after it died,
-- goes on with a warning: in a rolling upgrade the newer instance
-- migrated the store under the older ones, which serve on beside it (the
-- migrations are written for the code on both sides), and their
-- restarted workers load the same code on the same schema. Was: refused,
-- exit 1 at every restart, the older instance losing its workers one by
-- one until it served nothing (the upgrade trial). Any other migration
-- error ends the worker (boot.fail).
function _M.migrate(db, dir)
  local migrate = require "paygate.migrate"
  local d = shared.get_dict("paygate")
  local key = "gw:migrated:" .. tostring(paygate.runtime.generation or 0)
  local ok, err = migrate.run(db, dir)
  if ok then
    d:set(key, 1)
    return
  end
  if type(err) == "table" and err.database_newest and d:get(key) then
    paygate.log.warn("gateway: the store holds migration "
      .. err.database_newest .. ", newer than this version's newest ("
      .. err.app_newest .. "): a newer version migrated it while this one"
      .. " serves (a rolling upgrade); this restarted worker serves on"
      .. " beside the others of its generation. Replace this version:"
      .. " a start or a reload of it is refused on this store",
      { database_newest = err.database_newest,
        app_newest = err.app_newest })
    return
  end
  _M.fail("migrations: " .. tostring(err))
end

--- syntax: v = boot.reach(what, url, open, key[, fix])
-- open() -> v or nil, err. Returns v; an error that is not retryable, or
-- one still there after WAIT seconds, ends the worker (boot.fail), the
-- line followed by "; fix: " and fix(err) when that gives one. open()
-- raising is the URL's fault (an option paygate.sql or paygate.redis
-- refuses: ?pool=many): one line naming the config key (config.<key>),
-- exit 2, like every config error.
function _M.reach(what, url, open, key, fix)
  local deadline = core.mono() + _M.WAIT
  local delay = 0.2
  while true do
    local ok, v, err = pcall(open)
    if not ok then
      -- (without the position it was raised at: the line in gw/boot.lua
      -- that called open() says nothing about the config)
      local msg = tostring(type(v) == "table" and v.message or v)
        :gsub("^[^\n]-%.lua:%d+: ", "")
      _M.exit("gw:config_error", "config." .. key .. ": "
              .. _M.redact(msg):match("^[^\n]*"), 2)
    end
    if v then return v end
    local why = first_line(err)
    local retryable = type(err) == "table" and err.retryable
    if not retryable or core.mono() + delay > deadline then
      local f = fix and fix(err)
      _M.fail("cannot reach " .. what .. " " .. _M.redact(url) .. ": " .. why
              .. (f and "; fix: " .. f or ""))
    end
    paygate.log.warn("gateway: cannot reach " .. what .. "; trying again",
      { url = _M.redact(url), error = why, retry_in = delay })
    core.sleep(delay)
    delay = math.min(delay * 2, 2)
  end
end

-- A store put back from a backup (`paygate restore` records it: chain
-- "store", store.restored) knows nothing done after its copy: payments
-- and refunds made since are at WeChat only, and only the bills of those
-- days name them.

--- syntax: info = boot.restored(db)
-- nil for a store never restored (or that cannot be read now), else
-- { copy_newest, restored_at (epoch s), days = { "YYYY-MM-DD", ... } }:
-- the Beijing days from the copy's to the restore's not reconciled since
-- the restore (empty once each was: the bill job reaches back bill_days
-- only, so older ones are the operator's to run). Read by the start's
-- warning and the console's overview.
function _M.restored(db)
  local rows = db:query("SELECT at, evidence FROM paygate_audit WHERE"
    .. " subject = 'store' AND what = 'store.restored' ORDER BY seq DESC"
    .. " LIMIT 1")
  local r = rows and rows[1]
  local ev = r and require("paygate.json").decode(r.evidence or "")
  if type(ev) ~= "table" then return nil end
  local bill = require "paygate.reconcile.bill"
  local newest = tonumber(ev.copy_newest) or r.at / 1000
  local restored = tonumber(ev.restored_at) or r.at / 1000
  local open_days = {}
  local first = bill.bill_date(newest + 86400)
  local last = bill.bill_date(restored + 86400)
  local t = bill.day_start(first)
  while #open_days < 92 do
    local d = bill.bill_date(t + 86400)
    local done = db:query("SELECT 1 AS x FROM paygate_audit WHERE"
      .. " subject = $1 AND what = 'reconcile.bill' AND at > $2 LIMIT 1",
      { "reconcile:" .. d, r.at })
    if not (done and done[1]) then open_days[#open_days + 1] = d end
    if d >= last then break end
    t = t + 86400
  end
  return { copy_newest = newest, restored_at = restored, days = open_days }
end

--- syntax: boot.say_store_mode(path) -- path: the SQLite file, or nil
-- A warn line (once per generation) when others than its owner and
-- group may read or write the store or its WAL: with the chmod that ends
-- it. The start goes on.
function _M.say_store_mode(path)
  if not path or paygate.runtime.mode ~= "worker" then return end
  local open = {}
  for _, f in ipairs{ path, path .. "-wal", path .. "-shm" } do
    local _, _, mode = core.file_type(f)
    if mode and mode % 8 ~= 0 then
      open[#open + 1] = ("%s (%o)"):format(f, mode)
    end
  end
  if not open[1] or not _M.once("store_mode") then
    return
  end
  paygate.log.warn("gateway: the SQLite store can be read by every local"
    .. " user (payers' openids, amounts, the audit trail): made so by an"
    .. " earlier version, or by hand. Run: chmod o-rwx " .. path .. " "
    .. path .. "-wal " .. path .. "-shm", { files = open })
end

--- syntax: boot.say_restored(db)
-- Said at every start (once per generation) while boot.restored names
-- days to reconcile.
function _M.say_restored(db)
  if paygate.runtime.mode ~= "worker" then return end
  local info = _M.restored(db)
  if not (info and info.days[1]) or not _M.once("restored") then
    return
  end
  paygate.log.warn("gateway: this store was restored from a backup: it"
    .. " knows nothing done after " .. os.date("!%Y-%m-%dT%H:%M:%SZ",
    math.floor(info.copy_newest)) .. ". Payments and refunds made since are"
    .. " at WeChat only (their notifications are answered FAIL): run the"
    .. " bill reconciliation of " .. table.concat(info.days, ", ")
    .. " (the console's Reconcile, once WeChat has made each bill);"
    .. " their missing_local lines are those (docs/gateway.md, Backups"
    .. " and recovery)", { copy_newest = info.copy_newest,
                          restored_at = info.restored_at, days = info.days })
end

--- syntax: found = boot.unconfigured(db, by_mchid)
-- The merchants this store has open work of that the config no longer
-- lists (taken out of config.merchants): { [mchid] = { payments = n,
-- refunds = m } }, payments created, paying or unknown and refunds under
-- way; nil, err when the store fails. One indexed read of the open
-- payments, one read of the refunds.
function _M.unconfigured(db, by_mchid)
  local found = {}
  local rows, err = db:query("SELECT mchid, COUNT(*) AS n FROM gw_payments"
    .. " WHERE state IN ('created', 'paying', 'unknown') GROUP BY mchid")
  if not rows then return nil, err end
  for _, r in ipairs(rows) do
    if not by_mchid[r.mchid] then
      found[r.mchid] = { payments = tonumber(r.n), refunds = 0 }
    end
  end
  rows, err = db:query("SELECT p.mchid AS mchid, COUNT(*) AS n FROM"
    .. " gw_refunds r JOIN gw_payments p ON p.id = r.payment_id WHERE"
    .. " r.state IN ('created', 'processing', 'unknown', 'abnormal')"
    .. " GROUP BY p.mchid")
  if not rows then return nil, err end
  for _, r in ipairs(rows) do
    if not by_mchid[r.mchid] then
      found[r.mchid] = found[r.mchid] or { payments = 0, refunds = 0 }
      found[r.mchid].refunds = tonumber(r.n)
    end
  end
  return found
end

--- syntax: boot.say_unconfigured(found)
-- A merchant taken out of config.merchants while it still has open
-- payments or refunds under way is said at every start and reload (once
-- per generation): WeChat can still pay them, and their notifications
-- are now refused (404) while nothing here can close, query or refund
-- them.
function _M.say_unconfigured(found)
  if paygate.runtime.mode ~= "worker" or not next(found)
     or not _M.once("unconfigured") then
    return
  end
  local ids = {}
  for mchid in pairs(found) do ids[#ids + 1] = mchid end
  table.sort(ids)
  for _, mchid in ipairs(ids) do
    local f = found[mchid]
    paygate.log.warn("gateway: merchant " .. mchid .. " is no longer in"
      .. " config.merchants but has " .. f.payments .. " open payments and "
      .. f.refunds .. " refunds under way: WeChat may still pay or settle"
      .. " them, and their notifications are now refused (404, WeChat"
      .. " retries for a day), while nothing here can query, close or"
      .. " refund them. Add the merchant again and reload to take them up"
      .. " (docs/gateway.md, Adding and taking out a merchant)",
      { mchid = mchid, payments = f.payments, refunds = f.refunds })
  end
end

----------------------------------------------- what a reload changed

-- The merchants as a reload can change them, for the lines below: per
-- mchid, the serial requests are signed under, the WeChat Pay public key
-- id (public-key and migration mode), the verification mode and the
-- appids. No secret: a serial and a key id are sent in every request.
-- The APIv3 keys are told apart by a fingerprint each (below), kept with
-- the summary in the shared dictionary and never logged: a line names the
-- config keys and counts only.
local function sorted_keys(t)
  local ks = {}
  for k in pairs(t) do ks[#ks + 1] = k end
  table.sort(ks)
  return ks
end

-- An APIv3 key's fingerprint: 8 bytes of an HMAC under the key, enough to
-- tell a changed key, and nothing to learn the key from
local function fingerprint(key)
  local crypto = require "paygate.crypto"
  return crypto.hex(crypto.hmac("sha256", key,
                                "gateway reload: apiv3 key")):sub(1, 16)
end

-- c: a client's conf. returns: { current = fp, previous = { fp, ... },
-- names = { apiv3_key, previous_apiv3_keys } }, or nil (no client)
local function apiv3_summary(c)
  if type(c.apiv3_keys) ~= "table" or not c.apiv3_keys[1] then return nil end
  local prev = {}
  for i = 2, #c.apiv3_keys do prev[i - 1] = fingerprint(c.apiv3_keys[i]) end
  local names = c.key_names or {}
  return { current = fingerprint(c.apiv3_keys[1]), previous = prev,
           names = { apiv3_key = tostring(names.apiv3_key or "apiv3_key"),
                     previous_apiv3_keys = type(names.previous_apiv3_keys)
                       == "string" and names.previous_apiv3_keys
                       or "previous_apiv3_keys" } }
end

--- syntax: t = boot.merchant_summary(cfg, wx)
function _M.merchant_summary(cfg, wx)
  local t = {}
  for _, m in ipairs(cfg.merchants) do
    local c = wx[m.mchid] and wx[m.mchid].conf or {}
    t[m.mchid] = { merchant_serial = c.merchant_serial,
                   public_key_id = c.public_key_id, mode = c.mode,
                   appids = table.concat(sorted_keys(m.appids or {}), ","),
                   apiv3_keys = apiv3_summary(c) }
  end
  return t
end

-- What a reload changed of a merchant's APIv3 keys (a, b: apiv3_summary()s,
-- before and now), as a line naming the config keys and the counts, or
-- nil when nothing changed (or a summary lacks them: a generation before
-- they were kept)
local function apiv3_change(mchid, a, b)
  if type(a) ~= "table" or type(b) ~= "table" then return nil end
  local was = table.concat(a.previous or {}, ",")
  local now = table.concat(b.previous or {}, ",")
  local new_current = a.current ~= b.current
  if not new_current and was == now then return nil end
  local parts = {}
  if new_current then
    local moved = false
    for _, fp in ipairs(b.previous or {}) do
      if fp == a.current then moved = true end
    end
    parts[1] = "a new current key (" .. b.names.apiv3_key .. ")"
      .. (moved and ", the one before it now a previous key" or "")
  end
  local n_was, n_now = #(a.previous or {}), #(b.previous or {})
  if was ~= now then
    parts[#parts + 1] = (n_was == n_now and "previous keys changed, "
                         .. n_now or "previous keys " .. n_was .. " -> "
                         .. n_now) .. " (" .. b.names.previous_apiv3_keys
                         .. ")"
  end
  return { "gateway: reload: merchant " .. mchid .. ": APIv3 keys changed: "
    .. table.concat(parts, "; "),
    { mchid = mchid, change = "apiv3_keys", new_current = new_current,
      previous_from = n_was, previous_to = n_now } }
end

-- what each line names, in this order
local WATCHED = { "merchant_serial", "public_key_id", "mode", "appids" }

--- syntax: lines = boot.merchant_changes(before, now)
-- before, now: merchant_summary()s. returns: { { msg, fields }, ... },
-- one per merchant added or removed and one per watched value changed,
-- by mchid; empty when nothing changed.
function _M.merchant_changes(before, now)
  local out, all = {}, {}
  for mchid in pairs(before) do all[mchid] = true end
  for mchid in pairs(now) do all[mchid] = true end
  for _, mchid in ipairs(sorted_keys(all)) do
    local a, b = before[mchid], now[mchid]
    if not a then
      out[#out + 1] = { "gateway: reload: merchant " .. mchid .. " added"
        .. " (merchant_serial " .. tostring(b.merchant_serial) .. ")",
        { mchid = mchid, merchant_serial = b.merchant_serial,
          public_key_id = b.public_key_id, mode = b.mode,
          appids = b.appids } }
    elseif not b then
      out[#out + 1] = { "gateway: reload: merchant " .. mchid .. " removed",
                        { mchid = mchid } }
    else
      for _, k in ipairs(WATCHED) do
        if a[k] ~= b[k] then
          local from = a[k] == nil and "none" or tostring(a[k])
          local to = b[k] == nil and "none" or tostring(b[k])
          out[#out + 1] = { "gateway: reload: merchant " .. mchid .. ": "
            .. k .. " " .. from .. " -> " .. to,
            { mchid = mchid, change = k, from = a[k], to = b[k] } }
        end
      end
      out[#out + 1] = apiv3_change(mchid, a.apiv3_keys, b.apiv3_keys)
    end
  end
  return out
end

--- syntax: boot.say_merchant_changes(cfg, wx)
-- What a reload changed of the merchants, said once per generation (the
-- first of its workers to load says it), one info line per change, or
-- one saying that none changed; nothing at the server's start. Compared
-- with what the generation before (as it loaded) had, kept in the shared
-- dictionary, which outlives a reload. A worker restarted within a
-- generation says nothing again.
local SUMMARY_KEY = "gw:merchants_loaded"
function _M.say_merchant_changes(cfg, wx)
  local gen = paygate.runtime.generation
  if paygate.runtime.mode ~= "worker" or not gen then
    return
  end
  local json = require "paygate.json"
  local d = shared.get_dict("paygate")
  local now = _M.merchant_summary(cfg, wx)
  local kept = d:get(SUMMARY_KEY)
  local old = kept and json.decode(kept)
  if old and old.gen >= gen or not _M.once("merchant_changes") then
    return
  end
  d:set(SUMMARY_KEY, json.encode({ gen = gen, merchants = now }))
  if not old then
    return                      -- the server's start: nothing before it
  end
  local lines = _M.merchant_changes(old.merchants, now)
  for _, l in ipairs(lines) do
    paygate.log.info(l[1], l[2])
  end
  if #lines == 0 then
    local ids = sorted_keys(now)
    paygate.log.info("gateway: reload: no merchant changed (" .. #ids
      .. ": " .. table.concat(ids, ", ") .. ")", { merchants = #ids })
  end
end

return _M
