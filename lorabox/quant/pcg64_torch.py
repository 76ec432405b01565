"""numpy's PCG64 stream made on a torch device, for the device's stochastic fp8 rounding.

`lorabox.quant.fp8` rounds with the draws of `np.random.PCG64(SeedSequence(seed))`: element e takes the low
(e even) or high (e odd) 32 bits of the stream's output e // 2. `draws` gives the same uint32 values on any
torch device, so a GPU rounds without the CPU making 4 bytes of draws per element and sending them over.

PCG64 (XSL-RR 128/64, as numpy runs it) steps a 128-bit LCG, s <- MULT * s + inc (mod 2^128), and outputs
rotr64(hi64(s) ^ lo64(s), s >> 122) of the new state. k steps are one affine map, s <- A_k * s + inc * G_k with
A_k = MULT^k and G_k = 1 + MULT + ... + MULT^(k-1), so output t's state is A_j * S_b + inc * G_j, where
t = b * BLOCK + j and S_b is the state of the block's first output. S_b is stepped on the host, in Python's
integers; the products for all j of a block are one matrix product in float64 on the device:
  - values are split into eight 16-bit limbs; limb k of (A_j * S + G_j * inc) mod 2^128 is
    sum over i <= k of A_j[i] * S[k - i] + G_j[i] * inc[k - i], at most 16 products below 2^32 each,
    so every partial sum is an integer below 2^36 and float64 holds it exactly, in any summation order;
  - the carries between limbs are then propagated in int64.
The tables of A_j and G_j (j < BLOCK) do not depend on the seed; they are made once per device.
"""
from __future__ import annotations

import functools

import numpy as np

MULT = 0x2360ED051FC65DA44385DF649FCCF645  # numpy's PCG64 multiplier (PCG_DEFAULT_MULTIPLIER_128)
MASK = (1 << 128) - 1
BLOCK = 1 << 16  # outputs per block: one host step and one column of the matrix product each
LIMBS = 8  # 16-bit limbs of a 128-bit value


def stream(seed: int) -> tuple[int, int]:
    """(state, inc) of `np.random.PCG64(np.random.SeedSequence(seed))`, before its first output."""
    s = np.random.PCG64(np.random.SeedSequence(seed)).state["state"]
    return int(s["state"]), int(s["inc"])


def jump(k: int, inc: int) -> tuple[int, int]:
    """(A, C): k steps of the stream with increment `inc` take s to (A * s + C) mod 2^128."""
    a, c = 1, 0  # the map so far
    step_a, step_c = MULT, inc  # the map of 2^i steps
    while k:
        if k & 1:
            a, c = a * step_a & MASK, (c * step_a + step_c) & MASK
        step_a, step_c = step_a * step_a & MASK, (step_c * step_a + step_c) & MASK
        k >>= 1
    return a, c


def _limbs(values: list[int]) -> np.ndarray:
    """128-bit integers as [len, 8] 16-bit limbs, least significant first."""
    raw = b"".join(v.to_bytes(16, "little") for v in values)
    return np.frombuffer(raw, "<u2").reshape(len(values), LIMBS)


@functools.lru_cache(maxsize=None)
def _table_host(block: int) -> np.ndarray:
    """float64 [16, block]: rows 0-7 the limbs of A_j = MULT^j, rows 8-15 those of G_j, for j < block."""
    a, g = [1] * block, [0] * block
    for j in range(1, block):
        a[j] = a[j - 1] * MULT & MASK
        g[j] = (g[j - 1] * MULT + 1) & MASK
    return np.concatenate([_limbs(a), _limbs(g)], axis=1).T.astype(np.float64)


_TABLES: dict = {}  # (device, block) -> the table there


def _table(torch, device, block: int):
    key = (str(device), block)
    if key not in _TABLES:
        _TABLES[key] = torch.from_numpy(_table_host(block)).to(device)
    return _TABLES[key]


def _toeplitz(starts: list[int], inc: int) -> np.ndarray:
    """float64 [len(starts) * 8, 16]: for each block start S, the rows that give limb k of A * S + G * inc
    (mod 2^128) from the 16 limbs of (A, G): row k holds S[k - i] at column i and inc[k - i] at column 8 + i."""
    s, c = _limbs(starts).astype(np.float64), _limbs([inc])[0].astype(np.float64)
    out = np.zeros((len(starts), LIMBS, 2 * LIMBS))
    for k in range(LIMBS):
        for i in range(k + 1):
            out[:, k, i] = s[:, k - i]
            out[:, k, LIMBS + i] = c[k - i]
    return out.reshape(-1, 2 * LIMBS)


def draws(torch, seed: int, first: int, n: int, device):
    """The uint32 draws (held in int64) of elements first .. first + n - 1 of `fp8.round_fp8`'s stochastic
    rounding with `seed`, made on `device`; `first` is even. Equal to
    `fp8.stochastic_draws(first + n, seed)[first:]`."""
    if first % 2:
        raise ValueError(f"draws start at an even element, not {first}")
    if n <= 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    state, inc = stream(seed)
    count = (n + 1) // 2  # outputs
    a, c = jump(first // 2 + 1, inc)  # output t takes the state after t + 1 steps
    start = (a * state + c) & MASK
    per_block = min(BLOCK, count)
    step_a, step_c = jump(per_block, inc)
    starts = []
    for _ in range(-(-count // per_block)):
        starts.append(start)
        start = (step_a * start + step_c) & MASK
    # [blocks * 8, per_block] limb sums below 2^36, exact in float64; to int64, then carry from limb to limb
    sums = torch.from_numpy(_toeplitz(starts, inc)).to(device) @ _table(torch, device, BLOCK)[:, :per_block]
    sums = sums.to(torch.int64).view(len(starts), LIMBS, per_block)
    limbs, carry = [], 0
    for k in range(LIMBS):
        v = sums[:, k] + carry
        limbs.append(v & 0xFFFF)
        carry = v >> 16
    # the state's 32-bit words, least significant first
    w0, w1, w2, w3 = ((limbs[2 * m] | limbs[2 * m + 1] << 16).reshape(-1)[:count] for m in range(4))
    # XSL-RR: the high and the low 64 bits xored, rotated right by the state's top 6 bits
    lo, hi, r = w0 ^ w2, w1 ^ w3, w3 >> 26
    swap = r >= 32
    lo, hi, r = torch.where(swap, hi, lo), torch.where(swap, lo, hi), r & 31
    out_lo = ((lo >> r) | (hi << (32 - r))) & 0xFFFFFFFF
    out_hi = ((hi >> r) | (lo << (32 - r))) & 0xFFFFFFFF
    return torch.stack([out_lo, out_hi], dim=1).reshape(-1)[:n]
