from encoder_service.models.checkpoint import load_checkpoint, save_checkpoint, tiny_checkpoint_dir
from encoder_service.models.encoder import VisionEncoder
from encoder_service.models.vit import PackedTiles, patchify

__all__ = ["VisionEncoder", "PackedTiles", "patchify", "load_checkpoint", "save_checkpoint", "tiny_checkpoint_dir"]
