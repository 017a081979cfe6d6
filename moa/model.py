"""`MoAForCausalLM`: every culture's LoRA inside one transformers causal LM, behind a token-level router."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from moa import compat, peft_io, saved_run
from moa.bnb import dispatch_bnb_4bit, dispatch_bnb_8bit
from moa.config import ALL_LINEAR, ROUTING_MODES, BaseModelConfig, MoAConfig
from moa.errors import UsageError
from moa.layers import MoALinear, dispatch_default
from moa.routing import NO_CULTURE, PlanCache, RoutingCall, TokenRouter, current_call, replay_routing_context, routing_call


@dataclass
class MoACausalLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    router_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    router_logits: tuple | None = None  # one [B, S, K] tensor per decoder layer
    cache: object | None = None  # the base model's KV cache (transformers' `past_key_values` before 5.24)


class MoADecoderLayer(nn.Module):
    """A decoder layer behind its culture gate: route the tokens, then run the layer with that plan.

    Every layer's gate reads the routing step's input (the token embeddings, the decoder stack's
    input), not its own input: below layer l the adapters already chosen have written their culture
    into the residual stream, and a gate reading it would learn to follow them (under gold routing in
    training it reads the answer) instead of the text's cues.
    """

    def __init__(self, layer: nn.Module, router: TokenRouter, owner: object):
        super().__init__()
        self.layer = layer
        self.router = router
        self.owner = owner

    def forward(self, hidden_states, *args, **kwargs):
        call = current_call(self.owner)
        if call is None:
            return self.layer(hidden_states, *args, **kwargs)
        batch, seq = hidden_states.shape[:2]
        if not call.gates_run:
            plan, weights = call.oracle_plan(batch, seq, hidden_states.device), None
        else:
            logits = call.gate(self.router, compat.layer_cache(kwargs))
            if call.collect_logits:
                call.router_logits.append(logits)
            plan, weights = call.route(logits)
        with call.running(plan, weights):
            return self.layer(hidden_states, *args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name not in compat.LAYER_ATTRIBUTES:  # only what the base model reads off its layers
                raise
            return getattr(self._modules["layer"], name)


def wrap_linear(target: nn.Module, **kwargs) -> MoALinear:
    """The MoA wrapper for `target`, chosen by the first dispatcher that accepts it."""
    for dispatch in (dispatch_bnb_4bit, dispatch_bnb_8bit, dispatch_default):
        wrapped = dispatch(target, **kwargs)
        if wrapped is not None:
            return wrapped
    raise TypeError(f"cannot adapt module of type {type(target).__name__}: expected torch.nn.Linear or a "
                    f"bitsandbytes Linear4bit/Linear8bitLt")


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def _linear_names(layer: nn.Module) -> list[str]:
    """The names (last components) of the linear layers in a decoder layer: torch Linear and its subclasses
    (bitsandbytes' Linear4bit and Linear8bitLt), and MoA's wrappers of them."""
    return sorted({name.rpartition(".")[2] for name, module in layer.named_modules()
                   if name and isinstance(module, (nn.Linear, MoALinear))})


class MoAForCausalLM(nn.Module):
    """A causal LM whose target projections hold K culture LoRAs, selected per token by a learned router.

    Build with `from_base(base_model, config)`; the base model is modified in place (its target
    linears wrapped, its decoder layers put behind gates) and frozen.
    """

    def __init__(self, base_model: nn.Module, config: MoAConfig):
        super().__init__()
        self.base_model = base_model
        self.config = config
        self.routing_key = object()  # tags this model's routing calls
        self.lora_layers: dict[str, MoALinear] = {}  # original module name -> wrapper
        self.routers = nn.ModuleList()
        self._oracle_plans = PlanCache()  # oracle plans shared by this model's calls

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_base(cls, base_model: nn.Module, config: MoAConfig) -> "MoAForCausalLM":
        if not isinstance(config, MoAConfig):
            raise TypeError(f"config must be a moa.MoAConfig, got {type(config).__name__}")
        layers, layers_name = compat.decoder_layers(base_model)
        if config.target_modules == [ALL_LINEAR]:  # as PEFT does: the names it stands for are what the run saves
            config = dataclasses.replace(config, target_modules=_linear_names(layers[0]))
        model = cls(base_model, config)
        for p in base_model.parameters():
            p.requires_grad_(False)
        hidden = base_model.config.hidden_size
        generator = torch.Generator().manual_seed(config.seed)
        seen_targets = set()
        for index, layer in enumerate(list(layers)):
            prefix = f"{layers_name}.{index}"
            for name, module in list(layer.named_modules()):
                if not name or not _matches(name, config.target_modules):
                    continue
                seen_targets.update(t for t in config.target_modules if name == t or name.endswith("." + t))
                wrapped = wrap_linear(module, num_adapters=config.num_cultures, r=config.r, scaling=config.scaling,
                                      dropout=config.dropout, owner=model.routing_key, generator=generator)
                device = next(module.parameters()).device
                for param in (wrapped.lora_A_T, wrapped.lora_B_T):
                    param.data = param.data.to(device)
                parent = layer.get_submodule(name.rpartition(".")[0]) if "." in name else layer
                setattr(parent, name.rpartition(".")[2], wrapped)
                model.lora_layers[f"{prefix}.{name}"] = wrapped
            router = TokenRouter(hidden, config.num_cultures, index, config.router_window, config.router_dim, generator)
            router.to(next(layer.parameters()).device)
            model.routers.append(router)
            layers[index] = MoADecoderLayer(layer, router, model.routing_key)
        missing = [t for t in config.target_modules if t not in seen_targets]
        if missing:
            raise ValueError(f"target_modules {missing} match no linear layer in {type(base_model).__name__}'s decoder "
                             f"layers; linear layers there: {_linear_names(layers[0].layer)}")
        base_model.register_forward_pre_hook(model._begin_routing_step, with_kwargs=True)
        return model

    def _begin_routing_step(self, module, args, kwargs):
        """Every forward of the base model is one routing step (transformers' `generate` runs one per new
        token): the routing call in progress, if any, begins it with that forward's token embeddings and mask."""
        call = current_call(self.routing_key)
        if call is None or not call.gates_run:
            return
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds") if input_ids is None else self.base_model.get_input_embeddings()(input_ids)
        call.begin_step(embeds, compat.forward_attention_mask(kwargs))

    # ------------------------------------------------------------------ routing inputs
    @property
    def device(self) -> torch.device:
        return next(self.base_model.parameters()).device

    def culture_ids(self, cultures) -> torch.Tensor:
        """LongTensor [B] of culture ids from names, ints (-1 = base model) or a tensor; range-checked."""
        return self._culture_ids(cultures)[0]

    def _culture_ids(self, cultures) -> tuple[torch.Tensor, tuple]:
        """(ids [B] on the model's device, the same ids as a tuple of ints)."""
        if isinstance(cultures, torch.Tensor):
            if cultures.dtype.is_floating_point or cultures.dim() != 1:
                raise ValueError(f"culture_ids must be an integer tensor of shape [B], got {cultures.dtype} {tuple(cultures.shape)}")
            values = tuple(self.config.culture_id(c) for c in cultures.tolist())
            return cultures.to(self.device, torch.long), values
        values = tuple(self.config.culture_id(c) for c in cultures)
        return torch.tensor(values, dtype=torch.long, device=self.device), values

    def _routing_call(self, routing, culture_ids, top_k, batch, collect_logits=True) -> RoutingCall:
        culture_key = None
        if culture_ids is not None:
            culture_ids, culture_key = self._culture_ids(culture_ids)
            if culture_ids.shape[0] != batch:
                raise ValueError(f"culture_ids has {culture_ids.shape[0]} entries but the batch has {batch} rows")
        if routing is None:
            gold = culture_ids is not None and self.config.train_routing == "gold"
            routing = "oracle" if gold else "router"
        if routing not in ROUTING_MODES:
            raise ValueError(f"unknown routing {routing!r}: expected one of {ROUTING_MODES}")
        if routing == "oracle" and culture_ids is None:
            raise ValueError("routing='oracle' needs culture_ids (one culture per row)")
        top_k = self.config.top_k if top_k is None else top_k
        if routing == "topk" and not 1 <= top_k <= self.config.num_cultures:
            raise ValueError(f"top_k must be in 1..{self.config.num_cultures}, got {top_k}")
        return RoutingCall(owner=self.routing_key, mode=routing, num_cultures=self.config.num_cultures,
                           culture_ids=culture_ids, culture_key=culture_key, top_k=top_k, collect_logits=collect_logits,
                           oracle_plans=self._oracle_plans)

    # ------------------------------------------------------------------ forward / generate
    def forward(self, input_ids=None, attention_mask=None, labels=None, culture_ids=None, routing=None, top_k=None,
                **kwargs) -> MoACausalLMOutput:
        """Forward with routing.

        routing: 'oracle' (every token of row b uses culture_ids[b]), 'router' (top-1 of each layer's
        gate), 'topk' (renormalised top-k mix). None: with culture_ids, `config.train_routing`
        decides ('gold' -> oracle, 'router' -> router); without, 'router'.
        `router_logits` holds one [B, S, K] tensor per layer whenever the gates run: always in
        'router'/'topk', and in 'oracle' when labels are given or autograd is on.
        """
        ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        call = self._routing_call(routing, culture_ids, top_k, ref.shape[0])
        # in 'oracle' mode the gates run only when a router loss can follow (labels given, or training)
        call.collect_logits = call.mode != "oracle" or labels is not None or torch.is_grad_enabled()
        with routing_call(call):
            out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        router_loss = self.router_loss(call.router_logits, call.culture_ids, attention_mask)
        loss = self.joint_loss(out.loss, router_loss)
        return MoACausalLMOutput(loss=loss, lm_loss=out.loss, router_loss=router_loss, logits=out.logits,
                                 router_logits=tuple(call.router_logits), cache=compat.output_cache(out))

    def joint_loss(self, lm_loss, router_loss):
        """The training objective lm_loss + router_loss_weight * router_loss; either alone when the other
        is None, None when both are."""
        if lm_loss is None or router_loss is None:
            return lm_loss if lm_loss is not None else router_loss
        return lm_loss + self.config.router_loss_weight * router_loss

    @staticmethod
    def router_loss(router_logits, targets, attention_mask=None):
        """Every attended token's gate against its row's target, averaged over tokens and layers: cross-entropy
        against a culture id, or, for `NO_CULTURE` (the prompt names no culture), the KL divergence from the
        uniform distribution over the cultures, so the gates learn to say they do not know. Both are zero at
        their optimum. Rows with target -1 are left out.

        The gate is trained on the prompt as well as the response: at a prompt's last token it picks
        the adapter the whole answer is generated with. None when there is nothing to supervise.
        """
        if targets is None or not router_logits:
            return None
        batch, seq, k = router_logits[0].shape
        if attention_mask is not None:
            mask = attention_mask.bool()
        else:
            mask = torch.ones(batch, seq, dtype=torch.bool, device=targets.device)
        mask = mask & ((targets[:, None] >= 0) | (targets[:, None] == NO_CULTURE))
        if not bool(mask.any()):
            return None
        target = targets[:, None].expand(batch, seq)[mask]
        wanted = torch.where((target >= 0)[:, None], F.one_hot(target.clamp(min=0), k).float(), 1.0 / k)
        entropy = torch.special.entr(wanted).sum(-1)  # 0 for a culture, log k for NO_CULTURE
        losses = [(-(wanted * logits[mask].float().log_softmax(-1)).sum(-1) - entropy).mean() for logits in router_logits]
        return torch.stack(losses).mean()

    @torch.no_grad()
    def route_probs(self, input_ids, attention_mask=None) -> torch.Tensor:
        """[B, S, K]: each token's culture distribution, the gates' softmax averaged over layers.

        The gates read the decoder stack's input, RMS-normalised, so only the embedding layer runs:
        routing a prompt costs no forward pass through the decoder layers.
        """
        hidden = self.base_model.get_input_embeddings()(input_ids)
        return torch.stack([router(hidden, attention_mask)[0].float().softmax(-1) for router in self.routers]).mean(0)

    @torch.no_grad()
    def route_sequences(self, input_ids, attention_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(culture ids [B], confidence [B]): the router's choice per row, read at its last attended token.

        The gate averages the layer input over the tokens so far, so the last token's
        distribution reflects the whole prompt. Left or right padding both work.
        """
        probs = self.route_probs(input_ids, attention_mask)
        if attention_mask is None:
            last = torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=probs.device)
        else:
            positions = torch.arange(input_ids.shape[1], device=probs.device)
            last = (attention_mask.to(probs.device).bool() * positions).amax(1)
        row = probs[torch.arange(probs.shape[0], device=probs.device), last]
        confidence, ids = row.max(-1)
        return ids, confidence

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, culture_ids=None, routing="router", top_k=None, **kwargs):
        """transformers `generate` (KV cache on) with the routing applied to every prompt and new token."""
        if kwargs.get("num_beams", 1) > 1:
            raise ValueError(f"num_beams={kwargs['num_beams']} is not supported: routing state follows rows, use num_beams=1")
        call = self._routing_call(routing, culture_ids, top_k, input_ids.shape[0], collect_logits=False)
        with routing_call(call):
            return self.base_model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def gradient_checkpointing_enable(self):
        """Activation checkpointing of the decoder layers (non-reentrant); the recompute during
        backward replays each layer's routing. Enable it here, not on the base model directly."""
        compat.enable_activation_checkpointing(self.base_model, {"use_reentrant": False, "context_fn": replay_routing_context})

    # ------------------------------------------------------------------ weights
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Every culture adapter and router weight, keyed by the base model's module names."""
        state = {}
        for name, layer in self.lora_layers.items():
            state[f"{name}.lora_A"] = layer.lora_A
            state[f"{name}.lora_B"] = layer.lora_B
        for index, router in enumerate(self.routers):
            for pname, p in router.named_parameters():
                state[f"routers.{index}.{pname}"] = p
        return state

    @torch.no_grad()
    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]):
        own = self.adapter_state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"adapter weights do not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for key, tensor in state.items():
            if tuple(tensor.shape) != tuple(own[key].shape):
                raise ValueError(f"{key}: shape {tuple(tensor.shape)} does not fit the model's {tuple(own[key].shape)}")
            own[key].copy_(tensor.to(own[key].device, own[key].dtype))

    @torch.no_grad()
    def load_cultures_from(self, path: str | Path) -> list[str]:
        """Copy from a saved run the adapters and gate rows of the cultures it shares with this model (by name) and
        its shared router weights; the other cultures keep their fresh slots. Returns the cultures copied. The run
        must have this model's rank, scaling, targets and router shape."""
        source = saved_run.read_config(path)
        for name in ("r", "alpha", "target_modules", "router_window", "router_dim"):
            if getattr(source, name) != getattr(self.config, name):
                raise UsageError(f"{path}: {name} is {getattr(source, name)!r} there but {getattr(self.config, name)!r} "
                                 f"here: a run grows only with the same {name}")
        weights = saved_run.read_weights(path, source)
        own = self.adapter_state_dict()
        if set(weights) != set(own):
            raise UsageError(f"{path}: its adapters do not fit this base model (e.g. {sorted(set(weights) ^ set(own))[:3]})")
        shared = [c for c in self.config.cultures if c in source.cultures]
        for key, tensor in weights.items():
            if saved_run.per_culture(key):
                for culture in shared:
                    own[key][self.config.cultures.index(culture)] = tensor[source.cultures.index(culture)].to(own[key])
            else:
                own[key].copy_(tensor.to(own[key]))
        return shared

    def freeze_cultures(self, cultures: list[str]) -> None:
        """Keep these cultures' adapters as they are in training: their slots' gradients are zeroed, so under Adam
        without weight decay their weights stay bitwise unchanged. The router is not frozen."""
        frozen = torch.zeros(self.config.num_cultures, dtype=torch.bool)
        frozen[[self.config.culture_id(c, base=False) for c in cultures]] = True
        if not frozen.any():
            return
        for layer in self.lora_layers.values():
            for param in (layer.lora_A_T, layer.lora_B_T):
                mask = frozen.view(-1, 1, 1).to(param.device)
                param.register_hook(lambda grad, mask=mask: grad.masked_fill(mask, 0))

    def save_pretrained(self, path: str | Path, base_spec: BaseModelConfig | None = None, tokenizer=None):
        """Write a saved run (see moa.saved_run): the config and the adapters and routers, not the base, atomically.

        With `base_spec` it also holds base_model.json, so `moa.base_model.load_moa(path)` rebuilds the whole model;
        with `tokenizer` the tokenizer's files, so `AutoTokenizer.from_pretrained(path)` loads it."""
        base_name = getattr(getattr(self.base_model, "config", None), "_name_or_path", "")
        saved_run.save(path, self.config, self.adapter_state_dict(), base_spec, str(base_name), tokenizer)

    @classmethod
    def from_pretrained(cls, path: str | Path, base_model: nn.Module) -> "MoAForCausalLM":
        """Wrap `base_model` (modified in place) with the adapters and routers of a saved run."""
        config = saved_run.read_config(path)
        model = cls.from_base(base_model, config)
        model.load_adapter_state_dict(saved_run.read_weights(path, config))
        return model

    def load_peft_adapter(self, peft_dir: str | Path, culture: str | int):
        """Read a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) into one culture slot."""
        peft_io.load_peft_adapter(self, peft_dir, culture)

    def export_peft_adapter(self, culture: str | int, out_dir: str | Path):
        """Write one culture's adapter as a PEFT LoRA directory that `peft.PeftModel.from_pretrained` loads."""
        peft_io.export_peft_adapter(self, culture, out_dir)
