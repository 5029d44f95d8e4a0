-- The REST API at its edge: validation with field errors, bearer auth,
-- listing, 404/405/413, and that bad input never creates a call.
local T = require "testing"
local kit = require "callkit"
local fetch = require "callagent.fetch"
local timer = require "callagent.timer"
local json = require "callagent.json"

local function env_with(config)
  return kit.start({ twilio = { behaviour = { ring_ms = 10000 } }, config = config })
end

T.test("POST /v1/calls validates every field and answers 400 naming it", function()
  local env = env_with()
  local cases = {
    { {}, "invalid_to", "to" },
    { { to = "4155550100", prompt = "x" }, "invalid_to", "to" },
    { { to = "+1", prompt = "x" }, "invalid_to", "to" },
    { { to = "+14155550100" }, "invalid_prompt", "prompt" },
    { { to = "+14155550100", prompt = "   " }, "invalid_prompt", "prompt" },
    { { to = "+14155550100", prompt = string.rep("x", 8001) }, "invalid_prompt", "prompt" },
    { { to = "+14155550100", prompt = "x", timezone = "Mars/Base" }, "invalid_timezone", "timezone" },
    { { to = "+14155550100", prompt = "x", timezone = "../../etc/passwd" }, "invalid_timezone", "timezone" },
    { { to = "+14155550100", prompt = "x", timezone = "Europe/Paris\0junk" }, "invalid_timezone", "timezone" },
    { { to = "+14155550100", prompt = "x", timezone = "leapseconds" }, "invalid_timezone", "timezone" }, -- no zone file
    { { to = "+14155550100", prompt = "x", voice = "robot" }, "invalid_voice", "voice" },
    { { to = "+14155550100", prompt = "x", locale = "english please" }, "invalid_locale", "locale" },
    { { to = "+14155550100", prompt = "x", locale = "en-" }, "invalid_locale", "locale" },
    { { to = "+14155550100", prompt = "x", locale = "en-abcdefghi" }, "invalid_locale", "locale" },
    { { to = "+14155550100", prompt = "x", calleeName = string.rep("n", 200) }, "invalid_calleeName", "calleeName" },
    { { to = "+14155550100", prompt = "x", metadata = "not an object" }, "invalid_metadata", "metadata" },
    { { to = "+14155550100", prompt = "x", metadata = { big = string.rep("m", 9000) } }, "invalid_metadata", "metadata" },
    { { to = "+14155550100", prompt = "x", metadata = { "a", "list" } }, "invalid_metadata", "metadata" },
    { '{"to":"+14155550100","prompt":"x","metadata":{"x":1e400}}', "invalid_metadata", "metadata" },
    -- Deeper than the record and the webhook could hold (JSON encoding
    -- stops at 100 levels; the call document adds some): refused up front.
    { '{"to":"+14155550100","prompt":"x","metadata":' .. string.rep('{"a":', 20) .. "{}" .. string.rep("}", 20) .. "}", "invalid_metadata", "metadata" },
    { '{"to":"+14155550100","prompt":"x","metadata":' .. string.rep('{"a":', 99) .. "{}" .. string.rep("}", 99) .. "}", "invalid_metadata", "metadata" },
    { { to = "+14155550100", prompt = "x", promt = "typo" }, "unknown_field", "promt" },
    -- Text is UTF-8 (strictly: no overlong forms or surrogates), without control characters.
    { { to = "+14155550100", prompt = "caf\255" }, "invalid_prompt", "prompt" },
    { { to = "+14155550100", prompt = "a \237\160\128 surrogate" }, "invalid_prompt", "prompt" },
    { { to = "+14155550100", prompt = "\192\175 overlong" }, "invalid_prompt", "prompt" },
    { { to = "+14155550100", prompt = "a NUL \0 here" }, "invalid_prompt", "prompt" },
    { { to = "+14155550100", prompt = "an escape \27[2J" }, "invalid_prompt", "prompt" },
    -- Beyond ASCII: C1 controls (NEL, CSI), line separators, wide spaces only.
    { { to = "+14155550100", prompt = "a C1 \194\133 next line" }, "invalid_prompt", "prompt" },
    { { to = "+14155550100", prompt = "a CSI \194\155 2J" }, "invalid_prompt", "prompt" },
    { { to = "+14155550100", prompt = "\194\160\227\128\128 \226\128\139" }, "invalid_prompt", "prompt" },
    -- The line and paragraph separators are Unicode spaces too: alone, with
    -- line breaks, they say nothing.
    { { to = "+14155550100", prompt = "\226\128\168\n\226\128\169 " }, "invalid_prompt", "prompt" },
    { { to = "+14155550100", prompt = "x", calleeName = "Ada\226\128\168Lovelace" }, "invalid_calleeName", "calleeName" },
    { { to = "+14155550100", prompt = "x", callerName = "B\194\133b" }, "invalid_callerName", "callerName" },
    { { to = "+14155550100", prompt = "x", calleeName = "Ada\nLovelace" }, "invalid_calleeName", "calleeName" },
    { { to = "+14155550100", prompt = "x", callerName = "B\255b" }, "invalid_callerName", "callerName" },
    { { to = "+14155550100", prompt = "x", metadata = { note = "\255" } }, "invalid_metadata", "metadata" },
    { { to = "+14155550100", prompt = "x", metadata = { ["k\255"] = 1 } }, "invalid_metadata", "metadata" },
    { { to = "+14155550100", prompt = "x", ["p\255"] = 1 }, "invalid_body", nil },
  }
  for _, c in ipairs(cases) do
    local status, body = env:api("POST", "/v1/calls", c[1])
    T.eq(status, 400, json.encode(c[1]):sub(1, 80))
    T.eq(body.error.code, c[2])
    T.eq(body.error.field, c[3])
    T.ok(type(body.error.message) == "string" and #body.error.message > 10, "a message")
  end
  local status, body = env:api("POST", "/v1/calls", "{not json")
  T.eq(status, 400)
  T.eq(body.error.code, "invalid_json")
  -- cjson stops reading at a NUL: what follows one is not taken for valid.
  status, body = env:api("POST", "/v1/calls", '{"to":"+14155550100","prompt":"x"}\0this is not JSON {{{')
  T.eq({ status, body.error.code }, { 400, "invalid_json" }, "a NUL after the object")
  T.match(body.error.message, "NUL")
  -- Not JSON either, though cjson reads them by default (and a record
  -- holding one could not be written out again).
  for _, n in ipairs({ "NaN", "-nan", "Infinity", "-inf", "0x10" }) do
    status, body = env:api("POST", "/v1/calls", '{"to":"+14155550100","prompt":"x","metadata":{"n":' .. n .. "}}")
    T.eq({ status, body.error.code }, { 400, "invalid_json" }, n)
  end
  for _, text in ipairs({ "[1,2]", "[]", '"a string"', "42", "null" }) do
    status, body = env:api("POST", "/v1/calls", text)
    T.eq(status, 400, text)
    T.eq(body.error.code, "invalid_body", text)
  end
  status, body = env:api("POST", "/v1/calls", '{"to":"+14155550100","prompt":"x","metadata":' .. string.rep('{"a":', 120) .. "{}" .. string.rep("}", 120) .. "}")
  T.eq({ status, body.error.message }, { 400, "metadata is nested deeper than 20 levels" })
  status, body = env:api("POST", "/v1/calls", '{"to":"+14155550100","prompt":"x","metadata":{"x":[1e400]}}')
  T.eq({ status, body.error.message }, { 400, "metadata holds a number JSON cannot hold" })
  local _, list = env:api("GET", "/v1/calls")
  T.eq(#list.calls, 0, "no call was created by bad input")
  T.eq(#env.tw.calls, 0, "nothing was dialed")
end)

T.test("of several fields at fault, the first by name is named, every time", function()
  local env = env_with()
  -- pairs() walks a table in an order that changes from run to run: ten
  -- unknown fields would be named in any order.
  local body = { to = "+14155550100", prompt = "x" }
  for i = 9, 0, -1 do
    body["extra" .. i] = i
  end
  local status, res = env:api("POST", "/v1/calls", body)
  T.eq({ status, res.error.code, res.error.field }, { 400, "unknown_field", "extra0" })
  -- A value that is no UTF-8 and an unknown field: the first name of the two.
  status, res = env:api("POST", "/v1/calls", { to = "+14155550100", prompt = "caf\255", zzz = 1 })
  T.eq({ status, res.error.code, res.error.field }, { 400, "invalid_prompt", "prompt" })
end)

T.test("mutated request bodies get 201 or a 400 error naming the problem, never anything else; what is accepted is UTF-8", function()
  local env = env_with()
  math.randomseed(20261126) -- a failure reproduces
  local valid = {
    '{"to":"+14155550100","prompt":"Book a check-up.","calleeName":"Dr. Smith","timezone":"Europe/Berlin",'
      .. '"locale":"de-DE","voice":"marin","metadata":{"a":1,"b":[true,null]}}',
    '{"to":"+442071838750","prompt":"Ask for the opening hours.","callerName":"Ada"}',
  }
  local nasty = { '"', "\\", "{", "}", "[", "]", ":", ",", "0", "-", "1e999", "null", "true", "\0", "\1", " ", "\n",
    "\195\169", "\226\128\168", "\237\160\128", "\255", string.rep("9", 30) }
  local random = math.random
  local mutate = require("mutate").new(nasty)
  local seen, created = {}, 0
  for i = 1, 1000 do
    local body = valid[random(#valid)]
    for _ = 1, random(1, 4) do
      body = mutate(body)
    end
    local status, res = env:api("POST", "/v1/calls", body, { ["Content-Type"] = "application/json" })
    seen[status] = (seen[status] or 0) + 1
    if status == 201 then
      created = created + 1
      local rec = env:get(res.callId)
      T.match(rec.to, "^%+%d+$", "an accepted call's number")
      T.ok(utf8.len(json.encode(rec)), "the record is UTF-8: " .. body)
    else
      T.eq(status, 400, "body " .. i .. ": " .. body)
      T.ok(type(res) == "table" and type(res.error) == "table", "an error object: " .. body)
      T.match(res.error.code, "^[a-z_A-Z]+$", body)
      T.ok(type(res.error.message) == "string" and #res.error.message > 0, body)
      T.ok(res.error.field == nil or type(res.error.field) == "string", body)
    end
  end
  T.diag(string.format("1000 mutated bodies: %d accepted, %d refused with 400", created, seen[400] or 0))
  T.gt(created, 0, "some mutations are still valid requests")
  T.gt(seen[400] or 0, 500)
  local status = env:api("GET", "/healthz")
  T.eq(status, 200)
end, { timeout = 60000 })

T.test("valid input with every optional field is accepted (201)", function()
  local env = env_with()
  local status, body = env:api("POST", "/v1/calls", {
    to = "+442071838750",
    prompt = "Ask for the opening hours.",
    timezone = "Europe/London",
    locale = "en-GB",
    callerName = "Ada",
    calleeName = "The library",
    voice = "marin",
    metadata = { source = "test", n = 1 },
  })
  T.eq(status, 201)
  T.match(body.callId, "^c_")
  local rec = env:get(body.callId)
  T.eq(rec.voice, "marin")
  T.eq(rec.timezone, "Europe/London")
  T.eq(rec.locale, "en-GB")
  T.eq(rec.metadata, { source = "test", n = 1 })
  -- Any tag the config takes for defaults.locale, the API takes too.
  for _, tag in ipairs({ "zh-Hant-TW", "es-419", "en_US", "fil" }) do
    status = env:api("POST", "/v1/calls", { to = "+442071838750", prompt = "x", locale = tag })
    T.eq(status, 201, tag)
  end
end)

T.test("defaults fill timezone, locale and voice from the config", function()
  local env = env_with({ defaults = { timezone = "Asia/Tokyo", locale = "ja-JP" }, openai = { voice = "coral" } })
  local id = env:create({ to = "+81312345678", prompt = "Hello." })
  local rec = env:get(id)
  T.eq(rec.timezone, "Asia/Tokyo")
  T.eq(rec.locale, "ja-JP")
  T.eq(rec.voice, "coral")
end)

T.test("a web page cannot drive the API: another origin, a rebound host name, a body that is not JSON", function()
  local call = { to = "+14155550131", prompt = "x" }
  local env = env_with({})
  local port = env.base:match(":(%d+)$")
  -- A page elsewhere posts "no-cors" with text/plain: no preflight, but an Origin.
  local status, body = env:api("POST", "/v1/calls", json.encode(call),
    { ["Content-Type"] = "text/plain", Origin = "http://evil.example" })
  T.eq({ status, body.error.code }, { 403, "forbidden_origin" })
  status, body = env:api("GET", "/v1/calls", nil, { Origin = "null" })
  T.eq({ status, body.error.code }, { 403, "forbidden_origin" }, "a sandboxed page's null origin too")
  -- DNS rebinding: the page's own name now points at 127.0.0.1.
  status, body = env:api("GET", "/v1/calls", nil,
    { Host = "evil.example:" .. port, Origin = "http://evil.example:" .. port })
  T.eq({ status, body.error.code }, { 403, "forbidden_host" })
  status, body = env:api("GET", "/v1/calls", nil, { Host = "calls.example.org" })
  T.eq({ status, body.error.code }, { 403, "forbidden_host" }, "a request through a tunnel, with no token")
  T.eq((env:api("GET", "/v1/calls", nil, { Host = "127.0.0.1:" .. port })), 200)
  -- A proxy that rewrote Host to 127.0.0.1: it says it forwarded. Via is
  -- RFC 9110's (a proxy must send it); X-Real-IP nginx's common one.
  for _, h in ipairs({ { ["X-Forwarded-For"] = "203.0.113.9" }, { ["X-Forwarded-Host"] = "calls.example.org" },
    { Forwarded = "for=203.0.113.9" }, { Via = "1.1 proxy.example.org" }, { ["X-Real-IP"] = "203.0.113.9" } }) do
    status, body = env:api("GET", "/v1/calls", nil, h)
    T.eq({ status, body.error.code }, { 403, "forbidden_host" }, json.encode(h))
  end
  -- Without a Content-Type that says JSON, no call.
  for _, ctype in ipairs({ "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
    "application/jsonx" }) do
    status, body = env:api("POST", "/v1/calls", json.encode(call), { ["Content-Type"] = ctype })
    T.eq({ status, body.error.code }, { 415, "unsupported_media_type" }, ctype)
  end
  T.eq(#env.tw.calls, 0, "nothing was dialed")
  -- This server's own pages (the mock form), and clients that are no browser.
  for _, h in ipairs({
    { Origin = "http://127.0.0.1:" .. port },
    { Origin = "http://localhost:" .. port, Host = "localhost:" .. port },
    { Host = "[::1]:" .. port },
    { ["Content-Type"] = "Application/JSON; charset=utf-8" },
  }) do
    status, body = env:api("POST", "/v1/calls", json.encode(call), h)
    T.eq(status, 201, json.encode(h))
  end
  -- With a token, any host name is fine (a tunnel, a proxy); a foreign page still is not.
  local token = "api-token-0123456789abcdef"
  env = env_with({ server = { apiToken = token } })
  status = env:api("GET", "/v1/calls", nil, { Host = "calls.example.org", Authorization = "BEARER " .. token })
  T.eq(status, 200, "the scheme is case-insensitive")
  status, body = env:api("GET", "/v1/calls", nil,
    { Host = "calls.example.org", Origin = "https://evil.example", Authorization = "Bearer " .. token })
  T.eq({ status, body.error.code }, { 403, "forbidden_origin" })
  -- This server's page through a proxy that rewrote Host: its origin is the public URL's.
  local public = env.app:public_url():match("^https?://[^/]+")
  status = env:api("GET", "/v1/calls", nil, { Origin = public, ["X-Forwarded-For"] = "203.0.113.9",
    Authorization = "Bearer " .. token })
  T.eq(status, 200, "Origin " .. public)
end)

T.test("a Host header smuggled in through an encoded line break of the URL names no loopback host", function()
  local env = env_with({})
  local port = env.base:match(":(%d+)$")
  local id = env:create({ to = "+14155550132", prompt = "A prompt a rebound page must not read." })
  -- libwebsockets decodes the URL in place and then reads a %0a in it as the
  -- end of the request line: what follows would be a header line of the
  -- attacker's, joined to the real Host ("localhost:1 HTTP/1.1,  evil...").
  -- A page whose name was rebound to 127.0.0.1 controls its URLs' paths.
  -- The server refuses such a request line (400) before the API sees it.
  for _, path in ipairs({ "/v1/calls?x=%0aHost:localhost:1", "/v1/calls/" .. id .. "?x=%0aHost:127.0.0.1:1",
    "/v1/calls?x=%0aHost:[::1]", "/v1/calls?x=%0aHost:localhost:1%0aX:" }) do
    local status, body, res = env:api("GET", path, nil, { Host = "evil.example:" .. port })
    T.eq({ status, body and body.error and body.error.code }, { 400, "bad_request" }, path)
    T.no_match(res.body, "rebound page", path)
  end
  -- A Host that is not one host name and port names no host (the API's own check).
  for _, host in ipairs({ "localhost:1, evil.example", "localhost evil.example", "127.0.0.1:80x", "localhost:" .. port .. "/x" }) do
    local status, body = env:api("GET", "/v1/calls", nil, { Host = host })
    T.eq({ status, body.error.code }, { 403, "forbidden_host" }, host)
  end
  for _, host in ipairs({ "localhost", "LOCALHOST:" .. port, "127.0.0.1:", "[::1]", "app.localhost:" .. port,
    "localhost.:" .. port, "app.localhost." }) do -- a trailing dot: the same name, fully qualified
    T.eq((env:api("GET", "/v1/calls", nil, { Host = host })), 200, host)
  end
end)

T.test("metadata comes back as sent: long numbers, nested empty arrays; null is an optional field not given", function()
  local env = env_with({})
  local sent = '{"orderId":123456789012345,"ratio":0.1234567890123456,"big":9007199254740993e0,'
    .. '"tags":[],"nested":[[]],"obj":{},"mixed":[1,[],{"in":[ ]}],"text":"[] stays text"}'
  local status, body = env:api("POST", "/v1/calls",
    '{"to":"+14155550132","prompt":"x","callerName":null,"timezone":null,"metadata":' .. sent .. "}")
  T.eq(status, 201, body and body.error and body.error.message)
  local _, _, res = env:api("GET", "/v1/calls/" .. body.callId)
  for _, part in ipairs({ '"orderId":123456789012345', '"ratio":0.1234567890123456', '"tags":[]', '"nested":[[]]',
    '"obj":{}', '"mixed":[1,[],{"in":[]}]', '"text":"[] stays text"' }) do
    -- Followed by the next key or the end of the object: keys come in any order.
    T.match(res.body, part:gsub("%p", "%%%0") .. "[,}]", "the record has " .. part)
  end
  T.ok(res.body:find('"big":9007199254740992', 1, true), "past 2^53 a number is a double, as in JavaScript")
  T.eq(env:get(body.callId).callerName, nil)
  status, body = env:api("POST", "/v1/calls", '{"to":"+14155550132","prompt":"x","metadata":[]}')
  T.eq({ status, body.error.code }, { 400, "invalid_metadata" }, "[] is no object")
  status, body = env:api("POST", "/v1/calls", '{"to":null,"prompt":"x"}')
  T.eq({ status, body.error.code }, { 400, "invalid_to" }, "a required field must be given")
end)

T.test("server.host localhost listens on 127.0.0.1", function()
  local env = env_with({ server = { host = "localhost" } })
  local port = env.base:match(":(%d+)$")
  local status = env:api("GET", "/v1/calls")
  T.eq(status, 200)
  local res = assert(fetch("http://127.0.0.1:" .. port .. "/healthz"))
  T.eq(res.status, 200)
end)

T.test("Idempotency-Key: the same request sent again gets the call it created; another request with it is 422", function()
  local env = env_with({})
  local key = { ["Idempotency-Key"] = "order-4711-call" }
  local status, first, res = env:api("POST", "/v1/calls", '{"to":"+14155550133","prompt":"Book it.","metadata":{"a":1,"b":2,"c":0}}', key)
  T.eq(status, 201)
  T.eq(res.headers["idempotent-replayed"], nil)
  T.eq(res.headers.location, "/v1/calls/" .. first.callId, "201 Created says where the call is")
  -- Sent again (a client that timed out), its keys in another order, its
  -- numbers written another way: the same JSON numbers.
  local again
  status, again, res = env:api("POST", "/v1/calls", '{"metadata":{"b":2e0,"c":-0.0,"a":1.0},"prompt":"Book it.","to":"+14155550133"}', key)
  T.eq(status, 201)
  T.eq(again.callId, first.callId, "the same call")
  T.eq(res.headers["idempotent-replayed"], "true")
  T.eq(res.headers.location, "/v1/calls/" .. first.callId)
  T.wait_for(function()
    return #env.tw.calls >= 1
  end, 5000)
  timer.sleep(200)
  T.eq(#env.tw.calls, 1, "dialed once")
  local body
  status, body = env:api("POST", "/v1/calls", '{"to":"+14155550133","prompt":"Cancel it."}', key)
  T.eq({ status, body.error.code, body.error.field }, { 422, "idempotency_key_reused", "Idempotency-Key" })
  local key2 = { ["Idempotency-Key"] = "order-4712-call" }
  T.eq((env:api("POST", "/v1/calls", '{"to":"+14155550133","prompt":"x","metadata":{"t":["a","b"]}}', key2)), 201)
  status, body = env:api("POST", "/v1/calls", '{"to":"+14155550133","prompt":"x","metadata":{"t":{"1":"a","2":"b"}}}', key2)
  T.eq({ status, body.error and body.error.code }, { 422, "idempotency_key_reused" }, "an array is not an object")
  for _, bad in ipairs({ "has space", string.rep("k", 256), "caf\195\169" }) do
    status, body = env:api("POST", "/v1/calls", '{"to":"+14155550133","prompt":"x"}', { ["Idempotency-Key"] = bad })
    T.eq({ status, body.error.code }, { 400, "invalid_idempotency_key" }, bad)
  end
  status, body = env:api("POST", "/v1/calls", '{"to":"+14155550133","prompt":"Book it."}', { ["Idempotency-Key"] = "other" })
  T.eq(status, 201)
  T.ok(body.callId ~= first.callId, "another key, another call")
  local _, _, got = env:api("GET", "/v1/calls/" .. first.callId)
  T.ok(not got.body:find("order-4711", 1, true) and not got.body:find("fingerprint", 1, true), "the key is not in the record")
end)

T.test("with server.apiToken every /v1 request needs the bearer token (401 otherwise)", function()
  local token = "api-token-0123456789abcdef"
  local env = env_with({ server = { apiToken = token } })
  local status, body, res = env:api("POST", "/v1/calls", { to = "+14155550130", prompt = "x" })
  T.eq(status, 401)
  T.eq(body.error.code, "unauthorized")
  T.match(res.headers["www-authenticate"] or "", "Bearer")
  status = env:api("GET", "/v1/calls", nil, { Authorization = "Bearer wrong-token-0123456789" })
  T.eq(status, 401)
  status = env:api("GET", "/v1/calls", nil, { Authorization = "Basic " .. token })
  T.eq(status, 401)
  status, body = env:api("POST", "/v1/calls", { to = "+14155550130", prompt = "x" }, { Authorization = "Bearer " .. token })
  T.eq(status, 201)
  status = env:api("GET", "/v1/calls/" .. body.callId, nil, { Authorization = "Bearer " .. token })
  T.eq(status, 200)
  -- Paths no route has and methods no route takes: nothing of the routes
  -- is told without the token.
  for _, r in ipairs({ { "GET", "/v1/nothing/here", 404 }, { "DELETE", "/v1/calls", 405 }, { "GET", "/v1", 404 } }) do
    status, body = env:api(r[1], r[2])
    T.eq({ status, body.error.code }, { 401, "unauthorized" }, r[1] .. " " .. r[2] .. " without the token")
    status = env:api(r[1], r[2], nil, { Authorization = "Bearer " .. token })
    T.eq(status, r[3], r[1] .. " " .. r[2] .. " with it")
  end
  status, body = env:api("GET", "/healthz")
  T.eq(status, 200, "health needs no token")
  T.eq(body, { ok = true, starting = false, paused = false }, "without the token, whether it is up only")
  status, body = env:api("GET", "/healthz", nil, { Authorization = "Bearer " .. token })
  T.eq(status, 200)
  T.eq(body.ok, true)
  T.eq({ body.starting, body.paused }, { false, false })
  T.eq(body.provider, "twilio")
  T.eq(body.activeCalls, 1, "the call above is live")
  -- The event loop's load: a loop that served these requests. The app's
  -- window began when it started, a moment ago, and this test's own work
  -- shares the loop: the share may be anything up to all of it.
  local l = body.loop
  T.gt(l.iterations, 0)
  T.gt(l.busySec, 0)
  T.ge(l.utilization, 0)
  T.le(l.utilization, 1)
  T.ge(l.windowSec, 0)
  T.le(l.windowSec, l.uptimeSec)
  T.ge(l.maxIterationMs, 0)
  T.ge(l.slowIterations, 0)
  T.ge(l.slowSec, 0)
  T.le(l.slowSec, l.busySec)
  T.le(l.busySec, l.uptimeSec)
end)

T.test("the bearer token's check takes no less time for a token of another length", function()
  local crypto = require "callagent.crypto"
  local token = "api-token-0123456789abcdef"
  local env = env_with({ server = { apiToken = token } })
  -- A compare returns at once for strings of unequal lengths: the time a
  -- 401 takes would tell the token's length. Every compare is of equal ones.
  local eq, seen = crypto.constant_time_eq, {}
  crypto.constant_time_eq = function(a, b)
    seen[#seen + 1] = { #a, #b }
    return eq(a, b)
  end
  T.defer(function()
    crypto.constant_time_eq = eq
  end)
  for _, given in ipairs({ "short", token .. "-and-more", string.rep("t", 300), token }) do
    local status = env:api("GET", "/v1/calls", nil, { Authorization = "Bearer " .. given })
    T.eq(status, given == token and 200 or 401, #given .. " bytes")
  end
  T.eq(#seen, 4, "each request compared")
  for _, s in ipairs(seen) do
    T.eq(s[1], s[2], "lengths compared")
  end
end)

T.test("unknown ids are 404, wrong methods 405, oversized bodies 413", function()
  local env = env_with()
  local status, body = env:api("GET", "/v1/calls/c_doesnotexist")
  T.eq(status, 404)
  T.eq(body.error.code, "not_found")
  status = env:api("POST", "/v1/calls/c_doesnotexist/hangup")
  T.eq(status, 404)
  status, body = env:api("DELETE", "/v1/calls")
  T.eq(status, 405)
  T.eq(body.error.code, "method_not_allowed")
  -- A path that is not UTF-8 is quoted in the message as UTF-8: the body
  -- stays JSON a client can read.
  for _, path in ipairs({ "/v1/calls/c_%ff%fe", "/nowhere/%c3", "/v1/calls/%80/hangup" }) do
    local res
    status, body, res = env:api(path:find("hangup") and "POST" or "GET", path)
    T.eq(status, 404, path)
    T.ok(utf8.len(res.body), "UTF-8 body for " .. path)
    T.match(body.error.message, "\239\191\189", "U+FFFD for the bad bytes")
  end
  local big = json.encode({ to = "+14155550131", prompt = string.rep("p", 300 * 1024) })
  status, body = env:api("POST", "/v1/calls", big)
  T.eq(status, 413)
  T.eq(body.error.code, "payload_too_large")
end)

T.test("GET /v1/calls lists newest first, filters by status and pages with a cursor", function()
  local env = kit.start({ twilio = { behaviour = "busy" }, config = { retry = { maxAttempts = 1 } } })
  local ids = {}
  for i = 1, 5 do
    ids[i] = env:create({ to = "+1415555014" .. i, prompt = "n" .. i })
  end
  for _, id in ipairs(ids) do
    env:wait_final(id, 5000)
  end
  local _, page = env:api("GET", "/v1/calls?limit=2")
  T.eq(#page.calls, 2)
  T.eq(page.calls[1].callId, ids[5])
  T.eq(page.calls[2].callId, ids[4])
  T.ok(page.nextCursor, "a cursor")
  local _, page2 = env:api("GET", "/v1/calls?limit=2&cursor=" .. page.nextCursor)
  T.eq(page2.calls[1].callId, ids[3])
  T.eq(page2.calls[2].callId, ids[2])
  local _, busy = env:api("GET", "/v1/calls?status=busy")
  T.eq(#busy.calls, 5)
  local _, none, nres = env:api("GET", "/v1/calls?status=completed")
  T.eq(#none.calls, 0)
  T.match(nres.body, '"calls":%[%]', "an empty list is a JSON array")
  local status, bad = env:api("GET", "/v1/calls?status=exploded")
  T.eq(status, 400)
  T.eq(bad.error.field, "status")
  -- Digits only: what tonumber also reads is not a limit.
  for _, l in ipairs({ "1000", "0", "1e2", "0x10", "10.0", "%205", "" }) do
    status, bad = env:api("GET", "/v1/calls?limit=" .. l)
    T.eq({ status, bad.error.code, bad.error.field }, { 400, "invalid_limit", "limit" }, l)
  end
  -- A cursor no page gave would restart the list: a client looping over
  -- pages would never end.
  for _, c in ipairs({ "zzz", "1e3", "-4", "%205" }) do
    status, bad = env:api("GET", "/v1/calls?limit=2&cursor=" .. c)
    T.eq({ status, bad.error.code, bad.error.field }, { 400, "invalid_cursor", "cursor" }, c)
  end
  local _, first = env:api("GET", "/v1/calls?limit=2&cursor=")
  T.eq(first.calls[1].callId, ids[5], "an empty cursor is the first page")
end)

T.test("GET /v1/calls shows a call as GET /v1/calls/{id} does while the store refuses its end", function()
  local env = env_with()
  local id = env:create({ to = "+14155550160", prompt = "x" })
  env:wait(id, function(r)
    return r.status == "dialing" and r.attempts[1] and r.attempts[1].providerCallId ~= nil
  end, 5000, "ringing")
  -- The disk stops taking writes: the hang-up's end is kept in the process.
  local db = env.app.store.db
  assert(db:exec("PRAGMA query_only = ON"))
  T.defer(function()
    db:exec("PRAGMA query_only = OFF")
  end)
  T.eq((env:api("POST", "/v1/calls/" .. id .. "/hangup")), 202)
  T.eq(env:get(id).status, "canceled", "the call as the engine has it")
  local _, page = env:api("GET", "/v1/calls")
  T.eq({ page.calls[1].callId, page.calls[1].status }, { id, "canceled" }, "the listing agrees")
  T.eq(page.calls[1].completedAt ~= nil, true, "with the end's fields")
  local _, dialing = env:api("GET", "/v1/calls?status=dialing")
  T.eq(#dialing.calls, 0, "not listed as dialing: it has ended")
  assert(db:exec("PRAGMA query_only = OFF"))
  T.wait_for(function()
    local _, p = env:api("GET", "/v1/calls?status=canceled")
    return #p.calls == 1
  end, 10000, "the end written at last")
end, { timeout = 30000 })

T.test("a store that cannot read answers 500 store_failed: never a 404 for a call that exists, nor an empty list", function()
  local recording = require "callagent.store.recording"
  local env = kit.start({ twilio = { behaviour = "busy" }, config = { store = { backend = "recording" }, retry = { maxAttempts = 1 } } })
  local id = env:create({ to = "+14155550100", prompt = "x" })
  T.eq(env:wait_final(id, 5000).status, "busy") -- ended: its record is read from the store
  T.defer(function()
    recording.fail_reads = nil
  end)
  recording.fail_reads = true
  for _, req in ipairs({ { "GET", "/v1/calls/" .. id }, { "GET", "/v1/calls" }, { "POST", "/v1/calls/" .. id .. "/hangup" } }) do
    local status, body = env:api(req[1], req[2])
    T.eq({ status, body.error and body.error.code }, { 500, "store_failed" }, req[2])
    T.no_match(body.error.message, "EIO", "the store's own words stay in the log")
  end
  recording.fail_reads = nil
  T.eq((env:api("GET", "/v1/calls/" .. id)), 200)
  T.eq((env:api("GET", "/v1/calls/c_none")), 404)
end)

T.test("a store that raises (a backend's way to say disk full) answers 500 store_failed, as one that returns its error", function()
  local recording = require "callagent.store.recording"
  local env = kit.start({ twilio = { behaviour = { ring_ms = 10000 } }, config = { store = { backend = "recording" } } })
  local live = env:create({ to = "+14155550100", prompt = "x" })
  local ended = env:create({ to = "+14155550100", prompt = "x" })
  T.eq((env:api("POST", "/v1/calls/" .. ended .. "/hangup")), 202)
  T.defer(function()
    recording.raise = nil
  end)
  local post = '{"to":"+14155550100","prompt":"y"}'
  for _, case in ipairs({
    { "insert_call", "POST", "/v1/calls", post },
    { "find_idempotent", "POST", "/v1/calls", post, { ["Idempotency-Key"] = "k-1" } },
    { "get_call", "GET", "/v1/calls/" .. ended },
    { "get_call", "POST", "/v1/calls/" .. ended .. "/hangup" },
    { "list_calls", "GET", "/v1/calls" },
    { "transcript", "GET", "/v1/calls/" .. live },
  }) do
    recording.raise = function(op)
      return op == case[1] and "EIO: the disk said no" or nil
    end
    local status, body = env:api(case[2], case[3], case[4], case[5])
    recording.raise = nil
    local what = case[1] .. ": " .. case[2] .. " " .. case[3]
    T.eq({ status, body and body.error and body.error.code }, { 500, "store_failed" }, what)
    T.no_match(body.error.message, "EIO", "the store's own words stay in the log")
  end
  T.eq(env:get(live).status, "dialing", "the live call goes on")
  -- A hang-up needs no transcript: it goes on.
  recording.raise = function(op)
    return op == "transcript" and "EIO: the disk said no" or nil
  end
  local status, body = env:api("POST", "/v1/calls/" .. live .. "/hangup")
  recording.raise = nil
  T.eq({ status, body.status }, { 202, "canceled" }, "hung up while the transcript cannot be read")
end)

T.test("a store that raises with no message (error()) failed too: 500, not a 404 for a call that exists or a second call", function()
  local env = kit.start({ twilio = { behaviour = { ring_ms = 10000 } }, config = { store = { backend = "recording" } } })
  local ended = env:create({ to = "+14155550100", prompt = "x" })
  T.eq((env:api("POST", "/v1/calls/" .. ended .. "/hangup")), 202)
  local req = { to = "+14155550100", prompt = "y" }
  local status = env:api("POST", "/v1/calls", req, { ["Idempotency-Key"] = "k-nil" })
  T.eq(status, 201)
  local store = env.app.engine.store
  local function raises_nothing()
    error()
  end
  -- The store's own methods, shadowed on the instance: a backend with a bug.
  store.get_call, store.find_idempotent = raises_nothing, raises_nothing
  T.defer(function()
    store.get_call, store.find_idempotent = nil, nil
  end)
  local body
  status, body = env:api("GET", "/v1/calls/" .. ended)
  T.eq({ status, body.error.code }, { 500, "store_failed" }, "GET of a call that exists")
  status, body = env:api("POST", "/v1/calls", req, { ["Idempotency-Key"] = "k-nil" })
  T.eq({ status, body.error and body.error.code }, { 500, "store_failed" }, "the Idempotency-Key sent again")
  store.get_call, store.find_idempotent = nil, nil
  T.eq(#env.tw.calls, 2, "dialed once for k-nil")
end)

T.test("a store read that raises just after a call is stored: 201, and the call is dialed (it was left queued for good)", function()
  local recording = require "callagent.store.recording"
  local env = kit.start({ twilio = { behaviour = { ring_ms = 10000 } }, config = { store = { backend = "recording" } } })
  T.defer(function()
    recording.raise = nil
  end)
  -- The first read of the new call's transcript (the view the 201 and the
  -- status event are made of) raises.
  recording.raise = function(op)
    if op == "transcript" then
      recording.raise = nil
      return "EIO: the disk said no"
    end
  end
  local status, body = env:api("POST", "/v1/calls", { to = "+14155550100", prompt = "x" })
  T.eq({ status, body and body.status }, { 201, "dialing" })
  T.wait_for(function()
    return #env.tw.calls == 1
  end, 3000, "the call dialed")
  T.eq(env:get(body.callId).status, "dialing")
end)

T.test("app:create_call of a call that ended before it returned, whose record the store cannot read: the call, not nil", function()
  local recording = require "callagent.store.recording"
  T.defer(function()
    recording.raise = nil
  end)
  -- An app's handler cancels the call as it is queued (a number it will
  -- not ring), and from then on the store raises on reads.
  local env
  env = kit.start({ config = { store = { backend = "recording" } }, on = {
    status = function(view, _, status)
      if status == "queued" then
        assert(env.app.engine:hangup(view.callId))
        recording.raise = function(op)
          return (op == "get_call" or op == "transcript") and "EIO: the disk said no" or nil
        end
      end
    end,
  } })
  local call, err = env.app:create_call({ to = "+14155550100", prompt = "x" })
  recording.raise = nil
  T.ok(call, err)
  T.match(call.callId, "^c_")
  T.eq(call.status, "canceled")
  T.eq(env:get(call.callId).status, "canceled", "the call it names")
  T.eq(#env.tw.calls, 0, "nothing dialed")
end)

T.test("GET of a live call whose transcript SQLite cannot read is 500 store_failed, not an empty transcript; a hang-up says how it ended",
  function()
  local env = kit.start({ twilio = { behaviour = { ring_ms = 10000 } } })
  local live = env:create({ to = "+14155550100", prompt = "x" })
  local db = env.app.store.db
  -- A read that fails (the table out of the way: "no such table").
  assert(db:run("ALTER TABLE transcript RENAME TO transcript_away"))
  local back = false
  T.defer(function()
    if not back then
      db:run("ALTER TABLE transcript_away RENAME TO transcript")
    end
  end)
  local status, body = env:api("GET", "/v1/calls/" .. live)
  T.eq({ status, body.error and body.error.code }, { 500, "store_failed" })
  -- A hang-up needs no transcript: it goes on, and says how it ended though
  -- the ended call cannot be read back (it said "dialing").
  status, body = env:api("POST", "/v1/calls/" .. live .. "/hangup")
  T.eq({ status, body.status }, { 202, "canceled" })
  assert(db:run("ALTER TABLE transcript_away RENAME TO transcript"))
  back = true
  status, body = env:api("GET", "/v1/calls/" .. live)
  T.eq({ status, body.status }, { 200, "canceled" })
end)

T.test("a full disk when a call is created answers 500 store_failed, and nothing is dialed", function()
  local env = kit.start({})
  local db = env.app.store.db
  -- The file may not grow: as a full disk, SQLite answers SQLITE_FULL.
  assert(db:value("PRAGMA max_page_count = " .. db:value("PRAGMA page_count")))
  T.defer(function()
    db:value("PRAGMA max_page_count = 1073741823")
  end)
  local status, body = env:api("POST", "/v1/calls", { to = "+14155550100", prompt = string.rep("Ask about the order. ", 380) })
  T.eq({ status, body.error and body.error.code }, { 500, "store_failed" })
  T.no_match(body.error.message, "ENOSPC", "the store's own words stay in the log")
  timer.sleep(300)
  T.eq(#env.tw.calls, 0, "nothing dialed")
  db:value("PRAGMA max_page_count = 1073741823")
  T.eq((env:api("POST", "/v1/calls", { to = "+14155550100", prompt = "Hi." })), 201, "taken once there is room")
end)

T.test("the webhooks answer 400 naming callId or attempt when the query repeats or lacks them", function()
  local env = env_with({ twilio = { validateSignature = false } })
  local form = { ["Content-Type"] = "application/x-www-form-urlencoded" }
  for _, path in ipairs({ "/status", "/voice" }) do
    for q, field in pairs({ ["?callId=a&callId=b&attempt=1"] = "callId", ["?callId=a&attempt=1&attempt=2"] = "attempt", [""] = "callId" }) do
      local status, body = env:api("POST", path .. q, "CallSid=CA6&CallStatus=ringing", form)
      T.eq({ status, body.error and body.error.code, body.error and body.error.field }, { 400, "bad_request", field }, path .. q)
    end
  end
end)

T.test("the call record has the documented shape", function()
  local env = kit.start({ twilio = { behaviour = "busy" }, config = { retry = { maxAttempts = 1 } } })
  local id = env:create({ to = "+14155550150", prompt = "Shape.", calleeName = "Bob" })
  env:wait_final(id, 5000)
  local status, _, res = env:api("GET", "/v1/calls/" .. id)
  T.eq(status, 200)
  local raw = json.decode(res.body)
  for _, k in ipairs({ "callId", "status", "attempt", "attempts", "to", "calleeName", "transcript", "usage", "createdAt", "updatedAt", "completedAt" }) do
    T.ok(raw[k] ~= nil, "field " .. k)
  end
  T.match(res.body, '"transcript":%[%]', "an empty transcript is an array")
  local a = raw.attempts[1]
  for _, k in ipairs({ "n", "status", "providerCallId", "startedAt", "endedAt", "reason" }) do
    T.ok(a[k] ~= nil, "attempt field " .. k)
  end
end)

-- A callagent process of its own (its log is read): the mock phone, memory
-- store, a model URL nothing listens on (no call gets that far).
local LOGGING_APP = [[
local callagent = require "callagent"
local task = require "callagent.task"
local app = assert(callagent.app({
  telephony = { provider = "mock" },
  server = { port = tonumber(os.getenv("PORT")) },
  openai = { realtimeUrl = "ws://127.0.0.1:9/v1/realtime" },
  store = { backend = "memory" },
}))
task.spawn(function()
  assert(app:start())
end)
]]

T.test("/healthz tells a request the API would refuse (a tunnel's, a proxy's, a web page's) only whether callagent is up", function()
  local env = env_with({})
  local port = env.base:match(":(%d+)$")
  local up = { ok = true, starting = false, paused = false }
  for _, h in ipairs({ { Host = "calls.example.org" }, { ["X-Forwarded-For"] = "203.0.113.9" },
    { Origin = "http://evil.example" } }) do
    local status, body, res = env:api("GET", "/healthz", nil, h)
    T.eq({ status, body }, { 200, up }, json.encode(h))
    T.lacks(res.body, "activeCalls", json.encode(h))
  end
  local status, body = env:api("GET", "/healthz", nil, { Host = "127.0.0.1:" .. port })
  T.eq(status, 200)
  T.eq({ body.provider, body.activeCalls }, { "twilio", 0 }, "this machine's own request has it all")
  T.eq(type(body.loop), "table")
end)

T.test("each refused request is logged once with what was wrong; a request without Host is refused", function()
  local port = T.free_port()
  local p = T.spawn_app(nil, nil, { source = LOGGING_APP, env = { PORT = tostring(port) } })
  T.defer(function()
    p:kill("SIGKILL")
  end)
  local base = "http://127.0.0.1:" .. port
  T.wait_for(function()
    local res = fetch(base .. "/healthz")
    return res and res.status == 200 or p.done
  end, 10000, "the app serving: " .. p.errtext())
  local function send(method, path, body, headers)
    local h = headers or {}
    if body then
      h["Content-Type"] = h["Content-Type"] or "application/json"
    end
    local res = assert(fetch(base .. path, { method = method, body = body, headers = h }))
    return res.status
  end
  T.eq(send("POST", "/v1/calls", "{not json"), 400)
  T.eq(send("POST", "/v1/calls", "{}", { ["Content-Type"] = "text/plain" }), 415)
  T.eq(send("POST", "/v1/calls", json.encode({ to = "+1", prompt = "x" })), 400)
  T.eq(send("GET", "/v1/calls?limit=0"), 400)
  T.eq(send("GET", "/v1/calls/c_nosuchcall"), 404)
  -- No route takes these: the server answers them before any guard, and
  -- they are logged alike (the path without its query, where a token may be).
  T.eq(send("GET", "/v1/nothing/here?token=sk-in-the-query"), 404)
  -- A very long id or path is quoted cut, in the answer and the log line.
  local long = assert(fetch(base .. "/v1/calls/c_" .. string.rep("x", 5000)))
  T.eq(long.status, 404)
  local msg = json.decode(long.body).error.message
  T.ok(#msg < 100 and msg:find("^no call c_x+…$"), "the id cut: " .. msg:sub(1, 200))
  T.eq(send("GET", "/v1/" .. string.rep("y", 5000)), 404)
  local res = assert(fetch(base .. "/v1/calls", { method = "DELETE" }))
  T.eq(res.status, 405)
  T.eq(json.decode(res.body).error.code, "method_not_allowed")
  T.eq(res.headers["allow"], "POST, GET, HEAD")
  -- HTTP/1.1 requires Host; fetch always sends one, so the request is written by hand.
  local lines = {}
  local node = assert(require("callagent.process").spawn({ "node", "-e", [[
const s = require("net").connect(+process.argv[1], "127.0.0.1", () =>
  s.write("GET /v1/calls HTTP/1.1\r\nConnection: close\r\n\r\n"));
let out = ""; s.on("data", d => out += d); s.on("end", () => process.stdout.write(out + "\n"));]], tostring(port),
    on_stdout = function(line)
      lines[#lines + 1] = line
    end,
  }))
  T.eq(node:wait(10000), 0)
  local out = table.concat(lines, "\n")
  T.match(out, "^HTTP/1%.1 403 ")
  T.match(out, '"code":"forbidden_host"')
  T.wait_for(function()
    return select(2, p.errtext():gsub("WARN api: ", "")) >= 10
  end, 5000, "ten log lines: " .. p.errtext())
  local log = p.errtext()
  for line in log:gmatch("[^\n]+") do
    T.lt(#line, 600, "a log line of a long id or path: " .. line:sub(1, 200))
  end
  -- Each: the line's message and code, then fields it must carry too.
  for _, want in ipairs({
    { "WARN api: bad request code=invalid_json ", "method=POST path=/v1/calls status=400" },
    { "WARN api: bad request code=unsupported_media_type ", "path=/v1/calls status=415" },
    { "WARN api: bad request code=invalid_to ", 'field=to method=POST path=/v1/calls status=400' },
    { "WARN api: bad request code=invalid_limit ", "field=limit method=GET path=/v1/calls status=400" },
    { "WARN api: bad request code=not_found ", "path=/v1/calls/c_nosuchcall status=404" },
    { "WARN api: bad request code=not_found ", "method=GET path=/v1/nothing/here status=404" },
    { "WARN api: bad request code=method_not_allowed ", "method=DELETE path=/v1/calls status=405" },
    { "WARN api: request refused code=forbidden_host ", "method=GET path=/v1/calls" },
  }) do
    local found
    for line in log:gmatch("[^\n]+") do
      found = found or (line:find(want[1], 1, true) and line:find(want[2], 1, true))
    end
    T.ok(found, "logged: " .. want[1] .. "... " .. want[2] .. "\n" .. log)
  end
  T.eq(select(2, log:gsub("code=invalid_to", "")), 1, "once, not twice")
  T.no_match(log, "sk%-in%-the%-query")
  T.no_match(log, "token=")
end)

T.run()
