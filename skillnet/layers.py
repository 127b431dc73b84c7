"""Transformer blocks whose FFN (and optionally attention projections) hold several skills or experts.

Every block takes `(x, route)`; `route` says which skills each sample activates. Pure PyTorch: no
process groups, no DeepSpeed. Parallelism is applied from outside (see `pretrain`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.cache_utils import EncoderDecoderCache
from transformers.modeling_layers import GradientCheckpointingLayer

from .skills import Route


class FFN(nn.Module):
    """One feed-forward network: a skill, an expert, or the dense layer of a layer without skills."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)
        self.act = ACT2FN[act]

    def forward(self, x: torch.Tensor, route: Route | None = None) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def mean_of_skills(skills: list[nn.Module], x: torch.Tensor, route: Route) -> torch.Tensor:
    """Each sample's mean over its active skills of `skill(x)`. Every active skill module is called once, on
    the samples that activate it; an inactive one is not called at all (no compute, no gradient, and
    nothing for ZeRO-3 to gather or for an adapter or offload hook to see)."""
    per_skill = route.per_skill()
    if per_skill[0][1] is None:  # one skill set for the whole batch
        out = None
        for index, _, _ in per_skill:
            y = skills[index](x)
            out = y if out is None else out + y
        return out / len(per_skill) if len(per_skill) > 1 else out
    out = None
    for index, rows, weight in per_skill:
        y = skills[index](x.index_select(0, rows))
        y = y * weight.to(y.dtype).view(-1, *(1,) * (y.dim() - 1))
        if out is None:
            out = y.new_zeros((x.shape[0],) + y.shape[1:])
        out = out.index_add(0, rows, y)
    return out


class SkillFFN(nn.Module):
    """Parallel skill FFNs: each sample gets the mean of the outputs of its active skills. k active skills
    cost k FFNs, however many the layer holds."""

    def __init__(self, skill_names: list[str], hidden_size: int, intermediate_size: int, act: str):
        super().__init__()
        self.skills = nn.ModuleDict({n: FFN(hidden_size, intermediate_size, act) for n in skill_names})

    def forward(self, x: torch.Tensor, route: Route) -> torch.Tensor:
        return mean_of_skills(list(self.skills.values()), x, route)

    def add_skill(self, name: str, init_from: str) -> None:
        self.skills[name] = copy.deepcopy(self.skills[init_from])


class SkillLinear(nn.Module):
    """A linear projection per skill (skill-specific attention); each sample gets the mean of its active
    skills' projections."""

    def __init__(self, skill_names: list[str], in_features: int, out_features: int):
        super().__init__()
        self.skills = nn.ModuleDict({n: nn.Linear(in_features, out_features) for n in skill_names})

    def forward(self, x: torch.Tensor, route: Route) -> torch.Tensor:
        return mean_of_skills(list(self.skills.values()), x, route)

    def add_skill(self, name: str, init_from: str) -> None:
        self.skills[name] = copy.deepcopy(self.skills[init_from])


class SharedLinear(nn.Linear):
    """A plain projection that takes (and ignores) the route, so attention code is the same either way."""

    def forward(self, x: torch.Tensor, route: Route | None = None) -> torch.Tensor:
        return super().forward(x)


def _load_balancing_loss(probs: torch.Tensor, chosen: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch-Transformer auxiliary loss: E * sum_e (fraction of tokens sent to e) * (mean gate prob of e)."""
    fraction = F.one_hot(chosen, num_experts).float().reshape(-1, num_experts).mean(0)
    return num_experts * (fraction * probs.reshape(-1, num_experts).mean(0)).sum()


def _dispatch(flat: torch.Tensor, experts: nn.ModuleList, expert_index: torch.Tensor,
              weight: torch.Tensor) -> torch.Tensor:
    """sum over slots of weight * expert(token) for every token; every expert runs, even on no tokens,
    so a data-parallel wrapper sees the same modules on every rank."""
    out = torch.zeros_like(flat)
    for e, expert in enumerate(experts):
        rows, slots = torch.nonzero(expert_index == e, as_tuple=True)
        y = expert(flat.index_select(0, rows))
        out = out.index_add(0, rows, y * weight[rows, slots].unsqueeze(-1))
    return out


class TopKMoEFFN(nn.Module):
    """Learned top-k token gating over `num_experts` FFNs (the papers' MoE baseline: 7 experts, top-2)."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, act: str,
                 aux_coef: float):
        super().__init__()
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = nn.ModuleList(FFN(hidden_size, intermediate_size, act) for _ in range(num_experts))
        self.top_k = top_k
        self.aux_coef = aux_coef

    def forward(self, x: torch.Tensor, route: Route) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        probs = self.gate(flat).softmax(-1)
        weight, index = probs.topk(self.top_k, dim=-1)
        weight = weight / weight.sum(-1, keepdim=True)
        route.aux_losses.append(self.aux_coef * _load_balancing_loss(probs, index[:, 0], len(self.experts)))
        return _dispatch(flat, self.experts, index, weight).view(x.shape)


class PrototypeFFN(nn.Module):
    """k-top-1 expert prototyping (M6-T): experts in k groups, top-1 inside each group, outputs summed."""

    def __init__(self, num_experts: int, groups: int, hidden_size: int, intermediate_size: int, act: str,
                 aux_coef: float):
        super().__init__()
        self.groups = groups
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = nn.ModuleList(FFN(hidden_size, intermediate_size, act) for _ in range(num_experts))
        self.aux_coef = aux_coef

    def forward(self, x: torch.Tensor, route: Route) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        per_group = len(self.experts) // self.groups
        probs = self.gate(flat).view(-1, self.groups, per_group).softmax(-1)
        weight, index = probs.max(-1)  # (tokens, groups)
        index = index + torch.arange(self.groups, device=x.device) * per_group
        aux = sum(_load_balancing_loss(probs[:, g], index[:, g] - g * per_group, per_group) for g in range(self.groups))
        route.aux_losses.append(self.aux_coef * aux / self.groups)
        return _dispatch(flat, self.experts, index, weight).view(x.shape)


class TaskRouterFFN(nn.Module):
    """Task-level routing: the task embedding goes through a small per-layer router that picks one expert
    for all tokens of the sample (straight-through Gumbel-softmax in training, argmax at inference)."""

    def __init__(self, num_experts: int, task_dim: int, router_hidden: int, hidden_size: int, intermediate_size: int,
                 act: str, tau: float):
        super().__init__()
        self.router = nn.Sequential(nn.Linear(task_dim, router_hidden), nn.ReLU(),
                                    nn.Linear(router_hidden, num_experts))
        self.experts = nn.ModuleList(FFN(hidden_size, intermediate_size, act) for _ in range(num_experts))
        self.tau = tau

    def forward(self, x: torch.Tensor, route: Route) -> torch.Tensor:
        if route.task_embedding is None:
            raise ValueError("the task_router baseline needs a task for every sample (pass task=...)")
        logits = self.router(route.task_embedding)  # (batch, experts)
        if self.training:
            one_hot = F.gumbel_softmax(logits, tau=self.tau, hard=True)
        else:
            one_hot = F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
        choice = one_hot.argmax(-1)
        if route.samples is not None:  # packed inputs: the rows are tokens, each follows its sample's choice
            one_hot, choice = one_hot[route.samples], choice[route.samples]
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            samples = torch.nonzero(choice == e).flatten()
            y = expert(x.index_select(0, samples)) * one_hot[samples, e].view(-1, *(1,) * (x.dim() - 1))
            out = out.index_copy(0, samples, y)
        return out


def make_ffn(config, carries_skills: bool) -> nn.Module:
    """The FFN block a layer gets from the config: dense, skills, or one of the routed baselines."""
    h, f, act = config.hidden_size, config.intermediate_size, config.hidden_act
    if not carries_skills or config.router == "dense":
        return FFN(h, f, act)
    if config.router == "skill":
        return SkillFFN([s["name"] for s in config.skills], h, f, act)
    if config.router == "moe":
        return TopKMoEFFN(config.num_experts, config.moe_top_k, h, f, act, config.router_aux_loss_coef)
    if config.router == "prototype":
        return PrototypeFFN(config.num_experts, config.prototype_groups, h, f, act, config.router_aux_loss_coef)
    return TaskRouterFFN(config.num_experts, config.task_embedding_size, config.router_hidden_size, h, f, act,
                         config.gumbel_temperature)


@dataclass
class Packed:
    """Several inputs run through the layers by one call (e.g. both sides of a contrastive pair): the rows
    of the hidden states are their tokens laid end to end, input by input, so every projection and skill
    runs once on all of them; attention stays within each input. Passed to the layers in place of the mask."""

    shapes: list[tuple[int, int]]
    """(batch, length) of each input."""
    masks: list[torch.Tensor | None]
    """Each input's attention mask (see `padding_mask`), None where it has no padding."""


class Attention(nn.Module):
    """Multi-head attention (self or cross) whose projections may be skill-specific. Computed by PyTorch's
    scaled_dot_product_attention, or written out ("eager") where `config._attn_implementation` says so or
    the attention weights are asked for."""

    def __init__(self, config, skilled: bool):
        super().__init__()
        h = config.hidden_size
        names = [s["name"] for s in config.skills]
        proj = (lambda: SkillLinear(names, h, h)) if skilled else (lambda: SharedLinear(h, h))
        self.q, self.k, self.v, self.o = proj(), proj(), proj(), proj()
        self.config = config  # read at call time: `model.set_attn_implementation` changes it
        self.num_heads = config.num_attention_heads
        self.dropout = config.attention_probs_dropout_prob

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, h = x.shape
        return x.view(b, n, self.num_heads, h // self.num_heads).transpose(1, 2)

    def forward(self, x, mask, route, kv_states=None, cache: EncoderDecoderCache | None = None, is_causal=False,
                output_attentions=False, depth: int = 0):
        """`mask`: bool (batch, 1, q or 1, keys), True where attending, or `Packed` (self-attention within
        each packed input). `kv_states`: the encoder states for cross-attention. `cache`: the decoder's
        keys/values of earlier decoding steps (the entry of `depth`, the stack position this call runs at: a
        shared layer runs at several; cross-attention's are computed once).
        Returns the output and the attention weights (None unless `output_attentions`)."""
        if isinstance(mask, Packed):
            if kv_states is not None or cache is not None or is_causal or output_attentions:
                raise ValueError("packed inputs run an encoder's self-attention only, without attention weights")
            return self._packed(x, mask, route), None
        q = self._heads(self.q(x, route))
        cross = kv_states is not None
        if cache is not None and cross and cache.is_updated.get(depth):
            layer = cache.cross_attention_cache.layers[depth]
            k, v = layer.keys, layer.values  # fixed for the whole generation
        else:
            source = kv_states if cross else x
            k, v = self._heads(self.k(source, route)), self._heads(self.v(source, route))
            if cache is not None:
                own = cache.cross_attention_cache if cross else cache.self_attention_cache
                k, v = own.update(k, v, depth)
                if cross:
                    cache.is_updated[depth] = True
        # no mask at all where every key is valid, and SDPA's own causal flag, so that its efficient and flash
        # kernels stay eligible; an explicit mask only with padding (or a cache offsetting the queries)
        causal_flag = is_causal and mask is None and q.shape[2] == k.shape[2]
        if is_causal and not causal_flag and q.shape[2] > 1:
            causal = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - q.shape[2])
            mask = causal if mask is None else mask & causal
        out, weights = self._attend(q, k, v, mask, causal_flag, output_attentions)
        return self.o(out, route), weights

    def _attend(self, q, k, v, mask, is_causal=False, output_attentions=False):
        dropout = self.dropout if self.training else 0.0
        if output_attentions or self.config._attn_implementation == "eager":
            scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
            if is_causal:
                mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
            if mask is not None:
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            weights = scores.softmax(-1)
            out = F.dropout(weights, dropout, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal)
            weights = None
        b, _, n, d = out.shape
        return out.transpose(1, 2).reshape(b, n, self.num_heads * d), weights if output_attentions else None

    def _packed(self, x: torch.Tensor, packed: Packed, route: Route) -> torch.Tensor:
        q, k, v = self.q(x, route), self.k(x, route), self.v(x, route)
        out, start = [], 0
        for (batch, length), mask in zip(packed.shapes, packed.masks):
            end = start + batch * length
            heads = [self._heads(t[start:end].view(batch, length, -1)) for t in (q, k, v)]
            out.append(self._attend(*heads, mask)[0].flatten(0, 1))
            start = end
        return self.o(torch.cat(out), route)


class SkillNetLayer(GradientCheckpointingLayer):
    """Post-LayerNorm transformer layer (BERT's layout): attention, optional cross-attention, FFN block.
    Under `model.gradient_checkpointing_enable()` its activations are recomputed in the backward pass."""

    def __init__(self, config, carries_skills: bool, decoder: bool = False):
        super().__init__()
        skilled_attention = carries_skills and config.skill_attention and config.router == "skill"
        eps = config.layer_norm_eps
        self.attn = Attention(config, skilled_attention)
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.decoder = decoder
        if decoder:
            self.cross_attn = Attention(config, skilled_attention)
            self.cross_norm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.ffn = make_ffn(config, carries_skills)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x, mask, route, encoder_states=None, encoder_mask=None, cache=None,
                output_attentions=False, depth: int = 0):
        """The layer's output, its self-attention weights and its cross-attention weights (None unless
        `output_attentions`), run at stack position `depth`."""
        attended, weights = self.attn(x, mask, route, cache=cache, is_causal=self.decoder,
                                      output_attentions=output_attentions, depth=depth)
        x = self.attn_norm(x + self.dropout(attended))
        cross_weights = None
        if self.decoder:
            attended, cross_weights = self.cross_attn(x, encoder_mask, route, kv_states=encoder_states,
                                                      cache=cache, output_attentions=output_attentions,
                                                      depth=depth)
            x = self.cross_norm(x + self.dropout(attended))
        return self.ffn_norm(x + self.dropout(self.ffn(x, route))), weights, cross_weights


def padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(batch, keys) 0/1 mask -> bool (batch, 1, 1, keys) for scaled_dot_product_attention."""
    return attention_mask.bool()[:, None, None, :]

