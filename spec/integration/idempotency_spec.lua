-- paygate.idempotency behind a real `paygate run`, with paygate.apikey in
-- front, on SQLite and PostgreSQL: replay byte for byte, 422, 409 while a
-- handler waits on a condition this spec releases, a worker killed
-- mid-request and the repeat after its lease, two workers racing one key.
local paygate = require "paygate"
local core = require "paygate.core"
local sql = require "paygate.sql"
local json = require "paygate.json"
local apikey = require "paygate.apikey"
local proc = require "support.proc"
local server = require "support.server"
local servers = require "spec.support.servers"

local tmp = servers.mktemp()
local pg_srv

teardown(function()
  servers.stop_all()
  servers.sh("rm -rf " .. tmp)
end)

-- The app: every POST under /v1/ is signed and idempotent. Handlers
-- store their effect (a row in runs) and their response in one
-- transaction. /v1/slow waits until the spec creates its release file;
-- /v1/doomed waits while its hold file exists (the spec kills the worker
-- meanwhile), with a short lease.
local APP = [[
local paygate = require "paygate"
local core = require "paygate.core"
local sql = require "paygate.sql"
local idem = require "paygate.idempotency"
local apikey = require "paygate.apikey"

local conf = paygate.config.spec
local db = assert(sql.open(conf.db))
paygate.before(apikey.before_hook(db, { prefix = "/v1/" }))
paygate.after(function(req, res)
  res.headers = res.headers or {}
  res.headers["X-Worker"] = tostring(core.pid())
end)

paygate.route("GET", "/stats", function()
  return 200, { apikey = apikey.stats("all"), idem = idem.stats() }
end)

local function exists(path)
  local f = io.open(path)
  if f then f:close() end
  return f ~= nil
end

local function wait_for(cond, secs)
  local deadline = core.time() + secs
  while not cond() do
    if core.time() > deadline then return false end
    paygate.sleep(0.01)
  end
  return true
end

local function effect(req, ik, extra)
  local key = req:header("idempotency-key")
  return db:transaction(function(tx)
    assert(tx:exec("INSERT INTO runs (app_id, k, body, pid) VALUES"
                   .. " ($1, $2, $3, $4)",
                   { req.app_id, key, req.body, core.pid() }))
    local rows = assert(tx:query("SELECT COUNT(*) AS n FROM runs"))
    return ik:respond(tx, 201, { key = key, pid = core.pid(),
                                 runs = rows[1].n, extra = extra,
                                 nonce = require("paygate.crypto")
                                           .random_nonce(16) },
                      { ["X-Stored"] = "yes" })
  end)
end

paygate.route("POST", "/v1/payments", idem.wrap(db, function(req, ik)
  -- every call of the handler, effects or not, leaves a line
  local f = io.open(conf.dir .. "/calls-" .. req:header("idempotency-key"),
                    "a")
  f:write(core.pid(), "\n") f:close()
  paygate.sleep(0.02)            -- widens the window racers meet in
  return effect(req, ik)
end))

paygate.route("POST", "/v1/slow", idem.wrap(db, function(req, ik)
  local key = req:header("idempotency-key")
  local f = io.open(conf.dir .. "/started-" .. key, "w")
  f:write(core.pid()) f:close()
  if not wait_for(function()
    return exists(conf.dir .. "/release-" .. key)
  end, 20) then
    return 500, { error = "never released" }
  end
  return effect(req, ik, "slow")
end, { lease = 30 }))

-- stores its response with ik:respond, then rolls the transaction back
-- (as a failed COMMIT would) unless the spec made its commit file
paygate.route("POST", "/v1/rolled", idem.wrap(db, function(req, ik)
  local key = req:header("idempotency-key")
  local ok = db:transaction(function(tx)
    ik:respond(tx, 201, { created = key })
    if not exists(conf.dir .. "/commit-" .. key) then
      return nil, paygate.error("busy", "stands in for a failed commit")
    end
    return true
  end)
  if not ok then return 503, { error = "unavailable" } end
  return ok
end))

paygate.route("POST", "/v1/doomed", idem.wrap(db, function(req, ik)
  local key = req:header("idempotency-key")
  local f = io.open(conf.dir .. "/started-" .. key, "w")
  f:write(core.pid()) f:close()
  wait_for(function()
    return not exists(conf.dir .. "/hold-" .. key)
  end, 60)
  return effect(req, ik, "doomed")
end, { lease = conf.lease }))
]]

local function write(path, text)
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
end

local function read(path)
  local f = io.open(path)
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s
end

local engines = {
  sqlite = function(dir) return "sqlite:" .. dir .. "/gw.db" end,
}
if servers.have_postgres() then
  engines.postgres = function()
    pg_srv = pg_srv or servers.postgres()
    local db = assert(sql.open(pg_srv.url))
    assert(db:exec_script("DROP TABLE IF EXISTS paygate_idempotency;"
      .. " DROP TABLE IF EXISTS paygate_api_keys; DROP TABLE IF EXISTS runs"))
    db:close()
    return pg_srv.url
  end
end

local LEASE = 3          -- s: /v1/doomed's lease

for name, engine in pairs(engines) do
  describe("idempotency over HTTP on " .. name, function()
    local srv, srv2, db, key, dir, n

    setup(function()
      n = 0
      dir = servers.mktemp()
      local url = engine(dir)
      db = assert(sql.open(url))
      key = assert(apikey.create(db, "shop1"))
      -- made here: two workers' CREATE TABLE IF NOT EXISTS race on
      -- PostgreSQL
      assert(db:exec("CREATE TABLE runs (app_id TEXT, k TEXT, body TEXT,"
                     .. " pid INTEGER)"))
      local conf = string.format(
        "return { spec = { db = %q, dir = %q, lease = %d } }",
        url, dir, LEASE)
      srv = server.start{ source = APP, workers = 2, config = conf }
      -- a second instance on the same store, as a second gateway host
      srv2 = server.start{ source = APP, workers = 1, config = conf }
    end)
    teardown(function()
      if srv then srv:stop() end
      if srv2 then srv2:stop() end
      db:close()
      servers.sh("rm -rf " .. dir)
    end)

    local function post(path, ikey, body, timeout, via)
      local h = apikey.sign{ app_id = key.app_id, key_id = key.key_id,
                             secret = key.secret, method = "POST",
                             path = path, body = body,
                             idempotency_key = ikey }
      h["Content-Type"] = "application/json"
      return (via or srv):request{ method = "POST", path = path, body = body,
                          headers = h, timeout = timeout or 10 }
    end

    local function runs(k)
      return assert(db:query("SELECT pid, body FROM runs WHERE k = $1",
                             { k }))
    end

    it("refuses an unsigned POST with 401 before any record", function()
      local res = assert(srv:request{ method = "POST", path = "/v1/payments",
        body = "{}", headers = { ["Idempotency-Key"] = "u1" } })
      assert.equal(401, res.status)
      assert.equal("missing_signature", json.decode(res.body).error)
      -- counted where every worker's refusals add up
      local st = assert(srv:request("/stats"))
      assert.equal(1, json.decode(st.body).apikey.missing_signature)
    end)

    it("refuses a repeated Authorization or Idempotency-Key, before any"
       .. " record", function()
      local rawtcp = require "support.rawtcp"
      local body = "{}"
      local function raw(extra, ikeys)
        local h = apikey.sign{ app_id = key.app_id, key_id = key.key_id,
                               secret = key.secret, method = "POST",
                               path = "/v1/payments", body = body,
                               idempotency_key = ikeys[1] }
        local lines = { "POST /v1/payments HTTP/1.1", "Host: x",
                        "Connection: close", "Content-Length: 2",
                        "Authorization: " .. h.Authorization }
        for _, k in ipairs(ikeys) do
          lines[#lines + 1] = "Idempotency-Key: " .. k
        end
        for _, l in ipairs(extra) do lines[#lines + 1] = l end
        local c = assert(rawtcp.connect(srv.port, 5))
        c:send(table.concat(lines, "\r\n") .. "\r\n\r\n" .. body)
        local out = c:recv_all()
        c:close()
        return tonumber(out:match("^HTTP/1.1 (%d+)")), out
      end
      -- the one signed, and another
      local status, out = raw({}, { "rep-1", "rep-2" })
      assert.equal(401, status, out)
      assert.truthy(out:find('"malformed_signature"', 1, true), out)
      -- a second Authorization
      status, out = raw({ "Authorization: Bearer x" }, { "rep-3" })
      assert.equal(401, status, out)
      assert.truthy(out:find('"malformed_signature"', 1, true), out)
      for _, k in ipairs{ "rep-1", "rep-2", "rep-3" } do
        assert.equal(0, #runs(k))
      end
      -- once each: accepted
      status, out = raw({}, { "rep-4" })
      assert.equal(201, status, out)
    end)

    it("answers 400 for a bad key", function()
      local res = assert(post("/v1/payments", ("k"):rep(256), "{}"))
      assert.equal(400, res.status)
      assert.equal("invalid_idempotency_key", json.decode(res.body).error)
      res = assert(post("/v1/payments", nil, "{}"))
      assert.equal(400, res.status)
      assert.equal("missing_idempotency_key", json.decode(res.body).error)
    end)

    it("replays status, headers and body byte for byte; 422 on another "
       .. "body", function()
      local body = '{"total":100,"note":"caf\195\169 \\u00e9"}'
      local first = assert(post("/v1/payments", "pay-1", body))
      assert.equal(201, first.status)
      assert.equal("yes", first.headers["x-stored"])
      assert.is_nil(first.headers["idempotent-replayed"])
      for _ = 1, 3 do
        local again = assert(post("/v1/payments", "pay-1", body))
        assert.equal(201, again.status)
        assert.equal(first.body, again.body)
        assert.equal("yes", again.headers["x-stored"])
        assert.equal(first.headers["content-type"],
                     again.headers["content-type"])
        assert.equal("true", again.headers["idempotent-replayed"])
      end
      assert.equal(1, #runs("pay-1"))
      local other = assert(post("/v1/payments", "pay-1", '{"total":101}'))
      assert.equal(422, other.status)
      assert.equal("idempotency_key_reused", json.decode(other.body).error)
      assert.equal(1, #runs("pay-1"))
    end)

    it("never sends a stored response whose transaction rolled back",
       function()
      local first = assert(post("/v1/rolled", "rolled-1", "{}"))
      assert.equal(503, first.status, first.body)
      assert.equal("unavailable", json.decode(first.body).error)
      -- the record was released, not left running: the repeat runs now
      write(dir .. "/commit-rolled-1", "")
      local again = assert(post("/v1/rolled", "rolled-1", "{}"))
      assert.equal(201, again.status, again.body)
      assert.equal("rolled-1", json.decode(again.body).created)
      assert.is_nil(again.headers["idempotent-replayed"])
      local third = assert(post("/v1/rolled", "rolled-1", "{}"))
      assert.equal(again.body, third.body)
      assert.equal("true", third.headers["idempotent-replayed"])
    end)

    it("answers 409 while the first request still runs", function()
      local task = paygate.spawn(function()
        return post("/v1/slow", "slow-1", '{"a":1}', 30)
      end)
      assert(proc.wait_until(function()
        return read(dir .. "/started-slow-1") ~= nil
      end, 15, "the slow handler to start"))
      for _ = 1, 3 do
        local busy = assert(post("/v1/slow", "slow-1", '{"a":1}'))
        assert.equal(409, busy.status)
        assert.equal("idempotency_in_flight", json.decode(busy.body).error)
        assert.is_true(tonumber(busy.headers["retry-after"]) >= 1)
      end
      write(dir .. "/release-slow-1", "go")
      local first = assert(task:wait())
      assert.equal(201, first.status)
      local again = assert(post("/v1/slow", "slow-1", '{"a":1}'))
      assert.equal(201, again.status)
      assert.equal(first.body, again.body)
      assert.equal(1, #runs("slow-1"))
    end)

    it("lets a repeat run again once a killed worker's lease is over",
       function()
      local k = "doomed-1"
      write(dir .. "/hold-" .. k, "hold")
      local task = paygate.spawn(function()
        return post("/v1/doomed", k, '{"b":2}', 30)
      end)
      assert(proc.wait_until(function()
        return read(dir .. "/started-" .. k) ~= nil
      end, 15, "the doomed handler to start"))
      local pid = tonumber(read(dir .. "/started-" .. k))
      local rows = assert(db:query("SELECT lease_until FROM"
        .. " paygate_idempotency WHERE idem_key = $1", { k }))
      local lease_until = rows[1].lease_until
      local busy = assert(post("/v1/doomed", k, '{"b":2}'))
      if core.time() < lease_until then
        assert.equal(409, busy.status)
      end
      proc.kill_pid(pid, proc.SIGKILL)
      -- the client sees the connection die; libcurl may resend the
      -- request on a fresh connection (to the other worker), which is
      -- refused while the lease holds
      local res, err = task:wait()
      if res then
        assert.equal(409, res.status)
      else
        assert.is_truthy(err)
      end
      os.remove(dir .. "/hold-" .. k)
      -- repeats: 409 until the lease is over, then the handler runs again
      local final
      assert(proc.wait_until(function()
        local r = assert(post("/v1/doomed", k, '{"b":2}'))
        if r.status == 409 then
          -- (the margin covers a slow answer on a loaded machine)
          assert.is_true(core.time() < lease_until + 5,
                         "still 409 well after the lease")
          return false
        end
        final = r
        return true
      end, 20, "a repeat after the lease"))
      assert.equal(201, final.status)
      assert.is_true(core.time() >= lease_until)
      local body = json.decode(final.body)
      assert.equal("doomed", body.extra)
      assert.not_equal(pid, body.pid)
      local r = runs(k)
      assert.equal(1, #r)          -- the killed run left no effect
      local again = assert(post("/v1/doomed", k, '{"b":2}'))
      assert.equal(final.body, again.body)
    end)

    it("logs refusals without a secret, signing key or signature",
       function()
      local h = apikey.sign{ app_id = key.app_id, key_id = key.key_id,
                             secret = key.secret, method = "POST",
                             path = "/v1/payments", body = "{}",
                             idempotency_key = "logged-1" }
      local sig = h.Authorization:match('signature="(%x+)"')
      local res = assert(srv:request{ method = "POST", path = "/v1/payments",
                                      body = "{ }", headers = h })
      assert.equal(401, res.status)
      assert.equal("bad_signature", json.decode(res.body).error)
      local logs
      assert(proc.wait_until(function()
        logs = srv:logs()
        return logs:find('"reason":"bad_signature"', 1, true)
      end, 10, "the refusal in the log"))
      local signing = require("paygate.crypto").hex(
        apikey.signing_key(key.secret))
      for _, s in ipairs({ key.secret, key.secret:sub(4), signing, sig }) do
        assert.is_nil(logs:find(s, 1, true))
      end
    end)

    it("runs the handler once when many requests race on two instances",
       function()
      local pids = {}
      for round = 1, 5 do
        local k = "race-" .. round
        local tasks = {}
        for i = 1, 12 do
          tasks[i] = paygate.spawn(function()
            return post("/v1/payments", k, '{"r":' .. round .. '}', 20,
                        i % 2 == 0 and srv2 or srv)
          end)
        end
        local created, busy, body = 0, 0, nil
        for i = 1, 12 do
          local res = assert(tasks[i]:wait())
          pids[res.headers["x-worker"]] = true
          if res.status == 201 then
            created = created + 1
            body = body or res.body
            assert.equal(body, res.body)
          else
            assert.equal(409, res.status)
            busy = busy + 1
          end
        end
        assert.is_true(created >= 1)
        assert.equal(12, created + busy)
        assert.equal(1, #runs(k))
        local calls = read(dir .. "/calls-" .. k)
        assert.equal(1, select(2, calls:gsub("\n", "")), "handler calls")
        local after = assert(post("/v1/payments", k, '{"r":' .. round .. '}'))
        assert.equal(body, after.body)
      end
      local w = 0
      for _ in pairs(pids) do w = w + 1 end
      assert.is_true(w >= 2, "racers were answered by one process")
    end)
  end)
end
