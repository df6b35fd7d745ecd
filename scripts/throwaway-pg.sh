# Sourced by scripts/test and scripts/bench. When DATABASE_URL is unset,
# `throwaway_pg [postgres -c options…]` starts a PostgreSQL 15 on a free
# local port (as the `postgres` user when run as root; installed with
# apt-get when missing and possible), exports DATABASE_URL, and removes the
# server when the shell exits.

pg_dir=""
pg_bin=""
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
throwaway_pg_cleanup() {
  if [ -n "$pg_dir" ]; then
    as_pg "$pg_bin/pg_ctl" -D "$pg_dir/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$pg_dir"
  fi
}
find_pg_bin() {
  # `|| true`: with no PostgreSQL installed, pipefail must not end the caller.
  { ls -d /usr/lib/postgresql/*/bin 2>/dev/null || true; } | sort -V | tail -n 1
}
throwaway_pg() {
  [ -z "${DATABASE_URL:-}" ] || return 0
  trap throwaway_pg_cleanup EXIT
  pg_bin="$(find_pg_bin)"
  if [ -z "$pg_bin" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      printf '==> %s\n' "installing PostgreSQL 15 with apt-get" >&2
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql-15 >/dev/null \
        || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql-15 >/dev/null; }
      pg_bin="$(find_pg_bin)"
    fi
    [ -n "$pg_bin" ] || { echo "PostgreSQL is not installed and cannot be installed here; set DATABASE_URL" >&2; exit 1; }
  fi
  pg_dir="$(mktemp -d /tmp/tollgate-pg.XXXXXX)"
  if [ "$(id -u)" = 0 ]; then chown postgres "$pg_dir"; fi
  local port
  port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
  printf '==> %s\n' "starting a throwaway PostgreSQL ($pg_bin) on port $port" >&2
  as_pg "$pg_bin/initdb" -D "$pg_dir/data" -U postgres --auth=trust -E UTF8 >/dev/null
  as_pg "$pg_bin/pg_ctl" -D "$pg_dir/data" -l "$pg_dir/server.log" -w -o \
    "-p $port -k $pg_dir -c listen_addresses=127.0.0.1 -c max_connections=400 $*" \
    start >/dev/null
  export DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
}
