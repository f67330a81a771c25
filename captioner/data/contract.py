"""What a model reads from the data side of a run: the contract between `CaptionModel` and its datamodule.

`CaptionDataModule` fulfils it; any `LightningDataModule` with these members
can train and evaluate a `CaptionModel` (the model never looks further into it).
"""

from __future__ import annotations

from typing import Any, Literal, Protocol


class CaptionData(Protocol):
    """The data side of a run, as the model sees it.

    Attributes:
        vocabulary: The tokenizer the data was prepared with (`captioner.text`).
        split_sizes: Images in each split, for the test report.
        train_items: What one training item is: "captions", or "images" with all their captions.
    """

    vocabulary: Any
    split_sizes: dict[str, int]
    train_items: Literal["captions", "images"]

    def references(self, split: str) -> list[list[list[int]]] | None:
        """The word ids of every reference caption of each image of `split` (CIDEr-D scores them), in dataset order;
        None when the split does not hold them (a training set streamed from shards)."""
