-- spec/support/servers.lua kill_writer: the acknowledgements of a writer
-- killed with SIGKILL are its output's complete lines. The kill can cut
-- a write() to a regular file short (the kernel checks for a fatal signal
-- between the pages it copies), so the output may end in a truncated id:
-- no acknowledgement, and not an id the database should hold. A stand-in
-- writer leaves such an output; the durability specs would count the
-- truncated id as a lost write.
local servers = require "spec.support.servers"

describe("servers.kill_writer", function()
  local tmp = servers.mktemp()
  local getenv = os.getenv

  teardown(function()
    os.getenv = getenv
    servers.sh("rm -rf " .. tmp)
  end)

  it("counts only complete lines: a truncated last id is no ack", function()
    -- ten acknowledged ids, then one cut short at a page boundary
    local fake = tmp .. "/fake_writer"
    local f = assert(io.open(fake, "w"))
    f:write("#!/bin/sh\n",
            "printf 'ready\\n'\n",
            "for i in 1 2 3 4 5 6 7 8 9 10; do printf 'run-1-%s\\n' $i; done\n",
            "printf 'run-2-1'\n",
            "exec sleep 60\n")
    f:close()
    servers.sh("chmod +x " .. fake)
    os.getenv = function(k)
      if k == "PAYGATE_BIN" then return fake end
      return getenv(k)
    end
    local acked = servers.kill_writer("sqlite:unused.db", tmp .. "/w.out")
    os.getenv = getenv
    local want = {}
    for i = 1, 10 do want[i] = "run-1-" .. i end
    assert.same(want, acked)
  end)

  it("acked_ids: the lines of an output, without ready and a cut tail",
     function()
    local out = tmp .. "/cut.out"
    local f = assert(io.open(out, "wb"))
    f:write("ready\n", "a-1\n", "a-2\n", "a-")
    f:close()
    assert.same({ "a-1", "a-2" }, servers.acked_ids(out))
    f = assert(io.open(out, "wb"))
    f:write("ready\n", "a-1\n")
    f:close()
    assert.same({ "a-1" }, servers.acked_ids(out))
    assert.same({}, servers.acked_ids(tmp .. "/none.out"))
  end)
end)
