--- testing: a small test harness for Lua tests run by the real callagent binary.
--
--   local T = require "testing"
--   T.test("http server answers 404 for unknown paths", function()
--     local srv = ...; T.defer(function() srv:close() end)
--     T.eq(res.status, 404)
--   end)
--   T.run()
--
-- Each test runs in its own task (it may wait on I/O) with a timeout
-- (T.timeout_ms, default 30000, or per test: T.test(name, fn, {timeout = ms})).
-- Deferred cleanups run after the test, pass or fail. Output is TAP:
-- "ok N - name" / "not ok N - name" with "# " diagnostics; the process exits
-- 0 when all passed, 1 otherwise. TEST_FILTER (a Lua pattern) picks tests by name.
local task = require "callagent.task"
local timer = require "callagent.timer"
local core = require "callagent.core"

local T = { timeout_ms = 30000 }
local tests = {}
local current_defers

function T.test(name, fn, opts)
  tests[#tests + 1] = { name = name, fn = fn, opts = opts or {} }
end

function T.defer(fn)
  assert(current_defers, "T.defer outside a test")
  current_defers[#current_defers + 1] = fn
end

local function fmt(v)
  if type(v) == "string" then
    if #v > 200 then
      return string.format("%q", v:sub(1, 200)) .. "...(" .. #v .. " bytes)"
    end
    return string.format("%q", v)
  end
  if type(v) == "table" then
    local ok, json = pcall(require("cjson").encode, v)
    if ok then
      return json
    end
  end
  return tostring(v)
end
T.fmt = fmt

local function fail(msg, level)
  error(msg, (level or 1) + 2)
end

local function deep_eq(a, b)
  if a == b then
    return true
  end
  if type(a) ~= "table" or type(b) ~= "table" then
    return false
  end
  for k, v in pairs(a) do
    if not deep_eq(v, b[k]) then
      return false
    end
  end
  for k in pairs(b) do
    if a[k] == nil then
      return false
    end
  end
  return true
end

function T.eq(actual, expected, what)
  if not deep_eq(actual, expected) then
    fail(string.format("%sexpected %s, got %s", what and (what .. ": ") or "", fmt(expected), fmt(actual)))
  end
end

function T.ne(actual, unexpected, what)
  if deep_eq(actual, unexpected) then
    fail(string.format("%sdid not expect %s", what and (what .. ": ") or "", fmt(actual)))
  end
end

function T.ok(v, what)
  if not v then
    fail((what or "expected a true value") .. " (got " .. fmt(v) .. ")")
  end
  return v
end

function T.match(s, pattern, what)
  if type(s) ~= "string" or not s:find(pattern) then
    fail(string.format("%sexpected %s to match %q", what and (what .. ": ") or "", fmt(s), pattern))
  end
end

function T.no_match(s, pattern, what)
  if type(s) == "string" and s:find(pattern) then
    fail(string.format("%sexpected %s not to match %q", what and (what .. ": ") or "", fmt(s), pattern))
  end
end

-- s does not hold text (plain text, not a pattern: a secret such as
-- "tw-auth-token" is no pattern of itself).
function T.lacks(s, text, what)
  if type(s) == "string" and s:find(text, 1, true) then
    fail(string.format("%sexpected %s not to hold %q", what and (what .. ": ") or "", fmt(s), text))
  end
end

function T.near(actual, expected, eps, what)
  if type(actual) ~= "number" or math.abs(actual - expected) > eps then
    fail(string.format("%sexpected %s within %s of %s", what and (what .. ": ") or "", fmt(actual), eps, expected))
  end
end

function T.gt(a, b, what)
  if not (type(a) == "number" and a > b) then
    fail(string.format("%sexpected %s > %s", what and (what .. ": ") or "", fmt(a), fmt(b)))
  end
end

function T.ge(a, b, what)
  if not (type(a) == "number" and a >= b) then
    fail(string.format("%sexpected %s >= %s", what and (what .. ": ") or "", fmt(a), fmt(b)))
  end
end

function T.lt(a, b, what)
  if not (type(a) == "number" and a < b) then
    fail(string.format("%sexpected %s < %s", what and (what .. ": ") or "", fmt(a), fmt(b)))
  end
end

function T.le(a, b, what)
  if not (type(a) == "number" and a <= b) then
    fail(string.format("%sexpected %s <= %s", what and (what .. ": ") or "", fmt(a), fmt(b)))
  end
end

--- Expects fn to raise an error whose message matches pattern.
function T.raises(fn, pattern, what)
  local ok, err = pcall(fn)
  if ok then
    fail((what or "expected an error") .. ", but the call succeeded")
  end
  if pattern and not tostring(err):find(pattern) then
    fail(string.format("%serror %s does not match %q", what and (what .. ": ") or "", fmt(tostring(err)), pattern))
  end
  return err
end

--- Waits (inside a test) until pred() is true, polling every 5 ms. what:
-- what was waited for, or a function that says it when the wait fails.
function T.wait_for(pred, timeout_ms, what)
  local deadline = timer.now() + (timeout_ms or 5000)
  while true do
    local v = pred()
    if v then
      return v
    end
    if timer.now() > deadline then
      fail("timed out waiting for " .. (type(what) == "function" and what() or what or "condition"))
    end
    timer.sleep(5)
  end
end

--- The lines this process logs at level ("warn", "error") during the
-- running test, each {msg, fields}, as they come (still logged too).
function T.log_lines(level)
  local log = require "callagent.log"
  local lines, real = {}, log[level]
  log[level] = function(msg, fields)
    lines[#lines + 1] = { msg = msg, fields = fields }
    return real(msg, fields)
  end
  T.defer(function()
    log[level] = real
  end)
  return lines
end

--- Sets mod[field] to value for the running test (a module's wait, made
-- short), restored when the test ends. Returns the value it had.
function T.shorten(mod, field, value)
  local saved = mod[field]
  mod[field] = value
  T.defer(function()
    mod[field] = saved
  end)
  return saved
end

function T.diag(...)
  local parts = {}
  for i = 1, select("#", ...) do
    parts[#parts + 1] = tostring((select(i, ...)))
  end
  io.stdout:write("# ", (table.concat(parts, " "):gsub("\n", "\n# ")), "\n")
  io.stdout:flush()
end

local function run_one(i, t)
  local defers = {}
  current_defers = defers
  local runner = task.running()
  local result, waiting
  local function finish(ok, err)
    if result then
      return
    end
    result = { ok = ok, err = err }
    if waiting then
      task.resume(runner)
    end
  end
  local timeout = t.opts.timeout or T.timeout_ms
  local started = timer.now()
  local tm = timer.after(timeout, function()
    finish(false, "timed out after " .. timeout .. " ms")
  end)
  task.spawn(function()
    finish(xpcall(t.fn, function(e)
      return debug.traceback(tostring(e), 2)
    end))
  end)
  if not result then
    waiting = true
    coroutine.yield()
  end
  tm:stop()
  local ok, err = result.ok, result.err
  current_defers = nil
  for j = #defers, 1, -1 do
    local dok, derr = pcall(defers[j])
    if not dok and ok then
      ok, err = false, "cleanup failed: " .. tostring(derr)
    end
  end
  if ok then
    io.stdout:write(string.format("ok %d - %s\n", i, t.name))
    if os.getenv("TEST_TIMES") then
      io.stdout:write(string.format("# %.0f ms\n", timer.now() - started))
    end
  else
    io.stdout:write(string.format("not ok %d - %s\n", i, t.name))
    io.stdout:write("# ", (tostring(err):gsub("\n", "\n# ")), "\n")
  end
  io.stdout:flush()
  return ok
end

function T.run()
  local filter = os.getenv("TEST_FILTER")
  task.spawn(function()
    local failed, n = 0, 0
    for _, t in ipairs(tests) do
      if not filter or filter == "" or t.name:find(filter) then
        n = n + 1
        if not run_one(n, t) then
          failed = failed + 1
        end
      end
    end
    io.stdout:write(string.format("1..%d\n", n))
    io.stdout:flush()
    core.stop(failed == 0 and 0 or 1)
  end)
end

--- A free loopback TCP port is not needed: servers listen on port 0. For
-- child processes: the path of the callagent binary under test.
T.bin = os.getenv("CALLAGENT_BIN") or (core.root .. "/build/callagent")
T.root = core.root

--- Starts the callagent binary on a Lua file (or source text when opts.source
-- is given; the file is written under a temporary folder). Returns the process
-- (callagent.process) with its output collected in p.out and p.err (arrays of
-- lines); p:text() and p:errtext() join them. opts.umask ("0277"): the
-- umask it runs under (set by sh, which then execs it). Killed after the test.
function T.spawn_app(path, args, opts)
  local process = require "callagent.process"
  opts = opts or {}
  if opts.source then
    local dir = T.tmpdir()
    path = dir .. "/" .. (opts.name or "app.lua")
    local f = assert(io.open(path, "w"))
    f:write(opts.source)
    f:close()
  end
  local out, err = {}, {}
  local spec = { T.bin, "run", path }
  if opts.umask then
    spec = { "sh", "-c", 'umask "$0" && exec "$@"', opts.umask, T.bin, "run", path }
  end
  for _, a in ipairs(args or {}) do
    spec[#spec + 1] = a
  end
  spec.env = opts.env
  spec.inherit_env = opts.env ~= nil and opts.inherit_env ~= false or nil
  spec.cwd = opts.cwd
  spec.stdin = opts.stdin
  spec.on_stdout = function(line)
    out[#out + 1] = line
    if opts.on_stdout then
      opts.on_stdout(line)
    end
  end
  spec.on_stderr = function(line)
    err[#err + 1] = line
    if opts.on_stderr then
      opts.on_stderr(line)
    end
  end
  local p = assert(process.spawn(spec))
  p.out, p.err = out, err
  function p.text()
    return table.concat(out, "\n")
  end
  function p.errtext()
    return table.concat(err, "\n")
  end
  if current_defers then
    T.defer(function()
      if p:running() then
        p:kill("SIGKILL")
      end
    end)
  end
  return p
end

--- Runs a program (argv: its path or name, then its arguments) to
-- completion: exit code, stdout lines, stderr lines. opts: cwd, env (over the
-- inherited environment), timeout (ms, default 20000: then killed, and the
-- test fails with its output).
function T.exec(argv, opts)
  local process = require "callagent.process"
  opts = opts or {}
  local out, err = {}, {}
  local spec = { table.unpack(argv) }
  spec.cwd = opts.cwd
  spec.env = opts.env
  spec.inherit_env = opts.env ~= nil or nil
  spec.max_line = 1 << 20
  spec.on_stdout = function(l)
    out[#out + 1] = l
  end
  spec.on_stderr = function(l)
    err[#err + 1] = l
  end
  local p, perr = process.spawn(spec)
  if not p then
    error("cannot run " .. tostring(argv[1]) .. ": " .. tostring(perr), 0)
  end
  T.defer(function()
    if p:running() then
      p:kill("SIGKILL")
    end
  end)
  local timeout = opts.timeout or 20000
  local code, sig = p:wait(timeout)
  if code == nil and sig == "ETIMEDOUT" then
    p:kill("SIGKILL")
    error(table.concat(argv, " ", 1, math.min(#argv, 2)) .. " did not finish in " .. timeout .. " ms; stdout: "
      .. table.concat(out, "\n") .. " stderr: " .. table.concat(err, "\n"), 0)
  end
  return code, out, err
end

--- T.exec of node (Node.js >= 20) with args.
function T.node(args, opts)
  return T.exec({ "node", table.unpack(args) }, opts)
end

--- Runs an app to completion (timeout_ms, default 20000): code, signal, p.
function T.run_app(path, args, opts)
  local p = T.spawn_app(path, args, opts)
  local code, sig = p:wait((opts and opts.timeout) or 20000)
  if code == nil and sig == "ETIMEDOUT" then
    p:kill("SIGKILL")
    error("app did not finish in time; stdout: " .. p.text() .. " stderr: " .. p.errtext(), 2)
  end
  return code, sig, p
end

--- An http.server(opts) that setup(srv) gives its routes, listening on a
-- free loopback port and closed after the test.
function T.server(opts, setup)
  local srv = require("callagent.http").server(opts or {})
  if setup then
    setup(srv)
  end
  assert(srv:listen())
  T.defer(function()
    srv:close()
  end)
  return srv
end

--- callagent.app(cfg, opts), started (inside a task), and stopped after the test.
function T.started_app(cfg, opts)
  local app, err = require("callagent").app(cfg, opts)
  assert(app, err)
  assert(app:start())
  T.defer(function()
    app:stop()
  end)
  return app
end

--- A loopback port that was free a moment ago, for a child to listen on.
-- It is drawn below the kernel's ephemeral range (32768-60999 on Debian),
-- where no connect() and no listen on port 0 takes a port of its own
-- accord: a port the kernel handed out and took back could go to another
-- test's outgoing connection before the child binds it. Drawn from the
-- system's random bytes, not math.random: under ASan (no address
-- randomization) Lua seeds that from the time in seconds alone, so test
-- programs started in the same second drew the same ports, and one's child
-- found its port taken by the other's (EADDRINUSE).
function T.free_port()
  local http = require("callagent.http")
  local crypto = require("callagent.crypto")
  for _ = 1, 200 do
    local port = 20000 + string.unpack("<I2", crypto.random_bytes(2)) % (32768 - 20000)
    local srv = http.server({ port = port })
    if srv:listen() then
      local port = srv.port
      srv:close()
      return port
    end
  end
  error("no free port in 20000-32767 after 200 tries")
end

--- A new table: base's fields, then over's on top (e.g. a child's environment).
function T.with(base, over)
  local t = {}
  for k, v in pairs(base) do
    t[k] = v
  end
  for k, v in pairs(over or {}) do
    t[k] = v
  end
  return t
end

--- A fresh temporary folder, removed after the test.
function T.tmpdir()
  local p = os.tmpname()
  os.remove(p)
  assert(core.mkdir(p, 448))
  if current_defers then
    T.defer(function()
      os.execute("rm -rf '" .. p .. "'")
    end)
  end
  return p
end

--- Lua source that makes `app`: a callagent app with the mock provider on a
-- free port and the memory store, not started (for child apps' sources).
-- opts: Lua source of more options for callagent.app, e.g. "loop_watch_ms = 100".
function T.mock_app_source(opts)
  return [[
local callagent = require "callagent"
local app = assert(callagent.app({
  telephony = { provider = "mock" },
  server = { port = 0 },
  openai = { apiKey = "sk-unused", realtimeUrl = "ws://127.0.0.1:9/v1/realtime" },
  store = { backend = "memory" },
}, { no_shutdown_hook = true]] .. (opts and (", " .. opts) or "") .. " }))\n"
end

return T
