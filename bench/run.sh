#!/usr/bin/env bash
# Side-by-side benchmark on smee.io's wire: smee-relay, a "floor" loop, smee-client 5 (npm) and
# pysmee (PyPI) relaying the same workloads from one `smee-relay serve --smee-wire` channel
# server (smee.io's frame shape: `{...headers, body, query, timestamp}` with the body
# re-serialised, whatever the subscriber asks for) to one counting target, all on loopback, one
# client after another. smee-relay's raw mode (exact bodies, from a second `serve` that honours
# the opt-in) is a separate row, "smee-relay (raw)". "floor" is examples/floor.rs: the same SSE
# stack, frame decoder and HTTP client as the relay in a bare read-then-POST loop, with no spool;
# "floor (fsync)" is the same loop appending each group of frames to a file and fdatasync'ing it
# before the POSTs: the least any relay that keeps the spool's promise can cost on this machine.
# Per client and workload (the median of BENCH_ROUNDS rounds; delivered and out of order the worst
# round's): delivered, out of order, p50/p99 end-to-end latency, CPU microseconds
# per event (utime+stime from /proc), peak RSS (VmHWM) and its growth over the RSS before the
# load. Then the CPU each client burns idle for 60 s with a connected stream (all at once, in the
# same minute), and a check of the budgets (issue 19; docs: BENCHMARKS.md).
#
# Usage: bench/run.sh [workloads...]   (default: a b d idle)
#   a: 5,000 events of 1 KiB, as fast as the server takes them
#   b: 1,000 events of 1 KiB at 200 per second
#   c: 200 events of 1 MiB (pysmee takes minutes here and is left out)
#   d: one event of 10 MiB
#   idle: 60 s with a connected stream and no events
# Environment: BENCH_PROFILE (cargo profile, default dist: what ships), BENCH_RELAY (another
# smee-relay binary to measure, e.g. target/dist/smee-relay with BENCH_PROFILE=release for the
# peers), BENCH_NO_BUILD=1 (use what is built), BENCH_TARGET (the counting target binary),
# BENCH_WIRE_PROXY=1 (smee.io's wire through bench/smee_wire_proxy.py, for a `serve` without
# --smee-wire), BENCH_COMPARE (a second smee-relay binary, e.g. target/release/smee-relay,
# measured in the same run as the row "smee-relay (BENCH_COMPARE_LABEL)", default label
# "compare"), BENCH_CLIENTS (which clients, space-separated; default all), BENCH_ROUNDS (rounds
# per workload, default 3; each row is the median of its rounds), BENCH_PARTS=1 to also run
# the spool and pipeline benches and the HTTP client cost, BENCH_OUT (default BENCHMARKS.md; `-`
# prints the report instead of writing it).
# Writes the results to the top of BENCH_OUT (above the line the script keeps as a marker; the
# notes below it are left as they are). Needs cargo, npm and python3 (with venv).
set -euo pipefail
cd "$(dirname "$0")/.."
workloads=("$@")
[ $# -eq 0 ] && workloads=(a b d idle)
rounds=${BENCH_ROUNDS:-3}
if ! [[ $rounds =~ ^[1-9][0-9]*$ ]]; then
  echo "bench: BENCH_ROUNDS must be a whole number of rounds, 1 or more, not '$rounds'" >&2
  exit 2
fi
profile=${BENCH_PROFILE:-dist}
out=${BENCH_OUT:-BENCHMARKS.md}
load_before=$(cut -d' ' -f1-3 /proc/loadavg)

# Only the examples this run uses: each is a separate (fat-)LTO link of minutes.
examples=(--example bench_load --example bench_target --example floor)
[ "${BENCH_PARTS:-0}" = 1 ] && examples+=(--example http_client_cost)
# The binary alone, as packaging/build-deb.sh builds it (built with the examples, the
# dependencies' features would differ, and with them the binary's function order: build.rs).
if [ "${BENCH_NO_BUILD:-0}" != 1 ]; then
  cargo build --profile "$profile" --locked --bin smee-relay >/dev/null
  cargo build --profile "$profile" --locked "${examples[@]}" >/dev/null
fi
dir=${CARGO_TARGET_DIR:-target}/$profile
[ "$profile" = dev ] && dir=${CARGO_TARGET_DIR:-target}/debug
relay=${BENCH_RELAY:-$dir/smee-relay}
# A stale function order only costs memory; say so rather than stop.
[ "$profile" = dist ] && { packaging/symbol-order.sh check "$relay" || true; }
compare_name="smee-relay (${BENCH_COMPARE_LABEL:-compare})"
peers=$(mktemp -d)
# The channel servers start inside `$(...)`, so they are not this shell's jobs: their pids are
# kept in a file (each run left its two `serve` processes behind before).
trap 'kill $(jobs -p) $(cat "$peers/servers" 2>/dev/null) 2>/dev/null || true; rm -rf "$peers"' EXIT
echo "installing smee-client 5 and pysmee into $peers" >&2
npm install --silent --no-audit --no-fund --prefix "$peers/npm" smee-client@5 >/dev/null 2>&1
python3 -m venv "$peers/py" && "$peers/py/bin/pip" install -q pysmee >/dev/null

# Peak RSS depends on how a binary's file sits in the page cache (large folios map up to 1 MiB
# per fault: packaging/symbol-order.sh, `resident`). Every run starts as after a boot: the
# relays' cached pages are dropped (those no running process maps).
for binary in "$relay" ${BENCH_COMPARE:+"$BENCH_COMPARE"}; do
  dd if="$binary" iflag=nocache count=0 status=none
done

start_server() { # log-name [serve flags...]
  local log="$peers/$1.log"; shift
  "$relay" serve --listen 127.0.0.1:0 "$@" >/dev/null 2>"$log" &
  echo $! >>"$peers/servers"
  for _ in $(seq 50); do grep -q 'serving smee channels' "$log" && break; sleep 0.1; done
  echo "http://$(sed -n 's/.*addr=\([0-9.:]*\).*/\1/p' "$log" | head -1)"
}
raw_server=$(start_server serve-raw)
if [ "${BENCH_WIRE_PROXY:-0}" = 1 ]; then
  # A `serve` without --smee-wire (an older binary): a pipe that drops the raw opt-in.
  python3 bench/smee_wire_proxy.py "${raw_server#http://}" >"$peers/proxy.port" &
  for _ in $(seq 50); do [ -s "$peers/proxy.port" ] && break; sleep 0.1; done
  server="http://127.0.0.1:$(cat "$peers/proxy.port")"
else
  server=$(start_server serve --smee-wire)
fi
"${BENCH_TARGET:-$dir/examples/bench_target}" >"$peers/target.port" &
for _ in $(seq 50); do [ -s "$peers/target.port" ] && break; sleep 0.1; done
target="http://127.0.0.1:$(cat "$peers/target.port")"
ticks=$(getconf CLK_TCK)

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
status_kib() { awk -v key="$2:" '$1 == key { print $2 }' "/proc/$1/status"; }

start_client() { # name channel tag; prints the pid
  local name=$1 channel=$2 tag=$3
  case $name in
    # Default logging (one line per delivery), as a user runs it; every client's output goes
    # to /dev/null alike.
    # (stdout too: the caller reads this function's output, which must end when it returns)
    smee-relay|"smee-relay (raw)")
      SMEE_RELAY_STATE_DIR="$peers/state-$tag" "$relay" forward "$channel" "$target/hook" >/dev/null 2>&1 & ;;
    "$compare_name")
      SMEE_RELAY_STATE_DIR="$peers/state-$tag" "$BENCH_COMPARE" forward "$channel" "$target/hook" >/dev/null 2>&1 & ;;
    floor) "$dir/examples/floor" "$channel" "$target/hook" >/dev/null 2>"$peers/floor-$tag.err" & ;;
    "floor (fsync)") "$dir/examples/floor" "$channel" "$target/hook" --durable "$peers/floor-$tag.log" \
      >/dev/null 2>"$peers/floor-$tag.err" & ;;
    smee-client) "$peers/npm/node_modules/.bin/smee" -u "$channel" -t "$target/hook" >/dev/null 2>&1 & ;;
    pysmee) "$peers/py/bin/pysmee" forward "$channel" "$target/hook" >/dev/null 2>&1 & ;;
  esac
  echo $!
}

run_client() { # name workload
  local name=$1 workload=$2 base=$server
  [ "$name" = "smee-relay (raw)" ] && base=$raw_server
  local tag="${name//[^a-z]/}-$workload-$RANDOM"
  local channel="$base/bench-$tag"
  local pid
  pid=$(start_client "$name" "$channel" "$tag")
  sleep 2 # let it subscribe (a first-time subscriber gets no backlog, as on smee.io)
  local before rss_before result after rss
  if [ ! -e "/proc/$pid" ]; then
    echo "bench: $name exited before the load ($(cat "$peers"/*"$tag"*.err 2>/dev/null | tail -1))" >&2
    return 1
  fi
  before=$(cpu_ticks "$pid")
  rss_before=$(status_kib "$pid" VmRSS)
  result=$("$dir/examples/bench_load" "$channel" "$target" "$workload")
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

# One row per client from its rounds' rows (stdin), in the order of the clients named: the
# median of each figure, and of delivered and out of order the worst round, so that a loss in
# any round shows.
median_rows() { python3 bench/median_rows.py "$@"; }

# Idle: every client connected to its own channel at once, CPU over the same 60 s (user+system
# in clock ticks, converted to ms). The server pings every 30 s, as smee.io does.
run_idle() {
  local names=(smee-relay smee-client pysmee) pids=() before=() name i
  [ -n "${BENCH_COMPARE:-}" ] && names+=("$compare_name")
  [ -x "$dir/examples/floor" ] && names+=(floor)
  for name in "${names[@]}"; do
    pids+=("$(start_client "$name" "$server/idle-${name//[^a-z]/}-$RANDOM" "idle-${name//[^a-z]/}")")
  done
  sleep 3
  for i in "${!pids[@]}"; do before+=("$(cpu_ticks "${pids[$i]}")"); done
  sleep 60
  for i in "${!pids[@]}"; do
    local after
    after=$(cpu_ticks "${pids[$i]}")
    echo "| ${names[$i]} | idle 60 s | $(( (after - ${before[$i]}) * 1000 / ticks )) | $(( $(status_kib "${pids[$i]}" VmRSS) / 1024 )) |"
    kill "${pids[$i]}"; wait "${pids[$i]}" 2>/dev/null || true
  done
}

rows=()
idle_rows=()
for workload in "${workloads[@]}"; do
  if [ "$workload" = idle ]; then
    mapfile -t idle_rows < <(run_idle)
    printf '%s\n' "${idle_rows[@]}" >&2
    continue
  fi
  clients=(smee-relay floor "floor (fsync)" smee-client pysmee)
  [ "$workload" = c ] && clients=(smee-relay floor "floor (fsync)" smee-client)
  [ -x "$dir/examples/floor" ] || clients=("${clients[@]/floor*}")
  [ "$workload" != c ] && clients+=("smee-relay (raw)")
  [ -n "${BENCH_COMPARE:-}" ] && clients=("${clients[0]}" "$compare_name" "${clients[@]:1}")
  if [ -n "${BENCH_CLIENTS:-}" ]; then
    wanted=() # keep the order above, only the named ones
    for client in "${clients[@]}"; do
      [[ " $BENCH_CLIENTS " == *" $client "* || ( $client == "$compare_name" ) ]] && wanted+=("$client")
    done
    clients=("${wanted[@]}")
  fi
  present=() # without the slots of clients left out
  for client in "${clients[@]}"; do [ -z "$client" ] || present+=("$client"); done
  # Rounds, the clients in turn in each: the order turned by one each round, and every other
  # round backwards, so that no client always runs first after the servers start, nor always
  # after the same neighbour. Each row is the median of its rounds (`median_rows`).
  runs=()
  for round in $(seq "$rounds"); do
    n=${#present[@]}
    for i in "${!present[@]}"; do
      # Odd rounds: the order turned by round - 1; even ones: turned by round, then reversed.
      if (( round % 2 )); then j=$(( (i + round - 1) % n )); else j=$(( (n - 1 - i + round) % n )); fi
      runs+=("$(run_client "${present[$j]}" "$workload")")
      echo "${runs[-1]} (round $round of $rounds)" >&2
    done
  done
  medians=$(printf '%s\n' "${runs[@]}" | median_rows "${present[@]}")
  mapfile -t medians <<<"$medians"
  rows+=("${medians[@]}")
done

parts=()
if [ "${BENCH_PARTS:-0}" = 1 ]; then
  echo "running the spool and pipeline throughput benchmarks" >&2
  parts+=("- \`cargo bench --bench spool_throughput\`: $(cargo bench --locked --bench spool_throughput 2>/dev/null | grep '^spool')")
  parts+=("- \`cargo bench --bench pipeline_throughput\`: $(cargo bench --locked --bench pipeline_throughput 2>/dev/null | grep '^pipeline')")
  parts+=("- \`examples/http_client_cost.rs\` (against the same target): $("$dir/examples/http_client_cost" "$target")")
fi

printf '%s\n' "${rows[@]}" >"$peers/rows"
printf '%s\n' "${idle_rows[@]}" >"$peers/idle"
budgets=$(python3 - "$peers/rows" "$peers/idle" <<'PY'
import sys
rows = {}
for line in open(sys.argv[1]):
    if not line.strip():
        continue
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    name, w, delivered, ooo, p50, p99, cpu, rss, growth = cells
    got, sent = map(int, delivered.split("/"))
    rows[(name, w)] = dict(lost=sent - got, ooo=int(ooo), p99=float(p99), cpu=float(cpu),
                           rss=float(rss), growth=float(growth))
idle = {}
for line in open(sys.argv[2]):
    if line.strip():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        idle[cells[0]] = int(cells[2])

def check(what, ok, detail):
    print(f"| {what} | {detail} | {'met' if ok else '**not met**'} |")

print("| budget (issue 19) | measured | |")
print("|---|---|---|")
for w, share in (("a", 20), ("b", 4)):
    ours, peer = rows.get(("smee-relay", w)), rows.get(("smee-client", w))
    if ours and peer:
        ratio = peer["cpu"] / ours["cpu"]
        check(f"({w}) CPU per event at most 1/{share} of smee-client's", ratio >= share,
              f"{ours['cpu']:.0f} µs vs {peer['cpu']:.0f} µs (1/{ratio:.1f})")
ours = rows.get(("smee-relay", "a"))
if ours:
    check("(a) peak RSS at most 12 MiB", ours["rss"] <= 12, f"{ours['rss']:.1f} MiB")
for w in "abc":
    ours = rows.get(("smee-relay", w))
    if ours:
        check(f"({w}) nothing lost, nothing reordered", ours["lost"] == 0 and ours["ooo"] == 0,
              f"{ours['lost']} lost, {ours['ooo']} out of order")
ours, peer = rows.get(("smee-relay", "b")), rows.get(("smee-client", "b"))
if ours and peer:
    check("(b) p99 latency no worse than smee-client's", ours["p99"] <= peer["p99"],
          f"{ours['p99']:.1f} ms vs {peer['p99']:.1f} ms")
ours = rows.get(("smee-relay", "d"))
if ours:
    check("(d) one 10 MiB event: growth at most 3x the payload (30 MiB)",
          ours["lost"] == 0 and ours["growth"] <= 30, f"{ours['growth']:.1f} MiB")
if "smee-relay" in idle:
    check("idle 60 s with a connected stream: CPU at most 50 ms", idle["smee-relay"] <= 50,
          f"{idle['smee-relay']} ms")
for w in "abcd":
    ours, floor = rows.get(("smee-relay", w)), rows.get(("floor", w))
    if ours and floor and floor["cpu"]:
        print(f"| ({w}) overhead over the floor (no budget) | {ours['cpu']:.0f} µs vs "
              f"{floor['cpu']:.0f} µs ({ours['cpu'] / floor['cpu']:.2f}x, "
              f"+{ours['cpu'] - floor['cpu']:.0f} µs/event) | |")
# Whether a CPU budget is within reach at all of a relay that fsyncs before it delivers.
for w, share in (("a", 20), ("b", 4)):
    durable, peer = rows.get(("floor (fsync)", w)), rows.get(("smee-client", w))
    if durable and peer:
        budget = peer["cpu"] / share
        print(f"| ({w}) the fsync floor against the budget (1/{share} of smee-client's) | "
              f"{durable['cpu']:.0f} µs vs {budget:.0f} µs | "
              f"{'within reach' if durable['cpu'] <= budget else 'out of reach of any relay that fsyncs before it delivers'} |")
PY
)

marker='<!-- Everything above this line is written by bench/run.sh; notes below it are kept. -->'
notes=$( [ -f "$out" ] && awk -v m="$marker" 'found { print } $0 == m { found = 1 }' "$out" || true)
report() {
  echo "# Benchmarks"
  echo
  echo "Run: \`bench/run.sh ${workloads[*]}\` on $(date -u +%Y-%m-%d), $relay (peers: profile \`$profile\`), $(nproc) cores, $(uname -m), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(uname -sr), load average (1, 5, 15 min) at the start $load_before: other builds ran on the machine meanwhile."
  echo "All clients on smee.io's wire format (\`serve --smee-wire\`: \`{...headers, body, query, timestamp}\`,"
  echo "body re-serialised) except \"smee-relay (raw)\" (exact bodies, the raw opt-in of \`serve\`). \"floor\" is"
  echo "\`examples/floor.rs\`: the relay's SSE stack, frame decoder and HTTP client in a bare loop, no spool;"
  echo "\"floor (fsync)\" is that loop appending each group of frames read to a file and fdatasync'ing it before"
  echo "the POSTs: the least a relay that keeps the spool's promise (on disk before delivered) costs here."
  if [ "${BENCH_WIRE_PROXY:-0}" = 1 ]; then
    echo "smee.io's wire through \`bench/smee_wire_proxy.py\` in front of \`serve\` (this binary predates \`--smee-wire\`); every client but the raw row subscribes through it."
  fi
  echo "Workloads: (a) 5,000 events of 1 KiB as fast as the server takes them; (b) 1,000 of 1 KiB at 200/s;"
  echo "(c) 200 of 1 MiB; (d) one of 10 MiB. One \`smee-relay serve\` and one counting target on loopback;"
  echo "each client relays the same workload in turn, for $rounds rounds (the order turned each round);"
  echo "each figure is the median of the rounds, delivered and out of order the worst round's. CPU is the client process's user+system time per"
  echo "delivered event; peak RSS is its VmHWM, growth that minus its RSS just before the load; the"
  echo "smee-relay binaries' page cache is dropped at the start, so their code is read through their own faults."
  echo "smee-relay runs with its spool (fsync before delivery) and default logging; all clients log to /dev/null."
  echo
  echo "| client | workload | delivered | out of order | p50 ms | p99 ms | CPU µs/event | peak RSS MiB | RSS growth MiB |"
  echo "|---|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
  if [ ${#idle_rows[@]} -gt 0 ]; then
    echo
    echo "Idle, all clients connected at once over the same 60 s (the server pings every 30 s):"
    echo
    echo "| client | | CPU ms | RSS MiB |"
    echo "|---|---|---|---|"
    printf '%s\n' "${idle_rows[@]}"
  fi
  echo
  echo "Budgets, for smee-relay in this run:"
  echo
  echo "$budgets"
  if [ ${#parts[@]} -gt 0 ]; then
    echo
    echo "The parts, measured in the same run:"
    echo
    printf '%s\n' "${parts[@]}"
  fi
  echo
  echo "$marker"
}
if [ "$out" = - ]; then
  report
else
  { report; [ -n "$notes" ] && echo "$notes"; } > "$out.new"
  mv "$out.new" "$out"
  awk -v m="$marker" '{ print } $0 == m { exit }' "$out"
fi
