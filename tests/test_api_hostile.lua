-- The REST API and the config as a demanding new user meets them, going by
-- README.md alone: what the first passes let through.
local T = require "testing"
local config = require "callagent.config"
local kit = require "callkit"
local json = require "callagent.json"
local process = require "callagent.process"
local task = require "callagent.task"
local timer = require "callagent.timer"

T.test("a JSON config saved with a UTF-8 byte order mark (Notepad) is read, as the API reads such a body", function()
  -- It was "config: ... is not valid JSON: Expected value but found invalid
  -- token at character 1", naming nothing a user could see in the file.
  local dir = T.tmpdir()
  local path = dir .. "/callagent.json"
  local f = assert(io.open(path, "wb"))
  f:write("\239\187\191", '{"telephony": {"provider": "mock"}, "server": {"port": 4999},'
    .. ' "openai": {"realtimeUrl": "ws://127.0.0.1:9/v1/realtime"}, "store": {"backend": "memory"}}')
  f:close()
  local cfg, err = config.load_file(path)
  T.eq(err, nil)
  T.eq({ cfg.telephony.provider, cfg.server.port }, { "mock", 4999 })
  -- Only at the very start: one anywhere else is no JSON.
  f = assert(io.open(path, "wb"))
  f:write(' \239\187\191{"telephony": {"provider": "mock"}}')
  f:close()
  cfg, err = config.load_file(path)
  T.eq(cfg, nil)
  T.match(err, "^config: .*callagent%.json is not valid JSON: ")
end)

T.test("a config file that is not there is named once in the error, not twice", function()
  -- io.open's message starts with the path: "cannot read x.json: x.json: No such file or directory".
  local path = T.tmpdir() .. "/none.json"
  local cfg, err = config.load_file(path)
  T.eq(cfg, nil)
  T.eq(err, "config: cannot read " .. path .. ": No such file or directory")
end)

T.test("a compressed body (Content-Encoding: gzip) is 415 naming Content-Encoding, not read as it came", function()
  -- It was read as plain JSON: gzip's bytes were "invalid_json: a NUL byte",
  -- and a JSON body labeled gzip by mistake placed a call.
  local env = kit.start({ twilio = { behaviour = { ring_ms = 10000 } } })
  local log_lines = T.log_lines("warn")
  local json_body = '{"to":"+14155550180","prompt":"Ask for the hours."}'
  for _, case in ipairs({
    { "gzip", "\31\139\8\0\0\0\0\0\0\3\171\174\5\0\67\191\166\163\2\0\0\0" },
    { "gzip", json_body },
    { "br", json_body },
    { "gzip, identity", json_body },
  }) do
    local status, body, res = env:api("POST", "/v1/calls", case[2], { ["Content-Encoding"] = case[1] })
    T.eq({ status, body.error and body.error.code, body.error and body.error.field },
      { 415, "unsupported_media_type", "Content-Encoding" }, case[1])
    T.eq(res.headers["accept-encoding"], "identity", "the one coding taken (RFC 7694)")
  end
  T.eq(#env.tw.calls, 0, "nothing dialed")
  local logged = 0
  for _, l in ipairs(log_lines) do
    if l.msg == "api: bad request" and l.fields.code == "unsupported_media_type" and l.fields.field == "Content-Encoding" then
      logged = logged + 1
    end
  end
  T.eq(logged, 4, "each logged once, naming the header")
  -- identity is no coding, in any case.
  T.eq((env:api("POST", "/v1/calls", json_body, { ["Content-Encoding"] = "Identity" })), 201)
end)

T.test("a metadata of 130,000 values is refused as too large before it is checked and encoded; one that fits still goes", function()
  -- It was walked and encoded twice over before its size was known: a 256
  -- KiB body held the event loop, every live call's audio, 200 ms.
  local env = kit.start({ twilio = { behaviour = { ring_ms = 10000 } } })
  local function with_values(n)
    return '{"to":"+14155550182","prompt":"x","metadata":{"a":[' .. string.rep("0,", n - 1) .. "0]}}"
  end
  local status, body = env:api("POST", "/v1/calls", with_values(130000))
  T.eq({ status, body.error.code, body.error.field }, { 400, "invalid_metadata", "metadata" })
  T.eq(body.error.message, "metadata is larger than 8192 bytes (it holds more than 4096 values)")
  -- At the limit: {"a":[...]} with 4092 values is 8191 bytes, with 4093 8193.
  T.eq((env:api("POST", "/v1/calls", with_values(4092))), 201)
  status, body = env:api("POST", "/v1/calls", with_values(4093))
  T.eq({ status, body.error.message }, { 400, "metadata is larger than 8192 bytes" })
end)

T.test("the same Idempotency-Key sent at once to a store that waits on the network makes one call, dialed once", function()
  -- A backend whose reads and writes take a round trip (README: Adding a
  -- backend) let each request find no call for the key and create its own:
  -- four calls, the callee rung four times.
  local dir = T.tmpdir()
  assert(os.execute("mkdir -p " .. dir .. "/callagent/store"))
  local f = assert(io.open(dir .. "/callagent/store/roundtrip.lua", "w"))
  f:write([[
local memory = require "callagent.store.memory"
local timer = require "callagent.timer"
return { open = function(cfg)
  local s = memory.open(cfg)
  local o = {}
  for name, fn in pairs(getmetatable(s).__index) do
    o[name] = function(_, ...) return fn(s, ...) end
  end
  function o.find_idempotent(_, key) timer.sleep(30) return s:find_idempotent(key) end
  function o.insert_call(_, call) timer.sleep(30) return s:insert_call(call) end
  return o
end }
]])
  f:close()
  local path = package.path
  package.path = dir .. "/?.lua;" .. path
  T.defer(function()
    package.path = path
  end)
  local env = kit.start({ twilio = { behaviour = { ring_ms = 10000 } }, config = { store = { backend = "roundtrip" } } })
  local sends = {}
  for i = 1, 4 do
    sends[i] = function()
      local status, body, res = env:api("POST", "/v1/calls", '{"to":"+14155550184","prompt":"Once."}',
        { ["Idempotency-Key"] = "slow-store-1" })
      return { status = status, id = body and body.callId, replayed = res.headers["idempotent-replayed"] }
    end
  end
  local ids, replayed = {}, 0
  for i, r in ipairs({ task.all(sends) }) do
    T.eq(r.status, 201, "request " .. i)
    ids[r.id] = true
    replayed = replayed + (r.replayed == "true" and 1 or 0)
  end
  local n = 0
  for _ in pairs(ids) do
    n = n + 1
  end
  T.eq({ n, replayed }, { 1, 3 }, "one call, three replays")
  T.wait_for(function()
    return #env.tw.calls >= 1
  end, 5000)
  timer.sleep(100)
  T.eq(#env.tw.calls, 1, "dialed once")
  -- Another key meanwhile is not held up by it.
  local status = env:api("POST", "/v1/calls", '{"to":"+14155550185","prompt":"x"}', { ["Idempotency-Key"] = "slow-store-2" })
  T.eq(status, 201)
end)

-- The answer to a request head sent as given (what no HTTP client sends:
-- two Host lines, a space before a colon), read until the server closes.
local function raw_answer(port, head)
  local p = assert(process.spawn({ "node", "-e", [[
    const [port, head] = process.argv.slice(1);
    let out = '';
    const c = require('net').connect(+port, '127.0.0.1', () => c.write(head));
    c.on('data', (d) => { out += d; });
    c.on('error', () => {});
    c.on('close', () => { console.log(JSON.stringify({ out })); process.exit(0); });
    setTimeout(() => { console.log(JSON.stringify({ out, open: true })); process.exit(0); }, 3000);
  ]], tostring(port), head }))
  local got = json.decode((assert(p:read_line(5000))))
  local out = got.out
  return tonumber(out:match("^HTTP/1%.1 (%d+)")), json.try_decode(out:match("\r\n\r\n(.*)$") or ""), got.open == true
end

T.test("a request the server refuses before the API sees it names the header at fault in field", function()
  -- Content-Length, Transfer-Encoding, Host: README's errors name the
  -- header at fault; these came with code and message only.
  local env = kit.start({ twilio = { behaviour = { ring_ms = 10000 } } })
  local json_body = '{"to":"+14155550181","prompt":"x"}'
  local function named(what, want, status, body)
    T.eq({ status, body and body.error.code, body and body.error.field }, want, what)
  end
  for _, len in ipairs({ "-1", "5x", "" }) do
    named("Content-Length " .. T.fmt(len), { 400, "bad_request", "Content-Length" },
      env:api("POST", "/v1/calls", json_body, { ["Content-Length"] = len }))
  end
  named("a Content-Length over the 256 KiB the API takes", { 413, "payload_too_large", "Content-Length" },
    env:api("POST", "/v1/calls", json_body, { ["Content-Length"] = tostring(1 << 20) }))
  named("chunked", { 411, "length_required", "Transfer-Encoding" },
    env:api("POST", "/v1/calls", json_body, { ["Transfer-Encoding"] = "chunked" }))
  local port = env.base:match(":(%d+)$")
  local head = "POST /v1/calls HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
  named("two Host lines", { 400, "bad_request", "Host" },
    raw_answer(port, head .. "Host: 127.0.0.1\r\nContent-Length: " .. #json_body .. "\r\n\r\n" .. json_body))
  named("Transfer-Encoding :", { 400, "bad_request", "Transfer-Encoding" },
    raw_answer(port, head .. "Transfer-Encoding : chunked\r\nContent-Length: " .. #json_body .. "\r\n\r\n" .. json_body))
  named("Content-Length<tab>:", { 400, "bad_request", "Content-Length" },
    raw_answer(port, head .. "Content-Length\t: " .. #json_body .. "\r\n\r\n" .. json_body))
  T.eq(#env.tw.calls, 0, "nothing dialed")
end)

T.test("a CONNECT request is closed at once, not kept open for good as a raw tunnel", function()
  -- libwebsockets made its connection a raw socket with no timeout: each
  -- one held a connection slot until the client let go, where a slow
  -- request head is closed at 10 s (4096 of them and the server answered
  -- every webhook 503).
  local env = kit.start({ twilio = { behaviour = { ring_ms = 10000 } } })
  local port = env.base:match(":(%d+)$")
  for _, head in ipairs({ "CONNECT 127.0.0.1:" .. port .. " HTTP/1.1\r\nHost: 127.0.0.1:" .. port .. "\r\n\r\n",
    "CONNECT /v1/calls HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" }) do
    local status, _, open = raw_answer(port, head)
    T.eq({ status, open }, { nil, false }, head)
  end
  T.eq((env:api("GET", "/healthz")), 200, "still serving")
end)

T.test("a request offering HTTP/2 (Upgrade: h2c, as curl --http2 and Java's HttpClient send) is answered in HTTP/1.1", function()
  -- Every route answered libwebsockets' own 404 HTML page: a Java client
  -- could not place a call at all.
  local env = kit.start({ twilio = { behaviour = { ring_ms = 10000 } } })
  local h2c = { Connection = "Upgrade, HTTP2-Settings", Upgrade = "h2c", ["HTTP2-Settings"] = "AAMAAABkAAQCAAAAAAIAAAAA" }
  local status, body, res = env:api("POST", "/v1/calls", '{"to":"+14155550183","prompt":"x"}', h2c)
  T.eq({ status, res.headers["content-type"] }, { 201, "application/json" })
  local id = body.callId
  status, body = env:api("GET", "/v1/calls/" .. id, nil, h2c)
  T.eq({ status, body.callId }, { 200, id })
  status, body = env:api("GET", "/v1/calls?limit=1", nil, h2c)
  T.eq({ status, #body.calls }, { 200, 1 })
  status, body = env:api("GET", "/healthz", nil, h2c)
  T.eq({ status, body.ok }, { 200, true })
  -- Refusals are the API's own, in JSON.
  status, body = env:api("POST", "/v1/calls", '{"to":"1","prompt":"x"}', h2c)
  T.eq({ status, body.error.code, body.error.field }, { 400, "invalid_to", "to" })
  status, body = env:api("POST", "/v1/calls/" .. id .. "/hangup", nil, h2c)
  T.eq({ status, body.status }, { 202, "canceled" })
end)

T.test("a declined offer of HTTP/2 is no Upgrade header in what an app's route sees, not three NUL bytes", function()
  -- The server blanks the name in libwebsockets' header table to decline
  -- the offer; its copy was "\0\0\0", handed to routes as headers.upgrade.
  local env = kit.start({ twilio = { behaviour = { ring_ms = 10000 } }, routes = function(srv)
    srv:get("/echo-upgrade", function(req)
      return 200, { upgrade = req.headers.upgrade or "none" }
    end)
  end })
  local status, body = env:api("GET", "/echo-upgrade", nil, { Connection = "Upgrade, HTTP2-Settings", Upgrade = "h2c",
    ["HTTP2-Settings"] = "AAMAAABkAAQCAAAAAAIAAAAA" })
  T.eq({ status, body.upgrade }, { 200, "none" })
end)

T.run()
