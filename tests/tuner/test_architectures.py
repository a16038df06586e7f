"""C2A and plain bottleneck adapters on every supported architecture, built from tiny random configs.

For each architecture and both tuner types: the adapters land exactly on the attention-output and feed-forward-output
projections (resolved from the model type), a fresh adapter is the identity, every trainable tensor gets a gradient,
save / load round-trips exactly, and (for language models) generation with the KV cache matches greedy decoding
without it, which checks C2A's causal context cache. Unknown architectures must ask for `target_modules`.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from torch import nn  # noqa: E402

from peft_c2a import BottleneckAdapterConfig, BottleneckAdapterLayer, C2AConfig, C2AHyperNetwork, C2ALayer  # noqa: E402
from peft_c2a.sites import (  # noqa: E402
    SITE_ATTENTION,
    SITE_CROSS_ATTENTION,
    SITE_FEED_FORWARD,
    TARGET_MODULES_BY_MODEL_TYPE,
)

from ..conftest import activate_up_path, without_logit_adjustment  # noqa: E402

VOCAB = 100
HIDDEN = 32
LAYERS = 2
NUM_LABELS = 3
PAD = 0
MAX_NEW_TOKENS = 5
ADAPTER_LAYER_TYPES = (C2ALayer, BottleneckAdapterLayer)


# ---------------------------------------------------------------------------------------------------- architectures
@dataclass(frozen=True)
class Arch:
    kind: str  # "encoder" (SEQ_CLS), "decoder" (CAUSAL_LM) or "seq2seq" (SEQ_2_SEQ_LM)
    build: Callable[[], nn.Module]
    # expected adapted modules of transformer block i: (name, site kind, decoder site)
    sites: Callable[[int], list[tuple[str, int, bool]]]


def _bert_like_sites(prefix: str) -> Callable[[int], list[tuple[str, int, bool]]]:
    return lambda i: [
        (f"{prefix}.encoder.layer.{i}.attention.output.dense", SITE_ATTENTION, False),
        (f"{prefix}.encoder.layer.{i}.output.dense", SITE_FEED_FORWARD, False),
    ]


def _llama_like_sites(i: int) -> list[tuple[str, int, bool]]:
    return [
        (f"model.layers.{i}.self_attn.o_proj", SITE_ATTENTION, True),
        (f"model.layers.{i}.mlp.down_proj", SITE_FEED_FORWARD, True),
    ]


_ENCODER_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    num_hidden_layers=LAYERS,
    num_attention_heads=2,
    intermediate_size=37,
    max_position_embeddings=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    num_labels=NUM_LABELS,
)
_DECODER_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=37,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=PAD,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)


def _bert() -> nn.Module:
    return transformers.BertForSequenceClassification(transformers.BertConfig(**_ENCODER_COMMON))


def _roberta() -> nn.Module:
    config = transformers.RobertaConfig(**{**_ENCODER_COMMON, "max_position_embeddings": 66}, pad_token_id=1)
    return transformers.RobertaForSequenceClassification(config)


def _xlm_roberta() -> nn.Module:
    config = transformers.XLMRobertaConfig(**{**_ENCODER_COMMON, "max_position_embeddings": 66}, pad_token_id=1)
    return transformers.XLMRobertaForSequenceClassification(config)


def _distilbert() -> nn.Module:
    config = transformers.DistilBertConfig(
        vocab_size=VOCAB,
        dim=HIDDEN,
        n_layers=LAYERS,
        n_heads=2,
        hidden_dim=37,
        max_position_embeddings=64,
        dropout=0.0,
        attention_dropout=0.0,
        seq_classif_dropout=0.0,
        num_labels=NUM_LABELS,
    )
    return transformers.DistilBertForSequenceClassification(config)


def _electra() -> nn.Module:
    config = transformers.ElectraConfig(**_ENCODER_COMMON, embedding_size=16)
    return transformers.ElectraForSequenceClassification(config)


def _deberta_v2() -> nn.Module:
    config = transformers.DebertaV2Config(
        **_ENCODER_COMMON,
        relative_attention=True,
        pos_att_type=["p2c", "c2p"],
        position_buckets=16,
        pooler_hidden_size=HIDDEN,
        pooler_dropout=0.0,
    )
    return transformers.DebertaV2ForSequenceClassification(config)


def _gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=2,
        n_inner=37,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=PAD,
    )
    return transformers.GPT2LMHeadModel(config)


def _llama() -> nn.Module:
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**_DECODER_COMMON))


def _mistral() -> nn.Module:
    return transformers.MistralForCausalLM(transformers.MistralConfig(**_DECODER_COMMON, sliding_window=None))


def _qwen2() -> nn.Module:
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**_DECODER_COMMON))


def _t5() -> nn.Module:
    config = transformers.T5Config(
        vocab_size=VOCAB,
        d_model=HIDDEN,
        d_kv=8,
        d_ff=37,
        num_layers=LAYERS,
        num_decoder_layers=LAYERS,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
        pad_token_id=PAD,
        eos_token_id=1,
        decoder_start_token_id=PAD,
    )
    return transformers.T5ForConditionalGeneration(config)


def _t5_sites(i: int) -> list[tuple[str, int, bool]]:
    return [
        (f"encoder.block.{i}.layer.0.SelfAttention.o", SITE_ATTENTION, False),
        (f"encoder.block.{i}.layer.1.DenseReluDense.wo", SITE_FEED_FORWARD, False),
        (f"decoder.block.{i}.layer.0.SelfAttention.o", SITE_ATTENTION, True),
        (f"decoder.block.{i}.layer.1.EncDecAttention.o", SITE_CROSS_ATTENTION, True),
        (f"decoder.block.{i}.layer.2.DenseReluDense.wo", SITE_FEED_FORWARD, True),
    ]


ARCHS: dict[str, Arch] = {
    "bert": Arch("encoder", _bert, _bert_like_sites("bert")),
    "roberta": Arch("encoder", _roberta, _bert_like_sites("roberta")),
    "xlm-roberta": Arch("encoder", _xlm_roberta, _bert_like_sites("roberta")),
    "distilbert": Arch(
        "encoder",
        _distilbert,
        lambda i: [
            (f"distilbert.transformer.layer.{i}.attention.out_lin", SITE_ATTENTION, False),
            (f"distilbert.transformer.layer.{i}.ffn.lin2", SITE_FEED_FORWARD, False),
        ],
    ),
    "electra": Arch("encoder", _electra, _bert_like_sites("electra")),
    "deberta-v2": Arch("encoder", _deberta_v2, _bert_like_sites("deberta")),
    "gpt2": Arch(
        "decoder",
        _gpt2,
        lambda i: [
            (f"transformer.h.{i}.attn.c_proj", SITE_ATTENTION, True),
            (f"transformer.h.{i}.mlp.c_proj", SITE_FEED_FORWARD, True),
        ],
    ),
    "llama": Arch("decoder", _llama, _llama_like_sites),
    "mistral": Arch("decoder", _mistral, _llama_like_sites),
    "qwen2": Arch("decoder", _qwen2, _llama_like_sites),
    "t5": Arch("seq2seq", _t5, _t5_sites),
}
TASK_TYPES = {"encoder": "SEQ_CLS", "decoder": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM"}
METHODS = ["c2a", "bottleneck"]
LM_ARCHS = [name for name, arch in ARCHS.items() if arch.kind != "encoder"]
DECODER_ARCHS = [name for name, arch in ARCHS.items() if arch.kind == "decoder"]


# ---------------------------------------------------------------------------------------------------- helpers
def build_base(arch_name: str) -> nn.Module:
    torch.manual_seed(0)
    model = ARCHS[arch_name].build().eval()
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        # never stop early: generated lengths are then fixed and comparable token by token
        generation_config.eos_token_id = None
        generation_config.pad_token_id = PAD
    return model


def make_config(arch_name: str, method: str, num_clients: int | None = None, **overrides):
    kind = ARCHS[arch_name].kind
    task_type = TASK_TYPES[kind]
    if method == "bottleneck":
        return BottleneckAdapterConfig(task_type=task_type, bottleneck_dim=8, **overrides)
    return C2AConfig(
        task_type=task_type,
        bottleneck_dim=8,
        client_embed_dim=4,
        hyper_latent_dim=8,
        num_labels=NUM_LABELS if kind == "encoder" else None,
        num_clients=num_clients,
        init_seed=0,
        **overrides,
    )


def wrap(arch_name: str, method: str, num_clients: int | None = None):
    """(peft model, deep copy of the base model taken before wrapping)."""
    base = build_base(arch_name)
    reference = copy.deepcopy(base)
    torch.manual_seed(1)
    model = get_peft_model(base, make_config(arch_name, method, num_clients))
    return model, reference


def make_inputs(arch_name: str, with_labels: bool = True) -> dict[str, torch.Tensor]:
    """A batch of 4 sequences of length 9 with padding (left padding for causal LMs, right padding otherwise)."""
    kind = ARCHS[arch_name].kind
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(3, VOCAB, (4, 9), generator=generator)
    attention_mask = torch.ones(4, 9, dtype=torch.long)
    if kind == "decoder":
        attention_mask[1, :3] = 0
        attention_mask[3, :2] = 0
    else:
        attention_mask[1, 6:] = 0
        attention_mask[3, 4:] = 0
    pad_id = 1 if arch_name in ("roberta", "xlm-roberta") else PAD
    input_ids = input_ids.masked_fill(attention_mask == 0, pad_id)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if not with_labels:
        return inputs
    if kind == "encoder":
        inputs["labels"] = torch.tensor([0, 2, 1, 2])
    elif kind == "decoder":
        inputs["labels"] = input_ids.masked_fill(attention_mask == 0, -100)
    else:
        labels = torch.randint(3, VOCAB, (4, 6), generator=generator)
        labels[2, 4:] = -100
        inputs["labels"] = labels
    return inputs


def make_descriptor(arch_name: str, method: str, num_clients: int | None = None, batch: int = 4) -> dict:
    descriptor = {}
    if method == "c2a" and ARCHS[arch_name].kind == "encoder":
        counts = torch.tensor([[5.0, 1.0, 0.0], [0.0, 3.0, 3.0], [1.0, 1.0, 8.0], [2.0, 0.0, 2.0]])
        descriptor["label_distribution"] = counts[:batch]
    if num_clients is not None:
        descriptor["client_ids"] = torch.tensor([3, 0, 2, 1])[:batch]
    return descriptor


def adapted_layers(model: nn.Module) -> dict[str, nn.Module]:
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return {name: module for name, module in base.named_modules() if isinstance(module, ADAPTER_LAYER_TYPES)}


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


def make_nontrivial(model: nn.Module, seed: int = 3) -> None:
    """Open the (zero-initialised) up path so the adapters change the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, C2AHyperNetwork):
                activate_up_path(module)
            elif isinstance(module, BottleneckAdapterLayer):
                # inputs of tiny random models are small, so the default down bias can leave every ReLU unit dead
                for down in module.bottleneck_down.values():
                    down.bias.zero_()
                for up in module.bottleneck_up.values():
                    up.weight.copy_(torch.randn(up.weight.shape, generator=generator) * 0.1)
                    up.bias.copy_(torch.randn(up.bias.shape, generator=generator) * 0.1)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def backward_grads(model: nn.Module, inputs: dict, descriptor: dict) -> dict[str, torch.Tensor | None]:
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(**inputs, **descriptor).loss
    assert torch.isfinite(loss)
    loss.backward()
    return {name: param.grad for name, param in trainable(model).items()}


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    # what `generate()` uses for decoder-only models
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


@torch.no_grad()
def greedy_without_cache(model, kind: str, input_ids, attention_mask, descriptor: dict, steps: int) -> torch.Tensor:
    """Greedy decoding by full forwards over the growing sequence (no KV cache, so no context cache either)."""
    if kind == "decoder":
        ids, mask = input_ids, attention_mask
        for _ in range(steps):
            logits = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=position_ids_from_mask(mask),
                use_cache=False,
                **descriptor,
            ).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=-1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        return ids
    decoder_ids = torch.full((input_ids.shape[0], 1), PAD, dtype=torch.long)
    for _ in range(steps):
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_ids,
            use_cache=False,
            **descriptor,
        ).logits
        decoder_ids = torch.cat([decoder_ids, logits[:, -1].argmax(-1, keepdim=True)], dim=-1)
    return decoder_ids


def generation_prompt() -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of length 6, the second left-padded by 2."""
    generator = torch.Generator().manual_seed(4)
    input_ids = torch.randint(3, VOCAB, (2, 6), generator=generator)
    attention_mask = torch.ones(2, 6, dtype=torch.long)
    attention_mask[1, :2] = 0
    return input_ids.masked_fill(attention_mask == 0, PAD), attention_mask


def logits_of(model, arch_name: str, descriptor: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**make_inputs(arch_name), **descriptor).logits


# ---------------------------------------------------------------------------------------------------- tests
@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest (and steadiest on a shared 2-core machine) on one intra-op thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_architecture_has_default_sites():
    model_types = {
        "bert",
        "roberta",
        "xlm-roberta",
        "distilbert",
        "electra",
        "deberta-v2",
        "gpt2",
        "llama",
        "mistral",
        "qwen2",
        "t5",
    }
    assert model_types <= set(TARGET_MODULES_BY_MODEL_TYPE)
    for arch_name in ARCHS:
        assert build_base(arch_name).config.model_type in model_types


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch_name", list(ARCHS))
def test_adapters_sit_on_attention_and_ffn_outputs(arch_name, method):
    model, _ = wrap(arch_name, method)
    layers = adapted_layers(model)
    expected = [site for i in range(LAYERS) for site in ARCHS[arch_name].sites(i)]
    assert set(layers) == {name for name, _, _ in expected}
    per_block = 5 if arch_name == "t5" else 2
    assert len(layers) == per_block * LAYERS

    layer_type = C2ALayer if method == "c2a" else BottleneckAdapterLayer
    assert all(type(layer) is layer_type for layer in layers.values())
    for layer in layers.values():
        assert isinstance(layer.get_base_layer(), (nn.Linear, transformers.pytorch_utils.Conv1D))
    if method == "c2a":
        layer_ids = {}
        for name, site, decoder_site in expected:
            layer = layers[name]
            assert layer.c2a_site["default"] == site, name
            assert layer.c2a_decoder_site["default"] == decoder_site, name
            assert layer.c2a_causal["default"] == decoder_site, name  # inferred: causal exactly on decoder sites
            block = re.match(r"^(.*?\.\d+)\.", name).group(1)  # e.g. "model.layers.0", "decoder.block.1"
            layer_ids.setdefault(block, set()).add(layer.c2a_layer_id["default"])
        # one layer id per transformer block (T5: encoder and decoder blocks are distinct), all different
        assert all(len(ids) == 1 for ids in layer_ids.values())
        assert len({next(iter(ids)) for ids in layer_ids.values()}) == len(layer_ids)
        hyper = model.base_model.c2a_hypernet["default"]
        assert hyper.layer_embedding.shape[0] == len(layer_ids)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch_name", list(ARCHS))
def test_fresh_adapter_is_identity(arch_name, method):
    model, reference = wrap(arch_name, method)
    model.eval()
    descriptor = make_descriptor(arch_name, method)
    expected = logits_of(reference, arch_name, {})
    actual = without_logit_adjustment(model, logits_of(model, arch_name, descriptor))
    assert actual.shape == expected.shape
    assert max_diff(actual, expected) <= 1e-6


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch_name", list(ARCHS))
def test_every_trainable_tensor_gets_a_gradient(arch_name, method):
    model, _ = wrap(arch_name, method)
    inputs, descriptor = make_inputs(arch_name), make_descriptor(arch_name, method)
    params = trainable(model)
    assert params
    assert all(not p.requires_grad for n, p in model.named_parameters() if n not in params)

    grads = backward_grads(model, inputs, descriptor)  # at init: up path closed
    for name, grad in grads.items():
        assert grad is not None, name
        assert torch.isfinite(grad).all(), name

    make_nontrivial(model)
    grads = backward_grads(model, inputs, descriptor)
    for name, grad in grads.items():
        assert grad is not None, name
        assert torch.isfinite(grad).all(), name
        assert grad.abs().sum() > 0, name


def _train_step(model, arch_name: str, descriptor: dict) -> None:
    make_nontrivial(model)
    backward_grads(model, make_inputs(arch_name), descriptor)
    with torch.no_grad():
        for param in trainable(model).values():
            param -= 0.05 * param.grad


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch_name", list(ARCHS))
def test_save_and_load_reproduces_logits(arch_name, method, tmp_path):
    model, reference = wrap(arch_name, method)
    descriptor = make_descriptor(arch_name, method)
    _train_step(model, arch_name, descriptor)
    model.eval()
    expected = logits_of(model, arch_name, descriptor)
    assert max_diff(expected, logits_of(reference, arch_name, {})) > 1e-3  # the adapter does something

    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path).eval()
    assert type(loaded.peft_config["default"]) is type(model.peft_config["default"])
    assert set(adapted_layers(loaded)) == set(adapted_layers(model))
    actual = logits_of(loaded, arch_name, descriptor)
    assert torch.equal(actual, expected), max_diff(actual, expected)


# ---------------------------------------------------------------------------------------------------- generation
def _generate(model, input_ids, attention_mask, **kwargs):
    with torch.no_grad():
        return model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            **kwargs,
        )


@torch.no_grad()
def _stepwise_logits_without_cache(model, kind: str, input_ids, attention_mask, sequences, descriptor: dict):
    """Logits of every generated position, recomputed from the full prefix without any cache: (steps, batch, vocab)."""
    if kind == "decoder":
        full_mask = torch.cat([attention_mask, torch.ones_like(sequences[:, input_ids.shape[1] :])], dim=-1)
        logits = model(
            input_ids=sequences[:, :-1],
            attention_mask=full_mask[:, :-1],
            position_ids=position_ids_from_mask(full_mask[:, :-1]),
            use_cache=False,
            **descriptor,
        ).logits
        return logits[:, input_ids.shape[1] - 1 :].transpose(0, 1)
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        decoder_input_ids=sequences[:, :-1],
        use_cache=False,
        **descriptor,
    ).logits
    return logits.transpose(0, 1)


_GENERATE_CASES = [
    pytest.param(arch_name, method, None, id=f"{arch_name}-{method}") for arch_name in LM_ARCHS for method in METHODS
] + [pytest.param(arch_name, "c2a", 4, id=f"{arch_name}-c2a-clients") for arch_name in ("llama", "gpt2")]


@pytest.mark.parametrize("arch_name, method, num_clients", _GENERATE_CASES)
def test_generate(arch_name, method, num_clients):
    model, _ = wrap(arch_name, method, num_clients=num_clients)
    make_nontrivial(model)
    model.eval()
    kind = ARCHS[arch_name].kind
    input_ids, attention_mask = generation_prompt()
    descriptor = {"client_ids": torch.tensor([2, 1])} if num_clients else {}
    output = _generate(model, input_ids, attention_mask, **descriptor)
    if kind == "decoder":
        assert output.shape == (2, input_ids.shape[1] + MAX_NEW_TOKENS)
        assert torch.equal(output[:, : input_ids.shape[1]], input_ids)
    else:
        assert output.shape == (2, 1 + MAX_NEW_TOKENS)  # decoder start token + new tokens
        assert (output[:, 0] == PAD).all()
    if method == "bottleneck":
        # no context term: cached generation is plain greedy decoding (this also validates the reference decoder)
        assert torch.equal(output, greedy_without_cache(model, kind, input_ids, attention_mask, {}, MAX_NEW_TOKENS))


_CACHE_CASES = [pytest.param(arch_name, None, id=arch_name) for arch_name in LM_ARCHS] + [
    pytest.param(arch_name, 4, id=f"{arch_name}-clients") for arch_name in ("llama", "gpt2")
]


@pytest.mark.parametrize("arch_name, num_clients", _CACHE_CASES)
def test_c2a_cached_generation_matches_greedy_without_cache(arch_name, num_clients):
    """The causal context cache must make cached decoding equal to recomputing the whole prefix at every step."""
    model, _ = wrap(arch_name, "c2a", num_clients=num_clients)
    make_nontrivial(model)
    model.eval()
    kind = ARCHS[arch_name].kind
    input_ids, attention_mask = generation_prompt()
    descriptor = {"client_ids": torch.tensor([2, 1])} if num_clients else {}
    cached = _generate(model, input_ids, attention_mask, output_logits=True, return_dict_in_generate=True, **descriptor)
    uncached = greedy_without_cache(model, kind, input_ids, attention_mask, descriptor, MAX_NEW_TOKENS)
    assert torch.equal(cached.sequences, uncached), (cached.sequences, uncached)
    # compare the logits too: greedy tokens of a tiny random model can agree by chance
    reference = _stepwise_logits_without_cache(model, kind, input_ids, attention_mask, uncached, descriptor)
    assert max_diff(torch.stack(cached.logits), reference) <= 1e-4


# ---------------------------------------------------------------------------------------------------- causality, ids
@pytest.mark.parametrize("arch_name", DECODER_ARCHS)
def test_c2a_decoder_is_causal(arch_name):
    model, _ = wrap(arch_name, "c2a")
    make_nontrivial(model)
    model.eval()
    generator = torch.Generator().manual_seed(5)
    input_ids = torch.randint(3, VOCAB, (2, 10), generator=generator)
    changed = input_ids.clone()
    t = 4
    changed[:, t + 1 :] = (input_ids[:, t + 1 :] - 3 + 7) % (VOCAB - 3) + 3
    assert (changed[:, t + 1 :] != input_ids[:, t + 1 :]).all()
    with torch.no_grad():
        before = model(input_ids=input_ids, use_cache=False).logits
        after = model(input_ids=changed, use_cache=False).logits
    assert max_diff(before[:, : t + 1], after[:, : t + 1]) <= 1e-5
    assert max_diff(before[:, t + 1 :], after[:, t + 1 :]) > 1e-4  # the change itself is visible


@pytest.mark.parametrize("arch_name", ["llama", "gpt2"])
def test_c2a_decoder_with_client_ids(arch_name, tmp_path):
    num_clients = 4
    model, reference = wrap(arch_name, "c2a", num_clients=num_clients)
    inputs = make_inputs(arch_name)
    descriptor = make_descriptor(arch_name, "c2a", num_clients=num_clients)

    model.train()
    with pytest.raises(ValueError, match="client_ids"):
        model(**inputs)  # training needs the client ids

    make_nontrivial(model)
    grads = backward_grads(model, inputs, descriptor)
    assert "base_model.c2a_hypernet.default.client_embedding" in grads
    for name, grad in grads.items():
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name

    model.eval()
    expected = logits_of(model, arch_name, descriptor)
    other_clients = {"client_ids": (descriptor["client_ids"] + 1) % num_clients}
    assert max_diff(expected, logits_of(model, arch_name, other_clients)) > 1e-4  # the id conditions the adapter

    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path).eval()
    assert loaded.peft_config["default"].num_clients == num_clients
    assert torch.equal(logits_of(loaded, arch_name, descriptor), expected)


# ---------------------------------------------------------------------------------------------------- unknown types
def _tiny_opt() -> nn.Module:
    config = transformers.OPTConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        ffn_dim=37,
        num_attention_heads=2,
        word_embed_proj_dim=HIDDEN,
        max_position_embeddings=64,
        dropout=0.0,
        attention_dropout=0.0,
        pad_token_id=1,
        num_labels=NUM_LABELS,
    )
    return transformers.OPTForSequenceClassification(config)


def _tiny_bart() -> nn.Module:
    config = transformers.BartConfig(
        vocab_size=VOCAB,
        d_model=HIDDEN,
        encoder_layers=LAYERS,
        decoder_layers=LAYERS,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=37,
        decoder_ffn_dim=37,
        max_position_embeddings=64,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        num_labels=NUM_LABELS,
    )
    return transformers.BartForSequenceClassification(config)


# builder, explicit target modules, expected adapted modules
UNKNOWN_ARCHS = {
    "opt": (
        _tiny_opt,
        ["self_attn.out_proj", "fc2"],
        {f"model.decoder.layers.{i}.{leaf}" for i in range(LAYERS) for leaf in ("self_attn.out_proj", "fc2")},
    ),
    "bart": (
        _tiny_bart,
        ["self_attn.out_proj", "encoder_attn.out_proj", "fc2"],
        {f"model.encoder.layers.{i}.{leaf}" for i in range(LAYERS) for leaf in ("self_attn.out_proj", "fc2")}
        | {
            f"model.decoder.layers.{i}.{leaf}"
            for i in range(LAYERS)
            for leaf in ("self_attn.out_proj", "encoder_attn.out_proj", "fc2")
        },
    ),
}


def _unknown_base(arch_name: str) -> nn.Module:
    torch.manual_seed(0)
    return UNKNOWN_ARCHS[arch_name][0]().eval()


def _unknown_config(method: str, **kwargs):
    if method == "bottleneck":
        return BottleneckAdapterConfig(task_type="SEQ_CLS", bottleneck_dim=8, **kwargs)
    return C2AConfig(
        task_type="SEQ_CLS", bottleneck_dim=8, client_embed_dim=4, hyper_latent_dim=8, num_labels=NUM_LABELS, **kwargs
    )


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch_name", list(UNKNOWN_ARCHS))
def test_unknown_architecture_needs_target_modules(arch_name, method):
    base = _unknown_base(arch_name)
    assert base.config.model_type not in TARGET_MODULES_BY_MODEL_TYPE
    with pytest.raises(ValueError, match="target_modules") as info:
        get_peft_model(base, _unknown_config(method))
    message = str(info.value)
    assert repr(base.config.model_type) in message
    for module_name in ("out_proj", "fc1", "fc2", "q_proj", "k_proj", "v_proj"):  # the linear modules seen
        assert f"'{module_name}'" in message
    assert not any(isinstance(module, BaseTunerLayer) for module in base.modules())  # model left untouched


@pytest.mark.parametrize(
    "arch_name, method",
    [pytest.param(arch_name, method, id=f"{arch_name}-{method}") for arch_name in UNKNOWN_ARCHS for method in METHODS],
)
def test_unknown_architecture_with_explicit_target_modules(arch_name, method):
    _, target_modules, expected = UNKNOWN_ARCHS[arch_name]
    base = _unknown_base(arch_name)
    reference = copy.deepcopy(base)
    model = get_peft_model(base, _unknown_config(method, target_modules=target_modules))
    assert set(adapted_layers(model)) == expected

    generator = torch.Generator().manual_seed(6)
    input_ids = torch.randint(3, VOCAB, (2, 7), generator=generator)
    input_ids[:, -1] = 2  # BART classifies from the final eos token
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    descriptor = {"label_distribution": torch.tensor([1.0, 2.0, 3.0])} if method == "c2a" else {}
    model.eval()
    with torch.no_grad():
        actual = without_logit_adjustment(model, model(**inputs, **descriptor).logits)
        base_logits = reference(**inputs).logits
    assert max_diff(actual, base_logits) <= 1e-6

    make_nontrivial(model)
    grads = backward_grads(model, {**inputs, "labels": torch.tensor([0, 2])}, descriptor)
    for name, grad in grads.items():
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
