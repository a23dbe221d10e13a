-- Every request sends the same body, read from a file (batch encryption).
-- usage: wrk ... -s fixed_body.lua URL -- TOKEN BODY_FILE
dofile(debug.getinfo(1, "S").source:sub(2):match("(.*/)") .. "common.lua")
function init(args)
  set_token(args[1])
  local f = assert(io.open(args[2], "rb"))
  body = f:read("*a")
  f:close()
end
function request()
  return wrk.format(nil, nil, nil, body)
end
