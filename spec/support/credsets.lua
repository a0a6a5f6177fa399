-- spec/support/credsets.lua: merchant credential sets in a real etcd
-- (support.etcd, TLS + auth) for the specs of paygate.credentials:
-- key pairs made with openssl, publishable set directories,
-- `paygate etcd publish` run as a command, and sources reading them back.
--
--   local credsets = require "support.credsets"
--   local creds = credsets.start()      -- in setup(): see start() below
--   local code, out = creds:publish(creds.env.a)   -- exit status, output
--   local src = creds:source(dir .. "/cache1")     -- a credentials source
--   local wx = creds:client_for(src)    -- a WeChat Pay client bound to it
--   etcdsrv.stop_all()                  -- in teardown()
local crypto = require "paygate.crypto"
local etcd = require "paygate.etcd"
local credentials = require "paygate.credentials"
local wechatpay = require "paygate.wechatpay"
local etcdsrv = require "support.etcd"
local servers = require "support.servers"

local _M = {}

_M.MCHID = "1900000001"
_M.PREFIX = "/paygate/merchants/" .. _M.MCHID .. "/"
_M.APIV3 = "0123456789abcdef0123456789ABCDEF"
_M.APIV3_B = "fedcba9876543210FEDCBA9876543210"

--- syntax: sh(cmd) -- runs cmd quietly; fails the spec if it fails
function _M.sh(cmd)
  assert(servers.sh(cmd .. " >/dev/null 2>&1"), "command failed: " .. cmd)
end
local sh = _M.sh

--- syntax: write(path, s), s = read(path) -- whole files (each raises
-- on failure: a missing file is an error, not "")
_M.write = require("paygate.testing.proc").write

function _M.read(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("*a")
  f:close()
  return s
end

--- syntax: merchant_pair(dir, name, serial)
-- A merchant key and certificate (serial in hex, CN the MCHID) in
-- dir/NAME.key and dir/NAME.pem.
function _M.merchant_pair(dir, name, serial)
  sh(("openssl req -x509 -newkey rsa:2048 -nodes -keyout %s/%s.key -out "
      .. "%s/%s.pem -days 2 -set_serial 0x%s -subj /CN=%s"):format(dir, name,
      dir, name, serial, _M.MCHID))
end

--- syntax: d = set_dir(dir, name, kname, cname, apiv3)
-- A publishable directory dir/NAME: the key of pair kname, the
-- certificate of pair cname, the APIv3 key apiv3.
function _M.set_dir(dir, name, kname, cname, apiv3)
  local d = dir .. "/" .. name
  sh("mkdir -p " .. d)
  _M.write(d .. "/apiclient_key.pem", _M.read(dir .. "/" .. kname .. ".key"))
  _M.write(d .. "/apiclient_cert.pem", _M.read(dir .. "/" .. cname .. ".pem"))
  _M.write(d .. "/apiv3_key", apiv3)
  return d
end

local Creds = {}
Creds.__index = Creds

--- syntax: creds = credsets.start()
-- An etcd cluster with TLS and auth (creds.c, in creds.dir), a KEK in
-- creds.kek_file, the pairs a (serial AAAA01), b (BBBB02) and p (CCCC03,
-- a platform certificate), the sets creds.env.a (pair a, APIV3) and
-- creds.env.b (pair b, APIV3_B), and an etcd client creds.cli.
function _M.start()
  local c = etcdsrv.start{ tls = true, auth = true }
  local dir = c.dir
  local kek_file = dir .. "/kek"
  _M.write(kek_file, crypto.hex(crypto.random_bytes(32)) .. "\n")
  _M.merchant_pair(dir, "a", "AAAA01")
  _M.merchant_pair(dir, "b", "BBBB02")
  _M.merchant_pair(dir, "p", "CCCC03")
  local env = { a = _M.set_dir(dir, "set_a", "a", "a", _M.APIV3),
                b = _M.set_dir(dir, "set_b", "b", "b", _M.APIV3_B) }
  return setmetatable({ c = c, dir = dir, kek_file = kek_file, env = env,
                        cli = etcd.new(c:client_opts()) }, Creds)
end

--- syntax: code, out = creds:publish(d[, extra[, prefix]])
-- `paygate etcd publish --json` of the set directory d to prefix (PREFIX
-- unless given), extra (a string) appended to its arguments: its exit
-- status and its output.
function Creds:publish(d, extra, prefix)
  local o = self.c:client_opts()
  local cmd = ("PAYGATE_SPEC_ETCD_PW=%s %s etcd publish --prefix %s "
    .. "--dir %s --endpoints %s --user %s --password-env "
    .. "PAYGATE_SPEC_ETCD_PW --ca-file %s --cert %s --key %s "
    .. "--kek-file %s --json %s 2>&1; echo \"exit=$?\""):format(
    o.password, PAYGATE_BIN, prefix or _M.PREFIX, d,
    table.concat(o.endpoints, ","), o.user, o.ca_file, o.client_cert,
    o.client_key, self.kek_file, extra or "")
  local p = io.popen(cmd)
  local out = p:read("*a")
  p:close()
  local code = tonumber(out:match("exit=(%d+)%s*$"))
  return code, (out:gsub("exit=%d+%s*$", ""))
end

--- syntax: code, out = creds:show([kek_file])
-- `paygate etcd show` of PREFIX with the KEK in kek_file (the set's own
-- unless given): its exit status and its output.
function Creds:show(kek_file)
  local o = self.c:client_opts()
  local cmd = ("PAYGATE_SPEC_ETCD_PW=%s %s etcd show --prefix %s "
    .. "--endpoints %s --user %s --password-env PAYGATE_SPEC_ETCD_PW "
    .. "--ca-file %s --cert %s --key %s --kek-file %s 2>&1; "
    .. "echo \"exit=$?\""):format(o.password, PAYGATE_BIN, _M.PREFIX,
    table.concat(o.endpoints, ","), o.user, o.ca_file, o.client_cert,
    o.client_key, kek_file or self.kek_file)
  local p = io.popen(cmd)
  local out = p:read("*a")
  p:close()
  local code = tonumber(out:match("exit=(%d+)%s*$"))
  return code, (out:gsub("exit=%d+%s*$", ""))
end

--- syntax: code, out = creds:delete(key[, extra])
-- `paygate etcd delete` of key under PREFIX, extra (a string) appended
-- to its arguments: its exit status and its output.
function Creds:delete(key, extra)
  local o = self.c:client_opts()
  local cmd = ("PAYGATE_SPEC_ETCD_PW=%s %s etcd delete --prefix %s "
    .. "--endpoints %s --user %s --password-env PAYGATE_SPEC_ETCD_PW "
    .. "--ca-file %s --cert %s --key %s '%s' %s 2>&1; "
    .. "echo \"exit=$?\""):format(o.password, PAYGATE_BIN, _M.PREFIX,
    table.concat(o.endpoints, ","), o.user, o.ca_file, o.client_cert,
    o.client_key, key, extra or "")
  local p = io.popen(cmd)
  local out = p:read("*a")
  p:close()
  local code = tonumber(out:match("exit=(%d+)%s*$"))
  return code, (out:gsub("exit=%d+%s*$", ""))
end

--- syntax: src = creds:source(cache[, extra])
-- A paygate.credentials source for MCHID at PREFIX with its cache in the
-- directory cache (made here); extra's fields are added to its config.
function Creds:source(cache, extra)
  sh("mkdir -p " .. cache)
  -- load_timeout 10 (the default is 3): a loaded machine (ASan, specs
  -- run four at a time beside other work) kept etcd's first answer past
  -- 3 s; the specs of the timeout itself give their own
  local conf = { etcd = self.c:client_opts(), kek_file = self.kek_file,
                 cache_dir = cache, merchants = { [_M.MCHID] = _M.PREFIX },
                 load_timeout = 10 }
  for k, v in pairs(extra or {}) do conf[k] = v end
  return assert(credentials.new(conf))
end

--- syntax: wx = creds:client_for(src)
-- A WeChat Pay client on src's MCHID set (pointing nowhere, holding the
-- platform certificate p), bound to src so it swaps with it.
function Creds:client_for(src)
  local wx = assert(wechatpay.client(src:wechatpay_conf(_M.MCHID, {
    mchid = _M.MCHID, base_url = "http://127.0.0.1:1",
    download_certificates = false,
    platform_certificates = { self.dir .. "/p.pem" } })))
  src:bind(_M.MCHID, wx)
  return wx
end

return _M
