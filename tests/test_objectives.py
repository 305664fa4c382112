"""The AR and MD losses against the reference fixture, masking, and mixing by alpha."""

import json

import pytest
import torch
from safetensors.torch import load_file

from dual_lm.config import ObjectiveConfig
from dual_lm.convert import build_reference_model
from dual_lm.objectives import (
    DualObjective,
    choose_positions,
    draw_mask_counts,
    mask_rows,
    md_ranks,
    rank_runs_md,
    rows_for_ar,
)

REL = 1e-4


@pytest.fixture(scope="module")
def fixture(parity_dir):
    model = build_reference_model(parity_dir / "config.json", parity_dir / "state_dict.bin")
    data = load_file(str(parity_dir / "objective.safetensors"))
    return model, data, json.loads((parity_dir / "objective.json").read_text())


def losses(model, data, cfg, ar: bool):
    objective = DualObjective(model, cfg)
    replay = data["diffusion_inputs"] == 4
    rows = torch.full((2,), ar)
    with torch.no_grad():
        return objective(data["inputs"], data["targets"], None, rows, replay=None if ar else replay)


def test_ar_and_md_losses_match_the_reference(fixture):
    model, data, ref = fixture
    plain = ObjectiveConfig(z_loss=0.0)
    assert losses(model, data, plain, True)[0].item() == pytest.approx(ref["ar_loss_weighted_2"], rel=REL)
    assert losses(model, data, plain, False)[0].item() == pytest.approx(ref["diffusion_loss"], rel=REL)
    full = ObjectiveConfig()
    assert losses(model, data, full, True)[0].item() == pytest.approx(ref["total_ar"], rel=REL)
    assert losses(model, data, full, False)[0].item() == pytest.approx(ref["total_diffusion"], rel=REL)


def test_z_losses_match_the_reference(fixture):
    model, data, ref = fixture

    def z_only(ar):
        with_z = losses(model, data, ObjectiveConfig(z_loss=1.0), ar)[0].item()
        return with_z - losses(model, data, ObjectiveConfig(z_loss=0.0), ar)[0].item()

    assert z_only(True) == pytest.approx(ref["ar_z_loss_weighted_2"], rel=REL)
    assert z_only(False) == pytest.approx(ref["diffusion_z_loss"], rel=REL)


def test_ar_weight_one_is_the_papers_equation(fixture):
    model, data, ref = fixture
    loss = losses(model, data, ObjectiveConfig(ar_weight=1.0, z_loss=0.0), True)[0].item()
    assert loss == pytest.approx(ref["ar_loss_weighted_2"] / 2, rel=REL)


def test_replayed_mask_reproduces_the_reference_draw(fixture):
    _, data, _ = fixture
    md = mask_rows(data["inputs"], data["targets"], replay=data["diffusion_inputs"] == 4)
    assert torch.equal(md.inputs, data["diffusion_inputs"])
    assert torch.equal(md.targets, data["diffusion_targets"])
    torch.testing.assert_close(md.rate.float()[:, None].expand(-1, 24), data["diffusion_mask_rate"])


def test_masking_draws_exactly_k_non_special_positions():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randint(16, 500, (64, 32))
    inputs[:, 0] = 1
    inputs[:, 7] = 2
    for _ in range(5):
        counts = draw_mask_counts(64, 32, generator)
        assert counts.min() >= 1 and counts.max() <= 32
        masked = choose_positions(inputs >= 16, counts, generator)
        assert torch.equal(masked.sum(1), torch.minimum(counts, torch.tensor(30)))
        assert not masked[:, 0].any() and not masked[:, 7].any()
    md = mask_rows(inputs, torch.roll(inputs, -1, 1), generator)
    has_target = md.targets != -100
    assert has_target[:, -1].all()  # the last position always has a target
    torch.testing.assert_close(has_target[:, :-1], md.masked[:, 1:])


def test_mask_count_distribution_is_the_references():
    # k = max(1, floor(tL + u)), t, u ~ U(0,1): E[floor(x + u)] = x, so E[k] = L/2 plus the clamp's 1/(2L)
    counts = draw_mask_counts(200_000, 20, torch.Generator().manual_seed(1)).double()
    assert counts.mean().item() == pytest.approx(10.025, abs=0.03)
    assert (counts == 1).double().mean().item() == pytest.approx(1 / 20 * 1.5, abs=0.005)


def test_mixed_batch_equals_separate_objectives(fixture):
    model, data, _ = fixture
    objective = DualObjective(model, ObjectiveConfig())
    replay = data["diffusion_inputs"] == 4
    mixed = torch.tensor([True, False])
    with torch.no_grad():
        both, _ = objective(data["inputs"], data["targets"], None, mixed, replay=replay)
        ar, _ = objective(data["inputs"][:1], data["targets"][:1], None, mixed[:1])
        md, _ = objective(data["inputs"][1:], data["targets"][1:], None, mixed[1:], replay=replay[1:])
    assert both.item() == pytest.approx(0.5 * ar.item() + 0.5 * md.item(), rel=1e-5)


def test_row_split_has_the_exact_expected_share():
    generator = torch.Generator().manual_seed(0)
    for alpha in (0.0, 63 / 64, 0.3, 1.0):
        share = torch.stack([rows_for_ar(6, alpha, generator) for _ in range(20_000)]).double().mean().item()
        assert share == pytest.approx(alpha, abs=0.01)


def test_rank_rotation_gives_every_rank_the_share_alpha():
    d, alpha = 8, 0.75
    m = md_ranks(alpha, d)
    assert m == 2
    for rank in range(d):
        md_epochs = sum(rank_runs_md(epoch, rank, d, m) for epoch in range(d))
        assert md_epochs == m  # over d epochs each rank (and each data shard) sees MD m times
    for epoch in range(d):
        assert sum(rank_runs_md(epoch, r, d, m) for r in range(d)) == m  # alpha of the ranks run AR


def test_rank_split_that_the_world_cannot_realise():
    with pytest.raises(ValueError, match="cannot be realised by splitting 2 rank"):
        md_ranks(63 / 64, 2)
