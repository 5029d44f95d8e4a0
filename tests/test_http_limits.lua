-- The request head limit is process-wide (one libwebsockets context): this
-- file sets it before anything else, in a process of its own.
local T = require "testing"
local http = require "callagent.http"
local fetch = require "callagent.fetch"
local core = require "callagent.core.http"
local json = require "callagent.json"
local process = require "callagent.process"
local timer = require "callagent.timer"

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

-- A request with a Content-Length header of our choosing: curl sends the
-- given one instead of its own, and the body as it is. A server that
-- misreads the length leaves the connection stuck: hence the timeout.
local function post(srv, len, body, headers)
  local h = { ["Content-Length"] = len }
  for k, v in pairs(headers or {}) do
    h[k] = v
  end
  return assert(fetch(srv:url("/up"), { method = "POST", body = body, headers = h, timeout = 5000 }))
end

local function counting_server(opts)
  local seen = {}
  local srv = server(opts, function(s)
    s:post("/up", function(req)
      seen[#seen + 1] = req.body
      return 200, { n = #req.body }
    end)
  end)
  return srv, seen
end

local function refused(res, status, code, message)
  local body = json.decode(res.body)
  T.eq({ res.status, body.error.code, body.error.message }, { status, code, message })
end

T.test("a Content-Length of -1, +5, 5x or an empty one is 400 invalid Content-Length, not a huge body", function()
  local srv, seen = counting_server({ max_body = 1000 })
  for _, len in ipairs({ "-1", "+5", "5x", "0x5", "5,5", "" }) do
    local res = post(srv, len, "hello")
    T.eq(res.status, 400, "Content-Length " .. T.fmt(len))
    refused(res, 400, "bad_request", "invalid Content-Length")
  end
  T.eq(#seen, 0, "no handler saw them")
  -- Spaces and tabs after the digits are not part of the value (RFC 9110 5.5).
  local res = post(srv, "5 \t", "hello")
  T.eq({ res.status, res.body }, { 200, '{"n":5}' })
end)

T.test("a zero-padded 40-character Content-Length: over max_body 413; within it 400, as libwebsockets frames a body by at most 30", function()
  local srv, seen = counting_server({ max_body = 1000 })
  local res = post(srv, string.format("%040d", 5000), string.rep("x", 5000))
  refused(res, 413, "payload_too_large", "request body too large")
  -- Twenty-odd digits past what 64 bits hold are still only too large.
  res = post(srv, string.rep("9", 25), "hello")
  refused(res, 413, "payload_too_large", "request body too large")
  res = post(srv, string.format("%040d", 5), "hello")
  refused(res, 400, "bad_request", "invalid Content-Length")
  T.eq(#seen, 0, "no handler saw them")
  -- Padded to 30 characters it is read as it should be.
  res = post(srv, string.format("%030d", 5), "hello")
  T.eq({ res.status, res.body }, { 200, '{"n":5}' })
  T.eq(seen, { "hello" })
end)

T.test("a declared Content-Length within a huge max_body is not allocated up front: the server lives on", function()
  local srv, seen = counting_server({ max_body = 1 << 40 })
  local res, err = fetch(srv:url("/up"), {
    method = "POST", body = "x", headers = { ["Content-Length"] = tostring(1 << 40) }, timeout = 500,
  })
  T.eq(res, nil, "the body never came whole")
  T.match(err, "^ETIMEDOUT")
  res = post(srv, "5", "hello")
  T.eq({ res.status, res.body }, { 200, '{"n":5}' }, "still serving")
  T.eq(seen, { "hello" })
end)

T.test("a negative byte limit is refused, not taken for no limit; a bad option leaks nothing", function()
  local function f() end
  for _, k in ipairs({ "max_body", "max_ws_message", "max_send_queue" }) do
    local ok, err = pcall(core.listen, { [k] = -1 }, f, f)
    T.eq(ok, false, k .. " = -1")
    T.match(err, k .. "' must be >= 0")
  end
  -- Raised after the server was made: LSan (make SAN=1) finds it if it is lost.
  T.eq(pcall(core.listen, { headers = "x-foo" }, f, f), false)
  T.eq(pcall(core.listen, { max_connections = "many" }, f, f), false)
  T.eq(pcall(core.listen, { ws_paths = { "/a", {} } }, f, f), false)
  collectgarbage()
end)

T.test("a max_connections past what an int holds, or near it, is no limit rather than a server that refuses everyone", function()
  for _, max in ipairs({ 1 << 30, math.maxinteger }) do
    local srv = counting_server({ max_connections = max })
    local res = post(srv, "5", "hello")
    T.eq({ res.status, res.body }, { 200, '{"n":5}' }, "max_connections " .. max)
  end
end)

T.test("header values reach Lua without the spaces and tabs around them (headers, req:header, captured extra headers)", function()
  local srv = server({ headers = { "x-extra" } }, function(s)
    s:get("/h", function(req)
      return 200, {
        custom = req.headers["x-custom"],
        header = req:header("X-Custom"),
        auth = req.headers["authorization"],
        extra = req.headers["x-extra"],
      }
    end)
  end)
  local res = assert(fetch(srv:url("/h"), {
    timeout = 5000,
    headers = { ["X-Custom"] = "value \t", Authorization = "Bearer tok-123\t ", ["X-Extra"] = "e v " },
  }))
  T.eq(res.status, 200)
  T.eq(json.decode(res.body), { custom = "value", header = "value", auth = "Bearer tok-123", extra = "e v" })
end)

T.test("a refused Content-Length or Transfer-Encoding is logged with method, path and reason, never the value", function()
  local code, _, p = T.run_app(nil, nil, { source = [[
local http = require "callagent.http"
local fetch = require "callagent.fetch"
local task = require "callagent.task"
local runtime = require "callagent.runtime"
local srv = http.server({ max_body = 1000 })
srv:post("/up", function(req)
  return 200, tostring(#req.body)
end)
assert(srv:listen())
task.spawn(function()
  local function post(headers, body)
    local r = assert(fetch(srv:url("/up"), { method = "POST", headers = headers, body = body, timeout = 5000 }))
    print(r.status)
  end
  post({ ["Content-Length"] = "-1" }, "{}")
  post({ ["Content-Length"] = "sk-secret-value" }, "{}")
  post({ ["Content-Length"] = string.format("%040d", 5) }, "hello")
  post({ ["Content-Length"] = string.format("%040d", 5000) }, string.rep("x", 5000))
  post({ ["Transfer-Encoding"] = "chunked" }, "hello")
  srv:close()
  runtime.stop(0)
end)
]] })
  T.eq(code, 0, p.errtext())
  T.eq(p.out, { "400", "400", "400", "413", "411" })
  local log = p.errtext()
  local _, n = log:gsub("WARN http: POST /up: invalid Content%-Length %(not a number%): answering 400", "")
  T.eq(n, 2, "two lines for the two that are not numbers:\n" .. log)
  T.match(log, "WARN http: POST /up: invalid Content%-Length %(40 characters, over the 30 libwebsockets reads%): answering 400")
  T.match(log, "WARN http: POST /up: body of 5000 bytes over max_body 1000: answering 413")
  T.match(log, "WARN http: POST /up: chunked body refused %(Transfer%-Encoding%): answering 411")
  T.no_match(log, "secret", "the value stays out of the log")
end)


-- A raw client over loopback: node writes `head`, then `drip` once every
-- `every` ms, and prints what came back and after how long once the server
-- closes (or "open" after `give_up` ms).
local function drip_client(port, head, drip, every, give_up)
  return assert(process.spawn({ "node", "-e", [[
    const [port, head, drip, every, giveUp] = process.argv.slice(1);
    const t0 = Date.now();
    let out = '';
    const c = require('net').connect(+port, '127.0.0.1', () => c.write(head));
    c.on('data', (d) => { out += d; });
    c.on('error', () => {});
    c.on('close', () => { console.log(JSON.stringify({ out, ms: Date.now() - t0 })); process.exit(0); });
    if (drip) setInterval(() => c.write(drip), +every);
    setTimeout(() => { console.log(JSON.stringify({ out, open: true })); process.exit(0); }, +giveUp);
  ]], tostring(port), head, drip or "", tostring(every or 1000), tostring(give_up) }))
end

T.test("a body dripped in past body_timeout is refused with 408 and its connection closed; others are served meanwhile", function()
  local srv, seen = counting_server({ max_body = 1000, body_timeout = 1 })
  -- 900 bytes at one per 50 ms would take 45 s.
  local p = drip_client(srv.port, "POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 900\r\n\r\n", "a", 50, 5000)
  T.defer(function()
    p:kill()
  end)
  timer.sleep(300)
  local res = post(srv, "5", "hello")
  T.eq({ res.status, res.body }, { 200, '{"n":5}' }, "another request meanwhile")
  local line = assert(p:read_line(6000))
  local got = json.decode(line)
  T.eq(got.open, nil, "closed, not still open: " .. T.fmt(got))
  T.match(got.out, "^HTTP/1%.1 408 ")
  T.match(got.out, '"code":"request_timeout"')
  T.le(got.ms, 2500, "within body_timeout and a little")
  T.eq(#seen, 1, "only the other request reached its handler")
end)

T.test("a body_timeout below 1 s is refused", function()
  T.raises(function()
    http.server({ body_timeout = 0 }):listen()
  end, "body_timeout")
end)


T.test("a request with more query parameters and header lines than libwebsockets keeps is closed and logged; the server serves on", function()
  local code, _, p = T.run_app(nil, nil, { source = [[
local http = require "callagent.http"
local fetch = require "callagent.fetch"
local task = require "callagent.task"
local runtime = require "callagent.runtime"
local srv = http.server({})
srv:get("/q", function(req)
  local n = 0
  for _ in pairs(req.query) do
    n = n + 1
  end
  return 200, tostring(n)
end)
assert(srv:listen())
task.spawn(function()
  local function get(n)
    local q = {}
    for i = 1, n do
      q[i] = "k" .. i .. "=v"
    end
    local r, err = fetch(srv:url("/q?" .. table.concat(q, "&")), { timeout = 5000 })
    print(r and r.body or "no answer")
  end
  get(60)
  get(100)
  get(1)
  srv:close()
  runtime.stop(0)
end)
]] })
  T.eq(code, 0, p.errtext())
  T.eq(p.out, { "60", "no answer", "1" })
  T.match(p.errtext(), "WARN http: a request with more query parameters and header lines than libwebsockets keeps %(about 90%): connection closed")
end)


T.test("Content-Length or Transfer-Encoding with spaces or tabs before the colon is 400, not a header libwebsockets ignores (smuggling)", function()
  local srv, seen = counting_server({ max_body = 1000 })
  local base = "POST /up HTTP/1.1\r\nHost: x\r\n"
  for _, h in ipairs({
    "Content-Length : 5\r\n",
    "Content-Length\t: 5\r\n",
    "Transfer-Encoding : chunked\r\nContent-Length: 5\r\n",
    "Transfer-Encoding  : chunked\r\nContent-Length: 5\r\n",
  }) do
    -- What follows is a second request to a proxy that took the header.
    local p = drip_client(srv.port, base .. h .. "\r\nhello", nil, nil, 3000)
    local got = json.decode((assert(p:read_line(5000))))
    T.eq(got.open, nil, T.fmt(h) .. ": closed")
    T.match(got.out, "^HTTP/1%.1 400 ", T.fmt(h))
    T.match(got.out, '"code":"bad_request"', T.fmt(h))
  end
  T.eq(#seen, 0, "no handler saw them")
  local res = post(srv, "5", "hello")
  T.eq({ res.status, res.body }, { 200, '{"n":5}' })
end)


T.test("a request with two Host header lines is 400 (RFC 9112 3.2), not handed on with the two joined", function()
  local srv, seen = counting_server({ max_body = 1000 })
  local p = drip_client(srv.port, "POST /up HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\nContent-Length: 2\r\n\r\nhi", nil, nil, 3000)
  local got = json.decode((assert(p:read_line(5000))))
  T.eq(got.open, nil, "closed")
  T.match(got.out, "^HTTP/1%.1 400 ")
  T.match(got.out, '"code":"bad_request"')
  T.eq(#seen, 0, "no handler saw it")
  local res = post(srv, "2", "hi")
  T.eq({ res.status, res.body }, { 200, '{"n":2}' })
end)


-- A child whose server refuses `n` requests - heads over max_header (1024),
-- or with `body`, bodies over max_body (100) - with C's rate-limit window
-- `window` ms; it waits `wait` ms, then exits. Its log lines holding `needle`.
local function refused_flood(n, window, wait, body, needle)
  local code, _, p = T.run_app(nil, nil, { source = string.format([[
local http = require "callagent.http"
local fetch = require "callagent.fetch"
local task = require "callagent.task"
local timer = require "callagent.timer"
local runtime = require "callagent.runtime"
require("callagent.core.log").limits(%d)
assert(require("callagent.core.http").configure({ max_header = 1024 }))
local srv = http.server({ max_body = 100 })
srv:get("/", function() return 200, "ok" end)
local body = %s
assert(srv:listen())
task.spawn(function()
  for _ = 1, %d do
    if body then
      assert(fetch(srv:url("/"), { method = "POST", body = body, timeout = 5000 }).status == 413)
    else
      assert(not fetch(srv:url("/"), { headers = { ["X-Pad"] = string.rep("a", 4000) }, timeout = 5000 }))
    end
  end
  print("sent")
  timer.sleep(%d)
  print("waited")
  srv:close()
  runtime.stop(0)
end)
]], window, body and string.format("%q", body) or "nil", n, wait) })
  T.eq(code, 0, p.errtext())
  T.eq(p.out, { "sent", "waited" })
  local lines = {}
  for line in p.errtext():gmatch("[^\n]+") do
    if line:find(needle, 1, true) then
      lines[#lines + 1] = line
    end
  end
  return lines
end

T.test("a flood of refused request heads writes 5 lines and then one count, at exit at the latest", function()
  local lines = refused_flood(40, 60000, 0, nil, "request headers larger than the server's max_header")
  T.eq(#lines, 6, table.concat(lines, "\n"))
  for i = 1, 5 do
    T.match(lines[i], "WARN http: request headers larger than the server's max_header: connection closed$")
  end
  T.match(lines[6], "WARN http: request headers larger than the server's max_header: connection closed %(and 35 more "
    .. "like this in the last [%d.]+ s, not logged; this was the last%) suppressed=35$")
end)

T.test("the count of refused request heads is written when the window ends, while the server runs", function()
  local lines = refused_flood(12, 500, 1500, nil, "request headers larger than the server's max_header")
  T.eq(#lines, 6, table.concat(lines, "\n"))
  local s = lines[6]:match("in the last ([%d.]+) s")
  T.match(lines[6], "%(and 7 more like this")
  -- Ended by the timer about 0.5 s after the window opened (at exit it
  -- would say about 1.5 s or more).
  T.lt(tonumber(s), 1.3, lines[6])
end)

T.test("a flood of bodies over max_body writes 5 lines of 413 and then one count", function()
  local lines = refused_flood(20, 60000, 0, string.rep("x", 500), "over max_body")
  T.eq(#lines, 6, table.concat(lines, "\n"))
  T.match(lines[1], "WARN http: POST /: body of 500 bytes over max_body 100: answering 413$")
  T.match(lines[6], "WARN http: POST /: body of 500 bytes over max_body 100: answering 413 %(and 15 more like this in "
    .. "the last [%d.]+ s, not logged; this was the last%) suppressed=15$")
end)

T.test("in JSON a C count line has log.limited's shape: the same keys, suppressed a number", function()
  local code, _, p = T.run_app(nil, nil, { source = [[
local http = require "callagent.http"
local fetch = require "callagent.fetch"
local task = require "callagent.task"
local runtime = require "callagent.runtime"
local log = require "callagent.log"
log.format("json")
local srv = http.server({ max_body = 10 })
assert(srv:listen())
task.spawn(function()
  for _ = 1, 8 do
    assert(fetch(srv:url("/j"), { method = "POST", body = string.rep("x", 50), timeout = 5000 }).status == 413)
    log.limited("warn", "lua refused")
  end
  srv:close()
  log.flush()
  runtime.stop(0)
end)
]] })
  T.eq(code, 0, p.errtext())
  local counts = {}
  for line in p.errtext():gmatch("[^\n]+") do
    local obj = json.decode(line)
    if obj.msg:find("more like this", 1, true) then
      counts[obj.msg:find("^lua") and "lua" or "c"] = obj
    end
  end
  T.ok(counts.c and counts.lua, p.errtext())
  T.match(counts.c.msg, "^http: POST /j: body of 50 bytes over max_body 10: answering 413 %(and 3 more")
  local function shape(obj)
    local keys = {}
    for k, v in pairs(obj) do
      keys[#keys + 1] = k .. ":" .. (math.type(v) or type(v))
    end
    table.sort(keys)
    return table.concat(keys, " ")
  end
  T.eq(shape(counts.c), shape(counts.lua))
  T.eq({ counts.c.suppressed, counts.lua.suppressed }, { 3, 3 })
end)

T.test("the count line of a refusal flood quotes no head of a secret its cut would leave (a path holding one)", function()
  local secret = "Sk3tSecretTokenValue-0123456789abcdef"
  -- "http: POST " is 11 bytes: the secret spans byte 396, where the count
  -- line's copy of the last refused line is cut.
  local path = "/" .. string.rep("a", 380 - 12) .. secret
  local code, _, p = T.run_app(nil, nil, { source = string.format([[
local http = require "callagent.http"
local fetch = require "callagent.fetch"
local task = require "callagent.task"
local runtime = require "callagent.runtime"
require("callagent.log").secret(%q)
local srv = http.server({ max_body = 10 })
assert(srv:listen())
task.spawn(function()
  for _ = 1, 7 do
    assert(fetch(srv:url(%q), { method = "POST", body = string.rep("x", 50), timeout = 5000 }).status == 413)
  end
  srv:close()
  runtime.stop(0)
end)
]], secret, path) })
  T.eq(code, 0, p.errtext())
  local out = p.errtext()
  T.match(out, "%(and 2 more like this in the last")
  T.lacks(out, secret:sub(1, 12), "no head of the secret")
  T.lacks(out, secret:sub(-12), "no tail of the secret")
end)

T.run()
