#!/usr/bin/env bash
# The whole deployment guide on one machine, in one command: certificates,
# SuperNode keys, a SuperLink with TLS and SuperNode authentication on
# 127.0.0.1, three registered SuperNodes (partitions 0-2 of digits), one short
# Mosaic run checked for `finished:completed`, then everything stopped again.
#
# Usage: deploy/demo_loopback.sh [--state DIR] [--port PORT] [--keep] [-- run-config values]
#
#   --state DIR   deployment state folder (default: ./deploy-state)
#   --port PORT   the SuperLink's port (default: 9092)
#   --keep        leave the SuperLink and SuperNodes running (stop them later
#                 with deploy/stop.sh)
#   after --       run-config values replacing the short schedule's, e.g.
#                 -- "strategy='fedprox' num-server-rounds=2"
#
# Results go to ./outputs/deploy/<run-name>/; about 2 minutes on 2 CPU cores.
# Safe to run again: existing certificates, keys and registrations are reused.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

state="deploy-state"; port="9092"; keep=0; run_config=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --state) state="$2"; shift 2 ;;
        --port) port="$2"; shift 2 ;;
        --keep) keep=1; shift ;;
        --) shift; run_config="$*"; break ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
find_flower
cd "$REPO_DIR"
connection="mosaic-deploy"

step() { printf '\n==> %s\n' "$*"; }

step "1. CA and SuperLink certificate"
"$PYTHON" deploy/make_certificates.py --out "$state/certificates"
step "2. SuperNode keys"
"$PYTHON" deploy/make_supernode_keys.py --out "$state/keys" --count 3
step "3. SuperLink (TLS, SuperNode authentication) on 127.0.0.1:$port"
deploy/start_superlink.sh --state "$state" --port "$port"
[[ "$keep" == 1 ]] || trap 'step "8. Stop everything"; deploy/stop.sh --state "$state"' EXIT
step "4. Connection '$connection' for the flwr CLI"
"$PYTHON" deploy/add_connection.py --name "$connection" --address "127.0.0.1:$port" \
    --ca "$state/certificates/ca.crt"
step "5. Register the SuperNodes' public keys"
for i in 0 1 2; do
    if ! out="$(flwr supernode register "$state/keys/supernode-$i.pub" "$connection" 2>&1)"; then
        grep -q "already in use" <<<"$out" || { echo "$out" >&2; exit 1; }
        echo "supernode-$i: already registered"
    else
        echo "$out" | tail -n 1
    fi
done
step "6. SuperNodes (partitions 0, 1, 2 of 3; 1 thread each; logs in $state/nodes/)"
for i in 0 1 2; do
    deploy/start_supernode.sh --state "$state" --superlink "127.0.0.1:$port" \
        --partition-id "$i" --num-partitions 3 --device cpu --threads 1
done
flwr supernode ls "$connection"
step "7. Run Mosaic (short schedule) and check its final status"
deploy/run.sh --connection "$connection" --log "$state/runs/$(date +%Y%m%d-%H%M%S).log" --run-config \
    "num-clients=3 num-server-rounds=3 local-epochs=1 strategy='mosaic' mosaic-warmup-rounds=1 mosaic-generator-steps=20 mosaic-meta-epochs=10 mosaic-distill-steps=20 output-dir='$REPO_DIR/outputs/deploy'" \
    ${run_config:+--run-config "$run_config"}
