-- callagent.notify against hostile receivers: what a receiver may do on the
-- wire that callagent.http would not (a raw peer in Node).
local T = require "testing"
local process = require "callagent.process"
local store_mod = require "callagent.store"
local notify = require "callagent.notify"

-- A raw HTTP/1.1 receiver: each request's path picks a behaviour; it counts
-- the requests it got (GET /count answers the number).
local raw_base
local function raw_server()
  if raw_base then
    return raw_base
  end
  local p = assert(process.spawn({ "node", "-e", [[
    const net = require('net');
    const seen = {};
    const routes = {
      // The status and headers, then a body that never comes.
      '/stall/agent': (c) => c.write('HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n'),
      // Answers at the headers, without reading the body, and closes.
      '/early/agent': (c) => { c.end('HTTP/1.1 413 Payload Too Large\r\nConnection: close\r\nContent-Length: 0\r\n\r\n'); },
      // A redirect to an address of 100 KB.
      '/bigloc/agent': (c) => c.write('HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:9/' + 'a'.repeat(100000) + '\r\nContent-Length: 0\r\n\r\n'),
      '/count': (c, q) => {
        const b = String(seen[q] || 0);
        c.write('HTTP/1.1 200 OK\r\nContent-Length: ' + b.length + '\r\n\r\n' + b);
      },
    };
    net.createServer((c) => {
      c.on('error', () => {});
      let got = '';
      c.on('data', (d) => {
        got += d;
        let i;
        while ((i = got.indexOf('\r\n\r\n')) >= 0) {
          const head = got.slice(0, i);
          const target = head.split(' ')[1];
          const m = /content-length: *(\d+)/i.exec(head);
          const len = m ? Number(m[1]) : 0;
          const [path0] = target.split('?');
          if (path0 === '/early/agent') { seen[path0] = (seen[path0] || 0) + 1; got = ''; routes[path0](c); return; }
          if (got.length < i + 4 + len) return; // the rest of the body
          got = got.slice(i + 4 + len);
          const [path, q] = target.split('?');
          if (path !== '/count') seen[path] = (seen[path] || 0) + 1;
          (routes[path] || ((c) => c.write('HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n')))(c, q || '');
        }
      });
    }).listen(0, '127.0.0.1', function () { console.log(this.address().port); });
  ]] }))
  raw_base = "http://127.0.0.1:" .. assert(p:read_line(10000), "the raw server's port")
  return raw_base
end

local function count(path)
  local fetch = require "callagent.fetch"
  local res = assert(fetch(raw_server() .. "/count?" .. path))
  return tonumber(res.body)
end

-- A notifier on a fresh SQLite store sending to the raw receiver's
-- <hooks>/agent.
local function notifier(hooks, opts)
  local store = assert(store_mod.open({ backend = "sqlite", path = T.tmpdir() .. "/n.db", retentionDays = 30 }))
  T.defer(function()
    store:close()
  end)
  local n = notify.new({ hooksUrl = raw_server() .. hooks, hooksToken = "hooks-token-for-tests" }, store, opts)
  T.defer(function()
    n:stop()
  end)
  return n, store
end

T.test("a 200 whose body never comes is delivered once, not sent again at every try and sweep", function()
  -- Only the status and headers are read; a receiver that answered them
  -- and then held the body back (a Content-Length it never sends) ran each
  -- try to its timeout: a failure, sent again at every try and every sweep.
  local n, store = notifier("/stall", { attempts = 3, base_delay_ms = 20, timeout_ms = 500 })
  assert(store:add_notification("c_1:completed", "c_1", "{}"))
  n:send("c_1:completed", "{}")
  T.wait_for(function()
    return not n.in_flight["c_1:completed"]
  end, 10000, "the delivery over")
  T.eq({ count("/stall/agent"), #store:pending_notifications() }, { 1, 0 }, "delivered at the first try")
end)
T.test("a receiver that refuses a large notification before reading it (413, closed): refused, not retried", function()
  local n, store = notifier("/early", { attempts = 3, base_delay_ms = 20, timeout_ms = 2000 })
  local body = '{"message":"' .. string.rep("x", 4 * 1024 * 1024) .. '"}'
  assert(store:add_notification("c_1:completed", "c_1", body))
  n:send("c_1:completed", body)
  T.wait_for(function()
    return not n.in_flight["c_1:completed"]
  end, 10000, "the delivery over")
  T.eq({ count("/early/agent"), #store:pending_notifications() }, { 1, 0 }, "refused at the first try")
end)
-- A notifier in an app of its own (its log is read), sending one
-- notification to N_HOOKS.
local RUN = [[
local store_mod = require "callagent.store"
local notify = require "callagent.notify"
local task = require "callagent.task"
local timer = require "callagent.timer"
local runtime = require "callagent.runtime"
task.spawn(function()
  local store = assert(store_mod.open({ backend = "sqlite", path = os.getenv("N_DB"), retentionDays = 30 }))
  local n = notify.new({ hooksUrl = os.getenv("N_HOOKS"), hooksToken = "hooks-token-for-tests" }, store,
    { base_delay_ms = 20, attempts = 2 })
  assert(store:add_notification("c_1:completed", "c_1", "{}"))
  n:send("c_1:completed", "{}")
  timer.sleep(20)
  while next(n.in_flight) do
    timer.sleep(20)
  end
  n:stop()
  store:close()
  runtime.exit(0)
end)
]]

T.test("a redirect to an address of 100 KB: no stall of the event loop, and a log line of its start", function()
  -- The address is shown without its password and query (url.display),
  -- whose search for the userinfo's "@" was quadratic: 100 KB, the most curl
  -- takes of a header line, held the event loop (every call's audio) for
  -- 45 s; and the line quoted all of it.
  local p = T.spawn_app(nil, nil, { source = RUN, name = "run.lua",
    env = { N_DB = T.tmpdir() .. "/n.db", N_HOOKS = raw_server() .. "/bigloc" } })
  T.eq(p:wait(3000), 0, "exits 0, within 3 s: " .. p.errtext():sub(1, 2000))
  local log = p.errtext()
  local line = log:match("[^\n]*notification redirected[^\n]*")
  T.ok(line, "the redirect logged:\n" .. log)
  T.match(line, "location=http://127%.0%.0%.1:9/aaaa")
  T.le(#line, 2048, "the line")
end)
T.run()
