-- The REST API's edges found on a second look: what a demanding client
-- sends that the first pass let through.
local T = require "testing"
local kit = require "callkit"
local json = require "callagent.json"

local function env_with(config)
  return kit.start({ twilio = { behaviour = { ring_ms = 10000 } }, config = config })
end

T.test("a blank callerName or calleeName counts as not given: not in the record, the notification or the agent's words", function()
  local env = env_with()
  local notify = require "callagent.notify"
  local instructions = require "callagent.instructions"
  for _, blank in ipairs({ "", "   ", "\194\160\226\128\139" }) do
    local id = env:create({ to = "+14155550170", prompt = "Ask for the hours.", callerName = blank, calleeName = blank })
    local rec = env:get(id)
    T.eq({ rec.callerName, rec.calleeName }, { nil, nil }, json.encode(blank))
    -- What the notification would say: no empty "()" after the number.
    T.no_match(notify.message(rec), "%(", json.encode(blank))
    -- Nor "on behalf of   ." in what the model is told.
    T.no_match(instructions.build(rec), "behalf", json.encode(blank))
  end
  -- A name with text around its spaces is kept as sent.
  local id = env:create({ to = "+14155550170", prompt = "x", calleeName = " Ada " })
  T.eq(env:get(id).calleeName, " Ada ")
  -- Still checked first: a blank name too long, or with a control character, is refused.
  local status, body = env:api("POST", "/v1/calls", { to = "+14155550170", prompt = "x", callerName = string.rep(" ", 121) })
  T.eq({ status, body.error.code, body.error.field }, { 400, "invalid_callerName", "callerName" })
  status, body = env:api("POST", "/v1/calls", { to = "+14155550170", prompt = "x", calleeName = " \t " })
  T.eq({ status, body.error.code, body.error.field }, { 400, "invalid_calleeName", "calleeName" })
end)

T.test("GET /v1/calls refuses a query parameter it does not know (a typo of status would list every call)", function()
  local env = kit.start({ twilio = { behaviour = "busy" }, config = { retry = { maxAttempts = 1 } } })
  local id = env:create({ to = "+14155550171", prompt = "x" })
  env:wait_final(id, 5000)
  for _, q in ipairs({ "?stauts=completed", "?status=busy&page=2", "?limit=5&Status=busy", "?offset=10" }) do
    local status, body = env:api("GET", "/v1/calls" .. q)
    local name = q:match("[?&]([^=&]+)=[^&]*$") -- the last one of each is the unknown one
    T.eq({ status, body.error and body.error.code, body.error and body.error.field }, { 400, "unknown_field", name }, q)
    T.match(body.error.message, name, q)
  end
  -- Of several, the first by name.
  local status, body = env:api("GET", "/v1/calls?zz=1&aa=2")
  T.eq({ status, body.error.field }, { 400, "aa" })
  -- A name that is not UTF-8 is quoted as UTF-8: the body stays JSON a client can read.
  local res
  status, body, res = env:api("GET", "/v1/calls?x%ff=1")
  T.eq({ status, body and body.error.code }, { 400, "unknown_field" })
  T.ok(utf8.len(res.body), "a UTF-8 body")
  -- The known ones, and empty separators, are as before.
  for _, q in ipairs({ "", "?status=busy", "?limit=5&", "?status=busy&limit=1&cursor=", "?&&" }) do
    status, body = env:api("GET", "/v1/calls" .. q)
    T.eq(status, 200, q)
    T.eq(#body.calls, 1, q)
  end
end)


T.test("POST /v1/calls and a hang-up refuse a query parameter (?dryRun=true placed a real call)", function()
  local env = kit.start({ twilio = { behaviour = { ring_ms = 10000 } } })
  local body = '{"to":"+14155550172","prompt":"x"}'
  for _, q in ipairs({ "?dryRun=true", "?test=1&&", "?zz=1&aa=2" }) do
    local status, b = env:api("POST", "/v1/calls" .. q, body)
    T.eq({ status, b.error and b.error.code, b.error and b.error.field }, { 400, "unknown_field", q == "?zz=1&aa=2" and "aa" or q:match("%?(%w+)") }, q)
  end
  T.eq(#env.tw.calls, 0, "nothing dialed")
  -- Empty separators name nothing.
  local status, created = env:api("POST", "/v1/calls?&", body)
  T.eq(status, 201)
  local b
  status, b = env:api("POST", "/v1/calls/" .. created.callId .. "/hangup?force=1")
  T.eq({ status, b.error and b.error.code, b.error and b.error.field }, { 400, "unknown_field", "force" })
  T.eq((env:api("POST", "/v1/calls/" .. created.callId .. "/hangup")), 202)
end)

T.test("the same request with the same Idempotency-Key sent eight times at once makes one call, dialed once", function()
  local env = env_with()
  local task = require "callagent.task"
  local timer = require "callagent.timer"
  local sends = {}
  for i = 1, 8 do
    sends[i] = function()
      local status, body, res = env:api("POST", "/v1/calls", '{"to":"+14155550172","prompt":"Once only."}',
        { ["Idempotency-Key"] = "at-once-1" })
      return { status = status, id = body and body.callId, replayed = res.headers["idempotent-replayed"] }
    end
  end
  local got = { task.all(sends) }
  local ids, replayed = {}, 0
  for i, r in ipairs(got) do
    T.eq(r.status, 201, "request " .. i)
    ids[r.id] = true
    replayed = replayed + (r.replayed == "true" and 1 or 0)
  end
  T.eq(#got, 8)
  local n = 0
  for _ in pairs(ids) do
    n = n + 1
  end
  T.eq({ n, replayed }, { 1, 7 }, "one call, seven replays")
  T.wait_for(function()
    return #env.tw.calls >= 1
  end, 5000)
  timer.sleep(100)
  T.eq(#env.tw.calls, 1, "dialed once")
end)

T.test("a huge unknown field name is quoted cut in the error message and the log line, named whole in field", function()
  -- A 200 KB name made a 400 KB log line (error= and field=) per request.
  local env = env_with()
  local name = string.rep("z", 200000)
  local log_lines = T.log_lines("warn")
  local status, body = env:api("POST", "/v1/calls", '{"to":"+14155550100","prompt":"x","' .. name .. '":1}')
  T.eq({ status, body.error.code, body.error.field == name }, { 400, "unknown_field", true })
  T.lt(#body.error.message, 200, "the message quotes the name cut")
  T.match(body.error.message, "^unknown field 'zzz+…'$")
  -- A name of many-byte characters is cut between two of them: still UTF-8
  -- (64 bytes of 3-byte characters end inside the 22nd: 21 are kept; the
  -- answer's message would be repaired with a U+FFFD, the log's not).
  local wide = string.rep("€", 500)
  status, body = env:api("POST", "/v1/calls", '{"to":"+14155550100","prompt":"x","' .. wide .. '":1}')
  T.eq({ status, body.error.code, body.error.field == wide }, { 400, "unknown_field", true })
  T.eq(body.error.message, "unknown field '" .. string.rep("€", 21) .. "…'")
  T.eq(log_lines[#log_lines].fields.field, string.rep("€", 21) .. "…", "the log line's field, cut the same")
  local logged
  for _, l in ipairs(log_lines) do
    if l.msg == "api: bad request" then
      logged = l.fields
    end
  end
  T.ok(logged, "logged")
  T.lt(#logged.field + #logged.error, 400, "the log line is short")
  -- So is a query parameter's.
  status, body = env:api("GET", "/v1/calls?" .. string.rep("q", 3000) .. "=1")
  T.eq({ status, body.error.code }, { 400, "unknown_field" })
  T.lt(#body.error.message, 300)
end)


T.test("a body that starts with a UTF-8 byte order mark is read as the JSON after it (RFC 8259 8.1)", function()
  local env = env_with()
  local bom = "\239\187\191"
  local status, body = env:api("POST", "/v1/calls", bom .. '{"to":"+14155550173","prompt":"x"}')
  T.eq(status, 201, json.encode(body))
  T.eq(env:get(body.callId).to, "+14155550173")
  -- Only at the start, and only one: anything else is no JSON, as before.
  for _, b in ipairs({ bom, bom .. bom .. "{}", " " .. bom .. "{}", '{"to":' .. bom .. '"+14155550173"}' }) do
    status, body = env:api("POST", "/v1/calls", b)
    T.eq({ status, body.error.code }, { 400, "invalid_json" }, json.encode(b))
  end
  -- A BOM before JSON that is no object is still no object.
  status, body = env:api("POST", "/v1/calls", bom .. "[1]")
  T.eq({ status, body.error.code }, { 400, "invalid_body" })
end)

T.test("a 415 names Content-Type as its field, as the Idempotency-Key errors name theirs", function()
  local env = env_with()
  local status, body = env:api("POST", "/v1/calls", '{"to":"+14155550174","prompt":"x"}', { ["Content-Type"] = "text/plain" })
  T.eq({ status, body.error.code, body.error.field }, { 415, "unsupported_media_type", "Content-Type" })
  status, body = env:api("POST", "/v1/calls", '{"to":"+14155550174","prompt":"x"}', { ["Idempotency-Key"] = "a b" })
  T.eq({ status, body.error.field }, { 400, "Idempotency-Key" })
end)

T.run()
