"""Safe-MM-DPO's two preference streams with images: the vision counterpart of ``data.joint_pairs``'s inputs.

``VisionStream`` shows a ``VisionPairDataset`` (pairs tokenised with the processor, ``data.vision_pairs``) the way
the joint sampler and the margins see a text ``PairDataset``: one dict per pair with its position (``index``),
its token ids (to confirm that a helpful and a harmless pair hold the same sequences), the per-pair fields that
``models.margins`` attaches (``add_field``), and the tokenised pair itself. ``VisionJointCollator`` places the
streams' pairs exactly as ``JointCollator`` does (each distinct pair once, per-stream row indices), batching the
distinct pairs with ``VisionPairCollator``: 2P rows, chosen first, the pixel values (and Qwen2-VL's
``image_grid_thw``) concatenated in row order. ``build_joint_dataset`` shares two pairs only when their prompt,
answers and images are the same.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from humanalign.data.joint_pairs import JointCollator
from humanalign.data.pairs import Kind
from humanalign.data.preference_dataset import INDEX_KEY, PAIR_KEYS
from humanalign.data.vision_collate import VisionPairExample
from humanalign.data.vision_pairs import VisionPairCollator, VisionPairDataset, load_vision_pair_dataset

PAIR = "pair"  # the tokenised pair (a VisionPairExample) in a stream item


class VisionStream(Dataset):
    """A ``VisionPairDataset`` as one of Safe-MM-DPO's streams: items {"pair", "index", token-id lists, fields}."""

    def __init__(self, dataset: VisionPairDataset):
        self.dataset = dataset
        self.items: list[dict[str, Any]] = [_item(example, i) for i, example in enumerate(dataset.examples)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]

    @property
    def pairs(self):
        return self.dataset.pairs

    @property
    def skipped(self):
        return self.dataset.skipped

    @property
    def name(self) -> str:
        return self.dataset.name

    @property
    def lengths(self) -> list[int]:
        return self.dataset.lengths

    @property
    def images(self) -> int:
        return self.dataset.images

    def add_field(self, name: str, values: Sequence[Any]) -> None:
        """Attach one value per pair (a margin, a cost); carried into every batch as in ``PairDataset``."""
        if name in PAIR_KEYS or name in (INDEX_KEY, PAIR):
            raise ValueError(f"'{name}' is a reserved field of a pair example")
        if len(values) != len(self.items):
            raise ValueError(f"{len(values)} values of '{name}' for {len(self.items)} examples")
        for item, value in zip(self.items, values):
            item[name] = value


def _item(example: VisionPairExample, index: int) -> dict[str, Any]:
    item: dict[str, Any] = {PAIR: example, INDEX_KEY: index}
    for side, row in (("chosen", example.chosen), ("rejected", example.rejected)):
        item[f"{side}_input_ids"] = row["input_ids"].tolist()
        item[f"{side}_labels"] = row["labels"].tolist()
    return item


def load_vision_stream(path: str | Path, kind: Kind, processor, cfg, engine=None, *, name: str | None = None,
                       max_images: int | None = None) -> VisionStream:
    """``load_vision_pair_dataset`` (pairs with their images, at most ``max_images`` each, skips counted and
    printed) as a stream."""
    return VisionStream(load_vision_pair_dataset(path, kind, processor, cfg, engine, name=name,
                                                 max_images=max_images))


class VisionJointCollator(JointCollator):
    """``JointCollator`` over pairs with images: the distinct pairs batched by ``VisionPairCollator``."""

    def __init__(self, pad_token_id: int):
        self.pairs = VisionPairCollator(pad_token_id)

    def distinct_pair(self, example: Mapping[str, Any]) -> VisionPairExample:
        return example[PAIR]


__all__ = ["PAIR", "VisionStream", "load_vision_stream", "VisionJointCollator"]
