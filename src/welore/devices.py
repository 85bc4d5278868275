"""Where work runs: `--device {auto,cpu,cuda,cuda:N,mps}` (and `device=` in the API) -> a torch.device.

`auto` is the accelerator when there is one (a CUDA GPU, else Apple's MPS), else the CPU. A
device that is not there, or a name torch does not know, is one clear `WeloreError` at once,
not a CUDA traceback minutes later.

The model, the calibration forwards, the XᵀX accumulation, the spectra and the factorizations
run on the chosen device. The numerically sensitive steps (XᵀX, Cholesky/eigh, the Gram
matrices and their eigen-decompositions) run in float64 there; MPS has no float64, so for a
model on MPS they run in float64 on the CPU (`float64_device`).
"""

from __future__ import annotations

import torch

from welore.errors import WeloreError

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")  # the accepted spellings (N = a GPU's index)


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The torch.device that `spec` names, checked to exist on this machine."""
    if spec is None or spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise WeloreError(f"Unknown device {str(spec)!r}; use one of {', '.join(DEVICES)}.")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise WeloreError(f"--device {spec} asks for a CUDA GPU and there is none here; use --device cpu or auto.")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise WeloreError(f"--device {spec} asks for GPU {device.index} and this machine has {count} "
                              f"(cuda:0 to cuda:{count - 1}); use one of those or --device cuda.")
    if device.type == "mps" and not _mps_available():
        raise WeloreError(f"--device {spec} asks for Apple's MPS and it is not available here; "
                          "use --device cpu or auto.")
    if device.type == "cpu":
        return torch.device("cpu")
    return device


def check_device(spec: str) -> None:
    """Raise the one-sentence `WeloreError` of `resolve_device` for a device that is not here."""
    resolve_device(spec)


def float64_device(device: torch.device | str) -> torch.device:
    """Where float64 work for tensors on `device` runs: the device itself, or the CPU for MPS."""
    device = torch.device(device)
    return torch.device("cpu") if device.type == "mps" else device
