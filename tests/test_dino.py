import math

import numpy as np
import pytest
import torch

from core.dino import (DINOHead, DINOLoss, MultiCropWrapper, WeightNormLinear, cancel_gradients_last_layer,
                       clip_gradients, ema_update)
from core.optim import LARS, param_groups
from core.schedule import cosine_schedule


def test_loss_hand_computed_two_crops():
    # Teacher temp 0.5, centre 0: q1 = softmax([2, 0]) = [0.880797, 0.119203], q2 = softmax([0, 2]).
    # Student temp 0.1: s1 = [0, 0] -> log-probs [-ln 2, -ln 2]; s2 = [0.1, 0] -> [1, 0] -> [-0.313262, -1.313262].
    # Pairs of different views: CE(q1, s2) = 0.880797 * 0.313262 + 0.119203 * 1.313262 = 0.432466,
    # CE(q2, s1) = ln 2 = 0.693147; mean over the two pairs = 0.562807.
    loss_fn = DINOLoss(out_dim=2, ncrops=2, warmup_teacher_temp=0.5, teacher_temp=0.5,
                       warmup_teacher_temp_epochs=0, nepochs=1)
    student = torch.tensor([[0.0, 0.0], [0.1, 0.0]])
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert loss_fn(student, teacher, epoch=0).item() == pytest.approx(0.562807, abs=1e-5)


def test_loss_pairs_skip_same_view_and_average():
    torch.manual_seed(0)
    ncrops, batch, dim = 4, 3, 5
    loss_fn = DINOLoss(dim, ncrops, 0.04, 0.04, 0, 1)
    loss_fn.center.copy_(torch.randn(1, dim))
    s, t = torch.randn(ncrops * batch, dim), torch.randn(2 * batch, dim)
    q = torch.softmax((t - loss_fn.center) / 0.04, -1).chunk(2)
    logp = torch.log_softmax(s / 0.1, -1).chunk(ncrops)
    terms = [(-q[i] * logp[v]).sum(-1).mean() for i in range(2) for v in range(ncrops) if v != i]
    assert len(terms) == 2 * ncrops - 2
    assert loss_fn(s, t, 0).item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-6)


def test_center_ema_and_accumulation():
    loss_fn = DINOLoss(3, 2, 0.04, 0.04, 0, 1)
    t1 = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    loss_fn.accumulate_center(t1)
    loss_fn.update_center()
    assert torch.allclose(loss_fn.center, 0.1 * torch.tensor([[2.0, 2.0, 2.0]]))
    # Two micro-batches folded in one update equal one batch holding both.
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    split, whole = DINOLoss(3, 2, 0.04, 0.04, 0, 1), DINOLoss(3, 2, 0.04, 0.04, 0, 1)
    split.accumulate_center(a)
    split.accumulate_center(b)
    split.update_center()
    whole.accumulate_center(torch.cat([a, b]))
    whole.update_center()
    assert torch.allclose(split.center, whole.center)
    assert torch.allclose(whole.center, 0.1 * torch.cat([a, b]).mean(0, keepdim=True))


def test_teacher_temperature_schedule():
    loss_fn = DINOLoss(2, 2, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=4, nepochs=10)
    assert np.allclose(loss_fn.teacher_temp_schedule[:5], [0.04, 0.05, 0.06, 0.07, 0.07])
    assert len(loss_fn.teacher_temp_schedule) == 10


def test_head_layout_and_normalisation():
    head = DINOHead(16, 32, hidden_dim=24, bottleneck_dim=8)
    assert list(head.state_dict()) == ["mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mlp.4.weight",
                                       "mlp.4.bias", "last_layer.weight_v", "last_layer.weight_g"]
    assert not head.last_layer.weight_g.requires_grad
    x = torch.randn(5, 16)
    bottleneck = torch.nn.functional.normalize(head.mlp(x), dim=-1)
    w = head.last_layer.weight_v / head.last_layer.weight_v.norm(dim=1, keepdim=True)
    assert torch.allclose(head(x), bottleneck @ w.T, atol=1e-6)
    assert torch.allclose(w.norm(dim=1), torch.ones(32))
    assert DINOHead(16, 32, norm_last_layer=False).last_layer.weight_g.requires_grad
    assert "mlp.1.running_mean" in DINOHead(16, 32, use_bn=True).state_dict()


@pytest.mark.parametrize("rows", [3, 40])  # fewer, then more inputs than the weight has elements
@pytest.mark.parametrize("train_g", [False, True])
def test_weight_norm_layer_matches_torch_weight_norm(rows, train_g):
    """Output and gradients against torch's own weight-norm parametrisation, on both forms of our layer."""
    torch.manual_seed(0)
    ours = WeightNormLinear(8, 12)
    with torch.no_grad():
        ours.weight_g.uniform_(0.5, 2.0)
    ours.weight_g.requires_grad = train_g
    ref = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(8, 12, bias=False))
    with torch.no_grad():
        ref.parametrizations.weight.original0.copy_(ours.weight_g)
        ref.parametrizations.weight.original1.copy_(ours.weight_v)
    x = torch.randn(rows, 8)
    w = torch.randn(rows, 12)
    (ours(x) * w).sum().backward()
    (ref(x) * w).sum().backward()
    torch.testing.assert_close(ours(x), ref(x), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours.weight_v.grad, ref.parametrizations.weight.original1.grad, atol=1e-5, rtol=1e-5)
    if train_g:
        torch.testing.assert_close(ours.weight_g.grad, ref.parametrizations.weight.original0.grad, atol=1e-5,
                                   rtol=1e-5)


def test_multicrop_runs_backbone_once_per_resolution():
    calls = []

    class Backbone(torch.nn.Module):
        def forward(self, x):
            calls.append(tuple(x.shape))
            return x.mean(dim=(2, 3))

    model = MultiCropWrapper(Backbone(), torch.nn.Identity())
    crops = [torch.randn(2, 3, 8, 8)] * 2 + [torch.randn(2, 3, 4, 4)] * 3
    out = model(crops)
    assert calls == [(4, 3, 8, 8), (6, 3, 4, 4)]
    assert torch.allclose(out, torch.cat([c.mean(dim=(2, 3)) for c in crops]))


def test_ema_update():
    t, s = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    expected = [0.9 * pt.detach() + 0.1 * ps.detach() for pt, ps in zip(t.parameters(), s.parameters())]
    ema_update(t, s, 0.9)
    for p, e in zip(t.parameters(), expected):
        assert torch.allclose(p, e)


def test_clip_is_per_parameter_and_last_layer_frozen():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    model[0].weight.grad = torch.tensor([[3.0, 4.0], [0.0, 0.0]])  # norm 5 -> scaled to 1
    model[0].bias.grad = torch.tensor([0.3, 0.4])  # norm 0.5 -> untouched
    clip_gradients(model, 1.0)
    assert model[0].weight.grad.norm().item() == pytest.approx(1.0, rel=1e-5)
    assert torch.allclose(model[0].bias.grad, torch.tensor([0.3, 0.4]))
    head = DINOHead(4, 6, hidden_dim=5, bottleneck_dim=3, norm_last_layer=False)
    head(torch.randn(2, 4)).sum().backward()
    cancel_gradients_last_layer(0, head, freeze_last_layer=1)
    assert head.last_layer.weight_v.grad is None and head.mlp[0].weight.grad is not None
    head(torch.randn(2, 4)).sum().backward()
    cancel_gradients_last_layer(1, head, freeze_last_layer=1)
    assert head.last_layer.weight_v.grad is not None


def test_param_groups_no_decay_on_bias_and_norm():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(model)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3])]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


def test_lars_step_hand_computed():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
    w.grad = torch.tensor([[0.0, 1.0]])
    opt = LARS([{"params": [w], "weight_decay": 0.0}], lr=1.0, eta=0.001)
    opt.step()
    # trust ratio 0.001 * 5 / 1 = 0.005; momentum buffer = 0.005 * g; w -= lr * buffer
    assert torch.allclose(w.detach(), torch.tensor([[3.0, 3.995]]))


def test_cosine_schedule_values():
    s = cosine_schedule(1.0, 0.0, epochs=2, niter_per_ep=5, warmup_epochs=1, start_warmup_value=0.0)
    assert np.allclose(s[:5], [0.0, 0.25, 0.5, 0.75, 1.0])
    expected = [0.5 * (1 + math.cos(math.pi * i / 5)) for i in range(5)]
    assert np.allclose(s[5:], expected)
    assert s[6] == pytest.approx(0.904508, abs=1e-6)
    m = cosine_schedule(0.996, 1.0, epochs=100, niter_per_ep=10)
    assert m[0] == pytest.approx(0.996) and m[-1] == pytest.approx(1.0, abs=1e-6) and np.all(np.diff(m) >= 0)
