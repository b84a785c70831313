"""The ``depth:`` section of the model YAML (pseudo-point generation), validated with :class:`cmfiou_core.config.Section`.

Example (all keys optional; these are the defaults)::

    depth:
      method: ipbasic              # ipbasic (classical, no weights) | penet (needs depth.penet.checkpoint)
      crop_official: false         # true: crop image to the top-left 352x1216 before projection (official files)
      fov_filter_raw: true         # raw rows = FOV points only (get_fov_flag), as in the official .npy files
      min_depth: 0.01              # completed-depth pixels below this are not lifted
      max_z: 1.0                   # pseudo points with LiDAR z >= max_z are dropped
      thinning:
        enabled: true              # la_sampling2 angular thinning
        theta_min: 1.5             # drop points with polar angle theta <= theta_min (rad)
        voxel_size: [200.0, 0.002, 0.002]            # (r, theta, phi)
        voxel_range: [-100.0, -5.0, -5.0, 100.0, 5.0, 5.0]
        max_points_per_voxel: 100  # spconv Point2VoxelCPU3d cap: only the first 100 points (input order) compete
      ipbasic:
        max_depth: 100.0
        dilation_kernel: diamond5  # full3|full5|full7|cross3|cross5|cross7|diamond5|diamond7
        extrapolate: false         # extend the top pixel to the image top + 31x31 fill
        blur: bilateral            # bilateral | gaussian | none
      penet:
        checkpoint: null           # path to a PENet checkpoint (pe.pth.tar layout); required for method penet
        pad_multiple: 32
      discard:                     # test-time input_point_discard
        rate: 0.8
        bin_num: 10
        max_dis: 60.0
      timing: true                 # per-stage timings (CUDA events on GPU; one sync at the end)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Tuple

from ..config import ConfigError, Section

KERNELS = ("full3", "full5", "full7", "cross3", "cross5", "cross7", "diamond5", "diamond7")


@dataclass(frozen=True)
class ThinningConfig:
    enabled: bool = True
    theta_min: float = 1.5
    voxel_size: Tuple[float, float, float] = (200.0, 0.002, 0.002)
    voxel_range: Tuple[float, ...] = (-100.0, -5.0, -5.0, 100.0, 5.0, 5.0)
    max_points_per_voxel: int = 100


@dataclass(frozen=True)
class IPBasicConfig:
    max_depth: float = 100.0
    dilation_kernel: str = "diamond5"
    extrapolate: bool = False
    blur: str = "bilateral"


@dataclass(frozen=True)
class PENetConfig:
    checkpoint: Optional[str] = None
    pad_multiple: int = 32


@dataclass(frozen=True)
class DiscardConfig:
    rate: float = 0.8
    bin_num: int = 10
    max_dis: float = 60.0


@dataclass(frozen=True)
class DepthConfig:
    method: str = "ipbasic"
    crop_official: bool = False
    fov_filter_raw: bool = True
    min_depth: float = 0.01
    max_z: float = 1.0
    thinning: ThinningConfig = field(default_factory=ThinningConfig)
    ipbasic: IPBasicConfig = field(default_factory=IPBasicConfig)
    penet: PENetConfig = field(default_factory=PENetConfig)
    discard: DiscardConfig = field(default_factory=DiscardConfig)
    timing: bool = True
    enabled: bool = True  # false: never use the camera (LiDAR-only model; the pseudo branch stays empty)

    OFFICIAL_CROP = (352, 1216)  # (H, W), top-left crop of the official PENet pseudo-point generation

    @classmethod
    def from_section(cls, sec: Section) -> "DepthConfig":
        d = cls()
        method = sec.str("method", d.method, choices=("ipbasic", "penet"))
        crop = sec.bool("crop_official", d.crop_official)
        fov = sec.bool("fov_filter_raw", d.fov_filter_raw)
        min_depth = sec.float("min_depth", d.min_depth, min=0.0)
        max_z = sec.float("max_z", d.max_z)
        timing = sec.bool("timing", d.timing)
        enabled = sec.bool("enabled", d.enabled)

        t = sec.sub("thinning")
        th = ThinningConfig(
            enabled=t.bool("enabled", True),
            theta_min=t.float("theta_min", 1.5, min=0.0, max=3.2),
            voxel_size=tuple(t.floats("voxel_size", [200.0, 0.002, 0.002], length=3)),
            voxel_range=tuple(t.floats("voxel_range", [-100.0, -5.0, -5.0, 100.0, 5.0, 5.0], length=6)),
            max_points_per_voxel=t.int("max_points_per_voxel", 100, min=1),
        )
        if any(v <= 0 for v in th.voxel_size):
            raise ConfigError(f"{sec.source}: '{t.path}.voxel_size' entries must be > 0, got {list(th.voxel_size)}")
        r = th.voxel_range
        if not (r[0] < r[3] and r[1] < r[4] and r[2] < r[5]):
            raise ConfigError(f"{sec.source}: '{t.path}.voxel_range' must be [min_r, min_t, min_p, max_r, max_t, "
                              f"max_p] with min < max, got {list(r)}")
        t.finish()

        i = sec.sub("ipbasic")
        ip = IPBasicConfig(
            max_depth=i.float("max_depth", 100.0, min=1.0),
            dilation_kernel=i.str("dilation_kernel", "diamond5", choices=KERNELS),
            extrapolate=i.bool("extrapolate", False),
            blur=i.str("blur", "bilateral", choices=("bilateral", "gaussian", "none")),
        )
        i.finish()

        p = sec.sub("penet")
        ck = p.raw("checkpoint", None)
        if ck is not None and not isinstance(ck, str):
            raise ConfigError(f"{sec.source}: '{p.path}.checkpoint' must be a path string or null, got {ck!r}")
        pe = PENetConfig(checkpoint=ck, pad_multiple=p.int("pad_multiple", 32, min=32))
        if pe.pad_multiple % 32:
            raise ConfigError(f"{sec.source}: '{p.path}.pad_multiple' must be a multiple of 32 (5 stride-2 stages)")
        p.finish()

        q = sec.sub("discard")
        dc = DiscardConfig(rate=q.float("rate", 0.8, min=0.0, max=1.0), bin_num=q.int("bin_num", 10, min=1),
                           max_dis=q.float("max_dis", 60.0, min=0.0))
        q.finish()
        sec.finish()
        return cls(enabled=enabled, method=method, crop_official=crop, fov_filter_raw=fov, min_depth=min_depth, max_z=max_z,
                   thinning=th, ipbasic=ip, penet=pe, discard=dc, timing=timing)

    @classmethod
    def from_dict(cls, data: Optional[Mapping[str, Any]], source: str = "<config>", path: str = "depth"
                  ) -> "DepthConfig":
        return cls.from_section(Section(data, path, source))
