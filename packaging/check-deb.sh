#!/usr/bin/env bash
# Build the .deb (packaging/build-deb.sh) and install it into a clean, empty root with dpkg, as a
# fresh machine would get it; then check what landed there: `smee-relay --version`, `smee -v`
# (the smee-client spelling, through the packaged symlink), the system user, the example config,
# completions and man pages, and `systemd-analyze verify` plus the exposure rating of the
# installed units. Runs as root (dpkg --root needs it); touches nothing outside its temp dir.
# Usage: packaging/check-deb.sh [path/to/smee-relay.deb]   (PROFILE=dist|release|dev)
set -euo pipefail
cd "$(dirname "$0")/.."
deb=${1:-}
if [ -z "$deb" ]; then
  deb=$(packaging/build-deb.sh | tail -n 1)
fi
[ -f "$deb" ] || { echo "no package at '$deb'" >&2; exit 1; }
echo "package: $deb ($(du -h "$deb" | cut -f1))"

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/var/lib/dpkg/info" "$root/var/lib/dpkg/updates" "$root/etc"
touch "$root/var/lib/dpkg/status"
# An empty root has no libc package to satisfy Depends, and no shell to chroot into: the
# maintainer scripts run from here with DPKG_ROOT set, and must honour it.
dpkg --root="$root" --force-depends --force-script-chrootless --log=/dev/null -i "$deb" >/dev/null

fail=0
check() { # description, command...
  local what=$1; shift
  if out=$("$@" 2>&1); then echo "ok: $what"; else echo "FAILED: $what"; echo "$out"; fail=1; fi
}
check "smee-relay --version" sh -c "'$root/usr/bin/smee-relay' --version | grep -q '^smee-relay '"
check "smee -v through the packaged link" sh -c \
  "[ \"\$(readlink '$root/usr/bin/smee')\" = smee-relay ] && '$root/usr/bin/smee' -v | grep -Eq '^[0-9]+\.[0-9]+\.[0-9]+'"
check "system user smee-relay" grep -q '^smee-relay:' "$root/etc/passwd"
check "credentials directory 0700" sh -c "[ \"\$(stat -c %a '$root/etc/smee-relay/credentials')\" = 700 ]"
check "example config is a conffile and valid" sh -c \
  "grep -q /etc/smee-relay/config.example.toml '$root/var/lib/dpkg/info/smee-relay.conffiles' \
   && SMEE_URL=https://smee.io/x PORT_CLIENT_SECRET=s SLACK_WEBHOOK_URL=https://hooks.slack.com/services/T/B/X \
      '$root/usr/bin/smee-relay' check --config '$root/etc/smee-relay/config.example.toml' >/dev/null"
check "completions" test -s "$root/usr/share/bash-completion/completions/smee-relay" \
  -a -s "$root/usr/share/zsh/vendor-completions/_smee-relay" -a -s "$root/usr/share/fish/vendor_completions.d/smee-relay.fish"
check "man pages" sh -c "zcat '$root/usr/share/man/man1/smee-relay.1.gz' | grep -q '^.TH smee-relay' \
  && zcat '$root/usr/share/man/man1/smee.1.gz' | grep -q '^.TH smee'"
for unit in smee-relay.service smee-relay@.service; do
  path="$root/usr/lib/systemd/system/$unit"
  # verify reads ExecStart= on this machine: point it at the installed binary (as check.sh does).
  work=$(mktemp -d "$root/tmp.XXXX")
  name=${unit/@/@example}
  sed "s|/usr/bin/smee-relay|$root/usr/bin/smee-relay|" "$path" > "$work/$name"
  check "systemd-analyze verify $unit" sh -c "out=\$(systemd-analyze verify '$work/$name' 2>&1); [ -z \"\$out\" ] || { echo \"\$out\"; exit 1; }"
  score=$(systemd-analyze security --offline=true "$work/$name" 2>/dev/null \
    | sed -n 's/.*Overall exposure level for .*: \([0-9.]*\).*/\1/p')
  check "$unit exposure ${score:-unknown} <= 1.5" awk -v s="${score:-99}" 'BEGIN { exit !(s <= 1.5) }'
done
dpkg --root="$root" --force-script-chrootless --log=/dev/null --purge smee-relay >/dev/null
check "purge removes the binary" test ! -e "$root/usr/bin/smee-relay"
exit $fail
