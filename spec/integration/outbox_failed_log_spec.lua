-- Every outbox sink that fails an attempt by returning its failure, in a
-- running server, logs it the same way: one warn line per failed attempt,
-- `outbox: a sink failed (the attempt failed)`, naming the sink, the event
-- and the attempt, with the error -- a hook's also the hook, a webhook's
-- its status (when it answered) and its URL's host, never the URL's
-- credentials nor the signing secret. (Was: a hook's failure alone had a
-- line; a webhook answering 500 or refused, a Redis stream whose Redis is
-- down, had none: the error only in the row's last_error, until the dead
-- letter.)
local json = require "paygate.json"
local server = require "support.server"
local servers = require "spec.support.servers"
local proc = require "support.proc"

local MSG = "outbox: a sink failed (the attempt failed)"

-- The app: one dispatcher with the sinks paygate.config.sinks names, every
-- retry at once, three attempts.
local APP = [[
local paygate = require "paygate"
local sql = require "paygate.sql"
local outbox = require "paygate.outbox"
local conf = paygate.config
local db = assert(sql.open("sqlite:" .. conf.db))
assert(outbox.setup(db))
local function on_paid(event)
  return nil, paygate.error("warehouse_busy", "cannot fulfil "
                            .. event.subject .. " yet", { retryable = true })
end
local sinks = {}
if conf.hooks then
  sinks[#sinks + 1] = outbox.hooks{ ["payment.paid"] = on_paid }
end
-- (the config is read-only: its arrays are read by index, not ipairs)
local i = 1
while conf.webhooks and conf.webhooks[i] do
  local w = conf.webhooks[i]
  sinks[#sinks + 1] = outbox.webhook{ name = w.name, url = w.url,
                                      secret = conf.secret, timeout = 5 }
  i = i + 1
end
if conf.redis then
  sinks[#sinks + 1] = outbox.redis_stream{ url = conf.redis,
    connect = { connect_timeout = 2, timeout = 2 } }
end
outbox.dispatcher(db, { sinks = sinks, interval = 0.05, backoff_base = 0.05,
                        backoff_cap = 0.1, max_attempts = 3 }):start()
paygate.route("POST", "/pay/:id", function(req)
  local id = assert(db:transaction(function(tx)
    return outbox.enqueue(tx, { subject = req.params.id,
                                type = "payment.paid", payload = {} })
  end))
  return 201, { id = id }
end)
]]

-- A receiver that is down: every POST answered 500 with its reason.
local DOWN = [[
local paygate = require "paygate"
paygate.route("POST", "/events", function()
  return 500, "receiver down"
end)
]]

-- the JSON log lines whose msg is msg
local function lines(text, msg)
  local out = {}
  for l in text:gmatch("[^\n]+") do
    local ok, t = pcall(json.decode, l)
    if ok and type(t) == "table" and t.msg == msg then out[#out + 1] = t end
  end
  return out
end

-- Starts the app with config, makes one event (subject pay_42), waits for
-- its dead letter; returns the event's id and the log's lines of MSG by
-- sink.
local function run(s_ref, config)
  local dir = server.tmpdir()
  config.db = dir .. "/o.db"
  s_ref.s = server.start{ source = APP, config = config }
  local s = s_ref.s
  local res = assert(s:request{ method = "POST", path = "/pay/pay_42" })
  assert.equal(201, res.status, res.body)
  proc.wait_until(function()
    return #lines(s:logs(), "outbox: dead letter") == 1
  end, 30, "the event's three attempts and its dead letter")
  local by = {}
  for _, l in ipairs(lines(s:logs(), MSG)) do
    by[l.sink] = by[l.sink] or {}
    table.insert(by[l.sink], l)
  end
  return tostring(json.decode(res.body).id), by, s:logs()
end

-- three lines, attempts 1..3, each of the event's fields
local function check(got, id, sink, logs)
  assert.equal(3, got and #got or 0, logs)
  for i, l in ipairs(got) do
    assert.same({ "warn", id, "payment.paid", "pay_42", i, sink },
                { l.level, l.id, l.type, l.subject, l.attempt, l.sink })
  end
end

describe("an outbox sink's failed attempt", function()
  local ref = {}
  local receiver
  after_each(function()
    if ref.s then ref.s:stop(); ref.s = nil end
    if receiver then receiver:stop(); receiver = nil end
  end)
  teardown(function() servers.stop_all() end)

  it("of a hook that returns nil, err is logged once per attempt, naming"
     .. " the hook", function()
    local id, by, logs = run(ref, { hooks = true })
    check(by.hooks, id, "hooks", logs)
    for _, l in ipairs(by.hooks) do
      assert.equal("warehouse_busy: cannot fulfil pay_42 yet", l.error)
      assert.matches("/app/app%.lua:7$", l.hook)
    end
  end)

  it("of a webhook answered 500, or refused, is logged once per attempt"
     .. " with its status and host, no credential", function()
    receiver = server.start{ source = DOWN }
    local refused = servers.pick_port()
    local secret = "sign-Secret-Qx71"
    local id, by, logs = run(ref, { secret = secret, webhooks = {
      { name = "webhook", url = "http://user:pw-Secret-Za93@127.0.0.1:"
          .. receiver.port .. "/events?token=tok-Secret-Lk02" },
      { name = "refused", url = "http://127.0.0.1:" .. refused .. "/e" },
      -- an "@" in the path (a token after it): no host is sure, none is
      -- shown (was: what follows the "@", taken for the host)
      { name = "path_at", url = "http://127.0.0.1:" .. refused
          .. "/hook/a@path-Secret-Vb55/e" } } })
    check(by.webhook, id, "webhook", logs)
    for _, l in ipairs(by.webhook) do
      assert.equal(500, l.status)
      assert.equal("127.0.0.1:" .. receiver.port, l.host)
      assert.equal("webhook_status: webhook: answered 500: receiver down",
                   l.error)
    end
    check(by.refused, id, "refused", logs)
    for _, l in ipairs(by.refused) do
      assert.is_nil(l.status)
      assert.equal("127.0.0.1:" .. refused, l.host)
      assert.matches("^webhook_failed: webhook: ", l.error)
    end
    check(by.path_at, id, "path_at", logs)
    for _, l in ipairs(by.path_at) do
      assert.is_nil(l.host)
    end
    for _, word in ipairs{ "pw-Secret", "tok-Secret", "path-Secret",
                           secret } do
      assert.is_nil(logs:find(word, 1, true), word)
    end
  end)

  it("of a Redis stream whose Redis is stopped is logged once per attempt",
     function()
    local r = servers.redis()
    r.stop()
    local id, by, logs = run(ref, { redis = r.url })
    check(by.redis, id, "redis", logs)
    for _, l in ipairs(by.redis) do
      assert.matches("^unavailable: ", l.error)
      assert.is_nil(l.status)
      assert.is_nil(l.host)
    end
  end)
end)
