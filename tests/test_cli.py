"""The probe toolkit's CLI end to end on a small randomly-initialized model saved with
fastmlstm.save (and the same model in the released layout): featurize, probe, visualize,
generate, and clear one-line errors for bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import fastmlstm
from fastmlstm import cli
from fastmlstm.cli import main
from fastmlstm.ops.registry import REGISTRY, backend_status
from fastmlstm.probe import featurize


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    model = fastmlstm.ByteLM(hidden_size=16, embed_size=8)
    fastmlstm.save(model, path / "small.pt")
    fastmlstm.save_openai(model, path / "released")
    return model, path / "small.pt", path / "released"


@pytest.fixture(scope="module")
def sst(tmp_path_factory):
    """A small SST-2 folder in the released CSV format."""
    folder = tmp_path_factory.mktemp("data") / "sst2"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 60), ("dev", 30)):
        rows = ["label,sentence"]
        for i in range(n):
            label = int(rng.integers(0, 2))
            word = rng.choice(["great", "lovely", "superb"] if label else ["awful", "dull", "poor"])
            rows.append(f'{label},"A {word} film, number {i}"')
        (folder / f"{split}_binary_sent.csv").write_text("\n".join(rows) + "\n")
    return folder


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_featurize_texts_file_and_dataset(models, sst, tmp_path, capsys):
    model, small, released = models
    inp = tmp_path / "texts.txt"
    inp.write_bytes(b"Great phone\n\ncaf\xe9 in Windows-1252\nlast line")
    code, out, err = run(capsys, "featurize", "--model", small, "--input", inp, "-o", tmp_path / "f.npy")
    assert code == 0, err
    summary = json.loads(out)
    feats = np.load(tmp_path / "f.npy")
    assert summary["shape"] == [4, 16] and feats.dtype == np.float32
    # The default --input-encoding hands the model each line's bytes, as the Python API does with bytes.
    expected = featurize(model, [b"Great phone", b"", b"caf\xe9 in Windows-1252", b"last line"])
    np.testing.assert_array_equal(feats, expected)
    code, _, err = run(capsys, "featurize", "--model", small, "--input", inp, "--input-encoding", "utf-8-or-cp1252",
                       "-o", tmp_path / "c.npy")
    assert code == 0, err
    np.testing.assert_array_equal(np.load(tmp_path / "c.npy")[2],
                                  featurize(model, ["caf\u00e9 in Windows-1252"])[0])
    code, _, err = run(capsys, "featurize", "--model", small, "--input", inp, "--input-encoding", "utf-8",
                       "-o", tmp_path / "e.npy")
    assert code == 2 and f"{inp}, line 3: not valid UTF-8" in err
    expected = featurize(model, ["Great phone", "", "caf\u00e9 in Windows-1252", "last line"])
    # the released-layout directory is the same model
    code, out, _ = run(capsys, "featurize", "--model", released, "--text", "Great phone", "--text", "",
                       "-o", tmp_path / "g.npy")
    assert code == 0
    np.testing.assert_allclose(np.load(tmp_path / "g.npy"), expected[:2], rtol=1e-5, atol=1e-6)
    code, out, err = run(capsys, "featurize", "--model", small, "--dataset", "sst2:dev", "--data-dir", sst,
                         "--raw", "-o", tmp_path / "d.npy")
    assert code == 0, err
    assert np.load(tmp_path / "d.npy").shape == (30, 16) and np.abs(np.load(tmp_path / "d.npy")).max() > 0


def test_probe_prints_one_json_object_and_writes_plots(models, sst, tmp_path, capsys):
    _, small, _ = models
    code, out, err = run(capsys, "probe", "--model", small, "--task", "sst2", "--data-dir", sst, "--plots",
                         tmp_path / "plots", "--curve", "--draws", "2", "--output", tmp_path / "r.json", "--no-progress")
    assert code == 0, err
    assert len(out.strip().splitlines()) == 1
    result = json.loads(out)
    for key in ("task", "accuracy", "C", "features_used", "sentiment_unit", "unit_accuracy"):
        assert key in result
    assert result["task"] == "sst2" and result["evaluated_on"].startswith("dev") and 0 <= result["accuracy"] <= 100
    assert json.loads((tmp_path / "r.json").read_text()) == result
    assert (tmp_path / "plots" / "sst2_data_efficiency.png").read_bytes()[:4] == b"\x89PNG"
    if result["sentiment_unit"] is not None:
        assert (tmp_path / "plots" / "sst2_unit_histogram.png").read_bytes()[:4] == b"\x89PNG"


def test_probe_reads_fastmlstm_data(models, sst, capsys, monkeypatch):
    _, _, released = models
    monkeypatch.setenv("FASTMLSTM_DATA", str(sst.parent))
    code, out, err = run(capsys, "probe", "--model", released, "--task", "sst2", "--limit", "20")
    assert code == 0, err
    assert json.loads(out)["n_eval"] == 20


def test_visualize_and_generate(models, tmp_path, capsys):
    _, small, released = models
    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps({"task": "sst2", "sentiment_unit": 3, "unit_sign": -1}))
    code, out, err = run(capsys, "visualize", "--model", small, "--probe", probe, "--text", "Loved it &amp; more",
                         "--html", tmp_path / "v.html", "--png", tmp_path / "v.png")
    assert code == 0, err
    assert json.loads(out)["unit"] == 3 and json.loads(out)["chars"] == len("Loved it & more")
    assert "<span" in (tmp_path / "v.html").read_text(encoding="utf-8")
    assert (tmp_path / "v.png").read_bytes()[:4] == b"\x89PNG"

    code, out, err = run(capsys, "generate", "--model", small, "--prefix", "The", "--n-bytes", "20",
                         "--num-samples", "2", "--fix", "3=1.0", "--fix", "4=-1", "--seed", "0", "--json")
    assert code == 0, err
    record = json.loads(out)
    assert record["fixed_units"] == {"3": 1.0, "4": -1.0} and len(record["samples"]) == 2
    code, out, err = run(capsys, "generate", "--model", released, "--probe", probe, "--n-bytes", "10", "--seed", "0")
    assert code == 0, err
    assert out.count("--- positive") == 1 and out.count("--- negative") == 1


@pytest.mark.parametrize(
    "argv, match",
    [
        (["featurize", "--model", "{tmp}/missing.pt", "--text", "a", "-o", "{tmp}/x.npy"], "no model file"),
        (["featurize", "--model", "{small}", "-o", "{tmp}/x.npy"], "no texts"),
        (["featurize", "--model", "{small}", "--dataset", "sst2:test", "--data-dir", "{sst}", "-o", "{tmp}/x.npy"],
         "not 'test'"),
        (["probe", "--model", "{small}", "--task", "mr", "--data-dir", "{tmp}"], "rt-polarity.pos"),
        (["probe", "--model", "{small}", "--task", "mpqa", "--data-dir", "{onecls}"], "mpqa.neg holds no examples"),
        (["visualize", "--model", "{small}", "--text", "a", "--html", "{tmp}/v.html"], "which unit"),
        (["visualize", "--model", "{small}", "--unit", "99", "--text", "a", "--html", "{tmp}/v.html"], "outside"),
        (["visualize", "--model", "{small}", "--unit", "1", "--text", "a"], "where to write"),
        (["generate", "--model", "{small}", "--fix", "3:1"], "UNIT=VALUE"),
        (["generate", "--model", "{small}", "--fix", "99=1"], "fixed_units"),
        (["featurize", "--model", "{small}", "--text", "\ud800", "-o", "{tmp}/x.npy"], "surrogate"),
        (["featurize", "--model", "{small}", "--text", "a", "-o", "{tmp}/no/such/dir/x.npy"], "cannot write"),
        # refused before the model is even loaded, not after the features are computed
        (["featurize", "--model", "{tmp}/missing.pt", "--text", "a", "-o", "{tmp}/no/dir/x.npy"],
         "cannot write --output {tmp}/no/dir/x.npy: its folder {tmp}/no/dir does not exist"),
        (["probe", "--model", "{tmp}/missing.pt", "--task", "sst2", "--data-dir", "{sst}", "--output", "{tmp}/no/o.json"],
         "cannot write --output {tmp}/no/o.json: its folder {tmp}/no does not exist"),
        (["featurize", "--model", "{small}", "--input", "{tmp}/none.txt", "-o", "{tmp}/x.npy"], "no such file"),
        (["featurize", "--model", "{small}", "--input", "{tmp}", "-o", "{tmp}/x.npy"], "--input {tmp} is a directory"),
        (["featurize", "--model", "{small}", "--input", "{tmp}/empty.txt", "-o", "{tmp}/x.npy"],
         "--input {tmp}/empty.txt is empty"),
        (["featurize", "--model", "{small}", "--text", "a", "-o", "{tmp}"], "--output {tmp} is a directory"),
        (["featurize", "--model", "{small}", "--text", "a", "--batch-size", "0", "-o", "{tmp}/x.npy"],
         "argument --batch-size: must be an integer >= 1, got '0'"),
        (["featurize", "--model", "{tmp}/empty.txt", "--text", "a", "-o", "{tmp}/x.npy"], "empty.txt"),
        (["probe", "--model", "{small}", "--task", "sst2", "--data-dir", "{sst}", "--output", "{tmp}"],
         "--output {tmp} is a directory"),
        (["probe", "--model", "{small}", "--task", "sst2", "--data-dir", "{sst}", "--plots", "{tmp}/empty.txt/sub"],
         "--plots {tmp}/empty.txt/sub: {tmp}/empty.txt is a file, not a folder"),
        (["visualize", "--model", "{small}", "--unit", "1", "--text", "a", "--png", "{tmp}"], "--png {tmp} is a directory"),
        (["visualize", "--model", "{small}", "--unit", "1", "--text", "a", "--html", "{tmp}/empty.txt/v.html"],
         "--html {tmp}/empty.txt/v.html: {tmp}/empty.txt is a file, not a folder"),
        (["probe", "--model", "{small}", "--task", "sst2", "--data-dir", "{sst}", "--seed", "-1"],
         "argument --seed: must be an integer in [0, 2147483647], got '-1'"),
        (["probe", "--model", "{small}", "--task", "sst2", "--data-dir", "{sst}", "--draws", "0"],
         "argument --draws: must be an integer >= 1, got '0'"),
        (["visualize", "--model", "{small}", "--probe", "{tmp}", "--text", "a", "--html", "{tmp}/v.html"],
         "--probe {tmp} is a directory"),
        (["visualize", "--model", "{small}", "--probe", "{tmp}/none.json", "--text", "a", "--html", "{tmp}/v.html"],
         "--probe {tmp}/none.json: no such file"),
        (["visualize", "--model", "{small}", "--probe", "{tmp}/bad_unit.json", "--text", "a", "--html", "{tmp}/v.html"],
         "sentiment_unit must be an integer >= 0, got 'two'"),
        (["visualize", "--model", "{small}", "--unit", "1", "--input", "{tmp}/empty.txt", "--html", "{tmp}/v.html"],
         "is empty"),
        (["visualize", "--model", "{small}", "--unit", "1", "--text", "a", "--html", "{tmp}/v.html", "--scale", "0"],
         "argument --scale: must be a finite number > 0, got '0'"),
        (["generate", "--model", "{small}", "--temperature", "nan"],
         "argument --temperature: must be a finite number >= 0, got 'nan'"),
        (["generate", "--model", "{small}", "--fix", "3=1", "--fix", "3=2"], "--fix names unit 3 twice"),
        (["generate", "--model", "{small}", "--steer", "99"], "fixed_units must name units in [0, 16)"),
        # a device flag this machine cannot honour is the flag's fault, not the model file's
        (["generate", "--model", "{small}", "--device", "foo"], "--device 'foo' is not a device"),
        (["featurize", "--model", "{small}", "--text", "a", "-o", "{tmp}/x.npy", "--device", "cuda:99"],
         "--device 'cuda:99' asks for CUDA"),
        (["download", "sst2", "--root", "{tmp}/empty.txt", "--no-progress"], "{tmp}/empty.txt"),
        (["download", "openai-sentiment", "--root", "{tmp}/empty.txt", "--no-progress"], "{tmp}/empty.txt"),
        (["download", "sst2", "--timeout", "0"], "argument --timeout: must be a finite number > 0, got '0'"),
        (["train", "--data", "{tmp}/empty.txt", "--out", "{tmp}/run", "--lr", "nan"],
         "argument --lr: must be a finite number > 0, got 'nan'"),
        ([], "the following arguments are required: command"),
        (["bogus"], "invalid choice: 'bogus'"),
        (["featurize", "--text", "a"], "the following arguments are required: --model, --output/-o"),
    ],
)
def test_bad_input_gives_one_line_errors(models, sst, tmp_path, capsys, argv, match):
    _, small, _ = models
    onecls = tmp_path / "mpqa"
    onecls.mkdir()
    (onecls / "mpqa.pos").write_text("good\nfine\nnice\n")
    (onecls / "mpqa.neg").write_text("\n")  # only blank lines: no negative example, refused by the loader
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "bad_unit.json").write_text('{"sentiment_unit": "two"}')
    argv = [a.format(tmp=tmp_path, small=small, sst=sst, onecls=onecls) for a in argv]
    code, _, err = run(capsys, *argv)
    assert code == 2 and match.format(tmp=tmp_path) in err and "Traceback" not in err, err
    assert err.startswith(f"fastmlstm {argv[0]}: error:" if argv and argv[0] != "bogus" else "fastmlstm: error:")
    assert err.count("\n") == 1, err  # one line, no usage block
    assert not (tmp_path / "run").exists()


# The test device's backends that cannot run on it ("cuda" on a machine without CUDA).
UNAVAILABLE = [b for b in REGISTRY
               if not backend_status(b, "cuda" if torch.cuda.is_available() else "cpu")[0]]


@pytest.mark.skipif(not UNAVAILABLE, reason="every backend runs here")
@pytest.mark.parametrize("command", ["train", "featurize", "generate"])
def test_a_backend_that_cannot_run_here_is_one_line_and_writes_nothing(command, models, tmp_path, capsys):
    _, small, _ = models
    (tmp_path / "corpus.txt").write_bytes(b"a small corpus of review text, good and bad\n" * 100)
    argv = {"train": ["--preset", "tiny", "--hidden", "8", "--embed", "4", "--batch", "2", "--seq", "8", "--steps", "2",
                      "--eval-bytes", "1000", "--data", tmp_path / "corpus.txt", "--out", tmp_path / "run"],
            "featurize": ["--model", small, "--text", "a", "-o", tmp_path / "x.npy"],
            "generate": ["--model", small, "--n-bytes", "3"]}[command]
    code, out, err = run(capsys, command, *argv, "--backend", UNAVAILABLE[0])
    assert code == 2 and err.startswith(f"fastmlstm {command}: error: --backend {UNAVAILABLE[0]}: "), err
    assert f"backend {UNAVAILABLE[0]!r} is unavailable" in err and err.count("\n") == 1 and not out, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt"]  # train made no --out folder


def test_running_out_of_memory_is_one_line(models, capsys, monkeypatch):
    _, small, _ = models

    def allocate(args):
        torch.empty(2**62, dtype=torch.uint8)  # more than any machine has: the allocator's own error

    monkeypatch.setattr(cli, "cmd_generate", allocate)
    code, _, err = run(capsys, "generate", "--model", small)
    assert code == 2 and err.startswith("fastmlstm generate: error: out of memory: "), err
    assert "can't allocate memory" in err and err.count("\n") == 1, err

    def bug(args):
        raise RuntimeError("a bug keeps its traceback")

    monkeypatch.setattr(cli, "cmd_generate", bug)
    with pytest.raises(RuntimeError, match="a bug keeps its traceback"):
        main(["generate", "--model", str(small)])


def test_info_still_works(capsys):
    code, out, _ = run(capsys, "info", "--json", "--no-check")
    assert code == 0 and "backends" in json.loads(out)


def test_console_entry_point_end_to_end(models, sst, tmp_path):
    _, small, _ = models
    proc = subprocess.run([sys.executable, "-m", "fastmlstm", "probe", "--model", str(small), "--task", "sst2",
                           "--data-dir", str(sst), "--limit", "20", "--no-progress"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["task"] == "sst2"


def test_download_timeout_is_the_whole_downloads_deadline(tmp_path, capsys):
    """--timeout reaches the download: a server that accepts and never answers ends in one line, in time."""
    import socket
    import threading
    import time

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held = []
    stop = threading.Event()

    def accept():  # take connections and never answer them
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        start = time.monotonic()
        code, _, err = run(capsys, "download", "sst2", "--root", tmp_path, "--no-progress", "--timeout", "1.5",
                           "--mirror", f"http://127.0.0.1:{server.getsockname()[1]}")
        seconds = time.monotonic() - start
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()
    assert code == 2 and err.startswith("fastmlstm download: error:") and err.count("\n") == 1, err
    # Without --timeout the wait would be the stall rule's 60 s per attempt.
    assert ("timed out" in err or "time limit" in err) and 1.4 < seconds < 30, (err, seconds)
