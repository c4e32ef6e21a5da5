"""A study's pictures, drawn by Optuna's own visualization module, written beside a sweep.

``<sweep dir>/study/`` receives, per plot, an interactive HTML page (plotly) and a PNG
(matplotlib), and ``index.json`` lists them. The pages load ``plotly.min.js`` from the same
folder, never from a CDN, so they open offline and from a copied sweep dir. A plot Optuna
cannot draw (importances from one trial, a study without a complete trial) is skipped with a
log line: pictures are an extra, and a sweep that has run never fails for want of one.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ml_engine.run.files import atomic_write, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

STUDY_DIR = "study"
INDEX_JSON = "index.json"
PLOTLY_JS = "plotly.min.js"
PNG_DPI = 100


@dataclass
class PlotSpec:
    """One picture: its file stem, its title, and the keyword arguments that Optuna's plotly
    and matplotlib functions of the same name (``function``) both take."""

    name: str
    title: str
    function: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    skip_reason: str | None = None


def _objective_names(study: Any, target_names: list[str] | None) -> list[str]:
    count = len(study.directions)
    names = list(target_names or study.metric_names or [])
    if len(names) == count:
        return names
    return ["Objective Value"] if count == 1 else [f"Objective {i}" for i in range(count)]


def _varied_params(study: Any, complete: list[Any]) -> list[str]:
    """Parameters that every complete trial has and that take more than one value: what an
    importance evaluator can rank."""
    if not complete:
        return []
    shared = set.intersection(*(set(trial.params) for trial in complete))
    return sorted(
        name
        for name in shared
        if not complete[0].distributions[name].single()
        and len({repr(trial.params[name]) for trial in complete}) > 1
    )


def _importance_skip(complete: list[Any], params: list[str]) -> str | None:
    if len(complete) < 2:
        return f"parameter importances need 2 complete trials, the study has {len(complete)}"
    if len(params) < 2:
        return f"parameter importances need 2 varied parameters, the study has {len(params)}"
    return None


def _value_of(index: int) -> Callable[[Any], float]:
    return lambda trial: trial.values[index]


def plot_specs(study: Any, target_names: list[str] | None = None) -> list[PlotSpec]:
    """What to draw for ``study``: history, importances (fANOVA) and parallel coordinates per
    objective, and the Pareto front of a multi-objective study; each with a skip reason when
    Optuna cannot draw it from the trials there are."""
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    names = _objective_names(study, target_names)
    params = _varied_params(study, complete)
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    nothing = None if complete else "the study has no complete trial"
    multi = len(names) > 1
    specs: list[PlotSpec] = []
    for index, metric in enumerate(names):
        suffix = f"_{index}" if multi else ""
        # a multi-objective study needs target= (Optuna's rule); one objective is the default
        target = {"target": _value_of(index)} if multi else {}
        named = {**target, "target_name": metric}
        specs += [
            PlotSpec(
                f"history{suffix}",
                f"Optimization history: {metric}",
                "plot_optimization_history",
                named,
                nothing,
            ),
            PlotSpec(
                f"importances{suffix}",
                f"Parameter importances (fANOVA): {metric}",
                "plot_param_importances",
                {**named, "evaluator": evaluator},
                nothing or _importance_skip(complete, params),
            ),
            PlotSpec(
                f"parallel_coordinate{suffix}",
                f"Parallel coordinates: {metric}",
                "plot_parallel_coordinate",
                named,
                nothing,
            ),
        ]
    if multi:
        drawable = nothing or (
            None
            if len(names) in (2, 3)
            else f"a Pareto front needs 2 or 3 objectives, not {len(names)}"
        )
        specs.append(
            PlotSpec(
                "pareto_front",
                f"Pareto front: {' vs '.join(names)}",
                "plot_pareto_front",
                {"target_names": names},
                drawable,
            )
        )
    return specs


def _write_plotly_js(folder: Path) -> None:
    """The one plotly.js every page of the folder loads; rewritten only when plotly's differs
    (a newer plotly), so concurrent readers keep a whole file."""
    from plotly.offline import get_plotlyjs

    script = get_plotlyjs()
    target = folder / PLOTLY_JS
    with contextlib.suppress(OSError):
        if target.read_text(encoding="utf-8") == script:
            return
    write_text_atomic(target, script)


def _write_html(study: Any, spec: PlotSpec, target: Path) -> None:
    from optuna import visualization

    figure = getattr(visualization, spec.function)(study, **spec.kwargs)
    figure.update_layout(title=spec.title)
    # "directory": a <script src="plotly.min.js"> beside the page, written once by
    # _write_plotly_js, instead of a CDN address or 4.8 MB inlined into every page
    write_text_atomic(target, figure.to_html(include_plotlyjs="directory", full_html=True))


@contextlib.contextmanager
def _matplotlib() -> Iterator[Any]:
    """pyplot on the Agg backend, with the rcParams Optuna's style changes put back after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with matplotlib.rc_context():
        yield plt


def _write_png(study: Any, spec: PlotSpec, target: Path) -> None:
    import numpy as np
    from optuna.visualization import matplotlib as optuna_matplotlib

    with _matplotlib() as plt:
        axes = getattr(optuna_matplotlib, spec.function)(study, **spec.kwargs)
        figure = np.ravel(axes)[0].get_figure()
        try:
            figure.suptitle(spec.title)
            figure.set_size_inches(8, 5)
            figure.tight_layout()
            atomic_write(
                target,
                lambda handle: figure.savefig(handle, format="png", dpi=PNG_DPI),
                binary=True,
            )
        finally:
            plt.close(figure)


def _draw(study: Any, spec: PlotSpec, folder: Path) -> dict[str, str]:
    """Both files of one plot and its index entry, or ``{"name", "reason"}`` (logged) when
    Optuna cannot draw it."""
    html, png = folder / f"{spec.name}.html", folder / f"{spec.name}.png"
    try:
        _write_html(study, spec, html)
        _write_png(study, spec, png)
    except Exception as error:  # an Optuna refusal or a degenerate study: skip, never fail
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        why = f"{type(error).__name__}: {reason[:200]}"
        log.warning("study plot %s skipped: %s", spec.name, why)
        for path in (html, png):
            path.unlink(missing_ok=True)
        return {"name": spec.name, "reason": why}
    return {"name": spec.name, "title": spec.title, "html": html.name, "png": png.name}


def _load(storage: str, study_name: str) -> Any | None:
    import optuna

    from ml_engine.run.optuna_study import open_storage

    try:
        return optuna.load_study(study_name=study_name, storage=open_storage(storage))
    except Exception as error:  # no such study, an unreadable storage: no pictures, no failure
        log.warning(
            "study plots skipped: cannot load study %r from %s: %s", study_name, storage, error
        )
        return None


def write_study_plots(
    sweep_dir: Path, storage: str, study_name: str, target_names: list[str] | None = None
) -> list[Path]:
    """Draw study ``study_name`` of ``storage`` (an RDB URL or a journal file path) into
    ``<sweep_dir>/study/``: one ``<plot>.html`` and ``<plot>.png`` per plot Optuna can draw,
    ``plotly.min.js`` and ``index.json``. ``target_names`` label the objectives (the sweep's
    metric names). Returns the paths written; plots that cannot be drawn are logged, skipped."""
    study = _load(storage, study_name)
    if study is None:
        return []
    folder = Path(sweep_dir) / STUDY_DIR
    folder.mkdir(parents=True, exist_ok=True)
    specs = plot_specs(study, target_names)
    for spec in specs:
        if spec.skip_reason:
            log.info("study plot %s skipped: %s", spec.name, spec.skip_reason)
    drawable = [spec for spec in specs if not spec.skip_reason]
    written: list[Path] = []
    if drawable:
        _write_plotly_js(folder)
        written.append(folder / PLOTLY_JS)
    plots, skipped = [], [{"name": s.name, "reason": s.skip_reason} for s in specs if s.skip_reason]
    with warnings.catch_warnings():
        # plot_pareto_front & co. are "experimental" in Optuna: a warning per call, no news
        warnings.simplefilter("ignore", category=Warning)
        for spec in drawable:
            entry = _draw(study, spec, folder)
            if "reason" in entry:
                skipped.append(entry)
                continue
            plots.append(entry)
            written += [folder / entry["html"], folder / entry["png"]]
    index = {
        "study": study.study_name,
        "directions": [d.name.lower() for d in study.directions],
        "objectives": _objective_names(study, target_names),
        "trials": len(study.trials),
        "plots": plots,
        "skipped": skipped,
    }
    written.append(write_json_atomic(folder / INDEX_JSON, index))
    return written
