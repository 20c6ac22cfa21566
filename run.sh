#!/usr/bin/env bash
# Fetchfleet's two commands:
#   ./run.sh          create .venv, install requirements.txt, start the console on 127.0.0.1
#   ./run.sh install  only create .venv and install requirements.txt (what `deploy` runs)
#   ./run.sh test     install what the tests need (Python and system packages), run pytest
# Extra arguments go to streamlit (run) or pytest (test).
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=.venv

venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
  fi
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  "$VENV/bin/python" -m pip install -q -r "$1"
}

# System packages the suite uses: real Chromium and ChromeDriver (browser fetchers and the
# console test), tor (control port), sshd, ssh and ip (remote workers on namespace hosts),
# nginx (origins, limits), curl (the gateway's client), squid, tinyproxy, dante, microsocks,
# privoxy (real proxy servers) and postgresql-doc-15 (a real site to crawl). Installed
# when running as root and missing; otherwise the tests that need them skip (CI: fail).
system_packages() {
  local missing=()
  command -v chromium >/dev/null || missing+=(chromium)
  command -v chromedriver >/dev/null || missing+=(chromium-driver)
  command -v tor >/dev/null || missing+=(tor)
  [ -x /usr/sbin/sshd ] || missing+=(openssh-server)
  [ -x /usr/sbin/nginx ] || missing+=(nginx)
  command -v curl >/dev/null || missing+=(curl)          # the gateway tests' client
  command -v ssh >/dev/null || missing+=(openssh-client)  # the fleet's ssh
  command -v ip >/dev/null || missing+=(iproute2)         # the fleet tests' namespaces
  # Real proxy servers people run, checked by the proxy checker's suite, and real docs to crawl.
  [ -x /usr/sbin/squid ] || missing+=(squid)
  command -v tinyproxy >/dev/null || missing+=(tinyproxy)
  [ -x /usr/sbin/danted ] || missing+=(dante-server)
  command -v microsocks >/dev/null || missing+=(microsocks)
  [ -x /usr/sbin/privoxy ] || missing+=(privoxy)
  [ -d /usr/share/doc/postgresql-doc-15/html ] || missing+=(postgresql-doc-15)
  if [ ${#missing[@]} -eq 0 ]; then return; fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing system packages: ${missing[*]}" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "missing system packages (tests that need them will skip): ${missing[*]}" >&2
  fi
}

# PostgreSQL for the storage contract and distributed tests (127.0.0.1:5432, user postgres).
postgres() {
  if command -v pg_isready >/dev/null && ! pg_isready -q -h 127.0.0.1 -p 5432; then
    if command -v pg_ctlcluster >/dev/null && [ "$(id -u)" = 0 ]; then
      echo "starting PostgreSQL" >&2
      pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
      for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
    fi
  fi
}

case "${1:-run}" in
  test)
    shift || true
    venv requirements-dev.txt
    # httpbin without its greenlet<3 pin (see requirements-judge.txt)
    "$VENV/bin/python" -m pip install -q --no-deps -r requirements-judge.txt
    system_packages
    postgres
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  bench)
    shift || true
    venv requirements-bench.txt
    system_packages
    exec "$VENV/bin/python" "$@"
    ;;
  install)
    venv requirements.txt
    echo "installed requirements.txt into $VENV"
    ;;
  run|console)
    [ $# -gt 0 ] && shift
    venv requirements.txt
    exec "$VENV/bin/streamlit" run app.py --server.address 127.0.0.1 --server.headless true "$@"
    ;;
  *)
    echo "usage: ./run.sh [run|install|test|bench SCRIPT] [args…]" >&2
    exit 2
    ;;
esac
