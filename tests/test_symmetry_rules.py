"""One test case per registered rule of infer_spec, and a test that fails when a rule has none.

Each case puts one op between two layers, ``a -> op -> b`` (vectors, sequences or images), checks
that the traced graph really reaches that rule, that a random permutation of the inferred spec
keeps the outputs, and that ``a``'s output units are permuted ("keeps") or not ("pins").
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modeconn as mc
from modeconn._src.symmetry import registry
from modeconn._src.symmetry.tracer import trace_model
from symmetry_helpers import assert_symmetry, covered, randomize

# --- the probe model -----------------------------------------------------------------------------
SHAPES = {"vec": (4, 6), "seq": (2, 5, 6), "img": (2, 3, 4, 4)}


class Probe(nn.Module):
    def __init__(self, fn, layout: str, module: nn.Module | None = None) -> None:
        super().__init__()
        if layout == "img":
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 3, 1)
        else:
            self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)
        self.p = nn.Parameter(torch.rand(8) + 0.5)
        self.w = nn.Parameter(torch.randn(8, 8) / 3)
        self.m = module if module is not None else nn.Identity()
        self.fn = fn

    def forward(self, x):
        h = self.a(x)
        u = torch.sigmoid(h) * 0.8 + 0.1  # in (0.1, 0.9): safe for log, acos, erfinv, ...
        v = torch.cos(h) * 0.4 + 0.5
        return self.b(self.fn(self, u, v, x))


def _one(name: str):
    """``u.name()``, else ``torch.name(u)``, else ``F.name(u)``."""

    def fn(s, u, v, x):
        if hasattr(torch.Tensor, name):
            return getattr(u, name)()
        if hasattr(torch, name):
            return getattr(torch, name)(u)
        return getattr(F, name)(u)

    return fn


def _two(name: str):
    def fn(s, u, v, x):
        if hasattr(torch, name):
            return getattr(torch, name)(u, v)
        return getattr(u, name)(v)

    return fn


def _ids(x):  # token ids from the input, never from the hidden units
    return (x[..., 0] * 3).long().clamp(0, 7)


# target -> (layout, fn(s, u, v, x), expect, module or None)
CASES: dict = {}


def case(targets, layout, fn, expect="keeps", module=None):
    for t in targets if isinstance(targets, list) else [targets]:
        CASES[t] = (layout, fn, expect, module)


# element-wise, one operand
UNARY_SPECIAL = {
    "acosh": lambda s, u, v, x: torch.acosh(1 + u),
    "alpha_dropout": lambda s, u, v, x: F.alpha_dropout(u, 0.5, training=False),
    "feature_alpha_dropout": lambda s, u, v, x: F.feature_alpha_dropout(u, 0.5, training=False),
    "dropout": lambda s, u, v, x: F.dropout(u, 0.5, training=False),
    "dropout1d": lambda s, u, v, x: F.dropout1d(u, 0.5, training=False),
    "bfloat16": lambda s, u, v, x: u.bfloat16().float(),
    "half": lambda s, u, v, x: u.half().float(),
    "double": lambda s, u, v, x: u.double().float(),
    "bool": lambda s, u, v, x: u.bool().float() * u,
    "byte": lambda s, u, v, x: (u * 9).byte().float(),
    "char": lambda s, u, v, x: (u * 9).char().float(),
    "int": lambda s, u, v, x: (u * 9).int().float(),
    "long": lambda s, u, v, x: (u * 9).long().float(),
    "short": lambda s, u, v, x: (u * 9).short().float(),
    "bitwise_not": lambda s, u, v, x: torch.bitwise_not((u * 9).long()).float(),
    "logical_not": lambda s, u, v, x: torch.logical_not(u > 0.5).float(),
    "isfinite": lambda s, u, v, x: torch.isfinite(u).float() * u,
    "isinf": lambda s, u, v, x: torch.isinf(u).float() + u,
    "isnan": lambda s, u, v, x: torch.isnan(u).float() + u,
    "clamp": lambda s, u, v, x: u.clamp(min=0.3),
    "clamp_max": lambda s, u, v, x: u.clamp_max(0.6),
    "clamp_min": lambda s, u, v, x: u.clamp_min(0.3),
    "clip": lambda s, u, v, x: u.clip(0.3, 0.6),
    "fill_": lambda s, u, v, x: u.clone().fill_(0.5) * u,
    "zero_": lambda s, u, v, x: u.clone().zero_() + u,
    "normalize": lambda s, u, v, x: F.normalize(u, dim=-1),
    "softmax": lambda s, u, v, x: u.softmax(-1),
    "softmin": lambda s, u, v, x: F.softmin(u, -1),
    "log_softmax": lambda s, u, v, x: u.log_softmax(-1),
    "threshold": lambda s, u, v, x: torch.threshold(u, 0.5, 0.0),
    "to": lambda s, u, v, x: u.to(torch.float64).float(),
    "type": lambda s, u, v, x: u.type(torch.float64).float(),
    "type_as": lambda s, u, v, x: u.type_as(s.p),
    "requires_grad_": lambda s, u, v, x: u.detach().requires_grad_(False),
    "logit": lambda s, u, v, x: u.logit(),
    "log_sigmoid": lambda s, u, v, x: F.logsigmoid(u),
    "invert": lambda s, u, v, x: (~(u > 0.5)).float(),
    "pos": lambda s, u, v, x: +u,
    "neg": lambda s, u, v, x: -u,
    "relu_": lambda s, u, v, x: torch.relu_(u.clone() - 0.5),
    "cpu": lambda s, u, v, x: u.cpu(),
    "pin_memory": lambda s, u, v, x: u,  # see EXEMPT
}
for _n in registry.registered()["name"]:
    if _n in UNARY_SPECIAL:
        case(_n, "seq", UNARY_SPECIAL[_n])
from modeconn._src.symmetry.rules_pointwise import BINARY, FACTORY, REDUCE, UNARY  # noqa: E402

for _n in UNARY:
    if _n not in CASES:
        case(_n, "seq", _one(_n))
case(["dropout2d", "dropout3d"], "img", lambda s, u, v, x: F.dropout2d(u, 0.5, training=False))
CASES["dropout3d"] = (
    "img",
    lambda s, u, v, x: F.dropout3d(u[:, :, None], 0.5, training=False)[:, :, 0],
    "keeps",
    None,
)

# element-wise, two operands
BINARY_SPECIAL = {
    "and_": lambda s, u, v, x: ((u > 0.5) & (v > 0.5)).float(),
    "or_": lambda s, u, v, x: ((u > 0.5) | (v > 0.5)).float(),
    "xor": lambda s, u, v, x: ((u > 0.5) ^ (v > 0.5)).float(),
    "bitwise_and": lambda s, u, v, x: torch.bitwise_and(u > 0.5, v > 0.5).float(),
    "bitwise_or": lambda s, u, v, x: torch.bitwise_or(u > 0.5, v > 0.5).float(),
    "bitwise_xor": lambda s, u, v, x: torch.bitwise_xor(u > 0.5, v > 0.5).float(),
    "logical_and": lambda s, u, v, x: torch.logical_and(u > 0.5, v > 0.5).float(),
    "logical_or": lambda s, u, v, x: torch.logical_or(u > 0.5, v > 0.5).float(),
    "logical_xor": lambda s, u, v, x: torch.logical_xor(u > 0.5, v > 0.5).float(),
    "lshift": lambda s, u, v, x: ((u * 9).long() << 1).float(),
    "rshift": lambda s, u, v, x: ((u * 9).long() >> 1).float(),
    "eq": lambda s, u, v, x: (u == v).float() + u,
    "ne": lambda s, u, v, x: (u != v).float() + u,
    "ge": lambda s, u, v, x: (u >= v).float(),
    "gt": lambda s, u, v, x: (u > v).float(),
    "le": lambda s, u, v, x: (u <= v).float(),
    "lt": lambda s, u, v, x: (u < v).float(),
    "eq_": lambda s, u, v, x: u.clone().eq_(v) + u,
    "ne_": lambda s, u, v, x: u.clone().ne_(v) + u,
    "floordiv": lambda s, u, v, x: (u * 9) // (v + 1),
    "truediv": lambda s, u, v, x: u / v,
    "mod": lambda s, u, v, x: u % v,
    "masked_fill": lambda s, u, v, x: u.masked_fill(v > 0.5, 0.0),
    "masked_fill_": lambda s, u, v, x: u.clone().masked_fill_(v > 0.5, 0.0),
    "where": lambda s, u, v, x: torch.where(u > v, u, v),
    "lerp": lambda s, u, v, x: torch.lerp(u, v, 0.3),
    "addcdiv": lambda s, u, v, x: torch.addcdiv(u, u, v),
    "addcmul": lambda s, u, v, x: torch.addcmul(u, u, v),
    "heaviside": lambda s, u, v, x: torch.heaviside(u - 0.5, v),
    "float_power": lambda s, u, v, x: torch.float_power(u, v).float(),
    "clamp_": lambda s, u, v, x: u.clone().clamp_(0.3, 0.6) * v,
    "add_": lambda s, u, v, x: u.clone().add_(v),
    "sub_": lambda s, u, v, x: u.clone().sub_(v),
    "mul_": lambda s, u, v, x: u.clone().mul_(v),
    "div_": lambda s, u, v, x: u.clone().div_(v),
    "pow_": lambda s, u, v, x: u.clone().pow_(v),
}


for _n in BINARY:
    case(_n, "seq", BINARY_SPECIAL.get(_n, _two(_n)))
case(
    ["max", "min"], "seq", lambda s, u, v, x: torch.max(u, dim=1, keepdim=True)[0] + torch.min(u, v)
)

# reductions over the sequence axis keep the channel axis
for _n in REDUCE:
    case(_n, "seq", lambda s, u, v, x, n=_n: getattr(torch, n)(u, dim=1))
case(
    ["all", "any"],
    "seq",
    lambda s, u, v, x: torch.all(u > 0.5, dim=1) * torch.any(u > v, dim=1) * u[:, 0],
)
case("count_nonzero", "seq", lambda s, u, v, x: torch.count_nonzero(u > 0.5, dim=1).float())
case("norm", "seq", lambda s, u, v, x: u.norm(dim=1))
case(["argmax", "argmin"], "seq", lambda s, u, v, x: (u.argmax(1) + u.argmin(dim=1)).float())
case("median", "seq", lambda s, u, v, x: u.median(dim=1)[0])
case("mode", "seq", lambda s, u, v, x: (u * 3).round().mode(dim=1)[0])
case("topk", "seq", lambda s, u, v, x: u.topk(2, dim=1)[0].sum(1))
case("kthvalue", "seq", lambda s, u, v, x: u.kthvalue(2, dim=1)[0])
case("sort", "seq", lambda s, u, v, x: u.sort(dim=1)[0])
case("argsort", "seq", lambda s, u, v, x: u.argsort(dim=1).float())
case(
    ["cumsum", "cumprod", "logcumsumexp"],
    "seq",
    lambda s, u, v, x: torch.cumsum(u, 1) + torch.cumprod(u, 1) + torch.logcumsumexp(u, 1),
)
case(["cummax", "cummin"], "seq", lambda s, u, v, x: torch.cummax(u, 1)[0] + torch.cummin(u, 1)[0])

# factories: constants with free axes
FACTORY_FNS = {
    "empty": lambda s, u, v, x: u + torch.empty(u.shape[-1]).zero_(),
    "empty_like": lambda s, u, v, x: u + torch.empty_like(u).zero_(),
    "full": lambda s, u, v, x: u * torch.full((u.shape[-1],), 0.5),
    "full_like": lambda s, u, v, x: u * torch.full_like(u, 0.5),
    "new_empty": lambda s, u, v, x: u + u.new_empty(8).zero_(),
    "new_full": lambda s, u, v, x: u * u.new_full((8,), 0.5),
    "new_ones": lambda s, u, v, x: u * u.new_ones(u.shape[0], 5, 8),
    "new_zeros": lambda s, u, v, x: u + u.new_zeros(8),
    "ones": lambda s, u, v, x: u * torch.ones(u.shape[0], 5, 8),  # sized by a traced value
    "ones_like": lambda s, u, v, x: u * torch.ones_like(u),
    "scalar_tensor": lambda s, u, v, x: u / torch.scalar_tensor(u.shape[-1]),
    "zeros": lambda s, u, v, x: u + torch.zeros(u.shape[-1]),
    "zeros_like": lambda s, u, v, x: u + torch.zeros_like(u),
}
for _n in FACTORY:
    case(_n, "seq", FACTORY_FNS[_n])

# questions about tensors: no axes
case("_assert", "seq", lambda s, u, v, x: (torch._assert(u.dim() == 3, "rank"), u)[1])
case("data_ptr", "seq", lambda s, u, v, x: u * (1 if u.data_ptr() else 1))
case("element_size", "seq", lambda s, u, v, x: u * u.element_size())
case("get_device", "seq", lambda s, u, v, x: u * (u.get_device() < 0))
case("is_complex", "seq", lambda s, u, v, x: u * (not u.is_complex()))
case("is_contiguous", "seq", lambda s, u, v, x: u * u.is_contiguous())
case("is_floating_point", "seq", lambda s, u, v, x: u * u.is_floating_point())
case("item", "seq", lambda s, u, v, x: u * u.sum().item())
case(["ndimension", "dim"], "seq", lambda s, u, v, x: u / u.ndimension() * u.dim())
case(["nelement", "numel"], "seq", lambda s, u, v, x: u / u.nelement() * u.numel())
case(
    ["size", "stride", "storage_offset"],
    "seq",
    lambda s, u, v, x: u * u.size(-1) * u.stride(0) * (u.storage_offset() + 1),
)

# shapes
case("atleast_2d", "seq", lambda s, u, v, x: torch.atleast_2d(u))
case("atleast_3d", "seq", lambda s, u, v, x: torch.atleast_3d(u))
case("flatten", "seq", lambda s, u, v, x: u.flatten(0, 1))
case("reshape", "seq", lambda s, u, v, x: u.reshape(10, 8))
case("reshape_as", "seq", lambda s, u, v, x: u.reshape(10, 8).reshape_as(u))
case(["squeeze", "unsqueeze"], "seq", lambda s, u, v, x: u.unsqueeze(0).squeeze(0))
case("unflatten", "seq", lambda s, u, v, x: u.flatten(0, 1).unflatten(0, (2, 5)))
case(["view", "view_as"], "seq", lambda s, u, v, x: u.view(10, 8).view_as(u))
case("adjoint", "seq", lambda s, u, v, x: u.adjoint().adjoint())
case(
    ["moveaxis", "movedim"], "seq", lambda s, u, v, x: torch.movedim(torch.moveaxis(u, 2, 1), 1, 2)
)
case("permute", "seq", lambda s, u, v, x: u.permute(0, 2, 1).permute(0, 2, 1))
case(["swapaxes", "swapdims"], "seq", lambda s, u, v, x: u.swapaxes(1, 2).swapdims(1, 2))
case("t", "seq", lambda s, u, v, x: u.flatten(0, 1).t().t())
case("transpose", "seq", lambda s, u, v, x: u.transpose(1, 2).transpose(1, 2))
case("getattr", "seq", lambda s, u, v, x: u.mT.mT)
case(
    ["expand", "expand_as", "broadcast_to"],
    "seq",
    lambda s, u, v, x: (
        u[None].expand(3, -1, -1, -1).sum(0)
        + u[None].expand_as(u[None]).sum(0)
        + u.broadcast_to(u.shape)
    ),
)
case("repeat", "seq", lambda s, u, v, x: u.repeat(1, 2, 1))
case(
    ["cat", "concat", "concatenate"],
    "seq",
    lambda s, u, v, x: (
        torch.cat([u, v], 1) + torch.concat([v, u], 1) + torch.concatenate([u, u], 1)
    ),
)
case("stack", "seq", lambda s, u, v, x: torch.stack([u, v], 0).sum(0))
case(
    ["chunk", "split", "tensor_split", "split_with_sizes", "unbind"],
    "seq",
    lambda s, u, v, x: (
        u.chunk(5, dim=1)[0][:, 0]
        + u.split(2, dim=1)[1].sum(1)
        + torch.tensor_split(u, 2, dim=1)[0].sum(1)
        + u.split_with_sizes([2, 3], dim=1)[0].sum(1)
        + u.unbind(1)[0]
    ),
)

# indexing and positions: the channel axis is untouched
case(
    "getitem",
    "seq",
    lambda s, u, v, x: (
        u[:, 0] + u[torch.arange(2), x[:, :, 0].argmax(-1)] + u[:, [-2]].sum(1) + u[:, [0, 1]][:, 0]
    ),
)
case("gather", "seq", lambda s, u, v, x: torch.gather(u, 1, u.argsort(1)))
case("take_along_dim", "seq", lambda s, u, v, x: torch.take_along_dim(u, u.argsort(1), dim=1))
case("index_select", "seq", lambda s, u, v, x: torch.index_select(u, 1, torch.tensor([0, 2])))
case("narrow", "seq", lambda s, u, v, x: u.narrow(1, 0, 3))
case("roll", "seq", lambda s, u, v, x: torch.roll(u, 1, 1))
case(
    ["flip", "fliplr", "flipud"],
    "seq",
    lambda s, u, v, x: u.flip(1) + torch.fliplr(u) + torch.flipud(u),
)
case("rot90", "img", lambda s, u, v, x: torch.rot90(u, 1, (2, 3)))
case(["tril", "triu"], "seq", lambda s, u, v, x: u.tril() + u.triu(), expect="pins")

# contractions
case(
    ["matmul", "mm", "bmm"],
    "seq",
    lambda s, u, v, x: (
        u @ s.w + torch.mm(u.flatten(0, 1), s.w).view(2, 5, 8) + torch.bmm(u, s.w.expand(2, 8, 8))
    ),
)
case(
    ["addmm", "baddbmm"],
    "seq",
    lambda s, u, v, x: (
        torch.addmm(s.p, u.flatten(0, 1), s.w).view(2, 5, 8)
        + torch.baddbmm(s.p, u, s.w.expand(2, 8, 8))
    ),
)
case("einsum", "seq", lambda s, u, v, x: torch.einsum("bti,ij->btj", u, s.w))

# pooling and resizing (images)
EXEMPT_HERE: dict[str, str] = {}  # rules for functions this torch does not have
for _d in (1, 2, 3):
    for _p in ("max", "avg", "adaptive_avg", "adaptive_max", "lp"):
        _name = f"{_p}_pool{_d}d"
        if not hasattr(F, _name):  # F.lp_pool3d is newer than torch 2.2: nothing to reach
            EXEMPT_HERE[_name] = f"torch {torch.__version__} has no F.{_name}"
            continue
        _f = getattr(F, _name)

        def _pool(s, u, v, x, f=_f, d=_d, p=_p):
            t = u.flatten(2) if d == 1 else (u if d == 2 else u[:, :, None])
            arg = 4 if d == 1 else (2 if d == 2 else (1, 2, 2))
            out = f(t, 2, arg) if p == "lp" else f(t, arg)
            return out.view(u.shape[0], 8, 2, 2) if d == 1 else (out if d == 2 else out[:, :, 0])

        case(_name, "img", _pool)
case(
    "interpolate",
    "img",
    lambda s, u, v, x: F.interpolate(u, scale_factor=2) + F.upsample_bilinear(u, scale_factor=2),
)

# functional layers
case(
    F.scaled_dot_product_attention,
    "seq",
    lambda s, u, v, x: F.scaled_dot_product_attention(u[:, None], v[:, None], u[:, None])[:, 0],
)
case(F.linear, "seq", lambda s, u, v, x: F.linear(u, s.w, s.p))
case(F.conv1d, "img", lambda s, u, v, x: F.conv1d(u.flatten(2), s.w[:, :, None]).view(u.shape))
case(F.conv2d, "img", lambda s, u, v, x: F.conv2d(u, s.w[:, :, None, None], s.p))
case(
    F.conv3d,
    "img",
    lambda s, u, v, x: F.conv3d(u[:, :, None], s.w[:, :, None, None, None])[:, :, 0],
)
case(
    F.conv_transpose1d,
    "img",
    lambda s, u, v, x: F.conv_transpose1d(u.flatten(2), s.w[:, :, None]).view(u.shape),
)
case(
    F.conv_transpose2d, "img", lambda s, u, v, x: F.conv_transpose2d(u, s.w[:, :, None, None], s.p)
)
case(
    F.conv_transpose3d,
    "img",
    lambda s, u, v, x: F.conv_transpose3d(u[:, :, None], s.w[:, :, None, None, None])[:, :, 0],
)
case(F.batch_norm, "img", lambda s, u, v, x: F.batch_norm(u, s.p, s.p + 1, s.p, s.p))
case(F.instance_norm, "img", lambda s, u, v, x: F.instance_norm(u, weight=s.p, bias=s.p))
case(F.layer_norm, "seq", lambda s, u, v, x: F.layer_norm(u, (8,), s.p, s.p))
if hasattr(F, "rms_norm"):
    case(F.rms_norm, "seq", lambda s, u, v, x: F.rms_norm(u, (8,), s.p))
case(F.group_norm, "img", lambda s, u, v, x: F.group_norm(u, 2, s.p, s.p))
case(F.embedding, "seq", lambda s, u, v, x: u + F.embedding(_ids(x), s.w))
case(torch.embedding, "seq", lambda s, u, v, x: u + torch.embedding(s.w, _ids(x)))
case(F.prelu, "img", lambda s, u, v, x: F.prelu(u - 0.5, s.p))
case(F.glu, "seq", lambda s, u, v, x: F.glu(torch.cat([u, v], -1)))
case(F.pad, "img", lambda s, u, v, x: F.pad(u, (1, 1, 1, 1)))


# modules
def _mod(module, layout="seq", expect="keeps", fn=None):
    return (layout, fn or (lambda s, u, v, x: s.m(u)), expect, module)


MODULE_CASES = {
    nn.MultiheadAttention: _mod(
        nn.MultiheadAttention(8, 2, batch_first=True), fn=lambda s, u, v, x: s.m(u, v, v)[0]
    ),
    nn.Linear: _mod(nn.Linear(8, 8)),
    nn.modules.conv._ConvNd: _mod(nn.Conv2d(8, 8, 3, padding=1), "img"),
    nn.modules.instancenorm._InstanceNorm: _mod(nn.InstanceNorm2d(8, affine=True), "img"),
    nn.modules.batchnorm._BatchNorm: _mod(nn.BatchNorm2d(8), "img"),
    nn.LayerNorm: _mod(nn.LayerNorm(8)),
    nn.GroupNorm: _mod(nn.GroupNorm(2, 8), "img"),
    nn.Embedding: _mod(nn.Embedding(8, 8), fn=lambda s, u, v, x: u + s.m(_ids(x))),
    nn.PReLU: _mod(nn.PReLU(8), "img"),
    nn.GLU: _mod(nn.GLU(), fn=lambda s, u, v, x: s.m(torch.cat([u, v], -1))),
    nn.modules.pooling._MaxPoolNd: _mod(nn.MaxPool2d(2), "img"),
    nn.modules.pooling._AvgPoolNd: _mod(nn.AvgPool2d(2), "img"),
    nn.modules.pooling._AdaptiveAvgPoolNd: _mod(nn.AdaptiveAvgPool2d(2), "img"),
    nn.modules.pooling._AdaptiveMaxPoolNd: _mod(nn.AdaptiveMaxPool2d(2), "img"),
    nn.modules.pooling._LPPoolNd: _mod(nn.LPPool2d(2, 2), "img"),
    nn.Upsample: _mod(nn.Upsample(scale_factor=2), "img"),
    nn.modules.padding._ConstantPadNd: _mod(nn.ConstantPad2d(1, 0.5), "img"),
    nn.modules.padding._ReflectionPadNd: _mod(nn.ReflectionPad2d(1), "img"),
    nn.modules.padding._ReplicationPadNd: _mod(nn.ReplicationPad2d(1), "img"),
    nn.modules.padding._CircularPadNd: _mod(nn.CircularPad2d(1), "img"),
    nn.Flatten: _mod(nn.Flatten(2), "img", fn=lambda s, u, v, x: s.m(u).view(u.shape)),
    nn.Unflatten: _mod(nn.Unflatten(2, (4, 4)), "img", fn=lambda s, u, v, x: s.m(u.flatten(2))),
    nn.Bilinear: _mod(nn.Bilinear(8, 8, 8), expect="pins", fn=lambda s, u, v, x: s.m(u, v)),
    nn.LocalResponseNorm: _mod(nn.LocalResponseNorm(2), "img", "pins"),
    nn.EmbeddingBag: _mod(
        nn.EmbeddingBag(8, 8), expect="pins", fn=lambda s, u, v, x: u + s.m(_ids(x))[:, None]
    ),
    nn.PixelShuffle: _mod(
        nn.PixelShuffle(2), "img", "pins", fn=lambda s, u, v, x: nn.PixelUnshuffle(2)(s.m(u))
    ),
    nn.PixelUnshuffle: _mod(
        nn.PixelUnshuffle(2), "img", "pins", fn=lambda s, u, v, x: nn.PixelShuffle(2)(s.m(u))
    ),
    nn.ChannelShuffle: _mod(nn.ChannelShuffle(2), "img", "pins"),
}
if hasattr(nn, "RMSNorm"):
    MODULE_CASES[nn.RMSNorm] = _mod(nn.RMSNorm(8))
_IMG_ONLY = (nn.Dropout2d, nn.Dropout3d, nn.Softmax2d)
for _m in registry.registered()["module"]:
    if _m not in MODULE_CASES and _m.__module__.startswith("torch.nn.modules.activation") | (
        _m.__module__.startswith("torch.nn.modules.dropout") or _m is nn.Identity
    ):
        kw = {"dim": -1} if _m in (nn.Softmax, nn.LogSoftmax, nn.Softmin) else {}
        if _m is nn.Threshold:
            kw = {"threshold": 0.5, "value": 0.0}
        if _m.__module__.startswith("torch.nn.modules.dropout"):
            kw = {"p": 0.0}  # train-mode masks are positional: equal only in distribution
        inst = _m(**kw)
        if _m is nn.Dropout3d:
            MODULE_CASES[_m] = _mod(inst, "img", fn=lambda s, u, v, x: s.m(u[:, :, None])[:, :, 0])
        else:
            MODULE_CASES[_m] = _mod(inst, "img" if _m in _IMG_ONLY else "seq")
CASES.update(MODULE_CASES)

# registered names no probe on a CPU can reach, and why
EXEMPT = {
    "cuda": "needs a CUDA device (the rule is the 'cpu' rule, tested)",
    "pin_memory": "needs an accelerator (the rule is the 'cpu' rule, tested)",
    **EXEMPT_HERE,
}


def _key(t) -> str:
    if isinstance(t, str):
        return t
    return f"{getattr(t, '__module__', '')}.{getattr(t, '__qualname__', t)}"


def test_every_registered_rule_has_a_case():
    reg = registry.registered()
    builtin = [  # not those users (or doctests) registered
        t
        for t in [*reg["name"], *reg["object"], *reg["module"]]
        if isinstance(t, str) or getattr(t, "__module__", "").startswith("torch")
    ]
    assert len(builtin) > 300
    missing = [_key(t) for t in builtin if t not in CASES and t not in EXEMPT]
    assert not missing, f"registered rules without a test case: {missing}"


def _reached(model, x) -> set:
    """The registry keys the traced graph of ``model`` reaches."""
    tr = trace_model(model, x)
    hit = set()
    for node in tr.gm.graph.nodes:
        if node.op == "call_module":
            m = tr.root.get_submodule(str(node.target))
            hit.update(c for c in type(m).__mro__ if c in registry._BY_MODULE)
        elif node.op in ("call_function", "call_method"):
            name, fn = registry.lookup(node.target)
            if fn is not None:
                hit.add(node.target if node.target in registry._BY_OBJECT else name)
    return hit


@pytest.mark.parametrize("target", [t for t in CASES if t not in EXEMPT], ids=_key)
def test_rule(target):
    layout, fn, expect, module = CASES[target]
    torch.manual_seed(0)
    model = randomize(Probe(fn, layout, module)).eval()
    x = torch.randn(SHAPES[layout])
    assert target in _reached(model, x), f"the probe does not reach the rule of {_key(target)}"
    spec = mc.infer_spec(model, x, verify=False, warn=False)
    hidden = covered(spec, model.state_dict(), "a.weight", 0)
    if expect == "keeps":
        assert hidden.all(), f"{_key(target)} pinned a's units: {spec.pins.get('a.weight')}"
    else:
        assert not hidden.any(), f"{_key(target)} should pin a's units"
        assert "a.weight" in spec.pins and 0 in spec.pins["a.weight"]
    if spec.groups:
        assert_symmetry(model, x, spec, seeds=(0,))


def test_slices_that_split_the_channel_axis_keep_both_parts_free():
    """``u[..., :3]`` and ``u[..., 3:]`` (partial rotary's split of a head) make the axis a direct
    sum: a's units stay permuted (within each part) and the outputs are kept."""
    fn = lambda s, u, v, x: torch.cat([torch.tanh(u[..., :3]), 2 * u[..., 3:]], -1)  # noqa: E731
    torch.manual_seed(0)
    model = randomize(Probe(fn, "seq")).eval()
    x = torch.randn(SHAPES["seq"])
    spec = mc.infer_spec(model, x, verify=False, warn=False)
    assert covered(spec, model.state_dict(), "a.weight", 0).all(), spec.pins
    assert len({n for n, sl in spec.slots.items() for s in sl if s.param == "a.weight"}) == 2
    assert_symmetry(model, x, spec, seeds=(0, 1))


def test_positions_a_slice_drops_and_nothing_reads_stay_pinned():
    """``w[:t]`` (a table sliced to the sequence length): the rows past ``t`` are never read, so
    they are pinned (a longer input would read them), not left to a free group."""
    fn = lambda s, u, v, x: u + s.w[: u.shape[1]]  # noqa: E731
    torch.manual_seed(0)
    model = randomize(Probe(fn, "seq")).eval()
    x = torch.randn(SHAPES["seq"])
    spec = mc.infer_spec(model, x, verify=False, warn=False)
    assert not covered(spec, model.state_dict(), "w", 0).any()
    assert covered(spec, model.state_dict(), "a.weight", 0).all()
    assert_symmetry(model, x, spec, seeds=(0,))
