#!/usr/bin/env bash
# Install and start what the integration tests need that a fresh machine may lack:
# the Mosquitto binary (the tests start their own instance with the project's mTLS config)
# and a reachable local PostgreSQL (the tests create their own database).
set -euo pipefail

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

if [ ! -x /usr/sbin/mosquitto ]; then
    echo "installing mosquitto (Debian package)"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq mosquitto >/dev/null
fi

pg_ready() { pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; }
if ! command -v pg_isready >/dev/null 2>&1; then
    echo "installing postgresql (Debian package)"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq postgresql >/dev/null
fi
if ! pg_ready; then
    echo "starting postgresql"
    for version in $(ls /etc/postgresql 2>/dev/null); do
        as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    done
    for _ in $(seq 1 30); do pg_ready && break; sleep 1; done
fi
pg_ready || { echo "PostgreSQL is not reachable on 127.0.0.1:5432" >&2; exit 1; }
echo "services ready: mosquitto $(/usr/sbin/mosquitto -h 2>/dev/null | head -1 | awk '{print $3}'), postgresql"
