"""The command line's audit: options that contradict each other or would be ignored are refused in
one line before any work, destinations that cannot be written are found before the model runs,
JSON output is strict JSON, generated text reaches any stdout, and Ctrl-C or a closed pipe end a
command without a traceback."""

import errno
import io
import json
import os
import sys
from types import SimpleNamespace

import pytest
import torch

import fastmlstm
import fastmlstm.probe
from fastmlstm import cli
from fastmlstm.cli import main


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "small.pt"
    torch.manual_seed(0)
    fastmlstm.save(fastmlstm.ByteLM(hidden_size=16, embed_size=8), path)
    return path


@pytest.fixture()
def unwritable(tmp_path):
    """A folder in which no file can be created: a read-only folder, or /sys where permission bits
    do not stop this user (root)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, "/sys"):
        try:
            open(os.path.join(candidate, "probe-write"), "wb").close()
        except OSError:
            yield str(candidate)
            break
        os.unlink(os.path.join(candidate, "probe-write"))
    else:
        pytest.skip("no folder here refuses new files")
    folder.chmod(0o755)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def strict_json(text):
    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("argv, match", [
    # texts given twice over: --dataset used to win and the --text silently vanished
    (["featurize", "--model", "{small}", "--dataset", "sst2:dev", "--text", "hi", "-o", "{tmp}/x.npy"],
     "either with --dataset or with --text/--input, not both"),
    (["featurize", "--model", "{small}", "--dataset", "sst2:", "-o", "{tmp}/x.npy"],
     "--dataset takes NAME or NAME:SPLIT (e.g. sst2:dev), got 'sst2:'"),
    (["featurize", "--model", "{small}", "--text", "hi", "--data-dir", "{tmp}", "-o", "{tmp}/x.npy"],
     "--data-dir is the folder of --dataset's files"),
    (["featurize", "--model", "{small}", "--text", "hi", "--input-encoding", "utf-8", "-o", "{tmp}/x.npy"],
     "--input-encoding says how to read --input's lines"),
    # the destination is checked before the dataset is read
    (["featurize", "--model", "{small}", "--dataset", "sst2", "--data-dir", "{tmp}/none", "-o", "{tmp}/no/x.npy"],
     "cannot write --output {tmp}/no/x.npy"),
    (["featurize", "--model", "", "--text", "hi", "-o", "{tmp}/x.npy"], "--model is empty"),
    (["probe", "--model", "{small}", "--task", "mpqa", "--curve"], "--curve: mpqa is evaluated by cross-validation"),
    (["probe", "--model", "{small}", "--task", "sick", "--curve"], "--curve: sick is evaluated by regression"),
    (["probe", "--model", "{small}", "--task", "sst2", "--draws", "3"], "--draws is the number of random draws"),
    (["visualize", "--model", "{small}", "--unit", "1", "--probe", "{tmp}/p.json", "--text", "a", "--html",
      "{tmp}/v.html"], "use either --unit U or --probe"),
    (["visualize", "--model", "{small}", "--unit", "1", "--text", "a", "--html", "{tmp}/v.png", "--png",
      "{tmp}/./v.png"], "--html and --png name the same file"),
    (["visualize", "--model", "{small}", "--unit", "1", "--text", "a", "--html", "{tmp}/v.html", "--width", "9"],
     "--width sets the PNG's characters per line; give --png FILE too"),
    (["visualize", "--model", "{small}", "--unit", "1", "--text", "", "--html", "{tmp}/v.html"], "the text is empty"),
    (["visualize", "--model", "{small}", "--unit", "1", "--text", "a", "--input-encoding", "utf-8", "--html",
      "{tmp}/v.html"], "--input-encoding says how to read --input's lines"),
    (["generate", "--model", "{small}", "--steer", "1", "--probe", "{tmp}/p.json"], "use either --steer UNIT or --probe"),
    (["generate", "--model", "{small}", "--probe", "{tmp}/p.json", "--unit-sign", "1"],
     "--unit-sign does not go with --probe"),
    (["generate", "--model", "{small}", "--unit-sign", "-1"], "--unit-sign flips --steer's values; give --steer"),
    # refused before the model is loaded
    (["generate", "--model", "{tmp}/missing.pt", "--fix", "1=1", "--steer", "2"], "use either --fix or --steer"),
    (["download", "sst2", "--root", "{tmp}/data", "--mirror", "", "--no-progress"], "--mirror is empty"),
])
def test_contradictory_or_ignored_options_are_one_line_errors(small, tmp_path, capsys, argv, match):
    (tmp_path / "p.json").write_text(json.dumps({"sentiment_unit": 3, "unit_sign": -1}))
    argv = [a.format(tmp=tmp_path, small=small) for a in argv]
    code, out, err = run(capsys, *argv)
    assert code == 2 and match.format(tmp=tmp_path) in err and err.count("\n") == 1 and not out, err
    assert err.startswith(f"fastmlstm {argv[0]}: error: "), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json"]  # nothing written, nothing downloaded


@pytest.mark.parametrize("argv, flag", [
    (["featurize", "--model", "{tmp}/missing.pt", "--text", "a", "-o", "{dir}/x.npy"], "--output {dir}/x.npy"),
    (["probe", "--model", "{tmp}/missing.pt", "--task", "sst2", "--output", "{dir}/r.json"], "--output {dir}/r.json"),
    (["probe", "--model", "{tmp}/missing.pt", "--task", "sst2", "--plots", "{dir}/plots"], "--plots {dir}/plots"),
    (["visualize", "--model", "{tmp}/missing.pt", "--unit", "1", "--text", "a", "--html", "{dir}/v.html"],
     "--html {dir}/v.html"),
    (["visualize", "--model", "{tmp}/missing.pt", "--unit", "1", "--text", "a", "--png", "{dir}/v.png"],
     "--png {dir}/v.png"),
])
def test_an_unwritable_destination_is_refused_before_the_model_is_loaded(tmp_path, unwritable, capsys, argv, flag):
    code, _, err = run(capsys, *[a.format(tmp=tmp_path, dir=unwritable) for a in argv])
    assert code == 2 and err.count("\n") == 1, err
    assert f"cannot write {flag.format(dir=unwritable)}: no file can be created in" in err, err


def test_a_failed_picture_write_names_the_flag_not_the_temporary_file(small, tmp_path, capsys, monkeypatch):
    def full_disk(model, text, unit, *, html_path=None, png_path=None, **kwargs):
        temporary = os.path.join(os.path.dirname(png_path), f".{os.path.basename(png_path)}.k2j4.tmp")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), temporary)

    monkeypatch.setattr(fastmlstm.probe, "visualize_text", full_disk)
    code, _, err = run(capsys, "visualize", "--model", small, "--unit", "1", "--text", "a", "--png", tmp_path / "v.png")
    assert code == 2 and f"cannot write --png {tmp_path / 'v.png'}: No space left on device" in err, err
    assert ".tmp" not in err


def test_probe_prints_strict_json_when_a_metric_is_undefined(small, tmp_path, capsys, monkeypatch):
    """Pearson's r of constant predictions is NaN; JSON has no NaN, so it is null (stdout and --output)."""
    result = SimpleNamespace(metrics={"task": "sick", "pearson": float("nan"), "spearman": float("nan"), "mse": 0.5,
                                      "folds": [float("inf"), 1.0]}, probe=None, curve=None)
    monkeypatch.setattr(fastmlstm.probe, "evaluate", lambda *args, **kwargs: result)
    code, out, err = run(capsys, "probe", "--model", small, "--task", "sick", "--output", tmp_path / "r.json")
    assert code == 0, err
    assert strict_json(out) == {"task": "sick", "pearson": None, "spearman": None, "mse": 0.5, "folds": [None, 1.0]}
    assert strict_json((tmp_path / "r.json").read_text()) == strict_json(out)


def test_info_json_is_strict_json(capsys, monkeypatch):
    report = {"cpu@cpu": {"available": True, "check": "fail", "max_rel_diff_vs_reference": float("nan")}}
    monkeypatch.setattr(cli, "backend_report", lambda check: report)
    code, out, _ = run(capsys, "info", "--json")
    assert code == 1 and strict_json(out)["backends"]["cpu@cpu"]["max_rel_diff_vs_reference"] is None


def test_generate_takes_a_prefix_that_is_not_utf8(small, capsysbinary):
    """--prefix is the shell's bytes, as --text is for featurize (was refused: 'pass bytes instead')."""
    prefix = os.fsdecode(b"ab\xff")  # what Python makes of the argument bytes ab\xff
    assert main(["generate", "--model", str(small), "--prefix", prefix, "--n-bytes", "4", "--seed", "0"]) == 0
    out, err = capsysbinary.readouterr()
    assert out.startswith(b"--- samples 1\nab\xff") and out.endswith(b"\n") and not err, (out, err)
    assert main(["generate", "--model", str(small), "--prefix", prefix, "--n-bytes", "4", "--seed", "0", "--json"]) == 0
    record = strict_json(capsysbinary.readouterr()[0])
    assert record["prefix"] == "ab\ufffd" and len(record["samples"]) == 1


def test_generated_text_reaches_an_ascii_stdout(small, monkeypatch, capsys):
    """A sample holding U+FFFD used to end in UnicodeEncodeError on a stdout that cannot encode it."""
    model = cli.load_model(str(small))
    expected = model.generate("\n ", 30, 1.0, seed=0)[0].decode("utf-8", errors="replace")
    assert any(ord(c) > 127 for c in expected)  # the seed gives a sample that ASCII cannot hold
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    monkeypatch.setattr(sys, "stdout", stdout)
    code = main(["generate", "--model", str(small), "--n-bytes", "30", "--seed", "0"])
    stdout.flush()
    assert code == 0 and stdout.buffer.getvalue() == b"--- samples 1\n\n " + expected.encode("utf-8") + b"\n"


def test_a_closed_stdout_ends_the_command_quietly(small, monkeypatch, capsys):
    class Closed(io.TextIOWrapper):
        def write(self, text):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", Closed(io.BytesIO(), encoding="utf-8"))
    code = main(["generate", "--model", str(small), "--n-bytes", "3", "--seed", "0"])
    assert code == 141 and capsys.readouterr().err == ""


def test_ctrl_c_is_one_line_and_status_130(small, monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_featurize", interrupted)
    try:
        code, out, err = run(capsys, "featurize", "--model", small, "--text", "a", "-o", "x.npy")
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped main() with its traceback")
    assert code == 130 and err == "fastmlstm featurize: interrupted\n" and not out


def test_the_help_is_plain_text(capsys):
    # the module docstring's reST markup reached --help ("The ``fastmlstm`` command line.")
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "The fastmlstm command line." in out and "``" not in out
