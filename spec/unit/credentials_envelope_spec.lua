-- paygate.credentials' envelopes and key-encryption key, without etcd:
-- a fresh data key and nonces per seal, the binding to the etcd key, a
-- KEK of the wrong length refused.
local crypto = require "paygate.crypto"
local json = require "paygate.json"
local credentials = require "paygate.credentials"
local core = require "paygate.core"

local KEY = "/paygate/merchants/1900000001/apiclient_key.pem"

local function tmpfile(content)
  local path = os.tmpname()
  local f = assert(io.open(path, "wb"))
  f:write(content)
  f:close()
  return path
end

describe("credentials envelopes", function()
  local kek = crypto.random_bytes(32)

  it("draws a fresh data key and fresh nonces for every seal", function()
    local a = json.decode(credentials.seal(kek, KEY, "secret"))
    local b = json.decode(credentials.seal(kek, KEY, "secret"))
    assert.not_equal(a.data, b.data)
    assert.not_equal(a.dek, b.dek)
    local na = crypto.base64_decode(a.data):sub(1, 12)
    local nb = crypto.base64_decode(b.data):sub(1, 12)
    assert.not_equal(na, nb)
    assert.not_equal(crypto.base64_decode(a.dek):sub(1, 12),
                     crypto.base64_decode(b.dek):sub(1, 12))
    assert.equal("secret", assert(credentials.open(kek, KEY,
      credentials.seal(kek, KEY, "secret"))))
  end)

  it("opens only under the etcd key it was sealed for", function()
    local env = credentials.seal(kek, KEY, "secret")
    for _, other in ipairs({
        "/paygate/merchants/1900000002/apiclient_key.pem",
        "/paygate/merchants/1900000001/apiv3_key",
        "apiclient_key.pem" }) do
      local pt, err = credentials.open(kek, other, env)
      assert.is_nil(pt)
      assert.equal("invalid_credentials", err.kind)
      assert.not_matches("secret", err.message)
    end
    -- the data key of one envelope with the data of another
    local a = json.decode(env)
    local b = json.decode(credentials.seal(kek, KEY, "other"))
    a.data = b.data
    assert.is_nil(credentials.open(kek, KEY, json.encode(a)))
  end)

  it("refuses a format-1 envelope (bound to the file name only)",
     function()
    local e = json.decode(credentials.seal(kek, KEY, "secret"))
    e.paygate_envelope = 1
    local pt, err = credentials.open(kek, KEY, json.encode(e))
    assert.is_nil(pt)
    assert.matches("publish the set again", err.message)
  end)

  it("does not echo an envelope's own fields into its error", function()
    -- etcd's content is input: a value with the fields of an envelope
    -- but holding other text (a secret pasted in by hand, say) must not
    -- carry that text into the error (and so into the logs)
    local pasted = "-----BEGIN PRIVATE KEY-----" .. ("A"):rep(4000)
    for _, e in ipairs({
        { paygate_envelope = pasted },
        { paygate_envelope = 2, kek = pasted, dek = "x", data = "y" } }) do
      local pt, err = credentials.open(kek, KEY, json.encode(e))
      assert.is_nil(pt)
      assert.equal("invalid_credentials", err.kind)
      assert.not_matches("PRIVATE KEY", err.message, 1, true)
      assert.is_true(#err.message < 300)
    end
  end)

  it("names an unexpected file of a set without its control bytes, cut",
     function()
    -- a key's name in etcd is input: paygate doctor printed the reason
    -- to the terminal as it came (an escape sequence, a line break)
    local files = { ["apiclient_key.pem"] = "k", ["apiclient_cert.pem"] = "c",
                    apiv3_key = ("k"):rep(32) }
    files["x\27[2J\27]0;pwned\7\r\nok  done"] = "v"
    local set, err = credentials.validate(files, "merchant")
    assert.is_nil(set)
    assert.equal("invalid_credentials", err.kind)
    assert.equal("credentials: unexpected file x\\x1B[2J\\x1B]0;pwned"
                 .. "\\x07\\x0D\\x0Aok  done", err.message)
    files = { ["apiclient_key.pem"] = "k", ["apiclient_cert.pem"] = "c",
              apiv3_key = ("k"):rep(32), [("n"):rep(5000)] = "v" }
    set, err = credentials.validate(files, "merchant")
    assert.is_nil(set)
    assert.equal("credentials: unexpected file " .. ("n"):rep(128) .. "...",
                 err.message)
  end)

  it("refuses a key-encryption key of the wrong length", function()
    local raw = crypto.random_bytes(32)
    local good = {
      raw, crypto.hex(raw), crypto.hex(raw) .. "\n",
      crypto.base64_encode(raw) .. "\n" }
    for _, s in ipairs(good) do
      local path = tmpfile(s)
      assert.equal(raw, assert(credentials.read_kek{ kek_file = path }))
      os.remove(path)
    end
    local bad = {
      crypto.hex(crypto.random_bytes(16)),        -- 16 bytes as hex: 32 chars
      crypto.base64_encode(crypto.random_bytes(24)), -- 24 bytes: 32 chars
      crypto.hex(crypto.random_bytes(16)):sub(2) .. "\n", -- 31 chars + \n
      crypto.random_bytes(16), crypto.random_bytes(33),
      crypto.hex(crypto.random_bytes(31)), "",
    }
    for i, s in ipairs(bad) do
      local path = tmpfile(s)
      local k, err = credentials.read_kek{ kek_file = path }
      os.remove(path)
      assert.is_nil(k, "bad KEK #" .. i .. " accepted")
      assert.equal("invalid_config", err.kind)
    end
    assert.has_error(function() credentials.seal("short", KEY, "x") end)
  end)

  it("says why a kek_file cannot be read: a folder, a device, too big",
     function()
    -- before: a folder or a device read as no key at all ("not a 32-byte
    -- key"), and a huge file was read whole
    local dir = os.tmpname()
    os.remove(dir)
    assert(core.mkdir_p(dir .. "/folder"))
    local f = assert(io.open(dir .. "/big", "wb"))
    f:write(("0"):rep(2 * 1048576))
    f:close()
    local function refused(path, want)
      local k, err = credentials.read_kek{ kek_file = path }
      assert.is_nil(k, path)
      assert.equal("invalid_config", err.kind)
      assert.equal(want, err.message)
    end
    refused(dir .. "/folder", "credentials: kek_file: cannot read " .. dir
            .. "/folder (Is a directory)")
    refused("/dev/zero", "credentials: kek_file: cannot read /dev/zero (not"
            .. " a regular file (a FIFO, a socket or a device))")
    refused(dir .. "/big", "credentials: kek_file " .. dir .. "/big: the"
            .. " file is over 1048576 bytes")
    refused(dir .. "/none", "credentials: kek_file: cannot read " .. dir
            .. "/none (No such file or directory)")
    os.execute("rm -rf " .. dir)
  end)
end)

describe("credentials.new", function()
  it("takes its section straight from paygate.config (read-only proxies)",
     function()
    local dir = os.tmpname()
    os.remove(dir)
    local conf_file = dir .. ".conf.lua"
    local kek_file = dir .. ".kek"
    local f = assert(io.open(kek_file, "wb"))
    f:write(crypto.hex(crypto.random_bytes(32)))
    f:close()
    f = assert(io.open(conf_file, "wb"))
    f:write(([[return { credentials = {
      etcd = { endpoints = { "https://127.0.0.1:1", "https://127.0.0.1:2" },
               user = "u", password = "p" },
      kek_file = %q, cache_dir = "/tmp",
      merchants = { ["1900000001"] = "/paygate/merchants/1900000001/" },
      tls = "/paygate/tls/" } }]]):format(kek_file))
    f:close()
    -- a paygate module loaded with that config file, as a worker has it
    local saved = package.loaded["paygate.runtime"]
    package.loaded["paygate.runtime"] = { mode = "exec",
                                          config_file = conf_file }
    local ok, fresh = pcall(dofile, package.searchpath("paygate",
                                                       package.path))
    package.loaded["paygate.runtime"] = saved
    os.remove(conf_file)
    assert(ok, fresh)
    local src, err = credentials.new(fresh.config.credentials)
    os.remove(kek_file)
    assert(src, tostring(err))
    assert.same({ "https://127.0.0.1:1", "https://127.0.0.1:2" },
                src.cli.endpoints)
    assert.equal("/paygate/merchants/1900000001/",
                 src.sets["1900000001"].prefix)
    assert.equal("/paygate/tls/", src.sets.tls.prefix)
  end)
end)

-- A TLS set (the HTTPS listener's) is validated as the listener takes a
-- pair (paygate.tls.check): an ECDSA pair, which the listener serves,
-- was refused ("key.pem is not a private key"); a 1024-bit RSA pair,
-- which the listener refuses (its start: "ee key too small"), was taken,
-- published and then refused by every worker's swap.
describe("credentials.validate of a TLS set", function()
  local server = require "paygate.testing.server"
  local dir

  local function pair(name, newkey)
    assert(os.execute(("cd %s && openssl req -x509 -newkey %s -nodes "
      .. "-keyout %s.key -out %s.pem -days 2 -subj /CN=localhost "
      .. ">/dev/null 2>&1"):format(dir, newkey, name, name)) == 0)
    local function rd(p)
      local f = assert(io.open(dir .. "/" .. p, "rb"))
      local s = f:read("*a")
      f:close()
      return s
    end
    return rd(name .. ".pem"), rd(name .. ".key")
  end

  setup(function() dir = server.tmpdir() end)
  teardown(function() server.cleanup() end)

  it("refuses a pair the listener refuses, naming the file", function()
    local cert, key = pair("weak", "rsa:1024")
    local set, err = credentials.validate({ ["cert.pem"] = cert,
                                            ["key.pem"] = key }, "tls")
    assert.is_nil(set)
    assert.equal("invalid_credentials", err.kind)
    assert.matches("^credentials: cert.pem: the certificate chain is "
                   .. "refused by OpenSSL %(ee key too small", err.message)
    local _, other = pair("other", "ec -pkeyopt ec_paramgen_curve:P-256")
    set, err = credentials.validate({ ["cert.pem"] = cert,
                                      ["key.pem"] = other }, "tls")
    assert.is_nil(set)
    assert.matches("^credentials: the private key does not match the "
                   .. "certificate %(serial %x+%)$", err.message)
    set, err = credentials.validate({ ["cert.pem"] = cert,
      ["key.pem"] = "-----BEGIN PRIVATE KEY-----\nAAAA\n" }, "tls")
    assert.is_nil(set)
    assert.equal("credentials: key.pem: the private key is not PEM (or is "
                 .. "encrypted)", err.message)
    assert.not_matches("AAAA", err.message, 1, true)
  end)

  it("takes an ECDSA pair, as the listener serves it", function()
    local cert, key = pair("ec", "ec -pkeyopt ec_paramgen_curve:P-256")
    local set = assert(credentials.validate({ ["cert.pem"] = cert,
                                              ["key.pem"] = key }, "tls"))
    assert.equal(cert, set.cert)
    assert.equal(key, set.key)
    assert.matches("^%x+$", set.serial)
  end)
end)
