-- Small edges: the header a 401 or 403 names, an Idempotency-Key of two
-- keys, the store's folders and lock, refused hang-ups in the log.
local T = require "testing"
local kit = require "callkit"
local fetch = require "callagent.fetch"
local json = require "callagent.json"
local crypto = require "callagent.crypto"
local log = require "callagent.log"

T.test("a 401 names the Authorization header; a 403 of the API the header at fault", function()
  local token = "api-token-0123456789abcdef"
  local env = kit.start({ config = { server = { apiToken = token } } })
  local status, body = env:api("GET", "/v1/calls")
  T.eq({ status, body.error.code, body.error.field }, { 401, "unauthorized", "Authorization" }, "no token")
  status, body = env:api("POST", "/v1/calls", { to = "+14155550130", prompt = "x" },
    { Authorization = "Bearer wrong-token-0123456789" })
  T.eq({ status, body.error.code, body.error.field }, { 401, "unauthorized", "Authorization" }, "a wrong token")
  status, body = env:api("GET", "/v1/nothing/here")
  T.eq({ status, body.error.field }, { 401, "Authorization" }, "a path no route has")
  status, body = env:api("GET", "/v1/calls", nil, { Origin = "https://evil.example", Authorization = "Bearer " .. token })
  T.eq({ status, body.error.code, body.error.field }, { 403, "forbidden_origin", "Origin" })
  local warns = T.log_lines("warn")
  env = kit.start()
  status, body = env:api("GET", "/v1/calls", nil, { Host = "calls.example.org" })
  T.eq({ status, body.error.code, body.error.field }, { 403, "forbidden_host", "Host" })
  for _, name in ipairs({ "X-Forwarded-For", "X-Forwarded-Host", "Forwarded", "Via", "X-Real-IP" }) do
    status, body = env:api("GET", "/v1/calls", nil, { [name] = "203.0.113.9" })
    T.eq({ status, body.error.code, body.error.field }, { 403, "forbidden_host", name })
  end
  -- The log lines name the header too (the Host in them is loopback); the
  -- first 5 of the kind are written.
  local named = {}
  for _, l in ipairs(warns) do
    if l.msg == "api: request refused" then
      named[#named + 1] = l.fields.field
    end
  end
  T.eq(named, { "Host", "X-Forwarded-For", "X-Forwarded-Host", "Forwarded", "Via" })
end)

T.test("a Twilio webhook refused for its signature names X-Twilio-Signature", function()
  local env = kit.start()
  for _, case in ipairs({ { "/voice", nil }, { "/status", "bm9wZQ==" },
    { "/voice", crypto.base64_encode(string.rep("x", 20)) } }) do
    local res = assert(fetch(env.base .. case[1] .. "?callId=c_x&attempt=1", { method = "POST", body = "CallStatus=ringing",
      headers = { ["Content-Type"] = "application/x-www-form-urlencoded", ["X-Twilio-Signature"] = case[2] } }))
    local e = json.decode(res.body).error
    T.eq({ res.status, e.code, e.field }, { 403, "forbidden", "X-Twilio-Signature" }, case[1])
  end
end)

T.test("a Telnyx webhook refused names the telnyx-timestamp or telnyx-signature-ed25519 header", function()
  local pk = crypto.base64_encode(string.rep("k", 32))
  local env = kit.start({ config = { telephony = { provider = "telnyx" },
    telnyx = { apiKey = "KEY0123456789ABCDEF_telnyx-test-key", connectionId = "1", fromNumber = "+15550002222",
      publicKey = pk } } })
  local body = json.encode({ data = { event_type = "call.answered", payload = {} } })
  for _, case in ipairs({
    { {}, "telnyx-timestamp" },
    { { ["telnyx-timestamp"] = tostring(os.time() - 3600) }, "telnyx-timestamp" },
    { { ["telnyx-timestamp"] = tostring(os.time()) }, "telnyx-signature-ed25519" },
    { { ["telnyx-timestamp"] = tostring(os.time()), ["telnyx-signature-ed25519"] = crypto.base64_encode(
      string.rep("\0", 64)) }, "telnyx-signature-ed25519" },
  }) do
    case[1]["Content-Type"] = "application/json"
    local res = assert(fetch(env.base .. "/telnyx/webhook", { method = "POST", body = body, headers = case[1] }))
    local e = json.decode(res.body).error
    T.eq({ res.status, e.code, e.field }, { 403, "forbidden", case[2] }, json.encode(case[1]))
  end
end)

T.test("an Idempotency-Key of two keys joined with a comma is refused 400, naming the header", function()
  local env = kit.start()
  for _, key in ipairs({ "order-1,order-2", "order-1, order-2" }) do
    local status, body = env:api("POST", "/v1/calls", { to = "+14155550150", prompt = "x" }, { ["Idempotency-Key"] = key })
    T.eq({ status, body.error.code, body.error.field }, { 400, "invalid_idempotency_key", "Idempotency-Key" }, key)
    -- ", " is how a proxy joins them: the message says comma, not space.
    T.match(body.error.message, "without a comma", key)
  end
  T.eq(#env.tw.calls, 0, "nothing dialed")
end)

T.test("an in-memory database opened with lock takes none: two open at once, no :memory:.lock made", function()
  local sqlite = require "callagent.sqlite"
  local core = require "callagent.core"
  T.defer(function()
    os.remove(":memory:.lock")
  end)
  local a = assert(sqlite.open(":memory:", { lock = true }))
  local b, err = sqlite.open(":memory:", { lock = true })
  T.ok(b, err)
  T.eq(core.stat(":memory:.lock"), nil, "no lock file in the working folder")
  a:close()
  if b then
    b:close()
  end
end)

local function mode(path)
  local code, lines = T.exec({ "stat", "-c", "%a", path })
  return code == 0 and lines[1] or nil
end

T.test("the store's folders it creates are 0700; a folder that was there keeps its mode", function()
  local dir = T.tmpdir()
  local core = require "callagent.core"
  assert(core.mkdir(dir .. "/mine"))
  T.eq(T.exec({ "chmod", "755", dir .. "/mine" }), 0) -- the user's, whatever the umask
  local store = assert(require("callagent.store.sqlite").open({ path = dir .. "/mine/new/sub/calls.db" }))
  store:close()
  T.eq({ mode(dir .. "/mine"), mode(dir .. "/mine/new"), mode(dir .. "/mine/new/sub") }, { "755", "700", "700" })
end)

T.test("two store paths that link to one database take one lock, beside the real file", function()
  local sqlite = require "callagent.sqlite"
  local dir = T.tmpdir()
  local core = require "callagent.core"
  assert(core.mkdir(dir .. "/data"))
  assert(core.mkdir(dir .. "/a"))
  local target = dir .. "/data/calls.db"
  assert(io.open(target, "w")):close()
  T.eq(T.exec({ "ln", "-s", target, dir .. "/a/calls.db" }), 0)
  T.eq(T.exec({ "ln", "-s", dir .. "/data", dir .. "/b" }), 0) -- a linked folder
  local first = assert(sqlite.open(dir .. "/a/calls.db", { lock = true }))
  T.defer(function()
    first:close()
  end)
  T.eq(mode(target .. ".lock"), "600", "the lock beside the real file")
  T.eq(mode(dir .. "/a/calls.db.lock"), nil, "none beside the link")
  local db, err = sqlite.open(dir .. "/b/calls.db", { lock = true })
  T.eq(db, nil, "the same database through another link is locked")
  T.match(err, "^EBUSY: .*/b/calls%.db: in use by another process")
  db, err = sqlite.open(target, { lock = true })
  T.eq(db, nil, "and by its own path")
  T.match(err, "^EBUSY: ")
end)

T.test("hang-ups a vendor outage refuses log 5 lines with their calls, then a count; another failure is written", function()
  local warns = T.log_lines("warn")
  local n = 0
  local env = kit.start({ twilio = { behaviour = function()
    n = n + 1
    -- The ninth call's hang-up fails otherwise than the outage's.
    return { ring_ms = 60000, update_fail = n == 9 and 500 or 503 }
  end } })
  local ids = {}
  for i = 1, 9 do
    ids[i] = env:create({ to = "+1415555014" .. i, prompt = "x" })
  end
  T.wait_for(function()
    return #env.tw.calls == 9
  end, 5000, "9 calls ringing")
  for i = 1, 9 do
    T.eq((env:api("POST", "/v1/calls/" .. ids[i] .. "/hangup")), 202)
  end
  env:close() -- writes the counts
  local full, counts = {}, {}
  for _, l in ipairs(warns) do
    if l.msg == "provider hang-up failed" then
      full[#full + 1] = l
    elseif l.msg:find("^provider hang%-up failed %(and ") then
      counts[#counts + 1] = l
    end
  end
  T.eq(#full, 6, "5 of the outage's, and the other one")
  for i = 1, 5 do
    T.eq({ full[i].fields.call, full[i].fields.error }, { ids[i], "twilio 20500: Internal Server Error (HTTP 503)" })
  end
  T.eq({ full[6].fields.call, full[6].fields.error }, { ids[9], "twilio 20500: Internal Server Error (HTTP 500)" })
  T.eq(#counts, 1)
  -- The 3 calls past the 5, and any of the cancels asked again since.
  T.ok(counts[1].fields.suppressed >= 3, counts[1].msg)
  -- The provider's own line of each refusal (its sid) is DEBUG: no second
  -- WARN per call and try beside the engine's.
  local own = 0
  for _, l in ipairs(warns) do
    own = own + (l.msg:find("^twilio hang%-up failed") and 1 or 0)
  end
  T.eq(own, 0, "the provider's own WARN lines")
end)

T.test("Telnyx hang-ups an outage refuses: the provider's retries are rate-limited, its failure lines DEBUG", function()
  local warns = T.log_lines("warn")
  -- Telnyx in an outage: the first 7 requests 503, then 404 (not tried again).
  local asked = 0
  local api = T.server(nil, function(srv)
    srv:route("*", "/*", function()
      asked = asked + 1
      local e = asked <= 7 and { 503, "10011", "Service unavailable" } or { 404, "10005", "Resource not found" }
      return e[1], { errors = { { code = e[2], title = e[3] } } }
    end)
  end)
  local env = kit.start({ config = { telephony = { provider = "telnyx" },
    telnyx = { apiKey = "KEY0123456789ABCDEF_telnyx-test-key", connectionId = "1", fromNumber = "+15550002222",
      publicKey = crypto.base64_encode(string.rep("k", 32)), apiBaseUrl = api:url("") } } })
  -- 7 hang-ups at once: each tried again once.
  local done = 0
  for i = 1, 7 do
    require("callagent.task").spawn(function()
      T.eq(env.app.provider:endCall({ callId = "c_" .. i }, { n = 1, providerCallId = "v3:gone" .. i,
        status = "in_progress" }), nil)
      done = done + 1
    end)
  end
  T.wait_for(function()
    return done == 7
  end, 5000, "7 hang-ups refused")
  env:close()
  local n = {}
  for _, l in ipairs(warns) do
    local m = l.msg:gsub(" %(and %d+ more.*", " (count)")
    n[m] = (n[m] or 0) + 1
  end
  T.eq({ n["telnyx hangup failed: trying again"], n["telnyx hangup failed: trying again (count)"],
    n["telnyx hang-up failed"] or 0, n["telnyx hang-up failed (count)"] or 0 }, { 5, 1, 0, 0 })
end)

T.run()
