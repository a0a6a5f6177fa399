-- examples/gateway: the operator's console (/console): who may see it
-- (loopback, or a login with the console token), CSRF on every POST, the
-- security headers, hostile values shown as text on every page, and each
-- lever end to end against the simulator.
local testing = require "paygate.testing"
local audit = require "paygate.audit"
local json = require "paygate.json"
local core = dofile("examples/gateway/spec/core_support.lua")

local TOKEN = "console-token-0123456789"
local HOSTILE = "<script>alert(1)</script>\"'&x"

-- A webhook receiver whose answer the spec sets (204 or an error).
local RECEIVER = [[
local paygate = require "paygate"
local d = require("paygate.shared").get_dict("paygate")
paygate.route("POST", "/mode", function(req)
  d:set("mode", tonumber(req.body))
  return 204
end)
paygate.route("POST", "/hook", function() return d:get("mode") or 500 end)
]]

local write = core.write

local function csrf_of(body)
  return assert(body:match('name="csrf" value="(%x+)"'), "no csrf field")
end

local function form(t)
  local html = require "paygate.html"
  local out = {}
  for k, v in pairs(t) do
    out[#out + 1] = html.url_encode(k) .. "=" .. html.url_encode(v)
  end
  return table.concat(out, "&")
end

local function get(gw, path, cookie)
  return gw.srv:request{ path = path,
                         headers = cookie and { Cookie = cookie } or nil }
end

local function post(gw, path, fields, cookie, extra)
  local h = { ["Content-Type"] = "application/x-www-form-urlencoded" }
  if cookie then h.Cookie = cookie end
  for k, v in pairs(extra or {}) do h[k] = v end
  return gw.srv:request{ method = "POST", path = path, body = form(fields),
                         headers = h }
end

-- The login form: its pre-session cookie ("pgc_login=...") and the form's
-- login CSRF token.
local function login_form(gw)
  local res = get(gw, "/console/login")
  assert.equal(200, res.status, res.body)
  local sc = assert(res.headers["set-cookie"], "no login cookie")
  return { cookie = assert(sc:match("^(pgc_login=%w+);"), sc),
           set_cookie = sc, csrf = csrf_of(res.body) }
end

local function login(g)
  local f = login_form(g)
  local res = post(g, "/console/login", { token = TOKEN, csrf = f.csrf },
                   f.cookie)
  assert.equal(303, res.status, res.body)
  local sc = res.headers["set-cookie"]
  return assert(sc:match("^(pgc_session=%w+);")), sc
end

local function assert_console_headers(res)
  local h = res.headers
  assert.matches("^text/html", h["content-type"])
  assert.equal("DENY", h["x-frame-options"])
  assert.equal("nosniff", h["x-content-type-options"])
  assert.equal("no-store", h["cache-control"])
  assert.equal("no-referrer", h["referrer-policy"])
  assert.matches("default-src 'none'", h["content-security-policy"], 1, true)
  assert.matches("frame-ancestors 'none'", h["content-security-policy"], 1,
                 true)
end

-- the text of every hostile value must show escaped, never as markup
local function assert_escaped(body)
  assert.not_matches("<script>", body, 1, true)
  assert.matches("&lt;script&gt;alert(1)&lt;/script&gt;", body, 1, true)
end

-- the console's audit subject is console:<the UTC day>: what a case
-- appended is read from every day since this file started, so a run
-- across 00:00 UTC finds it on either side
local days = require "support.days"
local T0 = os.time()

-- the last console audit entry: what, ref, who (loopback) and when
local function assert_audited(e, what, ref)
  assert.equal(what, e.what)
  assert.equal(ref, e.ref)
  assert.equal("console:loopback", e.actor)
  assert.is_true(math.abs(e.at / 1000 - os.time()) < 60)
end

local function console_entries(gw)
  return days.audit(gw.db, "console", T0)
end

-- Hostile paging cursors, filters and ids (not an event id, not UTF-8, a
-- NUL byte) get the console's 400 page, never a 5xx: PostgreSQL refuses
-- such values, and the page would say the store could not be read.
local function assert_hostile_refused(gw)
  local page = get(gw, "/console").body
  for _, path in ipairs({
    "/console/outbox?after=1.5", "/console/outbox?after=1e999",
    "/console/outbox?after=99999999999999999999999",
    "/console/outbox?after=%FF", "/console/payments?q=%00",
    "/console/payments?q=%FF%FE", "/console/payments?state=%FF",
    "/console/payments/%FF", "/console/reconcile?date=%C0%AF",
    "/console/payments?after=garbage", "/console/payments?after=1e999~pay_x",
    "/console/payments?after=1.5~", "/console/payments?after=nan~pay_x",
    "/console/payments?since=1.5", "/console/payments?since=-1",
    "/console/payments?since=1e9", "/console/payments?since=9999999999999",
  }) do
    local res = get(gw, path)
    assert.equal(400, res.status, path .. ": " .. res.body)
    assert_console_headers(res)
    assert.not_matches("could not be read", res.body, 1, true)
  end
  for _, path in ipairs({ "/console/payments/%FF/settle",
                          "/console/outbox/1e3/replay",
                          "/console/outbox/99999999999999999/replay" }) do
    local res = post(gw, path, { csrf = csrf_of(page) })
    assert.equal(400, res.status, path .. ": " .. res.body)
    assert.not_matches("could not be read", res.body, 1, true)
  end
end

describe("gateway console", function()
  local sim, gw, gw_tok, rcv

  setup(function()
    sim = testing.simulator{ time_scale = 100 }
    rcv = testing.start_app{ source = RECEIVER }
    local secret = rcv.dir .. "/wh.secret"
    write(secret, "whsec-spec-0123456789abcdefghijklmn\n")
    gw = core.start(sim, { gateway = {
      console = { access = "loopback" },
      reconcile = { enabled = false },
      webhooks = { { url = rcv:url("/hook"), secret_file = secret } },
      dispatcher = { interval = 0.05, max_attempts = 1 } } })
    local tok = rcv.dir .. "/console.token"
    write(tok, TOKEN .. "\n")
    rcv:request{ method = "POST", path = "/mode", body = "204" }
    gw_tok = core.start(sim, { gateway = {
      console = { token_file = tok, session_ttl = 2 },
      reconcile = { enabled = false } } })
  end)

  teardown(function()
    if gw then gw:stop() end
    if gw_tok then gw_tok:stop() end
    testing.stop_all()
  end)

  after_each(function() sim:clear_faults() end)

    describe("access", function()
    it("sends a caller without a session to the login form", function()
      local res = get(gw_tok, "/console")
      assert.equal(303, res.status)
      assert.equal("/console/login", res.headers["location"])
      res = get(gw_tok, "/console/login")
      assert.equal(200, res.status)
      assert.matches('type="password" name="token"', res.body, 1, true)
    end)

    it("carries the page asked for through the login, a console page of"
       .. " this host only", function()
      local p = gw_tok:create{ description = "asked for" }
      local want = "/console/payments/" .. p.id
      local res = get(gw_tok, want)
      assert.equal(303, res.status)
      local loc = res.headers["location"]
      assert.equal("/console/login?next=%2Fconsole%2Fpayments%2F" .. p.id,
                   loc)
      -- the form carries it; a wrong token keeps it; the right one goes
      -- there
      local page = get(gw_tok, loc)
      assert.equal(200, page.status)
      assert.matches('name="next" value="' .. want .. '"', page.body, 1,
                     true)
      local sc = page.headers["set-cookie"]
      local f = { cookie = sc:match("^(pgc_login=%w+);"),
                  csrf = csrf_of(page.body) }
      res = post(gw_tok, "/console/login", { token = "wrong", csrf = f.csrf,
                                             next = want }, f.cookie)
      assert.equal(403, res.status)
      assert.matches('name="next" value="' .. want .. '"', res.body, 1, true)
      res = post(gw_tok, "/console/login", { token = TOKEN, csrf = f.csrf,
                                             next = want }, f.cookie)
      assert.equal(303, res.status, res.body)
      assert.equal(want, res.headers["location"])
      local cookie = res.headers["set-cookie"]:match("^(pgc_session=%w+);")
      page = get(gw_tok, want, cookie)
      assert.equal(200, page.status)
      assert.matches(p.id, page.body, 1, true)
      -- a list with its query: kept as it was asked for
      res = get(gw_tok, "/console/payments?state=unknown&q=x%20y")
      local html = require "paygate.html"
      assert.equal("/console/login?next=" .. html.url_encode(
        "/console/payments?state=unknown&q=x%20y"), res.headers["location"])
      -- anything but a console page of this host: the overview, and the
      -- form does not carry it
      for _, bad in ipairs({ "//evil.example/console",
        "https://evil.example/console", "http:/console", "/\\evil.example",
        "/console/../v1/payments", "/console/%2e%2e/v1/payments",
        "/console//evil.example", "/consolex", "/console\r\nSet-Cookie: a=b",
        "/console/payments/ x", "javascript:alert(1)", "/console/login",
        "evil.example/console", "" }) do
        f = login_form(gw_tok)
        res = post(gw_tok, "/console/login", { token = TOKEN, csrf = f.csrf,
                                               next = bad }, f.cookie)
        assert.equal(303, res.status, bad .. ": " .. res.body)
        assert.equal("/console", res.headers["location"], bad)
        page = get(gw_tok, "/console/login?next=" .. html.url_encode(bad))
        assert.not_matches('name="next"', page.body, 1, true)
      end
    end)

    it("refuses a wrong or missing token", function()
      local f = login_form(gw_tok)
      for _, t in ipairs({ "", "wrong", TOKEN .. "x", TOKEN:sub(1, -2) }) do
        local res = post(gw_tok, "/console/login", { token = t,
                                                     csrf = f.csrf }, f.cookie)
        assert.equal(403, res.status)
        assert.matches("Wrong token", res.body, 1, true)
        assert.not_matches("pgc_session", res.headers["set-cookie"] or "",
                           1, true)
      end
      local res = post(gw_tok, "/console/login", { csrf = f.csrf }, f.cookie)
      assert.equal(403, res.status)
      -- a made-up session cookie is no session
      res = get(gw_tok, "/console", "pgc_session=" .. string.rep("a", 40))
      assert.equal(303, res.status)
    end)

    it("refuses a login without the form's login CSRF token, logging"
       .. " nothing secret", function()
      local f = login_form(gw_tok)
      assert.matches("; HttpOnly", f.set_cookie, 1, true)
      assert.matches("; SameSite=Strict", f.set_cookie, 1, true)
      assert.matches("; Path=/console/login", f.set_cookie, 1, true)
      -- a second visit with the cookie keeps it (two tabs both work)
      local again = get(gw_tok, "/console/login", f.cookie)
      assert.equal(f.csrf, csrf_of(again.body))
      local other = login_form(gw_tok)      -- another browser's pair
      assert.not_equal(f.csrf, other.csrf)
      local bad = f.csrf:sub(1, -2) .. (f.csrf:sub(-1) == "0" and "1" or "0")
      for i, case in ipairs({
        { { token = TOKEN }, f.cookie },                  -- no field
        { { token = TOKEN, csrf = f.csrf } },             -- no cookie
        { { token = TOKEN, csrf = "" }, f.cookie },
        { { token = TOKEN, csrf = bad }, f.cookie },
        { { token = TOKEN, csrf = other.csrf }, f.cookie }, -- not its cookie
        { { token = TOKEN, csrf = f.csrf },
          "pgc_login=" .. string.rep("a", 40) },          -- made-up cookie
        { { token = TOKEN, csrf = f.csrf }, f.cookie,
          { Origin = "http://evil.example" } },           -- cross-origin
      }) do
        local res = post(gw_tok, "/console/login", case[1], case[2], case[3])
        assert.equal(403, res.status, "case " .. i .. ": " .. res.body)
        assert.not_matches("pgc_session", res.headers["set-cookie"] or "", 1,
                           true)
        assert_console_headers(res)
      end
      -- the matching pair logs in
      local res = post(gw_tok, "/console/login", { token = TOKEN,
                                                   csrf = f.csrf }, f.cookie)
      assert.equal(303, res.status, res.body)
      local logs = gw_tok.srv:logs()
      assert.matches("console login refused: the form's login token",
                     logs, 1, true)
      assert.not_matches(TOKEN, logs, 1, true)
      assert.not_matches(f.csrf, logs, 1, true)
      assert.not_matches(f.cookie:match("=(%w+)"), logs, 1, true)
    end)

    it("answers an unknown path or method under /console with an HTML"
       .. " page and the console's headers", function()
      for _, g in ipairs({ gw, gw_tok }) do
        local res = get(g, "/console/nope")
        assert.equal(404, res.status, res.body)
        assert_console_headers(res)
        assert.matches("Not found", res.body, 1, true)
        res = get(g, "/console/")          -- the trailing slash: moved
        assert.equal(301, res.status)
        assert.equal("/console", res.headers["location"])
        assert_console_headers(res)
        res = get(g, "/console/payments/x/y/%3Cscript%3E")
        assert.equal(404, res.status)
        assert_console_headers(res)
        assert.not_matches("<script", res.body, 1, true)
      end
      local res = gw.srv:request{ method = "DELETE",
                                  path = "/console/payments" }
      assert.equal(405, res.status, res.body)
      assert_console_headers(res)
      assert.matches("GET", res.headers["allow"], 1, true)
      -- outside /console: the router's JSON answer, as before
      res = get(gw, "/consolex")
      assert.equal(404, res.status)
      assert.matches("^application/json", res.headers["content-type"])
      assert.is_nil(res.headers["x-frame-options"])
    end)

    it("logs in with the token: an HttpOnly SameSite=Strict cookie with an"
       .. " expiry; the session expires", function()
      local cookie, sc = login(gw_tok)
      assert.matches("; HttpOnly", sc, 1, true)
      assert.matches("; SameSite=Strict", sc, 1, true)
      assert.matches("; Max-Age=2", sc, 1, true)
      assert.matches("; Path=/console", sc, 1, true)
      local res = get(gw_tok, "/console", cookie)
      assert.equal(200, res.status)
      assert.matches("<h1>Overview</h1>", res.body, 1, true)
      testing.wait_until(function()
        return get(gw_tok, "/console", cookie).status == 303
      end, 10, "the session to expire")
    end)

    it("a session lasts session_ttl whatever the wall clock does (a step"
       .. " forward or back)", function()
      -- a copy of the app whose wall clock (paygate.core.time) is the
      -- real one plus the seconds in its folder's clock_step file
      local dir = testing.tmpdir()
      os.execute("cp -r examples/gateway/app.lua examples/gateway/gw"
                 .. " examples/gateway/migrations '" .. dir .. "/'")
      local app = dir .. "/app.lua"
      local f = assert(io.open(app, "rb"))
      local source = f:read("*a")
      f:close()
      write(app, [[
do
  local pcore = require "paygate.core"
  local real = pcore.time
  local file = require("paygate").app_dir .. "/clock_step"
  pcore.time = function()
    local h = io.open(file, "rb")
    local step = h and tonumber(h:read("*a")) or 0
    if h then h:close() end
    return real() + step
  end
end
]] .. source)
      local tok = dir .. "/console.token"
      write(tok, TOKEN .. "\n")
      local g = core.start(sim, { app = dir, gateway = {
        console = { token_file = tok, session_ttl = 4 },
        reconcile = { enabled = false } } })
      local ok, err = pcall(function()
        local cookie = login(g)
        local t0 = require("paygate.core").mono()
        assert.equal(200, get(g, "/console", cookie).status)
        write(dir .. "/clock_step", "7200")          -- two hours ahead
        assert.equal(200, get(g, "/console", cookie).status)
        write(dir .. "/clock_step", "-7200")         -- two hours back
        assert.equal(200, get(g, "/console", cookie).status)
        -- and it still ends after session_ttl
        testing.wait_until(function()
          return get(g, "/console", cookie).status == 303
        end, 15, "the session to expire")
        local lasted = require("paygate.core").mono() - t0
        assert.truthy(lasted >= 3, "ended after " .. lasted .. " s")
      end)
      g:stop()
      assert(ok, tostring(err))
    end)

    it("shows a lever's result to the session that pulled it only",
       function()
      local a, b = login(gw_tok), login(gw_tok)
      local csrf = csrf_of(get(gw_tok, "/console", a).body)
      local res = post(gw_tok, "/console/degrade", { on = "0", csrf = csrf },
                       a)
      assert.equal(303, res.status, res.body)
      local loc = res.headers["location"]
      assert.matches('<p class="flash">degradation off</p>',
                     get(gw_tok, loc, a).body, 1, true)
      local other = get(gw_tok, loc, b)
      assert.equal(200, other.status)
      assert.not_matches('class="flash"', other.body, 1, true)
    end)

    it("logs out: the session is gone", function()
      local cookie = login(gw_tok)
      local page = get(gw_tok, "/console/payments", cookie)
      assert.equal(200, page.status)
      local res = post(gw_tok, "/console/logout",
                       { csrf = csrf_of(page.body) }, cookie)
      assert.equal(303, res.status)
      assert.equal(303, get(gw_tok, "/console/payments", cookie).status)
      -- a lever pulled from a tab left open (the session over): refused,
      -- with the way to log in again
      res = post(gw_tok, "/console/degrade", { on = "1",
                 csrf = csrf_of(page.body) }, cookie)
      assert.equal(403, res.status)
      assert.matches("Log in first", res.body, 1, true)
      assert.matches('<a href="/console/login">', res.body, 1, true)
    end)

    it("sends a lever pulled after the session ended back to its page"
       .. " through the login, a console page of this host only", function()
      local html = require "paygate.html"
      local p = gw_tok:create{ description = "lever after logout" }
      local here = "/console/payments/" .. p.id
      local cookie = login(gw_tok)
      local page = get(gw_tok, here, cookie)
      assert.equal(200, page.status, page.body)
      -- the lever's form says which page it is on
      local settle = assert(page.body:match('action="/console/payments/'
        .. '[^"]*/settle">.-</form>'), "no settle lever")
      assert.matches('name="next" value="' .. here .. '"', settle, 1, true)
      -- (a page's query is kept)
      local rec = get(gw_tok, "/console/reconcile?date=2024-01-02", cookie)
      assert.equal(200, rec.status, rec.body)
      assert.matches('name="next" value="/console/reconcile?date=2024-01-02"',
                     rec.body, 1, true)
      local csrf = csrf_of(page.body)
      local res = post(gw_tok, "/console/logout", { csrf = csrf }, cookie)
      assert.equal(303, res.status)
      res = post(gw_tok, here .. "/settle", { csrf = csrf, next = here },
                 cookie)
      assert.equal(403, res.status)
      assert.matches("Log in first", res.body, 1, true)
      local link = res.body:match('<a href="(/console/login[^"]*)">')
      assert.equal("/console/login?next=" .. html.url_encode(here), link)
      -- the login form carries it, and the login lands there
      page = get(gw_tok, link)
      assert.equal(200, page.status)
      assert.matches('name="next" value="' .. here .. '"', page.body, 1,
                     true)
      local f = { cookie = page.headers["set-cookie"]:match(
                    "^(pgc_login=%w+);"), csrf = csrf_of(page.body) }
      res = post(gw_tok, "/console/login", { token = TOKEN, csrf = f.csrf,
                                             next = here }, f.cookie)
      assert.equal(303, res.status, res.body)
      assert.equal(here, res.headers["location"])
      -- anything but a console page of this host (or the overview): the
      -- plain link
      for _, bad in ipairs({ "//evil.example/console",
        "https://evil.example/console", "/console/../v1/payments",
        "/console/login", "/console\r\nSet-Cookie: a=b", "/console" }) do
        res = post(gw_tok, "/console/degrade", { on = "1", csrf = csrf,
                                                  next = bad }, cookie)
        assert.equal(403, res.status, bad)
        assert.matches('<a href="/console/login">', res.body, 1, true)
      end
    end)

    it("answers with strict security headers", function()
      local res = get(gw, "/console")
      assert.equal(200, res.status)
      local h = res.headers
      assert.equal("DENY", h["x-frame-options"])
      assert.equal("nosniff", h["x-content-type-options"])
      assert.equal("no-store", h["cache-control"])
      assert.equal("no-referrer", h["referrer-policy"])
      local csp = h["content-security-policy"]
      assert.matches("default-src 'none'", csp, 1, true)
      assert.matches("frame-ancestors 'none'", csp, 1, true)
      assert.not_matches("unsafe-inline", csp, 1, true)
      assert.not_matches("script-src", csp, 1, true)
      assert.not_matches("<script", res.body, 1, true)
      assert.not_matches("https?://", res.body)      -- no external assets
      local css = get(gw, "/console/static/console.css")
      assert.equal(200, css.status)
      assert.equal("text/css", css.headers["content-type"])
    end)

    it("is not reachable through the notification route", function()
      for _, p in ipairs({ "/wechatpay/notify/console",
                           "/wechatpay/notify/%2Fconsole" }) do
        local res = gw.srv:request{ method = "POST", path = p, body = "{}" }
        assert.not_equal(200, res.status)
        assert.not_matches("Overview", res.body, 1, true)
      end
      local res = gw.srv:request{ method = "GET",
                                  path = "/wechatpay/notify/console" }
      assert.not_matches("Overview", res.body, 1, true)
    end)
  end)

  describe("CSRF", function()
    it("refuses a lever without the token, with a wrong one, or from"
       .. " another origin", function()
      local page = get(gw, "/console").body
      local good = csrf_of(page)
      local bad = good:sub(1, -2) .. (good:sub(-1) == "0" and "1" or "0")
      for _, f in ipairs({ { on = "1" }, { on = "1", csrf = bad },
                           { on = "1", csrf = "" } }) do
        local res = post(gw, "/console/degrade", f)
        assert.equal(403, res.status)
        assert.matches("CSRF", res.body, 1, true)
      end
      local res = post(gw, "/console/degrade", { on = "1", csrf = good }, nil,
                       { Origin = "http://evil.example" })
      assert.equal(403, res.status)
      assert.is_false(gw.srv:request("/admin/degrade").json.on)
      -- a session's token is not another session's
      local c1 = login(gw_tok)
      local c2 = login(gw_tok)
      local t1 = csrf_of(get(gw_tok, "/console", c1).body)
      res = post(gw_tok, "/console/degrade", { on = "1", csrf = t1 }, c2)
      assert.equal(403, res.status)
      assert.is_false(gw_tok.srv:request("/admin/degrade").json.on)
    end)
  end)

  describe("DNS rebinding", function()
    it("in loopback mode refuses a page or a lever addressed to a name"
       .. " that is not loopback", function()
      local evil = { Host = "evil.example:" .. gw.srv.port }
      local res = gw.srv:request{ path = "/console", headers = evil }
      assert.equal(403, res.status)
      assert_console_headers(res)
      assert.not_matches('name="csrf"', res.body, 1, true)
      assert.matches("localhost", res.body, 1, true)
      local good = csrf_of(get(gw, "/console").body)
      res = post(gw, "/console/degrade", { on = "1", csrf = good }, nil,
                 { Host = evil.Host, Origin = "http://" .. evil.Host })
      assert.equal(403, res.status)
      assert.is_false(gw.srv:request("/admin/degrade").json.on)
      -- the loopback names are fine
      for _, h in ipairs({ "localhost", "127.0.0.1", "[::1]", "LOCALHOST" }) do
        res = gw.srv:request{ path = "/console/payments",
                              headers = { Host = h .. ":" .. gw.srv.port } }
        assert.equal(200, res.status, h)
      end
    end)

    it("in loopback mode refuses a request a proxy relayed: behind a"
       .. " reverse proxy every visitor would look local", function()
      for _, h in ipairs({ { ["X-Forwarded-For"] = "203.0.113.9" },
                           { Forwarded = "for=203.0.113.9" },
                           { ["X-Real-IP"] = "203.0.113.9" } }) do
        local res = gw.srv:request{ path = "/console", headers = h }
        assert.equal(403, res.status)
        assert.matches("a proxy relayed", res.body, 1, true)
        assert.not_matches('name="csrf"', res.body, 1, true)
        -- the admin routes (no token here) and dev_app alike
        res = gw.srv:request{ path = "/admin/degrade", headers = h }
        assert.equal(403, res.status, res.body)
      end
    end)
  end)

  describe("pages", function()
    it("show a hostile description as text on the list, the search and"
       .. " the payment page", function()
      local p = gw:create{ description = HOSTILE }
      local list = get(gw, "/console/payments")
      assert.equal(200, list.status)
      assert_escaped(list.body)
      local found = get(gw, "/console/payments?q=" .. p.out_trade_no)
      assert_escaped(found.body)
      assert.matches(p.id, found.body, 1, true)
      local page = get(gw, "/console/payments/" .. p.id)
      assert.equal(200, page.status)
      assert_escaped(page.body)
      assert.matches("hash chain verified", page.body, 1, true)
      assert.matches("payment.created", page.body, 1, true)
    end)

    it("show the payment's ids, its appid among them", function()
      -- was: merchant, order_id and out_trade_no, not the appid the
      -- payment JSON carries (every attempt is made under it)
      local p = gw:create{}
      assert.is_string(p.appid)
      local page = get(gw, "/console/payments/" .. p.id)
      assert.equal(200, page.status)
      local sec = assert(page.body:match("<section>(.-)</section>"))
      assert.matches("<tr><td>merchant</td><td>" .. p.mchid .. "</td></tr>"
        .. "<tr><td>appid</td><td>" .. p.appid .. "</td></tr>", sec, 1, true)
      -- a direct merchant's payment has no sub-merchant ids to show
      assert.not_matches("<td>sub_mchid</td>", sec, 1, true)
      assert.not_matches("<td>sub_appid</td>", sec, 1, true)
      local att = assert(page.body:match("<h2>Attempts</h2>(.-)</section>"))
      assert.not_matches("<th>sub_appid</th>", att, 1, true)
    end)

    it("escape a hostile search term and answer 404 for no payment",
       function()
      local res = get(gw, "/console/payments?q=%3Cscript%3Ealert(1)%3C%2F"
                      .. "script%3E%22%27%26x")
      assert.equal(200, res.status)
      assert_escaped(res.body)
      res = get(gw, "/console/payments/%3Cscript%3Ealert(1)%3C%2Fscript%3E")
      assert.equal(404, res.status)
      assert.not_matches("<script>", res.body, 1, true)
      -- it says what is wrong, not that the store failed
      assert.matches("There is no payment &lt;script&gt;", res.body, 1, true)
      assert.not_matches("could not be read", res.body, 1, true)
    end)

    it("answer a hostile query or path 400", function()
      assert_hostile_refused(gw)
    end)

    -- a paid payment of 3.00 with a refund of 1.20, and the refund
    local function refunded(order, reference)
      local p = gw:create{ order_id = order, amount = 300 }
      sim:pay_and_wait(p.out_trade_no)
      gw:wait_state(p.id, "paid")
      local rf = gw:call("POST", "/v1/payments/" .. p.id .. "/refunds",
                         { amount = 120, reference = reference })
      assert.equal(201, rf.status, rf.body)
      return p, rf.json
    end

    it("show a payment's refunds", function()
      local p, r = refunded("ord-refunds-" .. os.time())
      local page = get(gw, "/console/payments/" .. p.id)
      assert.equal(200, page.status)
      local sec = page.body:match("<h2>Refunds</h2>(.-)</section>")
      assert.is_truthy(sec, "no refunds section")
      assert.matches("<td>" .. r.id .. "</td><td>" .. r.out_refund_no
        .. "</td><td>" .. r.refund_id .. "</td><td>1.20</td><td>" .. r.state
        .. "</td><td>merchant</td>", sec, 1, true)
      assert.matches(os.date("!%Y-%m-%d", math.floor(r.created_at)), sec, 1,
                     true)
      -- a payment without refunds says so
      local other = gw:create{}
      local none = get(gw, "/console/payments/" .. other.id).body
      assert.matches("<h2>Refunds</h2><p class=\"empty\">None.</p>", none, 1,
                     true)
    end)

    it("show what is left to refund, and the abnormal refunds to apply for"
       .. " on the payment and the overview", function()
      -- was: the payment showed only "refunded" (succeeded refunds), the
      -- refunds table no refund_id (what the abnormal-refund application
      -- names), and nothing outside the payment's own page listed an
      -- abnormal refund: an operator without a consumer of refund.abnormal
      -- could not find the money owed to payers
      local p, r = refunded("ord-abnormal-" .. os.time())
      sim:settle(r.out_refund_no, "ABNORMAL")
      sim:wait_notification({ out_refund_no = r.out_refund_no,
                              event_type = "REFUND.ABNORMAL" })
      local page = get(gw, "/console/payments/" .. p.id).body
      -- 3.00 paid, 1.20 abnormal (owed, so counted): 1.80 left
      assert.matches("<td>refundable</td><td>1.80</td>", page, 1, true)
      local sec = page:match("<h2>Refunds</h2>(.-)</section>")
      assert.matches("<td>" .. r.refund_id .. "</td><td>1.20</td><td>"
        .. "abnormal: owed to the payer; apply for the abnormal refund",
        sec, 1, true)
      local body = get(gw, "/console").body
      local box = body:match("<h2>Abnormal refunds[^<]*</h2>(.-)</section>")
      assert.is_truthy(box, "no abnormal refunds on the overview")
      assert.matches('<a href="/console/payments/' .. p.id .. '">', box, 1,
                     true)
      assert.matches("<td>" .. r.out_refund_no .. "</td><td>" .. r.refund_id
        .. "</td>", box, 1, true)
      -- once it is paid back (an application made), it leaves the list
      assert(gw.db:exec("UPDATE gw_refunds SET state = 'succeeded' WHERE"
                        .. " id = $1", { r.id }))
      box = get(gw, "/console").body:match(
        "<h2>Abnormal refunds[^<]*</h2>(.-)</section>")
      assert.not_matches(r.out_refund_no, box, 1, true)
    end)

    it("find a payment by its order_id, a refund's out_refund_no or a"
       .. " refund's reference", function()
      -- (the reference: customer service has the return's number, not
      -- the payment's; was: not searched)
      local order = "ord-search-" .. os.time()
      local ref = "RMA-search-" .. os.time()
      local p, r = refunded(order, ref)
      for _, term in ipairs({ order, r.out_refund_no, ref }) do
        local found = get(gw, "/console/payments?q=" .. term)
        assert.equal(200, found.status)
        local ids = {}
        for id in found.body:gmatch('<a href="/console/payments/(pay_%w+)">')
        do ids[#ids + 1] = id end
        assert.same({ p.id }, ids, term)
      end
    end)

    it("page payments newest first by keyset", function()
      local ids = {}
      for i = 1, 55 do
        ids[i] = gw:create{ description = "page " .. i }.id
      end
      local seen, path, pages = {}, "/console/payments", 0
      while path and pages < 20 do
        local body = get(gw, path).body
        for id in body:gmatch('<a href="/console/payments/(pay_%w+)">') do
          assert.is_nil(seen[id], "a payment on two pages")
          seen[id] = true
        end
        path = body:match('<a href="(/console/payments%?after=[^"]+)">')
        path = path and path:gsub("&amp;", "&")
        pages = pages + 1
      end
      assert.is_true(pages >= 2)
      for _, id in ipairs(ids) do assert.is_true(seen[id], id) end
    end)

    it("show the overview: states, the outbox, the switch, the chart",
       function()
      gw:create{ description = HOSTILE }
      local body = get(gw, "/console").body
      assert.matches("Payments, last 24 h", body, 1, true)
      assert.matches('href="/console/payments%?state=paying&amp;since=%d+"',
                     body)
      assert.matches("<svg", body, 1, true)
      assert.matches("5 s window", body, 1, true)
      assert.matches("Degradation switch", body, 1, true)
      -- the platform certificate's and the merchant certificate's days
      local _, ndays = body:gsub("%d+ days?</span>", "")
      assert.equal(2, ndays)
      assert.not_matches("<script", body, 1, true)
    end)

    it("link each 24 h count to the list of the same payments", function()
      -- a payment created three days ago: not in the 24 h counts, and
      -- not on the list they link to
      local old = gw:create{ description = "three days old" }
      assert.equal("paying", old.state)
      assert(gw.db:exec("UPDATE gw_payments SET created_at = created_at -"
                        .. " 3 * 86400 WHERE id = $1", { old.id }))
      local body = get(gw, "/console").body
      local href, n = body:match('<td><a href="(/console/payments%?state='
        .. 'paying[^"]*)">paying</a></td><td>(%d+)</td>')
      assert.truthy(href, body)
      href = href:gsub("&amp;", "&")
      assert.matches("&since=%d+$", href)
      -- the list it links to, every page: the same number, the old one
      -- not among them
      local seen, count, path, pages = {}, 0, href, 0
      while path and pages < 20 do
        local page = get(gw, path)
        assert.equal(200, page.status, page.body)
        if pages == 0 then
          assert.matches("Created since ", page.body, 1, true)
        end
        for id in page.body:gmatch('<a href="/console/payments/(pay_%w+)">')
        do
          assert.is_nil(seen[id], "a payment on two pages")
          seen[id] = true
          count = count + 1
        end
        path = page.body:match('<a href="(/console/payments%?after=[^"]+)">')
        path = path and path:gsub("&amp;", "&")
        if path then assert.matches("&since=%d+", path) end
        pages = pages + 1
      end
      assert.equal(tonumber(n), count)
      assert.is_nil(seen[old.id])
      -- the state's list of all time has it
      local all = get(gw, "/console/payments?q=" .. old.id).body
      assert.matches(old.id, all, 1, true)
    end)

    it("draw the notification answer times of the last hour", function()
      local function answered()
        local body = get(gw, "/console").body
        return tonumber(body:match("<p>(%d+) answered;")), body
      end
      local n0 = answered()
      local p = gw:create{ description = "notified" }
      sim:pay(p.out_trade_no)
      local body
      testing.wait_until(function()
        local st = assert(gw.db:query("SELECT state FROM gw_payments WHERE"
          .. " id = $1", { p.id }))[1].state
        local n
        n, body = answered()
        return st == "paid" and n > n0
      end, 10, "the notification applied and on the overview")
      assert.matches('<circle class="p99"', body, 1, true)
      assert.matches('<rect class="n"', body, 1, true)
      assert.matches("worst p99 under [%d.]+ s", body)
      local page = get(gw, "/console/payments/" .. p.id).body
      assert.matches("TRANSACTION.SUCCESS", page, 1, true)
      assert.matches("payment.succeeded", page, 1, true)
    end)
  end)

  describe("levers", function()
    it("flip the degradation switch, audited", function()
      local csrf = csrf_of(get(gw, "/console").body)
      local res = post(gw, "/console/degrade", { on = "1", csrf = csrf })
      assert.equal(303, res.status, res.body)
      assert.is_true(gw.srv:request("/admin/degrade").json.on)
      assert.matches("ON: calls to WeChat", get(gw, "/console").body, 1, true)
      -- the redirect shows the lever's result; a hand-made one is not shown
      local back = get(gw, res.headers["location"]).body
      assert.matches('<p class="flash">degradation on</p>', back, 1, true)
      for _, q in ipairs({ "?done=Call%20us", "?done=Call%20us&sig="
                           .. string.rep("0", 32) }) do
        assert.not_matches("Call us", get(gw, "/console" .. q).body, 1, true)
      end
      -- the HMAC covers the time it was made: another time is not shown
      local loc = res.headers["location"]
      local at = assert(loc:match("[?&]at=(%d+)"), loc)
      for _, other in ipairs({ tostring(at - 1), tostring(at - 3600) }) do
        local forged = loc:gsub("([?&]at=)%d+", "%1" .. other)
        assert.not_matches('class="flash"', get(gw, forged).body, 1, true)
      end
      res = post(gw, "/console/degrade", { on = "0", csrf = csrf })
      assert.equal(303, res.status)
      assert.is_false(gw.srv:request("/admin/degrade").json.on)
      local e = console_entries(gw)
      local last, prev = e[#e], e[#e - 1]
      assert.equal("console.degrade", prev.what)
      assert.equal("on", prev.ref)
      assert.equal("off", last.ref)
      assert.equal("console:loopback", last.actor)
      assert.is_true(math.abs(last.at / 1000 - os.time()) < 60)
    end)

    it("replay a dead letter", function()
      rcv:request{ method = "POST", path = "/mode", body = "500" }
      local p = gw:create{ description = "dead letter" }
      local row
      testing.wait_until(function()
        local rows = assert(gw.db:query("SELECT id, state FROM"
          .. " paygate_outbox WHERE subject = $1", { p.id }))
        row = rows[1]
        return row and row.state == "dead"
      end, 10, "the event to be dead-lettered")
      local page = get(gw, "/console/outbox")
      assert.matches("/console/outbox/" .. row.id .. "/replay", page.body, 1,
                     true)
      rcv:request{ method = "POST", path = "/mode", body = "204" }
      local res = post(gw, "/console/outbox/" .. row.id .. "/replay",
                       { csrf = csrf_of(page.body) })
      assert.equal(303, res.status, res.body)
      local delivered
      testing.wait_until(function()
        local rows = assert(gw.db:query("SELECT state, delivered_at FROM"
          .. " paygate_outbox WHERE id = $1", { row.id }))
        delivered = rows[1]
        return delivered.state == "delivered"
      end, 10, "the replayed event to be delivered")
      local e = console_entries(gw)
      assert_audited(e[#e], "console.replay", tostring(row.id))
      -- what the replay reset is kept in the entry: why it was dead
      local ev = e[#e].evidence
      if type(ev) == "string" then ev = require("cjson").decode(ev) end
      assert.matches("500", tostring(ev.last_error))
      assert.truthy(ev.attempts >= 1)
      -- the same form submitted again (a double click, a stale page, the
      -- browser's resubmit): no dead letter any more, nothing re-sent
      res = post(gw, "/console/outbox/" .. row.id .. "/replay",
                 { csrf = csrf_of(page.body) })
      assert.equal(303, res.status, res.body)
      assert.equal(#e, #console_entries(gw), "replayed and audited again")
      local now = assert(gw.db:query("SELECT state, delivered_at FROM"
        .. " paygate_outbox WHERE id = $1", { row.id }))[1]
      assert.equal("delivered", now.state)
      assert.equal(delivered.delivered_at, now.delivered_at)
      -- an event that does not exist: 404, and nothing audited (the
      -- reconcile page always has a form to take the csrf token from)
      page = get(gw, "/console/reconcile")
      res = post(gw, "/console/outbox/" .. (row.id + 100000) .. "/replay",
                 { csrf = csrf_of(page.body) })
      assert.equal(404, res.status, res.body)
      assert.matches("no outbox event", res.body, 1, true)
      assert.equal(#e, #console_entries(gw))
    end)

    it("counts an event's deliveries across its replays, as its receivers"
       .. " do", function()
      -- the deliveries' `attempt` goes on across a replay (outbox's
      -- prior_attempts); the pages showed the count since the last one
      local outbox = require "paygate.outbox"
      rcv:request{ method = "POST", path = "/mode", body = "500" }
      local p = gw:create{ description = "dead twice" }
      local id
      local function state_is(want)
        return function()
          local rows = assert(gw.db:query("SELECT id, state FROM"
            .. " paygate_outbox WHERE subject = $1", { p.id }))
          id = rows[1] and rows[1].id
          return rows[1] and rows[1].state == want
        end
      end
      testing.wait_until(state_is("dead"), 10, "the first dead letter")
      assert.equal(1, assert(outbox.replay(gw.db, id)))
      testing.wait_until(state_is("dead"), 10, "the replay dead again")
      local cell = "<td>2 (1 since its last replay)</td>"
      local page = get(gw, "/console/outbox")
      assert.equal(200, page.status)
      assert.matches(cell, page.body, 1, true)
      rcv:request{ method = "POST", path = "/mode", body = "204" }
      assert.equal(1, assert(outbox.replay(gw.db, id)))
      testing.wait_until(state_is("delivered"), 10, "the delivery")
      page = get(gw, "/console/payments/" .. p.id)
      assert.equal(200, page.status)
      assert.matches("<td>" .. id .. "</td><td>payment.paying</td><td>"
                     .. "delivered</td><td>3 (1 since its last replay)</td>",
                     page.body, 1, true)
    end)

    it("names paygate doctor's unsigned probe among refused notifications",
       function()
      local res = gw.srv:request{ method = "POST", path = "/wechatpay/notify/"
        .. sim.merchant.mchid, headers = { ["Content-Type"] =
        "application/json" }, body = '{"id":"paygate-doctor-probe",'
        .. '"event_type":"DOCTOR.PROBE"}' }
      assert.is_true(res.status >= 400, res.status .. " " .. res.body)
      local body
      testing.wait_until(function()
        body = get(gw, "/console").body
        return body:find("claims to be paygate doctor", 1, true)
      end, 10, "the refused probe on the overview")
      -- the chart names its percentiles by their histogram buckets, and
      -- its minutes as UTC (they read as a local 23:30 before)
      assert.matches("<title>%d%d:%d%dZ: %d+ notifications, p50 under"
                     .. " [%d.]+ s, p99 under [%d.]+ s %(histogram buckets%)",
                     body)
    end)

    it("settle an unknown payment now by a query", function()
      sim:fault{ endpoint = "prepay", kind = "bad_signature", count = 1 }
      local res = gw:call("POST", "/v1/payments", { order_id = "c-"
        .. os.time() .. math.random(1e6), channel = "native", amount = 43,
        description = "unknown" })
      assert.equal(502, res.status, res.body)
      local p = res.json.payment
      assert.equal("unknown", p.state)
      local row = assert(gw.db:query("SELECT out_trade_no FROM gw_payments"
        .. " WHERE id = $1", { p.id }))[1]
      sim:fault{ endpoint = "notify", kind = "never_sent", count = 1 }
      sim:pay(row.out_trade_no)
      local page = get(gw, "/console/payments/" .. p.id)
      res = post(gw, "/console/payments/" .. p.id .. "/settle",
                 { csrf = csrf_of(page.body) })
      assert.equal(303, res.status, res.body)
      local state = assert(gw.db:query("SELECT state FROM gw_payments WHERE"
        .. " id = $1", { p.id }))[1].state
      assert.equal("paid", state)
      local e = console_entries(gw)
      assert_audited(e[#e], "console.settle", p.id)
      assert.matches('"to":"paid"', e[#e].evidence, 1, true)
      page = get(gw, "/console/payments/" .. p.id .. "?done=x")
      assert.matches("payment.succeeded", page.body, 1, true)
    end)

    it("settle says what WeChat answered, and when it has no such order",
       function()
      -- the prepay never reaches WeChat (every try reset before any work):
      -- the payment is unknown and WeChat has no order for it
      sim:fault{ endpoint = "prepay", kind = "reset", count = 20 }
      local res = gw:call("POST", "/v1/payments", { order_id = "n-"
        .. os.time() .. math.random(1e6), channel = "native", amount = 44,
        description = "never made" })
      sim:clear_faults()
      local p = assert(res.json.payment, res.body)
      assert.equal("unknown", p.state)
      local otn = assert(gw.db:query("SELECT out_trade_no FROM gw_payments"
        .. " WHERE id = $1", { p.id }))[1].out_trade_no
      local page = get(gw, "/console/payments/" .. p.id)
      res = post(gw, "/console/payments/" .. p.id .. "/settle",
                 { csrf = csrf_of(page.body) })
      assert.equal(303, res.status, res.body)
      local back = get(gw, res.headers["location"]).body
      assert.matches("WeChat has no order " .. otn .. " (ORDER_NOT_EXIST):"
                     .. " unknown -&gt; unknown", back, 1, true)
      local e = console_entries(gw)
      assert_audited(e[#e], "console.settle", p.id)
      assert.matches('"wechat":"ORDER_NOT_EXIST"', e[#e].evidence, 1, true)
      -- an order WeChat has: its trade state is said
      local q = gw:create{ description = "open" }
      res = post(gw, "/console/payments/" .. q.id .. "/settle",
                 { csrf = csrf_of(page.body) })
      assert.equal(303, res.status, res.body)
      back = get(gw, res.headers["location"]).body
      assert.matches("queried WeChat: NOTPAY; paying -&gt; paying", back, 1,
                     true)
    end)

    it("settle says what the query changed of the payment's refunds",
       function()
      local p = gw:create{ amount = 60, description = "refund queried" }
      sim:pay_and_wait(p.out_trade_no)
      gw:wait_state(p.id, "paid")
      local rf = gw:call("POST", "/v1/payments/" .. p.id .. "/refunds",
                         { amount = 20 })
      assert.equal(201, rf.status, rf.body)
      local no = rf.json.out_refund_no
      local page = get(gw, "/console/payments/" .. p.id)
      -- still processing at WeChat: said as an open refund unchanged
      local res = post(gw, "/console/payments/" .. p.id .. "/settle",
                       { csrf = csrf_of(page.body) })
      assert.equal(303, res.status, res.body)
      local back = get(gw, res.headers["location"]).body
      assert.matches("paid -&gt; paid; 1 open refund unchanged", back, 1,
                     true)
      -- settled at WeChat, its notification lost: the query settles it
      -- here, and the page says so (before: only the payment's states)
      sim:fault{ endpoint = "notify", kind = "never_sent", count = 1 }
      sim:settle(no)
      page = get(gw, "/console/payments/" .. p.id)
      res = post(gw, "/console/payments/" .. p.id .. "/settle",
                 { csrf = csrf_of(page.body) })
      back = get(gw, res.headers["location"]).body
      assert.matches("; refund " .. no .. " processing -&gt; succeeded",
                     back, 1, true)
    end)

    it("settle closes an expired payment WeChat has no order for, as"
       .. " reconciliation does; so does ?refresh=1", function()
      -- prepays that never reach WeChat: unknown, no order at WeChat
      local function never_made(tag)
        sim:fault{ endpoint = "prepay", kind = "reset", count = 20 }
        local res = gw:call("POST", "/v1/payments", { order_id = tag .. "-"
          .. os.time() .. math.random(1e6), channel = "native", amount = 45,
          description = "never made, expired" })
        sim:clear_faults()
        local p = assert(res.json.payment, res.body)
        assert.equal("unknown", p.state)
        local row = assert(gw.db:query("SELECT out_trade_no FROM gw_payments"
          .. " WHERE id = $1", { p.id }))[1]
        -- its time is over
        assert(gw.db:exec("UPDATE gw_payments SET expires_at = $2 WHERE"
                          .. " id = $1", { p.id, os.time() - 1 }))
        return p.id, row.out_trade_no
      end
      local function assert_closed(id, otn)
        local row = assert(gw.db:query("SELECT state FROM gw_payments WHERE"
          .. " id = $1", { id }))[1]
        assert.equal("closed", row.state)
        -- the transition in the payment's chain, saying why
        local e = assert(audit.entries(gw.db, "payment:" .. id))
        local last = e[#e]
        assert.equal("closed", last.to)
        assert.equal("query", last.cause)
        assert.equal("gateway:query", last.actor)
        local ev = last.evidence
        if type(ev) == "string" then ev = json.decode(ev) end
        assert.equal("ORDER_NOT_EXIST", ev.trade_state)
        assert.equal(otn, ev.out_trade_no)
        -- its attempt closed (WeChat has none to close), its event sent
        local a = assert(gw.db:query("SELECT state, close_check_at FROM"
          .. " gw_attempts WHERE out_trade_no = $1", { otn }))[1]
        assert.equal("closed", a.state)
        assert.is_true(a.close_check_at == nil
                       or a.close_check_at == require("paygate.core").null)
        local evs = assert(gw.db:query("SELECT type FROM paygate_outbox"
          .. " WHERE subject = $1 AND type = 'payment.closed'", { id }))
        assert.equal(1, #evs)
      end
      local id, otn = never_made("x")
      local page = get(gw, "/console/payments/" .. id)
      local res = post(gw, "/console/payments/" .. id .. "/settle",
                       { csrf = csrf_of(page.body) })
      assert.equal(303, res.status, res.body)
      local back = get(gw, res.headers["location"]).body
      assert.matches("WeChat has no order " .. otn .. " (ORDER_NOT_EXIST):"
                     .. " unknown -&gt; closed", back, 1, true)
      assert_closed(id, otn)
      local e = console_entries(gw)
      assert_audited(e[#e], "console.settle", id)
      assert.matches('"to":"closed"', e[#e].evidence, 1, true)
      -- the API's refresh shares it
      id, otn = never_made("y")
      res = gw:call("GET", "/v1/payments/" .. id .. "?refresh=1")
      assert.equal(200, res.status, res.body)
      assert.equal("closed", res.json.state)
      assert.is_nil(res.json.stale)
      assert_closed(id, otn)
    end)

    it("run the bill reconciliation for a date", function()
      -- a refund WeChat paid back whose notification was lost: still
      -- processing here, the bill names it (the daily job's run reports a
      -- state mismatch of it, and so must the lever's)
      -- (and a payment whose amount is changed here below: the report has
      -- a row of it), both made within one Beijing day, the bill's (made
      -- again in the new day when a midnight passed meanwhile)
      local date, rp, rf, paid = days.within(days.BEIJING, function()
        local rp = gw:create{ description = "refunded" }
        sim:pay_and_wait(rp.out_trade_no)
        gw:wait_state(rp.id, "paid")
        local rf = gw:call("POST", "/v1/payments/" .. rp.id .. "/refunds",
                           { amount = 1 })
        assert.equal(201, rf.status, rf.body)
        sim:fault{ endpoint = "notify", kind = "never_sent", count = 1 }
        sim:settle(rf.json.out_refund_no, "SUCCESS")
        testing.wait_until(function()
          local n = sim:notifications{ out_refund_no = rf.json.out_refund_no }
          return n[1] and n[1].state == "dropped"
        end, 10, "the refund's notification dropped")
        local pp = gw:create{ description = "amount changed" }
        sim:pay_and_wait(pp.out_trade_no)
        gw:wait_state(pp.id, "paid")
        return rp, rf, assert(gw.db:query("SELECT id, paid_out_trade_no"
          .. " FROM gw_payments WHERE id = $1", { pp.id }))[1]
      end)
      sim:close_bills(date)
      assert(gw.db:exec("UPDATE gw_payments SET amount = amount + 1 WHERE"
                        .. " id = $1", { paid.id }))
      local page = get(gw, "/console/reconcile")
      -- no such day, and a day not begun yet: refused, nothing audited
      local n = #console_entries(gw)
      local future = os.date("!%Y-%m-%d", os.time() + 8 * 3600 + 2 * 86400)
      for _, bad in ipairs({ "2026-02-30", "2026-13-01", future }) do
        local r = post(gw, "/console/reconcile", { date = bad,
                                                   csrf = csrf_of(page.body) })
        assert.equal(400, r.status, bad .. ": " .. r.body)
      end
      assert.equal(n, #console_entries(gw))
      local res = post(gw, "/console/reconcile", { date = date,
                                                   csrf = csrf_of(page.body) })
      assert(gw.db:exec("UPDATE gw_payments SET amount = amount - 1 WHERE"
                        .. " id = $1", { paid.id }))
      assert.equal(303, res.status, res.body)
      assert.matches("reconciled", res.headers["location"], 1, true)
      local r = assert(audit.entries(gw.db, "reconcile:" .. date))
      assert.equal("reconcile.bill", r[#r].what)
      local ev = json.decode(r[#r].evidence)
      assert.equal(sim.merchant.mchid, ev.merchant)
      -- the page says what was compared: the bill's lines, our rows
      local flash = get(gw, res.headers["location"]).body:match(
        '<p class="flash">(.-)</p>')
      assert.matches("reconciled " .. date .. ": 2 mismatches ("
        .. (ev.remote_payments + ev.remote_refunds) .. " bill lines compared"
        .. " with " .. ev.local_rows .. " local rows)", flash, 1, true)
      local e = console_entries(gw)
      assert_audited(e[#e], "console.reconcile", date)
      page = get(gw, "/console/reconcile?date=" .. date)
      assert.equal(200, page.status)
      assert.matches("Mismatches of " .. date, page.body, 1, true)
      -- the report's rows, cell by cell
      assert.matches("<th>out_trade_no</th>", page.body, 1, true)
      assert.matches("<td>state</td><td>" .. rp.out_trade_no .. "</td><td>"
                     .. rf.json.out_refund_no .. "</td><td>processing</td>",
                     page.body, 1, true)
      assert.matches("<td>amount</td><td>" .. paid.paid_out_trade_no
                     .. "</td>", page.body, 1, true)
      -- each row known here links to its payment's page (a refund's: the
      -- payment it returns), where the operator can ask WeChat now
      local function row_of(no)
        return page.body:match("<tr>[^\n]-<td>" .. no:gsub("%p", "%%%0")
                               .. "</td>.-</tr>")
      end
      assert.matches('<td><a href="/console/payments/' .. rp.id .. '">'
        .. rp.id .. "</a></td></tr>", row_of(rf.json.out_refund_no), 1, true)
      assert.matches('<td><a href="/console/payments/' .. paid.id .. '">'
        .. paid.id .. "</a></td></tr>", row_of(paid.paid_out_trade_no), 1,
        true)
      -- the list's link names the merchant; another merchant's: no rows
      local listing = get(gw, "/console/reconcile").body
      assert.matches("?date=" .. date .. "&amp;merchant="
                     .. sim.merchant.mchid, listing, 1, true)
      page = get(gw, "/console/reconcile?date=" .. date .. "&merchant="
                 .. sim.merchant.mchid)
      assert.matches("Mismatches of " .. date .. ", merchant "
                     .. sim.merchant.mchid, page.body, 1, true)
      page = get(gw, "/console/reconcile?date=" .. date .. "&merchant=1")
      assert.not_matches("Mismatches of", page.body, 1, true)
      -- a report's cells are a bill's content (outside input): text
      local f = assert(io.open(ev.file, "ab"))
      f:write('amount,"' .. HOSTILE:gsub('"', '""') .. '",x\n')
      f:close()
      assert_escaped(get(gw, "/console/reconcile?date=" .. date).body)
      res = post(gw, "/console/reconcile", { date = "<script>",
                                             csrf = csrf_of(page.body) })
      assert.equal(400, res.status)
      assert.not_matches("<script>", res.body, 1, true)
    end)

    it("show a day's report however many runs were recorded after it, and"
       .. " say when a day has none", function()
      -- a day reconciled (its report on disk), then 30 runs of other days:
      -- the list shows the 30 newest runs, the day's link its rows still
      local file = rcv.dir .. "/old-report.csv"
      write(file, "bill_date,kind,out_trade_no\r\n2001-02-03,amount,"
                  .. "old-row-1\r\n")
      local function entry(date, f)
        assert(audit.append(gw.db, "reconcile:" .. date, {
          what = "reconcile.bill", actor = "reconcile", cause = "daily_bill",
          evidence = { date = date, merchant = sim.merchant.mchid, file = f,
                       counts = { total = f and 1 or 0 } } }))
      end
      entry("2001-02-03", file)
      for d = 1, 30 do entry(("2001-03-%02d"):format(d)) end
      local listing = get(gw, "/console/reconcile").body
      assert.not_matches("date=2001-02-03", listing, 1, true)
      local page = get(gw, "/console/reconcile?date=2001-02-03")
      assert.equal(200, page.status, page.body)
      assert.matches("Mismatches of 2001-02-03, merchant "
                     .. sim.merchant.mchid, page.body, 1, true)
      assert.matches("<td>old-row-1</td>", page.body, 1, true)
      page = get(gw, "/console/reconcile?date=2001-01-01")
      assert.equal(200, page.status, page.body)
      assert.matches("No bill reconciliation of 2001-01-01 is recorded",
                     page.body, 1, true)
      page = get(gw, "/console/reconcile?date=%3Cscript%3E&merchant=%22x")
      assert.matches("No bill reconciliation of &lt;script&gt; for"
                     .. " merchant &quot;x is recorded", page.body, 1, true)
      -- a report longer than the page shows: said, with where the whole
      -- is (it was cut at 500 rows without a word)
      local big, lines = rcv.dir .. "/big-report.csv",
                         { "bill_date,kind,out_trade_no" }
      for i = 1, 501 do
        lines[#lines + 1] = "2001-04-05,amount,big-row-" .. i
      end
      write(big, table.concat(lines, "\r\n") .. "\r\n")
      assert(audit.append(gw.db, "reconcile:2001-04-05", {
        what = "reconcile.bill", actor = "reconcile", cause = "daily_bill",
        evidence = { date = "2001-04-05", merchant = sim.merchant.mchid,
                     file = big, counts = { total = 501 } } }))
      page = get(gw, "/console/reconcile?date=2001-04-05")
      assert.matches("<td>big-row-500</td>", page.body, 1, true)
      assert.not_matches("big-row-501<", page.body, 1, true)
      assert.matches("The first 500 of 501 mismatches; the whole report is "
                     .. big, page.body, 1, true)
      assert.not_matches("The first", get(gw,
        "/console/reconcile?date=2001-02-03").body, 1, true)
      -- a report file this instance cannot read (another instance ran the
      -- day, the disk was replaced): the rows the day's audit entry keeps
      -- are shown, not only "cannot be read here"
      local gone = rcv.dir .. "/gone-report.csv"
      -- (a payment of this gateway's: its row links to its page)
      local known = gw:create{ description = "kept" }
      local att = assert(gw.db:query("SELECT out_trade_no FROM gw_attempts"
        .. " WHERE payment_id = $1", { known.id }))[1].out_trade_no
      assert(audit.append(gw.db, "reconcile:2001-05-06", {
        what = "reconcile.bill", actor = "reconcile", cause = "daily_bill",
        evidence = { date = "2001-05-06", merchant = sim.merchant.mchid,
          file = gone, counts = { total = 4 }, findings_omitted = 1,
          findings = {
            { kind = "state", out_trade_no = att, local_state = "paying",
              local_amount = 1, remote_state = "SUCCESS",
              remote_amount = 1 },
            { kind = "missing_local", out_trade_no = "kept-row-1",
              remote_state = "SUCCESS", remote_amount = 4321 },
            { kind = "amount", out_trade_no = "kept-row-2",
              local_state = "paid", local_amount = 1501,
              remote_state = "SUCCESS", remote_amount = 1500 } } } }))
      page = get(gw, "/console/reconcile?date=2001-05-06")
      assert.equal(200, page.status, page.body)
      assert.matches("Mismatches of 2001-05-06, merchant "
                     .. sim.merchant.mchid, page.body, 1, true)
      assert.matches("<th>remote_amount</th>", page.body, 1, true)
      assert.matches("<td>2001-05-06</td><td>missing_local</td><td>"
        .. "kept-row-1</td><td></td><td></td><td></td><td>SUCCESS</td>"
        .. "<td>4321</td><td></td><td></td></tr>", page.body, 1, true)
      assert.matches("<td>2001-05-06</td><td>amount</td><td>kept-row-2"
        .. "</td><td></td><td>paid</td><td>1501</td><td>SUCCESS</td>"
        .. "<td>1500</td><td></td><td></td></tr>", page.body, 1, true)
      assert.matches("<td>" .. att .. "</td><td></td><td>paying</td><td>1"
        .. "</td><td>SUCCESS</td><td>1</td><td></td><td><a href=\"/console/"
        .. "payments/"
        .. known.id .. "\">" .. known.id .. "</a></td></tr>", page.body, 1,
        true)
      assert.matches("The report " .. gone .. " cannot be read here: these"
        .. " are the 3 of 4 mismatches its audit entry keeps.", page.body,
        1, true)
      -- an entry that keeps no findings (made before they were kept)
      assert(audit.append(gw.db, "reconcile:2001-05-07", {
        what = "reconcile.bill", actor = "reconcile", cause = "daily_bill",
        evidence = { date = "2001-05-07", merchant = sim.merchant.mchid,
                     file = gone, counts = { total = 1 } } }))
      page = get(gw, "/console/reconcile?date=2001-05-07")
      assert.matches("The report " .. gone .. " cannot be read here.",
                     page.body, 1, true)
    end)
  end)
end)

-- On call in a WeChat outage the overview showed the switch (off) and
-- nothing else of WeChat: the open circuit breakers that refused every
-- create were on /admin/upstream only.
describe("gateway console: WeChat's health on the overview", function()
  local sim, gw
  local QUERY = "GET /v3/pay/transactions/out-trade-no/{}"

  setup(function()
    sim = testing.simulator{ time_scale = 100 }
    gw = core.start(sim, { workers = 2, gateway = {
      console = { access = "loopback" }, reconcile = { enabled = false } },
      merchant = { max_attempts = 1, breaker_min_calls = 2,
                   breaker_failure_ratio = 0.5, breaker_open_for = 60 } })
  end)

  teardown(function()
    if gw then gw:stop() end
    testing.stop_all()
  end)

  it("shows the breakers that are not closed, whichever worker draws it",
     function()
    local p = gw:create{}
    local body = get(gw, "/console").body
    assert.matches("<h2>Circuit breakers</h2>", body, 1, true)
    assert.matches('<p class="good">all %d+ closed</p>', body)
    sim:fault{ endpoint = "query", kind = "error", status = 500 }
    testing.wait_until(function()
      gw:call("GET", "/v1/payments/" .. p.id .. "?refresh=1")
      local u = gw.srv:request{ method = "GET", path = "/admin/upstream" }
      local e = u.json.merchants[sim.merchant.mchid][QUERY]
      return e and e.breaker == "open"
    end, 30, "the query breaker open")
    sim:clear_faults()
    -- (new connections: either worker draws the page)
    for _ = 1, 4 do
      body = get(gw, "/console").body
      assert.matches('<p class="bad">1 of %d+ not closed', body)
      local row = assert(body:match("<tr><td>" .. sim.merchant.mchid
        .. "</td>(.-)</tr>"), body)
      assert.matches("<td>" .. QUERY:gsub("%p", "%%%0") .. "</td>", row)
      assert.matches('<span class="bad">open</span>', row, 1, true)
      local wait = tonumber(row:match("<td>([%d.]+) s</td>"))
      assert.is_true(wait ~= nil and wait > 0 and wait <= 60, row)
      -- the switch is shown beside it (off: it is the breaker, not the
      -- switch, that refuses calls)
      assert.matches("Degradation switch</h2>\n<p class=\"good\">off</p>",
                     body, 1, true)
    end
  end)
end)

describe("gateway console login throttling", function()
  local server = require "paygate.testing.server"
  local sim, gw, dir

  setup(function()
    sim = testing.simulator{ time_scale = 100 }
    dir = server.tmpdir()
    write(dir .. "/console.token", TOKEN .. "\n")
    gw = core.start(sim, { gateway = {
      console = { token_file = dir .. "/console.token", login_failures = 3,
                  -- long enough for four requests on a loaded machine
                  login_window = 8 },
      reconcile = { enabled = false } } })
  end)

  teardown(function()
    if gw then gw:stop() end
    testing.stop_all()
    server.rmdir(dir)
  end)

  it("refuses with 429 and Retry-After after N wrong tokens, the right"
     .. " one too, until the window passes; a success is not counted",
     function()
    local f = login_form(gw)
    local function try(token)
      return post(gw, "/console/login", { token = token, csrf = f.csrf },
                  f.cookie)
    end
    for i = 1, 3 do
      local res = try("wrong-token-" .. i)
      assert.equal(403, res.status, res.body)
    end
    local res = try(TOKEN)
    assert.equal(429, res.status, res.body)
    local after = tonumber(res.headers["retry-after"])
    assert.is_true(after ~= nil and after >= 1 and after <= 8,
                   tostring(res.headers["retry-after"]))
    assert.not_matches("pgc_session", res.headers["set-cookie"] or "", 1,
                       true)
    assert_console_headers(res)
    assert.matches("Too many", res.body, 1, true)
    assert.equal(429, try("wrong-token-4").status)
    testing.wait_until(function() return try(TOKEN).status == 303 end, 30,
                       "the login window to pass")
    -- successful logins are not counted: more than the limit, all in
    for _ = 1, 5 do login(gw) end
    local logs = gw.srv:logs()
    assert.matches("console login throttled", logs, 1, true)
    assert.not_matches(TOKEN, logs, 1, true)
  end)
end)

describe("gateway console config", function()
  local server = require "paygate.testing.server"
  package.path = "examples/gateway/?.lua;" .. package.path
  local config = require "gw.config"
  local sim, dir

  setup(function()
    sim = testing.simulator()
    dir = server.tmpdir()
  end)

  teardown(function()
    server.rmdir(dir)
    testing.stop_all()
  end)

  local function conf(console, over)
    local fake = { dir = dir, url = function(_, p)
      return "http://127.0.0.1:9" .. p end }
    local g = { db = "sqlite:" .. dir .. "/c.db", console = console }
    for k, v in pairs(over or {}) do g[k] = v end
    return core.config(sim, fake, g)
  end

  it("is off without the section; loopback by default without a token",
     function()
    local cfg = assert(config.check(conf(nil)))
    assert.is_false(cfg.gateway.console)
    cfg = assert(config.check(conf({})))
    assert.same({ access = "loopback", session_ttl = 3600,
                  login_failures = 10, login_window = 300 },
                cfg.gateway.console)
  end)

  it("takes the token from a file, or the admin token", function()
    write(dir .. "/t", TOKEN .. "\n")
    local cfg = assert(config.check(conf({ token_file = dir .. "/t" })))
    assert.equal("token", cfg.gateway.console.access)
    assert.equal(TOKEN, cfg.gateway.console.token)
    cfg = assert(config.check(conf({ session_ttl = 60 },
                                   { admin_token_file = dir .. "/t" })))
    assert.equal(TOKEN, cfg.gateway.console.token)
    assert.equal(60, cfg.gateway.console.session_ttl)
    cfg = assert(config.check(conf({ login_failures = 5, login_window = 60 },
                                   { admin_token_file = dir .. "/t" })))
    assert.equal(5, cfg.gateway.console.login_failures)
    assert.equal(60, cfg.gateway.console.login_window)
  end)

  it("refuses bad sections with one line naming the key, no secret",
     function()
    write(dir .. "/short", "short\n")
    local ffi = require "ffi"
    pcall(ffi.cdef, "int setenv(const char *, const char *, int);")
    ffi.C.setenv("GW_SPEC_SHORT_TOKEN", "short", 1)
    for _, case in ipairs({
      { { token_env = "GW_SPEC_SHORT_TOKEN" }, "config.gateway.console"
        .. ".token_env: the token must be at least 16" },
      { "x", "config.gateway.console: must be a table" },
      { { acess = "token" }, "config.gateway.console.acess: unknown key" },
      { { token = "s3cr3t-s3cr3t-s3cr3t" },
        "config.gateway.console.token: the token may not be written" },
      { { access = "token" }, "config.gateway.console.access: \"token\""
        .. " needs token_file" },
      { { access = "open" }, "config.gateway.console.access: must be" },
      { { token_file = dir .. "/short" }, "config.gateway.console.token_file:"
        .. " the token must be at least 16" },
      { { token_env = "GW_SPEC_NO_SUCH_VAR" }, "config.gateway.console"
        .. ".token_env: the environment variable GW_SPEC_NO_SUCH_VAR" },
      { { session_ttl = 0 }, "config.gateway.console.session_ttl: must be" },
      { { login_failures = 0 }, "config.gateway.console.login_failures:"
        .. " must be a whole number, 1 .. 1000" },
      { { login_failures = 2.5 }, "config.gateway.console.login_failures:" },
      { { login_failures = "5" }, "config.gateway.console.login_failures:" },
      { { login_window = 0 }, "config.gateway.console.login_window: must be"
        .. " whole seconds, 1 .. 86400" },
      { { login_window = 86401 }, "config.gateway.console.login_window:" },
    }) do
      local cfg, why = config.check(conf(case[1]))
      assert.is_nil(cfg)
      assert.equal(1, why:find(case[2], 1, true), why)
      assert.falsy(why:find("s3cr3t", 1, true))
    end
  end)

  -- The admin token guards /admin/* for every caller, on any address the
  -- gateway listens on; it was taken at any length ("admin", a file with
  -- one character), though the same token is refused under 16 characters
  -- once the console uses it, and its guesses are only throttled per
  -- address.
  it("refuses an admin token under 16 characters, console or not",
     function()
    write(dir .. "/short", "admin-12345\n")
    local ffi = require "ffi"
    pcall(ffi.cdef, "int setenv(const char *, const char *, int);")
    ffi.C.setenv("GW_SPEC_SHORT_ADMIN", "admin-12345", 1)
    for _, case in ipairs({
      { nil, { admin_token_file = dir .. "/short" },
        "config.gateway.admin_token_file: the token must be at least 16" },
      { { access = "loopback" }, { admin_token_env = "GW_SPEC_SHORT_ADMIN" },
        "config.gateway.admin_token_env: the token must be at least 16" },
    }) do
      local cfg, why = config.check(conf(case[1], case[2]))
      assert.is_nil(cfg)
      assert.equal(1, why:find(case[3], 1, true), why)
      assert.falsy(why:find("admin-12345", 1, true))
    end
    write(dir .. "/long", "admin-0123456789\n")
    assert(config.check(conf(nil, { admin_token_file = dir .. "/long" })))
  end)

  it("a bad section stops the gateway: exit 2, one line", function()
    local code, out = core.run_config(dir, conf({ access = "open" }))
    assert.equal(2, code, out)
    local lines = core.config_lines(out)
    assert.same({ "gateway: config.gateway.console.access: must be"
                  .. " \"token\" or \"loopback\"" }, lines)
  end)
end)

describe("gateway console on PostgreSQL", function()
  local servers = require "spec.support.servers"
  if not servers.have_postgres() then
    pending("PostgreSQL is not installed")
    return
  end
  local sim, gw, pg

  setup(function()
    pg = servers.postgres()
    sim = testing.simulator{ time_scale = 100 }
    gw = core.start(sim, { db = function() return pg.url end,
      gateway = { console = { access = "loopback" },
                  reconcile = { enabled = false } } })
  end)

  teardown(function()
    if gw then gw:stop() end
    testing.stop_all()
    servers.stop_all()
  end)

  it("shows every page, pages by keyset, searches and pulls a lever",
     function()
    local ids = {}
    for i = 1, 52 do
      ids[i] = gw:create{ description = i == 1 and HOSTILE or "pg" }
    end
    local body = get(gw, "/console").body
    assert.matches('href="/console/payments%?state=paying&amp;since=%d+">'
                   .. 'paying</a></td>'
                   .. "<td>52</td>", body)
    local seen, path, n, shown = {}, "/console/payments", 0, 0
    while path do
      local res = get(gw, path)
      assert.equal(200, res.status, res.body)
      assert.not_matches("<script>", res.body, 1, true)
      if res.body:find("&lt;script&gt;alert(1)", 1, true) then
        shown = shown + 1
      end
      for id in res.body:gmatch('<a href="/console/payments/(pay_%w+)">') do
        assert.is_nil(seen[id])
        seen[id] = true
        n = n + 1
      end
      path = res.body:match('<a href="(/console/payments%?after=[^"]+)">')
    end
    assert.equal(52, n)
    assert.equal(1, shown)
    local p = ids[1]
    local res = get(gw, "/console/payments?q=" .. p.out_trade_no)
    assert.matches(p.id, res.body, 1, true)
    -- its notification, found by its business key (COLLATE "C" range)
    sim:pay_and_wait(p.out_trade_no)
    gw:wait_state(p.id, "paid")
    res = get(gw, "/console/payments/" .. p.id)
    assert.equal(200, res.status)
    assert_escaped(res.body)
    assert.matches("hash chain verified", res.body, 1, true)
    assert.matches("<td>pay|" .. sim.merchant.mchid .. "|" .. p.out_trade_no
      .. "|SUCCESS</td>", res.body:match("<h2>Notifications received"
      .. " %(verified%)</h2>(.-)</section>"), 1, true)
    assert.equal(200, get(gw, "/console/outbox").status)
    assert.equal(200, get(gw, "/console/reconcile").status)
    res = post(gw, "/console/degrade", { on = "1",
                                         csrf = csrf_of(body) })
    assert.equal(303, res.status, res.body)
    assert.is_true(gw.srv:request("/admin/degrade").json.on)
    local e = console_entries(gw)
    assert.equal("console.degrade", e[#e].what)
  end)

  it("answers a hostile query or path 400, not the store's 503", function()
    assert_hostile_refused(gw)
  end)
end)

describe("gateway console certificate days", function()
  package.path = "examples/gateway/?.lua;" .. package.path
  local pages = require "gw.console.pages"

  it("counts whole days left, and says when a certificate expired", function()
    assert.matches(">45 days<", pages.days_cell(45.9), 1, true)
    assert.matches('"bad">1 day<', pages.days_cell(1.2), 1, true)
    assert.matches('"bad">0 days<', pages.days_cell(0.4), 1, true)
    assert.matches(">expired today<", pages.days_cell(-0.1), 1, true)
    assert.matches(">expired 1 day ago<", pages.days_cell(-1.5), 1, true)
    assert.matches(">expired 3 days ago<", pages.days_cell(-3.01), 1, true)
  end)
end)

describe("gateway console: the bill reconciliation's folder", function()
  package.path = "examples/gateway/?.lua;" .. package.path
  local pages = require "gw.console.pages"
  local server = require "paygate.testing.server"
  local dir

  before_each(function() dir = server.tmpdir() end)
  after_each(function() server.rmdir(dir) end)

  local function run(bill_dir, db)
    pages.init{ gateway = { reconcile = { bill_dir = bill_dir }, db = db },
                merchants = {} }
    return pages.run_bill("2026-11-29")
  end

  it("is beside an SQLite store when not named, whichever way the URL is"
     .. " written; with PostgreSQL it must be named", function()
    for i, url in ipairs{ "sqlite:" .. dir .. "/a/gw.db",
                          "sqlite3:" .. dir .. "/b/gw.db",
                          "sqlite:" .. dir .. "/c/gw.db?inline_reads=0" } do
      local sub = dir .. "/" .. ("abc"):sub(i, i)
      assert.same({ total = 0, failed = 0, not_ready = 0, merchants = {} },
                  run(nil, url), url)
      local f = assert(io.open(sub .. "/reconcile/.", "rb"), url)
      f:close()
    end
    local none, err = run(nil, "postgres://127.0.0.1:1/gw")
    assert.is_nil(none)
    assert.equal("set gateway.reconcile.bill_dir to run it from here", err)
  end)

  it("is made without a shell, whatever its name", function()
    local name = dir .. "/it's $(touch " .. dir .. "/ran) `x`; -a/b"
    assert.same({ total = 0, failed = 0, not_ready = 0, merchants = {} },
                run(name))
    local f = assert(io.open(name .. "/.", "rb"))
    f:close()
    assert.is_nil(io.open(dir .. "/ran", "rb"))
  end)

  it("that cannot be made fails the run, saying which and why", function()
    local file = dir .. "/plain"
    write(file, "x")
    local none, err = run(file .. "/reports")
    assert.is_nil(none)
    assert.equal("cannot create the folder " .. file .. "/reports: Not a"
                 .. " directory", err)
    none, err = run(file .. "/reports/deeper")
    assert.is_nil(none)
    assert.equal("cannot create the folder " .. file .. "/reports/deeper:"
                 .. " Not a directory (making " .. file .. "/reports)", err)
  end)
end)

describe("gateway console: the bill reconciliation of two merchants",
         function()
  local sim, gw

  setup(function()
    sim = testing.simulator{ time_scale = 100, merchants = 2 }
    local db_url
    local srv = testing.start_app{ app = "examples/gateway",
      args = { "--log-level", "info" }, config = function(s)
        local c = core.config(sim, s, { console = { access = "loopback" },
                                        reconcile = { enabled = false } })
        local m2 = sim.merchants[2]
        local key = s.dir .. "/apiv3-2.key"
        write(key, m2.apiv3_key .. "\n")
        local mc = sim:client_config(m2, { apiv3_key = false })
        mc.apiv3_key_file = key
        c.merchants[2] = mc
        db_url = c.gateway.db
        return c
      end }
    gw = core.gateway(srv, db_url)
  end)

  teardown(function() testing.stop_all() end)

  -- the reconcile page's row of a run of date for merchant m whose cells
  -- hold text, or nil
  local function run_row(listing, date, m, text)
    for tr in listing:gmatch("<tr>(.-)</tr>") do
      if tr:find(">" .. date .. "</a></td><td>" .. m .. "</td>", 1, true)
         and tr:find(text, 1, true) then
        return tr
      end
    end
  end

  -- runs the console's reconciliation of date; returns the page's flash
  local function reconcile_flash(date)
    local page = get(gw, "/console/reconcile")
    local res = post(gw, "/console/reconcile", { date = date,
                                                 csrf = csrf_of(page.body) })
    assert.equal(303, res.status, res.body)
    local back = get(gw, res.headers["location"]).body
    return assert(back:match('<p class="flash">(.-)</p>'), back)
  end

  it("says a bill WeChat is still making (STATEMENT_CREATING) is not ready"
     .. " yet, with when to try again, not that the run failed", function()
    -- today's bill, not closed: WeChat answers STATEMENT_CREATING
    local date = os.date("!%Y-%m-%d", os.time() + 8 * 3600)
    local tomorrow = os.date("!%Y-%m-%d", os.time() + 8 * 3600 + 86400)
    local flash = reconcile_flash(date)
    assert.not_matches("failed", flash, 1, true)
    assert.matches("reconciliation of " .. date .. ": the bill is not ready"
                   .. " yet for 2 of 2 merchants", flash, 1, true)
    local a = sim.merchants[1].mchid
    assert.matches("merchant " .. a .. ": not ready yet: WeChat is still"
      .. " making the bill of " .. date .. " (STATEMENT_CREATING): try"
      .. " again after 10:00 Beijing on " .. tomorrow .. "; the daily bill"
      .. " job is off here", flash, 1, true)
    -- the console's entry says the same, as no failure
    local e = console_entries(gw)
    local ev = json.decode(e[#e].evidence)
    assert.equal("console.reconcile", e[#e].what)
    assert.is_true(ev.merchants[1].not_ready)
    assert.is_nil(ev.merchants[1].error)
    assert.matches("STATEMENT_CREATING", ev.merchants[1].advice, 1, true)
    -- and nothing was reported for the day
    for _, r in ipairs(assert(audit.entries(gw.db, "reconcile:" .. date))) do
      assert.not_equal("reconcile.bill", r.what)
    end
    -- the page's list of runs has these runs, not ready yet, by the
    -- console
    local listing = get(gw, "/console/reconcile").body
    for _, m in ipairs(sim.merchants) do
      assert.truthy(run_row(listing, date, m.mchid, "<td>not ready yet"
        .. " (STATEMENT_CREATING)</td><td>console</td>"), listing)
    end
  end)

  it("says a day's bill was empty (NO_STATEMENT_EXIST: no trade that day)",
     function()
    -- ten days ago: its bills made long ago, no trade in them
    local date = os.date("!%Y-%m-%d", os.time() + 8 * 3600 - 10 * 86400)
    local flash = reconcile_flash(date)
    for _, m in ipairs(sim.merchants) do
      assert.matches("merchant " .. m.mchid .. ": 0 mismatches (an empty"
        .. " bill: WeChat has no trade that day, NO_STATEMENT_EXIST; 0 local"
        .. " rows compared)", flash, 1, true)
    end
  end)

  it("runs every merchant when one's run fails, and says each one's outcome",
     function()
    local date = os.date("!%Y-%m-%d", os.time() + 8 * 3600)
    sim:close_bills(date)
    -- the first merchant's bill download is refused (once): its run fails
    sim:fault{ endpoint = "tradebill", kind = "error", status = 400,
               count = 1 }
    local page = get(gw, "/console/reconcile")
    local res = post(gw, "/console/reconcile", { date = date,
                                                 csrf = csrf_of(page.body) })
    sim:clear_faults()
    assert.equal(303, res.status, res.body)
    local a, b = sim.merchants[1].mchid, sim.merchants[2].mchid
    -- the second merchant was run: its reconcile:<date> entry and report
    local found
    for _, e in ipairs(assert(audit.entries(gw.db, "reconcile:" .. date))) do
      local ev = json.decode(e.evidence)
      assert.not_equal(a, ev.merchant)
      if e.what == "reconcile.bill" and ev.merchant == b then found = ev end
    end
    assert.truthy(found, "the second merchant was not run")
    -- the page says which failed and which ran
    local back = get(gw, res.headers["location"]).body
    local flash = assert(back:match('<p class="flash">(.-)</p>'), back)
    assert.matches("reconciliation of " .. date .. ": 1 of 2 merchants"
                   .. " failed", flash, 1, true)
    assert.matches("merchant " .. a .. ": failed: ", flash, 1, true)
    assert.matches("merchant " .. b .. ": 0 mismatches", flash, 1, true)
    -- and so does the console's entry
    local e = console_entries(gw)
    local ev = json.decode(e[#e].evidence)
    assert.equal("console.reconcile", e[#e].what)
    assert.equal(a, ev.merchants[1].merchant)
    assert.truthy(ev.merchants[1].error)
    assert.equal(b, ev.merchants[2].merchant)
    assert.equal(0, ev.merchants[2].mismatches)
    -- the page's list of runs has the failed run too, with its outcome
    local listing = get(gw, "/console/reconcile").body
    assert.truthy(run_row(listing, date, a, "<td>failed: "), listing)
    assert.truthy(run_row(listing, date, b, "<td>reconciled"), listing)
    -- the overview's last reconciliations have the failed run too (before:
    -- successful runs only, the failure seen nowhere on the home page)
    local home = get(gw, "/console").body
    local box = assert(home:match("<h2>Last reconciliations</h2>(.-)"
                                  .. "</section>"), home)
    assert.truthy(run_row(box, date, a, "<td>failed: "), box)
    assert.truthy(run_row(box, date, b, "<td>reconciled"), box)
  end)
end)

describe("gateway console over TLS", function()
  local sim, srv

  setup(function()
    sim = testing.simulator{ time_scale = 100 }
    local pki = require("support.pki").make(testing.tmpdir())
    -- served over TLS (--tls-cert), its public_url left http:// (a
    -- loopback one is allowed): the request's scheme makes the cookies
    -- Secure, not only an https:// public_url
    srv = testing.start_app{ app = "examples/gateway", scheme = "https",
      ca_file = pki.ca,
      args = { "--tls-cert", pki.server_cert, "--tls-key", pki.server_key },
      config = function(s)
        write(s.dir .. "/console.token", TOKEN .. "\n")
        local c = core.config(sim, s, { reconcile = { enabled = false },
          console = { token_file = s.dir .. "/console.token" } })
        c.gateway.public_url = "http://127.0.0.1:" .. s.port
        return c
      end }
  end)

  teardown(function() testing.stop_all() end)

  it("sets every console cookie Secure", function()
    local g = { srv = srv }
    local f = login_form(g)
    assert.matches("; Secure", f.set_cookie, 1, true)
    local cookie, sc = login(g)
    assert.matches("; Secure", sc, 1, true)
    local page = get(g, "/console", cookie)
    assert.equal(200, page.status, page.body)
    local res = post(g, "/console/logout", { csrf = csrf_of(page.body) },
                     cookie)
    assert.equal(303, res.status, res.body)
    assert.matches("; Secure", res.headers["set-cookie"], 1, true)
  end)
end)
