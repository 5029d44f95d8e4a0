-- The Clawdbot plugin (examples/clawdbot/) where the real host differs from
-- a tidy one: tool call ids that repeat from one run to the next, and
-- arguments the host's validator has already rewritten. Same stand-in of
-- the host as tests/test_clawdbot_plugin.lua (tests/clawdbot/harness.mjs).
local T = require "testing"
local kit = require "callkit"
local fetch = require "callagent.fetch"
local json = require "callagent.json"

local PLUGIN = T.root .. "/examples/clawdbot"
local HARNESS = T.root .. "/tests/clawdbot/harness.mjs"
local TOKEN = "api-token-for-clawdbot-tests"

-- One run of the host (a session's turn): its JSON answer, asserted ok.
local function host(config, steps)
  local code, out, err = T.node({ HARNESS, PLUGIN, json.encode({ config = config, steps = steps }) },
    { env = { CALLAGENT_API_TOKEN = false } })
  local all = table.concat(out, "\n") .. "\n" .. table.concat(err, "\n")
  T.eq(code, 0, "harness exit: " .. all)
  local r = json.try_decode(out[#out] or "")
  T.ok(type(r) == "table" and r.ok, "the plugin did not load: " .. all)
  return r
end

local function start()
  return kit.start({ twilio = { behaviour = { ring_ms = 10000 } }, config = { server = { apiToken = TOKEN } } })
end

local function record(env, id)
  local res = assert(fetch(env.base .. "/v1/calls/" .. id, { headers = { Authorization = "Bearer " .. TOKEN } }))
  T.eq(res.status, 200, res.body)
  return json.decode(res.body)
end

T.test("a tool call id the model gives again in a later run places a new call, not the old one's replay", function()
  -- Kimi K2 (Clawdbot's moonshot provider) numbers its tool calls per
  -- conversation, functions.<name>:<n> from 0, so each new session's first
  -- call_agent has the id an earlier session's had; the Gateway's
  -- POST /tools/invoke gives http-<Date.now()>, the same to two requests in
  -- one millisecond. Before: the same call again was a replay of the old call
  -- (dialed nothing), another one a 422 the model cannot get past.
  local env = start()
  local cfg = { baseUrl = env.base, apiToken = TOKEN }
  local id = "functions.call_agent:0"
  local params = { to = "+14155550100", prompt = "Book a table for two at seven." }
  local first = host(cfg, { { tool = "call_agent", toolCallId = id, params = params } }).steps[1]
  T.eq(first.isError, false, first.error)
  local again = host(cfg, { { tool = "call_agent", toolCallId = id, params = params } }).steps[1]
  T.eq(again.isError, false, again.error)
  T.ne(again.details.callId, first.details.callId, "a new call")
  T.eq(again.details.replayed, nil)
  local other = host(cfg, { { tool = "call_agent", toolCallId = id, params = { to = "+14155550199", prompt = "Other." } } })
    .steps[1]
  T.eq(other.isError, false, other.error)
  T.wait_for(function()
    return #env.tw.calls == 3
  end, 5000, "three calls dialed")
end)

T.test("optional fields the model sent as null (the host makes them \"\") are not given, not refused", function()
  -- Clawdbot validates a tool call's arguments with ajv coerceTypes (pi-ai),
  -- which turns a null for a string into "": callagent takes null as not
  -- given, but refuses "" for timezone, locale and voice. Before:
  -- 'field "locale": callagent refused it: locale must be a language tag'.
  local env = start()
  local r = host({ baseUrl = env.base, apiToken = TOKEN }, {
    { tool = "call_agent", toolCallId = "toolu_null", params = { to = "+14155550100", prompt = "Book it.",
      timezone = json.null, locale = json.null, voice = json.null, callerName = json.null, calleeName = "" } },
    -- A value given is still callagent's to check.
    { tool = "call_agent", toolCallId = "toolu_bad", params = { to = "+14155550100", prompt = "Book it.", voice = "robot" } },
  })
  local s = r.steps[1]
  T.eq(s.isError, false, s.error)
  local rec = record(env, s.details.callId)
  T.eq({ rec.timezone, rec.locale, rec.voice }, { "America/Los_Angeles", "en-US", "alloy" }, "callagent's defaults")
  T.eq(rec.callerName, nil)
  T.match(r.steps[2].error, '^field "voice": callagent refused it')
end)

T.run()
