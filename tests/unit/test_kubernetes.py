"""The Kubernetes manifests of docs/kubernetes (issue 16): they parse, and each object names the
fields its kind needs (a DaemonSet's selector matches its pod labels, the Service selects the
DaemonSet's pods, the ServiceMonitor the Service)."""

import os

import yaml

from conftest import REPO

DIRECTORY = os.path.join(REPO, "docs", "kubernetes")


def objects(name):
    with open(os.path.join(DIRECTORY, name)) as manifest:
        return {document["kind"]: document for document in yaml.safe_load_all(manifest) if document}


def test_every_object_has_the_fields_of_its_kind():
    for name in os.listdir(DIRECTORY):
        for kind, document in objects(name).items():
            assert document["apiVersion"] and document["metadata"]["name"], (name, kind)
            if kind != "Namespace":
                assert document["spec"], (name, kind)


def test_the_exporter_daemonset_reads_the_node_and_nothing_more():
    found = objects("ksmpreload-exporter.yaml")
    daemonset, service, monitor = found["DaemonSet"], found["Service"], found["ServiceMonitor"]
    assert daemonset["apiVersion"] == "apps/v1"
    pod = daemonset["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert daemonset["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pod["spec"]["hostPID"] is True
    (container,) = pod["spec"]["containers"]
    assert container["name"] and container["image"] and container["args"][0] == "exporter"
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    assert security["capabilities"]["drop"] == ["ALL"] and "SYS_ADMIN" not in security["capabilities"]["add"]
    assert all(mount["readOnly"] for mount in container["volumeMounts"])
    volumes = {volume["name"] for volume in pod["spec"]["volumes"]}
    assert {mount["name"] for mount in container["volumeMounts"]} <= volumes
    assert service["spec"]["selector"].items() <= labels.items()
    port = container["ports"][0]
    assert service["spec"]["ports"][0]["targetPort"] == port["name"] and f":{port['containerPort']}" in " ".join(
        container["args"]
    )
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]


def test_the_wrapped_pod_preloads_the_shim_its_init_container_copies():
    pod = objects("wrapped-pod.yaml")["Pod"]
    (init,) = pod["spec"]["initContainers"]
    (program,) = pod["spec"]["containers"]
    preload = {env["name"]: env["value"] for env in program["env"]}["LD_PRELOAD"]
    shared = {mount["name"]: mount["mountPath"] for mount in init["volumeMounts"]}
    assert preload == os.path.join(shared["shim"], "libksmpreload.so") and "/ksmpreload/" in init["command"][-1]
    assert {mount["name"]: mount["mountPath"] for mount in program["volumeMounts"]}["shim"] == shared["shim"]
