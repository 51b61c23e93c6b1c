"""Training with a compiled energy-and-forces function (``train.compile: true``).

A force loss needs the forces' own autograd graph (double backward), which ``torch.compile`` cannot
follow directly. So the function ``(weights, graph) -> (energy, forces)`` is first traced with
``make_fx``, which writes the backward pass of the forces out as ordinary operations, and that
traced graph is then compiled by ``torch.compile`` (Inductor) with dynamic atom, edge and structure
counts. Its backward (the weight gradients of the loss) is compiled too. EGNN layers are traced in
their :func:`~mlpot.models.egnn.unrolled_products` form, which Inductor fuses better. On a CPU this
makes a training step 1.5-3x faster; the first step pays the compile time (10-90 s).

The compiled function is checked against the eager model on the first batch; if it cannot be built
(no C++ compiler, an unsupported model) or disagrees, training continues in eager mode with a warning.
Only training steps use it: evaluation, deployment and checkpoints use the model itself.
"""

import warnings
from typing import Dict, List, Optional

import torch
from torch.fx.experimental import _config as fx_config

from mlpot import keys
from mlpot.export import AOTI_INPUTS as INPUTS
from mlpot.export import EnergyAndForces, example_graph, output_disagreement
from mlpot.models.egnn import unrolled_products

# kinds whose energy-and-forces function traces with dynamic shapes (PyG's GCN normalisation has
# data-dependent shapes)
COMPILE_KINDS = ("egnn", "schnet")
# the dimension of each input (export.AOTI_INPUTS) that changes from batch to batch: atoms, edges,
# structures, pairs
DYNAMIC_DIM = (0, 0, 1, 0, 0, 0, 0, 0)


def unsupported_reason(potential) -> Optional[str]:
    """Why ``potential`` cannot be trained compiled, or None."""
    if potential.kind not in COMPILE_KINDS:
        return f"train.compile supports {', '.join(COMPILE_KINDS)}, not {potential.kind}"
    return None


class CompiledTraining:
    """Call it like the potential on a training batch: ``out = step_model(batch)`` gives energy, forces
    and node energy (and with ``virial`` the virial, for a stress loss) whose autograd graph reaches the
    potential's weights.

    In eval mode, for a batch without the pair keys, or one with a single structure, atom, edge or pair
    (a size the compiled code would be specialised to, and which Inductor cannot always build), it calls
    the potential itself.
    """

    def __init__(self, potential, verify: bool = True, virial: bool = False):
        self.potential = potential
        self.verify = verify
        self.virial = virial
        self.failed: Optional[str] = unsupported_reason(potential)
        self._function = None
        # the weights and buffers, read once at the build (walking the module tree costs ~0.2 ms a step
        # for an egnn); training updates them in place. Replacing them (``.to()``,
        # ``load_state_dict(assign=True)``) needs a new CompiledTraining.
        self._tensors: List[torch.Tensor] = []

    @property
    def active(self) -> bool:
        return self.failed is None

    def _build(self) -> None:
        from torch.fx.experimental.proxy_tensor import make_fx

        module = EnergyAndForces(self.potential, create_graph=True, virial=self.virial)
        named = [*module.named_parameters(), *module.named_buffers()]
        names = [n for n, _ in named]
        self._tensors = [t for _, t in named]

        def function(state, *inputs):
            return torch.func.functional_call(module, dict(zip(names, state)), inputs, strict=True)

        # trace on a batch whose counts are at least 2 (sizes 0 and 1 would be fixed in the trace), each
        # count its own symbol even where two happen to be equal (no "duck" sizes)
        graph = example_graph(self.potential, sizes=(7, 6, 5))
        inputs = [graph[k] for k in INPUTS]
        inputs[0] = inputs[0].clone().requires_grad_(True)
        state = [t.detach().requires_grad_(t.requires_grad) for t in self._tensors]
        with fx_config.patch(use_duck_shape=False), unrolled_products(module):
            traced = make_fx(function, tracing_mode="symbolic", _allow_non_fake_inputs=True)(state, *inputs)
        _reattach_saved_outputs(traced)
        # weights static, counts dynamic (marked on every call)
        self._function = torch.compile(traced)

    def _run(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        inputs = [batch[k] for k in INPUTS]
        inputs[0] = inputs[0].detach()
        for tensor, dim in zip(inputs, DYNAMIC_DIM):
            torch._dynamo.mark_dynamic(tensor, dim)
        # counts that happen to be equal in one batch must not be tied together in the compiled code
        # (each new coincidence would cost a recompile)
        with fx_config.patch(use_duck_shape=False):
            results = self._function(self._tensors, *inputs)
        out = dict(batch)
        out[keys.ENERGY], out[keys.FORCES], out[keys.NODE_ENERGY] = results[:3]
        if self.virial:
            out[keys.VIRIAL] = results[3]
        return out

    def _eager(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """What the potential itself gives for the batch (with the virial when asked for)."""
        if self.virial and self.potential.training:
            return self.potential.energy_and_forces(batch, True, True)
        return self.potential(batch)

    def _fall_back(self, why: str) -> None:
        self.failed = why
        self._function = None
        warnings.warn(f"train.compile: {why}; training continues in eager mode", RuntimeWarning, stacklevel=3)

    def __call__(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        if self.failed is not None or not self.potential.training or not _compilable(batch):
            return self._eager(batch)
        species = self.potential.species_index[batch[keys.ATOMIC_NUMBERS]]
        if bool((species < 0).any()):
            raise ValueError("structure contains an element this model was not trained on")
        first = self._function is None
        try:
            if first:
                self._build()
            out = self._run(batch)
        except Exception as err:  # no C++ compiler, a torch limitation: eager still trains correctly
            self._fall_back(f"compiling failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})")
            return self._eager(batch)
        if first and self.verify:
            expected = self._eager(dict(batch))
            weights = [w for w in self.potential.parameters() if w.requires_grad]
            # a second compiled evaluation for the check: a compiled backward can run only once
            problem = _disagreement(self._run(batch), expected, weights)
            if problem:
                self._fall_back(f"the compiled model disagrees with the eager one on the first batch ({problem})")
                return expected
        return out


def _reattach_saved_outputs(traced) -> None:
    """Drop the ``detach`` nodes of a traced force computation.

    Autograd's backward of an op that saves its output (sigmoid, tanh, exp, norm) reads that output,
    and ``make_fx`` records the read as ``detach(output)``. Eager double backward differentiates
    through it; the traced graph would not, and the weight gradients of a force loss would silently
    miss those terms (e.g. an EGNN's sigmoid gates). The traced region (``Potential.energy_and_forces``,
    given positions that already require gradients) detaches nothing itself, so every ``detach`` there
    is such a read.
    """
    for node in list(traced.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten.detach.default:
            node.replace_all_uses_with(node.args[0])
            traced.graph.erase_node(node)
    traced.recompile()


def _compilable(batch: Dict[str, torch.Tensor]) -> bool:
    """All inputs present and every count (structures, atoms, edges, pairs) at least 2."""
    if not all(k in batch for k in INPUTS):
        return False
    counts = (batch[keys.NUM_ATOMS].shape[0], batch[keys.POSITIONS].shape[0], batch[keys.EDGE_INDEX].shape[1],
              batch[keys.PAIR_EDGE].shape[0])
    return min(counts) >= 2


def _disagreement(out, expected, weights: List[torch.Tensor]) -> str:
    """'' when energies, forces (virials, when there) and the weight gradients of a force (and virial)
    loss agree to the dtype's precision, else what differs. Uses up ``out``'s autograd graph; keeps
    ``expected``'s."""
    forces = expected[keys.FORCES]
    rtol = 1e-7 if forces.dtype == torch.float64 else 1e-3
    problem = output_disagreement(out[keys.ENERGY], out[keys.FORCES], expected[keys.ENERGY], forces, rtol)
    if problem:
        return problem
    virial = keys.VIRIAL in expected
    if virial:
        error = float((out[keys.VIRIAL] - expected[keys.VIRIAL]).detach().abs().max())
        if not error <= rtol * (float(expected[keys.VIRIAL].detach().abs().max()) + 1e-12):
            return f"virials by {error:.2e} eV"
    gen = torch.Generator().manual_seed(0)
    probe_f = torch.randn(forces.shape, generator=gen, dtype=forces.dtype).to(forces.device)
    probe_e = torch.randn(expected[keys.ENERGY].shape, generator=gen, dtype=forces.dtype).to(forces.device)
    probe_w = torch.randn((len(probe_e), 3, 3), generator=gen, dtype=forces.dtype).to(forces.device)

    def gradients(result, retain: bool):
        loss = (result[keys.FORCES] * probe_f).sum() + (result[keys.ENERGY] * probe_e).sum()
        if virial:
            loss = loss + (result[keys.VIRIAL] * probe_w).sum()
        grads = torch.autograd.grad(loss, weights, retain_graph=retain, allow_unused=True)
        return [torch.zeros_like(w) if g is None else g for w, g in zip(weights, grads)]

    for weight, got, want in zip(weights, gradients(out, False), gradients(expected, True)):
        error = float((got - want).abs().max()) if weight.numel() else 0.0
        if not error <= rtol * (float(want.abs().max()) + 1e-12):
            return f"a weight gradient of the force loss by {error:.2e}"
    return ""
