"""SkillNet: sparsely activated, skill-routed multimodal transformers (pure PyTorch + transformers)."""

from transformers import AutoConfig, AutoModel, AutoModelForPreTraining, AutoModelForSeq2SeqLM

from .configuration import SkillNetConfig, load_config
from .modeling import (
    SkillNetForConditionalGeneration,
    SkillNetForMultiTask,
    SkillNetForPreTraining,
    SkillNetModel,
    SkillNetPreTrainedModel,
)
from .skills import Route, SkillRegistry, skill_set

AutoConfig.register("skillnet", SkillNetConfig)
AutoModel.register(SkillNetConfig, SkillNetModel)
AutoModelForPreTraining.register(SkillNetConfig, SkillNetForPreTraining)
AutoModelForSeq2SeqLM.register(SkillNetConfig, SkillNetForConditionalGeneration)

__all__ = [
    "Route",
    "SkillNetConfig",
    "SkillNetForConditionalGeneration",
    "SkillNetForMultiTask",
    "SkillNetForPreTraining",
    "SkillNetModel",
    "SkillNetPreTrainedModel",
    "SkillRegistry",
    "load_config",
    "skill_set",
]
