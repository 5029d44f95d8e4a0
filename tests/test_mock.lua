-- The mock provider's HTTP surface, without a browser: it takes no webhooks
-- (its calls are driven by its own token-checked routes), and its dial page
-- can carry the API token.
local T = require "testing"
local fetch = require "callagent.fetch"
local json = require "callagent.json"

local TOKEN = "mock-test-api-token-0123456789"

local function start(extra)
  local cfg = {
    telephony = { provider = "mock" },
    server = { port = 0, apiToken = TOKEN },
    openai = { apiKey = "sk-unused", realtimeUrl = "ws://127.0.0.1:9/v1/realtime" },
    call = { ringTimeoutSec = 60 },
    store = { backend = "memory" },
  }
  for k, v in pairs(extra or {}) do
    cfg[k] = v
  end
  return T.started_app(cfg, { no_shutdown_hook = true })
end

-- start() with a fake model (fakes.realtime, with opts: its script) for the
-- calls' sessions, closed at the test's end: the app, and the fake model.
local function start_with_model(opts)
  local rt_opts = { api_key = "sk-mock-test-model-key-0123456789abcdef" }
  for k, v in pairs(opts or {}) do
    rt_opts[k] = v
  end
  local rt = assert(require("fakes.realtime").start(rt_opts))
  T.defer(function()
    rt:close()
  end)
  return start({ openai = { apiKey = rt.api_key, realtimeUrl = rt.url } }), rt
end

T.test("POST /status and /voice are refused for mock calls and change nothing", function()
  local app = start()
  local res = assert(fetch(app.url .. "/v1/calls", {
    method = "POST",
    headers = { Authorization = "Bearer " .. TOKEN, ["Content-Type"] = "application/json" },
    body = json.encode({ to = "+15555550100", prompt = "Test." }),
  }))
  T.eq(res.status, 201)
  local id = json.decode(res.body).callId
  for _, path in ipairs({ "/status", "/voice" }) do
    local r = assert(fetch(app.url .. path .. "?callId=" .. id .. "&attempt=1", {
      method = "POST",
      headers = { ["Content-Type"] = "application/json" },
      body = json.encode({ status = "completed", reason = "forged" }),
    }))
    T.eq(r.status, 403, path)
  end
  T.eq(app.engine:call_view(id).status, "dialing", "the forged callback changed nothing")
end)

T.test("a retried mock call's hint is the new attempt's link; the old one answers 410, not 403", function()
  local app = start({
    call = { ringTimeoutSec = 1, statusGraceSec = 1 },
    retry = { maxAttempts = 2, initialDelayMs = 100, retryStatuses = { "no_answer" } },
  })
  local call = assert(app:create_call({ to = "+15555550100", prompt = "Test." }))
  local id = call.callId or call.id
  local first = app.engine:call_view(id).hint
  T.ok(first, "a link for attempt 1")
  -- The hint is the attempt's once its dial is placed, a moment after the
  -- attempt says "dialing": waited for, not slept for.
  T.wait_for(function()
    local v = app.engine:call_view(id)
    return v.attempt == 2 and v.status == "dialing" and v.hint and v.hint ~= first
  end, 10000, "attempt 2 ringing, with a link of its own")
  local second = app.engine:call_view(id).hint
  T.ok(second and second ~= first, "another link")
  local token = second:match("[?&]t=([^&]+)")
  local r = assert(fetch(app.url .. "/mock/api/answer", { method = "POST", headers = { ["Content-Type"] = "application/json" },
    body = json.encode({ callId = id, token = token }) }))
  T.ne(r.status, 403, "the record's link answers: " .. r.body)
  r = assert(fetch(app.url .. "/mock/api/answer", { method = "POST", headers = { ["Content-Type"] = "application/json" },
    body = json.encode({ callId = id, token = first:match("[?&]t=([^&]+)") }) }))
  T.eq({ r.status, json.decode(r.body).error.code }, { 410, "expired" }, "the first link: it stopped ringing")
  r = assert(fetch(app.url .. "/mock/api/answer", { method = "POST", headers = { ["Content-Type"] = "application/json" },
    body = json.encode({ callId = id, token = first:match("[?&]t=([^&]+)") }) }))
  T.eq(r.status, 410, "on every visit")
end)

T.test("listening on 0.0.0.0, the hint is on 127.0.0.1, where a browser lets the page use the microphone", function()
  local app = start({ server = { port = 0, host = "0.0.0.0", apiToken = TOKEN } })
  local call = assert(app:create_call({ to = "+15555550100", prompt = "Test." }))
  T.match(app.engine:call_view(call.callId or call.id).hint, "^http://127%.0%.0%.1:%d+/mock/call/")
  T.match(app.url, "^http://127%.0%.0%.1:%d+$")
end)

T.test("a mock call hung up through the API while ringing: its link answers 410 (stopped ringing)", function()
  local app = start()
  local call = assert(app:create_call({ to = "+15555550100", prompt = "Test." }))
  local id = call.callId or call.id
  local token = app.engine:call_view(id).hint:match("[?&]t=([^&]+)")
  T.ok(app.engine:hangup(id))
  local r = assert(fetch(app.url .. "/mock/api/answer", { method = "POST", headers = { ["Content-Type"] = "application/json" },
    body = json.encode({ callId = id, token = token }) }))
  T.eq({ r.status, json.decode(r.body).error.code }, { 410, "expired" })
  r = assert(fetch(app.url .. "/mock/api/answer", { method = "POST", headers = { ["Content-Type"] = "application/json" },
    body = json.encode({ callId = id, token = token }) }))
  T.eq({ r.status, json.decode(r.body).error.code }, { 410, "expired" }, "and on the next visit: not 'already used'")
end)

T.test("a publicBaseUrl with a password in it is logged without it", function()
  local code, _, p = T.run_app(nil, nil, { timeout = 8000, source = T.mock_app_source():gsub("server = { port = 0 }",
    "server = { port = 0, publicBaseUrl = 'https://alice:hunter2hunter2@calls.example.org/base' }") .. [[
local task = require "callagent.task"
task.spawn(function()
  assert(app:start())
  app:stop()
end)
]] })
  T.eq(code, 0, p.errtext())
  local log = p.errtext()
  T.match(log, 'INFO callagent ready .*public="?https://%[redacted%]@calls%.example%.org/base')
  T.match(log, "WARN no server%.apiToken: .* through https://%[redacted%]@calls%.example%.org/base")
  T.no_match(log, "hunter2")
end)

T.test("a mock call ringing when the app stops: its link stops ringing (410), and the call waits for the next start", function()
  local app = start()
  local call = assert(app:create_call({ to = "+15555550100", prompt = "Test." }))
  local id = call.callId or call.id
  local token = app.engine:call_view(id).hint:match("[?&]t=([^&]+)")
  -- app:stop()'s first step; its server closes only after the hang-ups.
  app.engine:shutdown(1000)
  local r = assert(fetch(app.url .. "/mock/api/answer", { method = "POST", headers = { ["Content-Type"] = "application/json" },
    body = json.encode({ callId = id, token = token }) }))
  T.eq({ r.status, json.decode(r.body).error.code }, { 410, "expired" })
  local v = app.engine:call_view(id)
  T.eq({ v.status, v.attempts[1].status, v.attempts[1].reason, v.attempts[1].answeredAt },
    { "queued", "canceled", "callagent stopped while it rang", nil }, "not answered: dialed again by the next start")
end)

T.test("app:stop() with a mock call ringing: its ring ends with the app, and the log keeps the link's token out", function()
  local timer = require "callagent.timer"
  local t0 = timer.now()
  local code, _, p = T.run_app(nil, nil, { timeout = 8000, source = T.mock_app_source():gsub("store = ",
    "call = { ringTimeoutSec = 30 },\n  store = ") .. [[
local task = require "callagent.task"
task.spawn(function()
  assert(app:start())
  local call = assert(app:create_call({ to = "+15555550100", prompt = "Test." }))
  print(app.engine:call_view(call.callId).hint:match("t=(.*)$"))
  app:stop()
  print("stopped") -- and nothing is left to run: the process ends
end)
]] })
  T.eq(code, 0, p.errtext())
  T.ok(timer.now() - t0 < 5000, "ended with the app, not when the phone would stop ringing: "
    .. (timer.now() - t0) .. " ms")
  T.eq(p.out[2], "stopped")
  local log = p.errtext()
  T.match(log, "INFO mock phone ringing: open the call's hint %(in the API's answer%) to answer call=c_%x+ "
    .. "page=http://127%.0%.0%.1:%d+/mock/call/c_%x+")
  T.ok(#p.out[1] > 10 and not log:find(p.out[1], 1, true), "the link's token is not in the log")
  T.no_match(log, "ERROR")
end)

-- The WARN lines written during the test, as "msg code path" (and " field"
-- when there is one), in a list the caller may empty; still written to the log.
local function warnings()
  local log = require "callagent.log"
  local warned, warn = {}, log.warn
  log.warn = function(msg, f)
    warned[#warned + 1] = msg .. " " .. tostring(f and f.code) .. " " .. tostring(f and f.path)
      .. (f and f.field and (" " .. f.field) or "")
    return warn(msg, f)
  end
  T.defer(function()
    log.warn = warn
  end)
  return warned
end

T.test("the phone page's routes answer a body that is no JSON object with 400 (and a log line), and a wrong token with 403", function()
  local app = start()
  local warned = warnings()
  -- 18 refusals of one kind, each looked for: past a flood's 5 lines a
  -- minute (log.limited; test_refusal_log), they would be counted instead.
  T.shorten(require "callagent.log", "LIMIT_LINES", 100)
  for _, path in ipairs({ "/mock/api/answer", "/mock/api/decline", "/mock/api/hangup" }) do
    for _, text in ipairs({ "5", "[1]", '"x"', "null", "{not json", "" }) do
      for k in pairs(warned) do
        warned[k] = nil
      end
      local r = assert(fetch(app.url .. path, { method = "POST", headers = { ["Content-Type"] = "application/json" }, body = text }))
      T.eq({ r.status, (json.try_decode(r.body) or {}).error }, { 400, { code = "invalid_body", message = "the body must be a JSON object" } },
        path .. " " .. text)
      T.eq(warned, { "mock page refused invalid_body " .. path }, "logged: " .. path .. " " .. text)
    end
    local r = assert(fetch(app.url .. path, {
      method = "POST",
      headers = { ["Content-Type"] = "application/json" },
      body = '{"token":{"x":1},"session":[1],"callId":5}',
    }))
    T.eq(r.status, 403, path)
  end
end)

T.test("a refused call link or page session is logged with the route and the client", function()
  local code, _, p = T.run_app(nil, nil, { source = T.mock_app_source() .. [[
local fetch = require "callagent.fetch"
local task = require "callagent.task"
local runtime = require "callagent.runtime"
task.spawn(function()
  assert(app:start())
  for _, path in ipairs({ "/mock/api/answer", "/mock/api/hangup", "/mock/api/call/c_1?s=nope" }) do
    local r = assert(fetch(app.url .. path, {
      method = path:find("call/") and "GET" or "POST",
      headers = { ["Content-Type"] = "application/json" },
      body = path:find("call/") and nil or '{"token":"guess","session":"guess","callId":"c_1"}',
    }))
    print(r.status)
  end
  app:stop()
  runtime.stop(0)
end)
]] })
  T.eq(code, 0, p.errtext())
  T.eq(p.out, { "403", "403", "403" })
  local log = p.errtext()
  T.match(log, "WARN mock page refused code=invalid_token field=token path=/mock/api/answer remote=127%.0%.0%.1")
  T.match(log, "WARN mock page refused code=invalid_session field=session path=/mock/api/hangup remote=127%.0%.0%.1")
  T.match(log, "WARN mock page refused code=invalid_session field=s path=/mock/api/call/c_1 remote=127%.0%.0%.1")
  T.no_match(log, "guess", "what the client sent stays out")
end)

T.test("the dial page offers an API token field and sends it as a bearer token", function()
  local app = start()
  local res = assert(fetch(app.url .. "/mock/"))
  T.eq(res.status, 200)
  T.match(res.body, '<input id="token" type="password"')
  T.match(res.body, '<script src="/mock/static/dial.js"')
  res = assert(fetch(app.url .. "/mock/static/dial.js"))
  T.eq(res.status, 200)
  T.match(res.body, 'headers.Authorization = "Bearer " %+ token')
end)

T.test("/mock without its slash, as it is often typed, redirects to the dial page /mock/", function()
  local app = start()
  for _, method in ipairs({ "GET", "HEAD" }) do
    local res = assert(fetch(app.url .. "/mock", { method = method }))
    T.eq({ res.status, res.headers["location"] }, { 308, "/mock/" }, method)
    T.eq(res.headers["referrer-policy"], "no-referrer", method .. ": sent with the pages' headers")
  end
  local res = assert(fetch(app.url .. "/mock?x=1"))
  T.eq({ res.status, res.headers["location"] }, { 308, "/mock/" }, "a query is dropped")
end)

-- The headers every mock page and file is sent with; the HTML pages' policy
-- is proven not to break them by tests/test_mock_browser.lua.
local CSP = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
  .. "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"

local function check_headers(res, what)
  T.eq(res.headers["content-security-policy"], CSP, what .. ": Content-Security-Policy")
  T.eq(res.headers["x-content-type-options"], "nosniff", what .. ": X-Content-Type-Options")
  T.eq(res.headers["referrer-policy"], "no-referrer", what .. ": Referrer-Policy")
  T.eq(res.headers["x-frame-options"], "DENY", what .. ": X-Frame-Options")
end

T.test("the mock phone's pages and files are sent with a strict CSP, nosniff, no Referer and no framing", function()
  local app = start()
  local call = assert(app:create_call({ to = "+15555550100", prompt = "Test." }))
  local hint = app.engine:call_view(call.callId or call.id).hint
  local pages = { ["/mock/"] = app.url .. "/mock/", ["/mock/call/{id}?t="] = hint }
  for what, url in pairs(pages) do
    local res = assert(fetch(url))
    T.eq(res.status, 200, what)
    T.match(res.headers["content-type"], "^text/html", what)
    check_headers(res, what)
    -- Nothing inline, which the policy would block.
    for tag in res.body:gmatch("<script[^>]*>") do
      T.match(tag, " src=\"/mock/static/", what .. ": a script of its own file, not inline")
    end
    T.no_match(res.body, "<style", what .. ": an inline style sheet")
    T.no_match(res.body, "%sstyle=", what .. ": a style attribute")
    T.no_match(res.body, "%son%a+=", what .. ": an event handler attribute")
  end
  local types = { js = "^text/javascript", css = "^text/css", html = "^text/html" }
  local files = {}
  for name in io.popen("ls " .. T.root .. "/providers/mock"):lines() do
    files[#files + 1] = name
  end
  T.ok(#files >= 8, "the page's files are listed")
  for _, name in ipairs(files) do
    for _, method in ipairs({ "GET", "HEAD" }) do
      local what = method .. " /mock/static/" .. name
      local res = assert(fetch(app.url .. "/mock/static/" .. name, { method = method }))
      T.eq(res.status, 200, what)
      T.match(res.headers["content-type"], types[name:match("%.(%a+)$")], what)
      check_headers(res, what)
    end
  end
  local res = assert(fetch(app.url .. "/mock/static/nope.js"))
  T.eq(res.status, 404, "a file that is not there")
  check_headers(res, "/mock/static/nope.js")
  -- Nothing outside providers/mock/.
  for _, name in ipairs({ "..%2Fmock.lua", "%2e%2e%2Fmock.lua" }) do
    T.eq(assert(fetch(app.url .. "/mock/static/" .. name)).status, 404, name)
  end
  -- /mock/static/.. is /mock (dot segments are removed): the redirect to the form.
  res = assert(fetch(app.url .. "/mock/static/%2e%2e"))
  T.eq({ res.status, res.headers.location }, { 308, "/mock/" }, "%2e%2e")
end)

T.test("a page's link and session work for its own call only: not to poll, hang up or answer another", function()
  local app = start()
  local function post(path, body)
    local r = assert(fetch(app.url .. path, { method = "POST", headers = { ["Content-Type"] = "application/json" },
      body = json.encode(body) }))
    return r.status, json.try_decode(r.body)
  end
  local a = assert(app:create_call({ to = "+15555550100", prompt = "Test." })).callId
  local b = assert(app:create_call({ to = "+15555550101", prompt = "Test." })).callId
  local ta = app.engine:call_view(a).hint:match("[?&]t=([^&]+)")
  local tb = app.engine:call_view(b).hint:match("[?&]t=([^&]+)")
  T.eq(post("/mock/api/answer", { callId = a, token = tb }), 403, "b's link does not answer a")
  local status, body = post("/mock/api/answer", { callId = a, token = ta })
  T.eq(status, 200)
  local sa = body.session
  local r = assert(fetch(app.url .. "/mock/api/call/" .. b .. "?s=" .. sa))
  T.eq(r.status, 403, "a's session does not read b")
  T.eq(post("/mock/api/hangup", { callId = b, session = sa }), 403, "nor hang it up")
  T.eq(post("/mock/api/answer", { callId = b, token = ta }), 403, "a's used link does not answer b")
  T.eq(app.engine:call_view(b).status, "dialing", "b untouched")
  T.eq(post("/mock/api/answer", { callId = b, token = tb }), 200, "b's own link, tried on a before, still answers b")
end)

-- POSTs body (a table, sent as JSON) to one of the page's routes: status, decoded body.
local function post(app, path, body)
  local r = assert(fetch(app.url .. path, { method = "POST", headers = { ["Content-Type"] = "application/json" },
    body = json.encode(body) }))
  return r.status, json.try_decode(r.body)
end

local function link_token(hint)
  return hint:match("[?&]t=([^&]+)")
end

T.test("declining on the mock phone ends the attempt busy; retried, the next attempt rings under a new link", function()
  local app = start({
    retry = { maxAttempts = 2, initialDelayMs = 100, retryStatuses = { "busy" } },
  })
  local id = assert(app:create_call({ to = "+15555550100", prompt = "Test." })).callId
  local first = link_token(app.engine:call_view(id).hint)
  local status, body = post(app, "/mock/api/decline", { callId = id, token = first })
  T.eq(status, 200, json.encode(body))
  T.eq({ body.callId, body.attempt, body.attemptStatus, body.status, type(body.nextAttemptAt) },
    { id, 1, "busy", "queued", "string" }, "the page is told a retry comes")
  local v = app.engine:call_view(id)
  T.eq({ v.attempts[1].status, v.attempts[1].reason }, { "busy", "declined on the mock phone" })
  T.wait_for(function()
    v = app.engine:call_view(id)
    return v.attempt == 2 and v.status == "dialing" and v.hint
  end, 5000, "attempt 2 ringing")
  local second = link_token(v.hint)
  T.ok(second and second ~= first, "another link")
  -- The first link stopped ringing: 410, to answer and to decline, every time.
  for _, path in ipairs({ "/mock/api/answer", "/mock/api/decline", "/mock/api/answer" }) do
    status, body = post(app, path, { callId = id, token = first })
    T.eq({ status, body.error.code }, { 410, "declined" }, path)
  end
  -- The second, declined too: no attempts are left, the call ends busy.
  status, body = post(app, "/mock/api/decline", { callId = id, token = second })
  T.eq({ status, body.attempt, body.status, body.nextAttemptAt }, { 200, 2, "busy", nil })
  v = app.engine:call_view(id)
  T.eq({ v.status, #v.attempts, v.attempts[2].status }, { "busy", 2, "busy" })
end)

T.test("a mock call declined with status failed ends the attempt failed; another status is refused with 400", function()
  local app = start({ retry = { maxAttempts = 1 } })
  local id = assert(app:create_call({ to = "+15555550100", prompt = "Test." })).callId
  local token = link_token(app.engine:call_view(id).hint)
  local status, body = post(app, "/mock/api/decline", { callId = id, token = token, status = "completed" })
  T.eq({ status, body.error.code, body.error.field }, { 400, "invalid_field", "status" })
  T.eq(app.engine:call_view(id).status, "dialing", "still ringing")
  status, body = post(app, "/mock/api/decline", { callId = id, token = token, status = "failed" })
  T.eq({ status, body.attemptStatus, body.status }, { 200, "failed", "failed" })
  local v = app.engine:call_view(id)
  T.eq({ v.status, v.attempts[1].status, v.attempts[1].reason },
    { "failed", "failed", "failed on the mock phone (asked by its link)" })
end)

T.test("one action per mock link: a decline after the answer is refused 409, an answer after a decline 410", function()
  local app = start()
  local a = assert(app:create_call({ to = "+15555550100", prompt = "Test." })).callId
  local b = assert(app:create_call({ to = "+15555550101", prompt = "Test." })).callId
  local ta = link_token(app.engine:call_view(a).hint)
  local tb = link_token(app.engine:call_view(b).hint)
  T.eq(post(app, "/mock/api/answer", { callId = a, token = ta }), 200)
  local status, body = post(app, "/mock/api/decline", { callId = a, token = ta })
  T.eq({ status, body.error.code }, { 409, "answered" })
  T.match(body.error.message, "already answered")
  local va = app.engine:call_view(a)
  T.ok(va.attempts[1].answeredAt and va.attempts[1].status ~= "busy", "the answered call was not declined")
  T.eq(post(app, "/mock/api/answer", { callId = a, token = ta }), 403, "a second answer: as before, used")

  T.eq(post(app, "/mock/api/decline", { callId = b, token = tb }), 200)
  status, body = post(app, "/mock/api/answer", { callId = b, token = tb })
  T.eq({ status, body.error.code, body.error.message }, { 410, "declined", "the call was declined from this link" })
  local v = app.engine:call_view(b)
  T.eq({ v.attempts[1].status, v.attempts[1].answeredAt }, { "busy", nil }, "not answered")
end)

T.test("a mock call answered whose page never connects its audio fails no_stream, and lastError says so", function()
  -- The mock phone reports its end inside endCall, before the engine's own
  -- ending: the reason why came second, and the record had no lastError.
  local app = start_with_model()
  local id = assert(app:create_call({ to = "+15555550102", prompt = "Test." })).callId
  T.eq(post(app, "/mock/api/answer", { callId = id, token = link_token(app.engine:call_view(id).hint) }), 200)
  local v
  T.wait_for(function()
    v = app.engine:call_view(id)
    return v.status == "failed"
  end, 20000, "the call's end")
  T.eq({ v.endReason, v.lastError }, { "no_stream", "no media stream 15 s after the answer" })
  T.eq({ #v.attempts, v.attempts[1].status, v.attempts[1].reason }, { 1, "failed", "no_stream" })
end, { timeout = 30000 })

T.test("a mock page that lost its microphone mid-call hangs up with reason microphone_lost: the call ends at once, "
  .. "its lastError says why", function()
  local app, rt = start_with_model({ script = function(s)
    s:wait_event("response.create", 20000)
  end })
  local id = assert(app:create_call({ to = "+15555550103", prompt = "Test." })).callId
  local p = assert(require("phone").answer(app.engine:call_view(id).hint))
  T.wait_for(function()
    local s = rt.sessions[1]
    return s and s.input_bytes > 0
  end, 5000, "the page's audio reaching the model")
  T.eq(post(app, "/mock/api/hangup", { callId = id, session = p.session, reason = "microphone_lost" }), 204)
  assert(p:wait_closed(3000), "callagent closes the page's stream")
  local v
  T.wait_for(function()
    v = app.engine:call_view(id)
    return v.status ~= "in_progress"
  end, 3000, "the call's end")
  T.eq({ v.status, v.endReason }, { "completed", "callee_hung_up" })
  T.eq(v.lastError, "the mock phone's microphone stopped mid-call (unplugged, or its permission taken back): "
    .. "the page hung up")
end)

T.test("a mock page's microphone_lost hang-up of a call answered whose stream has not started is as any hang-up "
  .. "of the page: completed, callee_hung_up, no lastError", function()
  local app = start_with_model()
  local id = assert(app:create_call({ to = "+15555550103", prompt = "Test." })).callId
  local status, a = post(app, "/mock/api/answer", { callId = id, token = link_token(app.engine:call_view(id).hint) })
  T.eq(status, 200)
  T.eq(post(app, "/mock/api/hangup", { callId = id, session = a.session, reason = "microphone_lost" }), 204)
  local v
  T.wait_for(function()
    v = app.engine:call_view(id)
    return v.status ~= "in_progress"
  end, 3000, "the call's end")
  T.eq({ v.status, v.endReason, v.lastError, v.attempts[1].status }, { "completed", "callee_hung_up", nil, "completed" })
end)

T.test("a mock page left before its answer's reply hangs up by its link and page id: its own answer is hung up, "
  .. "another page's is not", function()
  local app = start_with_model()
  local a = assert(app:create_call({ to = "+15555550104", prompt = "Test." })).callId
  local b = assert(app:create_call({ to = "+15555550105", prompt = "Test." })).callId
  local ta = link_token(app.engine:call_view(a).hint)
  local tb = link_token(app.engine:call_view(b).hint)
  -- a: answered by page P1 (its reply lost with the page), hung up by P1.
  T.eq(post(app, "/mock/api/answer", { callId = a, token = ta, page = "p1" }), 200)
  local status, body = post(app, "/mock/api/hangup", { callId = a, token = ta })
  T.eq({ status, body.error.code, body.error.field }, { 400, "invalid_field", "page" })
  status, body = post(app, "/mock/api/hangup", { callId = a, token = "not-the-link", page = "p1" })
  T.eq({ status, body.error.code }, { 403, "invalid_token" })
  status, body = post(app, "/mock/api/hangup", { callId = a, token = ta, page = "p2" })
  T.eq({ status, body.error.code }, { 409, "answered" }, "another page's answer is not this page's to hang up")
  T.eq(app.engine:call_view(a).status, "in_progress")
  T.eq(post(app, "/mock/api/hangup", { callId = a, token = ta, page = "p1" }), 204)
  local v = app.engine:call_view(a)
  T.eq({ v.status, v.endReason }, { "completed", "callee_hung_up" })
  -- b: the hang-up came before the answer: answered and hung up at once;
  -- the answer then finds the link used.
  T.eq(post(app, "/mock/api/hangup", { callId = b, token = tb, page = "p3" }), 204)
  v = app.engine:call_view(b)
  T.eq({ v.status, v.endReason }, { "completed", "callee_hung_up" })
  T.eq(post(app, "/mock/api/answer", { callId = b, token = tb, page = "p3" }), 403)
end)

T.test("a mock answer or hang-up by link whose page id is not 1-64 letters, digits, - or _ is refused 400 naming page, "
  .. "and answers nothing", function()
  local app = start_with_model()
  local a = assert(app:create_call({ to = "+15555550106", prompt = "Test." })).callId
  local ta = link_token(app.engine:call_view(a).hint)
  local bad = { 5, true, {}, "", string.rep("a", 65), "p 1", "p\"1" }
  for _, page in ipairs(bad) do
    for _, path in ipairs({ "/mock/api/answer", "/mock/api/hangup" }) do
      local status, body = post(app, path, { callId = a, token = ta, page = page })
      local e = type(body) == "table" and body.error or {}
      T.eq({ status, e.code, e.field }, { 400, "invalid_field", "page" }, path .. " " .. json.encode(page))
    end
  end
  T.eq(app.engine:call_view(a).status, "dialing", "nothing answered")
  -- Its own id, as phone.js makes it (32 hex digits), answers and hangs up.
  local page = string.rep("0f", 16)
  T.eq(post(app, "/mock/api/answer", { callId = a, token = ta, page = page }), 200)
  T.eq(post(app, "/mock/api/hangup", { callId = a, token = ta, page = page }), 204)
  local v = app.engine:call_view(a)
  T.eq({ v.status, v.endReason }, { "completed", "callee_hung_up" })
end)

T.test("a mock decline with a wrong token, another call's, or by GET is refused and changes nothing", function()
  local app = start()
  local a = assert(app:create_call({ to = "+15555550100", prompt = "Test." })).callId
  local b = assert(app:create_call({ to = "+15555550101", prompt = "Test." })).callId
  local ta = link_token(app.engine:call_view(a).hint)
  local tb = link_token(app.engine:call_view(b).hint)
  for _, body in ipairs({ { callId = a, token = "guess" }, { callId = a, token = tb }, { callId = a },
    { callId = b, token = ta }, { token = ta } }) do
    local status, res = post(app, "/mock/api/decline", body)
    T.eq({ status, res.error.code }, { 403, "invalid_token" }, json.encode(body))
  end
  local r = assert(fetch(app.url .. "/mock/api/decline?callId=" .. a .. "&token=" .. ta))
  T.eq(r.status, 405, "GET")
  T.eq({ app.engine:call_view(a).status, app.engine:call_view(b).status }, { "dialing", "dialing" })
  -- The links still work.
  T.eq(post(app, "/mock/api/decline", { callId = a, token = ta }), 200)
  T.eq(post(app, "/mock/api/answer", { callId = b, token = tb }), 200)
end)

T.test("a mock call that stopped ringing (hung up through the API) is not declined: 410, nothing changes", function()
  local app = start()
  local id = assert(app:create_call({ to = "+15555550100", prompt = "Test." })).callId
  local token = link_token(app.engine:call_view(id).hint)
  T.ok(app.engine:hangup(id))
  local status, body = post(app, "/mock/api/decline", { callId = id, token = token })
  T.eq({ status, body.error.code }, { 410, "expired" })
  T.wait_for(function()
    return app.engine:call_view(id).status == "canceled"
  end, 5000, "canceled")
  T.eq(app.engine:call_view(id).attempts[1].status, "canceled", "not busy")
end)

T.test("a mock link's ring view: who is called while it rings, then how it stopped; a wrong token 403", function()
  local app = start({
    call = { ringTimeoutSec = 1, statusGraceSec = 1 },
    retry = { maxAttempts = 2, initialDelayMs = 5000, retryStatuses = { "no_answer" } },
  })
  local function ring(id, token)
    local r = assert(fetch(app.url .. "/mock/api/ring/" .. id .. "?t=" .. token))
    return r.status, json.try_decode(r.body)
  end
  local function call(to)
    local id = assert(app:create_call({ to = to, prompt = "Secret plan.", calleeName = "Bob", callerName = "Ada",
      metadata = { ref = "hidden" } })).callId
    return id, link_token(app.engine:call_view(id).hint)
  end
  local a, ta = call("+15555550100")
  local b, tb = call("+15555550101")
  local c, tc = call("+15555550102")
  local d, td = call("+15555550103")
  local status, body = ring(a, ta)
  T.eq({ status, body }, { 200, { callId = a, attempt = 1, link = "ringing", attemptStatus = "dialing",
    status = "dialing", to = "+15555550100", calleeName = "Bob", callerName = "Ada" } },
    "who is called, and no prompt or metadata")
  T.eq(ring(a, tb), 403, "another call's link")
  T.eq(ring(a, "guess"), 403, "a wrong token")
  T.eq(select(2, ring(a, "guess")).error.code, "invalid_token")

  T.eq(post(app, "/mock/api/answer", { callId = a, token = ta }), 200)
  T.eq(select(2, ring(a, ta)).link, "answered", "answered (here or in another tab)")
  T.eq(post(app, "/mock/api/decline", { callId = b, token = tb }), 200)
  T.eq(select(2, ring(b, tb)).link, "declined")
  T.ok(app.engine:hangup(c))
  T.eq(select(2, ring(c, tc)), { callId = c, attempt = 1, link = "expired", attemptStatus = "canceled",
    status = "canceled", to = "+15555550102", calleeName = "Bob", callerName = "Ada" }, "hung up through the API")
  -- Nobody answered within call.ringTimeoutSec: a retry comes, under a new link.
  T.wait_for(function()
    return app.engine:call_view(d).status == "queued"
  end, 5000, "d's ring to time out")
  status, body = ring(d, td)
  T.eq({ status, body.link, body.attemptStatus, body.status, type(body.nextAttemptAt) },
    { 200, "expired", "no_answer", "queued", "string" })
end)

T.test("each refusal of the phone page's routes is a JSON error and one WARN line with its code, route and field", function()
  local app = start()
  local warned = warnings()
  local function call(to)
    local id = assert(app:create_call({ to = to, prompt = "Test." })).callId
    return id, link_token(app.engine:call_view(id).hint)
  end
  local a, ta = call("+15555550100")
  local b, tb = call("+15555550101")
  local c, tc = call("+15555550102")
  T.eq(post(app, "/mock/api/decline", { callId = b, token = tb }), 200)
  T.ok(app.engine:hangup(c))
  local status, body = post(app, "/mock/api/answer", { callId = a, token = ta })
  T.eq(status, 200)
  local session = body.session
  local function get(path)
    local r = assert(fetch(app.url .. path))
    return r.status, json.try_decode(r.body)
  end
  local cases = {
    { "/mock/api/answer", { callId = a, token = "guess" }, 403, "invalid_token", "token" },
    { "/mock/api/decline", { callId = a, token = tb }, 403, "invalid_token", "token" },
    { "/mock/api/ring/" .. a .. "?t=guess", nil, 403, "invalid_token", "t" },
    { "/mock/api/hangup", { callId = b, session = session }, 403, "invalid_session", "session" },
    { "/mock/api/hangup", { callId = a, session = session, reason = "bored" }, 400, "invalid_field", "reason" },
    { "/mock/api/call/" .. a .. "?s=guess", nil, 403, "invalid_session", "s" },
    { "/mock/api/decline", { callId = a, token = ta, status = "ok" }, 400, "invalid_field", "status" },
    { "/mock/api/decline", { callId = a, token = ta }, 409, "answered" },
    { "/mock/api/answer", { callId = b, token = tb }, 410, "declined" },
    { "/mock/api/decline", { callId = b, token = tb }, 410, "declined" },
    { "/mock/api/answer", { callId = c, token = tc }, 410, "expired" },
    { "/mock/api/decline", { callId = c, token = tc }, 410, "expired" },
  }
  for _, case in ipairs(cases) do
    local path, req, want, code, field = table.unpack(case)
    for k in pairs(warned) do
      warned[k] = nil
    end
    if req then
      status, body = post(app, path, req)
    else
      status, body = get(path)
    end
    local what = path .. " " .. json.encode(req or {})
    T.eq({ status, type(body) == "table" and body.error and body.error.code, body and body.error.field },
      { want, code, field }, what)
    T.eq(type(body.error.message), "string", what .. ": a message")
    T.eq(warned, { "mock page refused " .. code .. " " .. path:match("^[^?]*") .. (field and (" " .. field) or "") },
      what .. ": one WARN line")
  end
end)

T.run()
