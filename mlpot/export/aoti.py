"""The AOTInductor format (``.pt2``): tracing, compiling and verifying it, loading it, and the cache of
AOTInductor builds of TorchScript files (:func:`compiled_copy`).

The energy-and-forces function is traced (forces included, by tracing the backward pass), exported
with ``torch.export`` and compiled ahead of time by AOTInductor into native code, with ``mlpot.json``
in the package. Faster on a CPU; fixed dtype and device; no Hessian (use the TorchScript file for that).
Files built now also output the virial (B, 3, 3) eV, and say so in their metadata (``"outputs"``);
files built before, without that key, have the first three outputs only and still load.
"""

import hashlib
import json
import platform
import warnings
import zipfile
from pathlib import Path
from typing import Optional

import torch

from mlpot import keys
from mlpot.data.datasets import default_cache_dir
from mlpot.data.graph import collate, make_graph
from mlpot.data.neighbors import edge_pairs
from mlpot.dtypes import dtype_of, name_of
from mlpot.export.metadata import AOTI_KINDS, METADATA_FILE, carried_metadata, metadata_of, read_metadata
from mlpot.export.torchscript import frozen_copy, potential_from_deployed
from mlpot.files import atomic_path

# inputs of the AOTInductor function, in order; its outputs are energy (B,), forces (N, 3), node energy (N,)
# and, in files whose metadata lists it under "outputs", the virial (B, 3, 3)
AOTI_INPUTS = (
    keys.POSITIONS, keys.ATOMIC_NUMBERS, keys.EDGE_INDEX, keys.SHIFT, keys.BATCH, keys.NUM_ATOMS, keys.PAIR_EDGE, keys.EDGE_PAIR,
)
AOTI_OUTPUTS = (keys.ENERGY, keys.FORCES, keys.NODE_ENERGY, keys.VIRIAL)
_LEAFSPEC_DEPRECATION = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
_OUTPUTS_BEFORE_VIRIAL = AOTI_OUTPUTS[:3]  # files without an "outputs" entry in their metadata


class EnergyAndForces(torch.nn.Module):
    """The function AOTInductor compiles, and compiled training traces: the tensors of ``AOTI_INPUTS`` in,
    (energy, forces, node energy) out, by ``Potential.energy_and_forces``, with ``virial`` the virial
    (B, 3, 3) eV as a fourth output. ``create_graph=True`` keeps the forces' autograd graph (for a force loss)."""

    def __init__(self, potential, create_graph: bool = False, virial: bool = False):
        super().__init__()
        self.potential = potential
        self.create_graph = create_graph
        self.virial = virial

    def forward(self, pos, atomic_numbers, edge_index, shift, batch, num_atoms, pair_edge, edge_pair):
        graph = dict(zip(AOTI_INPUTS, (pos, atomic_numbers, edge_index, shift, batch, num_atoms, pair_edge, edge_pair)))
        # the species check is data-dependent control flow, which tracing cannot keep: callers check
        out = self.potential.energy_and_forces(graph, self.virial, self.create_graph, False)
        if self.virial:
            return out[keys.ENERGY], out[keys.FORCES], out[keys.NODE_ENERGY], out[keys.VIRIAL]
        return out[keys.ENERGY], out[keys.FORCES], out[keys.NODE_ENERGY]


def output_disagreement(energy, forces, expected_energy, expected_forces, rtol: float) -> str:
    """'' when compiled energies and forces match the model's to ``rtol`` (relative to the largest force,
    and for energies to the largest energy plus that), else by how much they differ."""
    scale = float(expected_forces.detach().abs().max()) + 1e-12
    force_error = float((forces - expected_forces).detach().abs().max())
    energy_error = float((energy - expected_energy).detach().abs().max())
    if force_error <= rtol * scale and energy_error <= rtol * (float(expected_energy.detach().abs().max()) + scale):
        return ""
    return f"energy by {energy_error:.2e} eV, forces by {force_error:.2e} eV/Å"


def example_graph(potential, sizes=(3, 2), seed: int = 0):
    """Random molecules of the model's own elements, batched (atoms about 1 Å apart along a diagonal)."""
    dtype = potential.energy_scale.dtype
    gen = torch.Generator().manual_seed(seed)
    species = potential.species
    graphs = []
    for n in sizes:
        numbers = [species[(k + seed) % len(species)] for k in range(n)]
        positions = torch.rand(n, 3, generator=gen, dtype=torch.float64) * 1.5 + torch.arange(n).unsqueeze(1)
        graphs.append(make_graph(numbers, positions.numpy(), potential.cutoff, dtype=dtype))
    return collate(graphs)


def _verify(potential, path) -> None:
    """Run the compiled file on structures it was not traced with and compare with the eager model:
    a compiler that specialised a shape or miscompiled a kernel must not ship silent wrong numbers."""
    runner = torch._inductor.aoti_load_package(str(path))
    graph = example_graph(potential, sizes=(9, 4, 6), seed=1)
    expected = {key: value.detach() for key, value in potential.energy_and_forces(dict(graph), True).items()}
    try:
        energy, forces, _, virial = runner(*(graph[k] for k in AOTI_INPUTS))
    except RuntimeError as err:
        raise RuntimeError(f"the AOTInductor build of this {potential.kind} model fails on new structures ({err})") from None
    rtol = 1e-8 if expected[keys.FORCES].dtype == torch.float64 else 1e-3
    problem = output_disagreement(energy, forces, expected[keys.ENERGY], expected[keys.FORCES], rtol)
    virial_error = float((virial - expected[keys.VIRIAL]).abs().max())
    if not problem and virial_error > rtol * (float(expected[keys.VIRIAL].abs().max()) + 1e-12):
        problem = f"virials by {virial_error:.2e} eV"
    if problem:
        raise RuntimeError(
            f"the AOTInductor build of this {potential.kind} model disagrees with the model itself on new "
            f"structures ({problem}): a compiler problem in torch {torch.__version__}; deploy it in the "
            f"torchscript format instead"
        )


def _package_root(archive) -> str:
    """Top folder of a .pt2 package (every member lives under it)."""
    return archive.namelist()[0].split("/")[0]


def _compile(potential, path) -> None:
    """Trace energy and forces (make_fx follows autograd into the backward pass), export with dynamic
    atom, edge and structure counts, compile with AOTInductor into ``path`` and verify the result."""
    from torch.export import Dim
    from torch.fx.experimental.proxy_tensor import make_fx

    function = EnergyAndForces(frozen_copy(potential), virial=True)
    for param in function.parameters():
        param.requires_grad_(False)
    graph = example_graph(potential)  # a small batch (5 atoms, 2 structures) to trace with
    inputs = [graph[k] for k in AOTI_INPUTS]
    inputs[0] = inputs[0].clone().requires_grad_(True)
    traced = make_fx(function, tracing_mode="symbolic", _allow_non_fake_inputs=True)(*inputs)
    atoms, edges, structures = Dim("atoms", min=1), Dim("edges", min=0), Dim("structures", min=1)
    pairs = Dim("pairs", min=0)
    dynamic = ({0: atoms}, {0: atoms}, {1: edges}, {0: edges}, {0: atoms}, {0: structures}, {0: pairs}, {0: edges})
    inputs[0] = inputs[0].detach()
    with warnings.catch_warnings():  # torch's own pytree deprecation, raised inside export on 2.13: not ours to fix
        warnings.filterwarnings("ignore", message=_LEAFSPEC_DEPRECATION, category=FutureWarning)
        exported = torch.export.export(traced, tuple(inputs), dynamic_shapes=dynamic, strict=False)
        torch._inductor.aoti_compile_and_package(exported, package_path=str(path))
    _verify(function.potential, path)


def _require_compilable(kind: str, remedy: str) -> None:
    """A one-line ValueError, ending in ``remedy``, unless AOTInductor can compile a ``kind`` model."""
    if kind not in AOTI_KINDS:
        raise ValueError(
            f"the aoti format compiles {' and '.join(AOTI_KINDS)} models; a {kind} model's message passing "
            f"(PyG's GCN normalisation) has data-dependent shapes that torch.export cannot compile: {remedy}"
        )


def save_aoti(potential, path, meta: dict) -> None:
    """Compile ``potential`` with AOTInductor (a minute or two) and write it with ``meta`` to ``path`` atomically."""
    _require_compilable(potential.kind, "use torchscript")
    meta["outputs"] = list(AOTI_OUTPUTS)  # in place: save() returns the metadata written
    with atomic_path(path, suffix=".tmp.pt2") as tmp:  # AOTInductor insists on a .pt2 name
        _compile(potential, tmp)
        with zipfile.ZipFile(tmp, "a") as archive:
            archive.writestr(f"{_package_root(archive)}/extra/{METADATA_FILE}", json.dumps(meta, ensure_ascii=False))


class AOTIModel:
    """A loaded AOTInductor package with the calling convention of the TorchScript model:
    ``model(graph) -> {energy, forces, node_energy}``, and ``model.energy_and_forces(graph, True, ...)``
    adding the virial when the file has that output (``outputs``, from its metadata)."""

    def __init__(self, runner, dtype: torch.dtype, device: str, path, outputs=_OUTPUTS_BEFORE_VIRIAL):
        self.runner = runner
        self.dtype = dtype
        self.device = device
        self.path = str(path)
        self.outputs = tuple(outputs)

    def __call__(self, graph):
        out = self._run(graph)
        out.pop(keys.VIRIAL, None)  # computed alongside anyway; the plain call returns what TorchScript's does
        return out

    def energy_and_forces(self, graph, virial: bool = False, create_graph: bool = False, check_species: bool = True):
        """Energies, forces and (with ``virial``) the virial (B, 3, 3) eV; the flags after ``virial``
        exist for the TorchScript signature (a compiled file keeps no autograd graph and checks no species)."""
        if virial and keys.VIRIAL not in self.outputs:
            from ase.calculators.calculator import PropertyNotImplementedError

            raise PropertyNotImplementedError(
                f"{self.path} was compiled without a virial output (stress); deploy it again with this mlpot "
                f"(mlpot deploy MODEL.pt -o MODEL.pt2 --format aoti) or use the TorchScript file"
            )
        out = self._run(graph)
        if not virial:
            out.pop(keys.VIRIAL, None)
        return out

    def _run(self, graph):
        if keys.PAIR_EDGE not in graph:  # graphs from make_graph and collate have them; others get them here
            pair_edge, edge_pair = edge_pairs(graph[keys.EDGE_INDEX].cpu().numpy(), graph[keys.SHIFT].detach().cpu().numpy())
            graph = {**graph, keys.PAIR_EDGE: torch.from_numpy(pair_edge), keys.EDGE_PAIR: torch.from_numpy(edge_pair)}
        pos = graph[keys.POSITIONS]
        if pos.dtype != self.dtype:
            raise ValueError(f"{self.path} is compiled for {self.dtype}; got positions in {pos.dtype}")
        # compiled code reads raw memory: it needs dense tensors (a strided view would be misread)
        results = self.runner(*(graph[k].contiguous() for k in AOTI_INPUTS))
        return dict(zip(self.outputs, results))

    def hessian(self, graph):
        raise NotImplementedError(
            f"{self.path} is an AOTInductor file (energy and forces only); for Hessians deploy the "
            f"model in TorchScript format (mlpot-deploy CHECKPOINT -o MODEL.pt)"
        )

    def eval(self):
        return self


def load_aoti(path, device: str, dtype: Optional[torch.dtype], meta: dict) -> AOTIModel:
    """The AOTInductor package at ``path`` (metadata ``meta``) as an :class:`AOTIModel`."""
    file_dtype = dtype_of(meta["dtype"])
    if dtype is not None and dtype != file_dtype:
        raise ValueError(
            f"{path} is compiled (AOTInductor) for {meta['dtype']} and cannot run in {dtype}; deploy the "
            f"checkpoint again with --dtype, or use the TorchScript format"
        )
    if torch.device(device).type != "cpu":
        raise ValueError(f"{path} is compiled (AOTInductor) for the CPU; deploy it again on {device} to run there")
    try:
        runner = torch._inductor.aoti_load_package(str(path))
    except Exception as err:  # torch raises several types for damaged or foreign packages
        raise ValueError(f"{path} could not be loaded as an AOTInductor package: {err}") from None
    return AOTIModel(runner, file_dtype, device, path, meta.get("outputs", _OUTPUTS_BEFORE_VIRIAL))


def compiled_copy(path, dtype: Optional[torch.dtype] = None, cache_dir=None) -> Path:
    """An AOTInductor build of the deployed TorchScript file ``path`` (in ``dtype``, default the file's),
    compiled on first use and cached (``$MLPOT_CACHE_DIR/aoti``, default ~/.cache/mlpot/aoti) under a
    key of the file's contents, the dtype, torch's version and the CPU type. Returns its path."""
    path = Path(path)
    meta = read_metadata(path)
    if meta.get("format", "torchscript") == "aoti":
        if dtype is not None and dtype_of(meta["dtype"]) != dtype:
            raise ValueError(f"{path} is compiled for {meta['dtype']}; compile its TorchScript file for {dtype}")
        return path
    _require_compilable(meta["kind"], "run it without compile")
    dtype_name = meta["dtype"] if dtype is None else name_of(dtype)
    digest = hashlib.sha256(path.read_bytes())
    # "virial": builds cached before the virial output are not reused
    digest.update(f"{dtype_name} {torch.__version__} {platform.machine()} {platform.processor()} virial".encode())
    target = default_cache_dir(cache_dir) / "aoti" / f"{path.stem}-{dtype_name}-{digest.hexdigest()[:16]}.pt2"
    if not target.is_file():
        potential = potential_from_deployed(path).to(dtype_of(dtype_name))
        save_aoti(potential, target, metadata_of(potential, format="aoti", **carried_metadata(meta, potential)))
    return target
