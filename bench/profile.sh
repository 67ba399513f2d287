#!/usr/bin/env bash
# Profile smee-relay relaying one workload on smee.io's wire (`serve --smee-wire`), for the
# per-event breakdown in BENCHMARKS.md. Records with `perf record --call-graph dwarf` (the
# release profiles keep unwind tables, so user stacks resolve without debug info), then prints
# the per-thread CPU, the syscall counts (`strace -c -f`, in a second run) and the top of the
# inclusive (`--children`) report.
#
# Usage: bench/profile.sh WORKLOAD [PROFILE]   (a or b as in bench/run.sh; profile: release)
# Environment as bench/run.sh: BENCH_RELAY, BENCH_TARGET, BENCH_WIRE_PROXY.
# Writes perf.data and the reports into a temp dir and prints its path.
set -euo pipefail
cd "$(dirname "$0")/.."
workload=${1:?workload a or b}
profile=${2:-release}
dir=target/$profile
out=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT

relay=${BENCH_RELAY:-$dir/smee-relay}
if [ "${BENCH_WIRE_PROXY:-0}" = 1 ]; then
  "$relay" serve --listen 127.0.0.1:0 >/dev/null 2>"$out/serve.log" &
else
  "$relay" serve --listen 127.0.0.1:0 --smee-wire >/dev/null 2>"$out/serve.log" &
fi
for _ in $(seq 50); do grep -q 'serving smee channels' "$out/serve.log" && break; sleep 0.1; done
server="http://$(sed -n 's/.*addr=\([0-9.:]*\).*/\1/p' "$out/serve.log" | head -1)"
if [ "${BENCH_WIRE_PROXY:-0}" = 1 ]; then
  python3 bench/smee_wire_proxy.py "${server#http://}" >"$out/proxy.port" &
  for _ in $(seq 50); do [ -s "$out/proxy.port" ] && break; sleep 0.1; done
  server="http://127.0.0.1:$(cat "$out/proxy.port")"
fi
"${BENCH_TARGET:-$dir/examples/bench_target}" >"$out/target.port" &
for _ in $(seq 50); do [ -s "$out/target.port" ] && break; sleep 0.1; done
target="http://127.0.0.1:$(cat "$out/target.port")"

run() { # tag: perf, strace or plain
  local tag=$1 pid watcher=
  local channel="$server/profile-$tag-$RANDOM"
  SMEE_RELAY_STATE_DIR="$out/state-$tag" "$relay" forward "$channel" "$target/hook" 2>/dev/null &
  pid=$!
  sleep 2
  case $tag in
    perf) perf record -q -F 2000 --call-graph dwarf,16384 -o "$out/perf.data" -p "$pid" 2>/dev/null & watcher=$! ;;
    strace) strace -c -f -o "$out/strace.txt" -p "$pid" & watcher=$! ;;
  esac
  sleep 0.5
  "$dir/examples/bench_load" "$channel" "$target" "$workload" >"$out/load-$tag.json"
  # Per-thread CPU (utime+stime ticks) before the relay stops.
  for task in /proc/$pid/task/*; do
    echo "$(tr ' ' '_' <"$task/comm") $(awk '{ print $14 + $15 }' "$task/stat")"
  done | awk '{ t[$1] += $2 } END { for (k in t) print k, t[k] }' | sort >"$out/threads-$tag.txt"
  if [ -n "$watcher" ]; then kill -INT "$watcher" 2>/dev/null || true; wait "$watcher" 2>/dev/null || true; fi
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

run plain
run perf
run strace
perf report -i "$out/perf.data" --children --stdio --percent-limit 1 2>/dev/null >"$out/children.txt" || true
perf report -i "$out/perf.data" --no-children --sort dso,sym --stdio --percent-limit 0.5 -g none 2>/dev/null >"$out/self.txt" || true
echo "$out"
