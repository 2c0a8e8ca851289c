"""The Ray Job driver of one experiment: runs its stored trials as one Ray Tune experiment.

Started by the Jobs API as ``python -m service.driver --experiment-id ID`` with the service's
database URL and MLflow URI in its environment. The trials it runs are the ones stored with
the experiment (index, label, spec): the API and the driver can never disagree on what trial
N is. The driver alone records: its :class:`~service.recorder.TrialRecorder` writes the
database and MLflow, and the job's environment is scrubbed of the service's settings before
Ray starts any worker, so trials see neither the database URL nor the MLflow server. If the
Tune experiment already exists on storage (the job was restarted), it is restored and
unfinished trials resume from their last checkpoints. SIGTERM (``ray job stop``) is turned
into the SIGINT that makes Tune stop gracefully and save its state.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
from collections.abc import Iterable
from types import FrameType
from typing import Any

import ray
from ray import tune
from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR
from ray.tune.logger import JsonLoggerCallback
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from service import crud
from service.capacity import Nodes, capacity_watch_for, wait_for_fit
from service.core.config import Settings
from service.db import Trial, shared_engine
from service.execution import DRIVER_ONLY_ENV, take_secrets
from service.recorder import TrialRecorder, recorder_for, trial_index
from service.states import ExperimentStatus, TrialState
from service.study import Resources, StudySpec
from service.trial import run_trial

log = logging.getLogger("service.driver")


def trial_config(trial: Trial, resources: Resources, storage_path: str) -> dict[str, Any]:
    """The Tune config of one stored trial: what the trial needs to train, and no secret."""
    return {
        "index": trial.index,
        "spec": json.loads(trial.spec_json),
        "cpus": resources.cpus_per_trial,
        "gpus": resources.gpus_per_trial,
        "workers": resources.workers_per_trial,
        "storage_path": storage_path,  # where multi-worker trials keep Train's checkpoints
    }


def scrub_worker_environment(names: Iterable[str]) -> None:
    """Remove ``names`` from the job's runtime environment before Ray starts workers.

    The Jobs API hands the job's ``env_vars`` to the driver and, through the job config that
    ``ray.init`` registers, to every worker of the job. The driver keeps them in its own
    environment; the job config it registers no longer has them.
    """
    raw = os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR)
    if not raw:
        return
    config = json.loads(raw)
    env_vars = (config.get("runtime_env") or {}).get("env_vars") or {}
    for name in names:
        env_vars.pop(name, None)
    os.environ[RAY_JOB_CONFIG_JSON_ENV_VAR] = json.dumps(config)


def make_tuner(
    path: str,
    configs: list[dict[str, Any]],
    res: Resources,
    name: str,
    callbacks: list[tune.Callback],
) -> tune.Tuner:
    """A new Tune experiment over the trials, or the saved one at ``path`` restored."""
    first = res.bundles()[0]  # the trial's own process (a multi-worker trial's only waits)
    trainable = tune.with_resources(run_trial, {"cpu": first["CPU"], "gpu": first["GPU"]})
    # the saved state brings its own callbacks (our recorder and watch; ``callbacks`` go
    # unused), as the driver that first ran the experiment built them
    if tune.Tuner.can_restore(path):
        log.info("restoring Tune experiment from %s", path)
        # a trial that failed for good (its retries spent) is FAILED in the database, which
        # keeps terminal states: restoring does not run it again
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=False)
    return tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(configs)},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=res.max_concurrent_trials,
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_name,
            reuse_actors=True,  # trials share warm worker processes (imports, data)
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=os.path.dirname(path),
            failure_config=tune.FailureConfig(max_failures=2),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=[*callbacks, JsonLoggerCallback()],  # result.json beside each trial
            verbose=1,
        ),
    )


VERSION_LABEL = "dst-lab-version"  # the image version a node carries (deploy/bin/dst-ray-node)


def version_mismatches(nodes: list[dict[str, Any]], version: str | None) -> list[str]:
    """One line per alive node whose image version (its ``dst-lab-version`` label) differs
    from the driver's own ``version``; nodes without the label (not started from our image)
    and a driver without a version are not compared."""
    if not version:
        return []
    lines = []
    for node in nodes:
        theirs = (node.get("Labels") or {}).get(VERSION_LABEL)
        if node.get("Alive") and theirs is not None and theirs != version:
            lines.append(
                f"Ray node {node.get('NodeManagerAddress', '?')} ({node.get('NodeID', '?')[:12]}) "
                f"runs image version {theirs}, this driver {version}: trials placed there may "
                f"fail; run every node from the same image"
            )
    return lines


def secrets_exposed(nodes: list[dict[str, Any]], node_id: str) -> str | None:
    """Why trials could read the secrets this driver took from its node's environment
    (``DST_DRIVER_SECRETS=head``): that node, ``node_id``, offers CPUs or GPUs, so Ray may
    start trials there with the same environment. None when it offers neither."""
    own = next((n for n in nodes if n.get("NodeID") == node_id), None)
    offers = {k: v for k, v in (own or {}).get("Resources", {}).items() if k in ("CPU", "GPU")}
    if not any(v > 0 for v in offers.values()):
        return None
    listed = ", ".join(f"{k}: {v:g}" for k, v in sorted(offers.items()))
    return (
        f"this driver's node offers {{{listed}}}: trials placed there start with its "
        "environment, which holds the service's database URL (DST_DRIVER_SECRETS=head); start "
        "the head with --num-cpus=0 (and no GPUs), or use DST_DRIVER_SECRETS=file"
    )


def preflight(
    settings: Settings,
    res: Resources,
    list_nodes: Nodes,
    *,
    node_id: str,
    secrets_from_head: bool,
    version: str | None,
) -> str | None:
    """Why the trials must not start on this Ray cluster, or None when they may.

    Refused: trials that could read the service's secrets (taken from this driver's node,
    which also offers CPUs or GPUs), and trials no node can hold once
    ``settings.ray_nodes_wait_s`` has passed (unless the cluster autoscales). Nodes of
    another image version are only logged: the trials may still run.
    """
    nodes = list_nodes()
    exposed = secrets_exposed(nodes, node_id) if secrets_from_head else None
    if exposed is not None:
        return f"the trials would share the service's secrets: {exposed}"
    misfit = None
    if not settings.ray_autoscaling:
        misfit, nodes = wait_for_fit(res, list_nodes, settings.ray_nodes_wait_s, nodes=nodes)
    for line in version_mismatches(nodes, version):
        log.error(line)
    if misfit is None:
        return None
    wait_s = settings.ray_nodes_wait_s
    waited = f" (after waiting {wait_s:g} s for nodes to join)" if wait_s > 0 else ""
    return f"the Ray cluster cannot run these trials: {misfit}{waited}"


def _trial_name(trial: tune.experiment.Trial) -> str:
    """``trial-3`` rather than Tune's default, which spells out the whole config."""
    return f"trial-{trial_index(trial)}"


def _sigterm_to_sigint(signum: int, frame: FrameType | None) -> None:
    log.warning("stop requested: letting Tune save its state")
    os.kill(os.getpid(), signal.SIGINT)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--experiment-id", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    experiment_id = args.experiment_id
    # the database URL and MLflow credentials: this process only
    from_head = take_secrets(os.environ)
    # MLflow writes go through the recorder's outbox, which retries: one attempt each here
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    # the recorder keeps the results; of Tune's own loggers (CSV, JSON, TensorBoard: about a
    # tenth of a study of small trials) only the JSON log is kept, see make_tuner
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # with num_to_keep, Tune saves its state whenever a trial has checkpointed that often, and
    # warns on every save within 5 s: hundreds of lines in a study of short epochs
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    settings = Settings()
    engine = shared_engine(settings.database_url)
    with Session(engine) as session:
        experiment = crud.get_experiment(session, experiment_id)
        if experiment is None:
            raise SystemExit(f"experiment {experiment_id} is not in the database")
        resources = StudySpec.model_validate_json(experiment.spec_json).resources
        results_dir = settings.storage_path / "ray_results"
        configs = [
            trial_config(t, resources, str(results_dir))
            for t in crud.list_trials(session, experiment_id)
        ]
        if not start(session, experiment_id):
            return
    recorder = recorder_for(experiment_id)
    scrub_worker_environment(DRIVER_ONLY_ENV)
    ray.init(address="auto", log_to_driver=True)
    try:
        refusal = preflight(
            settings,
            resources,
            ray.nodes,
            node_id=ray.get_runtime_context().get_node_id(),
            secrets_from_head=from_head,
            version=os.environ.get("DST_IMAGE_VERSION"),
        )
    except Exception as error:  # the trials must not stay pending: say why they never ran
        refusal = f"could not read the Ray cluster's nodes: {error!r}"
    if refusal is not None:
        _fail(engine, experiment_id, refusal)
        raise SystemExit(refusal)
    signal.signal(signal.SIGTERM, _sigterm_to_sigint)
    callbacks: list[tune.Callback] = [recorder]
    if not settings.ray_autoscaling:  # says when trials have no node that can hold them
        callbacks.append(capacity_watch_for(experiment_id, resources))
    tuner = make_tuner(
        str(results_dir / experiment_id), configs, resources, experiment_id, callbacks
    )
    try:
        results = tuner.fit()
    finally:  # also when Tune fails: the MLflow writes queued so far still go out
        _wind_down(engine, experiment_id, recorder)
    log.info("experiment %s: %d trials done", experiment_id, len(results))


def _wind_down(engine: Engine, experiment_id: str, recorder: TrialRecorder) -> None:
    """After Tune: make the database writes still queued, record a cancel that stopped the
    trials, then send the MLflow writes still queued (each bounded: a job does not outlive
    an unreachable database or MLflow by more than a minute), whichever of these fails."""
    try:
        if not recorder.close(timeout=60):
            log.error("some database writes of %s could not be done", experiment_id)
        _record_cancel(engine, experiment_id, recorder)
    finally:
        if recorder.runs is not None and not recorder.runs.close(timeout=60):
            log.error("some MLflow writes of %s could not be done", experiment_id)


def _record_cancel(engine: Engine, experiment_id: str, recorder: TrialRecorder) -> None:
    """If the experiment is being cancelled, its unfinished trials are cancelled, and the
    child runs of those that had started end so."""
    with Session(engine) as session:
        experiment = crud.get_experiment(session, experiment_id)
        if experiment is None or experiment.status != ExperimentStatus.CANCELLING:
            return
        started = [  # only trials that started have an MLflow run to end
            t.index
            for t in crud.list_trials(session, experiment_id)
            if t.state == TrialState.RUNNING
        ]
        moved = crud.finish_unfinished_trials(session, experiment_id, TrialState.CANCELLED)
        session.commit()
    if recorder.runs is not None:
        for index in started:
            recorder.runs.finish(index, TrialState.CANCELLED)
    log.info("experiment %s cancelled; %d trials stopped", experiment_id, moved)


def start(session: Session, experiment_id: str) -> bool:
    """Mark the experiment running; False if it was cancelled (or has ended) before this job
    could start, a submission the API could not confirm or a stop that did not arrive: then
    nothing trains."""
    # (the move clears a launch's "retrying": that launch's job is this one)
    crud.set_experiment_status(session, experiment_id, ExperimentStatus.RUNNING)
    crud.set_experiment_notice(session, experiment_id, None)  # an earlier driver's is stale
    session.commit()
    experiment = crud.get_experiment(session, experiment_id)
    status = ExperimentStatus(experiment.status) if experiment else ExperimentStatus.CANCELLED
    if status.wants_no_job:
        log.warning("experiment %s is %s: its trials do not run", experiment_id, status)
        return False
    return True


def _fail(engine: Any, experiment_id: str, error: str) -> None:
    """Fail every trial before it started, with ``error``; the job then fails, and the
    service's lifecycle records the experiment's end (with this error in the job's log)."""
    log.error("%s: %s", experiment_id, error)
    with Session(engine) as session:
        crud.finish_unfinished_trials(session, experiment_id, TrialState.FAILED, error=error)
        session.commit()


if __name__ == "__main__":
    main()
