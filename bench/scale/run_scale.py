"""Scale and fault-tolerance harness of the VisionFT operator on a real control plane with kwok.

One command (the full run, with the operator's default settings: about 5 min of wall clock on
a 2-core machine; results in bench/SCALE_RESULTS.md):

    .venv/bin/python bench/scale/run_scale.py --report /tmp/scale.md

A small run (about 3 min):

    .venv/bin/python bench/scale/run_scale.py --resources 100 --namespaces 10 --nodes 20 --report /tmp/s.md

It needs the control-plane binaries of `hack/build-test-cluster.sh` (.cache/bin) and is no part of the
default pytest run. What it does:

1. Starts its own `tests.harness.kube.ControlPlane` (etcd, kube-apiserver, controller-manager, scheduler,
   kwok) with `--nodes` fake GPU nodes of `--gpus-per-node` GPUs, with two changes: kwok runs this
   folder's pod stages (kwok-stages/: a pod runs the number of seconds written in its resource's name,
   then succeeds, or fails with exit code 2 when the name ends in "-f"), and the apiserver writes an
   audit log of the operator's requests only (the operator has its own user, so its requests can be
   counted apart from the controllers', kwok's and this script's).
2. Installs the CRD and starts the real `visionft-operator` console script as a subprocess (cluster-wide,
   standalone, JSON logs, metrics on 127.0.0.1; `--operator-env KEY=VALUE` passes its documented
   VISIONFT_* settings).
3. Creates `--resources` VisionFineTunes over `--namespaces` namespaces, each needing 1 GPU. Each one's
   run time is drawn uniformly from [--min-seconds, --max-seconds]; exactly round(N x --fail-fraction) of
   them, drawn at random (--seed), fail.
4. Injects the faults while the run goes on (unless --no-faults): the operator SIGKILLed and restarted
   `--operator-kills` times, the apiserver SIGKILLed and restarted `--apiserver-restarts` times, etcd
   SIGKILLed and restarted `--etcd-restarts` times. They fire at fixed points of progress (share of
   Jobs created, share of resources finished), at least --fault-gap seconds apart.
5. Measures: seconds from the first apply until every Job exists and until every resource is in a final
   phase; the operator's peak RSS (VmHWM, per incarnation) and CPU seconds (utime+stime, summed over
   incarnations) from /proc; apiserver requests in all (apiserver_request_total, summed over apiserver
   incarnations) and the operator's own (audit log) per resource; handler errors (Kopf's handler failures
   and the failed reconciles that the operator's work queue retries) from the operator's log; its
   reconciles and retries from its /metrics, summed over incarnations; and final-state consistency: every resource's phase against its Job's conditions and against the
   outcome that was injected, no orphan Jobs, no resource with more than one Job, no Job created twice.
6. Writes a JSON summary and a Markdown report (--report, --json) and exits 0 only when every acceptance
   criterion holds.

The run stops at --timeout seconds or at the wall-clock time --stop-at (HH:MM, UTC), whichever comes
first, and reports what it reached.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import random
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.harness.kube import (  # noqa: E402  (the repo root goes on sys.path first)
    STAGES_DIR,
    ControlPlane,
    _die_with_parent,
    free_port,
)

HERE = Path(__file__).resolve().parent
SCALE_STAGES = HERE / "kwok-stages"
#: The harness's stages that the scale run keeps; its pod-complete/pod-failure are replaced by ours.
KEPT_STAGES = ("node-heartbeat.yaml", "node-initialize.yaml", "pod-ready.yaml", "pod-delete.yaml")
CRD = REPO / "crds" / "visionft.io_visionfinetunes.yaml"
GROUP, VERSION, PLURAL = "visionft.io", "v1alpha1", "visionfinetunes"
OPERATOR_USER = "visionft-scale-operator"
MANAGED_BY = "app.kubernetes.io/managed-by=visionft-operator"
FINAL = {"Succeeded", "Failed"}
RSS_LIMIT_MB = 300.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Kopf's handler failures ("Handler 'x' failed with an exception ...") and the operator's failed reconciles,
# which its work queue retries ("reconcile of ns/name failed temporarily ...").
HANDLER_FAILURE = re.compile(r"failed (temporarily|permanently|with an exception)")
RECONCILE_RETRY = re.compile(r"^reconcile of \S+ failed temporarily")

AUDIT_POLICY = f"""apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
- level: Metadata
  users: ["{OPERATOR_USER}"]
- level: None
"""


# ------------------------------------------------------------------------------------ control plane
class ScaleControlPlane(ControlPlane):
    """The test control plane with the scale run's kwok stages and an audit log of the operator's requests."""

    def _argv(self, name: str) -> list[str]:
        argv = super()._argv(name)
        if name == "kwok":
            argv = [a for a in argv if not a.startswith("--config=")]
            argv += [f"--config={STAGES_DIR / stage}" for stage in KEPT_STAGES]
            argv += [f"--config={stage}" for stage in sorted(SCALE_STAGES.glob("*.yaml"))]
        elif name == "kube-apiserver":
            policy = self.work_dir / "audit-policy.yaml"
            policy.write_text(AUDIT_POLICY)
            argv += [
                f"--audit-policy-file={policy}",
                f"--audit-log-path={self.audit_log}",
                "--audit-log-format=json",
                "--audit-log-maxsize=0",
            ]
        return argv

    @property
    def audit_log(self) -> Path:
        return self.work_dir / "logs" / "audit.jsonl"


# ----------------------------------------------------------------------------------- /proc helpers
def proc_stats(pid: int) -> dict[str, float] | None:
    """VmHWM and VmRSS in MB, and utime+stime in seconds, of a live process; None when it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = {}
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in {"VmHWM", "VmRSS"}:
            fields[key] = int(value.split()[0]) / 1024.0
    after_comm = stat.rsplit(")", 1)[1].split()
    cpu = (int(after_comm[11]) + int(after_comm[12])) / CLOCK_TICKS
    return {"hwm_mb": fields.get("VmHWM", 0.0), "rss_mb": fields.get("VmRSS", 0.0), "cpu_s": cpu}


@dataclass
class CpuLedger:
    """CPU seconds and peak RSS of processes that get killed and restarted: one entry per incarnation."""

    last: dict[int, dict[str, float]] = field(default_factory=dict)

    def sample(self, pid: int | None) -> dict[str, float] | None:
        if pid is None:
            return None
        stats = proc_stats(pid)
        if stats is not None:
            self.last[pid] = stats
        return stats

    @property
    def cpu_s(self) -> float:
        return sum(s["cpu_s"] for s in self.last.values())

    @property
    def peak_mb(self) -> float:
        return max((s["hwm_mb"] for s in self.last.values()), default=0.0)


# ---------------------------------------------------------------------------------------- operator
class Operator:
    """The real `visionft-operator` console script, cluster-wide and standalone, logging JSON to a file."""

    def __init__(
        self, kubeconfig: Path, log_path: Path, env: dict[str, str], wrapper: str | None = None
    ) -> None:
        self.kubeconfig = kubeconfig
        self.wrapper = wrapper
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.ledger = CpuLedger()
        self.starts = 0
        self.unexpected_exits = 0
        self.metrics_port = 0
        #: The operator's own counters (its /metrics), summed over incarnations.
        self.counters: dict[str, float] = defaultdict(float)
        self._scraped: dict[str, float] = {}

    def start(self) -> None:
        port = free_port()
        self.metrics_port = free_port()
        self._scraped = {}
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "VISIONFT_LIVENESS_PORT": str(port),
            # Metrics on, as the chart runs it, but on loopback only.
            "VISIONFT_METRICS_PORT": str(self.metrics_port),
            "VISIONFT_METRICS_BIND_ADDRESS": "127.0.0.1",
            "VISIONFT_LOG_FORMAT": "json",
            "VISIONFT_LOG_LEVEL": "INFO",
            "VISIONFT_TRAINER_IMAGE": "ghcr.io/visionft/trainer:scale",
            **self.env,
        }
        script = Path(sys.executable).parent / "visionft-operator"
        argv = [str(script)] if script.exists() else [sys.executable, "-m", "visionft_operator.main"]
        if self.wrapper:
            argv = [sys.executable, self.wrapper]
        argv += ["--all-namespaces", "--standalone", "--liveness", f"http://127.0.0.1:{port}/healthz"]
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f'{{"harness": "operator start #{self.starts}"}}\n'.encode())
            log.flush()
            self.proc = subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the operator exited with {self.proc.returncode}; see {self.log_path}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
            time.sleep(0.3)
        raise RuntimeError(f"the operator's liveness endpoint did not open in 90 s; see {self.log_path}")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def sample(self) -> dict[str, float] | None:
        return self.ledger.sample(self.pid)

    def scrape(self) -> None:
        """Fold this incarnation's reconcile and retry counters (its /metrics) into the totals."""
        if self.pid is None:
            return
        try:
            url = f"http://127.0.0.1:{self.metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as resp:
                text = resp.read().decode()
        except Exception:
            return
        now: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith('visionft_handler_duration_seconds_count{handler="reconcile"}'):
                now["reconciles"] = float(line.rsplit(" ", 1)[1])
            elif line.startswith("visionft_workqueue_retries_total "):
                now["retries"] = float(line.rsplit(" ", 1)[1])
        for key, value in now.items():
            self.counters[key] += value - self._scraped.get(key, 0.0)
        self._scraped.update(now)

    def kill(self) -> None:
        """SIGKILL, as a node loss or an OOM kill would end it (no clean-up)."""
        self.sample()
        self.scrape()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def check_alive(self) -> bool:
        """Restart the operator when it died on its own; return whether it had."""
        if self.proc is not None and self.proc.poll() is not None:
            self.unexpected_exits += 1
            self.start()
            return True
        return False

    def stop(self) -> None:
        self.sample()
        self.scrape()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


# ------------------------------------------------------------------------------------- resources
def resource_plan(
    count: int, namespaces: int, fail_fraction: float, lo: int, hi: int, seed: int
) -> list[tuple[str, str, int, bool]]:
    """(namespace, name, seconds, fails) of every resource; the name carries seconds and outcome for kwok."""
    rng = random.Random(seed)
    failing = set(rng.sample(range(count), round(count * fail_fraction)))
    plan = []
    for index in range(count):
        seconds = rng.randint(lo, hi)
        fails = index in failing
        name = f"ft-{index:04d}-d{seconds}" + ("-f" if fails else "")
        plan.append((f"scale-{index % namespaces:03d}", name, seconds, fails))
    return plan


def resource_body(namespace: str, name: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "VisionFineTune",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"uri": "s3://models/qwen2.5-vl-7b/"},
            "dataset": {"uri": "s3://datasets/latex-ocr/"},
            "training": {"maxSteps": 30},
            "output": {"uri": f"s3://outputs/{namespace}/{name}/"},
            "storage": {"endpoint": "http://s3.storage.svc:8333", "credentialsSecret": "s3-creds"},
            "resources": {"gpusPerNode": 1, "cpu": "1", "memory": "1Gi", "scratchSize": "1Gi"},
        },
    }


def job_state(job: dict[str, Any]) -> str | None:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("status") == "True" and cond.get("type") in {"Complete", "Failed"}:
            return "Succeeded" if cond["type"] == "Complete" else "Failed"
    return None


# --------------------------------------------------------------------------------------- the run
class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.plan = resource_plan(
            args.resources, args.namespaces, args.fail_fraction, args.min_seconds, args.max_seconds, args.seed
        )
        self.n = len(self.plan)
        self.out = Path(args.out_dir or f"/tmp/visionft-scale-{time.strftime('%Y%m%d-%H%M%S')}")
        self.out.mkdir(parents=True, exist_ok=True)
        self.plane = ScaleControlPlane(gpu_nodes=args.nodes, gpus_per_node=args.gpus_per_node)
        self.results: dict[str, Any] = {"config": {k: v for k, v in vars(args).items()}}
        self.timeline: list[dict[str, Any]] = []
        self.faults: list[dict[str, Any]] = []
        self.apiserver_requests = 0.0
        self.apiserver_base = 0.0
        self.component_cpu: dict[str, float] = defaultdict(float)
        self.t0 = 0.0
        self.wall0 = 0.0
        self.nudged = 0
        self._nudged_at: dict[str, float] = {}  # pod uid -> when the harness last touched it

    # -- clients --------------------------------------------------------------------------------
    def _apis(self) -> tuple[Any, Any, Any]:
        from kubernetes import client

        api = self.harness_client
        return client.CoreV1Api(api), client.BatchV1Api(api), client.CustomObjectsApi(api)

    def _list_jobs(self, cached: bool = True) -> list[dict[str, Any]]:
        _, batch, _ = self._apis()
        kwargs: dict[str, Any] = {"resource_version": "0"} if cached else {}
        response = batch.list_job_for_all_namespaces(
            label_selector=MANAGED_BY, _preload_content=False, _request_timeout=60, **kwargs
        )
        return json.loads(response.data).get("items") or []

    def _list_resources(self, cached: bool = True) -> list[dict[str, Any]]:
        _, _, custom = self._apis()
        kwargs: dict[str, Any] = {"resource_version": "0"} if cached else {}
        response = custom.list_cluster_custom_object(
            GROUP, VERSION, PLURAL, _preload_content=False, _request_timeout=60, **kwargs
        )
        return json.loads(response.data).get("items") or []

    def _scrape_apiserver(self) -> float | None:
        """Sum of apiserver_request_total of the running apiserver (all clients), or None."""
        plane = self.plane
        assert plane._pki is not None
        context = ssl.create_default_context(cafile=str(plane._pki.ca_crt))
        context.load_cert_chain(str(plane.admin_cert[0]), str(plane.admin_cert[1]))
        try:
            with urllib.request.urlopen(f"{plane.server}/metrics", timeout=30, context=context) as resp:
                text = resp.read().decode()
        except Exception:
            return None
        total = 0.0
        for line in text.splitlines():
            if line.startswith("apiserver_request_total{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def _component_sample(self, name: str) -> None:
        component = self.plane.components.get(name)
        if component is not None and component.process is not None:
            stats = proc_stats(component.process.pid)
            if stats is not None:
                self.component_cpu[f"{name}#{component.starts}"] = stats["cpu_s"]

    # -- set-up ---------------------------------------------------------------------------------
    def setup(self) -> None:
        began = time.monotonic()
        report = self.plane.start()
        self.results["control_plane_start_s"] = round(report.total, 1)
        admin = self.plane.admin
        self.harness_client = admin.client()
        self.plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
        for _ in range(120):
            out = self.plane.kubectl("get", "vft", "-A", check=False)
            if out.returncode == 0:
                break
            time.sleep(0.5)
        else:
            raise RuntimeError("the VisionFineTune API did not come up")
        core, _, _ = self._apis()
        for ns in sorted({ns for ns, *_ in self.plan}):
            core.create_namespace({"metadata": {"name": ns}})
            core.create_namespaced_secret(
                ns,
                {
                    "metadata": {"name": "s3-creds"},
                    "stringData": {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"},
                },
            )
        identity = self.plane.as_user(OPERATOR_USER, ["system:masters"])
        env = dict(item.split("=", 1) for item in self.args.operator_env)
        self.operator = Operator(
            identity.kubeconfig, self.out / "operator.log", env, self.args.operator_wrapper
        )
        self.operator.start()
        self.results["setup_s"] = round(time.monotonic() - began, 1)
        print(f"[scale] control plane up in {report}; operator pid {self.operator.pid}", flush=True)

    # -- faults ---------------------------------------------------------------------------------
    def fault_schedule(self) -> list[tuple[str, str, float]]:
        """(fault, trigger, threshold): trigger "jobs" (share of Jobs that exist) or "final"."""
        if self.args.no_faults:
            return []
        kills = self.args.operator_kills
        schedule: list[tuple[str, str, float]] = []
        if kills >= 1:
            schedule.append(("operator-kill", "jobs", 0.3))  # in the middle of the creation burst
        schedule += [("apiserver-restart", "jobs", 0.8)] * min(self.args.apiserver_restarts, 1)
        if kills >= 2:
            schedule.append(("operator-kill", "final", 0.15))
        schedule += [("etcd-restart", "final", 0.35)] * min(self.args.etcd_restarts, 1)
        schedule += [("operator-kill", "final", 0.5 + 0.05 * i) for i in range(max(0, kills - 2))]
        schedule += [("apiserver-restart", "final", 0.6)] * max(0, self.args.apiserver_restarts - 1)
        schedule += [("etcd-restart", "final", 0.7)] * max(0, self.args.etcd_restarts - 1)
        return schedule

    def inject(self, fault: str, progress: dict[str, Any]) -> None:
        began = time.monotonic()
        print(f"[scale] t={began - self.t0:6.1f}s fault {fault} at {progress}", flush=True)
        if fault == "operator-kill":
            self.operator.kill()
            time.sleep(self.args.restart_delay)
            self.operator.start()
        elif fault == "apiserver-restart":
            self._end_apiserver_segment()
            self._component_sample("kube-apiserver")
            self.plane.restart_apiserver()
            self.apiserver_base = 0.0  # a new process counts from 0
        elif fault == "etcd-restart":
            self._component_sample("etcd")
            self.plane.restart_etcd()
        else:
            raise ValueError(fault)
        ended = time.monotonic()
        self.faults.append(
            {
                "fault": fault,
                "at_s": round(began - self.t0, 1),
                "recovered_s": round(ended - began, 1),
                "wall_start": time.time() - (ended - began),
                "wall_end": time.time(),
                "progress": progress,
            }
        )

    def _end_apiserver_segment(self) -> None:
        value = self._scrape_apiserver()
        if value is not None:
            self.apiserver_requests += value - self.apiserver_base

    # -- the run --------------------------------------------------------------------------------
    def run(self) -> None:
        args = self.args
        deadline = time.monotonic() + args.timeout
        if args.stop_at:
            now = dt.datetime.now(dt.UTC)
            hour, minute = (int(x) for x in args.stop_at.split(":"))
            stop = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
            deadline = min(deadline, time.monotonic() + (stop - now).total_seconds())
        base = self._scrape_apiserver()
        self.apiserver_base = base or 0.0
        _, _, custom = self._apis()
        self.t0 = time.monotonic()
        self.wall0 = time.time()
        for ns, name, *_ in self.plan:
            custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, resource_body(ns, name))
        self.results["apply_s"] = round(time.monotonic() - self.t0, 1)
        print(f"[scale] applied {self.n} resources in {self.results['apply_s']} s", flush=True)

        schedule = self.fault_schedule()
        self.results["faults_not_injected"] = [f for f, *_ in schedule]
        last_fault = -1e9
        jobs_all_s: float | None = None
        final_all_s: float | None = None
        last_print = 0.0
        last_nudge = time.monotonic()
        polls = 0
        self.results["jobs_all_exist_s"] = self.results["all_final_s"] = None
        max_polls = int(args.timeout / max(args.poll, 0.5)) + 10
        while polls < max_polls:
            polls += 1
            now = time.monotonic()
            if now > deadline:
                print("[scale] stopping: the time limit came first", flush=True)
                break
            self.operator.sample()
            if self.operator.check_alive():
                print("[scale] the operator had exited on its own; restarted it", flush=True)
            jobs = finals = -1
            phases: Counter[str] = Counter()
            try:
                if jobs_all_s is None:
                    jobs = len(self._list_jobs())
                    if jobs >= self.n:
                        jobs_all_s = time.monotonic() - self.t0
                        self.results["jobs_all_exist_s"] = round(jobs_all_s, 1)
                else:
                    jobs = self.n
                items = self._list_resources()
                phases = Counter(((i.get("status") or {}).get("phase") or "-") for i in items)
                finals = sum(phases[p] for p in FINAL)
            except Exception as exc:  # the apiserver may be down for a moment: keep polling
                print(f"[scale] poll failed: {exc!r:.200}", flush=True)
            t = time.monotonic() - self.t0
            rss = (self.operator.sample() or {}).get("rss_mb", 0.0)
            self.timeline.append(
                {
                    "t": round(t, 1),
                    "jobs": jobs,
                    "final": finals,
                    "rss_mb": round(rss, 1),
                    "phases": dict(phases),
                }
            )
            if t - last_print >= 15 or finals >= self.n:
                last_print = t
                self.operator.scrape()
                print(
                    f"[scale] t={t:6.1f}s jobs={jobs} final={finals}/{self.n} rss={rss:.0f}MB "
                    f"phases={dict(phases)}",
                    flush=True,
                )
            if finals >= self.n and jobs_all_s is not None:
                final_all_s = t
                self.results["all_final_s"] = round(final_all_s, 1)
                break
            if now - last_nudge >= args.nudge_every:
                last_nudge = now
                self.nudge_stuck_pods()
            if schedule and jobs >= 0 and now - last_fault >= args.fault_gap:
                fault, trigger, threshold = schedule[0]
                share = (jobs if trigger == "jobs" else finals) / self.n
                if share >= threshold:
                    schedule.pop(0)
                    self.results["faults_not_injected"] = [f for f, *_ in schedule]
                    self.inject(fault, {"jobs": jobs, "final": finals})
                    last_fault = time.monotonic()
                    continue
            time.sleep(args.poll)
        self.results["faults_not_injected"] = [f for f, *_ in schedule]
        self._settle_jobs(deadline)

    def nudge_stuck_pods(self) -> None:
        """Stand in for the kubelet's periodic pod sync, which kwok lacks: kwok acts on watch events only,
        and a pod whose event it missed while the apiserver or etcd restarted stays Pending (or Running)
        forever. Touch such pods (an annotation) so that kwok sees them again; count them in the report.
        A Running pod counts as lost 30 s after its own run time; kwok starts a stage's delay again on every
        change of the pod, so a touched pod is touched again only after that much time has passed: sooner
        would keep it from ever ending."""
        core, _, _ = self._apis()
        try:
            response = core.list_pod_for_all_namespaces(
                label_selector=MANAGED_BY, resource_version="0", _preload_content=False, _request_timeout=60
            )
            pods = json.loads(response.data).get("items") or []
        except Exception as exc:
            print(f"[scale] nudge: can't list pods: {exc!r:.200}", flush=True)
            return
        now = dt.datetime.now(dt.UTC)
        for pod in pods:
            meta, spec, status = pod["metadata"], pod.get("spec") or {}, pod.get("status") or {}
            # The pod's own run time (its resource's name says it: "ft-0042-d37"), plus 30 s.
            run = re.search(r"-d(\d+)", (meta.get("labels") or {}).get("visionft.io/name", ""))
            limit = (int(run.group(1)) if run else self.args.max_seconds) + 30
            if meta.get("deletionTimestamp") or not spec.get("nodeName"):
                continue
            phase = status.get("phase")
            scheduled = next(
                (
                    c.get("lastTransitionTime")
                    for c in status.get("conditions") or []
                    if c.get("type") == "PodScheduled"
                ),
                None,
            )
            since = (
                status.get("startTime") if phase == "Running" else scheduled or meta.get("creationTimestamp")
            )
            if phase not in {"Pending", "Running"} or not since:
                continue
            age = (now - dt.datetime.fromisoformat(since.replace("Z", "+00:00"))).total_seconds()
            if age < (30 if phase == "Pending" else limit):
                continue
            last = self._nudged_at.get(meta["uid"])
            if last is not None and time.monotonic() - last < limit:
                continue
            self.nudged += last is None  # pods, not touches
            self._nudged_at[meta["uid"]] = time.monotonic()
            patch = {"metadata": {"annotations": {"visionft.io/scale-nudge": f"{time.time():.0f}"}}}
            with contextlib.suppress(Exception):
                core.patch_namespaced_pod(meta["name"], meta["namespace"], patch, _request_timeout=30)
            print(f"[scale] nudged {phase} pod {meta['namespace']}/{meta['name']} ({age:.0f} s)", flush=True)

    def _settle_jobs(self, deadline: float) -> None:
        """Wait (briefly) until every Job carries Complete or Failed: the operator may report Failed from
        the Job's FailureTarget condition a moment before the Job controller writes Failed."""
        end = min(deadline, time.monotonic() + 60)
        while time.monotonic() < end:
            try:
                jobs = self._list_jobs(cached=False)
                if len(jobs) >= self.n and all(job_state(j) for j in jobs):
                    return
            except Exception:
                pass
            time.sleep(2)

    # -- verdict --------------------------------------------------------------------------------
    def check(self) -> None:
        self.operator.sample()
        resources = self._list_resources(cached=False)
        jobs = self._list_jobs(cached=False)
        expected = {(ns, name): ("Failed" if fails else "Succeeded") for ns, name, _, fails in self.plan}
        by_uid = {r["metadata"]["uid"]: r for r in resources}
        jobs_of: dict[str, list[dict[str, Any]]] = defaultdict(list)
        orphans = []
        for job in jobs:
            owners = [o["uid"] for o in job["metadata"].get("ownerReferences") or [] if o.get("controller")]
            if not owners or owners[0] not in by_uid:
                orphans.append(f"{job['metadata']['namespace']}/{job['metadata']['name']}")
            else:
                jobs_of[owners[0]].append(job)
        correct, problems = 0, []
        phases: Counter[str] = Counter()
        for res in resources:
            meta = res["metadata"]
            key = (meta["namespace"], meta["name"])
            phase = (res.get("status") or {}).get("phase")
            phases[phase or "-"] += 1
            mine = jobs_of.get(meta["uid"], [])
            outcome = job_state(mine[0]) if len(mine) == 1 else None
            if phase == expected.get(key) and outcome == phase:
                correct += 1
            elif len(problems) < 20:
                problems.append(
                    f"{key[0]}/{key[1]}: phase {phase}, Job {outcome} ({len(mine)} Jobs), "
                    f"expected {expected.get(key)}"
                )
        missing = len(
            set(expected) - {(r["metadata"]["namespace"], r["metadata"]["name"]) for r in resources}
        )
        self.results["final"] = {
            "resources": len(resources),
            "missing_resources": missing,
            "phases": dict(phases),
            "correct": correct,
            "jobs": len(jobs),
            "resources_with_several_jobs": sum(1 for v in jobs_of.values() if len(v) > 1),
            "resources_without_job": sum(1 for r in resources if not jobs_of.get(r["metadata"]["uid"])),
            "orphan_jobs": orphans[:20],
            "orphan_job_count": len(orphans),
            "problems": problems,
        }

    def audit(self) -> None:
        """The operator's requests from the audit log: unique audit IDs by verb and resource."""
        path = self.plane.audit_log
        seen: set[str] = set()
        by_kind: Counter[str] = Counter()
        by_agent: Counter[str] = Counter()
        codes: Counter[str] = Counter()
        job_creates: Counter[str] = Counter()
        if path.exists():
            with path.open() as handle:
                for line in handle:
                    try:
                        entry = json.loads(line)
                    except ValueError:
                        continue
                    audit_id = entry.get("auditID")
                    if audit_id in seen:
                        continue
                    seen.add(audit_id)
                    ref = entry.get("objectRef") or {}
                    resource = ref.get("resource", "?") + (
                        f"/{ref['subresource']}" if ref.get("subresource") else ""
                    )
                    by_kind[f"{entry.get('verb')} {resource}"] += 1
                    by_agent[(entry.get("userAgent") or "?").split("/")[0]] += 1
                    code = (entry.get("responseStatus") or {}).get("code")
                    codes[str(code)] += 1
                    if entry.get("verb") == "create" and ref.get("resource") == "jobs" and code == 201:
                        job_creates[f"{ref.get('namespace')}/{ref.get('name')}"] += 1
        total = len(seen)
        self.results["operator_requests"] = {
            "total": total,
            "per_resource": round(total / max(self.n, 1), 1),
            "by_verb_resource": dict(by_kind.most_common(25)),
            "by_user_agent": dict(by_agent),
            "by_code": dict(codes),
            "jobs_created": sum(job_creates.values()),
            "jobs_created_twice": sorted(k for k, v in job_creates.items() if v > 1)[:20],
        }

    def operator_log(self) -> None:
        errors = handler_failures = retried = 0
        in_fault = 0
        samples: Counter[str] = Counter()
        windows = [(f["wall_start"], f["wall_end"] + self.args.fault_grace) for f in self.faults]
        with contextlib.suppress(OSError), self.operator.log_path.open(errors="replace") as handle:
            for line in handle:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if entry.get("level") not in {"ERROR", "CRITICAL"}:
                    continue
                errors += 1
                message = str(entry.get("message", ""))
                stamp = entry.get("time")
                when = dt.datetime.fromisoformat(stamp).timestamp() if stamp else 0.0
                during = any(a <= when <= b for a, b in windows)
                if HANDLER_FAILURE.search(message):
                    handler_failures += 1
                    in_fault += during
                    retried += bool(RECONCILE_RETRY.search(message))
                if not during:
                    samples[re.sub(r"[0-9a-f-]{36}|ft-\d{4}-d\d+(-f)?|scale-\d{3}", "*", message)[:200]] += 1
        self.results["operator_log"] = {
            "error_lines": errors,
            "handler_failures": handler_failures,
            "handler_failures_in_fault_windows": in_fault,
            "handler_failures_outside_faults": handler_failures - in_fault,
            "of_which_reconciles_retried": retried,
            "errors_outside_faults_top": dict(samples.most_common(8)),
        }

    def finish(self) -> None:
        self._end_apiserver_segment()
        for name in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok"):
            self._component_sample(name)
        self.operator.stop()
        ledger = self.operator.ledger
        self.results["operator"] = {
            "incarnations": self.operator.starts,
            "unexpected_exits": self.operator.unexpected_exits,
            "peak_rss_mb": round(ledger.peak_mb, 1),
            "peak_rss_mb_each": [round(s["hwm_mb"], 1) for s in ledger.last.values()],
            "cpu_s": round(ledger.cpu_s, 1),
            "reconciles": int(self.operator.counters.get("reconciles", 0)),
            "reconcile_retries": int(self.operator.counters.get("retries", 0)),
        }
        self.results["apiserver_requests_all_clients"] = int(self.apiserver_requests)
        self.results["apiserver_requests_all_clients_per_resource"] = round(
            self.apiserver_requests / self.n, 1
        )
        cpu: dict[str, float] = defaultdict(float)
        for key, value in self.component_cpu.items():
            cpu[key.split("#")[0]] += value
        self.results["component_cpu_s"] = {k: round(v, 1) for k, v in cpu.items()}
        self.results["kwok_pods_nudged"] = self.nudged
        self.results["faults"] = [
            {k: v for k, v in f.items() if not k.startswith("wall")} for f in self.faults
        ]
        self.results["timeline"] = self.timeline[:: -(-len(self.timeline) // 40) or 1]
        self.results["machine"] = machine()
        self.results["started"] = dt.datetime.fromtimestamp(self.wall0, dt.UTC).isoformat(timespec="seconds")
        self.results["acceptance"] = acceptance(self.results, self.n, self.args)


def machine() -> dict[str, Any]:
    def version(binary: str, flag: str = "--version") -> str:
        try:
            out = subprocess.run(
                [str(REPO / ".cache" / "bin" / binary), flag],
                capture_output=True,
                text=True,
                timeout=20,
                check=False,
            )
            return (out.stdout or out.stderr).splitlines()[0].strip()
        except Exception:
            return "?"

    import importlib.metadata as md

    cpu_model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "?",
    )
    mem_gb = int(Path("/proc/meminfo").read_text().split()[1]) / 1024 / 1024
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gb": round(mem_gb, 1),
        "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "kopf": md.version("kopf"),
        "kubernetes_client": md.version("kubernetes"),
        "kube-apiserver": version("kube-apiserver"),
        "etcd": version("etcd"),
        "kwok": version("kwok"),
    }


def acceptance(results: dict[str, Any], n: int, args: argparse.Namespace) -> dict[str, Any]:
    final = results.get("final") or {}
    log = results.get("operator_log") or {}
    ops = results.get("operator_requests") or {}
    wanted = {
        "operator-kill": 0 if args.no_faults else args.operator_kills,
        "apiserver-restart": 0 if args.no_faults else args.apiserver_restarts,
        "etcd-restart": 0 if args.no_faults else args.etcd_restarts,
    }
    done = Counter(f["fault"] for f in results.get("faults") or [])
    checks = {
        f"{n} of {n} resources in the correct final phase": final.get("correct") == n,
        "0 duplicate Jobs (one Job per resource, none created twice)": (
            final.get("resources_with_several_jobs") == 0 and not ops.get("jobs_created_twice")
        ),
        "0 orphan Jobs": final.get("orphan_job_count") == 0,
        "0 handler errors outside the injected outages": log.get("handler_failures_outside_faults") == 0,
        f"operator peak RSS under {RSS_LIMIT_MB:.0f} MB": (results.get("operator") or {}).get(
            "peak_rss_mb", 1e9
        )
        < RSS_LIMIT_MB,
        "every requested fault injected": all(done[k] >= v for k, v in wanted.items()),
    }
    return {"checks": checks, "passed": all(checks.values())}


def markdown(results: dict[str, Any]) -> str:
    cfg = results["config"]
    final = results.get("final") or {}
    op = results.get("operator") or {}
    reqs = results.get("operator_requests") or {}
    log = results.get("operator_log") or {}
    m = results.get("machine") or {}
    acc = results.get("acceptance") or {"checks": {}, "passed": False}
    lines = [
        f"### {cfg['resources']} resources / {cfg['namespaces']} namespaces / {cfg['nodes']} nodes x "
        f"{cfg['gpus_per_node']} GPUs, faults {'off' if cfg['no_faults'] else 'on'} "
        f"(started {results.get('started')})",
        "",
        f"Acceptance: **{'PASS' if acc['passed'] else 'FAIL'}**",
        "",
        *(f"- [{'x' if ok else ' '}] {name}" for name, ok in acc["checks"].items()),
        "",
        "| measure | value |",
        "|---|---|",
        f"| apply of all resources (harness, sequential creates) | {results.get('apply_s')} s |",
        f"| apply -> every Job exists | {results.get('jobs_all_exist_s')} s |",
        f"| apply -> every resource in a final phase | {results.get('all_final_s')} s |",
        f"| final phases | {final.get('phases')} |",
        f"| correct final phase (phase = Job outcome = injected outcome) | {final.get('correct')} / {cfg['resources']} |",
        f"| Jobs / resources with >1 Job / Jobs created twice / orphan Jobs | {final.get('jobs')} / "
        f"{final.get('resources_with_several_jobs')} / {len(reqs.get('jobs_created_twice') or [])} / "
        f"{final.get('orphan_job_count')} |",
        f"| operator peak RSS (max over incarnations; each) | {op.get('peak_rss_mb')} MB; {op.get('peak_rss_mb_each')} |",
        f"| operator CPU (utime+stime, all incarnations) | {op.get('cpu_s')} s |",
        f"| operator incarnations / unexpected exits | {op.get('incarnations')} / {op.get('unexpected_exits')} |",
        f"| operator reconciles (work-queue workers, all incarnations) / of which retries after a failure | "
        f"{op.get('reconciles')} / {op.get('reconcile_retries')} |",
        f"| operator requests to the apiserver (audit log) | {reqs.get('total')} ({reqs.get('per_resource')} per resource) |",
        f"| all clients' requests (apiserver_request_total) | {results.get('apiserver_requests_all_clients')} "
        f"({results.get('apiserver_requests_all_clients_per_resource')} per resource) |",
        f"| operator log: ERROR lines / handler or reconcile failures / of which in fault windows / of which "
        f"reconciles retried | {log.get('error_lines')} / {log.get('handler_failures')} / "
        f"{log.get('handler_failures_in_fault_windows')} / {log.get('of_which_reconciles_retried')} |",
        f"| control-plane CPU seconds | {results.get('component_cpu_s')} |",
        f"| pods kwok lost in an outage and the harness touched (kubelet-sync stand-in) | "
        f"{results.get('kwok_pods_nudged')} |",
        "",
        "Faults: "
        + (
            "; ".join(
                f"{f['fault']} at {f['at_s']} s (back in {f['recovered_s']} s, progress {f['progress']})"
                for f in results.get("faults") or []
            )
            or "none"
        ),
        "",
        f"Operator requests by verb and resource: {reqs.get('by_verb_resource')}",
        "",
        f"Operator requests by response code: {reqs.get('by_code')}",
        "",
    ]
    if results.get("faults_not_injected"):
        lines += [f"Faults not reached before the end: {results['faults_not_injected']}", ""]
    if final.get("problems"):
        lines += ["Problems (first 20):", "", *(f"- {p}" for p in final["problems"]), ""]
    if log.get("errors_outside_faults_top"):
        lines += [
            "Operator ERROR lines outside fault windows (top):",
            "",
            *(f"- {n} x `{msg}`" for msg, n in log["errors_outside_faults_top"].items()),
            "",
        ]
    lines += [
        f"Machine: {m.get('cpus')} vCPU ({m.get('cpu_model')}), {m.get('memory_gb')} GB; load average at the "
        f"end {m.get('load_avg_at_end')}. Python {m.get('python')}, kopf {m.get('kopf')}, kubernetes client "
        f"{m.get('kubernetes_client')}, {m.get('kube-apiserver')}, {m.get('etcd')}, {m.get('kwok')}.",
        "",
        "Timeline (t s: Jobs, final):  "
        + ", ".join(f"{p['t']:.0f}: {p['jobs']}, {p['final']}" for p in results.get("timeline") or []),
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--resources", type=int, default=1000)
    p.add_argument("--namespaces", type=int, default=50)
    p.add_argument("--nodes", type=int, default=100)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--fail-fraction", type=float, default=0.1)
    p.add_argument("--min-seconds", type=int, default=10, help="shortest pod run time")
    p.add_argument("--max-seconds", type=int, default=60, help="longest pod run time")
    p.add_argument("--seed", type=int, default=10)
    p.add_argument("--no-faults", action="store_true", help="inject no faults")
    p.add_argument("--operator-kills", type=int, default=2)
    p.add_argument("--apiserver-restarts", type=int, default=1)
    p.add_argument("--etcd-restarts", type=int, default=1)
    p.add_argument("--fault-gap", type=float, default=15.0, help="least seconds between two faults")
    p.add_argument(
        "--fault-grace",
        type=float,
        default=30.0,
        help="seconds after a fault's recovery during which operator errors count as caused by it",
    )
    p.add_argument(
        "--restart-delay", type=float, default=2.0, help="seconds between killing and restarting the operator"
    )
    p.add_argument(
        "--operator-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a VISIONFT_* setting for the operator (repeatable)",
    )
    p.add_argument(
        "--nudge-every", type=float, default=30.0, help="seconds between checks for pods that kwok lost"
    )
    p.add_argument(
        "--operator-wrapper",
        default=None,
        help="a Python file to run instead of the console script, e.g. bench/scale/tracemalloc_operator.py",
    )
    p.add_argument("--poll", type=float, default=3.0, help="seconds between progress polls")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds the run may take after the apply")
    p.add_argument("--stop-at", default=None, metavar="HH:MM", help="also stop at this UTC wall-clock time")
    p.add_argument("--out-dir", default=None, help="where the operator log and summary go (default /tmp/...)")
    p.add_argument("--report", default=None, help="write the Markdown report here")
    p.add_argument("--json", default=None, help="write the JSON summary here (default OUT_DIR/summary.json)")
    p.add_argument("--keep", action="store_true", help="keep the control plane's folder (logs, audit log)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = Run(args)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        run.setup()
        try:
            run.run()
        except KeyboardInterrupt:
            print("[scale] interrupted: reporting what the run reached", flush=True)
        run.check()
        run.audit()
        run.finish()
        run.operator_log()
        run.results["acceptance"] = acceptance(run.results, run.n, args)
    finally:
        with contextlib.suppress(Exception):
            run.operator.stop()
        if args.keep:
            print(f"[scale] control plane folder kept: {run.plane.work_dir}", flush=True)
        run.plane.stop(keep_files=args.keep)
    summary = Path(args.json or run.out / "summary.json")
    summary.write_text(json.dumps(run.results, indent=1, default=str))
    text = markdown(run.results)
    if args.report:
        Path(args.report).write_text(text)
    print(text)
    print(f"[scale] summary: {summary}; operator log: {run.operator.log_path}", flush=True)
    return 0 if run.results["acceptance"]["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
