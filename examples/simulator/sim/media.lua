-- sim.media: POST /v3/merchant/media/upload and .../video_upload, the
-- multipart uploads. The signature covers the "meta" part (JSON {
-- filename, sha256 }) only (sim.api checks it); then the "file" part must
-- be there, its SHA-256 the meta's, its name's extension one WeChat takes
-- (JPG, BMP, PNG for images; AVI, WMV, MPEG, MP4, MOV, MKV, FLV, F4V, M4V,
-- RMVB for videos) and its size within the limit (5 MiB, 5 * 1024 * 1024
-- bytes, images and videos alike here: WeChat's documented "5M" taken as
-- MiB). The answer: { media_id }.
local crypto = require "paygate.crypto"
local json = require "sim.json"

local _M = {}

local IMAGE = { jpg = true, jpeg = true, bmp = true, png = true }
local VIDEO = { avi = true, wmv = true, mpeg = true, mp4 = true, mov = true,
                mkv = true, flv = true, f4v = true, m4v = true, rmvb = true }
local LIMIT = 5 * 1024 * 1024

local function upload(api, kinds, what)
  return function(_, c)
    local meta = json.decode(c.parts.meta.data)
    if type(meta) ~= "table" or type(meta.filename) ~= "string"
       or type(meta.sha256) ~= "string" then
      return nil, api.param_error("meta", "应为包含filename和sha256的JSON",
                                  api.shown(c.parts.meta.data, 64))
    end
    local ext = meta.filename:match("%.(%w+)$")
    if not ext or not kinds[ext:lower()] then
      return nil, api.param_error("meta.filename", "文件名后缀不是支持的"
        .. what .. "格式", api.shown(meta.filename, 64))
    end
    local file = c.parts.file
    if not file then
      return nil, api.param_error("file", "缺少文件", nil)
    end
    if #file.data == 0 or #file.data > LIMIT then
      return nil, api.param_error("file", "文件大小应在0到5M之间",
                                  tostring(#file.data))
    end
    if crypto.hex(crypto.digest("sha256", file.data)) ~= meta.sha256:lower()
    then
      return nil, api.param_error("meta.sha256", "文件摘要与文件内容不符",
                                  api.shown(meta.sha256, 64))
    end
    return 200, { media_id = "V" .. crypto.hex(crypto.random_bytes(24)) }
  end
end

function _M.routes(ctx)
  local api = ctx.api
  api.route("POST", "/v3/merchant/media/upload", "media_upload",
            upload(api, IMAGE, "图片"), { multipart = true })
  api.route("POST", "/v3/merchant/media/video_upload", "media_video_upload",
            upload(api, VIDEO, "视频"), { multipart = true })
end

return _M
