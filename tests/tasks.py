"""Small synthetic training tasks and tiny models shared by the Trainer tests and the workers (generated locally)."""

import pytest
import torch
from torch.utils.data import Dataset


class SignTask(Dataset):
    """inputs_embeds: float (L, 1) noise; label: whether the first 4 inputs sum to a positive number."""

    def __init__(self, size: int, length: int = 16, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.inputs = torch.randn(size, length, 1, generator=generator)
        self.labels = (self.inputs[:, :4, 0].sum(dim=1) > 0).long()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {"inputs_embeds": self.inputs[index], "labels": self.labels[index]}


def tiny_classifier(state_dims=16, seed=0):
    """A 2-layer CompreSSM classifier of SignTask inputs (hidden 16), seeded."""
    from modeling_compressm import CompreSSMConfig, CompreSSMForSequenceClassification

    torch.manual_seed(seed)
    config = CompreSSMConfig(input_dim=1, hidden_size=16, num_hidden_layers=2, state_dims=state_dims, num_labels=2)
    return CompreSSMForSequenceClassification(config)


@pytest.fixture
def one_thread():
    """Tiny models: thread start-up dominates, and 2 threads on a busy 2-core machine are ~100x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def training_arguments(output_dir, **overrides):
    """TrainingArguments of the tiny CPU Trainer runs in the tests (quiet, no saving, one seed), with overrides."""
    from transformers import TrainingArguments

    values = dict(
        output_dir=str(output_dir), max_steps=10, per_device_train_batch_size=16, learning_rate=3e-3,
        logging_steps=100, report_to="none", disable_tqdm=True, save_strategy="no", use_cpu=True, seed=0,
    )
    values.update(overrides)
    return TrainingArguments(**values)
