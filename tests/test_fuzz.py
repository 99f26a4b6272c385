"""Fuzzing every file format the package reads: config.json, safetensors headers, .pt model files
and training checkpoints, the released layout's .npy arrays, corpora (text, gzip, CSV/TSV columns)
and the evaluation sets' task files. Whatever the bytes, reading either works or raises one of the
package's one-line errors (the InputError family), never another exception, and never hangs
(each example runs under an alarm).

Examples are derived from a fixed seed (``derandomize``) and few, so the test is the same on every
run and cheap; the mutations start from valid files, where the parsers' edge cases are.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import signal
import struct
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import fastmlstm
from fastmlstm.data import datasets
from fastmlstm.data.corpus import Source, build_stream

FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=60, print_blob=True,
                phases=[Phase.explicit, Phase.generate, Phase.shrink],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SECONDS = 20  # far more than any example needs; a parser that loops forever trips it


@contextlib.contextmanager
def bounded():
    """Fail (not hang) an example that runs past SECONDS."""
    def alarm(*_):
        raise TimeoutError(f"a reader ran for more than {SECONDS} s: it hangs")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(SECONDS)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def read_or_refuse(read) -> None:
    """Run ``read()``; anything but success or an InputError (one line) fails the test."""
    with bounded():
        try:
            read()
        except fastmlstm.InputError as exc:
            assert str(exc).strip() and "\n" not in str(exc).strip(), repr(exc)
            assert "weights_only" not in str(exc)  # never torch's advice to switch the check off


# Mutations of valid bytes: flip some bytes, cut the end, splice in a run of one byte.
def mutated(data: bytes):
    n = len(data)
    flips = st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, 255)), min_size=1, max_size=8)
    return st.one_of(
        flips.map(lambda fs: _flip(data, fs)),
        st.integers(0, n - 1).map(lambda k: data[:k]),
        st.tuples(st.integers(0, n), st.integers(1, 64), st.integers(0, 255)).map(
            lambda t: data[:t[0]] + bytes([t[2]]) * t[1] + data[t[0]:]),
        st.binary(max_size=256))


def _flip(data: bytes, flips) -> bytes:
    out = bytearray(data)
    for i, v in flips:
        out[i] = v
    return bytes(out)


def _small_model() -> fastmlstm.ByteLM:
    torch.manual_seed(0)
    return fastmlstm.ByteLM(hidden_size=4, embed_size=2)


MODEL = _small_model()
json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                         max_size=4), max_leaves=12)


# ---------------------------------------------------------------------------------------------
# config.json and model.safetensors


def _pretrained_folder() -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        MODEL.save_pretrained(tmp)
        return {name: (Path(tmp) / name).read_bytes() for name in ("config.json", "model.safetensors")}


GOOD = _pretrained_folder()
CONFIG = json.loads(GOOD["config.json"])


def _load_folder(config: bytes, weights: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_bytes(config)
        (Path(tmp) / "model.safetensors").write_bytes(weights)
        read_or_refuse(lambda: fastmlstm.from_pretrained(tmp))


@FUZZ
@given(st.one_of(mutated(GOOD["config.json"]),
                 st.dictionaries(st.sampled_from(["format", "version", "config", "dtype"]), json_values).map(
                     lambda d: json.dumps({**CONFIG, **d}).encode()),
                 st.dictionaries(st.sampled_from(["hidden_size", "embed_size", "weight_norm", "other"]),
                                 json_values).map(lambda c: json.dumps({**CONFIG, "config": c}).encode())))
def test_config_json(config):
    _load_folder(config, GOOD["model.safetensors"])


def _header(header: dict, data: bytes) -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


_ST_LEN = struct.unpack("<Q", GOOD["model.safetensors"][:8])[0]
ST_HEADER = json.loads(GOOD["model.safetensors"][8:8 + _ST_LEN])
ST_DATA = GOOD["model.safetensors"][8 + _ST_LEN:]
tensor_entries = st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F64", "X9"]) | json_values,
    "shape": st.lists(st.integers(-2, 2**40), max_size=3) | json_values,
    "data_offsets": st.lists(st.integers(-2, 2**40), max_size=3) | json_values})


@FUZZ
@given(st.one_of(
    mutated(GOOD["model.safetensors"]),
    st.tuples(st.sampled_from(sorted(k for k in ST_HEADER if k != "__metadata__")), tensor_entries).map(
        lambda kv: _header({**ST_HEADER, kv[0]: {**ST_HEADER[kv[0]], **kv[1]}}, ST_DATA)),
    json_values.map(lambda m: _header({**ST_HEADER, "__metadata__": m}, ST_DATA)),
    st.integers(0, 2**64 - 1).map(lambda n: struct.pack("<Q", n) + GOOD["model.safetensors"][8:])))
def test_safetensors_headers(weights):
    _load_folder(GOOD["config.json"], weights)


# ---------------------------------------------------------------------------------------------
# .pt model files and training checkpoints


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


GOOD_PT = _torch_bytes(MODEL.to_record())
records = st.fixed_dictionaries({}, optional={
    "format": st.sampled_from(["fastmlstm.ByteLM", "fastmlstm.train", "other"]) | json_values,
    "version": json_values | st.just(1), "config": json_values | st.just(MODEL.config),
    "state_dict": json_values | st.just({"x": torch.zeros(2)}) | st.just(
        {k: v.to(torch.int32) for k, v in MODEL.state_dict().items()}),
    "model": json_values | st.just(MODEL.to_record())})


def _load_pt(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "m.pt").write_bytes(data)
        read_or_refuse(lambda: fastmlstm.load(Path(tmp) / "m.pt"))


@FUZZ
@given(st.one_of(mutated(GOOD_PT), records.map(_torch_bytes), json_values.map(_torch_bytes)))
def test_model_files_and_checkpoints(data):
    _load_pt(data)


@settings(FUZZ, max_examples=15)
@given(mutated(_torch_bytes({"format": "fastmlstm.train", "version": 1, "step": 3, "model": MODEL.to_record()})))
def test_checkpoint_bytes(data):
    _load_pt(data)


# ---------------------------------------------------------------------------------------------
# The released layout (.npy)


def _released() -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        fastmlstm.save_openai(MODEL, tmp)
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir()}


RELEASED = _released()


@FUZZ
@given(st.sampled_from([f"{i}.npy" for i in range(15)]).flatmap(
    lambda name: st.tuples(st.just(name), mutated(RELEASED[name]))))
def test_released_npy(case):
    name, data = case
    with tempfile.TemporaryDirectory() as tmp:
        for other, content in RELEASED.items():
            (Path(tmp) / other).write_bytes(data if other == name else content)
        read_or_refuse(lambda: fastmlstm.load_openai(tmp))


# ---------------------------------------------------------------------------------------------
# Corpora


CSV = b'label,text\n1,"a ""quoted"" review"\n0,plain\n'
corpus_files = st.one_of(
    st.tuples(st.just("c.txt"), st.binary(max_size=300)),
    st.tuples(st.just("c.txt.gz"), mutated(gzip.compress(b"a review\nanother\n", mtime=0))),
    st.tuples(st.sampled_from(["c.csv", "c.tsv", "c.csv#text", "c.tsv#body"]), mutated(CSV)),
    st.tuples(st.sampled_from(["c.csv", "c.tsv#text"]),
              st.text(alphabet=st.sampled_from('ab,"\t\n\r\0\ufeff'), max_size=60).map(
                  lambda t: ("text,label\n" + t).encode("utf-8", "surrogatepass"))),
    st.tuples(st.just("c.csv.gz"), mutated(gzip.compress(CSV, mtime=0))))


@FUZZ
@given(corpus_files)
def test_corpora(case):
    spec, data = case
    name = spec.split("#")[0]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / name).write_bytes(data)
        read_or_refuse(lambda: build_stream([Source.parse(str(Path(tmp) / spec))], Path(tmp) / "out" / "c.bin"))


# ---------------------------------------------------------------------------------------------
# The evaluation sets' task files


SIBLINGS = {"sst2": {"dev_binary_sent.csv": b"label,sentence\n1,fine\n"}, "mr": {"rt-polarity.neg": b"bad\n"},
            "mpqa": {"mpqa.neg": b"bad\n"}}  # the other files a loader requires, left valid
TASK_FILES = {
    "sst2": ("train_binary_sent.csv", b"label,sentence\n1,good film\n0,bad one\n"),
    "msrp": ("msr_paraphrase_train.txt", (b"\xef\xbb\xbfQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\r\n"
                                          b"1\t1\t2\ta cat\tthe cat\r\n0\t3\t4\tx\ty\r\n")),
    "sick": ("SICK_train.txt", (b"pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment\n"
                                b"1\ta dog runs\ta dog is running\t4.5\tENTAILMENT\n")),
    "yelp": ("train.csv", b'"1","meh food"\n"2","yum\\nyes"\n'),
    "mr": ("rt-polarity.pos", b"c\xe9sar is fine\ngood\n"),
    "mpqa": ("mpqa.pos", b"good\n\nfine\n"),
}


@FUZZ
@given(st.sampled_from(sorted(TASK_FILES)).flatmap(lambda name: st.tuples(st.just(name), mutated(TASK_FILES[name][1]))))
def test_task_files(case):
    name, data = case
    filename, _ = TASK_FILES[name]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / filename).write_bytes(data)
        for sibling, content in SIBLINGS.get(name, {}).items():
            (Path(tmp) / sibling).write_bytes(content)
        read_or_refuse(lambda: datasets.load(name, tmp))


def test_the_alarm_catches_a_hang():
    with pytest.raises(TimeoutError, match="hangs"), bounded():
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        while True:
            pass


def test_mutations_start_from_files_that_load():
    """The seeds are valid, so the mutations explore near-valid input, not only garbage."""
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in GOOD.items():
            (Path(tmp) / name).write_bytes(data)
        fastmlstm.from_pretrained(tmp)
        (Path(tmp) / "m.pt").write_bytes(GOOD_PT)
        fastmlstm.load(Path(tmp) / "m.pt")
    for name, (filename, data) in TASK_FILES.items():
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / filename).write_bytes(data)
            for sibling, content in SIBLINGS.get(name, {}).items():
                (Path(tmp) / sibling).write_bytes(content)
            assert datasets.load(name, tmp)
    assert zipfile.is_zipfile(io.BytesIO(GOOD_PT)) and np.load(io.BytesIO(RELEASED["0.npy"])).shape == (256, 2)
