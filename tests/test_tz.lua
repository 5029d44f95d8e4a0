-- callagent.tz against the C library: the same zone files read by glibc
-- (GNU date with TZ set) must give the same local time, offset and
-- abbreviation, second for second, around every change of offset.
local T = require "testing"
local tz = require "callagent.tz"

local FMT = "+%Y-%m-%d %H:%M:%S %w %::z %Z"

local function ours(zone, t)
  local r = assert(tz.localtime(zone, t))
  local off = math.abs(r.utc_offset)
  return string.format("%04d-%02d-%02d %02d:%02d:%02d %d %s%02d:%02d:%02d %s", r.year, r.month, r.day, r.hour,
    r.min, r.sec, r.wday - 1, r.utc_offset < 0 and "-" or "+", off // 3600, off % 3600 // 60, off % 60, r.abbrev)
end

-- The seconds where zone's offset or abbreviation changes within [from, to),
-- found with tz itself (4-hour steps, then bisection): glibc checks them.
local function changes(zone, from, to)
  local out = {}
  local function key(t)
    local r = tz.localtime(zone, t)
    return r.utc_offset .. r.abbrev
  end
  local prev = key(from)
  local step = 4 * 3600
  for t = from + step, to, step do
    local k = key(t)
    if k ~= prev then
      local lo, hi = t - step, t
      while hi - lo > 1 do
        local mid = (lo + hi) // 2
        if key(mid) == prev then
          lo = mid
        else
          hi = mid
        end
      end
      out[#out + 1] = hi
      prev = k
    end
  end
  return out
end

local function epoch(y, m, d)
  return os.time({ year = y, month = m, day = d, hour = 12 }) -- the test's own zone: only a rough point
end

-- Timestamps to check in zone: fixed points from 1850 to 2200, pseudo-random
-- ones, and each change (and the seconds either side) in a year of the
-- zone's table and in years past it, where its footer rule applies.
local function times(zone, seed)
  local ts = { 0, -1, 2147483647, 2147483648, -2147483649, epoch(1850, 6, 1), epoch(1900, 1, 1), epoch(1945, 5, 8),
    epoch(2000, 2, 29), epoch(2026, 11, 27), epoch(2037, 12, 31), epoch(2038, 1, 19), epoch(2100, 3, 1),
    epoch(2200, 7, 4) }
  local x = seed
  for _ = 1, 40 do
    x = (x * 1103515245 + 12345) % 2147483648
    ts[#ts + 1] = -2208988800 + x * 3 -- 1900 to about 2104
  end
  for _, span in ipairs({ { 2026, 2027 }, { 2045, 2046 }, { 2100, 2101 } }) do
    for _, t in ipairs(changes(zone, epoch(span[1], 1, 1), epoch(span[2], 1, 1))) do
      ts[#ts + 1], ts[#ts + 2], ts[#ts + 3] = t - 1, t, t + 1
    end
  end
  return ts
end

local function glibc(zone, ts)
  local dir = T.tmpdir()
  local path = dir .. "/times"
  local f = assert(io.open(path, "w"))
  for _, t in ipairs(ts) do
    f:write("@", string.format("%d", t), "\n")
  end
  f:close()
  local code, out, err = T.exec({ "date", "-f", path, FMT }, { env = { TZ = zone } })
  T.eq(code, 0, "date: " .. table.concat(err, "\n"))
  return out
end

local function compare(zones)
  local bad, checked = {}, 0
  for n, zone in ipairs(zones) do
    local ts = times(zone, n)
    -- GNU date writes the offset of an uninhabited zone ("-00") as -00:00:00.
    local want = glibc(zone, ts)
    for k, line in ipairs(want) do
      want[k] = line:gsub("%-00:00:00 %-00$", "+00:00:00 -00")
    end
    T.eq(#want, #ts, zone .. ": one line per time")
    for k, t in ipairs(ts) do
      local got = ours(zone, t)
      checked = checked + 1
      if got ~= want[k] then
        bad[#bad + 1] = string.format("%s @%d: ours %s, glibc %s", zone, t, got, want[k])
        break
      end
    end
  end
  T.diag(#zones .. " zones, " .. checked .. " times checked")
  T.eq(bad, {}, "zones where callagent.tz and glibc disagree")
end

T.test("zones with odd rules give what glibc gives, from 1850 to 2200, around every change", function()
  compare({
    "Europe/Paris", "America/New_York", "America/Los_Angeles", "Europe/London", "Europe/Dublin",
    "Asia/Kolkata", "Asia/Kathmandu", "Australia/Lord_Howe", "Australia/Sydney", "Pacific/Auckland",
    "Pacific/Chatham", "Pacific/Apia", "Pacific/Kiritimati", "America/Nuuk", "Asia/Jerusalem",
    "America/Santiago", "America/Asuncion", "Africa/Casablanca", "Antarctica/Troll", "America/Sao_Paulo",
    "America/St_Johns", "Asia/Tehran", "Europe/Moscow", "America/Havana", "Africa/Cairo",
    "UTC", "Etc/GMT+5", "Etc/GMT-14", "America/Argentina/Buenos_Aires", "EST5EDT",
  })
end, { timeout = 60000 })

T.test("every zone of zone1970.tab gives what glibc gives", function()
  local zones = {}
  for line in io.lines("/usr/share/zoneinfo/zone1970.tab") do
    local name = line:match("^[^#]%S*%s+%S+%s+(%S+)")
    if name then
      zones[#zones + 1] = name
    end
  end
  T.gt(#zones, 300, "zone1970.tab lists the world's zones")
  compare(zones)
end, { timeout = 120000 })

T.test("names that are not zones, or files that are not zone files, are unknown", function()
  for _, name in ipairs({ "", "Nowhere/City", "../../etc/passwd", "/etc/localtime", "./UTC", "Europe/../UTC",
    "zone.tab", "zone1970.tab", "tzdata.zi", "right/Europe/Paris", "Europe", "Europe/Paris\0x",
    "Europe/Paris ", string.rep("A", 65), "Europe\\Paris", "Europe//Paris", "Europe/Paris/",
    -- TZif files, but no zone's name: the machine's own zone, zic's defaults, the posix/ copies.
    "localtime", "posixrules", "Factory", "posix/Europe/Paris" }) do
    local r, err = tz.localtime(name, 0)
    T.eq(r, nil, name)
    T.eq(err, "EINVAL: unknown time zone", name)
    T.eq(tz.valid(name), false, name)
  end
  T.eq(tz.valid("Europe/Paris"), true)
  T.eq(tz.valid("Etc/GMT+5"), true)
  T.raises(function()
    tz.localtime("UTC", "soon")
  end)
end)

T.test("the time defaults to now", function()
  local r = tz.localtime("UTC")
  local now = os.date("!*t")
  T.eq({ r.year, r.month, r.day }, { now.year, now.month, now.day })
  T.eq(r.utc_offset, 0)
  T.eq(r.isdst, false)
end)

T.test("isdst tells summer time", function()
  T.eq(tz.localtime("Europe/Paris", 1782000000).isdst, true) -- 2026-06-21
  T.eq(tz.localtime("Europe/Paris", 1795000000).isdst, false) -- 2026-11-18
  T.eq(tz.localtime("Europe/Paris", 4121000000).isdst, true) -- 2100-08-04, the footer's rule
end)

T.run()
