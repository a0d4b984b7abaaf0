#!/bin/sh
# Install clobjob from source into a fresh virtual environment, the way the image is built: build wheels for
# clobjob and every dependency first, then install from those wheels only, then check the console script answers.
# The image is for pods talking to a ClickHouse server: the core and the `kubernetes` extra (`clobjob rerun` and
# `clobjob status` in the cluster use the Kubernetes API); no `embedded` (chDB, pandas, pyarrow).
#
#   docker/install.sh SOURCE_DIR VENV_DIR [WHEEL_DIR]
#
# The Dockerfile runs it in its build stage (the venv is then copied into the runtime stage); tests run it too
# (tests/test_image_install.py). PYTHON picks the interpreter (default python3).
set -eu

src=${1:?usage: install.sh SOURCE_DIR VENV_DIR [WHEEL_DIR]}
venv=${2:?usage: install.sh SOURCE_DIR VENV_DIR [WHEEL_DIR]}
wheels=${3:-$venv/.wheels}
python=${PYTHON:-python3}

"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip wheel --quiet --wheel-dir "$wheels" "$src[kubernetes]"
"$venv/bin/python" -m pip install --quiet --no-index --find-links "$wheels" "clobjob[kubernetes]"
rm -rf "$venv/.wheels"

# The embedded engine and its dataframe stack stay out; the Kubernetes client is in.
"$venv/bin/python" - <<'PY'
import importlib.util
extra = [name for name in ("chdb", "pandas", "pyarrow") if importlib.util.find_spec(name)]
if extra:
    raise SystemExit(f"the install pulled in {', '.join(extra)}: the image must not ship them")
if not importlib.util.find_spec("kubernetes"):
    raise SystemExit("the kubernetes client is missing: clobjob rerun and status need it in the cluster")
PY
"$venv/bin/clobjob" --help >/dev/null
"$venv/bin/clobjob" worker --help >/dev/null
echo "clobjob installed in $venv"
