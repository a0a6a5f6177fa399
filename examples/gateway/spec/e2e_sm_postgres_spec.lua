-- e2e_sm_spec.lua's cases, as they are, on PostgreSQL (a server of
-- spec/support/servers.lua): the gateway's specs run on both stores.
local S = require "examples.gateway.spec.support"
S.default_db = "postgres"
local cases = assert(loadfile("examples/gateway/spec/e2e_sm_spec.lua"))
setfenv(cases, getfenv(1))()
