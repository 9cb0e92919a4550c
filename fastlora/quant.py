"""The bitsandbytes 4-bit format, read and written bit for bit (DESIGN.md, "The bitsandbytes
4-bit format").

Everything here is plain PyTorch and knows no kernel (DESIGN.md "Layers"); the kernel-backed
`fastlora.dequantize_4bit` is an op (fastlora/ops/dequant.py).

Bit-exactness with bitsandbytes 0.50 on the CPU (the contract) rests on doing the same float32
operations in the same order:
- 4-bit codes: full blocks scale by `x * (1 / absmax)`, the trailing partial block by
  `x / absmax`; the index is the code entry whose midpoint interval holds the scaled value
  (ties go to the lower entry); stored absmax of a partial block is clamped to >= 1e-38.
- 8-bit absmax codes (double quantisation): bnb 0.50's CPU quantiser maps the scaled value onto
  a 65536-point grid over [-1, 1] and looks the grid point's nearest code up in a table, so a
  value can land one code away from its true nearest; we reproduce that grid exactly.
- decoding is `fp32(code[nibble]) * fp32(absmax[block])`, rounded once to the output dtype.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import torch

__all__ = [
    "QuantState",
    "quantize_4bit",
    "dequantize_4bit_torch",
    "decode_absmax",
    "code_table",
    "dynamic_map",
    "VALID_BLOCKSIZES",
    "VALID_QUANT_TYPES",
]

VALID_QUANT_TYPES = ("nf4", "fp4")
VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
STORAGE_DTYPES = (torch.uint8, torch.bfloat16, torch.float16, torch.float32)
NESTED_BLOCKSIZE = 256  # bnb always compresses absmax in blocks of 256

_NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
_FP4_TWELFTHS = (0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3)


@functools.lru_cache(maxsize=None)
def _code_table_on(quant_type: str, device: torch.device) -> torch.Tensor:
    if quant_type == "nf4":
        table = torch.tensor(_NF4, dtype=torch.float32)
    elif quant_type == "fp4":
        table = torch.tensor(_FP4_TWELFTHS, dtype=torch.float32) / 12
    else:
        raise ValueError(f"quant_type must be one of {VALID_QUANT_TYPES}, got {quant_type!r}")
    return table.to(device)


def code_table(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16-entry float32 table every fastlora decoder uses, indexed by nibble (DESIGN.md).

    FP4's nibble 8 is -0.0, as bnb's CUDA kernel and its CPU scalar path decode it. bnb's
    QuantState.code stores +0.0 there (and its pure-PyTorch backend decodes +0.0): the two
    differ only in the sign of a zero, so decoders use this table and `QuantState.code` is kept
    as bnb wrote it, for serialisation."""
    return _code_table_on(quant_type, torch.device(device))


def _stored_code(quant_type: str, device) -> torch.Tensor:
    """QuantState.code as bitsandbytes stores it (FP4 zero as +0.0)."""
    return code_table(quant_type, device) + 0.0  # -0.0 + 0.0 == +0.0; a fresh tensor


@functools.lru_cache(maxsize=None)
def _dynamic_map_cpu() -> torch.Tensor:
    # bnb's signed dynamic 8-bit map: for exponent level e = 0..6 the midpoints of
    # linspace(0.1, 1, 2**e + 1) scaled by +-10**(e - 6), plus 0 and 1, sorted (256 values).
    values = [0.0, 1.0]
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scale = 10.0 ** (e - 6)
        values += (scale * mids).tolist() + (-scale * mids).tolist()
    assert len(values) == 256
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """bnb's signed dynamic 8-bit code (256 float32 values), used for double quantisation."""
    return _dynamic_map_cpu().to(device)


# ----------------------------------------------------------------------------- checks

def _check_quant_type(quant_type: Any, name: str = "quant_type") -> str:
    if quant_type not in VALID_QUANT_TYPES:
        raise ValueError(f"{name} must be one of {VALID_QUANT_TYPES}, got {quant_type!r}")
    return quant_type


def _check_blocksize(blocksize: Any, name: str = "blocksize") -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int):
        raise TypeError(f"{name} must be an int, got {type(blocksize).__name__}")
    if blocksize not in VALID_BLOCKSIZES:
        raise ValueError(
            f"{name} must be a power of two in {VALID_BLOCKSIZES[0]}..{VALID_BLOCKSIZES[-1]}, "
            f"got {blocksize}"
        )
    return blocksize


def _num_blocks(n: int, blocksize: int) -> int:
    return -(-n // blocksize)


# ----------------------------------------------------------------------------- QuantState

class QuantState:
    """What it takes to read a packed 4-bit weight: the fields of bnb's QuantState.

    absmax  float32 [nblocks]            (or uint8 qabsmax [nblocks] when double-quantised)
    shape   torch.Size([N, K])           the weight's shape
    code    float32 [16]                 NF4 or FP4 table as bnb stores it (decoders use
                                         fastlora.quant.code_table(quant_type), see there)
    blocksize, quant_type, dtype         dtype: the weight's dtype (default dequant dtype)
    offset  float32 0-dim tensor         double quant only
    state2  QuantState                   double quant only: absmax = float32 absmax2
                                         [ceil(nblocks / 256)], code = dynamic map, blocksize 256
    """

    def __init__(self, absmax, shape=None, code=None, blocksize=None, quant_type=None,
                 dtype=None, offset=None, state2=None):
        self.absmax = absmax
        self.shape = torch.Size(shape) if shape is not None else None
        self.code = code
        self.blocksize = blocksize
        self.quant_type = quant_type
        self.dtype = dtype
        self.offset = offset
        self.state2 = state2

    @property
    def nested(self) -> bool:
        return self.state2 is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.absmax.device

    def __repr__(self) -> str:
        return (f"QuantState(shape={tuple(self.shape) if self.shape is not None else None}, "
                f"quant_type={self.quant_type!r}, blocksize={self.blocksize}, dtype={self.dtype}, "
                f"nested={self.nested})")

    # -- interop with bitsandbytes: the same tensors, no copies
    @classmethod
    def from_bnb(cls, state) -> "QuantState":
        """Wrap a bitsandbytes QuantState; every tensor is shared, nothing is copied."""
        if state is None:
            raise ValueError("state is None: the layer has no quant_state (was it quantised?)")
        for field in ("absmax", "shape", "code", "blocksize", "quant_type", "dtype"):
            if not hasattr(state, field):
                raise TypeError(f"state has no field {field!r}: not a bitsandbytes QuantState")
        state2 = None
        if getattr(state, "state2", None) is not None:
            s2 = state.state2
            state2 = cls(absmax=s2.absmax, code=s2.code, blocksize=s2.blocksize, dtype=s2.dtype)
        return cls(absmax=state.absmax, shape=state.shape, code=state.code,
                   blocksize=state.blocksize, quant_type=state.quant_type, dtype=state.dtype,
                   offset=state.offset if state2 is not None else None, state2=state2)

    def to_bnb(self):
        """The same state as a bitsandbytes QuantState (tensors shared)."""
        from bitsandbytes.functional import QuantState as BnbQuantState

        state2 = None
        if self.nested:
            s2 = self.state2
            state2 = BnbQuantState(absmax=s2.absmax, code=s2.code, blocksize=s2.blocksize,
                                   dtype=s2.dtype)
        return BnbQuantState(absmax=self.absmax, shape=self.shape, code=self.code,
                             blocksize=self.blocksize, quant_type=self.quant_type,
                             dtype=self.dtype, offset=self.offset, state2=state2)

    # bitsandbytes' serialised form is the interchange format: use its own (de)serialiser
    def as_dict(self, packed: bool = False) -> dict:
        """bitsandbytes' serialised form (`packed=True`: tensors only, safetensors-ready)."""
        return self.to_bnb().as_dict(packed=packed)

    @classmethod
    def from_dict(cls, qs_dict: dict, device: torch.device | str = "cpu") -> "QuantState":
        """Inverse of `as_dict` (packed or not); accepts what bitsandbytes writes."""
        from bitsandbytes.functional import QuantState as BnbQuantState

        return cls.from_bnb(BnbQuantState.from_dict(dict(qs_dict), device=torch.device(device)))

    def to(self, device) -> "QuantState":
        """A copy on `device` (bnb's `.to` mutates in place; this does not)."""
        state2 = None
        if self.nested:
            s2 = self.state2
            state2 = QuantState(absmax=s2.absmax.to(device), code=s2.code.to(device),
                                blocksize=s2.blocksize, dtype=s2.dtype)
        return QuantState(absmax=self.absmax.to(device), shape=self.shape,
                          code=self.code.to(device), blocksize=self.blocksize,
                          quant_type=self.quant_type, dtype=self.dtype,
                          offset=self.offset.to(device) if self.offset is not None else None,
                          state2=state2)

    def validate(self, packed: Optional[torch.Tensor] = None, name: str = "state") -> "QuantState":
        """Raise a ValueError/TypeError naming the field when the state cannot describe a
        weight (and, given `packed`, when the packed tensor cannot hold it)."""
        if not isinstance(self, QuantState):
            raise TypeError(f"{name} must be a fastlora.QuantState, got {type(self).__name__}")
        _check_quant_type(self.quant_type, f"{name}.quant_type")
        _check_blocksize(self.blocksize, f"{name}.blocksize")
        if self.shape is None or len(self.shape) != 2:
            raise ValueError(f"{name}.shape must be a 2-D [N, K] shape, got {self.shape}")
        if min(self.shape) <= 0:
            raise ValueError(f"{name}.shape must have no empty dimension, got {tuple(self.shape)}")
        if self.dtype not in WEIGHT_DTYPES:
            raise TypeError(f"{name}.dtype must be one of {WEIGHT_DTYPES}, got {self.dtype}")
        if not isinstance(self.absmax, torch.Tensor):
            raise TypeError(f"{name}.absmax must be a tensor, got {type(self.absmax).__name__}")
        if not isinstance(self.code, torch.Tensor) or self.code.numel() != 16 \
                or self.code.dtype != torch.float32:
            raise ValueError(f"{name}.code must be a float32 tensor of 16 values")
        nblocks = _num_blocks(self.numel, self.blocksize)
        if self.absmax.dim() != 1 or self.absmax.numel() != nblocks:
            raise ValueError(
                f"{name}.absmax has {self.absmax.numel()} values (shape {tuple(self.absmax.shape)})"
                f" but shape {tuple(self.shape)} with blocksize {self.blocksize} needs {nblocks}")
        if self.nested:
            if self.absmax.dtype != torch.uint8:
                raise TypeError(f"{name}.absmax must be uint8 when double-quantised, "
                                f"got {self.absmax.dtype}")
            s2 = self.state2
            if s2.blocksize != NESTED_BLOCKSIZE:
                raise ValueError(f"{name}.state2.blocksize must be {NESTED_BLOCKSIZE}, "
                                 f"got {s2.blocksize}")
            n2 = _num_blocks(nblocks, NESTED_BLOCKSIZE)
            if not isinstance(s2.absmax, torch.Tensor) or s2.absmax.dtype != torch.float32 \
                    or s2.absmax.numel() != n2:
                raise ValueError(f"{name}.state2.absmax must be float32 with {n2} values")
            if not isinstance(s2.code, torch.Tensor) or s2.code.numel() != 256 \
                    or s2.code.dtype != torch.float32:
                raise ValueError(f"{name}.state2.code must be a float32 tensor of 256 values")
            if not isinstance(self.offset, torch.Tensor) or self.offset.numel() != 1:
                raise ValueError(f"{name}.offset must be a one-element tensor when "
                                 "double-quantised")
        elif self.absmax.dtype != torch.float32:
            raise TypeError(f"{name}.absmax must be float32, got {self.absmax.dtype}")
        devices = {self.absmax.device, self.code.device}
        if self.nested:
            devices |= {self.state2.absmax.device, self.state2.code.device, self.offset.device}
        if len(devices) != 1:
            raise ValueError(f"{name} tensors are spread over devices {sorted(map(str, devices))}")
        if packed is not None:
            check_packed(packed, self)
        return self


def check_packed(packed: Any, state: QuantState, name: str = "packed") -> None:
    """Raise unless `packed` holds the ceil(N*K/2) bytes that `state` describes."""
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(packed).__name__}")
    if packed.dtype not in STORAGE_DTYPES:
        raise TypeError(f"{name} must be stored as one of {STORAGE_DTYPES}, got {packed.dtype}")
    if not packed.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    need = -(-state.numel // 2)
    have = packed.numel() * packed.element_size()
    if have < need:
        raise ValueError(f"{name} holds {have} bytes but shape {tuple(state.shape)} needs {need}")
    if packed.device != state.absmax.device:
        raise ValueError(f"{name} is on {packed.device} but state.absmax is on "
                         f"{state.absmax.device}")


def packed_bytes(packed: torch.Tensor) -> torch.Tensor:
    """The packed weight as a flat uint8 view (quant_storage bf16/fp16/fp32 is the same bytes)."""
    return packed.reshape(-1).view(torch.uint8)


# ----------------------------------------------------------------------------- quantize

def _blockwise_absmax_scaled(flat: torch.Tensor, blocksize: int):
    """Per-block absmax and values scaled into [-1, 1], as bnb 0.50's default backend does."""
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp(-1, 1).reshape(-1)
    if rem:
        tail_absmax = flat[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax.reshape(1)])
        scaled = torch.cat([scaled, (flat[full:] / tail_absmax).clamp(-1, 1)])
    return absmax, scaled


@functools.lru_cache(maxsize=None)
def _4bit_search_table(quant_type: str):
    code = _stored_code(quant_type, "cpu")
    order = torch.sort(code, stable=True).indices
    sorted_code = code[order]
    midpoints = (sorted_code[:-1] + sorted_code[1:]) / 2
    return midpoints, order


def _quantize_4bit_codes(scaled: torch.Tensor, quant_type: str) -> torch.Tensor:
    midpoints, order = _4bit_search_table(quant_type)
    pos = torch.bucketize(scaled, midpoints.to(scaled.device))
    return order.to(scaled.device)[pos].to(torch.uint8)


_GRID = 65536  # bnb 0.50 CPU 8-bit quantiser resolution over [-1, 1]


@functools.lru_cache(maxsize=None)
def _dynamic_grid_lookup() -> torch.Tensor:
    code = _dynamic_map_cpu()
    midpoints = 0.5 * (code[:-1] + code[1:])
    grid = -1.0 + (2.0 * torch.arange(_GRID, dtype=torch.float32)) / (_GRID - 1)
    return torch.searchsorted(midpoints, grid).to(torch.uint8)


def _quantize_dynamic_8bit(values: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE):
    """float32 [n] -> (uint8 codes [n], float32 absmax [ceil(n / blocksize)])."""
    n = values.numel()
    nb = _num_blocks(n, blocksize)
    padded = torch.nn.functional.pad(values, (0, nb * blocksize - n))
    # NaN does not win the max in bnb's C loop (std::max keeps the running value)
    absmax = torch.nan_to_num(padded.view(nb, blocksize).abs(), nan=0.0).amax(dim=1)
    inv = 1.0 / absmax
    scaled = (padded.view(nb, blocksize) * inv.unsqueeze(1)).reshape(-1)[:n]
    grid_pos = (((scaled.clamp(-1.0, 1.0) + 1.0) * 0.5) * (_GRID - 1) + 0.5).to(torch.int64)
    codes = _dynamic_grid_lookup().to(values.device)[grid_pos.clamp(0, _GRID - 1)]
    zero_block = (absmax == 0).repeat_interleave(blocksize)[:n]
    codes = torch.where(zero_block, torch.zeros_like(codes), codes)
    return codes, absmax


def quantize_4bit(weight: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64,
                  double_quant: bool = True, quant_storage: torch.dtype = torch.uint8):
    """Quantise `weight` [N, K] (fp32/fp16/bf16) to bitsandbytes' 4-bit format.

    Returns (packed, QuantState): packed is `[ceil(N*K/2), 1]` of `quant_storage`, byte i holding
    value 2i in its high nibble and 2i+1 in its low nibble; identical to
    `bitsandbytes.functional.quantize_4bit(weight, blocksize, compress_statistics=double_quant,
    quant_type, quant_storage)` on the CPU, byte for byte.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a tensor, got {type(weight).__name__}")
    if weight.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"weight must be float32, float16 or bfloat16, got {weight.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    if weight.numel() == 0:
        raise ValueError(f"weight is empty (shape {tuple(weight.shape)})")
    _check_quant_type(quant_type)
    _check_blocksize(blocksize)
    if quant_storage not in STORAGE_DTYPES:
        raise TypeError(f"quant_storage must be one of {STORAGE_DTYPES}, got {quant_storage}")
    if weight.device.type == "meta":
        raise ValueError("weight is on the meta device: it has no values to quantise")

    flat = weight.reshape(-1).float()
    absmax, scaled = _blockwise_absmax_scaled(flat, blocksize)
    if scaled.numel() % 2:  # odd N*K: the last low nibble encodes the value 0.0, as in bnb
        scaled = torch.cat([scaled, scaled.new_zeros(1)])
    codes = _quantize_4bit_codes(scaled, quant_type)
    packed = (codes[0::2] << 4) | codes[1::2]
    if quant_storage != torch.uint8:
        itemsize = torch.empty((), dtype=quant_storage).element_size()
        if packed.numel() % itemsize:
            raise ValueError(
                f"quant_storage={quant_storage} needs the packed size ({packed.numel()} bytes) "
                f"to be a multiple of {itemsize}; shape {tuple(weight.shape)} is not")
        packed = packed.view(quant_storage)
    packed = packed.unsqueeze(1)

    code = _stored_code(quant_type, weight.device)
    if double_quant:
        offset = absmax.mean()
        qabsmax, absmax2 = _quantize_dynamic_8bit(absmax - offset)
        state2 = QuantState(absmax=absmax2, code=dynamic_map(weight.device),
                            blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
        state = QuantState(absmax=qabsmax, shape=weight.shape, code=code, blocksize=blocksize,
                           quant_type=quant_type, dtype=weight.dtype, offset=offset,
                           state2=state2)
    else:
        state = QuantState(absmax=absmax, shape=weight.shape, code=code, blocksize=blocksize,
                           quant_type=quant_type, dtype=weight.dtype)
    return packed, state


# ----------------------------------------------------------------------------- dequantize

def decode_absmax(state: QuantState) -> torch.Tensor:
    """float32 absmax [nblocks]; for double quant `code2[q] * absmax2[b // 256] + offset`,
    as two separately rounded float32 operations (what bnb does)."""
    if not state.nested:
        return state.absmax.float()
    s2 = state.state2
    q = state.absmax.to(torch.int64)
    blocks = torch.arange(q.numel(), device=q.device) // s2.blocksize
    return s2.code[q] * s2.absmax[blocks] + state.offset


def dequantize_4bit_torch(packed: torch.Tensor, state: QuantState,
                          dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Pure-PyTorch decoding of a packed weight to `dtype` [N, K] (the reference decoder)."""
    dtype = state.dtype if dtype is None else dtype
    n = state.numel
    raw = packed_bytes(packed)[: -(-n // 2)].to(torch.int64)
    nibbles = torch.stack([raw >> 4, raw & 0xF], dim=1).reshape(-1)[:n]
    blocks = torch.arange(n, device=raw.device) // state.blocksize
    values = code_table(state.quant_type, raw.device)[nibbles] * decode_absmax(state)[blocks]
    return values.to(dtype).view(state.shape)
