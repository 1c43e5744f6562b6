#!/usr/bin/env bash
# install-garage.sh - build the Garage S3-compatible object store the tests store
# backups in.
#
# What it installs
#   garage 2.5.0   crates.io's `garage` (AGPL-3.0), built once from source with
#                  `cargo install --locked` and only the features the tests need:
#                  bundled-libs (SQLite, LMDB and zstd built in, no system libraries
#                  needed at run time), sqlite and lmdb.  It is an external program:
#                  testkit runs the binary (testkit::Garage) and never links it.
#                  The build takes about 8 minutes on 2 cores and needs cargo and a C
#                  compiler.
#
# Cache directory: the one install-postgres.sh uses ($PGREPL_CACHE_DIR if set, else
# /var/cache/pgrepl for root, else ${XDG_CACHE_HOME:-$HOME/.cache}/pgrepl).
#
# Layout
#   <cache>/garage/bin/garage                     the binary (cargo install --root)
#   <cache>/garage/.crates.toml, .crates2.json    cargo's own install records
#   <cache>/garage/.pgrepl-installed              version and features (written last)
#
# Idempotent: a rerun with a matching stamp only checks that `garage --version` runs
# and reports 2.5.0.  A binary already installed there by the same cargo command (by
# hand, or by an interrupted run) that reports version 2.5.0 and these features is
# adopted without rebuilding: the script stamps it.  Anything else is rebuilt.
# The tree is made a+rX, so that any user can run the binary.
#
# Usage: scripts/install-garage.sh      (no arguments)

set -euo pipefail
umask 022

readonly CRATE=garage
readonly VERSION=2.5.0
readonly FEATURES=bundled-libs,sqlite,lmdb
readonly STAMP=.pgrepl-installed
readonly STAMP_TEXT="$CRATE==$VERSION features=$FEATURES"

log() { printf '==> %s\n' "$*" >&2; }
die() {
  printf 'install-garage.sh: error: %s\n' "$*" >&2
  exit 1
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
mkdir -p -- "$CACHE_DIR/garage"
CACHE_DIR=$(cd -- "$CACHE_DIR" && pwd -P)

DEST=$CACHE_DIR/garage
BIN=$DEST/bin/garage

# Prints `garage --version`'s line if it reports $VERSION built with every feature of
# $FEATURES, e.g. `garage cargo:2.5.0 [features: bundled-libs, lmdb, sqlite]`;
# fails otherwise.
garage_version_ok() {
  local line feature
  [[ -x $BIN ]] || return 1
  line=$("$BIN" --version 2>&1) || return 1
  [[ $line =~ (^|[^0-9.])${VERSION//./\\.}([^0-9.]|$) ]] || return 1
  for feature in ${FEATURES//,/ }; do
    [[ $line == *"$feature"* ]] || return 1
  done
  printf '%s\n' "$line"
}

check_garage() {
  local line
  line=$(garage_version_ok) ||
    die "$BIN does not run or does not report $CRATE $VERSION with features $FEATURES: $("$BIN" --version 2>&1 || true)"
  log "Garage ready: $BIN ($line)"
}

if [[ -f $DEST/$STAMP && $(cat "$DEST/$STAMP") == "$STAMP_TEXT" ]]; then
  check_garage
  exit 0
fi

# One build at a time per cache directory.
if command -v flock >/dev/null 2>&1; then
  exec 9>"$DEST/.install.lock"
  flock 9
  if [[ -f $DEST/$STAMP && $(cat "$DEST/$STAMP") == "$STAMP_TEXT" ]]; then
    check_garage
    exit 0
  fi
fi

rm -f -- "$DEST/$STAMP"
if garage_version_ok >/dev/null; then
  log "adopting the $CRATE $VERSION binary already installed at $BIN"
else
  command -v cargo >/dev/null 2>&1 ||
    die "cargo is not installed: install a Rust toolchain (https://rustup.rs, or Debian's cargo) and run this again"
  log "building $CRATE $VERSION (features $FEATURES) with cargo install; this takes several minutes"
  cargo install "$CRATE" --version "$VERSION" --locked --force \
    --no-default-features --features "$FEATURES" --root "$DEST" ||
    die "cargo install $CRATE $VERSION failed"
  garage_version_ok >/dev/null ||
    die "the freshly built $BIN does not report $CRATE $VERSION with features $FEATURES: $("$BIN" --version 2>&1 || true)"
fi

chmod -R a+rX -- "$DEST"
printf '%s' "$STAMP_TEXT" >"$DEST/$STAMP.tmp"
chmod a+r -- "$DEST/$STAMP.tmp"
mv -f -- "$DEST/$STAMP.tmp" "$DEST/$STAMP"
check_garage
