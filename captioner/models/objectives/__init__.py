"""Training objectives: the protocol (`base`) and one file per objective."""

from captioner.models.objectives.base import Objective, ObjectiveOutput, SequenceSpec
from captioner.models.objectives.cross_entropy import CrossEntropy, caption_cross_entropy
from captioner.models.objectives.self_critical import SelfCritical

__all__ = ["CrossEntropy", "SequenceSpec", "Objective", "ObjectiveOutput", "SelfCritical", "caption_cross_entropy"]
