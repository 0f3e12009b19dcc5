"""LLaVA's `group_by_modality_length` batch order, deterministic per (seed, epoch) and exactly resumable.

`lengths[i]` is > 0 for a sample with an image and < 0 for a text-only one (LLaVA's `modality_lengths`: the
word count of the conversation). LLaVA (llava/train/llava_trainer.py) builds one global order per epoch:
- each modality apart: a random permutation cut into megabatches of `micro x groups` samples, each sorted by
  length (longest first) and dealt into `groups` chunks of `micro` by greedy balancing (`split_to_even_chunks`);
- the megabatches of both modalities shuffled together, the two incomplete last ones merged at the end;
- `groups` = world size x gradient accumulation; consecutive chunks of `micro` are the micro-batches, and
  rank r takes micro-batches r, r + world, r + 2 world, ... (accelerate's batch sharding).
So a micro-batch never mixes modalities (except the final merged one), and the ranks of one optimizer step
see similar lengths. Difference from LLaVA: its per-modality permutations draw from torch's global RNG
(`generator=None`); here every draw comes from one generator seeded by (seed, epoch), so the order is a pure
function of (seed, epoch, lengths, micro, groups) and a resumed run recomputes it. The incomplete tail
(fewer than world x micro samples) is dropped rather than wrapped around.
"""
from __future__ import annotations

import torch


def _split_to_even_chunks(indices: list[int], lengths: list[int], chunks: int) -> list[list[int]]:
    """Greedy: each index (longest first) to the chunk with the smallest total so far; a full chunk is closed."""
    if len(indices) % chunks:
        return [indices[i::chunks] for i in range(chunks)]
    per_chunk = len(indices) // chunks
    out: list[list[int]] = [[] for _ in range(chunks)]
    totals = [0.0] * chunks
    for index in indices:
        shortest = totals.index(min(totals))
        out[shortest].append(index)
        totals[shortest] += lengths[index]
        if len(out[shortest]) == per_chunk:
            totals[shortest] = float("inf")
    return out


def _length_grouped(lengths: list[int], micro: int, groups: int, generator: torch.Generator) -> list[int]:
    order = torch.randperm(len(lengths), generator=generator).tolist()
    size = micro * groups
    megabatches = [sorted(order[i:i + size], key=lambda j: lengths[j], reverse=True)
                   for i in range(0, len(order), size)]
    return [j for mb in megabatches for chunk in _split_to_even_chunks(mb, lengths, groups) for j in chunk]


def modality_grouped_order(lengths: list[int], micro: int, groups: int, seed: int, epoch: int) -> list[int]:
    """The epoch's global sample order (LLaVA's get_modality_length_grouped_indices, seeded)."""
    if any(length == 0 for length in lengths):
        raise ValueError("modality lengths must be non-zero (positive: with image, negative: text only)")
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    if all(length > 0 for length in lengths) or all(length < 0 for length in lengths):
        return _length_grouped([abs(x) for x in lengths], micro, groups, generator)
    mm = [i for i, x in enumerate(lengths) if x > 0]
    lang = [i for i, x in enumerate(lengths) if x < 0]
    mm_order = [mm[i] for i in _length_grouped([lengths[i] for i in mm], micro, groups, generator)]
    lang_order = [lang[i] for i in _length_grouped([-lengths[i] for i in lang], micro, groups, generator)]
    size = micro * groups
    mm_mb = [mm_order[i:i + size] for i in range(0, len(mm_order), size)]
    lang_mb = [lang_order[i:i + size] for i in range(0, len(lang_order), size)]
    tail = mm_mb[-1] + lang_mb[-1]
    megabatches = mm_mb[:-1] + lang_mb[:-1]
    megabatches = [megabatches[i] for i in torch.randperm(len(megabatches), generator=generator).tolist()]
    if tail:
        megabatches.append(sorted(tail))
    return [i for mb in megabatches for i in mb]


def random_order(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def rank_batches(lengths: list[int], micro: int, world: int, accum: int, seed: int, epoch: int, rank: int,
                 grouped: bool = True) -> list[list[int]]:
    """This rank's micro-batches (lists of sample indices) for one epoch; every rank gets the same count."""
    order = (modality_grouped_order(lengths, micro, world * accum, seed, epoch) if grouped
             else random_order(len(lengths), seed, epoch))
    batches = [order[i:i + micro] for i in range(0, len(order) - micro + 1, micro)]  # (n_batches, micro)
    per_rank = len(batches) // world
    return batches[rank::world][:per_rank]
