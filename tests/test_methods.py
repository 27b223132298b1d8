"""effkern.train.methods: losses vs hand computations, schedules, EMA, training steps."""
import math

import pytest
import torch
import torch.nn.functional as F

import effkern.timm as et
from effkern.train import dist
from effkern.train.methods import METHODS, ViewPlan, build_method
from effkern.train.methods.base import cosine_momentum, ema_update_
from effkern.train.methods.dino import dino_loss, teacher_temp_at
from effkern.train.methods.mocov3 import contrastive_loss
from effkern.train.methods.simclr import nt_xent

SMALL = {
    "mocov3": dict(mlp_dim=32, out_dim=16),
    "simclr": dict(hidden_dim=32, out_dim=16),
    "dino": dict(out_dim=40, hidden_dim=32, bottleneck_dim=16, n_local=2, local_size=16),
    "supervised": {},
}


def tiny_vit(num_classes=0):
    return et.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                           embed_dim=64, num_heads=2, depth=1, num_classes=num_classes)


def tiny_method(name, **kw):
    return build_method(name, tiny_vit(5 if name == "supervised" else 0), **{**SMALL[name], **kw})


class Stage:
    def __init__(self, patch_size=None, keeps=None):
        self.patch_size = patch_size
        self.keeps = keeps or {}

    def keep_for(self, branch):
        return self.keeps.get(branch, 1.0)


def make_views(m, B=4, base=32):
    return [torch.randn(B, 3, v.size, v.size) for v in m.view_plan(base)]


class Recorder:
    """Wraps encoder.forward_views (instance attribute) and records the calls."""

    def __init__(self, enc):
        self.calls, self.orig = [], enc.forward_views
        enc.forward_views = self

    def __call__(self, views, patch_sizes=None, keeps=None, generator=None):
        self.calls.append(dict(sizes=[v.shape[-1] for v in views], patch_sizes=list(patch_sizes),
                               keeps=list(keeps), grad=torch.is_grad_enabled()))
        return self.orig(views, patch_sizes=patch_sizes, keeps=keeps, generator=generator)


def teacher_of(m):
    return {"mocov3": "momentum_encoder", "dino": "teacher"}.get(m.name)


# ------------------------------------------------------------------ losses by hand

def test_mocov3_contrastive_by_hand():
    q, k, T = torch.randn(3, 5), torch.randn(3, 5), 0.2
    qn = [q[i] / q[i].norm() for i in range(3)]
    kn = [k[i] / k[i].norm() for i in range(3)]
    total = 0.0
    for i in range(3):
        logits = [float(qn[i] @ kn[j]) / T for j in range(3)]
        total += -(logits[i] - math.log(sum(math.exp(l) for l in logits)))
    expected = total / 3 * 2 * T
    assert contrastive_loss(q, k, T).item() == pytest.approx(expected, rel=1e-5)


def test_nt_xent_by_hand():
    za, zb, T = torch.randn(3, 4), torch.randn(3, 4), 0.1
    z = [F.normalize(t, dim=0) for t in list(za) + list(zb)]  # 2N embeddings, pair i <-> i+N
    N, total = 3, 0.0
    for i in range(2 * N):
        pos = (i + N) % (2 * N)
        num = math.exp(float(z[i] @ z[pos]) / T)
        den = sum(math.exp(float(z[i] @ z[k]) / T) for k in range(2 * N) if k != i)
        total += -math.log(num / den)
    assert nt_xent(za, zb, T).item() == pytest.approx(total / (2 * N), rel=1e-5)


def test_dino_loss_by_hand():
    K, B = 6, 2
    s = [torch.randn(B, K) for _ in range(4)]
    t = [torch.randn(B, K) for _ in range(2)]
    c, tt, ts = torch.randn(1, K) * 0.1, 0.05, 0.1
    total, n = 0.0, 0
    for i in range(2):
        for j in range(4):
            if i == j:
                continue
            for b in range(B):
                te = [math.exp((float(t[i][b, k]) - float(c[0, k])) / tt) for k in range(K)]
                pt = [e / sum(te) for e in te]
                se = [float(s[j][b, k]) / ts for k in range(K)]
                lse = math.log(sum(math.exp(x) for x in se))
                total += sum(-pt[k] * (se[k] - lse) for k in range(K)) / B
            n += 1
    assert dino_loss(s, t, c, tt, ts).item() == pytest.approx(total / n, rel=1e-5)


def test_dino_center_and_temperature():
    m = tiny_method("dino")
    assert m.center.abs().sum() == 0
    t1, t2 = torch.randn(8, 40), torch.randn(8, 40)
    m.update_center(t1)
    torch.testing.assert_close(m.center, 0.1 * t1.mean(0, keepdim=True))
    m.update_center(t2)
    torch.testing.assert_close(m.center, 0.9 * 0.1 * t1.mean(0, keepdim=True) + 0.1 * t2.mean(0, keepdim=True))
    assert m.teacher_temp_at(0.0) == pytest.approx(0.04)
    assert m.teacher_temp_at(0.15) == pytest.approx(0.055)
    assert m.teacher_temp_at(0.3) == pytest.approx(0.07)
    assert m.teacher_temp_at(1.0) == pytest.approx(0.07)
    assert teacher_temp_at(0.5, 0.04, 0.07, 0.0) == 0.07


# ------------------------------------------------------------------ schedules, EMA

def test_momentum_schedules():
    assert cosine_momentum(0.99, 0.0) == pytest.approx(0.99)
    assert cosine_momentum(0.99, 0.5) == pytest.approx(0.995)
    assert cosine_momentum(0.99, 1.0) == pytest.approx(1.0)
    dino = tiny_method("dino")
    assert [dino.momentum_at(p) for p in (0, 0.5, 1)] == pytest.approx([0.996, 0.998, 1.0])
    moco = tiny_method("mocov3")
    assert [moco.momentum_at(p) for p in (0, 0.5, 1)] == pytest.approx([0.99, 0.995, 1.0])


def test_ema_update_math():
    t, s = torch.nn.Parameter(torch.tensor([1.0, 2.0])), torch.tensor([3.0, -2.0])
    ema_update_([t], [s], 0.9)
    torch.testing.assert_close(t.data, torch.tensor([0.9 * 1 + 0.1 * 3, 0.9 * 2 - 0.1 * 2]))


def test_on_step_end_ema_of_encoder():
    m = tiny_method("mocov3")
    with torch.no_grad():
        m.encoder.pos_embed.add_(1.0)
    before = m.momentum_encoder.pos_embed.clone()
    m.on_step_end(0.5)  # m = 0.995
    torch.testing.assert_close(m.momentum_encoder.pos_embed, 0.995 * before + 0.005 * m.encoder.pos_embed)


# ------------------------------------------------------------------ training steps

@pytest.mark.parametrize("name", METHODS)
def test_training_step_grads_and_single_calls(name):
    m = tiny_method(name).train()
    stu = Recorder(m.encoder)
    tea = Recorder(getattr(m, teacher_of(m))) if teacher_of(m) else None
    views = make_views(m)
    loss, logs = m.training_step(views, torch.randint(0, 5, (4,)), Stage(), 0.5,
                                 generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and math.isfinite(logs["loss"])
    loss.backward()
    assert len(stu.calls) == 1 and stu.calls[0]["grad"]
    assert stu.calls[0]["sizes"] == [v.size for v in m.view_plan(32)]
    assert m.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    if tea is not None:
        assert len(tea.calls) == 1 and not tea.calls[0]["grad"]
        assert tea.calls[0]["sizes"] == [32, 32]
        t = getattr(m, teacher_of(m))
        assert all(p.grad is None and not p.requires_grad for p in t.parameters())
    ids = {id(p) for g in m.param_groups(0.05) for p in g["params"]}
    if tea is not None:
        assert not ids & {id(p) for p in t.parameters()}
    assert id(m.encoder.blocks[0].attn.qkv.weight) in ids
    m.on_step_end(0.6)


@pytest.mark.parametrize("name", METHODS)
def test_stage_keep_and_patch_applied(name):
    m = tiny_method(name).train()
    keeps = {"q": 0.5, "k": 0.75, "a": 0.5, "b": 0.25, "global": 0.5, "local": 0.75, "default": 0.5}
    stu = Recorder(m.encoder)
    tea = Recorder(getattr(m, teacher_of(m))) if teacher_of(m) else None
    m.training_step(make_views(m), torch.randint(0, 5, (4,)), Stage(4, keeps), 0.1)
    expected = {"mocov3": [0.5, 0.5], "simclr": [0.5, 0.25], "dino": [0.5, 0.5, 0.75, 0.75],
                "supervised": [0.5]}[name]
    assert stu.calls[0]["keeps"] == expected
    assert stu.calls[0]["patch_sizes"] == [4] * len(expected)
    if tea is not None:
        assert tea.calls[0]["keeps"] == ({"mocov3": [0.75, 0.75], "dino": [None, None]}[name])
        assert tea.calls[0]["patch_sizes"] == [4, 4]
    # keep 1.0 -> None (full-token path)
    stu.calls.clear()
    m.training_step(make_views(m), torch.randint(0, 5, (4,)), Stage(None, {}), 0.1)
    assert stu.calls[0]["keeps"] == [None] * len(expected)
    assert stu.calls[0]["patch_sizes"] == [None] * len(expected)


def test_cost_views_and_view_plan():
    st = Stage(16, {"q": 0.5, "k": 1.0, "a": 0.5, "b": 0.5, "global": 0.5, "local": 1.0, "default": 0.25})
    moco = tiny_method("mocov3")
    assert moco.cost_views(224, st) == [(224, 16, 0.5, True)] * 2 + [(224, 16, 1.0, False)] * 2
    assert tiny_method("simclr").cost_views(224, st) == [(224, 16, 0.5, True)] * 2
    dino = build_method("dino", tiny_vit(), out_dim=40, hidden_dim=32, bottleneck_dim=16)
    plan = dino.view_plan(224)
    assert plan[:2] == [ViewPlan("global", 224, "global")] * 2
    assert plan[2:] == [ViewPlan("local", 96, "local")] * 8
    cv = dino.cost_views(224, st)
    assert cv == [(224, 16, 0.5, True)] * 2 + [(96, 16, 1.0, True)] * 8 + [(224, 16, 1.0, False)] * 2
    # the loop shrinks only the global views (stage.resolution): locals keep the planned size
    assert dino.cost_views(112, st) == ([(112, 16, 0.5, True)] * 2 + [(96, 16, 1.0, True)] * 8
                                        + [(112, 16, 1.0, False)] * 2)
    assert tiny_method("supervised").cost_views(224, st) == [(224, 16, 0.25, True)]


def test_dino_freeze_last_layer():
    m = tiny_method("dino", freeze_last_layer=0.1).train()
    v = m.head.last_layer.weight_v
    ids = {id(p) for g in m.param_groups(0.04) for p in g["params"]}
    assert id(v) in ids and id(m.head.last_layer.weight_g) not in ids  # norm_last_layer: g fixed
    loss, _ = m.training_step(make_views(m), None, Stage(), 0.05)
    loss.backward()
    assert m.head.last_layer.grad_frozen
    assert v.grad is not None and v.grad.abs().sum() == 0  # zero, not None: DDP-safe
    assert m.encoder.blocks[0].mlp.fc1.weight.grad.abs().sum() > 0
    m.zero_grad()
    loss, _ = m.training_step(make_views(m), None, Stage(), 0.2)
    loss.backward()
    assert not m.head.last_layer.grad_frozen and v.grad.abs().sum() > 0
    assert m.eval_encoder() is m.teacher and not m.teacher.training


def test_param_groups_no_decay():
    m = tiny_method("simclr")
    groups = {g["name"]: g for g in m.param_groups(0.1)}
    nd = {id(p) for p in groups["no_decay"]["params"]}
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    enc = m.encoder
    for p in (enc.pos_embed, enc.cls_token, enc.blocks[0].norm1.weight, enc.blocks[0].attn.qkv.bias):
        assert id(p) in nd
    assert id(enc.blocks[0].attn.qkv.weight) not in nd


def test_build_method_errors():
    with pytest.raises(ValueError) as e:
        build_method("byol", tiny_vit())
    for n in METHODS:
        assert n in str(e.value)
    with pytest.raises(TypeError):
        build_method("simclr", tiny_vit(), not_a_param=1)


def test_dist_single_process():
    x = torch.randn(2, 3)
    assert not dist.is_dist() and dist.rank() == 0 and dist.world_size() == 1
    assert dist.all_gather_with_grad(x)[0] is x
    assert dist.all_reduce_mean_(x) is x


def test_dino_frozen_last_layer_same_forward():
    m = tiny_method("dino")
    x = torch.randn(3, 16)
    m.head.last_layer.grad_frozen = True
    a = m.head.last_layer(x)
    m.head.last_layer.grad_frozen = False
    torch.testing.assert_close(a, m.head.last_layer(x))
    w = m.head.last_layer.weight
    torch.testing.assert_close(w.norm(dim=1), torch.ones(40))  # weight_g = 1: unit rows


def test_dino_bn_head_teacher_normalises_by_its_batch():
    # teacher == student at init; with BN in the head both must normalise by the batch's statistics
    # while training (a teacher BN left in eval mode would use its never-updated running stats 0 / 1)
    m = tiny_method("dino", use_bn_in_head=True)  # as built: the training loop never calls .train()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, m.encoder.num_features, generator=g) * 3 + 5
    with torch.no_grad():
        torch.testing.assert_close(m.teacher_head(x), m.head(x))
    assert not m.teacher.training
    m.eval()
    assert not any(mod.training for mod in m.teacher_head.modules())
    m.train()
    with torch.no_grad():
        torch.testing.assert_close(m.teacher_head(x), m.head(x))


@pytest.mark.parametrize("name", ["mocov3", "dino"])
def test_compiled_step_does_not_recompile_as_progress_advances(name):
    """The trainer compiles training_step (--compile) and passes a new progress float
    every step: the step must not read it (schedules reach it through on_progress and
    tensors), or dynamo specialises on it and recompiles each step until its limit.
    Dynamo tracing only (a counting backend): no code generation."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    m = tiny_method(name)
    counter = CompileCounter()
    step = torch.compile(m.training_step, backend=counter)
    views = make_views(m)
    m.on_progress(0.1)  # what the trainer does before each step
    step(views, None, Stage(), 0.1)
    first = counter.frame_count
    assert first > 0
    for p in (0.4, 0.7):
        m.on_progress(p)
        step(views, None, Stage(), p)
    assert counter.frame_count == first, f"recompiled: {counter.frame_count - first} new frames"
    if name == "dino":  # the temperature the compiled step read is the schedule's, through the buffer
        assert m.teacher_temp_now.item() == pytest.approx(m.teacher_temp_at(0.7))
