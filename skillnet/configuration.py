"""`SkillNetConfig`: the Hugging Face config of every SkillNet model and baseline."""

from __future__ import annotations

from pathlib import Path

import yaml
from transformers import PretrainedConfig

from .heads import check_head
from .skills import SkillRegistry
from .skills import skill_set as shipped_skill_set

ROUTERS = ("skill", "dense", "moe", "prototype", "task_router")
MODALITIES = ("text", "code", "image", "audio", "video")


class SkillNetConfig(PretrainedConfig):
    r"""Configuration of a SkillNet encoder (and, with `num_decoder_layers > 0`, encoder-decoder).

    Transformer sizes follow `BertConfig` names so a BERT checkpoint maps onto them one to one.

    Args:
        skills: list of `{"name", "description"}`; or leave empty and name a shipped `skill_set`.
        tasks: task name -> list of skill names the task activates.
        task_modalities: task name -> its input modality, for tasks whose input is not text.
        skill_set: "nlu", "nlg" or "multimodal": fills `skills`, `tasks` and `default_task` from the papers'
            tables. A skill model given neither skills nor a skill set is SkillNet-NLU ("nlu").
        default_task: the task a call that names none (`task=`, `skills=` or `skill_mask=`) runs, as a
            pipeline's call does; None: every call must name one.
        generic_skill: the skill every task activates when `always_generic` is true (None for none).
        skill_layers: which layers carry skills: "all", "every:k" (every k-th layer, counting from the
            bottom), "top:n" (the top n layers) or an explicit list of layer indices. Other layers hold
            one dense FFN.
        skill_attention: make the query/key/value/output projections skill-specific as well.
        layer_sharing: "none" (every layer its own weights), "all" (one layer's weights at every depth: the
            "pseudo giant" of Pseudo-to-Real, ALBERT's sharing) or "cycle:M" (M layers, depth i runs layer
            i mod M; M divides the depth). Each skill of a shared layer is shared across depth; a task's
            route is the same at every depth. `training.delink` turns a shared model into the real one.
        decoder_layer_sharing: the same for the decoder stack (None: as `layer_sharing`).
        router: "skill" (SkillNet), or a baseline: "dense" (one FFN), "moe" (learned top-k gate over
            `num_experts` FFNs), "prototype" (k-top-1 expert prototyping: `num_experts` split into
            `prototype_groups` groups, top-1 in each, outputs summed) or "task_router" (a task embedding
            feeds a per-layer router that picks one expert; Gumbel-softmax straight-through in training).
        num_experts / moe_top_k / prototype_groups / router_hidden_size / task_embedding_size /
            gumbel_temperature / router_aux_loss_coef: baseline router settings.
        modalities: the input modalities this model has front-ends for.
        image_size, patch_size, num_channels: image front-end (square images, square patches).
        image_mean, image_std: per-channel statistics that normalise uint8 pixels (0-255) in the front-end.
        num_mel_bins, max_audio_frames: audio front-end (log-mel frames in, 4x convolutional subsampling).
        num_frames, tubelet_size: video front-end (`num_frames` frames of `image_size`, tubelets of
            `tubelet_size` frames x `patch_size`^2 pixels).
        projection_dim: size of the contrastive projection heads (0: no contrastive heads).
        num_decoder_layers: decoder depth of the encoder-decoder (generation) variant.
        task_heads: task name -> head spec (`{"type": ..., "labels": [...]}`, see `skillnet.heads`) of the
            downstream tasks a `SkillNetForMultiTask` serves.
    """

    model_type = "skillnet"

    def __init__(
        self,
        vocab_size: int = 30522,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.1,
        attention_probs_dropout_prob: float = 0.1,
        max_position_embeddings: int = 512,
        type_vocab_size: int = 2,
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-12,
        pad_token_id: int = 0,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        decoder_start_token_id: int | None = None,
        skill_set: str | None = None,
        skills: list[dict] | None = None,
        tasks: dict[str, list[str]] | None = None,
        task_modalities: dict[str, str] | None = None,
        generic_skill: str | None = "generic",
        always_generic: bool = True,
        skill_layers: str | list[int] = "all",
        skill_attention: bool = False,
        layer_sharing: str = "none",
        decoder_layer_sharing: str | None = None,
        router: str = "skill",
        num_experts: int = 7,
        moe_top_k: int = 2,
        prototype_groups: int = 2,
        router_hidden_size: int = 64,
        task_embedding_size: int = 64,
        gumbel_temperature: float = 1.0,
        router_aux_loss_coef: float = 0.01,
        modalities: list[str] | None = None,
        image_size: int = 224,
        patch_size: int = 16,
        num_channels: int = 3,
        image_mean: tuple[float, ...] = (0.485, 0.456, 0.406),
        image_std: tuple[float, ...] = (0.229, 0.224, 0.225),
        num_mel_bins: int = 80,
        max_audio_frames: int = 3000,
        num_frames: int = 8,
        tubelet_size: int = 2,
        projection_dim: int = 0,
        num_decoder_layers: int = 0,
        tie_word_embeddings: bool = True,
        task_heads: dict[str, dict] | None = None,
        default_task: str | None = None,
        **kwargs,
    ):
        if skill_set is None and not skills and router == "skill":
            skill_set = "nlu"
        if skill_set is not None and not skills:
            shipped = shipped_skill_set(skill_set)
            skills = shipped["skills"]
            tasks = {**shipped["tasks"], **(tasks or {})}
            task_modalities = {**shipped["task_modalities"], **(task_modalities or {})}
            default_task = default_task or shipped["default_task"]
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.skill_set = skill_set
        self.skills = list(skills or [])
        self.tasks = {t: list(s) for t, s in (tasks or {}).items()}
        self.task_modalities = dict(task_modalities or {})
        self.generic_skill = generic_skill
        self.always_generic = always_generic
        self.skill_layers = skill_layers
        self.skill_attention = skill_attention
        self.layer_sharing = layer_sharing
        self.decoder_layer_sharing = decoder_layer_sharing
        self.router = router
        self.num_experts = num_experts
        self.moe_top_k = moe_top_k
        self.prototype_groups = prototype_groups
        self.router_hidden_size = router_hidden_size
        self.task_embedding_size = task_embedding_size
        self.gumbel_temperature = gumbel_temperature
        self.router_aux_loss_coef = router_aux_loss_coef
        self.modalities = list(modalities or ["text"])
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.num_mel_bins = num_mel_bins
        self.max_audio_frames = max_audio_frames
        self.num_frames = num_frames
        self.tubelet_size = tubelet_size
        self.projection_dim = projection_dim
        self.num_decoder_layers = num_decoder_layers
        self.task_heads = {t: dict(h) for t, h in (task_heads or {}).items()}
        self.default_task = default_task
        kwargs.pop("is_encoder_decoder", None)  # follows from num_decoder_layers
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            decoder_start_token_id=decoder_start_token_id,
            is_encoder_decoder=num_decoder_layers > 0,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.validate_skillnet()

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name == "num_decoder_layers":  # e.g. from_pretrained(encoder, num_decoder_layers=2) warm-starting a decoder
            super().__setattr__("is_encoder_decoder", value > 0)

    def validate_skillnet(self) -> None:
        """Raise a ValueError naming the first inconsistent setting."""
        if self.router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, got {self.router!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}")
        unknown = [m for m in self.modalities if m not in MODALITIES]
        if unknown:
            raise ValueError(f"unknown modalities {unknown}; front-ends exist for {list(MODALITIES)}")
        for task, modality in self.task_modalities.items():
            if task not in self.tasks or modality not in MODALITIES:
                raise ValueError(f"task_modalities: {task!r} -> {modality!r} needs a declared task and one of "
                                 f"{list(MODALITIES)}")
        if self.router == "skill":
            if not self.skills:
                raise ValueError("router 'skill' needs skills: set `skills` or a shipped `skill_set`")
            self.registry  # validates skill and task names
        if self.router in ("moe", "prototype", "task_router") and self.num_experts < 1:
            raise ValueError(f"router {self.router!r} needs num_experts >= 1")
        if self.router == "moe" and not 1 <= self.moe_top_k <= self.num_experts:
            raise ValueError(f"moe_top_k {self.moe_top_k} must be in [1, num_experts={self.num_experts}]")
        if self.router == "prototype" and self.num_experts % self.prototype_groups:
            raise ValueError(f"num_experts {self.num_experts} is not divisible by prototype_groups "
                             f"{self.prototype_groups}")
        if self.router == "task_router" and not self.tasks:
            raise ValueError("router 'task_router' needs a task table (`tasks`)")
        if {"image", "video"} & set(self.modalities) and self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        if "video" in self.modalities and self.num_frames % self.tubelet_size:
            raise ValueError(f"num_frames {self.num_frames} is not divisible by tubelet_size {self.tubelet_size}")
        self.stack_layers(self.num_hidden_layers)
        if self.num_decoder_layers:
            self.stack_layers(self.num_decoder_layers, decoder=True)
        if self.default_task is not None and self.default_task not in self.tasks:
            raise ValueError(f"default_task {self.default_task!r} is not in the task table {sorted(self.tasks)}")
        for task, spec in self.task_heads.items():
            check_head(task, spec, self)

    @property
    def registry(self) -> SkillRegistry:
        return SkillRegistry(self.skills, self.tasks, self.generic_skill, self.always_generic)

    def skill_layer_indices(self, num_layers: int) -> list[int]:
        """Indices of the layers (of a stack of `num_layers`) that carry skills or experts."""
        spec = self.skill_layers
        if isinstance(spec, (list, tuple)):
            bad = [i for i in spec if not 0 <= int(i) < num_layers]
            if bad:
                raise ValueError(f"skill_layers {bad} outside 0..{num_layers - 1}")
            return sorted({int(i) for i in spec})
        if spec == "all":
            return list(range(num_layers))
        kind, _, value = str(spec).partition(":")
        if kind in ("every", "top") and value.isdigit() and int(value) > 0:
            n = int(value)
            if kind == "every":
                return [i for i in range(num_layers) if (i + 1) % n == 0]
            return list(range(max(0, num_layers - n), num_layers))
        raise ValueError(f"skill_layers must be 'all', 'every:k', 'top:n' or a list of layer indices, got {spec!r}")

    def shared_layers(self, num_layers: int, decoder: bool = False) -> int:
        """How many layers of their own a stack of `num_layers` holds under its `layer_sharing` (depth i runs
        layer i mod that number)."""
        name = "decoder_layer_sharing" if decoder and self.decoder_layer_sharing is not None else "layer_sharing"
        spec = str(getattr(self, name))
        if spec == "none":
            return num_layers
        if spec == "all":
            return 1
        kind, _, value = spec.partition(":")
        if kind != "cycle" or not value.isdigit() or int(value) < 1:
            raise ValueError(f"{name} must be 'none', 'all' or 'cycle:M', got {spec!r}")
        if num_layers % int(value):
            raise ValueError(f"{name} {spec!r}: {value} does not divide the stack's {num_layers} layers")
        return int(value)

    @property
    def shares_layers(self) -> bool:
        """Whether a stack runs one layer's weights at several depths."""
        decoder = self.num_decoder_layers
        return (self.shared_layers(self.num_hidden_layers) < self.num_hidden_layers
                or 0 < decoder and self.shared_layers(decoder, True) < decoder)

    def stack_layers(self, num_layers: int, decoder: bool = False) -> list[bool]:
        """Whether each layer of its own of a stack carries skills: layer j serves depths j, j + M, ...,
        which must agree (`skill_layers` names depths)."""
        unique = self.shared_layers(num_layers, decoder)
        skilled = set(self.skill_layer_indices(num_layers))
        carries = []
        for j in range(unique):
            depths = range(j, num_layers, unique)
            if len({d in skilled for d in depths}) > 1:
                raise ValueError(f"skill_layers {self.skill_layers!r} gives skills to some of the depths "
                                 f"{list(depths)} that shared layer {j} runs, not all")
            carries.append(j in skilled)
        return carries




def load_config(path: str | Path, **overrides) -> SkillNetConfig:
    """A config from a YAML file (or one shipped by name, e.g. 'tiny'). In a file with a `model:` entry
    (a pretraining config) that entry is used: the model's fields, the name or path of a model config, or
    such a name as `config:` with fields over it."""
    path = resolve_config_path(path)
    data = yaml.safe_load(Path(path).read_text()) or {}
    if "model" in data:
        data = data["model"]
        if isinstance(data, str):
            return load_config(data, **overrides)
        if "config" in data:
            fields = dict(data)
            return load_config(fields.pop("config"), **{**fields, **overrides})
    return SkillNetConfig(**{**data, **overrides})


CONFIG_DIR = Path(__file__).parent / "configs"


def resolve_config_path(path: str | Path) -> Path:
    p = Path(path)
    if p.exists():
        return p
    shipped = CONFIG_DIR / f"{path}.yaml"
    if shipped.exists():
        return shipped
    names = sorted(f.stem for f in CONFIG_DIR.glob("*.yaml"))
    raise FileNotFoundError(f"no config file {str(path)!r} and no shipped config of that name; shipped: {names}")
