"""ASE calculators for deployed mlpot models (energies in eV, forces in eV/Å, stress in eV/Å^3)."""

import warnings
from typing import List, Optional, Sequence

import numpy as np
import torch
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from mlpot import export, keys
from mlpot.data.graph import check_structure, local_positions, make_graph
from mlpot.data.neighbors import neighbor_list
from mlpot.data.statistics import composition
from mlpot.dtypes import DTYPES, dtype_of


class MLPotCalculator(Calculator):
    """Any deployed mlpot model as an ASE calculator.

    The neighbour list is built with ``cutoff + skin`` and reused until an atom has moved more than
    ``skin / 2`` (or the atoms, cell or pbc change); the models' cutoffs are smooth, so pairs beyond
    the cutoff contribute exactly zero and the skin changes no number.

    Args:
        model: path of a deployed ``.pt`` file.
        device: torch device (default ``"cpu"``).
        dtype: ``"float32"``/``"float64"`` (or a torch dtype); default the file's own.
        skin: neighbour-list skin, Å (default 0.5; 0 rebuilds every call).
        min_distance: two atoms closer than this (Å) raise a ValueError (default 0.5).
        check_pbc: raise when the structure's periodicity differs from the training data's
            (a molecular model given a periodic cell, or the reverse); default True.
        warn_close_contacts: warn once when two atoms come closer than any pair of the same
            elements in the training data (recorded in the deployed file); default True.
        warn_out_of_range: warn once each, naming the atoms, when the structure leaves the training
            data's range in another way the deployed file records (files deployed before lack the
            records and give no warning): an atom farther from its nearest neighbour than any atom of
            its element (a stretched bond, positions in bohr), an element pair within the cutoff that
            the training data never had, a composition not among the training data's; default True.
        compile: run an AOTInductor build of a TorchScript file (about 3x faster on a CPU), compiled
            on first use (a minute) and cached; see :func:`mlpot.export.compiled_copy`. Default False.
    """

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress"]
    allowed_kinds: Optional[Sequence[str]] = None

    def __init__(
        self,
        model,
        device: str = "cpu",
        dtype=None,
        skin: float = 0.5,
        min_distance: float = 0.5,
        check_pbc: bool = True,
        warn_close_contacts: bool = True,
        warn_out_of_range: bool = True,
        compile: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(dtype, str):
            dtype = dtype_of(dtype)
        if compile:
            model = export.compiled_copy(model, dtype)
        self.model, self.metadata = export.load(model, device=device, dtype=dtype)
        kind = self.metadata["kind"]
        if self.allowed_kinds is not None and kind not in self.allowed_kinds:
            raise ValueError(
                f"{type(self).__name__} needs a model of kind {' or '.join(self.allowed_kinds)}, "
                f"but {model} holds a {kind!r} model; use MLPotCalculator for any kind"
            )
        self.device = torch.device(device)
        self.dtype = dtype or DTYPES[self.metadata["dtype"]]
        self.cutoff = float(self.metadata["cutoff"])
        self.species = [int(z) for z in self.metadata["species"]]
        self.skin = float(skin)
        self.min_distance = float(min_distance)
        self.check_pbc = check_pbc
        self.periodic_model = bool(self.metadata.get("periodic", False))
        self._closest_seen = {
            tuple(int(z) for z in pair.split("-")): float(d)
            for pair, d in self.metadata.get("min_pair_distances", {}).items()
        } if warn_close_contacts else {}
        self._warned_close = False
        ranges = self.metadata if warn_out_of_range else {}
        self._farthest_seen = {int(z): float(d) for z, d in ranges.get("max_nearest_distances", {}).items()}
        # the pairs seen are those of min_pair_distances, checked only in files that record the new ranges
        self._pairs_seen = {tuple(int(z) for z in p.split("-")) for p in ranges.get("min_pair_distances", {})
                            } if self._farthest_seen else set()
        self._compositions_seen = list(ranges.get("training_compositions", []))
        self._warned = set()  # the kinds of out-of-range warning given already
        self._warm = set()  # model methods run once already
        self._graph = None
        self._graph_positions = None

    def rebuild_neighbors(self) -> None:
        """Forget the results and the neighbour list: the next call computes afresh from the positions alone
        (a checkpointed MD does this where it checkpoints, so that a resumed run gives the same bits)."""
        self.reset()
        self._graph = None

    def check_state(self, atoms, tol=1e-15):
        """What changed since the last calculation, among what the model reads (numbers, positions, cell,
        pbc), by exact comparison: ASE's tolerance-based default costs more than a small model's call."""
        old = self.atoms
        if old is None:
            return list(all_changes)
        if len(old) != len(atoms) or not np.array_equal(old.numbers, atoms.numbers):
            return list(all_changes)
        changes = []
        if not np.array_equal(old.positions, atoms.positions):
            changes.append("positions")
        if not np.array_equal(old.cell.array, atoms.cell.array):
            changes.append("cell")
        if not np.array_equal(old.pbc, atoms.pbc):
            changes.append("pbc")
        return changes

    def _needs_new_graph(self, atoms, system_changes) -> bool:
        if self._graph is None or self.skin <= 0:
            return True
        if {"numbers", "cell", "pbc"} & set(system_changes):
            return True
        moved = np.linalg.norm(atoms.positions - self._graph_positions, axis=1).max()
        return moved > 0.5 * self.skin

    def _graph_of(self, atoms, system_changes):
        if self._needs_new_graph(atoms, system_changes):
            periodic = bool(atoms.pbc.any())
            cell, pbc = (atoms.cell.array, atoms.pbc) if periodic else (None, None)
            self._graph = make_graph(
                atoms.numbers,
                atoms.positions,
                self.cutoff + max(self.skin, 0.0),
                cell=cell,
                pbc=pbc,
                dtype=self.dtype,
                device=self.device,
            )
            self._graph_positions = atoms.positions.copy()
            # the graph holds positions moved by a constant vector per atom (into the cell, then by the
            # rounded centroid); later positions reuse the list only with the same move, done in float64
            self._offset = local_positions(atoms.positions, cell, pbc) - atoms.positions
            self._edges_np = self._graph[keys.EDGE_INDEX].cpu().numpy()
            self._shift_np = self._graph[keys.SHIFT].cpu().double().numpy()
        graph = dict(self._graph)
        graph[keys.POSITIONS] = torch.as_tensor(self._local(atoms), dtype=self.dtype, device=self.device)
        return graph

    def _local(self, atoms) -> np.ndarray:
        """(N, 3) float64 positions in the frame of the current neighbour list, Å."""
        return atoms.positions + self._offset

    def _check_input(self, atoms) -> None:
        # pair distances are checked over the neighbour list (_check_distances), unless the limit exceeds it
        beyond_list = self.min_distance > self.cutoff
        check_structure(atoms.numbers, atoms.positions, self.species, self.min_distance if beyond_list else 0.0)
        periodic = bool(atoms.pbc.any())
        if periodic:  # the neighbour list's own check of the cell (zero volume, pbc without a cell), before any use
            neighbor_list(np.zeros((1, 3)), 1.0, atoms.cell.array, atoms.pbc)
        if self.check_pbc and not export.takes_pbc(self.metadata, periodic):
            trained = export.trained_on(self.metadata)
            given = f"pbc={atoms.pbc.tolist()}"
            raise ValueError(
                f"this model was trained on {trained} but the structure has {given}; "
                f"set atoms.pbc accordingly, or pass check_pbc=False to use it anyway"
            )

    def _check_distances(self, atoms, graph) -> None:
        """One pass over the neighbour list: atoms closer than ``min_distance`` raise; closer than any
        pair of the same elements in the training data warn (once)."""
        edge_index = self._edges_np
        if edge_index.shape[1] == 0:
            return
        positions = self._local(atoms)
        vec = positions[edge_index[1]] - positions[edge_index[0]] + self._shift_np
        dist = np.sqrt(np.einsum("ij,ij->i", vec, vec))
        k = int(np.argmin(dist))
        if dist[k] < self.min_distance:
            i, j = sorted(edge_index[:, k].tolist())
            raise ValueError(
                f"atoms {i} and {j} are {dist[k]:.3f} Å apart, closer than {self.min_distance} Å: the structure is unphysical"
            )
        self._check_ranges(atoms, edge_index, dist)
        if self._warned_close or not self._closest_seen:
            return
        z = np.sort(atoms.numbers[edge_index], axis=0)
        for (a, b), closest in self._closest_seen.items():
            mask = (z[0] == a) & (z[1] == b)
            if mask.any() and dist[mask].min() < closest:
                k = np.nonzero(mask)[0][np.argmin(dist[mask])]
                i, j = edge_index[:, k]
                warnings.warn(
                    f"atoms {i} and {j} are {dist[k]:.3f} Å apart, closer than any {atoms[i].symbol}-{atoms[j].symbol} "
                    f"pair in the training data ({closest:.3f} Å): the model is extrapolating (warned once)",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self._warned_close = True
                return

    def _check_ranges(self, atoms, edge_index, dist) -> None:
        """Warn (once per kind) when the structure leaves the training data's range (see ``warn_out_of_range``)."""
        if self._farthest_seen and "far" not in self._warned:
            nearest = np.full(len(atoms), np.inf)
            np.minimum.at(nearest, edge_index[0], dist)
            limit = self._nearest_limit
            beyond = np.nonzero(nearest > limit)[0]
            if len(beyond):
                k = int(beyond[np.argmax(nearest[beyond] - limit[beyond])])
                where = (f"has no neighbour within {self.cutoff + max(self.skin, 0.0):g} Å" if np.isinf(nearest[k])
                         else f"is {nearest[k]:.3f} Å from its nearest neighbour")
                self._warn("far", f"atom {k} ({atoms[k].symbol}) {where}, farther than any {atoms[k].symbol} atom in "
                                  f"the training data ({limit[k]:.3f} Å): a stretched bond, or positions not in Å?")
        if self._pairs_seen and "pair" not in self._warned:
            within = edge_index[:, dist < self.cutoff]
            z = np.sort(atoms.numbers[within], axis=0)
            for a, b in {(int(a), int(b)) for a, b in zip(*z)} - self._pairs_seen:
                k = np.nonzero((z[0] == a) & (z[1] == b))[0][0]
                i, j = sorted(within[:, k].tolist())
                self._warn("pair", f"atoms {i} and {j} are a {atoms[i].symbol}-{atoms[j].symbol} pair within the "
                                   f"cutoff, an element pair the training data never had")
                break

    def _check_composition(self, atoms) -> None:
        """Warns for a composition never seen; keeps the per-atom nearest-neighbour limits for the calls ahead."""
        self._nearest_limit = np.array([self._farthest_seen.get(int(z), np.inf) for z in atoms.numbers])
        if not self._compositions_seen or "composition" in self._warned:
            return
        formula = composition(atoms.numbers, bool(atoms.pbc.any()))
        if formula not in self._compositions_seen:
            self._warn("composition", f"the structure ({formula}, atoms 0-{len(atoms) - 1}) has a composition the "
                                      f"training data never had ({', '.join(self._compositions_seen)})")

    def _warn(self, kind: str, message: str) -> None:
        warnings.warn(f"{message}: the model is extrapolating (warned once)", RuntimeWarning, stacklevel=5)
        self._warned.add(kind)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        want_stress = "stress" in properties
        if want_stress:
            check_stress(atoms)
        if self._graph is None or {"numbers", "cell", "pbc"} & set(system_changes):
            self._check_input(atoms)  # elements, periodicity, shapes
            self._check_composition(atoms)
        else:  # only positions moved: only they need checking
            check_structure(atoms.numbers, atoms.positions, None, 0.0)
        graph = self._graph_of(atoms, system_changes)
        self._check_distances(atoms, graph)
        out = self._energy_forces_virial(graph) if want_stress else self._call("forward", graph)
        energy = float(out[keys.ENERGY].detach().sum())
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "energies": out[keys.NODE_ENERGY].detach().cpu().double().numpy(),
            "forces": out[keys.FORCES].detach().cpu().double().numpy(),
        }
        if want_stress:
            virial = out[keys.VIRIAL].detach().cpu().double().numpy()[0]
            self.results["stress"] = full_3x3_to_voigt_6_stress(-virial / atoms.get_volume())

    def _energy_forces_virial(self, graph):
        """The model's outputs with the virial (1, 3, 3) in eV."""
        method = getattr(self.model, "energy_and_forces", None)
        if method is None:
            raise PropertyNotImplementedError(
                f"this deployed file has no virial output (stress); deploy the model again in TorchScript format"
            )
        return self._call("energy_and_forces", graph, True, False, True)

    def get_hessian(self, atoms=None) -> np.ndarray:
        """(3N, 3N) Hessian d2E/dR2 in eV/Å^2 by double backward (use float64 for accuracy)."""
        atoms = atoms if atoms is not None else self.atoms
        self._check_input(atoms)
        self._check_composition(atoms)
        graph = self._graph_of(atoms, all_changes)
        self._check_distances(atoms, graph)
        return self._call("hessian", graph).detach().cpu().double().numpy()

    def _call(self, name: str, *args):
        """The model's method ``name`` on ``args``. Its first call runs twice: TorchScript's first (profiling)
        run of a method differs from the later ones in the last bits, and no number may depend on whether a
        call was the first (a resumed MD, a calculator used after another)."""
        method = self.model if name == "forward" else getattr(self.model, name)
        if name not in self._warm and isinstance(self.model, torch.jit.ScriptModule):
            method(*args)
            self._warm.add(name)
        return method(*args)


def check_stress(atoms) -> None:
    """Raise ASE's PropertyNotImplementedError unless ``atoms`` is periodic in all three directions
    (the stress of a slab or a molecule is not defined by its volume)."""
    if not atoms.pbc.all():
        raise PropertyNotImplementedError(
            f"stress needs a cell periodic in all three directions, got pbc={atoms.pbc.tolist()}"
        )


class EGNNCalculator(MLPotCalculator):
    """ASE calculator for a deployed equivariant (``egnn``) model."""

    allowed_kinds = ("egnn",)


class GNNCalculator(MLPotCalculator):
    """ASE calculator for a deployed invariant (``gcn`` or ``schnet``) model."""

    allowed_kinds = ("gcn", "schnet")


class CommitteeCalculator(Calculator):
    """Mean and spread of a committee of deployed models (e.g. the same recipe trained with different seeds).

    ``results`` hold the committee means (``energy``, ``free_energy``, ``energies``, ``forces``, and
    ``stress`` when asked for) and the standard deviations across members (``energy_std`` in eV,
    ``forces_std`` (N, 3) in eV/Å, ``stress_std`` (6,) in eV/Å^3 with the stress), a cheap
    uncertainty estimate for active learning and MD monitoring.

    Args:
        models: paths of two or more deployed files for the same elements.
        max_force_std: warn once, naming the atom, when an atom's force spread (the norm of its (3,)
            standard deviation) exceeds this, eV/Å; default None (no warning).
        **kwargs: passed to every member's :class:`MLPotCalculator` (device, dtype, skin, ...).
    """

    implemented_properties = [
        "energy", "free_energy", "energies", "forces", "stress", "energy_std", "forces_std", "stress_std"
    ]

    def __init__(self, models: Sequence, max_force_std: Optional[float] = None, **kwargs):
        super().__init__()
        self.max_force_std = max_force_std
        self._warned_spread = False
        if len(models) < 2:
            raise ValueError(f"a committee needs at least two models, got {len(models)}")
        self.members: List[MLPotCalculator] = [MLPotCalculator(m, **kwargs) for m in models]
        species = {tuple(m.species) for m in self.members}
        if len(species) > 1:
            raise ValueError(f"committee members know different elements: {sorted(species)}")
        self.dtype = self.members[0].dtype

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        want_stress = "stress" in properties or "stress_std" in properties
        wanted = ["energy", "forces"] + (["stress"] if want_stress else [])
        results = []
        for member in self.members:
            member.calculate(self.atoms, wanted, system_changes)
            results.append(member.results)
        energy = np.array([r["energy"] for r in results])
        forces = np.stack([r["forces"] for r in results])
        self.results = {
            "energy": float(energy.mean()),
            "free_energy": float(energy.mean()),
            "energies": np.mean([r["energies"] for r in results], axis=0),
            "forces": forces.mean(axis=0),
            "energy_std": float(energy.std()),
            "forces_std": forces.std(axis=0),
        }
        if self.max_force_std is not None and not self._warned_spread:
            spread = np.linalg.norm(self.results["forces_std"], axis=1)
            k = int(np.argmax(spread))
            if spread[k] > self.max_force_std:
                warnings.warn(f"the committee's force spread on atom {k} ({self.atoms[k].symbol}) is {spread[k]:.3f} "
                              f"eV/Å, above max_force_std {self.max_force_std:g} eV/Å: its members disagree, the "
                              f"structure is likely outside the training data (warned once)", RuntimeWarning,
                              stacklevel=4)
                self._warned_spread = True
        if want_stress:
            stress = np.stack([r["stress"] for r in results])
            self.results["stress"] = stress.mean(axis=0)
            self.results["stress_std"] = stress.std(axis=0)


def load_calculator(model, dtype: Optional[str] = "float64", device: str = "cpu", **kwargs) -> Calculator:
    """An ASE calculator for a deployed model file, in ``dtype`` (None: the file's own; float64 for tight work);
    ``kwargs`` go to :class:`MLPotCalculator` (skin, ...).

    A list of two or more files gives a CommitteeCalculator (mean forces, plus their spread).
    """
    if isinstance(model, (list, tuple)):
        if len(model) > 1:
            return CommitteeCalculator([str(m) for m in model], device=device, dtype=dtype, **kwargs)
        model = model[0]
    return MLPotCalculator(str(model), device=device, dtype=dtype, **kwargs)


__all__ = ["CommitteeCalculator", "EGNNCalculator", "GNNCalculator", "MLPotCalculator", "load_calculator"]
