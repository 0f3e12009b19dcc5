#!/usr/bin/env bash
# The GPU suite on a bare machine without network (docs/gpu_suite.md):
#
#   bash benchmarks/gpu_suite.sh [--cpu] [--tiny] [--out DIR] [--wheelhouse DIR|none] [--budget S] [--only PARTS]
#
# 1. Installs the wheelhouse (`make gpu-wheels`; default ./wheelhouse) offline, beside the machine's own packages:
#    pip install --no-index --no-deps --target SITE (SITE: $GPU_SUITE_SITE, default ${TMPDIR:-/tmp}/clipdino_gpu_site)
#    with DS_BUILD_OPS=0 and --no-build-isolation (an sdist in the wheelhouse then builds against the machine's torch,
#    without compiling any op), then PYTHONPATH=SITE: the machine's torch and Triton stay the ones measured.
#    Skipped when SITE already holds this wheelhouse for this python, or with --wheelhouse none.
# 2. Runs benchmarks/gpu_suite.py with $PYTHON (default python3): ViT-B/16 CLIP and DINO train steps (eager and
#    compiled, ours vs open_clip, largest batch that fits) and the fused losses vs torch, in at most 480 s, into
#    DIR/gpu_suite_<stamp>.{json,md} (default DIR: benchmarks/results). --cpu --tiny: the same steps, tiny, on the
#    CPU; the figures then mean nothing. Exit code: the driver's (1 when a part is not ok).
# It never changes device settings: nvidia-smi is only queried.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
WHEELHOUSE=$REPO/wheelhouse
ARGS=()

usage() { sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
  case $1 in
    --wheelhouse) WHEELHOUSE=$2; shift 2 ;;
    --out|--budget|--only) ARGS+=("$1" "$2"); shift 2 ;;
    --cpu|--tiny) ARGS+=("$1"); shift ;;
    -h|--help) usage 0 ;;
    *) echo "gpu_suite.sh: unknown argument $1" >&2; usage 2 ;;
  esac
done

export GPU_SUITE_INSTALL="none (--wheelhouse none): the packages $PYTHON already imports"
if [ "$WHEELHOUSE" != none ]; then
  if [ ! -d "$WHEELHOUSE" ]; then
    echo "gpu_suite.sh: error: no wheelhouse at $WHEELHOUSE: run 'make gpu-wheels' (or pass --wheelhouse none)" >&2
    exit 2
  fi
  WHEELHOUSE=$(cd "$WHEELHOUSE" && pwd)
  files=()
  for f in "$WHEELHOUSE"/*.whl "$WHEELHOUSE"/*.tar.gz; do
    [ -e "$f" ] && files+=("$f")
  done
  if [ ${#files[@]} -eq 0 ]; then
    echo "gpu_suite.sh: error: $WHEELHOUSE holds no wheel or sdist" >&2
    exit 2
  fi
  SITE=${GPU_SUITE_SITE:-${TMPDIR:-/tmp}/clipdino_gpu_site}
  case $SITE in /|/tmp|/tmp/|"$HOME"|"$REPO") echo "gpu_suite.sh: error: refusing SITE=$SITE" >&2; exit 2 ;; esac
  stamp=$( (ls -l "${files[@]}"; "$PYTHON" -c 'import sys; print(sys.executable, sys.version)') | cksum)
  if [ -f "$SITE/.stamp" ] && [ "$(cat "$SITE/.stamp")" = "$stamp" ]; then
    GPU_SUITE_INSTALL="reused $SITE (already holds the ${#files[@]} files of $WHEELHOUSE)"
  else
    [ -f "$WHEELHOUSE/WHEELHOUSE.txt" ] && sed 's/^/gpu_suite.sh: wheelhouse /' "$WHEELHOUSE/WHEELHOUSE.txt"
    echo "gpu_suite.sh: installing ${#files[@]} files offline into $SITE with $("$PYTHON" -V 2>&1) ($PYTHON)"
    rm -rf "$SITE"
    t0=$(date +%s)
    PIP_NO_INDEX=1 PIP_ROOT_USER_ACTION=ignore DS_BUILD_OPS=0 "$PYTHON" -m pip install --quiet --no-index --no-deps --no-build-isolation \
      --no-cache-dir --no-compile --disable-pip-version-check --no-warn-script-location --target "$SITE" \
      "${files[@]}"
    echo "$stamp" > "$SITE/.stamp"
    GPU_SUITE_INSTALL="${#files[@]} files of $WHEELHOUSE installed offline into $SITE in $(( $(date +%s) - t0 )) s"
  fi
  echo "gpu_suite.sh: $GPU_SUITE_INSTALL"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

exec "$PYTHON" "$REPO/benchmarks/gpu_suite.py" ${ARGS[@]+"${ARGS[@]}"}
