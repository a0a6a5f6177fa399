-- examples/gateway: a late payment's automatic refund (on_late_payment =
-- "refund") is committed with the payment, then sent to WeChat after the
-- commit. A worker that dies in between leaves the refund `created` and
-- unknown to WeChat: the refund checks (gw/reconcile.lua) send it.
--
-- The crash is forced, not waited for: a copy of the app whose
-- payments.after kills its own worker (SIGKILL) the first time it is
-- handed a refund to send, i.e. right after the commit.
local testing = require "paygate.testing"
local audit = require "paygate.audit"
local core = dofile("examples/gateway/spec/core_support.lua")

local CRASH_HOOK = [=[

-- spec (refund_sweep_spec): the worker dies between the commit of a late
-- payment's refund and the call that sends it, once
do
  local ffi = require "ffi"
  pcall(ffi.cdef, "int getpid(void);")
  pcall(ffi.cdef, "int kill(int pid, int sig);")
  local mark = paygate.app_dir .. "/crashed"
  local inner = payments.after
  payments.after = function(list)
    for _, w in ipairs(list or {}) do
      local f = w.refund and io.open(mark, "rb")
      if f then f:close() end
      if w.refund and not f then
        f = assert(io.open(mark, "wb"))
        f:write(w.refund)
        f:close()
        ffi.C.kill(ffi.C.getpid(), 9)
      end
    end
    return inner(list)
  end
end
]=]

local function read(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s
end

describe("gateway: a late refund whose worker died before the call",
         function()
  local sim, gw, dir

  setup(function()
    sim = testing.simulator{ time_scale = 100 }
    dir = testing.tmpdir()
    os.execute("cp -r examples/gateway/app.lua examples/gateway/gw"
               .. " examples/gateway/migrations '" .. dir .. "/'")
    local f = assert(io.open(dir .. "/app.lua", "ab"))
    f:write(CRASH_HOOK)
    f:close()
    gw = core.start(sim, { app = dir, workers = 1, gateway = {
      reconcile = { check_after = 1, first = 0.5, ceiling = 1,
                    interval = 0.1, lease_ttl = 2, bill = false } } })
  end)

  teardown(function()
    if gw then gw:stop() end
    testing.stop_all()
    if dir then require("paygate.testing.server").rmdir(dir) end
  end)

  it("is sent by the refund checks", function()
    local p = gw:create{ amount = 90 }
    -- the close is told "no such order": the order stays payable
    sim:fault{ endpoint = "close", kind = "error", status = 404,
               code = "ORDER_NOT_EXIST", count = 1 }
    local res = gw:call("POST", "/v1/payments/" .. p.id .. "/close")
    assert.equal(200, res.status, res.body)
    sim:pay(p.out_trade_no)
    -- the worker applied the payment, committed the refund, and died
    local refund_id
    testing.wait_until(function()
      refund_id = read(dir .. "/crashed")
      return refund_id ~= nil and refund_id ~= ""
    end, 20, "the worker killed after the commit")
    local rf = assert(gw.db:query("SELECT * FROM gw_refunds WHERE id = $1",
                                  { refund_id }))[1]
    assert.equal("late_payment", rf.kind)
    assert.equal(90, rf.amount)
    -- the restarted worker's refund checks find it unknown to WeChat and
    -- send it
    testing.wait_until(function()
      local r = assert(gw.db:query("SELECT state FROM gw_refunds WHERE id"
                                   .. " = $1", { refund_id }))[1]
      return r.state == "processing"
    end, 30, "the refund sent")
    local at = assert(sim:client():query_refund(rf.out_refund_no))
    assert.equal("PROCESSING", at.status)
    assert.equal(90, at.amount.refund)
    local e = audit.entries(gw.db, "refund:" .. refund_id)
    assert.equal("refund.accepted", e[#e].what)
    assert.equal("reconcile", e[#e].actor)
    -- and it completes like any other
    sim:settle(rf.out_refund_no)
    gw:wait_state(p.id, "refunded", 20)
    assert.is_true((audit.verify(gw.db, "payment:" .. p.id)))
  end)
end)
