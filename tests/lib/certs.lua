--- certs: a throwaway CA and a server certificate for 127.0.0.1 and
-- localhost, made with the openssl tool (a Debian package `make deps` installs).
--
--   local certs = require "certs"
--   local c = certs.make(dir)  -- {ca = "dir/ca.pem", cert = "dir/srv.pem", key = "dir/srv.key"}
--
-- Raises when the tool fails: a test that needs TLS must not pass without it.
local M = {}

function M.make(dir)
  local cmd = "{ " .. table.concat({
    "cd '" .. dir .. "'",
    "printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\\n' > ext.cnf",
    "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1"
      .. " -subj /CN=callagent-test-ca -addext basicConstraints=critical,CA:TRUE"
      .. " -addext keyUsage=keyCertSign,cRLSign -keyout ca.key -out ca.pem",
    "openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
      .. " -subj /CN=127.0.0.1 -keyout srv.key -out srv.csr",
    "openssl x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1"
      .. " -extfile ext.cnf -out srv.pem",
  }, " && ") .. "; } >/dev/null 2>&1"
  local ok = os.execute(cmd)
  if not ok then
    error("the openssl tool could not make test certificates in " .. dir)
  end
  return { ca = dir .. "/ca.pem", cert = dir .. "/srv.pem", key = dir .. "/srv.key" }
end

return M
