"""The Kubernetes manifests and the Dockerfile in deploy/.

The manifests are checked against the Kubernetes API schemas shipped inside the
kubernetes-validate package (offline, strict: unknown fields fail), and against
each other and the server: the ConfigMap's TOML is read by the server's own
config loader, the Secret's token file by its token parser, and the ports,
probes and mounts agree with what the config says. There is no container
engine here, so the Dockerfile is checked statically, not built.
"""

from __future__ import annotations

import pathlib
import tomllib
from typing import Any

import kubernetes_validate
import pytest
import yaml

from slipstream.cache_server.auth import parse_tokens
from slipstream.cache_server.config import apply_layers
from slipstream.cli import build_parser

DEPLOY = pathlib.Path(__file__).resolve().parents[2] / "deploy"
K8S_VERSION = "1.30.0"  # the oldest version the manifests must work on


def _docs() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def _one(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in _docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


@pytest.mark.parametrize("version", [K8S_VERSION, kubernetes_validate.latest_version()])
def test_manifests_match_the_kubernetes_schemas(version: str) -> None:
    docs = _docs()
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "ConfigMap", "Secret"}
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_a_broken_manifest_is_caught() -> None:
    """The validator does reject things: a probe with a misspelt field, a port as text."""
    deployment = _one("Deployment", "slipstream")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbe"]["grpc"]["prot"] = 9382
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    deployment = _one("Deployment", "slipstream")
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def _port(listen: str) -> int:
    return int(listen.rpartition(":")[2])


def test_manifests_agree_with_the_server_and_each_other(tmp_path: pathlib.Path) -> None:
    config_text = _one("ConfigMap", "slipstream-config")["data"]["slipstream.toml"]
    config_file = tmp_path / "slipstream.toml"
    config_file.write_text(config_text)
    # The server's own loader accepts every key and value of the ConfigMap.
    args = build_parser().parse_args(["serve", "--config", str(config_file)])
    apply_layers(args, {})
    assert args.storage.startswith("s3://") and args.s3_region == "eu-west-1"
    assert args.anonymous == "read" and args.max_streams == 400
    assert args.log_format == "json"

    deployment = _one("Deployment", "slipstream")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {
        "grpc": _port(args.listen),
        "metrics": _port(args.metrics_listen),
        "health": _port(args.health_listen),
    }
    # Probes use the gRPC health service, on the plaintext health-only port.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == ports["health"], probe
    assert container["args"] == ["--config", "/etc/slipstream/config/slipstream.toml"]
    # Every file the config names is mounted from the ConfigMap or a Secret.
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == "slipstream-config"
    tokens_secret = _one("Secret", volumes["tokens"]["secret"]["secretName"])
    tls_secret = _one("Secret", volumes["tls"]["secret"]["secretName"])
    assert args.token_file == f"{mounts['tokens']}/tokens.toml"
    assert args.tls_cert == f"{mounts['tls']}/tls.crt"
    assert args.tls_key == f"{mounts['tls']}/tls.key"
    assert str(args.cache_dir) == mounts["cache"]
    assert set(tls_secret["stringData"]) == {"tls.crt", "tls.key"}
    # The token file in the Secret parses, with hashes only.
    tokens = parse_tokens(tokens_secret["stringData"]["tokens.toml"], "secret")
    assert {t.name for t in tokens.values()} == {"ci-main", "ci-pull-requests"}
    assert "ac-write" not in next(t for t in tokens.values() if t.name == "ci-pull-requests").scopes
    # The Service reaches the pods by their labels and named ports.
    service = _one("Service", "slipstream")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    targets = {p["name"]: p["targetPort"] for p in service["spec"]["ports"]}
    assert targets == {"grpc": "grpc", "metrics": "metrics"}
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(ports["metrics"])
    # The container runs as the image's non-root user.
    assert pod["securityContext"]["runAsUser"] == 10001


def test_dockerfile_is_consistent_with_the_repository() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line and not line.startswith("#")]
    assert sum(line.startswith("FROM ") for line in lines) == 2
    # Everything it copies exists, and the package metadata it builds from is complete.
    for line in lines:
        if line.startswith("COPY ") and "--from" not in line:
            for source in line.split()[1:-1]:
                assert (DEPLOY.parent / source).exists(), source
    project = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["slipstream"] == "slipstream.cli:main"
    root = DEPLOY.parent.resolve()
    for package in project["tool"]["setuptools"]["packages"]:
        # slipstream/cache_server is a link to cache_server/: both must be in the image.
        folder = (root / package.replace(".", "/")).resolve().relative_to(root)
        assert f"COPY {folder.parts[0]}/" in text, package
        assert "COPY slipstream/" in text, package
    assert 'ENTRYPOINT ["slipstream", "serve"]' in lines
    assert "USER 10001:10001" in lines
    exposed = {int(p) for line in lines if line.startswith("EXPOSE") for p in line.split()[1:]}
    assert exposed == {9380, 9381, 9382}
    # No SLIPSTREAM_* in the image: they would override a mounted config file.
    assert "SLIPSTREAM_" not in "".join(lines)
