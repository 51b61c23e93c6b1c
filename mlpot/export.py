"""Deployed model files: one file that carries its own metadata, in one of two formats.

- ``torchscript`` (default, ``.pt``): a TorchScript archive of the whole
  :class:`~mlpot.models.Potential` (energies and autograd forces, plus an exported ``hessian``
  method) with ``mlpot.json`` among its extra files.
- ``aoti`` (``.pt2``): the energy-and-forces function traced (forces included, by tracing the
  backward pass), exported with ``torch.export`` and compiled ahead of time by AOTInductor into
  native code, with ``mlpot.json`` in the package. Faster on a CPU; fixed dtype and device; no
  Hessian (use the TorchScript file for that).

Loading either needs only torch; the metadata gives the kind, species, cutoff, dtype and units.
"""

import contextlib
import copy
import json
import os
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Optional

import torch

import mlpot
from mlpot import keys
from mlpot.version import FORMAT_VERSION
METADATA_FILE = "mlpot.json"
FORMATS = ("torchscript", "aoti")
# kinds that compile with AOTInductor; PyG's GCN normalisation (gcn) has data-dependent shapes torch.export cannot keep
AOTI_KINDS = ("egnn", "schnet")
# inputs of the AOTInductor function, in order; its outputs are energy (B,), forces (N, 3), node energy (N,)
AOTI_INPUTS = (
    keys.POSITIONS, keys.ATOMIC_NUMBERS, keys.EDGE_INDEX, keys.SHIFT, keys.BATCH, keys.NUM_ATOMS, keys.PAIR_EDGE, keys.EDGE_PAIR,
)
_TORCHSCRIPT_DEPRECATION = r"`torch\.jit\.(script|save|load|trace|trace_method)` is deprecated"


@contextlib.contextmanager
def _quiet_torchscript():
    """Silence exactly torch's TorchScript deprecation warnings (TorchScript stays our format for now)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_TORCHSCRIPT_DEPRECATION, category=DeprecationWarning)
        yield


def compile_potential(potential: torch.nn.Module) -> torch.jit.ScriptModule:
    """TorchScript-compile a copy of a Potential in eval mode (e3nn modules go through ``e3nn.util.jit.compile``).

    The argument is left as it was: ``e3nn.util.jit.compile`` swaps submodules in place and ``eval()``
    would switch off ``create_graph`` for a model that is still being trained.
    """
    from e3nn.util.jit import compile as e3nn_compile

    potential = _frozen_copy(potential)
    with _quiet_torchscript():
        return torch.jit.script(e3nn_compile(potential))


def _frozen_copy(potential):
    """A copy in eval mode with the model's derived weight tables precomputed (when it has any)."""
    potential = copy.deepcopy(potential).eval()
    freeze = getattr(potential.model, "freeze", None)
    if freeze is not None:
        freeze()
    return potential


def metadata_of(potential, **extra) -> dict:
    """The metadata dict written into a deployed file."""
    dtype = str(potential.energy_scale.dtype).replace("torch.", "")
    meta = {
        "format_version": FORMAT_VERSION,
        "mlpot_version": mlpot.__version__,
        "torch_version": torch.__version__,
        "kind": potential.kind,
        "species": list(potential.species),
        "cutoff": potential.cutoff,
        "dtype": dtype,
        "units": {"energy": "eV", "length": "Å", "forces": "eV/Å"},
        "periodic": False,  # trained on isolated molecules; training on cells sets True
        "hparams": potential.hparams,
    }
    meta.update(extra)
    return meta


def carried_metadata(meta: dict, potential) -> dict:
    """The entries of a deployed file's metadata that a re-deploy of ``potential`` keeps (dataset,
    metrics, periodic...): all but those :func:`metadata_of` and :func:`save` write afresh."""
    regenerated = (metadata_of(potential).keys() | {"format"}) - {"periodic"}
    return {k: v for k, v in meta.items() if k not in regenerated}


def save(potential, path, format: str = "torchscript", **extra) -> dict:
    """Compile ``potential`` and write it with its metadata to ``path`` atomically.

    ``format`` is ``"torchscript"`` (default) or ``"aoti"`` (AOTInductor package, see the module
    docstring; compiling takes a minute or two). Extra keyword arguments (e.g.
    ``dataset="rmd17_ethanol"``, ``metrics={...}``) go into the metadata. Returns the metadata written.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown deploy format {format!r}; choose one of {FORMATS}")
    if format == "aoti" and potential.kind not in AOTI_KINDS:
        raise ValueError(
            f"the aoti format compiles {' and '.join(AOTI_KINDS)} models; a {potential.kind} model's message passing "
            f"(PyG's GCN normalisation) has data-dependent shapes that torch.export cannot compile: use torchscript"
        )
    path = Path(path)
    meta = metadata_of(potential, format=format, **extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    # AOTInductor insists on a .pt2 name
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp" if format == "torchscript" else ".tmp.pt2", dir=path.parent)
    os.close(fd)
    try:
        if format == "torchscript":
            scripted = compile_potential(potential)
            with _quiet_torchscript():
                torch.jit.save(scripted, tmp, _extra_files={METADATA_FILE: json.dumps(meta, ensure_ascii=False)})
        else:
            _save_aoti(potential, tmp, meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return meta


class EnergyAndForces(torch.nn.Module):
    """The function AOTInductor compiles, and compiled training traces: the tensors of ``AOTI_INPUTS`` in,
    (energy, forces, node energy) out. ``create_graph=True`` keeps the forces' autograd graph (for a force loss)."""

    def __init__(self, potential, create_graph: bool = False):
        super().__init__()
        self.potential = potential
        self.create_graph = create_graph

    def forward(self, pos, atomic_numbers, edge_index, shift, batch, num_atoms, pair_edge, edge_pair):
        graph = {
            keys.POSITIONS: pos, keys.ATOMIC_NUMBERS: atomic_numbers, keys.EDGE_INDEX: edge_index,
            keys.SHIFT: shift, keys.BATCH: batch, keys.NUM_ATOMS: num_atoms, keys.PAIR_EDGE: pair_edge,
            keys.EDGE_PAIR: edge_pair,
        }
        # the species check is data-dependent control flow, which tracing cannot keep: callers check
        out = self.potential.energy_and_forces(graph, create_graph=self.create_graph, check_species=False)
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
    from mlpot.data.graph import collate, make_graph

    dtype = potential.energy_scale.dtype
    gen = torch.Generator().manual_seed(seed)
    species = potential.species
    graphs = []
    for n in sizes:
        numbers = [species[(k + seed) % len(species)] for k in range(n)]
        positions = torch.rand(n, 3, generator=gen, dtype=torch.float64) * 1.5 + torch.arange(n).unsqueeze(1)
        graphs.append(make_graph(numbers, positions.numpy(), potential.cutoff, dtype=dtype))
    return collate(graphs)


def _example_inputs(potential) -> tuple:
    """A small batch (5 atoms, 2 structures) to trace with."""
    graph = example_graph(potential)
    return tuple(graph[k] for k in AOTI_INPUTS)


def _verify_aoti(potential, path) -> None:
    """Run the compiled file on structures it was not traced with and compare with the eager model:
    a compiler that specialised a shape or miscompiled a kernel must not ship silent wrong numbers."""
    runner = torch._inductor.aoti_load_package(str(path))
    graph = example_graph(potential, sizes=(9, 4, 6), seed=1)
    expected = {key: value.detach() for key, value in potential(dict(graph)).items()}
    try:
        energy, forces, _ = runner(*(graph[k] for k in AOTI_INPUTS))
    except RuntimeError as err:
        raise RuntimeError(f"the AOTInductor build of this {potential.kind} model fails on new structures ({err})") from None
    rtol = 1e-8 if expected[keys.FORCES].dtype == torch.float64 else 1e-3
    problem = output_disagreement(energy, forces, expected[keys.ENERGY], expected[keys.FORCES], rtol)
    if problem:
        raise RuntimeError(
            f"the AOTInductor build of this {potential.kind} model disagrees with the model itself on new "
            f"structures ({problem}): a compiler problem in torch {torch.__version__}; deploy it in the "
            f"torchscript format instead"
        )


def _save_aoti(potential, path, meta: dict) -> None:
    """Trace energy and forces (make_fx follows autograd into the backward pass), export with
    dynamic atom, edge and structure counts, and compile with AOTInductor into ``path``."""
    import zipfile as _zipfile

    from torch.export import Dim
    from torch.fx.experimental.proxy_tensor import make_fx

    function = EnergyAndForces(_frozen_copy(potential))
    for param in function.parameters():
        param.requires_grad_(False)
    inputs = list(_example_inputs(potential))
    inputs[0] = inputs[0].clone().requires_grad_(True)
    traced = make_fx(function, tracing_mode="symbolic", _allow_non_fake_inputs=True)(*inputs)
    atoms, edges, structures = Dim("atoms", min=1), Dim("edges", min=0), Dim("structures", min=1)
    pairs = Dim("pairs", min=0)
    dynamic = ({0: atoms}, {0: atoms}, {1: edges}, {0: edges}, {0: atoms}, {0: structures}, {0: pairs}, {0: edges})
    inputs[0] = inputs[0].detach()
    exported = torch.export.export(traced, tuple(inputs), dynamic_shapes=dynamic, strict=False)
    torch._inductor.aoti_compile_and_package(exported, package_path=str(path))
    _verify_aoti(function.potential, path)
    with _zipfile.ZipFile(path, "a") as archive:
        archive.writestr(f"{_aoti_root(archive)}/extra/{METADATA_FILE}", json.dumps(meta, ensure_ascii=False))


def _aoti_root(archive) -> str:
    """Top folder of a .pt2 package (every member lives under it)."""
    return archive.namelist()[0].split("/")[0]


class AOTIModel:
    """A loaded AOTInductor package with the calling convention of the TorchScript model:
    ``model(graph) -> {energy, forces, node_energy}``."""

    def __init__(self, runner, dtype: torch.dtype, device: str, path):
        self.runner = runner
        self.dtype = dtype
        self.device = device
        self.path = str(path)

    def __call__(self, graph):
        if keys.PAIR_EDGE not in graph:  # graphs from make_graph and collate have them; others get them here
            from mlpot.data.neighbors import edge_pairs

            pair_edge, edge_pair = edge_pairs(graph[keys.EDGE_INDEX].cpu().numpy(), graph[keys.SHIFT].detach().cpu().numpy())
            graph = {**graph, keys.PAIR_EDGE: torch.from_numpy(pair_edge), keys.EDGE_PAIR: torch.from_numpy(edge_pair)}
        pos = graph[keys.POSITIONS]
        if pos.dtype != self.dtype:
            raise ValueError(f"{self.path} is compiled for {self.dtype}; got positions in {pos.dtype}")
        # compiled code reads raw memory: it needs dense tensors (a strided view would be misread)
        energy, forces, node_energy = self.runner(*(graph[k].contiguous() for k in AOTI_INPUTS))
        return {keys.ENERGY: energy, keys.FORCES: forces, keys.NODE_ENERGY: node_energy}

    def hessian(self, graph):
        raise NotImplementedError(
            f"{self.path} is an AOTInductor file (energy and forces only); for Hessians deploy the "
            f"model in TorchScript format (mlpot-deploy CHECKPOINT -o MODEL.pt)"
        )

    def eval(self):
        return self


def compiled_copy(path, dtype: Optional[torch.dtype] = None, cache_dir=None) -> Path:
    """An AOTInductor build of the deployed TorchScript file ``path`` (in ``dtype``, default the file's),
    compiled on first use and cached (``$MLPOT_CACHE_DIR/aoti``, default ~/.cache/mlpot/aoti) under a
    key of the file's contents, the dtype, torch's version and the CPU type. Returns its path."""
    import hashlib
    import platform

    from mlpot.checkpoint import potential_from_deployed
    from mlpot.data.datasets import default_cache_dir

    path = Path(path)
    meta = read_metadata(path)
    if meta.get("format", "torchscript") == "aoti":
        if dtype is not None and getattr(torch, meta["dtype"]) != dtype:
            raise ValueError(f"{path} is compiled for {meta['dtype']}; compile its TorchScript file for {dtype}")
        return path
    dtype_name = str(dtype or getattr(torch, meta["dtype"])).replace("torch.", "")
    digest = hashlib.sha256(path.read_bytes())
    digest.update(f"{dtype_name} {torch.__version__} {platform.machine()} {platform.processor()}".encode())
    target = default_cache_dir(cache_dir) / "aoti" / f"{path.stem}-{dtype_name}-{digest.hexdigest()[:16]}.pt2"
    if not target.is_file():
        potential = potential_from_deployed(path).to(getattr(torch, dtype_name))
        save(potential, target, format="aoti", **carried_metadata(meta, potential))
    return target


def read_metadata(path) -> dict:
    """Metadata of a deployed file, checked; raises ValueError for files that are not mlpot models."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not an mlpot model file (not a TorchScript archive; truncated or foreign?)")
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if n.endswith("extra/" + METADATA_FILE)]
        if not names:
            if not any("/code/" in n for n in archive.namelist()):  # TorchScript archives hold code/, torch.save ones not
                raise ValueError(
                    f"{path} is a torch.save file (a training checkpoint?), not a deployed mlpot model; "
                    f"deploy a checkpoint with: mlpot-deploy CHECKPOINT -o MODEL.pt"
                )
            raise ValueError(f"{path} is a TorchScript file but not an mlpot model (no {METADATA_FILE} metadata)")
        try:
            meta = json.loads(archive.read(names[0]).decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: unreadable mlpot metadata ({err})") from None
    version = meta.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise ValueError(
            f"{path} was written before mlpot model files had a format version ({version!r}) and cannot be "
            f"read safely; re-deploy it from its checkpoint: mlpot-deploy CHECKPOINT -o NEW.pt"
        )
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path} has model format version {version}, newer than this mlpot ({mlpot.__version__}) reads "
            f"(up to {FORMAT_VERSION}); upgrade mlpot (it was written by mlpot {meta.get('mlpot_version')})"
        )
    missing = [k for k in ("kind", "species", "cutoff", "dtype") if k not in meta]
    if missing:
        raise ValueError(f"{path}: metadata lacks {missing}")
    return meta


def load(path, device: str = "cpu", dtype: Optional[torch.dtype] = None):
    """Load a deployed file: (model in eval mode on ``device``, in ``dtype`` or the file's own, metadata).

    The model is called as ``model(graph)`` and has ``model.hessian(graph)`` (TorchScript only).
    """
    meta = read_metadata(path)
    if meta.get("format", "torchscript") == "aoti":
        return _load_aoti(path, device, dtype, meta), meta
    try:
        with _quiet_torchscript():
            module = torch.jit.load(str(path), map_location=device)
    except RuntimeError as err:
        raise ValueError(f"{path} could not be loaded as a TorchScript model: {err}") from None
    module.eval()
    if dtype is not None:
        module.to(dtype)
    return module, meta


def _load_aoti(path, device: str, dtype: Optional[torch.dtype], meta: dict) -> AOTIModel:
    file_dtype = getattr(torch, meta["dtype"])
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
    return AOTIModel(runner, file_dtype, device, path)
