--- callagent: the framework's front door.
--
--   local callagent = require "callagent"
--   local app = assert(callagent.app(config))   -- see lua/callagent/app.lua
--   callagent.version
local core = require "callagent.core"

local M = { version = core.version }

function M.app(cfg, opts)
  return require("callagent.app").new(cfg, opts)
end

M.config = function()
  return require "callagent.config"
end

return M
