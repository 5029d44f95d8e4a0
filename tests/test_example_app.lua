-- examples/app.lua, what `make run` starts: the local setup comes up with the
-- banner the README shows, takes a call through the API, and stops on Ctrl-C;
-- what is wrong in its environment stops the start with one clear line.
local T = require "testing"
local fetch = require "callagent.fetch"
local json = require "callagent.json"

local APP = T.root .. "/examples/app.lua"

-- The environment of `make run` on a machine with none of ours set.
local CLEAN = { PORT = false, OPENAI_API_KEY = false, CALLAGENT_CONFIG = false, PUBLIC_BASE_URL = false,
  TWILIO_ACCOUNT_SID = false, TWILIO_AUTH_TOKEN = false, TWILIO_FROM_NUMBER = false, CLAWDBOT_HOOKS_TOKEN = false,
  TWILIO_API_BASE_URL = false, OPENAI_REALTIME_URL = false, CALLAGENT_API_TOKEN = false }
local function env(over)
  return T.with(CLEAN, over)
end

T.test("the local setup prints its banner, takes a call through the API and stops on SIGINT", function()
  local port = T.free_port()
  local dir = T.tmpdir()
  local p = T.spawn_app(APP, nil, { env = env({ PORT = tostring(port) }), cwd = dir })
  local base = "http://127.0.0.1:" .. port
  T.wait_for(function()
    return p.text():find("Ctrl-C stops", 1, true) ~= nil
  end, 10000, "the banner")
  local out = p.text()
  T.match(out, "callagent %S+ is running on " .. base:gsub("%p", "%%%0") .. "\n")
  T.match(out, "telephony: mock   model: LOCAL STAND%-IN")
  T.match(out, "Open " .. base:gsub("%p", "%%%0") .. "/mock/ in your browser")
  -- stderr is another pipe than the banner's stdout: its line may come later.
  T.wait_for(function()
    return p.errtext():find("INFO callagent ready", 1, true)
  end, 5000, "the ready line: " .. p.errtext())

  -- The banner's curl command, as a request.
  local res = assert(fetch(base .. "/v1/calls", {
    method = "POST",
    headers = { ["Content-Type"] = "application/json" },
    body = '{"to": "+15555550100", "prompt": "Book a dental check-up for next week."}',
  }))
  T.eq(res.status, 201, res.body)
  local created = json.decode(res.body)
  T.match(created.callId, "^c_")
  T.match(created.hint, "^" .. base:gsub("%p", "%%%0") .. "/mock/call/" .. created.callId .. "%?t=")
  res = assert(fetch(base .. "/v1/calls/" .. created.callId))
  T.eq(res.status, 200)
  T.eq(json.decode(res.body).to, "+15555550100")
  res = assert(fetch(base .. "/mock/"))
  T.eq(res.status, 200)
  T.match(res.headers["content-type"], "^text/html")

  T.ok(p:kill("SIGINT"))
  local code = p:wait(10000)
  T.eq(code, 0, p.errtext())
  T.no_match(p.errtext(), "ERROR")
  local files = {}
  for name in io.popen("ls -A " .. dir):lines() do
    files[#files + 1] = name
  end
  T.eq(files, {}, "the in-memory store writes nothing")
end)

T.test("make run's stand-in takes its own calls and refuses a session without its key, logging no key", function()
  local ws = require "callagent.ws"
  local phone = require "phone"
  local port = T.free_port()
  local p = T.spawn_app(APP, nil, { env = env({ PORT = tostring(port) }), cwd = T.tmpdir() })
  T.defer(function()
    p:kill("SIGKILL")
  end)
  local base = "http://127.0.0.1:" .. port
  T.wait_for(function()
    return p.text():find("Ctrl-C stops", 1, true) ~= nil
  end, 10000, "the banner")
  -- Someone who reached the app's server (through a tunnel, say).
  local conn = assert(ws.connect("ws://127.0.0.1:" .. port .. "/standin/v1/realtime",
    { headers = { Authorization = "Bearer local-standin" } }))
  T.eq({ conn:receive(5000) }, { "close", 1008, "invalid api key" })
  T.wait_for(function()
    return p.errtext():find("WARN stand-in model refused a session without its key", 1, true) ~= nil
  end, 5000, "the refusal logged")
  -- The app's own call still gets the stand-in: its greeting reaches the phone.
  local res = assert(fetch(base .. "/v1/calls", { method = "POST", headers = { ["Content-Type"] = "application/json" },
    body = '{"to": "+15555550100", "prompt": "Say hello."}' }))
  T.eq(res.status, 201, res.body)
  local ph = assert(phone.answer(json.decode(res.body).hint))
  T.ok(ph:wait_received(8000, 15000), "a second of the stand-in's greeting")
  T.no_match(p.errtext(), "standin%-[%w_%-]", "the stand-in's key is not logged")
  T.no_match(p.text(), "standin%-[%w_%-]", "nor printed")
end, { timeout = 30000 })

T.test("a PORT that is no number stops the start, naming it", function()
  -- 0x10 and 1e3 are numbers to Lua's tonumber (ports 16 and 1000), not port numbers.
  for _, bad in ipairs({ "80a", "0x10", "1e3", " 80" }) do
    local code, _, p = T.run_app(APP, nil, { env = env({ PORT = bad }), cwd = T.tmpdir() })
    T.eq(code, 1, bad)
    T.eq(p.err[#p.err], "callagent: PORT must be a port number, got '" .. bad .. "'")
    T.eq(p.text(), "", "no banner")
  end
end)

T.test("make run's app on a port in use says so once, and how to pick another", function()
  local busy = T.server({}, function() end)
  local code, _, p = T.run_app(APP, nil, { env = env({ PORT = tostring(busy.port) }), cwd = T.tmpdir() })
  T.eq(code, 1, p.errtext())
  T.eq(p.err[#p.err], "callagent: server: cannot listen on 127.0.0.1:" .. busy.port
    .. ": EADDRINUSE: Address already in use (another port: PORT=8080 make run)")
  T.eq(p.text(), "", "no banner")
end)

T.test("tools.lua and twilio.lua that cannot start exit 1 with one line, not a traceback", function()
  -- tools.lua on a port in use.
  local busy = T.server({}, function() end)
  local code, _, p = T.run_app(T.root .. "/examples/tools.lua", nil,
    { env = env({ PORT = tostring(busy.port) }), cwd = T.tmpdir() })
  T.eq(code, 1, p.errtext())
  T.match(p.err[#p.err], "^callagent: server: cannot listen on 127%.0%.0%.1:" .. busy.port .. ": EADDRINUSE")
  T.no_match(p.errtext(), "traceback")
  -- twilio.lua without a public URL, and neither ngrok nor tailscale to tunnel.
  code, _, p = T.run_app(T.root .. "/examples/twilio.lua", nil, { cwd = T.tmpdir(), env = env({
    PATH = T.tmpdir(), -- no tunnel program on it
    TWILIO_ACCOUNT_SID = "AC" .. string.rep("0", 32), TWILIO_AUTH_TOKEN = "dummy-auth-token",
    TWILIO_FROM_NUMBER = "+15550001111", OPENAI_API_KEY = "sk-dummy",
  }), timeout = 30000 })
  T.eq(code, 1, p.errtext())
  T.match(p.err[#p.err], "^callagent: ")
  T.no_match(p.errtext(), "traceback")
end)

T.test("tools.lua with a bad PORT or config exits 1 with one line naming it, not a traceback or port 4545", function()
  for _, case in ipairs({
    { env = { PORT = "abc" }, line = "callagent: PORT must be a port number, got 'abc'" },
    { env = { PORT = "0x10" }, line = "callagent: PORT must be a port number, got '0x10'" },
    { env = { PORT = "99999" }, line = "callagent: server.port: expected a number from 0 to 65535, got 99999" },
    { env = { PORT = "0", OPENAI_API_KEY = "sk" },
      line = "callagent: openai.apiKey: expected a secret of at least 8 characters, got [redacted]" },
  }) do
    local code, _, p = T.run_app(T.root .. "/examples/tools.lua", nil, { env = env(case.env), cwd = T.tmpdir(),
      timeout = 5000 })
    T.eq(code, 1, p.errtext())
    T.eq(p.err[#p.err], case.line)
    T.no_match(p.errtext(), "traceback")
    T.eq(p.text(), "", "not started")
  end
end)

T.test("examples/twilio.lua carries a call end to end against stand-ins of Twilio and OpenAI", function()
  local fake_tw = require "fakes.twilio"
  local fake_rt = require "fakes.realtime"
  local sid, token, key = "AC" .. string.rep("3c", 16), "example-auth-token", "sk-example-key"
  local tw = assert(fake_tw.start({ account_sid = sid, auth_token = token }))
  local rt = assert(fake_rt.start({ api_key = key, script = function(session)
    assert(session:wait_event("response.create", 5000))
    session:speak({ ms = 200, text = "Hello, this is the agent." })
    session:report_and_goodbye({ summary = "Booked for Tuesday.", outcome = "success" }, { ms = 100, text = "Bye." })
  end }))
  T.defer(function()
    tw:close()
    rt:close()
  end)
  local port = T.free_port()
  local base = "http://127.0.0.1:" .. port
  local p = T.spawn_app(T.root .. "/examples/twilio.lua", nil, { cwd = T.tmpdir(), env = env({
    PORT = tostring(port), PUBLIC_BASE_URL = base,
    TWILIO_ACCOUNT_SID = sid, TWILIO_AUTH_TOKEN = token, TWILIO_FROM_NUMBER = "+15550001111",
    TWILIO_API_BASE_URL = tw.url, OPENAI_API_KEY = key, OPENAI_REALTIME_URL = rt.url,
  }) })
  T.wait_for(function()
    return p.text():find("public URL", 1, true) ~= nil
  end, 10000, "the example's start line: " .. p.errtext())
  T.eq(p.out[1], "callagent (Twilio) on " .. base .. ", public URL " .. base)
  local res = assert(fetch(base .. "/v1/calls", { method = "POST", headers = { ["Content-Type"] = "application/json" },
    body = '{"to": "+14155550100", "prompt": "Book a dental check-up for next week."}' }))
  T.eq(res.status, 201, res.body)
  local id = json.decode(res.body).callId
  local call
  T.wait_for(function()
    call = json.decode(assert(fetch(base .. "/v1/calls/" .. id)).body)
    return call.status == "completed"
  end, 20000, "the call to complete")
  T.eq({ call.report.outcome, call.report.summary }, { "success", "Booked for Tuesday." })
  T.eq(tw.calls[1].params.To, "+14155550100")
  T.ok(p:kill("SIGTERM"))
  T.eq(p:wait(10000), 0, p.errtext())
  -- Read once it has exited: every line of its stderr has come through the pipe.
  T.match(p.errtext(), "INFO report call=" .. id .. " outcome=success summary=\"Booked for Tuesday%.\"")
  T.lacks(p.errtext(), token, "the auth token")
  T.lacks(p.errtext(), key, "the API key")
end, { timeout = 40000 })

T.test("tools.lua's lookup_order finds an order however the model wrote its number", function()
  local fake_rt = require "fakes.realtime"
  local phone = require "phone"
  local key = "sk-example-key"
  local outputs = {}
  local rt = assert(fake_rt.start({ api_key = key, script = function(session)
    assert(session:wait_event("response.create", 5000))
    for _, number in ipairs({ "A-1001", "a1001", "A 1002", "B-1001" }) do
      outputs[#outputs + 1] = json.decode(assert(session:call_function("lookup_order", { number = number })))
    end
    session:report_and_goodbye({ summary = "Looked up.", outcome = "success" }, { ms = 100, text = "Bye." })
  end }))
  T.defer(function()
    rt:close()
  end)
  local port = T.free_port()
  local base = "http://127.0.0.1:" .. port
  local p = T.spawn_app(T.root .. "/examples/tools.lua", nil, { cwd = T.tmpdir(), env = env({
    PORT = tostring(port), OPENAI_API_KEY = key, OPENAI_REALTIME_URL = rt.url }) })
  T.defer(function()
    p:kill("SIGKILL")
  end)
  T.wait_for(function()
    return p.text():find("open " .. base .. "/mock/", 1, true) ~= nil
  end, 10000, "the start line: " .. p.errtext())
  local res = assert(fetch(base .. "/v1/calls", { method = "POST", headers = { ["Content-Type"] = "application/json" },
    body = '{"to": "+14155550100", "prompt": "Ask about order A-1001."}' }))
  T.eq(res.status, 201, res.body)
  local created = json.decode(res.body)
  assert(phone.answer(created.hint))
  T.wait_for(function()
    return #outputs == 4
  end, 15000, "the four lookups")
  T.eq(outputs[1].status, "shipped")
  T.eq(outputs[2].status, "shipped", "lower case, no dash")
  T.eq(outputs[3].status, "processing", "a space for the dash")
  T.eq(outputs[4].error, "no order B-1001")
end, { timeout = 30000 })

T.test("an empty CALLAGENT_CONFIG stops the start with a line saying so, not a file named ''", function()
  local code, _, p = T.run_app(APP, nil, { env = env({ CALLAGENT_CONFIG = "" }), cwd = T.tmpdir() })
  T.eq(code, 1)
  T.eq(p.err[#p.err], "callagent: CALLAGENT_CONFIG is empty: set it to a JSON config file, or unset it for the local setup")
  T.eq(p.text(), "", "no banner")
end)

T.test("the seed's JSON config names the first variable it lacks, and says PORT does not apply", function()
  local code, _, p = T.run_app(APP, nil, {
    env = env({ PORT = "4999", CALLAGENT_CONFIG = T.root .. "/examples/callagent.json" }),
    cwd = T.tmpdir(),
  })
  T.eq(code, 1)
  T.match(p.errtext(), "PORT is ignored with CALLAGENT_CONFIG: the port is server%.port in .*examples/callagent%.json")
  -- server comes before twilio, openai and notify, whose variables are unset too.
  T.eq(p.err[#p.err], "callagent: server.publicBaseUrl: environment variable PUBLIC_BASE_URL is not set")
end)

T.test("the seed's JSON config stays JSON without its publicBaseUrl line, as the README says to tunnel", function()
  local f = assert(io.open(T.root .. "/examples/callagent.json"))
  local lines = {}
  for line in f:lines() do
    if not line:find("publicBaseUrl", 1, true) then
      lines[#lines + 1] = line
    end
  end
  f:close()
  local v, err = json.try_decode(table.concat(lines, "\n"))
  T.ok(v, err)
  T.eq(v.server, { port = 4545 })
end)

T.test("the example JSON config sends no placeholder session key to Clawdbot", function()
  local f = assert(io.open(T.root .. "/examples/callagent.json"))
  local v = json.decode(f:read("a"))
  f:close()
  -- The seed's "sessionKey": "optional" went out as the key of every notification.
  T.eq(v.notify.sessionKey, nil)
  T.eq(v.notify.hooksToken, "${CLAWDBOT_HOOKS_TOKEN}")
end)

T.run()
