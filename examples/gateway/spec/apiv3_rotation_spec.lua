-- examples/gateway/spec/apiv3_rotation_spec.lua: an APIv3 key rotation
-- half done is seen by the running gateway. The gateway given the new key
-- as its current one and the old one as previous decrypts everything
-- WeChat sends while WeChat still encrypts with the old key; was: nothing
-- said so (paygate doctor alone warned), the operator took the previous
-- key out a day later and every notification failed (decrypt_failed,
-- WeChat retrying for a day). Now each notification decrypted only with a
-- previous key is counted (paygate_wechatpay_previous_apiv3_key_used_total)
-- and a warning said once an hour per merchant; and a reload that changes
-- a merchant's APIv3 keys says so (was: "no merchant changed").
local json = require "paygate.json"
local S = dofile("examples/gateway/spec/support.lua")

describe("gateway: an APIv3 key rotation half done", function()
  local env, mchid, new_key, new_file

  setup(function()
    env = S.start{ workers = 2 }
    mchid = env.m.mchid
    new_key = S.testing.apiv3_key()
    new_file = env.dir .. "/apiv3.new.key"
    S.write(new_file, new_key .. "\n")
  end)
  teardown(S.stop)

  local function count(source)
    local res = env.gw:admin_get("/metrics")
    local text = res and res.status == 200 and res.body or ""
    return tonumber(text:match(
      '\npaygate_wechatpay_previous_apiv3_key_used_total{mchid="' .. mchid
      .. '",source="' .. source .. '"} (%d+)\n'))
  end

  local function wait_count(source, n)
    S.wait_until(function() return count(source) == n end, 10,
                 "the " .. source .. " count at " .. n)
  end

  -- the lines logged after mark whose message has `what`, decoded
  local function lines(mark, what)
    local out = {}
    for line in env.gw:logs():sub(mark + 1):gmatch("[^\n]+") do
      local e = line:find(what, 1, true) and json.decode(line)
      if e then out[#out + 1] = e end
    end
    return out
  end
  local WARNED = "decrypted only with a previous APIv3 key"

  -- a payment paid by a notification the simulator's merchant key
  -- encrypts (WeChat's), applied
  local function paid()
    local p = env:create().payment
    local res = env:post_paid(p)
    assert.equal(204, res.status, res.body)
    env:wait_state(p.id, "paid")
  end

  local function reload(edit)
    local mark = #env.gw:logs()
    S.reload_with(env, edit)
    local got
    S.wait_until(function()
      got = lines(mark, '"gateway: reload:')
      return #got > 0
    end, 10, "a gateway: reload: line")
    return got, mark
  end

  it("counts nothing and says nothing with the keys the right way round",
     function()
    -- at 0 from the start: an alert on its increase fires on the first
    wait_count("notification", 0)
    wait_count("certificates", 0)
    paid()
    assert.equal(0, count("notification"))
    assert.same({}, lines(0, WARNED))
  end)

  it("counts each notification decrypted only with the previous key, says"
     .. " it once, and the reload names the keys changed", function()
    -- the new key written on this side first, the old one kept as
    -- previous: WeChat (the simulator) still encrypts with the old one
    local got, mark = reload("local m = c.merchants[1]\n"
      .. "m.previous_apiv3_key_files = { m.apiv3_key_file }\n"
      .. "m.apiv3_key_file = '" .. new_file .. "'")
    paid()
    wait_count("notification", 1)
    local warned = lines(mark, WARNED)
    assert.equal(1, #warned, json.encode(warned))
    local w = warned[1]
    assert.equal("warn", w.level)
    assert.equal(mchid, w.mchid)
    assert.equal("merchants[1].previous_apiv3_key_files[1]", w.key)
    assert.matches("(merchants[1].previous_apiv3_key_files[1]), not with "
                   .. "the current one (merchants[1].apiv3_key_file): "
                   .. "WeChat still encrypts with the old key", w.msg, 1, true)
    assert.matches("set the new one in the merchant platform (API security)"
                   .. " before removing the previous one", w.msg, 1, true)

    -- the second: counted, not said again (once an hour per merchant)
    paid()
    wait_count("notification", 2)
    assert.equal(1, #lines(mark, WARNED))

    -- the reload said which keys changed, by their config keys
    assert.equal(1, #got, json.encode(got))
    assert.equal("gateway: reload: merchant " .. mchid .. ": APIv3 keys"
      .. " changed: a new current key (merchants[1].apiv3_key_file), the"
      .. " one before it now a previous key; previous keys 0 -> 1"
      .. " (merchants[1].previous_apiv3_key_files)", got[1].msg)
    assert.same({ "apiv3_keys", true, 0, 1 },
                { got[1].change, got[1].new_current, got[1].previous_from,
                  got[1].previous_to })

    -- no key in any line
    local all = env.gw:logs()
    assert.is_nil(all:find(new_key, 1, true))
    assert.is_nil(all:find(env.m.apiv3_key, 1, true))

    -- the config as first written: said too (the previous key gone)
    got = reload("")
    assert.equal(1, #got, json.encode(got))
    assert.equal("gateway: reload: merchant " .. mchid .. ": APIv3 keys"
      .. " changed: a new current key (merchants[1].apiv3_key_file);"
      .. " previous keys 1 -> 0 (merchants[1].previous_apiv3_key_files)",
      got[1].msg)
    -- the same again: nothing changed
    got = reload("")
    assert.equal("gateway: reload: no merchant changed (1: " .. mchid .. ")",
                 got[1].msg)
    -- WeChat's key current again: nothing more counted
    paid()
    assert.equal(2, count("notification"))
  end)
end)
