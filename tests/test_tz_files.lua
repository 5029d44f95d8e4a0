-- callagent.tz on zone files written here (RFC 8536 TZif v1, v2, v3):
-- footers with odd POSIX rules give what glibc gives for the same file
-- (TZ set to its path), and truncated or hostile files are unknown zones,
-- never an error.
local T = require "testing"
local tz = require "callagent.tz"

local FMT = "+%Y-%m-%d %H:%M:%S %::z %Z"

-- A TZif file: version "\0", "2" or "3"; transitions {{t, type}...} (type
-- 0-based); types {{off, isdst, abbrev}...}; footer (v2+).
local function tzif(version, trans, types, footer)
  local function block(tfmt)
    local chars, idx = {}, {}
    local ttinfo = {}
    local at = 0
    for _, ty in ipairs(types) do
      ttinfo[#ttinfo + 1] = string.pack(">i4BB", ty[1], ty[2] and 1 or 0, at)
      chars[#chars + 1] = ty[3] .. "\0"
      at = at + #ty[3] + 1
    end
    local times = {}
    for _, tr in ipairs(trans) do
      times[#times + 1] = string.pack(tfmt, tr[1])
      idx[#idx + 1] = string.char(tr[2])
    end
    local charstr = table.concat(chars)
    return "TZif" .. version .. string.rep("\0", 15)
      .. string.pack(">I4I4I4I4I4I4", 0, 0, 0, #trans, #types, #charstr)
      .. table.concat(times) .. table.concat(idx) .. table.concat(ttinfo) .. charstr
  end
  if version == "\0" then
    return block(">i4")
  end
  return block(">i4") .. block(">i8") .. "\n" .. (footer or "") .. "\n"
end

local seq = 0
-- Writes data as a zone of a fresh directory; returns the zone's name and path.
local function zone(dir, data)
  seq = seq + 1
  local name = "Test/Zone_" .. seq
  os.execute("mkdir -p " .. dir .. "/Test")
  local f = assert(io.open(dir .. "/" .. name, "wb"))
  f:write(data)
  f:close()
  return name, dir .. "/" .. name
end

local function with_dir(dir, fn)
  local old = tz.DIR
  tz.DIR = dir
  T.defer(function()
    tz.DIR = old
  end)
  return fn()
end

local function ours(name, t)
  local r = assert(tz.localtime(name, t))
  local off = math.abs(r.utc_offset)
  return string.format("%04d-%02d-%02d %02d:%02d:%02d %s%02d:%02d:%02d %s", r.year, r.month, r.day, r.hour, r.min,
    r.sec, r.utc_offset < 0 and "-" or "+", off // 3600, off % 3600 // 60, off % 60, r.abbrev)
end

local function glibc(path, ts)
  local dir = T.tmpdir()
  local f = assert(io.open(dir .. "/times", "w"))
  for _, t in ipairs(ts) do
    f:write("@", string.format("%d", t), "\n")
  end
  f:close()
  local code, out, err = T.exec({ "date", "-f", dir .. "/times", FMT }, { env = { TZ = path } })
  T.eq(code, 0, "date: " .. table.concat(err, "\n"))
  return out
end

-- Every 6 hours from 2030 through 2032 (southern summers whole; a leap year for Jn and n).
local function year_times()
  local ts = {}
  for t = 1893456000, 1988150400, 6 * 3600 do
    ts[#ts + 1] = t
  end
  return ts
end

T.test("footers with southern, Jn, n, v3 (negative and 167-hour) and same-instant rules give what glibc gives", function()
  local dir = T.tmpdir()
  with_dir(dir, function()
    local bad = {}
    for _, footer in ipairs({
      "AEST-10AEDT,M10.1.0,M4.1.0/3", -- southern: DST over the new year
      "<-03>3<-02>,M9.1.6/24,M4.1.6/24", -- quoted names, 24:00
      "EST5EDT,J60/1,J300", -- Jn skips Feb 29
      "EST5EDT,59/1,300", -- n counts it
      "<-02>2<-01>,M3.5.0/-1,M10.5.0/0", -- v3: a negative time
      "IST-1GMT0,M10.5.0,M3.5.0/1", -- negative DST (Europe/Dublin's)
      "XXX3EDT,0/0,J365/25", -- DST all year (zic's form)
      "AAA0BBB-1,M3.5.0/1,M3.5.0/2", -- starts and ends at the same instant: never DST, as glibc
      "<+0530>-5:30<+0630>-6:30:15,M4.1.0/167,M9.5.0/-167", -- minutes, seconds, 167 hours both ways
      "WET0", -- no DST at all
    }) do
      local name, path = zone(dir, tzif("3", { { 0, 0 } }, { { 0, false, "LMT" } }, footer))
      local ts = year_times()
      local want = glibc(path, ts)
      for k, t in ipairs(ts) do
        local got = ours(name, t)
        if got ~= want[k] then
          bad[#bad + 1] = string.format("%s @%d: ours %s, glibc %s", footer, t, got, want[k])
          break
        end
      end
    end
    T.eq(bad, {}, "footers where callagent.tz and glibc disagree")
  end)
end, { timeout = 30000 })

T.test("a v1 file (no footer) keeps its last type after its last transition, its first standard one before", function()
  local dir = T.tmpdir()
  with_dir(dir, function()
    local name, path = zone(dir, tzif("\0", { { -100000, 1 }, { 100000, 2 } },
      { { 3600, true, "ADT" }, { -7200, false, "AAA" }, { 19800, false, "BBB" } }))
    local ts = { -2 ^ 31, -100001, -100000, 0, 99999, 100000, 2 ^ 31 - 1, 4102444800 }
    local want = glibc(path, ts)
    for k, t in ipairs(ts) do
      T.eq(ours(name, t), want[k], "@" .. t)
    end
  end)
end)

T.test("truncated, hostile or leap-second files are unknown zones, not errors", function()
  local dir = T.tmpdir()
  with_dir(dir, function()
    local good = tzif("2", { { 0, 0 } }, { { 3600, false, "CET" } }, "CET-1")
    local cases = {
      { "empty", "" },
      { "magic only", "TZif2" },
      { "header cut", good:sub(1, 43) },
      { "v1 block cut", good:sub(1, 50) },
      { "v2 header cut", good:sub(1, #good - 30) },
      -- A type index past the types.
      { "bad index", tzif("2", { { 0, 5 } }, { { 3600, false, "CET" } }, "CET-1") },
      -- Counts near 2^32: nothing is read past the end, nothing huge is made.
      { "huge counts", "TZif2" .. string.rep("\0", 15) .. string.pack(">I4I4I4I4I4I4", 0xffffffff, 0xffffffff,
        0, 0xffffffff, 0xffffffff, 0xffffffff) .. string.rep("\0", 64) },
      { "no types", "TZif\0" .. string.rep("\0", 15) .. string.pack(">I4I4I4I4I4I4", 0, 0, 0, 0, 0, 0) },
      { "bad footer", tzif("2", {}, { { 3600, false, "CET" } }, "CET-1CEST,M13.1.0,M10.5.0") },
      { "footer name too short", tzif("2", {}, { { 3600, false, "CET" } }, "C-1") },
      { "footer offset past 24 h", tzif("2", {}, { { 3600, false, "CET" } }, "CET-25") },
      { "footer rule time past 167 h", tzif("2", {}, { { 3600, false, "CET" } }, "CET-1CEST,M3.5.0/168,M10.5.0") },
      { "leap seconds", "TZif2" .. string.rep("\0", 15) .. string.pack(">I4I4I4I4I4I4", 0, 0, 1, 0, 1, 4)
        .. string.pack(">i4BB", 0, 0, 0) .. "UTC\0" .. string.pack(">i4i4", 78796800, 1) .. string.rep("\0", 200) },
    }
    for _, case in ipairs(cases) do
      local name = zone(dir, case[2])
      local ok, r, err = pcall(tz.localtime, name, 0)
      T.ok(ok, case[1] .. ": no error raised: " .. tostring(r))
      T.eq({ r, err }, { nil, "EINVAL: unknown time zone" }, case[1])
      T.eq(tz.valid(name), false, case[1])
    end
    T.eq(ours(zone(dir, good), 0), "1970-01-01 01:00:00 +01:00:00 CET", "the uncut file")
  end)
end)

T.test("times far in the past and future give a date; past 2^53 s an argument error, not a wrapped-around year", function()
  for _, t in ipairs({ -2 ^ 53, -62135596800, 253402300799, 2 ^ 53 }) do
    local r = tz.localtime("Europe/Paris", t)
    T.ok(r and math.type(r.year) == "integer", "@" .. t)
  end
  local r = tz.localtime("America/New_York", 253402300799) -- 9999-12-31 23:59:59 UTC
  T.eq({ r.year, r.month, r.day, r.hour, r.abbrev }, { 9999, 12, 31, 18, "EST" })
  r = tz.localtime("UTC", -62135596800) -- 0001-01-01
  T.eq({ r.year, r.month, r.day, r.wday }, { 1, 1, 1, 2 })
  -- Past 2^53 s the arithmetic would wrap (math.maxinteger gave a negative year): an argument error.
  for _, t in ipairs({ math.maxinteger, math.mininteger, 2 ^ 62, (1 << 53) + 1 }) do
    T.raises(function()
      tz.localtime("Europe/Paris", t)
    end, "out of range", "@" .. string.format("%.0f", t))
  end
end)

T.run()
