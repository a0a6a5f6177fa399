-- gw.console: the operator's console under /console (docs/console.md).
--
-- Who: with gateway.console.access = "loopback", loopback clients only,
-- no login; with "token", anyone holding the console token (or the admin
-- token) logs in on /console/login and gets an HttpOnly, SameSite=Strict
-- session cookie that lasts session_ttl seconds (sessions live in the
-- shared dictionary: every worker sees them; a restart logs everyone
-- out). Every POST carries a CSRF token bound to the session (the login
-- form's is bound to a pre-session cookie, see login_csrf below), and a
-- cross-origin Origin header is refused. Wrong tokens are counted per
-- client address (login_failures per login_window, then 429). Every
-- answer under /console -- the router's 404 and 405 and a handler's
-- failure included -- carries strict security headers (no script at all;
-- the stylesheet is served from here) and is an HTML page.
--
-- The pages (gw.console.pages) read what the gateway records: the
-- payments and attempts, the audit trail, the outbox, the notifications,
-- the reconciliation entries. The levers (replay a dead letter, settle a
-- payment now, run the day's bill reconciliation, flip the degradation
-- switch) write an audit entry with who and when: subject
-- console:<YYYY-MM-DD> (UTC), actor "console:<who>".
local paygate = require "paygate"
local core = require "paygate.core"
local crypto = require "paygate.crypto"
local civil = require "paygate.civil"
local bill = require "paygate.reconcile.bill"
local shared = require "paygate.shared"
local audit = require "paygate.audit"
local outbox = require "paygate.outbox"
local html = require "paygate.html"
local config = require "gw.config"
local pages = require "gw.console.pages"
local model = require "gw.model"
local throttle = require "gw.throttle"
local utf8 = require "paygate.utf8"

local type, tostring, tonumber, floor = type, tostring, tonumber, math.floor
local xpcall, rawget, traceback = xpcall, rawget, debug.traceback

local _M = {}

local COOKIE = "pgc_session"
local LOGIN_COOKIE = "pgc_login"
local LOGIN_COOKIE_TTL = 3600
local K_KEY = "gw:console:key"
local K_SESSION = "gw:console:s:"
local CSP = "Content-Security-Policy"

local SECURITY_HEADERS = {
  ["Content-Type"] = "text/html; charset=utf-8",
  [CSP] = "default-src 'none'; style-src 'self';"
    .. " img-src 'self'; form-action 'self'; frame-ancestors 'none';"
    .. " base-uri 'none'",
  ["X-Frame-Options"] = "DENY",
  ["X-Content-Type-Options"] = "nosniff",
  ["Referrer-Policy"] = "no-referrer",
  ["Cache-Control"] = "no-store",
  ["Cross-Origin-Opener-Policy"] = "same-origin",
  ["Cross-Origin-Resource-Policy"] = "same-origin",
}

local function headers(extra)
  local h = {}
  for k, v in pairs(SECURITY_HEADERS) do h[k] = v end
  for k, v in pairs(extra or {}) do h[k] = v end
  return h
end
_M.headers = headers

local function cookie(req, name)
  local h = req:header("cookie")
  if type(h) ~= "string" then return nil end
  for pair in h:gmatch("[^;]+") do
    local k, v = pair:match("^%s*([^=%s]+)=([^;]*)$")
    if k == name then return (v:gsub("%s+$", "")) end
  end
  return nil
end

-- "/console" or a path under it (also written "//console/..."). Runs
-- after every request of the gateway (its after hook): a plain find
-- first turns the others away without a pattern match.
local function under_console(path)
  return type(path) == "string" and path:find("console", 1, true) ~= nil
         and (path:find("^/+console$") or path:find("^/+console/")) ~= nil
end

local function today()
  return os.date("!%Y-%m-%d", floor(core.time()))
end

--- syntax: routes(ctx) -- adds /console/* when gateway.console is set
function _M.routes(ctx)
  local conf = ctx.gateway.console
  if not conf then return end
  local D = shared.get_dict("paygate")
  D:add(K_KEY, crypto.hex(crypto.random_bytes(32)))
  -- Secure cookies when public_url is https:// or the request itself came
  -- over TLS (a listener with --tls-cert whose public_url is http://)
  local https_url = ctx.gateway.public_url:sub(1, 8) == "https://"
  local function secure(req)
    return https_url or req.scheme == "https"
  end
  pages.init(ctx)

  -- The console key: the HMAC key of every CSRF token, login token and
  -- lever result, one for every worker. The dictionary is LRU and anyone
  -- who reaches the gateway adds entries to it (a throttling count for
  -- each address that sends a wrong token), so a key nobody used for a
  -- while can be evicted: the worker then puts back the one it knows (the
  -- same for all workers: each took the one in the dictionary), or a new
  -- one when another worker has not put one back first. The open forms
  -- stay good, or (a new key) say "reload the page and try again".
  local known = D:get(K_KEY)
  local function key()
    local k = D:get(K_KEY)
    if k == nil then
      D:add(K_KEY, known or crypto.hex(crypto.random_bytes(32)))
      k = D:get(K_KEY) or known
    end
    known = k
    return assert(k, "gw.console: no console key")
  end

  -- Sessions are tied to the token they were opened with: their entries
  -- are named by an HMAC keyed with it. The shared dictionary outlives a
  -- reload, so without the tie a session opened with a token that leaked
  -- would outlast the new token written to shut it out (and a reload to
  -- take it) by up to session_ttl; with it, the new workers do not see
  -- the old sessions. (Not under the console key: a key made again after
  -- an eviction must not end every session, nor split the generations.)
  local sessions = K_SESSION .. (conf.token and crypto.hex(crypto.hmac(
    "sha256", conf.token, "gw:console:session")):sub(1, 16) or "") .. ":"

  -- The caller: { id, actor } or nil and why ("login": no session,
  -- "forbidden": not a loopback client, "host": addressed to a name that
  -- is not loopback). Loopback mode trusts the client's address, so a
  -- request must also be addressed to localhost, 127.x.x.x or [::1]:
  -- otherwise a web page whose name was rebound to 127.0.0.1 (DNS
  -- rebinding) would be same-origin with the console in the operator's
  -- browser, read its pages and CSRF token, and pull its levers.
  local function session(req)
    if conf.access == "loopback" then
      if not config.is_loopback_addr(req.remote_addr) then
        return nil, "forbidden"
      end
      if config.proxied(req) then return nil, "proxied" end
      local host = req:header("host")
      if host ~= nil and not config.is_loopback_addr(tostring(host):lower())
      then
        return nil, "host"
      end
      return { id = "loopback", actor = "console:loopback" }
    end
    local sid = cookie(req, COOKIE)
    if sid and #sid == 40 and sid:match("^%w+$") then
      -- the entry's TTL in the shared dictionary is the session's expiry:
      -- on the monotonic clock, which every worker of the instance shares
      -- and a step of the wall clock (NTP, a VM resumed) does not move;
      -- the wall-clock expiry it holds is not compared (a step forward
      -- would end every session at once)
      local exp = D:get(sessions .. sid)
      if type(exp) == "number" then
        return { id = sid, actor = "console:session-" .. sid:sub(1, 8) }
      end
    end
    return nil, "login"
  end

  local function csrf_of(s)
    return crypto.hex(crypto.hmac("sha256", key(), "csrf|" .. s.id))
  end

  -- A lever's one-line result travels in the redirect's query (done=...)
  -- with the time it was made (at=...) and an HMAC over both and the
  -- session (sig=...): the page shows it only when the console made it,
  -- for this session, within FLASH_TTL seconds, so a link from elsewhere
  -- cannot put its own words in the console, and a result copied into
  -- another session's browser or opened again later is not shown as news.
  local FLASH_TTL = 120
  local function flash_sig(s, at, done)
    return crypto.hex(crypto.hmac("sha256", key(), "flash|" .. s.id .. "|"
                                  .. at .. "|" .. done)):sub(1, 32)
  end
  local function flash_of(req, s)
    local q = req:query()
    local done, at, sig = q.done, q.at, q.sig
    if type(done) ~= "string" or type(sig) ~= "string" or #sig ~= 32
       or type(at) ~= "string" or not at:match("^%d+$") or #at > 12 then
      return nil
    end
    local age = core.time() - tonumber(at)
    if age > FLASH_TTL or age < -5
       or not crypto.constant_time_equal(sig, flash_sig(s, at, done)) then
      return nil
    end
    return done
  end

  local function refuse(status, title, text)
    return status, tostring(pages.layout(title, html.render(
      "<p class=\"error\">{{t}}</p>", { t = text }), {})), headers()
  end

  -- the 403 of a caller session() refused; dest (why "login"): the console
  -- page to go to after the login (console_next), or nil
  local function refuse_caller(why, dest)
    if why == "host" then
      return refuse(403, "Forbidden", "In loopback mode the console answers"
        .. " only requests addressed to localhost, 127.0.0.1 or [::1], not"
        .. " to another name that leads here.")
    elseif why == "proxied" then
      return refuse(403, "Forbidden", "In loopback mode the console refuses"
        .. " requests a proxy relayed (Forwarded, X-Forwarded-For,"
        .. " X-Real-IP): behind a reverse proxy every visitor would look"
        .. " local. Give the console a token (console.access = \"token\").")
    elseif why == "login" then
      -- (a lever pulled from a tab left open after the session ended: the
      -- login goes back to the page it was on)
      return 403, tostring(pages.layout("Forbidden", html.render(
        "<p class=\"error\">Log in first: no session, or it has ended.</p>"
        .. "<p><a href=\"/console/login{{q}}\">Log in</a></p>", {
          q = (dest and dest ~= "/console")
              and ("?next=" .. html.url_encode(dest)) or "" }), {})),
        headers()
    end
    return refuse(403, "Forbidden", "The console answers loopback clients"
      .. " only.")
  end

  -- Every console handler runs guarded: a failure is logged with its
  -- traceback, as the runtime would, but answered with the console's page
  -- and headers rather than the runtime's bare 500.
  local function route(method, path, fn)
    paygate.route(method, path, function(req)
      local ok, status, body, h = xpcall(fn, traceback, req)
      if ok then return status, body, h end
      if type(status) == "table" and rawget(status, "abort") then
        return refuse(status.status, "Refused", tostring(status.message))
      end
      paygate.log.error("gateway: console handler failed", {
        path = req.path, error = tostring(status) })
      return refuse(500, "Internal error", "The console failed on this"
        .. " request; the gateway's log says why.")
    end)
  end

  -- Answers under /console that the console did not make (the router's
  -- 404 and 405, a before hook's refusal) become the console's page with
  -- its headers; the status and an Allow or Retry-After header are kept.
  local KEEP = { allow = true, ["retry-after"] = true }
  paygate.after(function(req, res)
    if not under_console(req.path) then return end
    local h = res.headers
    if type(h) == "table" and h[CSP] == SECURITY_HEADERS[CSP] then return end
    local extra = {}
    for k, v in pairs(type(h) == "table" and h or {}) do
      if type(k) == "string" and KEEP[k:lower()] then extra[k] = v end
    end
    local st = res.status
    local title, text = "Error " .. tostring(st), "The request was refused."
    if st == 404 then
      title, text = "Not found", "There is no such console page."
    elseif st == 405 then
      title, text = "Method not allowed", "This page does not take a "
        .. tostring(req.method) .. " request."
    end
    res.body = tostring(pages.layout(title, html.render(
      "<p class=\"error\">{{t}}</p><p><a href=\"/console\">The console</a>"
      .. "</p>", { t = text }), {}))
    res.headers = headers(extra)
  end)

  -- A request from another origin (a cross-site form) is refused even
  -- before the CSRF token is looked at.
  local function same_origin(req)
    local origin = req:header("origin")
    if origin == nil then return true end
    local host = req:header("host")
    return host ~= nil and (origin == "http://" .. host
                            or origin == "https://" .. host)
  end

  -- The path's parameters and the query's values must be text the store
  -- takes: PostgreSQL refuses invalid UTF-8 and NUL, and a hostile link
  -- must get a 400, not the 503 of a store that "could not be read".
  -- (The flash, done=, at= and sig=, never reaches the store: a lever's result
  -- may quote an error cut inside a character, and must still show.)
  local FLASH = { done = true, at = true, sig = true }
  local function bad_text(req)
    for _, t in ipairs({ req.params, req:query() }) do
      for k, v in pairs(t) do
        for _, x in ipairs({ k, not FLASH[k] and v or nil }) do
          if type(x) == "string" and (x:find("%z") or not utf8.len(x)) then
            return refuse(400, "Bad request", "the path or the query is not"
              .. " UTF-8 text")
          end
        end
      end
    end
    return nil
  end

  -- The page a visitor without a session asked for, carried through the
  -- login (?next=, then the form's hidden field) and gone to after it: a
  -- console page of this host only, or nil. It is outside input (a link
  -- anyone may send), so: "/console", or "/console/..." or "/console?...";
  -- URL characters only (no backslash, which a browser reads as a slash,
  -- no space, no control: nothing that ends the Location header); no "//"
  -- (another host) nor dot segment (out of /console) in its path.
  local function console_next(v)
    if type(v) ~= "string" or #v > 2048
       or not (v == "/console" or v:find("^/console[/?]"))
       or not v:find("^[%w%-._~!$&'()*+,;=:@/?%%]+$") then
      return nil
    end
    local path = v:match("^[^?]*")
    if path:find("//", 1, true) or path:find("/%.")
       or path:lower():find("%2e", 1, true)
       or path:find("^/console/log[io]") then
      return nil
    end
    return v
  end

  -- the page asked for: its path and query as sent (an absolute-form
  -- target's scheme and authority aside)
  local function asked(req)
    local q = tostring(req.target or ""):match("^[^?]*%?(.*)$")
    return console_next(req.path .. ((q and q ~= "") and ("?" .. q) or ""))
  end

  -- GET pages: fn(req, s, view) -> status, markup
  local function page(fn)
    return function(req)
      local s, why = session(req)
      if not s then
        if why == "login" then
          -- (the page asked for goes through the login: a link to a
          -- payment opened without a session still lands on it)
          local want = asked(req)
          return 303, "", headers({ Location = "/console/login"
            .. ((want and want ~= "/console")
                and ("?next=" .. html.url_encode(want)) or "") })
        end
        return refuse_caller(why)
      end
      local st, b, h = bad_text(req)
      if st then return st, b, h end
      -- here: this page, which its levers' forms carry (as next) for a
      -- login should their POST find the session over
      local view = { csrf = csrf_of(s), token_mode = conf.access == "token",
                     flash = flash_of(req, s), here = asked(req) }
      return fn(req, s, view)
    end
  end

  -- POST levers: fn(req, s, form) -> redirect location or status, markup
  local function action(fn)
    return function(req)
      local s, why = session(req)
      if not s then
        -- (the form's next is outside input too: console_next checks it)
        return refuse_caller(why, why == "login"
          and console_next(html.decode_form(req.body).next) or nil)
      end
      local st, b, h = bad_text(req)
      if st then return st, b, h end
      local form = html.decode_form(req.body)
      local want = csrf_of(s)
      local got = form.csrf
      if not same_origin(req) or type(got) ~= "string" or #got ~= #want
         or not crypto.constant_time_equal(got, want) then
        return refuse(403, "Forbidden", "The form's CSRF token is missing or"
          .. " wrong: reload the page and try again.")
      end
      return fn(req, s, form)
    end
  end

  local function audited(s, what, ref, evidence)
    return audit.append(ctx.db, "console:" .. today(), {
      what = what, ref = ref, actor = s.actor, cause = "console",
      evidence = evidence })
  end

  local function back(s, path, done)
    local at = tostring(math.floor(core.time()))
    return 303, "", headers({ Location = path .. (done and ("?done="
      .. html.url_encode(done) .. "&at=" .. at .. "&sig="
      .. flash_sig(s, at, done)) or "") })
  end

  -- an outbox event id: digits only (a BIGINT in PostgreSQL), or nil
  local function event_id(v)
    if type(v) ~= "string" or not v:match("^%d+$") or #v > 14 then
      return nil
    end
    return tonumber(v)
  end

  local function show(status, title, body, view)
    return status, tostring(pages.layout(title, body, view)), headers()
  end

  -- login / logout ------------------------------------------------------

  if conf.access == "token" then
    -- Login CSRF. There is no session yet to bind a token to, so the
    -- login form binds its own: GET /console/login sets a pre-session
    -- cookie (pgc_login: 40 random characters; HttpOnly, SameSite=Strict,
    -- Path=/console/login) and puts HMAC-SHA256(console key, "login|" ..
    -- cookie) in the form's hidden field. A POST is taken only when the
    -- field is that HMAC of the cookie it came with (constant-time
    -- compare). Another site can neither read the cookie nor mint a
    -- field for one (the key never leaves the shared dictionary), and
    -- nothing is stored per visitor. A cookie that is already there is
    -- kept, so two open login tabs both work.
    local function login_nonce(req)
      local n = cookie(req, LOGIN_COOKIE)
      if n and #n == 40 and n:match("^%w+$") then return n end
      return nil
    end
    local function login_csrf(nonce)
      return crypto.hex(crypto.hmac("sha256", key(), "login|" .. nonce))
    end
    -- the form (status, message) with its token and a fresh cookie lease;
    -- dest: the console page to go to after the login (console_next)
    local function login_page(req, status, msg, extra, dest)
      local nonce = login_nonce(req) or crypto.random_nonce(40)
      local h = headers(extra)
      h["Set-Cookie"] = LOGIN_COOKIE .. "=" .. nonce .. "; Path=/console/login;"
        .. " Max-Age=" .. LOGIN_COOKIE_TTL .. "; HttpOnly; SameSite=Strict"
        .. (secure(req) and "; Secure" or "")
      return status, tostring(pages.layout("Log in",
        pages.login(login_csrf(nonce), msg, dest), {})), h
    end

    -- Throttling (gw.throttle): each client address may try
    -- conf.login_failures wrong tokens per conf.login_window seconds,
    -- counted with the admin token's wrong tries; then 429 with
    -- Retry-After until the window ends.

    -- A refused login is a line anyone who reaches the gateway can cause
    -- (no cookie is needed for the first two kinds): bounded as the
    -- notification's and the API's refusals are (gateway.refusal_log: the
    -- first lines of each kind in a window, for all workers, then one line
    -- saying how many more). Was: a line per POST, without limit, which
    -- filled the disk at log level warn.
    local refused_logs = {}
    local function login_refused(level, msg, fields)
      local lim = refused_logs[msg]
      if not lim then
        lim = paygate.log.limiter(msg, ctx.gateway.refusal_log)
        refused_logs[msg] = lim
      end
      lim[level](lim, {}, fields)
    end
    route("GET", "/console/login", function(req)
      return login_page(req, 200, nil, nil, console_next(req:query().next))
    end)
    route("POST", "/console/login", function(req)
      local remote = throttle.host_of(req.remote_addr)
      local form = html.decode_form(req.body)
      local dest = console_next(form.next)
      -- the form again, the page asked for kept
      local function again(status, msg, extra)
        return login_page(req, status, msg, extra, dest)
      end
      if not same_origin(req) then
        login_refused("warn", "gateway: console login refused: cross-origin",
                      { remote = req.remote_addr })
        return again(403, "Cross-origin login refused.")
      end
      local nonce, got = login_nonce(req), form.csrf
      local want = nonce and login_csrf(nonce)
      if not want or type(got) ~= "string" or #got ~= #want
         or not crypto.constant_time_equal(got, want) then
        login_refused("warn", "gateway: console login refused: the form's"
          .. " login token is missing or wrong", { remote = req.remote_addr })
        return again(403, "The login form's CSRF token is missing"
          .. " or wrong (the form was too old, or came from elsewhere):"
          .. " try again.")
      end
      local ck, wait, err = throttle.reserve(remote, conf.login_failures,
                                             conf.login_window)
      if not ck then
        login_refused("error", "gateway: console login refused: the attempt"
          .. " could not be counted", { remote = req.remote_addr,
                                        error = tostring(err) })
        return refuse(503, "Unavailable", "Logins cannot be counted right"
          .. " now: try again later.")
      end
      if wait then
        login_refused("warn", "gateway: console login throttled",
                      { remote = req.remote_addr, retry_after = wait })
        return again(429, "Too many wrong tokens from your"
          .. " address: try again in " .. wait .. " s.",
          { ["Retry-After"] = tostring(wait) })
      end
      local tok = form.token
      local right = conf.token
      if type(tok) ~= "string" or #tok ~= #right
         or not crypto.constant_time_equal(tok, right) then
        login_refused("warn", "gateway: console login refused: wrong token",
                      { remote = req.remote_addr })
        return again(403, "Wrong token.")
      end
      throttle.give_back(ck)            -- a success is not counted
      local sid = crypto.random_nonce(40)
      -- (the value: the wall-clock expiry, which the code before compared:
      -- the workers of the generation before a reload still do)
      D:set(sessions .. sid, core.time() + conf.session_ttl,
            conf.session_ttl)
      paygate.log.info("gateway: console login", {
        remote = req.remote_addr, session = sid:sub(1, 8) })
      return 303, "", headers({ Location = dest or "/console",
        ["Set-Cookie"] = COOKIE .. "=" .. sid .. "; Path=/console;"
          .. " Max-Age=" .. conf.session_ttl .. "; HttpOnly;"
          .. " SameSite=Strict" .. (secure(req) and "; Secure" or "") })
    end)
    route("POST", "/console/logout", action(function(req, s)
      D:delete(sessions .. s.id)
      return 303, "", headers({ Location = "/console/login",
        ["Set-Cookie"] = COOKIE .. "=; Path=/console; Max-Age=0; HttpOnly;"
          .. " SameSite=Strict" .. (secure(req) and "; Secure" or "") })
    end))
  end

  -- pages ---------------------------------------------------------------

  route("GET", "/console/static/console.css", function()
    return 200, pages.CSS, headers({ ["Content-Type"] = "text/css",
      ["Cache-Control"] = "max-age=300" })
  end)
  route("GET", "/console", page(function(_, _, view)
    view.refresh = 30
    return show(200, "Overview", pages.overview(view), view)
  end))
  route("GET", "/console/", function()     -- a typed trailing slash
    return 301, "", headers({ Location = "/console" })
  end)
  route("GET", "/console/payments", page(function(req, _, view)
    local q = req:query()
    -- the "Older" link's cursor: a finite time, "~", a payment id (else
    -- the page would quietly start from the newest again)
    if q.after ~= nil and not pages.parse_cursor(q.after) then
      return refuse(400, "Bad request", "after must be the cursor of an"
                    .. " \"Older\" link")
    end
    if q.since ~= nil and not pages.parse_since(q.since) then
      return refuse(400, "Bad request", "since must be a time in seconds"
                    .. " since the epoch")
    end
    if pages.parse_sub_mchid(q.sub_mchid) == nil then
      return refuse(400, "Bad request", "sub_mchid must be a sub-merchant's"
                    .. " mchid: 1 to 32 digits")
    end
    local body, err = pages.payments(q, view)
    if not body then return show(503, "Payments", pages.failed(err), view) end
    return show(200, "Payments", body, view)
  end))
  route("GET", "/console/payments/:id", page(function(req, _, view)
    local body, err = pages.payment(req.params.id, view)
    if body == false then
      return show(404, "Payment", html.render("<p class=\"error\">There"
        .. " is no payment {{id}}.</p>", { id = req.params.id }), view)
    end
    if not body then return show(503, "Payment", pages.failed(err), view) end
    return show(200, "Payment " .. req.params.id, body, view)
  end))
  route("GET", "/console/outbox", page(function(req, _, view)
    local q = req:query()
    if q.after ~= nil and not event_id(q.after) then
      return refuse(400, "Bad request", "after must be an event id")
    end
    local body, err = pages.dead_letters(q, view)
    if not body then
      return show(503, "Dead letters", pages.failed(err), view)
    end
    return show(200, "Dead letters", body, view)
  end))
  route("GET", "/console/reconcile", page(function(req, _, view)
    local body, err = pages.reconcile(req:query(), view)
    if not body then
      return show(503, "Reconciliation", pages.failed(err), view)
    end
    return show(200, "Reconciliation", body, view)
  end))

  -- levers ----------------------------------------------------------------

  route("POST", "/console/degrade", action(function(req, s, form)
    local on = form.on == "1"
    if form.on ~= "1" and form.on ~= "0" then
      return refuse(400, "Bad request", "on must be 1 or 0")
    end
    -- (flipped even when its audit entry cannot be written: it is the
    -- lever for an outage, the store's included; the page says so)
    local e, err = audited(s, "console.degrade", on and "on" or "off",
                           { on = on, remote = req.remote_addr })
    ctx.set_degraded(on)
    paygate.log.warn("gateway: degradation switched " .. (on and "on"
      or "off") .. " from the console", { actor = s.actor,
                                          audited = e and true or false })
    if not e then
      paygate.log.error("gateway: the degradation switch's audit entry"
        .. " could not be written", { error = tostring(err) })
      return back(s, "/console", "degradation " .. (on and "on" or "off")
                  .. " (not audited: the store failed)")
    end
    return back(s, "/console", "degradation " .. (on and "on" or "off"))
  end))

  route("POST", "/console/outbox/:id/replay", action(function(req, s)
    local id = event_id(req.params.id)
    if not id or id < 1 then
      return refuse(400, "Bad request", "not an event id")
    end
    -- the dead letter's last error and attempts, for the audit entry
    -- (the replay resets them)
    local before = outbox.list(ctx.db, { id = id, state = "dead" })
    before = before and before[1]
    -- only a dead letter: a second submit of the form, or a stale page,
    -- must not send a delivered event to every sink again
    local n, err = outbox.replay(ctx.db, { id = id, state = "dead" })
    if not n then return refuse(503, "Unavailable", tostring(err)) end
    if n == 0 then
      -- nothing changed: not dead (pending or delivered already), or no
      -- such event (nothing to audit either way)
      local rows, lerr = outbox.list(ctx.db, { id = id })
      if not rows then return refuse(503, "Unavailable", tostring(lerr)) end
      if rows[1] == nil then
        return refuse(404, "Not found", "no outbox event " .. id)
      end
      return back(s, "/console/outbox", "event " .. id .. " is not a dead"
                  .. " letter (" .. tostring(rows[1].state) .. ")")
    end
    local e, aerr = audited(s, "console.replay", tostring(id),
                            { event = id, replayed = n,
                              last_error = before and before.last_error,
                              attempts = before and before.attempts })
    if not e then return refuse(503, "Unavailable", tostring(aerr)) end
    return back(s, "/console/outbox", "event " .. id .. " replayed")
  end))

  route("POST", "/console/payments/:id/settle",
                action(function(req, s)
    local id = req.params.id
    local p, err = pages.payment_row(id)
    if p == false then return refuse(404, "Not found", "no such payment") end
    if not p then return refuse(503, "Unavailable", tostring(err)) end
    local before = p.state
    -- the refunds' states before: the query asks about the open ones too,
    -- and what it changed of them is said beside the payment's
    local rb = model.refunds_of(ctx.db, id) or {}
    -- ok: WeChat's trade state of the attempt (ORDER_NOT_EXIST: it has no
    -- such order), said on the page and recorded
    local ok, res = ctx.payments.refresh(p)
    local said, rerr = ok and res or nil, (not ok) and res or nil
    local after = pages.payment_row(id)
    local e, aerr = audited(s, "console.settle", id, {
      payment = id, from = before, to = after and after.state or nil,
      wechat = said, error = (not ok) and tostring(rerr) or nil })
    if not e then return refuse(503, "Unavailable", tostring(aerr)) end
    local path = "/console/payments/" .. html.url_encode(id)
    if not ok then
      return back(s, path, "WeChat could not be asked: " .. tostring(rerr))
    end
    local moved = tostring(before) .. " -> " .. tostring(after and after.state)
    -- its refunds: each one the query moved, or how many open ones stayed
    if rb[1] then
      local was, open, changed = {}, 0, {}
      for _, r in ipairs(rb) do was[r.id] = r.state end
      for _, r in ipairs(model.refunds_of(ctx.db, id) or {}) do
        if was[r.id] and was[r.id] ~= r.state then
          changed[#changed + 1] = "refund " .. tostring(r.out_refund_no)
            .. " " .. was[r.id] .. " -> " .. r.state
        elseif r.state == "processing" or r.state == "unknown"
               or r.state == "created" then
          open = open + 1
        end
      end
      if changed[1] then
        moved = moved .. "; " .. table.concat(changed, ", ")
      elseif open > 0 then
        moved = moved .. "; " .. open .. " open refund" .. (open > 1 and "s"
          or "") .. " unchanged"
      end
    end
    if said == "ORDER_NOT_EXIST" then
      -- its prepay never reached WeChat (or has not yet): nothing applied
      -- before its expiry, closed after it (payments.refresh)
      return back(s, path, "WeChat has no order " .. tostring(p.out_trade_no)
        .. " (ORDER_NOT_EXIST): " .. moved)
    end
    return back(s, path, "queried WeChat: " .. tostring(said) .. "; "
      .. moved)
  end))

  route("POST", "/console/reconcile", action(function(_, s, form)
    local date = form.date
    if not civil.date(date) then
      return refuse(400, "Bad request", "date must be a date, YYYY-MM-DD")
    end
    -- WeChat's days are Beijing's: a day after today there has no bill
    -- (today's is asked for, and WeChat says it is not ready). Today is
    -- the day after the newest bill day; YYYY-MM-DD compares as text.
    if date > bill.bill_date(core.time() + 86400) then
      return refuse(400, "Bad request", date .. " has not begun in "
                    .. "Beijing: no bill exists for it")
    end
    -- every merchant is run, whatever another's run did: the entry and
    -- the page say what each one's did
    local reports, err = pages.run_bill(date)
    local e, aerr = audited(s, "console.reconcile", date, {
      date = date, error = (not reports) and tostring(err) or nil,
      mismatches = reports and reports.total or nil,
      merchants = reports and reports.merchants or nil })
    if not e then return refuse(503, "Unavailable", tostring(aerr)) end
    if not reports then
      return back(s, "/console/reconcile", "reconciliation of " .. date
        .. " failed: " .. tostring(err))
    end
    local runs = reports.merchants
    -- a run that ended: its mismatches, and what was compared (an empty
    -- bill, or how many of its lines with how many rows of ours)
    local function ran(r)
      return r.mismatches .. " mismatches" .. (r.empty and " (an empty"
        .. " bill: WeChat has no trade that day, NO_STATEMENT_EXIST; "
        .. tostring(r.local_rows) .. " local rows compared)" or (" ("
        .. tostring(r.lines) .. " bill lines compared with "
        .. tostring(r.local_rows) .. " local rows)"))
    end
    local each = {}
    for i, r in ipairs(runs) do
      each[i] = "merchant " .. r.merchant .. ": " .. (r.error
        and ("failed: " .. r.error) or r.not_ready
        and ("not ready yet: " .. r.advice) or ran(r))
    end
    if reports.failed > 0 then
      return back(s, "/console/reconcile", "reconciliation of " .. date
        .. ": " .. reports.failed .. " of " .. #runs .. " merchants failed; "
        .. table.concat(each, "; "))
    end
    -- (WeChat still making the bill is no failure: said as not ready,
    -- with when to try again)
    if reports.not_ready > 0 then
      return back(s, "/console/reconcile", "reconciliation of " .. date
        .. ": the bill is not ready yet for " .. reports.not_ready .. " of "
        .. #runs .. " merchants; " .. table.concat(each, "; "))
    end
    return back(s, "/console/reconcile", "reconciled " .. date .. ": "
      .. (#runs == 1 and ran(runs[1]) or (reports.total .. " mismatches"
        .. (#runs > 1 and (" (" .. table.concat(each, "; ") .. ")") or ""))))
  end))

  pages.record_answer_times()
end

return _M
