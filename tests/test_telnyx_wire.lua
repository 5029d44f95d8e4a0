-- Telnyx as the real service behaves where the fake's defaults are kinder:
-- wire facts of Call Control v2 (providers/telnyx.lua) that the whole-call
-- tests in tests/test_call_telnyx.lua do not take.
local T = require "testing"
local kit = require "callkit"
local fake = require "fakes.telnyx"
local timer = require "callagent.timer"

local API_KEY = "KEY0123456789ABCDEF_telnyx-wire-key"
local CONNECTION = "1494404757140276705"
local FROM = "+15550002222"

-- A fake Telnyx and an app using it; opts.script: the model's.
local function start(opts)
  local tx = assert(fake.start({ api_key = API_KEY, connection_id = CONNECTION, behaviour = opts.behaviour }))
  T.defer(function()
    tx:close()
  end)
  local env = kit.start({ realtime = { script = opts.script }, config = {
    telephony = { provider = "telnyx" },
    telnyx = { apiKey = API_KEY, connectionId = CONNECTION, fromNumber = FROM, publicKey = tx.public_key,
      apiBaseUrl = tx.url },
    retry = { maxAttempts = 1 },
  } })
  env.tx = tx
  return env
end

-- The agent greets, reports, and is slow with its goodbye.
local function reporting_script(session)
  assert(session:wait_event("response.create", 5000))
  session:speak({ ms = 200, text = "Hello, this is the assistant." })
  session.report_output = session:call_function("report_call", { summary = "Reached them.", outcome = "success" })
  timer.sleep(15000)
end

-- Telnyx's hangup_cause is how the call ended at the network: besides
-- normal_clearing, unspecified (hangup_source unknown) is one an answered
-- call can end with (a carrier that drops it). The attempt was answered
-- here: it ends completed as any answered call the callee's side ended,
-- with its report if one came, not failed, busy or no_answer.
T.test("an answered call Telnyx ends with hangup_cause unspecified is completed by the callee's side, its report kept", function()
  for _, case in ipairs({
    { script = function() timer.sleep(15000) end, report = false },
    { script = reporting_script, report = true },
  }) do
    local env = start({ script = case.script })
    local id = env:create({ to = "+14155550140", prompt = "x" })
    local tx = assert(env.tx:wait_call(5000))
    tx:wait(function()
      return tx.stream_started_at
    end, 10000)
    if case.report then
      env:wait(id, function(r)
        return r.report ~= nil
      end, 10000, "the report")
    end
    tx:hangup({ cause = "unspecified", source = "unknown", sip = "unspecified" })
    local rec = env:wait_final(id, 5000)
    T.eq({ rec.status, rec.endReason, rec.report ~= nil }, { "completed", "callee_hung_up", case.report })
    T.eq(rec.attempts[1].status, "completed")
    local raw
    for _, e in ipairs(assert(env.app.store:get_call(id)).events) do
      if e.type == "provider" and e.raw and e.raw:find("^call%.hangup") then
        raw = e.raw
      end
    end
    T.eq(raw, "call.hangup/unspecified", "Telnyx's cause stays in the call's events")
  end
end, { timeout = 30000 })

T.run()
