"""Token shards (llm.c and nanoGPT formats), batches, tokenizers and ``fusedlm prepare``."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from fusedlm.cli import main
from fusedlm.train.data import (
    HEADER_BYTES,
    LLMC_MAGIC,
    DataError,
    TokenBatches,
    find_shards,
    read_shard,
    write_shard,
)
from fusedlm.train.prepare import ByteTokenizer, HFTokenizer, prepare


@pytest.mark.parametrize("fmt", ["llmc", "nanogpt"])
@pytest.mark.parametrize("count", [0, 1, 1000])
def test_shard_round_trip(tmp_path, fmt, count):
    tokens = np.random.default_rng(count).integers(0, 65536, count)
    path = tmp_path / "s.bin"
    write_shard(path, tokens, fmt)
    expected_size = 2 * count + (HEADER_BYTES if fmt == "llmc" else 0)
    assert os.path.getsize(path) == expected_size
    np.testing.assert_array_equal(read_shard(path), tokens)


def test_llmc_header_layout(tmp_path):
    write_shard(tmp_path / "s.bin", [5, 6, 7])
    header = np.fromfile(tmp_path / "s.bin", dtype=np.int32, count=256)
    assert header[:3].tolist() == [LLMC_MAGIC, 1, 3] and not header[3:].any()


def test_bad_shards_raise_naming_the_file(tmp_path):
    write_shard(tmp_path / "s.bin", np.arange(100))
    with open(tmp_path / "s.bin", "r+b") as f:
        f.truncate(HEADER_BYTES + 50)
    with pytest.raises(DataError, match=r"s\.bin.*truncated"):
        read_shard(tmp_path / "s.bin")
    (tmp_path / "odd.bin").write_bytes(b"abc")
    with pytest.raises(DataError, match="odd.bin"):
        read_shard(tmp_path / "odd.bin")
    with pytest.raises(DataError, match="no such shard"):
        read_shard(tmp_path / "missing.bin")
    with pytest.raises(DataError, match="uint16"):
        write_shard(tmp_path / "big.bin", [70000])
    write_shard(tmp_path / "short_train.bin", np.arange(8))
    with pytest.raises(DataError, match="shorter than one window"):
        TokenBatches([str(tmp_path / "short_train.bin")], 2, block_size=8)


def _shards(tmp_path, lengths=(300, 501)) -> list[str]:
    paths = []
    start = 0
    for i, n in enumerate(lengths):
        path = str(tmp_path / f"train_{i:03d}.bin")
        write_shard(path, np.arange(start, start + n) % 60000)
        paths.append(path)
        start += n
    return paths


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_batches_are_shifted_windows(tmp_path, mode):
    batches = TokenBatches(_shards(tmp_path), 3, 17, mode=mode, seed=1)
    for _ in range(20):
        x, y = batches.next_batch()
        assert x.shape == y.shape == (3, 17) and x.dtype == torch.int64
        torch.testing.assert_close(x[:, 1:], y[:, :-1])
        assert torch.all(y - x == 1)  # consecutive tokens: windows never straddle shards


def test_sequential_batches_walk_the_shards_in_order(tmp_path):
    batches = TokenBatches(_shards(tmp_path, (40, 40)), 2, 9, mode="sequential")
    firsts = [batches.next_batch()[0][:, 0].tolist() for _ in range(4)]
    assert firsts == [[0, 9], [18, 27], [40, 49], [58, 67]]


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_state_dict_resumes_the_same_batches(tmp_path, mode):
    a = TokenBatches(_shards(tmp_path), 4, 16, mode=mode, seed=7)
    for _ in range(5):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # survives serialisation
    expected = [a.next_batch()[0] for _ in range(5)]
    b = TokenBatches(_shards(tmp_path), 4, 16, mode=mode, seed=7)
    b.load_state_dict(state)
    for want in expected:
        assert torch.equal(b.next_batch()[0], want)


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_ranks_split_the_global_batch(tmp_path, mode):
    single = TokenBatches(_shards(tmp_path), 6, 10, mode=mode, seed=3)
    ranks = [TokenBatches(_shards(tmp_path), 2, 10, mode=mode, seed=3, rank=r, world_size=3)
             for r in range(3)]
    for _ in range(4):
        whole = single.next_batch()[0]
        assert torch.equal(torch.cat([r.next_batch()[0] for r in ranks]), whole)


def test_find_shards(tmp_path):
    _shards(tmp_path)
    write_shard(tmp_path / "val_000.bin", np.arange(100))
    assert [os.path.basename(p) for p in find_shards(str(tmp_path), "val")] == ["val_000.bin"]
    assert len(find_shards(str(tmp_path / "train_*.bin"), "train")) == 2
    with pytest.raises(DataError, match="no '\\*test\\*.bin' shards"):
        find_shards(str(tmp_path), "test")
    with pytest.raises(DataError, match="no such file"):
        find_shards(str(tmp_path / "nothing"), "train")


def test_byte_tokenizer_round_trip():
    text = "déjà vu — ∑ 🙂\n"
    tokens = ByteTokenizer().encode(text)
    assert tokens.max() < 256 and ByteTokenizer().decode(tokens) == text


def _write_corpus(root) -> list[str]:
    os.makedirs(root / "sub", exist_ok=True)
    (root / "a.txt").write_text("hello world\n" * 50)
    (root / "sub" / "b.py").write_text("print('hi')\n" * 50)
    (root / "sub" / "skip.bin").write_bytes(b"\x00\x01")
    return [str(root)]


@pytest.mark.parametrize("fmt", ["llmc", "nanogpt"])
def test_prepare_byte_level(tmp_path, fmt):
    inputs = _write_corpus(tmp_path / "corpus")
    meta = prepare(inputs, str(tmp_path / "out"), fmt=fmt, val_fraction=0.1, shard_tokens=500,
                   log=lambda *a: None)
    assert meta["files"] == 2 and meta["vocab_size"] == 256
    train = np.concatenate([read_shard(p) for p in find_shards(str(tmp_path / "out"), "train")])
    val = np.concatenate([read_shard(p) for p in find_shards(str(tmp_path / "out"), "val")])
    assert len(find_shards(str(tmp_path / "out"), "train")) > 1  # split into 500-token shards
    text = ByteTokenizer().decode(np.concatenate([train, val]))
    assert text == "hello world\n" * 50 + "\n\n" + "print('hi')\n" * 50 + "\n\n"
    assert len(val) == meta["val_tokens"] == int(len(text) * 0.1)


def test_prepare_with_a_local_tokenizer_json(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "print": 3}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    inputs = _write_corpus(tmp_path / "corpus")
    meta = prepare(inputs, str(tmp_path / "out"), str(tmp_path / "tokenizer.json"),
                   log=lambda *a: None)
    assert meta["vocab_size"] == 4
    tokens = read_shard(find_shards(str(tmp_path / "out"), "train")[0])
    assert tokens[:2].tolist() == [1, 2]
    assert HFTokenizer(str(tmp_path / "tokenizer.json")).decode([1, 2]) == "hello world"


def test_prepare_cli_and_its_errors(tmp_path, capsys):
    inputs = _write_corpus(tmp_path / "corpus")
    assert main(["prepare", *inputs, "--out", str(tmp_path / "out")]) == 0
    assert os.path.isfile(tmp_path / "out" / "meta.json")
    assert main(["prepare", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope: no such file or directory" in err
    assert main(["prepare", *inputs, "--out", str(tmp_path / "o3"), "--tokenizer",
                 str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err
    not_a_tokenizer = tmp_path / "notes.txt"
    not_a_tokenizer.write_text("plain text\n")
    assert main(["prepare", *inputs, "--out", str(tmp_path / "o4"), "--tokenizer",
                 str(not_a_tokenizer)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a Hugging Face tokenizer.json" in err
    assert main(["prepare", *inputs, "--out", str(tmp_path / "o5"), "--shard-tokens", "0"]) == 2
    assert "argument 'shard_tokens' must be a positive integer" in capsys.readouterr().err
