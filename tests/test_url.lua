local T = require "testing"
local url = require "callagent.url"

T.test("encode keeps unreserved characters and escapes the rest as %XX", function()
  T.eq(url.encode("AZaz09-._~"), "AZaz09-._~")
  T.eq(url.encode("a b&c=d/e?f+g%h"), "a%20b%26c%3Dd%2Fe%3Ff%2Bg%25h")
  T.eq(url.encode("é"), "%C3%A9")
  T.eq(url.encode("\0\255"), "%00%FF")
  T.eq(url.encode(""), "")
  T.eq(url.encode(42), "42")
end)

T.test("decode turns %XX and + back into bytes and leaves invalid escapes", function()
  T.eq(url.decode("a%20b+c"), "a b c")
  T.eq(url.decode("%2b%2B%c3%A9"), "++é")
  T.eq(url.decode("100%"), "100%")
  T.eq(url.decode("%zz%4"), "%zz%4")
  T.eq(url.decode("%%41"), "%A")
end)

T.test("encode and decode round-trip every byte", function()
  local all = {}
  for b = 0, 255 do
    all[#all + 1] = string.char(b)
  end
  local s = table.concat(all)
  T.eq(url.decode(url.encode(s)), s)
  local odd = "Bearer x+y/z==; 100% sure & \"quoted\""
  T.eq(url.decode(url.encode(odd)), odd)
end)

T.test("form_encode sorts names and repeats names of array values in order", function()
  T.eq(url.form_encode({ To = "+15551234567", From = "+15557654321", Url = "https://x.test/a?b=c" }),
    "From=%2B15557654321&To=%2B15551234567&Url=https%3A%2F%2Fx.test%2Fa%3Fb%3Dc")
  T.eq(url.form_encode({
    StatusCallbackEvent = { "initiated", "ringing", "answered", "completed" },
    Method = "POST",
  }), "Method=POST&StatusCallbackEvent=initiated&StatusCallbackEvent=ringing"
    .. "&StatusCallbackEvent=answered&StatusCallbackEvent=completed")
  T.eq(url.form_encode({ n = 3, yes = true, ["a b"] = "c d" }), "a%20b=c%20d&n=3&yes=true")
  T.eq(url.form_encode({}), "")
  T.eq(url.form_encode({ empty = {} }), "")
end)

T.test("form_encode rejects values it cannot encode", function()
  T.raises(function()
    url.form_encode({ f = print })
  end, "value of 'f'")
  T.raises(function()
    url.form_encode("a=b")
  end, "needs a table")
end)

T.test("form_encode rejects a table value that is not an array instead of dropping its fields", function()
  for _, v in ipairs({ { x = "1" }, { "a", x = "1" }, { [1] = "a", [3] = "c" }, { [2] = "b" } }) do
    T.raises(function()
      url.form_encode({ Event = v })
    end, "value of 'Event'")
  end
  T.eq(url.form_encode({ Event = { "a", "b" } }), "Event=a&Event=b")
end)

T.test("form_decode returns values and arrays for repeated names", function()
  local t = url.form_decode("CallSid=CA123&StatusCallbackEvent=initiated&Digits=1%232&StatusCallbackEvent=ringing&Note=a+b&flag")
  T.eq(t, {
    CallSid = "CA123",
    StatusCallbackEvent = { "initiated", "ringing" },
    Digits = "1#2",
    Note = "a b",
    flag = "",
  })
  T.eq(url.form_decode(""), {})
  T.eq(url.form_decode(nil), {})
  T.eq(url.form_decode("a=1&&=2&b=x=y"), { a = "1", b = "x=y" })
  T.eq(url.query_decode("q=%E2%9C%93&q=2&q=3"), { q = { "✓", "2", "3" } })
end)

T.test("form_encode then form_decode gives the table back", function()
  local t = { ["key with space"] = "v&=+%", list = { "1", "2", "two words" }, single = "é" }
  T.eq(url.form_decode(url.form_encode(t)), t)
end)

T.test("parse http and https URLs with default and explicit ports", function()
  T.eq(url.parse("http://Example.COM"), { scheme = "http", host = "example.com", port = 80, path = "/" })
  T.eq(url.parse("HTTPS://api.twilio.com/2010-04-01/Accounts/AC1/Calls.json"),
    { scheme = "https", host = "api.twilio.com", port = 443, path = "/2010-04-01/Accounts/AC1/Calls.json" })
  T.eq(url.parse("http://127.0.0.1:8080/x/y?a=1&b=%20#frag"),
    { scheme = "http", host = "127.0.0.1", port = 8080, path = "/x/y", query = "a=1&b=%20", fragment = "frag" })
  T.eq(url.parse("https://h:8443?x"), { scheme = "https", host = "h", port = 8443, path = "/", query = "x" })
  T.eq(url.parse("http://h:/p"), { scheme = "http", host = "h", port = 80, path = "/p" })
  T.eq(url.parse("http://h/p?").query, "")
end)

T.test("parse ws and wss URLs and other schemes", function()
  T.eq(url.parse("ws://localhost/media"), { scheme = "ws", host = "localhost", port = 80, path = "/media" })
  T.eq(url.parse("wss://stream.example.net:9443/s?token=abc"),
    { scheme = "wss", host = "stream.example.net", port = 9443, path = "/s", query = "token=abc" })
  local u = url.parse("redis://cache:6379")
  T.eq(u.port, 6379)
  T.eq(url.parse("custom://h").port, nil, "no default port for unknown schemes")
end)

T.test("parse IPv6 literal hosts without their brackets", function()
  T.eq(url.parse("http://[::1]/"), { scheme = "http", host = "::1", port = 80, path = "/" })
  T.eq(url.parse("ws://[::1]:9000/x?y=1"), { scheme = "ws", host = "::1", port = 9000, path = "/x", query = "y=1" })
  T.eq(url.parse("https://[2001:DB8::A]:443").host, "2001:db8::a")
  T.eq(url.parse("http://[fe80::1%25eth0]:80/").host, "fe80::1%25eth0")
end)

T.test("parse splits userinfo at the last @", function()
  local u = url.parse("https://AC123:tok@en@api.twilio.com/x")
  T.eq(u.userinfo, "AC123:tok@en")
  T.eq(u.host, "api.twilio.com")
  T.eq(url.parse("http://user@h").userinfo, "user")
  T.eq(url.parse("http://h/a@b").userinfo, nil, "an @ in the path is not userinfo")
end)

T.test("parse rejects bad input with EINVAL and does not echo the URL", function()
  local cases = {
    "",
    "example.com/path",
    "http:/x",
    "://h",
    "1http://h",
    "http://",
    "http:///path",
    "http://exa mple.com/",
    "http://h\n/",
    "http://h:port/",
    "http://h:65536/",
    "http://h:-1/",
    "http://h:1:2/",
    "http://[::1/",
    "http://[zz::1]/",
    "http://[1.2.3.4]/",
    "http://[::1]x/",
    "http://h<>/",
    "https://user:s3cretpass@:443/",
  }
  for _, c in ipairs(cases) do
    local u, err = url.parse(c)
    T.eq(u, nil, c)
    T.match(err, "^EINVAL: ", c)
  end
  local _, err = url.parse("https://user:s3cretpass@:443/")
  T.no_match(err, "s3cret")
  T.raises(function()
    url.parse(nil)
  end, "needs a string")
end)

-- Fuzz-style properties: a seeded generator, each case checked against the
-- documented contract or a small reference written here.

local function pick(s)
  local i = math.random(1, #s)
  return s:sub(i, i)
end

local function rand_string(alphabet, min, max)
  local t = {}
  for i = 1, math.random(min, max) do
    t[i] = alphabet and pick(alphabet) or string.char(math.random(0, 255))
  end
  return table.concat(t)
end

-- Form-style percent-decoding, one character at a time.
local function ref_decode(s)
  local out, i = {}, 1
  while i <= #s do
    local c = s:sub(i, i)
    if c == "+" then
      out[#out + 1], i = " ", i + 1
    elseif c == "%" and s:sub(i + 1, i + 2):find("^%x%x$") then
      out[#out + 1], i = string.char(tonumber(s:sub(i + 1, i + 2), 16)), i + 3
    else
      out[#out + 1], i = c, i + 1
    end
  end
  return table.concat(out)
end

T.test("fuzz: encode writes only unreserved characters and %XX, decode undoes it, 3000 random byte strings", function()
  math.randomseed(3986)
  for _ = 1, 3000 do
    local s = rand_string(nil, 0, 24)
    local e = url.encode(s)
    T.eq(e:gsub("%%%x%x", ""):find("[^A-Za-z0-9%-._~]"), nil, e)
    T.no_match(e, "%%%x?[a-f]", "hex digits are uppercase")
    T.eq(url.decode(e), s)
  end
end)

T.test("fuzz: decode agrees with a one-character-at-a-time reference on 3000 strings of %, + and hex", function()
  math.randomseed(1738)
  for _ = 1, 3000 do
    local s = rand_string("%%%+2bBfFzZ0 \xe9", 0, 12)
    T.eq(url.decode(s), ref_decode(s), string.format("%q", s))
  end
end)

T.test("fuzz: form_decode(form_encode(t)) gives t back for 2000 random tables, repeated names included", function()
  math.randomseed(1866)
  for _ = 1, 2000 do
    local t = {}
    for _ = 1, math.random(0, 5) do
      local k = rand_string(math.random(2) == 1 and "ab=&+% " or nil, 1, 6)
      if math.random(3) == 1 then
        local list = {}
        for i = 1, math.random(2, 4) do
          list[i] = rand_string(nil, 0, 6)
        end
        t[k] = list
      else
        t[k] = rand_string(math.random(2) == 1 and "ab=&+% %2B" or nil, 0, 8)
      end
    end
    local body = url.form_encode(t)
    T.eq(url.form_decode(body), t, body)
    T.no_match(body, "[^%w%-._~%%=&]", "only encoded names and values, = and &")
  end
end)

T.test("fuzz: form_decode splits at & and the first =, and decodes both sides, on 3000 random bodies", function()
  math.randomseed(1867)
  for _ = 1, 3000 do
    local s = rand_string("a=&+%2B", 0, 14)
    local want = {}
    for pair in (s .. "&"):gmatch("([^&]*)&") do
      local eq = pair:find("=", 1, true)
      local k = ref_decode(eq and pair:sub(1, eq - 1) or pair)
      local v = eq and ref_decode(pair:sub(eq + 1)) or ""
      if k ~= "" then
        local cur = want[k]
        want[k] = cur == nil and v or type(cur) == "table" and (function() cur[#cur + 1] = v return cur end)()
          or { cur, v }
      end
    end
    T.eq(url.form_decode(s), want, s)
  end
end)

T.test("form_encode keeps a number key and its string twin apart, and writes whole floats as integers", function()
  T.eq(url.form_encode({ [1] = "x", ["1"] = "y" }), "1=x&1=y")
  T.eq(url.form_encode({ Timeout = 30.0, Rate = 0.1, Big = 2 ^ 53, Tiny = 1e-7 }),
    "Big=9007199254740992&Rate=0.1&Timeout=30&Tiny=1e-07")
  T.eq(url.form_encode({ n = 0.1 + 0.2 }), "n=0.30000000000000004", "as many digits as read back")
  T.eq(url.encode(30.0), "30")
  T.eq(url.form_decode(url.form_encode({ x = 1 / 3 })).x, "0.3333333333333333", "tostring would write 14 digits")
end)

T.test("fuzz: a Twilio form body, spaces written + or %20 and any case of hex, checks as the params it came from", function()
  local twilio = dofile(require("callagent.core").root .. "/providers/twilio.lua")
  local full = "https://example.test/twilio/status?callId=c1&attempt=1"
  math.randomseed(2010)
  for _ = 1, 500 do
    local params = {}
    for _ = 1, math.random(1, 4) do
      local name = ({ "CallSid", "From", "To", "SpeechResult", "Digits", "CallStatus" })[math.random(6)]
      local v = rand_string("ab +%&=é✓/", 0, 8)
      if math.random(4) == 1 then
        params[name] = { v, rand_string("ab +", 0, 3) }
      else
        params[name] = v
      end
    end
    local body = url.form_encode(params):gsub("%%20", function()
      return math.random(2) == 1 and "+" or "%20"
    end):gsub("%%(%x%x)", function(h)
      return "%" .. (math.random(2) == 1 and h:lower() or h)
    end)
    local sig = twilio.signature("tok", full, params)
    T.ok(twilio.check_signature("tok", full, url.form_decode(body), sig), body)
  end
end)

local HOSTS = { "example.com", "a-b.c_d~e", "127.0.0.1", "[::1]", "[2001:db8::a]", "[fe80::1%25eth0]", "x" }

T.test("fuzz: parse gives back the parts of 3000 URLs built from random parts", function()
  math.randomseed(3987)
  local PCHARS = "abcXYZ019-._~%!$&'()*+,;=:@"
  for _ = 1, 3000 do
    local scheme = ({ "http", "HTTPS", "ws", "wss", "redis", "a+b.c-d" })[math.random(6)]
    local host = HOSTS[math.random(#HOSTS)]
    local port = math.random(3) == 1 and math.random(0, 65535) or nil
    local userinfo = math.random(3) == 1 and rand_string(PCHARS .. "@", 0, 8) or nil
    local path = math.random(3) == 1 and "" or "/" .. rand_string(PCHARS .. "/", 0, 10)
    local query = math.random(2) == 1 and rand_string(PCHARS .. "/?", 0, 10) or nil
    local fragment = math.random(3) == 1 and rand_string(PCHARS .. "/?#", 0, 6) or nil
    local u = scheme .. "://" .. (userinfo and userinfo .. "@" or "") .. host .. (port and ":" .. port or "")
      .. path .. (query and "?" .. query or "") .. (fragment and "#" .. fragment or "")
    local defaults = { http = 80, https = 443, ws = 80, wss = 443 }
    T.eq(url.parse(u), {
      scheme = scheme:lower(),
      host = host:gsub("^%[(.*)%]$", "%1"):lower(),
      port = port or defaults[scheme:lower()],
      path = path == "" and "/" or path,
      query = query,
      userinfo = userinfo,
      fragment = fragment,
    }, u)
  end
end)

T.test("fuzz: parse never raises on 5000 random strings and never repeats them in its error", function()
  math.randomseed(3988)
  local ALPHA = "hs:/[]@?#%.:0129aAfF-_~ \t\0\xff:/"
  for _ = 1, 5000 do
    local s = (math.random(2) == 1 and "http://" or "") .. rand_string(ALPHA, 0, 20) .. "SECRETpw"
    local ok, u, err = pcall(url.parse, s)
    T.ok(ok, s)
    if u then
      T.ok(u.port == nil or math.type(u.port) == "integer" and u.port >= 0 and u.port <= 65535, s)
      T.ok(u.host ~= "", s)
    else
      T.match(err, "^EINVAL: ", s)
      T.no_match(err, "SECRETpw", s)
    end
  end
end)

T.test("parse refuses ports out of range and signs, also after an IPv6 address", function()
  for _, u in ipairs({ "http://h:65536/", "http://[::1]:65536/", "http://h:99999999999999999999/", "http://h:+80/",
    "http://h:0x50/", "http://[::1]:-1/", "http://h: 80/" }) do
    T.eq(url.parse(u), nil, u)
  end
  T.eq(url.parse("http://[::1]:65535/").port, 65535)
  T.eq(url.parse("http://h:00080/").port, 80)
end)

T.test("display hides a password with a raw /, ? or # in it, and keeps the host", function()
  T.eq(url.display("wss://user:p#ss@host/x"), "wss://[redacted]@host/x")
  T.eq(url.display("wss://user:p?ss@host/x?k=v"), "wss://[redacted]@host/x?[redacted]")
  T.eq(url.display("https://u:a/b@h/x?k=1"), "https://[redacted]@h/x?[redacted]")
  T.eq(url.display("https://h/p?to=a@b#f"), "https://h/p?[redacted]#[redacted]", "an @ in the query after a path")
end)


T.test("display never shows a query's text after an @ in it when no path comes first", function()
  -- The last @ before the end was taken for the userinfo's: the query's
  -- tail after it was shown as if it were the host.
  T.eq(url.display("https://hooks.example.com?token=abc@SECRET"), "https://hooks.example.com?[redacted]")
  T.eq(url.display("https://h.example?to=a@b.com#x@y"), "https://h.example?[redacted]#[redacted]")
  T.eq(url.display("https://h.example#a@SECRET"), "https://h.example#[redacted]")
  -- A userinfo and a query with an @: a password with a raw ? reads the
  -- same, so neither is shown, nor the host either may hide in.
  T.eq(url.display("https://u:pw@host?x=a@SECRET"), "https://[redacted]")
  T.eq(url.display("https://host:8443?x=a@SECRET"), "https://[redacted]")
end)

T.test("fuzz: display never shows a userinfo, query or fragment of 3000 random URLs", function()
  math.randomseed(3989)
  -- Passwords of any printable characters but / together with ? or #.
  local PW = "abcXYZ019-._~%!$&'()*+,;=:@?#"
  for _ = 1, 3000 do
    local pw = "S" .. rand_string(math.random(2) == 1 and PW or PW:gsub("[?#]", "") .. "/", 0, 8) .. "S"
    local host = HOSTS[math.random(#HOSTS)]
    local q = math.random(2) == 1 and "?Q" .. rand_string(PW .. "/", 0, 6) .. "Q" or ""
    local f = math.random(2) == 1 and "#F" .. rand_string(PW .. "/", 0, 6) .. "F" or ""
    local path = math.random(2) == 1 and "/p" or ""
    local with_user = math.random(4) > 1
    local u = "wss://" .. (with_user and "user:" .. pw .. "@" or "") .. host .. path .. q .. f
    local d = url.display(u)
    T.no_match(d, "S.*S", u)
    T.no_match(d, "Q.*Q", u)
    T.no_match(d, "F.*F", u)
    -- Not a letter of them either (an @ in a query once showed its tail).
    T.no_match(d, "[SQF]", u)
    if with_user then
      T.match(d, "^wss://%[redacted%]", u)
    end
    if path ~= "" and d ~= "wss://[redacted]" and (with_user or not (q .. f):find("@")) then
      T.ok(d:find(host .. "/p", 1, true), u .. " -> " .. d)
    end
  end
end)

T.run()
