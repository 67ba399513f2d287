#!/usr/bin/env bash
# The `dist` binary's function order (build.rs, packaging/symbol-order.txt).
#
#   packaging/symbol-order.sh generate   build `dist`, run a relay under callgrind (start,
#                                        connect, 1,000 events in a burst, 20 at 5/s, a
#                                        /metrics scrape, stop) and then `demo` (serve, the
#                                        Port pipeline, alerts, an action run), write the
#                                        functions that ran (the relay's first, hottest
#                                        first, then the demo's others), then build
#                                        `dist` again with the new list
#   packaging/symbol-order.sh check [BIN] how many of the list's names BIN (default the `dist`
#                                        binary) has, and whether they are laid out in
#                                        list order; exits 1 below 90 % of either
#   packaging/symbol-order.sh resident [BIN]
#                                        how much of BIN's code a relay holds resident after
#                                        relaying 1,000 events in a burst; exits 1 over
#                                        RESIDENT_KIB: a list missing functions the relay
#                                        now runs (code added since it was made) passes
#                                        `check` but scatters them through the binary
#
# Regenerate after a Cargo.lock change, a version bump, a new toolchain or a change to the `dist`
# profile (the names carry hashes of those), and after changes to the code a relay runs (new
# functions are not listed: `resident` tells). Needs valgrind and curl (generate), curl
# (resident) and nm.
set -euo pipefail
cd "$(dirname "$0")/.."
list=packaging/symbol-order.txt

check() {
  local binary=$1 symbols names total found ascending
  # nm's failure (or a stripped binary) would read as "0 names found: stale", which it is not.
  symbols=$(nm "$binary" 2>&1) && [[ $symbols != *": no symbols" ]] || {
    echo "symbol order: cannot read the symbols of $binary (check it before stripping): $symbols" >&2
    return 1
  }
  names=$(tr -d '\r' <"$list" | grep -v '^$' | sort -u)
  total=$(wc -l <<<"$names")
  found=$(comm -12 <(awk '{ print $NF }' <<<"$symbols" | sort -u) <(cat <<<"$names") | wc -l)
  echo "symbol order: $found of $total listed functions are in $binary" >&2
  if [ $((found * 10)) -lt $((total * 9)) ]; then
    echo "symbol order: the list is stale (resident code grows by megabytes): run $0 generate" >&2
    return 1
  fi
  # Present is not applied: a binary linked without the order (SMEE_RELAY_NO_SYMBOL_ORDER,
  # another linker, another profile) has every name too. Applied, the listed functions follow
  # one another in list order; nm's addresses are fixed-width hex, so they compare as text.
  ascending=$(awk '$2 ~ /^[tTwW]$/ { print $3, $1 }' <<<"$symbols" | awk '
    NR == FNR { addr[$1] = $2; next }
    { sub(/\r$/, "") }
    $1 in addr { if (n++ && addr[$1] > prev) up++; prev = addr[$1] }
    END { print (n > 1 ? int(100 * up / (n - 1)) : 0) }' - "$list")
  if [ "$ascending" -lt 90 ]; then
    echo "symbol order: not applied to $binary (only $ascending % of the listed functions are in list order): built with SMEE_RELAY_NO_SYMBOL_ORDER, a linker other than lld, or not the dist profile (build.rs)" >&2
    return 1
  fi
}

# The most code (KiB) a relay may hold resident after `resident`'s burst. With the list fresh it
# was 2.6 to 3.0 MiB on the machine the list was made on (fault-around 64 KiB), with the list of
# a month before (3,650 of its 3,868 names found, but none of the functions added since) 4.6 to
# 5.6, without the order 7 and more: the peak-RSS budget of workload (a) is 12 MiB in all.
RESIDENT_KIB=4096

resident() {
  local relay=$1 server target metrics pid code delivered=0
  work=$(mktemp -d) # not local: the trap runs at exit
  trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
  # Two channel servers: one the relay reads, one it forwards to (a POST to a channel is
  # answered 200, as on smee.io).
  for name in source target; do
    "$relay" serve --listen 127.0.0.1:0 >/dev/null 2>"$work/$name.log" &
    for _ in $(seq 50); do grep -q 'serving smee channels' "$work/$name.log" && break; sleep 0.1; done
  done
  server="http://$(sed -n 's/.*addr=\([0-9.:]*\).*/\1/p' "$work/source.log" | head -1)"
  target="http://$(sed -n 's/.*addr=\([0-9.:]*\).*/\1/p' "$work/target.log" | head -1)"
  SMEE_RELAY_STATE_DIR="$work/state" "$relay" forward "$server/resident" "$target/sink" \
    --metrics-listen 127.0.0.1:0 >"$work/relay.log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do grep -q ' connected' "$work/relay.log" && break; sleep 0.1; done
  metrics="http://$(sed -n 's/.*serving \/healthz and \/metrics.*addr=\([0-9.:]*\).*/\1/p' "$work/relay.log" | head -1)"
  # 1,000 webhooks of 1 KiB over one connection, as fast as the server takes them.
  head -c 1000 /dev/zero | tr '\0' x | sed 's/.*/{"pad":"&"}/' >"$work/body.json"
  for i in $(seq 1000); do
    [ "$i" = 1 ] || echo next
    printf 'url = "%s/resident"\ndata-binary = "@%s"\nheader = "content-type: application/json"\noutput = "/dev/null"\n' \
      "$server" "$work/body.json"
  done >"$work/curl.cfg"
  curl -fsS --config "$work/curl.cfg"
  for _ in $(seq 300); do
    delivered=$(curl -fsS "$metrics/metrics" | awk '/^smee_relay_deliveries_total/ { n += $2 } END { print n + 0 }')
    [ "$delivered" -ge 1000 ] && break
    sleep 0.1
  done
  if [ "$delivered" -lt 1000 ]; then
    echo "symbol order: the relay delivered $delivered of 1,000 events in 30 s ($work/relay.log):" >&2
    tail -5 "$work/relay.log" >&2
    return 1
  fi
  code=$(awk -v exe="$(readlink -f "/proc/$pid/exe")" '
    /^[0-9a-f]+-[0-9a-f]+ / { mine = ($6 == exe && $2 ~ /x/) }
    mine && /^Rss:/ { kib += $2 } END { print kib + 0 }' "/proc/$pid/smaps")
  echo "symbol order: a relay holds $code KiB of $relay's code resident after relaying $delivered events (at most $RESIDENT_KIB)" >&2
  if [ "$code" -gt "$RESIDENT_KIB" ]; then
    echo "symbol order: the relay runs functions the list does not have (added since it was made?): run $0 generate" >&2
    return 1
  fi
}

case ${1:-} in
  check) check "${2:-target/dist/smee-relay}" ;;
  resident) resident "${2:-target/dist/smee-relay}" ;;
  generate)
    # The binary alone, as packaging/build-deb.sh builds it: built together with the examples,
    # the dependencies' features (and so every name's hash) would differ.
    cargo build --locked --profile dist --bin smee-relay >/dev/null
    cargo build --locked --profile dist --example bench_load --example bench_target >/dev/null
    relay=target/dist/smee-relay
    work=$(mktemp -d)
    trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
    "$relay" serve --smee-wire --listen 127.0.0.1:0 >/dev/null 2>"$work/serve.log" &
    for _ in $(seq 50); do grep -q 'serving smee channels' "$work/serve.log" && break; sleep 0.1; done
    server="http://$(sed -n 's/.*addr=\([0-9.:]*\).*/\1/p' "$work/serve.log" | head -1)"
    target/dist/examples/bench_target >"$work/target.port" &
    for _ in $(seq 50); do [ -s "$work/target.port" ] && break; sleep 0.1; done
    target="http://127.0.0.1:$(cat "$work/target.port")"
    channel="$server/order"
    # The relay as it runs by default (logging to stderr), with /healthz and /metrics, under
    # callgrind.
    SMEE_RELAY_STATE_DIR="$work/state" valgrind --tool=callgrind --demangle=no --dump-instr=no \
      --callgrind-out-file="$work/forward.callgrind" "$relay" forward "$channel" "$target/hook" \
      --metrics-listen 127.0.0.1:0 >"$work/relay.log" 2>&1 &
    valgrind=$!
    for _ in $(seq 600); do grep -q ' connected' "$work/relay.log" && break; sleep 0.1; done
    metrics="http://$(sed -n 's/.*serving \/healthz and \/metrics.*addr=\([0-9.:]*\).*/\1/p' "$work/relay.log" | head -1)"
    BENCH_COUNT=1000 target/dist/examples/bench_load "$channel" "$target" a >/dev/null
    BENCH_COUNT=20 target/dist/examples/bench_load "$channel" "$target" e >/dev/null
    curl -fsS "$metrics/metrics" >/dev/null
    curl -fsS "$metrics/healthz" >/dev/null
    kill -TERM $valgrind
    wait $valgrind
    # `run --config`'s paths (the Port pipeline, rules, alerts, action runs) and `serve`'s, as
    # the demo runs them in one process.
    (cd "$work" && valgrind --tool=callgrind --demangle=no --dump-instr=no \
      --callgrind-out-file="$work/demo.callgrind" "$OLDPWD/$relay" demo >/dev/null 2>&1)
    python3 packaging/symbol_order.py "$relay" "$list" "$work/forward.callgrind" "$work/demo.callgrind"
    # The list changed: build.rs reruns, and the crate is compiled and linked again.
    cargo build --locked --profile dist --bin smee-relay >/dev/null
    check "$relay"
    ;;
  *) sed -n '2,24p' "$0" >&2; exit 2 ;;
esac
