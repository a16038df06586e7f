"""Behavioural properties of the C2A tuner on a tiny BERT classifier (fast, random weights)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from peft import get_peft_model

import peft_c2a
from peft_c2a import BottleneckAdapterConfig, C2AConfig, C2ALayer

from ..conftest import NUM_LABELS, without_logit_adjustment


def c2a_config(**overrides) -> C2AConfig:
    values = dict(task_type="SEQ_CLS", num_labels=NUM_LABELS, bottleneck_dim=4, init_seed=0)
    values.update(overrides)
    return C2AConfig(**values)


def make_non_trivial(model, scale: float = 0.5, seed: int = 0) -> None:
    """Turn the zero-initialised up path on and perturb every trainable tensor, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if name.endswith("up_basis"):
                param.copy_(2 * scale * torch.randn(param.shape, generator=generator))
            else:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))


def train_steps(model, batch, label_distribution, steps: int = 5, lr: float = 1e-2) -> list[float]:
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    labels = torch.arange(batch["input_ids"].shape[0]) % NUM_LABELS
    losses = []
    for _ in range(steps):
        loss = model(**batch, labels=labels, label_distribution=label_distribution).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def assert_descriptor_matters(model, batch) -> None:
    """With a non-trivial adapter, two different client descriptors must give different outputs."""
    make_non_trivial(model)
    model.eval()
    with torch.no_grad():
        a = model(**batch, label_distribution=DESCRIPTORS[0]).logits
        b = model(**batch, label_distribution=DESCRIPTORS[1]).logits
    assert not torch.equal(a, b)


DESCRIPTORS = torch.tensor([[8.0, 1.0, 1.0], [1.0, 8.0, 1.0], [1.0, 1.0, 8.0], [3.0, 3.0, 4.0]])


# ---------------------------------------------------------------------------------------------------- identity


@pytest.mark.parametrize("config", [c2a_config(), BottleneckAdapterConfig(task_type="SEQ_CLS", bottleneck_dim=4)])
def test_wrapped_model_equals_base_at_init(tiny_bert_pair, batch, config):
    model, base = tiny_bert_pair
    peft_model = get_peft_model(model, config).eval()
    kwargs = {"label_distribution": DESCRIPTORS} if isinstance(config, C2AConfig) else {}
    with torch.no_grad():
        expected = base(**batch).logits
        got = peft_model(**batch, **kwargs).logits
    # the adapters start as the identity; only the logit adjustment (C2A's direct path from the label prior) acts
    assert (without_logit_adjustment(peft_model, got) - expected).abs().max().item() <= 1e-6


def test_gradients_at_init_are_finite_and_reach_the_up_path(tiny_bert, batch):
    model = get_peft_model(tiny_bert, c2a_config())
    model.train()
    loss = model(**batch, labels=torch.tensor([0, 1, 2, 0]), label_distribution=DESCRIPTORS).loss
    loss.backward()
    hyper = model.base_model.c2a_hypernet["default"]
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
            assert param.grad.abs().max() < 1e4, f"gradient blow-up in {name}"
    assert hyper.up_basis.grad.abs().sum() > 0, "the zero-initialised up generator must receive a gradient"


# ---------------------------------------------------------------------------------------------------- independence


def test_example_output_does_not_depend_on_batch_or_padding(tiny_bert, batch):
    model = get_peft_model(tiny_bert, c2a_config())
    for phase in ("init", "trained"):
        if phase == "trained":
            make_non_trivial(model)
            train_steps(model, batch, DESCRIPTORS)
        model.eval()
        with torch.no_grad():
            together = model(**batch, label_distribution=DESCRIPTORS).logits
            for i in range(batch["input_ids"].shape[0]):
                length = int(batch["attention_mask"][i].sum())
                alone = model(
                    input_ids=batch["input_ids"][i : i + 1, :length],
                    attention_mask=batch["attention_mask"][i : i + 1, :length],
                    label_distribution=DESCRIPTORS[i],
                ).logits
                assert (alone - together[i]).abs().max().item() <= 1e-5, (phase, i)


def test_mixed_client_batch_equals_per_client_batches(tiny_bert, batch):
    model = get_peft_model(tiny_bert, c2a_config())
    make_non_trivial(model)
    model.eval()
    clients = [DESCRIPTORS[0], DESCRIPTORS[2]]
    owner = torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        mixed = model(**batch, label_distribution=torch.stack([clients[c] for c in owner])).logits
        for client, descriptor in enumerate(clients):
            rows = owner == client
            sub = {key: value[rows] for key, value in batch.items()}
            alone = model(**sub, label_distribution=descriptor).logits
            assert (alone - mixed[rows]).abs().max().item() <= 1e-5


def test_per_example_and_per_position_paths_agree(tiny_bert, batch):
    """The causal (per-position) generation path equals the per-example one when the embedding is constant in time."""
    model = get_peft_model(tiny_bert, c2a_config(use_context=False))
    make_non_trivial(model)
    model.eval()
    layer = next(m for m in model.modules() if isinstance(m, C2ALayer))
    hidden = torch.randn(4, 9, 32)
    with torch.no_grad():
        model(**batch, label_distribution=DESCRIPTORS)  # fills the forward state's descriptor embeddings
        per_example = layer._adapter_delta(hidden, "default")
        conditioning = layer._c2a_conditioning
        static = conditioning.state.descriptor_embeddings["default"]
        hyper = layer._c2a_hypernets["default"]
        # force the per-position path by giving every position its own (identical) embedding
        hyper.context_weight = torch.nn.Parameter(torch.zeros(hyper.client_embed_dim, 32))
        layer.c2a_causal["default"] = True
        conditioning.state = dataclasses.replace(conditioning.state, attention_mask=None)
        per_position = layer._adapter_delta(hidden, "default")
        hyper.context_weight = None
        layer.c2a_causal["default"] = False
    assert static is not None
    assert (per_example - per_position).abs().max().item() <= 1e-5


# ---------------------------------------------------------------------------------------------------- descriptors


def test_different_descriptors_give_different_outputs_after_training(tiny_bert, batch):
    model = get_peft_model(tiny_bert, c2a_config())
    losses = train_steps(model, batch, DESCRIPTORS, steps=10)
    assert losses[-1] < losses[0]
    with torch.no_grad():
        a = model(**batch, label_distribution=DESCRIPTORS[0]).logits
        b = model(**batch, label_distribution=DESCRIPTORS[1]).logits
    assert (a - b).abs().max().item() > 1e-3


def test_gradients_reach_every_trainable_tensor(tiny_bert, batch):
    model = get_peft_model(tiny_bert, c2a_config(num_clients=5))
    make_non_trivial(model)
    model.train()
    out = model(**batch, labels=torch.tensor([0, 1, 2, 0]), label_distribution=DESCRIPTORS, client_ids=[0, 1, 4, 2])
    out.loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
            assert torch.isfinite(param.grad).all(), name


def test_missing_descriptor_at_inference_is_exactly_uniform(tiny_bert, batch):
    model = get_peft_model(tiny_bert, c2a_config())
    make_non_trivial(model)
    model.eval()
    with torch.no_grad():
        missing = model(**batch).logits
        uniform = model(**batch, label_distribution=torch.ones(NUM_LABELS)).logits
        skewed = model(**batch, label_distribution=DESCRIPTORS[0]).logits
    assert torch.equal(missing, uniform)
    assert not torch.equal(missing, skewed)


def test_label_counts_are_normalised(tiny_bert, batch):
    model = get_peft_model(tiny_bert, c2a_config())
    make_non_trivial(model)
    model.eval()
    with torch.no_grad():
        counts = model(**batch, label_distribution=torch.tensor([30, 10, 60])).logits
        probs = model(**batch, label_distribution=torch.tensor([0.3, 0.1, 0.6])).logits
    assert (counts - probs).abs().max().item() <= 1e-6


@pytest.mark.parametrize(
    "descriptor, message",
    [
        (torch.tensor([1.0, float("nan"), 1.0]), "NaN"),
        (torch.tensor([1.0, -1.0, 1.0]), "negative"),
        (torch.tensor([0.0, 0.0, 0.0]), "all-zero"),
        (torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1, 2, 3], [1, 1, 1]]), "all-zero rows \\[1\\]"),
        (torch.tensor([1.0, 1.0]), "shape"),
        (torch.ones(4, 5), "shape"),
    ],
)
def test_bad_descriptors_raise(tiny_bert, batch, descriptor, message):
    model = get_peft_model(tiny_bert, c2a_config()).eval()
    with pytest.raises(ValueError, match=message):
        model(**batch, label_distribution=descriptor)


def test_descriptor_rows_must_match_the_batch(tiny_bert, batch):
    model = get_peft_model(tiny_bert, c2a_config()).eval()
    with pytest.raises(ValueError, match="rows but the batch has 4"):
        model(**batch, label_distribution=torch.ones(3, NUM_LABELS))


def test_training_without_descriptor_raises(tiny_bert, batch):
    model = get_peft_model(tiny_bert, c2a_config())
    model.train()
    with pytest.raises(ValueError, match="without `label_distribution`"):
        model(**batch, labels=torch.tensor([0, 1, 2, 0]))


def test_client_ids_are_checked(tiny_bert, batch):
    model = get_peft_model(tiny_bert, c2a_config(num_clients=3)).eval()
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        model(**batch, client_ids=torch.tensor([0, 1, 3, 0]))
    with pytest.raises(ValueError, match="integer"):
        model(**batch, client_ids=torch.tensor([0.0, 1.0, 2.0, 0.0]))
    model.train()
    with pytest.raises(ValueError, match="without `client_ids`"):
        model(**batch, label_distribution=DESCRIPTORS)


def test_a_classifiers_c2a_adapter_takes_its_number_of_labels(tiny_bert):
    model = get_peft_model(tiny_bert, c2a_config(num_labels=None))
    assert model.peft_config["default"].num_labels == NUM_LABELS
    assert model.base_model.c2a_hypernet["default"].num_labels == NUM_LABELS


def test_descriptor_fields_the_adapter_lacks_raise(tiny_bert, batch):
    # no task type: nothing tells the adapter how many classes there are, so it has no label term
    model = get_peft_model(tiny_bert, c2a_config(num_labels=None, task_type=None)).eval()
    with pytest.raises(ValueError, match="no label term"):
        model(**batch, label_distribution=DESCRIPTORS)
    with pytest.raises(ValueError, match="no client embedding"):
        model(**batch, client_ids=torch.tensor([0, 1, 2, 0]))


def test_client_ids_change_the_output(tiny_bert, batch):
    model = get_peft_model(tiny_bert, c2a_config(num_clients=3))
    make_non_trivial(model)
    model.eval()
    with torch.no_grad():
        a = model(**batch, label_distribution=DESCRIPTORS, client_ids=torch.tensor([0, 0, 0, 0])).logits
        b = model(**batch, label_distribution=DESCRIPTORS, client_ids=torch.tensor([1, 1, 1, 1])).logits
        unknown = model(**batch, label_distribution=DESCRIPTORS).logits
    assert (a - b).abs().max() > 1e-4
    assert (unknown - a).abs().max() > 1e-4


def test_context_manager_sets_the_descriptor(tiny_bert, batch):
    model = get_peft_model(tiny_bert, c2a_config())
    make_non_trivial(model)
    model.eval()
    with torch.no_grad():
        explicit = model(**batch, label_distribution=DESCRIPTORS[0]).logits
        with model.client_descriptor(label_distribution=DESCRIPTORS[0]):
            ambient = model(**batch).logits
            overridden = model(**batch, label_distribution=DESCRIPTORS[1]).logits
        after = model(**batch).logits
        uniform = model(**batch, label_distribution=torch.ones(NUM_LABELS)).logits
    assert torch.equal(explicit, ambient)
    assert not torch.equal(overridden, ambient)
    assert torch.equal(after, uniform)


def test_plain_peft_model_forward_also_routes_descriptors(tiny_bert, batch):
    """`PeftModel.forward` bypasses the tuner's forward; the pre-hook on the wrapped model must still see the kwargs."""
    from peft import PeftModel

    assert_descriptor_matters(PeftModel(tiny_bert, c2a_config(task_type=None)), batch)


# ---------------------------------------------------------------------------------------------------- trainability


def test_only_adapter_parts_train_and_count_is_right(tiny_bert):
    model = get_peft_model(tiny_bert, c2a_config())
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    for name in trainable:
        assert "c2a_hypernet" in name or "c2a_down_bias" in name or "c2a_up_bias" in name or "classifier" in name, name
    frozen_layer_norms = [n for n, p in model.named_parameters() if "LayerNorm" in n]
    assert frozen_layer_norms and not any(n in trainable for n in frozen_layer_norms)
    expected = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert model.get_nb_trainable_parameters() == (expected, total)
    hyper = model.base_model.c2a_hypernet["default"]
    assert all(p.requires_grad for p in hyper.parameters())


def test_c2a_trains_fewer_non_head_parameters_than_bottleneck_on_bert_base_shape():
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    counts = {}
    for name, peft_config in (
        ("c2a", C2AConfig(task_type="SEQ_CLS", num_labels=5, bottleneck_dim=16)),
        ("bottleneck", BottleneckAdapterConfig(task_type="SEQ_CLS", bottleneck_dim=16)),
    ):
        torch.manual_seed(0)
        base = BertForSequenceClassification(BertConfig(**config.to_dict(), num_labels=5))
        model = get_peft_model(base, peft_config)
        counts[name] = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n)
    # numbers recorded in docs/concepts.md
    assert counts["bottleneck"] == 24 * (2 * 768 * 16 + 16 + 768)
    assert counts["c2a"] < counts["bottleneck"] / 4, counts


# ---------------------------------------------------------------------------------------------------- errors on wrap


def test_wrong_target_modules_raise_and_leave_the_model_untouched(tiny_bert):
    before = {name: type(module) for name, module in tiny_bert.named_modules()}
    with pytest.raises(ValueError, match="LayerNorm.*linear output projections"):
        get_peft_model(tiny_bert, c2a_config(target_modules=["output.dense", "output.LayerNorm"]))
    assert {name: type(module) for name, module in tiny_bert.named_modules()} == before
    with pytest.raises(ValueError, match="matched no module.*Linear modules seen"):
        get_peft_model(copy.deepcopy(tiny_bert), c2a_config(target_modules=["no_such_module"]))


def test_a_failed_wrap_leaves_no_hooks_behind(tiny_bert, batch):
    with pytest.raises(ValueError, match="one width"):
        get_peft_model(tiny_bert, c2a_config(target_modules=["output.dense", "intermediate.dense"]))
    assert not tiny_bert._forward_pre_hooks and "generate" not in vars(tiny_bert)
    assert_descriptor_matters(get_peft_model(tiny_bert, c2a_config()), batch)


def test_a_label_count_other_than_the_classifiers_sizes_the_trained_head(tiny_bert):
    # the head is trained with the adapter (modules_to_save), so it takes the adapter's classes; a head that is not
    # saved with the adapter raises instead (tests/tuner/test_auto_load.py)
    model = get_peft_model(tiny_bert, c2a_config(num_labels=5))
    assert model.config.num_labels == 5 and tiny_bert.classifier.original_module.out_features == 5


def test_unknown_architecture_names_the_modules_seen():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj_in = torch.nn.Linear(4, 4)
            self.proj_out = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.proj_out(self.proj_in(x))

    with pytest.raises(ValueError, match=r"proj_in.*proj_out.*target_modules"):
        get_peft_model(Tiny(), C2AConfig(bottleneck_dim=2, use_context=False))
    model = get_peft_model(Tiny(), C2AConfig(bottleneck_dim=2, target_modules=["proj_out"]))
    assert isinstance(model.base_model.model.proj_out, C2ALayer)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"bottleneck_dim": 0}, "bottleneck_dim"),
        ({"client_embed_dim": 0}, "client_embed_dim"),
        ({"num_labels": 0}, "num_labels"),
        ({"adapter_activation": "no-such-act"}, "adapter_activation"),
        ({"adapter_dropout": 1.0}, "adapter_dropout"),
        ({"target_parameters": ["w"]}, "target_parameters"),
    ],
)
def test_bad_config_values_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        C2AConfig(**kwargs)


def test_merging_is_refused_with_a_clear_error(tiny_bert):
    model = get_peft_model(tiny_bert, c2a_config())
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()


def test_unload_restores_the_base_model(tiny_bert_pair, batch):
    model, base = tiny_bert_pair
    peft_model = get_peft_model(model, c2a_config())
    make_non_trivial(peft_model)
    unloaded = peft_model.unload().eval()
    assert not any(isinstance(m, C2ALayer) for m in unloaded.modules())
    with torch.no_grad():
        # the classifier is a trained modules_to_save copy; compare the encoder output instead
        assert torch.equal(unloaded.bert(**batch).last_hidden_state, base.bert(**batch).last_hidden_state)


def test_peft_version_pin_is_enforced():
    from peft_c2a.registration import check_peft_version

    check_peft_version("0.21.2")
    for version in ("0.20.0", "0.22.0"):
        with pytest.raises(ImportError, match=r"peft>=0.21.0,<0.22.0"):
            check_peft_version(version)


def test_pyproject_pins_the_supported_peft_series():
    import pathlib

    pyproject = (pathlib.Path(__file__).parents[2] / "pyproject.toml").read_text()
    assert '"peft>=0.21,<0.22"' in pyproject
    assert peft_c2a.registration.SUPPORTED_PEFT[1].release == (0, 22, 0)


def test_packaging_claims_hold():
    """The Python floor is the one the pinned stack needs, the internals the trainer uses are pinned to the tested
    minors, and the declared licence file exists."""
    import pathlib
    import sys

    import tomllib

    root = pathlib.Path(__file__).parents[2]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11" and sys.version_info >= (3, 11)
    assert "transformers>=5.25,<5.26" in project["dependencies"]
    assert "accelerate>=1.16,<1.17" in project["dependencies"]
    assert project["license-files"] == ["LICENSE"]
    assert "Apache License" in (root / "LICENSE").read_text()


def test_a_plain_trainer_that_drops_the_descriptor_column_is_told_why(tiny_bert, tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    data = Dataset.from_dict(
        {
            "input_ids": [[1, 2, 3, 4]] * 4,
            "attention_mask": [[1, 1, 1, 1]] * 4,
            "labels": [0, 1, 2, 0],
            "label_distribution": [[0.5, 0.25, 0.25]] * 4,
        }
    )
    model = get_peft_model(tiny_bert, c2a_config())
    args = TrainingArguments(str(tmp_path), max_steps=1, report_to=[], use_cpu=True, per_device_train_batch_size=2)
    with pytest.raises(ValueError, match="remove_unused_columns=False.*DescriptorCollator"):
        Trainer(model=model, args=args, train_dataset=data).train()
    kept = TrainingArguments(
        str(tmp_path),
        max_steps=1,
        report_to=[],
        use_cpu=True,
        per_device_train_batch_size=2,
        remove_unused_columns=False,
    )
    assert Trainer(model=model, args=kept, train_dataset=data).train().global_step == 1
