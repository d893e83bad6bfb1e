"""Per-endpoint compute caps, read from the archive's ``model-config.yaml`` ``handler:`` section.

One endpoint may serve cheap predictions to everyone and another the expensive probes; the caps
say which is which, and every refusal names the cap and where it is set so that a client (or the
operator) knows what to change. Pure Python: the serving side reads it without torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["ServingLimits", "LimitsError", "DEFAULT_MAX_REQUEST_BYTES"]

DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024  # TorchServe's own max_request_size in config.properties
_SOURCE = "model-config.yaml"


class LimitsError(ValueError):
    """A ``handler:`` value in model-config.yaml that is not a valid cap; the message names the key."""


@dataclass(frozen=True)
class ServingLimits:
    """The caps one endpoint enforces on every request (``max_probe_cost`` = steps x restarts per image,
    ``max_smoothing_samples`` = randomized smoothing's n0 + n forward passes per image)."""

    max_image_pixels: int = 40_000_000
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_top_k: int = 100
    max_probe_cost: int = 100
    # n0 + n per image; the default admits the library's default CERTIFY (n0 = 100, n = 10,000)
    max_smoothing_samples: int = 10_100
    probe_endpoint: str | None = None
    threads_per_worker: int | None = None
    # Measured by the worker at load (not configuration): what one smoothing sample costs here, and
    # TorchServe's responseTimeout for this model. Together they cap n0 + n at what finishes in
    # half of the timeout, so no smoothing request can outlive the worker.
    samples_per_second: float | None = None
    response_timeout: int | None = None

    @property
    def smoothing_time_budget(self) -> int | None:
        """The most n0 + n that this worker samples in half of ``responseTimeout`` (``None``: not measured)."""
        if not self.samples_per_second or not self.response_timeout:
            return None
        return int(self.samples_per_second * self.response_timeout / 2)

    @classmethod
    def from_handler_config(cls, config: Mapping[str, Any] | None) -> ServingLimits:
        """Validate model-config.yaml's ``handler:`` mapping; unknown keys are left to the handler."""
        config = dict(config or {})
        values: dict[str, Any] = {}
        minimum = {"max_image_pixels": 1, "max_request_bytes": 1, "max_top_k": 1, "max_probe_cost": 0,
                   "max_smoothing_samples": 0, "threads_per_worker": 1}
        for name, low in minimum.items():
            if config.get(name) is None:
                continue
            value = config[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise LimitsError(f"handler.{name} in {_SOURCE} must be an integer >= {low}, got {value!r}")
            values[name] = value
        from specformer_deploy.serving.options import LIMITS

        if values.get("max_top_k", 0) > LIMITS["max_top_k"]:
            raise LimitsError(f"handler.max_top_k in {_SOURCE} must be at most {LIMITS['max_top_k']}, "
                              f"got {values['max_top_k']}")
        endpoint = config.get("probe_endpoint")
        if endpoint is not None:
            if not (isinstance(endpoint, str) and endpoint.strip() and endpoint.isascii()
                    and all(c.isalnum() or c in "-_." for c in endpoint.strip())):
                raise LimitsError(f"handler.probe_endpoint in {_SOURCE} must be a model name (letters, digits, "
                                  f"'-', '_', '.'), got {endpoint!r}")
            values["probe_endpoint"] = endpoint.strip()
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def probe_cost_refusal(self, steps: int, restarts: int) -> str | None:
        """Why a probe of ``steps`` x ``restarts`` is refused here, or ``None`` when it is within the cap."""
        cost = steps * restarts
        if cost <= self.max_probe_cost:
            return None
        where = (f"; send probes to /predictions/{self.probe_endpoint}" if self.probe_endpoint else "")
        if self.max_probe_cost == 0:
            return (f"this endpoint serves no probes (handler.max_probe_cost = 0 in {_SOURCE}){where}")
        return (f"steps x restarts = {cost} exceeds this endpoint's cap handler.max_probe_cost = "
                f"{self.max_probe_cost} ({_SOURCE}){where}")

    def smoothing_refusal(self, n0: int, n: int) -> str | None:
        """Why smoothing with ``n0`` + ``n`` samples per image is refused here, or ``None``: the
        configured cap first, then what this worker can sample in half its response timeout."""
        samples = n0 + n
        where = (f"; send smoothing requests to /predictions/{self.probe_endpoint}" if self.probe_endpoint else "")
        if self.max_smoothing_samples == 0:
            return f"this endpoint serves no smoothing (handler.max_smoothing_samples = 0 in {_SOURCE}){where}"
        if samples > self.max_smoothing_samples:
            return (f"n0 + n = {samples} samples per image exceeds this endpoint's cap handler.max_smoothing_samples "
                    f"= {self.max_smoothing_samples} ({_SOURCE}); ask for fewer samples (smoothing n, n0){where}")
        budget = self.smoothing_time_budget
        if budget is not None and samples > budget:
            return (f"n0 + n = {samples} samples per image would outlast this model's time: it samples "
                    f"{self.samples_per_second:.4g} images/s here (measured at load), so half of its "
                    f"responseTimeout {self.response_timeout} s fits {budget} samples; ask for n <= "
                    f"{max(budget - n0, 0)} with n0 = {n0}, or raise responseTimeout and "
                    f"handler.max_smoothing_samples in {_SOURCE} (or serve on a GPU)")
        return None
