#!/usr/bin/env bash
# Start one Flower SuperNode: it connects to the SuperLink over HTTPS,
# authenticates with its private key, and trains on its own data.
#
# Usage: deploy/start_supernode.sh --partition-id N [options] [-- extra flower-supernode options]
#
#   --name NAME          this node's name (default: supernode-<partition-id>); its
#                        key is KEYS/NAME, its log DIR/nodes/NAME/supernode.log,
#                        its PID DIR/nodes/NAME/pid
#   --superlink H:P      the SuperLink's address (default: 127.0.0.1:9092)
#   --state DIR          deployment state folder (default: ./deploy-state)
#   --ca FILE            the CA certificate that signed the SuperLink's certificate
#                        (default: DIR/certificates/ca.crt)
#   --key FILE           this node's private key (default: DIR/keys/NAME); its
#                        public key must be registered with the SuperLink
#   --port PORT          this node's local runtime port, 127.0.0.1 only (default:
#                        9094 + partition-id); SuperNodes on one machine need
#                        different ports
#   Node settings (the node's --node-config, see mosaic_flwr/node.py):
#   --partition-id N     which share of the data set this node trains on, and its
#                        identity in the results (0 .. num-clients-1, required)
#   --num-partitions M   must equal the run's num-clients (default: not set = the
#                        run's num-clients)
#   --data-path DIR      train on this local data set (the node's own data)
#                        instead of partition N of the shared one
#   --device DEV         cpu, cuda, cuda:N (default: the run config's `device`)
#   --threads N          torch threads (default: the run config's `num-threads`)
#   --model NAME@WIDTH   the model this node trains, e.g. resnet8@0.5 (default: its
#                        `client-models` entry, or the global model)
#   --log-dir DIR        where the node appends one JSON line per message it
#                        answered (default: DIR/nodes/NAME/logs)
#   --state-dir DIR      where the node saves what it keeps between rounds, so a
#                        resumed run continues it (default: DIR/nodes/NAME/state)
#   --foreground         run in this terminal instead of in the background
#
# In the background (the default) it waits until the SuperLink has accepted the
# node, prints its PID, and returns; a node whose key is not registered is
# refused and this script fails. Stop nodes with deploy/stop.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

name=""; superlink="127.0.0.1:9092"; state="deploy-state"; ca=""; key=""; port=""
pid_=""; nparts=""; data_path=""; device=""; threads=""; model=""; log_dir=""; state_dir=""; foreground=0; extra=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --name) name="$2"; shift 2 ;;
        --superlink) superlink="$2"; shift 2 ;;
        --state) state="$2"; shift 2 ;;
        --ca) ca="$2"; shift 2 ;;
        --key) key="$2"; shift 2 ;;
        --port) port="$2"; shift 2 ;;
        --partition-id) pid_="$2"; shift 2 ;;
        --num-partitions) nparts="$2"; shift 2 ;;
        --data-path) data_path="$2"; shift 2 ;;
        --device) device="$2"; shift 2 ;;
        --threads) threads="$2"; shift 2 ;;
        --model) model="$2"; shift 2 ;;
        --log-dir) log_dir="$2"; shift 2 ;;
        --state-dir) state_dir="$2"; shift 2 ;;
        --foreground) foreground=1; shift ;;
        --) shift; extra=("$@"); break ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done

[[ -n "$pid_" ]] || die "--partition-id is required (see --help)"
find_flower
name="${name:-supernode-$pid_}"
port="${port:-$((9094 + pid_))}"
state="$(abspath "$state")"
ca="$(abspath "${ca:-$state/certificates/ca.crt}")"
key="$(abspath "${key:-$state/keys/$name}")"
log_dir="$(abspath "${log_dir:-$state/nodes/$name/logs}")"
state_dir="$(abspath "${state_dir:-$state/nodes/$name/state}")"
[[ -f "$ca" ]] || die "CA certificate $ca not found (copy ca.crt from the SuperLink's machine)"
[[ -f "$key" ]] || die "private key $key not found; make it with: python deploy/make_supernode_keys.py $name"

# --node-config: TOML values, strings quoted.
node_config="partition-id=$pid_"
[[ -n "$nparts" ]] && node_config+=" num-partitions=$nparts"
if [[ -n "$data_path" ]]; then
    [[ -e "$data_path" ]] || die "--data-path $data_path does not exist"
    node_config+=" data-path='$(abspath "$data_path")'"
fi
[[ -n "$device" ]] && node_config+=" device='$device'"
[[ -n "$threads" ]] && node_config+=" num-threads=$threads"
[[ -n "$model" ]] && node_config+=" model='$model'"
node_config+=" log-dir='$log_dir' state-dir='$state_dir'"

prepare_state "$state"
node_dir="$state/nodes/$name"
mkdir -p "$node_dir"
log="$node_dir/supernode.log"
start_line=$( { wc -l < "$log"; } 2>/dev/null || echo 0)

launch "$foreground" "$log" "$node_dir/pid" \
    flower-supernode \
    --superlink "$superlink" \
    --root-certificates "$ca" \
    --auth-supernode-private-key "$key" \
    --port "$port" \
    --node-config "$node_config" \
    ${extra[@]+"${extra[@]}"}

# Background: wait until the SuperLink accepted the node (or refused it).
for _ in $(seq 1 120); do
    if tail -n "+$((start_line + 1))" "$log" 2>/dev/null | grep -q "SuperNode ID:"; then
        echo "SuperNode $name running (PID $LAUNCHED_PID), partition $pid_; log: $log"
        exit 0
    fi
    if ! kill -0 "$LAUNCHED_PID" 2>/dev/null; then
        show_log_tail "$log"
        rm -f "$node_dir/pid"
        die "SuperNode $name exited: a key that is not registered, a wrong CA or address? see $log"
    fi
    sleep 0.5
done
echo "SuperNode $name (PID $LAUNCHED_PID) started but is not connected yet (it keeps" \
     "retrying; is the SuperLink at $superlink up?); log: $log"
