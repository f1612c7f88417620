"""Fixed-shape batched restoration sampler: one CUDA graph for the whole K-step loop.

Math: SPEC 5 (restoration = posterior sampling) with the SPEC 4 update steps; the reference
of one batch is :func:`ambient_fast.samplers.restore.restore`, and this engine computes the
same thing (tests check it) under three constraints that the reference does not have:

- **Static shapes and addresses.** Every input of a batch lives in a static device buffer:
  the stored samples ``raw_in (B, *storage_shape)`` (uint8 images or floats), the model-space
  start ``y0 (B, *model_shape)`` and the conditioning ``cond[name]`` that the codec's
  :meth:`~.stages.DeviceCodec.encode` fills (eagerly, before each replay: pixel
  ``u8 / 127.5 - 1``, latent VAE encode + captions), the start levels ``sigma_start (B,)``,
  the per-sample level table ``(K+1, B)`` float64 (transposed, so a step's column is
  contiguous), and the per-sample seeds ``(B,)`` int64. The loop reads only those and writes
  ``x_out``, which :meth:`~.stages.DeviceCodec.decode` turns into the static outputs after
  the replay; so the loop is captured once per batch shape and replayed for every batch; a
  partial last batch is padded by the caller (rows repeat row 0), never recaptured.
- **No host syncs, no value-dependent Python.** The loop structure depends on ``(K, method,
  final_to_zero)`` only: with ``sigma_out = 0`` every sample's last step goes to 0 (an Euler
  step; NFE ``2K-1`` for Heun, the anchors' 35 at K = 18), otherwise every step is a full Heun
  step (NFE ``2K``). Zero-length steps (``sigma_min <= sigma_floor``) are computed, not
  skipped: they leave the state unchanged.
- **Counter-based noise.** Start and step noise come from
  :func:`ambient_fast.core.noise.sample_normal` on each sample's own seed (pure tensor
  ops, no generator state), so replays draw the right noise and a sample's output does not
  depend on its batch, its padding or its rank.

Execution modes (``compile`` x ``cuda_graph``): the per-step function (one Euler, Heun or
ancestral step, network evaluations included) runs eagerly with the fused step kernels of
:mod:`ambient_fast.kernels.dispatch`, or is ``torch.compile``d with ``fullgraph=True`` (then
the plain-PyTorch step ops are used so Inductor fuses them with the network's epilogue).
``cuda_graph=True`` captures the whole K-step trajectory -- start noise and steps, from
``y0`` to ``x_out`` -- into one ``torch.cuda.CUDAGraph`` after a warm-up on a side stream (which
also triggers compilation). ``compile="reduce-overhead"`` instead lets Inductor's CUDA-graph
trees capture each step (our graph is then off: graphs cannot nest).

Host <-> device: inputs go host (pinned) -> device staging on a copy stream (double
buffered, so the copy of batch j+1 overlaps the replay of batch j), then one D2D copy into
the static buffers on the compute stream (a batch a GPU decoder already wrote to the device,
``HostBatch.raw_device``, skips the H2D); encode, replay and decode follow on the compute
stream; the outputs (already quantised to the storage dtype on the device) are copied back
into the host batch's pinned buffers and an event is recorded.
Nothing here waits on the device: the consumer of a :class:`HostBatch` waits on its event.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..core.noise import STREAM_NATURE, STREAM_RESTORE, STREAM_STEP, derive_seeds, sample_normal
from ..kernels.dispatch import REFERENCE, Backend, step_backend
from ..samplers.restore import RESTORE_SIGMA_FLOOR
from .stages import IMAGE_UINT8, DeviceCodec, GridSpec

__all__ = [
    "CompileMode",
    "Method",
    "StartNoise",
    "SamplerConfig",
    "HostBatch",
    "RestorationSampler",
    "fill_host_batch",
]

Method = Literal["heun", "euler", "stochastic"]
StartNoise = Literal["fresh", "training", "none"]
CompileMode = Literal["none", "default", "max-autotune-no-cudagraphs", "reduce-overhead"]
METHODS: tuple[str, ...] = ("heun", "euler", "stochastic")
START_NOISE: tuple[str, ...] = ("fresh", "training", "none")
COMPILE_MODES: tuple[str, ...] = ("none", "default", "max-autotune-no-cudagraphs", "reduce-overhead")


@dataclass(frozen=True)
class SamplerConfig:
    """Everything that fixes the captured loop (see the module docstring)."""

    num_steps: int = 18  # grid points before the final level (anchor: 18 -> NFE 35 with Heun)
    method: Method = "heun"  # heun | euler | stochastic (ancestral reverse SDE, SPEC 5)
    final_to_zero: bool = True  # sigma_out == 0: last step integrates to the data
    start_noise: StartNoise = "fresh"  # fresh per-sample noise | the training's frozen noise | none (stored noisy)
    state_dtype: torch.dtype = torch.float32  # sampler state (anchors: float64)
    amp_dtype: torch.dtype | None = None  # autocast dtype for the network (None: its own dtype)
    compile: CompileMode = "none"  # torch.compile mode of the per-step function
    cuda_graph: bool | None = None  # capture the whole loop; None: on for CUDA unless reduce-overhead
    backend: str = "auto"  # fused step ops for eager steps (see kernels.dispatch)

    def __post_init__(self) -> None:
        if not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"num_steps must be an integer >= 1, got {self.num_steps!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.start_noise not in START_NOISE:
            raise ValueError(f"start_noise must be one of {START_NOISE}, got {self.start_noise!r}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, got {self.compile!r}")
        if self.state_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"state_dtype must be float32 or float64, got {self.state_dtype}")
        if self.amp_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"amp_dtype must be None, bfloat16 or float16, got {self.amp_dtype}")
        if self.cuda_graph and self.compile == "reduce-overhead":
            raise ValueError("compile='reduce-overhead' captures its own CUDA graphs; use cuda_graph=False with it")

    @property
    def nfe(self) -> int:
        """Network evaluations per sample."""
        if self.method != "heun":
            return self.num_steps
        return 2 * self.num_steps - (1 if self.final_to_zero else 0)


@dataclass
class HostBatch:
    """One batch on the host: inputs filled by the reader, the outputs filled by the sampler.

    Rows ``[count:]`` are padding (copies of row 0). Pinned when the sampler is on CUDA.
    After :meth:`RestorationSampler.submit`, call :meth:`wait` before reading ``outputs``.
    """

    raw: torch.Tensor  # (B, *storage_shape) storage dtype: the stored samples y0
    sigma_start: torch.Tensor  # (B,) float64: sigma_min of each sample
    table: torch.Tensor  # (B, K+1) float64: per-sample levels (GridSpec.table)
    seeds: torch.Tensor  # (B,) int64: per-sample seeds for the start and step noise
    start_seeds: torch.Tensor  # (B,) int64: seeds of the training's frozen noise (start_noise="training")
    outputs: dict[str, torch.Tensor]  # name -> (B, *shape): DeviceCodec.outputs, "sample" = restored rows
    context: Any = None  # Stages.prepare's per-batch host context, handed to DeviceCodec.encode
    raw_device: torch.Tensor | None = None  # (B, *storage_shape) on the sampler's device: used instead of raw
    # when set (a GPU decoder wrote the batch there; its writer synchronised before submit)
    count: int = 0
    ready: torch.cuda.Event | None = None

    @property
    def out(self) -> torch.Tensor:
        """``(B, *storage_shape)`` restored samples (the ``"sample"`` output)."""
        return self.outputs["sample"]

    def wait(self) -> None:
        """Block the calling thread until ``outputs`` hold this batch's result."""
        if self.ready is not None:
            self.ready.synchronize()


def fill_host_batch(
    batch: HostBatch,
    sample_ids: torch.Tensor,
    sigma_min: torch.Tensor,
    *,
    grid: GridSpec,
    seed: int,
    training_noise_seed: int = 0,
) -> None:
    """Fill the per-sample levels and seeds of ``batch`` for ``n`` samples (SPEC 5).

    ``batch.raw[:n]`` must already hold the samples. Rows ``n:`` are padded with row 0 (a
    valid, finite input whose result is discarded).

    Args:
        sample_ids: int ``(n,)`` dataset indices (seeds derive from ``(seed, id)``).
        sigma_min: ``(n,)`` start levels (> 0).
        grid: the levels (:class:`~.stages.GridSpec`); the table width fixes K.
        seed: run seed of the restoration noise; training_noise_seed: the training's
            ``noise_seed`` (for ``start_noise="training"``, as in ``noisy_pair``).
    """
    n = int(sample_ids.shape[0])
    if not 1 <= n <= batch.raw.shape[0]:
        raise ValueError(f"a batch holds 1..{batch.raw.shape[0]} samples, got {n}")
    sm = sigma_min.to(torch.float64)
    batch.count = n
    batch.sigma_start[:n] = sm
    batch.table[:n] = grid.table(sm, batch.table.shape[1] - 1)
    batch.seeds[:n] = derive_seeds(sample_ids, seed)
    batch.start_seeds[:n] = derive_seeds(sample_ids, training_noise_seed)
    for t in (batch.raw, batch.sigma_start, batch.table, batch.seeds, batch.start_seeds):
        t[n:] = t[:1]


class RestorationSampler:
    """Restores fixed-size batches ``(B, *shape)`` on one device (SPEC 5; see module doc).

    Args:
        denoiser: EDM denoiser ``D(x, sigma) -> x0`` (``x`` ``(B, *model_shape)``, ``sigma``
            ``(B,)`` float64), e.g. :class:`~ambient_fast.EDMPrecond`; with a conditioning
            codec, whatever :meth:`~.stages.DeviceCodec.wrap_denoiser` takes. Must be a pure
            function of its inputs (eval mode, no host syncs) to be captured.
        sample_shape: per-sample *storage* shape, e.g. ``(3, 32, 32)`` uint8 images.
        batch_size: ``B``, the static batch of the captured loop.
        config: :class:`SamplerConfig` (``num_steps`` = K, the table width minus one).
        codec: the device hooks (:class:`~.stages.DeviceCodec`: :data:`~.stages.IMAGE_UINT8`,
            :func:`~.stages.float_codec`, or a latent codec).
        device: where to run.
    """

    def __init__(
        self,
        denoiser: Callable[..., torch.Tensor],
        sample_shape: tuple[int, ...],
        batch_size: int,
        config: SamplerConfig,
        *,
        codec: DeviceCodec = IMAGE_UINT8,
        device: torch.device | str = "cpu",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.cuda = self.device.type == "cuda"
        if config.cuda_graph and not self.cuda:
            raise ValueError("cuda_graph=True needs a CUDA device")
        self.use_graph = self.cuda and config.compile != "reduce-overhead" and config.cuda_graph is not False
        self.config, self.codec = config, codec
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.model_shape = tuple(int(s) for s in codec.model_shape(self.sample_shape))
        self.batch_size = batch_size
        k1 = config.num_steps + 1
        dev = self.device
        # Static device buffers: the only memory the captured loop reads and writes.
        self.raw_in = torch.zeros((batch_size, *self.sample_shape), dtype=codec.storage_dtype, device=dev)
        self.y0 = torch.zeros((batch_size, *self.model_shape), dtype=config.state_dtype, device=dev)
        self.cond = {
            name: torch.zeros((batch_size, *shape), dtype=dtype, device=dev)
            for name, (shape, dtype) in codec.conditioning(self.sample_shape).items()
        }
        self.sigma_start = torch.ones(batch_size, dtype=torch.float64, device=dev)
        self.table = torch.ones(k1, batch_size, dtype=torch.float64, device=dev)
        self.seeds = torch.zeros(batch_size, dtype=torch.int64, device=dev)
        self.start_seeds = torch.zeros(batch_size, dtype=torch.int64, device=dev)
        self.x_out = torch.zeros((batch_size, *self.model_shape), dtype=config.state_dtype, device=dev)
        self.outputs = {
            name: torch.zeros((batch_size, *shape), dtype=dtype, device=dev)
            for name, (shape, dtype) in codec.outputs(self.sample_shape).items()
        }
        self.denoiser = codec.wrap_denoiser(denoiser, self.cond)
        self._steps = self._build_steps()
        self.graph: torch.cuda.CUDAGraph | None = None
        if self.cuda:
            self._stream = torch.cuda.current_stream(dev)
            self._copy_stream = torch.cuda.Stream(dev)
            self._staging = [self._device_inputs() for _ in range(2)]
            self._copied = [torch.cuda.Event() for _ in range(2)]
            self._consumed = [torch.cuda.Event() for _ in range(2)]
            self._slot = 0

    # ------------------------------------------------------------------ the loop
    def _build_steps(self) -> list[Callable[..., torch.Tensor]]:
        """The per-step functions, one per step index (compiled ones are shared)."""
        cfg = self.config
        compiled = cfg.compile != "none"
        ops: Backend = REFERENCE if compiled else step_backend(cfg.backend, self.device)
        denoise = self._network_call()

        def heun(x: torch.Tensor, t_cur: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
            denoised = denoise(x, t_cur)
            x_euler = ops.euler_step(x, denoised, t_cur, t_next)
            return ops.heun_step(x, denoised, denoise(x_euler, t_next), t_cur, t_next)

        def euler(x: torch.Tensor, t_cur: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
            return ops.euler_step(x, denoise(x, t_cur), t_cur, t_next)

        def ancestral(x: torch.Tensor, t_cur: torch.Tensor, t_next: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
            return ops.ancestral_step(x, denoise(x, t_cur), noise, t_cur, t_next)

        if compiled:
            mode = None if cfg.compile == "default" else cfg.compile
            heun, euler, ancestral = (
                torch.compile(fn, mode=mode, fullgraph=True, dynamic=False) for fn in (heun, euler, ancestral)
            )
        k = cfg.num_steps
        if cfg.method == "stochastic":
            return [ancestral] * k
        if cfg.method == "euler":
            return [euler] * k
        return [heun] * (k - 1) + [euler if cfg.final_to_zero else heun]

    def _network_call(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        denoiser, amp, device_type = self.denoiser, self.config.amp_dtype, self.device.type
        if amp is None:
            return denoiser

        def call(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device_type, dtype=amp):
                return denoiser(x, sigma).to(x.dtype)

        return call

    def _start(self) -> torch.Tensor:
        """``x = y0 + sigma_min eps`` (SPEC 5 step 1) in the state dtype."""
        cfg = self.config
        y0 = self.y0
        if cfg.start_noise == "none":
            return y0
        seeds, stream = (
            (self.seeds, STREAM_RESTORE) if cfg.start_noise == "fresh" else (self.start_seeds, STREAM_NATURE)
        )
        eps = sample_normal(seeds, self.model_shape, stream=stream, dtype=cfg.state_dtype)
        view = (-1,) + (1,) * len(self.model_shape)
        return y0 + self.sigma_start.to(cfg.state_dtype).view(view) * eps

    def _trajectory(self) -> None:
        """The whole K-step loop on the static buffers (what the CUDA graph captures)."""
        cfg = self.config
        mark_step = cfg.compile == "reduce-overhead"
        x = self._start()
        for i, step in enumerate(self._steps):
            if mark_step:
                torch.compiler.cudagraph_mark_step_begin()
            t_cur, t_next = self.table[i], self.table[i + 1]
            if cfg.method == "stochastic":
                noise = sample_normal(self.seeds, self.model_shape, stream=STREAM_STEP + i, dtype=cfg.state_dtype)
                x = step(x, t_cur, t_next, noise)
            else:
                x = step(x, t_cur, t_next)
            if mark_step:
                x = x.clone()  # CUDA-graph trees reuse a step's output memory on its next replay
        self.x_out.copy_(x)

    def _capture(self) -> None:
        """Warm up on a side stream (lazy init, autotuning, compilation), then capture."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(self._stream)
        with torch.cuda.stream(side):
            for _ in range(2):
                self._trajectory()
        self._stream.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            self._trajectory()
        self._stream.wait_stream(side)
        self.graph = graph

    def _run(self, context: Any, consumed: torch.cuda.Event | None = None) -> None:
        """Encode (eager), the loop (replayed graph or eager), decode (eager). ``consumed`` is
        recorded once encode has read the batch's staging slot (it may then be restaged)."""
        self.codec.encode(self.raw_in, context, self.y0, self.cond)
        if consumed is not None:
            consumed.record(self._stream)
        if not self.use_graph:
            self._trajectory()
        else:
            if self.graph is None:
                self._capture()
            self.graph.replay()
        self.codec.decode(self.x_out, self.outputs)

    # ------------------------------------------------------------------ host <-> device
    def _device_inputs(self) -> tuple[torch.Tensor, ...]:
        b, k1, dev = self.batch_size, self.config.num_steps + 1, self.device
        return (
            torch.empty((b, *self.sample_shape), dtype=self.codec.storage_dtype, device=dev),
            torch.empty(b, dtype=torch.float64, device=dev),
            torch.empty(b, k1, dtype=torch.float64, device=dev),
            torch.empty(b, dtype=torch.int64, device=dev),
            torch.empty(b, dtype=torch.int64, device=dev),
        )

    def new_host_batch(self) -> HostBatch:
        """An empty :class:`HostBatch` for this sampler (pinned on CUDA)."""
        b, k1, pin = self.batch_size, self.config.num_steps + 1, self.cuda

        def alloc(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, pin_memory=pin)

        return HostBatch(
            raw=alloc((b, *self.sample_shape), self.codec.storage_dtype),
            sigma_start=alloc((b,), torch.float64),
            table=alloc((b, k1), torch.float64),
            seeds=alloc((b,), torch.int64),
            start_seeds=alloc((b,), torch.int64),
            outputs={name: alloc(tuple(t.shape), t.dtype) for name, t in self.outputs.items()},
        )

    def _load_static(
        self,
        raw: torch.Tensor,
        sigma_start: torch.Tensor,
        table: torch.Tensor,
        seeds: torch.Tensor,
        start_seeds: torch.Tensor,
    ) -> None:
        self.raw_in.copy_(raw)
        self.sigma_start.copy_(sigma_start)
        self.table.copy_(table.t())
        self.seeds.copy_(seeds)
        self.start_seeds.copy_(start_seeds)

    @torch.no_grad()
    def submit(self, batch: HostBatch) -> None:
        """Restore ``batch`` (all ``B`` rows, padding included) into ``batch.out``.

        On CUDA this only enqueues work: H2D on the copy stream, the replay and the D2H on
        the compute stream, then records ``batch.ready``. On CPU it runs synchronously.
        Inference only: runs under ``torch.no_grad``.
        """
        host = (batch.raw, batch.sigma_start, batch.table, batch.seeds, batch.start_seeds)
        if not self.cuda:
            self._load_static(*host)
            self._run(self.codec.stage(self.raw_in, batch.context, 0))
            for name, out in batch.outputs.items():
                out.copy_(self.outputs[name])
            batch.ready = None
            return
        if batch.raw_device is not None:
            host = (batch.raw_device, *host[1:])
        k = self._slot
        self._slot ^= 1
        staging = self._staging[k]
        with torch.cuda.stream(self._copy_stream):
            self._copy_stream.wait_event(self._consumed[k])  # the replay two batches ago read it
            for dev, src in zip(staging, host, strict=True):
                dev.copy_(src, non_blocking=True)
            # Per-batch device work that may overlap the previous replay (e.g. VAE + text
            # encoders into the codec's slot k), on the copy stream.
            context = self.codec.stage(staging[0], batch.context, k)
            self._copied[k].record(self._copy_stream)
        with torch.cuda.stream(self._stream):  # whatever the caller's current stream is
            self._stream.wait_event(self._copied[k])
            self._load_static(*staging)
            self._run(context, self._consumed[k])
            for name, out in batch.outputs.items():
                out.copy_(self.outputs[name], non_blocking=True)
            batch.ready = torch.cuda.Event()
            batch.ready.record(self._stream)

    def restore(
        self,
        raw: torch.Tensor,
        sample_ids: torch.Tensor,
        sigma_min: torch.Tensor,
        *,
        sigma_out: float = 0.0,
        seed: int = 0,
        training_noise_seed: int = 0,
        rho: float = 7.0,
        sigma_floor: float = RESTORE_SIGMA_FLOOR,
        grid: GridSpec | None = None,
        context: Any = None,
    ) -> torch.Tensor:
        """Synchronous convenience: restore ``n <= B`` stored samples, return ``(n, *shape)``.

        ``raw`` is in the storage dtype; ``sigma_min > sigma_out`` for every row. ``grid``
        (default: the per-sample grid of ``num_steps`` points with ``sigma_out``, ``rho``,
        ``sigma_floor``) must have ``config.num_steps`` steps. The dataset engine uses
        :meth:`submit` instead (asynchronous, reused host buffers).
        """
        batch = self.new_host_batch()
        n = raw.shape[0]
        if n > self.batch_size or tuple(raw.shape[1:]) != self.sample_shape:
            raise ValueError(f"raw: expected (<= {self.batch_size}, *{self.sample_shape}), got {tuple(raw.shape)}")
        batch.raw[:n] = raw
        batch.context = context
        if grid is None:
            grid = GridSpec("per_sample", self.config.num_steps, sigma_out, rho, sigma_floor)
        fill_host_batch(batch, sample_ids, sigma_min, grid=grid, seed=seed, training_noise_seed=training_noise_seed)
        self.submit(batch)
        batch.wait()
        return batch.out[:n].clone()
