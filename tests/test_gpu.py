"""GPU path: bf16 on CUDA must agree with the float32 CPU reference. Skipped without CUDA."""

import pytest
import torch
import torch.nn.functional as F

from encoder_service.attention import attend
from encoder_service.config import EngineConfig
from encoder_service.contract.media import MediaInput, Modality
from encoder_service.engine import EncoderEngine
from tests.conftest import image_bytes

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_ragged_attention_on_cuda_matches_cpu_fp32():
    lengths = [1025, 257, 1025, 64, 3000]
    indptr = F.pad(torch.tensor(lengths).cumsum(0), (1, 0))
    q, k, v = (torch.randn(sum(lengths), 16, 80) for _ in range(3))
    ref = attend(q, k, v, indptr)
    out = attend(*(t.cuda().bfloat16() for t in (q, k, v)), indptr.cuda()).float().cpu()
    assert ((out - ref).norm() / ref.norm()).item() < 1e-2


def test_engine_bf16_cuda_matches_fp32_cpu(tiny_checkpoint):
    items = [MediaInput(Modality.IMAGE, image_bytes(w, h)) for w, h in [(640, 480), (100, 300), (64, 64)]]
    cpu = EncoderEngine(EngineConfig(checkpoint=str(tiny_checkpoint), device="cpu")).encode(items)
    gpu = EncoderEngine(EngineConfig(checkpoint=str(tiny_checkpoint), device="cuda")).encode(items)
    assert gpu.embeddings.dtype == torch.bfloat16
    assert gpu.token_counts == cpu.token_counts
    err = (gpu.embeddings.float() - cpu.embeddings).norm() / cpu.embeddings.norm()
    assert err.item() < 2e-2


def test_grpc_server_on_cuda_serves_bf16_batches(tiny_checkpoint):
    """The production path: bf16 on the GPU, one tensor over real gRPC, split by counts."""
    from encoder_service.client.endpoint import EncoderClient
    from encoder_service.serving.api.server import BackgroundServer, ServerConfig

    items = [MediaInput(Modality.IMAGE, image_bytes(w, h)) for w, h in [(640, 480), (90, 300), (64, 64)]]
    reference = EncoderEngine(EngineConfig(checkpoint=str(tiny_checkpoint), device="cpu")).encode(items)
    cfg = ServerConfig(port=0, engine=EngineConfig(checkpoint=str(tiny_checkpoint), device="cuda"))
    with BackgroundServer(cfg) as server, EncoderClient(server.address) as client:
        assert server.server.model.outputs_pinned  # device-to-host copies land in the shared output arena
        assert client.model_info().dtype == torch.bfloat16
        result = client.encode(items)
    assert result.embeddings.dtype == torch.bfloat16
    assert result.token_counts == reference.token_counts
    for got, want in zip(result.split(), reference.split()):
        assert ((got.float() - want).norm() / want.norm()).item() < 2e-2


def test_pipeline_on_cuda_reads_tiles_from_the_pinned_arena_and_matches_the_engine(tiny_checkpoint):
    from encoder_service.serving.host.pipeline import EncodePipeline, PipelineConfig

    engine = EncoderEngine(EngineConfig(checkpoint=str(tiny_checkpoint), device="cuda"))
    items = [MediaInput(Modality.IMAGE, image_bytes(w, h)) for w, h in [(640, 480), (90, 300), (64, 64)]]
    pipeline = EncodePipeline(engine, PipelineConfig(preprocess_workers=2, arena_mb=64))
    try:
        assert pipeline.arena_pinned  # host-to-device copies straight from shared memory
        out = pipeline.encode(items).result(timeout=120)
        assert out.embeddings.is_pinned()
    finally:
        pipeline.close()
    ref = engine.encode(items)
    assert out.token_counts == ref.token_counts
    assert ((out.embeddings.float() - ref.embeddings.float()).norm() / ref.embeddings.float().norm()).item() < 1e-2


def _timm():
    try:  # timm needs a torchvision built for this torch: present on the GPU machine, not on CPU CI
        import timm
    except Exception as e:  # noqa: BLE001 - an import-time RuntimeError from torchvision is common
        pytest.skip(f"timm unavailable: {e}")
    return timm


def test_radio_blocks_match_timm_vision_transformer_blocks(tmp_path):
    """RADIO's blocks are timm's: the loaded Nemotron tower's blocks agree with timm's
    `vit_tiny_patch16_224` blocks carrying the checkpoint's block tensors under their own names."""
    from safetensors.torch import load_file

    from encoder_service.attention import TorchRaggedAttention
    from encoder_service.models import load_checkpoint
    from tests.nemotron_fixture import write_nemotron_checkpoint

    timm = _timm()
    path = write_nemotron_checkpoint(tmp_path / "vlm", seed=2)
    ours = load_checkpoint(path, device="cuda")
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False).cuda().eval()
    tensors = {}
    for shard in sorted(path.glob("model-*.safetensors")):
        tensors |= load_file(shard)
    prefix = "vision_model.radio_model.model."
    blocks = {k.removeprefix(prefix + "blocks."): v for k, v in tensors.items() if k.startswith(prefix + "blocks.")}
    reference.blocks.load_state_dict(blocks)  # strict: timm's names are RADIO's

    lengths = [1032, 264, 1032]
    x = torch.randn(sum(lengths), 192, device="cuda")
    backend = TorchRaggedAttention()
    plan = backend.plan(F.pad(torch.tensor(lengths).cumsum(0), (1, 0)), 3, 64)
    with torch.inference_mode():
        got = x
        for block in ours.vit.blocks:
            got = block(got, backend, plan)
        want = torch.cat([reference.blocks(seq[None])[0] for seq in x.split(lengths)])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_nemotron_dynamic_resolution_bf16_cuda_matches_fp32_cpu(tmp_path):
    from tests.nemotron_fixture import write_nemotron_checkpoint

    path = write_nemotron_checkpoint(tmp_path / "vlm", seed=4, dynamic=(64, 1024))
    items = [MediaInput(Modality.IMAGE, image_bytes(w, h, seed=i)) for i, (w, h) in enumerate([(640, 480), (90, 300)])]
    items.append(MediaInput(Modality.VIDEO, [image_bytes(64, 64, seed=9)] * 3))
    cpu = EncoderEngine(EngineConfig(checkpoint=str(path), device="cpu")).encode(items)
    gpu = EncoderEngine(EngineConfig(checkpoint=str(path), device="cuda")).encode(items)
    assert gpu.token_counts == cpu.token_counts and len(set(gpu.token_counts[:2])) == 2
    for got, want in zip(gpu.split(), cpu.split()):
        assert ((got.float() - want).norm() / want.norm()).item() < 2e-2


# ---------------------------------------------------------------- attention backends (issue 8)

ATTENTION_NAMES = ["torch", "torch-cudnn", "torch-varlen", "flashinfer", "auto"]


def _backend_or_skip(name: str, heads: int, head_dim: int):
    from encoder_service.attention import AttentionSpec, AttentionUnavailable, get_backend

    spec = AttentionSpec(torch.device("cuda", torch.cuda.current_device()), heads, head_dim, torch.bfloat16)
    try:
        return get_backend(name, spec)
    except AttentionUnavailable as e:
        if name == "flashinfer" and "No module named" in str(e):
            pytest.skip(f"FlashInfer not installed: {e}")
        raise


@pytest.mark.parametrize("name", ATTENTION_NAMES)
@pytest.mark.parametrize("heads,head_dim", [(16, 80), (3, 64)])
def test_every_backend_equals_the_fp32_reference_on_ragged_batches(name, heads, head_dim):
    from encoder_service.attention import reference_attention

    backend = _backend_or_skip(name, heads, head_dim)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    for lengths in ([1, 7, 1029, 8192] + torch.randint(1, 3000, (5,), generator=gen).tolist(),
                    [1029] * 16, [1], [7, 7], [8192]):
        q, k, v = (torch.randn(sum(lengths), heads, head_dim, generator=gen, device="cpu") for _ in range(3))
        want = reference_attention(*(t.cuda() for t in (q, k, v)), lengths)
        indptr = F.pad(torch.tensor(lengths).cumsum(0), (1, 0))
        got = backend.run(backend.plan(indptr, heads, head_dim), *(t.cuda().bfloat16() for t in (q, k, v))).float()
        err = ((got - want).norm() / want.norm()).item()
        assert err < 1e-2, (name, lengths[:6], err)
        # Each sequence on its own too (a kernel mixing sequences up can still get the norm right).
        start = 0
        for n in lengths:
            part = slice(start, start + n)
            assert ((got[part] - want[part]).norm() / want[part].norm()).item() < 2e-2, (name, n)
            start += n


@pytest.mark.parametrize("name", ATTENTION_NAMES)
def test_engine_gives_the_same_embeddings_with_every_backend(name, tmp_path):
    """Dynamic resolution (sequences of several lengths in one batch) and tiles, per backend,
    against the fp32 CPU engine."""
    from tests.nemotron_fixture import write_nemotron_checkpoint

    _backend_or_skip(name, 3, 64)
    path = write_nemotron_checkpoint(tmp_path / "vlm", seed=5, dynamic=(64, 1024))
    items = [MediaInput(Modality.IMAGE, image_bytes(w, h, seed=i)) for i, (w, h) in enumerate([(640, 480), (90, 300), (1024, 200)])]
    items.append(MediaInput(Modality.VIDEO, [image_bytes(64, 64, seed=9)] * 3))
    cpu = EncoderEngine(EngineConfig(checkpoint=str(path), device="cpu")).encode(items)
    gpu_engine = EncoderEngine(EngineConfig(checkpoint=str(path), device="cuda", attention_backend=name))
    gpu = gpu_engine.encode(items)
    assert gpu.token_counts == cpu.token_counts
    for got, want in zip(gpu.split(), cpu.split()):
        assert ((got.float() - want).norm() / want.norm()).item() < 2e-2, name


def test_compiled_norms_and_gelu_epilogue_keep_the_embeddings(tiny_checkpoint):
    items = [MediaInput(Modality.IMAGE, image_bytes(w, h, seed=3)) for w, h in [(640, 480), (100, 300)]]
    cpu = EncoderEngine(EngineConfig(checkpoint=str(tiny_checkpoint), device="cpu")).encode(items)
    for options in (dict(gelu_epilogue=True, compile_norms=True), dict(gelu_epilogue=False, compile_norms=False)):
        gpu = EncoderEngine(EngineConfig(checkpoint=str(tiny_checkpoint), device="cuda", **options)).encode(items)
        err = (gpu.embeddings.float() - cpu.embeddings).norm() / cpu.embeddings.norm()
        assert err.item() < 2e-2, options
