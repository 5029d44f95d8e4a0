-- The Clawdbot plugin (examples/clawdbot/) against a real callagent app with
-- fake Twilio and fake OpenAI Realtime: node runs tests/clawdbot/harness.mjs,
-- a stand-in for the Clawdbot host that loads the plugin as Clawdbot's loader
-- does (package.json "clawdbot.extensions", clawdbot.plugin.json, register(api),
-- api.registerTool) and executes its tools as the agent would.
--
-- Needs node (>= 20) on the PATH; no npm package.
local T = require "testing"
local kit = require "callkit"
local fetch = require "callagent.fetch"
local json = require "callagent.json"
local timer = require "callagent.timer"

local PLUGIN = T.root .. "/examples/clawdbot"
local HARNESS = T.root .. "/tests/clawdbot/harness.mjs"
local TOKEN = "api-token-for-clawdbot-tests"
local WRONG = "wrong-token-the-user-mistyped"
local SUMMARY = "Booked a check-up for Tuesday at 10."

-- A secret must not be anywhere in s (plain text, not a Lua pattern: tokens hold "-").
local function lacks(s, secret, what)
  T.ok(not s:find(secret, 1, true), (what or "output") .. " shows a token: " .. s)
end

-- Runs the host stand-in on a plan; returns its JSON answer (asserted ok)
-- and the whole output, stdout and stderr, for checks on what it printed.
local function host(config, steps, env)
  local code, out, err = T.node({ HARNESS, PLUGIN, json.encode({ config = config, steps = steps }) },
    { env = T.with({ CALLAGENT_API_TOKEN = false }, env) })
  local all = table.concat(out, "\n") .. "\n" .. table.concat(err, "\n")
  T.eq(code, 0, "harness exit: " .. all)
  local r = json.try_decode(out[#out] or "")
  T.ok(type(r) == "table", "the harness printed no JSON: " .. all)
  T.ok(r.ok, "the plugin did not load: " .. tostring(r.error))
  return r, all
end

local function start(opts)
  opts = opts or {}
  opts.config = opts.config or {}
  opts.config.server = { apiToken = TOKEN }
  return kit.start(opts)
end

-- callagent's API with the token (callkit's env:api sends none).
local function api(env, method, path)
  local res = assert(fetch(env.base .. path, { method = method, headers = { Authorization = "Bearer " .. TOKEN } }))
  return res.status, json.try_decode(res.body)
end

local function count_calls(env)
  local status, body = api(env, "GET", "/v1/calls?limit=100")
  T.eq(status, 200)
  return #body.calls
end

T.test("the package and manifest are what Clawdbot loads; register gives the three tools", function()
  local pkg = json.decode(assert(io.open(PLUGIN .. "/package.json")):read("a"))
  local manifest = json.decode(assert(io.open(PLUGIN .. "/clawdbot.plugin.json")):read("a"))
  T.eq(pkg.clawdbot.extensions, { "./index.js" })
  T.eq(pkg.type, "module")
  T.eq(pkg.dependencies, nil, "no dependencies: nothing to npm install")
  T.eq(manifest.id, pkg.name, "Clawdbot's id hint is the package name")
  T.eq(manifest.configSchema.additionalProperties, false)
  T.eq(manifest.uiHints.apiToken.sensitive, true)
  local r = host({}, {})
  T.eq(r.id, "callagent")
  T.eq(r.tools, { "call_agent", "call_agent_status", "call_agent_hangup" })
  T.eq(r.optional, { "call_agent", "call_agent_hangup" }, "what dials or hangs up is opt-in")
  for _, line in ipairs(r.logs) do
    T.no_match(line, "^warn", "a loader warning")
  end
  -- A config the manifest's schema refuses never reaches the plugin.
  local code, out = T.node({ HARNESS, PLUGIN, json.encode({ config = { baseUrl = 4545 } }) })
  T.eq(code, 0)
  T.match(json.decode(out[#out]).error, "baseUrl: must be string")
  -- The old plugin's keys are callagent's config now, not the plugin's.
  code, out = T.node({ HARNESS, PLUGIN, json.encode({ config = { telephony = { provider = "twilio" } } }) })
  T.eq(code, 0)
  T.eq(json.decode(out[#out]).error, "invalid config: <root>: must NOT have additional properties")
end)

T.test("a call placed with call_agent completes; call_agent_status shows the model's report", function()
  local env = start({ realtime = { script = function(session)
    assert(session:wait_event("response.create", 5000))
    session:speak({ ms = 200, text = "Hello, I am calling to book a check-up." })
    session:report_and_goodbye({ summary = SUMMARY, outcome = "success", nextSteps = { "Add it to the calendar" },
      data = { day = "Tuesday", time = "10:00" } }, { ms = 100, text = "Thank you, goodbye." })
  end } })
  local r, all = host({ baseUrl = env.base, apiToken = TOKEN }, { { tool = "call_agent", toolCallId = "toolu_01", params = {
    to = "+14155550100", prompt = "Book a dental check-up for next week.", calleeName = "Dr. Smith",
    timezone = "Europe/Berlin", locale = "de-DE", voice = "marin", metadata = { ticket = 7 },
  } } })
  local placed = r.steps[1]
  T.eq(placed.isError, false, placed.error)
  local id = placed.details.callId
  T.match(id, "^c_")
  T.ok(placed.details.status == "queued" or placed.details.status == "dialing", placed.details.status)
  T.eq(json.decode(placed.text).callId, id, "the model reads the callId in the text")
  lacks(all, TOKEN, "the token is never printed")

  T.wait_for(function()
    local _, rec = api(env, "GET", "/v1/calls/" .. id)
    return rec.status == "completed"
  end, 20000, "the call to complete")
  T.eq(env.tw.calls[1].params.To, "+14155550100")
  local _, rec = api(env, "GET", "/v1/calls/" .. id)
  T.eq({ rec.calleeName, rec.timezone, rec.locale, rec.voice, rec.metadata }, { "Dr. Smith", "Europe/Berlin", "de-DE", "marin", { ticket = 7 } })

  r = host({ baseUrl = env.base, apiToken = TOKEN }, {
    { tool = "call_agent_status", toolCallId = "toolu_02", params = { callId = id } },
    { tool = "call_agent_status", toolCallId = "toolu_03", params = { callId = id, includeTranscript = true } },
  })
  local st = r.steps[1]
  T.eq(st.isError, false, st.error)
  local d = st.details
  T.eq({ d.callId, d.status, d.final, d.endReason, d.outcome }, { id, "completed", true, "completed", "success" })
  T.eq(d.report.summary, SUMMARY)
  T.eq(d.report.nextSteps, { "Add it to the calendar" })
  T.eq(d.report.data, { day = "Tuesday", time = "10:00" })
  T.eq({ d.attempts.count, d.attempts.last.n, d.attempts.last.status }, { 1, 1, "completed" })
  T.eq(d.transcript, nil, "no transcript unless asked")
  T.eq(json.decode(st.text).report.summary, SUMMARY)
  local tr = r.steps[2].details.transcript
  T.ok(type(tr) == "table" and #tr > 0, "a transcript when asked")
  T.eq(tr[1].role, "agent")
  -- And Clawdbot hears of it by itself through callagent's notify hooks.
  T.wait_for(function()
    return #env.hooks.received > 0
  end, 10000, "the notification")
  T.eq(env.hooks.received[1].json.data.callId, id)
end, { timeout = 60000 })

T.test("bad input is a tool error naming the field, and dials nothing", function()
  local env = start({ twilio = { behaviour = { ring_ms = 10000 } } })
  local call = function(params)
    return { tool = "call_agent", toolCallId = "toolu_bad", params = params }
  end
  local r = host({ baseUrl = env.base, apiToken = TOKEN }, {
    call({ to = "4155550100", prompt = "Book it." }),
    call({ to = "+14155550100" }),
    call({ to = "+14155550100", prompt = "Book it.", voice = "robot" }),
    call({ to = "+14155550100", prompt = "Book it.", promt = "typo" }),
    call({ to = "+14155550100", prompt = "Book it.", calleeName = "Ada\nLovelace" }),
    call({ to = "+14155550100", prompt = "Book it.", metadata = { "a", "list" } }),
    -- Well-formed, so only callagent knows: its 400 names the field too.
    call({ to = "+14155550100", prompt = "Book it.", timezone = "Mars/Base" }),
    { tool = "call_agent_status", params = { callId = "c_00000000000000000000" } },
    { tool = "call_agent_status", params = {} },
    { tool = "call_agent_hangup", params = { callId = "../healthz" } },
  })
  local fields = { "to", "prompt", "voice", "promt", "calleeName", "metadata", "timezone", "callId", "callId", "callId" }
  for i, f in ipairs(fields) do
    local s = r.steps[i]
    T.eq(s.isError, true, "step " .. i .. " is an error")
    T.match(s.error, '^field "' .. f .. '"', "step " .. i)
    T.eq(json.decode(s.text), { status = "error", tool = s.tool, error = s.error }, "what the model reads")
  end
  T.match(r.steps[1].error, "E%.164")
  T.match(r.steps[7].error, "%(400 invalid_timezone%)$")
  T.match(r.steps[8].error, "no call c_00000000000000000000 %(404 not_found%)")
  T.eq(count_calls(env), 0, "no call was created")
  T.eq(#env.tw.calls, 0, "nothing was dialed")
end)

T.test("a wrong or missing apiToken is a clear error that never shows a token", function()
  local env = start({ twilio = { behaviour = { ring_ms = 10000 } } })
  local steps = {
    { tool = "call_agent", toolCallId = "toolu_t", params = { to = "+14155550100", prompt = "Book it." } },
    { tool = "call_agent_status", params = { callId = "c_00000000000000000000" } },
  }
  local r, all = host({ baseUrl = env.base, apiToken = WRONG }, steps)
  for i = 1, 2 do
    T.eq(r.steps[i].isError, true)
    T.match(r.steps[i].error, "refused the apiToken %(401 unauthorized%)")
    T.match(r.steps[i].error, "plugins%.entries%.callagent%.config%.apiToken")
  end
  lacks(all, WRONG)
  lacks(all, TOKEN)
  r = host({ baseUrl = env.base }, steps)
  T.match(r.steps[1].error, "needs an apiToken %(401 unauthorized%)")
  T.eq(count_calls(env), 0)
  -- Without apiToken in the config, CALLAGENT_API_TOKEN is the token.
  r, all = host({ baseUrl = env.base }, { steps[1] }, { CALLAGENT_API_TOKEN = TOKEN })
  T.eq(r.steps[1].isError, false, r.steps[1].error)
  lacks(all, TOKEN)
  T.eq(count_calls(env), 1)
end)

T.test("an apiToken no HTTP header can carry is refused at load, by its key, not shown", function()
  -- Before, the plugin loaded and each tool call failed as "callagent is not
  -- reachable … is it running?", for a token fetch would not send.
  for _, bad in ipairs({ "token-with-a-line\nbreak-inside", "token-with-euros-€€€€-inside", "token-with-a-tab\there" }) do
    local code, out, err = T.node({ HARNESS, PLUGIN, json.encode({ config = {}, steps = {} }) },
      { env = { CALLAGENT_API_TOKEN = bad } })
    local all = table.concat(out, "\n") .. "\n" .. table.concat(err, "\n")
    T.eq(code, 0, all)
    local r = json.decode(out[#out])
    T.eq(r.ok, false, "loaded with " .. json.encode(bad))
    T.match(r.error, "plugins%.entries%.callagent%.config%.apiToken: expected callagent's server%.apiToken")
    T.match(r.error, "printable ASCII")
    lacks(all, bad)
    -- In the config, the manifest's schema refuses it first.
    code, out = T.node({ HARNESS, PLUGIN, json.encode({ config = { apiToken = bad }, steps = {} }) })
    T.match(json.decode(out[#out]).error, "^invalid config: apiToken: must match pattern")
    lacks(table.concat(out, "\n"), bad)
  end
end)

T.test("callagent down or not answering: not reachable at its baseUrl", function()
  local port = T.free_port()
  local base = "http://127.0.0.1:" .. port
  local r, all = host({ baseUrl = base .. "/", apiToken = TOKEN }, {
    { tool = "call_agent", params = { to = "+14155550100", prompt = "Book it." } },
    { tool = "call_agent_status", params = { callId = "c_00000000000000000000" } },
    { tool = "call_agent_hangup", params = { callId = "c_00000000000000000000" } },
  })
  for i = 1, 3 do
    T.eq(r.steps[i].isError, true)
    T.eq(r.steps[i].error:match("^(callagent is not reachable at %S+) %(ECONNREFUSED%)"),
      "callagent is not reachable at " .. base, "step " .. i .. ": " .. r.steps[i].error)
  end
  T.no_match(r.steps[1].error, "may still", "a refused connection sent nothing")
  lacks(all, TOKEN)
  -- A server that takes the connection and never answers in time: it
  -- answers when the test is done with it, or after 10 s.
  local released = false
  local slow = T.server({}, function(srv)
    srv:post("/v1/calls", function()
      local deadline = timer.now() + 10000
      while not released and timer.now() < deadline do
        timer.sleep(10)
      end
      return 201, { callId = "c_late", status = "dialing" }
    end)
  end)
  T.defer(function()
    released = true
  end)
  local t0 = timer.now()
  r, all = host({ baseUrl = "http://127.0.0.1:" .. slow.port, apiToken = TOKEN, timeoutMs = 300 }, {
    { tool = "call_agent", params = { to = "+14155550100", prompt = "Book it." } },
  })
  T.match(r.steps[1].error, "^callagent is not reachable at http://127%.0%.0%.1:" .. slow.port
    .. " %(no answer within 300 ms%)")
  T.match(r.steps[1].error, "may still have been carried out")
  -- The host's start (node) counts too: room for a loaded machine, well
  -- short of the 10 s answer.
  T.lt(timer.now() - t0, 5000, "the plugin gave up at its timeoutMs")
  released = true
  lacks(all, TOKEN)
end)

T.test("call_agent run with an empty or blank tool call id places a call each time, never another run's", function()
  -- A host or model API that gives no tool call id: runs must not share one
  -- Idempotency-Key (the second was taken for a replay, or refused 422).
  local env = start({ twilio = { behaviour = { ring_ms = 10000 } } })
  local params = { to = "+14155550100", prompt = "Book it." }
  local r = host({ baseUrl = env.base, apiToken = TOKEN }, {
    { tool = "call_agent", toolCallId = "", params = params },
    { tool = "call_agent", toolCallId = "", params = params },
    { tool = "call_agent", toolCallId = " \t ", params = { to = "+14155550199", prompt = "Other." } },
    { tool = "call_agent", toolCallId = " \t ", params = { to = "+14155550199", prompt = "Other." } },
  })
  for i = 1, 4 do
    T.eq(r.steps[i].isError, false, "step " .. i .. ": " .. tostring(r.steps[i].error))
    T.eq(r.steps[i].details.replayed, nil, "step " .. i)
  end
  T.ne(r.steps[2].details.callId, r.steps[1].details.callId)
  T.ne(r.steps[4].details.callId, r.steps[3].details.callId)
  T.eq(count_calls(env), 4)
end)

T.test("with the mock provider call_agent returns the phone page's link as hint", function()
  local env = start({ config = { telephony = { provider = "mock" } } })
  local r = host({ baseUrl = env.base, apiToken = TOKEN },
    { { tool = "call_agent", toolCallId = "toolu_mock", params = { to = "+14155550100", prompt = "Book it." } } })
  local d = r.steps[1].details
  T.eq(r.steps[1].isError, false, r.steps[1].error)
  T.match(d.hint or "", "^" .. env.base:gsub("%p", "%%%0") .. "/mock/call/" .. d.callId .. "%?t=")
end)

T.test("call_agent_hangup cancels a ringing call; a second hang-up says it has ended", function()
  local env = start({ twilio = { behaviour = { ring_ms = 10000 } } })
  local cfg = { baseUrl = env.base, apiToken = TOKEN }
  local r = host(cfg, { { tool = "call_agent", toolCallId = "toolu_h", params = { to = "+14155550100", prompt = "Book it." } } })
  local id = r.steps[1].details.callId
  T.wait_for(function()
    return #env.tw.calls == 1
  end, 5000, "the dial")
  r = host(cfg, { { tool = "call_agent_hangup", params = { callId = id } } })
  T.eq(r.steps[1].isError, false, r.steps[1].error)
  T.eq(r.steps[1].details.callId, id)
  T.wait_for(function()
    local _, rec = api(env, "GET", "/v1/calls/" .. id)
    return rec.status == "canceled"
  end, 10000, "the call to be canceled")
  r = host(cfg, {
    { tool = "call_agent_hangup", params = { callId = id } },
    { tool = "call_agent_status", params = { callId = id } },
  })
  T.match(r.steps[1].error, "^call " .. id .. " has already ended %(409 not_active%)")
  T.eq({ r.steps[2].details.status, r.steps[2].details.final, r.steps[2].details.outcome },
    { "canceled", true, json.null })
end)


T.test("a baseUrl with a wrong path is named as such, not taken for a missing call", function()
  local env = start({ twilio = { behaviour = { ring_ms = 10000 } } })
  local r = host({ baseUrl = env.base .. "/v1", apiToken = TOKEN }, {
    { tool = "call_agent_status", params = { callId = "c_00000000000000000000" } },
    { tool = "call_agent_hangup", params = { callId = "c_00000000000000000000" } },
    { tool = "call_agent", toolCallId = "toolu_path", params = { to = "+14155550100", prompt = "Book it." } },
  })
  local paths = { "GET /v1/v1/calls/c_00000000000000000000", "POST /v1/v1/calls/c_00000000000000000000/hangup",
    "POST /v1/v1/calls" }
  for i, path in ipairs(paths) do
    local s = r.steps[i]
    T.eq(s.isError, true, "step " .. i)
    T.no_match(s.error, "no call", "step " .. i .. ": not a missing call")
    T.eq(s.error, "callagent at " .. env.base .. "/v1 has no route " .. path .. " (404 not_found): set "
      .. "plugins.entries.callagent.config.baseUrl to callagent's address; the plugin adds /v1 itself", "step " .. i)
  end
  T.eq(count_calls(env), 0)
end)

T.test("call_agent whose answer never came asks again with the same Idempotency-Key and dials once", function()
  local env = start({ twilio = { behaviour = { ring_ms = 10000 } } })
  -- Between the plugin and callagent: the first answer comes after the
  -- plugin's timeoutMs (callagent has placed the call by then).
  local seen = {}
  local proxy = T.server({}, function(srv)
    srv:post("/v1/calls", function(req)
      seen[#seen + 1] = req:header("idempotency-key") or "none"
      local res = assert(fetch(env.base .. "/v1/calls", { method = "POST", body = req.body, headers = {
        Authorization = req:header("authorization"), ["Content-Type"] = req:header("content-type"),
        ["Idempotency-Key"] = req:header("idempotency-key") } }))
      if #seen % 2 == 1 then
        timer.sleep(1000)
      end
      return res.status, res.body, { ["Content-Type"] = "application/json",
        ["Idempotent-Replayed"] = res.headers["idempotent-replayed"] }
    end)
  end)
  local r, all = host({ baseUrl = "http://127.0.0.1:" .. proxy.port, apiToken = TOKEN, timeoutMs = 400 }, {
    { tool = "call_agent", toolCallId = "toolu_slow", params = { to = "+14155550100", prompt = "Book it." } },
  })
  local s = r.steps[1]
  T.eq(s.isError, false, s.error)
  T.eq(#seen, 2)
  T.match(seen[1], "^clawdbot%-%x+%-%x+%-%x+%-%x+%-%x+$", "the run's own key")
  T.eq(seen[2], seen[1], "sent again with the same key")
  local _, list = api(env, "GET", "/v1/calls?limit=100")
  T.eq(#list.calls, 1, "one call")
  T.eq(s.details.callId, list.calls[1].callId, "the call the first request placed")
  T.eq(s.details.replayed, true)
  lacks(all, TOKEN)
  -- Another run, with the same tool call id: its own key, the same for its resend.
  r = host({ baseUrl = "http://127.0.0.1:" .. proxy.port, apiToken = TOKEN, timeoutMs = 400 }, {
    { tool = "call_agent", toolCallId = "toolu_slow", params = { to = "+14155550199", prompt = "Book it." } },
  })
  T.eq(r.steps[1].isError, false, r.steps[1].error)
  T.ne(seen[3], seen[1])
  T.eq(seen[4], seen[3], "sent again with the same key")
  -- The dials are callagent's own tasks: waited for, then a moment for a third.
  T.wait_for(function()
    return #env.tw.calls >= 2
  end, 5000, "both calls dialed")
  timer.sleep(300)
  T.eq(#env.tw.calls, 2, "dialed once per call")
end)

T.test("call_agent whose answer never came, then an error for its resend: the first may have placed the call", function()
  -- The first send's answer is lost (after timeoutMs); the resend's is an
  -- error that says nothing of the first: a store that could not look the
  -- key up, a pause that began in between. Told as a call not placed, the
  -- model would call again, with a new tool call id: a second ring.
  local n = 0
  local srv = T.server({}, function(s)
    s:post("/v1/calls", function()
      n = n + 1
      if n % 2 == 1 then
        timer.sleep(900)
        return 201, { callId = "c_" .. string.rep("0", 20), status = "queued" }
      elseif n == 2 then
        return 500, { error = { code = "store_failed", message = "the Idempotency-Key could not be looked up" } }
      end
      return 503, { error = { code = "paused", message = "calls are paused: the tunnel is down; send the call again in a "
        .. "moment" } }, { ["Retry-After"] = "5" }
    end)
  end)
  local r = host({ baseUrl = "http://127.0.0.1:" .. srv.port, apiToken = TOKEN, timeoutMs = 400 }, {
    { tool = "call_agent", toolCallId = "toolu_lost1", params = { to = "+14155550100", prompt = "Book it." } },
    { tool = "call_agent", toolCallId = "toolu_lost2", params = { to = "+14155550100", prompt = "Book it." } },
  })
  T.eq(n, 4, "each sent twice")
  -- Before: "...; its log says why" and "...; try again in 5 s (503 paused)", as if nothing was done.
  T.eq(r.steps[1].error, "callagent failed: the Idempotency-Key could not be looked up (500 store_failed); its log "
    .. "says why. The request may still have been carried out: its first send got no answer.")
  T.eq(r.steps[2].error, "callagent has paused calls: the tunnel is down; send the call again in a moment; try again "
    .. "in 5 s (503 paused). The request may still have been carried out: its first send got no answer.")
  -- callagent gone before the resend: that one was never sent, the first may have been carried out.
  local gone
  gone = T.server({}, function(s)
    s:post("/v1/calls", function()
      gone:close()
      timer.sleep(900)
      return 201, { callId = "c_" .. string.rep("0", 20), status = "queued" }
    end)
  end)
  local base = "http://127.0.0.1:" .. gone.port
  r = host({ baseUrl = base, apiToken = TOKEN, timeoutMs = 400 },
    { { tool = "call_agent", toolCallId = "toolu_lost3", params = { to = "+14155550100", prompt = "Book it." } } })
  T.eq(r.steps[1].error, "callagent is not reachable at " .. base .. " (ECONNREFUSED); is it running, and is "
    .. "plugins.entries.callagent.config.baseUrl its address? The request may still have been carried out: its first "
    .. "send got no answer.")
end)

T.test("callagent starting, paused or stopping: one line that says so once, with when to try again", function()
  -- callagent's own 503s (lua/callagent/api.lua), as a tunnel opens or the app stops.
  local answers = {
    { 503, { error = { code = "starting", message = "callagent is starting: send the call again in a moment" } },
      { ["Retry-After"] = "2" } },
    { 503, { error = { code = "shutting_down", message = "callagent is shutting down: send the call again to the next run" } } },
    -- The HTTP server's, to a request on a connection left open while it drains.
    { 503, { error = { code = "closing", message = "the server is closing" } } },
    { 503, { error = { code = "paused", message = "calls are paused: the public tunnel is down (ngrok exited (status 1)); "
      .. "send the call again in a moment" } }, { ["Retry-After"] = "5" } },
  }
  local n = 0
  local srv = T.server({}, function(s)
    s:post("/v1/calls", function()
      n = n + 1
      return table.unpack(answers[n])
    end)
  end)
  local step = { tool = "call_agent", toolCallId = "toolu_503", params = { to = "+14155550100", prompt = "Book it." } }
  local r = host({ baseUrl = "http://127.0.0.1:" .. srv.port, apiToken = TOKEN }, { step, step, step, step })
  T.eq(r.steps[1].error, "callagent is starting: send the call again in a moment; try again in 2 s (503 starting)")
  T.eq(r.steps[2].error, "callagent is shutting down: send the call again to the next run (503 shutting_down)")
  T.eq(r.steps[3].error, "callagent is shutting down: the server is closing (503 closing)")
  T.eq(r.steps[4].error, "callagent has paused calls: the public tunnel is down (ngrok exited (status 1)); send the "
    .. "call again in a moment; try again in 5 s (503 paused)")
end)

T.test("callagent's own failure (5xx) is told as one, not as a refusal of the input; a POST's may have been carried out", function()
  local recording = require "callagent.store.recording"
  T.defer(function()
    recording.raise = nil
  end)
  local env = start({ twilio = { behaviour = { ring_ms = 10000 } }, config = { store = { backend = "recording" } } })
  local cfg = { baseUrl = env.base, apiToken = TOKEN }
  local r = host(cfg, { { tool = "call_agent", toolCallId = "toolu_5xx", params = { to = "+14155550100", prompt = "Book it." } } })
  local id = r.steps[1].details.callId
  -- Ended, so read from the store (a live call is read from memory).
  T.eq((api(env, "POST", "/v1/calls/" .. id .. "/hangup")), 202)
  T.wait_for(function()
    local _, rec = api(env, "GET", "/v1/calls/" .. id)
    return rec.status == "canceled"
  end, 10000, "the call to be canceled")
  recording.raise = function(op)
    return (op == "insert_call" or op == "get_call") and "EIO: the disk said no" or nil
  end
  r = host(cfg, {
    { tool = "call_agent", toolCallId = "toolu_5xx2", params = { to = "+14155550199", prompt = "Other." } },
    { tool = "call_agent_status", params = { callId = id } },
  })
  recording.raise = nil
  -- Before: "callagent refused the request: the call could not be stored".
  T.eq(r.steps[1].error, "callagent failed: the call could not be stored (500 store_failed); its log says why")
  T.eq(r.steps[2].error, "callagent failed: the call could not be read (500 store_failed); its log says why")
  -- A handler's error (500 internal) may come after the call was placed.
  local srv = T.server({}, function(s)
    s:post("/v1/calls", function()
      return 500, { error = { code = "internal", message = "internal error" } }
    end)
  end)
  r = host({ baseUrl = "http://127.0.0.1:" .. srv.port, apiToken = TOKEN },
    { { tool = "call_agent", toolCallId = "toolu_500", params = { to = "+14155550100", prompt = "Book it." } } })
  T.eq(r.steps[1].error, "callagent failed: internal error (500 internal); its log says why. "
    .. "The request may still have been carried out.")
end)

T.test("an answer that is not callagent's (a 2xx without its fields, another error shape, a proxy's page) says so", function()
  local answers = {
    { 201, { ok = true } },
    { 200, { calls = {} } },
    { 202, "accepted", { ["Content-Type"] = "text/plain" } },
    { 400, { error = "bad request" } },
    { 503, "<html>Service Unavailable</html>", { ["Content-Type"] = "text/html" } },
  }
  local n = 0
  local function answer()
    n = n + 1
    return table.unpack(answers[n])
  end
  local srv = T.server({}, function(s)
    s:post("/v1/calls", answer)
    s:get("/v1/calls/{id}", answer)
    s:post("/v1/calls/{id}/hangup", answer)
  end)
  local base = "http://127.0.0.1:" .. srv.port
  local step = { tool = "call_agent", toolCallId = "toolu_odd", params = { to = "+14155550100", prompt = "Book it." } }
  local r = host({ baseUrl = base, apiToken = TOKEN }, {
    step,
    { tool = "call_agent_status", params = { callId = "c_00000000000000000000" } },
    { tool = "call_agent_hangup", params = { callId = "c_00000000000000000000" } },
    step, step,
  })
  local tail = "; is plugins.entries.callagent.config.baseUrl callagent's address?"
  -- Before: "callagent refused the request: no error message (201 http_201)",
  -- and "callagent is busy: no error message" for the proxy's 503.
  T.eq(r.steps[1].error, "callagent at " .. base .. " answered HTTP 201 that is not callagent's answer" .. tail)
  T.eq(r.steps[2].error, "callagent at " .. base .. " answered HTTP 200 that is not callagent's answer" .. tail)
  T.eq(r.steps[3].error, "callagent at " .. base .. " answered HTTP 202 that is not callagent's JSON" .. tail)
  T.eq(r.steps[4].error, "callagent at " .. base .. " answered HTTP 400 that is not callagent's answer" .. tail)
  T.eq(r.steps[5].error, "callagent at " .. base .. " answered HTTP 503 that is not callagent's JSON" .. tail)
end)

T.test("a tool call the host cancels ends at once, and call_agent is not sent again", function()
  local released, posts = false, 0
  local slow = T.server({}, function(srv)
    local function wait()
      local deadline = timer.now() + 10000
      while not released and timer.now() < deadline do
        timer.sleep(10)
      end
    end
    srv:post("/v1/calls", function()
      posts = posts + 1
      wait()
      return 201, { callId = "c_late", status = "dialing" }
    end)
    srv:get("/v1/calls/{id}", function()
      wait()
      return 200, { callId = "c_late", status = "dialing" }
    end)
  end)
  T.defer(function()
    released = true
  end)
  local r = host({ baseUrl = "http://127.0.0.1:" .. slow.port, timeoutMs = 8000 }, {
    { tool = "call_agent", abortAfterMs = 200, params = { to = "+14155550100", prompt = "Book it." } },
    { tool = "call_agent_status", abortAfterMs = 200, params = { callId = "c_late" } },
  })
  released = true
  for i = 1, 2 do
    T.eq(r.steps[i].isError, true, "step " .. i)
    T.lt(r.steps[i].ms, 2000, "step " .. i .. " ended with the cancel, not at timeoutMs")
    T.no_match(r.steps[i].error, "not reachable", "step " .. i .. ": a cancel is not callagent's fault")
  end
  T.eq(posts, 1, "a cancelled call_agent is not sent again")
end)

T.test("an answer larger than callagent ever sends is not read whole into the host's memory", function()
  local srv = T.server({}, function(s)
    s:get("/v1/calls/{id}", function()
      return 200, '{"callId":"' .. string.rep("x", 17 * 1024 * 1024) .. '"}', { ["Content-Type"] = "application/json" }
    end)
  end)
  local base = "http://127.0.0.1:" .. srv.port
  local r = host({ baseUrl = base, timeoutMs = 5000 }, { { tool = "call_agent_status", params = { callId = "c_00000000000000000000" } } })
  -- Before: read whole (and this one then taken for a call without a status).
  T.eq(r.steps[1].error, "callagent at " .. base .. " answered HTTP 200 of more than 16 MiB, which is not callagent's; "
    .. "is plugins.entries.callagent.config.baseUrl callagent's address?")
end)

T.test("a callagent whose store keeps no Idempotency-Keys (501) still places the call", function()
  local env = start({ twilio = { behaviour = { ring_ms = 10000 } } })
  -- An app's own store without find_idempotent (optional in the interface).
  env.app.engine.store.find_idempotent = false
  local r = host({ baseUrl = env.base, apiToken = TOKEN },
    { { tool = "call_agent", toolCallId = "toolu_501", params = { to = "+14155550100", prompt = "Book it." } } })
  -- Before: 'field "Idempotency-Key": callagent refused it: this store keeps
  -- no Idempotency-Keys (501 idempotency_unsupported)', a field the model never sent.
  T.eq(r.steps[1].isError, false, r.steps[1].error)
  T.match(r.steps[1].details.callId, "^c_")
  T.eq(count_calls(env), 1, "one call")
end)

T.run()
