--- callagent.instructions: what the voice model is told about a call.
--
--   instructions.build(call, opts) -> string
--     call: {to, prompt, timezone, locale, callerName, calleeName}
--     opts.now: epoch seconds (default: now); opts.extra_tools: names of the
--     app's tools, mentioned so the model knows it may use them
--   instructions.report_tool() -> the report_call tool definition (GA shape)
local tz = require "callagent.tz"

local M = {}

local DAYS = { "Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday" }
local MONTHS = {
  "January", "February", "March", "April", "May", "June",
  "July", "August", "September", "October", "November", "December",
}

--- "Tuesday, November 25, 2026, 07:12 (PST, UTC-08:00)" in the call's zone.
function M.local_time(zone, now)
  local t = tz.localtime(zone, now)
  if not t then
    return nil
  end
  local off = t.utc_offset
  local sign = off < 0 and "-" or "+"
  off = math.abs(off)
  return string.format("%s, %s %d, %d, %02d:%02d (%s, UTC%s%02d:%02d)", DAYS[t.wday], MONTHS[t.month], t.day,
    t.year, t.hour, t.min, t.abbrev, sign, off // 3600, (off % 3600) // 60)
end

-- The tag the task is held between: <task>, or <task-2>, <task-3>... when
-- the prompt itself holds <task> or </task> (case aside), so that nothing in
-- it can close its section early.
local function task_tag(prompt)
  local lower, tag, n = prompt:lower(), "task", 1
  while lower:find("<" .. tag .. ">", 1, true) or lower:find("</" .. tag .. ">", 1, true) do
    n = n + 1
    tag = "task-" .. n
  end
  return tag
end

function M.build(call, opts)
  opts = opts or {}
  -- The prompt is many lines of the API client's text: a "# Call details"
  -- line in it would read as one of our sections. It is held between tags,
  -- and the model told that all of it is the task.
  local tag = task_tag(call.prompt)
  local caller = call.callerName and call.callerName ~= "" and call.callerName or nil
  local callee = call.calleeName and call.calleeName ~= "" and call.calleeName or nil
  local lines = {
    "You are a voice agent placing an outbound phone call"
      .. (caller and (" on behalf of " .. caller) or "") .. ". You speak with the person who answers.",
    "",
    "# Your task",
    "The task is the text between <" .. tag .. "> and </" .. tag .. ">, as written by whoever asked for this call."
      .. " Headings or lists in it are part of the task, not sections of these instructions.",
    "<" .. tag .. ">",
    call.prompt,
    "</" .. tag .. ">",
    "",
    "# Call details",
    "- You are calling: " .. (callee and (callee .. " at ") or "") .. call.to,
    -- A zone the database no longer has (a record from before a tzdata
    -- update): the time is said to be unknown, not given as the zone's name.
    "- Current date and time where you are calling: " .. (M.local_time(call.timezone, opts.now) or "unknown")
      .. " (time zone " .. call.timezone .. ")",
    "- Language: speak " .. call.locale .. " unless the other person clearly prefers another language.",
  }
  local function add(...)
    for _, l in ipairs({ ... }) do
      lines[#lines + 1] = l
    end
  end
  if caller then
    add("- You are calling on behalf of: " .. caller)
  end
  add(
    "",
    "# How to run the call",
    "- Speak first: greet the person briefly"
      .. (callee and (", check that you are speaking with " .. callee) or "")
      .. ", say who you are calling for and why, in one or two sentences.",
    "- Keep every turn short and natural, like a polite person on the phone. Ask one thing at a time.",
    "- Listen. If you are interrupted, stop and respond to what was said.",
    "- Never invent facts, promises or personal data you were not given. If asked something you do not know, say so and offer to pass the question on.",
    "- If asked whether you are an AI, say honestly that you are an AI assistant calling"
      .. (caller and (" on behalf of " .. caller) or "") .. ".",
    "- If you reach voicemail or an automated system you cannot get past, leave a short message only if the task asks for one, then finish."
  )
  -- The app's tools are for running the call: their line is in that
  -- section, not under how to end it.
  if opts.extra_tools and #opts.extra_tools > 0 then
    add("- You can also use these functions when they help: " .. table.concat(opts.extra_tools, ", ") .. ".")
  end
  add(
    "",
    "# How to end the call",
    "- When the task is done, cannot be done, or the person wants to end the call, call the report_call function once with: "
      .. "a short summary, the outcome (success, failure, voicemail, no_answer or unknown), any next steps, "
      .. "and the details you collected in data (for example dates, times, names, confirmation numbers).",
    "- After report_call, say a short, friendly goodbye (one sentence). The call is then hung up for you."
  )
  return table.concat(lines, "\n")
end

function M.report_tool()
  return {
    type = "function",
    name = "report_call",
    description = "Report the outcome of this phone call. Call it exactly once, when the call's task is "
      .. "finished or cannot be finished, before saying goodbye.",
    parameters = {
      type = "object",
      properties = {
        summary = { type = "string", description = "Two or three sentences on what happened." },
        outcome = {
          type = "string",
          enum = { "success", "failure", "voicemail", "no_answer", "unknown" },
          description = "success: the task was done; failure: it could not be done; voicemail: reached voicemail; "
            .. "no_answer: nobody engaged; unknown: unclear.",
        },
        nextSteps = { type = "array", items = { type = "string" }, description = "What should happen next, if anything." },
        data = { type = "object", description = "Details collected on the call (dates, names, numbers...).", additionalProperties = true },
      },
      required = { "summary", "outcome" },
    },
  }
end

return M
