local T = require "testing"
local process = require "callagent.process"
local core = require "callagent.core"
local timer = require "callagent.timer"
local task = require "callagent.task"

-- Runs argv (a spec table) to completion, collecting stdout and stderr lines.
local function run(spec)
  local out, err = {}, {}
  spec.on_stdout = spec.on_stdout or function(line)
    out[#out + 1] = line
  end
  spec.on_stderr = spec.on_stderr or function(line)
    err[#err + 1] = line
  end
  local p = assert(process.spawn(spec))
  local code, signal = p:wait(10000)
  return { out = out, err = err, code = code, signal = signal, p = p }
end

-- Whether a pid is gone: no /proc entry, or a zombie nobody has reaped yet
-- (the container's init may not reap orphans).
local function pid_gone(pid)
  local f = io.open("/proc/" .. pid .. "/stat")
  if not f then
    return true
  end
  local stat = f:read("a") or ""
  f:close()
  local state = stat:match("^%d+ %b() (%a)")
  return state == nil or state == "Z" or state == "X"
end

T.test("stdout and stderr lines arrive separately and in order", function()
  local r = run({ "/bin/sh", "-c", "echo a; echo b >&2; echo c; echo d >&2; echo e" })
  T.eq(r.out, { "a", "c", "e" })
  T.eq(r.err, { "b", "d" })
  T.eq(r.code, 0)
  T.eq(r.signal, nil)
end)

T.test("a final line without newline is delivered, CRLF is stripped, empty lines are kept", function()
  local r = run({ "printf", "one\r\ntwo\n\nlast" })
  T.eq(r.out, { "one", "two", "", "last" })
end)

T.test("lines longer than max_line arrive in pieces of max_line", function()
  local r = run({ "printf", "abcdefghij\nabcd\r\nxy\nabcdefgh", max_line = 4 })
  T.eq(r.out, { "abcd", "efgh", "ij", "abcd", "xy", "abcd", "efgh" })
end)

T.test("exit codes 0 and 3 are reported with no signal", function()
  local ok = run({ "/bin/sh", "-c", "exit 0" })
  T.eq(ok.code, 0)
  T.eq(ok.signal, nil)
  local three = run({ "/bin/sh", "-c", "exit 3" })
  T.eq(three.code, 3)
  T.eq(three.signal, nil)
  T.eq(three.p.code, 3)
  T.eq(three.p.done, true)
end)

T.test("on_exit runs after every line was delivered", function()
  local lines, at_exit, args = 0, nil, nil
  local p = assert(process.spawn({
    "/bin/sh",
    "-c",
    "i=0; while [ $i -lt 2000 ]; do echo line $i; i=$((i+1)); done; echo tail >&2",
    on_stdout = function()
      lines = lines + 1
    end,
    on_exit = function(code, signal)
      at_exit = lines
      args = { code = code, signal = signal }
    end,
  }))
  T.eq(p:wait(10000), 0)
  T.eq(at_exit, 2000, "lines seen when on_exit ran")
  T.eq(args, { code = 0 })
  T.eq(p:read_line(100, "stderr"), "tail", "stderr is queued when only on_stdout is given")
end)

T.test("on_exit and wait come after output written after the child exited (grandchild)", function()
  local order = {}
  local p = assert(process.spawn({
    "/bin/sh",
    "-c",
    "(sleep 0.2; echo late) & exit 5",
    on_stdout = function(l)
      order[#order + 1] = l
    end,
    on_exit = function(code)
      order[#order + 1] = "exit " .. code
    end,
  }))
  T.wait_for(function()
    return not p:running()
  end, 5000, "the shell to exit")
  T.eq(order, {}, "nothing delivered while the pipe is open")
  T.eq(p:wait(5000), 5)
  T.eq(order, { "late", "exit 5" })
end)

T.test("env replaces the environment unless inherit_env merges it", function()
  local r = run({ "env", env = { FOO = "bar", N = 42 } })
  table.sort(r.out)
  T.eq(r.out, { "FOO=bar", "N=42" })

  local m = run({ "env", env = { FOO = "bar", CALLAGENT_BIN = false }, inherit_env = true })
  local seen = {}
  for _, l in ipairs(m.out) do
    local k, v = l:match("^([^=]+)=(.*)$")
    if k then -- a value with newlines spans several lines
      seen[k] = v
    end
  end
  T.eq(seen.FOO, "bar")
  T.eq(seen.PATH, os.getenv("PATH"), "inherited PATH")
  T.ok(os.getenv("CALLAGENT_BIN"), "the runner sets CALLAGENT_BIN")
  T.eq(seen.CALLAGENT_BIN, nil, "false removes an inherited name")
end)

T.test("cwd sets the child's working directory, a missing one fails with ENOENT", function()
  local dir = T.tmpdir()
  local r = run({ "pwd", cwd = dir })
  T.eq(r.out, { core.realpath(dir) })
  local p, err = process.spawn({ "pwd", cwd = dir .. "/missing" })
  T.eq(p, nil)
  T.match(err, "^ENOENT: ")
  -- A relative program is not blamed for a cwd the child cannot enter.
  for _, k in ipairs({ true, false }) do
    p, err = process.spawn({ "./missing", cwd = dir .. "/missing", kill_on_exit = k })
    T.eq(p, nil)
    T.match(err, "^ENOENT: .*starting %./missing in ")
    p, err = process.spawn({ "./missing", cwd = "/etc/passwd", kill_on_exit = k })
    T.eq(p, nil)
    T.match(err, "^ENOTDIR: ")
  end
end)

T.test("a program that does not exist gives nil, ENOENT", function()
  local p, err = process.spawn({ "no-such-program-callagent-test" })
  T.eq(p, nil)
  T.match(err, "^ENOENT: .*no%-such%-program")
  local p2, err2 = process.spawn({ "/nonexistent/bin/prog" })
  T.eq(p2, nil)
  T.match(err2, "^ENOENT: ")
end)

T.test("an exec that fails after the checks (a script whose #! interpreter is missing) gives nil, ENOENT, through the kill_on_exit wrapper too", function()
  local dir = T.tmpdir()
  local f = assert(io.open(dir .. "/script.sh", "w"))
  f:write("#!/nonexistent/interpreter\necho hi\n")
  f:close()
  assert(os.execute("chmod +x " .. dir .. "/script.sh"))
  for _, k in ipairs({ true, false }) do
    local p, err = process.spawn({ dir .. "/script.sh", kill_on_exit = k })
    T.eq(p, nil, "kill_on_exit " .. tostring(k))
    T.eq(err, "ENOENT: no such file or directory (starting " .. dir .. "/script.sh)", "kill_on_exit " .. tostring(k))
  end
end)

T.test("a directory or a file without x given by path gives EACCES, whatever failed before", function()
  local dir = T.tmpdir()
  local f = assert(io.open(dir .. "/script.sh", "w"))
  f:write("#!/bin/sh\necho hi\n")
  f:close()
  for _, first in ipairs({ "/nonexistent/bin/prog", dir .. "/script.sh" }) do
    process.spawn({ first }) -- a failure of its own (ENOENT, EACCES) just before
    local p, err = process.spawn({ dir })
    T.eq(p, nil)
    T.eq(err, "EACCES: " .. dir .. ": not executable", "a directory, after " .. first)
  end
  local p, err = process.spawn({ dir .. "/script.sh" })
  T.eq(p, nil)
  T.eq(err, "EACCES: " .. dir .. "/script.sh: not executable")
  local p2, err2 = process.spawn({ "script.sh", env = { PATH = dir } })
  T.eq(p2, nil)
  T.eq(err2, "EACCES: script.sh: not executable in PATH")
end)

T.test("misuse raises: empty spec, bad callbacks, bad env, unknown signal", function()
  T.raises(function()
    process.spawn({})
  end, "program")
  T.raises(function()
    process.spawn({ "true", on_stdout = 1 })
  end, "function or false")
  T.raises(function()
    process.spawn({ "true", env = { ["A=B"] = "x" } })
  end, "env names")
  -- A NUL would cut what the program gets, silently.
  T.raises(function()
    process.spawn({ "echo", "a\0b" })
  end, "spec%[2%] holds a NUL byte")
  T.raises(function()
    process.spawn({ "true", env = { FOO = "a\0b" } })
  end, "env value of 'FOO' holds a NUL byte")
  local p = assert(process.spawn({ "sleep", "10" }))
  T.defer(function()
    p:kill("KILL")
  end)
  T.raises(function()
    p:kill("SIGNOPE")
  end, "unknown signal")
end)

T.test("a max_queued that is not a count raises at spawn, not at every line", function()
  T.raises(function()
    process.spawn({ "true", max_queued = "10" })
  end, "max_queued must be an integer >= 0")
end)

T.test("read_line of a stream that is neither stdout nor stderr names the two", function()
  local p = assert(process.spawn({ "true" }))
  T.raises(function()
    p:read_line(10, "stdin")
  end, 'stream must be "stdout" or "stderr"')
  p:wait(5000)
end)

T.test("an env name or a cwd holding a NUL byte raises (C would cut it there, silently)", function()
  T.raises(function()
    process.spawn({ "true", env = { ["A\0B"] = "x" } })
  end, "env name holds a NUL byte")
  T.raises(function()
    process.spawn({ "true", cwd = "/tmp\0/missing" })
  end, "cwd holds a NUL byte")
end)

T.test("a relative program and relative PATH entries are found from cwd, as the child's exec finds them", function()
  local dir = T.tmpdir()
  assert(os.execute("mkdir " .. dir .. "/bin && printf '#!/bin/sh\\necho ran\\n' > " .. dir
    .. "/bin/tool && chmod +x " .. dir .. "/bin/tool"))
  for _, k in ipairs({ true, false }) do
    local p, err = process.spawn({ "./missing", cwd = dir, kill_on_exit = k })
    T.eq(p, nil, "kill_on_exit " .. tostring(k))
    T.eq(err, "ENOENT: ./missing: not found", "kill_on_exit " .. tostring(k))
    local r = run({ "tool", cwd = dir, env = { PATH = "bin" }, kill_on_exit = k })
    T.eq({ r.out, r.code }, { { "ran" }, 0 }, "PATH=bin, kill_on_exit " .. tostring(k))
  end
end)

T.test("stdin writes reach cat and come back; close_stdin ends it", function()
  local p = assert(process.spawn({ "/bin/cat", stdin = true }))
  T.eq(p:write("hello\n"), true)
  T.eq(p:read_line(5000), "hello", "echoed before stdin closes")
  T.eq(p:write("wor"), true)
  T.eq(p:write("ld"), true)
  p:close_stdin()
  local ok, err = p:write("late")
  T.eq(ok, nil)
  T.match(err, "^EPIPE")
  T.eq(p:read_line(5000), "world")
  local v, e = p:read_line(5000)
  T.eq(v, nil)
  T.eq(e, "EOF")
  T.eq(p:wait(5000), 0)
end)

T.test("write without stdin = true fails with EBADF", function()
  local p = assert(process.spawn({ "/bin/cat" }))
  local ok, err = p:write("x")
  T.eq(ok, nil)
  T.match(err, "^EBADF")
  T.eq(p:wait(5000), 0, "cat reads /dev/null and ends")
end)

T.test("a large stdin write (4 MB, under max_stdin) is queued without blocking and arrives whole", function()
  local bytes = 0
  local p = assert(process.spawn({
    "/bin/sh",
    "-c",
    "wc -c",
    stdin = true,
    max_stdin = 8 * 1024 * 1024,
    on_stdout = function(l)
      bytes = tonumber(l)
    end,
  }))
  local chunk = string.rep("x", 1024 * 1024)
  local t0 = timer.now()
  for _ = 1, 4 do
    T.eq(p:write(chunk), true)
  end
  T.lt(timer.now() - t0, 500, "write returned at once")
  p:close_stdin()
  T.eq(p:wait(10000), 0)
  T.eq(bytes, 4 * 1024 * 1024)
end)

T.test("a child that does not read stdin: writes past max_stdin queued bytes fail with ENOBUFS, stdin stays open", function()
  local bytes
  local p = assert(process.spawn({
    "/bin/sh",
    "-c",
    "sleep 0.3; wc -c",
    stdin = true,
    max_stdin = 256 * 1024,
    on_stdout = function(l)
      bytes = tonumber(l)
    end,
  }))
  local chunk = string.rep("x", 64 * 1024)
  local sent, ok, err = 0, nil, nil
  for _ = 1, 100 do -- 6.4 MB if nothing stops it
    ok, err = p:write(chunk)
    if not ok then
      break
    end
    sent = sent + #chunk
  end
  T.eq(ok, nil, "a write was refused")
  T.match(err, "^ENOBUFS")
  T.le(p:buffered(), 256 * 1024, "queued bytes stay under max_stdin")
  T.gt(p:buffered(), 256 * 1024 - #chunk, "queued up to the limit")
  ok, err = p:write(string.rep("y", 256 * 1024 + 1))
  T.eq(ok, nil)
  T.match(err, "^ENOBUFS", "a write larger than max_stdin")
  T.wait_for(function()
    return p:buffered() == 0
  end, 5000, "the queue to drain once the child reads")
  T.eq(p:write(chunk), true, "stdin is still open")
  sent = sent + #chunk
  p:close_stdin()
  T.eq(p:wait(5000), 0)
  T.eq(bytes, sent, "every accepted byte arrived, none of a refused write")
end)

T.test("a write larger than max_stdin says so, not that the child is not reading (no retry can pass)", function()
  local p = assert(process.spawn({ "cat", stdin = true, max_stdin = 1000, on_stdout = false }))
  local ok, err = p:write(string.rep("y", 1001))
  T.eq(ok, nil)
  T.eq(err, "ENOBUFS: a write of 1001 bytes is over max_stdin (1000): split it")
  T.eq(p:write(string.rep("y", 1000)), true, "one of max_stdin bytes is taken")
  p:close_stdin()
  T.eq(p:wait(5000), 0)
end)

T.test("writing to a child that closed its stdin gives EPIPE, no SIGPIPE, and the child runs on", function()
  -- The child says when its stdin is closed: a fixed sleep lost the race on a
  -- loaded machine (the write was queued before the shell ran exec <&-).
  local p = assert(process.spawn({ "/bin/sh", "-c", "exec <&-; echo closed; sleep 0.3; echo alive", stdin = true }))
  T.eq(p:read_line(5000), "closed")
  local ok, err = p:write(string.rep("x", 100000))
  T.eq(ok, nil)
  T.match(err, "^EPIPE")
  ok, err = p:write("x")
  T.eq(ok, nil)
  T.match(err, "^EPIPE", "later writes")
  T.eq(p:read_line(2000), "alive")
  T.eq(p:wait(2000), 0)
end)

T.test("read_line gives EOF when the child closes stdout but keeps running", function()
  local p = assert(process.spawn({ "/bin/sh", "-c", "echo one; exec >&-; sleep 5" }))
  T.defer(function()
    p:kill("KILL")
  end)
  T.eq(p:read_line(2000), "one")
  local t0 = timer.now()
  local v, err = p:read_line(2000)
  T.eq(v, nil)
  T.eq(err, "EOF")
  T.lt(timer.now() - t0, 1000, "at the EOF, not at a timeout")
  T.eq(p:running(), true)
end)

T.test("kill of sleep 100 ends it with SIGTERM quickly; a second kill gives ESRCH", function()
  local exit_args
  local p = assert(process.spawn({
    "sleep",
    "100",
    on_exit = function(code, signal)
      exit_args = { code = code, signal = signal }
    end,
  }))
  T.eq(p:running(), true)
  T.gt(p.pid, 0)
  local t0 = timer.now()
  T.eq(p:kill(), true)
  local code, signal = p:wait(5000)
  T.lt(timer.now() - t0, 1000, "exit observed quickly")
  T.eq(code, nil)
  T.eq(signal, "SIGTERM")
  T.eq(exit_args, { signal = "SIGTERM" })
  T.eq(p:running(), false)
  local ok, err = p:kill()
  T.eq(ok, nil)
  T.match(err, "^ESRCH")
end)

T.test("kill takes signal names and numbers", function()
  local p = assert(process.spawn({ "sleep", "100" }))
  T.eq(p:kill("KILL"), true)
  T.eq(select(2, p:wait(5000)), "SIGKILL")
  local q = assert(process.spawn({ "sleep", "100" }))
  T.eq(q:kill(2), true)
  T.eq(select(2, q:wait(5000)), "SIGINT")
end)

T.test("wait with a timeout returns nil, ETIMEDOUT and can wait again", function()
  local p = assert(process.spawn({ "sleep", "100" }))
  local t0 = timer.now()
  local v, err = p:wait(50)
  T.eq(v, nil)
  T.eq(err, "ETIMEDOUT")
  T.ge(timer.now() - t0, 45)
  T.lt(timer.now() - t0, 1000)
  p:kill()
  T.eq(select(2, p:wait(5000)), "SIGTERM")
  T.eq(select(2, p:wait(1)), "SIGTERM", "wait after completion returns at once")
end)

T.test("read_line times out, then reads lines, then EOF; lines() iterates", function()
  local p = assert(process.spawn({ "/bin/sh", "-c", "sleep 0.2; echo one; echo two" }))
  local v, err = p:read_line(20)
  T.eq(v, nil)
  T.eq(err, "ETIMEDOUT")
  local got = {}
  for line in p:lines() do
    got[#got + 1] = line
  end
  T.eq(got, { "one", "two" })
  T.eq(select(2, p:read_line()), "EOF")
  T.eq(p:wait(1000), 0)
end)

T.test("max_queued drops lines nobody reads and counts them", function()
  local p = assert(process.spawn({ "seq", "1", "100", max_queued = 10 }))
  T.eq(p:wait(5000), 0)
  T.eq(p.dropped, 90)
  T.eq(p:read_line(), "1")
  T.eq(p:read_line(), "2")
end)

T.test("long lines nobody reads are kept up to max_queued_bytes (1 MiB by default), the rest dropped and counted", function()
  -- 40 lines of 60000 bytes: 17 fit in 1 MiB (1020000 bytes), an 18th would not.
  local p = assert(process.spawn({ "/bin/sh", "-c",
    "s=$(head -c 60000 /dev/zero | tr '\\0' x); i=0; while [ $i -lt 40 ]; do echo $s; i=$((i + 1)); done" }))
  T.eq(p:wait(5000), 0)
  T.eq(p.dropped, 23)
  local kept = 0
  for line in p:lines() do
    T.eq(#line, 60000)
    kept = kept + 1
  end
  T.eq(kept, 17)
  -- A small cap; a line read gives its bytes back.
  p = assert(process.spawn({ "/bin/sh", "-c", "echo 1234; echo 5678; read x; echo 9abc", stdin = true, max_queued_bytes = 6 }))
  T.wait_for(function()
    return p.dropped == 1
  end, 2000, "5678 dropped: 1234 waits, and 8 bytes would pass 6")
  T.eq(p:read_line(2000), "1234")
  p:write("go\n")
  T.eq(p:read_line(2000), "9abc", "a line read makes room")
  T.eq(p:wait(2000), 0)
  T.eq(p.dropped, 1)
  p = assert(process.spawn({ "seq", "1", "100", max_queued_bytes = 10 }))
  T.eq(p:wait(5000), 0)
  T.eq(p.dropped, 91, "1 to 9 (9 bytes) kept, 10 would pass 10 bytes, the rest drop too")
  T.raises(function()
    process.spawn({ "true", max_queued_bytes = "10" })
  end, "max_queued_bytes must be an integer >= 0")
end)

T.test("lines handed straight to a waiting read_line count nothing against max_queued_bytes", function()
  -- 200 lines of 10 bytes, 2000 in all, past a 100-byte cap: each one finds read_line waiting.
  local p = assert(process.spawn({ "/bin/sh", "-c", "i=0; while [ $i -lt 200 ]; do echo 0123456789; i=$((i + 1)); done",
    max_queued_bytes = 100 }))
  local n = 0
  for line in p:lines() do
    T.eq(line, "0123456789")
    n = n + 1
  end
  T.eq(n, 200, "every line read")
  T.eq(p.dropped, 0)
  T.eq(p:wait(5000), 0)
end)

T.test("max_queued_bytes = 0 keeps no line waiting, yet a read_line waiting gets each line, as max_queued = 0 does", function()
  for _, cap in ipairs({ "max_queued_bytes", "max_queued" }) do
    local p = assert(process.spawn({ "/bin/sh", "-c", "echo first; read x; echo second; read x; echo third",
      stdin = true, [cap] = 0 }))
    T.eq(p:read_line(2000), "first", cap .. ": read_line waits before the line comes")
    p:write("\n")
    T.eq(p:read_line(2000), "second", cap)
    p:write("\n")
    T.wait_for(function()
      return p.dropped == 1
    end, 2000, cap .. ": third dropped, as nobody waits for it")
    T.eq(select(2, p:read_line(2000)), "EOF", cap)
    T.eq(p:wait(2000), 0)
  end
  -- A line longer than the cap, with read_line waiting for it, is read too.
  local p = assert(process.spawn({ "echo", "0123456789", max_queued_bytes = 4 }))
  T.eq(p:read_line(2000), "0123456789")
  T.eq(p.dropped, 0)
  T.eq(p:wait(2000), 0)
end)

T.test("on_stdout = false discards the output", function()
  local p = assert(process.spawn({ "seq", "1", "100000", on_stdout = false }))
  T.eq(p:wait(5000), 0)
  T.raises(function()
    p:read_line()
  end, "on_stdout")
end)

T.test("1 MB of output through the pipe arrives complete", function()
  -- 16384 lines of 63 digits and a newline: exactly 1 MiB.
  local bytes, lines, bad = 0, 0, 0
  local p = assert(process.spawn({
    "/bin/sh",
    "-c",
    "yes 012345678901234567890123456789012345678901234567890123456789012 | head -c 1048576",
    on_stdout = function(l)
      bytes = bytes + #l + 1
      lines = lines + 1
      if #l ~= 63 then
        bad = bad + 1
      end
    end,
  }))
  T.eq(p:wait(10000), 0)
  T.eq(bytes, 1048576)
  T.eq(lines, 16384)
  T.eq(bad, 0, "lines of the wrong length")
end)

T.test("1 MB on one line arrives in max_line pieces", function()
  local total, pieces = 0, 0
  local p = assert(process.spawn({
    "/bin/sh",
    "-c",
    "head -c 1048576 /dev/zero | tr '\\0' x",
    max_line = 100000,
    on_stdout = function(l)
      total = total + #l
      pieces = pieces + 1
    end,
  }))
  T.eq(p:wait(10000), 0)
  T.eq(total, 1048576)
  T.eq(pieces, 11)
end)

T.test("50 concurrent short processes all complete with their own output", function()
  local fns = {}
  for i = 1, 50 do
    fns[i] = function()
      local p = assert(process.spawn({ "/bin/sh", "-c", 'echo "$0"; exit $(($0 % 4))', i }))
      local line = p:read_line(10000)
      local code = p:wait(10000)
      return { line = line, code = code }
    end
  end
  local results = { task.all(fns) }
  T.eq(#results, 50)
  for i = 1, 50 do
    T.eq(results[i], { line = tostring(i), code = i % 4 }, "process " .. i)
  end
end)

T.test("an unreferenced running process keeps running, its callbacks fire, fds are released", function()
  local fds_before = #core.listdir("/proc/self/fd")
  local lines, codes = {}, {}
  for i = 1, 20 do
    process.spawn({
      "/bin/sh",
      "-c",
      "sleep 0.1; echo done $0",
      i,
      stdin = true,
      on_stdout = function(l)
        lines[#lines + 1] = l
      end,
      on_exit = function(code)
        codes[#codes + 1] = code
      end,
    })
  end
  collectgarbage()
  collectgarbage()
  T.wait_for(function()
    return #codes == 20
  end, 5000, "all exits")
  T.eq(#lines, 20)
  collectgarbage()
  collectgarbage()
  timer.sleep(20) -- close callbacks run on the next loop turns
  T.eq(#core.listdir("/proc/self/fd"), fds_before, "open fds")
end)

-- A pid a child printed: there, and killed at the test's end whatever happens.
local function watch_pid(pid, what)
  T.ok(pid, what)
  T.defer(function()
    os.execute("kill -9 " .. tostring(pid) .. " 2>/dev/null")
  end)
end

local function wait_gone(pid)
  T.wait_for(function()
    return pid_gone(pid)
  end, 3000, "process " .. pid .. " to end")
end

-- Starts a child callagent with script text: the process and its stderr lines.
local function start_child(script, env)
  local dir = T.tmpdir()
  local path = dir .. "/child.lua"
  local f = assert(io.open(path, "w"))
  f:write(script)
  f:close()
  local err = {}
  local p = assert(process.spawn({
    T.bin,
    "run",
    path,
    env = env,
    inherit_env = env ~= nil,
    on_stderr = function(l)
      err[#err + 1] = l
    end,
  }))
  return p, err
end

-- Runs a child callagent with script text; returns the pid it prints, its
-- exit code and its stderr lines.
local function child_callagent(script, env)
  local p, err = start_child(script, env)
  local line = p:read_line(10000)
  local pid = tonumber(line) or line
  local code = p:wait(10000)
  return pid, code, err
end

T.test("a kill after the child exited still reaches what it started and holds its output (a grandchild ignoring SIGTERM)", function()
  local lines = {}
  local p = assert(process.spawn({ "sh", "-c", "(trap '' TERM; sleep 100) & echo $!; exit 0",
    on_stdout = function(l)
      lines[#lines + 1] = l
    end }))
  T.wait_for(function()
    return lines[1] ~= nil and not p:running()
  end, 5000, "the wrapper to print the grandchild's pid and exit")
  local pid = tonumber(lines[1])
  watch_pid(pid, "the grandchild's pid")
  local code, err = p:wait(300)
  T.eq({ code, err }, { nil, "ETIMEDOUT" }, "not over: the grandchild holds stdout")
  T.eq(p:kill("SIGTERM"), true, "the group still has a member")
  timer.sleep(200)
  T.eq(pid_gone(pid), false, "SIGTERM ignored")
  T.eq(p:kill("SIGKILL"), true)
  wait_gone(pid)
  T.eq(p:wait(5000), 0, "the wrapper's status, once the pipe is closed")
  local ok, e = p:kill()
  T.eq(ok, nil)
  T.match(e, "^ESRCH", "nothing left to signal")
end)

T.test("a kill after the child completed still reaches what it left in its group holding none of its pipes", function()
  local p = assert(process.spawn({ "sh", "-c", "sleep 100 >/dev/null 2>&1 & echo $!" }))
  local pid = tonumber(p:read_line(5000))
  watch_pid(pid, "the grandchild's pid")
  T.eq(p:wait(5000), 0, "complete: the grandchild holds no pipe")
  T.eq(pid_gone(pid), false)
  T.eq(p:kill(), true, "the group still has a member")
  wait_gone(pid)
end)

T.test("kill_on_exit: what a completed child left in its group holding no pipes gets SIGTERM at callagent's exit, SIGKILL a second later", function()
  local dir = T.tmpdir()
  local t0 = timer.now()
  local pid, code, err = child_callagent(string.format([[
    local process = require "callagent.process"
    local timer = require "callagent.timer"
    require("callagent.task").spawn(function()
      -- The grandchild notes the SIGTERM and runs on; its output goes to /dev/null.
      local p = assert(process.spawn{ "sh", "-c",
        "sh -c 'trap \"echo term > %s/got\" TERM; echo $$ > %s/ready; while :; do sleep 0.05; done' >/dev/null 2>&1 &" })
      assert(p:wait(5000) == 0)
      local pid
      for _ = 1, 200 do
        local f = io.open("%s/ready")
        pid = f and f:read("l")
        if f then f:close() end
        if pid then break end
        timer.sleep(10)
      end
      io.stdout:write(assert(pid, "the grandchild ready"), "\n"); io.stdout:flush()
      require("callagent.core").stop(0)
    end)
  ]], dir, dir, dir))
  watch_pid(pid, "child printed the grandchild's pid")
  T.eq(code, 0)
  T.lt(timer.now() - t0, 4000, "callagent's exit waited about a second, no more")
  local f = io.open(dir .. "/got")
  T.eq(f and f:read("l"), "term", "the grandchild got SIGTERM")
  if f then
    f:close()
  end
  T.match(table.concat(err, "\n"), "process group %d+ still running 1000 ms after SIGTERM at exit: SIGKILL")
  wait_gone(pid)
end)

-- A kept group that empties, whose id then goes to a process of someone
-- else's leading a group of its own. Made deterministic in a pid namespace
-- of the test's own (unshare, as an unprivileged user too), where
-- /proc/sys/kernel/ns_last_pid gives the next process that id; where
-- namespaces cannot be made (unprivileged user namespaces off) it is
-- skipped, with a "# skipped" line.
local function reused_group_id(kill_first)
  if not os.execute("unshare --user --map-root-user --pid --fork --mount-proc true >/dev/null 2>&1") then
    T.diag("skipped: unshare cannot make a user and pid namespace here")
    return nil
  end
  local dir = T.tmpdir()
  local f = assert(io.open(dir .. "/child.lua", "w"))
  f:write(string.format([[
local process = require "callagent.process"
local timer = require "callagent.timer"
local dir, kill_first = %q, %s
local function gone(pid)
  local f = io.open("/proc/" .. pid .. "/stat")
  if f then f:close() end
  return f == nil
end
require("callagent.task").spawn(function()
  -- The child leaves a member in its group, holding none of its pipes, and completes.
  local p = assert(process.spawn({ "sh", "-c", "sleep 100 >/dev/null 2>&1 & echo $!" }))
  local member = assert(p:read_line(5000))
  assert(p:wait(5000) == 0)
  -- The member ends and is reaped (by sh, this namespace's init): the group's id is free.
  os.execute("kill -9 " .. member)
  for _ = 1, 300 do
    if gone(member) then break end
    timer.sleep(10)
  end
  assert(gone(member), "the member reaped")
  -- That id again, for a process not of process.spawn's that leads a group of its own.
  -- (os.execute: no child of process.spawn completes meanwhile, whose completion prunes the kept groups.)
  assert(os.execute("echo " .. (p.pid - 1) .. " > /proc/sys/kernel/ns_last_pid; " ..
    "setsid sh -c 'trap \"echo term > " .. dir .. "/got; exit\" TERM; echo $$ > " .. dir .. "/ready; " ..
    "while :; do sleep 0.05; done' >/dev/null 2>&1 &"))
  local other
  for _ = 1, 300 do
    local f = io.open(dir .. "/ready")
    other = f and tonumber(f:read("l"))
    if f then f:close() end
    if other then break end
    timer.sleep(10)
  end
  print(other == p.pid and "reused" or ("not reused: " .. tostring(other) .. " for " .. p.pid))
  if kill_first then
    local ok, err = p:kill()
    print(ok and "kill: true" or "kill: " .. err:match("^%%u+"))
    timer.sleep(200)
  end
  local g = io.open(dir .. "/got")
  print(g and "the other group got SIGTERM" or "the other group untouched")
  if g then g:close() end
  require("callagent.core").stop(0)
end)
]], dir, tostring(kill_first)))
  f:close()
  local out, err = {}, {}
  local p = assert(process.spawn({ "unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc",
    "sh", "-c", '"$0" run "$1"; exit $?', T.bin, dir .. "/child.lua",
    on_stdout = function(l)
      out[#out + 1] = l
    end,
    on_stderr = function(l)
      err[#err + 1] = l
    end }))
  T.eq(p:wait(10000), 0, table.concat(err, "\n"))
  -- At the namespace's end its processes are SIGKILLed: a SIGTERM in got came from callagent.
  local g = io.open(dir .. "/got")
  if g then
    g:close()
  end
  return out, g ~= nil, table.concat(err, "\n")
end

T.test("a kept group whose id a process of someone else's now has (it emptied first) gets no p:kill: ESRCH", function()
  local out, got = reused_group_id(true)
  if out then
    T.eq(out, { "reused", "kill: ESRCH", "the other group untouched" })
    T.eq(got, false, "no SIGTERM at callagent's exit either")
  end
end)

T.test("kill_on_exit: a kept group whose id a process of someone else's now has gets no SIGTERM at callagent's exit", function()
  local out, got, err = reused_group_id(false)
  if out then
    T.eq(out, { "reused", "the other group untouched" })
    T.eq(got, false, "the process leading the other group got no SIGTERM")
    T.no_match(err, "SIGKILL")
  end
end)

T.test("kill_on_exit: a child of callagent gets SIGTERM when callagent exits", function()
  local pid, code, err = child_callagent([[
    local process = require "callagent.process"
    -- A stdin pipe with a write queued (sleep never reads it) and line
    -- callbacks: teardown must cancel and free all of it.
    local p = assert(process.spawn{ "sleep", "100", stdin = true, max_stdin = 8 * 1024 * 1024, on_stdout = print })
    assert(p:write(string.rep("x", 4 * 1024 * 1024)))
    io.stdout:write(p.pid, "\n"); io.stdout:flush()
    require("callagent.core").stop(0)
  ]])
  watch_pid(pid, "child printed the sleep pid")
  T.eq(code, 0)
  T.eq(err, {}, "child stderr")
  wait_gone(pid)
end)

T.test("kill_on_exit also covers children whose object was collected before exit", function()
  local pid, code, err = child_callagent([[
    local core = require "callagent.core.process"
    local p = assert(core.spawn({ "sleep", "100" }))
    io.stdout:write(p:pid(), "\n"); io.stdout:flush()
    p = nil
    collectgarbage(); collectgarbage()
    require("callagent.core").stop(0)
  ]])
  watch_pid(pid, "child printed the sleep pid")
  T.eq(code, 0)
  T.eq(err, {}, "child stderr")
  wait_gone(pid)
end)

T.test("kill_on_exit reaches what the child started itself (a wrapper that does not exec)", function()
  local pid, code, err = child_callagent([[
    local process = require "callagent.process"
    local p = assert(process.spawn{ "sh", "-c", "sleep 100 & echo $!; wait", on_stdout = function(l)
      io.stdout:write(l, "\n"); io.stdout:flush()
      require("callagent.core").stop(0)
    end })
  ]])
  watch_pid(pid, "child printed the grandchild's pid")
  T.eq(code, 0)
  T.eq(err, {}, "child stderr: no SIGKILL was needed (see the next test)")
  wait_gone(pid)
end)

T.test("kill_on_exit: what ignores SIGTERM is SIGKILLed a second after callagent's exit", function()
  local t0 = timer.now()
  local pid, code, err = child_callagent([[
    local process = require "callagent.process"
    -- The grandchild prints its pid once it ignores SIGTERM, then becomes sleep.
    local p = assert(process.spawn{ "sh", "-c", "sh -c 'trap \"\" TERM; echo $$; exec sleep 100' & wait",
      on_stdout = function(l)
        io.stdout:write(l, "\n"); io.stdout:flush()
        require("callagent.core").stop(0)
      end })
  ]])
  watch_pid(pid, "child printed the grandchild's pid")
  T.eq(code, 0)
  T.lt(timer.now() - t0, 4000, "callagent's exit waited about a second, no more")
  T.match(table.concat(err, "\n"), "still running 1000 ms after SIGTERM at exit: SIGKILL")
  wait_gone(pid)
end)

T.test("a second signal, which exits at once, still stops the children", function()
  local pid, code = child_callagent([[
    local process = require "callagent.process"
    local runtime = require "callagent.runtime"
    local timer = require "callagent.timer"
    local p = assert(process.spawn{ "sleep", "100" })
    runtime.on_shutdown(function() timer.sleep(20000) end) -- a slow graceful stop
    io.stdout:write(p.pid, "\n"); io.stdout:flush()
    timer.after(100, function() os.execute("kill -TERM " .. runtime.pid()) end)
    timer.after(600, function() os.execute("kill -TERM " .. runtime.pid()) end)
  ]])
  watch_pid(pid, "child printed the sleep pid")
  T.eq(code, 128 + 15)
  wait_gone(pid)
end)

T.test("SIGHUP (the terminal closed) stops callagent gracefully, and its children with it", function()
  -- The children have sessions of their own: the terminal's SIGHUP reaches
  -- only callagent, which must not just die of it.
  local pid, code = child_callagent([[
    local process = require "callagent.process"
    local runtime = require "callagent.runtime"
    local timer = require "callagent.timer"
    local p = assert(process.spawn{ "sleep", "100" })
    runtime.on_shutdown(function() end)
    io.stdout:write(p.pid, "\n"); io.stdout:flush()
    timer.after(100, function() os.execute("kill -HUP " .. runtime.pid()) end)
  ]])
  watch_pid(pid, "child printed the sleep pid")
  T.eq(code, 0, "a graceful stop")
  wait_gone(pid)
end)

T.test("a child inherits none of callagent's sockets: not an HTTP client's keep-alive connection", function()
  local http = require "callagent.http"
  local fetch = require "callagent.fetch"
  local srv = http.server({ host = "127.0.0.1", port = 0 })
  srv:get("/x", function()
    return 200, "ok"
  end)
  assert(srv:listen())
  T.defer(function()
    srv:close()
  end)
  local res = assert(fetch("http://127.0.0.1:" .. srv.port .. "/x"))
  T.eq(res.status, 200) -- its connection stays open, for the next request
  local fds = {}
  local p = assert(process.spawn({ "ls", "/proc/self/fd", on_stdout = function(l)
    fds[#fds + 1] = tonumber(l)
  end }))
  T.eq(p:wait(5000), 0)
  table.sort(fds)
  T.eq(fds, { 0, 1, 2, 3 }, "stdio, and ls's own listing")
end)

T.test("drop_secrets: the child inherits no variable that holds a secret of the log's", function()
  local pid, code, err = child_callagent([[
    local process = require "callagent.process"
    local log = require "callagent.log"
    require("callagent.task").spawn(function()
      log.secret("sk-proc-secret-123456")
      local seen = {}
      for _, drop in ipairs({ true, false }) do
        local p = assert(process.spawn{ "sh", "-c", 'echo "${OPENAI_API_KEY:-unset} ${PLAIN:-unset}"',
          drop_secrets = drop, on_stdout = function(l) seen[#seen + 1] = l end })
        p:wait(5000)
      end
      io.stdout:write(table.concat(seen, "|"), "\n"); io.stdout:flush()
      require("callagent.core").stop(0)
    end)
  ]], { OPENAI_API_KEY = "sk-proc-secret-123456", PLAIN = "plain-value" })
  T.eq(code, 0, table.concat(err, "\n"))
  T.eq(pid, "unset plain-value|sk-proc-secret-123456 plain-value")
end)

T.test("kill_on_exit: the child ends even when callagent is killed with SIGKILL (no teardown)", function()
  local p = start_child([[
    local process = require "callagent.process"
    local a = assert(process.spawn{ "sleep", "100" })
    local b = assert(process.spawn{ "sleep", "100", kill_on_exit = false })
    io.stdout:write(a.pid, " ", b.pid, "\n"); io.stdout:flush()
    require("callagent.timer").after(60000, function() end) -- alive until killed
  ]])
  local line = p:read_line(10000)
  local a, b = (line or ""):match("^(%d+) (%d+)$")
  watch_pid(a, "child printed the pids")
  watch_pid(b, "child printed the pids")
  T.wait_for(function()
    local comm = io.open("/proc/" .. a .. "/comm")
    local name = comm and comm:read("l")
    if comm then
      comm:close()
    end
    return name == "sleep"
  end, 3000, "the program to run under the pid given (the wrapper execs it)")
  p:kill("SIGKILL")
  p:wait(5000)
  wait_gone(a)
  timer.sleep(100)
  T.eq(pid_gone(b), false, "kill_on_exit = false: still running")
end)

-- A copy of callagent in dir .. bin_at, with CALLAGENT_PATH set, running app (its arg[1] is dir).
local function run_copy(dir, bin_at, app)
  local bin = dir .. bin_at
  T.eq(os.execute("mkdir -p \"$(dirname '" .. bin .. "')\" && cp '" .. T.bin .. "' '" .. bin .. "'"), true)
  local f = assert(io.open(dir .. "/app.lua", "w"))
  f:write(app)
  f:close()
  return run({ bin, "run", dir .. "/app.lua", dir, env = { CALLAGENT_PATH = T.root .. "/lua" }, inherit_env = true })
end

-- A callagent-pdeathsig at path that notes each start in dir/used and then is the real one.
local function noting_wrapper(dir, path)
  local real = T.bin:match("^(.*)/") .. "/callagent-pdeathsig"
  T.eq(os.execute("mkdir -p \"$(dirname '" .. path .. "')\""), true)
  local f = assert(io.open(path, "w"))
  f:write("#!/bin/sh\necho \"$*\" >> '" .. dir .. "/used'\nexec '" .. real .. "' \"$@\"\n")
  f:close()
  T.eq(os.execute("chmod 755 '" .. path .. "'"), true)
end

local function lines_of(path)
  local f = io.open(path)
  if not f then
    return {}
  end
  local t = {}
  for l in f:lines() do
    t[#t + 1] = l
  end
  f:close()
  return t
end

T.test("children start after callagent's binary was replaced or removed (an upgrade under a running process)", function()
  -- A copy alone (no callagent-pdeathsig beside it): callagent is its own wrapper.
  local m = run_copy(T.tmpdir(), "/callagent", [[
    local process = require "callagent.process"
    local task = require "callagent.task"
    assert(os.remove(arg[1] .. "/callagent"))
    task.spawn(function()
      local p = assert(process.spawn({ "sh", "-c", "echo child ran", on_stdout = print }))
      print("exit " .. tostring(p:wait(5000)))
    end)
  ]])
  T.eq(m.code, 0)
  T.eq(m.out, { "child ran", "exit 0" })
end)

T.test("kill_on_exit children start through callagent-pdeathsig beside the binary or in ../libexec/callagent/, while it is there", function()
  -- Two children, the wrapper removed between them: the first goes through
  -- it, the second through callagent itself; both run, one process each.
  local app = [[
    local process = require "callagent.process"
    local task = require "callagent.task"
    task.spawn(function()
      for i = 1, 2 do
        local p
        p = assert(process.spawn({ "sh", "-c", "echo child $$", on_stdout = function(l)
          print((l:gsub("%d+$", function(pid) return pid == tostring(p.pid) and "pid" or pid end)))
        end }))
        print("exit " .. tostring(p:wait(5000)))
        if i == 1 then
          assert(os.remove(arg[1] .. WRAPPER))
        end
      end
      os.exit(0)
    end)
  ]]
  for _, at in ipairs({ { bin = "/callagent", wrapper = "/callagent-pdeathsig" },
    { bin = "/bin/callagent", wrapper = "/libexec/callagent/callagent-pdeathsig" } }) do
    local dir = T.tmpdir()
    noting_wrapper(dir, dir .. at.wrapper)
    local m = run_copy(dir, at.bin, app:gsub("WRAPPER", "\"" .. at.wrapper .. "\""))
    T.eq({ m.code, m.out, m.err }, { 0, { "child pid", "exit 0", "child pid", "exit 0" }, {} }, at.wrapper)
    local used = lines_of(dir .. "/used")
    T.eq(#used, 1, "one start through the wrapper, at " .. at.wrapper)
    T.eq((used[1] or ""):match("^%-%-pdeathsig (%d+) 15 3 /%S+/sh sh %-c echo child %$%$$"), tostring(m.p.pid),
      "callagent's pid, SIGTERM, the error pipe, the program found in PATH and its arguments")
  end
  -- One not executable is passed over.
  local dir = T.tmpdir()
  noting_wrapper(dir, dir .. "/callagent-pdeathsig")
  T.eq(os.execute("chmod 644 '" .. dir .. "/callagent-pdeathsig'"), true)
  local m = run_copy(dir, "/callagent", [[
    local p = assert(require("callagent.process").spawn({ "true" }))
    require("callagent.task").spawn(function() print("exit " .. tostring(p:wait(5000))); os.exit(0) end)
  ]])
  T.eq({ m.code, m.out, m.err, lines_of(dir .. "/used") }, { 0, { "exit 0" }, {}, {} })
  -- Nor a folder of that name (spawn failed: EACCES), nor a file of
  -- another user's: one put beside a binary run from a shared folder
  -- such as /tmp would run with callagent's environment.
  dir = T.tmpdir()
  T.eq(os.execute("mkdir '" .. dir .. "/callagent-pdeathsig'"), true)
  m = run_copy(dir, "/callagent", [[
    local p = assert(require("callagent.process").spawn({ "true" }))
    require("callagent.task").spawn(function() print("exit " .. tostring(p:wait(5000))); os.exit(0) end)
  ]])
  T.eq({ m.code, m.out }, { 0, { "exit 0" } }, "a folder: " .. table.concat(m.err, "\n"))
  dir = T.tmpdir()
  noting_wrapper(dir, dir .. "/callagent-pdeathsig")
  if os.execute("chown 65534 '" .. dir .. "/callagent-pdeathsig' 2>/dev/null") then
    m = run_copy(dir, "/callagent", app:gsub("WRAPPER", "\"/callagent-pdeathsig\""))
    T.eq({ m.code, m.out, m.err, lines_of(dir .. "/used") },
      { 0, { "child pid", "exit 0", "child pid", "exit 0" }, {}, {} }, "another user's")
  else
    T.diag("not root: the wrapper of another user's is not tried")
  end
end)

T.test("kill_on_exit = false leaves the child running after callagent exits", function()
  local pid, code = child_callagent([[
    local process = require "callagent.process"
    local p = assert(process.spawn{ "sleep", "100", kill_on_exit = false })
    io.stdout:write(p.pid, "\n"); io.stdout:flush()
    require("callagent.core").stop(0)
  ]])
  watch_pid(pid, "child printed the sleep pid")
  T.eq(code, 0)
  timer.sleep(100)
  T.eq(pid_gone(pid), false, "sleep still running")
end)

T.test("the --pdeathsig wrapper given one of the program's stdio as ERRFD leaves it open: the program writes to it", function()
  local bin = assert(os.getenv("CALLAGENT_BIN"), "the runner sets CALLAGENT_BIN")
  local pid = tostring(require("callagent.runtime").pid())
  for _, w in ipairs({ bin, bin:match("^(.*)/") .. "/callagent-pdeathsig" }) do
    -- ERRFD 1 made close-on-exec: echo had no stdout ("write error").
    local m = run({ w, "--pdeathsig", pid, "15", "1", "echo", "echo", "hi" })
    T.eq({ m.code, m.out, m.err }, { 0, { "hi" }, {} }, w)
    -- ERRFD 2 given the exec's errno as raw bytes: the message is told on stderr instead.
    m = run({ w, "--pdeathsig", pid, "15", "2", "no-such-program-callagent-test", "x" })
    T.eq(m.code, 127)
    T.eq(m.err, { "callagent: cannot start no-such-program-callagent-test: No such file or directory" }, w)
  end
  -- The small one started by hand without its flag says what it is for.
  local m = run({ bin:match("^(.*)/") .. "/callagent-pdeathsig", pid, "15", "-1", "echo", "echo", "hi" })
  T.eq(m.code, 127)
  T.eq(m.out, {})
  T.match(m.err[1] or "", "^usage: callagent%-pdeathsig %-%-pdeathsig PARENT")
end)

T.run()
