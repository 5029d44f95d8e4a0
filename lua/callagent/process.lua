--- callagent.process: child programs (tunnels such as ngrok or tailscale, tests).
--
--   local p, err = process.spawn{
--     "ngrok", "http", "4545",        -- program and arguments (strings or numbers)
--     env = { NAME = "value" },        -- replaces the environment (false: leave a name out)
--     inherit_env = true,              -- ... or merges env over callagent's own
--     cwd = "/some/dir",
--     on_stdout = function(line) end, -- each line, without "\n" / "\r\n"
--     on_stderr = function(line) end, -- false: discard the stream (/dev/null)
--     on_exit = function(code, signal) end,
--     stdin = true,                    -- a pipe for p:write (default: /dev/null)
--     max_stdin = 1048576,             -- most bytes queued for stdin (1 MiB)
--     max_line = 65536,                -- longer lines arrive in pieces of this size
--     max_queued = 10000,              -- lines kept for read_line per stream
--     max_queued_bytes = 1048576,      -- ... and bytes of them (1 MiB) per stream
--     kill_on_exit = true,             -- SIGTERM when callagent exits (default true)
--   }
--
-- The program is searched in the PATH that env sets, else in callagent's
-- own PATH; a relative program ("./x") or PATH entry ("bin") is found from
-- cwd, as the child's exec finds it. A child that cannot be started gives nil, "ECODE: message"
-- ("ENOENT: ngrok: not found in PATH", or uv_spawn's error for a bad cwd or an exec
-- that fails, such as a script whose #! interpreter is missing, with or without
-- kill_on_exit);
-- a malformed spec raises.
--
-- Lines are split in C. A final line without newline arrives at EOF.
-- on_exit(code, signal) runs once, after the child exited AND every line of
-- stdout and stderr was delivered: code is the exit status (nil when a signal
-- ended it), signal the signal's name ("SIGTERM") or nil. A child that leaves
-- a grandchild holding its stdout/stderr open is complete only when that one
-- closes them too; p:kill reaches such a grandchild only while it stays in
-- the child's process group (one that ran setsid gets nothing: ESRCH).
--
--   p.pid                      the child's process id
--   p:running()                true until the child has exited
--   p:write(data)              queue data for stdin (never blocks): true, or nil, err
--                              ("EBADF: ..." without stdin = true, "EPIPE: ..." once closed,
--                              "ENOBUFS: ..." when more than max_stdin bytes would be
--                              waiting for a child that does not read: none of data is
--                              taken, stdin stays open, so a write may be retried once
--                              p:buffered() has fallen; a write of more than
--                              max_stdin bytes is refused whatever is queued)
--   p:buffered()               bytes queued for stdin that the child has not taken yet
--   p:close_stdin()            the child reads EOF after the queued data
--   p:kill([signal])           name ("SIGTERM", "KILL") or number, default SIGTERM;
--                              true, or nil, "ESRCH: ..." once it has exited and
--                              nothing is left in its process group
--   p:wait([timeout_ms])       inside a task: waits until complete (as for on_exit);
--                              returns code, signal (nil, "SIGTERM" after a kill),
--                              or nil, "ETIMEDOUT"
--   p:read_line([timeout_ms], [stream])
--                              inside a task, when no on_<stream> callback was
--                              given (stream "stdout", the default, or "stderr"):
--                              the next line, or nil, "EOF" / "ETIMEDOUT"; EOF as
--                              soon as the child closes that stream, even if it runs on
--   p:lines([stream])          iterator over read_line: for line in p:lines() do ... end
--   p.dropped                  lines dropped because max_queued lines, or max_queued_bytes
--                              bytes with this line, were waiting to be read (a line is
--                              counted until read_line returns it; newlines are not); a
--                              line that comes while read_line waits is never dropped:
--                              it waits nowhere (so 0 for either keeps no line waiting
--                              and still gives a waiting read_line each)
--   p.code, p.signal, p.done   the outcome, once complete
--
-- A process keeps running, with its callbacks, when its object is no longer
-- referenced; everything is freed once it is complete. When callagent exits
-- (its loop stops), children with kill_on_exit get SIGTERM (and SIGKILL for
-- what of their groups is left a second later), and so does what such a child
-- that completed left in its group (a grandchild writing to /dev/null, which
-- holds none of its pipes); the others keep running with
-- their pipes closed. runtime.exit() and a forced exit (a second signal) send
-- the SIGTERM only.
local core = require "callagent.core.process"
local task = require "callagent.task"

local M = {}

local Process = {}
Process.__index = Process

local function report(what, err)
  require("callagent.log").error("process " .. what .. " failed", { error = err })
end

-- The line callback for a stream nobody listens to: keep lines for read_line.
local function queued(self, stream, max, max_bytes)
  local q = task.queue(max)
  self._queues[stream] = q
  self._queued_bytes[stream] = 0
  return function(line)
    if q:waiting() > 0 then
      -- A read_line waits (so nothing else does): the line is its at once,
      -- waits nowhere, and counts against neither cap, as max_queued's
      -- queue hands it over too, even with max_queued = 0.
      q:push(line)
      return
    end
    local bytes = self._queued_bytes[stream] + #line
    if bytes > max_bytes or not q:push(line) then
      self.dropped = self.dropped + 1
      return
    end
    self._queued_bytes[stream] = bytes
  end
end

function M.spawn(spec)
  assert(type(spec) == "table", "process.spawn needs a table: { program, args..., options }")
  local self = setmetatable({ dropped = 0, done = false, _queues = {}, _queued_bytes = {}, _waiters = {} }, Process)
  local max = spec.max_queued or 10000
  if math.type(max) ~= "integer" or max < 0 then
    error("process.spawn: max_queued must be an integer >= 0", 2)
  end
  local max_bytes = spec.max_queued_bytes or 1048576
  if math.type(max_bytes) ~= "integer" or max_bytes < 0 then
    error("process.spawn: max_queued_bytes must be an integer >= 0", 2)
  end
  local on_stdout, on_stderr = spec.on_stdout, spec.on_stderr
  if on_stdout == nil then
    on_stdout = queued(self, "stdout", max, max_bytes)
  end
  if on_stderr == nil then
    on_stderr = queued(self, "stderr", max, max_bytes)
  end
  local user_exit = spec.on_exit
  local c, err = core.spawn(spec, on_stdout, on_stderr, function(code, signal)
    self.code, self.signal, self.done = code, signal, true
    for _, q in pairs(self._queues) do
      q:close()
    end
    if user_exit then
      local ok, e = xpcall(user_exit, debug.traceback, code, signal)
      if not ok then
        report("on_exit", e)
      end
    end
    local ws = self._waiters
    self._waiters = {}
    for _, w in ipairs(ws) do
      w(true)
    end
  end, function(stream)
    -- The child closed this stream (it may run on): read_line sees EOF
    -- once the lines before it are read.
    local q = self._queues[stream]
    if q then
      q:close()
    end
  end)
  if not c then
    return nil, err
  end
  self._c = c
  self.pid = c:pid()
  return self
end

function Process:running()
  return self._c:running()
end

function Process:write(data)
  return self._c:write(data)
end

function Process:buffered()
  return self._c:buffered()
end

function Process:close_stdin()
  self._c:close_stdin()
end

function Process:kill(signal)
  return self._c:kill(signal)
end

function Process:wait(timeout_ms)
  if not self.done then
    local finished, err = task.wait_in(self._waiters, timeout_ms)
    if not finished then
      return nil, err
    end
  end
  return self.code, self.signal
end

function Process:read_line(timeout_ms, stream)
  stream = stream or "stdout"
  if stream ~= "stdout" and stream ~= "stderr" then
    error('read_line: stream must be "stdout" or "stderr", not ' .. tostring(stream), 2)
  end
  local q = self._queues[stream]
  if not q then
    error("read_line(" .. stream .. "): the process was spawned with on_" .. stream, 2)
  end
  -- A line that waited gives its bytes back; one handed to this read_line
  -- while it waited was never counted.
  local waited = #q > 0
  local line, err = q:pop(timeout_ms)
  if waited then
    self._queued_bytes[stream] = self._queued_bytes[stream] - #line
  end
  if line == nil and err == "ECLOSED" then
    return nil, "EOF"
  end
  return line, err
end

function Process:lines(stream)
  return function()
    return (self:read_line(nil, stream))
  end
end

function Process:__tostring()
  return string.format("callagent.process (pid %d, %s)", self.pid, self.done and "done" or "running")
end

return M
