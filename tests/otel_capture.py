"""A Telemetry on OpenTelemetry's own in-memory span exporter and metric reader, so a test reads
back what the SDK made of the app's spans and metrics."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared.telemetry import Telemetry


@dataclass
class Captured:
    spans: InMemorySpanExporter
    metrics: InMemoryMetricReader
    telemetry: Telemetry

    def finished(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.spans.get_finished_spans() if s.name == name]

    def points(self) -> dict[str, list[tuple[dict[str, Any], Any]]]:
        """metric name -> [(attributes, data point)]."""
        data = self.metrics.get_metrics_data()
        found: dict[str, list[tuple[dict[str, Any], Any]]] = {}
        if data is None:
            return found
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    for point in metric.data.data_points:
                        found.setdefault(metric.name, []).append(
                            (dict(point.attributes or {}), point)
                        )
        return found

    def values(self, name: str) -> list[tuple[dict[str, Any], Any]]:
        """A counter's data points as (attributes, value)."""
        return [(attrs, point.value) for attrs, point in self.points().get(name, [])]

    def total(self, name: str) -> float:
        """The sum of a counter's data points so far (0 before its first count)."""
        return float(sum(value for _, value in self.values(name)))


def captured(clock: Callable[[], datetime] | None = None) -> Captured:
    """A Telemetry whose spans and metrics stay in memory (with `clock`, its clock)."""
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    options: dict[str, Any] = {} if clock is None else {"clock": clock}
    return Captured(spans, reader, Telemetry(tracer_provider=tracer_provider,
                                             meter_provider=meter_provider, **options))
