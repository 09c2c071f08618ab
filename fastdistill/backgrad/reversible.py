"""``reversible``: exactly reversible SGD with momentum in fixed point (Maclaurin et al. 2015).

The inner loop (ALGORITHMS.md §4) is run on integers. With ``Θ = round(θ·2^R)``,
``V = round(v·2^R)`` (:class:`~fastdistill.backgrad.fixedpoint.FixedPoint`), each β_t
replaced once by a rational ``n_t/d_t`` (:func:`~fastdistill.backgrad.fixedpoint.rational_betas`)
and ``⊗`` the exact multiplication by ``n_t/d_t`` of the information buffer
(:class:`~fastdistill.backgrad.fixedpoint.InfoBuffer`), forward step t is::

    g_t     = ∇_θ ℓ(f(x̃_t; θ_t), ỹ_t)     at θ_t = Θ_t·2^-R (cast to θ_0's dtype)
    G_t     = round(float64(g_t) · (1 − n_t/d_t) · 2^R)          "(1−β) g" in fixed point
    V_{t+1} = (n_t/d_t) ⊗ V_t − G_t
    A_t     = round(float64(V_{t+1}) · α_t)                       "α v" in fixed point
    Θ_{t+1} = Θ_t + A_t

``G_t`` is a deterministic function of ``Θ_t`` and ``A_t`` of ``V_{t+1}``; both are recomputed
from the exactly recovered state with the same float64 expression and the same (α_t, n_t, d_t),
so the reverse pass subtracts exactly what the forward added::

    Θ_t = Θ_{t+1} − A_t(V_{t+1});   V_t = (n_t/d_t) ⊗⁻¹ (V_{t+1} + G_t(Θ_t))

The only lossy operation, the product by β, is made exact by the information buffer. Everything
is exact as long as ``g_t`` is recomputed bit for bit; if it is not, the buffer's spill records,
θ_0 or v_0 = 0 do not come back and :class:`ReversibilityError` is raised instead of a gradient.
What is verified is the recovery of the states: the reverse step's second evaluation (the one
whose graph gives the Hessian- and mixed-vector products) is a separate recomputation at the
verified θ_t, deterministic under the same conditions but not itself checked.

Meaning of the gradients. The trajectory is the momentum unroll with β_t → β_q,t = n_t/d_t,
θ_0 → round(θ_0·2^R)·2^-R and a rounding of at most 2^-(R+1) per coordinate per update. The
returned gradients are the exact reverse-mode gradients of the continuous unroll (ALGORITHMS.md
§4 formulas, :func:`~fastdistill.backgrad.stored.reverse_sgdm_step`) evaluated at the recovered
states, i.e. what ``stored``/``autograd`` return for that trajectory; ∂L/∂β is taken at β_q.
At the default R = 52 the rounding is at float64 round-off level.

Range: ``|θ|, |v| < 2^(61−R)`` (±512 at R = 52); leaving it raises
:class:`~fastdistill.backgrad.fixedpoint.FixedPointOverflowError` (a ``DivergenceError``).
Plain GD (β = 0) cannot be reversed this way: use ``stored`` or ``checkpointed``.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Tuple

import torch
from torch import Tensor

from .. import _backend
from ..errors import ConfigError
from .common import InnerProblem, MetaGradient, check_finite
from .fixedpoint import (FixedPoint, FixedPointOverflowError, InfoBuffer, ReversibilityError,
                         rational_betas, theory_bits_per_step)
from .stored import (_grad, engine_stats, explicit_engine, new_accumulators, outer_grad,
                     reverse_sgdm_step)

__all__ = ["reversible_strategy", "ReversibleMomentum"]


class ReversibleMomentum:
    """The fixed-point momentum unroll: :meth:`forward` once, then :meth:`reverse` step by step.

    Args:
        prob: an :class:`InnerProblem` with ``betas`` (momentum).
        theta0: θ_0, ``[P]`` float32/float64; the model is evaluated in this dtype.
        radix_bits: R (default 52): resolution 2^-R, range ``|θ|, |v| < 2^(61−R)``.
        max_denominator: largest denominator of the rational β_q (default 2^16).
        engine: how g_t is computed, as for ``stored``: ``auto`` (LeNet: the explicit engine,
            deterministic, used for the forward and the reverse alike), ``autograd``,
            ``lenet-explicit``.

    Example::

        >>> import torch
        >>> from fastdistill.models import LeNet
        >>> m = LeNet(); th0 = m.init("xavier", torch.Generator().manual_seed(0))
        >>> x = torch.randn(1, 10, 1, 28, 28); y = torch.arange(10).view(1, 10)
        >>> prob = InnerProblem(m, x, y, torch.full((5,), 0.02), torch.full((5,), 0.9))
        >>> rm = ReversibleMomentum(prob, th0)
        >>> theta_T = rm.forward()             # Θ_T, V_T and the information buffer
        >>> for t, th_t, v_t, v_next in rm.reverse():
        ...     pass                           # exact θ_t, v_t, v_{t+1} for t = T−1 … 0
        >>> torch.equal(rm.theta, rm.theta0_int), bool(rm.v.any())   # back at Θ_0, V_0 = 0
        (True, False)
    """

    def __init__(self, prob: InnerProblem, theta0: Tensor, *, radix_bits: int = 52,
                 max_denominator: int = 1 << 16, engine: str = "auto"):
        if not prob.momentum:
            raise ConfigError("the reversible strategy needs SGD with momentum (pass betas); plain "
                              "GD cannot be reversed exactly: use 'stored' or 'checkpointed'")
        if not theta0.is_floating_point():
            raise ConfigError(f"θ_0 must be a float tensor, got {theta0.dtype}")
        self.prob = prob
        self.eng = explicit_engine(prob, engine)
        self.fp = FixedPoint(radix_bits)
        self.pairs, self.beta_q = rational_betas(prob.betas.detach().cpu().tolist(), max_denominator)
        self.max_denominator = max_denominator
        self.alphas = [float(a) for a in prob.lrs.detach().to(torch.float64).cpu().tolist()]
        # (1 − β_q)·2^R as one float64 per step: the single place G_t's rounding is defined
        self.gcoef = [(d - n) / d * self.fp.scale for n, d in self.pairs]
        self.dtype = theta0.dtype
        self.theta0_int = self.fp.to_int(theta0, "θ_0")
        self.theta = self.theta0_int.clone()
        self.v = torch.zeros_like(self.theta0_int)
        self.buffer = InfoBuffer(theta0.numel(), self.pairs, device=theta0.device)
        self.t = 0

    # -- the two deterministic roundings, shared by forward and reverse ----------------------------
    def _G(self, theta: Tensor, t: int) -> Tensor:
        """G_t from θ_t as the model sees it (``float_state(Θ_t)``)."""
        g = _grad(self.prob, theta, t, self.eng)
        return self.fp.scaled_to_int(g.to(torch.float64) * self.gcoef[t], f"(1−β_{t})·g_{t}")

    def _A(self, v_int: Tensor, t: int) -> Tensor:
        return self.fp.scaled_to_int(v_int.to(torch.float64) * self.alphas[t], f"α_{t}·v_{t + 1}")

    def float_state(self, X: Tensor) -> Tensor:
        """A fixed-point state as a float tensor in θ_0's dtype."""
        return self.fp.to_float(X, self.dtype)

    @property
    def T(self) -> int:
        return self.prob.T

    def forward(self) -> Tensor:
        """Run all T steps; return θ_T (float). Raises FixedPointOverflowError on overflow."""
        if self.t != 0:
            raise RuntimeError("forward() runs once per ReversibleMomentum")
        theta, v = self.theta, self.v
        for t in range(self.T):
            n, d = self.pairs[t]
            G = self._G(self.float_state(theta), t)
            v = self.buffer.mul(v, n, d, t) - G
            self.fp.check(v, f"v_{t + 1}")
            theta = theta + self._A(v, t)
            self.fp.check(theta, f"θ_{t + 1}")
        self.theta, self.v, self.t = theta, v, self.T
        return self.float_state(theta)

    def reverse(self) -> Iterator[Tuple[int, Tensor, Tensor, Tensor]]:
        """Undo the steps one by one, yielding ``(t, θ_t, v_t, v_{t+1})`` (floats) for t = T−1 … 0.

        Loop invariant: at the top of iteration t, ``(self.theta, self.v)`` are exactly the
        forward's ``(Θ_{t+1}, V_{t+1})`` and the buffer holds the digits of steps 0 … t.
        After the last iteration it checks ``Θ_0``, ``V_0 = 0`` and an empty buffer.

        Raises:
            ReversibilityError: the recomputation was not bit-identical to the forward pass.
        """
        if self.t != self.T:
            raise RuntimeError("reverse() needs a completed forward() and runs once")
        theta, v = self.theta, self.v
        v_next_f = self.float_state(v)
        try:
            for t in range(self.T - 1, -1, -1):
                n, d = self.pairs[t]
                theta = theta - self._A(v, t)
                theta_f = self.float_state(theta)
                v = self.buffer.unmul(v + self._G(theta_f, t), n, d, t)
                self.theta, self.v, self.t = theta, v, t
                v_f = self.float_state(v)
                yield t, theta_f, v_f, v_next_f
                v_next_f = v_f
        except FixedPointOverflowError as e:
            raise ReversibilityError(f"the reverse pass left the forward's fixed-point range at "
                                     f"step {t} ({e}); the recomputed gradients are not the "
                                     "forward's") from e
        self.check_start()

    def check_start(self) -> None:
        """Raise ReversibilityError unless the state is exactly (Θ_0, 0) with an empty buffer."""
        if not torch.equal(self.theta, self.theta0_int) or bool((self.v != 0).any()):
            off = int((self.theta != self.theta0_int).sum()) + int((self.v != 0).sum())
            raise ReversibilityError(
                f"the reverse pass did not land on θ_0 and v_0 = 0 ({off} coordinates differ): the "
                "recomputed gradients were not bit-identical to the forward's (non-deterministic "
                "kernels, a different batch order or unreplayed random augmentation); "
                "refusing to return a wrong meta-gradient")
        self.buffer.assert_empty()


def reversible_strategy(prob: InnerProblem, theta0: Tensor, outer_loss: Callable[[Tensor], Tensor],
                        *, need_data: bool = True, need_labels: bool = True,
                        need_theta0: bool = True, radix_bits: int = 52,
                        max_denominator: int = 1 << 16, engine: str = "auto") -> MetaGradient:
    """Meta-gradient of the momentum unroll with O(P) state + the information buffer.

    Options (through ``meta_gradient(..., strategy="reversible", **options)``):
        radix_bits: R, fixed-point resolution 2^-R and range ``|θ|, |v| < 2^(61−R)``.
        max_denominator: β_t is rounded to the nearest ``n/d`` with ``d ≤ max_denominator``.
        engine: ``auto`` | ``autograd`` | ``lenet-explicit`` (:class:`ReversibleMomentum`).

    ``stats``: ``info_buffer_bytes`` (spilled words + records + live words, at its peak after the
    forward pass), ``info_bits_per_param_step`` (measured) next to ``info_bits_theory``
    (mean ``log2(d_t/n_t)``), ``spilled_words``, ``info_buffer_backend`` (which backend ran the
    fused :func:`~fastdistill.ops.fixedpoint_mul.fixedpoint_mul` step), ``radix_bits``,
    ``fixed_point_range``, ``beta_rounding`` (max ``|β − β_q|``), ``theta0_rounding`` (max ``|θ_0 − Θ_0·2^-R|``);
    ``stored_bytes`` adds the int64 Θ, V (16·P bytes) to the buffer.

    Raises:
        ConfigError: no betas, or β/options out of range.
        FixedPointOverflowError: θ or v left the fixed-point range (a ``DivergenceError``).
        ReversibilityError: the reverse pass did not retrace the forward pass exactly.

    Example::

        >>> import torch
        >>> from fastdistill.models import LeNet
        >>> from fastdistill.backgrad import meta_gradient, make_outer_loss
        >>> m = LeNet(); th0 = m.init("xavier", torch.Generator().manual_seed(0))
        >>> x = torch.randn(1, 10, 1, 28, 28); y = torch.arange(10).view(1, 10)
        >>> outer = make_outer_loss(m, torch.randn(8, 1, 28, 28), torch.arange(8))
        >>> out = meta_gradient(m, th0, x, y, torch.full((20,), 0.02), outer,
        ...                     betas=torch.full((20,), 0.9), strategy="reversible")
        >>> round(out.stats["info_bits_theory"], 3)   # log2(10/9) bits per parameter per step
        0.152
    """
    rm = ReversibleMomentum(prob, theta0, radix_bits=radix_bits, max_denominator=max_denominator,
                            engine=engine)
    theta_T = rm.forward()
    check_finite(theta_T, "θ_T after the inner loop")
    P, T = theta0.numel(), prob.T
    buffer_bytes, bits = rm.buffer.nbytes, rm.buffer.bits_used()
    spilled = rm.buffer.spilled_words
    step_op = _backend.last_used("fixedpoint_mul")  # the fused buffer step of the forward pass
    L, lam = outer_grad(outer_loss, theta_T)
    probq = dataclasses.replace(prob, betas=torch.tensor(rm.beta_q, dtype=prob.betas.dtype,
                                                         device=prob.betas.device))
    acc = new_accumulators(probq, need_data, need_labels)
    dth, dv = lam, torch.zeros_like(lam)
    for t, th_t, v_t, v_next in rm.reverse():
        # here dth = ∂L/∂θ_{t+1}, dv = ∂L/∂v_{t+1}; th_t, v_t, v_next are the exact θ_t, v_t, v_{t+1}
        dth, dv, _ = reverse_sgdm_step(probq, th_t, v_next, t, dth, dv, acc,
                                       need_hvp=need_theta0 or t > 0, v_prev=v_t, eng=rm.eng)
    raw = prob.betas.detach().to(torch.float64).cpu()
    stats = {
        "strategy": "reversible", **engine_stats(rm.eng), "stored_bytes": buffer_bytes + 16 * P,
        "recomputed_steps": T, "gradient_evaluations": 3 * T,
        "info_buffer_bytes": buffer_bytes, "spilled_words": spilled,
        "info_bits_per_param_step": bits / (P * T),
        "info_bits_theory": theory_bits_per_step(rm.pairs),
        "info_buffer_backend": step_op.backend if step_op is not None else None,
        "radix_bits": radix_bits, "fixed_point_range": rm.fp.max_abs,
        "max_denominator": max_denominator,
        "beta_rounding": float((raw - torch.tensor(rm.beta_q, dtype=torch.float64)).abs().max()),
        "theta0_rounding": float((theta0.detach().to(torch.float64)
                                  - rm.theta0_int.to(torch.float64) / rm.fp.scale).abs().max()),
    }
    return MetaGradient(loss=L, theta_T=theta_T, data=acc["data"], labels=acc["labels"],
                        lrs=acc["lrs"], betas=acc["betas"], theta0=dth if need_theta0 else None,
                        stats=stats)

