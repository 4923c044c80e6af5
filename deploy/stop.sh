#!/usr/bin/env bash
# Stop what deploy/start_superlink.sh and deploy/start_supernode.sh started in
# the background, by the PIDs they recorded: first the SuperNodes, then the
# SuperLink (each with the processes it started: ClientApps, ServerApps).
#
# Usage: deploy/stop.sh [--state DIR] [NAME...]
#
#   --state DIR   deployment state folder (default: ./deploy-state)
#   NAME          only these: a SuperNode's name (e.g. supernode-1) or
#                 `superlink` (default: all SuperNodes, then the SuperLink)
#
# Sends SIGTERM, waits up to 15 s, then SIGKILL. A PID whose process is no
# longer a Flower process (the PID was reused) is left alone. Processes started
# with --foreground stop with Ctrl+C in their terminal.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

state="deploy-state"; names=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --state) state="$2"; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) names+=("$1"); shift ;;
    esac
done

pidfiles=()
if [[ ${#names[@]} -eq 0 ]]; then
    for file in "$state"/nodes/*/pid "$state/superlink/pid"; do
        [[ -f "$file" ]] && pidfiles+=("$file")
    done
else
    for name in "${names[@]}"; do
        if [[ "$name" == superlink ]]; then pidfiles+=("$state/superlink/pid")
        else pidfiles+=("$state/nodes/$name/pid"); fi
    done
fi
[[ ${#pidfiles[@]} -gt 0 ]] || { echo "nothing to stop in $state"; exit 0; }

is_flower() {  # is_flower PID: alive and a flower-superlink/flower-supernode process
    [[ -r "/proc/$1/cmdline" ]] && { tr '\0' ' ' < "/proc/$1/cmdline" | grep -q "flower-super"; return; }
    ps -p "$1" -o command= 2>/dev/null | grep -q "flower-super"  # no /proc (macOS)
}

signal() {  # signal SIG PID: the process group when PID leads one (setsid), else PID
    if [[ "$(ps -o pgid= -p "$2" 2>/dev/null | tr -d ' ')" == "$2" ]]; then
        kill "-$1" -- "-$2" 2>/dev/null || true
    else
        kill "-$1" "$2" 2>/dev/null || true
    fi
}

for file in "${pidfiles[@]}"; do
    what="$(basename "$(dirname "$file")")"
    if [[ ! -f "$file" ]]; then echo "$what: no PID file ($file)"; continue; fi
    pid="$(cat "$file")"
    if ! is_flower "$pid"; then
        echo "$what: PID $pid is not running (any more)"; rm -f "$file"; continue
    fi
    signal TERM "$pid"
    for _ in $(seq 1 30); do is_flower "$pid" || break; sleep 0.5; done
    if is_flower "$pid"; then
        signal KILL "$pid"
        echo "$what: PID $pid killed (did not stop within 15 s)"
    else
        echo "$what: PID $pid stopped"
    fi
    rm -f "$file"
done
