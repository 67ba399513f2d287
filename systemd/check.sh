#!/usr/bin/env bash
# Check the unit files the way systemd will read them: `systemd-analyze verify` must be clean and
# `systemd-analyze security --offline=true` must rate each unit at most 1.5.
# Usage: systemd/check.sh PATH_TO_SMEE_RELAY_BINARY
set -euo pipefail
binary=$(realpath "$1")
cd "$(dirname "$0")"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# verify checks that ExecStart exists: point it at the binary just built.
sed "s|/usr/local/bin/smee-relay|$binary|" smee-relay.service > "$work/smee-relay.service"
sed "s|/usr/local/bin/smee-relay|$binary|" smee-relay@.service > "$work/smee-relay@example.service"
# And with the credentials line enabled, as an operator would.
sed -e "s|/usr/local/bin/smee-relay|$binary|" -e 's|^#LoadCredential=|LoadCredential=|' \
  smee-relay.service > "$work/smee-relay-credentials.service"
status=0
for unit in "$work/smee-relay.service" "$work/smee-relay@example.service" \
  "$work/smee-relay-credentials.service"; do
  name=$(basename "$unit")
  if ! out=$(systemd-analyze verify "$unit" 2>&1) || [ -n "$out" ]; then
    echo "systemd-analyze verify $name:"; echo "$out"; status=1
  fi
  score=$(systemd-analyze security --offline=true "$unit" 2>/dev/null \
    | sed -n 's/.*Overall exposure level for .*: \([0-9.]*\).*/\1/p')
  if [ -z "$score" ] || awk -v s="$score" 'BEGIN { exit !(s > 1.5) }'; then
    echo "$name: exposure ${score:-unknown} (must be at most 1.5)"; status=1
  else
    echo "$name: verify clean, exposure $score"
  fi
done
exit $status
