"""deploy/: what can be checked without Docker, Kubernetes or SLURM.

- the compose file against the Compose Specification's JSON schema (the copy
  vendored by check-jsonschema);
- the DaskCluster and DaskJob manifests against the CRD schemas shipped in the
  dask-kubernetes wheel, strictly (unknown fields are errors, as with
  ``kubectl apply --validate=strict``);
- the SLURM set-up by rendering dask-jobqueue's worker job script from
  jobqueue.yaml through the entry point dgnh_slurm.py;
- that no file publishes the scheduler (8786) or dashboard (8787) ports;
- that every ``dgnh`` command they name exists in the CLI;
- the job files against dgnh's job-file validation;
- the scheduler and worker commands of the compose file and of the DaskJob,
  run as real processes on 127.0.0.1 with TLS files from make-certs.sh, with
  the job runner's command (``dgnh run ... --scheduler tls://...``) against them.
"""

from __future__ import annotations

import argparse
import ast
import copy
import functools
import importlib.util
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tomllib

import numpy as np
import pytest
import yaml
from cases import free_port

import dgnh

DEPLOY = pathlib.Path(__file__).parents[1] / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
MANIFESTS = {"DaskCluster": DEPLOY / "kubernetes" / "daskcluster.yaml",
             "DaskJob": DEPLOY / "kubernetes" / "daskjob.yaml"}
JOB_FILES = [DEPLOY / "jobs" / "job.toml", DEPLOY / "slurm" / "job.toml"]
DASK_PORTS = {8786, 8787}
LOOPBACK = {"127.0.0.1", "::1", "localhost"}
# the set-up's own files, not what running it writes (deploy/data, deploy/tls/*.pem)
DEPLOY_FILES = sorted(p for p in DEPLOY.rglob("*") if p.is_file() and p.suffix != ".pem"
                      and "data" not in p.relative_to(DEPLOY).parts[:1])


def load_yaml(path):
    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def walk(node):
    """Every dict and list inside a parsed YAML/JSON document."""
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
    for child in children:
        yield from walk(child)


def containers(doc):
    """Every container spec (``name``, ``image``, ``args``...) in a manifest."""
    for node in walk(doc):
        if isinstance(node, dict) and "containers" in node:
            yield from node["containers"]


def import_jobqueue():
    """Import dask_jobqueue (skip without it), keeping SIGINT's handler: its import
    installs one that calls ``sys.exit``."""
    before = signal.getsignal(signal.SIGINT)
    try:
        return pytest.importorskip("dask_jobqueue")
    finally:
        signal.signal(signal.SIGINT, before)


def load_deploy_module(name):
    spec = importlib.util.spec_from_file_location(name, DEPLOY / "slurm" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """TLS files written by deploy/tls/make-certs.sh."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    out = tmp_path_factory.mktemp("tls")
    subprocess.run(["bash", str(DEPLOY / "tls" / "make-certs.sh"), str(out), "2"], check=True,
                   capture_output=True)
    return out


# ------------------------------------------------------------------- schemas
def compose_validator():
    pytest.importorskip("check_jsonschema")
    import importlib.resources

    import jsonschema

    schema = json.loads((importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
                         / "compose-spec.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def schema_errors(validator, path, mutate) -> list[str]:
    """The validator's errors on the YAML file at ``path``, changed first by ``mutate``."""
    doc = load_yaml(path)
    if mutate is not None:
        mutate(doc)
    return [f"{e.json_path}: {e.message}" for e in validator.iter_errors(doc)]


def _misspell_command(doc):
    doc["services"]["worker"]["comand"] = doc["services"]["worker"].pop("command")


def _port_as_list(doc):
    doc["services"]["scheduler"]["ports"][0]["target"] = [8787]


@pytest.mark.parametrize("mutate, valid", [
    (None, True), (_misspell_command, False), (_port_as_list, False),
], ids=["as-written", "misspelled-key", "wrong-type"])
def test_compose_file_follows_compose_spec(mutate, valid):
    errors = schema_errors(compose_validator(), COMPOSE, mutate)
    assert (errors == []) == valid, errors


def crd_validator(kind):
    """A jsonschema validator of the operator's CRD for ``kind``, made strict."""
    pytest.importorskip("dask_kubernetes")
    import jsonschema

    return jsonschema.Draft4Validator(crd_schema(kind))


@functools.cache
def crd_schema(kind):
    import importlib.resources

    crds = (importlib.resources.files("dask_kubernetes")
            / "operator/deployment/helm/dask-kubernetes-operator/crds")
    crd = next(d for f in crds.iterdir() if f.name.endswith(".yaml")
               for d in [load_yaml(f)] if d["spec"]["names"]["kind"] == kind)
    version = next(v for v in crd["spec"]["versions"] if v["served"] and v["storage"])
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
    for node in walk(schema):  # structural schemas: fields not declared are unknown fields
        if isinstance(node, dict) and node.get("type") == "object" and "properties" in node:
            node.setdefault("additionalProperties", False)
    schema["properties"].update(apiVersion={"enum": [f"{crd['spec']['group']}/{version['name']}"]},
                                kind={"enum": [kind]}, metadata={"type": "object"})
    schema["required"] = sorted({"apiVersion", "kind", "metadata", *schema.get("required", [])})
    return schema


def _misspell_container_key(doc):
    doc_containers = list(containers(doc))
    doc_containers[0]["imagePullPolicyy"] = doc_containers[0].pop("imagePullPolicy")


def _replicas_as_text(doc):
    next(n for n in walk(doc) if isinstance(n, dict) and "replicas" in n)["replicas"] = "two"


def _wrong_api_version(doc):
    doc["apiVersion"] = "kubernetes.dask.org/v2"


@pytest.mark.parametrize("mutate, valid", [
    (None, True), (_misspell_container_key, False), (_replicas_as_text, False),
    (_wrong_api_version, False),
], ids=["as-written", "misspelled-key", "wrong-type", "wrong-api-version"])
@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_manifest_follows_crd_schema(kind, mutate, valid):
    errors = schema_errors(crd_validator(kind), MANIFESTS[kind], mutate)
    assert (errors == []) == valid, errors


# --------------------------------------------------------------- open ports
def published_ports(service):
    """``(host_ip, published, target)`` for each published port of a compose service."""
    out = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            out.append((port.get("host_ip", "0.0.0.0"), port.get("published"), port["target"]))
            continue
        parts = str(port).split("/")[0].rsplit(":", 2)  # [host_ip:][published:]target
        parts = [None] * (3 - len(parts)) + parts
        out.append((parts[0] or "0.0.0.0", parts[1], parts[2]))
    return [(ip, None if pub is None else int(str(pub).split("-")[0]), int(str(tgt).split("-")[0]))
            for ip, pub, tgt in out]


def test_compose_publishes_dask_ports_on_loopback_only():
    services = load_yaml(COMPOSE)["services"]
    published = {name: published_ports(s) for name, s in services.items()}
    assert published["scheduler"], "the dashboard should be published on 127.0.0.1"
    for name, ports in published.items():
        for host_ip, host_port, target in ports:
            if target in DASK_PORTS or host_port in DASK_PORTS:
                assert target != 8786, f"{name}: the scheduler port 8786 must not be published"
                assert host_ip in LOOPBACK, f"{name}: port {target} published on {host_ip}"
        assert "network_mode" not in services[name], f"{name}: host networking exposes ports"


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_kubernetes_keeps_dask_ports_inside(kind):
    doc = load_yaml(MANIFESTS[kind])
    services = [n["service"] for n in walk(doc) if isinstance(n, dict) and "service" in n]
    assert services, "the scheduler Service should be declared"
    for service in services:
        assert service.get("type", "ClusterIP") == "ClusterIP"
        assert not service.get("externalIPs")
    for node in walk(doc):
        if isinstance(node, dict):
            assert not node.get("hostNetwork"), "hostNetwork exposes every port"
            assert "hostPort" not in node, f"hostPort exposes {node}"


def test_slurm_dashboard_on_loopback():
    options = load_yaml(DEPLOY / "slurm" / "jobqueue.yaml")["jobqueue"]["slurm"]["scheduler-options"]
    host = options["dashboard_address"].rsplit(":", 1)[0]
    assert host in LOOPBACK


def test_no_deploy_file_binds_dask_ports_publicly():
    pattern = re.compile(r"0\.0\.0\.0:(8786|8787)\b|\[::\]:(8786|8787)\b")
    for path in DEPLOY_FILES:
        assert not pattern.search(path.read_text()), f"{path} binds a Dask port publicly"


# ------------------------------------------------------------- CLI commands
MENTION = re.compile(r"(?:^|[\s\"'`(\[])dgnh[ \t]+([a-z][a-z0-9-]*)", re.M)
CODE_SPAN = re.compile(r"```.*?```|`[^`\n]+`", re.S)


def argv_commands(path):
    """Complete ``dgnh ...`` argument vectors: compose commands, container args, Python lists."""
    if path.suffix == ".yaml":
        lists = [n for n in walk(load_yaml(path)) if isinstance(n, list)]
    elif path.suffix == ".py":
        lists = [[e.value if isinstance(e, ast.Constant) else "ARG" for e in node.elts]
                 for node in ast.walk(ast.parse(path.read_text()))
                 if isinstance(node, (ast.List, ast.Tuple))]
    else:
        return []
    return [[str(t) for t in lst] for lst in lists if lst and lst[0] == "dgnh"]


def mentioned_commands(path):
    """``dgnh CMD`` in code: backtick spans and code blocks anywhere, and the code (not the
    comments) of shell scripts and Dockerfiles."""
    text = path.read_text()
    code = CODE_SPAN.findall(text)
    if path.suffix in (".sh", ".sbatch") or path.name == "Dockerfile":
        lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
        code.append(re.sub(r'"\s*,\s*"', " ", "\n".join(lines)))  # exec-form ["dgnh", "run"]
    return {m for span in code for m in MENTION.findall(span)}


def cli_parser():
    try:
        from dgnh.cli import build_parser
    except ImportError as e:
        pytest.skip(f"dgnh.cli cannot be imported yet: {e}")
    return build_parser()


def subcommands(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return set(action.choices)


COMMAND_FILES = [p for p in DEPLOY_FILES if argv_commands(p) or mentioned_commands(p)]


def test_deploy_files_name_dgnh_commands():
    names = {p.name for p in COMMAND_FILES}
    assert {"compose.yaml", "daskjob.yaml", "dgnh_slurm.py", "README.md", "job.toml"} <= names


@pytest.mark.parametrize("path", COMMAND_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_dgnh_commands_exist_in_cli(path):
    argvs, mentioned = argv_commands(path), mentioned_commands(path)
    parser = cli_parser()
    known = subcommands(parser)
    for argv in argvs:
        assert argv[1] in known, f"{path.name}: `dgnh {argv[1]}` is not a dgnh subcommand"
        try:
            parser.parse_args(argv[1:])  # the whole command line, options included
        except SystemExit:
            pytest.fail(f"{path.name}: dgnh rejects the arguments {argv[1:]}")
    missing = sorted(mentioned - known)
    assert not missing, f"{path.name} names dgnh subcommands that do not exist: {missing}"


# ------------------------------------------------------------------- SLURM
@pytest.mark.filterwarnings("ignore:Port 8787 is already in use")
def test_jobqueue_renders_worker_job_script(certs, capsys):
    import_jobqueue()
    dgnh_slurm = load_deploy_module("dgnh_slurm")
    config = load_yaml(DEPLOY / "slurm" / "jobqueue.yaml")["jobqueue"]["slurm"]
    assert dgnh_slurm.main(["job.toml", "--tls-dir", str(certs), "--dry-run"]) == 0
    *script, command = capsys.readouterr().out.strip().splitlines()
    script = "\n".join(script)
    for line in [f"#SBATCH -J {config['name']}", f"#SBATCH --cpus-per-task={config['cores']}",
                 f"#SBATCH --mem={config['memory'].removesuffix('iB')}",
                 f"#SBATCH -t {config['walltime']}", *config["job-script-prologue"]]:
        assert line in script.splitlines(), f"{line!r} missing from\n{script}"
    worker = next(line for line in script.splitlines() if "dask_worker" in line)
    for piece in [" tls://", f"--nthreads {config['cores'] // config['processes']}",
                  f"--death-timeout {config['death-timeout']}",
                  f"--local-directory {config['local-directory']}",
                  f"--tls-ca-file {certs / 'ca.pem'}", f"--tls-cert {certs / 'dask.pem'}",
                  f"--tls-key {certs / 'dask-key.pem'}"]:
        assert piece in worker, f"{piece!r} missing from {worker}"
    scheduler = worker.split()[worker.split().index("distributed.cli.dask_worker") + 1]
    assert command.split() == ["dgnh", "run", "job.toml", "--scheduler", scheduler]


@pytest.mark.filterwarnings("ignore:Port 8787 is already in use")
def test_slurm_scheduler_accepts_only_its_own_certificates(certs, tmp_path):
    import_jobqueue()
    from distributed import Client

    dgnh_slurm = load_deploy_module("dgnh_slurm")
    subprocess.run(["bash", str(DEPLOY / "tls" / "make-certs.sh"), str(tmp_path), "2"],
                   check=True, capture_output=True)  # another CA: a stranger's credentials
    with dgnh_slurm.make_cluster(str(DEPLOY / "slurm" / "jobqueue.yaml"), str(certs)) as cluster:
        assert cluster.scheduler_address.startswith("tls://")
        security = dgnh_slurm.tls_security(str(certs))
        with Client(cluster.scheduler_address, security=security, timeout=20) as client:
            assert client.scheduler_info()["address"] == cluster.scheduler_address
        with pytest.raises(OSError):  # TimeoutError included
            Client(cluster.scheduler_address, security=dgnh_slurm.tls_security(str(tmp_path)),
                   timeout=3)


def test_slurm_missing_tls_files_named(tmp_path):
    import_jobqueue()
    dgnh_slurm = load_deploy_module("dgnh_slurm")
    with pytest.raises(FileNotFoundError, match="ca.pem is missing: run deploy/tls/make-certs.sh"):
        dgnh_slurm.tls_security(str(tmp_path))


# --------------------------------------------------------------- job files
@pytest.fixture(scope="module")
def example_data(tmp_path_factory):
    """The example model and dataset, written by deploy/jobs/make_example.py."""
    out = tmp_path_factory.mktemp("data")
    spec = importlib.util.spec_from_file_location("make_example", DEPLOY / "jobs" / "make_example.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([str(out)]) == 0
    return out


def test_make_example_writes_model_and_dataset(example_data):
    net = dgnh.MLP.load(example_data / "model.npz")
    data = dgnh.open_dataset(example_data / "digits.zarr")
    assert net.n_inputs == data.n_inputs
    X, y = data.read(0, data.n_samples)
    assert np.mean(np.argmax(net.forward(X), axis=1) == y) > 0.9


def localize_job(path, directory, certs, name="job.toml"):
    """The job file as shipped, its container paths (/data, /tls) and ~/.dgnh/tls pointing
    at ``directory`` and ``certs``; written into ``directory``, where its relative paths
    start."""
    text = path.read_text()
    for old, new in [('"/data/', f'"{directory}/'), ('"/tls/', f'"{certs}/'),
                     ('"~/.dgnh/tls/', f'"{certs}/')]:
        text = text.replace(old, new)
    out = directory / name
    out.write_text(text)
    return out


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_job_files_are_valid(path, example_data, certs):
    try:
        from dgnh.job import load_job
    except ImportError as e:
        pytest.skip(f"dgnh.job cannot be imported yet: {e}")
    job = load_job(localize_job(path, example_data, certs, f"{path.parent.name}-job.toml"))
    assert job.model == str(example_data / "model.npz")
    assert job.data == str(example_data / "digits.zarr")
    assert job.tls == {"tls_ca_file": str(certs / "ca.pem"),
                       "tls_client_cert": str(certs / "dask.pem"),
                       "tls_client_key": str(certs / "dask-key.pem")}
    assert dgnh.MLP.load(job.model).n_params > 0


# ------------------------------------------- the commands as real processes
def deployed_commands(kind):
    """(scheduler argv, worker argv, job argv, environment) as the set-up runs them."""
    if kind == "compose":
        services = load_yaml(COMPOSE)["services"]
        return (services["scheduler"]["command"], services["worker"]["command"],
                services["job"]["command"], {})
    by_name = {c["name"]: c for c in containers(load_yaml(MANIFESTS["DaskJob"]))}
    env = {e["name"]: e["value"] for c in by_name.values() for e in c.get("env", [])}
    return by_name["scheduler"]["args"], by_name["worker"]["args"], by_name["job"]["args"], env


def localize(argv, env, address, port, certs, tmp_path):
    """Run a container command here: TLS files from ``certs``, the scheduler on
    127.0.0.1:``port``, the dashboard on a free loopback port, scratch in ``tmp_path``."""
    env = dict(env, DASK_WORKER_NAME="worker-0")
    out, after = [], None
    for token in argv:
        token = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], str(token))
        if token.startswith("/tls/"):
            token = str(certs / token.removeprefix("/tls/"))
        elif token.startswith("tls://"):
            token = address
        elif after == "--port":
            token = str(port)
        elif after == "--dashboard-address":
            token = f"127.0.0.1:{free_port()}"
        elif after == "--local-directory":
            token = str(tmp_path / "dask-scratch")
        out.append(token)
        after = token
    runner = {"dask": [sys.executable, "-m", "dask"], "dgnh": [sys.executable, "-m", "dgnh.cli"]}
    return runner[out[0]] + out[1:] + (["--host", "127.0.0.1"] if out[1] == "scheduler" else [])


@pytest.fixture(scope="module", params=["compose", "kubernetes"])
def deployed_cluster(request, certs, tmp_path_factory):
    """A scheduler and a worker started from the set-up's own commands."""
    tmp_path = tmp_path_factory.mktemp(request.param)
    scheduler, worker, job, env = deployed_commands(request.param)
    port = free_port()
    address = f"tls://127.0.0.1:{port}"
    procs = []
    try:
        for argv in (scheduler, worker):
            log = open(tmp_path / f"{argv[1]}.log", "wb")
            procs.append(subprocess.Popen(localize(argv, env, address, port, certs, tmp_path),
                                          stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
            log.close()
        yield {"address": address, "job": localize(job, env, address, port, certs, tmp_path),
               "tmp_path": tmp_path}
    finally:  # each process leads its own session: end it with the processes it started
        for proc in reversed(procs):
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_deployed_cluster_takes_the_job_file_tls_keys(deployed_cluster, certs):
    from distributed import Client

    from dgnh.cluster import make_security

    tls = tomllib.loads((DEPLOY / "jobs" / "job.toml").read_text())["cluster"]
    security = make_security({k: str(certs / os.path.basename(v)) for k, v in tls.items()
                              if k.startswith("tls_")})
    with Client(deployed_cluster["address"], security=security, timeout=30) as client:
        client.wait_for_workers(1, timeout=60)
        assert client.submit(sum, [1, 2, 3]).result(timeout=30) == 6


def test_deployed_job_command_runs(deployed_cluster, certs):
    parser = cli_parser()
    if "run" not in subcommands(parser):
        pytest.skip("the CLI has no `run` subcommand yet")
    tmp_path = deployed_cluster["tmp_path"]
    # a small network and data set keep the run short; the rest of the job file is as shipped
    rng = np.random.default_rng(0)
    net = dgnh.MLP([rng.normal(size=(6, 4)), rng.normal(size=(3, 6))], [np.zeros(6), None],
                   ["tanh", "identity"])
    net.save(tmp_path / "model.npz")
    dgnh.save_dataset(tmp_path / "digits.zarr", rng.normal(size=(300, 4)),
                      rng.integers(0, 3, 300), chunk_rows=100)
    job_file = localize_job(DEPLOY / "jobs" / "job.toml", tmp_path, certs)
    output = tomllib.loads(job_file.read_text())["output"]
    argv = [str(job_file) if a == "/jobs/job.toml" else a for a in deployed_cluster["job"]]
    assert argv[-2:] == ["--scheduler", deployed_cluster["address"]]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert os.path.isdir(output) and "certify" in done.stdout, done.stdout


# --------------------------------- hand-started scheduler and workers bind privately
WILDCARD_HOSTS = {"", "0.0.0.0", "::", "[::]", "*"}
PRIVATE_PLACEHOLDERS = ("SCHEDULER_IP", "WORKER_IP")
DOCS_WITH_DASK_COMMANDS = [DEPLOY / "README.md", DEPLOY.parent / "README.md"]


def documented_dask_commands(path):
    """Every ``dask scheduler`` / ``dask worker`` command in a Markdown file's code (fenced
    blocks with their line continuations, and inline code spans), as argument lists."""
    import shlex

    text = path.read_text()
    lines = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        lines += block.replace("\\\n", " ").splitlines()
    lines += re.findall(r"(?<!`)`([^`\n]+)`(?!`)", re.sub(r"```.*?```", "", text, flags=re.S))
    commands = [shlex.split(line, comments=True) for line in lines
                if re.match(r"\s*dask (scheduler|worker)\b", line)]
    return [argv for argv in commands if argv[:1] == ["dask"] and len(argv) > 2  # not a name
            and argv[1] in ("scheduler", "worker")]


def _bind_host(address: str | None) -> str | None:
    """The host part of ``tls://h:p``, ``h:p``, ``:p``, ``[::]:p`` (``None`` stays ``None``)."""
    if address is None:
        return None
    address = address.split("://")[-1]
    return address.rsplit(":", 1)[0] if ":" in address else address


def wildcard_binds(argv) -> list[str]:
    """The servers of a ``dask scheduler``/``dask worker`` command that listen on every
    interface, from its options as distributed's own command line parses them."""
    from distributed.cli import dask_scheduler, dask_worker

    main = {"scheduler": dask_scheduler.main, "worker": dask_worker.main}[argv[1]]
    args = [str(COMPOSE) if a.endswith(".pem") else a for a in argv[2:]]  # files must exist
    params = main.make_context(f"dask {argv[1]}", args).params
    listen = params.get("listen_address")
    served = params["host"] if listen is None else _bind_host(listen)
    found = []
    if params["interface"] is None and (served is None or served in WILDCARD_HOSTS):
        found.append(f"the {argv[1]} ({served!r})")
    if params["dashboard"] and _bind_host(params["dashboard_address"]) in WILDCARD_HOSTS:
        found.append(f"its dashboard ({params['dashboard_address']!r})")
    return found


@pytest.mark.parametrize("argv, wildcard", [
    ("dask scheduler --protocol tls", ["the scheduler ('')", "its dashboard (':8787')"]),
    ("dask scheduler --host 10.0.0.5 --dashboard-address 127.0.0.1:8787", []),
    ("dask scheduler --host 10.0.0.5 --no-dashboard", []),
    ("dask scheduler --host 0.0.0.0 --dashboard-address [::]:8787",
     ["the scheduler ('0.0.0.0')", "its dashboard ('[::]:8787')"]),
    ("dask worker tls://10.0.0.5:8786", ["the worker (None)", "its dashboard (':0')"]),
    ("dask worker tls://10.0.0.5:8786 --host 10.0.0.6 --dashboard-address 127.0.0.1:0", []),
    ("dask worker tls://10.0.0.5:8786 --listen-address tls://10.0.0.6:0 --no-dashboard", []),
    ("dask worker tls://10.0.0.5:8786 --listen-address tls://:9000 --no-dashboard",
     ["the worker ('')"]),
])
def test_wildcard_check_reads_the_options(argv, wildcard):
    assert wildcard_binds(argv.split()) == wildcard


@pytest.mark.parametrize("doc", DOCS_WITH_DASK_COMMANDS, ids=lambda p: str(p.relative_to(
    DEPLOY.parent)))
def test_documented_dask_commands_bind_no_wildcard_address(doc):
    commands = documented_dask_commands(doc)
    assert {argv[1] for argv in commands} == {"scheduler", "worker"}, doc
    for argv in commands:
        assert not wildcard_binds(argv), f"{doc}: `{' '.join(argv)}` listens on every " \
                                         f"interface: {wildcard_binds(argv)}"


def test_hand_started_cluster_listens_on_the_private_address_only(certs, tmp_path):
    """deploy/README.md's commands, run with 127.0.0.1 as the private address: every socket the
    scheduler, the worker and its nanny listen on is bound to it."""
    import psutil
    from distributed import Client

    from dgnh.cluster import make_security

    port, dashboard = free_port(), free_port()
    procs = []

    def local(argv):
        out = []
        for token in argv:
            for name in PRIVATE_PLACEHOLDERS:
                token = token.replace(name, "127.0.0.1")
            token = re.sub(r"(^|:)8786$", rf"\g<1>{port}", token)
            token = token.replace(":8787", f":{dashboard}")
            out.append(str(certs / token) if token.endswith(".pem") else token)
        return [sys.executable, "-m", "dask"] + out[1:]

    commands = sorted(documented_dask_commands(DEPLOY / "README.md"),
                      key=lambda argv: argv[1] != "scheduler")
    assert [argv[1] for argv in commands] == ["scheduler", "worker"]
    try:
        for argv in commands:
            log = open(tmp_path / f"{argv[1]}.log", "wb")
            procs.append(subprocess.Popen(local(argv), stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True, cwd=tmp_path))
            log.close()
        security = make_security({"tls_ca_file": str(certs / "ca.pem"),
                                  "tls_client_cert": str(certs / "dask.pem"),
                                  "tls_client_key": str(certs / "dask-key.pem")})
        with Client(f"tls://127.0.0.1:{port}", security=security, timeout=60) as client:
            client.wait_for_workers(1, timeout=60)
        listening = []
        for proc in procs:
            parent = psutil.Process(proc.pid)
            for p in [parent] + parent.children(recursive=True):
                listening += [c.laddr for c in p.net_connections(kind="inet")
                              if c.status == psutil.CONN_LISTEN]
        assert len(listening) >= 4  # scheduler + its dashboard, worker + nanny (+ dashboard)
        assert {addr.ip for addr in listening} == {"127.0.0.1"}, listening
        assert {port, dashboard} <= {addr.port for addr in listening}
    finally:  # each process leads its own session: end it with the processes it started
        for proc in reversed(procs):
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
