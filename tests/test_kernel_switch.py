"""The kernel order (ops/registry.py): SMOLVLM_FAST_KERNELS, ops.use_kernels, from_pretrained(kernels=),
LLM(kernels=) and --kernels, one process-wide setting that the engine's thread sees too."""
import threading

import pytest
import torch

from smolvlm_fast import LLM, AutoModelForCausalLM, SamplingParams, cli, ops
from smolvlm_fast.errors import InputError
from smolvlm_fast.ops import reference, registry
from smolvlm_fast.ops.registry import Impl, any_call

from .test_cuda_kernels import cuda_like


# each test starts from the default kernel order and leaves it so (conftest.default_kernel_order)
pytestmark = pytest.mark.usefixtures("default_kernel_order")


@pytest.mark.parametrize("spec, order", [
    ("cuda,triton,reference", ("cuda", "triton", "reference")), ("triton", ("triton", "reference")),
    (" Triton , cuda ", ("triton", "cuda", "reference")), ("reference", ("reference",)),
    ("reference,cuda", ("cuda", "reference")), (["cuda"], ("cuda", "reference"))])
def test_an_order_a_subset_or_one_name(spec, order):
    assert registry.parse_kernels(spec) == order


@pytest.mark.parametrize("spec", ["", "fast", "cuda,cuda", "cuda;triton", "cuda,,numpy"])
def test_a_bad_order_names_the_allowed_values(spec):
    with pytest.raises(InputError, match=r"kernels=.*give one or more of cuda, triton, reference"):
        registry.parse_kernels(spec)


def paged_decode():
    from .test_cuda_kernels import paged_inputs
    args, kwargs = paged_inputs([5, 40], None, rotary_dim=64, dtype=torch.bfloat16)
    return (cuda_like(args[0]), *args[1:]), kwargs


def test_the_environment_variable_orders_the_walk(monkeypatch):
    args, kwargs = paged_decode()
    have = ops.available("paged_attention")
    assert registry.pick("paged_attention", None, args, kwargs).name == have[0]
    monkeypatch.setenv(registry.KERNELS_ENV, "reference")
    assert ops.kernel_order() == ("reference",)
    assert registry.pick("paged_attention", None, args, kwargs).name == "reference"
    assert "not in the order" in ops.explain("paged_attention", *args, **kwargs) or have == ["reference"]
    with ops.prefer("triton"):  # a forced one still runs where the order leaves it out
        assert registry.pick("paged_attention", None, args, kwargs).name == ("triton" if "triton" in have
                                                                             else "reference")
    monkeypatch.setenv(registry.KERNELS_ENV, "triton,fast")
    with pytest.raises(InputError, match="SMOLVLM_FAST_KERNELS='triton,fast'"):
        ops.rms_norm(torch.randn(2, 8), torch.randn(8), 1e-6)


def test_use_kernels_wins_over_the_environment_and_reaches_other_threads(monkeypatch):
    """A process-wide setting, unlike prefer(), which stays in its thread."""
    monkeypatch.setenv(registry.KERNELS_ENV, "reference")
    ops.use_kernels("triton")
    assert ops.kernel_order() == ("triton", "reference")
    seen = []
    with ops.prefer("reference"):
        thread = threading.Thread(target=lambda: seen.append((ops.kernel_order(), registry._preferred.get())))
        thread.start()
        thread.join()
    assert seen == [(("triton", "reference"), None)]
    assert registry.kernel_order_source() == "set by kernels"
    ops.use_kernels(None)
    assert ops.kernel_order() == ("reference",)


def recording_rms_norm(threads: list) -> Impl:
    """A right rms_norm on any device that notes the thread calling it."""
    def call(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return reference.rms_norm(*args, **kwargs)
    return Impl("triton", ops.ORDER.index("triton"), None, call, any_call)


def test_llm_kernels_reach_the_engine_thread(tiny_llama):
    threads = []
    with registry.stand_in("rms_norm", recording_rms_norm(threads)):
        llm = LLM(tiny_llama, backend="torch", device="cpu", kernels="reference", max_num_seqs=2, num_blocks=16)
        try:
            llm._engine_loop()  # from here generate() runs in the engine's thread
            llm.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2))
            assert threads == []  # the reference only
            LLM(llm.model, kernels="triton,reference", max_num_seqs=2, num_blocks=16)  # another LLM: one setting
            llm.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2))
            assert threads and set(threads) == {"smolvlm-engine"}
        finally:
            llm.shutdown()
    with pytest.raises(InputError, match="LLM"):
        LLM(tiny_llama, backend="torch", device="cpu", kernels="fastest")


def test_from_pretrained_sets_the_order(tiny_llama):
    AutoModelForCausalLM.from_pretrained(tiny_llama, backend="torch", device="cpu", kernels="triton")
    assert ops.kernel_order() == ("triton", "reference")
    with pytest.raises(InputError, match="from_pretrained"):
        AutoModelForCausalLM.from_pretrained(tiny_llama, kernels="cpu")


@pytest.mark.parametrize("command", [["generate", "hi"], ["serve"], ["caption", "."], ["doctor"]])
def test_every_command_takes_kernels(command, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main([*command, "--kernels", "triton,gpu"])
    assert exit.value.code == 2 and "give one or more of cuda, triton, reference" in capsys.readouterr().err
    args = cli.build_parser().parse_args([*command, "--kernels", "triton"])
    assert args.kernels == "triton"


def test_the_command_line_sets_it_before_the_command_runs(monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "run_generate", lambda args: seen.append(ops.kernel_order()) or 0)
    assert cli.main(["generate", "hi", "--kernels", "reference"]) == 0
    assert seen == [("reference",)]


def test_a_bad_environment_order_is_a_command_error_on_the_cpu_path(monkeypatch, capsys):
    """The numpy path calls no op, so only the command's own check catches a bad SMOLVLM_FAST_KERNELS."""
    from smolvlm_fast.cli import main
    monkeypatch.setenv("SMOLVLM_FAST_KERNELS", "bogus")
    assert main(["generate", "hi", "--max-new-tokens", "1"]) == 2
    assert "SMOLVLM_FAST_KERNELS='bogus'" in capsys.readouterr().err
