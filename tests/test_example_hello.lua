-- examples/hello.lua: the few-line app uses every host module for real,
-- including a wss:// client to a TLS server this test runs.
local T = require "testing"
local http = require "callagent.http"
local certs = require "certs"

T.test("hello.lua serves HTTP and WebSockets, fetches, and talks wss:// to a TLS server", function()
  local c = certs.make(T.tmpdir())
  local tls = http.server({ tls = { cert = c.cert, key = c.key } })
  tls:websocket("/shout", {
    text = function(conn, msg)
      conn:send(msg:upper() .. " over tls")
    end,
  })
  assert(tls:listen())
  T.defer(function()
    tls:close()
  end)
  local code, _, p = T.run_app(T.root .. "/examples/hello.lua", { "0", tls:ws_url("/shout"), c.ca })
  T.eq(code, 0, p.errtext())
  local body, echo, ms = p.out[1]:match("^(.-)\t(.-)\t(%d+) ms$")
  T.eq(body, '{"ulaw_bytes":160}')
  T.eq(echo, "HI over tls")
  T.ok(tonumber(ms) >= 0)
end)

T.test("hello.lua without arguments talks to its own ws:// echo", function()
  local code, _, p = T.run_app(T.root .. "/examples/hello.lua")
  T.eq(code, 0, p.errtext())
  T.match(p.out[1], '^{"ulaw_bytes":160}\thi\t%d+ ms$')
end)

T.test("hello.lua whose WebSocket target cannot be reached says why and exits 1, its server closed", function()
  local code, _, p = T.run_app(T.root .. "/examples/hello.lua", { "0", "ws://127.0.0.1:9/echo" }, { timeout = 10000 })
  T.eq(code, 1, p.errtext())
  T.match(p.errtext(), "hello: ECONNREFUSED")
end)

T.run()
