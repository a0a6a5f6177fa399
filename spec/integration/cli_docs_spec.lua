-- docs/troubleshooting.md shows real outputs: every `paygate sign` and
-- `paygate decrypt` example on the page (deterministic with --timestamp
-- and --nonce) is run against files made here and its output compared
-- with the page, line by line. Only what depends on the key generated per
-- run is masked: the signature and the key's fingerprint.
local crypto = require "paygate.crypto"
local server = require "support.server"
local proc = require "support.proc"
local diagpki = require "support.diagpki"

local dir, pki
local write, read = diagpki.write, diagpki.read
local APIV3 = "0123456789abcdefghijABCDEFGHIJkl"

local function run(argv)
  local log = dir .. "/out." .. crypto.random_nonce(8)
  local p = proc.spawn(argv, { log = log })
  local code = p:wait(30)
  if code == nil then p:kill(proc.SIGKILL); p:wait(2) end
  return code, proc.read(log)
end

-- the examples: { command = "sign ...", args = {...}, output = {lines},
-- exit = n or nil }
local function examples(text, which)
  local l = {}
  for line in (text .. "\n"):gmatch("([^\n]*)\n") do l[#l + 1] = line end
  local out, i = {}, 1
  while i <= #l do
    if l[i]:match("^%$ paygate " .. which .. " ") then
      local cmd = l[i]:sub(3)
      while cmd:sub(-1) == "\\" do
        i = i + 1
        cmd = cmd:sub(1, -2) .. " " .. l[i]:gsub("^%s+", "")
      end
      local ex = { command = cmd, output = {} }
      i = i + 1
      while i <= #l and l[i] ~= "```" and not l[i]:match("^%$ ") do
        local code = l[i]:match("^%(exit (%d)%)$")
        if code then ex.exit = tonumber(code) i = i + 1 break end
        ex.output[#ex.output + 1] = l[i]
        i = i + 1
      end
      while #ex.output > 0 and ex.output[#ex.output] == "" do
        ex.output[#ex.output] = nil
      end
      out[#out + 1] = ex
    else
      i = i + 1
    end
  end
  return out
end

local function mask(s)
  return (s:gsub('signature="[^"]*"', 'signature="..."')
           :gsub("SHA256:%x+%.%.%.", "SHA256:..."))
end

local function check(ex, files)
  local argv = { PAYGATE_BIN }
  for a in ex.command:gmatch("%S+") do
    argv[#argv + 1] = files[a] or a
  end
  table.remove(argv, 2)                          -- "paygate"
  local code, out = run(argv)
  local got = {}
  for line in out:gmatch("([^\n]*)\n") do got[#got + 1] = mask(line) end
  while #got > 0 and got[#got] == "" do got[#got] = nil end
  local want = {}
  for _, line in ipairs(ex.output) do want[#want + 1] = mask(line) end
  assert.same(want, got, ex.command)
  if ex.exit then assert.equal(ex.exit, code, ex.command) end
end

setup(function()
  dir = server.tmpdir()
  pki = diagpki.make(dir)
end)

teardown(function() os.execute("rm -rf " .. dir) end)

describe("docs/troubleshooting.md", function()
  local page = read("docs/troubleshooting.md")

  it("shows what paygate decrypt prints", function()
    local ct = assert(crypto.aead_encrypt("AEAD_AES_256_GCM", APIV3,
      "abcdefghijklm", "transaction",
      '{"out_trade_no":"T-1","trade_state":"SUCCESS"}'))
    local files = {}
    local function f(name, content)
      write(dir .. "/" .. name, content)
      files[name] = dir .. "/" .. name
    end
    f("resource.json", ('{"algorithm":"AEAD_AES_256_GCM","nonce":'
      .. '"abcdefghijklm","associated_data":"transaction","ciphertext":"%s"}')
      :format(crypto.base64_encode(ct)))
    f("apiv3.key", APIV3)
    f("apiv3_nl.key", APIV3 .. "\n")
    f("apiv3_hex.key", crypto.hex(APIV3))
    f("apiv2.key", "ThisIsTheAPIv2KeyNotTheAPIv3Key!")
    local ex = examples(page, "decrypt")
    assert.is_true(#ex >= 4)
    for _, e in ipairs(ex) do check(e, files) end
  end)

  it("shows what paygate sign prints", function()
    write(dir .. "/b.json", '{"a":1}')
    local files = { ["b.json"] = dir .. "/b.json",
                    ["merchant.key"] = pki.merchant_key }
    local ex = examples(page, "sign")
    assert.is_true(#ex >= 1)
    for _, e in ipairs(ex) do check(e, files) end
  end)
end)
