--- callagent.ws: WebSocket client (ws:// and wss://).
--
--   local ws = require "callagent.ws"
--   -- inside a task: waits until connected (or failed)
--   local conn, err = ws.connect("wss://api.example.com/v1/realtime?model=x", {
--     headers = { Authorization = "Bearer " .. key },  -- extra handshake headers
--                                     -- (not Host, Upgrade, Connection nor a
--                                     -- Sec-WebSocket-Key/-Version/-Extensions:
--                                     -- the handshake's own; raises)
--     ca_file = "/path/test-ca.pem",  -- extra trusted CAs (system store always on)
--     timeout = 10000,                -- connect + handshake, ms
--     ping_interval = 20,             -- s of silence before a ping; no pong within
--     pong_timeout = 10,              --   pong_timeout s closes the connection
--     max_message = 16 * 1024 * 1024, max_send_queue = 4 * 1024 * 1024,
--     on_text = function(conn, msg) end,     -- optional handlers (plain calls);
--     on_binary = function(conn, data) end,  -- without them messages queue up
--     on_close = function(conn, code, reason) end,  -- for conn:receive()
--   })
--   conn:send("text"); conn:send_binary(bytes); conn:close(1000, "bye")
--   local kind, data = conn:receive(5000)   -- "text"|"binary", payload;
--                                           -- "close", code, reason; nil, "ETIMEDOUT"
--   conn.response_headers                   -- the server's handshake headers
--   conn.tls    -- over wss://: { version = "TLSv1.3", cipher = "...",
--               --   resumed = true when an earlier session with the same
--               --   server was resumed (no certificate exchange) }; nil over ws://
--
-- Errors ("ECODE: message"): EINVAL (bad URL), ETIMEDOUT, ECONNREFUSED,
-- ENOTFOUND, ETLS (certificate or TLS failure), EHANDSHAKE (no upgrade: the
-- message holds the HTTP status; or a 101 without the right Accept, with an
-- extension, or with a subprotocol the headers' Sec-WebSocket-Protocol did
-- not offer), ECANCELED. Header values never appear in
-- errors or logs. ws.connect_cb(url, opts, fn) is the callback form: fn(conn)
-- or fn(nil, err).
local core = require "callagent.core.ws"
local task = require "callagent.task"

local M = {}

local function start(url, opts, on_result)
  opts = opts or {}
  local queue
  local on_text, on_binary, on_close = opts.on_text, opts.on_binary, opts.on_close
  local conn, err = core.connect({
    url = url,
    headers = opts.headers,
    ca_file = opts.ca_file,
    timeout = opts.timeout,
    ping_interval = opts.ping_interval,
    pong_timeout = opts.pong_timeout,
    max_message = opts.max_message,
    max_send_queue = opts.max_send_queue,
  }, function(c, event, a, b)
    if event == "text" then
      if on_text then
        on_text(c, a)
      else
        queue:push({ "text", a })
      end
    elseif event == "binary" then
      if on_binary then
        on_binary(c, a)
      else
        queue:push({ "binary", a })
      end
    elseif event == "open" then
      c.response_headers = a
      c.tls = b
      on_result(c)
    elseif event == "close" then
      if on_close then
        on_close(c, a, b)
      end
      queue:push({ "close", a, b })
      queue:close()
    elseif event == "error" then
      on_result(nil, a)
    end
  end)
  if not conn then
    return on_result(nil, err)
  end
  queue = task.queue()
  conn._queue = queue
end

--- Next event: "text"|"binary", data; or "close", code, reason; or nil, "ETIMEDOUT"/"ECLOSED".
local function receive(conn, timeout_ms)
  local item, err = conn._queue:pop(timeout_ms)
  if not item then
    return nil, err
  end
  return item[1], item[2], item[3]
end

function M.connect(url, opts)
  local over = false
  -- Over however the wait ends: an error too (a yield across a C call).
  local _ <close> = setmetatable({}, { __close = function()
    over = true
  end })
  local conn, err = task.await(function(done)
    start(url, opts, function(c, e)
      -- The wait ended before (the task was resumed from elsewhere): no one
      -- would ever hold this connection, and it stayed open, pinged, for good.
      if over and c then
        c:close(1001, "not needed")
        return
      end
      done(c, e)
    end)
  end)
  if conn then
    conn.receive = receive
  end
  return conn, err
end

function M.connect_cb(url, opts, fn)
  start(url, opts, function(conn, err)
    if conn then
      conn.receive = receive
    end
    fn(conn, err)
  end)
end

return M
