"""Every way a model file can be wrong reaches the user as one clear line: through the API as a
ModelFileError (an InputError) naming the file, through every CLI command that takes --model as
``fastmlstm <command>: error: ...`` and exit status 2; nothing in a file is ever executed. A
train.py checkpoint is a model file too."""

import pytest
import torch

import fastmlstm
from fastmlstm.cli import main

COMMANDS = {
    "featurize": ["--text", "ok", "-o", "{tmp}/f.npy"],
    "probe": ["--task", "sst2", "--limit", "20"],
    "visualize": ["--unit", "1", "--text", "ok", "--html", "{tmp}/v.html"],
    "generate": ["--n-bytes", "3"],
}


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "model.pt"
    torch.manual_seed(0)
    fastmlstm.ByteLM(hidden_size=8, embed_size=4).save(path)
    return path


def _bad_files(folder, good):
    marker = folder / "payload-ran"
    data = good.read_bytes()
    files = {
        "a text file": (b"not a model at all\n", "not a readable fastmlstm model file"),
        "an empty .pt": (b"", "the file is empty"),
        "a truncated .pt": (data[: len(data) // 2], "not a readable fastmlstm model file"),
        # A protocol-0 pickle that would call os.system: torch.load(weights_only=True) must refuse it.
        "a pickle with a disallowed global": (
            b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.", "not a readable fastmlstm model file"),
    }
    paths = {}
    for name, (content, match) in files.items():
        path = folder / (name.replace(" ", "_").replace(".", "") + ".pt")
        path.write_bytes(content)
        paths[name] = (path, match)
    torch.save({"something": 1}, folder / "foreign.pt")
    paths["a foreign torch file"] = (folder / "foreign.pt", "not a fastmlstm model file (format None")
    newer = torch.load(good, weights_only=True)
    newer["version"] = 99
    torch.save(newer, folder / "newer.pt")
    paths["a file from a newer version"] = (folder / "newer.pt", "written by a newer fastmlstm")
    (folder / "plain_dir").mkdir()
    paths["a directory that is not a model folder"] = (folder / "plain_dir", "holds neither a saved model")
    return paths, marker


@pytest.mark.parametrize("case", ["a text file", "an empty .pt", "a truncated .pt", "a pickle with a disallowed global",
                                  "a foreign torch file", "a file from a newer version"])
def test_the_api_raises_model_file_error_naming_the_file(case, good, tmp_path):
    paths, marker = _bad_files(tmp_path, good)
    path, match = paths[case]
    with pytest.raises(fastmlstm.ModelFileError) as info:
        fastmlstm.load(path)
    assert match in str(info.value) and str(path) in str(info.value)
    assert not marker.exists()  # the pickle's payload never ran


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_reports_a_bad_model_file_in_one_line(command, good, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FASTMLSTM_DATA", str(tmp_path / "no-data"))
    paths, marker = _bad_files(tmp_path, good)
    for case, (path, match) in paths.items():
        argv = [command, "--model", str(path), *(a.format(tmp=tmp_path) for a in COMMANDS[command])]
        code = main(argv)
        out, err = capsys.readouterr()
        assert code == 2, (case, err)
        assert err.startswith(f"fastmlstm {command}: error: ") and err.count("\n") == 1, (case, err)
        assert match in err and str(path) in err, (case, err)
    assert not marker.exists()


def test_a_train_checkpoint_is_a_model_file(tmp_path, capsys):
    from fastmlstm.training import main as train

    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"a small corpus of review text, good and bad\n" * 200)
    out = tmp_path / "run"
    assert train(["--preset", "tiny", "--hidden", "8", "--embed", "4", "--batch", "2", "--seq", "8", "--steps", "4",
                  "--ckpt-every", "2", "--eval-bytes", "500", "--data", str(corpus), "--out", str(out)]) == 0
    final = fastmlstm.load(out / "model.pt")
    from_checkpoint = fastmlstm.load(out / "ckpt-00000004.pt")
    assert all(torch.equal(a, b) for a, b in zip(final.state_dict().values(), from_checkpoint.state_dict().values()))
    capsys.readouterr()
    assert main(["generate", "--model", str(out / "ckpt-00000004.pt"), "--n-bytes", "5", "--seed", "0"]) == 0
