#!/usr/bin/env bash
# Side-by-side benchmark: smee-relay, smee-client 5 (npm) and pysmee (PyPI) relaying the same
# workloads from one `smee-relay serve` channel server to one counting target, all on loopback.
# Per client and workload: delivered, out of order, p50/p99 end-to-end latency, CPU microseconds
# per event (utime+stime from /proc), peak RSS (VmHWM). Writes BENCHMARKS.md.
# Usage: bench/run.sh [workloads...]   (default: a b c; d = one 10 MiB event)
set -euo pipefail
cd "$(dirname "$0")/.."
workloads=("${@:-a}")
[ $# -eq 0 ] && workloads=(a b c)

cargo build --release --bin smee-relay --examples >/dev/null
relay=target/release/smee-relay
peers=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$peers"' EXIT
npm install --silent --no-audit --no-fund --prefix "$peers/npm" smee-client@5 >/dev/null 2>&1
python3 -m venv "$peers/py" && "$peers/py/bin/pip" install -q pysmee >/dev/null

port_of() { sed -n 's/.*:\([0-9]*\)$/\1/p' <<<"$1"; }
"$relay" serve --listen 127.0.0.1:0 >/dev/null 2>"$peers/serve.log" &
for _ in $(seq 50); do grep -q 'serving smee channels' "$peers/serve.log" && break; sleep 0.1; done
server="http://$(sed -n 's/.*addr=\([0-9.:]*\).*/\1/p' "$peers/serve.log" | head -1)"
target/release/examples/bench_target >"$peers/target.port" &
sleep 0.5
target="http://127.0.0.1:$(cat "$peers/target.port")"
ticks=$(getconf CLK_TCK)

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
peak_kib() { awk '/VmHWM/ { print $2 }' "/proc/$1/status"; }

run_client() { # name workload
  local name=$1 workload=$2 channel="$server/bench-$1-$2-$RANDOM"
  case $name in
    smee-relay) SMEE_RELAY_STATE_DIR="$peers/state-$workload" "$relay" -q forward "$channel" "$target/hook" & ;;
    smee-client) "$peers/npm/node_modules/.bin/smee" -u "$channel" -t "$target/hook" >/dev/null & ;;
    pysmee) "$peers/py/bin/pysmee" forward "$channel" "$target/hook" >/dev/null 2>&1 & ;;
  esac
  local pid=$!
  sleep 2 # let it subscribe (a first-time subscriber gets no backlog, as on smee.io)
  local before; before=$(cpu_ticks "$pid")
  local result; result=$(target/release/examples/bench_load "$channel" "$target" "$workload")
  local after; after=$(cpu_ticks "$pid")
  local rss; rss=$(peak_kib "$pid")
  kill "$pid"; wait "$pid" 2>/dev/null || true
  python3 - "$name" "$workload" "$result" "$((after - before))" "$ticks" "$rss" <<'PY'
import json, sys
name, workload, result, cpu, ticks, rss = sys.argv[1:]
r = json.loads(result); rep = r["report"]
delivered = rep["delivered"]
cpu_us = int(cpu) / int(ticks) * 1e6
per = cpu_us / delivered if delivered else float("nan")
print(f"| {name} | {workload} | {delivered}/{r['sent']} | {rep['out_of_order']} | {rep['p50_ms']:.1f} | {rep['p99_ms']:.1f} | {per:.0f} | {int(rss)/1024:.1f} |")
PY
}

rows=()
for workload in "${workloads[@]}"; do
  for client in smee-relay smee-client pysmee; do
    rows+=("$(run_client "$client" "$workload")")
    echo "${rows[-1]}" >&2
  done
done

{
  echo "# Benchmarks"
  echo
  echo "Run: \`bench/run.sh\` on $(date -u +%Y-%m-%d), $(nproc) cores, $(uname -m), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)."
  echo "Workloads: (a) 5,000 events of 1 KiB as fast as the server takes them; (b) 2,000 at 200/s; (c) 200 of 1 MiB; (d) one of 10 MiB."
  echo "One \`smee-relay serve\` and one counting target on loopback; each client relays the same workload in turn."
  echo "CPU is the client process's user+system time per delivered event; RSS is its peak (VmHWM)."
  echo
  echo "| client | workload | delivered | out of order | p50 ms | p99 ms | CPU µs/event | peak RSS MiB |"
  echo "|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
} > BENCHMARKS.md
cat BENCHMARKS.md
