-- paygate.wechatpay.bill: bill files. The writer streams a download to a
-- file -- gunzipping it (paygate.zlib) when it is gzip, told by its magic
-- bytes rather than by what was asked for -- and checks the SHA-1 of the
-- decompressed content against the hash_value WeChat gave with the
-- download_url. The content never sits in memory whole: each chunk is
-- decompressed into pieces of at most PIECE bytes, each hashed and written,
-- then dropped. The file appears under its name only once the hash matched
-- (written as NAME.part-XXXX, then renamed); on any failure the partial
-- file is removed. The file is 0600 whatever the umask: a trade bill names
-- each payer (openid).
--
-- File writes are plain blocking write(2)s of at most a piece
-- (they land in the page cache); paygate has no asynchronous file API yet.
--
-- rows(path) reads a downloaded CSV bill: an optional UTF-8 BOM, a header
-- line, one line per record with every field prefixed by a backtick, then
-- a summary header and summary row(s); CRLF line ends.

local core = require "paygate.core"
local crypto = require "paygate.crypto"
local zlib = require "paygate.zlib"

local type, setmetatable, tostring, os_remove, os_rename, io_open =
      type, setmetatable, tostring, os.remove, os.rename, io.open
local byte, sub, find, lower = string.byte, string.sub, string.find,
      string.lower

local _M = {}

-- Decompressed output comes back at most PIECE bytes at a time (paygate.zlib
-- keeps the input it could not expand yet and hands the rest over on the
-- next drain), so memory stays bounded whatever the compression ratio.
local PIECE = 256 * 1024
_M.PIECE = PIECE

local DEFAULT_MAX = 8 * 1024 ^ 3      -- bytes of content; a larger bill fails

local function err_(kind, msg, fields)
  return core.error(kind, "download_bill: " .. msg, fields)
end

local Writer = {}
Writer.__index = Writer

--- syntax: w, err = bill.writer(path[, { max_bytes = n }])
-- returns: a writer (w:feed(chunk), w:finish(sha1_hex), w:abort()), or
-- nil, err (kind io: the temporary file could not be created).
function _M.writer(path, o)
  local tmp = path .. ".part-" .. crypto.random_nonce(8)
  local f, ferr = io_open(tmp, "wb")
  if not f then
    return nil, err_("io", "cannot create " .. tmp .. ": " .. tostring(ferr))
  end
  -- the owner's alone before a byte is in it, whatever the umask: a trade
  -- bill names each payer (openid), what was bought and its attach
  local cok, cerr = core.chmod(tmp, 384)                -- 0600
  if not cok then
    f:close()
    os_remove(tmp)
    return nil, err_("io", "cannot make " .. tmp .. " private (0600): "
                     .. tostring(cerr and cerr.message or cerr))
  end
  return setmetatable({
    path = path, tmp = tmp, f = f, sha = crypto.digest_new("sha1"),
    head = "", mode = nil, bytes = 0, received = 0,
    max_bytes = o and o.max_bytes or DEFAULT_MAX,
  }, Writer)
end

function Writer:fail(err)
  if not self.err then self.err = err end
  return nil, self.err
end

-- Hashes and writes decompressed bytes.
function Writer:out(s)
  local n = self.bytes + #s
  if n > self.max_bytes then
    return self:fail(err_("too_large", "the bill is larger than max_bytes ("
                          .. self.max_bytes .. ")"))
  end
  self.bytes = n
  self.sha:update(s)
  local ok, werr = self.f:write(s)
  if not ok then
    return self:fail(err_("io", "writing " .. self.tmp .. ": "
                          .. tostring(werr)))
  end
  return true
end

-- Feeds compressed bytes ("" to drain) and writes what comes out.
function Writer:inflate(chunk, final)
  local z = self.z
  local out, more
  if final then
    out, more = z:finish()
  else
    out, more = z:write(chunk)
  end
  while true do
    if out == nil then
      local zerr = more
      if type(zerr) == "table" and zerr.kind == "too_large" then
        return self:fail(err_("too_large", "the bill is larger than "
                              .. "max_bytes (" .. self.max_bytes .. ")"))
      end
      return self:fail(err_("malformed", "the gzip stream is "
                            .. (final and "truncated or " or "")
                            .. "damaged (" .. tostring(zerr and zerr.message
                                                        or zerr) .. ")"))
    end
    if out ~= "" then
      local ok, e = self:out(out)
      if not ok then return nil, e end
    end
    if not more then return true end
    if final then
      out, more = z:finish()
    else
      out, more = z:write("")
    end
  end
end

--- syntax: ok, err = w:feed(chunk)
-- Takes the next bytes as received. After the first failure every call
-- returns that error (the download can be cut short by the caller).
function Writer:feed(chunk)
  if self.err then return nil, self.err end
  if self.closed then error("bill writer: feed after finish", 2) end
  self.received = self.received + #chunk
  if self.mode == nil then
    chunk = self.head .. chunk
    if #chunk < 2 then
      self.head = chunk
      return true
    end
    self.head = nil
    if byte(chunk, 1) == 0x1f and byte(chunk, 2) == 0x8b then
      self.mode = "gzip"
      self.z = zlib.inflate({ max_piece = PIECE,
                              max_total = self.max_bytes })
    else
      self.mode = "plain"
    end
  end
  if self.mode == "plain" then return self:out(chunk) end
  return self:inflate(chunk)
end

function Writer:cleanup()
  if self.f then
    self.f:close()
    self.f = nil
  end
  if self.sha then
    self.sha:close()
    self.sha = nil
  end
  if self.z and self.z.close then self.z:close() end
  self.z = nil
  os_remove(self.tmp)
  self.closed = true
end

--- syntax: w:abort() -- closes and removes the partial file (safe twice)
function Writer:abort()
  if not self.closed then self:cleanup() end
end

--- syntax: info, err = w:finish(sha1_hex)
-- returns: { path, bytes, received, gzip, sha1 } once the content's SHA-1
-- matched and the file was renamed into place; else nil, err (kinds
-- hash_mismatch, malformed, too_large, io) with the partial file removed.
function Writer:finish(want)
  if self.closed then error("bill writer: finish twice", 2) end
  if not self.err and self.mode == nil then
    self.mode = "plain"
    local head = self.head
    self.head = nil
    self:out(head)
  end
  if not self.err and self.mode == "gzip" then
    self:inflate(nil, true)
  end
  if self.err then
    local e = self.err
    self:cleanup()
    return nil, e
  end
  local ok, cerr = self.f:close()
  self.f = nil
  if not ok then
    self:cleanup()
    return nil, err_("io", "closing " .. self.tmp .. ": " .. tostring(cerr))
  end
  local got = crypto.hex(self.sha:final())
  self.sha = nil
  if got ~= lower(want) then
    self:cleanup()
    return nil, err_("hash_mismatch", "the SHA-1 of the content (" .. got
                     .. ") is not the hash_value WeChat Pay gave (" .. want
                     .. "): the file was damaged or cut; download it again",
                     { got = got, want = lower(want) })
  end
  local rok, rerr = os_rename(self.tmp, self.path)
  if not rok then
    self:cleanup()
    return nil, err_("io", "renaming to " .. self.path .. ": "
                     .. tostring(rerr))
  end
  if self.z and self.z.close then self.z:close() end
  self.z = nil
  self.closed = true
  return { path = self.path, bytes = self.bytes, received = self.received,
           gzip = self.mode == "gzip", sha1 = got }
end

-- CSV ------------------------------------------------------------------

--- syntax: fields = bill.split(line)
-- returns: the fields of one bill line, each without its leading backtick
-- (a data field may itself hold a comma: fields are split at ",`" when
-- the line is backtick-prefixed, at "," otherwise), and whether the line
-- was backtick-prefixed (a record) or not (a header).
function _M.split(line)
  if sub(line, -1) == "\r" then line = sub(line, 1, -2) end
  local fields = {}
  if sub(line, 1, 1) == "`" then
    local i = 2
    while true do
      local j = find(line, ",`", i, true)
      if not j then
        fields[#fields + 1] = sub(line, i)
        break
      end
      fields[#fields + 1] = sub(line, i, j - 1)
      i = j + 2
    end
    return fields, true
  end
  for f in (line .. ","):gmatch("([^,]*),") do fields[#fields + 1] = f end
  return fields, false
end

-- A record with more fields than its header: a free-text column (商品名称,
-- 商户数据包: the merchant's description and attach) held ",`". The
-- columns before the first text column and after the last are where they
-- belong, counted from each end; what is between is the text, joined
-- back into the first text column (which of the two held the ",`" cannot
-- be told). nil when the header has no such columns.
local function realign(fields, names)
  local first, last
  for i, n in ipairs(names) do
    if n == "商品名称" or n == "商户数据包" then
      first = first or i
      last = i
    end
  end
  if not first then return nil end
  local extra = #fields - #names
  local out = {}
  for i = 1, first - 1 do out[i] = fields[i] end
  local text = {}
  for i = first, last + extra do text[#text + 1] = fields[i] end
  out[first] = table.concat(text, ",`", 1, #text - (last - first))
  for i = first + 1, last do
    out[i] = text[#text - (last - i)]
  end
  for i = last + 1, #names do out[i] = fields[i + extra] end
  return out
end

-- Why a line out of place makes the bill malformed rather than a header:
-- the trade bill has exactly two header lines (the records' and the
-- summary's), and a record broken across lines (a line break inside a
-- field, or a garbled file) leaves a line that does not start with a
-- backtick. Taken for the summary header, it hid every record after it
-- (read as summary rows, then missing from the reconciliation).
local BROKEN = ": a record broken across lines (a line break inside a"
               .. " field) or a garbled bill"

--- syntax: for kind, row, names in bill.rows(path) do ... end
-- kind "record" for each line under the first header, "summary" for each
-- line under the second; row maps each header name to the field (and
-- row[i] is the i-th field; row.line is its line in the file); names is
-- the header. A record with more fields than the header had ",`" in a
-- free-text column: its fields are put back in place (row.realigned), or,
-- without such columns in the header, row.misaligned is set. A bill out
-- of shape yields kind "malformed" once, row = { line, message }, and
-- ends: a header line holding a backtick, a third header line, a summary
-- row whose field count is not its header's, a summary header with no
-- row under it. (A record cut short is left to the caller: row has fewer
-- fields than names.) Raises if the file cannot be opened (read it after
-- download_bill succeeded). The file is closed once the reading is over
-- (its end, or "malformed"); a caller that stops before calls close, the
-- second value (safe twice; the reading is then over): left open, the
-- file stayed so until the GC came by.
--   local it, close = bill.rows(path)
--   for kind, row, names in it do ... close(); break ... end
function _M.rows(path)
  local f = assert(io_open(path, "rb"))
  local names, section, first, ln = nil, 0, true, 0
  local summary_at, summary_rows, over = nil, 0, false
  local function close()
    if not over then
      over = true
      f:close()
    end
  end
  local function malformed(at, msg)
    close()
    return "malformed", { line = at, message = "line " .. at .. ": " .. msg },
           names
  end
  return function()
    if over then return nil end
    while true do
      local line = f:read("*l")
      if not line then
        if summary_at and summary_rows == 0 then
          return malformed(summary_at, "a header line with no row under"
                           .. " it" .. BROKEN)
        end
        close()
        return nil
      end
      ln = ln + 1
      if first then
        first = false
        if sub(line, 1, 3) == "\239\187\191" then line = sub(line, 4) end
      end
      if line ~= "" and line ~= "\r" then
        local fields, record = _M.split(line)
        if not record then
          if find(line, "`", 1, true) then
            -- no header holds one; the rest of a broken record does
            return malformed(ln, "a line not starting with a backtick"
                             .. " holds one" .. BROKEN)
          end
          if section >= 2 then
            return malformed(ln, "a third header line (the summary's was"
                             .. " line " .. summary_at .. ")" .. BROKEN)
          end
          names = fields
          section = section + 1
          if section == 2 then summary_at = ln end
        elseif section == 2 and #fields ~= #names then
          return malformed(ln, "a summary row of " .. #fields .. " fields"
                           .. " under a summary header (line " .. summary_at
                           .. ") of " .. #names .. BROKEN)
        else
          local row = { line = ln }
          if section == 2 then summary_rows = summary_rows + 1 end
          if names and #fields > #names then
            local fixed = realign(fields, names)
            if fixed then
              fields, row.realigned = fixed, true
            else
              row.misaligned = true      -- where the extra ones are: unknown
            end
          end
          for i, v in ipairs(fields) do
            row[i] = v
            if names and names[i] then row[names[i]] = v end
          end
          return section <= 1 and "record" or "summary", row, names
        end
      end
    end
  end, close
end

return _M
