"""spconv 2.3.8 as the detector uses it: every sparse convolution on ``ConvAlgo.Native``, and a usable CPU backward.

**Why Native on the GPU too** (``use_native_algorithm``, applied by the detector to every model it builds). The GPU
wheels default to ``ConvAlgo.MaskImplicitGemm``. Measured on an H200 (spconv-cu118 2.3.8, the demo checkpoint, 13 real
KITTI frames + 40 generated scenes, IEEE fp32; ``bench/engine_agreement.py``, ``docs/results/
engine_agreement_fp32_native_all_demo_h200.json``): with the implicit-GEMM algorithms the eager model run twice on the
same frame gives different detections (76 of 873 matched boxes more than 1 cm apart and below BEV IoU 0.99, up to
0.73 m), whereas each single submanifold convolution is reproducible and right to 3e-7 against a dense convolution
(``bench/spconv_probe.py``), so the variation comes from the strided / inverse convolutions. The module outputs of two runs
(``bench/determinism.py``) first differ at ResVC's image-plane convolution, whose input adds two strided convs
(``d3_conv1`` and ``resnet_layer``) row by row: with hash-ordered outputs that adds different voxels. ResVC now aligns
the rows by voxel (``resvc.align_rows``); whether that alone makes the implicit-GEMM algorithms reproducible is not yet
measured, so the algorithm stays Native. With every convolution on
Native: 0 of 873 (largest difference 0.4 mm), and the static engine agrees with it on 872 of 873. Native is also the
only algorithm of the CPU build, so the CPU and the GPU now run the same algorithm. The weights are KRSC for every
algorithm in spconv 2.3 (``ALL_WEIGHT_IS_KRSC``), so checkpoints are unaffected.

**CPU backward.**

Exact failure (spconv 2.3.8 CPU-only wheel, torch CPU build; ``ConvAlgo.Native`` is the only algorithm a CPU-only
build allows, ``conv.py`` asserts it):

* ``SubMConv{2,3}d``, ``SparseConv{2,3}d`` and ``SparseInverseConv{2,3}d`` all route their backward through
  ``spconv/pytorch/functional.py`` (``SubMConvFunction`` / ``SparseConvFunction`` / ``SparseInverseConvFunction``
  ``.backward``) -> ``spconv.pytorch.ops.indice_conv_backward``.
* In that function the C++ GEMM path is skipped (``GEMM_CPP is None`` in a CPU-only build) and the Python path calls
  ``stream = get_current_stream()`` unconditionally (ops.py line 1200) *before* it branches on
  ``features.is_cuda`` to its CPU implementation (gather_cpu -> ``torch.mm`` per kernel offset ->
  ``scatter_add_cpu``; the stream is never used on that branch). ``get_current_stream``
  (``spconv/pytorch/cppcore.py`` line 99) is ``torch.cuda.current_stream().cuda_stream``, which on a CPU torch
  raises ``AssertionError: Torch not compiled with CUDA enabled`` (from ``torch.cuda._lazy_init``).
  Every one of the four conv types fails at this same line; their forwards never call it on CPU
  (``indice_conv`` sets ``stream = 0`` for CPU tensors).
* spconv's CPU backward kernels themselves exist and are correct (test/test_spconv_cpu_backward.py compares features
  and weight gradients with a dense torch conv reference, float32 and float64), so no re-implementation is needed.

Fix (narrowest point): ``enable_cpu_backward()`` rebinds the name ``get_current_stream`` *inside*
``spconv.pytorch.ops`` to a wrapper that returns stream 0 (the value spconv itself uses for CPU tensors) when CUDA is
not available, and delegates to the original getter otherwise. It therefore only changes calls that would have raised;
GPU behaviour is untouched. Nothing in site-packages is modified; the call is idempotent and thread-safe.

Not addressed here (documented for callers):

* Bias in *eval* mode: ``SparseConvolution._conv_forward`` passes the bias into ``ops.indice_conv`` only when
  ``training`` is False, and its CPU path asserts ``"cpu don't support act and bias"`` (ops.py line 876). In training
  mode spconv adds the bias in Python after the conv, so training with ``bias=True`` works on CPU. (The detector's
  sparse convs all use ``bias=False``.)
* spconv's CPU forward is only trusted with ``torch.set_num_threads(1)`` (project-wide rule); the backward uses the
  same gather/scatter-add kernels, so apply the same rule.
"""
from __future__ import annotations

import threading

import torch

__all__ = ["ALGORITHM_NAMES", "enable_cpu_backward", "cpu_backward_enabled", "set_algorithm",
           "use_native_algorithm"]

_LOCK = threading.Lock()
_MARK = "_cmfiou_cpu_safe"


def _make_wrapper(original):
    def get_current_stream():
        if not torch.cuda.is_available():
            return 0  # spconv's own value for CPU tensors; the CPU branch never uses it
        return original()

    get_current_stream.__wrapped__ = original
    get_current_stream.__doc__ = "cmfiou spconv_compat: stream 0 when CUDA is unavailable, else the original getter."
    setattr(get_current_stream, _MARK, True)
    return get_current_stream


def cpu_backward_enabled() -> bool:
    """True when ``enable_cpu_backward()`` has patched ``spconv.pytorch.ops``."""
    from spconv.pytorch import ops

    return getattr(ops.get_current_stream, _MARK, False)


def enable_cpu_backward() -> bool:
    """Patch ``spconv.pytorch.ops.get_current_stream`` so CPU sparse-conv backward works. Idempotent.

    Returns True if this call applied the patch, False if it was already applied.
    """
    from spconv.pytorch import ops

    with _LOCK:
        if getattr(ops.get_current_stream, _MARK, False):
            return False
        ops.get_current_stream = _make_wrapper(ops.get_current_stream)
        return True


ALGORITHM_NAMES = ("native", "implicit_gemm")


def set_algorithm(model: torch.nn.Module, algo) -> int:
    """Put every spconv convolution of ``model`` on ``algo``: a ``spconv.core.ConvAlgo`` or a name of
    :data:`ALGORITHM_NAMES` (``native``; ``implicit_gemm`` = ``MaskImplicitGemm``, the GPU wheels' default, GPU builds
    only). Weights need no change (KRSC for every algorithm). Returns the number of convolutions whose algorithm
    changed."""
    from spconv.core import ConvAlgo
    from spconv.pytorch.conv import SparseConvolution

    if isinstance(algo, str):
        names = dict(zip(ALGORITHM_NAMES, (ConvAlgo.Native, ConvAlgo.MaskImplicitGemm)))
        if algo not in names:
            raise ValueError(f"spconv algorithm must be one of {', '.join(ALGORITHM_NAMES)}, got {algo!r}")
        algo = names[algo]

    n = 0
    for m in model.modules():
        if isinstance(m, SparseConvolution) and m.algo != algo:
            m.algo = algo
            n += 1
    return n


def use_native_algorithm(model: torch.nn.Module) -> int:
    """Put every spconv convolution of ``model`` on ``ConvAlgo.Native`` (see the module docstring: the GPU's
    implicit-GEMM algorithms are not reproducible in this model). Returns the number of convolutions switched."""
    return set_algorithm(model, "native")
