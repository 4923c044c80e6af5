#!/usr/bin/env bash
# Start the Flower SuperLink with TLS and SuperNode authentication.
#
# Usage: deploy/start_superlink.sh [options] [-- extra flower-superlink options]
#
#   --state DIR     deployment state folder (default: ./deploy-state); the
#                   SuperLink keeps its database (runs, registered SuperNode
#                   keys) in DIR/superlink/state.db, its log in
#                   DIR/superlink/superlink.log and its PID in DIR/superlink/pid
#   --certs DIR     folder with ca.crt, server.pem, server.key
#                   (default: DIR/certificates, made by deploy/make_certificates.py)
#   --host HOST     address to listen on (default: 127.0.0.1; use 0.0.0.0 so
#                   SuperNodes on other machines can connect)
#   --port PORT     the one HTTPS port for SuperNodes (Fleet API), the flwr CLI
#                   (Control API) and the ServerApp (default: 9092)
#   --foreground    run in this terminal (Ctrl+C stops it) instead of in the
#                   background; for systemd, tmux or a container
#
# In the background (the default) it waits until the SuperLink answers over
# HTTPS, prints its PID, and returns; stop it with deploy/stop.sh.
# The ServerApp runs inside this environment (runtime dependency installation
# is off), so install the project here first: pip install -e .
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

state="deploy-state"; certs=""; host="127.0.0.1"; port="9092"; foreground=0; extra=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --state) state="$2"; shift 2 ;;
        --certs) certs="$2"; shift 2 ;;
        --host) host="$2"; shift 2 ;;
        --port) port="$2"; shift 2 ;;
        --foreground) foreground=1; shift ;;
        --) shift; extra=("$@"); break ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done

find_flower
state="$(abspath "$state")"
certs="$(abspath "${certs:-$state/certificates}")"
for file in ca.crt server.pem server.key; do
    [[ -f "$certs/$file" ]] || die "$certs/$file not found; make it with: python deploy/make_certificates.py --out $certs"
done
prepare_state "$state"
mkdir -p "$state/superlink"
log="$state/superlink/superlink.log"

launch "$foreground" "$log" "$state/superlink/pid" \
    flower-superlink \
    --ssl-ca-certfile "$certs/ca.crt" \
    --ssl-certfile "$certs/server.pem" \
    --ssl-keyfile "$certs/server.key" \
    --enable-supernode-auth \
    --disable-runtime-dependency-installation \
    --host "$host" --port "$port" \
    --database "$state/superlink/state.db" \
    ${extra[@]+"${extra[@]}"}

# Background: wait until it answers over HTTPS (which also checks the certificate).
probe="$host"
[[ "$host" == "0.0.0.0" ]] && probe="127.0.0.1"
[[ "$host" == "::" ]] && probe="::1"
[[ "$probe" == *:* ]] && probe="[$probe]"
for _ in $(seq 1 120); do
    if ! kill -0 "$LAUNCHED_PID" 2>/dev/null; then
        show_log_tail "$log"
        die "flower-superlink exited; see $log"
    fi
    if "$PYTHON" - "https://$probe:$port/health" "$certs/ca.crt" <<'EOF' 2>/dev/null
import ssl, sys, httpx
context = ssl.create_default_context(cafile=sys.argv[2])
sys.exit(0 if httpx.get(sys.argv[1], verify=context, timeout=1).is_success else 1)
EOF
    then
        echo "SuperLink running (PID $LAUNCHED_PID) on https://$probe:$port; log: $log"
        exit 0
    fi
    sleep 0.5
done
show_log_tail "$log"
die "the SuperLink (PID $LAUNCHED_PID) did not answer on https://$probe:$port within 60 s"
