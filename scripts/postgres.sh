#!/usr/bin/env bash
# A throw-away PostgreSQL server on 127.0.0.1 for the multi-worker tests.
#
#   scripts/postgres.sh [start]   # start (idempotent) and print its URL, e.g.
#                                 #   postgresql://mnm@127.0.0.1:55432/mnm
#   scripts/postgres.sh stop      # stop it and remove its directory
#
# Settings: MNM_PG_PORT (55432), MNM_PG_DIR (/tmp/mnm-postgres). The test fixture picks a
# free port and a fresh temporary directory, and calls `stop` when the session ends.
# Trust authentication on the loopback interface only and no fsync (fast, not crash-safe):
# for tests, never for a shared server.
#
# Installation: where no PostgreSQL server is installed, this installs the Debian package
# `postgresql` with apt-get, and only when running as root (it says so on stderr first).
# MNM_PG_INSTALL=0 refuses that; the tests are then skipped.
set -euo pipefail

MODE="${1:-start}"
PORT="${MNM_PG_PORT:-55432}"
DIR="${MNM_PG_DIR:-/tmp/mnm-postgres}"
DB=mnm
USER_NAME=mnm
MARKER=".mnm-postgres"  # `stop` only removes a directory that this script created

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

# The server refuses to run as root: run it as the `postgres` system user where we are root.
run() {
    if [[ "$(id -u)" == 0 ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

stop_server() {
    if [[ ! -d "$DIR" ]]; then
        return 0
    fi
    if [[ ! -f "$DIR/$MARKER" ]]; then
        log "refusing to remove $DIR: it was not created by this script"
        exit 2
    fi
    if [[ -f "$DIR/data/postmaster.pid" ]] && BIN="$(find_bin)"; then
        log "stopping the server in $DIR/data"
        run "$BIN/pg_ctl" -D "$DIR/data" -w -t 60 -m fast stop >&2 || true
    fi
    rm -rf "$DIR"
}

case "$MODE" in
    start) ;;
    stop)
        stop_server
        exit 0
        ;;
    *)
        log "unknown mode '$MODE'; use start or stop"
        exit 2
        ;;
esac

if ! BIN="$(find_bin)"; then
    if [[ "${MNM_PG_INSTALL:-1}" == 0 ]]; then
        log "PostgreSQL is not installed, and MNM_PG_INSTALL=0 forbids installing it"
        exit 2
    fi
    if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
        log "PostgreSQL is not installed and cannot be installed here (needs root and apt-get)"
        exit 2
    fi
    log "PostgreSQL is not installed: installing the Debian package 'postgresql' with" \
        "apt-get, as this runs as root (set MNM_PG_INSTALL=0 to refuse)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq postgresql >&2
    BIN="$(find_bin)" || { log "apt-get installed no pg_ctl"; exit 2; }
fi

mkdir -p "$DIR"
touch "$DIR/$MARKER"
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
