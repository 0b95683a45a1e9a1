"""Run several training jobs in one launch (``torchrun --nproc_per_node N tests/training/run_jobs.py JOBS.json``).

JOBS.json is a list of ``{"kind": "train" | "pretrain", "overrides": ["key=value", ...]}``, each
optionally with ``"plugins": [python files]`` imported before it (what they patch stays patched
for the jobs after it); the jobs run one after another in the same processes, so one launch (and
one process group) serves them all.
"""

from __future__ import annotations

import json
import sys

from fusionzoo.plugins import import_plugin
from fusionzoo.training.config import load_config
from fusionzoo.training.pretrain import pretrain, pretrain_base_config
from fusionzoo.training.trainer import train


def main(path: str) -> None:
    jobs = json.loads(open(path).read())
    for i, job in enumerate(jobs):
        last = i == len(jobs) - 1
        for plugin in job.get("plugins", []):
            import_plugin(plugin)
        if job["kind"] == "pretrain":
            pretrain(load_config(None, job["overrides"], base=pretrain_base_config()), end_process_group=last)
        else:
            train(load_config(None, job["overrides"]), end_process_group=last)


if __name__ == "__main__":
    main(sys.argv[1])
