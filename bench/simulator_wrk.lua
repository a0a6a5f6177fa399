-- bench/simulator_wrk.lua: the wrk script of bench/simulator. Sends the
-- signed GETs of a file made by `bench/simulator.lua gen` (one line each:
-- target TAB Authorization), each once; past the end it starts again (the
-- simulator may then refuse a repeated nonce: counted as non-2xx).
--   wrk ... -s bench/simulator_wrk.lua URL -- FILE
local reqs = {}
local i = 0

function init(args)
  for line in io.lines(args[1]) do
    local target, auth = line:match("^([^\t]*)\t(.*)$")
    reqs[#reqs + 1] = wrk.format("GET", target, {
      ["Authorization"] = auth, ["Accept"] = "application/json",
      ["User-Agent"] = "paygate-bench",
    })
  end
end

function request()
  i = i % #reqs + 1
  return reqs[i]
end
