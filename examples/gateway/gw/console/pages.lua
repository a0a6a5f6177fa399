-- gw.console.pages: the console's pages, server-rendered with paygate.html
-- (every value escaped unless built as markup here), and the reads and
-- jobs behind its levers. No JavaScript: the overview refreshes itself
-- with <meta http-equiv="refresh">.
local paygate = require "paygate"
local core = require "paygate.core"
local shared = require "paygate.shared"
local audit = require "paygate.audit"
local outbox = require "paygate.outbox"
local json = require "paygate.json"
local html = require "paygate.html"
local certs = require "paygate.wechatpay.certs"
local bill = require "paygate.reconcile.bill"
local apply = require "gw.apply"
local model = require "gw.model"
local upstream = require "gw.upstream"

local type, tostring, tonumber, ipairs, floor, min, max =
      type, tostring, tonumber, ipairs, math.floor, math.min, math.max
local render, raw, join = html.render, html.raw, html.join

local _M = {}
local ctx

function _M.init(c) ctx = c end

local PAGE = 50
local WINDOW = 5           -- WeChat waits 5 s for a notification's answer

do
  local here = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "."
  local f = io.open(here .. "/console.css", "rb")
  _M.CSS = f and f:read("*a") or ""
  if f then f:close() end
end

local function null(v)
  if v == nil or v == core.null then return nil end
  return v
end

local function when(t)
  t = tonumber(null(t))
  if not t then return "" end
  return os.date("!%Y-%m-%d %H:%M:%S", floor(t)) .. "Z"
end

-- An event's deliveries, as its receivers count them: the `attempt` of
-- its last delivery, a replay's too (outbox: prior_attempts + attempts).
-- `attempts` alone restarts at each replay (what max_attempts counts),
-- so an event delivered on attempt 4 after a replay showed 1. With a
-- replay behind it: "4 (1 since its last replay)".
local function deliveries(e)
  local since = tonumber(e.attempts) or 0
  local prior = tonumber(e.prior_attempts) or 0
  if prior <= 0 then return since end
  return (prior + since) .. " (" .. since .. " since its last replay)"
end

local function fen(n)
  n = tonumber(null(n))
  if not n then return "" end
  return ("%d.%02d"):format(floor(n / 100), n % 100)
end

--- syntax: r = pages.layout(title, body, view)
function _M.layout(title, body, view)
  local nav = html.NONE
  if view.csrf then
    nav = render([[<nav><a href="/console">Overview</a>
<a href="/console/payments">Payments</a>
<a href="/console/payments?state=unknown">Unknown</a>
<a href="/console/outbox">Dead letters</a>
<a href="/console/reconcile">Reconciliation</a>{{logout}}</nav>]], {
      logout = view.token_mode and render([[
<form class="inline" method="post" action="/console/logout"><input
type="hidden" name="csrf" value="{{csrf}}"><button>Log out</button></form>]],
        { csrf = view.csrf }) or html.NONE })
  end
  return render([[<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>{{title}} - paygate console</title>
<link rel="stylesheet" href="/console/static/console.css">{{refresh}}
</head><body><header>{{nav}}</header><main>
<h1>{{title}}</h1>{{flash}}{{body}}</main></body></html>
]], { title = title, nav = nav, body = body,
      refresh = view.refresh and render(
        "\n<meta http-equiv=\"refresh\" content=\"{{s}}\">",
        { s = view.refresh }) or html.NONE,
      flash = view.flash and render("<p class=\"flash\">{{f}}</p>",
                                    { f = view.flash }) or html.NONE })
end

function _M.failed(err)
  return render("<p class=\"error\">The store could not be read: {{e}}</p>",
                { e = tostring(err) })
end

-- csrf: the login form's token (bound to its pre-session cookie); dest:
-- the console page to go to after it (checked by the caller), or nil
function _M.login(csrf, msg, dest)
  return render([[{{msg}}<form method="post" action="/console/login">
<input type="hidden" name="csrf" value="{{csrf}}">{{next}}
<label>Console token <input type="password" name="token"
autocomplete="current-password" required></label>
<button>Log in</button></form>]], { csrf = csrf, msg = msg and render(
    "<p class=\"error\">{{m}}</p>", { m = msg }) or html.NONE,
    next = dest and render("<input type=\"hidden\" name=\"next\""
      .. " value=\"{{n}}\">", { n = dest }) or html.NONE })
end

-- the hidden field naming the page a lever's form is on (view.here): a POST
-- that finds the session over offers the login with it, so the login goes
-- back there
local function here(view)
  return view.here and render("<input type=\"hidden\" name=\"next\""
    .. " value=\"{{n}}\">", { n = view.here }) or html.NONE
end

-- A POST form with the CSRF token and one button.
local function lever(view, action, label, fields, class)
  local hidden = { here(view) }
  for k, v in pairs(fields or {}) do
    hidden[#hidden + 1] = render(
      "<input type=\"hidden\" name=\"{{k}}\" value=\"{{v}}\">",
      { k = k, v = v })
  end
  return render([[<form class="inline" method="post" action="{{a}}"><input
type="hidden" name="csrf" value="{{c}}">{{h}}<button
class="{{cl}}">{{l}}</button></form>]],
    { a = action, c = view.csrf, h = join(hidden), l = label,
      cl = class or "" })
end

local function table_of(heads, rows)
  local th = {}
  for i, h in ipairs(heads) do th[i] = render("<th>{{h}}</th>", { h = h }) end
  local tr = {}
  for i, r in ipairs(rows) do
    local td = {}
    for j = 1, #heads do
      local v = r[j]
      if v == nil then v = "" end
      td[j] = render("<td>{{v}}</td>", { v = v })
    end
    tr[i] = render("<tr>{{d}}</tr>", { d = join(td) })
  end
  if not rows[1] then
    return render("<p class=\"empty\">None.</p>", {})
  end
  return render("<table><thead><tr>{{h}}</tr></thead><tbody>{{r}}"
    .. "</tbody></table>", { h = join(th), r = join(tr) })
end

local function link(href, text)
  return render("<a href=\"{{h}}\">{{t}}</a>", { h = href, t = text })
end

local function payment_link(id)
  return link("/console/payments/" .. html.url_encode(id), id)
end

-- A refund's state as the console says it: an abnormal one with what a
-- person must do (WeChat could not pay it back; the gateway has no lever
-- for the application, which needs the payer's bank details)
local function refund_state(rf)
  if rf.state ~= "abnormal" then return rf.state end
  return "abnormal: owed to the payer; apply for the abnormal refund with"
    .. " its refund_id (merchant platform, or wx:abnormal_refund)"
end

-- Money taken on an attempt the payment no longer counted on (gw.apply's
-- late and duplicate payments): the paid attempt of a payment paid late
-- (closed, or on a superseded attempt), and every other attempt paid (money
-- taken twice), each with what became of it: refunded automatically
-- (on_late_payment = "refund", the refund of kind late_payment or
-- duplicate on that out_trade_no) or kept with the merchant (the alarm
-- mode, or an automatic refund WeChat refused or closed). Said above the
-- payment's fields, as money refunded elsewhere is: finance accounts for
-- it here. p: the payment row; attempts, refunds: its rows (refunds with
-- out_trade_no). returns: markup, "" when there is none.
local KEPT = { failed = true, closed = true }
local function late_money(p, attempts, refunds)
  local paid_no = null(p.paid_out_trade_no)
  local late = p.late == 1 or p.late == true
  local items, kept = {}, false
  for _, a in ipairs(attempts) do
    local twice = a.state == "paid" and a.out_trade_no ~= paid_no
    if twice or (late and a.out_trade_no == paid_no) then
      local auto
      for _, rf in ipairs(refunds) do
        if rf.kind ~= "merchant" and rf.out_trade_no == a.out_trade_no then
          auto = rf
        end
      end
      local what, held
      if not auto then
        held = true
        what = twice and "kept for a person (on_late_payment = alarm): a"
          .. " refund made here returns the payment's own order, not this"
          .. " one; return it in the merchant platform"
          or "kept for a person (on_late_payment = alarm): a refund made"
          .. " here returns it"
      elseif KEPT[auto.state] then
        held = true
        what = "its automatic refund " .. auto.id .. " ended " .. auto.state
          .. ": nothing went back, the money stays with the merchant until"
          .. " a person returns it"
      elseif auto.state == "succeeded" then
        what = "refunded automatically (" .. auto.id .. ")"
      else
        what = "being refunded automatically (" .. auto.id .. ", "
          .. refund_state(auto) .. ")"
      end
      if not twice and (not auto or KEPT[auto.state])
         and (tonumber(p.refunded) or 0) >= (tonumber(p.amount) or 0) then
        -- the payment's own order, refunded in full through the merchant
        -- API since: a person returned it
        held = false
        what = what .. "; since refunded in full here (see Refunds)"
      end
      kept = kept or held
      items[#items + 1] = render("<li>{{no}} ({{n}}), {{amount}}, transaction"
        .. " {{tx}}: {{what}}</li>", { no = a.out_trade_no,
        n = twice and "paid twice" or "paid late",
        amount = fen(p.amount) .. " " .. p.currency,
        tx = null(a.transaction_id) or "?", what = what })
    end
  end
  if not items[1] then return "" end
  return render([[<div class="{{cls}}"><p>Money taken on a closed or
superseded attempt (a late payment, or a payment made twice):</p>
<ul>{{items}}</ul></div>]], { cls = kept and "bad" or "note",
    items = join(items) })
end

------------------------------------------------ notification answer times

-- Histogram buckets (seconds) of the notification route's answer time,
-- one set of counters per minute in the shared dictionary (two hours).
local BUCKETS = { 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 4, 5, 6,
                  math.huge }
local NOTIFY = "/wechatpay/notify/"

function _M.record_answer_times()
  local D = shared.get_dict("paygate")
  paygate.before(function(req)
    if req.path:sub(1, #NOTIFY) == NOTIFY then
      req.console_t0 = core.mono()
    end
    return nil
  end)
  paygate.after(function(req)
    local t0 = req.console_t0
    if not t0 then return end
    local dt = core.mono() - t0
    local b = 1
    while dt > BUCKETS[b] do b = b + 1 end
    local minute = floor(core.time() / 60)
    D:incr("gw:cn:" .. minute .. ":" .. b, 1, 0, 7200)
  end)
end

-- { { minute, n, p50, p99 } ... } for the last 60 minutes (p: the bucket's
-- upper bound; nil without notifications)
local function answer_times(now)
  local D = shared.get_dict("paygate")
  local out, last = {}, floor(now / 60)
  for m = last - 59, last do
    local counts, n = {}, 0
    for b = 1, #BUCKETS do
      counts[b] = tonumber(D:get("gw:cn:" .. m .. ":" .. b)) or 0
      n = n + counts[b]
    end
    local p = { minute = m, n = n }
    if n > 0 then
      local acc = 0
      for b = 1, #BUCKETS do
        acc = acc + counts[b]
        if not p.p50 and acc >= 0.5 * n then p.p50 = BUCKETS[b] end
        if not p.p99 and acc >= 0.99 * n then p.p99 = BUCKETS[b] end
      end
    end
    out[#out + 1] = p
  end
  return out
end
_M.answer_times = answer_times

-- A percentile known by its histogram bucket: "under 0.25 s", "over 6 s"
local function bound(v)
  if v == math.huge then return "over " .. BUCKETS[#BUCKETS - 1] .. " s" end
  return "under " .. tostring(v) .. " s"
end

-- The chart: bars of notifications per minute (grey, own scale), p50
-- (blue) and p99 (orange) answer times against the 5 s window (red line).
local function chart(points)
  local W, H, TOP = 600, 160, 6     -- TOP: seconds at the top of the chart
  local bw = W / #points
  local most = 1
  for _, p in ipairs(points) do most = max(most, p.n) end
  local bars, dots = {}, {}
  local function y(sec) return H - min(sec, TOP) / TOP * H end
  for i, p in ipairs(points) do
    local x = (i - 1) * bw
    if p.n > 0 then
      local h = p.n / most * H * 0.9
      bars[#bars + 1] = render("<rect class=\"n\" x=\"{{x}}\" y=\"{{y}}\""
        .. " width=\"{{w}}\" height=\"{{h}}\"><title>{{t}}</title></rect>",
        { x = ("%.1f"):format(x), y = ("%.1f"):format(H - h),
          w = ("%.1f"):format(bw - 1), h = ("%.1f"):format(h),
          t = os.date("!%H:%M", p.minute * 60) .. "Z: " .. p.n
            .. " notifications, p50 " .. bound(p.p50) .. ", p99 "
            .. bound(p.p99) .. " (histogram buckets)" })
      for _, q in ipairs({ { "p50", p.p50 }, { "p99", p.p99 } }) do
        dots[#dots + 1] = render("<circle class=\"{{c}}\" cx=\"{{x}}\""
          .. " cy=\"{{y}}\" r=\"3\"></circle>", { c = q[1],
          x = ("%.1f"):format(x + bw / 2), y = ("%.1f"):format(y(q[2])) })
      end
    end
  end
  return render([[<svg class="chart" viewBox="0 0 {{w}} {{h}}" width="{{w}}"
height="{{h}}" role="img" aria-label="notifications per minute and answer
times, last hour">{{bars}}<line class="window" x1="0" x2="{{w}}" y1="{{wy}}"
y2="{{wy}}"></line><text x="4" y="{{ty}}">5 s window</text>{{dots}}</svg>]],
    { w = W, h = H, bars = join(bars), dots = join(dots),
      wy = ("%.1f"):format(y(WINDOW)), ty = ("%.1f"):format(y(WINDOW) - 4) })
end

---------------------------------------------------------------- overview

-- st: gw.upstream.status (GET /admin/upstream's answer)
local function degrade_box(view, st)
  local on = st.degraded
  return render([[<section><h2>Degradation switch</h2>
<p class="{{cl}}">{{state}}</p>{{form}}</section>]], {
    cl = on and "bad" or "good",
    state = on and "ON: calls to WeChat fail at once" or "off",
    form = lever(view, "/console/degrade", on and "Switch off" or "Switch on",
                 { on = on and "0" or "1" }, on and "" or "danger") })
end

-- WeChat's endpoints whose circuit breaker is not closed (shared by the
-- workers: the same on every page, whichever worker draws it)
local function breakers_box(st)
  local list, total = upstream.not_closed(st)
  if #list == 0 then
    return render([[<section><h2>Circuit breakers</h2>
<p class="good">all {{n}} closed</p></section>]], { n = total })
  end
  local rows = {}
  for i, b in ipairs(list) do
    -- (the gauge's state: half-open once the cool-down is over)
    rows[i] = { b.mchid, b.endpoint, render("<span class=\"bad\">{{s}}"
      .. "</span>", { s = b.breaker == "half_open" and "half-open (a probe"
        .. " is out)" or upstream.state(b) == upstream.STATE.half_open
        and "half-open (the next call is the probe)" or "open" }),
      b.retry_after and (b.retry_after > 0 and b.retry_after .. " s"
                         or "the next call") or "",
      b.failures .. " of " .. b.calls }
  end
  return render([[<section><h2>Circuit breakers</h2>
<p class="bad">{{n}} of {{t}} not closed: calls to these endpoints fail at
once (writes answer 503, reads are stale) until a probe is answered</p>
{{tab}}</section>]], {
    n = #list, t = total, tab = table_of({ "merchant", "endpoint", "state",
      "probe in", "failures (window)" }, rows) })
end

-- the end of the merchant's own certificate, as its WeChat Pay client
-- signs with it now: a set swapped in from etcd (gw.credentials) replaces
-- it in the running client, so the file or PEM of the config is not read
-- (it would show the certificate of the start until a restart); nil when
-- the client was given merchant_serial without the certificate
local function merchant_cert_not_after(m)
  local wx = ctx.wx[m.mchid]
  local conf = wx and wx.conf
  return type(conf) == "table" and tonumber(conf.merchant_not_after) or nil
end

-- Whole days left, rounded down; past the end "expired N days ago" (a
-- certificate that expired an hour ago has expired today, not -1 days).
local function days_cell(days)
  if days < 0 then
    local ago = floor(-days)
    return render("<span class=\"bad\">expired {{a}}</span>", {
      a = ago == 0 and "today" or ago .. (ago == 1 and " day" or " days")
          .. " ago" })
  end
  local d = floor(days)
  return render("<span class=\"{{c}}\">{{d}} {{u}}</span>", {
    c = days < 30 and "bad" or "good", d = d, u = d == 1 and "day"
    or "days" })
end
_M.days_cell = days_cell

local function certs_box()
  local rows, now = {}, core.time()
  for _, m in ipairs(ctx.merchants) do
    local wx = ctx.wx[m.mchid]
    local st = wx and certs.status(wx, now)
    local days = type(st) == "table" and st.days_left
    local text
    if days then
      text = days_cell(days)
    elseif type(st) == "table" and st.public_key_id then
      text = "public key (does not expire)"
    else
      text = "no valid platform certificate loaded"
    end
    local na = merchant_cert_not_after(m)
    rows[#rows + 1] = { m.mchid, text,
                        na and days_cell((na - now) / 86400) or "not given" }
  end
  return render("<section><h2>Certificates</h2>{{t}}</section>",
    { t = table_of({ "merchant", "newest valid platform certificate",
                     "merchant certificate" }, rows) })
end

-- What a run in the list did: reconciled (an empty bill said), WeChat
-- not ready yet, or failed and why (reconcile.bill_unreconciled, by
-- the job or the console: gw.reconcile.bill_day records those)
local function run_outcome(what, ev)
  if what == "reconcile.bill" then
    return ev.empty and "reconciled (empty bill)" or "reconciled"
  elseif ev.outcome == "not_ready" then
    return "not ready yet (STATEMENT_CREATING)"
  end
  return "failed: " .. tostring(ev.error)
end

-- The bill reconciliation's runs, newest first: reconciled (entries
-- reconcile.bill under reconcile:<date>) or not (reconcile.bill_unreconciled
-- under reconcile_run:<date>), read through the primary key's subject
-- ranges -- the audit table holds every payment's history and `what` has
-- no index of its own: a scan of it would grow with the payments. Runs
-- recorded in the same millisecond (a lever running several days, a fast
-- test): the later day first, then the later run.
local function bill_runs(limit)
  return ctx.db:query("SELECT subject, at, what, actor, evidence"
    .. " FROM paygate_audit WHERE ((subject >= 'reconcile:' AND subject <"
    .. " 'reconcile;') OR (subject >= 'reconcile_run:' AND subject <"
    .. " 'reconcile_run;')) AND what IN ('reconcile.bill',"
    .. " 'reconcile.bill_unreconciled')"
    .. " ORDER BY at DESC, subject DESC, seq DESC LIMIT $1", { limit })
end

function _M.overview(view)
  local db, now = ctx.db, core.time()
  local parts = {}
  -- a store put back from a backup, with days still to reconcile: first,
  -- as the start's warning says it (gw.boot.restored)
  local restored = require("gw.boot").restored(db)
  if restored and restored.days[1] then
    local days = {}
    for i, d in ipairs(restored.days) do
      days[i] = link("/console/reconcile?date=" .. html.url_encode(d), d)
    end
    parts[#parts + 1] = render([[<section><h2>Restored store</h2>
<p class="bad">This store was restored from a backup: it knows nothing done
after {{t}}. Payments and refunds made since are at WeChat only. Run the bill
reconciliation of {{days}} (once WeChat has made each bill): their
missing_local lines are those. See docs/gateway.md, Backups and
recovery.</p></section>]], { t = when(restored.copy_newest),
      days = join(days, ", ") })
  end
  -- each count links to the list of the same payments: that state, created
  -- since the same moment (since=), not the state's list of all time
  local since = floor(now) - 86400
  local rows, err = db:query("SELECT state, COUNT(*) AS n FROM gw_payments"
    .. " WHERE created_at >= $1 GROUP BY state ORDER BY state", { since })
  local list = {}
  for _, r in ipairs(rows or {}) do
    list[#list + 1] = { link("/console/payments?state="
      .. html.url_encode(r.state) .. "&since=" .. since, r.state), r.n }
  end
  parts[#parts + 1] = render("<section><h2>Payments, last 24 h</h2>{{t}}"
    .. "</section>", { t = rows and table_of({ "state", "payments" }, list)
                       or _M.failed(err) })

  local pts = answer_times(now)
  local total, worst = 0, nil
  for _, p in ipairs(pts) do
    total = total + p.n
    if p.p99 then worst = max(worst or 0, p.p99) end
  end
  parts[#parts + 1] = render([[<section><h2>Notifications, last hour</h2>
<p>{{n}} answered; worst p99 {{w}} (WeChat waits 5 s).</p>{{c}}</section>]],
    { n = total, w = worst and (worst == math.huge and "over 6 s"
        or ("under " .. worst .. " s")) or "-", c = chart(pts) })

  -- refused notifications (gw.history): the last ones, with why
  rows, err = db:query("SELECT received_at, mchid, kind, reason, serial,"
    .. " authentic, out_trade_no, notification_id FROM"
    .. " gw_notifications_refused WHERE received_at >= $1 ORDER BY"
    .. " received_at DESC LIMIT 10", { now - 86400 })
  list = {}
  for _, r in ipairs(rows or {}) do
    -- paygate doctor's unsigned probe is refused on purpose: said so (its
    -- id is only claimed, so the row stays, named as a claim)
    local why = r.reason
    if r.notification_id == "paygate-doctor-probe" then
      why = tostring(why) .. " (claims to be paygate doctor's probe, "
            .. "which must be refused)"
    end
    list[#list + 1] = { when(r.received_at), r.mchid, r.kind, why,
      null(r.serial) or "", tonumber(r.authentic) ~= 1 and "no"
        or null(r.out_trade_no) and link("/console/payments?q="
          .. html.url_encode(r.out_trade_no), "yes: " .. r.out_trade_no)
        or "yes (a refund)" }
  end
  parts[#parts + 1] = render("<section><h2>Notifications refused, last"
    .. " 24 h (latest 10)</h2>{{t}}</section>", { t = rows and table_of({
      "received", "merchant", "refused as", "why", "serial",
      "decrypts (order)" }, list) or _M.failed(err) })

  -- refunds WeChat could not pay back (abnormal): owed to the payer until a
  -- person applies for them, whatever their age (index gw_refunds_abnormal)
  rows, err = db:query("SELECT r.id, r.payment_id, r.out_refund_no,"
    .. " r.refund_id, r.amount, r.updated_at, p.mchid, p.sub_mchid FROM"
    .. " gw_refunds r"
    .. " JOIN gw_payments p ON p.id = r.payment_id WHERE r.state ="
    .. " 'abnormal' ORDER BY r.updated_at DESC LIMIT 11")
  list = {}
  for i, r in ipairs(rows or {}) do
    if i <= 10 then
      list[i] = { payment_link(r.payment_id), r.out_refund_no,
                  null(r.refund_id) or "", apply.merchant(r), fen(r.amount),
                  when(r.updated_at) }
    end
  end
  parts[#parts + 1] = render("<section><h2>Abnormal refunds (to apply"
    .. " for)</h2><p class=\"note\">WeChat could not pay these back (the"
    .. " payer's card closed, ...): the money is owed to the payer until"
    .. " someone applies for it with the refund_id, in the merchant"
    .. " platform or through WeChat's abnormal-refund API.{{more}}</p>{{t}}"
    .. "</section>", { more = rows and rows[11] and " The newest 10 are"
      .. " shown; more are waiting." or "", t = rows and table_of({
      "payment", "out_refund_no", "refund_id", "merchant", "amount",
      "abnormal since" }, list) or _M.failed(err) })

  rows, err = db:query("SELECT state, COUNT(*) AS n FROM paygate_outbox"
    .. " GROUP BY state ORDER BY state")
  list = {}
  for _, r in ipairs(rows or {}) do
    list[#list + 1] = { r.state == "dead" and link("/console/outbox",
      "dead letters") or r.state, r.n }
  end
  parts[#parts + 1] = render("<section><h2>Outbox</h2>{{t}}</section>",
    { t = rows and table_of({ "state", "events" }, list) or _M.failed(err) })

  -- the last runs, reconciled or not (a failed run is what the operator
  -- must see here; it was left out, only successful ones were listed)
  rows, err = bill_runs(3)
  list = {}
  for _, r in ipairs(rows or {}) do
    local ev = json.decode(tostring(r.evidence)) or {}
    local c = type(ev.counts) == "table" and ev.counts or {}
    list[#list + 1] = { link("/console/reconcile?date=" .. html.url_encode(
      tostring(ev.date)) .. "&merchant=" .. html.url_encode(
      tostring(ev.merchant)), tostring(ev.date)), tostring(ev.merchant),
      r.what == "reconcile.bill" and (c.total or "?") or "",
      run_outcome(r.what, ev) }
  end
  parts[#parts + 1] = render("<section><h2>Last reconciliations</h2>{{t}}"
    .. "</section>", { t = rows and table_of({ "date", "merchant",
      "mismatches", "outcome" }, list) or _M.failed(err) })
  local st = upstream.status(ctx)
  parts[#parts + 1] = degrade_box(view, st)
  parts[#parts + 1] = breakers_box(st)
  parts[#parts + 1] = certs_box()
  return join(parts)
end

---------------------------------------------------------------- payments

--- syntax: row, err = pages.payment_row(id) -- false when none
function _M.payment_row(id)
  local rows, err = ctx.db:query("SELECT * FROM gw_payments WHERE id = $1",
                                 { id })
  if not rows then return nil, err end
  return rows[1] or false
end

-- The keyset cursor: created_at (exact, %.17g) and id of the last row.
local function cursor(r)
  return ("%.17g"):format(r.created_at) .. "~" .. r.id
end

--- syntax: at, id = pages.parse_cursor(after)
-- The payments page's "Older" cursor (cursor() above): a finite time and
-- a payment id, or nil for anything else.
function _M.parse_cursor(after)
  local at, id = tostring(after or ""):match("^([%d.e+-]+)~(pay_%w+)$")
  at = tonumber(at)
  if not at or at ~= at or at == math.huge or at == -math.huge then
    return nil
  end
  return at, id
end

--- syntax: t = pages.parse_since(since)
-- The payments page's window (since=, the overview's links): whole
-- seconds since the epoch, or nil for anything else.
function _M.parse_since(since)
  if type(since) ~= "string" or not since:match("^%d+$") or #since > 12 then
    return nil
  end
  return tonumber(since)
end

--- syntax: sub = pages.parse_sub_mchid(v)
-- The payments page's sub-merchant filter (sub_mchid=): a sub-merchant's
-- mchid, 1 to 32 digits, as a create takes it; "" (the form's empty
-- field) is no filter. returns: the mchid, false for none, nil for
-- anything else.
function _M.parse_sub_mchid(v)
  if v == nil or v == "" then return false end
  if type(v) ~= "string" or #v > 32 or not v:match("^%d+$") then
    return nil
  end
  return v
end

local LIST_COLS = "SELECT id, mchid, sub_mchid, out_trade_no,"
  .. " transaction_id, state, amount, description, created_at FROM"
  .. " gw_payments"

--- syntax: sql, params = pages.list_sql(q)
-- The payments page's list without a search term: q's filters (state,
-- since, sub_mchid: a service provider's sub-merchant, read by migration
-- 015's index) and its "Older" cursor (after), newest first, one row past
-- a page (whether there is an older one).
function _M.list_sql(q)
  local where, params = {}, {}
  if type(q.state) == "string" and q.state ~= "" then
    params[#params + 1] = q.state
    where[#where + 1] = "state = $" .. #params
  end
  local sub = _M.parse_sub_mchid(q.sub_mchid)
  if sub then
    params[#params + 1] = sub
    where[#where + 1] = "sub_mchid = $" .. #params
  end
  local since = _M.parse_since(q.since)
  if since then
    params[#params + 1] = since
    where[#where + 1] = "created_at >= $" .. #params
  end
  local at, id = _M.parse_cursor(q.after)
  if at then
    params[#params + 1] = at
    params[#params + 1] = id
    where[#where + 1] = "(created_at < $" .. (#params - 1)
      .. " OR (created_at = $" .. (#params - 1) .. " AND id < $"
      .. #params .. "))"
  end
  return LIST_COLS .. (where[1] and (" WHERE "
    .. table.concat(where, " AND ")) or "") .. " ORDER BY created_at DESC,"
    .. " id DESC LIMIT " .. (PAGE + 1), params
end

--- syntax: sql, params = pages.search_sql(term[, sub_mchid])
-- The payments a console search finds: an exact id, out_trade_no or
-- transaction_id (any attempt's: a payment's transaction_id is its paid
-- attempt's, migration 016), order_id (any app's: several may use the
-- same), a refund's out_refund_no or the merchant's reference of a refund
-- (migration 014's index). order_id has no index of its own (only
-- (app_id, order_id)): its subquery reads the table once, apart, so the
-- other terms keep theirs. A sub-merchant given too keeps its payments
-- only.
function _M.search_sql(term, sub)
  return LIST_COLS .. " WHERE (id = $1"
    .. " OR id IN (SELECT payment_id FROM gw_attempts WHERE"
    .. " out_trade_no = $1 OR transaction_id = $1) OR id IN (SELECT"
    .. " payment_id FROM gw_refunds WHERE out_refund_no = $1) OR id IN"
    .. " (SELECT payment_id FROM gw_refunds WHERE reference = $1) OR id IN"
    .. " (SELECT id FROM gw_payments WHERE order_id = $1))"
    .. (sub and " AND sub_mchid = $2" or "")
    .. " ORDER BY created_at DESC LIMIT " .. PAGE, { term, sub or nil }
end

function _M.payments(q, view)
  local db = ctx.db
  local term = type(q.q) == "string" and q.q:gsub("^%s+", "")
                 :gsub("%s+$", "") or ""
  local sub = _M.parse_sub_mchid(q.sub_mchid)
  local rows, err
  if term ~= "" then
    rows, err = db:query(_M.search_sql(term, sub))
  else
    rows, err = db:query(_M.list_sql(q))
  end
  if not rows then return nil, err end
  local more = rows[PAGE + 1] ~= nil
  local list = {}
  for i = 1, min(#rows, PAGE) do
    local r = rows[i]
    list[i] = { payment_link(r.id), apply.merchant(r), r.out_trade_no,
                null(r.transaction_id) or "", r.state, fen(r.amount),
                r.description, when(r.created_at) }
  end
  local next_link = html.NONE
  if more then
    next_link = link("/console/payments?after="
      .. html.url_encode(cursor(rows[PAGE])) .. (q.state and ("&state="
      .. html.url_encode(q.state)) or "") .. (sub and ("&sub_mchid="
      .. sub) or "") .. (q.since and term == ""
      and ("&since=" .. html.url_encode(q.since)) or ""), "Older")
  end
  local window = html.NONE
  local since = term == "" and _M.parse_since(q.since)
  if since or sub then
    -- what the list is narrowed to: a window, a state, a sub-merchant
    local what = {}
    if since then what[#what + 1] = "created since " .. when(since) end
    if type(q.state) == "string" and q.state ~= "" and term == "" then
      what[#what + 1] = "state " .. q.state
    end
    if sub then what[#what + 1] = "sub-merchant " .. sub end
    local text = table.concat(what, ", ")
    window = render("<p class=\"note\">{{t}}.</p>",
                    { t = text:sub(1, 1):upper() .. text:sub(2) })
  end
  return render([[<form method="get" action="/console/payments"><label>
Search <input name="q" value="{{term}}" placeholder="payment id,
out_trade_no, transaction_id, order_id or out_refund_no"></label><label>
Sub-merchant <input name="sub_mchid" value="{{sub}}" size="12"
placeholder="sub_mchid" inputmode="numeric"></label><button>Find</button></form>
{{window}}{{t}}<p class="pager">{{next}}</p>]], {
    term = term, sub = sub or "", next = next_link, window = window,
    t = table_of({ "payment", "merchant", "out_trade_no", "transaction_id",
                   "state", "amount", "description", "created" }, list) })
end

local function verify_box(subject)
  local ok, rep = audit.verify(ctx.db, subject)
  if ok == nil then
    return render("<p class=\"bad\">chain not verified: {{e}}</p>",
                  { e = tostring(rep) })
  end
  if ok then
    return render("<p class=\"good\">hash chain verified: {{n}} entries"
      .. "</p>", { n = rep.entries })
  end
  return render("<p class=\"bad\">hash chain BROKEN at seq {{s}}: {{r}} "
    .. "({{m}})</p>", { s = rep.seq, r = rep.reason, m = rep.message })
end

-- The notifications recorded about an order or a refund, by their
-- business key (gw.apply's: pay|<merchant>|<out_trade_no>|<trade_state>,
-- refund|<out_refund_no>|<refund_status>): the keys that begin with a
-- prefix ending in "|", read as a range of gw_notifications_business
-- (migration 008) -- from the prefix up to, not including, the prefix
-- with that "|" made the next byte, "}": exactly the keys that begin with
-- it. A LIKE '%|<no>|%' read the whole table for each attempt (the table
-- holds a day of every notification), and SQLite's LIKE, caseless, cannot
-- use an index even for a prefix. Byte order: PostgreSQL compares the
-- key COLLATE "C", as the index is built (a locale's order would not keep
-- one prefix's keys together).
local NOTES_SQL = {}
for _, engine in ipairs({ "sqlite", "postgres" }) do
  local key = engine == "postgres" and 'business_key COLLATE "C"'
              or "business_key"
  NOTES_SQL[engine] = "SELECT id, event_type, business_key, received_at,"
    .. " outcome FROM gw_notifications WHERE " .. key .. " >= $1 AND "
    .. key .. " < $2"
end
_M.NOTES_SQL = NOTES_SQL

local function notes_upto(prefix)
  return prefix:sub(1, -2) .. "}"
end

--- syntax: prefix = pages.payment_notes_prefix(p, out_trade_no)
-- The business key's start of an attempt's notifications: gw.apply's
-- key with the payment's merchant (a notification naming another one is
-- refused, merchant_mismatch, and not recorded) and no trade state.
function _M.payment_notes_prefix(p, no)
  local sub = null(p.sub_mchid)
  return apply.payment_key({ mchid = not sub and p.mchid or nil,
    sp_mchid = sub and p.mchid or nil, sub_mchid = sub,
    out_trade_no = no, trade_state = "" })
end

--- syntax: markup, err = pages.payment(id, view) -- false: no such payment
function _M.payment(id, view)
  local db = ctx.db
  local p, err = _M.payment_row(id)
  if not p then return p, err end
  -- its refunds, oldest first (what is left to refund is read from them);
  -- their numbers also find the notifications, calls and refusals that
  -- name them
  local refunds
  refunds, err = model.refunds_of(db, id)
  if not refunds then return nil, err end
  -- the ids the payment JSON carries: a service provider's sub-merchant
  -- and its own appid only when the payment names them (the row left out,
  -- not shown empty: a direct merchant's payment has neither)
  local fields = {
    { "state", p.state }, { "amount", fen(p.amount) .. " " .. p.currency },
    { "description", p.description }, { "order_id", p.order_id },
    { "app", p.app_id }, { "merchant", p.mchid } }
  if null(p.sub_mchid) then
    fields[#fields + 1] = { "sub_mchid", p.sub_mchid }
  end
  fields[#fields + 1] = { "appid", p.appid }
  if null(p.sub_appid) then
    fields[#fields + 1] = { "sub_appid", p.sub_appid }
  end
  for _, f in ipairs({
    { "out_trade_no", p.out_trade_no },
    { "transaction_id", null(p.transaction_id) or "" },
    { "refunded", fen(p.refunded) },
    { "refundable", fen(model.refundable(p, refunds)) },
    { "created", when(p.created_at) },
    { "updated", when(p.updated_at) }, { "expires", when(p.expires_at) },
  }) do fields[#fields + 1] = f end
  local summary = table_of({ "field", "value" }, fields)
  -- money refunded outside this gateway (gw.apply's refunded_elsewhere):
  -- said above all, with where its details are, before someone refunds
  -- it again here
  local elsewhere = ""
  if null(p.refunded_elsewhere_at) then
    elsewhere = render([[<p class="bad">Money of this payment was
refunded outside this gateway (in the merchant platform, by another system
on the merchant number, or after the backup its store was restored from),
first seen {{at}}: the refunds and the refunded total here are only those
made here. WeChat's order query names no refund, and its refund query needs an
out_refund_no this gateway does not have: the day's trade bill lists the
refund (Reconcile: a <code>missing_local</code> refund line of this
payment's out_trade_no); the timeline's <code>refunded_elsewhere</code>
entry says how it was seen. Refund here no more than WeChat has
left.</p>]], { at = when(p.refunded_elsewhere_at) })
  end
  local attempts
  attempts, err = db:query("SELECT out_trade_no, n, channel, state,"
    .. " transaction_id, created_at, closed_at, sub_appid FROM gw_attempts"
    .. " WHERE payment_id = $1 ORDER BY n", { id })
  if not attempts then return nil, err end
  summary = join({ elsewhere, late_money(p, attempts, refunds), summary })
  local settle = lever(view, "/console/payments/" .. html.url_encode(id)
    .. "/settle", "Query WeChat now", {})

  local entries
  entries, err = audit.entries(db, "payment:" .. id)
  if not entries then return nil, err end
  local tl = {}
  for i, e in ipairs(entries) do
    tl[i] = { e.seq, when((tonumber(e.at) or 0) / 1000), e.what,
              (null(e.from) or "") .. " -> " .. (null(e.to) or ""),
              null(e.cause) or "", null(e.actor) or "",
              null(e.evidence) or "" }
  end

  -- each attempt's sub_appid, when one has any: a create resumed after
  -- WeChat refused one (not the sub-merchant's) made its attempts under
  -- two, and the refused one is the attempt to look at
  local sub_appids = false
  for _, a in ipairs(attempts) do
    sub_appids = sub_appids or null(a.sub_appid) ~= nil
  end
  local at_heads = { "n", "out_trade_no", "channel", "state",
                     "transaction_id", "created", "closed" }
  if sub_appids then table.insert(at_heads, 6, "sub_appid") end
  local at, nos = {}, {}
  for i, a in ipairs(attempts) do
    at[i] = { a.n, a.out_trade_no, a.channel, a.state,
              null(a.transaction_id) or "", when(a.created_at),
              when(a.closed_at) }
    if sub_appids then table.insert(at[i], 6, null(a.sub_appid) or "") end
    nos[a.out_trade_no] = true
  end

  -- the notifications whose business key names one of its attempts (and,
  -- below, one of its refunds): each a range of the key's index
  local nrows = {}
  local function notes_by(prefix)
    local rows, qerr = db:query(NOTES_SQL[db.engine],
                                { prefix, notes_upto(prefix) })
    if not rows then return nil, qerr end
    for _, r in ipairs(rows) do nrows[#nrows + 1] = r end
    return true
  end
  for no in pairs(nos) do
    local ok, nerr = notes_by(_M.payment_notes_prefix(p, no))
    if not ok then return nil, nerr end
  end

  local rfl = {}
  for i, rf in ipairs(refunds) do
    rfl[i] = { rf.id, rf.out_refund_no, null(rf.refund_id) or "",
               fen(rf.amount), refund_state(rf), rf.kind,
               null(rf.reference) or "", when(rf.created_at),
               when(rf.updated_at) }
  end
  for _, rf in ipairs(refunds) do
    local no = rf.out_refund_no
    local ok, nerr = notes_by("refund|" .. no .. "|")
    if not ok then return nil, nerr end
  end
  table.sort(nrows, function(a, b)
    return (tonumber(a.received_at) or 0) < (tonumber(b.received_at) or 0)
  end)
  local notes = {}
  for i, r in ipairs(nrows) do
    notes[i] = { r.id, r.event_type, r.business_key, when(r.received_at),
                 r.outcome }
  end

  -- the calls made to WeChat Pay about it, and the notifications about it
  -- that were refused (gw.history): by each attempt's and refund's number
  -- (a refund's call and a refund notification's refusal name both the
  -- refund and the attempt: found by the attempt's number, they are not
  -- taken again by the refund's)
  local calls, refused = {}, {}
  local function collect(column, no)
    local rows, qerr = db:query("SELECT at, method, path, outcome, status,"
      .. " code, request_id, attempts, ms, out_trade_no FROM"
      .. " gw_wechat_calls WHERE " .. column .. " = $1 ORDER BY at"
      .. " LIMIT 200", { no })
    if not rows then return nil, qerr end
    for _, r in ipairs(rows) do
      if column == "out_trade_no" or not nos[null(r.out_trade_no) or ""]
      then
        calls[#calls + 1] = r
      end
    end
    rows, qerr = db:query("SELECT received_at, kind, reason, serial,"
      .. " timestamp, notification_id, event_type, out_trade_no FROM"
      .. " gw_notifications_refused WHERE " .. column .. " = $1"
      .. " ORDER BY received_at LIMIT 200", { no })
    if not rows then return nil, qerr end
    for _, r in ipairs(rows) do
      if column == "out_trade_no" or not nos[null(r.out_trade_no) or ""]
      then
        refused[#refused + 1] = r
      end
    end
    return true
  end
  for no in pairs(nos) do
    local ok, cerr = collect("out_trade_no", no)
    if not ok then return nil, cerr end
  end
  for _, r in ipairs(refunds) do
    local ok, cerr = collect("out_refund_no", r.out_refund_no)
    if not ok then return nil, cerr end
  end
  table.sort(calls, function(a, b) return a.at < b.at end)
  table.sort(refused, function(a, b) return a.received_at < b.received_at end)
  local cl, rl = {}, {}
  for i, c in ipairs(calls) do
    cl[i] = { when(c.at), c.method .. " " .. c.path, c.outcome,
              null(c.status) or "", null(c.code) or "",
              null(c.request_id) or "", null(c.attempts) or "",
              tostring(c.ms) .. " ms" }
  end
  for i, r in ipairs(refused) do
    rl[i] = { when(r.received_at), null(r.notification_id) or "",
              null(r.event_type) or "", r.kind, r.reason,
              null(r.serial) or "", null(r.timestamp) or "" }
  end

  local evs
  evs, err = outbox.list(db, { subject = id, limit = 100 })
  if not evs then return nil, err end
  local el = {}
  for i, e in ipairs(evs) do
    el[i] = { e.id, e.type, e.state, deliveries(e), when(e.created_at),
              when(null(e.delivered_at)), null(e.last_error) or "",
              e.state == "dead" and lever(view, "/console/outbox/" .. e.id
                .. "/replay", "Replay", {}) or "" }
  end

  return render([[<section>{{summary}}<p>{{settle}}</p></section>
<section><h2>Timeline (audit trail)</h2>{{verify}}{{tl}}</section>
<section><h2>Attempts</h2>{{at}}</section>
<section><h2>Refunds</h2>{{rf}}</section>
<section><h2>Notifications received (verified)</h2>{{notes}}</section>
<section><h2>Notifications refused</h2><p class="note">Not applied: not
verified, or verified but naming another merchant than this payment's
(merchant_mismatch). Listed here when their resource decrypted under the
APIv3 key and names this payment (WeChat sends a refused notification
again).</p>{{refused}}
</section>
<section><h2>Calls to WeChat Pay</h2>{{calls}}</section>
<section><h2>Events</h2>{{ev}}</section>]], {
    summary = summary, settle = settle,
    verify = verify_box("payment:" .. id),
    tl = table_of({ "seq", "at", "what", "transition", "cause", "actor",
                    "evidence" }, tl),
    at = table_of(at_heads, at),
    rf = table_of({ "refund", "out_refund_no", "refund_id", "amount",
                    "state", "kind", "reference", "created", "updated" },
                  rfl),
    notes = table_of({ "id", "type", "key", "received", "outcome" }, notes),
    refused = table_of({ "received", "id (claimed)", "type (claimed)",
                         "refused as", "why", "serial", "timestamp" }, rl),
    calls = table_of({ "at", "call", "outcome", "status", "code",
                       "request id", "attempts", "took" }, cl),
    ev = table_of({ "id", "type", "state", "attempts", "created",
                    "delivered", "last error", "" }, el) })
end

------------------------------------------------------------- dead letters

function _M.dead_letters(q, view)
  local after = tonumber(q.after) or 0
  local rows, err = ctx.db:query("SELECT id, subject, type, attempts,"
    .. " prior_attempts, created_at, last_error FROM paygate_outbox WHERE"
    .. " state = 'dead'"
    .. " AND id > $1 ORDER BY id LIMIT " .. (PAGE + 1), { after })
  if not rows then return nil, err end
  local list = {}
  for i = 1, min(#rows, PAGE) do
    local e = rows[i]
    list[i] = { e.id, payment_link(e.subject), e.type, deliveries(e),
                when(e.created_at), null(e.last_error) or "",
                lever(view, "/console/outbox/" .. e.id .. "/replay",
                      "Replay", {}) }
  end
  return render("{{t}}<p class=\"pager\">{{next}}</p>", {
    t = table_of({ "id", "payment", "type", "attempts", "created",
                   "last error", "" }, list),
    next = rows[PAGE + 1] and link("/console/outbox?after="
      .. rows[PAGE].id, "More") or html.NONE })
end

---------------------------------------------------------- reconciliation

--- syntax: res, err = pages.run_bill(date)
-- The day's bill reconciliation for every merchant now (paygate's
-- reconcile.bill: the report, its audit entry reconcile:<date>). Each
-- merchant is run whatever the runs before it did (one whose run fails
-- must not leave the others unreconciled, unsaid).
-- returns: res = { total (mismatches of the runs that ended), failed (how
--   many runs failed), not_ready (how many found WeChat still making the
--   bill), merchants = { { merchant, mismatches, empty, lines,
--   local_rows } or { merchant,
--   not_ready = true, advice } or { merchant, error } ... } in the
--   config's order }, or nil, err (no merchant could be run: the folder)
function _M.run_bill(date)
  local dir = require("gw.config").bill_dir(ctx.gateway)
  if not dir then
    return nil, "set gateway.reconcile.bill_dir to run it from here"
  end
  -- made as the bill job makes it (mkdir(2), no shell: the path comes
  -- from the config); a folder that cannot be made says which and why
  local made, why = require("gw.config").mkdir_p(dir)
  if not made then return nil, why end
  -- gw.reconcile is the gateway's plug-in: loaded when this lever is used
  local gwr = require "gw.reconcile"
  local total, failed, not_ready, runs = 0, 0, 0, {}
  for _, m in ipairs(ctx.merchants) do
    -- (a raise, a fault on this side, fails this merchant's run only:
    -- logged, said, and the next merchant is run)
    local ok, report, err = pcall(gwr.bill_day, {
      wx = ctx.wx[m.mchid], db = ctx.db, dir = dir, date = date,
      mchid = m.mchid })
    if ok and report then
      total = total + report.counts.total
      -- (empty: WeChat has no trade of the day, NO_STATEMENT_EXIST;
      -- lines: the bill's lines compared with local_rows of ours)
      runs[#runs + 1] = { merchant = m.mchid,
                          mismatches = report.counts.total,
                          empty = report.empty, lines = report.lines,
                          local_rows = report.local_rows }
    elseif ok and type(err) == "table" and err.kind == "statement_creating"
    then
      -- WeChat has not made the day's bill yet: not a failure (it does
      -- not raise the bill alarm either); when to ask again is said
      not_ready = not_ready + 1
      runs[#runs + 1] = { merchant = m.mchid, not_ready = true,
        advice = gwr.not_ready_advice(date, core.time(), gwr.conf(ctx),
                                      gwr.last_asked(date, m.mchid)) }
    else
      if not ok then
        paygate.log.error("gateway: console bill reconciliation failed", {
          merchant = m.mchid, date = date, error = tostring(report) })
        err = "internal error (the gateway's log says why)"
      end
      failed = failed + 1
      runs[#runs + 1] = { merchant = m.mchid, error = tostring(err) }
    end
  end
  return { total = total, failed = failed, not_ready = not_ready,
           merchants = runs }
end

-- The payments of a report's rows, where known here: a map from each row
-- (its index) to the payment id of its refund (out_refund_no), else of
-- its attempt (out_trade_no), for the merchant's rows only; nil, err.
-- rows are the CSV's cells in head's columns. The numbers come from
-- WeChat's bill (outside input): bound as parameters, never spliced in.
local function row_payments(mchid, head, rows)
  local found = {}
  if type(mchid) ~= "string" then return found end
  local col = {}
  for i, h in ipairs(head) do col[h] = i end
  -- the CSV puts a ' before a text starting as a formula would: taken off
  local function number(v)
    if type(v) ~= "string" or v == "" then return nil end
    local plain = v:match("^'([=+%-@\t\r].*)$")
    return plain or v
  end
  local function lookup(c, sql)
    if not c then return {} end
    local by, list, seen = {}, {}, {}
    for _, r in ipairs(rows) do
      local no = number(r[c])
      if no and not seen[no] then
        seen[no] = true
        list[#list + 1] = no
      end
    end
    for i = 1, #list, 200 do
      local ph, args = {}, { mchid }
      for j = i, min(#list, i + 199) do
        args[#args + 1] = list[j]
        ph[#ph + 1] = "$" .. #args
      end
      local got, err = ctx.db:query(sql .. " IN (" .. table.concat(ph, ",")
                                    .. ")", args)
      if not got then return nil, err end
      for _, g in ipairs(got) do by[g.no] = g.payment_id end
    end
    return by
  end
  local refunds, err = lookup(col.out_refund_no, "SELECT r.out_refund_no AS"
    .. " no, r.payment_id FROM gw_refunds r JOIN gw_payments p ON p.id ="
    .. " r.payment_id WHERE p.mchid = $1 AND r.out_refund_no")
  if not refunds then return nil, err end
  local attempts
  attempts, err = lookup(col.out_trade_no, "SELECT a.out_trade_no AS no,"
    .. " a.payment_id FROM gw_attempts a JOIN gw_payments p ON p.id ="
    .. " a.payment_id WHERE p.mchid = $1 AND a.out_trade_no")
  if not attempts then return nil, err end
  for i, r in ipairs(rows) do
    local no = number(r[col.out_refund_no or 0])
    found[i] = (no and refunds[no])
      or attempts[number(r[col.out_trade_no or 0]) or false]
  end
  return found
end

-- A report's rows, each known here with a last cell linking to its
-- payment's page (where its refunds are, and "Query WeChat now"). The
-- rows are shown whatever the links' lookup does: a store that fails it
-- leaves them without links, said above the table (the report is read;
-- only the links are missing).
local function mismatch_table(mchid, head, rows)
  local ids, err = row_payments(mchid, head, rows)
  local heads, out = {}, {}
  for i, h in ipairs(head) do heads[i] = h end
  heads[#heads + 1] = "payment here"
  for i, r in ipairs(rows) do
    local row = {}
    for j = 1, #head do row[j] = r[j] end
    row[#head + 1] = ids and ids[i] and payment_link(ids[i]) or ""
    out[i] = row
  end
  local t = table_of(heads, out)
  if ids then return t end
  return render("<p class=\"bad\">The payments of these rows could not be"
    .. " looked up ({{e}}): no links.</p>{{t}}",
    { e = tostring(type(err) == "table" and err.message or err), t = t })
end

-- A day's report whose file cannot be read on this instance (another
-- instance ran the day, the file was removed): the findings its audit
-- entry keeps (the first 500 at most, findings_omitted the rest), laid
-- out as the CSV's rows, rather than nothing. An entry that keeps none
-- (made before they were kept) says only that the file cannot be read.
local function kept_findings(ev)
  local fs = ev.findings
  if type(fs) ~= "table" then
    return render("<p class=\"bad\">The report {{f}} cannot be read"
      .. " here.</p>", { f = ev.file })
  end
  local rows = {}
  for i, f in ipairs(fs) do
    if type(f) ~= "table" then f = {} end
    local row = bill.row(ev.date, f)
    for j = 1, #bill.HEADER do
      row[j] = row[j] ~= nil and tostring(row[j]) or ""
    end
    rows[i] = row
  end
  local c = type(ev.counts) == "table" and ev.counts or {}
  local all = tonumber(c.total)
  local t = mismatch_table(ev.merchant, bill.HEADER, rows)
  return render("<h2>Mismatches of {{d}}, merchant {{m}}</h2><p class="
    .. "\"bad\">The report {{f}} cannot be read here: these are the {{k}}"
    .. "{{of}} mismatches its audit entry keeps.</p>{{t}}", {
      d = tostring(ev.date), m = tostring(ev.merchant), f = ev.file,
      k = tostring(#rows), of = all and all > #rows
        and (" of " .. tostring(all)) or "",
      t = t })
end

function _M.reconcile(q, view)
  -- every run, reconciled or not, newest first
  local rows, err = bill_runs(30)
  if not rows then return nil, err end
  local list, detail = {}, html.NONE
  for _, r in ipairs(rows) do
    local ev = json.decode(tostring(r.evidence)) or {}
    local c = type(ev.counts) == "table" and ev.counts or {}
    local done = r.what == "reconcile.bill"
    list[#list + 1] = { link("/console/reconcile?date="
      .. html.url_encode(tostring(ev.date)) .. "&merchant="
      .. html.url_encode(tostring(ev.merchant)), tostring(ev.date)),
      tostring(ev.merchant), done and (c.total or "?") or "",
      run_outcome(r.what, ev), tostring(r.actor),
      when((tonumber(r.at) or 0) / 1000) }
  end
  -- a date's report, of the merchant named (or the first one found): read
  -- from that date's own entries, newest first, not from the list above
  -- (the 30 newest runs: a day reconciled before them has its report too)
  if type(q.date) == "string" and q.date ~= "" then
    local day
    day, err = ctx.db:query("SELECT evidence FROM paygate_audit WHERE"
      .. " subject = $1 AND what = 'reconcile.bill' ORDER BY at DESC",
      { "reconcile:" .. q.date })
    if not day then return nil, err end
    for _, r in ipairs(day) do
      local ev = json.decode(tostring(r.evidence)) or {}
      if detail == html.NONE and type(ev.file) == "string"
         and (q.merchant == nil or q.merchant == tostring(ev.merchant)) then
        local head, cells, more = bill.read_csv(ev.file, 500)
        local c = type(ev.counts) == "table" and ev.counts or {}
        local t = head and mismatch_table(ev.merchant, head, cells)
        -- a longer report is cut here: said, with where the whole is
        detail = head and render("<h2>Mismatches of {{d}}, merchant {{m}}"
          .. "</h2>{{n}}{{t}}", { d = tostring(ev.date),
            m = tostring(ev.merchant), t = t,
            n = more and render("<p class=\"bad\">The first {{k}} of {{all}}"
              .. " mismatches; the whole report is {{f}}.</p>", { k = #cells,
              all = tostring(c.total or "more"), f = ev.file })
              or html.NONE }) or kept_findings(ev)
      end
    end
    if detail == html.NONE then
      detail = render("<p class=\"empty\">No bill reconciliation of {{d}}"
        .. "{{m}} is recorded.</p>", { d = q.date, m = q.merchant
          and (" for merchant " .. q.merchant) or "" })
    end
  end
  local yesterday = os.date("!%Y-%m-%d", floor(core.time()) + 8 * 3600
                            - 86400)
  return render([[<section><form method="post" action="/console/reconcile">
<input type="hidden" name="csrf" value="{{c}}">{{here}}<label>Date (Beijing)
<input name="date" value="{{y}}" pattern="\d{4}-\d{2}-\d{2}"></label>
<button>Run the bill reconciliation now</button></form></section>
{{t}}{{detail}}]], { c = view.csrf, here = here(view), y = yesterday,
    detail = detail,
    t = table_of({ "date", "merchant", "mismatches", "outcome", "by",
                   "run at" }, list) })
end

return _M
