#!/usr/bin/env bash
# install-bench-peers.sh - install the peer tools of the object-storage benchmark
# (`compare --cases repo-backup,repo-restore`, benches/RESULTS.md).
#
# Target: Debian 12 (bookworm) x86_64, run as root (CI) or through sudo.
# Idempotent: a rerun with everything in place only checks versions.
#
# What it installs
#   pgbackrest   Debian's package (2.45).  It speaks only https to S3, so the
#                harness puts haproxy in front of the store (below).
#   haproxy      Debian's package (2.6), used by the harness in TCP mode as a
#                TLS terminator with a self-signed certificate it generates at
#                run time with the openssl CLI (installed too, if missing).
#                The package's own service is not started by this script (the
#                machine's policy-rc.d decides; the harness starts its own
#                haproxy on its own port and configuration).
#   barman-cloud PyPI `barman[cloud]` (pinned below) plus the compression
#                modules its --snappy / --lz4 / --zstd options need, in a venv
#                built from /usr/bin/python3 (not a private interpreter), so
#                that the `postgres` OS user can run it, e.g. as the server's
#                archive_command.
#
# Not installed here: the Garage S3 store itself.  The harness looks for
#   <cache>/garage/bin/garage (or $PGREPL_GARAGE_BIN); it is built with
#   `cargo install garage --version 2.5.0 --locked --no-default-features
#    --features bundled-libs,sqlite,lmdb --root <cache>/garage` (about 8
#   minutes on 2 cores).  Pass --with-garage to have this script do that when
#   the binary is missing.
#
# Cache directory (the same as scripts/install-postgres.sh)
#   $PGREPL_CACHE_DIR if set, else /var/cache/pgrepl when run as root, else
#   ${XDG_CACHE_HOME:-$HOME/.cache}/pgrepl.
#
# Layout
#   <cache>/bench-peers/barman-venv/bin/barman-cloud-{backup,restore,...}
#   <cache>/bench-peers/barman-venv/.pgrepl-installed   the pip spec installed
#   <cache>/garage/bin/garage                            (with --with-garage)
#
# Usage: scripts/install-bench-peers.sh [--with-garage]

set -euo pipefail

BARMAN_SPEC='barman[cloud]==3.19.1'
PY_EXTRAS=(python-snappy lz4 zstandard)
GARAGE_VERSION=2.5.0

die() {
  echo "install-bench-peers.sh: $*" >&2
  exit 1
}
say() { echo "install-bench-peers.sh: $*" >&2; }

WITH_GARAGE=0
for arg in "$@"; do
  case $arg in
    --with-garage) WITH_GARAGE=1 ;;
    -h | --help)
      sed -n '2,/^set -euo/p' "$0" | sed '$d'
      exit 0
      ;;
    *) die "unknown argument: $arg" ;;
  esac
done

if [[ $(id -u) -eq 0 ]]; then
  SUDO=()
else
  command -v sudo >/dev/null || die "not root and no sudo: run as root"
  SUDO=(sudo)
fi

if [[ -n ${PGREPL_CACHE_DIR:-} ]]; then
  CACHE_DIR=$PGREPL_CACHE_DIR
elif [[ $(id -u) -eq 0 ]]; then
  CACHE_DIR=/var/cache/pgrepl
else
  [[ -n ${HOME:-} || -n ${XDG_CACHE_HOME:-} ]] ||
    die "neither HOME nor XDG_CACHE_HOME is set; set PGREPL_CACHE_DIR"
  CACHE_DIR=${XDG_CACHE_HOME:-$HOME/.cache}/pgrepl
fi
mkdir -p -- "$CACHE_DIR/bench-peers"
CACHE_DIR=$(cd -- "$CACHE_DIR" && pwd -P)
PEERS=$CACHE_DIR/bench-peers
VENV=$PEERS/barman-venv

# 1. Debian packages.
missing=()
for pkg in pgbackrest haproxy openssl python3-venv; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' ||
    missing+=("$pkg")
done
if ((${#missing[@]})); then
  say "apt-get install ${missing[*]}"
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
pgbackrest version >/dev/null || die "pgbackrest does not run"
haproxy -v >/dev/null || die "haproxy does not run"

# 2. The barman-cloud venv.
want="$BARMAN_SPEC ${PY_EXTRAS[*]}"
if [[ ! -x $VENV/bin/barman-cloud-backup || "$(cat "$VENV/.pgrepl-installed" 2>/dev/null)" != "$want" ]]; then
  say "building the barman-cloud venv at $VENV ($want)"
  rm -rf -- "$VENV"
  /usr/bin/python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "$BARMAN_SPEC" "${PY_EXTRAS[@]}"
  echo "$want" >"$VENV/.pgrepl-installed"
fi
"$VENV/bin/barman-cloud-backup" --version >/dev/null 2>&1 ||
  die "$VENV/bin/barman-cloud-backup does not run"
chmod -R a+rX -- "$PEERS"

# 3. Garage (optional).
GARAGE=$CACHE_DIR/garage/bin/garage
if [[ ! -x $GARAGE && $WITH_GARAGE -eq 1 ]]; then
  say "cargo install garage $GARAGE_VERSION into $CACHE_DIR/garage (about 8 minutes)"
  cargo install garage --version "$GARAGE_VERSION" --locked --no-default-features \
    --features bundled-libs,sqlite,lmdb --root "$CACHE_DIR/garage"
fi

# 4. The postgres OS user (the harness runs the servers and pgBackRest as it)
#    must reach the venv.
if id postgres >/dev/null 2>&1 && [[ $(id -u) -eq 0 ]]; then
  su -s /bin/sh postgres -c "'$VENV/bin/barman-cloud-backup' --version" >/dev/null 2>&1 ||
    die "the postgres user cannot run $VENV/bin/barman-cloud-backup (check the permissions of the path)"
fi

say "pgbackrest: $(pgbackrest version)"
say "haproxy: $(haproxy -v | head -1)"
say "barman-cloud: $("$VENV/bin/barman-cloud-backup" --version 2>&1)"
if [[ -x $GARAGE ]]; then
  say "garage: $("$GARAGE" --version 2>&1 | head -1)"
else
  say "garage: not at $GARAGE (build it with --with-garage, see the header)"
fi
