"""Self-critical sequence training: sampled captions rewarded with CIDEr-D against a baseline."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from captioner.core.errors import CaptionerError
from captioner.decoding.config import DecodingConfig, SpecialTokens
from captioner.evaluation.cider import CiderD, NgramVector
from captioner.models.decoders.base import CaptionDecoder
from captioner.models.objectives.base import Objective, ObjectiveOutput, SequenceSpec
from captioner.models.objectives.sampling import CaptionSample, sample_captions
from captioner.models.stepping import decode_with

GREEDY = DecodingConfig(num_beams=1)


def greedy_captions(
    decoder: CaptionDecoder, features: torch.Tensor, max_length: int, special: SpecialTokens
) -> CaptionSample:
    """The baseline captions: the model's own best guess, word by word (the same search inference runs)."""
    return CaptionSample.best_of(decode_with(decoder, features, GREEDY, special, max_length))


def with_end(tokens: Sequence[int], special: SpecialTokens) -> list[int]:
    """A generated or reference caption as scored by the reward: its words, then `<end>` if it ended.

    Keeping `<end>` in the n-grams rewards ending where the references end, so
    captions stop making sense to cut on "a" or "with" (as in the reference
    implementation of self-critical training).
    """
    words = []
    for token in tokens:
        token = int(token)
        if token == special.end:
            words.append(token)
            break
        if token not in (special.start, special.pad):
            words.append(token)
    return words


class SelfCritical(Objective):
    """Self-critical sequence training (Rennie et al. 2017) on CIDEr-D, a second training stage.

    For every training image it samples `samples` captions and rewards each
    with its CIDEr-D against the image's references (document frequencies from
    the training references, `<end>` included in the n-grams), minus a
    baseline:

    - "greedy": the reward of the model's own greedy caption (Rennie et al.);
    - "mean": the mean reward of the image's other samples (Luo 2020, "A
      better variant of self-critical sequence training"): no greedy pass, and
      the advantages of an image's samples sum to zero.

    The loss is `-advantage * log p(token)` averaged over every sampled token,
    so long captions do not get larger steps. Reference n-gram vectors are
    computed once per training image and reused every step.

    Args:
        samples: Captions sampled per image per step (at least 2 with the "mean" baseline).
        baseline: "greedy" or "mean".
    """

    needs_initial_weights = True
    needs_references = True  # CIDEr-D's document frequencies come from every training reference

    @property
    def train_items(self) -> str:
        return "images"  # whole images: their references score the samples

    def __init__(self, samples: int = 5, baseline: Literal["greedy", "mean"] = "greedy") -> None:
        if samples < 1 or (baseline == "mean" and samples < 2):
            raise ValueError(f"SelfCritical needs samples >= {2 if baseline == 'mean' else 1}, got {samples}")
        if baseline not in ("greedy", "mean"):
            raise ValueError(f"baseline must be 'greedy' or 'mean', got {baseline!r}")
        self.samples, self.baseline = samples, baseline
        self.cider: CiderD | None = None
        self.reference_vectors: list[list[NgramVector]] = []

    def prepare(self, references: Sequence[Sequence[Sequence[int]]], special: SpecialTokens) -> None:
        scored = [[with_end([*ref, special.end], special) for ref in refs] for refs in references]
        self.cider = CiderD(scored)
        self.reference_vectors = [self.cider.vectors(refs) for refs in scored]

    def rewards(self, result: CaptionSample, images: Sequence[int], special: SpecialTokens) -> torch.Tensor:
        """CIDEr-D of each caption of `result` against the references of its training image (`images[i]`)."""
        if self.cider is None:
            raise CaptionerError("SelfCritical.prepare() was not called with the training references.")
        scores = [
            self.cider.score_vectors(with_end(row, special), self.reference_vectors[image])
            for row, image in zip(result.tokens.tolist(), images)
        ]
        return torch.tensor(scores, dtype=torch.float32, device=result.tokens.device)

    def advantages(self, rewards: torch.Tensor, baseline_rewards: torch.Tensor | None) -> torch.Tensor:
        """Sample rewards `(B * samples,)` minus the baseline: greedy rewards `(B,)`, or the other samples' mean."""
        per_image = rewards.view(-1, self.samples)
        if self.baseline == "greedy":
            return (per_image - baseline_rewards.unsqueeze(1)).view(-1)
        others = (per_image.sum(dim=1, keepdim=True) - per_image) / (self.samples - 1)
        return (per_image - others).view(-1)

    def __call__(self, decoder: CaptionDecoder, features: torch.Tensor, batch: dict, sequences: SequenceSpec):
        special, images = sequences.special, [int(i) for i in batch["index"]]
        logs: dict[str, torch.Tensor | float] = {}
        baseline_rewards = None
        if self.baseline == "greedy":
            was_training = decoder.training
            decoder.eval()  # the baseline is the test-time greedy caption
            greedy = greedy_captions(decoder, features, sequences.max_length, special)
            decoder.train(was_training)
            baseline_rewards = self.rewards(greedy, images, special)
            logs["baseline_cider"] = baseline_rewards.mean()
        sampled = sample_captions(decoder, features, sequences, samples=self.samples)
        rewards = self.rewards(sampled, [image for image in images for _ in range(self.samples)], special)
        advantage = self.advantages(rewards, baseline_rewards)
        mask = sampled.mask.float()
        loss = -(advantage.unsqueeze(1) * sampled.token_log_probs * mask).sum() / mask.sum()
        logs["reward_cider"] = rewards.mean()
        return ObjectiveOutput(loss, logs, batch_size=len(images))
