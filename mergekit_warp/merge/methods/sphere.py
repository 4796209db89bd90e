"""What the angle-based methods share (nuslerp, multislerp, karcher, model_stock).

Each of them outputs a linear combination Σ c_m·v_m of the vectors it works on (the task vectors
v_m = θ_m − θ_base with a base, else the inputs θ_m), and its coefficients c follow from the Gram matrix
G[i, j] = ⟨v_i, v_j⟩ alone: norms and angles are Gram entries, and every vector the method forms on the
way (a normalised mean, a tangent vector, a Karcher iterate) is itself a combination of the inputs whose
products are again read off G. So a method is a function G (B, M, M) → c (B, M) in fp64, and this module
supplies G, of one of three kinds of vector, and streams the output:

- TENSOR: each tensor flattened (B = 1);
- ROW: each row, i.e. each slice along the last dimension (a 1-D tensor is one row; B = rows);
- COLUMN: each slice along dimension 0 (a 2-D tensor's columns; B = the product of the other dimensions).

Whole tensors larger than a chunk get their Gram from a pass over the tensor when its first chunk is
merged (`engine.gram_pass`; from memory when the engine holds the tensor), columns likewise from a pass
here (`column_grams`); a smaller tensor, and every row (the method sets `rows=True`, so chunks hold
whole rows), from the chunk the write pass reads anyway. Math in
fp32 (task vectors formed in fp32, as the output is), coefficients in fp64, dot products in fp64 (the
pre-pass of whole tensors: fp32 products summed in fp64 per 4096 elements, `math.gram`). With a base
the output is θ_base + Σ c_m·(θ_m − θ_base), task vectors formed first: coefficients can be large on tiny
task vectors (multislerp divides by a norm), and the form (1 − Σc)·θ_base + Σ c·θ_m would cancel them away.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from mergekit_warp.errors import WarpError
from mergekit_warp.merge.methods.base import Context, Settings

if TYPE_CHECKING:
    from torch import Tensor

    from mergekit_warp.io.reader import CheckpointReader
    from mergekit_warp.merge.engine import Combine, Fetch
    from mergekit_warp.merge.methods.base import Param

TENSOR, ROW, COLUMN = "tensor", "row", "column"

Coeffs = Callable[[str, "Tensor"], "Tensor"]
"""(tensor name, G (B, M, M) fp64) → c (B, M) fp64, on G's device."""


def row_length(shape: tuple[int, ...]) -> int:
    """Elements per row (the engine's row-aligned chunks use the same): the last dimension; a 0-D or
    1-D tensor is one row."""
    return shape[-1] if len(shape) > 1 else max(1, math.prod(shape))


def columns(shape: tuple[int, ...]) -> int:
    """Number of vectors along dimension 0: the product of the other dimensions (1 for a 0-D or 1-D tensor)."""
    return math.prod(shape[1:]) if len(shape) > 1 else 1


def read(fetch: Fetch, n_inputs: int, has_base: bool) -> tuple[Tensor | None, Tensor]:
    """The chunk's base (fp32; None without one) and its vectors V (M, n) fp32: the task vectors
    θ_m − θ_base with a base, else the inputs θ_m. Each input is read once."""
    import torch

    first = fetch(0).float()
    if not has_base:
        return None, torch.stack([first, *(fetch(i).float() for i in range(1, n_inputs))])
    v = torch.empty(n_inputs - 1, first.numel(), device=first.device)
    for m in range(1, n_inputs):  # copy_ upcasts the stored dtype into the fp32 row
        v[m - 1].copy_(fetch(m)).sub_(first)
    return first, v


def gram_of(v: Tensor, how: str, shape: tuple[int, ...]) -> Tensor:
    """The fp64 Gram matrices of the vectors in v (M, n): (1, M, M) when v holds a whole tensor (TENSOR),
    (n / row, M, M) per row (ROW), (columns, M, M) per column (COLUMN; v holds whole slices of dim 0)."""
    import torch

    x = v.double()
    if how == TENSOR:
        return (x @ x.T)[None]
    m = x.shape[0]
    if how == ROW:
        y = x.view(m, -1, row_length(shape))
        return torch.einsum("arl,brl->rab", y, y)
    y = x.view(m, -1, columns(shape)).permute(2, 0, 1).contiguous()  # (columns, M, slices): a batched matmul
    return y @ y.transpose(1, 2)


def mix(base: Tensor | None, v: Tensor, c: Tensor, how: str, shape: tuple[int, ...], start: int) -> Tensor:
    """The output chunk, fp32: Σ c_m·v_m, plus the base when there is one. `c` (B, M) as `gram_of` made
    the Gram matrices: one row of coefficients for the tensor, per row of the chunk, or per column
    (elements [start, start + n) of the tensor)."""
    import torch

    n = v.shape[1]
    out = base.clone() if base is not None else torch.zeros(n, device=v.device)
    if how == TENSOR:
        for m, cm in enumerate(c[0].tolist()):
            out.add_(v[m], alpha=cm)
        return out
    cf = c.to(device=v.device, dtype=torch.float32)
    if how == ROW:
        length = row_length(shape)
        for m in range(v.shape[0]):
            out.view(-1, length).addcmul_(v[m].view(-1, length), cf[:, m : m + 1])
        return out
    cols = columns(shape)
    if start % cols == 0 and n % cols == 0:  # whole slices of dim 0 (always so for 2-D tensors)
        for m in range(v.shape[0]):
            out.view(-1, cols).addcmul_(v[m].view(-1, cols), cf[None, :, m])
        return out
    idx = torch.arange(start, start + n, device=v.device) % cols
    for m in range(v.shape[0]):
        out.addcmul_(v[m], cf[idx, m])
    return out


def column_grams(readers: list[CheckpointReader], name: str, ctx: Context) -> Tensor:
    """The Gram matrices of the columns of tensor `name` (columns, M, M), fp64, streamed: chunks of
    whole slices of dimension 0, one input chunk at a time."""
    import torch

    from mergekit_warp.merge.engine import Fetch, check_finite, chunks

    shape = readers[0].infos[name].shape
    cols, m = columns(shape), len(readers) - ctx.has_base
    g = torch.zeros(cols, m, m, dtype=torch.float64, device=ctx.device)
    for start, stop in chunks(readers[0].infos[name].numel, max(1, ctx.chunk // cols) * cols):
        _, v = read(Fetch(readers, name, start, stop, ctx.device), len(readers), ctx.has_base)
        g += gram_of(v, COLUMN, shape)
        del v
    check_finite(g, readers, name, ctx.device, ctx.chunk)
    return g


def gram_combine(
    readers: list[CheckpointReader], ctx: Context, how_of: Callable[[str], str], coeffs: Coeffs
) -> Combine:
    """The Combine of a Gram-based method: `how_of(name)` says which vectors of a tensor the method
    works on (TENSOR, ROW or COLUMN), `coeffs(name, G)` turns their Gram matrices into coefficients.
    Coefficients that need a pass over the whole tensor first are computed once per tensor, when its
    first chunk is merged (from memory when the engine holds the tensor)."""
    from mergekit_warp.merge.engine import gram_pass

    infos = readers[0].infos
    known: dict[str, Tensor] = {}

    def combine(name: str, fetch: Fetch) -> Tensor:
        how = how_of(name)
        numel = infos[name].numel
        if fetch.start == 0 and how != ROW and fetch.stop < numel:  # a pass over the tensor first
            if how == TENSOR:
                kind = "delta" if ctx.has_base else "full"
                g = gram_pass(readers, {name: [name]}, device=ctx.device, chunk=ctx.chunk, full=not ctx.has_base)
                known[name] = coeffs(name, g[name][kind][None])
            else:
                known[name] = coeffs(name, column_grams(readers, name, ctx))
        base, v = read(fetch, len(readers), ctx.has_base)
        if v.shape[1] == 0:  # an empty tensor: nothing to combine
            return v[0]
        if name in known:
            c = known.pop(name) if fetch.stop == numel else known[name]
        else:
            if not (fetch.stop - fetch.start == numel or (how == ROW and fetch.start % row_length(fetch.shape) == 0)):
                raise AssertionError(f"{name}: chunk [{fetch.start}, {fetch.stop}) does not hold whole vectors")
            g = gram_of(v, how, fetch.shape)
            c = coeffs(name, g.cpu() if how == TENSOR else g)
        return mix(base, v, c, how, fetch.shape, fetch.start)

    return combine


def model_weights(p: Param, s: Settings, tensor: str, n_models: int) -> list[float]:
    """The per-model parameter `p` (a `weight`) of each model for `tensor`."""
    return [float(s.get(p, tensor, m)) for m in range(n_models)]


def normalised(method: str, p: Param, w: list[float], tensor: str) -> list[float]:
    """w / Σ w; a WarpError naming the option when the weights sum to zero (nothing to normalise by)."""
    total = sum(w)
    if not math.isfinite(total) or abs(total) <= 1e-9 * max(sum(abs(x) for x in w), 1e-300):
        raise WarpError(
            f"{method}: --{p.name.replace('_', '-')} (parameter {p.name}) values {w} sum to zero for tensor "
            f"{tensor}; they are divided by their sum: give weights with a nonzero sum"
        )
    return [x / total for x in w]


def check_sums(method: str, p: Param, s: Settings, names: list[str], n_models: int, normalise: Param | None) -> None:
    """Before any work: for every tensor whose weights are normalised, refuse weights that sum to zero."""
    for name in names:
        if normalise is None or s.get(normalise, name):
            normalised(method, p, model_weights(p, s, name, n_models), name)
