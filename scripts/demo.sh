#!/usr/bin/env bash
# The main job, end to end on a fresh Debian machine.
#
# Until `clone-standby clone` lands (see the clone-standby issue) this shows the
# foundation it stands on: it starts a throwaway primary secured as a real deployment
# would be (TLS with a private CA, SCRAM-SHA-256, a dedicated REPLICATION role, a
# hostssl-only pg_hba entry), then connects with `clone-standby identify` using
# sslmode=verify-full and channel_binding=require, and cleans up after itself.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

scripts/install-postgres.sh
command -v openssl >/dev/null || { apt-get update -qq && apt-get install -y -qq openssl; }

echo "== building clone-standby (release)"
cargo build --release --locked -p clone-standby
tool=$repo/target/release/clone-standby

cache=${PGREPL_CACHE_DIR:-$([ "$(id -u)" = 0 ] && echo /var/cache/pgrepl || echo "${XDG_CACHE_HOME:-$HOME/.cache}/pgrepl")}
bin=$cache/postgres/15/bin
[ -x "$bin/postgres" ] || bin=/usr/lib/postgresql/15/bin

work=$(mktemp -d /tmp/pgrepl-demo.XXXXXX)
chmod 755 "$work"
as_server() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
cleanup() {
    as_server "$bin/pg_ctl" -D "$work/primary" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

echo "== making a private CA and a server certificate for localhost"
(
    cd "$work"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
        -subj /CN=pgrepl-demo-ca -keyout ca.key -out ca.crt 2>/dev/null
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -subj /CN=localhost -keyout server.key -out server.csr 2>/dev/null
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' > san.ext
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
        -extfile san.ext -out server.crt 2>/dev/null
    chmod 600 server.key
)
[ "$(id -u)" = 0 ] && chown postgres "$work" "$work/server.key" "$work/server.crt" "$work/ca.crt"

echo "== starting a throwaway primary (PostgreSQL 15, data checksums, TLS, SCRAM)"
as_server "$bin/initdb" -D "$work/primary" -U postgres -A scram-sha-256 --auth-local=trust -k -N \
    -E UTF8 --locale=C >/dev/null
port=$((20000 + RANDOM % 20000))
cat >> "$work/primary/postgresql.conf" <<CONF
port = $port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$work'
ssl = on
ssl_cert_file = '$work/server.crt'
ssl_key_file = '$work/server.key'
wal_level = replica
max_wal_senders = 10
CONF
cat > "$work/primary/pg_hba.conf" <<HBA
local    all          postgres                 trust
hostssl  replication  replicator  127.0.0.1/32  scram-sha-256
HBA
as_server "$bin/pg_ctl" -D "$work/primary" -l "$work/primary.log" -w start >/dev/null
password=$(head -c 18 /dev/urandom | base64 | tr -d '/+=')
as_server "$bin/postgres" --version
"$bin/../bin/psql" -q -h "$work" -p "$port" -U postgres -d postgres \
    -c "CREATE ROLE replicator LOGIN REPLICATION PASSWORD '$password'" 2>/dev/null \
 || /usr/bin/psql -q -h "$work" -p "$port" -U postgres -d postgres \
    -c "CREATE ROLE replicator LOGIN REPLICATION PASSWORD '$password'"

echo "== clone-standby identify (verify-full, channel_binding=require)"
PGPASSWORD=$password "$tool" identify \
    --source "host=localhost hostaddr=127.0.0.1 port=$port user=replicator sslmode=verify-full sslrootcert=$work/ca.crt channel_binding=require"

echo "== the same as JSON"
PGPASSWORD=$password "$tool" identify --json \
    --source "postgresql://replicator@localhost:$port/?hostaddr=127.0.0.1&sslmode=verify-full&sslrootcert=$work/ca.crt"

echo "== a wrong password is refused with a clear message"
if PGPASSWORD=wrong "$tool" identify --source "host=127.0.0.1 port=$port user=replicator sslmode=require"; then
    echo "unexpected: a wrong password was accepted" >&2
    exit 1
fi
echo "demo finished: the primary is stopped and $work removed"
