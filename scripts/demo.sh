#!/usr/bin/env bash
# The main job, end to end on a fresh Debian machine: make a streaming standby over the
# replication protocol alone, the way a real deployment would, instead of the old
# pg_start_backup + rsync + hand-written recovery.conf recipe.
#
#  1. installs PostgreSQL (scripts/install-postgres.sh) and builds clone-standby;
#  2. starts a throwaway primary with a pgbench database, secured like production:
#     TLS with a private CA, SCRAM-SHA-256, a dedicated REPLICATION role, hostssl-only
#     pg_hba entries;
#  3. runs `clone-standby check` against it;
#  4. clones a standby with `clone-standby clone --start` while pgbench writes to the
#     primary (sslmode=verify-full, channel binding, a named slot);
#  5. runs `clone-standby status --wait` until the standby has caught up;
#  6. stops everything and removes its files.
#
# Environment: DEMO_SCALE (pgbench scale, default 10), DEMO_SECONDS (load, default 30).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
scale=${DEMO_SCALE:-10}
seconds=${DEMO_SECONDS:-30}

scripts/install-postgres.sh
command -v openssl >/dev/null || { apt-get update -qq && apt-get install -y -qq openssl; }

echo "== building clone-standby (release)"
cargo build --release --locked -p clone-standby
tool=$repo/target/release/clone-standby
bin=/usr/lib/postgresql/15/bin

work=$(mktemp -d /tmp/pgrepl-demo.XXXXXX)
chmod 755 "$work"
as_server() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
load_pid=
cleanup() {
    [ -n "$load_pid" ] && kill "$load_pid" 2>/dev/null || true
    as_server "$bin/pg_ctl" -D "$work/standby" -m immediate stop >/dev/null 2>&1 || true
    as_server "$bin/pg_ctl" -D "$work/primary" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

echo "== a private CA and a server certificate for localhost"
(
    cd "$work"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
        -subj /CN=pgrepl-demo-ca -keyout ca.key -out ca.crt 2>/dev/null
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -subj /CN=localhost -keyout server.key -out server.csr 2>/dev/null
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' > san.ext
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
        -extfile san.ext -out server.crt 2>/dev/null
    chmod 600 server.key ca.key
    chmod 644 ca.crt server.crt
)
if [ "$(id -u)" = 0 ]; then chown postgres "$work" "$work/server.key" "$work/server.crt"; fi

echo "== a primary: PostgreSQL 15, data checksums, TLS, SCRAM"
as_server "$bin/initdb" -D "$work/primary" -U postgres -A scram-sha-256 --auth-local=trust -k -N \
    -E UTF8 --locale=C >/dev/null
pick_port() { echo $((20000 + RANDOM % 20000)); }
port=$(pick_port)
standby_port=$(pick_port)
cat >> "$work/primary/postgresql.conf" <<CONF
port = $port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$work'
ssl = on
ssl_cert_file = '$work/server.crt'
ssl_key_file = '$work/server.key'
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
CONF
cat > "$work/primary/pg_hba.conf" <<HBA
local    all          all                      trust
hostssl  replication  replicator  127.0.0.1/32  scram-sha-256
hostssl  postgres     replicator  127.0.0.1/32  scram-sha-256
HBA
as_server "$bin/pg_ctl" -D "$work/primary" -l "$work/primary.log" -w start >/dev/null
password=$(head -c 18 /dev/urandom | base64 | tr -d '/+=')
"$bin/psql" -qX -h "$work" -p "$port" -U postgres -d postgres \
    -c "CREATE ROLE replicator LOGIN REPLICATION PASSWORD '$password'" \
    -c "GRANT pg_monitor TO replicator"
echo "== pgbench -i -s $scale"
"$bin/pgbench" -i -q -s "$scale" -h "$work" -p "$port" -U postgres postgres 2>&1 | tail -1

export PGPASSWORD=$password
source="host=localhost hostaddr=127.0.0.1 port=$port user=replicator dbname=postgres sslmode=verify-full sslrootcert=$work/ca.crt channel_binding=require"

echo "== clone-standby check"
"$tool" check --source "$source"

echo "== pgbench writes for ${seconds}s while we clone"
"$bin/pgbench" -n -c 2 -T "$seconds" -h "$work" -p "$port" -U postgres postgres >"$work/pgbench.log" 2>&1 &
load_pid=$!
sleep 2

echo "== clone-standby clone --start"
"$tool" clone --source "$source" --pgdata "$work/standby" --slot demo_standby --create-slot \
    --start --standby-port "$standby_port" --pg-ctl "$bin/pg_ctl" --progress

standby="host=$work port=$standby_port user=replicator dbname=postgres"
echo "== clone-standby status (while pgbench is still writing)"
"$tool" status --primary "$source" --standby "$standby"

echo "== waiting for pgbench to finish, then for the standby to catch up"
wait "$load_pid" || true
load_pid=
tail -3 "$work/pgbench.log"
"$tool" status --primary "$source" --standby "$standby" --wait --timeout 120
primary_rows=$("$bin/psql" -qAtX -h "$work" -p "$port" -U postgres -d postgres -c "SELECT count(*) || ' rows, sum ' || sum(abalance) FROM pgbench_accounts")
standby_rows=$("$bin/psql" -qAtX -h "$work" -p "$standby_port" -U postgres -d postgres -c "SELECT count(*) || ' rows, sum ' || sum(abalance) FROM pgbench_accounts")
echo "primary pgbench_accounts: $primary_rows"
echo "standby pgbench_accounts: $standby_rows"
if [ "$primary_rows" != "$standby_rows" ]; then
    echo "the standby does not hold the primary's data" >&2
    exit 1
fi
echo "demo finished: the standby caught up and holds the same data; cleaning up"
