--- callagent.tunnel: a public HTTPS URL for a local port, through ngrok or
-- Tailscale Funnel, so the telephony vendor can reach a callagent that has
-- no public address of its own.
--
--   local tunnel = require "callagent.tunnel"
--   local t, err = tunnel.open(cfg.tunnel, port, host, opts)   inside a task; waits up to tunnel.timeoutSec
--                (host: the address the server listens on, 127.0.0.1 if not given;
--                opts.cancel: a tunnel.cancel() that may end the opening;
--                opts.on_lost: fn(reason), called once if the open tunnel
--                dies on its own - ngrok exited, or, running on, logged its
--                session refused with an ERR_NGROK_ code or the tunnel
--                started again under another URL; never after close())
--   local c = tunnel.cancel()
--   c:cancel()   ends an open under way with nil, "tunnel: canceled" (kind
--                "canceled" as third value): ngrok is stopped, a running
--                tailscale command killed, and a `funnel --bg` followed by
--                `funnel --https=443 off`, as at the timeout; open returns
--                once that is done (a few seconds at most). An open given a
--                canceled one fails at once. c.canceled: whether it was.
--   t.url        "https://abcd.ngrok-free.app": no trailing slash, exactly the
--                base URL the vendor calls (and signs requests for)
--   t.provider   "ngrok" or "tailscale"
--   t:close([ms]) takes the tunnel down; idempotent; inside a task it waits
--                (a few seconds at most, ms when less) until that is done:
--                an ngrok still running then is killed (SIGKILL), a
--                `tailscale funnel --https=443 off` left to finish, each with
--                a warning
--
-- cfg (the config's tunnel section): provider "auto" | "ngrok" | "tailscale" |
-- "none", timeoutSec (default 20), ngrokApiUrl (default "http://127.0.0.1:4040").
--
-- ngrok: runs `ngrok http <port> --log stdout --log-format json` and polls
-- ngrok's local API (GET <api>/api/tunnels, every 250 ms) for the https
-- tunnel whose config.addr is our port. <api> is the web address ngrok logs
-- ("starting web service", so a second ngrok on 4041 is found too), else
-- ngrokApiUrl. The ngrok process lives as long as the tunnel; close() sends it
-- SIGTERM, and SIGKILL after STOP_MS (ms, when close(ms) gives less). Any
-- failure kills it.
--
-- tailscale: `tailscale status --json` must show BackendState "Running",
-- `tailscale funnel status --json` nothing but a proxy to our port on
-- https://<Self.DNSName>:443 (`funnel --bg` would replace the user's own
-- handler, and `off` remove it); then `tailscale funnel --bg <port>` (exit
-- 0, and that URL in its output) publishes the port on
-- https://<Self.DNSName> (port 443). close() runs `tailscale funnel
-- --https=443 off`, the command the CLI itself prints to undo --bg (`funnel
-- <port> off` is refused as the pre-1.52 syntax; `funnel reset` would also
-- drop the user's other serve/funnel settings); it waits OFF_MS for it (ms,
-- when close(ms) gives less), then leaves it to finish. A `funnel --bg`
-- stopped at tunnel.timeoutSec is followed by the same `off`: it may have
-- published the port before it hung. Not one that printed the link to
-- enable Funnel: the CLI sets nothing before that, and an off would wait
-- for the link too.
--
-- auto: ngrok if installed, else tailscale; when the first fails for another
-- reason, the other is tried too, in what is left of timeoutSec. Errors are one line starting "tunnel: ",
-- saying what to do:
--   tunnel: ngrok is not installed (not found in PATH); install it or set server.publicBaseUrl
--   tunnel: ngrok is not logged in: run `ngrok config add-authtoken <token>` (ngrok said: ...)
--   tunnel: ngrok did not open a tunnel: <ngrok's error> (ERR_NGROK_108): is another ngrok running with this account (...)? Stop it, or set server.publicBaseUrl
--   tunnel: ngrok exited (status 1) before opening a tunnel: <ngrok's error>
--   tunnel: no ngrok tunnel for port 4545 after 20 s
--   tunnel: tailscale is not logged in: run `tailscale up`
--   tunnel: tailscale Funnel is not available for this machine: <tailscale's message>
--   tunnel: tailscale already serves https://box.tail1234.ts.net/ (proxy http://127.0.0.1:3000): ...; free https port 443 (see `tailscale funnel status`), or set server.publicBaseUrl
--   tunnel: tailscale Funnel is not enabled on this tailnet: visit <admin link> to enable it, then try again
--   tunnel: tailscale 1.50.1 is too old for `tailscale funnel --bg` (Tailscale 1.52 or later): update it, or set server.publicBaseUrl (tailscale said: ...)
--   tunnel: neither ngrok nor tailscale is installed; install one, or set server.publicBaseUrl
--   tunnel: no tunnel could be opened: ngrok ...; tailscale .... Fix one, or set server.publicBaseUrl
--   tunnel: tunnel.provider is "none"; set server.publicBaseUrl to ...
local process = require "callagent.process"
local fetch = require "callagent.fetch"
local json = require "callagent.json"
local task = require "callagent.task"
local timer = require "callagent.timer"
local log = require "callagent.log"

local M = {}

local POLL_MS = 250
local CODE_EXIT_MS = 1000 -- how long an ngrok that logged an ERR_NGROK_ code may take to exit on it
local STOP_MS = 3000 -- how long close() waits for a child before SIGKILL
local OFF_MS = 5000 -- how long close() waits for `tailscale funnel ... off`
local NOT_INSTALLED = "not installed"
local CANCELED = "canceled"

local Cancel = {}
Cancel.__index = Cancel

function M.cancel()
  return setmetatable({ canceled = false, hooks = {} }, Cancel)
end

function Cancel:cancel()
  if self.canceled then
    return
  end
  self.canceled = true
  local hooks = self.hooks
  self.hooks = {}
  for fn in pairs(hooks) do
    fn()
  end
end

-- fn() runs when c is canceled (at once if it is already; never without a
-- c); returns the function that unhooks it.
local function on_cancel(c, fn)
  if not c then
    return function() end
  end
  if c.canceled then
    fn()
    return function() end
  end
  c.hooks[fn] = true
  return function()
    c.hooks[fn] = nil
  end
end

local function canceled(c)
  return c ~= nil and c.canceled
end

local Tunnel = {}
Tunnel.__index = Tunnel

function Tunnel:close(ms)
  if self.closed then
    return
  end
  self.closed = true
  self._stop(ms)
  log.info("tunnel closed", { provider = self.provider, url = self.url })
end

function Tunnel:__tostring()
  return "callagent.tunnel (" .. self.provider .. " " .. self.url .. (self.closed and ", closed)" or ")")
end

local function new_tunnel(provider, url, stop)
  return setmetatable({ provider = provider, url = (url:gsub("/+$", "")), closed = false, _stop = stop }, Tunnel)
end

-- "5 s", or "900 ms" for a time that is not whole seconds.
local function duration(ms)
  return ms % 1000 == 0 and string.format("%d s", ms // 1000) or string.format("%d ms", ms)
end

-- Ends a child: SIGTERM; inside a task waits up to STOP_MS (ms when less),
-- then SIGKILL, and waits for that up to 1 s (what is left of ms). Returns
-- how long it waited before the SIGKILL, if it sent one.
local function stop_child(p, ms)
  if p.done then
    return
  end
  p:kill("SIGTERM")
  if task.running() then
    local waited = math.max(1, math.floor(math.min(STOP_MS, ms or STOP_MS)))
    local code, err = p:wait(waited)
    if code == nil and err == "ETIMEDOUT" then
      p:kill("SIGKILL")
      local left = math.min(1000, ms and ms - waited or 1000)
      if left >= 1 then
        p:wait(math.floor(left))
      end
      return waited
    end
  end
end

local function exit_text(code, signal)
  return signal and ("signal " .. signal) or ("status " .. tostring(code))
end

local function not_found(err)
  return err:match("^ENOENT") ~= nil
end

---------------------------------------------------------------------------
-- ngrok

-- The port an ngrok config.addr points at on this machine: "http://localhost:4545",
-- "localhost:4545", "127.0.0.1:4545" or "4545"; nil for another host.
local function local_port(addr)
  addr = addr:gsub("^%a[%w+.-]*://", ""):gsub("/+$", "")
  local port = addr:match("^(%d+)$")
  if port then
    return tonumber(port)
  end
  local host
  host, port = addr:match("^(.*):(%d+)$")
  if not host then
    return nil
  end
  host = host:gsub("^%[(.*)%]$", "%1")
  if host == "localhost" or host == "::1" or host == "0.0.0.0" or host:match("^127%.") then
    return tonumber(port)
  end
  return nil
end
M._local_port = local_port

-- The https public_url of the tunnel for port in an /api/tunnels body.
local function find_tunnel(body, port)
  local doc = json.try_decode(body)
  if type(doc) ~= "table" or type(doc.tunnels) ~= "table" then
    return nil
  end
  for _, t in ipairs(doc.tunnels) do
    local addr = type(t) == "table" and type(t.config) == "table" and t.config.addr
    local pub = type(t) == "table" and t.public_url
    if type(addr) == "string" and type(pub) == "string" and pub:match("^https://[^/]") and local_port(addr) == port then
      return pub
    end
  end
  return nil
end

-- ngrok's not-logged-in codes: no authtoken (4018), a malformed or an unknown one (105, 107).
local AUTH_CODES = { ERR_NGROK_4018 = true, ERR_NGROK_105 = true, ERR_NGROK_107 = true }

-- What a tool's own words may add to an error: a line may be process.spawn's
-- max_line (64 KiB) long, and an error is one line of a log.
local MAX_SAID = 300

-- "authtoken" in any case, the closing quote of a JSON or YAML key (escaped
-- too, in JSON quoted in JSON), then ':' or '=': "Your authtoken: ...",
-- "authtoken":"...", NGROK_AUTHTOKEN=....
local TOKEN_NAME = "[Aa][Uu][Tt][Hh][Tt][Oo][Kk][Ee][Nn]\\?[\"']?%s*[:=]%s*"

-- s with "[redacted]" for the value after each TOKEN_NAME: a quoted one up
-- to its closing quote (or the end), else up to the next space, commas and
-- all (a malformed token, ERR_NGROK_105, may hold any); not a URL ("Install
-- your authtoken: https://dashboard..." stays).
local function redact_authtoken(s)
  local out, i = {}, 1
  while true do
    local _, name_end = s:find(TOKEN_NAME, i)
    if not name_end then
      break
    end
    out[#out + 1] = s:sub(i, name_end)
    local esc, q = s:match("^(\\?)([\"'])", name_end + 1)
    if q then
      out[#out + 1] = esc .. q .. "[redacted]"
      i = s:find(esc .. q, name_end + #esc + 2, true) or #s + 1
    else
      local value = s:match("^%S*", name_end + 1)
      out[#out + 1] = (value == "" or value:find("^https?://")) and value or "[redacted]"
      i = name_end + 1 + #value
    end
  end
  out[#out + 1] = s:sub(i)
  return table.concat(out)
end

-- A tool's line as an error may quote it: one line of UTF-8 (its control
-- characters as spaces, bytes that are no UTF-8 as U+FFFD), trimmed, at
-- most MAX_SAID bytes cut between characters, and without the value after
-- "authtoken:" (ngrok's ERR_NGROK_105 and 107 print "Your authtoken: ...",
-- a secret callagent cannot know to redact). The token goes before the
-- line is cut: cut first, a character cut at the 304th byte stayed as
-- U+FFFD, and the text after a long token was lost.
local function said_text(s)
  s = redact_authtoken((s:gsub("[%z\1-\31\127]", " ")))
  s = json.utf8(s:sub(1, MAX_SAID + 4))
  if #s > MAX_SAID then
    local cut = MAX_SAID
    while (s:byte(cut + 1) or 0) >= 0x80 and s:byte(cut + 1) < 0xc0 do -- not inside a character
      cut = cut - 1
    end
    s = s:sub(1, cut)
  end
  return (s:match("^%s*(.-)%s*$"))
end

-- Reads one line of ngrok's output (JSON logs on stdout, "ERROR:  ..." lines
-- on stderr) into st: web (its API address), headline (the first error
-- line), code (ERR_NGROK_...), auth (not logged in).
local function ngrok_line(st, line)
  local text
  if line:sub(1, 1) == "{" then
    local ev = json.try_decode(line)
    if type(ev) == "table" then
      if ev.msg == "starting web service" and type(ev.addr) == "string" then
        st.web = ev.addr:match("^https?://") and ev.addr or ("http://" .. ev.addr)
      end
      if ev.lvl ~= "eror" and ev.lvl ~= "crit" then
        return
      end
      text = type(ev.err) == "string" and ev.err ~= "<nil>" and ev.err or tostring(ev.msg or "")
    end
  end
  text = text or line:gsub("^ERROR:%s*", "")
  for piece in text:gmatch("[^\r\n]+") do
    piece = said_text(piece)
    local code = piece:match("ERR_NGROK_%d+")
    if code then
      st.code = st.code or code
      st.auth = st.auth or AUTH_CODES[code]
    elseif piece ~= "" then
      st.headline = st.headline or piece
      if piece:find("authentication failed", 1, true) and piece:find("authtoken", 1, true) then
        st.auth = true
        st.auth_line = st.auth_line or piece
      end
    end
  end
end

-- "<headline> (ERR_NGROK_n)", or nil when ngrok said nothing useful.
local function ngrok_said(st)
  if not st.headline then
    return st.code
  end
  return st.code and (st.headline .. " (" .. st.code .. ")") or st.headline
end

-- What a line ngrok logs once its tunnel is open says of it: why it is
-- lost (the vendor would call a URL that reaches nothing), else nil. A
-- session that reconnected under another URL ("started tunnel" for our
-- port; inconshreveable/ngrok#66 shows the lines), and one whose reconnect
-- the service refuses with an ERR_NGROK_ code (the tunnel still bound to
-- the old session after a sleep, ERR_NGROK_334: inconshreveable/ngrok#937),
-- which ngrok retries for ever rather than exit. A reconnect failing
-- without a code (a timeout) is not: ngrok may well be back in a moment,
-- under the same URL.
local function ngrok_after_open(line, port, url)
  if line:sub(1, 1) ~= "{" then
    -- stderr: ngrok writes its session errors there as "ERROR:  ..." lines
    -- too, the JSON line on stdout says it with its code.
    return nil
  end
  local ev = json.try_decode(line)
  if type(ev) ~= "table" then
    return nil
  end
  if ev.msg == "started tunnel" and type(ev.url) == "string" and type(ev.addr) == "string"
    and ev.url:match("^https://[^/]") and local_port(ev.addr) == port then
    local now = ev.url:gsub("/+$", "")
    if now ~= url then
      return "ngrok reconnected under another URL, " .. said_text(now) .. " (calls were placed with " .. url .. ")"
    end
    return nil
  end
  if (ev.lvl == "eror" or ev.lvl == "crit") and type(ev.obj) == "string"
    and (ev.obj:find("^tunnels") or ev.obj == "csess") then
    local st = {}
    ngrok_line(st, line)
    if st.code then
      return "ngrok lost its session: " .. ngrok_said(st)
    end
  end
  return nil
end

-- What to do, after ngrok's words for a code whose own advice does not
-- fit: ERR_NGROK_108's is to run `ngrok start --all`, when the other
-- session is most often an `ngrok http` the user started by hand (as
-- Twilio's guides say to), still running.
local NGROK_HINTS = {
  ERR_NGROK_108 = ": is another ngrok running with this account (an `ngrok http` in another terminal)? "
    .. "Stop it, or set server.publicBaseUrl",
}

local function open_ngrok(cfg, port, deadline, cancel, on_lost)
  local st = {}
  local wake = task.queue(1)
  local function poke()
    wake:push(true)
  end
  local tun, lost_told
  -- The open tunnel is lost: said once (an exit after a lost session too).
  local function lost(msg, fields, why)
    if lost_told or not tun or tun.closed then
      return
    end
    lost_told = true
    log.error("tunnel: " .. msg .. "; the telephony vendor cannot reach this server any more", fields)
    if on_lost then
      on_lost(why)
    end
  end
  local function on_line(line)
    ngrok_line(st, line) -- after the opening too: an exit quotes it
    if tun then
      -- ngrok runs on when its session is lost: it reconnects, maybe under
      -- another URL, or is refused again and again (an ERR_NGROK_ code).
      local why = ngrok_after_open(line, port, tun.url)
      if why then
        lost(why, nil, why)
      end
    elseif st.auth or st.code then
      poke()
    end
  end
  local p, err = process.spawn({
    "ngrok",
    "http",
    tostring(port),
    "--log",
    "stdout",
    "--log-format",
    "json",
    drop_secrets = true, -- the OpenAI key, Twilio's token: none of ngrok's business
    on_stdout = on_line,
    on_stderr = on_line,
    on_exit = function(code, signal)
      poke()
      local said = ngrok_said(st)
      lost("ngrok exited", { exit = exit_text(code, signal), said = said },
        "ngrok exited (" .. exit_text(code, signal) .. ")" .. (said and (": " .. said) or ""))
    end,
    kill_on_exit = true,
  })
  if not p then
    if not_found(err) then
      return nil, "ngrok is not installed (not found in PATH)", NOT_INSTALLED
    end
    return nil, "ngrok cannot be started: " .. err
  end
  local unhook = on_cancel(cancel, poke)
  local function fail(msg, kind)
    unhook()
    stop_child(p)
    return nil, msg, kind
  end
  while true do
    wake:pop(POLL_MS)
    if canceled(cancel) then
      return fail(CANCELED, CANCELED)
    end
    if st.auth then
      return fail("ngrok is not logged in: run `ngrok config add-authtoken <token>` (ngrok said: "
        .. (st.auth_line or ngrok_said(st)) .. ")")
    end
    if st.code and not p.done then
      -- An ERR_NGROK_ code: the service refused the session (one agent
      -- session at a time, ERR_NGROK_108; an agent too old, 121; ...).
      -- ngrok retries it over and over rather than exit; waiting would
      -- take all of tunnel.timeoutSec, auto's other tool's time too. One
      -- that exits on it is given CODE_EXIT_MS to, and reported so.
      p:wait(CODE_EXIT_MS)
    end
    if p.done then
      local said = ngrok_said(st)
      return fail("ngrok exited (" .. exit_text(p.code, p.signal) .. ") before opening a tunnel"
        .. (said and (": " .. said) or ""))
    end
    if st.code then
      return fail("ngrok did not open a tunnel: " .. ngrok_said(st) .. (NGROK_HINTS[st.code] or ""))
    end
    local left = deadline - timer.now()
    local api = (st.web or cfg.ngrokApiUrl):gsub("/+$", "")
    local res = fetch(api .. "/api/tunnels", {
      timeout = math.max(100, math.min(2000, math.floor(left))),
      connect_timeout = 500,
    })
    local url = res and res.status == 200 and find_tunnel(res.body, port)
    st.api_seen = st.api_seen or (res and res.status == 200)
    if canceled(cancel) then
      return fail(CANCELED, CANCELED)
    end
    if url and not p.done then
      unhook()
      tun = new_tunnel("ngrok", url, function(ms)
        local waited = stop_child(p, ms)
        if waited then
          log.warn(string.format("tunnel: ngrok had not exited %s after SIGTERM: killed (SIGKILL)", duration(waited)),
            { pid = p.pid })
        end
      end)
      tun.pid = p.pid
      return tun
    end
    if timer.now() >= deadline then
      local said = ngrok_said(st)
      if not said and not st.web and not st.api_seen then
        -- Its API never answered, nor did it log where it listens: most
        -- likely turned off (ngrok/ngrok-docs agent/config/v3.mdx web_addr).
        return fail(string.format("no ngrok tunnel for port %d after %d s (ngrok logged no \"starting web service\": "
          .. "callagent reads the tunnel's URL from ngrok's local API, which `web_addr: false` in ngrok.yml turns "
          .. "off; remove it, or set tunnel.ngrokApiUrl to its address)", port, cfg.timeoutSec))
      end
      return fail(string.format("no ngrok tunnel for port %d after %d s", port, cfg.timeoutSec)
        .. (said and (" (ngrok said: " .. said .. ")") or ""))
    end
  end
end

---------------------------------------------------------------------------
-- tailscale

-- Runs a short tailscale command, waiting at most ms: a result {code,
-- signal, out (stdout lines), lines (both streams), timed_out, canceled}, or
-- nil, err when it cannot start. opts.cancel canceled: the command is
-- stopped as at the timeout.
-- What is kept of a command's output: the JSON of `status` (a big tailnet's
-- runs to a few MB), and lines enough for an error message. A CLI that
-- floods its output is not kept in memory, nor searched line by line.
local MAX_OUT_BYTES, MAX_LINES = 8 * 1024 * 1024, 200

local function run(args, ms, opts)
  local out, lines, out_bytes = {}, {}, 0
  local function keep_line(l)
    if #lines < MAX_LINES then
      lines[#lines + 1] = l
    end
  end
  local spec = {
    "tailscale",
    on_stdout = function(l)
      out_bytes = out_bytes + #l + 1
      if out_bytes <= MAX_OUT_BYTES then
        out[#out + 1] = l
      end
      keep_line(l)
    end,
    on_stderr = keep_line,
    kill_on_exit = not (opts and opts.detached),
    drop_secrets = true,
  }
  for i, a in ipairs(args) do
    spec[i + 1] = a
  end
  local p, err = process.spawn(spec)
  if not p then
    return nil, err
  end
  local r = { out = out, lines = lines, p = p }
  if ms == false then
    return r
  end
  local cancel = opts and opts.cancel
  local unhook = on_cancel(cancel, function()
    p:kill("SIGTERM") -- its wait below returns
  end)
  local code, sig = p:wait(math.max(1, math.floor(ms)))
  unhook()
  if canceled(cancel) then
    stop_child(p)
    r.canceled = true
  elseif code == nil and sig == "ETIMEDOUT" then
    stop_child(p)
    r.timed_out = true
  else
    r.code, r.signal = code, sig
  end
  return r
end

-- The first non-blank line (matching pattern), at most MAX_SAID bytes of it.
local function first_line(lines, pattern)
  for _, l in ipairs(lines) do
    local s = said_text(l)
    if s ~= "" and (not pattern or s:find(pattern)) then
      return s
    end
  end
  return nil
end

local LOGIN = "tailscale is not logged in: run `tailscale up`"

local function state_error(state)
  if state == "NeedsLogin" or state == "NoState" then
    return LOGIN
  elseif state == "Stopped" then
    return "tailscale is stopped: run `tailscale up`"
  elseif state == "NeedsMachineAuth" then
    return "tailscale is waiting for a tailnet admin to approve this machine (BackendState NeedsMachineAuth)"
  end
  return "tailscale is not running (BackendState " .. tostring(state) .. "): run `tailscale up`"
end

-- The admin link the CLI prints when Funnel is not enabled on the tailnet.
local ENABLE_LINK = "https://login%.tailscale%.com/f/%S+"

-- What a failed tailscale command's output means, as one actionable line.
local function tailscale_error(what, r, timeout_s)
  local lines = r.lines
  local enable = first_line(lines, ENABLE_LINK)
  local no_funnel = first_line(lines, "Funnel not available")
  if no_funnel then
    return "tailscale Funnel is not available for this machine: " .. no_funnel
  elseif enable then
    return "tailscale Funnel is not enabled on this tailnet: visit " .. enable:match("https://%S+")
      .. " to enable it, then try again"
  elseif first_line(lines, "Logged out") or first_line(lines, "NeedsLogin") or first_line(lines, "not logged in") then
    return LOGIN
  elseif first_line(lines, "tailscaled") and first_line(lines, "connect") then
    -- The CLI's own words say whether tailscaled runs, and what to do
    -- ("sudo systemctl start tailscaled ?"): it may run, its socket refusing us.
    return "tailscale cannot reach tailscaled: " .. first_line(lines, "tailscaled")
  elseif first_line(lines, "[Aa]ccess denied") or first_line(lines, "[Pp]ermission denied") then
    return "tailscale refused (" .. (first_line(lines, "[Aa]ccess denied") or first_line(lines, "[Pp]ermission denied"))
      .. "): run `sudo tailscale set --operator=$USER` once, so callagent may configure Funnel"
  elseif r.timed_out then
    local said = first_line(lines)
    return string.format("`tailscale %s` did not finish within %d s", what, timeout_s)
      .. (said and (" (tailscale said: " .. said .. ")") or "")
  end
  local said = first_line(lines)
  return string.format("`tailscale %s` failed (%s)", what, exit_text(r.code, r.signal))
    .. (said and (": " .. said) or "")
end

local FUNNEL_OFF = { "funnel", "--https=443", "off" }

-- Turns the funnel off; inside a task waits for it (OFF_MS at most, ms when
-- less). One that takes longer (a slow tailscaled) is left to finish, not
-- killed: killed, it could leave the funnel published after the app;
-- detached, it outlives callagent's exit too.
local function funnel_off(ms)
  local r, err = run(FUNNEL_OFF, false, { detached = true })
  if not r then
    log.warn("tunnel: cannot turn tailscale funnel off", { error = err })
    return
  end
  if not task.running() then
    return
  end
  local wait = math.max(1, math.floor(math.min(OFF_MS, ms or OFF_MS)))
  local code, sig = r.p:wait(wait)
  if code == nil and sig == "ETIMEDOUT" then
    log.warn(string.format("tunnel: `tailscale funnel --https=443 off` is still running after %s: left to finish; "
      .. "if `tailscale funnel status` still shows the funnel, run that command", duration(wait)))
  elseif code ~= 0 then
    log.warn("tunnel: `tailscale funnel --https=443 off` failed", {
      exit = exit_text(code, sig),
      said = first_line(r.lines),
    })
  end
end

-- Whether `funnel --bg`'s stdout shows url published: its "https://<name>/"
-- line (messageForPort in cmd/tailscale/cli/serve_v2.go).
local function published(out, url)
  for _, l in ipairs(out) do
    local s = l:match("^%s*(.-)%s*$")
    if s == url or s:sub(1, #url + 1) == url .. "/" then
      return true
    end
  end
  return false
end

-- What the user's serve config already does on https://<name>:443 other
-- than proxy to our port, as "proxy http://127.0.0.1:3000", or nil (nothing,
-- or a funnel to our port left by a callagent that was killed). `funnel --bg
-- <port>` sets the "/" handler there whatever it was, and `funnel
-- --https=443 off` removes every handler of the port, without asking when
-- not on a terminal (serve_v2.go setServe/removeWebServe, util/prompt YesNo).
-- A config that cannot be read is no reason to refuse: nil. Second value:
-- canceled.
local function serving_other(name, port, ms, cancel)
  local r = run({ "funnel", "status", "--json" }, math.max(1, ms), { cancel = cancel })
  if not r or r.canceled then
    return nil, r ~= nil
  end
  local doc = r.code == 0 and json.try_decode(table.concat(r.out, "\n"))
  local web = type(doc) == "table" and type(doc.Web) == "table" and doc.Web[name .. ":443"]
  local handlers = type(web) == "table" and type(web.Handlers) == "table" and web.Handlers or {}
  local ours = "http://127.0.0.1:" .. port
  for _, h in pairs(handlers) do
    if type(h) == "table" and h.Proxy ~= ours then
      for _, kind in ipairs({ "Proxy", "Path", "Text", "Redirect" }) do
        if type(h[kind]) == "string" then
          return said_text(kind:lower() .. " " .. h[kind])
        end
      end
      return "a handler"
    end
  end
  return nil
end

local function open_tailscale(cfg, port, deadline, cancel)
  local function left()
    return deadline - timer.now()
  end
  local status
  while true do
    if canceled(cancel) then
      return nil, CANCELED, CANCELED
    end
    local r, err = run({ "status", "--json" }, left(), { cancel = cancel })
    if not r then
      if not_found(err) then
        return nil, "tailscale is not installed (not found in PATH)", NOT_INSTALLED
      end
      return nil, "tailscale cannot be started: " .. err
    end
    if r.canceled then
      return nil, CANCELED, CANCELED
    end
    if r.timed_out or r.code ~= 0 then
      return nil, tailscale_error("status --json", r, cfg.timeoutSec)
    end
    status = json.try_decode(table.concat(r.out, "\n"))
    if type(status) ~= "table" then
      return nil, "`tailscale status --json` printed no JSON: " .. (first_line(r.lines) or "(nothing)")
    end
    if status.BackendState == "Running" then
      break
    end
    if status.BackendState ~= "Starting" or left() < 2 * POLL_MS then
      return nil, state_error(status.BackendState)
    end
    local wake = task.queue(1)
    local unhook = on_cancel(cancel, function()
      wake:push(true)
    end)
    wake:pop(2 * POLL_MS)
    unhook()
  end
  if canceled(cancel) then
    return nil, CANCELED, CANCELED
  end

  local me = type(status.Self) == "table" and status.Self or {}
  local name = type(me.DNSName) == "string" and me.DNSName:gsub("%.$", "") or ""
  if name ~= "" then
    local other, canceled_now = serving_other(name, port, left(), cancel)
    if canceled_now then
      return nil, CANCELED, CANCELED
    end
    if other then
      return nil, string.format("tailscale already serves https://%s/ (%s): `tailscale funnel --bg %d` would replace "
        .. "it, and its stop remove it; free https port 443 (see `tailscale funnel status`), or set "
        .. "server.publicBaseUrl", name, other, port)
    end
  end

  local r, err = run({ "funnel", "--bg", tostring(port) }, math.max(1, left()), { cancel = cancel })
  if not r then
    return nil, "tailscale cannot be started: " .. err
  end
  -- The link to enable Funnel: the CLI prints it, and waits or exits,
  -- before it sets anything; an off would print it and wait just the same
  -- (`funnel` checks Funnel is enabled first, turning off too:
  -- runServeCombined in cmd/tailscale/cli/serve_v2.go).
  local asked = first_line(r.lines, ENABLE_LINK)
  if (r.timed_out or r.canceled) and not asked then
    -- Stopped halfway, it may have published the port already (tailscaled
    -- took the setting, the CLI was still waiting on something): undone,
    -- or the machine would stay on the internet with nothing behind it.
    funnel_off()
  end
  if r.canceled then
    return nil, CANCELED, CANCELED
  end
  if r.timed_out or r.code ~= 0 then
    -- status's Version is tailscaled's: named only when it is the old one
    -- (an old CLI in PATH before a newer daemon's fails on --bg the same).
    local version = type(status.Version) == "string" and status.Version:match("^(%d+%.%d+[%.%d]*)") or nil
    local major, minor = (version or ""):match("^(%d+)%.(%d+)")
    local old = major and (tonumber(major) < 1 or (tonumber(major) == 1 and tonumber(minor) < 52))
    local no_bg = first_line(r.lines, "flag provided but not defined: %-%-?bg")
    if not r.timed_out and (no_bg or old) then
      local said = no_bg or first_line(r.lines)
      return nil, string.format("tailscale%s is too old for `tailscale funnel --bg` (Tailscale 1.52 or later): "
        .. "update it, or set server.publicBaseUrl%s", old and (" " .. version) or "",
        said and (" (tailscale said: " .. said .. ")") or "")
    end
    return nil, tailscale_error("funnel --bg " .. port, r, cfg.timeoutSec)
  end
  local url = name ~= "" and ("https://" .. name) or (first_line(r.out, "^https://") or ""):match("^https://[^/%s]+")
  if not url then
    funnel_off()
    return nil, "tailscale has no DNS name for this machine (is MagicDNS on?); set server.publicBaseUrl"
  end
  -- Exit 0 is not enough: when Funnel is not enabled and the control server
  -- says not to wait for it, the CLI prints why (and the admin link) and
  -- exits 0 having published nothing. Published, it prints the URL.
  if not published(r.out, url) then
    if asked then
      return nil, tailscale_error("funnel --bg " .. port, r, cfg.timeoutSec)
    end
    funnel_off()
    return nil, string.format("`tailscale funnel --bg %d` published nothing (no %s in its output): %s", port, url,
      first_line(r.lines) or "(it said nothing)")
  end
  return new_tunnel("tailscale", url, funnel_off)
end

---------------------------------------------------------------------------

local OPENERS = { ngrok = open_ngrok, tailscale = open_tailscale }

local function with_defaults(cfg)
  cfg = cfg or {}
  return {
    provider = cfg.provider or "auto",
    timeoutSec = cfg.timeoutSec or 20,
    ngrokApiUrl = cfg.ngrokApiUrl or "http://127.0.0.1:4040",
  }
end

local function opened(t)
  log.info("tunnel open", { provider = t.provider, url = t.url })
  return t
end

-- The listen addresses the tools' forwarding reaches: ngrok's goes to
-- localhost:<port>, Funnel's to 127.0.0.1:<port>. Not another 127.x, a LAN
-- address, nor IPv6 (the server listens there IPv6 only, "::" too).
local REACHED = { ["127.0.0.1"] = true, localhost = true, ["0.0.0.0"] = true }

function M.open(cfg, port, host, opts)
  assert(math.type(port) == "integer" and port > 0 and port < 65536, "tunnel.open needs a port number")
  assert(task.running(), "tunnel.open must be called inside a task (see callagent.task.spawn)")
  local cancel, on_lost = opts and opts.cancel, opts and opts.on_lost
  assert(cancel == nil or getmetatable(cancel) == Cancel, "tunnel.open: opts.cancel must come from tunnel.cancel()")
  cfg = with_defaults(cfg)
  local provider = cfg.provider
  if provider == "none" then
    return nil, 'tunnel: tunnel.provider is "none"; set server.publicBaseUrl to the URL the telephony vendor reaches this server at'
  end
  if host and not REACHED[host] then
    -- Opened anyway, the public URL would reach nothing: every call would
    -- fail at the vendor, with nothing said here.
    return nil, string.format("tunnel: ngrok and tailscale forward to 127.0.0.1:%d, where nothing listens: "
      .. "server.host is %s; set it to 127.0.0.1 or 0.0.0.0, or set server.publicBaseUrl", port, host)
  end
  -- One deadline, for auto's both tries too: tunnel.timeoutSec is what opening may take.
  local deadline = timer.now() + cfg.timeoutSec * 1000
  if canceled(cancel) then
    return nil, "tunnel: " .. CANCELED, CANCELED
  end
  local single = OPENERS[provider]
  if single then
    local t, err, kind = single(cfg, port, deadline, cancel, on_lost)
    if kind == CANCELED then
      return nil, "tunnel: " .. CANCELED, CANCELED
    end
    if t then
      return opened(t)
    end
    if kind == NOT_INSTALLED then
      err = err .. "; install it or set server.publicBaseUrl"
    end
    return nil, "tunnel: " .. err
  end
  if provider ~= "auto" then
    error("tunnel.provider must be auto, ngrok, tailscale or none, not " .. tostring(provider), 2)
  end
  local reasons, missing = {}, 0
  for i, name in ipairs({ "ngrok", "tailscale" }) do
    local t, err, kind
    if i > 1 and timer.now() >= deadline then
      -- Started now, it would be killed at once, with a misleading reason.
      err = string.format("%s was not tried: the first took all of tunnel.timeoutSec (%d s)", name, cfg.timeoutSec)
    else
      t, err, kind = OPENERS[name](cfg, port, deadline, cancel, on_lost)
    end
    if kind == CANCELED then
      return nil, "tunnel: " .. CANCELED, CANCELED
    end
    if t then
      return opened(t)
    end
    reasons[#reasons + 1] = err
    if kind == NOT_INSTALLED then
      missing = missing + 1
    else
      log.warn("tunnel: " .. name .. " failed", { reason = err })
    end
  end
  if missing == 2 then
    return nil, "tunnel: neither ngrok nor tailscale is installed; install one, or set server.publicBaseUrl"
  end
  return nil, "tunnel: no tunnel could be opened: " .. table.concat(reasons, "; ")
    .. ". Fix one, or set server.publicBaseUrl"
end

return M
