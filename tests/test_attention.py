import pytest
import torch
import torch.nn.functional as F

from encoder_service.attention import TorchRaggedAttention, attend


def _indptr(lengths):
    return F.pad(torch.tensor(lengths).cumsum(0), (1, 0))


def _per_sequence_reference(q, k, v, lengths):
    out, start = [], 0
    for n in lengths:
        qs, ks, vs = (t[start : start + n].transpose(0, 1) for t in (q, k, v))
        out.append(F.scaled_dot_product_attention(qs, ks, vs).transpose(0, 1))
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("seed", range(5))
def test_ragged_attention_equals_per_sequence_sdpa(seed):
    gen = torch.Generator().manual_seed(seed)
    num_seqs = int(torch.randint(1, 12, (1,), generator=gen))
    # Repeated lengths in non-adjacent positions exercise the gathered (non-contiguous) path.
    lengths = torch.randint(1, 40, (num_seqs,), generator=gen).tolist() + [7, 3, 7]
    heads, head_dim = 4, 16
    q, k, v = (torch.randn(sum(lengths), heads, head_dim, generator=gen) for _ in range(3))
    out = attend(q, k, v, _indptr(lengths))
    torch.testing.assert_close(out, _per_sequence_reference(q, k, v, lengths), rtol=1e-5, atol=1e-5)


def test_sequences_never_see_each_other():
    lengths = [5, 9, 5, 9]
    q, k, v = (torch.randn(sum(lengths), 2, 8) for _ in range(3))
    backend = TorchRaggedAttention()
    plan = backend.plan(_indptr(lengths), 2, 8)
    before = backend.run(plan, q, k, v)
    k2, v2 = k.clone(), v.clone()
    k2[5:14] += torch.randn(9, 2, 8)  # perturb only sequence 1
    v2[5:14] += torch.randn(9, 2, 8)
    after = backend.run(plan, q, k2, v2)
    untouched = torch.cat([torch.arange(0, 5), torch.arange(14, 28)])
    torch.testing.assert_close(after[untouched], before[untouched], rtol=0, atol=0)
    assert not torch.allclose(after[5:14], before[5:14])


def test_plan_rejects_bad_indptr():
    with pytest.raises(ValueError):
        TorchRaggedAttention().plan(torch.tensor([0, 5, 3]), 2, 8)
    plan = TorchRaggedAttention().plan(_indptr([4, 4]), 2, 8)
    with pytest.raises(ValueError):
        TorchRaggedAttention().run(plan, *(torch.randn(7, 2, 8) for _ in range(3)))


# ---------------------------------------------------------------- registry, auto, errors (CPU)

from encoder_service.attention import (  # noqa: E402
    BACKENDS,
    AttentionSpec,
    AttentionUnavailable,
    AutoAttention,
    AutoRule,
    available_backends,
    get_backend,
    reference_attention,
    shape_class,
)

CPU = AttentionSpec(torch.device("cpu"), 4, 16, torch.float32)


def test_registry_names_every_backend_and_only_torch_runs_on_cpu():
    assert set(BACKENDS) == {"torch", "torch-cudnn", "torch-varlen", "flashinfer"}
    found = available_backends(CPU)
    assert set(found) == set(BACKENDS)
    assert found["torch"].name == "torch"
    for name in ("torch-cudnn", "torch-varlen", "flashinfer"):
        assert isinstance(found[name], str) and "needs a CUDA device" in found[name]


@pytest.mark.parametrize("name", ["torch-cudnn", "torch-varlen", "flashinfer"])
def test_unavailable_backend_fails_at_engine_start_with_the_reason(name, tiny_checkpoint):
    from encoder_service.config import EngineConfig
    from encoder_service.engine import EncoderEngine

    with pytest.raises(AttentionUnavailable, match=f"{name!r} needs a CUDA device"):
        get_backend(name, CPU)
    with pytest.raises(ValueError, match=name):
        EncoderEngine(EngineConfig(checkpoint=str(tiny_checkpoint), device="cpu", attention_backend=name))


def test_unknown_backend_lists_the_choices():
    with pytest.raises(AttentionUnavailable, match="unknown attention backend 'fa2'.*torch-varlen"):
        get_backend("fa2", CPU)


def test_a_backend_that_computes_wrong_results_is_refused(monkeypatch):
    class Leaky(TorchRaggedAttention):  # attends across sequences: what a bad kernel/indptr convention does
        def plan(self, indptr, num_heads=0, head_dim=0):
            return super().plan(torch.tensor([0, int(indptr[-1])]))

    monkeypatch.setitem(BACKENDS, "leaky", lambda spec: Leaky())
    with pytest.raises(AttentionUnavailable, match="wrong results"):
        get_backend("leaky", CPU)


def test_shape_classes():
    rule = AutoRule(long_from=2048)
    assert shape_class([100], rule) == "one-short"
    assert shape_class([4096], rule) == "one-long"
    assert shape_class([1029] * 16, rule) == "uniform-short"
    assert shape_class([2048, 2048], rule) == "uniform-long"
    assert shape_class([1029, 1029, 4101], rule) == "mixed"
    assert shape_class([0, 0, 1029], rule) == "one-short"  # zero-length (padding) sequences do not count


def test_auto_takes_the_first_available_preference_per_class():
    rule = AutoRule(long_from=1000, prefer={
        "one-short": ("a", "b"), "one-long": ("c", "b"), "uniform-short": ("b",),
        "uniform-long": ("c",), "mixed": ("d", "c", "a"),
    })
    auto = AutoAttention({"a": TorchRaggedAttention(), "b": TorchRaggedAttention(), "c": TorchRaggedAttention()}, rule)
    assert auto.choose([10]) == "a"
    assert auto.choose([5000]) == "c"
    assert auto.choose([10, 10]) == "b"
    assert auto.choose([10, 5000]) == "c"  # "d" is not available
    only_b = AutoAttention({"b": TorchRaggedAttention()}, rule)
    assert only_b.choose([5000, 5000]) == "b"  # no preference available: the one that is


def test_auto_plans_with_its_choice_and_matches_the_reference():
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    lengths = torch.randint(1, 60, (6,), generator=gen).tolist()
    q, k, v = (torch.randn(sum(lengths), 4, 16, generator=gen) for _ in range(3))
    auto = get_backend("auto", CPU)
    out = attend(q, k, v, _indptr(lengths), auto)
    torch.testing.assert_close(out, reference_attention(q, k, v, lengths), rtol=1e-5, atol=1e-5)
    assert sum(auto.choices.values()) == 1 and set(auto.choices) == {"torch"}
