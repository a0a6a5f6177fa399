-- paygate.etcd: an etcd v3 client over etcd's JSON gateway (HTTP/1.1 on
-- the client URL; no gRPC), on the loop.
--
--   local etcd = require "paygate.etcd"
--   local cli = assert(etcd.new{ endpoints = { "https://10.0.0.1:2379",
--     "https://10.0.0.2:2379" }, user = "paygate", password = pw,
--     ca_file = "ca.pem", client_cert = "c.pem", client_key = "k.pem" })
--   cli:put("/a", "1")                    --> { revision = "7" }
--   cli:get("/a")                         --> { key, value, revision, ... }
--   for ev, err in cli:watch("/a/", { from_revision = "8" }) do ... end
--
-- Revisions and lease ids are 64-bit: they stay decimal strings (etcd
-- sends them as JSON strings), never Lua numbers; etcd.rev_cmp and
-- etcd.rev_next compare and step them.
--
-- Failures return nil, err (tostring "kind: message"). Kinds: the
-- transport's (timeout, connect, dns, tls, closed; err.sent), then
-- unavailable (no leader, all endpoints down), auth (wrong user or
-- password, auth required), permission, compacted (err.compact_revision:
-- reload the whole prefix), not_found (a lease), invalid (a bad request)
-- and etcd (anything else; err.code is the gRPC code). Misuse raises.
local core = require "paygate.core"
local http = require "paygate.http"
local hcore = require "paygate.http.core"
local json = require "paygate.json"
local crypto = require "paygate.crypto"

local type, tostring, ipairs, setmetatable, error, pcall =
      type, tostring, ipairs, setmetatable, error, pcall

local b64, unb64 = crypto.base64_encode, crypto.base64_decode

local _M = { _VERSION = "0.1.0" }

-- seconds a watch must have stood before a failure after it pauses as
-- little as a first one (0.05 s); a watch ended sooner keeps doubling
-- the pause (to 1 s)
_M.STOOD = 1

local Client = {}
Client.__index = Client
_M.Client = Client

local Watch = {}
Watch.__index = Watch

-- ---- 64-bit decimal strings -------------------------------------------

local function is_rev(s)
  return type(s) == "string" and s:match("^%d+$") ~= nil and #s <= 20
end

-- A revision (string, or an exact integer) as a canonical string.
local function rev_arg(v, what)
  if type(v) == "number" then
    if v < 0 or v ~= math.floor(v) or v >= 2 ^ 53 then
      error(what .. " must be a non-negative integer or a decimal string",
            3)
    end
    return ("%d"):format(v)
  end
  if not is_rev(v) then
    error(what .. " must be a non-negative integer or a decimal string", 3)
  end
  v = v:gsub("^0+", "")
  return v == "" and "0" or v
end

--- syntax: c = etcd.rev_cmp(a, b) -- -1, 0, 1 for canonical decimal strings
function _M.rev_cmp(a, b)
  if #a ~= #b then return #a < #b and -1 or 1 end
  if a == b then return 0 end
  return a < b and -1 or 1
end
local rev_cmp = _M.rev_cmp

--- syntax: s = etcd.rev_next(rev) -- rev + 1, exact, as a string
function _M.rev_next(s)
  local i = #s
  while i > 0 and s:byte(i) == 57 do i = i - 1 end
  if i == 0 then return "1" .. ("0"):rep(#s) end
  return s:sub(1, i - 1) .. string.char(s:byte(i) + 1) .. ("0"):rep(#s - i)
end
local rev_next = _M.rev_next

-- A revision field from etcd: protobuf leaves zero values out. Anything
-- but a non-negative integer is nil (a malformed answer): "%d" of -5 or
-- 1e30 would make a string that compares above every real revision.
local function rev_of(v)
  if v == nil then return "0" end
  if type(v) == "number" then
    if v < 0 or v ~= math.floor(v) or v >= 2 ^ 53 then return nil end
    return ("%d"):format(v)
  end
  if is_rev(v) then return v end
  return nil
end

--- syntax: e = etcd.prefix_end(prefix) -- the range_end covering prefix
function _M.prefix_end(p)
  for i = #p, 1, -1 do
    local b = p:byte(i)
    if b < 255 then return p:sub(1, i - 1) .. string.char(b + 1) end
  end
  return "\0"                  -- every key
end
local prefix_end = _M.prefix_end

-- ---- errors ---------------------------------------------------------------

local function fail(kind, msg, fields)
  fields = fields or {}
  if fields.retryable == nil then
    fields.retryable = kind == "unavailable" or kind == "timeout"
  end
  return nil, core.error(kind, "etcd: " .. msg, fields)
end

-- gRPC status (as the gateway reports it) -> our kind
local function classify(code, msg)
  msg = tostring(msg or "")
  if msg:find("compacted", 1, true) then return "compacted" end
  if code == 16 or msg:find("invalid auth token", 1, true)
     or msg:find("authentication failed", 1, true)
     or msg:find("user name is empty", 1, true)
     or msg:find("auth: revision in header is old", 1, true) then
    return "auth"
  end
  if code == 7 or msg:find("permission denied", 1, true) then
    return "permission"
  end
  if code == 14 or msg:find("no leader", 1, true)
     or msg:find("leader changed", 1, true)
     or msg:find("not capable", 1, true)
     or msg:find("timed out", 1, true) then
    return "unavailable"
  end
  if code == 4 then return "timeout" end
  if code == 5 or msg:find("not found", 1, true) then return "not_found" end
  if code == 3 then return "invalid" end
  return "etcd"
end

-- a token that can be renewed (not a wrong password)
local function token_expired(msg)
  msg = tostring(msg or "")
  return msg:find("invalid auth token", 1, true) ~= nil
      or msg:find("revision in header is old", 1, true) ~= nil
end

-- ---- the client ---------------------------------------------------------

local function check_endpoint(url, i)
  if type(url) ~= "string" then
    error("etcd.new: endpoints[" .. i .. "] must be a URL string", 3)
  end
  url = url:gsub("/+$", "")
  -- no user:password@ (etcd's auth is user/password, and the URL goes
  -- into errors and logs)
  if not url:match("^https?://[^/%s@]+$") then
    error("etcd.new: endpoints[" .. i .. "] must be http(s)://host:port",
          3)
  end
  return url
end

--- syntax: cli = etcd.new(opts)
-- opts: endpoints (list of "http(s)://host:port", tried in turn),
--       user, password (etcd's auth; both or neither), timeout (seconds
--       per call, default 5), ca_file, client_cert, client_key (TLS).
-- returns: a client (no I/O yet). Raises on a malformed opts.
function _M.new(opts)
  if type(opts) ~= "table" then error("etcd.new: opts must be a table", 2) end
  local eps = opts.endpoints
  if type(eps) == "string" then eps = { eps } end
  if type(eps) ~= "table" or #eps == 0 then
    error("etcd.new: endpoints must be a non-empty list of URLs", 2)
  end
  local list = {}
  for i, u in ipairs(eps) do list[i] = check_endpoint(u, i) end
  if (opts.user == nil) ~= (opts.password == nil) then
    error("etcd.new: user and password go together", 2)
  end
  if opts.user ~= nil and (type(opts.user) ~= "string"
                           or type(opts.password) ~= "string") then
    error("etcd.new: user and password must be strings", 2)
  end
  local timeout = opts.timeout or 5
  -- (NaN, inf and more than a day passed: every call then raised from
  -- the HTTP client instead of answering nil, err)
  if type(timeout) ~= "number" or not (timeout > 0 and timeout <= 86400)
  then
    error("etcd.new: timeout must be a number > 0 (at most 86400)", 2)
  end
  for _, k in ipairs({ "ca_file", "client_cert", "client_key" }) do
    if opts[k] ~= nil and type(opts[k]) ~= "string" then
      error("etcd.new: " .. k .. " must be a file path", 2)
    end
  end
  return setmetatable({
    endpoints = list,           -- canonical URLs
    ep = 1,                     -- index of the endpoint tried first
    user = opts.user, password = opts.password,
    timeout = timeout,
    tls = { ca_file = opts.ca_file, client_cert = opts.client_cert,
            client_key = opts.client_key },
    tokens = {},                -- endpoint -> auth token (simple tokens
                                -- are per member)
  }, Client)
end

--- syntax: ok = cli:secure() -- TLS to every endpoint and auth configured
function Client:secure()
  if not self.user then return false end
  for _, u in ipairs(self.endpoints) do
    if not u:match("^https://") then return false end
  end
  return true
end

local function http_opts(self, url, body, timeout, token)
  local headers = { ["Content-Type"] = "application/json" }
  if token then headers["Authorization"] = token end
  return { method = "POST", url = url, headers = headers, body = body,
           timeout = timeout or self.timeout,
           connect_timeout = math.min(timeout or self.timeout, 2),
           ca_file = self.tls.ca_file, client_cert = self.tls.client_cert,
           client_key = self.tls.client_key }
end

-- One POST to one endpoint. returns the decoded document, or nil, err.
local function post1(self, ep, path, body, token, timeout)
  local res, err = http.request(http_opts(self, ep .. path, body, timeout,
                                          token))
  if not res then
    err.endpoint = ep
    return nil, err
  end
  local doc = json.decode(res.body or "")
  if type(doc) ~= "table" then
    return fail("etcd", path .. ": not a JSON answer (HTTP " .. res.status
                .. ") from " .. ep, { endpoint = ep, status = res.status,
                                      retryable = true, sent = true })
  end
  if res.status ~= 200 or doc.error ~= nil then
    local msg = doc.message or doc.error
    if type(msg) ~= "string" then msg = "HTTP " .. res.status end
    local code = tonumber(doc.code)
    local kind = classify(code, msg)
    return fail(kind, path .. ": " .. msg, { code = code, endpoint = ep,
      status = res.status, sent = true, expired = token_expired(msg) })
  end
  return doc
end

-- The token for ep, authenticating when none is held.
local function token_for(self, ep)
  if not self.user then return nil end
  local t = self.tokens[ep]
  if t then return t end
  local doc, err = post1(self, ep, "/v3/auth/authenticate",
    json.encode({ name = self.user, password = self.password }))
  if not doc then return nil, err end
  if type(doc.token) ~= "string" then
    return fail("auth", "authenticate: no token in the answer", {
      endpoint = ep })
  end
  self.tokens[ep] = doc.token
  return doc.token
end
_M._token_for = token_for

-- whether a failed call may go to the next endpoint
local function next_ok(err, idem)
  if err.sent == false then return true end
  if err.kind == "unavailable" then return idem end
  if err.kind == "connect" or err.kind == "dns" or err.kind == "tls" then
    return true
  end
  return idem and (err.kind == "closed" or err.kind == "timeout"
                   or err.kind == "etcd")
end

-- POSTs body (a table) to path on the first endpoint that answers.
-- idem: the call may be repeated on another endpoint after it was sent.
local function call(self, path, body, idem)
  local text = json.encode(body)
  local n = #self.endpoints
  local last
  for i = 0, n - 1 do
    local idx = (self.ep - 1 + i) % n + 1
    local ep = self.endpoints[idx]
    local token, err = token_for(self, ep)
    local doc
    if token or not self.user then
      doc, err = post1(self, ep, path, text, token)
      if not doc and err.kind == "auth" and err.expired and token then
        self.tokens[ep] = nil           -- renew once
        token, err = token_for(self, ep)
        if token then doc, err = post1(self, ep, path, text, token) end
      end
    end
    if doc then
      self.ep = idx
      return doc
    end
    last = err
    if not next_ok(err, idem) then return nil, err end
  end
  return nil, last
end
_M._call = call

local function check_key(key, what)
  if type(key) ~= "string" or key == "" then
    error("etcd " .. what .. ": key must be a non-empty string", 3)
  end
end

-- nil for what is not base64 text (a malformed answer)
local function decode_b64(s)
  if s == nil or s == "" then return "" end
  if type(s) ~= "string" then return nil end
  local v = unb64(s)
  return v
end

-- A kv of an answer, or nil when any field is malformed (never a kv
-- whose revisions cannot be compared)
local function kv_of(kv)
  if type(kv) ~= "table" then return nil end
  local key, value = decode_b64(kv.key), decode_b64(kv.value)
  if not key or not value then return nil end
  local r = { key = key, value = value,
              mod_revision = rev_of(kv.mod_revision),
              create_revision = rev_of(kv.create_revision),
              version = rev_of(kv.version), lease = rev_of(kv.lease) }
  if not (r.mod_revision and r.create_revision and r.version and r.lease)
  then
    return nil
  end
  return r
end

local function header_rev(doc)
  return type(doc.header) == "table" and rev_of(doc.header.revision) or nil
end

local function bad_answer(what)
  return fail("etcd", what .. ": malformed answer", { retryable = false })
end

--- syntax: kv, err = cli:get(key)
-- returns: { key, value, revision (the store's), mod_revision,
--   create_revision, version, lease } or nil (absent) or nil, err.
-- yields.
function Client:get(key)
  check_key(key, "get")
  local doc, err = call(self, "/v3/kv/range", { key = b64(key) }, true)
  if not doc then return nil, err end
  local rev = header_rev(doc)
  if not rev then return bad_answer("get") end
  if type(doc.kvs) ~= "table" or doc.kvs[1] == nil then return nil end
  local kv = kv_of(doc.kvs[1])
  if not kv then return bad_answer("get") end
  kv.revision = rev
  return kv
end

--- syntax: res, err = cli:get_prefix(prefix[, { revision = rev }])
-- returns: { kvs = { kv, ... } (sorted by key), revision } or nil, err
-- (compacted when the revision asked for is gone). yields.
function Client:get_prefix(prefix, opts)
  if type(prefix) ~= "string" then
    error("etcd get_prefix: prefix must be a string", 2)
  end
  local body = { key = b64(prefix == "" and "\0" or prefix),
                 range_end = b64(prefix_end(prefix)) }
  if opts and opts.revision ~= nil then
    body.revision = rev_arg(opts.revision, "etcd get_prefix: revision")
  end
  local doc, err = call(self, "/v3/kv/range", body, true)
  if not doc then return nil, err end
  local rev = header_rev(doc)
  if not rev then return bad_answer("get_prefix") end
  local kvs = {}
  if type(doc.kvs) == "table" then
    for i, raw in ipairs(doc.kvs) do
      local kv = kv_of(raw)
      if not kv then return bad_answer("get_prefix") end
      kvs[i] = kv
    end
  end
  return { kvs = kvs, revision = rev }
end

--- syntax: res, err = cli:put(key, value[, { lease = id }])
-- returns: { revision } (the revision of this write) or nil, err. yields.
function Client:put(key, value, opts)
  check_key(key, "put")
  if type(value) ~= "string" then
    error("etcd put: value must be a string", 2)
  end
  local body = { key = b64(key), value = b64(value) }
  if opts and opts.lease ~= nil then
    body.lease = rev_arg(opts.lease, "etcd put: lease")
  end
  local doc, err = call(self, "/v3/kv/put", body, false)
  if not doc then return nil, err end
  local rev = header_rev(doc)
  if not rev then return bad_answer("put") end
  return { revision = rev }
end

--- syntax: res, err = cli:delete(key[, { prefix = true }])
-- returns: { deleted = n, revision } or nil, err. yields.
function Client:delete(key, opts)
  check_key(key, "delete")
  local body = { key = b64(key) }
  if opts and opts.prefix then body.range_end = b64(prefix_end(key)) end
  local doc, err = call(self, "/v3/kv/deleterange", body, false)
  if not doc then return nil, err end
  local rev = header_rev(doc)
  if not rev then return bad_answer("delete") end
  return { deleted = tonumber(rev_of(doc.deleted)) or 0, revision = rev }
end

local function op_of(op, what)
  if type(op) ~= "table" then
    error("etcd txn: " .. what .. " entries must be tables", 4)
  end
  if op.put ~= nil then
    check_key(op.put, "txn")
    if type(op.value) ~= "string" then
      error("etcd txn: a put needs a string value", 4)
    end
    local r = { key = b64(op.put), value = b64(op.value) }
    if op.lease ~= nil then r.lease = rev_arg(op.lease, "etcd txn: lease") end
    return { request_put = r }
  elseif op.delete ~= nil then
    check_key(op.delete, "txn")
    local r = { key = b64(op.delete) }
    if op.prefix then r.range_end = b64(prefix_end(op.delete)) end
    return { request_delete_range = r }
  elseif op.get ~= nil then
    check_key(op.get, "txn")
    return { request_range = { key = b64(op.get) } }
  end
  error("etcd txn: an operation is { put = k, value = v }, "
        .. "{ delete = k } or { get = k }", 4)
end

--- syntax: res, err = cli:txn{ compare = { c, ... }, success = { op, ... },
--                              failure = { op, ... } }
-- c: { key = k, mod_revision = rev } (rev "0": the key is absent),
--    { key = k, max_mod_revision = rev } (not written after rev), or
--    { key = k, value = v }; with prefix = true, every key under k
--    (max_mod_revision: nothing under k written, nor created, after
--    rev); all must hold for success to run.
-- op: { put = k, value = v[, lease = id] }, { delete = k[, prefix = true] },
--    { get = k }.
-- returns: { succeeded = bool, revision, responses } or nil, err, where
-- responses[i] answers the i-th operation of the side that ran: a get's
-- { kv = kv | nil (absent) }, a delete's { deleted = n }, a put's {}.
-- yields.
function Client:txn(t)
  if type(t) ~= "table" then
    error("etcd txn: the argument must be a table", 2)
  end
  local body = { compare = {}, success = {}, failure = {} }
  for i, c in ipairs(t.compare or {}) do
    if type(c) ~= "table" then
      error("etcd txn: compare entries must be tables", 2)
    end
    check_key(c.key, "txn")
    if c.mod_revision ~= nil then
      body.compare[i] = { key = b64(c.key), target = "MOD", result = "EQUAL",
        mod_revision = rev_arg(c.mod_revision, "etcd txn: mod_revision") }
    elseif c.max_mod_revision ~= nil then
      -- nothing written after r: mod_revision < r + 1
      body.compare[i] = { key = b64(c.key), target = "MOD", result = "LESS",
        mod_revision = rev_next(rev_arg(c.max_mod_revision,
                                        "etcd txn: max_mod_revision")) }
    elseif type(c.value) == "string" then
      body.compare[i] = { key = b64(c.key), target = "VALUE",
                          result = "EQUAL", value = b64(c.value) }
    else
      error("etcd txn: a compare needs mod_revision, max_mod_revision or "
            .. "value", 2)
    end
    -- every key under c.key (etcd's range compare; no key there: it
    -- holds, but for a value)
    if c.prefix then body.compare[i].range_end = b64(prefix_end(c.key)) end
  end
  for _, side in ipairs({ "success", "failure" }) do
    for i, op in ipairs(t[side] or {}) do
      body[side][i] = op_of(op, side)
    end
  end
  -- an empty list must go as [] (an empty Lua table encodes as {})
  for _, k in ipairs({ "compare", "success", "failure" }) do
    if #body[k] == 0 then body[k] = nil end
  end
  local doc, err = call(self, "/v3/kv/txn", body, false)
  if not doc then return nil, err end
  local rev = header_rev(doc)
  if not rev then return bad_answer("txn") end
  local succeeded = doc.succeeded == true
  -- each operation's answer, in order (a get's kv was dropped: a get in
  -- a transaction answered nothing)
  local ops = t[succeeded and "success" or "failure"] or {}
  local list = type(doc.responses) == "table" and doc.responses or {}
  local responses = {}
  for i, op in ipairs(ops) do
    local r = type(list[i]) == "table" and list[i] or {}
    if op.get ~= nil then
      local range = r.response_range
      if type(range) ~= "table" then return bad_answer("txn") end
      local kv
      if type(range.kvs) == "table" and range.kvs[1] ~= nil then
        kv = kv_of(range.kvs[1])
        if not kv then return bad_answer("txn") end
        kv.revision = rev
      end
      responses[i] = { kv = kv }
    elseif op.delete ~= nil then
      local d = type(r.response_delete_range) == "table"
                and r.response_delete_range or {}
      responses[i] = { deleted = tonumber(rev_of(d.deleted)) or 0 }
    else
      responses[i] = {}
    end
  end
  return { succeeded = succeeded, revision = rev, responses = responses }
end

--- syntax: ok, err = cli:cas(key, expected_mod_revision, value)
-- Writes value only if key's mod_revision is still expected ("0": only
-- if the key is absent).
-- returns: true (written), false (lost the race), or nil, err. yields.
function Client:cas(key, expected, value)
  check_key(key, "cas")
  if type(value) ~= "string" then
    error("etcd cas: value must be a string", 2)
  end
  expected = rev_arg(expected, "etcd cas: expected_mod_revision")
  local res, err = self:txn{
    compare = { { key = key, mod_revision = expected } },
    success = { { put = key, value = value } } }
  if not res then return nil, err end
  return res.succeeded
end

--- syntax: lease, err = cli:grant(ttl) -- { id (string), ttl (seconds) }
-- yields.
function Client:grant(ttl)
  if type(ttl) ~= "number" or ttl < 1 or ttl ~= math.floor(ttl) then
    error("etcd grant: ttl must be an integer >= 1 (seconds)", 2)
  end
  local doc, err = call(self, "/v3/lease/grant", { TTL = ttl }, false)
  if not doc then return nil, err end
  local id = rev_of(doc.ID)
  if not id or id == "0" then return bad_answer("grant") end
  return { id = id, ttl = tonumber(rev_of(doc.TTL)) or ttl }
end

--- syntax: lease, err = cli:keepalive(id) -- renews once: { id, ttl }
-- returns: nil, err (not_found) when the lease has expired. yields.
function Client:keepalive(id)
  id = rev_arg(id, "etcd keepalive: id")
  local doc, err = call(self, "/v3/lease/keepalive", { ID = id }, true)
  if not doc then return nil, err end
  local r = doc.result
  if type(r) ~= "table" then return bad_answer("keepalive") end
  local ttl = tonumber(rev_of(r.TTL)) or 0
  if ttl <= 0 then
    return fail("not_found", "keepalive: lease " .. id
                .. " not found (expired or revoked)")
  end
  return { id = id, ttl = ttl }
end

--- syntax: ok, err = cli:revoke(id) -- yields
function Client:revoke(id)
  id = rev_arg(id, "etcd revoke: id")
  local doc, err = call(self, "/v3/lease/revoke", { ID = id }, true)
  if not doc then return nil, err end
  return true
end

--- syntax: task = cli:keep_alive_every(id, seconds) -- a background task
-- renewing lease id every seconds until task:cancel() or the lease is
-- gone.
function Client:keep_alive_every(id, every)
  id = rev_arg(id, "etcd keep_alive_every: id")
  -- checked here: a NaN, nil or negative one ended the task in core.sleep
  -- (a log line) and the lease expired for want of a keepalive
  if not core.is_seconds(every) then
    error("etcd keep_alive_every: seconds must be a number > 0 (at most"
          .. " 1e8)", 2)
  end
  return core.spawn(function()
    while true do
      core.sleep(every)
      local _, err = self:keepalive(id)
      if err and err.kind == "not_found" then return end
    end
  end)
end

-- ---- watch ---------------------------------------------------------------

--- syntax: w = cli:watch(prefix[, opts]);  for ev, err in w do ... end
-- opts: from_revision (the first revision wanted; default: changes after
--       now), key (true: watch exactly this key, not a prefix),
--       reconnect_after (seconds one connection is kept before a fresh
--       one resumes from the last revision; default 60), give_up_after
--       (seconds without any endpoint before nil, err unavailable;
--       default never).
-- ev: { type = "put" | "delete", key, value, revision (mod revision),
--       create_revision, version }.
-- The iteration resumes from the revision after the last one delivered
-- when a connection drops or a member fails, on the next endpoint; it
-- ends with nil, err for: compacted (err.compact_revision; read the whole
-- prefix again and watch from its revision + 1), auth, permission, or
-- unavailable (give_up_after). w:close() stops it; w.revision is the
-- last revision delivered. yields: until an event arrives.
function Client:watch(prefix, opts)
  if type(prefix) ~= "string" then
    error("etcd watch: prefix must be a string", 2)
  end
  opts = opts or {}
  if type(opts) ~= "table" then error("etcd watch: opts must be a table", 2) end
  -- durations checked here, not by the stream later (NaN passed every
  -- test: the watch then raised from its iterator, or never gave up)
  local ra, gu = opts.reconnect_after, opts.give_up_after
  if ra ~= nil and (type(ra) ~= "number" or not (ra > 0 and ra <= 86400))
  then
    error("etcd watch: opts.reconnect_after must be a number of seconds,"
          .. " > 0 and at most 86400", 2)
  end
  if gu ~= nil and (type(gu) ~= "number" or not (gu >= 0 and gu < math.huge))
  then
    error("etcd watch: opts.give_up_after must be a number of seconds,"
          .. " 0 or more", 2)
  end
  local w = setmetatable({
    cli = self,
    key = opts.key and prefix or (prefix == "" and "\0" or prefix),
    range_end = not opts.key and prefix_end(prefix) or nil,
    next_rev = opts.from_revision ~= nil
      and rev_arg(opts.from_revision, "etcd watch: from_revision") or nil,
    reconnect_after = opts.reconnect_after or 60,
    give_up_after = opts.give_up_after,
    ep = self.ep,
    queue = {}, qi = 1, buf = {}, buf_len = 0,  -- buf: a line's pieces
    connects = 0,                  -- connections made (for specs, metrics)
    backoff = 0.05,                -- seconds before the next retry
    down_since = nil,              -- core.mono() of the first failure
                                   -- since a watch last stood
  }, Watch)
  return w
end

function Watch:close()
  self.closed = true
  local s = self.stream
  self.stream = nil
  if s then pcall(s.close, s) end
end

local function drop(w)
  local s = w.stream
  w.stream = nil
  w.buf, w.buf_len = {}, 0
  if s then pcall(s.close, s) end
end

-- The message and gRPC code of an error answer: { error = "...", code,
-- message } for unary calls, { error = { grpc_code, http_code, message,
-- http_status } } on a stream.
local function error_text(doc)
  local e = doc.error
  local msg, code = doc.message, doc.code
  if type(e) == "table" then
    msg, code = e.message, e.grpc_code or e.code
    if type(msg) ~= "string" then msg = e.error end
  elseif type(msg) ~= "string" then
    msg = e
  end
  if type(msg) ~= "string" then msg = json.encode(doc):sub(1, 200) end
  return msg, tonumber(code)
end

-- Opens a watch stream on the current endpoint.
local function connect(w)
  local cli = w.cli
  local ep = cli.endpoints[w.ep]
  local token, err = token_for(cli, ep)
  if cli.user and not token then return nil, err end
  local req = { key = b64(w.key), progress_notify = true }
  if w.range_end then req.range_end = b64(w.range_end) end
  if w.next_rev then req.start_revision = w.next_rev end
  local o = http_opts(cli, ep .. "/v3/watch",
                      json.encode({ create_request = req }),
                      w.reconnect_after, token)
  -- "hasleader" metadata (the gateway passes Grpc-Metadata-* headers on):
  -- a member that loses its leader ends the watch ("no leader") instead
  -- of keeping it open without events while the others go on
  o.headers["Grpc-Metadata-hasleader"] = "true"
  o.max_body = 1e15
  local s = hcore.stream(o)
  local status, headers = s:headers()
  if not status then
    pcall(s.close, s)
    headers.endpoint = ep
    return nil, headers
  end
  if status ~= 200 then
    local body = {}
    while true do
      local c = s:read()
      if not c or #body > 64 then break end
      body[#body + 1] = c
    end
    pcall(s.close, s)
    local doc = json.decode(table.concat(body))
    local msg, code = "HTTP " .. status, nil
    if type(doc) == "table" then msg, code = error_text(doc) end
    return fail(classify(code, msg), "watch: " .. msg, { endpoint = ep,
      code = code, expired = token_expired(msg) })
  end
  w.stream = s
  w.created = false             -- until the member says the watch stands
  w.connects = w.connects + 1
  return true
end

local function event_of(e)
  if type(e) ~= "table" or type(e.kv) ~= "table" then return nil end
  local kv = kv_of(e.kv)
  if not kv then return nil end
  kv.type = e.type == "DELETE" and "delete" or "put"
  kv.revision = kv.mod_revision
  return kv
end

-- The current endpoint's token is no longer good: the next connect
-- authenticates again.
local function forget_token(w)
  w.cli.tokens[w.cli.endpoints[w.ep]] = nil
end

-- An error or a cancel on the stream: reconnect (false, err) after an
-- expired token or when not fatal, else end the iteration (nil, err).
local function stream_error(w, kind, msg, fatal)
  if kind == "auth" and token_expired(msg) then
    forget_token(w)
  elseif fatal then
    return fail(kind, "watch: " .. msg)
  end
  return false, core.error(kind, "etcd: watch: " .. msg)
end

-- Handles one message of the stream. returns true, or nil, err (fatal:
-- the iteration ends), or false, err (reconnect).
local function message(w, line)
  local doc = json.decode(line)
  if type(doc) ~= "table" then
    return false, core.error("etcd", "etcd: watch: malformed message")
  end
  if doc.error ~= nil then
    local msg, code = error_text(doc)
    local kind = classify(code, msg)
    return stream_error(w, kind, msg,
                        kind ~= "unavailable" and kind ~= "etcd")
  end
  local r = doc.result
  if type(r) ~= "table" then return true end
  if r.canceled then
    local compact = rev_of(r.compact_revision)
    if compact and compact ~= "0" then
      return fail("compacted", "watch: revision " .. tostring(w.next_rev)
        .. " has been compacted (oldest kept: " .. compact .. ")",
        { compact_revision = compact, retryable = false })
    end
    local reason = tostring(r.cancel_reason or "canceled by the server")
    local kind = classify(nil, reason)
    return stream_error(w, kind, reason,
                        kind == "auth" or kind == "permission")
  end
  if r.created then
    w.created = true
    -- a member answers; the pause before a retry starts small again only
    -- once the watch has stood a while (STOOD): a proxy that ends every
    -- stream just after its creation must not be reconnected to at once,
    -- again and again
    w.down_since, w.stood_since = nil, core.mono()
    if not w.next_rev then
      local rev = header_rev(r)
      if rev then w.next_rev = rev_next(rev) end
    end
  end
  if type(r.events) == "table" then
    for _, e in ipairs(r.events) do
      local ev = event_of(e)
      if not ev then
        return false, core.error("etcd", "etcd: watch: malformed event")
      end
      -- never go back: a resumed stream starts at next_rev
      if not w.next_rev or rev_cmp(ev.revision, w.next_rev) >= 0
         or (w.last and ev.revision == w.last) then
        w.queue[#w.queue + 1] = ev
      end
    end
    local n = #w.queue
    if n >= w.qi then
      w.last = w.queue[n].revision
      w.next_rev = rev_next(w.last)
    end
  elseif not r.created then
    -- a progress notification: every event of this watch up to its
    -- header's revision has been sent, so a resumed stream may start
    -- after it. A quiet watch then does not resume from the revision of
    -- its last event, which a compaction may have removed meanwhile
    -- (the resume would fail "compacted")
    local rev = header_rev(r)
    local nxt = rev and rev_next(rev)
    if nxt and (not w.next_rev or rev_cmp(nxt, w.next_rev) > 0) then
      w.next_rev = nxt
    end
  end
  return true
end

function Watch:__call()
  while true do
    if self.closed then return nil end
    local q = self.queue
    if self.qi <= #q then
      local ev = q[self.qi]
      self.qi = self.qi + 1
      self.revision = ev.revision
      return ev
    end
    self.queue, self.qi = {}, 1
    local retry_err
    if not self.stream then
      local ok, err = connect(self)
      if not ok then
        if err.kind == "auth" and err.expired then
          forget_token(self)
          retry_err = err
        elseif err.kind == "auth" or err.kind == "permission"
               or err.kind == "compacted" or err.kind == "invalid" then
          if err.kind == "compacted" and not err.compact_revision then
            err.compact_revision = "0"
          end
          return nil, err
        else
          retry_err = err
        end
      end
    end
    if self.stream then
      local chunk, err = self.stream:read()
      if chunk == nil then
        local created = self.created
        drop(self)
        if err and err.kind ~= "timeout" then
          retry_err = err
        elseif created and not err then
          -- the member (or a proxy) ended a standing watch's stream: etcd
          -- does not, short of a restart; the end of our reconnect_after
          -- cycle is a timeout. A failed attempt: the next endpoint,
          -- after a pause
          retry_err = core.error("etcd", "etcd: watch: the member ended"
            .. " the stream (" .. self.cli.endpoints[self.ep] .. ")")
        elseif not created then
          -- the end of a connection is the normal cycle (reconnect_after)
          -- only for a watch that stood: a member that answered 200 and
          -- then nothing, or closed before the watch was created, is a
          -- failed attempt (the next endpoint, a pause, give_up_after),
          -- not a reason to reconnect to it at once, again and again
          retry_err = core.error(err and "timeout" or "etcd", "etcd: watch:"
            .. " the member " .. (err and "did not create the watch within "
            .. self.reconnect_after .. " s" or "ended the stream before"
            .. " creating the watch") .. " (" .. self.cli.endpoints[self.ep]
            .. ")")
        end
      else
        -- only the new chunk is searched for a line's end, and a line
        -- not yet ended is kept in pieces: a long message (a huge value)
        -- costs time linear in its size, not quadratic
        local pos = 1
        while true do
          local nl = chunk:find("\n", pos, true)
          if not nl then break end
          local parts = self.buf
          parts[#parts + 1] = chunk:sub(pos, nl - 1)
          local line = table.concat(parts)
          self.buf, self.buf_len = {}, 0
          pos = nl + 1
          if line:find("%S") then
            local ok, merr = message(self, line)
            if ok == nil then
              self:close()
              return nil, merr
            elseif ok == false then
              drop(self)
              retry_err = merr
              break
            end
          end
        end
        if self.stream and pos <= #chunk then
          self.buf[#self.buf + 1] = chunk:sub(pos)
          self.buf_len = self.buf_len + #chunk - pos + 1
        end
        if self.buf_len > 64 * 1024 * 1024 then
          drop(self)
          retry_err = core.error("etcd", "etcd: watch: message too large")
        end
      end
    end
    if retry_err then
      -- the next endpoint, after a pause that grows while all are down
      self.last_error = retry_err
      self.ep = self.ep % #self.cli.endpoints + 1
      local now = core.mono()
      if self.stood_since and now - self.stood_since >= _M.STOOD then
        self.backoff = 0.05          -- a first failure after a good while
      end
      self.stood_since = nil
      self.down_since = self.down_since or now
      if self.give_up_after
         and now - self.down_since > self.give_up_after then
        self:close()
        return fail("unavailable", "watch: no endpoint answered for "
                    .. self.give_up_after .. " s (last: "
                    .. tostring(retry_err) .. ")")
      end
      core.sleep(self.backoff)
      self.backoff = math.min(self.backoff * 2, 1)
    end
  end
end

return _M
