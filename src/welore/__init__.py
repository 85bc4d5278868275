"""welore: find, measure and exploit the low-rank structure of language-model weights.

    import welore
    loaded = welore.load_model("smollm2-135m")              # or a folder, .gguf file, hub id
    analysis = welore.analyze(loaded.model, ratio=0.1)      # spectra, metrics, rank plan
    recipe = welore.Recipe([welore.CompressConfig(ratio=0.1, method="welore"), welore.QuantConfig(bits=8)])
    report = welore.compress_(loaded.model, recipe, loaded.tokenizer)   # or one stage: compress_(model, config)
    welore.save(loaded.model, "out/smollm2-welore", tokenizer=loaded.tokenizer, record=report.record)
    model = welore.load("out/smollm2-welore")              # no SVD recomputed
    result = welore.finetune(model, loaded.tokenizer, welore.FinetuneConfig(mode="lrc"))  # train the LRC factors
"""

__version__ = "0.1.0"  # before the imports: checkpoint.py records it

from welore.analyze import Analysis, analyze
from welore.errors import WeloreError
from welore.eval.evaluate import EvalResult, evaluate, perplexity
from welore.finetune import FinetuneConfig, FinetuneResult, finetune
from welore.io.checkpoint import Checkpoint, densify_, export_dense, load, load_checkpoint, save
from welore.io.models import load_model
from welore.lowrank.compress import CompressConfig, apply_plan_
from welore.lowrank.module import LowRankLinear
from welore.lowrank.plan import POLICIES, RankPlan, allocate
from welore.quant import QuantConfig, QuantizedLinear, QuantPlan, QuantReport, quantize_
from welore.recipe import CompressReport, Recipe, Record, compress_

__all__ = [
    "POLICIES", "Analysis", "Checkpoint", "CompressConfig", "CompressReport", "EvalResult", "FinetuneConfig",
    "FinetuneResult", "LowRankLinear", "QuantConfig", "QuantPlan", "QuantReport", "QuantizedLinear", "RankPlan",
    "Recipe", "Record", "WeloreError", "allocate", "analyze", "apply_plan_", "compress_", "densify_", "evaluate",
    "export_dense", "finetune", "load", "load_checkpoint", "load_model", "perplexity", "quantize_", "save",
]
