"""Configuration dataclasses: what a checkpoint's config.json says, and how the service runs it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from encoder_service.contract.plan import PlanningRules
from encoder_service.contract.tokens import DynamicResolution, TilingSpec, VideoFrameGeometry

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionConfig:
    """A pre-norm ViT. RADIO-style checkpoints add CLS and register tokens; SigLIP has none."""

    hidden_size: int = 1280
    num_layers: int = 32
    num_heads: int = 16
    intermediate_size: int = 5120
    patch_size: int = 16
    # Side of the square grid the position table was trained on (image_size // patch_size).
    pos_embed_grid: int = 32
    num_channels: int = 3
    num_cls_tokens: int = 1
    num_registers: int = 0
    hidden_act: str = "gelu"  # "gelu" (exact) or "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    post_layernorm: bool = True
    patch_bias: bool = True  # RADIO's patch embedder has none
    # How the position table meets a grid other than its own: "resample" (bicubic to the grid:
    # this project's layout, SigLIP, InternViT) or "cpe" (RADIO: bilinear to a max(gh, gw) square, then crop).
    pos_embed_mode: str = "resample"
    # Layer scale (InternViT): each sub-layer's output is scaled per channel before the residual add.
    layer_scale: bool = False

    def __post_init__(self):
        if self.pos_embed_mode not in ("resample", "cpe"):
            raise ValueError(f"unknown pos_embed_mode {self.pos_embed_mode!r}; choose resample or cpe")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_prefix_tokens(self) -> int:
        return self.num_cls_tokens + self.num_registers


PROJECTOR_KINDS = ("layernorm_gelu", "mlp1")


@dataclass(frozen=True)
class ProjectorConfig:
    """VLM projector: `downsample`x`downsample` pixel shuffle, then an MLP to the LLM width.

    kind "layernorm_gelu": LayerNorm -> Linear -> GELU -> Linear (with biases), this project's layout;
    kind "mlp1": Nemotron Nano VL's RMSNorm -> Linear -> squared ReLU -> Linear (no biases).
    ps_version "v2" keeps the token grid row-major; "v1" (InternVL's original) leaves it transposed.
    vision_norm_eps: when set, a LayerNorm over the ViT's features (prefix tokens dropped) before the
    pixel shuffle: Nemotron Nano VL checkpoints trained with MTP (`vision_final_layernorm`).
    """

    downsample: int = 2
    hidden_size: int = 4096
    output_size: int = 4096
    layer_norm_eps: float = 1e-5
    kind: str = "layernorm_gelu"
    ps_version: str = "v2"
    vision_norm_eps: float | None = None

    def __post_init__(self):
        if self.kind not in PROJECTOR_KINDS:
            raise ValueError(f"unknown projector kind {self.kind!r}; choose one of {PROJECTOR_KINDS}")
        if self.ps_version not in ("v1", "v2"):
            raise ValueError(f"unknown pixel shuffle version {self.ps_version!r}; choose v1 or v2")


@dataclass(frozen=True)
class ProcessorConfig:
    tiling: TilingSpec = field(default_factory=TilingSpec)
    # Images only: when set, each image is one variable-size sequence instead of tiles.
    dynamic: DynamicResolution | None = None
    # Video frames: when set, each frame is resized to this patch budget (else one square tile).
    video_frames: VideoFrameGeometry | None = None
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    # Guards against decompression bombs and absurd inputs.
    max_image_pixels: int = 8192 * 8192
    max_video_frames: int = 256
    default_video_frames: int = 16  # frames sampled from a video container when the request does not say
    video_pruning_rate: float = 0.0  # EVS rate q for videos whose request does not say (0: keep every token)
    # Resampling: "pil" (PIL's bicubic) or "torch-aa" (torchvision's antialiased bicubic on uint8, what
    # Hugging Face's torchvision image processors use, and so vLLM for e.g. InternVL).
    resize: str = "pil"

    def __post_init__(self):
        if self.resize not in ("pil", "torch-aa"):
            raise ValueError(f"unknown resize {self.resize!r}; choose pil or torch-aa")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def planning(self) -> PlanningRules:
        """What plans items (token counts from headers) under this configuration."""
        return PlanningRules(self.tiling, self.dynamic, self.video_frames, self.video_pruning_rate,
                             self.default_video_frames, self.max_image_pixels, self.max_video_frames)

    @staticmethod
    def from_dict(d: dict[str, Any], tiling: TilingSpec | None = None) -> "ProcessorConfig":
        d = dict(d)
        raw_tiling = d.pop("tiling", {})
        spec = tiling or TilingSpec(**raw_tiling)
        raw_dynamic = d.pop("dynamic", None)
        raw_frames = d.pop("video_frames", None)
        for key in ("image_mean", "image_std"):
            if key in d:
                d[key] = tuple(d[key])
        dynamic = DynamicResolution(**raw_dynamic) if raw_dynamic else None
        frames = VideoFrameGeometry(**raw_frames) if raw_frames else None
        return ProcessorConfig(tiling=spec, dynamic=dynamic, video_frames=frames, **d)


@dataclass(frozen=True)
class EncoderConfig:
    """Everything a checkpoint directory's config.json describes."""

    name: str
    vision: VisionConfig
    projector: ProjectorConfig | None
    processor: ProcessorConfig

    @property
    def output_size(self) -> int:
        return self.projector.output_size if self.projector else self.vision.hidden_size

    @property
    def downsample(self) -> int:
        return self.projector.downsample if self.projector else 1

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": "encoder_service", **dataclasses.asdict(self)}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "EncoderConfig":
        proc = d.get("processor", {})
        tiling = TilingSpec(**proc.get("tiling", {}))
        projector = ProjectorConfig(**d["projector"]) if d.get("projector") else None
        vision = VisionConfig(**d["vision"])
        return EncoderConfig(
            name=d.get("name", "encoder"),
            vision=vision,
            projector=projector,
            processor=ProcessorConfig.from_dict(proc, tiling=with_derived_tokens(tiling, vision, projector)),
        )


def with_derived_tokens(
    tiling: TilingSpec, vision: VisionConfig, projector: ProjectorConfig | None
) -> TilingSpec:
    """tokens_per_tile is never trusted from a file: it follows from tile, patch and shuffle sizes."""
    downsample = projector.downsample if projector else 1
    side = tiling.tile_size // vision.patch_size
    if tiling.tile_size % vision.patch_size or side % downsample:
        raise ValueError(
            f"tile_size {tiling.tile_size} must be a multiple of patch_size*downsample "
            f"({vision.patch_size}*{downsample})"
        )
    return dataclasses.replace(tiling, tokens_per_tile=(side // downsample) ** 2)


@dataclass
class EngineConfig:
    """How one encoder replica runs a checkpoint."""

    checkpoint: str | None = None  # None: the embedded tiny random checkpoint
    device: str = "auto"  # "auto" -> cuda if available else cpu
    dtype: str = "auto"  # "auto" -> bfloat16 on cuda, float32 on cpu
    attention_backend: str = "auto"  # "auto" (per batch), "torch", "torch-cudnn", "torch-varlen", "flashinfer"
    # Matmul-epilogue GELU (tanh form, see models.vit.KernelOptions); None: on for bf16/fp16 CUDA.
    gelu_epilogue: bool | None = None
    compile_norms: bool = False  # residual add + LayerNorm fused by torch.compile (CUDA; slower start-up)
    max_tokens_per_batch: int = 16384  # ViT tokens in one ragged forward
    max_tokens_per_request: int = 65536  # output tokens one Encode may produce
    max_items_per_request: int = 64
    # Pixels one request may make the server decode (every image and video frame, full size, from
    # the headers, checked before any decoding): bounds a request's CPU time and memory.
    max_decode_pixels_per_request: int = 1 << 30
    video_pruning_rate: float | None = None  # EVS default of this deployment (None: the checkpoint's, 0)
    preprocess_threads: int = 4  # decode/resize in parallel (PIL releases the GIL)
    # Where images are resized and tiled: "cuda" (decoded on the host, resized on the engine's GPU: the
    # same pixels for a fraction of the CPU), "cpu", or "auto" (cuda where it applies: preprocess_device.resolve).
    preprocess_device: str = "auto"


def tiny_encoder_config() -> EncoderConfig:
    """The embedded default: a RADIO-shaped ViT small enough for a 2-core CPU."""
    vision = VisionConfig(
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        intermediate_size=128,
        patch_size=8,
        pos_embed_grid=8,
        num_cls_tokens=1,
        num_registers=2,
        hidden_act="gelu",
    )
    projector = ProjectorConfig(downsample=2, hidden_size=128, output_size=64)
    tiling = with_derived_tokens(TilingSpec(tile_size=64, max_tiles=12), vision, projector)
    return EncoderConfig("tiny-radio-random", vision, projector, ProcessorConfig(tiling=tiling))


def radio_h_encoder_config() -> EncoderConfig:
    """RADIO ViT-H/16 + Nemotron-Nano-VL-style projector shapes (random weights: for benchmarks)."""
    vision = VisionConfig(
        hidden_size=1280,
        num_layers=32,
        num_heads=16,
        intermediate_size=5120,
        patch_size=16,
        pos_embed_grid=32,
        num_cls_tokens=1,
        num_registers=4,
        hidden_act="gelu",
    )
    projector = ProjectorConfig(downsample=2, hidden_size=5120, output_size=5120)
    tiling = with_derived_tokens(TilingSpec(tile_size=512, max_tiles=12), vision, projector)
    return EncoderConfig("radio-vit-h16-random", vision, projector, ProcessorConfig(tiling=tiling))


def tiny_512_encoder_config() -> EncoderConfig:
    """The tiny ViT at Nemotron's geometry (512 px tiles, patch 16, 256 tokens/tile): realistic token counts."""
    tiny = tiny_encoder_config()
    vision = dataclasses.replace(tiny.vision, patch_size=16, pos_embed_grid=32)
    tiling = with_derived_tokens(TilingSpec(tile_size=512, max_tiles=12), vision, tiny.projector)
    return EncoderConfig("tiny-512-random", vision, tiny.projector, ProcessorConfig(tiling=tiling))


def tiny_5120_encoder_config() -> EncoderConfig:
    """tiny-512 with radio-h's 5120-wide output: cheap compute, GPU-sized responses (transport benches)."""
    tiny = tiny_512_encoder_config()
    projector = dataclasses.replace(tiny.projector, output_size=5120)
    return EncoderConfig("tiny-5120-random", tiny.vision, projector, tiny.processor)


PRESETS = {
    "tiny": tiny_encoder_config,
    "tiny-512": tiny_512_encoder_config,
    "tiny-5120": tiny_5120_encoder_config,
    "radio-h": radio_h_encoder_config,
}
