"""Patch embedding as an implicit GEMM straight from the image, bias and position embedding in the epilogue.

Layout (any strides):
    pixels [B, C, H, W]     weight [D, C/G, P, P]    bias [D]     dw_weight [C, 1, P, P]    pw_weight [D, C]
    pos_embed [num_positions, D]    position_ids [B, N] int32/int64 (None: arange(N))    out [B, N, D]
    N = (H/P)·(W/P); patch n sits at patch row n // (W/P), patch column n % (W/P) (row-major, as conv + flatten).
    As in conv2d, pixels past the last whole patch are never read (SigLIP at 384 px, patch 14: 27 patches + 6 px).

patch_embed: conv2d with stride = kernel = P, dense (G = 1) or grouped, as one GEMM over the B·N patches.
GEMM row m is patch (b, n) = (m // N, m % N), column d an output channel, and the reduction runs over
k = (c, i, j) in the weight's own [C/G, P, P] order, A[m, k] = pixels[b, c, ph·P + i, pw·P + j]: the address of
an A element is the patch's corner offset (per row) plus the offset of (c, i, j) (per column), so the tiles load
from the image itself, with no unfolded copy. A K tile is ROWS pixel rows of PP = next_pow2(P) pixels: the
column j runs along the image row (contiguous, vectorizable loads), j >= P is masked (P = 14 reads 16, uses 14),
and the row index r = c·P + i runs over all of the group's channels, so a tile may straddle two channels.
Grouped: the output tiles of group g (D/G wide, masked at its edge) read only channels g·C/G ... of the image.
The grid is 1-D, output tiles fastest, so the programs that share an image tile run together (L2 reuse).

dwsep_patch_embed: a depthwise P×P conv per channel, then the pointwise [D, C] projection, in one kernel.
A program owns BLOCK_M patches: it computes dw[m, c] = sum_ij pixels[b, c, ph·P + i, pw·P + j]·dw_weight[c, 0, i, j]
+ dw_bias[c] one channel at a time from [BLOCK_M, PP] row loads (fp32 sums), rounds it to the pixels' dtype as
the reference does, keeps it in registers as a [BLOCK_M, BLOCK_C] tile (channels padded to at least 16, tl.dot's
smallest K) and multiplies it by pw_weight's tiles for the output tiles s, s + SPLIT, ... (SPLIT programs share a
row of tiles when there are few patches, each recomputing the cheap depthwise part). More than MAX_BLOCK_C
channels are walked in chunks inside each output tile instead (the depthwise part is then recomputed per output
tile; image stems have 3 channels, so this path is for completeness).

Both: products on the tensor cores in the pixels' dtype (fp32 in IEEE fp32, no TF32), accumulation in fp32, then
+ bias + pos_embed[position_ids] in fp32 and one rounding to the output dtype, which is the reference's: the
pixels' dtype promoted with pos_embed's. position_ids must lie in [0, num_positions) (not checked on the device).
Tiles (BLOCK_M patches x BLOCK_N outputs, ROWS), warps and stages are autotuned per size class (patches / 1024,
rounded up to a power of two) and layer shape; the interpreter runs one small config.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .rope_attention import INTERPRET, dot_options
from .tuning import space

MAX_BLOCK_C = 64  # dwsep: channels whose depthwise result one program keeps in registers at once
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------- shared @triton.jit helpers

@triton.jit
def _patch_rows(pid_m, M, N_PATCHES, PATCHES_W, stride_pb, stride_ph, stride_pw,
                P: tl.constexpr, BLOCK_M: tl.constexpr):
    """The tile's patches: per row [BLOCK_M] its image b, patch index n, the pixel offset of its top-left corner
    and whether it exists (m < M)."""
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = m < M
    b = m // N_PATCHES
    n = m % N_PATCHES
    corner = b * stride_pb + (n // PATCHES_W) * (P * stride_ph) + (n % PATCHES_W) * (P * stride_pw)
    return b, n, corner, valid


@triton.jit
def _epilogue(acc, out_ptr, bias_ptr, pos_ptr, ids_ptr, b, n, row_valid, d, col_valid,
              stride_bias, stride_pos_row, stride_pos_d, stride_ib, stride_in, stride_ob, stride_on, stride_od,
              HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, HAS_IDS: tl.constexpr):
    """out[b, n, d] = acc + bias[d] + pos_embed[position_ids[b, n], d], summed in fp32 and rounded once."""
    mask = row_valid[:, None] & col_valid[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + d * stride_bias, mask=col_valid, other=0.0).to(tl.float32)[None, :]
    if HAS_POS:
        pos = n
        if HAS_IDS:
            pos = tl.load(ids_ptr + b * stride_ib + n * stride_in, mask=row_valid, other=0).to(tl.int64)
        acc += tl.load(pos_ptr + pos[:, None] * stride_pos_row + d[None, :] * stride_pos_d, mask=mask,
                       other=0.0).to(tl.float32)
    out = out_ptr + b[:, None] * stride_ob + n[:, None] * stride_on + d[None, :] * stride_od
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- patch_embed: dense / grouped conv

def gemm_configs() -> list[triton.Config]:
    """Autotune space: 64/128-patch by 64/128-output tiles, K tiles of 2 or 4 pixel rows (32 or 64 of the
    reduction for P = 14/16). 256-wide tiles spill (compiled for sm_90: 128 x 256 uses all 255 registers and
    the stack). The interpreter gets one small config, so small tests cross every tile edge."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "ROWS": 4})]
    return space([triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "ROWS": rows}, num_warps=w, num_stages=s)
                  for bm in (64, 128) for bn in (64, 128) for rows in (2, 4) for w in (4, 8) for s in (3, 4)
                  if (w == 8) == (bm * bn >= 128 * 128) and (s == 3 or rows == 2)],
                 pinned=[triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "ROWS": 2}, num_warps=4, num_stages=3)])


def prune_gemm_configs(configs, named_args, **kwargs):
    """Output tiles no wider than a group (grouped convs have narrow groups) and K tiles of at least 16 (tl.dot)."""
    group_width = max(64, triton.next_power_of_2(named_args["D_GROUP"]))
    pp = kwargs["PP"]
    kept = [c for c in configs if c.kwargs["BLOCK_N"] <= group_width and c.kwargs["ROWS"] * pp >= 16]
    return kept or [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "ROWS": max(2, 16 // pp)}, num_warps=4)]


def _even_k(args) -> bool:
    """No K masks needed: P is a power of two and the group's C/G·P pixel rows fill whole K tiles."""
    return args["P"] == args["PP"] and (args["C_GROUP"] * args["P"]) % args["ROWS"] == 0


@triton.autotune(configs=gemm_configs(), key=["size_class", "D_GROUP", "C_GROUP", "P"],
                 prune_configs_by={"early_config_prune": prune_gemm_configs})
@triton.heuristics({"EVEN_K": _even_k})
@triton.jit(do_not_specialize=["size_class"])
def _patch_embed_kernel(
    out_ptr, pix_ptr, w_ptr, bias_ptr, pos_ptr, ids_ptr,
    M, N_PATCHES, PATCHES_W, GROUPS, D_GROUP, C_GROUP, size_class,  # size_class: the autotuning key only
    stride_pb, stride_pc, stride_ph, stride_pw,
    stride_wd, stride_wc, stride_wh, stride_ww,
    stride_bias, stride_pos_row, stride_pos_d, stride_ib, stride_in,
    stride_ob, stride_on, stride_od,
    P: tl.constexpr, PP: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, HAS_IDS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr, EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    BLOCK_K: tl.constexpr = ROWS * PP
    pid = tl.program_id(0).to(tl.int64)
    tiles_per_group = tl.cdiv(D_GROUP, BLOCK_N)
    n_tiles = GROUPS * tiles_per_group
    pid_m = pid // n_tiles
    pid_n = pid % n_tiles
    group = pid_n // tiles_per_group
    offs_n = (pid_n % tiles_per_group) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_valid = offs_n < D_GROUP
    d = group * D_GROUP + offs_n  # [BLOCK_N] output channels

    b, n, corner, row_valid = _patch_rows(pid_m, M, N_PATCHES, PATCHES_W, stride_pb, stride_ph, stride_pw,
                                          P, BLOCK_M)
    a_rows = pix_ptr + group * C_GROUP * stride_pc + corner  # [BLOCK_M] pointers to the patches' corners
    w_cols = w_ptr + d * stride_wd  # [BLOCK_N]

    kk = tl.arange(0, BLOCK_K)
    j = kk % PP  # the pixel column within the patch row
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for r0 in range(0, C_GROUP * P, ROWS):
        r = r0 + kk // PP  # [BLOCK_K] pixel row within the group's channels: r = c·P + i
        c = r // P
        i = r - c * P
        a_ptrs = a_rows[:, None] + (c * stride_pc + i * stride_ph + j * stride_pw)[None, :]  # [BLOCK_M, BLOCK_K]
        w_ptrs = w_cols[None, :] + (c * stride_wc + i * stride_wh + j * stride_ww)[:, None]  # [BLOCK_K, BLOCK_N]
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_valid[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=col_valid[None, :], other=0.0)
        else:
            k_valid = (r < C_GROUP * P) & (j < P)
            a = tl.load(a_ptrs, mask=row_valid[:, None] & k_valid[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_valid[:, None] & col_valid[None, :], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)

    _epilogue(acc, out_ptr, bias_ptr, pos_ptr, ids_ptr, b, n, row_valid, d, col_valid,
              stride_bias, stride_pos_row, stride_pos_d, stride_ib, stride_in, stride_ob, stride_on, stride_od,
              HAS_BIAS, HAS_POS, HAS_IDS)


# ---------------------------------------------------------------- dwsep_patch_embed: depthwise + pointwise

@triton.jit
def _depthwise(a_rows, row_valid, dww_ptr, dwb_ptr, c0, C,
               stride_pc, stride_ph, stride_pw, stride_dwc, stride_dwh, stride_dww, stride_dwb,
               P: tl.constexpr, PP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
               HAS_DW_BIAS: tl.constexpr):
    """[BLOCK_M, BLOCK_C] fp32: column c - c0 holds channel c's depthwise conv (+ dw_bias) of each patch, for the
    channels c0 ... min(c0 + BLOCK_C, C) - 1; other columns are 0."""
    j = tl.arange(0, PP)
    in_patch = j < P
    x_mask = row_valid[:, None] & in_patch[None, :]
    offs_c = tl.arange(0, BLOCK_C)
    dw = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for c in range(c0, tl.minimum(c0 + BLOCK_C, C)):
        acc = tl.zeros([BLOCK_M, PP], dtype=tl.float32)
        for i in range(P):
            x = tl.load(a_rows[:, None] + (c * stride_pc + i * stride_ph + j * stride_pw)[None, :], mask=x_mask,
                        other=0.0)
            w = tl.load(dww_ptr + c * stride_dwc + i * stride_dwh + j * stride_dww, mask=in_patch, other=0.0)
            acc += x.to(tl.float32) * w.to(tl.float32)[None, :]
        s = tl.sum(acc, axis=1)  # [BLOCK_M]
        if HAS_DW_BIAS:
            s += tl.load(dwb_ptr + c * stride_dwb).to(tl.float32)
        dw = tl.where(offs_c[None, :] == c - c0, s[:, None], dw)
    return dw


@triton.jit
def _pointwise(dw, pww_ptr, c0, C, d, col_valid, stride_pwd, stride_pwc, acc,
               BLOCK_C: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    """acc + dw @ pw_weight[d, c0 : c0 + BLOCK_C].T, dw rounded to the pixels' dtype first (as the reference's
    depthwise conv output is)."""
    offs_c = c0 + tl.arange(0, BLOCK_C)
    w = tl.load(pww_ptr + offs_c[:, None] * stride_pwc + d[None, :] * stride_pwd,
                mask=(offs_c < C)[:, None] & col_valid[None, :], other=0.0)  # [BLOCK_C, BLOCK_N]
    dw = dw.to(pww_ptr.dtype.element_ty)  # pw_weight has the pixels' dtype
    if DOT_FP32:
        dw = dw.to(tl.float32)
        w = w.to(tl.float32)
    return tl.dot(dw, w.to(dw.dtype), acc, input_precision=DOT_PRECISION)


def dwsep_configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16})]
    return space([triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=2)
                  for bm in (32, 64, 128) for bn in (64, 128) for w in (4, 8) if (w == 8) == (bm * bn >= 128 * 128)],
                 pinned=[triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2)])


@triton.autotune(configs=dwsep_configs(), key=["size_class", "C", "D", "P"])
@triton.jit(do_not_specialize=["size_class"])
def _dwsep_patch_embed_kernel(
    out_ptr, pix_ptr, dww_ptr, dwb_ptr, pww_ptr, pwb_ptr, pos_ptr, ids_ptr,
    M, N_PATCHES, PATCHES_W, C, D, size_class,  # size_class: the autotuning key only
    stride_pb, stride_pc, stride_ph, stride_pw,
    stride_dwc, stride_dwh, stride_dww, stride_dwb, stride_pwd, stride_pwc,
    stride_bias, stride_pos_row, stride_pos_d, stride_ib, stride_in,
    stride_ob, stride_on, stride_od,
    P: tl.constexpr, PP: tl.constexpr, BLOCK_C: tl.constexpr, ONE_C_BLOCK: tl.constexpr,
    HAS_DW_BIAS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, HAS_IDS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    split = tl.num_programs(1)
    b, n, corner, row_valid = _patch_rows(pid_m, M, N_PATCHES, PATCHES_W, stride_pb, stride_ph, stride_pw,
                                          P, BLOCK_M)
    a_rows = pix_ptr + corner
    if ONE_C_BLOCK:  # every channel's depthwise result, computed once, kept in registers for all output tiles
        dw = _depthwise(a_rows, row_valid, dww_ptr, dwb_ptr, 0, C, stride_pc, stride_ph, stride_pw,
                        stride_dwc, stride_dwh, stride_dww, stride_dwb, P, PP, BLOCK_M, BLOCK_C, HAS_DW_BIAS)
    for tile in range(tl.program_id(1), tl.cdiv(D, BLOCK_N), split):
        d = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        col_valid = d < D
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if ONE_C_BLOCK:
            acc = _pointwise(dw, pww_ptr, 0, C, d, col_valid, stride_pwd, stride_pwc, acc, BLOCK_C,
                             DOT_PRECISION, DOT_FP32)
        else:
            for c0 in range(0, C, BLOCK_C):
                dw_c = _depthwise(a_rows, row_valid, dww_ptr, dwb_ptr, c0, C, stride_pc, stride_ph, stride_pw,
                                  stride_dwc, stride_dwh, stride_dww, stride_dwb, P, PP, BLOCK_M, BLOCK_C,
                                  HAS_DW_BIAS)
                acc = _pointwise(dw_c, pww_ptr, c0, C, d, col_valid, stride_pwd, stride_pwc, acc, BLOCK_C,
                                 DOT_PRECISION, DOT_FP32)
        _epilogue(acc, out_ptr, pwb_ptr, pos_ptr, ids_ptr, b, n, row_valid, d, col_valid,
                  stride_bias, stride_pos_row, stride_pos_d, stride_ib, stride_in, stride_ob, stride_on, stride_od,
                  HAS_BIAS, HAS_POS, HAS_IDS)


# ---------------------------------------------------------------- launchers

@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def size_class(patches: int) -> int:
    """The autotuning key's size: patches in units of 1024 (one 512 x 512 SigLIP tile) rounded up to a power of
    two, at most 64, so one image and a split image's 13 each get their own tiles without retuning per batch."""
    return min(64, triton.next_power_of_2(triton.cdiv(patches, 1024)))


def _check_pixels(op: str, pixels: torch.Tensor, patch: int) -> tuple[int, int, int]:
    """(B, patch rows, patch columns); as conv2d, pixels past the last whole patch are ignored."""
    if pixels.dim() != 4:
        raise ValueError(f"{op}: pixels must be [B, C, H, W]; got {tuple(pixels.shape)}")
    if pixels.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: pixels must be fp32, fp16 or bf16; got {pixels.dtype}")
    if pixels.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"{op}: the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 for CPU ones)")
    if patch < 1:
        raise ValueError(f"{op}: the patch size must be positive; got {patch}")
    B, _, H, W = pixels.shape
    return B, H // patch, W // patch


def _check_like_pixels(op: str, pixels, **weights) -> None:
    for name, w in weights.items():
        if w.dtype != pixels.dtype or w.device != pixels.device:
            raise ValueError(f"{op}: {name} must be {pixels.dtype} on {pixels.device} like the pixels; got "
                             f"{w.dtype} on {w.device}")


def _check_vector(op: str, name: str, t, n: int, device) -> None:
    if t is not None and (tuple(t.shape) != (n,) or t.device != device or not t.is_floating_point()):
        raise ValueError(f"{op}: {name} must be a float [{n}] tensor on {device}; got "
                         f"{t.dtype} {tuple(t.shape)} on {t.device}")


def _positions(op: str, pos_embed, position_ids, B: int, N: int, D: int, device):
    """(pos_embed or a placeholder, position_ids expanded to [B, N] or a placeholder, kernel arguments)."""
    if pos_embed is None:
        return {"HAS_POS": False, "HAS_IDS": False}, (0, 0, 0, 0), None, None
    if pos_embed.dim() != 2 or pos_embed.shape[1] != D or pos_embed.device != device \
            or not pos_embed.is_floating_point():
        raise ValueError(f"{op}: pos_embed must be a float [num_positions, {D}] tensor on {device}; got "
                         f"{pos_embed.dtype} {tuple(pos_embed.shape)} on {pos_embed.device}")
    if position_ids is None:
        if pos_embed.shape[0] < N:
            raise ValueError(f"{op}: {N} patches but pos_embed has only {pos_embed.shape[0]} positions")
        return {"HAS_POS": True, "HAS_IDS": False}, (*pos_embed.stride(), 0, 0), pos_embed, None
    position_ids = torch.as_tensor(position_ids, device=device)
    if position_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{op}: position_ids must be int32 or int64; got {position_ids.dtype}")
    try:
        position_ids = position_ids.expand(B, N)  # [B, N]; [N] or [1, N] broadcast over the batch, as in torch
    except RuntimeError:
        raise ValueError(f"{op}: position_ids {tuple(position_ids.shape)} do not fit [B, N] = [{B}, {N}]") from None
    return {"HAS_POS": True, "HAS_IDS": True}, (*pos_embed.stride(), *position_ids.stride()), pos_embed, position_ids


def _output(op: str, out, pixels, pos_embed, B: int, N: int, D: int) -> torch.Tensor:
    """The reference's dtype: the conv's (the pixels') promoted with pos_embed's."""
    dtype = pixels.dtype if pos_embed is None else torch.promote_types(pixels.dtype, pos_embed.dtype)
    if out is None:
        return torch.empty(B, N, D, dtype=dtype, device=pixels.device)
    if tuple(out.shape) != (B, N, D) or out.dtype != dtype or out.device != pixels.device:
        raise ValueError(f"{op}: out must be [{B}, {N}, {D}] {dtype} on {pixels.device}; got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    return out


def _epilogue_args(op: str, bias_name: str, bias, pos_embed, position_ids, out, pixels, B: int, N: int, D: int):
    """The epilogue's inputs checked, and the output: (out, position flags, pos strides, pos_embed, position_ids)."""
    _check_vector(op, bias_name, bias, D, pixels.device)
    flags, pos_strides, pos_embed, position_ids = _positions(op, pos_embed, position_ids, B, N, D, pixels.device)
    return _output(op, out, pixels, pos_embed, B, N, D), flags, pos_strides, pos_embed, position_ids


def patch_embed(pixels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pos_embed: torch.Tensor | None,
                position_ids: torch.Tensor | None, *, groups: int = 1, out: torch.Tensor | None = None) -> torch.Tensor:
    """conv2d(pixels, weight, bias, stride=P, groups).flatten(2).transpose(1, 2) + pos_embed[position_ids] -> [B, N, D]
    in one kernel (see the module docstring). out: an optional [B, N, D] tensor to write into."""
    op = "patch_embed"
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"{op}: weight must be [D, C/groups, P, P]; got {tuple(weight.shape)}")
    D, c_group, P, _ = weight.shape
    B, rows, cols = _check_pixels(op, pixels, P)
    C = pixels.shape[1]
    if groups < 1 or C % groups or D % groups or c_group != C // groups:
        raise ValueError(f"{op}: weight {tuple(weight.shape)} does not fit {C} channels in {groups} groups "
                         "(C and D must be multiples of groups, weight [D, C/groups, P, P])")
    _check_like_pixels(op, pixels, weight=weight)
    N = rows * cols
    out, flags, pos_strides, pos_embed, position_ids = _epilogue_args(op, "bias", bias, pos_embed, position_ids,
                                                                      out, pixels, B, N, D)
    M = B * N
    if M == 0 or D == 0:
        return out

    d_group = D // groups
    def grid(meta):  # 1-D: (patch tile, group, output tile within the group), output tiles fastest
        return (triton.cdiv(M, meta["BLOCK_M"]) * groups * triton.cdiv(d_group, meta["BLOCK_N"]),)

    _patch_embed_kernel[grid](
        out, pixels, weight, pixels if bias is None else bias, pixels if pos_embed is None else pos_embed,
        pixels if position_ids is None else position_ids,
        M, N, cols, groups, d_group, c_group, size_class(M),
        *pixels.stride(), *weight.stride(), 0 if bias is None else bias.stride(0), *pos_strides, *out.stride(),
        P=P, PP=triton.next_power_of_2(P), HAS_BIAS=bias is not None, **flags, **dot_options(pixels.dtype),
    )
    return out


def _dwsep_split(m_tiles: int, n_tiles: int, device: torch.device) -> int:
    """Programs per row of output tiles: enough for about two programs per SM (each recomputes its patches'
    depthwise part), never more than there are output tiles. Two in the interpreter, so tests cover both a
    split row and a program walking several tiles."""
    if device.type != "cuda":
        return min(2, n_tiles)
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(n_tiles, triton.cdiv(2 * sms, m_tiles)))


def dwsep_patch_embed(pixels: torch.Tensor, dw_weight: torch.Tensor, dw_bias: torch.Tensor | None,
                      pw_weight: torch.Tensor, pw_bias: torch.Tensor | None, pos_embed: torch.Tensor | None,
                      position_ids: torch.Tensor | None, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Depthwise P×P conv (stride P) per channel, pointwise projection pw_weight [D, C], + pw_bias
    + pos_embed[position_ids] -> [B, N, D], in one kernel: the depthwise result never leaves registers."""
    op = "dwsep_patch_embed"
    if dw_weight.dim() != 4 or dw_weight.shape[1] != 1 or dw_weight.shape[2] != dw_weight.shape[3]:
        raise ValueError(f"{op}: dw_weight must be [C, 1, P, P]; got {tuple(dw_weight.shape)}")
    C, _, P, _ = dw_weight.shape
    B, rows, cols = _check_pixels(op, pixels, P)
    if pixels.shape[1] != C or pw_weight.dim() != 2 or pw_weight.shape[1] != C:
        raise ValueError(f"{op}: pixels {tuple(pixels.shape)}, dw_weight {tuple(dw_weight.shape)} and pw_weight "
                         f"{tuple(pw_weight.shape)} disagree on the channels (want [B, C, H, W], [C, 1, P, P], [D, C])")
    _check_like_pixels(op, pixels, dw_weight=dw_weight, pw_weight=pw_weight)
    D = pw_weight.shape[0]
    _check_vector(op, "dw_bias", dw_bias, C, pixels.device)
    N = rows * cols
    out, flags, pos_strides, pos_embed, position_ids = _epilogue_args(op, "pw_bias", pw_bias, pos_embed,
                                                                      position_ids, out, pixels, B, N, D)
    M = B * N
    if M == 0 or D == 0:
        return out

    block_c = min(max(16, triton.next_power_of_2(C)), MAX_BLOCK_C)

    def grid(meta):
        m_tiles, n_tiles = triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(D, meta["BLOCK_N"])
        return m_tiles, (_dwsep_split(m_tiles, n_tiles, pixels.device) if C <= block_c else n_tiles)

    _dwsep_patch_embed_kernel[grid](
        out, pixels, dw_weight, pixels if dw_bias is None else dw_bias, pw_weight,
        pixels if pw_bias is None else pw_bias, pixels if pos_embed is None else pos_embed,
        pixels if position_ids is None else position_ids,
        M, N, cols, C, D, size_class(M),
        *pixels.stride(), dw_weight.stride(0), *dw_weight.stride()[2:], 0 if dw_bias is None else dw_bias.stride(0),
        *pw_weight.stride(), 0 if pw_bias is None else pw_bias.stride(0), *pos_strides, *out.stride(),
        P=P, PP=triton.next_power_of_2(P), BLOCK_C=block_c, ONE_C_BLOCK=C <= block_c,
        HAS_DW_BIAS=dw_bias is not None, HAS_BIAS=pw_bias is not None, **flags, **dot_options(pixels.dtype),
    )
    return out
