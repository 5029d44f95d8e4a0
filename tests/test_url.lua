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

T.run()
