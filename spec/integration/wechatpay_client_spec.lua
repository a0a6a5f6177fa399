-- The WeChat Pay client against spec/support/wxserver over real HTTP on
-- loopback: request signing as the server checks it, response
-- verification, certificates (download, unknown serial, rotation,
-- public-key and migration modes, state_dir), errors and retries.
local core = require "paygate.core"
local crypto = require "paygate.crypto"
local json = require "cjson.safe"
local wechatpay = require "paygate.wechatpay"
local server = require "support.server"
local proc = require "support.proc"
local wxtest = require "support.wxtest"

local P1, P2, PUB_ID = wxtest.P1, wxtest.P2, wxtest.PUB_ID

local dir, keys, srv

local function count(method, target)
  return wxtest.count(srv, method, target)
end

local function client(over) return wxtest.client(srv, keys, over) end

setup(function() dir, keys, srv = wxtest.serve() end)

teardown(function() wxtest.stop(srv, dir) end)

before_each(function() wxtest.fresh(srv, P1) end)

describe("wx:request signing", function()
  it("sends a header the server verifies with the merchant's public key",
     function()
    local wx = client()
    local body = '{"b": 1,  "a":"x"}'                  -- odd spacing kept
    local res = assert(wx:request("POST", "/v3/echo?q=1%202", body))
    assert.equal(200, res.status)
    assert.equal(body, res.json.body)
    local reqs = wxtest.requests(srv)
    local r = reqs[#reqs]
    assert.equal("ok", r.auth)
    assert.equal("/v3/echo?q=1%202", r.target)
    assert.equal(body, r.body)
    -- and independently here: the signature over the five lines
    local auth = r.headers.authorization
    local ts = auth:match('timestamp="(%d+)"')
    local nonce = auth:match('nonce_str="(%w+)"')
    local sig = auth:match('signature="([^"]+)"')
    local pub = crypto.public_key(io.open(keys.merchant_pub):read("*a"))
    assert(crypto.verify_base64(pub, "POST\n/v3/echo?q=1%202\n" .. ts .. "\n"
                                .. nonce .. "\n" .. body .. "\n", sig))
    assert.equal("application/json", r.headers.accept)
    assert.matches("^paygate/", r.headers["user-agent"])
    assert.equal("application/json", r.headers["content-type"])
    assert.matches('mchid="' .. wxtest.MCHID .. '"', auth)
    wx:stop()
  end)
  it("signs a table body as the exact bytes it sends", function()
    local wx = client()
    local res = assert(wx:request("POST", "/v3/echo",
                                  { description = "形象店", amount = { total = 1 } }))
    local reqs = wxtest.requests(srv)
    assert.equal("ok", reqs[#reqs].auth)
    assert.same({ description = "形象店", amount = { total = 1 } },
                json.decode(res.json.body))
    wx:stop()
  end)
  it("carries Wechatpay-Serial: the public key id in public-key mode",
     function()
    local wx = client{ public_key = keys.pub_pem, public_key_id = PUB_ID }
    assert(wx:request("GET", "/v3/echo"))
    local reqs = wxtest.requests(srv)
    assert.equal(PUB_ID, reqs[#reqs].headers["wechatpay-serial"])
    assert.equal(0, count("GET", "/v3/certificates"))   -- no download at all
    wx:stop()
  end)
end)

describe("response verification", function()
  local wx
  before_each(function() wx = client() end)
  after_each(function() wx:stop() end)

  it("a response signed with the wrong key is bad_signature (GET)",
     function()
    wxtest.queue(srv, "GET", "/v3/x", { { body = "{}",
      sign = { serial = P1, signature = crypto.sign_base64(
        crypto.private_key(io.open(keys.p2_key):read("*a")), "1\n2\n{}\n") } } })
    local _, err = wx:request("GET", "/v3/x")
    assert.equal("bad_signature", err.kind)
  end)
  it("a POST whose 2xx does not verify is unverified_response", function()
    wxtest.queue(srv, "POST", "/v3/x", { { body = '{"a":1}',
      sign = { body = '{"a":2}' } } })
    local _, err = wx:request("POST", "/v3/x", "{}")
    assert.equal("unverified_response", err.kind)
    assert.equal("bad_signature", err.cause_kind)
    assert.equal(200, err.status)
    assert.equal(1, count("POST", "/v3/x"))             -- never repeated
  end)
  it("a tampered or re-encoded body is bad_signature", function()
    wxtest.queue(srv, "GET", "/v3/x", {
      { body = '{"a": 1}', sign = { body = '{"a":1}' } },
      { body = '{"a":"\\u0041"}', sign = { body = '{"a":"A"}' } } })
    for _ = 1, 2 do
      local _, err = wx:request("GET", "/v3/x")
      assert.equal("bad_signature", err.kind)
    end
  end)
  -- (the exact 299/300 s edge is in spec/unit/wechatpay_sign_spec.lua,
  -- with a fixed clock; here a second may tick between the two ends).
  -- The server stamps whole seconds (os.time() + offset), the client
  -- judges by its fractional clock a little later: a stamp 301 s ahead
  -- made at x.99 s and read at x+1.01 s is only 299.99 s ahead. 302 s
  -- ahead stays stale for any answer read within a second.
  it("297 s of skew verifies; 301 s behind, 302 s ahead is stale_timestamp",
     function()
    wxtest.queue(srv, "GET", "/v3/x", { { body = "{}", sign = { ts_offset = -297 } },
      { body = "{}", sign = { ts_offset = 297 } },
      { body = "{}", sign = { ts_offset = -301 } },
      { body = "{}", sign = { ts_offset = 302 } } })
    assert(wx:request("GET", "/v3/x"))
    assert(wx:request("GET", "/v3/x"))
    local _, err = wx:request("GET", "/v3/x")
    assert.equal("stale_timestamp", err.kind)
    _, err = wx:request("GET", "/v3/x")
    assert.equal("stale_timestamp", err.kind)
  end)
  it("a signed 204 with an empty body verifies", function()
    wxtest.queue(srv, "POST", "/v3/close", { { status = 204, body = "" } })
    local res = assert(wx:request("POST", "/v3/close", "{}"))
    assert.equal(204, res.status)
    assert.is_nil(res.json)
  end)
  it("an unsigned 2xx is malformed (and unverified_response for a POST)",
     function()
    wxtest.queue(srv, "GET", "/v3/x", { { body = "{}", sign = false } })
    wxtest.queue(srv, "POST", "/v3/x", { { body = "{}", sign = false } })
    local _, err = wx:request("GET", "/v3/x")
    assert.equal("malformed", err.kind)
    _, err = wx:request("POST", "/v3/x", "{}")
    assert.equal("unverified_response", err.kind)
  end)
  it("unsigned = true skips the check (raw file downloads)", function()
    wxtest.queue(srv, "GET", "/v3/billdownload/file", { { body = "a,b\n",
                                                           sign = false } })
    local res = assert(wx:request("GET", "/v3/billdownload/file?token=t", nil,
                                  { unsigned = true }))
    assert.equal("a,b\n", res.body)
  end)
  it("a sink gets a 2xx body in chunks; an error body is not its",
     function()
    wxtest.queue(srv, "GET", "/v3/billdownload/file", {
      { body = string.rep("x", 300000), sign = false },
      { status = 400, body = json.encode{ code = "PARAM_ERROR", message = "m" } } })
    local got = {}
    local function sink(c) got[#got + 1] = c end
    local res = assert(wx:request("GET", "/v3/billdownload/file?token=t", nil,
                                  { unsigned = true, sink = sink }))
    assert.is_nil(res.body)
    assert.equal(300000, #table.concat(got))
    assert.is_true(#got > 1)
    got = {}
    local _, err = wx:request("GET", "/v3/billdownload/file?token=t", nil,
                              { unsigned = true, sink = sink })
    assert.equal("param_error", err.kind)
    assert.equal(0, #got)
    assert.has_error(function()
      wx:request("GET", "/v3/x", nil, { sink = sink })
    end)
  end)
  it("a SIGNTEST probe is bad_signature", function()
    wxtest.queue(srv, "GET", "/v3/x", { { body = "{}", sign = {
      signature = "WECHATPAY/SIGNTEST/" .. crypto.random_nonce(300) } } })
    local _, err = wx:request("GET", "/v3/x")
    assert.equal("bad_signature", err.kind)
  end)
end)

describe("platform certificates", function()
  it("an unknown serial triggers one download, then verifies", function()
    local wx = client()
    assert.equal(1, count("GET", "/v3/certificates"))
    wxtest.certs(srv, { serials = { P1, P2 } })          -- P2 rotated in
    wxtest.queue(srv, "GET", "/v3/x", { { body = "{}", sign = { serial = P2 } } })
    assert(wx:request("GET", "/v3/x"))
    assert.equal(2, count("GET", "/v3/certificates"))
    -- old and new both verify during the overlap
    wxtest.queue(srv, "GET", "/v3/x", { { body = "{}", sign = { serial = P1 } },
      { body = "{}", sign = { serial = P2 } } })
    assert(wx:request("GET", "/v3/x"))
    assert(wx:request("GET", "/v3/x"))
    assert.equal(2, count("GET", "/v3/certificates"))
    assert.same({ P1, P2 }, wx:certificate_status().serials)
    wx:stop()
  end)
  it("certificate mode: calls name the newest certificate, the download "
     .. "none", function()
    local wx = client()
    assert(wx:request("GET", "/v3/echo"))
    for _, r in ipairs(wxtest.requests(srv)) do
      if r.target == "/v3/certificates" then
        assert.is_nil(r.headers["wechatpay-serial"])
      else
        assert.equal(P1, r.headers["wechatpay-serial"])
      end
    end
    wx:stop()
  end)
  it("a serial WeChat does not list is unknown_serial after one download",
     function()
    local wx = client()
    wxtest.queue(srv, "GET", "/v3/x", { { body = "{}", sign = { serial = P2 } },
      { body = "{}", sign = { serial = P2 } } })
    local _, err = wx:request("GET", "/v3/x")
    assert.equal("unknown_serial", err.kind)
    assert.equal(2, count("GET", "/v3/certificates"))
    -- a download ran, and brought no key for it
    assert.matches("no key for Wechatpay-Serial " .. P2 .. " even after "
                   .. "downloading the platform certificates", err.message,
                   1, true)
    -- rate-limited: the next unknown serial does not download again
    _, err = wx:request("GET", "/v3/x")
    assert.equal("unknown_serial", err.kind)
    assert.equal(2, count("GET", "/v3/certificates"))
    -- and says so, with when the next may run (was: "even after
    -- downloading the platform certificates (certificates were downloaded
    -- less than 60 s ago ...)", of a download that did not run)
    assert.not_matches("even after downloading", err.message, 1, true)
    local ago, next_in = err.message:match("no key for Wechatpay%-Serial "
      .. P2 .. ": the platform certificates were not downloaded again: the"
      .. " last download for an unknown serial was (%d+) s ago, the next is"
      .. " allowed in (%d+) s %(download_min_interval 60 s%)")
    assert.truthy(ago, err.message)
    ago, next_in = tonumber(ago), tonumber(next_in)
    assert.is_true(ago < 30 and next_in > 30 and next_in <= 60
                   and math.abs(ago + next_in - 60) <= 1, err.message)
    -- a notification's says that WeChat tries it again (the key may be
    -- there by then); a response's does not (nothing retries it)
    assert.not_matches("WeChat retries", err.message, 1, true)
    local ts = tostring(os.time())
    local _, nerr = wx:parse_notification({ headers = {
      ["Wechatpay-Timestamp"] = ts, ["Wechatpay-Nonce"] = "n1",
      ["Wechatpay-Serial"] = P2, ["Wechatpay-Signature"] = "AAAA" },
      body = '{"id":"EV-1"}' }, { replay = false })
    assert.equal("unknown_serial", nerr.kind)
    assert.matches("not downloaded again: the last download for an unknown"
                   .. " serial was %d+ s ago, the next is allowed in %d+ s"
                   .. " %(download_min_interval 60 s%); WeChat retries the"
                   .. " notification$", nerr.message)
    assert.equal(2, count("GET", "/v3/certificates"))
    wx:stop()
  end)
  it("an unknown serial's download takes the lock before the rate mark "
     .. "(another worker that sees the mark then waits for the download, "
     .. "never takes the old set as its result)", function()
    local wx = client()
    local real, adds = wx.dict, {}
    wx.dict = setmetatable({ add = function(_, k, ...)
      adds[#adds + 1] = k:match("[^:]+$")
      return real:add(k, ...)
    end }, { __index = function(_, k)
      local v = real[k]
      if type(v) == "function" then
        return function(_, ...) return v(real, ...) end
      end
      return v
    end })
    wxtest.queue(srv, "GET", "/v3/x", { { body = "{}", sign = { serial = P2 } },
      { body = "{}", sign = { serial = P2 } } })
    local _, err = wx:request("GET", "/v3/x")
    assert.equal("unknown_serial", err.kind)
    local lock, rate
    for i, k in ipairs(adds) do
      if k == "lock" and not lock then lock = i end
      if k == "rate" and not rate then rate = i end
    end
    assert.is_number(lock, table.concat(adds, " "))
    assert.is_number(rate, table.concat(adds, " "))
    assert.is_true(lock < rate, table.concat(adds, " "))
    wx.dict = real
    wx:stop()
  end)
  it("100 concurrent unknown serials cause one download", function()
    local wx = client()
    wxtest.certs(srv, { serials = { P1, P2 } })
    local responses = {}
    for i = 1, 100 do responses[i] = { body = "{}", sign = { serial = P2 } } end
    wxtest.queue(srv, "GET", "/v3/x", responses)
    local tasks, results = {}, {}
    for i = 1, 100 do
      tasks[i] = core.spawn(function()
        local res, err = wx:request("GET", "/v3/x")
        results[i] = res and "ok" or err.kind
      end)
    end
    for i = 1, 100 do tasks[i]:wait() end
    for i = 1, 100 do assert.equal("ok", results[i]) end
    assert.equal(2, count("GET", "/v3/certificates"))
    wx:stop()
  end)
  it("unknown serials on two workers at once cause one download", function()
    local app = server.start{ app = "spec/support/wxnotify", workers = 2,
      config = ("return { wechatpay = { mchid = %q, merchant_private_key = %q,"
        .. " merchant_serial = %q, apiv3_key = %q, base_url = %q } }")
        :format(wxtest.MCHID, keys.merchant_key, wxtest.MERCHANT_SERIAL,
                wxtest.APIV3, srv.base_url) }
    local ok, e = pcall(function()
      -- both workers up, their start-up downloads done
      local up, nup = {}, 0
      proc.wait_until(function()
        local res = assert(app:request{ path = "/call?path=/v3/echo",
                                        headers = { Connection = "close" } })
        assert.equal(200, res.status)
        local pid = res.headers["x-pid"]
        if not up[pid] then up[pid], nup = true, nup + 1 end
        return nup == 2
      end, 30, "both workers to serve")
      local before = count("GET", "/v3/certificates")
      assert.equal(1, before)           -- one start-up download for both
      wxtest.certs(srv, { serials = { P1, P2 } })
      -- concurrent batches over new connections until both workers have
      -- answered (the kernel spreads connections, not evenly)
      local pids, n = {}, 0
      proc.wait_until(function()
        local responses = {}
        for i = 1, 20 do responses[i] = { body = "{}", sign = { serial = P2 } } end
        wxtest.queue(srv, "GET", "/v3/x", responses)
        local tasks, statuses = {}, {}
        for i = 1, 20 do
          tasks[i] = core.spawn(function()
            local res = assert(app:request{ path = "/call?path=/v3/x",
              headers = { Connection = "close" } })
            statuses[i] = res.status == 200 and "ok" or res.body
            local pid = res.headers["x-pid"]
            if not pids[pid] then pids[pid], n = true, n + 1 end
          end)
        end
        for i = 1, 20 do tasks[i]:wait() end
        for i = 1, 20 do assert.equal("ok", statuses[i]) end
        return n == 2
      end, 30, "both workers to answer")
      assert.equal(before + 1, count("GET", "/v3/certificates"))
    end)
    app:stop()
    assert(ok, e)
  end)
  it("a caller abandoned during a download does not stall the next",
     function()
    local wx = client()
    wxtest.certs(srv, { serials = { P1, P2 }, delay = 0.5 })
    local t = core.spawn(function() wx:refresh_certificates() end)
    core.sleep(0.1)
    t:cancel()
    local t0 = core.mono()
    assert(wx:refresh_certificates())
    assert.is_true(core.mono() - t0 < 3)
    assert.same({ P1, P2 }, wx:certificate_status().serials)
    wx:stop()
  end)
  it("a PUB_KEY_ID_ serial with a certificate-only config is unknown_serial"
     .. " without a download", function()
    local wx = client()
    wxtest.queue(srv, "GET", "/v3/x", { { body = "{}", sign = { serial = PUB_ID } } })
    local _, err = wx:request("GET", "/v3/x")
    assert.equal("unknown_serial", err.kind)
    assert.matches("public_key", err.message)
    assert.equal(1, count("GET", "/v3/certificates"))
    wx:stop()
  end)
  it("a certificate serial with a public-key-only config is unknown_serial",
     function()
    local wx = client{ public_key = keys.pub_pem, public_key_id = PUB_ID }
    wxtest.queue(srv, "GET", "/v3/x", { { body = "{}", sign = { serial = P1 } } })
    local _, err = wx:request("GET", "/v3/x")
    assert.equal("unknown_serial", err.kind)
    assert.equal(0, count("GET", "/v3/certificates"))
    -- the public key verifies (WeChat signs with the key the request named)
    assert(wx:request("GET", "/v3/y"))
    wx:stop()
  end)
  it("a public_key_id that is not the key's: the message names the id"
     .. " WeChat gives the configured key", function()
    -- was: "no key for Wechatpay-Serial X: not the configured
    -- public_key_id Y", which left open whether the key or the id was
    -- wrong (doctor's fix then blamed the key)
    local other = "PUB_KEY_ID_0114232134912410000000000000000002"
    local wx = client{ public_key = keys.pub_pem, public_key_id = other }
    wxtest.queue(srv, "GET", "/v3/x", { { body = "{}", sign = { serial = PUB_ID } } })
    local _, err = wx:request("GET", "/v3/x")
    wx:stop()
    assert.equal("unknown_serial", err.kind)
    assert.equal(PUB_ID, err.wechat_public_key_id)
    assert.matches("not the configured public_key_id " .. other, err.message,
                   1, true)
    assert.matches("verifies with the configured public_key", err.message,
                   1, true)
    assert.matches("set public_key_id to " .. PUB_ID, err.message, 1, true)
    -- a key that does not verify it either: no id offered
    wx = client{ public_key = keys.merchant_pub, public_key_id = other }
    wxtest.queue(srv, "GET", "/v3/x", { { body = "{}", sign = { serial = PUB_ID } } })
    _, err = wx:request("GET", "/v3/x")
    wx:stop()
    assert.equal("unknown_serial", err.kind)
    assert.is_nil(err.wechat_public_key_id)
    assert.matches("not the configured public_key_id " .. other, err.message,
                   1, true)
    assert.is_nil(err.message:find("set public_key_id", 1, true))
  end)
  it("a notification under another public key id that the configured key"
     .. " verifies: no id offered (its headers come from whoever POSTs)",
     function()
    -- a WeChat-signed message replayed with a Wechatpay-Serial of the
    -- sender's choosing must not have that id offered as the fix
    local other = "PUB_KEY_ID_0114232134912410000000000000000002"
    local wx = client{ public_key = keys.pub_pem, public_key_id = other }
    local ts, nonce, body = tostring(os.time()), "n-pubid", '{"id":"EV-1"}'
    local key = assert(crypto.private_key(assert(io.open(keys.pub_key))
                                          :read("*a")))
    local sig = assert(crypto.sign_base64(key, ts .. "\n" .. nonce .. "\n"
                                          .. body .. "\n"))
    local _, err = wx:parse_notification({ headers = {
      ["Wechatpay-Timestamp"] = ts, ["Wechatpay-Nonce"] = nonce,
      ["Wechatpay-Serial"] = PUB_ID, ["Wechatpay-Signature"] = sig },
      body = body }, { replay = false })
    wx:stop()
    assert.equal("unknown_serial", err.kind)
    assert.is_nil(err.wechat_public_key_id)
    assert.matches("verifies with the configured public_key", err.message,
                   1, true)
    assert.matches("paygate doctor's signed call names the id", err.message,
                   1, true)
    assert.is_nil(err.message:find("set public_key_id to", 1, true))
  end)
  it("migration mode: either serial verifies", function()
    local wx = client{ public_key = keys.pub_pem, public_key_id = PUB_ID,
                       platform_certificates = { keys.p1_cert } }
    wxtest.queue(srv, "GET", "/v3/x", { { body = "{}", sign = { serial = P1 } },
      { body = "{}", sign = { serial = PUB_ID } } })
    assert(wx:request("GET", "/v3/x"))
    assert(wx:request("GET", "/v3/x"))
    wx:stop()
  end)
  it("404 RESOURCE_NOT_EXISTS is a config error naming public_key", function()
    wxtest.certs(srv, { status = 404 })
    local wx, err = wechatpay.client(wxtest.client_conf(srv, keys))
    assert.is_nil(wx)
    assert.equal("invalid_config", err.kind)
    assert.equal("public_key", err.key)
    assert.matches("public_key_id", err.message)
  end)
  it("404 RESOURCE_NOT_EXISTS in migration mode says the certificates are"
     .. " gone, not to configure the public key it has", function()
    -- was: "configure public_key and public_key_id" to a client that
    -- has them (its platform certificates voided after the migration),
    -- logged at every refresh and given for every unknown serial
    local wx = client{ public_key = keys.pub_pem, public_key_id = PUB_ID,
                       platform_certificates = { keys.p1_cert } }
    wxtest.certs(srv, { status = 404 })
    local ok, err = wx:refresh_certificates()
    assert.is_nil(ok)
    assert.equal("invalid_config", err.kind)
    assert.equal("download_certificates", err.key)
    assert.not_matches("configure public_key", err.message, 1, true)
    assert.matches("public-key mode", err.message, 1, true)
    -- the public key still verifies
    assert(wx:request("GET", "/v3/y"))
    wx:stop()
  end)
  it("refresh_certificates in a client that downloads none says why, as "
     .. "invalid_config", function()
    -- was: nil, unknown_serial "certificate download is off" (no serial
    -- was unknown), and public-key mode, where nothing is downloaded by
    -- design, unnamed
    local n = count("GET", "/v3/certificates")
    local wx = client{ public_key = keys.pub_pem, public_key_id = PUB_ID }
    local ok, err = wx:refresh_certificates()
    wx:stop()
    assert.is_nil(ok)
    assert.equal("invalid_config", err.kind)
    assert.equal("download_certificates", err.key)
    assert.equal("wx:refresh_certificates: a public-key mode client "
      .. "downloads no certificates: the WeChat Pay public key verifies "
      .. "WeChat, and it is configured, not downloaded (give "
      .. "download_certificates = true for migration mode)", err.message)
    -- (client's over drops a key set to false)
    local conf = wxtest.client_conf(srv, keys,
                                    { platform_certificates = { keys.p1_cert } })
    conf.download_certificates = false
    wx = assert(require("paygate.wechatpay").client(conf))
    ok, err = wx:refresh_certificates()
    wx:stop()
    assert.is_nil(ok)
    assert.equal("invalid_config", err.kind)
    assert.equal("download_certificates", err.key)
    assert.equal("wx:refresh_certificates: download_certificates is false:"
      .. " the client verifies with the keys configured only (give "
      .. "\"manual\" to download on this call and on an unknown serial)",
      err.message)
    assert.equal(n, count("GET", "/v3/certificates"))   -- nothing sent
  end)
  it("a wrong APIv3 key is decrypt_failed and does not break the start",
     function()
    local wx = client{ apiv3_key = "0123456789abcdef0123456789abcdef" }
    assert.same({}, wx:certificate_status().serials)
    local ok, err = wx:refresh_certificates()
    assert.is_nil(ok)
    assert.equal("decrypt_failed", err.kind)
    wx:stop()
  end)
  -- Another worker of the instance holds the download's lock, and ends
  -- its download 0.2 s later: failed with failure (the mark it leaves),
  -- or a success (failure nil: the mark deleted).
  local function another_worker_downloads(wx, failure)
    local K = wx.certs_prefix
    assert(wx.dict:set(K .. "lock", 999999, 30))
    if not failure then wx.dict:delete(K .. "failed") end
    core.spawn(function()
      core.sleep(0.2)
      if failure then assert(wx.dict:set(K .. "failed", failure, 60)) end
      wx.dict:delete(K .. "lock")
    end)
  end
  it("an unknown serial that waited for another worker's download says"
     .. " that download failed, when it did", function()
    -- Another worker of the instance holds the download's lock; it ends
    -- with the download failed (a wrong APIv3 key). Was: the waiter took
    -- the set as it was and said "even after downloading the platform
    -- certificates", as if a download had brought no key for the serial.
    local wx = client()
    local n = count("GET", "/v3/certificates")
    another_worker_downloads(wx, "decrypt_failed: wrong APIv3 key"
                                 .. " (apiv3_key)")
    wxtest.queue(srv, "GET", "/v3/x", { { body = "{}",
                                          sign = { serial = P2 } } })
    local _, err = wx:request("GET", "/v3/x")
    assert.equal("unknown_serial", err.kind)
    assert.equal(n, count("GET", "/v3/certificates"))    -- none of its own
    assert.not_matches("even after downloading", err.message, 1, true)
    assert.matches(": the platform certificate download failed "
      .. "(decrypt_failed: wrong APIv3 key (apiv3_key) (another worker's"
      .. " download))", err.message, 1, true)
    wx:stop()
  end)
  it("a refresh asked for that waited for another worker's download says"
     .. " that download failed, when it did", function()
    -- was: the set taken as it was and true returned, as if the refresh
    -- had worked
    local wx = client()
    local n = count("GET", "/v3/certificates")
    another_worker_downloads(wx, "decrypt_failed: wrong APIv3 key"
                                 .. " (apiv3_key)")
    local ok, err = wx:refresh_certificates()
    assert.is_nil(ok)
    assert.equal("decrypt_failed", err.kind)
    assert.matches("(another worker's download)", err.message, 1, true)
    assert.equal(n, count("GET", "/v3/certificates"))    -- none of its own
    -- a success of that worker's (the mark deleted): true
    another_worker_downloads(wx, nil)
    assert.is_true(wx:refresh_certificates())
    wx:stop()
  end)
  it("a worker that waited for another's download failed as invalid_config"
     .. " gets the error whole (its key), not rebuilt from text", function()
    -- the downloading worker: a public-key-only merchant's 404 (its
    -- marks are what a waiting worker reads)
    local wx = client()
    wxtest.certs(srv, { status = 404 })
    local ok, err = wx:refresh_certificates()
    assert.is_nil(ok)
    assert.equal("public_key", err.key)
    -- a waiting worker of the same instance (its lock held meanwhile)
    local K = wx.certs_prefix
    assert(wx.dict:set(K .. "lock", 999999, 30))
    core.spawn(function()
      core.sleep(0.2)
      wx.dict:delete(K .. "lock")
    end)
    local ok2, err2 = wx:refresh_certificates()
    assert.is_nil(ok2)
    assert.equal("invalid_config", err2.kind)
    assert.equal("public_key", err2.key)          -- was nil
    assert.equal(false, err2.retryable)
    assert.matches("(another worker's download)", err2.message, 1, true)
    wx:stop()
  end)
  it("an unknown serial refused by the rate limit says why the download "
     .. "that set it failed", function()
    local wx = client{ apiv3_key = "0123456789abcdef0123456789abcdef" }
    wxtest.queue(srv, "GET", "/v3/x", { { body = "{}", sign = { serial = P1 } },
      { body = "{}", sign = { serial = P1 } } })
    local _, err = wx:request("GET", "/v3/x")
    assert.equal("unknown_serial", err.kind)
    assert.matches("decrypt_failed", err.message)
    -- the download ran and failed: said so, not "even after downloading"
    assert.matches(": the platform certificate download failed "
                   .. "(decrypt_failed: ", err.message, 1, true)
    assert.not_matches("even after downloading", err.message, 1, true)
    local n = count("GET", "/v3/certificates")
    -- rate-limited: no download, and the cause is still told (it read
    -- only "downloaded less than 60 s ago", the APIv3 key unnamed)
    _, err = wx:request("GET", "/v3/x")
    assert.equal("unknown_serial", err.kind)
    assert.equal(n, count("GET", "/v3/certificates"))
    assert.matches("download_min_interval", err.message)
    assert.matches("not downloaded again", err.message, 1, true)
    assert.not_matches("even after downloading", err.message, 1, true)
    assert.matches("; that download failed: decrypt_failed", err.message,
                   1, true)
    assert.matches("wrong APIv3 key", err.message)
    wx:stop()
  end)
  it("the previous APIv3 key decrypts the download after a rotation",
     function()
    local wx = client{ apiv3_key = "0123456789abcdef0123456789abcdef",
                       previous_apiv3_keys = { wxtest.APIV3 } }
    assert.same({ P1 }, wx:certificate_status().serials)
    wx:stop()
  end)
  it("downloaded certificates chain-check only against platform_ca",
     function()
    local wx = client{ platform_ca = keys.p1_cert }   -- self-signed: its root
    assert.same({ P1 }, wx:certificate_status().serials)
    wx:stop()
    wx = client{ platform_ca = keys.p2_cert }         -- another CA
    assert.same({}, wx:certificate_status().serials)
    local ok, err = wx:refresh_certificates()
    assert.is_nil(ok)
    assert.equal("bad_response", err.kind)
    assert.matches("platform_ca", err.message)
    wx:stop()
  end)
  it("a download whose response signature fails is refused", function()
    wxtest.certs(srv, { serials = { P1 }, signer = PUB_ID })
    local wx = client()
    local ok, err = wx:refresh_certificates()
    assert.is_nil(ok)
    assert.equal("unknown_serial", err.kind)
    assert.same({}, wx:certificate_status().serials)
    wx:stop()
  end)
  it("boots with WeChat unreachable from state_dir", function()
    local state = dir .. "/state"
    local wx = client{ state_dir = state }
    assert.same({ P1 }, wx:certificate_status().serials)
    wx:stop()
    local f = assert(io.open(state .. "/wechatpay-" .. wxtest.MCHID
                             .. "-platform-certificates.pem"))
    f:close()
    -- WeChat unreachable: a closed port
    local wx2 = assert(wechatpay.client(wxtest.client_conf(nil, keys,
      { state_dir = state, base_url = "http://127.0.0.1:" .. core.free_port() })))
    assert.same({ P1 }, wx2:certificate_status().serials)
    -- it verifies what is signed with P1
    local body = "{}"
    local ts, nonce = tostring(os.time()), crypto.random_nonce(32)
    local key = crypto.private_key(io.open(keys.p1_key):read("*a"))
    assert(wx2:verify_response({ ["wechatpay-timestamp"] = ts,
      ["wechatpay-nonce"] = nonce, ["wechatpay-serial"] = P1,
      ["wechatpay-signature"] = crypto.sign_base64(key, ts .. "\n" .. nonce
                                                   .. "\n" .. body .. "\n") },
      body))
    wx2:stop()
  end)
  it("a state_dir that cannot be written: the warning names the merchant"
     .. " and the config key", function()
    -- was: "cannot save platform certificates" and the OS's reason, with
    -- no mchid and no key, in a log shared by every merchant
    local file = dir .. "/not_a_folder"
    local f = assert(io.open(file, "w")); f:close()
    local paygate = require "paygate"
    local warned, warn = {}, paygate.log.warn
    paygate.log.warn = function(msg, fields)
      if msg:find("cannot save", 1, true) then
        warned[#warned + 1] = { msg = msg, fields = fields }
      end
      return warn(msg, fields)
    end
    local ok, err = pcall(function()
      local wx = client{ state_dir = file .. "/state", key_names = {
        state_dir = "merchants[2].state_dir" } }
      wx:stop()
      -- (a download of its own: the start took the set just downloaded)
      wx = client{ state_dir = file .. "/state" }
      assert(wx:refresh_certificates())
      wx:stop()
    end)
    paygate.log.warn = warn
    assert(ok, err)
    assert.equal(2, #warned)
    assert.matches("merchant " .. wxtest.MCHID .. " in merchants[2].state_dir"
                   .. " (" .. file .. "/state)", warned[1].msg, 1, true)
    assert.equal(wxtest.MCHID, warned[1].fields.mchid)
    assert.is_string(warned[1].fields.why)
    -- the client's own key when its owner names none
    assert.matches("in state_dir (" .. file .. "/state)", warned[2].msg, 1,
                   true)
  end)
  it("public-key mode leaves the certificates kept in state_dir unused",
     function()
    -- the migration's last step: the merchant drops download_certificates
    -- and keeps state_dir. Was: the certificates saved there in
    -- certificate mode were loaded all the same, so this client verified
    -- what a voided certificate signed (a fresh instance, with nothing in
    -- state_dir, refused it: unknown_serial), and it published
    -- paygate_wechatpay_certificate_days_left (and its 30-day warning)
    -- for a certificate it no longer uses
    local state = dir .. "/state_pk"
    local wx = client{ state_dir = state }
    assert.same({ P1 }, wx:certificate_status().serials)
    wx:stop()
    local pk = client{ state_dir = state, public_key = keys.pub_pem,
                       public_key_id = PUB_ID }
    local st = pk:certificate_status()
    assert.equal("public_key", st.mode)
    assert.same({}, st.serials)
    assert.is_nil(st.newest)
    assert.is_nil(st.days_left)
    wxtest.queue(srv, "GET", "/v3/x", { { body = "{}", sign = { serial = P1 } } })
    local _, err = pk:request("GET", "/v3/x")
    assert.equal("unknown_serial", err.kind)
    assert(pk:request("GET", "/v3/y"))           -- the public key verifies
    pk:stop()
    -- the file stays for a client that downloads again (migration mode)
    local mig = client{ state_dir = state, public_key = keys.pub_pem,
                        public_key_id = PUB_ID, download_certificates = "manual" }
    assert.same({ P1 }, mig:certificate_status().serials)
    mig:stop()
  end)
  it("a slow WeChat holds the start for startup_timeout only; the "
     .. "download finishes in the background", function()
    wxtest.certs(srv, { delay = 6 })
    local t0 = core.mono()
    local wx = client{ startup_timeout = 0.3, timeout = 9 }
    local took = core.mono() - t0
    -- startup_timeout (0.3 s), not the 6 s download: room for a loaded
    -- machine, well under the 6 s
    assert.is_true(took >= 0.25 and took < 3.5, "took " .. took)
    assert.same({}, wx:certificate_status().serials)
    local deadline = core.mono() + 20
    while #wx:certificate_status().serials == 0 and core.mono() < deadline do
      core.sleep(0.05)
    end
    assert.same({ P1 }, wx:certificate_status().serials)
    assert.equal(1, count("GET", "/v3/certificates"))  -- the same download
    wx:stop()
  end)
  it("startup_timeout must be a positive number", function()
    local _, err = wechatpay.client(wxtest.client_conf(srv, keys,
                                    { startup_timeout = 0 }))
    assert.equal("startup_timeout", err.key)
  end)
end)

describe("errors and retries", function()
  local wx
  before_each(function() wx = client() end)
  after_each(function() wx:stop() end)

  it("maps WeChat's code, message and detail", function()
    wxtest.queue(srv, "POST", "/v3/x", { { status = 400, body = json.encode{
      code = "PARAM_ERROR", message = "参数错误", detail = { field = "/amount/currency",
      location = "body" } } } })
    local _, err = wx:request("POST", "/v3/x", "{}")
    assert.equal("param_error", err.kind)
    assert.equal("PARAM_ERROR", err.code)
    assert.equal(400, err.status)
    assert.equal("参数错误", err.wechat_message)
    assert.equal("/amount/currency", err.detail.field)
    assert.is_false(err.retryable)
    assert.is_truthy(err.request_id == nil or type(err.request_id) == "string")
    assert.matches("^param_error: POST /v3/x: 400 PARAM_ERROR", tostring(err))
    assert.is_true(core.is_error(err))
  end)
  it("old and new spellings map alike; unknown codes map by status, a 404"
     .. " only by WeChat's two does-not-exist codes",
     function()
    local cases = { { 403, "ORDERPAID", "order_paid" },
      { 400, "ORDER_CLOSED", "order_closed" },
      { 404, "ORDER_NOT_EXIST", "not_found" },
      { 403, "OUT_TRADE_NO_USED", "out_trade_no_used" },
      { 403, "NOTENOUGH", "not_enough" }, { 401, "SIGN_ERROR", "sign_error" },
      { 400, "INVALID_REQUEST", "invalid_request" },
      { 404, "RESOURCE_NOT_EXISTS", "not_found" },
      { 418, nil, "http_error" },
      -- a 404 without WeChat's error shape, or with another code than
      -- its two "does not exist" ones (a proxy's page, a wrong path, the
      -- NOT_FOUND some SDKs expect, an empty or unknown code) is no
      -- "order does not exist": a caller may close the order on that
      { 404, nil, "http_error" }, { 404, "WHATEVER", "http_error" },
      { 404, "NOT_FOUND", "http_error" }, { 404, "", "http_error" } }
    local responses = {}
    for i, c in ipairs(cases) do
      responses[i] = { status = c[1], body = c[2] and json.encode{ code = c[2],
                       message = "m" } or "teapot" }
    end
    wxtest.queue(srv, "POST", "/v3/x", responses)
    for _, c in ipairs(cases) do
      local _, err = wx:request("POST", "/v3/x", "{}")
      assert.equal(c[3], err.kind)
    end
  end)
  it("retries a GET after 500 SYSTEM_ERROR", function()
    wxtest.queue(srv, "GET", "/v3/x", { { status = 500, body = json.encode{
      code = "SYSTEM_ERROR", message = "系统繁忙" } }, { body = "{}" } })
    assert(wx:request("GET", "/v3/x"))
    assert.equal(2, count("GET", "/v3/x"))
  end)
  it("does not retry a plain POST after a 500; does with idempotent",
     function()
    wxtest.queue(srv, "POST", "/v3/x", { { status = 500, body = json.encode{
      code = "SYSTEM_ERROR", message = "m" } }, { status = 500, body = json.encode{
      code = "SYSTEM_ERROR", message = "m" } }, { body = "{}" } })
    local _, err = wx:request("POST", "/v3/x", "{}")
    assert.equal("system_error", err.kind)
    -- WeChat received it and may have acted: not to be repeated blindly
    assert.is_false(err.retryable)
    assert.matches("query the outcome before repeating", err.message, 1,
                   true)
    assert.equal(1, count("POST", "/v3/x"))
    assert(wx:request("POST", "/v3/x", "{}", { idempotent = true }))
    assert.equal(3, count("POST", "/v3/x"))
  end)
  it("retries FREQUENCY_LIMITED even for a POST", function()
    wxtest.queue(srv, "POST", "/v3/x", { { status = 429, body = json.encode{
      code = "FREQUENCY_LIMITED", message = "m" } }, { body = "{}" } })
    assert(wx:request("POST", "/v3/x", "{}"))
    assert.equal(2, count("POST", "/v3/x"))
  end)
  it("gives up within the deadline", function()
    local r = {}
    for i = 1, 10 do r[i] = { status = 503, body = "" } end
    wxtest.queue(srv, "GET", "/v3/x", r)
    local t0 = core.mono()
    local _, err = wx:request("GET", "/v3/x", nil, { deadline = 1,
                                                     max_attempts = 10 })
    assert.equal("system_error", err.kind)
    -- the 1 s deadline, room for a loaded machine: without it the 9
    -- backoffs (full jitter, 0.2 s doubling, capped at 5 s) average 13 s
    -- and come under 3 s about once in 10^4
    local took = core.mono() - t0
    assert.is_true(took < 3, "took " .. took .. " s")
  end)
  it("a timeout after a POST was sent is unknown_outcome, not retried",
     function()
    wxtest.queue(srv, "POST", "/v3/x", { { delay = 1.5, body = "{}" } })
    local _, err = wx:request("POST", "/v3/x", "{}", { timeout = 0.5 })
    assert.equal("unknown_outcome", err.kind)
    assert.equal("timeout", err.cause_kind)
    assert.equal(1, count("POST", "/v3/x"))
  end)
  it("a GET that times out is retried", function()
    wxtest.queue(srv, "GET", "/v3/x", { { delay = 1.5, body = "{}" },
                                        { body = "{}" } })
    assert(wx:request("GET", "/v3/x", nil, { timeout = 0.5 }))
    assert.equal(2, count("GET", "/v3/x"))
  end)
  it("an idempotent POST answered 500 SYSTEM_ERROR once, then unreachable,"
     .. " is unknown_outcome (WeChat may have acted on the first), not a"
     .. " connect error", function()
    local port = core.free_port()
    local log = dir .. "/once." .. port .. ".log"
    proc.spawn({ "python3", "spec/support/answer_once.py", tostring(port),
                 "500", json.encode{ code = "SYSTEM_ERROR",
                                     message = "系统繁忙" }, log })
    local deadline = core.mono() + 10
    while core.mono() < deadline do
      local f = io.open(log)
      local l = f and f:read("*l")
      if f then f:close() end
      if l == "ready" then break end
      core.sleep(0.02)
    end
    local wx2 = client{ base_url = "http://127.0.0.1:" .. port,
                        backup_url = false,
                        platform_certificates = { keys.p1_cert },
                        download_certificates = false }
    local _, err = wx2:request("POST", "/v3/x", "{}", { idempotent = true,
                                                        deadline = 2 })
    wx2:stop()
    assert.equal("unknown_outcome", err.kind, tostring(err))
    assert.is_true(err.retryable)        -- the same request may be repeated
    assert.truthy(err.attempts >= 2)
  end)
  it("an idempotent POST that timed out after sending, then was refused "
     .. "429 to its retries, is unknown_outcome (the first may have acted)",
     function()
    local limited = { status = 429, body = json.encode{
      code = "FREQUENCY_LIMITED", message = "频率超限" } }
    wxtest.queue(srv, "POST", "/v3/x", { { delay = 1.5, body = "{}" },
                                         limited, limited })
    local _, err = wx:request("POST", "/v3/x", "{}", { idempotent = true,
      timeout = 0.5, max_attempts = 3 })
    assert.equal("unknown_outcome", err.kind, tostring(err))
    assert.is_true(err.retryable)
    assert.equal(3, err.attempts)
    assert.equal(3, count("POST", "/v3/x"))
  end)
  it("uses the backup domain when the primary cannot be reached", function()
    local wx2 = client{ base_url = "http://127.0.0.1:" .. core.free_port(),
                        backup_url = srv.base_url,
                        platform_certificates = { keys.p1_cert },
                        download_certificates = false }
    local res = assert(wx2:request("POST", "/v3/echo", "{}"))
    assert.equal(200, res.status)
    assert.equal(1, count("POST", "/v3/echo"))
    wx2:stop()
  end)
  it("does not use the backup domain once the request was sent", function()
    -- one server under two names: the Host header tells which domain an
    -- attempt went to (the primary 127.0.0.1, the backup localhost)
    local port = srv.base_url:match(":(%d+)$")
    local wx2 = client{ backup_url = "http://localhost:" .. port }
    wxtest.fresh(srv, P1)
    wxtest.queue(srv, "GET", "/v3/x", { { delay = 1.5, body = "{}" },
                                        { body = "{}" } })
    -- a GET that timed out after sending is retried, on the primary
    assert(wx2:request("GET", "/v3/x", nil, { timeout = 0.5 }))
    -- a POST that timed out after sending is unknown_outcome, sent once
    wxtest.queue(srv, "POST", "/v3/x", { { delay = 1.5, body = "{}" } })
    local _, err = wx2:request("POST", "/v3/x", "{}", { timeout = 0.5 })
    assert.equal("unknown_outcome", err.kind)
    local hosts = {}
    for _, r in ipairs(wxtest.requests(srv)) do
      if r.target == "/v3/x" then
        hosts[#hosts + 1] = r.method .. " " .. r.headers["host"]
      end
    end
    assert.same({ "GET 127.0.0.1:" .. port, "GET 127.0.0.1:" .. port,
                  "POST 127.0.0.1:" .. port }, hosts)
    wx2:stop()
  end)
end)

describe("over HTTPS", function()
  it("verifies WeChat's certificate with ca_file; a wrong CA is tls, once",
     function()
    local certs = require("support.pki").make(dir)
    local tsrv = wxtest.start(keys, { tls = certs })
    local ok, e = pcall(function()
      local base = "https://127.0.0.1:" .. tsrv.port
      wxtest.certs(tsrv, { serials = { P1 } })
      local wx = assert(wechatpay.client(wxtest.client_conf(tsrv, keys,
        { base_url = base, ca_file = certs.ca })))
      assert.same({ P1 }, wx:certificate_status().serials)
      assert(wx:request("POST", "/v3/echo", "{}"))
      wx:stop()
      local wx2 = assert(wechatpay.client(wxtest.client_conf(tsrv, keys,
        { base_url = base, ca_file = certs.other_ca,
          platform_certificates = { keys.p1_cert } })))
      local n0 = #wxtest.requests(tsrv)
      local _, err = wx2:request("POST", "/v3/echo", "{}")
      assert.equal("tls", err.kind)
      assert.is_false(err.sent)
      assert.equal(n0, #wxtest.requests(tsrv))
      wx2:stop()
    end)
    tsrv:stop()
    assert(ok, e)
  end)
end)

describe("wx:encrypt_sensitive", function()
  it("encrypts for the public key in public-key mode", function()
    local wx = client{ public_key = keys.pub_pem, public_key_id = PUB_ID }
    local ct, serial = assert(wx:encrypt_sensitive("6222020000000000"))
    assert.equal(PUB_ID, serial)
    local key = crypto.private_key(io.open(keys.pub_key):read("*a"))
    assert.equal("6222020000000000",
                 crypto.oaep_decrypt(key, crypto.base64_decode(ct)))
    wx:stop()
  end)
  it("encrypts for the newest platform certificate", function()
    local wx = client()
    local ct, serial = assert(wx:encrypt_sensitive("张三"))
    assert.equal(P1, serial)
    local key = crypto.private_key(io.open(keys.p1_key):read("*a"))
    assert.equal("张三", crypto.oaep_decrypt(key, crypto.base64_decode(ct)))
    wx:stop()
  end)
  it("says a text too long for the key is invalid_params, a kind of the"
     .. " client's", function()
    local errors = require "paygate.wechatpay.errors"
    local wx = client{ public_key = keys.pub_pem, public_key_id = PUB_ID }
    local ct, err = wx:encrypt_sensitive(string.rep("x", 300))
    assert.is_nil(ct)
    assert.equal("invalid_params", err.kind)
    assert.matches("^plaintext: oaep encrypt: at most %d+ bytes", err.message)
    local known = {}
    for _, k in ipairs(errors.KINDS) do known[k] = true end
    assert.is_true(known[err.kind])
    wx:stop()
  end)
end)
