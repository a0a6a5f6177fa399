-- The model of examples/gateway/spec/model_spec.lua (read its header for
-- what it drives and checks), shared with model_cluster_spec.lua: the
-- operations, the model kept of each payment, and the checks.
--
--   local model = dofile("examples/gateway/spec/model_support.lua")
--   local m = model.new{ sim = sim, wx = sim:client(), gw = gw, seed = SEED,
--                        name = "model_spec", instances = { gw.srv } }
--   m.run(N)          -- N payments through random operations, then the
--                     -- final checks
--
-- gw is what the model calls: gw:call (core_support's), gw.db (the store,
-- for the checks), gw.db_url (scripts/verify.lua); instances: the gateway
-- servers whose degradation switch the model turns (each its own; gw's
-- own server unless given). m.log(...), m.check(cond, msg) and
-- m.fail(msg) add to and report with the model's trace; m.posts: every
-- POST made.
--
-- Two options widen it; without them the operations, their draws and
-- their checks are the same for a seed as before they existed:
--   reconcile = true   the gateway runs its reconcile runners (give it
--                      short intervals: model_reconcile_spec.lua). Before
--                      each step's check the model waits (a condition
--                      with a deadline) until nothing is left for the
--                      checks to apply (the payment's current attempt
--                      paid, failed or closed at WeChat but open here, an
--                      `unknown` WeChat has an answer for, money on an
--                      attempt not applied, a refund `created` / `unknown`
--                      or settled at WeChat but not here), and expects
--                      what the checks make of it. New operations are
--                      drawn besides the others: a payment paid with its
--                      notification dropped (ends paid by query, once);
--                      a refund (or an abnormal refund applied for)
--                      settled with its notification dropped (ends
--                      settled by query); a failed payment paid before
--                      the checks closed its attempt, its notification
--                      dropped (found by them: late, refunded); a switch
--                      whose prepay answer does not verify (`unknown`,
--                      then `paying`, or `paid` once paid) or whose
--                      prepay never reached WeChat (`unknown` until it
--                      expires); a refund whose answer is lost
--                      (`unknown`, then `processing` by query, sent again
--                      when WeChat does not have it); a payment past its
--                      expiry (closed at both sides by the checks, also
--                      when their first close fails or the merchant
--                      closes it at once; a switch refused; a payment on
--                      it then refused by WeChat; or paid while the
--                      checks' close is held or failing: paid, once, not
--                      late). An early payment's first operation is one
--                      of these half the time (their own generator).
--   trace = path       where the steps go (default: $MODEL_TRACE)
--   sub_mchid = "..."  partner mode: the gateway's merchant is a service
--                      provider (core.start's partner); every payment is
--                      made for that sub-merchant, and the model's own
--                      queries name it.
local testing = require "paygate.testing"
local core = require "paygate.core"
local json = require "paygate.json"
local crypto = require "paygate.crypto"
local audit = require "paygate.audit"
local fsm = require "paygate.fsm"
local support = dofile("examples/gateway/spec/core_support.lua")
local seeded = dofile("examples/gateway/spec/seeded.lua")
local rng = seeded.rng

local _M = {}

-- what the docs say each status may carry as `error`
local ERRORS = {
  [400] = { invalid_request = true, invalid_json = true,
            missing_idempotency_key = true, invalid_idempotency_key = true },
  [401] = { missing_signature = true, malformed_signature = true,
            unknown_app = true, revoked_key = true,
            stale_timestamp = true, bad_signature = true },
  [404] = { not_found = true },
  [409] = { payment_exists = true, payment_paid = true, invalid_state = true,
            payment_expired = true, conflict = true,
            idempotency_in_flight = true },
  [422] = { idempotency_key_reused = true, refund_exceeds_paid = true },
  [502] = { wechat_error = true },
  [503] = { degraded = true, unavailable = true },
  [504] = { timeout = true },
}
local OK = { [200] = true, [201] = true }

local LEGAL = {}      -- machine -> "from>to" -> true
for _, m in ipairs({ fsm.payment, fsm.refund }) do
  local t = {}
  for _, tr in ipairs(m.transitions) do
    local froms = type(tr.from) == "table" and tr.from or { tr.from }
    for _, f in ipairs(froms) do t[f .. ">" .. tr.to] = true end
  end
  LEGAL[m.name] = t
end

-- audit entries that change no state (docs/gateway.md, The audit trail)
local NOT_TRANSITIONS = { ["payment.attempt"] = true,
                          ["payment.alarm"] = true,
                          ["payment.duplicate_paid"] = true }
local PAY_EVENTS = { paying = true, paid = true, closed = true, failed = true,
                     unknown = true, partially_refunded = true,
                     refunded = true }
local REFUND_EVENTS = { succeeded = true, abnormal = true, closed = true,
                        failed = true }

function _M.new(o)
  local sim, gw, wx, SEED = o.sim, o.gw, o.wx, o.seed
  local NAME = o.name or "model_spec"
  local instances = o.instances or { gw.srv }
  local TRACE = o.trace or os.getenv("MODEL_TRACE")
  local REC = o.reconcile and true or false
  local SUB = o.sub_mchid
  local trace = {}
  local function log(...)
    local parts = {}
    for i = 1, select("#", ...) do parts[i] = tostring((select(i, ...))) end
    trace[#trace + 1] = table.concat(parts, " ")
  end
  local function fail(msg)
    local f = io.open(TRACE or "/dev/null", "w")
    if f then f:write(table.concat(trace, "\n"), "\n") f:close() end
    error(msg .. "\nseed " .. SEED .. "; last steps:\n"
          .. table.concat(trace, "\n", math.max(1, #trace - 40)), 2)
  end
  local function check(cond, msg)
    if not cond then fail(msg) end
  end

  -- every POST made: { path, body, key, status, text }
  local posts = {}

  -- WeChat's word on an order (the sub-merchant's in partner mode)
  local function trade(no)
    return wx:query_by_out_trade_no(no, SUB)
  end

  local function shape(what, res)
    check(res, what .. ": no answer")
    if OK[res.status] then
      check(res.json, what .. ": " .. res.status .. " not JSON: "
            .. tostring(res.body))
      return res
    end
    local errs = ERRORS[res.status]
    check(errs, what .. ": undocumented status " .. res.status .. " "
          .. tostring(res.body))
    check(res.json and type(res.json.error) == "string"
          and errs[res.json.error], what .. ": " .. res.status
          .. " with an undocumented error shape: " .. tostring(res.body))
    check(type(res.json.message) == "string", what .. ": " .. res.status
          .. " without a message: " .. tostring(res.body))
    return res
  end

  local function post(path, body)
    local text = json.encode(body or {})
    local key = "k-" .. crypto.random_nonce(16)
    local res = gw:call("POST", path, text, { ["Idempotency-Key"] = key })
    shape("POST " .. path, res)
    posts[#posts + 1] = { path = path, text = text, key = key,
                          status = res.status, body = res.body }
    log("POST", path, text, "->", res.status, res.json and res.json.error
        or (res.json and (res.json.state or (res.json.payment
            and res.json.payment.state))) or "")
    return res
  end

  local function get(id, q)
    local res = gw:call("GET", "/v1/payments/" .. id .. (q or ""))
    shape("GET " .. id, res)
    check(res.status == 200, "GET " .. id .. ": " .. res.status)
    return res.json
  end

  local function control(method, path, body)
    local res = assert(sim.srv:request{ method = method, path = path,
                                        json = body, timeout = 15 })
    log("sim", method, path, body and json.encode(body) or "", "->",
        res.status, res.headers and res.headers["x-sim-notified"] or "")
    return res
  end

  -- a kept answer replayed byte for byte; a new body under the key is 422
  local function replay(p)
    -- (docs/gateway.md, Idempotency-Key: a refund's answers are kept but
    -- a 503 or a 400; a create's, a switch's or a close's but a 5xx or a
    -- 400.) One not kept would run again, behind the model's back.
    local kept = p.status ~= 503 and p.status ~= 400
      and (p.path:match("/refunds$") or p.status < 500)
    if not kept then return end
    local res = gw:call("POST", p.path, p.text,
                        { ["Idempotency-Key"] = p.key })
    shape("replay " .. p.path, res)
    check(res.headers["idempotent-replayed"] == "true", "a replay of "
          .. p.path .. " without Idempotent-Replayed")
    do
      check(res.status == p.status and res.body == p.body, "replay of "
            .. p.path .. " " .. p.text .. ": " .. p.status .. " " .. p.body
            .. " then " .. res.status .. " " .. res.body)
      local other = p.text:sub(1, -2) .. ',"zz_other":1}'
      if p.text == "{}" then other = '{"zz_other":1}' end
      local r2 = gw:call("POST", p.path, other,
                         { ["Idempotency-Key"] = p.key })
      shape("reuse " .. p.path, r2)
      check(r2.status == 422 and r2.json.error == "idempotency_key_reused",
            "a kept key with another body: " .. r2.status .. " " .. r2.body)
    end
  end

  ------------------------------------------------------------ invariants

  local function refunds_of(id)
    return assert(gw.db:query("SELECT * FROM gw_refunds WHERE payment_id"
                              .. " = $1 ORDER BY created_at, id", { id }))
  end

  local function check_money(m, p)
    check(p.refunded >= 0 and p.refunded <= p.amount, m.id .. ": refunded "
          .. p.refunded .. " of " .. p.amount)
    local succeeded, counted = 0, 0
    for _, r in ipairs(refunds_of(m.id)) do
      if r.kind ~= "duplicate" then
        if r.state == "succeeded" then succeeded = succeeded + r.amount end
        if r.state ~= "failed" and r.state ~= "closed" then
          counted = counted + r.amount
        end
      end
    end
    check(succeeded == p.refunded, m.id .. ": refunded " .. p.refunded
          .. " but the succeeded refunds sum to " .. succeeded)
    check(counted <= p.amount, m.id .. ": refunds counting " .. counted
          .. " of " .. p.amount)
    if p.state == "refunded" then
      check(p.refunded == p.amount, m.id .. ": refunded with "
            .. p.refunded .. " of " .. p.amount)
    elseif p.state == "partially_refunded" then
      check(p.refunded > 0 and p.refunded < p.amount, m.id
            .. ": partially_refunded with " .. p.refunded)
    elseif p.state ~= "paid" then
      check(p.refunded == 0, m.id .. ": " .. p.state .. " with refunded "
            .. p.refunded)
    end
  end

  -- the simulator's word on each attempt (the model follows it after an
  -- operation whose outcome a fault left open)
  local function sync(m, p)
    for _, a in ipairs(p.attempts) do
      local t = trade(a.out_trade_no)
      local ts = t and t.trade_state or "NONE"
      if ts == "REFUND" then ts = "SUCCESS" end
      m.sim[a.out_trade_no] = ts
    end
  end

  -- (reconcile) what the checks still have to apply to the payment, by
  -- WeChat's word: nil when nothing, else what
  local OPEN_P = { created = true, paying = true, unknown = true }
  local PAID_AT = { SUCCESS = true, REFUND = true }
  local REFUND_AS = { PROCESSING = "processing", SUCCESS = "succeeded",
                      ABNORMAL = "abnormal", CLOSED = "closed" }
  local function unsettled(m)
    local p = get(m.id)
    for _, a in ipairs(p.attempts) do
      local t = trade(a.out_trade_no)
      local ts = t and t.trade_state or "NONE"
      if a.out_trade_no == p.out_trade_no and OPEN_P[p.state] then
        if PAID_AT[ts] or ts == "PAYERROR" or ts == "CLOSED" then
          return p.state .. " on " .. a.out_trade_no .. ", " .. ts
                 .. " at WeChat"
        end
        if p.state == "unknown" and (ts == "NOTPAY" or ts == "USERPAYING")
        then
          return "unknown, " .. ts .. " at WeChat"
        end
      elseif PAID_AT[ts] and a.state ~= "paid" then
        return "attempt " .. a.out_trade_no .. " " .. a.state .. ", " .. ts
               .. " at WeChat"
      end
    end
    for _, r in ipairs(p.refunds) do
      if r.state == "created" or r.state == "unknown" then
        return "refund " .. r.id .. " " .. r.state
      end
      if r.state == "processing" or r.state == "abnormal" then
        local x = wx:query_refund(r.out_refund_no, SUB)
        local want = x and REFUND_AS[x.status]
        if want and want ~= r.state and not (r.state == "abnormal"
                                             and want == "processing") then
          return "refund " .. r.id .. " " .. r.state .. ", " .. x.status
                 .. " at WeChat"
        end
      end
    end
  end

  -- (reconcile) waits until the checks have applied what WeChat says;
  -- the model then expects what they make of it: a payment failed at
  -- WeChat failed here; an `unknown` (payment or refund) is taken as it
  -- ends (the final checks judge its transitions)
  local function settle_checks(m)
    local why
    local ok, err = pcall(testing.wait_until, function()
      why = unsettled(m)
      return why == nil
    end, 30, m.id .. ": the reconcile checks")
    if not ok then fail(tostring(err) .. ": " .. tostring(why)) end
    if m.state == "unknown" then m.state = nil end
    if (m.state == "paying" or m.state == "created")
       and m.sim[m.no] == "PAYERROR" then
      m.state = "failed"
    end
    for _, rf in pairs(m.refunds) do
      if rf.state == "created" or rf.state == "unknown" then rf.state = nil end
    end
  end

  local function step_check(m)
    if m.pending then m.state = nil end  -- its notification may come now
    if REC then settle_checks(m) end
    local p = get(m.id)
    check_money(m, p)
    if m.state then
      check(p.state == m.state, m.id .. ": state " .. p.state
            .. ", the model says " .. m.state)
    else
      log("adopt", m.id, p.state)
      m.state = p.state
    end
    check(p.out_trade_no == m.no or m.no == nil, m.id .. ": on "
          .. p.out_trade_no .. ", the model says " .. tostring(m.no))
    m.no = p.out_trade_no
    for _, r in ipairs(p.refunds) do
      local want = m.refunds[r.id]
      if want and want.state then
        check(r.state == want.state, r.id .. ": state " .. r.state
              .. ", the model says " .. want.state)
      elseif want then
        want.state = r.state
      elseif r.kind ~= "merchant" then
        m.refunds[r.id] = { id = r.id, no = r.out_refund_no,
                            amount = r.amount, kind = r.kind,
                            state = r.state }
      else
        fail(r.id .. ": a refund the model does not know")
      end
    end
    sync(m, p)
    return p
  end

  local function chain(subject)
    return assert(gw.db:query("SELECT what, from_state, to_state FROM"
      .. " paygate_audit WHERE subject = $1 ORDER BY seq", { subject }))
  end

  local function transitions(machine, subject)
    local list, last = {}, nil
    for _, e in ipairs(chain(subject)) do
      if e.to_state ~= nil and e.to_state ~= json.null
         and not NOT_TRANSITIONS[e.what] then
        local from = e.from_state ~= json.null and e.from_state or nil
        if from ~= nil then
          check(LEGAL[machine][from .. ">" .. e.to_state], subject
                .. ": illegal transition " .. from .. " -> " .. e.to_state)
        end
        check(from == last, subject .. ": a transition from "
              .. tostring(from) .. " after one to " .. tostring(last))
        last = e.to_state
        list[#list + 1] = e.to_state
      end
    end
    return list, last
  end

  local function final_check(m)
    local p = get(m.id)
    check_money(m, p)
    -- money taken at WeChat is never dropped: each attempt paid there is
    -- paid here, and so is the payment
    for _, a in ipairs(p.attempts) do
      local t = trade(a.out_trade_no)
      local ts = t and t.trade_state
      if ts == "SUCCESS" or ts == "REFUND" then
        check(a.state == "paid" and a.transaction_id == t.transaction_id,
              m.id .. ": attempt " .. a.out_trade_no .. " paid at WeChat ("
              .. t.transaction_id .. "), here " .. a.state .. " "
              .. tostring(a.transaction_id))
        check(p.state == "paid" or p.state == "partially_refunded"
              or p.state == "refunded", m.id .. ": paid at WeChat on "
              .. a.out_trade_no .. ", here " .. p.state)
      else
        check(a.state ~= "paid", m.id .. ": attempt " .. a.out_trade_no
              .. " paid here, " .. tostring(ts) .. " at WeChat")
      end
    end
    if p.state == "paying" or p.state == "closed" then
      for _, a in ipairs(p.attempts) do
        if a.out_trade_no ~= p.out_trade_no or p.state == "closed" then
          local t = trade(a.out_trade_no)
          local ts = t and t.trade_state
          check(ts ~= "NOTPAY" and ts ~= "PAYERROR", m.id .. ": attempt "
                .. a.out_trade_no .. " (" .. a.state .. ") of a " .. p.state
                .. " payment still payable at WeChat: " .. tostring(ts))
        end
      end
    end
    local list, last = transitions("payment", "payment:" .. m.id)
    check(last == p.state, m.id .. ": chain ends " .. tostring(last)
          .. ", row " .. p.state)
    check(#list == p.version, m.id .. ": " .. #list
          .. " transitions for version " .. p.version)
    local want = {}
    for _, to in ipairs(list) do
      if PAY_EVENTS[to] then
        want["payment." .. to] = (want["payment." .. to] or 0) + 1
      end
    end
    local paid = 0
    for _, to in ipairs(list) do if to == "paid" then paid = paid + 1 end end
    if m.paid_current then
      check(p.state == "paid" or p.state == "partially_refunded"
            or p.state == "refunded", m.id .. ": paid at the simulator on "
            .. m.paid_current .. ", locally " .. p.state)
      check(paid == 1, m.id .. ": " .. paid .. " transitions to paid")
      check(not p.late, m.id .. ": paid on its current attempt but late")
      check(p.transaction_id ~= json.null, m.id .. ": no transaction_id")
      if m.payer_total then
        check(p.payer_total == m.payer_total, m.id .. ": payer_total "
              .. tostring(p.payer_total) .. ", paid " .. m.payer_total)
      end
    end
    check(paid <= 1, m.id .. ": paid " .. paid .. " times")
    for _, r in ipairs(p.refunds) do
      local rl, rlast = transitions("refund", "refund:" .. r.id)
      check(rlast == r.state, r.id .. ": chain ends " .. tostring(rlast)
            .. ", row " .. r.state)
      check(#rl == r.version, r.id .. ": " .. #rl
            .. " transitions for version " .. r.version)
      for _, to in ipairs(rl) do
        if REFUND_EVENTS[to] then
          local k = "refund." .. to .. "|" .. r.id
          want[k] = (want[k] or 0) + 1
        end
      end
    end
    local got = {}
    for _, e in ipairs(assert(gw.db:query("SELECT type, payload FROM"
        .. " paygate_outbox WHERE subject = $1", { m.id }))) do
      local k = e.type
      if k:match("^refund%.") then
        k = k .. "|" .. json.decode(e.payload).refund.id
      end
      if k:match("^payment%.") and not PAY_EVENTS[k:sub(9)] then
        k = nil            -- payment.late_paid: not a transition
      end
      if k then got[k] = (got[k] or 0) + 1 end
    end
    for k, n in pairs(want) do
      check(got[k] == n, m.id .. ": " .. n .. " transitions for " .. k
            .. ", " .. tostring(got[k]) .. " events")
    end
    for k, n in pairs(got) do
      check(want[k] == n, m.id .. ": " .. n .. " events " .. k .. ", "
            .. tostring(want[k]) .. " transitions")
    end
  end

  ------------------------------------------------------------ operations

  local CHANNELS = {
    native = {},
    h5 = { client_ip = "203.0.113.7" },
    jsapi = { payer = { openid = "o-model-1" } },
    app = {},
  }
  local function channel_body(r, body)
    local c = r.pick({ "native", "h5", "jsapi", "app" })
    body.channel = c
    for k, v in pairs(CHANNELS[c]) do body[k] = v end
    return body
  end

  local OPEN = { created = true, paying = true, unknown = true }
  local PAID = { paid = true, partially_refunded = true }

  -- refunds that count against the payment (the model's view)
  local function counted(m)
    local n = 0
    for _, rf in pairs(m.refunds) do
      if rf.kind ~= "duplicate" and rf.state ~= "failed"
         and rf.state ~= "closed" then
        n = n + rf.amount
      end
    end
    return n
  end

  local function settle_expect(m, rf, status)
    rf.state = ({ SUCCESS = "succeeded", ABNORMAL = "abnormal",
                  CLOSED = "closed" })[status]
    if status == "SUCCESS" and rf.kind ~= "duplicate" then
      m.refunded = m.refunded + rf.amount
      m.state = m.refunded >= m.amount and "refunded"
                or "partially_refunded"
    end
  end

  local function add_refund(m, body, res)
    local j = res.json
    m.refunds[j.id] = { id = j.id, no = j.out_refund_no, amount = j.amount,
                        kind = j.kind, state = j.state }
    check(j.state == "processing", j.id .. ": a new refund " .. j.state)
  end

  -- a late payment's refund, made by the gateway after its commit
  local function take_late_refund(m)
    local rf
    testing.wait_until(function()
      for _, r in ipairs(refunds_of(m.id)) do
        if not m.refunds[r.id] and r.state == "processing" then
          rf = r
          return true
        end
      end
    end, 10, m.id .. ": the late payment's refund")
    m.refunds[rf.id] = { id = rf.id, no = rf.out_refund_no,
                         amount = rf.amount, kind = rf.kind,
                         state = "processing" }
    log("late refund", rf.id, rf.kind, rf.amount)
    return m.refunds[rf.id]
  end

  local held = 0     -- notifications held by an out_of_order fault

  -- (reconcile) no close at WeChat the checks still have to make (of an
  -- attempt closed here, or marked by a switch): a fault set on `close`
  -- is then taken by the close the operation makes, not by theirs
  local function quiet_closes()
    if not REC then return end
    testing.wait_until(function()
      local rows = assert(gw.db:query("SELECT count(*) AS n FROM"
        .. " gw_attempts WHERE close_check_at IS NOT NULL"))
      return tonumber(rows[1].n) == 0
    end, 30, "the checks' closes at WeChat")
  end

  local ops = {}

  function ops.switch(r, m)
    local res = post("/v1/payments/" .. m.id .. "/attempts",
                     channel_body(r, {}))
    if OPEN[m.state] then
      if m.sim[m.no] == "SUCCESS" then
        check(res.status == 409, "switch of a paid attempt: " .. res.status)
        return
      end
      check(res.status == 201, "switch of an open payment: " .. res.status
            .. " " .. res.body)
      m.sim[m.no] = "CLOSED"
      m.no = res.json.payment.out_trade_no
      m.sim[m.no] = "NOTPAY"
      m.state = "paying"
    else
      check(res.status == 409, "switch of a " .. m.state .. " payment: "
            .. res.status)
    end
  end

  local function pay(r, m, fault)
    local body = {}
    if r.chance(0.3) then
      body.payer_total = r.int(0, m.amount - 1)
    end
    if fault then sim:fault{ endpoint = "notify", kind = fault, count = 1 } end
    local wait = fault == "out_of_order" and "" or "?wait=5"
    local res = control("POST", "/sim/transactions/" .. m.no .. "/pay"
                        .. wait, body)
    local st = m.sim[m.no]
    if REC and st == "PAYERROR" and m.state == "failed"
       and res.status == 409 then
      -- the checks closed the failed attempt at WeChat meanwhile
      m.sim[m.no] = "CLOSED"
      if fault then sim:clear_faults() end
      return
    end
    if st == "NOTPAY" or st == "PAYERROR" then
      check(res.status == 200, "sim pay of " .. st .. ": " .. res.status)
    elseif st == "NONE" then       -- its prepay never reached WeChat
      check(res.status == 404, "sim pay of " .. st .. ": " .. res.status)
      if fault then sim:clear_faults() end
      return
    else
      check(res.status == 409, "sim pay of " .. st .. ": " .. res.status)
      if fault then sim:clear_faults() end
      return
    end
    m.sim[m.no] = "SUCCESS"
    if fault == "out_of_order" then
      held = held + 1
      -- the notification is held: ?refresh=1 applies the payment by query
      local p = get(m.id, "?refresh=1")
      log("refresh ->", p.state)
    else
      check(res.headers["x-sim-notified"] == "204", "notification answered "
            .. tostring(res.headers["x-sim-notified"]))
    end
    if m.state == "paying" or m.state == "unknown" or m.state == "created"
    then
      m.state = "paid"
      m.paid_current = m.no
      m.payer_total = body.payer_total or m.amount
    elseif m.state == "failed" then
      m.state = "paid"         -- late: refunded by the gateway
      take_late_refund(m)
    end
  end

  -- paid with the notification held and nothing asking: the payment is
  -- paid once the notification comes (released by a later one), whatever
  -- is done with it meanwhile
  function ops.pay_held(r, m)
    if m.sim[m.no] ~= "NOTPAY" or not OPEN[m.state] then return pay(r, m) end
    sim:fault{ endpoint = "notify", kind = "out_of_order", count = 1 }
    local res = control("POST", "/sim/transactions/" .. m.no .. "/pay")
    check(res.status == 200, "sim pay: " .. res.status)
    held = held + 1
    m.sim[m.no] = "SUCCESS"
    m.paid_current = m.no
    m.payer_total = m.amount
    m.pending = true
    m.state = nil
  end

  -- the degradation switch on for one operation
  local function degrade(on)
    for _, srv in ipairs(instances) do
      local res = srv:request{ method = "POST", path = "/admin/degrade",
                               json = { on = on } }
      check(res.status == 200 and res.json.on == on, "degrade "
            .. tostring(on) .. ": " .. res.status .. " " .. res.body)
    end
    log("degrade", on)
  end
  function ops.degraded(r, m)
    degrade(true)
    local what = r.pick({ "refund", "switch", "close", "get", "pay" })
    local ok, err = pcall(function()
      if what == "pay" then
        if m.state ~= "failed" then pay(r, m) end
        return
      end
      if what == "get" then
        local p = get(m.id, "?refresh=1")
        check(p.stale == true, "a degraded refresh without stale")
        return
      end
      local res
      if what == "refund" then
        res = post("/v1/payments/" .. m.id .. "/refunds", { amount = 1 })
      elseif what == "switch" then
        res = post("/v1/payments/" .. m.id .. "/attempts",
                   channel_body(r, {}))
      else
        res = post("/v1/payments/" .. m.id .. "/close", {})
      end
      -- a write that would call WeChat: 503 degraded; else as ever (a
      -- close of a closed payment sends nothing: 200; 409)
      local would = what == "refund" and PAID[m.state]
                    or what ~= "refund" and OPEN[m.state]
      check(res.status == 503 and res.json.error == "degraded"
            or not would and (res.status == 409 or what == "close"
                              and m.state == "closed" and res.status == 200),
            what .. " of a " .. m.state .. " payment while degraded: "
            .. res.status .. " " .. res.body)
    end)
    degrade(false)
    if not ok then error(err, 0) end
  end

  -- one refund request sent twice at once under one key: one refund; the
  -- other answer is its replay or 409 idempotency_in_flight
  function ops.refund_same_key(r, m)
    if not PAID[m.state] then return ops.refund(r, m) end
    local left = m.amount - counted(m)
    if left < 1 then return ops.refund(r, m) end
    local text = json.encode({ amount = r.int(1, left) })
    local key = "k-" .. crypto.random_nonce(16)
    local path = "/v1/payments/" .. m.id .. "/refunds"
    local results, done = {}, 0
    for i = 1, 2 do
      core.spawn(function()
        results[i] = gw:call("POST", path, text,
                             { ["Idempotency-Key"] = key })
        done = done + 1
      end)
    end
    testing.wait_until(function() return done == 2 end, 30, "the refunds")
    local made
    for _, res in ipairs(results) do
      shape("POST " .. path, res)
      log("POST", path, text, "(same key) ->", res.status)
      if res.status == 201 then
        if made and made.body ~= res.body then
          fail("one key, two refunds: " .. made.body .. " " .. res.body)
        end
        made = made or res
      else
        check(res.status == 409 and res.json.error == "idempotency_in_flight",
              "one key twice: " .. res.status .. " " .. res.body)
      end
    end
    check(made, "one key twice, no refund: " .. results[1].body)
    add_refund(m, nil, made)
    posts[#posts + 1] = { path = path, text = text, key = key, status = 201,
                          body = made.body }
  end

  function ops.pay(r, m) pay(r, m) end
  function ops.pay_dup(r, m) pay(r, m, "duplicate") end
  function ops.pay_reordered(r, m) pay(r, m, "out_of_order") end

  function ops.fail(_, m)
    local res = control("POST", "/sim/transactions/" .. m.no .. "/fail")
    if m.sim[m.no] == "NOTPAY" then
      check(res.status == 200, "sim fail: " .. res.status)
      m.sim[m.no] = "PAYERROR"
    elseif m.sim[m.no] == "NONE" then  -- its prepay never reached WeChat
      check(res.status == 404, "sim fail: " .. res.status)
    else
      check(res.status == 409, "sim fail: " .. res.status)
    end
  end

  function ops.refresh(_, m)
    local p = get(m.id, "?refresh=1")
    check(not p.stale, m.id .. ": stale refresh")
    if m.state == "paying" and m.sim[m.no] == "PAYERROR" then
      m.state = "failed"
    end
  end

  function ops.close(_, m)
    local res = post("/v1/payments/" .. m.id .. "/close", {})
    if OPEN[m.state] then
      if m.sim[m.no] == "SUCCESS" then
        check(res.status == 409, "close of a paid attempt: " .. res.status)
        return
      end
      check(res.status == 200 and res.json.state == "closed",
            "close of an open payment: " .. res.status .. " " .. res.body)
      m.sim[m.no] = "CLOSED"
      m.state = "closed"
    elseif m.state == "closed" then
      check(res.status == 200, "close again: " .. res.status)
    else
      check(res.status == 409, "close of a " .. m.state .. " payment: "
            .. res.status)
    end
  end

  local function refund_amount(r, m)
    local left = m.amount - counted(m)
    local kind = r.pick({ "partial", "partial", "full", "over" })
    if kind == "full" or left <= 1 then return math.max(left, 1), left end
    if kind == "over" then return left + r.int(1, 50), left end
    return r.int(1, left - 1), left
  end

  function ops.refund(r, m)
    local amount, left = refund_amount(r, m)
    local body = { amount = amount }
    if r.chance(0.5) then body.reason = "model " .. r.int(1, 99) end
    local res = post("/v1/payments/" .. m.id .. "/refunds", body)
    if not PAID[m.state] then
      check(res.status == 409, "refund of a " .. m.state .. " payment: "
            .. res.status)
    elseif amount > left then
      check(res.status == 422 and res.json.error == "refund_exceeds_paid"
            and res.json.refundable == left, "refund of " .. amount
            .. " with " .. left .. " left: " .. res.status .. " " .. res.body)
    else
      check(res.status == 201, "refund of " .. amount .. " with " .. left
            .. " left: " .. res.status .. " " .. res.body)
      add_refund(m, body, res)
    end
  end

  function ops.refunds_at_once(r, m)
    local left = m.amount - counted(m)
    local k = r.int(2, 3)
    local amount = r.int(1, math.max(1, math.floor(left / 2) + 1))
    local done, results = 0, {}
    for i = 1, k do
      core.spawn(function()
        results[i] = post("/v1/payments/" .. m.id .. "/refunds",
                          { amount = amount })
        done = done + 1
      end)
    end
    testing.wait_until(function() return done == k end, 30, "the refunds")
    local ok = 0
    for _, res in ipairs(results) do
      if res.status == 201 then
        ok = ok + 1
        add_refund(m, nil, res)
      elseif PAID[m.state] then
        check(res.status == 422, "a concurrent refund: " .. res.status
              .. " " .. res.body)
      else
        check(res.status == 409, "a concurrent refund of a " .. m.state
              .. " payment: " .. res.status)
      end
    end
    if PAID[m.state] then
      local want = math.min(k, math.floor(left / amount))
      check(ok == want, k .. " refunds of " .. amount .. " with " .. left
            .. " left: " .. ok .. " made, want " .. want)
    end
  end

  local function settle(r, m, fault)
    local open = {}
    for _, rf in pairs(m.refunds) do
      if rf.state == "processing" then open[#open + 1] = rf end
    end
    table.sort(open, function(a, b) return a.id < b.id end)
    if not open[1] then return ops.refresh(r, m) end
    local rf = r.pick(open)
    local status = r.pick({ "SUCCESS", "SUCCESS", "ABNORMAL", "CLOSED" })
    if fault then sim:fault{ endpoint = "notify", kind = fault, count = 1 } end
    local wait = fault == "out_of_order" and "" or "?wait=5"
    local res = control("POST", "/sim/refunds/" .. rf.no .. "/settle"
                        .. wait, { status = status })
    check(res.status == 200, "settle: " .. res.status .. " " .. res.body)
    if fault == "out_of_order" then
      held = held + 1
      get(m.id, "?refresh=1")
    else
      check(res.headers["x-sim-notified"] == "204", "refund notification"
            .. " answered " .. tostring(res.headers["x-sim-notified"]))
    end
    settle_expect(m, rf, status)
  end

  -- an abnormal refund applied for through WeChat's abnormal-refund API:
  -- it stays abnormal while WeChat processes it (?refresh=1 says so), then
  -- ends as WeChat settles it
  function ops.abnormal_apply(r, m)
    local list = {}
    for _, x in ipairs(get(m.id).refunds) do
      if x.state == "abnormal" then list[#list + 1] = x end
    end
    if not list[1] then return settle(r, m) end
    local x = r.pick(list)
    local rf = m.refunds[x.id]
    local data, err = wx:abnormal_refund{ refund_id = x.refund_id,
      out_refund_no = x.out_refund_no, type = "MERCHANT_BANK_CARD",
      sub_mchid = SUB }
    log("abnormal_refund", x.id, data and data.status or tostring(err))
    check(data and data.status == "PROCESSING", "abnormal refund: "
          .. tostring(err))
    local p = get(m.id, "?refresh=1")
    for _, y in ipairs(p.refunds) do
      if y.id == x.id then
        check(y.state == "abnormal", x.id .. ": applied for, " .. y.state)
      end
    end
    local status = r.pick({ "SUCCESS", "CLOSED" })
    if r.chance(0.3) then
      sim:fault{ endpoint = "notify", kind = "duplicate", count = 1 }
    end
    local res = control("POST", "/sim/refunds/" .. x.out_refund_no
                        .. "/settle?wait=5", { status = status })
    check(res.status == 200 and res.headers["x-sim-notified"] == "204",
          "settle after the application: " .. res.status)
    settle_expect(m, rf, status)
  end

  function ops.settle(r, m) settle(r, m) end
  function ops.settle_dup(r, m) settle(r, m, "duplicate") end
  function ops.settle_reordered(r, m) settle(r, m, "out_of_order") end

  function ops.replay(r)
    if posts[1] then replay(r.pick(posts)) end
  end

  -- WeChat's close held back while the payer pays the attempt: the
  -- switch (or close) finds it paid
  local function race(r, m, what)
    if not OPEN[m.state] or m.sim[m.no] ~= "NOTPAY" then
      return ops[what](r, m)
    end
    quiet_closes()
    -- the close is held at WeChat until the pay below has reached it
    local h = sim:hold("close")
    local res, done
    core.spawn(function()
      if what == "switch" then
        res = post("/v1/payments/" .. m.id .. "/attempts",
                   channel_body(r, {}))
      else
        res = post("/v1/payments/" .. m.id .. "/close", {})
      end
      done = true
    end)
    h:wait_held()                         -- the close at WeChat
    local pr = control("POST", "/sim/transactions/" .. m.no .. "/pay?wait=5")
    h:release()
    check(pr.status == 200, "pay during the close: " .. pr.status)
    testing.wait_until(function() return done end, 15, what)
    check(res.status == 409 and res.json.error == "payment_paid",
          what .. " of an attempt paid meanwhile: " .. res.status .. " "
          .. res.body)
    m.sim[m.no] = "SUCCESS"
    m.state = "paid"
    m.paid_current = m.no
    m.payer_total = m.amount
    sim:clear_faults()
  end
  -- two switches at once: one is made; the other is made too (then the
  -- first's attempt was superseded on its way: 409 conflict) or finds
  -- the payment moved on
  function ops.switch_twice(r, m)
    if not OPEN[m.state] or m.sim[m.no] == "SUCCESS" then
      return ops.switch(r, m)
    end
    local done, results = 0, {}
    for i = 1, 2 do
      local body = channel_body(r, {})
      core.spawn(function()
        results[i] = post("/v1/payments/" .. m.id .. "/attempts", body)
        done = done + 1
      end)
    end
    testing.wait_until(function() return done == 2 end, 30, "the switches")
    local made = 0
    for _, res in ipairs(results) do
      if res.status == 201 then
        made = made + 1
      else
        check(res.status == 409 or res.status == 502, "a concurrent switch: "
              .. res.status .. " " .. res.body)
      end
    end
    check(made >= 1 or results[1].status == 502 or results[2].status == 502,
          "two switches at once, none made: " .. results[1].body .. " "
          .. results[2].body)
    m.state, m.no = nil, nil
  end

  function ops.switch_race(r, m) race(r, m, "switch") end
  function ops.close_race(r, m) race(r, m, "close") end

  -- a fault on one WeChat endpoint during an operation: the outcome is the
  -- gateway's to report; the model takes the state it ends in (checked
  -- against the machine at the end) and the simulator's word
  local FAULTS = {
    { kind = "error", status = 500 },
    { kind = "error", status = 500, after = true },
    { kind = "error", status = 400, code = "INVALID_REQUEST" },
    { kind = "reset" }, { kind = "reset", after = true },
    { kind = "bad_signature" },
  }
  local function faulty(r, m, endpoint, op)
    local f = {}
    for k, v in pairs(r.pick(FAULTS)) do f[k] = v end
    f.endpoint, f.count = endpoint, 1
    sim:fault(f)
    log("fault", json.encode(f))
    local before = {}
    for id in pairs(m.refunds) do before[id] = true end
    local res = op()
    sim:clear_faults()
    m.state, m.no = nil, nil
    for _, rf in pairs(m.refunds) do
      if rf.state == "processing" then rf.state = nil end
    end
    if res and res.json and res.json.refund and not before[res.json.refund.id]
    then
      local j = res.json.refund
      m.refunds[j.id] = { id = j.id, no = j.out_refund_no, amount = j.amount,
                          kind = j.kind }
    end
    return res
  end

  function ops.refund_fault(r, m)
    if not PAID[m.state] then return ops.refund(r, m) end
    local left = m.amount - counted(m)
    if left < 1 then return ops.refund(r, m) end
    local amount = r.int(1, left)
    local res = faulty(r, m, "refund", function()
      return post("/v1/payments/" .. m.id .. "/refunds", { amount = amount })
    end)
    if res.status == 201 then
      m.refunds[res.json.id] = { id = res.json.id, no = res.json.out_refund_no,
                                 amount = amount, kind = "merchant" }
    end
    -- what became of it: asked by ?refresh=1
    get(m.id, "?refresh=1")
  end

  function ops.switch_fault(r, m)
    if not OPEN[m.state] then return ops.switch(r, m) end
    faulty(r, m, r.pick({ "close", "prepay" }), function()
      return post("/v1/payments/" .. m.id .. "/attempts", channel_body(r, {}))
    end)
    get(m.id, "?refresh=1")
  end

  function ops.close_fault(r, m)
    if not OPEN[m.state] then return ops.close(r, m) end
    faulty(r, m, r.pick({ "close", "query" }), function()
      return post("/v1/payments/" .. m.id .. "/close", {})
    end)
    get(m.id, "?refresh=1")
  end

  function ops.refresh_fault(r, m)
    faulty(r, m, r.pick({ "query", "refund_query" }), function()
      local p = get(m.id, "?refresh=1")
      return nil, p
    end)
  end

  ------------------------------------------- reconciliation and expiry
  -- (drawn only with o.reconcile: the gateway's checks at work)

  -- the payment's last entry of `what` was made by the checks
  local function by_checks(m, what)
    local last
    for _, e in ipairs(audit.entries(gw.db, "payment:" .. m.id)) do
      if e.what == what then last = e end
    end
    check(last and last.actor == "reconcile", m.id .. ": " .. what
          .. " by " .. tostring(last and last.actor) .. ", not the checks")
  end

  local function wait_payment(m, states, what, secs)
    local p
    local ok, err = pcall(testing.wait_until, function()
      p = get(m.id)
      return states[p.state]
    end, secs or 30, m.id .. ": " .. what)
    if not ok then
      fail(tostring(err) .. " (" .. tostring(p and p.state) .. ")")
    end
    log("checks ->", p.state)
    return p
  end

  local function dropped(no, rno)
    testing.wait_until(function()
      local n = sim:notifications{ out_trade_no = rno and nil or no,
                                   out_refund_no = rno }
      return n[#n] and n[#n].state == "dropped"
    end, 10, "the notification dropped")
  end

  -- paid at WeChat, every notification of it lost: only the payment
  -- checks can find it; paid, once, by them
  function ops.pay_lost(r, m)
    if m.state == "failed" and m.sim[m.no] == "PAYERROR" then
      -- a failed payment paid at WeChat before the checks closed its
      -- attempt there (or refused: they did), the notification lost: the
      -- checks' close finds the money, a late payment refunded
      sim:fault{ endpoint = "notify", kind = "never_sent", count = 1 }
      local res = control("POST", "/sim/transactions/" .. m.no .. "/pay")
      if res.status == 409 then
        sim:clear_faults()
        m.sim[m.no] = "CLOSED"
        return
      end
      check(res.status == 200, "sim pay of a failed payment's attempt: "
            .. res.status .. " " .. res.body)
      m.sim[m.no] = "SUCCESS"
      dropped(m.no)
      local p = wait_payment(m, { paid = true }, "paid late by the checks")
      check(p.late == true, m.id .. ": paid after it failed, not late")
      by_checks(m, "payment.succeeded")
      m.state = "paid"
      take_late_refund(m)
      return
    end
    if not OPEN[m.state] or m.sim[m.no] ~= "NOTPAY" then return pay(r, m) end
    local body = {}
    if r.chance(0.3) then body.payer_total = r.int(0, m.amount - 1) end
    sim:fault{ endpoint = "notify", kind = "never_sent", count = 1 }
    local res = control("POST", "/sim/transactions/" .. m.no .. "/pay", body)
    check(res.status == 200, "sim pay: " .. res.status .. " " .. res.body)
    m.sim[m.no] = "SUCCESS"
    dropped(m.no)
    wait_payment(m, { paid = true }, "paid by the checks")
    by_checks(m, "payment.succeeded")
    m.state = "paid"
    m.paid_current = m.no
    m.payer_total = body.payer_total or m.amount
  end

  -- a refund settled at WeChat (or an abnormal one applied for, then
  -- settled) with its notification lost: settled by the refund checks
  function ops.settle_lost(r, m)
    local open = {}
    for _, rf in pairs(m.refunds) do
      if rf.state == "processing" or rf.state == "abnormal" then
        open[#open + 1] = rf
      end
    end
    table.sort(open, function(a, b) return a.id < b.id end)
    if not open[1] then return ops.pay_lost(r, m) end
    local rf = r.pick(open)
    local status
    if rf.state == "abnormal" then
      local x
      for _, y in ipairs(get(m.id).refunds) do
        if y.id == rf.id then x = y end
      end
      local data, err = wx:abnormal_refund{ refund_id = x.refund_id,
        out_refund_no = x.out_refund_no, type = "MERCHANT_BANK_CARD",
        sub_mchid = SUB }
      log("abnormal_refund", x.id, data and data.status or tostring(err))
      check(data and data.status == "PROCESSING", "abnormal refund: "
            .. tostring(err))
      status = r.pick({ "SUCCESS", "CLOSED" })
    else
      status = r.pick({ "SUCCESS", "SUCCESS", "ABNORMAL", "CLOSED" })
    end
    sim:fault{ endpoint = "notify", kind = "never_sent", count = 1 }
    local res = control("POST", "/sim/refunds/" .. rf.no .. "/settle",
                        { status = status })
    check(res.status == 200, "settle: " .. res.status .. " " .. res.body)
    dropped(nil, rf.no)
    local want = REFUND_AS[status]
    local ok, err = pcall(testing.wait_until, function()
      for _, y in ipairs(get(m.id).refunds) do
        if y.id == rf.id then return y.state == want end
      end
    end, 30, rf.id .. ": " .. want .. " by the checks")
    if not ok then fail(tostring(err)) end
    log("checks ->", rf.id, want)
    settle_expect(m, rf, status)
  end

  -- a switch whose prepay answer does not verify: the payment is
  -- `unknown` (the order was made at WeChat); the checks find it unpaid
  -- (`paying`) or, paid meanwhile with the notification lost, `paid`
  function ops.unknown_switch(r, m)
    if not OPEN[m.state] or m.sim[m.no] == "SUCCESS" then
      return ops.switch(r, m)
    end
    local paid = r.chance(0.5)
    -- (a third of the time every prepay attempt refused with a 5xx: the
    -- order is not at WeChat, the payment stays unknown until it expires)
    local never = r.chance(0.33)
    log("unknown_switch", never and "never reaching WeChat" or "",
        paid and "paid" or "")
    if never then
      sim:fault{ endpoint = "prepay", kind = "error", status = 500,
                 count = 60 }
    else
      sim:fault{ endpoint = "prepay", kind = "bad_signature", count = 1 }
    end
    local res = post("/v1/payments/" .. m.id .. "/attempts",
                     channel_body(r, {}))
    sim:clear_faults()
    check(res.status == 502 and res.json.error == "wechat_error"
          and res.json.payment and res.json.payment.state == "unknown",
          "a switch whose prepay answer is lost: " .. res.status
          .. " " .. res.body)
    m.sim[m.no] = "CLOSED"
    m.no = res.json.payment.out_trade_no
    m.sim[m.no] = "NOTPAY"
    if never then
      m.sim[m.no] = "NONE"
      check(trade(m.no) == nil, m.id .. ": " .. m.no .. " at WeChat")
      m.state = "unknown"
      return
    end
    if paid then
      -- its notification lost, or delivered while the checks are at it
      local lost = r.chance(0.6)
      if lost then
        sim:fault{ endpoint = "notify", kind = "never_sent", count = 1 }
      end
      local pr = control("POST", "/sim/transactions/" .. m.no .. "/pay"
                         .. (lost and "" or "?wait=5"))
      check(pr.status == 200, "sim pay: " .. pr.status .. " " .. pr.body)
      m.sim[m.no] = "SUCCESS"
      if lost then dropped(m.no) end
      wait_payment(m, { paid = true }, "paid by the checks")
      if lost then by_checks(m, "payment.succeeded") end
      m.state = "paid"
      m.paid_current = m.no
      m.payer_total = m.amount
    else
      wait_payment(m, { paying = true }, "open again by the checks")
      by_checks(m, "payment.still_open")
      m.state = "paying"
    end
  end

  -- a refund whose answer is lost (WeChat's 5xx after or before the
  -- work, an answer that does not verify): `unknown`, then `processing`
  -- by the refund checks (sent again when WeChat does not have it)
  local LOST = {
    { kind = "bad_signature" }, { kind = "bad_signature" },
    { kind = "error", status = 500, after = true },
    -- every attempt within the client's deadline refused: not at WeChat
    -- (the checks find it not_found and send it)
    { kind = "error", status = 500, count = 60 },
  }
  function ops.refund_unknown(r, m)
    if not PAID[m.state] then return ops.refund(r, m) end
    local left = m.amount - counted(m)
    if left < 1 then return ops.refund(r, m) end
    local amount = r.int(1, left)
    local f = {}
    for k, v in pairs(r.pick(LOST)) do f[k] = v end
    f.endpoint, f.count = "refund", f.count or 1
    sim:fault(f)
    log("fault", json.encode(f))
    local res = post("/v1/payments/" .. m.id .. "/refunds", { amount = amount })
    sim:clear_faults()
    -- (a 5xx is retried by the client: its answer may be WeChat's)
    check(res.status == 502 and res.json.refund
          and res.json.refund.state == "unknown"
          or f.status and f.count == 1 and res.status == 201
          and res.json.state == "processing", "a refund whose answer is"
          .. " lost: " .. res.status .. " " .. res.body)
    local j = res.status == 201 and res.json or res.json.refund
    local rf = { id = j.id, no = j.out_refund_no, amount = amount,
                 kind = "merchant" }
    m.refunds[j.id] = rf
    local ok, err = pcall(testing.wait_until, function()
      for _, y in ipairs(get(m.id).refunds) do
        if y.id == j.id then return y.state == "processing" end
      end
    end, 30, j.id .. ": processing by the checks")
    if not ok then fail(tostring(err)) end
    local x = wx:query_refund(j.out_refund_no, SUB)
    check(x and x.status == "PROCESSING" and x.amount.refund == amount,
          j.id .. ": at WeChat " .. json.encode(x or {}))
    rf.state = "processing"
  end

  -- the payment past its expiry (the gateway's expires_at moved back:
  -- expires_in is at least 120 s): the checks close it at WeChat, then
  -- here (also when their first close fails: retried); a payment on it
  -- after that is refused. Or the payer pays while the checks' close is
  -- held at WeChat (then made: ORDER_PAID; or failed: 500), with the
  -- notification delivered or lost: paid, once, on its current attempt,
  -- not late.
  local function fired(f, what)
    testing.wait_until(function()
      for _, x in ipairs(sim:control("GET", "/sim/faults")) do
        if x.id == f.id then return (x.fired or 0) >= 1 end
      end
    end, 30, what)
  end
  function ops.expire(r, m)
    if not OPEN[m.state] or (m.sim[m.no] ~= "NOTPAY"
                             and m.sim[m.no] ~= "NONE") then
      return ops.close(r, m)
    end
    local how = m.sim[m.no] == "NOTPAY"
                and r.pick({ "plain", "plain", "retry", "held", "failed",
                             "close", "switch" })
                or r.pick({ "plain", "close", "switch" })
    local lost = r.chance(0.5)
    log("expire", how, lost and "lost" or "")
    local f, h
    if how == "held" or how == "failed" or how == "retry" then
      quiet_closes()
      if how ~= "retry" then
        -- held until the payer's pay has reached WeChat (as in race())
        h = sim:hold("close")
      end
      if how ~= "held" then
        f = sim:fault{ endpoint = "close", kind = "error", status = 500,
                       count = 1 }
      end
    end
    assert(gw.db:exec("UPDATE gw_payments SET expires_at = $2 WHERE id = $1",
                      { m.id, os.time() - 1 }))
    if how == "close" then
      -- the merchant closes it too, at once: closed, once
      local res = post("/v1/payments/" .. m.id .. "/close", {})
      check(res.status == 200 and res.json.state == "closed", "a close of"
            .. " an expired payment: " .. res.status .. " " .. res.body)
    elseif how == "switch" then
      -- a new attempt for it: too late
      local res = post("/v1/payments/" .. m.id .. "/attempts",
                       channel_body(r, {}))
      check(res.status == 409 and (res.json.error == "payment_expired"
            or res.json.error == "invalid_state"), "a switch of an expired"
            .. " payment: " .. res.status .. " " .. res.body)
    end
    if how ~= "held" and how ~= "failed" then
      if f then fired(f, "the checks' close to fail") end
      local p = wait_payment(m, { closed = true }, "closed by the checks")
      sim:clear_faults()
      if how ~= "close" then by_checks(m, "payment.closed") end
      for _, a in ipairs(p.attempts) do
        check(a.state ~= "open", m.id .. ": attempt " .. a.out_trade_no
              .. " open in a closed payment")
      end
      local t = trade(m.no)
      local ts = t and t.trade_state or "NONE"
      check(ts == "CLOSED" or ts == "NONE" and m.sim[m.no] == "NONE",
            m.id .. ": expired and closed here, " .. ts .. " at WeChat")
      -- the payer comes too late: WeChat refuses
      local pr = control("POST", "/sim/transactions/" .. m.no .. "/pay")
      check(pr.status == (ts == "NONE" and 404 or 409), "a payment after"
            .. " the expiry's close: " .. pr.status .. " " .. pr.body)
      m.sim[m.no] = ts
      m.state = "closed"
      return
    end
    -- the checks' close held at WeChat: the payer pays meanwhile
    h:wait_held(1, 30)
    if lost then
      sim:fault{ endpoint = "notify", kind = "never_sent", count = 1 }
    end
    local pr = control("POST", "/sim/transactions/" .. m.no .. "/pay"
                       .. (lost and "" or "?wait=5"))
    h:release()
    check(pr.status == 200, "pay during the checks' close: " .. pr.status
          .. " " .. pr.body)
    m.sim[m.no] = "SUCCESS"
    local p = wait_payment(m, { paid = true, closed = true },
                           "paid, the close refused")
    sim:clear_faults()
    check(p.state == "paid", m.id .. ": paid at WeChat during the"
          .. " expiry's close, here " .. p.state)
    if lost then by_checks(m, "payment.succeeded") end
    m.state = "paid"
    m.paid_current = m.no
    m.payer_total = m.amount
  end

  local WEIGHTS = {
    { "switch", 2 }, { "pay", 5 }, { "pay_dup", 2 }, { "pay_reordered", 1 },
    { "fail", 2 }, { "refresh", 2 }, { "close", 1 }, { "refund", 6 },
    { "refunds_at_once", 2 }, { "settle", 5 }, { "settle_dup", 2 },
    { "settle_reordered", 1 }, { "replay", 2 }, { "switch_race", 1 },
    { "close_race", 1 }, { "refund_fault", 2 }, { "switch_fault", 1 },
    { "close_fault", 1 }, { "refresh_fault", 1 }, { "switch_twice", 2 },
    { "pay_held", 1 }, { "degraded", 2 }, { "refund_same_key", 2 },
    { "abnormal_apply", 3 },
  }
  if REC then
    for _, w in ipairs({ { "pay_lost", 4 }, { "settle_lost", 4 },
                         { "unknown_switch", 2 }, { "refund_unknown", 2 },
                         { "expire", 3 } }) do
      WEIGHTS[#WEIGHTS + 1] = w
    end
  end
  local TOTAL = 0
  for _, w in ipairs(WEIGHTS) do TOTAL = TOTAL + w[2] end
  local function pick_op(r)
    local x = r.int(1, TOTAL)
    for _, w in ipairs(WEIGHTS) do
      x = x - w[2]
      if x <= 0 then return w[1] end
    end
  end

  -- N payments through random operations, each step checked; then every
  -- notification delivered, every kept answer replayed and the final
  -- checks
  local function run(N)
    local r = rng(SEED)
    local rec_pick = rng(SEED + 2)
    local models = {}
    local started = core.time()
    for i = 1, N do
      local amount = r.pick({ 1, 2, 3, 10, 99, 100, r.int(1, 100000) })
      local body = channel_body(r, { order_id = "model-" .. SEED .. "-" .. i,
        amount = amount, description = "model " .. i })
      body.sub_mchid = SUB
      local res
      if r.chance(0.25) then
        -- two creates of one order_id at once (two keys): one payment, one
        -- 201; the other 409 (payment_exists, or conflict when it lost the
        -- race for the attempt)
        local results, done = {}, 0
        for k = 1, 2 do
          core.spawn(function()
            results[k] = post("/v1/payments", body)
            done = done + 1
          end)
        end
        testing.wait_until(function() return done == 2 end, 30, "creates")
        local made = {}
        for _, x in ipairs(results) do
          if x.status == 201 then
            made[#made + 1] = x
          else
            check(x.status == 409, "a concurrent create: " .. x.status
                  .. " " .. x.body)
          end
        end
        check(#made == 1, "two creates at once: " .. results[1].status
              .. " " .. results[2].status)
        res = made[1]
      else
        res = post("/v1/payments", body)
      end
      check(res.status == 201, "create: " .. res.status .. " " .. res.body)
      local p = res.json.payment
      local m = { id = p.id, amount = amount, no = p.out_trade_no,
                  state = "paying", sim = { [p.out_trade_no] = "NOTPAY" },
                  refunds = {}, refunded = 0 }
      check(p.state == "paying", "create: " .. p.state)
      models[i] = m
      log("payment", i, m.id, amount)
      for k = 1, r.int(4, 14) do
        -- most payments are paid early: refunds are where the money is
        local op = (k == 1 and r.chance(0.5)) and "pay" or pick_op(r)
        if REC and op == "pay" then
          -- (reconcile) the early payment lost, or the payment expired,
          -- half the time: drawn by a generator of their own
          op = rec_pick.pick({ "pay", "pay", "pay_lost", "expire",
                                "unknown_switch" })
        end
        log("op", op, m.id)
        ops[op](r, m)
        step_check(m)
      end
    end
    -- the held notifications released by one more delivered
    if held > 0 then
      local extra = support.create(gw, { amount = 1, sub_mchid = SUB })
      control("POST", "/sim/transactions/" .. extra.out_trade_no
              .. "/pay?wait=5")
    end
    testing.wait_until(function()
      for _, n in ipairs(sim:notifications()) do
        -- (dropped: the reconcile operations' never_sent)
        if n.state ~= "delivered" and n.state ~= "dropped" then
          return false
        end
      end
      return true
    end, 60, "every notification delivered")
    for _, m in ipairs(models) do step_check(m) end
    for _, p in ipairs(posts) do replay(p) end
    for _, m in ipairs(models) do final_check(m) end
    local ok, rep = audit.verify_all(gw.db)
    check(ok and #rep.broken == 0, "audit chains broken: "
          .. json.encode(rep))
    local code, out = testing.proc.run({ testing.server.bin(), "exec",
      "examples/gateway/scripts/verify.lua", gw.db_url }, { timeout = 60 })
    check(code == 0, "verify.lua: " .. tostring(code) .. " " .. out)
    local f = io.open(TRACE or "/dev/null", "w")
    if f then f:write(table.concat(trace, "\n"), "\n") f:close() end
    print((NAME .. ": %d payments, %d POSTs, %d held, %.1f s"):format(N,
      #posts, held, core.time() - started))
  end

  return { run = run, log = log, check = check, fail = fail,
           posts = posts }
end

return _M
