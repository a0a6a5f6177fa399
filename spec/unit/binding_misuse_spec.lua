-- Misuse of the C bindings (wrong option types, misspelt options) raises
-- a message naming the public function and the option -- not an internal
-- argument slot ("bad argument #6") -- positioned at the caller (this
-- file); a wrong type is never answered as nil, malformed.
local crypto = require "paygate.crypto"
local x509 = require "paygate.x509"
local keyring = require "paygate.keyring"
local http = require "paygate.http"
local zlib = require "paygate.zlib"
local wxtest = require "support.wxtest"

local read = wxtest.fixture

local cert = assert(crypto.certificate(read("a6_platform_cert.pem")))
local key = assert(crypto.public_key(read("a7_platform_pubkey.pem")))
local URL = "http://127.0.0.1:1/"

local function raises(fn, prefix)
  local ok, err = pcall(fn)
  assert.is_false(ok, prefix)
  assert.is_string(err, prefix)
  local pos, msg = err:match("^(.-:%d+): (.*)$")
  assert.is_truthy(pos, "no position in: " .. err)
  assert.matches("binding_misuse_spec.lua", pos, 1, true)
  assert.equal(prefix, msg:sub(1, #prefix))
end

-- { call, message prefix }
local CASES = {
  -- x509.verify_chain / cert:verify_chain
  { function() x509.verify_chain(cert, { at = "x" }) end,
    "x509.verify_chain: opts.at must be a number" },
  { function() x509.verify_chain(cert, { max_depth = "x" }) end,
    "x509.verify_chain: opts.max_depth must be a non-negative integer" },
  { function() x509.verify_chain(cert, { max_depth = 1.5 }) end,
    "x509.verify_chain: opts.max_depth must be a non-negative integer" },
  { function() x509.verify_chain(cert, { hostname = 5 }) end,
    "x509.verify_chain: opts.hostname must be a string" },
  { function() x509.verify_chain(cert, { purpose = "serv" }) end,
    "x509.verify_chain: opts.purpose must be server, client" },
  { function() x509.verify_chain(cert, { purpose = 1 }) end,
    "x509.verify_chain: opts.purpose must be a string" },
  { function() x509.verify_chain(cert, { roots = 5 }) end,
    "x509.verify_chain: opts.roots must be a certificate handle" },
  { function() x509.verify_chain(cert, { intermediates = true }) end,
    "x509.verify_chain: opts.intermediates must be a certificate handle" },
  { function() x509.verify_chain(cert, { crls = 5 }) end,
    "x509.verify_chain: opts.crls must be a PEM/DER string" },
  { function() x509.verify_chain(cert, { rootz = { cert } }) end,
    "x509.verify_chain: unknown option opts.rootz" },
  { function() x509.verify_chain(cert, "x") end,
    "x509.verify_chain: opts must be a table" },
  { function() cert:verify_chain({ at = {} }) end,
    "x509.verify_chain: opts.at must be a number" },
  -- keyring.put / ring:put / keyring.replace
  { function() keyring.put("K1", key, { not_before = "x" }) end,
    "keyring.put: opts.not_before must be a number" },
  { function() keyring.put("K1", key, { not_after = 0 / 0 }) end,
    "keyring.put: opts.not_after must be a number" },
  { function() keyring.put("K1", key, { notbefore = 1 }) end,
    "keyring.put: unknown option opts.notbefore" },
  { function() keyring.put("K1", key, 5) end,
    "keyring.put: opts must be a table" },
  { function() keyring.new():put("K1", key, { not_after = "x" }) end,
    "ring:put: opts.not_after must be a number" },
  { function() keyring.replace({ { id = "K1", key = key, not_after = "x" } })
    end, "keyring.replace: items[1].not_after must be a number" },
  { function() keyring.replace({ { id = "K1", key = key },
                                 { id = "K2", key = key, not_before = {} } })
    end, "keyring.replace: items[2].not_before must be a number" },
  { function() keyring.replace({ { id = "K1", key = key, notafter = 1 } })
    end, "keyring.replace: unknown option items[1].notafter" },
  { function() keyring.replace({ "K1" }) end,
    "keyring.replace: items[1] must be a table" },
  { function() keyring.replace("x") end,
    "keyring.replace: items must be a table" },
  -- http.request (through paygate.http, a Lua module of paygate)
  { function() http.request{ url = URL, timout = 1 } end,
    "http.request: unknown option opts.timout" },
  { function() http.request{ url = URL, timeout = "1" } end,
    "http.request: opts.timeout must be a number" },
  { function() http.request{ url = URL, ca_file = 1 } end,
    "http.request: opts.ca_file must be a string" },
  { function() http.request{ url = URL, resolve = "x" } end,
    "http.request: opts.resolve must be an array of strings" },
  { function() http.request{ url = 1 } end,
    "http.request: opts.url must be a string" },
  -- a NUL would cut the header short in curl's C string: refused as CR
  { function() http.request{ url = URL, headers = { ["X-A"] = "a\r\nb" } }
    end, "http.request: opts.headers: header X-A has CR, LF or NUL in its"
         .. " value" },
  { function() http.request{ url = URL, headers = { ["X-A"] = "a\0b" } } end,
    "http.request: opts.headers: header X-A has CR, LF or NUL in its"
    .. " value" },
  { function() http.request{ url = URL, headers = { ["X-A\0B"] = "v" } } end,
    "http.request: opts.headers: a name that is not an HTTP field name" },
  -- curl reads these as C strings: a NUL would cut them short (another
  -- host, another file), so it is refused
  { function() http.request{ url = URL .. "\0.example.com/" } end,
    "http.request: opts.url has a NUL byte in it" },
  { function() http.request{ url = URL, ca_file = "/tmp/ca.pem\0x" } end,
    "http.request: opts.ca_file has a NUL byte in it" },
  { function() http.request{ url = URL, client_cert = "/tmp/c.pem\0x" } end,
    "http.request: opts.client_cert has a NUL byte in it" },
  { function() http.request{ url = URL, client_key = "/tmp/k.pem\0x" } end,
    "http.request: opts.client_key has a NUL byte in it" },
  { function() http.request{ url = URL, method = "GET\0X" } end,
    "http.request: opts.method has a NUL byte in it" },
  { function()
      http.request{ url = URL, resolve = { "a:80:127.0.0.1",
                                           "b:80:127.0.0.1\0x" } }
    end, "http.request: opts.resolve[2] has a NUL byte in it" },
  -- (a number was passed over without a word)
  { function() http.request{ url = URL, resolve = { "a:80:127.0.0.1", 5 } }
    end, "http.request: opts.resolve[2] must be a string" },
  { function() http.request{ url = URL, sink = print, timout = 1 } end,
    "http.request: unknown option opts.timout" },
  -- zlib.inflate
  { function() zlib.inflate{ max_peice = 1 } end,
    "zlib.inflate: unknown option opts.max_peice" },
  { function() zlib.inflate{ max_piece = "x" } end,
    "zlib.inflate: opts.max_piece must be a positive number" },
  { function() zlib.inflate(5) end,
    "zlib.inflate: opts must be a table" },
}

describe("misuse of the C bindings", function()
  for i, case in ipairs(CASES) do
    it(("raises at the caller, naming the option: %d %s"):format(i, case[2]),
       function()
      raises(case[1], case[2])
    end)
  end

  it("still accepts the documented options", function()
    local ok, err = x509.verify_chain(cert, { roots = { cert }, at = 1,
      hostname = "x", purpose = "any", max_depth = 3, crls = {},
      intermediates = {} })
    assert.truthy(ok or err.kind, tostring(err))
    assert.equal("K9", keyring.put("K9", key, { not_before = 0,
                                                not_after = 2 ^ 40 }))
    assert.is_true(keyring.replace({ { id = "K1", key = key, not_before = 0,
                                       not_after = 2 ^ 40 } }))
    assert.truthy(zlib.inflate{ max_piece = 10, max_total = 100 })
  end)
end)
