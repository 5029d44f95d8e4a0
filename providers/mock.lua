--- providers/mock.lua: a phone in your browser, for local work.
--
-- telephony.provider = "mock". Dialing returns a hint: a loopback URL with a
-- one-time token, to a page callagent serves (providers/mock/). The page
-- rings, with Answer and Decline: Answer asks for the microphone and speaks
-- Twilio's Media Streams protocol to /voice/stream, so the whole call engine
-- runs as with Twilio; Decline ends the attempt busy. Nobody answering
-- within call.ringTimeoutSec is no_answer.
--
-- Routes (added by registerRoutes):
--   GET  /mock/                        a page to place a test call (POST /v1/calls);
--                                      /mock redirects there (308)
--   GET  /mock/call/{callId}?t=TOKEN   the phone page (TOKEN: the hint's, one use)
--   GET  /mock/static/{file}           the pages' scripts and style sheets (providers/mock/*)
--   GET  /mock/api/ring/{callId}?t=TOKEN  whether the link still rings, and who is called
--                                      -> {callId, attempt, link, attemptStatus, status,
--                                          nextAttemptAt?, to, calleeName?, callerName?}
--   POST /mock/api/answer              {callId, token, page?} -> {streamUrl, parameters, pollUrl,
--                                      session}; page: the page's own id
--   POST /mock/api/decline             {callId, token, status?} the attempt ends busy (or failed)
--                                      -> {callId, attempt, attemptStatus, status, nextAttemptAt?}
--   GET  /mock/api/call/{callId}?s=S   the page's view: status, transcript, report,
--                                      endReason, lastError (lastErrorIsPages: the
--                                      page's own why, its microphone lost)
--   POST /mock/api/hangup              {callId, session, reason?} the page hung up;
--                                      reason "microphone_lost": its microphone stopped
--                                      mid-call, which the call's lastError says; or
--                                      {callId, token, page}: a page left before its
--                                      answer's reply (its link answered by that page,
--                                      or answered now to be hung up at once)
local crypto = require "callagent.crypto"
local timer = require "callagent.timer"
local json = require "callagent.json"
local log = require "callagent.log"
local core = require "callagent.core"
local http = require "callagent.http"

local P = {
  name = "mock",
  needs = {},
  needs_public_url = false,
}

local RING_EXTRA_MS = 0
-- lastError of a call whose page lost its microphone mid-call.
local MIC_LOST = "the mock phone's microphone stopped mid-call (unplugged, or its permission taken back): "
  .. "the page hung up"
local FINAL = require("callagent.calls").FINAL

function P:init(ctx)
  self.cfg = ctx.config
  self.engine = ctx.engine
  self.app = ctx.app
  self.pages = {} -- page token -> {call_id, attempt, expires}
  self.sessions = {} -- session token -> {call_id, attempt}
  self.ringing = {} -- call_id .. "#" .. n -> ring timer
end

local function key(id, n)
  return id .. "#" .. tostring(n)
end

function P:startCall(call, _, localBaseUrl)
  local token = crypto.random_token(18)
  local n = call.attempt
  self.pages[token] = { call_id = call.callId, attempt = n, expires = timer.now() + self.cfg.call.ringTimeoutSec * 1000 }
  local k = key(call.callId, n)
  self.ringing[k] = timer.after(self.cfg.call.ringTimeoutSec * 1000 + RING_EXTRA_MS, function()
    self.ringing[k] = nil
    if self.closed then
      return
    end
    self:_expire_page(token)
    self.engine:provider_status(call.callId, n, { status = "no_answer", reason = "nobody opened the mock phone page" })
  end)
  local pid = "MOCK" .. crypto.to_hex(crypto.random_bytes(8))
  self.pages[token].pid = pid
  local hint = localBaseUrl .. "/mock/call/" .. call.callId .. "?t=" .. token
  -- Not the hint itself: its token answers the call, and a log is read by others.
  log.info("mock phone ringing: open the call's hint (in the API's answer) to answer", { call = call.callId,
    page = localBaseUrl .. "/mock/call/" .. call.callId })
  return { providerCallId = pid, userHint = hint }
end

function P:buildVoiceResponse()
  return "", "text/plain"
end

-- The mock phone drives the call itself (provider_status above, and its page's
-- /mock/api routes, each checked by a token): nobody may post to /voice or
-- /status for it. Its page's media stream is let through; the engine checks
-- the one-time stream token it carries.
function P:validateRequest(req)
  if req.upgrade then
    return true
  end
  return false, "the mock provider takes no webhooks"
end

function P:mapStatus(payload)
  return { status = payload.status, reason = payload.reason }
end

-- A link that stopped ringing is kept a while, so that a late visitor is
-- told so (410), not that the link was used; then it is forgotten.
function P:_expire_page(token)
  local page = self.pages[token]
  if page and page.expires > 0 then
    page.expires = 0
    timer.after(600000, function()
      self.pages[token] = nil
    end):unref()
  end
end

function P:_stop_ringing(k)
  if self.ringing[k] then
    self.ringing[k]:stop()
    self.ringing[k] = nil
  end
end

-- app:stop(): the phones stop ringing (their timers would hold the process,
-- and report to a closed engine).
function P:close()
  self.closed = true
  for k in pairs(self.ringing) do
    self:_stop_ringing(k)
  end
end

function P:endCall(call, attempt)
  local n = attempt and attempt.n or call.attempt
  self:_stop_ringing(key(call.callId, n))
  for token, page in pairs(self.pages) do
    if page.call_id == call.callId and page.attempt == n then
      self:_expire_page(token)
    end
  end
  -- Like Twilio: hanging up ends the call; the page sees its stream close.
  local status = (attempt and attempt.status == "in_progress") and "completed" or "canceled"
  self.engine:provider_status(call.callId, n, { status = status, reason = "hung up" })
  return true
end

local function page_file(name)
  return core.root .. "/providers/mock/" .. name
end

-- Every page and file of the mock phone is sent with these. The phone page's
-- URL carries its one-time token (?t=): no Referer may take it anywhere. The
-- pages run only their own files (no inline script or style, no other
-- origin), talk only to the origin they came from (phone.js streams to the
-- host it was loaded from: 'self' covers ws: and wss: there), and are framed
-- by nobody.
local CSP = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
  .. "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"

local function headers(content_type, cache)
  return {
    ["Content-Type"] = content_type,
    ["Cache-Control"] = cache,
    ["Content-Security-Policy"] = CSP,
    ["X-Content-Type-Options"] = "nosniff",
    ["Referrer-Policy"] = "no-referrer",
    ["X-Frame-Options"] = "DENY",
  }
end

-- A file of providers/mock/ (a plain name: no folders, no "..") with those
-- headers; status, body, headers.
local function serve_file(name, cache)
  local f = name:match("^[%w_][%w_%-%.]*$") and not name:find("..", 1, true) and io.open(page_file(name), "rb")
  local body = f and f:read("a")
  if f then
    f:close()
  end
  if not body then
    return 404, json.encode(http.error_body("not_found", "no such file")), headers("application/json", "no-store")
  end
  return 200, body, headers(http.content_type(name), cache)
end

function P:registerRoutes(srv)
  srv:get("/mock/static/{name}", function(req)
    return serve_file(req.params.name, "no-cache")
  end)

  -- A page to place a test call from the browser (local setups have no API token).
  srv:get("/mock/", function()
    return serve_file("dial.html", "no-store")
  end)

  -- /mock, as it is often typed: the form is /mock/ (its files are named
  -- relative to that).
  srv:get("/mock", function()
    local h = headers("text/plain; charset=utf-8", "no-store")
    h.Location = "/mock/"
    return 308, "", h
  end)

  srv:get("/mock/call/{id}", function()
    return serve_file("phone.html", "no-store")
  end)

  -- The page's requests refused, each the same way: the browser shows the
  -- message, and one log line says what and who (never the token sent).
  -- field: the request's field at fault (the link's token, the session),
  -- when one is.
  local function refuse(req, status, code, message, field)
    log.limited("warn", "mock page refused", { code = code, field = field, path = req.path, remote = req.remote },
      "mock page refused " .. code)
    return status, http.error_body(code, message, field)
  end
  local USED = "this call link was already used or is not valid"
  -- A page's own id (phone.js: 32 hex digits), kept with the link it
  -- answers: 1-64 letters, digits, "-" or "_". nil when it is one, else
  -- the 400 (status, body).
  local BAD_PAGE = "page must be the id the page's answer sent: 1-64 letters, digits, - or _"
  local function bad_page(req, page)
    if type(page) == "string" and #page <= 64 and page:match("^[%w_%-]+$") then
      return nil
    end
    return refuse(req, 400, "invalid_field", BAD_PAGE, "page")
  end
  local STOPPED = "the call stopped ringing"
  -- The page's POST body, a JSON object; else nil and the 400.
  local function page_body(req)
    local body = req:json_object()
    if not body then
      return nil, refuse(req, 400, "invalid_body", "the body must be a JSON object")
    end
    return body
  end

  -- Answers the link of token (entry: its page entry) for the page that
  -- names itself page (phone.js's own random id, or nil): -> the page's
  -- session, or nil and the refusal's status and body.
  local function answer_link(req, token, entry, page)
    if entry.declined then
      return nil, refuse(req, 410, "declined", "the call was declined from this link")
    end
    if entry.expires < timer.now() then
      self:_expire_page(token) -- told so again, until it is forgotten
      return nil, refuse(req, 410, "expired", STOPPED)
    end
    if self.engine.stopped then
      -- Not answered: the call stays as it was, for the next start.
      return nil, refuse(req, 503, "shutting_down", "callagent is shutting down")
    end
    -- One use; kept a while, so that a decline from it is told it was answered.
    entry.answered = true
    entry.page = page
    self:_expire_page(token)
    self:_stop_ringing(key(entry.call_id, entry.attempt))
    self.engine:provider_status(entry.call_id, entry.attempt, { status = "in_progress" })
    local stream_token, err = self.engine:prepare_stream(entry.call_id, entry.attempt)
    if not stream_token then
      return nil, refuse(req, 409, "not_ringing", "the call is no longer ringing: " .. tostring(err))
    end
    local session = crypto.random_token(18)
    self.sessions[session] = { call_id = entry.call_id, attempt = entry.attempt, pid = entry.pid }
    entry.session = session
    -- The page polls and hangs up with it while the call lasts, and reads
    -- the end; forgotten after a day.
    timer.after(86400000, function()
      self.sessions[session] = nil
    end):unref()
    return session, stream_token
  end

  -- page (optional): the page's own id, which a hang-up of a page left
  -- before the answer's reply came names (POST /mock/api/hangup).
  srv:post("/mock/api/answer", function(req)
    local body, status, err = page_body(req)
    if not body then
      return status, err
    end
    if body.page ~= nil then
      local st, rbody = bad_page(req, body.page)
      if st then
        return st, rbody
      end
    end
    local entry = type(body.token) == "string" and self.pages[body.token]
    if not entry or entry.call_id ~= body.callId or entry.answered then
      return refuse(req, 403, "invalid_token", USED, "token")
    end
    local session, stream_token, rbody = answer_link(req, body.token, entry, body.page)
    if not session then
      return stream_token, rbody
    end
    local base = self.app.url
    return 200, {
      streamUrl = base:gsub("^http", "ws") .. "/voice/stream",
      parameters = { callId = entry.call_id, attempt = tostring(entry.attempt), token = stream_token },
      pollUrl = "/mock/api/call/" .. entry.call_id .. "?s=" .. session,
      session = session,
    }
  end)

  -- Declining the call, as a real phone's reject: the attempt ends busy (as
  -- Twilio reports a rejected call), and the retry policy decides what comes
  -- next. {"status": "failed"} ends it failed instead (a call the network
  -- could not connect), for trying that retry too. Guarded as the answer is:
  -- by the link's token, which a page of another origin cannot know, and
  -- one action per link.
  local DECLINE_AS = { busy = "declined on the mock phone", failed = "failed on the mock phone (asked by its link)" }
  srv:post("/mock/api/decline", function(req)
    local body, status, err = page_body(req)
    if not body then
      return status, err
    end
    local status = body.status == nil and "busy" or body.status
    if not DECLINE_AS[status] then
      return refuse(req, 400, "invalid_field", 'status must be "busy" (the default) or "failed"', "status")
    end
    local entry = type(body.token) == "string" and self.pages[body.token]
    if not entry or entry.call_id ~= body.callId then
      return refuse(req, 403, "invalid_token", USED, "token")
    end
    if entry.answered then
      return refuse(req, 409, "answered", "the call was already answered from this link: it can no longer be declined")
    end
    if entry.declined then
      return refuse(req, 410, "declined", "the call was declined from this link")
    end
    if entry.expires < timer.now() then
      self:_expire_page(body.token)
      return refuse(req, 410, "expired", STOPPED)
    end
    if self.engine.stopped then
      return refuse(req, 503, "shutting_down", "callagent is shutting down")
    end
    self:_stop_ringing(key(entry.call_id, entry.attempt))
    self:_expire_page(body.token)
    local ok, err = self.engine:provider_status(entry.call_id, entry.attempt,
      { status = status, reason = DECLINE_AS[status] })
    if not ok then
      return refuse(req, 409, "not_ringing", "the call is no longer ringing: " .. tostring(err))
    end
    entry.declined = status
    log.info("mock phone declined", { call = entry.call_id, attempt = entry.attempt, status = status })
    local v = self.engine:call_view(entry.call_id) or {}
    -- The page says what comes next: another ring (under a new link) or the end.
    return 200, { callId = entry.call_id, attempt = entry.attempt, attemptStatus = status, status = v.status,
      nextAttemptAt = v.nextAttemptAt }
  end)

  -- The ringing page's view of its link, read by its token as the answer
  -- is: whether it still rings (link "ringing", or "answered", "declined",
  -- "expired": it stopped ringing), and what the page may show of the
  -- call: its id, the number called and the names it was placed with (the
  -- agent says them on the call), never the prompt or the metadata.
  srv:get("/mock/api/ring/{id}", function(req)
    local token = (req.query or {}).t
    local entry = type(token) == "string" and self.pages[token]
    if not entry or entry.call_id ~= req.params.id then
      return refuse(req, 403, "invalid_token", USED, "t")
    end
    local v = self.engine:call_view(entry.call_id) or {}
    local a = (v.attempts or {})[entry.attempt] or {}
    local link = "ringing"
    if entry.answered then
      link = "answered"
    elseif entry.declined then
      link = "declined"
    elseif entry.expires < timer.now() or a.status ~= "dialing" then
      link = "expired"
    end
    -- A call over (failed, say: its model refused the session while it
    -- rang) says why, as the page's end does for an answered one.
    return 200, { callId = entry.call_id, attempt = entry.attempt, link = link, attemptStatus = a.status,
      status = v.status, nextAttemptAt = v.status == "queued" and v.nextAttemptAt or nil, to = v.to,
      calleeName = v.calleeName, callerName = v.callerName,
      lastError = link == "expired" and v.status ~= "completed" and FINAL[v.status] and v.lastError or nil }
  end)

  srv:get("/mock/api/call/{id}", function(req)
    local s = self.sessions[(req.query or {}).s or ""]
    if not s or s.call_id ~= req.params.id then
      return refuse(req, 403, "invalid_session", "unknown page session", "s")
    end
    local v = self.engine:call_view(s.call_id)
    if not v then
      return refuse(req, 404, "not_found", "no such call")
    end
    return 200, {
      callId = v.callId,
      status = v.status,
      to = v.to,
      calleeName = v.calleeName,
      transcript = v.transcript,
      report = v.report,
      endReason = v.endReason,
      lastError = v.lastError,
      -- The page's own why (its microphone lost), which it shows already.
      lastErrorIsPages = v.lastError == MIC_LOST or nil,
    }
  end)

  -- The page hung up. reason "microphone_lost": its microphone stopped
  -- mid-call (unplugged, its permission taken back), and the page hung up
  -- rather than go on in silence; the call's lastError says so. The page
  -- sends this before it closes its stream, so that the stream's stop is
  -- not the end, without a why.
  local HANGUP_WHY = { microphone_lost = MIC_LOST }
  -- The session of a page left before its answer's reply came: {callId,
  -- token, page}. Its link not answered yet (the answer still on its way,
  -- or never sent): answered now, to be hung up at once, as a refused
  -- microphone's is. Answered by that page: its session. Answered by
  -- another page (tab): nil (409), that call is not this page's.
  local function left_session(req, body)
    local st, rbody = bad_page(req, body.page)
    if st then
      return nil, st, rbody
    end
    local entry = type(body.token) == "string" and self.pages[body.token]
    if not entry or entry.call_id ~= body.callId then
      return nil, refuse(req, 403, "invalid_token", USED, "token")
    end
    if entry.answered then
      if entry.page ~= body.page then
        return nil, refuse(req, 409, "answered", "the call was answered from this link by another page")
      elseif not entry.session then
        return nil, refuse(req, 409, "answered", "this page's answer failed: it has no session to hang up")
      end
      return entry.session
    end
    local session, status, rbody = answer_link(req, body.token, entry, body.page)
    if session then
      log.info("mock phone page left while answering: hanging up", { call = entry.call_id, attempt = entry.attempt })
    end
    return session, status, rbody
  end
  srv:post("/mock/api/hangup", function(req)
    local body, status, err = page_body(req)
    if not body then
      return status, err
    end
    if body.reason ~= nil and not HANGUP_WHY[body.reason] then
      return refuse(req, 400, "invalid_field", 'reason must be "microphone_lost" when given', "reason")
    end
    local session = body.session
    if session == nil and body.token ~= nil then
      local st, rbody
      session, st, rbody = left_session(req, body)
      if not session then
        return st, rbody
      end
    end
    local s = type(session) == "string" and self.sessions[session]
    if not s or s.call_id ~= body.callId then
      return refuse(req, 403, "invalid_session", "unknown page session", "session")
    end
    local why = HANGUP_WHY[body.reason]
    if why then
      log.info("mock phone lost its microphone: hanging up", { call = s.call_id, attempt = s.attempt })
    end
    -- Streaming: hung up as a vendor whose call's stream stopped, why in
    -- lastError. Not (yet) streaming, or over: as any hang-up of the page
    -- (stream_over would end an answered call whose stream has not started
    -- failed, no_stream).
    local streaming = why and self.engine:streaming(s.call_id, s.attempt)
    if not (streaming and s.pid and self.engine:stream_over(s.call_id, s.attempt, s.pid, why)) then
      self.engine:provider_status(s.call_id, s.attempt, { status = "completed", reason = "the page hung up" })
    end
    return 204
  end)
end

return P
