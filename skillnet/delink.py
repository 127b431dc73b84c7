"""Pseudo-to-Real's delinking (M6-10T, arXiv 2110.03888): a model whose stacks share layers
(`config.layer_sharing`: the "pseudo giant") becomes the real model, every depth a layer of its own that
starts from the weights the depth ran before. The real model's outputs equal the shared model's.

Names only: a shared stack's layer j (`encoder.layers.j.…`) serves depths j, j + M, ..., which the real
model names `encoder.layers.<depth>.…`. The model (`SkillNetPreTrainedModel.delink`) and the training
checkpoint (`training.delink`) are rewritten by the same mapping."""

from __future__ import annotations

import copy
import re

_LAYER = re.compile(r"^((?:.*\.)?(encoder|decoder)\.layers\.)(\d+)(\..+)$")


def delinked_config(config):
    """The real model's config: every stack without sharing. A model that shares no layers is refused."""
    if not config.shares_layers:
        raise ValueError("the model shares no layers (layer_sharing 'none'): there is nothing to delink")
    real = copy.deepcopy(config)
    real.layer_sharing, real.decoder_layer_sharing = "none", None
    return real


def copies(name: str, config) -> list[tuple[str, int]]:
    """The real model's names for the shared model's tensor `name`, each with the number of depths the shared
    tensor served (its gradient summed theirs); a tensor outside the layer stacks keeps its name."""
    m = _LAYER.match(name)
    if m is None:
        return [(name, 1)]
    decoder = m.group(2) == "decoder"
    depth = config.num_decoder_layers if decoder else config.num_hidden_layers
    unique = config.shared_layers(depth, decoder)
    targets = [f"{m.group(1)}{d}{m.group(4)}" for d in range(int(m.group(3)), depth, unique)]
    return [(t, len(targets)) for t in targets]
