"""The decode step of a packed Llama in C: one call per decoder block instead of ~25 PyTorch ops.

At batch 1 a 30-layer model spends as long in PyTorch's per-op overhead as in its matrix products
(a profile of SmolLM2-135M on the packed path: ~10 of 22 ms per token). ``nn/csrc/llama_block.c`` runs a
whole block (RMSNorm fused with the activations' Q8 quantization, Q/K/V in one integer GEMV, RoPE, the
KV-cache write, GQA attention, the output projection and residual, RMSNorm, gate and up in one GEMV,
SwiGLU, the down projection and residual) on the same packed blocks and integer kernels as
``PackedLinear(impl="int8")`` (or ``"int8r"`` / ``"int8x2"``: residual Q8 blocks, ``LlamaBlock.act_resid``); the
final norm is fused into the head's quantization too.

``DecoderLM.forward`` hands its blocks to the native step when ``NativeStep.accepts`` the call: no
gradient, float32 on CPU, a ``StaticKVCache`` (float32, or float16: ``load(kv_dtype="float16")``, written
rounded and read back exactly in C), an optional (B, S) key mask, and every block still made of the
PackedLinears (one integer impl for all, no bias) the step was built from: a LoRA wrapper, another ``impl`` or a
replaced layer sends the call back to the eager blocks, which stay the reference (tested: logits within 1e-3 of the
eager int8 blocks, the same greedy text on the real model). Prefill runs here too, in chunks of
``CHUNK_ROWS`` rows through every layer (each chunk's queries find the earlier chunks' keys in the cache):
a row's numbers depend only on its own inputs and the cache, never on how many rows share a call, so a
sequence decodes to the same bits alone or in any batch.

``enable_native_step_(model)`` attaches it where the kernel builds and the model qualifies, and says why not
otherwise; ``load(packed=True)`` calls it.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache

import torch
from torch import nn

from llmlab.models.decoder import DecoderBlock
from llmlab.nn.attention import Attention
from llmlab.nn.cpu_kernels import CSRC, KernelBuild, best_variant, build_kernel, kernel_threads
from llmlab.nn.kv_cache import StaticKVCache
from llmlab.nn.mlp import SwiGLU
from llmlab.nn.norm import RMSNorm
from llmlab.nn.packed_linear import ACT_RESIDUAL, PackedLinear, kernel_status, tensor_version
from llmlab.nn.packed_linear import kernel as packed_kernel

CHUNK_ROWS = 128  # rows (B * T) per C call; a longer input goes in chunks of whole positions (chunked prefill)

_I64, _PTR, _INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int


class LlamaBlockC(ctypes.Structure):
    """Mirror of ``LlamaBlock`` in llama_block.c: the packed weights' pointers and the block's sizes."""

    _fields_ = [("n_qkv", _INT), ("kinds_qkv", _INT * 3), ("w_qkv", _PTR * 3), ("rows_qkv", _I64 * 3),
                ("kind_o", _INT), ("w_o", _PTR),
                ("n_up", _INT), ("kinds_up", _INT * 2), ("w_up", _PTR * 2), ("rows_up", _I64 * 2),
                ("kind_down", _INT), ("w_down", _PTR),
                ("attn_norm", _PTR), ("ffn_norm", _PTR),
                ("dim", _I64), ("n_heads", _I64), ("n_kv_heads", _I64), ("head_dim", _I64), ("ffn_dim", _I64),
                ("eps", ctypes.c_float), ("act_resid", ctypes.c_float)]


# llama_block(w, x, B, T, cos, sin, k_cache, v_cache, kv_half, max_len, start, key_mask, mask_stride, nthreads)
BLOCK_ARGTYPES = [ctypes.POINTER(LlamaBlockC), _PTR, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _INT, _I64, _I64, _PTR, _I64,
                  _INT]
KV_DTYPES = (torch.float32, torch.float16)  # the caches the C blocks read and write
# norm_qlinear(kind, x, norm, eps, w, y, M, N, K, nthreads, resid)
HEAD_ARGTYPES = [_INT, _PTR, _PTR, ctypes.c_float, _PTR, _PTR, _I64, _I64, _I64, _INT, ctypes.c_float]


@lru_cache(maxsize=1)
def kernel_build() -> KernelBuild:
    """llama_block.c for the best variant this CPU runs (built once per process; never raises)."""
    build = build_kernel(CSRC / "llama_block.c", "llama_block", BLOCK_ARGTYPES, best_variant())
    if build.fn is not None:
        head = build.lib.norm_qlinear
        head.restype, head.argtypes = ctypes.c_int, HEAD_ARGTYPES
        build.lib.float_to_half_rows.restype = None
        build.lib.float_to_half_rows.argtypes = [_PTR, _PTR, _I64]
    return build


def _parts(block: nn.Module) -> tuple | None:
    """The modules one native block call stands for, or None when the block is not a plain packed Llama block."""
    attn, mlp = block.self_attn, getattr(block, "mlp", None)
    if type(block) is not DecoderBlock or type(attn) is not Attention or type(mlp) is not SwiGLU:
        return None
    linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    norms = (block.input_layernorm, block.post_attention_layernorm)
    if not all(type(m) is PackedLinear and m.impl == linears[0].impl in ACT_RESIDUAL and m.bias is None
               for m in linears):
        return None
    if not all(type(n) is RMSNorm for n in norms):
        return None
    return linears + norms


class NativeStep:
    """The C blocks of one model. Built from the model as it is; ``accepts`` checks it still is."""

    def __init__(self, model: nn.Module, build: KernelBuild):
        cfg = model.config
        self.fn, self.head_fn = build.fn, build.lib.norm_qlinear
        self.linears: list[PackedLinear] = []  # every block's seven, checked for impl ``self.impl`` on each call
        self.impl = model.layers[0].self_attn.q_proj.impl  # "int8", "int8r" or "int8x2", the same in every block
        self.structs: list[LlamaBlockC] = []
        for block in model.layers:
            parts = _parts(block)
            if parts is None:
                raise ValueError("a block is not a packed Llama block")
            q, k, v, o, gate, up, down, n1, n2 = parts
            s = LlamaBlockC()
            s.n_qkv, s.n_up = 3, 2
            for i, m in enumerate((q, k, v)):
                s.kinds_qkv[i], s.w_qkv[i], s.rows_qkv[i] = m.ggml_type, m.repacked().data_ptr(), m.out_features
            for i, m in enumerate((gate, up)):
                s.kinds_up[i], s.w_up[i], s.rows_up[i] = m.ggml_type, m.repacked().data_ptr(), m.out_features
            s.kind_o, s.w_o = o.ggml_type, o.repacked().data_ptr()
            s.kind_down, s.w_down = down.ggml_type, down.repacked().data_ptr()
            s.attn_norm, s.ffn_norm = n1.weight.data_ptr(), n2.weight.data_ptr()
            s.dim, s.n_heads, s.n_kv_heads, s.head_dim = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
            s.ffn_dim, s.eps, s.act_resid = cfg.ffn_dim, n1.eps, ACT_RESIDUAL[self.impl]
            if q.impl != self.impl:
                raise ValueError("the blocks' packed linears mix integer impls")
            self.linears.extend(parts[:7])
            self.structs.append(s)
        self.head = (model.norm, model.lm_head, getattr(model.lm_head, "packed", None), model.norm.weight)
        self.watch = self._watch(model)
        # the structs point into each layer's repacked copy, made from ``packed`` as it is now (version counter)
        self.versions = [(m.packed, tensor_version(m.packed)) for m in self.linears]

    @staticmethod
    def _watch(model: nn.Module) -> list[tuple[dict, str, object]]:
        """(dict, key, object) for every module and tensor a block call depends on: replacing any (a LoRA
        wrapper, ``model.to``, a new buffer) changes one of these entries."""
        watch = [(model._modules, "layers", model.layers)]
        for i, block in enumerate(model.layers):
            watch.append((model.layers._modules, str(i), block))
            for path in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm",
                         "post_attention_layernorm"):
                parent = block
                for name in path.split("."):
                    watch.append((parent._modules, name, parent._modules[name]))
                    parent = parent._modules[name]
                if isinstance(parent, PackedLinear):
                    watch.append((parent._buffers, "packed", parent._buffers["packed"]))
                    watch.append((parent.__dict__, "bias", None))
                else:
                    watch.append((parent._parameters, "weight", parent._parameters["weight"]))
        return watch

    def __deepcopy__(self, memo):  # a copy of the model has other tensors: it gets no native step
        return None

    def unchanged(self, model: nn.Module) -> bool:
        """The blocks are the modules (and tensors) the structs point into, still of impl ``self.impl``. Reads the
        modules' own dicts (``_modules``, ``_parameters``, ``_buffers``), not attributes: ~50 µs for 30 blocks
        instead of ~1.4 ms through ``nn.Module.__getattr__``."""
        return (all(d.get(k) is v for d, k, v in self.watch) and all(m.impl == self.impl for m in self.linears)
                and all(tensor_version(t) == v for t, v in self.versions))

    def ready(self, model: nn.Module, cache) -> bool:
        """The model and cache half of ``accepts``, known before the forward embeds its input (DecoderLM.forward
        hands the threads to the kernels on it)."""
        return (not torch.is_grad_enabled()
                and model._modules is self.watch[0][0]  # not a shallow copy with other layers (a layer-skip draft)
                and type(cache) is StaticKVCache and cache.k.dtype in KV_DTYPES and cache.v.dtype == cache.k.dtype
                and cache.k.shape[0] == len(self.structs) and cache.k.is_contiguous()
                and self.unchanged(model))

    def fits(self, x: torch.Tensor, cache, attention_mask: torch.Tensor | None) -> bool:
        """The input half of ``accepts``: float32 rows on the CPU, one cache row each, a (B, S) key mask or none."""
        return (x.dtype == torch.float32 and x.device.type == "cpu" and cache.k.shape[1] == x.shape[0]
                and (attention_mask is None or attention_mask.dim() == 2))

    def accepts(self, model: nn.Module, x: torch.Tensor, cache, attention_mask: torch.Tensor | None) -> bool:
        return self.ready(model, cache) and self.fits(x, cache, attention_mask)

    def blocks(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: StaticKVCache, start: int,
               attention_mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, dim) after every block, the cache's k/v written at [start, start + T)."""
        B, T, _ = x.shape
        if start + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions, asked to write up to {start + T}")
        x = x.contiguous().clone()  # (B, T, dim), updated in place by C
        cos, sin = (r.float().expand(B, T, -1).contiguous() for r in rope)  # (B, T, head_dim)
        mask = None if attention_mask is None else attention_mask.to(torch.uint8).contiguous()  # (B, S)
        mask_ptr, mask_stride = (None, 0) if mask is None else (mask.data_ptr(), mask.shape[1])
        k_step = cache.k.stride(0) * cache.k.element_size()  # bytes per layer
        v_step = cache.v.stride(0) * cache.v.element_size()
        half = int(cache.k.dtype == torch.float16)
        k0, v0 = cache.k.data_ptr(), cache.v.data_ptr()
        threads = kernel_threads()
        step = max(1, CHUNK_ROWS // B)  # positions per chunk
        for t0 in range(0, T, step):
            t1 = min(T, t0 + step)
            xc, cc, sc = (t[:, t0:t1].contiguous() for t in (x, cos, sin))  # (B, t1 - t0, ...)
            for i, s in enumerate(self.structs):
                rc = self.fn(ctypes.byref(s), xc.data_ptr(), B, t1 - t0, cc.data_ptr(), sc.data_ptr(),
                             k0 + i * k_step, v0 + i * v_step, half, cache.max_len, start + t0, mask_ptr, mask_stride,
                             threads)
                if rc != 0:
                    raise RuntimeError(f"llama_block failed with code {rc} in layer {i}")
            if t1 - t0 < T:
                x[:, t0:t1] = xc
            else:
                x = xc
        return x

    def logits(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """norm(x) @ head^T (B, T, V) in one C call when the head is a packed int8 layer, else None."""
        norm, head = model.norm, model.lm_head
        now = (norm, head, getattr(head, "packed", None), getattr(norm, "weight", None))
        if any(a is not b for a, b in zip(now, self.head, strict=True)) or type(head) is not PackedLinear \
                or head.impl not in ACT_RESIDUAL or head.bias is not None:
            return None
        B, T, D = x.shape
        y = torch.empty(B, T, head.out_features)
        rc = self.head_fn(head.ggml_type, x.data_ptr(), norm.weight.data_ptr(), norm.eps, head.repacked().data_ptr(),
                          y.data_ptr(), B * T, head.out_features, D, kernel_threads(), ACT_RESIDUAL[head.impl])
        if rc != 0:
            raise RuntimeError(f"norm_qlinear failed with code {rc}")
        return y


def enable_native_step_(model: nn.Module) -> str:
    """Attach a NativeStep to a packed Llama ``DecoderLM``; returns one line saying which step runs and why."""
    model.native_step = None
    cfg = getattr(model, "config", None)
    if cfg is None or cfg.arch != "llama" or cfg.n_experts:
        return "eager step: the native step covers dense Llama decoders"
    if cfg.head_dim % 2 or any(n % 32 for n in (cfg.dim, cfg.n_heads * cfg.head_dim, cfg.ffn_dim)):
        return "eager step: widths are not multiples of 32"
    if any(_parts(b) is None for b in model.layers):
        return "eager step: not every block is packed integer (int8 / int8r / int8x2) linears without bias and RMSNorm"
    build = kernel_build()
    if build.fn is None:
        return f"eager step: {build.status}"
    if packed_kernel("int8") is None:  # it makes the layers' repacked copies
        return f"eager step: {kernel_status()}"
    model.native_step = NativeStep(model, build)
    return f"native step: {build.status}"
