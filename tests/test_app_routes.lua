-- The app's telephony routes at their edges: what the media stream route
-- does with messages no media stream sends, and what it logs.
local T = require "testing"
local kit = require "callkit"
local fetch = require "callagent.fetch"
local ws = require "callagent.ws"
local json = require "callagent.json"
local fake_twilio = require "fakes.twilio"

local function rigs()
  local tw = assert(fake_twilio.start({ account_sid = kit.ACCOUNT, auth_token = kit.TOKEN }))
  local rt = assert(require("fakes.realtime").start({ api_key = kit.API_KEY }))
  T.defer(function()
    tw:close()
    rt:close()
  end)
  return tw, rt
end

T.test("a binary message before start is refused with 1008 at once and logged, as any other first message", function()
  local tw, rt = rigs()
  -- The start deadline is far: a refusal must come from the message itself.
  local p, api = kit.app_process(tw, rt, { stream_start_ms = 8000 })
  local stream_url = api.base:gsub("^http", "ws") .. "/voice/stream"
  local function open()
    return assert(ws.connect(stream_url, { headers = { ["X-Twilio-Signature"] = fake_twilio.sign(kit.TOKEN, stream_url) } }))
  end
  for _, first in ipairs({ "binary", "connected, then binary" }) do
    local conn = open()
    if first ~= "binary" then
      conn:send(json.encode({ event = "connected", protocol = "Call", version = "1.0.0" }))
    end
    conn:send_binary("\0\1\2\3")
    local kind, code, reason = conn:receive(1500)
    T.eq({ kind, code, reason }, { "close", 1008, "expected start" }, first)
  end
  T.wait_for(function()
    return select(2, p.errtext():gsub("got a binary message", "")) >= 2
  end, 3000, "a log line for each: " .. p.errtext())
  T.match(p.errtext(), 'WARN media stream refused reason="expected connected or start, got a binary message" remote=127%.0%.0%.1')
  T.eq(assert(fetch(api.base .. "/healthz")).status, 200)
end, { timeout = 20000 })

T.run()
