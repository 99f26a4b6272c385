"""config.json + model.safetensors folders (save_pretrained / from_pretrained), what from_pretrained
and --model resolve, and the Hugging Face Hub branch: without huggingface_hub (a clear message) and
with a stand-in module injected in its place (round trip through push_to_hub)."""

import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from test_openai_weights import write_released

import fastmlstm
from fastmlstm import cli
from fastmlstm.errors import MissingDependencyError
from fastmlstm.models.hub import is_repo_id
from fastmlstm.models.serialization import load_model


def small_model(dtype=torch.float32, weight_norm=True, seed=1):
    torch.manual_seed(seed)
    return fastmlstm.ByteLM(hidden_size=20, embed_size=6, weight_norm=weight_norm).to(dtype)


def assert_bit_exact(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


BYTES = torch.tensor([list(b"Bit-exact, or it fails.")], dtype=torch.uint8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("weight_norm", [True, False])
def test_round_trip_is_bit_exact_in_each_dtype(tmp_path, dtype, weight_norm):
    model = small_model(dtype, weight_norm)
    assert model.save_pretrained(tmp_path / "m") == tmp_path / "m"
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    loaded = fastmlstm.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config
    assert_bit_exact(loaded, model)
    with torch.no_grad():
        assert torch.equal(loaded(BYTES)[0], model(BYTES)[0])
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["format"] == "fastmlstm.ByteLM" and config["version"] == 1
    assert config["config"] == model.config and config["dtype"] == str(dtype).removeprefix("torch.")


@pytest.mark.parametrize("dtype", [torch.bfloat16, "bfloat16", torch.float16, "torch.float16"])
def test_save_in_a_smaller_dtype_halves_the_file(tmp_path, dtype):
    model = small_model()
    model.save_pretrained(tmp_path / "f32")
    model.save_pretrained(tmp_path / "half", dtype=dtype)
    ratio = (tmp_path / "half/model.safetensors").stat().st_size / (tmp_path / "f32/model.safetensors").stat().st_size
    assert 0.49 < ratio < 0.52
    half = {"bfloat16": torch.bfloat16, "float16": torch.float16}[str(dtype).removeprefix("torch.")]
    assert_bit_exact(fastmlstm.from_pretrained(tmp_path / "half"), small_model().to(half))
    assert next(model.parameters()).dtype == torch.float32  # the model itself is not cast


def test_from_pretrained_options(tmp_path):
    small_model().save_pretrained(tmp_path)
    model = fastmlstm.from_pretrained(tmp_path, dtype="bfloat16", backend="reference", device="cpu")
    assert model.readout.weight.dtype == torch.bfloat16 and model.backend == "reference"
    with pytest.raises(TypeError, match="dtype must be one of float32, float16, bfloat16"):
        fastmlstm.from_pretrained(tmp_path, dtype="int8")
    with pytest.raises(TypeError, match="dtype must be one of"):
        small_model().save_pretrained(tmp_path, dtype=torch.int8)


def test_from_pretrained_takes_every_local_layout(tmp_path):
    model = small_model()
    model.save(tmp_path / "model.pt")
    assert_bit_exact(fastmlstm.from_pretrained(tmp_path / "model.pt"), model)
    fastmlstm.save_openai(model, tmp_path / "released")
    assert_bit_exact(fastmlstm.from_pretrained(tmp_path / "released"), fastmlstm.load_openai(tmp_path / "released"))
    model.save_pretrained(tmp_path / "new")
    assert_bit_exact(load_model(tmp_path / "new", device="cpu"), model)
    assert not load_model(tmp_path / "new", device="cpu").training
    # fastmlstm.load keeps reading .pt files, and points elsewhere for folders
    assert_bit_exact(fastmlstm.load(tmp_path / "model.pt"), model)
    with pytest.raises(fastmlstm.ModelFileError, match="saved model folder: use fastmlstm.from_pretrained"):
        fastmlstm.load(tmp_path / "new")


def test_foreign_and_broken_folders_are_refused_with_the_reason(tmp_path):
    model = small_model()
    good = tmp_path / "good"
    model.save_pretrained(good)

    def variant(name, edit):
        folder = tmp_path / name
        shutil.copytree(good, folder)
        edit(folder)
        return folder

    cases = [
        (variant("no-weights", lambda f: (f / "model.safetensors").unlink()), FileNotFoundError,
         "has no model.safetensors"),
        (variant("no-config", lambda f: (f / "config.json").unlink()), FileNotFoundError, "has no config.json"),
        (variant("truncated", lambda f: (f / "model.safetensors").write_bytes(
            (good / "model.safetensors").read_bytes()[:-100])), fastmlstm.ModelFileError,
         "not a readable safetensors file"),
        (variant("empty", lambda f: (f / "model.safetensors").write_bytes(b"")), fastmlstm.ModelFileError,
         "not a readable safetensors file"),
        (variant("not-json", lambda f: (f / "config.json").write_text("{oops")), fastmlstm.ModelFileError,
         "config.json is not a readable JSON file"),
        (variant("foreign", lambda f: (f / "config.json").write_text('{"model_type": "bert"}')),
         fastmlstm.ModelFileError, "not a fastmlstm model config"),
        (variant("newer", lambda f: (f / "config.json").write_text(json.dumps(
            {**json.loads((good / "config.json").read_text()), "version": 99}))), fastmlstm.ModelFileError,
         "newer fastmlstm"),
    ]
    for folder, error, message in cases:
        with pytest.raises(error, match=message):
            fastmlstm.from_pretrained(folder)
    # the weights of one save with the config of another (an interrupted overwrite)
    mixed = tmp_path / "mixed"
    fastmlstm.ByteLM(hidden_size=8, embed_size=6).save_pretrained(mixed)
    shutil.copy(good / "config.json", mixed / "config.json")
    with pytest.raises(fastmlstm.ModelFileError, match="the folder mixes two different saves"):
        fastmlstm.from_pretrained(mixed)
    # tensors that do not fit the config, in a file without fastmlstm's metadata
    alien = variant("alien", lambda f: safetensors.torch.save_file({"x": torch.zeros(3)}, f / "model.safetensors"))
    with pytest.raises(fastmlstm.ModelFileError, match=r"does not fit its config \(hidden_size=20, embed_size=6, weight_norm=True\): it lacks the tensor\(s\) embedding.weight"):
        fastmlstm.from_pretrained(alien)
    (tmp_path / "plain").mkdir()
    with pytest.raises(fastmlstm.ModelFileError, match="holds neither a saved model"):
        fastmlstm.from_pretrained(tmp_path / "plain")
    (tmp_path / "file").write_text("x")
    with pytest.raises(fastmlstm.InputError, match="it is a file"):
        model.save_pretrained(tmp_path / "file")


def _flip_a_weight_byte(file):
    """XOR one byte (0x40) in the middle of a safetensors file's tensor data, in place: what a bad
    disk or a bad copy does; safetensors reads it without a word."""
    data = bytearray(file.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")  # the header's length, the header, then the tensors
    data[(start + len(data)) // 2] ^= 0x40
    file.write_bytes(bytes(data))


def test_a_weights_file_with_a_flipped_byte_is_refused_and_one_without_a_digest_loads(tmp_path):
    model = small_model()
    model.save_pretrained(tmp_path / "damaged")
    weights = tmp_path / "damaged" / "model.safetensors"
    assert safetensors.safe_open(str(weights), "pt").metadata()["fastmlstm_digest"].startswith("sha256:")
    _flip_a_weight_byte(weights)
    safetensors.torch.load_file(weights)  # safetensors itself takes it
    with pytest.raises(fastmlstm.ModelFileError) as info:
        fastmlstm.from_pretrained(tmp_path / "damaged")
    assert str(info.value).startswith(f"{weights} is not a readable fastmlstm model file: its content's SHA-256")
    assert "the file is damaged" in str(info.value)
    # Written by an older fastmlstm (or another program): no digest in the metadata, nothing to check.
    model.save_pretrained(tmp_path / "old")
    weights = tmp_path / "old" / "model.safetensors"
    with safetensors.safe_open(str(weights), "pt") as f:
        metadata = {k: v for k, v in f.metadata().items() if k != "fastmlstm_digest"}
    safetensors.torch.save_file(safetensors.torch.load_file(weights), weights, metadata=metadata)
    assert_bit_exact(fastmlstm.from_pretrained(tmp_path / "old"), model)


def test_overwriting_a_save_leaves_no_temporary_file(tmp_path):
    small_model(seed=1).save_pretrained(tmp_path)
    (tmp_path / "README.md").write_text("kept")
    small_model(seed=2).save_pretrained(tmp_path, dtype="bfloat16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert_bit_exact(fastmlstm.from_pretrained(tmp_path), small_model(seed=2).to(torch.bfloat16))


def test_names_that_are_nothing_say_what_a_model_can_be(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model file or folder at .*missing.pt.*openai-sentiment"):
        fastmlstm.from_pretrained(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match="no model file or folder at nothing-here"):
        fastmlstm.from_pretrained("nothing-here")
    with pytest.raises(fastmlstm.InputError, match="apply to registered models"):
        fastmlstm.from_pretrained(tmp_path, mirror="http://127.0.0.1:9")


def test_repo_ids_and_paths_are_told_apart():
    for name in ["openai/sentiment", "me/fastmlstm-4096", "a/b", "org.name/model_v1.5"]:
        assert is_repo_id(name), name
    for name in ["runs/tiny/model.pt", "runs/model.pt", "/abs/x", "./x/y", "x/y/z", "me/model.safetensors",
                 "-a/b", "a/b-", "a--b/c", "a/b..c", "a/", "/a", "justname", "a/" + "b" * 100]:
        assert not is_repo_id(name), name


# ------------------------------------------------------------------------------------------------
# The Hugging Face Hub


def test_without_huggingface_hub_the_message_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import huggingface_hub now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"needs huggingface_hub, which is not installed: "
                                                     r"pip install 'fastmlstm\[hub\]'"):
        fastmlstm.from_pretrained("someone/some-model")
    with pytest.raises(MissingDependencyError, match=r"push_to_hub needs huggingface_hub"):
        small_model().push_to_hub("me/model")
    with pytest.raises(fastmlstm.InputError, match="looks like 'user/name'"):
        small_model().push_to_hub("not a repo")


class FakeHub:
    """A stand-in for huggingface_hub: repositories are folders under ``remote``; downloads are copied
    into a snapshot folder per (repo, revision), as the real cache lays them out."""

    class HfHubHTTPError(OSError):
        pass

    def __init__(self, root: Path):
        self.remote, self.cache, self.calls = root / "remote", root / "cache", []
        self.module = types.ModuleType("huggingface_hub")
        self.module.utils = types.SimpleNamespace(HfHubHTTPError=self.HfHubHTTPError)
        self.module.hf_hub_download = self.hf_hub_download
        self.module.create_repo = self.create_repo
        self.module.upload_folder = self.upload_folder

    def hf_hub_download(self, repo_id, filename, *, revision=None, token=None):
        self.calls.append(("download", repo_id, filename, revision, token))
        source = self.remote / repo_id / filename
        if not source.is_file():
            raise self.HfHubHTTPError(f"404 Client Error. Entry Not Found for url: {repo_id}/{filename}")
        target = self.cache / repo_id.replace("/", "--") / (revision or "main") / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
        return str(target)

    def create_repo(self, repo_id, *, private=None, token=None, exist_ok=False):
        self.calls.append(("create", repo_id, private, token))
        (self.remote / repo_id).mkdir(parents=True, exist_ok=exist_ok)

    def upload_folder(self, *, repo_id, folder_path, commit_message, token=None, revision=None):
        self.calls.append(("upload", repo_id, commit_message, revision))
        shutil.copytree(folder_path, self.remote / repo_id, dirs_exist_ok=True)
        return types.SimpleNamespace(commit_url=f"https://hub.invalid/{repo_id}/commit/1")


@pytest.fixture
def hub(monkeypatch, tmp_path):
    fake = FakeHub(tmp_path / "hub")
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake.module)
    return fake


def test_push_to_hub_then_from_pretrained_through_the_hub(hub, tmp_path):
    model = small_model()
    url = model.push_to_hub("me/tiny-mlstm", dtype="bfloat16", private=True, commit_message="first")
    assert url == "https://hub.invalid/me/tiny-mlstm/commit/1"
    assert sorted(p.name for p in (hub.remote / "me/tiny-mlstm").iterdir()) == ["config.json", "model.safetensors"]
    assert ("create", "me/tiny-mlstm", True, None) in hub.calls and ("upload", "me/tiny-mlstm", "first", None) in hub.calls
    loaded = fastmlstm.from_pretrained("me/tiny-mlstm", revision="v1")
    assert_bit_exact(loaded, small_model().to(torch.bfloat16))
    assert [c[2:4] for c in hub.calls if c[0] == "download"] == [("config.json", "v1"), ("model.safetensors", "v1")]


def test_cli_model_takes_a_hub_id(hub, tmp_path, capsys):
    small_model().save_pretrained(hub.remote / "me" / "cli-model")
    code = cli.main(["featurize", "--model", "me/cli-model", "--text", "ok", "--device", "cpu",
                     "-o", str(tmp_path / "f.npy"), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert np.load(tmp_path / "f.npy").shape == (1, 20)


def test_hub_errors_name_the_repository(hub, capsys, tmp_path):
    with pytest.raises(fastmlstm.data.fetch.DownloadError, match=r"could not fetch config.json of 'me/absent' from "
                                                                r"the Hugging Face Hub \(HfHubHTTPError: 404"):
        fastmlstm.from_pretrained("me/absent")
    code = cli.main(["featurize", "--model", "me/absent", "--text", "ok", "-o", str(tmp_path / "f.npy")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("fastmlstm featurize: error: could not fetch config.json of 'me/absent'")


def test_a_local_folder_wins_over_a_hub_id(hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    small_model().save_pretrained(Path("me") / "local")
    assert_bit_exact(fastmlstm.from_pretrained("me/local"), small_model())
    assert hub.calls == []


def test_released_folder_through_cli_model(tmp_path, capsys):
    write_released(tmp_path / "released")
    code = cli.main(["featurize", "--model", str(tmp_path / "released"), "--text", "ok", "--device", "cpu",
                     "-o", str(tmp_path / "f.npy"), "--no-progress"])
    assert code == 0, capsys.readouterr().err


def test_a_model_of_mixed_dtypes_comes_back_as_it_was(tmp_path):
    # Loading used to cast every tensor to the dtype of the first one stored (the embedding's): a
    # bfloat16 embedding made the whole model bfloat16, rounding its float32 weights.
    model = small_model()
    model.embedding.to(torch.bfloat16)
    model.save_pretrained(tmp_path / "m")
    model.save(tmp_path / "m.pt")
    for loaded in (fastmlstm.from_pretrained(tmp_path / "m"), fastmlstm.load(tmp_path / "m.pt")):
        assert_bit_exact(loaded, model)
        assert loaded.readout.weight.dtype == torch.float32
        with torch.no_grad():
            assert torch.equal(loaded(BYTES)[0], model(BYTES)[0])


@pytest.mark.parametrize("tensor, match", [
    (torch.zeros(256, dtype=torch.float8_e5m2), "holds float8_e5m2, which model weights are never stored in"),
    (torch.zeros(256).to_sparse(), "is sparse_coo, not dense"),
])
def test_tensors_no_model_is_stored_in_are_refused(tmp_path, tensor, match):
    # They loaded, and the model failed later inside torch.
    model = small_model()
    record = model.to_record()
    record["state_dict"]["readout.bias"] = tensor
    torch.save(record, tmp_path / "odd.pt")
    with pytest.raises(fastmlstm.ModelFileError, match=rf"odd.pt does not fit its config .*{match}"):
        fastmlstm.load(tmp_path / "odd.pt")


def test_a_reader_waits_for_a_save_in_progress(tmp_path):
    # A reader used to read the folder while a save swapped its files: it could pair the new
    # config.json with the old weights ("the folder mixes two different saves") or find a file
    # moved away. A save holds the folder's lock from start to commit; a reader now waits for it.
    import threading

    from fastmlstm._atomic import folder_lock

    small_model().save_pretrained(tmp_path / "m")
    fastmlstm.save_openai(small_model(), tmp_path / "released")
    for folder in (tmp_path / "m", tmp_path / "released"):
        done = threading.Event()
        with folder_lock(folder):  # what a save into it holds
            reader = threading.Thread(target=lambda f=folder, d=done: (fastmlstm.from_pretrained(f), d.set()))
            reader.start()
            assert not done.wait(0.5), f"{folder.name} was read during a save"
        reader.join(30)
        assert done.is_set()
