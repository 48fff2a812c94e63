"""The training data stream is a function of the iteration (data/training_order.py)."""
import itertools

import numpy as np

from ddl_mask2former.data.training_order import DrawSampler, SeededDrawDataset


def _first(iterable, count):
    return list(itertools.islice(iterable, count))


def test_a_resumed_stream_continues_where_the_uninterrupted_one_was():
    for rank in (0, 1):
        straight = DrawSampler(rank, world_size=2, batch_size=3)
        resumed = DrawSampler(rank, world_size=2, batch_size=3)
        resumed.start_at(4)
        assert _first(resumed, 6) == _first(straight, 18)[12:]
        # The two processes share the draws out, each once.
    both = set(_first(DrawSampler(0, 2, 3), 30)) | set(_first(DrawSampler(1, 2, 3), 30))
    assert both == set(range(60))


def test_draws_are_epoch_permutations_augmented_under_their_own_seed():
    def mapper(record):
        # stands in for the augmentations: they draw from the global random state
        return record, float(np.random.uniform())

    dataset = SeededDrawDataset(list(range(10)), mapper, seed=7)
    epochs = [[dataset[d][0] for d in range(e * 10, (e + 1) * 10)] for e in range(3)]
    assert all(sorted(epoch) == list(range(10)) for epoch in epochs) and epochs[0] != epochs[1]
    state = np.random.get_state()
    first = dataset[13]
    assert np.array_equal(np.random.get_state()[1], state[1])  # the process's own stream untouched
    other = SeededDrawDataset(list(range(10)), mapper, seed=7)
    assert other[13] == first and other[12] != first
