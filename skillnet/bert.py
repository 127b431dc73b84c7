"""Start a SkillNet from a Hugging Face BERT checkpoint, as the paper does: embeddings and attention are
copied, and every skill (or expert) FFN of every layer starts as a copy of that layer's BERT FFN."""

from __future__ import annotations

import re
from collections import defaultdict

import torch
from transformers import BertConfig, BertForPreTraining
from transformers.utils import logging as hf_logging

from .configuration import SkillNetConfig
from .modeling import SkillNetForPreTraining, SkillNetModel

_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
          "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "pad_token_id", "initializer_range",
          "hidden_dropout_prob", "attention_probs_dropout_prob")


def config_from_bert(bert_config: BertConfig, **skillnet_kwargs) -> SkillNetConfig:
    """A SkillNet config with BERT's sizes; `skillnet_kwargs` set skills, tasks, router and the rest."""
    sizes = {k: getattr(bert_config, k) for k in _SIZES}
    clash = sorted(set(sizes) & set(skillnet_kwargs))
    if clash:
        raise ValueError(f"{clash} come from the BERT checkpoint and cannot be overridden")
    return SkillNetConfig(**sizes, **skillnet_kwargs)


def _bert_to_skillnet(bert_sd: dict[str, torch.Tensor], model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """Map BERT tensor names onto the SkillNet ones; one BERT FFN fills every skill/expert copy."""
    # A skill or expert copy is named like the dense tensor plus a `.skills.<name>` / `.experts.<i>` segment.
    copies = defaultdict(list)
    for target in model.state_dict():
        copies[re.sub(r"\.(skills|experts)\.[^.]+", "", target)].append(target)
    out = {}

    def put(name: str, tensor: torch.Tensor):
        if name not in copies:
            raise KeyError(f"no SkillNet tensor for {name}")
        for target in copies[name]:
            out[target] = tensor

    def base(name: str) -> str:
        return f"{prefix}{name}"

    renames = {
        "embeddings.word_embeddings.weight": "frontends.text.word_embeddings.weight",
        "embeddings.position_embeddings.weight": "frontends.text.position_embeddings.weight",
        "embeddings.token_type_embeddings.weight": "frontends.text.token_type_embeddings.weight",
        "embeddings.LayerNorm.weight": "embed_norm.weight",
        "embeddings.LayerNorm.bias": "embed_norm.bias",
        "pooler.dense.weight": "pooler.weight",
        "pooler.dense.bias": "pooler.bias",
    }
    layer_renames = {
        "attention.self.query": "attn.q",
        "attention.self.key": "attn.k",
        "attention.self.value": "attn.v",
        "attention.output.dense": "attn.o",
        "attention.output.LayerNorm": "attn_norm",
        "intermediate.dense": "ffn.fc1",
        "output.dense": "ffn.fc2",
        "output.LayerNorm": "ffn_norm",
    }
    for name, tensor in bert_sd.items():
        name = name.removeprefix("bert.")
        if name in renames:
            put(base(renames[name]), tensor)
        elif name.startswith("encoder.layer."):
            _, _, i, rest = name.split(".", 3)
            module, _, param = rest.rpartition(".")
            if module in layer_renames:
                put(base(f"encoder.layers.{i}.{layer_renames[module]}.{param}"), tensor)
        elif prefix and name.startswith("cls."):
            heads = {
                "cls.predictions.transform.dense.weight": "mlm_transform.weight",
                "cls.predictions.transform.dense.bias": "mlm_transform.bias",
                "cls.predictions.transform.LayerNorm.weight": "mlm_norm.weight",
                "cls.predictions.transform.LayerNorm.bias": "mlm_norm.bias",
                "cls.predictions.bias": "mlm_output.bias",
                "cls.seq_relationship.weight": "pair_head.weight",
                "cls.seq_relationship.bias": "pair_head.bias",
            }
            if name in heads:
                out[heads[name]] = tensor
    return out


def from_bert(path_or_name: str, model_class=SkillNetModel, **skillnet_kwargs):
    """Build `model_class` (SkillNetModel or SkillNetForPreTraining) from a BERT checkpoint folder or hub name.

    The MLM and next-sentence heads are copied too when the checkpoint has them.
    """
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a BertModel checkpoint has no heads: that is expected, not news
    try:
        bert, info = BertForPreTraining.from_pretrained(path_or_name, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    config = config_from_bert(bert.config, **skillnet_kwargs)
    model = model_class(config)
    prefix = "skillnet." if isinstance(model, SkillNetForPreTraining) else ""
    bert_sd = bert.state_dict()
    missing_heads = {k for k in info["missing_keys"] if k.startswith("cls.")}
    bert_sd = {k: v for k, v in bert_sd.items()
               if k not in missing_heads and not k.startswith("cls.predictions.decoder")}
    mapped = _bert_to_skillnet(bert_sd, model, prefix)
    result = model.load_state_dict(mapped, strict=False)
    with torch.no_grad():
        # BERT has no modality embedding: zero keeps text hidden states identical to the checkpoint's.
        getattr(model, "skillnet", model).modality_embeddings.weight.zero_()
    unfilled = [k for k in result.missing_keys if _should_come_from_bert(k)]
    if unfilled:
        raise ValueError(f"the BERT checkpoint did not provide {unfilled[:5]}")
    return model


def _should_come_from_bert(name: str) -> bool:
    name = name.removeprefix("skillnet.")
    from_elsewhere = ("frontends.image", "frontends.audio", "frontends.video", "modality_embeddings", "projections",
                      "logit_scale", "task_embedding", ".gate.", ".router.", "mlm_", "pair_head")
    return not any(part in name for part in from_elsewhere)
