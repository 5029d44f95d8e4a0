--- callagent.fetch: HTTP(S) client on the event loop (libcurl multi, see src/fetch.c).
--
--   local fetch = require "callagent.fetch"
--   local res, err = fetch(url, opts)     inside a task: waits (yields) until done,
--                                         then for its turn (callagent.task.pace)
--   local req = fetch.request(opts, fn)   opts.url required; fn(res) or fn(nil, err)
--                                         runs later, exactly once; returns a handle
--   req:cancel()                          stop it: fn gets nil, "ECANCELED";
--                                         true if it was still in flight
--   fetch.active()                        requests whose result is not delivered yet
--
-- opts (all optional):
--   method           "GET" always by default, also when a body is given
--   headers          { ["Content-Type"] = "application/json", Authorization = "..." }
--   body             string; without a Content-Type header curl sends
--                    application/x-www-form-urlencoded
--   timeout          total ms (default 30000; 0 = none)
--   connect_timeout  ms (default 10000; 0 = curl's own, 300000), within timeout
--   max_body         response body limit in bytes (default 16 MiB)
--   truncate         a body past max_body is cut there (res.truncated = true)
--                    instead of an EMSGSIZE error (default false): for a caller
--                    that needs the status, not the whole body; with
--                    max_body 0 it ends with the headers (res.truncated =
--                    true): a body that never comes is not waited for
--   follow           follow redirects, at most 5 (default false); from https only
--                    to https. Your headers go along, but for Authorization and
--                    Cookie when the host changes: keep secrets out of others
--   ca_file          PEM file of extra CAs, trusted in addition to the system store
--   username, password  HTTP basic auth (e.g. Twilio account SID and token)
--
-- res = { status = 200, headers = { ["content-type"] = "...", ... }, body = "...",
--         time_ms = 12.3, truncated = true when cut at max_body }: header names
--         lowercase, repeated headers joined with ", ".
-- err = "ECODE: message": ETIMEDOUT, ECONNREFUSED (could not connect), ENOTFOUND,
-- ETLS, EMSGSIZE (body over max_body), EINVAL (bad URL, scheme not http/https,
-- also in a followed redirect, or http after https), ECANCELED, ECURL
-- (anything else: a reply that is not HTTP, too many redirects, response
-- headers over curl's 300 KiB).
-- No error carries a password, an Authorization value or a proxy URL's
-- user:password. Any status code is a result, not an error.
--
-- Wrong option types, a header value with CR/LF or a bad method raise.
-- A request whose handle is dropped still completes and calls fn. Proxies
-- come from the usual environment variables (http_proxy, https_proxy, no_proxy).
local core = require "callagent.core.fetch"
local task = require "callagent.task"

local request = core.request

local M = { active = core.active }

function M.request(opts, fn)
  if type(opts) ~= "table" then
    error("fetch.request needs an options table with a url", 2)
  end
  if type(opts.url) ~= "string" then
    error("fetch.request: opts.url must be a string, got " .. type(opts.url), 2)
  end
  return request(opts.url, opts, fn)
end

-- The caller goes on with the response when it is its turn (task.pace):
-- responses come in bursts too (a hundred calls dialed at once).
local function paced(...)
  task.pace()
  return ...
end

function M.fetch(url, opts)
  return paced(task.await(function(done)
    request(url, opts, done)
  end))
end

return setmetatable(M, {
  __call = function(_, url, opts)
    return M.fetch(url, opts)
  end,
})
