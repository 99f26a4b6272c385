"""Every way a model file can be wrong reaches the user as one clear line: through the API as a
ModelFileError (an InputError) naming the file, through every CLI command that takes --model as
``fastmlstm <command>: error: ...`` and exit status 2; nothing in a file is ever executed. A
train.py checkpoint is a model file too. A file whose bytes changed after it was written is refused
(its content digest); bad arguments (a path that is not one, a device this machine lacks, something
that is not a model) are said as such, never blamed on a good file."""


import pytest
import torch
from faults import flip_a_tensor_byte

import fastmlstm
from fastmlstm.cli import main
from fastmlstm.errors import InputError, InputTypeError

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
    (folder / "damaged.pt").write_bytes(data)
    flip_a_tensor_byte(folder / "damaged.pt")  # loads in torch, with one weight changed
    paths["a file with a flipped byte"] = (folder / "damaged.pt", "the file is damaged")
    (folder / "plain_dir").mkdir()
    paths["a directory that is not a model folder"] = (folder / "plain_dir", "holds neither a saved model")
    return paths, marker


@pytest.mark.parametrize("case", ["a text file", "an empty .pt", "a truncated .pt", "a pickle with a disallowed global",
                                  "a foreign torch file", "a file from a newer version", "a file with a flipped byte"])
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
    flip_a_tensor_byte(out / "ckpt-00000004.pt")
    with pytest.raises(fastmlstm.ModelFileError, match="ckpt-00000004.pt is not a readable .* the file is damaged"):
        fastmlstm.load(out / "ckpt-00000004.pt")


def test_a_file_with_flipped_bytes_is_refused_naming_the_digest(good, tmp_path):
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(good.read_bytes())
    flip_a_tensor_byte(damaged)
    record = torch.load(damaged, weights_only=True)  # torch itself reads it without a word
    assert set(record) == {"format", "version", "config", "state_dict", "digest"}
    with pytest.raises(fastmlstm.ModelFileError) as info:
        fastmlstm.from_pretrained(damaged)
    assert str(info.value).startswith(f"{damaged} is not a readable fastmlstm model file: its content's SHA-256 "
                                      "digest ")
    assert "the file is damaged" in str(info.value)


def test_a_file_without_a_digest_loads_as_before(good, tmp_path):
    """Files of older versions (or written by hand) carry no digest: nothing to check, they load."""
    record = torch.load(good, weights_only=True)
    del record["digest"]
    torch.save(record, tmp_path / "old.pt")
    old, new = fastmlstm.load(tmp_path / "old.pt"), fastmlstm.load(good)
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), new.state_dict().values()))


def test_a_file_loads_onto_the_meta_device_without_a_check(good):
    """Shapes only (no bytes to check the digest against): as before the digest, no error."""
    model = fastmlstm.load(good, map_location="meta")
    assert all(p.is_meta for p in model.parameters()) and model.config["hidden_size"] == 8


def test_bad_arguments_are_named_as_such(good, tmp_path):
    model = fastmlstm.load(good)
    with pytest.raises(InputTypeError, match="fastmlstm.save takes a fastmlstm model .*got str"):
        fastmlstm.save("x", tmp_path / "x.pt")
    with pytest.raises(InputTypeError, match="save_openai takes a fastmlstm model .*got str"):
        fastmlstm.save_openai("x", tmp_path / "exported")
    with pytest.raises(InputTypeError, match="save_pretrained takes a fastmlstm model .*got Linear"):
        fastmlstm.save_pretrained(torch.nn.Linear(2, 2), tmp_path / "folder")
    with pytest.raises(InputTypeError, match="the model file's path must be a path .*got NoneType"):
        fastmlstm.load(None)
    with pytest.raises(InputError, match="name_or_path is an empty string; give a model file or folder"):
        fastmlstm.from_pretrained("")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing was written
    # Saving over a directory names it (not the temporary file beside it) and leaves nothing behind.
    (tmp_path / "folder").mkdir()
    with pytest.raises(InputError, match=f"cannot write {tmp_path / 'folder'}: it is a directory") as info:
        model.save(tmp_path / "folder")
    assert isinstance(info.value, IsADirectoryError)  # what callers catching OSError expect, as before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]


@pytest.mark.parametrize("device, message", [
    ("foo", "'foo' is not a device"),
    ("cuda:99", "'cuda:99' asks for CUDA"),  # no such device here, with CUDA or without
])
def test_a_device_this_machine_lacks_is_not_blamed_on_the_file(device, message, good):
    with pytest.raises(InputError, match=f"map_location {message}") as info:
        fastmlstm.load(good, map_location=device)
    assert not isinstance(info.value, fastmlstm.ModelFileError)
    for load in (fastmlstm.from_pretrained, fastmlstm.load_openai, fastmlstm.models.serialization.load_pretrained):
        with pytest.raises(InputError, match=f"device {message}"):
            load(good, device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_says_so(good, capsys):
    with pytest.raises(InputError, match="device 'cuda' asks for CUDA, which is not available here"):
        fastmlstm.from_pretrained(good, device="cuda")
    assert main(["generate", "--model", str(good), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastmlstm generate: error: --device 'cuda' asks for CUDA, which is not available") and \
        "readable" not in err and err.count("\n") == 1, err


def test_running_out_of_memory_while_reading_is_not_blamed_on_the_file(good, monkeypatch):
    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(torch, "load", no_memory)
    with pytest.raises(RuntimeError, match="can't allocate memory") as caught:
        fastmlstm.load(good)
    assert not isinstance(caught.value, InputError)


def test_foreign_torch_files_say_what_they_are(good, tmp_path):
    # torch.load reads a safetensors file and a bare state dict without complaint; both were
    # "format None where 'fastmlstm.ByteLM' ... was expected", and a cut archive "OSError: [Errno 22]
    # Invalid argument".
    model = fastmlstm.load(good)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    model.save_pretrained(tmp_path / "folder")
    data = good.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    cases = {
        "weights.pt": r"weights.pt is not a fastmlstm model file: it holds a bare state dict \(\d+ tensors, no config\)",
        "folder/model.safetensors": r"model.safetensors is not a fastmlstm model file: it is a safetensors file",
        "cut.pt": r"cut.pt is not a readable fastmlstm model file: it is a truncated or damaged torch archive",
    }
    for name, match in cases.items():
        path = tmp_path / name
        with pytest.raises(fastmlstm.ModelFileError, match=match):
            fastmlstm.from_pretrained(path)
