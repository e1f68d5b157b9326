#!/usr/bin/env sh
# Start the calculator server (9999) and the caching proxy (9998) with twistd,
# run calc-client through the proxy (the menu, or one expression given as
# arguments), then stop both services. Logs go to ./demo-logs/.
# SERVER_PORT=... and PROXY_PORT=... choose other ports.
set -eu
server_port=${SERVER_PORT:-9999}
proxy_port=${PROXY_PORT:-9998}

# twistd and calc-client come with the package, in the virtualenv it was
# installed into: without them on PATH nothing below can work.
for program in twistd calc-client; do
    if ! command -v "$program" >/dev/null 2>&1; then
        echo "demo.sh: $program is not on PATH: activate the virtualenv the package was" \
            "installed into (. .venv/bin/activate), or install it with:" \
            "python3 -m venv .venv && . .venv/bin/activate && pip install ." >&2
        exit 1
    fi
done

# Both ports must be free: otherwise the client would talk to whatever
# already listens there instead of the services started here.
python3 - "$server_port" "$proxy_port" <<'PY'
import socket
import sys

busy = []
for port in sys.argv[1:]:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", int(port)))
        except OSError:
            busy.append(port)
if busy:
    sys.exit(
        f"demo.sh: 127.0.0.1:{' and '.join(busy)} already in use (a service started "
        "earlier?); stop it first, or choose other ports with SERVER_PORT=... PROXY_PORT=..."
    )
PY

mkdir -p demo-logs
rm -f demo-logs/server.log demo-logs/proxy.log # each run's logs, not the sum of all
twistd -n --pidfile= --logfile=demo-logs/server.log cacheserver --port "$server_port" &
server=$!
twistd -n --pidfile= --logfile=demo-logs/proxy.log \
    cacheproxy --port "$proxy_port" --server-port "$server_port" &
proxy=$!
trap 'kill $proxy $server 2>/dev/null; wait 2>/dev/null' EXIT INT TERM

# Wait (at most ~10 s) until each of our own services accepts connections;
# stop at once if one of them has exited.
running() {
    state=$(ps -o stat= -p "$1" 2>/dev/null || true)
    case "$state" in "" | Z*) return 1 ;; esac
}
accepting() {
    python3 -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 0.2).close()' "$1" 2>/dev/null
}
wait_for() { # pid port name
    tries=0
    until accepting "$2"; do
        if ! running "$1"; then
            echo "demo.sh: the $3 did not start; see demo-logs/$3.log" >&2
            exit 1
        fi
        tries=$((tries + 1))
        if [ "$tries" -ge 100 ]; then
            echo "demo.sh: the $3 did not listen within 10 s; see demo-logs/$3.log" >&2
            exit 1
        fi
        sleep 0.1
    done
}
wait_for "$server" "$server_port" server
wait_for "$proxy" "$proxy_port" proxy

calc-client --port "$proxy_port" "$@"
