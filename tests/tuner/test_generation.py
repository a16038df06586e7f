"""Generation-specific behaviour of C2A on a tiny GPT-2: descriptor expansion and the beam-search guard."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

from peft_c2a import C2AConfig

from ..conftest import activate_up_path


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=2, pad_token_id=0))


def tiny_gpt2_c2a(peft_model_cls=None, **config):
    """A tiny GPT-2 with a C2A adapter whose up path is switched on."""
    c2a_config = C2AConfig(bottleneck_dim=4, init_seed=0, **config)
    model = (
        get_peft_model(tiny_gpt2(), c2a_config) if peft_model_cls is None else peft_model_cls(tiny_gpt2(), c2a_config)
    )
    with torch.no_grad():
        activate_up_path(model.base_model.c2a_hypernet["default"])
    return model.eval()


@pytest.fixture
def gpt2_c2a():
    return tiny_gpt2_c2a(task_type="CAUSAL_LM", num_clients=3)


def prompt():
    return torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]]), torch.ones(2, 4, dtype=torch.long)


def test_beam_search_is_refused_with_causal_context(gpt2_c2a):
    input_ids, attention_mask = prompt()
    with pytest.raises(ValueError, match="Beam search is not supported"):
        gpt2_c2a.generate(input_ids=input_ids, attention_mask=attention_mask, num_beams=2, max_new_tokens=3)


def test_per_prompt_descriptors_follow_num_return_sequences(gpt2_c2a):
    input_ids, attention_mask = prompt()
    torch.manual_seed(1)
    out = gpt2_c2a.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        client_ids=torch.tensor([0, 2]),
        do_sample=True,
        num_return_sequences=3,
        max_new_tokens=4,
    )
    assert out.shape == (6, 8)
    assert torch.equal(out[:3, :4], input_ids[:1].expand(3, -1)) and torch.equal(
        out[3:, :4], input_ids[1:].expand(3, -1)
    )


def first_step_logits(model, client: int) -> torch.Tensor:
    """Logits of the first greedily generated token, with both prompts from one client."""
    input_ids, attention_mask = prompt()
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        client_ids=torch.tensor([client, client]),
        max_new_tokens=3,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return out.logits[0]


def test_generation_depends_on_the_client(gpt2_c2a):
    assert (first_step_logits(gpt2_c2a, 0) - first_step_logits(gpt2_c2a, 1)).abs().max() > 1e-4


def test_shared_integer_label_counts_with_several_return_sequences():
    model = tiny_gpt2_c2a(task_type="CAUSAL_LM", num_labels=3)
    input_ids, attention_mask = prompt()
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        label_distribution=[3, 1, 0],
        do_sample=True,
        num_return_sequences=2,
        max_new_tokens=2,
    )
    assert out.shape == (4, 6)


def test_beam_search_without_context_expands_per_prompt_descriptors():
    model = tiny_gpt2_c2a(task_type="CAUSAL_LM", num_clients=3, use_context=False)
    input_ids, attention_mask = prompt()
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        client_ids=torch.tensor([0, 2]),
        num_beams=3,
        max_new_tokens=3,
    )
    assert out.shape == (2, 7)


def test_plain_peft_model_generate_accepts_descriptors():
    """`PeftModel.generate` (no task type) calls the base model's generate directly; it must take the descriptor."""
    from peft import PeftModel

    model = tiny_gpt2_c2a(PeftModel, num_clients=3)
    assert (first_step_logits(model, 0) - first_step_logits(model, 1)).abs().max() > 1e-4


def test_seq2seq_generate_conditions_the_encoder_too():
    """generate() runs a seq2seq encoder on its own; it must see the descriptor given to generate()."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=50, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=2, decoder_start_token_id=0, pad_token_id=0
    )
    model = get_peft_model(
        T5ForConditionalGeneration(config),
        C2AConfig(task_type="SEQ_2_SEQ_LM", num_clients=3, bottleneck_dim=4, init_seed=0),
    ).eval()
    with torch.no_grad():
        activate_up_path(model.base_model.c2a_hypernet["default"])
        model.base_model.c2a_hypernet["default"].client_embedding.mul_(5.0)
    input_ids, attention_mask = prompt()
    client_ids = torch.tensor([1, 2])
    with torch.no_grad():
        model(input_ids=input_ids, decoder_input_ids=input_ids, client_ids=torch.tensor([0, 0]))  # a stale forward
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            client_ids=client_ids,
            max_new_tokens=3,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        full = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=out.sequences[:, :-1],
            client_ids=client_ids,
        ).logits
    for step, step_logits in enumerate(out.logits):
        assert (step_logits - full[:, step]).abs().max() <= 1e-4, step
