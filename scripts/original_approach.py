"""A faithful PyTorch re-implementation of the original system's three hot paths, for the benchmark.

The original (a Keras "merge" captioner) did:

- extraction: one image at a time, full decode, resize to 224, `model.predict`
  on a batch of one, features kept in a Python dict and pickled;
- training: every caption expanded into all its prefixes, each pre-padded to
  the maximum length and re-read by the LSTM from the start, with a one-hot
  target over the whole vocabulary (categorical cross-entropy);
- decoding: for each image and each word, a full model call on the padded
  prefix, then a scan of the tokenizer's word index to map the predicted id
  back to a word.

Only the cost structure matters here; sizes (embedding, hidden, vocabulary,
maximum length) are set to ours so the comparison is like for like.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision import models

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def extract_one_by_one(paths: list[Path], out_file: Path, device: torch.device) -> None:
    """Batch-1 feature extraction into a pickled dict, as the original did."""
    torch.manual_seed(0)
    net = models.resnet50(weights=None)
    net.fc = nn.Identity()
    net.eval().to(device)
    features = {}
    with torch.no_grad():
        for path in paths:
            image = Image.open(path).convert("RGB").resize((224, 224))
            x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
            x = ((x - IMAGENET_MEAN) / IMAGENET_STD).to(device)
            features[path.name] = net(x).cpu().numpy()
    with open(out_file, "wb") as handle:
        pickle.dump(features, handle)


class MergeCaptioner(nn.Module):
    """The original "merge" architecture: image branch + LSTM over the padded prefix, added, then a classifier."""

    def __init__(self, vocab_size: int, feature_dim: int = 2048, embed_dim: int = 256, hidden_dim: int = 512):
        super().__init__()
        self.image = nn.Sequential(nn.Dropout(0.5), nn.Linear(feature_dim, hidden_dim), nn.ReLU())
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.dropout = nn.Dropout(0.5)
        self.lstm = nn.LSTM(embed_dim, hidden_dim, batch_first=True)
        self.head = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, vocab_size))

    def forward(self, features: torch.Tensor, prefixes: torch.Tensor) -> torch.Tensor:
        sequence = self.lstm(self.dropout(self.embed(prefixes)))[0][:, -1]  # pre-padded: last step is the last word
        return self.head(self.image(features) + sequence)


def prefix_samples(features: np.ndarray, captions: list[list[int]], max_length: int, vocab_size: int):
    """The original data generator: one (image, padded prefix, one-hot next word) sample per word."""
    images, prefixes, targets = [], [], []
    for feature, caption in zip(features, captions):
        for i in range(1, len(caption)):
            prefix = caption[:i][-max_length:]
            padded = np.zeros(max_length, dtype=np.int64)
            padded[max_length - len(prefix) :] = prefix  # Keras pad_sequences pads in front
            one_hot = np.zeros(vocab_size, dtype=np.float32)
            one_hot[caption[i]] = 1.0
            images.append(feature)
            prefixes.append(padded)
            targets.append(one_hot)
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(prefixes)), torch.from_numpy(np.stack(targets))


def train_steps(model: MergeCaptioner, batches, device: torch.device, optimizer) -> None:
    """Categorical cross-entropy on one-hot targets, one optimizer step per generator batch."""
    model.train()
    for images, prefixes, targets in batches:
        images, prefixes, targets = images.to(device), prefixes.to(device), targets.to(device)
        loss = -(targets * torch.log_softmax(model(images, prefixes), dim=-1)).sum(dim=1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def word_for_id(index: int, word_index: dict[str, int]) -> str | None:
    """The original's reverse lookup: a scan over the whole word index."""
    for word, candidate in word_index.items():
        if candidate == index:
            return word
    return None


def generate_caption(model: MergeCaptioner, feature: torch.Tensor, word_index: dict[str, int], max_length: int) -> str:
    """The original greedy loop: one model call per word on the re-padded prefix."""
    model.eval()
    text = "startseq"
    with torch.no_grad():
        for _ in range(max_length):
            sequence = [word_index[w] for w in text.split() if w in word_index][-max_length:]
            padded = torch.zeros(1, max_length, dtype=torch.long, device=feature.device)
            padded[0, max_length - len(sequence) :] = torch.tensor(sequence)
            index = int(model(feature[None], padded).argmax(dim=-1))
            word = word_for_id(index, word_index)
            if word is None:
                break
            text += " " + word
            if word == "endseq":
                break
    return text
