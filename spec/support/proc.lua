-- spec/support/proc.lua: the process helpers of the test kit users get
-- (paygate.testing.proc), under the name the project's specs use.
return require "paygate.testing.proc"
