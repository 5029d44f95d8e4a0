--- callagent.log: leveled, one line per event, never blocking the loop.
--
--   log.info("call started", { call = id, to = number })
--   log.debug(...) / log.info(...) / log.warn(...) / log.error(...)
--   log.level("debug")          set the minimum level (default: CALLAGENT_LOG or info)
--   log.enabled("debug")        cheap check before building expensive fields
--   log.format("json")          "text" (default) or "json" (CALLAGENT_LOG_FORMAT)
--   log.secret(s)               from now on s is written as [redacted] in every line
--                               (at least 8 bytes; also its escaped forms)
--   log.redact(s)               a safe display form of a secret: "[redacted]" or
--                               "…" plus its last 4 characters for long values
--   log.scrub(s)                s with every secret registered (in each form
--                               log.secret registers), and anything shaped like
--                               an OpenAI key (sk-...), replaced by "[redacted]",
--                               as in a log line: for text that leaves by another
--                               way (an API answer, a webhook, the store); s itself
--                               when it holds none; nil stays nil
--   log.limited(level, msg, fields[, kind])
--                               a line anyone outside can cause as often as they
--                               like (a refused webhook, a wrong token): as
--                               log[level](msg, fields), but of each kind (msg and
--                               fields.reason unless kind is given) only the first
--                               log.LIMIT_LINES (5) in log.LIMIT_WINDOW_MS (60 s) are
--                               written; the rest are counted, and one line at the
--                               window's end says how many, with the last one's fields
--   log.flush()                 writes those counts now (the app's stop calls it)
--
-- Text lines look like
--   2026-11-25T14:22:04.123Z INFO call started call=c_1 to=+14155550100
-- with values quoted when they hold spaces, quotes or '=' (field names when they
-- hold anything but letters, digits, '_', '.' and '-'). Fields are written
-- in sorted key order. Writing goes through callagent.core.log, which queues
-- what a slow stderr reader has not taken (bounded) instead of blocking.
local core = require "callagent.core.log"

local M = {}

local LEVELS = { debug = 0, info = 1, warn = 2, error = 3 }
local NAMES = { [0] = "DEBUG", "INFO", "WARN", "ERROR" }
local json_mode = core.format() == "json" -- the host read CALLAGENT_LOG_FORMAT
local cjson -- loaded on first JSON line or secret

local function level_of(name)
  local n = LEVELS[name]
  if not n then
    error("log level must be debug, info, warn or error, not " .. tostring(name), 3)
  end
  return n
end

function M.level(name)
  if name ~= nil then
    core.level(level_of(name))
  end
  return NAMES[core.level()]:lower()
end

function M.enabled(name)
  return core.enabled(level_of(name))
end

function M.format(f)
  if f ~= nil then
    if f ~= "text" and f ~= "json" then
      error("log format must be text or json", 2)
    end
    core.format(f)
    json_mode = f == "json"
  end
  return json_mode and "json" or "text"
end

-- How quote() writes a value's inside: backslash escapes, no quotes around.
local function quoted_inside(s)
  return (s:gsub('[\\"]', "\\%0"):gsub("\n", "\\n"):gsub("\r", "\\r"):gsub("\t", "\\t"))
end

function M.secret(s)
  if type(s) ~= "string" or #s < 8 then
    error("log.secret: expected a string of at least 8 bytes (a shorter one would redact ordinary text)", 2)
  end
  -- A line holds a value as written, quoted (text), JSON-encoded (JSON
  -- lines, tables in text lines) or both: each form is redacted.
  cjson = cjson or require "cjson"
  local encoded = cjson.encode(s):sub(2, -2)
  for _, form in ipairs({ s, quoted_inside(s), encoded, quoted_inside(encoded) }) do
    core.add_secret(form)
  end
  return s
end

function M.redact(s)
  if s == nil or s == "" then
    return s
  end
  s = tostring(s)
  if #s >= 16 then
    return "…" .. s:sub(-4)
  end
  return "[redacted]"
end

function M.scrub(s)
  if s == nil then
    return nil
  end
  return core.scrub(s)
end

local function quote(v)
  local s = tostring(v)
  if s == "" or s:find('[%s"=\\]') then
    s = '"' .. quoted_inside(s) .. '"'
  end
  return s
end

local function text_line(level, msg, fields)
  local parts = { core.timestamp(), " ", NAMES[level], " ", tostring(msg) }
  if fields then
    local keys = {}
    for k in pairs(fields) do
      keys[#keys + 1] = tostring(k)
    end
    table.sort(keys)
    for _, k in ipairs(keys) do
      local v = fields[k]
      if type(v) == "table" then
        cjson = cjson or require "cjson"
        local ok, s = pcall(cjson.encode, v)
        v = ok and s or tostring(v)
      end
      -- A name that is not plain is quoted as a value is: "a b=c" would
      -- read as two fields.
      local name = k:find("^[%w_.%-]+$") and k or '"' .. quoted_inside(k) .. '"'
      parts[#parts + 1] = " " .. name .. "=" .. quote(v)
    end
  end
  return table.concat(parts)
end

local function json_line(level, msg, fields)
  cjson = cjson or require "cjson"
  local obj = { ts = core.timestamp(), level = NAMES[level]:lower(), msg = tostring(msg) }
  if fields then
    for k, v in pairs(fields) do
      if obj[k] == nil then
        local t = type(v)
        obj[k] = (t == "string" or t == "number" or t == "boolean" or t == "table") and v or tostring(v)
      end
    end
  end
  local ok, s = pcall(cjson.encode, obj)
  if ok then
    return s
  end
  -- A value JSON cannot hold (NaN, a function in a table, a sparse array):
  -- that field is written as text, the line stays JSON.
  for k, v in pairs(obj) do
    if not pcall(cjson.encode, v) then
      obj[k] = tostring(v)
    end
  end
  return cjson.encode(obj)
end

local function writer(level)
  return function(msg, fields)
    if not core.enabled(level) then
      return
    end
    core.write(level, json_mode and json_line(level, msg, fields) or text_line(level, msg, fields))
  end
end

M.debug = writer(0)
M.info = writer(1)
M.warn = writer(2)
M.error = writer(3)

-- Lines anyone outside can cause ----------------------------------------------
--
-- A kind's window starts with its first line and ends LIMIT_WINDOW_MS later,
-- on a timer that does not keep the program alive: then a line says how many
-- were not written (none if none were), and the kind starts afresh. At most
-- LIMIT_KINDS kinds have a window at once (a reason may quote a path, which
-- a client chooses): lines of a new kind past them share one more window,
-- "other kinds". Memory and lines are so bounded whatever arrives: per
-- window, LIMIT_LINES + 1 lines of each of LIMIT_KINDS + 1 kinds.
M.LIMIT_WINDOW_MS = 60000
M.LIMIT_LINES = 5
M.LIMIT_KINDS = 100

local ctimer -- callagent.core.timer, required on first use
local windows, nwindows = {}, 0 -- kind -> {level, since, logged, more, msg, fields, timer}
local OTHER = {} -- the key of the window of kinds past LIMIT_KINDS

local function seconds(ms)
  local s = math.floor(ms / 100 + 0.5) / 10
  return s == math.floor(s) and string.format("%d", s) or string.format("%.1f", s)
end

-- Ends a kind's window: the count of lines not written, if any.
local function close_window(key)
  local w = windows[key]
  if not w then
    return
  end
  windows[key], nwindows = nil, nwindows - 1
  w.timer:stop()
  if w.more == 0 then
    return
  end
  local fields = {}
  for k, v in pairs(w.fields or {}) do
    fields[k] = v
  end
  fields.suppressed = w.more
  local span = seconds(ctimer.now() - w.since)
  local msg
  if key == OTHER then
    fields.last = w.msg
    msg = string.format("%d more lines of other kinds in the last %s s were not logged (the last one's fields follow)",
      w.more, span)
  else
    msg = string.format("%s (and %d more like this in the last %s s, not logged; the last one's fields follow)",
      w.msg, w.more, span)
  end
  M[w.level](msg, fields)
end

function M.limited(level, msg, fields, kind)
  if not core.enabled(level_of(level)) then
    return
  end
  if kind == nil then
    kind = msg
    if type(fields) == "table" and fields.reason ~= nil then
      kind = kind .. "\0" .. tostring(fields.reason)
    end
  end
  kind = level .. "\0" .. tostring(kind)
  local key = kind
  if not windows[key] and nwindows >= M.LIMIT_KINDS then
    key = OTHER
  end
  local w = windows[key]
  if not w then
    ctimer = ctimer or require "callagent.core.timer"
    w = { level = level, since = ctimer.now(), logged = 0, more = 0 }
    w.timer = ctimer.start(math.max(1, math.floor(M.LIMIT_WINDOW_MS)), 0, function()
      close_window(key)
    end)
    w.timer:unref()
    windows[key], nwindows = w, nwindows + 1
  end
  if w.logged < M.LIMIT_LINES then
    w.logged = w.logged + 1
    -- Looked up now: what replaced log[level] (a test's) sees these lines.
    return M[level](msg, fields)
  end
  w.more, w.msg, w.fields = w.more + 1, msg, fields
  if key == OTHER then
    w.level = level
  end
end

function M.flush()
  for key in pairs(windows) do
    close_window(key)
  end
end

return M
