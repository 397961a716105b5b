"""What the accelerator knows about a model: its caches across blocks (:func:`caches`) and the
routing state of one active :func:`~featdenoise.accel.layer.inference_grad` block
(:class:`BlockState`): which convolutions and BatchNorms take the fast path, and the tensors
that path derives from, whose identity and versions tell when anything changed.

A hook must see PyTorch's own tensors and a parametrized module's weight is recomputed at every
access, so a conv or BatchNorm with either runs the normal path (:meth:`BlockState.refresh`).
"""

from __future__ import annotations

import dataclasses
import weakref

import torch
from torch import nn
from torch.nn.modules import module as torch_module
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

from featdenoise.accel import onednn
from featdenoise.accel.fold import FoldCache, foldable_pairs
from featdenoise.accel.pack import ConvPacker

# Hooks PyTorch runs around every module's call (torch.nn.modules.module.register_module_*).
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


@dataclasses.dataclass
class Caches:
    """What the accelerator keeps for one model across blocks: folded weights, packed
    convolutions, and per input kind (shape without batch, dtype, device) the set of
    BatchNorm pairs whose folding was verified; ``token`` invalidates those verifications when
    a folded tensor changes. ``epoch`` counts blocks (values are compared once per block)."""

    folds: FoldCache = dataclasses.field(default_factory=FoldCache)
    packer: ConvPacker = dataclasses.field(default_factory=ConvPacker)
    verified: dict = dataclasses.field(default_factory=dict)
    token: tuple | None = None
    epoch: int = 0


# Weak keys: the caches go with the model; they hold no strong reference to any module.
_CACHES: weakref.WeakKeyDictionary[nn.Module, Caches] = weakref.WeakKeyDictionary()


def caches(model: nn.Module) -> Caches:
    """The accelerator's caches of ``model`` (created on first use)."""
    found = _CACHES.get(model)
    if found is None:
        found = _CACHES[model] = Caches()
    return found


def global_hooks() -> bool:
    """Whether a global module hook is registered (then every call runs the normal path)."""
    return any(getattr(torch_module, name, None) for name in _GLOBAL_HOOKS)


def _has_hooks(module: nn.Module) -> bool:
    """Any forward (pre-)hook or backward (pre-)hook, full or not, on ``module`` itself."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _table(module: nn.Module, name: str) -> dict:
    """The dict that holds ``module``'s tensor ``name``: read at every call, a tensor moved to
    another dict reads None there, which is a change (and the slots are made again)."""
    for table in (module._parameters, module._buffers, module.__dict__):
        if name in table:
            return table
    return {}


class BlockState:
    """The routing state of one active block on one model, read by the installed functions.

    ``mode``: None (normal path), ``"record"`` (normal path, noting which conv output each paired
    BatchNorm receives) or ``"fast"`` (folded pairs in ``fold``, packing if ``pack``)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.caches = caches(model)
        self.pairs = foldable_pairs(model)
        self.modules = list(model.modules())
        self.enabled = [True]  # a stack: a nested block may switch the fast path off
        self.pack_available = onednn.available()
        self.mode: str | None = None
        self.fold: frozenset[int] = frozenset()
        self.pack = False
        self.last_out: dict[int, torch.Tensor] = {}  # pair -> its conv's latest output
        self.counts: dict[str, list[int]] = {}
        # A subclass's own _conv_forward is left alone (routing would bypass it).
        self.convs = [m for m in self.modules if isinstance(m, nn.Conv2d)
                      and type(m)._conv_forward is nn.Conv2d._conv_forward]
        # Modules with hooks (as of hook registration serial number ``hook_serial``), and the
        # convs and BatchNorms that therefore run the normal path (ids; pairs by index).
        self.hook_serial: int | None = None
        self.hooked: frozenset[int] = frozenset()
        self.excluded: frozenset[int] = frozenset()
        self.excluded_pairs: frozenset[int] = frozenset()
        # Every tensor the fast path derives from, and what each conv call resolved to while
        # they are unchanged (a forward then costs a lookup per conv, not the checks).
        self.slots: list[tuple[dict, str]] = []  # (the dict that holds it, name)
        self.plans: dict[tuple, tuple] = {}
        self.planned_from: list = []  # the slot tensors the plans were made from (held)
        self.planned_marks: tuple | None = None
        self.refresh()

    def hooks_changed(self) -> bool:
        """Whether the set of hooked modules changed since the last call. Every registration
        draws a new ``RemovableHandle`` serial number, so while no module is hooked and the
        serial is unchanged nothing was added; once some module is, each call looks for
        removals."""
        serial = RemovableHandle.next_id
        if serial == self.hook_serial and not self.hooked:
            return False
        self.hook_serial = serial
        hooked = frozenset(id(m) for m in self.modules if _has_hooks(m))
        if hooked == self.hooked:
            return False
        self.hooked = hooked
        return True

    def refresh(self) -> None:
        """Which convs and BatchNorms take the fast path (a hooked conv is neither folded nor
        packed, a hooked BatchNorm not folded into its conv; nothing derived from a parametrized
        module's weights could be kept), and the tensors those derive from; the plans are made
        again."""
        excluded = frozenset(id(m) for m in (*self.convs, *(bn for _, bn in self.pairs))
                             if id(m) in self.hooked or parametrize.is_parametrized(m))
        self.excluded = excluded
        self.excluded_pairs = frozenset(i for i, (conv, bn) in enumerate(self.pairs)
                                        if id(conv) in excluded or id(bn) in excluded)
        slots: list[tuple[nn.Module, str]] = [
            (m, name) for m in self.convs if id(m) not in excluded for name in ("weight", "bias")]
        slots += [(bn, name) for i, (_, bn) in enumerate(self.pairs)
                  if i not in self.excluded_pairs
                  for name in ("weight", "bias", "running_mean", "running_var",
                               "num_batches_tracked")]
        self.slots = [(_table(m, name), name) for m, name in slots]
        self.planned_marks = None

    def marks(self) -> tuple[list, tuple]:
        """The slot tensors and their versions, ``requires_grad`` flags and the BatchNorms' eps
        (a train-mode BatchNorm forward bumps ``num_batches_tracked``, a slot)."""
        tensors = [table.get(name) for table, name in self.slots]
        marks = tuple(None if t is None else (t._version, t.requires_grad) for t in tensors)
        return tensors, marks + tuple(bn.eps for _, bn in self.pairs)
