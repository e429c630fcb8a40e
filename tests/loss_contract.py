"""Models, data and the reference update for the Trainer loss-contract tests (tests/test_faults.py and
tests/loss_contract_worker.py).

Every dataset has 8 examples whose numbers of loss items differ (labels -100, padded LM targets), so a loss averaged
per micro-batch and a loss normalised over the whole batch give different updates.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from modeling_compressm import CompreSSMConfig, CompreSSMForCausalLM, CompreSSMForSequenceClassification

HEADS = ("classifier", "regression", "multi_label", "lm")
LEARNING_RATE = 0.5
VOCAB = 20
LENGTHS = [6, 3, 5, 2, 6, 4, 6, 3]


class ExamplesDataset(Dataset):
    def __init__(self, examples: list[dict]):
        self.examples = examples

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, index):
        return self.examples[index]


def build_head(head: str):
    """A tiny model for `head`, initialised from a fixed seed (the same weights on every call and rank)."""
    torch.manual_seed(0)
    num_labels = {"classifier": 3, "regression": 1, "multi_label": 3, "lm": 2}[head]
    config = CompreSSMConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=2, state_dims=[5, 3], pad_token_id=0,
                             num_labels=num_labels, pooling="mean")
    if head == "multi_label":
        config.problem_type = "multi_label_classification"
    if head == "lm":
        return CompreSSMForCausalLM(config)
    return CompreSSMForSequenceClassification(config)


def dataset_for(head: str) -> ExamplesDataset:
    generator = torch.Generator().manual_seed(1)
    examples = []
    for index, length in enumerate(LENGTHS):
        ids = torch.zeros(6, dtype=torch.long)
        ids[:length] = torch.randint(1, VOCAB, (length,), generator=generator)
        mask = (ids != 0).long()
        if head == "lm":
            labels = ids.masked_fill(mask == 0, -100)
            labels[0] = -100  # never a target after the shift; keeps the Trainer's item count version-independent
        elif head == "classifier":
            labels = torch.tensor([0, 1, 2, -100, 1, 0, -100, 2][index])
        elif head == "regression":
            labels = torch.randn((), generator=generator)
        else:
            labels = (torch.rand(3, generator=generator) > 0.5).float()
        examples.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return ExamplesDataset(examples)


def reference_update(model, dataset: ExamplesDataset) -> dict[str, torch.Tensor]:
    """The plain-SGD update of one step on the whole dataset as one batch: -lr * grad of the mean loss over all items."""
    batch = {key: torch.stack([example[key] for example in dataset.examples]) for key in dataset.examples[0]}
    model.train()
    model.zero_grad()
    model(**batch).loss.backward()
    return {name: -LEARNING_RATE * p.grad.detach().clone() for name, p in model.named_parameters()}
