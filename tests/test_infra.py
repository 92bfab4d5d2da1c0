"""infra/: manifests parse and carry the fields the CRDs require and validate strictly (unknown
fields rejected) against KubeRay's real CRD schemas, the Kubernetes schemas and Ray's
cluster-config schema; entrypoints are real fcodec commands, image tags agree, no credentials in
files; the RayJob entrypoint runs end to end against a head started with `ray start --head`."""
from __future__ import annotations

import copy
import importlib
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
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
            assert CRON.match(s["schedule"]), where
            # KubeRay's RayCronJob has no concurrencyPolicy (the API server prunes it): overlap
            # protection is the lease `fcodec compress` takes on DST.
            assert "concurrencyPolicy" not in s, where
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
    """Each entrypoint names an existing job, its options parse to exactly the values the manifest
    sets, and the config it reads is one shipped in infra/configs for that same job."""
    from jobs.cli import build_parser, job_names

    eps = _entrypoints()
    assert len(eps) >= 6
    parser = build_parser()
    jobs = job_names()
    for path, ep in eps:
        argv = shlex.split(ep)
        assert argv[0] == "fcodec" and argv[1] in jobs, (path, ep)
        args = parser.parse_args(argv[1:])  # SystemExit on any unknown option
        assert args.command == argv[1] and args._run is importlib.import_module(f"jobs.{argv[1]}").run, ep
        opts = argv[2:]
        assert len(opts) % 2 == 0 and all(o.startswith("--") for o in opts[::2]), ep
        for flag, value in zip(opts[::2], opts[1::2]):
            assert str(getattr(args, flag[2:].replace("-", "_"))) == value, (ep, flag)
        assert args.ray_address == "auto", ep
        config = INFRA / "configs" / args.config.rsplit("/", 1)[1]
        assert config.is_file() and re.split(r"[-.]", config.name)[0] == argv[1], (ep, config)


# ---- strict schema validation: KubeRay CRDs (../shared) and core kinds (kubernetes-validate) ----

K8S_VERSION = "1.37.0"  # a Kubernetes release kubernetes-validate 1.37.0 ships schemas for
# x-kubernetes-* extensions _strict knows; a CRD update bringing another one fails loudly.
KNOWN_EXTENSIONS = {"x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields", "x-kubernetes-list-type",
                    "x-kubernetes-list-map-keys", "x-kubernetes-map-type", "x-kubernetes-validations",
                    "x-kubernetes-embedded-resource"}
INT_OR_STRING = [{"type": "integer"}, {"type": "string"}]  # what controller-gen writes beside the flag


def _strict(schema: dict) -> dict:
    """A CRD's openAPIV3Schema as `kubectl apply --validate=strict` applies it: a property the schema
    does not name is an error unless x-kubernetes-preserve-unknown-fields; int-or-string accepts
    either; `nullable` admits null; list-type `set` items are unique (`map` keys: _list_map_keys)."""
    unknown = {k for k in schema if k.startswith("x-kubernetes-")} - KNOWN_EXTENSIONS
    if unknown:
        raise ValueError(f"teach _strict the CRD extension(s) {sorted(unknown)}")
    s = dict(schema)
    if "properties" in s:
        s["properties"] = {name: _strict(sub) for name, sub in s["properties"].items()}
    for k in ("items", "not", "additionalProperties"):
        if isinstance(s.get(k), dict):
            s[k] = _strict(s[k])
    for k in ("anyOf", "allOf", "oneOf"):
        if k in s:
            s[k] = [_strict(sub) for sub in s[k]]
    if s.pop("x-kubernetes-int-or-string", False):
        if s.pop("anyOf", INT_OR_STRING) != INT_OR_STRING:
            raise ValueError(f"int-or-string with an unexpected anyOf: {schema}")
        s["type"] = ["integer", "string"]  # any `pattern` applies to the string form only
    if s.get("nullable") and "type" in s:
        s["type"] = [*([s["type"]] if isinstance(s["type"], str) else s["type"]), "null"]
    if "properties" in s and "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
        s["additionalProperties"] = False
    if s.get("x-kubernetes-list-type") == "set":
        s["uniqueItems"] = True
    if s.get("x-kubernetes-embedded-resource"):
        s["required"] = sorted({*s.get("required", []), "apiVersion", "kind"})
    return s


def _list_map_keys(validator, keys, instance, schema):
    """x-kubernetes-list-type: map — no two items share their key fields (absent ones take their default)."""
    if not validator.is_type(instance, "array"):
        return
    props = (schema.get("items") or {}).get("properties", {})
    seen = set()
    for item in instance:
        if isinstance(item, dict):
            key = tuple(item.get(k, props.get(k, {}).get("default")) for k in keys)
            if key in seen:
                yield jsonschema.ValidationError(f"duplicate list-map key {dict(zip(keys, key))}")
            seen.add(key)


# The CEL subset KubeRay's rules use: has(self.f), self in [...], !, &&, ||, ==. A rule outside it is
# reported as not checkable rather than passed.
CEL_TOKENS = re.compile(r"\s+|[()\[\],]|'[^'\\]*'|==|\b(?:self|in|and|or|not)\b")


def _cel_to_python(m: re.Match) -> str:
    if m.group(1):
        return f"({m.group(1)!r} in self)"
    return {"&&": " and ", "||": " or ", "!": " not "}.get(m.group(), m.group())  # literals unchanged


def _cel(validator, rules, instance, schema):
    """x-kubernetes-validations, evaluated for a newly created object (transition rules skipped)."""
    for r in rules:
        if "oldSelf" in r["rule"]:
            continue  # e.g. `self == oldSelf` (immutability): only checked on update
        py = re.sub(r"'[^'\\]*'|has\(self\.(\w+)\)|&&|\|\||!", _cel_to_python, r["rule"])
        if CEL_TOKENS.sub("", py):
            yield jsonschema.ValidationError(f"CEL rule this test cannot evaluate (extend _cel): {r['rule']}")
        elif not eval(py, {"__builtins__": {}}, {"self": instance}):  # only the whitelisted tokens above
            yield jsonschema.ValidationError(r.get("message") or r["rule"])


FORMATS = jsonschema.FormatChecker()
FORMATS.checks("int32")(lambda v: not isinstance(v, int) or -2**31 <= v < 2**31)
FORMATS.checks("int64")(lambda v: not isinstance(v, int) or -2**63 <= v < 2**63)
# OpenAPI v3 schemas are JSON Schema draft 4 in their keywords (boolean exclusiveMinimum, no const).
CRDValidator = jsonschema.validators.extend(
    jsonschema.Draft4Validator, {"x-kubernetes-list-map-keys": _list_map_keys, "x-kubernetes-validations": _cel})


@pytest.fixture(scope="module")
def crd_validators(shared_dir) -> dict:
    """(apiVersion, kind) -> strict validator, from KubeRay's CRDs in ../shared/k8s/kuberay-crds."""
    crds = sorted((shared_dir / "k8s" / "kuberay-crds").glob("ray.io_*.yaml"))
    if not crds:
        pytest.skip("../shared/k8s/kuberay-crds is absent")
    out = {}
    for p in crds:
        crd = yaml.load(p.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        for v in crd["spec"]["versions"]:
            key = (f"{crd['spec']['group']}/{v['name']}", crd["spec"]["names"]["kind"])
            out[key] = CRDValidator(_strict(v["schema"]["openAPIV3Schema"]), format_checker=FORMATS)
    assert {("ray.io/v1", k) for k in ("RayCluster", "RayJob", "RayCronJob")} <= set(out)
    return out


def _core_errors(doc: dict) -> list[str]:
    """kubernetes-validate's strict schema for a core kind (unknown fields rejected); it reports the
    first error. A kind it has no schema for raises SchemaNotFoundError and fails the test."""
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(map(str, e.path))}: {e.message}"]
    return []


def _crd_errors(doc: dict, crd_validators: dict) -> list[str]:
    """Every error of a ray.io object against its CRD schema, as 'path: message'."""
    validator = crd_validators[(doc["apiVersion"], doc["kind"])]
    return sorted(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc))


def _metadata_errors(doc: dict) -> list[str]:
    """The CRD schema leaves a custom resource's root metadata open; the API server checks it as
    ObjectMeta, as for any core object."""
    return _core_errors({"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]})


def _k8s_docs():
    """(where, document) for every object under infra/k8s, and the RayJob a ConfigMap carries for
    the CronJob to `kubectl create`."""
    for path in sorted((INFRA / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            yield f"{path.name}:{doc['kind']}/{doc['metadata'].get('name')}", doc
            if doc["kind"] == "ConfigMap":
                for key, text in doc["data"].items():
                    inner = yaml.safe_load(text)
                    if isinstance(inner, dict) and "apiVersion" in inner:
                        yield f"{path.name}:ConfigMap/{doc['metadata']['name']}[{key}]", inner


def _doc(name: str) -> dict:
    return next(doc for where, doc in _k8s_docs() if where.startswith(name))


def _edited(doc: dict, path: list, key: str, value) -> dict:
    """A copy of doc with doc[path...][key] = value."""
    doc = copy.deepcopy(doc)
    node = doc
    for k in path:
        node = node[k]
    node[key] = value
    return doc


def test_core_manifests_validate_strictly():
    """Core kinds (and every object's metadata) against Kubernetes' own schemas, unknown fields
    rejected; needs no ../shared."""
    kinds = {}
    for where, doc in _k8s_docs():
        ray = doc["apiVersion"].startswith("ray.io/")
        assert (_metadata_errors(doc) if ray else _core_errors(doc)) == [], where
        kinds[doc["kind"]] = kinds.get(doc["kind"], 0) + (not ray)
    assert kinds == {"RayCluster": 0, "RayJob": 0, "RayCronJob": 0, "CronJob": 1, "ConfigMap": 1,
                     "ServiceAccount": 1, "Role": 1, "RoleBinding": 1}, kinds


def test_kuberay_manifests_validate_against_the_crds(crd_validators):
    """No field the API server would prune or reject in any ray.io object we ship (the four
    RayJobs, the CronJob's RayJob template, the RayCluster, the RayCronJob)."""
    ray = [(where, doc) for where, doc in _k8s_docs() if doc["apiVersion"].startswith("ray.io/")]
    assert sorted(doc["kind"] for _, doc in ray) == ["RayCluster", "RayCronJob", *["RayJob"] * 5]
    for where, doc in ray:
        assert _crd_errors(doc, crd_validators) == [], where


def test_the_crd_check_rejects_unknown_fields_and_wrong_types(crd_validators):
    """The CRD check is not vacuous: each edit below is one the API server would prune or refuse."""
    cron = _doc("raycronjob-compress.yaml")
    assert _crd_errors(cron, crd_validators) == []
    workers = ["spec", "jobTemplate", "rayClusterSpec", "workerGroupSpecs", 0]
    containers = [*workers, "template", "spec", "containers"]
    limits = [*containers, 0, "resources", "limits"]
    w, c = ".".join(map(str, workers)), ".".join(map(str, containers))

    def errors(path, key, value):
        return _crd_errors(_edited(cron, path, key, value), crd_validators)

    unexpected = "Additional properties are not allowed ({!r} was unexpected)".format
    # the field a Kubernetes CronJob has and KubeRay's RayCronJob does not
    assert errors(["spec"], "concurrencyPolicy", "Forbid") == [f"spec: {unexpected('concurrencyPolicy')}"]
    assert errors([*containers, 0], "imagePullPolicyy", "Always") == [f"{c}.0: {unexpected('imagePullPolicyy')}"]
    assert errors(workers, "replicas", "one") == [f"{w}.replicas: 'one' is not of type 'integer'"]
    assert errors(workers, "replicas", 2**31) == [f"{w}.replicas: {2**31} is not a 'int32'"]
    assert errors(["spec"], "suspend", "no") == ["spec.suspend: 'no' is not of type 'boolean'"]
    # rayStartParams is a map of strings: an unquoted number is the classic slip
    assert errors([*workers, "rayStartParams"], "num-gpus", 1) == [
        f"{w}.rayStartParams.num-gpus: 1 is not of type 'string'"]
    # int-or-string quantities: a number or a quantity string, not a list or a malformed string
    assert errors(limits, "cpu", 8) == [] and errors(limits, "cpu", "7500m") == []
    assert errors(limits, "cpu", [8]) == [f"{c}.0.resources.limits.cpu: [8] is not of type 'integer', 'string'"]
    assert len(errors(limits, "cpu", "eight")) == 1
    # list-type map: two containers of one name
    two = _edited(cron, workers + ["template", "spec"], "containers",
                  [*cron["spec"]["jobTemplate"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
                   ["containers"], {"name": "ray-worker", "image": "x"}])
    assert _crd_errors(two, crd_validators) == [f"{c}: duplicate list-map key {{'name': 'ray-worker'}}"]
    # CEL rules (x-kubernetes-validations)
    assert errors(["spec", "jobTemplate"], "managedBy", "ray.io/kuberay-operator") == []
    assert errors(["spec", "jobTemplate"], "managedBy", "me") == [
        "spec.jobTemplate.managedBy: the managedBy field value must be either 'ray.io/kuberay-operator' or "
        "'kueue.x-k8s.io/multikueue'"]
    assert errors(["spec", "jobTemplate"], "deletionStrategy", {"onSuccess": {"policy": "DeleteCluster"}}) == [
        "spec.jobTemplate.deletionStrategy: deletionStrategy requires either BOTH onSuccess and onFailure, OR the "
        "deletionRules field (cannot be empty)"]


def test_the_core_check_rejects_unknown_fields_and_wrong_types():
    """kubernetes-validate in strict mode, as used above, refuses what the API server would."""
    cronjob = _doc("cronjob-compress.yaml:CronJob")
    assert _core_errors(cronjob) == []
    assert _core_errors(_edited(cronjob, ["spec"], "concurrencyPolicyy", "Forbid")) == [
        "spec: Additional properties are not allowed ('concurrencyPolicyy' was unexpected)"]
    assert _core_errors(_edited(cronjob, ["spec"], "suspend", "no")) == [
        "spec.suspend: 'no' is not of type 'boolean', 'null'"]
    assert _metadata_errors(_edited(_doc("raycronjob-compress.yaml"), ["metadata"], "nam", "x")) == [
        "metadata: Additional properties are not allowed ('nam' was unexpected)"]


def test_cluster_launcher_config_validates_against_rays_schema():
    """`ray up` checks its config against ray/autoscaler/ray-schema.json (shipped in the ray package,
    the version pyproject pins); so do we, and the check rejects an unknown key."""
    import importlib.resources
    import json

    schema = json.loads((importlib.resources.files("ray.autoscaler") / "ray-schema.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    config = yaml.safe_load((INFRA / "ray-cluster-launcher.yaml").read_text())
    assert [e.message for e in validator.iter_errors(config)] == []
    bad = {**config, "max_worker": 3}
    assert [e.message for e in validator.iter_errors(bad)] == [
        "Additional properties are not allowed ('max_worker' was unexpected)"]


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
    from jobs.cli import build_parser
    from jobs.options import apply_config

    parser = build_parser()
    for p in sorted((INFRA / "configs").glob("*.yaml")):
        job = re.split(r"[-.]", p.name)[0]
        args = apply_config(parser.parse_args([job, "--config", str(p)]), None)
        cfg = yaml.safe_load(p.read_text())
        for k, v in cfg.items():
            assert getattr(args, k) == v, (p.name, k)


def test_generic_config_flags_win_and_positionals_are_required(tmp_path):
    from jobs.cli import build_parser
    from jobs.options import apply_config

    cfg = tmp_path / "v.yaml"
    cfg.write_text("dataset: /data/a\ndecode_sample: 3\n")
    parser = build_parser()
    args = apply_config(parser.parse_args(["verify", "--config", str(cfg), "--decode-sample", "5"]), None)
    assert (args.dataset, args.decode_sample) == ("/data/a", 5)
    with pytest.raises(ValueError, match="missing DATASET"):
        apply_config(parser.parse_args(["verify"]), None)
    cfg.write_text("nope: 1\n")
    with pytest.raises(ValueError, match="unknown options"):
        apply_config(parser.parse_args(["verify", "--config", str(cfg)]), None)


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
