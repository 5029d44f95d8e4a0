-- Provider files: discovery in providers/ folders, and clear errors for a
-- file that is broken or incomplete.
local T = require "testing"
local providers = require "callagent.providers"
local config = require "callagent.config"
local task = require "callagent.task"

local function write(path, text)
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
end

local function cfg()
  return assert(config.normalize({ twilio = { accountSid = "AC" .. string.rep("0", 32), authToken = "tw-token-for-tests", fromNumber = "+15550001111" }, openai = { apiKey = "sk-test-key" } }, { quiet = true }))
end

local COMPLETE = [[
return {
  startCall = function() end, buildVoiceResponse = function() end, validateRequest = function() end,
  mapStatus = function() end, registerRoutes = function() end, endCall = function() end,
}
]]

T.test("the built-in twilio provider is found and complete", function()
  local list = providers.list()
  T.ok(list.twilio, "twilio listed")
  local p = assert(providers.load("twilio", cfg()))
  T.eq(p.name, "twilio")
  T.eq(type(p.startCall), "function")
end)

T.test("a provider file dropped in an app's providers/ folder is found without a rebuild", function()
  local dir = T.tmpdir()
  write(dir .. "/acme.lua", COMPLETE)
  local list = providers.list({ dir })
  T.eq(list.acme, dir .. "/acme.lua")
  local p = assert(providers.load("acme", cfg(), { dir }))
  T.eq(p.name, "acme")
end)

T.test("callagent run finds a provider in the providers/ folder next to the app", function()
  local dir = T.tmpdir()
  assert(require("callagent.core").mkdir(dir .. "/providers", 448))
  write(dir .. "/providers/acme.lua", COMPLETE)
  write(dir .. "/app.lua", [[
local callagent = require "callagent"
local app = assert(callagent.app({ telephony = { provider = "acme" }, openai = { apiKey = "sk-test-key" },
  store = { backend = "memory" } }))
print("provider " .. app.provider.name)
]])
  local code, _, p = T.run_app(dir .. "/app.lua")
  T.eq(code, 0, "exit code; stderr: " .. p.errtext())
  T.eq(p.out[#p.out], "provider acme")
end)

-- A child app with provider acme (source: the provider file's text) that
-- places one call and prints its record once it is final (or after 5 s).
local function acme_call(provider_src, extra)
  local dir = T.tmpdir()
  assert(require("callagent.core").mkdir(dir .. "/providers", 448))
  write(dir .. "/providers/acme.lua", provider_src)
  write(dir .. "/app.lua", [[
local callagent = require "callagent"
local task = require "callagent.task"
local timer = require "callagent.timer"
local json = require "callagent.json"
local runtime = require "callagent.runtime"
local cfg = { telephony = { provider = "acme" }, server = { port = 0 }, openai = { apiKey = "sk-test-key" },
  store = { backend = "memory" }, retry = { maxAttempts = 1 }, call = { ringTimeoutSec = 5, statusGraceSec = 1 } }
for k, v in pairs(json.decode(os.getenv("EXTRA") or "{}")) do cfg[k] = v end
local app = assert(callagent.app(cfg, { no_shutdown_hook = true }))
task.spawn(function()
  assert(app:start())
  local call = assert(app:create_call({ to = "+14155550100", prompt = "x" }))
  local v
  for _ = 1, 50 do
    v = app.engine:call_view(call.callId or call.id)
    if v.status ~= "queued" and v.status ~= "dialing" then break end
    timer.sleep(100)
  end
  print(json.encode({ status = v.status, lastError = v.lastError }))
  app:stop()
  runtime.stop(0)
end)
]])
  local code, _, p = T.run_app(dir .. "/app.lua", nil, { env = { EXTRA = extra or "{}" }, timeout = 15000 })
  T.eq(code, 0, "exit code; stderr: " .. p.errtext())
  return require("callagent.json").decode(p.out[#p.out]), p
end

T.test("a provider whose startCall raises, or returns no table, fails the attempt instead of leaving it dialing", function()
  local v, p = acme_call((COMPLETE:gsub("startCall = function%(%) end", 'startCall = function() error("acme API down") end')))
  T.eq(v.status, "failed")
  T.match(v.lastError, "^the acme provider's startCall failed: .*acme API down")
  T.match(p.errtext(), "ERROR provider startCall raised")
  v = acme_call((COMPLETE:gsub("startCall = function%(%) end", 'startCall = function() return "CA123" end')))
  T.eq(v.status, "failed")
  T.eq(v.lastError, "the acme provider's startCall returned a string, not {providerCallId, userHint}")
end)

T.test("a provider of the app's own gets its own config section; a bad needs or requestHeaders list is named", function()
  local dir = T.tmpdir()
  write(dir .. "/acme.lua", (COMPLETE:gsub("^return {", 'return { needs = { "acme.apiKey" },')))
  local c, err, warnings = config.normalize({ telephony = { provider = "acme" }, openai = { apiKey = "sk-test-key" },
    acme = { apiKey = "acme-key-12345" } }, { quiet = true })
  T.ok(c, err)
  T.eq(warnings, {}, "no 'unknown section' warning")
  T.eq(c.acme, { apiKey = "acme-key-12345" })
  T.ok(providers.load("acme", c, { dir }))
  local _, lerr = providers.load("acme", assert(config.normalize({ telephony = { provider = "acme" },
    openai = { apiKey = "sk-test-key" } }, { quiet = true })), { dir })
  T.eq(lerr, "acme.apiKey: required by the acme provider")
  -- A list with a hole (a misspelt constant is nil) is no list: ipairs would stop at it.
  for _, needs in ipairs({ '"acme.apiKey"', "5", '{ "apiKey" }', '{ nil, "acme.apiKey" }' }) do
    write(dir .. "/bad.lua", (COMPLETE:gsub("^return {", "return { needs = " .. needs .. ",")))
    local _, berr = providers.load_file(dir .. "/bad.lua", "bad")
    T.match(berr, "^provider .*/bad%.lua: needs must be a list of config keys", needs)
  end
  for _, headers in ipairs({ '"x-acme-signature"', '{ "x acme" }', "{ 5 }", '{ nil, "x-acme-timestamp" }',
    '{ "x-acme-signature", nil, "x-acme-timestamp" }', '{ ["x-acme-signature"] = true }' }) do
    write(dir .. "/bad.lua", (COMPLETE:gsub("^return {", "return { requestHeaders = " .. headers .. ",")))
    local _, berr = providers.load_file(dir .. "/bad.lua", "bad")
    T.match(berr, "^provider .*/bad%.lua: requestHeaders must be a list of header names", headers)
  end
end)

T.test("a provider whose init raises: app:start() returns the error, and the process can exit non-zero", function()
  local dir = T.tmpdir()
  assert(require("callagent.core").mkdir(dir .. "/providers", 448))
  write(dir .. "/providers/acme.lua", (COMPLETE:gsub("^return {", 'return { init = function() error("acme: no API key") end,')))
  write(dir .. "/app.lua", [[
local callagent = require "callagent"
local task = require "callagent.task"
local runtime = require "callagent.runtime"
local app = assert(callagent.app({ telephony = { provider = "acme" }, server = { port = 0 },
  openai = { apiKey = "sk-test-key" }, store = { backend = "memory" } }, { no_shutdown_hook = true }))
task.spawn(function()
  local ok, err = app:start()
  print("start: " .. tostring(ok) .. " " .. tostring(err))
  runtime.stop(ok and 0 or 1)
end)
]])
  local code, _, p = T.run_app(dir .. "/app.lua")
  T.eq(code, 1, "stderr: " .. p.errtext())
  T.match(p.out[#p.out], "^start: nil the acme provider's init failed: .*acme: no API key")
end)

T.test("a start that raises quoting a secret (an app's routes function) raises it redacted, as a failed start returns it", function()
  local dir = T.tmpdir()
  assert(require("callagent.core").mkdir(dir .. "/providers", 448))
  write(dir .. "/providers/acme.lua", COMPLETE)
  write(dir .. "/app.lua", [[
local callagent = require "callagent"
local task = require "callagent.task"
local runtime = require "callagent.runtime"
local key = "sk-test-" .. "raised-secret-42"
local app = assert(callagent.app({ telephony = { provider = "acme" }, server = { port = 0 },
  openai = { apiKey = key }, store = { backend = "memory" } }, { no_shutdown_hook = true }))
app:routes(function()
  error("cannot use the key " .. key, 0)
end)
task.spawn(function()
  local ok, err = pcall(app.start, app)
  io.stdout:write("start: ", tostring(ok), " ", tostring(err), "\n")
  runtime.stop(ok and 0 or 1)
end)
]])
  local code, _, p = T.run_app(dir .. "/app.lua")
  T.eq(code, 1, "stderr: " .. p.errtext())
  T.eq(p.out[#p.out], "start: false cannot use the key [redacted]")
end)

T.test("a file missing functions is reported by path and missing names", function()
  local dir = T.tmpdir()
  write(dir .. "/half.lua", "return { startCall = function() end, mapStatus = function() end }")
  local p, err = providers.load("half", cfg(), { dir })
  T.eq(p, nil)
  T.match(err, "^provider " .. dir:gsub("%p", "%%%0") .. "/half%.lua: missing buildVoiceResponse, validateRequest, registerRoutes %(")
  -- endCall, init, getCall, streamStart and close are optional, but functions when given.
  write(dir .. "/noend.lua", (COMPLETE:gsub(", endCall = function%(%) end", "")))
  T.eq(assert(providers.load("noend", cfg(), { dir })).endCall, nil)
  write(dir .. "/badend.lua", (COMPLETE:gsub("endCall = function%(%) end", "endCall = true")))
  p, err = providers.load("badend", cfg(), { dir })
  T.eq(p, nil)
  T.match(err, "/badend%.lua: endCall must be a function, not a boolean$")
  -- close is optional too (app:stop() calls it): checked when the file is read, not at the stop.
  write(dir .. "/badclose.lua", (COMPLETE:gsub("endCall = function%(%) end", "endCall = function() end, close = true")))
  p, err = providers.load("badclose", cfg(), { dir })
  T.eq(p, nil)
  T.match(err or "", "/badclose%.lua: close must be a function, not a boolean$")
  -- The flags are booleans: "no" would read as true.
  write(dir .. "/badflag.lua", (COMPLETE:gsub("endCall = function%(%) end", 'endCall = function() end, streamEndsCall = "no"')))
  p, err = providers.load("badflag", cfg(), { dir })
  T.eq(p, nil)
  T.match(err or "", "/badflag%.lua: streamEndsCall must be true or false, not a string$")
  -- A name the engine reads written in another case would never be read: a typo.
  write(dir .. "/lower.lua", (COMPLETE:gsub("endCall = function%(%) end", "endcall = function() end")))
  p, err = providers.load("lower", cfg(), { dir })
  T.eq(p, nil)
  T.match(err or "", "/lower%.lua: endcall: no such name %(did you mean endCall%?%)$")
  write(dir .. "/upper.lua", (COMPLETE:gsub("startCall = function", "StartCall = function")))
  p, err = providers.load("upper", cfg(), { dir })
  T.match(err or "", "/upper%.lua: StartCall: no such name %(did you mean startCall%?%)$")
  write(dir .. "/flag.lua", (COMPLETE:gsub("endCall = function%(%) end", "endCall = function() end, streamendscall = false")))
  p, err = providers.load("flag", cfg(), { dir })
  T.match(err or "", "/flag%.lua: streamendscall: no such name %(did you mean streamEndsCall%?%)$")
end)

T.test("a file that does not load or returns no table is reported by path", function()
  local dir = T.tmpdir()
  write(dir .. "/syntax.lua", "return {")
  write(dir .. "/boom.lua", "error('cannot start')")
  write(dir .. "/nil.lua", "return 42")
  local _, e1 = providers.load("syntax", cfg(), { dir })
  T.match(e1, "syntax%.lua:")
  local _, e2 = providers.load("boom", cfg(), { dir })
  T.match(e2, "boom%.lua: error while loading: .*cannot start")
  local _, e3 = providers.load("nil", cfg(), { dir })
  T.match(e3, "nil%.lua: must return a table, returned number")
end)

T.test("a provider file that raises while loading has its to-be-closed variables closed, as a pcall would", function()
  -- Run in a coroutine of its own, which an error leaves unwound: a file
  -- it opened with <close> stayed open.
  local dir = T.tmpdir()
  write(dir .. "/tbc.lua", [[
local f <close> = setmetatable({}, { __close = function() _G.tbc_closed = (_G.tbc_closed or 0) + 1 end })
error("cannot start")
]])
  _G.tbc_closed = nil
  local _, err = providers.load("tbc", cfg(), { dir })
  T.match(err, "tbc%.lua: error while loading: .*cannot start$")
  T.eq(_G.tbc_closed, 1)
end)

T.test("a provider file that misbehaves while read is an error naming it: never a raise, nor a task suspended for good", function()
  local dir = T.tmpdir()
  local function load(name, src)
    write(dir .. "/" .. name .. ".lua", src)
    local ok, p, err = pcall(providers.load, name, cfg(), { dir })
    T.ok(ok, name .. " raised: " .. tostring(p))
    T.eq(p, nil, name)
    return err
  end
  -- Its name goes into messages ("the <name> provider's init failed: ..."): text only.
  T.match(load("tname", (COMPLETE:gsub("^return {", "return { name = {},"))),
    "/tname%.lua: name must be a non%-empty string, not a table$")
  T.match(load("ename", (COMPLETE:gsub("^return {", 'return { name = "",'))),
    "/ename%.lua: name must be a non%-empty string, not empty$")
  -- An error value whose __tostring raises.
  T.match(load("errobj", 'error(setmetatable({}, { __tostring = function() error("inner") end }))'),
    "/errobj%.lua: error while loading: %(error object is a table value%)$")
  -- A table whose __index raises when its functions are looked up.
  T.match(load("badidx", 'return setmetatable({}, { __index = function(_, k) error("no " .. k) end })'),
    "/badidx%.lua: error while checking it: .*no startCall$")
  -- A file that waits while loading, the app created in a task (as apps do).
  write(dir .. "/waits.lua", "coroutine.yield() " .. COMPLETE)
  local done
  task.spawn(function()
    done = table.pack(pcall(providers.load, "waits", cfg(), { dir }))
  end)
  T.wait_for(function()
    return done
  end, 2000, "the load returns")
  T.eq(done[1], true, tostring(done[2]))
  T.eq(done[2], nil)
  T.match(done[3], "/waits%.lua: error while loading: it waits %(yields%) while loading")
end)

T.test("a provider file that sleeps while loading is refused, and its sleep's end later logs no error", function()
  local log = require "callagent.log"
  local errs = {}
  local e = log.error
  log.error = function(msg, f)
    errs[#errs + 1] = msg .. " " .. require("callagent.json").encode(f or {})
    return e(msg, f)
  end
  T.defer(function()
    log.error = e
  end)
  local dir = T.tmpdir()
  write(dir .. "/sleeps.lua", 'require("callagent.timer").sleep(20) ' .. COMPLETE)
  local _, err = providers.load("sleeps", cfg(), { dir })
  T.match(err, "/sleeps%.lua: error while loading: it waits %(yields%) while loading")
  require("callagent.timer").sleep(60)
  T.eq(errs, {}, "the timer's wake-up of the closed load is dropped")
end)

T.test("provider_dirs that is not a list of folders is named, not read as no folder", function()
  local dir = T.tmpdir()
  write(dir .. "/acme.lua", COMPLETE)
  local p, err = providers.load("acme", cfg(), dir)
  T.eq(p, nil)
  T.eq(err, "provider_dirs: must be a list of folders, not a string")
  p, err = providers.load("acme", cfg(), { dir, 42 })
  T.eq(p, nil)
  T.eq(err, "provider_dirs[2]: must be a folder's path, not a number")
  local app, aerr = require("callagent").app({ telephony = { provider = "acme" }, openai = { apiKey = "sk-test-key" },
    store = { backend = "memory" } }, { provider_dirs = dir })
  T.eq(app, nil)
  T.eq(aerr, "provider_dirs: must be a list of folders, not a string")
  -- The first folder of provider_dirs wins, and a file there shadows a built-in of its name.
  local second = T.tmpdir()
  write(second .. "/acme.lua", (COMPLETE:gsub("^return {", 'return { name = "acme2",')))
  write(second .. "/twilio.lua", (COMPLETE:gsub("^return {", 'return { name = "mytwilio",')))
  T.eq(assert(providers.load("acme", cfg(), { dir, second })).name, "acme")
  T.eq(assert(providers.load("acme", cfg(), { second, dir })).name, "acme2")
  local tw = assert(providers.load("twilio", cfg(), { second }))
  T.eq({ tw.name, tw.path }, { "mytwilio", second .. "/twilio.lua" })
  -- A name with path characters never reaches the file system.
  app, aerr = require("callagent").app({ telephony = { provider = "../acme" }, openai = { apiKey = "sk-test-key" },
    store = { backend = "memory" } }, { provider_dirs = { dir } })
  T.eq(app, nil)
  T.match(aerr, "^telephony%.provider: ")
end)

T.test("an unknown provider name lists the ones found; missing config keys are named", function()
  local p, err = providers.load("nope", cfg())
  T.eq(p, nil)
  T.match(err, "^telephony%.provider: no provider named 'nope' %(found: .*twilio")
  local bare = assert(config.normalize({ openai = { apiKey = "sk-test-key" } }, { quiet = true }))
  p, err = providers.load("twilio", bare)
  T.eq(p, nil)
  T.eq(err, "twilio.accountSid: required by the twilio provider")
end)

T.run()
