"""SkillNet: sparsely activated, skill-routed multimodal transformers (pure PyTorch + transformers)."""

from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoModelForPreTraining, AutoModelForSeq2SeqLM

from .configuration import SkillNetConfig, load_config
from .modeling import (
    SkillNetForConditionalGeneration,
    SkillNetForMaskedLM,
    SkillNetForMultiTask,
    SkillNetForPreTraining,
    SkillNetModel,
    SkillNetPreTrainedModel,
)
from .skills import Route, SkillRegistry, skill_set

AutoConfig.register("skillnet", SkillNetConfig)
AutoModel.register(SkillNetConfig, SkillNetModel)
AutoModelForPreTraining.register(SkillNetConfig, SkillNetForPreTraining)
AutoModelForMaskedLM.register(SkillNetConfig, SkillNetForMaskedLM)
AutoModelForSeq2SeqLM.register(SkillNetConfig, SkillNetForConditionalGeneration)

__all__ = [
    "Route",
    "SkillNetConfig",
    "SkillNetForConditionalGeneration",
    "SkillNetForMaskedLM",
    "SkillNetForMultiTask",
    "SkillNetForPreTraining",
    "SkillNetModel",
    "SkillNetPreTrainedModel",
    "SkillRegistry",
    "load_config",
    "skill_set",
]
