-- wx:upload_media against the simulator: a multipart/form-data upload
-- whose signature covers the meta JSON only. The simulator checks that
-- signature, the file's SHA-256 against the meta's, the extension, and
-- refuses a body that is not well-formed multipart.
local testing = require "paygate.testing"
local crypto = require "paygate.crypto"
local json = require "cjson.safe"

describe("wx:upload_media", function()
  local sim, wx
  local png = "\137PNG\r\n\26\n" .. crypto.random_bytes(3000)

  setup(function()
    sim = testing.simulator()
    wx = sim:client()
  end)
  teardown(function()
    if wx then wx:stop() end
    testing.stop_all()
  end)

  it("uploads an image and gets its media_id", function()
    local data, meta = assert(wx:upload_media("receipt.png", png))
    assert.matches("^V%x+$", data.media_id)
    assert.equal(200, meta.http_status)
    -- a video goes to its own path
    data = assert(wx:upload_media("clip.mp4", ("v"):rep(5000),
                                  { path = "/v3/merchant/media/video_upload" }))
    assert.is_string(data.media_id)
  end)

  -- The simulator takes a file of up to 5 MiB; in its multipart that is
  -- more than the runtime's default limits.body_bytes (5 MiB), so such an
  -- upload got the runtime's raw 413 before the simulator saw it. The
  -- kit's simulator admits it, and one byte more reaches the simulator's
  -- own size check.
  it("takes a file at the simulator's 5 MiB limit; one byte more is its "
     .. "PARAM_ERROR", function()
    local LIMIT = 5 * 1024 * 1024
    local big = "\137PNG\r\n\26\n" .. ("x"):rep(LIMIT - 8)
    local data, err = wx:upload_media("big.png", big)
    assert(data, tostring(err))
    assert.matches("^V%x+$", data.media_id)
    data, err = wx:upload_media("big.png", big .. "x")
    assert.is_nil(data)
    assert.equal("param_error", err.kind, tostring(err))
    assert.equal(400, err.status)
    assert.truthy(tostring(err):find("file", 1, true), tostring(err))
  end)

  it("refuses bad arguments before sending anything", function()
    for _, case in ipairs({
      { "a/b.png", png, "filename" }, { 'x".png', png, "filename" },
      { "noext", png, "filename" }, { "a.png", "", "content" },
      { "a.png", png, "path", { path = "/v3/other" } } }) do
      local data, err = wx:upload_media(case[1], case[2], case[4])
      assert.is_nil(data)
      assert.equal("invalid_params", err.kind)
      assert.equal(case[3], err.field)
    end
  end)

  local function raw(body, signed, boundary)
    return wx:request("POST", "/v3/merchant/media/upload", body, {
      signed_body = signed, headers = { ["Content-Type"] =
        "multipart/form-data; boundary=" .. (boundary or "xyz") } })
  end

  local function multipart(meta, file, name)
    return "--xyz\r\nContent-Disposition: form-data; name=\"meta\"\r\n"
      .. "Content-Type: application/json\r\n\r\n" .. meta .. "\r\n--xyz\r\n"
      .. "Content-Disposition: form-data; name=\"file\"; filename=\""
      .. (name or "a.png") .. "\"\r\nContent-Type: image/png\r\n\r\n" .. file
      .. "\r\n--xyz--\r\n"
  end

  it("is checked by the simulator: signature over meta, digest, form",
     function()
    local meta = json.encode({ filename = "a.png",
      sha256 = crypto.hex(crypto.digest("sha256", png)) })
    -- right: signed over meta
    assert(raw(multipart(meta, png), meta))
    -- signed over the whole body, as a JSON call would be: refused
    local _, err = raw(multipart(meta, png))
    assert.equal("sign_error", err.kind)
    -- a file that is not the one meta describes
    _, err = raw(multipart(meta, png .. "x"), meta)
    assert.equal("param_error", err.kind)
    assert.matches("sha256", err.message, 1, true)
    -- not well-formed: no closing boundary, no meta part, another boundary
    local body = multipart(meta, png)
    for _, bad in ipairs({ body:sub(1, -10), body:gsub('name="meta"',
                           'name="other"'), body }) do
      _, err = raw(bad, meta, bad == body and "other" or nil)
      assert.equal("param_error", err.kind, tostring(err))
    end
  end)
end)

describe("the simulator's multipart reader", function()
  package.path = "examples/simulator/?.lua;" .. package.path
  local api = require "sim.api"

  local function read(body, ct)
    return api.multipart({ headers = { ["content-type"] = ct
      or "multipart/form-data; boundary=b" }, body = body })
  end

  it("reads parts, and never raises on hostile bytes", function()
    local parts = assert(read("--b\r\nContent-Disposition: form-data; "
      .. "name=\"meta\"\r\n\r\n{}\r\n--b\r\nContent-Disposition: form-data; "
      .. "name=\"file\"; filename=\"a.png\"\r\n\r\nPNG\r\n--b--\r\n"))
    assert.equal("{}", parts.meta.data)
    assert.equal("PNG", parts.file.data)
    assert.equal("a.png", parts.file.filename)
    for _, bad in ipairs({ "", "--b", "--b\r\n", "--c\r\n\r\nx\r\n--c--",
                           ("--b\r\nContent-Disposition: form-data; name=\"x\""
                            .. "\r\n\r\n1\r\n"):rep(2) .. "--b--" }) do
      assert.is_nil(read(bad))
    end
    assert.is_nil(read("--b--", "application/json"))
    for _ = 1, 3000 do
      local body = "--b\r\n" .. crypto.random_bytes(math.random(0, 300))
                   .. (math.random() < 0.5 and "\r\n--b--" or "")
      local ok, err = pcall(read, body)
      assert(ok, err)
    end
  end)
end)
