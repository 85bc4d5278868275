"""welore: find, measure and exploit the low-rank structure of language-model weights.

    import welore
    loaded = welore.load_model("smollm2-135m")              # or a folder, .gguf file, hub id
    analysis = welore.analyze(loaded.model, ratio=0.1)      # spectra, metrics, rank plan
    report = welore.compress_(loaded.model, welore.CompressConfig(ratio=0.1, method="welore"))
    welore.save(loaded.model, "out/smollm2-welore", tokenizer=loaded.tokenizer)
    model = welore.load("out/smollm2-welore")              # no SVD recomputed
    result = welore.finetune(model, loaded.tokenizer, welore.FinetuneConfig(mode="lrc"))  # train the LRC factors
"""

__version__ = "0.1.0"  # before the imports: checkpoint.py records it

from welore.analyze import Analysis, analyze
from welore.checkpoint import densify_, export_dense, load, save
from welore.compress import CompressConfig, CompressReport, apply_plan_, compress_
from welore.errors import WeloreError
from welore.evaluate import EvalResult, evaluate, perplexity
from welore.finetune import FinetuneConfig, FinetuneResult, finetune
from welore.models import load_model
from welore.modules import LowRankLinear
from welore.plan import POLICIES, RankPlan, allocate
from welore.quantize import QuantConfig, QuantizedLinear, QuantPlan, QuantReport, quantize_

__all__ = [
    "POLICIES", "Analysis", "CompressConfig", "CompressReport", "EvalResult", "FinetuneConfig", "FinetuneResult",
    "LowRankLinear", "QuantConfig", "QuantPlan", "QuantReport", "QuantizedLinear", "quantize_",
    "RankPlan", "WeloreError", "allocate", "analyze", "apply_plan_", "compress_", "densify_",
    "evaluate", "export_dense", "finetune", "load", "load_model", "perplexity", "save",
]
