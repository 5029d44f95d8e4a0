-- Stress: SIGTERM (and a second SIGTERM, or SIGKILL) during the shutdown of a
-- real callagent process (tests/apps/durable.lua) under load, then a restart
-- on the same store. Env:
--   TEST_SHUTDOWN_CALLS (100)   TEST_SHUTDOWN_SEED (10)
--   TEST_SHUTDOWN_MODE  plain | double (second SIGTERM during the shutdown) | kill (SIGKILL during it)
--   TEST_SHUTDOWN_UPDATE_DELAY (ms, fake Twilio's hang-up answers this late; 0)
--   TEST_SHUTDOWN_LOST (1, the default: every final "completed" callback is lost; 0: none)
--   TEST_SHUTDOWN_SIG_AT (ms into the shutdown for the second signal; random when unset)
--   TEST_SHUTDOWN_HOOK_DELAY (ms the notification receiver takes to answer; 100)
--   TEST_SHUTDOWN_HAMMER (1: API clients keep creating, reading and hanging up calls meanwhile)
-- A plain stop must notify each call exactly once; after a second signal or
-- SIGKILL a notification may go twice (at least once: same Idempotency-Key).
local T = require "testing"
local json = require "callagent.json"
local timer = require "callagent.timer"
local task = require "callagent.task"
local durable = require "durable_world"

local FINAL = durable.FINAL

local CALLS = tonumber(os.getenv("TEST_SHUTDOWN_CALLS") or "") or 100
local SEED = tonumber(os.getenv("TEST_SHUTDOWN_SEED") or "") or 10
local MODE = os.getenv("TEST_SHUTDOWN_MODE") or "plain"
local UPDATE_DELAY = tonumber(os.getenv("TEST_SHUTDOWN_UPDATE_DELAY") or "") or 0
local LOST = os.getenv("TEST_SHUTDOWN_LOST") ~= "0"
local SIG_AT = tonumber(os.getenv("TEST_SHUTDOWN_SIG_AT") or "")
local HOOK_DELAY = tonumber(os.getenv("TEST_SHUTDOWN_HOOK_DELAY") or "") or 100

math.randomseed(SEED)

-- kinds: talk (live, long monologue), goodbye (report, long goodbye), ring
-- (first attempt rings a minute), retry (first attempt busy: in a retry wait),
-- dialing (the dial's answer 4-6 s late), voicelate (answered, voice webhook
-- late), streamlate (answered, stream late), hangup (callee hangs up about now)
local function pick_kind()
  local r = math.random()
  if r < 0.50 then return "talk" end
  if r < 0.60 then return "goodbye" end
  if r < 0.70 then return "ring" end
  if r < 0.80 then return "retry" end
  if r < 0.86 then return "dialing" end
  if r < 0.91 then return "voicelate" end
  if r < 0.96 then return "streamlate" end
  return "hangup"
end

local plans = {}
for i = 1, CALLS do
  plans[i] = { kind = pick_kind(), jitter = math.random(0, 400) }
end

local function index_of(to)
  return tonumber(to:match("(%d%d%d%d)$"))
end

local function behaviour(call)
  local i = index_of(call.params.To)
  local p = plans[i]
  p.dials = (p.dials or 0) + 1
  local b = { ring_ms = 200 + p.jitter }
  if LOST then
    b.lost_callbacks = { completed = true }
  end
  if UPDATE_DELAY > 0 then
    b.update_delay_ms = UPDATE_DELAY
  end
  if p.dials > 1 then
    return b -- later attempts: answered, the model reports
  end
  if p.kind == "ring" then
    b.ring_ms = 60000
  elseif p.kind == "retry" then
    b.answer = "busy"
  elseif p.kind == "dialing" then
    b.create_delay_ms = 5000 + p.jitter * 8
  elseif p.kind == "voicelate" then
    b.voice_delay_ms = 3000 + p.jitter * 5
  elseif p.kind == "streamlate" then
    b.stream_delay_ms = 3000 + p.jitter * 5
  elseif p.kind == "hangup" then
    b.hangup_after_ms = 2500 + p.jitter * 3
  end
  return b
end

local function script(session)
  if not session:wait_event("response.create", 10000) then
    return
  end
  local instr = session.config and session.config.instructions or ""
  local kind = instr:match("KIND=(%a+)")
  if kind == "talk" or kind == "hangup" or kind == "voicelate" or kind == "streamlate" then
    session:speak({ ms = 30000, text = "A very long monologue." })
  elseif kind == "goodbye" then
    session:report_and_goodbye({ summary = "All good.", outcome = "success" }, { ms = 8000, text = "Bye bye bye." })
  else
    session:report_and_goodbye({ summary = "Retry ok.", outcome = "success" }, { ms = 100, text = "Bye." })
  end
end

local function world()
  return durable.new({
    behaviour = behaviour,
    script = script,
    hook_ms = HOOK_DELAY, -- a receiver that takes a moment to answer
    retry_ms = 8000,
    config = { call = { goodbyeTimeoutSec = 20 } },
    ready_ms = 20000,
  })
end

local tally = durable.tally

local function scan_log(text, what)
  local bad = {}
  for line in text:gmatch("[^\n]+") do
    if line:find("AddressSanitizer") or line:find("LeakSanitizer") or line:find("runtime error")
      or line:find("stack traceback") or line:find("ERROR") or line:find("attempt to") then
      bad[#bad + 1] = line
    end
  end
  if #bad > 0 then
    T.diag(what .. ": " .. #bad .. " suspicious log lines; first: " .. table.concat(bad, "\n   ", 1, math.min(#bad, 8)))
  end
  return bad
end

T.test(string.format("SIGTERM under load (%s, %d calls, seed %d, update_delay %d, lost %s)",
  MODE, CALLS, SEED, UPDATE_DELAY, tostring(LOST)), function()
  local w = world()
  w.start()
  local ids, kind_of = {}, {}
  local kinds = {}
  local creators = {}
  for i = 1, CALLS do
    creators[#creators + 1] = function()
      local to = string.format("+1415555%04d", i)
      local status, created = w.api("POST", "/v1/calls", { to = to, prompt = "Talk. KIND=" .. plans[i].kind })
      assert(status == 201, "POST /v1/calls " .. tostring(status) .. " " .. json.encode(created))
      ids[i] = created.callId
      kind_of[created.callId] = plans[i].kind
    end
    kinds[plans[i].kind] = (kinds[plans[i].kind] or 0) + 1
  end
  -- Created in batches of 10 in parallel.
  for b = 1, CALLS, 10 do
    local fns = {}
    for i = b, math.min(b + 9, CALLS) do
      fns[#fns + 1] = creators[i]
    end
    task.all(fns)
  end
  T.diag("kinds: " .. tally(kinds))
  -- Most reach a live conversation.
  local live = 0
  T.wait_for(function()
    local st, list = w.api("GET", "/v1/calls?status=in_progress&limit=100")
    live = st == 200 and #list.calls or 0
    return live >= math.floor((kinds.talk or 0) * 0.9)
  end, 30000, "talk calls live")
  timer.sleep(1200) -- goodbyes under way, late dials still waiting, late voice/streams pending
  local before = {}
  for _, id in ipairs(ids) do
    local st, rec = w.api("GET", "/v1/calls/" .. id)
    local s = st == 200 and rec.status or ("http" .. tostring(st))
    before[s] = (before[s] or 0) + 1
  end
  T.diag("at SIGTERM: " .. tally(before))
  local pid = w.app.pid
  local t0 = timer.now()
  local hammer_codes, hammer_stop = {}, false
  if os.getenv("TEST_SHUTDOWN_HAMMER") == "1" then
    for h = 1, 12 do
      task.spawn(function()
        local k = 0
        while not hammer_stop do
          k = k + 1
          local r = (h + k) % 4
          local st, body
          local id = ids[math.random(1, #ids)]
          if r == 0 then
            st, body = w.api("GET", "/v1/calls?limit=100")
          elseif r == 1 then
            st, body = w.api("GET", "/v1/calls/" .. id)
          elseif r == 2 then
            local i = #plans + 1
            plans[i] = { kind = "retry", jitter = 0 }
            st, body = w.api("POST", "/v1/calls", { to = string.format("+1415555%04d", i), prompt = "Talk. KIND=retry" })
            if st == 201 then
              ids[#ids + 1] = body.callId
              kind_of[body.callId] = "late-create"
            end
          else
            st, body = w.api("POST", "/v1/calls/" .. id .. "/hangup")
          end
          local key = ({ "list", "get", "create", "hangup" })[r + 1] .. ":" .. tostring(st)
          hammer_codes[key] = (hammer_codes[key] or 0) + 1
          if st == 500 then
            T.diag("500 from " .. key .. ": " .. json.encode(body))
          end
          if not st then
            timer.sleep(20)
          end
        end
      end)
    end
    timer.sleep(30)
  end
  assert(w.app:kill("SIGTERM"))
  local code
  if MODE == "double" or MODE == "kill" then
    local at = SIG_AT or math.random(50, 6000)
    timer.sleep(at)
    local sig = MODE == "double" and "SIGTERM" or "SIGKILL"
    local running = w.app:running()
    if running then
      w.app:kill(sig)
    end
    T.diag(string.format("%s %d ms into the shutdown (still running: %s)", sig, math.floor(at), tostring(running)))
    code = w.app:wait(15000)
  else
    code = w.app:wait(15000)
  end
  local took = timer.now() - t0
  hammer_stop = true
  if next(hammer_codes) then
    T.diag("hammer: " .. tally(hammer_codes))
  end
  T.diag(string.format("pid %s exited %s after %d ms", tostring(pid), tostring(code), math.floor(took)))
  local first_log = w.app.errtext()
  scan_log(first_log, "first run")
  if MODE == "plain" then
    T.eq(code, 0, "exit 0")
    T.lt(took, 10500, "within the grace")
  end
  -- What the store has after the stop.
  local recs = w.stored()
  local after = {}
  local inprog_kinds = {}
  for _, id in ipairs(ids) do
    local r = recs[id]
    local s = r and r.status or "MISSING"
    after[s] = (after[s] or 0) + 1
    if s == "in_progress" then
      inprog_kinds[kind_of[id]] = (inprog_kinds[kind_of[id]] or 0) + 1
    end
  end
  T.diag("stored after the stop: " .. tally(after))
  if MODE == "plain" and UPDATE_DELAY == 0 then
    T.eq(inprog_kinds, {}, "every answered call ended before the exit (none for the next start to resolve)")
  elseif next(inprog_kinds) then
    T.diag("left in_progress after the stop, by kind: " .. tally(inprog_kinds))
  end
  local shut_reasons = {}
  for _, id in ipairs(ids) do
    local r = recs[id]
    if r and FINAL[r.status] then
      local k = r.status .. "/" .. tostring(r.endReason)
      shut_reasons[k] = (shut_reasons[k] or 0) + 1
    end
  end
  T.diag("final after the stop: " .. tally(shut_reasons))
  local delivered_before = #w.deliveries
  -- Restart on the same store.
  w.start()
  local final_recs = {}
  local ok_all = pcall(T.wait_for, function()
    for _, id in ipairs(ids) do
      if not final_recs[id] then
        local st, rec = w.api("GET", "/v1/calls/" .. id)
        if st == 200 and FINAL[rec.status] then
          final_recs[id] = rec
        end
      end
    end
    for _, id in ipairs(ids) do
      if not final_recs[id] then
        return false
      end
    end
    return true
  end, 90000, "every call final")
  local stuck = {}
  for _, id in ipairs(ids) do
    if not final_recs[id] then
      local st, rec = w.api("GET", "/v1/calls/" .. id)
      stuck[#stuck + 1] = id .. "(" .. kind_of[id] .. "): " .. tostring(rec and rec.status)
    end
  end
  T.eq(stuck, {}, "every call reaches a final state")
  -- Notifications: each final call once.
  pcall(T.wait_for, function()
    for _, id in ipairs(ids) do
      if not w.by_call[id] then
        return false
      end
    end
    return true
  end, 30000, "every call notified")
  timer.sleep(1500)
  local finals, missing, multi, wrong, dups = {}, {}, {}, {}, {}
  for _, id in ipairs(ids) do
    local rec = final_recs[id]
    if rec then
      local k = rec.status .. "/" .. tostring(rec.endReason)
      finals[k] = (finals[k] or 0) + 1
    end
    local keys = w.by_call[id]
    if not keys then
      missing[#missing + 1] = id .. "(" .. kind_of[id] .. ")"
    else
      local n = 0
      for key in pairs(keys) do
        n = n + 1
        if w.by_key[key] > 1 then
          dups[#dups + 1] = key .. " x" .. w.by_key[key]
        end
        if rec and key ~= id .. ":" .. rec.status then
          wrong[#wrong + 1] = key .. " but final " .. rec.status
        end
      end
      if n > 1 then
        local ks = {}
        for key in pairs(keys) do
          ks[#ks + 1] = key
        end
        multi[#multi + 1] = table.concat(ks, " & ")
      end
    end
  end
  T.diag("final: " .. tally(finals))
  T.diag(string.format("deliveries: %d (%d before the restart)", #w.deliveries, delivered_before))
  T.eq(missing, {}, "every final call notified")
  T.eq(multi, {}, "no call notified with two different keys")
  T.eq(wrong, {}, "the key matches the final status")
  if MODE == "plain" then
    T.eq(dups, {}, "a graceful stop: each notification delivered once, not again by the next start")
  elseif #dups > 0 then
    T.diag("same key delivered more than once (receiver dedups by Idempotency-Key): " .. #dups .. ": "
      .. table.concat(dups, ", ", 1, math.min(#dups, 10)))
  end
  -- Twilio: no call dialed twice at once, none left up.
  local by_id = w.dials_by_call()
  local up = {}
  for _, c in ipairs(w.tw.calls) do
    if c.sid and not c.final then
      local id = c.params.Url and c.params.Url:match("callId=([^&]+)")
      up[#up + 1] = (id or "?") .. " " .. tostring(c.status)
    end
  end
  local overlap = {}
  for id, cs in pairs(by_id) do
    table.sort(cs, function(a, b)
      return a.created_at < b.created_at
    end)
    for i = 2, #cs do
      local prev = cs[i - 1]
      if prev.sid and (not prev.ended_at or prev.ended_at > cs[i].created_at) then
        overlap[#overlap + 1] = string.format("%s(%s): dial %d created %.0f ms before dial %d ended", id, kind_of[id],
          i, ((prev.ended_at or math.huge) - cs[i].created_at), i - 1)
      end
    end
  end
  T.eq(overlap, {}, "no call dialed twice at once")
  T.eq(up, {}, "no call left up at Twilio")
  -- Graceful stop of the second run, and a look at its log.
  assert(w.app:kill("SIGTERM"))
  local code2 = w.app:wait(15000)
  T.eq(code2, 0, "second run exits 0")
  local bad1 = scan_log(first_log, "first run (again)")
  local bad2 = scan_log(w.app.errtext(), "second run")
  local sans = {}
  for _, l in ipairs(bad1) do
    if l:find("Sanitizer") or l:find("runtime error") or l:find("traceback") then sans[#sans + 1] = l end
  end
  for _, l in ipairs(bad2) do
    if l:find("Sanitizer") or l:find("runtime error") or l:find("traceback") then sans[#sans + 1] = l end
  end
  T.eq(sans, {}, "no sanitizer report or Lua traceback")
  local dump = os.getenv("TEST_SHUTDOWN_DUMP")
  if dump then
    local f = io.open(dump .. ".run1.log", "w")
    f:write(first_log)
    f:close()
    f = io.open(dump .. ".run2.log", "w")
    f:write(w.app.errtext())
    f:close()
  end
end, { timeout = 240000 })

T.run()
