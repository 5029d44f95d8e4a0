--- callagent.json: lua-cjson (Debian's lua-cjson), plus what it lacks.
--
-- Everything of cjson is here (encode, decode, null, encode_* settings), and:
--   json.array([t])        marks t as a JSON array, so an empty one encodes as []
--                          (plain cjson writes every empty table as {})
--   json.try_decode(s)     value, or nil and "EJSON: message" instead of raising
--   json.is_array(t)       whether t was marked with json.array
--   json.check(v, depth)   true when v encodes and nests at most depth tables
--                          deep; else false and why ("is nested deeper than
--                          20 levels", "holds a number JSON cannot hold")
--   json.is_utf8(v)        whether every string in v (keys too, at any depth)
--                          is UTF-8: strict, no overlong forms, surrogates or
--                          values past U+10FFFF (cjson does not check)
--   json.utf8(v)           v with every string in it (keys too, at any depth)
--                          made UTF-8: bytes that start no valid sequence become
--                          U+FFFD (tables are changed in place)
-- and json.encode writes "/" plainly (cjson alone escapes it as "\/").
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
local EMPTY = "\0callagent:empty-array\0"
local EMPTY_JSON_PATTERN = ('"\\u0000callagent:empty-array\\u0000"'):gsub("%p", "%%%0")

function M.array(t)
  return setmetatable(t or {}, array_mt)
end

function M.is_array(t)
  return getmetatable(t) == array_mt
end

-- Returns v with every marked empty array replaced by the EMPTY sentinel, or
-- v itself when it holds none (no copy made).
local function prepare(v, depth)
  if type(v) ~= "table" then
    return v, false
  end
  if depth > 100 then
    error("json: nesting too deep", 0)
  end
  if getmetatable(v) == array_mt and next(v) == nil then
    return EMPTY, true
  end
  local copy
  for k, x in pairs(v) do
    local y, changed = prepare(x, depth + 1)
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
function M.encode(v)
  local p, changed = prepare(v, 0)
  local s = encode(p)
  if changed then
    s = s:gsub(EMPTY_JSON_PATTERN, "[]")
  end
  -- cjson writes "/" as "\/"; every such escape is one, so plain "/" is safe.
  if s:find("\\/", 1, true) then
    s = s:gsub("\\/", "/")
  end
  return s
end

local decode = cjson.decode
function M.try_decode(s)
  if type(s) ~= "string" then
    return nil, "EJSON: expected a string"
  end
  local ok, v = pcall(decode, s)
  if not ok then
    return nil, "EJSON: " .. tostring(v)
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
  local ok = pcall(M.encode, v)
  if not ok then
    return false, "holds a number JSON cannot hold" -- 1e400 decodes as inf
  end
  return true
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
