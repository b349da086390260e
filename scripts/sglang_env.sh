#!/usr/bin/env bash
# The SGLang test environment: SGLang's released code (pinned) without its CUDA stack, over the vLLM test
# environment's packages (torch CPU, transformers, fastapi, zmq, aiohttp, ... : scripts/vllm_env.sh), so that
# tests can drive SGLang's own encoder-disaggregation receiver (sglang.srt.disaggregation.encoder.receiver)
# against the pool. A language server cannot run here (SGLang's runtime is CUDA-only); its receiver,
# unpickler and plugin machinery import and run on the CPU.
#
#   scripts/sglang_env.sh [DIR]      # default .venv-sglang (ignored by git); a complete env is kept as is
#
# How: a virtualenv of its own whose site-packages point at the vLLM environment's (a .pth file) and hold
# only what SGLang's receiver needs beyond them: sglang itself (--no-deps: its CUDA 13 torch, flashinfer and
# kernels are not installed) and the few modules it imports at load time (IPython, gguf; scripts/sglang_env.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
ENV=${1:-.venv-sglang}
SGLANG_VERSION=$(grep -E "^sglang==" scripts/sglang_env.txt | cut -d= -f3)
if [ -f "$ENV/.complete" ]; then
  exit 0
fi
scripts/vllm_env.sh
rm -rf "$ENV"
python3 -m venv "$ENV"
SITE=$("$ENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
VLLM_SITE=$(.venv-vllm/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$VLLM_SITE" > "$SITE/vllm-env.pth"
pip_install() {  # quiet, without the notes about local index folders this machine's pip config names
  "$ENV/bin/python" -m pip install -q --disable-pip-version-check "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }
}
pip_install --no-deps "sglang==$SGLANG_VERSION"
pip_install -c scripts/sglang_env.txt ipython gguf  # what sglang imports at load time; pins in sglang_env.txt
"$ENV/bin/python" -c 'import sglang.srt.disaggregation.encoder.receiver, encoder_service.integrations.sglang' 2>/dev/null
touch "$ENV/.complete"
echo "SGLang environment ready: $ENV"
