-- examples/tools.lua: an app that gives the voice model a tool of its own -
-- looking up an order by number - and reacts to call events. Runs on the mock
-- phone with the local stand-in when no OPENAI_API_KEY is set (the stand-in
-- never calls tools; the real model does when the prompt asks about an order).
-- OPENAI_REALTIME_URL points it at another Realtime endpoint (a proxy, or
-- the tests' fake model).
local callagent = require "callagent"
local standin = require "callagent.standin"
local task = require "callagent.task"
local runtime = require "callagent.runtime"
local log = require "callagent.log"

local ORDERS = {
  ["A-1001"] = { status = "shipped", carrier = "UPS", eta = "Thursday" },
  ["A-1002"] = { status = "processing", eta = "next week" },
}

-- Decimal digits only: tonumber took 0x10 as port 16, 1e3 as 1000.
local port_text = os.getenv("PORT") or "4545"
local port = port_text:find("^%d+$") and math.tointeger(tonumber(port_text))
if not port then
  io.stderr:write("callagent: PORT must be a port number, got '", port_text, "'\n")
  runtime.exit(1)
end
local key = os.getenv("OPENAI_API_KEY")
local local_model = not key or key == ""
local app, err = callagent.app({
  telephony = { provider = "mock" },
  server = { port = port },
  openai = { apiKey = local_model and standin.KEY or key, realtimeUrl = not local_model and os.getenv("OPENAI_REALTIME_URL") ~= ""
    and os.getenv("OPENAI_REALTIME_URL") or nil },
  call = { ringTimeoutSec = 600 },
  store = { backend = "memory" },
})
if not app then
  io.stderr:write("callagent: ", err, "\n") -- a bad PORT or OPENAI_API_KEY: one line, status 1
  runtime.exit(1)
end

app:tool({
  name = "lookup_order",
  description = "Look up one of our orders by its number (like A-1001): status, carrier, expected delivery.",
  parameters = {
    type = "object",
    properties = { number = { type = "string", description = "The order number, e.g. A-1001" } },
    required = { "number" },
  },
  handler = function(args, call)
    log.info("tool lookup_order", { call = call.callId, number = args.number })
    -- The number as the model heard it: "a 1001", "A1001" and "A-1001" are one order.
    local letter, digits = tostring(args.number):upper():gsub("[%s%-]", ""):match("^(%a)(%d+)$")
    local order = letter and ORDERS[letter .. "-" .. digits]
    return order or { error = "no order " .. tostring(args.number) }
  end,
})

app:on("report", function(call, report)
  print(("Call %s reported: %s - %s"):format(call.callId, report.outcome, report.summary))
end)

if local_model then
  app:routes(function(srv)
    standin.mount(srv, "/standin/v1/realtime")
  end)
end

task.spawn(function()
  local ok, err = app:start()
  if not ok and runtime.shutting_down() then
    return -- stopped by a signal while it started: the stop's exit status stands
  end
  if not ok then
    io.stderr:write("callagent: ", err, "\n") -- one line, and exit status 1: it did not start
    runtime.exit(1)
  end
  if local_model then
    app.config.openai.realtimeUrl = app.url:gsub("^http", "ws") .. "/standin/v1/realtime"
  end
  print("callagent with a lookup_order tool on " .. app.url .. " - open " .. app.url .. "/mock/ to place a call")
end)
