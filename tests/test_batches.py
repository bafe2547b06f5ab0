"""Probe batches: the next batch, or a fraction of it."""

from collections import namedtuple

import pytest
import torch

from hidlr import probe_subset, with_probe_batch


def test_fraction_of_the_next_batch():
    batches = [(torch.arange(10) + 10 * i, torch.arange(10) % 2) for i in range(3)]
    pairs = list(with_probe_batch(batches, fraction=0.25))
    assert len(pairs) == 3
    for i, (batch, probe) in enumerate(pairs):
        assert batch is batches[i]
        nxt = batches[min(i + 1, 2)]
        assert isinstance(probe, tuple) and len(probe) == 2
        assert torch.equal(probe[0], nxt[0][:3])  # ceil(0.25 * 10) examples
        assert torch.equal(probe[1], nxt[1][:3])


def test_probe_subset_keeps_structure_and_scalars():
    pair = namedtuple("pair", "x y")
    batch = {
        "input_ids": torch.ones(8, 5),
        "extra": [pair(torch.zeros(8), torch.tensor(3.0))],
        "name": "not a tensor",
    }
    out = probe_subset(batch, 0.5)
    assert out["input_ids"].shape == (4, 5)
    assert isinstance(out["extra"], list) and isinstance(out["extra"][0], pair)
    assert out["extra"][0].x.shape == (4,)
    assert out["extra"][0].y.item() == 3.0  # 0-d tensors have no batch dimension
    assert out["name"] == "not a tensor"
    assert probe_subset(batch, 1.0) is batch
    assert probe_subset(torch.ones(3), 0.01).shape == (1,)  # at least one example
    # ceil(fraction * n), with fraction * n as written: 0.07 * 100 is 7.000000000000001 in floats
    assert [
        len(probe_subset(torch.ones(n), f)) for f, n in ((0.07, 100), (0.56, 100), (0.28, 25))
    ] == [7, 56, 7]


def test_probe_subset_rejects_bad_input():
    with pytest.raises(
        ValueError, match=r"fraction must be a finite float > 0.0 and <= 1.0, got 0"
    ):
        with_probe_batch([1], fraction=0)
    with pytest.raises(ValueError, match=r"fraction must be .* got 1.5"):
        probe_subset(torch.ones(2), 1.5)
    with pytest.raises(ValueError, match=r"one batch size .* got sizes \[3, 4\]"):
        probe_subset((torch.ones(3), torch.ones(4)), 0.5)


def test_a_whole_next_batch_given_to_the_probes_is_a_container_of_its_own():
    batches = [
        {"x": torch.ones(2), "labels": torch.zeros(2)},
        {"x": torch.ones(2), "labels": torch.ones(2)},
    ]
    (first, probe), _ = list(with_probe_batch(batches))
    assert probe is not batches[1] and probe["x"] is batches[1]["x"]
    probe.pop("labels")  # a closure that takes the labels out leaves the training batch whole
    assert set(batches[1]) == {"x", "labels"} and first is batches[0]


def test_a_user_dict_batch_is_copied_too():
    from collections import UserDict  # as transformers' BatchEncoding

    batches = [UserDict(x=torch.ones(2), labels=torch.zeros(2)) for _ in range(2)]
    (_, probe), _ = list(with_probe_batch(batches))
    probe.pop("labels")
    assert "labels" in batches[1]
