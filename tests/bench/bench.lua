-- make bench: how many concurrent calls one machine carries in real time.
--
-- Three processes:
--   callagent (tests/bench/app.lua): the system under test, with the Twilio
--     provider and the SQLite store, so its CPU and memory are its own;
--   this script, the control plane in Lua: a fake Twilio REST API (calls
--     created and hung up), the status callbacks, and the voice webhook
--     fetched from callagent's /voice with a valid X-Twilio-Signature, which
--     gives each call's <Stream> URL and parameters;
--   tests/bench/loadgen.c, the data plane in C (one epoll loop): the
--     Twilio Media Streams clients (a 160-byte mu-law frame every 20 ms per
--     call, each mark echoed at once) and the fake OpenAI Realtime server
--     (every appended frame echoed back as an audio delta, or 20 ms of
--     24 kHz PCM in audio/pcm mode), and a turn's transcripts and usage
--     every 5 s per call, written to the store. This script drives it over its stdin
--     and stdout, one-line commands and replies (see loadgen.c).
-- With BENCH_PIN (default on) callagent runs on CPU 0, this script and the
-- load generator on CPU 1. First, tests/bench/loopback.c measures the
-- kernel's floor here: the CPU cost of one loopback TCP recv+send pair.
--
-- For each N it creates N calls through callagent's REST API, streams them
-- for T seconds and measures:
--   ok/failed calls (ok: streaming at the end of the window; failed: never
--   set up, or dropped), frames sent and lost (phone -> model, and model
--   -> phone, counted after a 1 s quiet period), bridge latency p50/p99/max
--   (frame sent by "Twilio" -> append received by "OpenAI"; delta sent by
--   "OpenAI" -> media received by "Twilio", the receipt timed by the
--   kernel's receive time stamp: both include two loopback hops, so they
--   are upper bounds of what callagent adds), callagent's CPU seconds per
--   call-minute (utime + stime from /proc), its event loop's load (the
--   share of the window it was busy, and of that busy time the share spent
--   in iterations of 5 ms or more, from /healthz: each such iteration
--   delays every frame that arrives during it), its RSS per call, the load
--   generator's own CPU per call-minute (its CLOCK_PROCESS_CPUTIME_ID over
--   the window), and whether the load generator kept up: p99 lateness of a
--   frame against its slot of the 20 ms schedule, and p99 read lag (how long
--   what callagent sent waited in the kernel before the generator read it;
--   latencies are timed by the kernel's receive time stamps, but a generator
--   that reads late holds callagent back). A p99 lateness over 5 ms, or a
--   read lag over 20 ms (a frame: replies start to slip past the next
--   frame), means the row measures the harness, and it says so.
--
-- Environment: BENCH_N ("10,100,200,400,800,1000"), BENCH_SECONDS (20),
-- BENCH_WARMUP_SECONDS (2: each row runs this long before it is measured),
-- BENCH_BIN (the callagent measured: build/release/callagent),
-- BENCH_FLOOR_SECONDS (1: each of the kernel floor's six runs),
-- BENCH_TLS (1: the model connection is wss://, as to OpenAI), BENCH_APP_LOG
-- (callagent's log level, "warn"),
-- BENCH_MODES ("audio/pcmu,audio/pcm"), BENCH_PIN (1: callagent on CPU 0,
-- the load generator on CPU 1), BENCH_STORE ("sqlite"), BENCH_PROFILE (print
-- the pids, for perf), BENCH_WRAP (words put in front of callagent, e.g.
-- "valgrind --tool=callgrind"), BENCH_LOG_LINES (30: callagent stderr lines
-- shown per row; the rest are counted), BENCH_CHURN_SECONDS (60; 0: no
-- churn row), BENCH_CHURN_CALLS (100 at once), BENCH_CHURN_LIFE (4 s per
-- call), BENCH_CHURN_MODE (audio/pcmu), BENCH_VERBOSE (the load generator's
-- stats line per row on stderr), BENCH_TARGET_CALLS ("400,1000": the rows the
-- issue's targets are judged on, at the end), BENCH_GC_PAUSE (130) and
-- BENCH_PACE_MS (2: the app's gc_pause and task.pace_ms, read by
-- tests/bench/app.lua), LOADGEN_WAKE and LOADGEN_TURN (see loadgen.c).
local http = require "callagent.http"
local fetch = require "callagent.fetch"
local url = require "callagent.url"
local timer = require "callagent.timer"
local task = require "callagent.task"
local crypto = require "callagent.crypto"
local process = require "callagent.process"
local json = require "callagent.json"
local core = require "callagent.core"
local log = require "callagent.log"

log.level("warn")

local ROOT = core.root
local BIN = os.getenv("BENCH_BIN") or ROOT .. "/build/release/callagent"
local LOADGEN = ROOT .. "/build/release/tests/bench/loadgen"
local LOOPBACK = ROOT .. "/build/release/tests/bench/loopback"
-- The tests' fake Twilio: its request signature, computed apart from the provider's.
package.path = ROOT .. "/tests/?.lua;" .. package.path
local fake_twilio = require "fakes.twilio"
local SID = "AC" .. string.rep("c3", 16)
local TOKEN = "bench-twilio-token"
local HOOKS_TOKEN = "bench-hooks-token"

local function env_list(name, default)
  local out = {}
  for x in (os.getenv(name) or default):gmatch("[^,%s]+") do
    out[#out + 1] = x
  end
  return out
end

local NS = env_list("BENCH_N", "10,100,200,400,800,1000")
local MODES = env_list("BENCH_MODES", "audio/pcmu,audio/pcm")
-- The calls at which the issue's targets are set: CPU and latency, then scale.
local TARGET_N = env_list("BENCH_TARGET_CALLS", "400,1000")
local SECONDS = tonumber(os.getenv("BENCH_SECONDS") or "20")
-- Seconds each row runs before its measured window.
local WARMUP = tonumber(os.getenv("BENCH_WARMUP_SECONDS") or "2")
local PIN = os.getenv("BENCH_PIN") ~= "0"
local STORE = os.getenv("BENCH_STORE") or "sqlite"
local LOG_LINES = tonumber(os.getenv("BENCH_LOG_LINES") or "30")
-- The churn row (calls that come and go, see run_churn).
local CHURN_SECONDS = tonumber(os.getenv("BENCH_CHURN_SECONDS") or "60")
local CHURN_CALLS = tonumber(os.getenv("BENCH_CHURN_CALLS") or "100")
local CHURN_LIFE = tonumber(os.getenv("BENCH_CHURN_LIFE") or "4")
local CHURN_MODE = os.getenv("BENCH_CHURN_MODE") or "audio/pcmu"
-- BENCH_TLS=1: the model connection is wss://, as to OpenAI (a throwaway CA).
local TLS
if os.getenv("BENCH_TLS") == "1" then
  local dir = os.tmpname()
  os.remove(dir)
  core.mkdir(dir)
  TLS = require("lib.certs").make(dir)
end

local now = timer.now

-- One run's state ----------------------------------------------------------------

local run

local function new_run(mode)
  return {
    mode = mode,
    calls = {},
    by_sid = {},
    by_k = {},
    failed = 0, -- calls the control plane could not answer (webhook errors)
    notes = {},
    app_lines = 0,
  }
end

local function note(r, fmt, ...)
  r.notes[#r.notes + 1] = string.format(fmt, ...)
end

local function twilio_sign(u, params)
  return fake_twilio.sign(TOKEN, u, params)
end

local function signed_post(u, params)
  return fetch(u, {
    method = "POST",
    body = url.form_encode(params),
    headers = { ["Content-Type"] = "application/x-www-form-urlencoded", ["X-Twilio-Signature"] = twilio_sign(u, params) },
    timeout = 30000,
  })
end

-- The load generator (tests/bench/loadgen.c) --------------------------------------

local Loadgen = {}
Loadgen.__index = Loadgen

-- The load generator's counted events (the first five of each are noted).
local COUNTED = {
  failed = "stream of call #%s failed: %s",
  closed = "callagent closed the stream of call #%s (code %s) during the run",
  rt_closed = "callagent closed the model connection of call #%s (code %s) during the run",
}

local function start_loadgen(r)
  -- closed / rt_closed: streams and model connections callagent closed while
  -- the row ran (not when it was stopped).
  local lg = setmetatable({ replies = task.queue(), established = 0, failed = 0, closed = 0, rt_closed = 0 }, Loadgen)
  local argv = PIN and { "taskset", "-c", "1", LOADGEN } or { LOADGEN }
  argv.stdin = true
  if TLS then
    argv.env = { LOADGEN_TLS_CERT = TLS.cert, LOADGEN_TLS_KEY = TLS.key }
    argv.inherit_env = true
  end
  argv.on_stdout = function(line)
    local word, k, rest = line:match("^(%S+)%s*(%S*)%s*(.*)$")
    if word == "realtime" then
      lg.port = tonumber(k)
    elseif word == "established" then
      lg.established = lg.established + 1
      if r.on_established then
        r.on_established(tonumber(k))
      end
    elseif COUNTED[word] then
      -- Closes while the row is being stopped are expected, not counted.
      if word == "failed" or not r.stopping then
        lg[word] = lg[word] + 1
        if lg[word] <= 5 then
          note(r, COUNTED[word], k, rest)
        end
      end
    elseif word == "error" and (k == "call" or k == "end") then
      note(r, "loadgen: %s", line)
    elseif word == "ok" and k == "hangup" then
      -- twilio_call_ended waits for it (r.hangup_acks), else nobody does.
      for _, wake in ipairs(r.hangup_acks and r.hangup_acks[tonumber(rest)] or {}) do
        wake()
      end
    elseif line ~= "ok call" and line ~= "ok end" then -- nobody waits for those
      lg.replies:push(line)
    end
  end
  argv.on_stderr = function(line)
    io.stderr:write("  [loadgen] ", line, "\n")
  end
  local p = assert(process.spawn(argv))
  lg.p, lg.pid = p, p.pid
  local deadline = now() + 5000
  while not lg.port do
    if not p:running() or now() > deadline then
      p:kill("SIGKILL")
      error("the load generator did not start (" .. LOADGEN .. ")")
    end
    timer.sleep(2)
  end
  return lg
end

--- A command whose reply is waited for.
function Loadgen:cmd(line)
  assert(self.p:write(line .. "\n"))
  local reply, err = self.replies:pop(15000)
  if not reply then
    error("loadgen: no reply to '" .. line .. "': " .. tostring(err))
  end
  if reply:match("^error") then
    error("loadgen: " .. reply)
  end
  return reply
end

--- A command whose reply nobody waits for.
function Loadgen:tell(line)
  return self.p:write(line .. "\n")
end

function Loadgen:stop()
  if self.p:running() then
    self.p:write("quit\n")
    if not self.p:wait(3000) then
      self.p:kill("SIGKILL")
      self.p:wait(3000)
    end
  end
end

-- The fake Twilio: REST API and the webhooks ----------------------------------------

-- The call is answered: status callback, then the voice webhook, whose TwiML
-- gives the Media Stream the load generator opens.
local function answer(r, c, form)
  local voice = {
    CallSid = c.sid,
    AccountSid = SID,
    From = form.From,
    To = form.To,
    Direction = "outbound-api",
    ApiVersion = "2010-04-01",
    CallStatus = "in-progress",
  }
  local status = { SequenceNumber = "0" }
  for k, v in pairs(voice) do
    status[k] = v
  end
  signed_post(form.StatusCallback, status)
  local res, err = signed_post(form.Url, voice)
  if not res or res.status ~= 200 then
    r.failed = r.failed + 1
    if r.failed <= 5 then
      note(r, "voice webhook of call #%d: %s", c.k, tostring(res and res.status or err))
    end
    return
  end
  local stream_url = res.body:match('<Stream url="([^"]+)"')
  if not stream_url then
    r.failed = r.failed + 1
    note(r, "voice webhook of call #%d: no <Stream> in %q", c.k, res.body:sub(1, 200))
    return
  end
  stream_url = stream_url:gsub("&amp;", "&")
  local params = {}
  for name, value in res.body:gmatch('<Parameter name="([^"]+)" value="([^"]*)"') do
    params[name] = value
  end
  c.stream_sid = "MZ" .. crypto.to_hex(crypto.random_bytes(16))
  local start = json.encode({
    event = "start",
    sequenceNumber = "1",
    streamSid = c.stream_sid,
    start = {
      accountSid = SID,
      streamSid = c.stream_sid,
      callSid = c.sid,
      tracks = { "inbound" },
      mediaFormat = { encoding = "audio/x-mulaw", sampleRate = 8000, channels = 1 },
      customParameters = params,
    },
  })
  r.lg:tell(string.format("call %d %s %s %s %s", c.k, stream_url, twilio_sign(stream_url, {}), c.stream_sid, start))
end

-- Call c is over at the fake Twilio (callagent hung up, or the callee did):
-- the stream gets `stop` and is closed, and the status callback says
-- completed, as Twilio's would. Churn rows only (r.on_hangup).
local function twilio_call_ended(r, c)
  if c.hung_up then
    return
  end
  c.hung_up = now()
  r.by_sid[c.sid], r.by_k[c.k] = nil, nil
  task.spawn(function()
    -- The stream's `stop` first, then the status callback, as Twilio sends
    -- them. Told at once, the generator could read of the hang-up after
    -- callagent, ending the call on the callback, had closed its
    -- connections: closes it would count as callagent's own.
    local waiting = {}
    r.hangup_acks = r.hangup_acks or {}
    r.hangup_acks[c.k] = waiting
    r.lg:tell("hangup " .. c.k)
    task.wait_in(waiting, 5000)
    r.hangup_acks[c.k] = nil
    local res, err = signed_post(c.status_cb, { CallSid = c.sid, AccountSid = SID, CallStatus = "completed",
      CallDuration = tostring(math.floor((c.hung_up - c.t) / 1000)), SequenceNumber = "2" })
    r.on_hangup(c, res and res.status >= 200 and res.status < 300 or false, res and res.status or err)
  end)
end

local tw_server

local function start_fakes()
  tw_server = http.server({ max_connections = 16384, max_body = 65536 })
  tw_server:post("/2010-04-01/Accounts/{acc}/Calls.json", function(req)
    local r = run
    local form = url.form_decode(req.body)
    -- The API request numbered the call in its To number: the model's
    -- session finds its call by that number (its prompt says "bench call #k").
    local k = tonumber(form.To:sub(-7))
    local c = { k = k, sid = "CA" .. crypto.to_hex(crypto.random_bytes(16)), status_cb = form.StatusCallback, t = now() }
    r.calls[#r.calls + 1] = c
    r.by_sid[c.sid] = c
    r.by_k[k] = c
    task.spawn(answer, r, c, form)
    return 201, '{"sid":"' .. c.sid .. '","status":"queued"}', { ["Content-Type"] = "application/json" }
  end)
  tw_server:post("/2010-04-01/Accounts/{acc}/Calls/{sid}.json", function(req)
    local r = run
    local c = r and r.by_sid[(req.params.sid or ""):gsub("%.json$", "")]
    if c and r.lg then
      if r.on_hangup then
        twilio_call_ended(r, c)
      else
        -- Rows of calls that stay up: a hang-up is a fault, unless the row is being stopped.
        if not r.stopping then
          r.hangups = (r.hangups or 0) + 1
          if r.hangups <= 5 then
            note(r, "callagent hung up call #%d during the run", c.k)
          end
        end
        r.lg:tell("hangup " .. c.k)
        if r.stopping and not c.hung_up then
          -- callagent's stop hung it up: the completed status callback, as
          -- Twilio's, so that the stop does not wait out its 2 s for it.
          c.hung_up = now()
          task.spawn(signed_post, c.status_cb, { CallSid = c.sid, AccountSid = SID, CallStatus = "completed",
            CallDuration = tostring(math.floor((c.hung_up - c.t) / 1000)), SequenceNumber = "2" })
        end
      end
    end
    return 200, "{}", { ["Content-Type"] = "application/json" }
  end)
  -- The churn row's notifications (notify.hooksUrl).
  tw_server:post("/hooks/agent", function(req)
    local r = run
    if req.headers.authorization ~= "Bearer " .. HOOKS_TOKEN then
      return 401, "{}", { ["Content-Type"] = "application/json" }
    end
    local body = json.try_decode(req.body or "")
    if r and r.on_notified and type(body) == "table" then
      r.on_notified(req.headers["idempotency-key"], body.data)
    end
    return 200, "{}", { ["Content-Type"] = "application/json" }
  end)
  assert(tw_server:listen())
end

-- callagent under test ------------------------------------------------------------

local function proc_file(pid, name)
  local f = io.open("/proc/" .. pid .. "/" .. name)
  if not f then
    return nil
  end
  local s = f:read("a")
  f:close()
  return s
end

local function proc_stat(pid)
  local s = proc_file(pid, "stat")
  if not s then
    return nil
  end
  local fields = {}
  for x in s:match("%) (.*)$"):gmatch("%S+") do
    fields[#fields + 1] = x
  end
  -- utime and stime are fields 14 and 15 (12 and 13 after the name).
  return (tonumber(fields[12]) + tonumber(fields[13])) / 100
end

local function proc_rss(pid)
  local s = proc_file(pid, "status")
  if not s then
    return nil
  end
  return tonumber(s:match("VmRSS:%s+(%d+) kB")) * 1024
end

local function start_app(mode, port, db, rt_url, r)
  -- BENCH_WRAP: words run in front of callagent (a profiler), after taskset.
  local argv = PIN and { "taskset", "-c", "0" } or {}
  for word in (os.getenv("BENCH_WRAP") or ""):gmatch("%S+") do
    argv[#argv + 1] = word
  end
  for _, word in ipairs({ BIN, "run", ROOT .. "/tests/bench/app.lua" }) do
    argv[#argv + 1] = word
  end
  local ready = false
  argv.env = {
    BENCH_APP_PORT = tostring(port),
    BENCH_TW_SID = SID,
    BENCH_TW_TOKEN = TOKEN,
    BENCH_TW_URL = tw_server:url(""):gsub("/$", ""),
    BENCH_RT_URL = rt_url,
    BENCH_OUTPUT = mode,
    BENCH_STORE = STORE,
    BENCH_RT_CA = TLS and TLS.ca or false,
    BENCH_DB = db,
    BENCH_HOOKS_URL = r and r.on_notified and (tw_server:url(""):gsub("/$", "") .. "/hooks") or false,
    BENCH_HOOKS_TOKEN = r and r.on_notified and HOOKS_TOKEN or false,
    CALLAGENT_LOG = os.getenv("BENCH_APP_LOG") or "warn",
  }
  argv.inherit_env = true
  argv.on_stdout = function(line)
    if line == "ready" then
      ready = true
    end
  end
  argv.on_stderr = function(line)
    if r then
      r.app_lines = r.app_lines + 1
      if r.app_lines > LOG_LINES then
        return
      end
    end
    io.stderr:write("  [callagent] ", line, "\n")
  end
  local t0 = now()
  local p = assert(process.spawn(argv))
  if r then
    r.app = p
  end
  while not ready do
    if not p:running() then
      error("callagent did not start")
    end
    if now() - t0 > 30000 then
      p:kill("SIGKILL")
      error("callagent did not get ready in 30 s")
    end
    timer.sleep(2)
  end
  return p, now() - t0
end

--- SIGTERM (a graceful stop), then SIGKILL after 10 s.
local function stop_app(p, what)
  if not p or p.done then
    return
  end
  -- callagent's own shutdown gives its handlers 10 s (runtime.grace_ms), then stops.
  p:kill("SIGTERM")
  local t0 = now()
  if not p:wait(15000) then
    io.stderr:write("  callagent (pid ", p.pid, what and (", " .. what) or "", ") still running 15 s after SIGTERM: SIGKILL\n")
    p:kill("SIGKILL")
    p:wait(5000)
  elseif now() - t0 > 2000 then
    io.stderr:write(("  callagent (pid %d%s) took %.1f s to stop after SIGTERM\n"):format(p.pid, what and (", " .. what) or "", (now() - t0) / 1000))
  end
end

local function free_port()
  local s = http.server({})
  assert(s:listen())
  local port = s.port
  s:close()
  return port
end

local function api_post(base, path, body)
  return fetch(base .. path, { method = "POST", body = body, headers = { ["Content-Type"] = "application/json" }, timeout = 30000 })
end

-- callagent's event loop counters, from its /healthz.
local function loop_stats(base)
  local res = fetch(base .. "/healthz", { timeout = 10000 })
  local ok, body = pcall(json.decode, res and res.status == 200 and res.body or "")
  return ok and type(body) == "table" and body.loop or nil
end

-- Between two loop_stats readings: the share of the time the loop was busy,
-- and the share of that busy time spent in iterations of 5 ms or more. Over
-- the loop's own clock: at saturation /healthz answers late.
local function loop_load(l0, l1)
  if not (l0 and l1) then
    return nil
  end
  local busy = l1.busySec - l0.busySec
  return busy / math.max(1e-3, l1.uptimeSec - l0.uptimeSec), busy > 0 and (l1.slowSec - l0.slowSec) / busy or 0
end

-- Least-squares slope of ys over xs (nil with fewer than two distinct xs).
local function slope(xs, ys)
  local n = #xs
  if n < 2 then
    return nil
  end
  local mx, my = 0, 0
  for k = 1, n do
    mx, my = mx + xs[k], my + ys[k]
  end
  mx, my = mx / n, my / n
  local sxy, sxx = 0, 0
  for k = 1, n do
    sxy = sxy + (xs[k] - mx) * (ys[k] - my)
    sxx = sxx + (xs[k] - mx) ^ 2
  end
  return sxx > 0 and sxy / sxx or nil
end

-- A row's processes: the load generator in r.mode, and callagent with the
-- generator as its model. Returns the generator, callagent and its base URL.
local function start_row(r)
  r.lg = start_loadgen(r)
  r.lg:cmd("mode " .. (r.mode == "audio/pcm" and "pcm" or "pcmu"))
  local port = free_port()
  r.db = os.tmpname()
  local app = start_app(r.mode, port, r.db, (TLS and "wss" or "ws") .. "://127.0.0.1:" .. r.lg.port .. "/v1/realtime", r)
  timer.sleep(300)
  return r.lg, app, "http://127.0.0.1:" .. port
end

-- Call k through the REST API: its number ends in k (7 digits), which the
-- fake Twilio reads back, and its prompt names it for the fake model.
local function create_call(base, k)
  return api_post(base, "/v1/calls", '{"to":"+1415' .. string.format("%07d", k) .. '","prompt":"bench call #' .. k .. '"}')
end

-- fn(record) for the call records, newest first, a page at a time, until fn
-- returns true. Returns true, or nil and why a page could not be read.
local function each_call(base, fn)
  local cursor
  repeat
    local res = fetch(base .. "/v1/calls?limit=100" .. (cursor and ("&cursor=" .. url.encode(cursor)) or ""),
      { timeout = 30000 })
    local page = res and res.status == 200 and json.decode(res.body)
    if not page then
      return nil, tostring(res and res.status)
    end
    for _, c in ipairs(page.calls) do
      if fn(c) then
        return true
      end
    end
    cursor = page.nextCursor ~= json.null and page.nextCursor or nil
  until not cursor
  return true
end

local function run_one(r, n)
  local mode = r.mode
  local lg, app, base = start_row(r)
  local rss0 = proc_rss(app.pid)

  -- Create the calls, 50 at a time. Each one streams from when it is
  -- established (on its phase of the 20 ms schedule).
  local t_setup = now()
  local cpu_setup0 = proc_stat(app.pid)
  lg:cmd("measure start") -- the latency of live calls during set-up; the window starts anew later
  local i = 0
  local api_failed = 0
  while i < n do
    local batch = {}
    for _ = 1, math.min(50, n - i) do
      i = i + 1
      local k = i
      batch[#batch + 1] = function()
        local res = create_call(base, k)
        return res and res.status == 201
      end
    end
    local oks = table.pack(task.all(batch))
    for j = 1, #batch do
      if not oks[j] then
        api_failed = api_failed + 1
      end
    end
  end
  if api_failed > 0 then
    note(r, "%d POST /v1/calls did not answer 201", api_failed)
  end
  local deadline = now() + 60000
  repeat
    timer.sleep(20)
  until lg.established + lg.failed + r.failed + api_failed >= n or now() > deadline
  local setup_ms = now() - t_setup
  local setup_cpu = proc_stat(app.pid) - cpu_setup0
  -- The load generator's latencies so far are those of the calls already
  -- streaming while the others were being set up.
  local during = json.decode(assert(lg:cmd("stats"):match("^stats (.*)$")))

  -- Warm up, then measure a window of SECONDS.
  timer.sleep(WARMUP * 1000)
  if os.getenv("BENCH_PROFILE") then
    io.stderr:write("PROFILE callagent pid ", app.pid, ", loadgen pid ", lg.pid, "\n")
  end
  local loop0 = loop_stats(base)
  local cpu0 = proc_stat(app.pid)
  local t0 = now()
  lg:cmd("measure start")
  local t1 = now()
  timer.sleep(SECONDS * 1000)
  local t2 = now()
  lg:cmd("measure stop")
  local cpu1 = proc_stat(app.pid)
  local window = (now() - t0) / 1000
  local loop1 = loop_stats(base)
  if os.getenv("BENCH_VERBOSE") then
    io.stderr:write(string.format("  [bench] %d calls: setup %.0f ms; measure start answered in %.0f ms, the %d s sleep took %.0f ms, measure stop answered in %.0f ms\n",
      n, setup_ms, t1 - t0, SECONDS, t2 - t1, now() - t2))
  end
  local rss1 = proc_rss(app.pid)
  lg:cmd("send off")
  timer.sleep(1000) -- let what is in flight arrive
  local stats_line = assert(lg:cmd("stats"):match("^stats (.*)$"))
  if os.getenv("BENCH_VERBOSE") then
    io.stderr:write("  [loadgen stats] ", stats_line, "\n")
  end
  local s = json.decode(stats_line)
  if s.turns > 0 then
    -- The turns reached the store: a call with usage (in a short or an
    -- overloaded row, not every call has ended a turn) has its transcript in
    -- its record.
    local talked
    each_call(base, function(c)
      talked = type(c.usage) == "table" and (c.usage.responses or 0) > 0 and c or nil
      return talked
    end)
    local rec = talked and fetch(base .. "/v1/calls/" .. talked.callId, { timeout = 10000 })
    rec = rec and rec.status == 200 and json.decode(rec.body)
    if not (rec and #rec.transcript > 0 and rec.usage and (rec.usage.responses or 0) > 0) then
      note(r, "the model ended %d turns, but the call record shows no transcript or usage", s.turns)
    end
  end
  r.stopping = true
  stop_app(app, string.format("%s, %d calls", mode, n))
  lg:stop()
  os.remove(r.db)
  os.remove(r.db .. "-wal")
  os.remove(r.db .. "-shm")
  if lg.failed > 5 then
    note(r, "%d streams failed to open in all", lg.failed)
  end
  if lg.closed > 5 or lg.rt_closed > 5 then
    note(r, "in all, callagent closed %d streams and %d model connections during the run", lg.closed, lg.rt_closed)
  end
  if s.unbound_appends > 0 then
    note(r, "%d appends came on model sessions that named no bench call", s.unbound_appends)
  end
  -- Calls still streaming at the end: established, and not closed since.
  local established = s.established - s.closed
  local cpu = cpu1 - cpu0
  if PIN and cpu / window >= 0.95 then
    note(r, "callagent used %.2f of its one CPU: saturated, so its latencies queue up and its CPU per call-minute"
      .. " drops (each wake-up finds more messages waiting); past its capacity", cpu / window)
  end
  local call_min = math.max(1, established) * window / 60
  -- Set-up's own CPU: what set-up took, less the audio of the calls already
  -- up meanwhile (they came up at a steady pace: half of them on average,
  -- so half the measured window's rate).
  local audio_during_setup = established > 0 and cpu / window / 2 * (setup_ms / 1000) or 0
  local loop_busy, loop_slow = loop_load(loop0, loop1)
  return {
    mode = mode,
    n = n,
    established = established,
    failed = n - established,
    setup_ms = setup_ms,
    setup_cpu_per_call = math.max(0, setup_cpu - audio_during_setup) / n,
    setup_lat = { during.lat_in.p99, during.lat_out.p99, math.max(during.lat_in.max, during.lat_out.max),
      during.lat_start.p99, during.lat_start.max },
    frames = s.window.frames,
    lost_in = s.lost_in,
    lost_out = s.lost_out,
    lat_in = { s.lat_in.p50, s.lat_in.p99, s.lat_in.max },
    lat_out = { s.lat_out.p50, s.lat_out.p99, s.lat_out.max },
    late_p99 = s.late.p99,
    late_max = s.late.max,
    lag_p99 = s.lag.p99,
    cpu_per_call_min = cpu / call_min,
    cpu_cores = cpu / window,
    loop_busy = loop_busy,
    loop_slow = loop_slow,
    lg_cpu_per_call_min = s.window.cpu_s / (math.max(1, established) * s.window.seconds / 60),
    lg_cores = s.window.cpu_s / s.window.seconds,
    rss0 = rss0,
    rss1 = rss1,
    rss_per_call = (rss1 - rss0) / math.max(1, established),
  }
end

-- Calls that come and go ----------------------------------------------------------

-- The number of files callagent has open.
local function proc_fds(pid)
  local f = io.popen("ls /proc/" .. pid .. "/fd 2>/dev/null | wc -l")
  local n = tonumber(f:read("l") or "")
  f:close()
  return n
end

-- The second half of a list of samples: RSS grows at first, while SQLite's
-- page cache and malloc's arenas fill, whatever a call leaves behind.
local function second_half(list)
  return table.move(list, #list // 2 + 1, #list, 1, {})
end

-- CHURN_CALLS calls at once, each ended after CHURN_LIFE seconds of audio
-- the way real calls end - half by the agent (the model calls report_call
-- and says goodbye, callagent hangs up through Twilio), half by the callee
-- hanging up; Twilio's status callback then says completed - and replaced by
-- a new call at once. After a warm-up (the first
-- generation of calls ended), CHURN_SECONDS are measured: what a whole call
-- costs callagent, the live audio's latency while calls start and end
-- around it, and whether anything a call leaves behind piles up (RSS, open
-- files, live calls, records not final).
local function run_churn(r)
  -- Each call's end is notified (notify.hooksUrl): once, says the README.
  local notified, n_notified = {}, 0
  r.on_notified = function(key, data)
    notified[tostring(key)] = (notified[tostring(key)] or 0) + 1
    n_notified = n_notified + 1
    if type(data) ~= "table" or data.status ~= "completed" then
      note(r, "a notification that is not a completed call: %s", tostring(key))
    end
  end
  local lg, app, base = start_row(r)
  local fds0 = proc_fds(app.pid)

  local next_k, live, created, api_failed, ended, status_failed = 0, 0, 0, 0, 0, 0
  local creating = true
  local established = {} -- k -> when its stream opened
  local function create()
    next_k = next_k + 1
    local k = next_k
    created, live = created + 1, live + 1
    local res, err = create_call(base, k)
    if not (res and res.status == 201) then
      api_failed, live = api_failed + 1, live - 1
      if api_failed <= 5 then
        note(r, "POST /v1/calls for call #%d: %s", k, tostring(res and res.status or err))
      end
    end
  end
  r.on_established = function(k)
    established[k] = now()
  end
  r.on_hangup = function(_, ok, why)
    ended, live = ended + 1, live - 1
    if not ok then
      status_failed = status_failed + 1
      if status_failed <= 5 then
        note(r, "the completed status callback was answered %s", tostring(why))
      end
    end
    if creating then
      create()
    end
  end
  -- Each call ends CHURN_LIFE s after its stream opened: odd ones as the
  -- agent ends a call (the report), even ones as the callee does (hanging up).
  local ending = true
  task.spawn(function()
    while ending do
      local t = now()
      for k, at in pairs(established) do
        if t - at >= CHURN_LIFE * 1000 then
          established[k] = nil
          if k % 2 == 1 then
            lg:tell("end " .. k)
          elseif r.by_k[k] then
            twilio_call_ended(r, r.by_k[k])
          end
        end
      end
      timer.sleep(20)
    end
  end)
  -- The first generation comes up spread over a call's life, so calls end
  -- at a steady pace, not in waves.
  for _ = 1, CHURN_CALLS do
    task.spawn(create)
    timer.sleep(CHURN_LIFE * 1000 / CHURN_CALLS)
  end
  local deadline = now() + CHURN_LIFE * 1000 + 30000
  while ended < CHURN_CALLS and now() < deadline do
    timer.sleep(50)
  end
  if ended < CHURN_CALLS then
    error(string.format("the first %d calls did not end: %d ended in %d s", CHURN_CALLS, ended, CHURN_LIFE + 30))
  end

  -- Measured: RSS and open files every second, against the calls ended.
  local samples = { ended = {}, rss = {} }
  local loop0 = loop_stats(base)
  local ended0, cpu0, t0 = ended, proc_stat(app.pid), now()
  local fds_min, fds_max = math.huge, 0
  lg:cmd("measure start")
  while now() - t0 < CHURN_SECONDS * 1000 do
    timer.sleep(1000)
    local rss, fds = proc_rss(app.pid), proc_fds(app.pid)
    samples.ended[#samples.ended + 1] = ended
    samples.rss[#samples.rss + 1] = rss
    if os.getenv("BENCH_VERBOSE") and #samples.rss % 10 == 0 then
      io.stderr:write(string.format("  [churn] %d s: %d calls ended, RSS %.1f MiB, %d open files\n",
        #samples.rss, ended, rss / 1048576, fds))
    end
    fds_min, fds_max = math.min(fds_min, fds), math.max(fds_max, fds)
  end
  lg:cmd("measure stop")
  local cpu, window, ended1 = proc_stat(app.pid) - cpu0, (now() - t0) / 1000, ended
  local loop_busy, loop_slow = loop_load(loop0, loop_stats(base))
  local s_during = json.decode(assert(lg:cmd("stats"):match("^stats (.*)$")))

  -- The last calls end on their own; then nothing of them may be left.
  creating = false
  deadline = now() + CHURN_LIFE * 1000 + 30000
  while live > 0 and now() < deadline do
    timer.sleep(50)
  end
  ending = false
  -- The notifications come from a background task: give them time, one for
  -- each call created (the row's count), not only for those seen to end.
  deadline = now() + 15000
  while n_notified < math.max(ended, created - api_failed) and now() < deadline do
    timer.sleep(50)
  end
  timer.sleep(1000)
  local h = fetch(base .. "/healthz", { timeout = 10000 })
  local health = h and h.status == 200 and json.decode(h.body) or {}
  local fds_end, rss_end = proc_fds(app.pid), proc_rss(app.pid)
  local s = json.decode(assert(lg:cmd("stats"):match("^stats (.*)$")))

  -- Every call has its final record: completed, with the model's report, or
  -- ended by the callee, without one.
  local reported, hung_up, notified_once, notified_more = 0, 0, 0, 0
  local listed, why = each_call(base, function(c)
    local n_notes = notified[c.callId .. ":" .. tostring(c.status)] or 0
    if n_notes == 1 then
      notified_once = notified_once + 1
    elseif n_notes > 1 then
      notified_more = notified_more + 1
    end
    if c.status == "completed" and type(c.report) == "table" and c.report.outcome == "success" then
      reported = reported + 1
    elseif c.status == "completed" and c.report == nil and c.endReason == "callee_hung_up" then
      hung_up = hung_up + 1
    end
  end)
  if not listed then
    note(r, "GET /v1/calls: %s", why)
  end
  r.stopping = true
  return {
    created = created,
    api_failed = api_failed,
    ended = ended,
    ended_measured = ended1 - ended0,
    active_left = health.activeCalls,
    reported = reported,
    hung_up = hung_up,
    notified_once = notified_once,
    notified_more = notified_more,
    window = window,
    cpu = cpu,
    loop_busy = loop_busy,
    loop_slow = loop_slow,
    lat_in = { s_during.lat_in.p99, s_during.lat_in.max },
    lat_out = { s_during.lat_out.p99, s_during.lat_out.max },
    lat_start = { s_during.lat_start.p99, s_during.lat_start.max },
    late_p99 = s_during.late.p99,
    lag_p99 = s_during.lag.p99,
    unfreed = s.ended.unfreed,
    rss_first = samples.rss[1],
    rss_last = samples.rss[#samples.rss],
    rss_end = rss_end,
    rss_slope = slope(second_half(samples.ended), second_half(samples.rss)),
    fds0 = fds0,
    fds_min = fds_min,
    fds_max = fds_max,
    fds_end = fds_end,
  }
end

local function startup_times()
  local times = {}
  for _ = 1, 5 do
    local port = free_port()
    local db = os.tmpname()
    local app, ms = start_app("audio/pcmu", port, db, "ws://127.0.0.1:9/v1/realtime")
    times[#times + 1] = ms
    stop_app(app)
    os.remove(db)
  end
  table.sort(times)
  return times
end

-- The kernel's floor: loopback.c three times over `conns` connections, the
-- cheapest run.
local function kernel_floor(conns)
  local best
  for _ = 1, 3 do
    local p = process.spawn({ LOOPBACK, "-t", os.getenv("BENCH_FLOOR_SECONDS") or "1", "-n", tostring(conns), "-b", "300" })
    if not p then
      return nil
    end
    local line = p:read_line(15000)
    p:wait(5000)
    local f = {}
    for k, v in (line or ""):gmatch("(%S+) (%S+)") do
      f[k] = tonumber(v)
    end
    if f.pair_us and (not best or f.pair_us < best.pair_us) then
      best = f
    end
  end
  return best
end

-- The first line a shell command prints.
local function sh_line(cmd)
  local f = io.popen(cmd)
  local line = f:read("l")
  f:close()
  return line
end

-- Whether the load generator kept its 20 ms schedule in a row: if not, the
-- row measures the harness.
local function harness_kept_up(r)
  return r.late_p99 <= 5 and r.lag_p99 <= 20
end

-- Whatever happened in a row, nothing of it keeps running.
local function end_run(r)
  r.stopping = true
  stop_app(r.app)
  if r.lg then
    r.lg:stop()
  end
  if r.db then
    os.remove(r.db)
    os.remove(r.db .. "-wal")
    os.remove(r.db .. "-shm")
  end
end

-- Issue 6's targets, judged on this run's rows: per target the rows it is
-- set on (all of them, when BENCH_N repeats a size), each value, and met or
-- missed; "not measured" when the run has no such row.
local function targets(rows, slopes, startup_ms)
  local n1, n2 = tonumber(TARGET_N[1]) or 400, tonumber(TARGET_N[2]) or 1000
  local function rows_of(mode, n)
    local out = {}
    for _, r in ipairs(rows) do
      if r.mode == mode and r.n == n then
        out[#out + 1] = r
      end
    end
    return out
  end
  -- judged: {value text, ok} per row -> "v - met", or "v1, v2 - met in k of 2 rows"
  local function verdict(judged)
    local k, vs = 0, {}
    for i, j in ipairs(judged) do
      vs[i] = j[1]
      k = k + (j[2] and 1 or 0)
    end
    if #judged == 1 then
      return vs[1] .. " - " .. (judged[1][2] and "met" or "missed")
    end
    return string.format("%s - met in %d of %d rows", table.concat(vs, ", "), k, #judged)
  end
  local lines = {}
  local function line(what, text)
    lines[#lines + 1] = string.format("- %s: %s", what, text)
  end
  local function not_measured(mode, n)
    return string.format("not measured (no %s row of %d calls)", mode:gsub("audio/", ""), n)
  end

  -- /proc counts CPU in ticks: a tiny row may show none, which judges nothing.
  local no_cpu = "not measured (the pcmu rows used no CPU /proc could count)"
  local pcmu, pcm = rows_of("audio/pcmu", n1), rows_of("audio/pcm", n1)
  local judged = {}
  -- With the load generator's CPU in the same row beside it: the same code
  -- in every build, so the ratio moves with callagent, not with the VM.
  for _, r in ipairs(pcmu) do
    if r.cpu_per_call_min > 0 then
      local vs = (r.lg_cpu_per_call_min or 0) > 0
        and string.format(" (%.2f× the load generator's)", r.cpu_per_call_min / r.lg_cpu_per_call_min) or ""
      judged[#judged + 1] = { string.format("%.4f%s", r.cpu_per_call_min, vs), r.cpu_per_call_min <= 0.05 }
    end
  end
  line(string.format("CPU ≤ 0.05 s per call-minute, pcmu, %d calls", n1),
    #judged > 0 and verdict(judged) or #pcmu > 0 and no_cpu or not_measured("audio/pcmu", n1))

  judged = {}
  for i = 1, math.min(#pcmu, #pcm) do
    if pcmu[i].cpu_per_call_min > 0 then
      local ratio = pcm[i].cpu_per_call_min / pcmu[i].cpu_per_call_min
      judged[#judged + 1] = { string.format("%.2f×", ratio), ratio <= 1.5 }
    end
  end
  line(string.format("pcm CPU ≤ 1.5× pcmu, %d calls", n1),
    #judged > 0 and verdict(judged) or (#pcmu > 0 and #pcm > 0) and no_cpu
      or not_measured(#pcmu == 0 and "audio/pcmu" or "audio/pcm", n1))

  for _, t in ipairs({ { n = n1, ms = 5 }, { n = n2, ms = 20 } }) do
    for _, mode in ipairs({ "audio/pcmu", "audio/pcm" }) do
      judged = {}
      for _, r in ipairs(rows_of(mode, t.n)) do
        local lost, kept = r.lost_in + r.lost_out, harness_kept_up(r)
        judged[#judged + 1] = {
          string.format("%.2f / %.2f ms%s%s", r.lat_in[2], r.lat_out[2],
            lost > 0 and string.format(", %d frames lost", lost) or "", kept and "" or ", harness-limited"),
          r.failed == 0 and lost == 0 and kept and math.max(r.lat_in[2], r.lat_out[2]) < t.ms,
        }
      end
      line(string.format("p99 < %d ms in / out, nothing lost, the load generator keeping up, %s, %d calls", t.ms,
          mode:gsub("audio/", ""), t.n),
        #judged > 0 and verdict(judged) or not_measured(mode, t.n))
    end
  end

  for _, mode in ipairs(MODES) do
    local v = slopes[mode]
    line("≤ 40 KiB RSS per call, " .. mode:gsub("audio/", ""),
      v and verdict({ { string.format("%.1f KiB (the slope)", v / 1024), v / 1024 <= 40 } })
        or "not measured (no slope: fewer than two rows carried whole)")
  end
  line("start-up < 100 ms", verdict({ { string.format("%.0f ms (min of 5)", startup_ms), startup_ms < 100 } }))
  print("")
  print("Against the targets (issue 6), on this run's rows:")
  for _, l in ipairs(lines) do
    print(l)
  end
end

local function main()
  if PIN then
    os.execute("taskset -p -c 1 " .. core.pid() .. " >/dev/null")
  end
  start_fakes()
  local cpus = sh_line("nproc --all")
  local model = sh_line("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2") or "?"
  print(string.format("callagent %s benchmark - %s, %s CPUs, %s", core.version, os.date("!%Y-%m-%d %H:%M UTC"), cpus, model:gsub("^%s+", "")))
  local turn = tonumber(os.getenv("LOADGEN_TURN") or "250")
  print(string.format("%d s measured per row after a %g s warm-up; store: %s (%s); model connection: %s; %s", SECONDS, WARMUP, STORE,
    turn > 0 and string.format("a turn every %g s per call writes 2 transcript lines and usage", turn * 0.02)
      or "no turns: the store is idle while audio flows",
    TLS and "wss:// (TLS)" or "ws://",
    PIN and "callagent pinned to CPU 0, load generator (loadgen.c + this script) to CPU 1" or "no CPU pinning"))
  -- Per 20 ms frame the bridge receives phone media and the model delta, and
  -- a mark echo every fifth frame (a mark per 100 ms of audio), and sends one
  -- append and one media write (every fifth with its mark); the load
  -- generator sends the frame, the delta and every fifth frame a mark echo,
  -- and receives the append and the media.
  for _, conns in ipairs({ 200, 2000 }) do
    local fl = kernel_floor(conns)
    if fl then
      -- Scale the echo side's send/recv wall times to its CPU per pair.
      local scale = fl.pair_us / (fl.send_us + fl.recv_us)
      local bridge_us = scale * (2 * fl.send_us + 2.2 * fl.recv_us)
      local harness_us = scale * (2.2 * fl.send_us + 2 * fl.recv_us)
      print(string.format("kernel floor (%d connections): %.1f µs CPU per loopback recv+send pair of 300-byte messages"
        .. " (send ~%.1f, recv ~%.1f) -> a bridge doing 2 sends + 2.2 receives per 20 ms frame costs at least %.3f CPU-s"
        .. " per call-minute here (%.2f cores at 1000 calls); the load generator's 2.2 sends + 2 receives at least %.3f"
        .. " (%.2f cores)",
        conns, fl.pair_us, fl.send_us * scale, fl.recv_us * scale, bridge_us * 3000 / 1e6, bridge_us * 50000 / 1e6,
        harness_us * 3000 / 1e6, harness_us * 50000 / 1e6))
    else
      print("kernel floor: " .. LOOPBACK .. " did not run")
      break
    end
    io.stdout:flush()
  end
  local st = startup_times()
  print(string.format("start-up (spawn to serving): min %.0f ms, median %.0f ms", st[1], st[3]))
  print("")
  print("| mode | calls | ok/failed | frames | lost in/out | in p50/p99/max ms | out p50/p99/max ms | CPU s per call-min | CPU cores | loop busy (in slow iterations) | RSS per call | loadgen CPU s per call-min | harness p99 late / read lag |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  io.stdout:flush()
  local rows, notes = {}, {}
  -- Each size in every mode before the next size: the rows that the pcm
  -- target compares (pcm against pcmu at the same size) run minutes apart
  -- at most, not a whole mode apart, as this VM's speed drifts by a fifth
  -- or more within minutes.
  for _, ns in ipairs(NS) do
    for _, mode in ipairs(MODES) do
      local n = tonumber(ns)
      local r = new_run(mode)
      run = r
      local ok, row = xpcall(run_one, debug.traceback, r, n)
      end_run(r)
      if r.app_lines > LOG_LINES then
        note(r, "callagent wrote %d lines to stderr (%d shown)", r.app_lines, LOG_LINES)
      end
      if not ok then
        print(string.format("| %s | %d | run failed: %s |", mode, n, tostring(row):gsub("\n.*", "")))
        io.stderr:write(tostring(row), "\n")
      else
        rows[#rows + 1] = row
        local harness = string.format("%.1f / %.1f ms", row.late_p99, row.lag_p99)
        if not harness_kept_up(row) then
          harness = "**" .. harness .. ": harness-limited**"
        end
        local loop = row.loop_busy and string.format("%.0f%% (%.0f%%)", row.loop_busy * 100, row.loop_slow * 100) or "?"
        print(string.format("| %s | %d | %d/%d | %d | %d/%d | %.2f / %.2f / %.1f | %.2f / %.2f / %.1f | %.4f | %.2f | %s | %.1f KiB | %.4f (%.2f cores) | %s |",
          mode:gsub("audio/", ""), n, row.established, row.failed, row.frames, row.lost_in, row.lost_out,
          row.lat_in[1], row.lat_in[2], row.lat_in[3], row.lat_out[1], row.lat_out[2], row.lat_out[3],
          row.cpu_per_call_min, row.cpu_cores, loop, row.rss_per_call / 1024, row.lg_cpu_per_call_min, row.lg_cores,
          harness))
      end
      io.stdout:flush()
      for _, s in ipairs(r.notes) do
        notes[#notes + 1] = string.format("%s, %d calls: %s", mode:gsub("audio/", ""), n, s)
      end
    end
  end
  -- RSS per call as the slope over N (least squares), per mode, over the
  -- rows carried in real time: an overloaded row's RSS holds queued audio.
  local slopes = {}
  for _, mode in ipairs(MODES) do
    local xs, ys, used = {}, {}, {}
    for _, r in ipairs(rows) do
      if r.mode == mode and r.failed == 0 and r.lost_in == 0 and r.lost_out == 0
        and harness_kept_up(r) then
        xs[#xs + 1], ys[#ys + 1] = r.established, r.rss1
        used[#used + 1] = tostring(r.n)
      end
    end
    local per_call = slope(xs, ys)
    slopes[mode] = per_call
    if per_call then
      print(string.format("RSS slope (%s): %.1f KiB per call (rows of %s calls: nothing lost)", mode,
        per_call / 1024, table.concat(used, ", ")))
    end
  end
  -- Set-up's CPU per call, over the rows carried in real time.
  for _, mode in ipairs(MODES) do
    local parts = {}
    for _, r in ipairs(rows) do
      if r.mode == mode and r.failed == 0 and harness_kept_up(r) then
        local l = r.setup_lat
        parts[#parts + 1] = string.format("%.2f ms at %d (%.1f s; p99 %.1f / %.1f ms, max %.1f; first 0.5 s in: p99 %.1f, max %.1f)",
          r.setup_cpu_per_call * 1000, r.n, r.setup_ms / 1000, l[1], l[2], l[3], l[4], l[5])
      end
    end
    if #parts > 0 then
      print(string.format("set-up (%s): callagent CPU per call created, its audio during set-up subtracted"
        .. " (the set-up's length; the latency of the calls streaming meanwhile, in / out, past their first"
        .. " half second, and in their first half second): %s", mode,
        table.concat(parts, ", ")))
    end
  end
  if CHURN_SECONDS > 0 then
    local r = new_run(CHURN_MODE)
    run = r
    local ok, c = xpcall(run_churn, debug.traceback, r)
    end_run(r)
    print("")
    print(string.format("Calls that come and go (%s): %d at once, each ended %g s after its stream opened as a real call"
      .. " ends - half by the agent (report_call, the goodbye played, callagent's hang-up), half by the callee"
      .. " hanging up; then Twilio's stop and completed status callback - and replaced at once;"
      .. " %d s measured after the first %d ended", CHURN_MODE:gsub("audio/", ""), CHURN_CALLS, CHURN_LIFE, CHURN_SECONDS,
      CHURN_CALLS))
    print("")
    if not ok then
      print("churn run failed: " .. tostring(c):gsub("\n.*", ""))
      io.stderr:write(tostring(c), "\n")
    else
      print("| calls ended (measured) | CPU per call | CPU cores | loop busy (in slow iterations) | in / out p99 (max) ms | first 0.5 s p99 (max) ms | RSS measured: first → last (its second half: per 1000 calls) | RSS after | open files: before, measured, after | left after: live calls, ended ones with a connection open | records completed: with the report + hung up by the callee, of calls created | notified once (more than once) |")
      print("|---|---|---|---|---|---|---|---|---|---|---|---|")
      local harness = harness_kept_up(c) and ""
        or string.format(" **harness-limited: p99 late %.1f / read lag %.1f ms**", c.late_p99, c.lag_p99)
      print(string.format("| %d (%d) | %.1f ms | %.2f | %s | %.2f / %.2f (%.1f) | %.2f (%.1f) | %.1f → %.1f MiB (%s) | %.1f MiB | %d, %d–%d, %d | %s, %d | %d + %d of %d | %d (%d) |%s",
        c.ended, c.ended_measured, c.ended_measured > 0 and c.cpu / c.ended_measured * 1000 or 0, c.cpu / c.window,
        c.loop_busy and string.format("%.0f%% (%.0f%%)", c.loop_busy * 100, c.loop_slow * 100) or "?",
        c.lat_in[1], c.lat_out[1], math.max(c.lat_in[2], c.lat_out[2]), c.lat_start[1], c.lat_start[2],
        c.rss_first / 1048576, c.rss_last / 1048576, c.rss_slope and string.format("%+.1f KiB", c.rss_slope * 1000 / 1024) or "?",
        c.rss_end / 1048576, c.fds0, c.fds_min, c.fds_max, c.fds_end,
        type(c.active_left) == "number" and string.format("%d", c.active_left) or "?", c.unfreed,
        c.reported, c.hung_up, c.created - c.api_failed, c.notified_once, c.notified_more, harness))
    end
    for _, s in ipairs(r.notes) do
      notes[#notes + 1] = "churn: " .. s
    end
  end
  if #rows > 0 then
    targets(rows, slopes, st[1])
  end
  if #notes > 0 then
    print("")
    print("Notes:")
    for _, s in ipairs(notes) do
      print("- " .. s)
    end
  end
  tw_server:close()
end

-- A bench that fails says why and exits 1 (its children are stopped with it),
-- rather than leaving its fakes serving forever.
task.spawn(function()
  local ok, err = xpcall(main, debug.traceback)
  if not ok then
    io.stderr:write("bench failed: ", tostring(err), "\n")
  end
  core.stop(ok and 0 or 1)
end)
