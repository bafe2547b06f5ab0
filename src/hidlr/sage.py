r"""SAGE: sensitivity-guided adaptive learning rate on top of AdamW or Adamax.

Reference
---------
Chen Liang, Haoming Jiang, Simiao Zuo, Pengcheng He, Xiaodong Liu, Jianfeng Gao,
Weizhu Chen, Tuo Zhao. "No Parameters Left Behind: Sensitivity Guided Adaptive Learning
Rate for Training Large Transformer Models." ICLR 2022, arXiv:2202.02664.

The arithmetic below follows the authors' released code, not a paraphrase of the paper:
repository ``cliang1453/SAGE``, file ``module/bert_optim.py`` (commit ``f4c6dc0``),
classes ``UnstructAwareAdamW`` (AdamW-SAGE) and ``UnstructAwareAdamax`` (Adamax-SAGE);
the groups it is applied to come from ``mt_dnn/model.py`` (``_get_usadam_param_groups``)
and the default ``beta3 = 0.85`` from ``scripts/train_mnli_usadamax.sh``.

Algorithm (per parameter tensor, all operations elementwise, ``t`` counts this tensor's steps)
---------------------------------------------------------------------------------------------
Sensitivity, its moving average and the local uncertainty, computed from the parameter
*before* this step changes it (groups with ``sage=True`` only)::

    I_t     = |theta_{t-1} * g_t|                            # sensitivity
    Ibar_t  = beta3 * Ibar_{t-1} + (1 - beta3) * I_t          # state "exp_avg_sensitivity"
    Ihat_t  = Ibar_t / (1 - beta3**t)   if sensitivity_bias_correction   else   Ibar_t
    U_t     = |I_t - Ihat_t|                                  # NOT averaged (see notes)
    s_t     = U_t / (Ihat_t + eps**2)                         # SAGE scale; note eps squared

With ``sage=False`` the scale is ``s_t = 1`` and no sensitivity state is kept.

``variant="adamw"`` (decoupled weight decay, torch.optim.AdamW arithmetic)::

    m_t     = beta1 * m_{t-1} + (1 - beta1) * g_t
    v_t     = beta2 * v_{t-1} + (1 - beta2) * g_t**2
    d_t     = (m_t / (1 - beta1**t)) / (sqrt(v_t) / sqrt(1 - beta2**t) + eps)
    theta_t = theta_{t-1} - lr * weight_decay * theta_{t-1} - lr * s_t * d_t

``variant="adamax"``::

    m_t     = beta1 * m_{t-1} + (1 - beta1) * g_t
    u_t     = max(beta2 * u_{t-1}, |g_t| + eps)
    d_t     = (m_t / (1 - beta1**t)) / u_t
    theta_t = theta_{t-1} - lr * s_t * (d_t + weight_decay * theta_{t-1})

So in Adamax-SAGE the weight-decay term is scaled by ``s_t`` too (the authors add it to the
update before multiplying by the sensitivity-scaled step), whereas in AdamW-SAGE it is not.
For ``sage=False`` both forms reduce to ``theta * (1 - lr * weight_decay) - lr * d_t``.

Every step is linear in the group's ``lr``: the parameter change is ``lr`` times a quantity
that does not depend on ``lr`` (HiDLR relies on this).

Choices where the authors' code, the paper's summary or our spec could be read differently
-----------------------------------------------------------------------------------------
* The uncertainty is the *instantaneous* ``|I_t - Ihat_t|``, not a moving average of it,
  and the scale is uncertainty over sensitivity with ``eps**2`` in the denominator, exactly
  as in the authors' code. (The task spec said ``(I_bar + eps)``; the code uses ``eps**2``.)
* Authors' AdamW-SAGE bias-corrects ``Ibar`` whenever Adam's bias correction is on (their
  default), their Adamax-SAGE never does. Here it is the option
  ``sensitivity_bias_correction``; its default ``None`` reproduces exactly that choice.
  With the correction, the very first step has ``Ihat_1 = I_1``, hence ``s_1 = 0``: SAGE
  parameters do not move on their first step (apart from weight decay).
* AdamW base step: the authors add ``eps`` to ``sqrt(v_t)`` before the ``sqrt(1-beta2**t)``
  correction (Hugging Face style) and apply weight decay to the *already updated* parameter.
  Here ``eps`` sits as in torch.optim.AdamW and the decay uses the parameter from before the
  step, so that ``sage=False`` equals torch.optim.AdamW exactly and the step stays linear in
  ``lr`` (the authors' order adds an ``lr**2`` cross term).
* Adamax base step: the authors' (BERT/MT-DNN) Adamax divides ``m_t`` by ``u_t + eps`` (eps a
  second time) and does not bias-correct ``m_t``. Here the base step is torch.optim.Adamax
  (bias-corrected ``m_t``, ``eps`` once, inside ``u_t``), so ``sage=False`` with
  ``weight_decay=0`` equals torch.optim.Adamax exactly. Weight decay is decoupled (torch's
  Adamax instead adds it to the gradient).
* Not reproduced: the authors' per-tensor gradient clipping (``max_grad_norm``; off in their
  MNLI script) and their built-in warm-up schedules (use a torch LR scheduler instead).

Behaviour worth knowing (consequences of the formula, checked in the tests)
--------------------------------------------------------------------------
* An entry equal to 0 has ``I = 0`` forever, so its scale is 0 and SAGE never moves it:
  do not put zero-initialised tensors (fresh biases, zero-init heads) in ``sage`` groups.
* The scale measures how much the sensitivity *fluctuates*. When ``I_t`` is nearly
  constant, as in deterministic full-batch training, ``s_t`` decays towards 0 and training
  can stall; with bias correction and an unchanged sensitivity it is exactly 0. SAGE is
  meant for mini-batch training, where the sampling noise keeps ``s_t`` of order 1.

Which parameters get SAGE
-------------------------
Each parameter group has the option ``sage`` (default ``True``). The authors apply SAGE to
the Transformer layers' linear maps (``attention.self``, ``attention.output.dense``,
``intermediate.dense``, ``output.dense``: weights and biases) and train embeddings,
LayerNorm, pooler and task head with the plain optimizer; :func:`sage_param_groups` builds
such a split from a name predicate.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from hidlr._validation import check_choice, check_float

__all__ = ["SAGE", "sage_param_groups"]

_VARIANTS = ("adamw", "adamax")


def _check_group_options(options: dict[str, Any]) -> None:
    """Validate and normalise the SAGE options of one parameter group, in place."""
    options["lr"] = check_float("lr", options["lr"], low=0.0)
    betas = options["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair of floats, got {betas!r}")
    options["betas"] = (
        check_float("betas[0]", betas[0], low=0.0, high=1.0, high_open=True),
        check_float("betas[1]", betas[1], low=0.0, high=1.0, high_open=True),
    )
    options["beta3"] = check_float("beta3", options["beta3"], low=0.0, high=1.0, high_open=True)
    options["eps"] = check_float("eps", options["eps"], low=0.0, low_open=True)
    options["weight_decay"] = check_float("weight_decay", options["weight_decay"], low=0.0)
    if not isinstance(options["variant"], str):
        raise TypeError(f"variant must be one of 'adamw', 'adamax', got {options['variant']!r}")
    check_choice("variant", options["variant"], _VARIANTS)
    sbc = options["sensitivity_bias_correction"]
    if sbc is not None and not isinstance(sbc, bool):
        raise TypeError(f"sensitivity_bias_correction must be a bool or None, got {sbc!r}")
    if not isinstance(options["sage"], bool):
        raise TypeError(f"sage must be a bool, got {options['sage']!r}")


class SAGE(torch.optim.Optimizer):
    r"""AdamW-SAGE / Adamax-SAGE (Liang et al., ICLR 2022); see the module docstring.

    Each element's step of the base optimizer is multiplied by
    ``|I - Ihat| / (Ihat + eps**2)``, where ``I = |theta * grad|`` is the element's
    sensitivity and ``Ihat`` its exponential moving average: elements whose sensitivity is
    small compared with its recent fluctuation get large steps, steadily sensitive
    (well-trained) elements get small ones.

    Args:
        params: parameters or parameter groups. Besides the options below, a group may set
            ``sage`` (bool, default ``True``); groups with ``sage=False`` take the plain
            AdamW / Adamax step.
        lr: learning rate, default ``1e-3``. The authors report that SAGE wants a learning
            rate 2 to 5 times larger than the one that works for plain AdamW / Adamax.
        betas: ``(beta1, beta2)``, default ``(0.9, 0.999)``: decay of the gradient average and
            of the squared-gradient average (adamw) or infinity norm (adamax). Each in [0, 1).
        beta3: decay of the sensitivity moving average, default ``0.85`` (authors' MNLI
            script). In [0, 1). With the authors, the most important knob after ``lr``:
            0.6 to 0.9 works depending on the task. ``beta3 = 0`` makes the scale 0 (no
            movement), larger values average over more steps and give larger scales.
        eps: Adam's epsilon, default ``1e-8``, must be > 0. It is added to the base
            optimizer's denominator, and ``eps**2`` guards the sensitivity denominator (as in
            the authors' code, whose default was ``eps = 1e-6``).
        weight_decay: decoupled weight decay, default ``0.0``; the authors used ``0.01`` on
            weight matrices and ``0`` on biases and LayerNorm. For ``"adamw"`` it is applied
            as ``theta -= lr * weight_decay * theta``; for ``"adamax"`` it is added to the
            update and scaled by the SAGE factor, as in the authors' code.
        variant: ``"adamw"`` (default) or ``"adamax"``: the base optimizer. The authors'
            example script uses Adamax-SAGE.
        sensitivity_bias_correction: divide the sensitivity average by ``1 - beta3**t``.
            Default ``None`` follows the authors: on for ``"adamw"``, off for ``"adamax"``.

    State per parameter: ``step`` (int), ``exp_avg``, ``exp_avg_sq`` (adamw) or ``exp_inf``
    (adamax), and ``exp_avg_sensitivity`` (groups with ``sage=True``). All scalars live in
    the param groups, so ``state_dict`` / ``load_state_dict`` checkpoint everything.
    Sparse and complex parameters are not supported.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        beta3: float = 0.85,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        variant: str = "adamw",
        sensitivity_bias_correction: bool | None = None,
    ) -> None:
        defaults: dict[str, Any] = {
            "lr": lr,
            "betas": betas,
            "beta3": beta3,
            "eps": eps,
            "weight_decay": weight_decay,
            "variant": variant,
            "sensitivity_bias_correction": sensitivity_bias_correction,
            "sage": True,
        }
        _check_group_options(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            _check_group_options(self.param_groups[-1])
        except (TypeError, ValueError):
            self.param_groups.pop()  # a rejected group is not kept
            raise

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("sage", True)
            group.setdefault("sensitivity_bias_correction", None)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimisation step; ``closure`` re-evaluates and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("SAGE does not support sparse gradients")
                if torch.is_complex(p):
                    raise RuntimeError("SAGE does not support complex parameters")
                self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        assert p.grad is not None
        grad = p.grad
        lr = float(group["lr"])
        beta1, beta2 = group["betas"]
        eps = float(group["eps"])
        weight_decay = float(group["weight_decay"])
        variant = group["variant"]
        use_sage = bool(group["sage"])

        state = self.state[p]
        if len(state) == 0:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            second = "exp_avg_sq" if variant == "adamw" else "exp_inf"
            state[second] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        step = state["step"]

        scale: torch.Tensor | None = None
        if use_sage:
            scale = self._sensitivity_scale(p, grad, state, group, step)

        exp_avg = state["exp_avg"]
        bias_correction1 = 1 - beta1**step

        if variant == "adamw":
            if weight_decay != 0:
                p.mul_(1 - lr * weight_decay)
            exp_avg_sq = state["exp_avg_sq"]
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            step_size = lr / bias_correction1
            bias_correction2_sqrt = (1 - beta2**step) ** 0.5
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            if scale is None:
                p.addcdiv_(exp_avg, denom, value=-step_size)
            else:
                p.addcmul_(exp_avg / denom, scale, value=-step_size)
        else:  # adamax
            exp_inf = state["exp_inf"]
            exp_avg.lerp_(grad, 1 - beta1)
            torch.maximum(exp_inf.mul_(beta2), grad.abs().add_(eps), out=exp_inf)
            if scale is None:
                if weight_decay != 0:
                    p.mul_(1 - lr * weight_decay)
                p.addcdiv_(exp_avg, exp_inf, value=-lr / bias_correction1)
            else:
                update = torch.div(exp_avg, exp_inf).div_(bias_correction1)
                if weight_decay != 0:
                    update.add_(p, alpha=weight_decay)
                p.add_(update.mul_(scale), alpha=-lr)

    @staticmethod
    def _sensitivity_scale(
        p: torch.Tensor,
        grad: torch.Tensor,
        state: dict[str, Any],
        group: dict[str, Any],
        step: int,
    ) -> torch.Tensor:
        """Update the sensitivity average and return ``|I - Ihat| / (Ihat + eps**2)``."""
        beta3 = float(group["beta3"])
        eps = float(group["eps"])
        correct = group["sensitivity_bias_correction"]
        if correct is None:
            correct = group["variant"] == "adamw"
        if "exp_avg_sensitivity" not in state:
            # Also reached when a group is switched to sage=True mid-training; the bias
            # correction then still counts this parameter's steps, not the average's.
            state["exp_avg_sensitivity"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        avg = state["exp_avg_sensitivity"]

        sensitivity = torch.mul(p, grad).abs_()
        avg.mul_(beta3).add_(sensitivity, alpha=1 - beta3)
        avg_hat = avg / (1 - beta3**step) if correct else avg
        denominator = avg_hat + eps**2
        # where the average is 0 (eps**2 underflows in float16), the entry does not move
        scale = sensitivity.sub_(avg_hat).abs_().div_(denominator)
        return torch.where(denominator > 0, scale, torch.zeros((), dtype=scale.dtype))


def sage_param_groups(
    model: nn.Module, use_sage: Callable[[str, nn.Parameter], bool]
) -> list[dict[str, Any]]:
    """Split a model's trainable parameters into a ``sage=True`` and a ``sage=False`` group.

    ``use_sage(name, param)`` decides per named parameter. Empty groups are left out. For
    the authors' BERT setting::

        blocks = ("attention.self", "attention.output.dense", "intermediate.dense",
                  "output.dense")
        groups = sage_param_groups(model, lambda n, p: any(b in n for b in blocks))

    Add further keys (``weight_decay``, ``lr``) to the returned dicts as needed.
    """
    on: list[nn.Parameter] = []
    off: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (on if use_sage(name, param) else off).append(param)
    groups: list[dict[str, Any]] = []
    if on:
        groups.append({"params": on, "sage": True})
    if off:
        groups.append({"params": off, "sage": False})
    return groups
