-- paygate.reconcile.bill: the daily trade-bill reconciliation.
--
--   local report, err = bill.daily{
--     wx = wx, db = db, dir = "var/reconcile",      -- CSV reports go there
--     date = bill.bill_date(),                      -- Beijing yesterday
--     local_rows = function(date, numbers, refund_numbers) ... end,
--   }
--   -- report = { date, empty, mismatches, counts, path, sha256, audit }
--
-- Steps: wx:trade_bill (STATEMENT_CREATING retried on a bounded backoff,
-- NO_STATEMENT_EXIST = a day without trades) -> wx:download_bill ->
-- records (yuan text -> integer fen, exactly) -> diff against the app's
-- rows -> a CSV written atomically -> a gauge per kind -> an audit entry
-- (subject "reconcile:<date>") with the summary and the CSV's SHA-256.
--
-- Failures: nil, err (core.error). Misuse raises at the caller.

local core = require "paygate.core"
local crypto = require "paygate.crypto"
local civil = require "paygate.civil"
local audit = require "paygate.audit"
local json = require "paygate.json"
local wxbill = require "paygate.wechatpay.bill"

local type, pairs, ipairs, tostring, error, tonumber, pcall =
      type, pairs, ipairs, tostring, error, tonumber, pcall
local sub, find, match, byte, gsub, format =
      string.sub, string.find, string.match, string.byte, string.gsub,
      string.format
local concat, sort, remove = table.concat, table.sort, table.remove
local floor = math.floor

local _M = {}

-- A big bill is read and compared in pieces: every YIELD_EVERY rows the
-- coroutine yields once, so the worker's requests are not held up.
local YIELD_EVERY = 2000

local function pause(i)
  if i % YIELD_EVERY == 0 and core.in_coroutine() then
    core.sleep(0)
  end
end

local function fail(kind, message, fields)
  fields = fields or {}
  if fields.retryable == nil then
    fields.retryable = false
  end
  return nil, core.error(kind, message, fields)
end

----------------------------------------------------------------- money

local MAX_YUAN_DIGITS = 13     -- 10^13 yuan * 100 < 2^53: exact in a double

-- syntax: fen, err = bill.parse_fen(yuan_text)
-- "0.10" -> 10, "12" -> 1200, "1.5" -> 150, "0.74000" -> 74: digits, an
-- optional point and decimals, read as text (no float rounding). Decimals
-- past the fen must be zeros; a sign, spaces, exponents or more than 13
-- integer digits are refused.
-- returns: an integer, or nil, err (kind bad_amount)
function _M.parse_fen(s)
  if type(s) ~= "string" then
    return fail("bad_amount", "bill: amount is not text")
  end
  local int, dec = match(s, "^(%d+)%.(%d+)$")
  if not int then
    int, dec = match(s, "^(%d+)$"), ""
  end
  if not int then
    return fail("bad_amount", "bill: amount " .. format("%q", sub(s, 1, 32))
                .. " is not a yuan amount")
  end
  int = gsub(int, "^0+(%d)", "%1")
  if #int > MAX_YUAN_DIGITS then
    return fail("bad_amount", "bill: amount " .. sub(s, 1, 32)
                .. " is too large")
  end
  if find(dec, "[^0]", 3) then
    return fail("bad_amount", "bill: amount " .. sub(s, 1, 32)
                .. " has a part below one fen")
  end
  local cents = sub(dec .. "00", 1, 2)
  return tonumber(int) * 100 + tonumber(cents)
end

------------------------------------------------------------------ date

local BEIJING = 8 * 3600

-- syntax: date = bill.bill_date([now])
-- returns: the Beijing (UTC+8) date before the one `now` (epoch s,
-- default core.time()) falls on, as "YYYY-MM-DD": the newest day whose
-- bill can exist.
function _M.bill_date(now)
  now = now or core.time()
  if type(now) ~= "number" then
    error("bill.bill_date: now must be a number", 2)
  end
  return os.date("!%Y-%m-%d", floor(now) + BEIJING - 86400)
end

-- syntax: t = bill.day_start(date) -- the epoch s of that Beijing midnight
function _M.day_start(date)
  local days = civil.date(date)
  if not days then
    error("bill.day_start: date must be YYYY-MM-DD", 2)
  end
  return days * 86400 - BEIJING
end

------------------------------------------------------------- download

local function check_date(fname, date)
  if not civil.date(date) then
    error(fname .. ": date must be YYYY-MM-DD", 3)
  end
end

-- with on_wait, the longest sleep between two calls of it while
-- STATEMENT_CREATING is waited out (s)
_M.WAIT_STEP = 1

-- opts.max_bytes, when given: a positive whole number (raises at the
-- caller of fname)
local function check_max_bytes(fname, opts)
  local m = opts.max_bytes
  if m ~= nil and (type(m) ~= "number" or not (m >= 1) or m % 1 ~= 0) then
    error(fname .. ": opts.max_bytes must be a positive whole number of"
          .. " bytes", 3)
  end
end

local function schedule(opts)
  -- required here, not at the top: paygate.reconcile requires this file
  return require("paygate.reconcile").schedule(opts)
end

-- syntax: info, err = bill.fetch(wx, date, opts)
-- opts: path (where the bill goes; required), sub_mchid, bill_type
-- ("ALL"), retry = { attempts = 6, first = 60, factor = 2, ceiling = 1800,
-- jitter = "equal", random } (for STATEMENT_CREATING), sleep (fn(s),
-- default core.sleep), on_wait (fn() -> ok, err: called before each
-- pause and at least every WAIT_STEP s of it, and during the download,
-- e.g. the runner's keepalive, so that a wait or a download longer than
-- the lease keeps it; a failure ends the wait or the download with that
-- error), max_bytes (the most bytes of content the download takes,
-- gunzipped: a larger bill, or a gzip bomb, fails as too_large; default
-- wx:download_bill's, 8 GiB).
-- returns: the download's info ({ path, bytes, sha1, ... }), false for
-- NO_STATEMENT_EXIST (a day without trades), or nil, err
-- (statement_creating after the last attempt, retryable; any other)
-- yields
function _M.fetch(wx, date, opts)
  check_date("bill.fetch", date)
  if type(opts) ~= "table" or type(opts.path) ~= "string" then
    error("bill.fetch: opts.path must be a string", 2)
  end
  check_max_bytes("bill.fetch", opts)
  local retry = opts.retry or {}
  local attempts = retry.attempts or 6
  local s = schedule{ first = retry.first or 60, factor = retry.factor or 2,
                      ceiling = retry.ceiling or 1800,
                      jitter = retry.jitter or "equal",
                      random = retry.random }
  local sleep = opts.sleep or core.sleep
  local p = { bill_date = date, bill_type = opts.bill_type or "ALL",
              tar_type = "GZIP", sub_mchid = opts.sub_mchid }
  local b, err
  for n = 1, attempts do
    b, err = wx:trade_bill(p)
    if b then
      break
    end
    if err.kind == "no_statement_exist" then
      return false
    end
    if err.kind ~= "statement_creating" or n == attempts then
      return nil, err
    end
    -- with on_wait, the pause is slept in steps of at most WAIT_STEP s,
    -- on_wait before each: a pause longer than the lease (up to the
    -- ceiling, 1800 s) would let the lease expire in the middle of it,
    -- and another instance start the same day's bill
    local d = s:delay(n)
    repeat
      if opts.on_wait then
        local ok, werr = opts.on_wait()
        if not ok then
          return nil, werr
        end
      end
      local step = (opts.on_wait and d > _M.WAIT_STEP) and _M.WAIT_STEP or d
      sleep(step)
      d = d - step
    until d <= 0
  end
  local on_wait = opts.on_wait
  return wx:download_bill(b, opts.path, { max_bytes = opts.max_bytes,
    on_progress = on_wait and function() return on_wait() end })
end

-- syntax: key = bill.key(sub_mchid, number)
-- The key bill.records and bill.diff match a bill line and a local row
-- by: the number (out_trade_no, or a refund's out_refund_no) for a direct
-- merchant's, "<sub_mchid>/<number>" for a service provider's
-- sub-merchant's (sub_mchid: nil, json null or "" for none). WeChat scopes
-- out_trade_no and out_refund_no per merchant: in a provider's bill of all
-- its sub-merchants two of them may use the same number, and the number
-- alone took one's line for the other's order. ("/" is in no WeChat
-- number.)
function _M.key(sub, no)
  if sub == nil or sub == core.null or sub == "" then return no end
  return tostring(sub) .. "/" .. tostring(no)
end

-- A bad amount of record n (line file_line of the file), in column col:
-- the message says where (a log or the console shows the message, not
-- the error's fields)
local function amount_error(err, col, n, file_line, missing)
  err.line, err.file_line, err.column = n, file_line, col
  local at = " of record " .. n .. ", line " .. tostring(file_line)
             .. " of the file"
  if missing then
    err.message = "bill: no amount: the header has no " .. missing .. at
  else
    err.message = err.message .. " (" .. col .. at .. ")"
  end
  return nil, err
end

-- syntax: remote, err = bill.records(path[, on_wait])
-- Reads a downloaded trade bill, letting other coroutines run every
-- YIELD_EVERY records; on_wait (as bill.fetch's) is called there too, and
-- its failure ends the reading with its error.
-- returns: { payments = { [key] = { out_trade_no, amount, state,
--   transaction_id, sub_mchid } }, refunds = { [key] = { out_refund_no,
--   out_trade_no, amount, state, refund_id, sub_mchid } }, duplicates =
--   { { out_trade_no, out_refund_no (a refund line's), line, record,
--   first }, ... }, lines = n } or nil, err (bad_amount, bad_bill). key is
--   bill.key(sub_mchid, number): the number alone in a direct merchant's
--   bill, sub_mchid the line's 特约商户号 in a service provider's (nil in a
--   direct merchant's, where it is 0). A line whose number (of the same
--   sub-merchant) was on an earlier line is not merged into it (one of the
--   two would be lost unseen): the first is kept, the later one is in
--   duplicates (with the first), identical or not. A bill out of shape
--   (wxbill.rows' "malformed": a record broken across lines by a line
--   break in a field)
--   is bad_bill, and so is a summary whose 总交易单数 is not the number
--   of records read (a bill without a summary is read as it is). An
--   error's line is the record's number (1 = the first record), its
--   file_line the line of the file.
function _M.records(path, on_wait)
  local ok, it, close = pcall(wxbill.rows, path)
  if not ok then
    return fail("io", "bill: cannot read " .. tostring(path))
  end
  -- a reading stopped early closes the file now, not at the GC's leisure
  local refuse, refuse_amount = fail, amount_error
  local function fail(...)
    close()
    return refuse(...)
  end
  local function amount_error(...)
    close()
    return refuse_amount(...)
  end
  local payments, refunds, duplicates, n = {}, {}, {}, 0
  for kind, row, names in it do
    if kind == "malformed" then
      -- out of shape (a record broken across lines): what follows cannot
      -- be told from the summary, and reading on would drop records
      return fail("bad_bill", "bill: " .. row.message,
                  { file_line = row.line })
    end
    if kind == "summary" then
      -- the summary's count of records: a bill that lost lines (or grew
      -- some) between WeChat and here says so, not only a hash would
      local count = row["总交易单数"]
      if count ~= nil then
        local c = type(count) == "string" and count:match("^%d+$")
                  and tonumber(count)
        if not c then
          return fail("bad_bill", "bill: the summary's 总交易单数 is not a"
                      .. " count (line " .. tostring(row.line)
                      .. " of the file)", { file_line = row.line })
        end
        if c ~= n then
          return fail("bad_bill", "bill: the summary counts " .. c
                      .. " records, the file holds " .. n .. " (line "
                      .. tostring(row.line) .. " of the file): lines lost"
                      .. " or added", { file_line = row.line })
        end
      end
    elseif kind == "record" then
      n = n + 1
      pause(n)
      if on_wait and n % YIELD_EVERY == 0 then
        local wok, werr = on_wait()
        if not wok then
          close()
          return nil, werr or core.error("lost", "bill: on_wait stopped"
                                         .. " the reading")
        end
      end
      -- (n counts records; row.line is the line of the file)
      local at = " (line " .. tostring(row.line) .. " of the file)"
      if names and (#row < #names or row.misaligned) then
        -- cut short, or fields that cannot be put in place: its amounts
        -- would be read from the wrong columns
        return fail("bad_bill", "bill: line " .. n .. " has " .. #row
                    .. " fields, its header " .. #names .. at,
                    { line = n, file_line = row.line })
      end
      local no, state = row["商户订单号"], row["交易状态"]
      -- a service provider's bill: whose order the line is (`0` in a
      -- direct merchant's)
      local sub = row["特约商户号"]
      if sub == "" or sub == "0" then sub = nil end
      if type(no) ~= "string" or no == "" or type(state) ~= "string" then
        return fail("bad_bill", "bill: line " .. n .. " has no 商户订单号"
                    .. " or 交易状态" .. at, { line = n, file_line = row.line })
      end
      if state == "REFUND" then
        local rno = row["商户退款单号"]
        -- the amount asked for (申请退款金额), as the local refund
        -- holds it; 退款金额 is that less non-recharge coupons (older
        -- bills have only it)
        local col = row["申请退款金额"] and "申请退款金额" or "退款金额"
        local amount, err = _M.parse_fen(row[col])
        if not amount then
          return amount_error(err, col, n, row.line, row[col] == nil
                              and "申请退款金额 or 退款金额")
        end
        if type(rno) ~= "string" or rno == "" or rno == "0" then
          return fail("bad_bill", "bill: refund line " .. n
                      .. " has no 商户退款单号" .. at,
                      { line = n, file_line = row.line })
        end
        local rec = { out_refund_no = rno, out_trade_no = no,
                      amount = amount, state = row["退款状态"] or "",
                      refund_id = row["微信退款单号"], sub_mchid = sub }
        local key = _M.key(sub, rno)
        if refunds[key] then
          duplicates[#duplicates + 1] = { out_trade_no = no,
            out_refund_no = rno, line = n, record = rec,
            first = refunds[key] }
        else
          refunds[key] = rec
        end
      else
        local col = row["订单金额"] and "订单金额" or "应结订单金额"
        local amount, err = _M.parse_fen(row[col])
        if not amount then
          return amount_error(err, col, n, row.line, row[col] == nil
                              and "订单金额 or 应结订单金额")
        end
        local rec = { out_trade_no = no, amount = amount, state = state,
                      transaction_id = row["微信订单号"], sub_mchid = sub }
        local key = _M.key(sub, no)
        if payments[key] then
          duplicates[#duplicates + 1] = { out_trade_no = no, line = n,
            record = rec, first = payments[key] }
        else
          payments[key] = rec
        end
      end
    end
  end
  return { payments = payments, refunds = refunds, duplicates = duplicates,
           lines = n }
end

----------------------------------------------------------------- diff

local PAID = { paid = true, partially_refunded = true, refunded = true }
local REFUNDED = { succeeded = true }
local PENDING = { processing = true }

local function set_of(list, default)
  if list == nil then
    return default
  end
  local t = {}
  for _, v in ipairs(list) do
    t[v] = true
  end
  return t
end

local KIND_ORDER = { missing_local = 1, missing_remote = 2, amount = 3,
                     state = 4, duplicate_line = 5 }

-- syntax: mismatches = bill.diff(remote, local_rows[, opts])
-- remote: bill.records' result (or { payments = {}, refunds = {} } for an
-- empty day). local_rows: { { out_trade_no, amount (fen), state,
-- out_refund_no? (a refund's row), sub_mchid? (a service provider's
-- sub-merchant: the report's column) }, ... }. A line and a row are
-- matched by bill.key(sub_mchid, number): a service provider's bill line
-- of one sub-merchant is not another's order of the same number. A row
-- without sub_mchid (an app that does not say it) is matched by its
-- number alone, to a line of any sub-merchant. opts.paid_states (payment
-- states WeChat's bill lists as SUCCESS; default paid, partially_refunded,
-- refunded), opts.refund_states (default succeeded),
-- opts.refund_pending_states (refund states that agree with a bill line
-- still PROCESSING; default processing).
-- returns: a list sorted by kind, out_trade_no, out_refund_no of
-- { kind = missing_local | missing_remote | amount | state |
--   duplicate_line, out_trade_no, out_refund_no, ["local"] = row | nil,
--   remote = record | nil, first = record (duplicate_line: the earlier
--   line of that number, the one compared) }
function _M.diff(remote, rows, opts)
  if type(remote) ~= "table" or type(rows) ~= "table" then
    error("bill.diff: remote and local_rows must be tables", 2)
  end
  opts = opts or {}
  local paid = set_of(opts.paid_states, PAID)
  local refunded = set_of(opts.refund_states, REFUNDED)
  local pending = set_of(opts.refund_pending_states, PENDING)
  local out = {}
  local function add(kind, no, rno, l, r)
    out[#out + 1] = { kind = kind, out_trade_no = no, out_refund_no = rno,
                      ["local"] = l, remote = r }
  end
  local lp, lr = {}, {}
  for i, row in ipairs(rows) do
    pause(i)
    if type(row) ~= "table" or type(row.out_trade_no) ~= "string" then
      error("bill.diff: local_rows[" .. i .. "].out_trade_no must be a"
            .. " string", 2)
    end
    local rno = row.out_refund_no
    if rno ~= nil and rno ~= core.null then
      lr[_M.key(row.sub_mchid, rno)] = row
    else
      lp[_M.key(row.sub_mchid, row.out_trade_no)] = row
    end
  end
  local seen = 0
  local function compare(remote_map, local_map, done, is_refund)
    local matched = {}
    for key, r in pairs(remote_map) do
      seen = seen + 1
      pause(seen)
      -- (a record made by hand may have no number of its own: its key)
      local no = is_refund and r.out_trade_no or (r.out_trade_no or key)
      local rno = is_refund and (r.out_refund_no or key) or nil
      local l = local_map[key]
      if not l and key ~= (rno or no) then
        -- a row that names no sub-merchant: by its number alone
        l = local_map[rno or no]
      end
      if l then matched[l] = true end
      if not l then
        add("missing_local", no, rno, nil, r)
      elseif not (done[l.state] and r.state == "SUCCESS")
             and not (is_refund and r.state == "PROCESSING"
                      and pending[l.state]) then
        add("state", no, rno, l, r)
      elseif l.amount ~= r.amount then
        add("amount", no, rno, l, r)
      end
    end
    for _, l in pairs(local_map) do
      if not matched[l] and done[l.state] then
        add("missing_remote", l.out_trade_no, is_refund and l.out_refund_no
            or nil, l, nil)
      end
    end
  end
  compare(remote.payments or {}, lp, paid, false)
  compare(remote.refunds or {}, lr, refunded, true)
  for _, d in ipairs(remote.duplicates or {}) do
    add("duplicate_line", d.out_trade_no, d.out_refund_no, nil, d.record)
    out[#out].first = d.first
  end
  sort(out, function(a, b)
    if a.kind ~= b.kind then
      return KIND_ORDER[a.kind] < KIND_ORDER[b.kind]
    end
    if a.out_trade_no ~= b.out_trade_no then
      return a.out_trade_no < b.out_trade_no
    end
    if (a.out_refund_no or "") ~= (b.out_refund_no or "") then
      return (a.out_refund_no or "") < (b.out_refund_no or "")
    end
    -- (two sub-merchants' orders of one number: in a stable order)
    return tostring(_M.finding(a).sub_mchid or "")
           < tostring(_M.finding(b).sub_mchid or "")
  end)
  return out
end

------------------------------------------------------------------ CSV

-- A field is quoted when it holds a quote, a comma, CR or LF (quotes
-- doubled: RFC 4180). A text field starting with = + - @ TAB or CR gets a
-- leading ' so a spreadsheet shows it instead of running it as a formula.
function _M.csv_field(v)
  if v == nil or v == core.null then
    return ""
  end
  if type(v) == "number" then
    if v % 1 == 0 and v >= -2 ^ 53 and v <= 2 ^ 53 then
      return format("%d", v)
    end
    return tostring(v)
  end
  v = tostring(v)
  local c = byte(v, 1)
  if c == 61 or c == 43 or c == 45 or c == 64 or c == 9 or c == 13 then
    v = "'" .. v
  end
  if find(v, '[",\r\n]') then
    v = '"' .. gsub(v, '"', '""') .. '"'
  end
  return v
end

local READ_MAX = 4 * 1024 * 1024

--- syntax: head, rows, more = bill.read_csv(path, limit)
-- Reads a report written by bill.csv (RFC 4180: CRLF line ends, a field
-- quoted when it holds a quote, comma, CR or LF, its quotes doubled): the
-- header's fields and at most limit rows, each an array of fields (text
-- as written); more is true when the file holds rows past those (past
-- limit, or past the first READ_MAX bytes, which is all it reads). nil
-- when the file cannot be opened.
function _M.read_csv(path, limit)
  local f = io.open(path, "rb")
  if not f then return nil end
  -- enough for limit rows of this report, however large the file
  local text = f:read(READ_MAX) or ""
  local cut = #text == READ_MAX and f:read(1) ~= nil
  f:close()
  local records, cells, pos, n = {}, {}, 1, #text
  while pos <= n and #records <= limit do
    local cell, stop
    if sub(text, pos, pos) == '"' then
      local parts, i = {}, pos + 1
      while true do
        local q = find(text, '"', i, true)
        if not q then                       -- unterminated: the rest
          parts[#parts + 1] = sub(text, i)
          i = n + 1
          break
        end
        parts[#parts + 1] = sub(text, i, q - 1)
        if sub(text, q + 1, q + 1) == '"' then
          parts[#parts + 1] = '"'
          i = q + 2
        else
          i = q + 1
          break
        end
      end
      cell, stop = concat(parts), i
    else
      stop = find(text, "[,\r\n]", pos) or n + 1
      cell = sub(text, pos, stop - 1)
    end
    cells[#cells + 1] = cell
    local c = sub(text, stop, stop)
    if c == "," then
      pos = stop + 1
    else                                    -- end of the record
      records[#records + 1] = cells
      cells = {}
      if c == "\r" and sub(text, stop + 1, stop + 1) == "\n" then
        stop = stop + 1
      end
      pos = stop + 1
    end
  end
  if cells[1] and #records <= limit then records[#records + 1] = cells end
  local head = remove(records, 1) or {}
  -- (the loop stops with limit + 1 records read, the header among them)
  local more = cut or pos <= n
  return head, records, more
end

local HEADER = { "bill_date", "kind", "out_trade_no", "out_refund_no",
                 "local_state", "local_amount", "remote_state",
                 "remote_amount", "sub_mchid" }
-- the report's columns, for a reader that lays out an audit entry's
-- findings as the CSV has them (its file gone, or on another instance)
_M.HEADER = HEADER

--- syntax: f = bill.finding(m)
-- A mismatch as a finding: flat, keyed by the report's column names
-- (HEADER's but bill_date). The one mapping of a mismatch to the
-- report's columns: the CSV's lines and the audit entry's findings.
function _M.finding(m)
  local l, r = m["local"] or {}, m.remote or {}
  -- whose order (a service provider's bill: the line's 特约商户号, else
  -- the local row's sub_mchid)
  local sub = r.sub_mchid or l.sub_mchid
  if sub == core.null then sub = nil end
  return { kind = m.kind, out_trade_no = m.out_trade_no,
           out_refund_no = m.out_refund_no,
           local_state = l.state, local_amount = l.amount,
           remote_state = r.state, remote_amount = r.amount,
           sub_mchid = sub }
end

--- syntax: row = bill.row(date, f)
-- Finding f (bill.finding's, or one an audit entry keeps) as the
-- report's line: its values in HEADER's order (nil where absent).
function _M.row(date, f)
  local row = {}
  for j, h in ipairs(HEADER) do
    if h == "bill_date" then row[j] = date else row[j] = f[h] end
  end
  return row
end

-- syntax: text = bill.csv(date, mismatches)
-- returns: the report as CSV text (header line, one line per mismatch,
-- CRLF line ends; amounts in fen)
function _M.csv(date, mismatches)
  local lines = { concat(HEADER, ",") }
  local f = _M.csv_field
  for i, m in ipairs(mismatches) do
    pause(i)
    local row = _M.row(date, _M.finding(m))
    for j = 1, #HEADER do row[j] = f(row[j]) end
    lines[#lines + 1] = concat(row, ",")
  end
  return concat(lines, "\r\n") .. "\r\n"
end

-- syntax: ok, err = bill.write_atomic(path, text)
-- Replaces path with text whole (core.write_file: a temporary file beside
-- it, flushed, renamed over it): a reader sees the old file or the whole
-- new one, never a part. 0600 whatever the umask: a report names the
-- day's order numbers and amounts.
function _M.write_atomic(path, text)
  local ok, err = core.write_file(path, text, 384)        -- 0600
  if not ok then
    return fail("io", "reconcile: " .. tostring(err and err.message or err))
  end
  return true
end

--------------------------------------------------------------- metric

local gauge

--- syntax: bill.publish(counts, name)
-- Sets paygate_reconcile_bill_mismatches to a report's counts (one series
-- per kind, and per merchant where the run has a name: the runs of
-- several merchants do not overwrite one another's counts). daily() does
-- it; an app calls it to show a kept report again (a gauge goes with the
-- worker that set it).
local function publish(counts, name)
  if gauge == nil then
    local ok, metrics = pcall(require, "paygate.metrics")
    gauge = ok and metrics.gauge("paygate_reconcile_bill_mismatches",
      "Mismatches found by the last daily bill reconciliation, by kind"
      .. " (and merchant)") or false
  end
  if gauge then
    for kind in pairs(KIND_ORDER) do
      gauge:set(counts[kind] or 0, { kind = kind, merchant = name })
    end
  end
end
_M.publish = publish

---------------------------------------------------------------- daily

-- how many of a day's findings its audit entry lists (the rest: counted
-- in findings_omitted, all of them in the CSV)
_M.AUDIT_FINDINGS = 500
-- and in how many bytes of JSON at most: an entry's evidence is held to
-- audit.MAX_EVIDENCE, and 500 findings with long refund numbers would
-- pass it (about 300 bytes each at the longest), which failed the day's
-- audit entry. The rest of the evidence (counts, the file's path, ...)
-- gets the 8 KiB left.
_M.AUDIT_FINDINGS_BYTES = audit.MAX_EVIDENCE - 8192

-- the kinds of a bill refused as read (kept as NAME.refused)
local REFUSED = { bad_bill = true, bad_amount = true }

-- The distinct numbers (field, or the key of a record without it) of a
-- bill's records, sorted, and how many records there were.
local function numbers_of(records, field)
  local list, have, n = {}, {}, 0
  for key, r in pairs(records) do
    n = n + 1
    local no = r[field] or key
    if not have[no] then
      have[no] = true
      list[#list + 1] = no
    end
  end
  sort(list)
  return list, n
end

-- syntax: report, err = bill.daily(opts)
-- opts: wx (client), db (paygate.sql: the audit entry), dir (the reports'
-- folder, must exist), local_rows = fn(date, out_trade_nos,
-- out_refund_nos) -> rows | nil, err (the app's payments paid that Beijing
-- day, plus its rows for the given numbers whatever their day, and its
-- refunds that succeeded that day, plus those of the given out_refund_nos
-- whatever their state, with out_refund_no; see bill.diff), date ("YYYY-MM-DD", default
-- bill.bill_date()), name (a suffix for several merchants' reports),
-- sub_mchid, retry, sleep, on_wait, max_bytes (as bill.fetch), fence (fn(tx) -> ok,
-- err: checked in the audit entry's transaction), paid_states,
-- refund_states, actor (the audit entry's, default "reconcile"),
-- keep_bill (keep the downloaded bill beside the report;
-- a bill refused as read, bad_bill or bad_amount, is kept anyway: as
-- tradebill-<date>[-<name>].csv.refused, the day's last refused one,
-- named in err.bill and the message).
-- returns: { date, empty (NO_STATEMENT_EXIST), mismatches, counts (by
-- kind, and total), path (the CSV), sha256 (hex of its bytes), audit (the
-- entry), remote_payments, remote_refunds, lines (the bill's records
-- compared, duplicates included; 0 for an empty day), local_rows } or
-- nil, err
-- yields
function _M.daily(opts)
  if type(opts) ~= "table" then
    error("bill.daily: opts must be a table", 2)
  end
  if type(opts.dir) ~= "string" or opts.dir == "" then
    error("bill.daily: opts.dir must be a folder name", 2)
  end
  if type(opts.local_rows) ~= "function" then
    error("bill.daily: opts.local_rows must be a function", 2)
  end
  if opts.db == nil or opts.wx == nil then
    error("bill.daily: opts.db and opts.wx are required", 2)
  end
  check_max_bytes("bill.daily", opts)
  local date = opts.date or _M.bill_date()
  check_date("bill.daily", date)
  local name = opts.name and ("-" .. opts.name) or ""
  if name ~= "" and not match(name, "^%-[%w_]+$") then
    error("bill.daily: opts.name must be letters, digits or _", 2)
  end
  local base = opts.dir .. "/tradebill-" .. date .. name .. ".csv"
  local info, err = _M.fetch(opts.wx, date, {
    path = base, sub_mchid = opts.sub_mchid, retry = opts.retry,
    sleep = opts.sleep, on_wait = opts.on_wait,
    max_bytes = opts.max_bytes })
  if info == nil then
    return nil, err
  end
  local remote = { payments = {}, refunds = {}, lines = 0 }
  if info then
    remote, err = _M.records(info.path, opts.on_wait)
    if not remote and REFUSED[err.kind] then
      -- refused: kept for a person to look at, as NAME.refused (the
      -- day's last refused one: a later one takes its place), and named
      -- in the error, which the log shows
      local kept = info.path
      if not opts.keep_bill then
        kept = info.path .. ".refused"
        local ok, rerr = os.rename(info.path, kept)
        if not ok then
          os.remove(info.path)
          kept = nil
          err.message = err.message .. " (the bill could not be kept: "
                        .. tostring(rerr) .. ")"
        end
      end
      if kept then
        err.bill = kept
        err.message = err.message .. " (the bill is kept in " .. kept .. ")"
      end
    elseif not opts.keep_bill then
      os.remove(info.path)
    end
    if not remote then
      return nil, err
    end
  end
  -- (each number once: a service provider's bill may have two
  -- sub-merchants' lines of one number, and local_rows gives the rows of
  -- both)
  local numbers, npay = numbers_of(remote.payments, "out_trade_no")
  -- (the bill's payments only: a refund line's out_trade_no is usually a
  -- payment of an earlier day, which this day's bill rightly lacks; named
  -- here, it came back as a paid local row "missing" from the bill)
  -- and the bill's refunds, so that one the app has but not as settled
  -- that day is a state mismatch, not a refund it has no row for
  local rnumbers, nref = numbers_of(remote.refunds, "out_refund_no")
  local rows, lerr = opts.local_rows(date, numbers, rnumbers)
  if not rows then
    return nil, lerr or core.error("internal", "local_rows returned nothing")
  end
  local mismatches = _M.diff(remote, rows, opts)
  local counts = { total = #mismatches }
  for kind in pairs(KIND_ORDER) do
    counts[kind] = 0
  end
  for _, m in ipairs(mismatches) do
    counts[m.kind] = counts[m.kind] + 1
  end
  local text = _M.csv(date, mismatches)
  local path = opts.dir .. "/reconcile-" .. date .. name .. ".csv"
  local ok, werr = _M.write_atomic(path, text)
  if not ok then
    return nil, werr
  end
  local sha = crypto.hex(crypto.digest("sha256", text))
  -- the findings themselves, as the CSV has them (the first
  -- AUDIT_FINDINGS: the CSV, whose hash is here, has them all): the
  -- report file is on one instance's disk and may be gone, the audit
  -- chain is in the store
  local findings, bytes = {}, 2
  for i = 1, math.min(#mismatches, _M.AUDIT_FINDINGS) do
    local f = _M.finding(mismatches[i])
    -- (its canonical JSON, and the comma before it)
    bytes = bytes + #audit.canonical_json(f) + 1
    if bytes > _M.AUDIT_FINDINGS_BYTES then
      break
    end
    findings[i] = f
  end
  local entry = { what = "reconcile.bill", cause = "daily_bill",
                  actor = opts.actor or "reconcile", evidence = {
                    date = date, empty = not info, file = path,
                    sha256 = sha, counts = counts, merchant = opts.name,
                    remote_payments = npay, remote_refunds = nref,
                    local_rows = #rows,
                    findings = findings[1] and findings or json.empty_array,
                    findings_omitted = #mismatches > #findings
                      and #mismatches - #findings or nil } }
  local subject = "reconcile:" .. date
  local e, aerr
  if opts.fence then
    local okf, ensure = audit.ensure_schema(opts.db)
    if not okf then
      return nil, ensure
    end
    e, aerr = opts.db:transaction(function(tx)
      local fok, ferr = opts.fence(tx)
      if not fok then
        return nil, ferr
      end
      return audit.append(tx, subject, entry)
    end)
  else
    e, aerr = audit.append(opts.db, subject, entry)
  end
  if not e then
    return nil, aerr
  end
  publish(counts, opts.name)
  return { date = date, empty = not info, mismatches = mismatches,
           counts = counts, path = path, sha256 = sha, audit = e,
           remote_payments = npay, remote_refunds = nref,
           lines = remote.lines, local_rows = #rows }
end

return _M
