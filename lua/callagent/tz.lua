--- callagent.tz: local time in an IANA time zone, read from the system's tz database.
--
--   tz.localtime(name, [t]) -> {year, month, day, hour, min, sec, wday (1 = Sunday),
--                              utc_offset (seconds east of UTC), abbrev, isdst}
--                              of epoch second t (default: now) in zone name
--                              ("Europe/Paris"); or nil, "EINVAL: unknown time zone";
--                              a t that is no number, or past 2^53 s either way, raises
--   tz.valid(name)          -> whether name is a zone of the database
--
-- The zone files (RFC 8536, TZif) are read from /usr/share/zoneinfo, once per
-- zone (a few are kept). A time after a file's last transition follows its
-- footer, a POSIX TZ rule ("CET-1CEST,M3.5.0,M10.5.0/3"), as glibc does; a
-- time before the first one gets the first standard time type, as glibc does.
-- Nothing here touches the process's TZ or C library state: the C way
-- (setenv TZ, tzset, localtime_r) is not safe while other threads read the
-- environment (the resolver's, SQLite's workers).
--
-- Names: letters, digits and "/_-+" only, no leading "/" or ".", no "..", at
-- most 64 bytes; the file must be a TZif file (not zone.tab) without leap
-- second records (the "right/" zones count them in time_t, which nothing here
-- does).
local M = {}

local unpack, byte, sub, find = string.unpack, string.byte, string.sub, string.find
local floor = math.floor

M.DIR = "/usr/share/zoneinfo"
local MAX_T = 1 << 53
local CACHE_MAX = 32

local cache, cached = {}, 0

-- ---- days and dates (proleptic Gregorian, days since 1970-01-01) ----

local function days_from_civil(y, m, d)
  y = m <= 2 and y - 1 or y
  local era = y // 400
  local yoe = y - era * 400
  local doy = (153 * (m > 2 and m - 3 or m + 9) + 2) // 5 + d - 1
  local doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
  return era * 146097 + doe - 719468
end

-- For calls.lua's reading of its own time stamps.
M.days_from_civil = days_from_civil

local function civil_from_days(z)
  z = z + 719468
  local era = z // 146097
  local doe = z - era * 146097
  local yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
  local doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
  local mp = (5 * doy + 2) // 153
  local d = doy - (153 * mp + 2) // 5 + 1
  local m = mp < 10 and mp + 3 or mp - 9
  return yoe + era * 400 + (m <= 2 and 1 or 0), m, d
end

local function is_leap(y)
  return y % 4 == 0 and (y % 100 ~= 0 or y % 400 == 0)
end

local MDAYS = { 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31 }

-- ---- the POSIX TZ rule of a file's footer ----

-- A name: "<...>" (quoted, may hold digits and signs) or three or more letters.
local function rule_name(s, i)
  if sub(s, i, i) == "<" then
    local j = find(s, ">", i + 1, true)
    if not j or j - i - 1 < 3 or find(sub(s, i + 1, j - 1), "[^%w+-]") then
      return nil
    end
    return sub(s, i + 1, j - 1), j + 1
  end
  local _, j = find(s, "^%a+", i)
  if not j or j - i + 1 < 3 then
    return nil
  end
  return sub(s, i, j), j + 1
end

-- [+-]hh[:mm[:ss]] in seconds; hours up to 24 for an offset, 167 for a rule's time.
local function rule_hms(s, i, max_h)
  local sign, c = 1, sub(s, i, i)
  if c == "+" or c == "-" then
    sign, i = c == "-" and -1 or 1, i + 1
  end
  local h, j = s:match("^(%d%d?%d?)()", i)
  if not h or tonumber(h) > max_h then
    return nil
  end
  local secs = tonumber(h) * 3600
  for _, unit in ipairs({ 60, 1 }) do
    local v, nj = s:match("^:(%d%d)()", j)
    if not v then
      break
    elseif tonumber(v) > 59 then
      return nil
    end
    secs, j = secs + tonumber(v) * unit, nj
  end
  return sign * secs, j
end

-- A date rule: {kind = "J"|"n"|"M", ...}, and its time (default 02:00).
local function rule_date(s, i)
  local r, j
  local c = sub(s, i, i)
  if c == "M" then
    local m, w, d, nj = s:match("^M(%d%d?)%.(%d)%.(%d)()", i)
    m, w, d = tonumber(m), tonumber(w), tonumber(d)
    if not m or m < 1 or m > 12 or w < 1 or w > 5 or d > 6 then
      return nil
    end
    r, j = { kind = "M", m = m, w = w, d = d }, nj
  elseif c == "J" then
    local n, nj = s:match("^J(%d%d?%d?)()", i)
    n = tonumber(n)
    if not n or n < 1 or n > 365 then
      return nil
    end
    r, j = { kind = "J", n = n }, nj
  else
    local n, nj = s:match("^(%d%d?%d?)()", i)
    n = tonumber(n)
    if not n or n > 365 then
      return nil
    end
    r, j = { kind = "n", n = n }, nj
  end
  r.time = 7200
  if sub(s, j, j) == "/" then
    r.time, j = rule_hms(s, j + 1, 167)
    if not r.time then
      return nil
    end
  end
  return r, j
end

-- "STD off [DST [off] [,start[/time],end[/time]]]" -> the rule, or nil.
local function parse_rule(s)
  local std, i = rule_name(s, 1)
  if not std then
    return nil
  end
  local off
  off, i = rule_hms(s, i, 24)
  if not off then
    return nil
  end
  local r = { std = std, std_off = -off }
  if i > #s then
    return r
  end
  r.dst, i = rule_name(s, i)
  if not r.dst then
    return nil
  end
  r.dst_off = r.std_off + 3600
  local c = sub(s, i, i)
  if c ~= "," and c ~= "" then
    off, i = rule_hms(s, i, 24)
    if not off then
      return nil
    end
    r.dst_off = -off
  end
  if i > #s then -- POSIX leaves the dates to the implementation: glibc's are the US ones
    r.start = { kind = "M", m = 3, w = 2, d = 0, time = 7200 }
    r.stop = { kind = "M", m = 11, w = 1, d = 0, time = 7200 }
    return r
  end
  if sub(s, i, i) ~= "," then
    return nil
  end
  r.start, i = rule_date(s, i + 1)
  if not r.start or sub(s, i, i) ~= "," then
    return nil
  end
  r.stop, i = rule_date(s, i + 1)
  if not r.stop or i <= #s then
    return nil
  end
  return r
end

-- The day (since the epoch) a date rule names in year y.
local function rule_day(d, y)
  if d.kind == "J" then
    return days_from_civil(y, 1, 1) + d.n - 1 + ((is_leap(y) and d.n >= 60) and 1 or 0)
  elseif d.kind == "n" then
    return days_from_civil(y, 1, 1) + d.n
  end
  local first = days_from_civil(y, d.m, 1)
  local day = 1 + (d.d - (first + 4) % 7) % 7 + (d.w - 1) * 7
  local last = MDAYS[d.m] + ((d.m == 2 and is_leap(y)) and 1 or 0)
  while day > last do
    day = day - 7
  end
  return first + day - 1
end

-- utc_offset, abbrev, isdst of epoch second t under rule r. Like glibc, the
-- year is t's year in UTC; DST starts at a time of standard time and ends
-- at one of daylight time.
local function rule_at(r, t)
  if not r.dst then
    return r.std_off, r.std, false
  end
  local y = civil_from_days(t // 86400)
  local start = rule_day(r.start, y) * 86400 + r.start.time - r.std_off
  local stop = rule_day(r.stop, y) * 86400 + r.stop.time - r.dst_off
  local dst
  if start > stop then -- southern: DST over the new year
    dst = not (t >= stop and t < start)
  else -- as glibc, a start and end at the same instant is no DST at all
    dst = t >= start and t < stop
  end
  if dst then
    return r.dst_off, r.dst, true
  end
  return r.std_off, r.std, false
end

-- ---- the zone file ----

-- Files of the zone directory that are TZif but no zone's name: the
-- machine's own zone (localtime), the zic defaults (posixrules, Factory),
-- and the trees that repeat every zone with other leap second rules.
local NOT_ZONES = { localtime = true, posixrules = true, Factory = true }

local function zone_path(name)
  if type(name) ~= "string" or name == "" or #name > 64 or find(name, "^[/.]") or find(name, "..", 1, true)
    or find(name, "//", 1, true) or find(name, "[^%w/_+-]") or NOT_ZONES[name] or find(name, "^posix/")
    or find(name, "^right/") then
    return nil
  end
  return M.DIR .. "/" .. name
end

-- {trans = {epoch...}, idx = {type index...}, types = {{off, isdst, abbrev}...},
-- rule = footer rule or nil} from TZif data, or nil.
local function parse_tzif(data)
  if sub(data, 1, 4) ~= "TZif" or #data < 44 then
    return nil
  end
  local version = byte(data, 5)
  local function header(at)
    if sub(data, at, at + 3) ~= "TZif" or #data < at + 43 then
      return nil
    end
    local isut, isstd, leap, timecnt, typecnt, charcnt = unpack(">I4I4I4I4I4I4", data, at + 20)
    return { isut = isut, isstd = isstd, leap = leap, timecnt = timecnt, typecnt = typecnt, charcnt = charcnt }
  end
  local h = header(1)
  if not h or h.typecnt == 0 then
    return nil
  end
  local tsize, at = 4, 45
  if version and version >= 0x32 then -- "2" and later: skip the 32-bit block for the 64-bit one
    at = at + h.timecnt * 5 + h.typecnt * 6 + h.charcnt + h.leap * 8 + h.isstd + h.isut
    h = header(at)
    if not h or h.typecnt == 0 then
      return nil
    end
    tsize, at = 8, at + 44
  end
  if h.leap > 0 then
    return nil
  end
  local size = h.timecnt * (tsize + 1) + h.typecnt * 6 + h.charcnt + h.isstd + h.isut
  if #data < at + size - 1 then
    return nil
  end
  local z = { trans = {}, idx = {}, types = {} }
  local tfmt = tsize == 8 and ">i8" or ">i4"
  for k = 1, h.timecnt do
    z.trans[k] = unpack(tfmt, data, at + (k - 1) * tsize)
  end
  at = at + h.timecnt * tsize
  for k = 1, h.timecnt do
    local ix = byte(data, at + k - 1) + 1
    if ix > h.typecnt then
      return nil
    end
    z.idx[k] = ix
  end
  at = at + h.timecnt
  local chars = sub(data, at + h.typecnt * 6, at + h.typecnt * 6 + h.charcnt - 1)
  for k = 1, h.typecnt do
    local off, isdst, ai = unpack(">i4BB", data, at + (k - 1) * 6)
    z.types[k] = { off = off, isdst = isdst == 1, abbrev = chars:match("^[^%z]*", ai + 1) or "" }
  end
  at = at + h.typecnt * 6 + h.charcnt + h.isstd + h.isut
  if tsize == 8 then
    local footer = data:match("^\n([^\n]*)\n", at)
    if footer and footer ~= "" then
      z.rule = parse_rule(footer)
      if not z.rule then
        return nil
      end
    end
  end
  return z
end

local function load(name)
  local z = cache[name]
  if z ~= nil then
    return z
  end
  local path = zone_path(name)
  local f = path and io.open(path, "rb")
  local data = f and f:read(65536 * 4)
  if f then
    f:close()
  end
  z = data and parse_tzif(data) or false
  if cached >= CACHE_MAX then
    cache, cached = {}, 0
  end
  cache[name], cached = z, cached + 1
  return z
end

-- utc_offset, abbrev, isdst of epoch second t in zone z.
local function zone_at(z, t)
  local trans, n = z.trans, #z.trans
  if n == 0 or t < trans[1] then
    for _, ty in ipairs(z.types) do -- the first standard type, as glibc
      if not ty.isdst then
        return ty.off, ty.abbrev, false
      end
    end
    local ty = z.types[1]
    return ty.off, ty.abbrev, ty.isdst
  end
  if t >= trans[n] and z.rule then
    return rule_at(z.rule, t)
  end
  local lo, hi = 1, n -- the last transition at or before t
  while lo < hi do
    local mid = (lo + hi + 1) // 2
    if trans[mid] <= t then
      lo = mid
    else
      hi = mid - 1
    end
  end
  local ty = z.types[z.idx[lo]]
  return ty.off, ty.abbrev, ty.isdst
end

function M.valid(name)
  return load(name) and true or false
end

function M.localtime(name, t)
  local z = load(name)
  if not z then
    return nil, "EINVAL: unknown time zone"
  end
  t = math.tointeger(floor(t or os.time()))
  if not t then
    error("tz.localtime: the time must be an epoch second", 2)
  end
  -- About 285 million years either way: past that, t + offset and the
  -- rule's seconds of the year would wrap around (a negative year for
  -- math.maxinteger), not fail.
  if t > MAX_T or t < -MAX_T then
    error("tz.localtime: the time is out of range (at most 2^53 seconds from 1970)", 2)
  end
  local off, abbrev, isdst = zone_at(z, t)
  local s = t + off
  local days = s // 86400
  local secs = s - days * 86400
  local y, m, d = civil_from_days(days)
  return {
    year = y,
    month = m,
    day = d,
    hour = secs // 3600,
    min = secs % 3600 // 60,
    sec = secs % 60,
    wday = (days + 4) % 7 + 1,
    utc_offset = off,
    abbrev = abbrev,
    isdst = isdst,
  }
end

return M
