"""One group per output unit: :class:`UnitSplitLinear` and the helpers that swap it in and out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from hidlr._validation import check_int
from hidlr.groups._common import (
    ModuleRef,
    ParamGroups,
    _check_model,
    _id_names,
    _listing,
    _reject,
    _resolve_module,
    _with_rest,
)


class UnitSplitLinear(nn.Module):
    """``nn.Linear`` with one Parameter per output unit, so each unit can have its own rate.

    Torch optimizers give a rate per tensor, so a ``(out, in)`` layer cannot have ``out``
    rates. This module holds ``unit<i>_weight`` of shape ``(1, in)`` (row ``i`` of
    ``weight``) and ``unit<i>_bias`` of shape ``(1,)``, copied from the tensors given, and
    computes exactly ``nn.Linear``'s function: ``forward`` concatenates the rows and calls
    ``F.linear``, so outputs are bitwise equal to the original layer's and each unit's
    gradient is its row of the original gradient. ``weight`` and ``bias`` are read-only
    properties (the concatenations). The ``state_dict`` has ``nn.Linear``'s keys and
    shapes (``weight``, ``bias``), so checkpoints move freely between split and plain models.

    A unit requires grad when the tensor it comes from does (or is not an ``nn.Parameter``).
    Usually built by :func:`split_output_units`, which also puts it into the model.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if not isinstance(weight, torch.Tensor):
            _reject("weight", "a tensor", type(weight).__name__, TypeError)
        if weight.ndim != 2 or 0 in weight.shape:
            _reject("weight", "a non-empty 2-d tensor", tuple(weight.shape))
        self.out_features, self.in_features = (int(n) for n in weight.shape)
        if bias is not None and not isinstance(bias, torch.Tensor):
            _reject("bias", "None or a tensor", type(bias).__name__, TypeError)
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            _reject("bias", f"of shape ({self.out_features},)", tuple(bias.shape))
        self.has_bias = bias is not None
        for key, tensor in (("weight", weight), ("bias", bias)):
            if tensor is None:
                continue
            grad = tensor.requires_grad if isinstance(tensor, nn.Parameter) else True
            for i in range(self.out_features):
                unit = tensor.detach()[i : i + 1].clone()
                self.register_parameter(f"unit{i}_{key}", nn.Parameter(unit, requires_grad=grad))

    def _unit(self, i: int, key: str) -> nn.Parameter:
        param = self._parameters[f"unit{i}_{key}"]
        assert param is not None
        return param

    def unit_params(self, i: int) -> list[nn.Parameter]:
        """The parameters of output unit ``i``: its weight row, then its bias."""
        i = check_int("i", i, minimum=0)
        if i >= self.out_features:
            _reject("i", f"an output unit < {self.out_features}", i)
        return [self._unit(i, key) for key in ("weight", "bias")[: 1 + self.has_bias]]

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([self._unit(i, "weight") for i in range(self.out_features)])

    @property
    def bias(self) -> torch.Tensor | None:
        if not self.has_bias:
            return None
        return torch.cat([self._unit(i, "bias") for i in range(self.out_features)])

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, self.weight, self.bias)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the same values, dtype, device and ``requires_grad``."""
        first = self._unit(0, "weight")
        linear = nn.utils.skip_init(
            nn.Linear,
            self.in_features,
            self.out_features,
            self.has_bias,
            device=first.device,
            dtype=first.dtype,
        )
        with torch.no_grad():
            for key, full in (("weight", self.weight), ("bias", self.bias)):
                if full is None:
                    continue
                flags = {self._unit(i, key).requires_grad for i in range(self.out_features)}
                if len(flags) != 1:
                    raise ValueError(
                        f"cannot merge output units whose {key}s differ in requires_grad"
                    )
                target = getattr(linear, key)
                target.copy_(full)
                target.requires_grad_(flags.pop())
        return linear

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.has_bias}, one Parameter per output unit"
        )

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        with torch.set_grad_enabled(keep_vars and torch.is_grad_enabled()):
            for key, full in (("weight", self.weight), ("bias", self.bias)):
                if full is not None:
                    destination[prefix + key] = full if keep_vars else full.detach()

    def _load_from_state_dict(
        self,
        state_dict: Any,
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # nn.Linear's keys and shapes; the errors read like torch's own.
        for hook in self._load_state_dict_pre_hooks.values():
            hook(
                state_dict,
                prefix,
                local_metadata,
                strict,
                missing_keys,
                unexpected_keys,
                error_msgs,
            )
        assign = bool(local_metadata.get("assign_to_params_buffers", False))
        expected: dict[str, tuple[int, ...]] = {"weight": (self.out_features, self.in_features)}
        if self.has_bias:
            expected["bias"] = (self.out_features,)
        for key, shape in expected.items():
            full = prefix + key
            if full not in state_dict:
                missing_keys.append(full)
                continue
            value = state_dict[full]
            if not isinstance(value, torch.Tensor):
                error_msgs.append(
                    f'While copying the parameter named "{full}", expected torch.Tensor from '
                    f"checkpoint but received {type(value)}"
                )
            elif tuple(value.shape) != shape:
                error_msgs.append(
                    f"size mismatch for {full}: copying a param with shape {value.shape} from "
                    f"checkpoint, the shape in current model is {torch.Size(shape)}."
                )
            else:
                with torch.no_grad():
                    for i in range(self.out_features):
                        param = self._unit(i, key)
                        if assign:
                            new = nn.Parameter(value[i : i + 1], requires_grad=param.requires_grad)
                            self._parameters[f"unit{i}_{key}"] = new
                        else:
                            param.copy_(value[i : i + 1])
        if strict:
            unexpected_keys.extend(
                k for k in state_dict if k.startswith(prefix) and k[len(prefix) :] not in expected
            )


def _paths(model: nn.Module, module: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules(remove_duplicate=False) if m is module]


def _replace(model: nn.Module, paths: Sequence[str], new: nn.Module) -> None:
    for path in paths:
        parent, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent), attr, new)


def split_output_units(model: nn.Module, module: ModuleRef) -> UnitSplitLinear:
    """Replace the ``nn.Linear`` ``module`` (name or object) by a :class:`UnitSplitLinear`.

    The model computes exactly the same function afterwards and its ``state_dict`` keeps
    the same keys and shapes, so checkpoints saved before load into it and checkpoints saved
    after load into the unsplit model. Do this before building the optimizer (the
    parameters are new tensors), then group with :func:`by_output_unit`. Every place the
    layer is registered is replaced; hooks registered on the old layer are not carried
    over. No random numbers are drawn. Returns the new module.

    Raises ``TypeError`` if ``module`` is not an ``nn.Linear`` (or is a subclass with its
    own ``forward``), ``ValueError`` if it is the model itself or if its weight or bias is
    also registered elsewhere (tied weights cannot be split).
    """
    _check_model(model)
    name, linear = _resolve_module(model, module, "module")
    if name == "":
        _reject("module", "a submodule of the model, not the model itself", module)
    if not isinstance(linear, nn.Linear) or type(linear).forward is not nn.Linear.forward:
        _reject("module", "an nn.Linear", f"{name} ({type(linear).__name__})", TypeError)
    paths = _paths(model, linear)
    own = {id(p) for p in linear.parameters()}
    shared = [
        n
        for n, p in model.named_parameters(remove_duplicate=False)
        if id(p) in own and n.rpartition(".")[0] not in paths
    ]
    if shared:
        raise ValueError(
            f"cannot split {name!r}: its parameters are also registered as {_listing(shared)} "
            "(tied weights)"
        )
    new = UnitSplitLinear(linear.weight, linear.bias)
    _replace(model, paths, new)
    return new


def merge_output_units(model: nn.Module, module: ModuleRef) -> nn.Linear:
    """Undo :func:`split_output_units`: put a plain ``nn.Linear`` back and return it."""
    _check_model(model)
    name, split = _resolve_module(model, module, "module")
    if not isinstance(split, UnitSplitLinear) or name == "":
        _reject(
            "module", "a UnitSplitLinear submodule", f"{name} ({type(split).__name__})", TypeError
        )
    linear = split.to_linear()
    _replace(model, _paths(model, split), linear)
    return linear


def by_output_unit(model: nn.Module, module: ModuleRef, *, rest: str = "rest") -> ParamGroups:
    """One group per output unit of a split layer (``"head[0]"``, ...), then ``rest``.

    For many independent outputs that share a trunk, such as CelebA's 40 binary attributes
    on one ``512 -> 40`` head: each unit's weight row and bias get their own rate. Split the
    layer first::

        split_output_units(model, "head")
        groups = by_output_unit(model, "head", rest="trunk")

    Every unit is one more group to probe: with 40 units, use a larger ``update_every``.
    Units without trainable parameters are dropped; ``rest`` (everything else, dropped when
    empty) comes last.
    """
    _check_model(model, trainable=True)
    name, split = _resolve_module(model, module, "module")
    if not isinstance(split, UnitSplitLinear):
        if isinstance(split, nn.Linear):
            raise TypeError(
                f"module must be a UnitSplitLinear, got the nn.Linear {name!r}: call "
                f"split_output_units(model, {name!r}) first, before building the optimizer"
            )
        _reject("module", "a UnitSplitLinear", f"{name} ({type(split).__name__})", TypeError)
    id_names = _id_names(model)
    named = [
        (f"{name}[{i}]", [id_names[id(p)] for p in split.unit_params(i) if id(p) in id_names])
        for i in range(split.out_features)
    ]
    if not any(names for _, names in named):
        _reject("module", "a layer with trainable parameters", name)
    return _with_rest(model, named, rest, optional=[g for g, _ in named])
