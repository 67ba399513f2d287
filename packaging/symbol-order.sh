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
# A BIN given is resolved where the caller stands, before the cd below.
bin_arg=${2:+$(realpath -m -- "$2")}
cd "$(dirname "$0")/.."
list=packaging/symbol-order.txt
# Where cargo builds (CARGO_TARGET_DIR, as cargo itself reads it).
dist=${CARGO_TARGET_DIR:-target}/dist
# The relays these commands start read nothing of the caller's environment but these.
clean=(env -i "PATH=$PATH" "HOME=${HOME:-/}" "TMPDIR=${TMPDIR:-/tmp}")

check() {
  local binary=$1 symbols names total found ascending
  if [ ! -f "$binary" ]; then
    echo "symbol order: no binary $binary (cargo build --locked --profile dist --bin smee-relay)" >&2
    return 1
  fi
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
  echo "symbol order: $ascending % of them are laid out in list order" >&2
}

# The most code (KiB) a relay may hold resident after `resident`'s burst, its binary read
# through its own faults. With the list fresh: 2.8 to 3.0 MiB on the machine the list was made
# on (fault-around 64 KiB); with the list of the day before (3,650 of its 3,868 names found,
# but none of the functions added since) 4.6 to 5.6; without the order 7 and more. It catches
# a list that leaves a megabyte or more of running code scattered, not every function missing.
RESIDENT_KIB=4096

resident() {
  local relay server target metrics pid code delivered=0 inode per_fault
  if [ ! -f "$1" ]; then
    echo "symbol order: no binary $1 (cargo build --locked --profile dist --bin smee-relay)" >&2
    return 1
  fi
  relay=$(readlink -f "$1")
  work=$(mktemp -d) # not local: the trap runs at exit
  trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null; rm -rf "$work"' EXIT
  # What a fault maps depends on how the file sits in the page cache: read through faults, as
  # after a boot, 64 KiB (fault-around); in the large folios a plain read or copy leaves
  # (kernel 6.18, ext4), up to 1 MiB per fault, and the same relay holds a megabyte or more
  # again. The threshold is for the first: the binary's cached pages go first (those no
  # process maps), and a probe says what one fault maps now.
  if [ "$(head -c 4 "$relay" | od -An -c | tr -d ' ')" != '177ELF' ]; then
    echo "symbol order: $relay is not a program (a smee-relay binary, not a script)" >&2
    return 1
  fi
  dd if="$relay" iflag=nocache count=0 status=none
  per_fault=$(python3 - "$relay" <<'PY'
import mmap, os, struct, sys
with open(sys.argv[1], "rb") as f:
    m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    page = os.sysconf("SC_PAGE_SIZE")
    base = (len(m) // 2) // (2 << 20) * (2 << 20)  # a 2 MiB-aligned window inside the file
    m[base + page * 100]                           # one fault, in the window
    start = None
    for line in open("/proc/self/maps"):
        fields = line.rstrip("\n").split(None, 5)  # the path may hold spaces
        if len(fields) == 6 and os.path.realpath(fields[5]) == os.path.realpath(sys.argv[1]) \
                and fields[1].startswith("r--") and int(fields[2], 16) == 0:
            start = int(fields[0].split("-")[0], 16)
    with open("/proc/self/pagemap", "rb") as pm:
        pm.seek((start + base) // page * 8)
        entries = struct.unpack(f"{(2 << 20) // page}Q", pm.read((2 << 20) // page * 8))
    print(sum(e >> 63 for e in entries))
PY
)
  if [ "$per_fault" -gt 16 ]; then
    echo "symbol order: cannot measure: one fault maps $per_fault pages of $relay here, not 16 (large folios in the page cache, or another fault_around_bytes); its $RESIDENT_KIB KiB threshold assumes 16" >&2
    return 1
  fi
  # Two channel servers: one the relay reads, one it forwards to (a POST to a channel is
  # answered 200, as on smee.io). All three in a clean environment: RUST_LOG or
  # SMEE_RELAY_LOG_FORMAT would change the lines read below for their addresses.
  for name in source target; do
    : >"$work/$name.log"
    "${clean[@]}" "$relay" serve --listen 127.0.0.1:0 >/dev/null 2>"$work/$name.log" &
    for _ in $(seq 50); do grep -q 'serving smee channels' "$work/$name.log" && break; sleep 0.1; done
  done
  server=$(sed -n 's/.*serving smee channels.*addr=\([0-9.:]*\).*/\1/p' "$work/source.log" | head -1)
  target=$(sed -n 's/.*serving smee channels.*addr=\([0-9.:]*\).*/\1/p' "$work/target.log" | head -1)
  if [ -z "$server" ] || [ -z "$target" ]; then
    echo "symbol order: a \`$relay serve\` did not say where it listens:" >&2
    tail -n 3 "$work/source.log" "$work/target.log" >&2
    return 1
  fi
  : >"$work/relay.log"
  "${clean[@]}" SMEE_RELAY_STATE_DIR="$work/state" "$relay" forward "http://$server/resident" "http://$target/sink" \
    --metrics-listen 127.0.0.1:0 >"$work/relay.log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do grep -q ' connected' "$work/relay.log" && break; sleep 0.1; done
  metrics=$(sed -n 's/.*serving \/healthz and \/metrics.*addr=\([0-9.:]*\).*/\1/p' "$work/relay.log" | head -1)
  if [ -z "$metrics" ] || [ "$(readlink -f "/proc/$pid/exe")" != "$relay" ]; then
    echo "symbol order: the relay ($relay forward) did not start and connect:" >&2
    tail -5 "$work/relay.log" >&2
    return 1
  fi
  # 1,000 webhooks of 1 KiB over one connection, as fast as the server takes them.
  head -c 1000 /dev/zero | tr '\0' x | sed 's/.*/{"pad":"&"}/' >"$work/body.json"
  for i in $(seq 1000); do
    [ "$i" = 1 ] || echo next
    printf 'url = "http://%s/resident"\ndata-binary = "@%s"\nheader = "content-type: application/json"\noutput = "/dev/null"\n' \
      "$server" "$work/body.json"
  done >"$work/curl.cfg"
  curl -fsS --max-time 120 --config "$work/curl.cfg"
  for _ in $(seq 300); do
    delivered=$(curl -fsS --max-time 2 "http://$metrics/metrics" 2>/dev/null \
      | awk '/^smee_relay_deliveries_total/ { n += $2 } END { print n + 0 }' || true)
    [ "${delivered:-0}" -ge 1000 ] && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if [ "${delivered:-0}" -lt 1000 ]; then
    echo "symbol order: the relay delivered ${delivered:-0} of 1,000 events:" >&2
    tail -5 "$work/relay.log" >&2
    return 1
  fi
  # The binary's executable mappings, known by the file's inode (a path may hold spaces).
  inode=$(stat -L -c %i "$relay")
  code=$(awk -v inode="$inode" '
    /^[0-9a-f]+-[0-9a-f]+ / { mine = ($5 == inode && $2 ~ /x/) }
    mine && /^Rss:/ { kib += $2 } END { print kib + 0 }' "/proc/$pid/smaps")
  echo "symbol order: a relay holds $code KiB of $relay's code resident after relaying $delivered events (at most $RESIDENT_KIB; one fault maps $per_fault pages)" >&2
  if [ "$code" -lt 1024 ]; then
    echo "symbol order: cannot read the relay's code mappings (/proc/$pid/smaps): $code KiB" >&2
    return 1
  fi
  if [ "$code" -gt "$RESIDENT_KIB" ]; then
    echo "symbol order: the relay runs functions the list does not have (added since it was made?): run $0 generate" >&2
    return 1
  fi
}

case ${1:-} in
  check) check "${bin_arg:-$dist/smee-relay}" ;;
  resident) resident "${bin_arg:-$dist/smee-relay}" ;;
  generate)
    # The binary alone, as packaging/build-deb.sh builds it: built together with the examples,
    # the dependencies' features (and so every name's hash) would differ.
    cargo build --locked --profile dist --bin smee-relay >/dev/null
    cargo build --locked --profile dist --example bench_load --example bench_target >/dev/null
    relay=$dist/smee-relay
    work=$(mktemp -d)
    trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
    "${clean[@]}" "$relay" serve --smee-wire --listen 127.0.0.1:0 >/dev/null 2>"$work/serve.log" &
    for _ in $(seq 50); do grep -q 'serving smee channels' "$work/serve.log" && break; sleep 0.1; done
    server="http://$(sed -n 's/.*addr=\([0-9.:]*\).*/\1/p' "$work/serve.log" | head -1)"
    "$dist/examples/bench_target" >"$work/target.port" &
    for _ in $(seq 50); do [ -s "$work/target.port" ] && break; sleep 0.1; done
    target="http://127.0.0.1:$(cat "$work/target.port")"
    channel="$server/order"
    # The relay as it runs by default (logging to stderr), with /healthz and /metrics, under
    # callgrind.
    "${clean[@]}" SMEE_RELAY_STATE_DIR="$work/state" valgrind --tool=callgrind --demangle=no --dump-instr=no \
      --callgrind-out-file="$work/forward.callgrind" "$relay" forward "$channel" "$target/hook" \
      --metrics-listen 127.0.0.1:0 >"$work/relay.log" 2>&1 &
    valgrind=$!
    for _ in $(seq 600); do grep -q ' connected' "$work/relay.log" && break; sleep 0.1; done
    metrics="http://$(sed -n 's/.*serving \/healthz and \/metrics.*addr=\([0-9.:]*\).*/\1/p' "$work/relay.log" | head -1)"
    BENCH_COUNT=1000 "$dist/examples/bench_load" "$channel" "$target" a >/dev/null
    BENCH_COUNT=20 "$dist/examples/bench_load" "$channel" "$target" e >/dev/null
    curl -fsS "$metrics/metrics" >/dev/null
    curl -fsS "$metrics/healthz" >/dev/null
    kill -TERM $valgrind
    wait $valgrind
    # `run --config`'s paths (the Port pipeline, rules, alerts, action runs) and `serve`'s, as
    # the demo runs them in one process.
    (cd "$work" && "${clean[@]}" valgrind --tool=callgrind --demangle=no --dump-instr=no \
      --callgrind-out-file="$work/demo.callgrind" "$OLDPWD/$relay" demo >/dev/null 2>&1)
    python3 packaging/symbol_order.py "$relay" "$list" "$work/forward.callgrind" "$work/demo.callgrind"
    # The list changed: build.rs reruns, and the crate is compiled and linked again.
    cargo build --locked --profile dist --bin smee-relay >/dev/null
    check "$relay"
    ;;
  *) sed -n '2,24p' "$0" >&2; exit 2 ;;
esac
