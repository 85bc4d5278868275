"""Tests of welore.optim: GaLoreAdamW and FiraAdamW against AdamW, against the update formulas
written out by hand, their projectors, checkpoint resume, RNG independence, validation, and a
tiny LLaMA that trains with each."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from welore.errors import WeloreError
from welore.optim import FiraAdamW, GaLoreAdamW, OptimizerConfigError, ProjType
from welore.optim.projection import REFRESH_METHODS, svd_refresh

BETAS, EPS = (0.9, 0.999), 1e-8


def matrices(*shapes: tuple[int, ...], seed: int = 0) -> list[nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(*s, generator=generator)) for s in shapes]


def gradients(params: list[torch.Tensor], steps: int, seed: int = 1) -> list[list[torch.Tensor]]:
    """Fixed gradients per step (a shared low-rank part plus noise, as real gradients have)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    bases = [torch.randn(*p.shape, generator=generator) for p in params]
    for _ in range(steps):
        out.append([0.5 * b + 0.3 * torch.randn(*b.shape, generator=generator) for b in bases])
    return out


def run(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], grads: list[list[torch.Tensor]]) -> None:
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        optimizer.step()


def decaying(m: int, n: int, tau: float, seed: int = 0) -> torch.Tensor:
    """U·diag(exp(−i/τ))·Vᵀ: a gradient whose spectrum decays like real ones."""
    generator = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=generator))
    return (u * torch.exp(-torch.arange(k) / tau)) @ v.T


# --- parity with torch.optim.AdamW -----------------------------------------------------------


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("cls", [GaLoreAdamW, FiraAdamW])
def test_full_rank_and_groups_without_rank_equal_adamw(cls, weight_decay):
    shapes = [(8, 6), (6, 10), (5, 5), (7,)]
    ours, ref = matrices(*shapes), matrices(*shapes)
    optimizer = cls(
        [{"params": ours[:3], "rank": 6, "update_proj_gap": 2, "scale": 1.0},  # rank ≥ min(m, n)
         {"params": ours[3:]}],  # no rank: plain AdamW
        lr=1e-2, weight_decay=weight_decay,
    )
    reference = torch.optim.AdamW(ref, lr=1e-2, weight_decay=weight_decay, foreach=False)
    grads = gradients(ours, steps=6)
    run(optimizer, ours, grads)
    run(reference, ref, grads)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert all("proj" not in optimizer.state[p] for p in ours), "a full-rank matrix was projected"


# --- GaLore's update, written out -------------------------------------------------------------


def galore_reference(w0, grads, projector, *, lr, scale, wd, side):
    """W after the given steps with a fixed projector, the formula of the paper spelled out."""
    w = w0.clone()
    m1 = v1 = None
    for t, g in enumerate(grads, start=1):
        r = projector.T @ g if side == "left" else g @ projector  # (r, n) or (m, r)
        m1 = (1 - BETAS[0]) * r if m1 is None else BETAS[0] * m1 + (1 - BETAS[0]) * r
        v1 = (1 - BETAS[1]) * r * r if v1 is None else BETAS[1] * v1 + (1 - BETAS[1]) * r * r
        n = (m1 / (1 - BETAS[0] ** t)) / ((v1 / (1 - BETAS[1] ** t)).sqrt() + EPS)
        back = projector @ n if side == "left" else n @ projector.T  # (m, n)
        w = w * (1 - lr * wd) - lr * scale * back
    return w


@pytest.mark.parametrize(("shape", "proj_type", "side"), [
    ((10, 16), "std", "left"), ((16, 10), "std", "right"), ((16, 10), "reverse_std", "left"),
    ((10, 16), "right", "right"), ((10, 16), "left", "left"),
])
def test_projected_step_matches_the_galore_formula(shape, proj_type, side):
    (w,) = matrices(shape)
    w0 = w.detach().clone()
    optimizer = GaLoreAdamW([{"params": [w], "rank": 3, "update_proj_gap": 100, "scale": 0.5,
                              "proj_type": proj_type}], lr=0.05, weight_decay=0.1)
    grads = [g[0] for g in gradients([w], steps=4)]
    run(optimizer, [w], [[grads[0]]])  # first step
    projector = optimizer.state[w]["proj"]
    assert projector.shape == (shape[0] if side == "left" else shape[1], 3)
    first = galore_reference(w0, grads[:1], projector, lr=0.05, scale=0.5, wd=0.1, side=side)
    torch.testing.assert_close(w.detach(), first, rtol=0, atol=1e-6)
    run(optimizer, [w], [[g] for g in grads[1:]])  # later steps, same projector
    later = galore_reference(w0, grads, projector, lr=0.05, scale=0.5, wd=0.1, side=side)
    torch.testing.assert_close(w.detach(), later, rtol=0, atol=1e-6)


def test_full_projection_matches_its_formula_and_keeps_r_by_r_moments():
    (w,) = matrices((12, 9))
    w0 = w.detach().clone()
    optimizer = GaLoreAdamW([{"params": [w], "rank": 3, "proj_type": ProjType.FULL}], lr=0.1, weight_decay=0.0)
    (g,) = gradients([w], steps=1)[0]
    run(optimizer, [w], [[g]])
    state = optimizer.state[w]
    left, right = state["proj"], state["proj_right"]  # (12, 3), (9, 3)
    assert state["exp_avg"].shape == (3, 3) and optimizer.param_groups[0]["proj_type"] == "full"
    r = left.T @ g @ right
    n = ((1 - BETAS[0]) * r / (1 - BETAS[0])) / (((1 - BETAS[1]) * r * r / (1 - BETAS[1])).sqrt() + EPS)
    torch.testing.assert_close(w.detach(), w0 - 0.1 * left @ n @ right.T, rtol=0, atol=1e-6)


def test_projector_is_refreshed_every_gap_steps_and_moments_are_kept():
    (w,) = matrices((10, 16))
    optimizer = GaLoreAdamW([{"params": [w], "rank": 3, "update_proj_gap": 2}], lr=0.01)
    grads = gradients([w], steps=3, seed=5)
    seen = []
    for step_grads in grads:
        run(optimizer, [w], [step_grads])
        seen.append(optimizer.state[w]["proj"].clone())
    assert torch.equal(seen[0], seen[1]), "the projector changed before update_proj_gap steps"
    assert not torch.equal(seen[1], seen[2]), "the projector was not refreshed at step update_proj_gap + 1"
    # the refreshed projector is the top-3 subspace of that step's gradient
    exact = svd_refresh(grads[2][0], 3, None, torch.Generator())
    torch.testing.assert_close((seen[2] @ seen[2].T), exact @ exact.T, rtol=0, atol=1e-4)


def test_state_sizes_follow_the_side():
    m, n, r = 24, 10, 4
    expect = {"std": (n * r, r * m), "reverse_std": (m * r, r * n), "left": (m * r, r * n), "right": (n * r, r * m)}
    for proj_type, (proj_numel, moment_numel) in expect.items():
        (w,) = matrices((m, n))
        optimizer = GaLoreAdamW([{"params": [w], "rank": r, "proj_type": proj_type}])
        run(optimizer, [w], gradients([w], steps=1))
        state = optimizer.state[w]
        assert state["proj"].numel() == proj_numel and state["exp_avg"].numel() == moment_numel, proj_type
        assert state["exp_avg_sq"].numel() == moment_numel


# --- projectors -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(REFRESH_METHODS))
def test_projectors_are_orthonormal(method):
    generator = torch.Generator().manual_seed(0)
    refresh = REFRESH_METHODS[method]
    for d, e, r in [(96, 200, 16), (200, 96, 40), (12, 30, 8)]:
        g = decaying(d, e, tau=10.0) + 1e-3 * torch.randn(d, e, generator=generator)
        cold = refresh(g, r, None, generator)
        warm = refresh(g, r, cold, generator)
        for p in (cold, warm):
            assert p.shape == (d, r)
            torch.testing.assert_close(p.T @ p, torch.eye(r), rtol=0, atol=1e-5)


def test_subspace_iteration_captures_the_svd_energy():
    generator = torch.Generator().manual_seed(1)
    d, e, r = 160, 320, 24
    g = decaying(d, e, tau=15.0, seed=2) + 1e-4 * torch.randn(d, e, generator=generator)

    def energy(p: torch.Tensor) -> float:
        return ((p.T @ g).norm() ** 2 / g.norm() ** 2).item()

    best = energy(svd_refresh(g, r, None, generator))
    cold = REFRESH_METHODS["subspace"](g, r, None, generator)
    assert energy(cold) >= 0.999 * best, (energy(cold), best)
    # warm start from the subspace of a related, older gradient (the situation at a refresh)
    older = decaying(d, e, tau=15.0, seed=2) + 0.3 * decaying(d, e, tau=15.0, seed=3)
    warm = REFRESH_METHODS["subspace"](g, r, svd_refresh(older, r, None, generator), generator)
    assert energy(warm) >= 0.999 * best, (energy(warm), best)


# --- Fira -----------------------------------------------------------------------------------


def paired_steps(grads: list[torch.Tensor], **group):
    """The same matrix and gradients through GaLoreAdamW and FiraAdamW (same projector);
    returns per step the Fira residual term S_t that was applied, and the Fira optimizer."""
    lr = 0.1
    (wg,), (wf,) = matrices(grads[0].shape), matrices(grads[0].shape)
    galore = GaLoreAdamW([{"params": [wg], **group}], lr=lr, weight_decay=0.0)
    fira = FiraAdamW([{"params": [wf], **group}], lr=lr, weight_decay=0.0)
    applied = []
    for g in grads:
        before_g, before_f = wg.detach().clone(), wf.detach().clone()
        run(galore, [wg], [[g]])
        run(fira, [wf], [[g]])
        applied.append(((wg.detach() - before_g) - (wf.detach() - before_f)) / lr)  # = S_t
    torch.testing.assert_close(fira.state[wf]["proj"], galore.state[wg]["proj"], rtol=0, atol=0)
    return applied, fira, wf


def fira_residual(g: torch.Tensor, p: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """(G − P·Pᵀ·G)·diag(φ), φ_j = ‖N[:, j]‖ / ‖R[:, j]‖, for a left projection."""
    r = p.T @ g  # (r, n)
    phi = n.norm(dim=0) / (r.norm(dim=0) + 1e-8)  # (n,)
    return (g - p @ r) * phi


def test_fira_residual_is_scaled_column_wise_by_phi():
    (g,) = gradients(matrices((10, 16)), steps=1)[0]
    (applied,), fira, w = paired_steps([g], rank=3, update_proj_gap=100)
    p = fira.state[w]["proj"]  # (10, 3): 10 < 16, so std projects the left side
    r = p.T @ g
    n = r / (r.abs() + EPS)  # Adam's first step: m̂ = R, √v̂ = |R|
    torch.testing.assert_close(applied, fira_residual(g, p, n), rtol=1e-4, atol=1e-6)
    # by hand: φ_j = ‖sign(R[:, j])‖ / ‖R[:, j]‖ = √r / ‖R[:, j]‖
    phi = math.sqrt(3) / r.norm(dim=0)
    torch.testing.assert_close(applied, (g - p @ r) * phi, rtol=1e-4, atol=1e-6)
    assert applied.norm() > 0.1, "Fira applied no residual"


def test_fira_right_projection_scales_rows_of_the_gradient():
    (g,) = gradients(matrices((16, 10)), steps=1)[0]
    (applied,), fira, w = paired_steps([g], rank=3, update_proj_gap=100)
    p = fira.state[w]["proj"]  # (10, 3): right side; the frame works on Gᵀ
    r = p.T @ g.T
    n = r / (r.abs() + EPS)
    torch.testing.assert_close(applied, fira_residual(g.T, p, n).T, rtol=1e-4, atol=1e-6)


def test_fira_limiter_caps_norm_growth_at_gamma():
    # the same low-rank part (top 3 directions) every step; the residual jumps 50× at step 2
    generator = torch.Generator().manual_seed(4)
    u, _ = torch.linalg.qr(torch.randn(10, 10, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(16, 10, generator=generator))
    top = torch.tensor([10.0, 9.0, 8.0])
    small, large = torch.cat([top, torch.full((7,), 0.1)]), torch.cat([top, torch.full((7,), 5.0)])
    grads = [(u * small) @ v.T, (u * large) @ v.T, (u * large) @ v.T]
    applied, fira, w = paired_steps(grads, rank=3, update_proj_gap=100, limiter=1.01)
    norms = [s.norm().item() for s in applied]
    assert norms[1] == pytest.approx(1.01 * (norms[0] + 1e-8), rel=1e-4)
    assert norms[2] == pytest.approx(1.01 * (norms[1] + 1e-8), rel=1e-4)
    assert fira.state[w]["residual_norm"].item() == pytest.approx(norms[2], rel=1e-4)
    # a generous limiter lets the same growth through unchanged
    applied, _, _ = paired_steps(grads, rank=3, update_proj_gap=100, limiter=1e6)
    assert applied[1].norm().item() > 5 * norms[0]


def test_fira_takes_alpha_for_scale_and_refuses_both():
    (w,) = matrices((10, 16))
    optimizer = FiraAdamW([{"params": [w], "rank": 3, "alpha": 0.25}])
    group = optimizer.param_groups[0]
    assert group["scale"] == 0.25 and "alpha" not in group
    with pytest.raises(OptimizerConfigError, match="pass only one"):
        FiraAdamW([{"params": [w], "rank": 3, "alpha": 0.25, "scale": 1.0}])


# --- checkpoints and randomness ---------------------------------------------------------------


def through_disk(state_dict: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("cls", [GaLoreAdamW, FiraAdamW])
def test_resume_from_state_dict_is_exact(cls):
    shapes = [(24, 12), (12, 30), (12,)]
    groups = lambda ps: [{"params": ps[:2], "rank": 4, "update_proj_gap": 3, "proj_type": "std"},  # noqa: E731
                         {"params": ps[2:]}]
    straight = matrices(*shapes)
    grads = gradients(straight, steps=8)
    run(cls(groups(straight), lr=0.01), straight, grads)

    first = matrices(*shapes)
    optimizer = cls(groups(first), lr=0.01)
    run(optimizer, first, grads[:4])  # stop after a refresh (step 4 refreshed), mid-period
    saved = through_disk(optimizer.state_dict())
    resumed = [nn.Parameter(p.detach().clone()) for p in first]
    fresh = cls(groups(resumed), lr=0.01)
    fresh.load_state_dict(saved)
    run(fresh, resumed, grads[4:])  # crosses the refresh at step 7
    for a, b in zip(straight, resumed, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_results_do_not_depend_on_the_global_rng():
    def train(seeds: list[int]) -> list[torch.Tensor]:
        params = matrices((40, 64), (64, 40))
        optimizer = FiraAdamW([{"params": params, "rank": 4, "update_proj_gap": 2}], lr=0.01)
        for seed, step_grads in zip(seeds, gradients(params, steps=len(seeds)), strict=True):
            torch.manual_seed(seed)
            run(optimizer, params, [step_grads])
        return [p.detach() for p in params]

    for a, b in zip(train([0, 1, 2, 3, 4]), train([9, 99, 999, 9999, 7]), strict=True):
        assert torch.equal(a, b), "the global RNG changed the result"


# --- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(("group", "kwargs", "message"), [
    ({"rank": 0}, {}, "rank must be an integer"),
    ({"rank": 2.5}, {}, "rank must be an integer"),
    ({"rank": 4, "update_proj_gap": 0}, {}, "update_proj_gap must be an integer"),
    ({"rank": 4, "proj_type": "diagonal"}, {}, "unknown proj_type 'diagonal'"),
    ({"rank": 4, "proj_method": "qr"}, {}, "unknown proj_method"),
    ({"rank": 4, "scale": -1.0}, {}, "scale must be a number > 0"),
    ({}, {"lr": -1.0}, "lr must be a number"),
    ({}, {"betas": (0.9, 1.0)}, "betas must be two numbers"),
    ({}, {"weight_decay": -0.1}, "weight_decay must be"),
])
def test_bad_hyperparameters_say_what_to_fix(group, kwargs, message):
    (w,) = matrices((8, 6))
    for cls in (GaLoreAdamW, FiraAdamW):
        with pytest.raises(ValueError, match=message):
            cls([{"params": [w], **group}], **kwargs)


def test_validation_errors_are_welore_errors_and_name_the_fix():
    w, bias = matrices((8, 6), (6,))
    with pytest.raises(WeloreError, match="put it in a parameter group without `rank`"):
        GaLoreAdamW([{"params": [w, bias], "rank": 2}])
    with pytest.raises(OptimizerConfigError, match="limiter must be a number ≥ 1"):
        FiraAdamW([{"params": [w], "rank": 2, "limiter": 0.9}])
    with pytest.raises(OptimizerConfigError, match="proj_type 'full' is not supported"):
        FiraAdamW([{"params": [w], "rank": 2, "proj_type": "full"}])
    optimizer = GaLoreAdamW([{"params": [w], "rank": 2}])
    with pytest.raises(OptimizerConfigError, match="parameter group 1: update_proj_gap"):
        optimizer.add_param_group({"params": [bias], "rank": 2, "update_proj_gap": -3})
    assert len(optimizer.param_groups) == 1, "a rejected group was kept"
    optimizer.add_param_group({"params": [bias]})  # a group without rank is fine
    assert len(optimizer.param_groups) == 2


# --- end to end -----------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [GaLoreAdamW, FiraAdamW])
def test_tiny_llama_trains(cls):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    lowrank = [p for name, p in model.named_parameters() if "layers." in name and p.dim() == 2]
    others = [p for name, p in model.named_parameters() if not ("layers." in name and p.dim() == 2)]
    optimizer = cls([{"params": lowrank, "rank": 8, "update_proj_gap": 10, "scale": 1.0, "proj_type": "std"},
                     {"params": others}], lr=3e-3, weight_decay=0.0)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))  # (B, T)
    losses = []
    for _ in range(25):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert any("proj" in optimizer.state[p] for p in lowrank)
    saved = through_disk(optimizer.state_dict())  # the state of a real model also round-trips
    copy.deepcopy(optimizer).load_state_dict(saved)


def test_hf_trainer_trains_and_resumes_exactly(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(2))  # (B, T)
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, save_steps=2,
                             report_to=[], use_cpu=True, disable_tqdm=True, seed=0)

    def trainer(seed: int) -> tuple[Trainer, nn.Module]:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        lowrank = [p for name, p in model.named_parameters() if "layers." in name and p.dim() == 2]
        others = [p for name, p in model.named_parameters() if not ("layers." in name and p.dim() == 2)]
        optimizer = FiraAdamW([{"params": lowrank, "rank": 4, "update_proj_gap": 3}, {"params": others}], lr=3e-3)
        return Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None)), model

    straight, model = trainer(seed=0)
    straight.train()  # writes checkpoint-2 (optimizer.pt included) on the way
    resumed, model_b = trainer(seed=1)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    for a, b in zip(model.parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_enum_proj_type_is_stored_as_a_string_in_every_group():
    w, bias = matrices((8, 6), (6,))
    optimizer = GaLoreAdamW([{"params": [w], "rank": 2}, {"params": [bias]}], proj_type=ProjType.LEFT)
    assert [g["proj_type"] for g in optimizer.param_groups] == ["left", "left"]
    assert all(type(g["proj_type"]) is str for g in optimizer.param_groups)
    run(optimizer, [w, bias], gradients([w, bias], steps=1))
    through_disk(optimizer.state_dict())  # weights_only load: no enum inside


# --- bfloat16 parameters ------------------------------------------------------------------------


def bf16_matrices(*shapes: tuple[int, ...], seed: int = 0) -> list[nn.Parameter]:
    return [nn.Parameter(p.detach().to(torch.bfloat16)) for p in matrices(*shapes, seed=seed)]


@pytest.mark.parametrize(("cls", "proj_type"), [(GaLoreAdamW, "std"), (GaLoreAdamW, "full"), (FiraAdamW, "std"),
                                                (FiraAdamW, "reverse_std")])
def test_bf16_parameters_keep_float32_projectors_and_low_rank_state(cls, proj_type):
    """bfloat16 matrices: projectors, low-rank moments and Fira's residual norm are float32 (the
    projectors orthonormal to float32 precision), also after a resume through state_dict; the
    parameters stay bfloat16 and AdamW-trained ones keep bfloat16 moments, as torch's AdamW."""
    shapes = [(24, 12), (12, 30), (12,)]
    groups = lambda ps: [{"params": ps[:2], "rank": 4, "update_proj_gap": 3, "proj_type": proj_type},  # noqa: E731
                         {"params": ps[2:]}]
    straight = bf16_matrices(*shapes)
    grads = [[g.to(torch.bfloat16) for g in step] for step in gradients(straight, steps=6)]
    run(cls(groups(straight), lr=0.01), straight, grads)

    params = bf16_matrices(*shapes)
    optimizer = cls(groups(params), lr=0.01)
    run(optimizer, params, grads[:4])  # a refresh at steps 1 and 4
    fresh_params = [nn.Parameter(p.detach().clone()) for p in params]
    fresh = cls(groups(fresh_params), lr=0.01)
    fresh.load_state_dict(through_disk(optimizer.state_dict()))
    for opt, ps in ((optimizer, params), (fresh, fresh_params)):
        for p in ps[:2]:
            state = opt.state[p]
            projectors = [state[k] for k in ("proj", "proj_right") if k in state]
            assert len(projectors) == (2 if proj_type == "full" else 1)
            for basis in projectors:
                assert basis.dtype == torch.float32
                eye = torch.eye(basis.shape[1])
                torch.testing.assert_close(basis.T @ basis, eye, rtol=0, atol=1e-5)
            assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
            if cls is FiraAdamW:
                assert state["residual_norm"].dtype == torch.float32
            assert p.dtype == torch.bfloat16
        dense = opt.state[ps[2]]
        assert dense["exp_avg"].dtype == dense["exp_avg_sq"].dtype == torch.bfloat16
    run(fresh, fresh_params, grads[4:])
    for a, b in zip(straight, fresh_params, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the resume is exact in bfloat16 too


def test_fira_residual_norm_and_limiter_in_bf16_match_float32():
    """Fira on a bfloat16 matrix: its residual norm ‖S_t‖ and the limiter's cap match a float64
    computation from the same bfloat16 gradients, and every step equals the float32 optimizer's
    step from the same values, rounded once to bfloat16."""
    generator = torch.Generator().manual_seed(4)
    u, _ = torch.linalg.qr(torch.randn(10, 10, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(16, 10, generator=generator))
    top = torch.tensor([10.0, 9.0, 8.0])
    small, large = torch.cat([top, torch.full((7,), 0.1)]), torch.cat([top, torch.full((7,), 5.0)])
    # the same low-rank part every step; the residual (1% of the energy at first) jumps 50× at step 2
    grads = [((u * s) @ v.T).to(torch.bfloat16) for s in (small, large, large)]
    group = {"rank": 3, "update_proj_gap": 100, "limiter": 1.01}
    (w16,) = bf16_matrices((10, 16))
    w32 = nn.Parameter(w16.detach().float())
    fira16 = FiraAdamW([{"params": [w16], **group}], lr=0.01, weight_decay=0.0)
    fira32 = FiraAdamW([{"params": [w32], **group}], lr=0.01, weight_decay=0.0)

    norms, unlimited_norms = [], []
    for step, g in enumerate(grads):
        before = w32.detach().clone()
        run(fira16, [w16], [[g]])
        run(fira32, [w32], [[g.float()]])
        state = fira16.state[w16]
        # the float64 reference of ‖S_t‖ before limiting: (G − P·Pᵀ·G)·diag(φ), φ_j = ‖N_j‖ / ‖R_j‖
        p, g64 = state["proj"].double(), g.double()  # (10, 3): left projection
        r = p.T @ g64  # (3, 16)
        exp_avg, exp_avg_sq = state["exp_avg"].double(), state["exp_avg_sq"].double()
        t = step + 1
        n = (exp_avg / (1 - BETAS[0] ** t)) / ((exp_avg_sq / (1 - BETAS[1] ** t)).sqrt() + EPS)
        phi = n.norm(dim=0) / (r.norm(dim=0) + 1e-8)
        unlimited = ((g64 - p @ r) * phi).norm().item()
        expected = unlimited if step == 0 else min(unlimited, 1.01 * (norms[-1] + 1e-8))
        assert state["residual_norm"].item() == pytest.approx(expected, rel=1e-5), step
        norms.append(expected)
        unlimited_norms.append(unlimited)
        # the float32 optimizer, fed the same values, moved W the same way before rounding
        assert state["residual_norm"].item() == pytest.approx(fira32.state[w32]["residual_norm"].item(), rel=1e-6)
        torch.testing.assert_close(state["proj"], fira32.state[w32]["proj"], rtol=0, atol=1e-6)
        if step == 0:  # from the same bfloat16 start: one rounding of the float32 result
            assert torch.equal(w16.detach(), w32.detach().to(torch.bfloat16))
        assert not torch.equal(w32.detach(), before)
    assert norms[1] < 0.5 * unlimited_norms[1], "the limiter must have acted at the jump"
