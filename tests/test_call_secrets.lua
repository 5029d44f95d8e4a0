-- A vendor or the model quoting our secrets in an error: the quote reaches
-- no API answer, webhook or stored record, only "[redacted]".
local T = require "testing"
local kit = require "callkit"
local http = require "callagent.http"
local json = require "callagent.json"
local crypto = require "callagent.crypto"
local url = require "callagent.url"

local function has(s, needle)
  return s ~= nil and s:find(needle, 1, true) ~= nil
end

-- Everything a client, a receiver and the store hold of call id, as text.
local function everywhere(env, id)
  T.wait_for(function()
    return #env.hooks.received > 0
  end, 5000, "the notification")
  local _, one = env:api("GET", "/v1/calls/" .. id)
  local _, list = env:api("GET", "/v1/calls")
  return {
    ["GET /v1/calls/{id}"] = json.encode(one),
    ["GET /v1/calls"] = json.encode(list),
    webhook = env.hooks.received[1].body,
    store = json.encode(env.app.store:get_call(id)),
  }
end

T.test("Twilio refusing the dial with our auth token in its message: lastError has [redacted], never the token", function()
  local tw = http.server({ headers = { "authorization" } })
  tw:post("/2010-04-01/Accounts/{sid}/Calls.json", function(req)
    local b64 = (req.headers.authorization or ""):match("^Basic (.+)$") or ""
    local userpass = crypto.base64_decode(b64) or ""
    return 401, { code = 20003, message = "Authenticate: credentials " .. userpass .. " rejected", status = 401 }
  end)
  assert(tw:listen())
  T.defer(function()
    tw:close()
  end)
  local env = kit.start({ config = { twilio = { apiBaseUrl = tw:url("") }, retry = { maxAttempts = 1 } } })
  local id = env:create({ to = "+14155550100", prompt = "x" })
  local rec = env:wait_final(id, 10000)
  T.eq(rec.status, "failed")
  T.match(rec.lastError, "credentials " .. kit.ACCOUNT .. ":%[redacted%] rejected", "the message is kept, less the token")
  for where, text in pairs(everywhere(env, id)) do
    T.ok(not has(text, kit.TOKEN), where .. " holds no twilio.authToken")
  end
end)

T.test("the model quoting our API key in its error and close reason: the record says [redacted], never the key", function()
  local rt = http.server({ headers = { "authorization" } })
  rt:websocket("/v1/realtime", {
    open = function(conn, req)
      local auth = req.headers.authorization or ""
      conn:send(json.encode({ type = "error", error = { type = "invalid_request_error", code = "invalid_api_key",
        message = "Incorrect API key provided: " .. auth } }))
      conn:close(1008, "bad key " .. auth:sub(1, 60))
    end,
  })
  assert(rt:listen())
  T.defer(function()
    rt:close()
  end)
  local env = kit.start({ config = { openai = { realtimeUrl = rt:ws_url("/v1/realtime") }, retry = { maxAttempts = 1 } } })
  local id = env:create({ to = "+14155550100", prompt = "x" })
  local rec = env:wait_final(id, 15000)
  T.eq(rec.status, "failed")
  T.match(rec.lastError, "%[redacted%]")
  for where, text in pairs(everywhere(env, id)) do
    T.ok(not has(text, kit.API_KEY), where .. " holds no openai.apiKey")
  end
end)

-- What the child's API answers of call id, then (stopped, so that every line
-- has come through the pipes) its whole stdout and stderr, as text.
local function process_everywhere(p, env, id)
  local _, _, r1 = env:api("GET", "/v1/calls/" .. id)
  local _, _, r2 = env:api("GET", "/v1/calls")
  p:kill("SIGTERM")
  T.eq(p:wait(10000), 0, "the child's exit status")
  return {
    ["GET /v1/calls/{id}"] = r1.body,
    ["GET /v1/calls"] = r2.body,
    stdout = p.text(),
    stderr = p.errtext(),
  }
end

-- A callagent process on the fake model whose Twilio answers every request
-- with answer(req) (kit.rest_stub): p, env. Both fakes close after the test.
local function process_refused_by(answer, opts)
  local rt = assert(require("fakes.realtime").start({ api_key = kit.API_KEY }))
  T.defer(function()
    rt:close()
  end)
  return kit.app_process({ url = kit.rest_stub(answer) }, rt, opts)
end

-- Waits for the process to log the refused dial.
local function refusal_logged(p)
  T.wait_for(function()
    return p.errtext():find("dialing failed", 1, true)
  end, 5000, "the log line of the refusal")
end

T.test("Twilio echoing our Authorization header (Basic sid:token) in its refusal: the log, lastError and the API hold none of it",
  function()
    local basic = crypto.base64_encode(kit.ACCOUNT .. ":" .. kit.TOKEN)
    local seen
    local p, env = process_refused_by(function(req)
      seen = req.headers.authorization
      return 401, { code = 20003, message = "Authenticate: header '" .. tostring(seen) .. "' rejected", status = 401 }
    end, { config = { retry = { maxAttempts = 1 } } })
    local id = env:create({ to = "+14155550100", prompt = "x" })
    local rec = env:wait_final(id, 10000)
    T.eq(seen, "Basic " .. basic, "the fake saw the credential it echoes")
    T.eq(rec.status, "failed")
    T.match(rec.lastError, "header 'Basic %[redacted%]' rejected", "the message is kept, less the credential")
    refusal_logged(p)
    for where, text in pairs(process_everywhere(p, env, id)) do
      T.ok(not has(text, basic), where .. " holds no Basic credential")
      T.ok(not has(text, kit.TOKEN), where .. " holds no twilio.authToken")
    end
  end)

T.test("Twilio quoting our webhook URL with its password (user:pass@) in its refusal: the log, lastError and the API hold no password",
  function()
    local password = "url-password-for-tests"
    local seen
    local port = T.free_port()
    local p, env = process_refused_by(function(req)
      seen = url.form_decode(req.body or "").Url
      return 400, { code = 21205, message = "Url is not a valid URL: " .. tostring(seen), status = 400 }
    end, { port = port, config = {
      retry = { maxAttempts = 1 },
      server = { publicBaseUrl = "http://callagent:" .. password .. "@127.0.0.1:" .. port },
    } })
    local id = env:create({ to = "+14155550100", prompt = "x" })
    local rec = env:wait_final(id, 10000)
    T.ok(has(seen, password), "the fake saw the password it quotes")
    T.eq(rec.status, "failed")
    T.match(rec.lastError, "not a valid URL: http://callagent:%[redacted%]@127%.0%.0%.1", "the message is kept, less the password")
    refusal_logged(p)
    for where, text in pairs(process_everywhere(p, env, id)) do
      T.ok(not has(text, password), where .. " holds no password of server.publicBaseUrl")
    end
  end)

T.test("a model proxy quoting its URL with our ?api-key= in its error: the record says [redacted], never the key", function()
  local proxy_key = "proxy-key-for-tests-123"
  local rt = http.server()
  rt:websocket("/v1/realtime", {
    open = function(conn, req)
      conn:send(json.encode({ type = "error", error = { type = "invalid_request_error", code = "invalid_api_key",
        message = "no deployment at /v1/realtime?" .. tostring(req.raw_query) } }))
      conn:close(1008, ("bad key: ?" .. tostring(req.raw_query)):sub(1, 100))
    end,
  })
  assert(rt:listen())
  T.defer(function()
    rt:close()
  end)
  local env = kit.start({ config = { openai = { realtimeUrl = rt:ws_url("/v1/realtime") .. "?api-key=" .. proxy_key },
    retry = { maxAttempts = 1 } } })
  local id = env:create({ to = "+14155550100", prompt = "x" })
  local rec = env:wait_final(id, 15000)
  T.eq(rec.status, "failed")
  T.match(rec.lastError, "api%-key=%[redacted%]")
  for where, text in pairs(everywhere(env, id)) do
    T.ok(not has(text, proxy_key), where .. " holds no api-key of openai.realtimeUrl")
  end
end)

T.run()
