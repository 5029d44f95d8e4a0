-- The host in a few lines: HTTP + WebSocket server, fetch, a ws:// or wss:// client, timers, audio.
local http, ws, fetch = require "callagent.http", require "callagent.ws", require "callagent.fetch"
local timer, audio, task = require "callagent.timer", require "callagent.audio", require "callagent.task"
local srv = http.server({ port = tonumber(arg[1]) or 0 })
srv:get("/hello", function() return 200, { ulaw_bytes = #audio.ulaw_encode(string.rep("\0\0", 160)) } end)
srv:websocket("/echo", { text = function(conn, msg) conn:send(msg) end })
assert(srv:listen())
task.spawn(function()
  local t0, res = timer.now(), assert(fetch(srv:url("/hello")))
  local conn, err = ws.connect(arg[2] or srv:ws_url("/echo"), { ca_file = arg[3] })
  if conn then
    conn:send("hi")
    print(res.body, select(2, conn:receive(2000)), ("%.0f ms"):format(timer.now() - t0))
    conn:close()
  end
  srv:close() -- the server, even when the connection failed: nothing else keeps the program
  if not conn then io.stderr:write("hello: ", err, "\n"); require("callagent.runtime").exit(1) end
end)
