-- bench/gateway_wrk.lua: the wrk script of bench/gateway. POSTs the
-- notifications of a file made by `bench/gateway.lua gen` to PATH, each
-- at most once (one file line each: ts TAB nonce TAB signature TAB serial
-- TAB body). The file must hold more than the run can send: once it is
-- used up, connections send a cheap GET /bench-pad instead (a 404), which
-- bench/gateway reports as "pool exhausted". wrk's own duration bounds
-- the run (its threads cannot end it early), so the rate is the
-- acknowledged notifications over that duration.
--   wrk -t1 -c50 -d5s --latency -s bench/gateway_wrk.lua URL -- FILE PATH
-- done() prints "bench: ok=N pads=N bad=N" (2xx, pads, other statuses).
local reqs = {}
local i = 0
ok, pads, bad = 0, 0, 0               -- globals: done() reads them
local pad
local threads = {}

function setup(thread)
  threads[#threads + 1] = thread
end

function init(args)
  local path = args[2] or "/notify"
  for line in io.lines(args[1]) do
    local ts, nonce, sig, serial, body =
      line:match("^([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$")
    reqs[#reqs + 1] = wrk.format("POST", path, {
      ["Content-Type"] = "application/json",
      ["Wechatpay-Timestamp"] = ts, ["Wechatpay-Nonce"] = nonce,
      ["Wechatpay-Signature"] = sig, ["Wechatpay-Serial"] = serial,
      ["Wechatpay-Signature-Type"] = "WECHATPAY2-SHA256-RSA2048",
    }, body)
  end
  pad = wrk.format("GET", "/bench-pad")
end

function request()
  i = i + 1
  if i > #reqs then
    return pad
  end
  return reqs[i]
end

-- The receivers never answer a notification with 404: that is a pad's.
function response(status, headers, body)
  if status == 404 then
    pads = pads + 1
  elseif status >= 200 and status < 300 then
    ok = ok + 1
  else
    bad = bad + 1
  end
end

function done(summary, latency, requests)
  local o, p, b = 0, 0, 0
  for _, t in ipairs(threads) do
    o, p, b = o + t:get("ok"), p + t:get("pads"), b + t:get("bad")
  end
  io.write(("bench: ok=%d pads=%d bad=%d\n"):format(o, p, b))
end
