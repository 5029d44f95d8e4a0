--- callagent.json: lua-cjson (Debian's lua-cjson), plus what it lacks.
--
-- Everything of cjson is here (encode, decode, null, encode_* settings), and:
--   json.array([t])        marks t as a JSON array, so an empty one encodes as []
--                          (plain cjson writes every empty table as {})
--   json.try_decode(s, [arrays])  value, or nil and "EJSON: message" instead of
--                          raising; arrays = true: empty arrays, at any depth,
--                          come back marked (json.array), not as empty tables
--                          that encode as {} (for data of clients and of the
--                          model, kept and written back as given)
--   json.encode_stored(v), json.decode_stored(s)   the store's form: as
--                          encode/decode, and marked empty arrays survive
--   json.is_array(t)       whether t was marked with json.array
--   json.check(v, depth)   true when v encodes and nests at most depth tables
--                          deep; else false and why ("is nested deeper than
--                          20 levels", "holds a number JSON cannot hold",
--                          "holds a sparse array JSON cannot hold", "holds a
--                          function JSON cannot hold", ...)
--   json.is_utf8(v)        whether every string in v (keys too, at any depth)
--                          is UTF-8: strict, no overlong forms, surrogates or
--                          values past U+10FFFF (cjson does not check)
--   json.utf8(v)           v with every string in it (keys too, at any depth)
--                          made UTF-8: bytes that start no valid sequence become
--                          U+FFFD (tables are changed in place)
--   json.without_bom(s)    s without a UTF-8 byte order mark (EF BB BF) at its
--                          start, which RFC 8259 8.1 lets a parser ignore and
--                          some Windows tools write (Notepad, PowerShell 5)
-- and json.encode writes "/" plainly (cjson alone escapes it as "\/"), and
-- every number exactly: cjson writes 14 significant digits (0.12345678901234567
-- became 0.12345678901235, 123456789012345 1.2345678901234e+14); one that
-- needs more is written with as many as it takes (at most 17).
-- Decoding refuses NaN, Infinity and hex numbers, as JSON does.
local cjson = require "cjson"

-- JSON has no NaN or Infinity (cjson reads them by default, then refuses to
-- write them: a record holding one could not be served), nor hex numbers.
cjson.decode_invalid_numbers(false)

local M = {}
for k, v in pairs(cjson) do
  M[k] = v
end

local array_mt = { __name = "json.array" }
-- What goes through cjson in place of an empty array, or of a number it
-- would write inexactly, and is put right in its output. A random part
-- makes them this process's own: a string of a client's is never taken
-- for one. (EMPTY is the stored form's marker, read back by decode_stored.)
local NONCE = require("callagent.crypto").random_token(12)
local EMPTY = "\0callagent:empty-array\0"
local EMPTY_JSON = '"\\u0000callagent:empty-array\\u0000"'
local RUN_EMPTY = "\0callagent:empty:" .. NONCE .. "\0"
local RUN_EMPTY_JSON = '"\\u0000callagent:empty:' .. NONCE .. '\\u0000"'
local RUN_EMPTY_PATTERN = RUN_EMPTY_JSON:gsub("%p", "%%%0")
-- In the stored form, a string of the caller's that starts as a marker does
-- is kept with ESC in front (taken off by decode_stored): no value sent can
-- pass for a marker.
local MARK_PREFIX = "\0callagent:"
local ESC = "\0callagent:esc:"
local NUM = "\0callagent:number:" .. NONCE .. ":"
local NUM_JSON_PATTERN = ('"\\u0000callagent:number:' .. NONCE .. ":"):gsub("%p", "%%%0") .. "([^\\]*)"
  .. ("\\u0000\""):gsub("%p", "%%%0")

function M.array(t)
  return setmetatable(t or {}, array_mt)
end

function M.is_array(t)
  return getmetatable(t) == array_mt
end

local fmt, tonumber, mtype = string.format, tonumber, math.type

-- The shortest text that reads back as x, when cjson's 14 digits do not.
local function exact(x)
  if mtype(x) == "integer" then
    if x >= -99999999999999 and x <= 99999999999999 then
      return nil -- 14 digits
    end
    return fmt("%d", x)
  end
  if x ~= x or x == math.huge or x == -math.huge or tonumber(fmt("%.14g", x)) == x then
    return nil -- cjson writes it right (or refuses it)
  end
  for digits = 15, 17 do
    local s = fmt("%." .. digits .. "g", x)
    if tonumber(s) == x then
      return s
    end
  end
end

--- x as the shortest text that reads back as x: integers (and whole floats:
--- 30.0, as cjson decodes 30, is "30") in digits, others with as many digits
--- as that takes (tostring writes 14: 1/3 would lose its last digits); inf
--- and nan as tostring writes them.
function M.number_text(x)
  local i = math.tointeger(x)
  if i then
    return fmt("%d", i)
  elseif x ~= x or x == math.huge or x == -math.huge then
    return tostring(x)
  end
  return exact(x) or fmt("%.14g", x)
end

-- Returns v with every marked empty array replaced by the EMPTY sentinel and
-- every number cjson would round by a NUM string, or v itself when it holds
-- neither (no copy made).
local function prepare(v, depth, stored)
  if type(v) == "string" then
    if stored and v:byte(1) == 0 and v:sub(1, #MARK_PREFIX) == MARK_PREFIX then
      return ESC .. v, true
    end
    return v, false
  elseif type(v) == "number" then
    local s = exact(v)
    if s then
      return NUM .. s .. "\0", true
    end
    return v, false
  elseif type(v) ~= "table" then
    return v, false
  end
  if depth >= 100 then -- depth counts from 0: this table is the 101st level
    error("json: nesting too deep", 0)
  end
  if getmetatable(v) == array_mt and next(v) == nil then
    return RUN_EMPTY, true
  end
  local copy
  for k, x in pairs(v) do
    local y, changed = prepare(x, depth + 1, stored)
    if changed then
      if not copy then
        copy = {}
        for k2, x2 in pairs(v) do
          copy[k2] = x2
        end
      end
      copy[k] = y
    end
  end
  if copy then
    return copy, true
  end
  return v, false
end

local encode = cjson.encode
local function encode_with(v, empty, stored)
  local p, changed = prepare(v, 0, stored)
  local s = encode(p)
  if changed then
    s = s:gsub(RUN_EMPTY_PATTERN, empty)
    if s:find("u0000callagent:number:", 1, true) then
      s = s:gsub(NUM_JSON_PATTERN, "%1") -- the digits exact() wrote
    end
  end
  -- cjson writes "/" as "\/"; every such escape is one, so plain "/" is safe.
  if s:find("\\/", 1, true) then
    s = s:gsub("\\/", "/")
  end
  return s
end

function M.encode(v)
  return encode_with(v, "[]")
end

-- Empty arrays stay marked: [EMPTY] in the text, turned back into json.array
-- by decode_stored (cjson reads [] as an empty table, like {}).
local EMPTY_STORED = "[" .. EMPTY_JSON .. "]"
function M.encode_stored(v)
  return encode_with(v, EMPTY_STORED, true)
end

local decode = cjson.decode

-- s without the ESC encode_stored put in front of it (s itself if none).
local function unescaped(s)
  return s:sub(1, #ESC) == ESC and s:sub(#ESC + 1) or s
end

-- v with every {mark} in it replaced by a marked empty array (and, with
-- unescape, ESC taken off the strings that have it).
local function restore(v, depth, mark, unescape)
  if depth > 1000 then
    return v
  end
  for k, x in pairs(v) do
    if type(x) == "table" then
      if x[1] == mark and next(x, 1) == nil then
        v[k] = M.array({})
      else
        restore(x, depth + 1, mark, unescape)
      end
    elseif unescape and type(x) == "string" then
      v[k] = unescaped(x)
    end
  end
  return v
end

local function restored(v, mark, unescape)
  if type(v) ~= "table" then
    return (unescape and type(v) == "string") and unescaped(v) or v
  elseif v[1] == mark and next(v, 1) == nil then
    return M.array({})
  end
  return restore(v, 0, mark, unescape)
end

-- s with each [] outside its strings written [RUN_EMPTY] (or s, when none).
-- Only JSON's own whitespace may be inside: "[\f]" stays an error.
local function mark_empty_arrays(s)
  if not s:find("%[[ \t\r\n]*%]") then
    return s, false
  end
  local out, i, pos, changed = {}, 1, 1, false
  while true do
    local a = s:find('["%[]', pos)
    if not a then
      break
    end
    if s:byte(a) == 34 then -- a string: on past its closing quote
      local j = a + 1
      while true do
        local q = s:find('["\\]', j)
        if not q then
          return s, false -- unterminated: decode says so
        end
        if s:byte(q) == 92 then
          j = q + 2
        else
          pos = q + 1
          break
        end
      end
    else
      local e = s:match("^%[[ \t\r\n]*%]()", a)
      if e then
        out[#out + 1] = s:sub(i, a - 1)
        out[#out + 1] = "[" .. RUN_EMPTY_JSON .. "]"
        i, pos, changed = e, e, true
      else
        pos = a + 1
      end
    end
  end
  out[#out + 1] = s:sub(i)
  return table.concat(out), changed
end

function M.without_bom(s)
  if s:sub(1, 3) == "\239\187\191" then
    return s:sub(4)
  end
  return s
end

function M.try_decode(s, arrays)
  if type(s) ~= "string" then
    return nil, "EJSON: expected a string"
  end
  -- cjson's parser stops at a NUL: what follows one would go unread. JSON
  -- has none outside strings, and inside them it is written \u0000.
  if s:find("\0", 1, true) then
    return nil, "EJSON: a NUL byte (JSON writes one as \\u0000, inside a string)"
  end
  local marked, changed = s, false
  if arrays then
    marked, changed = mark_empty_arrays(s)
  end
  local ok, v = pcall(decode, marked)
  if not ok and changed then
    ok, v = pcall(decode, s) -- the error, at its place in what was sent
  end
  if not ok then
    return nil, "EJSON: " .. tostring(v)
  end
  return changed and restored(v, RUN_EMPTY) or v
end

function M.decode_stored(s)
  local v = decode(s)
  if s:find("u0000callagent:", 1, true) then
    v = restored(v, EMPTY, true)
  end
  return v
end

local function deeper(v, depth)
  if type(v) ~= "table" then
    return false
  end
  if depth <= 0 then
    return true
  end
  for _, x in pairs(v) do
    if deeper(x, depth - 1) then
      return true
    end
  end
  return false
end

function M.check(v, depth)
  -- Checked here, with room to spare: encode refuses more than 100 levels,
  -- and records and webhooks put a value a few levels down.
  if deeper(v, depth) then
    return false, "is nested deeper than " .. depth .. " levels"
  end
  local ok, err = pcall(M.encode, v)
  if ok then
    return true
  end
  -- cjson's reasons name no value, only its type; ours say it in words.
  err = tostring(err)
  if err:find("NaN or Inf", 1, true) then
    return false, "holds a number JSON cannot hold" -- 1e400 decodes as inf
  elseif err:find("nesting too deep", 1, true) then
    return false, "is nested deeper than 100 levels"
  elseif err:find("sparse array", 1, true) then
    return false, "holds a sparse array JSON cannot hold"
  elseif err:find("table key must be", 1, true) then
    return false, "holds a key JSON cannot hold (not a string or number)"
  end
  return false, "holds a " .. (err:match("Cannot serialise (%a+)") or "value") .. " JSON cannot hold"
end

local utf8len = utf8.len

function M.is_utf8(v)
  if type(v) == "string" then
    return utf8len(v) ~= nil
  elseif type(v) == "table" then
    for k, x in pairs(v) do
      if not M.is_utf8(k) or not M.is_utf8(x) then
        return false
      end
    end
  end
  return true
end

-- s with each byte that starts no valid UTF-8 sequence replaced by U+FFFD.
local function repair(s)
  local out, i = {}, 1
  while true do
    local ok, bad = utf8len(s, i)
    if ok then
      out[#out + 1] = s:sub(i)
      return table.concat(out)
    end
    out[#out + 1] = s:sub(i, bad - 1)
    out[#out + 1] = "\u{FFFD}"
    i = bad + 1
  end
end

function M.utf8(v)
  if type(v) == "string" then
    return utf8len(v) and v or repair(v)
  elseif type(v) ~= "table" then
    return v
  end
  local fixed
  for k, x in pairs(v) do
    local k2, x2 = M.utf8(k), M.utf8(x)
    if k2 ~= k or x2 ~= x then
      fixed = fixed or {}
      fixed[#fixed + 1] = { k, k2, x2 }
    end
  end
  for _, f in ipairs(fixed or {}) do
    v[f[1]] = nil
    v[f[2]] = f[3]
  end
  return v
end

return M
