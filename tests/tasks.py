"""Small synthetic training tasks shared by the Trainer tests and the DDP worker (generated locally)."""

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
