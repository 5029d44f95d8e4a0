--- callagent.url: URL parsing and percent/form encoding.
--
--   url.encode(s)        percent-encodes s for a query component: keeps the RFC 3986
--                        unreserved characters (A-Z a-z 0-9 - . _ ~), "%XX" for the rest
--                        (a space becomes %20)
--   url.decode(s)        percent-decodes, "+" -> space (form style); a "%" not followed
--                        by two hex digits is left as is
--   url.form_encode(t)   application/x-www-form-urlencoded from {name = value}: names
--                        sorted; an array value repeats its name in order
--                        ({Event = {"initiated", "ringing"}} -> Event=initiated&Event=ringing);
--                        values may be strings, numbers, booleans or arrays of them (a
--                        table that is not an array raises); a number is
--                        written so it reads back exactly, a whole one without ".0"
--                        (30.0 -> "30"; url.encode writes numbers the same way)
--   url.form_decode(s)   {name = value}; a repeated name -> array of its values in
--                        order; a name without "=" gets ""; nil -> {}
--   url.query_decode(q)  the same as form_decode
--   url.parse(u)         { scheme, host, port, path, query, userinfo, fragment } or
--                        nil, "EINVAL: ..."
--   url.display(u)       u as a log line or an error message may show it: the userinfo
--                        becomes "[redacted]@", a query "?[redacted]", a fragment
--                        "#[redacted]" ("wss://u:pw@h/v1?key=x" -> "wss://[redacted]@h/v1?[redacted]");
--                        any string, a valid URL or not; a password with a raw "/", or
--                        with a raw "?" or "#", is hidden whole; an "@" in a query
--                        with no path before it is the query's ("https://h?to=a@b" ->
--                        "https://h?[redacted]"), and where it might end a password too
--                        ("https://u:pw@h?to=a@b") all after the scheme is hidden
--
-- parse: scheme is lowercased and must be followed by "//"; host is lowercased,
-- an IPv6 literal comes without its brackets ("http://[::1]:8080/" -> host "::1");
-- port is a number, defaulted to 80/443 for http/https and ws/wss (nil for other
-- schemes without one); path defaults to "/"; query is the raw text after "?"
-- (nil without "?"), fragment the raw text after "#"; userinfo the raw "user:pass"
-- before "@" (nil without). Error messages never repeat the URL (it may hold a
-- password). Passing a non-string raises.
local M = {}

local char, format = string.char, string.format
local concat, sort = table.concat, table.sort

-- "%XX" for every byte, and every hex pair (any case) back to its byte.
local enc, dec = {}, {}
for b = 0, 255 do
  enc[char(b)] = format("%%%02X", b)
end
do
  local digits = "0123456789abcdefABCDEF"
  for i = 1, #digits do
    for j = 1, #digits do
      local h = digits:sub(i, i) .. digits:sub(j, j)
      dec[h] = char(tonumber(h, 16))
    end
  end
end

-- A number as text that reads back as the same number (30.0 as "30").
local number_text = require("callagent.json").number_text

local function str(s, what)
  local t = type(s)
  if t == "string" then
    return s
  elseif t == "number" then
    return number_text(s)
  end
  error(what .. " needs a string, got " .. t, 3)
end

function M.encode(s)
  return (str(s, "url.encode"):gsub("[^A-Za-z0-9%-._~]", enc))
end

local function decode(s)
  if s:find("+", 1, true) then
    s = s:gsub("%+", " ")
  end
  if s:find("%", 1, true) then
    s = s:gsub("%%(%x%x)", dec)
  end
  return s
end

function M.decode(s)
  return decode(str(s, "url.decode"))
end

local function scalar(v, name)
  local t = type(v)
  if t == "string" then
    return v
  elseif t == "number" then
    return number_text(v)
  elseif t == "boolean" then
    return tostring(v)
  end
  error("url.form_encode: value of '" .. name .. "' must be a string, number, boolean or array of them", 3)
end

function M.form_encode(t)
  if type(t) ~= "table" then
    error("url.form_encode needs a table", 2)
  end
  -- Pairs of name and key: a key 1 and a key "1" are two names "1".
  local names = {}
  for k in pairs(t) do
    names[#names + 1] = { str(k, "url.form_encode key"), k }
  end
  sort(names, function(a, b)
    if a[1] ~= b[1] then
      return a[1] < b[1]
    end
    return type(a[2]) == "number" and type(b[2]) ~= "number" -- the number first
  end)
  local out, encode = {}, M.encode
  for _, nk in ipairs(names) do
    local name = nk[1]
    local v, ename = t[nk[2]], encode(name)
    if type(v) == "table" then
      -- Only an array: a map's fields (or items past a hole) would go unsent.
      local n = 0
      for _ in pairs(v) do
        n = n + 1
      end
      if n ~= #v or (n > 0 and v[n] == nil) then
        scalar(v, name)
      end
      for _, item in ipairs(v) do
        out[#out + 1] = ename .. "=" .. encode(scalar(item, name))
      end
    else
      out[#out + 1] = ename .. "=" .. encode(scalar(v, name))
    end
  end
  return concat(out, "&")
end

function M.form_decode(s)
  local out = {}
  if s == nil then
    return out
  end
  s = str(s, "url.form_decode")
  for pair in s:gmatch("[^&]+") do
    local k, v = pair:match("^([^=]*)=(.*)$")
    if not k then
      k, v = pair, ""
    end
    k = decode(k)
    if k ~= "" then
      v = decode(v)
      local cur = out[k]
      if cur == nil then
        out[k] = v
      elseif type(cur) == "table" then
        cur[#cur + 1] = v
      else
        out[k] = { cur, v }
      end
    end
  end
  return out
end

M.query_decode = M.form_decode

local default_port = { http = 80, https = 443, ws = 80, wss = 443 }

local function bad(msg)
  return nil, "EINVAL: " .. msg
end

local function parse_port(p)
  if p == "" then
    return true, nil
  end
  if not p:find("^%d+$") or #p > 5 or tonumber(p) > 65535 then
    return false
  end
  return true, tonumber(p)
end

function M.parse(u)
  if type(u) ~= "string" then
    error("url.parse needs a string, got " .. type(u), 2)
  end
  if u:find("[%z\1-\32\127]") then
    return bad("URL contains spaces or control characters")
  end
  local scheme, rest = u:match("^(%a[%w+.-]*)://(.*)$")
  if not scheme then
    return bad("URL needs a scheme and '//', like http://host/path")
  end
  scheme = scheme:lower()

  local fragment, query
  local at = rest:find("#", 1, true)
  if at then
    fragment, rest = rest:sub(at + 1), rest:sub(1, at - 1)
  end
  at = rest:find("?", 1, true)
  if at then
    query, rest = rest:sub(at + 1), rest:sub(1, at - 1)
  end
  local authority, path = rest, "/"
  at = rest:find("/", 1, true)
  if at then
    authority, path = rest:sub(1, at - 1), rest:sub(at)
  end

  local userinfo
  at = authority:match("^.*()@")
  if at then
    userinfo, authority = authority:sub(1, at - 1), authority:sub(at + 1)
  end

  local host, port_text
  if authority:sub(1, 1) == "[" then
    local after
    host, after = authority:match("^%[([^%]]*)%](.*)$")
    if not host or not (host:find("^[%x:.]+$") or host:find("^[%x:.]+%%25[%w%-._~]+$")) or not host:find(":", 1, true) then
      return bad("malformed IPv6 address in URL")
    end
    if after ~= "" then
      port_text = after:match("^:(.*)$")
      if not port_text then
        return bad("unexpected text after the IPv6 address in URL")
      end
    end
  else
    host, port_text = authority:match("^([^:]*):(.*)$")
    if not host then
      host = authority
    end
    if not host:find("^[%w%-._~%%!$&'()*+,;=]+$") then
      return bad(host == "" and "URL has no host" or "URL host has invalid characters")
    end
  end
  local ok, port = parse_port(port_text or "")
  if not ok then
    return bad("URL port must be a number from 0 to 65535")
  end
  return {
    scheme = scheme,
    host = host:lower(),
    port = port or default_port[scheme],
    path = path,
    query = query,
    userinfo = userinfo,
    fragment = fragment,
  }
end

-- Whether a (up to the first "/", "?" or "#") reads as [userinfo@]host[:port].
local function authority_ok(a)
  local hp = a:match("^.*@(.*)$") or a
  local host, port = hp:match("^(%[[^%]]*%])(.*)$")
  if not host then
    host, port = hp:match("^([^:]*)(.*)$")
    if not host:find("^[%w%-._~%%!$&'()*+,;=]+$") then
      return false
    end
  end
  return port == "" or port:find("^:%d*$") ~= nil
end

function M.display(u)
  u = str(u, "url.display")
  local scheme, rest = u:match("^(%a[%w+.-]*://)(.*)$")
  if not scheme then
    scheme, rest = "", u
  end
  -- The userinfo ends at the last "@" before the query or before the path,
  -- whichever comes later: a password with a raw "/" in it is hidden, and
  -- so is one with a raw "?" or "#" (a path with an "@" loses its start, see
  -- below for an "@" after the "?" or "#"). A password with both
  -- "/" and "?" or "#" is beyond telling apart from a path and a query.
  local q = rest:find("[?#]")
  local ends = math.max(q or #rest + 1, rest:find("/", 1, true) or #rest + 1)
  local at = rest:sub(1, ends - 1):match("^.*()@")
  if at and q and at > q then
    -- An "@" after the "?" or "#": a password's, or the query's, whose
    -- text after it must not pass for the host. Without a ":" before the
    -- "?" there is no password: the query's. With one, when the text up
    -- to the first "/", "?" or "#" is a host (and port) as it stands, or
    -- when more than one "@" comes after the "?" or "#" (the password ends
    -- at one, the query holds the next), both readings hold: nothing is shown.
    if not rest:sub(1, q - 1):find(":", 1, true) then
      at = rest:sub(1, q - 1):match("^.*()@")
    elseif authority_ok(rest:sub(1, (rest:find("[/?#]")) - 1))
      or rest:sub(q, at - 1):find("@", 1, true) then
      return scheme .. "[redacted]"
    end
  end
  local user = ""
  if at then
    user, rest = "[redacted]", rest:sub(at)
  end
  local head, tail = rest:match("^([^?#]*)(.*)$")
  head = user .. head
  local query, fragment = tail:match("^(%??[^#]*)(.*)$")
  if #query > 1 then
    query = "?[redacted]"
  end
  if #fragment > 1 then
    fragment = "#[redacted]"
  end
  return scheme .. head .. query .. fragment
end

return M
