-- An outbox hook that returns its failure (nil, err) in a running server:
-- each failed attempt is one warn line naming the sink, the hook, the
-- event and the attempt, with the hook's error (was: no line at all, the
-- error only in the row's last_error, until the dead letter).
local json = require "paygate.json"
local server = require "support.server"
local proc = require "support.proc"

local APP = [[
local paygate = require "paygate"
local sql = require "paygate.sql"
local outbox = require "paygate.outbox"
local db = assert(sql.open("sqlite:" .. paygate.config.db))
assert(outbox.setup(db))
local function on_paid(event)
  return nil, paygate.error("warehouse_busy", "cannot fulfil "
                            .. event.subject .. " yet", { retryable = true })
end
outbox.dispatcher(db, { sinks = { outbox.hooks{ ["payment.paid"] = on_paid } },
                        interval = 0.05, backoff_base = 0.05,
                        backoff_cap = 0.1, max_attempts = 3 }):start()
paygate.route("POST", "/pay/:id", function(req)
  local id = assert(db:transaction(function(tx)
    return outbox.enqueue(tx, { subject = req.params.id,
                                type = "payment.paid", payload = {} })
  end))
  return 201, { id = id }
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

describe("an outbox hook that returns nil, err", function()
  local s
  after_each(function() if s then s:stop(); s = nil end end)

  it("is logged once per failed attempt, at warn, naming the hook",
     function()
    local dir = server.tmpdir()
    s = server.start{ source = APP, config = { db = dir .. "/o.db" } }
    local res = assert(s:request{ method = "POST", path = "/pay/pay_42" })
    assert.equal(201, res.status, res.body)
    local id = tostring(json.decode(res.body).id)
    proc.wait_until(function()
      return #lines(s:logs(), "outbox: dead letter") == 1
    end, 20, "the event's three attempts and its dead letter")
    local got = lines(s:logs(), "outbox: a hook failed (the attempt failed)")
    assert.equal(3, #got, s:logs())
    for i, l in ipairs(got) do
      assert.same({ "warn", id, "payment.paid", "pay_42", i, "hooks" },
                  { l.level, l.id, l.type, l.subject, l.attempt, l.sink })
      assert.equal("warehouse_busy: cannot fulfil pay_42 yet", l.error)
      assert.matches("/app/app%.lua:6$", l.hook)
    end
  end)
end)
