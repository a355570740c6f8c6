# Source this on the GPU machine (device tool, no internet) before any tubesum command there:
#   source benchmarks/gpu_env.sh [PROJECT_DIR]
# It installs the pure-Python dependencies from wheels carried in .whl/ (downloaded here for
# Python 3.12, see docs/benchmarks.md) and tubesum itself into /tmp/site. torch, transformers and
# accelerate are the machine's own.
_ts_root="$(cd "${1:-.}" && pwd)"
_ts_whl="${TUBESUM_WHEELS:-$_ts_root/.whl}"
[ -d "$_ts_whl" ] || _ts_whl="$(git rev-parse --show-toplevel 2>/dev/null || pwd)/.whl"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$_ts_whl"/*.whl \
  && python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade \
       --target /tmp/site "$_ts_root" \
  && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
