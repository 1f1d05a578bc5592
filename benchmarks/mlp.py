"""The small MLP, data and loss shared by the benchmarks (imports torch only)."""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

INPUTS, HIDDEN, CLASSES = 32, 64, 10
DATASET_SIZE, BATCH_SIZE = 8192, 256


def make_model(hidden: int = HIDDEN) -> nn.Module:
    return nn.Sequential(
        nn.Linear(INPUTS, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, CLASSES),
    )


def make_data(seed: int = 0) -> TensorDataset:
    """Inputs labelled by a random teacher network, so that the task is learnable."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(DATASET_SIZE, INPUTS, generator=generator)
    teacher = torch.randn(INPUTS, CLASSES, generator=generator)
    labels = torch.tanh(inputs @ teacher).argmax(dim=1)
    return TensorDataset(inputs, labels)


def make_loader(dataset: TensorDataset) -> DataLoader:
    return DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True)


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    inputs, labels = batch
    return F.cross_entropy(model(inputs), labels)


def trained_model(
    dataset: TensorDataset, hidden: int = HIDDEN, steps: int = 1500, seed: int = 0
) -> nn.Module:
    """The MLP after ``steps`` Adam steps: the weights w* the LLC is estimated at."""
    torch.manual_seed(seed)
    model = make_model(hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    inputs, labels = dataset.tensors
    for _ in range(steps):
        index = torch.randint(0, len(inputs), (BATCH_SIZE,))
        optimizer.zero_grad()
        loss_fn(model, (inputs[index], labels[index])).backward()
        optimizer.step()
    return model
