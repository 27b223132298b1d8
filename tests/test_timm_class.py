"""effkern.timm.patch makes a real class: generated once per original class, subclass
overrides kept, unpatch, pickle / deepcopy / torch.save / state_dict round trips,
torch.compile, TorchScript (effkern arguments rejected there)."""

import copy
import io
import pickle

import pytest
import torch

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")

import effkern.timm as et  # noqa: E402
from oracles import rel_err  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

IMG = 32


def make(**kw):
    kw = {"pretrained": False, "img_size": IMG, "depth": 1, "embed_dim": 64, "num_heads": 2,
          "num_classes": 3, "reg_tokens": 1, **kw}
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", **kw).eval()


class MyViT(VisionTransformer):
    """A user subclass: its override must survive patch()."""

    def forward_head(self, x, pre_logits: bool = False):
        return 2.0 * super().forward_head(x, pre_logits=pre_logits)

    def extra(self):
        return "mine"


def test_generated_class_once_per_class_and_unpatch():
    a, b = make(), make()
    x = torch.randn(2, 3, IMG, IMG)
    want = a(x)
    et.patch(a), et.patch(b)
    assert type(a) is type(b) and type(a).__name__ == "PackedVisionTransformer"
    assert isinstance(a, VisionTransformer) and isinstance(a, et.PackedVisionTransformer)
    assert type(a).__mro__[1:3] == (et.PackedVisionTransformer, VisionTransformer)
    assert vars(a).keys() == vars(make()).keys()  # no instance attribute added
    assert et.unpatch(a) is a and type(a) is VisionTransformer and not et.is_patched(a)
    assert torch.equal(a(x), want)
    with pytest.raises(TypeError):
        a(x, keep=0.5)  # timm's forward again
    assert et.unpatch(a) is a  # unpatched: unchanged


def test_subclass_keeps_its_overrides():
    base = make()
    m = MyViT(img_size=IMG, depth=1, embed_dim=64, num_heads=2, num_classes=3, reg_tokens=1)
    m.load_state_dict(base.state_dict())
    m.eval()
    with pytest.raises(ValueError, match="MyViT overrides VisionTransformer.forward_head"):
        et.patch(m)  # the packed head would bypass it: rejected, not silently ignored

    class Extra(VisionTransformer):
        def extra(self):
            return "mine"

    e = Extra(img_size=IMG, depth=1, embed_dim=64, num_heads=2, num_classes=3, reg_tokens=1).eval()
    e.load_state_dict(base.state_dict())
    et.patch(e)
    assert type(e).__name__ == "PackedExtra" and e.extra() == "mine" and isinstance(e, Extra)
    x = torch.randn(2, 3, IMG, IMG)
    assert torch.equal(e(x), base(x))


def test_pickle_deepcopy_torch_save_and_state_dict_round_trips():
    ref = make()
    m = et.patch(copy.deepcopy(ref))
    x = torch.randn(2, 3, IMG, IMG)
    want = m(x, keep=0.5, generator=torch.Generator().manual_seed(1))
    clones = [pickle.loads(pickle.dumps(m)), copy.deepcopy(m)]
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    clones.append(torch.load(buf, weights_only=False))
    for c in clones:
        assert type(c) is type(m) and c.patch_embed.proj.weight is not m.patch_embed.proj.weight
        assert torch.equal(c(x, keep=0.5, generator=torch.Generator().manual_seed(1)), want)
        assert torch.equal(c(x), ref(x))
    # state_dict: same keys, loads both ways
    assert list(m.state_dict()) == list(ref.state_dict())
    fresh = make()
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh(x), ref(x))
    back = et.patch(make(num_classes=3))
    back.load_state_dict(ref.state_dict())
    assert torch.equal(back(x), ref(x))


def test_torchscript_is_timm_and_rejects_effkern_args():
    ref = make()
    m = et.patch(copy.deepcopy(ref))
    x = torch.randn(2, 3, IMG, IMG)
    s = torch.jit.script(m)
    assert torch.equal(s(x), ref(x))
    assert type(m).__name__ == "PackedVisionTransformer"  # scripting leaves the model patched
    with pytest.raises(RuntimeError, match="keep"):
        s(x, keep=0.5)

    class Wrapper(torch.nn.Module):  # scripted code that asks for token dropout
        def __init__(self, enc):
            super().__init__()
            self.enc = enc

        def forward(self, x):
            return self.enc(x, keep=0.5)

    with pytest.raises(RuntimeError, match="keep"):
        torch.jit.script(Wrapper(m))


def test_fx_rejects_concrete_effkern_args():
    m = et.patch(make())
    with pytest.raises(ValueError, match="torch.fx"):
        torch.fx.symbolic_trace(m, concrete_args={"keep": 0.5})


def test_torch_compile_native_path_fullgraph():
    """(the packed path under torch.compile: tests/test_timm.py)"""
    ref = make()
    m = et.patch(copy.deepcopy(ref))
    x = torch.randn(2, 3, IMG, IMG)
    torch._dynamo.reset()
    c = torch.compile(m, backend="aot_eager", fullgraph=True)
    assert rel_err(c(x), ref(x)) < 1e-6
