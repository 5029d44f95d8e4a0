-- Many calls at once, each with its own mix of what Twilio and the model can
-- do to a call's life: busy, unanswered, failed and refused dials; the dial's
-- answer late (past twilio.requestTimeoutSec); callbacks late, out of order
-- or lost; the stream late; the callee hanging up; hang-ups answered late or
-- refused; a model that reports, stays silent or drops the connection; and
-- hang-ups through the API at any moment. Whatever happens, every call must
-- end with its record, be notified once, leave no call up at Twilio, and
-- never raise a Lua error. The plans come from a seed (TEST_CHAOS_SEED;
-- printed), the number of calls from TEST_CHAOS_CALLS.
local T = require "testing"
local kit = require "callkit"
local log = require "callagent.log"
local task = require "callagent.task"
local timer = require "callagent.timer"
local fetch = require "callagent.fetch"
local json = require "callagent.json"

local CALLS = tonumber(os.getenv("TEST_CHAOS_CALLS") or "") or 120
local SEED = tonumber(os.getenv("TEST_CHAOS_SEED") or "") or 1

local function chance(p)
  return math.random() < p
end

local function between(lo, hi)
  return math.random(lo, hi)
end

-- What Twilio does with one dial.
local function dial_plan()
  local r = math.random()
  local b = {
    answer = r < 0.6 and true or r < 0.72 and "busy" or r < 0.84 and "no-answer" or r < 0.93 and "failed" or "reject-api",
    initiated_ms = between(0, 200),
    ringing_ms = between(0, 200),
    ring_ms = between(20, 800),
  }
  if chance(0.25) then
    b.create_delay_ms = between(0, 1600) -- past the 1 s request timeout now and then
  end
  if chance(0.2) then
    b.callbacks_out_of_order = true
  end
  for _, ev in ipairs({ "initiated", "ringing", "answered", "completed" }) do
    if chance(0.1) then
      b.lost_callbacks = b.lost_callbacks or {}
      b.lost_callbacks[ev] = true
    end
  end
  if chance(0.2) then
    b.stream_delay_ms = between(0, 600)
  end
  if chance(0.3) then
    b.hangup_after_ms = between(100, 3000)
  end
  if chance(0.2) then
    b.update_delay_ms = between(0, 800)
  end
  if chance(0.2) then
    b.voice_delay_ms = between(0, 800)
  end
  if chance(0.2) then
    b.callback_delay_ms = between(0, 300)
  end
  if chance(0.05) then
    b.update_fail = 503
  end
  return b
end

-- What the model does in one session.
local function model_plan()
  local r = math.random()
  return {
    kind = r < 0.55 and "report" or r < 0.75 and "silent" or "drop",
    ms = between(100, 1500),
  }
end

local function plans(n)
  math.randomseed(SEED)
  local out = {}
  for i = 1, n do
    local d = dial_plan()
    local p = {
      to = string.format("+1415555%04d", i),
      dials = { d, dial_plan() },
      model = model_plan(),
    }
    if chance(0.25) then
      -- Any time, or about when Twilio answers, where a hang-up races the
      -- answered callback and the voice webhook.
      local answer = d.initiated_ms + d.ringing_ms + d.ring_ms
      p.hangup_at = chance(0.5) and between(0, 3000) or math.max(0, answer + between(-100, 400))
    end
    out[i] = p
  end
  return out
end

local function describe(p)
  local function b(x)
    local t = {}
    for k, v in pairs(x) do
      t[#t + 1] = k .. "=" .. (type(v) == "table" and json.encode(v) or tostring(v))
    end
    table.sort(t)
    return table.concat(t, " ")
  end
  return string.format("dial 1 {%s} dial 2 {%s} model %s %d ms, API hang-up %s", b(p.dials[1]), b(p.dials[2]),
    p.model.kind, p.model.ms, tostring(p.hangup_at))
end

local function script(plan_of)
  return function(session)
    local ev = session:wait_event("session.update", 5000)
    local instructions = ev and type(ev.session) == "table" and ev.session.instructions or ""
    local i = tonumber(tostring(instructions):match("chaos call (%d+)"))
    local p = i and plan_of[i]
    if not p then
      return
    end
    local m = p.model
    if m.kind == "drop" then
      timer.sleep(m.ms)
      session:drop()
      return
    end
    if not session:wait_event("response.create", 5000) then
      return
    end
    if m.kind == "silent" then
      return
    end
    session:speak({ ms = m.ms, text = "Hello, this is a test call." })
    if session._ended then
      return
    end
    session:call_function("report_call", { summary = "Reached them.", outcome = "success" })
    if session:wait_event("response.create", 5000) then
      session:speak({ ms = 200, text = "Goodbye!" })
    end
  end
end

local LUA_ERROR = { "attempt to ", "stack traceback", "%.lua:%d+:" }

T.test("calls whose dials, callbacks, streams, models and hang-ups go wrong at random all end cleanly", function()
  T.diag(string.format("seed %d, %d calls (TEST_CHAOS_SEED, TEST_CHAOS_CALLS)", SEED, CALLS))
  local plan = plans(CALLS)
  local by_to = {}
  for i, p in ipairs(plan) do
    p.i = i
    by_to[p.to] = p
  end

  -- Log lines at warn and error, to look for Lua errors in them.
  local lines = {}
  local warn, err = log.warn, log.error
  log.warn = function(msg, fields)
    lines[#lines + 1] = "WARN " .. msg .. " " .. json.encode(fields or {})
    return warn(msg, fields)
  end
  log.error = function(msg, fields)
    lines[#lines + 1] = "ERROR " .. msg .. " " .. json.encode(fields or {})
    return err(msg, fields)
  end
  T.defer(function()
    log.warn, log.error = warn, err
  end)

  local dials_seen = {}
  local env = kit.start({
    twilio = {
      behaviour = function(call)
        local p = by_to[call.params.To]
        dials_seen[p.to] = (dials_seen[p.to] or 0) + 1
        return p.dials[math.min(dials_seen[p.to], 2)]
      end,
    },
    realtime = { script = script(plan) },
    config = {
      twilio = { requestTimeoutSec = 1 },
      retry = { maxAttempts = 2, initialDelayMs = 100, backoffFactor = 1 },
      call = { ringTimeoutSec = 1, maxDurationSec = 8, wrapUpSec = 2, goodbyeTimeoutSec = 2, silenceTimeoutSec = 5 },
    },
  })

  -- Every call created at once; the API hang-ups at their moments.
  local ids, hung_up = {}, {}
  local started = timer.now()
  for i, p in ipairs(plan) do
    ids[i] = env:create({ to = p.to, prompt = "This is chaos call " .. i .. ". Say hello, then report." })
    if p.hangup_at then
      task.spawn(function()
        timer.sleep(math.max(0, p.hangup_at - (timer.now() - started)))
        local asked = timer.now()
        local status = env:api("POST", "/v1/calls/" .. ids[i] .. "/hangup")
        if status == 202 then
          hung_up[i] = { asked = asked, answered = timer.now() }
        end
      end)
    end
  end

  -- Every call ends with its record. The slowest way: a lost final callback
  -- on both dials, each waiting out the ring timeout (1 + 30 s).
  local records = {}
  for i, id in ipairs(ids) do
    local rec
    local ok = pcall(function()
      rec = env:wait_final(id, 90000)
    end)
    T.ok(ok, "call " .. i .. " ended; record: " .. json.encode(env:get(id)) .. "; plan: " .. describe(plan[i]))
    records[i] = rec
  end

  -- Nothing left up at Twilio: every call it placed ends (a hang-up the API
  -- refused leaves the stream's close, which ends the call too).
  local ok = pcall(T.wait_for, function()
    for _, c in ipairs(env.tw.calls) do
      if not c.final then
        return false
      end
    end
    return true
  end, 15000, "every Twilio call over")
  if not ok then
    for _, c in ipairs(env.tw.calls) do
      if not c.final then
        local p = by_to[c.params.To]
        T.ok(false, string.format("Twilio call %s to %s still %s (answered %s, stream %s); record: %s; plan: %s", c.sid,
          c.params.To, tostring(c.status), tostring(c.answered_at ~= nil), tostring(c.stream_started_at ~= nil),
          json.encode(records[p.i] or env:get(ids[p.i])), describe(p)))
      end
    end
  end

  -- Each call notified once, with its final status.
  T.wait_for(function()
    return #env.hooks.received >= #ids
  end, 10000, "a notification per call")
  timer.sleep(300) -- a second one would come now
  local notified = {}
  for _, h in ipairs(env.hooks.received) do
    local data = h.json and h.json.data or {}
    notified[data.callId] = (notified[data.callId] or 0) + 1
    for i, id in ipairs(ids) do
      if id == data.callId and records[i] then
        T.eq(data.status, records[i].status, "call " .. i .. " notified with its final status")
      end
    end
  end

  local tw_by_to = {}
  for _, c in ipairs(env.tw.calls) do
    local list = tw_by_to[c.params.To] or {}
    list[#list + 1] = c
    tw_by_to[c.params.To] = list
  end
  local statuses = {}
  for i, rec in pairs(records) do
    local p = plan[i]
    local what = "call " .. i .. " (" .. describe(p) .. ")"
    statuses[rec.status] = (statuses[rec.status] or 0) + 1
    T.eq(notified[rec.callId], 1, what .. ": notified once")
    -- One dial per attempt, and each attempt's sid is Twilio's.
    local placed = tw_by_to[p.to] or {}
    T.eq(#placed, #rec.attempts, what .. ": one Twilio call per attempt")
    T.le(#rec.attempts, 2, what .. ": at most retry.maxAttempts attempts")
    local answered = false
    for n, a in ipairs(rec.attempts) do
      local c = placed[n]
      if c and a.providerCallId ~= nil then
        T.eq(a.providerCallId, c.sid, what .. ": attempt " .. n .. "'s sid")
      end
      answered = answered or (c and c.answered_at ~= nil)
      T.eq(c and #c.errors or 0, 0, what .. ": no protocol mistake on Twilio's stream: "
        .. json.encode(c and c.errors or {}))
    end
    if rec.status == "completed" then
      T.ok(answered, what .. ": completed only if Twilio answered")
    end
    if rec.report then
      T.eq(rec.status, "completed", what .. ": a reported call is completed")
    end
    -- A hang-up through the API ends the call at Twilio within a few
    -- seconds (late answers to the dial or the hang-up included).
    -- And no stream is connected for a voice webhook sent after the API
    -- answered the hang-up.
    local h = hung_up[i]
    if h then
      for n, c in ipairs(placed) do
        local d = p.dials[n] or {}
        if c.ended_at then
          local allowed = 3000 + (d.update_delay_ms or 0) + (d.create_delay_ms or 0) + 4 * (d.callback_delay_ms or 0)
          T.le(c.ended_at - h.asked, allowed, what .. ": Twilio call " .. c.sid .. " ended after the API hang-up")
        end
        local vr = c.voice_request
        if vr and vr.at > h.answered then
          T.ok(not (c.twiml and c.twiml.stream), what .. ": no stream for a voice webhook after the API hang-up")
        end
      end
    end
  end
  local summary = {}
  for s, n in pairs(statuses) do
    summary[#summary + 1] = s .. " " .. n
  end
  table.sort(summary)
  T.diag("final statuses: " .. table.concat(summary, ", ") .. string.format(" (%.1f s)", (timer.now() - started) / 1000))

  -- No Lua error anywhere, and no live call left.
  for _, line in ipairs(lines) do
    for _, pat in ipairs(LUA_ERROR) do
      T.no_match(line, pat, "a log line with a Lua error")
    end
  end
  local res = assert(fetch(env.base .. "/healthz"))
  local health = json.decode(res.body)
  T.eq(health.activeCalls, 0, "no live call left")
end, { timeout = 150000 })

T.run()
