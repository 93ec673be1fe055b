"""``from tensorkeep.transformers import protect``: crash-proof checkpoints for the Hugging Face ``Trainer``.

An alias of :mod:`tensorkeep.integrations.transformers` (importing it imports ``transformers``;
``import tensorkeep`` does not).
"""

from tensorkeep.integrations.transformers import NAMING, CrashProofMixin, protect

__all__ = ["CrashProofMixin", "protect", "NAMING"]
