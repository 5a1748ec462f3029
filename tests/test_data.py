"""tgolf.data: shard format and validation, distributed loader, prepare CLI, download errors, default corpus."""
from __future__ import annotations

import gzip
import io
import json
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from tgolf.data import download as dl
from tgolf.data.__main__ import main as data_main
from tgolf.data.corpus import prepare_default_data
from tgolf.data.loader import TokenLoader, load_val_tokens
from tgolf.data.prepare import prepare
from tgolf.data.shards import HEADER_BYTES, MAGIC, ShardError, list_shards, read_shard, write_shard
from tgolf.data.tokenizer import BOS_ID, load_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data beside the checkout
WEB = SHARED / "web" / "c4_en_train_first1000docs.jsonl"
needs_web = pytest.mark.skipif(not WEB.is_file(), reason="shared C4 sample not present")


def _header(magic=MAGIC, version=1, count=0) -> bytes:
    h = np.zeros(256, dtype="<i4")
    h[:3] = (magic, version, count)
    return h.tobytes()


# ---- shards --------------------------------------------------------------------------------------------------------
def test_shard_round_trip(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 65536, size=1237).astype(np.uint16)
    path = tmp_path / "fineweb_train_000000.bin"
    assert write_shard(path, tokens) == tokens.size
    assert path.stat().st_size == HEADER_BYTES + 2 * tokens.size
    back = read_shard(path)
    assert isinstance(back, np.memmap) and back.dtype == np.uint16
    np.testing.assert_array_equal(back, tokens)
    assert np.frombuffer(path.read_bytes()[:12], dtype="<i4").tolist() == [MAGIC, 1, tokens.size]
    write_shard(tmp_path / "empty.bin", [])
    assert read_shard(tmp_path / "empty.bin").size == 0


def test_write_refuses_overwrite_and_bad_ids(tmp_path):
    path = tmp_path / "a.bin"
    write_shard(path, [1, 2, 3])
    with pytest.raises(FileExistsError, match="a.bin"):
        write_shard(path, [4])
    write_shard(path, [4], overwrite=True)
    assert read_shard(path).tolist() == [4]
    for bad in ([-1], [65536]):
        with pytest.raises(ValueError, match="uint16"):
            write_shard(tmp_path / "b.bin", bad)
    assert not list(tmp_path.glob(".*tmp"))  # no temp files left behind


@pytest.mark.parametrize("case, content, match", [
    ("short", _header()[:100], "shorter than the 1024-byte header"),
    ("magic", _header(magic=12345, count=2) + b"\0" * 4, "magic is 12345"),
    ("version", _header(version=7, count=2) + b"\0" * 4, "version is 7"),
    ("truncated", _header(count=10) + b"\0" * 6, "truncated: header num_tokens=10"),
    ("overlong", _header(count=2) + b"\0" * 8, "longer than declared"),
    ("negative", _header(count=-5), "negative"),
])
def test_corrupt_shards_raise_clear_errors(tmp_path, case, content, match):
    path = tmp_path / f"{case}.bin"
    path.write_bytes(content)
    with pytest.raises(ShardError, match=match) as info:
        read_shard(path)
    assert str(path) in str(info.value)


def test_token_id_beyond_vocab(tmp_path):
    path = tmp_path / "v.bin"
    write_shard(path, [5, 1, 1023, 1024, 7])
    assert read_shard(path, vocab_size=1025).tolist() == [5, 1, 1023, 1024, 7]
    with pytest.raises(ShardError, match=r"v\.bin: token id 1024 >= vocab_size 1024 \(first bad id at token index 3"):
        read_shard(path, vocab_size=1024)


def test_list_shards(tmp_path):
    with pytest.raises(FileNotFoundError, match="no val shards"):
        list_shards(tmp_path, "val")
    for name in ("fineweb_train_000002.bin", "fineweb_train_000000.bin", "fineweb_val_000000.bin"):
        write_shard(tmp_path / name, [1])
    assert [p.name for p in list_shards(tmp_path, "train")] == ["fineweb_train_000000.bin", "fineweb_train_000002.bin"]
    with pytest.raises(ValueError, match="split"):
        list_shards(tmp_path, "test")


# ---- loader --------------------------------------------------------------------------------------------------------
@pytest.fixture
def counter_shards(tmp_path):
    """Three train shards whose tokens are their global stream positions (all distinct)."""
    sizes, start = (1000, 1500, 700), 0
    for i, n in enumerate(sizes):
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", np.arange(start, start + n))
        start += n
    return tmp_path


def test_loader_ranks_disjoint_and_shifted(counter_shards):
    world, seq, accum, global_tokens = 4, 16, 2, 4 * 2 * 32
    loaders = [TokenLoader(counter_shards, rank=r, world_size=world, seed=1, shuffle=False) for r in range(world)]
    seen = set()
    for _ in range(3):
        for loader in loaders:
            x, y = loader.next_batch(global_tokens, seq, accum)
            assert x.shape == (2, seq) and x.dtype == torch.int64
            flat = x.flatten()
            assert torch.equal(y.flatten(), flat + 1)  # one stream, shifted by one (shards in name order here)
            assert seen.isdisjoint(flat.tolist())
            seen.update(flat.tolist())
    assert len(seen) == 3 * world * 32


def test_loader_deterministic_from_seed(counter_shards):
    def batches(seed, rank=0):
        loader = TokenLoader(counter_shards, rank=rank, world_size=2, seed=seed)
        return [loader.next_batch(2 * 3 * 64, 64)[0] for _ in range(20)]  # > 1 epoch: new permutation each epoch

    a, b, c = batches(5), batches(5), batches(6)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert torch.equal(a[0], c[0])  # the first epoch reads the shards in name order (the official frozen order)
    assert not all(torch.equal(u, v) for u, v in zip(a, c))  # later epochs: a permutation per seed
    other_rank = batches(5, rank=1)
    assert all(set(u.flatten().tolist()).isdisjoint(v.flatten().tolist()) for u, v in zip(a, other_rank))


def test_loader_resume_continues_identically(counter_shards):
    loader = TokenLoader(counter_shards, rank=1, world_size=2, seed=3)
    for _ in range(7):
        loader.next_batch(256, 32, 2)
    state = json.loads(json.dumps(loader.state_dict()))  # survives a JSON checkpoint
    expected = [loader.next_batch(256, 32, 2) for _ in range(25)]  # crosses epoch boundaries
    resumed = TokenLoader(counter_shards, rank=1, world_size=2, seed=3)
    resumed.load_state_dict(state)
    for (x, y), (u, v) in zip(expected, (resumed.next_batch(256, 32, 2) for _ in range(25))):
        assert torch.equal(x, u) and torch.equal(y, v)
    with pytest.raises(ValueError, match="seed=3"):
        TokenLoader(counter_shards, seed=4).load_state_dict(state)


def test_next_batches_equal_as_many_next_batch_calls(counter_shards):
    one, many = (TokenLoader(counter_shards, rank=1, world_size=2, seed=2) for _ in range(2))
    for _ in range(6):  # crosses epochs
        expected = [one.next_batch(256, 32, 2) for _ in range(2)]
        got = many.next_batches(256, 32, 2)
        assert len(got) == 2
        for (x, y), (u, v) in zip(expected, got):
            assert torch.equal(x, u) and torch.equal(y, v) and u.shape == (2, 32)
    assert one.state_dict() == many.state_dict()
    assert len(many.next_batches(256, 32, 2, count=5)) == 5


@pytest.mark.gpu
def test_next_batches_on_cuda_reuse_one_pinned_buffer(counter_shards):
    """Each step's tokens reach the GPU intact although the pinned buffer is rewritten for the next step."""
    cpu, gpu = (TokenLoader(counter_shards, seed=4) for _ in range(2))
    steps = [gpu.next_batches(512, 32, 4, device="cuda") for _ in range(5)]  # no synchronisation in between
    buffer = gpu._staging._host
    for step in steps:
        for (x, y), (u, v) in zip(cpu.next_batches(512, 32, 4), step):
            assert u.is_cuda and torch.equal(x, u.cpu()) and torch.equal(y, v.cpu())
    assert buffer is gpu._staging._host and buffer.is_pinned()


def test_loader_bad_batch_shapes(counter_shards):
    loader = TokenLoader(counter_shards, rank=0, world_size=3)
    with pytest.raises(ValueError, match="not divisible by world_size"):
        loader.next_batch(1000, 10)
    with pytest.raises(ValueError, match="multiple of seq_len=7"):
        loader.next_batch(3 * 20, 7)
    with pytest.raises(ValueError, match="rank=3"):
        TokenLoader(counter_shards, rank=3, world_size=3)
    with pytest.raises(FileNotFoundError):
        TokenLoader(counter_shards / "nothing_*.bin")
    with pytest.raises(ShardError, match=r"fineweb_train_000000\.bin: token id 999 >= vocab_size 512"):
        TokenLoader(counter_shards, vocab_size=512).next_batch(64, 16)


def test_load_val_tokens(tmp_path):
    write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(100))
    write_shard(tmp_path / "fineweb_val_000001.bin", np.arange(100, 150))
    val = load_val_tokens(tmp_path, seq_len=16)
    assert val.tolist() == list(range(16 * 9 + 1))
    assert load_val_tokens(tmp_path, seq_len=16, limit=40).tolist() == list(range(33))
    with pytest.raises(ValueError, match="fewer than seq_len"):
        load_val_tokens(tmp_path, seq_len=16, limit=10)
    with pytest.raises(ShardError, match="vocab_size 120"):
        load_val_tokens(tmp_path, seq_len=16, vocab_size=120)


# ---- prepare -------------------------------------------------------------------------------------------------------
def _web_docs(n: int) -> list[str]:
    with WEB.open() as f:
        return [json.loads(next(f))["text"] for _ in range(n)]


@needs_web
def test_prepare_jsonl_trains_tokenizer_and_writes_splits(tmp_path):
    docs = _web_docs(60)
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    out = tmp_path / "out"
    meta = prepare([src], out, vocab_size=400, val_docs=10, shard_tokens=5000, progress=False)
    sp = load_tokenizer(out / "tokenizer.model")
    assert sp.vocab_size() == meta["vocab_size"] == 400
    assert (sp.bos_id(), sp.pad_id(), sp.eos_id(), sp.unk_id()) == (1, 0, 2, 3)
    assert sp.is_byte(sp.piece_to_id("<0xE2>"))  # byte fallback is on
    expected = {s: [[BOS_ID, *sp.encode(d)] for d in part] for s, part in (("val", docs[:10]), ("train", docs[10:]))}
    for split, want in expected.items():
        stream = np.concatenate([read_shard(p, vocab_size=400) for p in list_shards(out, split)]).tolist()
        assert stream == [t for doc in want for t in doc]
        assert stream.count(BOS_ID) == len(want)
        assert meta["tokens"][split] == len(stream) and meta["docs"][split] == len(want)
    assert meta["shards"]["train"] == len(list_shards(out, "train")) > 1  # split at shard_tokens
    on_disk = json.loads((out / "meta.json").read_text())
    assert on_disk["sources"] == [str(src.resolve())] and on_disk["tokenizer_trained"]
    with pytest.raises(FileExistsError, match="not empty"):
        prepare([src], out, vocab_size=400, val_docs=10)

    # Same documents as .jsonl.gz and as blank-line separated .txt, with the tokenizer given: identical shards.
    gz = tmp_path / "docs.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    txt = tmp_path / "docs.txt"
    txt.write_text("\n\n".join(d.replace("\n\n", "\n") for d in docs) + "\n")
    for i, source in enumerate((gz, txt)):
        other = tmp_path / f"other{i}"
        meta2 = prepare([source], other, tokenizer=out / "tokenizer.model", val_docs=10, progress=False)
        assert not meta2["tokenizer_trained"] and meta2["docs"] == meta["docs"]
        if source is gz:
            for split in ("val", "train"):
                a = np.concatenate([read_shard(p) for p in list_shards(out, split)])
                b = np.concatenate([read_shard(p) for p in list_shards(other, split)])
                np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="has 400 pieces, but vocab_size=1024"):
        prepare([gz], tmp_path / "x", tokenizer=out / "tokenizer.model", vocab_size=1024, val_docs=10, force=True)


def test_prepare_input_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": "also fine"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:4: bad JSON"):
        prepare([bad], tmp_path / "o1", val_docs=1)
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(ValueError, match=r"missing\.jsonl:2: expected a JSON object with a string \"text\" field"):
        prepare([missing], tmp_path / "o2", val_docs=1)
    with pytest.raises(ValueError, match="unsupported file type"):
        prepare([tmp_path / "x.csv"], tmp_path / "o3")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        prepare([tmp_path / "nope.txt"], tmp_path / "o4")
    one = tmp_path / "one.txt"
    one.write_text("just one document\nwith two lines\n")
    with pytest.raises(ValueError, match="1 documents"):
        prepare([one], tmp_path / "o5")


def test_prepare_cli(tmp_path, capsys):
    src = tmp_path / "a.txt"
    src.write_text("\n\n".join(f"Document number {i}: the quick brown fox, {i * 37} times." for i in range(40)))
    out = tmp_path / "out"
    assert data_main(["prepare", "--input", str(src), "--out", str(out), "--vocab", "320", "--val-docs", "4"]) == 0
    assert '"val": 4' in capsys.readouterr().out
    assert data_main(["prepare", "--input", str(src), "--out", str(out), "--vocab", "320"]) == 1
    assert "--force" in capsys.readouterr().err
    assert data_main(["prepare", "--input", str(src), "--out", str(out), "--vocab", "320", "--force"]) == 0
    assert len(list(out.iterdir())) == 4  # val and train shard, tokenizer, meta: nothing stale


# ---- download (never touches the network) --------------------------------------------------------------------------
def test_download_without_network_gives_clear_error(tmp_path, monkeypatch, capsys):
    def offline(url, timeout=None):
        raise urllib.error.URLError(OSError(-2, "Name or service not known"))

    monkeypatch.setattr(dl.urllib.request, "urlopen", offline)
    with pytest.raises(dl.DownloadError, match="Is there a network connection"):
        dl.download(tmp_path / "d")
    assert data_main(["download", "--out", str(tmp_path / "d")]) == 1
    assert "cannot download https://huggingface.co/datasets/willdepueoai/parameter-golf" in capsys.readouterr().err
    assert not [p for p in (tmp_path / "d").iterdir() if p.name != "meta.json"]  # no partial files


def test_download_fetches_manifest_shards_and_tokenizer(tmp_path, monkeypatch):
    write_shard(tmp_path / "s.bin", [1, 5, 6])
    files = {
        "datasets/manifest.json": json.dumps({
            "datasets": [{"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024",
                          "stats": {"files_train": 3, "files_val": 1}}],
            "tokenizers": [{"name": "sp_bpe_1024", "model_path": "tokenizers/fineweb_1024_bpe.model"}]}).encode(),
        "datasets/datasets/fineweb10B_sp1024/fineweb_val_000000.bin": (tmp_path / "s.bin").read_bytes(),
        "datasets/datasets/fineweb10B_sp1024/fineweb_train_000000.bin": (tmp_path / "s.bin").read_bytes(),
        "datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin": (tmp_path / "s.bin").read_bytes(),
        "datasets/tokenizers/fineweb_1024_bpe.model": b"model bytes",
    }
    prefix = "https://huggingface.co/datasets/willdepueoai/parameter-golf/resolve/main/"
    requested = []

    def fake_urlopen(url, timeout=None):
        requested.append(url)
        path = url.removeprefix(prefix)
        if path not in files:
            raise urllib.error.HTTPError(url, 404, "Not Found", None, None)
        return io.BytesIO(files[path])

    monkeypatch.setattr(dl.urllib.request, "urlopen", fake_urlopen)
    out = tmp_path / "d"
    dl.download(out, train_shards=2, log=lambda *_: None)
    assert sorted(p.name for p in out.iterdir()) == ["fineweb_train_000000.bin", "fineweb_train_000001.bin",
                                                      "fineweb_val_000000.bin", "manifest.json", "meta.json",
                                                      "tokenizer.model"]
    assert read_shard(out / "fineweb_val_000000.bin").tolist() == [1, 5, 6]
    n = len(requested)
    dl.download(out, train_shards=2, log=lambda *_: None)  # valid shards are not fetched again
    assert len(requested) - n == 2  # manifest + tokenizer only
    with pytest.raises(dl.DownloadError, match="has 3 train shards"):
        dl.download(out, train_shards=9)
    with pytest.raises(dl.DownloadError, match="fineweb10B_sp4096 is not in the manifest"):
        dl.download(out, variant="sp4096")


# ---- embedded default corpus ---------------------------------------------------------------------------------------
def test_prepare_default_data_is_cached(tmp_path):
    data, tok = prepare_default_data(tmp_path, vocab_size=512, max_bytes=600_000, progress=False)
    assert tok == data / "tokenizer.model" and tok.is_file()
    meta = json.loads((data / "meta.json").read_text())
    assert meta["vocab_size"] == 512 and meta["docs"]["val"] >= 1 and meta["tokens"]["train"] > 0
    assert read_shard(list_shards(data, "val")[0], vocab_size=512)[0] == BOS_ID
    stamp = (data / "meta.json").stat().st_mtime_ns
    again = prepare_default_data(tmp_path, vocab_size=512, max_bytes=600_000, progress=False)
    assert again == (data, tok) and (data / "meta.json").stat().st_mtime_ns == stamp
    other, _ = prepare_default_data(tmp_path, vocab_size=520, max_bytes=600_000, progress=False)
    assert other != data
    assert not list(tmp_path.glob(".stdlib-*"))  # build folders cleaned up
