-- x509.verify_chain refuses weak certificates as weak_signature: a leaf
-- signed with SHA-1, a leaf with an RSA-1024 key (whatever the system's
-- OpenSSL security level); the same chain with SHA-256 and RSA-2048 passes.
local x509 = require "paygate.x509"
local server = require "support.server"
local diagpki = require "support.diagpki"

local dir, pki

local function load(path) return assert(x509.load(diagpki.read(path))) end

setup(function()
  dir = server.tmpdir()
  pki = diagpki.make(dir)
end)

teardown(function() os.execute("rm -rf " .. dir) end)

describe("x509.verify_chain", function()
  local function opts()
    return { roots = { diagpki.read(pki.root) },
             intermediates = { diagpki.read(pki.inter) },
             hostname = "localhost", purpose = "server" }
  end

  it("passes a SHA-256, RSA-2048 leaf", function()
    assert.is_true(x509.verify_chain(load(pki.good), opts()))
  end)

  for _, name in ipairs({ "sha1", "rsa1024" }) do
    it("refuses the " .. name .. " leaf as weak_signature", function()
      local ok, err = x509.verify_chain(load(pki[name]), opts())
      assert.is_nil(ok)
      assert.equal("weak_signature", err.kind, tostring(err))
      assert.matches("too weak", err.message)
    end)
  end
end)
