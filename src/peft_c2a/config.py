"""Configurations of the two tuner types this package adds to PEFT.

`BottleneckAdapterConfig` describes plain bottleneck adapters (learned weights, the natural baseline that PEFT lacks);
`C2AConfig` describes the same adapters with weights generated per client by a shared hypernetwork. Both place the
adapters at the output projections of the attention and feed-forward blocks of every targeted layer, and both register
themselves with PEFT on `import peft_c2a` under plain string types (`"BOTTLENECK"`, `"C2A"`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig

C2A_PEFT_TYPE = "C2A"
BOTTLENECK_PEFT_TYPE = "BOTTLENECK"
ADAPTER_KINDS = ("bottleneck", "lora")
# task types whose outputs are class scores: C2A's label term and logit adjustment are over these classes
CLASSIFICATION_TASKS = ("SEQ_CLS", "TOKEN_CLS")


@dataclass
class _AdapterSitesConfig(PeftConfig):
    """Fields shared by both adapter configs: where adapters sit and what shape they have."""

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": (
                "Output projections of the attention and feed-forward blocks to adapt, as module-name suffixes or one "
                "regex. Resolved automatically for known architectures."
            )
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex of modules not to adapt."}
    )
    target_parameters: Optional[list[str]] = field(
        default=None, metadata={"help": "Unsupported by bottleneck adapters; kept for PEFT's config protocol."}
    )
    bottleneck_dim: int = field(default=16, metadata={"help": "Bottleneck width r of every adapter."})
    adapter_activation: str = field(
        default="relu", metadata={"help": "Activation inside the bottleneck (any key of `transformers.activations`)."}
    )
    adapter_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input while training."})
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt the layers with these indices."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Name of the layer list (`layer`, `h`, `layers` ...) for `layers_to_transform`."},
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Extra modules trained fully and saved with the adapter (task heads are added by PEFT)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.target_parameters:
            raise ValueError(f"{type(self).__name__} adapts module outputs; `target_parameters` is not supported.")
        if self.bottleneck_dim <= 0:
            raise ValueError(f"`bottleneck_dim` must be a positive integer, got {self.bottleneck_dim}.")
        if not 0.0 <= self.adapter_dropout < 1.0:
            raise ValueError(f"`adapter_dropout` must be in [0, 1), got {self.adapter_dropout}.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")
        from transformers.activations import ACT2FN

        if self.adapter_activation not in ACT2FN:
            raise ValueError(
                f"Unknown `adapter_activation` {self.adapter_activation!r}; choose one of {sorted(ACT2FN)}."
            )


@dataclass
class BottleneckAdapterConfig(_AdapterSitesConfig):
    """Configuration of plain bottleneck adapters (peft type `"BOTTLENECK"`).

    Each targeted output projection `h = W x` becomes `h + act(h W_down + b1) W_up + b2` with learned `W_down: d x r`
    and `W_up: r x d`. `W_up` and `b2` start at zero, so a freshly wrapped model equals its base model.

    Args:
        target_modules (`set[str] | str`, *optional*):
            Module-name suffixes (or one regex) of the attention and feed-forward output projections to adapt. Left
            unset, they are resolved from the model type (BERT, RoBERTa, XLM-R, DistilBERT, ELECTRA, DeBERTa-v2,
            GPT-2, Llama, Mistral, Qwen2, T5 and a few relatives); other architectures raise a `ValueError` that lists
            the module names seen.
        exclude_modules (`set[str] | str`, *optional*):
            Module names (or one regex) never to adapt, even when matched by `target_modules`.
        target_parameters (`list[str]`, *optional*):
            Not supported (adapters wrap modules, not parameters); must stay empty.
        bottleneck_dim (`int`, defaults to 16):
            Width `r` of every adapter.
        adapter_activation (`str`, defaults to `"relu"`):
            Activation between the down and up projections; any key of `transformers.activations.ACT2FN`.
        adapter_dropout (`float`, defaults to 0.0):
            Dropout applied to the adapter input while training.
        layers_to_transform (`list[int] | int`, *optional*):
            Adapt only the transformer layers with these indices.
        layers_pattern (`list[str] | str`, *optional*):
            Name of the `nn.ModuleList` holding the layers, used with `layers_to_transform`.
        modules_to_save (`list[str]`, *optional*):
            Extra modules to train fully and save with the adapter. PEFT adds the task head (`classifier`, `score`)
            for sequence-classification models by itself.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = BOTTLENECK_PEFT_TYPE


@dataclass
class C2AConfig(_AdapterSitesConfig):
    """Configuration of C2A, client-customized adapters generated by a hypernetwork (peft type `"C2A"`).

    The adapters are the bottleneck adapters of [`BottleneckAdapterConfig`], but their weights are generated for
    every example from a unit-norm client embedding of size `k`:

        e = normalize(label term (linear map of the client's label distribution)
                      + context term (linear map of the L2-normalised, mask-aware mean of the adapter input)
                      + layer embedding + site embedding (attention / feed-forward / cross-attention)
                      [+ client-id embedding])

    by ONE factorised hypernetwork shared by all layers and sites, with separate generators for `W_down` and `W_up`.
    For classification the label distribution also reaches the logits directly: `logit_adjustment * log(p + eps)` is
    added to the classifier's output, so the shared classifier learns scores free of any one client's label prior
    (a balanced softmax while training) and each client's prediction uses its own prior. Only the hypernetwork, the
    embeddings, the per-site adapter biases and `modules_to_save` train and travel between clients and server (a
    federated trainer keeps the client-id embedding on its client).

    Args:
        target_modules (`set[str] | str`, *optional*):
            As in [`BottleneckAdapterConfig`]: the attention and feed-forward output projections, resolved
            automatically for known architectures.
        exclude_modules (`set[str] | str`, *optional*):
            Module names (or one regex) never to adapt.
        target_parameters (`list[str]`, *optional*):
            Not supported; must stay empty.
        bottleneck_dim (`int`, defaults to 16):
            Width `r` of every generated adapter.
        client_embed_dim (`int`, defaults to 8):
            Size `k` of the client embedding, i.e. the number of basis adapters the hypernetwork mixes.
        hyper_latent_dim (`int`, defaults to 32):
            Factorisation width `m`: each generator is `reshape(F S)` with `F: (k r) x m` and `S: m x d` (no shared
            bias row: it is what the `k` rows collapsed onto at large learning rates).
        num_labels (`int`, *optional*):
            Number of classes of the task. Set, `label_distribution=` becomes part of the client descriptor (required
            while training, uniform when missing at inference): it feeds the label term and the logit adjustment.
            Unset on a `SEQ_CLS` / `TOKEN_CLS` model, it is taken from the classifier (`model.config.num_labels`);
            leave it unset for language modelling.
        label_names (`list[str]`, *optional*):
            The classes' names in id order. Unset, they are taken from the model's `id2label` when it names its
            classes. Saved with the adapter so that loading it (`AutoPeftModelForSequenceClassification
            .from_pretrained(path)`, no extra arguments) restores `id2label` on a base model that had no such head:
            that load sizes the base model's classifier to `num_labels` when the head is saved with the adapter.
        num_clients (`int`, *optional*):
            Set, it adds a learned per-client embedding selected with `client_ids=` (ids in `[0, num_clients)`).
            `FederatedTrainer` keeps each client's row on that client: it is never averaged by the server.
        use_context (`bool`, defaults to `True`):
            Whether the context term (mask-aware mean of each adapter's input) conditions the hypernetwork.
        use_label_term (`bool`, defaults to `True`):
            Whether the label distribution conditions the generated adapters (the label term). With `False` it
            still reaches the logits through `logit_adjustment`.
        logit_adjustment (`float`, defaults to 1.0):
            Weight `tau` of the direct path from the label distribution `p` to the logits: `tau * log(p + eps)` is
            added to every class score of a classification model (`task_type` `SEQ_CLS` or `TOKEN_CLS`, `num_labels`
            set). It is a constant shift for the uniform descriptor (an unknown client, the global evaluation), so
            it never changes those predictions. `0` turns it off.
        logit_adjustment_eps (`float`, defaults to 0.01):
            Smoothing `eps` of the logit adjustment: a class the client never saw is penalised by `tau * log(eps)`
            (about -4.6 nats), not forbidden.
        causal_context (`bool`, *optional*):
            Whether the context term is a causal running mean (position `t` pools positions `<= t`), as decoders need
            so that later tokens never change earlier outputs. Left unset, it is inferred: `True` for decoder-only
            models and for the decoder stack of encoder-decoder models, `False` elsewhere. `False` on a model with
            decoder sites raises `ValueError` (the context would see future tokens).
        adapter_activation (`str`, defaults to `"relu"`):
            Activation inside every adapter.
        adapter_dropout (`float`, defaults to 0.0):
            Dropout applied to the adapter input while training.
        layers_to_transform (`list[int] | int`, *optional*):
            Adapt only the transformer layers with these indices.
        layers_pattern (`list[str] | str`, *optional*):
            Name of the `nn.ModuleList` holding the layers, used with `layers_to_transform`.
        modules_to_save (`list[str]`, *optional*):
            Extra modules to train fully and save with the adapter (the task head is added by PEFT).
        init_seed (`int`, *optional*):
            Seed for the hypernetwork's initialisation; set it so every federated client builds the same start.
        adapter_kind (`str`, defaults to `"bottleneck"`):
            What the hypernetwork generates. `"bottleneck"`: the bottleneck adapters above, on output projections.
            `"lora"`: LoRA factors `A` (`r x d_in`) and `B` (`d_out x r`) for each target linear module, applied as
            `base(x) + lora_alpha / r * B A x` (PEFT's LoRA, `bias="none"`; `B` starts at zero). Default targets are
            PEFT's LoRA defaults for the architecture (`query` / `value` for BERT). Each target of each block gets
            its own site embedding. A client's generated LoRA exports as a plain PEFT `LoraConfig` adapter that
            merges into the base weights (`export_adapter`, context term off); `bottleneck_dim` is its rank `r`,
            `adapter_activation` is unused.
        lora_alpha (`float`, defaults to 8.0):
            LoRA's `alpha` for `adapter_kind="lora"`: the update is scaled by `lora_alpha / bottleneck_dim`.
    """

    client_embed_dim: int = field(default=8, metadata={"help": "Size k of the client embedding."})
    hyper_latent_dim: int = field(default=32, metadata={"help": "Factorisation width m of the hypernetwork."})
    num_labels: Optional[int] = field(
        default=None,
        metadata={
            "help": "Number of classes; enables the label term of the client descriptor. Unset on a SEQ_CLS or "
            "TOKEN_CLS model, it is taken from the model's classifier (`config.num_labels`)."
        },
    )
    label_names: Optional[list[str]] = field(
        default=None, metadata={"help": "The classes' names in id order (default: the model's id2label, if named)."}
    )
    num_clients: Optional[int] = field(
        default=None, metadata={"help": "Number of known clients; enables a learned client-id embedding."}
    )
    use_context: bool = field(default=True, metadata={"help": "Condition the hypernetwork on the adapter input."})
    use_label_term: bool = field(
        default=True, metadata={"help": "Condition the generated adapters on the client's label distribution."}
    )
    logit_adjustment: float = field(
        default=1.0,
        metadata={"help": "Weight tau of tau * log(p + eps) added to the logits (classification); 0 turns it off."},
    )
    logit_adjustment_eps: float = field(
        default=0.01, metadata={"help": "Smoothing eps of the logit adjustment (an unseen class gets tau * log(eps))."}
    )
    causal_context: Optional[bool] = field(
        default=None, metadata={"help": "Causal running-mean context; inferred from the model when unset."}
    )
    init_seed: Optional[int] = field(default=None, metadata={"help": "Seed for the hypernetwork initialisation."})
    adapter_kind: str = field(
        default="bottleneck",
        metadata={
            "help": "What the hypernetwork generates: bottleneck adapters, or LoRA factors (exportable, mergeable).",
            "choices": list(ADAPTER_KINDS),
        },
    )
    lora_alpha: float = field(default=8.0, metadata={"help": "LoRA alpha for adapter_kind='lora' (scale alpha / r)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = C2A_PEFT_TYPE
        for name in ("client_embed_dim", "hyper_latent_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)}.")
        if not math.isfinite(self.logit_adjustment) or self.logit_adjustment < 0:
            raise ValueError(f"`logit_adjustment` must be a finite number >= 0, got {self.logit_adjustment}.")
        if not (math.isfinite(self.logit_adjustment_eps) and 0 < self.logit_adjustment_eps <= 1):
            raise ValueError(f"`logit_adjustment_eps` must be in (0, 1], got {self.logit_adjustment_eps}.")
        for name in ("num_labels", "num_clients"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"`{name}` must be a positive integer or None, got {value}.")
        if self.adapter_kind not in ADAPTER_KINDS:
            raise ValueError(f"`adapter_kind` must be one of {ADAPTER_KINDS}, got {self.adapter_kind!r}.")
        if not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise ValueError(f"`lora_alpha` must be a finite number > 0, got {self.lora_alpha}.")
        if self.label_names is not None:
            self.label_names = [str(name) for name in self.label_names]
            if self.num_labels is not None and len(self.label_names) != self.num_labels:
                raise ValueError(
                    f"`label_names` has {len(self.label_names)} names but `num_labels` is {self.num_labels}."
                )

    def check_exportable(self) -> None:
        """Raise `ValueError` unless a static adapter can reproduce this C2A adapter exactly for one client
        (`export_adapter`, `FederatedTrainer.export_client_adapters`)."""
        if self.use_context:
            raise ValueError(
                "This C2A adapter conditions on each input's context (`use_context=True`), so its weights change with "
                "every example and no static adapter reproduces them. Export works for adapters trained with "
                "`C2AConfig(use_context=False)`."
            )
