#!/usr/bin/env bash
# Install (Debian package) and start a throw-away PostgreSQL server on 127.0.0.1 for the
# multi-worker tests, then print its URL. Idempotent: a running server is reused.
#
#   scripts/postgres.sh            # -> postgresql://mnm@127.0.0.1:55432/mnm
#
# Settings: MNM_PG_PORT (55432), MNM_PG_DIR (/tmp/mnm-postgres). Trust authentication on
# the loopback interface only and no fsync (fast, not crash-safe): for tests, never for a
# shared server.
set -euo pipefail

PORT="${MNM_PG_PORT:-55432}"
DIR="${MNM_PG_DIR:-/tmp/mnm-postgres}"
DB=mnm
USER_NAME=mnm

log() { echo "postgres.sh: $*" >&2; }

find_bin() {
    local dir
    for dir in /usr/lib/postgresql/*/bin; do
        if [[ -x "$dir/pg_ctl" ]]; then
            echo "$dir"
            return 0
        fi
    done
    if command -v pg_ctl >/dev/null 2>&1; then
        dirname "$(readlink -f "$(command -v pg_ctl)")"
        return 0
    fi
    return 1
}

if ! BIN="$(find_bin)"; then
    if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
        log "PostgreSQL is not installed and cannot be installed here (needs root and apt-get)"
        exit 2
    fi
    log "installing PostgreSQL with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq postgresql >&2
    BIN="$(find_bin)" || { log "apt-get installed no pg_ctl"; exit 2; }
fi

# The server refuses to run as root: run it as the `postgres` system user where we are root.
run() {
    if [[ "$(id -u)" == 0 ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

mkdir -p "$DIR"
if [[ "$(id -u)" == 0 ]]; then
    chown postgres: "$DIR"
fi

if [[ ! -f "$DIR/data/PG_VERSION" ]]; then
    log "initialising a cluster in $DIR/data"
    run "$BIN/initdb" -D "$DIR/data" -U postgres --auth=trust -E UTF8 >/dev/null
fi

if ! run "$BIN/pg_ctl" -D "$DIR/data" status >/dev/null 2>&1; then
    log "starting the server on 127.0.0.1:$PORT"
    run "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w -t 60 \
        -o "-p $PORT -k $DIR -c listen_addresses=127.0.0.1 -c max_connections=100 -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
        start >&2
fi

psql_run() { run "$BIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -v ON_ERROR_STOP=1 -qtA "$@"; }
if [[ "$(psql_run -c "SELECT 1 FROM pg_roles WHERE rolname='$USER_NAME'")" != 1 ]]; then
    psql_run -c "CREATE ROLE $USER_NAME LOGIN" >/dev/null
fi
if [[ "$(psql_run -c "SELECT 1 FROM pg_database WHERE datname='$DB'")" != 1 ]]; then
    psql_run -c "CREATE DATABASE $DB OWNER $USER_NAME" >/dev/null
fi
echo "postgresql://$USER_NAME@127.0.0.1:$PORT/$DB"
