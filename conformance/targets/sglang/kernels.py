"""CPU stand-ins for the three `sgl_kernel.kvcacheio` copies SGLang's host tier uses with
io_backend="direct" and the "page_first_direct" layout, for machines without the CUDA kernel
package (sglang-kernel: a 383 MB wheel, CUDA only). They copy the same elements the kernels do,
with torch indexing; the tree logic under test is unchanged. On a GPU with sgl_kernel, the real
kernels are used and these are not installed.

Layouts: device pools are per layer, [tokens, ...]; page-first host buffers are
[pages, layers, page_size, ...] (the mamba host pool: page_size 1).
"""

from __future__ import annotations

import torch


def transfer_kv_direct(src_layers, dst_layers, src_indices, dst_indices, page_size):
    for s, d in zip(src_layers, dst_layers, strict=True):
        d[dst_indices.to(d.device)] = s[src_indices.to(s.device)].to(d.device)


def _pf(t: torch.Tensor, page_size: int) -> torch.Tensor:
    return t.view(t.shape[0], t.shape[1], page_size, -1)


def transfer_kv_all_layer_direct_lf_pf(src_ptrs, dst_ptrs, src_indices, dst_indices, page_size):
    """Per-layer device buffers (k layers, then v layers) -> page-first host buffers."""
    n_layers = len(src_ptrs) // len(dst_ptrs)
    di = dst_indices.to(dst_ptrs[0].device)
    for j, dst in enumerate(dst_ptrs):
        d = _pf(dst, page_size)
        for layer in range(n_layers):
            src = src_ptrs[j * n_layers + layer]
            rows = src.view(src.shape[0], -1)[src_indices.to(src.device)].to(d.device)
            d[di // page_size, layer, di % page_size] = rows


def transfer_kv_per_layer_direct_pf_lf(src_ptrs, dst_ptrs, src_indices, dst_indices, layer_id, page_size):
    """Page-first host buffers -> one layer's device buffers."""
    si = src_indices.to(src_ptrs[0].device)
    for src, dst in zip(src_ptrs, dst_ptrs, strict=True):
        rows = _pf(src, page_size)[si // page_size, layer_id, si % page_size]
        dst.view(dst.shape[0], -1)[dst_indices.to(dst.device)] = rows.to(dst.device)


FUNCS = {f.__name__: f for f in (transfer_kv_direct, transfer_kv_all_layer_direct_lf_pf, transfer_kv_per_layer_direct_pf_lf)}


def install(*modules) -> list[str]:
    """Give each module the stand-ins it lacks (it imports them only under CUDA) or got from the
    shim (on a GPU without sgl_kernel)."""
    from .shim import Stub

    done = []
    for m in modules:
        for name, f in FUNCS.items():
            if not hasattr(m, name) or isinstance(getattr(m, name), Stub):
                setattr(m, name, f)
                done.append(f"{m.__name__}.{name}")
    return done
