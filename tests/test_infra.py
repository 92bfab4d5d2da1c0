"""infra/: manifests parse and carry the fields the CRDs require, entrypoints are real fcodec
commands, image tags agree, no credentials in files; the RayJob entrypoint runs end to end
against a head started with `ray start --head`."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

INFRA = Path(__file__).resolve().parents[1] / "infra"
MANIFESTS = sorted((INFRA / "k8s").glob("*.yaml")) + [INFRA / "ray-cluster-launcher.yaml"]


def _docs():
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path, doc


def _entrypoints():
    eps = []
    for path, doc in _docs():
        kind = doc.get("kind")
        if kind == "RayJob":
            eps.append((path, doc["spec"]["entrypoint"]))
        elif kind == "RayCronJob":
            eps.append((path, doc["spec"]["jobTemplate"]["entrypoint"]))
        elif kind == "ConfigMap":
            for text in doc["data"].values():
                inner = yaml.safe_load(text)
                if inner.get("kind") == "RayJob":
                    eps.append((path, inner["spec"]["entrypoint"]))
    return eps


def _check_pod_template(tpl: dict, where: str) -> list[dict]:
    containers = tpl["spec"]["containers"]
    assert containers and all(c.get("name") and c.get("image") for c in containers), where
    return containers


def _check_ray_cluster_spec(spec: dict, where: str) -> None:
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict), where
    _check_pod_template(head["template"], where)
    groups = spec["workerGroupSpecs"]
    assert groups, where
    for g in groups:
        assert g["groupName"] and isinstance(g["rayStartParams"], dict), where
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], where
        for c in _check_pod_template(g["template"], where):
            lim = c["resources"]["limits"]
            assert str(lim["nvidia.com/gpu"]) == "1", f"{where}: one GPU per worker pod"
            assert str(g["rayStartParams"]["num-gpus"]) == "1"


CRON = re.compile(r"^(\S+\s+){4}\S+$")


def test_every_manifest_has_the_required_fields():
    kinds = {}
    for path, doc in _docs():
        kind = doc.get("kind") or ("launcher" if "cluster_name" in doc else None)
        kinds.setdefault(kind, []).append(path.name)
        where = f"{path.name}:{kind}"
        if kind in ("RayCluster", "RayJob", "RayCronJob"):
            assert doc["apiVersion"] == "ray.io/v1", where
            assert doc["metadata"].get("name") or doc["metadata"].get("generateName"), where
        if kind == "RayCluster":
            _check_ray_cluster_spec(doc["spec"], where)
        elif kind == "RayJob":
            s = doc["spec"]
            assert s["entrypoint"] and s["shutdownAfterJobFinishes"] is True, where
            _check_ray_cluster_spec(s["rayClusterSpec"], where)
        elif kind == "RayCronJob":
            s = doc["spec"]
            assert CRON.match(s["schedule"]) and s["concurrencyPolicy"] in ("Allow", "Forbid", "Replace"), where
            assert s["jobTemplate"]["entrypoint"], where
            _check_ray_cluster_spec(s["jobTemplate"]["rayClusterSpec"], where)
        elif kind == "CronJob":
            assert doc["apiVersion"] == "batch/v1" and CRON.match(doc["spec"]["schedule"]), where
            pod = doc["spec"]["jobTemplate"]["spec"]["template"]
            assert pod["spec"]["restartPolicy"] in ("OnFailure", "Never"), where
            _check_pod_template(pod, where)
        elif kind == "launcher":
            assert doc["head_node_type"] in doc["available_node_types"], where
            assert any(t.get("resources", {}).get("GPU") == 1 for t in doc["available_node_types"].values()), where
    assert {"RayCluster", "RayJob", "RayCronJob", "CronJob", "launcher"} <= set(kinds)
    jobs = {yaml.safe_load(p.read_text().split("\n", 2)[2])["metadata"]["labels"]["fcodec/job"]
            for p in (INFRA / "k8s").glob("rayjob-*.yaml")}
    assert jobs == {"compress", "decompress", "audit", "train"}


def test_entrypoints_are_real_fcodec_commands_whose_arguments_parse():
    from jobs.cli import build_parser

    eps = _entrypoints()
    assert len(eps) >= 6
    parser = build_parser()
    for path, ep in eps:
        argv = shlex.split(ep)
        assert argv[0] == "fcodec", (path, ep)
        args = parser.parse_args(argv[1:])  # SystemExit on any unknown option
        assert args._run is not None


def test_image_tags_agree_with_the_package_version():
    version = tomllib.loads((INFRA.parent / "pyproject.toml").read_text())["project"]["version"]
    image = (INFRA / "IMAGE").read_text().strip()
    assert image.endswith(":" + version)
    text = "\n".join(p.read_text() for p in MANIFESTS)
    tags = set(re.findall(r"ghcr\.io/foundation-codec/fcodec:[\w.\-]+", text))
    assert tags == {f"{image}-gpu", f"{image}-cpu"}, tags
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert f"{image}-gpu" in dockerfile and f"{image}-cpu" in dockerfile
    ray_pin = re.search(r'"ray\[[^\]]*\]==([\d.]+)"', (INFRA.parent / "pyproject.toml").read_text()).group(1)
    assert f"rayproject/ray:{ray_pin}-py311" in dockerfile
    assert all(f'"{ray_pin}"' in p.read_text() or ray_pin in p.read_text() for p in (INFRA / "k8s").glob("ray*.yaml"))


def test_dockerfile_runs_as_non_root():
    users = re.findall(r"^USER\s+(\S+)", (INFRA / "Dockerfile").read_text(), re.M)
    assert users and users[-1] not in ("root", "0")


def test_no_credentials_in_files():
    # an access key id, or a secret key with a real-looking value (placeholders like … are fine)
    bad = re.compile(r"(AKIA[0-9A-Z]{16}|aws_secret_access_key\s*[:=]\s*[\"']?[\w/+]{8,})", re.I)
    for p in INFRA.rglob("*"):
        if p.is_file():
            assert not bad.search(p.read_text()), p


def test_job_configs_are_valid_option_sets():
    """Every infra/configs/<job>-*.yaml is a complete option set for its job (positionals included)."""
    from jobs.cli import apply_config, build_parser

    parser = build_parser()
    for p in sorted((INFRA / "configs").glob("*.yaml")):
        job = re.split(r"[-.]", p.name)[0]
        args = parser.parse_args([job, "--config", str(p)])
        if getattr(args, "_config_parser", None) is not None:
            args = apply_config(args)
        else:
            from jobs.compress import resolve_args

            args = resolve_args(args)
        cfg = yaml.safe_load(p.read_text())
        for k, v in cfg.items():
            assert getattr(args, k) == v, (p.name, k)


def test_generic_config_flags_win_and_positionals_are_required(tmp_path):
    from jobs.cli import apply_config, build_parser

    cfg = tmp_path / "v.yaml"
    cfg.write_text("dataset: /data/a\ndecode_sample: 3\n")
    parser = build_parser()
    args = apply_config(parser.parse_args(["verify", "--config", str(cfg), "--decode-sample", "5"]))
    assert (args.dataset, args.decode_sample) == ("/data/a", 5)
    with pytest.raises(ValueError, match="missing DATASET"):
        apply_config(parser.parse_args(["verify"]))
    cfg.write_text("nope: 1\n")
    with pytest.raises(ValueError, match="unknown options"):
        apply_config(parser.parse_args(["verify", "--config", str(cfg)]))


@pytest.mark.slow
def test_rayjob_entrypoint_end_to_end_on_a_ray_head(tmp_path, s3_server):
    """The exact RayJob entrypoint, run against `ray start --head` joined through RAY_ADDRESS
    (what KubeRay sets for a submitted job), reading its config from the S3 URL it names."""
    import s3fs

    from jobs.samples import write_samples

    ep = yaml.safe_load((INFRA / "k8s" / "rayjob-compress.yaml").read_text().split("\n", 2)[2])["spec"]["entrypoint"]
    cfg_url = re.search(r"--config (\S+)", ep).group(1)
    fs = s3fs.S3FileSystem(**s3_server["storage_options"])
    bucket = cfg_url.split("/")[2]
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    data = f"s3://{bucket}/e2e"
    for p in write_samples(tmp_path / "imgs", n=6, sizes=((32, 32), (48, 40))):
        fs.put(str(p), f"{data}/in/{p.name}")
    fs.pipe(cfg_url, yaml.safe_dump({"src": f"{data}/in/*.png", "dst": f"{data}/out", "backbone": "tiny",
                                     "t": 80, "shard_size": 3, "workers": 1, "actor_cpus": 0.5}).encode())
    # Token auth is KubeRay's business on a real cluster; the local head runs without it.
    env = {**os.environ, **s3_server["env"], "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    import socket
    import tempfile

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    ray_tmp = tempfile.mkdtemp(prefix="rayh-", dir="/tmp")
    ray_bin = str(Path(sys.executable).parent / "ray")
    start = subprocess.run([ray_bin, "start", "--head", "--port", port, "--num-cpus", "2", "--num-gpus", "0",
                            "--include-dashboard=false", "--temp-dir", ray_tmp, "--disable-usage-stats"],
                           capture_output=True, text=True, env=env, timeout=120)
    assert start.returncode == 0, start.stderr[-2000:]
    try:
        addr = re.search(r"ray start --address='([^']+)'", start.stdout + start.stderr).group(1)
        env["RAY_ADDRESS"] = addr
        fcodec = str(Path(sys.executable).parent / "fcodec")
        argv = shlex.split(ep)
        run = subprocess.run([fcodec, *argv[1:], "--no-progress"], capture_output=True, text=True, env=env, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        assert "6 ok" in run.stdout or "ok: 6" in run.stdout or re.search(r"\b6\b.*ok", run.stdout), run.stdout
        import pyarrow.parquet as pq

        table = pq.read_table(f"{data}/out".replace("s3://", ""), filesystem=fs)
        assert table.num_rows == 6 and set(table.column("status").to_pylist()) == {"ok"}
    finally:
        _stop_ray_head(ray_tmp)  # not `ray stop`: that would kill every Ray on the machine, the suite's own too


def _stop_ray_head(temp_dir: str) -> None:
    """Kill the processes of the head started under `temp_dir` (and their worker children)."""
    import psutil

    procs = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in (p.info["cmdline"] or [])):
                procs += [*p.children(recursive=True), p]
        except psutil.Error:
            continue
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=30)
