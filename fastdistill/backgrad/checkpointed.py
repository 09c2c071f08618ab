"""``checkpointed``: keep θ at a few checkpoints, recompute segments during the reverse pass.

The reverse step t of ALGORITHMS.md §4 needs the state at step t only (θ_t for plain GD;
θ_t and v_t for momentum, v_{t+1} being carried from the previous reverse step). ``stored``
keeps all T states; this strategy keeps at most ``max_states`` of them (*snapshots*, θ_0
included) and re-runs the inner loop forward from the nearest snapshot when a state is needed.
The forward re-runs use exactly the arithmetic of ``stored``'s forward pass, so every state,
and therefore the gradient, is bit-identical to ``stored``'s.

Schedules (``schedule=``):

* ``"uniform"`` -- snapshots every k steps (k = ⌈√T⌉ by default); a segment is recomputed once,
  its k states held while it is reversed. Peak ``⌈T/k⌉ + k − 1`` states (2√T − 1), about
  ``2T − ⌈T/k⌉`` forward steps in all.
* ``"binomial"`` -- Griewank's optimal *revolve* schedule for s snapshots. With
  ``β(s, r) = C(s + r, s)`` and r the smallest integer with ``β(s, r) ≥ T`` (so
  ``r = O(log T)`` for ``s = O(log T)`` and r ≤ 2 for ``s ≥ √(2T)``), it needs the minimal
  number of forward steps, ``r·T − β(s + 1, r − 1)`` before the reverse steps (each step is
  run at most r times), i.e. O(T log T) for O(log T) snapshots.

Memory budget: ``max_states`` (snapshots, θ_0 included; a momentum state is (θ, v)) or
``memory_budget`` (bytes, converted at P × element size per tensor). Defaults: uniform uses
k = ⌈√T⌉; binomial uses ⌈log2 T⌉ + 1 snapshots.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

from ..errors import ConfigError
from .common import InnerProblem, MetaGradient, check_finite
from .stored import (_grad, engine_stats, explicit_engine, new_accumulators, outer_grad,
                     reverse_gd_step, reverse_sgdm_step)

__all__ = ["checkpointed_strategy", "binomial_cost", "binomial_split", "repetitions",
           "uniform_segment", "SCHEDULES"]

SCHEDULES = ("binomial", "uniform")

State = Tuple[Tensor, Optional[Tensor]]  # (θ_t, v_t); v is None for plain GD


def _beta(s: int, r: int) -> int:
    """β(s, r) = C(s + r, s): the most steps s snapshots reverse with each step run ≤ r times."""
    return math.comb(s + r, s) if r >= 0 and s >= 0 else 0


def repetitions(steps: int, snapshots: int) -> int:
    """The smallest r with β(snapshots, r) ≥ steps (r = 0 for a single step)."""
    if snapshots < 1:
        raise ConfigError("the binomial schedule needs at least one snapshot")
    r = 0
    while _beta(snapshots, r) < steps:
        r += 1
    return r


def binomial_cost(steps: int, snapshots: int) -> int:
    """Minimal forward steps to reverse ``steps`` steps from one state with ``snapshots`` slots.

    ``t(l, s) = r·l − β(s + 1, r − 1)`` (Griewank & Walther, Algorithm 799), counting neither the
    reverse steps nor the extra step from θ_{T−1} to θ_T.
    """
    if steps <= 1:
        return 0
    r = repetitions(steps, snapshots)
    return r * steps - _beta(snapshots + 1, r - 1)


def binomial_split(steps: int, snapshots: int) -> int:
    """Where to place the next snapshot: advance j steps, with ``binomial_cost`` attained.

    ``j + t(l − j, s − 1) + t(j, s) = t(l, s)`` holds exactly for
    ``j ∈ [max(β(s, r−2), l − β(s−1, r)), min(β(s, r−1), l − β(s−1, r−1))]``: t(·, s) is the
    maximum of the lines ``r'·l − β(s+1, r'−1)``, so taking r for the right part and r − 1 for
    the left part bounds the sum below by t(l, s) (Pascal's rule), with equality on that range.
    We take its upper end (needs ``steps ≥ 2``, ``snapshots ≥ 2``).
    """
    l, s = steps, snapshots
    r = repetitions(l, s)
    hi = min(_beta(s, r - 1), l - _beta(s - 1, r - 1))
    lo = max(_beta(s, r - 2), l - _beta(s - 1, r))
    j = max(1, min(hi, l - 1))
    if j < lo:  # cannot happen (the range is non-empty); a guard against editing mistakes
        raise RuntimeError(f"binomial split out of range for l={l}, s={s}: {j} < {lo}")
    return j


def uniform_segment(T: int, max_states: Optional[int]) -> int:
    """Segment length k of the uniform schedule: ⌈√T⌉, or the smallest k within ``max_states``.

    The peak is ``⌈T/k⌉ + k − 1`` states (checkpoints + the rest of one segment); a smaller k
    means more checkpoints and fewer recomputed steps (``T − ⌈T/k⌉`` during the reverse pass).
    """
    if max_states is None:
        return max(1, math.isqrt(T - 1) + 1) if T > 1 else 1
    for k in range(1, T + 1):
        if -(-T // k) + k - 1 <= max_states:
            return k
    need = min(-(-T // k) + k - 1 for k in range(1, T + 1))
    raise ConfigError(f"the uniform schedule needs at least {need} stored states for T = {T}, "
                      f"the budget allows {max_states}; use schedule='binomial' (O(log T) states)")


class _Run:
    """Forward steps (the arithmetic of ``stored``), reverse steps and the accounting."""

    def __init__(self, prob: InnerProblem, outer_loss, acc: dict, need_theta0: bool, eng=None):
        self.prob, self.outer_loss, self.acc, self.need_theta0 = prob, outer_loss, acc, need_theta0
        self.eng = eng
        self.forward_steps = 0
        self.L = self.theta_T = None
        self.lam = self.dv = self.v_next = None

    def advance(self, st: State, t: int) -> State:
        """State t → state t+1, exactly as ``stored.forward_states`` computes it."""
        th, v = st
        g = _grad(self.prob, th, t, self.eng)
        self.forward_steps += 1
        if v is None:
            return th - self.prob.lrs[t].detach() * g, None
        b = self.prob.betas[t].detach()
        v = b * v - (1 - b) * g
        return th + self.prob.lrs[t].detach() * v, v

    def advance_to(self, st: State, a: int, b: int) -> State:
        for t in range(a, b):
            st = self.advance(st, t)
        return st

    def reverse(self, st: State, t: int) -> None:
        """Reverse step t given state t. Steps arrive in the order T−1, T−2, …, 0.

        Invariant: on entry ``lam`` holds ∂L/∂θ_{t+1} (and ``dv`` ∂L/∂v_{t+1}, ``v_next``
        v_{t+1}); on exit they hold the same quantities for t.
        """
        prob = self.prob
        if self.lam is None:  # the first reverse step is T−1: finish the forward pass here
            if t != prob.T - 1:
                raise RuntimeError(f"schedule error: first reverse step {t}, expected {prob.T - 1}")
            th_T, v_T = self.advance(st, t)
            check_finite(th_T, "θ_T after the inner loop")
            self.theta_T = th_T
            self.L, self.lam = outer_grad(self.outer_loss, th_T)
            self.dv, self.v_next = torch.zeros_like(self.lam), v_T
        need_hvp = self.need_theta0 or t > 0
        if prob.momentum:
            self.lam, self.dv, self.v_next = reverse_sgdm_step(
                prob, st[0], self.v_next, t, self.lam, self.dv, self.acc, need_hvp=need_hvp,
                v_prev=st[1], eng=self.eng)
        else:
            self.lam = reverse_gd_step(prob, st[0], t, self.lam, self.acc, need_hvp=need_hvp,
                                       eng=self.eng)


def _binomial(run: _Run, st0: State, T: int, snapshots: int) -> int:
    """Reverse all T steps with at most ``snapshots`` live snapshots; return the peak held.

    An explicit stack of frames ``(a, b, state_a, s)`` -- "reverse steps [a, b) given the state
    at a, with s snapshots including state_a" -- replaces recursion (depth would reach s).
    Invariant: frames are popped right to left, so leaves (single steps) are reversed in the
    order T−1, …, 0, and every state on the stack is a distinct live snapshot.
    """
    stack = [(0, T, st0, snapshots)]
    refs = {id(st0[0]): 1}  # snapshot -> number of frames holding it
    peak = 1
    while stack:
        a, b, st, s = stack.pop()
        key = id(st[0])
        refs[key] -= 1
        if b - a == 1:
            run.reverse(st, a)
        elif s == 1:  # no free slot: recompute each state from st (quadratic, as r = l − 1)
            for t in range(b - 1, a - 1, -1):
                run.reverse(run.advance_to(st, a, t), t)
        else:
            j = binomial_split(b - a, s)
            mid = run.advance_to(st, a, a + j)
            stack.append((a, a + j, st, s))
            stack.append((a + j, b, mid, s - 1))
            refs[key] += 1
            refs[id(mid[0])] = 1
        peak = max(peak, len(refs))  # st is still a key here: it was live while processed
        if not refs[key]:
            del refs[key]
    return peak


def _uniform(run: _Run, st0: State, T: int, k: int) -> int:
    """Checkpoints every k steps, then each segment recomputed once and reversed; return the peak.

    Invariant: when segment [a, b) is reversed, the checkpoints of all earlier segments are
    still held and those of later segments have been dropped.
    """
    checkpoints: List[State] = []
    st = st0
    for t in range(T):
        if t % k == 0:
            checkpoints.append(st)
        if t < T - 1:
            st = run.advance(st, t)
    peak = len(checkpoints)
    for i in range(len(checkpoints) - 1, -1, -1):
        a, b = i * k, min(T, (i + 1) * k)
        seg = [checkpoints.pop()]
        for t in range(a, b - 1):
            seg.append(run.advance(seg[-1], t))
        peak = max(peak, len(checkpoints) + len(seg))
        for t in range(b - 1, a - 1, -1):
            run.reverse(seg.pop(), t)
    return peak


def checkpointed_strategy(prob: InnerProblem, theta0: Tensor, outer_loss: Callable[[Tensor], Tensor],
                          *, need_data: bool = True, need_labels: bool = True,
                          need_theta0: bool = True, schedule: str = "binomial",
                          max_states: Optional[int] = None,
                          memory_budget: Optional[int] = None, engine: str = "auto") -> MetaGradient:
    """Meta-gradient with a bounded number of stored states; same result as ``stored``.

    Options (through ``meta_gradient(..., strategy="checkpointed", **options)``):
        schedule: ``"binomial"`` (revolve, default) or ``"uniform"`` (√T).
        max_states: snapshots held at once, θ_0 included (≥ 1).
        memory_budget: bytes for snapshots; ``max_states = budget // bytes per state``.
        engine: ``auto`` | ``autograd`` | ``lenet-explicit``, as for ``stored`` (the recomputed
            states use the same arithmetic as ``stored`` on the same engine).

    Works for plain GD and for SGD with momentum (a state is then (θ_t, v_t)).

    ``stats``: ``schedule``, ``max_states``, ``peak_states``, ``stored_bytes`` (peak snapshots ×
    bytes per state), ``forward_steps`` (all forward steps, including θ_{T−1} → θ_T),
    ``extra_forward_steps`` (beyond ``stored``'s T), ``recomputed_steps`` (T reverse-step
    recomputations + the extra forward steps), ``repetitions`` (binomial r).

    Raises:
        ConfigError: unknown schedule, a budget below one state (or below what uniform needs).

    Example::

        >>> import torch
        >>> from fastdistill.models import LeNet
        >>> from fastdistill.backgrad import meta_gradient, make_outer_loss
        >>> m = LeNet(); th0 = m.init("xavier", torch.Generator().manual_seed(0))
        >>> x = torch.randn(1, 10, 1, 28, 28); y = torch.arange(10).view(1, 10)
        >>> outer = make_outer_loss(m, torch.randn(8, 1, 28, 28), torch.arange(8))
        >>> out = meta_gradient(m, th0, x, y, torch.full((20,), 0.02), outer,
        ...                     strategy="checkpointed", schedule="binomial", max_states=3)
        >>> out.stats["peak_states"] <= 3, out.stats["repetitions"]
        (True, 3)
    """
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown checkpoint schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    T, P = prob.T, theta0.numel()
    state_bytes = P * theta0.element_size() * (2 if prob.momentum else 1)
    if max_states is not None and memory_budget is not None:
        raise ConfigError("give max_states or memory_budget, not both")
    if memory_budget is not None:
        max_states = int(memory_budget) // state_bytes
        if max_states < 1:
            raise ConfigError(f"memory_budget {memory_budget} B is below one stored state "
                              f"({state_bytes} B for P = {P})")
    if max_states is not None and (isinstance(max_states, bool) or int(max_states) != max_states
                                   or max_states < 1):
        raise ConfigError(f"max_states must be a positive integer, got {max_states!r}")
    acc = new_accumulators(prob, need_data, need_labels)
    eng = explicit_engine(prob, engine)
    run = _Run(prob, outer_loss, acc, need_theta0, eng)
    th0 = theta0.detach().clone()
    st0 = (th0, torch.zeros_like(th0) if prob.momentum else None)
    stats = {"strategy": "checkpointed", "schedule": schedule, **engine_stats(eng)}
    if schedule == "binomial":
        s = int(max_states) if max_states is not None else max(1, math.ceil(math.log2(T))) + 1
        s = min(s, T)
        peak = _binomial(run, st0, T, s)
        stats.update(max_states=s, repetitions=repetitions(T, s))
    else:
        k = uniform_segment(T, None if max_states is None else int(max_states))
        peak = _uniform(run, st0, T, k)
        stats.update(max_states=-(-T // k) + k - 1, segment=k)
    stats.update(peak_states=peak, stored_bytes=peak * state_bytes,
                 forward_steps=run.forward_steps, extra_forward_steps=run.forward_steps - T,
                 recomputed_steps=run.forward_steps)
    return MetaGradient(loss=run.L, theta_T=run.theta_T, data=acc["data"], labels=acc["labels"],
                        lrs=acc["lrs"], betas=acc["betas"],
                        theta0=run.lam if need_theta0 else None, stats=stats)
