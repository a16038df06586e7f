"""The real packaged MiniLM (all-MiniLM-L6-v2) with C2A on real BBC News text. Marked slow (~1 minute)."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

import peft_c2a
from peft_c2a.assets import BBC_LABELS, load_bbc_news, minilm_path

from ..conftest import without_logit_adjustment

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bbc_batch():
    data = load_bbc_news(seed=0)["train"]
    # two clients: one holds business + politics, the other sport + tech
    rows = {0: [], 1: []}
    for index, label in enumerate(data["label"]):
        client = 0 if label in (0, 2) else 1 if label in (3, 4) else None
        if client is not None and len(rows[client]) < 16:
            rows[client].append(index)
    indices = rows[0] + rows[1]
    subset = data.select(indices)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    batch = dict(tokenizer(list(subset["text"]), truncation=True, max_length=64, padding=True, return_tensors="pt"))
    labels = torch.tensor(list(subset["label"]))
    descriptors = torch.stack(
        [torch.bincount(labels[:16], minlength=5).float(), torch.bincount(labels[16:], minlength=5).float()]
    )
    owner = torch.tensor([0] * 16 + [1] * 16)
    return tokenizer, batch, labels, descriptors / descriptors.sum(-1, keepdim=True), owner, list(subset["text"])


def test_c2a_on_real_minilm_learns_saves_and_serves_a_pipeline(bbc_batch, tmp_path):
    tokenizer, batch, labels, descriptors, owner, texts = bbc_batch
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=len(BBC_LABELS))
    with torch.no_grad():
        base_logits = base.eval()(**batch).logits
    model = get_peft_model(base, peft_c2a.C2AConfig(task_type="SEQ_CLS", num_labels=5, bottleneck_dim=16, init_seed=0))
    model.eval()
    with torch.no_grad():
        logits = model(**batch, label_distribution=descriptors[owner]).logits
    # the adapters start as the identity; only the logit adjustment (the client's prior) moves the logits
    assert (without_logit_adjustment(model, logits) - base_logits).abs().max() <= 1e-5

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    model.train()
    for step in range(12):
        rows = torch.randperm(32, generator=torch.Generator().manual_seed(step))[:16]
        out = model(
            **{k: v[rows] for k, v in batch.items()}, labels=labels[rows], label_distribution=descriptors[owner[rows]]
        )
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses

    model.eval()
    with torch.no_grad():
        own = model(**batch, label_distribution=descriptors[owner]).logits
        swapped = model(**batch, label_distribution=descriptors[1 - owner]).logits
    assert (own - swapped).abs().max() > 1e-3, "the descriptor must matter after training"

    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=5), tmp_path
    ).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**batch, label_distribution=descriptors[owner]).logits, own)

    # pipelines cannot pass extra kwargs: the context manager conditions them
    classifier = pipeline("text-classification", model=reloaded, tokenizer=tokenizer, truncation=True, max_length=64)
    with reloaded.client_descriptor(label_distribution=descriptors[0]):
        piped = classifier(texts[:3], top_k=None)
    with torch.no_grad():
        direct = reloaded(**{k: v[:3] for k, v in batch.items()}, label_distribution=descriptors[0]).logits.softmax(-1)
    for row, scores in enumerate(piped):
        by_label = {int(item["label"].split("_")[-1]): item["score"] for item in scores}
        for label, score in by_label.items():
            assert abs(score - direct[row, label].item()) < 1e-4
