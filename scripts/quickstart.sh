#!/usr/bin/env bash
# The README's two commands:
#   bash scripts/quickstart.sh demo    # build + install layernorm_ext, then `python -m layernorm_ext`
#   bash scripts/quickstart.sh test    # build + install layernorm_ext, then the test suite
# Each creates (or reuses) a virtual environment (.venv, or $LAYERNORM_EXT_VENV), installs what it
# needs from the package registries, and rebuilds the extension only when its sources changed, so
# it is safe and quick to re-run. Extra arguments go to pytest / the demo.
set -euo pipefail
cd "$(dirname "$0")/.."

what="${1:-}"
shift || true
case "$what" in
  demo | test) ;;
  *)
    echo "usage: bash scripts/quickstart.sh demo|test [args...]" >&2
    exit 2
    ;;
esac

venv="${LAYERNORM_EXT_VENV:-.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  echo "== creating virtual environment $venv"
  "$python" -m venv "$venv"
fi
py="$(cd "$venv" && pwd)/bin/python"

echo "== installing build and test requirements"
"$py" -m pip install -q "torch>=2.11" ninja "setuptools>=77" wheel packaging \
  pytest hypothesis expecttest numpy ruff

# Rebuild only when a source file changed since the last successful install.
stamp="$venv/.layernorm_ext_build_stamp"
digest=$(find csrc layernorm_ext setup.py pyproject.toml CMakeLists.txt -type f \
  \( -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' -o -name '*.h' -o -name '*.py' \
  -o -name '*.txt' -o -name '*.toml' \) -print0 | sort -z | xargs -0 sha256sum | sha256sum |
  cut -d' ' -f1)
digest="$digest $("$py" -c 'import torch; print(torch.__version__)') ${TORCH_CUDA_ARCH_LIST:-}"
if [ "$(cat "$stamp" 2>/dev/null)" != "$digest" ] || ! "$py" -c 'import layernorm_ext' 2>/dev/null; then
  echo "== building and installing layernorm_ext (a few minutes on 2 cores)"
  rm -f "$stamp"
  "$py" -m pip install --no-build-isolation --no-deps -v . >"$venv/layernorm_ext_build.log" 2>&1 || {
    tail -n 60 "$venv/layernorm_ext_build.log"
    echo "build failed; full log: $venv/layernorm_ext_build.log" >&2
    exit 1
  }
  grep "layernorm_ext setup:" "$venv/layernorm_ext_build.log" || true
  echo "$digest" >"$stamp"
fi

# Run from outside the source tree so `import layernorm_ext` is the installed package.
cd "$(mktemp -d)"
if [ "$what" = demo ]; then
  exec "$py" -m layernorm_ext "$@"
fi
exec "$py" -m pytest -q -p no:cacheprovider --rootdir "$OLDPWD" "$OLDPWD/tests" "$@"
