"""``from tensorkeep.lightning import TensorkeepCheckpointIO``: see :mod:`tensorkeep.integrations.lightning`.

``import tensorkeep`` does not import this module (nor Lightning); importing it needs the extra:
``pip install 'tensorkeep[lightning]'``.
"""

from tensorkeep.integrations.lightning import TensorkeepCheckpointIO, latest, load_from_checkpoint

__all__ = ["TensorkeepCheckpointIO", "latest", "load_from_checkpoint"]
