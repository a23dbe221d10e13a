-- Every request asks for the key of a keyField drawn from a working set of N that
-- already have keys (PREFIX-0 .. PREFIX-(N-1), as the load generator names them).
-- usage: wrk ... -s existing_keys.lua URL -- TOKEN PREFIX N
dofile(debug.getinfo(1, "S").source:sub(2):match("(.*/)") .. "common.lua")
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
function init(args)
  set_token(args[1])
  prefix = args[2]
  n = tonumber(args[3])
  math.randomseed(os.time() + tid * 7919)
end
function request()
  return wrk.format(nil, nil, nil, string.format('{"keyField":"%s-%d"}', prefix, math.random(0, n - 1)))
end
