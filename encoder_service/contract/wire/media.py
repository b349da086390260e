"""Media items on the wire: MediaInput <-> MediaItem. Parsing checks what the headers-free message can
tell (modality, source, options) and names the item an error comes from."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from encoder_service.contract.errors import InvalidInput, ItemError
from encoder_service.contract.media import MediaDigest, MediaInput, Modality, Source, VideoSampling
from encoder_service.contract.wire.tensors import tensor_from_proto, tensor_to_proto
from encoder_service.proto import encoder_pb2 as pb

MODALITIES = {pb.MODALITY_IMAGE: Modality.IMAGE, pb.MODALITY_VIDEO: Modality.VIDEO}


def media_to_proto(item: MediaInput) -> pb.MediaItem:
    msg = pb.MediaItem(item_id=item.item_id, content_hash=item.content_hash)
    msg.modality = pb.MODALITY_VIDEO if item.modality == Modality.VIDEO else pb.MODALITY_IMAGE
    source = item.source
    if source == Source.DIGEST:
        msg.digest.sha256 = item.data.value
    elif source == Source.RAW_PIXELS:
        msg.raw_pixels.CopyFrom(tensor_to_proto(torch.from_numpy(np.ascontiguousarray(item.data))))
    elif source == Source.ENCODED_FRAMES:
        msg.encoded_frames.frames.extend(item.data)
    else:  # encoded_image / encoded_video: bytes
        setattr(msg, source.value, bytes(item.data))
    if item.sampling is not None:
        msg.sampling.CopyFrom(pb.VideoSampling(**dataclasses.asdict(item.sampling)))
    if item.pruning_rate is not None:
        msg.pruning_rate = item.pruning_rate
    return msg


def media_items_from_proto(request: pb.EncodeRequest) -> list[MediaInput]:
    """The request's items; an error names the item (index and item_id) it came from."""
    items = []
    for i, msg in enumerate(request.items):
        try:
            items.append(media_from_proto(msg))
        except ItemError as e:
            raise e.for_item(i, msg.item_id) from None
    return items


def media_from_proto(msg: pb.MediaItem) -> MediaInput:
    if msg.modality not in MODALITIES:
        raise InvalidInput(f"unknown modality {msg.modality}; expected IMAGE or VIDEO")
    modality = MODALITIES[msg.modality]
    which = msg.WhichOneof("source")
    if which is None:
        raise InvalidInput("no media data")
    source = Source(which)
    if source == Source.RAW_PIXELS:
        if msg.raw_pixels.dtype != pb.DTYPE_UINT8:
            raise InvalidInput("raw pixels must be uint8")
        data = tensor_from_proto(msg.raw_pixels).numpy()  # shape and byte count checked first
    elif source == Source.ENCODED_FRAMES:
        if modality != Modality.VIDEO:
            raise InvalidInput("encoded_frames is only for VIDEO items")
        data = list(msg.encoded_frames.frames)
    elif source == Source.ENCODED_VIDEO:
        if modality != Modality.VIDEO:
            raise InvalidInput("encoded_video is only for VIDEO items")
        data = msg.encoded_video
    elif source == Source.DIGEST:
        data = MediaDigest(msg.digest.sha256)
    else:
        if modality != Modality.IMAGE:
            raise InvalidInput("encoded_image is only for IMAGE items")
        data = msg.encoded_image
    sampling = None
    if msg.HasField("sampling"):
        if source not in (Source.ENCODED_VIDEO, Source.DIGEST) or modality != Modality.VIDEO:
            raise InvalidInput("sampling applies to encoded_video only")
        sampling = VideoSampling(msg.sampling.num_frames, msg.sampling.fps, msg.sampling.max_frames)
    rate = msg.pruning_rate if msg.HasField("pruning_rate") else None
    if rate is not None and modality != Modality.VIDEO:
        raise InvalidInput("pruning_rate applies to VIDEO items only")
    return MediaInput(modality, data, item_id=msg.item_id, content_hash=msg.content_hash,
                      sampling=sampling, pruning_rate=rate)
