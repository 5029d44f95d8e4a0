-- The Clawdbot plugin (examples/clawdbot/) where the real host differs from
-- a tidy one: tool call ids that repeat from one run to the next. Same stand-in of
-- the host as tests/test_clawdbot_plugin.lua (tests/clawdbot/harness.mjs).
local T = require "testing"
local kit = require "callkit"
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

T.run()
