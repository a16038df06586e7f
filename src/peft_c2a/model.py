"""Tuner models: inject bottleneck adapters (plain or C2A) into a transformers model, PEFT-style.

`BottleneckAdapterModel` and `C2AModel` are `peft.tuners.tuners_utils.BaseTuner` subclasses; `get_peft_model`,
`PeftModel.from_pretrained`, `save_pretrained`, `set_adapter`, `delete_adapter` and `disable_adapter()` work as for any
PEFT method once `import peft_c2a` has registered them. C2A keeps its hypernetworks on the tuner (one per adapter
name, saved once as `base_model.c2a_hypernet.*`) and conditions them through a forward pre-hook on the wrapped model
that consumes the `label_distribution=` / `client_ids=` keyword arguments.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from .conditioning import DESCRIPTOR_KWARGS, C2AConditioning, bind_forward_arguments
from .config import CLASSIFICATION_TASKS, C2AConfig, _AdapterSitesConfig
from .heads import classification_head, named_labels, resize_classifier_head
from .hypernetwork import C2AHyperNetwork, refuse_first_version_state
from .layer import BottleneckAdapterLayer, C2ALayer, C2ALoraLayer
from .sites import (
    NUM_SITE_KINDS,
    TARGET_MODULES_BY_MODEL_TYPE,
    default_lora_targets,
    in_features,
    is_adaptable,
    out_features,
    plan_sites,
    unknown_architecture_error,
)

logger = logging.getLogger(__name__)


class _BottleneckTunerBase(BaseTuner):
    """What both adapter tuners share: default sites, no merging."""

    target_module_mapping = TARGET_MODULES_BY_MODEL_TYPE

    def _prepare_adapter_config(self, peft_config: _AdapterSitesConfig, model_config: dict) -> _AdapterSitesConfig:
        if peft_config.target_modules is None:
            model_type = model_config.get("model_type")
            if getattr(peft_config, "adapter_kind", "bottleneck") == "lora":
                target_modules = default_lora_targets(model_type)
            else:
                target_modules = self.target_module_mapping.get(model_type)
            if target_modules is None:
                linear_names = [name for name, module in self.model.named_modules() if is_adaptable(module)]
                raise unknown_architecture_error(model_type, linear_names)
            peft_config.target_modules = set(target_modules)
        return peft_config

    def _check_merge_allowed(self) -> None:
        raise ValueError(
            f"{type(self).__name__} cannot be merged into the base weights: bottleneck adapters are non-linear. "
            "Use `unload()` to remove the adapters instead."
        )

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: Optional[dict[str, torch.Tensor]] = None,
    ) -> None:
        # Check every matched module BEFORE PEFT starts replacing modules, so a bad `target_modules` raises with the
        # user's model untouched.
        config = self.peft_config[adapter_name]
        self._prepare_adapter_config(config, self.get_model_config(model))
        targets = self._targets(config, model)
        if not targets and state_dict is None:
            linear_names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if is_adaptable(m)})
            wanted = sorted(config.target_modules) if isinstance(config.target_modules, set) else config.target_modules
            raise ValueError(
                f"`target_modules` {wanted!r} matched no module of the model "
                f"(layers_to_transform={config.layers_to_transform}). Linear modules seen: {linear_names}; "
                "point `target_modules` at the attention and feed-forward output projections."
            )
        self._before_inject(config, model, adapter_name, targets)
        try:
            super().inject_adapter(
                model,
                adapter_name,
                autocast_adapter_dtype=autocast_adapter_dtype,
                low_cpu_mem_usage=low_cpu_mem_usage,
                state_dict=state_dict,
            )
        except Exception:
            self._after_failed_inject(adapter_name)
            raise

    def _before_inject(
        self, config: _AdapterSitesConfig, model: nn.Module, adapter_name: str, targets: list[tuple[str, nn.Module]]
    ) -> None:
        """Hook for shared state that must exist before layers are created."""

    def _after_failed_inject(self, adapter_name: str) -> None:
        """Hook to drop what `_before_inject` built when injection fails."""

    def _targets(self, peft_config: _AdapterSitesConfig, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The (name, base module) pairs this config adapts, in model order; non-linear matches raise."""
        found = []
        for key, module in model.named_modules():
            if not key or not self._check_target_module_exists(peft_config, key):
                continue
            if isinstance(module, BaseTunerLayer):
                module = module.get_base_layer()
            if not is_adaptable(module):
                raise ValueError(
                    f"Target module {key!r} is a {type(module).__name__}; bottleneck adapters wrap linear output "
                    "projections (nn.Linear or Conv1D). Check `target_modules`."
                )
            found.append((key, module))
        return found


class BottleneckAdapterModel(_BottleneckTunerBase):
    """Plain bottleneck adapters (Houlsby-style, at attention and feed-forward outputs) as a PEFT tuner.

    Example:

        ```py
        >>> import peft_c2a  # registers the "BOTTLENECK" and "C2A" peft types
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, peft_c2a.BottleneckAdapterConfig(bottleneck_dim=16))
        ```
    """

    prefix: str = "bottleneck_"
    tuner_layer_cls = BottleneckAdapterLayer

    def _create_and_replace(
        self,
        peft_config: _AdapterSitesConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if isinstance(target, BottleneckAdapterLayer):
            target.update_layer(adapter_name, peft_config, inference_mode=peft_config.inference_mode)
            return
        new_module = BottleneckAdapterLayer(target, adapter_name, peft_config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)


class C2AModel(_BottleneckTunerBase):
    """C2A: client-customized bottleneck adapters generated by one shared hypernetwork, as a PEFT tuner.

    Use through `peft.get_peft_model(model, C2AConfig(...))`. Forward calls take the client descriptor as extra
    keyword arguments, `label_distribution=` (`(batch, num_labels)` or `(num_labels,)`, counts or probabilities) and
    `client_ids=` (`(batch,)`, when `num_clients` is set). A descriptor missing at inference means an unknown client
    (uniform label distribution, no client-id term); missing while training raises `ValueError`.

    Attributes:
        c2a_hypernet (`nn.ModuleDict`): the hypernetwork of each adapter name.
    """

    prefix: str = "c2a_"
    tuner_layer_cls = C2ALayer
    uses_shared_state: bool = True

    # ------------------------------------------------------------------ injection
    def _before_inject(
        self, config: C2AConfig, model: nn.Module, adapter_name: str, targets: list[tuple[str, nn.Module]]
    ) -> None:
        model_labels = getattr(getattr(model, "config", None), "num_labels", None)
        if config.num_labels is None and config.task_type in CLASSIFICATION_TASKS and model_labels:
            # a classifier's clients are described by their label distribution over the classes it predicts
            config.num_labels = int(model_labels)
        if config.task_type in CLASSIFICATION_TASKS and model_labels and model_labels != config.num_labels:
            # the head is the adapter's (`modules_to_save`: saved with it, loaded from it), so size it to the adapter
            heads = config.modules_to_save or ()
            if not (heads and resize_classifier_head(model, heads, config.num_labels, config.label_names)):
                raise ValueError(
                    f"C2AConfig(num_labels={config.num_labels}) does not match the model's {model_labels} labels; the "
                    "label distribution must describe the classes the model predicts. Build the base model with "
                    f"num_labels={config.num_labels}: e.g. AutoModelForSequenceClassification.from_pretrained(base, "
                    f"num_labels={config.num_labels}) before get_peft_model / PeftModel.from_pretrained."
                )
            # loading for inference is the usual case and is quiet; a trainable head is fresh and should be known
            log = logger.info if config.inference_mode else logger.warning
            log(
                "Sized the model's classifier from %d to C2AConfig's %d labels: its weights are the adapter's when "
                "one is loaded, else it is trained from scratch.",
                model_labels,
                config.num_labels,
            )
        if config.label_names is None and config.task_type in CLASSIFICATION_TASKS:
            config.label_names = named_labels(getattr(model, "config", None), config.num_labels)
        lora = config.adapter_kind == "lora"
        kinds = {other.adapter_kind for name, other in self.peft_config.items() if name != adapter_name}
        if kinds - {config.adapter_kind}:
            raise ValueError(
                f"This model's C2A adapters are of kind {sorted(kinds)}; one model holds one `adapter_kind`."
            )
        plan = plan_sites(model, targets, config.use_context, config.causal_context, per_target_kinds=lora)
        # `add_adapter` and `load_adapter` call `inject_adapter` directly (not `_pre_injection_hook`), so the shared
        # hypernetwork is built here, after every check and before PEFT walks the model and creates the layers.
        hypernetwork = C2AHyperNetwork.from_config(
            config,
            hidden_size=max((in_features if lora else out_features)(module) for _, module in targets),
            output_size=max(out_features(module) for _, module in targets),
            num_layers=1 + max(site.layer_id for site in plan.values()),
            num_site_kinds=1 + max(site.kind for site in plan.values()) if lora else NUM_SITE_KINDS,
        )
        # under PEFT's `low_cpu_mem_usage=True` it is built on the meta device and the adapter's weights are assigned
        # to it when they load; a meta tensor cannot be copied anywhere
        if not any(param.is_meta for param in hypernetwork.parameters()):
            hypernetwork.to(next((p.device for p in model.parameters()), torch.device("cpu")))
        if "c2a_hypernet" not in self._modules:
            self.c2a_hypernet = nn.ModuleDict()
            self.c2a_hypernet._register_load_state_dict_pre_hook(refuse_first_version_state)
            self._c2a_conditioning = C2AConditioning(self.c2a_hypernet, self.active_adapters)
            self._install_descriptor_plumbing(model)
        self._c2a_plan = plan
        self.c2a_hypernet[adapter_name] = hypernetwork

    def _after_failed_inject(self, adapter_name: str) -> None:
        # nothing half-built stays behind, and a model left without C2A adapters keeps no hooks of ours
        if "c2a_hypernet" not in self._modules:
            return
        if adapter_name in self.c2a_hypernet:
            del self.c2a_hypernet[adapter_name]
        if not len(self.c2a_hypernet):
            self._remove_descriptor_plumbing()
            del self.c2a_hypernet

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        self._sync_hypernet_grad()

    def _create_and_replace(
        self,
        peft_config: C2AConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        site = self._c2a_plan[current_key]
        if isinstance(target, C2ALayer):
            target.update_layer(adapter_name, peft_config, site, inference_mode=peft_config.inference_mode)
            return
        layer_cls = C2ALoraLayer if peft_config.adapter_kind == "lora" else C2ALayer
        new_module = layer_cls(
            target, adapter_name, peft_config, self.c2a_hypernet, self._c2a_conditioning, current_key, site
        )
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    # ------------------------------------------------------------------ descriptor plumbing
    def _install_descriptor_plumbing(self, model: nn.Module) -> None:
        """Forward pre-hooks that consume the descriptor kwargs, and a `generate` that accepts them.

        The hooks sit on the wrapped model itself, so the descriptor reaches the layers whichever PEFT wrapper (or
        none) calls it. `generate` is overridden on the model instance because plain `PeftModel.generate` calls the
        base model's `generate` directly, which would reject the descriptor kwargs.
        """
        conditioning = self._c2a_conditioning

        def adjust_logits(module: nn.Module, args: tuple, output: Any) -> Any:
            offsets = conditioning.state.logit_offsets
            if offsets is None or not isinstance(output, torch.Tensor) or output.shape[-1] != offsets.shape[-1]:
                return None  # no adjustment, or not class scores (a regression head)
            if output.dim() == 3:  # per position: token classification, or a decoder's score before pooling
                offsets = offsets.unsqueeze(1)
            if offsets.shape[0] not in (1, output.shape[0]):
                raise ValueError(
                    f"The client descriptor has {offsets.shape[0]} rows but the classifier scored {output.shape[0]} "
                    "examples; pass one row per example or a single row for the whole batch."
                )
            return output + offsets.to(device=output.device, dtype=output.dtype)

        def hook_classification_head() -> None:
            # PEFT wraps the head in a ModulesToSaveWrapper after injection, so the hook goes on whatever module is
            # the head at forward time (and moves if the head is replaced)
            head = classification_head(model)
            if head is self._c2a_hooked_head:
                return
            if self._c2a_head_hook is not None:
                self._c2a_head_hook.remove()
            self._c2a_head_hook = head.register_forward_hook(adjust_logits) if head is not None else None
            self._c2a_hooked_head = head

        def before_forward(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            descriptor = {name: kwargs.pop(name) for name in DESCRIPTOR_KWARGS if name in kwargs}
            hook_classification_head()
            conditioning.begin_forward(bind_forward_arguments(module, args, kwargs), descriptor, module.training)
            conditioning.in_forward = True
            return args, kwargs

        def after_forward(module: nn.Module, args: tuple, output: Any) -> None:
            conditioning.in_forward = False

        def before_encoder(module: nn.Module, args: tuple, kwargs: dict) -> None:
            # generate() runs the encoder of a seq2seq model on its own: take its mask, and its descriptor from the
            # default one that `generate(label_distribution=..., client_ids=...)` set
            conditioning.begin_encoder_forward(bind_forward_arguments(module, args, kwargs), module.training)

        self._c2a_head_hook, self._c2a_hooked_head = None, None
        self._c2a_hooks = [
            model.register_forward_pre_hook(before_forward, with_kwargs=True),
            model.register_forward_hook(after_forward, always_call=True),
        ]
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
            encoder = model.get_encoder()
            self._c2a_hooks.append(encoder.register_forward_pre_hook(before_encoder, with_kwargs=True))
        self._c2a_model_generate = getattr(model, "generate", None)
        if self._c2a_model_generate is not None:
            model.generate = self.generate

    def _remove_descriptor_plumbing(self) -> None:
        for hook in self._c2a_hooks:
            hook.remove()
        self._c2a_hooks = []
        if self._c2a_head_hook is not None:
            self._c2a_head_hook.remove()
        self._c2a_head_hook, self._c2a_hooked_head = None, None
        if "generate" in vars(self.model):
            del self.model.generate

    @contextmanager
    def client_descriptor(self, label_distribution: Any = None, client_ids: Any = None) -> Iterator[None]:
        """Condition every forward inside the block on this client descriptor, unless a call passes its own.

        For code that cannot pass extra keyword arguments, such as `transformers` pipelines:

            ```py
            >>> with peft_model.client_descriptor(label_distribution=[10, 0, 3, 1, 6]):
            ...     pipe("A headline to classify")
            ```
        """
        with self._c2a_conditioning.descriptor(label_distribution=label_distribution, client_ids=client_ids):
            yield

    def generate(self, *args: Any, label_distribution: Any = None, client_ids: Any = None, **kwargs: Any) -> Any:
        """`generate()` of the wrapped model, conditioned on a client descriptor (one row, or one per prompt)."""
        generation_config = kwargs.get("generation_config") or getattr(self.model, "generation_config", None)
        num_beams = kwargs.get("num_beams") or getattr(generation_config, "num_beams", None) or 1
        active = [name for name in self.active_adapters if name in self.c2a_hypernet]
        causal_context = any(
            self.peft_config[name].use_context and layer.c2a_causal.get(name)
            for layer in self._c2a_layers()
            for name in active
        )
        if num_beams > 1 and causal_context:
            raise ValueError(
                "Beam search is not supported with C2A's causal context term (its running context is not reordered "
                "with the beams). Use greedy search or sampling, or `use_context=False`."
            )
        # generate() repeats each prompt max(num_beams, num_return_sequences) times; per-prompt descriptors follow
        return_sequences = kwargs.get("num_return_sequences") or getattr(generation_config, "num_return_sequences", 1)
        repeats = max(num_beams, return_sequences or 1)
        label_distribution = _repeat_rows(label_distribution, repeats, per_prompt_dims=2)
        client_ids = _repeat_rows(client_ids, repeats, per_prompt_dims=1)
        if self._c2a_model_generate is None:
            raise TypeError(f"{type(self.model).__name__} has no `generate` method.")
        with self._c2a_conditioning.descriptor(label_distribution=label_distribution, client_ids=client_ids):
            return self._c2a_model_generate(*args, **kwargs)

    def export_adapter(
        self,
        save_directory: str | os.PathLike,
        label_distribution: Any = None,
        client_ids: Any = None,
        adapter_name: str = "default",
    ) -> Path:
        """Write one client's adapter as a static adapter that `PeftModel.from_pretrained` loads: `BOTTLENECK`, or a
        plain PEFT LoRA for `adapter_kind="lora"` (`peft_c2a.export.export_static_adapter`); exact for adapters
        without the context term."""
        from .export import export_static_adapter  # export builds on this module

        return export_static_adapter(self, save_directory, label_distribution, client_ids, adapter_name)

    def _c2a_layers(self) -> Iterator[C2ALayer]:
        return (module for module in self.model.modules() if isinstance(module, C2ALayer))

    # ------------------------------------------------------------------ adapter bookkeeping
    def _sync_hypernet_grad(self, enabled: bool = True) -> None:
        """Hypernetworks live on the tuner, outside PEFT's layer bookkeeping: train exactly the active ones."""
        active = set(self.active_adapters)
        for name, hyper in self.c2a_hypernet.items():
            trainable = enabled and name in active and not self.peft_config[name].inference_mode
            hyper.requires_grad_(trainable)
        self._c2a_conditioning.active_adapters = [name for name in self.active_adapters if name in self.c2a_hypernet]

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        self._sync_hypernet_grad()
        if inference_mode:
            for name in self.active_adapters:
                self.c2a_hypernet[name].requires_grad_(False)

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)
        self._sync_hypernet_grad(enabled)
        # the logit adjustment is part of the adapter: `disable_adapter()` gives exactly the base model
        self._c2a_conditioning.adapters_enabled = enabled

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        del self.c2a_hypernet[adapter_name]
        self._c2a_conditioning.forget_adapter(adapter_name)
        self._sync_hypernet_grad()

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any) -> nn.Module:
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        self._remove_descriptor_plumbing()
        return model

    # ------------------------------------------------------------------ state dict keys
    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # hypernetwork keys carry the adapter name in the middle: base_model.c2a_hypernet.<name>.up_gain
        marker = f"c2a_hypernet.{adapter_name}."
        if marker in key:
            return key.replace(marker, "c2a_hypernet.", 1)
        return super()._remove_adapter_name_from_key(key, adapter_name)


def _repeat_rows(value: Any, repeats: int, per_prompt_dims: int) -> Any:
    """Repeat per-prompt descriptor rows like generate() repeats prompts; a shared descriptor stays as it is."""
    if value is None or repeats == 1:
        return value
    tensor = torch.as_tensor(value)
    if tensor.dim() < per_prompt_dims:
        return tensor  # one descriptor for the whole batch broadcasts anyway
    return tensor.repeat_interleave(repeats, dim=0)
