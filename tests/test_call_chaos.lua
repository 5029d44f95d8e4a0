-- Many calls at once, each with its own mix of what Twilio and the model can
-- do to a call's life: busy, unanswered, failed and refused dials; the dial's
-- answer late (past twilio.requestTimeoutSec); callbacks late, out of order
-- or lost; the stream late; the callee hanging up; hang-ups answered late or
-- refused; a model that reports, stays silent or drops the connection; and
-- hang-ups through the API at any moment. Whatever happens, every call must
-- end with its record, be notified once, leave no call up at Twilio, and
-- never raise a Lua error; and the same when callagent is killed (kill -9)
-- at a random moment and started again on its store. The plans come from a
-- seed (TEST_CHAOS_SEED; printed), the number of calls from TEST_CHAOS_CALLS.
local T = require "testing"
local kit = require "callkit"
local log = require "callagent.log"
local task = require "callagent.task"
local timer = require "callagent.timer"
local http = require "callagent.http"
local json = require "callagent.json"
local fake_twilio = require "fakes.twilio"
local fake_realtime = require "fakes.realtime"

local CALLS = tonumber(os.getenv("TEST_CHAOS_CALLS") or "") or 120
local SEED = tonumber(os.getenv("TEST_CHAOS_SEED") or "") or 1

local function chance(p)
  return math.random() < p
end

local function between(lo, hi)
  return math.random(lo, hi)
end

-- Delays a dial may have: behaviour field, how often, range in ms.
local SOMETIMES = {
  { "create_delay_ms", 0.25, 0, 1600 }, -- past the 1 s request timeout now and then
  { "stream_delay_ms", 0.2, 0, 600 },
  { "hangup_after_ms", 0.3, 100, 3000 }, -- the callee hangs up
  { "update_delay_ms", 0.2, 0, 800 },
  { "voice_delay_ms", 0.2, 0, 800 },
  { "callback_delay_ms", 0.2, 0, 300 },
}

-- What Twilio does with one dial.
local function dial_plan()
  local r = math.random()
  local b = {
    answer = r < 0.6 and true or r < 0.72 and "busy" or r < 0.84 and "no-answer" or r < 0.93 and "failed" or "reject-api",
    initiated_ms = between(0, 200),
    ringing_ms = between(0, 200),
    ring_ms = between(20, 800),
  }
  for _, o in ipairs(SOMETIMES) do
    if chance(o[2]) then
      b[o[1]] = between(o[3], o[4])
    end
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

local function plans(n, seed)
  math.randomseed(seed)
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

local CONFIG = {
  twilio = { requestTimeoutSec = 1 },
  retry = { maxAttempts = 2, initialDelayMs = 100, backoffFactor = 1 },
  call = { ringTimeoutSec = 1, statusGraceSec = 5, maxDurationSec = 8, wrapUpSec = 2, goodbyeTimeoutSec = 2, silenceTimeoutSec = 5 },
}

-- The plans of n calls, indexed by number too, and Twilio's behaviour for
-- each dial (the plan of the call's first dial, then of its second).
local function world(n, seed)
  local plan = plans(n, seed)
  local by_to, dials_seen = {}, {}
  for i, p in ipairs(plan) do
    p.i = i
    by_to[p.to] = p
  end
  plan.by_to = by_to
  plan.behaviour = function(call)
    local p = by_to[call.params.To]
    dials_seen[p.to] = (dials_seen[p.to] or 0) + 1
    return p.dials[math.min(dials_seen[p.to], 2)]
  end
  return plan
end

-- Creates every call at once and sends the API hang-ups at their moments
-- (one that finds callagent down is not sent). Returns the ids, the
-- hang-ups answered 202 ({asked, answered} per call number) and the start.
local function place(api, plan)
  local ids, hung_up = {}, {}
  local started = timer.now()
  for i, p in ipairs(plan) do
    ids[i] = api:create({ to = p.to, prompt = "This is chaos call " .. i .. ". Say hello, then report." })
    if p.hangup_at then
      task.spawn(function()
        timer.sleep(math.max(0, p.hangup_at - (timer.now() - started)))
        local asked = timer.now()
        local ok, status = pcall(api.api, api, "POST", "/v1/calls/" .. ids[i] .. "/hangup")
        if ok and status == 202 then
          hung_up[i] = { asked = asked, answered = timer.now() }
        end
      end)
    end
  end
  return ids, hung_up, started
end

-- What must hold once every call has ended, whatever happened:
--   api, tw, plan, ids, hung_up, started: as above
--   deliveries(): {callId, status, key} per notification received so far
--   log: the log lines to look for Lua errors in
--   at_least_once: a kill may cut a delivery short, so it may come twice
--   spared(i): the call's hang-up timing is not checked (a kill in its way)
--   dials_after: only Twilio calls created after this are checked for streams
local function check(c)
  local plan, ids, tw = c.plan, c.ids, c.tw
  -- Every call ends with its record. The slowest way: a lost final callback
  -- on both dials, each waiting out the ring timeout (1 + 5 s).
  local records = {}
  for i, id in ipairs(ids) do
    local rec
    local ok = pcall(function()
      rec = c.api:wait_final(id, 90000)
    end)
    T.ok(ok, "call " .. i .. " ended; record: " .. json.encode(c.api:get(id)) .. "; plan: " .. describe(plan[i]))
    records[i] = rec
  end

  -- Nothing left up at Twilio: every call it placed ends (a hang-up the API
  -- refused leaves the stream's close, which ends the call too).
  local ok = pcall(T.wait_for, function()
    for _, call in ipairs(tw.calls) do
      if not call.final then
        return false
      end
    end
    return true
  end, 15000, "every Twilio call over")
  if not ok then
    for _, call in ipairs(tw.calls) do
      if not call.final then
        local p = plan.by_to[call.params.To]
        local related = {}
        for _, line in ipairs(c.log()) do
          if line:find(ids[p.i], 1, true) or line:find(call.sid, 1, true) then
            related[#related + 1] = line
          end
        end
        T.ok(false, string.format("Twilio call %s to %s still %s (answered %s, stream %s); record: %s; plan: %s; log:\n%s",
          call.sid, call.params.To, tostring(call.status), tostring(call.answered_at ~= nil),
          tostring(call.stream_started_at ~= nil), json.encode(records[p.i] or c.api:get(ids[p.i])), describe(p),
          table.concat(related, "\n")))
      end
    end
  end

  -- Each call notified (once, or at least once across a kill), with its
  -- final status.
  local by_id = {}
  for i, id in ipairs(ids) do
    by_id[id] = i
  end
  local seen
  local all = pcall(T.wait_for, function()
    local n = 0
    seen = {}
    for _, d in ipairs(c.deliveries()) do
      if not seen[d.callId] then
        seen[d.callId], n = true, n + 1
      end
    end
    return n >= #ids
  end, 15000, "a notification per call")
  if not all then
    for i, id in ipairs(ids) do
      if not seen[id] then
        local related = {}
        for _, line in ipairs(c.log()) do
          if line:find(id, 1, true) then
            related[#related + 1] = line
          end
        end
        T.ok(false, string.format("call %d not notified; record: %s; plan: %s; log:\n%s", i, json.encode(records[i]),
          describe(plan[i]), table.concat(related, "\n")))
      end
    end
  end
  timer.sleep(300) -- a second one would come now
  local notified = {}
  for _, d in ipairs(c.deliveries()) do
    local i = by_id[d.callId]
    T.ok(i, "a notification for one of the calls: " .. tostring(d.callId))
    notified[d.callId] = (notified[d.callId] or 0) + 1
    if i and records[i] then
      T.eq(d.status, records[i].status, "call " .. i .. " notified with its final status")
      T.eq(d.key, d.callId .. ":" .. d.status, "call " .. i .. "'s Idempotency-Key")
    end
  end

  local tw_by_to = {}
  for _, call in ipairs(tw.calls) do
    local list = tw_by_to[call.params.To] or {}
    list[#list + 1] = call
    tw_by_to[call.params.To] = list
  end
  local statuses = {}
  for i, rec in pairs(records) do
    local p = plan[i]
    local what = "call " .. i .. " (" .. describe(p) .. ")"
    statuses[rec.status] = (statuses[rec.status] or 0) + 1
    if c.at_least_once then
      T.ge(notified[rec.callId] or 0, 1, what .. ": notified")
    else
      T.eq(notified[rec.callId], 1, what .. ": notified once")
    end
    -- One dial per attempt, and each attempt's sid is Twilio's.
    local placed = tw_by_to[p.to] or {}
    T.eq(#placed, #rec.attempts, what .. ": one Twilio call per attempt")
    T.le(#rec.attempts, 2, what .. ": at most retry.maxAttempts attempts")
    local answered = false
    for n, a in ipairs(rec.attempts) do
      local call = placed[n]
      if call and a.providerCallId ~= nil then
        T.eq(a.providerCallId, call.sid, what .. ": attempt " .. n .. "'s sid")
      end
      answered = answered or (call and call.answered_at ~= nil)
      if call and call.rejected and call.rejected.status == 400 then
        -- Refused for good (21215): the last attempt, never retried.
        T.eq(n, #rec.attempts, what .. ": attempt " .. n .. " refused for good, yet retried")
        T.ok(a.status == "failed" or a.status == "canceled", what .. ": a refused attempt ended " .. a.status)
      end
      T.eq(call and #call.errors or 0, 0, what .. ": no protocol mistake on Twilio's stream: "
        .. json.encode(call and call.errors or {}))
    end
    if rec.status == "completed" then
      T.ok(answered, what .. ": completed only if Twilio answered")
    end
    -- An answered dial gets its stream, unless the API hung the call up,
    -- the dial request failed (timed out: the attempt is over), or the
    -- model's connection dropped first (the attempt ended model_error: its
    -- late voice webhook is rightly a <Hangup/>; a webhook that gave no
    -- stream would end it no_stream). In the restart test, for the dials of
    -- the second process.
    for n, call in ipairs(placed) do
      local d = p.dials[n] or {}
      local vr = call.voice_request
      local a = rec.attempts[n]
      if vr and vr.status == 200 and call.created_at > (c.dials_after or 0) and not c.hung_up[i]
        and (d.create_delay_ms or 0) < 900 and not (a and a.reason == "model_error") then
        T.ok(call.twiml and call.twiml.stream, what .. ": attempt " .. n .. "'s voice webhook gave a stream")
      end
    end
    if rec.report then
      T.eq(rec.status, "completed", what .. ": a reported call is completed")
    end
    -- A hang-up through the API ends the call at Twilio within a few
    -- seconds (late answers to the dial or the hang-up included), and no
    -- stream is connected for a voice webhook sent after the API answered.
    local h = c.hung_up[i]
    if h then
      for n, call in ipairs(placed) do
        local d = p.dials[n] or {}
        if call.ended_at and not (c.spared and c.spared(h.asked)) then
          local allowed = 3000 + (d.update_delay_ms or 0) + (d.create_delay_ms or 0) + 4 * (d.callback_delay_ms or 0)
          T.le(call.ended_at - h.asked, allowed, what .. ": Twilio call " .. call.sid .. " ended after the API hang-up")
        end
        local vr = call.voice_request
        if vr and vr.at > h.answered then
          T.ok(not (call.twiml and call.twiml.stream), what .. ": no stream for a voice webhook after the API hang-up")
        end
      end
    end
  end
  local summary = {}
  for st, n in pairs(statuses) do
    summary[#summary + 1] = st .. " " .. n
  end
  table.sort(summary)
  T.diag("final statuses: " .. table.concat(summary, ", ") .. string.format(" (%.1f s)", (timer.now() - c.started) / 1000))

  -- No Lua error anywhere, and no live call left.
  for _, line in ipairs(c.log()) do
    for _, pat in ipairs(LUA_ERROR) do
      T.no_match(line, pat, "a log line with a Lua error")
    end
  end
  local status, health = c.api:api("GET", "/healthz")
  T.eq(status, 200)
  T.eq(health.activeCalls, 0, "no live call left")
end

T.test("calls whose dials, callbacks, streams, models and hang-ups go wrong at random all end cleanly", function()
  T.diag(string.format("seed %d, %d calls (TEST_CHAOS_SEED, TEST_CHAOS_CALLS)", SEED, CALLS))
  local plan = world(CALLS, SEED)

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

  local env = kit.start({
    twilio = { behaviour = plan.behaviour },
    realtime = { script = script(plan) },
    config = CONFIG,
  })
  local ids, hung_up, started = place(env, plan)
  check({
    api = env,
    tw = env.tw,
    plan = plan,
    ids = ids,
    hung_up = hung_up,
    started = started,
    deliveries = function()
      local out = {}
      for n, h in ipairs(env.hooks.received) do
        local data = h.json and h.json.data or {}
        out[n] = { callId = data.callId, status = data.status, key = h.headers["idempotency-key"] }
      end
      return out
    end,
    log = function()
      return lines
    end,
  })
end, { timeout = 150000 })

T.test("the same, with callagent killed (kill -9) at a random moment and started again", function()
  local n = math.max(10, CALLS // 2)
  local seed = SEED + 1000
  T.diag(string.format("seed %d, %d calls", seed, n))
  local plan = world(n, seed)
  math.randomseed(seed)
  local kill_at = between(300, 3000)

  local tw = assert(fake_twilio.start({ account_sid = kit.ACCOUNT, auth_token = kit.TOKEN, behaviour = plan.behaviour }))
  local rt = assert(fake_realtime.start({ api_key = kit.API_KEY, script = script(plan) }))
  local deliveries = {}
  local hooks = http.server({ headers = { "idempotency-key" } })
  -- The receiver is busy now and then (503): those are sent again.
  local requests = 0
  hooks:post("/hooks/agent", function(req)
    requests = requests + 1
    if requests % 5 == 0 then
      return 503, { error = "busy" }
    end
    local body = req:json() or {}
    local data = type(body.data) == "table" and body.data or {}
    deliveries[#deliveries + 1] = { callId = data.callId, status = data.status, key = req.headers["idempotency-key"] }
    return 200, { ok = true }
  end)
  assert(hooks:listen())
  T.defer(function()
    tw:close()
    rt:close()
    hooks:close()
  end)

  local opts = { config = CONFIG, hooks_url = hooks:url("/hooks") }
  local first, api = kit.app_process(tw, rt, opts)
  local ids, hung_up, started = place(api, plan)
  timer.sleep(math.max(0, kill_at - (timer.now() - started)))
  local killed = timer.now()
  first:kill("SIGKILL")
  first:wait(5000)
  opts.port, opts.db = api.port, api.db
  local second = kit.app_process(tw, rt, opts)
  local restarted = timer.now()
  T.diag(string.format("killed %.0f ms after the first call was created, up again %.0f ms later", killed - started,
    restarted - killed))
  T.defer(function()
    T.diag(string.format("%d notifications, %d refused with 503 and sent again", #deliveries, requests - #deliveries))
  end)
  check({
    api = api,
    tw = tw,
    plan = plan,
    ids = ids,
    hung_up = hung_up,
    started = started,
    deliveries = function()
      return deliveries
    end,
    at_least_once = true,
    dials_after = restarted,
    -- A hang-up asked for shortly before the kill may wait for the restart.
    spared = function(asked)
      return asked > killed - 5000 and asked < restarted + 1000
    end,
    log = function()
      local out = {}
      for _, p in ipairs({ first, second }) do
        for _, line in ipairs(p.err) do
          out[#out + 1] = line
        end
      end
      return out
    end,
  })
end, { timeout = 150000 })

T.run()
