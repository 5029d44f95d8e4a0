--- callkit: a whole call setup for tests - fake Twilio, fake OpenAI Realtime,
-- a hooks receiver, and a callagent app wired to them, all on loopback in the
-- test process.
--
--   local kit = require "callkit"
--   local env = kit.start{
--     twilio = { behaviour = ... },          -- fakes.twilio options
--     realtime = { script = fn(session) },   -- fakes.realtime options
--     config = { retry = {...}, call = {...}, openai = {...} },  -- merged into the app config
--     hooks = { fail_first = 0, fail_status = 503, query = nil },  -- a hooks receiver
--                                            -- (notify.hooksUrl; query: "?..." after it)
--     tools = { {name, description, parameters, handler}, ... },
--   }
--   env.app, env.tw, env.rt, env.hooks (received: {headers, body, json, at})
--   env:api(method, path, body, headers) -> status, decoded body, res
--   env:create(input) -> callId (asserts 201)
--   env:get(callId) -> record
--   env:wait(callId, pred, timeout_ms, what) -> record once pred(record)
--   env:wait_final(callId, timeout_ms) -> record once its status is final
-- Everything is closed after the test (T.defer).
--
--   kit.twilio_variant(name, lua_source) -> a provider_dirs folder whose
--   provider `name` is Twilio's, changed by lua_source (P is the provider)
--
--   local tw, rt = kit.fakes()
-- A fake Twilio and a fake Realtime with the kit's credentials, for
-- app_process; closed after the test.
--
--   local p, api = kit.app_process(tw, rt, { slow_model = true })
-- A real callagent process (tests/apps/durable.lua) against fakes of the
-- test process, so that its log lines can be read (p.errtext()); api has
-- the env's API methods for it (api.base, api:create, api:wait_final, ...).
-- config: merged over the app's; hooks_url: where it notifies; port, db:
-- given again (api.port, api.db), a second process takes over the first's.
-- slow_model: the model's host name takes 1.5 s to resolve
-- (tests/c/slow_dns.c), so a call's first frames come before its model
-- connection; "fail": after those 1.5 s, the name is not found.
local T = require "testing"
local http = require "callagent.http"
local fetch = require "callagent.fetch"
local json = require "callagent.json"
local timer = require "callagent.timer"
local callagent = require "callagent"

local M = {}
local Env = {}
Env.__index = Env

M.ACCOUNT = "AC" .. string.rep("a1", 16)
M.TOKEN = "tw-auth-token-for-tests"
M.API_KEY = "sk-test-realtime-key"
M.HOOKS_TOKEN = "hooks-token-for-tests"

local function merge(dst, src)
  for k, v in pairs(src or {}) do
    if type(v) == "table" and type(dst[k]) == "table" and not v[1] then
      merge(dst[k], v)
    else
      dst[k] = v
    end
  end
  return dst
end

--- A providers folder (for provider_dirs) holding name.lua: Twilio's
-- provider with its fields copied into P, P.name set to name, then the Lua
-- source body run (it changes P). Returns the folder.
function M.twilio_variant(name, body)
  local dir = T.tmpdir()
  local f = assert(io.open(dir .. "/" .. name .. ".lua", "w"))
  f:write("local P = {}\n",
    'for k, v in pairs(dofile(require("callagent.core").root .. "/providers/twilio.lua")) do\n',
    "  P[k] = v\nend\n",
    "P.name = ", string.format("%q", name), "\n",
    body, "\nreturn P\n")
  f:close()
  return dir
end

--- A stand-in of Twilio's REST API that answers every request with
-- handler(req) (an http route handler), for answers the fake Twilio does not
-- give; returns its base URL, for config.twilio.apiBaseUrl. Closed after the test.
function M.rest_stub(handler)
  local api = require("callagent.http").server({ host = "127.0.0.1", port = 0 })
  api:route("*", "/*", handler)
  assert(api:listen())
  T.defer(function()
    api:close()
  end)
  return "http://127.0.0.1:" .. api.port
end

function M.start(opts)
  opts = opts or {}
  local env = setmetatable({ hooks = { received = {} } }, Env)
  local fake_tw = require "fakes.twilio"
  local fake_rt = require "fakes.realtime"
  local tw_opts = merge({ account_sid = M.ACCOUNT, auth_token = M.TOKEN }, opts.twilio)
  env.tw = assert(fake_tw.start(tw_opts))
  local rt_opts = merge({ api_key = M.API_KEY }, opts.realtime)
  rt_opts.script = opts.realtime and opts.realtime.script
  env.rt = assert(fake_rt.start(rt_opts))

  -- The hooks receiver (Clawdbot's /hooks/agent).
  local fail_first = opts.hooks and opts.hooks.fail_first or 0
  local fail_status = opts.hooks and opts.hooks.fail_status or 503
  local hooks = http.server({ headers = { "idempotency-key" } })
  hooks:post("/hooks/agent", function(req)
    local n = #env.hooks.received + 1
    env.hooks.received[n] = { headers = req.headers, body = req.body, json = req:json(), at = timer.now(),
      query = req.query }
    if n <= fail_first then
      return fail_status, { error = "try later" }
    end
    return 200, { ok = true }
  end)
  assert(hooks:listen())
  env.hooks.server = hooks

  local cfg = merge({
    telephony = { provider = "twilio" },
    server = { host = "127.0.0.1", port = 0 },
    twilio = { accountSid = M.ACCOUNT, authToken = M.TOKEN, fromNumber = "+15550001111", apiBaseUrl = env.tw.url },
    openai = { apiKey = M.API_KEY, realtimeUrl = env.rt.url, outputFormat = "audio/pcmu" },
    notify = { hooksUrl = hooks:url("/hooks") .. (opts.hooks and opts.hooks.query or ""), hooksToken = M.HOOKS_TOKEN, sessionKey = "test-session" },
    retry = { maxAttempts = 3, initialDelayMs = 50, backoffFactor = 2 },
    call = { goodbyeTimeoutSec = 3 },
    store = { backend = "sqlite", path = T.tmpdir() .. "/calls.db" },
    tunnel = { provider = "none" },
  }, opts.config)
  local app, err = callagent.app(cfg, {
    public_url = function(u)
      return u
    end,
    no_shutdown_hook = true,
    notify = { base_delay_ms = 50 },
    stream_start_ms = opts.stream_start_ms,
    provider_dirs = opts.provider_dirs,
  })
  assert(app, err)
  for _, t in ipairs(opts.tools or {}) do
    app:tool(t)
  end
  for event, fn in pairs(opts.on or {}) do
    app:on(event, fn)
  end
  if opts.routes then
    app:routes(opts.routes)
  end
  assert(app:start())
  env.app = app
  env.base = app.url
  T.defer(function()
    env:close()
  end)
  return env
end

function Env:close()
  if self.closed then
    return
  end
  self.closed = true
  self.app:stop()
  self.tw:close()
  self.rt:close()
  self.hooks.server:close()
end

--- The next start: a second app on env's config (its store, its fakes),
-- started, and stopped after the test. opts: more app options.
function Env:next_start(opts)
  local o = { public_url = function(u)
    return u
  end, no_shutdown_hook = true }
  for k, v in pairs(opts or {}) do
    o[k] = v
  end
  return T.started_app(self.app.config, o)
end

function Env:api(method, path, body, headers)
  local h = headers or {}
  if body ~= nil and type(body) ~= "string" then
    body = json.encode(body)
  end
  if body ~= nil and not h["Content-Type"] and not h["content-type"] then
    h["Content-Type"] = "application/json"
  end
  local res, err = fetch(self.base .. path, { method = method, body = body, headers = h })
  assert(res, err)
  return res.status, json.try_decode(res.body), res
end

function Env:create(input)
  local status, body = self:api("POST", "/v1/calls", input)
  assert(status == 201, "POST /v1/calls answered " .. tostring(status) .. ": " .. json.encode(body or {}))
  return body.callId, body
end

function Env:get(id)
  local status, body = self:api("GET", "/v1/calls/" .. id)
  assert(status == 200, "GET call answered " .. tostring(status))
  return body
end

function Env:wait(id, pred, timeout_ms, what)
  local rec
  T.wait_for(function()
    rec = self:get(id)
    return pred(rec)
  end, timeout_ms or 10000, what or "call condition")
  return rec
end

function M.fakes()
  local tw = assert(require("fakes.twilio").start({ account_sid = M.ACCOUNT, auth_token = M.TOKEN }))
  local rt = assert(require("fakes.realtime").start({ api_key = M.API_KEY }))
  T.defer(function()
    tw:close()
    rt:close()
  end)
  return tw, rt
end

function M.app_process(tw, rt, opts)
  opts = opts or {}
  local port = opts.port or T.free_port()
  local db = opts.db or T.tmpdir() .. "/calls.db"
  local env = {
    CA_PORT = tostring(port),
    CA_TW_SID = M.ACCOUNT,
    CA_TW_TOKEN = M.TOKEN,
    CA_TW_URL = tw.url,
    CA_RT_KEY = M.API_KEY,
    CA_RT_URL = rt.url,
    CA_HOOKS_URL = opts.hooks_url or "http://127.0.0.1:9/hooks",
    CA_DB = db,
    CA_CONFIG = opts.config and json.encode(opts.config) or nil,
    CA_STREAM_START_MS = opts.stream_start_ms and tostring(opts.stream_start_ms),
    CA_MAX_MARKS = opts.max_marks and tostring(opts.max_marks),
  }
  if opts.slow_model then
    env.CA_RT_URL = rt.url:gsub("127%.0%.0%.1", opts.slow_model == "fail" and "model.fail.test" or "model.slow.test")
    env.LD_PRELOAD = T.root .. "/build/release/tests/slow_dns.so"
    env.SLOW_DNS_MS = "1500"
    -- Under ASan the shim goes first; the link order check would refuse it.
    env.ASAN_OPTIONS = (os.getenv("ASAN_OPTIONS") or "") .. ":verify_asan_link_order=0"
  end
  local p = T.spawn_app(T.root .. "/tests/apps/durable.lua", nil, { env = env })
  T.wait_for(function()
    return p.out[1] and p.out[1]:match("^ready")
  end, 10000, "the app to be ready: " .. p.errtext())
  return p, setmetatable({ base = "http://127.0.0.1:" .. port, port = port, db = db }, Env)
end

local FINAL = { completed = true, busy = true, no_answer = true, failed = true, canceled = true }
function Env:wait_final(id, timeout_ms)
  return self:wait(id, function(r)
    return FINAL[r.status]
  end, timeout_ms, "final status")
end

return M
