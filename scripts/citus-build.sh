#!/usr/bin/env bash
# Builds Citus (distributed PostgreSQL) from its public source into the local PostgreSQL 15,
# the way docs/scaling.md and /work/shared/CITUS.md describe. Idempotent: every step checks
# whether it is already done and says what it does.
#
#   scripts/citus-build.sh [--git-dir DIR] [--build-dir DIR] [--force]
#
#   --git-dir DIR   a git directory (bare mirror) of github.com/citusdata/citus holding the tag
#                   (default: $CITUS_GIT_DIR, else /work/.mirror/citusdata+citus/repo)
#   --build-dir DIR where the source is unpacked and built (default: /var/tmp/citus-build)
#   --force         rebuild and reinstall even when citus.so of this version is installed
#
# Citus 13.2.x is the last line that supports PostgreSQL 15 (its main branch needs 16-18).
# Needs root (apt-get, make install into /usr/lib/postgresql/15).
set -euo pipefail

CITUS_TAG=v13.2.2
CITUS_VERSION=13.2.2
PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
GIT_DIR_DEFAULT=/work/.mirror/citusdata+citus/repo
GIT_DIR=${CITUS_GIT_DIR:-$GIT_DIR_DEFAULT}
BUILD_DIR=/var/tmp/citus-build
FORCE=0

while [ $# -gt 0 ]; do
    case "$1" in
        --git-dir) GIT_DIR=$2; shift 2 ;;
        --build-dir) BUILD_DIR=$2; shift 2 ;;
        --force) FORCE=1; shift ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "citus-build: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done

say() { echo "citus-build: $*" >&2; }
die() { say "ERROR: $*"; exit 1; }

[ -x "$PG_CONFIG" ] || die "$PG_CONFIG not found: install postgresql-15 first (apt-get install postgresql-15)"
PKGLIB=$("$PG_CONFIG" --pkglibdir)
SHAREDIR=$("$PG_CONFIG" --sharedir)

installed_version() {
    # The extension's default_version from the installed control file, if any.
    sed -n "s/^default_version *= *'\(.*\)'/\1/p" "$SHAREDIR/extension/citus.control" 2>/dev/null || true
}

if [ "$FORCE" = 0 ] && [ -f "$PKGLIB/citus.so" ] && [ "$(installed_version)" = "${CITUS_VERSION%.*}-1" ]; then
    say "citus $(installed_version) already installed in $PKGLIB (use --force to rebuild); nothing to do"
    exit 0
fi

# 1. Build dependencies (Debian packages).
DEPS="postgresql-server-dev-15 liblz4-dev libzstd-dev libkrb5-dev libicu-dev libxslt1-dev
      libselinux1-dev libpam0g-dev libreadline-dev build-essential"
missing=""
for p in $DEPS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    say "installing build dependencies:$missing"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $missing >&2 \
        || { say "apt-get install failed; retrying after apt-get update"; apt-get update >&2;
             DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $missing >&2; }
else
    say "build dependencies present"
fi

# 2. Source: the tag from the git directory.
SRC=$BUILD_DIR/citus-$CITUS_VERSION
if [ -f "$SRC/configure" ] && [ "$FORCE" = 0 ]; then
    say "source already unpacked in $SRC"
else
    [ -d "$GIT_DIR" ] || die "no git directory at $GIT_DIR: fetch github:citusdata/citus (the fetch tool) or pass --git-dir"
    git --git-dir="$GIT_DIR" rev-parse -q --verify "refs/tags/$CITUS_TAG" >/dev/null \
        || die "$GIT_DIR has no tag $CITUS_TAG"
    say "unpacking $CITUS_TAG from $GIT_DIR into $SRC"
    rm -rf "$SRC"
    mkdir -p "$SRC"
    git --git-dir="$GIT_DIR" archive "$CITUS_TAG" | tar -x -C "$SRC"
fi

# 3. Debian's PostgreSQL 15.18 headers export have_createdb_privilege(); Citus 13.2 still
#    defines its own static inline copy for PostgreSQL < 16, which no longer compiles.
COMPAT=$SRC/src/include/pg_version_compat.h
if grep -q '^have_createdb_privilege(void)' "$COMPAT"; then
    if grep -rqs 'have_createdb_privilege' "$("$PG_CONFIG" --includedir-server)/commands/dbcommands.h"; then
        say "removing Citus' static have_createdb_privilege() from pg_version_compat.h (the server headers declare it)"
        # The definition is: "static inline bool" / "have_createdb_privilege(void)" / "{" ... "}".
        awk '
            pending != "" && /^have_createdb_privilege\(void\)/ { skipping = 1; pending = ""; next }
            pending != "" { print pending; pending = "" }
            skipping { if ($0 ~ /^}/) { skipping = 0 } ; next }
            /^static inline bool[[:space:]]*$/ { pending = $0; next }
            { print }
            END { if (pending != "") print pending }
        ' "$COMPAT" > "$COMPAT.new"
        mv "$COMPAT.new" "$COMPAT"
        ! grep -q 'have_createdb_privilege(void)' "$COMPAT" || die "could not remove have_createdb_privilege from $COMPAT"
    else
        say "server headers do not declare have_createdb_privilege(): keeping Citus' own"
    fi
else
    say "pg_version_compat.h already without its own have_createdb_privilege()"
fi

# 4. Configure, build, install.
cd "$SRC"
if [ ! -f Makefile.global ] || [ "$FORCE" = 1 ]; then
    say "configure --without-libcurl (PG_CONFIG=$PG_CONFIG)"
    PG_CONFIG=$PG_CONFIG ./configure --without-libcurl >"$BUILD_DIR/configure.log" 2>&1 \
        || { tail -30 "$BUILD_DIR/configure.log" >&2; die "configure failed (log: $BUILD_DIR/configure.log)"; }
else
    say "already configured"
fi
say "make -j2 (log: $BUILD_DIR/make.log)"
make -j2 >"$BUILD_DIR/make.log" 2>&1 \
    || { grep -m5 -B2 -A5 'error' "$BUILD_DIR/make.log" >&2; die "make failed (log: $BUILD_DIR/make.log)"; }
say "make install into $PKGLIB and $SHAREDIR/extension"
make install >"$BUILD_DIR/install.log" 2>&1 || { tail -30 "$BUILD_DIR/install.log" >&2; die "make install failed"; }

[ -f "$PKGLIB/citus.so" ] || die "citus.so not in $PKGLIB after make install"
say "installed citus $(installed_version) ($PKGLIB/citus.so)"
say "each server needs shared_preload_libraries = 'citus' (tests/src/citus.rs does it); then CREATE EXTENSION citus"
