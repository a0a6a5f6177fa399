-- Bills: the streaming writer (lua/paygate/wechatpay/bill.lua), the CSV
-- reader, and wx:download_bill against spec/support/wxapi_server --
-- plain and gzip files, a wrong SHA-1, a damaged stream, and a gzip bill
-- of 210 MiB decompressed downloaded while Lua memory and the process's
-- peak RSS stay bounded.
local core = require "paygate.core"
local crypto = require "paygate.crypto"
local zlib = require "paygate.zlib"
local bill = require "paygate.wechatpay.bill"
local wxapi = require "support.wxapi"
local server = require "support.server"
local servers = require "spec.support.servers"

local function sha1(s) return crypto.hex(crypto.digest("sha1", s)) end

local function read(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s
end

local function write(path, s)
  local f = assert(io.open(path, "wb"))
  f:write(s)
  f:close()
end

local function exists(path) return read(path) ~= nil end

-- how many of this process's file descriptors are open on path
local ffi = require "ffi"
pcall(ffi.cdef, "long readlink(const char *path, char *buf, size_t size);")
local function fds_on(path)
  local n, buf = 0, ffi.new("char[4096]")
  for _, fd in ipairs(core.listdir("/proc/self/fd") or {}) do
    local len = ffi.C.readlink("/proc/self/fd/" .. fd, buf, 4095)
    if len > 0 and ffi.string(buf, len) == path then n = n + 1 end
  end
  return n
end

-- names in dir (no dot files)
local function ls(dir) return assert(core.listdir(dir)) end

local HEADER = "交易时间,公众账号ID,商户号,特约商户号,设备号,微信订单号,"
  .. "商户订单号,用户标识,交易类型,交易状态,付款银行,货币种类,应结订单金额,"
  .. "代金券金额,微信退款单号,商户退款单号,退款金额,充值券退款金额,退款类型,"
  .. "退款状态,商品名称,商户数据包,手续费,费率,订单金额,申请退款金额,费率备注"
local ROW = "`2026-11-29 10:34:56,`wx2421b1c4370ec43b,`1900000001,`0,`,"
  .. "`4200000001202611290000000001,`ORDER_0001,`oUpF8uMuAJO_M2pxb1Q9zNjWeS6o,"
  .. "`JSAPI,`SUCCESS,`OTHERS,`CNY,`0.01,`0.00,`0,`0,`0.00,`0.00,`,`,"
  .. "`Image形象店,QQ公仔,`,`0.00000,`0.60%,`0.01,`0.00,`"
local SUMMARY = "总交易单数,应结订单总金额,退款总金额,充值券退款总金额,"
  .. "手续费总金额,订单总金额,申请退款总金额"
local SUMROW = "`1,`0.01,`0.00,`0.00,`0.00000,`0.01,`0.00"
local CSV = "\239\187\191" .. HEADER .. "\r\n" .. ROW .. "\r\n" .. SUMMARY
            .. "\r\n" .. SUMROW .. "\r\n"

describe("wechatpay bill", function()
  local dir

  setup(function() dir = server.tmpdir() end)
  teardown(function() os.execute("rm -rf " .. dir) end)

  describe("writer", function()
    it("writes the bill 0600 under umask 022", function()
      -- was: io.open's 0644 less the umask: a trade bill (each payer's
      -- openid, what was bought, attach) kept (keep_bill, a refused
      -- bill's NAME.refused) readable by every local user
      local mode = servers.file_mode
      local path = dir .. "/w0.csv"
      local ok, w, werr = servers.under_umask(18, bill.writer, path)  -- 022
      assert(ok, w)
      assert(w, werr)
      assert.equal("600", mode(w.tmp))
      assert.truthy(w:feed(CSV))
      assert(w:finish(sha1(CSV)))
      assert.equal("600", mode(path))
      os.remove(path)
    end)

    it("refuses a wrong SHA-1 and removes the partial file", function()
      local path = dir .. "/w1.csv"
      local w = assert(bill.writer(path))
      assert.truthy(w:feed(CSV))
      local info, err = w:finish(sha1(CSV .. "x"))
      assert.is_nil(info)
      assert.equal("hash_mismatch", err.kind)
      assert.equal(sha1(CSV), err.got)
      assert.is_false(exists(path))
      for _, n in ipairs(ls(dir)) do
        assert.falsy(n:find("^w1%.csv"), n)
      end
    end)

    it("a damaged gzip stream is malformed, nothing left behind",
       function()
      local path = dir .. "/w2.csv"
      local gz = zlib.gzip(CSV)
      gz = gz:sub(1, 12) .. ("\255"):rep(20) .. gz:sub(33)
      local w = assert(bill.writer(path))
      local ok, err = w:feed(gz)
      if ok then
        local info
        info, err = w:finish(sha1(CSV))
        assert.is_nil(info)
      end
      assert.equal("malformed", err.kind)
      w:abort()
      assert.is_false(exists(path))
      assert.same({}, ls(dir))
    end)

    it("a truncated gzip stream is malformed", function()
      local path = dir .. "/w3.csv"
      local gz = zlib.gzip(CSV)
      local w = assert(bill.writer(path))
      assert.truthy(w:feed(gz:sub(1, #gz - 10)))
      local info, err = w:finish(sha1(CSV))
      assert.is_nil(info)
      assert.equal("malformed", err.kind)
      assert.same({}, ls(dir))
    end)

    it("stops at max_bytes (a zip bomb cannot fill the disk)", function()
      local path = dir .. "/w4.csv"
      local gz = zlib.gzip(("0"):rep(4 * 1024 * 1024))
      local w = assert(bill.writer(path, { max_bytes = 1024 * 1024 }))
      local ok, err = w:feed(gz)
      assert.is_nil(ok)
      assert.equal("too_large", err.kind)
      local info, err2 = w:finish(("0"):rep(40))
      assert.is_nil(info)
      assert.equal("too_large", err2.kind)
      assert.same({}, ls(dir))
    end)

    it("takes the bytes in any split, one byte at a time included, "
       .. "gzip or not", function()
      for _, gzip in ipairs({ false, true }) do
        local path = dir .. "/w5.csv"
        local data = gzip and zlib.gzip(CSV) or CSV
        local w = assert(bill.writer(path))
        for i = 1, #data do assert.truthy(w:feed(data:sub(i, i))) end
        local info = assert(w:finish(sha1(CSV):upper()))
        assert.equal(gzip, info.gzip)
        assert.equal(#CSV, info.bytes)
        assert.equal(#data, info.received)
        assert.equal(CSV, read(path))
        os.remove(path)
      end
    end)

    it("an empty body is an empty file with SHA-1 of nothing", function()
      local path = dir .. "/w6.csv"
      local w = assert(bill.writer(path))
      assert.truthy(w:finish(sha1("")))
      assert.equal("", read(path))
      os.remove(path)
    end)
  end)

  describe("rows", function()
    it("reads records and the summary by header name", function()
      local path = dir .. "/r.csv"
      write(path, CSV)
      local got = {}
      for kind, row in bill.rows(path) do got[#got + 1] = { kind, row } end
      assert.equal(2, #got)
      assert.equal("record", got[1][1])
      assert.equal("ORDER_0001", got[1][2]["商户订单号"])
      assert.equal("2026-11-29 10:34:56", got[1][2]["交易时间"])
      assert.equal("Image形象店,QQ公仔", got[1][2]["商品名称"])
      assert.equal("0.60%", got[1][2]["费率"])
      assert.equal(27, #got[1][2])
      assert.equal("summary", got[2][1])
      assert.equal("1", got[2][2]["总交易单数"])
      assert.equal("0.01", got[2][2]["订单总金额"])
      os.remove(path)
    end)

    it("a reader that stops early closes the file with the close it is"
       .. " given (not left to the GC)", function()
      local path = dir .. "/early.csv"
      write(path, CSV)
      collectgarbage("stop")
      finally(function() collectgarbage("restart") end)
      local it, close = bill.rows(path)
      assert.equal(1, fds_on(path))
      assert.equal("record", (it()))
      close()
      assert.equal(0, fds_on(path))
      close()                                     -- twice: nothing
      assert.is_nil(it())                         -- and the reading over
      -- read to the end, it closes itself, as before
      local n = 0
      for _ in bill.rows(path) do n = n + 1 end
      assert.equal(2, n)
      assert.equal(0, fds_on(path))
      os.remove(path)
    end)
  end)

  describe("wx:download_bill", function()
    local stub, wx

    setup(function()
      stub = wxapi.start()
      wx = stub:client()
    end)
    teardown(function()
      wx:close()
      stub:stop()
    end)
    before_each(function() stub:reset() end)

    local function bill_for(token, hash)
      return { download_url = "https://api.mch.weixin.qq.com/v3/"
                 .. "billdownload/file?token=" .. token .. "&tartype=gzip",
               hash_type = "SHA1", hash_value = hash }
    end

    it("downloads a plain bill (a signed GET of the download_url's path, "
       .. "the answer not signed)", function()
      local src = dir .. "/plain.src"
      write(src, CSV)
      stub:bill("tok-plain", src)
      local path = dir .. "/plain.csv"
      local info, meta = wx:download_bill(bill_for("tok-plain", sha1(CSV)),
                                          path)
      assert.is_table(info, tostring(meta))
      assert.same({ path = path, bytes = #CSV, received = #CSV,
                    gzip = false, sha1 = sha1(CSV) }, info)
      assert.equal(200, meta.http_status)
      assert.equal(CSV, read(path))
      local r = stub:last()
      assert.equal("GET", r.method)
      assert.equal("/v3/billdownload/file?token=tok-plain&tartype=gzip",
                   r.target)
      assert.equal("*/*", r.headers.accept)
      os.remove(path)
    end)

    it("gunzips a gzip bill and checks the SHA-1 of the content",
       function()
      local src = dir .. "/gz.src"
      write(src, zlib.gzip(CSV))
      stub:bill("tok-gz", src)
      local path = dir .. "/gz.csv"
      local info = assert(wx:download_bill(bill_for("tok-gz", sha1(CSV)),
                                           path))
      assert.is_true(info.gzip)
      assert.equal(CSV, read(path))
      os.remove(path)
    end)

    it("a wrong SHA-1 is hash_mismatch and leaves no file", function()
      local src = dir .. "/bad.src"
      write(src, zlib.gzip(CSV))
      stub:bill("tok-bad", src)
      local path = dir .. "/bad.csv"
      local info, err = wx:download_bill(bill_for("tok-bad",
                                                  sha1("other")), path)
      assert.is_nil(info)
      assert.equal("hash_mismatch", err.kind)
      assert.is_false(exists(path))
      for _, n in ipairs(ls(dir)) do assert.falsy(n:find("^bad%.csv"), n) end
      os.remove(src)
    end)

    it("an expired token (404) is an error and leaves no file", function()
      local path = dir .. "/gone.csv"
      local info, err = wx:download_bill(bill_for("tok-none", sha1(CSV)),
                                         path)
      assert.is_nil(info)
      assert.equal("not_found", err.kind)
      assert.equal("RESOURCE_NOT_EXISTS", err.code)
      for _, n in ipairs(ls(dir)) do assert.falsy(n:find("^gone%.csv"), n) end
    end)

    it("a 500 before the file is retried; the error body never reaches "
       .. "the file", function()
      local src = dir .. "/retry.src"
      write(src, zlib.gzip(CSV))
      stub:bill("tok-retry", src)
      stub:can("GET", "/v3/billdownload/file", 500,
               { code = "SYSTEM_ERROR", message = "busy" }, { times = 1 })
      local path = dir .. "/retry.csv"
      local info, err = wx:download_bill(bill_for("tok-retry", sha1(CSV)),
                                         path)
      assert.is_table(info, tostring(err))
      assert.equal(CSV, read(path))
      assert.equal(2, select(2, stub:last()))
      os.remove(path)
      os.remove(src)
    end)

    it("streams a 210 MiB (decompressed) gzip bill to disk with Lua "
       .. "memory and peak RSS bounded", function()
      -- the bill: 210 MiB of CSV lines, gzip'ed by gzip(1) as it is made
      local src = dir .. "/big.gz"
      local LINE = "`2026-11-29 %02d:%02d:%02d,`wx2421b1c4370ec43b,"
        .. "`1900000001,`0,`,`42000000%020d,`PG%022d,"
        .. "`oUpF8uMuAJO_M2pxb1Q9zNjWeS6o,`JSAPI,`SUCCESS,`OTHERS,`CNY,"
        .. "`%d.%02d,`0.00,`0,`0,`0.00,`0.00,`,`,`商品,`,`0.00000,`0.60%%,"
        .. "`%d.%02d,`0.00,`\r\n"
      local d = crypto.digest_new("sha1")
      local gz = assert(io.popen("gzip -1 > " .. src, "w"))
      local total, i, fmt = 0, 0, string.format
      while total < 210 * 1024 * 1024 do
        local parts = {}
        for j = 1, 4096 do
          i = i + 1
          parts[j] = fmt(LINE, i % 24, i % 60, (i * 7) % 60, i, i,
                         i % 1000, i % 100, i % 1000, i % 100)
        end
        local block = table.concat(parts)
        d:update(block)
        gz:write(block)
        total = total + #block
      end
      gz:close()
      local want = crypto.hex(d:final())
      stub:bill("tok-big", src)
      collectgarbage()
      collectgarbage()
      local base_kb = collectgarbage("count")
      -- reset the peak RSS (VmHWM) so it measures the download alone
      local cr = io.open("/proc/self/clear_refs", "w")
      local hwm_ok = cr and cr:write("5") and cr:close()
      local function status(key)
        local s = read("/proc/self/status") or ""
        return tonumber(s:match(key .. ":%s*(%d+)"))
      end
      local rss0 = status("VmRSS")
      local peak_kb, running = base_kb, true
      local sampler = core.spawn(function()
        while running do
          local kb = collectgarbage("count")
          if kb > peak_kb then peak_kb = kb end
          core.sleep(0.002)
        end
      end)
      local path = dir .. "/big.csv"
      local info, err = wx:download_bill(bill_for("tok-big", want), path,
                                         { deadline = 120, timeout = 120 })
      running = false
      sampler:wait()
      assert.is_table(info, tostring(err))
      assert.equal(total, info.bytes)
      assert.is_true(info.gzip)
      assert.equal(want, info.sha1)
      -- the file is the bill; its size is what was hashed
      local f = assert(io.open(path, "rb"))
      assert.equal(total, f:seek("end"))
      f:close()
      -- bounded: Lua held at most a few pieces at a time, never the bill
      -- (210 MiB) nor the compressed download (14 MiB)
      assert.is_true(peak_kb - base_kb < 24 * 1024,
        ("Lua memory grew by %.0f KiB"):format(peak_kb - base_kb))
      if hwm_ok then
        local hwm = status("VmHWM")
        assert.is_true(hwm - rss0 < 64 * 1024,
          ("peak RSS grew by %d KiB"):format(hwm - rss0))
      end
      os.remove(path)
      os.remove(src)
    end)
  end)
end)
