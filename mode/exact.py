"""Fixed-point arithmetic and the information buffer that make reversal bit-exact.

Float inversion of a momentum layer divides by ``gamma``, so rounding errors grow like
``gamma^-N``. In exact mode a state ``s`` is held as an integer ``q = round(s 2^F)`` with ``F``
fractional bits, and every operation of a coupling is an exact bijection on integers. The
integers are stored in one of two formats (:class:`FixedPoint` ``storage``):

* ``torch.float64`` (float32 and half models): exact since ``|q| < 2^STATE_BITS = 2^46``;
  float arithmetic is several times faster than int64 on CPUs;
* ``torch.int64`` (float64 models): ``|q| < 2^INT64_STATE_BITS = 2^60``, so that ``F`` can reach
  float64's own resolution with a useful range (the default 48 bits leave ``|s| < 4096``).

The operations:

* ``+ shift * other`` and ``+ Q(phi(other))`` are integer additions, undone by subtraction
  (``Q(y) = round(y 2^F)`` is evaluated on the float value of the fixed-point ``other``, so the
  forward and the inverse see bit-identical inputs);
* ``* alpha`` with ``alpha = +-n/d`` (a rational, ``d <= MAX_DENOMINATOR``) maps ``q`` to the
  nearest integer ``q' = floor((q n + c) / d)``, ``c = floor(d / 2)``. The map is many-to-one;
  its fibre ``[ceil((q' d - c) / n), ceil((q' d - c + d) / n))`` has ``b`` elements
  (``b = floor(d/n)`` or ``ceil(d/n)``), and the position ``k`` of ``q`` in it is pushed onto an
  :class:`InformationBuffer` as a base-``b`` digit. The inverse pops ``k`` and returns
  ``ceil((q' d - c) / n) + k``.

Rounding is floor division with its matching non-negative remainder throughout (the shift by
``c`` makes the multiplication round to nearest, so errors do not drift with depth). The buffer
stores ``log2 b`` bits per scalar per multiplication (on average about ``log2(d / n)``), grows
as needed and never wraps; a state that leaves the representable range raises
:class:`FixedPointOverflow` instead of wrapping.
"""

from __future__ import annotations

import math
from fractions import Fraction
from functools import lru_cache

import torch

__all__ = [
    "DEFAULT_FRAC_BITS",
    "MAX_FRAC_BITS",
    "STATE_BITS",
    "INT64_STATE_BITS",
    "MAX_DENOMINATOR",
    "FixedPointOverflow",
    "FixedPoint",
    "InformationBuffer",
    "rational",
]

DEFAULT_FRAC_BITS = 32
MAX_DENOMINATOR = 2**16
# |q| < 2**STATE_BITS keeps sums of a few states exact in float64, and q * n exact for n <= 64.
STATE_BITS = 46
# int64 storage: |q| < 2**INT64_STATE_BITS keeps sums of a few states (and of a state and a
# rounded shift) below 2^63; products q n never appear (q is split first, see _divide_int64).
INT64_STATE_BITS = 60
# floor(t / m) and ceil(t / m) are computed in float64 when |t| < 2**52 is guaranteed: t is then
# exact, and the rounding error of t / m (below 1 / (2m)) cannot cross an integer, whose distance
# from a non-integer t / m is at least 1 / m. Numerators n above this bound make q n too large
# for that; q is then split as a d + b (a n + b when dividing by n) and the small part alone is
# multiplied.
_FLOAT_DIVISION_MAX = 2 ** (52 - STATE_BITS)
# Up to 52 fractional bits in float64 storage (range |value| < 2^(46 - 52) = 1/64) and 56 in
# int64 storage (range 16): a slot of small values, such as a velocity v = h u of a fine grid,
# can hold more digits than one of order one.
MAX_FRAC_BITS = 56
FLOAT64_MAX_FRAC_BITS = 52
# floor(t / k) for |t| < _RECIPROCAL_MAX is floor(t fl(1/k) + fl(1/(2k))): one fused
# multiply-add instead of a float64 division, which costs several times more. The float error is
# below 3 2^-53 |t / k| < 3 / (16 k), less than the distance 1 / (2k) of t / k + 1 / (2k) from an
# integer (t / k is a multiple of 1 / k).
_RECIPROCAL_MAX = 2**49
_WORD_LIMIT = 2**52  # a buffer word w always satisfies 1 <= w < _WORD_LIMIT (exact in float64)
# A spill moves words that are at most this many bits (plus one digit) short of full: the next
# few pushes then need no overflow test, at the price of words stored a little below 52 bits.
SPILL_MARGIN_BITS = 6


class FixedPointOverflow(ValueError):
    """A state left the range of the fixed-point representation (it is never wrapped)."""


@lru_cache(maxsize=4096)
def rational(alpha: float) -> tuple[int, int, int]:
    """``alpha ~ sign * n / d`` with ``d <= MAX_DENOMINATOR``: returns ``(sign, n, d)``.

    Simple fractions (0.9 = 9/10, 0.99 = 99/100) are exact; otherwise the closest fraction
    with a bounded denominator is used (``|alpha - n/d| < 1 / (d MAX_DENOMINATOR)``).
    """
    if not math.isfinite(alpha) or alpha == 0.0:
        raise ValueError(f"exact mode needs a finite nonzero multiplier, got {alpha}")
    frac = Fraction(abs(alpha)).limit_denominator(MAX_DENOMINATOR)
    if frac == 0:
        raise ValueError(
            f"multiplier {alpha} is below 1/{MAX_DENOMINATOR}, the resolution of exact mode"
        )
    if frac > 1:
        raise ValueError(f"exact mode needs |multiplier| <= 1, got {alpha}")
    return (1 if alpha > 0 else -1), frac.numerator, frac.denominator


def _is_power_of_two(k: int) -> bool:
    return k > 0 and k & (k - 1) == 0


class _Plan:
    """How to compute ``floor((q n + c) / d)`` (and the start of a fibre) exactly in float64.

    ``c = floor(d / 2)``. Every intermediate below is an integer of magnitude below ``2^52``
    (``|q| < 2^STATE_BITS``), so it is exact, and a float quotient ``t / k`` of such an integer
    by ``k`` floors correctly: its rounding error (below ``1 / (2k)``) cannot cross an integer,
    whose distance from a non-integer ``t / k`` is at least ``1 / k``. Three forms, picked by
    the smallest multiplier:

    * ``m = d - n <= min(n, 64)`` (``gamma >= 1/2``): ``q' = q + floor((c - q m) / d)``;
    * ``n <= 64``: ``q' = floor((q n + c) / d)``;
    * otherwise ``q = a d + b`` is split and only ``b n + c < 2^33`` is multiplied.

    Constants are 0-dim CPU tensors, so ``c + alpha * q`` is a single kernel on any device.
    """

    def __init__(self, n: int, d: int):
        self.n, self.d, self.c = n, d, d // 2
        self.m = d - n
        if self.m <= min(n, _FLOAT_DIVISION_MAX):
            self.form = "m"
        elif n <= _FLOAT_DIVISION_MAX:
            self.form = "n"
        else:
            self.form = "split"
        self.c_t = torch.tensor(float(self.c), dtype=torch.float64)
        # division by a power of two is a multiplication by its (exact) reciprocal
        self.inv_d = 1.0 / d if _is_power_of_two(d) else None
        self.inv_n = 1.0 / n if _is_power_of_two(n) else None
        # Other divisors: a rounded reciprocal when every dividend is provably below
        # _RECIPROCAL_MAX (see there). Dividends: c - q m (form m), c + q n and c - q' d ~ q n
        # (form n), with |q| < 2^STATE_BITS; the split form divides q and numbers below 2^33.
        big = {"m": self.m, "n": n, "split": 1}[self.form] * 2**STATE_BITS + 2 * d
        self.fast = big < _RECIPROCAL_MAX
        self.bias_d = torch.tensor(1.0 / (2 * d), dtype=torch.float64)
        self.bias_n = torch.tensor(1.0 / (2 * n), dtype=torch.float64)

    def _floor_div(self, t: torch.Tensor, k: int, inv: float | None, bias: torch.Tensor,
                   out: torch.Tensor | None) -> torch.Tensor:
        """``floor(t / k)``: an exact reciprocal (power of two), a rounded one with a bias
        where every dividend is provably below _RECIPROCAL_MAX, else a division."""
        if inv is not None:
            return torch.mul(t, inv, out=out).floor_()
        if self.fast:
            return torch.add(bias, t, alpha=1.0 / k, out=out).floor_()
        return torch.div(t, k, out=out).floor_()

    def _floor_div_d(self, t: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return self._floor_div(t, self.d, self.inv_d, self.bias_d, out)

    def _floor_div_n(self, t: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return self._floor_div(t, self.n, self.inv_n, self.bias_n, out)

    def divide(self, q: torch.Tensor, overwrite: bool = False, pool: list | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(q', r, spare)`` with ``q n + c = q' d + r``, ``0 <= r < d``.

        ``overwrite=True`` may compute ``q'`` in the storage of ``q``. ``spare`` is a dead
        temporary of ``q``'s shape (or ``None``) that the caller may write into: on CPUs a
        fresh tensor of a few MiB costs several times the arithmetic done in it (page
        faults), so the exact arithmetic reuses the storage it has. ``pool``: dead float64
        tensors of ``q``'s shape to compute in (taken from the list)."""
        n, d = self.n, self.d
        if self.form == "m":  # q n + c = q d + (c - q m)
            t = torch.add(self.c_t, q, alpha=-self.m, out=_take(pool))
            j = self._floor_div_d(t, out=_take(pool))
            r = t.add_(j, alpha=-d)
            if overwrite:
                return q.add_(j), r, j
            return j.add_(q), r, None
        if self.form == "n":
            t = torch.add(self.c_t, q, alpha=n, out=_take(pool))
            out = self._floor_div_d(t, out=q if overwrite else None)
            return out, t.add_(out, alpha=-d), None
        a = self._floor_div_d(q)  # q = a d + b: q n + c = a n d + (b n + c)
        t = torch.add(q, a, alpha=-d).mul_(n).add_(self.c)
        f = self._floor_div_d(t, out=q if overwrite else None)
        r = t.add_(f, alpha=-d)
        return f.add_(a, alpha=n), r, a

    def fibre_start(self, q: torch.Tensor, overwrite: bool = False, pool: list | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(lo, s, spare)``: ``lo = ceil((q d - c) / n)`` and ``s = lo n - (q d - c)`` in
        ``[0, n)``; ``spare`` and ``pool`` as in :meth:`divide`.

        ``overwrite=True`` may compute ``lo`` in the storage of ``q``."""
        n, d = self.n, self.d
        if self.form == "m":  # (q d - c) / n = q - (c - q m) / n
            u = torch.add(self.c_t, q, alpha=-self.m, out=_take(pool))
            f = self._floor_div_n(u)
            lo = q.sub_(f) if overwrite else torch.sub(q, f)
            return lo, u.add_(f, alpha=-n), f
        if self.form == "n":  # lo = -floor((c - q d) / n)
            u = torch.add(self.c_t, q, alpha=-d, out=_take(pool))
            f = self._floor_div_n(u, out=q if overwrite else None)
            s = u.add_(f, alpha=-n)
            return f.neg_(), s, None
        a = self._floor_div_n(q)  # q = a n + b: c - q d = -a n d + (c - b d), |c - b d| < 2^33
        u = torch.add(q, a, alpha=-n).mul_(-d).add_(self.c)
        f = self._floor_div_n(u, out=q if overwrite else None)
        s = u.add_(f, alpha=-n)
        return f.neg_().add_(a, alpha=d), s, None


def _take(pool: list | None) -> torch.Tensor | None:
    """A dead tensor from ``pool`` to write into, or ``None`` (a fresh one)."""
    return pool.pop() if pool else None


@lru_cache(maxsize=1024)
def _plan(n: int, d: int) -> _Plan:
    return _Plan(n, d)


def _floor_div(t: torch.Tensor, k: int) -> torch.Tensor:
    """``floor(t / k)`` for int64 ``t`` (an arithmetic shift when ``k`` is a power of two)."""
    if _is_power_of_two(k):
        return torch.bitwise_right_shift(t, k.bit_length() - 1)
    return torch.div(t, k, rounding_mode="floor")


def _divide_int64(q: torch.Tensor, n: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q', r)`` with ``q n + c = q' d + r``, ``0 <= r < d``, ``c = floor(d / 2)``, on int64.

    ``q = a d + b`` (``0 <= b < d``) is split so that only ``b n + c < 2^33`` is multiplied:
    ``q n + c = a n d + (b n + c)``. Every intermediate stays below ``|q|`` or ``2^33``. For
    ``n <= 4`` the product ``q n + c`` itself stays below ``2^62`` and is formed directly."""
    if n <= 4:
        t = torch.mul(q, n).add_(d // 2) if n != 1 else torch.add(q, d // 2)
        out = _floor_div(t, d)
        return out, t.add_(out, alpha=-d)
    a = _floor_div(q, d)
    t = torch.add(q, a, alpha=-d).mul_(n).add_(d // 2)
    f = _floor_div(t, d)
    r = t.add_(f, alpha=-d)
    return f.add_(a, alpha=n), r


def _fibre_start_int64(q: torch.Tensor, n: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, s)``: ``lo = ceil((q d - c) / n)``, ``s = lo n - (q d - c)`` in ``[0, n)``, on int64.

    With ``q = a n + b``: ``lo = a d - floor((c - b d) / n)``, and ``|c - b d| < 2^33``."""
    a = _floor_div(q, n)
    u = torch.add(q, a, alpha=-n).mul_(-d).add_(d // 2)
    f = _floor_div(u, n)
    s = u.add_(f, alpha=-n)
    return f.neg_().add_(a, alpha=d), s


def _fibre_of_remainder(r: torch.Tensor, n: int, d: int, out: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ``floor(r / n)`` and size ``ceil((d - r mod n) / n)`` of the fibre (``r`` is
    overwritten).

    ``r`` holds small integers (``0 <= r < d``) in float64, where these are exact. For
    ``d < 2n`` (multipliers above 1/2) the position is ``[r >= n] = clamp(r - n + 1, 0, 1)``
    and the size ``1 + [r mod n < d - n]``, written as clamps too (comparisons that yield
    booleans cost several times more than float arithmetic).
    """
    if d < 2 * n:
        position = torch.sub(r, n - 1, out=out).clamp_(0, 1)
    else:
        position = torch.div(r, n, out=out).floor_()
    return position, _fibre_size(r.add_(position, alpha=-n), n, d, overwrite=True)


def _fibre_size(s: torch.Tensor, n: int, d: int, overwrite: bool = False) -> torch.Tensor:
    """``ceil((d - s) / n)`` for integer-valued float64 ``0 <= s < n`` (a fresh tensor, or
    ``s`` itself with ``overwrite=True``).

    With ``k = floor(d / n)`` (``n >= 2`` does not divide ``d``: the fraction is reduced)
    this is ``k + [s < d - k n] = clamp(d - k n + k - s, k, k + 1)``.
    """
    k = d // n
    if overwrite:  # -s + C is C - s exactly: these are small integers
        return s.neg_().add_(d - k * n + k).clamp_(k, k + 1)
    return torch.rsub(s, d - k * n + k).clamp_(k, k + 1)


class FixedPoint:
    """Conversion between floats and fixed point with ``frac_bits`` fractional bits.

    ``encode(x) = round(x 2^F)`` (exact scaling, rounded in ``x``'s own format), held as
    ``storage``: float64 (integers below ``2^STATE_BITS``, ``F <= 52``) or int64 (integers below
    ``2^INT64_STATE_BITS``, ``F <= 56``). ``decode(q) = q 2^-F`` rounded to the float dtype of the
    model. Representable magnitudes are below ``2^(state bits - F)``.
    """

    def __init__(self, frac_bits: int = DEFAULT_FRAC_BITS, storage: torch.dtype = torch.float64):
        if isinstance(frac_bits, bool) or not isinstance(frac_bits, int):
            raise TypeError(f"frac_bits must be an int, got {frac_bits!r}")
        if storage not in (torch.float64, torch.int64):
            raise ValueError(f"storage must be torch.float64 or torch.int64, got {storage}")
        top = MAX_FRAC_BITS if storage == torch.int64 else FLOAT64_MAX_FRAC_BITS
        if not 8 <= frac_bits <= top:
            hint = "" if storage == torch.int64 else (
                f"; up to {MAX_FRAC_BITS} bits need int64 storage, which float64 models use")
            raise ValueError(f"frac_bits must lie in [8, {top}], got {frac_bits}{hint}")
        self.frac_bits = frac_bits
        self.storage = storage
        self.state_bits = INT64_STATE_BITS if storage == torch.int64 else STATE_BITS
        self.scale = float(2**frac_bits)
        self.limit = 2**self.state_bits

    @property
    def max_abs(self) -> float:
        """Largest magnitude a state may reach."""
        return self.limit / self.scale

    def _overflow(self, what: str) -> FixedPointOverflow:
        return FixedPointOverflow(
            f"{what} left the exact-mode range |value| < 2^{self.state_bits - self.frac_bits} = "
            f"{self.max_abs:g} (frac_bits={self.frac_bits}); lower frac_bits for a wider range, "
            f"or check the network for diverging activations"
            + (" (or a value was NaN or infinite)" if self.storage == torch.int64 else "")
        )

    def encode(self, x: torch.Tensor, what: str = "a state") -> torch.Tensor:
        """``round(x 2^F)`` in ``storage``; raises if out of range or not finite."""
        # In float64 (one new tensor): half formats overflow at 2^F and float64 holds every
        # value exactly; scaling by a power of two and rounding are exact there, and give the
        # integers that the input's own format would.
        y = x.detach().to(torch.float64, copy=True).mul_(self.scale).round_()
        if y.numel() == 0:
            return y.to(self.storage)
        low, high = torch.aminmax(y)
        if not (float(low) > -self.limit and float(high) < self.limit):  # NaN fails too
            if not bool(torch.isfinite(y).all()):
                raise ValueError(f"{what} contains NaN or infinity; exact mode needs finite values")
            raise self._overflow(what)
        return y.to(self.storage)  # |y| < 2^60: exact in int64

    def quantize(self, x: torch.Tensor, overwrite: bool = False,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        """``round(x 2^F)``, unchecked: for terms added to a state that is checked.

        Float64 storage: integer-valued, in ``x``'s own dtype when that is float32 or float64
        (scaling by a power of two and rounding are exact there, and adding it to a float64
        state promotes exactly); float64 otherwise. Int64 storage: int64, with NaN and values
        beyond ``2^62`` mapped to ``+-2^62``, which fail the range check of the state. A
        non-finite or huge ``x`` makes that state fail :meth:`check`. ``overwrite=True`` may
        compute it in the storage of ``x`` (which nothing else may hold); ``out``, a float64
        tensor of ``x``'s shape, receives it in float64 storage (the same integers: ``x`` is
        converted exactly, then scaled and rounded).
        """
        if out is not None and self.storage == torch.float64 and out.shape == x.shape:
            return out.copy_(x.detach()).mul_(self.scale).round_()
        if self.storage == torch.int64:
            y = x.detach().to(torch.float64).mul(self.scale).round_()
            big = float(2**62)
            return y.clamp_(-big, big).nan_to_num_(nan=big).to(torch.int64)
        if x.dtype == torch.float32 or x.dtype == torch.float64:
            if overwrite:
                return x.detach().mul_(self.scale).round_()
            return torch.mul(x.detach(), self.scale).round_()
        return x.detach().to(torch.float64).mul_(self.scale).round_()

    def decode(self, q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``q 2^-F`` rounded to ``dtype`` (the scaling by a power of two is exact; int64 ``q``
        beyond ``2^53`` is rounded to float64 first)."""
        if q.dtype == torch.int64:  # the float64 copy is scaled in place, rounded once
            q = q.to(torch.float64).mul_(1.0 / self.scale)
            return q if dtype == torch.float64 else q.to(dtype)
        if dtype == torch.float64:
            return q * (1.0 / self.scale)
        if dtype == torch.float32:
            # rounded to float32, then scaled: the same value (a power-of-two scaling of a
            # float32 is exact: |q 2^-F| >= 2^-52 stays normal), one tensor and no float64 one
            return q.to(dtype).mul_(1.0 / self.scale)
        out = torch.empty(q.shape, dtype=dtype, device=q.device)
        return torch.mul(q, 1.0 / self.scale, out=out)  # computed in float64, rounded once

    def round_shift(self, q: torch.Tensor, shift: int, bits: int) -> torch.Tensor:
        """``round(q shift 2^-bits)`` (``bits > 0``): a multiple of a slot with ``bits`` more
        fractional bits, rounded onto this grid. A deterministic function of ``q``, so the
        coupling that adds it stays exactly invertible."""
        if q.dtype == torch.int64:  # to nearest, ties to even as torch.round: exact in int64
            x = q * shift if shift != 1 else q
            half = 1 << (bits - 1)
            r = _floor_div(x + half, 1 << bits)
            tie = torch.bitwise_and(x, (1 << bits) - 1) == half
            return r.sub_(torch.bitwise_and(r, 1).mul_(tie))
        return torch.mul(q, shift * 2.0**-bits).round_()

    def check(self, q: torch.Tensor, what: str = "a state") -> torch.Tensor:
        """``q`` itself, after checking ``|q| < 2^state_bits`` (NaN and infinity fail)."""
        self.checked_bound(q, what)
        return q

    def checked_bound(self, q: torch.Tensor, what: str = "a state", bounds=None) -> int:
        """``max |q|`` (an int), after the check of :meth:`check` (the same one reduction).
        ``bounds``: ``torch.aminmax(q)``, where it was computed already."""
        if q.numel() == 0:
            return 0
        low, high = torch.aminmax(q) if bounds is None else bounds
        if q.dtype == torch.int64:
            low, high = int(low), int(high)
        else:
            low, high = float(low), float(high)
        if not (low > -self.limit and high < self.limit):  # NaN fails too
            if q.dtype != torch.int64 and not bool(torch.isfinite(q).all()):
                raise ValueError(f"{what} contains NaN or infinity; exact mode needs finite values")
            raise self._overflow(what)
        return int(max(-low, high))


# A shift term (``shift * q[o]``, or its rounding ``round(q[o] shift 2^-bits)`` onto a finer
# grid) is added to a state together with a scaled state and a quantized phi. Its magnitude is
# kept below 2^TERM_BITS of the storage, which makes the sum provably exact (it can neither
# wrap nor round):
#
# * int64: |alpha q[t]| <= 2^60 (|alpha| <= 1, every state read is checked below 2^60), the term
#   <= 2^61 and a quantized phi <= 2^62 (FixedPoint.quantize clamps there): the sum stays below
#   7 * 2^60 < 2^63, and one that leaves 2^60 fails the range check. For a rounded shift the
#   product q shift itself must stay below 2^62 (then the rounded term is below 2^61 + 1).
#   Without this bound a frac_bits pair far apart (shift 2^k with k up to 48) wraps modulo 2^64,
#   and a wrapped sum can land back in range (q[o] shift = 2^64 adds nothing): a silently wrong
#   state.
# * float64: float arithmetic never wraps, but it rounds above 2^53, and a quantized phi that
#   cancels a large term would bring a rounded sum back into range. With the scaled state
#   below 2^46 and the term below 2^52, their sum A is an exact integer below 2^53; adding an
#   integer-valued P gives a float r = fl(A + P). If |A + P| >= 2^53 then |r| >= 2^53 (rounding
#   is monotone and 2^53 is a float), which fails the range check; otherwise A + P is an
#   integer below 2^53, so r is exact. The product q shift of a rounded shift may round: the
#   term is still a deterministic function of q[o], so the coupling stays invertible.
INT64_TERM_BITS = 61
FLOAT64_TERM_BITS = 52


def shift_limit(fp: FixedPoint, other: FixedPoint, shift: int, bits: int = 0) -> int | None:
    """The largest ``|q[o]|`` for which the shift term onto ``fp`` stays provably exact, or
    ``None`` when every state of ``other`` (``|q| < 2^state_bits``) qualifies.

    The term is ``shift q[o]`` (``bits = 0``) or ``round(q[o] shift 2^-bits)``; see the bound
    above (int64: term below ``2^61``, product below ``2^62``; float64: term below ``2^52``).
    """
    shift = abs(int(shift))
    if shift == 0:
        return None
    if fp.storage == torch.int64:
        limit = (1 << (INT64_TERM_BITS + (1 if bits else 0))) // shift
    else:
        limit = (1 << (FLOAT64_TERM_BITS + bits)) // shift
    return None if limit >= other.limit else limit


def shift_overflow(fp: FixedPoint, other: FixedPoint, names: tuple[str, str], magnitude: int,
                   limit: int) -> FixedPointOverflow:
    """The error for a shift term that would leave the exact range of the storage."""
    t, o = names
    k = fp.frac_bits - other.frac_bits
    return FixedPointOverflow(
        f"exact mode: the shift of {o} onto {t} is multiplied by 2^{k} to move it from "
        f"{other.frac_bits} to {fp.frac_bits} fractional bits (frac_bits={fp.frac_bits} for "
        f"{t}, {other.frac_bits} for {o}), and |{o}| reached {magnitude / other.scale:.6g}: "
        f"beyond {limit / other.scale:.6g} the product leaves the range where "
        f"{str(fp.storage).replace('torch.', '')} arithmetic is exact (it would wrap or round). "
        f"Choose frac_bits closer together (or one int for both)"
    ) if k > 0 else FixedPointOverflow(
        f"exact mode: the shift of {o} onto {t} (frac_bits={fp.frac_bits} for {t}, "
        f"{other.frac_bits} for {o}) is too large for |{o}| = {magnitude / other.scale:.6g} "
        f"(limit {limit / other.scale:.6g}): the product would leave the range where "
        f"{str(fp.storage).replace('torch.', '')} arithmetic is exact. Lower frac_bits of {o}"
    )


class InformationBuffer:
    """A stack of mixed-radix digits per scalar: what ``floor`` forgets, kept losslessly.

    Each scalar owns an open word ``w`` (an integer ``1 <= w < 2^52``, held exactly in float64;
    ``w = 1`` is empty). ``push(k, b)`` with ``0 <= k < b <= max_base`` sets ``w <- w b + k``;
    ``pop(b)`` returns ``w mod b`` and sets ``w <- w div b``. Before a push that could overflow
    some word, the words holding at least ``52 - SPILL_MARGIN_BITS - log2(max_base)`` bits are
    moved to a *level* (their indices and values, tagged with the push count), and reopened
    empty; the pop of that same push finds its level by the count and restores the words. So
    ``push`` and ``pop`` are exact inverses, pop inspects no data, and the buffer grows only
    by full words.

    Parameters
    ----------
    shape : torch.Size
        Shape of the state the buffer belongs to (one digit stack per scalar).
    device : torch.device
    """

    def __init__(self, shape: torch.Size, device: torch.device | str = "cpu"):
        self.shape = torch.Size(shape)
        n = self.shape.numel()
        self.word = torch.ones(self.shape, dtype=torch.float64, device=device)
        self.pushes = 0  # digits pushed so far, per scalar
        self.levels: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (pushes, idx, words)
        self._index_dtype = torch.int32 if n < 2**31 else torch.int64
        self._bound = 1  # an upper bound on every word, so that most pushes need no test
        self._owned = True  # False for a cursor whose words are another's (never written)

    def _spill(self, max_base: int) -> None:
        """Move the fullest words to a new level so that the next push cannot overflow."""
        if self.word.numel() == 0:  # no scalars: nothing can overflow
            self._bound = 1
            return
        self._bound = int(self.word.max())
        if self._bound * max_base < _WORD_LIMIT:
            return
        threshold = max(_WORD_LIMIT // (max_base << SPILL_MARGIN_BITS), 2)
        flat = self.word.view(-1)
        idx = (flat >= threshold).nonzero().squeeze(1)
        self.levels.append((self.pushes, idx.to(self._index_dtype), flat[idx]))
        flat.index_fill_(0, idx, 1.0)
        self._bound = int(self.word.max())

    def push(self, k: torch.Tensor, b: torch.Tensor | int, max_base: int) -> None:
        """Push digits ``k`` (``0 <= k < b <= max_base``; float64, the state's shape) in
        bases ``b`` (an int, or float64 of the state's shape)."""
        self.prepare_push(max_base)
        # in place: the open words belong to this buffer alone (readers hold clones)
        if isinstance(b, int):
            torch.add(k, self.word, alpha=b, out=self.word)
        else:
            torch.addcmul(k, self.word, b, out=self.word)
        self.pushed(max_base)

    def prepare_push(self, max_base: int) -> None:
        """Before ``word <- word b + k`` (``b <= max_base``) is computed in place in
        ``self.word``: the words are this buffer's own float64 ones and none can overflow."""
        if not self._owned or self.word.dtype != torch.float64:  # a cursor's words: its own now
            self.word, self._owned = self.word.to(torch.float64, copy=True), True
        if self._bound * max_base >= _WORD_LIMIT:  # some word might overflow: look
            self._spill(max_base)

    def pushed(self, max_base: int) -> None:
        """After a push computed in place (see :meth:`prepare_push`)."""
        self.pushes += 1
        self._bound = self._bound * max_base + max_base - 1

    def pop(self, b: torch.Tensor | int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Pop the digits pushed last in bases ``b``; returned as integer-valued float64.
        ``out``: a dead float64 tensor of the state's shape for the new words.

        Words stored compactly (:meth:`state`) stay in their format: the quotient of a word
        by a base is below the word."""
        if self.pushes == 0:
            raise RuntimeError("pop from an empty InformationBuffer")
        store = self.word.dtype
        word = self.word if store == torch.float64 else self.word.to(torch.float64)
        # The remainder overwrites the old words when this buffer alone holds them; a cursor
        # leaves the words it was given intact (and owns the quotients from then on).
        owned = self._owned or word is not self.word
        if out is not None and (out.dtype != torch.float64 or out.shape != word.shape):
            out = None
        quotient = torch.div(word, b, out=out).floor_()  # exact: integers below 2^52
        if isinstance(b, int):
            k = word.add_(quotient, alpha=-b) if owned else torch.add(word, quotient, alpha=-b)
        else:
            k = word.addcmul_(quotient, b, value=-1) if owned \
                else torch.addcmul(word, quotient, b, value=-1)
        del word
        if self._restore(quotient):
            store = torch.float64  # restored full words
        self.word = quotient if store == torch.float64 else quotient.to(store)
        self._owned = True
        return k

    def _restore(self, quotient: torch.Tensor) -> bool:
        """Count a pop whose new words are ``quotient``; put back the full words that the push
        it undoes moved to a level (then ``True``)."""
        self.pushes -= 1
        if self.levels and self.levels[-1][0] == self.pushes:
            _, idx, words = self.levels.pop()
            quotient.view(-1).index_copy_(0, idx.to(torch.int64), words)
            return True
        return False

    def prepare_pop(self) -> None:
        """Before ``word <- word div b`` is computed in place in ``self.word`` (then
        :meth:`popped`): the words become this buffer's own, in their format (a compact one
        holds every quotient, which is below its word), or in float64 where the pop restores
        full words from a level."""
        if self.pushes == 0:
            raise RuntimeError("pop from an empty InformationBuffer")
        restores = bool(self.levels) and self.levels[-1][0] == self.pushes - 1
        if restores and self.word.dtype != torch.float64:
            self.word, self._owned = self.word.to(torch.float64), True
        elif not self._owned:
            self.word, self._owned = self.word.clone(), True

    def popped(self) -> None:
        """After a pop computed in place (see :meth:`prepare_pop`)."""
        self._restore(self.word)

    def reader(self) -> InformationBuffer:
        """A cursor on the same digits: popping from it leaves this buffer intact (its first
        pop allocates new words; no copy is made before)."""
        return InformationBuffer.cursor(*self.state())

    def state(self, compact: bool = False) -> tuple[tuple, list[torch.Tensor]]:
        """``(meta, tensors)``: the tensors of the digits (open words, then the indices and the
        words of each level) and the small metadata :meth:`cursor` needs beside them.

        ``compact=True`` stores the open words in the narrowest exact format their bound allows
        (uint8 below ``2^8``, float32 below ``2^24``): a short chain (a stage of a few blocks)
        then keeps one byte per scalar instead of eight. A cursor's first pop widens them."""
        word = self.word
        if compact and self._bound < 2**8:
            word = word.to(torch.uint8)
        elif compact and self._bound < 2**24:
            word = word.to(torch.float32)
        meta = (self.shape, self.pushes, tuple(p for p, _, _ in self.levels),
                self._index_dtype, self._bound)
        tensors = [word, *(i for _, i, _ in self.levels), *(w for _, _, w in self.levels)]
        return meta, tensors

    @classmethod
    def cursor(cls, meta: tuple, tensors) -> InformationBuffer:
        """A cursor on the digits that :meth:`state` described (the tensors are only read)."""
        shape, pushes, level_pushes, index_dtype, bound = meta
        k = len(level_pushes)
        tensors = list(tensors)
        if len(tensors) != 1 + 2 * k:
            raise ValueError(f"expected {1 + 2 * k} tensors for {k} levels, got {len(tensors)}")
        other = cls.__new__(cls)
        other.shape = torch.Size(shape)
        other.word = tensors[0]
        other.pushes = pushes
        other.levels = list(zip(level_pushes, tensors[1:1 + k], tensors[1 + k:]))
        other._index_dtype = index_dtype
        other._bound = bound
        other._owned = False
        return other

    @property
    def bits(self) -> int:
        """Information held, in bits (the bits of every stored and open word)."""
        held = torch.log2(self.word.to(torch.float64)).sum() + sum(
            torch.log2(w).sum() for _, _, w in self.levels)
        return math.ceil(float(held))

    @property
    def nbytes(self) -> int:
        """Bytes allocated for the buffer (open words, stored words and their indices)."""
        stored = sum(i.numel() * i.element_size() + 8 * w.numel() for _, i, w in self.levels)
        return self.word.numel() * self.word.element_size() + stored

    def scale(self, q: torch.Tensor, sign: int, n: int, d: int, *,
              overwrite: bool = False, pool: list | None = None) -> torch.Tensor:
        """``q -> sign * round(q n / d)``, pushing the position of ``q`` in its fibre.

        The rounding is ``q' = floor((q n + c) / d)`` with ``c = floor(d / 2)``: to nearest, so
        that rounding errors do not drift over many layers. With ``q n + c = q' d + r``
        (``0 <= r < d``) the fibre of ``q'`` starts at ``q - floor(r / n)`` and has
        ``ceil((d - r mod n) / n)`` elements. ``q`` holds integers; the result is int64 for int64
        ``q``, float64 otherwise. ``overwrite=True`` lets the result take the storage of ``q``
        (float64 ``q``). ``pool``: a list of dead float64 tensors of ``q``'s shape that the
        arithmetic takes from and returns its dead temporaries to (a forward's workspace).
        """
        if q.dtype != torch.int64:
            overwrite = overwrite and q.dtype == torch.float64
            q = q.to(torch.float64)
        fresh = False
        if n != d:
            spare = None
            if q.dtype == torch.int64:
                out, r = _divide_int64(q, n, d)
                r = r.to(torch.float64)  # digits and remainders are small: exact in float64
            else:
                out, r, spare = _plan(n, d).divide(q, overwrite, pool)
            if n == 1:  # the fibre of out is [out d - c, out d - c + d): position r, size d
                self.push(r, d, d)
                dead = [r, spare]
            else:
                position, size = _fibre_of_remainder(r, n, d, out=spare)
                self.push(position, size, -(-d // n))
                dead = [position, size]
            if pool is not None and q.dtype == torch.float64:
                pool.extend(x for x in dead if x is not None)
            fresh = out is not q or overwrite
            q = out
        if sign < 0:
            return q.neg_() if fresh or overwrite else -q
        return q

    def unscale(self, q: torch.Tensor, sign: int, n: int, d: int, *,
                overwrite: bool = False, pool: list | None = None) -> torch.Tensor:
        """Inverse of :meth:`scale`: pops the fibre position and returns the original ``q``.

        The fibre of ``q'`` starts at ``lo = ceil((q' d - c) / n)``; with
        ``s = lo n - (q' d - c)`` (``0 <= s < n``) it has ``ceil((d - s) / n)`` elements.
        ``overwrite=True`` lets the result take the storage of ``q`` (float64 or int64 ``q``);
        ``pool`` as in :meth:`scale`.
        """
        integer = q.dtype == torch.int64
        overwrite = overwrite and (integer or q.dtype == torch.float64)
        if not integer:
            q = q.to(torch.float64)
        if sign < 0:
            q = q.neg_() if overwrite else -q
            overwrite = True
        if n != d:
            if n == 1:  # |q' d| <= |q| + d: exact
                return torch.add(self.pop(d).to(q.dtype), q, alpha=d).sub_(d // 2)
            spare = None
            if integer:
                lo, s = _fibre_start_int64(q, n, d)
                s = s.to(torch.float64)
            else:
                lo, s, spare = _plan(n, d).fibre_start(q, overwrite, pool)
            del q
            size = _fibre_size(s, n, d, overwrite=True)
            del s
            k = self.pop(size, out=spare)
            return lo.add_(k.to(torch.int64) if integer else k)
        return q

    def __repr__(self) -> str:
        return (
            f"InformationBuffer(shape={tuple(self.shape)}, bits={self.bits}, "
            f"allocated={self.nbytes} bytes)"
        )
