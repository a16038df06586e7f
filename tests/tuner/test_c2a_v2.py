"""C2A v2 on tiny random models: the logit adjustment, the unit client embedding, the zero-start up generator, the
generator-row diagnostic, the causal guard, and the update-size calibration (real MiniLM, slow)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import BertForTokenClassification, GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

from peft_c2a import C2AConfig
from peft_c2a.conditioning import logit_adjustment

from ..conftest import NUM_LABELS, activate_up_path, tiny_bert_config

DESCRIPTORS = torch.tensor([[8.0, 1.0, 0.0], [1.0, 8.0, 1.0], [0.0, 0.0, 5.0], [3.0, 3.0, 4.0]])


def c2a(model, **overrides):
    values = dict(task_type="SEQ_CLS", num_labels=NUM_LABELS, bottleneck_dim=4, init_seed=0)
    values.update(overrides)
    return get_peft_model(model, C2AConfig(**values)).eval()


def logits(model, batch, **descriptor):
    with torch.no_grad():
        return model(**batch, **descriptor).logits


# ---------------------------------------------------------------------------------------------------- logit path


def test_logit_adjustment_adds_the_centred_log_prior(tiny_bert_pair, batch):
    model, twin = tiny_bert_pair
    adjusted, plain = c2a(model), c2a(twin, logit_adjustment=0.0)
    for peft_model in (adjusted, plain):
        activate_up_path(peft_model.base_model.c2a_hypernet["default"])
    probs = DESCRIPTORS / DESCRIPTORS.sum(-1, keepdim=True)
    log_prior = torch.log(probs + 0.01)
    expected = log_prior - log_prior.mean(-1, keepdim=True)
    difference = logits(adjusted, batch, label_distribution=DESCRIPTORS) - logits(
        plain, batch, label_distribution=DESCRIPTORS
    )
    torch.testing.assert_close(difference, expected, atol=1e-5, rtol=0)
    # tau scales it; eps bounds the penalty of a class the client never saw
    assert logit_adjustment(probs, 2.0, 0.01) == pytest.approx(2 * expected)
    assert float(expected[0, 2] - expected[0, 0]) == pytest.approx(math.log(0.01 / (8 / 9 + 0.01)), rel=1e-5)


def test_uniform_or_missing_descriptor_is_untouched_by_the_logit_path(tiny_bert_pair, batch):
    model, twin = tiny_bert_pair
    adjusted, plain = c2a(model), c2a(twin, logit_adjustment=0.0)
    uniform = torch.ones(NUM_LABELS)
    for descriptor in ({}, {"label_distribution": uniform}, {"label_distribution": 7 * uniform}):
        assert torch.equal(logits(adjusted, batch, **descriptor), logits(plain, batch, **descriptor))


def test_logit_path_never_reads_the_batch_labels(tiny_bert, batch):
    model = c2a(tiny_bert)
    with torch.no_grad():
        a = model(**batch, labels=torch.tensor([0, 1, 2, 0]), label_distribution=DESCRIPTORS).logits
        b = model(**batch, labels=torch.tensor([2, 2, 2, 2]), label_distribution=DESCRIPTORS).logits
    assert torch.equal(a, b)


def test_logit_path_trains_as_a_balanced_softmax(tiny_bert, batch):
    """The training loss is the cross-entropy of the adjusted logits (the prior is added before the loss)."""
    model = c2a(tiny_bert)
    model.train()
    labels = torch.tensor([0, 1, 2, 2])
    out = model(**batch, labels=labels, label_distribution=DESCRIPTORS)
    assert out.loss.item() == pytest.approx(torch.nn.functional.cross_entropy(out.logits, labels).item(), rel=1e-6)


def test_disabled_adapter_drops_the_logit_path(tiny_bert_pair, batch):
    model, base = tiny_bert_pair
    peft_model = c2a(model)
    with peft_model.disable_adapter():
        got = logits(peft_model, batch, label_distribution=DESCRIPTORS)
    assert torch.equal(got, logits(base, batch))


def test_disabled_adapter_in_train_mode_is_the_base_model_and_needs_no_descriptor(tiny_bert_pair, batch):
    """A reference pass (TRL's `with model.disable_adapter()`) runs in train mode without client inputs."""
    model, base = tiny_bert_pair
    peft_model = c2a(model, num_clients=3)
    peft_model.train()
    base.train()
    with peft_model.disable_adapter():
        torch.manual_seed(1)
        got = peft_model(**batch).logits
    torch.manual_seed(1)
    assert torch.equal(got, base(**batch).logits)
    # enabled again, training without a descriptor is refused as before
    with pytest.raises(ValueError, match="without `label_distribution`"):
        peft_model(**batch)


def test_logit_path_survives_save_and_load(tiny_bert_pair, batch, tmp_path):
    model, twin = tiny_bert_pair
    peft_model = c2a(model, logit_adjustment=0.5, logit_adjustment_eps=0.05)
    activate_up_path(peft_model.base_model.c2a_hypernet["default"])
    expected = logits(peft_model, batch, label_distribution=DESCRIPTORS)
    peft_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(twin, tmp_path).eval()
    assert loaded.peft_config["default"].logit_adjustment == 0.5
    torch.testing.assert_close(logits(loaded, batch, label_distribution=DESCRIPTORS), expected, atol=1e-6, rtol=0)


def test_logit_path_on_token_classification(batch):
    torch.manual_seed(0)
    base = BertForTokenClassification(tiny_bert_config())
    twin = copy.deepcopy(base)
    adjusted = c2a(base, task_type="TOKEN_CLS")
    plain = c2a(twin, task_type="TOKEN_CLS", logit_adjustment=0.0)
    difference = logits(adjusted, batch, label_distribution=DESCRIPTORS) - logits(
        plain, batch, label_distribution=DESCRIPTORS
    )
    assert difference.shape == (4, 9, NUM_LABELS)
    torch.testing.assert_close(difference, difference[:, :1].expand_as(difference))  # the same at every token
    assert difference[0, 0].argmax() == 0 and difference[2, 0].argmax() == 2


def test_logit_path_on_a_decoder_classifier():
    """GPT-2 scores every position and pools the last one: the offset reaches the pooled logits."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2, num_labels=3, pad_token_id=0)
    base = GPT2ForSequenceClassification(config)
    twin = copy.deepcopy(base)
    ids = torch.randint(1, 50, (2, 6))
    adjusted, plain = c2a(base), c2a(twin, logit_adjustment=0.0)
    descriptor = {"label_distribution": torch.tensor([[9.0, 1.0, 0.0], [0.0, 1.0, 9.0]])}
    difference = logits(adjusted, {"input_ids": ids}, **descriptor) - logits(plain, {"input_ids": ids}, **descriptor)
    assert difference[0].argmax() == 0 and difference[1].argmax() == 2


@pytest.mark.parametrize(
    "field, value", [("logit_adjustment", -1.0), ("logit_adjustment", math.nan), ("logit_adjustment_eps", 0.0)]
)
def test_bad_logit_settings_raise(field, value):
    with pytest.raises(ValueError, match=field):
        C2AConfig(task_type="SEQ_CLS", num_labels=3, **{field: value})


# ---------------------------------------------------------------------------------------------------- calibration


def test_client_embedding_is_scale_free(tiny_bert, batch):
    """Only the direction of the summed client embedding matters: scaling every term leaves the adapters unchanged."""
    model = c2a(tiny_bert, logit_adjustment=0.0)
    hyper = model.base_model.c2a_hypernet["default"]
    activate_up_path(hyper)
    before = logits(model, batch, label_distribution=DESCRIPTORS)
    with torch.no_grad():
        for param in (hyper.label_weight, hyper.context_weight, hyper.layer_embedding, hyper.site_embedding):
            param.mul_(5.0)
    torch.testing.assert_close(logits(model, batch, label_distribution=DESCRIPTORS), before, atol=1e-5, rtol=1e-5)


def test_context_term_starts_weak(tiny_bert):
    hyper = c2a(tiny_bert).base_model.c2a_hypernet["default"]
    unit = torch.nn.functional.normalize(torch.randn(16, hyper.hidden_size), dim=-1)
    context = hyper.context_embedding(unit).norm(dim=-1).mean()
    site = torch.stack([hyper.site_embedding_for(layer, 0) for layer in range(2)]).norm(dim=-1).mean()
    assert context < 0.25 * site


def test_up_generator_starts_at_zero_and_rows_start_distinct(tiny_bert):
    hyper = c2a(tiny_bert).base_model.c2a_hypernet["default"]
    assert torch.count_nonzero(hyper.up_basis) == 0
    _, up = hyper.generators()
    assert torch.count_nonzero(up) == 0
    activate_up_path(hyper)
    cosine = hyper.generator_row_cosine()
    assert abs(cosine["down"]) < 0.2 and abs(cosine["up"]) < 0.2
    with torch.no_grad():  # identical rows: collapsed
        hyper.up_factor.copy_(hyper.up_factor[: hyper.bottleneck_dim].repeat(hyper.client_embed_dim, 1))
    assert hyper.generator_row_cosine()["up"] == pytest.approx(1.0, abs=1e-5)


def test_hypernetwork_has_no_shared_bias_row(tiny_bert):
    names = {name for name, _ in c2a(tiny_bert).base_model.c2a_hypernet["default"].named_parameters()}
    assert not {"down_bias", "up_bias", "up_gain"} & names


# ---------------------------------------------------------------------------------------------------- causal guard


def test_non_causal_context_on_a_decoder_raises():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2))
    with pytest.raises(ValueError, match="future"):
        get_peft_model(copy.deepcopy(gpt2), C2AConfig(bottleneck_dim=4, causal_context=False))
    # without a context term there is nothing to leak, and causal_context=True is the default anyway
    get_peft_model(copy.deepcopy(gpt2), C2AConfig(bottleneck_dim=4, causal_context=False, use_context=False))
    get_peft_model(copy.deepcopy(gpt2), C2AConfig(bottleneck_dim=4, causal_context=True))


def test_non_causal_context_is_fine_on_an_encoder(tiny_bert):
    c2a(tiny_bert, causal_context=False)


# ---------------------------------------------------------------------------------------------------- ablation switches


def test_label_term_switch(tiny_bert_pair, batch):
    model, twin = tiny_bert_pair
    without = c2a(model, use_label_term=False, logit_adjustment=0.0)
    hyper = without.base_model.c2a_hypernet["default"]
    assert hyper.label_weight is None
    activate_up_path(hyper)
    # the descriptor is still required and validated, but no longer changes the adapters
    a = logits(without, batch, label_distribution=DESCRIPTORS)
    assert torch.equal(a, logits(without, batch, label_distribution=DESCRIPTORS.flip(0)))
    with pytest.raises(ValueError, match="label_distribution"):
        without.train()(**batch, labels=torch.tensor([0, 1, 2, 0]))


# ---------------------------------------------------------------------------------------------------- update size


def test_adapter_output_shift_measures_lora_layers_by_hand(tiny_bert, batch):
    """PEFT's LoRA layers are measured like bottleneck ones: 0 while B = 0, and after B is set, exactly
    `mean over sites of ||scaling * B A x|| / ||W x + b||` on the unpadded positions; the classifier copy is no site."""
    from peft import LoraConfig

    from peft_c2a.diagnostics import adapter_output_shift

    model = get_peft_model(tiny_bert, LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["query"]))
    model.eval()
    assert adapter_output_shift(model, batch) == 0.0
    layers = [m for m in model.modules() if hasattr(m, "lora_B") and "default" in m.lora_B]
    torch.manual_seed(3)
    for layer in layers:
        torch.nn.init.normal_(layer.lora_B["default"].weight)
    mask = batch["attention_mask"].unsqueeze(-1).float()
    hidden, expected = {}, []
    hooks = [
        layer.base_layer.register_forward_pre_hook(lambda m, a, layer=layer: hidden.update({layer: a[0]}))
        for layer in layers
    ]
    with torch.no_grad():
        model(**batch)
    for hook in hooks:
        hook.remove()
    with torch.no_grad():
        for layer in layers:
            x = hidden[layer]
            base = layer.base_layer(x) * mask
            delta = layer.scaling["default"] * layer.lora_B["default"](layer.lora_A["default"](x)) * mask
            expected.append(float(delta.norm() / base.norm()))
    assert adapter_output_shift(model, batch) == pytest.approx(sum(expected) / len(expected), rel=1e-5)


def test_adapter_output_shift_refuses_a_model_without_adapters(tiny_bert, batch):
    from peft_c2a.diagnostics import adapter_output_shift

    with pytest.raises(ValueError, match="no adapter layers"):
        adapter_output_shift(tiny_bert, batch)


@pytest.mark.slow
def test_generated_update_has_the_size_of_a_plain_one_on_minilm(tmp_path):
    """At the same learning rate (1e-3, 3e-3, 1e-2) a C2A adapter's output moves as far as a plain bottleneck
    adapter's, after one and after five Adam steps: the ratio's mean over 3 seeds is within 0.8-1.25 (the C2A v2
    target; per-seed figures in docs/benchmarks.md)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks import calibration

    threads = torch.get_num_threads()
    try:
        document = calibration.main(["--seeds", "0", "1", "2", "--steps", "5", "--output_dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    for lr, row in document["summary"].items():
        assert 0.8 <= row["ratio_step_1"] <= 1.25, (lr, row)
        assert 0.8 <= row["ratio_step_5"] <= 1.25, (lr, row)
    for run in document["runs"]:
        assert max(abs(v) for v in run["c2a"]["generator_row_cosine"].values()) < 0.1


def test_an_adapter_of_the_first_version_is_refused(tiny_bert_pair, tmp_path):
    from safetensors.torch import load_file, save_file

    model, twin = tiny_bert_pair
    c2a(model).save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(path))
    tensors["base_model.c2a_hypernet.up_gain"] = torch.zeros(2, 3)  # what v1 saved
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match="first version"):
        PeftModel.from_pretrained(twin, tmp_path)
