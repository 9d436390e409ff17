"""Which backend a caller who names none gets (engine/backend.choose_backend, used by every front door), what the
transformers drop-in hands back on the numpy backend (torch for torch inputs, NumPy for NumPy), the precision it
computes in (dtype, and transformers 5's default: the checkpoint's), the thread pools' sizes, and the env report."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from smolvlm_fast import (
    LLM,
    AutoModelForCausalLM,
    AutoModelForVision2Seq,
    AutoProcessor,
    InputError,
    SmolVLMError,
)
from smolvlm_fast.cpu import decoder as cpu_decoder
from smolvlm_fast.engine import backend, threads

ROOT = Path(__file__).resolve().parents[1]
needs_fused = pytest.mark.skipif(not cpu_decoder.available(), reason="smolvlm_fast._cpu has no fused decoder step")


# ---------------------------------------------------------------- the choice, per case


@pytest.fixture
def machine(monkeypatch):
    """Set what the choice looks at: machine(fused=..., torch=..., cuda=...)."""
    def set_machine(fused=True, torch=True, cuda=False):
        monkeypatch.setattr(cpu_decoder, "available", lambda: fused)
        monkeypatch.setattr(backend, "torch_installed", lambda: torch)
        monkeypatch.setattr(backend, "cuda_available", lambda: cuda and torch)
    return set_machine


@pytest.mark.parametrize("fused, has_torch, cuda, device, expected", [
    (True, True, False, None, "numpy"),       # the CPU with torch installed: still the C++ path
    (True, True, False, "cpu", "numpy"),
    (True, False, False, None, "numpy"),
    (True, True, True, "cpu", "numpy"),       # a GPU is there, but the caller asked for the CPU
    (True, True, True, None, "torch"),        # device None means CUDA where there is a GPU
    (True, True, True, "cuda:1", "torch"),
    (False, True, False, None, "torch"),      # no fused step: torch's CPU path beats pure NumPy
    (False, True, False, "cpu", "torch"),
    (False, False, False, None, "numpy"),     # no torch: pure NumPy is all there is
])
def test_default_per_case(machine, fused, has_torch, cuda, device, expected):
    machine(fused=fused, torch=has_torch, cuda=cuda)
    name, why = backend.backend_choice(device)
    assert name == expected and why
    assert backend.choose_backend(None, device) == expected
    assert backend.choose_backend(None, torch.device(device) if device else None) == expected


def test_torch_only_options_pick_torch(machine):
    machine(fused=True, torch=True)
    assert backend.choose_backend(None, "cpu", torch_only_options=True) == "torch"
    machine(fused=True, torch=False)
    with pytest.raises(SmolVLMError, match="torch is not installed"):
        backend.choose_backend(None, None, torch_only_options=True)


def test_an_explicit_backend_always_wins(machine):
    machine(fused=True, torch=True, cuda=True)
    assert backend.choose_backend("numpy", None) == "numpy"
    assert backend.choose_backend("torch", "cpu") == "torch"
    with pytest.raises(InputError, match="backend must be"):
        backend.choose_backend("jax", None)


def test_cuda_without_torch_is_a_clear_error(machine):
    machine(fused=True, torch=False)
    with pytest.raises(SmolVLMError, match="needs PyTorch with CUDA"):
        backend.choose_backend(None, "cuda")


@needs_fused
def test_every_front_door_uses_it(tiny_llama, tiny_idefics3, monkeypatch, capsys):
    from smolvlm_fast.cli import main
    from smolvlm_fast.models.smolvlm_numpy import NumpyModel

    assert AutoModelForCausalLM.from_pretrained(tiny_llama).backend == "numpy"
    assert AutoModelForCausalLM.from_pretrained(tiny_llama, device="cpu").backend == "numpy"
    assert LLM(tiny_llama).backend.name == "numpy"
    loaded = []
    real = NumpyModel.from_checkpoint.__func__
    monkeypatch.setattr(NumpyModel, "from_checkpoint",
                        classmethod(lambda cls, *a, **k: loaded.append(real(cls, *a, **k)) or loaded[-1]))
    assert main(["generate", "hi", "--model", str(tiny_llama), "--max-new-tokens", "2", "--dtype", "bfloat16"]) == 0
    assert [m.precision for m in loaded] == ["bfloat16"]  # --dtype reaches the numpy model
    # quantize_vision is a torch-backend option: it picks torch when no backend is named
    model = AutoModelForVision2Seq.from_pretrained(tiny_idefics3, quantize="int4", quantize_vision=True)
    assert model.backend == "torch"
    with pytest.raises(InputError, match="backend='torch'"):
        AutoModelForVision2Seq.from_pretrained(tiny_idefics3, backend="numpy", quantize="int4", quantize_vision=True)


def test_without_the_fused_step_torch_is_the_default(tiny_llama, monkeypatch):
    monkeypatch.setattr(cpu_decoder, "available", lambda: False)
    assert AutoModelForCausalLM.from_pretrained(tiny_llama, device="cpu").backend == "torch"


# ---------------------------------------------------------------- what the drop-in hands back


def test_numpy_backend_returns_what_transformers_would(tiny_llama):
    """torch in, torch out (int64 ids, float32 logits); NumPy in, NumPy out; the tokens of the torch backend."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, backend="numpy")
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama, backend="torch", device="cpu", dtype="float32")
    ids = torch.tensor([[1, 5, 9, 40, 77, 3]])
    out = model.generate(input_ids=ids, max_new_tokens=6)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.long
    assert out.tolist() == reference.generate(input_ids=ids, max_new_tokens=6).tolist()
    logits = model(input_ids=ids).logits
    assert isinstance(logits, torch.Tensor) and logits.dtype == torch.float32
    assert logits.shape == (1, 6, model.config.text.vocab_size)
    as_np = model.generate(input_ids=ids.numpy(), max_new_tokens=6)
    assert isinstance(as_np, np.ndarray) and as_np.dtype == np.int64 and as_np.tolist() == out.tolist()
    assert isinstance(model(input_ids=ids.numpy()).logits, np.ndarray)
    assert isinstance(model.generate(input_ids=[[1, 5, 9]], max_new_tokens=2), np.ndarray)  # lists: NumPy


def test_streamer_gets_the_callers_type(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, backend="numpy")

    class Recorder:
        def __init__(self):
            self.values = []

        def put(self, value):
            self.values.append(value)

        def end(self):
            pass

    for ids, kind in ((torch.tensor([[1, 5, 9]]), torch.Tensor), (np.array([[1, 5, 9]]), np.ndarray)):
        streamer = Recorder()
        model.generate(input_ids=ids, max_new_tokens=3, streamer=streamer)
        assert len(streamer.values) == 4 and all(isinstance(v, kind) for v in streamer.values)


@needs_fused
def test_processor_pt_inputs_on_the_default_backend(tiny_idefics3, small_rgb):
    """The README's quick start: processor(..., return_tensors="pt").to(model.device), then generate: torch tensors
    in and out, and the tokens the torch backend gives."""
    processor = AutoProcessor.from_pretrained(tiny_idefics3)
    model = AutoModelForVision2Seq.from_pretrained(tiny_idefics3)
    assert model.backend == "numpy" and model.dtype == torch.float32
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, images=[small_rgb], return_tensors="pt").to(model.device)
    assert all(isinstance(v, torch.Tensor) for v in inputs.values())
    out = model.generate(**inputs, max_new_tokens=8)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.long
    reference = AutoModelForVision2Seq.from_pretrained(tiny_idefics3, backend="torch", device="cpu", dtype="float32")
    assert out.tolist() == reference.generate(**inputs, max_new_tokens=8).tolist()
    np_inputs = processor(text=prompt, images=[small_rgb], return_tensors="np")
    assert all(isinstance(v, np.ndarray) for v in np_inputs.values())
    assert model.generate(**np_inputs, max_new_tokens=8).tolist() == out.tolist()


# ---------------------------------------------------------------- dtype on the numpy backend


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    """Tiny Llama checkpoints saved in bf16, fp32 and fp16, and a bf16 one whose config.json names no dtype."""
    from .fixtures import build_tiny_llama

    root = tmp_path_factory.mktemp("llama_dtypes")
    paths = {name: build_tiny_llama(root / name, dtype=getattr(torch, name))
             for name in ("bfloat16", "float32", "float16")}
    silent = shutil.copytree(paths["bfloat16"], root / "no_dtype")
    config = json.loads((silent / "config.json").read_text())
    config.pop("dtype", None), config.pop("torch_dtype", None)
    (silent / "config.json").write_text(json.dumps(config))
    return {**paths, "no_dtype": silent}


@pytest.mark.parametrize("name", ["bfloat16", "float32", "no_dtype"])
def test_default_precision_is_transformers_default(llamas, name):
    """dtype=None is what transformers 5 loads the checkpoint in (its default dtype "auto": config.json's dtype,
    else the weights')."""
    import transformers

    expected = str(transformers.AutoModelForCausalLM.from_pretrained(llamas[name]).dtype).removeprefix("torch.")
    model = AutoModelForCausalLM.from_pretrained(llamas[name], backend="numpy")
    assert model.model.precision == model.precision == expected
    assert model.dtype == getattr(torch, expected)
    assert f"precision={expected!r}" in repr(model) and f"precision={expected!r}" in repr(model.model)
    llm = LLM(llamas[name], backend="numpy")
    assert (llm.stats.backend, llm.stats.precision) == ("numpy", expected) and expected in repr(llm)


@pytest.mark.parametrize("dtype, expected", [
    ("float32", "float32"), ("fp32", "float32"), (torch.float32, "float32"),
    ("bfloat16", "bfloat16"), ("bf16", "bfloat16"), (torch.bfloat16, "bfloat16"), ("auto", "bfloat16")])
def test_dtype_sets_the_precision(llamas, dtype, expected):
    model = AutoModelForCausalLM.from_pretrained(llamas["bfloat16"], backend="numpy", dtype=dtype)
    assert model.precision == expected
    assert AutoModelForCausalLM.from_pretrained(llamas["float32"], backend="numpy", torch_dtype=dtype).precision == (
        "float32" if dtype == "auto" else expected)


def test_float16_checkpoint_computes_in_float32(llamas):
    for dtype in (None, "auto"):
        assert AutoModelForCausalLM.from_pretrained(llamas["float16"], backend="numpy", dtype=dtype).precision == \
            "float32"


@needs_fused
@pytest.mark.parametrize("dtype", ["float16", "fp16", torch.float16])
def test_float16_on_the_cpu_is_a_clear_error(llamas, dtype):
    with pytest.raises(InputError, match="float16 does not run on the CPU.*'bfloat16'.*'float32'"):
        AutoModelForCausalLM.from_pretrained(llamas["float32"], device="cpu", dtype=dtype)  # the default: numpy


def test_gguf_keeps_float32(tmp_path):
    from .test_gguf import write_gguf

    write_gguf(tmp_path / "m.gguf")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "m.gguf", backend="numpy").precision == "float32"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "m.gguf", backend="numpy", dtype="auto").precision == \
        "float32"
    with pytest.raises(InputError, match="GGUF file computes in float32"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "m.gguf", backend="numpy", dtype="bfloat16")


def test_numpy_model_takes_only_known_precisions(tiny_llama):
    from smolvlm_fast.models.smolvlm_numpy import NumpyModel

    with pytest.raises(InputError, match="precision must be"):
        NumpyModel.from_checkpoint(tiny_llama, precision="float16")


def test_torch_backend_dtype_default_is_unchanged(llamas):
    model = AutoModelForCausalLM.from_pretrained(llamas["bfloat16"], backend="torch", device="cpu")
    assert model.dtype == torch.float32 and model.precision == "float32"
    auto = AutoModelForCausalLM.from_pretrained(llamas["no_dtype"], backend="torch", device="cpu", dtype="auto")
    assert auto.dtype == torch.bfloat16  # "auto" reads the weights' dtype where config.json names none


# ---------------------------------------------------------------- threads


THREADS_SCRIPT = r"""
import json, os, sys
import torch
before = torch.get_num_threads()   # torch's pool, sized for every CPU
os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})   # now this process may run on one CPU
from smolvlm_fast import AutoModelForCausalLM, _cpu
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], device="cpu", backend=sys.argv[2])
print(json.dumps({"before": before, "cpu": _cpu.get_num_threads(), "torch": torch.get_num_threads(),
                  "backend": model.backend}))
"""


def run_threads(path, backend_name, **env) -> dict:
    environment = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                                     "SMOLVLM_FAST_NUM_THREADS")}
    run = subprocess.run([sys.executable, "-c", THREADS_SCRIPT, str(path), backend_name], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env={**environment, **env})
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def needs_two_cpus():
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs a process that may run on 2 CPUs or more")


@needs_fused
@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
def test_pools_are_sized_to_the_affinity(tiny_llama, backend_name):
    """torch imported before the affinity narrowed to one CPU has a pool for every CPU; loading a model on either
    backend leaves one thread in each pool."""
    needs_two_cpus()
    got = run_threads(tiny_llama, backend_name)
    assert got["before"] >= 2 and got["backend"] == backend_name
    assert (got["cpu"], got["torch"]) == (1, 1)


@needs_fused
def test_the_users_torch_threads_are_respected(tiny_llama):
    needs_two_cpus()
    got = run_threads(tiny_llama, "numpy", OMP_NUM_THREADS="2")
    assert (got["cpu"], got["torch"]) == (1, 2)  # OMP_NUM_THREADS is the user's word for torch
    assert run_threads(tiny_llama, "numpy", SMOLVLM_FAST_NUM_THREADS="3")["cpu"] == 3


def test_torch_is_lowered_once_and_never_raised(monkeypatch):
    monkeypatch.setattr(threads, "_torch_sized", False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "cpu_threads", lambda: 3)
    state = {"n": 5}

    class FakeTorch:
        get_num_threads = staticmethod(lambda: state["n"])
        set_num_threads = staticmethod(lambda n: state.update(n=n))

    monkeypatch.setitem(sys.modules, "torch", FakeTorch)
    assert threads.size_torch_threads() == "lowered from 5 to 3" and state["n"] == 3
    state["n"] = 7  # the user's torch.set_num_threads after the load: ours ran once, theirs stays
    assert threads.size_torch_threads() == "sized already" and state["n"] == 7
    monkeypatch.setattr(threads, "_torch_sized", False)
    state["n"] = 2  # fewer than our pool: the user's (or torch's physical-core count), left alone
    assert threads.size_torch_threads().startswith("left at 2") and state["n"] == 2
    monkeypatch.setattr(threads, "_torch_sized", False)
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    state["n"] = 8
    assert "OMP_NUM_THREADS" in threads.size_torch_threads() and state["n"] == 8
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setattr(threads, "_torch_sized", False)
    assert threads.size_torch_threads() == "torch not imported"


# ---------------------------------------------------------------- the env report


def env_field(lines, name):
    found = [line[len(name):].strip() for line in lines if line.startswith(name + " ")]
    assert found, f"no {name!r} line in {lines}"
    return found[0]


@pytest.mark.parametrize("fused, expected", [(True, "numpy"), (False, "torch")])
def test_env_says_which_backend_a_cpu_user_gets(machine, fused, expected):
    from smolvlm_fast import env

    machine(fused=fused, torch=True)
    lines = env.report()
    assert env_field(lines, "cpu backend").startswith(f"{expected} (")
    precision = env_field(lines, "cpu precision")
    assert ("bfloat16 for a bf16 checkpoint" in precision) == (expected == "numpy")
    if expected == "numpy":
        from smolvlm_fast import _cpu
        assert env_field(lines, "cpu bf16 products").startswith(f"{_cpu.bf16_isa()} (")
    assert env_field(lines, "cpu threads").startswith(f"{threads.cpu_threads()} (")


def test_env_prints_the_pool_size_in_a_fresh_process():
    code = "import runpy\nrunpy.run_module('smolvlm_fast.env', run_name='__main__')"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "SMOLVLM_FAST_NUM_THREADS": "3"})
    assert run.returncode == 0, run.stderr[-3000:]
    line = env_field(run.stdout.splitlines(), "cpu threads")
    assert line.startswith("3 (SMOLVLM_FAST_NUM_THREADS")
    assert env_field(run.stdout.splitlines(), "cpu backend").split()[0] == backend.backend_choice("cpu")[0]
