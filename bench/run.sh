#!/usr/bin/env bash
# Side-by-side benchmark: smee-relay, smee-client 5 (npm) and pysmee (PyPI) relaying the same
# workloads from one `smee-relay serve` channel server to one counting target, all on loopback,
# one client after another. Per client and workload: delivered, out of order, p50/p99 end-to-end
# latency, CPU microseconds per event (utime+stime from /proc), peak RSS (VmHWM) and its growth
# over the RSS before the load. Then the spool and pipeline throughput benchmarks, and a check of
# the performance budgets (docs: BENCHMARKS.md), and what one POST costs through reqwest and
# through the relay's own delivery path.
#
# Usage: bench/run.sh [workloads...]   (default: a b c d)
#   a: 5,000 events of 1 KiB, as fast as the server takes them
#   b: 2,000 events of 1 KiB at 200 per second
#   c: 200 events of 1 MiB
#   d: one event of 10 MiB
# Writes the results to the top of BENCHMARKS.md (above the line the script keeps as a marker;
# the notes below it are left as they are). Needs cargo, npm and python3 (with venv).
set -euo pipefail
cd "$(dirname "$0")/.."
workloads=("$@")
[ $# -eq 0 ] && workloads=(a b c d)

cargo build --profile dist --locked --bin smee-relay --examples >/dev/null
relay=target/dist/smee-relay
peers=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$peers"' EXIT
echo "installing smee-client 5 and pysmee into $peers" >&2
npm install --silent --no-audit --no-fund --prefix "$peers/npm" smee-client@5 >/dev/null 2>&1
python3 -m venv "$peers/py" && "$peers/py/bin/pip" install -q pysmee >/dev/null

"$relay" serve --listen 127.0.0.1:0 >/dev/null 2>"$peers/serve.log" &
for _ in $(seq 50); do grep -q 'serving smee channels' "$peers/serve.log" && break; sleep 0.1; done
server="http://$(sed -n 's/.*addr=\([0-9.:]*\).*/\1/p' "$peers/serve.log" | head -1)"
target/dist/examples/bench_target >"$peers/target.port" &
for _ in $(seq 50); do [ -s "$peers/target.port" ] && break; sleep 0.1; done
target="http://127.0.0.1:$(cat "$peers/target.port")"
ticks=$(getconf CLK_TCK)

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
status_kib() { awk -v key="$2:" '$1 == key { print $2 }' "/proc/$1/status"; }

run_client() { # name workload
  local name=$1 workload=$2 channel="$server/bench-$1-$2-$RANDOM"
  case $name in
    # Default logging (one line per delivery), as a user runs it; every client's output goes
    # to /dev/null alike.
    smee-relay) SMEE_RELAY_STATE_DIR="$peers/state-$workload" "$relay" forward "$channel" "$target/hook" 2>/dev/null & ;;
    smee-client) "$peers/npm/node_modules/.bin/smee" -u "$channel" -t "$target/hook" >/dev/null 2>&1 & ;;
    pysmee) "$peers/py/bin/pysmee" forward "$channel" "$target/hook" >/dev/null 2>&1 & ;;
  esac
  local pid=$!
  sleep 2 # let it subscribe (a first-time subscriber gets no backlog, as on smee.io)
  local before rss_before result after rss
  before=$(cpu_ticks "$pid")
  rss_before=$(status_kib "$pid" VmRSS)
  result=$(target/dist/examples/bench_load "$channel" "$target" "$workload")
  after=$(cpu_ticks "$pid")
  rss=$(status_kib "$pid" VmHWM)
  kill "$pid"; wait "$pid" 2>/dev/null || true
  python3 - "$name" "$workload" "$result" "$((after - before))" "$ticks" "$rss" "$rss_before" <<'PY'
import json, sys
name, workload, result, cpu, ticks, rss, rss_before = sys.argv[1:]
r = json.loads(result); rep = r["report"]
delivered = rep["delivered"]
cpu_us = int(cpu) / int(ticks) * 1e6
per = cpu_us / delivered if delivered else float("nan")
mib = lambda kib: int(kib) / 1024
print(f"| {name} | {workload} | {delivered}/{r['sent']} | {rep['out_of_order']} | {rep['p50_ms']:.1f} "
      f"| {rep['p99_ms']:.1f} | {per:.0f} | {mib(rss):.1f} | {mib(rss) - mib(rss_before):.1f} |")
PY
}

rows=()
for workload in "${workloads[@]}"; do
  for client in smee-relay smee-client pysmee; do
    rows+=("$(run_client "$client" "$workload")")
    echo "${rows[-1]}" >&2
  done
done

echo "running the spool and pipeline throughput benchmarks" >&2
spool_line=$(cargo bench --locked --bench spool_throughput 2>/dev/null | grep '^spool')
pipeline_line=$(cargo bench --locked --bench pipeline_throughput 2>/dev/null | grep '^pipeline')
http_line=$(target/dist/examples/http_client_cost "$target")

printf '%s\n' "${rows[@]}" >"$peers/rows"
budgets=$(python3 - "$peers/rows" <<'PY'
import sys
rows = {}
for line in open(sys.argv[1]):
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    name, w, delivered, ooo, p50, p99, cpu, rss, growth = cells
    got, sent = map(int, delivered.split("/"))
    rows[(name, w)] = dict(lost=sent - got, ooo=int(ooo), p99=float(p99), cpu=float(cpu),
                           rss=float(rss), growth=float(growth))

def check(what, ok, detail):
    print(f"| {what} | {detail} | {'met' if ok else '**not met**'} |")

print("| budget | measured | |")
print("|---|---|---|")
ours, peer = rows.get(("smee-relay", "a")), rows.get(("smee-client", "a"))
if ours and peer:
    ratio = peer["cpu"] / ours["cpu"]
    check("(a) CPU per event at most 1/10 of smee-client's", ratio >= 10,
          f"{ours['cpu']:.0f} µs vs {peer['cpu']:.0f} µs (1/{ratio:.1f})")
if ours:
    check("(a) peak RSS at most 16 MiB", ours["rss"] <= 16, f"{ours['rss']:.1f} MiB")
ours = rows.get(("smee-relay", "c"))
if ours:
    check("(c) peak RSS at most 64 MiB", ours["rss"] <= 64, f"{ours['rss']:.1f} MiB")
ours, peer = rows.get(("smee-relay", "b")), rows.get(("smee-client", "b"))
if ours and peer:
    check("(b) p99 latency no worse than smee-client's", ours["p99"] <= peer["p99"],
          f"{ours['p99']:.1f} ms vs {peer['p99']:.1f} ms")
for w in "abc":
    ours = rows.get(("smee-relay", w))
    if ours:
        check(f"({w}) nothing lost, nothing reordered", ours["lost"] == 0 and ours["ooo"] == 0,
              f"{ours['lost']} lost, {ours['ooo']} out of order")
ours = rows.get(("smee-relay", "d"))
if ours:
    check("(d) one 10 MiB event: growth at most 3x the payload (30 MiB)",
          ours["lost"] == 0 and ours["growth"] <= 30, f"{ours['growth']:.1f} MiB")
PY
)

marker='<!-- Everything above this line is written by bench/run.sh; notes below it are kept. -->'
notes=$( [ -f BENCHMARKS.md ] && awk -v m="$marker" 'found { print } $0 == m { found = 1 }' BENCHMARKS.md || true)
{
  echo "# Benchmarks"
  echo
  echo "Run: \`bench/run.sh\` on $(date -u +%Y-%m-%d), $(nproc) cores, $(uname -m), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(uname -sr)."
  echo "Workloads: (a) 5,000 events of 1 KiB as fast as the server takes them; (b) 2,000 of 1 KiB at 200/s;"
  echo "(c) 200 of 1 MiB; (d) one of 10 MiB. One \`smee-relay serve\` and one counting target on loopback;"
  echo "each client relays the same workload in turn. CPU is the client process's user+system time per"
  echo "delivered event; peak RSS is its VmHWM, growth that minus its RSS just before the load."
  echo "smee-relay runs with its spool (fsync before delivery) and default logging; all clients log to /dev/null."
  echo
  echo "| client | workload | delivered | out of order | p50 ms | p99 ms | CPU µs/event | peak RSS MiB | RSS growth MiB |"
  echo "|---|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
  echo
  echo "Budgets (the benchmark issue), for smee-relay in this run:"
  echo
  echo "$budgets"
  echo
  echo "The parts, measured in the same run:"
  echo
  echo "- \`cargo bench --bench spool_throughput\`: $spool_line"
  echo "- \`cargo bench --bench pipeline_throughput\`: $pipeline_line"
  echo "- \`examples/http_client_cost.rs\` (against the same target): $http_line"
  echo
  echo "$marker"
  [ -n "$notes" ] && echo "$notes"
} > BENCHMARKS.md.new
mv BENCHMARKS.md.new BENCHMARKS.md
awk -v m="$marker" '{ print } $0 == m { exit }' BENCHMARKS.md
