"""utils/runtime.py: the one atomic writer, the named derived seeds; utils/evaluate.Counts: named sums."""
import json
import os

import pytest
import torch

from utils import runtime, writes
from utils.evaluate import Counts


class _Unserialisable:
    pass


def test_atomic_json_replaces_all_or_nothing(tmp_path):
    path = tmp_path / "status.json"
    writes.write_json_atomic(path, {"state": "running"})
    assert json.loads(path.read_text()) == {"state": "running"}
    umask = os.umask(0o022)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # a plain file's mode, not the temp file's 0600
    with pytest.raises(TypeError):  # fails half-way through writing: the old file stays, no temp file is left
        writes.write_json_atomic(path, {"state": "finished", "bad": _Unserialisable()})
    assert json.loads(path.read_text()) == {"state": "running"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]
    writes.write_json_atomic(path, {"n": torch.tensor(3)}, default=lambda t: t.item())
    assert json.loads(path.read_text()) == {"n": 3}


def test_derived_seeds_never_collide_and_keep_their_values():
    seeds = {runtime.epoch_seed(s, e, r) for s in range(4) for e in range(200) for r in range(8)}
    assert len(seeds) == 4 * 200 * 8
    starts = {runtime.eval_start_seed(s, b) for s in range(4) for b in range(1000)}
    assert len(starts) == 4000
    # The values runs so far were made with (changing one changes every run's numbers).
    assert runtime.epoch_seed(7, 3, 1) == 7 * 1_000_003 + 3 + 7919
    assert runtime.augment_seed(7, 3) == 7 * 1_000_003 + 4
    assert (runtime.order_seed(7, 3), runtime.chunk_seed(7, 3)) == (10, 10)
    assert [runtime.loader_seed(7, s) for s in ("train", "test", "val")] == [7, 8, 9]


def test_counts_add_and_reduce_by_name():
    a = Counts(n=4, clean_correct=3, adv_correct=1, ste_adv_correct=2, router_kept=4, expert_adv_correct=1,
               load_clean=torch.tensor([3.0, 1.0], dtype=torch.float64), load_adv=torch.tensor([2.0, 2.0],
                                                                                                 dtype=torch.float64))
    b = Counts(n=2, clean_correct=2, adv_correct=2, ste_adv_correct=2, router_kept=1, expert_adv_correct=2,
               load_clean=torch.tensor([0.0, 2.0], dtype=torch.float64), load_adv=torch.tensor([1.0, 0.0],
                                                                                                 dtype=torch.float64))
    s = a + b
    assert (s.n, s.clean_correct, s.adv_correct, s.ste_adv_correct, s.router_kept, s.expert_adv_correct) == \
        (6, 5, 3, 4, 5, 3)
    assert s.load_clean.tolist() == [3.0, 3.0] and s.load_adv.tolist() == [3.0, 2.0]
    r = s.reduced(lambda t: 2 * t)  # as if a second process had counted the same
    assert (r.n, r.clean_correct, r.adv_correct, r.ste_adv_correct, r.router_kept, r.expert_adv_correct) == \
        (12, 10, 6, 8, 10, 6)
    assert r.load_clean.tolist() == [6.0, 6.0] and r.load_adv.tolist() == [6.0, 4.0]
