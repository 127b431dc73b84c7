"""Finetuning SkillNet models on downstream tasks, reusing the sparse activation."""
