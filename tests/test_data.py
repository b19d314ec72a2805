import json

import pytest
import torch
from transformers import AutoTokenizer

from compress import data as data_mod
from compress.corpus import BUILTIN_SPLITS, builtin_path
from compress.data import DataSourceError, batch_indices, load_blocks, pack, packed_blocks, read_texts, resolve_data_path
from compress.recipe import DataSpec


@pytest.fixture
def tok(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def test_builtin_corpus_is_shipped_and_split():
    for name, path in BUILTIN_SPLITS.items():
        assert path.is_file() and path.stat().st_size > 50_000, name
    train = {json.loads(l)["source"] for l in data_mod._open_text(builtin_path("pydocs/train"))}
    held = {json.loads(l)["source"] for l in data_mod._open_text(builtin_path("pydocs/eval"))}
    assert held and not train & held, "eval documents must be held out of training"
    with pytest.raises(ValueError, match="pydocs/nope"):
        resolve_data_path("builtin:pydocs/nope")


def test_read_txt_jsonl_and_folder(tmp_path):
    (tmp_path / "a.txt").write_text("alpha text")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text(json.dumps({"body": "beta"}) + "\n\n" + json.dumps({"body": "gamma"}) + "\n")
    assert list(read_texts(tmp_path / "a.txt")) == ["alpha text"]
    assert list(read_texts(tmp_path / "sub" / "b.jsonl", "body")) == ["beta", "gamma"]
    (tmp_path / "sub" / "b.jsonl").rename(tmp_path / "sub" / "b.jsonl.bak")
    (tmp_path / "sub" / "c.jsonl").write_text(json.dumps({"text": "delta"}) + "\n")
    assert list(read_texts(tmp_path)) == ["alpha text", "delta"]


def test_bad_sources_name_the_problem(tmp_path):
    with pytest.raises(DataSourceError, match="data path not found: .*nowhere.txt"):
        resolve_data_path(str(tmp_path / "nowhere.txt"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no field"}\n')
    with pytest.raises(DataSourceError, match=r"bad.jsonl:2: no 'text' field"):
        list(read_texts(bad))
    bad.write_text("{not json\n")
    with pytest.raises(DataSourceError, match=r"bad.jsonl:1: not valid JSON"):
        list(read_texts(bad))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataSourceError, match="unsupported file type"):
        list(read_texts(tmp_path / "x.csv"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataSourceError, match="folder holds no"):
        list(read_texts(empty))


def test_pack_joins_documents_with_eos(tok):
    docs = ["The first document.", "A second one, a little longer than the first."]
    blocks = pack(iter(docs), tok, seq_len=4)
    expected = []
    for d in docs:
        expected += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = len(expected) // 4
    assert blocks.shape == (n, 4) and blocks.dtype == torch.int64
    assert blocks.flatten().tolist() == expected[: n * 4]
    assert pack(iter(docs), tok, seq_len=4, max_tokens=8).shape == (2, 4)


def test_every_window_starts_with_bos_for_a_tokenizer_that_adds_one(tok, bos_tokenizer_dir, tmp_path, text_files):
    bos_tok = AutoTokenizer.from_pretrained(bos_tokenizer_dir)
    assert data_mod.bos_prefix(tok) == [] and data_mod.bos_prefix(bos_tok) == [bos_tok.bos_token_id]
    docs = ["The first document.", "A second one, a little longer than the first.", "And a third."]
    stream = []
    for d in docs:
        stream += bos_tok(d, add_special_tokens=False)["input_ids"] + [bos_tok.eos_token_id]
    blocks = pack(iter(docs), bos_tok, seq_len=5)
    n = len(stream) // 4
    assert blocks.shape == (n, 5)
    assert (blocks[:, 0] == bos_tok.bos_token_id).all()
    assert blocks[:, 1:].flatten().tolist() == stream[: n * 4]  # the text itself is neither lost nor repeated
    assert pack(iter(docs), bos_tok, seq_len=5, max_tokens=10).shape == (2, 5)
    # A tokenizer without BOS packs exactly as before: no window gains a token.
    plain = pack(iter(docs), tok, seq_len=5)
    assert tok.bos_token_id is None or not (plain[:, 0] == tok.bos_token_id).all()
    cached = packed_blocks(str(text_files["eval"]), bos_tok, seq_len=16, text_field="text", max_tokens=None, cache_dir=tmp_path)
    assert (cached[:, 0] == bos_tok.bos_token_id).all()


def test_blocks_are_cached(tmp_path, tok, monkeypatch, text_files):
    first = packed_blocks(str(text_files["train"]), tok, seq_len=16, text_field="text", max_tokens=None, cache_dir=tmp_path)
    assert torch.equal(first, pack(read_texts(text_files["train"]), tok, seq_len=16))
    with monkeypatch.context() as m:
        m.setattr(data_mod, "_packed_rows", lambda *a, **k: pytest.fail("re-tokenized despite the cache"))
        again = packed_blocks(str(text_files["train"]), tok, seq_len=16, text_field="text", max_tokens=None, cache_dir=tmp_path)
    assert torch.equal(first, again)
    # A cache whose blocks file was cut short (a kill, a full disk) is rebuilt, never read as a shorter corpus.
    first, again = first.clone(), None  # both map the file cut below
    (tokens,) = tmp_path.glob("*.tokens")
    with tokens.open("r+b") as fh:
        fh.truncate(tokens.stat().st_size - 8)
    assert torch.equal(packed_blocks(str(text_files["train"]), tok, seq_len=16, text_field="text", max_tokens=None, cache_dir=tmp_path), first)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "a staging file was left behind"


def test_corpus_streams_to_disk_in_bounded_pieces(tmp_path, tok, monkeypatch, text_files):
    """Packing holds about TOKEN_CHUNK tokens at a time and gives exactly the blocks of packing in one piece,
    with and without a token cap and a BOS prefix."""
    whole = {cap: pack(read_texts(text_files["train"]), tok, seq_len=16, max_tokens=cap) for cap in (None, 200)}
    monkeypatch.setattr(data_mod, "TOKEN_CHUNK", 40)
    chunks = list(data_mod._packed_rows(read_texts(text_files["train"]), tok, 16, None))
    longest = max(len(tok(d, add_special_tokens=False)["input_ids"]) + 1 for d in read_texts(text_files["train"]))
    assert len(chunks) > 3 and max(len(c) for c in chunks) * 16 <= 40 + longest + 16, "a chunk held more than TOKEN_CHUNK tokens and one document"
    for cap, expected in whole.items():
        streamed = packed_blocks(str(text_files["train"]), tok, seq_len=16, text_field="text", max_tokens=cap, cache_dir=tmp_path)
        assert torch.equal(streamed, expected), cap
    assert len(whole[200]) == 200 // 16


def test_too_little_text(tmp_path, tok):
    short = tmp_path / "short.txt"
    short.write_text("hi")
    with pytest.raises(DataSourceError, match="fewer than seq_len=64 tokens"):
        packed_blocks(str(short), tok, seq_len=64, text_field="text", max_tokens=None, cache_dir=tmp_path)


def test_eval_fraction_holds_out_tail(tmp_path, tok, text_files):
    spec = DataSpec(train=str(text_files["train"]), eval=None, eval_fraction=0.1, seq_len=16, max_eval_tokens=None, cache_dir=str(tmp_path))
    blocks = load_blocks(spec, tok)
    full = packed_blocks(str(text_files["train"]), tok, seq_len=16, text_field="text", max_tokens=None, cache_dir=tmp_path)
    assert len(blocks.train) + len(blocks.eval) == len(full)
    assert torch.equal(blocks.eval, full[-len(blocks.eval):])


def test_batch_indices_cover_each_epoch_once():
    n, bs, accum = 10, 3, 2
    seen = [batch_indices(n, step, micro, bs, accum, seed=1).tolist() for step in range(5) for micro in range(accum)]
    flat = [i for b in seen for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert batch_indices(n, 3, 1, bs, accum, seed=1).tolist() == seen[7]
    other_seed = [batch_indices(n, 0, m, bs, accum, seed=2).tolist() for m in range(accum)]
    assert other_seed != seen[:accum]
