-- examples/gateway/spec/reload_merchants_spec.lua: what a reload changed
-- of the merchants is in the log, one line per change, once for all the
-- workers. Was: a reload said "done" and nothing of the merchants, so an
-- operator rotating a merchant certificate could not tell whether the new
-- serial took, nor see a merchant added or taken out.
local testing = require "paygate.testing"
local json = require "paygate.json"
local S = dofile("examples/gateway/spec/support.lua")
local boot_path = "examples/gateway/?.lua"

describe("gateway reload: the merchants' changes", function()
  local env, m1, m2, new_keys

  setup(function()
    m1 = testing.merchant()
    m2 = testing.merchant()
    -- the merchant's next certificate, which the simulator takes beside
    -- the first (renewed in the merchant platform before the reload)
    new_keys = testing.merchant_keys{ mchid = m1.mchid }
    m1.certificates = { m1.certificate, new_keys.certificate }
    env = S.start{ merchants = { m1, m2 }, workers = 2 }
  end)
  teardown(S.stop)

  -- the "gateway: reload:" lines logged after mark, decoded
  local function reload_lines(mark)
    local out = {}
    for line in env.gw:logs():sub(mark + 1):gmatch("[^\n]+") do
      local e = line:find('"gateway: reload:', 1, true) and json.decode(line)
      if e then out[#out + 1] = e end
    end
    return out
  end

  local function reload(edit)
    local mark = #env.gw:logs()
    S.reload_with(env, edit)
    -- (said as the new workers load: by the time the reload is done)
    local lines
    S.wait_until(function()
      lines = reload_lines(mark)
      return #lines > 0
    end, 10, "a gateway: reload: line")
    return lines, mark
  end

  -- the lines' messages, sorted (they come by mchid, made up at random)
  local function msgs(lines)
    local t = {}
    for i, l in ipairs(lines) do t[i] = l.msg end
    table.sort(t)
    return t
  end

  local function sorted(t)
    table.sort(t)
    return t
  end

  local function line_of(lines, mchid)
    for _, l in ipairs(lines) do
      if l.mchid == mchid then return l end
    end
  end

  it("says a merchant removed, a merchant added, a new merchant serial,"
     .. " once each; and that none changed", function()
    local old_serial = m1.serial:upper():gsub("^0+", "")
    local new_serial = new_keys.serial:upper():gsub("^0+", "")
    local lines, mark = reload("table.remove(c.merchants, 2)\n"
      .. "c.merchants[1].merchant_private_key = '" .. new_keys.private_key
      .. "'\nc.merchants[1].merchant_certificate = '"
      .. new_keys.certificate .. "'")
    assert.same(sorted{
      "gateway: reload: merchant " .. m1.mchid .. ": merchant_serial "
        .. old_serial .. " -> " .. new_serial,
      "gateway: reload: merchant " .. m2.mchid .. " removed",
    }, msgs(lines))
    local l1 = line_of(lines, m1.mchid)
    assert.same({ change = "merchant_serial", from = old_serial,
                  to = new_serial, level = "info" },
                { change = l1.change, from = l1.from, to = l1.to,
                  level = l1.level })
    -- no secret in them: not the APIv3 keys, not a private key's text
    local all = env.gw:logs():sub(mark + 1)
    for _, m in ipairs({ m1, m2 }) do
      assert.is_nil(all:find(m.apiv3_key, 1, true))
    end
    assert.is_nil(all:find("PRIVATE KEY", 1, true))
    -- the new serial signs: a payment goes through
    assert.equal("paying", env:create{}.payment.state)

    -- the config as first written: the merchant back, its first pair
    lines = reload("")
    assert.same(sorted{
      "gateway: reload: merchant " .. m1.mchid .. ": merchant_serial "
        .. new_serial .. " -> " .. old_serial,
      "gateway: reload: merchant " .. m2.mchid .. " added (merchant_serial "
        .. m2.serial:upper():gsub("^0+", "") .. ")",
    }, msgs(lines))
    assert.equal(m2.serial:upper():gsub("^0+", ""),
                 line_of(lines, m2.mchid).merchant_serial)

    -- the same config again: one line saying so
    lines = reload("")
    local ids = { m1.mchid, m2.mchid }
    table.sort(ids)
    assert.same({ "gateway: reload: no merchant changed (2: "
                  .. table.concat(ids, ", ") .. ")" }, msgs(lines))
  end)
end)

describe("gw.boot.merchant_changes", function()
  local saved = package.path
  local boot
  setup(function()
    package.path = boot_path .. ";" .. package.path
    boot = require "gw.boot"
  end)
  teardown(function() package.path = saved end)

  it("names the public key id, the mode and the appids too", function()
    local before = { ["1"] = { merchant_serial = "AA", mode = "certificate",
                               appids = "wx1" } }
    local now = { ["1"] = { merchant_serial = "AA", public_key_id =
                            "PUB_KEY_ID_1", mode = "migration",
                            appids = "wx1,wx2" } }
    local lines = boot.merchant_changes(before, now)
    local t = {}
    for i, l in ipairs(lines) do t[i] = l[1] end
    assert.same({
      "gateway: reload: merchant 1: public_key_id none -> PUB_KEY_ID_1",
      "gateway: reload: merchant 1: mode certificate -> migration",
      "gateway: reload: merchant 1: appids wx1 -> wx1,wx2",
    }, t)
    assert.same({}, boot.merchant_changes(now, now))
  end)

  -- was: a reload changing an APIv3 key file said "no merchant changed"
  it("names the APIv3 keys changed by their config keys and counts",
     function()
    local names = {
      apiv3_key = "merchants[1].apiv3_key_file",
      previous_apiv3_keys = "merchants[1].previous_apiv3_key_files" }
    local function m(cur, prev)
      return { ["1"] = { merchant_serial = "AA", apiv3_keys = {
        current = cur, previous = prev, names = names } } }
    end
    local function msgs(a, b)
      local t = {}
      for i, l in ipairs(boot.merchant_changes(a, b)) do t[i] = l[1] end
      return t
    end
    local P = "gateway: reload: merchant 1: APIv3 keys changed: "
    assert.same({ P .. "previous keys changed, 1 (merchants[1]."
                  .. "previous_apiv3_key_files)" },
                msgs(m("k1", { "k0" }), m("k1", { "k9" })))
    assert.same({ P .. "previous keys 1 -> 0 (merchants[1]."
                  .. "previous_apiv3_key_files)" },
                msgs(m("k1", { "k0" }), m("k1", {})))
    assert.same({ P .. "a new current key (merchants[1].apiv3_key_file)" },
                msgs(m("k1", { "k0" }), m("k2", { "k0" })))
    assert.same({}, msgs(m("k1", { "k0" }), m("k1", { "k0" })))
    -- a summary kept by a generation before the keys were: nothing said
    assert.same({}, msgs({ ["1"] = { merchant_serial = "AA" } },
                         m("k1", {})))
  end)
end)
