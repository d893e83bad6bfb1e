"""The base classifier that randomized smoothing samples: one ONNX Runtime session, every core.

Smoothing's cost is ``n0 + n`` forward passes of one graph, so this object owns nothing else:
which graph (the export itself, or its reduced-precision sampling graph, checked against the
metadata's SHA-256), on how many parallel streams, and on which device the noise is drawn.

Streams: on these small graphs ONNX Runtime's intra-op threads scale poorly (measured in
``tools/bench/smoothing.py``), while independent single-threaded runs scale with the cores. So a
batch is cut into chunks of ``chunk`` samples run on ``streams`` threads at once over one
single-threaded session (``session.run`` releases the GIL and is safe to call concurrently).
Small chunks keep a run's activations in the core's own cache: on the MNIST ViT, two streams of
128-sample chunks sampled 1.5 to 2.5x faster than two halves of a 1,000-sample batch. A sample's
label depends on its own pixels only, so how a batch is cut never changes a count.

On CUDA the noise is drawn on the device by torch and handed to ONNX Runtime through I/O binding,
so no noisy batch crosses the PCIe bus; the same path runs on the CPU (tested there).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from specformer_deploy.artifact.sampler import file_sha256
from specformer_deploy.serving.smoothing import SamplingError

__all__ = ["NoiseSampler", "default_streams", "CHUNK"]

CHUNK = 128  # samples per ONNX Runtime call: what fits a core's cache on the models measured


def default_streams() -> int:
    """Every core this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class NoiseSampler:
    """Labels of noisy copies of an image under one fixed graph (``classify``), or counts of them
    with the noise drawn on the session's device (``counts``, CUDA only).

    ``path``: the graph that samples; ``precision``/``sha256``: what the answer names;
    ``streams``: parallel single-threaded runs (default: every core); ``intra_op_threads``: use one
    session with that many ONNX Runtime threads instead (the other way to use the cores);
    ``session``/``device``: a session on a GPU (one stream, whole batches: the GPU is the parallelism);
    ``chunk``: samples per call on the CPU (``None``: whole batches, the loop before streams)."""

    def __init__(self, path: str | Path, *, precision: str = "fp32", sha256: str | None = None,
                 streams: int | None = None, intra_op_threads: int | None = None, session=None,
                 device: str = "cpu", chunk: int | None = CHUNK) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        self.precision = precision
        self.sha256 = sha256 or file_sha256(self.path)
        self.device = device
        if session is not None:  # the runtime's own CUDA session: one stream, the GPU is the parallelism
            self.session, self.streams = session, 1
        else:
            options = ort.SessionOptions()
            options.log_severity_level = 3
            if intra_op_threads:
                options.intra_op_num_threads = int(intra_op_threads)
                self.streams = 1
            else:
                options.intra_op_num_threads = 1
                self.streams = int(streams or default_streams())
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.intra_op_threads = intra_op_threads
        self.chunk = None if session is not None else chunk
        self._pool = ThreadPoolExecutor(self.streams, thread_name_prefix="smoothing") if self.streams > 1 else None

    def describe(self) -> dict[str, Any]:
        """What a smoothing answer says about the graph that sampled it (not how many streams ran
        it: that changes the speed, never a count). ``noise`` says where the noise was drawn, since
        the device's generator gives other samples than the host's for the same seed."""
        return {"graph": self.path.name, "precision": self.precision, "sha256": self.sha256,
                "noise": f"torch on {self.device}" if self.device_counts else "numpy on the host"}

    def _labels(self, batch: np.ndarray) -> np.ndarray:
        logits = self.session.run(["logits"], {"pixels": batch})[0]
        if not np.isfinite(logits).all():  # argmax of NaN is 0: never a certificate from it
            raise SamplingError("the model returned non-finite logits under noise: no certificate can be given")
        return logits.argmax(axis=1)

    def classify(self, batch: np.ndarray) -> np.ndarray:
        """int64 labels of ``batch`` (float32 ``[B, C, S, S]``), its parts run on every stream at once."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        size = self.chunk or -(-len(batch) // self.streams)
        if len(batch) <= size:
            return self._labels(batch)
        parts = [batch[start: start + size] for start in range(0, len(batch), size)]
        labels = map(self._labels, parts) if self._pool is None else self._pool.map(self._labels, parts)
        return np.concatenate(list(labels))

    __call__ = classify

    @property
    def device_counts(self):
        """``counts`` where the noise is better drawn on the device (CUDA), else ``None`` (the host
        draws it: :func:`specformer_deploy.serving.smoothing.sample_counts`)."""
        return self.counts if self.device.startswith("cuda") else None

    def counts(self, x: np.ndarray, samples: int, sigma: float, rng: np.random.Generator, num_classes: int,
               batch_size: int) -> np.ndarray:
        """How often each class wins on ``samples`` copies of ``x`` plus noise drawn by torch on this
        sampler's device (seeded from ``rng``), through ONNX Runtime's I/O binding: the noisy
        batch and the logits never leave the device; only the counts do."""
        import torch

        device = torch.device(self.device)
        generator = torch.Generator(device=device).manual_seed(int(rng.integers(2**63 - 1)))
        image = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
        counts = torch.zeros(num_classes, dtype=torch.int64, device=device)
        size = min(batch_size, samples)
        buffer = torch.empty((size, *image.shape), dtype=torch.float32, device=device)
        logits = torch.empty((size, num_classes), dtype=torch.float32, device=device)
        kind, index = ("cuda", device.index or 0) if device.type == "cuda" else ("cpu", 0)
        done = 0
        while done < samples:
            count = min(size, samples - done)
            noisy, out = buffer[:count], logits[:count]
            noisy.normal_(generator=generator).mul_(sigma).add_(image)
            if device.type == "cuda":  # torch wrote the noise on its own stream: done before ONNX Runtime reads it
                torch.cuda.current_stream(device).synchronize()
            binding = self.session.io_binding()
            binding.bind_input("pixels", kind, index, np.float32, list(noisy.shape), noisy.data_ptr())
            binding.bind_output("logits", kind, index, np.float32, list(out.shape), out.data_ptr())
            self.session.run_with_iobinding(binding)
            binding.synchronize_outputs()  # ONNX Runtime's stream has finished writing the logits
            if not bool(torch.isfinite(out).all()):
                raise SamplingError("the model returned non-finite logits under noise: no certificate can be given")
            counts += torch.bincount(out.argmax(dim=1), minlength=num_classes)
            done += count
        return counts.cpu().numpy()

