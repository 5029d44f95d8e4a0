-- The callagent app the benchmark measures: the Twilio provider against the
-- benchmark's fakes (Twilio's REST API in tests/bench/bench.lua, the Media
-- Streams clients and OpenAI Realtime in tests/bench/loadgen.c), the SQLite
-- store, and in the churn row notifications to the bench. Configured by the
-- bench through the environment.
local callagent = require "callagent"
local task = require "callagent.task"
local runtime = require "callagent.runtime"

local port = assert(tonumber(os.getenv("BENCH_APP_PORT")), "BENCH_APP_PORT")
local app, err = callagent.app({
  telephony = { provider = "twilio" },
  server = { port = port, publicBaseUrl = "http://127.0.0.1:" .. port },
  twilio = {
    accountSid = os.getenv("BENCH_TW_SID"),
    authToken = os.getenv("BENCH_TW_TOKEN"),
    fromNumber = "+15550001111",
    apiBaseUrl = os.getenv("BENCH_TW_URL"),
  },
  openai = {
    apiKey = "sk-bench",
    realtimeUrl = os.getenv("BENCH_RT_URL"),
    caFile = os.getenv("BENCH_RT_CA"),
    outputFormat = os.getenv("BENCH_OUTPUT") or "audio/pcmu",
  },
  -- Long enough for any row, and within the model's session (openai.sessionMaxSec).
  call = { maxDurationSec = 3000, silenceTimeoutSec = 3000, ringTimeoutSec = 600 },
  retry = { maxAttempts = 1 },
  store = { backend = os.getenv("BENCH_STORE") or "sqlite", path = os.getenv("BENCH_DB") or "/tmp/callagent-bench.db" },
  -- The churn row: each call's end is notified to the bench.
  notify = os.getenv("BENCH_HOOKS_URL") and { hooksUrl = os.getenv("BENCH_HOOKS_URL"), hooksToken = os.getenv("BENCH_HOOKS_TOKEN") }
    or nil,
}, { max_connections = 8192, gc_pause = tonumber(os.getenv("BENCH_GC_PAUSE") or "") })
task.pace_ms = tonumber(os.getenv("BENCH_PACE_MS") or "") or task.pace_ms
if not app then
  io.stderr:write("bench app: ", err, "\n")
  runtime.exit(1)
end
task.spawn(function()
  assert(app:start())
  print("ready")
  io.stdout:flush()
end)
