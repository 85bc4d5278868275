"""The quantization plan and config: what to store, as data.

`QuantPlan` is the outcome, per target matrix: its (out, in) shape, code width, group size and
compensation rank, with the quantizer and factor dtype as provenance. It is saved beside the
rank plan (`quant_plan.json`), and loading a checkpoint applies it to empty modules without
quantizing again. `QuantConfig` is what a user asks for (one width for every matrix, or a
`target_size` in bytes that `welore.quant.allocate` turns into per-matrix widths and ranks),
the quantize stage of a recipe (`welore.recipe`); both round-trip through JSON with a version.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from welore._io import parse_bytes, write_json
from welore.errors import WeloreError
from welore.quant.module import BITS, FACTOR_DTYPES, check_group_size, matrix_bytes
from welore.quant.quantizers import QUANTIZERS

QUANT_PLAN_VERSION = 1
CONFIG_VERSION = 1


@dataclass
class QuantPlan:
    """Per target matrix: its (out, in) shape, code width, group size and compensation rank."""

    shapes: dict[str, tuple[int, int]]  # module name -> (out_features, in_features)
    bits: dict[str, int]  # module name -> code width
    group_size: dict[str, int]  # module name -> weights per scale/offset pair
    ranks: dict[str, int]  # module name -> compensation rank (0 = none)
    quantizer: str = "rtn"  # how the codes were chosen (provenance)
    factor_dtype: str = "float16"  # storage dtype of the compensation factors
    compensate_iters: int = 1  # rounds of quantization/compensation alternation (1 = EoRA; provenance)
    requested_bytes: int | None = None  # the target size asked for, if any
    meta: dict = field(default_factory=dict)  # free-form provenance
    version: int = QUANT_PLAN_VERSION

    def __post_init__(self) -> None:
        names = set(self.shapes)
        if not (set(self.bits) == set(self.group_size) == set(self.ranks) == names):
            raise WeloreError("The quantization plan's entries name different matrices; regenerate it.")
        for name, shape in self.shapes.items():
            if self.bits[name] not in BITS:
                raise WeloreError(f"The quantization plan gives {name} {self.bits[name]} bits; "
                                  f"use one of {', '.join(map(str, BITS))}.")
            check_group_size(shape, self.group_size[name], name)
            if not 0 <= self.ranks[name] <= min(shape):
                raise WeloreError(f"The quantization plan gives {name} ({shape[0]}x{shape[1]}) compensation rank "
                                  f"{self.ranks[name]}; use 0 to {min(shape)}.")
        if self.factor_dtype not in FACTOR_DTYPES:
            raise WeloreError(f"Unknown factor dtype {self.factor_dtype!r}; choose one of {', '.join(FACTOR_DTYPES)}.")

    def matrix_bytes(self, name: str) -> int:
        factor_bytes = torch.tensor([], dtype=FACTOR_DTYPES[self.factor_dtype]).element_size()
        return matrix_bytes(self.shapes[name], self.bits[name], self.group_size[name], self.ranks[name], factor_bytes)

    @property
    def nbytes(self) -> int:
        """Stored bytes of all target matrices (codes, scales, offsets, factors)."""
        return sum(self.matrix_bytes(n) for n in self.shapes)

    @property
    def params(self) -> int:
        return sum(m * n for m, n in self.shapes.values())

    @property
    def bits_per_param(self) -> float:
        return 8 * self.nbytes / self.params

    def to_dict(self) -> dict:
        return {
            "format": "welore-quant-plan", "version": self.version, "quantizer": self.quantizer,
            "factor_dtype": self.factor_dtype, "compensate_iters": self.compensate_iters,
            "requested_bytes": self.requested_bytes, "bytes": self.nbytes,
            "meta": self.meta,
            "matrices": {
                n: {"shape": list(s), "bits": self.bits[n], "group_size": self.group_size[n], "rank": self.ranks[n]}
                for n, s in self.shapes.items()
            },
        }

    @classmethod
    def from_dict(cls, data: dict) -> QuantPlan:
        from welore.versioned import check_version

        if not isinstance(data, dict) or data.get("format") != "welore-quant-plan":
            raise WeloreError("This JSON is not a welore quantization plan; pass a plan written by welore.")
        check_version(data, "version", QUANT_PLAN_VERSION, "The quantization plan")
        matrices = data.get("matrices") or {}
        try:
            return cls(
                shapes={n: (int(e["shape"][0]), int(e["shape"][1])) for n, e in matrices.items()},
                bits={n: int(e["bits"]) for n, e in matrices.items()},
                group_size={n: int(e["group_size"]) for n, e in matrices.items()},
                ranks={n: int(e["rank"]) for n, e in matrices.items()},
                quantizer=data.get("quantizer", "rtn"), factor_dtype=data.get("factor_dtype", "float16"),
                compensate_iters=int(data.get("compensate_iters", 1)), requested_bytes=data.get("requested_bytes"),
                meta=data.get("meta", {}),
            )
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise WeloreError(f"A matrix entry of the quantization plan is malformed ({err!r}); "
                              "regenerate the plan.") from None

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> QuantPlan:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise WeloreError(f"Cannot read quantization plan {path} ({err}); re-create the checkpoint.") from None


def _quantizers() -> list[str]:
    return list(QUANTIZERS)


def _factor_dtypes() -> list[str]:
    return list(FACTOR_DTYPES)


SHARED = {"cli": False}  # a field whose command-line option is the lowrank stage's (--targets, --calib, ...) or
    # the command's own (--quantize, --target-size): `welore compress` reads it from there


@dataclass
class QuantConfig:
    bits: int | None = field(default=4, metadata=SHARED)  # code width (8, 4, 3, 2; --quantize int4); None when
        # target_size chooses it per matrix
    group_size: int = 64  # consecutive weights of a row sharing one scale and zero point
    quantizer: str = field(default="rtn", metadata={"choices": _quantizers})  # rtn: round to nearest on each
        # group's min/max grid; hqq: HQQ's optimised zero points; gptq: GPTQ's error feedback on the
        # calibration inputs (needs --calib)
    compensate_rank: int = 0  # rank of a correction of the quantization error:
        # EoRA with --calib, weight-space SVD without
    compensate_iters: int = 1  # rounds alternating quantization of W − up·down and refitting the
        # compensation to what it leaves (LQ-LoRA/CALDERA); the best round is kept; 1 = EoRA alone
    target_size: int | str | None = field(default=None, metadata=SHARED)  # bytes of all target matrices (codes,
        # scales, offsets, factors), or a size such as "60MB" (10^6 bytes) or "57MiB" (2^20 bytes)
    target_bits: tuple[int, ...] = field(default=BITS, metadata=SHARED)  # widths target_size may choose from
    max_compensate_rank: int = 256  # largest compensation rank --target-size may give a matrix
    factor_dtype: str = field(default="float16", metadata={"choices": _factor_dtypes})  # storage dtype of the
        # compensation factors
    targets: list[str] | None = field(default=None, metadata=SHARED)  # module-name patterns; None = decoder-block
        # Linears (after a lowrank stage: the factors of its matrices and those it kept dense)
    calib: str | None = field(default=None, metadata=SHARED)  # calibration text (welore.data.load_text); with it,
        # compensation is EoRA's, the size allocation weighs output error, and gptq can run
    calib_tokens: int | None = field(default=8192, metadata=SHARED)  # calibration tokens (with calib; as used)
    calib_seq_len: int | None = field(default=512, metadata=SHARED)  # tokens per calibration window (with calib)
    bos: str | None = field(default="auto", metadata=SHARED)  # BOS first in each window: auto, yes or no (recorded
        # as used: yes or no; welore.data.resolve_bos)
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.target_size, str):
            self.target_size = parse_bytes(self.target_size, "size", "60MB")
        if self.target_size is None:
            if self.bits not in BITS:
                raise WeloreError(f"Cannot quantize to {self.bits} bits; choose one of "
                                  f"{', '.join(f'int{b}' for b in BITS)}.")
        elif self.target_size <= 0:
            raise WeloreError(f"Target size {self.target_size} bytes is not positive; ask for e.g. 60MB.")
        else:
            self.bits = None  # the allocation chooses every width
        if self.group_size < 1:
            raise WeloreError(f"Group size {self.group_size} must be a positive integer, e.g. 64.")
        if self.quantizer not in QUANTIZERS:
            raise WeloreError(f"Unknown quantizer {self.quantizer!r}; choose one of {', '.join(QUANTIZERS)}.")
        if self.compensate_rank < 0:
            raise WeloreError(f"Compensation rank {self.compensate_rank} is negative; use 0 (none) or e.g. 32.")
        if self.max_compensate_rank < 0:
            raise WeloreError(f"Largest compensation rank {self.max_compensate_rank} is negative; use 0 (bits only) "
                              "or e.g. 256.")
        if self.compensate_iters < 1:
            raise WeloreError(f"Compensation rounds {self.compensate_iters} must be at least 1, e.g. 4.")
        if self.compensate_iters > 1 and not self.compensate_rank and self.target_size is None:
            raise WeloreError("Alternating rounds need a compensation to alternate with; add --compensate-rank, "
                              "e.g. 8.")
        if self.factor_dtype not in FACTOR_DTYPES:
            raise WeloreError(f"Unknown factor dtype {self.factor_dtype!r}; choose one of {', '.join(FACTOR_DTYPES)}.")
        self.target_bits = tuple(self.target_bits)
        if not self.target_bits or any(b not in BITS for b in self.target_bits):
            raise WeloreError(f"Target bit widths {self.target_bits} must be among {', '.join(map(str, BITS))}.")
        from welore.data import settle_calibration_

        settle_calibration_(self)

    @property
    def needs_calibration(self) -> str | None:
        """What cannot run without calibration text (None when everything can)."""
        return f"The {self.quantizer} quantizer" if QUANTIZERS[self.quantizer].needs_stats else None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, what: str = "The quantization config") -> QuantConfig:
        from welore.data import LEGACY_BOS
        from welore.versioned import config_from_dict

        data = dict(data)
        if data.get("calib") and "bos" not in data:  # earlier versions: windows never started with BOS
            data["bos"] = LEGACY_BOS
        return config_from_dict(cls, data, what, CONFIG_VERSION)
