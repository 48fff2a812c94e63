"""The training data stream as a function of the iteration, so that a resumed run continues it.

detectron2's ``TrainingSampler`` is an endless stream of shuffles from one generator, and the
augmentations draw from each process's global random state; a run resumed from a checkpoint
starts both over, and its batches and crops differ from the uninterrupted run's. Here every
sample is a *draw*: draw d is image ``permutation(epoch)[d % N]`` with ``epoch = d // N`` (one
seeded permutation per epoch) and is augmented under random states seeded by (seed, d). Process
``rank`` of ``world_size`` takes draws ``q * world_size + rank`` for q = 0, 1, ..., so its
batch at iteration i holds q = i * batch .. (i + 1) * batch - 1: ``DrawSampler.start_at(i)``
puts a resumed run exactly where the uninterrupted one was, whatever the number of data-loader
workers. (detectron2's aspect-ratio grouping would regroup draws across batches: the DDL configs
turn it off, DATALOADER.ASPECT_RATIO_GROUPING False.)
"""
import random
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils import data as torchdata

__all__ = ["DrawSampler", "SeededDrawDataset", "derived_seed", "seed_random_state", "seeded_random_state"]


def derived_seed(*keys):
    """A 32-bit seed from integers (numpy's SeedSequence: well mixed, the same everywhere)."""
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(1)[0])


def seed_random_state(seed):
    """Seed Python's, numpy's and torch's (CPU and CUDA) global random states with ``seed``."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def seeded_random_state(seed):
    """Python's, numpy's and torch's (CPU) global random states seeded with ``seed`` inside, and
    as they were outside, so that drawing a sample leaves the process's own streams alone."""
    python_state, numpy_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.random.default_generator.manual_seed(seed)  # the CPU generator only: CUDA's stays
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)


class DrawSampler(torchdata.Sampler):
    """The endless draw numbers of one process: ``q * world_size + rank`` from q = start on."""

    def __init__(self, rank, world_size, batch_size):
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.start = 0

    def start_at(self, iteration):
        """Begin with the batch of ``iteration`` (before the loader's iterator is made)."""
        self.start = int(iteration) * self.batch_size

    def __iter__(self):
        position = self.start
        while True:
            yield position * self.world_size + self.rank
            position += 1


class SeededDrawDataset(torchdata.Dataset):
    """Draw number -> mapped sample: the draw's image of the epoch's permutation, mapped under
    random states seeded by (seed, draw). A sample the mapper drops (None: an unreadable file
    with DATALOADER.SKIP_BAD_SAMPLES) is replaced by a seeded choice of another image."""

    def __init__(self, dataset, mapper, seed):
        self.dataset, self.mapper, self.seed = dataset, mapper, int(seed)
        self._epoch, self._permutation = None, None

    def __len__(self):
        return len(self.dataset)

    def index_of(self, draw):
        """The dataset index of ``draw``."""
        size = len(self.dataset)
        epoch = draw // size
        if epoch != self._epoch:
            self._epoch = epoch
            self._permutation = np.random.default_rng([self.seed, epoch]).permutation(size)
        return int(self._permutation[draw % size])

    def __getitem__(self, draw):
        index = self.index_of(draw)
        for attempt in range(len(self.dataset) + 1):
            with seeded_random_state(derived_seed(self.seed, draw, attempt)):
                sample = self.mapper(self.dataset[index])
            if sample is not None:
                return sample
            index = int(np.random.default_rng([self.seed, draw, attempt]).integers(len(self.dataset)))
        raise RuntimeError(f"no readable sample left after {len(self.dataset) + 1} tries (draw {draw})")
