-- bench/wechatpay_wrk.lua: the wrk script of bench/wechatpay. POSTs the
-- notifications of a file made by `bench/wechatpay.lua gen` to /notify,
-- cycling through them (one file line each: ts TAB nonce TAB signature TAB
-- serial TAB body).   wrk ... -s bench/wechatpay_wrk.lua URL -- FILE
local reqs = {}
local i = 0

function init(args)
  for line in io.lines(args[1]) do
    local ts, nonce, sig, serial, body =
      line:match("^([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$")
    reqs[#reqs + 1] = wrk.format("POST", "/notify", {
      ["Content-Type"] = "application/json",
      ["Wechatpay-Timestamp"] = ts, ["Wechatpay-Nonce"] = nonce,
      ["Wechatpay-Signature"] = sig, ["Wechatpay-Serial"] = serial,
      ["Wechatpay-Signature-Type"] = "WECHATPAY2-SHA256-RSA2048",
    }, body)
  end
end

function request()
  i = i % #reqs + 1
  return reqs[i]
end
