-- The HTTP server (callagent.http) through real clients: callagent.fetch
-- and, for raw protocol abuse, curl.
local T = require "testing"
local http = require "callagent.http"
local fetch = require "callagent.fetch"
local timer = require "callagent.timer"
local task = require "callagent.task"
local json = require "callagent.json"
local process = require "callagent.process"
local certs = require "certs"

local server = T.server

-- Runs a command, returns its stdout (for curl, when fetch cannot send what we need).
local function run(argv)
  local out = {}
  local spec = { table.unpack(argv) }
  spec.on_stdout = function(line)
    out[#out + 1] = line
  end
  spec.on_stderr = false
  local p = assert(process.spawn(spec))
  local code = p:wait(10000)
  return table.concat(out, "\n"), code
end

T.test("listen on port 0 picks a free port and reports it", function()
  local a = server()
  local b = server()
  T.gt(a.port, 0)
  T.gt(b.port, 0)
  T.ne(a.port, b.port)
  T.eq(a.host, "127.0.0.1")
end)

T.test("listening on a port in use fails with EADDRINUSE, not a crash", function()
  local a = server()
  local b = http.server({ port = a.port })
  local ok, err = b:listen()
  T.eq(ok, nil)
  T.match(err, "^EADDRINUSE: ")
  local c = http.server({ host = "not-an-ip" })
  ok, err = c:listen()
  T.eq(ok, nil)
  T.match(err, "^EINVAL: ")
end)

T.test("routes by method and path with parameters, decoded query and headers", function()
  local srv = server({}, function(s)
    s:get("/calls/{id}/attempts/{n}", function(req)
      return 200, { id = req.params.id, n = req.params.n, q = req.query, ua = req.headers["x-test"], m = req.method }
    end)
    s:post("/calls/{id}/attempts/{n}", function(req)
      return 201, "posted " .. req.params.id
    end)
  end)
  local res = assert(fetch(srv:url("/calls/c_1/attempts/2?a=1&b=x%20y&a=3&e="), { headers = { ["X-Test"] = "hello" } }))
  T.eq(res.status, 200)
  T.eq(res.headers["content-type"], "application/json")
  local body = json.decode(res.body)
  T.eq(body, { id = "c_1", n = "2", q = { a = { "1", "3" }, b = "x y", e = "" }, ua = "hello", m = "GET" })
  res = assert(fetch(srv:url("/calls/c_9/attempts/1"), { method = "POST", body = "x" }))
  T.eq(res.status, 201)
  T.eq(res.body, "posted c_9")
  -- A parameter longer than 4 KiB, and the ones after it, arrive whole.
  local pad = string.rep("x", 5000)
  res = assert(fetch(srv:url("/calls/c_1/attempts/2?pad=" .. pad .. "&status=bogus&a=1")))
  T.eq(res.status, 200)
  T.eq(json.decode(res.body).q, { pad = pad, status = "bogus", a = "1" })
  -- An empty parameter is no end of the query.
  res = assert(fetch(srv:url("/calls/c_1/attempts/2?a=1&&b=2")))
  T.eq(json.decode(res.body).q, { a = "1", b = "2", [""] = "" })
end)

T.test("a request with Expect: 100-continue gets 100 Continue, then its answer, on the same connection", function()
  local srv = server({}, function(s)
    s:post("/echo", function(req)
      return 200, { n = #req.body }
    end)
  end)
  -- curl waits 1 s for the 100 before it sends the body anyway; with
  -- --expect100-timeout 10 a missing 100 shows as a 10 s wait.
  local body = string.rep("x", 3000)
  local t0 = timer.now()
  local out, code = run({ "curl", "-sS", "-v", "--expect100-timeout", "10", "-H", "Expect: 100-continue",
    "--data-binary", body, srv:url("/echo"), "--next", srv:url("/echo"), "--data-binary", "abc" })
  T.eq(code, 0)
  T.lt(timer.now() - t0, 5000, "the body went at once")
  T.eq(out, '{"n":3000}{"n":3}')
  -- An HTTP/1.0 request's expectation is ignored (RFC 9110 10.1.1): no 100.
  out, code = run({ "curl", "-sS", "-i", "--http1.0", "-H", "Expect: 100-continue", "--data-binary", "abc",
    srv:url("/echo") })
  T.eq(code, 0)
  T.no_match(out, "100 Continue")
  T.match(out, '^HTTP/1%.0 200 OK\r?\n.*{"n":3}$')
end)

T.test("answers say nosniff; JSON ones no-store; a handler's own Cache-Control and nosniff stand", function()
  local srv = http.server({})
  srv:get("/record", function()
    return 200, { callId = "c_1", transcript = { "callee: my address is ..." } }
  end)
  srv:get("/page", function()
    return 200, "<p>hi</p>", { ["Content-Type"] = "text/html" }
  end)
  srv:get("/cached", function()
    return 200, { ok = true }, { ["cache-control"] = "max-age=60", ["x-content-type-options"] = "nosniff" }
  end)
  srv:get("/boom", function()
    error("a handler's bug")
  end)
  assert(srv:listen())
  T.defer(function()
    srv:close()
  end)
  local function get(path)
    local res = assert(fetch(srv:url(path)))
    return { res.status, res.headers["x-content-type-options"], res.headers["cache-control"] }
  end
  T.eq(get("/record"), { 200, "nosniff", "no-store" }, "a call record")
  T.eq(get("/page"), { 200, "nosniff", nil }, "a page: its own caching")
  T.eq(get("/cached"), { 200, "nosniff", "max-age=60" }, "the handler's, once each")
  T.eq(get("/boom"), { 500, "nosniff", "no-store" }, "the 500")
  T.eq(get("/nowhere"), { 404, "nosniff", "no-store" }, "the 404")
  local res = assert(fetch(srv:url("/record"), { method = "POST" }))
  T.eq({ res.status, res.headers["x-content-type-options"], res.headers["cache-control"] }, { 405, "nosniff", "no-store" })
end)

T.test("the server's own refusals (411, 413, 400) say nosniff and no-store too, as the handlers' answers do", function()
  local srv = server({ max_body = 10 }, function(s)
    s:post("/up", function()
      return 200, "ok"
    end)
  end)
  local function answer(headers, body)
    local res = assert(fetch(srv:url("/up"), { method = "POST", headers = headers, body = body, timeout = 5000 }))
    return { res.status, res.headers["x-content-type-options"], res.headers["cache-control"] }
  end
  T.eq(answer({ ["Transfer-Encoding"] = "chunked" }, "hello"), { 411, "nosniff", "no-store" })
  T.eq(answer({}, string.rep("x", 20)), { 413, "nosniff", "no-store" })
  T.eq(answer({ ["Content-Length"] = "5x" }, "hello"), { 400, "nosniff", "no-store" })
end)

T.test("unknown path is 404 and a known path with another method is 405 with Allow", function()
  local srv = server({}, function(s)
    s:get("/only-get", function()
      return 200, "ok"
    end)
  end)
  local res = assert(fetch(srv:url("/nope")))
  T.eq(res.status, 404)
  T.eq(json.decode(res.body).error.code, "not_found")
  res = assert(fetch(srv:url("/only-get"), { method = "DELETE" }))
  T.eq(res.status, 405)
  T.eq(res.headers["allow"], "GET, HEAD")
  T.eq(json.decode(res.body).error.code, "method_not_allowed")
  -- HEAD wherever GET is (RFC 9110 9.3.2): the GET route's answer, no body.
  res = assert(fetch(srv:url("/only-get"), { method = "HEAD" }))
  T.eq({ res.status, res.body }, { 200, "" })
  T.eq(res.headers["content-length"], "2")
end)

T.test("request body, custom headers and status/headers/body of the response round-trip", function()
  local srv = server({ headers = { "x-twilio-signature" } }, function(s)
    s:post("/echo", function(req)
      return {
        status = 202,
        headers = { ["X-Sig"] = req.headers["x-twilio-signature"] or "none", ["X-Multi"] = { "a", "b" } },
        body = req.body:upper(),
      }
    end)
  end)
  local res = assert(fetch(srv:url("/echo"), {
    method = "POST",
    body = "hello body",
    headers = { ["X-Twilio-Signature"] = "abc=" },
  }))
  T.eq(res.status, 202)
  T.eq(res.body, "HELLO BODY")
  T.eq(res.headers["x-sig"], "abc=")
  T.eq(res.headers["x-multi"], "a, b")
end)

T.test("req:header reads any header, standard or not, while the handler runs", function()
  local srv = server({}, function(s)
    s:get("/h", function(req)
      return 200, { a = req:header("X-Not-Captured"), b = req:header("user-agent"), c = req:header("X-Absent") }
    end)
  end)
  local res = assert(fetch(srv:url("/h"), { headers = { ["X-Not-Captured"] = "yes", ["User-Agent"] = "tester/1" } }))
  T.eq(json.decode(res.body), { a = "yes", b = "tester/1" })
end)

T.test("a handler may wait (it runs in a task) while other requests are served", function()
  -- The slow handler waits until the test releases it, after the fast answer
  -- came; were handlers served one at a time, it would give up after 5 s.
  local started, released = false, false
  local srv = server({}, function(s)
    s:get("/slow", function()
      started = true
      local deadline = timer.now() + 5000
      while not released and timer.now() < deadline do
        timer.sleep(5)
      end
      return 200, released and "slow" or "not released"
    end)
    s:get("/fast", function()
      return 200, "fast"
    end)
  end)
  local slow_done
  task.spawn(function()
    local r = fetch(srv:url("/slow"))
    slow_done = r and r.body
  end)
  T.wait_for(function()
    return started
  end, 3000, "the slow request in its handler")
  local r = assert(fetch(srv:url("/fast")))
  T.eq(r.body, "fast")
  T.eq(slow_done, nil, "the fast request was answered while the slow one waited")
  released = true
  T.wait_for(function()
    return slow_done
  end, 3000, "slow request")
  T.eq(slow_done, "slow")
end)

T.test("an error in a handler answers 500 without details and the server keeps serving", function()
  local srv = server({}, function(s)
    s:get("/boom", function()
      error("secret internal detail")
    end)
    s:get("/ok", function()
      return 200, "ok"
    end)
  end)
  local res = assert(fetch(srv:url("/boom")))
  T.eq(res.status, 500)
  T.no_match(res.body, "secret internal detail")
  T.eq(json.decode(res.body).error.code, "internal")
  res = assert(fetch(srv:url("/ok")))
  T.eq(res.body, "ok")
end)

T.test("ten clients that hang up while their handlers run: each handler finishes, sees is_open() false, and the server serves on", function()
  local started, finished, open_after = 0, 0, nil
  local srv = server({}, function(s)
    s:post("/wait", function(req)
      started = started + 1
      timer.sleep(300)
      open_after = req._h and req._h:is_open()
      finished = finished + 1
      return 200, string.rep("x", 100000), { ["X-Big"] = "yes" }
    end)
    s:get("/ok", function()
      return 200, "ok"
    end)
  end)
  -- Ten clients send a request with a body, then hang up at once.
  local p = assert(process.spawn({ "node", "-e", [[
    const net = require('net');
    let left = 10;
    for (let i = 0; i < 10; i++) {
      const c = net.connect(+process.argv[1], '127.0.0.1', () => {
        c.end('POST /wait HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello', () => c.destroy());
      });
      c.on('error', () => {});
      c.on('close', () => { if (--left === 0) console.log('gone'); });
    }
  ]], tostring(srv.port) }))
  T.defer(function()
    p:kill()
  end)
  T.eq(p:read_line(5000), "gone")
  T.wait_for(function()
    return finished == started and started > 0 and srv:connections() == 0
  end, 5000, "handlers done and connections gone")
  T.eq(open_after, false, "the handler's request knows its client has gone")
  local res = assert(fetch(srv:url("/ok")))
  T.eq(res.body, "ok")
end)

T.test("a response with a header that cannot be sent answers 500 JSON without the headers it had taken", function()
  local srv = server({}, function(s)
    s:get("/bad", function()
      -- The first value is fine and taken before the second is refused.
      return 200, "body", { ["X-Taken"] = { "first", "bad\r\nX-Injected: yes" } }
    end)
  end)
  local res = assert(fetch(srv:url("/bad")))
  T.eq(res.status, 500)
  T.eq(json.decode(res.body).error.code, "internal")
  T.eq(res.headers["x-taken"], nil, "nothing of the refused response")
  T.eq(res.headers["x-injected"], nil)
  T.eq(res.headers["content-type"], "application/json")
end)

T.test("headers returned as a string, not a table, answer 500 JSON, and the request is no longer in flight", function()
  local srv = server({}, function(s)
    s:get("/str", function()
      return 200, "<p>hi</p>", "text/html"
    end)
  end)
  local res = assert(fetch(srv:url("/str"), { timeout = 3000 }))
  T.eq(res.status, 500)
  T.eq(json.decode(res.body).error.code, "internal")
  T.eq(res.headers["x-content-type-options"], "nosniff")
  T.eq(srv.in_flight, 0, "the handler's request is done")
end)

T.test("returning nothing answers 204; a table body is JSON with [] for marked empty arrays", function()
  local srv = server({}, function(s)
    s:get("/none", function() end)
    s:get("/json", function()
      return 200, { list = json.array(), url = "http://x/y" }
    end)
  end)
  local res = assert(fetch(srv:url("/none")))
  T.eq(res.status, 204)
  T.eq(res.body, "")
  res = assert(fetch(srv:url("/json")))
  T.match(res.body, '"list":%[%]')
  T.match(res.body, '"url":"http://x/y"')
end)

T.test("static files are served with their content types; .. and missing files are 404", function()
  local dir = T.tmpdir()
  local function write(name, data)
    local f = assert(io.open(dir .. "/" .. name, "wb"))
    f:write(data)
    f:close()
  end
  write("index.html", "<h1>hi</h1>")
  write("app.js", "console.log(1)")
  write("style.css", "body{}")
  write("data.json", "{}")
  write("sound.wav", "RIFF")
  local srv = server({}, function(s)
    s:static("/app/", dir)
  end)
  local cases = {
    { "/app/", "text/html; charset=utf-8", "<h1>hi</h1>" },
    { "/app/index.html", "text/html; charset=utf-8", "<h1>hi</h1>" },
    { "/app/app.js", "text/javascript; charset=utf-8", "console.log(1)" },
    { "/app/style.css", "text/css; charset=utf-8", "body{}" },
    { "/app/data.json", "application/json", "{}" },
    { "/app/sound.wav", "audio/wav", "RIFF" },
  }
  for _, c in ipairs(cases) do
    local res = assert(fetch(srv:url(c[1])))
    T.eq(res.status, 200, c[1])
    T.eq(res.headers["content-type"], c[2], c[1])
    T.eq(res.body, c[3], c[1])
  end
  T.eq(assert(fetch(srv:url("/app/missing.txt"))).status, 404)
  local out = run({ "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--path-as-is", srv:url("/app/../../etc/passwd") })
  T.ne(out, "200", "path traversal")
end)

T.test("a line break encoded in the URI cannot add header lines: 400, for requests and WebSocket upgrades", function()
  -- libwebsockets decodes %0a / %0d in the URI and ends the request line
  -- there: what follows would be read as a header of the client's choosing.
  local ran = false
  local srv = server({}, function(s)
    s:get("/who", function(req)
      ran = true
      return 200, { host = req.headers.host, injected = req.headers["x-injected"] }
    end)
    s:websocket("/ws", { open = function() end })
  end)
  local base = srv:url("")
  for _, esc in ipairs({ "%0a", "%0d%0a", "%0d" }) do
    local out = run({ "curl", "-s", "-i", "--path-as-is", base .. "/who?x=" .. esc .. "X-Injected:yes" })
    T.match(out, "^HTTP/1%.%d 400 ", esc .. ": " .. out)
    T.match(out, '"code":"bad_request"', esc)
    T.no_match(out, "yes", esc)
    out = run({ "curl", "-s", "-i", "--path-as-is", "-H", "Connection: Upgrade", "-H", "Upgrade: websocket",
      "-H", "Sec-WebSocket-Version: 13", "-H", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
      base .. "/ws?x=" .. esc .. "Host:localhost" })
    T.match(out, "^HTTP/1%.%d 400 ", "upgrade " .. esc .. ": " .. out)
  end
  T.eq(ran, false, "no handler ran")
  -- An encoded line break elsewhere than a URI is just data.
  local res = assert(fetch(srv:url("/who?x=%25%30a")))
  T.eq(res.status, 200)
end)

T.test("a % without two hex digits after it, in the path or the query, is refused (libwebsockets' 403); no handler runs", function()
  local ran = false
  local srv = server({}, function(s)
    s:get("/p/{x}", function(req)
      ran = true
      return 200, req.params.x
    end)
  end)
  local base = srv:url("")
  for _, bad in ipairs({ "/p/%zz", "/p/a%", "/p/a%2", "/p/a?x=%zz", "/p/a?x=1%2" }) do
    local out = run({ "curl", "-s", "-i", "--path-as-is", base .. bad })
    T.match(out, "^HTTP/1%.%d 403 ", bad .. ": " .. out)
  end
  T.eq(ran, false, "no handler ran")
  local res = assert(fetch(srv:url("/p/%41b?x=%7a")))
  T.eq({ res.status, res.body }, { 200, "Ab" }, "a valid one is decoded, and the server serves on")
end)

T.test("a body over max_body is refused with 413 JSON and logged, not read", function()
  local got = false
  local srv = server({ max_body = 1000 }, function(s)
    s:post("/up", function(req)
      got = true
      return 200, tostring(#req.body)
    end)
  end)
  local res = assert(fetch(srv:url("/up"), { method = "POST", body = string.rep("x", 1000) }))
  T.eq(res.status, 200)
  T.eq(res.body, "1000")
  got = false
  res = assert(fetch(srv:url("/up"), { method = "POST", body = string.rep("x", 5000) }))
  T.eq(res.status, 413)
  T.eq(json.decode(res.body).error.code, "payload_too_large")
  T.eq(got, false, "the handler never saw it")
  -- The server still works.
  res = assert(fetch(srv:url("/up"), { method = "POST", body = "y" }))
  T.eq(res.body, "1")
end)

T.test("over max_connections new requests get 503 while existing ones finish", function()
  local release = false
  local srv = server({ max_connections = 3 }, function(s)
    s:get("/hold", function()
      T.wait_for(function()
        return release
      end, 10000)
      return 200, "held"
    end)
    s:get("/ping", function()
      return 200, "pong"
    end)
  end)
  local results = {}
  for i = 1, 3 do
    task.spawn(function()
      -- Connection: close, so the finished requests free their slots at once
      -- instead of idling in the client's keep-alive pool.
      local r = fetch(srv:url("/hold"), { headers = { Connection = "close" } })
      results[i] = r and r.status
    end)
  end
  T.wait_for(function()
    return srv:connections() >= 3
  end, 3000, "three held connections")
  local res = assert(fetch(srv:url("/ping")))
  T.eq(res.status, 503)
  T.eq(json.decode(res.body).error.code, "busy")
  release = true
  T.wait_for(function()
    return results[1] and results[2] and results[3]
  end, 5000, "held requests")
  T.eq(results, { 200, 200, 200 })
  T.wait_for(function()
    return srv:connections() < 3
  end, 5000, "connections to close")
  res = assert(fetch(srv:url("/ping")))
  T.eq(res.status, 200)
end)

-- n idle TCP connections to port, held by a node child until it is killed
-- (its soft descriptor limit raised to the hard one first).
local function idle_connections(port, n)
  local p = assert(process.spawn({ "sh", "-c", 'ulimit -n "$(ulimit -Hn)"; exec node -e "$0" "$@"', [[
const net = require("net"); let open = 0; const all = [];
for (let i = 0; i < +process.argv[2]; i++) {
  const s = net.connect(+process.argv[1], "127.0.0.1", () => { if (++open === +process.argv[2]) console.log("ready"); });
  s.on("error", e => { console.log("error " + e.code); process.exit(1); }); all.push(s);
}]], tostring(port), tostring(n) }))
  T.defer(function()
    p:kill("SIGKILL")
  end)
  T.eq(p:read_line(15000), "ready", n .. " idle connections")
  return p
end

T.test("a thousand idle connections and more starve no request; past max_connections it gets 503 at once", function()
  local hard = tonumber(io.popen("sh -c 'ulimit -Hn'"):read("l")) or math.huge
  assert(hard >= 2600, "this test holds 1,300 connections at each end: raise the hard limit of open files (ulimit -Hn is "
    .. tostring(hard) .. ")")
  local srv = server({ max_connections = 1200 }, function(s)
    s:get("/ping", function()
      return 200, "pong"
    end)
  end)
  -- Each holds a request head's buffer from its accept: lws had 1024 of them.
  idle_connections(srv.port, 1100)
  T.wait_for(function()
    return srv:connections() >= 1100
  end, 10000, "1100 connections accepted")
  local t0 = timer.now()
  local res = assert(fetch(srv:url("/ping"), { timeout = 5000 }))
  T.eq(res.status, 200)
  T.ok(timer.now() - t0 < 2000, "answered at once: " .. (timer.now() - t0) .. " ms")
  idle_connections(srv.port, 150)
  T.wait_for(function()
    return srv:connections() >= 1250
  end, 10000, "1250 connections accepted")
  t0 = timer.now()
  res = assert(fetch(srv:url("/ping"), { timeout = 5000 }))
  T.eq(res.status, 503)
  T.eq(json.decode(res.body).error.code, "busy")
  T.ok(timer.now() - t0 < 2000, "refused at once: " .. (timer.now() - t0) .. " ms")
end)

-- Two requests in one write, the first with Connection: `conn`: what came
-- back before the server closed the connection (checked to be within 3 s),
-- and the requests its handler ran.
local function close_then_another(conn)
  local ran = {}
  local srv = server({}, function(s)
    s:get("/p/{x}", function(req)
      ran[#ran + 1] = req.params.x
      return 200, req.params.x
    end)
  end)
  local p = assert(process.spawn({ "node", "-e", [[
    const c = require('net').connect(+process.argv[1], '127.0.0.1', () =>
      c.write('GET /p/first HTTP/1.1\r\nHost: x\r\nConnection: ' + process.argv[2] + '\r\n\r\nGET /p/second HTTP/1.1\r\nHost: x\r\n\r\n'));
    let out = '';
    c.on('data', (d) => { out += d; });
    c.on('error', () => {});
    c.on('close', () => { console.log(JSON.stringify(out)); process.exit(0); });
    setTimeout(() => { console.log('still open'); process.exit(0); }, 3000);
  ]], tostring(srv.port), conn }))
  local out = assert(p:read_line(5000))
  T.ne(out, "still open")
  return json.decode(out), ran
end

T.test("a request with Connection: close gets Connection: close, and a request after it on that connection no answer", function()
  local out, ran = close_then_another("Keep-Alive, Close")
  T.match(out, "^HTTP/1%.1 200 ")
  T.match(out:lower(), "\r\nconnection: close\r\n", "the answer says it closes")
  T.match(out, "\r\n\r\nfirst$", "one answer only")
  T.eq(ran, { "first" })
end)

T.test("a Connection header of 300 bytes with close among its options closes too (not only one that fits 256)", function()
  local conn = "keep-alive, " .. string.rep("x-option-", 32) .. ", close"
  T.gt(#conn, 300)
  local out, ran = close_then_another(conn)
  T.match(out:lower(), "\r\nconnection: close\r\n", "the answer says it closes")
  T.match(out, "\r\n\r\nfirst$", "one answer only")
  T.eq(ran, { "first" })
end)

T.test("HEAD gets the headers of GET without a body", function()
  local srv = server({}, function(s)
    s:route("HEAD", "/x", function()
      return 200, "abcdef", { ["Content-Type"] = "text/plain" }
    end)
  end)
  local out = run({ "curl", "-s", "-I", srv:url("/x") })
  T.match(out:lower(), "content%-length: 6")
  T.no_match(out, "abcdef")
end)

-- Sends each request on one connection once the answers before it have
-- begun; returns all the bytes the server sent (the last request closes).
local function one_connection(port, requests)
  local p = assert(process.spawn({ "node", "-e", [[
    const reqs = JSON.parse(process.argv[2]);
    const c = require('net').connect(+process.argv[1], '127.0.0.1');
    let out = '', sent = 0;
    const next = () => { if (sent < reqs.length) c.write(reqs[sent++]); };
    c.on('connect', next);
    c.on('data', (d) => {
      out += d.toString('latin1');
      if ((out.match(/HTTP\/1\.1 /g) || []).length >= sent) setTimeout(next, 50);
    });
    c.on('error', () => {});
    c.on('close', () => { console.log(JSON.stringify(out)); process.exit(0); });
    setTimeout(() => { console.log(JSON.stringify('still open: ' + out)); process.exit(0); }, 4000);
  ]], tostring(port), json.encode(requests) }))
  return (json.decode((assert(p:read_line(6000)))))
end

T.test("204, 304 and HEAD answers carry no body whatever the handler returns; the kept-alive connection goes on", function()
  local srv = server({}, function(s)
    s:get("/204", function()
      return 204, "a 204's body"
    end)
    s:get("/304", function()
      return 304, "a 304's body", { ETag = '"v1"' }
    end)
    s:get("/get", function()
      return 200, "the GET's body", { ["Content-Type"] = "text/plain" }
    end)
  end)
  local out = one_connection(srv.port, {
    "GET /204 HTTP/1.1\r\nHost: x\r\n\r\n",
    "GET /304 HTTP/1.1\r\nHost: x\r\n\r\n",
    "HEAD /get HTTP/1.1\r\nHost: x\r\n\r\n",
    "GET /get HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
  })
  T.no_match(out, "^still open")
  T.no_match(out, "a 204's body")
  T.no_match(out, "a 304's body")
  local heads = {}
  for head in out:gmatch("HTTP/1%.1 .-\r\n\r\n") do
    heads[#heads + 1] = head:lower()
  end
  T.eq(#heads, 4, out)
  T.match(heads[1], "^http/1%.1 204 ")
  T.no_match(heads[1], "content%-length", "a 204 has no Content-Length (RFC 9110 8.6)")
  T.match(heads[2], "^http/1%.1 304 ")
  T.match(heads[2], 'etag: "v1"')
  T.no_match(heads[2], "content%-length", "nor a 304 (it would have to be the 200's)")
  T.match(heads[3], "^http/1%.1 200 ")
  T.match(heads[3], "content%-length: 14\r\n", "HEAD: the GET's Content-Length")
  T.match(heads[4], "^http/1%.1 200 ")
  T.match(out, "\r\n\r\nthe GET's body$", "the GET's body once, after the last head")
  T.eq(select(2, out:gsub("the GET's body", "")), 1)
  -- A real client on the same connection: curl reuses it for the next URL.
  local codes = run({ "curl", "-s", "-o", "/dev/null", "-o", "/dev/null", "-w", "%{http_code} %{num_connects}\n",
    srv:url("/204"), srv:url("/get") })
  T.eq(codes, "204 1\n200 0")
end)

T.test("a handler's Content-Length, Transfer-Encoding and Connection are the server's: not sent; Connection: close closes", function()
  local srv = server({}, function(s)
    s:get("/length", function()
      return 200, "hello", { ["Content-Length"] = "10", ["Content-Type"] = "text/plain" }
    end)
    s:get("/chunked", function()
      return 200, "chunk", { ["transfer-encoding"] = "chunked" }
    end)
    s:get("/empty", function()
      return 204, "", { ["CONTENT-LENGTH"] = "0", Connection = { "keep-alive", "Upgrade" } }
    end)
    s:get("/close", function()
      return 200, "bye", { Connection = "keep-alive , Close" }
    end)
  end)
  local out = one_connection(srv.port, {
    "GET /length HTTP/1.1\r\nHost: x\r\n\r\n",
    "GET /chunked HTTP/1.1\r\nHost: x\r\n\r\n",
    "GET /empty HTTP/1.1\r\nHost: x\r\n\r\n",
    "GET /close HTTP/1.1\r\nHost: x\r\n\r\n",
    "GET /length HTTP/1.1\r\nHost: x\r\n\r\n",
  })
  local heads = {}
  for head in out:gmatch("HTTP/1%.1 .-\r\n\r\n") do
    heads[#heads + 1] = head:lower()
  end
  T.no_match(out, "^still open", "closed by the server after /close")
  T.eq(#heads, 4, out)
  T.eq(select(2, heads[1]:gsub("content%-length", "")), 1, heads[1])
  T.match(heads[1], "content%-length: 5\r\n")
  T.no_match(heads[2], "transfer%-encoding", heads[2])
  T.match(heads[2], "content%-length: 5\r\n")
  T.no_match(heads[3], "content%-length")
  T.no_match(heads[3], "connection", heads[3])
  T.eq(select(2, heads[4]:gsub("connection:", "")), 1, heads[4])
  T.match(heads[4], "connection: close\r\n")
  T.match(out, "\r\n\r\nhelloHTTP/1%.1 200 ", "the bodies are framed by their own lengths")
  T.match(out, "\r\n\r\nchunkHTTP/1%.1 204 ")
end)

T.test("status lines carry RFC 9110's reason phrase (204 No Content, not lws' empty one; 305 Use Proxy, not lws' Redirect; 413 Content Too Large, not lws' RFC 2616 one); a 204 keeps no Content-Length of the handler's", function()
  local srv = server({}, function(s)
    for _, st in ipairs({ 204, 201, 301, 305, 422, 407, 413, 414, 416 }) do
      s:get("/" .. st, function()
        return st, "", { ["Content-Length"] = "0", ["X-Mine"] = "kept" }
      end)
    end
  end)
  local out = one_connection(srv.port, {
    "GET /204 HTTP/1.1\r\nHost: x\r\n\r\n",
    "GET /201 HTTP/1.1\r\nHost: x\r\n\r\n",
    "GET /301 HTTP/1.1\r\nHost: x\r\n\r\n",
    "GET /305 HTTP/1.1\r\nHost: x\r\n\r\n",
    "GET /422 HTTP/1.0\r\nHost: x\r\n\r\n",
  })
  -- lws writes RFC 2616's words for these ("Request Entity Too Large").
  local late = one_connection(srv.port, {
    "GET /407 HTTP/1.1\r\nHost: x\r\n\r\n",
    "GET /413 HTTP/1.1\r\nHost: x\r\n\r\n",
    "GET /414 HTTP/1.1\r\nHost: x\r\n\r\n",
    "GET /416 HTTP/1.1\r\nHost: x\r\n\r\n",
  })
  local late_lines = {}
  for line in late:gmatch("(HTTP/1%.1 %d%d%d [^\r]*)\r\n") do
    late_lines[#late_lines + 1] = line
  end
  T.eq(late_lines, { "HTTP/1.1 407 Proxy Authentication Required", "HTTP/1.1 413 Content Too Large",
    "HTTP/1.1 414 URI Too Long", "HTTP/1.1 416 Range Not Satisfiable" })
  local heads = {}
  for head in out:gmatch("HTTP/1%.%d .-\r\n\r\n") do
    heads[#heads + 1] = head
  end
  T.eq(#heads, 5, out)
  local lines = {}
  for i, head in ipairs(heads) do
    lines[i] = head:match("^(.-)\r\n")
    T.match(head, "\r\nx%-mine: kept\r\n", "the headers after the status line intact: " .. lines[i])
  end
  T.eq(lines, { "HTTP/1.1 204 No Content", "HTTP/1.1 201 Created", "HTTP/1.1 301 Moved Permanently",
    "HTTP/1.1 305 Use Proxy", "HTTP/1.0 422 Unprocessable Content" })
  T.no_match(heads[1]:lower(), "content%-length", "a 204 has no Content-Length (RFC 9110 8.6), not even the handler's")
  T.match(heads[2]:lower(), "\r\ncontent%-length: 0\r\n", "a 201: the server's own, once")
  T.eq(select(2, heads[2]:lower():gsub("content%-length", "")), 1)
end)

T.test("a handler's 1xx is no final answer: 500, logged, and the kept-alive connection goes on", function()
  local log = require "callagent.log"
  local error_ = log.error
  local logged = {}
  log.error = function(msg, fields)
    logged[#logged + 1] = msg .. " " .. tostring(fields and fields.error)
    return error_(msg, fields)
  end
  T.defer(function()
    log.error = error_
  end)
  local srv = server({}, function(s)
    s:get("/100", function()
      return 100, "a 100's body"
    end)
    s:get("/ok", function()
      return 200, "ok"
    end)
  end)
  local out = one_connection(srv.port, {
    "GET /100 HTTP/1.1\r\nHost: x\r\n\r\n",
    "GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
  })
  T.no_match(out, "a 100's body")
  T.match(out, "^HTTP/1%.1 500 ")
  T.match(out, '"code":"internal"')
  T.match(out, "\r\n\r\nok$")
  T.eq(#logged, 1)
  T.match(logged[1], "^http response could not be sent .*HTTP status must be 200%.%.599")
end)

T.test("on_no_route sees each 404 and 405 with its error, the path without its query; its own error keeps no answer back", function()
  local seen = {}
  local srv = server({}, function(s)
    s:get("/only-get", function()
      return 200, "x"
    end)
    s:on_no_route(function(req, status, e)
      seen[#seen + 1] = table.concat({ req.method, req.path, status, e.code }, " ")
      error("a bug of the hook's")
    end)
  end)
  local res = assert(fetch(srv:url("/nope?key=secret")))
  T.eq({ res.status, json.decode(res.body).error.code }, { 404, "not_found" })
  res = assert(fetch(srv:url("/only-get"), { method = "POST" }))
  T.eq({ res.status, json.decode(res.body).error.code, res.headers["allow"] }, { 405, "method_not_allowed", "GET, HEAD" })
  T.eq(assert(fetch(srv:url("/only-get"))).status, 200)
  T.eq(seen, { "GET /nope 404 not_found", "POST /only-get 405 method_not_allowed" })
end)

T.test("on_no_route may answer instead, as a handler; an unusable answer leaves the 404", function()
  local srv = server({}, function(s)
    s:on_no_route(function(req)
      if req.path == "/guarded" then
        return 401, { error = { code = "unauthorized", message = "no" } }, { ["WWW-Authenticate"] = "Bearer" }
      elseif req.path == "/odd" then
        return 42
      end
    end)
  end)
  local res = assert(fetch(srv:url("/guarded")))
  T.eq({ res.status, json.decode(res.body).error.code, res.headers["www-authenticate"] }, { 401, "unauthorized",
    "Bearer" })
  T.eq(res.headers["content-type"], "application/json")
  res = assert(fetch(srv:url("/odd")))
  T.eq({ res.status, json.decode(res.body).error.code }, { 404, "not_found" })
  res = assert(fetch(srv:url("/other")))
  T.eq({ res.status, json.decode(res.body).error.code }, { 404, "not_found" }, "nothing returned: the 404")
end)

T.test("keep-alive: many sequential requests reuse one connection", function()
  local peers = {}
  local srv = server({}, function(s)
    s:get("/n", function(req)
      peers[req.remote] = true
      return 200, "n"
    end)
  end)
  for _ = 1, 20 do
    T.eq(assert(fetch(srv:url("/n"))).body, "n")
  end
  T.eq(srv:connections(), 1)
end)

T.test("https: a TLS listener serves clients that trust its CA", function()
  local c = certs.make(T.tmpdir())
  local srv = server({ tls = { cert = c.cert, key = c.key } }, function(s)
    s:get("/secure", function()
      return 200, "secret ok"
    end)
  end)
  T.match(srv:url("/"), "^https://")
  local res = assert(fetch(srv:url("/secure"), { ca_file = c.ca }))
  T.eq(res.body, "secret ok")
  local bad, err = fetch(srv:url("/secure"))
  T.eq(bad, nil)
  T.match(err, "^ETLS")
end)

T.test("a TLS listener with a missing key file fails with ETLS at listen", function()
  local srv = http.server({ tls = { cert = "/nonexistent/cert.pem", key = "/nonexistent/key.pem" } })
  local ok, err = srv:listen()
  T.eq(ok, nil)
  T.match(err, "^ETLS: cannot read")
end)

T.test("close frees the port at once (inside a task), is idempotent, and a new server serves on it", function()
  local srv = http.server({})
  srv:get("/", function()
    return 200, "x"
  end)
  assert(srv:listen())
  local port = srv.port
  srv:close()
  srv:close()
  local res, err = fetch("http://127.0.0.1:" .. port .. "/", { timeout = 2000 })
  T.eq(res, nil)
  T.match(err, "^ECONNREFUSED")
  local again = http.server({ port = port })
  again:get("/", function()
    return 200, "again"
  end)
  T.ok(again:listen(), "the same port can be bound again")
  res, err = fetch("http://127.0.0.1:" .. port .. "/", { timeout = 2000 })
  T.ok(res, err)
  T.eq(res.body, "again", "the new server answers on the old port")
  again:close()
end)

T.test("close with drain_ms answers the requests in progress first; meanwhile new connections are refused and a kept-alive one gets 503", function()
  local srv = http.server({})
  local started = false
  srv:get("/slow", function()
    started = true
    timer.sleep(400)
    return 200, "slow done"
  end)
  srv:get("/fast", function()
    return 200, "fast"
  end)
  assert(srv:listen())
  local slow
  task.spawn(function()
    slow = { fetch(srv:url("/slow"), { timeout = 5000 }) }
  end)
  T.wait_for(function()
    return started
  end, 10000, "the slow request to start")
  T.eq(assert(fetch(srv:url("/fast"))).body, "fast", "a second connection, left open (kept alive)")
  T.eq(srv:connections(), 2)
  local cut, took
  task.spawn(function()
    local t0 = timer.now()
    cut = srv:close({ drain_ms = 3000 })
    took = timer.now() - t0
  end)
  timer.sleep(50)
  local res, err = fetch(srv:url("/fast"), { timeout = 2000 })
  T.ok(res, err)
  T.eq(res.status, 503, "a request on the kept-alive connection while draining")
  T.eq(json.decode(res.body).error.code, "closing")
  T.eq(res.headers["connection"], "close")
  res, err = fetch(srv:url("/fast"), { timeout = 2000 })
  T.eq(res, nil, "a new connection while draining")
  T.match(err, "^ECONNREFUSED")
  T.wait_for(function()
    return took ~= nil
  end, 5000, "the close to end")
  T.ok(slow[1], slow[2])
  T.eq(slow[1].status, 200, "the request in progress was answered")
  T.eq(slow[1].body, "slow done")
  T.eq(slow[1].headers["connection"], "close", "and its connection closed after it")
  T.eq(cut, 0, "nothing cut off")
  T.ge(took, 250, "the close waited for it")
  T.lt(took, 2000, "and no longer")
  T.eq(srv:connections(), 0)
end)

T.test("close with drain_ms cuts off a request still in progress when the time is up, and says so", function()
  local srv = http.server({})
  local started = false
  srv:get("/hang", function()
    started = true
    timer.sleep(5000)
    return 200, "late"
  end)
  assert(srv:listen())
  local res, err, done
  task.spawn(function()
    res, err = fetch(srv:url("/hang"), { timeout = 8000 })
    done = true
  end)
  -- The request must be in its handler for the close to cut it off: waited
  -- for, not assumed after a sleep.
  T.wait_for(function()
    return started
  end, 10000, "the request to reach its handler")
  local t0 = timer.now()
  T.eq(srv:close({ drain_ms = 300 }), 1, "one request cut off")
  local took = timer.now() - t0
  T.ge(took, 250)
  T.lt(took, 1500, "the close did not wait for the handler")
  T.wait_for(function()
    return done
  end, 3000, "the client to see the cut")
  T.eq(res, nil, "no answer: " .. tostring(res and res.status))
  T.ok(err, "an error")
  T.eq(srv:close({ drain_ms = 300 }), 0, "closing again is a no-op")
end)

T.test("servers side by side answer their own requests, over kept-alive connections, until each closes", function()
  local a = http.server({})
  a:get("/who", function()
    return 200, "a"
  end)
  assert(a:listen())
  local b = http.server({})
  b:get("/who", function()
    return 200, "b"
  end)
  assert(b:listen())
  for _ = 1, 3 do
    T.eq(assert(fetch(a:url("/who"))).body, "a")
    T.eq(assert(fetch(b:url("/who"))).body, "b")
  end
  T.eq(a:connections(), 1, "a's keep-alive connection")
  T.eq(b:connections(), 1, "b's keep-alive connection")
  a:close()
  T.eq(assert(fetch(b:url("/who"))).body, "b", "b after a closed")
  b:close()
end)

T.test("200 concurrent requests are all answered correctly", function()
  local srv = server({}, function(s)
    s:get("/n/{i}", function(req)
      timer.sleep(math.random(1, 20))
      return 200, "n=" .. req.params.i
    end)
  end)
  local fns = {}
  for i = 1, 200 do
    fns[i] = function()
      local r = fetch(srv:url("/n/" .. i))
      return r and r.body
    end
  end
  local bodies = { task.all(fns) }
  for i = 1, 200 do
    T.eq(bodies[i], "n=" .. i)
  end
end)

-- One callagent with two servers, paced (the default) and not, on the same
-- routes: POST /burn?ms=N keeps the loop busy N ms; GET /stats says the
-- loop's longest iteration since POST /window and the most /burn requests
-- this server ran in one pass of the loop. Returns both base URLs.
local function paced_and_unpaced()
  local p = T.spawn_app(nil, nil, {
    source = [[
local http = require "callagent.http"
local core = require "callagent.core"
local task = require "callagent.task"
local timer = require "callagent.timer"
local function serve(pace)
  local srv = http.server({ pace = pace })
  local per_pass, most = {}, 0
  srv:post("/burn", function(req)
    local pass = core.loop_stats().iterations
    per_pass[pass] = (per_pass[pass] or 0) + 1
    most = math.max(most, per_pass[pass])
    local t, ms = timer.now(), tonumber(req.query.ms)
    while timer.now() - t < ms do end
    return 200, "burnt"
  end)
  srv:post("/window", function()
    core.loop_window(60)
  end)
  srv:get("/stats", function()
    return 200, { ms = core.loop_stats().max_iteration_ms, most = most }
  end)
  assert(srv:listen())
  return srv.port
end
task.spawn(function()
  print(serve(nil) .. " " .. serve(false))
  io.stdout:flush()
end)
]],
  })
  local deadline = timer.now() + 10000
  while not p.out[1] and timer.now() < deadline do
    timer.sleep(10)
  end
  local paced, unpaced = (p.out[1] or ""):match("^(%d+) (%d+)$")
  T.ok(paced, "the app listens: " .. p.errtext())
  return "http://127.0.0.1:" .. paced, "http://127.0.0.1:" .. unpaced
end

-- n concurrent POST /burn?ms=ms to base, each answered.
local function burst(base, n, ms)
  local fns = {}
  for i = 1, n do
    fns[i] = function()
      local r = fetch(base .. "/burn?ms=" .. ms, { method = "POST", timeout = 60000 })
      return r and r.body
    end
  end
  local bodies = { task.all(fns) }
  for i = 1, n do
    T.eq(bodies[i], "burnt", "request " .. i .. " answered")
  end
end

local function stats(base)
  return json.decode(fetch(base .. "/stats").body)
end

T.test("a burst of heavy requests takes turns with the loop's I/O (pace) instead of holding it up", function()
  -- Each request costs 5 ms of CPU. How many requests one pass of the loop
  -- ran is what anything else there (a live call's audio) would have waited
  -- for; the longest iteration says the same in ms, but as wall time it also
  -- holds whatever a busy machine took away, so it is only reported.
  local paced_base, unpaced_base = paced_and_unpaced()
  local function run(base)
    T.eq(fetch(base .. "/window", { method = "POST" }).status, 204)
    burst(base, 40, 5)
    return stats(base)
  end
  local paced = run(paced_base)
  local unpaced = run(unpaced_base)
  T.diag(string.format("over 40 requests of 5 ms: the longest loop iteration %.1f ms paced, %.1f ms unpaced;"
    .. " at most %d and %d requests in one pass", paced.ms, unpaced.ms, paced.most, unpaced.most))
  -- One that came when the loop was idle, and one whose turn came after the poll.
  T.le(paced.most, 2, "paced: one request's work per poll")
  T.ge(unpaced.most, 5, "unpaced, the requests that came together ran in one pass (what pacing prevents)")
end)

T.test("requests still waiting their turn when the server closes are refused, and their handlers never run", function()
  local srv = http.server({})
  local ran, ran_after_close, closed = 0, 0, false
  srv:post("/work", function()
    ran = ran + 1
    if closed then
      ran_after_close = ran_after_close + 1
    end
    local t0 = os.clock()
    while os.clock() - t0 < 0.005 do -- 5 ms of work: the next request waits its turn
    end
    if ran == 2 then -- the others came with the first: they wait their turn now
      closed = true
      task.spawn(function()
        srv:close()
      end)
    end
    return 200, { ok = true }
  end)
  assert(srv:listen())
  local base = srv:url("")
  local statuses, pending = {}, 20
  for i = 1, 20 do
    task.spawn(function()
      local res = fetch(base .. "/work", { method = "POST", timeout_ms = 5000 })
      statuses[i] = res and res.status or "error"
      pending = pending - 1
    end)
  end
  T.wait_for(function()
    return pending == 0
  end, 10000, "every request answered or refused")
  T.eq(ran_after_close, 0, "no handler ran after the close")
  local n200 = 0
  for _, st in pairs(statuses) do
    n200 = n200 + (st == 200 and 1 or 0)
  end
  T.eq(ran, 2)
  T.le(n200, 2, "the others were refused (503, or their connection closed with the server)")
end)

T.test("on a loop saturated with I/O, paced requests still get a share of each pass, not one each", function()
  -- Unpaced requests of 30 ms stand for a saturated loop's audio: each pass
  -- of the loop runs several of them. Paced requests of 3 ms waiting
  -- meanwhile get a tenth of each pass's I/O time, so several run per pass;
  -- a budget of task.pace_ms alone (2 ms) would let one through per pass,
  -- and a few hundred calls' set-up would starve.
  local paced_base, unpaced_base = paced_and_unpaced()
  local working = true
  for _ = 1, 8 do
    task.spawn(function()
      while working do
        fetch(unpaced_base .. "/burn?ms=30", { method = "POST", timeout = 20000 })
      end
    end)
  end
  timer.sleep(200)
  local t0 = timer.now()
  burst(paced_base, 60, 3)
  local took = timer.now() - t0
  working = false
  local most = stats(paced_base).most
  T.diag(string.format("60 paced requests of 3 ms beside 8 streams of 30 ms unpaced ones: %.0f ms, at most %d in one pass",
    took, most))
  T.ge(most, 3, "several paced requests in one pass of the saturated loop")
end, { timeout = 120000 })

T.test("a response with a thousand headers goes out whole", function()
  local many = {}
  for i = 1, 1000 do
    many[i] = "c" .. i
  end
  local srv = server({}, function(s)
    s:get("/many", function()
      return 200, "ok", { ["X-Many"] = many }
    end)
  end)
  local res, err = fetch(srv:url("/many"), { timeout = 5000 })
  T.ok(res, err)
  T.eq(res.status, 200)
  T.eq(res.body, "ok")
  T.eq(res.headers["x-many"], table.concat(many, ", "))
end)

T.test("a client that never reads its response is dropped once the response makes no progress for response_idle s", function()
  local big = string.rep("x", 64 << 20)
  local idle = 2
  local srv = server({ response_idle = idle }, function(s)
    s:get("/big", function()
      return 200, big
    end)
  end)
  -- Sends the request, then reads nothing; says "sent" once it has.
  local p = assert(process.spawn({ "node", "-e", [[
    const c = require('net').connect(+process.argv[1], '127.0.0.1', () => {
      c.pause();
      c.write('GET /big HTTP/1.1\r\nHost: x\r\n\r\n', () => console.log('sent'));
    });
    c.on('error', () => {});
    setInterval(() => {}, 1000); // a paused socket alone does not keep node running
  ]], tostring(srv.port) }))
  T.defer(function()
    p:kill()
  end)
  T.eq(p:read_line(5000), "sent")
  local sent = timer.now()
  timer.sleep(idle * 1000 // 2)
  T.eq(srv:connections(), 1, "still there while within the timeout")
  T.wait_for(function()
    return srv:connections() == 0
  end, 20000, "the stalled connection dropped")
  T.ge(timer.now() - sent, idle * 1000 - 100, "not before response_idle s without progress")
end, { timeout = 60000 })

T.test("a response_idle below 1 s is refused", function()
  T.raises(function()
    http.server({ response_idle = 0 }):listen()
  end, "response_idle")
end)




T.test("every answer carries Date (RFC 9110 6.6.1): a handler's, a 404, a 405, a 413; a handler's own Date is kept", function()
  local srv = server({ max_body = 10 }, function(s)
    s:get("/x", function()
      return 200, "x"
    end)
    s:get("/own", function()
      return 200, "own", { Date = "Sun, 06 Nov 1994 08:49:37 GMT" }
    end)
  end)
  local function near_now(date)
    for d = -2, 2 do
      if date == os.date("!%a, %d %b %Y %H:%M:%S GMT", os.time() + d) then
        return true
      end
    end
    return false
  end
  for _, r in ipairs({ { "GET", "/x", 200 }, { "GET", "/nowhere", 404 }, { "DELETE", "/x", 405 },
    { "POST", "/x", 413, string.rep("b", 20) } }) do
    local res = assert(fetch(srv:url(r[2]), { method = r[1], body = r[4], timeout = 5000 }))
    T.eq(res.status, r[3], r[2])
    T.ok(near_now(res.headers.date), r[1] .. " " .. r[2] .. ": Date " .. tostring(res.headers.date))
  end
  local out = run({ "curl", "-s", "-i", srv:url("/own") })
  T.eq(select(2, out:lower():gsub("\ndate: ", "")), 1, out)
  T.match(out, "\ndate: Sun, 06 Nov 1994 08:49:37 GMT", "the handler's")
end)

T.test("a POST without Content-Length has an empty body and closes its connection: what follows is not read as its body", function()
  local bodies = {}
  local srv = server({}, function(s)
    s:post("/up", function(req)
      bodies[#bodies + 1] = req.body
      return 200, "up"
    end)
    s:get("/get", function()
      return 200, "got"
    end)
  end)
  -- curl -X POST sends none: libwebsockets took the next request on the
  -- kept-alive connection for up to 100 MB of the POST's body, and the
  -- client waited for its answer in vain.
  local out = one_connection(srv.port, { "POST /up HTTP/1.1\r\nHost: x\r\n\r\n", "GET /get HTTP/1.1\r\nHost: x\r\n\r\n" })
  T.no_match(out, "^still open")
  T.match(out:lower(), "^http/1%.1 200 .-\r\nconnection: close\r\n", "the answer says it closes")
  T.match(out, "\r\n\r\nup$", "one answer")
  T.eq(bodies, { "" })
  local w = "%{http_code} %{num_connects}\n"
  local codes = run({ "curl", "-s", "-o", "/dev/null", "-w", w, "-X", "POST", srv:url("/up"),
    "--next", "-s", "-o", "/dev/null", "-w", w, srv:url("/get") })
  T.eq(codes, "200 1\n200 1", "curl's next request on a new connection")
end)

-- A server in a child process of its own (libwebsockets 4.1.6 spun in a
-- loop for good on a pipelined request with a body: the child, not the test,
-- would hang), with GET /get and POST /up (answers the body's length).
local function child_server()
  local port
  local p = T.spawn_app(nil, nil, { on_stdout = function(l)
    port = port or tonumber(l)
  end, source = [[
local http = require "callagent.http"
local srv = http.server({})
srv:get("/get", function()
  return 200, "got"
end)
srv:post("/up", function(req)
  io.stderr:write("handler saw ", #req.body, " bytes: ", req.body, "\n")
  return 200, "up " .. #req.body
end)
assert(srv:listen())
print(srv.port)
io.stdout:flush()
]] })
  T.wait_for(function()
    return port ~= nil
  end, 5000)
  return port, p
end

-- Writes all of `bytes` at once on one connection; what came back until the
-- server closed it (or "still open: ..." after 2 s).
local function pipelined(port, bytes)
  local p = assert(process.spawn({ "node", "-e", [[
    const c = require('net').connect(+process.argv[1], '127.0.0.1', () => c.write(process.argv[2]));
    let out = '';
    c.on('data', (d) => { out += d; });
    c.on('error', () => {});
    c.on('close', () => { console.log(JSON.stringify(out)); process.exit(0); });
    setTimeout(() => { console.log(JSON.stringify('still open: ' + out)); process.exit(0); }, 2000);
  ]], tostring(port), bytes }))
  return (json.decode((assert(p:read_line(4000)))))
end

T.test("a pipelined request with a body is refused with its connection, not read from the wrong bytes (a loop for good)", function()
  local port, p = child_server()
  local get = "GET /get HTTP/1.1\r\nHost: x\r\n\r\n"
  local post = "POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
  -- Pipelined requests without a body are answered in turn.
  local out = pipelined(port, get .. get .. "GET /get HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
  T.eq(select(2, out:gsub("HTTP/1%.1 200 ", "")), 3, out)
  for _, bytes in ipairs({ get .. post, post .. post, get .. "POST /up HTTP/1.1\r\nHost: x\r\n\r\n" }) do
    out = pipelined(port, bytes)
    T.no_match(out, "^still open", T.fmt(bytes))
    T.eq(select(2, out:gsub("HTTP/1%.1 ", "")), 1, "the first answered, the second not: " .. out)
    local res = fetch("http://127.0.0.1:" .. port .. "/get", { timeout = 2000 })
    T.eq(res and res.status, 200, "the server still answers after " .. T.fmt(bytes))
  end
  T.no_match(p.errtext(), "handler saw %d+ bytes: [^h]", "no handler got a body of the wrong bytes")
  T.match(p.errtext(), "WARN http: POST /up: a request with a body pipelined behind another")
end)

T.run()
