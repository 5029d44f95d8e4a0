-- The callagent program itself: command line, exit codes, module search
-- paths, error handling, signals and graceful shutdown, installation.
local T = require "testing"
local process = require "callagent.process"
local timer = require "callagent.timer"
local core = require "callagent.core"

-- Runs the binary with raw arguments (not "run"): code, stdout, stderr.
local function cli(args)
  local code, out, err = T.exec({ T.bin, table.unpack(args) }, { timeout = 10000 })
  return code, table.concat(out, "\n"), table.concat(err, "\n")
end

T.test("--help and --version answer on stdout with status 0", function()
  local code, out = cli({ "--help" })
  T.eq(code, 0)
  T.match(out, "usage: callagent run APP%.lua")
  for _, name in ipairs({ "CALLAGENT_PATH", "CALLAGENT_LOG ", "CALLAGENT_LOG_FORMAT" }) do
    T.match(out, "\n  " .. name, "the environment it reads: " .. name)
  end
  code, out = cli({ "--version" })
  T.eq(code, 0)
  T.match(out, "^callagent %d+%.%d+%.%d+ %(Lua 5%.4")
end)

T.test("usage errors say what is wrong and exit 2", function()
  local code, out, err = cli({})
  T.eq(code, 2)
  T.match(err, "usage:")
  code, out, err = cli({ "frobnicate" })
  T.eq(code, 2)
  T.match(err, "unknown command 'frobnicate'")
  code, out, err = cli({ "run" })
  T.eq(code, 2)
  T.match(err, "run needs the app file")
  code, out, err = cli({ "run", "/nonexistent/app.lua" })
  T.eq(code, 2)
  T.match(err, "cannot open /nonexistent/app%.lua")
  T.eq(out, "")
  -- One that is there but cannot be read (here a folder) is one too; it was 1.
  local dir = T.tmpdir()
  code, out, err = cli({ "run", dir })
  T.eq(code, 2, err)
  T.match(err, "cannot read .*: Is a directory")
end)

T.test("an error at the top level of app.lua exits 1 with its traceback", function()
  local code, _, p = T.run_app(nil, nil, { source = "local function f() error('top level boom') end\nf()\n" })
  T.eq(code, 1)
  T.match(p.errtext(), "top level boom")
  T.match(p.errtext(), "stack traceback")
  T.match(p.errtext(), "in %a+ 'f'")
end)

T.test("a top-level error that is not a string is shown by its __tostring, or named, with its traceback", function()
  local code, _, p = T.run_app(nil, nil, {
    source = "local function f() error(setmetatable({}, { __tostring = function() return 'custom boom' end })) end\nf()\n",
  })
  T.eq(code, 1)
  T.match(p.errtext(), "ERROR error in .*app%.lua: custom boom\nstack traceback:\n")
  T.match(p.errtext(), "in %a+ 'f'")
  code, _, p = T.run_app(nil, nil, { source = "error({})\n" })
  T.eq(code, 1)
  T.match(p.errtext(), "ERROR error in .*app%.lua: %(error object is a table value%)\nstack traceback:\n")
end)

T.test("a syntax error in app.lua exits 1 and names the line", function()
  local code, _, p = T.run_app(nil, nil, { source = "local x = = 1\n" })
  T.eq(code, 1)
  T.match(p.errtext(), "app%.lua:1:")
end)

T.test("started with stdin, stdout and stderr closed, it exits 0 and writes into none of its own files", function()
  -- Files the app opens used to take fds 0-2: print() and log lines went
  -- into them, and libuv aborted at exit (status 134).
  local dir = T.tmpdir()
  local app = dir .. "/app.lua"
  local f = assert(io.open(app, "w"))
  f:write([[
local dir = ...
local files = {}
for _, name in ipairs({ "a", "b", "c" }) do
  files[name] = assert(io.open(dir .. "/" .. name .. ".txt", "w"))
end
print("PRINTED")
io.stdout:flush()
require("callagent.log").warn("LOGGED")
for name, fh in pairs(files) do
  fh:write(name)
  fh:close()
end
require("callagent.timer").after(10, function() require("callagent.log").warn("LOGGED LATER") end)
]])
  f:close()
  local p = assert(process.spawn({ "bash", "-c", 'exec "$0" run "$1" "$2" <&- >&- 2>&-', T.bin, app, dir }))
  local code, why = p:wait(10000)
  T.eq({ code, why }, { 0, nil }, "exit status")
  for _, name in ipairs({ "a", "b", "c" }) do
    local fh = assert(io.open(dir .. "/" .. name .. ".txt"))
    T.eq(fh:read("a"), name, name .. ".txt holds what the app wrote into it, nothing else")
    fh:close()
  end
end)

T.test("arguments reach the app as ... and arg", function()
  local code, _, p = T.run_app(nil, { "one", "two words" }, {
    source = "print(select('#', ...), ...)\nprint(arg[0]:match('app.lua$'), arg[1], arg[2], arg[-1])\n",
  })
  T.eq(code, 0)
  T.eq(p.out[1], "2\tone\ttwo words")
  T.eq(p.out[2], "app.lua\tone\ttwo words\trun")
end)

T.test("the open-files limit is raised to the hard limit, up to 65536 (a call holds four)", function()
  local dir = T.tmpdir()
  local f = assert(io.open(dir .. "/app.lua", "w"))
  f:write([[
for line in io.lines("/proc/self/limits") do
  if line:match("^Max open files") then
    print(line:match("^Max open files%s+(%S+)%s+(%S+)"))
  end
end
]])
  f:close()
  local out = {}
  local p = assert(process.spawn({
    "sh", "-c", 'ulimit -Sn 256 && exec "$0" run "$1"', T.bin, dir .. "/app.lua",
    on_stdout = function(line)
      out[#out + 1] = line
    end,
  }))
  T.eq(p:wait(10000), 0)
  local soft, hard = out[1]:match("^(%S+)\t(%S+)$")
  T.eq(tonumber(soft), hard == "unlimited" and 65536 or math.min(tonumber(hard), 65536), out[1])
  T.ne(tonumber(soft), 256)
end)

T.test("the loop runs until no work is left, then the program exits 0", function()
  local t0 = timer.now()
  local code, _, p = T.run_app(nil, nil, {
    source = [[
local timer = require "callagent.timer"
local http = require "callagent.http"
local n, t = 0, nil
-- Six ticks, however slowly a loaded machine lets them come; then a server
-- that closes: after that nothing is left and the program must exit.
t = timer.every(10, function()
  n = n + 1
  if n < 6 then
    return
  end
  t:stop()
  local srv = http.server({})
  assert(srv:listen())
  timer.after(50, function() srv:close(); print("ticks", n > 5) end)
end)
]],
  })
  T.eq(code, 0)
  T.eq(p.out[1], "ticks\ttrue")
  T.lt(timer.now() - t0, 5000, "it did not linger")
end)

T.test("core.loop_stats counts the loop's busy time, its slow iterations and its windows", function()
  local code, _, p = T.run_app(nil, nil, {
    source = [[
local core = require "callagent.core"
local timer = require "callagent.timer"
local json = require "callagent.json"
local out = {}
timer.after(50, function()
  out.a = core.loop_stats()
  local t = os.clock()
  while os.clock() - t < 0.15 do end -- one iteration busy for 150 ms
  timer.after(20, function()
    out.b = core.loop_stats()
    core.loop_window(0.2) -- a new window starts now, without the 150 ms
    timer.after(250, function()
      out.c = core.loop_stats()
      local t = os.clock()
      while os.clock() - t < 0.03 do end -- the iteration running counts too
      out.d = core.loop_stats()
      print(json.encode(out))
    end)
  end)
end)
]],
  })
  T.eq(code, 0, p.errtext())
  local r = require("callagent.json").decode(p.out[1])
  local a, b, c, d = r.a, r.b, r.c, r.d
  T.eq(b.slow - a.slow, 1, "the 150 ms iteration is one slow iteration")
  T.ge(b.slow_s - a.slow_s, 0.149)
  T.ge(b.busy_s - a.busy_s, 0.149)
  T.ge(b.max_ms, 149)
  T.ge(b.max_iteration_ms, 149, "before a full window: the longest since start")
  T.near(b.window_s, b.uptime_s, 0.01, "before a full window: since start")
  T.gt(b.utilization, 0)
  T.le(b.utilization, 1)
  T.gt(c.iterations, b.iterations)
  T.lt(c.busy_s - b.busy_s, 0.1, "idle: the loop was blocked")
  -- 150 ms, so a loaded machine that preempts one of the window's short
  -- iterations does not reach it.
  T.lt(c.max_iteration_ms, 149, "the last window did not hold the 150 ms iteration")
  T.ge(c.max_ms, 149, "since start still does")
  T.ge(c.window_s, 0.2)
  T.lt(c.utilization, 0.5, "the last window was mostly idle")
  T.ge(c.uptime_s, b.uptime_s + 0.24)
  -- From loop_window, just after b, to c: the 250 ms timer may fire late on a
  -- loaded machine, so the window is measured against the clock, not a bound.
  T.near(c.window_s, c.uptime_s - b.uptime_s, 0.02, "the window started at loop_window, just after b")
  T.ge(d.busy_s - c.busy_s, 0.029, "read inside a busy callback: its time so far")
  T.le(d.busy_s - c.busy_s, d.uptime_s - c.uptime_s + 1e-6, "busy never outgrows the clock")
  T.ge(d.slow_s - c.slow_s, 0.029, "and it is already slow")
end)

T.test("core.loop_stats: an iteration ends at each poll for I/O, also within one pass of libuv's loop", function()
  -- 1100 WebSocket clients each send a message at once to a server that
  -- echoes it, and each message costs 100 us to handle: 2200 messages. A
  -- poll brings at most 1024 events, and libuv then polls again in the same
  -- pass of its loop, so the frames of the last clients waited for about
  -- 1024 handlers, not for the 2200 of the pass.
  local code, _, p = T.run_app(nil, nil, {
    source = [[
local core = require "callagent.core"
local http = require "callagent.http"
local ws = require "callagent.ws"
local task = require "callagent.task"
local timer = require "callagent.timer"
local json = require "callagent.json"
local N = 1100
local function burn()
  local t = timer.now()
  while timer.now() - t < 0.1 do end
end
local srv = http.server({ max_connections = 4096 })
srv:websocket("/echo", {
  text = function(conn, msg)
    burn()
    conn:send(msg)
  end,
})
assert(srv:listen())
local clients, echoed = {}, 0
task.spawn(function()
  local opened = 0
  for i = 1, N do
    task.spawn(function()
      clients[i] = assert(ws.connect(srv:ws_url("/echo"), {
        on_text = function()
          burn()
          echoed = echoed + 1
        end,
      }))
      opened = opened + 1
    end)
  end
  while opened < N do
    timer.sleep(10)
  end
  timer.sleep(100)
  core.loop_window(60)
  local a = core.loop_stats()
  timer.after(0, function()
    for i = 1, N do
      clients[i]:send("x")
    end
  end)
  local deadline = timer.now() + 20000
  while echoed < N and timer.now() < deadline do
    timer.sleep(5)
  end
  local b = core.loop_stats()
  print(json.encode({ echoed = echoed, iterations = b.iterations - a.iterations,
    busy_ms = (b.busy_s - a.busy_s) * 1000, max_ms = b.max_iteration_ms }))
  core.stop(0)
end)
]],
  })
  T.eq(code, 0, p.errtext())
  local r = require("callagent.json").decode(p.out[1])
  T.eq(r.echoed, 1100, "every echo came back")
  T.ge(r.busy_ms, 220, "2200 messages at 100 us each")
  T.ge(r.iterations, 3, "the messages came in three polls or more")
  -- One poll's handlers are at most 1024 of the 2200 (about half the busy
  -- time), the whole pass all of it; the margin is for a machine whose other
  -- work preempts this one mid-iteration (seen: 0.74 with the suite running).
  T.lt(r.max_ms, 0.85 * r.busy_ms, "the longest iteration is one poll's handlers, not the pass's: "
    .. r.max_ms .. " ms of " .. r.busy_ms)
  T.ge(r.max_ms, 50, "and one poll brought hundreds of them")
end)

T.test("core.loop_stats: a wait for I/O that a signal interrupts counts as idle", function()
  -- A child's exit (SIGCHLD) and a SIGTERM each end a long, idle wait.
  local code, _, p = T.run_app(nil, nil, {
    source = [[
local core = require "callagent.core"
local runtime = require "callagent.runtime"
local process = require "callagent.process"
local task = require "callagent.task"
local json = require "callagent.json"
task.spawn(function()
  local p = process.spawn({ "sleep", "0.6", on_stdout = false, on_stderr = false })
  p:wait()
  local after_child = core.loop_stats()
  core.on_signal(function()
    print(json.encode({ child = after_child, signal = core.loop_stats() }))
    core.stop(0)
  end)
  process.spawn({ "sh", "-c", "sleep 0.6; kill -TERM " .. runtime.pid(), on_stdout = false, on_stderr = false })
end)
]],
  })
  T.eq(code, 0, p.errtext())
  local r = require("callagent.json").decode(p.out[1])
  T.ge(r.child.uptime_s, 0.6)
  T.lt(r.child.busy_s, 0.3, "waiting for the child is idle")
  T.lt(r.child.utilization, 0.5)
  T.ge(r.signal.uptime_s, 1.2)
  T.lt(r.signal.busy_s, 0.3, "waiting until the signal is idle")
  T.lt(r.signal.utilization, 0.5)
end)

T.test("core.loop_window refuses lengths out of range", function()
  local code, _, p = T.run_app(nil, nil, {
    source = "print(pcall(require('callagent.core').loop_window, 0))\nprint(pcall(require('callagent.core').loop_window, 'x'))\n",
  })
  T.eq(code, 0)
  T.match(p.out[1], "^false\t.*seconds between 0%.01 and 86400")
  T.match(p.out[2], "^false\t.*number expected")
end)

-- An app whose loop the script stalls: `stalls` of `ms` each, 120 ms apart
-- (ms of wall time: a busy machine does not stretch them).
local function stalled_app(stalls, ms, watch_ms)
  return T.run_app(nil, nil, {
    source = T.mock_app_source("loop_watch_ms = " .. (watch_ms or 100)) .. string.format([[
local task = require "callagent.task"
local timer = require "callagent.timer"
task.spawn(function()
  assert(app:start())
  for _ = 1, %d do
    timer.sleep(120)
    local t = timer.now()
    while timer.now() - t < %d do end
  end
  timer.sleep(250)
  app:stop()
end)
]], stalls, ms),
  })
end

T.test("an app warns, once a minute at most, when its event loop is overloaded", function()
  local code, _, p = stalled_app(2, 300)
  T.eq(code, 0, p.errtext())
  local lines = {}
  for line in p.errtext():gmatch("[^\n]+") do
    if line:find("event loop overloaded", 1, true) then
      lines[#lines + 1] = line
    end
  end
  T.eq(#lines, 1, "two stalls, one warning: " .. p.errtext())
  T.match(lines[1], "WARN")
  local ms = tonumber(lines[1]:match("longest_iteration_ms=(%d+)"))
  T.ok(ms and ms >= 295, "the longest iteration named: " .. lines[1])
  T.match(lines[1], "active_calls=0")
  -- 5 ms stalls in each 125 ms, checked every 500 ms (three times here):
  -- about 4% busy. A machine busy with other tests (test_call_chaos's calls)
  -- can still take the CPU from the process for a quarter second, which
  -- the loop rightly reports; so one run of three must pass clean.
  local warnings = {}
  for _ = 1, 3 do
    code, _, p = stalled_app(12, 5, 500)
    T.eq(code, 0, p.errtext())
    local warning = p.errtext():match("[^\n]*event loop overloaded[^\n]*")
    if not warning then
      break
    end
    warnings[#warnings + 1] = warning
  end
  T.lt(#warnings, 3, "5 ms stalls in 125 ms: not overloaded, in one run of three: " .. table.concat(warnings, "; "))
end)

T.test("require finds the app's folder, CALLAGENT_PATH folders and the built-in modules", function()
  local dir = T.tmpdir()
  local extra = T.tmpdir()
  local function write(path, text)
    local f = assert(io.open(path, "w"))
    f:write(text)
    f:close()
  end
  write(dir .. "/helper.lua", "return 'from app folder'")
  write(extra .. "/extra_mod.lua", "return 'from CALLAGENT_PATH'")
  write(dir .. "/app.lua", [[
print((require "helper"))
print((require "extra_mod"))
print(type(require "callagent.http"))
print(require("callagent.core").root ~= nil)
]])
  local code, _, p = T.run_app(dir .. "/app.lua", nil, { env = { CALLAGENT_PATH = extra } })
  T.eq(code, 0, p.errtext())
  T.eq(p.out, { "from app folder", "from CALLAGENT_PATH", "table", "true" })
end)

T.test("an error in a callback is logged with a traceback and the program keeps serving", function()
  local code, _, p = T.run_app(nil, nil, {
    source = [[
local timer = require "callagent.timer"
timer.after(1, function() local t = nil; return t.field end)
timer.after(30, function() print("still running") end)
]],
  })
  T.eq(code, 0)
  T.eq(p.out[1], "still running")
  T.match(p.errtext(), "ERROR uncaught error in timer callback: .*attempt to index a nil value")
  T.match(p.errtext(), "stack traceback")
end)

T.test("SIGTERM runs the shutdown handlers, which may wait, then exits 0", function()
  local p = T.spawn_app(nil, nil, {
    source = [[
local runtime = require "callagent.runtime"
local http = require "callagent.http"
local timer = require "callagent.timer"
local srv = http.server({})
assert(srv:listen())
runtime.on_shutdown(function(reason)
  print("shutdown " .. reason)
  timer.sleep(100)
  srv:close()
  print("closed")
end)
print("ready")
]],
  })
  T.wait_for(function()
    return p.out[1] == "ready"
  end, 5000, "ready")
  p:kill("SIGTERM")
  local code, sig = p:wait(5000)
  T.eq(code, 0)
  T.eq(sig, nil)
  T.eq(p.out, { "ready", "shutdown SIGTERM", "closed" })
end)

T.test("fire-and-forget timers do not keep the program alive after it stops", function()
  -- Handles dropped while armed: the timers run on, collected or not. A
  -- repeating one used to keep the loop, and the process, alive forever
  -- after the Lua state was closed; a one-shot one held the exit until it
  -- was due.
  local p = T.spawn_app(nil, nil, {
    source = [[
local timer = require "callagent.timer"
timer.every(50, function() end)
timer.after(30000, function() end)
collectgarbage()
collectgarbage()
print("ready")
]],
  })
  T.wait_for(function()
    return p.out[1] == "ready"
  end, 5000, "ready")
  local t0 = timer.now()
  p:kill("SIGTERM")
  local code, sig = p:wait(3000)
  T.eq({ code, sig }, { 0, nil }, "exited by itself")
  T.lt(timer.now() - t0, 1000)
end)

T.test("SIGINT stops a server-only app even without shutdown handlers", function()
  local p = T.spawn_app(nil, nil, {
    source = "local s = require('callagent.http').server({}); assert(s:listen()); print('ready')\n",
  })
  T.wait_for(function()
    return p.out[1] == "ready"
  end, 5000, "ready")
  p:kill("SIGINT")
  T.eq(p:wait(5000), 0)
end)

T.test("a second signal exits at once with 128 + the signal number", function()
  local p = T.spawn_app(nil, nil, {
    source = [[
local runtime = require "callagent.runtime"
local timer = require "callagent.timer"
runtime.on_shutdown(function() timer.sleep(60000) end)
timer.every(1000, function() end)
print("ready")
]],
  })
  T.wait_for(function()
    return p.out[1] == "ready"
  end, 5000, "ready")
  p:kill("SIGTERM")
  -- Wait until the first signal is handled: two SIGTERMs that are both still
  -- pending (a busy machine that has not run the child yet) are one signal.
  T.wait_for(function()
    return p.errtext():find("shutting down", 1, true)
  end, 5000, "the first signal starts the shutdown")
  timer.sleep(100)
  T.eq(p:running(), true, "the first signal waits for the handler")
  p:kill("SIGTERM")
  local code, why = p:wait(5000)
  T.eq(code, 128 + 15, "exit status (" .. tostring(why) .. "); stderr: " .. p.errtext())
  T.match(p.errtext(), "second signal SIGTERM: exiting now")
end)

T.test("a second signal exits too when a shutdown handler never gives the loop back", function()
  -- The loop never got to read the second signal (libuv only queues it for
  -- the loop): a handler stuck in a loop of its own kept the program up.
  local p = T.spawn_app(nil, nil, {
    source = [[
local runtime = require "callagent.runtime"
runtime.on_shutdown(function()
  print("spinning")
  io.stdout:flush()
  local t = os.time()
  while os.time() - t < 30 do end
end)
require("callagent.timer").every(1000, function() end)
print("ready")
]],
  })
  T.wait_for(function()
    return p.out[1] == "ready"
  end, 5000, "ready")
  p:kill("SIGTERM")
  T.wait_for(function()
    return p.out[2] == "spinning"
  end, 5000, "the handler runs")
  local t0 = timer.now()
  p:kill("SIGTERM")
  local code, why = p:wait(5000)
  if code == nil then
    p:kill("SIGKILL")
  end
  T.eq(code, 128 + 15, "exit status (" .. tostring(why) .. ")")
  T.lt(timer.now() - t0, 3000)
  T.match(p.errtext(), "second signal, and the event loop did not take it within a second: exiting now")
end)

T.test("runtime.shutdown honours grace_ms when a handler hangs", function()
  local t0 = timer.now()
  local code, _, p = T.run_app(nil, nil, {
    source = [[
local runtime = require "callagent.runtime"
local timer = require "callagent.timer"
runtime.grace_ms = 200
runtime.on_shutdown(function() timer.sleep(60000) end)
timer.every(1000, function() end)
timer.after(10, function() runtime.shutdown(3, "test") end)
]],
  })
  T.eq(code, 3)
  T.lt(timer.now() - t0, 3000)
  T.match(p.errtext(), "still running after grace period")
end)

T.test("runtime.stop(code) from a shutdown handler is the exit status, and runtime.exit(code) too", function()
  -- The shutdown's own stop(0), once its handlers were done, overwrote it.
  local code, _, p = T.run_app(nil, nil, {
    source = [[
local runtime = require "callagent.runtime"
runtime.on_shutdown(function() runtime.stop(4) end)
require("callagent.timer").after(10, function() runtime.shutdown(0, "test") end)
]],
  })
  T.eq(code, 4, p.errtext())
  code, _, p = T.run_app(nil, nil, {
    source = [[
local runtime = require "callagent.runtime"
local timer = require "callagent.timer"
runtime.on_shutdown(function() timer.sleep(5); runtime.exit(7) end)
timer.every(1000, function() end)
timer.after(10, function() runtime.shutdown(0, "test") end)
]],
  })
  T.eq(code, 7, p.errtext())
end)

T.test("make install puts a binary that finds its Lua code without environment variables", function()
  local dir = T.tmpdir()
  local san = os.getenv("CALLAGENT_SAN") == "1" and "SAN=1" or ""
  local ok = os.execute(string.format("make -s -C '%s' install PREFIX='%s' %s >/dev/null 2>&1", T.root, dir, san))
  T.ok(ok, "make install")
  local app = dir .. "/app.lua"
  local f = assert(io.open(app, "w"))
  f:write("print(require('callagent.json').encode({ok = true}), require('callagent.core').root)\n")
  f:close()
  local out = {}
  local p = assert(process.spawn({
    dir .. "/bin/callagent",
    "run",
    app,
    env = { PATH = "/usr/bin:/bin" },
    on_stdout = function(l)
      out[#out + 1] = l
    end,
    on_stderr = false,
  }))
  T.eq(p:wait(10000), 0)
  T.eq(out[1], '{"ok":true}\t' .. core.realpath(dir .. "/share/callagent"))
end)

T.run()
