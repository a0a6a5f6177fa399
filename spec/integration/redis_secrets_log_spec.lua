-- No password of paygate.redis -- the master's, the Sentinels', right or
-- wrong -- ever shows in a process's log or in an error it returns: a
-- child `paygate exec` connects through a real Sentinel that requires a
-- password, to a master that requires another and to one that does not
-- know AUTH (a Sentinel older than 5.0.1, AUTH renamed away, a proxy:
-- Redis then answers "ERR unknown command 'AUTH', with args beginning
-- with: '<the password>'"), and its whole output is searched.
local servers = require "spec.support.servers"
local sentinel = require "spec.support.sentinel"
local proc = require "spec.support.proc"

local MPW, SPW = "mpw-Zq81xv", "spw-Kt55ab"           -- the right ones
local BAD_M, BAD_S = "bad-Mq27tr", "bad-Sx93qw"       -- wrong ones

local function write(path, text)
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
end

describe("paygate.redis passwords", function()
  teardown(function()
    servers.stop_all()
  end)

  it("are in no log line and no error message", function()
    if not (servers.redis and servers.sh("command -v redis-sentinel"
                                         .. " >/dev/null 2>&1")) then
      pending("redis-sentinel not installed")
      return
    end
    local good = servers.redis({ requirepass = MPW })
    local noauth = servers.redis({ rename = { AUTH = "" } })
    local dir = servers.mktemp()
    local sp = sentinel.free_port_except({ [good.port] = true,
                                           [noauth.port] = true })
    write(dir .. "/sentinel.conf", table.concat({
      "port " .. sp, "bind 127.0.0.1", "dir " .. dir,
      "requirepass " .. SPW,
      "sentinel monitor other 127.0.0.1 " .. good.port .. " 1",
      "sentinel auth-pass other " .. MPW,
      "sentinel monitor mymaster 127.0.0.1 " .. noauth.port .. " 1", "" },
      "\n"))
    assert(servers.sh("redis-sentinel " .. dir .. "/sentinel.conf"
      .. " --daemonize yes --pidfile " .. dir .. "/s.pid --logfile " .. dir
      .. "/s.log"))
    finally(function()
      servers.sh("kill $(cat " .. dir .. "/s.pid) 2>/dev/null; rm -rf "
                 .. dir)
    end)
    servers.wait_for(function()
      return servers.read_cmd("REDISCLI_AUTH=" .. SPW .. " redis-cli -p "
        .. sp .. " PING 2>/dev/null"):match("PONG")
    end, 10, "the Sentinel")
    local s = "127.0.0.1:" .. sp
    write(dir .. "/script.lua", ([[
      local redis = require "paygate.redis"
      local function try(what, url, opts)
        local c, err = redis.connect(url, opts)
        print(what .. ": " .. (c and "connected" or tostring(err)))
        if c then
          print(what .. ": SET " .. tostring(c:call("SET", "k", "v")))
          c:close()
        end
      end
      try("good", "redis-sentinel://MPW@SADDR/other",
          { sentinel_password = "SPW" })
      try("bad sentinel password", "redis-sentinel://MPW@SADDR/other",
          { sentinel_password = "BAD_S" })
      try("bad master password", "redis-sentinel://BAD_M@SADDR/other",
          { sentinel_password = "SPW" })
      try("AUTH unknown, via Sentinel",
          "redis-sentinel://MPW@SADDR/mymaster",
          { sentinel_password = "SPW" })
      try("AUTH unknown", "redis://:MPW@127.0.0.1:NOAUTH")
      try("AUTH unknown, as an option", "redis://127.0.0.1:NOAUTH",
          { password = "BAD_M" })
      print("done")
    ]]):gsub("[A-Z][A-Z_]+", { MPW = MPW, SPW = SPW, BAD_S = BAD_S,
                               BAD_M = BAD_M, SADDR = s,
                               NOAUTH = tostring(noauth.port) }))
    local p = proc.spawn({ PAYGATE_BIN, "exec", dir .. "/script.lua" },
                         { log = dir .. "/out", watchdog = true })
    local code = p:wait(30)
    if code == nil then
      p:kill(proc.SIGKILL)
      p:wait(2)
    end
    local out = proc.read(dir .. "/out") or ""
    assert.equal(0, code, out)
    assert.truthy(out:find("good: SET OK", 1, true), out)
    -- every failure was reported, and logged
    for _, what in ipairs({ "bad sentinel password", "bad master password",
                            "AUTH unknown, via Sentinel", "AUTH unknown",
                            "AUTH unknown, as an option" }) do
      assert.truthy(out:find(what .. ": config: ", 1, true)
                    or out:find(what .. ": unavailable: ", 1, true), out)
    end
    -- every Sentinel refused its password: not retryable (was
    -- "unavailable", retryable: a retry loop would never end)
    assert.truthy(out:find("bad sentinel password: config: redis-sentinel:"
                           .. " no Sentinel named the master other", 1, true),
                  out)
    assert.truthy(out:find("connection setup failed: AUTH refused",
                           1, true), out)
    assert.truthy(out:find("ERR unknown command 'AUTH'", 1, true), out)
    for _, pw in ipairs({ MPW, SPW, BAD_M, BAD_S }) do
      assert.is_nil(out:find(pw, 1, true), pw .. " in the output:\n" .. out)
    end
  end)
end)
