-- Every request asks for the key of a keyField never seen before.
-- usage: wrk ... -s new_keys.lua URL -- TOKEN PREFIX
dofile(debug.getinfo(1, "S").source:sub(2):match("(.*/)") .. "common.lua")
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
function init(args)
  set_token(args[1])
  prefix = args[2] or "new"
  counter = 0
end
function request()
  counter = counter + 1
  return wrk.format(nil, nil, nil, string.format('{"keyField":"%s-%d-%d"}', prefix, tid, counter))
end
