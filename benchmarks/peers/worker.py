"""One benchmark worker: serves the JSON-line protocol (protocol.py) for one implementation (impl_*.py).

Run by each implementation's own venv python (see setup.sh), normally started by run.py:

    .venvs/nequip/bin/python worker.py --impl nequip
    ../../.venv/bin/python worker.py --impl mlpot --model egnn [--format torchscript|aoti]

Each implementation builds a model of mlpot's recipe size, deploys it the way that implementation recommends for
ASE, and is measured by the code in protocol.py. Weights are untrained (NequIP's are trained for one epoch on 15
frames only because its compile tool needs a training checkpoint); latency does not depend on the weights.
"""

import argparse
import os
import sys

from impl_mace import MACE
from impl_mlpot import MLPot
from impl_nequip import NequIP
from impl_schnetpack import SchNetPack
from protocol import serve

# each module imports its own package only inside its methods, so every venv can import all four
IMPLS = {"mlpot": MLPot, "nequip": NequIP, "mace": MACE, "schnetpack": SchNetPack}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", required=True, choices=sorted(IMPLS))
    parser.add_argument("--model", default="egnn", choices=["egnn", "schnet"], help="mlpot model kind")
    parser.add_argument("--format", default="torchscript", choices=["torchscript", "aoti"],
                        help="mlpot deploy format (aoti builds are cached in .cache/mlpot-aoti-torch*/)")
    parser.add_argument("--neighbor-list", default="matscipy", choices=["ase", "matscipy", "torch"],
                        help="schnetpack neighbour-list transform for SpkCalculator")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="where the models run (cuda on a GPU machine)")
    args = parser.parse_args()

    # the protocol owns the real stdout; anything the libraries print goes to stderr
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    import warnings

    warnings.filterwarnings("ignore")
    # mace-torch's MACECalculator and schnetpack's SpkCalculator torch.load pickled models without
    # weights_only=False, which torch >= 2.6 refuses; torch's documented switch restores the old default
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    import torch

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    serve(IMPLS[args.impl](args), proto)


if __name__ == "__main__":
    main()
