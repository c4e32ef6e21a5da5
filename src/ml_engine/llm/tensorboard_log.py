"""TensorBoard scalars and an HParams entry for a generation run, without Lightning or torch.

Generation runs use the same ``logger`` config group as training. The maintained writers with
HParams support (``torch.utils.tensorboard.SummaryWriter``, ``tensorboardX``, which imports torch
as well when it is installed) cost a generation job about 1.0 s and 540 MB of resident memory for
importing torch, against 0.16 s for the ``tensorboard`` package alone, on jobs of under a second
(a mock run takes 0.73 s end to end). So the event file is written by tensorboard's own
``EventFileWriter`` (the writer torch's ``SummaryWriter`` delegates to), and the session's
hyperparameters by tensorboard's ``hparams_pb``; what is built here is only what tensorboard
offers no torch-free builder for: the experiment (typed hyperparameters, metric list) and the
session's end.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ml_engine.run.helpers import is_finite_number

log = logging.getLogger(__name__)


def _hparam_value(value: Any) -> bool | float | str:
    """What the HParams tab can show: bools, numbers and text (None as text)."""
    if isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    return str(value)


class TensorBoardRun:
    """One event file in ``logdir``: scalars by step, then one HParams session."""

    def __init__(self, logdir: Path) -> None:
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self._writer = EventFileWriter(str(self.logdir))

    def _write(self, values: list[Any], step: int) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        event = Event(wall_time=time.time(), step=step, summary=Summary(value=values))
        self._writer.add_event(event)

    def scalars(self, values: Mapping[str, Any], step: int = 0) -> None:
        """The finite ``values`` at ``step``, in the form ``SummaryWriter.add_scalar`` writes."""
        from tensorboard.compat.proto.summary_pb2 import Summary

        finite = [
            Summary.Value(tag=tag, simple_value=float(value))
            for tag, value in values.items()
            if is_finite_number(value)
        ]
        self._write(finite, step)

    def hparams(
        self,
        hparams: Mapping[str, Any],
        metrics: Mapping[str, float],
        descriptions: Mapping[str, str] | None = None,
    ) -> None:
        """An HParams session: the run's settings and its final metrics (what the tab shows).

        ``descriptions`` (metric tag → text) appear as the metrics' tooltips.
        """
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
        from tensorboard.plugins.hparams.summary_v2 import hparams_pb

        def summary(tag: str, **data: Any) -> Summary:
            content = plugin_data_pb2.HParamsPluginData(
                version=metadata.PLUGIN_DATA_VERSION, **data
            )
            return Summary.Value(
                tag=tag,
                metadata=metadata.create_summary_metadata(content),
                tensor=metadata.NULL_TENSOR,  # as tensorboard's own hparams summaries
            )

        values = {key: _hparam_value(value) for key, value in hparams.items()}
        kinds = {bool: api_pb2.DATA_TYPE_BOOL, float: api_pb2.DATA_TYPE_FLOAT64}
        # Types without domains, as Lightning writes them: one run's experiment is what the tab
        # uses for a whole sweep, so a domain of this run's value would hide the other runs'.
        infos = [
            api_pb2.HParamInfo(name=key, type=kinds.get(type(value), api_pb2.DATA_TYPE_STRING))
            for key, value in values.items()
        ]
        described = descriptions or {}
        metric_infos = [
            api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag), description=described.get(tag, ""))
            for tag in metrics
        ]
        experiment = api_pb2.Experiment(hparam_infos=infos, metric_infos=metric_infos)
        self._write([summary(metadata.EXPERIMENT_TAG, experiment=experiment)], 0)
        # trial id "": each run is its own session group, as before, even where two runs share
        # every setting (the default id, a hash of the values, would merge them)
        self._write(list(hparams_pb(values, trial_id="").value), 0)
        self.scalars(metrics, step=0)
        end = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS)
        self._write([summary(metadata.SESSION_END_INFO_TAG, session_end_info=end)], 0)

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()


def log_run(
    logger_cfg: Mapping[str, Any] | None,
    per_step: list[Mapping[str, Any]],
    hparams: Mapping[str, Any],
    metrics: Mapping[str, Any],
    descriptions: Mapping[str, str] | None = None,
) -> list[Path]:
    """Write to each configured logger (TensorBoard event files, CSV); returns what was written.

    ``per_step`` scalars become steps 0..n-1 (one per repetition); ``metrics`` are the final
    values, written under ``hp/<name>`` and attached to the HParams entry (under their own name
    at step 0 they would make TensorBoard's server drop the per-repetition curve).
    ``descriptions`` (metric name → text) annotate the HParams metrics.
    """
    written = []
    for name, node in (logger_cfg or {}).items():
        target = str((node or {}).get("_target_", ""))
        if target.endswith("TensorBoardLogger"):
            run = TensorBoardRun(Path(node["save_dir"]))
            for step, values in enumerate(per_step):
                run.scalars(values, step)
            final = {f"hp/{k}": v for k, v in metrics.items() if is_finite_number(v)}
            tips = {f"hp/{k}": text for k, text in (descriptions or {}).items()}
            run.hparams(hparams, final, tips)
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
