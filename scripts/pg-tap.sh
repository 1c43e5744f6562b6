#!/usr/bin/env bash
# pg-tap.sh - run PostgreSQL 15's own TAP suites against our front-ends (issue 17).
#
#   scripts/pg-tap.sh                    # every suite below, with our binaries
#   scripts/pg-tap.sh --reference        # the same with the real PostgreSQL 15 tools only
#   scripts/pg-tap.sh pg_basebackup/020_pg_receivewal pg_verifybackup/003_corruption
#   scripts/pg-tap.sh pg_verifybackup    # every file of one directory
#
# Suites (file names from the source package, without .pl):
#   pg_basebackup/010_pg_basebackup   our pg_basebackup (and the others we build) first in PATH
#   pg_basebackup/020_pg_receivewal   our pg_receivewal (and the others we build) first in PATH
#   pg_verifybackup/001..010          only our pg_verifybackup first in PATH: these suites
#                                     take their backups with the real pg_basebackup
#
# What it does
#   1. builds the front-ends: cargo build --locked -p pg-frontends --bins (CARGO_TARGET_DIR
#      is honoured; with --reference nothing is built);
#   2. copies them into a fresh bin directory readable by the OS user postgres, put first in
#      PATH before /usr/lib/postgresql/15/bin (the real tools, initdb, pg_ctl, ...);
#   3. copies the test files (cached by scripts/install-test-tools.sh, which this script
#      runs when they are missing) into a fresh temporary directory owned by postgres;
#   4. runs prove once per file, as postgres when called as root (PostgreSQL refuses to
#      run as root), directly otherwise, with PERL5LIB, PG_REGRESS, TESTDIR, TAR,
#      GZIP_PROGRAM, LZ4 and ZSTD set as PostgreSQL's build system sets them;
#   5. prints one line per file (tests passed/run, seconds) and exits non-zero when a
#      file failed for any reason other than the deliberate exceptions listed below.
#
# Logs: the verbose prove output and the suites' tmp_check/log of a failed file are kept
# (the path is printed); everything is removed when all passed. PGTAP_KEEP=1 keeps all.
#
# Environment
#   PGREPL_CACHE_DIR   the cache directory of install-postgres.sh / install-test-tools.sh
#   CARGO_TARGET_DIR   where cargo builds (default: <repo>/target)
#   PGTAP_KEEP=1       keep the temporary directory even when everything passed
set -euo pipefail
umask 022
cd "$(dirname "$0")/.."
REPO=$(pwd -P)

readonly TAP_DEB_VERSION=15.18-0+deb12u1
readonly TAP_UPSTREAM=${TAP_DEB_VERSION%%-*}
readonly PG_BIN=/usr/lib/postgresql/15/bin
readonly PGXS=/usr/lib/postgresql/15/lib/pgxs/src
readonly PG_USER=postgres
readonly DEFAULT_SUITES=(
  pg_basebackup/010_pg_basebackup
  pg_basebackup/020_pg_receivewal
  pg_verifybackup
)
readonly OUR_TOOLS=(pg_basebackup pg_receivewal pg_verifybackup)

# Deliberate exceptions: behaviours we refuse on purpose. One entry per failing test,
# "<dir>/<file>.pl|<the test's description, exactly as prove prints it>|<reason>".
# A failure listed here is reported but does not fail the run; any other fails it.
# Every entry is also recorded, with its reason, in README.md (section "PostgreSQL's
# TAP suites").
readonly EXCEPTIONS=(
  "pg_verifybackup/005_bad_manifest.pl|input string ended unexpectedly: matches|--version names PostgreSQL 18, whose tool reports the JSON parser's words (could not parse backup manifest: The input string ended unexpectedly.) where 15's says parsing failed"
  "pg_verifybackup/005_bad_manifest.pl|unexpected manifest version: matches|--version names PostgreSQL 18, whose tool reads the version as an integer first: for \"phooey\" it says manifest version not an integer where 15's says unexpected manifest version"
)

log() { printf '==> %s\n' "$*" >&2; }
die() {
  printf 'pg-tap.sh: error: %s\n' "$*" >&2
  exit 1
}

reference=0
suites=()
for arg in "$@"; do
  case $arg in
  --reference) reference=1 ;;
  -h | --help)
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    exit 0
    ;;
  -*) die "unknown option $arg (see --help)" ;;
  *) suites+=("${arg%.pl}") ;;
  esac
done
[[ ${#suites[@]} -gt 0 ]] || suites=("${DEFAULT_SUITES[@]}")

# ---------------------------------------------------------------- where things are

if [[ -n ${PGREPL_CACHE_DIR:-} ]]; then
  CACHE_DIR=$PGREPL_CACHE_DIR
elif [[ $(id -u) -eq 0 ]]; then
  CACHE_DIR=/var/cache/pgrepl
else
  CACHE_DIR=${XDG_CACHE_HOME:-${HOME:?set PGREPL_CACHE_DIR}/.cache}/pgrepl
fi
SRC=$CACHE_DIR/postgres/tap-$TAP_DEB_VERSION/postgresql-$TAP_UPSTREAM/src/bin
if [[ ! -d $SRC/pg_basebackup/t || ! -d $SRC/pg_verifybackup/t ]] ||
  ! perl -MIPC::Run -e 1 2>/dev/null; then
  log "the TAP suites or IPC::Run are missing: running scripts/install-test-tools.sh"
  scripts/install-test-tools.sh || die "scripts/install-test-tools.sh failed"
fi
[[ -d $SRC/pg_basebackup/t ]] || die "no TAP suites in $SRC after scripts/install-test-tools.sh"
for f in "$PG_BIN/initdb" "$PG_BIN/pg_ctl" "$PG_BIN/pg_basebackup" "$PGXS/test/regress/pg_regress"; do
  [[ -x $f ]] || die "$f is missing: run scripts/install-postgres.sh (postgresql-15 and postgresql-client-15)"
done
command -v prove >/dev/null || die "prove is missing (Debian package perl)"

# Expand directory names to their files.
files=()
for s in "${suites[@]}"; do
  if [[ $s != */* ]]; then
    [[ -d $SRC/$s/t ]] || die "unknown suite directory $s (have: pg_basebackup, pg_verifybackup)"
    for f in "$SRC/$s"/t/*.pl; do
      [[ $s == pg_basebackup && $(basename "$f") == 030_* ]] && continue # pg_recvlogical
      files+=("$s/$(basename "$f" .pl)")
    done
  else
    [[ -f $SRC/${s%%/*}/t/${s#*/}.pl ]] || die "unknown suite $s (no $SRC/${s%%/*}/t/${s#*/}.pl)"
    files+=("$s")
  fi
done

# ---------------------------------------------------------------- build

WORK=$(mktemp -d "${TMPDIR:-/tmp}/pg-tap.XXXXXX")
chmod 0755 "$WORK"
keep=${PGTAP_KEEP:-0}
cleanup() {
  if [[ $keep == 0 ]]; then
    rm -rf -- "$WORK"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

BIN=$WORK/bin
mkdir -p "$BIN"
if [[ $reference -eq 0 ]]; then
  log "building the front-ends: cargo build --locked -p pg-frontends --bins"
  cargo build --locked -p pg-frontends --bins || die "cargo build failed"
  target_dir=${CARGO_TARGET_DIR:-$REPO/target}
  for t in "${OUR_TOOLS[@]}"; do
    if [[ -x $target_dir/debug/$t ]]; then
      cp -- "$target_dir/debug/$t" "$BIN/$t"
      chmod 0755 "$BIN/$t"
    fi
  done
else
  log "--reference: the real PostgreSQL 15 tools only ($PG_BIN)"
fi

# The tools a file must find as ours (the files first in its PATH).
tools_for() {
  case $1 in
  pg_verifybackup/*) echo pg_verifybackup ;;
  pg_basebackup/010_*) echo pg_basebackup pg_receivewal pg_verifybackup ;;
  pg_basebackup/020_*) echo pg_receivewal pg_basebackup pg_verifybackup ;;
  *) echo "${OUR_TOOLS[@]}" ;;
  esac
}
# The one tool a file tests: it must be ours (not silently the real one).
tested_tool() {
  case $1 in
  pg_verifybackup/*) echo pg_verifybackup ;;
  pg_basebackup/010_*) echo pg_basebackup ;;
  pg_basebackup/020_*) echo pg_receivewal ;;
  esac
}

run_as_pg() {
  if [[ $(id -u) -eq 0 ]]; then
    runuser -u "$PG_USER" -- "$@"
  else
    "$@"
  fi
}
if [[ $(id -u) -eq 0 ]]; then
  id -u "$PG_USER" >/dev/null 2>&1 || die "OS user $PG_USER is missing: run scripts/install-postgres.sh"
fi

is_exception() { # file description
  local e
  for e in ${EXCEPTIONS[@]+"${EXCEPTIONS[@]}"}; do
    local ef=${e%%|*} rest=${e#*|}
    [[ $ef == "$1.pl" && ${rest%%|*} == "$2" ]] && return 0
  done
  return 1
}

# ---------------------------------------------------------------- run

failed=()
summary=()
total_t0=$SECONDS
for f in "${files[@]}"; do
  dir=${f%%/*} name=${f#*/}
  run=$WORK/run/$f
  mkdir -p "$run/t" "$WORK/pathbin/$f"
  cp -- "$SRC/$dir/t/$name.pl" "$run/t/"
  pathbin=$WORK/pathbin/$f
  missing=''
  if [[ $reference -eq 0 ]]; then
    for t in $(tools_for "$f"); do
      [[ -x $BIN/$t ]] && ln -s -- "$BIN/$t" "$pathbin/$t"
    done
    tool=$(tested_tool "$f")
    if [[ -n $tool && ! -x $BIN/$tool ]]; then
      missing=$tool
    fi
  fi
  if [[ $(id -u) -eq 0 ]]; then
    chown -R "$PG_USER:" "$WORK/run"
    chmod -R a+rX "$WORK/pathbin" "$BIN"
  fi
  logfile=$WORK/$dir-$name.log
  if [[ -n $missing ]]; then
    summary+=("$(printf '%-36s FAILED  %s is not built by pg-frontends' "$f" "$missing")")
    failed+=("$f")
    continue
  fi
  log "$f"
  t0=$SECONDS
  set +e
  (cd "$run" && run_as_pg env \
    PATH="$pathbin:$PG_BIN:/usr/local/bin:/usr/bin:/bin" \
    PERL5LIB="$PGXS/test/perl" PG_REGRESS="$PGXS/test/regress/pg_regress" \
    TESTDIR="$run" TAR=tar GZIP_PROGRAM=gzip LZ4=lz4 ZSTD=zstd \
    prove -v -I "$PGXS/test/perl" "t/$name.pl") >"$logfile" 2>&1
  status=$?
  set -e
  secs=$((SECONDS - t0))
  # prove -v prints each test's "ok N - description" / "not ok N - description".
  ok_count=$(grep -cE '^ok [0-9]+' "$logfile" || true)
  all=$(grep -cE '^(not )?ok [0-9]+' "$logfile" || true)
  unexpected=()
  excepted=()
  while IFS= read -r line; do
    [[ -n $line ]] || continue
    desc=${line#not ok }
    desc=${desc#* }
    desc=${desc#- }
    if is_exception "$f" "$desc"; then
      excepted+=("$desc")
    else
      unexpected+=("$desc")
    fi
  done < <(grep -E '^not ok [0-9]+' "$logfile" | grep -v '# TODO' || true)
  broken=''
  if grep -qE 'Looks like your test exited with|No plan found|Bad plan|Parse errors' "$logfile"; then
    broken='the script did not run to its end'
  elif [[ $status -ne 0 && ${#unexpected[@]} -eq 0 && ${#excepted[@]} -eq 0 ]]; then
    broken="prove exited with status $status"
  fi
  verdict=ok
  if [[ -n $broken || ${#unexpected[@]} -gt 0 ]]; then
    verdict=FAILED
    failed+=("$f")
  elif [[ ${#excepted[@]} -gt 0 ]]; then
    verdict='ok (deliberate exceptions only)'
  fi
  summary+=("$(printf '%-36s %3d/%-3d %4ss  %s%s' "$f" "$ok_count" "$all" "$secs" "$verdict" "${broken:+: $broken}")")
  for d in ${unexpected[@]+"${unexpected[@]}"}; do summary+=("      failed: $d"); done
  for d in ${excepted[@]+"${excepted[@]}"}; do summary+=("      deliberate exception: $d"); done
done

printf '\nPostgreSQL %s TAP suites (%s, %ss in all):\n' "$TAP_UPSTREAM" \
  "$([[ $reference -eq 1 ]] && echo 'reference: the real tools' || echo "our front-ends first in PATH")" \
  "$((SECONDS - total_t0))"
printf '  %s\n' "${summary[@]}"
if [[ ${#failed[@]} -gt 0 ]]; then
  # Keep the logs, drop the clusters and backups (they can be large).
  find "$WORK/run" -mindepth 4 -maxdepth 5 -path '*/tmp_check/t_*' -prune -exec rm -rf -- {} + 2>/dev/null || true
  keep=1
  printf '\nFAILED: %s\nLogs: %s/<dir>-<file>.log and %s/run/<dir>/<file>/tmp_check/log/\n' \
    "${failed[*]}" "$WORK" "$WORK" >&2
  exit 1
fi
printf '\nall passed\n'
