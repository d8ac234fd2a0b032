"""Drop-in conversion of an existing network's residual stages into Momentum ResNet stages.

``mode.convert(model, ["layer1", "layer2", "layer3", "layer4"])`` returns a deep copy of
``model`` in which each named stage (an ``nn.Sequential`` or ``nn.ModuleList`` of residual
blocks ``B_0, ..., B_{K-1}``) runs the Momentum ResNet rule of DESIGN.md section 1,

    v_{n+1} = gamma v_n + (1 - gamma) f_n(x_n),      x_{n+1} = x_n + v_{n+1},      v_0 = 0,

with ``f_n(x) = B_n(x) - x`` (``is_residual=False``: the blocks already add their input, as
torchvision's and ``nn.Transformer``'s do) or ``f_n(x) = B_n(x)`` (``is_residual=True``). With
``keep_first_layer=True`` the first block of every stage runs as it is (it usually changes the
shape: stride, channels), and the momentum rule covers the others. With the memory-saving
backprop (``reversible=True``) that kept block is recomputed in the backward pass
(``torch.utils.checkpoint``, with its BatchNorm running statistics frozen during the
recomputation and the forward's RNG state replayed): it keeps only its input, which the previous
stage holds anyway, instead of all its activations (``recompute_first_layer=False`` keeps them).
The blocks are the copied modules themselves: trained weights carry over for fine-tuning, and
``gamma = 0`` reproduces the original network (``x_{n+1} = x_n + (B_n(x_n) - x_n)``, equal to
round-off, in train and eval mode).

``gamma = 0`` is a plain ResNet, which has no inverse: the converted stages then run plain
autograd whatever ``reversible`` says (``exact=True`` with ``gamma = 0`` is an error).

``torch.nn.TransformerEncoder`` / ``TransformerDecoder`` read attributes of their first layer
(``self.layers[0].self_attn.batch_first`` ...) and loop over ``self.layers`` themselves, so a
stage cannot simply take the place of their ``layers``. Converting ``"encoder.layers"`` (or
``"encoder"``) replaces the encoder by a :class:`MomentumTransformerEncoder` that calls the
momentum stage with ``src_mask``, ``src_key_padding_mask`` and ``is_causal``; the decoder becomes
a :class:`MomentumTransformerDecoder` passing ``memory`` (which receives gradients), the masks and
the causal hints. Their ``layers`` is the stage, which still indexes like the original list
(``layers[0].self_attn`` is the first layer).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .conventions import check_gamma
from .networks.momentum import MomentumResNet

__all__ = [
    "convert",
    "MomentumStage",
    "MomentumTransformerEncoder",
    "MomentumTransformerDecoder",
]


def _gamma_value(gamma: float | torch.Tensor) -> float:
    return float(gamma.detach()) if isinstance(gamma, torch.Tensor) else float(gamma)


class _CallSpec:
    """How the extra arguments of a stage call are laid out: ``n`` positional, then keywords."""

    __slots__ = ("n", "names")

    def __init__(self, n: int, names: tuple[str, ...]):
        self.n = n
        self.names = names

    def __repr__(self) -> str:
        return f"_CallSpec(n={self.n}, names={self.names})"


class _Residual(nn.Module):
    """The residual function of a block: ``f(x) = B(x) - x`` (or ``B(x)`` if ``is_residual``).

    Called by the momentum engine as ``f(x, spec, *values)``: the block receives the stage's
    positional and keyword arguments unchanged.
    """

    def __init__(self, block: nn.Module, is_residual: bool, where: str,
                 no_mha_fastpath: bool = False):
        super().__init__()
        self.block = block
        self.is_residual = is_residual
        self.where = where
        self.no_mha_fastpath = no_mha_fastpath

    def _call_block(self, x: torch.Tensor, spec: _CallSpec, values: tuple) -> torch.Tensor:
        args = values[: spec.n]
        kwargs = dict(zip(spec.names, values[spec.n:]))
        mha = getattr(torch.backends, "mha", None)
        if not self.no_mha_fastpath or not hasattr(mha, "set_fastpath_enabled"):
            return self.block(x, *args, **kwargs)
        # The attention fast path is taken only when autograd is off; the reversible engine
        # runs its forward without autograd and recomputes with it, so both must use the same
        # (standard) kernels to reconstruct the same values.
        previous = mha.get_fastpath_enabled()
        mha.set_fastpath_enabled(False)
        try:
            return self.block(x, *args, **kwargs)
        finally:
            mha.set_fastpath_enabled(previous)

    def forward(self, x: torch.Tensor, spec: _CallSpec, *values) -> torch.Tensor:
        out = self._call_block(x, spec, values)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"{self.where} ({type(self.block).__name__}) maps an input of shape "
                f"{tuple(x.shape)} to {shape}: a momentum layer needs blocks that keep the "
                f"shape. Keep a shape-changing first block with keep_first_layer=True; other "
                f"blocks of a stage must not change the shape"
            )
        return out if self.is_residual else out - x

    def extra_repr(self) -> str:
        return "f(x) = block(x)" if self.is_residual else "f(x) = block(x) - x"


@contextmanager
def _frozen_running_stats(module: nn.Module):
    """Batch statistics as in training, but the running statistics end as they began (a
    recomputation must not count the same batch twice). They are restored rather than switched
    off, so that the recomputation runs the very operations of the forward pass."""
    saved = [(m, [(b, b.clone()) for b in (m.running_mean, m.running_var, m.num_batches_tracked)
                  if b is not None])
             for m in module.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
             and m.track_running_stats]
    try:
        yield
    finally:
        with torch.no_grad():
            for _, buffers in saved:
                for b, value in buffers:
                    b.copy_(value)


@contextmanager
def _as_in_forward(block: nn.Module, flags: list[tuple[nn.Module, bool]]):
    """The recomputation of ``block`` with the training flags its forward had (a model
    switched to eval between forward and backward) and frozen running statistics."""
    now = [(m, m.training) for m, _ in flags]
    try:
        for m, flag in flags:
            m.training = flag
        with _frozen_running_stats(block):
            yield
    finally:
        for m, flag in now:
            m.training = flag


@torch._disable_dynamo  # dynamo cannot trace checkpoint's context_fn: a graph break, eager
def _recomputed(block: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """``block(x, *args, **kwargs)``, keeping only its inputs for the backward pass, which runs
    it again (same RNG state, the forward's training flags, frozen running statistics) to
    back-propagate through it. Under ``torch.compile`` it runs eagerly (dynamo cannot trace
    ``context_fn``)."""
    flags = [(m, m.training) for m in block.modules()]
    return checkpoint(block, x, *args, use_reentrant=False, preserve_rng_state=True,
                      context_fn=lambda: (nullcontext(), _as_in_forward(block, flags)), **kwargs)


class MomentumStage(nn.Module):
    """A stage of residual blocks run as a Momentum ResNet (see the module docstring).

    ``stage(x, *args, **kwargs)``: the kept first block (if any) gets ``x`` and every argument;
    then the momentum layers run from ``(x, v_0 = 0)`` and every block receives the same extra
    arguments. Returns ``x_N`` (the shape of the kept block's output). ``len(stage)``,
    ``stage[i]`` and iteration give the original blocks, in order.

    Parameters
    ----------
    blocks : sequence of nn.Module
    gamma : float or 0-dim tensor in [0, 1]
    keep_first_layer, is_residual, reversible, exact, recompute_first_layer : as in
        :func:`convert`.
    name : the stage's path, for messages.
    """

    def __init__(self, blocks: Sequence[nn.Module], gamma: float | torch.Tensor, *,
                 keep_first_layer: bool = True, is_residual: bool = False,
                 reversible: bool = True, exact: bool = False, name: str = "stage",
                 no_mha_fastpath: bool = False, recompute_first_layer: bool | None = None):
        super().__init__()
        blocks = list(blocks)
        if not blocks:
            raise ValueError(f"stage {name!r} has no blocks to convert")
        check_gamma(gamma)
        if _gamma_value(gamma) == 0.0:
            if exact:
                raise ValueError(
                    "exact=True needs an invertible stage, but gamma = 0 is a plain ResNet; use "
                    "gamma in (0, 1] or exact=False"
                )
            reversible = False  # gamma = 0 has no inverse: plain autograd (documented)
        self.name = name
        self.first = blocks[0] if keep_first_layer else None
        self.recompute_first_layer = (reversible if recompute_first_layer is None
                                      else bool(recompute_first_layer))
        rest = blocks[1:] if keep_first_layer else blocks
        offset = 1 if keep_first_layer else 0
        if rest:
            functions = [
                _Residual(b, is_residual, f"block {i + offset} of stage {name!r}", no_mha_fastpath)
                for i, b in enumerate(rest)
            ]
            self.momentum = MomentumResNet(functions, gamma, reversible=reversible, exact=exact)
        else:
            self.momentum = None

    def blocks(self) -> list[nn.Module]:
        """The original blocks, in order."""
        out = [] if self.first is None else [self.first]
        if self.momentum is not None:
            out += [f.block for f in self.momentum.functions]
        return out

    def __len__(self) -> int:
        return len(self.blocks())

    def __getitem__(self, index: int) -> nn.Module:
        return self.blocks()[index]

    def __iter__(self):
        return iter(self.blocks())

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.first is not None:
            if self.recompute_first_layer and torch.is_grad_enabled():
                x = _recomputed(self.first, x, args, kwargs)
            else:
                x = self.first(x, *args, **kwargs)
        if self.momentum is None:
            return x
        spec = _CallSpec(len(args), tuple(kwargs))
        return self.momentum(x, spec, *args, *kwargs.values())

    def extra_repr(self) -> str:
        kept = "first block kept" if self.first is not None else "all blocks converted"
        return f"name={self.name!r}, {kept}"


# --------------------------------------------------------------------------------------------
# nn.TransformerEncoder / nn.TransformerDecoder


def _seq_len(x: torch.Tensor, batch_first: bool) -> int:
    if x.dim() == 2:  # unbatched (S, E)
        return x.size(0)
    return x.size(1 if batch_first else 0)


def _float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask as an additive float mask (``-inf`` where True), as torch's layers do."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, -torch.inf)


def _causal_hint(mask: torch.Tensor | None, hint: bool | None, size: int) -> bool:
    """``hint`` if given, else whether ``mask`` is the square subsequent mask of ``size``."""
    if hint is not None:
        return bool(hint)
    if mask is None:
        return False
    causal = nn.Transformer.generate_square_subsequent_mask(size, device=mask.device,
                                                            dtype=mask.dtype)
    return mask.shape == causal.shape and bool((mask == causal).all())


def _batch_first(stage: MomentumStage) -> bool:
    attn = getattr(stage[0], "self_attn", None)
    return bool(getattr(attn, "batch_first", False))


class MomentumTransformerEncoder(nn.Module):
    """``nn.TransformerEncoder`` whose layers run as a momentum stage.

    ``forward(src, mask=None, src_key_padding_mask=None, is_causal=None)`` as in torch: masks
    (boolean or additive float) and the causal hint go to every layer, then ``norm``.
    The nested-tensor inference path of torch's encoder is not used (with it, torch returns
    zeros at padded positions; here they hold whatever the layers compute there).
    """

    def __init__(self, encoder: nn.TransformerEncoder, stage: MomentumStage):
        super().__init__()
        self.layers = stage
        self.norm = encoder.norm
        self.num_layers = len(stage)
        self.batch_first = _batch_first(stage)

    def forward(self, src: torch.Tensor, mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None,
                is_causal: bool | None = None) -> torch.Tensor:
        mask = _float_mask(mask, src.dtype)
        src_key_padding_mask = _float_mask(src_key_padding_mask, src.dtype)
        is_causal = _causal_hint(mask, is_causal, _seq_len(src, self.batch_first))
        out = self.layers(src, src_mask=mask, src_key_padding_mask=src_key_padding_mask,
                          is_causal=is_causal)
        return out if self.norm is None else self.norm(out)


class MomentumTransformerDecoder(nn.Module):
    """``nn.TransformerDecoder`` whose layers run as a momentum stage.

    ``forward(tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
    memory_key_padding_mask=None, tgt_is_causal=None, memory_is_causal=False)`` as in torch;
    ``memory`` and the masks go to every layer (``memory`` receives gradients), then ``norm``.
    """

    def __init__(self, decoder: nn.TransformerDecoder, stage: MomentumStage):
        super().__init__()
        self.layers = stage
        self.norm = decoder.norm
        self.num_layers = len(stage)
        self.batch_first = _batch_first(stage)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor,
                tgt_mask: torch.Tensor | None = None, memory_mask: torch.Tensor | None = None,
                tgt_key_padding_mask: torch.Tensor | None = None,
                memory_key_padding_mask: torch.Tensor | None = None,
                tgt_is_causal: bool | None = None,
                memory_is_causal: bool = False) -> torch.Tensor:
        tgt_is_causal = _causal_hint(tgt_mask, tgt_is_causal, _seq_len(tgt, self.batch_first))
        out = self.layers(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                          tgt_key_padding_mask=tgt_key_padding_mask,
                          memory_key_padding_mask=memory_key_padding_mask,
                          tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal)
        return out if self.norm is None else self.norm(out)


# --------------------------------------------------------------------------------------------
# the conversion


def _stage_paths(model: nn.Module) -> list[str]:
    """Paths of the containers that ``convert`` accepts, for error messages."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Sequential | nn.ModuleList | nn.TransformerEncoder
                      | nn.TransformerDecoder) and len(list(m.children())):
            out.append(repr(name) if name else "'' (the model itself)")
    return out


def _changes_shape(block: nn.Module) -> str | None:
    """A reason to believe ``block`` changes its input's shape, read from its structure."""
    if getattr(block, "downsample", None) is not None:
        return "it has a downsample branch"
    stride = getattr(block, "stride", 1)
    strides = stride if isinstance(stride, tuple | list) else (stride,)
    if isinstance(stride, int | tuple | list) and any(s != 1 for s in strides):
        return f"its stride is {stride}"
    return None


def _check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def convert(model: nn.Module, residual_layers: Sequence[str] | str, *,
            gamma: float | torch.Tensor = 0.9, keep_first_layer: bool = True,
            is_residual: bool = False, reversible: bool = True,
            exact: bool = False, recompute_first_layer: bool | None = None) -> nn.Module:
    """Convert the named residual stages of ``model`` into Momentum ResNet stages.

    Parameters
    ----------
    model : nn.Module
        Not modified: a deep copy is converted and returned.
    residual_layers : str or sequence of str
        Dotted paths of the stages: ``nn.Sequential`` or ``nn.ModuleList`` of blocks, e.g.
        ``["layer1", "layer2", "layer3", "layer4"]`` (torchvision-style ResNet) or
        ``["encoder.layers", "decoder.layers"]`` (``nn.Transformer``; ``"encoder"`` works too).
    gamma : float or 0-dim tensor in [0, 1]
        Momentum. ``0`` reproduces the original (plain autograd, whatever ``reversible``).
    keep_first_layer : bool
        Run the first block of every stage as it is, whether or not it changes the shape (as
        the first block of torchvision's ``layer2`` .. ``layer4`` does); ``False`` converts every
        block, and a block that changes the shape is then an error.
    is_residual : bool
        ``False``: each block computes ``x + f(x)`` and ``f(x) = block(x) - x``. ``True``: the
        block is ``f`` itself.
    reversible, exact : bool
        As in :class:`~mode.MomentumResNet` (memory-saving backprop, bit-exact reconstruction).
    recompute_first_layer : bool or None
        Recompute the kept first block of every stage in the backward pass instead of storing
        its activations (``torch.utils.checkpoint``; same gradients, one more evaluation of
        that block). ``None`` (default): whenever ``reversible`` (the memory-saving mode).

    Returns
    -------
    nn.Module
        The converted copy; each stage is a :class:`MomentumStage` (an encoder / decoder of
        ``nn.Transformer`` becomes a :class:`MomentumTransformerEncoder` / ``...Decoder``). Its
        parameters are the original ones, in the same order; their ``state_dict`` keys gain the
        stage's structure (``layer1.momentum.functions.0.block.conv1.weight`` for
        ``layer1.1.conv1.weight``), so convert a trained model rather than load a state dict
        into a converted one.

    Raises
    ------
    ValueError
        An unknown path (the message lists the convertible ones), overlapping or repeated
        paths, a stage whose blocks change the shape where momentum layers must keep it,
        ``gamma`` outside [0, 1], ``exact=True`` with ``gamma = 0`` or ``reversible=False``.
    TypeError
        A path naming a module that is not a container of blocks, or arguments of wrong type.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(residual_layers, str):
        residual_layers = [residual_layers]
    try:
        paths = list(residual_layers)
    except TypeError:
        raise TypeError("residual_layers must be a dotted path or a sequence of dotted paths, "
                        f"got {type(residual_layers).__name__}") from None
    if not paths:
        raise ValueError("residual_layers must name at least one stage, got none")
    for p in paths:
        if not isinstance(p, str):
            raise TypeError(f"residual_layers must contain strings, got {p!r}")
    if len(set(paths)) != len(paths):
        raise ValueError(f"residual_layers names a stage twice: {paths}")
    for a in paths:
        for b in paths:
            if a != b and (a == "" or b.startswith(a + ".")):
                raise ValueError(f"residual_layers overlap: {a!r} contains {b!r}")
    check_gamma(gamma)
    for name, flag in (("keep_first_layer", keep_first_layer), ("is_residual", is_residual),
                       ("reversible", reversible), ("exact", exact)):
        _check_bool(flag, name)
    if recompute_first_layer is not None:
        _check_bool(recompute_first_layer, "recompute_first_layer")
    if exact and not reversible:
        raise ValueError("exact=True needs reversible=True: exact arithmetic serves "
                         "reconstruction, which only the reversible engine performs")

    new = copy.deepcopy(model)
    known = {name for name, _ in new.named_modules()}
    for path in paths:
        if path not in known:
            raise ValueError(
                f"residual_layers: no module at path {path!r}. Convertible stages of this "
                f"model: {', '.join(_stage_paths(new)) or 'none'}"
            )
    replacements = []
    for path in paths:
        module = new.get_submodule(path)
        parent_path, _, attr = path.rpartition(".")
        parent = new.get_submodule(parent_path) if path else None
        transformer = None
        if isinstance(module, nn.TransformerEncoder | nn.TransformerDecoder):
            transformer, container, target = module, module.layers, path
        elif isinstance(parent, nn.TransformerEncoder | nn.TransformerDecoder) and attr == "layers":
            transformer, container, target = parent, module, parent_path
        elif isinstance(module, nn.Sequential | nn.ModuleList):
            container, target = module, path
        else:
            raise TypeError(
                f"residual_layers: {path!r} is a {type(module).__name__}, not a stage of blocks "
                f"(nn.Sequential, nn.ModuleList, or the layers of nn.TransformerEncoder / "
                f"nn.TransformerDecoder). Convertible stages: {', '.join(_stage_paths(new))}"
            )
        blocks = list(container.children())
        if not blocks:
            raise ValueError(f"residual_layers: stage {path!r} has no blocks")
        first = 1 if keep_first_layer else 0
        for i, block in enumerate(blocks[first:], start=first):
            reason = _changes_shape(block)
            if reason is not None:
                hint = (" (only the first block of a stage may change the shape, with "
                        "keep_first_layer=True)" if i or keep_first_layer
                        else "; use keep_first_layer=True to keep it as it is")
                raise ValueError(
                    f"stage {path!r}: block {i} ({type(block).__name__}) changes the shape of "
                    f"its input ({reason}), but a momentum layer needs f(x) of x's shape{hint}"
                )
        stage = MomentumStage(blocks, gamma, keep_first_layer=keep_first_layer,
                              is_residual=is_residual, reversible=reversible, exact=exact,
                              name=path, no_mha_fastpath=transformer is not None,
                              recompute_first_layer=recompute_first_layer)
        if isinstance(transformer, nn.TransformerEncoder):
            stage = MomentumTransformerEncoder(transformer, stage)
        elif isinstance(transformer, nn.TransformerDecoder):
            stage = MomentumTransformerDecoder(transformer, stage)
        elif isinstance(container, nn.ModuleList):
            # A ModuleList has no forward: its owner loops over it. A one-element list holding
            # the stage makes that loop run the stage once, with the owner's arguments.
            stage = nn.ModuleList([stage])
        replacements.append((target, stage))

    for target, stage in replacements:
        if target == "":
            new = stage
            continue
        parent_path, _, attr = target.rpartition(".")
        setattr(new.get_submodule(parent_path), attr, stage)
    return new
