"""Gram matrices, their (U-)centring and HSIC terms: the shared math of every CKA in the workbench.

Everything is plain differentiable torch, so the probes (float64 accumulators) and the CKA loss
(float32 autograd) use the same code. Conventions follow Kornblith et al. (2019), "Similarity of
Neural Network Representations Revisited" (https://arxiv.org/abs/1905.00414), and the unbiased HSIC
of Song et al. (2012) in the U-centring form used by Nguyen, Raghu & Kornblith (2021).

Range: the centred features are multiplied by a power of two before every product, so that their
largest magnitude lies in [0.5, 1). That is exact in binary floating point (the digits are unchanged),
so normal-range values are bit-identical to the plain products, while features around 1e-23 (float32)
or 1e±160 (float64) neither underflow nor overflow. Dead layers: a (U-)centred Gram is taken as zero
when its Frobenius norm is at most ``DEAD_TOLERANCE × eps × trace(K)`` (eps of the dtype the Gram was
formed in; trace(K) = Σᵢ‖xᵢ − x̄‖² for the linear kernel, n for the RBF kernel); CKA is then undefined.
"""
from __future__ import annotations

import math
import numbers

import torch

KERNELS = ("linear", "rbf")
DEAD_TOLERANCE = 100.0
"""Rounding allowance for a zero (U-)centred Gram, in units of ``eps × trace``: measured rounding of truly
zero Grams (constant layers, one non-zero sample) stays below 1 unit; random features of width d lie near
``1 / (eps·sqrt(d))`` units (≈ 3·10⁴ for float32 at d = 65,536), far above it."""
_EXPONENT_BOUND = {torch.float64: 1000}  # |exponent| clamp that keeps 2**exponent a normal number
_DEFAULT_BOUND = 100  # float32: 2**±100 is normal and maps every float32 magnitude into range


def _power_of_two(exponent: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``2**exponent`` (0-dim, on exponent's device), built from its bits so that it is exact everywhere."""
    if dtype == torch.float64:
        return ((exponent.to(torch.int64) + 1023) << 52).view(torch.float64)
    return ((exponent.to(torch.int32) + 127) << 23).view(torch.float32)


def binary_exponent(values: torch.Tensor) -> torch.Tensor:
    """The 0-dim int32 exponent e with ``max |values| ∈ [2**(e-1), 2**e)`` (0 for all-zero values), clamped
    to ±100 (float32) or ±1000 (float64) so that ``2**-e`` is a normal number of that dtype.

    Example:
        >>> import torch
        >>> binary_exponent(torch.tensor([0.3, -5.0])).item()
        3
    """
    return exponent_and_finite(values)[0]


def exponent_and_finite(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(e, finite)``: :func:`binary_exponent` and a 0-dim bool, False when any value is NaN or ±Inf, from
    one pass over the values and without a host sync (NaN propagates through the min / max).

    Example:
        >>> import torch
        >>> [flag.item() for _, flag in map(exponent_and_finite, (torch.ones(3), torch.tensor([1.0, torch.nan])))]
        [True, False]
    """
    bound = _EXPONENT_BOUND.get(values.dtype, _DEFAULT_BOUND)
    low, high = torch.aminmax(values.detach())  # one pass, no |values| copy
    exponent = torch.frexp(torch.maximum(high, -low)).exponent.clamp(-bound, bound)
    return exponent, torch.isfinite(low) & torch.isfinite(high)


def unit_scaled(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values × 2**-e, e)`` with e from :func:`binary_exponent`: the largest magnitude moved into
    [0.5, 1) exactly (a power of two changes no digit), computed on the values' device without a host sync.

    Example:
        >>> import torch
        >>> scaled, exponent = unit_scaled(torch.tensor([3.0, -1.0], dtype=torch.float64) * 2.0**-120)
        >>> scaled.tolist(), exponent.item()
        ([0.75, -0.25], -118)
    """
    exponent = binary_exponent(values)
    return values * _power_of_two(-exponent, values.dtype), exponent


def centred_features(features: torch.Tensor) -> torch.Tensor:
    """``[n, d]`` features with each column's mean removed.

    Half precision is computed in float32. Integers and bools are centred exactly: shifted by their
    column minimum in int64 (exact while a column spans less than 2**63), then centred in float64 —
    a float32 cast first would round activations with large offsets (2**40) beyond repair.

    Example:
        >>> import torch
        >>> centred_features(torch.tensor([[2**40 + 1], [2**40 + 3]]))
        tensor([[-1.],
                [ 1.]], dtype=torch.float64)
    """
    if not features.is_floating_point():
        whole = features.to(torch.int64)
        shifted = (whole - whole.amin(dim=0, keepdim=True)).to(torch.float64)
        return shifted - shifted.mean(dim=0, keepdim=True)
    if features.dtype in (torch.float16, torch.bfloat16):
        features = features.float()
    return features - features.mean(dim=0, keepdim=True)


def scaled_centred_gram(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G, e)``: the Gram of the centred ``[n, d]`` features times ``4**-e``, so ``X̃ X̃ᵀ = G · 4**e``.

    The centred features are scaled by the power of two that puts the raw features' largest magnitude in
    [0.5, 1) before the product (so |scaled centred| < 2), so G neither under- nor overflows and has the
    plain product's digits. The product runs in the
    features' dtype (float32 for half precision and for integers, whose centring is exact in float64).

    Example:
        >>> import torch
        >>> gram, exponent = scaled_centred_gram(torch.tensor([[1e-30], [3e-30]]))
        >>> f"{gram[0, 0].item() * 4.0 ** exponent.item():.4g}"  # (1e-30)², beyond float32's range
        '1e-60'
    """
    gram, exponent, _ = checked_centred_gram(features)
    return gram, exponent


class Workspace:
    """One reusable buffer for the centred features of a stream of layers (see :func:`checked_centred_gram`).

    A fresh ``[n, d]`` tensor per layer costs a page fault per 4 KiB on the CPU, where large blocks go back to
    the OS when freed (W1, ``benchmarks/cka_matrix.py --against`` the commit before the buffer: 342k minor
    faults per ``cka_matrix`` run without it, 138k with it). The buffer grows to the largest layer and is
    reused, so a caller must be done with one view before taking the next.

    Example:
        >>> import torch
        >>> workspace = Workspace()
        >>> first, second = workspace.take((4, 8), torch.float32, "cpu"), workspace.take((2, 3), torch.float32, "cpu")
        >>> first.data_ptr() == second.data_ptr(), tuple(second.shape)
        (True, (2, 3))
    """

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """A ``shape`` view of the buffer (uninitialised), reallocated only when it is too small or of another
        dtype or device."""
        numel = math.prod(shape)
        buffer = self._buffer
        if buffer is None or buffer.dtype != dtype or buffer.device != torch.device(device) or buffer.numel() < numel:
            self._buffer = None  # the old buffer goes before the new one is made
            buffer = self._buffer = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel].view(shape)


def checked_centred_gram(
    features: torch.Tensor, precision: str = "full", workspace: Workspace | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(G, e, finite)``: :func:`scaled_centred_gram` and a 0-dim bool, False when a feature is NaN or ±Inf,
    all computed on the features' device with no host sync (the streaming probes read the flag later).

    A float32 column whose sum overflows (features near float32's maximum) is left uncentred here: its
    offset cancels exactly in the later (U-)centring of the Gram, and the scaled product cannot overflow.
    ``precision="bf16"`` rounds the centred, scaled features to bfloat16 (as the centring writes them) and
    returns a float32 G from their product (see :data:`PRECISIONS`); the default keeps the features' dtype.
    With a :class:`Workspace` the centred features are written into its buffer (no autograd then), not into
    a fresh tensor: the values are the same.

    Example:
        >>> import torch
        >>> gram, exponent, finite = checked_centred_gram(torch.tensor([[1.0], [3.0]]))
        >>> gram.tolist(), exponent.item(), finite.item()
        ([[0.0625, -0.0625], [-0.0625, 0.0625]], 2, True)
    """
    check_precision(precision)
    product_dtype = torch.bfloat16 if precision == "bf16" else None
    if not features.is_floating_point():
        centred, exponent = unit_scaled(centred_features(features))
        centred = centred.to(product_dtype or torch.float32)  # exact centring done; the product runs fast
        return gram_product(centred), exponent, torch.ones((), dtype=torch.bool, device=features.device)
    if features.dtype in (torch.float16, torch.bfloat16):
        features = features.float()
    # the exponent of the raw values bounds the centred ones (|x − x̄| ≤ 2 max|x|); (x − x̄)·2**-e in one
    # fused pass has the same digits as the plain centring, so this costs one pass more than no scaling
    exponent, finite = exponent_and_finite(features)
    scale = _power_of_two(-exponent, features.dtype)
    shift = features.mean(dim=0, keepdim=True) * -scale
    shift = torch.where(torch.isfinite(shift), shift, 0.0)
    if workspace is None and product_dtype is None:
        centred = torch.addcmul(shift, features, scale)  # differentiable: the CKA loss comes this way
    else:  # into memory already mapped, and as bfloat16 by the centring itself (half the cost of a cast)
        dtype = product_dtype or features.dtype
        out = (torch.empty_like(features, dtype=dtype) if workspace is None
               else workspace.take(features.shape, dtype, features.device))
        centred = torch.addcmul(shift, features, scale, out=out)
    return gram_product(centred), exponent, finite


PRECISIONS = ("full", "bf16")
"""Precisions of the Gram products. ``"full"`` (default): the features' dtype (float32 products for float32,
half and integer features, float64 for float64), within 1e-8 of float64 on real networks' features.
``"bf16"`` (opt-in): the centred features rounded to bfloat16 (8 significant bits) and multiplied on the
bfloat16 units (CPU AMX, GPU tensor cores) with float32 accumulation; the CPU's product also rounds the
Gram to bfloat16. Measured error of the CKA against float64: about 1e-4 at 64 samples a batch, 2e-5 at 200,
3e-3 at 8 (see docs/similarity.md)."""


def check_precision(precision: object) -> None:
    """Raise a ``ValueError`` naming the choices unless ``precision`` is one of :data:`PRECISIONS`.

    Example:
        >>> check_precision("bf16")
        >>> check_precision("tf32")
        Traceback (most recent call last):
        ...
        ValueError: precision must be one of ('full', 'bf16'), got 'tf32'
    """
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


SYMMETRIC_MIN_SAMPLES = 512
SYMMETRIC_MIN_WIDTH_RATIO = 8
""":func:`gram_product` computes only the upper block triangle of a 2 × 2 split (3/4 of the MACs) when
n ≥ ``SYMMETRIC_MIN_SAMPLES`` and d ≥ ``SYMMETRIC_MIN_WIDTH_RATIO · n``: the shapes where it measured faster
than the full BLAS product (2-core CPU, float32; see reports/results/cka_benchmark.md). Smaller products
lose more to the three smaller calls than the quarter of the MACs saves."""


def uses_symmetric_product(n: int, d: int) -> bool:
    """Whether :func:`gram_product` takes the blocked symmetric route for ``[n, d]`` features (by shape only).

    Example:
        >>> uses_symmetric_product(200, 32768), uses_symmetric_product(1024, 32768)
        (False, True)
    """
    return n >= SYMMETRIC_MIN_SAMPLES and d >= SYMMETRIC_MIN_WIDTH_RATIO * n


def gram_product(features: torch.Tensor) -> torch.Tensor:
    """``X Xᵀ`` of ``[n, d]`` features; on the blocked route (:func:`uses_symmetric_product`) the off-diagonal
    block is computed once and mirrored. Bfloat16 features give a float32 Gram of their product.

    Example:
        >>> import torch
        >>> x = torch.randn(512, 4096, dtype=torch.float64)
        >>> torch.allclose(gram_product(x), x @ x.T, rtol=1e-12, atol=1e-9)
        True
    """
    n, d = features.shape
    if features.dtype == torch.bfloat16:
        if features.device.type == "cuda":  # float32 accumulation and output on the tensor cores
            return torch.mm(features, features.T, out_dtype=torch.float32)
        return (features @ features.T).float()  # the CPU's bfloat16 product gives a bfloat16 Gram
    if not uses_symmetric_product(n, d):
        return features @ features.T
    half = (n + 1) // 2
    top, bottom = features[:half], features[half:]
    gram = features.new_empty(n, n)
    gram[:half, :half] = top @ top.T
    gram[half:, half:] = bottom @ bottom.T
    corner = top @ bottom.T
    gram[:half, half:] = corner
    gram[half:, :half] = corner.T
    return gram


def centred_gram(features: torch.Tensor) -> torch.Tensor:
    """Linear Gram ``X Xᵀ`` of ``[n, d]`` features after centring each feature column.

    Centring first is what keeps float32 exact: a large common offset (deep ReLU layers) would
    otherwise swamp the Gram entries. Half precision is computed in float32, integers exactly in float64
    (see :func:`centred_features`). The Gram is in the features' own units, so it can under- or overflow
    at extreme magnitudes: use :func:`scaled_centred_gram` where only ratios matter.

    Example:
        >>> import torch
        >>> x = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
        >>> centred_gram(x)
        tensor([[ 2., -2.],
                [-2.,  2.]])
    """
    centred = centred_features(features)
    return centred @ centred.T


def normalised_gram(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G, E)``: the centred Gram of features of any finite magnitude, ``X̃ X̃ᵀ = G · 4**E``.

    Like :func:`scaled_centred_gram`, with the raw features also scaled by a power of two before they
    are centred, so that a column mean of values near the dtype's maximum does not overflow. For the
    scale-invariant uses (CKA); an RBF ``sigma`` in the features' units becomes ``sigma · 2**-E``.

    Example:
        >>> import torch
        >>> gram, exponent = normalised_gram(torch.tensor([[1e300], [-1e300]], dtype=torch.float64))
        >>> torch.isfinite(gram).all().item(), exponent.item()  # (±1e300)² is far beyond float64's range
        (True, 997)
    """
    prescaled, pre_exponent = unit_scaled(features)
    gram, exponent = scaled_centred_gram(prescaled)
    return gram, pre_exponent + exponent


def check_rbf_settings(threshold: object, sigma: object) -> None:
    """Refuse an RBF ``threshold`` or ``sigma`` that is not a finite positive number (``sigma`` may be None).

    Example:
        >>> check_rbf_settings(0.5, None)
        >>> check_rbf_settings(0.0, None)
        Traceback (most recent call last):
        ...
        ValueError: threshold must be a finite positive number (σ = threshold × sqrt(median squared distance)), got 0.0
    """
    for name, value, note in (("threshold", threshold, " (σ = threshold × sqrt(median squared distance))"),
                              ("sigma", sigma, " or None (σ from the median distance)")):
        if name == "sigma" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
            math.isfinite(float(value)) and float(value) > 0
        ):
            raise ValueError(f"{name} must be a finite positive number{note}, got {value!r}")


def rbf_from_gram(gram: torch.Tensor, threshold: float = 0.5, sigma: float | None = None) -> torch.Tensor:
    """RBF kernel ``exp(-‖xᵢ-xⱼ‖² / (2σ²))`` from a linear Gram.

    σ follows Kornblith et al.: ``threshold × sqrt(median of all n² squared distances)`` (numpy's median,
    which averages the two middle values, the zero diagonal included); an explicit ``sigma`` overrides.
    Both must be finite positive numbers (:func:`check_rbf_settings`).

    Example:
        >>> import torch
        >>> rbf_from_gram(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), sigma=1.0)
        tensor([[1.0000, 0.3679],
                [0.3679, 1.0000]])
    """
    check_rbf_settings(threshold, sigma)
    kernel, bandwidth_ok = rbf_kernel(gram, threshold, sigma)
    if not bandwidth_ok:
        raise ValueError(ZERO_BANDWIDTH)
    return kernel


ZERO_BANDWIDTH = "the RBF bandwidth is zero: more than half of the pairwise distances are 0"


def rbf_kernel(gram: torch.Tensor, threshold: float, sigma: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kernel, bandwidth ok)``: :func:`rbf_from_gram` without its checks or a host sync; the 0-dim bool
    is False when the median bandwidth is not positive (the kernel is then not a number to use).

    Example:
        >>> import torch
        >>> kernel, ok = rbf_kernel(torch.zeros(3, 3), threshold=0.5, sigma=None)
        >>> ok.item()
        False
    """
    diagonal = torch.diagonal(gram)
    squared_distances = (diagonal[:, None] + diagonal[None, :] - 2 * gram).clamp_min(0)
    if sigma is None:
        median = averaged_median(squared_distances.detach().double())
        variance, bandwidth_ok = threshold**2 * median, median > 0
    else:
        variance, bandwidth_ok = sigma**2, torch.ones((), dtype=torch.bool, device=gram.device)
    return torch.exp(-squared_distances / (2 * variance)), bandwidth_ok


def averaged_median(values: torch.Tensor) -> torch.Tensor:
    """numpy's median of all the values, on their device (no host sync): for an even count, the mean of
    the two middle values (``torch.median`` gives the lower one).

    Example:
        >>> import torch
        >>> [averaged_median(torch.tensor(values)).item() for values in ([4.0, 1.0, 3.0, 2.0], [3.0, 1.0, 2.0])]
        [2.5, 2.0]
    """
    flat = values.flatten()
    count = flat.numel()
    lower = torch.kthvalue(flat, (count + 1) // 2).values
    if count % 2:
        return lower
    return (lower + torch.kthvalue(flat, count // 2 + 1).values) / 2


def centre_gram(gram: torch.Tensor, unbiased: bool, inplace: bool = False) -> torch.Tensor:
    """Double-centre a Gram (``HKH``) or, with ``unbiased=True``, U-centre it (Song et al. 2012).

    Works on ``[n, n]`` or a stack ``[L, n, n]``. With U-centring, ``⟨U(K), U(L)⟩ / (n(n-3))`` is the
    unbiased HSIC estimator, which needs n ≥ 4. ``inplace=True`` overwrites ``gram`` (no copies, for the
    streaming probes); otherwise it works on a copy and stays differentiable (for the CKA loss).

    Example:
        >>> import torch
        >>> centre_gram(torch.ones(3, 3), unbiased=False).abs().max().item()
        0.0
    """
    n = gram.shape[-1]
    if unbiased and n < 4:
        raise ValueError(f"the unbiased HSIC needs at least 4 samples per batch, got {n}")
    centred = gram if inplace else gram.clone()
    diagonal = centred.diagonal(dim1=-2, dim2=-1)
    if unbiased:
        diagonal.zero_()
        means = centred.sum(dim=-2) / (n - 2)
        means -= means.sum(dim=-1, keepdim=True) / (2 * (n - 1))
    else:
        means = centred.mean(dim=-2)
        means -= means.mean(dim=-1, keepdim=True) / 2
    centred -= means[..., :, None]
    centred -= means[..., None, :]
    if unbiased:
        diagonal.zero_()
    return centred


def hsic_scale(n: int, unbiased: bool) -> float:
    """The factor that turns ``⟨centred K, centred L⟩`` into an HSIC estimate for a batch of n.

    Example:
        >>> hsic_scale(10, unbiased=True)
        0.014285714285714285
    """
    return 1.0 / (n * (n - 3)) if unbiased else 1.0 / (n - 1) ** 2


def zero_floor(trace: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(DEAD_TOLERANCE · eps · trace)²``: a (U-)centred Gram whose squared norm is at most this is zero up
    to rounding (eps of ``dtype``, the dtype the Gram was formed in).

    Example:
        >>> import torch
        >>> zero_floor(torch.tensor(1.0, dtype=torch.float64), torch.float64).item() < 1e-25
        True
    """
    return (DEAD_TOLERANCE * torch.finfo(dtype).eps * trace) ** 2


def cka_parts(
    gram_x: torch.Tensor, gram_y: torch.Tensor, debiased: bool = False, floor_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(CKA, x dead, y dead)`` of two ``[n, n]`` Grams: ``⟨K̃, L̃⟩ / (‖K̃‖ ‖L̃‖)``, K̃ (U-)centred.

    A side whose centred Gram is zero up to rounding (:func:`zero_floor` of its trace, eps of
    ``floor_dtype``, default the Gram's dtype) is dead: the CKA is NaN then, not rounding noise. The
    flags are 0-dim bool tensors (no host sync here).

    Example:
        >>> import torch
        >>> x = torch.randn(20, 5, dtype=torch.float64)
        >>> value, x_dead, y_dead = cka_parts(centred_gram(x), centred_gram(torch.zeros(20, 5, dtype=torch.float64)))
        >>> value.isnan().item(), x_dead.item(), y_dead.item()
        (True, False, True)
    """
    centred_x = centre_gram(gram_x, unbiased=debiased)
    centred_y = centre_gram(gram_y, unbiased=debiased)
    norm_x, norm_y = centred_x.norm(), centred_y.norm()
    dead = [
        norm.square() <= zero_floor(gram.diagonal().sum(), floor_dtype or gram.dtype).to(norm.dtype)
        for norm, gram in ((norm_x, gram_x), (norm_y, gram_y))
    ]
    value = (centred_x * centred_y).sum() / (norm_x * norm_y)
    return torch.where(dead[0] | dead[1], torch.full_like(value, torch.nan), value), dead[0], dead[1]


def cka_from_grams(gram_x: torch.Tensor, gram_y: torch.Tensor, debiased: bool = False) -> torch.Tensor:
    """CKA of two ``[n, n]`` Grams: ``⟨K̃, L̃⟩ / (‖K̃‖ ‖L̃‖)`` with K̃ centred (or U-centred if debiased);
    NaN when a side's centred Gram is zero up to rounding (see :func:`cka_parts`).

    Example:
        >>> import torch
        >>> x = torch.randn(20, 5, dtype=torch.float64)
        >>> round(cka_from_grams(centred_gram(x), centred_gram(2 * x)).item(), 12)
        1.0
    """
    return cka_parts(gram_x, gram_y, debiased)[0]


def dead_layer_message(subject: str, debiased: bool) -> str:
    """The sentence every CKA uses when ``subject`` (a layer, or x / y) has a zero (U-)centred Gram.

    Example:
        >>> dead_layer_message("teacher layer 'fc'", debiased=False)[:60]
        "teacher layer 'fc' has a centred Gram of zero (up to roundin"
    """
    which = "U-centred" if debiased else "centred"
    alike = "every sample gives the same features, or all but one do" if debiased else (
        "every sample gives the same features")
    return (
        f"{subject} has a {which} Gram of zero (up to rounding): {alike} — a dead or constant layer — so its "
        "CKA is undefined (NaN). Choose another layer, or check that this one is alive (e.g. a ReLU that "
        "outputs 0 for every input, a layer fed a constant input), or use more / more varied samples."
    )
