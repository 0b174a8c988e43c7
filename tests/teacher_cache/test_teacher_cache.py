"""Offline teacher (hf_kd.teacher_cache): encoding, exactness against the live teacher, training, resume, errors."""

import json
import math

import numpy as np
import pytest
import torch
from datasets import load_dataset
from tiny import make_args, make_model, make_pair, make_tokenizer, random_logits, train_losses
from trl.experimental.utils import DataCollatorForChatML

import hf_kd.cli
from hf_kd import DistillationTrainer, cache_teacher, load_teacher_cache
from hf_kd.losses import build_loss
from hf_kd.losses.core import LogitSource
from hf_kd.teacher_cache import CacheEncoding, TopKReconstruction, reconstruction_kl
from hf_kd.teacher_cache.encoding import pack_rows

CACHEABLE = ["fkl", "rkl", "jsd", "sfkl", "srkl", "akl", "dac_kl", "span", "ce"]


def cached_rows(teacher_logits: torch.Tensor, top_k: int, value_dtype: str = "float32", temperature: float = 1.0):
    """Teacher logits [B, T, V] -> (packed cache rows [B, T, 2k + 1], their reconstruction head), cached at
    ``temperature``."""
    vocab = teacher_logits.shape[-1]
    encoding = CacheEncoding(top_k, vocab, value_dtype)
    flat = torch.log_softmax(teacher_logits.reshape(-1, vocab).float() / temperature, -1)
    ids, stored, tail = encoding.encode(flat)
    rows = pack_rows(torch.as_tensor(ids.astype(np.int64)), encoding.decode_values(stored), torch.as_tensor(tail))
    return rows.reshape(*teacher_logits.shape[:-1], -1), TopKReconstruction(vocab, top_k, temperature)


def loss_and_grad(recipe, student_logits, teacher: LogitSource, labels, extras, **kwargs):
    torch.manual_seed(0)  # the same DAC-KL sub-network for the live and the cached run
    loss_fn = build_loss(recipe, **kwargs)
    s = student_logits.clone().requires_grad_(True)
    value = loss_fn.forward_sources(LogitSource(s), teacher, labels, **extras)
    value.backward()
    return value.detach(), s.grad


# ---------------------------------------------------------------- encoding


def test_full_vocabulary_float32_round_trip_is_exact():
    _, t, _ = random_logits(0, 6, 40)
    logprobs = torch.log_softmax(t.reshape(-1, 40).float(), -1)
    rows, head = cached_rows(t, 40)
    torch.testing.assert_close(torch.log_softmax(head(rows.reshape(-1, 81)), -1), logprobs, rtol=0, atol=1e-6)
    assert reconstruction_kl(logprobs, CacheEncoding(40, 40, "float32")).abs().max() < 1e-6


@pytest.mark.parametrize(("dtype", "bound"), [("uint8", 1 / 16), ("float16", 2**-11), ("bfloat16", 2**-8)])
def test_value_rounding_stays_within_the_dtype_step(dtype, bound):
    logprobs = -torch.rand(50, 30) * 20  # log-probabilities in (-20, 0]
    encoding = CacheEncoding(30, 30, dtype)
    decoded = encoding.decode_values(encoding._quantise(logprobs).numpy())
    error = (decoded - logprobs).abs()
    limit = bound if dtype == "uint8" else bound * logprobs.abs()  # absolute step vs relative rounding
    assert (error <= limit + 1e-7).all()
    assert CacheEncoding(30, 30, dtype).bytes_per_token == 30 * (2 + {"uint8": 1}.get(dtype, 2)) + 4


def test_tail_mass_is_kept_and_spread_evenly():
    _, t, _ = random_logits(1, 4, 20)
    rows, head = cached_rows(t, 5)
    logprobs = torch.log_softmax(t.reshape(-1, 20).float(), -1)
    rebuilt = torch.log_softmax(head(rows.reshape(-1, 11)), -1)
    top_ids = logprobs.topk(5, -1).indices
    torch.testing.assert_close(rebuilt.gather(-1, top_ids), logprobs.gather(-1, top_ids), rtol=0, atol=1e-6)
    tail = rebuilt.scatter(-1, top_ids, float("nan"))
    tail_values = tail[~tail.isnan()].reshape(-1, 15)
    assert torch.allclose(tail_values, tail_values[:, :1].expand_as(tail_values))  # flat
    true_tail = logprobs.exp().sum(-1) - logprobs.gather(-1, top_ids).exp().sum(-1)
    torch.testing.assert_close(tail_values.exp().sum(-1), true_tail, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- the loss from a cache vs the live teacher


@pytest.mark.parametrize(("temperature", "cache_temperature"), [(1.0, 1.0), (2.0, 1.0), (2.0, 2.0)])
@pytest.mark.parametrize("term", CACHEABLE)
def test_cache_with_k_equal_vocabulary_gives_the_live_loss_and_gradients(term, temperature, cache_temperature):
    s, t, labels = random_logits(3, 7, 24)
    s, t = s.float(), t.float()
    extras = {"span_ids": torch.arange(14).reshape(2, 7) // 3} if term == "span" else {}
    kwargs = {} if term == "ce" else {"temperature": temperature}
    live, live_grad = loss_and_grad(term, s, LogitSource(t), labels, extras, **kwargs)
    rows, head = cached_rows(t, 24, temperature=cache_temperature)
    cached, cached_grad = loss_and_grad(term, s, LogitSource(rows, head), labels, extras, **kwargs)
    assert live.abs() > 0
    torch.testing.assert_close(cached, live, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(cached_grad, live_grad, rtol=1e-4, atol=1e-7)


def _bucketed(logits: torch.Tensor, top_ids: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the (k + 1)-bucket distribution: the top-k entries, then all other tokens as one."""
    logp = torch.log_softmax(logits, -1)
    top = logp.gather(-1, top_ids)
    tail = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-12))
    return torch.cat([top, tail.unsqueeze(-1)], -1)


@pytest.mark.parametrize("term", ["fkl", "rkl", "jsd"])
def test_student_shaped_tail_is_the_divergence_between_top_k_plus_tail_buckets(term):
    """tail='student': value and gradient equal the divergence between the teacher's and the student's top-k +
    one-tail-bucket distributions (what the student is taught is the top-k and the tail's total mass)."""
    s, t, labels = random_logits(5, 6, 30)
    rows, _ = cached_rows(t, 6)
    head = TopKReconstruction(30, 6, tail="student")
    s = s.float()
    cached, cached_grad = loss_and_grad(term, s, LogitSource(rows, head), labels, {})
    top_ids = t.topk(6, -1).indices
    x = s.double().requires_grad_(True)
    log_p, log_q = _bucketed(t, top_ids), _bucketed(x, top_ids)
    if term == "fkl":
        per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
    elif term == "rkl":
        per_token = (log_q.exp() * (log_q - log_p)).sum(-1)
    else:
        log_m = torch.logaddexp(log_p, log_q) - math.log(2)
        per_token = 0.5 * (log_p.exp() * (log_p - log_m)).sum(-1) + 0.5 * (log_q.exp() * (log_q - log_m)).sum(-1)
    mask = labels != -100
    reference = per_token[mask].sum() / mask.sum()
    reference.backward()
    torch.testing.assert_close(cached.double(), reference, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(cached_grad.double(), x.grad, rtol=1e-4, atol=1e-7)
    flat, _ = loss_and_grad(term, s, LogitSource(rows, TopKReconstruction(30, 6)), labels, {})
    assert not torch.isclose(flat, cached)  # the flat tail is another target


def test_trainer_trains_from_a_cache_with_the_student_shaped_tail(tmp_path, tokenizer, cache_dir):
    trainer = _trainer(tmp_path, tokenizer, load_teacher_cache(cache_dir), kd_loss="fkl", teacher_cache_tail="student")
    assert trainer.cache_reconstruction.tail == "student"
    trainer.train()
    assert all(math.isfinite(e["loss"]) for e in trainer.state.log_history if "loss" in e)


@pytest.mark.parametrize("value_dtype", ["uint8", "float16"])
def test_small_k_forward_kl_gradient_error_is_bounded_by_the_reconstruction_kl(value_dtype):
    """d FKL / d student logits = q - p per token, so the cached gradient differs from the live one by p_hat - p,
    whose L1 norm is at most sqrt(2 KL(p || p_hat)) (Pinsker) for every token."""
    s, t, labels = random_logits(4, 9, 64)
    s, t = s.float(), t.float()
    labels[:] = 0  # every position is a response token: per-token gradients are N * (row gradient)
    n = labels.numel()
    _, live_grad = loss_and_grad("fkl", s, LogitSource(t), labels, {})
    rows, head = cached_rows(t, 8, value_dtype)
    _, cached_grad = loss_and_grad("fkl", s, LogitSource(rows, head), labels, {})
    kl = reconstruction_kl(torch.log_softmax(t.reshape(-1, 64), -1), CacheEncoding(8, 64, value_dtype))
    gap = (cached_grad - live_grad).reshape(-1, 64).abs().sum(-1) * n
    assert (gap > 1e-3).all()  # k = 8 of 64 really is lossy here
    assert (gap <= (2 * kl).sqrt() + 1e-5).all()


# ---------------------------------------------------------------- the whole path on tiny models


@pytest.fixture
def cache_dir(tmp_path, tokenizer, teacher, train_dataset):
    return cache_teacher(teacher, tokenizer, train_dataset, tmp_path / "cache", top_k=8, shard_size=10, progress=False)


def test_cache_folder_reads_with_plain_datasets_and_holds_what_the_manifest_says(cache_dir, tokenizer, train_dataset):
    manifest = json.loads((cache_dir / "teacher_cache.json").read_text())
    assert manifest["complete"] and [s["rows"] for s in manifest["shards"]] == [10, 10, 4]
    assert manifest["encoding"]["bytes_per_token"] == 8 * 3 + 4
    plain = load_dataset("parquet", data_dir=str(cache_dir / "data"), split="train")
    assert len(plain) == len(train_dataset)
    row = plain[0]
    response = sum(label != -100 for label in row["labels"][1:])
    assert len(row["teacher_log_tail"]) == response and len(row["teacher_ids"]) == 8 * response
    assert sum(s["tokens"] for s in manifest["shards"]) == sum(len(r) for r in plain["teacher_log_tail"])


def test_length_sorted_batches_keep_dataset_order_and_values(cache_dir, tmp_path, tokenizer, teacher, train_dataset):
    """Batches are formed by length (less padding), yet every row is the example's own, as with batches of one."""
    single = cache_teacher(
        teacher, tokenizer, train_dataset, tmp_path / "single", top_k=8, batch_size=1, shard_size=10, progress=False
    )
    batched, alone = load_teacher_cache(cache_dir), load_teacher_cache(single)
    collator = DataCollatorForChatML(tokenizer=tokenizer, max_length=1024)
    for i, example in enumerate(train_dataset):
        own = collator([example])["input_ids"][0].tolist()
        assert batched[i]["input_ids"] == alone[i]["input_ids"] == own
        assert batched[i]["teacher_ids"] == alone[i]["teacher_ids"]
        np.testing.assert_allclose(batched[i]["teacher_log_tail"], alone[i]["teacher_log_tail"], atol=1e-4)


def test_training_from_a_full_cache_matches_the_live_teacher(tmp_path, tokenizer, train_dataset):
    def run(teacher_model, dataset):
        student, _ = make_pair(len(tokenizer), teacher_hidden=64)
        args = make_args(tmp_path, kd_loss="0.5*ce+0.5*akl", max_steps=4)
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher_model, args=args, train_dataset=dataset, processing_class=tokenizer
        )
        trainer.train()
        return trainer

    _, teacher = make_pair(len(tokenizer), teacher_hidden=64)
    folder = cache_teacher(
        teacher, tokenizer, train_dataset, tmp_path / "c", top_k=len(tokenizer), value_dtype="float32", progress=False
    )
    live = run(teacher, train_dataset)
    cached = run(None, load_teacher_cache(folder, teacher=teacher))
    assert cached.teacher_model is None
    np.testing.assert_allclose(train_losses(cached), train_losses(live), rtol=1e-5)
    for a, b in zip(cached.model.parameters(), live.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _teacher_kl(student, teacher, batch):
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    mask = batch["labels"][:, 1:] != -100
    log_p, log_q = torch.log_softmax(t[mask], -1), torch.log_softmax(s[mask], -1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


def test_cache_train_save_resume_is_exact_and_learns_the_teacher(tmp_path, tokenizer, teacher, cache_dir):
    cache = load_teacher_cache(cache_dir)

    def run(max_steps, resume=None):
        student = make_model(len(tokenizer), hidden=32, layers=1, seed=1)
        args = make_args(
            tmp_path, kd_loss="fkl", max_steps=8, save_strategy="steps", save_steps=4, output_dir=str(tmp_path / "o")
        )
        trainer = DistillationTrainer(
            model=student, teacher_model=None, args=args, train_dataset=cache, processing_class=tokenizer
        )
        trainer.args.max_steps = max_steps
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(8)
    batch = full.data_collator([cache[i] for i in range(len(cache))])
    before = _teacher_kl(make_model(len(tokenizer), hidden=32, layers=1, seed=1), teacher, batch)
    assert _teacher_kl(full.model, teacher, batch) < 0.7 * before  # top-8 of 29 tokens is enough to learn from
    resumed = run(8, resume=str(tmp_path / "o" / "checkpoint-4"))
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_caching_stopped_inside_its_first_shard_resumes(tmp_path, tokenizer, teacher, train_dataset, monkeypatch):
    from hf_kd.teacher_cache import writer

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(writer, "_encode_batch", stop)
        with pytest.raises(KeyboardInterrupt):
            cache_teacher(teacher, tokenizer, train_dataset, tmp_path / "c", top_k=4, progress=False)
    folder = cache_teacher(teacher, tokenizer, train_dataset, tmp_path / "c", top_k=4, progress=False)
    assert len(load_teacher_cache(folder)) == len(train_dataset)


def test_a_non_finite_teacher_is_refused_naming_the_dataset_rows(tmp_path, tokenizer, teacher, train_dataset):
    """A NaN embedding of one word makes the teacher's logits NaN after it (as a float16 overflow would): no cache
    row is written and the cache is not marked complete (it used to be, with codes of p = 1 and a NaN tail)."""
    from hf_kd.teacher_cache.manifest import read_manifest

    word = "three"
    holding = [
        i for i, row in enumerate(train_dataset) if word in " ".join(m["content"] for m in row["messages"]).split()
    ]
    assert 0 < len(holding) < len(train_dataset)
    with torch.no_grad():
        teacher.model.embed_tokens.weight[tokenizer.convert_tokens_to_ids(word)] = float("nan")
    n = len(train_dataset)
    with pytest.raises(
        FloatingPointError, match=r"NaN or inf at response tokens of dataset row\(s\) \[.*float16"
    ) as e:
        cache_teacher(
            teacher, tokenizer, train_dataset, tmp_path / "c", top_k=4, batch_size=n, shard_size=n, progress=False
        )
    named = [int(i) for i in str(e.value).split("[", 1)[1].split("]", 1)[0].split(",")]
    assert sorted(named) == holding
    manifest = read_manifest(tmp_path / "c")
    assert manifest["complete"] is False and manifest["shards"] == []


def test_interrupted_caching_resumes_keeping_written_shards(tmp_path, tokenizer, teacher, train_dataset, monkeypatch):
    from hf_kd.teacher_cache import writer

    reference = cache_teacher(
        teacher, tokenizer, train_dataset, tmp_path / "ref", top_k=4, shard_size=10, progress=False
    )
    real_write = writer._ShardWriter.write
    calls = []

    def failing_write(self, path):
        calls.append(path.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_write(self, path)

    monkeypatch.setattr(writer._ShardWriter, "write", failing_write)
    with pytest.raises(KeyboardInterrupt):
        cache_teacher(teacher, tokenizer, train_dataset, tmp_path / "c", top_k=4, shard_size=10, progress=False)
    with pytest.raises(ValueError, match="incomplete"):
        load_teacher_cache(tmp_path / "c")
    first = (tmp_path / "c" / "data" / "train-00000.parquet").stat().st_mtime_ns
    cache_teacher(teacher, tokenizer, train_dataset, tmp_path / "c", top_k=4, shard_size=10, progress=False)
    assert calls == ["train-00000.parquet", "train-00001.parquet", "train-00001.parquet", "train-00002.parquet"]
    assert (tmp_path / "c" / "data" / "train-00000.parquet").stat().st_mtime_ns == first
    resumed = json.loads((tmp_path / "c" / "teacher_cache.json").read_text())
    expected = json.loads((reference / "teacher_cache.json").read_text())
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in expected["shards"]]
    with pytest.raises(ValueError, match="other settings"):
        cache_teacher(teacher, tokenizer, train_dataset, tmp_path / "c", top_k=5, shard_size=10, progress=False)


def test_a_finished_cache_is_reused_with_a_copy_of_its_tokenizer(tmp_path, tokenizer, teacher, train_dataset):
    """The tokenizer is identified by its vocabulary, not its folder: a saved copy reuses the cache."""
    from transformers import AutoTokenizer

    folder = cache_teacher(teacher, tokenizer, train_dataset, tmp_path / "c", top_k=4, progress=False)
    written = (folder / "data" / "train-00000.parquet").stat().st_mtime_ns
    tokenizer.save_pretrained(tmp_path / "copy")
    copy = AutoTokenizer.from_pretrained(tmp_path / "copy")
    assert copy.name_or_path != tokenizer.name_or_path
    cache_teacher(teacher, copy, train_dataset, folder, top_k=4, progress=False)
    assert (folder / "data" / "train-00000.parquet").stat().st_mtime_ns == written


def test_a_cache_is_reused_for_the_same_rows_made_another_way_and_refused_for_other_rows(
    tmp_path, tokenizer, teacher, train_dataset
):
    folder = cache_teacher(teacher, tokenizer, train_dataset, tmp_path / "c", top_k=4, progress=False)
    written = (folder / "data" / "train-00000.parquet").stat().st_mtime_ns
    same_rows = train_dataset.filter(lambda row: len(row["messages"]) > 0).map(lambda row: row)  # other transforms
    assert cache_teacher(teacher, tokenizer, same_rows, folder, top_k=4, progress=False) == folder
    assert (folder / "data" / "train-00000.parquet").stat().st_mtime_ns == written  # reused, not rebuilt
    with pytest.raises(ValueError, match="data differ"):
        cache_teacher(teacher, tokenizer, train_dataset.select(range(20)), folder, top_k=4, progress=False)


def test_cli_cache_teacher(tmp_path, tokenizer, teacher, train_dataset):
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    train_dataset.to_json(tmp_path / "data.jsonl")
    argv = ["--teacher", str(tmp_path / "teacher"), "--dataset", str(tmp_path / "data.jsonl")]
    argv += ["--output_dir", str(tmp_path / "cache"), "--top_k", "6", "--value_dtype", "float16", "--max_samples", "5"]
    assert hf_kd.cli.main(["cache-teacher", *argv]) == 0
    cache = load_teacher_cache(tmp_path / "cache", teacher=teacher, top_k=6, temperature=1.0)
    assert len(cache) == 5


# ---------------------------------------------------------------- errors


def _trainer(tmp_path, tokenizer, dataset, model=None, **overrides):
    model = model if model is not None else make_model(len(tokenizer), hidden=32, layers=1, seed=1)
    args = make_args(tmp_path, **{"kd_loss": "fkl", **overrides})
    return DistillationTrainer(
        model=model, teacher_model=None, args=args, train_dataset=dataset, processing_class=tokenizer
    )


def test_prompt_fkl_is_refused_from_a_cache(tmp_path, tokenizer, cache_dir):
    with pytest.raises(ValueError, match=r"'prompt_fkl' reads the teacher at the prompt positions.*response tokens"):
        _trainer(tmp_path, tokenizer, load_teacher_cache(cache_dir), kd_loss="fkl+prompt_fkl")


def test_bild_is_refused_from_a_cache_with_the_alternatives(tmp_path, tokenizer, cache_dir):
    with pytest.raises(ValueError, match=r"'bild' needs the teacher's logits at the student's own top-k.*fkl, rkl"):
        _trainer(tmp_path, tokenizer, load_teacher_cache(cache_dir), kd_loss="0.5*ce+0.5*bild")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lmbda": 0.5}, "on-policy"),
        ({"seq_kd": True}, "seq_kd"),
        ({"scrg_corrections": 1, "lmbda": 1.0}, "SCRG"),
        ({"bridge": "dskd"}, "dskd bridge"),
    ],
)
def test_what_needs_a_live_teacher_is_refused(tmp_path, tokenizer, cache_dir, overrides, message):
    with pytest.raises(ValueError, match=f"no teacher in memory, but .*{message}"):
        _trainer(tmp_path, tokenizer, load_teacher_cache(cache_dir), **overrides)


def test_a_cache_of_another_tokenizer_or_vocabulary_is_refused(tmp_path, tokenizer, cache_dir):
    cache = load_teacher_cache(cache_dir)
    other = make_tokenizer(extra_words=["zebra"])  # one new token: ids mean other things
    with pytest.raises(ValueError, match="vocabulary differs from the student's"):
        _trainer(tmp_path, other, cache, model=make_model(len(other), hidden=32, layers=1, seed=1))
    with pytest.raises(ValueError, match=f"over {len(tokenizer)} entries but the student.s head has 40"):
        _trainer(tmp_path, tokenizer, cache, model=make_model(40, hidden=32, layers=1, seed=1))


def test_a_term_at_another_temperature_than_the_cache_is_refused(tmp_path, tokenizer, teacher, train_dataset):
    cache = load_teacher_cache(
        cache_teacher(teacher, tokenizer, train_dataset, tmp_path / "t2", top_k=8, temperature=2.0, progress=False)
    )
    with pytest.raises(ValueError, match=r"'akl' runs at temperature 1.0 but .* at 2.0.*temperature=1.0"):
        _trainer(tmp_path, tokenizer, cache, kd_loss="ce+akl")
    trainer = _trainer(tmp_path, tokenizer, cache, kd_loss="ce+akl", kd_temperature=2.0, max_steps=2)
    trainer.train()  # the reconstruction multiplies the stored log-probs back by 2, the term divides by 2
    assert trainer.cache_reconstruction.temperature == 2.0


def test_a_cache_that_does_not_match_expectations_is_refused(tokenizer, teacher, cache_dir):
    other_teacher = make_model(len(tokenizer), hidden=64, layers=2, seed=5)
    with pytest.raises(ValueError, match="other teacher weights"):
        load_teacher_cache(cache_dir, teacher=other_teacher)
    with pytest.raises(ValueError, match="built with teacher"):
        load_teacher_cache(cache_dir, teacher="someone/another-teacher")
    with pytest.raises(ValueError, match="top-8 entries, not top-16"):
        load_teacher_cache(cache_dir, top_k=16)
    with pytest.raises(ValueError, match="temperature 1.0, not 2.0"):
        load_teacher_cache(cache_dir, temperature=2.0)
    assert len(load_teacher_cache(cache_dir, teacher=teacher, top_k=8, temperature=1.0)) == 24


def test_truncated_or_altered_shards_are_refused(cache_dir):
    shard = cache_dir / "data" / "train-00001.parquet"
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(ValueError, match="train-00001.parquet has .* bytes instead of .*truncated"):
        load_teacher_cache(cache_dir)
    shard.write_bytes(data[:500] + bytes([data[500] ^ 1]) + data[501:])
    with pytest.raises(ValueError, match="does not match its sha256"):
        load_teacher_cache(cache_dir)
    shard.unlink()
    with pytest.raises(ValueError, match="is missing"):
        load_teacher_cache(cache_dir)


def test_cache_read_without_its_manifest_is_refused(tmp_path, tokenizer, cache_dir):
    plain = load_dataset("parquet", data_dir=str(cache_dir / "data"), split="train")
    with pytest.raises(ValueError, match="no manifest .* hf_kd.load_teacher_cache"):
        _trainer(tmp_path, tokenizer, plain)
    with pytest.raises(TypeError, match="load_teacher_cache"):
        _trainer(tmp_path, tokenizer, str(cache_dir))


def test_no_teacher_and_no_cache_is_refused(tmp_path, tokenizer, train_dataset):
    with pytest.raises(ValueError, match="or a teacher cache as train_dataset"):
        _trainer(tmp_path, tokenizer, train_dataset)


def test_corrupt_rows_are_refused_by_the_collator(cache_dir):
    cache = load_teacher_cache(cache_dir)
    from hf_kd.teacher_cache import TeacherCacheCollator, cache_manifest

    collator = TeacherCacheCollator(cache_manifest(cache), pad_token_id=0)
    example = dict(cache[0])
    example["teacher_log_tail"] = example["teacher_log_tail"][:-1]
    with pytest.raises(ValueError, match="corrupt"):
        collator([example])
    assert math.isfinite(float(collator([cache[0], cache[1]])["teacher_rows"].sum()))


# ---------------------------------------------------------------- a manifest that does not match its shards


def _edit_manifest(folder, change) -> None:
    path = folder / "teacher_cache.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def _copy_first_shard(folder, destination):
    """A copy of the cache's first shard at ``destination`` (a folder outside or inside the cache)."""
    destination.mkdir(parents=True, exist_ok=True)
    copy = destination / "train-00000.parquet"
    copy.write_bytes((folder / "data" / "train-00000.parquet").read_bytes())
    return copy


def _drop_last_shard(manifest, num_examples=None):
    manifest["shards"].pop()
    if num_examples is not None:
        manifest["data"]["num_examples"] = num_examples


def _move_a_row(manifest):
    manifest["shards"][0]["rows"] += 1
    manifest["shards"][2]["rows"] -= 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_drop_last_shard, r"lists 2 shards holding 20 rows, but it was built from 24 examples"),
        (lambda m: _drop_last_shard(m, 20), r"shard files data/train-00002.parquet, which are not listed"),
        (lambda m: m["shards"].append(dict(m["shards"][1])), r"lists the shard data/train-00001.parquet twice"),
        (_move_a_row, r"train-00000.parquet holds 10 rows, its manifest says 11"),
        (lambda m: m["encoding"].update(value_dtype="float16"), r"teacher_values is stored as uint8.*says uint16"),
        (lambda m: m["encoding"].update(top_k=4), r"train-00000.parquet was written with the encoding .*top_k.: 8"),
    ],
    ids=["shards-left-out", "shards-and-total-left-out", "shard-twice", "rows", "value-dtype", "top-k"],
)
def test_a_manifest_that_does_not_match_its_shards_is_refused(cache_dir, change, message):
    _edit_manifest(cache_dir, change)
    with pytest.raises(ValueError, match=message):
        load_teacher_cache(cache_dir)


@pytest.mark.parametrize("outside", ["absolute", "dotdot"])
def test_shard_paths_outside_the_cache_folder_are_refused(cache_dir, tmp_path, outside):
    copy = _copy_first_shard(cache_dir, tmp_path / "elsewhere")
    path = str(copy) if outside == "absolute" else "../elsewhere/train-00000.parquet"
    assert (cache_dir / path).is_file()  # the file is there: only its place outside the cache is wrong
    _edit_manifest(cache_dir, lambda m: m["shards"][0].update(file=path))
    with pytest.raises(ValueError, match="outside the cache folder"):
        load_teacher_cache(cache_dir)


def test_a_16_bit_value_dtype_is_checked_against_the_one_the_shards_were_written_with(
    tmp_path, tokenizer, teacher, train_dataset
):
    """float16 and bfloat16 values share one stored column type; each shard records which one it holds."""
    folder = cache_teacher(teacher, tokenizer, train_dataset, tmp_path / "c", top_k=4, value_dtype="float16")
    _edit_manifest(folder, lambda m: m["encoding"].update(value_dtype="bfloat16"))
    with pytest.raises(ValueError, match=r"was written with the encoding .*float16"):
        load_teacher_cache(folder)


@pytest.mark.parametrize("column", ["teacher_ids", "input_ids", "labels"])
def test_token_ids_outside_the_vocabulary_are_refused_naming_shard_and_row(cache_dir, tokenizer, column):
    """A shard whose checksum matches but whose ids do not fit the vocabulary (written by another tool or a bug)
    is refused at load with its shard and row, not with an index error inside torch at the first batch."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hf_kd.teacher_cache.manifest import file_sha256

    shard = cache_dir / "data" / "train-00001.parquet"
    table = pq.read_table(shard)
    ids = table.column(column).to_pylist()
    ids[3][5] = len(tokenizer) + 2
    altered = pa.array(ids, type=table.schema.field(column).type)
    pq.write_table(table.set_column(table.schema.get_field_index(column), column, altered), shard)

    def rewritten(manifest):
        manifest["shards"][1].update(bytes=shard.stat().st_size, sha256=file_sha256(shard))

    _edit_manifest(cache_dir, rewritten)
    message = rf"train-00001.parquet row 3: {column} holds the token id {len(tokenizer) + 2}, outside the vocab"
    with pytest.raises(ValueError, match=message):
        load_teacher_cache(cache_dir)
