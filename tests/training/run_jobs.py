"""Run several jobs in one launch (``torchrun --nproc_per_node N tests/training/run_jobs.py JOBS.json``).

JOBS.json is a list of ``{"kind": "train" | "pretrain", "overrides": ["key=value", ...]}``, each
optionally with ``"plugins": [python files]`` imported before it (what they patch stays patched
for the jobs after it), or ``{"kind": "cli", "argv": [...], "stdout": PATH}``: the ``fusionzoo``
command line on every process, process ``r`` printing to ``PATH.rank<r>`` (a job that exits
non-zero stops the launch). The jobs run one after another in the same processes, so one launch
(and one process group) serves them all.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

from accelerate import PartialState

from fusionzoo.cli import main as fusionzoo
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
        if job["kind"] == "cli":
            with open(f"{job['stdout']}.rank{os.environ.get('RANK', '0')}", "w") as out:
                with contextlib.redirect_stdout(out):
                    code = fusionzoo(job["argv"])
            if code != 0:
                raise SystemExit(f"job {i} (fusionzoo {' '.join(job['argv'])}) exited {code}")
        elif job["kind"] == "pretrain":
            pretrain(load_config(None, job["overrides"], base=pretrain_base_config()), end_process_group=last)
        else:
            train(load_config(None, job["overrides"]), end_process_group=last)
    PartialState().destroy_process_group()  # after a last "cli" job (nothing left to end otherwise)


if __name__ == "__main__":
    main(sys.argv[1])
