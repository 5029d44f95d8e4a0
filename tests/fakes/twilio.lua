--- fakes.twilio: Twilio's Calls REST API, call progress and Media Streams,
-- faked on loopback for tests and benchmarks.
--
--   local fake = require "fakes.twilio"
--   local tw = assert(fake.start{
--     account_sid = "AC" .. string.rep("1", 32),
--     auth_token = "tok-secret",
--     public_url_rewrite = nil,  -- fn(url) -> url actually contacted for the
--                                -- webhook, callback and stream URLs (signatures
--                                -- are always over the URL as given)
--     behaviour = "answer",      -- or "busy" | "no-answer" | "failed" |
--                                -- "reject-api" | a table (below) | fn(call)
--                                -- returning one of those, per created call
--     ca_file = nil,             -- extra CA for wss:// stream URLs
--     light = false,             -- true: count stream audio, keep neither the
--                                -- bytes nor per-frame records (benchmarks)
--     max_connections = 4096,
--     update_delay_ms = 0,       -- answer each call update (hang-up, redirect)
--                                -- this late, as a slow API would
--     update_fail = nil,         -- an HTTP status (503, say): every call update
--                                -- (hang-up, redirect) fails with it, unapplied
--     update_fail_times = nil,   -- with update_fail: only the first n updates fail
--     rate_limit = nil,          -- n: the first n call creations are answered
--                                -- 429 {code 20429} (never processed: no call)
--     retry_after = nil,         -- with rate_limit: the Retry-After header's
--                                -- value (a string; nil: no header)
--     create_delay_ms = 0,       -- answer each call creation this late while
--                                -- the call goes ahead: its callbacks and
--                                -- webhooks come before the answer, as they
--                                -- may from Twilio over a slow network
--   })
--   tw.url        "http://127.0.0.1:PORT" (the REST base URL)
--   tw.calls      call records in creation order (API-rejected attempts too)
--   tw:wait_call([timeout_ms]) -> call, or nil, "ETIMEDOUT" (inside a task)
--   tw:close()    stops everything at once (no more callbacks), frees the port
--   fake.sign(auth_token, url, [params]) -> X-Twilio-Signature (params: name ->
--                 value or array of values; nil for a URL-only signature)
--
-- REST (HTTP Basic AccountSid:AuthToken, else 401 {code 20003, "Authenticate"}):
--   POST /2010-04-01/Accounts/{Sid}/Calls.json   form: To, From (E.164), Url or
--       Twiml, Method, StatusCallback, StatusCallbackEvent (repeated),
--       StatusCallbackMethod, Timeout, TimeLimit, MachineDetection, ...
--       400 21201/21211 (To), 21213/21212 (From), 21208 (Timeout not a
--       positive whole number), 21205 (Url); 201 call JSON (status "queued");
--       behaviour "reject-api": 400 21215 (behaviour {answer = "reject-api",
--       reject_message = s, reject_code = n, reject_status = http}: with
--       message s, Twilio code n, HTTP status http).
--   POST .../Calls/{CallSid}.json   Status=completed|canceled hangs up (an
--       answered call: stop event, WS close, then the completed callback; a
--       queued/ringing one ends "canceled"); Url/Twiml are only recorded
--       (call.redirects). 200 call JSON. Option or behaviour ended_update =
--       {status, code, message} (400, 21220, "Call is not in-progress. ...")
--       answers an update of a call already over with that error instead.
--   GET  .../Calls/{CallSid}.json   the call JSON (status: queued, ringing,
--       in-progress, completed, busy, no-answer, failed, canceled; duration).
--   Unknown call or path: 404 {code 20404}.
--
-- Behaviour table (all optional): answer = true | "busy" | "no-answer" |
--   "failed" | "reject-api"; queue_ms (the call waits this long in the
--   account's calls-per-second queue before Twilio places it: REST status
--   queued, the create answer's queue_time the wait left, no callback; a
--   cancel ends it canceled), queue_time_ms (the create answer's queue_time
--   instead: Twilio's is an estimate), initiated_ms (5), ringing_ms (5: initiated ->
--   ringing), ring_ms (50); answered_by (AnsweredBy when MachineDetection is
--   set; "human"); audio (mu-law bytes the callee "says" from the stream start,
--   then silence 0xFF); audio_ms (stop sending media after this many ms;
--   default: until the call ends); hangup_after_ms (the callee hangs up this
--   long after the stream started); callbacks_out_of_order (deliver ringing
--   after in-progress; SequenceNumbers stay truthful); lost_callbacks (a set
--   of events, e.g. {answered = true}, whose callbacks are never delivered;
--   call.lost_callbacks counts them); stream = false (answer
--   and request /voice but do not connect the stream); stream_delay_ms (connect
--   it this long after the TwiML came); json = "shuffled"
--   (media and mark events with their keys in another order than Twilio's,
--   spaces around the colons and extra fields holding escaped quotes and a
--   final backslash: JSON is JSON, whatever the order); payloads (frame
--   number -> text written as that frame's payload string as is, JSON escapes
--   and all: what a broken or hostile sender might put there);
--   create_delay_ms, update_delay_ms, update_fail: as the options above, for
--   this call only (update_delay_ms may be a list: the nth update's delay,
--   the ones past it at once); voice_delay_ms (the voice webhook this long after the
--   answer, as over a slow link); callback_delay_ms (each status callback
--   sent this much later, one after the other); get_delay_ms (GET of the
--   call answered this late; a list: the nth GET's delay, the ones past it
--   at once); update_answer_lost_times (the first n updates
--   are applied but answered 502, as an answer lost on its way);
--   get_fail_times (the first n GETs of the call answered 503); echo_marks =
--   false (marks are recorded in call.marks_sent, never echoed, not even at a
--   clear: a vendor that does not echo them, or a stream stuck).
--
-- Call flow (a task per call): initiated, ringing (not for failed), then
--   busy/no-answer/failed, or answered: in-progress, POST (Method) the Url with
--   the voice webhook params, signed; the TwiML must be
--   <Response><Connect><Stream url><Parameter name value/>...; otherwise the
--   call completes. Then the Media Streams client: a WebSocket to the stream
--   URL (without its query string, which Twilio does not pass on: noted in
--   call.errors) with X-Twilio-Signature (over the URL, no params), `connected`,
--   `start` (customParameters from <Parameter>s), `media` every 20 ms on a
--   drift-free schedule (160 bytes mu-law, sequenceNumber/chunk/timestamp as
--   strings). From the app: `media` is played at 8 bytes/ms from when it
--   arrives (queued behind what still plays), `mark` is echoed when playback
--   reaches it, `clear` drops unplayed audio and echoes pending marks at once.
--   The app closing the stream ends the call (completed), as with Twilio.
--   Status callbacks go to StatusCallback for the StatusCallbackEvent values
--   (only "completed" when none given), one at a time in order, signed, with
--   CallSid, AccountSid, From, To, Called, Caller, CallStatus, Direction,
--   ApiVersion, CallbackSource, SequenceNumber (from 0), Timestamp (RFC 1123),
--   and on the final one CallDuration, Duration and SipResponseCode.
--
-- Call record (fields readable by tests):
--   sid, params (the REST form), behaviour, callback_events (set of the
--   StatusCallbackEvent values in force), status (last CallStatus),
--   statuses ({status, at} history), final (terminal status), answered_at,
--   ended_at, duration (s), end_reason ("api", "callee", "stream_closed",
--   "twiml", "stream_failed", "busy", ...), hangup_requested_at, updates,
--   redirects, callbacks ({event, status, url, params, signature, sequence,
--   at, response_status, error, delivered_at}), voice_request ({url, method,
--   params, signature, at, status, body, content_type, error}), twiml ({verbs,
--   stream = {url, name, track, parameters, parameter_list}} or {error}),
--   stream_url, stream_params, stream_headers, stream_error, stream_sid,
--   stream_started_at, stream_closed ({code, reason, by = "app"|"twilio", at}),
--   ws_sent ({at, event, sequenceNumber} for non-media), media_sent (count),
--   media_sent_at (send times), ws_received ({at, event, msg} - media ones
--   carry bytes instead of msg), received_bytes, received_audio (the bytes),
--   played_bytes (computed now), dropped_bytes, clears ({at, dropped_bytes,
--   pending_marks, received_bytes, played_bytes - the last two totals since
--   the stream started, as of the clear}), marks_sent ({name, at, due}), marks_echoed ({name, at,
--   due, queued_at}), errors (protocol mistakes of the app), done.
--   call:send_dtmf(digit)   a `dtmf` event on the stream
--   call:hangup()           the callee hangs up (before answer: busy)
--   call:wait_status(status, [timeout_ms])   once status was reached
--   call:wait_stream([timeout_ms])           once `start` was sent
--   call:wait_received_audio(bytes, [timeout_ms])
--   call:wait_final([timeout_ms])    once the call is over at Twilio (final)
--   call:wait_closed([timeout_ms])   the call is over: final status, stream
--                                    closed, final callback delivered
--   Each returns a true value, or nil, "ETIMEDOUT" / "ECLOSED" (over, and the
--   condition can no longer hold).
local http = require "callagent.http"
local ws = require "callagent.ws"
local fetch = require "callagent.fetch"
local url = require "callagent.url"
local json = require "callagent.json"
local task = require "callagent.task"
local timer = require "callagent.timer"
local crypto = require "callagent.crypto"
local log = require "callagent.log"

local M = {}

local null = json.null
local encode = json.encode
local decode = require("cjson").decode
local b64enc, b64dec = crypto.base64_encode, crypto.base64_decode
local now = timer.now
local fmt, concat, rep = string.format, table.concat, string.rep
local floor, ceil, max = math.floor, math.ceil, math.max

local API = "/2010-04-01/Accounts/"
local SILENCE_B64 = b64enc(rep("\255", 160))

--- Twilio's request signature: base64(HMAC-SHA1(token, url .. name .. value ...))
-- over the parameter names in ascending order and, per name, its distinct
-- values in ascending order.
function M.sign(token, u, params)
  local parts = { u }
  if params then
    local names = {}
    for k in pairs(params) do
      names[#names + 1] = tostring(k)
    end
    table.sort(names)
    for _, k in ipairs(names) do
      local v = params[k]
      if type(v) == "table" then
        local seen, vals = {}, {}
        for _, x in ipairs(v) do
          x = tostring(x)
          if not seen[x] then
            seen[x] = true
            vals[#vals + 1] = x
          end
        end
        table.sort(vals)
        for _, x in ipairs(vals) do
          parts[#parts + 1] = k .. x
        end
      else
        parts[#parts + 1] = k .. tostring(v)
      end
    end
  end
  return b64enc(crypto.hmac_sha1(token, concat(parts)))
end

local function hex32()
  return crypto.to_hex(crypto.random_bytes(16))
end

local function rfc1123(t)
  return os.date("!%a, %d %b %Y %H:%M:%S +0000", t)
end

local function e164(s)
  return type(s) == "string" and s:find("^%+[1-9]%d+$") ~= nil and #s >= 8 and #s <= 16
end

local function http_url(s)
  local p = type(s) == "string" and url.parse(s)
  return p and (p.scheme == "http" or p.scheme == "https") and p.host ~= ""
end

local function twilio_error(status, code, message)
  return status, {
    code = code,
    message = message,
    more_info = "https://www.twilio.com/docs/errors/" .. code,
    status = status,
  }
end

-- Waiting ---------------------------------------------------------------------

local waiters = require "fakes.waiters"
local wait_for, notify = waiters.wait_for, waiters.notify

-- TwiML -------------------------------------------------------------------------

local ENTITIES = { amp = "&", lt = "<", gt = ">", quot = '"', apos = "'" }

local function unescape(s)
  if not s:find("&", 1, true) then
    return s
  end
  return (s:gsub("&(#?[%w]+);", function(e)
    if ENTITIES[e] then
      return ENTITIES[e]
    end
    local n = e:match("^#[xX](%x+)$")
    n = n and tonumber(n, 16) or (e:match("^#(%d+)$") and tonumber(e:sub(2)))
    if n and n < 0x110000 then
      return utf8.char(n)
    end
  end))
end

local function parse_attrs(s)
  local t = {}
  for k, _, v in s:gmatch("([%w_:%-]+)%s*=%s*([\"'])(.-)%2") do
    t[k] = unescape(v)
  end
  return t
end

-- A small XML reader for TwiML: elements with attributes and text. Returns the
-- root element {name, attrs, children, text} or nil, message.
local function parse_xml(s)
  local root = { children = {} }
  local stack = { root }
  local pos = 1
  while true do
    local a = s:find("<", pos, true)
    local text = s:sub(pos, (a or #s + 1) - 1)
    local top = stack[#stack]
    if text:find("%S") then
      if top == root then
        return nil, "text outside the root element"
      end
      top.text = (top.text or "") .. unescape(text)
    end
    if not a then
      break
    end
    if s:sub(a, a + 3) == "<!--" then
      local e = s:find("-->", a + 4, true)
      if not e then
        return nil, "unterminated comment"
      end
      pos = e + 3
    elseif s:sub(a + 1, a + 1) == "?" then
      local e = s:find("?>", a + 2, true)
      if not e then
        return nil, "unterminated processing instruction"
      end
      pos = e + 2
    else
      local e, closing, name, attrs, self_close
      e = s:find(">", a, true)
      if not e then
        return nil, "unterminated tag"
      end
      local tag = s:sub(a, e)
      closing, name, attrs, self_close = tag:match("^<(/?)([%a_][%w_:%-%.]*)(.-)(/?)>$")
      if not name then
        return nil, "malformed tag " .. tag
      end
      if closing == "/" then
        if top.name ~= name then
          return nil, "mismatched </" .. name .. ">"
        end
        stack[#stack] = nil
      else
        local node = { name = name, attrs = parse_attrs(attrs), children = {} }
        if top == root and #root.children > 0 then
          return nil, "more than one root element"
        end
        top.children[#top.children + 1] = node
        if self_close ~= "/" then
          stack[#stack + 1] = node
        end
      end
      pos = e + 1
    end
  end
  if #stack ~= 1 then
    return nil, "unclosed <" .. tostring(stack[#stack].name) .. ">"
  end
  if not root.children[1] then
    return nil, "no root element"
  end
  return root.children[1]
end

-- {verbs = {names}, stream = {...}} or {error = message}.
local function parse_twiml(body)
  local doc, err = parse_xml(body or "")
  if not doc then
    return { error = err }
  end
  if doc.name ~= "Response" then
    return { error = "the root element is <" .. doc.name .. ">, not <Response>" }
  end
  local out = { verbs = {} }
  for _, verb in ipairs(doc.children) do
    out.verbs[#out.verbs + 1] = verb.name
    if verb.name == "Connect" and not out.stream then
      for _, noun in ipairs(verb.children) do
        if noun.name == "Stream" then
          local params, list = {}, {}
          for _, p in ipairs(noun.children) do
            if p.name == "Parameter" and p.attrs.name then
              params[p.attrs.name] = p.attrs.value or ""
              list[#list + 1] = { name = p.attrs.name, value = p.attrs.value or "" }
            end
          end
          out.stream = {
            url = noun.attrs.url,
            name = noun.attrs.name,
            track = noun.attrs.track,
            parameters = params,
            parameter_list = list,
          }
          break
        end
      end
    end
  end
  if not out.stream then
    out.error = "no <Connect><Stream> in the TwiML"
  elseif not out.stream.url then
    out.error = "<Stream> has no url"
  end
  return out
end
M.parse_twiml = parse_twiml

-- Call record ---------------------------------------------------------------------

local Call = {}
local call_mt = {
  __index = function(c, k)
    if k == "played_bytes" then
      local unplayed = max(0, (c._play_end - now()) * 8)
      return max(0, floor(c.received_bytes - c.dropped_bytes - unplayed + 0.5))
    elseif k == "received_audio" then
      local chunks = rawget(c, "_audio")
      if #chunks > 1 then
        local all = concat(chunks)
        rawset(c, "_audio", { all })
        return all
      end
      return chunks[1] or ""
    end
    return Call[k]
  end,
}

local REST_STATUS = { initiated = "queued" }

function Call:resource()
  local p = self.params
  local base = API .. self.tw.account_sid .. "/Calls/" .. self.sid
  local status = REST_STATUS[self.status] or self.status
  return {
    sid = self.sid,
    account_sid = self.tw.account_sid,
    date_created = rfc1123(self.created_time),
    date_updated = rfc1123(self.updated_time or self.created_time),
    parent_call_sid = null,
    to = p.To,
    to_formatted = p.To,
    from = p.From,
    from_formatted = p.From,
    phone_number_sid = null,
    status = status,
    start_time = self.answered_time and rfc1123(self.answered_time) or null,
    end_time = self.ended_time and rfc1123(self.ended_time) or null,
    duration = self.duration and tostring(self.duration) or null,
    price = null,
    price_unit = "USD",
    direction = "outbound-api",
    answered_by = self.answered_by or null,
    annotation = null,
    api_version = "2010-04-01",
    forwarded_from = null,
    group_sid = null,
    caller_name = null,
    queue_time = tostring(self.status == "queued" and (self.behaviour.queue_time_ms or self.behaviour.queue_ms
      and max(0, ceil(self.created_at + self.behaviour.queue_ms - now()))) or 0),
    trunk_sid = null,
    uri = base .. ".json",
    subresource_uris = {
      notifications = base .. "/Notifications.json",
      recordings = base .. "/Recordings.json",
      payments = base .. "/Payments.json",
      events = base .. "/Events.json",
      siprec = base .. "/Siprec.json",
      streams = base .. "/Streams.json",
      transcriptions = base .. "/Transcriptions.json",
      user_defined_message_subscriptions = base .. "/UserDefinedMessageSubscriptions.json",
      user_defined_messages = base .. "/UserDefinedMessages.json",
    },
  }
end

local function set_status(call, status)
  call.status = status
  call.updated_time = os.time()
  call.statuses[#call.statuses + 1] = { status = status, at = now() }
  notify(call)
end

local function rewrite(tw, u)
  local f = tw.opts.public_url_rewrite
  return f and f(u) or u
end

-- Status callbacks ------------------------------------------------------------------

local SIP = { completed = 200, busy = 486, ["no-answer"] = 487, canceled = 487, failed = 500 }

local function base_params(call, status)
  local p = call.params
  return {
    AccountSid = call.tw.account_sid,
    ApiVersion = "2010-04-01",
    CallSid = call.sid,
    CallStatus = status,
    Called = p.To,
    Caller = p.From,
    Direction = "outbound-api",
    From = p.From,
    To = p.To,
  }
end

-- A callback not sent: a completed one still ends the call's callbacks.
local function not_sent(call, event)
  if event == "completed" then
    call._final_cb_done = true
    notify(call)
  end
end

-- Queues the callback for event (when requested) with its SequenceNumber.
local function callback(call, event, status)
  local cb_url = call.params.StatusCallback
  if not cb_url or not call.callback_events[event] then
    return not_sent(call, event)
  end
  local p = base_params(call, status)
  p.CallbackSource = "call-progress-events"
  p.SequenceNumber = tostring(call._cb_seq)
  p.Timestamp = rfc1123(os.time())
  call._cb_seq = call._cb_seq + 1
  if event == "completed" then
    p.CallDuration = tostring(call.duration or 0)
    p.Duration = tostring(ceil((call.duration or 0) / 60))
    p.SipResponseCode = tostring(call.behaviour.sip_response_code or SIP[status] or 200)
  end
  if event == "answered" and call.answered_by then
    p.AnsweredBy = call.answered_by
  end
  if call.behaviour.lost_callbacks and call.behaviour.lost_callbacks[event] then
    -- Never delivered (Twilio does not retry a failed status callback); its
    -- SequenceNumber is used all the same.
    call.lost_callbacks = (call.lost_callbacks or 0) + 1
    return not_sent(call, event)
  end
  local item = { event = event, status = status, url = cb_url, params = p }
  if event == "ringing" and call.behaviour.callbacks_out_of_order then
    call._held = item
    return
  end
  call._cbq:push(item)
  if call._held and (event == "answered" or event == "completed") then
    call._cbq:push(call._held)
    call._held = nil
  end
end

-- Sends a signed form request the way Twilio does; returns res, err.
local function signed_request(call, target, method, params)
  local tw = call.tw
  local headers = {
    ["User-Agent"] = "TwilioProxy/1.1",
    ["I-Twilio-Idempotency-Token"] = crypto.uuid4(),
  }
  local signature, fetch_url, body
  if method == "GET" then
    local q = url.form_encode(params)
    local full = target .. (target:find("?", 1, true) and "&" or "?") .. q
    signature = M.sign(tw.auth_token, full)
    fetch_url = rewrite(tw, full)
  else
    signature = M.sign(tw.auth_token, target, params)
    fetch_url = rewrite(tw, target)
    body = url.form_encode(params)
    headers["Content-Type"] = "application/x-www-form-urlencoded"
  end
  headers["X-Twilio-Signature"] = signature
  local res, err = fetch(fetch_url, {
    method = method,
    headers = headers,
    body = body,
    timeout = 15000,
    ca_file = tw.opts.ca_file,
  })
  return res, err, signature
end

local function callback_sender(call)
  local method = (call.params.StatusCallbackMethod or "POST"):upper()
  while true do
    local item = call._cbq:pop()
    if not item or not call.tw.srv then
      return
    end
    if call.behaviour.callback_delay_ms then
      timer.sleep(call.behaviour.callback_delay_ms)
    end
    item.at = now()
    item.sequence = tonumber(item.params.SequenceNumber)
    call.callbacks[#call.callbacks + 1] = item
    local res, err, sig = signed_request(call, item.url, method, item.params)
    item.signature = sig
    item.response_status = res and res.status
    item.error = err
    item.delivered_at = now()
    if item.event == "completed" then
      call._final_cb_done = true
    end
    notify(call)
  end
end

-- Ending ----------------------------------------------------------------------------

local function stop_marks(call)
  if call._mark_timer then
    call._mark_timer:stop()
    call._mark_timer = nil
  end
end

local function next_seq(call)
  call._seq = call._seq + 1
  return call._seq
end

local function ws_send(call, event, s, seq)
  local conn = call.ws
  if not conn or call.stream_closed then
    return nil
  end
  call.ws_sent[#call.ws_sent + 1] = { at = now(), event = event, sequenceNumber = seq }
  return conn:send(s)
end

-- Ends the call with a terminal status; the stream gets `stop` and is closed,
-- then the final callback goes out.
local function finish(call, status, reason)
  if call.final then
    return
  end
  call.final = status
  call.end_reason = reason
  call.ended_at = now()
  call.ended_time = os.time()
  if call.answered_at then
    call.duration = ceil((call.ended_at - call.answered_at) / 1000)
  else
    call.duration = 0
  end
  set_status(call, status)
  task.spawn(function()
    if call.ws and not call.stream_closed then
      stop_marks(call)
      local seq = next_seq(call)
      ws_send(call, "stop", fmt('{"event":"stop","sequenceNumber":"%d","streamSid":"%s","stop":{"accountSid":"%s","callSid":"%s"}}',
        seq, call.stream_sid, call.tw.account_sid, call.sid), seq)
      call.ws:close(1000, "call ended")
      wait_for(call, function()
        return call.stream_closed
      end, 2000)
    end
    if call._held then
      call._cbq:push(call._held)
      call._held = nil
    end
    callback(call, "completed", status)
    call._cbq:close()
    wait_for(call, function()
      return call._final_cb_done
    end, 20000)
    call.done = true
    call._ended = true
    notify(call)
  end)
end

function Call:hangup()
  if self.final then
    return
  end
  if self.answered_at then
    finish(self, "completed", "callee")
  else
    finish(self, "busy", "callee")
  end
end

function Call:send_dtmf(digit)
  if not self.stream_sid or self.stream_closed or self.final then
    return nil, "ECLOSED: no open stream"
  end
  local seq = next_seq(self)
  return ws_send(self, "dtmf", fmt('{"event":"dtmf","streamSid":"%s","sequenceNumber":"%d","dtmf":{"track":"inbound_track","digit":%s}}',
    self.stream_sid, seq, encode(tostring(digit))), seq)
end

function Call:wait_status(status, timeout_ms)
  return wait_for(self, function()
    for _, s in ipairs(self.statuses) do
      if s.status == status then
        return true
      end
    end
  end, timeout_ms)
end

function Call:wait_stream(timeout_ms)
  return wait_for(self, function()
    return self.stream_started_at ~= nil
  end, timeout_ms)
end

function Call:wait_received_audio(bytes, timeout_ms)
  return wait_for(self, function()
    return self.received_bytes >= bytes and self.received_bytes
  end, timeout_ms)
end

function Call:wait_final(timeout_ms)
  return wait_for(self, function()
    return self.final ~= nil
  end, timeout_ms)
end

function Call:wait_closed(timeout_ms)
  return wait_for(self, function()
    return self.done
  end, timeout_ms)
end

-- Media Streams: what the app sends -------------------------------------------------

local function protocol_error(call, message)
  call.errors[#call.errors + 1] = { at = now(), message = message }
end

local MARK = '{"event":"mark","sequenceNumber":"%d","streamSid":"%s","mark":{"name":%s}}'
local MARK_SHUFFLED = '{ "dir" : "C:\\\\", "mark" : { "name" : %s }, "note" : "a \\"name\\": \\"0\\" inside", '
  .. '"sequenceNumber" : "%d", "event" : "mark", "streamSid" : "%s" }'

local function echo_mark(call, m, t)
  m.at = t
  local seq = next_seq(call)
  local msg
  if call.behaviour.json == "shuffled" then
    msg = fmt(MARK_SHUFFLED, encode(m.name), seq, call.stream_sid)
  else
    msg = fmt(MARK, seq, call.stream_sid, encode(m.name))
  end
  ws_send(call, "mark", msg, seq)
  call.marks_echoed[#call.marks_echoed + 1] = m
end

-- Echoes every mark whose audio has played, then waits for the next one.
local function arm_marks(call)
  stop_marks(call)
  local q = call._marks
  local t = now()
  while q.first <= q.last and q[q.first].due <= t do
    local m = q[q.first]
    q[q.first] = nil
    q.first = q.first + 1
    echo_mark(call, m, t)
  end
  if q.first <= q.last then
    call._mark_timer = timer.after(max(1, ceil(q[q.first].due - t)), function()
      call._mark_timer = nil
      arm_marks(call)
    end)
  end
  notify(call)
end

local function on_media(call, m, t)
  local media = m.media
  local data = type(media) == "table" and type(media.payload) == "string" and b64dec(media.payload)
  if not data then
    return protocol_error(call, "media without a base64 payload")
  end
  local start = max(t, call._play_end)
  call._play_end = start + #data / 8
  call.received_bytes = call.received_bytes + #data
  if not call.light then
    local chunks = call._audio
    chunks[#chunks + 1] = data
    call.ws_received[#call.ws_received + 1] = { at = t, event = "media", bytes = #data }
  end
  if #call._waiters > 0 then
    notify(call)
  end
end

local function on_mark(call, m, t)
  local name = type(m.mark) == "table" and m.mark.name
  if type(name) ~= "string" then
    return protocol_error(call, "mark without a name")
  end
  local due = max(t, call._play_end)
  call.marks_sent[#call.marks_sent + 1] = { name = name, at = t, due = due }
  if call.behaviour.echo_marks == false then
    return -- a vendor that does not echo them, or a stream stuck
  end
  local q = call._marks
  q.last = q.last + 1
  q[q.last] = { name = name, due = due, queued_at = t }
  if q.first == q.last then
    arm_marks(call)
  end
end

local function on_clear(call, t)
  local dropped = max(0, (call._play_end - t) * 8)
  call.dropped_bytes = call.dropped_bytes + dropped
  call._play_end = t
  local q = call._marks
  local pending = q.last - q.first + 1
  call.clears[#call.clears + 1] = {
    at = t,
    dropped_bytes = floor(dropped + 0.5),
    pending_marks = pending,
    received_bytes = call.received_bytes,
    played_bytes = call.played_bytes,
  }
  stop_marks(call)
  while q.first <= q.last do
    local m = q[q.first]
    q[q.first] = nil
    q.first = q.first + 1
    echo_mark(call, m, t)
  end
  notify(call)
end

local function on_app_message(call, msg)
  local t = now()
  local ok, m = pcall(decode, msg)
  if not ok or type(m) ~= "table" then
    return protocol_error(call, "a message that is not a JSON object")
  end
  local ev = m.event
  if m.streamSid ~= call.stream_sid then
    protocol_error(call, "wrong or missing streamSid on " .. tostring(ev))
    return
  end
  if ev == "media" then
    return on_media(call, m, t)
  end
  call.ws_received[#call.ws_received + 1] = { at = t, event = ev, msg = m }
  if ev == "mark" then
    on_mark(call, m, t)
  elseif ev == "clear" then
    on_clear(call, t)
  else
    protocol_error(call, "unknown event " .. tostring(ev))
  end
end

-- Media Streams: the connection and what Twilio sends ----------------------------------

local function media_loop(call)
  local b = call.behaviour
  local src = b.audio
  local frames = b.audio_ms and floor(b.audio_ms / 20) or math.huge
  local light = call.light
  local t0 = call.stream_started_at
  local conn = call.ws
  local tmpl = '{"event":"media","sequenceNumber":"%d","streamSid":"' .. call.stream_sid
    .. '","media":{"track":"inbound","chunk":"%d","timestamp":"%d","payload":"%s"}}'
  if b.json == "shuffled" then
    tmpl = '{ "sequenceNumber" : "%d", "dir" : "C:\\\\", "note" : "not \\"event\\": \\"mark\\"", '
      .. '"media" : { "chunk" : "%d", "timestamp" : "%d", "payload" : "%s", "track" : "inbound" }, '
      .. '"event" : "media", "streamSid" : "' .. call.stream_sid .. '" }'
  end
  local k = 0
  while k < frames and not call.final and not call.stream_closed do
    k = k + 1
    local payload = SILENCE_B64
    local off = (k - 1) * 160
    if src and off < #src then
      local piece = src:sub(off + 1, off + 160)
      if #piece < 160 then
        piece = piece .. rep("\255", 160 - #piece)
      end
      payload = b64enc(piece)
    end
    if b.payloads and b.payloads[k] then
      payload = b.payloads[k]
    end
    call._seq = call._seq + 1
    if not conn:send(fmt(tmpl, call._seq, k, (k - 1) * 20, payload)) then
      break
    end
    call.media_sent = k
    if not light then
      call.media_sent_at[k] = now()
    end
    local wait = t0 + k * 20 - now()
    if wait > 0 then
      timer.sleep(ceil(wait))
    end
  end
end

local function run_stream(call)
  local tw = call.tw
  local st = call.twiml.stream
  -- The url "does not support query string parameters" (Twilio's <Stream>
  -- docs; protocols.md section 2): data goes in <Parameter>s. A query is not
  -- passed on: the connection is made (and signed) without it.
  local stream_url = st.url:match("^[^?#]*")
  if stream_url ~= st.url then
    protocol_error(call, "a <Stream> url with a query string: Twilio does not pass it on (use <Parameter>)")
  end
  call.stream_url = stream_url
  call.stream_params = st.parameters
  call.stream_headers = {
    ["X-Twilio-Signature"] = M.sign(tw.auth_token, stream_url),
    ["User-Agent"] = "Twilio.TmeWs/1.0",
  }
  local conn, err = ws.connect(rewrite(tw, stream_url), {
    headers = call.stream_headers,
    ca_file = tw.opts.ca_file,
    timeout = 5000,
    on_text = function(_, msg)
      on_app_message(call, msg)
    end,
    on_binary = function()
      protocol_error(call, "a binary message")
    end,
    on_close = function(_, code, reason)
      if not call.stream_closed then
        call.stream_closed = { code = code, reason = reason, by = call.final and "twilio" or "app", at = now() }
        stop_marks(call)
        finish(call, "completed", "stream_closed")
        notify(call)
      end
    end,
  })
  if not conn then
    call.stream_error = err
    return finish(call, "completed", "stream_failed")
  end
  if call.final then
    conn:close(1000, "call ended")
    return
  end
  call.ws = conn
  call.stream_sid = "MZ" .. hex32()
  ws_send(call, "connected", '{"event":"connected","protocol":"Call","version":"1.0.0"}')
  local seq = next_seq(call)
  ws_send(call, "start", encode({
    event = "start",
    sequenceNumber = tostring(seq),
    streamSid = call.stream_sid,
    start = {
      accountSid = tw.account_sid,
      streamSid = call.stream_sid,
      callSid = call.sid,
      tracks = { "inbound" },
      mediaFormat = { encoding = "audio/x-mulaw", sampleRate = 8000, channels = 1 },
      customParameters = call.stream_params,
    },
  }), seq)
  call.stream_started_at = now()
  notify(call)
  if call.behaviour.hangup_after_ms then
    timer.after(call.behaviour.hangup_after_ms, function()
      call:hangup()
    end)
  end
  media_loop(call)
end

-- Call flow ---------------------------------------------------------------------------

-- Sleeps ms unless the call ends first; true when it is still going.
local function hold(call, ms)
  if call.final then
    return false
  end
  wait_for(call, function()
    return call.final
  end, ms)
  return not call.final
end

local function voice_request(call)
  local p = call.params
  local method = (p.Method or "POST"):upper()
  local params = base_params(call, "in-progress")
  if call.answered_by then
    params.AnsweredBy = call.answered_by
  end
  local vr = { url = p.Url, method = method, params = params, at = now() }
  call.voice_request = vr
  local res, err, sig = signed_request(call, p.Url, method, params)
  vr.signature = sig
  vr.error = err
  if res then
    vr.status = res.status
    vr.body = res.body
    vr.content_type = res.headers["content-type"]
  end
  vr.done_at = now()
  return res and res.status >= 200 and res.status < 300 and res.body
end

local function run_call(call)
  local b = call.behaviour
  -- Twilio places the calls created beyond the account's calls per second
  -- from a queue, at that rate: until then the call is queued, and nothing
  -- rings (www.twilio.com/docs/voice/api/call-resource, queue_time).
  if not hold(call, (b.queue_ms or 0) + (b.initiated_ms or 5)) then
    return
  end
  set_status(call, "initiated")
  callback(call, "initiated", "initiated")
  if b.answer == "failed" then
    if hold(call, b.ringing_ms or 5) then
      finish(call, "failed", "failed")
    end
    return
  end
  if not hold(call, b.ringing_ms or 5) then
    return
  end
  set_status(call, "ringing")
  callback(call, "ringing", "ringing")
  if not hold(call, b.ring_ms or 50) then
    return
  end
  if b.answer == "busy" or b.answer == "no-answer" then
    return finish(call, b.answer, b.answer)
  end
  call.answered_at = now()
  call.answered_time = os.time()
  if call.params.MachineDetection then
    call.answered_by = b.answered_by or "human"
  end
  set_status(call, "in-progress")
  callback(call, "answered", "in-progress")
  local body
  if call.params.Twiml then
    body = call.params.Twiml
  else
    if b.voice_delay_ms and not hold(call, b.voice_delay_ms) then
      return
    end
    body = voice_request(call)
  end
  if call.final then
    return
  end
  if not body then
    return finish(call, "completed", "twiml")
  end
  call.twiml = parse_twiml(body)
  if call.twiml.error then
    return finish(call, "completed", "twiml")
  end
  if b.stream == false then
    return
  end
  if b.stream_delay_ms then
    timer.sleep(b.stream_delay_ms)
  end
  run_stream(call)
end

-- REST ---------------------------------------------------------------------------------

local Fake = {}
Fake.__index = Fake

local function authorized(tw, req)
  local h = req.headers.authorization
  local b = type(h) == "string" and h:match("^[Bb]asic%s+(%S+)%s*$")
  local creds = b and b64dec(b)
  return creds and crypto.constant_time_eq(creds, tw.account_sid .. ":" .. tw.auth_token)
end

local function not_found(req)
  return twilio_error(404, 20404, "The requested resource " .. req.path .. " was not found")
end

local function resolve_behaviour(b, call)
  if type(b) == "function" then
    b = b(call)
  end
  if b == nil or b == "answer" then
    return { answer = true }
  end
  if type(b) == "string" then
    return { answer = b }
  end
  assert(type(b) == "table", "fakes.twilio: behaviour must be a string, a table or a function")
  local copy = {}
  for k, v in pairs(b) do
    copy[k] = v
  end
  if copy.answer == nil or copy.answer == "answer" then
    copy.answer = true
  end
  return copy
end

local function event_set(v)
  local set = {}
  if v == nil then
    set.completed = true
  elseif type(v) == "table" then
    for _, e in ipairs(v) do
      set[e] = true
    end
  else
    for e in tostring(v):gmatch("[^%s,]+") do
      set[e] = true
    end
  end
  return set
end

function Fake:_create(req)
  if not authorized(self, req) then
    return twilio_error(401, 20003, "Authenticate")
  end
  if req.params.account ~= self.account_sid then
    return not_found(req)
  end
  if self.opts.rate_limit and self._rate_limited < self.opts.rate_limit then
    -- 20429: not processed, no call record (Twilio: safe to send again).
    self._rate_limited = self._rate_limited + 1
    local status, body = twilio_error(429, 20429, "Too Many Requests")
    return status, body, { ["Retry-After"] = self.opts.retry_after }
  end
  local p = url.form_decode(req.body)
  if p.To == nil or p.To == "" then
    return twilio_error(400, 21201, "No 'To' number is specified")
  end
  if not e164(p.To) then
    return twilio_error(400, 21211, "Invalid 'To' Phone Number: " .. tostring(p.To))
  end
  if p.From == nil or p.From == "" then
    return twilio_error(400, 21213, "No 'From' number is specified")
  end
  if not e164(p.From) then
    return twilio_error(400, 21212, "Invalid From Number (caller ID): " .. tostring(p.From))
  end
  if p.Timeout ~= nil and not (p.Timeout:find("^%d+$") and tonumber(p.Timeout) > 0) then
    return twilio_error(400, 21208, "Invalid Timeout: " .. tostring(p.Timeout))
  end
  if (p.Url == nil or p.Url == "") and (p.Twiml == nil or p.Twiml == "") then
    return twilio_error(400, 21205, "Url parameter is required.")
  end
  if p.Url and not http_url(p.Url) then
    return twilio_error(400, 21205, "Url is not a valid URL: " .. tostring(p.Url))
  end
  if p.StatusCallback and not http_url(p.StatusCallback) then
    return twilio_error(400, 21205, "StatusCallback is not a valid URL: " .. tostring(p.StatusCallback))
  end
  local call = setmetatable({
    tw = self,
    sid = "CA" .. hex32(),
    params = p,
    created_at = now(),
    created_time = os.time(),
    statuses = {},
    callbacks = {},
    updates = {},
    redirects = {},
    ws_sent = {},
    ws_received = {},
    media_sent = 0,
    media_sent_at = {},
    received_bytes = 0,
    dropped_bytes = 0,
    clears = {},
    marks_sent = {},
    marks_echoed = {},
    errors = {},
    callback_events = event_set(p.StatusCallbackEvent),
    light = self.opts.light,
    _audio = {},
    _play_end = 0,
    _marks = { first = 1, last = 0 },
    _seq = 0,
    _cb_seq = 0,
    _waiters = {},
  }, call_mt)
  call.behaviour = resolve_behaviour(self.opts.behaviour, call)
  self.calls[#self.calls + 1] = call
  if call.behaviour.answer == "reject-api" then
    call.sid = nil
    local b = call.behaviour
    call.rejected = { status = b.reject_status or 400, code = b.reject_code or 21215 }
    call.final = "rejected"
    call.done = true
    call._ended = true
    self._queue:push(call)
    return twilio_error(call.rejected.status, call.rejected.code, call.behaviour.reject_message or ("Account not authorized to call " .. p.To
      .. ". Perhaps you need to enable some international permissions: https://www.twilio.com/console/voice/calls/geo-permissions/low-risk"))
  end
  self.by_sid[call.sid] = call
  call._cbq = task.queue()
  set_status(call, "queued")
  self._queue:push(call)
  task.spawn(callback_sender, call)
  task.spawn(run_call, call)
  local create_delay = call.behaviour.create_delay_ms or self.opts.create_delay_ms
  if create_delay then
    timer.sleep(create_delay)
  end
  return 201, call:resource()
end

function Fake:_call(req)
  if not authorized(self, req) then
    return nil, twilio_error(401, 20003, "Authenticate")
  end
  local call = req.params.account == self.account_sid and self.by_sid[req.params.sid]
  if not call then
    return nil, not_found(req)
  end
  return call
end

function Fake:_update(req)
  local call, status, body = self:_call(req)
  if not call then
    return status, body
  end
  local p = url.form_decode(req.body)
  call.updates[#call.updates + 1] = { params = p, at = now() }
  local fail = call.behaviour.update_fail or self.opts.update_fail
  local times = call.behaviour.update_fail_times or self.opts.update_fail_times
  if fail and (not times or #call.updates <= times) then
    return twilio_error(fail, 20500, "Internal Server Error")
  end
  local ended = call.behaviour.ended_update or self.opts.ended_update
  if call.final and ended then
    return twilio_error(ended.status or 400, ended.code or 21220, ended.message or "Call is not in-progress. Cannot redirect.")
  end
  if p.Status ~= nil then
    if p.Status ~= "completed" and p.Status ~= "canceled" then
      return twilio_error(400, 21218, "Invalid Status: " .. tostring(p.Status)
        .. ". Status must be one of 'completed' or 'canceled'")
    end
    if not call.final then
      call.hangup_requested_at = now()
      if call.answered_at then
        if p.Status == "completed" then
          finish(call, "completed", "api")
        end
      else
        finish(call, "canceled", "api")
      end
    end
  elseif p.Url or p.Twiml then
    call.redirects[#call.redirects + 1] = { params = p, at = now() }
  end
  local update_delay = call.behaviour.update_delay_ms or self.opts.update_delay_ms
  if type(update_delay) == "table" then
    update_delay = update_delay[#call.updates] -- this update's (nil: at once)
  end
  if update_delay then
    timer.sleep(update_delay)
  end
  local lost = call.behaviour.update_answer_lost_times
  if lost and #call.updates <= lost then
    return twilio_error(502, 20500, "Bad Gateway") -- applied, but the answer did not make it back
  end
  return 200, call:resource()
end

function Fake:_get(req)
  local call, status, body = self:_call(req)
  if not call then
    return status, body
  end
  call.gets = (call.gets or 0) + 1
  local get_delay = call.behaviour.get_delay_ms
  if type(get_delay) == "table" then
    get_delay = get_delay[call.gets] -- this GET's (nil: at once)
  end
  if get_delay then
    timer.sleep(get_delay) -- answered with the call as it is then
  end
  if call.behaviour.get_fail_times and call.gets <= call.behaviour.get_fail_times then
    return twilio_error(503, 20500, "Service Unavailable")
  end
  return 200, call:resource()
end

function M.start(opts)
  assert(type(opts) == "table", "fakes.twilio.start needs an options table")
  assert(type(opts.account_sid) == "string" and type(opts.auth_token) == "string",
    "fakes.twilio.start needs account_sid and auth_token")
  local tw = setmetatable({
    opts = opts,
    account_sid = opts.account_sid,
    auth_token = opts.auth_token,
    calls = {},
    by_sid = {},
    _rate_limited = 0,
    _queue = task.queue(),
  }, Fake)
  local srv = http.server({ host = "127.0.0.1", port = 0, max_connections = opts.max_connections or 4096 })
  srv:post(API .. "{account}/Calls.json", function(req)
    return tw:_create(req)
  end)
  srv:post(API .. "{account}/Calls/{sid}.json", function(req)
    return tw:_update(req)
  end)
  srv:get(API .. "{account}/Calls/{sid}.json", function(req)
    return tw:_get(req)
  end)
  srv:route("*", "/*", function(req)
    return not_found(req)
  end)
  local ok, err = srv:listen()
  if not ok then
    return nil, err
  end
  tw.srv = srv
  tw.port = srv.port
  tw.url = "http://127.0.0.1:" .. srv.port
  return tw
end

function Fake:wait_call(timeout_ms)
  return self._queue:pop(timeout_ms)
end

function Fake:close()
  if not self.srv then
    return
  end
  local srv = self.srv
  self.srv = nil
  for _, call in ipairs(self.calls) do
    if not call.done then
      call.final = call.final or "completed"
      call.end_reason = call.end_reason or "fake closed"
      stop_marks(call)
      if call.ws and not call.stream_closed then
        call.stream_closed = { code = 1001, reason = "fake closed", by = "twilio", at = now() }
        call.ws:close(1001, "fake closed")
      end
      if call._cbq then
        call._cbq:close()
      end
      call.done = true
      call._ended = true
      notify(call)
    end
  end
  self._queue:close()
  srv:close()
  log.debug("fakes.twilio closed", { calls = #self.calls })
end

return M
