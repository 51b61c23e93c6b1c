#!/usr/bin/env bash
# One virtual environment per peer package under benchmarks/peers/.venvs/<peer>, each with torch==2.13.0
# (the CPU wheel; never a looser pin, which would pull a CUDA build), the peer at a pinned version, and ase.
# Idempotent: an existing venv that already imports its peer at the pinned version is left alone.
#
# Usage: bash benchmarks/peers/setup.sh [peer ...]     (default: nequip mace schnetpack)
# Env:   PYTHON=python3.11 (the interpreter the venvs are made from; default: mlpot's dev venv's base python)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENVS="$HERE/.venvs"

TORCH_PIN="torch==2.13.0"
ASE_PIN="ase==3.29.0"
E3NN_PIN="e3nn==0.6.0"          # same e3nn as mlpot, for nequip (mace-torch pins its own: e3nn==0.4.4)
NEQUIP_PIN="nequip==0.19.1"
MACE_PIN="mace-torch==0.3.16"
SCHNETPACK_PIN="schnetpack==2.1.1"
# schnetpack 2.1.1 declares sympy<=1.12, which torch 2.13 (sympy>=1.13.3) excludes; schnetpack uses sympy only
# for Clebsch-Gordan coefficients (schnetpack.nn.ops.so3, SO3net), which sympy 1.14 provides unchanged. So it is
# installed with --no-deps and its other runtime requirements are listed here (pre-commit and black, which it
# declares but never imports, are left out).
SCHNETPACK_DEPS="numpy>=2.0.0 h5py pyyaml hydra-core>=1.1.0 pytorch-lightning>=2.0.0 torchmetrics hydra-colorlog>=1.1.0
rich fasteners dirsync torch-ema matscipy>=1.1.0 tensorboard>=2.17.1 tensorboardX>=2.6.2.2 tqdm protobuf"

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then
        PYTHON="$("$ROOT/.venv/bin/python" -c 'import sys; print(sys._base_executable)')"
    else
        PYTHON="$(command -v python3.11 || command -v python3)"
    fi
fi

pins_of() {
    case "$1" in
        nequip) echo "$NEQUIP_PIN $E3NN_PIN" ;;
        mace) echo "$MACE_PIN" ;;
        schnetpack) echo "$SCHNETPACK_PIN" ;;
        *) echo "unknown peer $1 (nequip, mace, schnetpack)" >&2; return 1 ;;
    esac
}

module_of() {
    case "$1" in
        nequip) echo nequip ;;
        mace) echo mace ;;
        schnetpack) echo schnetpack ;;
    esac
}

dist_of() {
    case "$1" in
        nequip) echo nequip ;;
        mace) echo mace-torch ;;
        schnetpack) echo schnetpack ;;
    esac
}

# pip, quiet, without the notices about this machine's empty local index folders
pipq() { "$venv/bin/pip" --quiet "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

peers=("$@")
[[ ${#peers[@]} -eq 0 ]] && peers=(nequip mace schnetpack)

status=0
for peer in "${peers[@]}"; do
    pins="$(pins_of "$peer")"
    venv="$VENVS/$peer"
    want="${pins%% *}"; want="${want##*==}"
    py="$venv/bin/python"
    if [[ -x "$py" ]] && "$py" - "$(dist_of "$peer")" "$want" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
import torch
sys.exit(0 if version(sys.argv[1]) == sys.argv[2] and torch.__version__.startswith("2.13.0") else 1)
PY
    then
        echo "== $peer: $venv is up to date"
    else
        echo "== $peer: installing $TORCH_PIN $pins $ASE_PIN into $venv (from $PYTHON)"
        [[ -x "$py" ]] || "$PYTHON" -m venv "$venv"
        # torch first and alone, so the peer's own torch requirement is met by the CPU wheel
        if [[ "$peer" == schnetpack ]]; then
            install() {
                pipq install "$TORCH_PIN" \
                    && pipq install "$TORCH_PIN" "$ASE_PIN" $SCHNETPACK_DEPS \
                    && pipq install --no-deps $pins
            }
        else
            install() { pipq install "$TORCH_PIN" && pipq install "$TORCH_PIN" $pins "$ASE_PIN"; }
        fi
        if ! install; then
            echo "!! $peer: pip install failed (see above)" >&2
            status=1
            continue
        fi
    fi
    "$py" - "$(module_of "$peer")" <<'PY' || { echo "!! $peer: import check failed" >&2; status=1; }
import importlib, sys, typing
from importlib.metadata import PackageNotFoundError, version
import torch
import torch.utils.data.dataloader as dl
if not hasattr(dl, "T_co"):  # schnetpack 2.1.1 imports this name, gone in torch 2.13 (impl_schnetpack.py defines it too)
    dl.T_co = typing.TypeVar("T_co", covariant=True)
importlib.import_module(sys.argv[1])
names = ["torch", "e3nn", "ase", "nequip", "mace-torch", "schnetpack", "lightning", "pytorch-lightning",
         "hydra-core", "matscipy", "torchmetrics", "numpy"]
found = []
for name in names:
    try:
        found.append(f"{name}=={version(name)}")
    except PackageNotFoundError:
        pass
print(f"   {sys.argv[1]} imports; python {sys.version.split()[0]}; " + " ".join(found))
PY
done
exit $status
