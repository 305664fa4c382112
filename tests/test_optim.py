"""The reference optimiser (Muon + AdamW) against ``parity-tiny/optimizer.*``, and the WSD schedule."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from dual_lm.convert import build_reference_model, hf_to_reference_name
from dual_lm.modeling_dlm_llama import DLMLlamaForCausalLM, DLMLlamaForQuestionAnswering
from dual_lm.training.optim import (
    AdamW,
    Muon,
    MuonAdamW,
    build_optimizer,
    group_table,
    newton_schulz,
    parameter_groups,
    set_lr_factor,
    wsd_lr_factor,
    wsd_scheduler,
)

LR, WD = 0.007, 0.1


@pytest.fixture(scope="module")
def fixture(parity_dir):
    return load_file(parity_dir / "optimizer.safetensors"), json.loads((parity_dir / "optimizer.json").read_text())


@pytest.fixture
def reference_model(parity_dir):
    return build_reference_model(parity_dir / "config.json", parity_dir / "state_dict.bin")


def set_grads(model, tensors, step):
    for name, p in model.named_parameters():
        p.grad = tensors[f"step{step}.grad.{hf_to_reference_name(name)}"].clone()


def max_error(model, tensors, step):
    return max(
        (p.detach() - tensors[f"step{step}.param.{hf_to_reference_name(name)}"]).abs().max().item()
        for name, p in model.named_parameters()
    )


# --------------------------------------------------------------------------- fixture parity


def test_fixture_settings_are_the_defaults(fixture, reference_model):
    _, meta = fixture
    assert meta["newton_schulz_dtype"] == "float32"
    optimizer, _ = build_optimizer(reference_model)
    for group in optimizer.param_groups:
        assert (group["lr"], group["weight_decay"]) == (meta["lr"], meta["weight_decay"])
        if group["kind"] == "muon":
            assert (group["momentum"], group["nesterov"]) == (meta["momentum"], meta["nesterov"])
            assert group["ns_steps"] == meta["newton_schulz_steps"]
        else:
            assert group["betas"] == tuple(meta["adamw_betas"]) and group["eps"] == meta["adamw_eps"]


@pytest.mark.parametrize("batched", [True, False])
def test_three_steps_match_reference(fixture, reference_model, batched):
    tensors, _ = fixture
    optimizer, _ = build_optimizer(reference_model, lr=LR, weight_decay=WD, batched=batched)
    for step in range(3):
        set_grads(reference_model, tensors, step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for name, p in reference_model.named_parameters():
            expected = tensors[f"step{step}.param.{hf_to_reference_name(name)}"]
            torch.testing.assert_close(p.detach(), expected, atol=1e-6, rtol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_group_membership_matches_reference(fixture, reference_model):
    _, meta = fixture
    kinds = {"muon": set(), "adamw": set()}
    for group in parameter_groups(reference_model):
        kinds[group["kind"]].update(hf_to_reference_name(n) for n in group["param_names"])
    assert kinds["muon"] == set(meta["muon_parameters"])
    assert kinds["adamw"] == set(meta["adamw_parameters"])


def test_torch_adamw_misses_the_fixture(fixture, reference_model):
    """The fixture tells the variants apart: torch.optim.AdamW (eps after bias correction) misses it."""
    tensors, meta = fixture
    names = dict(reference_model.named_parameters())
    adam_names = [n for n in names if hf_to_reference_name(n) in set(meta["adamw_parameters"])]
    params = [names[n] for n in adam_names]
    set_grads(reference_model, tensors, 0)
    torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=WD).step()
    worst = max(
        (names[n].detach() - tensors[f"step0.param.{hf_to_reference_name(n)}"]).abs().max().item() for n in adam_names
    )
    assert worst > 1e-4


def test_weight_decay_after_the_update_misses_the_fixture(fixture, reference_model):
    """p = (p - update) * (1 - lr wd) is off by a few 1e-6: the reference decays first, so parity uses atol 1e-6."""
    tensors, _ = fixture
    optimizer, _ = build_optimizer(reference_model, weight_decay=0.0)
    set_grads(reference_model, tensors, 0)
    optimizer.step()
    with torch.no_grad():
        for p in reference_model.parameters():
            p.mul_(1 - LR * WD)
    assert max_error(reference_model, tensors, 0) > 2e-6


def test_state_dict_round_trip(fixture, reference_model):
    tensors, _ = fixture
    resumed_model = copy.deepcopy(reference_model)
    optimizer, _ = build_optimizer(reference_model)
    for step in range(2):
        set_grads(reference_model, tensors, step)
        optimizer.step()
    saved = copy.deepcopy(optimizer.state_dict())
    resumed_model.load_state_dict(reference_model.state_dict())
    resumed, _ = build_optimizer(resumed_model)
    resumed.load_state_dict(saved)
    for model, opt in ((reference_model, optimizer), (resumed_model, resumed)):
        set_grads(model, tensors, 2)
        opt.step()
    for (name, a), (_, b) in zip(reference_model.named_parameters(), resumed_model.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    assert max_error(resumed_model, tensors, 2) < 1e-6


# --------------------------------------------------------------------------- Newton-Schulz and Muon details


def test_newton_schulz_batched_equals_per_matrix_and_handles_tall():
    g = torch.randn(3, 96, 64, dtype=torch.float64)
    batched = newton_schulz(g)
    assert batched.dtype == torch.float32 and batched.shape == g.shape
    for i in range(3):
        torch.testing.assert_close(batched[i], newton_schulz(g[i]), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(newton_schulz(g[0]), newton_schulz(g[0].T).T, atol=1e-6, rtol=1e-6)
    singular_values = torch.linalg.svdvals(newton_schulz(g[0]).double())
    assert singular_values.min() > 0.5 and singular_values.max() < 1.3  # U S' V^T with S' near 1


def test_newton_schulz_rejects_vectors():
    with pytest.raises(ValueError, match="matrix"):
        newton_schulz(torch.ones(4))


def test_batched_muon_equals_per_matrix_twin():
    torch.manual_seed(1)
    shapes = [(64, 64)] * 4 + [(96, 64)] * 2 + [(64, 96), (32, 16)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fast, slow = Muon(params, lr=0.01, batched=True), Muon(twins, lr=0.01, batched=False)
    for _ in range(3):
        grads = [torch.randn(s) for s in shapes]
        for ps, opt in ((params, fast), (twins, slow)):
            for p, g in zip(ps, grads, strict=True):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(params, twins, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_muon_step_is_scaled_orthogonal_update_after_decay():
    p = torch.nn.Parameter(torch.randn(16, 48))
    start = p.detach().clone()
    g = torch.randn(16, 48)
    p.grad = g.clone()
    Muon([p], lr=0.01, weight_decay=0.1).step()
    expected = start * (1 - 0.01 * 0.1) - 0.01 * 0.2 * math.sqrt(48) * newton_schulz(g + 0.95 * g)
    torch.testing.assert_close(p.detach(), expected, atol=1e-6, rtol=1e-6)


def test_muon_rejects_non_matrix_and_groups_need_a_kind():
    with pytest.raises(ValueError, match="matrices"):
        Muon([torch.nn.Parameter(torch.ones(4))])
    with pytest.raises(ValueError, match="kind"):
        MuonAdamW([torch.nn.Parameter(torch.ones(4))])


def test_reference_adamw_first_step_formula():
    p = torch.nn.Parameter(torch.randn(10))
    start = p.detach().clone()
    g = torch.randn(10)
    p.grad = g.clone()
    AdamW([p], lr=0.01, weight_decay=0.1).step()
    m, v = 0.1 * g, 0.05 * g * g
    expected = start * (1 - 0.001) - 0.01 * math.sqrt(0.05) / 0.1 * m / (v.sqrt() + 1e-8)
    torch.testing.assert_close(p.detach(), expected, atol=1e-6, rtol=1e-6)


def test_parameters_without_grad_are_untouched():
    a, b = torch.nn.Parameter(torch.randn(8, 8)), torch.nn.Parameter(torch.randn(8))
    before = (a.detach().clone(), b.detach().clone())
    MuonAdamW([{"params": [a], "kind": "muon"}, {"params": [b], "kind": "adamw"}]).step()
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])


# --------------------------------------------------------------------------- parameter assignment


def test_unassigned_parameter_is_named(tiny_config):
    model = DLMLlamaForCausalLM(tiny_config)
    model.extra = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"extra\.weight, extra\.bias"):
        parameter_groups(model)


def test_every_parameter_once_and_table(tiny_config):
    model = DLMLlamaForCausalLM(tiny_config)
    optimizer, table = build_optimizer(model)
    ids = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert len(ids) == len(set(ids))
    kinds = {g["name"]: g["kind"] for g in optimizer.param_groups}
    assert kinds == {
        "trunk matrices": "muon",
        "head projection": "muon",
        "embedding": "adamw",
        "output layer": "adamw",
        "norm gains": "adamw",
    }
    assert table == group_table(optimizer)
    lines = table.splitlines()
    assert lines[0].split() == ["group", "optimizer", "count", "numel"]
    total = sum(p.numel() for p in model.parameters())
    assert lines[-1].split()[-1] == f"{total:,}"
    layers = tiny_config.num_hidden_layers
    assert any(line.startswith("trunk matrices") and f" {7 * layers} " in line for line in lines)


def test_task_heads_go_to_adamw(tiny_config):
    groups = {g["name"]: g for g in parameter_groups(DLMLlamaForQuestionAnswering(tiny_config))}
    assert groups["task heads"]["kind"] == "adamw"
    assert groups["task heads"]["param_names"] == ["qa_outputs.weight", "qa_outputs.bias"]


# --------------------------------------------------------------------------- schedule


def test_wsd_default_linear_decay():
    total = 8192
    assert wsd_lr_factor(0, total) == 1.0
    assert wsd_lr_factor(4096, total) == 1.0
    assert wsd_lr_factor(6143, total) == 1.0
    assert wsd_lr_factor(6144, total) == 1.0  # first decay update, decay covers 6144..8191
    assert wsd_lr_factor(6145, total) == pytest.approx(2047 / 2048)
    assert wsd_lr_factor(7168, total) == pytest.approx(0.5)
    assert wsd_lr_factor(8191, total) == pytest.approx(1 / 2048)  # last update: small but nonzero
    assert wsd_lr_factor(8192, total) == 0.0
    assert wsd_lr_factor(10_000, total) == 0.0


def test_wsd_warmup_sqrt_cosine():
    total = 1000
    assert wsd_lr_factor(0, total, warmup_frac=0.1) == 0.0
    assert wsd_lr_factor(50, total, warmup_frac=0.1) == pytest.approx(0.5)
    assert wsd_lr_factor(100, total, warmup_frac=0.1) == 1.0
    assert wsd_lr_factor(750, total, decay="sqrt") == 1.0
    assert wsd_lr_factor(744 + 64, total, decay="sqrt", decay_frac=0.256) == pytest.approx(1 - math.sqrt(64 / 256))
    assert wsd_lr_factor(875, total, decay="cosine") == pytest.approx(0.5)
    assert wsd_lr_factor(999, total, decay="cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 249 / 250)))
    assert 0 < wsd_lr_factor(999, total, decay="sqrt") < 0.01
    assert wsd_lr_factor(0, 10, warmup_frac=0.0, decay_frac=1.0) == 1.0
    assert wsd_lr_factor(9, 10, decay_frac=0.0) == 1.0


def trapezoid(step, total, warmup_frac, decay_frac):
    """The reference trainer's schedule as its rule reads: W = int(w T), D = int(d T), then step / max(1, W) in
    warmup, (T - step) / max(1, D) from T - D on, else 1."""
    warmup, decay = int(total * warmup_frac), int(total * decay_frac)
    if step < warmup:
        return step / max(1, warmup)
    if step >= total - decay:
        return (total - step) / max(1, decay)
    return 1.0


@pytest.mark.parametrize(("total", "warmup_frac", "decay_frac"), [(176, 0.02, 0.3), (100, 0.29, 0.29), (14, 0.0, 0.25)])
def test_wsd_truncates_its_step_counts_as_the_reference(total, warmup_frac, decay_frac):
    got = [wsd_lr_factor(s, total, warmup_frac, decay_frac) for s in range(total)]
    assert got == pytest.approx([trapezoid(s, total, warmup_frac, decay_frac) for s in range(total)], abs=1e-12)


def test_wsd_truncation_of_the_sweep_schedule():
    # configs/sweep.yaml: 176 steps, warmup 0.02 (3.52 -> 3 steps), decay 0.3 (52.8 -> 52 steps)
    assert wsd_lr_factor(2, 176, 0.02, 0.3) == pytest.approx(2 / 3)
    assert wsd_lr_factor(3, 176, 0.02, 0.3) == 1.0
    assert wsd_lr_factor(123, 176, 0.02, 0.3) == 1.0 and wsd_lr_factor(124, 176, 0.02, 0.3) == 1.0
    assert wsd_lr_factor(125, 176, 0.02, 0.3) == pytest.approx(51 / 52)
    assert wsd_lr_factor(28, 100, warmup_frac=0.29, decay_frac=0.0) == 1.0  # 0.29 x 100 = 28.999... -> 28 steps


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(warmup_frac=-0.1), "in \\[0, 1\\]"),
        (dict(decay_frac=1.5), "in \\[0, 1\\]"),
        (dict(warmup_frac=0.6, decay_frac=0.5), "<= 1"),
        (dict(decay="exp"), "decay must be"),
    ],
)
def test_wsd_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        wsd_lr_factor(0, 100, **kwargs)
    with pytest.raises(ValueError, match=match):
        wsd_scheduler(MuonAdamW([torch.nn.Parameter(torch.ones(2))], kind="adamw"), 100, **kwargs)


def test_wsd_step_and_total_errors():
    with pytest.raises(ValueError, match="step"):
        wsd_lr_factor(-1, 100)
    with pytest.raises(ValueError, match="total_steps"):
        wsd_lr_factor(0, 0)


def test_scheduler_and_set_lr_factor_agree(tiny_config):
    model = DLMLlamaForCausalLM(tiny_config)
    opt_a, _ = build_optimizer(model, lr=0.01)
    opt_b, _ = build_optimizer(model, lr=0.01)
    scheduler = wsd_scheduler(opt_a, total_steps=8, warmup_frac=0.25, decay_frac=0.5)
    seen = []
    for step in range(8):
        set_lr_factor(opt_b, wsd_lr_factor(step, 8, warmup_frac=0.25, decay_frac=0.5))
        assert [g["lr"] for g in opt_a.param_groups] == pytest.approx([g["lr"] for g in opt_b.param_groups])
        seen.append(opt_a.param_groups[0]["lr"])
        opt_a.step()
        scheduler.step()
    assert seen == pytest.approx([0.0, 0.005, 0.01, 0.01, 0.01, 0.0075, 0.005, 0.0025])


def test_build_optimizer_on_fresh_model_trains(tiny_config):
    model = DLMLlamaForCausalLM(tiny_config)
    optimizer, _ = build_optimizer(model)
    ids = torch.randint(16, tiny_config.vocab_size, (2, 12))
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_bfloat16_newton_schulz_stays_close_to_float32():
    from dual_lm.training.optim import newton_schulz

    g = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    full, half = newton_schulz(g), newton_schulz(g, dtype=torch.bfloat16).float()
    cosine = torch.nn.functional.cosine_similarity(full.flatten(), half.flatten(), dim=0)
    assert half.dtype == torch.float32 and cosine > 0.99
