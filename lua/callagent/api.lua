--- callagent.api: the REST API (JSON in and out).
--
--   POST /v1/calls                {to, prompt, timezone?, locale?, callerName?,
--                                 calleeName?, voice?, metadata?} -> 201 {callId, status, hint?}
--                                 with Location: /v1/calls/{callId};
--                                 with an Idempotency-Key, sent again: the same call
--   GET  /v1/calls/{callId}       the call record (see lua/callagent/calls.lua)
--   GET  /v1/calls?status=&limit=&cursor=   newest first: {calls, nextCursor?};
--                                 any other query parameter is 400 unknown_field
--   POST /v1/calls/{callId}/hangup          -> 202 {callId, status}
--                                 (the POSTs take no query parameter: 400 unknown_field)
--   GET  /healthz                 {ok, starting, paused, version, provider, activeCalls, uptimeSec, loop};
--                                 {ok, starting, paused} to a request /v1 would refuse
--
-- With server.apiToken set, every /v1 request needs "Authorization: Bearer
-- <token>" (401 otherwise); without it, /v1 answers only requests made to a
-- loopback host name. A web page of another origin is refused either way
-- (403), and POST /v1/calls takes only Content-Type application/json,
-- uncompressed (415).
-- Errors: {"error": {"code", "message", "field"?}} with 400 (validation),
-- 401, 403, 404, 405, 409, 411, 413, 415, 422 (an Idempotency-Key reused),
-- 500 (the store), 501 (no Idempotency-Key support) and 503 (starting, paused,
-- shutting down, too many connections): README.md, "Errors".
local json = require "callagent.json"
local http = require "callagent.http"
local crypto = require "callagent.crypto"
local core = require "callagent.core"
local tz = require "callagent.tz"
local config = require "callagent.config"
local log = require "callagent.log"
local task = require "callagent.task"
-- Store reads through store.call: a store that raises (a backend's way to
-- say "disk full") failed to read, 500 store_failed like one that says so.
local store_call = require("callagent.store").call

local M = {}

-- x to the nearest 1/per.
local function round(x, per)
  return math.floor(x * per + 0.5) / per
end

local LIMITS = { prompt = 8000, name = 120, metadata = 8192, metadata_depth = 20 }
local ALLOWED = {
  to = true, prompt = true, timezone = true, locale = true,
  callerName = true, calleeName = true, voice = true, metadata = true,
}
-- The query parameters of GET /v1/calls.
local LIST_PARAMS = { status = true, limit = true, cursor = true }
local STATUSES = {
  queued = true, dialing = true, in_progress = true, completed = true,
  busy = true, no_answer = true, failed = true, canceled = true,
}

-- What a message quotes of a name the client sent (a field, a query
-- parameter, a call id, a path): its first 64 bytes and "…". A 200 KB field
-- name made a 400 KB log line.
local function quote(s)
  return http.cut(s, 64)
end

local function err(status, code, message, field)
  -- A message may quote the request (a call id from the path): kept UTF-8.
  return status, { error = { code = code, message = json.utf8(message), field = field } }
end

-- Any control character; one other than tab, newline and carriage return.
local CONTROL = "[%z\1-\31\127]"
local CONTROL_IN_TEXT = "[%z\1-\8\11\12\14-\31\127]"
-- The same beyond ASCII, in UTF-8 (text is checked UTF-8 first): the C1
-- controls U+0080-U+009F, and the line and paragraph separators U+2028/9.
local C1 = "\194[\128-\159]"
local LINE_SEPARATOR = "\226\128[\168\169]"
-- Unicode's spaces that are not ASCII (and the zero-width ones): a prompt of
-- nothing else says nothing. The line and paragraph separators (U+2028/9)
-- are spaces too: a prompt may hold them, but not only them.
local WIDE_SPACES = { "\194\160", "\225\154\128", "\226\128[\128-\141]", LINE_SEPARATOR, "\226\128\175",
  "\226\129\159", "\227\128\128", "\239\187\191" }

local function blank(s)
  for _, p in ipairs(WIDE_SPACES) do
    s = s:gsub(p, "")
  end
  return not s:match("%S")
end

-- 503 while the app starts (engine.starting), with when to ask again.
local function starting(what)
  local status, body = err(503, "starting", "callagent is starting: send " .. what .. " again in a moment")
  return status, body, { ["Retry-After"] = "2" }
end

-- Whether v holds more than budget values (its own, at any depth): then
-- its JSON is longer than 2 * budget bytes, each value taking a byte and a
-- separator at least. Walks at most budget + 1 of them.
local function more_values_than(v, budget)
  local n = 0
  local function walk(t)
    for _, x in pairs(t) do
      n = n + 1
      if n > budget or (type(x) == "table" and walk(x)) then
        return true
      end
    end
    return false
  end
  return type(v) == "table" and walk(v)
end

local function voice_ok(v)
  for _, x in ipairs(config.voices) do
    if x == v then
      return true
    end
  end
  return false
end

--- Checks a POST /v1/calls body: the input, or nil, status, error body.
function M.validate_call(body)
  if type(body) ~= "table" or json.is_array(body) or (#body > 0) then
    return nil, err(400, "invalid_body", "the body must be a JSON object")
  end
  -- JSON is UTF-8, and all of the input goes on: to the model, the
  -- record, webhooks. Text that is not is refused, not repaired. Of several
  -- fields at fault, the first by name in byte order is named, every time
  -- (pairs' order changes from run to run): the least name of those at
  -- fault, found in one pass (sorting 20,000 unknown names took 60 ms).
  local first, first_status, first_body
  for k, v in pairs(body) do
    local name = tostring(k)
    if first == nil or name < first then
      local status, ebody
      if not json.is_utf8(k) then
        status, ebody = err(400, "invalid_body", "a field name is not valid UTF-8")
      elseif not ALLOWED[k] then
        status, ebody = err(400, "unknown_field", "unknown field '" .. quote(name) .. "'", name)
      elseif not json.is_utf8(v) then
        status, ebody = err(400, "invalid_" .. k, k .. " is not valid UTF-8 text", k)
      end
      if status then
        first, first_status, first_body = name, status, ebody
      end
    end
  end
  if first then
    return nil, first_status, first_body
  end
  -- null is "not given", as clients that write None/nil/undefined send it.
  local given = {}
  for k, v in pairs(body) do
    if v ~= json.null then
      given[k] = v
    end
  end
  body = given
  local input = {}
  if not config.is_e164(body.to) then
    return nil, err(400, "invalid_to", "to must be an E.164 phone number like +14155550100", "to")
  end
  input.to = body.to
  if type(body.prompt) ~= "string" or blank(body.prompt) then
    return nil, err(400, "invalid_prompt", "prompt must be a non-empty string", "prompt")
  end
  if #body.prompt > LIMITS.prompt then
    return nil, err(400, "invalid_prompt", "prompt is longer than " .. LIMITS.prompt .. " bytes", "prompt")
  end
  if body.prompt:find(CONTROL_IN_TEXT) or body.prompt:find(C1) then
    return nil, err(400, "invalid_prompt", "prompt holds a control character (only tab and line breaks are text)", "prompt")
  end
  input.prompt = body.prompt
  if body.timezone ~= nil then
    if type(body.timezone) ~= "string" or not tz.valid(body.timezone) then
      return nil, err(400, "invalid_timezone", "timezone must be an IANA time zone like Europe/Paris", "timezone")
    end
    input.timezone = body.timezone
  end
  if body.locale ~= nil then
    if not config.is_locale(body.locale) then
      return nil, err(400, "invalid_locale", "locale must be a language tag like en-US", "locale")
    end
    input.locale = body.locale
  end
  for _, k in ipairs({ "callerName", "calleeName" }) do
    local v = body[k]
    if v ~= nil then
      if type(v) ~= "string" or #v > LIMITS.name then
        return nil, err(400, "invalid_" .. k, k .. " must be a string of at most " .. LIMITS.name .. " bytes", k)
      end
      if v:find(CONTROL) or v:find(C1) or v:find(LINE_SEPARATOR) then
        return nil, err(400, "invalid_" .. k, k .. " must be one line of text, without control characters", k)
      end
      -- A blank name (a form's empty field) names nobody: as null, not
      -- given, rather than "a call to +1... ()" in the notification and
      -- "on behalf of   " in what the model is told.
      if not blank(v) then
        input[k] = v
      end
    end
  end
  if body.voice ~= nil then
    if type(body.voice) ~= "string" or not voice_ok(body.voice) then
      return nil, err(400, "invalid_voice", "voice must be one of " .. table.concat(config.voices, ", "), "voice")
    end
    input.voice = body.voice
  end
  if body.metadata ~= nil then
    if type(body.metadata) ~= "table" or #body.metadata > 0 or json.is_array(body.metadata) then
      return nil, err(400, "invalid_metadata", "metadata must be a JSON object", "metadata")
    end
    -- Too many values to fit is said before they are checked and encoded,
    -- twice over: 130,000 numbers (a 256 KiB body) took the event loop,
    -- every live call's audio, 200 ms to refuse.
    if more_values_than(body.metadata, LIMITS.metadata // 2) then
      return nil, err(400, "invalid_metadata", "metadata is larger than " .. LIMITS.metadata
        .. " bytes (it holds more than " .. LIMITS.metadata // 2 .. " values)", "metadata")
    end
    local ok, why = json.check(body.metadata, LIMITS.metadata_depth)
    if not ok then
      return nil, err(400, "invalid_metadata", "metadata " .. why, "metadata")
    end
    if #json.encode(body.metadata) > LIMITS.metadata then
      return nil, err(400, "invalid_metadata", "metadata is larger than " .. LIMITS.metadata .. " bytes", "metadata")
    end
    input.metadata = body.metadata
  end
  return input
end

-- The host name of a Host header ("[::1]:4545" -> "::1"), lowercase; nil
-- when the header is not one host and an optional port. Two Host headers
-- arrive joined by a comma, and one smuggled in through the URL (an encoded
-- line break that libwebsockets decodes before it reads the headers) ends in
-- " HTTP/1.1": neither names a host.
local function host_name(host)
  local name, port = host:match("^%[([%x:%.]+)%](.*)$")
  if not name then
    name, port = host:match("^([%w%.%-_]+)(.*)$")
  end
  if not name or not port:match("^:?%d*$") then
    return nil
  end
  return name:lower()
end

--- True when a Host header names this machine: localhost (and names under
-- .localhost), 127.0.0.0/8 or ::1. A page that rebinds a DNS name of its own
-- to 127.0.0.1 sends its own name.
function M.loopback_host(host)
  local name = host_name(host)
  return name ~= nil and (("." .. name):match("%.localhost%.?$") ~= nil or name == "::1"
    or name:match("^127%.%d+%.%d+%.%d+$") ~= nil)
end

-- The Origin a browser sends from a page of this server itself: at the
-- host it asked for, or at the public URL (through a proxy that rewrote Host).
local function same_origin(origin, host, public)
  origin = origin:lower()
  host = host and host:lower()
  if host ~= nil and (origin == "http://" .. host or origin == "https://" .. host) then
    return true
  end
  local base = public and public:lower():match("^https?://[^/?#]+")
  return base ~= nil and origin == base
end

-- v as text with keys sorted at every level: equal requests, equal text
-- (-0 and 0 too).
local function canonical(v, out)
  if type(v) ~= "table" then
    out[#out + 1] = json.encode(type(v) == "number" and math.tointeger(v) or v)
    return out
  end
  local n, keys = #v, {}
  for k in pairs(v) do
    keys[#keys + 1] = k
  end
  if json.is_array(v) or (n > 0 and #keys == n) then -- decoded arrays: keys 1..n
    out[#out + 1] = "["
    for i = 1, n do
      canonical(v[i], out)
      out[#out + 1] = ","
    end
    out[#out + 1] = "]"
    return out
  end
  table.sort(keys, function(a, b)
    return tostring(a) < tostring(b)
  end)
  out[#out + 1] = "{"
  for _, k in ipairs(keys) do
    out[#out + 1] = json.encode(tostring(k))
    out[#out + 1] = ":"
    canonical(v[k], out)
    out[#out + 1] = ","
  end
  out[#out + 1] = "}"
  return out
end

--- The fingerprint of a validated call request, kept with its Idempotency-Key.
function M.fingerprint(input)
  return crypto.to_hex(crypto.sha256(table.concat(canonical(input, {}))))
end

-- The 400 for a query parameter a route does not take (known: the names it
-- takes), or nil. Of several, the first by name (pairs' order changes from
-- run to run). Empty ones ("?&&") name nothing; nor does "/", which
-- libwebsockets 4.1 makes of a query that ends with "&" ("?limit=5&").
local function unknown_param(req, known, takes)
  local unknown
  for name in pairs(req.query or {}) do
    if not known[name] and name ~= "" and name ~= "/" and (unknown == nil or name < unknown) then
      unknown = name
    end
  end
  if unknown then
    local name = json.utf8(unknown)
    return err(400, "unknown_field", "unknown query parameter '" .. quote(name) .. "' (" .. takes .. ")", name)
  end
end

-- The headers by which a proxy says it forwarded a request, as a refusal's
-- field names them.
local FORWARDED = { "X-Forwarded-For", "X-Forwarded-Host", "Forwarded", "Via", "X-Real-IP" }

--- Registers the API routes on an http server for the engine.
function M.register(srv, engine, cfg, opts)
  opts = opts or {}
  local token = cfg.server.apiToken
  -- Compared as SHA-256 digests, always 32 bytes: a compare of strings of
  -- unequal lengths ends at once, and the time a 401 takes would tell the
  -- token's length.
  local token_digest = token and crypto.sha256(token)

  local function authorized(req)
    if not token then
      return true
    end
    local h = req.headers.authorization or ""
    local given = h:match("^[Bb][Ee][Aa][Rr][Ee][Rr] +(.+)$")
    return given ~= nil and crypto.constant_time_eq(crypto.sha256(given), token_digest)
  end

  -- A browser sends any page's POST (as "no-cors"), and its GETs once a
  -- name of the page's resolves to 127.0.0.1: both are refused. The code,
  -- the message and the header at fault.
  local function refused_browser(req)
    local h = req.headers
    if h.origin and not same_origin(h.origin, h.host, opts.public_url and opts.public_url()) then
      return "forbidden_origin", "requests from a web page of another origin are refused", "Origin"
    end
    -- HTTP/1.1 requires Host: a request without one names no loopback host.
    if not token and not (h.host and M.loopback_host(h.host)) then
      return "forbidden_host", "without server.apiToken the API answers only requests to a loopback host "
        .. "(127.0.0.1, [::1] or localhost)", "Host"
    end
    -- A proxy that rewrites Host to 127.0.0.1 still says it forwarded: in
    -- Via (RFC 9110 has every proxy send it), or as nginx's setups do, in
    -- X-Real-IP alone.
    if not token then
      for _, name in ipairs(FORWARDED) do
        if h[name:lower()] then
          return "forbidden_host", "without server.apiToken the API answers no request a proxy forwarded", name
        end
      end
    end
  end

  -- A request without the token (a guess at it, or none): anyone may send
  -- them as fast as they like, so the lines are rate-limited (log.limited),
  -- one kind for all paths. Never the token sent.
  local function log_unauthorized(req)
    log.limited("warn", "api: unauthorized request", { method = req.method, path = req.path, remote = req.remote })
  end

  -- The answer to a request the API refuses before reading it (logged), or
  -- nil: a web page's, or one without the token.
  local function refusal(req)
    local code, message, field = refused_browser(req)
    if code then
      log.limited("warn", "api: request refused", { method = req.method, path = req.path, remote = req.remote,
        code = code, field = field, origin = req.headers.origin, host = req.headers.host },
        "api: request refused " .. code)
      return err(403, code, message, field)
    end
    if not authorized(req) then
      log_unauthorized(req)
      return 401, { error = { code = "unauthorized", message = "missing or wrong bearer token",
        field = "Authorization" } }, {
        ["WWW-Authenticate"] = 'Bearer realm="callagent"',
      }
    end
  end

  local function guard(fn)
    return function(req)
      local rs, rb, rh = refusal(req)
      if rs then
        return rs, rb, rh
      end
      local status, body, headers = fn(req)
      -- Every refusal of the client's input is logged once, here, with what
      -- was wrong (the message quotes the request, never a secret).
      local e = type(status) == "number" and status >= 400 and status < 500 and type(body) == "table" and body.error
      if type(e) == "table" then
        log.warn("api: bad request", { method = req.method, path = quote(req.path), status = status, code = e.code,
          field = e.field and quote(e.field), error = e.message })
      end
      return status, body, headers
    end
  end

  -- A /v1 path no route has (404), or a method its route does not take
  -- (405): refused as any /v1 request first (403, 401), so that one without
  -- the token learns nothing of the routes; then logged as the other
  -- refusals are. req.path has no query (where a token may have been put).
  srv:on_no_route(function(req, status, e)
    local path = req.path
    if path == "/v1" or path:sub(1, 4) == "/v1/" then
      local rs, rb, rh = refusal(req)
      if rs then
        return rs, rb, rh
      end
      log.warn("api: bad request", { method = req.method, path = quote(path), status = status, code = e.code,
        error = e.message })
    end
  end)

  -- The Idempotency-Keys whose request is being placed: key -> the
  -- requests with it that wait their turn.
  local keys_in_flight = {}
  local place

  srv:post("/v1/calls", guard(function(req)
    -- A call is placed for real: a parameter the client thought did
    -- something (?dryRun=true, ?test=1) is refused, not ignored.
    local qs, qb = unknown_param(req, {}, "POST /v1/calls takes none: the call is its JSON body")
    if qs then
      return qs, qb
    end
    local ctype = req:content_type()
    if not (ctype:match("^%s*application/json%s*;") or ctype:match("^%s*application/json%s*$")) then
      return err(415, "unsupported_media_type", "the body must be JSON, sent with Content-Type: application/json",
        "Content-Type")
    end
    -- A compressed body (gzip) is not read as compressed: it was refused
    -- for the bytes it came as ("a NUL byte"), naming nothing the client got
    -- wrong, and one labeled so by mistake was taken as it is.
    local coding = req:header("content-encoding")
    if coding ~= nil and coding:lower() ~= "identity" then
      local status, ebody = err(415, "unsupported_media_type", "the body must be sent uncompressed: Content-Encoding "
        .. quote(json.utf8(coding)) .. " is not supported", "Content-Encoding")
      return status, ebody, { ["Accept-Encoding"] = "identity" } -- RFC 7694
    end
    local body, jerr = req:json_object()
    if not body then
      if jerr:match("^EJSON: ") then
        return err(400, "invalid_json", "the body is not valid JSON: " .. jerr:sub(8))
      end
      return err(400, "invalid_body", "the body must be a JSON object")
    end
    local input, status, ebody = M.validate_call(body)
    if not input then
      return status, ebody
    end
    -- Idempotency-Key: a request sent again (a client that timed out
    -- waiting) gets the call it created, not a second phone call.
    local key = req.headers["idempotency-key"]
    if key ~= nil then
      -- Two keys joined into one value (RFC 9110 5.3: a proxy may join the
      -- lines of a header sent twice, with ", ") would be taken for a
      -- third key. Said first: the space of ", " is not what is wrong.
      if key:find(",", 1, true) then
        return err(400, "invalid_idempotency_key",
          "Idempotency-Key must be one key, without a comma (two keys joined into one header)", "Idempotency-Key")
      end
      if #key < 1 or #key > 255 or key:find("[^\33-\126]") then
        return err(400, "invalid_idempotency_key",
          "Idempotency-Key must be 1 to 255 printable ASCII characters, without spaces", "Idempotency-Key")
      end
      if not engine.store.find_idempotent then
        return err(501, "idempotency_unsupported", "this store keeps no Idempotency-Keys", "Idempotency-Key")
      end
      -- One request with a key at a time, from its lookup to its new call
      -- stored: with a store that waits on the network (its lookup or its
      -- write yields), two sent at once both found no call for the key, and
      -- both placed one. The next waits, then finds the call made.
      while keys_in_flight[key] do
        task.wait_in(keys_in_flight[key])
      end
      keys_in_flight[key] = {}
      local res = table.pack(pcall(place, input, { key = key, fingerprint = M.fingerprint(input) }))
      local waiting = keys_in_flight[key]
      keys_in_flight[key] = nil
      for _, wake in ipairs(waiting) do
        wake()
      end
      if not res[1] then
        error(res[2], 0)
      end
      return table.unpack(res, 2, res.n)
    end
    return place(input, nil)
  end))

  -- Places the call of a validated POST /v1/calls (idem: its Idempotency-Key
  -- and fingerprint), or answers with the call the key made before.
  function place(input, idem)
    if idem then
      local key = idem.key
      local prev, ferr = store_call(engine.store, "find_idempotent", key)
      if ferr then
        log.error("api: idempotency key could not be read", { error = ferr })
        return err(500, "store_failed", "the Idempotency-Key could not be looked up")
      end
      if prev and prev.fingerprint ~= idem.fingerprint then
        return err(422, "idempotency_key_reused", "this Idempotency-Key was sent with another request (call "
          .. prev.call_id .. ")", "Idempotency-Key")
      end
      local view, verr = nil, nil
      if prev then
        view, verr = engine:call_view(prev.call_id)
      end
      if verr then
        log.error("api: call could not be read", { call = prev.call_id, error = verr })
        return err(500, "store_failed", "the call of this Idempotency-Key could not be read")
      end
      if view then
        return 201, { callId = view.callId, status = view.status, hint = view.hint },
          { Location = "/v1/calls/" .. view.callId, ["Idempotent-Replayed"] = "true" }
      end
    end
    if engine.starting then
      -- Until the public URL is known (a tunnel opening) and the last run's
      -- calls are loaded, a call would be placed with callbacks nobody can
      -- reach, and then taken for one the restart interrupted.
      return starting("the call")
    end
    if engine.paused then
      -- The vendor could not reach us (the tunnel is down): the callee would
      -- answer a call that hears nothing.
      local status, body = err(503, "paused", "calls are paused: " .. engine.paused
        .. "; send the call again in a moment")
      return status, body, { ["Retry-After"] = "5" }
    end
    local call, cerr = engine:create(input, idem)
    if not call and tostring(cerr):match("^ESTOPPED") then
      return err(503, "shutting_down", "callagent is shutting down: send the call again to the next run")
    elseif not call then
      log.error("api: call could not be stored", { error = cerr })
      return err(500, "store_failed", "the call could not be stored")
    end
    -- Stored and dialing: a 201 whatever a read of it says now (a 500 would
    -- have the client send it again, and the callee rung twice).
    local view = engine:call_view(call.id) or { callId = call.id, status = call.status, hint = call.hint }
    -- Where the new call is (RFC 9110 15.3.2), as GET /v1/calls/{callId}.
    return 201, { callId = view.callId, status = view.status, hint = view.hint }, { Location = "/v1/calls/" .. view.callId }
  end

  srv:get("/v1/calls", guard(function(req)
    local q = req.query or {}
    -- A parameter it does not know is refused, not ignored: a typo of
    -- status would list every call as if they had that one.
    local status, body = unknown_param(req, LIST_PARAMS, "GET /v1/calls takes status, limit and cursor")
    if status then
      return status, body
    end
    local status = q.status
    if status ~= nil and (type(status) ~= "string" or not STATUSES[status]) then
      return err(400, "invalid_status", "status must be one of queued, dialing, in_progress, completed, busy, no_answer, failed, canceled", "status")
    end
    local limit = 20
    if q.limit ~= nil then
      -- Digits only: tonumber would take 1e2, 0x10 and 10.0 as well.
      limit = type(q.limit) == "string" and q.limit:match("^%d%d?%d?$") and tonumber(q.limit)
      if not limit or limit < 1 or limit > 100 then
        return err(400, "invalid_limit", "limit must be an integer from 1 to 100", "limit")
      end
    end
    local calls, next_cursor = store_call(engine.store, "list_calls",
      { status = status, limit = limit, cursor = q.cursor })
    if not calls then
      if tostring(next_cursor):match("^ECURSOR") then
        return err(400, "invalid_cursor", "cursor must be a nextCursor from an earlier page", "cursor")
      end
      log.error("api: calls could not be read", { error = next_cursor })
      return err(500, "store_failed", "the calls could not be read")
    end
    local out = json.array({})
    for _, c in ipairs(calls) do
      local v = engine:list_view(c)
      -- The store filtered by the status it has; a call whose later status
      -- it has not taken yet is shown as it is, so not under the old one.
      if status == nil or v.status == status then
        out[#out + 1] = v
      end
    end
    return 200, { calls = out, nextCursor = next_cursor }
  end))

  -- The call's view; or the 404 when there is none, the 500 when the store
  -- could not read it (a call that exists is never "not found"). strict: a
  -- live call's transcript the store cannot read is a 500 too (a hang-up
  -- needs none, and goes on).
  local function view_or_error(id, strict)
    local v, verr = engine:call_view(id, strict)
    if v then
      return v
    elseif verr then
      log.error("api: call could not be read", { call = id, error = verr })
      return nil, err(500, "store_failed", "the call could not be read")
    end
    return nil, err(404, "not_found", "no call " .. quote(id))
  end

  srv:get("/v1/calls/{id}", guard(function(req)
    local v, status, body = view_or_error(req.params.id, true)
    if not v then
      return status, body
    end
    return 200, v
  end))

  srv:post("/v1/calls/{id}/hangup", guard(function(req)
    local qs, qb = unknown_param(req, {}, "POST /v1/calls/{callId}/hangup takes none")
    if qs then
      return qs, qb
    end
    local id = req.params.id
    local v, status, body = view_or_error(id)
    if not v then
      return status, body
    end
    if engine.starting and not engine.live[id] then
      return starting("the hang-up") -- the last run's calls are not loaded yet: this one may still be up
    end
    -- The engine's own record: it ends with the hang-up, and says so when
    -- the store cannot give the ended call back.
    local rec = engine.live[id]
    local ok = engine:hangup(id)
    if not ok then
      return err(409, "not_active", "the call has already ended (" .. v.status .. ")")
    end
    -- Read again: the hang-up may have waited on the vendor (and the app
    -- may have stopped meanwhile).
    v = engine:call_view(id) or rec or v
    return 202, { callId = id, status = v.status }
  end))

  srv:get("/healthz", function(req)
    local health = {
      ok = true,
      -- Still opening its tunnel or picking up the last run's calls: POST
      -- /v1/calls answers 503 until then. A readiness check waits for false.
      starting = engine.starting and true or false,
      -- Calls paused (the public tunnel is down, being opened again): POST
      -- /v1/calls answers 503 paused, and retries wait, until false.
      paused = engine.paused ~= nil,
    }
    -- The rest only to whom the API would answer (the token, or without
    -- one a loopback request): through a tunnel anyone on the internet
    -- asked how many calls were live, since when callagent ran, and its
    -- version. Not logged: health checks ask all the time. But a wrong
    -- token is a guess at it, logged as one at /v1 is (the short answer
    -- tells the guesser nothing either way).
    if refused_browser(req) then
      return 200, health
    end
    if not authorized(req) then
      if req.headers.authorization then
        log_unauthorized(req)
      end
      return 200, health
    end
    local l = core.loop_stats()
    for k, v in pairs({
      version = core.version,
      provider = opts.provider_name,
      activeCalls = engine:active_count(),
      uptimeSec = math.floor(core.time() - engine.started_at),
      -- The event loop's load: the share of the last window (10 s or more)
      -- it was busy, its longest iteration then (what arrived during it
      -- waited up to that long), and counters since start, with the loop's
      -- own clock to diff them over.
      loop = {
        utilization = round(l.utilization, 1e3),
        maxIterationMs = round(l.max_iteration_ms, 1e2),
        windowSec = round(l.window_s, 1e1),
        iterations = l.iterations,
        busySec = round(l.busy_s, 1e3),
        slowIterations = l.slow,
        slowSec = round(l.slow_s, 1e3),
        uptimeSec = round(l.uptime_s, 1e3),
      },
    }) do
      health[k] = v
    end
    return 200, health
  end)
end

return M
