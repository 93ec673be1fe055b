"""``from tensorkeep import accelerate as tk_acc``: crash-proof ``Accelerator.save_state`` / ``load_state``.

See :mod:`tensorkeep.integrations.accelerate`. Importing this module imports Accelerate;
``import tensorkeep`` alone does not.
"""

from tensorkeep.integrations.accelerate import NAMING, latest, load_state, protect, save_state, wait

__all__ = ["save_state", "load_state", "protect", "wait", "latest", "NAMING"]
