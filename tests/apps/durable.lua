-- A callagent app for the restart tests: Twilio and OpenAI are the test's
-- fakes, the store is the SQLite file CA_DB; it prints "ready" when up.
-- CA_CONFIG, a JSON object of sections, sets keys of the config below.
local callagent = require "callagent"
local task = require "callagent.task"
local runtime = require "callagent.runtime"
local json = require "callagent.json"

local port = assert(tonumber(os.getenv("CA_PORT")), "CA_PORT")
local config = {
  telephony = { provider = "twilio" },
  server = { port = port, publicBaseUrl = "http://127.0.0.1:" .. port },
  twilio = {
    accountSid = os.getenv("CA_TW_SID"),
    authToken = os.getenv("CA_TW_TOKEN"),
    fromNumber = "+15550001111",
    apiBaseUrl = os.getenv("CA_TW_URL"),
  },
  openai = { apiKey = os.getenv("CA_RT_KEY"), realtimeUrl = os.getenv("CA_RT_URL"), outputFormat = "audio/pcmu" },
  notify = { hooksUrl = os.getenv("CA_HOOKS_URL"), hooksToken = "hooks-token-for-tests" },
  retry = { maxAttempts = 3, initialDelayMs = tonumber(os.getenv("CA_RETRY_MS") or "1500"), backoffFactor = 1 },
  call = { goodbyeTimeoutSec = 2 },
  store = { backend = "sqlite", path = os.getenv("CA_DB") },
}
-- CA_CONFIG's keys, section by section.
for section, fields in pairs(os.getenv("CA_CONFIG") and json.decode(os.getenv("CA_CONFIG")) or {}) do
  config[section] = config[section] or {}
  for k, v in pairs(fields) do
    config[section][k] = v
  end
end
-- CA_MAX_MARKS: marks the bridge keeps unechoed (shortened for a test).
if os.getenv("CA_MAX_MARKS") then
  require("callagent.bridge").MAX_MARKS = assert(tonumber(os.getenv("CA_MAX_MARKS")), "CA_MAX_MARKS")
end
local app, err = callagent.app(config, {
  notify = { base_delay_ms = 200, attempts = 20 },
  stream_start_ms = tonumber(os.getenv("CA_STREAM_START_MS") or ""),
})
if not app then
  io.stderr:write("callagent: ", err, "\n")
  runtime.exit(1)
end
task.spawn(function()
  local ok, serr = app:start()
  if not ok then
    io.stderr:write("callagent: ", serr, "\n")
    runtime.exit(1)
  end
  print("ready " .. app.url)
  io.stdout:flush()
end)
