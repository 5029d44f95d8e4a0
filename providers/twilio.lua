--- providers/twilio.lua: Twilio Programmable Voice with Media Streams.
--
-- Dials with the REST API (POST {twilio.apiBaseUrl}/2010-04-01/Accounts/{sid}/Calls.json,
-- basic auth), answers POST /voice with <Connect><Stream> TwiML, checks
-- X-Twilio-Signature on every webhook (when twilio.validateSignature), maps
-- status callbacks, and hangs up with Status=completed (or canceled before
-- answer). Config: twilio.accountSid, twilio.authToken, twilio.fromNumber,
-- twilio.apiBaseUrl, twilio.validateSignature, twilio.requestTimeoutSec;
-- server.publicBaseUrl (or a tunnel).
--
-- Wire facts and where they come from (checked 2026-11):
--   - Calls are created by POST to the Calls resource, rate limited per
--     account by calls per second (1 by default) and queued beyond it
--     (queue_time, the expected wait in ms, in the create answer: the ring
--     timeout counts from then; getCall says queued while the call waits,
--     and the ring timeout waits for a call Twilio has not placed rather
--     than cancel it; www.twilio.com/docs/voice/api/call-resource); the
--     REST statuses are queued, ringing, in-progress, completed, busy,
--     failed, no-answer, canceled (www.twilio.com/docs/voice/api/call; the
--     CallStatus type of twilio-node lib/rest/api/v2010/account/call.d.ts),
--     all mapped by getCall. Status callbacks (a StatusCallback with
--     StatusCallbackEvent): www.twilio.com/docs/usage/webhooks/voice-webhooks.
--   - Errors are JSON {code, message, more_info, status} (e.g. {"code":21211,
--     "message":"The 'To' number ... is not a valid phone number.",
--     "status":400}). Refusals no retry cures, answered HTTP 400/401/403/404,
--     end the attempt failed with no retry (startCall's third value
--     {permanent = true}): 21211 invalid To, 21214 To cannot be reached
--     (twilio.com/docs/api/errors/21214), 21215 geo permissions, 21216 call
--     blocked by Twilio (www.twilio.com/docs/errors/21216), 21217 not a valid
--     number (twilio.com/docs/api/errors/21217), 20003 Authenticate (401).
--     13224/13225 are errors of TwiML <Dial> (twilio.com/docs/api/errors/
--     13224), not of the Calls resource. 429 / 20429 "is never processed and
--     is always safe to retry" (www.twilio.com/docs/errors/20429): sent again
--     up to twice after Retry-After (at most 5 s) or 1 s, 2 s, unless the
--     engine no longer wants it (engine:dial_wanted: hung up through the
--     API, the app stopping; asked every 100 ms of the wait). Any other
--     failure (5xx, a timeout) may have placed the call: the attempt fails
--     and the retry policy decides (a callback naming a call placed all the
--     same has it hung up: README, Status callbacks).
--   - Timeout: "any positive, whole integer" (21208 otherwise,
--     twilio.com/docs/api/errors/21208), default 60, at most 600, Twilio may
--     add 5 s: call.ringTimeoutSec (1..600) is sent as is. TimeLimit: the
--     account's limit, 4 h by default and configurable up to 24 h, per call
--     from 1 minute (www.twilio.com/en-us/blog/introducing-configurable-call-
--     limits-for-programmable-voice); a call over it ends with warning 32015
--     (twilio.com/docs/api/errors/32015). Ours is at least 62 s, and at most
--     15120 s (call.maxDurationSec 14400 + wrap-up + goodbye + 60): an
--     account left at 4 h cuts a call with maxDurationSec near 14400 first.
--   - Hang-up: Status is canceled or completed only (CallUpdateStatus in
--     twilio-node call.d.ts; 21218 otherwise); canceled ends a queued or
--     ringing call and has no effect on one in progress (twilio/twilio-python
--     issue 10), hence completed once answered.
--   - Media Streams: every `start` carries start.callSid (protocols.md
--     section 2): a stream whose callSid is not the attempt's is refused
--     (streamStart, engine:claim_stream). Status callbacks' SequenceNumber
--     (from 0) and CallDuration are decimal text (protocols.md section 3).
--   - Signatures: /work/shared/reference/protocols.md section 4 (the
--     twilio-python / twilio-node validators and their test vectors, checked
--     in tests/test_twilio_signature.lua).
--   ASSUMED (not found in the docs read, 2026-11): that Twilio sends a
--   Retry-After with its 429 (honoured when it does); the answer to a hang-up
--   of a call that has already ended (21220 "Invalid call state" is
--   documented for redirects and recordings of a call not in progress,
--   twilio.com/docs/api/errors/21220; the engine asks getCall after any
--   refused hang-up, and one of a call over at Twilio counts as done); an
--   ErrorCode field in the callback of a failed call (not in the status
--   callback parameters the docs list; when one comes, 5 digits, the
--   attempt's reason names it after the SipResponseCode; ErrorMessage is
--   not read); what Twilio does with a TimeLimit above the account's limit.
local fetch = require "callagent.fetch"
local url = require "callagent.url"
local json = require "callagent.json"
local crypto = require "callagent.crypto"
local log = require "callagent.log"
local timer = require "callagent.timer"

local P = {
  name = "twilio",
  needs = { "twilio.accountSid", "twilio.authToken", "twilio.fromNumber" },
  needs_public_url = true,
  -- Twilio signs the /voice/stream upgrade too (validateRequest).
  requestHeaders = { "x-twilio-signature" },
}

-- Twilio's own REST API (api.twilio.com, or a region's api.<edge>.twilio.com),
-- not a fake or an emulator of it. A name written with the root's dot
-- (api.twilio.com.) is the same host.
local function real_twilio(api)
  local host = ((url.parse(api) or {}).host or ""):gsub("%.$", "")
  return host == "twilio.com" or host:sub(-#".twilio.com") == ".twilio.com"
end

function P:init(ctx)
  self.cfg = ctx.config
  self.tw = ctx.config.twilio
  self.engine = ctx.engine
  -- Twilio connects <Stream> to wss:// only (protocols.md section 2): with an
  -- http:// public URL each call was answered, got no stream (no_stream after
  -- 15 s) and was dialed again. A tunnel's URL is https://.
  local public = ctx.config.server.publicBaseUrl
  if public and public:find("^http://") and real_twilio(self.tw.apiBaseUrl) then
    error("server.publicBaseUrl: Twilio connects its media stream only to wss://, and an http:// URL makes it "
      .. "ws://: give the https:// URL Twilio reaches this server at", 0)
  end
end

-- A Twilio call sid: "CA" and 32 hex digits. It goes into the path of REST
-- requests made with our credentials: one that is anything else (a path, a
-- query) never does, wherever it came from (a dial's answer, a callback).
local function call_sid(v)
  return type(v) == "string" and #v == 34 and v:find("^CA%x+$") and v or nil
end

local function calls_url(self, sid)
  local base = self.tw.apiBaseUrl .. "/2010-04-01/Accounts/" .. self.tw.accountSid .. "/Calls"
  return sid and (base .. "/" .. sid .. ".json") or (base .. ".json")
end

-- Request options: basic auth and the timeout. A hang-up or a status lookup
-- waits at most 10 s, however long a dial may take.
local function request(self, max_ms)
  local ms = self.tw.requestTimeoutSec * 1000
  return { username = self.tw.accountSid, password = self.tw.authToken, timeout = max_ms and math.min(ms, max_ms) or ms }
end

-- A Twilio REST error as one line: "twilio 21215: <message> (HTTP 400)", or
-- "twilio error: <message> (HTTP 503)" when its code is no whole number
-- (null, an object: not written as a Lua value).
local function rest_error(res, err)
  if not res then
    return "twilio request failed: " .. tostring(err)
  end
  local body = json.try_decode(res.body)
  if type(body) == "table" and type(body.message) == "string" then
    local code = math.type(body.code) and math.tointeger(body.code)
    return string.format("twilio %s: %s (HTTP %d)", tostring(code or "error"), body.message, res.status)
  end
  return string.format("twilio answered HTTP %d", res.status)
end

-- HTTP statuses of a refused dial that another try would meet alike: the
-- request itself is at fault (400: the To number, Twilio's geo permissions,
-- a blocked destination), or the credentials (401) or the account (403, 404).
local REFUSED_FOR_GOOD = { [400] = true, [401] = true, [403] = true, [404] = true }
-- A dial answered 429 (Twilio's 20429, never processed) is sent again this
-- many times, after Retry-After seconds (at most RATE_WAIT_MAX_S) or 1, 2 s.
local RATE_RETRIES, RATE_WAIT_MAX_S = 2, 5

local function retry_after_ms(res, try)
  local s = tonumber((res.headers or {})["retry-after"] or "")
  if s and s >= 0 then
    return math.floor(math.min(s, RATE_WAIT_MAX_S) * 1000)
  end
  return 1000 * 2 ^ (try - 1)
end

-- Whether the engine still wants this attempt dialed (not hung up through
-- the API, the app not stopping): asked before a dial is sent again.
local function wanted(self, call)
  local e = self.engine
  return not (e and e.dial_wanted) or e:dial_wanted(call.callId, call.attempt)
end

-- Waits ms before a dial is sent again, asking every WANT_CHECK_MS whether it
-- is still wanted: false as soon as it is not (a stop does not wait it out).
local WANT_CHECK_MS = 100
local function wait_wanted(self, call, ms)
  local until_ms = timer.now() + ms
  while wanted(self, call) do
    local left = until_ms - timer.now()
    if left <= 0 then
      return true
    end
    timer.sleep(math.min(WANT_CHECK_MS, left))
  end
  return false
end

-- A status callback's SequenceNumber or CallDuration: Twilio writes them as
-- decimal whole numbers ("0", "17"); a JSON body may hold them as numbers.
-- Anything else ("1e999", "0x10", " 7", "1.5", "-1") is no number of
-- Twilio's and is passed over: tonumber took "1e999" as infinity, and every
-- later callback of the call as stale.
local function whole(v)
  if type(v) == "number" then -- a JSON body's number (Twilio's forms send text)
    return v >= 0 and v < 2 ^ 53 and math.tointeger(v) or nil
  end
  return type(v) == "string" and #v <= 15 and v:find("^%d+$") and math.tointeger(tonumber(v)) or nil
end

function P:startCall(call, publicBaseUrl)
  local q = "?callId=" .. call.callId .. "&attempt=" .. call.attempt
  local form = {
    To = call.to,
    From = self.tw.fromNumber,
    Url = publicBaseUrl .. "/voice" .. q,
    Method = "POST",
    StatusCallback = publicBaseUrl .. "/status" .. q,
    StatusCallbackMethod = "POST",
    StatusCallbackEvent = { "initiated", "ringing", "answered", "completed" },
    Timeout = tostring(self.cfg.call.ringTimeoutSec),
    -- A backstop only: the wrap-up at maxDurationSec and the goodbye after
    -- the report come first (a TimeLimit inside them cut the report).
    TimeLimit = tostring(self.cfg.call.maxDurationSec + self.cfg.call.wrapUpSec + self.cfg.call.goodbyeTimeoutSec + 60),
  }
  local o = request(self)
  o.method = "POST"
  o.body = url.form_encode(form)
  o.headers = { ["Content-Type"] = "application/x-www-form-urlencoded", Accept = "application/json" }
  local res, err
  for try = 1, RATE_RETRIES + 1 do
    res, err = fetch(calls_url(self), o)
    if not res or res.status ~= 429 or try > RATE_RETRIES then
      break
    end
    local wait = retry_after_ms(res, try)
    log.warn("twilio rate-limited the dial: sending it again", { call = call.callId, after_ms = wait, retry = try })
    if not wait_wanted(self, call, wait) then
      log.info("the rate-limited dial is no longer wanted (hung up, or callagent stops): not sent again",
        { call = call.callId, attempt = call.attempt })
      break
    end
  end
  if not res or res.status ~= 201 and res.status ~= 200 then
    return nil, rest_error(res, err), { permanent = res ~= nil and REFUSED_FOR_GOOD[res.status] == true }
  end
  local body = json.try_decode(res.body)
  if type(body) ~= "table" or not call_sid(body.sid) then
    return nil, "twilio answered without a call sid"
  end
  -- queue_time: how long Twilio expects the call to wait in the account's
  -- calls-per-second queue before it places it, in ms (decimal text); the
  -- ring timeout counts from then. At most a day: Twilio refuses a call
  -- that its queue would not place within 24 h (22005,
  -- www.twilio.com/docs/api/errors/22005).
  local queued = whole(body.queue_time)
  return { providerCallId = body.sid, queueMs = queued and math.min(queued, 86400000) or nil }
end

local function xml_escape(s)
  return (tostring(s):gsub('[&<>"\']', { ["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;", ['"'] = "&quot;", ["'"] = "&apos;" }))
end

function P:buildVoiceResponse(_, _, stream)
  if not stream then
    return '<?xml version="1.0" encoding="UTF-8"?><Response><Hangup/></Response>', "text/xml"
  end
  local params = {}
  for _, k in ipairs({ "callId", "attempt", "token" }) do
    if stream.parameters[k] ~= nil then
      params[#params + 1] = string.format('<Parameter name="%s" value="%s"/>', k, xml_escape(stream.parameters[k]))
    end
  end
  return '<?xml version="1.0" encoding="UTF-8"?><Response><Connect><Stream url="' .. xml_escape(stream.url) .. '">'
    .. table.concat(params) .. "</Stream></Connect></Response>", "text/xml"
end

--- The stream's `start`: its streamSid, the <Parameter>s (start.customParameters)
-- and the call it streams (start.callSid, in every start Twilio sends:
-- protocols.md section 2). The engine refuses a stream whose callSid is not
-- the attempt's (engine:claim_stream); one without any is refused here.
function P:streamStart(ev)
  local start = type(ev.start) == "table" and ev.start or {}
  if type(start.callSid) ~= "string" or start.callSid == "" then
    return nil, "start without a callSid"
  end
  return { streamSid = ev.streamSid or start.streamSid, parameters = start.customParameters,
    providerCallId = start.callSid }
end

-- X-Twilio-Signature -----------------------------------------------------------

--- base64(HMAC-SHA1(token, url .. sorted name..value pairs)); values of a
-- repeated name distinct and sorted.
function P.signature(token, full_url, params)
  local names = {}
  for k in pairs(params or {}) do
    names[#names + 1] = k
  end
  table.sort(names)
  local parts = { full_url }
  for _, k in ipairs(names) do
    local v = params[k]
    local values = type(v) == "table" and v or { v }
    local seen, uniq = {}, {}
    for _, x in ipairs(values) do
      x = tostring(x)
      if not seen[x] then
        seen[x] = true
        uniq[#uniq + 1] = x
      end
    end
    table.sort(uniq)
    for _, x in ipairs(uniq) do
      parts[#parts + 1] = k .. x
    end
  end
  return crypto.base64_encode(crypto.hmac_sha1(token, table.concat(parts)))
end

-- The URL as given, without its port, and with the scheme's default port.
local function url_variants(u)
  local out = { u }
  local scheme, host, port, rest = u:match("^(%a+)://([^/:]+):?(%d*)(.*)$")
  if not scheme then
    return out
  end
  local default = (scheme == "https" or scheme == "wss") and "443" or "80"
  if port ~= "" then
    out[#out + 1] = scheme .. "://" .. host .. rest
  else
    out[#out + 1] = scheme .. "://" .. host .. ":" .. default .. rest
  end
  return out
end

--- Whether signature is right for the URL Twilio requested and the params.
function P.check_signature(token, full_url, params, signature, body)
  if type(signature) ~= "string" or signature == "" then
    return false
  end
  local sha = full_url:match("[?&]bodySHA256=(%x+)")
  if sha then
    if not body or crypto.to_hex(crypto.sha256(body)) ~= sha:lower() then
      return false
    end
    params = {}
  end
  for _, u in ipairs(url_variants(full_url)) do
    if crypto.constant_time_eq(P.signature(token, u, params), signature) then
      return true
    end
  end
  return false
end

-- The most form parameters a webhook may have. Twilio's voice webhooks and
-- status callbacks have about 50 (twilio.com/docs/voice/twiml#request-
-- parameters, .../voice/api/call-resource#statuscallback): a body of
-- 256 KiB held 26,000, whose decoding, sorting and hashing, before the
-- signature could fail, held the event loop (every call's audio) 100 ms,
-- for anyone who can reach the server.
P.MAX_FORM_PARAMS = 200

function P:validateRequest(req, publicBaseUrl)
  if not self.tw.validateSignature then
    return true
  end
  -- An HMAC-SHA1 in base64 is 28 characters: anything else is refused
  -- before the body is looked at.
  local sig = req.headers["x-twilio-signature"]
  if type(sig) ~= "string" or sig == "" then
    return false, "X-Twilio-Signature missing", "X-Twilio-Signature"
  elseif #sig ~= 28 or not sig:find("^[%w+/]+=$") then
    return false, "X-Twilio-Signature is not an HMAC-SHA1 in base64", "X-Twilio-Signature"
  end
  local base = publicBaseUrl
  local params = {}
  if req.method == "GET" and req.upgrade then
    base = base:gsub("^http", "ws") -- the stream URL Twilio connected to
  elseif req:content_type():find("application/x-www-form-urlencoded", 1, true) then
    local body = req.body or ""
    if select(2, body:gsub("&", "")) >= P.MAX_FORM_PARAMS then
      return false, "a form of more than " .. P.MAX_FORM_PARAMS .. " parameters (no Twilio webhook has as many)"
    end
    params = url.form_decode(body)
  end
  local full = base .. req.path .. ((req.raw_query and req.raw_query ~= "") and ("?" .. req.raw_query) or "")
  -- Any other body (JSON) is signed through its hash in the URL; without
  -- it the signature would cover the URL alone, and any body would pass.
  if (req.body or "") ~= "" and not next(params) and not full:find("[?&]bodySHA256=") then
    return false, "a body that is not a form comes without bodySHA256"
  end
  if P.check_signature(self.tw.authToken, full, params, sig, req.body) then
    return true
  end
  return false, "X-Twilio-Signature does not match", "X-Twilio-Signature"
end

local STATUS = {
  queued = "dialing",
  initiated = "dialing",
  ringing = "dialing",
  ["in-progress"] = "in_progress",
  answered = "in_progress",
  completed = "completed",
  busy = "busy",
  ["no-answer"] = "no_answer",
  failed = "failed",
  canceled = "canceled",
}

function P:mapStatus(payload)
  local s = payload.CallStatus
  local status = STATUS[s]
  if not status then
    -- The message is answered and logged: no bytes of the request's own.
    if type(s) ~= "string" then
      return nil, "CallStatus is missing or not a string", "CallStatus"
    end
    return nil, "unknown CallStatus" .. (#s <= 32 and s:find("^[%w%-_]+$") and (" " .. s) or ""), "CallStatus"
  end
  local reason
  if status == "failed" then
    local sip = whole(payload.SipResponseCode)
    -- Twilio's error code, should a failed call's callback carry one
    -- (ASSUMED: header): a whole number of 5 digits only, never its text.
    local code = whole(payload.ErrorCode)
    code = code and code >= 10000 and code <= 99999 and code
    local why = {}
    if sip and sip >= 100 and sip < 700 then
      why[#why + 1] = "SIP " .. sip
    end
    if code then
      why[#why + 1] = "Twilio error " .. code
    end
    reason = "call failed" .. (#why > 0 and (" (" .. table.concat(why, ", ") .. ")") or "")
  elseif status == "busy" then
    reason = "line busy"
  elseif status == "no_answer" then
    reason = "no answer"
  end
  return {
    status = status,
    raw = s,
    sequence = whole(payload.SequenceNumber),
    duration = whole(payload.CallDuration),
    providerCallId = call_sid(payload.CallSid),
    reason = reason,
  }
end

function P:registerRoutes() end

function P:endCall(_, attempt)
  local sid = attempt and attempt.providerCallId
  if not sid then
    return nil, "no Twilio call to hang up"
  elseif not call_sid(sid) then
    return nil, "not a Twilio call sid: not hung up"
  end
  local o = request(self, 10000)
  o.method = "POST"
  local cancel = attempt.status ~= "in_progress"
  o.body = "Status=" .. (cancel and "canceled" or "completed")
  o.headers = { ["Content-Type"] = "application/x-www-form-urlencoded" }
  local res, err = fetch(calls_url(self, sid), o)
  if not res or res.status >= 300 then
    local e = rest_error(res, err)
    -- DEBUG: the engine's line (rate-limited: an outage refuses one for
    -- every live call) is the warning, with this error in it.
    log.debug("twilio hang-up failed", { sid = sid, error = e })
    return nil, e
  end
  -- A cancel leaves an answered call up (Twilio answers with the call, its
  -- status in-progress): the engine is told (its answered callback may not
  -- have come, nor ever come: the tunnel died).
  local body = cancel and json.try_decode(res.body)
  if type(body) == "table" and body.status == "in-progress" then
    return true, nil, { answered = true }
  end
  return true
end

function P:getCall(sid)
  if not call_sid(sid) then
    return nil, "not a Twilio call sid"
  end
  local o = request(self, 10000)
  local res, err = fetch(calls_url(self, sid), o)
  if not res or res.status ~= 200 then
    return nil, rest_error(res, err)
  end
  local body = json.try_decode(res.body)
  if type(body) ~= "table" then
    return nil, "twilio answered something that is not JSON"
  end
  -- queued: Twilio has not placed the call yet (it waits in the account's
  -- calls-per-second queue, or is being set up): nothing rang.
  return { status = STATUS[body.status], raw = body.status, duration = tonumber(body.duration),
    queued = body.status == "queued" }
end

return P
