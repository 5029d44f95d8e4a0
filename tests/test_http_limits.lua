-- The request head limit is process-wide (one libwebsockets context): this
-- file sets it before anything else, in a process of its own.
local T = require "testing"
local http = require "callagent.http"
local fetch = require "callagent.fetch"
local core = require "callagent.core.http"

assert(core.configure({ max_header = 1024 }))

local server = T.server

T.test("request headers over max_header close the connection; smaller ones are fine", function()
  local srv = server({}, function(s)
    s:get("/", function()
      return 200, "ok"
    end)
  end)
  local res = assert(fetch(srv:url("/"), { headers = { ["X-Pad"] = string.rep("a", 500) } }))
  T.eq(res.status, 200)
  local bad, err = fetch(srv:url("/"), { headers = { ["X-Pad"] = string.rep("a", 4000) } })
  T.eq(bad, nil, "no response for an oversized request head")
  T.ok(err, "an error value")
  res = assert(fetch(srv:url("/")))
  T.eq(res.status, 200, "still serving")
end)

T.test("a server asking for another max_header is refused with EINVAL", function()
  local srv = http.server({ max_header = 4096 })
  local ok, err = srv:listen()
  T.eq(ok, nil)
  T.match(err, "^EINVAL: max_header is process%-wide")
  local same = http.server({ max_header = 1024 })
  T.ok(same:listen())
  same:close()
end)

T.run()
