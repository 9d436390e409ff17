"""The Triton paged_attention kernel against the PyTorch reference in float64.

Without a GPU it runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1) on small shapes, in fp32,
within 1e-5 relative. Every input is fresh random; the output and every cache slot no sequence owns (the tail of a
sequence's last block, the blocks of nobody, the padding of the block tables) are NaN, so a kernel that reads past
seq_len, reads the wrong block or leaves an output element unwritten fails. Block ids are shuffled.
"""
import pytest
import torch

from smolvlm_fast.kernels.paged_attention import choose_split_size, paged_attention
from smolvlm_fast.ops import reference

from . import kernel_checks
from .kernel_checks import run_into_nan


def _i32(x, device):
    return torch.tensor(x, dtype=torch.int32, device=device)


def make_inputs(seq_lens, q_lens, *, heads=(9, 3), head_dim=64, block_size=16, rotary_dim=None, dtype=torch.float32,
                device="cpu", seed=0):
    """Caches holding seq_lens tokens per sequence in shuffled blocks, NaN elsewhere, and q_lens new queries each.

    q_lens None means decode: one query per sequence and no query_start_loc. rotary_dim None means no RoPE.
    """
    gen = torch.Generator().manual_seed(seed)
    Hq, Hkv = heads
    blocks = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks) + 2  # two blocks nobody owns
    ids = torch.randperm(num_blocks, generator=gen).tolist()
    spare = ids.pop()  # the block-table padding points at an all-NaN block
    k_cache = torch.full((num_blocks, block_size, Hkv, head_dim), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    tables = torch.full((len(seq_lens), max(blocks) + 1), spare, dtype=torch.int32)
    for s, (n, nb) in enumerate(zip(seq_lens, blocks)):
        mine = [ids.pop() for _ in range(nb)]
        tables[s, :nb] = torch.tensor(mine, dtype=torch.int32)
        slots = torch.tensor([mine[p // block_size] * block_size + p % block_size for p in range(n)])
        k_cache.view(-1, Hkv, head_dim)[slots] = torch.randn(n, Hkv, head_dim, generator=gen)
        v_cache.view(-1, Hkv, head_dim)[slots] = torch.randn(n, Hkv, head_dim, generator=gen)
    counts = [1] * len(seq_lens) if q_lens is None else q_lens
    T = sum(counts)
    q = torch.randn(T, Hq, head_dim, generator=gen)
    kwargs = {}
    if q_lens is not None:
        kwargs["query_start_loc"] = _i32([sum(counts[:s]) for s in range(len(counts) + 1)], device)
    if rotary_dim is not None:
        kwargs["cos_sin"] = reference.rope_table(rotary_dim, max(seq_lens) + 7, 10000.0).to(device)
        kwargs["positions"] = _i32([p for n, c in zip(seq_lens, counts) for p in range(n - c, n)], device)
        kwargs["rotary_dim"] = rotary_dim
    to = dict(device=device, dtype=dtype)
    return (q.to(**to), k_cache.to(**to), v_cache.to(**to), tables.to(device), _i32(seq_lens, device)), kwargs


def reference_f64(args, kwargs):
    q, k_cache, v_cache, tables, seq_lens = (t.cpu() for t in args)
    kwargs = {k: (v.cpu().double() if k == "cos_sin" else v.cpu() if torch.is_tensor(v) else v) for k, v in kwargs.items()}
    return reference.paged_attention(q.double(), k_cache.double(), v_cache.double(), tables, seq_lens, **kwargs)


def pytorch_error(args, kwargs, dtype, expect):
    """Error of the reference run in `dtype` on the inputs' device: the kernel may be off by at most twice as much."""
    q, k_cache, v_cache, tables, seq_lens = args
    low = {k: (v.to(dtype) if k == "cos_sin" else v) for k, v in kwargs.items()}
    out = reference.paged_attention(q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), tables, seq_lens, **low)
    return (out.double().cpu() - expect).abs().max().item()


def run_kernel(args, kwargs, **extra):
    return run_into_nan(paged_attention, args[0], *args, **kwargs, **extra)


def assert_matches_fp32(out, expect):
    kernel_checks.assert_matches_fp32(out, expect, "unwritten, or a poisoned slot was read")


# (seq_lens, split_size): lengths that end mid-block and on a block edge (16 and 32 divide 32, 64, 96), a single
# token, and one sequence much longer than the others; split_size 32 forces several splits and the combine kernel.
# The interpreter's key tile is 32: split 16 leaves half of it masked, 40 ends splits mid-tile, and block size 16
# puts two pages in one tile.
DECODE = [
    pytest.param([17, 32, 160, 1, 64], 32, 16, 64, None, id="bs16-d64-split32"),
    pytest.param([17, 32, 160, 1, 64], None, 16, 64, 64, id="bs16-d64-rope-onesplit"),
    pytest.param([33, 96, 5, 200], 64, 32, 80, 80, id="bs32-d80-rope-split64"),
    pytest.param([33, 96, 5, 200], 32, 32, 80, 40, id="bs32-d80-halfrope-split32"),
    pytest.param([31, 64, 130], 16, 16, 80, None, id="bs16-d80-split16"),
    pytest.param([31, 64, 130], 40, 16, 64, 64, id="bs16-d64-rope-split40"),  # splits end mid-tile
]


@pytest.mark.parametrize("seq_lens, split_size, block_size, head_dim, rotary_dim", DECODE)
def test_decode(seq_lens, split_size, block_size, head_dim, rotary_dim):
    args, kwargs = make_inputs(seq_lens, None, head_dim=head_dim, block_size=block_size, rotary_dim=rotary_dim)
    assert_matches_fp32(run_kernel(args, kwargs, split_size=split_size), reference_f64(args, kwargs))


# (seq_lens, q_lens): a prefill from scratch (q_len == seq_len), prefill after a cached prefix (chunked prefill),
# and decode rows, in one call; q_lens longer than a query tile (5 queries x 3 heads in 16 rows) and shorter.
MIXED = [
    pytest.param([24, 18, 100, 32], [24, 1, 13, 1], 32, 16, 64, 64, id="bs16-d64-rope-split32"),
    pytest.param([40, 18, 100, 32], [40, 1, 23, 1], None, 16, 64, None, id="bs16-d64-onesplit"),
    pytest.param([7, 64, 150], [3, 1, 30], 64, 32, 80, 40, id="bs32-d80-halfrope-split64"),
    pytest.param([1, 96, 33], [1, 2, 33], 32, 32, 80, 80, id="bs32-d80-rope-split32"),
]


@pytest.mark.parametrize("seq_lens, q_lens, split_size, block_size, head_dim, rotary_dim", MIXED)
def test_mixed_prefill_and_decode(seq_lens, q_lens, split_size, block_size, head_dim, rotary_dim):
    args, kwargs = make_inputs(seq_lens, q_lens, head_dim=head_dim, block_size=block_size, rotary_dim=rotary_dim)
    assert_matches_fp32(run_kernel(args, kwargs, split_size=split_size), reference_f64(args, kwargs))


@pytest.mark.parametrize("heads", [(15, 5), (4, 4)], ids=["15-5", "mha"])
def test_other_head_groups(heads):
    args, kwargs = make_inputs([20, 70], [20, 2], heads=heads, rotary_dim=64)
    assert_matches_fp32(run_kernel(args, kwargs, split_size=32), reference_f64(args, kwargs))


def test_sequence_without_new_queries():
    """A sequence with q_len 0 (it owns a query tile that has nothing to do) next to ones that have queries."""
    args, kwargs = make_inputs([10, 50, 20], [4, 0, 20], rotary_dim=64)
    assert_matches_fp32(run_kernel(args, kwargs, split_size=16), reference_f64(args, kwargs))


def test_decode_equals_varlen_decode():
    """One query per sequence, with and without query_start_loc, gives the same output."""
    args, kwargs = make_inputs([5, 48, 90], None, rotary_dim=64)
    varlen = dict(kwargs, query_start_loc=_i32([0, 1, 2, 3], "cpu"))
    a = run_kernel(args, kwargs, split_size=32)
    b = run_kernel(args, varlen, split_size=32, max_seq_len=90)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    """FlashAttention's rule: at most twice the error of the reference run in the same precision. (In the
    interpreter bf16 operands are multiplied in fp32 after rounding: its bf16 tl.dot is wrong.)"""
    args, kwargs = make_inputs([20, 9, 70], [20, 1, 6], rotary_dim=64)
    expect = reference_f64(args, kwargs)
    limit = 2 * pytorch_error(args, kwargs, dtype, expect)
    out = run_kernel(tuple(t.to(dtype) if t.is_floating_point() else t for t in args), kwargs, split_size=32)
    assert not out.isnan().any()
    err = (out.double() - expect).abs().max().item()
    assert err <= limit, f"kernel error {err:.3g} > 2 x PyTorch's {limit / 2:.3g}"


def test_scale_and_default_out():
    args, kwargs = make_inputs([9, 40], [3, 1])
    out = paged_attention(*args, **kwargs, scale=0.3)
    assert_matches_fp32(out, reference.paged_attention(*(t.double() for t in args[:3]), *args[3:], **kwargs, scale=0.3))


def test_bad_inputs_are_clear_errors():
    (q, k_cache, v_cache, tables, seq_lens), _ = make_inputs([9, 40], None)
    with pytest.raises(ValueError, match="one query per sequence"):
        paged_attention(q[:1], k_cache, v_cache, tables, seq_lens)
    with pytest.raises(ValueError, match="share"):
        paged_attention(q.double(), k_cache, v_cache, tables, seq_lens)
    with pytest.raises(ValueError, match="split_size"):
        paged_attention(q, k_cache, v_cache, tables, seq_lens, split_size=0)
    with pytest.raises(ValueError, match="query heads"):
        paged_attention(q[:, :8], k_cache, v_cache, tables, seq_lens)


def test_split_choice(monkeypatch):
    """Splits of 128..512 keys (multiples of 64), as many as fill the GPU twice over; a short context gets one, and
    so does a prefill whose query tiles fill the GPU."""
    cpu = torch.device("cpu")  # one "SM": the interpreter runs programs one after another
    assert choose_split_size(100, 3, cpu) == 128
    assert choose_split_size(32768, 3, cpu) == 512
    monkeypatch.setattr("smolvlm_fast.kernels.paged_attention._num_sms", lambda device: 132)  # an H100
    assert choose_split_size(32768, 3, cpu) == 384  # 86 splits x 3 kv heads
    assert choose_split_size(4096, 3, cpu) == 128  # 88 splits wanted, 32 of the smallest size
    assert choose_split_size(4096, 64 * 3, cpu) == 512
    assert choose_split_size(32768, 300 * 3, cpu) == 512  # decode: splits balance the load
    assert choose_split_size(8192, 300 * 3, cpu, multi_query=True) == 8192  # prefill: tiles fill the GPU
    assert choose_split_size(8192, 30 * 3, cpu, multi_query=True) == 512  # a short chunk after a long prefix


# ---------------------------------------------------------------- GPU: fp16 / bf16 at realistic sizes

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["decode", "mixed"])
@pytest.mark.parametrize("split_size", [None, 64, 512])
@pytest.mark.parametrize("block_size, head_dim, heads, rotary_dim", [
    (16, 64, (9, 3), 64), (32, 80, (15, 5), 40), (16, 64, (32, 32), None)])
def test_gpu_low_precision(dtype, mode, split_size, block_size, head_dim, heads, rotary_dim):
    seq_lens = [1, 16, 517, 4096, 1000, 3000]
    q_lens = None if mode == "decode" else [1, 16, 200, 1, 1000, 37]
    args, kwargs = make_inputs(seq_lens, q_lens, heads=heads, head_dim=head_dim, block_size=block_size,
                               rotary_dim=rotary_dim, device="cuda")
    expect = reference_f64(args, kwargs)  # the fp32 inputs, in float64
    limit = 2 * pytorch_error(args, kwargs, dtype, expect)
    low = tuple(t.to(dtype) if t.is_floating_point() else t for t in args)
    out = run_kernel(low, kwargs, split_size=split_size)
    assert not out.isnan().any()
    err = (out.double().cpu() - expect).abs().max().item()
    assert err <= limit, f"kernel error {err:.3g} > 2 x PyTorch's {limit / 2:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["decode", "mixed"])
def test_gpu_fp32(mode):
    seq_lens = [3, 64, 2049, 700]
    q_lens = None if mode == "decode" else [3, 1, 300, 1]
    args, kwargs = make_inputs(seq_lens, q_lens, rotary_dim=64, device="cuda")
    out = run_kernel(args, kwargs)
    expect = reference_f64(args, kwargs)
    err = (out.double().cpu() - expect).abs().max().item()
    assert err <= 1e-5 * expect.abs().max().item(), f"max error {err:.3g}"  # input_precision="ieee": no tf32
