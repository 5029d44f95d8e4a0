--- mutate: random edits of a string, for tests that feed code hostile input.
--
--   local mutate = require "mutate"
--   local edit = mutate.new({ '"', "\\", "{" })  -- what to insert, besides random bytes
--   s = edit(s)   -- one edit: a byte replaced, one of those inserted, up to 16
--                 -- bytes deleted, up to 24 repeated, or the rest cut off
--
-- It draws from math.random: seed that (math.randomseed) so a failure reproduces.
local M = {}

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

return M
