"""The built-in character-level job: a corpus from Python's docstrings, its slices and TinyLM."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stepwise.data import text
from stepwise.data.text import PAD_ID, UNK_ID, VOCAB_SIZE, TinyText, decode, encode, pad_collate
from stepwise.models.lm import TinyLM


def test_the_corpus_and_a_dataset_are_the_same_when_built_again():
    first, again = text.corpus(), text.corpus.__wrapped__()  # the cached one and a fresh build
    assert first == again and 300_000 <= len(first) <= 1_000_000
    a, b = TinyText("train", samples=64, seed=3), TinyText("train", samples=64, seed=3)
    np.testing.assert_array_equal(a.item_counts, b.item_counts)
    for i in range(64):
        assert torch.equal(a[i]["tokens"], b[i]["tokens"]) and torch.equal(a[i]["target"], b[i]["target"])
    other = TinyText("train", samples=64, seed=4)
    assert not np.array_equal(a.item_counts, other.item_counts)


def test_vocabulary_round_trips_printable_ascii_and_marks_the_rest_unknown():
    assert VOCAB_SIZE == 2 + 1 + 95 and PAD_ID == 0 and UNK_ID == 1
    line = "def f(x):\n    return x ** 2  # ~{}|"
    ids = encode(line)
    assert ids.dtype == torch.int64 and ids.min() >= 2 and ids.max() < VOCAB_SIZE
    assert decode(ids) == line
    assert encode("a\u00dfb\tc").tolist() == [encode("a").item(), UNK_ID, encode("b").item(), UNK_ID,
                                             encode("c").item()]


def test_lengths_are_within_bounds_with_a_wide_spread_and_are_the_item_counts():
    data = TinyText("train", samples=2048, min_len=8, max_len=256)
    counts = data.item_counts
    assert counts.dtype == np.int64 and counts.shape == (2048,)
    assert counts.min() >= 8 and counts.max() <= 256 and counts.std() > 30
    assert counts.min() < 20 and counts.max() > 240  # both ends of the range are drawn
    assert data.num_classes == VOCAB_SIZE and data.max_len == 256
    for i in range(0, 2048, 97):
        sample = data[i]
        assert sample["tokens"].dtype == sample["target"].dtype == torch.int64
        assert len(sample["tokens"]) == len(sample["target"]) == counts[i]
        assert torch.equal(sample["tokens"][1:], sample["target"][:-1])  # next-character targets


def test_train_val_and_test_read_disjoint_regions_of_the_corpus():
    ids = encode(text.corpus())
    train, val = TinyText("train", samples=512), TinyText("val", samples=512, seed=1)
    test = TinyText("test", samples=512, seed=2)
    boundary, middle = len(train.region), len(train.region) + len(val.region)
    assert boundary == len(ids) - int(len(ids) * 0.1)  # the first 90%, as before the test split
    assert middle + len(test.region) == len(ids) and abs(len(val.region) - len(test.region)) <= 1
    assert torch.equal(train.region, ids[:boundary])
    assert torch.equal(val.region, ids[boundary:middle]) and torch.equal(test.region, ids[middle:])
    for data in (train, val, test):
        assert (data.offsets + data.item_counts + 1 <= len(data.region)).all()  # inside it
        assert (data.offsets >= 0).all()


def test_pad_collate_pads_tokens_with_pad_and_targets_with_ignore_index():
    samples = [{"tokens": torch.tensor([5, 6, 7]), "target": torch.tensor([6, 7, 8])},
               {"tokens": torch.tensor([9]), "target": torch.tensor([10])}]
    batch = pad_collate(samples)
    assert batch["tokens"].tolist() == [[5, 6, 7], [9, PAD_ID, PAD_ID]]
    assert batch["target"].tolist() == [[6, 7, 8], [10, -100, -100]]
    assert batch["tokens"].dtype == batch["target"].dtype == torch.int64
    assert pad_collate(samples, ignore_index=-1)["target"][1].tolist() == [10, -1, -1]


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"split": "valid"}, "split='valid'"),
    ({"samples": 0}, "samples=0"),
    ({"min_len": 0}, "min_len=0"),
    ({"min_len": 10, "max_len": 9}, "max_len=9"),
    ({"split": "val", "max_len": 10**6}, "max_len=1000000"),
])
def test_bad_arguments_are_value_errors_naming_them(kwargs, named):
    with pytest.raises(ValueError, match=named) as raised:
        TinyText(**kwargs)
    assert "set " in str(raised.value) or "use one of" in str(raised.value)  # and the fix


def _model(**kwargs) -> TinyLM:
    torch.manual_seed(0)
    return TinyLM(VOCAB_SIZE, dim=32, layers=2, heads=4, context=16, **kwargs).eval()


def test_tiny_lm_gives_logits_in_cross_entropy_layout():
    tokens = torch.randint(0, VOCAB_SIZE, (3, 10))
    logits = _model()(tokens)
    assert logits.shape == (3, VOCAB_SIZE, 10)
    loss = torch.nn.functional.cross_entropy(logits, tokens)  # (N, V, T) against (N, T)
    assert abs(loss.item() - np.log(VOCAB_SIZE)) < 0.2  # untrained: close to uniform


def test_tiny_lm_is_causal():
    model, tokens = _model(), torch.randint(2, VOCAB_SIZE, (2, 12))
    changed = tokens.clone()
    changed[:, 7] = (tokens[:, 7] + 1) % VOCAB_SIZE
    before, after = model(tokens), model(changed)
    torch.testing.assert_close(before[:, :, :7], after[:, :, :7], rtol=0, atol=1e-6)
    assert (before[:, :, 7:] - after[:, :, 7:]).abs().amax(dim=1).min() > 1e-4  # t and after move


def test_right_padding_changes_no_real_position():
    model, tokens = _model(), torch.randint(2, VOCAB_SIZE, (1, 5))
    padded = torch.cat([tokens, torch.full((1, 6), PAD_ID)], dim=1)
    torch.testing.assert_close(model(padded)[:, :, :5], model(tokens), rtol=0, atol=1e-6)


def test_tiny_lm_runs_in_float64_and_backpropagates():
    model = _model().double().train()
    tokens = torch.randint(0, VOCAB_SIZE, (2, 16))
    logits = model(tokens)
    assert logits.dtype == torch.float64
    torch.nn.functional.cross_entropy(logits, tokens).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float64 for p in model.parameters())


def test_tiny_lm_rejects_a_sequence_longer_than_its_context():
    with pytest.raises(ValueError, match=r"17 tokens .* context of 16.*model\.context"):
        _model()(torch.zeros(1, 17, dtype=torch.int64))
    with pytest.raises(ValueError, match="dim=30 is not a multiple of heads=4"):
        TinyLM(VOCAB_SIZE, dim=30, heads=4)


def test_the_tinytext_experiment_composes_and_builds(tmp_path):
    """data=tinytext, model=tiny_lm and the experiment: one real batch, through the built loss."""
    from stepwise.run.build import build_loss, build_model, build_optimizer
    from tests.conftest import prepare_job

    job = prepare_job(tmp_path, "experiment=tinytext_lm", "logger=none")
    assert job.data.num_outputs == VOCAB_SIZE and job.data.train_samples == 2048
    torch.manual_seed(0)
    model, loss = build_model(job.config, job.data), build_loss(job.config, job.data)
    assert isinstance(model, TinyLM) and model.context >= job.config.data.train["max_len"]
    optimizer = build_optimizer(job.config, job.plan, model.parameters())
    assert type(optimizer).__name__ == "AdamW" and optimizer.param_groups[0]["lr"] == job.plan.lr
    batch = job.data.collate(torch.float32)([job.data.train_set()[i] for i in range(4)])
    inputs, target = batch
    logits = model(**inputs)
    assert logits.shape == (4, VOCAB_SIZE, target.shape[1])
    values = loss(logits, target)
    real = target != -100
    assert real.sum() == sum(len(job.data.train_set()[i]["target"]) for i in range(4))
    assert abs(values[real].mean().item() - np.log(VOCAB_SIZE)) < 0.2


def test_a_test_sequence_longer_than_the_context_is_one_line_before_any_work(tmp_path):
    """The test split is evaluated after training: its sequences are checked against the
    model's context before it, as the training ones are."""
    from stepwise.contract.errors import ConfigError
    from tests.conftest import prepare_job

    short = ("data=tinytext", "model=tiny_lm", "logger=none", "dry_run=true", "model.context=24",
             "data.train.max_len=24", "data.val.max_len=24")
    with pytest.raises(ConfigError, match=r"^model.context=24: sample \d+ of data.test has \d+ "
                                          r"tokens, more than the model's context of 24; fix: set "
                                          r"model.context=\d+, or cap the data's lengths "
                                          r"\(e.g. data.test.max_len=24\)$"):
        prepare_job(tmp_path / "a", *short)
    job = prepare_job(tmp_path / "b", *short, "data.test.max_len=24")
    assert (job.data.val_samples, job.data.test_samples) == (256, 256)
