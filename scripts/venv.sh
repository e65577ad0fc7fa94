# Sourced by demo.sh and test.sh: a Python 3.11+ virtual environment in .venv, activated.
# On a fresh Debian/Ubuntu machine it installs what venv needs first.
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
apt_install() {
  if [ -z "${CBM_APT_UPDATED:-}" ]; then $SUDO apt-get update -qq; export CBM_APT_UPDATED=1; fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}
PYTHON=$(command -v python3.11 || command -v python3)
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), "cbm-engine needs Python >= 3.11"'
if [ ! -x .venv/bin/python ]; then
  if ! "$PYTHON" -m venv .venv 2>/dev/null; then
    rm -rf .venv
    apt_install python3-venv "python3.$("$PYTHON" -c 'import sys; print(sys.version_info[1])')-venv" || apt_install python3-venv
    "$PYTHON" -m venv .venv
  fi
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
