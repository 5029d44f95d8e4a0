-- Hostile checks of "secrets never in logs, errors or API responses", each
-- with a real callagent process whose whole output is read.
local T = require "testing"
local kit = require "callkit"
local fake = require "fakes.telnyx"
local json = require "callagent.json"

local TELNYX_KEY = "KEY0123456789ABCDEF_hostile-test-key"

-- A callagent process (tests/apps/durable.lua) on Telnyx's fake (fake
-- options fo) and the fake model: p, api.
local function telnyx_process(fo)
  fo.api_key, fo.connection_id = TELNYX_KEY, "1494404757140276705"
  local tx = assert(fake.start(fo))
  T.defer(function()
    tx:close()
  end)
  local rt = assert(require("fakes.realtime").start({ api_key = kit.API_KEY }))
  T.defer(function()
    rt:close()
  end)
  local p, api = kit.app_process({ url = "http://127.0.0.1:9" }, rt, { config = {
    telephony = { provider = "telnyx" },
    telnyx = { apiKey = TELNYX_KEY, connectionId = fo.connection_id, fromNumber = "+15550002222",
      publicKey = tx.public_key, apiBaseUrl = tx.url },
    retry = { maxAttempts = 1 },
  } })
  return p, api, tx
end

T.test("Telnyx refusing streaming_start with our request quoted: the log holds no stream token", function()
  local p, api, tx = telnyx_process({ echo_streaming_starts = 503 })
  local id = api:create({ to = "+14155550100", prompt = "x" })
  T.wait_for(function()
    return p.errtext():find("telnyx streaming_start failed attempt=", 1, true)
  end, 10000, "the refused streaming_start logged: " .. p.errtext())
  local c = assert(tx.calls[1])
  local params = c.refused_stream and c.refused_stream.custom_parameters or {}
  local token = params[3] and params[3].name == "token" and params[3].value
  T.ok(type(token) == "string" and #token >= 16, "the fake saw the stream token")
  local _, _, res = api:api("GET", "/v1/calls/" .. id)
  T.lacks(res.body, token, "GET /v1/calls/{id}")
  p:kill("SIGTERM")
  T.eq(p:wait(10000), 0, "exit status")
  local log = p.errtext() .. "\n" .. p.text()
  T.match(log, "WARN telnyx streaming_start failed: trying again", "the retries are logged")
  T.match(log, "WARN telnyx streaming_start failed attempt=1 call=" .. id .. ' error="telnyx 90015: Invalid parameter %- '
    .. 'custom_parameters [^\n]-%[redacted%]', "the refusal is logged, less the token")
  T.lacks(log, token, "the process's output")
  T.lacks(log, TELNYX_KEY, "the process's output")
end, { timeout = 30000 })

T.test("Telnyx's failure_reason quoting our key across its 120-byte cut: no head of the key in the record or the log",
  function()
    -- The key begins at byte 111: cut at 120 before it was scrubbed, its
    -- first 10 bytes stayed, which no redaction matches.
    local reason = "connection_failed: " .. string.rep("x", 91) .. TELNYX_KEY
    local p, api = telnyx_process({ behaviour = { stream = "fail", failure_reason = reason } })
    local id = api:create({ to = "+14155550100", prompt = "x" })
    local rec = api:wait_final(id, 10000)
    T.eq(rec.status, "failed")
    T.match(rec.lastError, "^telnyx media stream failed: connection_failed: x+%[", "the reason kept, less the key")
    local _, _, res = api:api("GET", "/v1/calls")
    p:kill("SIGTERM")
    T.eq(p:wait(10000), 0, "exit status")
    local head = TELNYX_KEY:sub(1, 8)
    T.lacks(res.body, head, "GET /v1/calls")
    T.lacks(p.errtext() .. "\n" .. p.text(), head, "the process's output")
  end, { timeout = 30000 })

T.test("Telnyx's stream error frame quoting our key across its 200-byte cut: no head of the key in the log", function()
  local p, api, tx = telnyx_process({})
  api:create({ to = "+14155550100", prompt = "x" })
  local c = assert(tx:wait_call(10000))
  c:wait(function()
    return c.stream_started_at
  end, 10000)
  -- The key begins at byte 191 of the detail, which the line cuts at 200.
  c.ws:send(json.encode({ event = "error", sequence_number = "7", stream_id = c.stream_id,
    payload = { code = 100004, title = "invalid_media", detail = string.rep("x", 190) .. TELNYX_KEY } }))
  T.wait_for(function()
    return p.errtext():find("the vendor reported an error", 1, true)
  end, 5000, "the error frame logged")
  p:kill("SIGTERM")
  T.eq(p:wait(10000), 0, "exit status")
  T.lacks(p.errtext() .. "\n" .. p.text(), TELNYX_KEY:sub(1, 8), "the process's output")
end, { timeout = 30000 })

T.run()
