-- A provider written from README's "Writing a telephony provider" alone: a
-- file dropped in a folder of provider_dirs, with a config section of its
-- own, whose calls are answered through a route of its own (as the mock
-- provider's are) and whose phone speaks Twilio's Media Streams protocol.
-- The whole call runs: dial, answer, stream, model, report, goodbye, hang-up.
local T = require "testing"
local kit = require "callkit"
local fetch = require "callagent.fetch"
local json = require "callagent.json"
local ws = require "callagent.ws"
local crypto = require "callagent.crypto"
local timer = require "callagent.timer"

local ACME = [[
local timer = require "callagent.timer"
local P = { needs = { "acme.apiKey" } }

function P:init(ctx)
  self.engine, self.app, self.key = ctx.engine, ctx.app, ctx.config.acme.apiKey
  self.placed, self.ended = {}, {}
end

function P:startCall(call, publicBaseUrl, localBaseUrl)
  local id = "acme-" .. call.callId .. "-" .. call.attempt
  self.placed[call.callId] = id
  return { providerCallId = id, userHint = localBaseUrl .. "/acme/answer/" .. call.callId .. "?n=" .. call.attempt }
end

function P:buildVoiceResponse()
  return "", "text/plain"
end

function P:validateRequest(req)
  if req.upgrade then
    return true
  end
  return false, "acme posts no webhooks"
end

function P:mapStatus()
  return nil, "acme posts no status", "status"
end

function P:registerRoutes(srv, ctx)
  srv:post("/acme/answer/{id}", function(req)
    local id, n = req.params.id, tonumber(req.query.n)
    local ok, why = ctx.engine:provider_status(id, n, { status = "in_progress", providerCallId = self.placed[id],
      raw = "answered" })
    if not ok then
      return 409, { error = { code = "not_ringing", message = why } }
    end
    local token, err = ctx.engine:prepare_stream(id, n)
    if not token then
      return 409, { error = { code = "not_ringing", message = err } }
    end
    return 200, { streamUrl = (self.app.url:gsub("^http", "ws")) .. "/voice/stream",
      parameters = { callId = id, attempt = tostring(n), token = token } }
  end)
end

function P:endCall(call, attempt)
  self.ended[#self.ended + 1] = { callId = call.callId, n = attempt.n, providerCallId = attempt.providerCallId }
  -- The vendor's "it hung up" comes later, as a callback would.
  timer.after(10, function()
    self.engine:provider_status(call.callId, attempt.n, { status = "completed", providerCallId = attempt.providerCallId,
      raw = "hungup" })
  end)
  return true
end

return P
]]

-- A folder holding source as acme.lua, for provider_dirs.
local function provider_dir(source)
  local dir = T.tmpdir()
  local f = assert(io.open(dir .. "/acme.lua", "w"))
  f:write(source)
  f:close()
  return dir
end

T.test("a provider written as README says (own folder, own config section, own answer route) places a whole call", function()
  local dir = provider_dir(ACME)
  local env = kit.start({
    provider_dirs = { dir },
    config = { telephony = { provider = "acme" }, acme = { apiKey = "acme-key-for-tests" } },
    realtime = {
      script = function(session)
        assert(session:wait_event("response.create", 5000))
        session:speak({ ms = 300, text = "Hello, calling for Ada." })
        session:call_function("report_call", { summary = "Said hello.", outcome = "success" })
        assert(session:wait_event("response.create", 5000))
        session:speak({ ms = 200, text = "Goodbye!" })
      end,
    },
  })
  T.eq(env.app.provider.name, "acme")
  T.eq(env.app.provider.key, "acme-key-for-tests", "init got its config section")
  local id = env:create({ to = "+14155550100", prompt = "Say hello for Ada.", callerName = "Ada" })
  local rec = env:wait(id, function(r)
    return r.hint ~= nil
  end, 5000, "the hint")
  T.match(rec.hint, "/acme/answer/" .. id .. "%?n=1$")

  -- The phone answers: the provider's route reports in_progress and gives the stream.
  local res = assert(fetch(rec.hint, { method = "POST" }))
  T.eq(res.status, 200, res.body)
  local a = json.decode(res.body)
  local received, closed, conn = "", nil, nil
  conn = assert(ws.connect(a.streamUrl, {
    on_text = function(_, msg)
      local ev = json.decode(msg)
      if ev.event == "media" then
        received = received .. crypto.base64_decode(ev.media.payload)
      elseif ev.event == "mark" then -- played (at once): echoed, as Twilio does
        conn:send(json.encode({ event = "mark", streamSid = ev.streamSid, mark = ev.mark }))
      end
    end,
    on_close = function()
      closed = true
    end,
  }))
  local sid = "MZ" .. crypto.to_hex(crypto.random_bytes(16))
  conn:send(json.encode({ event = "start", streamSid = sid, start = { streamSid = sid,
    mediaFormat = { encoding = "audio/x-mulaw", sampleRate = 8000, channels = 1 }, customParameters = a.parameters } }))
  local frames = timer.every(20, function()
    if not closed then
      conn:send(json.encode({ event = "media", streamSid = sid,
        media = { track = "inbound", payload = crypto.base64_encode(string.rep("\255", 160)) } }))
    end
  end)
  T.defer(function()
    frames:stop()
    conn:close()
  end)

  local call = env:wait_final(id, 10000)
  T.eq({ call.status, call.endReason, call.report and call.report.summary }, { "completed", "completed", "Said hello." })
  T.eq(call.attempts[1].providerCallId, "acme-" .. id .. "-1")
  T.gt(#received, 8 * 300, "the agent's audio reached the phone")
  T.eq(env.app.provider.ended, { { callId = id, n = 1, providerCallId = "acme-" .. id .. "-1" } },
    "endCall hung up that attempt, once")
  local s = env.rt.sessions[1]
  T.match(s.config.instructions, "Say hello for Ada%.")
  T.eq(s.config.tools[1].name, "report_call")
end, { timeout = 20000 })

-- A vendor that signs its media stream's upgrade with a header of its own
-- lists it in requestHeaders: the upgrade's req.headers holds only the
-- headers libwebsockets knows, and these.
local SIGNED = [[
local P = { requestHeaders = { "X-Acme-Signature" }, seen = {} }
function P:startCall(call) return { providerCallId = "acme-" .. call.callId } end
function P:buildVoiceResponse() return "", "text/plain" end
function P:validateRequest(req)
  if not req.upgrade then
    return false, "acme posts no webhooks"
  end
  self.seen[#self.seen + 1] = req.headers["x-acme-signature"] or false
  if req.headers["x-acme-signature"] ~= "signed-by-acme" then
    return false, "bad x-acme-signature"
  end
  return true
end
function P:mapStatus() return nil, "acme posts no status", "status" end
function P:registerRoutes() end
return P
]]

T.test("validateRequest reads a header of the provider's own (requestHeaders) at the /voice/stream upgrade", function()
  local dir = provider_dir(SIGNED)
  local env = kit.start({ provider_dirs = { dir }, config = { telephony = { provider = "acme" } } })
  local url = env.app.url:gsub("^http", "ws") .. "/voice/stream"
  local closed = {}
  local function connect(headers)
    local conn = assert(ws.connect(url, { headers = headers, on_close = function(_, code)
      closed[#closed + 1] = code
    end }))
    T.defer(function()
      conn:close()
    end)
  end
  local seen = env.app.provider.seen
  connect({ ["X-Acme-Signature"] = "signed-by-acme" })
  T.wait_for(function()
    return #seen == 1
  end, 2000, "the upgrade checked")
  T.eq(seen[1], "signed-by-acme", "the provider's own header reached validateRequest")
  connect({ ["X-Acme-Signature"] = "forged" })
  T.wait_for(function()
    return #closed == 1
  end, 2000, "the forged upgrade closed")
  T.eq({ seen[2], closed[1] }, { "forged", 1008 }, "a wrong one refused")
  -- One past 2 KiB (a token) is there whole too: it was left out.
  local long = string.rep("t", 3000)
  connect({ ["X-Acme-Signature"] = long })
  T.wait_for(function()
    return #seen == 3
  end, 2000, "the third upgrade checked")
  T.eq(seen[3] == long or seen[3], true, "a 3000-byte header reached validateRequest")
end)

-- The seed's mapStatus maps a webhook "to CallStatus": a status word alone
-- is taken as {status = word}. A word that is none of callagent's seven was
-- answered 204 and dropped without a word: the call rang on to its timeout.
local WORDS = [[
local P = {}
function P:startCall(call) return { providerCallId = "acme-" .. call.callId } end
function P:buildVoiceResponse() return "<Response/>" end
function P:validateRequest() return true end
function P:mapStatus(p)
  if p.shape == "word" then
    return p.status
  end
  return { status = p.status }
end
function P:registerRoutes() end
return P
]]

-- An app on the WORDS provider, one try per call: env; dial(), a new call
-- of it once it is dialing; and status(id, form), the /status callback's
-- code and decoded body.
local function words_app()
  local env = kit.start({ provider_dirs = { provider_dir(WORDS) },
    config = { telephony = { provider = "acme" }, retry = { maxAttempts = 1 } } })
  local function dial()
    local id = env:create({ to = "+14155550100", prompt = "Say hello." })
    env:wait(id, function(r)
      return r.status == "dialing"
    end, 5000, "dialing")
    return id
  end
  local function status(id, body)
    local res = assert(fetch(env.app.url .. "/status?callId=" .. id .. "&attempt=1", { method = "POST", body = body,
      headers = { ["Content-Type"] = "application/x-www-form-urlencoded" } }))
    return res.status, json.try_decode(res.body)
  end
  return env, dial, status
end

T.test("mapStatus may return the status word alone (the seed's CallStatus); a word callagent lacks is a 500 naming it", function()
  local errs = T.log_lines("error")
  local env, dial, status = words_app()
  local id = dial()
  T.eq(status(id, "shape=word&status=busy"), 204)
  local rec = env:wait(id, function(r)
    return r.status ~= "dialing"
  end, 2000, "the word's status applied")
  T.eq({ rec.status, rec.attempts[1].status }, { "busy", "busy" })

  id = dial()
  local code, body = status(id, "shape=table&status=ringing")
  T.eq({ code, body and body.error and body.error.code }, { 500, "internal" })
  T.eq(errs[#errs] and errs[#errs].msg, "the provider's mapStatus returned no status callagent knows")
  T.eq(errs[#errs].fields.status, "ringing")
  code = status(id, "shape=word&status=")
  T.eq(code, 500, "an empty word")
  T.eq(env:get(id).status, "dialing", "nothing applied")
  -- A provider's own route gets the same from engine:provider_status.
  local ok, why = env.app.engine:provider_status(id, 1, { status = "answered" })
  T.eq({ ok, why }, { false, 'not a status: "answered" (dialing, in_progress, completed, busy, no_answer, failed or canceled)' })
  T.eq({ env.app.engine:provider_status(id, 1, "answered") }, { false, why }, "the word alone")
  T.eq(env.app.engine:provider_status(id, 1, "in_progress"), true, "a status word alone is taken")
  T.eq(env:get(id).status, "in_progress")
end)


T.test("a flood of callbacks whose mapStatus word callagent lacks logs 5 lines, then one count", function()
  local errs = T.log_lines("error")
  local env, dial, status = words_app()
  local id = dial()
  for _ = 1, 12 do
    T.eq(status(id, "shape=table&status=ringing"), 500)
    -- The engine's own check, as a provider's route (Telnyx's) reaches it.
    T.eq(env.app.engine:provider_status(id, 1, "answered"), false)
  end
  env:close() -- writes the counts
  for _, msg in ipairs({ "the provider's mapStatus returned no status callagent knows",
    "a provider status callagent does not know: ignored" }) do
    local full, counts = 0, {}
    for _, l in ipairs(errs) do
      if l.msg == msg then
        full = full + 1
        T.eq(l.fields.status, msg:find("mapStatus") and "ringing" or '"answered"', "each line names the word")
      elseif l.msg:sub(1, #msg + 6) == msg .. " (and " then
        counts[#counts + 1] = l.fields.suppressed
      end
    end
    T.eq({ full, counts }, { 5, { 7 } }, msg)
  end
end)

-- A word callagent lacks is shown cut to 64 bytes. It was cut, then its
-- bytes that are no UTF-8 made U+FFFD: a character across byte 64 ended
-- the word as a U+FFFD of its own (66 bytes), and 64 bad bytes grew to 192.
T.test("a status word callagent lacks is logged cut to at most 64 bytes of whole characters", function()
  local errs = T.log_lines("error")
  local env, dial, status = words_app()
  local id = dial()
  local function shown(word)
    local form = "shape=word&status=" .. word:gsub("[^%w]", function(c)
      return string.format("%%%02X", c:byte())
    end)
    T.eq(status(id, form), 500)
    T.eq(errs[#errs] and errs[#errs].msg, "the provider's mapStatus returned no status callagent knows")
    return errs[#errs].fields.status
  end
  local e = "\u{e9}" -- 2 bytes
  -- "a" and 40 é: byte 64 is the first of the 32nd é.
  T.eq(shown("a" .. e:rep(40)), "a" .. e:rep(31), "cut before the é across byte 64")
  T.eq(shown(e:rep(40)), e:rep(32), "64 bytes of whole characters are kept whole")
  -- 70 bytes that are no UTF-8: 21 U+FFFD (63 bytes), not 64 (192 bytes).
  T.eq(shown(("\xff"):rep(70)), ("\u{FFFD}"):rep(21), "bad bytes made U+FFFD, then cut")
  -- A 4-byte character across byte 64, after 62 ASCII bytes.
  T.eq(shown(("x"):rep(62) .. "\u{1F600}" .. "tail"), ("x"):rep(62), "a 4-byte character is not split")
  T.eq(shown("short\xffword"), "short\u{FFFD}word", "a bad byte inside a short word")
  -- The engine's own answer quotes the word so too.
  local ok, why = env.app.engine:provider_status(id, 1, "a" .. e:rep(40))
  T.eq({ ok, why }, { false, 'not a status: "a' .. e:rep(31) .. '" (' .. "dialing, in_progress, completed, busy, "
    .. "no_answer, failed or canceled)" })
end)
-- The seed's startCall returns {providerCallId?, userHint?}: a vendor that
-- names its call only later. endCall gets the id once a status gave one.
local LATER = [[
local P = { ended = {} }
function P:init(ctx) self.engine = ctx.engine end
function P:startCall() return {} end
function P:buildVoiceResponse() return "<Response/>" end
function P:validateRequest() return true end
function P:mapStatus(p) return { status = p.status, providerCallId = p.id } end
function P:registerRoutes() end
function P:endCall(call, attempt)
  self.ended[#self.ended + 1] = attempt.providerCallId or false
  self.engine:provider_status(call.callId, attempt.n, { status = "canceled", providerCallId = attempt.providerCallId })
  return true
end
return P
]]

T.test("startCall may leave providerCallId out (the seed's {providerCallId?}): the first status that names it gives it", function()
  local env = kit.start({ provider_dirs = { provider_dir(LATER) }, config = { telephony = { provider = "acme" } } })
  local function place()
    local id = env:create({ to = "+14155550100", prompt = "Say hello." })
    return id, env:wait(id, function(r)
      return r.status == "dialing"
    end, 5000, "dialing")
  end
  local id, rec = place()
  T.eq(rec.attempts[1].providerCallId, nil)
  T.eq(env:api("POST", "/v1/calls/" .. id .. "/hangup"), 202)
  T.eq(env:wait_final(id, 5000).status, "canceled")
  id = place()
  local res = assert(fetch(env.app.url .. "/status?callId=" .. id .. "&attempt=1", { method = "POST",
    body = "status=dialing&id=VENDOR-1", headers = { ["Content-Type"] = "application/x-www-form-urlencoded" } }))
  T.eq(res.status, 204)
  T.eq(env:get(id).attempts[1].providerCallId, "VENDOR-1")
  T.eq(env:api("POST", "/v1/calls/" .. id .. "/hangup"), 202)
  T.eq(env:wait_final(id, 5000).attempts[1].providerCallId, "VENDOR-1")
  T.eq(env.app.provider.ended, { false, "VENDOR-1" }, "endCall got nil, then the id the status gave")
end)

T.run()
