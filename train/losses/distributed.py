"""Small torch.distributed helpers used by the loss modules; all degrade to no-ops in one process."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor


def is_distributed() -> bool:
    """True when a default process group is up."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of ranks in the default group, 1 when torch.distributed is not initialised."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank in the default group, 0 when torch.distributed is not initialised."""
    return dist.get_rank() if is_distributed() else 0


def check_same_shape_on_all_ranks(x: Tensor, name: str = "tensor") -> None:
    """Raise a ValueError on every rank unless ``x`` has the same shape everywhere.

    One tiny all_gather of the shape (plus a host sync); every rank must call it together.
    """
    if world_size() == 1:
        return
    shape = torch.tensor([x.dim(), *x.shape], dtype=torch.long, device=x.device)  # (1 + ndim,)
    # Pad to a fixed length so ranks with a different number of dims still exchange equal sizes.
    padded = torch.full((9,), -1, dtype=torch.long, device=x.device)  # (9,)
    padded[: min(9, shape.numel())] = shape[:9]
    gathered = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(gathered, padded)
    shapes = [tuple(t.tolist()) for t in gathered]
    if any(s != shapes[0] for s in shapes):
        readable = [s[1 : 1 + s[0]] if s[0] >= 0 else s for s in shapes]
        raise ValueError(
            f"{name}: every rank must pass the same local shape to the gathered loss, got "
            + ", ".join(f"rank {r}: {tuple(s)}" for r, s in enumerate(readable))
            + " (use drop_last=True or an equal-length sampler)"
        )


def gather_with_grad(x: Tensor, check_sizes: bool = True) -> tuple[Tensor, int]:
    """All-gather ``x`` (B, ...) from every rank along dim 0, keeping the gradient path.

    Returns (x_all, offset): x_all is (world * B, ...) in rank order and this rank's rows are
    x_all[offset : offset + B]. In backward, the gradients flowing into every copy of a rank's
    rows are summed back onto that rank (reduce-scatter; emulated with scatters on gloo).
    Every rank needs the same local shape; ``check_sizes`` verifies it with one tiny extra
    collective and raises a clear ValueError instead of hanging or mis-gathering. Turn it off
    only on every rank at once.
    """
    if world_size() == 1:
        return x, 0
    if check_sizes:
        check_same_shape_on_all_ranks(x, "gather_with_grad input")
    pieces = dist_fn.all_gather(x)  # world x (B, ...)
    return torch.cat(pieces, dim=0), rank() * x.shape[0]  # (world * B, ...)


@torch.no_grad()
def all_reduce_sum_(t: Tensor) -> Tensor:
    """Sum ``t`` across ranks in place (no gradient); returns ``t``. No-op in one process."""
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
