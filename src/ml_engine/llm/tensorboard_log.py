"""TensorBoard scalars and an HParams entry for a generation run, without Lightning or torch.

Generation runs use the same ``logger`` config group as training, but importing Lightning's
loggers costs seconds per process for nothing a generation run needs; this writes the same event
files with the ``tensorboard`` package alone.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class TensorBoardRun:
    """One event file in ``logdir``: scalars by step, then one HParams session."""

    def __init__(self, logdir: Path) -> None:
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        Path(logdir).mkdir(parents=True, exist_ok=True)
        self.logdir = Path(logdir)
        self._writer = EventFileWriter(str(logdir))

    def _write(self, values: list, step: int) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        event = Event(wall_time=time.time(), step=step, summary=Summary(value=values))
        self._writer.add_event(event)

    def scalars(self, values: Mapping[str, float], step: int = 0) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        finite = {k: float(v) for k, v in values.items() if _is_finite(v)}
        self._write([Summary.Value(tag=k, simple_value=v) for k, v in finite.items()], step)

    def hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        """An HParams session: the run's settings and its final metrics (what the tab shows)."""
        from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
        from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

        def summary(tag: str, data: plugin_data_pb2.HParamsPluginData) -> Summary.Value:
            plugin = SummaryMetadata.PluginData(
                plugin_name=metadata.PLUGIN_NAME, content=data.SerializeToString()
            )
            return Summary.Value(tag=tag, metadata=SummaryMetadata(plugin_data=plugin))

        version = metadata.PLUGIN_DATA_VERSION
        infos, start = [], plugin_data_pb2.SessionStartInfo()
        for key, value in hparams.items():
            if isinstance(value, bool) or value is None:
                value = str(value)
            if isinstance(value, (int, float)):
                start.hparams[key].number_value = float(value)
                kind = api_pb2.DATA_TYPE_FLOAT64
            else:
                start.hparams[key].string_value = str(value)
                kind = api_pb2.DATA_TYPE_STRING
            infos.append(api_pb2.HParamInfo(name=key, type=kind))
        metric_infos = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag)) for tag in metrics]
        experiment = api_pb2.Experiment(hparam_infos=infos, metric_infos=metric_infos)
        end = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS)
        self._write(
            [
                summary(
                    metadata.EXPERIMENT_TAG,
                    plugin_data_pb2.HParamsPluginData(experiment=experiment, version=version),
                )
            ],
            0,
        )
        self._write(
            [
                summary(
                    metadata.SESSION_START_INFO_TAG,
                    plugin_data_pb2.HParamsPluginData(session_start_info=start, version=version),
                )
            ],
            0,
        )
        self.scalars(metrics, step=0)
        self._write(
            [
                summary(
                    metadata.SESSION_END_INFO_TAG,
                    plugin_data_pb2.HParamsPluginData(session_end_info=end, version=version),
                )
            ],
            0,
        )

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def log_run(
    logger_cfg: Mapping[str, Any] | None,
    per_step: list[Mapping[str, float]],
    hparams: Mapping[str, Any],
    metrics: Mapping[str, float],
) -> list[Path]:
    """Write to each configured logger (TensorBoard event files, CSV); returns what was written.

    ``per_step`` scalars become steps 0..n-1 (one per repetition); ``metrics`` are the final
    values, written under ``hp/<name>`` and attached to the HParams entry (under their own name
    at step 0 they would make TensorBoard's server drop the per-repetition curve).
    """
    written = []
    for name, node in (logger_cfg or {}).items():
        target = str((node or {}).get("_target_", ""))
        if target.endswith("TensorBoardLogger"):
            run = TensorBoardRun(Path(node["save_dir"]))
            for step, values in enumerate(per_step):
                run.scalars(values, step)
            final = {f"hp/{k}": v for k, v in metrics.items() if _is_finite(v)}
            run.hparams(hparams, final)
            run.close()
            written.append(run.logdir)
        elif target.endswith("CSVLogger"):
            path = Path(node["save_dir"]) / str(node.get("name") or "") / "metrics.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["key", "value"])
                writer.writerows(sorted({**hparams, **metrics}.items()))
            written.append(path)
        elif target:
            log.warning(
                "logger %s (%s) is not supported for generation runs; skipped", name, target
            )
    return written
