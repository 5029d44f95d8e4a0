-- Tunnels: callagent.tunnel against stand-ins for the ngrok and tailscale
-- CLIs (tests/bin). Each case runs a child callagent whose PATH holds only
-- the stand-ins it needs, so finding (or not finding) a program, its
-- arguments, its output and its end are all real; the stand-ins log every
-- invocation to a file the test reads.
local T = require "testing"
local json = require "callagent.json"
local task = require "callagent.task"
local tunnel = require "callagent.tunnel"

local BIN = T.root .. "/tests/bin"
local PORT = 4545 -- the port the tunnels forward to (nothing needs to listen there)

-- The child: opens a tunnel (config from TUNNEL_CFG) and prints one JSON line,
-- {url, provider, pid, ms} or {err, ms}; on SIGTERM it closes the tunnel and
-- prints {"closed": true}.
local DRIVER = [[
local tunnel = require "callagent.tunnel"
local json = require "callagent.json"
local task = require "callagent.task"
local timer = require "callagent.timer"
local runtime = require "callagent.runtime"
local function say(t)
  io.stdout:write(json.encode(t), "\n")
  io.stdout:flush()
end
task.spawn(function()
  local t0 = timer.now()
  local t, err = tunnel.open(json.decode(os.getenv("TUNNEL_CFG")), tonumber(os.getenv("TUNNEL_PORT")))
  local ms = timer.now() - t0
  if not t then
    say({ err = err, ms = ms })
    return runtime.stop(0)
  end
  local keep = timer.every(3600000, function() end)
  runtime.on_shutdown(function()
    keep:stop()
    t:close()
    t:close()
    say({ closed = true })
  end)
  say({ url = t.url, provider = t.provider, pid = t.pid or json.null, ms = ms })
end)
]]

-- A folder with only the named stand-ins in it, for PATH.
local function bindir(names)
  local dir = T.tmpdir()
  for _, n in ipairs(names) do
    T.ok(os.execute(string.format("ln -s '%s/%s' '%s/%s'", BIN, n, dir, n)), "symlink " .. n)
  end
  return dir
end

local function read_lines(path)
  local f = io.open(path)
  if not f then
    return {}
  end
  local lines = {}
  for l in f:lines() do
    lines[#lines + 1] = l
  end
  f:close()
  return lines
end

local function grep(lines, pattern)
  for _, l in ipairs(lines) do
    local a, b = l:match(pattern)
    if a then
      return a, b
    end
  end
  return nil
end

-- Every line matching pattern.
local function grep_all(lines, pattern)
  local out = {}
  for _, l in ipairs(lines) do
    if l:find(pattern) then
      out[#out + 1] = l
    end
  end
  return out
end

-- Whether a pid is gone (no /proc entry, or a zombie).
local function pid_gone(pid)
  local f = io.open(string.format("/proc/%d/stat", pid))
  if not f then
    return true
  end
  local stat = f:read("a") or ""
  f:close()
  local state = stat:match("^%d+ %b() (%a)")
  return state == nil or state == "Z" or state == "X"
end

-- A scenario: opts.path (folder for PATH), opts.env (FAKE_* variables),
-- opts.cfg (the tunnel config). Returns the child's result, the child, and
-- the stand-ins' log files.
local function scenario(opts)
  local dir = T.tmpdir()
  local logs = { ngrok = dir .. "/ngrok.log", tailscale = dir .. "/tailscale.log" }
  local env = {
    PATH = opts.path,
    CALLAGENT_BIN = T.bin,
    TUNNEL_CFG = json.encode(opts.cfg),
    TUNNEL_PORT = tostring(PORT),
    FAKE_NGROK_LOG = logs.ngrok,
    FAKE_TAILSCALE_LOG = logs.tailscale,
  }
  for k, v in pairs(opts.env or {}) do
    env[k] = v
  end
  local results = task.queue()
  local p = T.spawn_app(nil, nil, {
    source = DRIVER,
    name = "driver.lua",
    env = env,
    on_stdout = function(line)
      results:push(line)
    end,
  })
  local first = results:pop(20000)
  T.ok(first, "the driver printed a result; stderr: " .. p.errtext())
  local r = json.decode(first)
  r.next = function()
    local l = results:pop(10000)
    return l and json.decode(l)
  end
  return r, p, logs
end

-- Ends the driver with SIGTERM (which closes its tunnel) and waits for it.
local function stop_driver(r, p)
  T.ok(p:kill("SIGTERM"))
  T.eq(r.next(), { closed = true }, "the driver closed its tunnel")
  T.eq(p:wait(10000), 0, "the driver's exit status")
end

T.test("ngrok addresses of our port are recognised in every form ngrok writes, other hosts are not", function()
  local lp = tunnel._local_port
  T.eq(lp("http://localhost:4545"), 4545)
  T.eq(lp("https://localhost:4545"), 4545)
  T.eq(lp("localhost:4545"), 4545)
  T.eq(lp("4545"), 4545)
  T.eq(lp("http://127.0.0.1:4545"), 4545)
  T.eq(lp("[::1]:4545"), 4545)
  T.eq(lp("http://localhost:45450"), 45450)
  T.eq(lp("example.com:4545"), nil)
  T.eq(lp("http://10.0.0.2:4545"), nil)
end)

T.test('tunnel.provider "none" refuses at once and points to server.publicBaseUrl', function()
  local t, err = tunnel.open({ provider = "none" }, PORT)
  T.eq(t, nil)
  T.eq(err, 'tunnel: tunnel.provider is "none"; set server.publicBaseUrl to the URL the telephony vendor reaches this server at')
end)

T.test("tunnel.open given a canceled tunnel.cancel() fails at once, starting nothing", function()
  local c = tunnel.cancel()
  T.eq(c.canceled, false)
  c:cancel()
  c:cancel()
  T.eq(c.canceled, true)
  local t, err, kind = tunnel.open({ provider = "auto" }, PORT, nil, { cancel = c })
  T.eq(t, nil)
  T.eq({ err, kind }, { "tunnel: canceled", "canceled" })
  T.ok(not pcall(tunnel.open, { provider = "ngrok" }, PORT, nil, { cancel = {} }), "a cancel of another kind is refused")
end)

T.test("ngrok: the https URL comes from ngrok's own API (the address it logs), and close() ends ngrok with SIGTERM", function()
  -- ngrokApiUrl points nowhere: the API must be found through ngrok's "starting web service" line.
  local r, p, logs = scenario({
    path = bindir({ "ngrok" }),
    cfg = { provider = "ngrok", timeoutSec = 10, ngrokApiUrl = "http://127.0.0.1:1" },
  })
  T.eq(r.err, nil)
  T.eq(r.provider, "ngrok")
  local log = read_lines(logs.ngrok)
  T.eq(grep(log, "^start pid=%d+ mode=ok argv=(.*)$"), "http " .. PORT .. " --log stdout --log-format json")
  local pid, url = grep(log, "^tunnel pid=(%d+) url=(%S+)")
  T.eq(r.url, url, "the URL ngrok's API listed")
  T.match(r.url, "^https://[%x-]+%.ngrok%-free%.app$")
  T.eq(r.pid, tonumber(pid), "the tunnel's ngrok is the one that logged")
  T.ge(r.ms, 300, "the tunnel is listed only after 300 ms, so the API was polled")
  T.ok(not pid_gone(r.pid), "ngrok runs while the tunnel is open")
  T.eq(grep(log, "^(end) "), nil)

  stop_driver(r, p)
  log = read_lines(logs.ngrok)
  T.eq(grep(log, "^end pid=(%d+) signal=(%S+)$"), pid)
  T.eq(select(2, grep(log, "^end pid=(%d+) signal=(%S+)$")), "SIGTERM")
  T.ok(pid_gone(r.pid), "no ngrok process is left")
end)

T.test("ngrok: without its web-service line the API is read at tunnel.ngrokApiUrl; other ports and http URLs are skipped", function()
  local api = T.free_port()
  local r, p, logs = scenario({
    path = bindir({ "ngrok" }),
    env = {
      FAKE_NGROK_NO_WEB_LOG = "1",
      FAKE_NGROK_API_PORT = tostring(api),
      FAKE_NGROK_EXTRA = "1",
      FAKE_NGROK_ADDR = "hostport",
    },
    cfg = { provider = "ngrok", timeoutSec = 10, ngrokApiUrl = "http://127.0.0.1:" .. api .. "/" },
  })
  T.eq(r.err, nil)
  local _, url = grep(read_lines(logs.ngrok), "^tunnel pid=(%d+) url=(%S+) addr=localhost:" .. PORT .. "$")
  T.ok(url, "the stand-in listed localhost:PORT")
  T.eq(r.url, url, "our port's https tunnel, not the other port's nor the http one")
  stop_driver(r, p)
end)

T.test("ngrok without an authtoken: the error says how to log in, quoting ngrok", function()
  local r, _, logs = scenario({
    path = bindir({ "ngrok" }),
    env = { FAKE_NGROK_MODE = "auth" },
    cfg = { provider = "ngrok", timeoutSec = 10 },
  })
  T.eq(r.err, "tunnel: ngrok is not logged in: run `ngrok config add-authtoken <token>` "
    .. "(ngrok said: authentication failed: Usage of ngrok requires a verified account and authtoken.)")
  T.lt(r.ms, 5000, "no waiting for the timeout")
  T.ok(grep(read_lines(logs.ngrok), "^(end) pid=%d+ status=1$"))
end)

T.test("ngrok without an authtoken that keeps retrying (its JSON log only): the same error at once, ngrok stopped", function()
  local r, _, logs = scenario({
    path = bindir({ "ngrok" }),
    env = { FAKE_NGROK_MODE = "authretry" },
    cfg = { provider = "ngrok", timeoutSec = 10 },
  })
  T.eq(r.err, "tunnel: ngrok is not logged in: run `ngrok config add-authtoken <token>` "
    .. "(ngrok said: authentication failed: Usage of ngrok requires a verified account and authtoken.)")
  T.lt(r.ms, 5000, "no waiting for the timeout")
  T.ok(grep(read_lines(logs.ngrok), "^(end) pid=%d+ signal="), "ngrok was stopped")
end)

T.test("ngrok retrying a session the service refused (ERR_NGROK_108): the error at once with its code and what to do, ngrok stopped", function()
  local r, _, logs = scenario({
    path = bindir({ "ngrok" }),
    env = { FAKE_NGROK_MODE = "limit" },
    cfg = { provider = "ngrok", timeoutSec = 5 },
  })
  -- Not ngrok's own advice (`ngrok start --all`): the other session is most
  -- often an `ngrok http` the user left running.
  T.eq(r.err, "tunnel: ngrok did not open a tunnel: authentication failed: "
    .. "Your account is limited to 1 simultaneous ngrok agent sessions. (ERR_NGROK_108): is another ngrok running "
    .. "with this account (an `ngrok http` in another terminal)? Stop it, or set server.publicBaseUrl")
  T.lt(r.ms, 3000, "not the whole tunnel.timeoutSec: auto has the other tool to try in it")
  T.ok(grep(read_lines(logs.ngrok), "^(end) pid=%d+ signal="), "ngrok was stopped")
end)

T.test("ngrok that fails with a 200 KB line: the error quotes 300 bytes of it", function()
  local r = scenario({
    path = bindir({ "ngrok" }),
    env = { FAKE_NGROK_MODE = "longline" },
    cfg = { provider = "ngrok", timeoutSec = 5 },
  })
  T.eq(r.err, "tunnel: ngrok exited (status 1) before opening a tunnel: " .. string.rep("y", 300))
end)

-- A scenario whose stand-in ngrok fails with the given line on stderr.
local function ngrok_says(line)
  local dir = T.tmpdir()
  local f = assert(io.open(dir .. "/say", "wb"))
  f:write(line, "\n")
  f:close()
  return scenario({
    path = bindir({ "ngrok" }),
    env = { FAKE_NGROK_MODE = "say", FAKE_NGROK_SAY = dir .. "/say" },
    cfg = { provider = "ngrok", timeoutSec = 5 },
  })
end

T.test("ngrok's garbage in an error: one line of UTF-8, control characters as spaces, cut between characters", function()
  local prefix = "tunnel: ngrok exited (status 1) before opening a tunnel: "
  local r = ngrok_says("bad\0bytes\27[31m red\255\254 end")
  T.eq(r.err, prefix .. "bad bytes [31m red\u{FFFD}\u{FFFD} end")
  -- 300 bytes would end inside the 150th "é" (2 bytes each, after one "x").
  r = ngrok_says("x" .. string.rep("é", 400))
  T.eq(r.err, prefix .. "x" .. string.rep("é", 149))
end)

T.test("ngrok's error quoting the authtoken (ERR_NGROK_105/107: 'Your authtoken: ...') is quoted without it", function()
  local token = "2fAkEngrokTok3n_0123456789abcdefghijklmnopq"
  local r, p = ngrok_says("authentication failed: The authtoken you specified is properly formed, but it is invalid. "
    .. "Your authtoken: " .. token .. " This usually happens when: You reset your authtoken")
  T.eq(r.err, "tunnel: ngrok is not logged in: run `ngrok config add-authtoken <token>` (ngrok said: authentication "
    .. "failed: The authtoken you specified is properly formed, but it is invalid. Your authtoken: [redacted] This "
    .. "usually happens when: You reset your authtoken)")
  T.eq(p:wait(5000), 0)
  T.no_match(p.text() .. p.errtext(), token:sub(1, 12), "nowhere, not in part")
end)

T.test("an authtoken quoted as a JSON field, in capitals or with a comma in it is redacted too", function()
  -- "[Aa]uthtoken:" followed by [^%s,;]+ let each of these through: the
  -- JSON key's closing quote comes before its ':', NGROK_AUTHTOKEN is in
  -- capitals, and a malformed token (ERR_NGROK_105) may hold a comma.
  local token = "2fAkEngrokTok3n_0123456789abcdefghijklmnopq"
  local prefix = "tunnel: ngrok exited (status 1) before opening a tunnel: "
  for _, case in ipairs({
    { '{"lvl":"eror","authtoken":"' .. token .. '","msg":"bad"', '{"lvl":"eror","authtoken":"[redacted]","msg":"bad"' },
    { "env: NGROK_AUTHTOKEN=" .. token .. " set", "env: NGROK_AUTHTOKEN=[redacted] set" },
    { "Your authtoken: abc," .. token, "Your authtoken: [redacted]" },
    { "Your Authtoken: 'abc " .. token .. "' is bad", "Your Authtoken: '[redacted]' is bad" },
    { 'err="{\\"authtoken\\": \\"' .. token .. '\\"}"', 'err="{\\"authtoken\\": \\"[redacted]\\"}"' },
  }) do
    local r, p = ngrok_says(case[1])
    T.eq(r.err, prefix .. case[2], case[1])
    T.eq(p:wait(5000), 0)
    T.no_match(p.text() .. p.errtext(), token:sub(1, 12), "nowhere, not in part")
  end
end)

T.test("a redacted authtoken leaves room for what follows it: no U+FFFD for a character cut before the redaction", function()
  -- The line was cut at 304 bytes before the token was replaced: a
  -- character cut there became U+FFFD, then the shorter text ended with it.
  local token = string.rep("t", 100)
  local r = ngrok_says("xYour authtoken: " .. token .. " " .. string.rep("é", 100))
  T.eq(r.err, "tunnel: ngrok exited (status 1) before opening a tunnel: xYour authtoken: [redacted] "
    .. string.rep("é", 100))
end)

T.test("ngrok that never opens a tunnel: timeout error after tunnel.timeoutSec, and ngrok is killed", function()
  local r, _, logs = scenario({
    path = bindir({ "ngrok" }),
    env = { FAKE_NGROK_MODE = "hang" },
    cfg = { provider = "ngrok", timeoutSec = 1 },
  })
  T.eq(r.err, "tunnel: no ngrok tunnel for port " .. PORT .. " after 1 s")
  T.ge(r.ms, 1000)
  T.lt(r.ms, 3000)
  local log = read_lines(logs.ngrok)
  local pid = grep(log, "^start pid=(%d+) mode=hang")
  T.ok(pid, "ngrok was started")
  T.eq(grep(log, "^end pid=" .. pid .. " signal=(%S+)$"), "SIGTERM")
  T.ok(pid_gone(tonumber(pid)), "no ngrok process is left")
end)

T.test("ngrok with its local API turned off (web_addr: false): the timeout error says that is why", function()
  local r = scenario({
    path = bindir({ "ngrok" }),
    env = { FAKE_NGROK_NO_WEB = "1", FAKE_NGROK_DELAY_MS = "0" },
    cfg = { provider = "ngrok", timeoutSec = 1, ngrokApiUrl = "http://127.0.0.1:9" },
  })
  T.eq(r.err, "tunnel: no ngrok tunnel for port " .. PORT .. " after 1 s (ngrok logged no \"starting web service\": "
    .. "callagent reads the tunnel's URL from ngrok's local API, which `web_addr: false` in ngrok.yml turns off; "
    .. "remove it, or set tunnel.ngrokApiUrl to its address)")
end)

T.test("ngrok not installed: the error says so and names server.publicBaseUrl", function()
  local r = scenario({ path = bindir({}), cfg = { provider = "ngrok", timeoutSec = 5 } })
  T.eq(r.err, "tunnel: ngrok is not installed (not found in PATH); install it or set server.publicBaseUrl")
end)

T.test("tailscale: funnel --bg PORT publishes https://<Self.DNSName>, close() runs `funnel --https=443 off`", function()
  local r, p, logs = scenario({
    path = bindir({ "tailscale" }),
    cfg = { provider = "tailscale", timeoutSec = 10 },
  })
  T.eq(r.err, nil)
  T.eq(r.provider, "tailscale")
  T.eq(r.url, "https://box.tail1234.ts.net")
  T.eq(read_lines(logs.tailscale), { "status --json", "exit 0", "funnel status --json", "exit 0", "funnel --bg " .. PORT, "exit 0" })
  stop_driver(r, p)
  T.eq(read_lines(logs.tailscale), {
    "status --json",
    "exit 0",
    "funnel status --json",
    "exit 0",
    "funnel --bg " .. PORT,
    "exit 0",
    "funnel --https=443 off",
    "exit 0",
  }, "off ran once (close is idempotent) and succeeded")
end)

-- A serve config as `tailscale funnel status --json` prints it: port 443 of
-- box.tail1234.ts.net proxied to target.
local function serve_json(target)
  return json.encode({
    TCP = { ["443"] = { HTTPS = true } },
    Web = { ["box.tail1234.ts.net:443"] = { Handlers = { ["/"] = { Proxy = target } } } },
  })
end

T.test("tailscale already serving something else on https 443: refused, not replaced (and removed at the stop)", function()
  local r, _, logs = scenario({
    path = bindir({ "tailscale" }),
    env = { FAKE_TAILSCALE_SERVE_JSON = serve_json("http://127.0.0.1:3000") },
    cfg = { provider = "tailscale", timeoutSec = 10 },
  })
  T.eq(r.url, nil)
  T.eq(r.err, "tunnel: tailscale already serves https://box.tail1234.ts.net/ (proxy http://127.0.0.1:3000): "
    .. "`tailscale funnel --bg " .. PORT .. "` would replace it, and its stop remove it; free https port 443 "
    .. "(see `tailscale funnel status`), or set server.publicBaseUrl")
  T.eq(read_lines(logs.tailscale), { "status --json", "exit 0", "funnel status --json", "exit 0" })
end)

T.test("tailscale still serving our own port (a funnel left by a callagent that was killed): published again", function()
  local r, p = scenario({
    path = bindir({ "tailscale" }),
    env = { FAKE_TAILSCALE_SERVE_JSON = serve_json("http://127.0.0.1:" .. PORT) },
    cfg = { provider = "tailscale", timeoutSec = 10 },
  })
  T.eq(r.err, nil)
  T.eq(r.url, "https://box.tail1234.ts.net")
  stop_driver(r, p)
end)

T.test("tailscale whose `funnel off` is slow at the stop: the stop waits 5 s, then leaves it to finish, not killed", function()
  local r, p, logs = scenario({
    path = bindir({ "tailscale" }),
    env = { FAKE_TAILSCALE_OFF_DELAY = "8" },
    cfg = { provider = "tailscale", timeoutSec = 10 },
  })
  T.eq(r.url, "https://box.tail1234.ts.net")
  local timer = require "callagent.timer"
  local t0 = timer.now()
  stop_driver(r, p)
  -- Not the 8 s of the off: the bounds leave a loaded ASan run room.
  T.ge(timer.now() - t0, 4900, "the stop waited OFF_MS for it")
  T.lt(timer.now() - t0, 6500, "and no longer")
  T.match(p.errtext(), "WARN tunnel: `tailscale funnel %-%-https=443 off` is still running after 5 s: left to finish")
  -- Killed, the funnel would stay published after the app: it is not.
  T.wait_for(function()
    local lines = read_lines(logs.tailscale)
    return lines[#lines] == "exit 0" and lines[#lines - 1] == "off waits 8 s"
  end, 6000, "the off to finish on its own: " .. table.concat(read_lines(logs.tailscale), " | "))
end, { timeout = 30000 })

T.test("tailscale logged out: the error says to run `tailscale up`, and no funnel is attempted", function()
  local r, _, logs = scenario({
    path = bindir({ "tailscale" }),
    env = { FAKE_TAILSCALE_MODE = "needslogin" },
    cfg = { provider = "tailscale", timeoutSec = 10 },
  })
  T.eq(r.err, "tunnel: tailscale is not logged in: run `tailscale up`")
  T.eq(read_lines(logs.tailscale), { "status --json", "exit 0" })
end)

T.test("tailscale without Funnel permission: the error quotes tailscale's reason and link", function()
  local r = scenario({
    path = bindir({ "tailscale" }),
    env = { FAKE_TAILSCALE_MODE = "nofunnel" },
    cfg = { provider = "tailscale", timeoutSec = 10 },
  })
  T.eq(r.err, 'tunnel: tailscale Funnel is not available for this machine: Funnel not available; "funnel" node attribute '
    .. "not set. See https://tailscale.com/s/no-funnel.")
end)

T.test("tailscale waiting for Funnel to be enabled: stopped after tunnel.timeoutSec, the error gives the admin link", function()
  local r, _, logs = scenario({
    path = bindir({ "tailscale" }),
    env = { FAKE_TAILSCALE_MODE = "enable" },
    cfg = { provider = "tailscale", timeoutSec = 1 },
  })
  T.eq(r.err, "tunnel: tailscale Funnel is not enabled on this tailnet: visit "
    .. "https://login.tailscale.com/f/funnel?node=nTEST123CNTRL to enable it, then try again")
  T.ge(r.ms, 900)
  T.lt(r.ms, 3000)
  -- No `funnel --https=443 off` after it: the CLI asks for the link before
  -- it sets anything, and an off would wait for the link just the same.
  T.eq(read_lines(logs.tailscale), { "status --json", "exit 0", "funnel status --json", "exit 0", "funnel --bg " .. PORT, "waiting" })
end)

T.test("tailscale whose `funnel --bg` exits 0 without publishing (Funnel not enabled, no wait): an error with the admin link, not a dead URL", function()
  local r, _, logs = scenario({
    path = bindir({ "tailscale" }),
    env = { FAKE_TAILSCALE_MODE = "enablenowait" },
    cfg = { provider = "tailscale", timeoutSec = 10 },
  })
  T.eq(r.url, nil)
  T.eq(r.err, "tunnel: tailscale Funnel is not enabled on this tailnet: visit "
    .. "https://login.tailscale.com/f/funnel?node=nTEST123CNTRL to enable it, then try again")
  T.eq(read_lines(logs.tailscale), { "status --json", "exit 0", "funnel status --json", "exit 0", "funnel --bg " .. PORT, "exit 0" })
end)

T.test("tailscale whose `funnel --bg` exits 0 saying only why it did not publish: the error quotes it", function()
  local r = scenario({
    path = bindir({ "tailscale" }),
    env = { FAKE_TAILSCALE_MODE = "nopermission" },
    cfg = { provider = "tailscale", timeoutSec = 10 },
  })
  T.eq(r.url, nil)
  T.eq(r.err, "tunnel: `tailscale funnel --bg " .. PORT .. "` published nothing (no https://box.tail1234.ts.net "
    .. "in its output): You don't have permission to enable this feature.")
end)

T.test("tailscale older than 1.52 (no `funnel --bg`): the error says to update it, naming its version", function()
  local r, _, logs = scenario({
    path = bindir({ "tailscale" }),
    env = { FAKE_TAILSCALE_MODE = "old" },
    cfg = { provider = "tailscale", timeoutSec = 10 },
  })
  T.eq(r.err, "tunnel: tailscale 1.50.1 is too old for `tailscale funnel --bg` (Tailscale 1.52 or later): "
    .. "update it, or set server.publicBaseUrl (tailscale said: flag provided but not defined: -bg)")
  T.eq(read_lines(logs.tailscale), { "status --json", "exit 0", "funnel status --json", "exit 0", "funnel --bg " .. PORT, "exit 2" })
end)

T.test("an old tailscale CLI talking to a newer tailscaled: too old, without the daemon's version", function()
  local r = scenario({
    path = bindir({ "tailscale" }),
    env = { FAKE_TAILSCALE_MODE = "oldcli" },
    cfg = { provider = "tailscale", timeoutSec = 10 },
  })
  T.eq(r.err, "tunnel: tailscale is too old for `tailscale funnel --bg` (Tailscale 1.52 or later): "
    .. "update it, or set server.publicBaseUrl (tailscale said: flag provided but not defined: -bg)")
end)

T.test("tailscaled not running, or not reachable: the error quotes the CLI's reason and hint, not a guess", function()
  local r = scenario({
    path = bindir({ "tailscale" }),
    env = { FAKE_TAILSCALE_MODE = "nodaemon" },
    cfg = { provider = "tailscale", timeoutSec = 10 },
  })
  T.eq(r.err, "tunnel: tailscale cannot reach tailscaled: failed to connect to local tailscaled; it doesn't appear "
    .. "to be running (sudo systemctl start tailscaled ?)")
  r = scenario({
    path = bindir({ "tailscale" }),
    env = { FAKE_TAILSCALE_MODE = "noreach" },
    cfg = { provider = "tailscale", timeoutSec = 10 },
  })
  T.match(r.err, "^tunnel: tailscale cannot reach tailscaled: failed to connect to local tailscaled %(which appears to "
    .. "be running as /usr/sbin/tailscaled, pid 812%)%. Got error: ")
end)

T.test("tailscale refusing a user who is not its operator: the error says to run `tailscale set --operator`", function()
  local r = scenario({
    path = bindir({ "tailscale" }),
    env = { FAKE_TAILSCALE_MODE = "denied" },
    cfg = { provider = "tailscale", timeoutSec = 10 },
  })
  T.eq(r.err, "tunnel: tailscale refused (Access denied: serve config denied): run `sudo tailscale set "
    .. "--operator=$USER` once, so callagent may configure Funnel")
end)

T.test("tailscale whose `funnel --bg` hangs after publishing: stopped at tunnel.timeoutSec, then `funnel off` undoes it", function()
  local r, _, logs = scenario({
    path = bindir({ "tailscale" }),
    env = { FAKE_TAILSCALE_MODE = "hang" },
    cfg = { provider = "tailscale", timeoutSec = 1 },
  })
  T.eq(r.err, "tunnel: `tailscale funnel --bg " .. PORT .. "` did not finish within 1 s")
  T.lt(r.ms, 3000)
  T.eq(read_lines(logs.tailscale), { "status --json", "exit 0", "funnel status --json", "exit 0", "funnel --bg " .. PORT, "published",
    "funnel --https=443 off", "exit 0" })
end)

T.test("tailscale that floods its output: an error after tunnel.timeoutSec, the output not all kept", function()
  local r = scenario({
    path = bindir({ "tailscale" }),
    env = { FAKE_TAILSCALE_MODE = "flood" },
    cfg = { provider = "tailscale", timeoutSec = 1 },
  })
  T.match(r.err, "^tunnel: ")
  T.lt(r.ms, 5000, "not a minute spent on the output")
end)

T.test("tailscale that fails with a 200 KB line: the error quotes 300 bytes of it", function()
  local r = scenario({
    path = bindir({ "tailscale" }),
    env = { FAKE_TAILSCALE_MODE = "longline" },
    cfg = { provider = "tailscale", timeoutSec = 5 },
  })
  T.eq(r.err, "tunnel: `tailscale status --json` failed (status 1): " .. string.rep("x", 300))
end)

T.test("auto prefers ngrok when both are installed", function()
  local r, p, logs = scenario({ path = bindir({ "ngrok", "tailscale" }), cfg = { provider = "auto", timeoutSec = 10 } })
  T.eq(r.provider, "ngrok")
  T.match(r.url, "%.ngrok%-free%.app$")
  T.eq(read_lines(logs.tailscale), {}, "tailscale was not run")
  stop_driver(r, p)
  T.eq(read_lines(logs.tailscale), {}, "tailscale was not run on close either")
end)

T.test("auto falls back to tailscale when ngrok is not installed", function()
  local r, p = scenario({ path = bindir({ "tailscale" }), cfg = { provider = "auto", timeoutSec = 10 } })
  T.eq(r.provider, "tailscale")
  T.eq(r.url, "https://box.tail1234.ts.net")
  stop_driver(r, p)
end)

T.test("auto falls back to tailscale when ngrok is not logged in", function()
  local r, p, logs = scenario({
    path = bindir({ "ngrok", "tailscale" }),
    env = { FAKE_NGROK_MODE = "auth" },
    cfg = { provider = "auto", timeoutSec = 10 },
  })
  T.eq(r.provider, "tailscale")
  T.eq(r.url, "https://box.tail1234.ts.net")
  T.ok(grep(read_lines(logs.ngrok), "^(start) pid=%d+ mode=auth"), "ngrok was tried first")
  stop_driver(r, p)
end)

T.test("auto reports each provider's reason when both fail", function()
  local r = scenario({
    path = bindir({ "ngrok", "tailscale" }),
    env = { FAKE_NGROK_MODE = "auth", FAKE_TAILSCALE_MODE = "needslogin" },
    cfg = { provider = "auto", timeoutSec = 10 },
  })
  T.eq(r.err, "tunnel: no tunnel could be opened: ngrok is not logged in: run `ngrok config add-authtoken <token>` "
    .. "(ngrok said: authentication failed: Usage of ngrok requires a verified account and authtoken.); "
    .. "tailscale is not logged in: run `tailscale up`. Fix one, or set server.publicBaseUrl")

  local r2 = scenario({
    path = bindir({ "tailscale" }),
    env = { FAKE_TAILSCALE_MODE = "nofunnel" },
    cfg = { provider = "auto", timeoutSec = 10 },
  })
  T.eq(r2.err, "tunnel: no tunnel could be opened: ngrok is not installed (not found in PATH); tailscale Funnel "
    .. 'is not available for this machine: Funnel not available; "funnel" node attribute not set. '
    .. "See https://tailscale.com/s/no-funnel.. Fix one, or set server.publicBaseUrl")
end)

T.test("auto takes at most tunnel.timeoutSec for both, not that for each", function()
  local r = scenario({
    path = bindir({ "ngrok", "tailscale" }),
    env = { FAKE_NGROK_MODE = "hang", FAKE_TAILSCALE_MODE = "enable" },
    cfg = { provider = "auto", timeoutSec = 2 },
  })
  T.match(r.err, "^tunnel: no tunnel could be opened: ")
  T.lt(r.ms, 3500, "one timeout, and the stop of ngrok")
end)

T.test("auto: once ngrok took all of tunnel.timeoutSec, tailscale is not started, and the error says so", function()
  local r, _, logs = scenario({
    path = bindir({ "ngrok", "tailscale" }),
    env = { FAKE_NGROK_MODE = "hang" },
    cfg = { provider = "auto", timeoutSec = 1 },
  })
  T.eq(r.err, "tunnel: no tunnel could be opened: no ngrok tunnel for port " .. PORT .. " after 1 s; "
    .. "tailscale was not tried: the first took all of tunnel.timeoutSec (1 s). Fix one, or set server.publicBaseUrl")
  T.eq(read_lines(logs.tailscale), {}, "tailscale never ran")
end)

T.test("auto with neither installed says to install one or set server.publicBaseUrl", function()
  local r = scenario({ path = bindir({}), cfg = { provider = "auto", timeoutSec = 5 } })
  T.eq(r.err, "tunnel: neither ngrok nor tailscale is installed; install one, or set server.publicBaseUrl")
end)

-- A Twilio app without server.publicBaseUrl, tunnel through ngrok.
local APP = [[
local callagent = require "callagent"
local task = require "callagent.task"
task.spawn(function()
  local app = assert(callagent.app({
    telephony = { provider = "twilio" },
    server = { port = 0 },
    twilio = { accountSid = "AC" .. string.rep("0", 32), authToken = "dummy-auth-token", fromNumber = "+15550001111" },
    openai = { apiKey = "sk-dummy" },
    tunnel = { provider = "ngrok", timeoutSec = 10 },
    store = { backend = "memory" },
  }))
  local ok, err = app:start()
  if not ok then
    io.stdout:write("START FAILED: ", err, "\n")
    io.stdout:flush()
    require("callagent.runtime").stop(3)
  end
end)
]]

local function app_env(path, logfile, extra)
  return T.with({ PATH = path, CALLAGENT_BIN = T.bin, FAKE_NGROK_LOG = logfile, CALLAGENT_LOG = "info" }, extra)
end

-- Spawns a tunnel app: .p its process, .ready its "callagent ready" line
-- once logged, .again its first "tunnel open again" line; on_line (optional)
-- is given every stderr line too.
local function spawn_tunnel_app(source, env, on_line)
  local app = {}
  app.p = T.spawn_app(nil, nil, {
    source = source,
    env = env,
    on_stderr = function(line)
      if line:find("callagent ready", 1, true) then
        app.ready = line
      end
      app.again = app.again or line:find("tunnel open again", 1, true) and line
      if on_line then
        on_line(line)
      end
    end,
  })
  return app
end

-- spawn_tunnel_app, once it is ready (a test error if it is not).
local function ready_tunnel_app(source, env, on_line)
  local app = spawn_tunnel_app(source, env, on_line)
  T.wait_for(function()
    return app.ready or app.p.done
  end, 15000, "callagent ready")
  T.ok(app.ready, app.p.errtext())
  return app
end

T.test("a Twilio app without publicBaseUrl opens an ngrok tunnel, announces it, and stops ngrok on SIGTERM", function()
  local dir = T.tmpdir()
  local logfile = dir .. "/ngrok.log"
  local app = spawn_tunnel_app(APP, app_env(bindir({ "ngrok" }), logfile))
  local p = app.p
  T.wait_for(function()
    return app.ready or p.done
  end, 15000, "callagent ready")
  local ready = app.ready
  T.ok(ready, "the app started; stdout: " .. p.text() .. " stderr: " .. p.errtext())
  local log = read_lines(logfile)
  local pid, url = grep(log, "^tunnel pid=(%d+) url=(%S+)")
  T.ok(url, "ngrok opened a tunnel")
  T.match(ready, "public=" .. url:gsub("%p", "%%%0") .. "%f[%s]", "the app's public URL is ngrok's")
  T.match(ready, "public=https://[%x-]+%.ngrok%-free%.app")
  T.match(ready, "url=http://127%.0%.0%.1:%d+")
  T.eq(grep(log, "^start pid=%d+ mode=ok argv=http (%d+) "), ready:match("url=http://127%.0%.0%.1:(%d+)"),
    "ngrok forwards to the app's own port")
  T.match(p.errtext(), "WARN no server%.apiToken: /v1 answers only requests to a loopback host; set one to use the "
    .. "API through https://", "public, with no token: the API is not")

  T.ok(p:kill("SIGTERM"))
  T.eq(p:wait(10000), 0, "the app's exit status")
  T.eq(grep(read_lines(logfile), "^end pid=" .. pid .. " signal=(%S+)$"), "SIGTERM", "ngrok was stopped")
  T.ok(pid_gone(tonumber(pid)), "no ngrok process is left")
end)

-- A fake Twilio (undone after the test) that reaches the app's public
-- (tunnel) URL at base, its local one.
local function tunnel_twilio(base, behaviour)
  local tw = assert(require("fakes.twilio").start({
    account_sid = "AC" .. string.rep("0", 32),
    auth_token = "dummy-auth-token",
    behaviour = behaviour,
    public_url_rewrite = function(u)
      return (u:gsub("^https://[^/]+", base))
    end,
  }))
  T.defer(function()
    tw:close()
  end)
  return tw
end

T.test("while the tunnel opens the API places no call (503 starting, Retry-After); once open, calls use its URL", function()
  local fetch = require "callagent.fetch"
  local dir = T.tmpdir()
  local port = T.free_port()
  local base = "http://127.0.0.1:" .. port
  local tw = tunnel_twilio(base, { ring_ms = 60000 })
  local app = spawn_tunnel_app(APP:gsub("port = 0", "port = " .. port)
    :gsub('fromNumber = "%+15550001111"', '%0, apiBaseUrl = "' .. tw.url .. '"'),
    app_env(bindir({ "ngrok" }), dir .. "/ngrok.log", { FAKE_NGROK_DELAY_MS = "2500" }))
  local p = app.p
  T.wait_for(function()
    local res = fetch(base .. "/healthz")
    return res and res.status == 200 or p.done
  end, 10000, "the server listening")
  T.ok(not app.ready, "not ready yet: the tunnel is opening")
  T.eq(json.decode(assert(fetch(base .. "/healthz")).body).starting, true, "/healthz says it is starting")
  local function create()
    return assert(fetch(base .. "/v1/calls", { method = "POST",
      body = json.encode({ to = "+14155550172", prompt = "Talk." }),
      headers = { ["Content-Type"] = "application/json" } }))
  end
  local res = create()
  T.eq(res.status, 503, res.body)
  T.eq(res.headers["retry-after"], "2")
  local e = json.decode(res.body).error
  T.eq(e.code, "starting")
  T.match(e.message, "send the call again")
  T.eq(#json.decode(assert(fetch(base .. "/v1/calls")).body).calls, 0, "no call stored")
  T.eq(#tw.calls, 0, "no call placed")
  T.wait_for(function()
    return app.ready or p.done
  end, 15000, "callagent ready")
  T.ok(app.ready, p.errtext())
  T.eq(json.decode(assert(fetch(base .. "/healthz")).body).starting, false, "/healthz says it is ready")
  local public = app.ready:match("public=(https://%S+)")
  res = create()
  T.eq(res.status, 201, res.body)
  local call = assert(tw:wait_call(5000))
  T.eq(call.params.StatusCallback:sub(1, #public + 1), public .. "/", "callbacks go to the tunnel")
  T.wait_for(function()
    for _, cb in ipairs(call.callbacks) do
      if cb.status == "ringing" and cb.response_status then
        return true
      end
    end
  end, 5000, "the ringing callback delivered")
  for _, cb in ipairs(call.callbacks) do
    T.ok(cb.response_status and cb.response_status < 300, "callback " .. cb.status .. " taken (signed over the "
      .. "tunnel's URL): " .. tostring(cb.response_status))
  end
  T.eq(#tw.calls, 1)
  T.ok(p:kill("SIGTERM"))
  T.eq(p:wait(15000), 0, "the app's exit status")
end)

T.test("ngrok that exits while the app runs: calls pause (503 paused, retries wait, ringing calls canceled), the tunnel opens again, calls go on", function()
  local fetch = require "callagent.fetch"
  local timer = require "callagent.timer"
  local dir = T.tmpdir()
  local port = T.free_port()
  local base = "http://127.0.0.1:" .. port
  local busy, rang = 0, 0
  local tw = tunnel_twilio(base, function(call)
    if call.params.To == "+14155550174" then
      busy = busy + 1
      if busy == 1 then
        return { answer = "busy" }
      end
    elseif call.params.To == "+14155550176" or call.params.To == "+14155550177" then
      rang = rang + 1
      if rang <= 2 then
        -- Ringing as the tunnel dies: its final status goes to the dead URL.
        -- The second's dial is answered after the tunnel died.
        return { ring_ms = 60000, lost_callbacks = { completed = true },
          create_delay_ms = call.params.To == "+14155550177" and 2000 or nil }
      end
    end
    return { ring_ms = 60000 }
  end)
  local logfile = dir .. "/ngrok.log"
  local held = {}
  -- Any tunnel counts as one that lived long (reopened at once); one taken
  -- for short-lived would wait 10 s.
  local app = ready_tunnel_app('require("callagent.app").TUNNEL_STABLE_MS = 0\n'
    .. 'require("callagent.app").REOPEN_MS = { 10000, 60000 }\n'
    .. APP:gsub("port = 0", "port = " .. port)
      :gsub('fromNumber = "%+15550001111"', '%0, apiBaseUrl = "' .. tw.url .. '"')
      :gsub('store = { backend = "memory" },', '%0 retry = { maxAttempts = 2, initialDelayMs = 3000 },'),
    app_env(bindir({ "ngrok" }), logfile, { FAKE_NGROK_CONTROL = dir }), function(line)
      if line:find("dial held", 1, true) then
        held[#held + 1] = line
      end
    end)
  local p = app.p
  local function create(to)
    return assert(fetch(base .. "/v1/calls", { method = "POST", body = json.encode({ to = to, prompt = "Talk." }),
      headers = { ["Content-Type"] = "application/json" } }))
  end
  local function health()
    return json.decode(assert(fetch(base .. "/healthz")).body)
  end
  T.eq(health().paused, false)
  -- A call whose first try is busy: its retry is due 3 s later.
  local res = create("+14155550174")
  T.eq(res.status, 201, res.body)
  local id = json.decode(res.body).callId
  T.wait_for(function()
    local c = json.decode(assert(fetch(base .. "/v1/calls/" .. id)).body)
    return c.status == "queued" and c.attempts[1] and c.attempts[1].status == "busy"
  end, 5000, "the busy try over, its retry waiting")
  -- A call ringing when the tunnel dies.
  res = create("+14155550176")
  T.eq(res.status, 201, res.body)
  local ringing = json.decode(res.body).callId
  T.wait_for(function()
    return tw.calls[2] and tw.calls[2].status == "ringing"
  end, 5000, "the second call ringing")
  -- And one whose dial request is still on its way.
  res = create("+14155550177")
  T.eq(res.status, 201, res.body)
  local placing = json.decode(res.body).callId
  T.wait_for(function()
    return tw.calls[3]
  end, 5000, "the third call placed")

  assert(io.open(dir .. "/die", "w")):close() -- ngrok's session ends
  T.wait_for(function()
    return health().paused or p.done
  end, 5000, "calls paused")
  T.wait_for(function()
    return #grep_all(read_lines(logfile), "^start pid=") == 2
  end, 5000, "ngrok started again at once")
  res = create("+14155550175")
  T.eq(res.status, 503, res.body)
  T.eq(res.headers["retry-after"], "5")
  local e = json.decode(res.body).error
  T.eq(e.code, "paused")
  T.match(e.message, "^calls are paused: the public tunnel is down %(ngrok exited %(status 1%): session closed by "
    .. "the remote")
  T.match(e.message, "send the call again in a moment$")
  local function held_line(call_id)
    for _, l in ipairs(held) do
      if l:find("call=" .. call_id, 1, true) then
        return l
      end
    end
  end
  T.wait_for(function()
    return held_line(id)
  end, 6000, "the retry due while paused, held")
  -- The ringing call, whose callee would answer into webhooks that reach
  -- nothing, was canceled; its attempt does not count, and it waits too.
  T.eq(tw.calls[2].final, "canceled", "the ringing call canceled at the vendor")
  local rec = json.decode(assert(fetch(base .. "/v1/calls/" .. ringing)).body)
  T.eq({ rec.status, #rec.attempts, rec.attempts[1].status, rec.attempts[1].reason },
    { "queued", 1, "canceled", "the public tunnel went down while it rang" })
  T.ok(held_line(ringing), "the canceled call waits for the tunnel")
  T.wait_for(function()
    return tw.calls[3].final
  end, 5000, "the call dialed as the tunnel died canceled")
  T.eq(tw.calls[3].final, "canceled")
  T.wait_for(function()
    return held_line(placing)
  end, 3000, "the call dialed as the tunnel died waits")
  rec = json.decode(assert(fetch(base .. "/v1/calls/" .. placing)).body)
  T.eq({ rec.status, #rec.attempts, rec.attempts[1].status, rec.attempts[1].reason },
    { "queued", 1, "canceled", "the public tunnel went down while it rang" })
  timer.sleep(300)
  T.eq(#tw.calls, 3, "not dialed while the tunnel is down")

  assert(io.open(dir .. "/back", "w")):close() -- the second ngrok's tunnel comes up
  T.wait_for(function()
    return app.again or p.done
  end, 10000, "the tunnel open again")
  T.eq(health().paused, false)
  local urls = {}
  for _, l in ipairs(read_lines(logfile)) do
    urls[#urls + 1] = l:match("^tunnel pid=%d+ url=(%S+)")
  end
  T.eq(#urls, 2, "ngrok started again")
  T.ne(urls[2], urls[1])
  T.match(app.again, "url=" .. urls[2]:gsub("%p", "%%%0"))
  T.wait_for(function()
    return #tw.calls == 6
  end, 5000, "the held retry and the canceled calls dialed")
  local again = {}
  for i = 4, 6 do
    again[tw.calls[i].params.To] = true
    T.eq(tw.calls[i].params.StatusCallback:sub(1, #urls[2] + 1), urls[2] .. "/", "with the new tunnel's URL")
  end
  T.eq(again, { ["+14155550174"] = true, ["+14155550176"] = true, ["+14155550177"] = true })
  rec = json.decode(assert(fetch(base .. "/v1/calls/" .. ringing)).body)
  T.eq({ rec.status, #rec.attempts, rec.attempts[2].status }, { "dialing", 2, "dialing" })
  res = create("+14155550175")
  T.eq(res.status, 201, res.body)
  T.ok(p:kill("SIGTERM"))
  T.eq(p:wait(15000), 0, "the app's exit status")
  local pid = grep(read_lines(logfile), "^tunnel pid=(%d+) url=" .. urls[2]:gsub("%p", "%%%0"))
  T.eq(grep(read_lines(logfile), "^end pid=" .. pid .. " signal=(%S+)$"), "SIGTERM", "the second ngrok was stopped")
end, { timeout = 60000 })

T.test("a dial on its way while the tunnel dies and opens again is canceled once placed (its webhooks name the dead tunnel), and dialed again under the new URL", function()
  local fetch = require "callagent.fetch"
  local dir = T.tmpdir()
  local port = T.free_port()
  local base = "http://127.0.0.1:" .. port
  local n = 0
  local tw = tunnel_twilio(base, function()
    n = n + 1
    -- The first dial's answer comes once the tunnel has died and opened again.
    return { ring_ms = 60000, create_delay_ms = n == 1 and 2500 or nil }
  end)
  local logfile = dir .. "/ngrok.log"
  local app = ready_tunnel_app('require("callagent.app").TUNNEL_STABLE_MS = 0\n'
    .. APP:gsub("port = 0", "port = " .. port)
      :gsub('fromNumber = "%+15550001111"', '%0, apiBaseUrl = "' .. tw.url .. '"'),
    app_env(bindir({ "ngrok" }), logfile, { FAKE_NGROK_CONTROL = dir }))
  local p = app.p
  local res = assert(fetch(base .. "/v1/calls", { method = "POST", body = json.encode({ to = "+14155550178",
    prompt = "Talk." }), headers = { ["Content-Type"] = "application/json" } }))
  T.eq(res.status, 201, res.body)
  local id = json.decode(res.body).callId
  T.wait_for(function()
    return tw.calls[1]
  end, 3000, "the dial on its way")
  assert(io.open(dir .. "/back", "w")):close() -- the next ngrok's tunnel comes up at once
  assert(io.open(dir .. "/die", "w")):close()
  T.wait_for(function()
    return app.again or p.done
  end, 5000, "the tunnel open again")
  T.eq(tw.calls[1].final, nil, "the dial's answer has not come yet")
  T.wait_for(function()
    return tw.calls[1].final
  end, 5000, "the call placed with the dead tunnel's URL canceled")
  T.eq(tw.calls[1].final, "canceled")
  T.wait_for(function()
    return tw.calls[2]
  end, 3000, "the call dialed again")
  local urls = {}
  for _, l in ipairs(read_lines(logfile)) do
    urls[#urls + 1] = l:match("^tunnel pid=%d+ url=(%S+)")
  end
  T.eq(#urls, 2, "ngrok started again")
  T.eq(tw.calls[1].params.StatusCallback:sub(1, #urls[1] + 1), urls[1] .. "/", "the first dial had the dead URL")
  T.eq(tw.calls[2].params.StatusCallback:sub(1, #urls[2] + 1), urls[2] .. "/", "dialed again with the new URL")
  local rec = json.decode(assert(fetch(base .. "/v1/calls/" .. id)).body)
  T.eq({ rec.status, #rec.attempts, rec.attempts[1].status, rec.attempts[1].reason },
    { "dialing", 2, "canceled", "the public tunnel went down while it rang" })
  T.ok(p:kill("SIGTERM"))
  T.eq(p:wait(15000), 0, "the app's exit status")
end, { timeout = 30000 })
T.test("SIGTERM while the tunnel that died opens again: the app exits at once, and the new ngrok is stopped", function()
  local dir = T.tmpdir()
  local logfile = dir .. "/ngrok.log"
  local p = ready_tunnel_app(APP, app_env(bindir({ "ngrok" }), logfile, { FAKE_NGROK_CONTROL = dir })).p
  assert(io.open(dir .. "/die", "w")):close()
  -- The second ngrok never lists its tunnel ("back" never comes).
  T.wait_for(function()
    return #read_lines(logfile) >= 4 -- start, tunnel, end, start
  end, 5000, "ngrok started again")
  local first = grep(read_lines(logfile), "^start pid=(%d+)")
  local second
  for _, l in ipairs(read_lines(logfile)) do
    second = l:match("^start pid=(%d+)") or second
  end
  T.ne(second, first)
  T.ok(p:kill("SIGTERM"))
  local t0 = require("callagent.timer").now()
  T.eq(p:wait(10000), 0, "the app's exit status")
  T.lt(require("callagent.timer").now() - t0, 5000, "not the tunnel's whole timeoutSec")
  T.eq(grep(read_lines(logfile), "^end pid=" .. second .. " signal=(%S+)$"), "SIGTERM", "the second ngrok was stopped")
  T.no_match(p.errtext(), "could not be opened again", "a stop is not a failure to open")
end, { timeout = 30000 })

T.test("an ngrok that dies as soon as it is up is started again later and later, not in a loop", function()
  local dir = T.tmpdir()
  local logfile = dir .. "/ngrok.log"
  -- Each run lives 500 ms; the waits start at 300 ms (1 s in the app as shipped), so the test is short.
  local f = assert(io.open(dir .. "/always", "w"))
  f:write("500")
  f:close()
  local src = 'require("callagent.app").REOPEN_MS = { 300, 60000 }\n' .. APP
  local p = ready_tunnel_app(src, app_env(bindir({ "ngrok" }), logfile, { FAKE_NGROK_CONTROL = dir })).p
  local function starts()
    return #grep_all(read_lines(logfile), "^start pid=")
  end
  -- Reopened 300, then 600 ms after each death (then 1200 ...); reopened at
  -- once, the fourth started as the third died, 500 ms after it was up.
  T.wait_for(function()
    return starts() >= 3
  end, 10000, "ngrok started again twice")
  require("callagent.timer").sleep(1200)
  T.eq(starts(), 3, "not started again within the next wait")
  local waits = {}
  for w in p.errtext():gmatch("the tunnel died soon after it opened: opening it again later after_ms=(%d+)") do
    waits[#waits + 1] = tonumber(w)
  end
  T.eq({ waits[1], waits[2] }, { 300, 600 })
  T.ok(p:kill("SIGTERM"))
  T.eq(p:wait(10000), 0, "the app's exit status")
end, { timeout = 30000 })

T.test("a Twilio app whose tunnel cannot open does not start, and says why", function()
  local dir = T.tmpdir()
  local code, _, p = T.run_app(nil, nil, {
    source = APP,
    env = app_env(bindir({ "ngrok" }), dir .. "/ngrok.log", { FAKE_NGROK_MODE = "auth" }),
    timeout = 15000,
  })
  T.eq(code, 3)
  T.match(p.text(), "^START FAILED: tunnel: ngrok is not logged in: run `ngrok config add%-authtoken <token>`")
end)

T.test("a start error quoting a secret (ngrok's message with the Twilio token) reaches the app redacted", function()
  local dir = T.tmpdir()
  local f = assert(io.open(dir .. "/say", "w"))
  f:write("bad header: Authorization dummy-auth-token\n")
  f:close()
  local code, _, p = T.run_app(nil, nil, {
    source = APP,
    env = app_env(bindir({ "ngrok" }), dir .. "/ngrok.log", { FAKE_NGROK_MODE = "say", FAKE_NGROK_SAY = dir .. "/say" }),
    timeout = 15000,
  })
  T.eq(code, 3)
  T.match(p.text(), "^START FAILED: tunnel: ngrok exited %(status 1%) before opening a tunnel: bad header: "
    .. "Authorization %[redacted%]$")
  T.no_match(p.text() .. p.errtext(), "dummy%-auth%-token")
end)

T.test("app:stop() while start() waits for the tunnel: start fails, and the tunnel opened meanwhile is closed", function()
  local dir = T.tmpdir()
  local logfile = dir .. "/ngrok.log"
  local code, _, p = T.run_app(nil, nil, {
    source = [[
local callagent = require "callagent"
local task = require "callagent.task"
local timer = require "callagent.timer"
local runtime = require "callagent.runtime"
local app = assert(callagent.app({
  telephony = { provider = "twilio" },
  server = { port = 0 },
  twilio = { accountSid = "AC" .. string.rep("0", 32), authToken = "dummy-auth-token", fromNumber = "+15550001111" },
  openai = { apiKey = "sk-dummy" },
  tunnel = { provider = "ngrok", timeoutSec = 10 },
  store = { backend = "sqlite", path = os.getenv("DB") },
}, { no_shutdown_hook = true }))
task.spawn(function()
  local ok, err = app:start()
  io.stdout:write("START: ", tostring(ok), " ", tostring(err), "\n")
  io.stdout:flush()
  timer.sleep(300)
  runtime.stop(0)
end)
task.spawn(function()
  timer.sleep(700)
  app:stop()
end)
]],
    env = app_env(bindir({ "ngrok" }), logfile, { FAKE_NGROK_DELAY_MS = "1500", DB = dir .. "/calls.db" }),
    timeout = 15000,
  })
  T.eq(code, 0, p.errtext())
  T.eq(p.text(), "START: nil stopped during start")
  T.ok(not p.errtext():find("ERROR", 1, true), "no error: " .. p.errtext())
  local log = read_lines(logfile)
  local pid = grep(log, "^start pid=(%d+) ")
  T.ok(pid, "ngrok was started")
  T.eq(grep(log, "^end pid=" .. pid .. " signal=(%S+)$"), "SIGTERM", "and stopped")
end)

-- A Twilio app with its own shutdown hook (a signal stops it), a sqlite
-- store at DB and the tunnel of TUNNEL (timeoutSec 20), runtime.grace_ms
-- GRACE_MS if set. It prints start()'s outcome; a failed start exits 3
-- unless the program is stopping anyway.
local SIGNAL_APP = [[
local callagent = require "callagent"
local task = require "callagent.task"
local runtime = require "callagent.runtime"
runtime.grace_ms = tonumber(os.getenv("GRACE_MS")) or runtime.grace_ms
local app = assert(callagent.app({
  telephony = { provider = "twilio" },
  server = { port = 0 },
  twilio = { accountSid = "AC" .. string.rep("0", 32), authToken = "dummy-auth-token", fromNumber = "+15550001111" },
  openai = { apiKey = "sk-dummy" },
  tunnel = { provider = os.getenv("TUNNEL"), timeoutSec = 20 },
  store = { backend = "sqlite", path = os.getenv("DB") },
}))
task.spawn(function()
  local ok, err = app:start()
  io.stdout:write("START: ", tostring(ok and "ok"), " ", tostring(err), "\n")
  io.stdout:flush()
  if not ok and not runtime.shutting_down() then
    runtime.stop(3)
  end
end)
]]

-- SIGTERM to a SIGNAL_APP once ready() is true: its exit status, how long it
-- took to exit, the process.
local function signal_during_start(env, ready)
  local timer = require "callagent.timer"
  local app = spawn_tunnel_app(SIGNAL_APP, env)
  local p = app.p
  T.wait_for(function()
    return ready() or p.done
  end, 10000, "the tunnel opening")
  T.ok(not p.done and not app.ready, "still starting; stdout: " .. p.text() .. " stderr: " .. p.errtext())
  local t0 = timer.now()
  T.ok(p:kill("SIGTERM"))
  local code = p:wait(15000)
  return code, timer.now() - t0, p
end

T.test("SIGTERM while ngrok opens: start() fails as stopped, ngrok is stopped, the store closed, at once", function()
  local dir = T.tmpdir()
  local logfile = dir .. "/ngrok.log"
  local db = dir .. "/calls.db"
  local code, ms, p = signal_during_start(app_env(bindir({ "ngrok" }), logfile,
    { FAKE_NGROK_DELAY_MS = "60000", TUNNEL = "ngrok", DB = db }), function()
    return grep(read_lines(logfile), "^start pid=(%d+) ") ~= nil
  end)
  T.eq(code, 0, "the exit status of a signal's stop; stderr: " .. p.errtext())
  T.lt(ms, 5000, "no waiting for tunnel.timeoutSec")
  T.eq(p.text(), "START: nil stopped during start", "start() returned")
  T.no_match(p.errtext(), "ERROR")
  T.no_match(p.errtext(), "still running after grace period")
  local log = read_lines(logfile)
  local pid = grep(log, "^start pid=(%d+) ")
  T.eq(grep(log, "^end pid=" .. pid .. " signal=(%S+)$"), "SIGTERM", "ngrok was stopped")
  T.ok(pid_gone(tonumber(pid)), "no ngrok process is left")
  -- Closed, not left to the exit: its WAL was checkpointed and removed.
  T.eq(require("callagent.core").stat(db .. "-wal"), nil, "the store's WAL is gone")
  local store = require("callagent.store").open({ backend = "sqlite", path = db })
  T.ok(store, "the store opens at once, not in use")
  store:close()
end)

T.test("SIGTERM while `tailscale funnel --bg` hangs after publishing: the CLI is stopped and `funnel off` undoes it", function()
  local dir = T.tmpdir()
  local tslog = dir .. "/tailscale.log"
  local code, ms, p = signal_during_start(app_env(bindir({ "tailscale" }), dir .. "/ngrok.log",
    { FAKE_TAILSCALE_MODE = "hang", FAKE_TAILSCALE_LOG = tslog, TUNNEL = "tailscale", DB = dir .. "/calls.db" }),
    function()
      local l = read_lines(tslog)
      return l[#l] == "published"
    end)
  T.eq(code, 0, "the exit status of a signal's stop; stderr: " .. p.errtext())
  T.lt(ms, 5000, "no waiting for tunnel.timeoutSec")
  T.eq(p.text(), "START: nil stopped during start", "start() returned")
  local log = read_lines(tslog)
  T.match(log[5] or "", "^funnel %-%-bg %d+$")
  T.eq({ log[1], log[2], log[3], log[4], log[6], log[7], log[8] },
    { "status --json", "exit 0", "funnel status --json", "exit 0", "published", "funnel --https=443 off", "exit 0" },
    table.concat(log, " | "))
end)

-- SIGTERM to a ready SIGNAL_APP whose runtime.grace_ms is 1 s, a tunnel
-- slow to close: its exit status, how long it took to exit, the process.
local function slow_close_stop(env)
  local timer = require "callagent.timer"
  local p = ready_tunnel_app(SIGNAL_APP, T.with(env, { GRACE_MS = "1000", DB = T.tmpdir() .. "/calls.db" })).p
  local t0 = timer.now()
  T.ok(p:kill("SIGTERM"))
  local code = p:wait(15000)
  T.eq(code, 0, "the exit status of a signal's stop; stderr: " .. p.errtext())
  -- The bounds leave a loaded ASan run room; the tools would take 8 s.
  T.lt(timer.now() - t0, 1800, "the program exited within runtime.grace_ms")
  T.no_match(p.errtext(), "still running after grace period", "the stop ended within the grace on its own")
  return p
end

T.test("a `tailscale funnel off` slower than the stop's grace is left to finish at its end, with a warning", function()
  local dir = T.tmpdir()
  local tslog = dir .. "/tailscale.log"
  local p = slow_close_stop(app_env(bindir({ "tailscale" }), dir .. "/ngrok.log",
    { FAKE_TAILSCALE_OFF_DELAY = "8", FAKE_TAILSCALE_LOG = tslog, TUNNEL = "tailscale" }))
  T.match(p.errtext(), "WARN tunnel: `tailscale funnel %-%-https=443 off` is still running after %d+ ms: left to finish")
  T.match(p.errtext(), "INFO tunnel closed provider=tailscale")
  local log = read_lines(tslog)
  T.eq({ log[#log - 1], log[#log] }, { "funnel --https=443 off", "off waits 8 s" }, "the off runs on, not killed")
end)

T.test("an ngrok slower to exit than the stop's grace is killed at its end, with a warning", function()
  local dir = T.tmpdir()
  local logfile = dir .. "/ngrok.log"
  local p = slow_close_stop(app_env(bindir({ "ngrok" }), logfile, { FAKE_NGROK_STOP_MS = "8000", TUNNEL = "ngrok" }))
  T.match(p.errtext(), "WARN tunnel: ngrok had not exited %d+ ms after SIGTERM: killed %(SIGKILL%)")
  local pid = grep(read_lines(logfile), "^start pid=(%d+) ")
  T.eq(grep(read_lines(logfile), "^end pid=" .. pid .. " signal=(%S+)$"), "SIGTERM", "ngrok had its SIGTERM first")
  T.ok(pid_gone(tonumber(pid)), "no ngrok process is left")
end)

T.test("app:start() outside a task is refused at once, before anything listens", function()
  local dir = T.tmpdir()
  local src = APP:gsub("task%.spawn%(function%(%)", "do"):gsub("end%)\n$", "end\n")
  local code, _, p = T.run_app(nil, nil, {
    source = src,
    env = app_env(bindir({ "ngrok" }), dir .. "/ngrok.log"),
    timeout = 15000,
  })
  T.eq(code, 1, "exit code")
  T.match(p.errtext(), "app:start%(%) must run inside a task")
  T.eq(require("callagent.core").stat(dir .. "/ngrok.log"), nil, "ngrok was never started")
  T.no_match(p.errtext(), "callagent ready")
end)


T.test("a tunnel to an app that listens elsewhere than 127.0.0.1 or 0.0.0.0 is refused at start: it would reach nothing", function()
  -- ngrok and tailscale forward to localhost:<port>; an app on 127.0.0.2
  -- (or a LAN address, or IPv6 only) would have a public URL that reaches
  -- nothing, and every call would fail at the vendor.
  for _, host in ipairs({ "127.0.0.2", "::1" }) do
    local dir = T.tmpdir()
    local code, _, p = T.run_app(nil, nil, {
      source = APP:gsub("server = { port = 0 }", "server = { port = 0, host = '" .. host .. "' }"),
      env = app_env(bindir({ "ngrok" }), dir .. "/ngrok.log"),
      timeout = 15000,
    })
    T.eq(code, 3, host .. ": " .. p.text() .. p.errtext())
    T.match(p.text(), "^START FAILED: tunnel: ngrok and tailscale forward to 127%.0%.0%.1:%d+, where nothing listens: "
      .. "server%.host is " .. host:gsub("%p", "%%%0") .. "; set it to 127%.0%.0%.1 or 0%.0%.0%.0, or set server%.publicBaseUrl")
    T.eq(io.open(dir .. "/ngrok.log"), nil, "ngrok was not started")
  end
end)

T.run()
