#!/usr/bin/env bash
# Make ./.venv ready: a virtualenv cached outside the clone, keyed on the dependency list (and the Python),
# reused across clones.
# The first run installs torch/torchvision/timm/... (a few minutes); later runs only re-point the editable install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
deps=$("$PY" - <<'PYEOF'
import re
try:
    import tomllib
    with open("pyproject.toml", "rb") as fh:
        project = tomllib.load(fh)["project"]
    deps = project["dependencies"] + project["optional-dependencies"]["dev"]
except ImportError:  # Python 3.10: no tomllib; the two arrays are plain lists of quoted strings
    text = open("pyproject.toml").read()
    arrays = [re.search(rf"^{key} = \[(.*?)\]", text, re.M | re.S).group(1) for key in ("dependencies", "dev")]
    deps = [d for array in arrays for d in re.findall(r'"([^"]+)"', array)]
print("\n".join(deps))
PYEOF
)
key=$({ echo "$deps"; cat .ci/constraints.txt; "$PY" -c 'import sys; print(sys.version)'; } | sha256sum | cut -c1-16)
cache="${CMW_TRANSFER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cmw-transfer}"
venv="$cache/venv-$key"
if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.complete" ]; then
  echo "bootstrap: creating $venv" >&2
  rm -rf "$venv"
  mkdir -p "$cache"
  "$PY" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip setuptools wheel
  echo "$deps" | "$venv/bin/python" -m pip install -q -c .ci/constraints.txt -r /dev/stdin
  touch "$venv/.complete"
fi
out=$("$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e . 2>&1) || { echo "$out" >&2; exit 1; }
ln -sfn "$venv" .venv
echo "bootstrap: .venv -> $venv" >&2

# The real-data tests (pytest -m real_data) read Fashion-MNIST's original files: install Debian's package where this
# user can (root, apt-get); anywhere else they skip, naming the command.
if .venv/bin/python -c 'from cmw_transfer.dataset.formats.mnist import find_files; find_files("fashion-mnist", None, "train")' \
    >/dev/null 2>&1; then
  echo "bootstrap: Fashion-MNIST files found (real-data tests will run)" >&2
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "bootstrap: installing dataset-fashion-mnist with apt-get for the real-data tests" >&2
  if { apt-get install -y -q dataset-fashion-mnist || { apt-get update -q && apt-get install -y -q dataset-fashion-mnist; }; } \
      >/dev/null 2>&1; then
    echo "bootstrap: Fashion-MNIST installed in /usr/share/datasets/fashion-mnist" >&2
  else
    echo "bootstrap: could not install dataset-fashion-mnist; the real-data tests will skip" >&2
  fi
else
  echo "bootstrap: Fashion-MNIST not installed (as root: apt-get install -y dataset-fashion-mnist); the real-data" \
       "tests will skip" >&2
fi
