"""The autoscaling recipe (docs/ops/k8s/: a worker Deployment, a KEDA ScaledObject) against
rlstream itself: the list KEDA reads is the run's rq queue, the container runs the role command
`rlstream up` runs, its liveness probe is a real command, the grace period covers the SIGTERM
drain; and the probe, `rlstream worker-alive`, against rq heartbeats (fakeredis)."""
from __future__ import annotations

import datetime
from pathlib import Path

import fakeredis
import pytest
import yaml
from rq import Queue, Worker
from rq.serializers import JSONSerializer

from rlstream.cli import build_parser
from rlstream.core import keys
from rlstream.core.config import Config
from rlstream.ops.liveness import worker_alive_main

K8S = Path(__file__).resolve().parents[2] / "docs" / "ops" / "k8s"


def manifests() -> tuple[dict, dict, dict]:
    [deployment] = yaml.safe_load_all((K8S / "worker-deployment.yaml").read_text())
    scaled, auth = yaml.safe_load_all((K8S / "keda-scaledobject.yaml").read_text())
    return deployment, scaled, auth


def container_env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container["env"]}


def test_keda_reads_the_runs_rq_queue_and_authenticates_with_the_workers_secret():
    deployment, scaled, auth = manifests()
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    run_id = container_env(container)["RLSTREAM_RUN_ID"]["value"]
    [trigger] = scaled["spec"]["triggers"]
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert trigger["type"] == "redis" and trigger["metadata"]["listName"] == f"rq:queue:{keys.job_queue_name(run_id)}"
    assert int(trigger["metadata"]["listLength"]) >= 1
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"] and auth["kind"] == "TriggerAuthentication"
    secret = container_env(container)["RLSTREAM_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    [ref] = auth["spec"]["secretTargetRef"]
    assert (ref["name"], ref["key"], ref["parameter"]) == (secret["name"], secret["key"], "password")


def test_the_container_runs_the_worker_role_and_its_probe_is_a_real_command():
    deployment, _, _ = manifests()
    spec = deployment["spec"]["template"]["spec"]
    [container] = spec["containers"]
    command, probe = container["command"], container["livenessProbe"]["exec"]["command"]
    assert command[:2] == ["rlstream", "worker"] and build_parser().parse_args(command[1:]).command == "worker"
    args = build_parser().parse_args(probe[1:])
    assert probe[0] == "rlstream" and args.command == "worker-alive" and args.config == command[2]
    assert args.max_age * container["livenessProbe"]["failureThreshold"] >= 60
    # the SIGTERM drain: the groups in flight, at most job_timeout + 15 s (rlstream/workers/main.py)
    assert spec["terminationGracePeriodSeconds"] >= Config().job_timeout + 15
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert container_env(container)["RLSTREAM_LOG_PATH"]["value"] in mounts  # the weights the trainer publishes


@pytest.fixture
def r():
    return fakeredis.FakeRedis()


def register(r, name: str, beat: datetime.datetime | None = None) -> None:
    worker = Worker([Queue(keys.job_queue_name("myrun"), connection=r, serializer=JSONSerializer)], connection=r,
                    name=name, serializer=JSONSerializer)
    worker.register_birth()
    worker.heartbeat()
    if beat is not None:
        r.hset(worker.key, "last_heartbeat", beat.strftime("%Y-%m-%dT%H:%M:%S.%fZ"))


def test_worker_alive_reads_the_heartbeat_of_this_hosts_worker(r, capsys):
    assert worker_alive_main(r, "myrun", host="pod-a") == 1 and "found: none" in capsys.readouterr().out
    register(r, "rlstream-myrun-pod-b-7")  # another pod's worker does not make this one alive
    assert worker_alive_main(r, "myrun", host="pod-a") == 1
    register(r, "rlstream-myrun-pod-a-1")
    assert worker_alive_main(r, "myrun", host="pod-a") == 0 and "rlstream-myrun-pod-a-1" in capsys.readouterr().out
    assert worker_alive_main(r, "otherrun", host="pod-a") == 1


def test_a_stale_heartbeat_is_not_alive(r, capsys):
    old = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=300)
    register(r, "rlstream-myrun-pod-a-1", beat=old)
    assert worker_alive_main(r, "myrun", max_age_s=60, host="pod-a") == 1
    assert "rlstream-myrun-pod-a-1 300s ago" in capsys.readouterr().out
