"""PENet (Hu et al., "PENet: Towards Precise and Efficient Image Guided Depth Completion", ICRA 2021), written here
from the paper and the facts of its public code (JUGGHM/PENet_ICRA2021): the ENet two-branch backbone with geometric
(xyz) convolutional encoding, followed by DA-CSPN++ refinement with dilation rate 2 (``PENet_C2``, the "pe" model
that produced the official CMF-IOU/VirConv pseudo points).

Module and parameter names follow the public checkpoint (``pe.pth.tar``: dict with the state dict under ``'model'``,
possibly with ``module.`` prefixes), so it loads into :class:`PENet`. Keys of the training-only layers
(``dimhalf_s2``, ``att_12``) and the fixed ``encoder3/5/7`` kernels are ignored, as the public evaluation does
(``strict=False``). No pretrained weights are bundled: without a checkpoint the network is randomly initialised.

Inputs (as the public code): ``rgb`` (B, 3, H, W) float in 0..255, ``d`` (B, 1, H, W) sparse depth in metres,
``position`` (B, 2, H, W) = (u, v) normalised to [-1, 1] over the network input, ``K`` (B, 3, 3). H and W must be
multiples of 32. Note the public KITTI pipeline used one fixed 2011_09_26 K (cx - 13, cy - 11.5) for every frame;
:class:`PENetCompleter` uses each frame's own P2 intrinsics instead (top-left crop/pad keeps the principal point).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F


class CheckpointError(ValueError):
    """A PENet checkpoint could not be loaded safely or does not match the network."""


# --------------------------------------------------------------------------------------------- small building blocks
def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, pad: int = 1, relu: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, pad, bias=False), nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def deconv_bn_relu(cin: int, cout: int, k: int = 5, stride: int = 2, pad: int = 2, out_pad: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, k, stride, pad, output_padding=out_pad, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class GeoBlock(nn.Module):
    """Residual basic block whose two 3x3 convs also see 3 geometry channels (xyz): conv1 on [x, g_in], conv2 on
    [g_out, y] (geometry first, as in the public code); the 1x1 shortcut (when present) sees [x, g_in], the identity
    shortcut plain x."""

    def __init__(self, cin: int, cout: int, stride: int = 1, geo: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(cin + geo, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout + geo, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin + geo, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x, g1, g2):
        idt = x
        x = torch.cat((x, g1), 1)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(torch.cat((g2, out), 1)))
        if self.downsample is not None:
            idt = self.downsample(x)
        return self.relu(out + idt)


def sparse_downsample(d: torch.Tensor, mask: torch.Tensor, big: float = 600.0):
    """2x2 'closest valid' pooling of a sparse depth map (min over valid pixels; invalid -> 0)."""
    enc = -(1 - mask) * big - d
    dd = -F.max_pool2d(enc, 2, 2)
    m = F.max_pool2d(mask, 2, 2)
    return dd - (1 - m) * big, m


def geometry(z, vnorm, unorm, h, w, cy, cx, fy, fx):
    """Per-pixel 3D coordinates from depth and normalised pixel coords (public-code convention: 'x' is vertical)."""
    x = z * (0.5 * h * (vnorm + 1) - cy) / fy
    y = z * (0.5 * w * (unorm + 1) - cx) / fx
    return torch.cat((x, y, z), 1)


class GuideGen(nn.Module):
    """CSPN++ affinity generator: k*k-1 conv outputs normalised by their absolute sum, centre = 1 - sum."""

    def __init__(self, cin: int, k: int):
        super().__init__()
        self.k = k
        self.generate = conv_bn(cin, k * k - 1, relu=False)

    def forward(self, f):
        g = self.generate(f)
        g = g / g.abs().sum(1, keepdim=True)
        mid = 1 - g.sum(1, keepdim=True)
        a, b = torch.chunk(g, 2, dim=1)
        return torch.cat((a, mid, b), 1)


def gather_kernel(k: int) -> torch.Tensor:
    """Fixed (k*k, k*k, k, k) 0/1 conv weight re-arranging per-pixel 'scatter' affinities into 'gather' form:
    output channel o reads input channel k*k-1-o at spatial offset (o // k, o % k) - k // 2."""
    w = torch.zeros(k * k, k * k, k, k)
    for j in range(k * k):
        w[k * k - 1 - j, j, k - 1 - j // k, k - 1 - j % k] = 1.0
    return w


def cspn_step(guide: torch.Tensor, h: torch.Tensor, h0: torch.Tensor, k: int, dilation: int) -> torch.Tensor:
    """One accelerated CSPN propagation: sum over the (dilated) k x k neighbourhood of guide * h, the centre tap
    using h0 (the initial depth) as in standard CSPN."""
    B, _, H, W = h.shape
    cols = F.unfold(h, k, dilation=dilation, padding=dilation * (k // 2))  # (B, k*k, H*W)
    mid = (k * k - 1) // 2
    cols = torch.cat((cols[:, :mid], h0.reshape(B, 1, H * W), cols[:, mid + 1:]), 1)
    return (cols * guide.reshape(B, k * k, H * W)).sum(1).view(B, 1, H, W)


# --------------------------------------------------------------------------------------------- ENet backbone
class ENet(nn.Module):
    def __init__(self):
        super().__init__()
        G = 3
        self.rgb_conv_init = conv_bn(4, 32, 5, 1, 2)
        chans = [(32, 64, 2), (64, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1),
                 (256, 512, 2), (512, 512, 1), (512, 1024, 2), (1024, 1024, 1)]
        for i, (a, b, s) in enumerate(chans, 1):
            setattr(self, f"rgb_encoder_layer{i}", GeoBlock(a, b, s, G))
        self.rgb_decoder_layer8 = deconv_bn_relu(1024, 512)
        self.rgb_decoder_layer6 = deconv_bn_relu(512, 256)
        self.rgb_decoder_layer4 = deconv_bn_relu(256, 128)
        self.rgb_decoder_layer2 = deconv_bn_relu(128, 64)
        self.rgb_decoder_layer0 = deconv_bn_relu(64, 32)
        self.rgb_decoder_output = deconv_bn_relu(32, 2, 3, 1, 1, 0)
        self.depth_conv_init = conv_bn(2, 32, 5, 1, 2)
        dchans = [(32, 64, 2), (64, 64, 1), (128, 128, 2), (128, 128, 1), (256, 256, 2), (256, 256, 1),
                  (512, 512, 2), (512, 512, 1), (1024, 1024, 2), (1024, 1024, 1)]
        for i, (a, b, s) in enumerate(dchans, 1):
            setattr(self, f"depth_layer{i}", GeoBlock(a, b, s, G))
        self.decoder_layer1 = deconv_bn_relu(1024, 512)
        self.decoder_layer2 = deconv_bn_relu(512, 256)
        self.decoder_layer3 = deconv_bn_relu(256, 128)
        self.decoder_layer4 = deconv_bn_relu(128, 64)
        self.decoder_layer5 = deconv_bn_relu(64, 32)
        self.decoder_layer6 = conv_bn(32, 2, 3, 1, 1)

    def forward(self, rgb, d, position, K):
        H, W = d.shape[-2:]
        unorm, vnorm = position[:, 0:1], position[:, 1:2]
        fy = K[:, 1, 1].view(-1, 1, 1, 1)
        cy = K[:, 1, 2].view(-1, 1, 1, 1)
        fx = K[:, 0, 0].view(-1, 1, 1, 1)
        cx = K[:, 0, 2].view(-1, 1, 1, 1)
        vs, us, ds = [vnorm], [unorm], [d]
        m = (d > 0).to(d.dtype)
        for _ in range(5):
            vs.append(F.avg_pool2d(vs[-1], 2))
            us.append(F.avg_pool2d(us[-1], 2))
            dd, m = sparse_downsample(ds[-1], m)
            ds.append(dd)
        geo = [geometry(ds[s], vs[s], us[s], H / 2 ** s, W / 2 ** s, cy, cx, fy, fx) for s in range(6)]

        f0 = self.rgb_conv_init(torch.cat((rgb, d), 1))
        r = [f0]
        for i in range(1, 11):
            g1 = geo[(i - 1) // 2] if i % 2 else geo[i // 2]  # layer1 (s1, s2), layer2 (s2, s2), layer3 (s2, s3)..
            r.append(getattr(self, f"rgb_encoder_layer{i}")(r[-1], g1, geo[(i + 1) // 2]))
        r8p = self.rgb_decoder_layer8(r[10]) + r[8]
        r6p = self.rgb_decoder_layer6(r8p) + r[6]
        r4p = self.rgb_decoder_layer4(r6p) + r[4]
        r2p = self.rgb_decoder_layer2(r4p) + r[2]
        r0p = self.rgb_decoder_layer0(r2p) + f0
        rgb_out = self.rgb_decoder_output(r0p)
        rgb_depth, rgb_conf = rgb_out[:, 0:1], rgb_out[:, 1:2]

        s = [self.depth_conv_init(torch.cat((d, rgb_depth), 1))]
        plus = {2: r2p, 4: r4p, 6: r6p, 8: r8p}
        x = s[0]
        for i in range(1, 11):
            g1 = geo[(i - 1) // 2] if i % 2 else geo[i // 2]
            x = getattr(self, f"depth_layer{i}")(x, g1, geo[(i + 1) // 2])
            s.append(x)
            if i in plus:
                x = torch.cat([plus[i], x], 1)
        dec1 = self.decoder_layer1(r[10] + s[10])
        dec2 = self.decoder_layer2(s[8] + dec1)
        dec3 = self.decoder_layer3(s[6] + dec2)
        dec4 = self.decoder_layer4(s[4] + dec3)
        dec5 = self.decoder_layer5(s[2] + dec4)
        out = self.decoder_layer6(dec5)
        d_depth, d_conf = torch.chunk(out, 2, dim=1)
        rgb_conf, d_conf = torch.chunk(torch.softmax(torch.cat((rgb_conf, d_conf), 1), 1), 2, dim=1)
        coarse = rgb_conf * rgb_depth + d_conf * d_depth
        return torch.cat((r0p, dec5), 1), torch.cat((r2p, dec4), 1), coarse


# --------------------------------------------------------------------------------------------- PENet (C2)
class PENet(nn.Module):
    """ENet + DA-CSPN++ (dilation 2 then 1; kernels 3/5/7; 6 iterations each) = public ``PENet_C2``."""

    ITERS = 6

    def __init__(self):
        super().__init__()
        self.backbone = ENet()
        self.kernel_conf_layer = conv_bn(64, 3, relu=False)
        self.mask_layer = conv_bn(64, 1, relu=False)
        self.iter_guide_layer3 = GuideGen(64, 3)
        self.iter_guide_layer5 = GuideGen(64, 5)
        self.iter_guide_layer7 = GuideGen(64, 7)
        self.kernel_conf_layer_s2 = conv_bn(128, 3, relu=False)
        self.mask_layer_s2 = conv_bn(128, 1, relu=False)
        self.iter_guide_layer3_s2 = GuideGen(128, 3)
        self.iter_guide_layer5_s2 = GuideGen(128, 5)
        self.iter_guide_layer7_s2 = GuideGen(128, 7)
        for k in (3, 5, 7):
            self.register_buffer(f"encoder{k}", gather_kernel(k), persistent=False)
        init_weights(self)

    def _gather(self, g, k):
        return F.conv2d(g, getattr(self, f"encoder{k}"), padding=k // 2)

    def forward(self, rgb, d, position, K):
        valid = (d > 0).to(d.dtype)
        f1, f2, coarse = self.backbone(rgb, d, position, K)
        up = lambda t: F.interpolate(t, scale_factor=2, mode="nearest")  # noqa: E731

        d_s2, vm_s2 = sparse_downsample(d, valid)
        mask_s2 = torch.sigmoid(self.mask_layer_s2(f2)) * vm_s2
        kc_s2 = torch.softmax(self.kernel_conf_layer_s2(f2), 1)
        g_s2 = {k: up(self._gather(getattr(self, f"iter_guide_layer{k}_s2")(f2), k)) for k in (3, 5, 7)}
        depth_s2, mask_s2, kc_s2 = up(d_s2), up(mask_s2), up(kc_s2)

        mask = torch.sigmoid(self.mask_layer(f1)) * valid
        kc = torch.softmax(self.kernel_conf_layer(f1), 1)
        g = {k: self._gather(getattr(self, f"iter_guide_layer{k}")(f1), k) for k in (3, 5, 7)}

        hs = {k: coarse for k in (3, 5, 7)}
        for _ in range(self.ITERS):
            for k in (3, 5, 7):
                h = cspn_step(g_s2[k], hs[k], coarse, k, 2)
                hs[k] = mask_s2 * depth_s2 + (1 - mask_s2) * h
        ref_s2 = kc_s2[:, 0:1] * hs[3] + kc_s2[:, 1:2] * hs[5] + kc_s2[:, 2:3] * hs[7]

        hs = {k: ref_s2 for k in (3, 5, 7)}
        for _ in range(self.ITERS):
            for k in (3, 5, 7):
                h = cspn_step(g[k], hs[k], ref_s2, k, 1)
                hs[k] = mask * d + (1 - mask) * h
        return kc[:, 0:1] * hs[3] + kc[:, 1:2] * hs[5] + kc[:, 2:3] * hs[7]


def init_weights(model: nn.Module) -> None:
    """He-normal init of conv / deconv weights (fan = k*k*out, resp. k*k*in), BN to identity. (The public code's
    ``weights_init(self)`` only inspects the top module, so it effectively keeps PyTorch defaults; we apply the
    intended per-layer init. Irrelevant when a checkpoint is loaded.)"""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.ConvTranspose2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.in_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def build_penet() -> PENet:
    return PENet()


def position_grid(H: int, W: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(1, 2, H, W) (u, v) normalised to [-1, 1] (public ``AddCoordsNp``: index / (size - 1) * 2 - 1)."""
    u = torch.arange(W, device=device, dtype=dtype) / (W - 1) * 2 - 1
    v = torch.arange(H, device=device, dtype=dtype) / (H - 1) * 2 - 1
    return torch.stack([u.view(1, W).expand(H, W), v.view(H, 1).expand(H, W)], 0).unsqueeze(0)


# --------------------------------------------------------------------------------------------- checkpoints
IGNORED_PREFIXES = ("dimhalf_s2.", "att_12.", "encoder3", "encoder5", "encoder7")


class _InertObject:
    """Stand-in for the non-tensor objects in public PENet checkpoints (``argparse.Namespace`` args and
    ``metrics.Result`` best_result): instantiated without running any code, its state just stored."""

    def __setstate__(self, state):
        self.__dict__["_state"] = state


class _InertNamespace(_InertObject):
    pass


class _InertResult(_InertObject):
    pass


def _safe_load(path: Union[str, Path]):
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"PENet checkpoint not found: {path}")
    safe = [(_InertNamespace, "argparse.Namespace"), (_InertResult, "metrics.Result")]
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for disallowed globals, RuntimeError for corrupt archives
        raise CheckpointError(
            f"{path}: refused to load with torch.load(weights_only=True): {e}\n"
            "Only tensors (plus the argparse args / metrics.Result of public PENet checkpoints, loaded as inert "
            "data) are accepted. If you trust the file, re-save just its state dict in a trusted environment: "
            "torch.save({'model': torch.load(p, weights_only=False)['model']}, 'pe_state.pth')") from None


def extract_state_dict(obj) -> Dict[str, torch.Tensor]:
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        sd = obj["model"]
    elif isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        sd = obj["state_dict"]
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd = obj
    else:
        raise CheckpointError("checkpoint holds no state dict (expected a dict with 'model' as in pe.pth.tar, "
                              "'state_dict', or a plain state dict)")
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"state dict entry {k!r} is not a tensor ({type(v).__name__})")
        out[k[len("module."):] if k.startswith("module.") else k] = v
    return out


def load_penet_checkpoint(model: PENet, path: Union[str, Path]) -> Dict[str, list]:
    """Load a PENet checkpoint (pe.pth.tar layout) into ``model``. Raises :class:`CheckpointError` on missing keys,
    unexpected (non-ignored) keys or shape mismatches. Returns {'ignored': [...]} for the tolerated extra keys."""
    sd = extract_state_dict(_safe_load(path))
    ignored = [k for k in sd if k.startswith(IGNORED_PREFIXES)]
    sd = {k: v for k, v in sd.items() if not k.startswith(IGNORED_PREFIXES)}
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    bad = sorted(k for k in set(sd) & set(own) if sd[k].shape != own[k].shape)
    if missing or unexpected or bad:
        def few(lst):
            return ", ".join(lst[:5]) + (f" ... (+{len(lst) - 5})" if len(lst) > 5 else "")
        raise CheckpointError(f"{path}: does not match the PENet (C2) network: missing [{few(missing)}], "
                              f"unexpected [{few(unexpected)}], shape mismatch [{few(bad)}] "
                              "(an ENet-only 'e' checkpoint lacks the DA-CSPN++ layers)")
    model.load_state_dict(sd, strict=True)
    return {"ignored": ignored}


# --------------------------------------------------------------------------------------------- online completer
class PENetCompleter:
    """Runs :class:`PENet` on one frame: pads (bottom/right, zeros) to a multiple of 32, uses the frame's P2
    intrinsics, returns the (H, W) dense depth on the input's device (eval mode, no grad)."""

    def __init__(self, model: PENet, pad_multiple: int = 32):
        self.model = model.eval()
        self.pad = int(pad_multiple)
        self._device = None
        self._K = {}  # cached per calibration/device: a blocking H2D copy per frame would sync the stream

    def __call__(self, sparse: torch.Tensor, image: torch.Tensor, calib, K: Optional[torch.Tensor] = None
                 ) -> torch.Tensor:
        """``K``: (1, 3, 3) float32 intrinsics on the device instead of ``calib.P2``'s (the graph engine passes its
        per-frame calibration buffer, so a captured graph does not hold one calibration's)."""
        dev = sparse.device
        if self._device != dev:
            self.model.to(dev)
            self._device = dev
        H, W = sparse.shape
        Hp, Wp = -(-H // self.pad) * self.pad, -(-W // self.pad) * self.pad
        d = F.pad(sparse.view(1, 1, H, W).float(), (0, Wp - W, 0, Hp - H))
        rgb = F.pad(image.permute(2, 0, 1).unsqueeze(0).float(), (0, Wp - W, 0, Hp - H))
        if K is None:
            key = (calib.P2.tobytes(), str(dev))
            if key not in self._K:
                self._K = {key: torch.as_tensor(calib.P2[:, :3], dtype=torch.float32, device=dev).unsqueeze(0)}
            K = self._K[key]
        with torch.inference_mode():
            out = self.model(rgb, d, position_grid(Hp, Wp, dev), K)
        return out[0, 0, :H, :W].clamp_min(0)
