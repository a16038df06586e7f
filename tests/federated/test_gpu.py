"""The CUDA paths of `FederatedTrainer`: fp32 on a GPU gives the CPU's update, `fp16` trains through accelerate's
gradient scaler, `bf16` autocasts. Marked `gpu`; they skip where torch sees no CUDA device (`pytest -m gpu` on a GPU
machine runs them)."""

from __future__ import annotations

import pytest
import torch

from ..federated_utils import fed_args, tiny_model
from .test_federated_trainer import make_clients, norm_of_difference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def train_one_round(tmp_path, **overrides):
    from transformers import default_data_collator

    from peft_c2a.federated import FederatedTrainer

    clients, tests = make_clients({"client-a": 12, "client-b": 16}, eval_size=6)
    args = fed_args(tmp_path, num_rounds=1, **overrides)
    trainer = FederatedTrainer(tiny_model("c2a"), args, clients, tests, data_collator=default_data_collator)
    start = {key: value.clone() for key, value in trainer.get_trainable_state().items()}
    trainer.train()
    return trainer, start


def update_norm(trainer, start) -> float:
    return norm_of_difference(trainer.global_state, {key: start[key] for key in trainer.global_state})


def test_fp32_on_cuda_gives_the_cpu_update(tmp_path):
    on_cpu, start = train_one_round(tmp_path / "cpu", use_cpu=True)
    on_gpu, _ = train_one_round(tmp_path / "gpu", use_cpu=False)
    assert on_gpu.args.device.type == "cuda"
    assert norm_of_difference(on_gpu.global_state, on_cpu.global_state) <= 1e-4 * max(update_norm(on_cpu, start), 1e-6)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_on_cuda_trains_close_to_fp32(tmp_path, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    reference, start = train_one_round(tmp_path / "fp32", use_cpu=False)
    mixed, _ = train_one_round(tmp_path / precision, use_cpu=False, **{precision: True})
    if precision == "fp16":
        assert mixed.accelerator.scaler is not None  # gradients are scaled, and unscaled before clipping
    assert all(torch.isfinite(value).all() for value in mixed.global_state.values())
    # the same direction and size as fp32, up to half precision's rounding
    difference = norm_of_difference(mixed.global_state, reference.global_state)
    assert difference <= 0.1 * update_norm(reference, start)
    scores = mixed.history[-1]
    assert 0.0 <= scores["eval_personalized_mean_accuracy"] <= 1.0
