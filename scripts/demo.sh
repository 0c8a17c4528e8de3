#!/usr/bin/env bash
# logtally demo: from a fresh Debian 12 machine to aggregated rows in PostgreSQL.
#
#   scripts/demo.sh          install what is missing, build, start nginx + module, PostgreSQL,
#                            the sidecar, send a realistic ad-event load, print the results
#   scripts/demo.sh stop     stop everything the demo started
#
# Environment: DATABASE_URL (use your PostgreSQL instead of a throwaway one), DEMO_SECONDS
# (load duration, default 20), NGINX_PORT (8088), PG_PORT (55432), ADMIN (127.0.0.1:9187).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
demo="$root/.build/demo"
NGINX_PORT="${NGINX_PORT:-8088}"
PG_PORT="${PG_PORT:-55432}"
ADMIN="${ADMIN:-127.0.0.1:9187}"
DEMO_SECONDS="${DEMO_SECONDS:-20}"
pgbin=/usr/lib/postgresql/15/bin

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

stop_all() {
  # SIGTERM, then wait for the final flush and the exit (the next start needs the port).
  if [ -f "$demo/logtally.pid" ] && kill "$(cat "$demo/logtally.pid")" 2>/dev/null; then
    for _ in $(seq 200); do kill -0 "$(cat "$demo/logtally.pid")" 2>/dev/null || break; sleep 0.2; done
  fi
  [ -f "$demo/nginx/logs/nginx.pid" ] && /usr/sbin/nginx -p "$demo/nginx" -c conf/nginx.conf -s quit 2>/dev/null || true
  [ -d "$demo/pg" ] && runuser -u postgres -- "$pgbin/pg_ctl" -D "$demo/pg" -m fast -w stop >/dev/null 2>&1 || true
  rm -f "$demo/logtally.pid"
}

if [ "${1:-}" = "stop" ]; then
  stop_all
  say "stopped (data kept in $demo; rm -rf it to start clean)"
  exit 0
fi

# 1. Packages.
need=(nginx nginx-dev libclang-dev pkg-config dpkg-dev postgresql-15 postgresql-15-hll wrk curl)
missing=()
for p in "${need[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    say "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "missing Debian packages: ${missing[*]}; run: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
fi
command -v cargo >/dev/null || { echo "cargo not found: install Rust with rustup (https://rustup.rs)" >&2; exit 1; }

# 2. Build.
say "building the nginx module (for Debian's nginx $(/usr/sbin/nginx -v 2>&1 | sed 's,.*/,,')) and the sidecar"
eval "$("$root/scripts/nginx-build.sh" prepare)"
"$root/scripts/nginx-build.sh" module >/dev/null
cargo build --release -q -p logtally
bin="$root/target/release/logtally"
module="$root/target/release/libngx_http_logtally_module.so"

stop_all
mkdir -p "$demo/nginx/conf" "$demo/nginx/logs" "$demo/nginx/html" "$demo/spool" "$demo/lib"
# The API endpoints' bodies (nginx sends them at a limited rate: real request times).
head -c 262144 /dev/zero > "$demo/nginx/html/search.bin"
head -c 131072 /dev/zero > "$demo/nginx/html/report.bin"

# 3. PostgreSQL.
if [ -z "${DATABASE_URL:-}" ]; then
  if [ ! -f "$demo/pg/PG_VERSION" ]; then
    say "creating a throwaway PostgreSQL in $demo/pg"
    mkdir -p "$demo/pg" && chown postgres "$demo/pg"
    runuser -u postgres -- "$pgbin/initdb" -D "$demo/pg" -A trust -U postgres >/dev/null
  fi
  runuser -u postgres -- "$pgbin/pg_ctl" -D "$demo/pg" -w -l "$demo/pg/log" \
    -o "-p $PG_PORT -k $demo/pg -c listen_addresses=127.0.0.1" start >/dev/null
  DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/postgres"
fi
psql_() { psql "$DATABASE_URL" -X -q "$@"; }
# distinct(uid) columns are of type hll (the postgresql-hll extension).
psql_ -c "CREATE EXTENSION IF NOT EXISTS hll"

# 4. nginx with the module.
sed -e "s|@MODULE@|$module|" -e "s|@SPOOL@|$demo/spool|" -e "s|@PORT@|$NGINX_PORT|" \
  -e "s|@HTML@|$demo/nginx/html|" \
  "$root/nginx-conf/demo.conf" > "$demo/nginx/conf/nginx.conf"
/usr/sbin/nginx -p "$demo/nginx" -c conf/nginx.conf -t -q
/usr/sbin/nginx -p "$demo/nginx" -c conf/nginx.conf
say "nginx answering on http://127.0.0.1:$NGINX_PORT/e?ad=7&ev=view&cmp=x (spool: $demo/spool)"

# 5. The sidecar.
cat > "$demo/logtally.toml" <<TOML
spool_dir      = "$demo/spool"
database_url   = "$DATABASE_URL"
node           = "demo"
flush_interval = "2s"
listen         = "$ADMIN"
binlog         = "$demo/lib/binlog"

[[rule]]
table    = "ad_events_1m"
bucket   = "1m"
group_by = ["ad", "ev", "cmp"]
where    = "endpoint = '/e'"
metrics  = { events = "count", bytes = "sum(bytes)", rt_max = "max(rt)" }

# Reach (distinct users) and click-through per ad and campaign, per UTC day.
[[rule]]
table    = "ad_daily"
bucket   = "1d"
group_by = ["ad", "cmp"]
where    = "endpoint = '/e' and status < 400"
metrics  = { views = "count where ev = 'view'", clicks = "count where ev = 'click'", reach = "distinct(uid)" }

# Request-time percentiles per endpoint.
[[rule]]
table    = "endpoint_rt_1m"
bucket   = "1m"
group_by = ["endpoint"]
metrics  = { requests = "count", rt = "quantiles(rt)" }

[[rule]]
table    = "ua_status_1h"
bucket   = "1h"
group_by = ["ua", "status"]
metrics  = { events = "count" }
TOML
"$bin" check -c "$demo/logtally.toml"
"$bin" run -c "$demo/logtally.toml" >"$demo/logtally.log" 2>&1 &
echo $! > "$demo/logtally.pid"
for _ in $(seq 50); do curl -sf "http://$ADMIN/healthz" >/dev/null 2>&1 && break; sleep 0.2; done
say "sidecar running (log: $demo/logtally.log, status page: http://$ADMIN/, metrics: http://$ADMIN/metrics)"

# 6. Load.
written() { curl -s "http://127.0.0.1:$NGINX_PORT/logtally_status" | awk '$1=="logtally_module_events_total"{print $2}'; }
table_events() { psql_ -Atc "select coalesce(sum(requests),0) from endpoint_rt_1m" 2>/dev/null || echo 0; }
before="$(table_events)"   # earlier demo runs' rows stay; count this run's on top of them
say "sending ad events for ${DEMO_SECONDS}s (wrk, 2 threads, 32 connections)"
wrk -t2 -c32 -d"${DEMO_SECONDS}s" -s "$root/nginx-conf/ad-events.lua" "http://127.0.0.1:$NGINX_PORT" >"$demo/wrk.log" 2>&1 &
wrk_pid=$!
while kill -0 "$wrk_pid" 2>/dev/null; do
  printf '\r  events in the spool: %s   ' "$(written)"
  sleep 1
done
echo
grep -E "Requests/sec|requests in" "$demo/wrk.log" || true

# 7. Wait for the sidecar to commit everything nginx wrote.
total="$(written)"
say "waiting for the sidecar to commit all $total events"
for _ in $(seq 120); do
  got=$(( $(table_events) - before ))
  [ "$got" = "$total" ] && break
  sleep 0.5
done
echo "  in PostgreSQL: $got of $total"
[ "$got" = "$total" ] || echo "  (not all committed yet: see $demo/logtally.log)"

say "ad_events_1m, the busiest rows of the latest minutes"
psql_ -c "select bucket, ad, ev, cmp, events, bytes, rt_max from ad_events_1m order by bucket desc, events desc, ad limit 15"
psql_ -c "select count(*) as rows, sum(events) as events from ad_events_1m"
say "reach per ad per day (distinct users: hll), the top 5"
psql_ -c "SELECT bucket::date AS day, ad, hll_cardinality(hll_union_agg(reach))::int8 AS reach,
       sum(views) AS views, sum(clicks) AS clicks
FROM ad_daily GROUP BY 1, 2 ORDER BY 1 DESC, reach DESC LIMIT 5"
say "click-through per campaign"
psql_ -c "SELECT cmp, sum(views) AS views, sum(clicks) AS clicks,
       round(sum(clicks)::numeric / nullif(sum(views), 0), 4) AS ctr
FROM ad_daily WHERE bucket >= now() - interval '7 days'
GROUP BY cmp ORDER BY cmp"
say "request time per endpoint, last hour (seconds)"
psql_ -c "SELECT endpoint, sum(requests) AS requests,
       round(logtally_quantile(logtally_quantiles_merge(rt), 0.5)::numeric, 4) AS p50,
       round(logtally_quantile(logtally_quantiles_merge(rt), 0.95)::numeric, 4) AS p95
FROM endpoint_rt_1m WHERE bucket >= now() - interval '1 hour'
GROUP BY endpoint ORDER BY endpoint"
say "key metrics"
curl -s "http://$ADMIN/metrics" | grep -E '^logtally_(events_read_total|flushes_total|rows_upserted_total|lag_bytes|lag_seconds|pending_keys|module_dropped_events_total)(\{[^}]*\})? ' || true
cat <<MSG

Stop everything:   scripts/demo.sh stop
Query yourself:    psql '$DATABASE_URL' -c 'select * from ad_events_1m limit 10'
Status page:       http://$ADMIN/
Status:            curl http://$ADMIN/status
MSG
