#!/usr/bin/env bash
# Build the Debian package: the binary (profile $PROFILE, default dist), then what it ships
# besides (completions and man pages from `smee-relay generate`, the units with /usr/bin paths),
# then `cargo deb --no-build`. Prints the path of the .deb on its last line.
# Needs cargo-deb (`cargo install cargo-deb --locked`).
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${PROFILE:-dist}
command -v cargo-deb >/dev/null || { echo "cargo-deb is missing: cargo install cargo-deb --locked" >&2; exit 1; }

cargo build --locked --profile "$profile" --bin smee-relay >&2
target_dir=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
case $profile in dev) out=debug ;; *) out=$profile ;; esac
binary="$target_dir/$out/smee-relay"
# `dist` lays out the functions a relay runs side by side (build.rs); a stale list only costs
# memory, so say so and go on.
[ "$profile" = dist ] && { packaging/symbol-order.sh check "$binary" || true; }

staging=target/packaging
rm -rf "$staging"
mkdir -p "$staging/systemd" "$staging/man"
"$binary" generate completions "$staging/completions"
"$binary" generate man "$staging/man"
gzip -9n "$staging"/man/*.1
# The repository's units name /usr/local/bin (an install from source); the package's binary is
# in /usr/bin.
for unit in smee-relay.service smee-relay@.service; do
  sed 's|/usr/local/bin/smee-relay|/usr/bin/smee-relay|g' "systemd/$unit" > "$staging/systemd/$unit"
done

# DEB_FAST=1: lighter compression, for a quick check.
cargo deb --no-build --profile "$profile" ${DEB_FAST:+--fast} 2>&1 | tail -n 1
