#!/usr/bin/env bash
# The README's test suite on the GPU machine, run as the README runs it (python -m pytest -q), with
# Ray and FlashInfer brought as the wheel sets ../shared/gpu/README.md describes. Every change that
# touches code running on a GPU (engine, attention, preprocessing, serving, Ray app) is checked with it.
#
# Here, from the project root, once per change:
#   python -m encoder_service.proto.codegen          # grpcio-tools is not on the GPU machine
#   ../shared/gpu/wheels.sh fi && ../shared/gpu/wheels.sh ray
#   scripts/gpu_suite.sh av-wheel                    # -> .whl-av: PyAV, which the GPU machine lacks
# There (device tool), runs back to back: one transfer holds one wheel set, and /tmp/site
# survives between runs while the machine stays warm (~30 s):
#   run 1, carry [.whl-av]:                          scripts/gpu_suite.sh install .whl-av
#   (optional, carry [.whl-fi]:                      scripts/gpu_suite.sh install .whl-fi)
#   last, carry [.whl-ray, encoder_service/proto/encoder_pb2.py, encoder_service/proto/encoder_pb2_grpc.py]:
#                                                    scripts/gpu_suite.sh test [pytest args...]
# Without PyAV the tests that make real MP4s (in test_cli, test_llm_worker, test_pool_cache, test_video_evs,
# test_nemotron) skip: bring it so they run there (it is a dependency of the package, not an extra).
# `test` installs .whl-ray itself, says whether FlashInfer made it (the flashinfer tests skip
# without it), and writes $OUT/suite.log (nanobind leak noise filtered) and $OUT/summary.txt
# (device, date, counts, wall time). tests/test_vllm.py and tests/test_nemotron_vllm.py are left out
# there: they build vLLM's CPU environment from the package registry, which the GPU machine cannot
# reach (vLLM work is verified on CPU machines; the CPU suite runs it).
# One device call runs at most 10 minutes and the whole suite takes longer on the GPU machine (every
# GPU engine builds its FlashInfer graphs at start): run it in shards, passing test files as pytest
# args, e.g. `test tests/test_gpu.py tests/test_ray_serve.py`, then `test --ignore=tests/test_gpu.py ...`.
set -uo pipefail
cd "$(dirname "$0")/.."
SITE=/tmp/site
OUT=${OUT:-/tmp/gpu-suite-out}
mkdir -p "$OUT" "$SITE"

install_set() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$1"/*.whl
}

case ${1:-} in
  av-wheel)  # here: the pinned PyAV as a wheel for the GPU machine's Python 3.12 (~35 MB, FFmpeg bundled)
    av=$(grep -i '^av==' constraints.txt)
    python3 -m pip download -q --no-deps --only-binary :all: --python-version 3.12 \
      --platform manylinux_2_28_x86_64 -d .whl-av "$av" && ls .whl-av
    ;;
  install)
    install_set "${2:?usage: gpu_suite.sh install WHEEL_DIR}" && echo "installed $2 into $SITE"
    ;;
  test)
    shift
    [ -d .whl-ray ] && install_set .whl-ray
    export PYTHONPATH=$SITE:$PWD RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1
    fi=$(python3 -c 'import flashinfer; print(flashinfer.__version__)' 2>/dev/null || echo "absent (flashinfer tests skip)")
    started=$(date +%s)
    python3 -m pytest -q -p no:cacheprovider --ignore=tests/test_vllm.py --ignore=tests/test_nemotron_vllm.py "$@" 2>&1 | grep --line-buffered -v -i nanobind > "$OUT/suite.log"
    code=${PIPESTATUS[0]}
    {
      echo "device: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $(nproc) cores"
      echo "date: $(date -u +%F)"
      echo "torch: $(python3 -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)')"
      echo "ray: $(python3 -c 'import ray; print(ray.__version__)' 2>/dev/null || echo absent), flashinfer: $fi, av: $(python3 -c 'import av; print(av.__version__)' 2>/dev/null || echo absent)"
      echo "result: $(grep -E '(passed|failed|error)' "$OUT/suite.log" | tail -1)"
      echo "wall: $(( $(date +%s) - started )) s, exit code $code"
    } | tee "$OUT/summary.txt"
    grep -E '^(FAILED|ERROR) ' "$OUT/suite.log" | head -40
    exit "$code"
    ;;
  *)
    echo "usage: scripts/gpu_suite.sh av-wheel | install WHEEL_DIR | test [pytest args...]" >&2
    exit 2
    ;;
esac
