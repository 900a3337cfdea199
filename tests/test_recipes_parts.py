"""The recipes' parts on hand-checked numbers: losses, ReduceLROnPlateauV2, SAM, samplers, curriculum, LR search."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from reinforce.evaluation import EvalSamples, ensemble_probs
from reinforce.recipes.distill import TeacherReport, baseline_top1, teacher_report
from reinforce.recipes.errors import TrainError
from reinforce.recipes.losses import DistillationLoss, kd_kl
from reinforce.recipes.lr_finder import range_test, tpe_search
from reinforce.recipes.sam import SAM, frozen_norm_statistics
from reinforce.recipes.samplers import EntropyCurriculum, FixedBatchSampler, VariableBatchSampler, multiscale_sizes
from reinforce.recipes.schedules import ReduceLROnPlateauV2
from reinforce.build.teachers import create_ensemble
from reinforce_loaders.samplers import ReinforcedSampler


def test_usi_loss_is_ce_plus_alpha_kl_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    teacher = torch.tensor([[0.7, 0.2, 0.1]])
    z = math.exp(2) + 1 + math.exp(-1)
    student = [math.exp(2) / z, 1 / z, math.exp(-1) / z]
    ce = -math.log(student[0])
    kl = sum(t * math.log(t / s) for t, s in zip([0.7, 0.2, 0.1], student))
    label = torch.tensor([0])
    assert float(DistillationLoss(5.0)(logits, label, teacher)) == pytest.approx(ce + 5 * kl, rel=1e-6)
    assert float(DistillationLoss(math.inf)(logits, label, teacher)) == pytest.approx(kl, rel=1e-6)
    assert float(DistillationLoss(5.0)(logits, label, torch.zeros(1, 0))) == pytest.approx(ce, rel=1e-6)
    # tau = 2: both distributions softened, KL scaled by tau^2 (Eq. 4)
    soft_s = np.exp(np.array([2.0, 0.0, -1.0]) / 2)
    soft_s /= soft_s.sum()
    soft_t = np.array([0.7, 0.2, 0.1]) ** 0.5
    soft_t /= soft_t.sum()
    expected = 4 * float(np.sum(soft_t * np.log(soft_t / soft_s)))
    assert float(kd_kl(logits, teacher, 2.0)) == pytest.approx(expected, rel=1e-5)


def test_tempered_kl_leaves_the_classes_a_top_k_target_omits_at_zero():
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5, -1.0, 0.2]])
    teacher = torch.tensor([[0.6, 0.4, 0.0, 0.0, 0.0, 0.0]])  # a top-2 record over 6 classes
    soft_s = torch.log_softmax(logits[0] / 4, dim=-1).double().numpy()
    soft_t = np.array([0.6, 0.4]) ** 0.25
    soft_t /= soft_t.sum()  # only the stored classes carry mass at tau = 4
    expected = 16 * float(np.sum(soft_t * (np.log(soft_t) - soft_s[:2])))
    assert float(kd_kl(logits, teacher, 4.0)) == pytest.approx(expected, rel=1e-5)


def test_batch_mixing_mixes_labels_and_soft_targets_with_one_weight_keyed_by_seed_and_step():
    from reinforce_loaders import SoftTargetMixup

    mixing = SoftTargetMixup(mixup_alpha=1.0, cutmix_alpha=0.0, seed=3)
    images = torch.stack([torch.zeros(3, 4, 4), torch.ones(3, 4, 4)])
    one_hot = torch.nn.functional.one_hot(torch.tensor([0, 2]), 3).float()
    soft = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]])
    np.random.seed(0)
    mixed, (labels, targets) = mixing(images.clone(), (one_hot, soft), step=5)
    lam = 1 - float(mixed[0, 0, 0, 0])  # image 0 (zeros) mixed with image 1 (ones): value = 1 - lam
    assert 0 < lam < 1
    assert torch.allclose(labels[0], torch.tensor([lam, 0.0, 1 - lam]))
    assert torch.allclose(targets[0], lam * soft[0] + (1 - lam) * soft[1])
    assert torch.allclose(targets.sum(-1), torch.ones(2))
    np.random.seed(1)  # the global RNG plays no part: the draw is the (seed, step)'s, and it is left alone
    state = np.random.get_state()
    again, _ = mixing(images.clone(), (one_hot, soft), step=5)
    other, _ = mixing(images.clone(), (one_hot, soft), step=6)
    assert torch.equal(again, mixed) and not torch.equal(other, mixed)
    after = np.random.get_state()
    assert np.array_equal(after[1], state[1]) and after[2] == state[2]


def _lr_curve(losses, scores, **settings):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [param]}, {"params": [torch.nn.Parameter(torch.zeros(1))],
                                                       "lr_scale": 2.0}], lr=1.0)
    schedule = ReduceLROnPlateauV2(optimizer, 1.0, **settings)
    curve, bias = [], []
    for loss, score in zip(losses, scores):
        curve.append(optimizer.param_groups[0]["lr"])
        bias.append(optimizer.param_groups[1]["lr"])
        schedule.step(loss, score)
        if schedule.should_stop:
            break
    return curve, bias


def test_reduce_lr_on_plateau_v2_warmup_plateau_decay_and_early_stop():
    losses = [5, 4, 3, 3, 3, 3, 2.9, 2.9, 2.9, 2.9, 2.9, 2.9, 2.9, 2.9, 2.9, 2.9]
    scores = [10, 20, 30, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40]
    curve, bias = _lr_curve(losses, scores, max_epochs=16, warmup_epochs=2, patience=2, factor=0.1,
                            min_lr_ratio=0.01)
    # warmup 0.5, 1; best loss 3 at epoch 2; epochs 3, 4, 5 without improvement (> patience 2) -> 0.1;
    # the new plateau (2.9 from epoch 6) runs out after epoch 9 -> 0.01 = the floor. The score has not improved
    # since epoch 3, but the patience counts epochs at the floor: 10 and 11, then training stops.
    assert curve == pytest.approx([0.5, 1, 1, 1, 1, 1, 0.1, 0.1, 0.1, 0.1, 0.01, 0.01])
    assert bias == pytest.approx([2 * lr for lr in curve])  # biases keep their x2 scale
    # A better score at the floor (epoch 10) restarts the patience: epochs 11 and 12 without, then the stop.
    scores[10] = 41
    curve, _ = _lr_curve(losses, scores, max_epochs=16, warmup_epochs=2, patience=2, factor=0.1, min_lr_ratio=0.01)
    assert curve == pytest.approx([0.5, 1, 1, 1, 1, 1, 0.1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01])


def test_reduce_lr_on_plateau_v2_forces_a_decay_at_75_percent():
    curve, _ = _lr_curve([10 - e for e in range(8)], list(range(8)), max_epochs=8, warmup_epochs=1, patience=5)
    # the loss always improves, so no plateau; the decay is forced once 6 of 8 epochs (75 %) have run
    assert curve == pytest.approx([1, 1, 1, 1, 1, 1, 0.1, 0.1])


def test_sam_step_by_hand():
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    sam = SAM(torch.optim.SGD([w], lr=0.1), rho=0.5)
    (w ** 2).sum().div(2).backward()  # gradient w = (3, 4), norm 5
    sam.perturb()
    assert torch.allclose(w.detach(), torch.tensor([3.3, 4.4]))  # w + rho * g / |g|
    sam.zero_grad()
    (w ** 2).sum().div(2).backward()  # gradient at the perturbed point: (3.3, 4.4)
    sam.step()
    assert torch.allclose(w.detach(), torch.tensor([3.0 - 0.33, 4.0 - 0.44]))


def test_sam_second_pass_keeps_batch_norm_running_statistics():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    x = torch.randn(16, 4)
    sam = SAM(torch.optim.SGD(net.parameters(), lr=0.1), rho=0.5)
    net(x).square().mean().backward()
    once = (net[1].running_mean.clone(), net[1].running_var.clone(), int(net[1].num_batches_tracked))
    sam.perturb()
    sam.zero_grad()
    with frozen_norm_statistics(net):
        out = net(x)
    out.square().mean().backward()
    sam.step()
    assert torch.equal(net[1].running_mean, once[0]) and torch.equal(net[1].running_var, once[1])
    assert int(net[1].num_batches_tracked) == once[2] == 1 and net[1].momentum == 0.1
    net(x)  # outside the context the statistics move again
    assert not torch.equal(net[1].running_mean, once[0])


def test_fixed_batch_sampler_splits_ranks_disjointly_with_equal_steps():
    samplers = [FixedBatchSampler(45, 8, seed=3, rank=rank, world_size=2) for rank in (0, 1)]
    for epoch in (0, 1):
        batches = []
        for sampler in samplers:
            sampler.set_epoch(epoch)
            batches.append(list(sampler))
        assert [len(b) for b in batches] == [2, 2]  # 45 // (2 x 8)
        seen = [p for rank in batches for batch in rank for p in batch]
        assert len(seen) == len(set(seen)) == 32
    samplers[0].set_start(1)
    assert list(samplers[0]) == batches[0][1:]


def test_fixed_batch_sampler_cuts_the_loaders_sequence_into_batches():
    for rank in (0, 1):
        loader_side = ReinforcedSampler(range(45), seed=3, rank=rank, world_size=2, drop_last=True)
        loader_side.set_epoch(1)
        sampler = FixedBatchSampler(45, 8, seed=3, rank=rank, world_size=2)
        sampler.set_epoch(1)
        batches = list(sampler)
        assert [p for batch in batches for p in batch] == list(loader_side)[:16]  # 22 per rank, 2 whole batches
        assert list(sampler) == batches  # a second pass repeats the epoch
        sampler.set_start(1)  # a resumed run: the loader's state one step (2 x 8 samples) into the epoch
        assert sampler.positions.state_dict()["position"] == 16
        assert list(sampler) == batches[1:]


def test_variable_batch_sampler_trades_batch_size_for_resolution():
    assert multiscale_sizes(224) == [128, 160, 192, 224, 256, 288, 320]
    assert multiscale_sizes(32) == [16, 24, 32, 40, 48]
    ranks = [VariableBatchSampler(400, 8, 32, [16, 32, 48], seed=0, rank=r, world_size=2) for r in (0, 1)]
    plans = [list(sampler) for sampler in ranks]
    assert len(plans[0]) == len(plans[1]) > 0
    batch_of = {16: 32, 32: 8, 48: 3}  # 8 x 32^2 / r^2, rounded down
    for one, two in zip(*plans):
        assert one[0][1] == two[0][1]  # both ranks at one resolution per step
        assert len(one) == len(two) == batch_of[one[0][1]]
    seen = [p for plan in plans for batch in plan for p, _ in batch]
    assert len(seen) == len(set(seen))
    assert len({batch[0][1] for batch in plans[0]}) > 1


def test_variable_batch_sampler_keeps_batches_even_for_mixing():
    sampler = VariableBatchSampler(400, 8, 32, [16, 24, 32, 40, 48], seed=0, multiple_of=2)
    batches = {batch[0][1]: len(batch) for batch in sampler}
    assert batches == {16: 32, 24: 14, 32: 8, 40: 4, 48: 2}  # 8 x 32^2 / r^2 = 32, 14.2, 8, 5.1, 3.6, made even


def test_mixing_with_an_odd_batch_size_is_refused_before_training():
    from reinforce.recipes import TrainConfig, resolve

    with pytest.raises(TrainError, match="--batch-size 7 is odd; pass 8"):
        resolve(TrainConfig(train_source="x", val_source="y", model="resnet18", recipe="plain", out="o",
                            batch_size=7, mixup=0.2))


def test_entropy_curriculum_widens_from_the_easiest_records():
    entropies = np.random.default_rng(0).random((5, 10))
    easy = EntropyCurriculum(entropies, "easy", epochs=5, seed=0)
    hard = EntropyCurriculum(entropies, "hard", epochs=5, seed=0)
    assert easy.window(0) == (0, 1) and hard.window(0) == (9, 10)
    assert easy.window(4) == (0, 10) and hard.window(4) == (0, 10)
    assert [easy(i, 0) for i in range(5)] == list(entropies.argmin(1))
    assert [hard(i, 0) for i in range(5)] == list(entropies.argmax(1))


def test_range_test_picks_the_steepest_descent():
    # loss(lr) = -tanh(log(lr / 1e-3)) falls fastest at lr = 1e-3
    found = range_test(lambda batch, lr: -math.tanh(math.log(lr / 1e-3)), iter(range(1000)), start_lr=1e-6,
                       end_lr=1.0, num_steps=61, smoothing=0.0)
    assert found.chosen == pytest.approx(1e-3, rel=0.13)  # the grid steps by 10^(6/60), 26 %


def test_tpe_search_finds_the_best_interval_and_prunes():
    def objective(lr, report):
        score = -abs(math.log(lr / 3e-3))
        for epoch in range(3):
            if report(score - (2 - epoch), epoch):
                return score
        return score

    lr, history = tpe_search(objective, 1e-3, 1e-2, trials=12, seed=0)
    assert 2e-3 < lr < 4.5e-3
    assert len(history) == 12 and sum(h["pruned"] for h in history) >= 1


def test_teacher_warning_needs_a_clear_margin():
    strong = TeacherReport(95.0, "held-out", "")
    assert strong.warning(89.0, kd_only=False) is None
    close = TeacherReport(92.0, "train-agreement", "")
    warning = close.warning(88.0, kd_only=True)
    assert "+4.00 points" in warning and "--kd-only is risky" in warning and "optimistic" in warning


def test_teacher_margin_against_a_plain_baseline_run(tmp_path):
    report = TeacherReport(99.33, "held-out", "")
    # This run's own distilled student approaches the teachers: the warning says what it compared.
    own = report.warning(96.2, kd_only=True)
    assert "+3.13 points" in own and "this run's student, trained with them" in own and "--baseline" in own
    # Against a plain-trained student 7 points below: no warning; 4 points below: warned, naming the baseline.
    assert report.warning(92.18, kd_only=True, baseline=True) is None
    close = report.warning(95.33, kd_only=False, baseline=True)
    assert "+4.00 points" in close and "plain-trained student of --baseline" in close
    # 7 points and more above a plain student, with CE in the loss: KL alone is suggested (not as a warning).
    assert "+7.15 points better than the plain student" in report.suggestion(92.18, True, "--kd-only")
    assert "--kd-mode replace" in report.suggestion(92.18, True, "--kd-mode replace")
    assert report.suggestion(95.33, True, "--kd-only") is None  # margin below 7
    assert report.suggestion(92.18, False, "--kd-only") is None  # already KL only
    assert TeacherReport(99.33, "train-agreement", "").suggestion(80.0, True, "--kd-only") is None  # optimistic
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "summary.json").write_text('{"best_top1": 92.18}')
    assert baseline_top1(str(tmp_path / "plain")) == 92.18
    with pytest.raises(TrainError, match="--baseline .*cannot read"):
        baseline_top1(str(tmp_path / "missing"))
    (tmp_path / "noval").mkdir()
    (tmp_path / "noval" / "summary.json").write_text('{"best_top1": null}')
    with pytest.raises(TrainError, match="records no best_top1"):
        baseline_top1(str(tmp_path / "noval"))


def test_fine_tune_classifier_starts_at_zero(tmp_path):
    import timm
    from safetensors.torch import save_file

    from reinforce.recipes.models import create_student

    path = tmp_path / "lite.safetensors"
    save_file(timm.create_model("test_efficientnet", num_classes=1000).state_dict(), str(path))
    student = create_student(f"test_efficientnet={path}", 8, fine_tune=True)
    head = student.module.get_classifier()
    assert head.weight.shape[0] == 8 and not head.weight.any() and not head.bias.any()
    logits = student.module.eval()(torch.rand(2, 3, 32, 32))
    assert torch.allclose(torch.nn.functional.cross_entropy(logits, torch.tensor([0, 5])), torch.tensor(math.log(8)))
    assert "re-initialized (zeros) for 8 classes" in student.notes[0]


def test_teachers_are_scored_on_validation_images_at_their_own_input_size(digits, teacher_weights):
    asked = []

    def batches_at(size):
        asked.append(size)
        return torch.utils.data.DataLoader(EvalSamples(digits[1], size, 0.95), batch_size=256)

    report = teacher_report(None, None, teacher_weights, batches_at)
    assert asked == [40]  # the members take 32 and 40 px: the larger, not the student's size
    assert report.kind == "held-out" and "at 40 px" in report.detail
    images, labels = next(iter(batches_at(40)))
    expected = 100.0 * float((ensemble_probs(create_ensemble(teacher_weights), images).argmax(-1) == labels).mean(
        dtype=torch.float64))
    assert report.top1 == pytest.approx(expected)


def test_train_agreement_reads_records_only_and_equals_the_replayed_targets(digits, store, monkeypatch):
    from reinforce.recipes.data import StoreSamples
    from reinforce.recipes.distill import train_agreement_top1

    samples = StoreSamples(str(digits[0]), str(store))
    samples.set_epoch(3)
    replayed = [samples[p] for p in range(len(samples))]
    expected = 100.0 * sum(int(int(target.argmax()) == label) for _, label, target in replayed) / len(samples)

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(type(samples.dataset), "_source_image", no_decoding)
    assert train_agreement_top1(samples) == (expected, len(samples))
    top1, used = train_agreement_top1(samples, max_samples=10)
    assert used == 10 and 0 <= top1 <= 100
