# Shared helpers for the deploy/*.sh scripts (sourced, not run).
#
# - finds the Flower executables (the activated environment, else ./.venv);
# - sets the environment every Flower process of a deployment runs with;
# - starts a process in the background in its own session (its PID is also its
#   process-group id, so deploy/stop.sh can stop it and its children), writing
#   a PID file and a log file, or replaces the shell with it (--foreground).

DEPLOY_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(dirname "$DEPLOY_DIR")"

die() { echo "error: $*" >&2; exit 1; }

# Flower starts helper executables (flower-superexec, flwr-serverapp,
# flwr-clientapp) by name, so the environment's bin folder must be on PATH.
find_flower() {
    if ! command -v flower-superlink >/dev/null 2>&1; then
        if [[ -x "$REPO_DIR/.venv/bin/flower-superlink" ]]; then
            export PATH="$REPO_DIR/.venv/bin:$PATH"
        else
            die "flower-superlink not found: activate the project's environment first
       (python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 -e .)"
        fi
    fi
    PYTHON="$(dirname "$(command -v flower-superlink)")/python"
    [[ -x "$PYTHON" ]] || PYTHON="$(command -v python3)"
}

# No update checks; telemetry off unless the user set it; the app's dependencies
# come from this environment (no `uv sync` at run time).
export FLWR_DISABLE_UPDATE_CHECK="${FLWR_DISABLE_UPDATE_CHECK:-1}"
export FLWR_TELEMETRY_ENABLED="${FLWR_TELEMETRY_ENABLED:-0}"

# abspath PATH: an absolute path (the file need not exist).
abspath() {
    case "$1" in
        /*) printf '%s\n' "$1" ;;
        *) printf '%s/%s\n' "$(pwd)" "${1#./}" ;;
    esac
}

# prepare_state DIR: make the state folder, and keep git away from it.
prepare_state() {
    mkdir -p "$1"
    [[ -e "$1/.gitignore" ]] || printf '*\n' > "$1/.gitignore"
}

# launch FOREGROUND LOG PIDFILE COMMAND...: run COMMAND in the foreground (exec),
# or detached in its own session with output to LOG and its PID in PIDFILE.
launch() {
    local foreground="$1" log="$2" pidfile="$3"
    shift 3
    printf '+'; printf ' %q' "$@"; printf '\n'
    if [[ "$foreground" == 1 ]]; then
        exec "$@"
    fi
    if [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        die "already running with PID $(cat "$pidfile") ($pidfile); stop it with deploy/stop.sh"
    fi
    mkdir -p "$(dirname "$log")" "$(dirname "$pidfile")"
    if command -v setsid >/dev/null 2>&1; then
        setsid "$@" >>"$log" 2>&1 </dev/null &
    else  # macOS: no setsid; the process then shares our process group
        nohup "$@" >>"$log" 2>&1 </dev/null &
    fi
    LAUNCHED_PID=$!
    echo "$LAUNCHED_PID" > "$pidfile"
}

# show_log_tail LOG: the end of a log, to explain a failure.
show_log_tail() {
    echo "---- last lines of $1 ----" >&2
    tail -n 25 "$1" >&2 || true
}
