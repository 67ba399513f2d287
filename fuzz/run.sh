#!/usr/bin/env bash
# Run every fuzz target for SECONDS each (default 60), from the committed seed corpus.
# New inputs go to a scratch directory, so the committed corpus only changes by hand. Any crash
# stops the run with a non-zero exit and leaves the input under fuzz/artifacts/<target>/.
#
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz --locked`).
# Usage: fuzz/run.sh [SECONDS] [TARGET...]   (targets: wire port config)
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(wire port config)

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
cargo +nightly fuzz build >/dev/null
for target in "${targets[@]}"; do
  mkdir -p "$scratch/$target"
  echo "fuzz: $target for ${seconds}s" >&2
  # -rss_limit_mb: the relay's own bound on one input is far below this; a leak or blow-up
  # past it is a finding. -max_len: large enough for the biggest seed (a Port payload).
  cargo +nightly fuzz run "$target" "$scratch/$target" "corpus/$target" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 \
    2>"$scratch/$target.log" || { tail -40 "$scratch/$target.log" >&2; exit 1; }
  grep -E '^stat::number_of_executed_units|^Done' "$scratch/$target.log" | sed "s/^/fuzz: $target: /" >&2 || true
done
echo "fuzz: ${#targets[@]} targets, ${seconds}s each, no crash" >&2
