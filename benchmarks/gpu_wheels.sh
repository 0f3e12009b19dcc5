#!/usr/bin/env bash
# Fill a wheelhouse with what benchmarks/gpu_suite.sh installs, offline, on a bare GPU machine (docs/gpu_suite.md).
#
#   bash benchmarks/gpu_wheels.sh [--platform gpu|local] [--out DIR] [--limit-mib N]      (make gpu-wheels)
#
# --platform gpu (default): for the device machine's python3 (CPython 3.12, manylinux x86-64; GPU_PYTHON to change),
#   only what its image lacks (or holds at another version than the one tested here): deepspeed, webdataset,
#   open_clip, timm and their missing dependencies. Capped at --limit-mib (default 60: the device tool carries
#   64 MiB in all, the working tree included).
# --platform local: for this machine's PYTHON (default python3), the same packages plus BASE below (what the GPU
#   image ships and a venv holding only torch lacks), so that a fresh venv with torch stands where the GPU machine
#   does (tests/test_gpu_suite.py). No cap.
# Never torch, triton or nvidia-* wheels: the GPU machine's own torch 2.11 / Triton 3.6 are the ones measured.
# deepspeed is published as an sdist only: it is built here into a pure-Python wheel with DS_BUILD_OPS=0 (pip's
# isolated build has no torch, so no op is prebuilt; deepspeed JIT-builds an op only when one is asked for, and
# the suite's steps ask for none), so that nothing is compiled on the GPU machine.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
GPU_PYTHON=${GPU_PYTHON:-3.12}
PLATFORM=gpu
OUT=$REPO/wheelhouse
LIMIT_MIB=

usage() { sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
  case $1 in
    --platform) PLATFORM=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --limit-mib) LIMIT_MIB=$2; shift 2 ;;
    -h|--help) usage 0 ;;
    *) echo "gpu_wheels.sh: unknown argument $1" >&2; usage 2 ;;
  esac
done
case $PLATFORM in
  gpu) LIMIT_MIB=${LIMIT_MIB:-60} ;;
  local) ;;
  *) echo "gpu_wheels.sh: --platform is gpu or local, not $PLATFORM" >&2; exit 2 ;;
esac

# The versions tested here (.venv); each is absent from the GPU image (/work/.library/device/KINDS.md, 2026-11-17)
# except timm and typing-extensions, carried to pin the versions open_clip 3.3 and pydantic 2.14 were tested with
# (pydantic needs typing-extensions >= 4.16).
DEEPSPEED=deepspeed==0.19.8
CARRY=(
  hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0
  webdataset==1.0.2 braceexpand==0.1.7
  open-clip-torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 timm==1.0.31
)
# On the GPU image already (KINDS.md's list), not in a venv holding only torch: --platform local only. Found by running
# the suite in such a venv (torch 2.14.1 and what pip brings with it); torchvision matches that torch.
BASE=(
  numpy==2.4.6 packaging==26.3 torchvision==0.29.1 pillow==13.0.0 pyyaml==6.0.4 tqdm==4.70.1 psutil==7.2.2
  einops==0.8.2 msgpack==1.2.4 ninja==1.13.2 py-cpuinfo==9.0.0 regex==2026.11.19 safetensors==0.8.0
  sentencepiece==0.2.3 huggingface-hub==2.4.0 click==8.5.1 hf-xet==1.8.0 httpx2==2.16.2 httpcore2==2.16.2
  anyio==4.16.0 idna==3.20 h11==0.16.0 truststore==0.10.5
)

rm -rf "$OUT"
mkdir -p "$OUT"
quiet() {  # pip's warnings about this machine's file:// indexes lacking a package are noise here
  "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
pip_download() {  # --no-deps: every dependency is named above, one version each
  quiet "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: -d "$OUT" "$@"
}
if [ "$PLATFORM" = gpu ]; then
  tags=()
  for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
             manylinux2014_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64; do
    tags+=(--platform "$tag")
  done
  echo "gpu_wheels: downloading ${#CARRY[@]} packages for CPython $GPU_PYTHON manylinux x86-64 into $OUT"
  pip_download --python-version "$GPU_PYTHON" --implementation cp "${tags[@]}" "${CARRY[@]}"
  target="CPython $GPU_PYTHON, manylinux x86-64 (the GPU machine)"
else
  echo "gpu_wheels: downloading $(( ${#CARRY[@]} + ${#BASE[@]} )) packages for $("$PYTHON" -V 2>&1) on this machine into $OUT"
  pip_download "${CARRY[@]}" "${BASE[@]}"
  target="$("$PYTHON" -V 2>&1), $("$PYTHON" -c 'import sysconfig; print(sysconfig.get_platform())') (this machine)"
fi

echo "gpu_wheels: building $DEEPSPEED into a pure-Python wheel (DS_BUILD_OPS=0)"
quiet env DS_BUILD_OPS=0 "$PYTHON" -m pip wheel --quiet --disable-pip-version-check --no-deps --no-binary deepspeed \
  -w "$OUT" "$DEEPSPEED"
ds_wheel=$(ls "$OUT"/deepspeed-*.whl)
case $ds_wheel in
  *-py3-none-any.whl) ;;
  *) echo "gpu_wheels: error: $ds_wheel is not a pure-Python wheel" >&2; exit 1 ;;
esac
if unzip -l "$ds_wheel" | grep -qE '\.so$'; then
  echo "gpu_wheels: error: $ds_wheel holds compiled ops (DS_BUILD_OPS=0 was not honoured)" >&2; exit 1
fi

forbidden=$(cd "$OUT" && ls | grep -iE '^(torch|triton|nvidia)[-_]' || true)
if [ -n "$forbidden" ]; then
  echo "gpu_wheels: error: torch/triton/nvidia wheels must not be carried: $forbidden" >&2; exit 1
fi
{ echo "platform: $PLATFORM"; echo "for: $target"; echo "built: $(date -u '+%Y-%m-%d %H:%M:%S') UTC"; } \
  > "$OUT/WHEELHOUSE.txt"

bytes=$(du -cb "$OUT"/* | tail -1 | cut -f1)
(cd "$OUT" && ls -l --block-size=K | awk 'NR > 1 {printf "  %8s  %s\n", $5, $9}')
mib=$(awk -v b="$bytes" 'BEGIN {printf "%.1f", b / 1048576}')
echo "gpu_wheels: $(ls "$OUT" | grep -cE '\.(whl|tar\.gz)$') files, $mib MiB in all, in $OUT ($target)"
if [ -n "$LIMIT_MIB" ] && [ "$bytes" -gt $(( LIMIT_MIB * 1048576 )) ]; then
  echo "gpu_wheels: error: $mib MiB is over the $LIMIT_MIB MiB limit (the device tool carries 64 MiB in all)" >&2
  exit 1
fi
