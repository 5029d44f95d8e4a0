-- callagent.log through child programs: format, levels, redaction, and
-- that a stalled stderr reader never stalls the event loop.
local T = require "testing"
local timer = require "callagent.timer"
local json = require "callagent.json"

local function run(source, env)
  local code, _, p = T.run_app(nil, nil, { source = source, env = env })
  T.eq(code, 0, p.errtext())
  return p.err, p.out
end

T.test("a line is timestamp, level, message, then key=value fields in key order", function()
  local err = run([[
local log = require "callagent.log"
log.info("call started", { to = "+14155550100", call = "c_1", attempt = 2, note = "two words", q = 'say "hi"' })
]])
  T.eq(#err, 1)
  T.match(err[1], "^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%dZ INFO call started ")
  T.match(err[1], ' attempt=2 call=c_1 note="two words" q="say \\"hi\\"" to=%+14155550100$')
end)

T.test("levels: info by default, CALLAGENT_LOG and log.level change it", function()
  local src = [[
local log = require "callagent.log"
log.debug("d1"); log.info("i1"); log.warn("w1"); log.error("e1")
log.level("error")
log.warn("w2"); log.error("e2")
print(log.enabled("debug"), log.level())
]]
  local err, out = run(src)
  T.eq(#err, 4)
  T.match(err[1], "INFO i1")
  T.match(err[2], "WARN w1")
  T.match(err[3], "ERROR e1")
  T.match(err[4], "ERROR e2")
  T.eq(out[1], "false\terror")
  err = run(src, { CALLAGENT_LOG = "debug" })
  T.match(err[1], "DEBUG d1")
  local code, _, p = T.run_app(nil, nil, { source = "print(1)", env = { CALLAGENT_LOG = "loud" } })
  T.eq(code, 2)
  T.match(p.errtext(), "CALLAGENT_LOG must be debug, info, warn or error")
end)

T.test("registered secrets are redacted in every line, from Lua and from C", function()
  local err = run([[
local log = require "callagent.log"
local timer = require "callagent.timer"
log.secret("sk-live-abcdef123456")
log.info("using key sk-live-abcdef123456", { auth = "Bearer sk-live-abcdef123456", ok = "fine" })
timer.after(1, function() error("failed with sk-live-abcdef123456") end)
print(log.redact("sk-live-abcdef123456"), log.redact("short"))
]])
  local all = table.concat(err, "\n")
  T.no_match(all, "sk%-live%-abcdef123456")
  T.match(all, "using key %[redacted%] auth=\"Bearer %[redacted%]\" ok=fine")
  T.match(all, "ERROR uncaught error in timer callback: .*failed with %[redacted%]")
end)

T.test("a secret is redacted in every form a line writes it: quoted, JSON-encoded, both", function()
  -- base64 tokens hold '/' and '+'; cjson writes '/' as '\/'.
  local src = [==[
local log = require "callagent.log"
local secret = 'Ab/9+x"q\\z=tok'
log.secret(secret)
log.info("plain " .. secret, { quoted = "k " .. secret, nested = { v = secret } })
log.warn("in a table", { list = { secret } })
print(#secret)
]==]
  for _, format in ipairs({ "text", "json" }) do
    local err = run(src, { CALLAGENT_LOG_FORMAT = format })
    local all = table.concat(err, "\n")
    T.eq(#err, 2, format)
    T.no_match(all, "Ab", format .. ": no piece of the secret, escaped or not")
    T.no_match(all, "tok", format)
    local _, n = all:gsub("%[redacted%]", "")
    T.eq(n, 4, format .. ": each of the four places is redacted")
    if format == "json" then
      T.eq(json.decode(err[1]).quoted, "k [redacted]")
      T.eq(json.decode(err[2]).list, { "[redacted]" })
    end
  end
end)

T.test("a secret that starts a longer one does not leave the longer one's tail", function()
  local err = run([[
local log = require "callagent.log"
log.secret("token-1234")
log.secret("token-1234-and-more")
log.info("a token-1234-and-more b token-1234 c")
]])
  T.eq(#err, 1)
  T.match(err[1], "INFO a %[redacted%] b %[redacted%] c$")
end)

T.test("two secrets that overlap in a line are redacted whole", function()
  local err = run([[
local log = require "callagent.log"
log.secret("AAAAAAAB")
log.secret("ABCDEFGHIJ")
log.info("x AAAAAAABCDEFGHIJ y")
]])
  T.eq(#err, 1)
  T.match(err[1], "INFO x %[redacted%] y$")
end)

T.test("log.secret refuses a secret under 8 bytes instead of garbling or leaking", function()
  local err, out = run([[
local log = require "callagent.log"
print(pcall(log.secret, "2026"))
print(pcall(log.secret, 12345678))
log.info("2026-11-26 stays")
]])
  T.match(out[1], "^false\t.*at least 8 bytes")
  T.match(out[2], "^false\t.*at least 8 bytes")
  T.match(err[1], "INFO 2026%-11%-26 stays$")
end)

T.test("C lines are whole and redacted however long, and follow the JSON format", function()
  local src = [[
local log = require "callagent.log"
local timer = require "callagent.timer"
log.secret("sk-live-abcdef123456")
timer.after(1, function() error(string.rep("x", 5000) .. " sk-live-abcdef123456 \"q\" \127 end") end)
]]
  local err = run(src)
  local line = table.concat(err, "\n")
  T.no_match(line, "sk%-live")
  T.match(line, "ERROR uncaught error in timer callback: .*x %[redacted%] \"q\" \\x7f end")
  err = run(src, { CALLAGENT_LOG_FORMAT = "json" })
  T.eq(#err, 1, "one JSON line")
  local obj = json.decode(err[1])
  T.eq(obj.level, "error")
  T.match(obj.ts, "Z$")
  T.match(obj.msg, "^uncaught error in timer callback: .*x %[redacted%] \"q\" \127 end")
end)

T.test("a fatal error in app.lua is redacted too, with its traceback's lines", function()
  local src = [[
local log = require "callagent.log"
log.secret("sk-live-abcdef123456")
local function f() error("bad key sk-live-abcdef123456") end
f()
]]
  local code, _, p = T.run_app(nil, nil, { source = src })
  T.eq(code, 1)
  local text = p.errtext()
  T.no_match(text, "sk%-live")
  T.match(text, "ERROR error in .*app%.lua: .*bad key %[redacted%]\nstack traceback:\n")
  code, _, p = T.run_app(nil, nil, { source = src, env = { CALLAGENT_LOG_FORMAT = "json" } })
  T.eq(code, 1)
  T.eq(#p.err, 1, "one JSON line")
  local obj = json.decode(p.err[1])
  T.eq(obj.level, "error")
  T.match(obj.msg, "bad key %[redacted%]\nstack traceback:\n")
end)

T.test("JSON lines stay JSON with DEL and bytes that are not UTF-8", function()
  local err = run([[
require("callagent.log").warn("bad bytes", { path = "/a\127b\255c\226\128\168" })
]], { CALLAGENT_LOG_FORMAT = "json" })
  T.eq(#err, 1)
  T.eq(json.decode(err[1]).path, "/a\127b\239\191\189c\226\128\168", "DEL kept as \\u007f, 0xff as U+FFFD")
  err = run([[
require("callagent.log").warn("bad bytes", { path = "/a\127b\255c\194\155d" })
]])
  T.match(err[1], ' path=/a\\x7fb\\xffc\\xc2\\x9bd$', "text: DEL, a stray byte and C1 CSI escaped")
end)

T.test("JSON lines stay JSON when a secret matches next to an escape: the escape is redacted with it", function()
  -- "\n" then the rest of a secret that starts with "n"; a secret ending in
  -- "\" before an escaped quote; one inside a \u escape's hex digits.
  local err = run([[
local log = require "callagent.log"
log.secret("nabcdefghij")
log.secret("klmnopqr\\")
log.secret("001bstuvwxyz")
log.info("m", { a = "\nabcdefghij", b = 'klmnopqr"}', c = "\27stuvwxyz!", d = "x\\nabcdefghij" })
]], { CALLAGENT_LOG_FORMAT = "json" })
  T.eq(#err, 1)
  local ok, obj = pcall(json.decode, err[1])
  T.ok(ok, "the line is JSON: " .. err[1])
  T.eq(obj.a, "[redacted]")
  T.eq(obj.b, "[redacted]}")
  T.eq(obj.c, "[redacted]!")
  T.eq(obj.d, "x\\[redacted]", "an escaped backslash before it is kept")
  T.no_match(err[1], "abcdefghij")
end)

T.test("JSON lines stay JSON whatever secrets of backslashes, newlines and n's they redact", function()
  -- Secrets and values of three characters that JSON escapes or follows an
  -- escape with: matches start and end inside escapes in every way.
  local err = run([[
local log = require "callagent.log"
math.randomseed(7)
local alpha = { "n", "\n", "\\" }
local function rnd(n)
  local t = {}
  for i = 1, n do
    t[i] = alpha[math.random(#alpha)]
  end
  return table.concat(t)
end
for _ = 1, 40 do
  log.secret(rnd(8))
end
for _ = 1, 2000 do
  log.info(rnd(math.random(20)), { v = rnd(math.random(60)), w = { rnd(10) } })
end
]], { CALLAGENT_LOG_FORMAT = "json" })
  T.eq(#err, 2000)
  local bad, redacted = 0, 0
  for _, line in ipairs(err) do
    bad = bad + (pcall(json.decode, line) and 0 or 1)
    redacted = redacted + (line:find("[redacted]", 1, true) and 1 or 0)
  end
  T.ok(redacted > 100, "secrets were matched: " .. redacted)
  T.eq(bad, 0, "lines that are no JSON")
end)

T.test("an OpenAI key (sk-...) is redacted in every line and by log.scrub, registered or not", function()
  local err, out = run([[
local log = require "callagent.log"
local timer = require "callagent.timer"
local key = "sk-proj-" .. string.rep("Ab3_", 10)
log.info("upstream said: Incorrect API key provided: " .. key, { body = '{"key":"' .. key .. '"}' })
log.info("not keys", { word = "task-" .. string.rep("x", 40), short = "sk-abc", masked = "sk-proj-****Ab3_" })
print(log.scrub("echo " .. key .. "!"))
timer.after(1, function() error("from C: " .. key) end)
]])
  local all = table.concat(err, "\n") .. table.concat(out, "\n")
  T.no_match(all, "Ab3_Ab3_", "no part of the key")
  T.match(err[1], "Incorrect API key provided: %[redacted%] body=")
  T.match(err[2], "word=task%-xxxx")
  T.match(err[2], "short=sk%-abc")
  T.match(err[2], "masked=sk%-proj%-%*%*%*%*Ab3_")
  T.eq(out[1], "echo [redacted]!")
  T.match(all, "from C: %[redacted%]")
end)

T.test("an OpenAI key right after an escaped line break, tab or control character is redacted", function()
  -- The line holds "\nsk-..." (text quoted, JSON): the 'n' of the escape
  -- is no letter of a word the key would be inside of.
  local src = [[
local log = require "callagent.log"
local key = "sk-proj-" .. string.rep("Ab3_", 10)
log.info("upstream", { a = "said:\n" .. key, b = "said:\t" .. key, c = "said:\1" .. key, d = "said:\r" .. key })
]]
  for _, format in ipairs({ "text", "json" }) do
    local err = run(src, { CALLAGENT_LOG_FORMAT = format })
    T.eq(#err, 1, format)
    T.no_match(err[1], "Ab3_Ab3_", format .. ": no part of the key")
    if format == "json" then
      local obj = json.decode(err[1])
      T.eq({ obj.a, obj.b, obj.c, obj.d }, { "said:\n[redacted]", "said:\t[redacted]", "said:\1[redacted]", "said:\r[redacted]" })
    end
  end
end)

T.test("JSON lines stay JSON when a field holds what JSON cannot (NaN, a function, a sparse array)", function()
  local err = run([[
local log = require "callagent.log"
log.info("odd fields", { nan = 0/0, f = { g = print }, sparse = { [1] = 1, [50] = 2 }, ok = "fine" })
]], { CALLAGENT_LOG_FORMAT = "json" })
  T.eq(#err, 1)
  local obj = json.decode(err[1])
  T.eq({ obj.msg, obj.ok, type(obj.nan), type(obj.f), type(obj.sparse) }, { "odd fields", "fine", "string", "string", "string" })
end)

-- Runs the app source with its stderr (JSON lines) read delay_s late into a
-- file; returns that file's text once it ends with the dropped-lines count,
-- whole (the file is written by `cat`, which may still be at it).
local function slow_reader_run(delay_s, source)
  local dir = T.tmpdir()
  local app, out = dir .. "/app.lua", dir .. "/stderr.txt"
  local f = assert(io.open(app, "w"))
  f:write(source)
  f:close()
  local process = require "callagent.process"
  local p = assert(process.spawn({ "bash", "-c", 'exec "$0" run "$1" 2> >(sleep ' .. delay_s .. '; cat > "$2")', T.bin,
    app, out, env = { CALLAGENT_LOG_FORMAT = "json" }, inherit_env = true }))
  T.eq(p:wait(20000), 0)
  local text
  T.wait_for(function()
    local fh = io.open(out)
    text = fh and fh:read("a") or ""
    if fh then
      fh:close()
    end
    return text:find("dropped[^\n]*\n$") ~= nil
  end, 10000, "the dropped count's whole line")
  return text
end

T.test("the count of lines dropped for a slow reader is a log line of the format too", function()
  local text = slow_reader_run(2, [[
local log = require "callagent.log"
local big = string.rep("x", 1000)
for i = 1, 8000 do log.info("flood", { i = i, pad = big }) end
]])
  local last = text:match("([^\n]*dropped[^\n]*)\n?$")
  local obj = json.decode(last)
  T.eq(obj.level, "warn")
  T.match(obj.msg, "^callagent: %d+ log lines dropped %(slow reader%)$")
end)

T.test("a line too long for the queue is dropped whole; one begun is finished: no line runs into the next", function()
  local text = slow_reader_run(1, [[
local log = require "callagent.log"
log.info("BIG " .. string.rep("x", 5 * 1024 * 1024)) -- over the 4 MiB queue
log.info("NEXT line")
log.info("MID " .. string.rep("y", 1024 * 1024)) -- more than the pipe takes at once
log.info("LAST line")
]])
  local lines = {}
  for l in text:gmatch("[^\n]+") do
    lines[#lines + 1] = l
  end
  local msgs = {}
  for _, l in ipairs(lines) do
    local ok, obj = pcall(json.decode, l)
    T.ok(ok, "a JSON line: " .. l:sub(1, 80) .. "..." .. l:sub(-80))
    -- Short messages whole; the long one as its start and length.
    msgs[#msgs + 1] = ok and (#obj.msg > 100 and obj.msg:sub(1, 4) .. "#" .. #obj.msg or obj.msg) or "?"
  end
  T.eq(msgs, { "NEXT line", "MID #" .. (4 + 1024 * 1024), "LAST line", "callagent: 1 log lines dropped (slow reader)" })
end)

T.test("CALLAGENT_LOG_FORMAT other than text or json stops at start", function()
  local code, _, p = T.run_app(nil, nil, { source = "print(1)", env = { CALLAGENT_LOG_FORMAT = "jsno" } })
  T.eq(code, 2)
  T.match(p.errtext(), "CALLAGENT_LOG_FORMAT must be text or json, not 'jsno'")
end)

T.test("log.scrub replaces every registered secret in any string, in each form log.secret registers", function()
  -- For text that is no log line: a vendor's error that echoes our token,
  -- on its way to an API client, a webhook or the store.
  local _, out = run([=[
local log = require "callagent.log"
local function show(s) print((string.format("%q", s):gsub("\\\n", "\\n"))) end
show(log.scrub("nothing yet\0 sk-live-abcdef123456"))
log.secret("sk-live-abcdef123456")
log.secret('Ab/9+x"q\\z=tok')
local encoded = require("cjson").encode('Ab/9+x"q\\z=tok')
show(log.scrub("bad token sk-live-abcdef123456\0then Bearer sk-live-abcdef123456!"))
show(log.scrub("vendor echoed " .. encoded .. " and " .. 'Ab/9+x"q\\z=tok'))
show(log.scrub("no secret \0 here"))
print(log.scrub(nil), log.scrub(12345678), (pcall(log.scrub, {})))
]=])
  T.eq(out, {
    '"nothing yet\\0 sk-live-abcdef123456"',
    '"bad token [redacted]\\0then Bearer [redacted]!"',
    '"vendor echoed \\"[redacted]\\" and [redacted]"',
    '"no secret \\0 here"',
    "nil\t12345678\tfalse",
  })
end)

T.test("log.redact shows only the last 4 characters of long secrets", function()
  local _, out = run([[
local log = require "callagent.log"
print(log.redact("sk-live-abcdef123456"), log.redact("short"), log.redact(nil))
]])
  T.eq(out[1], "…3456\t[redacted]\tnil")
end)

T.test("JSON format writes one JSON object per line", function()
  local err = run([[
local log = require "callagent.log"
log.warn("hello", { n = 3, list = {1, 2} })
]], { CALLAGENT_LOG_FORMAT = "json" })
  T.eq(#err, 1)
  local obj = json.decode(err[1])
  T.eq(obj.level, "warn")
  T.eq(obj.msg, "hello")
  T.eq(obj.n, 3)
  T.eq(obj.list, { 1, 2 })
  T.match(obj.ts, "Z$")
end)

T.test("a field name with a space, '=' or a quote is quoted: it cannot forge another field", function()
  local err = run([[
require("callagent.log").warn("m", { ["a b=c"] = "v", ['q"'] = 1, plain_name = 2, ["x.y-z"] = 3 })
]])
  T.eq(#err, 1)
  T.match(err[1], ' WARN m "a b=c"=v plain_name=2 "q\\""=1 x%.y%-z=3$')
end)

T.test("a multi-line message stays one line", function()
  local err = run([[
require("callagent.log").error("first\nsecond", { tb = "a\nb" })
]])
  T.eq(#err, 1)
  T.match(err[1], "first\\nsecond")
end)

T.test("control characters from outside are escaped: no terminal escapes in a line", function()
  -- As a client's field name reaches the API's warning.
  local err = run([[
require("callagent.log").warn("api: invalid call request", { field = "\27[2J\1t\127z\226\128\168" })
]])
  T.eq(#err, 1)
  T.eq(err[1]:find("[%z\1-\31\127]"), nil, "no control character left")
  T.match(err[1], ' field="?\\x1b%[2J\\x01t\\x7fz\226\128\168"?$', "escaped as \\xNN; UTF-8 kept")
end)

-- Starts the app source with its stderr a pipe that nobody reads (bash
-- process substitution into `sleep`); returns the process (its stdout lines
-- in p.out) once the app printed "ready". Signals go to callagent alone
-- (kill), not to its group, which holds the reader.
local function stuck_reader_app(source)
  local dir = T.tmpdir()
  local app = dir .. "/app.lua"
  local f = assert(io.open(app, "w"))
  f:write(source)
  f:close()
  local out = {}
  local p = assert(require("callagent.process").spawn({
    "bash",
    "-c",
    'exec "$0" run "$1" 2> >(exec sleep 60 >/dev/null)',
    T.bin,
    app,
    on_stdout = function(l)
      out[#out + 1] = l
    end,
    on_stderr = false,
  }))
  p.out = out
  T.defer(function()
    os.execute("kill -s KILL -- -" .. p.pid .. " 2>/dev/null")
  end)
  T.wait_for(function()
    return out[1] == "ready"
  end, 10000, "the app to be ready")
  function p.signal(name)
    T.ok(os.execute("kill -" .. name .. " " .. p.pid), "kill -" .. name)
  end
  return p
end

-- A server kept until shutdown, and 5 MB of lines: more than the pipe and
-- the queue hold.
local FLOOD = [[
local log = require "callagent.log"
local runtime = require "callagent.runtime"
local srv = require("callagent.http").server({})
assert(srv:listen())
runtime.on_shutdown(function()
  print("stopping")
  io.stdout:flush()
  if STALL then require("callagent.timer").sleep(60000) end
  srv:close()
end)
for i = 1, 20000 do log.warn("flood line " .. string.rep("x", 200), { i = i }) end
print("ready")
io.stdout:flush()
]]

T.test("a stderr that nobody reads does not keep SIGTERM from ending the program", function()
  -- The exit's flush of the queued lines waits for the reader a second at
  -- most; it used to wait forever, and so did the loop for its write.
  local p = stuck_reader_app(FLOOD)
  local t0 = timer.now()
  p.signal("TERM")
  local code, why = p:wait(5000)
  T.eq({ code, why }, { 0, nil }, "exit status")
  T.lt(timer.now() - t0, 2500, "ms from SIGTERM to the exit")
end)

T.test("a stderr that nobody reads: a second signal still exits at once with 143", function()
  local p = stuck_reader_app("STALL = true\n" .. FLOOD)
  p.signal("TERM")
  T.wait_for(function()
    return p.out[2] == "stopping"
  end, 5000, "the shutdown handler to run")
  local t0 = timer.now()
  p.signal("TERM")
  local code, why = p:wait(5000)
  T.eq({ code, why }, { 143, nil }, "exit status")
  T.lt(timer.now() - t0, 1000, "ms from the second SIGTERM to the exit")
end)

T.test("a reader that stops reading stderr does not stall the loop", function()
  -- The child's stderr is a pipe that nobody reads (bash process substitution
  -- into `sleep`); it logs 20 MB and measures how late its 10 ms timer fires.
  -- Writes queue (bounded, then dropped and counted) instead of blocking.
  local dir = T.tmpdir()
  local app = dir .. "/flood.lua"
  local f = assert(io.open(app, "w"))
  f:write([[
local log = require "callagent.log"
local timer = require "callagent.timer"
local worst, last = 0, timer.now()
local t = timer.every(10, function()
  local now = timer.now()
  worst = math.max(worst, now - last - 10)
  last = now
end)
local line = string.rep("x", 1000)
local n = 0
local burst
burst = timer.every(5, function()
  for _ = 1, 400 do log.info(line) end
  n = n + 400
  if n >= 20000 then
    burst:stop()
    t:stop()
    io.stdout:write(string.format("worst %.1f dropped %d\n", worst, require("callagent.core.log").dropped()))
    io.stdout:flush()
    require("callagent.core").exit(0)
  end
end)
]])
  f:close()
  local process = require "callagent.process"
  local out = {}
  local p = assert(process.spawn({
    "bash",
    "-c",
    'exec "$0" run "$1" 2> >(sleep 30)',
    T.bin,
    app,
    on_stdout = function(l)
      out[#out + 1] = l
    end,
    on_stderr = false,
  }))
  T.defer(function()
    p:kill("SIGKILL")
  end)
  T.wait_for(function()
    return out[1] ~= nil
  end, 30000, "the child's report")
  local worst, dropped = out[1]:match("worst ([%d.]+) dropped (%d+)")
  T.ok(worst, out[1])
  -- Blocked on the full pipe, the loop would wait for `sleep 30` to exit
  -- (some 30 s); the bound leaves a loaded ASan run room for the bursts' own work.
  T.lt(tonumber(worst), 1000, "timer lateness (ms) while stderr backs up")
  T.gt(tonumber(dropped), 0, "lines past the bounded queue were dropped, not blocked on")
  T.diag("timer lateness under a 20 MB log flood into a stalled reader: " .. worst .. " ms; lines dropped: " .. dropped)
end)


-- log.limited: lines anyone outside can cause as often as they like (a
-- refused webhook, a wrong token) flood neither the log nor the disk.
T.test("log.limited writes the first 5 lines of a kind in a window, then one line with the count when it ends", function()
  local err = run([[
local log = require "callagent.log"
local timer = require "callagent.timer"
log.LIMIT_WINDOW_MS = 150
for i = 1, 50 do
  log.limited("warn", "webhook refused", { reason = "bad signature", remote = "10.0.0." .. i })
end
for i = 1, 3 do
  log.limited("warn", "webhook refused", { reason = "no signature", remote = "10.0.1." .. i })
end
log.limited("debug", "not shown below its level", { reason = "bad signature" })
-- The window's timer writes the count, and the kind starts afresh.
timer.after(400, function()
  log.limited("warn", "webhook refused", { reason = "bad signature", remote = "10.0.2.1" })
end)
]])
  local all = table.concat(err, "\n")
  T.eq(#err, 5 + 3 + 1 + 1, all)
  for i = 1, 5 do
    T.match(err[i], 'WARN webhook refused reason="bad signature" remote=10%.0%.0%.' .. i .. "$")
  end
  for i = 1, 3 do
    T.match(err[5 + i], 'WARN webhook refused reason="no signature" remote=10%.0%.1%.' .. i .. "$")
  end
  -- The last one's fields, and how many were not written.
  T.match(err[9], "WARN webhook refused %(and 45 more like this in the last 0%.[12] s, not logged; the last one's fields "
    .. 'follow%) reason="bad signature" remote=10%.0%.0%.50 suppressed=45$')
  T.match(err[10], 'WARN webhook refused reason="bad signature" remote=10%.0%.2%.1$')
end)

T.test("log.limited: kinds past LIMIT_KINDS share one window, so that reasons a client chooses stay bounded", function()
  local err = run([[
local log = require "callagent.log"
log.LIMIT_KINDS, log.LIMIT_LINES = 3, 2
for i = 1, 20 do
  log.limited("warn", "telnyx webhook refused", { reason = "no webhook to /p" .. i })
end
log.flush()
]])
  local all = table.concat(err, "\n")
  T.eq(#err, 3 + 2 + 1, all)
  for i = 1, 5 do
    T.match(err[i], 'WARN telnyx webhook refused reason="no webhook to /p' .. i .. '"$')
  end
  T.match(err[6], "WARN 15 more lines of other kinds in the last 0 s were not logged %(the last one's fields follow%) "
    .. 'last="telnyx webhook refused" reason="no webhook to /p20" suppressed=15$')
end)

T.test("log.limited: the count is written at the program's shutdown, which does not wait for the window", function()
  local t0 = timer.now()
  local err = run([[
local log = require "callagent.log"
local runtime = require "callagent.runtime"
for i = 1, 30 do
  log.limited("warn", "api: unauthorized request", { path = "/healthz" })
end
-- A 60 s window: the shutdown writes its count, and the timer keeps nothing alive.
runtime.shutdown(0, "test")
]])
  T.lt(timer.now() - t0, 10000, "not held by the window")
  local all = table.concat(err, "\n")
  T.eq(select(2, all:gsub("WARN api: unauthorized request path=/healthz\n", "")), 5, all)
  T.match(all, "WARN api: unauthorized request %(and 25 more like this in the last 0 s, not logged; the last one's "
    .. "fields follow%) path=/healthz suppressed=25")
end)
T.run()
