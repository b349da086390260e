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
