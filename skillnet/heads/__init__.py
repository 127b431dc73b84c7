"""Downstream task heads over the SkillNet encoder: one `Head` class per head type, one module per kind.

A head spec is a dict stored in `config.task_heads[task]`: `{"type": ..., ...}`, `type` naming a head type
(`classification`, `pair_classification`, `tagging`, `span`, `retrieval`, `ctc`, `generation`,
`instruction`; each module's docstring gives its spec's fields and its data's). Every module of this
package is imported here, and a `Head` subclass enters the registry by being defined: a new head type is a new file. All
shared code lives in `base` (this file only discovers modules), so `skillnet.hub` can flatten the package
for exports that carry their code: its flat `heads.py` re-exports `base` and imports every head module.

Any spec may add `prompts: {length: n, instance_wise: bool}`: prompt tuning (`modeling.PromptEncoder`).
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import HEADS, Head, check_head, head_for, head_type

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["HEADS", "Head", "check_head", "head_for", "head_type"]

