--- A stand-in for the ngrok v3 CLI in tests, run by tests/bin/ngrok.
--
--   ngrok http PORT --log stdout --log-format json
--
-- Environment:
--   FAKE_NGROK_MODE       ok (default): JSON log lines like ngrok's, and its local
--                         API GET /api/tunnels, which lists the tunnel only after
--                         FAKE_NGROK_DELAY_MS (300) - an empty list before, as
--                         while ngrok connects; runs until SIGTERM (exit 0).
--                         auth: ngrok's no-authtoken error (ERR_NGROK_4018) on
--                         stderr, exit 1.
--                         limit: the one-session limit (ERR_NGROK_108) as a JSON
--                         error line and ERROR lines on stderr, again every
--                         second, running until SIGTERM: ngrok retries a
--                         refused session (the repeated ERROR blocks quoted in
--                         vdesabou/kafka-docker-playground#7689; ngrok/ngrok-go#108).
--                         hang: logs its start and serves an empty tunnel list
--                         until SIGTERM.
--                         authretry: no authtoken as a current ngrok 3 logs it
--                         with --log-format json: "failed to reconnect session"
--                         and "session closing" error lines whose err ends in
--                         ERR_NGROK_4018, again every second, running until
--                         SIGTERM (the log quoted in runatlantis/atlantis#6164).
--                         longline: a 200 KB error line on stderr, exit 1.
--                         say: the first line of the file FAKE_NGROK_SAY as its error
--                         line on stderr, exit 1 (a file: callagent gives its
--                         children no variable that holds a secret).
--   FAKE_NGROK_API_PORT   port of the local API on 127.0.0.1 (default 0: any free one)
--   FAKE_NGROK_NO_WEB_LOG 1: do not log "starting web service" (the client must
--                         then know the API address from its config)
--   FAKE_NGROK_NO_WEB     1: no local API and no "starting web service" line, as
--                         with `web_addr: false` in ngrok.yml (ngrok/ngrok-docs
--                         agent/config/v3.mdx: "disable the web UI")
--   FAKE_NGROK_EXTRA      1: the API also lists an https tunnel for another port
--                         and an http one for ours, before ours
--   FAKE_NGROK_ADDR       form of config.addr: url (default, "http://localhost:PORT"),
--                         hostport ("localhost:PORT") or port ("PORT")
--   FAKE_NGROK_CONTROL    a directory, for a tunnel that dies: a run that finds
--                         no file "died" there exits (status 1, after a session
--                         error line, as when ngrok's session ends) once a file
--                         "die" appears, and makes "died"; a run that finds
--                         "died" lists its tunnel only once "back" appears;
--                         with a file "always" there, every run exits 1 s
--                         (or the milliseconds the file holds) after its
--                         tunnel is up; a first run whose tunnel is up, once
--                         a file "rebind" appears, logs a lost session and the
--                         tunnel started again under another URL (listed so),
--                         and once "refuse" appears, logs a reconnect refused
--                         with ERR_NGROK_334 every second (listing nothing),
--                         running on in both cases
--   FAKE_NGROK_STOP_MS    on SIGTERM, exits only this long after it (an ngrok slow
--                         to close its session)
--   FAKE_NGROK_LOG        a file that gets "start pid=N mode=M argv=...",
--                         "tunnel pid=N url=U addr=A" and "end pid=N signal=SIGTERM"
--                         (or "end pid=N status=1") lines
local http = require "callagent.http"
local json = require "callagent.json"
local timer = require "callagent.timer"
local runtime = require "callagent.runtime"

local args = { ... }
local mode = os.getenv("FAKE_NGROK_MODE") or "ok"
local log_path = os.getenv("FAKE_NGROK_LOG")
local pid = runtime.pid()

local function record(line)
  if log_path and log_path ~= "" then
    local f = assert(io.open(log_path, "a"))
    f:write(line, "\n")
    f:close()
  end
end

record("start pid=" .. pid .. " mode=" .. mode .. " argv=" .. table.concat(args, " "))

local function stamp()
  return os.date("!%Y-%m-%dT%H:%M:%S") .. "+0000"
end

local function jlog(fields)
  fields.t = stamp()
  io.stdout:write(json.encode(fields), "\n")
  io.stdout:flush()
end

local function usage_error(msg)
  io.stderr:write("ERROR:  ", msg, "\n")
  record("end pid=" .. pid .. " status=1 (usage)")
  os.exit(1)
end

-- ngrok http PORT --log stdout --log-format json (flags in any order).
if args[1] ~= "http" then
  usage_error("unknown command " .. tostring(args[1]))
end
local port, log_to, log_format
local i = 2
while i <= #args do
  local a = args[i]
  if a == "--log" then
    log_to, i = args[i + 1], i + 2
  elseif a == "--log-format" then
    log_format, i = args[i + 1], i + 2
  elseif not port and a:match("^%d+$") then
    port, i = tonumber(a), i + 1
  else
    usage_error("unknown flag or argument " .. a)
  end
end
if not port then
  usage_error("ngrok http needs the port to forward to")
end
if log_to ~= "stdout" or log_format ~= "json" then
  usage_error("this stand-in only logs with --log stdout --log-format json")
end

jlog({ lvl = "info", msg = "open config file", obj = "config", path = "/home/test/.config/ngrok/ngrok.yml", err = json.null })

if mode == "auth" then
  io.stderr:write("ERROR:  authentication failed: Usage of ngrok requires a verified account and authtoken.\n")
  io.stderr:write("ERROR:  \n")
  io.stderr:write("ERROR:  Sign up for an account: https://dashboard.ngrok.com/signup\n")
  io.stderr:write("ERROR:  Install your authtoken: https://dashboard.ngrok.com/get-started/your-authtoken\n")
  io.stderr:write("ERROR:  \n")
  io.stderr:write("ERROR:  ERR_NGROK_4018\n")
  io.stderr:write("ERROR:  https://ngrok.com/docs/errors/err_ngrok_4018\n")
  record("end pid=" .. pid .. " status=1")
  os.exit(1)
elseif mode == "longline" then
  io.stderr:write("ERROR:  ", string.rep("y", 200000), "\n")
  record("end pid=" .. pid .. " status=1")
  os.exit(1)
elseif mode == "say" then
  local f = assert(io.open((assert(os.getenv("FAKE_NGROK_SAY"), "FAKE_NGROK_SAY"))))
  io.stderr:write("ERROR:  ", f:read("l") or "", "\n")
  f:close()
  record("end pid=" .. pid .. " status=1")
  os.exit(1)
elseif mode ~= "ok" and mode ~= "hang" and mode ~= "authretry" and mode ~= "limit" then
  usage_error("FAKE_NGROK_MODE must be ok, auth, authretry, limit, longline, say or hang, not " .. mode)
end

local addr_form = os.getenv("FAKE_NGROK_ADDR") or "url"
local addr = ({ url = "http://localhost:" .. port, hostport = "localhost:" .. port, port = tostring(port) })[addr_form]
-- Each run its own host (as ngrok's free plan gives): the pid in it, as two
-- runs in the same second may start math.random alike.
local public = string.format("https://%04x-%04x-%04x.ngrok-free.app", pid, math.random(0, 0xffff),
  math.random(0, 0xffff))
local ready = false

local srv = http.server({ host = "127.0.0.1", port = tonumber(os.getenv("FAKE_NGROK_API_PORT")) or 0 })
srv:get("/api/tunnels", function()
  local list = json.array()
  if ready then
    if os.getenv("FAKE_NGROK_EXTRA") == "1" then
      list[#list + 1] = {
        name = "other",
        ID = "0c7d9f1b2e3a4f5d6c7b8a9e0f1d2c3b",
        uri = "/api/tunnels/other",
        public_url = "https://other-port.ngrok-free.app",
        proto = "https",
        config = { addr = "http://localhost:" .. (port + 1), inspect = true },
        metrics = {},
      }
      list[#list + 1] = {
        name = "command_line (http)",
        ID = "1d8e0a2c3f4b5a6e7d8c9b0a1f2e3d4c",
        uri = "/api/tunnels/command_line%20%28http%29",
        public_url = public:gsub("^https:", "http:"),
        proto = "http",
        config = { addr = addr, inspect = true },
        metrics = {},
      }
    end
    list[#list + 1] = {
      name = "command_line",
      ID = "2e9f1b3d4a5c6b7f8e9d0c1b2a3f4e5d",
      uri = "/api/tunnels/command_line",
      public_url = public,
      proto = "https",
      config = { addr = addr, inspect = true },
      metrics = { conns = { count = 0, gauge = 0 }, http = { count = 0 } },
    }
  end
  return 200, json.encode({ tunnels = list, uri = "/api/tunnels" }), { ["Content-Type"] = "application/json" }
end)
local keep
if os.getenv("FAKE_NGROK_NO_WEB") == "1" then
  keep = timer.every(3600000, function() end) -- holds the loop, as the server would
else
  assert(srv:listen())
end
if os.getenv("FAKE_NGROK_NO_WEB_LOG") ~= "1" and not keep then
  jlog({ lvl = "info", msg = "starting web service", obj = "web", addr = "127.0.0.1:" .. srv.port, allow_hosts = json.array() })
end
jlog({ lvl = "info", msg = "client session established", obj = "tunnels.session" })

local stop_ms = tonumber(os.getenv("FAKE_NGROK_STOP_MS"))
if stop_ms then
  runtime.grace_ms = stop_ms + 10000
end
runtime.on_shutdown(function(reason)
  record("end pid=" .. pid .. " signal=" .. tostring(reason))
  srv:close()
  if keep then
    keep:stop()
  end
  if stop_ms then
    timer.sleep(stop_ms)
  end
end)

local control = os.getenv("FAKE_NGROK_CONTROL")
local function exists(name)
  local f = control and control ~= "" and io.open(control .. "/" .. name)
  if f then
    f:close()
  end
  return f ~= nil
end
local second = exists("died")

-- Checks every 50 ms until exists(name), then runs fn.
local function when(name, fn)
  local t
  t = timer.every(50, function()
    if exists(name) then
      t:stop()
      fn()
    end
  end)
end

local function up()
  if second and not exists("back") and not exists("always") then
    return when("back", up)
  end
  ready = true
  record("tunnel pid=" .. pid .. " url=" .. public .. " addr=" .. addr)
  jlog({ lvl = "info", msg = "started tunnel", obj = "tunnels", name = "command_line", addr = addr, url = public })
  local function die()
    assert(io.open(control .. "/died", "w")):close()
    local said = "session closed by the remote: the tunnel session was stopped"
    jlog({ lvl = "eror", msg = "session closing", obj = "tunnels.session", err = said })
    io.stderr:write("ERROR:  ", said, "\n")
    record("end pid=" .. pid .. " status=1")
    os.exit(1)
  end
  if exists("always") then
    local f = assert(io.open(control .. "/always"))
    local ms = tonumber(f:read("a"))
    f:close()
    timer.after(ms or 1000, die)
  elseif control and not second then
    when("die", die)
    -- Its session lost and reconnected, under another URL: ngrok runs on,
    -- logging the new one (ngrok's "failed to reconnect session" and
    -- "started tunnel" lines, inconshreveable/ngrok#66).
    when("rebind", function()
      public = public:gsub("^https://", "https://re-")
      jlog({ lvl = "eror", msg = "failed to reconnect session", obj = "tunnels.session",
        err = "read tcp 192.168.0.173:48720->3.15.55.144:443: i/o timeout" })
      jlog({ lvl = "info", msg = "client session established", obj = "tunnels.session" })
      record("tunnel pid=" .. pid .. " url=" .. public .. " addr=" .. addr)
      jlog({ lvl = "info", msg = "started tunnel", obj = "tunnels", name = "command_line", addr = addr, url = public })
    end)
    -- Its session lost, and every reconnect refused (the tunnel still bound
    -- to the old session, after a laptop's sleep: inconshreveable/ngrok#937):
    -- ngrok runs on, retrying every second, its tunnel gone.
    when("refuse", function()
      ready = false
      local function refused()
        jlog({ lvl = "eror", msg = "failed to reconnect session", obj = "tunnels.session",
          err = "The tunnel '" .. public .. "' is already bound to another tunnel session\r\n\r\nERR_NGROK_334\r\n" })
      end
      refused()
      timer.every(1000, refused)
    end)
  end
end

if mode == "authretry" then
  local said = "authentication failed: Usage of ngrok requires a verified account and authtoken.\n\n"
    .. "Sign up for an account: https://dashboard.ngrok.com/signup\n"
    .. "Install your authtoken: https://dashboard.ngrok.com/get-started/your-authtoken\r\n\r\nERR_NGROK_4018\r\n"
  local function fail_session()
    jlog({ lvl = "eror", msg = "failed to reconnect session", obj = "tunnels.session", err = said })
    jlog({ lvl = "eror", msg = "session closing", obj = "tunnels.session", err = said })
  end
  fail_session()
  timer.every(1000, fail_session)
elseif mode == "limit" then
  local said = "authentication failed: Your account is limited to 1 simultaneous ngrok agent sessions."
  local function refused()
    jlog({ lvl = "eror", msg = "failed to reconnect session", obj = "tunnels.session",
      err = said .. "\r\n\r\nERR_NGROK_108\r\n" })
    io.stderr:write("ERROR:  ", said, "\n")
    io.stderr:write("ERROR:  Run multiple endpoints at the same time from a single agent by defining them in your "
      .. "agent configuration file and running `ngrok start --all`.\n")
    io.stderr:write("ERROR:  \n")
    io.stderr:write("ERROR:  ERR_NGROK_108\n")
    io.stderr:write("ERROR:  https://ngrok.com/docs/errors/err_ngrok_108\n")
    io.stderr:write("ERROR:  \n")
  end
  refused()
  timer.every(1000, refused)
end
if mode == "ok" then
  timer.after(tonumber(os.getenv("FAKE_NGROK_DELAY_MS")) or 300, up)
end
-- Keeps running (the server holds the loop) until SIGTERM.
