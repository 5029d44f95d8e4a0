-- Calls that come and go, for weeks: once they have ended, nothing of them
-- is held in the process (a map of live calls, bridges, stream tokens,
-- timers or notifications on their way that kept one entry per call would
-- grow for as long as the process runs). The measurements over thousands
-- of calls are the benchmark's churn row (tests/bench/bench.lua).
local T = require "testing"
local kit = require "callkit"
local task = require "callagent.task"
local timer = require "callagent.timer"

local CALLS = 100
local AT_ONCE = 25

-- What the engine, the provider and the notifier hold per call: each table
-- that is not empty, with its count.
local function held(app)
  local out = {}
  local function count(where, t)
    local n = 0
    for _ in pairs(t) do
      n = n + 1
    end
    if n > 0 then
      out[#out + 1] = where .. "=" .. n
    end
  end
  local e = app.engine
  for _, name in ipairs({ "live", "unsaved", "bridges", "warm", "tokens", "timers", "strays" }) do
    count("engine." .. name, e[name])
  end
  count("notifier.in_flight", e.notifier.in_flight)
  count("notifier.ran_out", e.notifier.ran_out)
  count("notifier.on_way", e.notifier.on_way)
  for name, v in pairs(app.provider) do
    if type(v) == "table" and name ~= "cfg" and name ~= "tw" and name ~= "engine" and name ~= "app" then
      count("provider." .. name, v)
    end
  end
  table.sort(out)
  return table.concat(out, " ")
end

T.test(CALLS .. " calls ending every way (reported, hung up by the callee, busy, no answer, no stream) leave nothing held once over", function()
  -- By the number's last digit: 0-4 the agent reports and hangs up, 5-6 the
  -- callee hangs up first, 7 busy, 8 no answer, 9 the stream never comes.
  local function kind(to)
    local d = tonumber(to:sub(-1))
    return d <= 4 and "report" or d <= 6 and "hangup" or d == 7 and "busy" or d == 8 and "no-answer" or "nostream"
  end
  local env = kit.start({
    twilio = {
      behaviour = function(call)
        local k = kind(call.params.To)
        if k == "hangup" then
          return { answer = true, ring_ms = 5, hangup_after_ms = 150 }
        elseif k == "busy" or k == "no-answer" then
          return { answer = k, ring_ms = 5 }
        elseif k == "nostream" then
          return { answer = true, ring_ms = 5, stream = false }
        end
        return { answer = true, ring_ms = 5 }
      end,
    },
    realtime = {
      script = function(session)
        -- A call the callee hangs up closes the session under the script.
        pcall(function()
          assert(session:wait_event("response.create", 5000))
          session:speak({ ms = 100, text = "Hello." })
          timer.sleep(200)
          session:report_and_goodbye({ summary = "Done.", outcome = "success" }, { ms = 60, text = "Bye." })
        end)
      end,
    },
    config = { retry = { maxAttempts = 1 }, call = { ringTimeoutSec = 5 } },
  })
  -- No stream after the answer: the call is not held for it for long. 3 s:
  -- with 1 s, on a machine loaded 4 deep (25 calls at once beside other
  -- tests), 3 of the 100 calls' streams came too late, ending them failed.
  T.shorten(require("callagent.calls"), "STREAM_WAIT_MS", 3000)
  -- AT_ONCE up at a time, each placed as another ends.
  local ids, next_k = {}, 0
  local workers = {}
  for w = 1, AT_ONCE do
    workers[w] = function()
      while next_k < CALLS do
        next_k = next_k + 1
        local k = next_k
        ids[k] = env:create({ to = ("+1415555%04d"):format(k), prompt = "Say hello, then report." })
        env:wait_final(ids[k], 20000)
      end
      return true
    end
  end
  task.all(workers)
  local by = {}
  for k, id in ipairs(ids) do
    local c = env:get(id)
    local key = kind(("%04d"):format(k)) .. ":" .. c.status
    by[key] = (by[key] or 0) + 1
  end
  T.eq(by, { ["report:completed"] = 50, ["hangup:completed"] = 20, ["busy:busy"] = 10,
    ["no-answer:no_answer"] = 10, ["nostream:failed"] = 10 }, "every call ended as its kind does")
  T.wait_for(function()
    return #env.hooks.received >= CALLS
  end, 10000, "every call notified")
  -- The last notifications' answers, and timers of ended calls, may still
  -- be on their way a moment.
  local deadline = timer.now() + 5000
  while held(env.app) ~= "" and timer.now() < deadline do
    timer.sleep(20)
  end
  T.eq(held(env.app), "", "nothing held of the calls")
  T.eq(#env.hooks.received, CALLS, "each notified once")
end, { timeout = 60000 })

T.run()
