#!/usr/bin/env sh
# Start the calculator server (9999) and the caching proxy (9998) with twistd,
# run calc-client through the proxy (the menu, or one expression given as
# arguments), then stop both services. Logs go to ./demo-logs/.
set -eu
mkdir -p demo-logs
twistd -n --pidfile= --logfile=demo-logs/server.log cacheserver &
server=$!
twistd -n --pidfile= --logfile=demo-logs/proxy.log cacheproxy &
proxy=$!
trap 'kill $proxy $server 2>/dev/null; wait 2>/dev/null' EXIT INT TERM
# Wait (at most ~5 s) until the proxy accepts connections.
python3 - <<'PY'
import socket, sys, time
for _ in range(100):
    try:
        socket.create_connection(("127.0.0.1", 9998), timeout=0.2).close()
        sys.exit(0)
    except OSError:
        time.sleep(0.05)
sys.exit("the proxy did not start; see demo-logs/")
PY
calc-client --port 9998 "$@"
