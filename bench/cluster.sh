#!/usr/bin/env bash
# Cluster-mode benchmark: three relays with [cluster] on one nats-server (-js), all on this
# machine, against the single-machine path (one relay, no cluster), from one `smee-relay serve`
# channel to one counting target (examples/bench_target), events of 1 KiB (examples/bench_load):
#   throughput: workload a (5,000 as fast as the server takes them): events/s end to end;
#   latency:    workload b (2,000 at 200/s): p50/p99, and p99 added by the cluster path;
#   added p99:  workload e (100 at 5/s, below either path's capacity): p99 of the cluster
#               path against the single-machine path;
#   failover:   workload e on the cluster, kill -9 of the instance delivering 3 s in: the
#               longest gap between two arrivals (ack_wait is 5s here), and duplicates.
# Prints a markdown table (for BENCHMARKS.md). Needs nats-server on PATH or NATS_SERVER_BIN.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${BENCH_PROFILE:-dist}
# Only what this script runs: each example is a separate link (fat LTO in `dist`: minutes).
[ "${BENCH_NO_BUILD:-0}" = 1 ] || cargo build --profile "$profile" --locked --bin smee-relay --example bench_load --example bench_target >/dev/null
bin=target/$profile; [ "$profile" = dev ] && bin=target/debug
relay=$bin/smee-relay
nats=${NATS_SERVER_BIN:-nats-server}
work=$(mktemp -d)
trap 'kill -9 $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

"$nats" -js -a 127.0.0.1 -p -1 -sd "$work/js" 2>"$work/nats.log" &
for _ in $(seq 100); do grep -q 'Server is ready' "$work/nats.log" && break; sleep 0.1; done
nats_url="nats://$(sed -n 's/.*Listening for client connections on \([0-9.:]*\).*/\1/p' "$work/nats.log" | head -1)"
"$relay" serve --listen 127.0.0.1:0 >/dev/null 2>"$work/serve.log" &
for _ in $(seq 50); do grep -q 'serving smee channels' "$work/serve.log" && break; sleep 0.1; done
server="http://$(sed -n 's/.*addr=\([0-9.:]*\).*/\1/p' "$work/serve.log" | head -1)"
$bin/examples/bench_target >"$work/target.port" &
for _ in $(seq 50); do [ -s "$work/target.port" ] && break; sleep 0.1; done
target="http://127.0.0.1:$(cat "$work/target.port")"

pids=()
start_relays() { # count cluster(0|1) channel name
  local count=$1 cluster=$2 channel=$3 name=$4 i
  pids=()
  for i in $(seq "$count"); do
    local dir="$work/$name-$i"; mkdir -p "$dir"
    { echo "[[channel]]"; echo "url = \"$channel\""; echo "forward = [\"$target/hook\"]"
      if [ "$cluster" = 1 ]; then
        echo "[cluster]"; echo "nats_url = \"$nats_url\""; echo "name = \"$name\""; echo 'ack_wait = "5s"'
      fi; } >"$dir/config.toml"
    RUST_LOG=info,smee_relay::cluster=debug "$relay" run --config "$dir/config.toml" \
      --state-dir "$dir/state" 2>"$dir/log" >/dev/null &
    pids+=($!)
  done
  sleep 3 # subscribed and joined (a first-time subscriber gets no backlog, as on smee.io)
}
stop_relays() { kill "${pids[@]}" 2>/dev/null || true; wait "${pids[@]}" 2>/dev/null || true; }

run() { # label count cluster workload
  local label=$1 count=$2 cluster=$3 workload=$4 channel="$server/bench-$RANDOM$RANDOM"
  start_relays "$count" "$cluster" "$channel" "b$RANDOM"
  local t0 t1 result
  t0=$(date +%s.%N)
  result=$($bin/examples/bench_load "$channel" "$target" "$workload")
  t1=$(date +%s.%N)
  stop_relays
  python3 - "$label" "$workload" "$result" "$t0" "$t1" <<'PY'
import json, sys
label, workload, result, t0, t1 = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
r = result["report"]
print(f"| {label} | {workload} | {r['distinct']}/{result['sent']} | {r['delivered'] - r['distinct']} | {r['out_of_order']} | {r['distinct'] / (t1 - t0):.0f} | {r['p50_ms']} | {r['p99_ms']} | {r['max_gap_ms']} |")
PY
}

failover() {
  local channel="$server/bench-$RANDOM$RANDOM" name="f$RANDOM"
  start_relays 3 1 "$channel" "$name"
  BENCH_PATIENCE_S=30 $bin/examples/bench_load "$channel" "$target" e >"$work/failover.json" &
  local load=$!
  sleep 3
  # The instance that took the latest delivery from the cluster is the one delivering.
  local newest="" newest_pid="" i=0 line
  for i in "${!pids[@]}"; do
    line=$(grep 'took a delivery from the cluster' "$work/$name-$((i + 1))/log" | tail -1 | cut -c1-30)
    if [[ -n "$line" && "$line" > "$newest" ]]; then newest=$line; newest_pid=${pids[$i]}; fi
  done
  kill -9 "$newest_pid"
  wait "$load"
  stop_relays
  python3 - "$(cat "$work/failover.json")" <<'PY'
import json, sys
result = json.loads(sys.argv[1]); r = result["report"]
print(f"| 3 relays + nats, kill -9 of the delivering one (ack_wait 5s) | e | {r['distinct']}/{result['sent']} | {r['delivered'] - r['distinct']} | {r['out_of_order']} | | {r['p50_ms']} | {r['p99_ms']} | {r['max_gap_ms']} |")
PY
}

echo "Run: \`bench/cluster.sh\` on $(date -u +%F), $(nproc) cores, $(uname -m), profile $profile, $("$nats" --version)."
echo
echo "| setup | workload | delivered (distinct) | duplicates | out of order | events/s | p50 ms | p99 ms | longest gap ms |"
echo "|---|---|---|---|---|---|---|---|---|"
run "1 relay (single machine)" 1 0 a
run "3 relays + nats-server" 3 1 a
run "1 relay (single machine)" 1 0 b
run "3 relays + nats-server" 3 1 b
run "1 relay (single machine)" 1 0 e
run "3 relays + nats-server" 3 1 e
failover
