--- mutate: random edits of a string, for tests that feed code hostile input.
--
--   local mutate = require "mutate"
--   local edit = mutate.new({ '"', "\\", "{" })  -- what to insert, besides random bytes
--   s = edit(s)   -- one edit: a byte replaced, one of those inserted, up to 16
--                 -- bytes deleted, up to 24 repeated, or the rest cut off
--   local near = mutate.near("[]{}\",:")  -- text left near what it was:
--   s = near(s)   -- 1 to 3 one-character edits, each a character replaced
--                 -- by or inserted from those, or one dropped
--   t2 = mutate.shape(t, keep)  -- a copy of the decoded JSON value t with one
--                 -- value somewhere in it replaced by one of another type
--                 -- (or its key removed); keys in `keep` (a set) at the top
--                 -- stay, so the message is still taken for what it was
--   s = mutate.as_text(s)  -- s with each byte that starts no UTF-8 sequence
--                 -- as U+FFFD: a WebSocket text message that is not UTF-8
--                 -- fails its connection (1007) before anything reads it
--
-- It draws from math.random: seed that (math.randomseed) so a failure reproduces.
local M = {}
local cjson = require "cjson"

local function copy(v)
  if type(v) ~= "table" then
    return v
  end
  local c = {}
  for k, x in pairs(v) do
    c[k] = copy(x)
  end
  return setmetatable(c, getmetatable(v))
end

-- Values of every JSON type, and the edges of each.
local function any_value()
  local random = math.random
  local pick = random(1, 15)
  if pick == 1 then
    return cjson.null
  elseif pick == 2 then
    return random(0, 1) == 1
  elseif pick == 3 then
    return ({ 0, -1, 1.5, 2 ^ 53, -2 ^ 63, 1e308 })[random(6)]
  elseif pick == 4 then
    return ""
  elseif pick == 5 then
    return string.rep("A", random(1, 5000))
  elseif pick == 6 then
    return "\0\"\\\n"
  elseif pick == 7 then
    return setmetatable({}, cjson.empty_array_mt)
  elseif pick == 8 then
    return {}
  elseif pick == 9 then
    return { 1, "two", { three = 3 } }
  elseif pick == 10 then
    return { x = { y = { z = {} } } }
  elseif pick == 11 then
    return tostring(random(1, 1e6))
  elseif pick == 12 then
    return "report_call"
  elseif pick == 13 then
    return '{"summary":' .. random(1, 9) .. "}"
  elseif pick == 14 then
    return "not UTF-8: \255\254, a surrogate \237\160\128, cut \226\130"
  end
  return random(-1e6, 1e6)
end

function M.shape(t, keep)
  local random = math.random
  local out = copy(t)
  local node, depth = out, 0
  while true do
    local keys = {}
    for k in pairs(node) do
      if not (depth == 0 and keep and keep[k]) then
        keys[#keys + 1] = k
      end
    end
    if #keys == 0 then
      node[depth == 0 and "extra" or 1] = any_value()
      return out
    end
    table.sort(keys, function(a, b)
      return tostring(a) < tostring(b)
    end)
    local k = keys[random(#keys)]
    if type(node[k]) == "table" and next(node[k]) and random(0, 2) > 0 then
      node, depth = node[k], depth + 1
    else
      node[k] = random(0, 5) > 0 and any_value() or nil
      return out
    end
  end
end

function M.new(inserts)
  local random = math.random
  return function(s)
    local n = #s
    local at = n > 0 and random(0, n - 1) or 0
    local op = random(0, 5)
    if op == 0 then
      return n > 0 and s:sub(1, at) .. string.char(random(0, 255)) .. s:sub(at + 2) or s
    elseif op <= 2 then
      return s:sub(1, at) .. inserts[random(#inserts)] .. s:sub(at + 1)
    elseif op == 3 then
      return s:sub(1, at) .. s:sub(at + random(1, 16) + 1)
    elseif op == 4 then
      return s:sub(1, at + random(1, 24)) .. s:sub(at + 1)
    end
    return s:sub(1, at)
  end
end

function M.near(chars)
  local random = math.random
  return function(s)
    for _ = 1, random(1, 3) do
      local i = random(1, #s + 1)
      local op = random(3)
      if op == 3 then
        s = s:sub(1, i - 1) .. s:sub(i + 1)
      else
        local k = random(1, #chars)
        s = s:sub(1, i - 1) .. chars:sub(k, k) .. s:sub(op == 1 and i + 1 or i)
      end
    end
    return s
  end
end

function M.as_text(s)
  while true do
    local ok, at = utf8.len(s)
    if ok then
      return s
    end
    s = s:sub(1, at - 1) .. "\u{fffd}" .. s:sub(at + 1)
  end
end

return M
