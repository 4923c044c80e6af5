#!/usr/bin/env bash
# Launch the app on the deployed SuperLink with `flwr run`, stream its log, and
# exit 0 only when the SuperLink reports the run `finished:completed`
# (`flwr run --stream` itself exits 0 even when the ServerApp failed).
#
# Usage: deploy/run.sh [--connection NAME] [--app DIR] [--log FILE] [flwr run options]
#
#   --connection NAME   SuperLink connection in the Flower config
#                       (default: mosaic-deploy, see deploy/add_connection.py)
#   --app DIR           the Flower app (default: this repository)
#   --log FILE          copy of the streamed log (default:
#                       ./deploy-state/runs/<date-time>.log)
#   anything else goes to `flwr run`, e.g.
#       --run-config "num-clients=3 strategy='mosaic' output-dir='/abs/results'"
#
# The ServerApp runs on the SuperLink's machine: output-dir is a folder there.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

connection="mosaic-deploy"; app="$REPO_DIR"; log=""; flwr_args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --connection) connection="$2"; shift 2 ;;
        --app) app="$2"; shift 2 ;;
        --log) log="$2"; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) flwr_args+=("$1"); shift ;;
    esac
done
find_flower
if [[ -z "$log" ]]; then
    prepare_state deploy-state
    log="deploy-state/runs/$(date +%Y%m%d-%H%M%S).log"
fi
mkdir -p "$(dirname "$log")"

echo "+ flwr run $app $connection --stream ${flwr_args[*]+"${flwr_args[*]}"}"
set +e
flwr run "$app" "$connection" --stream ${flwr_args[@]+"${flwr_args[@]}"} 2>&1 | tee "$log"
set -e

run_id="$(sed -n 's/.*Successfully started run \([0-9][0-9]*\).*/\1/p' "$log" | head -n 1)"
[[ -n "$run_id" ]] || die "the run did not start (see the messages above; log: $log)"

# The stream can end before the run does (e.g. a dropped connection): wait for its end.
status=""
for _ in $(seq 1 720); do
    status="$(flwr ls "$connection" --run-id "$run_id" --format json 2>/dev/null \
        | "$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["runs"][0]["status"])' \
        2>/dev/null || true)"
    [[ "$status" == finished:* ]] && break
    sleep 5
done
results="$(sed -n 's/.*Results go to \(.*\)$/\1/p' "$log" | head -n 1)"
echo
echo "run $run_id: ${status:-unknown status}"
[[ -n "$results" ]] && echo "results (on the SuperLink's machine): $results"
echo "log: $log"
[[ "$status" == "finished:completed" ]]
