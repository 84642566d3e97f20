"""``etrain launch``: torchrun's command line, run by our agent on etcd v3.

``etrain launch [torchrun flags] script.py [args]`` runs this node's agent in the foreground
(as torchrun does). Without ``--etcd`` the agent starts a private etcd on loopback; a second
``etrain launch`` of the same ``--job-id`` on the same machine joins it.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time

logger = logging.getLogger(__name__)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "launch",
        help="run a training script on this node (a drop-in for torchrun)",
        description="Run a training script under this node's agent (torchrun's flags).",
    )
    p.add_argument("--nnodes", default="1", help="N or MIN:MAX nodes (default 1)")
    p.add_argument(
        "--nproc-per-node",
        "--nproc_per_node",
        dest="nproc_per_node",
        default="1",
        help="workers on this node: a number, or auto/cpu/gpu (default 1)",
    )
    p.add_argument(
        "--max-restarts",
        "--max_restarts",
        dest="max_restarts",
        type=int,
        default=0,
        help="job-wide restarts after worker failures (default 0)",
    )
    p.add_argument(
        "--job-id",
        "--rdzv-id",
        "--rdzv_id",
        "--run-id",
        "--run_id",
        dest="job_id",
        default=None,
        help="the job's id (default: 'default')",
    )
    p.add_argument(
        "--etcd",
        "--rdzv-endpoint",
        "--rdzv_endpoint",
        dest="etcd",
        default=None,
        help="etcd client address(es) host:port[,host:port]; default: a private local etcd",
    )
    p.add_argument(
        "--rdzv-backend",
        "--rdzv_backend",
        dest="rdzv_backend",
        default="etcd-v3",
        help="only etcd-v3 (accepted for torchrun compatibility)",
    )
    p.add_argument(
        "--rdzv-conf",
        "--rdzv_conf",
        dest="rdzv_conf",
        default="",
        help="k=v,... : join_timeout, last_call_timeout (torchrun's heartbeat keys are "
        "accepted and have no use: a node's join key lives under its lease)",
    )
    p.add_argument("--standalone", action="store_true", help="single node on a private etcd")
    p.add_argument(
        "--snapshot-ec",
        dest="snapshot_ec",
        default=None,
        metavar="K+M",
        help="erasure code of in-memory snapshots across nodes (default: chosen by node count)",
    )
    p.add_argument(
        "--credentials",
        default=None,
        metavar="DIR",
        help="the job's CA, agent certificate and token (`etrain credentials create DIR`; "
        "default: made for the job in its private runtime directory on this machine)",
    )
    for flag, what in (("--etcd-cacert", "CA certificate of a TLS etcd"),
                       ("--etcd-cert", "client certificate for etcd (with --etcd-key)"),
                       ("--etcd-key", "client key for etcd"),
                       ("--etcd-user", "etcd user (with --etcd-password-file)"),
                       ("--etcd-password-file", "file holding the etcd user's password")):
        p.add_argument(flag, default=None, help=what + " (passed to every process of the job)")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="serve gRPC without TLS or token (anyone who reaches the port controls the job)",
    )
    p.add_argument(
        "--snapshot-dir",
        dest="snapshot_dir",
        default=None,
        help="disk tier of snapshots: written on demand, at exit, and every N commits",
    )
    p.add_argument(
        "--snapshot-disk-every",
        dest="snapshot_disk_every",
        type=int,
        default=0,
        metavar="N",
        help="write every N committed snapshots to --snapshot-dir",
    )
    p.add_argument(
        "--snapshot-memory-limit",
        dest="snapshot_memory_limit",
        type=float,
        default=0,
        metavar="GB",
        help="snapshot records this node's agent may hold in memory (default: unbounded)",
    )
    p.add_argument(
        "--node-id", dest="node_id", default=None, help="this node's id (default hostname)"
    )
    p.add_argument(
        "--node-ttl",
        dest="node_ttl",
        type=int,
        default=None,
        help="seconds after which a silent node is declared lost (default 5)",
    )
    p.add_argument(
        "--monitor-interval",
        "--monitor_interval",
        dest="monitor_interval",
        type=float,
        default=None,
        help="seconds between checks of the workers (default 0.1)",
    )
    p.add_argument(
        "--hang-timeout",
        dest="hang_timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="a worker that reports progress and makes none for this long is killed as hung "
        "(default 300; 0: never)",
    )
    p.add_argument(
        "--metrics-port",
        dest="metrics_port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics at http://LOCAL_ADDR:PORT/metrics (0: any free port, "
        "logged; default: none)",
    )
    p.add_argument(
        "--drain-timeout",
        dest="drain_timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="on SIGTERM (or `etrain drain`) this node leaves the job at a step boundary and the "
        "job goes on; past this many seconds its workers are killed (default 30)",
    )
    p.add_argument(
        "--hot-spares",
        dest="hot_spares",
        type=int,
        default=0,
        metavar="N",
        help="idle workers kept ready on this node to take a lost rank in place (Job API "
        "scripts; default 0)",
    )
    p.add_argument(
        "--device-mirror",
        dest="device_mirror",
        action="store_true",
        help="each hot spare on a worker's GPU keeps a copy of that worker's state in device "
        "memory, updated every step, so a crashed worker redoes at most the step in flight "
        "(costs the spare twice the state in GPU memory; CUDA only)",
    )
    p.add_argument(
        "--fault",
        dest="faults",
        action="append",
        default=[],
        metavar="KIND:rank=R:step=S[:at=reform]",
        help="inject a fault when rank R (a Job API worker) reaches step S: kill, stop or "
        "kill-agent (repeatable; for chaos tests); at=reform: when it next re-forms after "
        "step S instead (a fault during a recovery). With --hot-spares, it waits for the "
        "node's spares to be ready",
    )
    p.add_argument(
        "--local-addr",
        "--local_addr",
        dest="local_addr",
        default="127.0.0.1",
        help="address other nodes reach this one at (default 127.0.0.1)",
    )
    p.add_argument(
        "--agent-port",
        dest="agent_port",
        type=int,
        default=0,
        help="the agent's gRPC port (default: any free port)",
    )
    p.add_argument(
        "--log-dir",
        "--log_dir",
        dest="log_dir",
        default=None,
        help="directory for per-rank logs and error files",
    )
    p.add_argument(
        "-r", "--redirects", default="0", help="redirect std streams to files (torchrun)"
    )
    p.add_argument("-t", "--tee", default="0", help="tee std streams to files (torchrun)")
    p.add_argument(
        "-m", "--module", action="store_true", help="run the script as a Python module (python -m)"
    )
    p.add_argument(
        "--no-python",
        "--no_python",
        dest="no_python",
        action="store_true",
        help="run the script as an executable, not through Python",
    )
    p.add_argument("training_script", help="the script (or module, or program) to run")
    p.add_argument("training_script_args", nargs=argparse.REMAINDER)
    p.set_defaults(run=run)


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _nproc(value: str) -> int:
    """Workers for --nproc-per-node (a number, or torchrun's auto/cpu/gpu)."""
    from elastictrain.errors import ConfigError

    if value.isdigit() and int(value) >= 1:
        return int(value)
    if value == "cpu":
        return os.cpu_count() or 1
    if value in ("auto", "gpu"):
        gpus = _visible_gpus()
        if value == "gpu" and gpus == 0:
            raise ConfigError("--nproc-per-node gpu: no CUDA device is visible")
        return gpus or os.cpu_count() or 1
    raise ConfigError(f"--nproc-per-node {value!r}: expected a positive integer or auto/cpu/gpu")


# torchrun's --rdzv-conf keys that the join has no use for (heartbeats, its store's host)
TORCHRUN_ONLY_RDZV_KEYS = ("close_timeout", "keep_alive_interval", "keep_alive_max_attempt",
                           "read_timeout", "is_host", "use_libuv", "timeout")


def _rdzv_conf(text: str):
    from elastictrain.agent.config import RendezvousConfig

    from elastictrain.errors import ConfigError

    values: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, raw = item.partition("=")
        if sep and key in TORCHRUN_ONLY_RDZV_KEYS:
            continue
        if not sep or key not in RendezvousConfig.__dataclass_fields__:
            known = ", ".join(RendezvousConfig.__dataclass_fields__)
            raise ConfigError(f"--rdzv-conf {item!r}: expected key=value with key one of {known}")
        try:
            values[key] = int(raw)
        except ValueError as exc:
            raise ConfigError(f"--rdzv-conf {key}: {raw!r} is not an integer") from exc
    return RendezvousConfig(**values)


def _snapshot_scheme(text: str | None):
    from elastictrain.errors import ConfigError
    from elastictrain.snapshot.erasure import ErasureScheme

    if text is None:
        return None
    k, sep, m = text.partition("+")
    if not sep or not k.strip().isdigit() or not m.strip().isdigit():
        raise ConfigError(f"--snapshot-ec {text!r}: expected K+M, e.g. 4+2")
    return ErasureScheme(int(k), int(m))


def _etcd_security(args, embedded: bool) -> None:
    """TLS and login for the job's etcd, put in this process's environment so the agent and
    every worker use them; a private etcd (no --etcd) has neither."""
    from elastictrain import constants
    from elastictrain.coord.etcd import EtcdSecurity
    from elastictrain.errors import ConfigError

    given = {"cacert": args.etcd_cacert, "cert": args.etcd_cert, "key": args.etcd_key,
             "user": args.etcd_user, "password_file": args.etcd_password_file}  # fmt: skip
    if embedded:
        if any(given.values()):
            raise ConfigError("--etcd-cacert/--etcd-cert/--etcd-key/--etcd-user are for --etcd")
        for name in (constants.ENV_ETCD_CACERT, constants.ENV_ETCD_CERT, constants.ENV_ETCD_KEY,
                     constants.ENV_ETCD_USER, constants.ENV_ETCD_PASSWORD_FILE):  # fmt: skip
            os.environ.pop(name, None)
        return
    if not any(given.values()):
        return  # what the environment says, if anything
    paths = {k: os.path.abspath(v) if v and k != "user" else v for k, v in given.items()}
    security = EtcdSecurity(**{k: v or ("" if k != "user" else None) for k, v in paths.items()})
    security.channel_credentials()  # the files are read now: a bad path is one line, here
    security.password()
    os.environ.update(security.to_env())


def _credentials(args, job_id: str) -> str | None:
    """The job's credentials directory: --credentials, else one made for the job in its
    runtime directory (shared by the job's agents on this machine); None with --insecure."""
    from elastictrain.coord import local_jobs
    from elastictrain.credentials import JobCredentials, local_job_credentials
    from elastictrain.errors import ConfigError

    if args.insecure:
        if args.credentials:
            raise ConfigError("--insecure and --credentials cannot be used together")
        logger.warning("--insecure: the agents' gRPC has no TLS and no token")
        return None
    if args.credentials:
        return JobCredentials.load(os.path.abspath(args.credentials)).directory
    with local_jobs.exclusive(job_id):
        return local_job_credentials(local_jobs.job_dir(job_id)).directory


def _snapshot_dir(path: str | None) -> str | None:
    """The disk tier's root, made if missing and proven writable before anything starts."""
    import tempfile

    from elastictrain.errors import ConfigError

    if not path:
        return None
    root = os.path.abspath(path)
    if os.path.exists(root) and not os.path.isdir(root):
        raise ConfigError(f"--snapshot-dir {path!r} is not a directory")
    try:
        os.makedirs(root, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as exc:
        raise ConfigError(f"--snapshot-dir {path!r} is not writable: {exc.strerror}") from exc
    return root


def _entrypoint(args) -> tuple[str, list[str]]:
    from elastictrain.errors import ConfigError

    script = args.training_script
    if args.module and args.no_python:
        raise ConfigError("-m/--module and --no-python cannot be used together")
    if args.no_python:
        if shutil.which(script) is None:
            raise ConfigError(f"program {script!r} not found or not executable")
        return script, list(args.training_script_args)
    if args.module:
        return sys.executable, ["-u", "-m", script, *args.training_script_args]
    if not os.path.isfile(script):
        raise ConfigError(f"training script {script!r} not found")
    return sys.executable, ["-u", script, *args.training_script_args]


def _configure_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("[etrain %(asctime)s.%(msecs)03d] %(message)s", "%H:%M:%S")
    )
    for name in ("elastictrain",):
        log = logging.getLogger(name)
        log.setLevel(logging.DEBUG if os.environ.get("ETRAIN_DEBUG") else logging.INFO)
        log.addHandler(handler)
        log.propagate = False
    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)


def run(args) -> int:
    from elastictrain.agent.agent import Agent, print_failure_report
    from elastictrain.agent.config import AgentConfig, parse_fault, parse_nnodes

    from elastictrain import constants
    from elastictrain.errors import ConfigError

    if args.rdzv_backend != "etcd-v3":
        raise ConfigError(f"--rdzv-backend {args.rdzv_backend!r}: only etcd-v3 is supported")
    min_nodes, max_nodes = parse_nnodes(args.nnodes)
    if args.standalone and (max_nodes != 1 or args.etcd):
        raise ConfigError("--standalone is for one node on a private etcd (no --nnodes/--etcd)")
    nproc = _nproc(args.nproc_per_node)
    entrypoint, entry_args = _entrypoint(args)
    rdzv = _rdzv_conf(args.rdzv_conf)
    scheme = _snapshot_scheme(args.snapshot_ec)
    faults = [parse_fault(text) for text in args.faults]
    snapshot_dir = _snapshot_dir(args.snapshot_dir)
    _configure_logging()

    job_id = args.job_id or constants.DEFAULT_JOB_ID
    embedded = None
    etcd = args.etcd
    from elastictrain.coord import local_jobs

    _etcd_security(args, embedded=etcd is None)
    if etcd is None:
        with local_jobs.exclusive(job_id):
            existing = local_jobs.find(job_id)
            if existing is not None:
                etcd = existing.etcd
                logger.info("joining local job %s on its etcd at %s", job_id, etcd)
            else:
                from elastictrain.coord.embedded import EmbeddedEtcd

                embedded = EmbeddedEtcd(name=f"etrain-{job_id}").start()
                etcd = embedded.endpoint
                local_jobs.publish(job_id, etcd)
                logger.info("started a private etcd at %s for job %s", etcd, job_id)

    extra = {}
    if args.node_id:
        extra["node_id"] = args.node_id
    if args.node_ttl is not None:
        extra["node_ttl"] = args.node_ttl
    if args.monitor_interval is not None:
        extra["monitor_interval"] = args.monitor_interval
    if args.hang_timeout is not None:
        extra["hang_timeout"] = args.hang_timeout
    if args.drain_timeout is not None:
        extra["drain_timeout"] = args.drain_timeout
    if args.metrics_port is not None:
        extra["metrics_port"] = args.metrics_port
    try:
        config = AgentConfig(
            entrypoint=entrypoint,
            args=entry_args,
            etcd=etcd,
            job_id=job_id,
            min_nodes=min_nodes,
            max_nodes=max_nodes,
            nproc_per_node=nproc,
            max_restarts=args.max_restarts,
            log_dir=args.log_dir,
            redirects=args.redirects,
            tee=args.tee,
            local_addr=args.local_addr,
            grpc_host=args.local_addr,
            grpc_port=args.agent_port,
            gpus=_visible_gpus(),
            rendezvous=rdzv,
            snapshot_scheme=scheme,
            snapshot_dir=snapshot_dir,
            credentials_dir=_credentials(args, job_id),
            snapshot_disk_every=args.snapshot_disk_every,
            snapshot_memory_limit=int(args.snapshot_memory_limit * 1e9),
            faults=faults,
            hot_spares=args.hot_spares,
            device_mirror=args.device_mirror,
            **extra,
        )
        agent = Agent(config, embedded_etcd=embedded)
        code = agent.run()
        if code != 0:
            print_failure_report(agent.failure_report)
        return code
    finally:
        if embedded is not None:
            _drain_then_stop(embedded, job_id)


def _drain_then_stop(embedded, job_id: str, timeout: float = 15.0) -> None:
    """Keep the private etcd up until the job's other local agents have deregistered."""
    from elastictrain.coord import local_jobs
    from elastictrain.coord.etcd import EtcdClient
    from elastictrain.coord.keys import JobKeys
    from elastictrain.coord.nodes import list_nodes
    from elastictrain.errors import CoordinationUnavailableError

    local_jobs.withdraw(job_id)
    client = EtcdClient.from_spec(embedded.endpoint, timeout=2.0)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and list_nodes(client, JobKeys(job_id)):
            time.sleep(0.2)
    except CoordinationUnavailableError:
        pass
    finally:
        client.close()
        embedded.stop()
