-- examples/gateway: refused notifications captured whole (gw.history's
-- capture): at most CAPTURE_PER_SECOND a second per worker (anyone can
-- send refused notifications), the newest CAPTURE_KEEP kept, a body over
-- CAPTURE_MAX not captured. The capture's verify command (or, when the
-- client holds no key, the doctor command) is run end to end by
-- console_history_spec.
package.path = "examples/gateway/?.lua;" .. package.path
local core = require "paygate.core"
local testing = require "paygate.testing"
local history = require "gw.history"
local servers = require "spec.support.servers"

local function req(body)
  return { body = body, headers = { ["wechatpay-serial"] = "S1",
    ["wechatpay-timestamp"] = "1700000000", ["wechatpay-nonce"] = "n",
    ["wechatpay-signature"] = "AAAA", ["content-type"] = "application/json" } }
end

local function bases(dir)
  local out = {}
  for _, n in ipairs(core.listdir(dir) or {}) do
    local b = n:match("^(refused%-.+)%.headers$")
    if b then out[#out + 1] = b end
  end
  table.sort(out)
  return out
end

describe("gateway: refused notifications captured", function()
  local dir, keep, rate
  -- a client holding one platform certificate (a certificate-mode
  -- merchant's, once downloaded): the command verifies with it
  local cert = assert(require("paygate.x509").load(
    testing.read(testing.merchant().certificate)))
  local wx = { certs = { [cert:serial()] = cert }, conf = {} }

  before_each(function()
    dir = testing.tmpdir() .. "/refused"
    history.init{ capture_dir = dir }
    keep, rate = history.CAPTURE_KEEP, history.CAPTURE_PER_SECOND
  end)
  after_each(function()
    history.CAPTURE_KEEP, history.CAPTURE_PER_SECOND = keep, rate
  end)

  it("writes the headers and the raw body, and names them in the command",
     function()
    -- (waits for a new second: the bound is per second)
    local s = math.floor(require("paygate").update_time())
    testing.wait_until(function()
      return math.floor(require("paygate").update_time()) > s
    end, 3, "the next second")
    local cmd = assert(history.capture(wx, req('{"id":"1"}')))
    local b = bases(dir)
    assert.equal(1, #b)
    assert.matches("--headers " .. dir .. "/" .. b[1] .. ".headers --body "
                   .. dir .. "/" .. b[1] .. ".body --at ", cmd, 1, true)
    assert.matches(" %-%-at %d+ %-%-certificate ", cmd)
    assert.equal(dir .. "/" .. b[1] .. ".certs.pem",
                 cmd:match("%-%-certificate (%S+)$"))
    assert.equal(cert:pem(), testing.read(dir .. "/" .. b[1] .. ".certs.pem"))
    assert.equal('{"id":"1"}', testing.read(dir .. "/" .. b[1] .. ".body"))
    assert.matches("wechatpay-signature: AAAA\n",
                   testing.read(dir .. "/" .. b[1] .. ".headers"), 1, true)
    -- one a second: a flood costs one capture
    assert.is_nil(history.capture(wx, req('{"id":"2"}')))
    assert.equal(1, #bases(dir))
  end)

  it("names --sign-type for an SM merchant's client, none for an RSA one",
     function()
    -- was: the same command for both, so paygate verify took the variant
    -- from the key and passed (exit 0, a warning) an SM2 signature with
    -- no Wechatpay-Signature-Type that the SM client had refused (401)
    history.CAPTURE_PER_SECOND = 1000
    local sm = { certs = wx.certs, conf = { sm = true } }
    local cmd = assert(history.capture(sm, req('{"id":"sm"}')))
    assert.matches(" %-%-at %d+ %-%-sign%-type WECHATPAY2%-SM2%-WITH%-SM3 ",
                   cmd)
    cmd = assert(history.capture(wx, req('{"id":"rsa"}')))
    assert.is_nil(cmd:find("--sign-type", 1, true), cmd)
  end)

  it("keeps no credential a request carried: authorization, cookies",
     function()
    -- was: every header written as it came, a bearer token or a session
    -- cookie (a proxy's, a browser's sent astray) kept on disk in clear
    history.CAPTURE_PER_SECOND = 1000
    local r = req('{"id":"creds"}')
    r.headers["authorization"] = "Bearer s3cr3t-token"
    r.headers["proxy-authorization"] = "Basic dXNlcjpzM2NyM3Q="
    r.headers["cookie"] = "paygate_console=s3cr3t-session"
    assert(history.capture(wx, r))
    local b = bases(dir)
    assert.equal(1, #b)
    local head = testing.read(dir .. "/" .. b[#b] .. ".headers")
    assert.is_nil(head:find("s3cr3t", 1, true))
    assert.is_nil(head:find("dXNlcjpzM2NyM3Q", 1, true))
    -- the header is named, so a reader knows it came
    for _, name in ipairs({ "authorization", "cookie",
                            "proxy-authorization" }) do
      assert.truthy(("\n" .. head):find("\n" .. name .. ": (not kept)\n",
                                         1, true), name)
    end
    -- what verify reads is kept as it came
    assert.matches("wechatpay-signature: AAAA\n", head, 1, true)
    assert.matches("wechatpay-serial: S1\n", head, 1, true)
  end)

  it("writes each file 0600 in a folder it makes 0700, under umask 022",
     function()
    -- was: io.open and a folder made 0755: under a service's umask of 022
    -- every header of a refused request (and what a proxy added) was
    -- readable by any local user
    history.CAPTURE_PER_SECOND = 1000
    local ok, cmd = servers.under_umask(18, history.capture, wx,    -- 022
                                        req('{"id":"private"}'))
    assert(ok, cmd)
    assert.is_string(cmd)
    local mode = servers.file_mode
    assert.equal("700", mode(dir))
    local b = bases(dir)
    assert.equal(1, #b)
    for _, ext in ipairs({ ".headers", ".body", ".certs.pem" }) do
      assert.equal("600", mode(dir .. "/" .. b[1] .. ext), ext)
    end
    -- nothing left beside them (each written whole, then renamed)
    assert.equal(3, #core.listdir(dir))
  end)

  it("makes the captures an earlier gateway left 0644 0600 at start, and"
     .. " their folder 0700", function()
    -- was: captures written before they were made private stayed
    -- readable by every local user until CAPTURE_KEEP new ones replaced
    -- them
    local mode = servers.file_mode
    local function make(d, names)
      assert(core.mkdir_p(d, 493))                          -- 0755
      assert(core.chmod(d, 493))
      for _, n in ipairs(names) do
        assert(core.write_file(d .. "/" .. n, "x", 420))    -- 0644
      end
    end
    local old = { "refused-20260101T000000-001-42-1.headers",
                  "refused-20260101T000000-001-42-1.body",
                  "refused-20260101T000000-001-42-1.certs.pem",
                  "refused-20260101T000000-001-42-1.pub.pem" }
    local left = testing.tmpdir() .. "/refused"
    make(left, old)
    history.init{ capture_dir = left }                      -- a start
    assert.equal("700", mode(left))
    for _, n in ipairs(old) do
      assert.equal("600", mode(left .. "/" .. n), n)
    end
    -- a folder the config named that holds other files too keeps its
    -- mode, and so do they: only the captures are made private
    local shared = testing.tmpdir() .. "/shared"
    make(shared, { old[1], old[2], "notes.txt", "refused-x.headers.bak" })
    history.init{ capture_dir = shared }
    assert.equal("755", mode(shared))
    assert.equal("600", mode(shared .. "/" .. old[1]))
    assert.equal("600", mode(shared .. "/" .. old[2]))
    assert.equal("644", mode(shared .. "/notes.txt"))
    assert.equal("644", mode(shared .. "/refused-x.headers.bak"))
    -- once per instance (and folder): a second worker's start leaves one
    -- the operator opened again as it is
    assert(core.chmod(shared .. "/" .. old[1], 416))         -- 0640
    history.init{ capture_dir = shared }
    assert.equal("640", mode(shared .. "/" .. old[1]))
  end)

  it("keeps the newest CAPTURE_KEEP, and no body over CAPTURE_MAX",
     function()
    history.CAPTURE_PER_SECOND, history.CAPTURE_KEEP = 1000, 3
    local made = {}
    for i = 1, 6 do
      assert(history.capture(wx, req('{"id":"' .. i .. '"}')))
      made[#made + 1] = bases(dir)[#bases(dir)]
    end
    local left = bases(dir)
    assert.equal(3, #left)
    -- the newest three (their names sort by time, then the counter)
    for _, b in ipairs(left) do
      local body = testing.read(dir .. "/" .. b .. ".body")
      assert.truthy(body == '{"id":"4"}' or body == '{"id":"5"}'
                    or body == '{"id":"6"}', body)
    end
    for _, n in ipairs(core.listdir(dir)) do
      assert.truthy(n:match("^refused%-.+%.headers$")
                    or n:match("^refused%-.+%.body$")
                    or n:match("^refused%-.+%.certs%.pem$"), n)
    end
    assert.is_nil(history.capture(wx, req(("x"):rep(
      history.CAPTURE_MAX + 1))))
  end)

  it("keeps the newest in one millisecond too, past a counter of 9 or 99",
     function()
    -- was: the counter in the name unpadded, "-10" sorted before "-9",
    -- and the prune removed the newest capture of a millisecond
    history.CAPTURE_PER_SECOND, history.CAPTURE_KEEP = 1e6, 3
    local paygate = require "paygate"
    local update_time = paygate.update_time
    local T = update_time()
    paygate.update_time = function() return T end
    local ok, err = pcall(function()
      local function newest_kept(body)
        for _, b in ipairs(bases(dir)) do
          if testing.read(dir .. "/" .. b .. ".body") == body then
            return true
          end
        end
        return false
      end
      -- the first one's counter (the worker's count so far, + 1): then on
      -- until it has gained a digit, and three more
      local bodies = { '{"id":"1"}' }
      assert(history.capture(wx, req(bodies[1])))
      local first = tonumber(bases(dir)[1]:match("%-(%d+)$"))
      local last = 10 ^ #tostring(first) + 2
      assert.truthy(last - first < 2000, first)
      for i = 2, last - first + 1 do
        local body = '{"id":"' .. i .. '"}'
        assert(history.capture(wx, req(body)))
        bodies[#bodies + 1] = body
        -- a prune never removes the newest
        assert.truthy(newest_kept(body), "capture " .. i .. " (counter "
                      .. (first + i - 1) .. ") was pruned at once")
      end
      local left = {}
      for _, b in ipairs(bases(dir)) do
        left[#left + 1] = testing.read(dir .. "/" .. b .. ".body")
      end
      assert.same({ bodies[#bodies - 2], bodies[#bodies - 1],
                    bodies[#bodies] }, left)
    end)
    paygate.update_time = update_time
    assert(ok, err)
  end)

  it("drops captures older than CAPTURE_MAX_AGE, at a capture and when"
     .. " pruned with none made", function()
    -- was: the newest CAPTURE_KEEP kept whatever their age: a gateway
    -- that stopped being sent refused notifications kept a payer's
    -- encrypted notification on disk for good, past its row's 30 days
    history.CAPTURE_PER_SECOND = 1000
    local now = require("paygate").update_time()
    local function old_one(base)
      assert(core.mkdir_p(dir, 448))
      for _, ext in ipairs{ ".headers", ".body", ".certs.pem" } do
        assert(core.write_file(dir .. "/" .. base .. ext, "x", 384))
      end
    end
    -- 31 days old, and one a day inside the limit
    local stamp = function(t)
      return "refused-" .. os.date("!%Y%m%dT%H%M%S", t) .. "-000-1-1"
    end
    local gone = stamp(now - 31 * 86400)
    local kept = stamp(now - 29 * 86400)
    old_one(gone)
    old_one(kept)
    -- a file of the operator's in the folder, named like none: left
    assert(core.write_file(dir .. "/notes.txt", "mine", 384))
    assert(history.capture(wx, req('{"id":"new"}')))
    local b = bases(dir)
    assert.equal(2, #b)
    assert.equal(kept, b[1])
    for _, ext in ipairs{ ".headers", ".body", ".certs.pem" } do
      assert.is_nil(io.open(dir .. "/" .. gone .. ext))
    end
    assert.equal("mine", testing.read(dir .. "/notes.txt"))
    -- no capture made: the periodic prune (history.start's) drops the
    -- one whose time has come
    history.prune_captures(now + 2 * 86400)
    b = bases(dir)
    assert.equal(1, #b)
    assert.equal('{"id":"new"}', testing.read(dir .. "/" .. b[1] .. ".body"))
  end)

  it("names paygate doctor, not a verify without a key, when the client"
     .. " holds none", function()
    -- was: the command named the capture and no key (certificate mode, no
    -- download succeeded: a wrong APIv3 key, say): paygate verify exited
    -- 2, a usage error. console_history_spec runs the doctor command.
    history.CAPTURE_PER_SECOND = 1000
    local rt = require("paygate").runtime
    local was = rt.config_file
    rt.config_file = "/etc/gw/gateway.lua"
    local cmd, doctor = history.capture({ certs = {},
      conf = { mchid = "1900000001" } }, req('{"id":"none"}'))
    rt.config_file = was
    assert.is_nil(cmd)
    assert.equal("paygate doctor --config /etc/gw/gateway.lua --app "
      .. tostring(require("paygate").app_dir) .. " --merchant 1900000001",
      doctor)
    -- captured all the same: it verifies once the keys are held
    local b = bases(dir)
    assert.equal(1, #b)
    assert.equal('{"id":"none"}', testing.read(dir .. "/" .. b[1]
                                                .. ".body"))
  end)

  it("names the WeChat Pay public key of a public-key merchant: the"
     .. " command verifies", function()
    -- was: the command named --public-key only when wx.conf.public_key
    -- was a string, and a client's is the loaded key: a public-key
    -- merchant's command named no key at all (paygate verify: exit 2,
    -- usage), a migrating one's only the certificates (unknown_serial
    -- for a notification signed with the public key)
    local crypto = require "paygate.crypto"
    local verify = require "paygate.wechatpay.verify"
    local m = testing.merchant()
    local pk = testing.merchant_keys()
    local conf = assert(require("paygate.wechatpay.config").check{
      mchid = m.mchid, merchant_private_key = m.private_key,
      merchant_certificate = m.certificate, apiv3_key = m.apiv3_key,
      public_key = pk.public_key,
      public_key_id = "PUB_KEY_ID_0114232134912410000000000000000001" })
    history.CAPTURE_PER_SECOND = 1000
    local key = assert(crypto.private_key(testing.read(pk.private_key)))
    local ts, nonce, body = tostring(os.time()), "n0nce", '{"id":"pk"}'
    local sig = assert(crypto.sign_base64(key, verify.message(ts, nonce,
                                                               body)))
    local cmd = assert(history.capture({ certs = {}, conf = conf }, {
      body = body, headers = {
        ["wechatpay-serial"] = conf.public_key_id,
        ["wechatpay-timestamp"] = ts, ["wechatpay-nonce"] = nonce,
        ["wechatpay-signature"] = sig } }))
    assert.matches(" %-%-public%-key %S+ %-%-public%-key%-id "
                   .. conf.public_key_id, cmd)
    local argv = {}
    for w in cmd:gmatch("%S+") do argv[#argv + 1] = w end
    argv[1] = os.getenv("PAYGATE_BIN") or "build/paygate"
    local code, out = testing.proc.run(argv)
    assert.equal(0, code, out)
    conf.public_key:close()
    testing.stop_all()
  end)
end)
