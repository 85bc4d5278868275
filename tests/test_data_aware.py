"""Data-aware compression end to end: `whiten` and `asvd`, sequential calibration, the CLI flags.

The tiny models of every family (LLaMA, GPT-2 with `Conv1D`, Qwen2 with q/k/v biases; in the
tests marked `every_family` also the other architectures of `conftest.OTHER_FAMILIES`, calibrated
on windows that start with BOS) are compressed through `compress_` and `welore compress`, and
checked against references computed here from first principles: XᵀX of every target's inputs X
(tokens, in) from plain forward hooks on the model, and the truncation each factorizer promises
(SVD-LLM: truncated SVD of W·S with XᵀX = S·Sᵀ, mapped back by S⁻¹; ASVD: truncated SVD of
W·diag(mean |x|^α), unscaled after).
The factorizers alone, on synthetic inputs, are tested in test_factorize.py; the block-by-block
statistics in test_calibrate.py.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import (
    MODEL_CLASSES,
    OTHER_FAMILIES,
    SMOLLM2_VOCAB,
    build_tiny,
    every_family,
    logits_of,
    tiny_config,
    token_ids,
)
from test_cli import assert_user_error, nothing_left, run
from torch import nn

from welore import CompressConfig, compress_
from welore.cli import main
from welore.data import load_text, token_windows
from welore.errors import WeloreError
from welore.io.checkpoint import load, load_checkpoint, read_record, save
from welore.io.models import load_model
from welore.lowrank.calibrate import iter_block_stats
from welore.lowrank.factorize import FACTORIZERS
from welore.lowrank.module import LowRankLinear
from welore.lowrank.plan import RankPlan
from welore.targets import find_targets, layer_index, matrix_shape, weight_matrix

DATA_AWARE = ("whiten", "asvd")
WINDOWS = dict(batch=8, length=64, seed=2)  # 512 calibration tokens, more than any target's input width


def calibration_windows(family: str | None = None) -> torch.Tensor:
    """(8, 64) token ids. For a family of OTHER_FAMILIES every window is its BOS token and 63 tokens,
    as `token_windows` cuts them for a tokenizer that adds BOS (the others get no BOS, as SmolLM2's)."""
    if family not in OTHER_FAMILIES:
        return token_ids(**WINDOWS)  # (8, 64)
    ids = token_ids(**{**WINDOWS, "length": WINDOWS["length"] - 1})  # (8, 63)
    bos = torch.full((ids.shape[0], 1), tiny_config(family).bos_token_id, dtype=ids.dtype)
    return torch.cat([bos, ids], dim=1)  # (8, 64)


def target_inputs(model: nn.Module, windows: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """name -> the inputs (tokens, in) float64 the module sees on one forward of `model`."""
    inputs: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def keep(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            inputs[name] = args[0].reshape(-1, args[0].shape[-1]).double()

        return keep

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            model(windows, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return inputs


def input_statistics(model: nn.Module, windows: torch.Tensor, names: list[str] | None = None):
    """name -> (XᵀX (in, in), mean |x| (in,)) in float64, from hooks on one forward of the whole model."""
    names = list(find_targets(model)) if names is None else names
    inputs = target_inputs(model, windows, names)  # name -> X (tokens, in)
    return {n: (inputs[n].T @ inputs[n], inputs[n].abs().sum(0) / windows.numel()) for n in names}


def reference_truncation(
    factorizer: str, w: torch.Tensor, xtx: torch.Tensor, mean_abs: torch.Tensor, rank: int
) -> torch.Tensor:
    """The rank-`rank` matrix (out, in) float64 that `factorizer` promises, computed directly."""
    w = w.detach().double()  # (out, in)
    if factorizer == "svd":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return (u[:, :rank] * s[:rank]) @ vh[:rank]
    if factorizer == "whiten":
        root = torch.linalg.cholesky(xtx)  # (in, in) S, XᵀX = S·Sᵀ
        u, s, vh = torch.linalg.svd(w @ root, full_matrices=False)
        back = torch.linalg.solve_triangular(root, vh[:rank], upper=False, left=False)  # (r, in) V_rᵀ·S⁻¹
        return (u[:, :rank] * s[:rank]) @ back
    if factorizer == "asvd":
        scale = mean_abs.clamp_min(1e-6 * mean_abs.max()).sqrt()  # (in,) α = 0.5
        u, s, vh = torch.linalg.svd(w * scale, full_matrices=False)
        return (u[:, :rank] * s[:rank]) @ vh[:rank] / scale
    raise ValueError(factorizer)


def output_error(w: torch.Tensor, approx: torch.Tensor, xtx: torch.Tensor) -> float:
    """‖(W − W_r)·Xᵀ‖_F² = tr((W − W_r)·XᵀX·(W − W_r)ᵀ) on the calibration inputs."""
    d = w.detach().double() - approx.detach().double()  # (out, in)
    return torch.trace(d @ xtx @ d.T).item()


def plan_at(model: nn.Module, rank_of) -> RankPlan:
    """A plan keeping every target matrix at rank_of(m, n)."""
    shapes = {n: matrix_shape(m) for n, m in find_targets(model).items()}
    return RankPlan(ranks={n: rank_of(*s) for n, s in shapes.items()}, shapes=shapes)


def largest_ranks(m: int, n: int) -> int:
    return (m * n - 1) // (m + n)  # the largest r with r·(m+n) < m·n


def a_third(m: int, n: int) -> int:
    return min(m, n) // 3


def assert_close_matrices(got: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    scale = expected.abs().max().item()
    assert torch.allclose(got.double(), expected, rtol=1e-4, atol=1e-5 * scale), name


# --- compress_ on the tiny models --------------------------------------------------------------


@every_family
@pytest.mark.parametrize("factorizer", DATA_AWARE)
def test_full_rank_factors_from_calibration_keep_the_logits(family: str, factorizer: str) -> None:
    """Every target factorized at rank min(m, n) with its own calibration statistics ⇒ the dense
    logits (full-rank parity; a plan never asks for such ranks, so this runs the factorizer)."""
    model = build_tiny(family)
    ids = token_ids()
    expected = logits_of(model, ids)
    targets = find_targets(model)
    replacements = {}
    for _, block_stats in iter_block_stats(model, targets, calibration_windows(family), progress=False):
        for name, stats in block_stats.items():
            w = weight_matrix(targets[name])
            up, down = FACTORIZERS[factorizer].factors(w, min(w.shape), stats)
            assert_close_matrices(up @ down, w.double(), name)
            bias = targets[name].bias.detach() if targets[name].bias is not None else None
            replacements[name] = LowRankLinear.from_factors(up, down, bias, w.dtype)
    assert set(replacements) == set(targets)
    for name, module in replacements.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module)
    assert torch.allclose(logits_of(model, ids), expected, atol=1e-4)


@every_family
@pytest.mark.parametrize("factorizer", DATA_AWARE)
def test_largest_ranks_through_compress_are_the_exact_truncation(family: str, factorizer: str) -> None:
    """A plan at the largest ranks that still save parameters, applied by compress_ with
    calibration text, gives each matrix exactly the truncation of its factorizer on the model's
    inputs, and the logits of a model holding those truncations as dense weights."""
    model = build_tiny(family)
    windows = calibration_windows(family)
    plan = plan_at(model, largest_ranks)
    stats = input_statistics(model, windows)
    reference = copy.deepcopy(model)
    truncations = {}
    with torch.no_grad():
        for name, rank in plan.ranks.items():
            weight = weight_matrix(model.get_submodule(name))
            truncations[name] = reference_truncation(factorizer, weight, *stats[name], rank)
            weight_matrix(reference.get_submodule(name)).copy_(truncations[name])

    report = compress_(model, CompressConfig(factorizer=factorizer), plan=plan, calibration=windows, progress=False)
    assert report.replaced == list(plan.ranks)
    for name, rank in plan.ranks.items():
        module = model.get_submodule(name)
        assert isinstance(module, LowRankLinear) and module.rank == rank
        assert_close_matrices(module.dense_weight(), truncations[name], name)
    ids = token_ids()
    assert torch.allclose(logits_of(model, ids), logits_of(reference, ids), atol=1e-4)


@every_family
def test_data_aware_factorizers_beat_svd_on_calibration_output_error(family: str) -> None:
    """At one cut (a third of every matrix's rank), ‖(W − W_r)·Xᵀ‖² on the calibration inputs:
    whiten is the smallest possible for every matrix, and both whiten and asvd beat plain SVD."""
    dense = build_tiny(family)
    windows = calibration_windows(family)
    plan = plan_at(dense, a_third)
    stats = input_statistics(dense, windows)
    errors = {}
    for factorizer in ("svd", *DATA_AWARE):
        model = copy.deepcopy(dense)
        calibration = windows if FACTORIZERS[factorizer].needs_stats else None
        compress_(model, CompressConfig(factorizer=factorizer), plan=plan, calibration=calibration, progress=False)
        errors[factorizer] = {
            name: output_error(weight_matrix(dense.get_submodule(name)), model.get_submodule(name).dense_weight(),
                               stats[name][0])
            for name in plan.factorized
        }
    for name in plan.factorized:  # output-optimal for every matrix (Eckart–Young in the whitened norm)
        assert errors["whiten"][name] <= errors["svd"][name] * (1 + 1e-6), name
        assert errors["whiten"][name] <= errors["asvd"][name] * (1 + 1e-6), name
    total = {f: sum(e.values()) for f, e in errors.items()}
    assert total["whiten"] < 0.9 * total["svd"], total
    assert total["asvd"] < total["svd"], total


@every_family
@pytest.mark.parametrize("factorizer", DATA_AWARE)
def test_sequential_calibrates_later_blocks_on_compressed_outputs(family: str, factorizer: str) -> None:
    """sequential=True: block 0 is factorized on the dense model's statistics, as without it;
    block 1 on the outputs of the compressed block 0, and exactly so."""
    dense = build_tiny(family)
    windows = calibration_windows(family)
    plan = plan_at(dense, a_third)
    models = {}
    for sequential in (False, True):
        models[sequential] = copy.deepcopy(dense)
        compress_(models[sequential], CompressConfig(factorizer=factorizer, sequential=sequential), plan=plan,
                  calibration=windows, progress=False)
    block = {name: layer_index(name) for name in plan.factorized}
    assert set(block.values()) == {0, 1}

    # block 0 saw the same statistics either way; block 1 did not
    for name in plan.factorized:
        plain, sequential = (models[s].get_submodule(name).dense_weight() for s in (False, True))
        if block[name] == 0:
            assert torch.allclose(sequential, plain, rtol=1e-5, atol=1e-7), name
        else:
            assert not torch.allclose(sequential, plain, rtol=1e-3, atol=1e-4), name

    # reference: the dense model with block 0 taken from the sequential result
    hybrid = copy.deepcopy(dense)
    for name in plan.factorized:
        if block[name] == 0:
            parent, _, child = name.rpartition(".")
            setattr(hybrid.get_submodule(parent), child, copy.deepcopy(models[True].get_submodule(name)))
    later = [name for name in plan.factorized if block[name] == 1]
    for stats_model, result in ((hybrid, models[True]), (dense, models[False])):
        stats = input_statistics(stats_model, windows, later)
        for name in later:
            expected = reference_truncation(factorizer, weight_matrix(dense.get_submodule(name)), *stats[name],
                                            plan.ranks[name])
            assert_close_matrices(result.get_submodule(name).dense_weight(), expected, name)


def test_whiten_compression_of_other_architectures_saves_and_loads(tmp_path: Path, other_family: str) -> None:
    """The whole data-aware compression (welore allocation on whitened spectra, whiten factors) on
    BOS-first windows, saved and loaded: the checkpoint gives the compressed model's logits."""
    model = build_tiny(other_family)
    windows = calibration_windows(other_family)
    dense_logits = logits_of(model, windows)
    report = compress_(model, CompressConfig(ratio=0.3, method="welore", factorizer="whiten", calib="x"),
                       calibration=windows, progress=False)
    assert report.replaced and report.replaced == report.plan.factorized
    low_rank = {n for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert low_rank == set(report.replaced)
    logits = logits_of(model, windows)
    assert torch.isfinite(logits).all() and not torch.allclose(logits, dense_logits, atol=1e-4)

    checkpoint = load_checkpoint(save(model, tmp_path / "ckpt", record=report.record))
    loaded = checkpoint.model
    assert type(loaded) is MODEL_CLASSES[other_family]
    assert checkpoint.record == report.record
    assert {n for n, m in loaded.named_modules() if isinstance(m, LowRankLinear)} == low_rank
    tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert (loaded.get_input_embeddings().weight is loaded.get_output_embeddings().weight) == tied
    for ids in (windows, token_ids()):
        assert torch.equal(logits_of(loaded, ids), logits_of(model, ids))


def test_compress_checks_calibration_against_the_factorizer() -> None:
    windows = calibration_windows()
    cases = [
        (CompressConfig(ratio=0.2, factorizer="whiten"), None, "needs calibration text"),
        (CompressConfig(ratio=0.2, factorizer="asvd", sequential=True), None, "needs calibration text"),
        (CompressConfig(ratio=0.2, factorizer="svd"), windows, "data-free"),
        (CompressConfig(ratio=0.2, factorizer="svd", sequential=True), None, "sequential"),
    ]
    for config, calibration, match in cases:
        model = build_tiny("llama")
        with pytest.raises(WeloreError, match=match):
            compress_(model, config, calibration=calibration, progress=False)
        assert not any(isinstance(m, LowRankLinear) for m in model.modules()), config


# --- the CLI: --factorizer, --calib, --calib-tokens, --calib-seq-len, --sequential -----------------

CALIB = ["--calib-tokens", "256", "--calib-seq-len", "32"]  # 8 windows of 32 tokens
RUNS = [("whiten", False), ("whiten", True), ("asvd", True)]


@pytest.fixture(scope="module")
def calibrated_checkpoints(tmp_path_factory: pytest.TempPathFactory, cli_model_dir: Path, english_text_file: Path):
    """(factorizer, sequential) -> checkpoint written by `welore compress --calib ...`."""
    folder = tmp_path_factory.mktemp("calibrated")
    checkpoints = {}
    for factorizer, sequential in RUNS:
        out = folder / f"{factorizer}-{sequential}"
        argv = ["compress", "-q", str(cli_model_dir), "--ratio", "0.3", "--method", "minimax",
                "--factorizer", factorizer, "--calib", str(english_text_file), *CALIB, "--out", str(out)]
        assert main(argv + (["--sequential"] if sequential else [])) == 0
        checkpoints[factorizer, sequential] = out
    return checkpoints


@pytest.mark.parametrize(("factorizer", "sequential"), RUNS)
def test_cli_calibrated_compress_is_the_api_run(calibrated_checkpoints, cli_model_dir: Path, english_text_file: Path,
                                                factorizer: str, sequential: bool) -> None:
    """The flags reach compress_: the checkpoint records them and holds what the API makes from
    the same calibration windows."""
    folder = calibrated_checkpoints[factorizer, sequential]
    saved, record = load(folder), read_record(folder)
    config = record.compress_config
    assert (config.factorizer, config.sequential) == (factorizer, sequential)
    assert (config.calib, config.calib_tokens) == (str(english_text_file), 256)

    loaded = load_model(str(cli_model_dir))
    windows = token_windows(loaded.tokenizer, load_text(str(english_text_file), split="calib"), 32, 256)
    assert windows.shape == (8, 32)
    api_config = CompressConfig(ratio=0.3, method="minimax", factorizer=factorizer, sequential=sequential)
    report = compress_(loaded.model, api_config, calibration=windows, progress=False)
    assert report.plan.ranks == record.plan.ranks
    assert report.plan.factorized
    ids = token_ids(vocab=SMOLLM2_VOCAB)
    assert torch.allclose(logits_of(saved, ids), logits_of(loaded.model, ids), atol=1e-5)


def test_cli_sequential_changes_only_the_later_blocks(calibrated_checkpoints) -> None:
    plain, sequential = load(calibrated_checkpoints["whiten", False]), load(calibrated_checkpoints["whiten", True])
    plan = read_record(calibrated_checkpoints["whiten", False]).plan
    assert plan.ranks == read_record(calibrated_checkpoints["whiten", True]).plan.ranks  # from the dense model
    changed = set()
    for name in plan.factorized:
        a, b = plain.get_submodule(name).dense_weight(), sequential.get_submodule(name).dense_weight()
        if not torch.allclose(a, b, rtol=1e-4, atol=1e-6):
            changed.add(layer_index(name))
    assert changed == {1}


def test_cli_reports_the_calibration(capsys, tmp_path: Path, cli_model_dir: Path, english_text_file: Path) -> None:
    code, out, err = run(capsys, "compress", cli_model_dir, "--ratio", "0.2", "--factorizer", "asvd",
                         "--calib", english_text_file, *CALIB, "--out", tmp_path / "ckpt")
    assert code == 0, err
    assert f"factorizer asvd, calibrated on 256 tokens of {english_text_file}" in out


def test_cli_factorizer_params_reach_the_factors(capsys, tmp_path: Path, cli_model_dir: Path,
                                                english_text_file: Path) -> None:
    """--factorizer-param alpha=0 makes asvd plain SVD (unit scales): the checkpoint records the
    typed value and holds the same factors as --factorizer svd at the same plan."""
    common = ["--ratio", "0.3", "--method", "uniform"]
    code, out, err = run(capsys, "compress", cli_model_dir, *common, "--factorizer", "asvd", "--factorizer-param",
                         "alpha=0", "--calib", english_text_file, *CALIB, "--out", tmp_path / "asvd0")
    assert code == 0, err
    assert "factorizer asvd alpha=0, calibrated on 256 tokens" in out
    code, out, err = run(capsys, "compress", cli_model_dir, *common, "--data-free", "--out", tmp_path / "svd")
    assert code == 0, err
    asvd0, svd = load(tmp_path / "asvd0"), load(tmp_path / "svd")
    assert read_record(tmp_path / "asvd0").compress_config.factorizer_params == {"alpha": 0.0}
    plan = read_record(tmp_path / "svd").plan
    assert read_record(tmp_path / "asvd0").plan.ranks == plan.ranks
    for name in plan.factorized:
        assert torch.allclose(asvd0.get_submodule(name).dense_weight(), svd.get_submodule(name).dense_weight(),
                              atol=1e-5)


def test_cli_unknown_factorizer(capsys, tmp_path: Path, cli_model_dir: Path, english_text_file: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", str(cli_model_dir), "--ratio", "0.2", "--factorizer", "qr", "--calib", str(english_text_file),
              "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert "argument --factorizer: invalid choice: 'qr'" in err.strip().splitlines()[-1]
    assert "Traceback" not in out + err
    assert nothing_left(tmp_path, "out")


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (["--factorizer", "whiten", "--calib", "TEXT", "--calib-tokens", "0"],
         "--calib-tokens must be a positive integer"),
        (["--factorizer", "whiten", "--calib", "TEXT", "--calib-seq-len", "0"],
         "--calib-seq-len must be a positive integer"),
        (["--factorizer", "whiten", "--calib", "MISSING"], "does not exist"),
        (["--factorizer", "svd", "--calib", "TEXT"], "data-free"),
        (["--factorizer", "whiten"], "--calib"),
        (["--factorizer", "asvd", "--sequential"], "--calib"),
        (["--data-free", "--sequential"], "--sequential"),
        (["--factorizer", "whiten", "--calib", "SHORT"], "--calib-seq-len"),
        (["--factorizer", "whiten", "--calib", "TEXT", "--calib-tokens", "100"], "--calib-tokens"),
        (["--factorizer", "whiten", "--calib", "TEXT", "--calib-seq-len", "1"], "--calib-seq-len"),
        (["--factorizer", "whiten", "--calib", "TEXT", "--factorizer-param", "alpha=1"],
         "The whiten factorizer has no parameter alpha; it takes shrinkage"),
        (["--factorizer", "asvd", "--calib", "TEXT", "--factorizer-param", "alpha=big"], "alpha must be a number"),
        (["--factorizer", "whiten", "--calib", "TEXT", "--factorizer-param", "shrinkage=-1"], "non-negative"),
    ],
    ids=["calib-tokens-0", "calib-seq-len-0", "missing-calib-file", "calib-with-svd", "whiten-without-calib",
         "asvd-sequential-without-calib", "sequential-with-svd", "calib-text-too-short", "calib-tokens-below-a-window",
         "calib-seq-len-1", "param-of-another-factorizer", "param-not-a-number", "param-out-of-range"],
)
def test_cli_bad_calibration_options(capsys, tmp_path: Path, cli_model_dir: Path, english_text_file: Path,
                                     options: list[str], match: str) -> None:
    short = tmp_path / "short.txt"
    short.write_text("Far too short to calibrate anything.")
    paths = {"TEXT": str(english_text_file), "MISSING": str(tmp_path / "missing.txt"), "SHORT": str(short)}
    code, out, err = run(capsys, "compress", cli_model_dir, "--ratio", "0.2", *[paths.get(o, o) for o in options],
                         "--out", tmp_path / "out")
    assert_user_error(code, out, err, match=match)
    assert nothing_left(tmp_path, "out")
