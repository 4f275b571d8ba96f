#!/usr/bin/env bash
# Python client tests for `moeflux serve`: the official openai and anthropic SDKs against a
# real server running the bundled model.
#
#   bash tests/server/run.sh            # venv in .venv-server, release build, pytest
#
# Environment: MOEFLUX_BIN (use this binary instead of building), MOEFLUX_SERVER_VENV (venv
# path), PYTHON (interpreter for the venv), PYTEST_ARGS (extra pytest arguments).
# Exits non-zero if the build, the server start or any test fails.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

VENV=${MOEFLUX_SERVER_VENV:-$ROOT/.venv-server}
if [ ! -x "$VENV/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r tests/server/requirements.txt

if [ -n "${MOEFLUX_BIN:-}" ]; then
    BIN=$MOEFLUX_BIN
else
    cargo build --release -p moeflux
    BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/moeflux
fi

PORT=$("$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
KEY=test-key-$RANDOM$RANDOM
LOG=$(mktemp "${TMPDIR:-/tmp}/moeflux-serve.XXXXXX.log")
MOEFLUX_API_KEY=$KEY "$BIN" serve --device cpu --host 127.0.0.1 --port "$PORT" >"$LOG" 2>&1 &
SERVER=$!
stop_server() {
    if kill -0 "$SERVER" 2>/dev/null; then
        kill -TERM "$SERVER" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$SERVER" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$SERVER" 2>/dev/null || true
    fi
    wait "$SERVER" 2>/dev/null || true
}
trap stop_server EXIT

# Wait for /health to say ready (the model loads after the port is bound).
if ! "$VENV/bin/python" - "$PORT" "$SERVER" <<'PY'
import json, os, sys, time, urllib.request
port, pid = sys.argv[1], int(sys.argv[2])
deadline = time.time() + 120
while time.time() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("moeflux serve exited during startup")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            if json.load(r).get("status") == "ready":
                sys.exit(0)
    except Exception:
        pass
    time.sleep(0.2)
sys.exit("moeflux serve did not become ready in 120 s")
PY
then
    echo "--- server log ---" >&2; cat "$LOG" >&2
    exit 1
fi

set +e
MOEFLUX_BASE_URL=http://127.0.0.1:$PORT MOEFLUX_API_KEY=$KEY MOEFLUX_MODEL=bundled \
    "$VENV/bin/python" -m pytest -p no:cacheprovider -q -rfE tests/server ${PYTEST_ARGS:-}
STATUS=$?
set -e

stop_server
trap - EXIT
if [ $STATUS -ne 0 ]; then
    echo "--- server log (last 50 lines) ---" >&2; tail -n 50 "$LOG" >&2
fi
rm -f "$LOG"
exit $STATUS
