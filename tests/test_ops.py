"""The lean training ops compute what the plain PyTorch calls compute, values and gradients, while
saving less for backward; the fast dropout drops with probability p; the chunked tied cross-entropy
survives a target far below the top logit and stays close in bf16."""

import math
import platform

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from diffutext import ops
from diffutext.allocator import limit_heap_fragmentation
from diffutext.model import Block
from diffutext.tied_nll import tied_nll


def grads(out, inputs, seed=0):
    up = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, inputs, up)


def test_norm_linear_equals_layer_norm_then_linear():
    torch.manual_seed(0)
    norm, linear = torch.nn.LayerNorm(12).double(), torch.nn.Linear(12, 7).double()
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    x = torch.randn(3, 5, 12, dtype=torch.double, requires_grad=True)
    inputs = (x, norm.weight, norm.bias, linear.weight, linear.bias)
    got, ref = ops.norm_linear(x, norm, linear), linear(norm(x))
    assert torch.allclose(got, ref, atol=1e-12)
    for a, b in zip(grads(got, inputs), grads(ref, inputs)):
        assert torch.allclose(a, b, atol=1e-12)


def test_gelu_linear_equals_gelu_then_linear():
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 5).double()
    a = torch.randn(4, 3, 16, dtype=torch.double, requires_grad=True)
    inputs = (a, linear.weight, linear.bias)
    got, ref = ops.gelu_linear(a, linear), linear(F.gelu(a))
    assert torch.allclose(got, ref, atol=1e-12)
    for x, y in zip(grads(got, inputs), grads(ref, inputs)):
        assert torch.allclose(x, y, atol=1e-12)


def test_attention_with_dropout_equals_the_formula_with_the_same_mask():
    q, k, v = (torch.randn(2, 3, 6, 4, dtype=torch.double, requires_grad=True) for _ in range(3))
    torch.manual_seed(1)
    got = ops.attention(q, k, v, 0.3, training=True)
    torch.manual_seed(1)
    seed = int(torch.empty((), dtype=torch.int64).random_())  # the op's one draw from the default generator
    drop = ops.drop_mask((2, 3, 6, 6), 0.3, q.device, seed)
    ref = (torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(4), -1).masked_fill(drop, 0) / 0.7) @ v
    assert drop.any() and torch.allclose(got, ref, atol=1e-12)
    for a, b in zip(grads(got, (q, k, v)), grads(ref, (q, k, v))):
        assert torch.allclose(a, b, atol=1e-12)


def test_attention_without_dropout_or_outside_training_is_plain_softmax_attention():
    q, k, v = (torch.randn(2, 2, 5, 8, dtype=torch.double) for _ in range(3))
    ref = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(8), -1) @ v
    assert torch.allclose(ops.attention(q, k, v, 0.0, training=True), ref, atol=1e-12)
    assert torch.allclose(ops.attention(q, k, v, 0.5, training=False), ref, atol=1e-12)


@settings(max_examples=15, deadline=None)
@given(p=st.floats(0.01, 0.9))
def test_drop_mask_drops_with_probability_p_in_every_lane(p):
    torch.manual_seed(0)
    drop = ops.drop_mask((4, 2**16), p, torch.device("cpu"))
    lanes = drop.view(-1, 4).float().mean(0)  # the four 16-bit lanes of each 64-bit draw
    sd = math.sqrt(p * (1 - p) / 2**16)
    assert torch.all((lanes - p).abs() < 6 * sd + 2**-16)


def test_dropout_scales_kept_values_and_routes_gradients_through_them():
    torch.manual_seed(0)
    x = torch.randn(64, 300, requires_grad=True)
    y = ops.dropout(x, 0.25, training=True)
    kept = y != 0
    assert 0.7 < kept.float().mean() < 0.8
    assert torch.allclose(y[kept], x[kept] / 0.75)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.allclose(g, kept.float() / 0.75)
    assert ops.dropout(x, 0.25, training=False) is x and ops.dropout(x, 0.0, training=True) is x


def test_dropout_masks_follow_the_seed():
    x = torch.ones(1000)
    torch.manual_seed(3)
    a = ops.dropout(x, 0.5, True)
    torch.manual_seed(3)
    assert torch.equal(a, ops.dropout(x, 0.5, True))
    assert not torch.equal(a, ops.dropout(x, 0.5, True))


def block_pair(dropout=0.0, dtype=torch.double):
    torch.manual_seed(0)
    block = Block(32, 4, 64, dropout).to(dtype)
    h = torch.randn(3, 9, 32, dtype=dtype, requires_grad=True)
    return block, h, (h, *block.parameters())


def test_the_lean_block_equals_the_plain_block():
    block, h, inputs = block_pair()
    lean, plain = block._forward_lean(h), block._forward_plain(h)
    assert torch.allclose(lean, plain, atol=1e-12)
    for a, b in zip(grads(lean, inputs), grads(plain, inputs)):
        assert torch.allclose(a, b, atol=1e-10)
    with torch.no_grad():
        assert torch.allclose(block(h), plain, atol=1e-12)  # inference takes the plain path


def test_the_lean_block_with_a_key_mask_equals_the_plain_block_and_never_reads_masked_keys():
    block, h, inputs = block_pair()
    mask = torch.zeros(3, 1, 1, 9, dtype=torch.bool)
    mask[..., :4] = True  # every position reads the first four only (arch encdec's encoder)
    lean, plain = block._forward_lean(h, mask), block._forward_plain(h, mask)
    assert torch.allclose(lean, plain, atol=1e-12)
    for a, b in zip(grads(lean, inputs), grads(plain, inputs)):
        assert torch.allclose(a, b, atol=1e-10)
    moved = h.detach().clone()
    moved[:, 4:] += torch.randn(3, 5, 32, dtype=moved.dtype)  # the masked keys change
    assert torch.allclose(block._forward_plain(moved, mask)[:, :4], plain[:, :4], atol=1e-12)
    assert not torch.allclose(block._forward_plain(moved)[:, :4], block._forward_plain(h)[:, :4])


def test_the_lean_block_under_bf16_autocast_stays_close_to_the_plain_one():
    block, h, inputs = block_pair(dtype=torch.float32)
    with torch.autocast("cpu", torch.bfloat16):
        lean, plain = block._forward_lean(h), block._forward_plain(h)
    assert lean.dtype == plain.dtype
    assert (lean.float() - plain.float()).abs().max() < 0.02
    for a, b in zip(grads(lean.float(), inputs), grads(plain.float(), inputs)):
        assert a.dtype == b.dtype and (a - b).norm() <= 0.02 * b.norm() + 1e-6


def saved_activation_bytes(fn, params) -> int:
    """Bytes of the tensors autograd saves while fn runs, each storage once, parameters aside."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    storages = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_the_lean_block_saves_less_than_half_what_the_plain_block_saves():
    torch.manual_seed(0)
    block = Block(256, 4, 1024, 0.1).train()
    h = torch.randn(8, 64, 256, requires_grad=True)
    params = list(block.parameters())
    lean = saved_activation_bytes(lambda: block._forward_lean(h), params)
    plain = saved_activation_bytes(lambda: block._forward_plain(h), params)
    assert lean < 0.5 * plain, (lean, plain)


def test_tied_nll_survives_a_target_far_below_the_top_logit():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(2000, 16, generator=g, requires_grad=True)
    bias = torch.zeros(2000, requires_grad=True)
    y = torch.randint(0, 2000, (300,), generator=g)
    x = (10 * weight.detach()[(y + 1) % 2000]).requires_grad_()  # rows point at other words: nll up to ≫ 88
    ref = F.cross_entropy(x.double() @ weight.double().t() + bias.double(), y, reduction="none")
    got = tied_nll(x, weight, bias, y)
    assert ref.max() > 150 and torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-3)
    ref_grads = torch.autograd.grad(ref.mean(), (x, weight, bias))  # float64 gradients, cast back by autograd
    for a, b in zip(torch.autograd.grad(got.double().mean(), (x, weight, bias)), ref_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("spread", [0.3, 3.0])
def test_tied_nll_under_bf16_autocast_is_as_close_as_plain_autocast_cross_entropy(spread):
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(3000, 32, generator=g), torch.zeros(3000)
    y = torch.randint(0, 3000, (500,), generator=g)
    x = weight[y] + spread * torch.randn(500, 32, generator=g)
    ref = F.cross_entropy(x.double() @ weight.double().t(), y, reduction="none")
    with torch.autocast("cpu", torch.bfloat16):
        ours = tied_nll(x, weight, bias, y)
        plain = F.cross_entropy(x @ weight.t() + bias, y, reduction="none")
    err, plain_err = (ours.double() - ref).abs().mean(), (plain.double() - ref).abs().mean()
    assert err <= max(1.5 * plain_err, 0.01 * ref.mean() + 1e-3), (err, plain_err)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize(
    "path,spread",
    [  # spread: the target near the top logit (a trained head), or far below it
        ("unit", 0.3),
        ("unit", 3.0),
        ("weighted", 0.3),
        ("weighted", 3.0),  # the recompute path normalises by its own exponentials' sum (it used forward's: 3.8-5.0% off)
    ],
)
def test_tied_nll_gradients_under_bf16_autocast_are_as_close_as_plain_autocast_cross_entropy(path, spread, monkeypatch):
    """Values and the gradients of x, E and b under bf16 autocast, against float64, within 1.5× the error
    of F.cross_entropy on the same autocast logits (plus a 1e-3 floor). A mean-reduced loss (the same
    upstream gradient on every row) takes the gradient computed ahead in forward; a weighted loss takes
    the recompute path, which builds the augmented operands a second time (counted)."""
    from diffutext import tied_nll as losses

    g = torch.Generator().manual_seed(0)
    V, N, D = 3000, 400, 32
    weight = torch.randn(V, D, generator=g).requires_grad_()
    bias = (0.1 * torch.randn(V, generator=g)).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g)
    x = (weight.detach()[y] + spread * torch.randn(N, D, generator=g)).requires_grad_()
    up = torch.full((N,), 1 / N) if path == "unit" else torch.rand(N, generator=g)
    inputs = (x, weight, bias)
    ref = F.cross_entropy(x.double() @ weight.double().t() + bias.double(), y, reduction="none")
    ref_grads = torch.autograd.grad((ref * up.double()).sum(), inputs)
    builds, real = [], losses._augmented
    monkeypatch.setattr(losses, "_augmented", lambda *args: builds.append(1) or real(*args))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = F.cross_entropy(x @ weight.t() + bias, y, reduction="none")
        ours = tied_nll(x, weight, bias, y)
        ours_grads = torch.autograd.grad((ours * up).sum(), inputs)
    plain_grads = torch.autograd.grad((plain.float() * up).sum(), inputs)
    assert len(builds) == (1 if path == "unit" else 2)
    assert (ours.double() - ref).abs().mean() <= 1.5 * (plain.double() - ref).abs().mean() + 1e-3
    for name, a, b, c in zip(("x", "weight", "bias"), ours_grads, plain_grads, ref_grads):
        assert a.dtype == c.dtype
        assert relative_error(a, c) <= 1.5 * relative_error(b, c) + 1e-3, (name, relative_error(a, c), relative_error(b, c))


def test_the_heap_setting_applies_on_glibc_unless_the_user_set_one(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert limit_heap_fragmentation() is False
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    assert limit_heap_fragmentation() is (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
