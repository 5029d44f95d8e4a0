--- callagent.http: HTTP/1.1 and WebSocket server.
--
--   local http = require "callagent.http"
--   local srv = http.server{ host = "127.0.0.1", port = 0 }
--   srv:get("/hello/{name}", function(req)
--     return 200, { greeting = "hi " .. req.params.name }   -- a table body is sent as JSON
--   end)
--   srv:websocket("/echo", {
--     open = function(conn, req) end,
--     text = function(conn, msg) conn:send(msg) end,
--     binary = function(conn, data) end,
--     close = function(conn, code, reason) end,
--   })
--   srv:static("/app/", "/path/to/folder")
--   assert(srv:listen())        -- srv.port: the bound port (port 0 picks a free one)
--   srv:close()
--
-- Options (http.server{...}): host (default "127.0.0.1"), port (0), max_header
-- (8192 bytes; larger request heads are refused and logged; process-wide, see
-- http.configure{max_header = n}), max_body (1 MiB;
-- 413), body_timeout (60 s a body may take after its headers; 408),
-- response_idle (30: a client that takes none of its response for this many
-- seconds is dropped with it),
-- max_connections (1024; 503), max_ws_message (1 MiB; close 1009),
-- max_send_queue (1 MiB per WebSocket; a slower peer is dropped with 1008),
-- ws_ping (60: a WebSocket peer silent this many seconds is pinged; 0: never)
-- and ws_pong (10: one that does not answer within it is dropped, 1006),
-- tls = {cert = file, key = file} for https/wss, headers = {...} non-standard
-- request headers to copy for every request (standard ones always are; any
-- other req.headers[name] is looked up on demand until the response is sent,
-- but only copied ones show up in pairs()), pace (true: each handler first
-- waits its turn with callagent.task.pace, so a burst of requests takes turns
-- with live calls' audio instead of holding it up; false: handlers start at
-- once).
--
-- Routes: srv:route(method, pattern, handler) (method "*" for any), and the
-- shorthands get/post/put/delete/patch. Patterns are paths with "{name}"
-- segments (req.params.name) and an optional trailing "*" (req.params.rest).
-- Routes match in the order they were added. A path that matches with another
-- method answers 405 with Allow; no match answers 404. Errors are JSON:
-- {"error": {"code", "message"}}.
-- srv:on_no_route(fn) has fn(req, status, error) called before such a 404 or
-- 405 goes out (the server logs none); fn may answer instead, as a handler.
--
-- A handler runs in its own task (it may wait: fetch, timer.sleep, ...) and gets
-- req = {id, method, path, params, query (table), raw_query, headers (lowercase
-- names), body, remote} with req:json() (decoded body, a UTF-8 byte order
-- mark at its start ignored; or nil, err),
-- req:json_object() (the same for a body that must be a JSON object: nil,
-- "EJSON: ..." when it is no JSON, nil, "ENOTOBJECT: ..." when it is other
-- JSON), req:content_type() (lowercase: media types have no case; "" when
-- none) and req:header(name). It returns either status, body, headers - body a string,
-- or a table sent as JSON - or a table {status, headers, body}. Returning
-- nothing answers 204. A 204 or 304 goes out without the body it was given
-- (so does any answer to HEAD); a 1xx is no final answer (500). The server
-- frames the body: a handler's Content-Length, Transfer-Encoding and
-- Connection are not sent (a Connection with "close" closes the connection
-- after the answer). An error in a handler is logged with its traceback and
-- answered 500 without details.
--
-- WebSocket handlers are plain calls (not tasks) so the per-message path stays
-- cheap; spawn a task from them to wait on something. conn.request is the
-- upgrade request (path, query, headers, remote). See callagent.core.http /
-- src/wsconn.c for conn:send, conn:send_binary, conn:close, conn:buffered.
local core = require "callagent.core.http"
local task = require "callagent.task"
local timer = require "callagent.timer"
local json = require "callagent.json"
local log = require "callagent.log"
local core_rt = require "callagent.core"

local M = {}

local Server = {}
Server.__index = Server

local Request = {}
Request.__index = Request

-- The body as JSON text: without a UTF-8 byte order mark (json.without_bom).
-- req.body keeps it (a signature is over the bytes sent).
local json_text = json.without_bom

function Request:json()
  local text = json_text(self.body or "")
  if text == "" then
    return nil, "EJSON: empty body"
  end
  return json.try_decode(text, true) -- [] stays an array
end

function Request:json_object()
  local v, err = self:json()
  if v == nil then
    return nil, err
  end
  if type(v) ~= "table" or not json_text(self.body):match("^%s*{") then
    return nil, "ENOTOBJECT: the body must be a JSON object"
  end
  return v
end

function Request:content_type()
  return (self.headers["content-type"] or ""):lower()
end

function Request:header(name)
  local v = self.headers[name:lower()]
  if v == nil and self._h then
    v = self._h:header(name)
  end
  return v
end

local MIME = {
  html = "text/html; charset=utf-8",
  htm = "text/html; charset=utf-8",
  js = "text/javascript; charset=utf-8",
  mjs = "text/javascript; charset=utf-8",
  css = "text/css; charset=utf-8",
  json = "application/json",
  txt = "text/plain; charset=utf-8",
  svg = "image/svg+xml",
  png = "image/png",
  jpg = "image/jpeg",
  jpeg = "image/jpeg",
  gif = "image/gif",
  ico = "image/x-icon",
  wav = "audio/wav",
  mp3 = "audio/mpeg",
  wasm = "application/wasm",
  map = "application/json",
  xml = "application/xml",
  pdf = "application/pdf",
}
M.mime_types = MIME

function M.content_type(path)
  local ext = path:match("%.([%w]+)$")
  return ext and MIME[ext:lower()] or "application/octet-stream"
end

--- s as a message or log line quotes what a client sent: at most max bytes,
-- cut between two UTF-8 characters and ended with "…" (a request line may
-- be 8 KB, a JSON field name far more).
function M.cut(s, max)
  if #s <= max then
    return s
  end
  local n = max
  while n > 0 and s:byte(n + 1) >= 0x80 and s:byte(n + 1) < 0xC0 do
    n = n - 1 -- not inside a character
  end
  return s:sub(1, n) .. "…"
end

-- A path as the server's own messages and error lines quote it.
local function shown(path)
  return M.cut(path, 200)
end

--- A JSON error body as every callagent endpoint writes it.
function M.error_body(code, message, field)
  -- Messages may quote a request's bytes (a path): the body stays UTF-8.
  return { error = { code = code, message = json.utf8(message), field = field } }
end

--- Process-wide settings, before the first server or WebSocket client:
-- max_header (bytes of request line + headers, default 8192).
function M.configure(opts)
  return core.configure(opts)
end

function M.server(opts)
  opts = opts or {}
  return setmetatable({ opts = opts, routes = {}, ws_routes = {}, core = nil, in_flight = 0 }, Server)
end

local function compile(pattern)
  local names = {}
  local lp = "^"
  local rest = false
  local p = pattern
  if p:sub(-1) == "*" then
    rest = true
    p = p:sub(1, -2)
  end
  local i = 1
  while i <= #p do
    local s, e, name = p:find("{([%w_]+)}", i)
    if not s then
      lp = lp .. p:sub(i):gsub("[%^%$%(%)%%%.%[%]%*%+%-%?]", "%%%0")
      break
    end
    lp = lp .. p:sub(i, s - 1):gsub("[%^%$%(%)%%%.%[%]%*%+%-%?]", "%%%0") .. "([^/]+)"
    names[#names + 1] = name
    i = e + 1
  end
  if rest then
    lp = lp .. "(.*)"
    names[#names + 1] = "rest"
  end
  return lp .. "$", names
end

function Server:route(method, pattern, handler)
  assert(type(method) == "string", "route method must be a string")
  assert(type(pattern) == "string" and pattern:sub(1, 1) == "/", "route pattern must start with /")
  assert(type(handler) == "function", "route handler must be a function")
  local lp, names = compile(pattern)
  self.routes[#self.routes + 1] = { method = method:upper(), pattern = pattern, lp = lp, names = names, handler = handler }
  return self
end

for _, m in ipairs({ "get", "post", "put", "delete", "patch" }) do
  Server[m] = function(self, pattern, handler)
    return self:route(m:upper(), pattern, handler)
  end
end

--- Calls fn(req, status, error) before a request no route takes is answered:
-- 404 (no route has its path) or 405 (none takes its method), error its
-- {code, message}; req.path has no query. For a log line of the caller's (the
-- API's): the server logs none for them. fn returning a status answers with
-- it instead, as a handler would (status, body, headers): the API's 401 for
-- a request without its token. One fn; fn must not wait.
function Server:on_no_route(fn)
  assert(fn == nil or type(fn) == "function", "on_no_route takes a function")
  self.no_route = fn
  return self
end

--- Serves the files under dir at prefix (GET and HEAD). "index.html" for folders.
function Server:static(prefix, dir, opts)
  opts = opts or {}
  assert(prefix:sub(1, 1) == "/", "static prefix must start with /")
  if prefix:sub(-1) ~= "/" then
    prefix = prefix .. "/"
  end
  local function serve(req)
    local rel = req.params.rest or ""
    if rel:find("%.%.") or rel:find("%z") then
      return 404, M.error_body("not_found", "no such file")
    end
    if rel == "" or rel:sub(-1) == "/" then
      rel = rel .. (opts.index or "index.html")
    end
    local path = dir .. "/" .. rel
    local kind = core_rt.stat(path)
    if kind == "dir" then
      return 302, "", { Location = req.path .. "/" }
    end
    local f = kind == "file" and io.open(path, "rb")
    if not f then
      return 404, M.error_body("not_found", "no such file")
    end
    local body = f:read("a")
    f:close()
    return 200, body, {
      ["Content-Type"] = M.content_type(path),
      ["Cache-Control"] = opts.cache_control or "no-cache",
    }
  end
  self:route("GET", prefix .. "*", serve)
  self:route("HEAD", prefix .. "*", serve)
  return self
end

--- handlers: {open = fn(conn, req), text = fn(conn, msg), binary = fn(conn, data), close = fn(conn, code, reason)}
function Server:websocket(path, handlers)
  assert(not self.core, "add WebSocket paths before listen()")
  assert(type(handlers) == "table", "websocket handlers must be a table")
  self.ws_routes[path] = handlers
  return self
end

-- HEAD is answered wherever GET is (RFC 9110 9.3.2), by the GET route with
-- the body left out, unless the path has a HEAD route of its own.
local function find_route(routes, method, path)
  local allowed, get, get_params
  for _, r in ipairs(routes) do
    local caps = { path:match(r.lp) }
    if caps[1] ~= nil then
      local params = {}
      for i, name in ipairs(r.names) do
        params[name] = caps[i]
      end
      if r.method == method or r.method == "*" then
        return r, params
      end
      if method == "HEAD" and r.method == "GET" and not get then
        get, get_params = r, params
      end
      allowed = allowed or {}
      for _, m in ipairs(r.method == "GET" and { "GET", "HEAD" } or { r.method }) do
        if not allowed[m] then
          allowed[m] = true
          allowed[#allowed + 1] = m
        end
      end
    end
  end
  if get then
    return get, get_params
  end
  return nil, allowed
end

-- Turns what a handler returned into status, headers, body.
local function normalize(a, b, c)
  if a == nil then
    return 204, {}, ""
  end
  local status, body, headers
  if type(a) == "table" then
    status, body, headers = a.status or 200, a.body, a.headers
    if a.json ~= nil then
      body = a.json
    end
  else
    status, body, headers = a, b, c
  end
  headers = headers or {}
  if type(body) == "table" then
    body = json.encode(body)
    local has_ct = false
    for k in pairs(headers) do
      if k:lower() == "content-type" then
        has_ct = true
      end
    end
    if not has_ct then
      headers["Content-Type"] = "application/json"
    end
  end
  return math.tointeger(status) or 500, headers, body and tostring(body) or ""
end

-- What every answer carries unless its handler said otherwise: no MIME
-- sniffing (a browser never runs a JSON body, or a file, as another type),
-- and JSON - the API's call records and transcripts - kept by no cache on
-- the way (a proxy, a tunnel's edge, the browser).
local function with_defaults(headers)
  if type(headers) ~= "table" then
    return headers -- h:respond refuses it, saying what it is
  end
  local nosniff, cache, json_body = true, true, false
  for k, v in pairs(headers) do
    local name = type(k) == "string" and k:lower()
    if name == "x-content-type-options" then
      nosniff = false
    elseif name == "cache-control" then
      cache = false
    elseif name == "content-type" and type(v) == "string" then
      json_body = v:lower():find("^application/json") ~= nil
    end
  end
  if nosniff then
    headers["X-Content-Type-Options"] = "nosniff"
  end
  if cache and json_body then
    headers["Cache-Control"] = "no-store"
  end
  return headers
end

local function json_headers(extra)
  local h = { ["Content-Type"] = "application/json" }
  for k, v in pairs(extra or {}) do
    h[k] = v
  end
  return with_defaults(h)
end

local function traceback(e)
  return debug.traceback(tostring(e), 2)
end

-- Headers not captured up front (non-standard names) are read on demand while
-- the request is in flight.
local function lazy_headers(h)
  return {
    __index = function(_, k)
      if type(k) == "string" then
        return h:header(k)
      end
    end,
  }
end

function Server:_handle(h, req)
  setmetatable(req, Request)
  setmetatable(req.headers, lazy_headers(h))
  req._h = h
  local route, params = find_route(self.routes, req.method, req.path)
  if not route then
    local status, body, headers
    if params then
      status, headers = 405, json_headers({ Allow = table.concat(params, ", ") })
      body = M.error_body("method_not_allowed", req.method .. " is not allowed on " .. shown(req.path))
    else
      status, headers = 404, json_headers()
      body = M.error_body("not_found", "no route for " .. req.method .. " " .. shown(req.path))
    end
    if self.no_route then
      -- Its error must not keep the answer from going out.
      local r = table.pack(pcall(self.no_route, req, status, body.error))
      if not r[1] then
        log.error("http on_no_route failed", { method = req.method, path = shown(req.path), error = r[2] })
      elseif r[2] ~= nil then
        -- As a handler's answer (h:respond checks it before sending).
        local ok, e = pcall(function()
          local s, hd, bd = normalize(r[2], r[3], r[4])
          return h:respond(s, with_defaults(hd), bd)
        end)
        if ok then
          return
        end
        log.error("http on_no_route returned an unusable response", { method = req.method, path = shown(req.path),
          error = e })
      end
    end
    return h:respond(status, headers, json.encode(body))
  end
  if self.draining then
    -- A request sent on a connection left open while the server drains.
    return h:respond(503, json_headers(),
      json.encode(M.error_body("closing", "the server is closing")))
  end
  req.params = params
  local pace = self.opts.pace ~= false
  self.in_flight = self.in_flight + 1
  task.spawn(function()
    if pace and task.pace() and not self.core then
      -- The server closed while this request waited its turn: nothing of
      -- the app runs after it (its store may be closed too).
      pcall(h.respond, h, 503, json_headers(),
        json.encode(M.error_body("closing", "the server is closing")))
      req._h = nil
      self.in_flight = self.in_flight - 1
      return
    end
    local r = table.pack(xpcall(route.handler, traceback, req))
    local status, headers, body
    if r[1] then
      local ok, s, hd, bd = pcall(normalize, r[2], r[3], r[4])
      if ok then
        status, headers, body = s, hd, bd
      else
        log.error("http handler returned an unusable response", { method = req.method, path = shown(req.path), error = s })
      end
    else
      log.error("http handler failed", { method = req.method, path = shown(req.path), error = r[2] })
    end
    if not status then
      status, headers, body = 500, json_headers(),
        json.encode(M.error_body("internal", "internal error"))
    end
    -- The defaults inside the pcall: headers that are no table (a handler's
    -- bug) raise there and get the 500, as h:respond's refusal of them does.
    local ok, err = pcall(function()
      return h:respond(status, with_defaults(headers), body)
    end)
    if not ok then
      log.error("http response could not be sent", { method = req.method, path = shown(req.path), error = err })
      pcall(h.respond, h, 500, json_headers(),
        json.encode(M.error_body("internal", "internal error")))
    end
    req._h = nil
    self.in_flight = self.in_flight - 1
  end)
end

local function ws_dispatch(routes)
  return function(conn, event, a, b)
    if event == "open" then
      local route = routes[a.path]
      conn.route = route
      conn.request = a
      if route and route.open then
        route.open(conn, a)
      end
      return
    end
    local route = conn.route
    local fn = route and route[event]
    if fn then
      fn(conn, a, b)
    end
  end
end

function Server:listen()
  assert(not self.core, "server is already listening")
  local o = self.opts
  local paths = {}
  for p in pairs(self.ws_routes) do
    paths[#paths + 1] = p
  end
  local c, err = core.listen({
    host = o.host,
    port = o.port,
    max_header = o.max_header,
    max_body = o.max_body,
    body_timeout = o.body_timeout,
    response_idle = o.response_idle,
    max_connections = o.max_connections,
    max_ws_message = o.max_ws_message,
    max_send_queue = o.max_send_queue,
    ws_ping = o.ws_ping,
    ws_pong = o.ws_pong,
    tls = o.tls,
    headers = o.headers,
    ws_paths = paths,
  }, function(h, req)
    self:_handle(h, req)
  end, ws_dispatch(self.ws_routes))
  if not c then
    return nil, err
  end
  self.core = c
  self.draining = false
  self.port = c.port
  self.host = c.host
  return self
end

function Server:url(path)
  local scheme = self.opts.tls and "https" or "http"
  local host = self.host or "127.0.0.1"
  if host:find(":") then
    host = "[" .. host .. "]"
  end
  return scheme .. "://" .. host .. ":" .. tostring(self.port) .. (path or "/")
end

function Server:ws_url(path)
  return (self:url(path):gsub("^http", "ws"))
end

function Server:connections()
  return self.core and self.core:connections() or 0
end

--- Stops listening and closes every connection. Inside a task it waits until
-- that is done (the port is free again); elsewhere it returns at once.
-- opts.drain_ms (inside a task): the requests in progress are first let
-- finish, for up to that long. New connections are refused at once, each
-- response closes its connection, and a request that comes meanwhile on one
-- left open is answered 503 "closing". Returns the requests cut off (0 when
-- every one was answered).
function Server:close(opts)
  local c = self.core
  if self.draining then
    self.draining = false -- closed again while draining: now
    return 0
  elseif not c then
    return 0
  end
  local drain_ms = opts and opts.drain_ms or 0
  local function busy()
    return math.max(self.in_flight, c:busy())
  end
  if drain_ms > 0 and busy() > 0 and task.running() then
    -- Until each handler has returned and its response is written.
    self.draining = true
    c:stop_listening()
    local deadline = timer.now() + drain_ms
    while self.draining and busy() > 0 and timer.now() < deadline do
      timer.sleep(5)
    end
    self.draining = false
  end
  local cut = busy()
  self.core = nil
  if task.running() then
    task.await(function(done)
      c:close(done)
    end)
  else
    c:close()
  end
  return cut
end

return M
