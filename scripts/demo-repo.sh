#!/usr/bin/env bash
# The WAL archive in object storage, end to end, on a fresh Debian machine: a primary
# whose every COMMIT returns only once its WAL is stored in an S3 bucket, crashed and
# rebuilt from the bucket alone, with no acknowledged commit lost.
#
#  1. installs PostgreSQL (scripts/install-postgres.sh) and Garage, a small S3-compatible
#     store (scripts/install-garage.sh; the first build takes about 8 minutes), and builds
#     clone-standby;
#  2. starts a single-node Garage store on 127.0.0.1 with a key and a bucket;
#  3. starts a primary with a pgbench database;
#  4. streams its WAL into the bucket with `clone-standby receive-wal --repo …
#     --synchronous`, and names that receiver in the primary's
#     synchronous_standby_names, so a COMMIT waits until its WAL is in the store;
#  5. takes a base backup into the same repository (`clone-standby backup --repo`);
#  6. puts the primary under light load (pgbench) and, beside it, a loop that inserts
#     numbered rows, one COMMIT each, writing a number to a local file only after its
#     COMMIT returned: that file is the list of acknowledged commits;
#  7. crashes the primary (`pg_ctl stop -m immediate`) and stops the receiver;
#  8. restores a new server from the repository alone (`clone-standby restore --repo`),
#     which replays the archived WAL through `clone-standby wal-fetch`, starts it, and
#     checks that every acknowledged number is in the restored table;
#  9. stops everything and removes its files (also on failure or Ctrl-C).
#
# Environment: DEMO_SCALE (pgbench scale, default 5), DEMO_SECONDS (load before the
# crash, default 20), DEMO_KEEP=1 (keep the work directory for inspection).
set -euo pipefail
cd "$(dirname "$0")/.."
repo_root=$(pwd)
scale=${DEMO_SCALE:-5}
seconds=${DEMO_SECONDS:-20}

step() { printf '\n== %s\n' "$*"; }
say() { printf '   %s\n' "$*"; }

step "installing PostgreSQL and Garage, building clone-standby (release)"
scripts/install-postgres.sh
scripts/install-garage.sh
if [[ -n ${PGREPL_CACHE_DIR:-} ]]; then
    cache=$PGREPL_CACHE_DIR
elif [[ $(id -u) -eq 0 ]]; then
    cache=/var/cache/pgrepl
else
    cache=${XDG_CACHE_HOME:-$HOME/.cache}/pgrepl
fi
garage_bin=$cache/garage/bin/garage
cargo build --release --locked -p clone-standby
bin=/usr/lib/postgresql/15/bin

work=$(mktemp -d /tmp/pgrepl-demo-repo.XXXXXX)
chmod 755 "$work"
# The server runs restore_command (clone-standby wal-fetch) as its own OS user, which
# may not be able to reach a build directory under /root: use a copy it can run.
mkdir -p "$work/bin"
install -m 755 "${CARGO_TARGET_DIR:-$repo_root/target}/release/clone-standby" "$work/bin/clone-standby"
tool=$work/bin/clone-standby

as_server() { if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }
# As root, the servers run as the postgres OS user, which creates their directories here.
if [[ $(id -u) -eq 0 ]]; then chown postgres "$work"; fi
garage_pid= receiver_pid= load_pid= acker_pid=
cleanup() {
    local status=$?
    for pid in $acker_pid $load_pid $receiver_pid; do
        kill "$pid" 2>/dev/null || true
    done
    as_server "$bin/pg_ctl" -D "$work/restored" -m immediate stop >/dev/null 2>&1 || true
    as_server "$bin/pg_ctl" -D "$work/primary" -m immediate stop >/dev/null 2>&1 || true
    [[ -n $garage_pid ]] && kill "$garage_pid" 2>/dev/null || true
    wait 2>/dev/null || true
    if [[ ${DEMO_KEEP:-0} == 1 ]]; then
        echo "kept $work (DEMO_KEEP=1)"
    else
        rm -rf "$work"
    fi
    if [[ $status -ne 0 ]]; then
        echo "demo-repo.sh FAILED (exit status $status); run it with DEMO_KEEP=1 to keep the logs" >&2
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

pick_port() { echo $((20000 + RANDOM % 20000)); }
s3_port=$(pick_port)
rpc_port=$((s3_port + 1))
admin_port=$((s3_port + 2))
port=$(pick_port)
restored_port=$((port + 1))

step "starting a single-node Garage S3 store on 127.0.0.1:$s3_port"
mkdir -p "$work/garage"
cat > "$work/garage/garage.toml" <<TOML
metadata_dir = "$work/garage/meta"
data_dir = "$work/garage/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$rpc_port"
rpc_public_addr = "127.0.0.1:$rpc_port"
rpc_secret = "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$s3_port"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:$admin_port"
admin_token = "$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
TOML
chmod 600 "$work/garage/garage.toml"
garage() { "$garage_bin" -c "$work/garage/garage.toml" "$@"; }
RUST_LOG=warn "$garage_bin" -c "$work/garage/garage.toml" server >"$work/garage/garage.log" 2>&1 &
garage_pid=$!
# Retries a garage command until the server answers it (30 s at most).
retry() {
    local i
    for i in $(seq 150); do
        if out=$("$@" 2>&1); then printf '%s\n' "$out"; return 0; fi
        kill -0 "$garage_pid" 2>/dev/null || { cat "$work/garage/garage.log" >&2; return 1; }
        sleep 0.2
    done
    printf '%s\n' "$out" >&2
    return 1
}
node=$(retry garage node id -q)
node=${node%%@*}
retry garage layout assign -z dc1 -c 1G "$node" >/dev/null
retry garage layout apply --version 1 >/dev/null
key=$(retry garage key create demo-key)
key_id=$(awk -F': *' '/Key ID/ {print $2}' <<<"$key")
secret=$(awk -F': *' '/Secret key/ {print $2}' <<<"$key")
retry garage bucket create demo >/dev/null
retry garage bucket allow --read --write --owner demo --key demo-key >/dev/null
say "bucket 'demo', access key $key_id"
# The repository commands read the store's address and key from the standard AWS_*
# variables, as the AWS CLI does. restore writes them into a private file in the new data
# directory for the server's restore_command.
export AWS_ACCESS_KEY_ID=$key_id AWS_SECRET_ACCESS_KEY=$secret AWS_REGION=garage \
    AWS_ENDPOINT_URL=http://127.0.0.1:$s3_port AWS_ALLOW_HTTP=true
repo=s3://demo/db1

step "a primary: PostgreSQL 15 on 127.0.0.1:$port, data checksums, pgbench scale $scale"
as_server "$bin/initdb" -D "$work/primary" -U postgres -A trust -k -N -E UTF8 --locale=C >/dev/null
cat >> "$work/primary/postgresql.conf" <<CONF
port = $port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$work'
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
CONF
# Trust on loopback keeps this demo short; scripts/demo.sh shows TLS and SCRAM.
cat > "$work/primary/pg_hba.conf" <<HBA
local  all          all                 trust
host   all          all   127.0.0.1/32  trust
host   replication  all   127.0.0.1/32  trust
HBA
as_server "$bin/pg_ctl" -D "$work/primary" -l "$work/primary.log" -w start >/dev/null
psql_primary() { "$bin/psql" -qAtX -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d postgres "$@"; }
"$bin/pgbench" -i -q -s "$scale" -h 127.0.0.1 -p "$port" -U postgres postgres 2>&1 | tail -1
psql_primary -c "CREATE TABLE acked (id bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT now())"

step "streaming WAL into $repo: clone-standby receive-wal --synchronous"
say "every record's CRC is checked; the receiver reports as flushed only what the store acknowledged"
source="host=127.0.0.1 port=$port user=postgres application_name=demo_archiver"
"$tool" receive-wal --source "$source" --repo "$repo" --slot demo_archive --create-slot \
    --synchronous >"$work/receiver.log" 2>&1 &
receiver_pid=$!
say "synchronous_standby_names = 'demo_archiver': a COMMIT now returns only once its WAL is stored"
psql_primary -c "ALTER SYSTEM SET synchronous_standby_names = 'demo_archiver'" -c "SELECT pg_reload_conf()" >/dev/null
for i in $(seq 300); do
    state=$(psql_primary -c "SELECT state || ' ' || sync_state FROM pg_stat_replication WHERE application_name = 'demo_archiver'")
    [[ $state == "streaming sync" ]] && break
    kill -0 "$receiver_pid" 2>/dev/null || { cat "$work/receiver.log" >&2; exit 1; }
    sleep 0.2
done
[[ $state == "streaming sync" ]] || { echo "the receiver did not become the synchronous standby" >&2; cat "$work/receiver.log" >&2; exit 1; }
say "pg_stat_replication: demo_archiver is $state"

step "a base backup into the same repository: clone-standby backup --repo $repo"
"$tool" backup --source "host=127.0.0.1 port=$port user=postgres" --repo "$repo"
"$tool" list --repo "$repo"

step "load for ${seconds}s: pgbench, and a loop recording each acknowledged COMMIT"
"$bin/pgbench" -n -c 2 -j 2 -R 100 -T 3600 -h 127.0.0.1 -p "$port" -U postgres postgres \
    >"$work/pgbench.log" 2>&1 &
load_pid=$!
: > "$work/acked.txt"
(
    i=0
    while :; do
        i=$((i + 1))
        # The number is written only after psql saw the COMMIT succeed.
        psql_primary -c "INSERT INTO acked (id) VALUES ($i)" 2>/dev/null || exit 0
        echo "$i" >> "$work/acked.txt"
    done
) &
acker_pid=$!
sleep "$seconds"
say "$(wc -l < "$work/acked.txt") commits acknowledged so far"

step "crashing the primary: pg_ctl stop -m immediate (no shutdown checkpoint, no goodbye)"
as_server "$bin/pg_ctl" -D "$work/primary" -m immediate stop >/dev/null
wait "$acker_pid" 2>/dev/null || true
acker_pid=
kill "$load_pid" 2>/dev/null || true
wait "$load_pid" 2>/dev/null || true
load_pid=
acked=$(wc -l < "$work/acked.txt")
last=$(tail -1 "$work/acked.txt")
say "$acked commits were acknowledged to the client (the last was number $last)"
say "the primary's data directory is now treated as lost; the receiver is stopped too"
kill "$receiver_pid" 2>/dev/null || true
wait "$receiver_pid" 2>/dev/null || true
receiver_pid=
say "receiver's last lines:"
tail -3 "$work/receiver.log" | sed 's/^/     /'

step "restoring a new server from the repository alone: clone-standby restore --repo $repo"
"$tool" restore --repo "$repo" --pgdata "$work/restored" --backup latest
# The backup carries the primary's settings: a new port, and no synchronous standby to
# wait for (nothing streams from the restored server).
sed -i '/^synchronous_standby_names/d' "$work/restored/postgresql.auto.conf" 2>/dev/null || true
cat >> "$work/restored/postgresql.conf" <<CONF
port = $restored_port
synchronous_standby_names = ''
CONF
if [[ $(id -u) -eq 0 ]]; then chown -R postgres: "$work/restored"; fi
if grep -hs "^restore_command" "$work/restored/postgresql.auto.conf" "$work/restored/postgresql.conf" >"$work/restore_command.txt"; then
    say "restore wrote a restore_command, so the server fetches the archived WAL from the repository:"
    sed 's/^/     /' "$work/restore_command.txt"
else
    say "this build's restore wrote no restore_command (clone-standby wal-fetch is not there yet):"
    say "the restored server can replay only the WAL inside the backup, so the check below will fail"
fi

step "starting the restored server on port $restored_port: it replays the archived WAL, then opens"
as_server "$bin/pg_ctl" -D "$work/restored" -l "$work/restored.log" -w -t 600 start >/dev/null
psql_restored() { "$bin/psql" -qAtX -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$restored_port" -U postgres -d postgres "$@"; }
for i in $(seq 600); do
    [[ $(psql_restored -c "SELECT pg_is_in_recovery()" 2>/dev/null) == f ]] && break
    sleep 0.5
done
say "in recovery: $(psql_restored -c "SELECT pg_is_in_recovery()")"
say "what the restored server's log says about it:"
grep -E "restored log file|redo done|archive recovery complete|selected new timeline|ready to accept" \
    "$work/restored.log" | sed 's/^/     /' | tail -6 || true

step "every acknowledged commit must be in the restored server"
psql_restored -c "SELECT id FROM acked ORDER BY id" > "$work/restored-ids.txt"
# comm wants both lists in the same (textual) order.
sort "$work/acked.txt" > "$work/acked.sorted"
sort "$work/restored-ids.txt" > "$work/restored.sorted"
missing=$(comm -23 "$work/acked.sorted" "$work/restored.sorted" | wc -l)
present=$(wc -l < "$work/restored-ids.txt")
say "acknowledged to the client: $acked (1 … $last)"
say "rows in the restored table: $present"
say "acknowledged but missing:   $missing"
if [[ $present -gt $acked ]]; then
    say "($((present - acked)) row(s) committed but never acknowledged: the crash came between COMMIT and its reply)"
fi
if [[ $missing -ne 0 ]]; then
    echo "an acknowledged commit is missing from the restored server" >&2
    exit 1
fi
echo
echo "demo finished: the primary was lost, and the server rebuilt from the bucket alone holds every acknowledged commit; cleaning up"
