"""SkillNet models as Hugging Face `PreTrainedModel`s: the multimodal encoder, its pretraining heads, and
the encoder-decoder for generation. Imports neither deepspeed nor torch.distributed."""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from packaging.version import Version
from torch import nn
from transformers import PreTrainedModel
from transformers import __version__ as TRANSFORMERS_VERSION
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithCrossAttentions, MaskedLMOutput, Seq2SeqLMOutput
from transformers.utils import ModelOutput, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg

from .configuration import SkillNetConfig
from .frontends import FRONTENDS, INPUT_NAMES
from .heads import Head, check_head, head_for
from .layers import Packed, SkillFFN, SkillLinear, SkillNetLayer, padding_mask
from .skills import Route, SkillRegistry


@dataclass
class SkillNetModelOutput(ModelOutput):
    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    attention_mask: torch.Tensor | None = None
    """The mask of `last_hidden_state`'s positions (1 where an input position is)."""
    aux_loss: torch.Tensor | None = None
    modality: str | None = None


@dataclass
class SkillNetPreTrainingOutput(ModelOutput):
    loss: torch.Tensor | None = None
    prediction_logits: torch.Tensor | None = None
    seq_relationship_logits: torch.Tensor | None = None
    embeddings: torch.Tensor | None = None
    logit_scale: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    pair_embeddings: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    decoder_logits: torch.Tensor | None = None
    """With `decoder_labels`: the decoder's vocabulary logits (batch, target length, vocabulary)."""


@dataclass
class SkillNetMultiTaskOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | tuple | None = None
    """The head type's (`skillnet.heads`): classification: (batch, labels); tagging: (word emissions, word
    mask); span: (start, end) logits; ctc: (frame log-probabilities, frame counts); retrieval: (queries,
    candidates) similarities; generation: (batch, target tokens, vocabulary)."""
    aux_loss: torch.Tensor | None = None


@dataclass
class SkillNetSeq2SeqOutput(Seq2SeqLMOutput):
    aux_loss: torch.Tensor | None = None
    """The routers' auxiliary loss of the baselines (included in `loss`)."""


class SkillNetPreTrainedModel(PreTrainedModel):
    config_class = SkillNetConfig
    config: SkillNetConfig
    base_model_prefix = "skillnet"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["SkillNetLayer"]

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(getattr(module, "cls", None), nn.Parameter):  # the [CLS] of image, audio and video
            init.normal_(module.cls, mean=0.0, std=self.config.initializer_range)
        if isinstance(module, PromptEncoder):
            init.normal_(module.vectors, mean=0.0, std=self.config.initializer_range)
        if isinstance(module, (SkillNetForPreTraining, SkillNetForMultiTask)) and module.logit_scale is not None:
            init.constant_(module.logit_scale, math.log(1 / 0.07))

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`: weights the checkpoint lacks are initialised and listed (e.g. the
        decoder of an encoder-decoder warm-started from an encoder), but a checkpoint whose skills or shapes
        differ from the config's is refused."""
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        _check_loaded_skills(info, model.state_dict().keys())
        return (model, info) if wants_info else model

    _output_embeddings: str | None = None
    """The attribute holding the vocabulary projection (tied to the token embedding), where there is one."""

    def get_input_embeddings(self):
        return self.get_encoder().get_input_embeddings()

    def get_output_embeddings(self):
        return getattr(self, self._output_embeddings, None) if self._output_embeddings else None

    def set_output_embeddings(self, new_embeddings):
        setattr(self, self._output_embeddings, new_embeddings)

    def get_encoder(self, modality=None):
        """The multimodal encoder (`SkillNetModel`): the model itself, or its `skillnet`."""
        return getattr(self, "skillnet", self)

    # -- skills ---------------------------------------------------------------------------------------

    @property
    def registry(self):
        return self.config.registry

    def add_skill(self, name: str, description: str = "", init_from: str | None = None) -> None:
        """Add a skill to every skill layer, initialised as a copy of `init_from` (the generic skill)."""
        source = init_from or self.config.generic_skill
        if self.config.router != "skill":
            raise ValueError(f"add_skill needs router 'skill', this model uses {self.config.router!r}")
        if name in self.registry.index:
            raise ValueError(f"skill {name!r} already exists")
        if source not in self.registry.index:
            raise ValueError(f"cannot initialise {name!r} from unknown skill {source!r}; skills: {self.registry.names}")
        skills = [*self.config.skills, {"name": name, "description": description}]
        SkillRegistry(skills, self.config.tasks, self.config.generic_skill, self.config.always_generic)  # validates
        self.config.skills = skills
        for module in self.modules():
            if isinstance(module, (SkillFFN, SkillLinear)):
                module.add_skill(name, source)

    def extract(self, tasks: list[str]) -> SkillNetPreTrainedModel:
        """A model of this class holding only what `tasks` run (`skillnet.extract`): their skills in every skill
        layer, the shared weights, their heads and prompts and the front-ends of their modalities, the same
        tensors under the same names. For those tasks its outputs equal this model's; a call naming another
        task fails, naming the tasks it holds."""
        from .extract import extracted_config, take

        config, rows = extracted_config(self.config, tasks)
        kwargs = {"add_pooling_layer": self.pooler is not None} if isinstance(self, SkillNetModel) else {}
        with torch.device("meta"):
            model = type(self)(config, **kwargs)
        state = self.state_dict()
        model.load_state_dict({name: take(name, state[name], rows) for name in model.state_dict()}, assign=True)
        model.tie_weights()
        return model.train(self.training)

    def delink(self) -> SkillNetPreTrainedModel:
        """Pseudo-to-Real (`skillnet.delink`): the model of this class without layer sharing whose every depth
        holds a copy of the shared layer it ran, so that its outputs equal this model's; a model that shares
        no layers is refused."""
        from .delink import copies, delinked_config

        config = delinked_config(self.config)
        kwargs = {"add_pooling_layer": self.pooler is not None} if isinstance(self, SkillNetModel) else {}
        with torch.device("meta"):
            model = type(self)(config, **kwargs)
        state = {target: tensor.clone() for name, tensor in self.state_dict().items()
                 for target, _ in copies(name, self.config)}
        model.load_state_dict(state, assign=True)
        model.tie_weights()
        return model.train(self.training)

    def add_task(self, name: str, skills: list[str]) -> None:
        """Declare a task (or redeclare its skills) in the config's task table."""
        self.registry.resolve(skills, what=f"task {name!r}")
        if self.config.router == "task_router" and name not in self.config.tasks:
            raise ValueError("the task_router baseline has a fixed task embedding table; cannot add tasks")
        self.config.tasks = {**self.config.tasks, name: list(skills)}


def _check_loaded_skills(info: dict, model_keys) -> None:
    """A skill or expert that the checkpoint and the config disagree on in a layer both have, or a shape that
    differs: an error naming them. A layer only one side has (the decoder of an encoder-decoder warm-started
    from an encoder, or the other way round) is initialised or left out and listed, as transformers does."""
    mismatched = info.get("mismatched_keys") or []
    missing = set(info.get("missing_keys") or [])
    owner = re.compile(r"^(.*\.(?:skills|experts))\.([^.]+)\.")
    owners = {k: m.group(1) for k in model_keys if (m := owner.match(k))}
    compared = {"missing_keys": {o for k, o in owners.items() if k not in missing},  # layers the checkpoint has
                "unexpected_keys": set(owners.values())}  # layers the model has
    problems = []
    for kind in ("missing_keys", "unexpected_keys"):
        keys = sorted(k for k in info.get(kind) or [] if (m := owner.match(k)) and m.group(1) in compared[kind])
        if keys:
            names = sorted({owner.match(k).group(2) for k in keys})
            problems.append(f"{kind.replace('_', ' ')} for skills {names}")
    if mismatched:
        problems.append(f"shapes differ for {[m[0] if isinstance(m, tuple) else m for m in list(mismatched)[:3]]}")
    if problems:
        raise ValueError("checkpoint does not match the config: " + "; ".join(problems))


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of the output vectors over the unpadded positions: the contrastive embeddings' input. (The
    [CLS] vector barely depends on the input until it is trained to, which stalls contrastive learning
    from scratch; the mean does from the first step.)"""
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class SkillNetEncoder(nn.Module):
    """A stack of `num_layers` depths of `SkillNetLayer`s; the depths named by `config.skill_layers` carry skills.
    Under layer sharing (`config.layer_sharing`) `layers` holds fewer layers than depths, and depth i runs
    `layers[i % len(layers)]`: a shared layer is one module, called at each of its depths."""

    def __init__(self, config: SkillNetConfig, num_layers: int, decoder: bool = False):
        super().__init__()
        carries = config.stack_layers(num_layers, decoder)
        self.layers = nn.ModuleList(SkillNetLayer(config, c, decoder) for c in carries)
        self.depth = num_layers

    def forward(self, x, mask, route, encoder_states=None, encoder_mask=None, cache=None,
                output_hidden_states=False, output_attentions=False) -> BaseModelOutputWithCrossAttentions:
        hidden = [x] if output_hidden_states else None
        attentions, cross = ([], []) if output_attentions else (None, None)
        for depth in range(self.depth):
            layer = self.layers[depth % len(self.layers)]
            # a layer recomputed in the backward pass must not write the cache twice (transformers' layer drops
            # it by the keyword its version uses: `past_key_values` before 5.24, `cache` since)
            recomputed = layer.gradient_checkpointing and self.training and torch.is_grad_enabled()
            x, weights, cross_weights = layer(x, mask, route, encoder_states, encoder_mask, depth=depth,
                                              cache=None if recomputed else cache, output_attentions=output_attentions)
            if hidden is not None:
                hidden.append(x)
            if attentions is not None:
                attentions.append(weights)
                cross.append(cross_weights)
        return BaseModelOutputWithCrossAttentions(x, tuple(hidden) if hidden is not None else None,
                           tuple(attentions) if attentions is not None else None,
                           tuple(cross) if cross and encoder_states is not None else None)


class SkillNetModel(SkillNetPreTrainedModel):
    """Modality front-ends, a modality-type embedding and the shared skill-routed trunk.

    Call with one modality's inputs (`input_ids` for text or code, `pixel_values`, `input_features` or
    `pixel_values_videos`) and the skills to run: `task="sentiment_analysis"`, `skills=["token"]`, a list of
    tasks or skill lists (one per sample), or a bool `skill_mask` (batch, num_skills).
    """

    # the heads of the other classes, when the encoder is loaded on its own (feature extraction)
    _keys_to_ignore_on_load_unexpected = [r"^mlm_", r"^pair_head\.", r"^projections\.", r"^logit_scale", r"^lm_head\.",
                                          r"^decoder", r"^heads\.", r"^prompts\."]

    def __init__(self, config: SkillNetConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        fronts = {"text" if m == "code" else m for m in config.modalities}
        self.frontends = nn.ModuleDict({m: FRONTENDS[m](config) for m in sorted(fronts)})
        self.modality_embeddings = nn.Embedding(len(config.modalities), config.hidden_size)
        self.embed_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.embed_dropout = nn.Dropout(config.hidden_dropout_prob)
        self.encoder = SkillNetEncoder(config, config.num_hidden_layers)
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size) if add_pooling_layer else None
        self.task_embedding = None
        if config.router == "task_router":
            self.task_embedding = nn.Embedding(len(config.tasks), config.task_embedding_size)
        self.post_init()

    def get_input_embeddings(self):
        return self.frontends["text"].word_embeddings if "text" in self.frontends else None

    def set_input_embeddings(self, value):
        self.frontends["text"].word_embeddings = value

    def route(self, batch_size: int, task=None, skills=None, skill_mask=None, device=None) -> Route:
        """Resolve `task` / `skills` / `skill_mask` into the `Route` every layer reads."""
        given = [n for n, v in (("task", task), ("skills", skills), ("skill_mask", skill_mask)) if v is not None]
        if len(given) > 1:
            raise ValueError(f"pass one of task, skills, skill_mask; got {given}")
        if not given and self.config.default_task is not None:
            task, given = self.config.default_task, ["task"]
        registry = self.registry if self.config.skills else None
        task_embedding = None
        if self.task_embedding is not None:
            if task is None:
                raise ValueError("the task_router baseline needs task= (a name or one name per sample)")
            tasks = [task] * batch_size if isinstance(task, str) else list(task)
            ids = torch.tensor([registry.task_id(t) for t in tasks], device=device)
            task_embedding = self.task_embedding(ids)
        if self.config.router != "skill":
            for name in ([task] if isinstance(task, str) else task or []) if registry else []:
                registry.task_skills(name)  # an unknown task is an error for every router
            return Route([(None, ())], task_embedding)
        if not given:
            raise ValueError("a skill model needs task=, skills= or skill_mask= to know which skills to run "
                             "(or a config.default_task for calls that name none)")
        if isinstance(task, str):
            return Route([(None, registry.task_skills(task))])
        if skills is not None and all(isinstance(s, str) for s in skills):
            return Route([(None, registry.resolve(skills))])
        if skill_mask is None:
            per_sample = ([registry.task_skills(t) for t in task] if task is not None
                          else [registry.resolve(s) for s in skills])
            if len(per_sample) != batch_size:
                raise ValueError(f"{given[0]} has {len(per_sample)} entries for a batch of {batch_size}")
            skill_mask = torch.stack([registry.mask(s) for s in per_sample])
        elif skill_mask.shape[-1] != len(registry) or skill_mask.shape[0] != batch_size:
            raise ValueError(f"skill_mask must be (batch={batch_size}, num_skills={len(registry)}), "
                             f"got {tuple(skill_mask.shape)}")
        return Route.from_mask(skill_mask.to(torch.bool).cpu(), device)

    def embed(self, modality=None, input_ids=None, attention_mask=None, token_type_ids=None, pixel_values=None,
              input_features=None, feature_attention_mask=None, pixel_values_videos=None, position_offset=0):
        """Front-end of the one modality given -> (normalised embeddings, attention mask, modality). Given
        one medium's inputs and `input_ids` (a task instruction, OFA's encoder input), the medium's tokens come
        first and the text's after them, each with its own modality embedding; the modality is the medium's."""
        inputs = {"text": input_ids, "image": pixel_values, "audio": input_features, "video": pixel_values_videos}
        present = [m for m, v in inputs.items() if v is not None]
        if len(present) == 2 and present[0] == "text":
            medium = present[1]
            if modality not in (None, medium):
                raise ValueError(f"modality {modality!r} does not match the medium given with the text "
                                 f"({INPUT_NAMES[medium]})")
            media, mask, _ = self.embed(medium, pixel_values=pixel_values, input_features=input_features,
                                        feature_attention_mask=feature_attention_mask,
                                        pixel_values_videos=pixel_values_videos)
            text, text_mask, _ = self.embed("text", input_ids, attention_mask, token_type_ids,
                                            position_offset=position_offset)
            return torch.cat([media, text], dim=1), torch.cat([mask, text_mask.to(mask.dtype)], dim=1), medium
        if len(present) != 1:
            raise ValueError("pass the inputs of one modality (input_ids, pixel_values, input_features or "
                             f"pixel_values_videos), or one medium's and input_ids; got {present or 'none'}")
        front = present[0]
        modality = modality or front
        if front != ("text" if modality == "code" else modality):
            raise ValueError(f"modality {modality!r} does not match the inputs given "
                             f"({INPUT_NAMES.get(front, 'input_ids')})")
        if modality not in self.config.modalities:
            raise ValueError(f"this model has no front-end for modality {modality!r}; "
                             f"config.modalities = {self.config.modalities}")
        if front == "text":
            x, mask = self.frontends["text"](input_ids, attention_mask, token_type_ids, position_offset)
        elif front == "audio":
            x, mask = self.frontends["audio"](input_features, feature_attention_mask)
        else:
            x, mask = self.frontends[front](inputs[front])
        index = torch.full((1, 1), self.config.modalities.index(modality), dtype=torch.long, device=x.device)
        x = x + self.modality_embeddings(index)
        return self.embed_dropout(self.embed_norm(x)), mask, modality

    @can_return_tuple
    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, pixel_values=None,
                input_features=None, feature_attention_mask=None, pixel_values_videos=None, modality=None,
                task=None, skills=None, skill_mask=None, route: Route | None = None, prompts: nn.Module | None = None,
                packed: list[dict] | None = None, output_attentions: bool | None = None,
                output_hidden_states: bool | None = None,
                **kwargs) -> SkillNetModelOutput | tuple[SkillNetModelOutput, ...]:
        """`prompts`: a `PromptEncoder` whose vectors are inserted after the first position ([CLS]) for
        the trunk to attend to; they are taken out of the outputs again, which stay aligned with the inputs.

        `packed`: instead of one input, several (each a dict of the arguments above, with its own modality,
        task or skills, prompts), run through the trunk together: their tokens are laid end to end, so each
        projection and skill module is called once for all of them, and attention stays within each input.
        Returns one output per input; the whole call's `aux_loss` is on the first.

        A call naming no task, skills or skill mask runs `config.default_task`."""
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        if packed is not None:
            return self._forward_packed(packed, output_hidden_states)
        x, mask, attention, route, n, modality = self._prepare(
            input_ids, attention_mask, token_type_ids, pixel_values, input_features, feature_attention_mask,
            pixel_values_videos, modality, task, skills, skill_mask, route, prompts)
        stack = self.encoder(x, attention, route, output_hidden_states=output_hidden_states,
                             output_attentions=output_attentions)
        return self._output(stack, mask, n, route, modality)

    def _prepare(self, input_ids=None, attention_mask=None, token_type_ids=None, pixel_values=None,
                 input_features=None, feature_attention_mask=None, pixel_values_videos=None, modality=None,
                 task=None, skills=None, skill_mask=None, route=None, prompts=None):
        """Embeddings, their mask, the mask attention gets, route, number of prompt vectors, modality."""
        x, mask, modality = self.embed(modality, input_ids, attention_mask, token_type_ids, pixel_values,
                                       input_features, feature_attention_mask, pixel_values_videos)
        if route is None:
            route = self.route(x.shape[0], task, skills, skill_mask, x.device)
        n = 0
        if prompts is not None:
            extra = prompts(x, mask)
            n = extra.shape[1]
            x = torch.cat([x[:, :1], extra.to(x.dtype), x[:, 1:]], dim=1)
            mask = torch.cat([mask[:, :1], mask.new_ones(mask.shape[0], n), mask[:, 1:]], dim=1)
        # inputs without padding by construction (images, video, text or audio given no mask) attend
        # without a mask, which keeps SDPA's efficient kernels eligible (checking a given mask would sync)
        unpadded = ((input_ids is None or attention_mask is None)
                    and (input_features is None or feature_attention_mask is None))
        return x, mask, None if unpadded else padding_mask(mask), route, n, modality

    def _output(self, stack: BaseModelOutputWithCrossAttentions, mask, n, route, modality) -> SkillNetModelOutput:
        hidden = stack.last_hidden_state
        if n:
            hidden, mask = (torch.cat([t[:, :1], t[:, 1 + n:]], dim=1) for t in (hidden, mask))
        pooled = torch.tanh(self.pooler(hidden[:, 0])) if self.pooler is not None else None
        aux = torch.stack(route.aux_losses).sum() if route is not None and route.aux_losses else None
        return SkillNetModelOutput(hidden, pooled, stack.hidden_states, stack.attentions, mask, aux, modality)

    def _forward_packed(self, packed: list[dict], output_hidden_states: bool) -> tuple[SkillNetModelOutput, ...]:
        for i, inputs in enumerate(packed):
            if unknown := sorted(set(inputs) - _PACKED_ARGUMENTS):
                raise ValueError(f"packed input {i}: unknown arguments {unknown}; "
                                 f"accepted: {sorted(_PACKED_ARGUMENTS)}")
        prepared = [self._prepare(**inputs) for inputs in packed]
        shapes = [tuple(p[0].shape[:2]) for p in prepared]
        rows = torch.cat([p[0].flatten(0, 1) for p in prepared])
        route = Route.packed([p[3] for p in prepared], shapes, rows.device)
        stack = self.encoder(rows, Packed(shapes, [p[2] for p in prepared]), route,
                             output_hidden_states=output_hidden_states)
        outputs, start = [], 0
        for i, ((_, mask, _, _, n, modality), (batch, length)) in enumerate(zip(prepared, shapes)):
            def part(t, start=start):
                return t[start:start + batch * length].view(batch, length, -1)
            states = tuple(part(h) for h in stack.hidden_states) if stack.hidden_states is not None else None
            outputs.append(self._output(BaseModelOutputWithCrossAttentions(part(stack.last_hidden_state), states),
                                        mask, n, route if i == 0 else None, modality))
            start += batch * length
        return tuple(outputs)


_MEDIA_INPUTS = ("pixel_values", "input_features", "feature_attention_mask", "pixel_values_videos")
"""A medium's encoder inputs, which an encoder-decoder call may give beside the text."""
_PACKED_ARGUMENTS = frozenset(inspect.signature(SkillNetModel._prepare).parameters) - {"self", "route"}
"""What each of `SkillNetModel`'s packed inputs may hold."""


class SkillDecoderMixin:
    """The skill-routed decoder's forward, for a model with `skillnet` (the encoder) and the modules
    `_add_decoder` gives it."""

    def decode(self, decoder_input_ids, encoder_states, encoder_mask, route, cache=None, output_attentions=False,
               output_hidden_states=False) -> tuple[torch.Tensor, BaseModelOutputWithCrossAttentions]:
        """Vocabulary logits of the decoder for `decoder_input_ids`, following the positions already in
        `cache` (an `EncoderDecoderCache`, updated in place), and the decoder stack's outputs."""
        if getattr(self, "decoder", None) is None:
            raise ValueError("this model has no decoder (config.num_decoder_layers is 0)")
        offset, n = cache.get_seq_length() if cache is not None else 0, decoder_input_ids.shape[1]
        if offset + n > self.decoder_positions.num_embeddings:
            raise ValueError(f"decoding past max_position_embeddings={self.decoder_positions.num_embeddings}")
        positions = torch.arange(offset, offset + n, device=decoder_input_ids.device)
        x = self.get_input_embeddings()(decoder_input_ids) + self.decoder_positions(positions)
        x = self.skillnet.embed_dropout(self.decoder_embed_norm(x))
        stack = self.decoder(x, None, route, encoder_states, padding_mask(encoder_mask), cache,
                             output_hidden_states, output_attentions)
        return self.lm_head(stack.last_hidden_state), stack

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        start = self.config.decoder_start_token_id
        if start is None:
            raise ValueError("config.decoder_start_token_id is not set")
        shifted = labels.new_full(labels.shape, self.config.pad_token_id)
        shifted[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == -100, self.config.pad_token_id)
        shifted[:, 0] = start
        return shifted


class SkillNetForPreTraining(SkillNetPreTrainedModel, SkillDecoderMixin):
    """The encoder with the sparse pretraining heads: masked-token prediction (tied to the token
    embedding), sentence-pair prediction from the pooled [CLS], and per-modality contrastive projections;
    with `num_decoder_layers`, also the skill-routed decoder of instruction tasks (OFA's format: the target's
    tokens given the medium and the instruction), with the names `SkillNetForConditionalGeneration` loads."""

    _output_embeddings = "mlm_output"

    def __init__(self, config: SkillNetConfig):
        super().__init__(config)
        self.skillnet = SkillNetModel(config)
        h = config.hidden_size
        _add_mlm_head(self, config)
        self.pair_head = nn.Linear(h, 2)
        self.projections = None
        self.logit_scale = None
        if config.projection_dim:
            self.projections = nn.ModuleDict({m: nn.Linear(h, config.projection_dim, bias=False)
                                              for m in config.modalities})
            self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))  # 1-d: DeepSpeed broadcasts bytes
        if config.num_decoder_layers:
            _add_decoder(self, config)
        self.post_init()

    def project(self, pooled: torch.Tensor, modality: str) -> torch.Tensor:
        """L2-normalised contrastive embedding of a pooled vector of `modality` (see `mean_pool`)."""
        if self.projections is None:
            raise ValueError("contrastive embeddings need projection_dim > 0 in the config")
        return F.normalize(self.projections[modality](pooled), dim=-1)

    @can_return_tuple
    def forward(self, input_ids=None, labels=None, next_sentence_label=None, pair: dict | None = None,
                packed: list[dict] | None = None, masked_positions=None, decoder_labels=None,
                **inputs) -> SkillNetPreTrainingOutput | tuple[SkillNetPreTrainingOutput, ...]:
        """The encoder's inputs (`SkillNetModel.forward`), and the pretraining targets:
        `labels`: token ids at masked positions, -100 elsewhere; the vocabulary logits are then computed
        at the masked positions only, and `prediction_logits` is (masked positions, vocabulary), in
        row-major order of the positions (`mlm_logits(hidden)` gives them anywhere on demand).
        `masked_positions`: those positions' indices in the flattened (batch x tokens) labels, where they
        are known already (a trainer that masked on the host): finding them in `labels` reads the labels
        back, which on an accelerator stops the host until the device has caught up.
        `next_sentence_label`: 0/1 per sample. With `projection_dim`, `embeddings` holds the normalised
        contrastive embedding of the mean of the output vectors (`mean_pool`).
        `pair`: the inputs (and task) of the other side of a contrastive pair, e.g. the captions of images,
        run in the same call; `pair_embeddings` holds its embeddings.
        `decoder_labels`: an instruction task's target ids (-100 where no loss is taken); the decoder, run with
        the same skills, reads them shifted right and the encoder's output (`decoder_logits`).
        `packed`: several inputs, each a dict of the arguments above, run in one call (`SkillNetModel`'s
        `packed`); returns one output per input, the whole call's `aux_loss` with the first (and, unlike
        a single input's, in no output's `loss`)."""
        single = packed is None
        if input_ids is not None:
            inputs["input_ids"] = input_ids
        targets = ("labels", "masked_positions", "next_sentence_label", "pair", "decoder_labels")
        if single:
            packed = [dict(inputs, labels=labels, next_sentence_label=next_sentence_label, pair=pair,
                           masked_positions=masked_positions, decoder_labels=decoder_labels)]
        elif inputs or any(v is not None for v in (labels, next_sentence_label, pair, masked_positions,
                                                   decoder_labels)):
            raise ValueError("pass the inputs either as packed= or as arguments, not both")
        streams, heads = [], []
        for entry in packed:
            entry = dict(entry)
            heads.append([entry.pop(k, None) for k in targets])
            # the decoder, where there are decoder labels, runs the encoder's skills
            heads[-1].append({k: entry[k] for k in ("task", "skills", "skill_mask") if entry.get(k) is not None})
            streams.append(entry)
            if heads[-1][3] is not None:
                if self.projections is None:
                    raise ValueError("contrastive pairs need projection_dim > 0 in the config")
                streams.append(heads[-1][3])
        encoded = iter(self.skillnet(packed=streams) if len(streams) > 1
                       else [self.skillnet(**streams[0], return_dict=True)])
        results = tuple(self._heads(next(encoded), mlm, positions, nsp, next(encoded) if other is not None else None,
                                    single, target, route) for mlm, positions, nsp, other, target, route in heads)
        return results[0] if single else results

    def _heads(self, out: SkillNetModelOutput, labels, positions, next_sentence_label, pair, add_aux: bool,
               decoder_labels=None, route: dict | None = None) -> SkillNetPreTrainingOutput:
        """The losses and outputs of one input's heads; `route`: the task, skills or skill mask it ran with."""
        hidden, pooled = out.last_hidden_state, out.pooler_output
        if labels is not None:
            if positions is None:
                positions = torch.nonzero(labels.flatten() != -100).flatten()
            labels = labels.flatten().index_select(0, positions)
            prediction_logits = mlm_logits(self, hidden.flatten(0, 1).index_select(0, positions))
        else:
            prediction_logits = None
        pair_logits = self.pair_head(pooled)
        embeddings = scale = pair_embeddings = None
        if self.projections is not None:
            embeddings = self.project(mean_pool(hidden, out.attention_mask), out.modality)
            scale = self.logit_scale.exp().clamp(max=100.0)  # CLIP's temperature, returned for the loss
        if pair is not None:
            pair_embeddings = self.project(mean_pool(pair.last_hidden_state, pair.attention_mask), pair.modality)
        losses = []
        if labels is not None:
            losses.append(F.cross_entropy(prediction_logits.float(), labels))
        if next_sentence_label is not None:
            losses.append(F.cross_entropy(pair_logits.float(), next_sentence_label))
        decoder_logits = None
        if decoder_labels is not None:
            route = self.skillnet.route(decoder_labels.shape[0], **route, device=hidden.device)
            decoder_logits, _ = self.decode(self.shift_right(decoder_labels), hidden, out.attention_mask, route)
            losses.append(F.cross_entropy(decoder_logits.flatten(0, 1).float(), decoder_labels.flatten(),
                                          ignore_index=-100))
            losses += route.aux_losses  # the decoder's routers', which no encoder output carries
        if add_aux and out.aux_loss is not None and losses:
            losses.append(out.aux_loss)
        loss = torch.stack(losses).sum() if losses else None
        return SkillNetPreTrainingOutput(loss, prediction_logits, pair_logits, embeddings, scale, hidden, out.aux_loss,
                                         pair_embeddings, out.hidden_states, out.attentions, decoder_logits)


def _add_mlm_head(model: nn.Module, config: SkillNetConfig) -> None:
    """Masked-token prediction (BERT's): a transform, its norm, and the vocabulary projection `mlm_output`,
    its weight tied to the token embedding (a module call, as Hugging Face ties). Needs a text front-end.
    (Not named `..._decoder`: transformers' `infer_auto_device_map` matches module names as substrings, and
    would count it part of the encoder-decoder's `decoder`.)"""
    h, text = config.hidden_size, "text" in model.skillnet.frontends
    model.mlm_transform = nn.Linear(h, h) if text else None
    model.mlm_norm = nn.LayerNorm(h, eps=config.layer_norm_eps) if text else None
    model.mlm_output = nn.Linear(h, config.vocab_size) if text else None
    if text:
        model._tied_weights_keys = {"mlm_output.weight": "skillnet.frontends.text.word_embeddings.weight"}


def mlm_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Vocabulary logits of `hidden` through a model's masked-token head (`_add_mlm_head`)."""
    if model.mlm_transform is None:
        raise ValueError("masked-token prediction needs a text or code modality")
    return model.mlm_output(model.mlm_norm(ACT2FN[model.config.hidden_act](model.mlm_transform(hidden))))


class SkillNetForMaskedLM(SkillNetPreTrainedModel):
    """The encoder with its masked-token head: vocabulary logits at every position (what the `fill-mask`
    pipeline reads). The head's weights have the pretraining model's names, so an export loads into it."""

    _keys_to_ignore_on_load_unexpected = [r"^pair_head\.", r"^projections\.", r"^logit_scale", r"^skillnet\.pooler\."]
    _output_embeddings = "mlm_output"

    def __init__(self, config: SkillNetConfig):
        super().__init__(config)
        self.skillnet = SkillNetModel(config, add_pooling_layer=False)
        _add_mlm_head(self, config)
        self.post_init()

    @can_return_tuple
    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None,
                **inputs) -> MaskedLMOutput:
        """`labels`: token ids where the loss is taken, -100 elsewhere. Other arguments: `SkillNetModel`'s
        (without `task=` the call runs `config.default_task`)."""
        out = self.skillnet(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                            return_dict=True, **inputs)
        logits = mlm_logits(self, out.last_hidden_state)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
            loss = loss + out.aux_loss if out.aux_loss is not None else loss
        return MaskedLMOutput(loss, logits, out.hidden_states, out.attentions)


def _add_decoder(model: nn.Module, config: SkillNetConfig) -> None:
    """The skill-routed decoder (positions, its embedding norm, cross-attending layers, and the output
    projection `lm_head`, its weight tied to the token embedding)."""
    h = config.hidden_size
    model.decoder_positions = nn.Embedding(config.max_position_embeddings, h)
    model.decoder_embed_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
    model.decoder = SkillNetEncoder(config, config.num_decoder_layers, decoder=True)
    model.lm_head = nn.Linear(h, config.vocab_size)
    model._tied_weights_keys = {**(getattr(model, "_tied_weights_keys", None) or {}),
                                "lm_head.weight": "skillnet.frontends.text.word_embeddings.weight"}


def old_cache_name(forward):
    """`past_key_values`, the cache's name before transformers 5.24, honoured as `cache`: with transformers'
    own deprecation warning (as its models give) from 5.24 on, silently before, where `generate` itself still
    passes the old name."""
    if Version(TRANSFORMERS_VERSION) < Version("5.24"):
        return forward
    return deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")(forward)


class SkillGenerationMixin(SkillDecoderMixin, GenerationMixin):
    """Encoder-decoder generation through transformers' `GenerationMixin` (greedy, sampling, beam search,
    `GenerationConfig`), the task's skills active in the encoder and at every decoding step. For a model with
    `skillnet` (the encoder) and the modules `_add_decoder` gives it."""

    @old_cache_name
    def seq2seq(self, input_ids=None, attention_mask=None, decoder_input_ids=None, labels=None, encoder_outputs=None,
                cache=None, use_cache=None, task=None, skills=None, skill_mask=None, output_attentions=None,
                output_hidden_states=None, past_key_values=None, **kwargs) -> SkillNetSeq2SeqOutput:
        """The encoder-decoder's forward: `labels` (target ids, -100 where no loss is taken) give the decoder's
        inputs shifted right and the loss; in generation `encoder_outputs` are the encoder's, computed once,
        and `cache` the cache of earlier steps (see `old_cache_name`). A medium's inputs in `kwargs`
        (`pixel_values`, `input_features` and `feature_attention_mask`, `pixel_values_videos`) go through the
        encoder before the text of `input_ids` (`SkillNetModel.embed`)."""
        cache = cache if cache is not None else past_key_values
        config = self.config
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("pass decoder_input_ids or labels")
            decoder_input_ids = self.shift_right(labels)
        route = self.skillnet.route(decoder_input_ids.shape[0], task, skills, skill_mask, decoder_input_ids.device)
        if encoder_outputs is None:
            media = {k: kwargs[k] for k in _MEDIA_INPUTS if kwargs.get(k) is not None}
            encoder_outputs = self.skillnet(input_ids=input_ids, attention_mask=attention_mask, route=route,
                                            return_dict=True, output_attentions=output_attentions,
                                            output_hidden_states=output_hidden_states, **media)
        # the encoder's own mask covers a medium's positions too; encoder outputs given as a tuple have none
        encoder_mask = getattr(encoder_outputs, "attention_mask", None)
        encoder_mask = attention_mask if encoder_mask is None else encoder_mask
        if use_cache is None:
            use_cache = getattr(config, "use_cache", True) and labels is None
        if use_cache and cache is None:
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        logits, stack = self.decode(decoder_input_ids, encoder_outputs.last_hidden_state, encoder_mask, route,
                                    cache if use_cache else None, output_attentions, output_hidden_states)
        aux = torch.stack(route.aux_losses).sum() if route.aux_losses else None
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
            loss = loss + aux if aux is not None else loss
        return SkillNetSeq2SeqOutput(
            loss, logits, cache if use_cache else None, stack.hidden_states, stack.attentions,
            stack.cross_attentions, encoder_outputs.last_hidden_state, encoder_outputs.hidden_states,
            encoder_outputs.attentions, aux)

    def generate(self, inputs=None, generation_config=None, task=None, skills=None, **kwargs):
        """`GenerationMixin.generate` with the skills to run: `task=` (a name, or one per sample), `skills=`
        or `skill_mask=`, or none for `config.default_task`. Per-sample tasks or skill lists become a skill
        mask, one row per sample, which beam search and `num_return_sequences` expand with the inputs."""
        per_sample = (task is not None and not isinstance(task, str)) or (
            skills is not None and not all(isinstance(x, str) for x in skills))
        if per_sample and self.config.router == "skill":
            registry = self.registry
            sets = ([registry.task_skills(t) for t in task] if task is not None
                    else [registry.resolve(x) for x in skills])
            kwargs["skill_mask"] = torch.stack([registry.mask(x) for x in sets]).to(self.device)
        else:
            kwargs.update({k: v for k, v in (("task", task), ("skills", skills)) if v is not None})
        return super().generate(inputs, generation_config, **kwargs)


class PromptEncoder(nn.Module):
    """Prompt tuning: `length` trained vectors given to the trunk with every input of a task. Instance-wise,
    a small network adds to them vectors computed from the input's own (mean) embedding, so each input
    gets prompts of its own."""

    def __init__(self, length: int, hidden: int, instance_wise: bool, bottleneck: int = 64):
        super().__init__()
        self.length = length
        self.vectors = nn.Parameter(torch.zeros(length, hidden))
        self.generator = None
        if instance_wise:
            self.generator = nn.Sequential(nn.Linear(hidden, bottleneck), nn.Tanh(),
                                           nn.Linear(bottleneck, length * hidden))

    def forward(self, embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.vectors.expand(embeddings.shape[0], -1, -1)
        if self.generator is not None:
            out = out + self.generator(mean_pool(embeddings, mask)).view(embeddings.shape[0], self.length, -1)
        return out


class SkillNetForMultiTask(SkillNetPreTrainedModel, SkillGenerationMixin):
    """The encoder with a head per downstream task (`config.task_heads`); every call names its task, which
    runs only its skills. One checkpoint serves every task. The contrastive projections and temperature
    keep the pretraining model's names, so an exported pretraining checkpoint fills them."""

    _keys_to_ignore_on_load_unexpected = [r"^mlm_", r"^pair_head\."]  # pretraining heads, not used here
    _output_embeddings = "lm_head"  # with a decoder

    def __init__(self, config: SkillNetConfig):
        super().__init__(config)
        self.skillnet = SkillNetModel(config)
        self.heads, self.prompts = nn.ModuleDict(), nn.ModuleDict()
        for task, spec in config.task_heads.items():
            self._build_head(task, spec)
        self.projections = self.logit_scale = None
        if config.projection_dim:
            self.projections = nn.ModuleDict({m: nn.Linear(config.hidden_size, config.projection_dim, bias=False)
                                              for m in config.modalities})
            self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))
        if config.num_decoder_layers:  # generation tasks: the decoder of SkillNetForConditionalGeneration, same names
            _add_decoder(self, config)
        self.post_init()

    def head(self, task: str) -> Head:
        """`task`'s head (`skillnet.heads`), of its spec's type."""
        spec = self.config.task_heads.get(task) if task is not None else None
        if spec is None:
            raise ValueError(f"task {task!r} has no head; tasks with heads: {sorted(self.config.task_heads)}")
        return head_for(task, spec)

    def _build_head(self, task: str, spec: dict) -> list[nn.Module]:
        built = []
        module = head_for(task, spec).build(self.config)
        if module is not None:
            self.heads[task] = module
            built.append(module)
        if spec.get("prompts"):
            prompts = spec["prompts"]
            self.prompts[task] = PromptEncoder(prompts["length"], self.config.hidden_size,
                                               prompts.get("instance_wise", False))
            built.append(self.prompts[task])
        return built

    def add_head(self, task: str, spec: dict) -> None:
        """Give `task` (already in the task table) a new, freshly initialised head (and its prompts, when
        the spec has `prompts: {length, instance_wise}`)."""
        check_head(task, spec, self.config)
        self.config.task_heads = {**self.config.task_heads, task: dict(spec)}
        for module in self._build_head(task, spec):
            module.apply(self._init_weights)
            module.to(self.device)

    @can_return_tuple
    def forward(self, input_ids=None, task: str | None = None, pixel_values=None, input_features=None,
                feature_attention_mask=None, pixel_values_videos=None,
                **inputs) -> SkillNetMultiTaskOutput | SkillNetSeq2SeqOutput:
        """Run `task`'s head (by default `config.default_task`'s) on a batch of its examples: the encoder's
        inputs and what the head's type reads besides (`labels`, `word_mask`, `start_positions`, `candidate`,
        ...; see `skillnet.heads`). The head calls this model's modules; its loss gets the routers' auxiliary
        loss added. A generation step (`decoder_input_ids` or `encoder_outputs` given, as `generate` calls
        it) is the encoder-decoder's forward."""
        media = {"pixel_values": pixel_values, "input_features": input_features,
                 "feature_attention_mask": feature_attention_mask, "pixel_values_videos": pixel_values_videos}
        inputs.update({k: v for k, v in media.items() if v is not None})
        if "decoder_input_ids" in inputs or "encoder_outputs" in inputs:
            return self.seq2seq(input_ids, task=task, **inputs)
        task = task if task is not None else self.config.default_task
        if input_ids is not None:
            inputs["input_ids"] = input_ids
        loss, logits, aux_loss = self.head(task).forward(self, **inputs)
        if loss is not None and aux_loss is not None:
            loss = loss + aux_loss
        return SkillNetMultiTaskOutput(loss, logits, aux_loss)

    def encode(self, task: str, **inputs) -> SkillNetModelOutput:
        """The encoder's output for `inputs`, run with `task`'s skills and prompts."""
        return self.skillnet(**self.task_inputs(task, inputs), return_dict=True)

    def embed(self, modality: str, task: str, **inputs) -> torch.Tensor:
        """The L2-normalised contrastive embedding of one side, run with `task`'s skills."""
        return self.embedding(self.skillnet(**self.task_inputs(task, inputs, modality), return_dict=True))

    def task_inputs(self, task: str, inputs: dict, modality: str | None = None) -> dict:
        """The encoder's arguments for `inputs` run as `task` (its skills and prompts), e.g. one entry of a
        `packed` call."""
        return {**inputs, "modality": modality, "task": task,
                "prompts": self.prompts[task] if task in self.prompts else None}

    def embedding(self, encoded: SkillNetModelOutput) -> torch.Tensor:
        """The L2-normalised contrastive embedding of an encoder output (its modality's projection of
        `mean_pool`)."""
        pooled = mean_pool(encoded.last_hidden_state, encoded.attention_mask)
        return F.normalize(self.projections[encoded.modality](pooled), dim=-1)

    def similarities(self, queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """(queries, candidates) cosine similarities of normalised embeddings, scaled by the learned
        temperature (CLIP's)."""
        return self.logit_scale.exp().clamp(max=100.0) * queries @ candidates.T


class SkillNetForConditionalGeneration(SkillNetPreTrainedModel, SkillGenerationMixin):
    """Encoder-decoder (SkillNet-NLG): encoder and decoder both carry skills, and the task's skills are
    active at every decoding step. The output projection is tied to the token embedding."""

    _output_embeddings = "lm_head"

    def __init__(self, config: SkillNetConfig):
        super().__init__(config)
        if config.num_decoder_layers < 1:
            raise ValueError("SkillNetForConditionalGeneration needs num_decoder_layers >= 1")
        self.skillnet = SkillNetModel(config, add_pooling_layer=False)
        _add_decoder(self, config)
        self.post_init()

    @can_return_tuple
    @old_cache_name
    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, labels=None, encoder_outputs=None,
                cache=None, use_cache=None, task=None, skills=None, skill_mask=None, output_attentions=None,
                output_hidden_states=None, past_key_values=None, pixel_values=None, input_features=None,
                feature_attention_mask=None, pixel_values_videos=None, **kwargs) -> SkillNetSeq2SeqOutput:
        """See `SkillGenerationMixin.seq2seq`."""
        return self.seq2seq(input_ids, attention_mask, decoder_input_ids, labels, encoder_outputs, cache, use_cache,
                            task, skills, skill_mask, output_attentions, output_hidden_states, past_key_values,
                            pixel_values=pixel_values, input_features=input_features,
                            feature_attention_mask=feature_attention_mask, pixel_values_videos=pixel_values_videos)
