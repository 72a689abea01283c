"""One job of a pooled run (tests/test_pooled_controller.py), as its own
process: for each step it reports its measurements under its own reporter id
and the deterministic request id of (run, job, step), then waits until the
run has applied that step (as a trainer waits for the new tau) before the
next. Prints one JSON line per report: step, applied, partial, stale, and
the state it got back.

    python pooled_job.py TARGET RUN_ID JOB_INDEX STEPS
"""

from __future__ import annotations

import json
import math
import sys
import time

from maxent_client import MaxEntClient
from maxent_client.training import controller_request_id


def measurements(job: int, step: int) -> tuple[float, float, float | None]:
    """(weight_entropy, measured_kl, sample_count) job `job` reports at `step`;
    job 3 sends no sample count (the default, 1)."""
    entropy = 0.8 + 0.5 * math.sin(1.3 * job + 0.7 * step)
    kl = 0.1 + 0.06 * math.cos(0.9 * job + 0.4 * step)
    samples = None if job == 3 else float(8 + 4 * job + step % 3)
    return entropy, kl, samples


def job_name(job: int) -> str:
    return f"job-{job}"


def main(target: str, run_id: str, job: int, steps: int) -> None:
    with MaxEntClient(target, timeout=60) as client:
        for step in range(1, steps + 1):
            entropy, kl, samples = measurements(job, step)
            result = client.update_controller(
                run_id, global_step=step, weight_entropy=entropy, measured_kl=kl, sample_count=samples,
                reporter_id=job_name(job), request_id=controller_request_id(run_id, job_name(job), step))
            state = result.state
            print(json.dumps({"step": step, "applied": result.applied, "partial": result.partial,
                              "stale": result.stale, "replayed": result.replayed, "version": state.version,
                              "global_step": state.global_step, "tau": state.tau, "beta": state.beta}), flush=True)
            deadline = time.monotonic() + 120
            while state.global_step < step:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"step {step} was never applied")
                time.sleep(0.005)
                state = client.get_run(run_id).state


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
