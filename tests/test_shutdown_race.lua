-- Race: ringing calls whose callee answers right around the SIGTERM (the
-- stop's cancel of a ringing call vs. the callee's answer). Env:
--   TEST_RACE_CALLS (60)  TEST_RACE_SEED (2)
--   TEST_RACE_SPREAD (ms; answers spread over [-SPREAD/2, +SPREAD] around the SIGTERM; 40)
--   TEST_RACE_CB_DELAY (ms; every other call's status callbacks this late; 60)
--   TEST_RACE_LOST (1: final "completed" callbacks lost; 0)
local T = require "testing"
local timer = require "callagent.timer"
local task = require "callagent.task"
local durable = require "durable_world"

local FINAL = durable.FINAL

local CALLS = tonumber(os.getenv("TEST_RACE_CALLS") or "") or 60
local SEED = tonumber(os.getenv("TEST_RACE_SEED") or "") or 2
local SPREAD = tonumber(os.getenv("TEST_RACE_SPREAD") or "") or 40
local CB_DELAY = tonumber(os.getenv("TEST_RACE_CB_DELAY") or "") or 60
local LOST = os.getenv("TEST_RACE_LOST") == "1"
math.randomseed(SEED)

local T_SIG -- timer.now() at which the SIGTERM goes
local offsets = {}
for i = 1, CALLS do
  offsets[i] = math.random(-SPREAD // 2, SPREAD)
end

local function index_of(to)
  return tonumber(to:match("(%d%d%d%d)$"))
end

local dials = {}
local function behaviour(call)
  local i = index_of(call.params.To)
  dials[i] = (dials[i] or 0) + 1
  local b = {}
  if LOST then
    b.lost_callbacks = { completed = true }
  end
  if dials[i] > 1 then
    b.ring_ms = 100
    return b
  end
  -- initiated_ms 5 + ringing_ms 5 before the ring starts
  b.ring_ms = math.max(1, math.floor(T_SIG - timer.now() - 10 + offsets[i]))
  if CB_DELAY > 0 and i % 2 == 0 then
    b.callback_delay_ms = CB_DELAY
  end
  return b
end

local function script(session)
  if not session:wait_event("response.create", 10000) then
    return
  end
  session:report_and_goodbye({ summary = "ok", outcome = "success" }, { ms = 100, text = "Bye." })
end

T.test(string.format("SIGTERM while callees answer (%d calls, seed %d, spread %d, cb_delay %d, lost %s)",
  CALLS, SEED, SPREAD, CB_DELAY, tostring(LOST)), function()
  local w = durable.new({ behaviour = behaviour, script = script, retry_ms = 2000, ready_ms = 20000 })
  local start, api = w.start, w.api
  start()
  T_SIG = timer.now() + 2500
  local ids = {}
  local fns = {}
  for i = 1, CALLS do
    fns[#fns + 1] = function()
      local st, c = api("POST", "/v1/calls", { to = string.format("+1415555%04d", i), prompt = "Talk." })
      assert(st == 201, tostring(st))
      ids[i] = c.callId
    end
  end
  task.all(fns)
  timer.sleep(math.max(0, T_SIG - timer.now()))
  local tsig = timer.now()
  assert(w.app:kill("SIGTERM"))
  local code = w.app:wait(15000)
  T.diag(string.format("exit %s after %d ms", tostring(code), math.floor(timer.now() - tsig)))
  T.eq(code, 0, "exit 0")
  local first_log = w.app.errtext()
  -- The store after the stop.
  local recs = w.stored()
  local tw_by = w.dials_by_call()
  local after, answered_requeued, detail = {}, {}, {}
  for i, id in ipairs(ids) do
    local r = recs[id]
    local c1 = tw_by[id] and tw_by[id][1]
    local ans = c1 and c1.answered_at
    local k = (r and r.status or "MISSING") .. (ans and "/answered@" or "/unanswered")
    after[k] = (after[k] or 0) + 1
    if r and r.status == "queued" and ans then
      answered_requeued[#answered_requeued + 1] = string.format("%s (answer %+d ms from SIGTERM, cb_delay %s, tw end %s/%s)",
        id, math.floor(ans - tsig), tostring(c1.behaviour.callback_delay_ms), tostring(c1.final), tostring(c1.end_reason))
    end
    if r and r.attempts and r.attempts[1] then
      local a = r.attempts[1]
      local dk = tostring(a.status) .. "|" .. tostring(a.reason) .. "|tw:" .. tostring(c1 and c1.final) .. "/" .. tostring(c1 and c1.end_reason)
      detail[dk] = (detail[dk] or 0) + 1
    end
  end
  local tally = durable.tally
  T.diag("after the stop: " .. tally(after))
  T.diag("attempt 1: " .. tally(detail))
  if #answered_requeued > 0 then
    T.diag("answered at Twilio, yet queued to be dialed again: " .. #answered_requeued .. "\n#   "
      .. table.concat(answered_requeued, "\n#   "))
  end
  -- Restart and let everything end.
  start()
  local ok = pcall(T.wait_for, function()
    for _, id in ipairs(ids) do
      local st, rec = api("GET", "/v1/calls/" .. id)
      if not (st == 200 and FINAL[rec.status]) then
        return false
      end
    end
    return true
  end, 60000, "all final")
  T.ok(ok, "every call final after the restart")
  timer.sleep(1500)
  tw_by = w.dials_by_call()
  local finals, multi, missing, redialed_after_answer, hung_up_by_us = {}, {}, {}, {}, {}
  for _, id in ipairs(ids) do
    local st, rec = api("GET", "/v1/calls/" .. id)
    local k = tostring(rec and rec.status) .. "/" .. tostring(rec and rec.endReason)
    finals[k] = (finals[k] or 0) + 1
    if rec and rec.endReason == "callee_hung_up" then
      hung_up_by_us[#hung_up_by_us + 1] = id
    end
    local n = 0
    for _ in pairs(w.by_call[id] or {}) do
      n = n + 1
    end
    if n == 0 then
      missing[#missing + 1] = id
    elseif n > 1 then
      multi[#multi + 1] = id
    end
    local cs = tw_by[id] or {}
    if #cs > 1 and cs[1].answered_at then
      redialed_after_answer[#redialed_after_answer + 1] = id
    end
  end
  local dups = {}
  for key, c in pairs(w.by_key) do
    if c > 1 then
      dups[#dups + 1] = key
    end
  end
  T.diag("final: " .. tally(finals))
  local up = {}
  for _, c in ipairs(w.tw.calls) do
    if c.sid and not c.final then
      up[#up + 1] = c.sid .. " " .. tostring(c.status)
    end
  end
  T.eq(missing, {}, "every call notified")
  T.eq(multi, {}, "one key per call")
  T.eq(dups, {}, "each notification once")
  T.eq(up, {}, "no call left up at Twilio")
  T.eq(redialed_after_answer, {}, "no callee who answered is dialed again")
  T.eq(hung_up_by_us, {}, "no call the stop hung up ends completed/callee_hung_up (the fake callee never hangs up)")
  assert(w.app:kill("SIGTERM"))
  T.eq(w.app:wait(15000), 0, "second run exits 0")
  local sans = {}
  for _, text in ipairs({ first_log, w.app.errtext() }) do
    for line in text:gmatch("[^\n]+") do
      if line:find("Sanitizer") or line:find("runtime error") or line:find("traceback") then
        sans[#sans + 1] = line
      end
    end
  end
  T.eq(sans, {}, "no sanitizer report or traceback")
  if os.getenv("TEST_RACE_DUMP") then
    local f = io.open(os.getenv("TEST_RACE_DUMP"), "w")
    f:write(first_log, "\n===== run 2 =====\n", w.app.errtext())
    f:close()
  end
end, { timeout = 180000 })

T.run()
