#!/usr/bin/env bash
# A PostgreSQL server on this machine, for voxblock's graph database tests.
#
#   ci/postgres.sh start    install Debian's postgresql if missing, start its cluster, create the
#                           test role; returns once pg_isready answers; prints the server's URL
#   ci/postgres.sh stop     stop the cluster if `start` started it (never one that was running)
#   ci/postgres.sh status   what runs; exit code 0 if the server answers and the test role logs in
#                           (the URL on the last line of stdout), else 3
#
# The cluster is the newest installed major version's first cluster (pg_lsclusters); one is
# created if the package has none. The role $VOXBLOCK_PG_USER (default voxblock), password
# $VOXBLOCK_PG_PASSWORD (default voxblock), may log in and create databases; tests connect as
# postgresql://USER:PASSWORD@127.0.0.1:PORT/... and create and drop their own databases. A second
# role, USER_nocreatedb (same password), may log in but not create databases (a refusal's test).
# Needs root to install or start (it runs pg_ctlcluster and psql as postgres). State in
# $VOXBLOCK_POSTGRES_DIR (default /tmp/voxblock-postgres). Exit code 2: cannot run here.
set -euo pipefail

STATE="${VOXBLOCK_POSTGRES_DIR:-/tmp/voxblock-postgres}"
ROLE="${VOXBLOCK_PG_USER:-voxblock}"
PASSWORD="${VOXBLOCK_PG_PASSWORD:-voxblock}"
HOST=127.0.0.1

say() { echo "postgres.sh: $*" >&2; }
die() { say "$*"; exit 2; }

# "VERSION NAME PORT STATUS" of the cluster to use: the newest version's first, or nothing
cluster() {
    command -v pg_lsclusters >/dev/null || return 0
    pg_lsclusters -h 2>/dev/null | sort -k1,1Vr -k2,2 | awk 'NR == 1 {print $1, $2, $3, $4}'
}

newest_version() {
    local dir
    dir="$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -type d 2>/dev/null | sort -V | tail -n1)"
    [[ -n "$dir" && -x "$dir/bin/postgres" ]] && basename "$dir"
}

url() { echo "postgresql://$ROLE:$PASSWORD@$HOST:$1"; }

ready() { pg_isready -q -h "$HOST" -p "$1" -t 2 2>/dev/null; }

role_logs_in() {  # role_logs_in PORT: the test role logs in, and both roles exist
    PGPASSWORD="$PASSWORD" PGCONNECT_TIMEOUT=5 psql -X -q -A -t -w -h "$HOST" -p "$1" -U "$ROLE" -d postgres \
        -c "SELECT count(*) FROM pg_roles WHERE rolname IN ('$ROLE', '${ROLE}_nocreatedb')" 2>/dev/null \
        | grep -qx 2
}

install_packages() {
    if command -v pg_ctlcluster >/dev/null && command -v psql >/dev/null && command -v pg_isready >/dev/null \
        && [[ -n "$(newest_version || true)" ]]; then
        return
    fi
    [[ $EUID -eq 0 ]] || die "PostgreSQL is not installed and installing it needs root"
    command -v apt-get >/dev/null || die "PostgreSQL is not installed and there is no apt-get"
    say "installing postgresql"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends postgresql postgresql-client >"$STATE/apt.log" 2>&1; then
        apt-get update -q >>"$STATE/apt.log" 2>&1 || die "apt-get update failed (see $STATE/apt.log)"
        apt-get install -y -q --no-install-recommends postgresql postgresql-client >>"$STATE/apt.log" 2>&1 \
            || die "apt-get install failed (see $STATE/apt.log)"
    fi
}

role_sql() {  # role_sql NAME OPTIONS: create or alter a role to these options and the password
    echo "DO \$\$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$1') THEN
    CREATE ROLE \"$1\" $2 PASSWORD '$PASSWORD';
  ELSE
    ALTER ROLE \"$1\" $2 PASSWORD '$PASSWORD';
  END IF;
END \$\$;"
}

create_roles() {  # create_roles PORT: the test roles, idempotently, as the postgres superuser
    (cd / && runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 -p "$1" -d postgres \
        -c "$(role_sql "$ROLE" "LOGIN CREATEDB")" -c "$(role_sql "${ROLE}_nocreatedb" "LOGIN NOCREATEDB")") \
        >>"$STATE/psql.log" 2>&1 || die "could not create the roles $ROLE, ${ROLE}_nocreatedb (see $STATE/psql.log)"
}

start() {
    mkdir -p "$STATE"
    local version name port status
    read -r version name port status <<<"$(cluster)" || true
    if [[ -n "${port:-}" ]] && ready "$port" && role_logs_in "$port"; then
        say "already running (cluster $version/$name, port $port)"
        url "$port"
        return
    fi
    [[ $EUID -eq 0 ]] || die "starting PostgreSQL and creating its test role needs root"
    install_packages
    read -r version name port status <<<"$(cluster)" || true
    if [[ -z "${version:-}" ]]; then
        version="$(newest_version)" || die "no PostgreSQL server is installed in /usr/lib/postgresql"
        say "creating cluster $version/main"
        pg_createcluster "$version" main >>"$STATE/cluster.log" 2>&1 \
            || die "pg_createcluster $version main failed (see $STATE/cluster.log)"
        read -r version name port status <<<"$(cluster)" || true
    fi
    if ! ready "$port"; then
        pg_ctlcluster "$version" "$name" start >>"$STATE/cluster.log" 2>&1 \
            || { say "pg_ctlcluster $version $name start failed (see $STATE/cluster.log)"; exit 1; }
        echo "$version $name" >"$STATE/cluster.ours"
    fi
    local i
    for i in $(seq 300); do
        ready "$port" && break
        sleep 0.1
    done
    ready "$port" || { say "the server on port $port did not answer (see $STATE/cluster.log)"; exit 1; }
    create_roles "$port"
    role_logs_in "$port" || { say "the role $ROLE cannot log in over $HOST:$port (pg_hba.conf?)"; exit 1; }
    say "up: cluster $version/$name on port $port, role $ROLE"
    url "$port"
}

stop() {
    [[ -e "$STATE/cluster.ours" ]] || { say "nothing to stop (start started no cluster)"; return 0; }
    local version name
    read -r version name <"$STATE/cluster.ours"
    if pg_ctlcluster "$version" "$name" stop -m fast >>"$STATE/cluster.log" 2>&1; then
        say "stopped cluster $version/$name"
    else
        say "pg_ctlcluster $version $name stop failed (see $STATE/cluster.log)"
    fi
    rm -f "$STATE/cluster.ours"
}

status() {
    local version name port status
    read -r version name port status <<<"$(cluster)" || true
    if [[ -z "${version:-}" ]]; then
        echo "postgresql: no cluster"
        return 3
    fi
    echo "postgresql: cluster $version/$name, port $port, $status"
    ready "$port" || return 3
    if ! role_logs_in "$port"; then
        echo "role $ROLE: cannot log in, or ${ROLE}_nocreatedb is missing"
        return 3
    fi
    echo "role $ROLE: logs in"
    url "$port"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 64 ;;
esac
