"""Frame -> Detections: the single inference path used by the ROS node, the bag evaluation and the benchmarks.

Stages (each timed; CUDA events on the GPU, so timing adds no host sync until the frame's single sync at the end):
``h2d`` (host -> device copies) -> ``depth.*`` (projection, completion, lifting, thinning; skipped when the camera is
missing) -> ``preprocess`` (range mask, test-time pseudo subsampling) -> ``voxelize`` (test views, voxels) -> ``vfe`` ->
``backbone_3d`` -> ``bev`` (height compression + BEV backbone) -> ``rpn`` (dense head + proposal decode) ->
``roi_head`` (proposal NMS + 3 refinement stages + IoU branch) -> ``postprocess`` (rectified scores + NMS) -> ``d2h``.
The model stages (``vfe`` .. ``roi_head``) are the model's own ordered list (``model.detector.STAGES``, run by
``CMFIOU.run_stages`` with a timing hook). ``engine="graph"`` runs the frame as static code instead: ``h2d`` ->
``prelude`` (``engine.prelude``: depth .. VFE) -> ``engine`` (``engine.frame.FrameGraph``: backbone .. post-processing,
ending with the frame's one device->host copy), CUDA graphs on the GPU.

LiDAR-only operation: when ``frame.image`` is None the pseudo branch receives no points (the flag ``lidar_only`` is
set on the result). With a calibration that knows the image size the raw points are still restricted to the camera
field of view, as in training (``FOV_POINTS_ONLY``).
"""
from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from . import resources
from .calib import Calibration
from .config import ConfigError
from .depth.config import DepthConfig
from .depth.io import input_point_discard
from .depth.projection import fov_flag, project_points
from .depth.pseudo import PseudoPointGenerator, raw_rows_from_points
from .model.detector import build_model, prepare_batch
from .model.model_config import ENGINES, PRECISIONS, FullConfig, InferenceConfig, graph_engine_unsupported, load_config
from .model.voxelize import Voxelizer
from .timing import StageTimer
from .types import Detections, Frame

log = logging.getLogger(__name__)

DEFAULT_CONFIG_NAME = "cmfiou_kitti.yaml"
# Trained here on generated scenes (cmfiou-gen-scenes), NOT on KITTI: camera+LiDAR, 1120 iterations (7 epochs) on the
# H100 with config/cmfiou_kitti.yaml. It detects the generator's objects and serves the demo and the end-to-end tests.
# See README "Demo checkpoint". Both are resources of the installed package (cmfiou_core.resources).
DEMO_CHECKPOINT_NAME = "cmfiou_synthetic_demo_fp16.pt"
DEMO_CONFIG_NAME = "cmfiou_kitti.yaml"


def default_config() -> Path:
    """The installed ``config/cmfiou_kitti.yaml`` (ResourceNotFound, naming where it looked, when missing)."""
    return resources.config(DEFAULT_CONFIG_NAME)


def demo_checkpoint() -> Path:
    """The installed demo checkpoint ``models/cmfiou_synthetic_demo_fp16.pt`` (ResourceNotFound when missing)."""
    return resources.model(DEMO_CHECKPOINT_NAME)


def demo_config() -> Path:
    return resources.config(DEMO_CONFIG_NAME)


_LAZY = {"DEFAULT_CONFIG": default_config, "DEMO_CHECKPOINT": demo_checkpoint, "DEMO_CONFIG": demo_config}


def __getattr__(name: str):
    """``DEFAULT_CONFIG`` / ``DEMO_CHECKPOINT`` / ``DEMO_CONFIG``: the installed resources, looked up when used
    (importing this module never depends on them)."""
    if name in _LAZY:
        return _LAZY[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# the smallest image side depth completion takes (ipbasic's 5x5 reflect-101 windows need 3 pixels); smaller images
# run LiDAR-only (Detections.note says so)
MIN_IMAGE_SIDE = 3


def check_finite_weights(model: torch.nn.Module, source: object = "the model") -> None:
    """Refuse weights with NaN/inf in any parameter or floating buffer (such a model detects nothing, silently)."""
    bad = [(k, int((~torch.isfinite(v)).sum())) for k, v in model.state_dict().items()
           if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        first = ", ".join(f"{k} ({n})" for k, n in bad[:3])
        raise ConfigError(f"{source}: {len(bad)} weight tensor(s) contain NaN or inf (non-finite values: {first}"
                          f"{', ...' if len(bad) > 3 else ''}): refusing to run them")


class Pipeline:
    """``Pipeline.from_config(config, checkpoint, device)``; ``pipeline(frame) -> Detections``."""

    def __init__(self, cfg: FullConfig, model: torch.nn.Module, device: Union[str, torch.device] = "cpu",
                 timing: bool = True, seed: int = 0, weights_loaded: bool = True, amp: Optional[str] = None,
                 engine: str = "eager", precision: Optional[str] = None):
        if engine not in ("eager", "graph"):
            raise ConfigError(f"engine must be eager or graph, got {engine!r}")
        if amp not in (None, "off", "fp16", "bf16"):
            raise ConfigError(f"amp must be off, fp16 or bf16, got {amp!r}")
        precision = cfg.inference.precision if precision is None else precision
        if precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if precision == "bf16" and amp in (None, "off") and torch.device(device).type == "cuda":
            amp = "bf16"
        self.amp = None if amp in (None, "off") else {"fp16": torch.float16, "bf16": torch.bfloat16}[amp]
        self.cfg = cfg
        self.mcfg = cfg.model
        self.device = torch.device(device)
        self.precision = precision
        if self.device.type == "cuda":
            # process-wide switches (inference.precision): TF32 tensor-core products in fp32 matmuls / cuDNN
            # convolutions and in the engine's fused convolutions, or IEEE fp32 everywhere
            torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"
            torch.backends.cudnn.allow_tf32 = precision != "fp32"
        self.model = model.to(self.device).eval()
        self.engine = engine
        self._frame_graph = None
        if engine == "graph":
            # every stage after VFE as one static-shape function (engine.frame): one CUDA graph per capacity bucket
            # on CUDA, the same static code without a graph on the CPU. Reduced precision (amp / bf16) applies to
            # the sparse backbone's features and products only; the dense and RoI heads stay fp32
            from .engine.frame import FrameGraph
            from .engine.runtime import use_engine

            why = graph_engine_unsupported(self.mcfg)
            if why:
                raise ConfigError(f"engine 'graph' cannot run {cfg.source}: {why}")
            self._frame_graph = FrameGraph(self.model, use_engine(self.model, dtype=self.amp or torch.float32))
        self._front = None
        self.depth_cfg = DepthConfig.from_dict(cfg.depth, cfg.source)
        self.depth = PseudoPointGenerator(self.depth_cfg)
        self.timing = timing
        self.weights_loaded = weights_loaded
        # where the weights come from ("checkpoint PATH", "demo: ...", "random: ..."), shown by the node's diagnostics
        self.weights = "checkpoint" if weights_loaded else "random: no checkpoint (detections are meaningless)"
        self.voxelizer = Voxelizer(self.mcfg.voxel_size, self.mcfg.point_cloud_range, self.mcfg.max_points_per_voxel,
                                   self.mcfg.max_voxels(False))
        self.views = self.mcfg.test_views.params()
        self.seed = int(seed)
        # re-seeded from each frame's points (frame_seed); a CPU generator on every device, so the discard draws
        # the same numbers on any host and in both engines (its stream is sequential: rand(N) = rand(M)[:N])
        self._gen = torch.Generator()
        r = self.mcfg.point_cloud_range
        self._range_lo = torch.tensor(r[:3], dtype=torch.float32, device=self.device)
        self._range_hi = torch.tensor(r[3:], dtype=torch.float32, device=self.device)
        self.class_names = tuple(self.mcfg.class_names)
        self.score_mode = self.mcfg.post_processing.score_mode  # carried in every Detections
        self._use_pinned = self.device.type == "cuda"
        self._pinned: Dict[str, torch.Tensor] = {}
        # ``hook(stage, batch)`` callables run after ``voxelize`` (the model's input batch) and after each model stage
        # (``model.detector.STAGES``) that runs on the batch: recording (bench/bench_engine.py), never timing-critical
        self.stage_hooks: List[Callable[[str, Dict[str, Any]], None]] = []
        if self._frame_graph is not None:
            # the graph engine's front (engine.prelude): h2d -> depth, range masks, discard, voxels, VFE as static
            # code in front of FrameGraph, no host sync until the result's one device->host copy. With stage hooks
            # set, frames take the eager front (the hooks record its batch dict) and FrameGraph after VFE.
            from .engine.prelude import StaticFront

            self._front = StaticFront(self, self._frame_graph, lambda pts: frame_seed(pts, self.seed), _identity_calib)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: Union[str, Path, None] = None, checkpoint: Union[str, Path, None] = None,
                    device: Union[str, torch.device] = "cpu", timing: bool = True, seed: int = 0,
                    amp: Optional[str] = None, engine: Optional[str] = None,
                    precision: Optional[str] = None) -> "Pipeline":
        """Build from a YAML config and a checkpoint (OpenPCDet-style official file or ours; ``weights_only``).

        ``checkpoint`` None or "" selects the bundled demo checkpoint (camera+LiDAR, trained on generated scenes) and,
        without ``config``, its config ``config/cmfiou_kitti.yaml``; "none" builds
        the network with random weights: it runs, but its detections are meaningless (logged as an error).
        ``engine`` eager / graph / auto (graph on CUDA); None = the config's ``inference.engine``. ``precision``
        fp32 / tf32 / bf16 (CUDA); None = the config's ``inference.precision``."""
        from .model.checkpoint import load_checkpoint

        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but CUDA is not available on this machine; use 'cpu'")
        if dev.type == "cpu":
            # spconv's multithreaded CPU convolution was measured wrong and non-deterministic with >1 thread
            torch.set_num_threads(1)
        weights = f"checkpoint {checkpoint}"
        if checkpoint is None or checkpoint == "":
            checkpoint = str(demo_checkpoint())  # a missing demo checkpoint is an error naming where it looked
            weights = (f"demo: bundled checkpoint {Path(checkpoint).name} (trained on generated scenes only, not for "
                       "real sensors)")
            if not config:
                config = demo_config()
            log.warning("no checkpoint given: using the bundled demo checkpoint %s (camera+LiDAR, trained on "
                        "generated scenes, not on KITTI) with %s", checkpoint, config)
        elif str(checkpoint).lower() == "none":
            checkpoint = None
            weights = "random: no checkpoint (detections are meaningless)"
        cfg = load_config(config or default_config())
        model = build_model(cfg)
        loaded = False
        if checkpoint:
            _, report = load_checkpoint(checkpoint, model, strict=True)
            check_finite_weights(model, checkpoint)
            loaded = True
            missing = getattr(report, "missing_iou_keys", None)
            if missing:
                log.warning("checkpoint %s has no IoU-branch weights (%d keys): the IoU branch is untrained",
                            checkpoint, len(missing))
        else:
            log.error("no checkpoint given: the detector runs with RANDOM weights and its detections are meaningless")
        if engine is None:
            engine = cfg.inference.engine
        if engine not in ENGINES:
            raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
        requested = engine
        engine = InferenceConfig(engine).resolve(dev)
        why = graph_engine_unsupported(cfg.model) if engine == "graph" and requested == "auto" else None
        if why:
            log.warning("inference.engine auto: the graph engine cannot run %s: %s; running the eager engine",
                        cfg.source, why)
            engine = "eager"
        pipe = cls(cfg, model, dev, timing=timing, seed=seed, weights_loaded=loaded, amp=amp, engine=engine,
                   precision=precision)
        pipe.weights = weights
        return pipe

    # ------------------------------------------------------------------ helpers
    def _to_device(self, array: np.ndarray, slot: str) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(array))
        if not self._use_pinned:
            return t.to(self.device)
        # reusable page-locked staging buffers (allocating pinned memory per frame measured ~5 ms); the frame ends
        # with a device->host copy that synchronises, so a buffer is never overwritten while a copy is in flight
        buf = self._pinned.get(slot)
        if buf is None or buf.numel() < t.numel() or buf.dtype != t.dtype:
            buf = torch.empty(max(t.numel(), 1) * 5 // 4, dtype=t.dtype).pin_memory()
            self._pinned[slot] = buf
        staged = buf[:t.numel()].view(t.shape)
        staged.copy_(t)   # 0.02 ms for 1.9 MB on the H200 host (np.copyto: 0.16 ms)
        return staged.to(self.device, non_blocking=True)

    def _fov_raw(self, pts: torch.Tensor, calib: Optional[Calibration]) -> torch.Tensor:
        if calib is None or calib.image_width is None or not self.depth_cfg.fov_filter_raw:
            return raw_rows_from_points(pts)
        V2R, P2, _ = self.depth._mats(calib, pts.device)
        uv, d = project_points(pts[:, :3], V2R, P2)
        keep = fov_flag(uv, d, int(calib.image_height), int(calib.image_width))
        return raw_rows_from_points(pts[keep])

    def _range_mask(self, rows: torch.Tensor) -> torch.Tensor:
        xyz = rows[:, :3]
        keep = ((xyz >= self._range_lo) & (xyz <= self._range_hi)).all(dim=1)
        return rows[keep]

    def warmup(self, iterations: int = 2) -> None:
        """Run synthetic frames through every stage (allocator, cuDNN/spconv algorithm selection)."""
        rng = np.random.default_rng(0)
        n = 20000
        pts = np.stack([rng.uniform(2, 60, n), rng.uniform(-20, 20, n), rng.uniform(-2, 0.5, n),
                        rng.uniform(0, 1, n)], 1).astype(np.float32)
        P2 = np.array([[721.5, 0, 609.6, 44.9], [0, 721.5, 172.9, 0.2], [0, 0, 1, 0.003]])
        Tr = np.array([[0, -1, 0, 0], [0, 0, -1, -0.08], [1, 0, 0, -0.27]], dtype=np.float64)
        calib = Calibration(P2, np.eye(3), Tr, 1242, 375)
        img = rng.integers(0, 255, (375, 1242, 3), dtype=np.uint8)
        for _ in range(iterations):
            self(Frame(pts, img, calib))

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def __call__(self, frame: Frame) -> Detections:
        if not isinstance(frame, Frame):
            raise TypeError(f"Pipeline expects a cmfiou_core.types.Frame, got {type(frame).__name__}")
        timer = StageTimer(self.device, self.timing)
        wall0 = time.perf_counter()
        timer.mark("start")
        note = ""
        image = frame.image
        if image is not None and min(image.shape[0], image.shape[1]) < MIN_IMAGE_SIDE:
            note = (f"image {image.shape[1]}x{image.shape[0]} is smaller than the {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} "
                    "depth completion needs: ran LiDAR-only")
            image = None
        if self._front is not None and not self.stage_hooks:
            return self._call_front(frame, image, note, timer, wall0)
        batch, lidar_only, depth_ms = self.eager_front(frame, image, timer)
        if batch is None:  # nothing for the raw branch (it needs at least one voxel): no detections
            return self._no_points(frame, lidar_only, wall0)
        hooks = self.stage_hooks

        def after_stage(name, b):
            timer.mark(name)
            for h in hooks:
                h(name, b)
        for h in hooks:
            h("voxelize", batch)
        m = self.model
        eager_amp = self.amp is not None and self._frame_graph is None   # the graph engine carries its own dtype
        with torch.autocast(self.device.type, dtype=self.amp, enabled=eager_amp):
            if self._frame_graph is not None:
                batch = m.run_stages(batch, after_stage, skip=("backbone_3d", "bev", "rpn", "roi_head"))
                det = self._frame_graph(batch)   # backbone .. post-processing, one device->host copy
                timer.mark("engine")
            else:
                batch = m.run_stages(batch, after_stage)
        if self._frame_graph is None:
            if self.amp is not None:
                for k in ("batch_box_preds", "batch_cls_preds", "batch_iou_preds", "rois"):
                    if isinstance(batch.get(k), torch.Tensor):
                        batch[k] = batch[k].float()
            det = m.post_process(batch)[0]
        timer.mark("postprocess")
        out = torch.cat([det.boxes.float(), det.labels.float()[:, None], det.cls.float()[:, None],
                         det.iou.float()[:, None], det.score.float()[:, None]], 1).cpu()
        timer.mark("d2h")
        o = out.numpy()
        timings = timer.result()
        if depth_ms:
            timings.pop("depth", None)
            timings = {**{k: v for k, v in timings.items() if k == "h2d"}, **depth_ms,
                       **{k: v for k, v in timings.items() if k != "h2d"}}
        timings["total"] = (time.perf_counter() - wall0) * 1e3
        return Detections(o[:, :7], o[:, 7].astype(np.int64), o[:, 8], o[:, 9], o[:, 10], stamp_ns=frame.stamp_ns,
                          frame_id=frame.frame_id, lidar_only=lidar_only, timings_ms=timings,
                          class_names=self.class_names, score_mode=self.score_mode, note=note)


    def eager_front(self, frame: Frame, image: Optional[np.ndarray], timer: StageTimer
                    ) -> Tuple[Optional[Dict[str, Any]], bool, Dict[str, float]]:
        """The eager stages before the model (h2d, depth, range masks, discard, voxelization) -> (the model's input
        batch, or None when no raw point is in range; lidar_only; depth stage timings)."""
        pts = self._to_device(frame.points, "points")
        img = self._to_device(image, "image") if image is not None and self.depth_cfg.enabled else None
        timer.mark("h2d")
        lidar_only = img is None or not self.depth_cfg.enabled
        depth_ms: Dict[str, float] = {}
        if lidar_only:
            raw = self._fov_raw(pts, frame.calib)
            pseudo = torch.zeros((0, 8), dtype=torch.float32, device=self.device)
        else:
            res = self.depth(pts, img, frame.calib)
            raw, pseudo = res.raw_rows, res.pseudo_rows
            depth_ms = {f"depth.{k}": v for k, v in res.timings_ms.items() if k != "total"}
        timer.mark("depth")
        raw = self._range_mask(raw)
        pseudo = self._range_mask(pseudo)
        if raw.shape[0] == 0:
            return None, lidar_only, depth_ms
        rate = self.cfg.dataset.discard_rate  # data.input_discard_rate, validated at load
        rate = self.depth_cfg.discard.rate if rate is None else rate
        if pseudo.shape[0] and rate > 0:
            pseudo = input_point_discard(pseudo, rate=rate, bin_num=self.depth_cfg.discard.bin_num,
                                         max_dis=self.depth_cfg.discard.max_dis,
                                         generator=self._gen.manual_seed(frame_seed(frame.points, self.seed)))
        # test views (if any) are applied by prepare_batch (geometry.view_transform, the one implementation)
        tparams = None if len(self.views) == 1 and self.views[0] == [0.0, 0.0, 1.0] else [self.views]
        calib = frame.calib if frame.calib is not None else _identity_calib()
        h = calib.image_height or 375
        w = calib.image_width or 1242
        timer.mark("preprocess")
        batch = prepare_batch([raw], [pseudo], [calib], self.mcfg, image_shapes=[(h, w)], training=False,
                              transform_params=tparams, device=self.device, voxelizer=self.voxelizer)
        timer.mark("voxelize")
        return batch, lidar_only, depth_ms

    def _no_points(self, frame: Frame, lidar_only: bool, wall0: float, voxels: bool = False) -> Detections:
        """Empty detections: no raw LiDAR point (``voxels``: voxel) inside the detection range."""
        lo, hi = self._range_lo.tolist(), self._range_hi.tolist()
        fov = frame.calib is not None and self.depth_cfg.fov_filter_raw
        where = " and the camera's field of view" if fov else ""
        what = "voxel" if voxels else "point"
        det = Detections.empty(frame.stamp_ns, frame.frame_id, lidar_only, score_mode=self.score_mode, note=(
            f"no LiDAR {what} inside the detection range x [{lo[0]:g}, {hi[0]:g}] y [{lo[1]:g}, {hi[1]:g}] "
            f"z [{lo[2]:g}, {hi[2]:g}] m{where}"))
        det.timings_ms = {"total": (time.perf_counter() - wall0) * 1e3}
        return det

    def _call_front(self, frame: Frame, image: Optional[np.ndarray], note: str, timer: StageTimer,
                    wall0: float) -> Detections:
        """``engine='graph'``: the whole frame through ``engine.prelude.StaticFront`` (stages ``h2d``, ``prelude``,
        ``engine``, the last ending with the one device->host copy)."""
        lidar_only = image is None or not self.depth_cfg.enabled
        res = self._front(frame, image, timer)
        if res.detections is None:
            return self._no_points(frame, lidar_only, wall0, voxels=res.raw_rows > 0)
        det = res.detections
        o = torch.cat([det.boxes.float(), det.labels.float()[:, None], det.cls.float()[:, None],
                       det.iou.float()[:, None], det.score.float()[:, None]], 1).numpy()
        timings = timer.result()
        timings["total"] = (time.perf_counter() - wall0) * 1e3
        return Detections(o[:, :7], o[:, 7].astype(np.int64), o[:, 8], o[:, 9], o[:, 10], stamp_ns=frame.stamp_ns,
                          frame_id=frame.frame_id, lidar_only=lidar_only, timings_ms=timings,
                          class_names=self.class_names, score_mode=self.score_mode, note=note)


def frame_seed(points: np.ndarray, seed: int = 0) -> int:
    """Seed of a frame's test-time randomness (the pseudo-point discard): a hash of its LiDAR points and the pipeline
    seed, so a frame's detections depend on the frame alone, never on which frames (or warm-up) ran before it."""
    h = hashlib.sha1(np.ascontiguousarray(points, np.float32).data)
    h.update(int(seed).to_bytes(8, "little", signed=True))
    return int.from_bytes(h.digest()[:8], "little") & ((1 << 63) - 1)


def _identity_calib() -> Calibration:
    """Placeholder calibration for LiDAR-only frames without any camera model (the pseudo branch is empty, so the
    image-plane projection of ResVC never runs on real data)."""
    P2 = np.array([[700.0, 0, 620, 0], [0, 700.0, 187, 0], [0, 0, 1, 0]])
    Tr = np.array([[0, -1, 0, 0], [0, 0, -1, 0], [1, 0, 0, 0]], dtype=np.float64)
    return Calibration(P2, np.eye(3), Tr, 1242, 375)
