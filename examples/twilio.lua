-- examples/twilio.lua: real phone calls through Twilio, configured in Lua,
-- secrets from the environment. Needs a public URL for Twilio's webhooks:
-- PUBLIC_BASE_URL, or a tunnel (ngrok or tailscale installed and logged in).
--
--   TWILIO_ACCOUNT_SID=AC... TWILIO_AUTH_TOKEN=... TWILIO_FROM_NUMBER=+1... \
--   OPENAI_API_KEY=sk-... ./build/callagent run examples/twilio.lua
--
-- Optional: PORT (4545), CALLAGENT_API_TOKEN, and for a dry run against
-- stand-ins of the vendors (the tests' fakes) TWILIO_API_BASE_URL and
-- OPENAI_REALTIME_URL.
local callagent = require "callagent"
local task = require "callagent.task"
local runtime = require "callagent.runtime"
local log = require "callagent.log"

local function env(name)
  local v = os.getenv(name)
  if not v or v == "" then
    io.stderr:write("examples/twilio.lua: set ", name, "\n")
    runtime.exit(2)
  end
  return v
end

-- Decimal digits only: tonumber took 0x10 as port 16, 1e3 as 1000.
local port_text = os.getenv("PORT") or "4545"
local port = port_text:find("^%d+$") and math.tointeger(tonumber(port_text))
if not port then
  io.stderr:write("callagent: PORT must be a port number, got '", port_text, "'\n")
  runtime.exit(1)
end

local app, err = callagent.app({
  telephony = { provider = "twilio" },
  server = { port = port,
    publicBaseUrl = os.getenv("PUBLIC_BASE_URL"), apiToken = os.getenv("CALLAGENT_API_TOKEN") },
  twilio = { accountSid = env("TWILIO_ACCOUNT_SID"), authToken = env("TWILIO_AUTH_TOKEN"), fromNumber = env("TWILIO_FROM_NUMBER"),
    apiBaseUrl = os.getenv("TWILIO_API_BASE_URL") },
  openai = { apiKey = env("OPENAI_API_KEY"), outputFormat = "audio/pcmu", realtimeUrl = os.getenv("OPENAI_REALTIME_URL") },
  store = { backend = "memory" },
})
if not app then
  io.stderr:write("callagent: ", err, "\n") -- a bad PORT, say: one line, status 1
  runtime.exit(1)
end

app:on("status", function(call, from, to)
  log.info("status", { call = call.callId, from = from, to = to })
end)
app:on("report", function(call, report)
  log.info("report", { call = call.callId, outcome = report.outcome, summary = report.summary })
end)

task.spawn(function()
  local ok, err = app:start()
  if not ok and runtime.shutting_down() then
    return -- stopped by a signal while it started: the stop's exit status stands
  end
  if not ok then
    io.stderr:write("callagent: ", err, "\n") -- one line, and exit status 1: it did not start
    runtime.exit(1)
  end
  print("callagent (Twilio) on " .. app.url .. ", public URL " .. app:public_url())
end)
