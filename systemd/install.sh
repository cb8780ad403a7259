#!/usr/bin/env bash
# Installs certgate as a systemd service: the binary in /usr/local/bin, the units in
# /etc/systemd/system, and a database in /var/lib/certgate (made with `certgate init` when
# there is none; systemd hands the directory to the service's dynamic user when it starts).
#
#   sudo systemd/install.sh [--binary PATH] [--root DIR] [--hostname NAME]...
#
# --binary: the certgate to install (default: target/release/certgate, built if missing).
# --root:   install under DIR instead of / (for packaging or a test); systemd is not told.
# --hostname: names for the generated server certificate, as for `certgate init`.
set -euo pipefail
cd "$(dirname "$0")/.."

binary=target/release/certgate
root=
init_args=()
while [ $# -gt 0 ]; do
    case $1 in
        --binary) binary=$2; shift 2 ;;
        --root) root=$2; shift 2 ;;
        --hostname) init_args+=(--hostname "$2"); shift 2 ;;
        *) echo "error: unknown option $1 (see the top of $0)" >&2; exit 2 ;;
    esac
done

if [ ! -x "$binary" ]; then
    if [ "$binary" = target/release/certgate ]; then
        cargo build --release --locked
    else
        echo "error: $binary is not an executable" >&2
        exit 1
    fi
fi

install -D -m 0755 "$binary" "$root/usr/local/bin/certgate"
install -D -m 0644 systemd/certgate.service "$root/etc/systemd/system/certgate.service"
install -D -m 0644 systemd/certgate.socket "$root/etc/systemd/system/certgate.socket"
state="$root/var/lib/certgate"
if [ ! -e "$state/certgate.db" ] && [ ! -e "$root/var/lib/private/certgate/certgate.db" ]; then
    install -d -m 0700 "$state"
    "$root/usr/local/bin/certgate" --db "$state/certgate.db" init "${init_args[@]}"
fi

if [ -z "$root" ]; then
    systemctl daemon-reload
    echo "installed; start it with: systemctl enable --now certgate.socket certgate.service"
else
    echo "installed under $root"
fi
