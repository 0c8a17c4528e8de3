#!/usr/bin/env bash
# Installs and runs logtally the way operators do, in containers (podman, no registry), all
# against a real PostgreSQL started here on the host (host networking):
#
#   deb      a fresh Debian 12 container: `apt-get install ./*.deb` pulls in nginx; the
#            stock nginx.conf plus one site with `logtally on` passes `nginx -t` and
#            serves; the sidecar runs as the unit would (user logtally, its groups, the
#            packaged config and paths) and commits exactly the requests nginx logged;
#            the installed unit passes `systemd-analyze verify`
#   upgrade  in the same container: both packages upgraded in place (apt-get install of a
#            newer version) with nginx running and traffic flowing, the sidecar restarted
#            as the postinst would, nginx's binary upgraded to load the new module → exact
#   remove   `apt-get remove` of the module package leaves a stock nginx that starts
#   pod      deploy/kubernetes/logtally.yaml with `podman kube play` (images built from the
#            same packages by docker/*.Dockerfile --target host): bursts with quiet gaps,
#            the sidecar container killed and restarted once, nginx reloaded once → exact;
#            then `podman pod stop -t 30` → every event committed
#
#   scripts/containers-test.sh            everything, short quiet gaps (12 s: just over the
#                                         reader's 10 s dead-writer grace)
#   scripts/containers-test.sh --long     quiet gaps of 60 s
#   scripts/containers-test.sh deb pod    only the named parts (deb, upgrade, remove, pod;
#                                         upgrade and remove run after deb)
#   --no-build                            package what target/release holds
#   --keep                                leave the containers, pod and work folder
#
# The truth for every count is nginx's own access log (lines for /e), compared with the
# sum PostgreSQL holds. A mismatch is reported with both numbers and makes the exit status
# non-zero. Needs root (podman, apt-get, debootstrap). Installs podman runc catatonit
# debootstrap postgresql-15 curl if missing; writes /etc/containers/containers.conf (runc, ulimits
# this machine allows: see CONTAINERS.md); makes the base image
# docker.io/library/debian:bookworm-slim with debootstrap once (cached in podman's store).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

gap=12
build=1
keep=0
parts=()
for arg in "$@"; do
  case "$arg" in
    --long) gap=60 ;;
    --no-build) build=0 ;;
    --keep) keep=1 ;;
    deb | upgrade | remove | pod) parts+=("$arg") ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "containers-test: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done
[[ ${#parts[@]} -gt 0 ]] || parts=(deb upgrade remove pod)
want() { local p; for p in "${parts[@]}"; do [[ $p == "$1" ]] && return 0; done; return 1; }
if { want upgrade || want remove; } && ! want deb; then parts+=(deb); fi

base_image=docker.io/library/debian:bookworm-slim
base_label=org.logtally.base=debootstrap-bookworm-minbase
ctr=logtally-ct-deb
pod=logtally-edge
pod_volumes=(logtally-nginx logtally-sidecar)   # the manifest's ConfigMaps, as podman keeps them
started=$(date +%s)
work="$(mktemp -d /var/tmp/logtally-ct.XXXXXX)"
chmod 0755 "$work"
results=()
skipped=()
failed=0

step() { printf '\n== %s (%ss)\n' "$*" "$(($(date +%s) - started))"; }
say() { printf '   %s\n' "$*"; }
ok() { results+=("PASS  $*"); say "PASS: $*"; }
bad() { results+=("FAIL  $*"); say "FAIL: $*"; failed=1; }
skip() { skipped+=("$*"); say "SKIP: $*"; }

summary() {
  printf '\n== containers-test summary (%ss, quiet gaps %ss)\n' "$(($(date +%s) - started))" "$gap"
  local r
  for r in "${results[@]}"; do printf '   %s\n' "$r"; done
  for r in "${skipped[@]}"; do printf '   SKIP  %s\n' "$r"; done
}

cleanup() {
  local rc=$?
  if [[ $keep == 0 ]]; then
    podman pod rm -f -t 0 "$pod" >/dev/null 2>&1 || true
    podman rm -f -t 0 "$ctr" >/dev/null 2>&1 || true
    podman volume rm -f "${pod_volumes[@]}" >/dev/null 2>&1 || true
    stop_pg
    rm -rf "$work"
  else
    echo "kept: container $ctr, pod $pod, work folder $work (PostgreSQL still running on port ${pgport:-?})"
  fi
  exit "$rc"
}

pgbin=/usr/lib/postgresql/15/bin
pgport=""
stop_pg() {
  [[ -n $pgport && -d $work/pg ]] || return 0
  runuser -u postgres -- "$pgbin/pg_ctl" -D "$work/pg" -m fast -w stop >/dev/null 2>&1 || true
}
trap cleanup EXIT

[[ $(id -u) == 0 ]] || { echo "containers-test: run as root (podman, apt-get, debootstrap)" >&2; exit 1; }

# --- machine set-up -------------------------------------------------------------------------
step "packages: podman runc catatonit debootstrap postgresql-15 curl"
missing=()
for p in podman runc catatonit debootstrap postgresql-15 curl; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [[ ${#missing[@]} -gt 0 ]]; then
  say "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  # With podman's recommends, as CONTAINERS.md measured it.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

conf=/etc/containers/containers.conf
wanted_conf='# Written by logtally scripts/containers-test.sh (see CONTAINERS.md): runc, because crun
# refuses cgroups in hybrid mode; ulimits at or below the host'"'"'s, which the defaults are not.
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1000:1000"]
[engine]
runtime = "runc"'
if [[ "$(cat "$conf" 2>/dev/null)" != "$wanted_conf" ]]; then
  [[ -f $conf && ! -f $conf.orig ]] && cp "$conf" "$conf.orig"
  mkdir -p /etc/containers
  printf '%s\n' "$wanted_conf" >"$conf"
  say "wrote $conf"
fi

step "base image $base_image"
if podman image exists "$base_image"; then
  say "cached ($(podman image inspect -f '{{.Created}}' "$base_image" | cut -d. -f1))"
else
  rootfs="$work/rootfs"
  say "debootstrap --variant=minbase bookworm (about a minute)"
  debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian >"$work/debootstrap.log" 2>&1 \
    || { tail -n 20 "$work/debootstrap.log"; exit 1; }
  # As the registry's image has them: updates and security, no package lists or caches.
  rm -f "$rootfs/etc/apt/sources.list"
  cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin
  tar -C "$rootfs" -c . | podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' --change "LABEL $base_label" - "$base_image" >/dev/null
  rm -rf "$rootfs"
  say "imported"
fi

step "Debian packages (scripts/package.sh)"
if [[ $build == 1 ]]; then
  scripts/package.sh
else
  scripts/package.sh --no-build
fi
v1="$(dpkg-deb -f target/debian/logtally_*.deb Version)"
v2="${v1%-*}-$(( ${v1##*-} + 1 ))"
mkdir -p "$work/v1" "$work/v2"
cp target/debian/*.deb "$work/v1/"
LOGTALLY_DEB_VERSION="$v2" LOGTALLY_DEB_OUT="$work/v2" scripts/package.sh --no-build >/dev/null
say "version $v1, and $v2 for the upgrade"

# --- PostgreSQL on the host ------------------------------------------------------------------
free_port() {
  local p
  while :; do
    p=$((20000 + RANDOM % 20000))
    ss -Htln "sport = :$p" | grep -q . || { echo "$p"; return; }
  done
}

step "PostgreSQL 15 on the host (initdb as postgres, 127.0.0.1, trust)"
mkdir "$work/pg" && chown postgres: "$work/pg"
runuser -u postgres -- "$pgbin/initdb" -D "$work/pg" -U postgres --auth=trust --no-sync >/dev/null
for _ in 1 2 3 4 5; do
  pgport="$(free_port)"
  runuser -u postgres -- "$pgbin/pg_ctl" -D "$work/pg" -l "$work/pg/server.log" -w -t 60 \
    -o "-p $pgport -k $work/pg -c listen_addresses=127.0.0.1" start >/dev/null && break
  pgport=""
done
[[ -n $pgport ]] || { tail -n 20 "$work/pg/server.log"; exit 1; }
say "port $pgport"
psql_() { psql -X -q -At -h 127.0.0.1 -p "$pgport" -U postgres "$@"; }

# db_sum <database> <table> <column>: what PostgreSQL holds (0 before the first flush).
db_sum() { psql_ -d "$1" -c "select coalesce(sum($3), 0) from $2" 2>/dev/null || echo 0; }

# wait_sum <database> <table> <column> <expected> <seconds>: until PostgreSQL holds the
# expected sum (the sidecar's flushes are the event awaited) or the time is up; prints it.
wait_sum() {
  local got deadline=$((SECONDS + $5))
  while :; do
    got="$(db_sum "$1" "$2" "$3")"
    if [[ $got -ge $4 || $SECONDS -ge $deadline ]]; then
      # One more flush interval: a count above the expected one must show too.
      [[ $got -gt $4 ]] || { [[ $got == "$4" ]] && sleep 6 && got="$(db_sum "$1" "$2" "$3")"; }
      echo "$got"
      return
    fi
    sleep 0.5
  done
}

# expect <what> <sent per nginx's access log> <stored>
expect() {
  if [[ $2 == "$3" ]]; then
    ok "$1: nginx logged $2, PostgreSQL holds $3"
  elif [[ $3 -lt $2 ]]; then
    bad "$1: nginx logged $2, PostgreSQL holds $3 — LOST $(($2 - $3))"
  else
    bad "$1: nginx logged $2, PostgreSQL holds $3 — COUNTED TWICE $(($3 - $2))"
  fi
}

# send <url> <n>: n GET requests (?i=1..n appended), one connection; prints responses.
send() { curl -s -o /dev/null -w '%{http_code}\n' "$1&i=[1-$2]" | grep -c -v '^000$' || true; }

# --- deb: a fresh Debian container -----------------------------------------------------------
in_ctr() { podman exec "$ctr" bash -c "$1"; }
sidecar_start() {
  # As logtally.service runs it: User=logtally (with its groups: www-data), no new
  # privileges, the packaged binary and config. setpriv execs (no session process
  # between, unlike runuser), so the pid file names the sidecar itself.
  in_ctr 'echo "== start $(date +%T)" >>/var/log/logtally.log'
  podman exec -d "$ctr" sh -c 'echo $$ >/run/logtally.pid; exec setpriv --reuid=logtally --regid=logtally --init-groups --no-new-privs -- /usr/bin/logtally run -c /etc/logtally/logtally.toml >>/var/log/logtally.log 2>&1' >/dev/null
  local _
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$deb_admin/healthz" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  in_ctr 'tail -n 20 /var/log/logtally.log'
  return 1
}
sidecar_stop() { # SIGTERM (what systemd sends) and wait for the exit: the final flush
  in_ctr 'p=$(cat /run/logtally.pid); kill -TERM "$p"; for i in $(seq 300); do [ -d /proc/$p ] || exit 0; sleep 0.1; done; echo "sidecar still running 30 s after SIGTERM" >&2; exit 1'
}
logged() { in_ctr "grep -c '\"GET /e?' /var/log/nginx/access.log || true"; }

test_deb() {
  step "deb: fresh container from $base_image, host network"
  podman rm -f -t 0 "$ctr" >/dev/null 2>&1 || true
  # --init: an init (catatonit) reaps what exits, as on a machine; without it a stopped
  # nginx master stays a zombie and `service nginx stop` waits for it in vain.
  podman run -d --init --name "$ctr" --network host -v "$work:/work:ro" "$base_image" sleep infinity >/dev/null
  # No services start while the packages install (as in an image build): the test
  # starts nginx itself, on its own port.
  in_ctr 'printf "#!/bin/sh\nexit 101\n" >/usr/sbin/policy-rc.d && chmod 0755 /usr/sbin/policy-rc.d'
  # systemd's tools, as on a real Debian machine: deb-systemd-helper then enables the
  # unit on install, and systemd-analyze can verify it.
  in_ctr 'export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get install -y -qq --no-install-recommends systemd >/dev/null'
  local t0=$SECONDS
  in_ctr 'cd /work/v1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q ./*.deb' >"$work/install.log" 2>&1 \
    || { tail -n 30 "$work/install.log"; bad "deb: apt-get install ./*.deb failed"; return 1; }
  # From now on service actions are allowed, as on a machine with an init system: the
  # nginx-reload trigger of an upgrade or a remove reloads the running nginx.
  in_ctr 'printf "#!/bin/sh\nexit 0\n" >/usr/sbin/policy-rc.d'
  if grep -q '^Setting up nginx ' "$work/install.log"; then
    ok "deb: apt-get install ./*.deb pulled in nginx ($(in_ctr "dpkg-query -W -f='\${Version}' nginx"), $((SECONDS - t0)) s)"
  else
    bad "deb: apt-get install did not install nginx"
  fi

  # The layout Debian's libnginx-mod-* packages have, and the sidecar's user and folders.
  local layout
  layout="$(podman exec -i "$ctr" bash -s <<'EOF'
check() { if eval "$2"; then echo "ok   $1"; else echo "FAIL $1"; fi; }
mode() { stat -c %U:%G:%a "$1"; }
check "module in /usr/lib/nginx/modules" "[ -f /usr/lib/nginx/modules/ngx_http_logtally_module.so ]"
check "modules-enabled/50-mod-http-logtally.conf -> modules-available" \
  '[ "$(readlink /etc/nginx/modules-enabled/50-mod-http-logtally.conf)" = /usr/share/nginx/modules-available/mod-http-logtally.conf ]'
check "conf.d/logtally.conf -> the http-level defaults" \
  '[ "$(readlink /etc/nginx/conf.d/logtally.conf)" = /usr/share/nginx/logtally/logtally.conf ]'
check "Depends: the installed nginx's ABI" \
  'dpkg-query -W -f="\${Depends}" libnginx-mod-http-logtally | grep -q "$(dpkg-query -W -f="\${Provides}" nginx | grep -o "nginx-abi-[^,]*")"'
check "user logtally, in group www-data" "id -nG logtally | grep -qw www-data"
check "/var/lib/logtally logtally:logtally 0750" '[ "$(mode /var/lib/logtally)" = logtally:logtally:750 ]'
check "/var/spool/logtally www-data:www-data 0770" '[ "$(mode /var/spool/logtally)" = www-data:www-data:770 ]'
check "/etc/logtally/logtally.toml a conffile" 'dpkg-query -W -f="\${Conffiles}" logtally | grep -q /etc/logtally/logtally.toml'
check "/etc/logtally/logtally.toml root:logtally 0640" '[ "$(mode /etc/logtally/logtally.toml)" = root:logtally:640 ]'
check "logtally.service enabled on install" "[ -L /etc/systemd/system/multi-user.target.wants/logtally.service ]"
EOF
)"
  printf '%s\n' "$layout" | sed 's/^/   /'
  if grep -q '^FAIL' <<<"$layout"; then bad "deb: package layout (above)"; else ok "deb: package layout, user, folders, modes"; fi

  if in_ctr 'systemd-analyze verify /lib/systemd/system/logtally.service' >"$work/verify.log" 2>&1; then
    ok "deb: systemd-analyze verify logtally.service ($(in_ctr 'systemd-analyze security --offline=yes /lib/systemd/system/logtally.service 2>/dev/null | tail -n 1 | sed "s/.*: //"'))"
  else
    cat "$work/verify.log"; bad "deb: systemd-analyze verify logtally.service"
  fi

  # One site using logtally, next to the stock nginx.conf. The container shares the
  # host's network, so the stock default site (port 80) is switched off: ports here
  # are chosen free.
  deb_port="$(free_port)"
  deb_admin="$(free_port)"
  in_ctr "rm /etc/nginx/sites-enabled/default
cat >/etc/nginx/sites-available/logtally-test <<EOF
server {
    listen 127.0.0.1:$deb_port;
    logtally on;
    location = /e { return 204; }
    location = /off { logtally off; return 204; }
    location = /logtally_status { logtally off; logtally_status; }
}
EOF
ln -s ../sites-available/logtally-test /etc/nginx/sites-enabled/logtally-test"
  if in_ctr 'nginx -t' >"$work/nginx-t.log" 2>&1; then ok "deb: stock nginx.conf + one site with logtally on: nginx -t"
  else cat "$work/nginx-t.log"; bad "deb: nginx -t"; return 1; fi
  in_ctr 'service nginx start' >/dev/null || { bad "deb: service nginx start"; return 1; }

  # The one line of the sidecar's config to change: where PostgreSQL is. (And the listen
  # port, because this container shares the host's network.) The database as the
  # conffile's comment says, over TCP here.
  psql_ -d postgres -c "create role logtally login" -c "create database logtally owner logtally"
  in_ctr "sed -i -e 's|^database_url = .*|database_url = \"postgres://logtally@127.0.0.1:$pgport/logtally\"|' -e 's|^listen = .*|listen = \"127.0.0.1:$deb_admin\"|' /etc/logtally/logtally.toml"
  if in_ctr 'setpriv --reuid=logtally --regid=logtally --init-groups -- logtally check -c /etc/logtally/logtally.toml' >"$work/check.log" 2>&1; then
    ok "deb: logtally check as user logtally"
  else
    cat "$work/check.log"; bad "deb: logtally check"
  fi
  sidecar_start || { bad "deb: the sidecar did not start"; return 1; }

  local served off
  served="$(send "http://127.0.0.1:$deb_port/e?x=1" 3000)"
  off="$(send "http://127.0.0.1:$deb_port/off?x=1" 200)"
  say "sent 3000 to /e (served $served) and 200 to /off (logtally off; served $off)"
  expect "deb: the sidecar as user logtally, packaged paths" "$(logged)" \
    "$(wait_sum logtally nginx_requests_1m requests "$(logged)" 60)"
  local segs
  segs="$(in_ctr 'ls /var/spool/logtally | grep -c "\.seg$" || true')"
  say "spool: $segs segment(s) open; sidecar log: $(in_ctr 'grep -ci "error\|warn" /var/log/logtally.log || true') warning/error line(s)"
}

# --- upgrade: both packages in place, nginx running, traffic flowing --------------------------
test_upgrade() {
  step "upgrade: $v1 -> $v2 with nginx serving and traffic flowing"
  local stopfile="$work/stop-traffic" codes="$work/upgrade-codes"
  rm -f "$stopfile"
  (
    while [[ ! -e $stopfile ]]; do
      curl -s -o /dev/null -w '%{http_code}\n' "http://127.0.0.1:$deb_port/e?phase=upgrade&i=[1-200]" || true
    done >"$codes"
  ) &
  local traffic=$! t0=$SECONDS
  sleep 1
  if ! in_ctr 'cd /work/v2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q ./*.deb' >"$work/upgrade.log" 2>&1; then
    touch "$stopfile"; wait "$traffic" || true
    tail -n 30 "$work/upgrade.log"; bad "upgrade: apt-get install failed"; return 1
  fi
  grep -q 'Triggering nginx reload' "$work/upgrade.log" \
    && say "the nginx-reload trigger reloaded the running nginx" \
    || say "note: the nginx-reload trigger did not reload nginx (see $work/upgrade.log)"
  # What the postinst's `deb-systemd-invoke restart logtally.service` does under systemd.
  sidecar_stop && sidecar_start || { touch "$stopfile"; wait "$traffic" || true; bad "upgrade: sidecar restart"; return 1; }
  # A reload keeps the module nginx had loaded (dlopen of the same path); the binary
  # upgrade of Debian's init script (USR2, then QUIT to the old master) loads the new one.
  if in_ctr 'service nginx upgrade' >"$work/nginx-upgrade.log" 2>&1; then
    say "service nginx upgrade: new master with the new module"
  else
    cat "$work/nginx-upgrade.log"; bad "upgrade: service nginx upgrade"
  fi
  sleep 2
  touch "$stopfile"
  wait "$traffic" || true
  local versions
  versions="$(in_ctr "dpkg-query -W -f='\${Package} \${Version}\n' libnginx-mod-http-logtally logtally" | tr '\n' ' ')"
  say "installed now: $versions; traffic: $(grep -c -v '^000$' "$codes" || true) served, $(grep -c '^000$' "$codes" || true) failed, over $((SECONDS - t0)) s"
  [[ $versions == *"$v2"*"$v2"* ]] || bad "upgrade: versions after upgrade are $versions"
  expect "upgrade: in place, under traffic" "$(logged)" \
    "$(wait_sum logtally nginx_requests_1m requests "$(logged)" 60)"
}

# --- remove: the module package goes, stock nginx stays -----------------------------------
test_remove() {
  step "remove: apt-get remove libnginx-mod-http-logtally"
  sidecar_stop || true
  # The operator's own site uses the module: it goes first (any module's directives would
  # make nginx -t fail once the module is gone); the stock default site comes back.
  in_ctr 'rm /etc/nginx/sites-enabled/logtally-test'
  if ! in_ctr 'DEBIAN_FRONTEND=noninteractive apt-get remove -y -q libnginx-mod-http-logtally' >"$work/remove.log" 2>&1; then
    tail -n 20 "$work/remove.log"; bad "remove: apt-get remove failed"; return 1
  fi
  local state
  state="$(in_ctr '
    [ -e /usr/lib/nginx/modules/ngx_http_logtally_module.so ] && echo "module file still there"
    [ -e /etc/nginx/modules-enabled/50-mod-http-logtally.conf ] && echo "modules-enabled link still active"
    [ -e /etc/nginx/conf.d/logtally.conf ] && echo "conf.d link still active"
    [ -L /etc/nginx/modules-enabled/50-mod-http-logtally.conf.removed ] || echo "no modules-enabled/*.removed link (kept for a reinstall)"
    true')"
  [[ -z $state ]] && ok "remove: module file gone, links renamed *.removed" || bad "remove: $state"
  local port
  port="$(free_port)"
  # Stock nginx, with a plain site on a free port (host network: port 80 may be taken).
  in_ctr "printf 'server { listen 127.0.0.1:$port; location / { return 200 \"stock\\\\n\"; } }\n' >/etc/nginx/sites-enabled/plain"
  if in_ctr 'nginx -t && service nginx stop && service nginx start' >"$work/stock.log" 2>&1 \
     && [[ "$(curl -s "http://127.0.0.1:$port/")" == stock ]]; then
    ok "remove: stock nginx passes nginx -t, starts and serves"
  else
    cat "$work/stock.log"; bad "remove: stock nginx did not start after the module's removal"
  fi
  in_ctr 'DEBIAN_FRONTEND=noninteractive apt-get purge -y -q libnginx-mod-http-logtally >/dev/null 2>&1; ls /etc/nginx/modules-enabled/ /etc/nginx/conf.d/' >"$work/purge.log" 2>&1
  grep -q logtally "$work/purge.log" && bad "remove: purge left links: $(tr '\n' ' ' <"$work/purge.log")" || ok "remove: purge deletes the links"
}

# --- pod: the Kubernetes manifest under podman kube play --------------------------------------
pod_logged() { podman logs "$pod-nginx" 2>/dev/null | grep -c '"GET /e?' || true; }
pod_sum() { db_sum pod ad_events_1m events; }

test_pod() {
  step "pod: images from the packages (docker/*.Dockerfile --target host)"
  local t0=$SECONDS name old
  for name in nginx sidecar; do
    old="$(podman image inspect -f '{{.Id}}' "localhost/logtally-$name:ct" 2>/dev/null || true)"
    podman build -q -f "docker/$name.Dockerfile" --target host -t "localhost/logtally-$name:ct" . >"$work/build-$name.log" 2>&1 \
      || { tail -n 20 "$work/build-$name.log"; bad "pod: $name image build"; return 1; }
    # The previous run's image, if this build replaced it (not other images).
    if [[ -n $old && $old != "$(podman image inspect -f '{{.Id}}' "localhost/logtally-$name:ct")" ]]; then
      podman rmi "$old" >/dev/null 2>&1 || true
    fi
  done
  ok "pod: images built ($((SECONDS - t0)) s)"

  step "pod: podman kube play deploy/kubernetes/logtally.yaml (host network)"
  local nport admin
  nport="$(free_port)"
  admin="$(free_port)"
  psql_ -d postgres -c "create database pod"
  # The manifest as shipped, with what this machine needs: local images, the host's
  # network (to reach the PostgreSQL started above; podman then refuses `ports:`), free
  # ports, that database.
  sed -e "s|image: logtally-nginx:.*|image: localhost/logtally-nginx:ct|" \
      -e "s|image: logtally-sidecar:.*|image: localhost/logtally-sidecar:ct|" \
      -e "s|^  shareProcessNamespace: false|&\n  hostNetwork: true|" \
      -e "s|listen 80 default_server;|listen 127.0.0.1:$nport default_server;|" \
      -e "/^      ports:$/,+1d" \
      -e "s|port: http }|port: $nport }|" \
      -e "s|port: metrics }|port: $admin }|" \
      -e "s|^    database_url .*|    database_url   = \"postgres://postgres@127.0.0.1:$pgport/pod\"|" \
      -e "s|^    listen         = .*|    listen         = \"127.0.0.1:$admin\"|" \
      deploy/kubernetes/logtally.yaml >"$work/pod.yaml"
  podman pod rm -f -t 0 "$pod" >/dev/null 2>&1 || true
  podman volume rm -f "${pod_volumes[@]}" >/dev/null 2>&1 || true   # else the old ConfigMaps stay
  podman kube play "$work/pod.yaml" >"$work/podman.log" 2>&1 || { cat "$work/podman.log"; bad "pod: kube play"; return 1; }
  local _ up=0
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$admin/healthz" >/dev/null 2>&1 && curl -s -o /dev/null "http://127.0.0.1:$nport/nginx-health" && { up=1; break; }
    sleep 0.2
  done
  [[ $up == 1 ]] || { podman logs "$pod-sidecar" 2>&1 | tail -n 20; bad "pod: nginx or the sidecar did not come up"; return 1; }
  # Seen from the sidecar's container: no nginx process (its own pid namespace).
  local seen
  seen="$(podman exec "$pod-sidecar" sh -c 'cat /proc/[0-9]*/comm 2>/dev/null | grep -c "^nginx" || true')"
  say "nginx processes the sidecar's container sees: $seen; spool $(podman exec "$pod-nginx" stat -c '%U:%G %a' /var/spool/logtally); sidecar's groups: $(podman exec "$pod-sidecar" id -G)"
  [[ $seen == 0 ]] || bad "pod: the sidecar sees nginx's processes (shared pid namespace)"

  # podman without systemd cannot run the probes' healthchecks and says so on every
  # start and stop: those messages go to $work/podman.log.
  local url="http://127.0.0.1:$nport/e?ad=7&ev=view&cmp=pod" burst=1000
  # Each quiet gap follows writes, so the segments written just before it are idle
  # through it; the kill and the reload come before a burst, so new processes (a new
  # sidecar, new workers with new pids) see a gap too.
  say "burst 1 ($burst), quiet ${gap}s"
  send "$url&b=1" "$burst" >/dev/null
  sleep "$gap"
  say "sidecar killed (SIGKILL) and started again; burst 2, quiet ${gap}s"
  podman kill -s KILL "$pod-sidecar" >>"$work/podman.log" 2>&1
  timeout 10 podman wait "$pod-sidecar" >>"$work/podman.log" 2>&1 || true
  podman start "$pod-sidecar" >>"$work/podman.log" 2>&1
  send "$url&b=2" "$burst" >/dev/null
  sleep "$gap"
  say "nginx reloaded; burst 3, quiet ${gap}s"
  podman exec "$pod-nginx" nginx -s reload >>"$work/podman.log" 2>&1
  sleep 1   # the old workers finish their requests, new ones take the connections
  send "$url&b=3" "$burst" >/dev/null
  sleep "$gap"
  say "burst 4"
  send "$url&b=4" "$burst" >/dev/null
  local logged_before stored_before
  logged_before="$(pod_logged)"
  stored_before="$(wait_sum pod ad_events_1m events "$logged_before" 60)"
  expect "pod: quiet gaps of ${gap}s, one sidecar kill -9, one nginx reload" "$logged_before" "$stored_before"
  # No nginx worker died here (a reload's old workers seal their segments), so a segment
  # the sidecar abandoned as "writer gone" belonged to a live writer: whether events were
  # lost then depends only on whether that worker wrote again. nginx's /proc says.
  local seg wpid live=0 abandoned=0
  for seg in $(podman logs "$pod-sidecar" 2>&1 | sed -n 's/.*writer gone.* segment=\([^ ]*\).*/\1/p'); do
    abandoned=$((abandoned + 1))
    wpid="$(cut -d- -f2 <<<"$seg")"
    if [[ "$(podman exec "$pod-nginx" cat "/proc/$wpid/comm" 2>/dev/null)" == nginx ]]; then
      live=$((live + 1))
      say "segment $seg abandoned while its writer, nginx pid $wpid, is alive"
    fi
  done
  if [[ $live -gt 0 ]]; then
    bad "pod: the sidecar abandoned $live segment(s) of live nginx workers (pid liveness across pid namespaces)"
  else
    ok "pod: no live writer's segment abandoned ($abandoned abandoned in all)"
  fi

  say "burst 5, then podman pod stop -t 30 at once"
  send "$url&b=5" "$burst" >/dev/null
  t0=$SECONDS
  podman pod stop -t 30 "$pod" >>"$work/podman.log" 2>&1
  say "pod stopped in $((SECONDS - t0)) s; exit codes: nginx $(podman inspect -f '{{.State.ExitCode}}' "$pod-nginx"), sidecar $(podman inspect -f '{{.State.ExitCode}}' "$pod-sidecar")"
  local logged_after stored_after
  logged_after="$(pod_logged)"
  stored_after="$(pod_sum)"
  expect "pod: graceful stop commits the burst sent just before it" \
    "$((logged_after - logged_before))" "$((stored_after - stored_before))"
  expect "pod: everything, end to end" "$logged_after" "$stored_after"
  podman logs "$pod-sidecar" >"$work/pod-sidecar.log" 2>&1 || true
  podman kube down "$work/pod.yaml" >>"$work/podman.log" 2>&1 || true
}

if want deb; then
  if test_deb; then
    want upgrade && test_upgrade
    want remove && test_remove
  else
    want upgrade && skip "upgrade: the deb part failed"
    want remove && skip "remove: the deb part failed"
  fi
  [[ $keep == 1 ]] || podman rm -f -t 0 "$ctr" >/dev/null 2>&1 || true
else
  skip "deb, upgrade, remove: not asked for"
fi
if want pod; then
  test_pod || true
else
  skip "pod: not asked for"
fi

summary
if [[ $failed == 1 ]]; then
  echo "containers-test: FAILED (see above)" >&2
  exit 1
fi
echo "containers-test: all passed"
