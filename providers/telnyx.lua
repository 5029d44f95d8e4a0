--- providers/telnyx.lua: Telnyx Call Control (API v2) with Media Streaming.
--
-- Config (section "telnyx", passed through with ${NAME} replaced, checked in
-- init): apiKey* (Bearer key; registered with log.secret), connectionId (the
-- Call Control application / Voice API connection), fromNumber (E.164),
-- publicKey (the account's Ed25519 public key, base64; required while
-- validateSignature), apiBaseUrl ["https://api.telnyx.com"],
-- validateSignature [true], requestTimeoutSec [15]; server.publicBaseUrl (or
-- a tunnel).
--
-- The flow:
--   1. Dial: POST {apiBaseUrl}/v2/calls (JSON, Bearer) with connection_id, to,
--      from, webhook_url = <public>/telnyx/webhook?callId=&attempt=,
--      webhook_url_method POST, client_state = base64("<callId> <attempt>"),
--      timeout_secs (ring time), time_limit_secs (a backstop past the
--      wrap-up). Its answer's data.call_control_id is the
--      attempt's providerCallId.
--   2. Every Call Control webhook of that call comes to POST /telnyx/webhook
--      (registerRoutes), signed with Ed25519. Its call and attempt: the
--      echoed client_state (inside the signed body); one where it and the
--      URL's query disagree, with another client_state than ours, or with
--      ours naming a call this callagent has no record of (another
--      callagent's on the account, come by the connection's failover URL),
--      is answered 200 and ignored; one with none (or "") counts for the query's
--      attempt only if its call_control_id is that attempt's (the query
--      alone counts only while signatures are not checked).
--      call.initiated -> dialing, call.answered -> in_progress, call.hangup ->
--      by hangup_cause (of a call answered here: completed, whatever the
--      cause).
--   3. On call.answered: a one-time stream token (engine:prepare_stream), and
--      POST /v2/calls/{id}/actions/streaming_start with stream_url =
--      wss://<public>/voice/stream, stream_track inbound_track, stream_codec
--      PCMU, stream_bidirectional_mode rtp, stream_bidirectional_codec PCMU and
--      custom_parameters callId, attempt, token. The token is not in the URL
--      (URLs are what proxies and Telnyx's own call logs keep); it is single
--      use and expires in 120 s either way. Streaming starts only once the
--      call is answered: no token exists for a call nobody picked up.
--   4. Telnyx opens WS /voice/stream: `connected`, then `start`, read by
--      streamStart (stream_id, start.custom_parameters). The audio path is
--      the same C bridge as Twilio's (see README, "Telnyx"). A
--      streaming.failed or streaming.stopped webhook of the attempt's call
--      while it is in progress hangs the call up at once (_stream_over):
--      Telnyx keeps a call whose stream ended. No stream came yet: failed
--      (no_stream), lastError "telnyx media stream failed: <failure_reason>";
--      streaming already: as a Twilio stream close ends (callee_hung_up).
--      A stream that closes here with no webhook at all is hung up too:
--      streamEndsCall = false tells the engine to.
--   5. Hang up: POST /v2/calls/{id}/actions/hangup. getCall: GET /v2/calls/{id}
--      (is_alive only: Telnyx's call status does not say how a call ended).
--
-- Wire facts and where they come from (checked 2026-11):
--   - Dial body fields connection_id, to, from, stream_url, stream_track;
--     POST /v2/calls with Bearer: developers.telnyx.com/docs/voice/
--     programmable-voice/media-streaming ("Requesting streaming using Dial
--     Command").
--   - streaming_start: POST /calls/{call_control_id}/actions/streaming_start
--     (developers.telnyx.com/api-reference/call-commands/streaming-start);
--     its params stream_url, stream_track, stream_codec (PCMU | PCMA | G722 |
--     OPUS | AMR-WB | L16 | default; default: the call's codec, and also
--     when Telnyx cannot transcode, which it does only between PCMU and
--     PCMA), custom_parameters (a list of
--     {name, value}), stream_auth_token, stream_bidirectional_mode (mp3 |
--     rtp), stream_bidirectional_codec (PCMU | PCMA | G722): the SDK's
--     ActionStartStreamingParams (rubydoc.info/gems/telnyx/Telnyx/Models/
--     Calls/ActionStartStreamingParams) and the TeXML streams reference
--     (developers.telnyx.com/api/call-scripting-twexit/start-te-xml-call-streaming).
--   - WebSocket: `connected` then `start`; `media` with base64 RTP payloads;
--     to Telnyx `media`, `mark`, `clear`; from Telnyx `dtmf`, `mark`, `error`,
--     `stop`; bidirectional only with stream_bidirectional_mode rtp, chunks
--     of 20 ms to 30 s; frame order not guaranteed (sequence_number, chunk,
--     timestamp): developers.telnyx.com/api-reference/websockets/
--     stream-call-media-over-websocket. `start` carries sequence_number and
--     stream_id, and start.call_control_id, start.media_format and
--     start.custom_parameters, an object of name -> value (the same page's
--     Start Frame example, checked 2026-11; a list of {name, value} is read
--     too). The same page: a mark comes back when the media before it has
--     played (at once when nothing is queued), and `clear` returns the
--     queued marks.
--   - Webhook signature: Ed25519 over "<telnyx-timestamp>|<raw body>",
--     headers telnyx-timestamp (Unix seconds) and telnyx-signature-ed25519
--     (base64, 64 bytes), the account's base64 public key, a replay window:
--     developers.telnyx.com/docs/development/api-fundamentals/webhooks and
--     developers.telnyx.com/docs/development/sdk/python/webhooks;
--     team-telnyx/telnyx-python PR 242; the headers and "timestamp|payload"
--     also in developers.telnyx.com/api-reference/callbacks/call-hangup.
--     Window here: 300 s either way. Only the body is signed, not the
--     webhook URL: the attempt is named by client_state, which Telnyx
--     echoes in every later webhook of the call (the dial's and commands'
--     client_state, base64; the payload's client_state in the callback
--     references and developers.telnyx.com/docs/voice/programmable-voice/
--     receiving-webhooks), and a status whose call_control_id is not the
--     attempt's is ignored (engine). That page also says webhooks may come
--     out of order, twice, or at once, that a command_id repeated within
--     60 s is ignored, and that a webhook its URL does not take (no 200) goes
--     to the application's failover URL (developers.telnyx.com/docs/voice/
--     programmable-voice/voice-api-webhooks: failover_url is a setting of the
--     connection), which may be ours for another callagent's calls.
--   - streaming.failed payload: call_control_id, client_state,
--     failure_reason (a short text, "connection_failed" in the example),
--     stream_id, stream_params {stream_url, stream_track}, stream_type
--     (websocket | dialogflow): developers.telnyx.com/api-reference/
--     callbacks/streaming-failed (and .../callbacks/call-streaming-failed),
--     team-telnyx/telnyx-java docs/CallStreamingFailedPayload.md.
--     streaming.stopped payload: call_control_id, client_state, stream_url
--     (developers.telnyx.com/api-reference/callbacks/streaming-stopped);
--     it is the expected webhook of streaming_stop
--     (developers.telnyx.com/api-reference/call-commands/streaming-stop).
--     failure_reason is logged and stored only as printable ASCII of at most
--     120 bytes, scrubbed; stream_params is not read.
--   - Webhook envelope {data: {record_type, event_type, id, occurred_at,
--     payload: {call_control_id, ...}}}: the call.hangup callback reference
--     (developers.telnyx.com/api-reference/callbacks/call-hangup), which also
--     says anything but HTTP 200 makes Telnyx deliver again (to the failover
--     URL).
--   - call.hangup payload: hangup_cause one of call_rejected,
--     normal_clearing, originator_cancel, timeout, time_limit, user_busy,
--     not_found, no_answer, unspecified; hangup_source callee | caller |
--     unknown; sip_hangup_cause the SIP code ("unspecified" when there is
--     none): the SDK's model (rubydoc.info/gems/telnyx/Telnyx/Models/
--     CallHangup/Payload) and team-telnyx/telnyx-java docs/CallHangupPayload.md.
--   - Dial timeout_secs (5..120, default 30; at the end hangup_cause
--     timeout) and time_limit_secs (at most and by default 14400, counted
--     from the answer; hangup_cause time_limit): team-telnyx/telnyx-java
--     docs/CallRequest.md and the v1 dial reference (developers.telnyx.com/
--     api/v1/mission-control/call-control-dial). call.ringTimeoutSec is
--     clamped to 5..120 here: Telnyx refuses the dial otherwise.
--   - Hang-up: POST /calls/{call_control_id}/actions/hangup, body optional
--     (client_state, command_id), expected webhook call.hangup:
--     developers.telnyx.com/api-reference/call-commands/hangup-call.
--   - Call status: GET /calls/{call_control_id} -> data.is_alive,
--     call_duration; available 10 minutes after the end:
--     developers.telnyx.com/api-reference/call-information/retrieve-a-call-status.
--   - Errors: {"errors":[{code, title, detail, source, meta}]} (same page).
--   - call_control_id shape "v3:" + base64url-ish text (examples on those
--     pages): accepted here only as [A-Za-z0-9:_-], at most 256 bytes.
--   ASSUMED (not found in the docs read, 2026-11): that hangup on a ringing
--   outbound call cancels it (the docs say only "hang up the call"); the
--   answer for a call that has already ended (422 with code 90018 here; any
--   other answer is logged as a failed hang-up); that the webhook_url's query
--   is kept (only a cross-check of client_state); that Telnyx ignores
--   the extra "streamSid" key the bridge writes
--   in each media / mark / clear message (the docs show only event and
--   media.payload / mark.name); that a call stays up after its stream
--   failed or stopped (the pages say what the webhooks carry, not what
--   becomes of the call).
local fetch = require "callagent.fetch"
local json = require "callagent.json"
local crypto = require "callagent.crypto"
local log = require "callagent.log"
local task = require "callagent.task"
local timer = require "callagent.timer"
local url = require "callagent.url"
local config = require "callagent.config"

local P = {
  name = "telnyx",
  needs = { "telnyx.apiKey", "telnyx.connectionId", "telnyx.fromNumber" },
  needs_public_url = true,
  -- The call outlives its media stream (Telnyx): the engine hangs up a call
  -- whose stream closed while the attempt was up.
  streamEndsCall = false,
  -- One hang-up for a ringing call and an answered one: a cancel Telnyx
  -- takes after the callee answered ends the call (the engine's ring
  -- timeout says so in the record).
  cancelEndsAnswered = true,
}

local DEFAULT_BASE = "https://api.telnyx.com"
-- Dial answers that end the call failed at once, not retried (startCall).
local REFUSED_FOR_GOOD = { [400] = true, [401] = true, [403] = true, [404] = true, [422] = true }
local WINDOW_S = 300 -- a webhook signed longer ago (or ahead) than this is refused
local SEEN_MAX = 20000 -- webhook ids per generation remembered against replays (_replayed)

local function cfg_error(key, what)
  error("telnyx." .. key .. ": " .. what, 0)
end

-- The section as given, checked; the normalized copy is the provider's own.
local function check_config(c)
  if type(c) ~= "table" then
    error('telnyx: expected an object (the "telnyx" section)', 0)
  end
  local out = {}
  local key = c.apiKey
  if type(key) ~= "string" or #key < 8 or key:find("[%s%c]") then
    cfg_error("apiKey", "expected a secret of at least 8 characters without spaces or control characters, got [redacted]")
  end
  -- Nor a byte past ASCII (an é, a no-break space pasted with it): no header
  -- carries it as Telnyx reads it, so every request would be a silent 401.
  local at = key:find("[\128-\255]")
  if at then
    cfg_error("apiKey", string.format("expected a secret of printable ASCII (byte %d is not), got [redacted]", at))
  end
  out.apiKey = key
  log.secret(key) -- from now on "[redacted]" in every log line and stored error
  if type(c.connectionId) ~= "string" or c.connectionId == "" or #c.connectionId > 128
    or c.connectionId:find("[%s%c]") then
    cfg_error("connectionId", "expected the Call Control connection's id (1 to 128 characters, no spaces)")
  end
  out.connectionId = c.connectionId
  if not config.is_e164(c.fromNumber) then
    cfg_error("fromNumber", "expected an E.164 number like +15551234567")
  end
  out.fromNumber = c.fromNumber
  local v = c.validateSignature
  if v == nil or v == json.null then
    v = true
  elseif type(v) ~= "boolean" then
    cfg_error("validateSignature", "expected true or false")
  end
  out.validateSignature = v
  if c.publicKey ~= nil and c.publicKey ~= json.null then
    local raw = type(c.publicKey) == "string" and crypto.base64_decode(c.publicKey)
    if not raw or #raw ~= 32 then
      cfg_error("publicKey", "expected the account's Ed25519 public key in base64 (32 bytes; Mission Control: "
        .. "Keys & Credentials, Public Key)")
    end
    out.publicKey = raw
  elseif v then
    cfg_error("publicKey", "required while telnyx.validateSignature is true (the account's Ed25519 public key, base64)")
  end
  local base = c.apiBaseUrl
  if base == nil or base == json.null then
    base = DEFAULT_BASE
  end
  local u = type(base) == "string" and url.parse(base)
  if not u or (u.scheme ~= "https" and u.scheme ~= "http") or base:find("[?#%s]") then
    cfg_error("apiBaseUrl", "expected an http(s) URL without query or fragment")
  end
  out.apiBaseUrl = base:gsub("/+$", "")
  local t = c.requestTimeoutSec
  if t == nil or t == json.null then
    t = 15
  end
  if type(t) ~= "number" or t ~= math.floor(t) or t < 1 or t > 120 then
    cfg_error("requestTimeoutSec", "expected a whole number of seconds from 1 to 120")
  end
  out.requestTimeoutSec = math.tointeger(t)
  -- A key of no meaning here (a typo: validatesignature) is said, by name,
  -- as config.lua says of its own sections' keys.
  local unknown = {}
  for k in pairs(c) do
    if out[k] == nil and k ~= "publicKey" then
      unknown[#unknown + 1] = tostring(k)
    end
  end
  table.sort(unknown)
  for _, k in ipairs(unknown) do
    log.warn("config: telnyx." .. k .. ": unknown key, ignored")
  end
  return out
end

function P:init(ctx)
  self.cfg = ctx.config
  self.engine = ctx.engine
  self.app = ctx.app
  self.tx = check_config(ctx.config.telnyx)
  local ring = ctx.config.call.ringTimeoutSec
  if ring < 5 or ring > 120 then
    log.warn("telnyx rings a call 5 to 120 s: call.ringTimeoutSec is taken as " .. math.max(5, math.min(120, ring)),
      { ringTimeoutSec = ring })
  end
  self.seen, self.seen_old = {}, {} -- webhook ids, against replays (_replayed)
  self.nseen, self.seen_since = 0, timer.now()
end

--- A call_control_id that may go into a REST path: Telnyx's are "v3:" and
-- base64url-like text. Anything else (a "/", "?", "%", ".", a space, too
-- long), wherever it came from, never does.
local function control_id(v)
  return type(v) == "string" and #v >= 1 and #v <= 256 and v:find("^[%w][%w:_%-]*$") and v or nil
end
P.control_id = control_id
P.SEEN_MAX = SEEN_MAX

-- Request options: Bearer key, JSON, and the timeout (a hang-up, a
-- streaming_start or a status lookup waits at most 10 s).
local function request(self, method, body, max_ms)
  local ms = self.tx.requestTimeoutSec * 1000
  return {
    method = method,
    body = body and json.encode(body) or nil,
    headers = {
      Authorization = "Bearer " .. self.tx.apiKey,
      ["Content-Type"] = body and "application/json" or nil,
      Accept = "application/json",
    },
    timeout = max_ms and math.min(ms, max_ms) or ms,
  }
end

-- A Telnyx REST error as one line: "telnyx 10009: Authentication failed -
-- <detail> (HTTP 401)". Whatever Telnyx quotes, our key does not appear, nor
-- hide (a secret of this request that is no registered one: the one-time
-- stream token, which a refused streaming_start leaves valid for its call).
local function rest_error(res, err, hide)
  local msg
  if not res then
    msg = "telnyx request failed: " .. tostring(err)
  else
    local body = json.try_decode(res.body)
    local e = type(body) == "table" and type(body.errors) == "table" and body.errors[1]
    if type(e) == "table" and (type(e.title) == "string" or type(e.detail) == "string") then
      local code = (type(e.code) == "string" and e.code:find("^[%w_.-]+$") and #e.code <= 16 and e.code)
        or (math.type(e.code) == "integer" and tostring(e.code)) or "error"
      local text = type(e.title) == "string" and e.title or ""
      if type(e.detail) == "string" and e.detail ~= "" and e.detail ~= text then
        text = text ~= "" and (text .. " - " .. e.detail) or e.detail
      end
      -- Scrubbed before the cut: a key across it would keep its first bytes.
      if hide then
        text = text:gsub(hide:gsub("%p", "%%%0"), "[redacted]")
      end
      msg = string.format("telnyx %s: %s (HTTP %d)", code, log.scrub(text):sub(1, 300), res.status)
    else
      msg = string.format("telnyx answered HTTP %d", res.status)
    end
  end
  return log.scrub(msg)
end

local function first_error_code(res)
  local body = res and json.try_decode(res.body)
  local e = type(body) == "table" and type(body.errors) == "table" and body.errors[1]
  return type(e) == "table" and tostring(e.code) or nil
end

local function calls_url(self, id, action)
  local u = self.tx.apiBaseUrl .. "/v2/calls"
  if id then
    u = u .. "/" .. id
  end
  if action then
    u = u .. "/actions/" .. action
  end
  return u
end

function P:startCall(call, publicBaseUrl)
  local c = self.cfg.call
  local body = {
    connection_id = self.tx.connectionId,
    to = call.to,
    from = self.tx.fromNumber,
    webhook_url = publicBaseUrl .. "/telnyx/webhook?callId=" .. call.callId .. "&attempt=" .. call.attempt,
    -- Echoed in every webhook of the call, inside the signed body (the URL's
    -- query is not signed): what names the call and attempt.
    client_state = crypto.base64_encode(call.callId .. " " .. call.attempt),
    webhook_url_method = "POST",
    -- Telnyx takes 5..120 s (and refuses the dial otherwise): the engine's own
    -- ring timeout still applies past 120 s.
    timeout_secs = math.max(5, math.min(120, c.ringTimeoutSec)),
    -- A backstop only: the wrap-up at maxDurationSec and the goodbye after
    -- the report come first.
    time_limit_secs = math.min(14400, c.maxDurationSec + c.wrapUpSec + c.goodbyeTimeoutSec + 60),
  }
  local res, err = fetch(calls_url(self), request(self, "POST", body))
  if not res or res.status < 200 or res.status >= 300 then
    -- Refused for good: the request (400, 422: the number, a parameter), the
    -- key (401) or what it may do (403, 404): a retry would be refused alike.
    return nil, rest_error(res, err), { permanent = res ~= nil and REFUSED_FOR_GOOD[res.status] == true }
  end
  local b = json.try_decode(res.body)
  local data = type(b) == "table" and type(b.data) == "table" and b.data
  local id = data and control_id(data.call_control_id)
  if not id then
    return nil, "telnyx answered without a usable call_control_id"
  end
  return { providerCallId = id }
end

-- Telnyx asks for no voice document: streaming starts by command (above).
-- /voice is never Telnyx's, and answers "nothing here".
function P:buildVoiceResponse()
  return "", "text/plain"
end

-- Webhook signatures -----------------------------------------------------------

--- Whether sig (base64) is the Ed25519 signature by public key pk (32 raw
-- bytes) of "<timestamp>|<body>", and the timestamp within WINDOW_S of now_s;
-- if not, why and the header at fault.
function P.check_signature(pk, timestamp, body, sig, now_s)
  if type(timestamp) ~= "string" or not timestamp:find("^%d+$") or #timestamp > 12 then
    return false, "telnyx-timestamp missing or not a Unix time", "telnyx-timestamp"
  end
  if math.abs((now_s or os.time()) - tonumber(timestamp)) > WINDOW_S then
    return false, "telnyx-timestamp is more than 5 minutes away from now (a replay, or a clock off)",
      "telnyx-timestamp"
  end
  local raw = type(sig) == "string" and crypto.base64_decode(sig)
  if not raw or #raw ~= 64 then
    return false, "telnyx-signature-ed25519 missing or not 64 bytes of base64", "telnyx-signature-ed25519"
  end
  if not crypto.ed25519_verify(pk, timestamp .. "|" .. (body or ""), raw) then
    return false, "telnyx-signature-ed25519 does not match", "telnyx-signature-ed25519"
  end
  return true
end

function P:validateRequest(req)
  -- Telnyx does not sign the media stream's upgrade: the stream proves
  -- itself with the one-time token in its `start` (engine:claim_stream).
  if req.upgrade then
    return true
  end
  -- Telnyx posts to /telnyx/webhook only. Its signature covers the body,
  -- not the URL: on /voice or /status (no client_state check, no replay
  -- check) any body Telnyx signed in the last 5 minutes would act on the
  -- call the query names (answer a ringing call, start its model).
  if req.path ~= "/telnyx/webhook" then
    return false, "Telnyx sends no webhook to " .. (type(req.path) == "string" and req.path:sub(1, 40) or "?")
  end
  if not self.tx.validateSignature then
    return true
  end
  return P.check_signature(self.tx.publicKey, req.headers["telnyx-timestamp"], req.body,
    req.headers["telnyx-signature-ed25519"])
end

-- Statuses ------------------------------------------------------------------------

-- hangup_cause -> status and reason (the documented values: see the header;
-- not_found, unspecified and any other -> failed).
local HANGUP = {
  normal_clearing = { "completed" },
  time_limit = { "completed", "time limit reached" },
  user_busy = { "busy", "line busy" },
  call_rejected = { "busy", "call rejected" },
  timeout = { "no_answer", "no answer" },
  no_answer = { "no_answer", "no answer" },
  originator_cancel = { "canceled", "canceled" },
}

local function safe_word(s)
  return type(s) == "string" and #s <= 40 and s:find("^[%w_.%-]+$") and s or nil
end

--- A webhook's decoded JSON -> {status, providerCallId, reason, raw}, or
-- nil, why, field for anything that is no status of a call.
function P:mapStatus(body)
  local data = type(body) == "table" and body.data
  if type(data) ~= "table" then
    return nil, "not a Telnyx webhook (no data object)", "data"
  end
  local ev = data.event_type
  local p = type(data.payload) == "table" and data.payload or {}
  local st
  if ev == "call.initiated" then
    st = { status = "dialing" }
  elseif ev == "call.answered" then
    st = { status = "in_progress" }
  elseif ev == "call.hangup" then
    local cause = p.hangup_cause
    local m = HANGUP[cause]
    if m then
      st = { status = m[1], reason = m[2] }
    else
      -- not_found, unspecified, a cause not known here: the call failed.
      local sip = math.tointeger(tonumber(p.sip_hangup_cause))
      st = { status = "failed", reason = "call failed" .. (safe_word(cause) and (": " .. cause) or "")
        .. ((sip and sip >= 100 and sip < 700) and (" (SIP " .. sip .. ")") or "") }
    end
  elseif type(ev) ~= "string" then
    return nil, "event_type is missing or not a string", "data.event_type"
  else
    return nil, "not a call status event" .. (safe_word(ev) and (": " .. ev) or ""), "data.event_type"
  end
  st.providerCallId = control_id(p.call_control_id)
  st.raw = ev == "call.hangup" and ("call.hangup/" .. (safe_word(p.hangup_cause) or "?")) or ev
  return st
end

-- Media streaming ------------------------------------------------------------------

--- The stream's `start`: stream_id, the custom_parameters we gave in
-- streaming_start (an object, or a list of {name, value}), and its
-- call_control_id.
function P:streamStart(ev)
  local start = type(ev.start) == "table" and ev.start or {}
  -- The bridge hears mu-law only: a stream in another codec (a call Telnyx
  -- cannot transcode to the stream_codec asked for) would be noise to the
  -- model. Refused (1008); no media_format at all is taken as PCMU.
  local enc = type(start.media_format) == "table" and start.media_format.encoding
  if enc and enc ~= json.null and not (type(enc) == "string" and enc:upper() == "PCMU") then
    return nil, "media_format encoding " .. (safe_word(enc) or "?") .. ", not PCMU"
  end
  local cp = start.custom_parameters
  local params = {}
  if type(cp) == "table" then
    if cp[1] ~= nil then
      for _, kv in ipairs(cp) do
        if type(kv) == "table" and type(kv.name) == "string" and type(kv.value) == "string" then
          params[kv.name] = kv.value
        end
      end
    else
      for k, v in pairs(cp) do
        if type(k) == "string" and type(v) == "string" then
          params[k] = v
        end
      end
    end
  end
  -- The call it streams: the engine refuses a stream of another call than
  -- the attempt's (engine:claim_stream). Telnyx's start carries it (the
  -- Start Frame example); one without it is refused.
  local cc = control_id(start.call_control_id)
  if not cc then
    return nil, "start without a call_control_id"
  end
  return { streamSid = ev.stream_id or start.stream_id, parameters = params, providerCallId = cc }
end

-- Answered: the stream token, then streaming_start. A call nobody will speak
-- in (hung up meanwhile, the app stopping) is hung up instead.
function P:_start_stream(call_id, n, id)
  local token, terr = self.engine:prepare_stream(call_id, n)
  if not token then
    log.warn("telnyx call answered for a call that is not dialing: hung up", { call = call_id, attempt = n,
      reason = terr })
    return self:_hangup(id)
  end
  local body = {
    stream_url = self.app:public_url():gsub("^http", "ws") .. "/voice/stream",
    stream_track = "inbound_track",
    -- The stream's audio is the call's codec by default (PCMA on many
    -- calls outside North America): the bridge hears mu-law only.
    stream_codec = "PCMU",
    stream_bidirectional_mode = "rtp",
    stream_bidirectional_codec = "PCMU",
    custom_parameters = {
      { name = "callId", value = call_id },
      { name = "attempt", value = tostring(n) },
      { name = "token", value = token },
    },
  }
  local res, e = self:_command(id, "streaming_start", body, nil, token)
  if not res then
    -- No stream comes: the engine hangs the answered call up after 15 s (no_stream).
    log.warn("telnyx streaming_start failed", { call = call_id, attempt = n, error = e })
  end
end

-- Telnyx's failure_reason ("connection_failed" in the callback reference):
-- printable ASCII, at most 120 bytes, scrubbed of our secrets; else nil.
local function failure_text(s)
  if type(s) ~= "string" then
    return nil
  end
  -- Scrubbed before the cut: a secret across it would keep its first bytes.
  s = log.scrub(s):sub(1, 120)
  return s:find("^[\32-\126]+$") and s or nil
end

-- streaming.failed or streaming.stopped for attempt n: its media stream is
-- over at Telnyx, which keeps the call up when its stream ends (nothing
-- follows the stream there, unlike Twilio's <Connect><Stream>). The engine
-- hangs it up now (engine:stream_over) rather than leaving the callee in
-- silence until the 15 s no_stream timer (or time_limit_secs): a stream
-- that never came here ends failed (no_stream), lastError naming Telnyx's
-- failure_reason; one that was streaming ends as a Twilio stream close
-- does. Only the attempt's own call while it is in progress is acted on.
function P:_stream_over(call_id, n, event, payload)
  local p = type(payload) == "table" and payload or {}
  local failed = event == "streaming.failed"
  local fields = { call = call_id, attempt = n, event = event }
  local why
  if failed then
    fields.failure_reason = failure_text(p.failure_reason) or "(none given)"
    why = "telnyx media stream failed: " .. fields.failure_reason
  end
  local acted, reason = self.engine:stream_over(call_id, n, control_id(p.call_control_id), why)
  if acted then
    log.warn("telnyx media stream " .. (failed and "failed" or "stopped") .. " with the call up: hanging up", fields)
  else
    fields.reason = reason
    log.debug("telnyx stream event ignored", fields)
  end
end

-- Replays: a webhook id seen in the signature window is answered and dropped.
-- Two generations of ids, each SEEN_MAX at most, the older dropped whole when
-- the newer is 2 windows old or full: an id is remembered for 10 minutes
-- (a signature is good 5 minutes either way), or, in a flood of more than
-- SEEN_MAX webhooks in that time, for at least the last SEEN_MAX ids. O(1)
-- per webhook; no scan. _seen only looks: the route asks it first, so that
-- a replay costs nothing more (no store read, no warning, whatever URL it
-- is posted to), and takes an id with _replayed once the webhook is
-- known to be for one of our calls. The ids die with the process: a replay
-- of the last run's webhooks after a restart is taken, and changes nothing
-- (the engine ignores statuses of attempts that are over, and the restart
-- ends every attempt of the last run; tests/test_call_telnyx.lua "after a
-- restart, ...").
function P:_seen(id)
  return type(id) == "string" and (self.seen[id] or self.seen_old[id]) == true
end

function P:_replayed(id)
  if type(id) ~= "string" or id == "" then
    return false
  end
  local now = timer.now()
  if self:_seen(id) then
    return true
  end
  if self.nseen >= SEEN_MAX or now - self.seen_since >= 2 * WINDOW_S * 1000 then
    self.seen_old, self.seen, self.nseen, self.seen_since = self.seen, {}, 0, now
  end
  self.seen[id] = true
  self.nseen = self.nseen + 1
  return false
end

-- The call and attempt a webhook is for: the signed client_state the dial
-- set ("<callId> <attempt>", base64). One whose client_state and query
-- disagree is no one's; so is a signed one without our client_state (an
-- inbound call's, another app's of the account: the query is not signed,
-- and would have it act on any call, hang up its call_control_id). The
-- query alone names the call only while signatures are not checked.
local function attempt_number(s)
  return type(s) == "string" and s:find("^%d+$") and #s <= 9 and math.tointeger(tonumber(s)) or nil
end

-- A third value true: the attempt is the query's, taken only if the signed
-- call_control_id is the attempt's own (the route checks it): a signed
-- webhook with no client_state at all, should Telnyx leave it out of an
-- event (its docs show it in every one we use, but do not promise it).
-- An empty client_state is none too: it names no call either.
local function webhook_attempt(q, payload, signed)
  local qid, qn = q.callId, attempt_number(q.attempt)
  if type(qid) ~= "string" then
    qid = nil
  end
  local raw_cs = type(payload) == "table" and payload.client_state
  local cs = type(raw_cs) == "string" and #raw_cs <= 400 and crypto.base64_decode(raw_cs)
  local cid, cn = nil, nil
  if cs then
    local a, b = cs:match("^(%S+) (%d+)$")
    cid, cn = a, attempt_number(b)
  end
  if cid and cn then
    if (qid and qid ~= cid) or (q.attempt ~= nil and qn ~= cn) then
      return nil, "its client_state names another call or attempt than its URL"
    end
    return cid, cn
  end
  if signed then
    if (raw_cs == nil or raw_cs == json.null or raw_cs == "") and qid and qn then
      return qid, qn, true
    end
    return nil, "no client_state of a call callagent placed"
  end
  if qid and qn then
    return qid, qn
  end
  return nil
end

function P:registerRoutes(srv)
  srv:post("/telnyx/webhook", function(req)
    local ok, why, field = self:validateRequest(req)
    if not ok then
      log.limited("warn", "telnyx webhook refused", { reason = why, remote = req.remote })
      return 403, { error = { code = "forbidden", message = "invalid signature", field = field } }
    end
    local body = req:json_object()
    local data = type(body) == "table" and body.data
    if type(data) ~= "table" then
      log.limited("warn", "telnyx webhook not understood", { reason = "no data object", remote = req.remote })
      return 400, { error = { code = "bad_status", message = "the body must be a Telnyx webhook (a data object)" } }
    end
    if self:_seen(data.id) then
      return 200, { ok = true }
    end
    local call_id, n, by_id = webhook_attempt(req.query or {}, data.payload, self.tx.validateSignature)
    if by_id then
      -- No client_state: the URL's call only if the signed call_control_id
      -- is that attempt's (known from the dial's answer; the store's once
      -- the call is over, so that a late call.answered is hung up as one
      -- with client_state is).
      local pid = self.engine:provider_call_id(call_id, n)
      local p = type(data.payload) == "table" and data.payload or {}
      if not pid or control_id(p.call_control_id) ~= pid then
        call_id, n = nil, "no client_state, and its call_control_id is not the attempt's"
      end
    end
    if not call_id then
      if n then -- signed, but not this URL's: answered, so that Telnyx does not send it again
        log.limited("warn", "telnyx webhook ignored", { reason = n, remote = req.remote })
        return 200, { ok = true }
      end
      log.limited("warn", "telnyx webhook with a bad query", { remote = req.remote })
      return 400, { error = { code = "bad_request", message = "callId and attempt must be given once in the query" } }
    end
    if not by_id and self.engine:has_call(call_id) == false then
      -- callagent's client_state, but of a call this one never had: another
      -- callagent's on the account, whose webhooks Telnyx sends to the
      -- connection's failover URL when its own webhook_url fails. Its call
      -- is not ours to hang up (a stray of ours is a call the store has:
      -- engine _end_stray).
      -- As many as the other callagent's calls have, each delivery again
      -- (it is taken as seen only below): rate-limited.
      log.limited("warn", "telnyx webhook for a call callagent has no record of: ignored (another callagent's?)",
        { call = call_id, attempt = n, event = safe_word(data.event_type) })
      return 200, { ok = true }
    end
    if self:_replayed(data.id) then
      return 200, { ok = true }
    end
    if data.event_type == "streaming.failed" or data.event_type == "streaming.stopped" then
      self:_stream_over(call_id, n, data.event_type, data.payload)
      return 200, { ok = true }
    end
    local st, serr = self:mapStatus(body)
    if not st then
      -- streaming.started, call.machine.*, ...: nothing to do here.
      log.debug("telnyx webhook ignored", { call = call_id, reason = serr })
      return 200, { ok = true }
    end
    if data.event_type == "call.hangup" and st.status ~= "completed" and st.providerCallId and self.engine.answered
        and self.engine:answered(call_id, n, st.providerCallId) then
      -- hangup_cause says how the network ended the call, answered or not:
      -- one answered here (its call.answered came) that Telnyx ends with
      -- unspecified (hangup_source unknown: a carrier that dropped it) ends
      -- as any answered call the callee's side ended, completed, its
      -- report kept; the cause stays in the event's raw.
      st = { status = "completed", providerCallId = st.providerCallId, raw = st.raw }
    end
    local taken, why = self.engine:provider_status(call_id, n, st)
    if data.event_type == "call.answered" and st.providerCallId then
      if taken then
        task.spawn(self._start_stream, self, call_id, n, st.providerCallId)
      elseif why == "attempt already ended" or why == "unknown or finished call" then
        -- Answered for an attempt that is over here (hung up while it rang,
        -- or a late delivery): nobody will talk, it is hung up. A second
        -- call.answered of a call in progress (another delivery, another
        -- id) changes nothing: its stream was asked for once; nor does one
        -- naming another call than the attempt's.
        task.spawn(self._hangup, self, st.providerCallId)
      end
    end
    return 200, { ok = true }
  end)
end

-- A command Telnyx could not take (no answer, 429, 5xx) is sent again, 0.5
-- and 1 s later: an answered call waits for its stream, and a call outlives
-- its media stream - a callee left on a silent line stays there until
-- time_limit_secs. One command_id for all tries: Telnyx ignores a command
-- whose command_id it has already had for the call (developers.telnyx.com/
-- api-reference/call-commands/hangup-call, .../streaming-start). Not again
-- after a slow failure (a 10 s timeout), nor once the app stopped, nor once
-- again_ok() (optional) says no. hide: a secret in body (the stream token)
-- that the error does not quote (rest_error).
-- -> the response | nil, error, "ended" (422 code 90018: the call has ended)
-- | nil, error, "unwanted" (again_ok() said no).
local COMMAND_TRIES = 3

function P:_command(id, action, body, again_ok, hide)
  body.command_id = crypto.uuid4()
  local e
  local t0 = timer.now()
  for try = 1, COMMAND_TRIES do
    local res, err = fetch(calls_url(self, id, action), request(self, "POST", body, 10000))
    if res and res.status >= 200 and res.status < 300 then
      return res
    end
    e = rest_error(res, err, hide)
    if res and res.status == 422 and first_error_code(res) == "90018" then
      return nil, e, "ended"
    end
    local again = try < COMMAND_TRIES and (not res or res.status == 429 or res.status >= 500)
      and timer.now() - t0 < 5000 and not self.closed
    if again then
      -- Rate-limited, of a kind per action and answer: in an outage
      -- every live call's commands fail.
      log.limited("warn", "telnyx " .. action .. " failed: trying again", { id = id, error = e, try = try },
        "telnyx " .. action .. " failed: trying again " .. (res and res.status or "no answer"))
      timer.sleep(500 * 2 ^ (try - 1))
    end
    if not again or self.closed then
      break
    end
    if again_ok and not again_ok() then
      return nil, e, "unwanted"
    end
  end
  return nil, e
end

-- again_ok: as _command's (a cancel's: see endCall).
function P:_hangup(id, again_ok)
  if not control_id(id) then
    return nil, "not a Telnyx call_control_id: not hung up"
  end
  local res, e, why = self:_command(id, "hangup", {}, again_ok)
  if res then
    return true
  elseif why == "ended" then
    -- Over before the hang-up, how Telnyx does not say: the engine ends a
    -- ringing attempt as failed, not as one the hang-up canceled.
    return true, nil, { ended = true }
  elseif why == "unwanted" then
    -- The cancel of a ringing call, refused, and the callee answered
    -- before it was sent again: left up, as Twilio's cancel leaves an
    -- answered call (the engine then takes it as answered).
    log.info("telnyx: the callee answered while a refused cancel waited to be sent again: not sent", { id = id })
    return true, nil, { answered = true }
  end
  -- DEBUG: the engine's line (rate-limited: an outage refuses one for
  -- every live call) is the warning, with this error in it.
  log.debug("telnyx hang-up failed", { id = id, error = e })
  return nil, e
end

-- app:stop(): no command is tried again after it.
function P:close()
  self.closed = true
end

-- Telnyx has one hang-up for a ringing call and an answered one: a cancel
-- (attempt.status "dialing") sent again after a refusal would end a call
-- the callee answered meanwhile, so it asks the engine first (answered).
-- One already on its way when the callee answers cannot be called back:
-- Telnyx ends that call (tests/test_call_grace.lua).
function P:endCall(call, attempt)
  local id = attempt and attempt.providerCallId
  if not id then
    return nil, "no Telnyx call to hang up"
  end
  local e, call_id = self.engine, type(call) == "table" and call.callId
  local again_ok = attempt.status ~= "in_progress" and call_id and e and e.answered and function()
    return not e:answered(call_id, attempt.n, id)
  end or nil
  return self:_hangup(id, again_ok)
end

function P:getCall(id)
  if not control_id(id) then
    return nil, "not a Telnyx call_control_id"
  end
  local res, err = fetch(calls_url(self, id), request(self, "GET", nil, 10000))
  if not res or res.status ~= 200 then
    return nil, rest_error(res, err)
  end
  local b = json.try_decode(res.body)
  local data = type(b) == "table" and type(b.data) == "table" and b.data
  if not data or type(data.is_alive) ~= "boolean" then
    return nil, "telnyx answered no call status"
  end
  if data.is_alive then
    -- Up, ringing or answered (Telnyx does not say which): treated as still
    -- ringing, which ends in a hang-up.
    return { status = "dialing", raw = "alive" }
  end
  return nil, "telnyx says the call has ended, not how"
end

return P
