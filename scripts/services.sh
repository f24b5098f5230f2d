#!/usr/bin/env bash
# Makes sure the services the test suite talks to are up on this machine: PostgreSQL on
# 127.0.0.1:5432 and Redis on 127.0.0.1:6379. Idempotent: when both answer, it only checks.
set -euo pipefail

# wait_for NAME SECONDS COMMAND...: retry COMMAND every half second until it succeeds.
wait_for() {
    local name=$1 seconds=$2
    shift 2
    for ((i = 0; i < seconds * 2; i++)); do
        if "$@" >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.5
    done
    echo "services.sh: $name is not up after ${seconds}s" >&2
    return 1
}

postgres_up() { pg_isready -h 127.0.0.1 -p 5432 -q; }
redis_up() { [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = PONG ]; }

if ! postgres_up; then
    echo "services.sh: starting PostgreSQL" >&2
    cluster_version=$(ls /etc/postgresql | sort -V | tail -n 1)
    # "already running" (a start racing ours) is fine: the wait below decides.
    pg_ctlcluster --skip-systemctl-redirect "$cluster_version" main start || true
    wait_for PostgreSQL 30 postgres_up
fi

if ! redis_up; then
    echo "services.sh: starting Redis" >&2
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
        --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
    wait_for Redis 30 redis_up
fi
