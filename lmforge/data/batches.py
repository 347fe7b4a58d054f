"""Batches of variable-length examples (chat conversations, preference pairs) for the
fine-tuning stages.

The one idea: which examples form micro-batch `i` of a run is a pure function of `i` and the
seed. Each epoch shuffles, groups examples of similar length (less padding) and shuffles the
groups, so a resumed run needs nothing but its step to continue with the very same batches.
"""

from __future__ import annotations

import numpy as np


def epoch_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch's micro-batches of example indices. A seeded shuffle, then each window of 64
    batches is sorted by length and cut into batches (so a batch pads to a similar length: on
    the bundled data this halves the padding), then the batches are shuffled."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    window = 64 * batch_size
    batches = []
    for w in range(0, len(order), window):
        chunk = order[w : w + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size].tolist() for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


class BatchPlan:
    """Micro-batch `index` of the whole run -> example indices, a pure function of the index
    (epochs follow one another), so resuming at a step needs nothing but the step."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed = np.asarray(lengths), batch_size, seed
        self.per_epoch = len(epoch_batches(self.lengths, batch_size, seed, 0))
        self._cache: dict[int, list[list[int]]] = {}

    def __call__(self, index: int) -> list[int]:
        epoch, i = divmod(index, self.per_epoch)
        if epoch not in self._cache:
            self._cache = {epoch: epoch_batches(self.lengths, self.batch_size, self.seed, epoch)}
        return self._cache[epoch][i]
