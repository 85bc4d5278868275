"""Devices and dtypes: `--device`, `--dtype auto`, factors in the model's dtype, float64 where
it matters on every device. Runs on the CPU; the CUDA tests skip without a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import build_tiny, save_model_folder, token_ids

from welore import CompressConfig, compress_
from welore.cli import main
from welore.devices import check_device, float64_device, resolve_device
from welore.errors import WeloreError
from welore.io.models import LoadOptions, load_model
from welore.lowrank.calibrate import InputStats
from welore.lowrank.factorize import svd_factors, top_factors
from welore.lowrank.module import LowRankLinear

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_auto_is_the_accelerator_when_there_is_one() -> None:
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert resolve_device("auto").type == expected
    assert resolve_device(None).type == expected
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "CPU", "cuda:", ""])
def test_malformed_devices_are_user_errors(spec: str) -> None:
    with pytest.raises(WeloreError, match="Unknown device.*use one of auto, cpu, cuda"):
        check_device(spec)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_missing_gpu_is_one_clear_sentence() -> None:
    with pytest.raises(WeloreError, match="asks for a CUDA GPU and there is none here; use --device cpu or auto"):
        resolve_device("cuda")
    with pytest.raises(WeloreError, match="there is none here"):
        LoadOptions(device="cuda:1")


def test_mps_work_in_float64_runs_on_the_cpu() -> None:
    assert float64_device("mps") == torch.device("cpu")
    assert float64_device(torch.device("cpu")) == torch.device("cpu")
    assert float64_device("cuda:1") == torch.device("cuda:1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("command", ["analyze", "compress", "evaluate", "compare"])
def test_cli_refuses_a_missing_gpu(command: str, cli_model_dir: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture) -> None:
    argv = [command, "-q", str(cli_model_dir), "--device", "cuda"]
    if command == "compress":
        argv += ["--ratio", "0.2", "--out", str(tmp_path / "out")]
    if command == "compare":
        argv.insert(3, str(cli_model_dir))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("welore: error: --device cuda asks for a CUDA GPU"), err
    assert not (tmp_path / "out").exists()


def test_dtype_auto_keeps_the_stored_dtype_and_factors_follow_it(tmp_path: Path) -> None:
    model = build_tiny("llama").to(torch.bfloat16)
    folder = save_model_folder(model, None, tmp_path / "bf16")
    loaded = load_model(str(folder))  # dtype auto, device auto
    assert loaded.model.dtype == torch.bfloat16
    assert loaded.model.device == resolve_device("auto")
    assert load_model(str(folder), dtype="float32").model.dtype == torch.float32
    compress_(loaded.model, CompressConfig(ratio=0.3, method="uniform"), progress=False)
    factored = [m for m in loaded.model.modules() if isinstance(m, LowRankLinear)]
    assert factored and all(m.up.weight.dtype == m.down.weight.dtype == torch.bfloat16 for m in factored)


def test_data_aware_compression_of_a_bf16_model_keeps_float64_statistics(tmp_path: Path) -> None:
    model = build_tiny("llama").to(torch.bfloat16)
    windows = token_ids(batch=4, length=16)
    compress_(model, CompressConfig(ratio=0.3, method="uniform", factorizer="whiten"), calibration=windows,
              progress=False)
    factored = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert factored and all(m.up.weight.dtype == torch.bfloat16 for m in factored)
    stats = InputStats.zeros(8)
    stats.add_(torch.randn(3, 8, dtype=torch.bfloat16))
    assert stats.xtx.dtype == torch.float64


@cuda
def test_factors_on_cuda_match_the_cpu() -> None:
    w = torch.randn(96, 64, generator=torch.Generator().manual_seed(0))
    up, down = top_factors(w.cuda(), 20)
    assert up.device.type == "cuda" and up.dtype == torch.float64
    reference = torch.matmul(*top_factors(w, 20))
    assert torch.allclose((up @ down).cpu(), reference, atol=1e-10)
    up32, down32 = svd_factors(w.cuda().to(torch.bfloat16), 20)
    assert up32.device.type == "cuda" and up32.dtype == torch.float32


def _logits_on_cpu_and_cuda(change) -> list[torch.Tensor]:
    """The tiny model's logits after `change(model, windows)` in place, on the CPU and on the GPU."""
    windows = token_ids(batch=4, length=16)
    results = []
    for device in ("cpu", "cuda"):
        model = build_tiny("llama").to(device)
        change(model, windows)
        with torch.no_grad():
            results.append(model(windows.to(device)).logits.float().cpu())
    return results


@cuda
def test_compress_on_cuda_matches_the_cpu() -> None:
    cpu, gpu = _logits_on_cpu_and_cuda(lambda model, windows: compress_(
        model, CompressConfig(ratio=0.3, method="uniform", factorizer="whiten"), calibration=windows, progress=False))
    assert torch.allclose(cpu, gpu, atol=1e-3)


@cuda
def test_quantization_with_alternating_compensation_on_cuda_matches_the_cpu() -> None:
    from welore.quant import QuantConfig, quantize_

    config = QuantConfig(bits=3, group_size=32, compensate_rank=4, compensate_iters=3)
    cpu, gpu = _logits_on_cpu_and_cuda(lambda model, windows: quantize_(model, config, calibration=windows,
                                                                        progress=False))
    assert torch.allclose(cpu, gpu, atol=1e-3)
