-- Tunnels that go wrong after they opened, without their tool exiting: an
-- ngrok whose session is lost runs on, reconnecting (under another URL, or
-- refused for good), so its exit alone does not say the vendor reaches
-- nothing. The stand-in ngrok (tests/bin) is driven by files in a control
-- folder; the driver reports what tunnel.open's on_lost is told.
local T = require "testing"
local json = require "callagent.json"
local task = require "callagent.task"

local BIN = T.root .. "/tests/bin"
local PORT = 4545

-- The child: opens an ngrok tunnel and prints {url} (or {err}), then {lost =
-- why} for each on_lost call; on SIGTERM it closes the tunnel.
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
  local t, err = tunnel.open({ provider = "ngrok", timeoutSec = 10 }, tonumber(os.getenv("TUNNEL_PORT")), nil, {
    on_lost = function(why)
      say({ lost = why })
    end,
  })
  if not t then
    say({ err = err })
    return runtime.stop(0)
  end
  local keep = timer.every(3600000, function() end)
  runtime.on_shutdown(function()
    keep:stop()
    t:close()
  end)
  say({ url = t.url })
end)
]]

-- Starts the driver with the stand-in ngrok; returns its first result, a
-- next() for the ones after, the control folder and the stderr lines.
local function open_ngrok()
  local path, control = T.tmpdir(), T.tmpdir()
  T.ok(os.execute(string.format("ln -s '%s/ngrok' '%s/ngrok'", BIN, path)), "symlink ngrok")
  local results, errs = task.queue(), {}
  local p = T.spawn_app(nil, nil, {
    source = DRIVER,
    name = "driver.lua",
    env = { PATH = path, CALLAGENT_BIN = T.bin, TUNNEL_PORT = tostring(PORT), FAKE_NGROK_CONTROL = control },
    on_stdout = function(line)
      results:push(line)
    end,
    on_stderr = function(line)
      errs[#errs + 1] = line
    end,
  })
  T.defer(function()
    p:kill("SIGTERM")
    p:wait(5000)
  end)
  local first = results:pop(15000)
  T.ok(first, "the driver printed a result; stderr: " .. p.errtext())
  local r = json.decode(first)
  T.ok(r.url, "the tunnel opened: " .. first)
  local function next_result(ms)
    local l = results:pop(ms)
    return l and json.decode(l)
  end
  local function touch(name)
    assert(io.open(control .. "/" .. name, "w")):close()
  end
  return r, next_result, touch, errs
end

T.test("ngrok that reconnects under another URL: the tunnel is lost (the old URL reaches nothing), naming the new one", function()
  local r, next_result, touch, errs = open_ngrok()
  touch("rebind")
  local lost = next_result(3000)
  T.ok(lost and lost.lost, "on_lost was called")
  local new = r.url:gsub("^https://", "https://re-")
  T.match(lost.lost, "^ngrok reconnected under another URL, " .. new:gsub("%p", "%%%0"), "the reason names the new URL")
  T.ok(table.concat(errs, "\n"):find("ERROR tunnel: ngrok reconnected under another URL", 1, true),
    "logged as an error: " .. table.concat(errs, "\n"))
end)

T.test("ngrok whose reconnect is refused for good (ERR_NGROK_334), running on: the tunnel is lost, with ngrok's words", function()
  local _, next_result, touch, errs = open_ngrok()
  touch("refuse")
  local lost = next_result(3000)
  T.ok(lost and lost.lost, "on_lost was called")
  T.match(lost.lost, "^ngrok lost its session: The tunnel 'https://[^']+' is already bound to another tunnel session "
    .. "%(ERR_NGROK_334%)$")
  T.ok(table.concat(errs, "\n"):find("ERROR tunnel: ngrok lost its session", 1, true),
    "logged as an error: " .. table.concat(errs, "\n"))
  T.eq(next_result(1300), nil, "on_lost is called once, though ngrok says it again every second")
end)
-- A Twilio app without server.publicBaseUrl, its tunnel through ngrok.
local APP = [==[
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
  assert(app:start())
end)
]==]

T.test("an app whose ngrok reconnects under another URL pauses calls, and opens a tunnel again, stopping that ngrok", function()
  local path, control = T.tmpdir(), T.tmpdir()
  local logfile = control .. "/ngrok.log"
  T.ok(os.execute(string.format("ln -s '%s/ngrok' '%s/ngrok'", BIN, path)), "symlink ngrok")
  local lines = {}
  local p = T.spawn_app(nil, nil, {
    source = APP,
    env = { PATH = path, CALLAGENT_BIN = T.bin, FAKE_NGROK_CONTROL = control, FAKE_NGROK_LOG = logfile,
      CALLAGENT_LOG = "info" },
    on_stderr = function(line)
      lines[#lines + 1] = line
    end,
  })
  T.defer(function()
    p:kill("SIGTERM")
    p:wait(5000)
  end)
  local function seen(text)
    for _, l in ipairs(lines) do
      if l:find(text, 1, true) then
        return l
      end
    end
  end
  T.wait_for(function()
    return seen("callagent ready") or p.done
  end, 15000, "callagent ready")
  assert(io.open(control .. "/rebind", "w")):close()
  T.wait_for(function()
    return seen("tunnel open again") or p.done
  end, 10000, "the tunnel open again; stderr: " .. table.concat(lines, "\n"))
  T.ok(seen("calls paused: opening the tunnel again"), "calls were paused")
  local f = assert(io.open(logfile))
  local log = f:read("a")
  f:close()
  local first = log:match("start pid=(%d+)")
  T.match(log, "end pid=" .. first .. " signal=SIGTERM", "the ngrok that reconnected was stopped")
  T.eq(select(2, log:gsub("start pid=", "")), 2, "one ngrok started again")
end, { timeout = 30000 })

T.run()
