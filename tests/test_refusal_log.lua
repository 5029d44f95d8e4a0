-- Refusals anyone outside can cause as fast as they like (webhooks with a bad
-- signature, wrong API tokens, media streams with a bad token) are logged
-- through log.limited: a flood writes the first few lines of each reason and
-- then one line with the count, at the window's end or at the app's stop;
-- the log stays readable and the disk does not fill.
local T = require "testing"
local kit = require "callkit"
local fetch = require "callagent.fetch"
local log = require "callagent.log"
local json = require "callagent.json"
local ws = require "callagent.ws"
local fake_twilio = require "fakes.twilio"

local FORM = { ["Content-Type"] = "application/x-www-form-urlencoded" }

local function post(url, sig)
  local res = assert(fetch(url, { method = "POST", body = "CallSid=CA1&CallStatus=ringing",
    headers = { ["Content-Type"] = FORM["Content-Type"], ["X-Twilio-Signature"] = sig } }))
  return res.status
end

-- The lines of msg, and the count lines of msg's kind.
local function of(lines, msg)
  local full, counts = {}, {}
  for _, l in ipairs(lines) do
    if l.msg == msg then
      full[#full + 1] = l
    elseif l.msg:sub(1, #msg + 6) == msg .. " (and " then
      counts[#counts + 1] = l
    end
  end
  return full, counts
end

local function with_reason(lines, reason)
  local out = {}
  for _, l in ipairs(lines) do
    if l.fields.reason == reason then
      out[#out + 1] = l
    end
  end
  return out
end

T.test("a flood of webhooks with a bad signature logs 5 lines per reason, and the rest as one count at the app's stop",
  function()
  local warns = T.log_lines("warn")
  local env = kit.start()
  local u = env.base .. "/voice?callId=c_flood&attempt=1"
  for _ = 1, 120 do
    T.eq(post(u, "not-a-signature"), 403)
  end
  -- A signature of the right shape that does not match: another reason.
  local wrong = fake_twilio.sign("not-the-auth-token", u, { CallSid = "CA1", CallStatus = "ringing" })
  for _ = 1, 40 do
    T.eq(post(u, wrong), 403)
  end
  local full, counts = of(warns, "voice webhook refused")
  local shape, match = "X-Twilio-Signature is not an HMAC-SHA1 in base64", "X-Twilio-Signature does not match"
  T.eq({ #with_reason(full, shape), #with_reason(full, match), #counts }, { 5, 5, 0 }, "in the window: 5 each")
  T.eq(full[1].fields.remote ~= nil, true, "who sent it")
  env:close() -- the stop writes the counts: the 60 s window is not waited for
  full, counts = of(warns, "voice webhook refused")
  T.eq(#full, 10)
  local by_reason = {}
  for _, c in ipairs(counts) do
    by_reason[c.fields.reason] = c.fields.suppressed
    T.match(c.msg, "^voice webhook refused %(and " .. c.fields.suppressed .. " more like this in the last [%d.]+ s, not logged")
  end
  T.eq(by_reason, { [shape] = 115, [match] = 35 })
  local text = json.encode(warns)
  T.lacks(text, wrong, "the signature sent")
  T.lacks(text, kit.TOKEN, "the auth token")
end)

T.test("the count of a flood is written when its window ends, with the app still running", function()
  local warns = T.log_lines("warn")
  T.shorten(log, "LIMIT_WINDOW_MS", 200)
  local env = kit.start()
  local n = 60
  for _ = 1, n do
    T.eq(post(env.base .. "/status?callId=c_flood&attempt=1", nil), 403)
  end
  local reason = "X-Twilio-Signature missing"
  local full, counts
  T.wait_for(function()
    full, counts = of(warns, "status callback refused")
    local said = #full
    for _, c in ipairs(counts) do
      said = said + c.fields.suppressed
    end
    return said == n
  end, 5000, "every refusal logged or counted")
  T.ok(#counts >= 1, "a count line came from the window's timer")
  -- However slow the posts, each window of 200 ms writes 5 lines at most.
  T.le(#full, 5 * (#counts + 1))
  T.eq(#with_reason(full, reason), #full, "each line names what was wrong")
  T.eq(#with_reason(counts, reason), #counts)
end)

T.test("media streams refused for a bad token are rate-limited as webhooks are", function()
  local warns = T.log_lines("warn")
  local env = kit.start()
  local url = env.base:gsub("^http", "ws") .. "/voice/stream"
  local sig = fake_twilio.sign(kit.TOKEN, url)
  for i = 1, 12 do
    local conn = assert(ws.connect(url, { headers = { ["X-Twilio-Signature"] = sig } }))
    conn:send(json.encode({ event = "start", streamSid = "MZ" .. i, start = { callSid = "CA" .. i,
      customParameters = { callId = "c_none", attempt = "1", token = "guess-" .. i } } }))
    local kind, code = conn:receive(5000)
    T.eq({ kind, code }, { "close", 1008 })
  end
  env:close()
  local full, counts = of(warns, "media stream refused")
  T.eq(#full, 5)
  T.eq(full[1].fields.reason, "unknown or already used stream token")
  T.eq({ #counts, counts[1] and counts[1].fields.suppressed }, { 1, 7 })
  T.lacks(json.encode(warns), "guess-", "the tokens sent")
end)

T.test("wrong API tokens at /v1 and /healthz are logged as guesses, rate-limited, without the token", function()
  local warns = T.log_lines("warn")
  local token = "api-token-0123456789abcdef"
  local env = kit.start({ config = { server = { apiToken = token } } })
  local guess = "Bearer guess-0123456789abcdef"
  for _ = 1, 3 do
    local status, body = env:api("GET", "/healthz", nil, { Authorization = guess })
    T.eq({ status, body }, { 200, { ok = true, starting = false, paused = false } }, "the short answer")
  end
  local full = of(warns, "api: unauthorized request")
  T.eq(#full, 3, "each guess at /healthz logged")
  T.eq({ full[1].fields.method, full[1].fields.path }, { "GET", "/healthz" })
  T.ok(full[1].fields.remote, "who guessed")
  -- A health check without a token guesses nothing: not logged.
  T.eq(env:api("GET", "/healthz"), 200)
  T.eq(#of(warns, "api: unauthorized request"), 3, "no line for a check without a token")
  T.eq(env:api("GET", "/healthz", nil, { Authorization = "Bearer " .. token }), 200)
  for _ = 1, 30 do
    T.eq(env:api("GET", "/v1/calls", nil, { Authorization = guess }), 401)
  end
  local counts
  full, counts = of(warns, "api: unauthorized request")
  T.eq({ #full, #counts }, { 5, 0 }, "one kind for /v1 and /healthz: 5 lines in the window")
  env:close()
  full, counts = of(warns, "api: unauthorized request")
  T.eq({ #counts, counts[1] and counts[1].fields.suppressed }, { 1, 28 })
  T.eq(counts[1].fields.path, "/v1/calls", "the last one's")
  local text = json.encode(warns)
  T.lacks(text, "guess-0123456789abcdef", "the token guessed")
  T.lacks(text, token, "the token")
end)


-- Posts 8 signed in-progress status callbacks for attempt 1 of call id,
-- each naming a vendor call of its own, as a vendor at fault may; each
-- answered 204.
local function stray_callbacks(env, id)
  local url = require "callagent.url"
  local target = env.base .. "/status?callId=" .. id .. "&attempt=1"
  for i = 1, 8 do
    local params = { CallSid = string.format("CA%032x", i), CallStatus = "in-progress", AccountSid = kit.ACCOUNT }
    local res = assert(fetch(target, { method = "POST", body = url.form_encode(params), headers = {
      ["Content-Type"] = FORM["Content-Type"], ["X-Twilio-Signature"] = fake_twilio.sign(kit.TOKEN, target, params) } }))
    T.eq(res.status, 204)
  end
end

T.test("a flood of signed status callbacks naming vendor calls of an ended call: 5 stray lines, then one count", function()
  local warns, debugs = T.log_lines("warn"), T.log_lines("debug")
  local env = kit.start({ twilio = { behaviour = "busy" }, config = { retry = { maxAttempts = 1 } } })
  local id = env:create({ to = "+14155550175", prompt = "x" })
  env:wait_final(id, 5000)
  -- Each vendor call named is hung up, once; each refusal reaches
  -- log.limited (the lines past 5 are only counted).
  local refused = 0
  local real = log.limited
  log.limited = function(level, msg, ...)
    refused = refused + (msg == "provider hang-up failed" and 1 or 0)
    return real(level, msg, ...)
  end
  T.defer(function()
    log.limited = real
  end)
  stray_callbacks(env, id)
  T.wait_for(function()
    return refused == 8
  end, 5000, "the 8 hang-ups refused")
  -- The provider's own line of each, with the vendor's id, is DEBUG: the
  -- engine's, limited, is the warning.
  T.eq({ #of(debugs, "twilio hang-up failed"), #of(warns, "twilio hang-up failed") }, { 8, 0 })
  env:close()
  local full, counts = of(warns, "the provider has a call up for an attempt that is over: hanging it up")
  T.eq({ #full, #counts, counts[1] and counts[1].fields.suppressed }, { 5, 1, 3 })
  T.eq(full[1].fields.call, id)
  -- Their hang-ups, which the vendor refused (no such call), alike.
  full, counts = of(warns, "provider hang-up failed")
  T.eq({ #full, #counts, counts[1] and counts[1].fields.suppressed }, { 5, 1, 3 })
end)


T.test("callbacks naming an ended call while the store cannot read it: 5 lines, then one count", function()
  local warns = T.log_lines("warn")
  local recording = require "callagent.store.recording"
  T.defer(function()
    recording.refuse = nil
  end)
  local env = kit.start({ twilio = { behaviour = "busy" },
    config = { store = { backend = "recording" }, retry = { maxAttempts = 1 } } })
  local id = env:create({ to = "+14155550176", prompt = "x" })
  env:wait_final(id, 5000)
  recording.refuse = function(op)
    if op == "get_call" then
      return "EIO: disk I/O error (refused)"
    end
  end
  stray_callbacks(env, id)
  recording.refuse = nil
  env:close()
  local full, counts = of(warns, "cannot read the call a callback names: nothing hung up")
  T.eq({ #full, #counts, counts[1] and counts[1].fields.suppressed }, { 5, 1, 3 })
  T.eq({ full[1].fields.call, full[1].fields.error }, { id, "EIO: disk I/O error (refused)" })
end)

T.run()
