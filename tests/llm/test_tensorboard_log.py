"""The generation run's event file, read back through the TensorBoard server (the real consumer):
every point of each curve, typed hyperparameters, final metrics under hp/ with their meaning."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ml_engine.llm.tensorboard_log import log_run
from tests.test_tensorboard_curves import tensorboard_server

LOGGER = "lightning.pytorch.loggers.tensorboard.TensorBoardLogger"


def test_curves_hparams_and_final_metrics_as_the_server_serves_them(tmp_path: Path) -> None:
    per_step = [{"gen/tokens_per_s": 10.0 + step, "ttft_s": math.nan} for step in range(5)]
    hparams = {"quantization": "q4_k_m", "n_gpu_layers": 99, "flash_attn": False, "seed": None}
    final = {"gen/tokens_per_s": 12.0, "quality/kl_mean": None, "file_mb": 7.5}
    logger = {"tensorboard": {"_target_": LOGGER, "save_dir": str(tmp_path / "tb")}}
    log_run(logger, per_step, hparams, final, {"gen/tokens_per_s": "generation rate (tok/s)"})

    with tensorboard_server(tmp_path) as server:
        server.wait_until_loaded("tb", "gen/tokens_per_s")
        curve = server.scalars("tb", "gen/tokens_per_s")
        tags = server.get("/data/plugin/scalars/tags")["tb"]
        experiment = server.get("/data/plugin/hparams/experiment", request='{"experimentName":""}')
        request = {
            "experimentName": "",
            "allowedStatuses": ["STATUS_SUCCESS"],
            "colParams": [],
            "startIndex": 0,
            "sliceSize": 10,
        }
        groups = server.get("/data/plugin/hparams/session_groups", request=json.dumps(request))

    assert curve == [(step, 10.0 + step) for step in range(5)]  # every repetition
    assert "ttft_s" not in tags  # NaN points are not written
    assert set(tags) == {"gen/tokens_per_s", "hp/gen/tokens_per_s", "hp/file_mb"}

    kinds = {info["name"]: info["type"] for info in experiment["hparamInfos"]}
    assert kinds == {
        "quantization": "DATA_TYPE_STRING",
        "n_gpu_layers": "DATA_TYPE_FLOAT64",
        "flash_attn": "DATA_TYPE_BOOL",
        "seed": "DATA_TYPE_STRING",
    }
    metric_infos = {m["name"]["tag"]: m.get("description", "") for m in experiment["metricInfos"]}
    assert metric_infos == {"hp/gen/tokens_per_s": "generation rate (tok/s)", "hp/file_mb": ""}

    (group,) = groups["sessionGroups"]  # one session, finished with success
    assert group["hparams"] == {
        "quantization": "q4_k_m",
        "n_gpu_layers": 99,
        "flash_attn": False,
        "seed": "None",
    }
    values = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
    assert values == {"hp/gen/tokens_per_s": 12.0, "hp/file_mb": 7.5}
