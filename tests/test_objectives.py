"""The AR and MD losses against the reference fixture, masking, and mixing by alpha."""

import json

import pytest
import torch
from safetensors.torch import load_file

from dual_lm.config import ObjectiveConfig
from dual_lm.convert import build_reference_model
from dual_lm.training.objectives import (
    DualObjective,
    choose_positions,
    draw_mask_counts,
    mask_rows,
    md_ranks,
    rank_runs_md,
    rotation_epoch,
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
        fits = counts <= 30
        assert torch.equal(masked.sum(1)[fits], counts[fits])
        assert not masked[fits][:, 0].any() and not masked[fits][:, 7].any()
        assert masked[~fits].all()  # k past the 30 maskable tokens: every position, <s> included
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


def test_mask_count_past_the_maskable_tokens_masks_the_whole_row_with_rate_one():
    inputs = torch.tensor([[1, 20, 21, 1, 22, 23], [1, 20, 21, 22, 23, 24]])
    counts = torch.tensor([5, 5])  # row 0 holds 4 maskable tokens, row 1 holds 5
    masked = choose_positions(inputs >= 16, counts, torch.Generator().manual_seed(0))
    assert masked[0].all() and masked[1].sum() == 5 and not masked[1, 0]
    md = mask_rows(inputs, torch.roll(inputs, -1, 1), replay=masked)
    assert (md.inputs[0] == 4).all() and md.rate.float()[0].item() == 1.0  # the weight 1/t~ the loss uses
    assert (md.targets[0] != -100).all()  # every next input is masked, and the last position always has one
    assert md.rate[1].item() == pytest.approx((1 - 1e-4) * 5 / 6 + 1e-4)


def test_mask_edge_case_frequency_at_2048_is_about_a_thousandth():
    """k > maskable happens only when k lands within the row's <s> count of L (about 0.1% at L = 2,048)."""
    generator = torch.Generator().manual_seed(3)
    counts = draw_mask_counts(400_000, 2048, generator)
    starts = 3  # a typical 2,048-token row opens a few documents
    assert (counts > 2048 - starts).double().mean().item() == pytest.approx(starts / 2048, rel=0.15)


def test_md_ranks_are_the_reduced_fraction():
    assert md_ranks(63 / 64, 256) == (1, 64)
    assert md_ranks(0.75, 8) == (1, 4)
    assert md_ranks(0.25, 4) == (3, 4)
    assert md_ranks(0.5, 2) == (1, 2)
    assert md_ranks(1.0, 1) == (0, 1) and md_ranks(0.0, 3) == (1, 1)
    assert md_ranks(0.9, 10) == (1, 10)


def test_rotation_pins_the_md_ranks_of_the_first_epochs():
    def md(alpha, world, epoch):
        m, d = md_ranks(alpha, world)
        return [r for r in range(world) if rank_runs_md(epoch, r, m, d)]

    # 63/64 on 256 ranks: m = 1 of every d = 64, the reference's ranks 0, 64, 128, 192 in epoch 0
    assert md(63 / 64, 256, 0) == [0, 64, 128, 192]
    assert md(63 / 64, 256, 1) == [63, 127, 191, 255]
    assert md(63 / 64, 256, 2) == [62, 126, 190, 254]
    assert md(63 / 64, 256, 64) == md(63 / 64, 256, 0)  # the rotation's period is d = 64 epochs
    # 3/4 on 8 ranks: m = 1 of every d = 4
    assert [md(0.75, 8, e) for e in range(5)] == [[0, 4], [3, 7], [2, 6], [1, 5], [0, 4]]


def test_rotation_epoch_counts_steps_not_data_passes():
    # the reference: epoch = step // (max_steps // R); 8,192 steps at R = 16 rotate every 512 steps
    assert [rotation_epoch(s, 8192, 16) for s in (0, 511, 512, 1023, 1024, 8191)] == [0, 0, 1, 1, 2, 15]
    assert {rotation_epoch(s, 8192, 1) for s in range(0, 8192, 97)} == {0}  # R = 1: one epoch, no rotation
    assert rotation_epoch(9, 10, 3) == 3  # 10 // 3 = 3 steps per epoch, truncated as the reference
    with pytest.raises(ValueError, match="leave epochs of 0 steps"):
        rotation_epoch(0, 3, 4)


def test_rank_rotation_gives_every_rank_the_share_alpha():
    d, alpha = 8, 0.75
    m, den = md_ranks(alpha, d)
    assert (m, den) == (1, 4)
    for rank in range(d):
        md_epochs = sum(rank_runs_md(epoch, rank, m, den) for epoch in range(den))
        assert md_epochs == m  # over d epochs each rank (and each data shard) sees MD m times
    for epoch in range(d):
        assert sum(rank_runs_md(epoch, r, m, den) for r in range(d)) == d * m // den  # 1 - alpha of the ranks


def test_rank_split_that_the_world_cannot_realise():
    with pytest.raises(ValueError, match=r"cannot be realised by splitting 2 rank.*here 1/64.*multiple of 64"):
        md_ranks(63 / 64, 2)
    with pytest.raises(ValueError, match="splitting 6 rank"):
        md_ranks(0.75, 6)  # d = 4 does not divide 6
    with pytest.raises(ValueError, match="cannot be realised"):
        md_ranks(1 / 3 + 1e-7, 3)  # not a fraction with a small denominator


def rotation_config(**extra):
    from dual_lm.config import load_train_config

    values = {
        "data.path": "unused",
        "objective.alpha_mode": "ranks",
        "objective.alpha": 0.75,
        "train.steps": 40,
        "data.repetitions": 4,
        "train.micro_batch_rows": 1,
        "data.seq_len": 16,
        "train.global_batch_tokens": 128,
        **extra,
    }
    return load_train_config(None, [f"{k}={v}" for k, v in values.items()])


def test_trainer_rotates_md_ranks_by_steps_not_by_the_loaders_epoch():
    from types import SimpleNamespace

    from dual_lm.training.dist import DistInfo
    from dual_lm.training.train import Trainer, make_plan

    cfg = rotation_config()

    def md_ranks_at(step):
        out = []
        for rank in range(8):
            info = DistInfo(rank=rank, world_size=8)
            trainer = SimpleNamespace(plan=make_plan(cfg, info), cfg=cfg, info=info, step=step, generator=None)
            batch = SimpleNamespace(inputs=torch.zeros(3, 16, dtype=torch.long), epoch=99)  # data epoch: ignored
            rows = Trainer.ar_rows_for(trainer, batch)
            assert rows.shape == (3,) and (rows.all() or not rows.any())  # a rank runs one objective
            if not rows.any():
                out.append(rank)
        return out

    assert make_plan(cfg, DistInfo(rank=0, world_size=8)).md_ranks == (1, 4)
    # 40 steps / R = 4: epochs of 10 steps
    assert [md_ranks_at(s) for s in (0, 9, 10, 20, 39)] == [[0, 4], [0, 4], [3, 7], [2, 6], [1, 5]]


@pytest.mark.parametrize(
    ("extra", "world", "message"),
    [
        ({"objective.alpha": 63 / 64}, 8, r"alpha_mode=ranks: alpha=0.984375 cannot be realised by splitting 8 rank"),
        ({"objective.alpha": 0.75}, 6, r"here 1/4\); use objective.alpha_mode=rows or launch a multiple of 4"),
        ({"train.steps": 3}, 8, r"alpha_mode=ranks: 3 steps over 4 repetitions leave epochs of 0 steps"),
    ],
)
def test_rank_plans_the_world_cannot_run_are_one_clear_error(extra, world, message):
    from dual_lm.errors import UserError
    from dual_lm.training.dist import DistInfo
    from dual_lm.training.train import make_plan

    micro = {"train.global_batch_tokens": 16 * world}
    with pytest.raises(UserError, match=message):
        make_plan(rotation_config(**extra, **micro), DistInfo(rank=0, world_size=world))
