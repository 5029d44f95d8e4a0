-- WebSockets end to end: the client (callagent.ws) against the server
-- (callagent.http) over loopback, plain and TLS, with the limits hit on purpose.
local T = require "testing"
local http = require "callagent.http"
local ws = require "callagent.ws"
local timer = require "callagent.timer"
local task = require "callagent.task"
local process = require "callagent.process"
local certs = require "certs"
local json = require "callagent.json"

-- An echo server; events seen by the server are recorded in srv.events.
local function echo_server(opts)
  return T.server(opts, function(srv)
    srv.events = {}
    srv:websocket("/echo", {
      open = function(conn, req)
        conn.opened_with = req
        srv.last = conn
        srv.events[#srv.events + 1] = { "open", req.path }
      end,
      text = function(conn, msg)
        if msg == "last words, then abort" then
          conn:send("last words")
          conn:abort()
          return
        end
        if msg:sub(1, 6) == "close:" then
          local code, reason = msg:match("^close:(%d+):(.*)$")
          conn:close(tonumber(code), reason)
          return
        end
        conn:send(msg)
      end,
      binary = function(conn, data)
        conn:send_binary(data)
      end,
      close = function(conn, code, reason)
        srv.events[#srv.events + 1] = { "close", code, reason }
      end,
    })
  end)
end

-- Waits up to ms for an echo_server's close event (the one after its open) and returns it.
local function close_event(srv, ms, what)
  T.wait_for(function()
    return #srv.events >= 2
  end, ms, what or "the server's close event")
  return srv.events[2]
end

local function connect(url, opts)
  local conn, err = ws.connect(url, opts)
  if conn then
    T.defer(function()
      conn:close()
    end)
  end
  return conn, err
end

T.test("text and binary messages round-trip, binary with every byte value", function()
  local srv = echo_server()
  local c = assert(connect(srv:ws_url("/echo")))
  T.eq(c:is_open(), true)
  c:send("hello")
  T.eq({ c:receive(2000) }, { "text", "hello" })
  local bytes = {}
  for i = 0, 255 do
    bytes[#bytes + 1] = string.char(i)
  end
  local bin = table.concat(bytes):rep(4)
  c:send_binary(bin)
  local kind, data = c:receive(2000)
  T.eq(kind, "binary")
  T.eq(data, bin)
end)

T.test("an empty message goes both ways and leaves the connection open", function()
  -- The server's send of "" used to drop the connection ("write failed", 1006).
  local srv = echo_server()
  local c = assert(connect(srv:ws_url("/echo")))
  c:send("")
  T.eq({ c:receive(2000) }, { "text", "" }, "echoed: the server sent an empty message")
  c:send_binary("")
  T.eq({ c:receive(2000) }, { "binary", "" })
  c:send("after")
  T.eq({ c:receive(2000) }, { "text", "after" })
  T.eq(c:is_open(), true)
  T.eq(srv.events[#srv.events][1], "open", "the server saw no close")
end)

T.test("a 1 MB message arrives whole in both directions", function()
  local srv = echo_server({ max_ws_message = 2 * 1024 * 1024 })
  local c = assert(connect(srv:ws_url("/echo"), { max_message = 2 * 1024 * 1024 }))
  local big = string.rep("0123456789abcdef", 65536)
  c:send(big)
  local kind, data = c:receive(5000)
  T.eq(kind, "text")
  T.eq(#data, #big)
  T.eq(data == big, true, "content")
end)

T.test("the server sees the upgrade's path, query and headers, including Authorization", function()
  local srv = echo_server({ headers = { "x-twilio-signature" } })
  local c = assert(connect(srv:ws_url("/echo?callId=c_1&token=t0k"), {
    headers = { Authorization = "Bearer sk-test-123", ["X-Twilio-Signature"] = "sig=" },
  }))
  c:send("x")
  c:receive(2000)
  local req = srv.last.opened_with
  T.eq(req.path, "/echo")
  T.eq(req.query, { callId = "c_1", token = "t0k" })
  T.eq(req.headers.authorization, "Bearer sk-test-123")
  T.eq(req.headers["x-twilio-signature"], "sig=")
  T.match(req.remote, "127%.0%.0%.1")
end)

T.test("the client closes with a code and reason; both sides see them", function()
  local srv = echo_server()
  local c = assert(connect(srv:ws_url("/echo")))
  c:send("x")
  c:receive(2000)
  c:close(4001, "client done")
  T.eq({ c:receive(2000) }, { "close", 4001, "client done" })
  T.eq(close_event(srv, 2000), { "close", 4001, "client done" })
  local ok, err = c:send("late")
  T.eq(ok, nil)
  T.match(err, "^ECLOSED")
end)

T.test("the server closes with a code and reason; the client sees them", function()
  local srv = echo_server()
  local c = assert(connect(srv:ws_url("/echo")))
  c:send("close:4000:server done")
  T.eq({ c:receive(2000) }, { "close", 4000, "server done" })
  T.eq(close_event(srv, 2000), { "close", 4000, "server done" })
end)

T.test("queued messages are sent before a close", function()
  local srv = http.server({})
  srv:websocket("/burst", {
    open = function(conn)
      for i = 1, 100 do
        conn:send("m" .. i)
      end
      conn:close(1000, "all sent")
    end,
  })
  assert(srv:listen())
  T.defer(function()
    srv:close()
  end)
  local c = assert(connect(srv:ws_url("/burst")))
  for i = 1, 100 do
    T.eq({ c:receive(2000) }, { "text", "m" .. i })
  end
  T.eq({ c:receive(2000) }, { "close", 1000, "all sent" })
end)

T.test("a path without a WebSocket route is refused with EHANDSHAKE (404)", function()
  local srv = echo_server()
  local c, err = ws.connect(srv:ws_url("/nope"))
  T.eq(c, nil)
  T.match(err, "^EHANDSHAKE: .*404")
end)

T.test("bad URLs and refused connections are error values", function()
  local c, err = ws.connect("http://127.0.0.1/x")
  T.eq(c, nil)
  T.match(err, "^EINVAL")
  local srv = http.server({})
  assert(srv:listen())
  local port = srv.port
  srv:close()
  c, err = ws.connect("ws://127.0.0.1:" .. port .. "/x", { timeout = 2000 })
  T.eq(c, nil)
  T.match(err, "^ECONNREFUSED")
end)

-- A TCP listener that accepts and never says a word, in a Node process of
-- its own (undone after the test); its port.
local function silent_listener()
  local p = assert(process.spawn({
    "node",
    "-e",
    "const s=require('net').createServer(()=>{});s.listen(0,'127.0.0.1',()=>console.log(s.address().port))",
  }))
  T.defer(function()
    p:kill()
  end)
  return assert(p:read_line(5000))
end

T.test("a server that accepts TCP but never answers gives ETIMEDOUT after the connect timeout", function()
  -- A silent TCP listener in a separate process (Node, which the tests have).
  local port = silent_listener()
  -- Over wss:// it is the TLS handshake that never gets an answer.
  for _, scheme in ipairs({ "ws", "wss" }) do
    local t0 = timer.now()
    local c, err = ws.connect(scheme .. "://127.0.0.1:" .. port .. "/x", { timeout = 300 })
    local took = timer.now() - t0
    T.eq(c, nil)
    T.match(err, "^ETIMEDOUT")
    T.ge(took, 290)
    T.lt(took, 2000)
  end
end)

T.test("abort or close while TCP, TLS or the upgrade is under way: one error, ECANCELED, not the server's fault", function()
  local core_ws = require "callagent.core.ws"
  local port = silent_listener()
  for _, how in ipairs({ "abort", "close" }) do
    for _, scheme in ipairs({ "ws", "wss" }) do
      local events = {}
      local c = core_ws.connect({ url = scheme .. "://127.0.0.1:" .. port .. "/x", timeout = 3000 }, function(_, ev, a)
        events[#events + 1] = { ev, a }
      end)
      timer.sleep(50) -- connected: the server says nothing
      c[how](c)
      T.wait_for(function()
        return #events > 0
      end, 2000, how .. " " .. scheme .. ": its event")
      timer.sleep(50)
      T.eq(#events, 1, how .. " " .. scheme .. ": one event")
      T.eq(events[1][1], "error", how .. " " .. scheme)
      T.match(events[1][2], "^ECANCELED: ", how .. " " .. scheme)
    end
  end
end)

T.test("an incoming message over max_ws_message closes the connection with 1009", function()
  local srv = echo_server({ max_ws_message = 1000 })
  local c = assert(connect(srv:ws_url("/echo")))
  c:send(string.rep("a", 1000))
  T.eq(select(2, c:receive(2000)), string.rep("a", 1000))
  c:send(string.rep("b", 1001))
  local kind, code = c:receive(3000)
  T.eq(kind, "close")
  T.eq(code, 1009)
  T.eq(close_event(srv, 2000)[2], 1009)
end)

T.test("the client's max_message closes a connection the server floods with a big message", function()
  local srv = echo_server()
  local c = assert(connect(srv:ws_url("/echo"), { max_message = 500 }))
  c:send(string.rep("z", 2000)) -- echoed back: over the client's limit
  local kind, code = c:receive(3000)
  T.eq(kind, "close")
  T.eq(code, 1009)
end)

T.test("a slow reader is disconnected when its send queue passes max_send_queue", function()
  local srv = http.server({ max_send_queue = 256 * 1024 })
  local result = {}
  srv:websocket("/flood", {
    open = function(conn)
      task.spawn(function()
        local chunk = string.rep("x", 16 * 1024)
        for i = 1, 10000 do
          local ok, err = conn:send(chunk)
          if not ok then
            result.err = err
            result.sent = i - 1
            return
          end
          result.max_buffered = math.max(result.max_buffered or 0, conn:buffered())
          if i % 16 == 0 then
            timer.sleep(1)
          end
        end
        result.sent = 10000
      end)
    end,
    close = function(_, code, reason)
      result.code, result.reason = code, reason
    end,
  })
  assert(srv:listen())
  T.defer(function()
    srv:close()
  end)
  local closed
  local c = assert(connect(srv:ws_url("/flood"), {
    on_text = function() end,
    on_close = function(_, code)
      closed = code
    end,
  }))
  c:pause() -- stop reading: the server's queue fills
  T.wait_for(function()
    return result.code
  end, 10000, "the server to drop the slow peer")
  T.match(result.err, "^ENOBUFS")
  T.eq(result.code, 1008)
  T.lt(result.sent, 10000, "sending stopped")
  T.le(result.max_buffered, 256 * 1024, "queue never passed the limit")
  c:resume()
  T.wait_for(function()
    return closed
  end, 5000, "the client to see the connection end")
end)

T.test("empty messages count against max_send_queue too (their frames' bytes): a peer that reads nothing is dropped", function()
  local srv = http.server({ max_send_queue = 64 * 1024 })
  local conn
  srv:websocket("/sink", {
    open = function(c)
      conn = c
    end,
  })
  assert(srv:listen())
  T.defer(function()
    srv:close()
  end)
  local c = assert(connect(srv:ws_url("/sink"), { on_text = function() end }))
  c:pause() -- reads nothing from here on
  T.wait_for(function()
    return conn
  end, 3000, "the server's side open")
  -- Fill the socket until messages queue, then send empty ones.
  local chunk = string.rep("x", 16 * 1024)
  while conn:buffered() == 0 do
    assert(conn:send(chunk))
    timer.sleep(1)
  end
  local sent, err = 0, nil
  while sent < 200000 do
    local ok, e = conn:send("")
    if not ok then
      err = e
      break
    end
    sent = sent + 1
  end
  T.match(err, "^ENOBUFS", "refused after " .. sent .. " empty messages")
  T.le(sent, 32 * 1024, "each counts its 2 bytes of frame")
end)

T.test("many messages sent while one read is handled, past what the socket takes: all arrive, in order", function()
  local srv = http.server({ max_send_queue = 64 * 1024 * 1024 })
  local state = {}
  srv:websocket("/burst", {
    text = function(conn, msg)
      -- All in the handler: gathered, then short writes, then the queue.
      for i = 1, tonumber(msg) do
        assert(conn:send(string.format("%06d", i) .. string.rep(string.char(65 + i % 26), 4090)))
      end
      state.buffered = conn:buffered()
      state.stats = conn:stats()
    end,
  })
  assert(srv:listen())
  T.defer(function()
    srv:close()
  end)
  local got, bad = 0, nil
  local c = assert(connect(srv:ws_url("/burst"), {
    max_message = 8192,
    on_text = function(_, msg)
      got = got + 1
      local want = string.format("%06d", got) .. string.rep(string.char(65 + got % 26), 4090)
      if msg ~= want and not bad then
        bad = string.format("message %d: %q...", got, msg:sub(1, 12))
      end
    end,
  }))
  c:pause()
  c:send("4000") -- 16 MB: more than the two sockets' buffers hold
  T.wait_for(function()
    return state.stats
  end, 5000, "the handler")
  T.gt(state.buffered, 0, "some of it waits in the send queue")
  T.lt(state.stats.writes, 4000, "gathered: fewer sends than messages")
  c:resume()
  T.wait_for(function()
    return got == 4000 or bad
  end, 20000, "all 4000 messages")
  T.eq(bad, nil)
  T.eq(got, 4000)
end)

T.test("wss:// works against a TLS listener whose CA is given; without it ETLS", function()
  local c = certs.make(T.tmpdir())
  local srv = echo_server({ tls = { cert = c.cert, key = c.key } })
  local url = srv:ws_url("/echo")
  T.match(url, "^wss://")
  local conn = assert(connect(url, { ca_file = c.ca }))
  conn:send("over tls")
  T.eq({ conn:receive(2000) }, { "text", "over tls" })
  local bad, err = ws.connect(url, { timeout = 3000 })
  T.eq(bad, nil)
  T.match(err, "^ETLS: certificate not trusted")
  -- wss:// to a server that does not speak TLS.
  local plain = echo_server()
  bad, err = ws.connect(plain:ws_url("/echo"):gsub("^ws:", "wss:"), { timeout = 3000 })
  T.eq(bad, nil)
  T.match(err, "^ETLS")
  -- The name is checked too: "localhost" is in the certificate, "127.0.0.2" is not.
  local named = assert(connect("wss://localhost:" .. srv.port .. "/echo", { ca_file = c.ca }))
  named:send("by name")
  T.eq({ named:receive(2000) }, { "text", "by name" })
  -- A message of many TLS records, both ways.
  local big = string.rep("0123456789abcdef", 65536)
  named:send(big)
  local kind, back = named:receive(5000)
  T.eq(kind, "text")
  T.eq(#back, #big)
  T.ok(back == big, "1 MiB echoed intact over TLS")
  -- A burst of messages around the 16 KiB record size, sent without waiting:
  -- the record buffers are freed between messages and set up again.
  local sizes = { 1, 300, 16383, 16384, 16385, 40000, 2, 70000, 5 }
  for i, n in ipairs(sizes) do
    named:send(string.rep(string.char(96 + i), n))
  end
  for i, n in ipairs(sizes) do
    local k, m = named:receive(5000)
    T.eq({ k, #m, m == string.rep(string.char(96 + i), n) }, { "text", n, true }, "burst message " .. i)
  end
  -- A trusted certificate for another name is refused: 127.0.0.2 is not in it.
  local other = echo_server({ host = "127.0.0.2", tls = { cert = c.cert, key = c.key } })
  local wrong, werr = ws.connect(other:ws_url("/echo"), { ca_file = c.ca, timeout = 3000 })
  T.eq(wrong, nil)
  T.match(werr, "^ETLS: .*mismatch")
end)

-- Source for child apps: echo_once(url, msg) connects, sends msg and returns
-- the echo, or the error.
local ECHO_ONCE = [[
local function echo_once(url, msg)
  local conn, err = require("callagent.ws").connect(url)
  if not conn then
    return err
  end
  conn:send(msg)
  local _, back = conn:receive(5000)
  conn:close()
  return back
end
]]

T.test("host names resolve off the loop: a slow DNS holds up no other connection", function()
  -- tests/c/slow_dns.c, preloaded into a child, makes every lookup of a
  -- name ending in .slow.test take 600 ms (then 127.0.0.1) and of one in
  -- .fail.test fail after as long. lws alone would look names up on the
  -- loop thread: everything would stop for those 600 ms. The bounds below
  -- are half of it: room for a loaded ASan run, well short of a lookup.
  local shim = T.root .. "/build/release/tests/slow_dns.so"
  T.ok(io.open(shim), "the shim is built (make test builds it)")
  local srv = echo_server()
  local source = ECHO_ONCE .. [[
local core_ws = require "callagent.core.ws"
local ws, timer, task = require "callagent.ws", require "callagent.timer", require "callagent.task"
local base = "ws://%s:]] .. srv.port .. [[/echo"
local last, gap = timer.now(), 0
timer.every(5, function()
  local now = timer.now()
  gap = math.max(gap, now - last)
  last = now
end)
task.spawn(function()
  local t0 = timer.now()
  local by_name
  task.spawn(function()
    by_name = echo_once(base:format("echo.slow.test"), "by name")
  end)
  local m = echo_once(base:format("127.0.0.1"), "by address")
  print(m .. (timer.now() - t0 < 300 and " within 300 ms" or " late"))
  while not by_name do timer.sleep(10) end
  print(by_name)
  print(select(2, ws.connect(base:format("nowhere.fail.test"))))
  print(select(2, ws.connect(base:format("late.slow.test"), { timeout = 100 })))
  local err
  local pending = core_ws.connect({ url = base:format("cancel.slow.test") }, function(_, ev, a)
    if ev == "error" then err = a end
  end)
  pending:close()
  while not err do timer.sleep(10) end
  print(err)
  -- Three at once wait for one lookup; a fourth uses the answer kept.
  local echoed = 0
  for i = 1, 3 do
    task.spawn(function()
      if echo_once(base:format("many.slow.test"), "many") == "many" then echoed = echoed + 1 end
    end)
  end
  while echoed < 3 do timer.sleep(10) end
  local t1 = timer.now()
  local again = assert(ws.connect(base:format("many.slow.test")))
  print("3 echoed, then one more " .. (timer.now() - t1 < 300 and "within 300 ms" or "late"))
  again:close()
  -- A name with two addresses, the first refused: the second answers, and
  -- comes first in the answer kept (the shim logs each connect()).
  local function mark(s)
    local f = assert(io.open(os.getenv("SLOW_DNS_LOG"), "a"))
    f:write(s, "\n")
    f:close()
  end
  mark("-- two")
  print(echo_once(base:format("echo.two.test"), "second address"))
  print(echo_once(base:format("echo.two.test"), "again"))
  mark("-- end")
  print(select(2, ws.connect(base:format("echo.none.test"))))
  print(select(2, ws.connect(base:format("nowhere.fail.test"))))
  print(gap < 300 and "the loop kept ticking" or ("the loop stopped for " .. gap .. " ms"))
  os.exit(0)
end)
]]
  local dns_log = T.tmpdir() .. "/lookups"
  local code, _, p = T.run_app(nil, nil, {
    source = source,
    env = {
      LD_PRELOAD = shim,
      SLOW_DNS_MS = "600",
      SLOW_DNS_LOG = dns_log,
      SLOW_DNS_PORT = tostring(srv.port),
      -- Under ASan the shim goes first; the link order check would refuse it.
      ASAN_OPTIONS = (os.getenv("ASAN_OPTIONS") or "") .. ":verify_asan_link_order=0",
    },
  })
  T.eq(code, 0, p.errtext())
  T.eq(p.out[1], "by address within 300 ms", "a connection by address does not wait for a lookup")
  T.eq(p.out[2], "by name", "the slow name resolves and connects")
  T.match(p.out[3], "^ENOTFOUND: nowhere%.fail%.test: ")
  T.eq(p.out[4], "ETIMEDOUT: no connection within 100 ms", "the timeout covers the lookup")
  T.eq(p.out[5], "ECANCELED: closed before it connected", "closed while resolving")
  T.eq(p.out[6], "3 echoed, then one more within 300 ms", "an answer is kept")
  T.eq(p.out[7], "second address", "a refused address: the next one")
  T.eq(p.out[8], "again")
  T.match(p.out[9], "^ECONNREFUSED: ", "every address refused")
  T.match(p.out[10], "^ENOTFOUND: nowhere%.fail%.test: ", "a failure is not kept")
  T.eq(p.out[11], "the loop kept ticking")
  local lookups, two, in_two = {}, {}, false
  for line in io.lines(dns_log) do
    if line:match("^%-%- ") then
      in_two = line == "-- two"
    elseif line:match("^connect ") then
      if in_two then
        two[#two + 1] = line:sub(9)
      end
    else
      lookups[line] = (lookups[line] or 0) + 1
    end
  end
  T.eq(two, { "127.0.0.2", "127.0.0.1", "127.0.0.1" },
    "the refused address is tried once; the answer kept has it last")
  T.eq(lookups, {
    ["echo.slow.test"] = 1,
    ["nowhere.fail.test"] = 2,
    ["late.slow.test"] = 1,
    ["cancel.slow.test"] = 1,
    ["many.slow.test"] = 1,
    ["echo.two.test"] = 1,
    ["echo.none.test"] = 1,
  }, "one lookup per name, but for failures")
  -- Stopped while a lookup is still running (20 s, a dead DNS server's
  -- timeouts): it exits cleanly without waiting for it, which libuv
  -- cannot cancel.
  local stopping = T.spawn_app(nil, nil, {
    source = [[
local core_ws = require "callagent.core.ws"
core_ws.connect({ url = "ws://echo.slow.test:]] .. srv.port .. [[/echo" }, function() end)
print("resolving")
]],
    env = {
      LD_PRELOAD = shim,
      SLOW_DNS_MS = "20000",
      ASAN_OPTIONS = (os.getenv("ASAN_OPTIONS") or "") .. ":verify_asan_link_order=0",
    },
  })
  T.wait_for(function()
    return stopping.out[1] == "resolving"
  end, 10000, "the child to start its lookup")
  stopping:kill("SIGTERM")
  T.eq(stopping:wait(5000), 0, stopping.errtext())
end)

T.test("the system store is the hashed certificate folder (SSL_CERT_DIR), for wss:// and https", function()
  local c = certs.make(T.tmpdir())
  local srv = echo_server({ tls = { cert = c.cert, key = c.key } })
  srv:get("/hi", function()
    return 200, "hi"
  end)
  -- A store of one CA, named by subject hash as in /etc/ssl/certs.
  local store = T.tmpdir()
  assert(os.execute("cp '" .. c.ca .. "' '" .. store .. "/test-ca.pem' && openssl rehash '" .. store .. "'"))
  local source = ECHO_ONCE .. [[
local fetch, task = require "callagent.fetch", require "callagent.task"
task.spawn(function()
  print(echo_once("wss://127.0.0.1:]] .. srv.port .. [[/echo", "trusted"))
  local res, ferr = fetch("https://127.0.0.1:]] .. srv.port .. [[/hi")
  print(res and res.body or ferr)
  os.exit(0)
end)
]]
  local code, _, p = T.run_app(nil, nil, { source = source, env = { SSL_CERT_DIR = store } })
  T.eq(code, 0, p.errtext())
  T.eq(p.out, { "trusted", "hi" })
  -- The system's own folder does not hold the test CA.
  code, _, p = T.run_app(nil, nil, { source = source })
  T.eq(code, 0, p.errtext())
  T.match(p.out[1], "^ETLS: certificate not trusted")
  T.match(p.out[2], "^ETLS")
end)

T.test("a wss:// connection resumes an earlier session with the same server only", function()
  local c = certs.make(T.tmpdir())
  local srv = echo_server({ tls = { cert = c.cert, key = c.key } })
  local url = srv:ws_url("/echo")
  local function round_trip(conn, msg)
    conn:send(msg)
    T.eq({ conn:receive(2000) }, { "text", msg })
  end
  local first = assert(connect(url, { ca_file = c.ca }))
  T.eq(first.tls.version, "TLSv1.3")
  T.match(first.tls.cipher, "^TLS_")
  T.eq(first.tls.resumed, false, "nothing to resume yet")
  -- TLS 1.3 tickets come after the handshake: a round trip reads them.
  round_trip(first, "full handshake")
  local second = assert(connect(url, { ca_file = c.ca }))
  T.eq(second.tls.resumed, true, "the first connection's ticket")
  round_trip(second, "resumed")
  -- Still verified and resumable after the first connections close.
  first:close()
  second:close()
  local third = assert(connect(url, { ca_file = c.ca }))
  T.eq(third.tls.resumed, true)
  round_trip(third, "again")
  -- Another name for the same server, or another server: a full handshake.
  local named = assert(connect("wss://localhost:" .. srv.port .. "/echo", { ca_file = c.ca }))
  T.eq(named.tls.resumed, false, "tickets are kept per host name and port")
  round_trip(named, "by name")
  local other = echo_server({ tls = { cert = c.cert, key = c.key } })
  local o = assert(connect(other:ws_url("/echo"), { ca_file = c.ca }))
  T.eq(o.tls.resumed, false, "another port")
  -- A session verified with ca_file is not a way around the system store.
  local bad, err = ws.connect(url, { timeout = 3000 })
  T.eq(bad, nil)
  T.match(err, "^ETLS: certificate not trusted")
  -- A server that no longer knows our tickets (restarted: new ticket keys)
  -- gets a full handshake, and the connection works.
  third:close()
  named:close()
  local port = srv.port
  srv:close()
  local again = echo_server({ port = port, tls = { cert = c.cert, key = c.key } })
  T.eq(again.port, port)
  local fresh = assert(connect(url, { ca_file = c.ca }))
  T.eq(fresh.tls.resumed, false, "the ticket was refused")
  round_trip(fresh, "after a restart")
  -- Plain ws:// has no TLS to describe.
  local plain = echo_server()
  local p = assert(connect(plain:ws_url("/echo")))
  T.eq(p.tls, nil)
end)

T.test("pings keep an idle connection open; an unanswered ping closes it", function()
  local srv = echo_server()
  local c = assert(connect(srv:ws_url("/echo"), { ping_interval = 1, pong_timeout = 1 }))
  timer.sleep(3500)
  T.eq(c:is_open(), true, "idle but answering pings")
  c:send("still here")
  T.eq({ c:receive(2000) }, { "text", "still here" })
  -- Now the server stops reading: pings go unanswered.
  srv.last:pause()
  local t0 = timer.now()
  local kind = c:receive(6000)
  T.eq(kind, "close")
  T.lt(timer.now() - t0, 4500, "closed within ping_interval + pong_timeout (+1 s)")
end)

T.test("a server close ends its open connections", function()
  local srv = echo_server()
  local c = assert(connect(srv:ws_url("/echo")))
  c:send("x")
  c:receive(2000)
  srv:close()
  local kind = c:receive(3000)
  T.eq(kind, "close")
end)

T.test("a closing server waits at most about a second for a peer that never answers its close frame", function()
  local srv = echo_server()
  local c = assert(connect(srv:ws_url("/echo")))
  c:send("x")
  c:receive(2000)
  c:pause() -- the client reads nothing more: the server's close frame goes unanswered
  -- It goes on sending, as a phone streams its audio.
  local streaming = timer.every(20, function()
    c:send("media")
  end)
  T.defer(function()
    streaming:stop()
  end)
  timer.sleep(100)
  srv.last:close(1000, "call ended") -- as the engine closes a live call's stream at a stop
  local t0 = timer.now()
  srv:close()
  -- lws counts whole seconds: 1-2 s; a connection outside a server's close waits 5.
  T.lt(timer.now() - t0, 3500, "the stop held up by a silent peer")
  T.eq(srv:connections(), 0)
end)

T.test("connections carry Lua fields; the id is unique and read-only", function()
  local srv = echo_server()
  local a = assert(connect(srv:ws_url("/echo")))
  local b = assert(connect(srv:ws_url("/echo")))
  a.call = "c_1"
  T.eq(a.call, "c_1")
  T.eq(b.call, nil)
  T.ne(a.id, b.id)
  T.eq(type(a.id), "number")
end)

T.test("200 concurrent connections each get their own echoes", function()
  local srv = echo_server()
  local fns = {}
  for i = 1, 200 do
    fns[i] = function()
      local c = ws.connect(srv:ws_url("/echo"))
      if not c then
        return false
      end
      c:send("n" .. i)
      local _, m = c:receive(5000)
      c:close()
      return m == "n" .. i
    end
  end
  local results = { task.all(fns) }
  for i = 1, 200 do
    T.eq(results[i], true, "connection " .. i)
  end
end)

-- The client's own protocol code against a scripted server (tests/fakes/ws_edge_server.js)
-- that sends what lws never would. Returns the process and its port. With
-- tls (from certs.make) it speaks wss:// and splits TLS records across reads.
local function edge_server(scenario, tls)
  local argv = { "node", T.root .. "/tests/fakes/ws_edge_server.js", scenario }
  if tls then
    argv[4], argv[5] = tls.cert, tls.key
  end
  local p = assert(process.spawn(argv))
  T.defer(function()
    p:kill()
  end)
  return p, assert(p:read_line(5000), "the edge server's port")
end

-- The next frame the edge server got from the client, decoded.
local function client_frame(p)
  local line = assert(p:read_line(5000), "a frame from the client")
  return json.decode(line)
end

-- What the client of the "fragments" scenario must see and answer.
local function check_fragments(p, c)
  T.eq({ c:receive(5000) }, { "text", "hello world" })
  local kind, data = c:receive(5000)
  T.eq(kind, "binary")
  T.eq(#data, 70000)
  T.eq({ data:byte(1, 3) }, { 0, 1, 2 })
  T.eq(data:byte(70000), 69999 % 251)
  T.eq({ c:receive(5000) }, { "text", "" })
  T.eq({ c:receive(5000) }, { "close", 4001, "bye" })
  T.eq(client_frame(p), { op = 10, masked = true, data = "p1" }, "the ping answered with its payload")
  T.eq(client_frame(p), { op = 8, masked = true, code = 4001, reason = "" }, "the close answered with its code")
  T.eq(c:is_open(), false)
end

T.test("fragments split byte by byte, a ping between them, 64-bit lengths and a server close", function()
  local p, port = edge_server("fragments")
  local c = assert(connect("ws://127.0.0.1:" .. port .. "/edge"))
  T.eq(c.response_headers["x-edge"], "fragments")
  check_fragments(p, c)
end)

T.test("over wss:// the same, with every TLS record split across reads", function()
  local tls = certs.make(T.tmpdir())
  local p, port = edge_server("fragments", tls)
  local c = assert(connect("wss://127.0.0.1:" .. port .. "/edge", { ca_file = tls.ca }))
  T.eq(c.response_headers["x-edge"], "fragments")
  check_fragments(p, c)
end)

T.test("protocol errors from the server close the client with 1002", function()
  for _, scenario in ipairs({ "masked", "rsv", "continuation", "close1005", "close5000", "opcode", "longping",
    "fragping", "newmessage" }) do
    local p, port = edge_server(scenario)
    local c = assert(connect("ws://127.0.0.1:" .. port .. "/edge"))
    local kind, code = c:receive(5000)
    T.eq({ kind, code }, { "close", 1002 }, scenario)
    local f = client_frame(p)
    T.eq({ f.op, f.masked, f.code }, { 8, true, 1002 }, scenario .. ": the server was told")
    T.gt(#f.reason, 0, scenario .. ": with a reason")
  end
end)

T.test("a close reason from the server that is not UTF-8 closes the client with 1007, not shown to the app", function()
  local p, port = edge_server("badreason")
  local c = assert(connect("ws://127.0.0.1:" .. port .. "/edge"))
  T.eq({ c:receive(5000) }, { "close", 1007, "close reason that is not UTF-8" })
  local f = client_frame(p)
  T.eq({ f.op, f.masked, f.code }, { 8, true, 1007 }, "the server was told")
end)

T.test("UTF-8 split mid-character across fragments arrives whole; a UTF-8 close reason is kept", function()
  local p, port = edge_server("utf8split")
  local c = assert(connect("ws://127.0.0.1:" .. port .. "/edge"))
  T.eq({ c:receive(5000) }, { "text", "h\u{e9}llo \u{1f600}" })
  T.eq({ c:receive(5000) }, { "close", 1000, "s\u{fc}\u{df}" })
  T.eq(client_frame(p).code, 1000, "the close answered")
end)

T.test("a connection cut in the middle of a frame ends with 1006 and no message", function()
  local _, port = edge_server("drop")
  local c = assert(connect("ws://127.0.0.1:" .. port .. "/edge"))
  T.eq({ c:receive(5000) }, { "close", 1006, "connection lost" })
end)

-- The server's frame reading against a scripted client (tests/fakes/ws_edge_client.js)
-- that sends what a browser or Twilio never would. Returns the process; its
-- lines are the frames the server sent ({end = true} when it ended the connection).
local function edge_client(scenario, srv)
  local p = assert(process.spawn({ "node", T.root .. "/tests/fakes/ws_edge_client.js", scenario, tostring(srv.port), "/echo" }))
  T.defer(function()
    p:kill()
  end)
  return p
end

local function server_frame(p, ms)
  local line = assert(p:read_line(ms or 5000), "a frame from the server")
  return json.decode(line)
end

T.test("the server reads frames split byte by byte, a ping between fragments, 64-bit lengths and a close", function()
  local srv = echo_server()
  local p = edge_client("fragments", srv)
  local sum = 0
  for i = 0, 69999 do
    sum = sum + i % 251
  end
  T.eq(server_frame(p), { op = 10, masked = false, fin = true, data = "p1" }, "the ping answered between the fragments")
  T.eq(server_frame(p), { op = 1, masked = false, fin = true, data = "hello world" }, "the fragments joined, unmasked")
  T.eq(server_frame(p), { op = 2, masked = false, fin = true, data = 70000, sum = sum })
  T.eq(server_frame(p), { op = 1, masked = false, fin = true, data = "" })
  T.eq(server_frame(p), { op = 8, masked = false, fin = true, code = 4001, reason = "" }, "the close answered with its code")
  T.eq(server_frame(p), { ["end"] = true }, "then the server ends the connection")
  T.eq(close_event(srv, 5000), { "close", 4001, "bye" })
end)

T.test("a fragmented message whose first fragment is empty arrives whole, as does one of empty fragments only", function()
  local srv = echo_server()
  local p = edge_client("emptyfirst", srv)
  T.eq(server_frame(p), { op = 1, masked = false, fin = true, data = "abc" })
  T.eq(server_frame(p), { op = 1, masked = false, fin = true, data = "" })
  T.eq(#srv.events, 1, "still open")
end)

T.test("protocol errors from a client close it with 1002, and the server says why", function()
  for _, scenario in ipairs({ "unmasked", "rsv", "opcode", "longping", "close1006", "close999" }) do
    local srv = echo_server()
    local p = edge_client(scenario, srv)
    local f = server_frame(p)
    T.eq({ f.op, f.code }, { 8, 1002 }, scenario)
    T.gt(#f.reason, 0, scenario .. ": with a reason")
    T.eq(close_event(srv, 3000, scenario .. ": the server's close event, once the client has ended the connection")[2],
      1002, scenario)
  end
end)

T.test("a close reason from a client that is not UTF-8 closes it with 1007, not shown to the app", function()
  local srv = echo_server()
  local p = edge_client("badreason", srv)
  local f = server_frame(p)
  T.eq({ f.op, f.code }, { 8, 1007 }, "not echoed: a close of the server's own")
  T.eq(close_event(srv, 3000), { "close", 1007, "close reason that is not UTF-8" })
end)

-- A server whose /bad route sends "ok", then text that is not UTF-8 (over
-- TLS with tls from certs.make); srv.closes gets the close events.
local function bad_text_server(tls)
  return T.server(tls and { tls = { cert = tls.cert, key = tls.key } }, function(srv)
    srv.closes = {}
    srv:websocket("/bad", {
      open = function(conn)
        conn:send("ok")
        conn:send("a\255b")
      end,
      close = function(_, code, reason)
        srv.closes[#srv.closes + 1] = { code, reason }
      end,
    })
  end)
end

T.test("a text message from the server that is not UTF-8 closes the client with 1007, over ws:// and wss://", function()
  local tls = certs.make(T.tmpdir())
  for _, over in ipairs({ "ws", "wss" }) do
    local srv = bad_text_server(over == "wss" and tls)
    local c = assert(connect(srv:ws_url("/bad"), { ca_file = tls.ca }))
    T.eq({ c:receive(3000) }, { "text", "ok" }, over)
    T.eq({ c:receive(3000) }, { "close", 1007, "text message that is not UTF-8" }, over .. ": not delivered")
    T.wait_for(function()
      return #srv.closes > 0
    end, 3000, over .. ": the server's close event")
    T.eq(srv.closes[1], { 1007, "text message that is not UTF-8" }, over .. ": the server was told why")
  end
end)

T.test("a text message from a client that is not UTF-8 closes it with 1007, over ws:// and wss://; the handler never sees it", function()
  local tls = certs.make(T.tmpdir())
  for _, over in ipairs({ "ws", "wss" }) do
    local srv = echo_server(over == "wss" and { tls = { cert = tls.cert, key = tls.key } } or nil)
    local c = assert(connect(srv:ws_url("/echo"), { ca_file = tls.ca }))
    c:send("fine")
    T.eq({ c:receive(3000) }, { "text", "fine" }, over)
    c:send("x\237\160\128y") -- a surrogate, U+D800
    T.eq({ c:receive(3000) }, { "close", 1007, "text message that is not UTF-8" }, over .. ": not echoed")
    T.eq(close_event(srv, 3000), { "close", 1007, "text message that is not UTF-8" }, over)
  end
end)

T.test("text that is not UTF-8 across fragments closes the client with 1007: at once for bytes that start no sequence, at the end for a cut one", function()
  -- utf8early's message never ends: the 1007 comes from its first fragment.
  for _, scenario in ipairs({ "utf8early", "utf8cut", "utf8surrogate" }) do
    local p, port = edge_server(scenario)
    local c = assert(connect("ws://127.0.0.1:" .. port .. "/edge"))
    T.eq({ c:receive(5000) }, { "close", 1007, "text message that is not UTF-8" }, scenario)
    local f = client_frame(p)
    T.eq({ f.op, f.masked, f.code }, { 8, true, 1007 }, scenario .. ": the server was told")
  end
end)

T.test("a client's UTF-8 split inside characters across fragments, a ping between, is echoed whole; text that is not UTF-8 across fragments closes it with 1007", function()
  local srv = echo_server()
  local p = edge_client("utf8split", srv)
  T.eq(server_frame(p), { op = 10, masked = false, fin = true, data = "p1" }, "the ping between the halves of a character")
  T.eq(server_frame(p), { op = 1, masked = false, fin = true, data = "h\u{e9}llo \u{1f600}" })
  T.eq(#srv.events, 1, "still open")
  for _, scenario in ipairs({ "utf8early", "utf8cut", "utf8surrogate" }) do
    srv = echo_server()
    p = edge_client(scenario, srv)
    local f = server_frame(p)
    T.eq({ f.op, f.code, f.reason }, { 8, 1007, "text message that is not UTF-8" }, scenario)
    T.eq(close_event(srv, 3000, scenario .. ": the server's close event"), { "close", 1007, "text message that is not UTF-8" },
      scenario)
  end
end)

T.test("text that is not UTF-8 is logged as a WARN naming the connection and where, never its bytes", function()
  local code, _, p = T.run_app(nil, nil, { source = [[
local http = require "callagent.http"
local ws = require "callagent.ws"
local task = require "callagent.task"
local runtime = require "callagent.runtime"
local srv = http.server({})
srv:websocket("/w", {
  text = function(conn, msg)
    conn:send("secret-from-server\255")
  end,
})
assert(srv:listen())
task.spawn(function()
  local c = assert(ws.connect(srv:ws_url("/w")))
  c:send("go")
  print(c:receive(3000))
  c = assert(ws.connect(srv:ws_url("/w")))
  c:send("secret-from-client\192\128")
  print(c:receive(3000))
  srv:close()
  runtime.stop(0)
end)
]] })
  T.eq(code, 0, p.errtext())
  T.eq(p.out, { "close\t1007\ttext message that is not UTF-8", "close\t1007\ttext message that is not UTF-8" })
  local log = p.errtext()
  T.match(log, "WARN websocket %d+: a text message from the server that is not UTF%-8 %(at byte 18%): closing %(1007%)")
  T.match(log, "WARN websocket %d+: a text message from the client that is not UTF%-8 %(at byte 18%): closing %(1007%)")
  T.no_match(log, "secret", "no payload in the log")
end)

T.test("a character cut wrong across fragments is logged at its first byte in the message, not at the fragment's start", function()
  -- utf8surrogate: "x\xed", then "\xa0\x80"; utf8cut: "a\xe2", then a last "\x82". Both sequences start at byte 1.
  local code, _, p = T.run_app(nil, nil, { source = string.format([[
local ws = require "callagent.ws"
local task = require "callagent.task"
local process = require "callagent.process"
local runtime = require "callagent.runtime"
task.spawn(function()
  for _, scenario in ipairs({ "utf8surrogate", "utf8cut" }) do
    local edge = assert(process.spawn({ "node", %q, scenario }))
    local c = assert(ws.connect("ws://127.0.0.1:" .. assert(edge:read_line(5000)) .. "/edge"))
    print(c:receive(3000))
    edge:kill()
  end
  runtime.stop(0)
end)
]], T.root .. "/tests/fakes/ws_edge_server.js") })
  T.eq(code, 0, p.errtext())
  T.eq(p.out, { "close\t1007\ttext message that is not UTF-8", "close\t1007\ttext message that is not UTF-8" })
  local log = p.errtext()
  T.match(log, "WARN websocket %d+: a text message from the server that is not UTF%-8 %(at byte 1%): closing %(1007%)")
  T.match(log, "WARN websocket %d+: a text message from the server ends inside a UTF%-8 sequence %(at byte 1%): closing %(1007%)")
end)

T.test("a phone message that is not UTF-8 closes the stream with 1007 and never reaches the bridge", function()
  local cbridge = require "callagent.core.bridge"
  local b
  local srv = T.server(nil, function(s)
    s:websocket("/phone", {
      open = function(conn)
        b = cbridge.new(conn, nil, { stream_sid = "MZ1" })
      end,
    })
  end)
  local c = assert(connect(srv:ws_url("/phone")))
  local media = '{"event":"media","media":{"payload":"f39/fw=="}%s}'
  c:send(media:format(""))
  T.wait_for(function()
    return b and b:stats().frames_in == 1
  end, 3000, "the first frame at the bridge")
  c:send(media:format(',"x":"\255"'))
  T.eq({ c:receive(3000) }, { "close", 1007, "text message that is not UTF-8" })
  T.eq(b:stats().frames_in, 1, "the bridge took no second frame")
  b:close()
end)

T.test("messages and a close that came in one read: the echoes and the close answer go out in order, in one write", function()
  local srv = echo_server()
  local p = edge_client("burst", srv)
  for i = 1, 5 do
    T.eq(server_frame(p), { op = 1, masked = false, fin = true, data = "m" .. i })
  end
  T.eq(server_frame(p), { op = 8, masked = false, fin = true, code = 4001, reason = "" })
  T.eq(server_frame(p), { ["end"] = true })
  close_event(srv, 3000)
  local s = srv.last:stats()
  T.eq({ s.messages_in, s.messages_out, s.writes }, { 5, 5, 1 }, "five echoes and the close frame in one send")
  T.gt(s.reads, 0)
  -- A protocol error after two messages: their echoes still go out, before the close.
  srv = echo_server()
  p = edge_client("bursterror", srv)
  T.eq(server_frame(p).data, "m1")
  T.eq(server_frame(p).data, "m2")
  local f = server_frame(p)
  T.eq({ f.op, f.code }, { 8, 1002 })
  T.eq(server_frame(p), { ["end"] = true })
  -- A handler that sends and then drops the connection: what it sent goes first.
  srv = echo_server()
  local c = assert(connect(srv:ws_url("/echo")))
  c:send("last words, then abort")
  T.eq({ c:receive(5000) }, { "text", "last words" })
  T.eq({ c:receive(5000) }, { "close", 1006, "connection lost" })
end)

T.test("a handler that aborts in the middle of a read: the frames after it in that read get no answer", function()
  local srv = echo_server()
  local p = edge_client("abortburst", srv)
  T.eq(server_frame(p), { op = 1, masked = false, fin = true, data = "last words" })
  T.eq(server_frame(p), { ["end"] = true }, "no pong, no close frame after the abort")
  T.eq(close_event(srv, 3000), { "close", 1006, "aborted" })
end)

T.test("a frame sent with the upgrade request is refused with 1002, not lost without a word", function()
  local srv = echo_server()
  local p = edge_client("pipelined", srv)
  T.eq(server_frame(p), { op = 8, masked = false, fin = true, code = 1002, reason = "frames sent before the upgrade was answered" })
  T.eq(server_frame(p), { ["end"] = true })
  T.eq(close_event(srv, 3000), { "close", 1002, "frames sent before the upgrade was answered" })
end)

T.test("a client cut off in the middle of a frame: the server sees 1006 and no message", function()
  local srv = echo_server()
  edge_client("drop", srv)
  close_event(srv, 5000)
  T.eq(srv.events, { { "open", "/echo" }, { "close", 1006, "connection lost" } })
end)

T.test("the server pings a silent client and drops one that does not answer (ws_ping, ws_pong)", function()
  local srv = echo_server({ ws_ping = 1, ws_pong = 1 })
  local silent = edge_client("silent", srv)
  local answering = edge_client("answering", srv)
  local t0 = timer.now()
  T.eq(server_frame(silent).op, 9, "pinged after a second of silence")
  T.eq(server_frame(silent, 5000), { ["end"] = true }, "dropped: no answer")
  T.lt(timer.now() - t0, 4500, "within ws_ping + ws_pong (+1 s)")
  for _ = 1, 2 do
    T.eq(server_frame(answering).op, 9)
  end
  T.eq(srv:connections(), 1, "the client that answers stays")
  T.eq(pcall(http.server, { ws_ping = -1 }), true, "options are checked at listen")
  local bad = http.server({ ws_pong = 0 })
  T.eq(pcall(bad.listen, bad), false, "ws_pong 0 is refused")
end)

T.test("a 101 without Upgrade or with the wrong Sec-WebSocket-Accept is EHANDSHAKE", function()
  local _, port = edge_server("badaccept")
  local c, err = ws.connect("ws://127.0.0.1:" .. port .. "/edge", { timeout = 3000 })
  T.eq(c, nil)
  T.match(err, "^EHANDSHAKE: .*Sec%-WebSocket%-Accept")
  _, port = edge_server("noupgrade")
  c, err = ws.connect("ws://127.0.0.1:" .. port .. "/edge", { timeout = 3000 })
  T.eq(c, nil)
  T.match(err, "^EHANDSHAKE: .*Upgrade")
end)

T.test("a URL's query right after the host goes in the request line; a fragment is not sent; junk after [v6] is EINVAL", function()
  local _, port = edge_server("requestline")
  local base = "ws://127.0.0.1:" .. port
  for url, line in pairs({
    [base .. "?model=x&api-key=k"] = "GET /?model=x&api-key=k HTTP/1.1",
    [base .. "#frag"] = "GET / HTTP/1.1",
    [base .. "/a/b?y=2#frag?z"] = "GET /a/b?y=2 HTTP/1.1",
    [base] = "GET / HTTP/1.1",
  }) do
    local c, err = connect(url, { timeout = 3000 })
    T.ok(c, url .. ": " .. tostring(err))
    T.eq({ c:receive(5000) }, { "text", line .. "\nHost: 127.0.0.1:" .. port }, url)
  end
  local c, err = ws.connect("ws://[::1]junk:" .. port .. "/x")
  T.eq({ c, err }, { nil, "EINVAL: not a ws:// or wss:// URL" })
end)

T.test("a connection that opens after ws.connect's wait was ended elsewhere is closed, not left open for good", function()
  local p, port = edge_server("late")
  local co = task.spawn(function()
    ws.connect("ws://127.0.0.1:" .. port .. "/edge", { timeout = 3000 })
  end)
  task.resume(co) -- the app ends the wait early: no one will have the connection
  local f = client_frame(p)
  T.eq({ f.op, f.code, f.reason }, { 8, 1001, "not needed" })
end)

T.test("a connection whose ws.connect raised (its wait could not yield) is closed once it opens", function()
  local p, port = edge_server("late")
  local ok, err
  task.spawn(function()
    -- gsub's callback is a C call: the wait cannot yield there, and raises.
    ok, err = pcall(string.gsub, "a", "a", function()
      ws.connect("ws://127.0.0.1:" .. port .. "/edge", { timeout = 3000 })
    end)
  end)
  T.eq(ok, false)
  T.match(err, "yield across")
  local f = client_frame(p)
  T.eq({ f.op, f.code, f.reason }, { 8, 1001, "not needed" })
end)

T.test("abort or close with the server's 101 already come but not read: ECANCELED, never an open", function()
  local core_ws = require "callagent.core.ws"
  local _, port = edge_server("late") -- answers the upgrade 300 ms late
  local conns = {}
  for i, how in ipairs({ "abort", "close" }) do
    conns[i] = { how = how, events = {} }
    conns[i].c = core_ws.connect({ url = "ws://127.0.0.1:" .. port .. "/edge", timeout = 3000 }, function(_, ev, a)
      table.insert(conns[i].events, ev .. " " .. (type(a) == "string" and a or ""))
    end)
  end
  timer.sleep(50) -- TCP up, the request sent
  local t = os.clock() + 0.4
  repeat -- the loop held: the 101 waits in the socket, unread
  until os.clock() > t
  for _, x in ipairs(conns) do
    x.c[x.how](x.c)
  end
  timer.sleep(100)
  for _, x in ipairs(conns) do
    T.eq(x.events, { "error ECANCELED: " .. (x.how == "abort" and "aborted" or "closed") .. " before it connected" },
      x.how)
  end
end)

T.test("paused while connecting: it opens, then reads nothing until resumed", function()
  local core_ws = require "callagent.core.ws"
  local _, port = edge_server("hello")
  local events = {}
  local c = core_ws.connect({ url = "ws://127.0.0.1:" .. port .. "/edge", timeout = 2000 }, function(_, ev, a)
    events[#events + 1] = { ev, type(a) == "string" and a or nil }
  end)
  T.defer(function()
    c:abort()
  end)
  c:pause()
  T.wait_for(function()
    return #events > 0
  end, 3000, "the open event")
  T.eq(events[1][1], "open", "the answer to the upgrade is read")
  timer.sleep(300)
  T.eq(#events, 1, "the message 100 ms after the open is not read while paused")
  c:resume()
  T.wait_for(function()
    return #events > 1
  end, 2000, "the message once resumed")
  T.eq(events[2], { "text", "hello" })
end)

-- A server (opts as T.server's) whose /echo handler keeps the messages and
-- the close it gets in got, and pauses the connection on each message in
-- pause_on (a set). Returns the server, got, and a function that waits for
-- the first pause and checks that nothing more came while paused: the
-- paused connection.
local function pausing_server(opts, pause_on)
  local got, conn = {}, nil
  local srv = T.server(opts, function(s)
    s:websocket("/echo", {
      text = function(c, msg)
        got[#got + 1] = msg
        if pause_on[msg] then
          conn = c
          c:pause()
        end
      end,
      close = function(_, code)
        got[#got + 1] = "close " .. code
      end,
    })
  end)
  return srv, got, function()
    T.wait_for(function()
      return conn
    end, 3000, "the first message")
    timer.sleep(200)
    T.eq(got, { "m1" }, "nothing more while paused")
    return conn
  end
end

T.test("a server connection paused by its handler gets no more messages, nor the close, of that read until resumed; then all, in order", function()
  local srv, got, paused = pausing_server(nil, { m1 = true, m3 = true })
  local p = edge_client("burst", srv) -- m1..m5 and a close frame, in one write
  local conn = paused()
  conn:resume()
  T.wait_for(function()
    return #got >= 3
  end, 3000, "the messages kept, up to the next pause")
  timer.sleep(100)
  T.eq(got, { "m1", "m2", "m3" }, "paused again by m3's handler")
  conn:resume()
  T.wait_for(function()
    return #got == 6
  end, 3000, "the rest")
  T.eq(got, { "m1", "m2", "m3", "m4", "m5", "close 4001" })
  T.eq(server_frame(p), { op = 8, masked = false, fin = true, code = 4001, reason = "" }, "the close answered after the resume")
end)

T.test("a client paused by its handler gets no more messages of that read until resumed (ws:// and wss://), then all, in order", function()
  local tls = certs.make(T.tmpdir())
  for _, over in ipairs({ "ws", "wss" }) do
    local srv = T.server(over == "wss" and { tls = { cert = tls.cert, key = tls.key } } or nil, function(s)
      s:websocket("/five", {
        text = function(c)
          for i = 1, 5 do
            c:send("m" .. i) -- one write (gathered), one read at the client
          end
        end,
      })
    end)
    local got = {}
    local c = assert(connect(srv:ws_url("/five"), {
      ca_file = tls.ca,
      on_text = function(conn, msg)
        got[#got + 1] = msg
        if #got == 1 or #got == 3 then
          conn:pause()
        end
      end,
    }))
    c:send("go")
    T.wait_for(function()
      return #got > 0
    end, 3000, over .. ": the first message")
    timer.sleep(200)
    T.eq(got, { "m1" }, over .. ": nothing more while paused")
    c:resume()
    T.wait_for(function()
      return #got >= 3
    end, 3000, over .. ": the messages kept, up to the next pause")
    timer.sleep(100)
    T.eq(got, { "m1", "m2", "m3" }, over .. ": paused again by m3's handler")
    c:resume()
    T.wait_for(function()
      return #got == 5
    end, 3000, over .. ": the rest")
    T.eq(got, { "m1", "m2", "m3", "m4", "m5" }, over)
    c:send("go")
    T.wait_for(function()
      return #got == 10
    end, 3000, over .. ": read again after the resume")
    T.eq(got[10], "m5", over)
  end
end)

-- Runs Lua source text as a callagent script with 64 descriptors at most
-- (ulimit -n): its exit status (nil after wait_ms) and the lines it printed
-- on stdout and stderr.
local function run_with_64_fds(name, text, wait_ms)
  local script = T.tmpdir() .. "/" .. name .. ".lua"
  local f = assert(io.open(script, "w"))
  f:write(text)
  f:close()
  local out = {}
  local function line(l)
    out[#out + 1] = l
  end
  local p = assert(process.spawn({ "bash", "-c", 'ulimit -n 64; exec "$0" run "$1"', T.bin, script,
    inherit_env = true, on_stdout = line, on_stderr = line }))
  return p:wait(wait_ms), out
end

T.test("a client whose socket stayed lws's (out of descriptors at the open) paused by its handler gets the rest of that read once resumed", function()
  -- The descriptors left are used up between the connect and the upgrade's
  -- answer (300 ms late): the socket cannot be duplicated (ca__ws_take_socket),
  -- so lws goes on reading it; "reads 0" says so (no recv of ours).
  local _, port = edge_server("latethree")
  local rc, out = run_with_64_fds("lws_read", (([[
local ws, timer, task = require "callagent.ws", require "callagent.timer", require "callagent.task"
local got, fill = {}, {}
task.spawn(function()
  timer.sleep(100)
  while true do
    local h = io.open("/dev/null")
    if not h then break end
    fill[#fill + 1] = h
  end
end)
task.spawn(function()
  local c = assert(ws.connect("ws://127.0.0.1:PORT/edge", { timeout = 3000, on_text = function(conn, m)
    got[#got + 1] = m
    if #got == 1 then conn:pause() end
  end }))
  for _, h in ipairs(fill) do h:close() end
  timer.sleep(200)
  print(table.concat(got, " "))
  c:resume()
  timer.sleep(300)
  print(table.concat(got, " "), "reads " .. c:stats().reads, #fill > 0)
  io.stdout:flush()
  os.exit(0)
end)
]]):gsub("PORT", port)), 10000)
  T.eq(rc, 0, table.concat(out, "\n"))
  T.eq(out, { "m1", "m1 m2 m3\treads 0\ttrue" })
end)

T.test("a client paused while connecting whose socket stayed lws's (out of descriptors at the open) reads nothing while paused", function()
  -- As above. While paused, the server's 32 MB message must stay in TCP's
  -- buffers: read, it would be held (and grow the process) without end.
  local _, port = edge_server("lateflood")
  local rc, out = run_with_64_fds("lws_paused", (([[
local core_ws, timer, task = require "callagent.core.ws", require "callagent.timer", require "callagent.task"
local function rss_mb()
  local h = assert(io.open("/proc/self/statm"))
  local pages = h:read("n")
  pages = h:read("n")
  h:close()
  return pages * 4096 / 2^20
end
local fill, opened, before = {}, false, rss_mb()
local c = core_ws.connect({ url = "ws://127.0.0.1:PORT/edge", timeout = 3000 }, function(_, ev)
  opened = opened or ev == "open"
end)
c:pause()
task.spawn(function()
  timer.sleep(100)
  while true do
    local h = io.open("/dev/null")
    if not h then break end
    fill[#fill + 1] = h
  end
  timer.sleep(1200)
  for _, h in ipairs(fill) do h:close() end
  print(opened, "reads " .. c:stats().reads, #fill > 0, rss_mb() - before < 8 or rss_mb() - before)
  io.stdout:flush()
  os.exit(0)
end)
]]):gsub("PORT", port)), 10000)
  T.eq(rc, 0, table.concat(out, "\n"))
  T.eq(out, { "true\treads 0\ttrue\ttrue" }, "opened, read by lws, and not 8 MB more")
end)

T.test("a TLS server connection paused by its handler gets no more messages until resumed; then all, in order", function()
  local tls = certs.make(T.tmpdir())
  local srv, got, paused = pausing_server({ tls = { cert = tls.cert, key = tls.key } }, { m1 = true })
  local c = assert(connect(srv:ws_url("/echo"), { ca_file = tls.ca }))
  for i = 1, 5 do
    c:send("m" .. i) -- all written before the server reads
  end
  local conn = paused()
  conn:resume()
  T.wait_for(function()
    return #got == 5
  end, 3000, "the rest")
  T.eq(got, { "m1", "m2", "m3", "m4", "m5" })
end)

T.test("a 101 with an extension or a subprotocol the client did not offer is EHANDSHAKE; an offered one opens", function()
  local _, port = edge_server("extension")
  local c, err = ws.connect("ws://127.0.0.1:" .. port .. "/edge", { timeout = 3000 })
  T.eq(c, nil)
  T.match(err, "^EHANDSHAKE: .*extension")
  _, port = edge_server("subprotocol") -- it chooses "chat"
  c, err = ws.connect("ws://127.0.0.1:" .. port .. "/edge", { timeout = 3000 })
  T.eq(c, nil)
  T.match(err, "^EHANDSHAKE: .*subprotocol")
  c, err = ws.connect("ws://127.0.0.1:" .. port .. "/edge",
    { timeout = 3000, headers = { ["Sec-WebSocket-Protocol"] = "superchat, chat" } })
  T.ok(c, err)
  T.eq(c.response_headers["sec-websocket-protocol"], "chat")
  c:close()
end)

T.test("handshake headers with line breaks are refused before anything is sent", function()
  local ok, err = pcall(ws.connect, "ws://127.0.0.1:9/x", { headers = { ["X-Evil"] = "a\r\nInjected: 1" } })
  T.eq(ok, false)
  T.match(err, "line break")
  T.no_match(err, "Injected")
end)

T.test("headers the handshake sets itself (Host, the key, ...) are refused, whatever their case", function()
  for _, name in ipairs({ "Host", "host", "Upgrade", "CONNECTION", "Sec-WebSocket-Key", "sec-websocket-version",
    "Sec-WebSocket-Extensions" }) do
    local ok, err = pcall(ws.connect, "ws://127.0.0.1:9/x", { headers = { [name] = "x" } })
    T.eq(ok, false, name)
    T.match(err, "a header the handshake sets itself", name)
  end
  local c, err = ws.connect("ws://127.0.0.1:9/x", { headers = { ["X-Host"] = "x", ["Sec-WebSocket-Keys"] = "y" } })
  T.eq(c, nil)
  T.match(err, "^ECONNREFUSED", "names that only look alike are taken, and the connection tried")
end)

T.test("an IPv6 literal on the scheme's default port goes bracketed into Host", function()
  -- Port 80 needs root, as CI runs the tests; elsewhere it cannot be bound.
  local hosts = {}
  local srv = http.server({ host = "::1", port = 80 })
  srv:websocket("/x", { open = function(conn, req)
    hosts[#hosts + 1] = req.headers.host
    conn:close(1000, "")
  end })
  local ok, err = srv:listen()
  if not ok then
    T.diag("not run: [::1]:80 could not be bound (" .. tostring(err) .. "); the tests run as root in CI")
    return
  end
  T.defer(function()
    srv:close()
  end)
  local c = assert(connect("ws://[::1]/x", { timeout = 3000 }))
  c:close()
  T.eq(hosts, { "[::1]" })
end)

T.test("a paused connection is not dropped by its own ping: the peer is judged again after resume", function()
  local srv = echo_server({ ws_ping = 0 })
  local c = assert(ws.connect(srv:ws_url("/echo"), { ping_interval = 1, pong_timeout = 1 }))
  c:pause()
  timer.sleep(3500) -- past a ping and its pong's wait, twice over
  c:resume()
  T.eq(c:is_open(), true)
  c:send("still here")
  T.eq({ c:receive(3000) }, { "text", "still here" })
  timer.sleep(2500) -- and pinged again, answered, once reading
  T.eq(c:is_open(), true)
  c:close()
end)

T.test("pings from a peer that reads nothing queue one pong, the latest, not one each: no memory or queue grows", function()
  local srv = echo_server({ ws_ping = 0, max_send_queue = 64 * 1024 })
  -- Upgrades, stops reading, then sends `n` pings of 125 bytes (numbered);
  -- on "read" it reads again and reports the pongs once one carries the last number.
  local p = assert(process.spawn({ "node", "-e", [[
const n = +process.argv[2];
const s = require("net").connect(+process.argv[1], "127.0.0.1", () => {
  s.write("GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
    "Sec-WebSocket-Key: " + require("crypto").randomBytes(16).toString("base64") + "\r\nSec-WebSocket-Version: 13\r\n\r\n");
  s.once("data", () => {
    s.pause();
    const frames = [];
    for (let i = 1; i <= n; i++) {
      const body = Buffer.from(String(i).padStart(125, "0"));
      frames.push(Buffer.from([0x89, 0x80 | 125, 0, 0, 0, 0]), body); // a zero mask: the body as it is
    }
    s.write(Buffer.concat(frames), () => console.log("sent"));
  });
});
let buf = Buffer.alloc(0), pongs = 0;
process.stdin.once("data", () => {
  s.on("data", (d) => {
    buf = Buffer.concat([buf, d]);
    while (buf.length >= 2 && buf.length >= 2 + (buf[1] & 0x7f)) {
      const len = buf[1] & 0x7f, last = +buf.subarray(2, 2 + len).toString();
      buf = buf.subarray(2 + len);
      pongs++;
      if (last === n) { console.log(JSON.stringify({ pongs })); process.exit(0); }
    }
  });
  s.resume();
});
s.on("error", () => {});
s.on("close", () => { console.log(JSON.stringify({ closed: true, pongs })); process.exit(0); });
setTimeout(() => {}, 60000);]], tostring(srv.port), "100000", stdin = true }))
  T.defer(function()
    p:kill("SIGKILL")
  end)
  T.eq(p:read_line(10000), "sent")
  T.wait_for(function()
    return srv.last
  end, 3000, "the server's side open")
  timer.sleep(300) -- the server has read them all: the socket's buffers are full
  T.le(srv.last:buffered(), 127, "one pong waits, not one per ping")
  p:write("read\n") -- (a node that has seen its connection dropped has said so and exited)
  local got = json.decode((assert(p:read_line(10000))))
  T.eq(got.closed, nil, "not dropped as too slow: " .. T.fmt(got))
  T.lt(got.pongs, 100000, "fewer pongs than pings, the last one answered")
  T.eq(#srv.events, 1, "the connection is still open")
end)

-- p, a Node peer that upgrades, prints "upgraded" and stops reading: once
-- the server's side is open, sends to it until more than 100000 bytes wait
-- in its queue (the socket's buffers full).
local function fill_stalled(srv, p)
  T.eq(p:read_line(5000), "upgraded")
  T.wait_for(function()
    return srv.last
  end, 3000, "the server's side open")
  local chunk = string.rep("x", 65536)
  while srv.last:buffered() < 100000 do
    assert(srv.last:send(chunk))
    timer.sleep(1)
  end
end

T.test("frames after the peer's close frame are not read: its code stands, not a protocol error of what came after", function()
  local srv = echo_server({ ws_ping = 0 })
  -- Upgrades and stops reading; on stdin, sends a close (1000 "bye"), a
  -- text message and a frame of an unknown opcode in one write, then reads
  -- again (300 ms later) so that the answer to its close can go out.
  local p = assert(process.spawn({ "node", "-e", [[
const s = require("net").connect(+process.argv[1], "127.0.0.1", () => {
  s.write("GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
    "Sec-WebSocket-Key: " + require("crypto").randomBytes(16).toString("base64") + "\r\nSec-WebSocket-Version: 13\r\n\r\n");
  s.once("data", () => { s.pause(); console.log("upgraded"); });
});
process.stdin.once("data", () => {
  s.write(Buffer.concat([
    Buffer.from([0x88, 0x85, 0, 0, 0, 0, 0x03, 0xe8]), Buffer.from("bye"),
    Buffer.from([0x81, 0x85, 0, 0, 0, 0]), Buffer.from("after"),
    Buffer.from([0x83, 0x80, 0, 0, 0, 0]),
  ]));
  setTimeout(() => { s.on("data", () => {}); s.resume(); }, 300);
});
s.on("error", () => {});
setTimeout(() => {}, 60000);]], tostring(srv.port), stdin = true }))
  T.defer(function()
    p:kill("SIGKILL")
  end)
  -- The socket full, and a write left over: the answer to the close waits.
  fill_stalled(srv, p)
  local conn = srv.last
  p:write("go\n")
  T.eq(close_event(srv, 5000), { "close", 1000, "bye" }, "the peer's close, as it gave it")
  T.eq(conn:stats().messages_in, 0, "the message after the close frame is not delivered")
end)

T.test("conn:close() on a peer that reads nothing: the connection ends within 5 s, its queue with it", function()
  local srv = echo_server({ ws_ping = 0 })
  -- Upgrades, then never reads again.
  local p = assert(process.spawn({ "node", "-e", [[
const s = require("net").connect(+process.argv[1], "127.0.0.1", () => {
  s.write("GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
    "Sec-WebSocket-Key: " + require("crypto").randomBytes(16).toString("base64") + "\r\nSec-WebSocket-Version: 13\r\n\r\n");
  s.once("data", () => { s.pause(); console.log("upgraded"); });
});
setTimeout(() => {}, 60000);]], tostring(srv.port) }))
  T.defer(function()
    p:kill("SIGKILL")
  end)
  fill_stalled(srv, p)
  local t0 = timer.now()
  srv.last:close(1000, "bye")
  local ev = close_event(srv, 8000, "the close event")
  T.eq(ev[2], 1000)
  T.ok(timer.now() - t0 < 6500, "ended after the close deadline: " .. (timer.now() - t0) .. " ms")
  T.wait_for(function()
    return srv:connections() == 0 -- its socket goes right after the event
  end, 2000, "the connection gone")
end)

T.test("a wss:// host TLS cannot take (over 255 bytes) fails with ETLS naming it, and leaves nothing registered", function()
  local host = string.rep("a", 260)
  local function registry_size()
    collectgarbage()
    collectgarbage()
    local n = 0
    for _ in pairs(debug.getregistry()) do
      n = n + 1
    end
    return n
  end
  local before = registry_size()
  for _ = 1, 300 do
    local conn, err = ws.connect("wss://" .. host .. "/x", { headers = { Authorization = "Bearer sk-not-kept" } })
    T.eq(conn, nil)
    T.match(err, "^ETLS: cannot set up TLS for aaaaaaaaaaaaaaaaaaaa", "the host named (the message is cut at its buffer)")
  end
  T.ok(registry_size() - before < 10, "the failed connections' handlers were let go: "
    .. (registry_size() - before) .. " more registry entries")
end)

T.test("a negative max_message or max_send_queue is refused, not taken for no limit; a bad one leaks nothing", function()
  for _, k in ipairs({ "max_message", "max_send_queue" }) do
    local ok, err = pcall(ws.connect, "ws://127.0.0.1:1/x", { [k] = -1 })
    T.eq(ok, false, k .. " = -1")
    T.match(err, "must be >= 0")
    -- Raised after the connection was made: LSan (make SAN=1) finds it if it is lost.
    T.eq(pcall(ws.connect, "ws://127.0.0.1:1/x", { [k] = "big" }), false)
  end
  collectgarbage()
end)

T.test("connect_cb tells a connection that fails at once its error once, not twice", function()
  -- Out of descriptors, lws fails connections inside the connect call.
  local rc, out = run_with_64_fds("few_fds", [[
local ws, timer, task = require "callagent.ws", require "callagent.timer", require "callagent.task"
local srv = require("callagent.http").server({})
srv:websocket("/echo", { text = function(c, m) c:send(m) end })
assert(srv:listen())
local calls, failed, twice, keep = {}, 0, 0, {}
for i = 1, 60 do
  ws.connect_cb(srv:ws_url("/echo"), { timeout = 2000 }, function(c, e)
    calls[i] = (calls[i] or 0) + 1
    if calls[i] == 2 then twice = twice + 1 end
    if c then keep[#keep + 1] = c else failed = failed + 1 end
  end)
end
task.spawn(function()
  timer.sleep(2500)
  print(failed .. " failed, " .. twice .. " told twice")
  io.stdout:flush()
  os.exit(0)
end)
]], 20000)
  T.eq(rc, 0)
  local failed, twice
  for _, l in ipairs(out) do -- stderr's lines are there too
    failed, twice = l:match("^(%d+) failed, (%d+) told twice$")
    if failed then
      break
    end
  end
  T.ok(tonumber(failed or 0) > 0, "some connections failed: " .. table.concat(out, " | "))
  T.eq(twice, "0")
end)

T.run()
