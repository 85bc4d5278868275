"""Weight-only quantization of the target matrices, with low-rank compensation of its error.

    report = welore.quantize_(model, QuantConfig(bits=3, group_size=64, compensate_rank=32), calibration=windows)

Every target matrix becomes a `QuantizedLinear`: b-bit codes packed 8 to `b` bytes, a float16
scale and offset per group of `group_size` weights, and optional rank-r compensation factors.
The package reads bottom to top (no module imports one above it):

    module.py       the packed layer `QuantizedLinear` and the bit packing (imports no compression code)
    quantizers.py   how codes are chosen: the `QUANTIZERS` registry (rtn, hqq, gptq), `quantize_weight`
    plan.py         `QuantPlan` (per-matrix bits, groups, ranks; saved as JSON) and `QuantConfig`
    compensate.py   EoRA compensation of the error and its alternation with the codes, `quantize_layer`
    allocate.py     `target_size`: per-matrix widths and ranks within a byte budget, uniform alternatives
    api.py          the entry point `quantize_`, its targets (low-rank factors included) and `apply_quant_plan_`

Each module's docstring explains its part, with the measurements behind the choices.
"""

from welore.quant.allocate import allocate_sizes, uniform_plans
from welore.quant.api import QuantReport, apply_quant_plan_, plan_quantization, quant_targets, quantize_
from welore.quant.compensate import quantize_layer
from welore.quant.module import (
    BITS,
    FACTOR_DTYPES,
    FORMATS,
    SCALE_DTYPE,
    QuantizedLinear,
    QuantizedWeight,
    check_group_size,
    dequantize,
    matrix_bytes,
    pack_codes,
    packed_bytes,
    set_factor_dtype_,
    set_scales_trainable_,
    unpack_codes,
)
from welore.quant.plan import QuantConfig, QuantPlan
from welore.quant.quantizers import QUANTIZERS, Quantizer, quantize_weight

__all__ = [
    "BITS", "FACTOR_DTYPES", "FORMATS", "QUANTIZERS", "SCALE_DTYPE", "QuantConfig", "QuantPlan",
    "QuantReport", "Quantizer", "QuantizedLinear", "QuantizedWeight", "allocate_sizes", "apply_quant_plan_",
    "check_group_size", "dequantize", "matrix_bytes", "pack_codes", "packed_bytes", "plan_quantization",
    "quant_targets", "quantize_", "quantize_layer", "quantize_weight", "set_factor_dtype_", "set_scales_trainable_",
    "uniform_plans", "unpack_codes",
]
