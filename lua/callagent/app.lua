--- callagent.app: a callagent service - configuration, provider, store, call
-- engine, REST API and telephony webhooks on one HTTP server.
--
--   local callagent = require "callagent"
--   local app = assert(callagent.app("callagent.json"))   -- or a config table
--   app:tool{                                  -- a function the voice model may call
--     name = "lookup_order",
--     description = "Look up an order by its number",
--     parameters = { type = "object", properties = { number = { type = "string" } }, required = { "number" } },
--     handler = function(args, call) return { status = "shipped" } end,  -- may wait (fetch...)
--   }
--   app:on("status", function(call, from, to) end)    -- every status change
--   app:on("report", function(call, report) end)      -- report_call received
--   app:on("transcript", function(call_id, line) end) -- {role, text, at}
--   app:on("ended", function(call) end)               -- final state
--   app:routes(function(srv) srv:get("/hello", fn) end)  -- routes of your own
--   assert(app:start())        -- listens; app.url is the local base URL
--   app:create_call{ to = "+14155550100", prompt = "..." }   -- same as POST /v1/calls
--   app:stop()   inside a task it waits for the hang-ups (grace - 5 s at most), the
--                requests in progress (up to 1 s) and the notifications the
--                hang-ups send (the rest, 1 s at least, up to 2 s); from a plain
--                callback the hang-ups go on in the background; a second stop
--                inside a task returns once the first is done
--
-- opts (second argument of callagent.app): provider_dirs (extra folders with
-- provider files), public_url = fn(local_url) -> URL the vendor reaches (for
-- local setups and tests), notify = {attempts, base_delay_ms, timeout_ms, sweep_ms},
-- max_connections (4096), no_shutdown_hook,
-- gc_pause (the Lua collector's pause set by app:start(), percent; 130),
-- loop_watch_ms (10000: how often the event loop's load is checked; a
-- warning is logged, at most once a minute, when it was 90% busy or one
-- iteration took 250 ms; 0: never), stream_start_ms (10000: a media stream
-- that has not sent `start` by then is closed with 1008, as is one whose first
-- message is neither `connected` nor `start`, binary ones included).
--
-- Routes: the REST API (lua/callagent/api.lua), and for the provider
-- POST /voice, POST /status and the WebSocket /voice/stream (Twilio Media
-- Streams protocol), plus whatever the provider's registerRoutes adds.
local http = require "callagent.http"
local config_mod = require "callagent.config"
local providers = require "callagent.providers"
local store_mod = require "callagent.store"
local calls = require "callagent.calls"
local notify = require "callagent.notify"
local api = require "callagent.api"
local json = require "callagent.json"
local url = require "callagent.url"
local log = require "callagent.log"
local runtime = require "callagent.runtime"
local timer = require "callagent.timer"
local task = require "callagent.task"

local M = {}
local App = {}
App.__index = App

--- app, or nil and a message naming the config key at fault.
function M.new(cfg, opts)
  opts = opts or {}
  local err
  if type(cfg) == "string" then
    cfg, err = config_mod.load_file(cfg)
  else
    cfg, err = config_mod.normalize(cfg)
  end
  if not cfg then
    return nil, err
  end
  local provider
  provider, err = providers.load(cfg.telephony.provider, cfg, opts.provider_dirs)
  if not provider then
    return nil, err
  end
  return setmetatable({
    config = cfg,
    provider = provider,
    tools = {},
    handlers = {},
    opts = opts,
  }, App)
end

-- JSON Schema keywords whose value is an array. An empty Lua table encodes
-- as {}, and the model service refuses a schema with `"required": {}` (and
-- the whole session with it): each empty one becomes an empty array.
local SCHEMA_ARRAYS = { required = true, enum = true, anyOf = true, oneOf = true, allOf = true, prefixItems = true }
-- Keywords whose value maps names (of properties, of definitions) to schemas.
local SCHEMA_MAPS = { properties = true, patternProperties = true, ["$defs"] = true, definitions = true }

local function schema_arrays(v, depth)
  if type(v) ~= "table" or depth > 32 then
    return v
  end
  local out = json.is_array(v) and json.array({}) or {}
  for k, x in pairs(v) do
    if SCHEMA_ARRAYS[k] and type(x) == "table" and next(x) == nil then
      out[k] = json.array({})
    elseif SCHEMA_MAPS[k] and type(x) == "table" then
      out[k] = {}
      for name, sub in pairs(x) do
        out[k][name] = schema_arrays(sub, depth + 1)
      end
    else
      out[k] = schema_arrays(x, depth + 1)
    end
  end
  return out
end

function App:tool(def)
  assert(type(def) == "table", "app:tool needs a table")
  assert(type(def.name) == "string" and def.name:match("^[%a_][%w_]*$"), "tool name must be an identifier")
  -- The model service refuses a session whose tools it cannot take (a
  -- function name over 64 characters, two of one name): every call would
  -- fail at its start. Refused here, where the app's author sees it.
  assert(#def.name <= 64, "tool name must be at most 64 characters")
  assert(def.name ~= "report_call", "report_call is built in")
  for _, t in ipairs(self.tools) do
    assert(t.name ~= def.name, "a tool named " .. def.name .. " was added already")
  end
  assert(type(def.handler) == "function", "tool handler must be a function")
  assert(not self.engine, "add tools before start()")
  self.tools[#self.tools + 1] = {
    name = def.name,
    description = def.description or "",
    parameters = schema_arrays(def.parameters or { type = "object", properties = {} }, 0),
    handler = def.handler,
  }
  return self
end

--- fn(srv) runs before the server listens: add routes of your own.
function App:routes(fn)
  assert(type(fn) == "function", "app:routes needs a function")
  assert(not self.server, "add routes before start()")
  self.extra_routes = self.extra_routes or {}
  self.extra_routes[#self.extra_routes + 1] = fn
  return self
end

-- The events the engine emits: a handler for another name (a typo) would
-- never run.
local EVENTS = { "status", "transcript", "report", "bargein", "error", "ended" }

function App:on(event, fn)
  local known = false
  for _, e in ipairs(EVENTS) do
    known = known or e == event
  end
  if not known then
    error(string.format('app:on: no event %q (the events: %s)', tostring(event), table.concat(EVENTS, ", ")), 2)
  end
  assert(type(fn) == "function", "app:on needs a function")
  local list = self.handlers[event] or {}
  list[#list + 1] = fn
  self.handlers[event] = list
  return self
end

function App:_emit(event, ...)
  for _, fn in ipairs(self.handlers[event] or {}) do
    local ok, e = xpcall(fn, debug.traceback, ...)
    if not ok then
      log.error("event handler failed", { event = event, error = e })
    end
  end
end

function App:public_url()
  return self.public_base or self.url
end

-- The request as providers see it: path, raw_query, headers, body, method.
local function provider_req(req)
  return req
end

function App:_routes(srv)
  local engine, provider = self.engine, self.provider

  -- The webhook URLs' callId and attempt, as we wrote them: one string each
  -- (a repeated parameter arrives as a list), the attempt in decimal digits.
  -- Else the 400 to answer. An attempt of "1.0" or "abc" was taken as the
  -- float 1.0 or as the current attempt: "1.0" keyed a second bridge, with a
  -- model session of its own, beside the attempt's.
  local function call_query(req, what)
    local q = req.query or {}
    for _, k in ipairs({ "callId", "attempt" }) do
      if type(q[k]) ~= "string" and (k == "callId" or q[k] ~= nil) then
        log.limited("warn", what .. " with a bad query", { field = k, remote = req.remote })
        return nil, 400, { error = { code = "bad_request", message = k .. " must be given once in the query", field = k } }
      end
    end
    local n = q.attempt and q.attempt:find("^%d+$") and #q.attempt <= 9 and math.tointeger(tonumber(q.attempt))
    if q.attempt and not n then
      log.limited("warn", what .. " with a bad query", { field = "attempt", remote = req.remote })
      return nil, 400, { error = { code = "bad_request", message = "attempt must be a whole number", field = "attempt" } }
    end
    return q, n
  end

  -- A webhook's query, once the provider has taken the request for its
  -- vendor's; else the 403 or 400 to answer.
  local function webhook_query(req, what)
    local ok, why, field = provider:validateRequest(provider_req(req), self:public_url())
    if not ok then
      log.limited("warn", what .. " refused", { reason = why, remote = req.remote })
      return nil, 403, { error = { code = "forbidden", message = "invalid signature",
        field = type(field) == "string" and field or nil } }
    end
    return call_query(req, what)
  end

  srv:post("/voice", function(req)
    local q, n, body = webhook_query(req, "voice webhook")
    if not q then
      return n, body
    end
    local id = q.callId
    local token, terr = engine:prepare_stream(id, n)
    if not token then
      log.limited("warn", "voice webhook for a call that is not dialing", { call = id, attempt = q.attempt,
        reason = terr })
      local body, ctype = provider:buildVoiceResponse(id, self:public_url(), nil)
      return 200, body, { ["Content-Type"] = ctype or "text/xml" }
    end
    local stream_url = self:public_url():gsub("^http", "ws") .. "/voice/stream"
    local body, ctype = provider:buildVoiceResponse(id, self:public_url(), {
      url = stream_url,
      parameters = { callId = id, attempt = tostring(n or ""), token = token },
    })
    return 200, body, { ["Content-Type"] = ctype or "text/xml" }
  end)

  srv:post("/status", function(req)
    local q, n, body = webhook_query(req, "status callback")
    if not q then
      return n, body
    end
    local payload, st, serr, field
    if req:content_type():find("json", 1, true) then
      payload, serr = req:json_object()
    else
      payload = url.form_decode(req.body or "")
    end
    if payload then
      -- The provider may name the payload's field at fault (Twilio: CallStatus).
      st, serr, field = provider:mapStatus(payload)
      field = type(field) == "string" and field or nil
    end
    if not st then
      log.limited("warn", "status callback not understood", { call = q.callId, error = serr, field = field },
        "status callback not understood " .. tostring(field))
      return 400, { error = { code = "bad_status", message = serr, field = field } }
    end
    local known, word = calls.status_of(st)
    if not known then
      -- The provider's fault, not the vendor's: as if mapStatus had raised.
      -- At every callback of a kind: rate-limited, as the vendor decides how many.
      log.limited("error", "the provider's mapStatus returned no status callagent knows", { provider = provider.name,
        call = q.callId, status = word })
      return 500, { error = { code = "internal", message = "the provider's mapStatus returned no status (one of "
        .. calls.STATUS_WORDS .. ")" } }
    end
    engine:provider_status(q.callId, n, known)
    return 204
  end)

  -- A stream is refused with 1008 and one log line: callagent is the only
  -- one who sees why, the phone vendor only hangs up.
  local function stop_start_timer(conn)
    if conn.start_timer then
      conn.start_timer:stop()
      conn.start_timer = nil
    end
  end
  -- who: {call, attempt} a refused start tried to take, for the log line.
  local function refuse(conn, reason, close_reason, who)
    stop_start_timer(conn)
    conn.refused = true
    log.limited("warn", "media stream refused", { reason = reason, remote = conn.request and conn.request.remote,
      call = who and who.call, attempt = who and who.attempt })
    conn:close(1008, close_reason or reason)
  end
  local start_ms = self.opts.stream_start_ms or 10000

  -- The stream's `start` as {streamSid, parameters}: the provider's
  -- streamStart reads its vendor's shape; without one, Twilio's.
  local function stream_start(ev)
    if provider.streamStart then
      local ok, st, serr = pcall(provider.streamStart, provider, ev)
      if not ok then
        -- At every stream's start, which anyone may open: rate-limited.
        log.limited("error", "the provider's streamStart failed", { provider = provider.name, error = st })
        return nil, "start not understood"
      end
      -- Anything but {streamSid, parameters} is refused here, not indexed
      -- (a number would raise in the handler and hold the stream until the
      -- start timeout); a why goes into the close frame, so it stays short.
      if type(st) ~= "table" then
        if st ~= nil then
          log.limited("error", "the provider's streamStart returned a " .. type(st) .. ", not a table",
            { provider = provider.name })
        end
        return nil, type(serr) == "string" and serr ~= "" and serr:sub(1, 100) or "start not understood"
      end
      return st
    end
    local start = type(ev.start) == "table" and ev.start or {}
    return { streamSid = ev.streamSid or start.streamSid, parameters = start.customParameters }
  end

  srv:websocket("/voice/stream", {
    open = function(conn, req)
      req.upgrade = true
      local ok, why = provider:validateRequest(req, self:public_url())
      if not ok then
        return refuse(conn, why, "invalid signature")
      end
      -- A connection that never starts would be held forever.
      conn.start_timer = timer.after(start_ms, function()
        conn.start_timer = nil
        if not conn.bridge and not conn.gone then
          refuse(conn, string.format("no start within %g s", start_ms / 1000), "no start")
        end
      end)
      conn.start_timer:unref()
    end,
    text = function(conn, msg)
      local b = conn.bridge
      if b then
        return b:on_stream_text(msg)
      end
      -- A refused stream is not heard any more: what it sent before its
      -- close went through (a `start` right after the upgrade whose signature
      -- failed, say) would claim the call's stream token, and the close end
      -- the call.
      if conn.refused then
        return
      end
      -- Before `start`: connected, then start with the stream token (Twilio:
      -- customParameters; another vendor: its provider's streamStart).
      -- Anything else is no media stream we speak.
      local ev = json.try_decode(msg)
      if type(ev) ~= "table" or (ev.event ~= "connected" and ev.event ~= "start") then
        local what = type(ev) == "table" and type(ev.event) == "string" and #ev.event <= 32 and ("event " .. ev.event)
          or "a message that is not an event"
        return refuse(conn, "expected connected or start, got " .. what, "expected start")
      end
      if ev.event == "start" then
        local st, serr = stream_start(ev)
        if not st then
          return refuse(conn, serr or "start not understood")
        end
        local sid = st.streamSid
        -- It goes into every message to the phone as it is.
        if type(sid) ~= "string" or #sid > 63 or not sid:find("^[\33-\126]+$") or sid:find('["\\]') then
          return refuse(conn, "bad streamSid")
        end
        local bridge, berr, who = engine:claim_stream(type(st.parameters) == "table" and st.parameters or {},
          type(st.providerCallId) == "string" and st.providerCallId or nil)
        if not bridge then
          return refuse(conn, berr, nil, who)
        end
        stop_start_timer(conn)
        conn.bridge = bridge
        bridge:attach(conn, { streamSid = sid })
      end
    end,
    -- Media Streams are text only. Before `start` a binary message is
    -- refused as any other first message (it was dropped unseen, and the
    -- stream held until the start deadline); once the stream runs, or once
    -- refused, it is ignored, as the bridge ignores events it does not know.
    binary = function(conn)
      if not conn.bridge and not conn.refused then
        return refuse(conn, "expected connected or start, got a binary message", "expected start")
      end
    end,
    close = function(conn, code, reason)
      conn.gone = true
      stop_start_timer(conn)
      local b = conn.bridge
      if b then
        conn.bridge = nil
        b:on_stream_closed(code, reason)
      end
    end,
  })

  provider:registerRoutes(srv, { engine = engine, config = self.config, app = self })
end

--- Starts the service: listens and, when needed, finds the public URL.
function App:start()
  if not coroutine.isyieldable() then
    error("app:start() must run inside a task (task.spawn): it may wait for the store and a tunnel", 2)
  end
  -- A second store and server over the first ones, which stop() would then
  -- never close. A stopped app is not started again either: make a new one.
  if self.starting or self.started or self.stopped then
    return nil, self.stopped and "this app was stopped: make a new one to start again"
      or "this app is started already"
  end
  -- From here on a signal stops the app as app:stop() does, a start under
  -- way included: without a hook then, the runtime stopped the loop at once,
  -- with the tunnel opening (a published Funnel never undone).
  if not self.opts.no_shutdown_hook and not self.shutdown_hook then
    self.shutdown_hook = runtime.on_shutdown(function()
      if self.starting or self.started then
        self:stop()
      end
    end)
  end
  -- What app:stop() needs of a start under way: the tunnel's cancel, and
  -- the waiters for its return (an error's too).
  local starting = { cancel = require("callagent.tunnel").cancel(), waiters = {}, co = coroutine.running() }
  self.starting = starting
  local ok, err
  do
    local _ <close> = setmetatable({}, { __close = function()
      self.starting = nil
      self.started = ok and true or nil
      if not ok then
        self:_drop_shutdown_hook() -- a failed app is not kept for the program's life
      end
      for _, wake in ipairs(starting.waiters) do
        wake()
      end
    end })
    -- A start that raises (a routes function of the app's, its public_url)
    -- closes what it opened, as a failed one does, then raises on: left, the
    -- server went on answering and the store stayed open, with no stop to
    -- come (the shutdown hook stops only an app that started).
    local fine, a, b = pcall(self._start, self)
    if not fine then
      self:_undo_start()
      -- Scrubbed as a returned error is (below): the app prints it as it likes.
      error(type(a) == "string" and log.scrub(a) or a, 0)
    end
    ok, err = a, b
  end
  -- An app prints it as it likes (io.stderr:write), past the log's
  -- redaction: a tunnel's or the store's message quoting a secret.
  return ok, err and log.scrub(err)
end

-- What a start that did not finish opened, closed (twice is harmless: a stop
-- during the start may have closed it already).
function App:_undo_start()
  if self.prune_timer then
    self.prune_timer:stop()
  end
  if self.loop_timer then
    self.loop_timer:stop()
  end
  if self.tunnel then
    self.tunnel:close()
    self.tunnel = nil
  end
  if self.server then
    self.server:close()
    self.server = nil
  end
  if self.store then
    self.store:close()
    self.store = nil
  end
end

function App:_start()
  local cfg = self.config
  -- A long-running server: start a collection when the heap has grown 30%
  -- over what the last one kept, not the default 100%. Per call that is
  -- about 5 KiB less RSS, for GC work the benchmark cannot see.
  collectgarbage("incremental", self.opts.gc_pause or 130)
  local store, err = store_mod.open(cfg.store)
  if not store then
    return nil, err
  end
  if self.stopped then -- app:stop() while the store opened
    store:close()
    return nil, "stopped during start"
  end
  self.store = store
  -- A failed start leaves nothing open behind it.
  local function fail(msg)
    self:_undo_start()
    return nil, msg
  end
  self.notifier = notify.new(function()
    return cfg.notify
  end, store, self.opts.notify)
  self.engine = calls.new({
    config = cfg,
    store = store,
    provider = self.provider,
    notifier = self.notifier,
    tools = self.tools,
    emit = function(event, ...)
      self:_emit(event, ...)
    end,
    public_url = function()
      return self:public_url()
    end,
    local_url = function()
      return self.url
    end,
  })
  if self.provider.init then
    local ok, ierr = pcall(self.provider.init, self.provider, { config = cfg, engine = self.engine, app = self,
      log = log })
    if not ok then
      return fail("the " .. tostring(self.provider.name) .. " provider's init failed: " .. tostring(ierr))
    end
  end
  local srv = http.server({
    host = cfg.server.host,
    port = cfg.server.port,
    max_body = 256 * 1024,
    max_ws_message = 256 * 1024,
    max_connections = self.opts.max_connections or 4096,
    -- The upgrade of /voice/stream has only the headers libwebsockets
    -- knows, and these (Twilio's signature): a provider names its own.
    headers = self.provider.requestHeaders,
  })
  self:_routes(srv)
  api.register(srv, self.engine, cfg, {
    provider_name = self.provider.name,
    public_url = function()
      return self.public_base
    end,
  })
  for _, fn in ipairs(self.extra_routes or {}) do
    fn(srv)
  end
  -- Until the tunnel is open and recover() has run, the API places no call.
  self.engine.starting = true
  local ok, lerr = srv:listen()
  if not ok then
    srv:close()
    -- The server's own words name the address too ("EADDRINUSE: cannot listen on h:p: ..."): once is enough.
    lerr = tostring(lerr):gsub("^(%u+: )cannot listen on [^ ]+: ", "%1")
    return fail("server: cannot listen on " .. cfg.server.host .. ":" .. cfg.server.port .. ": " .. lerr)
  end
  self.server = srv
  -- This machine's URL: a wildcard address is no place to go (nor, for the
  -- mock phone's page, a secure context that may use the microphone).
  local host = ({ ["0.0.0.0"] = "127.0.0.1", ["::"] = "::1" })[srv.host] or srv.host
  host = host:find(":") and ("[" .. host .. "]") or host
  self.url = "http://" .. host .. ":" .. srv.port
  self.public_base = cfg.server.publicBaseUrl
  if not self.public_base and self.opts.public_url then
    self.public_base = self.opts.public_url(self.url)
  end
  if not self.public_base and self.provider.needs_public_url and cfg.tunnel.provider == "none" then
    return fail("server.publicBaseUrl: required by the " .. self.provider.name
      .. " provider (the vendor must reach this server), unless tunnel.provider opens a tunnel")
  end
  if not self.public_base and self.provider.needs_public_url then
    local tunnel = require "callagent.tunnel"
    -- app:stop() (a signal's too) cancels the opening: no waiting for it
    -- up to tunnel.timeoutSec.
    local pub, terr = tunnel.open(cfg.tunnel, srv.port, srv.host, { cancel = self.starting.cancel,
      on_lost = function(why)
        self:_tunnel_lost(why)
      end })
    if not pub then
      return fail(self.stopped and "stopped during start" or terr)
    end
    if self.stopped then -- app:stop() while the tunnel opened: it closed the rest
      pub:close()
      return fail("stopped during start")
    end
    self.tunnel = pub
    self.tunnel_opened_at = timer.now()
    self.public_base = pub.url
  end
  if self.stopped then -- app:stop() while the provider's init waited, say
    return fail("stopped during start")
  end
  local public_host = self.public_base and self.public_base:match("^%a[%w+.-]*://([^/?#]*)")
  if public_host and not api.loopback_host(public_host) and not cfg.server.apiToken then
    -- The API stays loopback's: requests with the public host name get 403.
    log.warn("no server.apiToken: /v1 answers only requests to a loopback host; set one to use the API through "
      .. url.display(self.public_base), {})
  end
  local rok, recovered = pcall(self.engine.recover, self.engine)
  if not rok then
    return fail("store: the calls of the last run could not be recovered: " .. tostring(recovered))
  end
  self.engine.starting = nil
  self.notifier:resume()
  if store.prune then
    -- In a task of its own, at start and hourly: a prune of many calls
    -- takes turns with live calls (task.pace), which a timer's callback
    -- cannot, and does not hold up the start.
    local function prune()
      if not self.stopped then
        store:prune(cfg.store.retentionDays)
      end
    end
    task.spawn(prune)
    self.prune_timer = timer.every(3600 * 1000, function()
      task.spawn(prune)
    end)
    self.prune_timer:unref()
  end
  self:_watch_loop()
  if recovered.retries + recovered.dialed + recovered.resolved + recovered.ended > 0 then
    log.info("recovered calls from the last run", recovered)
  end
  log.info("callagent ready", {
    url = self.url,
    public = url.display(self:public_url()), -- its userinfo may be a password
    provider = self.provider.name,
    store = cfg.store.backend,
  })
  return self
end

-- The loop is overloaded when it was busy this share of a window, or one
-- iteration held it this long: every call's audio waited.
local OVERLOAD_BUSY, OVERLOAD_ITERATION_MS = 0.9, 250
local OVERLOAD_QUIET_MS = 60000 -- at most one warning a minute

--- Every loop_watch_ms (10 s), a warning when the event loop was overloaded.
function App:_watch_loop()
  local every = self.opts.loop_watch_ms or 10000
  if every <= 0 then
    return
  end
  runtime.loop_window(every / 1000)
  local last_warn
  self.loop_timer = timer.every(every, function()
    local l = runtime.loop_stats()
    if l.utilization < OVERLOAD_BUSY and l.max_iteration_ms < OVERLOAD_ITERATION_MS then
      return
    end
    local now = timer.now()
    if last_warn and now - last_warn < OVERLOAD_QUIET_MS then
      return
    end
    last_warn = now
    log.warn("event loop overloaded: calls' audio is delayed", {
      busy = string.format("%.0f%%", l.utilization * 100),
      longest_iteration_ms = math.floor(l.max_iteration_ms + 0.5),
      window_s = math.floor(l.window_s + 0.5),
      active_calls = self.engine and self.engine:active_count() or 0,
    })
  end)
  self.loop_timer:unref()
end

--- Same as POST /v1/calls (input validated the same way).
function App:create_call(input)
  local checked, status, ebody = api.validate_call(input)
  if not checked then
    return nil, ebody.error.message, status
  end
  if not self.engine then
    return nil, "the app is not started: app:start() first"
  end
  local call, err = self.engine:create(checked)
  if not call then
    return nil, err
  end
  -- Stored and dialing: the record whatever a read of it says now (a call
  -- that ended meanwhile is read from the store, which may fail). nil would
  -- have the caller create it again, and the callee rung twice.
  return self.engine:call_view(call.id) or self.engine:list_view(call)
end

-- How long a stop waits for the answers to notifications on their way, and
-- the part of the grace kept for it: the hang-ups' end notifies their calls.
local NOTIFY_DRAIN_MS = 2000
local NOTIFY_RESERVE_MS = 1000
-- How long a stop lets the API requests and vendor callbacks in progress
-- finish before it closes their connections (usually no time: they answer
-- in milliseconds).
local SERVER_DRAIN_MS = 1000
-- The end of the grace kept for the tunnel's close (see below); without a
-- tunnel, for closing the rest (the store) within the grace.
local TUNNEL_RESERVE_MS = 3000
local CLOSE_RESERVE_MS = 1000
-- The tunnel's close ends this long before the grace does (the runtime ends
-- the program there), so that the stop itself ends within the grace, its
-- warnings logged: a tool slower than its share (`tailscale funnel ...
-- off` may take 5 s) is given up, not waited for past the grace.
local END_MARGIN_MS = 100
-- A stop's grace (runtime.grace_ms, 10 s) is split in turns, each ending by
-- its own deadline so that none takes the next one's share: the hang-ups
-- (what is left: 5 s; at least 1 s), the server's drain (at most
-- SERVER_DRAIN_MS), the notifications' answers (NOTIFY_RESERVE_MS at least,
-- NOTIFY_DRAIN_MS at most), the tunnel's close (TUNNEL_RESERVE_MS; an app
-- without a tunnel keeps CLOSE_RESERVE_MS, its hang-ups getting the rest). The
-- drain used to end at the notifications' deadline: hang-ups that took their
-- time and a request that held the drain its whole second left the
-- notifications of the calls just ended no time to be answered, and the
-- next start sent them again.
local function stop_budget(grace_ms, tunnel)
  local notify_by = grace_ms - (tunnel and TUNNEL_RESERVE_MS or CLOSE_RESERVE_MS)
  local drain_by = notify_by - NOTIFY_RESERVE_MS
  return { hangups = math.max(1000, drain_by - SERVER_DRAIN_MS), drain_by = drain_by, notify_by = notify_by }
end

-- How long the tunnel's reopening waits after a failed try: doubled each
-- time, up to the second value. A tunnel that died within STABLE_MS of its
-- opening is reopened after such a wait too (doubled for each such death
-- in a row), not at once: a tool that dies as soon as it is up (a session
-- its service ends at once) is not restarted in a loop.
M.REOPEN_MS = { 1000, 60000 }
M.TUNNEL_STABLE_MS = 60000

-- The tunnel died on its own (ngrok exited): the vendor reaches nothing, so
-- dialing pauses (POST /v1/calls answers 503 paused; retries wait) while the
-- tunnel is opened again, until it opens or the app stops. Then the calls
-- go on with its URL (a new one, with ngrok's free plan).
function App:_tunnel_lost(why)
  if self.stopped or self.reopen then
    return
  end
  local tunnel = require "callagent.tunnel"
  local reopen = { cancel = tunnel.cancel(), wake = task.queue(1), waiters = {} }
  self.reopen = reopen
  self.engine:pause("the public tunnel is down (" .. why .. ")")
  log.warn("calls paused: opening the tunnel again", { reason = why })
  local lived = self.tunnel_opened_at and timer.now() - self.tunnel_opened_at
  self.quick_deaths = lived and lived < M.TUNNEL_STABLE_MS and (self.quick_deaths or 0) + 1 or 0
  if self.tunnel then
    self.tunnel:close()
    self.tunnel = nil
  end
  local function later(ms)
    return math.min(ms * 2, M.REOPEN_MS[2])
  end
  task.spawn(function()
    local wait = M.REOPEN_MS[1]
    for _ = 2, self.quick_deaths do
      wait = later(wait)
    end
    if self.quick_deaths > 0 then
      log.warn("the tunnel died soon after it opened: opening it again later", { lived_ms = math.floor(lived),
        after_ms = wait })
      reopen.wake:pop(wait)
      wait = later(wait)
    end
    while not self.stopped do
      local pub, err = tunnel.open(self.config.tunnel, self.server.port, self.server.host, { cancel = reopen.cancel,
        on_lost = function(w)
          self:_tunnel_lost(w)
        end })
      if self.stopped then
        if pub then
          pub:close()
        end
        break
      end
      if pub then
        self.tunnel, self.public_base, self.reopen = pub, pub.url, nil
        self.tunnel_opened_at = timer.now()
        log.info("tunnel open again: calls resumed", { url = pub.url })
        self.engine:resume()
        break
      end
      log.error("the tunnel could not be opened again: trying again later", { error = err, after_ms = wait })
      reopen.wake:pop(wait)
      wait = later(wait)
    end
    for _, wake in ipairs(reopen.waiters) do
      wake()
    end
    reopen.waiters = nil
  end)
end

function App:stop()
  if self.stopped then
    -- A second stop inside a task (the app's own after a signal's, say)
    -- returns once the first is done, within the grace: returning at once,
    -- its caller went on (and exited) while the hang-ups were under way.
    if self.stop_waiters and task.running() then
      task.wait_in(self.stop_waiters, runtime.grace_ms)
    end
    return
  end
  self.stopped = true
  self.stop_waiters = {}
  local stop_at = timer.now()
  local starting = self.starting
  -- A start under way may be opening a tunnel, and a reopen is one.
  local budget = stop_budget(runtime.grace_ms, self.tunnel or starting or self.reopen)
  local deadline = stop_at + budget.notify_by -- for all but the tunnel
  if starting then
    -- start() under way: a tunnel opening ends now (ngrok stopped, a
    -- `funnel --bg` undone), and start() returns "stopped during start".
    starting.cancel:cancel()
  end
  local reopen = self.reopen
  if reopen then
    -- The tunnel opening again after it died: ended now, as a start's.
    reopen.cancel:cancel()
    reopen.wake:push(true)
  end
  if self.engine then
    -- The tunnel and the store close after the hang-ups (the tunnel stays
    -- open meanwhile: the vendor's final status callbacks come through it),
    -- within the grace period: a Funnel left published would outlive the app.
    self.engine:shutdown(budget.hangups)
  end
  if self.server then
    -- A client whose request was cut off could not know what came of it (was
    -- the call created?): those in progress are answered first, up to the
    -- drain's deadline (the notifications' turn is theirs).
    local drain = math.min(SERVER_DRAIN_MS, stop_at + budget.drain_by - timer.now())
    local cut = self.server:close({ drain_ms = math.max(0, drain) })
    if cut > 0 then
      log.warn("requests still in progress at the stop were cut off", { requests = cut })
    end
    -- No request comes any more: the counts of refusals not logged (their
    -- window's timer would not keep the program alive to write them).
    log.flush()
  end
  if self.prune_timer then
    self.prune_timer:stop()
  end
  if self.loop_timer then
    self.loop_timer:stop()
  end
  -- The provider's own timers (the mock phone's ring) end with the app.
  if self.provider and self.provider.close then
    local ok, err = pcall(self.provider.close, self.provider)
    if not ok then
      log.error("provider close failed", { provider = self.provider.name, error = err })
    end
  end
  -- Nothing may write to the store once it is closed: not a notification's
  -- retry, nor a timer the hang-ups above started (in-process embedders
  -- stop the app and go on running).
  if self.notifier then
    -- The calls that ended above were notified: their requests' answers are
    -- waited for a little (within the grace), or the next start would send
    -- what the receiver already has: NOTIFY_RESERVE_MS at least, whatever
    -- the drain took.
    -- Those left are said to be, also when there was no time left to wait
    -- (a stop from a plain callback, hang-ups past their share).
    local left = task.running() and math.max(0, math.min(NOTIFY_DRAIN_MS, deadline - timer.now())) or 0
    if not self.notifier:drain(left) then
      log.warn("notifications still on their way at the stop: the next start sends them again")
    end
    self.notifier:stop()
  end
  if self.engine then
    self.engine:close()
  end
  if self.store then
    self.store:close()
  end
  -- Last: inside a task its close waits for ngrok to exit or for `tailscale
  -- funnel ... off` (seconds at worst), which would otherwise push the
  -- store's close past the grace period; until the grace's end at most.
  if self.tunnel then
    self.tunnel:close(math.max(0, stop_at + runtime.grace_ms - END_MARGIN_MS - timer.now()))
  end
  -- A start under way closes what it opened (the tunnel too) before it
  -- returns: inside a task, that is waited for (within the grace), or a
  -- signal's stop would end the program before.
  if starting and self.starting == starting and task.running() and coroutine.running() ~= starting.co then
    local _, err = task.wait_in(starting.waiters, math.max(1, stop_at + runtime.grace_ms - timer.now()))
    if err then
      log.warn("app:start() had not returned at the end of the stop's grace period", { grace_ms = runtime.grace_ms })
    end
  end
  if reopen and reopen.waiters and task.running() then
    task.wait_in(reopen.waiters, math.max(1, stop_at + runtime.grace_ms - timer.now()))
  end
  self:_drop_shutdown_hook()
  local waiters = self.stop_waiters
  self.stop_waiters = nil
  for _, wake in ipairs(waiters) do
    wake()
  end
end

-- The runtime's shutdown no longer stops this app (it stopped, or its start
-- failed): its handler, which holds the app, is dropped.
function App:_drop_shutdown_hook()
  if self.shutdown_hook then
    runtime.off_shutdown(self.shutdown_hook)
    self.shutdown_hook = nil
  end
end

return M
