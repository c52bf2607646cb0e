"""The lesson's two conceptual demonstrations, reproducible (``forgetguard demo --toy``).

1. A tiny two-head network learns Task A, then is fine-tuned hard on a very different Task B
   through the shared layer: Task A's loss gets many times worse (the forgetting ratio).
2. A single shared weight at Task A's optimum (1.0) is pulled to Task B's optimum (-2.0) by ten
   SGD steps: Task A's loss goes from 0 to 9.

Both are the lesson's code, seeded. The shared-weight demo also shows the lesson's EWC penalty
on the same weight, which keeps it between the two optima.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.optim as optim


class TinyModel(nn.Module):
    """The lesson's network: a shared representation and one head per task."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(10, 20)  # shared representation
        self.head_a = nn.Linear(20, 1)  # Task A: general reasoning
        self.head_b = nn.Linear(20, 1)  # Task B: domain task

    def forward(self, x: torch.Tensor, task: str = "a") -> torch.Tensor:
        features = torch.relu(self.shared(x))
        if task == "a":
            return self.head_a(features)
        return self.head_b(features)


@dataclass(frozen=True)
class ForgettingRatio:
    task_a_loss_before: float
    task_a_loss_after: float

    @property
    def ratio(self) -> float:
        return self.task_a_loss_after / self.task_a_loss_before


def forgetting_ratio(seed: int = 0, *, lr: float = 0.5, epochs: int = 50) -> ForgettingRatio:
    """The lesson's first demonstration: pre-train on Task A, fine-tune on Task B, re-measure A."""
    torch.manual_seed(seed)
    model = TinyModel()
    optimizer = optim.SGD(model.parameters(), lr=0.1)
    # Phase 1: pre-train on Task A (general language)
    task_a_data = [(torch.randn(10), torch.tensor([1.0])) for _ in range(100)]
    for x, y in task_a_data:
        loss = nn.MSELoss()(model(x, task="a"), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    def task_a_loss() -> float:
        with torch.no_grad():
            return sum(nn.MSELoss()(model(x, task="a"), y).item() for x, y in task_a_data[:20]) / 20

    before = task_a_loss()
    # Phase 2: fine-tune aggressively on Task B (small inputs, large targets, high LR)
    task_b_data = [(torch.randn(10) * 0.01, torch.tensor([5.0])) for _ in range(50)]
    optimizer_ft = optim.SGD(model.parameters(), lr=lr)
    for _ in range(epochs):
        for x, y in task_b_data:
            loss = nn.MSELoss()(model(x, task="b"), y)
            loss.backward()
            optimizer_ft.step()
            optimizer_ft.zero_grad()
    return ForgettingRatio(before, task_a_loss())


@dataclass(frozen=True)
class SharedWeight:
    w_before: float
    w_after: float
    task_a_loss_before: float
    task_b_loss_before: float
    task_a_loss_after: float
    task_b_loss_after: float


def shared_weight(*, steps: int = 10, lr: float = 0.5, ewc_importance: float = 0.0) -> SharedWeight:
    """The lesson's second demonstration; ``ewc_importance`` λ > 0 adds ``λ·F·(w − 1)²``, F = 2.

    F = 2 is the curvature of Task A's loss ``(w − 1)²`` at its optimum, so the penalized
    optimum is ``(λ·F − 2) / (λ·F + 1)``: between the two tasks' optima. (At lr 0.5, SGD stays
    stable for λ < 0.5.)
    """
    w = torch.tensor(1.0, requires_grad=True)  # pre-trained value (Task A optimal)

    def task_a_loss(value: torch.Tensor) -> torch.Tensor:
        return (value - 1.0) ** 2

    def task_b_loss(value: torch.Tensor) -> torch.Tensor:
        return (value + 2.0) ** 2

    a0, b0 = task_a_loss(w).item(), task_b_loss(w).item()
    optimizer = optim.SGD([w], lr=lr)
    for _ in range(steps):
        loss = task_b_loss(w) + ewc_importance * 2.0 * (w - 1.0) ** 2
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return SharedWeight(1.0, w.item(), a0, b0, task_a_loss(w).item(), task_b_loss(w).item())


def report(seeds: int = 5) -> str:
    """Both demonstrations as printable text (the first over ``seeds`` seeds: it varies a lot)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # scalar-sized ops: threads only add overhead
    try:
        ratios = [forgetting_ratio(seed) for seed in range(seeds)]
        plain = shared_weight()
        ewc = shared_weight(ewc_importance=0.25)
    finally:
        torch.set_num_threads(threads)
    first = ratios[0]
    lines = [
        "1. Two-head network (the lesson: 'Typical output with high LR: 15x worse')",
        f"   Task A loss before fine-tuning: {first.task_a_loss_before:.4f}   (seed 0)",
        f"   Task A loss after fine-tuning:  {first.task_a_loss_after:.4f}",
        f"   Forgetting ratio: {first.ratio:.1f}x worse",
        f"   Seeds 0-{seeds - 1}: " + ", ".join(f"{r.ratio:.1f}x" for r in ratios),
        "",
        "2. One shared weight (Task A optimum 1.0, Task B optimum -2.0), 10 SGD steps at lr 0.5",
        f"   w: {plain.w_before:.2f} -> {plain.w_after:.2f}",
        f"   Task A loss: {plain.task_a_loss_before:.2f} -> {plain.task_a_loss_after:.2f}"
        "   (forgot Task A)",
        f"   Task B loss: {plain.task_b_loss_before:.2f} -> {plain.task_b_loss_after:.2f}"
        "   (learned Task B)",
        "   Same steps with an EWC penalty on w (importance 0.25, Fisher 2):",
        f"   w: {ewc.w_before:.2f} -> {ewc.w_after:.2f}, Task A loss {ewc.task_a_loss_after:.2f}, "
        f"Task B loss {ewc.task_b_loss_after:.2f}",
    ]
    return "\n".join(lines)
