"""Exact fixed-point arithmetic for the ``reversible`` strategy (Maclaurin, Duvenaud & Adams 2015).

Three pieces, each exactly invertible in int64:

* :class:`FixedPoint` -- a real ``x`` is stored as the integer ``X = round(x · 2^R)``
  (``R = radix_bits``). Every stored state obeys ``|X| < 2^61``, i.e. ``|x| < 2^(61−R)``
  (±512 at the default ``R = 52``, resolution ``2^-52 ≈ 2.2e-16``). The headroom of two bits
  makes the sum of two in-range integers impossible to wrap, so an addition is checked *after*
  it is done; a float is checked *before* it is converted (out-of-range float→int64
  conversion is undefined). Leaving the range raises :class:`FixedPointOverflowError`, never a
  silent wrap-around.
* :func:`rational_betas` -- every β_t is replaced once, before the forward pass, by the best
  rational approximation ``n_t / d_t`` with ``d_t ≤ max_denominator``
  (``fractions.Fraction.limit_denominator``). The forward and the reverse pass read the same
  list of integer pairs, so the rounding of β can never differ between them.
* :class:`InfoBuffer` -- multiplication by ``n/d`` on integers, made exact by saving the digits
  it destroys. For one parameter with buffer integer ``B`` (floor ``div``/``mod``, so
  ``X mod d ∈ [0, d)`` for negative ``X`` too)::

      forward  X ← X·n/d                        reverse
      e ← B mod n;   B ← B div n                  r ← B mod d;   B ← B div d
      Y ← X·n + e                                 Y ← X·d + r
      r ← Y mod d;   X ← Y div d                  e ← Y mod n;   X ← Y div n
      B ← B·d + r                                 B ← B·n + e

  The forward pops a base-n digit e into the free low digit of ``X·n`` and pushes the base-d
  digit r the division destroys; B grows by ``log2(d/n) = log2(1/β)`` bits per step. The
  result ``floor((X·n + e)/d)`` is within one unit of ``X·n/d`` (Maclaurin et al.'s Alg. 3
  divides first, ``(X div d)·n + e``, and errs by up to n units). ``X·n`` can exceed int64,
  so the product is formed in two limbs ``X = H·2^30 + L``, exact for every int64 ``X`` and
  ``n, d ≤ 2^20``. One step of this, for all P parameters and their live words at once
  (restart of the spilled words included), is the op
  :func:`~fastdistill.ops.fixedpoint_mul.fixedpoint_mul` (inverse
  :func:`~fastdistill.ops.fixedpoint_mul.fixedpoint_unmul`): a plain-PyTorch reference, a
  fused C++ kernel (``auto`` on CPU), a Triton kernel, all bitwise equal. The word stack and
  the spill records below stay here, in Python.

Chunking the unbounded integer ``B`` into int64 words. Each parameter keeps a *live word*
``c``; a full live word is *spilled* (appended to a shared int64 word stack) and replaced by a
fresh one. The reverse pass must decide, from the state alone, where the spills were:

* live words start at a floor ``F = max_t ⌈(n_t + (n_t − 1)·d_t)/(d_t − n_t)⌉`` (≥ 1), never at
  0. For ``c ≥ F``, ``(c div n)·d + r ≥ (c − n + 1)·d/n ≥ c + 1``: **every forward step
  strictly increases the live word**. So ``c == F`` *before* step t's multiplication happens
  exactly when a word starts at step t: at t = 0 (the initial word) or because the word was
  spilled at step t.
* forward step t: spill the parameters with ``c ≥ S_t`` (``S_t = n_t·((2^63 − d_t) div d_t)``:
  below it ``(c div n)·d + r`` cannot overflow), reset them to ``F``, then
  multiply. The spilled words are stored in parameter order together with ``(t, count)``.
* reverse step t > 0: divide back; the parameters whose live word is now ``F`` are exactly
  those spilled at step t; they get their words back from the top of the stack. If the count
  disagrees with the record, the recomputation was not bit-identical and
  :class:`ReversibilityError` is raised on the spot.

Storage: the spilled words (8 bytes each), the ``(t, count)`` records (16 bytes per step that
spilled) and the P live words. A spilled word carries ``log2(c/F) ≥ log2(S_t/F)`` of its 64
bits: ~56 for β = 9/10 (F = 89), ~62 for β = 1/2, ~40 for β ≈ 0.99 with a denominator near
2^16 (F ≈ 99·2^16), so the storage stays within ~1.6× of the ``log2(1/β)`` bits per parameter
per step that are destroyed for β ≤ 0.99 (a smaller ``max_denominator`` lowers F).
"""
from __future__ import annotations

import math
from array import array
from fractions import Fraction
from typing import List, Sequence, Tuple

import torch
from torch import Tensor

from ..errors import ConfigError, DivergenceError, FastDistillError
from ..ops.fixedpoint_mul import MAX_DENOMINATOR, fixedpoint_mul, fixedpoint_unmul, spill_threshold

__all__ = ["FixedPoint", "InfoBuffer", "rational_betas", "FixedPointOverflowError",
           "ReversibilityError", "STATE_LIMIT", "MAX_DENOMINATOR", "theory_bits_per_step"]

#: every stored fixed-point integer has ``|X| < STATE_LIMIT``; two such numbers add without wrap.
STATE_LIMIT = 1 << 61
_INT64_MAX = (1 << 63) - 1


class FixedPointOverflowError(DivergenceError):
    """A state or an update left the representable fixed-point range ``|x| < 2^(61−R)``."""


class ReversibilityError(FastDistillError, RuntimeError):
    """The reverse pass did not retrace the forward pass bit for bit (non-determinism)."""


class FixedPoint:
    """Reals as int64 multiples of ``2^-R``, with range checks instead of wrap-around.

    Args:
        radix_bits: R, in [1, 60]. Range ``|x| < 2^(61−R)``, resolution ``2^-R``.
    """

    def __init__(self, radix_bits: int = 52):
        if isinstance(radix_bits, bool) or not isinstance(radix_bits, int) or not 1 <= radix_bits <= 60:
            raise ConfigError(f"radix_bits must be an integer in [1, 60], got {radix_bits!r}")
        self.radix_bits = radix_bits
        self.scale = float(2 ** radix_bits)       # exact power of two in float64
        self.max_abs = float(2 ** (61 - radix_bits))

    def _hint(self) -> str:
        return (f"the fixed-point range is |x| < 2^{61 - self.radix_bits} = {self.max_abs:g} at "
                f"radix_bits={self.radix_bits}; lower radix_bits for more range (less resolution) "
                "or lower the learning rates")

    def scaled_to_int(self, y: Tensor, what: str) -> Tensor:
        """``round(y)`` as int64 for an already-scaled float64 ``y``; raises if ``|y| ≥ 2^61``."""
        lo, hi = torch.aminmax(y)  # NaN propagates, and then the test below fails
        if not (float(lo) > -STATE_LIMIT and float(hi) < STATE_LIMIT):
            bad = ~(y.abs() < STATE_LIMIT)
            worst = float(y[bad][0]) / self.scale
            raise FixedPointOverflowError(f"{what} = {worst:g} does not fit in fixed point: {self._hint()}")
        return torch.round(y).to(torch.int64)

    def to_int(self, x: Tensor, what: str) -> Tensor:
        """``X = round(x · 2^R)`` (int64) for a float tensor ``x``."""
        return self.scaled_to_int(x.detach().to(torch.float64) * self.scale, what)

    def to_float(self, X: Tensor, dtype: torch.dtype) -> Tensor:
        """``X · 2^-R`` in ``dtype`` (via float64; deterministic, so forward and reverse agree)."""
        return (X.to(torch.float64) / self.scale).to(dtype)

    def check(self, X: Tensor, what: str) -> None:
        """Raise if an int64 state has left ``|X| < 2^61`` (it cannot have wrapped: see module doc)."""
        lo, hi = torch.aminmax(X)
        if int(hi) >= STATE_LIMIT or int(lo) <= -STATE_LIMIT:
            raise FixedPointOverflowError(f"{what} left the fixed-point range: {self._hint()}")


def rational_betas(betas: Sequence[float], max_denominator: int = 1 << 16) -> Tuple[List[Tuple[int, int]], List[float]]:
    """Round every β_t to the best rational ``n_t/d_t`` with ``d_t ≤ max_denominator``.

    Returns ``(pairs, values)``: the integer pairs the fixed-point arithmetic uses and the
    float64 values ``n_t/d_t`` the reverse formulas must use (the trajectory is run with these,
    so its gradients are the gradients at ``β_q``; ``|β − β_q| ≤ 1/(d_t · max_denominator)``).

    Raises:
        ConfigError: a β outside (0, 1), or so close to 0 or 1 that it rounds to 0 or 1.
    """
    if isinstance(max_denominator, bool) or not isinstance(max_denominator, int) or not 2 <= max_denominator <= MAX_DENOMINATOR:
        raise ConfigError(f"max_denominator must be an integer in [2, 2^20], got {max_denominator!r}")
    pairs, values = [], []
    for t, b in enumerate(betas):
        b = float(b)
        if not 0.0 < b < 1.0:
            raise ConfigError(f"β_{t} = {b!r} must lie in (0, 1) for the reversible strategy")
        q = Fraction(b).limit_denominator(max_denominator)
        n, d = q.numerator, q.denominator
        if n <= 0 or n >= d:
            raise ConfigError(f"β_{t} = {b!r} rounds to {n}/{d} with denominators ≤ {max_denominator}; "
                              "raise max_denominator or keep β away from 0 and 1")
        pairs.append((n, d))
        values.append(n / d)
    return pairs, values


class _WordStack:
    """A LIFO of int64 words stored in fixed-size chunks (no reallocation of what is kept)."""

    CHUNK = 1 << 16

    def __init__(self, device):
        self.device = device
        self.chunks: List[Tensor] = []
        self.fill = 0  # words used in the last chunk
        self.size = 0

    def push(self, words: Tensor) -> None:
        k, done = words.numel(), 0
        while done < k:
            if not self.chunks or self.fill == self.CHUNK:
                self.chunks.append(torch.empty(self.CHUNK, dtype=torch.int64, device=self.device))
                self.fill = 0
            take = min(k - done, self.CHUNK - self.fill)
            self.chunks[-1][self.fill:self.fill + take] = words[done:done + take]
            self.fill += take
            done += take
        self.size += k

    def pop(self, k: int) -> Tensor:
        parts = []
        while k > 0:
            take = min(k, self.fill)
            parts.append(self.chunks[-1][self.fill - take:self.fill].clone())
            self.fill -= take
            k -= take
            self.size -= take
            if self.fill == 0:
                self.chunks.pop()
                self.fill = self.CHUNK if self.chunks else 0
        parts.reverse()
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64, device=self.device)

    @property
    def nbytes(self) -> int:
        return self.size * 8


class InfoBuffer:
    """Per-parameter information buffer for exact multiplication by rationals ``n/d < 1``.

    Args:
        numel: number of parameters P.
        pairs: every ``(n, d)`` that will be applied (fixes the floor F and spill threshold S).
        device: where the live words live.

    Use :meth:`mul` in the forward pass and :meth:`unmul` (same ``t``, ``n``, ``d``) in reverse
    order; :meth:`assert_empty` after the last ``unmul`` checks the buffer is back to its start.
    """

    def __init__(self, numel: int, pairs: Sequence[Tuple[int, int]], device=None):
        self.floor = max([1] + [-(-(n + (n - 1) * d) // (d - n)) for n, d in pairs])
        spill_min = min([_INT64_MAX] + [spill_threshold(n, d) for n, d in pairs])
        if spill_min < self.floor << 8:  # a word would carry fewer than 8 bits
            worst = max(pairs, key=lambda p: p[0] / p[1])
            raise ConfigError(f"β = {worst[0]}/{worst[1]} is too close to 1 for a 64-bit information "
                              "buffer word; lower max_denominator or keep β further from 1")
        self.live = torch.full((numel,), self.floor, dtype=torch.int64, device=device)
        self.stack = _WordStack(device)
        self.steps = array("q")   # step t of each spill record
        self.counts = array("q")  # words spilled at that step

    def mul(self, X: Tensor, n: int, d: int, t: int) -> Tensor:
        """Forward: return ``floor((X·n + e)/d)`` (within one unit of ``X·n/d``), saving digits."""
        c = self.live
        threshold = spill_threshold(n, d)
        if int(c.max()) >= threshold:
            words = c[c >= threshold]
            self.stack.push(words)
            self.steps.append(t)
            self.counts.append(words.numel())
        # the op restarts the words just pushed at F, then multiplies (one fused pass)
        X, self.live = fixedpoint_mul(X, c, n, d, floor=self.floor, threshold=threshold)
        return X

    def unmul(self, X: Tensor, n: int, d: int, t: int) -> Tensor:
        """Reverse of :meth:`mul` at step ``t``: recover the ``X`` it was given, pop the digits."""
        X, c = fixedpoint_unmul(X, self.live, n, d)
        expect = self.counts[-1] if self.steps and self.steps[-1] == t else 0
        # c ≥ F always, so a word restarts here only if min(c) == F (one cheap reduction)
        starts = (c == self.floor) if t > 0 and int(c.min()) == self.floor else None
        k = int(starts.sum()) if starts is not None else 0
        if k != expect:
            raise ReversibilityError(
                f"reverse step {t}: {k} information-buffer words restart here but the forward pass "
                f"spilled {expect}; the recomputed gradients differ from the forward's "
                "(non-deterministic kernels, a different batch order or unreplayed random augmentation)")
        if k:
            c[starts] = self.stack.pop(k)
            self.steps.pop()
            self.counts.pop()
        self.live = c
        return X

    def assert_empty(self) -> None:
        """Raise :class:`ReversibilityError` unless every digit pushed has been popped again."""
        if self.stack.size or len(self.steps) or bool((self.live != self.floor).any()):
            raise ReversibilityError(
                "the information buffer is not empty after the reverse pass: the reverse pass did "
                "not retrace the forward pass bit for bit")

    # -- accounting ----------------------------------------------------------------------------
    @property
    def spilled_words(self) -> int:
        return self.stack.size

    @property
    def nbytes(self) -> int:
        """Bytes held: spilled words, spill records and the live words."""
        return self.stack.nbytes + 16 * len(self.steps) + 8 * self.live.numel()

    def bits_used(self) -> float:
        """Bits of information held: 64 per spilled word plus ``log2(c/F)`` per live word."""
        live = torch.log2(self.live.to(torch.float64) / self.floor).sum().item()
        return 64.0 * self.stack.size + live


def theory_bits_per_step(pairs: Sequence[Tuple[int, int]]) -> float:
    """Mean ``log2(d/n)`` over the steps: the bits per parameter per step the products destroy."""
    return sum(math.log2(d / n) for n, d in pairs) / max(1, len(pairs))
